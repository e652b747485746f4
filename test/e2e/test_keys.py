"""Which key goes on the request, in which header, and what the client's own credentials become."""

from __future__ import annotations

from collections import Counter

import pytest

from checks import raw_exchange

A, B, C = "sk-test-kilo-0001", "sk-test-lima-0002", "sk-test-mike-0003"
CLIENT_CREDS = {
    "authorization": "Bearer sk-client-own-key",
    "x-api-key": "client-x-api-key",
    "api-key": "client-azure-key",
    "x-goog-api-key": "client-goog-key",
}


@pytest.mark.parametrize(
    "provider, header, value",
    [
        ("openai", "authorization", f"Bearer {A}"),
        ("azure", "api-key", A),
        ("anthropic", "x-api-key", A),
        ("gemini", "x-goog-api-key", A),
    ],
)
def test_each_provider_gets_the_key_in_its_header_and_client_credentials_are_dropped(
    envoy_factory, mock, provider, header, value
):
    envoy = envoy_factory.start({"apiTokens": [A], "provider": provider})
    path = "/v1beta/models/gemini-pro:generateContent?key=client-query-key&alt=sse" if provider == "gemini" else "/v1/chat/completions"
    r = envoy.chat(headers=dict(CLIENT_CREDS), path=path)
    assert r.status == 200
    [req] = mock.requests()
    headers = req["headers"]
    assert headers[header] == value
    for name in CLIENT_CREDS:
        if name != header:
            assert name not in headers, f"client's {name} was forwarded"
    assert "client" not in str(headers), headers
    if provider == "gemini":
        assert req["path"] == "/v1beta/models/gemini-pro:generateContent?alt=sse"


def test_custom_auth_header_with_prefix(envoy_factory, mock):
    mock.set_keys({"requireKnownKey": False, "extraKeyHeaders": ["x-custom-auth"]})
    envoy = envoy_factory.start({"apiTokens": [A], "authHeader": {"name": "X-Custom-Auth", "prefix": "Token "}})
    r = envoy.chat(headers={**CLIENT_CREDS, "x-custom-auth": "Token client-custom"})
    assert r.status == 200
    [req] = mock.requests()
    assert req["headers"]["x-custom-auth"] == f"Token {A}"
    for name in CLIENT_CREDS:
        assert name not in req["headers"]


def test_requests_without_any_client_key_get_one(envoy_factory, mock):
    mock.set_keys({"keys": {A: {}}})
    envoy = envoy_factory.start({"apiTokens": [A]})
    r = envoy.chat()
    assert r.status == 200
    assert mock.keys_received() == [A]


def test_round_robin_is_even_on_one_worker(envoy_factory, mock):
    envoy = envoy_factory.start({"apiTokens": [A, B, C]})
    with envoy.client() as c:
        for _ in range(300):
            assert c.chat().status == 200
    assert Counter(mock.keys_received()) == {A: 100, B: 100, C: 100}
    order = mock.keys_received()
    assert all(order[i] != order[i + 1] for i in range(len(order) - 1)), "strict rotation"


def test_round_robin_is_even_across_workers(envoy_factory, mock):
    envoy = envoy_factory.start({"apiTokens": [A, B, C]}, concurrency=2)
    envoy.parallel(lambda c, i: c.chat(), 600, 6)
    counts = Counter(mock.keys_received())
    assert sum(counts.values()) == 600
    for key in (A, B, C):
        assert 170 <= counts[key] <= 230, counts


def test_weighted_selection_follows_weights(envoy_factory, mock):
    envoy = envoy_factory.start(
        {"apiTokens": [{"token": A, "weight": 1}, {"token": B, "weight": 3}], "selection": "weighted"}
    )
    with envoy.client() as c:
        for _ in range(400):
            c.chat()
    counts = Counter(mock.keys_received())
    assert 60 <= counts[A] <= 140 and counts[A] + counts[B] == 400, counts


def test_random_selection_uses_every_key(envoy_factory, mock):
    envoy = envoy_factory.start({"apiTokens": [A, B, C], "selection": "random"})
    with envoy.client() as c:
        for _ in range(150):
            c.chat()
    counts = Counter(mock.keys_received())
    assert all(counts[k] >= 25 for k in (A, B, C)), counts


def test_non_utf8_and_odd_headers_do_not_break_the_plugin(envoy_factory, mock):
    envoy = envoy_factory.start({"apiTokens": [A], "_rules_": [{"_match_domain_": ["*.x.example"], "apiTokens": [B]}]})
    body = b'{"model":"m","messages":[]}'
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.x.example\r\nauthorization: Bearer \xff\xfe\r\n"
        b"x-api-key: \x80\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    reply = raw_exchange(envoy.port, raw)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert mock.keys_received() == [B]
    assert envoy.chat().status == 200, "the VM is still alive"


@pytest.mark.parametrize("mode", ["downstream", "upstream"])
def test_repeated_and_mixed_case_client_credentials_are_all_dropped(envoy_factory, mock, mode):
    envoy = envoy_factory.start({"apiTokens": [A], "provider": "anthropic"}, filter_mode=mode)
    body = b'{"model":"m","messages":[]}'
    raw = (
        b"POST /v1/messages HTTP/1.1\r\nhost: api.example\r\nAuthorization: Bearer client-one\r\n"
        b"authorization: Bearer client-two\r\nAPI-KEY: client-three\r\nX-Goog-Api-Key: client-four\r\n"
        b"x-goog-api-key: client-five\r\nX-API-KEY: client-six\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    reply = raw_exchange(envoy.port, raw)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    [req] = mock.requests()
    assert req["headers"]["x-api-key"] == A
    assert "client" not in str(req["headers"]), req["headers"]
    for name in ("authorization", "api-key", "x-goog-api-key"):
        assert name not in req["headers"]


def test_no_configured_key_in_the_debug_log(envoy_factory, mock):
    """Failures, transitions and rejections all logged at debug level; no key anywhere in them."""
    from harness import scannable_log_text

    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {"script": [{"status": 503}]}, C: {}}})
    envoy = envoy_factory.start({"apiTokens": [A, B, C], "onAllUnavailable": "reject",
                                 "failover": {"cooldownDuration": 1000}})
    with envoy.client() as c:
        for _ in range(12):
            c.chat(headers={"authorization": "Bearer client-own-key"})
    envoy.wait_log(r"marked down after status 429", plugin_only=True)
    envoy.wait_log(r"time out over", timeout=4, plugin_only=True)
    for _ in range(3):  # probes the keys whose time out ended: bravo's succeeds
        envoy.chat()
    envoy.wait_log(r"restored", timeout=4, plugin_only=True)
    log = envoy.log()
    assert "[debug]" in log, "Envoy ran at debug level"
    text = scannable_log_text(log)
    for key in (A, B, C):
        assert key not in text
        assert key[-8:] not in text, "not even a fragment of the key"
