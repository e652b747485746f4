"""Shipped Envoy configs are valid for Envoy 1.40, and the demo gateway really serves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from harness import MOCK_PATH, NATIVE_DIR, NATIVE_PATH, REPO, WASM_PATH, envoy_binary, free_port

SHIPPED = [REPO / "envoy.yaml", *sorted((REPO / "examples").glob("*.yaml"))]
DEMO_KEYS = ["demo-key-1", "demo-key-2", "demo-key-3"]
# The shipped configs read their keys from OPENAI_API_KEYS (fromEnv, host_env_keys), as
# `make run` and `make validate` set it: the mock's demo keys.
DEMO_ENV = {"OPENAI_API_KEYS": ",".join(DEMO_KEYS)}


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_envoy_config_validates(path: Path):
    if "envoy.filters.http.dynamic_modules" in path.read_text():
        assert NATIVE_PATH.is_file(), f"{path.name} loads the native module: run `make build-native`"
    # Envoy loads a dynamic module while it validates, from this search path.
    env = dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(NATIVE_DIR))
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env={**env, **DEMO_ENV})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _walk(node, fn):
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            _walk(v, fn)
    elif isinstance(node, list):
        for v in node:
            _walk(v, fn)


def shipped_config(name: str, mock_port: int) -> dict:
    """A shipped Envoy config with only its ports and the .wasm path made test-local."""
    config = yaml.safe_load((REPO / name).read_text())

    def localize(node):
        addr = node.get("socket_address")
        if isinstance(addr, dict):
            addr["port_value"] = mock_port if addr.get("port_value") == 8081 else 0
        local = node.get("local")
        if isinstance(local, dict) and "filename" in local:
            local["filename"] = str(REPO / local["filename"])

    _walk(config, localize)
    return config


@pytest.mark.wasm_only("examples/*.yaml load the wasm filter")
def test_demo_gateway_answers_every_request_while_the_demo_keys_hit_their_limits(envoy_factory, mock_factory):
    """envoy.yaml: upstream mode with keys from the environment. demo-key-1 allows 3 requests per
    10 s and demo-key-2 five; the mock answers 429 behind the gateway and every client gets 200,
    streams included. The keys are not in /config_dump: only the variable's name is."""
    mock = mock_factory.start(demo=True)
    envoy = envoy_factory.start(raw_config=shipped_config("envoy.yaml", mock.port), mock=mock, env=DEMO_ENV)
    statuses = [envoy.chat(stream=(i % 4 == 0), headers={"authorization": "Bearer not-a-pool-key"}).status
                for i in range(20)]
    assert statuses == [200] * 20
    received = Counter(mock.keys_received())
    assert set(received) == set(DEMO_KEYS), received
    assert Counter(r["status"] for r in mock.requests())[429] >= 1, "the demo limits did bite; the retries hid them"
    envoy.wait_log(r"key demo-1 marked down after status 429", plugin_only=True)
    dump = envoy.admin("/config_dump").text
    assert "OPENAI_API_KEYS" in dump and not any(k in dump for k in DEMO_KEYS)


@pytest.mark.wasm_only("examples/*.yaml load the wasm filter")
def test_downstream_example_retries_with_another_key_itself(envoy_factory, mock_factory):
    """examples/envoy-downstream.yaml: the plugin in the listener (as on Higress), retryOnFailure
    re-sends a 429 with another key, so the clients also see only 200s."""
    mock = mock_factory.start(demo=True)
    envoy = envoy_factory.start(raw_config=shipped_config("examples/envoy-downstream.yaml", mock.port), mock=mock,
                                env=DEMO_ENV)
    statuses = [envoy.chat().status for _ in range(20)]
    assert statuses == [200] * 20
    assert Counter(r["status"] for r in mock.requests())[429] >= 1, "the demo limits did bite"
    envoy.wait_log(r"running as a downstream", plugin_only=True)


def test_native_example_gateway_injects_and_rotates_the_demo_keys(envoy_factory, mock_factory):
    """examples/envoy-native.yaml: the demo gateway with the native module (on either host's run:
    the config names its filter)."""
    mock = mock_factory.start(demo=True)
    envoy = envoy_factory.start(raw_config=shipped_config("examples/envoy-native.yaml", mock.port), mock=mock)
    statuses = [envoy.chat(headers={"authorization": "Bearer not-a-pool-key"}).status for _ in range(12)]
    received = Counter(mock.keys_received())
    assert set(received) <= {"demo-key-1", "demo-key-2", "demo-key-3"}, received
    assert len(received) == 3
    assert statuses.count(200) >= 10, statuses
    envoy.wait_log(r"Dynamic module ABI version v0\.2\.0 matched")
    envoy.wait_log(r"key demo-1 marked down after status 429")


@pytest.mark.wasm_only("examples/*.yaml load the wasm filter")
def test_upstream_retry_example_hides_rate_limits_from_clients(envoy_factory, mock_factory):
    """examples/envoy-upstream-retry.yaml against the demo mock: demo-key-1 allows 3 requests per
    10 s and demo-key-2 five, yet every client request succeeds, streamed ones included."""
    mock = mock_factory.start(demo=True)
    envoy = envoy_factory.start(raw_config=shipped_config("examples/envoy-upstream-retry.yaml", mock.port), mock=mock)
    statuses = [envoy.chat(stream=(i % 3 == 0)).status for i in range(20)]
    assert statuses == [200] * 20
    got = Counter(r["status"] for r in mock.requests())
    assert got[429] >= 1, "the demo limits did bite; the retries hid them"
    envoy.wait_log(r"running as an upstream \(per retry attempt\) filter", plugin_only=True)


def wasm_exports(module: bytes) -> list[str]:
    def leb(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = module[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, at

    at = 8  # magic and version
    while at < len(module):
        section, size_at = module[at], at + 1
        size, at = leb(size_at)
        if section == 7:
            count, at = leb(at)
            names = []
            for _ in range(count):
                length, at = leb(at)
                names.append(module[at:at + length].decode())
                _, at = leb(at + length + 1)  # kind byte, then index
            return names
        at += size
    return []


@pytest.mark.wasm_only("the wasm module's exports; the native module's symbols: test_native.py")
def test_the_built_module_exports_only_the_callbacks_the_plugin_uses():
    """Envoy calls into the VM for every exported callback; the plugin does its end-of-request
    work when it drops the context (src/wasm/exports.rs), so per request it needs no proxy_on_done
    or proxy_on_log."""
    wanted = json.loads((REPO / "scripts/wasm-exports.json").read_text())
    listed = {e["export"] for e in wanted if "export" in e}
    exported = set(wasm_exports(WASM_PATH.read_bytes()))
    assert exported == listed
    assert {"proxy_on_request_headers", "proxy_on_response_headers", "proxy_on_delete"} <= exported
    assert not exported & {"proxy_on_done", "proxy_on_log", "proxy_on_downstream_data"}


@pytest.mark.wasm_only("`make run` (scripts/run.sh) serves the wasm filter")
def test_make_run_demo_answers_twenty_of_twenty_and_counts_the_429s_it_absorbed(tmp_path):
    """`scripts/run.sh --demo-only`: the scripted part of `make run`, as a user runs it (mock
    --demo, Envoy with envoy.yaml, the keys in OPENAI_API_KEYS). Every request is answered 200,
    the mock really answered 429 behind the gateway, and Envoy and the plugin agree that each
    429 was retried."""
    ports = {"MOCK_PORT": free_port(), "GATEWAY_PORT": free_port(), "ADMIN_PORT": free_port()}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "LOGDIR": str(tmp_path / "run"),
           "ENVOY": envoy_binary(), "MOCK": str(MOCK_PATH), "PYTHON": sys.executable}
    r = subprocess.run([str(REPO / "scripts/run.sh"), "--demo-only"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "20/20 answered 200" in out, out
    absorbed = re.search(r"the provider answered 429 (\d+) times", out)
    envoy_retries = re.search(r"Envoy: +(\d+) retries with another key, (\d+) succeeded", out)
    plugin = re.search(r"plugin: (\d+) keys taken out for their rate limits, (\d+) retries, (\d+) succeeded", out)
    assert absorbed and envoy_retries and plugin, out
    n429 = int(absorbed.group(1))
    assert n429 >= 1, "the demo keys' limits must bite behind the gateway"
    # Every 429 was retried. A retry can meet a second key's limit (each Envoy worker rotates from
    # its own offset), so fewer retries than 429s may have succeeded, but at least one did.
    retries, retries_ok = int(envoy_retries.group(1)), int(envoy_retries.group(2))
    assert retries == n429 and 1 <= retries_ok <= retries, out
    marked_down, plugin_retries, plugin_retries_ok = (int(g) for g in plugin.groups())
    assert marked_down >= 1 and plugin_retries == retries and plugin_retries_ok == retries_ok, out
    mock_log = (tmp_path / "run/mock.log").read_text()
    assert mock_log.count("-> 429") == n429, mock_log[-2000:]
    assert "stopped mock provider and envoy" in out
