"""An upgrade under one vm_id while traffic flows: the new build takes over what the previous
build knew, so a key cooling down under the previous build stays out until its cooldown ends.

The previous build (shared-state format 2 under `ai-key-failover/v1/`) is played by
test/corrupt-writer's `as-previous-build` mode: it copies the pool's state, with the cooling key,
into the old layout under the old names and the old registry, and removes this build's registry, so
the next load finds only the old layout to take over from. The old listener's VMs keep their own
entries, as a previous build's VMs would. The new build is the plugin module with one more custom
section appended: other code to Envoy, so an LDS update starts new VMs for it under the same vm_id
(the same shared data), while the old listener's VMs keep serving their draining keep-alive
connections. It comes with a fourth key, so its pool is another pool: a pool the old VMs still
write in this build's names cannot be where its state comes from.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from checks import BackgroundChats, lds_bootstrap, pool_stats
from harness import WASM_PATH, HarnessError, free_port, wait_for, wasm_filter

# Two wasm builds sharing proxy shared data across a hot config swap. The native module has one
# build per process; its state carry-over across config updates is test_reload's.
pytestmark = pytest.mark.wasm_only("an upgrade between two wasm builds under one vm_id")

A, B, C, D = ("sk-upgrade-alpha-Zr42m0001", "sk-upgrade-bravo-Zr42m0002", "sk-upgrade-charlie-Zr42m0003",
              "sk-upgrade-delta-Zr42m0004")
KEYS = [{"token": A, "name": "alpha"}, {"token": B, "name": "bravo"}, {"token": C, "name": "charlie"}]
POOL = "upgrade"
# Long enough for the new module to compile and take over on a loaded 2-core machine.
COOLDOWN_S = 15
CORRUPT_WRITER = Path(__file__).resolve().parents[2] / "target/corrupt-writer/wasm32-wasip1/release/corrupt_writer.wasm"


def leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def next_build(module: Path, dst: Path) -> Path:
    """`module` with a custom section appended: the same behaviour, other code (a new VM) to Envoy."""
    name = b"ai-key-failover-e2e"
    payload = leb128(len(name)) + name + b"the next build"
    dst.write_bytes(module.read_bytes() + b"\x00" + leb128(len(payload)) + payload)
    return dst


def test_a_key_cooling_down_under_the_previous_build_stays_out_through_the_upgrade(envoy_factory, mock, tmp_path):
    if not CORRUPT_WRITER.is_file():
        raise HarnessError(f"corrupt-writer not built: {CORRUPT_WRITER} (run `make corrupt-writer`)")
    mock.set_keys({"keys": {A: {"script": [{"status": 429}]}, B: {}, C: {}, D: {}}})
    cfg = {"name": POOL, "apiTokens": KEYS, "exposeKeyName": True,
           "failover": {"cooldownDuration": COOLDOWN_S * 1000}}
    next_cfg = {**cfg, "apiTokens": KEYS + [{"token": D, "name": "delta"}]}
    writer = wasm_filter("{}", CORRUPT_WRITER, {"name": "corrupt-writer", "root_id": "corrupt-writer"})
    port = free_port()
    bootstrap, swap = lds_bootstrap(tmp_path, mock.port, port, cfg)
    swap(cfg, WASM_PATH, writer)
    envoy = envoy_factory.start(next_cfg, raw_config=bootstrap, concurrency=2)  # every key, for the secret scan
    envoy.port = port

    # Under the "previous build": alpha answers 429 and goes out for COOLDOWN_S.
    with envoy.client() as c:
        for _ in range(6):
            if c.chat().status == 429:
                break
        else:
            raise AssertionError("alpha was never used")
    down_at = time.monotonic()
    envoy.wait_log(r"key alpha marked down", plugin_only=True)
    r = envoy.request("GET", "/", headers={"x-corrupt-shared-state": "as-previous-build"})
    assert r.status == 200 and "write-failed" not in r.text, r.text
    mock.clear()

    cutoff = down_at + COOLDOWN_S - 1  # the cooldown cannot end before this; jitter only adds
    new_module = next_build(WASM_PATH, tmp_path / "next-build.wasm")
    with BackgroundChats(envoy, threads=1, keep_alive=True) as draining, \
            BackgroundChats(envoy, threads=1, keep_alive=False) as fresh:
        swap(next_cfg, new_module)
        carried = envoy.wait_log(r"pool upgrade: kept the state of (\d+) keys", timeout=COOLDOWN_S - 5,
                                 plugin_only=True)
        assert carried.group(1) == "1", carried.group(0)
        assert time.monotonic() < cutoff - 2, "the upgrade took most of the cooldown: raise COOLDOWN_S"
        n = len(fresh.results)
        wait_for(lambda: len(fresh.results) > n + 20, 10, what="traffic through the new build")
        while time.monotonic() < cutoff:
            time.sleep(0.2)
    # The load has stopped, before the cooldown can have ended.
    assert time.monotonic() < down_at + COOLDOWN_S, "stopping the load took too long to judge the cutoff"
    before_cutoff = Counter(mock.keys_received())
    assert before_cutoff[A] == 0, ("the cooling key stayed out through the upgrade", before_cutoff)
    assert min(before_cutoff[k] for k in (B, C, D)) > 10, before_cutoff
    for load in (draining, fresh):
        assert load.results, "traffic flowed on both the draining and the new connections"
        assert not load.errors, load.errors[:5]
        assert {s for s, _ in load.results} == {200}, Counter(load.results)

    # Back once the cooldown (plus up to 10% jitter) has run out.
    wait_for(lambda: envoy.chat().headers.get("x-ai-key-failover-key") == "alpha", COOLDOWN_S * 0.1 + 10,
             what="alpha back after its cooldown")
    assert pool_stats(envoy, POOL)["state_decode_failed"] == 0, "neither build misread the other's entries"
