//! ai-key-failover: an HTTP filter for Envoy and Higress that holds a pool of upstream API keys,
//! puts one on each request, takes a key out of rotation when the provider answers with a
//! failure, and brings it back when its cooldown has passed or a health check says it is well.
//!
//! - [`core`]: everything that decides: configuration, the pool state machine, key selection,
//!   failure classification and retry hints, `_rules_`, the shared-state schema and CAS store,
//!   metrics bookkeeping, retry and health-check planning. Plain Rust with injected time and an
//!   injected host (`core::engine::Host`), tested on the build machine.
//! - [`wasm`]: the proxy-wasm host (Envoy and Higress, `wasm32-wasip1`).
//! - [`native`]: the Envoy dynamic-module host (stock Envoy, `--features native`).
//!
//! Calls go from a host into `core`, never back: `core` names no host, and each host only moves
//! bytes between Envoy and the core's decisions.

// Raw host calls are confined to `wasm::hostcalls` and `native::abi`, which allow it.
#![deny(unsafe_code)]

pub mod core;
pub mod wasm;

#[cfg(not(target_arch = "wasm32"))]
pub mod native;
