//! The pure core: every decision the filter makes, free of any host. A host gives it shared data
//! and stats through `engine::Host` and the time as a number; nothing here calls out.
//!
//! Reading order: `config` (what the operator asked for) → `pool` (one pool's key states and
//! their transitions) → `select` (which key a request gets) → `status` and `hints`, joined in
//! `judge` (what an answer means) → `engine` (one worker's view, tying these together) →
//! `answer` (recording what an upstream answer says) → `retry`, `upstream_attempt` and `health`
//! (what to send next). `schema` (every shared-data entry's name and bytes) and `store` (the
//! cached copy and the CAS loop) keep pool state in the host's shared data; `metrics` names and
//! updates stats.

pub mod affinity;
pub mod answer;
pub mod attempts;
pub mod budget;
pub mod config;
pub mod credentials;
pub mod engine;
pub mod env_keys;
pub mod health;
pub mod hints;
pub mod judge;
pub mod keying;
pub mod metrics;
pub mod pool;
pub mod reply;
pub mod retry;
pub mod rewrite;
pub mod rules;
pub mod schedule;
pub mod schema;
pub mod select;
pub mod status;
pub mod store;
pub mod upstream_attempt;
pub mod waiting;
