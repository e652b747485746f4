"""Active health checks: down keys are probed with a minimal real request, by one VM at a time."""

from __future__ import annotations

import json
import time
from collections import Counter

from checks import PLUGIN_STATS, lds_bootstrap
from harness import free_port, wait_for

A, B, C = "sk-test-hotel-0001", "sk-test-india-0002", "sk-test-juliet-0003"
UA = "ai-key-failover-health-check"


def checks(mock):
    return [r for r in mock.requests() if r["headers"].get("user-agent") == UA]


def pool(**failover):
    return {"name": "hc", "apiTokens": [{"token": A, "name": "hotel"}, {"token": B, "name": "india"},
                                        {"token": C, "name": "juliet"}],
            "failover": {"healthCheckModel": "hc-model", "healthCheckInterval": 1000, "disableDuration": 0,
                         **failover}}


def take_out(envoy, mock, *keys, status=401):
    for k in keys:
        mock.always(k, {"status": status})
    with envoy.client() as c:
        for _ in range(12):
            c.chat()
    for k in keys:
        name = {A: "hotel", B: "india", C: "juliet"}[k]
        envoy.wait_log(rf"key {name} refused by the provider", plugin_only=True)


def test_a_revoked_key_that_becomes_valid_again_is_restored_by_checks(envoy_factory, mock):
    mock.set_keys({"keys": {A: {}, B: {}, C: {}}})
    envoy = envoy_factory.start(pool(), concurrency=4)
    take_out(envoy, mock, A)
    # Still revoked: checks fail and hotel stays out; live traffic never uses it.
    wait_for(lambda: len([c for c in checks(mock) if c["key"] == A]) >= 2, 5, what="two failed checks")
    mock.clear()
    for _ in range(6):
        assert envoy.chat().status == 200
    assert A not in mock.keys_received()
    # The key is fixed at the provider: the next check brings it back.
    mock.always(A, None)
    envoy.wait_log(r"key hotel passed its health check \(status 200\); back in rotation", timeout=5, plugin_only=True)
    mock.clear()
    with envoy.client() as c:
        for _ in range(9):
            assert c.chat().status == 200
    assert A in mock.keys_received()


def test_the_check_is_a_minimal_completion_with_the_key_in_the_providers_header(envoy_factory, mock):
    mock.set_keys({"keys": {A: {}, B: {}, C: {}}})
    envoy = envoy_factory.start({**pool(), "provider": "anthropic"})
    envoy.chat(path="/v1/messages", headers={"host": "api.anthropic.test"})
    take_out(envoy, mock, A)
    check = wait_for(lambda: next(iter(checks(mock)), None), 5, what="a health check")
    assert check["method"] == "POST" and check["path"] == "/v1/messages"
    assert check["headers"]["x-api-key"] == A and "authorization" not in check["headers"]
    assert check["headers"]["anthropic-version"] == "2023-06-01"
    assert check["headers"]["host"] == "api.anthropic.test", "checks go where live traffic went"
    body = json.loads(check["body"])
    assert body == {"model": "hc-model", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}


def test_one_check_per_down_key_per_interval_however_many_workers(envoy_factory, mock):
    mock.set_keys({"keys": {A: {}, B: {}, C: {}}})
    envoy = envoy_factory.start(pool(), concurrency=4)
    take_out(envoy, mock, A, B)
    mock.clear()
    time.sleep(4.2)  # a window of four 1 s intervals (and a little) in which to count the checks
    per_key = Counter(c["key"] for c in checks(mock))
    # 4 workers and the main thread all tick every second; one lease holder checks.
    assert set(per_key) == {A, B}, "available keys are never checked"
    for key in (A, B):
        assert 3 <= per_key[key] <= 5, per_key
    times = sorted(c["time_ms"] for c in checks(mock) if c["key"] == A)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g >= 700 for g in gaps), gaps


def test_a_check_that_times_out_does_not_restore_the_key(envoy_factory, mock):
    mock.set_keys({"keys": {A: {}, B: {}, C: {}}})
    envoy = envoy_factory.start(pool(healthCheckTimeout=300), concurrency=2)
    take_out(envoy, mock, A)
    # hotel is valid again but answers too slowly for the check's timeout.
    mock.always(A, {"status": 200, "delayMs": 1500})
    wait_for(lambda: len([c for c in checks(mock) if c["key"] == A]) >= 3, 8, what="three checks")

    def failed():
        s = envoy.stats("ai_key_failover")
        return s if s.get(f"{PLUGIN_STATS}pool.hc.health_checks_failed", 0) >= 2 else None

    s = wait_for(failed, 4, what="failed checks counted")
    assert s[f"{PLUGIN_STATS}pool.hc.key.hotel.key_available"] == 0
    assert "passed its health check" not in envoy.plugin_log()
    assert s[f"{PLUGIN_STATS}pool.hc.health_checks_passed"] == 0
    assert s[f"{PLUGIN_STATS}pool.hc.health_checks_sent"] >= 3


def test_no_checks_without_health_check_model(envoy_factory, mock):
    mock.set_keys({"keys": {A: {}, B: {}, C: {}}})
    cfg = pool()
    del cfg["failover"]["healthCheckModel"]
    envoy = envoy_factory.start(cfg)
    take_out(envoy, mock, A)
    time.sleep(2.5)  # two and a half healthCheckIntervals in which no check may come
    assert checks(mock) == []


def test_a_configured_authority_is_what_checks_carry(envoy_factory, mock):
    # Live traffic arrives for the gateway's own host; a route would rewrite it for the provider,
    # but checks do not pass through routes, so the provider's host is configured.
    mock.set_keys({"keys": {A: {}, B: {}, C: {}}})
    cfg = pool(healthCheckCluster="mock_provider", healthCheckAuthority="api.provider.test")
    envoy = envoy_factory.start(cfg)
    envoy.chat(headers={"host": "gateway.example"})
    take_out(envoy, mock, A)
    check = wait_for(lambda: next(iter(checks(mock)), None), 5, what="a health check")
    assert check["headers"]["host"] == "api.provider.test"
    assert check["key"] == A


def test_sub_second_intervals_and_timeouts_work_as_configured(envoy_factory, mock):
    mock.set_keys({"keys": {A: {}, B: {}, C: {}}})
    envoy = envoy_factory.start(pool(healthCheckInterval=200, healthCheckTimeout=150), concurrency=2)
    take_out(envoy, mock, A)
    # Valid again, but slower than the 150 ms timeout: every check fails.
    mock.always(A, {"status": 200, "delayMs": 400})
    mock.clear()
    wait_for(lambda: len(checks(mock)) >= 4, 5, what="four checks")
    times = sorted(c["time_ms"] for c in checks(mock))
    gaps = [b - a for a, b in zip(times, times[1:])]
    # One check in flight at a time: the 400 ms answer is given up on after 150 ms; the next
    # check starts with the next 200 ms interval, not a second later.
    assert all(150 <= g <= 200 + 400 for g in gaps), gaps
    assert "passed its health check" not in envoy.plugin_log()
    # Answered in time again: back at the next check.
    mock.always(A, None)
    envoy.wait_log(r"key hotel passed its health check \(status 200\); back in rotation", timeout=3, plugin_only=True)


def test_a_check_that_could_only_use_the_cluster_name_as_host_says_so(envoy_factory, mock, tmp_path):
    # After a config change that drops a key, the pool is a new one that no live request has
    # reached yet; hotel, still refused, is carried over and checked with healthCheckCluster and
    # no known host: the cluster name goes in :authority, and this provider answers 404 to that.
    mock.set_keys({"keys": {A: {}, B: {}, C: {}}})
    v1 = pool(healthCheckCluster="mock_provider", disableDuration=3600000)
    v2 = {**v1, "apiTokens": v1["apiTokens"][:2]}
    port = free_port()
    bootstrap, swap = lds_bootstrap(tmp_path, mock.port, port, v1)
    envoy = envoy_factory.start(v1, raw_config=bootstrap)
    envoy.port = port
    take_out(envoy, mock, A)
    mock.always(A, {"status": 404})
    mock.clear()
    swap(v2)
    envoy.wait_log(r"pool hc: kept the state of 1 keys", timeout=10, plugin_only=True)
    envoy.wait_log(r'health check of key hotel got status 404, which says nothing about the key; no live request '
                   r'has shown the provider\'s host yet, so the check was sent with :authority "mock_provider" '
                   r'\(the cluster name\).*set failover.healthCheckAuthority', timeout=5, plugin_only=True)
    assert any(c["headers"]["host"] == "mock_provider" for c in checks(mock))
