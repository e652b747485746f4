//! The proxy-wasm host: Envoy's and Higress's wasm filter over [`crate::core`].
//!
//! `header_map` and `callout` are pure (the ABI's header-map bytes, and the plugin's own
//! `dispatch_http_call` bookkeeping) and build everywhere so `cargo test` covers them; `hostcalls`
//! (the ABI imports, every `unsafe`), `host` (the host calls without the SDK's panics) and
//! `filter` (the Envoy contexts) build only for `wasm32`.

pub mod callout;
pub mod header_map;

#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod host;
// The ABI imports: the one place of the wasm host that may call the host raw.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod hostcalls;
