"""pytest fixtures for the e2e tests. See harness.py for the classes.

Fixtures (all function-scoped):
  mock            a running mock provider (Mock), torn down after the test
  mock_factory    start(keys_file=None, demo=False) -> another Mock
  envoy_factory   start(...) -> Envoy ready to serve; start_expect_failure(...) -> log text.
                  Every Envoy is stopped after the test, then its plugin log is scanned for the
                  API keys of every plugin config it was given (opt out: @pytest.mark.allow_key_in_log).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    DEFAULT_CLUSTER,
    HOST,
    Envoy,
    HarnessError,
    Mock,
    collect_keys,
    env_keys,
    find_leaks,
    plugin_log_text,
    scannable_log_text,
    read_text,
    tail,
)


def pytest_collection_modifyitems(config, items):
    """With AKF_HOST=native, tests marked wasm_only or native_missing are skipped, each with its
    reason in the summary (pytest -ra): nothing is left out silently."""
    if HOST != "native":
        return
    for item in items:
        for name, why in (("wasm_only", "wasm only"), ("native_missing", "not in the native host yet")):
            marker = item.get_closest_marker(name)
            if marker is not None:
                reason = marker.args[0] if marker.args else ""
                item.add_marker(pytest.mark.skip(reason=f"{why}: {reason}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _failed(request) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


class MockFactory:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.mocks: list[Mock] = []

    def start(self, keys_file: Any = None, demo: bool = False, extra_args: Any = ()) -> Mock:
        m = Mock(self.tmp_path / f"mock{len(self.mocks)}", keys_file=keys_file, demo=demo, extra_args=extra_args)
        self.mocks.append(m)
        return m

    def close(self, show_logs: bool) -> None:
        for m in self.mocks:
            m.stop()
            if show_logs:
                print(f"--- mock log tail ({m.log_path}) ---\n{tail(m.log(), 30)}")


@pytest.fixture
def mock_factory(tmp_path, request):
    f = MockFactory(tmp_path)
    yield f
    f.close(_failed(request))


@pytest.fixture
def mock(mock_factory) -> Mock:
    return mock_factory.start()


class EnvoyFactory:
    def __init__(self, request, tmp_path: Path):
        self.request = request
        self.tmp_path = tmp_path
        self.envoys: list[Envoy] = []
        # Every plugin config handed to this factory, for the secret scan.
        self.keys: list[tuple[str, str]] = []

    def _upstream_port(self, mock: Any) -> int:
        if mock is None:
            mock = self.request.getfixturevalue("mock")
        return mock if isinstance(mock, int) else mock.port

    def _remember_keys(self, plugin_config: Any, env: dict | None = None) -> None:
        n = len([e for e in self.envoys if e.wasm])
        for desc, key in collect_keys(plugin_config) + env_keys(env):
            if key not in [k for _, k in self.keys]:
                self.keys.append((f"config #{n} {desc}", key))

    def make(self, plugin_config: Any = None, concurrency: int = 1, mock: Any = None, routes: list | None = None,
             cluster_name: str = DEFAULT_CLUSTER, wasm: bool = True, extra_filter_options: dict | None = None,
             **kw: Any) -> Envoy:
        """Write the config and create the Envoy, without starting it."""
        if wasm:
            self._remember_keys(plugin_config, kw.get("env"))
        e = Envoy(self.tmp_path, self._upstream_port(mock), plugin_config, concurrency=concurrency, routes=routes,
                  cluster_name=cluster_name, wasm=wasm, extra_filter_options=extra_filter_options, **kw)
        self.envoys.append(e)
        return e

    def start(self, plugin_config: Any = None, concurrency: int = 1, mock: Any = None, routes: list | None = None,
              cluster_name: str = DEFAULT_CLUSTER, wasm: bool = True, extra_filter_options: dict | None = None,
              timeout: float = 20, **kw: Any) -> Envoy:
        """Start Envoy proxying to `mock` (default: the test's `mock` fixture; a Mock or a port) and
        wait until it serves. plugin_config: dict/list (json.dumps'ed) or str (verbatim).
        routes: list of (name, prefix) or route dicts (see harness.make_route); default
        route-chat /v1/chat, route-embeddings /v1/embeddings, route-default /.
        extra_filter_options: deep-merged into the wasm PluginConfig (e.g. {"failure_policy": ...}).
        Other keywords: extra_clusters={name: port}, filter_mode="downstream"|"upstream",
        log_level="debug", extra_args=[...] (Envoy CLI), raw_config={bootstrap dict},
        env={NAME: value} (Envoy's environment, for `fromEnv` keys; None removes a variable)."""
        e = self.make(plugin_config, concurrency, mock, routes, cluster_name, wasm, extra_filter_options, **kw)
        return e.start(timeout)

    def start_expect_failure(self, plugin_config: Any, timeout: float = 20, **kw: Any) -> str:
        """Start Envoy with this config expecting it to exit non-zero or never become ready.
        Returns the log text (plus anything Envoy printed on stdout/stderr). Fails the test if
        Envoy became ready."""
        e = self.make(plugin_config, **kw)
        e.launch()
        try:
            e.wait_ready(timeout)
        except HarnessError:
            exited_by_itself = e.exited()
            code = e.stop()
            if exited_by_itself and code == 0:
                pytest.fail(f"envoy exited with code 0; a failure was expected (config: {e.config_path})")
            return e.log() + read_text(e.stdout_path)
        e.stop()
        pytest.fail(f"envoy became ready although a failure was expected (config: {e.config_path})")

    def close(self) -> None:
        leaks: list[str] = []
        unscanned: list[str] = []
        scan = not self.request.node.get_closest_marker("allow_key_in_log")
        for i, e in enumerate(self.envoys):
            if scan and self.keys and e.proc is not None and not e.exited() and e.admin_port:
                try:  # plugin metrics must not carry keys in their names either
                    leaks += find_leaks(self.keys, e.stats_text(), f"envoy #{i} admin /stats")
                except OSError as err:  # a running Envoy whose stats cannot be read is not scanned
                    unscanned.append(f"envoy #{i} admin /stats: {err!r}")
            e.stop()
            if _failed(self.request):
                print(f"--- envoy #{i} log tail ({e.log_path}) ---\n{tail(e.log(), 80)}")
            if scan and self.keys:
                leaks += find_leaks(self.keys, scannable_log_text(e.log()), f"envoy #{i} log ({e.log_path})")
                leaks += find_leaks(self.keys, scannable_log_text(read_text(e.stdout_path)),
                                    f"envoy #{i} plugin lines on stdout/stderr")
        if leaks:
            pytest.fail("SECRET SCAN: API keys leaked:\n  " + "\n  ".join(leaks), pytrace=False)
        if unscanned:
            pytest.fail("SECRET SCAN could not read:\n  " + "\n  ".join(unscanned), pytrace=False)


@pytest.fixture
def envoy_factory(request, tmp_path):
    f = EnvoyFactory(request, tmp_path)
    yield f
    f.close()
