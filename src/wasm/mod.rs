//! The proxy-wasm host: Envoy's and Higress's wasm filter over [`crate::core`].
//!
//! `header_map`, `callout` and `contexts` are pure (the ABI's header-map bytes, the plugin's own
//! `dispatch_http_call` bookkeeping, and which context an id names) and build everywhere so
//! `cargo test` covers them. `exports` (the ABI's entry points, in place of the SDK's
//! dispatcher), `filter` (the Envoy contexts), `host` (the host calls without the SDK's panics)
//! and `hostcalls` (the ABI imports, every `unsafe`) build only for `wasm32`. Calls go
//! `exports` → `filter` → `host` → `hostcalls`, and from `filter` into the core.

pub mod callout;
pub mod contexts;
pub mod header_map;

#[cfg(target_arch = "wasm32")]
mod exports;
#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod host;
// The ABI imports: the one place of the wasm host that may call the host raw.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod hostcalls;
