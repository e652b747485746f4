//! The plugin's JSON configuration: the model every other part of the core reads (the types
//! below, with their defaults and bounds), built from JSON by [`parse`].
//!
//! - `parse`: JSON → model, field by field; every error names the exact field
//!   (`_rules_[1].failover.cooldownDuration`) and says how to fix it.
//! - `keys`: the `apiTokens` entries → validated keys with labels unique in their pool.
//! - `fields`: the small typed readers (`integer`, `boolean`, `one_of`, ...) the parser is made of.
//!
//! No error or warning ever contains a configured key.

use std::fmt;

use crate::core::rules::Matcher;
use crate::core::select::{OnAllUnavailable, Selection};
use crate::core::status::StatusSet;

mod fields;
mod keys;
mod parse;

pub use parse::{parse, parse_with_env};

pub const MAX_KEYS_PER_POOL: usize = 10_000;
/// 30 days: longer than any provider window; beyond it a typo is likelier than intent.
const MAX_DURATION_MS: u64 = 30 * 24 * 3600 * 1000;

// Defaults and bounds of the fields, by the type that holds them. The README's field table
// states the same numbers.

/// `provider`, `selection`, `onAllUnavailable`, `exposeKeyName` when not set.
const DEFAULT_PROVIDER: Provider = Provider::OpenAi;
const DEFAULT_SELECTION: Selection = Selection::RoundRobin;
const DEFAULT_ON_ALL_UNAVAILABLE: OnAllUnavailable = OnAllUnavailable::Earliest;
/// What the configuration calls each choice of `provider`, `selection`, `onAllUnavailable`.
const PROVIDER_NAMES: [(&str, Provider); 4] = [
    ("openai", Provider::OpenAi),
    ("azure", Provider::Azure),
    ("anthropic", Provider::Anthropic),
    ("gemini", Provider::Gemini),
];
const SELECTION_NAMES: [(&str, Selection); 3] = [
    ("round_robin", Selection::RoundRobin),
    ("random", Selection::Random),
    ("weighted", Selection::Weighted),
];
const ON_ALL_UNAVAILABLE_NAMES: [(&str, OnAllUnavailable); 3] = [
    ("earliest", OnAllUnavailable::Earliest),
    ("reject", OnAllUnavailable::Reject),
    ("wait", OnAllUnavailable::Wait),
];
const DEFAULT_EXPOSE_KEY_NAME: bool = false;
/// `maxWaitMs`'s default and bound: a held request keeps its client waiting.
pub const MAX_WAIT_DEFAULT_MS: u64 = 2_000;
const MAX_WAIT_LIMIT_MS: u64 = 30_000;

/// `failover`: on, one failure takes a key out for a minute, doubling up to ten minutes; a
/// refused key stays out for an hour.
const DEFAULT_FAILOVER_ENABLED: bool = true;
const DEFAULT_FAILURE_THRESHOLD: u64 = 1;
const MAX_FAILURE_THRESHOLD: u64 = 1_000;
const DEFAULT_COOLDOWN_MS: u64 = 60_000;
const DEFAULT_MAX_COOLDOWN_MS: u64 = 600_000;
/// `minCooldownDuration` when neither it nor a shorter `cooldownDuration` is set.
const DEFAULT_MIN_COOLDOWN_MS: u64 = 1_000;
const DEFAULT_DISABLE_MS: u64 = 3_600_000;
const DEFAULT_RESPECT_RETRY_AFTER: bool = true;
/// `cooldownBackoff` 2, in thousandths.
const DEFAULT_BACKOFF_PERMILLE: u32 = 2_000;
const DEFAULT_FAILOVER_ON_STATUS: [&str; 2] = ["429", "5xx"];
const DEFAULT_DISABLE_ON_STATUS: [&str; 3] = ["401", "402", "403"];
/// `failover.preemptiveCooldown`'s default, chosen by `make bench` (see the README).
pub const PREEMPTIVE_COOLDOWN_DEFAULT: bool = false;

/// Health checks (`healthCheckModel` set): every 5 s, 5 s timeout, one success brings a key back.
const DEFAULT_HEALTH_CHECK_INTERVAL_MS: u64 = 5_000;
const DEFAULT_HEALTH_CHECK_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_SUCCESS_THRESHOLD: u64 = 1;
const MAX_SUCCESS_THRESHOLD: u64 = 1_000;

/// `retryOnFailure`: off; when on, one re-send of a 429 or 5xx within 30 s.
const DEFAULT_RETRY_ENABLED: bool = false;
const DEFAULT_MAX_RETRIES: u64 = 1;
const MAX_RETRIES_LIMIT: u64 = 10;
const DEFAULT_RETRY_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_RETRY_ON_STATUS: [&str; 2] = ["429", "5xx"];
/// `retryOnFailure.maxBodyBytes`: a VM's linear memory never shrinks, and one worker can hold
/// hundreds of requests at once, each with its own copy. 256 KiB is a chat request of about
/// 60,000 tokens of text; 200 such requests in flight on one worker keep at most 50 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 256 * 1024;
const MAX_BODY_BYTES_LIMIT: u64 = 256 * 1024 * 1024;

/// Why a configuration was refused: `field` is its path (`_rules_[0].failover.cooldownDuration`;
/// empty for the document as a whole), `message` what it must be. Shown as `field: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
}

impl Provider {
    /// The header the provider reads its key from: the default of `authHeader`.
    fn auth_header(self) -> AuthHeader {
        let (name, prefix) = match self {
            Provider::OpenAi => ("authorization", "Bearer "),
            Provider::Azure => ("api-key", ""),
            Provider::Anthropic => ("x-api-key", ""),
            Provider::Gemini => ("x-goog-api-key", ""),
        };
        AuthHeader {
            name: name.to_string(),
            prefix: prefix.to_string(),
        }
    }
}

/// Where the key goes on the upstream request: `<name>: <prefix><key>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthHeader {
    pub name: String,
    pub prefix: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyConfig {
    pub token: String,
    pub name: Option<String>,
    pub weight: u32,
    pub fingerprint: u64,
    /// How logs and stats name the key, unique in its pool (see `keys::unique_labels`).
    label: String,
}

impl KeyConfig {
    /// How logs and metrics name the key: its configured name, else a short hash.
    pub fn label(&self) -> String {
        self.label.clone()
    }
}

/// How logs and stats name an unnamed key or pool: `key-` or `pool-` and the top 32 bits of its
/// fingerprint, never the key.
pub fn short_hash(kind: &str, fingerprint: u64) -> String {
    format!("{kind}-{:08x}", fingerprint >> 32)
}

/// FNV-1a, 64 bits: a key's fingerprint (how shared state matches records to keys) and, over the
/// sorted fingerprints, a pool's id.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    pub enabled: bool,
    pub failure_threshold: u32,
    pub failover_on_status: StatusSet,
    pub disable_on_status: StatusSet,
    pub cooldown_ms: u64,
    pub disable_ms: u64,
    pub respect_retry_after: bool,
    pub min_cooldown_ms: u64,
    pub max_cooldown_ms: u64,
    /// `cooldownBackoff` in thousandths (2 = 2000).
    pub backoff_permille: u32,
    /// Active health checks, when `healthCheckModel` is set.
    pub health_check: Option<HealthCheck>,
    /// A success that says the key's budget is used up rests the key until the reset.
    pub preemptive_cooldown: bool,
}

/// Higress ai-proxy's active health checks: a minimal real request with each down key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub model: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub success_threshold: u32,
    /// None: the provider's usual path (see `health::default_path`).
    pub path: Option<String>,
    /// None: the cluster that served the pool's traffic, learned from live requests.
    pub cluster: Option<String>,
    /// None: the `:authority` of the pool's live traffic, else the cluster name.
    pub authority: Option<String>,
}

impl Failover {
    pub fn policy(&self) -> crate::core::pool::Policy {
        crate::core::pool::Policy {
            failure_threshold: self.failure_threshold,
            cooldown_ms: self.cooldown_ms,
            backoff_permille: self.backoff_permille,
            min_cooldown_ms: self.min_cooldown_ms,
            max_cooldown_ms: self.max_cooldown_ms,
            disable_ms: self.disable_ms,
        }
    }
}

/// One pool: a distinct list of keys with its own shared state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolKeys {
    /// Stable across key reordering; names the pool's shared-data entries.
    pub id: u64,
    pub label: String,
    pub keys: Vec<KeyConfig>,
}

impl PoolKeys {
    pub fn fingerprints(&self) -> Vec<u64> {
        self.keys.iter().map(|k| k.fingerprint).collect()
    }
    pub fn weights(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.weight).collect()
    }
}

/// Everything that decides how one request is handled: the global part or one rule, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub pool: usize,
    pub provider: Provider,
    pub auth: AuthHeader,
    pub selection: Selection,
    pub failover: Failover,
    pub on_all_unavailable: OnAllUnavailable,
    /// Adds `x-ai-key-failover-key: <key name or hash>` to responses.
    pub expose_key_name: bool,
    pub retry: RetryOnFailure,
    /// Profiles of the fallback pools, in order (empty for a fallback itself).
    pub fallbacks: Vec<usize>,
    /// For a fallback: the `model` its requests are rewritten to.
    pub model: Option<String>,
    /// For a fallback: the cluster that reaches its provider, when set.
    pub cluster: Option<String>,
    /// `affinity.header`, lowercase: requests with the same value get the same key.
    pub affinity_header: Option<String>,
    /// `maxWaitMs`: how long `onAllUnavailable: wait` holds a request.
    pub max_wait_ms: u64,
}

/// Higress ai-proxy's `retryOnFailure`: the plugin itself re-sends a failed request with another
/// key (downstream mode; in upstream mode Envoy's own retries do this).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryOnFailure {
    pub enabled: bool,
    pub max_retries: u32,
    pub timeout_ms: u64,
    pub on_status: StatusSet,
    pub max_body_bytes: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub matcher: Matcher,
    pub profile: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginConfig {
    pub pools: Vec<PoolKeys>,
    pub profiles: Vec<Profile>,
    /// The profile for requests no rule matches; `None` leaves them untouched.
    pub global: Option<usize>,
    pub rules: Vec<Rule>,
    /// Things worth a warning at load that are not errors.
    pub warnings: Vec<String>,
    /// Some profile has fallbacks: the pool header then means something to routes.
    pub has_fallbacks: bool,
}

impl PluginConfig {
    /// What every host logs once a configuration has loaded: its warnings, then `summary`.
    pub fn log_loaded(&self) {
        for warning in &self.warnings {
            log::warn!("{warning}");
        }
        log::info!("{}", self.summary());
    }

    /// The pools by label (never a key) with their sizes, and how many rules there are.
    pub fn summary(&self) -> String {
        let pools: Vec<String> = self
            .pools
            .iter()
            .map(|p| format!("{} ({} keys)", p.label, p.keys.len()))
            .collect();
        format!(
            "configured pools {}; {} rules",
            pools.join(", "),
            self.rules.len()
        )
    }
}

/// What the tests of every part of `config` start from: a config that loads, one that is refused,
/// and a table of refused configs with the field and the words each error must have.
#[cfg(test)]
mod testing {
    use super::*;

    pub(super) fn ok(json: &str) -> PluginConfig {
        parse(json.as_bytes()).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    pub(super) fn fails(json: &str) -> ConfigError {
        match parse(json.as_bytes()) {
            Ok(_) => panic!("accepted: {json}"),
            Err(e) => e,
        }
    }

    /// Each `(json, field, needle)`: refused, naming exactly `field`, with `needle` in the message.
    pub(super) fn assert_refused(table: &[(&str, &str, &str)]) {
        for (json, field, needle) in table {
            let e = fails(json);
            assert_eq!(e.field, *field, "{json}: {e}");
            assert!(
                e.message.contains(needle),
                "{json}: {e} (wanted {needle:?})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::ok;

    #[test]
    fn the_summary_names_each_pool_by_label_with_its_size_and_counts_the_rules() {
        let config = ok(r#"{"name": "main", "apiTokens": ["sk-a", "sk-b"],
            "_rules_": [{"_match_route_": ["r"], "name": "emb", "apiTokens": ["sk-c"]}]}"#);
        assert_eq!(
            config.summary(),
            "configured pools main (2 keys), emb (1 keys); 1 rules"
        );
        assert!(!config.summary().contains("sk-"), "no key in the line");
    }
}
