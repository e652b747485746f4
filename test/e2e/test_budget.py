"""failover.preemptiveCooldown: a success that says the key's budget is used up rests the key
until the provider's reset, so the provider never has to answer 429."""

from __future__ import annotations

import time

import pytest

from checks import wait_pool_stats

A, B, C = "sk-test-alfa-0001", "sk-test-bravo-0002", "sk-test-coca-0003"
KEYS = [{"token": A, "name": "alfa"}, {"token": B, "name": "bravo"}, {"token": C, "name": "coca"}]


@pytest.mark.parametrize("mode", ["downstream", "upstream"])
def test_a_key_that_reports_its_budget_spent_rests_and_the_provider_answers_no_429(envoy_factory, mock, mode):
    # alfa may serve 2 requests per 2 s window; the mock says what is left on every answer.
    mock.set_keys({"keys": {A: {"limit": 2, "windowMs": 2000}, B: {}, C: {}}})
    envoy = envoy_factory.start({"name": "p", "apiTokens": KEYS, "selection": "round_robin",
                                 "failover": {"preemptiveCooldown": True, "cooldownDuration": 60000}},
                                filter_mode=mode)
    statuses = []
    t0 = time.monotonic()
    with envoy.client() as c:
        # Over four windows at ~20 requests/s: alfa's round-robin share is far above its limit.
        while time.monotonic() - t0 < 7.0:
            statuses.append(c.chat().status)
            time.sleep(0.03)
    by_key = mock.stats()["by_key"]
    assert set(statuses) == {200}, f"the client saw {sorted(set(statuses))}"
    for key, name in ((A, "alfa"), (B, "bravo"), (C, "coca")):
        got = by_key.get(key, {}).get("status", {})
        assert set(got) <= {"200"}, f"{name} was answered {got}"
    served_by_alfa = by_key[A]["received"]
    # 2 per window over 7 s of 2 s windows: at least 3 windows' worth, so it came back each time.
    assert served_by_alfa >= 6, f"alfa served {served_by_alfa}; it should return after every reset"
    s = wait_pool_stats(envoy, "p", lambda s: s.get("class.budget_spent.keys_marked_down", 0) >= 2,
                        what="budget_spent outages counted")
    assert s["class.rate_limit.keys_marked_down"] == 0, s
    assert s["probes_failed"] == 0, s
    envoy.wait_log(r"key alfa reported its budget used up \(budget_spent\); rests, back in", plugin_only=True)
