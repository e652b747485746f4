"""Checks shared by the load, fault, reload and hostile-input tests: Wasm VM health, Envoy's
memory, plugin stats, secret fragments, and chats sent in the background."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from harness import STATS_PREFIX, WASM_PATH, Envoy, HarnessError, envoy_config, until, wait_for

PLUGIN_STATS = f"{STATS_PREFIX}ai_key_failover."

# What Envoy or V8 writes when a Wasm VM traps, panics or fails: none may ever show up.
VM_FAILURE = re.compile(r"Function: \S+ failed|Uncaught|RuntimeError|panicked at|wasm trap|VM failed|failed to load")


def wasm_stats(envoy: Envoy) -> dict[str, int]:
    """Envoy's own Wasm stats (not the plugin's): VM counts and reloads."""
    return {k: v for k, v in envoy.stats("wasm").items()
            if not k.startswith("wasmcustom.") and isinstance(v, int) and "remote_load" not in k}


def vm_failures_in_log(envoy: Envoy) -> list[str]:
    return [line for line in envoy.log().splitlines()
            if ("wasm" in line.lower() and VM_FAILURE.search(line)) or "panicked at" in line]


def assert_vm_healthy(envoy: Envoy, baseline: dict[str, int]) -> None:
    """No VM was created, lost or reloaded since `baseline` (wasm_stats right after start), and
    neither Envoy nor V8 logged a failed or trapped Wasm call."""
    time.sleep(0.3)  # the log file is flushed every 100 ms
    now = wasm_stats(envoy)
    for name, value in now.items():
        if "vm_reload" in name or name.endswith(".created") or name.endswith(".active") or name.endswith("wasm_vm_count"):
            # A stat missing from the baseline was 0 then: it showing up now is a VM created or
            # reloaded since.
            was = baseline.get(name, 0)
            assert value == was, f"Wasm stat {name} went from {was} to {value}"
    bad = vm_failures_in_log(envoy)
    assert not bad, "Wasm VM failure in Envoy's log:\n" + "\n".join(bad[:10])
    assert not envoy.exited(), "Envoy exited"


def rss_bytes(envoy: Envoy) -> int:
    assert envoy.proc is not None
    for line in Path(f"/proc/{envoy.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise HarnessError("no VmRSS in /proc/<envoy>/status")


def pool_stats(envoy: Envoy, pool: str) -> dict[str, Any]:
    """The plugin's stats of one pool, named without the `<STATS_PREFIX>ai_key_failover.pool.<pool>.` prefix."""
    prefix = f"{PLUGIN_STATS}pool.{pool}."
    return {k[len(prefix):]: v for k, v in envoy.stats(PLUGIN_STATS.rstrip(".")).items() if k.startswith(prefix)}


def wait_pool_stats(envoy: Envoy, pool: str, pred, timeout: float = 5, what: str = "pool stats") -> dict[str, Any]:
    """Pool stats once pred(stats) holds (counters and gauges are flushed once a second)."""
    def check():
        s = pool_stats(envoy, pool)
        return s if pred(s) else None
    return wait_for(check, timeout, interval=0.2, what=what)


def assert_no_key_marked_down(stats: dict[str, Any], n_keys: int) -> None:
    """No mark-down counted in these pool stats (from pool_stats), per key or per class. Every key's
    counter must be there: a renamed or missing stat fails, rather than passing as "none is above 0"."""
    per_key = {k: v for k, v in stats.items() if k.startswith("key.") and k.endswith(".key_marked_down")}
    assert len(per_key) == n_keys, f"{n_keys} keys, but key_marked_down counters for {sorted(per_key)}"
    marked = {k: v for k, v in stats.items() if k.endswith("key_marked_down") or k.endswith("keys_marked_down")}
    assert not any(marked.values()), marked


DOWNSTREAM_RESETS = "http.e2e.downstream_rq_rx_reset"


def downstream_resets(envoy: Envoy) -> int:
    """How many requests on the test listener their clients have reset (hung up mid-request)."""
    return envoy.stats(DOWNSTREAM_RESETS).get(DOWNSTREAM_RESETS, 0)


def wait_downstream_resets(envoy: Envoy, n: int, timeout: float = 5) -> int:
    """Wait until Envoy has counted `n` requests reset by their clients in all: by then it has
    ended those streams, and the plugin has seen them end."""
    return until(lambda: downstream_resets(envoy), lambda v: v >= n, timeout,
                 what=f"Envoy to count {n} requests reset by their clients ({DOWNSTREAM_RESETS})")


def lds_bootstrap(tmp_path: Path, mock_port: int, listener_port: int, plugin_config: dict):
    """A bootstrap whose listener comes from a file, and a function that swaps that file
    atomically for one with another plugin config (an LDS update)."""
    full = envoy_config(upstream_port=mock_port, plugin_config=plugin_config, listener_port=listener_port)
    full["static_resources"].pop("listeners")
    lds_path = tmp_path / "lds.json"

    def write(cfg: dict, wasm_path: Path | str = WASM_PATH, first_filter: dict | None = None) -> None:
        """`wasm_path`: the plugin module to serve with; `first_filter`: an HTTP filter put before it."""
        listener = envoy_config(upstream_port=mock_port, plugin_config=cfg, listener_port=listener_port,
                                wasm_path=wasm_path)["static_resources"]["listeners"][0]
        if first_filter:
            listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"].insert(0, first_filter)
        listener["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
        tmp = tmp_path / "lds.json.tmp"
        tmp.write_text(json.dumps({"resources": [listener]}))
        os.rename(tmp, lds_path)  # Envoy watches for the move

    write(plugin_config)
    full["node"] = {"id": "e2e", "cluster": "e2e"}
    full["dynamic_resources"] = {"lds_config": {"path_config_source": {"path": str(lds_path)},
                                                "resource_api_version": "V3"}}
    return full, write


class BackgroundChats:
    """Threads that send chats until the `with` block ends. Each answer is recorded as
    (status, whether it came from the upstream); a request that raised is recorded in `errors`.
    `keep_alive=False` opens a new connection per request, so requests reach a listener that
    replaced the old one as soon as it serves."""

    def __init__(self, envoy: Envoy, threads: int, keep_alive: bool) -> None:
        self.envoy, self.keep_alive = envoy, keep_alive
        self.results: list[tuple[int, bool]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _send(self, chat) -> None:
        while not self._stop.is_set():
            try:
                r = chat()
                self.results.append((r.status, "x-mock-request-id" in r.headers))
            except Exception as e:  # noqa: BLE001 - any error is a lost request
                self.errors.append(repr(e))

    def _run(self) -> None:
        if self.keep_alive:
            with self.envoy.client() as c:
                self._send(c.chat)
        else:
            self._send(self.envoy.chat)

    def __enter__(self) -> "BackgroundChats":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def fragments(keys: Iterable[str], n: int = 8) -> set[str]:
    """Every substring of n characters of every key (a key shorter than n: the whole key)."""
    out: set[str] = set()
    for k in keys:
        if len(k) <= n:
            out.add(k)
        else:
            out.update(k[i:i + n] for i in range(len(k) - n + 1))
    return out


def key_fragments_in(text: str | bytes, keys: Iterable[str], n: int = 8) -> list[str]:
    """The n-character fragments of the keys found in text (empty: nothing of any key is there)."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return sorted(f for f in fragments(keys, n) if f in text)


# --------------------------------------------------------------------------- a raw upstream


class RawUpstream:
    """A tiny HTTP/1.1 upstream on 127.0.0.1 that misbehaves on purpose. For each request it
    reads the head (and a content-length body), records it, and acts as `behave(path)` says:

      ("send", bytes)          send these bytes, then close the connection (FIN)
      ("send_reset", bytes)    send these bytes, then reset the connection (RST)
      ("reset",)               reset at once, without answering
      ("close",)               close at once (FIN), without answering
      ("hang",)                say nothing until the peer goes away or the server stops
    """

    def __init__(self, behave):
        import socket
        import threading

        self.behave = behave
        self.requests: list[tuple[str, dict[str, bytes]]] = []
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._threads: list = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn) -> None:
        import socket
        import struct

        conn.settimeout(0.2)
        buf = b""
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    try:
                        chunk = conn.recv(65536)
                    except socket.timeout:
                        if self._stop.is_set():
                            return
                        continue
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path, _ = (lines[0].decode("latin-1").split(" ", 2) + ["", ""])[:3]
                headers: dict[str, bytes] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.decode("latin-1").strip().lower()] = value.strip()
                length = int(headers.get("content-length", b"0") or 0)
                while len(buf) < length:
                    try:
                        chunk = conn.recv(65536)
                    except socket.timeout:
                        continue
                    if not chunk:
                        return
                    buf += chunk
                buf = buf[length:]
                self.requests.append((path, headers))
                action = self.behave(path)
                kind = action[0]
                if kind == "hang":
                    while not self._stop.is_set():
                        try:
                            if not conn.recv(65536):
                                return
                        except socket.timeout:
                            continue
                    return
                if kind in ("reset", "send_reset"):
                    if kind == "send_reset":
                        conn.sendall(action[1])
                        time.sleep(0.05)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if kind == "close":
                    return
                conn.sendall(action[1])
                if b"connection: close" in action[1].lower() or not action[1].startswith(b"HTTP/1.1"):
                    return
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        for t in self._threads:
            t.join(timeout=2)


def http_response(status: int, headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"",
                  reason: bytes = b"X", close: bool = True) -> bytes:
    """Raw HTTP/1.1 response bytes; header values are sent exactly as given (any bytes)."""
    out = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    for name, value in headers or []:
        out += name + b": " + value + b"\r\n"
    out += b"content-length: %d\r\n" % len(body)
    if close:
        out += b"connection: close\r\n"
    return out + b"\r\n" + body


def raw_exchange(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send raw request bytes on a new connection; read until the server closes or goes quiet
    (a keep-alive answer is complete once content-length bytes have arrived)."""
    import socket

    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if m and len(body) >= int(m.group(1)):
                    break
    return data
