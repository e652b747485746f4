"""affinity.header: every request of a session gets the same key while that key is in rotation;
when it goes out only its sessions move, and weights spread sessions over the pool."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

A, B, C = "sk-test-alfa-0001", "sk-test-bravo-0002", "sk-test-coca-0003"
NAMES = {A: "alfa", B: "bravo", C: "coca"}
HEADER = "x-session-id"


def keys_by_session(mock):
    """session id -> the keys its requests reached the provider with, in order."""
    got = defaultdict(list)
    for r in sorted(mock.requests(), key=lambda r: r["seq"]):
        got[r["headers"].get(HEADER)].append(r["key"])
    return got


def send_sessions(envoy, sessions, rounds):
    with envoy.client() as c:
        for _ in range(rounds):
            for s in sessions:
                assert c.chat(headers={HEADER: s}).status == 200


@pytest.mark.parametrize("mode", ["downstream", "upstream"])
def test_each_session_keeps_one_key_and_only_the_spent_keys_sessions_move(envoy_factory, mock, mode):
    mock.set_keys({"keys": {A: {}, B: {}, C: {}}})
    envoy = envoy_factory.start(
        {"name": "p", "apiTokens": [{"token": k, "name": n} for k, n in NAMES.items()],
         "affinity": {"header": HEADER}, "failover": {"cooldownDuration": 60000}},
        filter_mode=mode)
    sessions = [f"conversation-{i}" for i in range(6)]
    send_sessions(envoy, sessions, 5)
    before = keys_by_session(mock)
    home = {}
    for s in sessions:
        assert len(before[s]) == 5 and len(set(before[s])) == 1, f"{s} used {before[s]}"
        home[s] = before[s][0]
    assert len(set(home.values())) >= 2, f"every session on one key: {home}"

    # The first session's key answers 429 once: it goes out, and that session moves.
    spent = home[sessions[0]]
    mock.script(spent, [{"status": 429}])
    with envoy.client() as c:
        assert c.chat(headers={HEADER: sessions[0]}).status == 429
    mock.clear()
    send_sessions(envoy, sessions, 5)
    after = keys_by_session(mock)
    for s in sessions:
        assert len(set(after[s])) == 1, f"{s} used {after[s]} after the 429"
        if home[s] == spent:
            assert after[s][0] != spent, f"{s} still sent to the key that is out"
        else:
            assert after[s][0] == home[s], f"{s} moved from {NAMES[home[s]]} though its key is in rotation"


def test_sessions_spread_over_the_keys_in_proportion_to_weights(envoy_factory, mock):
    mock.set_keys({"keys": {A: {}, B: {}, C: {}}})
    weights = {A: 1, B: 1, C: 4}
    envoy = envoy_factory.start(
        {"name": "p", "apiTokens": [{"token": k, "name": NAMES[k], "weight": w} for k, w in weights.items()],
         "affinity": {"header": HEADER}})
    sessions = [f"user-{i}" for i in range(600)]
    send_sessions(envoy, sessions, 1)
    share = Counter(keys_by_session(mock)[s][0] for s in sessions)
    for key, w in weights.items():
        expected = len(sessions) * w / sum(weights.values())
        assert abs(share[key] - expected) < expected * 0.35, f"{NAMES[key]}: {share[key]} sessions, expected ~{expected:.0f}"
    # The session value identifies a user: it never shows in the plugin's log or its stats.
    assert "user-1" not in envoy.plugin_log()
    assert not [k for k in envoy.stats("ai_key_failover") if "user-" in k]
