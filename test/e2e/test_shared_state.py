"""Pool state is shared by every worker through proxy shared data."""

from __future__ import annotations

from collections import Counter

A, B, C = "sk-test-oscar-0001", "sk-test-papa-0002", "sk-test-quebec-0003"


def test_a_key_marked_down_on_one_worker_is_skipped_by_all_four(envoy_factory, mock):
    # Every request takes ~20 ms upstream, so 16 clients keep up to 16 requests in flight.
    mock.set_keys({"keys": {
        A: {"delayMs": 20, "always": {"status": 429, "delayMs": 20}},
        B: {"delayMs": 20},
        C: {"delayMs": 20},
    }})
    envoy = envoy_factory.start(
        {"apiTokens": [{"token": A, "name": "oscar"}, B, C], "failover": {"cooldownDuration": 600000}},
        concurrency=4,
    )
    statuses = envoy.parallel(lambda c, i: c.chat().status, 480, 16)
    got = Counter(mock.keys_received())
    assert sum(got.values()) == 480
    # Only requests already in flight when the first 429 came back may still have used oscar.
    assert 1 <= got[A] <= 16, got
    assert statuses.count(429) == got[A]
    assert statuses.count(200) == 480 - got[A]
    # Exactly one worker won the write that marked the key down.
    envoy.wait_log(r"key oscar marked down", plugin_only=True)
    assert envoy.plugin_log().count("key oscar marked down") == 1


def test_every_worker_sees_the_key_come_back(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"script": [{"status": 503}]}, B: {}}})
    envoy = envoy_factory.start(
        {"apiTokens": [{"token": A, "name": "oscar"}, B], "failover": {"cooldownDuration": 1000}}, concurrency=4
    )
    envoy.parallel(lambda c, i: c.chat(), 8, 4)
    envoy.wait_log(r"key oscar marked down", plugin_only=True)
    envoy.wait_log(r"key oscar time out over", timeout=4, plugin_only=True)
    mock.clear()
    envoy.parallel(lambda c, i: c.chat(), 80, 8)
    got = Counter(mock.keys_received())
    assert got[A] >= 25 and got[B] >= 25, got
    assert envoy.plugin_log().count("key oscar restored") == 1
