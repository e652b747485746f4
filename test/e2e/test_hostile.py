"""Hostile input and secrets.

- Requests with header values that are not UTF-8, very large headers, many headers, odd or
  missing `:authority`, and junk `key=` query parameters; upstream answers with absurd retry
  hints (huge, negative, NaN, year 9999, bytes that are not UTF-8). The plugin keeps serving, no
  Wasm VM fails, and a hint it cannot trust never parks a key for long.
- No local reply, response header or metric name holds a key or any 8-character piece of one;
  a client cannot take keys out with requests that fail for its own reasons; and a configuration
  whose key could inject a header (CR, LF, other control characters) is refused.
(Every test's debug-level Envoy log is scanned for the keys at teardown, see conftest.py.)
"""

from __future__ import annotations

import re
import socket
import struct

import pytest

from checks import (
    RawUpstream,
    assert_no_key_marked_down,
    assert_vm_healthy,
    downstream_resets,
    http_response,
    key_fragments_in,
    pool_stats,
    raw_exchange,
    wait_downstream_resets,
    wait_pool_stats,
    wasm_stats,
)
from harness import free_port, wait_for

G1, G2 = "sk-hostile-Gq3ZrT81mWxV", "sk-hostile-Hv7LpN52kQyB"          # the global pool
D1, D2 = "sk-hostile-Dm4XcJ96tRsE", "sk-hostile-Fw8BnK27pLzU"          # rule *.x.example
GEM = "sk-hostile-Gem5YhQ3vCxA"                                       # rule gemini.example
ALL = [G1, G2, D1, D2, GEM]


def hostile_config(**extra) -> dict:
    return {
        "name": "glob", "apiTokens": [{"token": G1, "name": "g1"}, G2], "exposeKeyName": True,
        "_rules_": [
            {"_match_domain_": ["*.x.example"], "name": "dom", "apiTokens": [D1, {"token": D2, "name": "d2"}]},
            {"_match_domain_": ["gemini.example"], "name": "gem", "provider": "gemini", "apiTokens": [GEM]},
        ],
        **extra,
    }


def status_of(reply: bytes) -> int:
    try:
        return int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def chat_request(headers: bytes = b"host: api.example\r\n", path: bytes = b"/v1/chat/completions",
                 version: bytes = b"HTTP/1.1") -> bytes:
    body = b'{"model":"m","messages":[]}'
    return (b"POST " + path + b" " + version + b"\r\n" + headers +
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


def h2_request_without_authority(port: int) -> bytes:
    """An HTTP/2 (prior knowledge) GET with :method, :scheme and :path but no :authority."""
    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
    path = b"/v1/models"
    block = b"\x82\x86\x04" + bytes([len(path)]) + path  # :method GET, :scheme http, :path literal
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(1, 5, 1, block))
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return data


HOSTILE_REQUESTS = [
    # (what, raw request, statuses Envoy or the upstream may answer)
    ("credentials that are not UTF-8", chat_request(
        b"host: api.example\r\nauthorization: Bearer \xff\xfe\xfd\r\nx-api-key: \x80\x81\r\napi-key: \xc3\x28\r\n"
        b"x-goog-api-key: \xed\xa0\x80\r\n"), (200,)),
    ("other headers that are not UTF-8", chat_request(
        b"host: api.example\r\nuser-agent: \xff\xfe\r\nx-request-id: \xfe\xff-\x80\r\nx-junk: \xc0\xaf\xe0\x80\xaf\r\n"
        b"content-encoding: \xf8\x88\x80\x80\x80\r\n"), (200,)),
    ("a domain rule's host in odd case with a bad port", chat_request(b"host: API.X.EXAMPLE:99999\r\n"), (200,)),
    ("a host that is an unclosed IPv6 bracket", chat_request(b"host: [::1\r\n"), (200, 400)),
    ("a host of dots", chat_request(b"host: ..x.example.\r\n"), (200, 400)),
    ("a host that is not UTF-8", chat_request(b"host: \xff\xfe.x.example\r\n"), (400,)),
    ("an empty host (no authority for the plugin)", chat_request(b"host:\r\n"), (200,)),
    ("HTTP/1.1 without host", chat_request(b"", version=b"HTTP/1.1"), (400,)),
    ("HTTP/1.0 without host", chat_request(b"", version=b"HTTP/1.0"), (400, 426)),
    ("a 59 KB header", chat_request(b"host: api.example\r\nx-big: " + b"b" * 59_000 + b"\r\n"), (200,)),
    ("a 70 KB header (over Envoy's 60 KiB)", chat_request(b"host: api.example\r\nx-big: " + b"b" * 70_000 + b"\r\n"),
     (431,)),
    ("a 60 KB authorization header", chat_request(b"host: api.example\r\nauthorization: Bearer " + b"z" * 59_000 +
                                                  b"\r\n"), (200,)),
    ("80 headers", chat_request(b"host: api.example\r\n" + b"".join(b"x-h%d: %d\r\n" % (i, i) for i in range(80))),
     (200,)),
    ("150 headers (over Envoy's 100)", chat_request(
        b"host: api.example\r\n" + b"".join(b"x-h%d: %d\r\n" % (i, i) for i in range(150))), (431,)),
    ("a 30 KB path", chat_request(path=b"/v1/chat/completions?q=" + b"p" * 30_000), (200,)),
    ("gemini with junk key= parameters", chat_request(
        b"host: gemini.example\r\n", path=b"/v1beta/models/x:generateContent?key=%ff%fe&key=&alt=sse&key=a%00b&key"),
     (200,)),
]


def test_hostile_requests_never_break_the_plugin(envoy_factory, mock):
    envoy = envoy_factory.start(hostile_config(), concurrency=2)
    baseline = wasm_stats(envoy)
    for what, raw, allowed in HOSTILE_REQUESTS:
        reply = raw_exchange(envoy.port, raw)
        assert status_of(reply) in allowed, (what, reply[:300])
        after = envoy.chat()
        assert after.status == 200 and "x-mock-request-id" in after.headers, (what, after)
    reply = h2_request_without_authority(envoy.port)
    assert b"x-mock-request-id" not in reply, "Envoy refuses an HTTP/2 request without :authority itself"
    assert envoy.chat().status == 200

    # Whatever reached the upstream carried a pool key, in the provider's header, and nothing of
    # the client's credentials; the gemini request lost every key= parameter.
    for r in mock.requests():
        assert r["key"] in ALL, r["headers"]
        if r["key"] == GEM:
            assert "key=" not in r["path"] and "alt=sse" in r["path"], r["path"]
            assert "authorization" not in r["headers"]
        else:
            assert r["headers"]["authorization"] == f"Bearer {r['key']}"
        for h in ("x-api-key", "api-key"):
            assert h not in r["headers"], (h, r["headers"])
    assert any(r["key"] in (D1, D2) for r in mock.requests()), "the domain rule matched despite case and port"
    assert_vm_healthy(envoy, baseline)
    s = pool_stats(envoy, "glob")
    assert s["keys_available"] == 2 and s["key.g1.key_marked_down"] == 0, s


# Absurd hints, one key each; the plugin must ignore every one and use its own cooldown.
ABSURD = {
    "huge": {"retry-after": "99999999999999999999"},
    "negative": {"retry-after": "-1"},
    "nan": {"retry-after": "NaN"},
    "float": {"retry-after": "1e400"},
    "year9999": {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"},
    "epoch": {"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"},
    "nonascii": {"retry-after": "\u00b5\u00ff\u2603"},
    "ms-overflow": {"retry-after-ms": "18446744073709551616"},
    "ms-negative": {"x-ms-retry-after-ms": "-0.5"},
    "go-huge": {"x-ratelimit-reset-requests": "9999999999999999h", "x-ratelimit-remaining-requests": "0"},
    "go-junk": {"x-ratelimit-reset-tokens": "1s1x", "x-ratelimit-remaining-tokens": "0"},
    "rfc3339-9999": {"anthropic-ratelimit-requests-reset": "9999-12-31T23:59:59Z",
                     "anthropic-ratelimit-requests-remaining": "0"},
    "rfc3339-junk": {"anthropic-ratelimit-tokens-reset": "2026-13-45T25:61:61+99:99"},
}
ABSURD_KEYS = {name: f"sk-absurd-{name}-Qz81Lw" for name in ABSURD}
# Bytes the mock cannot send (not UTF-8): from a raw upstream, on a route with its own pool.
RAW_429 = http_response(429, [
    (b"content-type", b"application/json"),
    (b"retry-after", b"\xff\xfe9\x80"),
    (b"retry-after-ms", b"\xc3\x28"),
    (b"x-ratelimit-remaining-requests", b"0"),
    (b"x-ratelimit-reset-requests", b"\xce\xbc\xce\xbc\xce\xbcs"),
    (b"anthropic-ratelimit-requests-reset", b"9999-99-99T99:99:99Z\xff"),
    (b"x-huge", b"h" * 20_000),
], b'{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"\xff\xfes"}]}}')
RAW_KEYS = ["sk-absurd-raw1-Qz81Lw", "sk-absurd-raw2-Qz81Lw"]


def test_absurd_retry_hints_from_the_upstream_are_ignored(envoy_factory, mock):
    raw = RawUpstream(lambda path: ("send", RAW_429))
    try:
        mock.set_keys({"keys": {**{k: {"script": [{"status": 429, "headers": ABSURD[n]}]}
                                   for n, k in ABSURD_KEYS.items()}, "sk-absurd-healthy-Qz81Lw": {}}})
        cfg = {"name": "absurd", "apiTokens": [{"token": k, "name": n} for n, k in ABSURD_KEYS.items()]
               + [{"token": "sk-absurd-healthy-Qz81Lw", "name": "healthy"}],
               "failover": {"cooldownDuration": 2000},
               "_rules_": [{"_match_route_": ["route-raw"], "name": "raw", "apiTokens": RAW_KEYS,
                            "failover": {"cooldownDuration": 2000}}]}
        routes = [{"name": "route-raw", "prefix": "/raw", "cluster": "raw"}, ("route-default", "/")]
        envoy = envoy_factory.start(cfg, routes=routes, extra_clusters={"raw": raw.port})
        baseline = wasm_stats(envoy)
        with envoy.client() as c:
            statuses = []
            # round robin may reach the healthy key last: go on until every key has answered once
            while (statuses.count(429) < len(ABSURD) or 200 not in statuses) and len(statuses) < 60:
                statuses.append(c.chat().status)
            raw_statuses = [c.chat(path="/raw/v1/chat/completions").status for _ in range(2)]
        assert statuses.count(429) == len(ABSURD) and set(statuses) == {200, 429}, statuses
        assert raw_statuses == [429, 429]
        log = envoy.plugin_log()
        backs = {m.group(1): float(m.group(2)) for m in
                 re.finditer(r"key (\S+) marked down after status 429 \(rate_limit\); back in ([\d.]+)s", log)}
        assert set(ABSURD) <= set(backs), (set(ABSURD) - set(backs), log[-3000:])
        assert len(backs) == len(ABSURD) + 2, backs  # and both raw keys
        for name, back in backs.items():
            # the computed cooldown (2 s + up to 10% jitter), never a hint clamped to the maximum
            assert 1.9 <= back <= 2.3, (name, back)
        assert envoy.chat().status == 200
        assert_vm_healthy(envoy, baseline)
    finally:
        raw.stop()


# --------------------------------------------------------------------------- secrets

S1, S2, S3 = "sk-secret-Px7RmQ2wLk9Vz", "sk-secret-Bn4TcY8uJh3Ds", "sk-secret-Wf6KeA1oGi5Nt"
SECRETS = [S1, S2, S3]


def every_metric_text(envoy) -> str:
    return "\n".join(envoy.admin(p).text for p in
                     ("/stats", "/stats?format=json", "/stats/prometheus", "/stats?usedonly", "/stats?format=text"))


def response_text(r) -> str:
    return f"{r.status} {r.reason}\n" + "\n".join(f"{k}: {v}" for k, v in r.header_list) + "\n\n" + r.text


def test_no_key_or_piece_of_one_in_replies_headers_or_metric_names(envoy_factory, mock):
    dead = free_port()
    routes = [{"name": "route-dead", "prefix": "/dead", "cluster": "dead"},
              {"name": "route-slow", "prefix": "/slow", "route": {"cluster": "mock_provider", "timeout": "0.1s"}},
              ("route-default", "/")]
    # alpha: 429, bravo: 503, charlie: 429; each answers after 300 ms (the /slow route gives up
    # after 100 ms). The first chat is retried on every key; then all are out, and the plugin
    # answers for itself.
    slow429 = {"status": 429, "headers": {"retry-after": "30"}}
    mock.set_keys({"keys": {S1: {"delayMs": 300, "always": slow429}, S2: {"delayMs": 300, "always": {"status": 503}},
                            S3: {"delayMs": 300, "always": slow429}}})
    cfg = {"name": "sec", "apiTokens": [S1, {"token": S2, "name": "named"}, S3], "exposeKeyName": True,
           "onAllUnavailable": "reject", "failover": {"cooldownDuration": 30000},
           "retryOnFailure": {"enabled": True, "maxRetries": 2}}
    envoy = envoy_factory.start(cfg, routes=routes, extra_clusters={"dead": dead})
    seen: list[str] = []
    with envoy.client() as c:
        seen.append(response_text(c.chat(path="/slow/v1/chat/completions")))  # Envoy's 504, retried or not
        seen.append(response_text(c.chat(path="/dead/v1/chat/completions")))  # Envoy's 503
        for _ in range(6):                                                    # retried answers, then rejects
            seen.append(response_text(c.chat()))
        seen.append(response_text(c.chat(headers={"authorization": "Bearer client-own-secret"})))
        seen.append(response_text(c.request("GET", "/v1/models")))
    statuses = [int(t.split(" ", 1)[0]) for t in seen]
    assert 504 in statuses and 503 in statuses and 429 in statuses, statuses
    rejects = [t for t in seen if "all_keys_unavailable" in t]
    assert rejects, "the plugin's own 429 was seen"
    assert any("x-ai-key-failover-key" in t for t in seen), "exposeKeyName header was seen"
    for text in seen:
        assert not key_fragments_in(text, SECRETS), text
    wait_pool_stats(envoy, "sec", lambda s: s.get("keys_available", 3) < 3, what="keys out")
    metrics = every_metric_text(envoy)
    assert "ai_key_failover" in metrics
    assert not key_fragments_in(metrics, SECRETS)


def test_a_client_cannot_take_keys_out_with_its_own_failures(envoy_factory, mock):
    """Answers that are the request's fault (with patterns that cover them), client credentials
    and disconnects, and requests Envoy refuses before the upstream: no key ever goes out."""
    k1, k2 = "sk-client-Rt5NmB7xQw2", "sk-client-Yu3LkP9zVc4"
    mock.set_keys({"keys": {k1: {}, k2: {}}})
    envoy = envoy_factory.start({"name": "cli", "apiTokens": [k1, k2], "failover": {"failoverOnStatus": ["4.*", "5.*"]}},
                                concurrency=4)
    for status in (400, 404, 405, 413, 415, 422):
        mock.set_keys({"keys": {k1: {"always": {"status": status}}, k2: {"always": {"status": status}}}})
        got = envoy.parallel(lambda c, i: c.chat(headers={"authorization": "Bearer sk-client-bogus",
                                                          "x-api-key": "sk-client-bogus"}).status, 40, 8)
        assert got == [status] * 40
    mock.set_keys({"keys": {k1: {"delayMs": 1000}, k2: {"delayMs": 1000}}})
    resets, reached = downstream_resets(envoy), len(mock.requests())
    for i in range(4):  # the client goes away before the answer
        s = socket.create_connection(("127.0.0.1", envoy.port))
        s.sendall(chat_request())
        wait_for(lambda: len(mock.requests()) == reached + i + 1, 5, what=f"request {i + 1} to reach the provider")
        s.close()
    wait_downstream_resets(envoy, resets + 4)
    for raw in (chat_request(b"host: a\r\nx-big: " + b"b" * 70_000 + b"\r\n"), chat_request(b"")):
        assert status_of(raw_exchange(envoy.port, raw)) in (400, 431)
    assert all(r["headers"].get("authorization", "").startswith("Bearer sk-client-") and
               "bogus" not in r["headers"].get("authorization", "") for r in mock.requests())
    assert "marked down" not in envoy.plugin_log()
    s = wait_pool_stats(envoy, "cli", lambda s: s.get("keys_available") == 2)
    assert_no_key_marked_down(s, 2)


INJECTING = [
    ("CRLF", "sk-inject-Aa1\r\nx-injected: 1"),
    ("LF", "sk-inject-Aa1\nx-injected: 1"),
    ("CR", "sk-inject-Aa1\rx"),
    ("TAB", "sk-inject-Aa1\tx"),
    ("NUL", "sk-inject-Aa1\u0000x"),
    ("DEL", "sk-inject-Aa1\u007fx"),
    ("ESC", "sk-inject-Aa1\u001b[2J"),
    ("NEL", "sk-inject-Aa1\u0085x"),
]


CASES = [(w, t, "string") for w, t in INJECTING] + [(w, t, where) for w, t in INJECTING[:1] + INJECTING[4:5]
                                                   for where in ("object", "rule")]


@pytest.mark.parametrize("what, token, where", CASES, ids=[f"{w}-{where}" for w, _, where in CASES])
def test_a_key_that_could_inject_a_header_is_refused(envoy_factory, mock, what, token, where):
    ok = "sk-inject-Bb2-good"
    if where == "string":
        cfg, field = {"apiTokens": [ok, token]}, "apiTokens[1]"
    elif where == "object":
        cfg, field = {"apiTokens": [{"token": token, "name": "bad"}]}, "apiTokens[0]"
    else:
        cfg, field = {"apiTokens": [ok], "_rules_": [{"_match_route_": ["r"], "apiTokens": [ok, token]}]}, \
            "_rules_[0].apiTokens[1]"
    log = envoy_factory.start_expect_failure(cfg)
    lines = [line for line in log.splitlines() if "invalid configuration" in line]
    assert lines, log[-2000:]
    assert f"invalid configuration: {field}: " in lines[0] and "control character" in lines[0], lines[0]
    assert not any("sk-inject-Aa1" in line for line in lines), "the refused key is not quoted"
    assert mock.requests() == []


def test_an_auth_header_prefix_that_could_inject_a_header_is_refused(envoy_factory, mock):
    for prefix in ("Bearer\r\nx-injected: 1 ", "Token\u007f"):
        log = envoy_factory.start_expect_failure({"apiTokens": ["sk-inject-Cc3-good"],
                                                  "authHeader": {"name": "x-key", "prefix": prefix}})
        assert "invalid configuration: authHeader.prefix: " in log, log[-2000:]


def test_no_client_pool_header_survives_on_requests_no_rule_keys(envoy_factory, mock, mock_factory):
    # With fallbacks configured, a route on the pool header exists; a client sends the header
    # twice, in odd case, once not UTF-8, on a host no rule covers (the request is not keyed).
    backup = mock_factory.start()
    for m in (mock, backup):
        m.set_keys({"requireKnownKey": False})
    cfg = {"_rules_": [{"_match_domain_": ["*.x.example"], "name": "dom", "apiTokens": [D1],
                        "fallbacks": [{"name": "fb", "apiTokens": [D2]}]}]}
    routes = [{"name": "pool-header", "match": {"prefix": "/", "headers": [
                  {"name": "x-ai-key-failover-pool", "present_match": True}]},
               "route": {"cluster": "backup_provider"}},
              {"name": "route-default", "prefix": "/"}]
    envoy = envoy_factory.start(cfg, routes=routes, extra_clusters={"backup_provider": backup.port})
    reply = raw_exchange(envoy.port, chat_request(
        b"host: api.example\r\nX-AI-Key-Failover-Pool: fb\r\nx-ai-key-failover-pool: \xff\xfe\r\n"))
    assert status_of(reply) == 200, reply[:200]
    assert backup.requests() == [], "the client's header picked no route"
    [q] = mock.requests()
    assert q["key"] is None and "x-ai-key-failover-pool" not in q["headers"]
