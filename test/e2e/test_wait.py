"""onAllUnavailable: "wait": a request that finds every key out is held until the first key
returns, then sent with it; past maxWaitMs it gets the reject answer."""

from __future__ import annotations

import socket
import time

import pytest

from checks import downstream_resets, wait_downstream_resets, wait_pool_stats
from harness import parallel

A, B = "sk-test-alfa-0001", "sk-test-bravo-0002"
KEYS = [{"token": A, "name": "alfa"}, {"token": B, "name": "bravo"}]


def take_both_out(envoy, mock, retry_after: str) -> float:
    """Both keys answer one 429 with `retry-after`: the pool is empty from the returned time."""
    for key in (A, B):
        mock.script(key, [{"status": 429, "headers": {"retry-after": retry_after}}])
    with envoy.client() as c:
        assert [c.chat().status for _ in range(2)] == [429, 429]
    out_at = time.monotonic()
    mock.clear()
    return out_at


@pytest.mark.parametrize("mode", ["downstream", "upstream"])
def test_requests_arriving_while_every_key_is_out_are_held_and_served_when_one_returns(envoy_factory, mock, mode):
    mock.set_keys({"keys": {A: {}, B: {}}})
    # Two workers: the requests are held on both (wasm: a queue each; native: one for both).
    envoy = envoy_factory.start({"name": "p", "apiTokens": KEYS, "onAllUnavailable": "wait", "maxWaitMs": 5000,
                                 "failover": {"cooldownDuration": 60000}}, filter_mode=mode, concurrency=2)
    out_at = take_both_out(envoy, mock, "1")
    results = parallel(lambda c, i: (c.chat(), time.monotonic()), 4, 4, connect=envoy.client)
    statuses = [r.status for r, _ in results]
    assert statuses == [200] * 4, statuses
    # Held, not failed: answered only once a key had returned, about 1 s after the outage began.
    waited = [done - out_at for _, done in results]
    assert min(waited) >= 0.8, f"answered {min(waited):.2f}s into a 1 s outage"
    got = mock.requests()
    assert len(got) == 4 and all(r["status"] == 200 for r in got)
    # The held request went on intact: its body reached the provider.
    assert all('"model": "gpt-4o-mini"' in r["body"] or '"model":"gpt-4o-mini"' in r["body"] for r in got)


@pytest.mark.parametrize("mode", ["downstream", "upstream"])
def test_a_wait_shorter_than_the_outage_ends_in_the_reject_answer(envoy_factory, mock, mode):
    mock.set_keys({"keys": {A: {}, B: {}}})
    envoy = envoy_factory.start({"name": "p", "apiTokens": KEYS, "onAllUnavailable": "wait", "maxWaitMs": 400,
                                 "failover": {"cooldownDuration": 60000}}, filter_mode=mode)
    take_both_out(envoy, mock, "3")
    with envoy.client() as c:
        t0 = time.monotonic()
        r = c.chat()
        waited = time.monotonic() - t0
    assert r.status == 429
    assert r.json()["error"]["code"] == "all_keys_unavailable"
    assert 1 <= int(r.headers["retry-after"]) <= 4
    assert waited >= 0.35, f"rejected after {waited:.2f}s, before maxWaitMs"
    assert mock.requests() == [], "the upstream is not contacted"
    wait_pool_stats(envoy, "p", lambda s: s.get("requests_rejected") == 1, what="one rejection counted")


@pytest.mark.parametrize("mode", ["downstream", "upstream"])
def test_a_client_that_hangs_up_while_held_is_forgotten(envoy_factory, mock, mode):
    # One key: had the gone request kept its place, it would take the key's only probe when the
    # key returns, and the client behind it would wait out maxWaitMs for nothing.
    mock.set_keys({"keys": {A: {"script": [{"status": 429, "headers": {"retry-after": "1"}}]}}})
    envoy = envoy_factory.start({"name": "p", "apiTokens": KEYS[:1], "onAllUnavailable": "wait",
                                 "maxWaitMs": 5000, "failover": {"cooldownDuration": 60000}},
                                filter_mode=mode)
    with envoy.client() as c:
        assert c.chat().status == 429
    mock.clear()
    body = b'{"model": "hung-up", "messages": []}'
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
           b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    resets = downstream_resets(envoy)
    with socket.create_connection(("127.0.0.1", envoy.port)) as s:
        s.sendall(raw)
        time.sleep(0.2)  # nothing shows that a request is held: give it time to reach the plugin
    # Envoy has ended the gone request's stream before the next request comes (and counted the
    # reset: it was in flight, held, when its client hung up).
    wait_downstream_resets(envoy, resets + 1)
    with envoy.client() as c:
        t0 = time.monotonic()
        r = c.chat(timeout=10)
        waited = time.monotonic() - t0
    assert r.status == 200, f"{r.status} after {waited:.2f}s: the gone request took the key's probe"
    assert waited < 3, f"served after {waited:.2f}s; the key was back after about 1 s"
    assert [r for r in mock.requests() if "hung-up" in r["body"]] == [], "a gone client's request was sent"
