//! The proxy-wasm host: Envoy's and Higress's wasm filter over [`crate::core`].
//!
//! `header_map` and `callout` are pure (the ABI's header-map bytes, and the plugin's own
//! `dispatch_http_call` bookkeeping) and build everywhere so `cargo test` covers them; `host`
//! (the host calls) and `filter` (the Envoy contexts) build only for `wasm32`.

pub mod callout;
pub mod header_map;

#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod host;
