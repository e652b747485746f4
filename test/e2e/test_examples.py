"""Shipped Envoy configs are valid for Envoy 1.40, and the demo gateway really serves."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

import os

from harness import NATIVE_DIR, NATIVE_PATH, REPO, WASM_PATH, envoy_binary

SHIPPED = [REPO / "envoy.yaml", *sorted((REPO / "examples").glob("*.yaml"))]


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_envoy_config_validates(path: Path):
    if "envoy.filters.http.dynamic_modules" in path.read_text():
        assert NATIVE_PATH.is_file(), f"{path.name} loads the native module: run `make build-native`"
    # Envoy loads a dynamic module while it validates, from this search path.
    env = dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(NATIVE_DIR))
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
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
def test_demo_gateway_injects_and_rotates_the_demo_keys(envoy_factory, mock_factory):
    mock = mock_factory.start(demo=True)
    envoy = envoy_factory.start(raw_config=shipped_config("envoy.yaml", mock.port), mock=mock)
    statuses = [envoy.chat(headers={"authorization": "Bearer not-a-pool-key"}).status for _ in range(12)]
    received = Counter(mock.keys_received())
    assert set(received) <= {"demo-key-1", "demo-key-2", "demo-key-3"}, received
    assert len(received) == 3
    # demo-key-1 allows 3 requests per 10 s: it hits its limit, fails over, and the rest succeed.
    assert statuses.count(200) >= 10, statuses
    envoy.wait_log(r"key demo-1 marked down after status 429", plugin_only=True)


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
    work when the SDK drops the context, so per request it needs no proxy_on_done or proxy_on_log."""
    wanted = json.loads((REPO / "scripts/wasm-exports.json").read_text())
    listed = {e["export"] for e in wanted if "export" in e}
    exported = set(wasm_exports(WASM_PATH.read_bytes()))
    assert exported == listed
    assert {"proxy_on_request_headers", "proxy_on_response_headers", "proxy_on_delete"} <= exported
    assert not exported & {"proxy_on_done", "proxy_on_log", "proxy_on_downstream_data"}
