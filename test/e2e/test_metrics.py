"""Envoy stats for pools and keys, and the optional debug header naming the key."""

from __future__ import annotations

import re
import time

from checks import lds_bootstrap
from harness import LOAD_SLACK_S, STATS_PREFIX, free_port, until, wait_for

A, B = "sk-test-sierra-0001", "sk-test-tango-0002"
PREFIX = f"{STATS_PREFIX}ai_key_failover.pool.main."


def test_stats_count_requests_transitions_and_follow_availability(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"script": [{"status": 429}]}, B: {"script": [{"status": 503}]}}})
    cfg = {"name": "main", "apiTokens": [{"token": A, "name": "sierra"}, B],
           "onAllUnavailable": "reject", "failover": {"cooldownDuration": 1500}}
    envoy = envoy_factory.start(cfg, concurrency=2)
    sent_at = time.time()
    with envoy.client() as c:
        statuses = [c.chat().status for _ in range(3)]
    answered_at = time.time()
    assert sorted(statuses) == [429, 429, 503]
    b_label = [n for n in envoy.stats("ai_key_failover") if ".key." in n and ".sierra." not in n][0].split(".key.")[1].split(".")[0]
    assert b_label.startswith("key-") and len(b_label) == 12

    s = until(lambda: envoy.stats("ai_key_failover"), lambda s: s.get(PREFIX + "requests_rejected") == 1, 3,
              what="counters flushed on tick")
    assert s[PREFIX + "keys_configured"] == 2
    assert s[PREFIX + "keys_available"] == 0
    assert s[PREFIX + "requests_keyed"] == 2
    assert s[PREFIX + "class.rate_limit.keys_marked_down"] == 1
    assert s[PREFIX + "class.server_error.keys_marked_down"] == 1
    assert s[PREFIX + "key.sierra.key_available"] == 0
    assert s[PREFIX + "key.sierra.key_marked_down"] == 1
    # Marked down between sent_at and answered_at for 1.5 s plus up to 10% jitter, rounded up to
    # the second.
    down_until = s[PREFIX + "key.sierra.key_down_until_seconds"]
    assert sent_at + 1.5 <= down_until <= answered_at + 2.7, (sent_at, down_until, answered_at)
    assert s[PREFIX + f"key.{b_label}.key_available"] == 0

    # Both time outs end after 1.5 s (plus jitter), at the next tick (every second) at the
    # latest; each of the next two requests probes one key.
    until(lambda: set(re.findall(r"key (\S+) time out over; the next request probes it", envoy.plugin_log(settle=0))),
          lambda ready: ready >= {"sierra", b_label}, timeout=1.65 + 1 + LOAD_SLACK_S, what="both time outs over")
    assert [envoy.chat().status for _ in range(2)] == [200, 200]

    s = until(lambda: envoy.stats("ai_key_failover"),
              lambda s: s.get(PREFIX + "keys_restored") == 2 and s.get(PREFIX + "keys_available") == 2, 4,
              what="keys restored and gauges synced")
    assert s[PREFIX + "key.sierra.key_restored"] == 1
    assert s[PREFIX + "key.sierra.key_available"] == 1
    assert s[PREFIX + "key.sierra.key_down_until_seconds"] == 0
    assert s[PREFIX + "cas_gave_up"] == 0
    assert s[PREFIX + "state_decode_failed"] == 0


def test_key_refused_until_reload_is_disabled_with_no_end_time(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 401}}, B: {}}})
    cfg = {"name": "main", "apiTokens": [{"token": A, "name": "sierra"}, {"token": B, "name": "tango"}],
           "failover": {"disableDuration": 0}}
    envoy = envoy_factory.start(cfg)
    with envoy.client() as c:
        statuses = [c.chat().status for _ in range(4)]
    assert sorted(statuses) == [200, 200, 200, 401]
    envoy.wait_log(r"key sierra refused by the provider", plugin_only=True)

    def synced():
        s = envoy.stats("ai_key_failover")
        return s if s.get(PREFIX + "key.sierra.key_disabled") == 1 and s.get(PREFIX + "requests_keyed") == 4 else None

    s = wait_for(synced, 5, interval=0.2, what="key_disabled gauge published")
    assert s[PREFIX + "key.sierra.key_available"] == 0
    # Disabled until the next config load has no end: 0, not u64::MAX / 1000 (about 1.8e16).
    assert s[PREFIX + "key.sierra.key_down_until_seconds"] == 0
    assert s[PREFIX + "class.key_refused.keys_marked_down"] == 1
    assert s[PREFIX + "key.tango.key_disabled"] == 0
    assert s[PREFIX + "key.tango.key_available"] == 1


def test_requests_counted_just_before_a_reload_are_not_lost(envoy_factory, mock, tmp_path):
    # A new plugin config gets a new root context; Envoy deletes the old one once its last
    # request is done (at once here: no drain time), before its next once-a-second flush.
    v1 = {"name": "main", "apiTokens": [{"token": A, "name": "sierra"}, {"token": B, "name": "tango"}]}
    v2 = {**v1, "exposeKeyName": True}
    port = free_port()
    bootstrap, swap = lds_bootstrap(tmp_path, mock.port, port, v1)
    envoy = envoy_factory.start(v2, raw_config=bootstrap, extra_args=["--drain-time-s", "0"])
    envoy.port = port
    lm = "listener_manager."
    sent = 0
    for round_ in range(3):
        # Five requests counted on the current config, then at once the other config: their
        # counts are still pending (the flush runs once a second) when the old root goes.
        exposes_key = round_ % 2 == 1
        with envoy.client() as c:
            for _ in range(5):
                r = c.chat()
                sent += 1
                assert r.status == 200 and ("x-ai-key-failover-key" in r.headers) == exposes_key
        applied = envoy.stats(lm)[lm + "lds.update_success"]
        swap(v1 if exposes_key else v2)

        def swapped():  # no request is sent while the old filter chain is being removed
            s = envoy.stats(lm)
            return s[lm + "lds.update_success"] > applied and s[lm + "total_filter_chains_draining"] == 0

        wait_for(swapped, 10, interval=0.1, what="the new listener config to be applied")

    keyed = until(lambda: envoy.stats("ai_key_failover").get(PREFIX + "requests_keyed", 0), lambda n: n >= sent,
                  5, interval=0.2, what=f"requests_keyed to count the {sent} requests keyed")
    assert keyed == sent, f"requests_keyed is {keyed}, but {sent} requests were keyed"

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
