"""Fallback chain: when a provider's keys are all out, the next pool (another provider and model)
serves; requests return to the primary when it recovers."""

from __future__ import annotations

import json
import time

P1, P2 = "sk-test-primary-0001", "sk-test-primary-0002"
B1 = "sk-test-backup-0001"

ROUTES = [
    {"name": "fallback-backup", "match": {"prefix": "/", "headers": [
        {"name": "x-ai-key-failover-pool", "string_match": {"exact": "backup"}}]},
     "route": {"cluster": "backup_provider", "timeout": "10s"}},
    {"name": "primary", "prefix": "/"},
]


def config(**extra):
    return {"name": "primary", "apiTokens": [{"token": P1, "name": "p1"}, {"token": P2, "name": "p2"}],
            "exposeKeyName": True, "failover": {"cooldownDuration": 60000},
            "fallbacks": [{"name": "backup", "apiTokens": [{"token": B1, "name": "b1"}], "model": "backup-model",
                           "cluster": "backup_provider"}],
            **extra}


def start(envoy_factory, mock, mock_factory, **extra):
    backup = mock_factory.start()
    backup.set_keys({"keys": {B1: {}}})
    envoy = envoy_factory.start(config(**extra), routes=ROUTES, extra_clusters={"backup_provider": backup.port})
    return envoy, backup


def test_all_primary_keys_rate_limited_means_the_fallback_serves_with_its_key_and_model(envoy_factory, mock, mock_factory):
    mock.set_keys({"keys": {P1: {"always": {"status": 429}}, P2: {"always": {"status": 429}}}})
    envoy, backup = start(envoy_factory, mock, mock_factory)
    with envoy.client() as c:
        first = [c.chat(model="gpt-4o").status for _ in range(2)]
        assert first == [429, 429], "each primary key fails once and goes out"
        rs = [c.chat(model="gpt-4o", headers={"authorization": "Bearer client-own"}) for _ in range(4)]
    assert [r.status for r in rs] == [200] * 4
    assert all(r.headers["x-ai-key-failover-pool"] == "backup" and r.headers["x-ai-key-failover-key"] == "b1" for r in rs)
    reqs = backup.requests()
    assert len(reqs) == 4
    for q in reqs:
        assert q["key"] == B1 and q["headers"]["authorization"] == f"Bearer {B1}"
        assert json.loads(q["body"])["model"] == "backup-model"
        assert json.loads(q["body"])["messages"][0]["content"] == "Hello!"
    assert len(mock.requests()) == 2, "the primary got nothing more"
    assert [json.loads(r.body)["model"] for r in rs] == ["backup-model"] * 4


def test_a_400_does_not_fall_back(envoy_factory, mock, mock_factory):
    mock.set_keys({"keys": {P1: {"always": {"status": 400}}, P2: {"always": {"status": 400}}}})
    envoy, backup = start(envoy_factory, mock, mock_factory, failover={"failoverOnStatus": ["4.*", "5.*"]})
    assert [envoy.chat().status for _ in range(6)] == [400] * 6
    assert backup.requests() == []


def test_traffic_returns_to_the_primary_when_it_recovers(envoy_factory, mock, mock_factory):
    mock.set_keys({"keys": {P1: {"script": [{"status": 429, "headers": {"retry-after": "1"}}]},
                            P2: {"script": [{"status": 429, "headers": {"retry-after": "1"}}]}}})
    envoy, backup = start(envoy_factory, mock, mock_factory)
    with envoy.client() as c:
        assert [c.chat().status for _ in range(2)] == [429, 429]
        assert c.chat().headers["x-ai-key-failover-pool"] == "backup"
        # Time is the condition: retry-after 1 puts both primary keys back 1 s after their 429s,
        # and the next request probes one. 0.3 s more than that, which load only lengthens.
        time.sleep(1.3)
        pools = [c.chat().headers["x-ai-key-failover-pool"] for _ in range(6)]
    assert pools == ["primary"] * 6
    envoy.wait_log(r"pool primary: key p\d restored", plugin_only=True)


def test_with_retry_on_failure_the_same_request_continues_on_the_fallback(envoy_factory, mock, mock_factory):
    mock.set_keys({"keys": {P1: {"always": {"status": 429}}, P2: {"always": {"status": 429}}}})
    envoy, backup = start(envoy_factory, mock, mock_factory, retryOnFailure={"enabled": True, "maxRetries": 2})
    r = envoy.chat(model="gpt-4o")
    assert r.status == 200, r.text
    assert r.json()["model"] == "backup-model"
    assert sorted(q["key"] for q in mock.requests()) == [P1, P2], "both primary keys were tried first"
    [q] = backup.requests()
    assert q["key"] == B1 and json.loads(q["body"])["model"] == "backup-model"


def test_a_client_cannot_steer_requests_to_a_pool_with_the_header(envoy_factory, mock, mock_factory):
    mock.set_keys({"keys": {P1: {}, P2: {}}})
    envoy, backup = start(envoy_factory, mock, mock_factory)
    r = envoy.chat(headers={"x-ai-key-failover-pool": "backup"})
    assert r.status == 200 and r.headers["x-ai-key-failover-pool"] == "primary"
    assert backup.requests() == []
    assert mock.keys_received()[0] in (P1, P2)


def test_when_the_whole_chain_is_down_on_all_unavailable_applies(envoy_factory, mock, mock_factory):
    mock.set_keys({"keys": {P1: {"always": {"status": 429}}, P2: {"always": {"status": 429}}}})
    envoy, backup = start(envoy_factory, mock, mock_factory, onAllUnavailable="reject")
    backup.set_keys({"keys": {B1: {"always": {"status": 503}}}})
    with envoy.client() as c:
        statuses = [c.chat().status for _ in range(3)]
        assert statuses == [429, 429, 503]
        r = c.chat()
    assert r.status == 429 and r.json()["error"]["code"] == "all_keys_unavailable"
    assert 1 <= int(r.headers["retry-after"]) <= 67
    envoy.wait_log(r"pool backup: key b1 marked down after status 503", plugin_only=True)


def test_a_client_cannot_steer_requests_no_rule_keys_with_the_header(envoy_factory, mock, mock_factory):
    # No global pool: only the chat route's rule keys requests. The client's header matches the
    # fallback's route first: on /v1/embeddings, which no rule covers, and on /v1/chat, whose rule
    # then sees that route's name instead of its own and does not key the request either.
    backup = mock_factory.start()
    for m in (mock, backup):
        m.set_keys({"requireKnownKey": False})
    rule = {k: v for k, v in config().items() if k != "exposeKeyName"}
    routes = [ROUTES[0], {"name": "chat", "prefix": "/v1/chat"}, {"name": "other", "prefix": "/"}]
    envoy = envoy_factory.start({"_rules_": [{"_match_route_": ["chat"], **rule}]}, routes=routes,
                                extra_clusters={"backup_provider": backup.port})
    steer = {"x-ai-key-failover-pool": "backup"}
    assert envoy.request("POST", "/v1/embeddings", headers=steer, body={"input": "x"}).status == 200
    assert envoy.chat(headers=steer).status == 200
    assert backup.requests() == [], "no client reached the fallback's route"
    reqs = sorted(mock.requests(), key=lambda q: q["seq"])
    assert [q["path"] for q in reqs] == ["/v1/embeddings", "/v1/chat/completions"]
    for q in reqs:
        assert "x-ai-key-failover-pool" not in q["headers"], q["path"]
    # Without the header, the chat rule keys its requests as usual.
    assert envoy.chat().status == 200
    assert mock.keys_received()[-1] in (P1, P2)
