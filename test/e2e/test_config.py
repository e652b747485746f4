"""Bad configuration is refused at load: Envoy does not start, and the log names the field."""

from __future__ import annotations

import json
from collections import Counter

import pytest

K = "sk-test-config-0001"

# Each kind of refusal once, to prove that Envoy refuses the config and logs the plugin's error:
# not JSON, an unknown field, a field-level check, and a key that must not be quoted. Every other
# refusal and its message is a unit test (`every_invalid_config_is_refused_naming_the_field` in
# src/core/config/parse.rs), which needs no Envoy.
INVALID = [
    ("not json {", "", "not valid JSON"),
    ({"apiTokens": [K], "cooldown": 5}, "cooldown", "unknown field"),
    ({"apiTokens": [K], "failover": {"failoverOnStatus": ["5*"]}}, "failover.failoverOnStatus[0]", "not a status pattern"),
    ({"apiTokens": [K, K]}, "apiTokens[1]", "same key as apiTokens[0]"),
]


@pytest.mark.parametrize("config, field, message", INVALID, ids=[f"{i}-{f or 'json'}" for i, (_, f, _) in enumerate(INVALID)])
def test_invalid_config_is_refused_naming_the_field(envoy_factory, mock, config, field, message):
    log = envoy_factory.start_expect_failure(config)
    prefix = f"invalid configuration: {field}: " if field else "invalid configuration: "
    lines = [line for line in log.splitlines() if "invalid configuration" in line]
    assert lines, log[-3000:]
    assert prefix in lines[0] and message in lines[0], lines[0]
    assert K not in "\n".join(lines), "the error line must not quote the key"
    assert mock.requests() == []


def test_valid_config_with_higress_private_keys_loads(envoy_factory, mock):
    cfg = {"apiTokens": [K], "_comment_": "Higress adds keys like this", "failover": {"_note_": 1}}
    envoy = envoy_factory.start(json.dumps(cfg))
    assert envoy.chat().status == 200


ALPHA, BRAVO = "sk-test-config-alpha-01", "sk-test-config-bravo-02"
# The documented default of retryOnFailure.maxBodyBytes (README): 256 KiB.
DEFAULT_MAX_BODY = 256 * 1024


def chat_of_size(size: int) -> dict:
    """A chat body of about `size` bytes as JSON."""
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * size}]}


def test_requests_above_the_default_body_limit_are_served_but_not_resent(envoy_factory, mock):
    # alpha always fails and is never taken out (threshold), so round robin keeps sending
    # requests to it and only retryOnFailure can save those.
    mock.set_keys({"keys": {ALPHA: {"always": {"status": 503}}, BRAVO: {}}})
    cfg = {"apiTokens": [{"token": ALPHA, "name": "alpha"}, {"token": BRAVO, "name": "bravo"}],
           "failover": {"failureThreshold": 1000}, "retryOnFailure": {"enabled": True}}
    envoy = envoy_factory.start(cfg)

    with envoy.client() as c:
        small = [c.chat(body=chat_of_size(1024)).status for _ in range(2)]
    names = {ALPHA: "alpha", BRAVO: "bravo"}
    got = Counter(names.get(k) for k in mock.keys_received())
    assert small == [200, 200], "a small body is kept, and alpha's 503 re-sent with bravo"
    assert got["alpha"] >= 1 and got["bravo"] == 2, got

    big = chat_of_size(DEFAULT_MAX_BODY + 40 * 1024)
    statuses = []
    with envoy.client() as c:
        for _ in range(4):
            mock.clear()
            statuses.append(c.chat(body=big).status)
            sent = mock.requests()
            # Served whole, once: the body was not kept, so alpha's 503 reaches the client.
            assert len(sent) == 1, f"re-sent: {[names.get(r['key']) for r in sent]}"
            assert json.loads(sent[0]["body"]) == big, "the upstream got the whole body"
            assert statuses[-1] == (503 if sent[0]["key"] == ALPHA else 200), statuses
            if sent[0]["key"] == ALPHA:
                break
    assert 503 in statuses, f"round robin never reached alpha: {statuses}"
