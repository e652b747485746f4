"""Envoy stats for pools and keys, and the optional debug header naming the key."""

from __future__ import annotations

import time

from harness import STATS_PREFIX, wait_for

A, B = "sk-test-sierra-0001", "sk-test-tango-0002"
PREFIX = f"{STATS_PREFIX}ai_key_failover.pool.main."


def test_stats_count_requests_transitions_and_follow_availability(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"script": [{"status": 429}]}, B: {"script": [{"status": 503}]}}})
    cfg = {"name": "main", "apiTokens": [{"token": A, "name": "sierra"}, B],
           "onAllUnavailable": "reject", "failover": {"cooldownDuration": 1500}}
    envoy = envoy_factory.start(cfg, concurrency=2)
    with envoy.client() as c:
        statuses = [c.chat().status for _ in range(3)]
    assert sorted(statuses) == [429, 429, 503]
    b_label = [n for n in envoy.stats("ai_key_failover") if ".key." in n and ".sierra." not in n][0].split(".key.")[1].split(".")[0]
    assert b_label.startswith("key-") and len(b_label) == 12

    def synced():
        s = envoy.stats("ai_key_failover")
        return s if s.get(PREFIX + "requests_rejected") == 1 else None

    s = wait_for(synced, 3, what="counters flushed on tick")
    assert s[PREFIX + "keys_configured"] == 2
    assert s[PREFIX + "keys_available"] == 0
    assert s[PREFIX + "requests_keyed"] == 2
    assert s[PREFIX + "class.rate_limit.keys_marked_down"] == 1
    assert s[PREFIX + "class.server_error.keys_marked_down"] == 1
    assert s[PREFIX + "key.sierra.key_available"] == 0
    assert s[PREFIX + "key.sierra.key_marked_down"] == 1
    until = s[PREFIX + "key.sierra.key_down_until_seconds"]
    assert 0 < until - time.time() <= 2.7
    assert s[PREFIX + f"key.{b_label}.key_available"] == 0

    # Both time outs end after 1.5 s (plus jitter); each of the next two requests probes one key.
    time.sleep(1.8)
    assert [envoy.chat().status for _ in range(2)] == [200, 200]

    def restored():
        s = envoy.stats("ai_key_failover")
        return s if s.get(PREFIX + "keys_restored") == 2 and s.get(PREFIX + "keys_available") == 2 else None

    s = wait_for(restored, 4, what="keys restored and gauges synced")
    assert s[PREFIX + "key.sierra.key_restored"] == 1
    assert s[PREFIX + "key.sierra.key_available"] == 1
    assert s[PREFIX + "key.sierra.key_down_until_seconds"] == 0
    assert s[PREFIX + "cas_gave_up"] == 0
    assert s[PREFIX + "state_decode_failed"] == 0


def test_prometheus_output_has_pool_key_and_class_labels(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {}}})
    envoy = envoy_factory.start({"name": "main", "apiTokens": [{"token": A, "name": "sierra"}, {"token": B, "name": "tango"}]})
    for _ in range(4):
        envoy.chat()
    def flushed():
        text = envoy.admin("/stats/prometheus").text
        return text if 'ai_key_failover_requests_keyed{pool="main"} 4' in text else None

    prom = wait_for(flushed, 3, what="prometheus counters")
    assert 'ai_key_failover_keys_available{pool="main"} 1' in prom
    assert 'ai_key_failover_key_available{pool="main",key="sierra"} 0' in prom
    assert 'ai_key_failover_key_available{pool="main",key="tango"} 1' in prom
    assert 'ai_key_failover_keys_marked_down{pool="main",failure_class="rate_limit"} 1' in prom
    assert A not in prom and B not in prom


def test_expose_key_name_header_names_the_key_never_the_key_itself(envoy_factory, mock):
    envoy = envoy_factory.start({"apiTokens": [{"token": A, "name": "sierra"}, B], "exposeKeyName": True})
    with envoy.client() as c:
        shown = [c.chat().headers["x-ai-key-failover-key"] for _ in range(4)]
    received = mock.keys_received()
    b_label = next(s for s in shown if s != "sierra")
    assert b_label.startswith("key-") and len(b_label) == 12
    # Each response names the key that request was sent with.
    assert [{"sierra": A, b_label: B}[s] for s in shown] == received


def test_no_debug_header_by_default(envoy_factory, mock):
    envoy = envoy_factory.start({"apiTokens": [A]})
    r = envoy.chat()
    assert r.status == 200
    assert "x-ai-key-failover-key" not in r.headers
