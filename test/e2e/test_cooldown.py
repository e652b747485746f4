"""Smart cooldown end to end: provider retry hints, refusals, backoff, and half-open probes."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from harness import LOAD_SLACK_S, send_until_status, until

A, B = "sk-test-xray-0001", "sk-test-yankee-0002"
LONG = {"cooldownDuration": 60000}


def pool(**failover):
    return {"apiTokens": [{"token": A, "name": "xray"}, {"token": B, "name": "yankee"}],
            "failover": {**LONG, **failover}}


def until_429(client):
    """Sends until xray's 429; returns when that request was sent: no later than the mark-down it
    caused, so a time measured from it is never shorter than the time out."""
    r = send_until_status(client.chat, 429)
    return time.monotonic() - r.elapsed


def returns_after(envoy, mock, earliest: float, latest: float):
    """Polls with fresh requests until xray serves again; returns when (s since the 429 was sent)."""
    with envoy.client() as c:
        t0 = until_429(c)
        mock.clear()
        while time.monotonic() - t0 < latest + 1.5:
            c.chat()
            if A in mock.keys_received():
                back = time.monotonic() - t0
                assert earliest <= back <= latest, f"xray came back after {back:.2f}s"
                return back
            time.sleep(0.05)
    pytest.fail("xray never came back")


def rfc3339_in(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize("headers", [
    {"retry-after": "1"},
    {"retry-after-ms": "1000"},
    {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s",
     "x-ratelimit-remaining-tokens": "500", "x-ratelimit-reset-tokens": "6m0s"},
], ids=["retry-after", "retry-after-ms", "x-ratelimit-reset-requests"])
def test_openai_style_hints_bring_a_key_back_in_about_a_second(envoy_factory, mock, headers):
    mock.set_keys({"keys": {A: {"script": [{"status": 429, "headers": headers}]}, B: {}}})
    envoy = envoy_factory.start(pool())
    returns_after(envoy, mock, 0.9, 1.8)
    envoy.wait_log(r"key xray restored", plugin_only=True)


def test_anthropic_reset_time_brings_a_key_back(envoy_factory, mock):
    mock.set_keys({"keys": {A: {}, B: {}}})
    envoy = envoy_factory.start({**pool(), "provider": "anthropic"})
    mock.script(A, [{"status": 429, "headers": {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": rfc3339_in(1.5),
        "anthropic-ratelimit-tokens-remaining": "9000",
        "anthropic-ratelimit-tokens-reset": rfc3339_in(50),
    }}])
    returns_after(envoy, mock, 1.2, 2.5)


def test_gemini_retry_delay_in_the_error_body_brings_a_key_back(envoy_factory, mock):
    body = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]}}
    mock.set_keys({"keys": {A: {"script": [{"status": 429, "body": body}]}, B: {}}})
    envoy = envoy_factory.start({**pool(), "provider": "gemini"})
    returns_after(envoy, mock, 0.9, 1.8)


def test_hints_are_ignored_when_respect_retry_after_is_off(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"script": [{"status": 429, "headers": {"retry-after": "1"}}]}, B: {}}})
    envoy = envoy_factory.start(pool(respectRetryAfter=False, cooldownDuration=3000))
    returns_after(envoy, mock, 2.9, 3.9)


def test_absurd_hints_fall_back_to_the_computed_cooldown(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"script": [{"status": 429, "headers": {
        "retry-after": "99999999999999999999", "retry-after-ms": "-5", "x-ms-retry-after-ms": "NaN"}}]}, B: {}}})
    envoy = envoy_factory.start(pool(cooldownDuration=2000))
    returns_after(envoy, mock, 1.9, 2.9)


def stays_out_past_the_cooldown(envoy, mock, status: int) -> None:
    """Sends until xray answers `status`, then for 2.5 s (over twice the 1 s cooldown): every
    request succeeds, and only yankee is used."""
    with envoy.client() as c:
        send_until_status(c.chat, status)
        mock.clear()
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert c.chat().status == 200
            time.sleep(0.05)
    assert set(mock.keys_received()) == {B}


def test_a_401_keeps_a_key_out_past_the_cooldown(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"script": [{"status": 401}]}, B: {}}})
    envoy = envoy_factory.start(pool(cooldownDuration=1000))
    stays_out_past_the_cooldown(envoy, mock, 401)
    envoy.wait_log(r"key xray refused by the provider \(status 401, key_refused\); disabled, back in 3600\.0s",
                   plugin_only=True)


def test_insufficient_quota_keeps_a_key_out_past_the_cooldown(envoy_factory, mock):
    quota = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                       "param": None, "code": "insufficient_quota"}}
    mock.set_keys({"keys": {A: {"script": [{"status": 429, "body": quota, "headers": {"retry-after": "1"}}]}, B: {}}})
    envoy = envoy_factory.start(pool(cooldownDuration=1000, disableDuration=0))
    stays_out_past_the_cooldown(envoy, mock, 429)
    envoy.wait_log(r"key xray refused by the provider \(status 429, key_refused\); disabled, until a health check",
                   plugin_only=True)


def test_a_key_failing_repeatedly_stays_out_longer_each_time(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 503}}, B: {}}})
    envoy = envoy_factory.start(pool(cooldownDuration=1000, cooldownBackoff=2))

    def xray_times(c):
        c.chat()
        return [r["time_ms"] for r in mock.requests() if r["key"] == A]

    with envoy.client() as c:
        # Four uses of xray: the failure, then a probe after 1 s, 2 s and 4 s (each +10% jitter),
        # each reached at most one request's round trip after the time out ended.
        times = until(lambda: xray_times(c), lambda t: len(t) >= 4, timeout=7.7 + 4 * LOAD_SLACK_S,
                      what="xray's failure and three probes", interval=0.02)
    gaps = [(b - a) / 1000 for a, b in zip(times, times[1:])]
    assert len(gaps) >= 3, gaps
    # 1 s, 2 s, 4 s, each plus up to 10% jitter (and a request's round trip of slack).
    for got, base in zip(gaps, (1.0, 2.0, 4.0)):
        assert base <= got <= base * 1.1 + LOAD_SLACK_S, gaps
    envoy.wait_log(r"key xray marked down after status 503 \(server_error\); back in 4\.\ds, time out 3 in a row",
                   plugin_only=True)


def test_only_one_request_probes_a_key_under_load_on_four_workers(envoy_factory, mock):
    # xray answers slowly (400 ms), so any second request sent during its probe would show.
    mock.set_keys({"keys": {A: {"delayMs": 400, "script": [{"status": 429}]}, B: {"delayMs": 10}}})
    envoy = envoy_factory.start(pool(cooldownDuration=1000), concurrency=4)
    with envoy.client() as c:
        until_429(c)
    deadline = time.monotonic() + 3.0

    def until_deadline(c, i):
        # Keep every client busy until well past the cooldown and the probe.
        out = []
        while time.monotonic() < deadline:
            out.append(c.chat().status)
        return out

    statuses = [s for batch in envoy.parallel(until_deadline, 16, 16) for s in batch]
    assert len(statuses) > 200 and set(statuses) == {200}, Counter(statuses)
    times = sorted(r["time_ms"] for r in mock.requests() if r["key"] == A)
    assert len(times) >= 3, "xray was probed and then back in rotation"
    probe = times[1]  # times[0] is the 429
    during_probe = [t for t in times[1:] if t < probe + 400]
    assert len(during_probe) == 1, f"{len(during_probe)} requests used xray while it was being probed"
    envoy.wait_log(r"key xray restored", plugin_only=True)
    assert envoy.plugin_log().count("key xray restored") == 1
