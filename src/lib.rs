//! ai-key-failover: a proxy-wasm HTTP filter that holds a pool of upstream API keys, puts one on
//! each request, takes a key out of rotation when the provider answers with a failure, and brings
//! it back when its cooldown has passed. Pool state is shared by every worker through proxy
//! shared data.
//!
//! Everything but `glue` is plain Rust, testable on the host with injected time.

pub mod abi;
pub mod affinity;
pub mod attempts;
pub mod budget;
pub mod callout;
pub mod codec;
pub mod config;
pub mod credentials;
pub mod engine;
pub mod env_keys;
pub mod health;
pub mod hints;
pub mod metrics;
pub mod pool;
pub mod reply;
pub mod resend;
pub mod rewrite;
pub mod rules;
pub mod schedule;
pub mod select;
pub mod status;
pub mod store;
pub mod waiting;

#[cfg(not(target_arch = "wasm32"))]
pub mod native;

#[cfg(target_arch = "wasm32")]
mod glue;
#[cfg(target_arch = "wasm32")]
mod host;
