"""The built module's entry points are the plugin's, not the SDK's, and no callback or answer
can trap the VM; and the build step that swaps them in (scripts/wasm-export-swap.py).

The SDK's dispatcher panics on a context id it does not know, and its
`proxy_on_http_call_response` on a token it did not register; a panic traps the VM (every
request through it then fails). The plugin exports its own entry points under those names
(src/wasm/exports.rs) and issues its calls itself (src/wasm/callout.rs): a callback for an
unknown context does nothing, and an answer nobody waits for is dropped.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import pytest

from harness import REPO, WASM_PATH

# These run the built .wasm in Node.js's V8 with a fake proxy-wasm host, whatever AKF_HOST says.
pytestmark = pytest.mark.wasm_only(
    "the built wasm module in Node.js with a fake proxy-wasm host (its callout bookkeeping and "
    "scripts/wasm-export-swap.py)")

SWAP_SCRIPT = REPO / "scripts/wasm-export-swap.py"
_spec = importlib.util.spec_from_file_location("wasm_export_swap", SWAP_SCRIPT)
swap_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(swap_mod)

FAKE_HOST = REPO / "test/e2e/fake_host.js"
ONE, TWO = "sk-test-one-0001", "sk-test-two-0002"
# A downstream request with retryOnFailure whose first answer is a 429 from the upstream: the
# plugin re-sends it with the other key through proxy_http_call.
RETRY = {
    "plugin_config": {"apiTokens": [ONE, TWO], "retryOnFailure": {"enabled": True}},
    "properties": {"xds.cluster_name": "mock_provider", "response.code_details": "via_upstream"},
    "request_headers": [[":method", "POST"], [":path", "/v1/chat/completions"], [":authority", "api"]],
    "response_headers": [[":status", "429"]],
    "call_response_headers": [[":status", "200"], ["x-envoy-upstream-service-time", "3"]],
}
CONTINUE, PAUSE = 0, 1


def _node() -> str:
    node = shutil.which("node")
    assert node, "these tests run the module in Node.js's V8: install nodejs"
    return node


def run_module(tmp_path, scenario: dict, steps: list[str]) -> dict:
    """Runs the built module's callbacks in the fake host; returns what it reports."""
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps({**scenario, "steps": steps}))
    run = subprocess.run([_node(), str(FAKE_HOST), str(WASM_PATH), str(path)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for text in report["logs"]:
        assert ONE not in text and TWO not in text, "a log line shows a key"
    return report


def test_the_built_module_exports_its_own_answer_handler_and_only_the_listed_callbacks():
    module = WASM_PATH.read_bytes()
    names = {name for name, _, _ in swap_mod.exports(module)}
    listed = {node["export"] for node in json.loads((REPO / "scripts/wasm-exports.json").read_text()) if "export" in node}
    assert names == listed
    assert "proxy_on_http_call_response" in names
    assert "ai_key_failover_on_http_call_response" not in names, "the swap ran"


def test_every_entry_point_is_the_plugins_own():
    """The build gives the plugin's entry points (src/wasm/exports.rs) the ABI's names; none is
    left under its own name, and the SDK's dispatcher is gone with the names it had."""
    names = {name for name, _, _ in swap_mod.exports(WASM_PATH.read_bytes())}
    assert not {n for n in names if n.startswith("ai_key_failover_on_")}, names
    assert {"proxy_on_context_create", "proxy_on_request_headers", "proxy_on_delete", "proxy_on_tick"} <= names


def test_a_callback_for_a_context_the_host_never_created_does_not_trap_the_vm(tmp_path):
    """The SDK's dispatcher panics ("invalid context_id") on each of these."""
    stray = ["stray_request_headers", "stray_request_body", "stray_response_headers", "stray_response_body",
             "stray_delete", "stray_tick", "stray_configure", "orphan_request"]
    report = run_module(tmp_path, RETRY, ["start", *stray, "request", "response"])
    assert report["results"] == [
        ["start", 1],
        ["stray_request_headers", CONTINUE], ["stray_request_body", CONTINUE],
        ["stray_response_headers", CONTINUE], ["stray_response_body", CONTINUE],
        ["stray_delete", None], ["stray_tick", None], ["stray_configure", 0], ["orphan_request", CONTINUE],
        # The real request after them is served as ever: its 429 is re-sent with the other key.
        ["request", CONTINUE], ["response", PAUSE],
    ], report


def test_an_answer_to_a_call_the_plugin_never_made_does_not_trap_the_vm(tmp_path):
    report = run_module(tmp_path, RETRY, ["start", "unknown_answer"])
    # The SDK's handler panics here ("invalid token_id"), which traps as "unreachable".
    assert report["results"] == [["start", 1], ["unknown_answer", None]], report


# NotFound, BadArgument, InvalidMemoryAccess, InternalFailure, Unimplemented, and a code no
# enum knows: the SDK's dispatch_http_call panics on all but BadArgument and InternalFailure.
@pytest.mark.parametrize("status", [1, 2, 6, 10, 12, 99])
def test_a_retry_the_host_refuses_to_send_does_not_trap_the_vm(tmp_path, status):
    report = run_module(tmp_path, {**RETRY, "http_call_status": status}, ["start", "request", "response"])
    assert report["http_calls"] == [{"cluster": "mock_provider", "status": status}]
    # Not sent: the 429 goes on to the client, as for any re-send that cannot be made.
    assert report["results"] == [["start", 1], ["request", CONTINUE], ["response", CONTINUE]], report
    assert report["local_replies"] == []


def test_a_retry_answer_reaches_the_request_that_sent_it(tmp_path):
    report = run_module(tmp_path, {**RETRY, "http_call_status": 0}, ["start", "request", "response", "answer"])
    assert report["results"] == [["start", 1], ["request", CONTINUE], ["response", PAUSE], ["answer", None]], report
    assert report["effective"] == [2], "the answer is handled with the request's context effective"
    assert report["local_replies"] == [200], "the client gets the re-send's answer"


def test_a_retry_answer_for_a_request_that_is_gone_is_dropped(tmp_path):
    report = run_module(tmp_path, {**RETRY, "http_call_status": 0},
                        ["start", "request", "response", "delete_request", "answer"])
    assert [r[1] for r in report["results"]] == [1, CONTINUE, PAUSE, None, None], report
    assert report["local_replies"] == []


# A key taken out by a 503, with health checks on: once it has been out for
# minCooldownDuration, the lease holder's tick sends a check through proxy_http_call.
HEALTH = {
    "plugin_config": {"apiTokens": [ONE, TWO],
                      "failover": {"healthCheckModel": "gpt-4o-mini", "healthCheckCluster": "mock_provider"}},
    "properties": {"xds.cluster_name": "mock_provider", "response.code_details": "via_upstream"},
    "request_headers": [[":method", "POST"], [":path", "/v1/chat/completions"], [":authority", "api"]],
    "response_headers": [[":status", "503"]],
    "advance_ms": 2500,
}


@pytest.mark.parametrize("status", [1, 6, 12, 99])
def test_a_health_check_the_host_refuses_to_send_does_not_trap_the_vm(tmp_path, status):
    steps = ["start", "request", "response", "tick", "advance", "tick", "advance", "tick"]
    report = run_module(tmp_path, {**HEALTH, "http_call_status": status}, steps)
    assert not [r for r in report["results"] if isinstance(r[1], str)], report
    # One check was due (the next one is a healthCheckInterval later), and the ticks after the
    # refusal ran normally.
    assert report["http_calls"] == [{"cluster": "mock_provider", "status": status}], report
    assert any('could not send a health check to cluster "mock_provider"' in line for line in report["logs"])


def test_a_health_check_answer_reaches_the_engine_that_sent_it(tmp_path):
    scenario = {**HEALTH, "http_call_status": 0,
                "call_response_headers": [[":status", "200"], ["x-envoy-upstream-service-time", "3"]]}
    report = run_module(tmp_path, scenario, ["start", "request", "response", "tick", "advance", "tick", "answer"])
    assert not [r for r in report["results"] if isinstance(r[1], str)], report
    assert report["effective"] == [1], "the answer is handled with the root context effective"
    assert any("passed its health check (status 200); back in rotation" in line for line in report["logs"]), report


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
