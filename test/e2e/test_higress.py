"""examples/higress/wasmplugin.yaml, run the way Higress runs it.

Higress's controller turns a WasmPlugin's `defaultConfig` + `matchRules` into one JSON config:
the defaultConfig fields at the top level, and `_rules_`, one object per matchRule in order, holding
the rule's `config` fields plus `_match_route_` (from `ingress`), `_match_service_` (from `service`)
and `_match_domain_` (from `domain`). `higress_plugin_config` below mirrors that code
(alibaba/higress pkg/ingress/config/ingress_config.go, `convertIstioWasmPlugin`), the tests feed
its output to the plugin in a real Envoy, and the Envoy routes carry the names Higress gives the
routes of an Ingress (`<namespace>/<name>`, pkg/ingress/kube/common/tool.go
`GenerateUniqueRouteName`).
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections import Counter
from typing import Any

import pytest
import yaml

from harness import REPO, wait_for

WASMPLUGIN = REPO / "examples/higress/wasmplugin.yaml"

DEFAULT_KEYS = {"sk-REPLACE-ME-1", "sk-REPLACE-ME-2", "sk-REPLACE-ME-3"}
EMB1, EMB2 = "sk-REPLACE-ME-EMB-1", "sk-REPLACE-ME-EMB-2"
AZURE1 = "sk-REPLACE-ME-AZURE-1"

# What Higress generates from the example; a change to the example must show up here.
EXPECTED_CONFIG = {
    "name": "openai-main",
    "provider": "openai",
    "apiTokens": [
        {"token": "sk-REPLACE-ME-1", "name": "primary"},
        {"token": "sk-REPLACE-ME-2", "name": "secondary"},
        {"token": "sk-REPLACE-ME-3", "name": "backup"},
    ],
    "failover": {
        "enabled": True,
        "failureThreshold": 1,
        "failoverOnStatus": ["429", "5.*"],
        "cooldownDuration": 60000,
    },
    "onAllUnavailable": "earliest",
    "_rules_": [
        {
            "_match_route_": ["default/embeddings"],
            "name": "embeddings",
            "apiTokens": [
                {"token": EMB1, "name": "emb-1"},
                {"token": EMB2, "name": "emb-2"},
            ],
        },
        {
            "_match_domain_": ["*.team-a.example.com"],
            "name": "team-a-azure",
            "provider": "azure",
            "apiTokens": [{"token": AZURE1, "name": "azure-1"}],
        },
    ],
}

# The Envoy routes Higress builds: every route of the Ingress `embeddings` in namespace `default` is
# named `default/embeddings`; `default/chat` stands for any other Ingress, which no rule names.
ROUTES = [
    {"name": "default/embeddings", "prefix": "/v1/embeddings"},
    {"name": "default/chat", "prefix": "/"},
]
# Higress's cluster names look like this (Istio's outbound|<port>|<subset>|<fqdn>).
CLUSTER = "outbound|80||llm-mock.default.svc.cluster.local"
TEAM_A_HOST = "api.team-a.example.com"


def higress_plugin_config(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The plugin configuration Higress derives from a WasmPlugin `spec`, or None when Higress
    would not push the plugin at all. Mirrors `convertIstioWasmPlugin` step by step."""
    if spec.get("pluginConfig") is not None:
        # A raw pluginConfig is used as it is; defaultConfig and matchRules are then ignored.
        return copy.deepcopy(spec["pluginConfig"])
    default_disabled = bool(spec.get("defaultConfigDisable", False))
    result = None if default_disabled else copy.deepcopy(spec.get("defaultConfig"))
    has_valid_rule = False
    match_rules = spec.get("matchRules") or []
    if match_rules:
        if result is None:
            result = {}
        rules = []
        for rule in match_rules:
            if rule.get("configDisable", False):
                continue
            out = copy.deepcopy(rule.get("config") or {})
            valid = False
            # Every non-empty match list is set, in this order; the rule keeps them all.
            for field, key in (("ingress", "_match_route_"), ("service", "_match_service_"),
                               ("domain", "_match_domain_")):
                items = rule.get(field) or []
                if items:
                    out[key] = list(items)
                    valid = True
            if not valid:
                # Higress rejects the whole WasmPlugin ("invalid match rule has no match condition").
                raise ValueError(f"invalid match rule has no match condition: {rule}")
            rules.append(out)
        if rules:
            has_valid_rule = True
            result["_rules_"] = rules
    if not has_valid_rule and default_disabled:
        return None
    return result


def example_config() -> dict[str, Any]:
    doc = yaml.safe_load(WASMPLUGIN.read_text())
    assert doc["apiVersion"] == "extensions.higress.io/v1alpha1" and doc["kind"] == "WasmPlugin"
    assert doc["metadata"]["namespace"] == "higress-system"
    assert doc["spec"]["url"].startswith("oci://")
    config = higress_plugin_config(doc["spec"])
    assert config is not None
    # Higress hands the plugin JSON text; make sure the config survives that unchanged.
    return json.loads(json.dumps(config))


def test_example_converts_to_the_expected_higress_json():
    assert example_config() == EXPECTED_CONFIG


def test_conversion_mirrors_higress_edge_cases():
    spec = {
        "defaultConfig": {"apiTokens": ["g"]},
        "matchRules": [
            {"ingress": ["ns/a"], "domain": ["x.example"], "config": {"apiTokens": ["r"]}},
            {"service": ["llm.svc:80"]},  # no config: an empty one, plus the match key
            {"domain": ["off.example"], "configDisable": True, "config": {"apiTokens": ["o"]}},
        ],
    }
    assert higress_plugin_config(spec) == {
        "apiTokens": ["g"],
        "_rules_": [
            {"apiTokens": ["r"], "_match_route_": ["ns/a"], "_match_domain_": ["x.example"]},
            {"_match_service_": ["llm.svc:80"]},
        ],
    }
    assert higress_plugin_config({**spec, "defaultConfigDisable": True})["_rules_"]
    assert "apiTokens" not in higress_plugin_config({**spec, "defaultConfigDisable": True})
    assert higress_plugin_config({"defaultConfig": {"a": 1}, "defaultConfigDisable": True}) is None
    assert higress_plugin_config({"pluginConfig": {"p": 1}, "defaultConfig": {"a": 1}}) == {"p": 1}
    with pytest.raises(ValueError, match="no match condition"):
        higress_plugin_config({"matchRules": [{"config": {"a": 1}}]})


def test_routes_and_domains_get_their_own_pools(envoy_factory, mock):
    envoy = envoy_factory.start(example_config(), routes=ROUTES, cluster_name=CLUSTER)
    client_auth = {"authorization": "Bearer client-own-key"}

    # The Ingress route default/embeddings: the rule's keys, as an OpenAI bearer token.
    r = envoy.chat(path="/v1/embeddings", headers=client_auth)
    assert r.status == 200, r
    # A Host under *.team-a.example.com (port ignored): the Azure pool, in `api-key`.
    assert envoy.chat(headers={**client_auth, "host": TEAM_A_HOST}).status == 200
    assert envoy.chat(headers={"host": f"{TEAM_A_HOST}:8443"}).status == 200
    # No rule matches: the defaultConfig pool.
    assert envoy.chat(headers=client_auth).status == 200
    # Both rules match; the route rule comes first, so it wins.
    assert envoy.chat(path="/v1/embeddings", headers={"host": TEAM_A_HOST}).status == 200

    emb, azure, azure_port, default, both = sorted(mock.requests(), key=lambda r: r["seq"])
    assert emb["key"] in (EMB1, EMB2)
    assert emb["headers"]["authorization"] == f"Bearer {emb['key']}"
    for req in (azure, azure_port):
        assert req["key"] == AZURE1
        assert req["headers"]["api-key"] == AZURE1
        assert "authorization" not in req["headers"], "the client's own credential must not pass"
    assert default["key"] in DEFAULT_KEYS
    assert default["headers"]["authorization"] == f"Bearer {default['key']}"
    assert both["key"] in (EMB1, EMB2) and "api-key" not in both["headers"]


def test_a_429_in_the_route_pool_leaves_the_default_pool_alone(envoy_factory, mock):
    mock.set_keys({"requireKnownKey": False, "keys": {EMB1: {"always": {"status": 429}}}})
    envoy = envoy_factory.start(example_config(), routes=ROUTES, cluster_name=CLUSTER)

    statuses = [envoy.chat(path="/v1/embeddings").status for _ in range(4)]
    envoy.wait_log(r"pool embeddings: key emb-1 marked down after status 429", plugin_only=True)
    got = Counter(mock.keys_received())
    # failureThreshold 1: emb-1 is out after its first 429; emb-2 serves the rest.
    assert got[EMB1] <= 1 and got[EMB1] + got[EMB2] == 4, got
    assert statuses.count(200) >= 3, statuses

    mock.clear()
    for _ in range(3):
        assert envoy.chat().status == 200
    # Round robin over the whole default pool: none of its keys was taken out.
    assert set(mock.keys_received()) == DEFAULT_KEYS
    downs = [line for line in envoy.plugin_log().splitlines() if "marked down" in line]
    assert downs and all("pool embeddings:" in line for line in downs), downs


# ----------------------------------------------------------------- sub-second Higress timings

PRIMARY = "sk-REPLACE-ME-1"
UA = "ai-key-failover-health-check"
# Slack for a loaded 2-core machine on top of what the plugin promises.
LOAD_SLACK_MS = 300


def log_time_ms(envoy, pattern: str) -> int:
    """Envoy's own timestamp (`[2026-12-01 07:29:25.123]`) of the first plugin line matching
    `pattern`, in ms of the day: two of them give the time between two plugin events."""
    line = envoy.wait_log(rf"(?m)^\[\d{{4}}-[^\]]+\].*{pattern}", plugin_only=False)
    stamp = re.match(r"\[\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d)\.(\d{3})\]", line.group(0))
    assert stamp, line.group(0)
    h, m, s, ms = (int(x) for x in stamp.groups())
    return ((h * 60 + m) * 60 + s) * 1000 + ms


def higress_failover(ms: int, **extra) -> dict[str, Any]:
    """The example with a `failover` block as Higress ai-proxy users write it, with `ms` timings."""
    cfg = example_config()
    cfg["failover"] = {"enabled": True, "failureThreshold": 1, "failoverOnStatus": ["429", "5.*"],
                       "cooldownDuration": ms, **extra}
    return cfg


def take_primary_out(envoy, mock) -> None:
    mock.always(PRIMARY, {"status": 503})
    with envoy.client() as c:
        for _ in range(3):  # round robin over 3 keys reaches primary within 3 requests
            c.chat()
    envoy.wait_log(r"pool openai-main: key primary marked down after status 503", plugin_only=True)


@pytest.mark.parametrize("ms", [100, 200, 300, 500])
def test_a_sub_second_cooldown_ends_on_time_without_traffic(envoy_factory, mock, ms):
    envoy = envoy_factory.start(higress_failover(ms), routes=ROUTES, cluster_name=CLUSTER, concurrency=2)
    take_primary_out(envoy, mock)
    down = log_time_ms(envoy, r"key primary marked down after status 503")
    # No request is sent: only the tick (every `ms` here, not every second) ends the time out.
    over = log_time_ms(envoy, r"key primary time out over; the next request probes it")
    waited = over - down
    # The cooldown plus up to 10% jitter, plus at most one tick of `ms`.
    assert ms <= waited <= ms * 1.1 + ms + LOAD_SLACK_MS, f"back after {waited} ms with a {ms} ms cooldown"


@pytest.mark.parametrize("ms", [100, 200, 300, 500])
def test_higress_sub_second_failover_block_fails_over_and_recovers(envoy_factory, mock, ms):
    # Higress's own failover block: checks every `ms`, each allowed `ms` (200 at least, so that a
    # loaded machine's answer is not taken for a timeout).
    cfg = higress_failover(ms, successThreshold=1, healthCheckInterval=ms, healthCheckTimeout=max(ms, 200),
                           healthCheckModel="gpt-4o-mini")
    envoy = envoy_factory.start(cfg, routes=ROUTES, cluster_name=CLUSTER, concurrency=2)
    take_primary_out(envoy, mock)

    # Fail over: while primary fails its checks, live requests go to the other keys; primary
    # sees at most a probe or two when a cooldown (doubled by each failed check) ends.
    mock.clear()
    with envoy.client() as c:
        statuses = [c.chat().status for _ in range(10)]
    live = [r for r in mock.requests() if r["headers"].get("user-agent") != UA]
    probes = sum(r["key"] == PRIMARY for r in live)
    assert probes <= 2, f"primary got {probes} of 10 live requests while out"
    assert Counter(statuses) == Counter({200: 10 - probes, 503: probes}), statuses
    checks = wait_for(lambda: (lambda c: c if len(c) >= 3 else None)(
        [r for r in mock.requests() if r["headers"].get("user-agent") == UA]), 5, what="three health checks")
    assert {r["key"] for r in checks} == {PRIMARY}, "only the key that is out is checked"
    times = sorted(r["time_ms"] for r in checks)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # One check per interval (a quarter tick early at most), not one per second.
    assert all(g >= ms * 0.7 for g in gaps), gaps
    assert min(gaps) <= ms + LOAD_SLACK_MS, gaps

    # Recover: the provider takes the key again; the next check, within about one interval,
    # brings it back.
    mock.always(PRIMARY, None)
    fixed_ms = time.time() * 1000
    envoy.wait_log(r"key primary passed its health check \(status 200\); back in rotation", plugin_only=True)
    passed = [r for r in mock.requests() if r["headers"].get("user-agent") == UA and r["time_ms"] >= fixed_ms]
    assert passed and passed[0]["time_ms"] - fixed_ms <= ms + LOAD_SLACK_MS, (passed[:1], fixed_ms)
    mock.clear()
    with envoy.client() as c:
        for _ in range(3):
            assert c.chat().status == 200
    assert PRIMARY in mock.keys_received(), "back in rotation"
