//! corrupt-writer: a test-only proxy-wasm HTTP filter for ai-key-failover's end-to-end tests.
//!
//! Loaded in the same Envoy with the plugin's `vm_id` (`ai-key-failover`) but its own code and
//! `root_id`, it reaches the plugin's proxy shared data (which Envoy keys by `vm_id`). A request
//! carrying `x-corrupt-shared-state: <mode>` is answered locally by this filter, after it has
//! done the following to every pool listed in the registry `ai-key-failover/v3/pools`:
//!
//! | mode          | the pool's `state` entry becomes                                      |
//! | ------------- | --------------------------------------------------------------------- |
//! | `garbage`     | 64 bytes of noise                                                     |
//! | `old-version` | a well-formed, checksummed entry with version 1 (what an older plugin could have left) |
//! | `bad-checksum`| the current entry with its last byte flipped                          |
//! | `huge-count`  | a checksummed version-3 header claiming 4,000,000,000 keys, and nothing after it |
//! | `short`       | 3 bytes: `AKF`                                                        |
//! | `dump`        | (unchanged: only reported)                                            |
//!
//! and it rewrites each pool's `epoch` entry so every worker re-reads `state`. The reply body is
//! one line per pool: `<pool id as 16 hex> <state bytes before, hex>`; the status is 200, or 404
//! when the registry is empty. Requests without the header pass through untouched.
//!
//! Mode `as-previous-build` makes the registered pools look, to a build loading next, as if only
//! the previous build (format 2, key space `ai-key-failover/v1/`) had written them: each pool's
//! state is copied there as a version-2 entry and listed in the old registry, and the current
//! registry is removed. The pools' own entries are left alone, so the VMs running now keep
//! working on them, as a previous build's VMs keep working on theirs; a configuration with
//! another key list (another pool) then finds only the old layout to take over from.
//!
//! The same can happen once, without a request, `corruptAfterMs` ms after start (a tick), when the
//! filter's configuration is `{"corruptAfterMs": 2000, "mode": "garbage"}`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, Status};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const REGISTRY_KEY: &str = "ai-key-failover/v3/pools";
const KEY_SPACE: &str = "ai-key-failover/v3";
const PREVIOUS_REGISTRY_KEY: &str = "ai-key-failover/v1/pools";
const PREVIOUS_KEY_SPACE: &str = "ai-key-failover/v1";
const PREVIOUS_VERSION: u8 = 2;
const TRIGGER_HEADER: &str = "x-corrupt-shared-state";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    /// (when, mode) of a timed corruption that has not happened yet.
    pending: Option<(SystemTime, String)>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if let Some(after) = json_number(&text, "corruptAfterMs") {
            let mode = json_string(&text, "mode").unwrap_or_else(|| "garbage".to_string());
            self.pending = Some((now() + Duration::from_millis(after), mode));
            let _ = hostcalls::set_tick_period(Duration::from_millis(100));
        }
        true
    }

    fn on_tick(&mut self) {
        if let Some((when, mode)) = self.pending.clone() {
            if now() >= when {
                self.pending = None;
                let _ = hostcalls::set_tick_period(Duration::ZERO);
                let report = corrupt_all(&mode);
                warn(&format!(
                    "corrupt-writer: timed '{mode}' corruption: {}",
                    report.replace('\n', "; ")
                ));
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request;

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let Ok(Some(mode)) = hostcalls::get_map_value_bytes(
            proxy_wasm::types::MapType::HttpRequestHeaders,
            TRIGGER_HEADER,
        ) else {
            return Action::Continue;
        };
        let mode = String::from_utf8_lossy(&mode).into_owned();
        let report = corrupt_all(&mode);
        let status = if report.is_empty() { 404 } else { 200 };
        warn(&format!(
            "corrupt-writer: '{mode}' corruption: {}",
            report.replace('\n', "; ")
        ));
        self.send_http_response(
            status,
            vec![("content-type", "text/plain")],
            Some(report.as_bytes()),
        );
        Action::Pause
    }
}

fn warn(message: &str) {
    let _ = hostcalls::log(LogLevel::Warn, message);
}

fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(UNIX_EPOCH)
}

fn get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

fn set(key: &str, value: &[u8]) -> Result<(), Status> {
    hostcalls::set_shared_data(key, Some(value), None)
}

/// What Envoy's `remove_shared_data` does: the entry stays, empty.
fn remove(key: &str) -> Result<(), Status> {
    hostcalls::set_shared_data(key, None, None)
}

/// The plugin's checksum (src/core/codec.rs): FNV-1a over everything before it, appended.
fn signed(mut body: Vec<u8>) -> Vec<u8> {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in &body {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    body.extend_from_slice(&hash.to_le_bytes());
    body
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn damaged(mode: &str, current: &[u8], pool_id: u64) -> Option<Vec<u8>> {
    let mut noise = Vec::with_capacity(64);
    let mut x = pool_id ^ 0x9e37_79b9_7f4a_7c15;
    for _ in 0..64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.push((x >> 24) as u8);
    }
    match mode {
        "garbage" => Some(noise),
        "old-version" => {
            // magic, version 1, written_at, count 1, one record of the old size, checksum
            let mut v = b"AKF\x01".to_vec();
            v.extend_from_slice(&1_700_000_000_000u64.to_le_bytes());
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&noise[..33]);
            Some(signed(v))
        }
        "bad-checksum" => {
            let mut v = current.to_vec();
            match v.last_mut() {
                Some(last) => *last ^= 0xff,
                None => v = noise,
            }
            Some(v)
        }
        "huge-count" => {
            let mut v = b"AKF\x03".to_vec();
            v.extend_from_slice(&1_700_000_000_000u64.to_le_bytes());
            v.extend_from_slice(&4_000_000_000u32.to_le_bytes());
            Some(signed(v))
        }
        "short" => Some(b"AKF".to_vec()),
        _ => None, // "dump" and anything unknown: report only
    }
}

/// Damages every registered pool's state as `mode` says; returns one report line per pool.
fn corrupt_all(mode: &str) -> String {
    if mode == "as-previous-build" {
        return as_previous_build();
    }
    let (registry, _) = get(REGISTRY_KEY);
    let registry = registry.unwrap_or_default();
    let mut lines = Vec::new();
    for chunk in registry.chunks_exact(8) {
        let mut id = [0u8; 8];
        id.copy_from_slice(chunk);
        let pool_id = u64::from_le_bytes(id);
        let prefix = format!("{KEY_SPACE}/{pool_id:016x}");
        let state_key = format!("{prefix}/state");
        let (current, _) = get(&state_key);
        let current = current.unwrap_or_default();
        let mut line = format!("{pool_id:016x} {}", hex(&current));
        if let Some(bad) = damaged(mode, &current, pool_id) {
            let ok_state = set(&state_key, &bad).is_ok();
            let ok_epoch = set(&format!("{prefix}/epoch"), &[7]).is_ok();
            if !(ok_state && ok_epoch) {
                line.push_str(" write-failed");
            }
        }
        lines.push(line);
    }
    lines.join("\n")
}

/// Moves every registered pool's state into the previous build's layout and key space.
fn as_previous_build() -> String {
    let (registry, _) = get(REGISTRY_KEY);
    let registry = registry.unwrap_or_default();
    let mut lines = Vec::new();
    for chunk in registry.chunks_exact(8) {
        let mut id = [0u8; 8];
        id.copy_from_slice(chunk);
        let pool_id = u64::from_le_bytes(id);
        let state_key = format!("{KEY_SPACE}/{pool_id:016x}/state");
        let (current, _) = get(&state_key);
        let current = current.unwrap_or_default();
        let mut line = format!("{pool_id:016x} {}", hex(&current));
        // Same record layout; only the version byte and so the checksum differ.
        let ok = if current.len() > 8 && current.starts_with(b"AKF") {
            let mut old = current[..current.len() - 4].to_vec();
            old[3] = PREVIOUS_VERSION;
            set(
                &format!("{PREVIOUS_KEY_SPACE}/{pool_id:016x}/state"),
                &signed(old),
            )
            .is_ok()
        } else {
            false
        };
        if !ok {
            line.push_str(" write-failed");
        }
        lines.push(line);
    }
    let moved = set(PREVIOUS_REGISTRY_KEY, &registry).is_ok() && remove(REGISTRY_KEY).is_ok();
    if !moved {
        lines.push("registry write-failed".to_string());
    }
    lines.join("\n")
}

/// The number after `"name":` in a flat JSON object (enough for this filter's own config).
fn json_number(text: &str, name: &str) -> Option<u64> {
    let rest = &text[text.find(&format!("\"{name}\""))? + name.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The string after `"name":` in a flat JSON object (no escapes).
fn json_string(text: &str, name: &str) -> Option<String> {
    let rest = &text[text.find(&format!("\"{name}\""))? + name.len() + 2..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}
