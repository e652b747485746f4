"""Failover end to end: real Envoy, the built plugin, the mock provider.

Each test asserts what the provider received (which key, how often) and what the client got."""

from __future__ import annotations

import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from checks import wait_downstream_resets, wait_pool_stats
from harness import send_until_status, wait_for

A, B, C = "sk-test-alpha-0001", "sk-test-bravo-0002", "sk-test-charlie-0003"


def keys_config(**overrides):
    cfg = {"apiTokens": [{"token": A, "name": "alpha"}, {"token": B, "name": "bravo"}]}
    cfg.update(overrides)
    return cfg


def send(envoy, n, **kw):
    with envoy.client() as c:
        return [c.chat(**kw).status for _ in range(n)]


def open_chat(envoy):
    """Sends a chat completion on a raw connection and returns the socket without reading the
    answer, so that the test can hang up while the request is in flight."""
    s = socket.create_connection(("127.0.0.1", envoy.port))
    body = b'{"model":"m","messages":[]}'
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(body), body))
    return s


def take_alpha_out_until_its_probe_is_due(envoy):
    """alpha's script starts with a 429; sends until it comes, then waits for the tick that ends
    the 1 s cooldown."""
    with envoy.client() as c:
        send_until_status(c.chat, 429)
    envoy.wait_log(r"key alpha time out over; the next request probes it", timeout=4, plugin_only=True)


def test_429_takes_the_key_out_and_traffic_moves_to_the_other(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 429, "headers": {"retry-after": "30"}}}, B: {}}})
    envoy = envoy_factory.start(keys_config())
    statuses = send(envoy, 10)
    got = Counter(mock.keys_received())
    assert got[A] == 1, "alpha answered 429 once and was never used again"
    assert got[B] == 9
    assert statuses.count(429) == 1 and statuses.count(200) == 9
    envoy.wait_log(r"key alpha marked down after status 429", plugin_only=True)


def test_200s_never_move_traffic(envoy_factory, mock):
    mock.set_keys({"keys": {A: {}, B: {}}})
    envoy = envoy_factory.start(keys_config())
    assert send(envoy, 10) == [200] * 10
    assert Counter(mock.keys_received()) == {A: 5, B: 5}
    assert "marked down" not in envoy.plugin_log()


def test_500_is_ignored_when_only_429_is_configured(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 500}}, B: {}}})
    envoy = envoy_factory.start(keys_config(failover={"failoverOnStatus": ["429"]}))
    statuses = send(envoy, 10)
    assert Counter(mock.keys_received()) == {A: 5, B: 5}
    assert statuses.count(500) == 5


def test_500_is_honoured_with_5xx_pattern(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 500}}, B: {}}})
    envoy = envoy_factory.start(keys_config(failover={"failoverOnStatus": ["429", "5.*"]}))
    send(envoy, 10)
    assert Counter(mock.keys_received()) == {A: 1, B: 9}


def test_key_returns_after_its_cooldown_and_not_before(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"script": [{"status": 429}]}, B: {}}})
    envoy = envoy_factory.start(keys_config(failover={"cooldownDuration": 2000}))
    with envoy.client() as c:
        r = send_until_status(c.chat, 429)
        # The mark-down happened while the 429 was on its way: after it was sent, before it came.
        answered_at = time.monotonic()
        sent_at = answered_at - r.elapsed
        mock.clear()
        # Requests sent until 1.7 s after the 429 was sent reach the plugin before its 2 s time
        # out ends (0.3 s of slack for the last one's trip).
        while time.monotonic() < sent_at + 1.7:
            assert c.chat().status == 200
            time.sleep(0.05)
        assert set(mock.keys_received()) == {B}, "alpha is cooling down"
        # 2 s plus up to 10% jitter: then the next request probes alpha, and its success
        # puts alpha back in the rotation. Waiting for a time is all there is: the probe is the
        # first request after it.
        time.sleep(max(0.0, answered_at + 2.3 - time.monotonic()))
        mock.clear()
        for _ in range(5):
            assert c.chat().status == 200
    received = mock.keys_received()
    assert received[0] == A, "the first request after the cooldown probes alpha"
    assert Counter(received)[A] >= 2, "alpha is back in the rotation"
    envoy.wait_log(r"key alpha restored", plugin_only=True)


def test_tick_ends_a_cooldown_with_no_traffic(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"script": [{"status": 429}]}, B: {}}})
    envoy = envoy_factory.start(keys_config(failover={"cooldownDuration": 1000}))
    take_alpha_out_until_its_probe_is_due(envoy)
    mock.clear()
    assert envoy.chat().status == 200
    assert mock.keys_received() == [A]
    envoy.wait_log(r"key alpha restored", plugin_only=True)


def test_threshold_two_needs_two_consecutive_failures(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 503}}, B: {}}})
    envoy = envoy_factory.start(keys_config(failover={"failureThreshold": 2}))
    send(envoy, 12)
    assert Counter(mock.keys_received()) == {A: 2, B: 10}
    envoy.wait_log(r"key alpha marked down after status 503", plugin_only=True)


def test_a_success_resets_the_failure_count(envoy_factory, mock):
    # alpha fails every other request: never two in a row, so never marked down.
    script = [{"status": 503}, {"status": 200}] * 3
    mock.set_keys({"keys": {A: {"script": script}, B: {}}})
    envoy = envoy_factory.start(keys_config(failover={"failureThreshold": 2}))
    send(envoy, 12)
    assert Counter(mock.keys_received()) == {A: 6, B: 6}
    assert "marked down" not in envoy.plugin_log()


def test_single_key_pool_keeps_serving_with_earliest(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"script": [{"status": 429}]}}})
    envoy = envoy_factory.start({"apiTokens": [{"token": A, "name": "alpha"}], "failover": {"cooldownDuration": 60000}})
    assert send(envoy, 3) == [429, 200, 200]
    assert mock.keys_received() == [A, A, A]
    # The 200 on a key used while down proves it works: it is restored at once.
    envoy.wait_log(r"key alpha restored", plugin_only=True)


def test_reject_answers_locally_with_retry_after(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {"always": {"status": 429}}}})
    envoy = envoy_factory.start(keys_config(onAllUnavailable="reject", failover={"cooldownDuration": 5000}))
    assert send(envoy, 2) == [429, 429]
    received = len(mock.requests())
    assert received == 2
    r = envoy.chat()
    assert r.status == 429
    assert 1 <= int(r.headers["retry-after"]) <= 6  # 5 s plus up to 10% jitter
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == "all_keys_unavailable" and err["type"] == "rate_limit_error"
    assert A not in r.text and B not in r.text
    assert len(mock.requests()) == received, "the upstream was not contacted"
    envoy.wait_log(r"all 2 keys are down", plugin_only=True)


def test_earliest_uses_the_key_that_returns_first(envoy_factory, mock):
    # bravo is told to wait 50 s, alpha 20 s: alpha returns first, whatever the order they failed in.
    mock.set_keys({"keys": {A: {"script": [{"status": 429, "headers": {"retry-after": "20"}}]},
                            B: {"always": {"status": 429, "headers": {"retry-after": "50"}}}}})
    envoy = envoy_factory.start(keys_config(failover={"cooldownDuration": 60000}))
    with envoy.client() as c:
        first = [c.chat().status for _ in range(2)]
        assert first == [429, 429]
        mock.clear()
        assert c.chat().status == 200
    assert mock.keys_received() == [A]
    envoy.wait_log(r"key alpha restored", plugin_only=True)


def test_envoy_local_replies_never_mark_keys(envoy_factory, mock):
    # alpha is too slow for the route timeout: Envoy answers 504 itself, not the provider.
    mock.set_keys({"keys": {A: {"delayMs": 1500}, B: {}}})
    routes = [{"name": "route-default", "prefix": "/", "route": {"cluster": "mock_provider", "timeout": "0.3s"}}]
    envoy = envoy_factory.start(keys_config(failover={"failoverOnStatus": ["5.*"]}), routes=routes)
    statuses = send(envoy, 6)
    assert statuses.count(504) == 3
    assert Counter(mock.keys_received()) == {A: 3, B: 3}
    assert "marked down" not in envoy.plugin_log()


def test_clients_cannot_empty_the_pool_with_bad_requests(envoy_factory, mock):
    for status in (400, 404, 413, 422):
        mock.set_keys({"keys": {A: {"always": {"status": status}}, B: {"always": {"status": status}}}})
        mock.clear()
        envoy = envoy_factory.start(keys_config(failover={"failoverOnStatus": ["4.*", "5.*"]}))
        assert send(envoy, 8) == [status] * 8
        assert Counter(mock.keys_received()) == {A: 4, B: 4}, status
        assert "marked down" not in envoy.plugin_log()
        envoy.wait_log(r"covers \[400, 404, 405, 413, 415, 422\]", plugin_only=True)
        envoy.stop()


def test_client_disconnect_does_not_mark_the_key(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"delayMs": 800}, B: {"delayMs": 800}}})
    envoy = envoy_factory.start(keys_config(failover={"failoverOnStatus": ["4.*", "5.*"]}))
    for i in range(4):
        s = open_chat(envoy)
        # Hang up while the provider holds the request (it answers after 800 ms).
        wait_for(lambda: len(mock.requests()) == i + 1, 5, what=f"request {i + 1} to reach the provider")
        s.close()
    # Judged once Envoy has ended the four streams the clients reset.
    wait_downstream_resets(envoy, 4)
    assert "marked down" not in envoy.plugin_log()
    assert send(envoy, 4) == [200] * 4


def test_a_probe_whose_client_disconnects_is_given_back_at_once(envoy_factory, mock):
    # alpha: 429, then a probe it holds for 3 s, then healthy answers.
    mock.set_keys({"keys": {A: {"script": [{"status": 429}, {"status": 200, "delayMs": 3000}]}, B: {}}})
    envoy = envoy_factory.start(keys_config(failover={"cooldownDuration": 1000}))
    take_alpha_out_until_its_probe_is_due(envoy)
    mock.clear()
    s = open_chat(envoy)
    wait_for(lambda: mock.keys_received() == [A], timeout=3, what="the probe to reach alpha")
    s.close()
    wait_downstream_resets(envoy, 1)
    mock.clear()
    # Had the probe not been given back, alpha would stay claimed for a minute and this would go
    # to bravo.
    assert send(envoy, 1) == [200]
    assert mock.keys_received() == [A], "the next request probes alpha again"
    envoy.wait_log(r"key alpha restored", plugin_only=True)


def test_a_request_sent_before_the_outage_that_fails_after_it_leaves_the_probe_alone(envoy_factory, mock):
    mock.set_keys({"keys": {A: {}, B: {}}})
    envoy = envoy_factory.start(keys_config(name="p", failover={"cooldownDuration": 1000}))
    # One worker rotates strictly: after a request on bravo, the next one goes to alpha.
    with envoy.client() as c:
        c.chat()
        if mock.keys_received()[-1] == A:
            c.chat()
    # alpha: a slow request sent before the outage, whose 503 comes after the time out ended and
    # while the probe is out; the 429 that takes alpha out; the probe, answered after 8 s.
    mock.script(A, [{"status": 503, "delayMs": 5000}, {"status": 429}, {"status": 200, "delayMs": 8000}])
    mock.clear()
    with ThreadPoolExecutor(2) as pool:
        def chat():
            with envoy.client(timeout=20) as c:
                return c.chat().status

        slow = pool.submit(chat)
        wait_for(lambda: mock.keys_received() == [A], timeout=3, what="the slow request to reach alpha")
        take_alpha_out_until_its_probe_is_due(envoy)
        probe = pool.submit(chat)
        wait_for(lambda: mock.keys_received().count(A) == 3, timeout=3, what="the probe to reach alpha")
        assert not slow.done(), "the slow 503 came before the probe; the test proves nothing"
        assert slow.result(timeout=10) == 503
        assert not probe.done(), "the probe answered before the stale failure; the test proves nothing"
        answered = max(r["seq"] for r in mock.requests())
        # Had the stale 503 counted as the probe's failure, alpha would be out for about 2 s
        # more and then probed again while the first probe is still out.
        deadline = time.monotonic() + 15
        with envoy.client() as c:
            while not probe.done():
                assert time.monotonic() < deadline, "the probe never answered"
                assert c.chat().status == 200
                time.sleep(0.05)
        assert probe.result() == 200
    names = {A: "alpha", B: "bravo"}
    later = [names.get(r["key"], "?") for r in mock.requests() if r["seq"] > answered]
    assert later and set(later) == {"bravo"}, f"only bravo serves while alpha's probe is out: {later}"
    s = wait_pool_stats(envoy, "p", lambda s: s.get("keys_restored") == 1, what="alpha restored by its probe")
    assert s["probes_failed"] == 0, "the stale 503 was not the probe's failure"
    assert s["key.alpha.key_marked_down"] == 1
    assert "time out 2 in a row" not in envoy.plugin_log()
