"""The built module's answer handler for `dispatch_http_call` is the plugin's, not the SDK's, and
no answer can trap the VM; and the build step that swaps it in (scripts/wasm-export-swap.py).

The SDK's `proxy_on_http_call_response` panics on a token it did not register, and a panic traps
the VM (every request through it then fails). The plugin issues its calls itself and exports its
own handler under that name (see src/callout.rs), which drops an answer nobody waits for.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import pytest

from harness import REPO, WASM_PATH

SWAP_SCRIPT = REPO / "scripts/wasm-export-swap.py"
_spec = importlib.util.spec_from_file_location("wasm_export_swap", SWAP_SCRIPT)
swap_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(swap_mod)

# Runs the module in Node's V8 with every host function stubbed to answer Ok (0), creates a
# root context as Envoy does, then delivers the answer to a call the plugin never made.
NODE_UNKNOWN_ANSWER = r"""
const fs = require("fs");
const mod = new WebAssembly.Module(fs.readFileSync(process.argv[1]));
const logs = [];
let instance;
const imports = {};
for (const imp of WebAssembly.Module.imports(mod)) {
  if (imp.kind !== "function") continue;
  imports[imp.module] = imports[imp.module] || {};
  let stub = () => 0;
  if (imp.name === "proxy_log") {
    stub = (level, ptr, len) => {
      logs.push(Buffer.from(instance.exports.memory.buffer, ptr, len).toString());
      return 0;
    };
  }
  if (imp.name === "proc_exit") stub = (code) => { throw new Error("proc_exit " + code); };
  imports[imp.module][imp.name] = stub;
}
instance = new WebAssembly.Instance(mod, imports);
const e = instance.exports;
e._initialize();
e.proxy_on_context_create(1, 0);
let outcome = "returned";
try {
  e.proxy_on_http_call_response(1, 424242, 0, 0, 0);
} catch (err) {
  outcome = "trapped: " + err.message;
}
console.log(JSON.stringify({outcome, logs}));
"""


def _node() -> str:
    node = shutil.which("node")
    assert node, "these tests run the module in Node.js's V8: install nodejs"
    return node


def test_the_built_module_exports_its_own_answer_handler_and_only_the_listed_callbacks():
    module = WASM_PATH.read_bytes()
    names = {name for name, _, _ in swap_mod.exports(module)}
    listed = {node["export"] for node in json.loads((REPO / "scripts/wasm-exports.json").read_text()) if "export" in node}
    assert names == listed
    assert "proxy_on_http_call_response" in names
    assert "ai_key_failover_on_http_call_response" not in names, "the swap ran"


def test_an_answer_to_a_call_the_plugin_never_made_does_not_trap_the_vm():
    run = subprocess.run([_node(), "-e", NODE_UNKNOWN_ANSWER, str(WASM_PATH)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # The SDK's handler panics here ("invalid token_id"), which traps as "unreachable".
    assert result["outcome"] == "returned", result


def _module(exports: list[tuple[str, int, int]], func_types: list[int]) -> bytes:
    """A minimal valid module: types 0 = (i32) -> () and 1 = (i32, i32) -> (), one function per
    entry of func_types, a memory, and the given exports."""
    uleb = swap_mod._encode_uleb

    def section(section_id: int, body: bytes) -> bytes:
        return bytes([section_id]) + uleb(len(body)) + body

    types = uleb(2) + b"\x60\x01\x7f\x00" + b"\x60\x02\x7f\x7f\x00"
    functions = uleb(len(func_types)) + b"".join(uleb(t) for t in func_types)
    memory = uleb(1) + b"\x00\x01"
    export_body = uleb(len(exports)) + b"".join(
        uleb(len(n.encode())) + n.encode() + bytes([k]) + uleb(i) for n, k, i in exports)
    code = uleb(len(func_types)) + b"".join(b"\x02\x00\x0b" for _ in func_types)
    return (swap_mod.MAGIC + section(1, types) + section(3, functions) + section(5, memory)
            + section(7, export_body) + section(10, code))


def test_the_swap_gives_the_name_to_the_replacement_and_keeps_the_rest(tmp_path):
    src = _module([("sdk_handler", 0, 0), ("memory", 2, 0), ("our_handler", 0, 1), ("other", 0, 2)], [0, 0, 1])
    swapped = swap_mod.swap(src, [("sdk_handler", "our_handler")])
    assert swap_mod.exports(swapped) == [("memory", 2, 0), ("sdk_handler", 0, 1), ("other", 0, 2)]
    # Only the export section changed.
    assert [s for s in swap_mod.sections(swapped) if s[0] != 7] == [s for s in swap_mod.sections(src) if s[0] != 7]
    # Node accepts the result as a module.
    check = "new WebAssembly.Module(require('fs').readFileSync(process.argv[1]))"
    (tmp_path / "out.wasm").write_bytes(swapped)
    assert subprocess.run([_node(), "-e", check, str(tmp_path / "out.wasm")], timeout=60).returncode == 0

    # The command line writes the same, and nothing when the swap is refused.
    (tmp_path / "in.wasm").write_bytes(src)
    cli = [shutil.which("python3") or "python3", str(SWAP_SCRIPT), str(tmp_path / "in.wasm"), str(tmp_path / "cli.wasm")]
    assert subprocess.run(cli + ["sdk_handler=our_handler"], timeout=60).returncode == 0
    assert (tmp_path / "cli.wasm").read_bytes() == swapped
    refused = subprocess.run(cli[:-1] + [str(tmp_path / "no.wasm"), "sdk_handler=missing"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and "exports no 'missing'" in refused.stderr
    assert not (tmp_path / "no.wasm").exists()


@pytest.mark.parametrize("pair, error", [
    (("sdk_handler", "nothing"), "the module exports no 'nothing'"),
    (("nothing", "our_handler"), "the module exports no 'nothing'"),
    (("sdk_handler", "memory"), "export 'memory' is not a function"),
    (("sdk_handler", "other"), "'other' does not have the signature of 'sdk_handler'"),
])
def test_the_swap_is_refused_when_the_module_is_not_as_expected(pair, error):
    src = _module([("sdk_handler", 0, 0), ("memory", 2, 0), ("our_handler", 0, 1), ("other", 0, 2)], [0, 0, 1])
    with pytest.raises(swap_mod.SwapError, match=error):
        swap_mod.swap(src, [pair])
