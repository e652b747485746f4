"""The Kubernetes recipes under examples/ (Envoy Gateway, Istio, Higress with keys from a Secret).

No cluster runs here, so each recipe is checked for what can go wrong in it without one:
- every manifest is YAML with apiVersion, kind and a name, and the file says which platform
  versions it was written for;
- the resources refer to each other (the Secret the proxy container reads, the EnvoyProxy the
  Gateway names, the route the policy targets);
- the plugin configuration the platform hands the plugin is loaded by the plugin itself, in a real
  Envoy whose VM gets exactly the variables the recipe passes (hostKeys / vmConfig.env ->
  host_env_keys), with the values the recipe's Secret holds, through the container env the recipe
  sets. A `fromEnv` variable the recipe forgets to pass or to set makes Envoy refuse the config,
  and the Secret's list format must give the keys it lists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import REPO
from test_higress import higress_plugin_config

EXAMPLES = REPO / "examples"


def docs(path: Path) -> list[dict[str, Any]]:
    out = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert out, f"{path} holds no YAML document"
    return out


def by_kind(documents: list[dict], kind: str) -> list[dict]:
    return [d for d in documents if d.get("kind") == kind]


def one(documents: list[dict], kind: str) -> dict:
    found = by_kind(documents, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def secret_env(container: dict, secrets: list[dict]) -> dict[str, str]:
    """{variable: value} for the container's env entries that come from one of these Secrets."""
    values = {}
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if not ref:
            continue
        secret = [s for s in secrets if s["metadata"]["name"] == ref["name"]]
        assert secret, f"{entry['name']} reads Secret {ref['name']!r}, which the recipe does not define"
        data = secret[0].get("stringData", {})
        assert ref["key"] in data, f"Secret {ref['name']} has no key {ref['key']!r}"
        values[entry["name"]] = data[ref["key"]]
    return values


def patched_container(patch: Path, name: str) -> dict:
    containers = docs(patch)[0]["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c.get("name") == name]
    assert found, f"{patch} patches no container {name!r}"
    return found[0]


def envoy_gateway() -> tuple[dict, list[str], dict[str, str], str]:
    path = EXAMPLES / "envoy-gateway/ai-key-failover.yaml"
    d = docs(path)
    proxy = one(d, "EnvoyProxy")
    gateway = one(d, "Gateway")
    route = one(d, "HTTPRoute")
    policy = one(d, "EnvoyExtensionPolicy")
    assert gateway["spec"]["infrastructure"]["parametersRef"] == {
        "group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": proxy["metadata"]["name"]}
    assert {"name": gateway["metadata"]["name"]} in route["spec"]["parentRefs"]
    assert {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
            "name": route["metadata"]["name"]} in policy["spec"]["targetRefs"]
    (wasm,) = policy["spec"]["wasm"]
    assert wasm["rootID"] == "ai-key-failover"
    assert wasm["code"]["type"] == "Image" and re.fullmatch(r"[0-9a-f]{64}", wasm["code"]["image"]["sha256"]), \
        "sha256 must be a string of 64 hex digits (quoted: YAML reads digits alone as a number)"
    container = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]
    return wasm["config"], wasm["env"]["hostKeys"], secret_env(container, by_kind(d, "Secret")), path.read_text()


def istio() -> tuple[dict, list[str], dict[str, str], str]:
    path = EXAMPLES / "istio/ai-key-failover.yaml"
    d = docs(path)
    plugin = one(d, "WasmPlugin")
    assert plugin["apiVersion"] == "extensions.istio.io/v1alpha1"
    spec = plugin["spec"]
    assert spec["url"].startswith("oci://") and spec["pluginName"] == "ai-key-failover"
    assert re.fullmatch(r"[0-9a-f]{64}", spec["sha256"]), "sha256 must be a string of 64 hex digits"
    host = [e["name"] for e in spec["vmConfig"]["env"] if e.get("valueFrom") == "HOST"]
    container = patched_container(EXAMPLES / "istio/gateway-env-patch.yaml", "istio-proxy")
    return spec["pluginConfig"], host, secret_env(container, by_kind(d, "Secret")), path.read_text()


def higress() -> tuple[dict, list[str], dict[str, str], str]:
    path = EXAMPLES / "higress/wasmplugin-env.yaml"
    d = docs(path)
    plugin = one(d, "WasmPlugin")
    assert plugin["apiVersion"] == "extensions.higress.io/v1alpha1"
    assert plugin["metadata"]["namespace"] == "higress-system"
    spec = plugin["spec"]
    host = [e["name"] for e in spec["vmConfig"]["env"] if e.get("valueFrom") == "HOST"]
    container = patched_container(EXAMPLES / "higress/gateway-env-patch.yaml", "higress-gateway")
    return higress_plugin_config(spec), host, secret_env(container, by_kind(d, "Secret")), path.read_text()


RECIPES = {"envoy-gateway": envoy_gateway, "istio": istio, "higress": higress}


def from_env_names(config: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(config, dict):
        if isinstance(config.get("fromEnv"), str):
            found.add(config["fromEnv"])
        for v in config.values():
            found |= from_env_names(v)
    elif isinstance(config, list):
        for v in config:
            found |= from_env_names(v)
    return found


@pytest.mark.parametrize("platform", RECIPES)
def test_recipe_manifests_are_well_formed_and_say_what_they_were_written_for(platform):
    config, host_keys, container_env, text = RECIPES[platform]()
    assert re.search(r"^# Written for \S+", text, re.M), "the recipe must name the platform versions"
    directory = EXAMPLES / platform
    for path in sorted(directory.glob("*.yaml")):
        for d in docs(path):
            if "kind" in d:  # patch files have only the fields they change
                assert d.get("apiVersion") and d.get("metadata", {}).get("name"), f"{path}: {d.get('kind')}"
    used = from_env_names(config)
    assert used, "the recipe's plugin configuration should read its keys from the environment"
    assert used <= set(host_keys), f"variables read but not passed into the VM: {used - set(host_keys)}"
    assert set(host_keys) <= set(container_env), "a variable passed into the VM that the proxy container lacks"
    assert "sk-" not in json.dumps(config), "no key in the plugin configuration itself"


@pytest.mark.wasm_only("the recipes configure the wasm plugin (vm_config host_env_keys)")
@pytest.mark.parametrize("platform", RECIPES)
def test_recipe_plugin_configuration_loads_in_envoy_with_the_keys_of_its_secret(platform, envoy_factory, mock):
    config, host_keys, container_env, _ = RECIPES[platform]()
    envoy = envoy_factory.start(
        json.dumps(config), env=container_env,
        extra_filter_options={"vm_config": {"environment_variables": {"host_env_keys": host_keys}}})
    secret_keys = {k.strip() for v in container_env.values() for k in re.split(r"[,\n]", v) if k.strip()}
    for _ in range(3):
        assert envoy.chat().status == 200
    received = set(mock.keys_received())
    assert received and received <= secret_keys, "the pool's keys are the Secret's"
    assert len(received) == 3, "the Secret's newline-separated list gives one key per line"
