"""Faults: an upstream that refuses connections, resets mid-response, speaks garbage or hangs; a
configuration reload under load; a shared-data state entry that cannot be decoded.

What must hold: clients get Envoy's normal errors (502/503 `upstream connect error ...`, 504
`upstream request timeout`), keys are never marked down for Envoy's own local replies, no Wasm VM
fails, a reload loses no request, and a corrupt state entry is replaced by fresh state with a
warning, after which the pool's state works again.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from checks import (
    BackgroundChats,
    lds_bootstrap,
    RawUpstream,
    assert_no_key_marked_down,
    assert_vm_healthy,
    http_response,
    raw_exchange,
    vm_failures_in_log,
    pool_stats,
    wait_pool_stats,
    wasm_stats,
)
from harness import REPO, HarnessError, envoy_config, free_port, until, wait_for, wasm_filter

A, B, C = "sk-fault-alpha-Kq71x0001", "sk-fault-bravo-Kq71x0002", "sk-fault-charlie-Kq71x0003"
KEYS = [{"token": A, "name": "alpha"}, {"token": B, "name": "bravo"}, {"token": C, "name": "charlie"}]
POOL = "faults"

OK_BODY = b'{"id":"x","object":"chat.completion","choices":[]}'
FAULTS = {
    # path: (what the upstream does, what the client must get)
    "/fault/close": (("close",), 503),
    "/fault/reset": (("reset",), 503),
    # Envoy calls a broken head a protocol error: 502
    "/fault/reset-in-headers": (("send_reset", b"HTTP/1.1 429 Too Many Requests\r\nretry-af"), 502),
    "/fault/garbage": (("send", b"THIS IS NOT HTTP\r\n\r\n"), 502),
    "/fault/hang": (("hang",), 504),
    "/fault/reset-in-body-200": (("send_reset", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                  b"content-length: 1000\r\n\r\n{\"id\":\"partial"), 200),
}
# Last, since a 429 is the upstream's and may take keys out.
RESET_IN_429_BODY = ("send_reset", b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
                     b"retry-after: 1\r\ncontent-length: 1000\r\n\r\n{\"error\":{\"type\":\"insuff")


def behave(path: str):
    path = path.split("?")[0]
    if path in FAULTS:
        return FAULTS[path][0]
    if path == "/fault/reset-in-body-429":
        return RESET_IN_429_BODY
    return ("send", http_response(200, [(b"content-type", b"application/json")], OK_BODY, reason=b"OK", close=False))


@pytest.fixture
def raw_upstream():
    servers: list[RawUpstream] = []

    def start(behaviour=behave) -> RawUpstream:
        s = RawUpstream(behaviour)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


MODES = ["downstream", "retryOnFailure", "upstream"]


def start_mode(envoy_factory, mode: str, port: int, **kw):
    """The plugin in front of `port` in one of its three ways of running; 1 s route timeout."""
    cfg = {"name": POOL, "apiTokens": KEYS, "failover": {"cooldownDuration": 60000}}
    route = {"cluster": "mock_provider", "timeout": "1s"}
    if mode == "upstream":
        route["retry_policy"] = {"retry_on": "retriable-status-codes,reset,connect-failure",
                                 "retriable_status_codes": [429, 500, 502, 503, 504], "num_retries": 2,
                                 "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.01s"}}
        kw["filter_mode"] = "upstream"
    if mode == "retryOnFailure":
        cfg["retryOnFailure"] = {"enabled": True, "maxRetries": 2, "retryTimeout": 1000}
    return envoy_factory.start(cfg, mock=port, routes=[{"name": "route-default", "prefix": "/", "route": route}], **kw)


def post(path: str) -> bytes:
    body = b'{"model":"m","messages":[]}'
    return (b"POST %s HTTP/1.1\r\nhost: gw.example\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (path.encode(), len(body), body))


def status_of(reply: bytes) -> int:
    try:
        return int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def assert_no_key_marked(envoy, n_keys: int = 3) -> None:
    assert "marked down" not in envoy.plugin_log(), "a key was marked down for an Envoy local reply"
    s = wait_pool_stats(envoy, POOL, lambda s: s.get("keys_available") == n_keys, what="every key available")
    assert_no_key_marked_down(s, n_keys)


@pytest.mark.parametrize("mode", MODES)
def test_upstream_faults_get_envoys_errors_and_never_mark_keys(envoy_factory, raw_upstream, mode):
    up = raw_upstream()
    envoy = start_mode(envoy_factory, mode, up.port, concurrency=2)
    baseline = wasm_stats(envoy)
    assert status_of(raw_exchange(envoy.port, post("/ok"))) == 200

    def hit(path: str) -> bytes:
        return raw_exchange(envoy.port, post(path), timeout=8)

    for path, (_, expected) in FAULTS.items():
        replies = [None] * 3
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, hit(path))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for reply in replies:
            assert status_of(reply) == expected, (path, reply[:300])
            if expected in (502, 503):
                assert b"upstream connect error or disconnect/reset before headers" in reply, (path, reply[-300:])
            if expected == 504:
                assert reply.endswith(b"upstream request timeout"), (path, reply[-300:])
            if path.endswith("body-200"):
                assert b"partial" in reply and not reply.endswith(b"}"), "the client saw the truncated body"
    assert_no_key_marked(envoy)
    assert_vm_healthy(envoy, baseline)

    # A 429 that the upstream really sent, reset halfway through its body (which the plugin is
    # reading): the key may be marked for the 429, nothing may break. Passed through, the client
    # gets the 429 and a cut body; held for a retry (by the plugin or by Envoy) before the reset,
    # Envoy's 502 for the broken stream.
    for _ in range(3):
        reply = hit("/fault/reset-in-body-429")
        assert status_of(reply) in ((429,) if mode == "downstream" else (429, 502)), reply[:300]
    assert status_of(hit("/ok")) == 200
    assert_vm_healthy(envoy, baseline)
    log = envoy.plugin_log()
    assert "marked down after status 429" in log or mode != "downstream", log[-2000:]
    assert "marked down after status 5" not in log


@pytest.mark.parametrize("mode", MODES)
def test_refused_connections_get_envoys_503_and_never_mark_keys(envoy_factory, mode):
    envoy = start_mode(envoy_factory, mode, free_port())  # nothing listens there
    baseline = wasm_stats(envoy)
    for _ in range(6):
        r = envoy.chat()
        assert r.status == 503, r
        assert r.text.startswith("upstream connect error or disconnect/reset before headers"), r.text
        assert "connection refused" in r.text.lower() or "connection failure" in r.text.lower(), r.text
    assert_no_key_marked(envoy)
    assert_vm_healthy(envoy, baseline)


# --------------------------------------------------------------------------- reload under load


def test_config_reloads_under_load_lose_no_request(envoy_factory, mock, tmp_path):
    D, E = "sk-fault-delta-Kq71x0004", "sk-fault-echo-Kq71x0005"
    every = KEYS + [{"token": D, "name": "delta"}, {"token": E, "name": "echo"}]
    # bravo runs into its rate limit again and again: keys flap while the configs change.
    mock.set_keys({"keys": {A: {}, B: {"limit": 15, "windowMs": 1000}, C: {}, D: {}, E: {}}})
    versions = [
        {"name": POOL, "apiTokens": KEYS, "failover": {"cooldownDuration": 1000}},
        {"name": POOL, "apiTokens": every[:4], "exposeKeyName": True, "failover": {"cooldownDuration": 2000}},
        {"name": POOL, "apiTokens": every[1:], "selection": "random", "failover": {"cooldownDuration": 1000}},
        {"name": "faults2", "apiTokens": every, "selection": "weighted", "failover": {"failureThreshold": 2}},
        {"name": POOL, "apiTokens": every[:2], "onAllUnavailable": "earliest"},
        {"name": POOL, "apiTokens": KEYS, "failover": {"cooldownDuration": 1000}},
    ]
    port = free_port()
    bootstrap, swap = lds_bootstrap(tmp_path, mock.port, port, versions[0])
    envoy = envoy_factory.start({"apiTokens": every}, raw_config=bootstrap, concurrency=4)  # every key, for the scan
    envoy.port = port
    baseline_updates = envoy.stats("lds").get("listener_manager.lds.update_success", 0)

    with BackgroundChats(envoy, threads=8, keep_alive=False) as load:
        time.sleep(0.5)
        for n, cfg in enumerate(versions[1:], start=1):
            swap(cfg)
            wait_for(lambda: envoy.stats("lds").get("listener_manager.lds.update_success", 0) >= baseline_updates + n,
                     10, what=f"LDS update {n}")
            time.sleep(0.6)
    results, errors = load.results, load.errors

    statuses = Counter(s for s, _ in results)
    assert not errors, f"{len(errors)} requests failed: {errors[:5]}"
    assert all(from_upstream for _, from_upstream in results), statuses
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] > 0.8 * len(results), statuses
    assert len(mock.requests()) == len(results), "every request reached the upstream exactly once"
    assert len(results) > 300, statuses
    assert not vm_failures_in_log(envoy)
    assert "invalid configuration" not in envoy.plugin_log()
    assert "could not take over" not in envoy.plugin_log()


# --------------------------------------------------------------------------- corrupt shared data

CORRUPT_WRITER = Path(os.environ.get(
    "AKF_CORRUPT_WRITER_WASM", REPO / "target/corrupt-writer/wasm32-wasip1/release/corrupt_writer.wasm"))
TRIGGER = "x-corrupt-shared-state"
REASONS = {
    "garbage": "not an ai-key-failover state entry",
    "old-version": "unknown state version 1",
    "bad-checksum": "checksum mismatch",
    "huge-count": "length does not match key count",
    "short": "entry too short",
}


def with_corrupt_writer(mock_port: int, plugin_config: dict, writer_config: dict | None = None) -> dict:
    """The usual bootstrap with test/corrupt-writer as the first HTTP filter: same vm_id as the
    plugin (so the same shared data), its own code and root_id (so its own VMs)."""
    if not CORRUPT_WRITER.is_file():
        raise HarnessError(f"corrupt-writer not built: {CORRUPT_WRITER} (run `make corrupt-writer`)")
    boot = envoy_config(upstream_port=mock_port, plugin_config=plugin_config)
    writer = wasm_filter(json.dumps(writer_config or {}), CORRUPT_WRITER,
                         {"name": "corrupt-writer", "root_id": "corrupt-writer"})
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, writer)
    return boot


def shared_state(envoy, mode: str = "dump") -> list[tuple[str, bytes]]:
    """Through the corrupt-writer: (pool id, state bytes before the change) for each pool."""
    r = envoy.request("GET", "/", headers={TRIGGER: mode})
    assert r.status == 200, r
    out = []
    for line in r.text.splitlines():
        pool_id, _, hexed = line.partition(" ")
        out.append((pool_id, bytes.fromhex(hexed.split()[0]) if hexed.strip() else b""))
    return out


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def decodes(entry: bytes, n_keys: int) -> bool:
    """The plugin's state layout (src/core/schema.rs): AKF, version 3, written_at, count, records, FNV-1a."""
    return (len(entry) == 16 + 41 * n_keys + 4 and entry[:4] == b"AKF\x03"
            and struct.unpack_from("<I", entry, 12)[0] == n_keys
            and struct.unpack_from("<I", entry, len(entry) - 4)[0] == fnv1a32(entry[:-4]))


@pytest.mark.wasm_only("corrupt-writer is a wasm filter that damages proxy shared data; the native state is in the module\'s memory, out of any other filter\'s reach")
@pytest.mark.parametrize("mode", list(REASONS))
def test_a_corrupt_state_entry_is_replaced_by_fresh_state_with_a_warning(envoy_factory, mock, mode):
    mock.set_keys({"keys": {A: {}, B: {"script": [{"status": 503}]}, C: {}}})
    cfg = {"name": POOL, "apiTokens": KEYS, "failover": {"cooldownDuration": 1000}}
    envoy = envoy_factory.start(cfg, raw_config=with_corrupt_writer(mock.port, cfg), concurrency=2)
    baseline = wasm_stats(envoy)
    with envoy.client() as c:
        assert [c.chat().status for _ in range(6)].count(503) == 1
    envoy.wait_log(r"key bravo marked down", plugin_only=True)
    [(pool_id, before)] = shared_state(envoy)
    assert decodes(before, 3), before.hex()

    assert pool_stats(envoy, POOL)["state_decode_failed"] == 0
    # Damage it; every worker re-reads it (the epoch moved) and must cope.
    [(_, still_good)] = shared_state(envoy, mode)
    assert decodes(still_good, 3)
    [(_, damaged)] = shared_state(envoy)
    assert not decodes(damaged, 3)
    with envoy.client() as c:
        assert [c.chat().status for _ in range(8)] == [200] * 8
    warning = envoy.wait_log(
        rf"shared state entry ai-key-failover/v3/{pool_id}/state could not be decoded \(([^)]*)\); "
        r"starting from fresh state", plugin_only=True)
    assert warning.group(1) == REASONS[mode]
    assert envoy.plugin_log().count("could not be decoded") <= 3, "at most one warning per VM, not one per request"
    # Every read of the bad entry is counted (each worker read it at least once), not only logged.
    wait_pool_stats(envoy, POOL, lambda s: s.get("state_decode_failed", 0) >= 1, what="state_decode_failed counted")

    # The state works again: a key goes down, the entry is rewritten whole, the key comes back.
    marks = envoy.plugin_log().count("key alpha marked down")
    mock.script(A, [{"status": 503}])
    with envoy.client() as c:
        for _ in range(4):
            c.chat()
    wait_for(lambda: envoy.plugin_log(settle=0).count("key alpha marked down") == marks + 1, 3,
             what="alpha marked down after the corruption")
    [(_, rewritten)] = shared_state(envoy)
    assert decodes(rewritten, 3), rewritten.hex()
    with envoy.client() as c:
        def served_then_log() -> str:
            assert c.chat().status == 200
            return envoy.plugin_log(settle=0)

        # 1 s time out plus jitter, then the probe of the next request: 6 s is the slack of a
        # loaded machine.
        until(served_then_log, lambda log: "key alpha restored" in log, 6, interval=0.1, what="alpha restored")
    s = wait_pool_stats(envoy, POOL, lambda s: s.get("keys_available") == 3)
    assert s["cas_gave_up"] == 0
    assert_vm_healthy(envoy, baseline)


@pytest.mark.wasm_only("corrupt-writer is a wasm filter that damages proxy shared data; the native state is in the module\'s memory, out of any other filter\'s reach")
def test_corruption_in_the_middle_of_load_loses_no_request(envoy_factory, mock):
    # bravo keeps hitting its limit, so workers are writing the state when it gets damaged.
    mock.set_keys({"keys": {A: {}, B: {"limit": 20, "windowMs": 1000}, C: {}}})
    cfg = {"name": POOL, "apiTokens": KEYS, "failover": {"cooldownDuration": 1000}}
    boot = with_corrupt_writer(mock.port, cfg, {"corruptAfterMs": 2500, "mode": "garbage"})
    envoy = envoy_factory.start(cfg, raw_config=boot, concurrency=4)
    baseline = wasm_stats(envoy)
    with BackgroundChats(envoy, threads=8, keep_alive=True) as load:
        envoy.wait_log(r"corrupt-writer: timed 'garbage' corruption: [0-9a-f]{16} 414b4603", timeout=10)
        n = len(load.results)
        until(lambda: len(load.results), lambda m: m > n + 100, 10, interval=0.1,
              what="100 more answers: load went on after the corruption")
    results, errors = load.results, load.errors
    assert not errors, errors[:5]
    assert all(up for _, up in results)
    assert {s for s, _ in results} <= {200, 429}, Counter(results)
    envoy.wait_log(r"could not be decoded \(not an ai-key-failover state entry\); starting from fresh state",
                   plugin_only=True)
    assert envoy.chat().status in (200, 429)
    assert_vm_healthy(envoy, baseline)
