"""Higress `_rules_`: per-route, per-domain and per-service pools, first match wins."""

from __future__ import annotations

from collections import Counter

G1, G2 = "sk-test-global-0001", "sk-test-global-0002"
E1 = "sk-test-embed-0001"
T1 = "sk-test-teama-0001"
S1 = "sk-test-svc-0001"
P1 = "sk-test-prefix-0001"

CONFIG = {
    "apiTokens": [G1, G2],
    "failover": {"cooldownDuration": 60000},
    "_rules_": [
        {"_match_domain_": ["*.team-a.example"], "apiTokens": [T1], "provider": "azure"},
        {"_match_route_": ["route-embeddings"], "apiTokens": [E1]},
        {"_match_route_prefix_": ["route-cha"], "apiTokens": [P1], "failover": {"failoverOnStatus": ["429"]}},
    ],
}


def test_route_domain_and_prefix_rules_pick_their_pools(envoy_factory, mock):
    envoy = envoy_factory.start(CONFIG)
    assert envoy.chat(path="/v1/embeddings").status == 200
    assert envoy.chat(path="/v1/chat/completions").status == 200
    assert envoy.chat(path="/v1/models").status == 200
    assert envoy.chat(path="/v1/models").status == 200
    # The domain rule comes first, so it wins over the route rules.
    assert envoy.chat(path="/v1/embeddings", headers={"host": "api.team-a.example:8443"}).status == 200
    reqs = mock.requests()
    assert [r["key"] for r in reqs[:4]] == [E1, P1, reqs[2]["key"], reqs[3]["key"]]
    assert {reqs[2]["key"], reqs[3]["key"]} == {G1, G2}, "unmatched requests use the global pool"
    assert reqs[4]["headers"]["api-key"] == T1 and "authorization" not in reqs[4]["headers"]


def test_rule_pools_have_their_own_state_and_settings(envoy_factory, mock):
    mock.set_keys({"keys": {E1: {"always": {"status": 429}}, P1: {"always": {"status": 503}}, G1: {}, G2: {}}})
    envoy = envoy_factory.start(CONFIG)
    for _ in range(3):
        envoy.chat(path="/v1/embeddings")
        envoy.chat(path="/v1/chat/completions")
    got = Counter(mock.keys_received())
    # The embeddings pool has one key: earliest keeps using it while it is down.
    assert got[E1] == 3
    # The prefix rule only fails over on 429, so 503s never take P1 out.
    assert got[P1] == 3
    envoy.wait_log(r"marked down after status 429", plugin_only=True)
    assert envoy.plugin_log().count("marked down") == 1
    # The global pool is untouched by the embeddings pool's trouble.
    for _ in range(4):
        assert envoy.chat(path="/v1/models").status == 200
    assert Counter(mock.keys_received())[G1] == 2


def test_service_rule_matches_higress_cluster_names(envoy_factory, mock):
    cfg = {"_rules_": [{"_match_service_": ["llm.mock.svc:80"], "apiTokens": [S1], "provider": "anthropic"}]}
    envoy = envoy_factory.start(cfg, cluster_name="outbound|80||llm.mock.svc")
    assert envoy.chat(headers={"authorization": "Bearer client-own"}).status == 200
    [req] = mock.requests()
    assert req["headers"]["x-api-key"] == S1
    assert "authorization" not in req["headers"]


def test_requests_no_rule_matches_pass_untouched_without_a_global_pool(envoy_factory, mock):
    cfg = {"_rules_": [{"_match_route_": ["route-embeddings"], "apiTokens": [E1]}]}
    envoy = envoy_factory.start(cfg)
    envoy.chat(path="/v1/embeddings")
    envoy.chat(path="/v1/chat/completions", headers={"authorization": "Bearer caller-key"})
    assert mock.keys_received() == [E1, "caller-key"]
