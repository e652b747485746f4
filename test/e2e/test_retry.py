"""Transparent retry with another key: upstream mode (Envoy's retries) and downstream
`retryOnFailure` (the plugin's own)."""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest

from harness import STATS_PREFIX, wait_for
from test_failover import open_chat

A, B, C = "sk-test-alfa-0001", "sk-test-bravo-0002", "sk-test-coca-0003"
KEYS = [{"token": A, "name": "alfa"}, {"token": B, "name": "bravo"}, {"token": C, "name": "coca"}]
PREFIX = f"{STATS_PREFIX}ai_key_failover.pool.p."


def retry_route(codes=(429, 500, 503), retries=2, timeout="10s", per_try=None):
    policy = {"retry_on": "retriable-status-codes", "retriable_status_codes": list(codes),
              "num_retries": retries, "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.01s"}}
    if per_try:
        policy["per_try_timeout"] = per_try
    return [{"name": "route-default", "prefix": "/",
             "route": {"cluster": "mock_provider", "timeout": timeout, "retry_policy": policy}}]


def keys_by_request(mock):
    """The keys each client request's attempts used, in order, grouped by x-request-id."""
    grouped = defaultdict(list)
    for r in sorted(mock.requests(), key=lambda r: r["seq"]):
        grouped[r["headers"].get("x-request-id")].append(r["key"])
    return grouped


def stats_when(envoy, pred, what):
    def check():
        s = envoy.stats("ai_key_failover")
        return s if pred(s) else None

    return wait_for(check, 3, what=what)


@pytest.fixture(params=["upstream", "downstream"])
def mode(request):
    return request.param


def start(envoy_factory, mode, *, threshold=5, retries=2, codes=(429, 500, 503), extra=None, **kw):
    cfg = {"name": "p", "apiTokens": KEYS, "failover": {"failureThreshold": threshold, "cooldownDuration": 60000},
           **(extra or {})}
    if mode == "upstream":
        return envoy_factory.start(cfg, filter_mode="upstream", routes=retry_route(codes, retries), **kw)
    cfg["retryOnFailure"] = {"enabled": True, "maxRetries": retries, "retryOnStatus": [str(c) for c in codes]}
    return envoy_factory.start(cfg, **kw)


def test_two_of_three_keys_failing_still_serves_every_request(envoy_factory, mock, mode):
    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {"always": {"status": 503}}, C: {}}})
    envoy = start(envoy_factory, mode, concurrency=2)
    statuses = [envoy.chat().status for _ in range(20)]
    assert statuses == [200] * 20
    by_request = keys_by_request(mock)
    assert len(by_request) == 20, by_request
    for request_id, keys in by_request.items():
        assert len(keys) == len(set(keys)), f"a retry reused a failed key: {keys}"
        assert keys[-1] == C
    # The threshold (5) takes alfa and bravo out after enough failures, across attempts.
    envoy.wait_log(r"key alfa marked down after status 429", plugin_only=True)
    envoy.wait_log(r"key bravo marked down after status 503", plugin_only=True)
    s = stats_when(envoy, lambda s: s.get(PREFIX + "retries", 0) > 0 and
                   s.get(PREFIX + "retries") == s.get(PREFIX + "retries_succeeded", 0) + s.get(PREFIX + "retries_failed", 0),
                   "retry counters")
    assert s[PREFIX + "retries_succeeded"] >= 1


def test_a_retry_never_reuses_a_key_that_failed_for_the_request(envoy_factory, mock, mode):
    # Every key fails; the threshold keeps all of them in the pool; three attempts use three keys.
    # Random selection: without the per-request memory, attempts would often repeat a key.
    mock.set_keys({"keys": {A: {"always": {"status": 503}}, B: {"always": {"status": 503}}, C: {"always": {"status": 503}}}})
    envoy = start(envoy_factory, mode, threshold=100, extra={"selection": "random"})
    for _ in range(6):
        assert envoy.chat().status == 503
    by_request = keys_by_request(mock)
    assert len(by_request) == 6, "every 503 is the provider's, not Envoy's"
    for keys in by_request.values():
        assert len(keys) == 3 and len(set(keys)) == 3, keys


def test_a_flood_of_bad_requests_does_not_stop_upstream_retries_avoiding_failed_keys(envoy_factory, mock):
    # One worker, so one per-worker memory sees the whole flood. 12,000 requests answered 400 are
    # more than that memory holds: were 400s remembered (or new requests refused when full), the
    # retries after the flood would pick keys at random again, and a request's attempts would
    # repeat alfa or bravo.
    mock.set_keys({"keys": {k: {"always": {"status": 400}} for k in (A, B, C)}})
    cfg = {"name": "p", "apiTokens": KEYS, "selection": "random", "failover": {"failureThreshold": 1000}}
    envoy = envoy_factory.start(cfg, filter_mode="upstream", routes=retry_route((429, 500, 503), 2))
    t0 = time.monotonic()
    flood = envoy.parallel(lambda c, i: c.chat().status, 12_000, 4)
    took = time.monotonic() - t0
    print(f"12,000 requests answered 400 in {took:.1f} s")
    assert Counter(flood) == {400: 12_000}
    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {"always": {"status": 429}}, C: {}}})
    mock.clear()
    # Each request meets alfa or bravo first two times in three; with random picks and no
    # memory, about one in three would repeat a key, so 30 clean requests cannot be luck.
    with envoy.client() as c:
        statuses = [c.chat().status for _ in range(30)]
    assert statuses == [200] * 30
    by_request = keys_by_request(mock)
    assert len(by_request) == 30
    for keys in by_request.values():
        assert len(keys) == len(set(keys)) and keys[-1] == C, f"a retry reused a failed key: {keys}"


def test_failures_seen_on_retries_mark_keys_down(envoy_factory, mock, mode):
    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {"always": {"status": 429}}, C: {}}})
    envoy = start(envoy_factory, mode, threshold=1)
    for _ in range(4):
        assert envoy.chat().status == 200
    envoy.wait_log(r"key alfa marked down after status 429", plugin_only=True)
    envoy.wait_log(r"key bravo marked down after status 429", plugin_only=True)
    mock.clear()
    for _ in range(3):
        assert envoy.chat().status == 200
    assert mock.keys_received() == [C, C, C], "no more attempts spent on keys that are down"


def test_a_400_is_never_retried(envoy_factory, mock, mode):
    mock.set_keys({"keys": {A: {"always": {"status": 400}}, B: {"always": {"status": 400}}, C: {"always": {"status": 400}}}})
    # Downstream, even a pattern that covers 400 does not retry it; upstream, Envoy's retry
    # policy (429 and 5xx, as in examples/envoy-upstream-retry.yaml) decides.
    envoy = start(envoy_factory, mode, codes=(429, 503) if mode == "upstream" else ("4xx", "5xx"))
    assert [envoy.chat().status for _ in range(3)] == [400] * 3
    assert len(mock.requests()) == 3


def test_sse_through_a_retry_arrives_whole(envoy_factory, mock, mode):
    mock.set_keys({"streamChunkDelayMs": 20, "keys": {A: {"always": {"status": 429}}, B: {"always": {"status": 429}}, C: {}}})
    envoy = start(envoy_factory, mode)
    for _ in range(3):
        r = envoy.chat(stream=True)
        assert r.status == 200
        events = r.sse_events()
        assert events[-1] == "[DONE]" and len(events) == 4, events
        assert r.headers["content-type"].startswith("text/event-stream")


def test_max_retries_is_respected_and_the_last_failure_is_returned(envoy_factory, mock, mode):
    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {"always": {"status": 503}}, C: {"always": {"status": 503}}}})
    envoy = start(envoy_factory, mode, retries=1, threshold=100)
    for _ in range(4):
        r = envoy.chat()
        assert r.status in (429, 503)
    by_request = keys_by_request(mock)
    assert len(by_request) == 4, "every answer is the provider's, not Envoy's"
    for keys in by_request.values():
        assert len(keys) == 2, keys
    # The client got the answer of its last attempt.
    last = [r for r in sorted(mock.requests(), key=lambda r: r["seq"])][-1]
    assert r.status == last["status"]


def test_retry_timeout_is_respected(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {"delayMs": 3000}, C: {"delayMs": 3000}}})
    cfg = {"name": "p", "apiTokens": KEYS, "failover": {"failureThreshold": 100},
           "retryOnFailure": {"enabled": True, "maxRetries": 1, "retryTimeout": 300}}
    envoy = envoy_factory.start(cfg)
    with envoy.client() as c:
        for _ in range(3):
            t0 = time.monotonic()
            r = c.chat()
            took = time.monotonic() - t0
            if r.status == 504:
                assert took < 1.5, took
                assert r.text == "upstream request timeout", "Envoy's own timeout reply"
                # A timeout is Envoy's answer, not the key's: bravo/coca stay in the pool.
                assert "marked down" not in envoy.plugin_log()
                return
    pytest.fail("no request met alfa first")


def test_bodies_over_max_body_bytes_are_not_retried(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {"always": {"status": 429}}, C: {"always": {"status": 429}}}})
    cfg = {"name": "p", "apiTokens": KEYS, "failover": {"failureThreshold": 100},
           "retryOnFailure": {"enabled": True, "maxRetries": 2, "maxBodyBytes": 1000}}
    envoy = envoy_factory.start(cfg)
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
    assert envoy.chat(body=big).status == 429
    assert len(mock.requests()) == 1
    mock.clear()
    assert envoy.chat().status == 429
    assert len(mock.requests()) == 3, "a small body is retried with the other keys"


def test_a_probe_claimed_by_a_re_send_is_given_back_when_the_client_hangs_up(envoy_factory, mock):
    # alfa and bravo each fail once (503, not retried) and wait out a 2 s cooldown. The next
    # request probes alfa, which answers 429; the re-send probes bravo, which takes 3 s, and the
    # client hangs up meanwhile. Bravo's probe must be free at once, not held for a minute.
    mock.set_keys({"keys": {A: {"script": [{"status": 503}, {"status": 429, "headers": {"retry-after": "30"}}]},
                            B: {"script": [{"status": 503}, {"status": 200, "delayMs": 3000}]},
                            C: {}}})
    cfg = {"name": "p", "apiTokens": KEYS, "failover": {"failureThreshold": 1, "cooldownDuration": 2000},
           "retryOnFailure": {"enabled": True, "maxRetries": 2, "retryOnStatus": ["429"]}}
    envoy = envoy_factory.start(cfg)
    with envoy.client() as c:
        statuses = []
        while statuses.count(503) < 2:
            assert len(statuses) < 20, f"alfa and bravo should each have failed once: {statuses}"
            statuses.append(c.chat().status)
    for name in ("alfa", "bravo"):
        envoy.wait_log(rf"key {name} time out over; the next request probes it", timeout=5, plugin_only=True)
    mock.clear()
    s = open_chat(envoy)
    wait_for(lambda: mock.keys_received() == [A, B], timeout=5, what="the probe of alfa, then the re-send's of bravo")
    s.close()
    envoy.wait_log(r"probe of key bravo gave no answer; released", timeout=5, plugin_only=True)
    mock.clear()
    # Had the probe stayed claimed, this would go to coca.
    assert envoy.chat().status == 200
    assert mock.keys_received() == [B], "the next request probes bravo"
    envoy.wait_log(r"key bravo restored", plugin_only=True)


def test_downstream_retry_forwards_the_request_faithfully_without_client_credentials(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {"always": {"status": 429}}, C: {}}})
    cfg = {"name": "p", "apiTokens": KEYS, "exposeKeyName": True, "failover": {"failureThreshold": 100},
           "retryOnFailure": {"enabled": True, "maxRetries": 2}}
    envoy = envoy_factory.start(cfg)
    body = {"model": "gpt-x", "messages": [{"role": "user", "content": "hello"}]}
    r = envoy.chat(body=body, path="/v1/chat/completions?trace=1",
                   headers={"authorization": "Bearer sk-client-own", "x-api-key": "client", "x-custom": "kept"})
    assert r.status == 200 and r.headers["x-ai-key-failover-key"] == "coca"
    assert r.json()["model"] == "gpt-x"
    reqs = sorted(mock.requests(), key=lambda q: q["seq"])
    for q in reqs:
        assert q["method"] == "POST" and q["path"] == "/v1/chat/completions?trace=1"
        assert q["headers"]["x-custom"] == "kept"
        assert "x-api-key" not in q["headers"] and "client" not in q["headers"]["authorization"]
        assert '"content": "hello"' in q["body"] or '"content":"hello"' in q["body"]
    assert len({q["headers"]["authorization"] for q in reqs}) == len(reqs)
