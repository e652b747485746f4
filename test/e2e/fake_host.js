// A fake proxy-wasm host for the built module, in Node's V8 (test_module.py drives it).
//
//   node fake_host.js MODULE.wasm SCENARIO.json
//
// It plays Envoy's side of the ABI just far enough to run the plugin's callbacks: plugin
// configuration, shared data with Envoy's CAS rules, a clock the scenario moves, request and
// response headers and properties from the scenario, and `proxy_http_call` answering with the
// scenario's status. It prints one
// JSON line: what each step returned (or "trapped: ..." when the VM trapped) and what the
// plugin asked of the host (calls sent, contexts made effective, local replies, log lines).
"use strict";
const fs = require("fs");

const [modulePath, scenarioPath] = process.argv.slice(2);
const scenario = JSON.parse(fs.readFileSync(scenarioPath, "utf8"));
const mod = new WebAssembly.Module(fs.readFileSync(modulePath));
const enc = new TextEncoder();
const dec = new TextDecoder();

const seen = { http_calls: [], effective: [], local_replies: [], logs: [], unexpected_imports: [] };
const live = new Set();
let nextToken = 1;
let instance;

const mem = () => new DataView(instance.exports.memory.buffer);
const bytes = (ptr, len) => new Uint8Array(instance.exports.memory.buffer, ptr, len);
const text = (ptr, len) => dec.decode(bytes(ptr, len).slice());

// Hands the plugin a copy it owns, allocated by its own allocator, as Envoy does.
function give(data, ptrPtr, sizePtr) {
  const ptr = instance.exports.proxy_on_memory_allocate(data.length);
  bytes(ptr, data.length).set(data);
  mem().setUint32(ptrPtr, ptr, true);
  mem().setUint32(sizePtr, data.length, true);
  return 0;
}

function headerMap(pairs) {
  const parts = pairs.map(([n, v]) => [enc.encode(n), enc.encode(v)]);
  const size = 4 + parts.reduce((s, [n, v]) => s + 8 + n.length + v.length + 2, 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  view.setUint32(0, parts.length, true);
  let at = 4;
  for (const [n, v] of parts) {
    view.setUint32(at, n.length, true);
    view.setUint32(at + 4, v.length, true);
    at += 8;
  }
  for (const [n, v] of parts) {
    out.set(n, at);
    at += n.length + 1;
    out.set(v, at);
    at += v.length + 1;
  }
  return out;
}

// Header maps by the ABI's MapType: request 0, response 2, call response 6.
const maps = { 0: scenario.request_headers || [], 2: scenario.response_headers || [], 6: scenario.call_response_headers || [] };
const NOT_FOUND = 1;
const CAS_MISMATCH = 8;
// Shared data with Envoy's CAS rules: cas 0 writes unconditionally, and so does any cas when
// the key does not exist yet.
const shared = new Map();
let nextCas = 1;
// The host clock; the "advance" step moves it on by scenario.advance_ms.
let nowMs = Date.now();

const env = {
  proxy_log(level, ptr, len) { seen.logs.push(text(ptr, len)); return 0; },
  proxy_get_log_level(ret) { mem().setUint32(ret, 2, true); return 0; },
  proxy_get_current_time_nanoseconds(ret) { mem().setBigUint64(ret, BigInt(nowMs) * 1000000n, true); return 0; },
  proxy_set_tick_period_milliseconds() { return 0; },
  proxy_get_buffer_bytes(type, start, max, ptrPtr, sizePtr) {
    if (type === 7) return give(enc.encode(JSON.stringify(scenario.plugin_config)), ptrPtr, sizePtr);
    return NOT_FOUND;
  },
  proxy_get_header_map_value(map, kPtr, kLen, ptrPtr, sizePtr) {
    const name = text(kPtr, kLen);
    const pair = (maps[map] || []).find(([n]) => n === name);
    return pair ? give(enc.encode(pair[1]), ptrPtr, sizePtr) : NOT_FOUND;
  },
  proxy_get_header_map_pairs(map, ptrPtr, sizePtr) { return give(headerMap(maps[map] || []), ptrPtr, sizePtr); },
  proxy_get_property(pPtr, pLen, ptrPtr, sizePtr) {
    const value = (scenario.properties || {})[text(pPtr, pLen).split("\0").join(".")];
    return value === undefined ? NOT_FOUND : give(enc.encode(value), ptrPtr, sizePtr);
  },
  proxy_get_shared_data(kPtr, kLen, ptrPtr, sizePtr, casPtr) {
    const entry = shared.get(text(kPtr, kLen));
    if (!entry) return NOT_FOUND;
    mem().setUint32(casPtr, entry.cas, true);
    return give(entry.value, ptrPtr, sizePtr);
  },
  proxy_set_shared_data(kPtr, kLen, vPtr, vLen, cas) {
    const key = text(kPtr, kLen);
    const entry = shared.get(key);
    if (entry && cas !== 0 && cas !== entry.cas) return CAS_MISMATCH;
    shared.set(key, { value: bytes(vPtr, vLen).slice(), cas: nextCas++ });
    return 0;
  },
  proxy_http_call(cPtr, cLen, hPtr, hLen, bPtr, bLen, tPtr, tLen, timeout, tokenPtr) {
    const status = scenario.http_call_status;
    seen.http_calls.push({ cluster: text(cPtr, cLen), status });
    if (status === 0) mem().setUint32(tokenPtr, nextToken++, true);
    return status;
  },
  proxy_set_effective_context(id) { seen.effective.push(id); return live.has(id) ? 0 : 2; },
  proxy_send_local_response(status) { seen.local_replies.push(status); return 0; },
  proxy_define_metric(type, nPtr, nLen, idPtr) { mem().setUint32(idPtr, 1, true); return 0; },
};

const imports = {};
for (const imp of WebAssembly.Module.imports(mod)) {
  if (imp.kind !== "function") continue;
  imports[imp.module] = imports[imp.module] || {};
  let fn = imp.module === "env" ? env[imp.name] : undefined;
  if (!fn && imp.name === "proc_exit") fn = (code) => { throw new Error("proc_exit " + code); };
  // Every other host function (shared-data writes, stats, header edits, WASI) answers Ok.
  imports[imp.module][imp.name] = fn || (() => 0);
}
instance = new WebAssembly.Instance(mod, imports);
const e = instance.exports;

const results = [];
function step(name, fn) {
  try {
    const value = fn();
    results.push([name, value === undefined ? null : Number(value)]);
    return true;
  } catch (err) {
    results.push([name, "trapped: " + err.message]);
    return false;
  }
}

const ROOT = 1;
const steps = {
  start: () => { e._initialize(); e.proxy_on_context_create(ROOT, 0); live.add(ROOT); return e.proxy_on_configure(ROOT, 0); },
  request: () => { e.proxy_on_context_create(2, ROOT); live.add(2); return e.proxy_on_request_headers(2, 0, 1); },
  response: () => e.proxy_on_response_headers(2, 0, 0),
  answer: () => e.proxy_on_http_call_response(ROOT, 1, 0, 0, 0),
  unknown_answer: () => e.proxy_on_http_call_response(ROOT, 424242, 0, 0, 0),
  delete_request: () => { live.delete(2); return e.proxy_on_delete(2); },
  tick: () => e.proxy_on_tick(ROOT),
  // Callbacks for contexts the host never created (or a request under a root it never created).
  stray_request_headers: () => e.proxy_on_request_headers(999, 0, 1),
  stray_request_body: () => e.proxy_on_request_body(999, 10, 1),
  stray_response_headers: () => e.proxy_on_response_headers(999, 0, 0),
  stray_response_body: () => e.proxy_on_response_body(999, 10, 1),
  stray_delete: () => e.proxy_on_delete(999),
  stray_tick: () => e.proxy_on_tick(998),
  stray_configure: () => e.proxy_on_configure(998, 0),
  orphan_request: () => { e.proxy_on_context_create(3, 998); return e.proxy_on_request_headers(3, 0, 1); },
  advance: () => { nowMs += scenario.advance_ms; },
};
for (const name of scenario.steps) {
  if (!step(name, steps[name])) break;
}
console.log(JSON.stringify({ results, ...seen }));
