"""A new plugin config (an LDS update) keeps what the pool learned."""

from __future__ import annotations

from collections import Counter

from checks import BackgroundChats, lds_bootstrap
from harness import free_port, send_until_status, until, wait_for

A, B, C = "sk-test-uniform-0001", "sk-test-victor-0002", "sk-test-whiskey-0003"


def test_reload_keeps_cooling_keys_out_adds_new_keys_and_applies_new_settings(envoy_factory, mock, tmp_path):
    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {}, C: {}}})
    v1 = {"name": "main", "apiTokens": [{"token": A, "name": "uniform"}, {"token": B, "name": "victor"}],
          "failover": {"cooldownDuration": 600000}}
    v2 = {"name": "main", "apiTokens": [{"token": A, "name": "uniform"}, {"token": B, "name": "victor"},
                                        {"token": C, "name": "whiskey"}],
          "exposeKeyName": True, "failover": {"cooldownDuration": 600000, "failureThreshold": 2}}
    port = free_port()
    bootstrap, swap = lds_bootstrap(tmp_path, mock.port, port, v1)
    envoy = envoy_factory.start(v2, raw_config=bootstrap, concurrency=2)  # v2 lists every key for the secret scan
    envoy.port = port

    with envoy.client() as c:
        send_until_status(c.chat, 429)
    envoy.wait_log(r"key uniform marked down", plugin_only=True)

    # Traffic keeps flowing through the swap.
    with BackgroundChats(envoy, threads=4, keep_alive=False) as load:
        until(lambda: len(load.results), lambda n: n >= 20, 10, what="traffic before the swap")
        mock.clear()
        swap(v2)
        wait_for(lambda: "x-ai-key-failover-key" in envoy.chat().headers, 10, what="the new config to serve")
        n = len(load.results)
        until(lambda: len(load.results), lambda m: m >= n + 20, 10, what="traffic after the swap")
    statuses = [status for status, _ in load.results]
    assert not load.errors, load.errors[:5]

    assert statuses and set(statuses) == {200}, Counter(statuses)
    with envoy.client() as c:
        for _ in range(4):
            c.chat()
    got = Counter(mock.keys_received())
    assert got[A] == 0, "the cooling key stayed out through the reload"
    assert got[C] >= 2, ("the new key is used", got)
    envoy.wait_log(r"pool main: kept the state of 1 keys", plugin_only=True)

    # The new threshold applies from now on: victor now needs two failures in a row.
    mock.always(B, {"status": 503})
    mock.clear()
    with envoy.client() as c:
        for _ in range(10):
            c.chat()
    got = Counter(mock.keys_received())
    assert got[B] == 2 and got[A] == 0 and got[C] == 8, got
