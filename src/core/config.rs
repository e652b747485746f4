//! The plugin's JSON configuration: parsing, validation and defaults.
//!
//! Hand-walked rather than derived so that every error names the exact field (`_rules_[1].failover.
//! cooldownDuration`) and says how to fix it, unknown fields are refused, and keys starting with
//! `_` (Higress's) pass. No error or warning ever contains a configured key.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::core::env_keys::{self, EnvLookup};
use crate::core::rules::{DomainPattern, Matcher};
use crate::core::select::{OnAllUnavailable, Selection};
use crate::core::status::{shadowed_codes, StatusPattern};

pub const MAX_KEYS_PER_POOL: usize = 10_000;
const MAX_TOKEN_LEN: usize = 4096;
const MAX_WEIGHT: u64 = 1000;
/// 30 days: longer than any provider window; beyond it a typo is likelier than intent.
const MAX_DURATION_MS: u64 = 30 * 24 * 3600 * 1000;
/// `minCooldownDuration` when neither it nor a shorter `cooldownDuration` is set.
const DEFAULT_MIN_COOLDOWN_MS: u64 = 1_000;
/// `retryOnFailure.maxBodyBytes`: a VM's linear memory never shrinks, and one worker can hold
/// hundreds of requests at once, each with its own copy. 256 KiB is a chat request of about
/// 60,000 tokens of text; 200 such requests in flight on one worker keep at most 50 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 256 * 1024;

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

fn err<T>(field: &str, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.to_string(),
        message: message.into(),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
}

impl Provider {
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
    /// How logs and stats name the key, unique in its pool (see `unique_labels`).
    label: String,
}

impl KeyConfig {
    /// How logs and metrics name the key: its configured name, else a short hash.
    pub fn label(&self) -> String {
        self.label.clone()
    }
}

pub fn short_hash(kind: &str, fingerprint: u64) -> String {
    format!("{kind}-{:08x}", fingerprint >> 32)
}

/// The whole fingerprint: the label of an unnamed key whose short hash another key's label
/// already has.
fn long_hash(kind: &str, fingerprint: u64) -> String {
    format!("{kind}-{fingerprint:016x}")
}

/// Gives every key of a pool a label no other key of the pool has, so no two keys share a log
/// name or a stat. A short hash is 32 bits: among 10,000 keys two share one with a chance of about
/// 1 in 90, and a configured name may look like a short hash. Names are kept as configured (they
/// are unique already); an unnamed key whose short hash is taken, or shared, gets the whole 64-bit
/// fingerprint instead, and a numeric suffix should even that be taken. Deterministic: the same
/// key list always gets the same labels. O(n) with a hash set.
fn unique_labels(keys: &mut [KeyConfig], short: impl Fn(u64) -> String) {
    use std::collections::HashSet;
    let mut short_count: HashMap<String, usize> = HashMap::with_capacity(keys.len());
    for k in keys.iter() {
        let label = k.name.clone().unwrap_or_else(|| short(k.fingerprint));
        *short_count.entry(label).or_insert(0) += 1;
    }
    let mut taken: HashSet<String> = keys.iter().filter_map(|k| k.name.clone()).collect();
    // Unique short hashes are settled first, so a lengthened label never takes one of theirs.
    for k in keys.iter_mut().filter(|k| k.name.is_none()) {
        let label = short(k.fingerprint);
        if short_count.get(&label) == Some(&1) {
            taken.insert(label.clone());
            k.label = label;
        }
    }
    for k in keys.iter_mut() {
        if let Some(name) = &k.name {
            k.label = name.clone();
            continue;
        }
        if !k.label.is_empty() {
            continue;
        }
        let long = long_hash("key", k.fingerprint);
        let mut label = long.clone();
        let mut n = 2u32;
        while taken.contains(&label) {
            label = format!("{long}-{n}");
            n = n.saturating_add(1);
        }
        taken.insert(label.clone());
        k.label = label;
    }
}

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
    pub failover_on_status: Vec<StatusPattern>,
    pub disable_on_status: Vec<StatusPattern>,
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

/// `failover.preemptiveCooldown`'s default, chosen by `make bench` (see the README).
pub const PREEMPTIVE_COOLDOWN_DEFAULT: bool = false;

/// Higress ai-proxy's active health checks: a minimal real request with each down key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub model: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub success_threshold: u32,
    /// None: the provider's usual path (see `Provider::health_check_path`).
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
    pub on_status: Vec<StatusPattern>,
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

const CONFIG_FIELDS: &[&str] = &[
    "apiTokens",
    "name",
    "provider",
    "authHeader",
    "selection",
    "failover",
    "onAllUnavailable",
    "exposeKeyName",
    "retryOnFailure",
    "fallbacks",
    "affinity",
    "maxWaitMs",
];
/// A fallback pool sets its own keys and provider; other settings come from the pool it backs.
const FALLBACK_FIELDS: &[&str] = &[
    "name",
    "apiTokens",
    "provider",
    "authHeader",
    "model",
    "cluster",
    "selection",
    "failover",
];
const RETRY_FIELDS: &[&str] = &[
    "enabled",
    "maxRetries",
    "retryTimeout",
    "retryOnStatus",
    "maxBodyBytes",
];
const FAILOVER_FIELDS: &[&str] = &[
    "enabled",
    "failureThreshold",
    "failoverOnStatus",
    "cooldownDuration",
    "disableOnStatus",
    "disableDuration",
    "respectRetryAfter",
    "minCooldownDuration",
    "maxCooldownDuration",
    "cooldownBackoff",
    "healthCheckInterval",
    "healthCheckTimeout",
    "healthCheckModel",
    "successThreshold",
    "healthCheckPath",
    "healthCheckCluster",
    "healthCheckAuthority",
    "preemptiveCooldown",
];

/// Parses the configuration, reading `fromEnv` keys from the VM's environment.
pub fn parse(text: &[u8]) -> Result<PluginConfig, ConfigError> {
    parse_with_env(text, &env_keys::HostEnv::WasmVm)
}

/// Parses the configuration; `env` answers the `fromEnv` entries of `apiTokens`.
pub fn parse_with_env(text: &[u8], env: EnvLookup) -> Result<PluginConfig, ConfigError> {
    let root: Value = serde_json::from_slice(text).map_err(|e| ConfigError {
        field: String::new(),
        message: format!(
            "the plugin configuration is not valid JSON ({e}); it must be one JSON object"
        ),
    })?;
    let Value::Object(root) = root else {
        return err("", "the plugin configuration must be a JSON object");
    };
    let rules_raw = match root.get("_rules_") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(rules)) => rules.clone(),
        Some(_) => return err("_rules_", "must be a list of rule objects"),
    };

    let mut builder = Builder::new(env);
    let global_fields = without_private_keys(&root);
    let global = if global_fields.contains_key("apiTokens") || rules_raw.is_empty() {
        Some(builder.profile(&global_fields, "")?)
    } else {
        // Higress may send only rules; still check the global part's own fields.
        check_fields_without_keys(&global_fields, env)?;
        None
    };

    let mut rules = Vec::with_capacity(rules_raw.len());
    for (i, raw) in rules_raw.iter().enumerate() {
        let path = format!("_rules_[{i}]");
        let Value::Object(rule) = raw else {
            return err(
                &path,
                "must be an object with one _match_*_ key and the fields it overrides",
            );
        };
        let matcher = parse_matcher(rule, &path)?;
        // A rule's keys are usually another pool, so the pool name is never inherited.
        let mut inherited = global_fields.clone();
        inherited.remove("name");
        let merged = deep_merge(&inherited, &without_private_keys(rule));
        if !merged.contains_key("apiTokens") {
            return err(
                &format!("{path}.apiTokens"),
                "required: the rule matches requests but neither it nor the global part lists keys",
            );
        }
        let profile = builder.profile(&merged, &format!("{path}."))?;
        rules.push(Rule { matcher, profile });
    }

    let has_fallbacks = builder.profiles.iter().any(|p| !p.fallbacks.is_empty());
    Ok(PluginConfig {
        has_fallbacks,
        pools: builder.pools,
        profiles: builder.profiles,
        global,
        rules,
        warnings: builder.warnings,
    })
}

fn without_private_keys(obj: &Map<String, Value>) -> Map<String, Value> {
    obj.iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A rule inherits every global field it does not set; objects merge field by field.
fn deep_merge(base: &Map<String, Value>, over: &Map<String, Value>) -> Map<String, Value> {
    let mut out = base.clone();
    for (k, v) in over {
        let merged = match (out.get(k), v) {
            (Some(Value::Object(b)), Value::Object(o)) => Value::Object(deep_merge(b, o)),
            _ => v.clone(),
        };
        out.insert(k.clone(), merged);
    }
    out
}

#[inline(never)]
fn check_unknown(
    obj: &Map<String, Value>,
    allowed: &[&str],
    prefix: &str,
) -> Result<(), ConfigError> {
    for key in obj.keys() {
        if !key.starts_with('_') && !allowed.contains(&key.as_str()) {
            return err(
                &format!("{prefix}{key}"),
                format!("unknown field; the fields here are: {}", allowed.join(", ")),
            );
        }
    }
    Ok(())
}

fn check_fields_without_keys(obj: &Map<String, Value>, env: EnvLookup) -> Result<(), ConfigError> {
    let mut scratch = Builder::new(env);
    let mut with_placeholder = obj.clone();
    with_placeholder.insert(
        "apiTokens".into(),
        Value::Array(vec![Value::String("placeholder".into())]),
    );
    scratch.profile(&with_placeholder, "").map(|_| ())
}

#[inline(never)]
fn parse_matcher(rule: &Map<String, Value>, path: &str) -> Result<Matcher, ConfigError> {
    const MATCH_KEYS: [&str; 4] = [
        "_match_route_",
        "_match_route_prefix_",
        "_match_domain_",
        "_match_service_",
    ];
    let present: Vec<&str> = MATCH_KEYS
        .iter()
        .copied()
        .filter(|k| rule.contains_key(*k))
        .collect();
    let key = match present.as_slice() {
        [one] => *one,
        [] => {
            return err(
                path,
                "has no match key; add one of _match_route_, _match_route_prefix_, _match_domain_, _match_service_",
            )
        }
        _ => {
            return err(
                path,
                format!("has several match keys ({}); split it into one rule per key", present.join(", ")),
            )
        }
    };
    let field = format!("{path}.{key}");
    let values = string_list(rule.get(key), &field)?;
    if values.is_empty() {
        return err(&field, "must list at least one value");
    }
    Ok(match key {
        "_match_route_" => Matcher::Route(values),
        "_match_route_prefix_" => Matcher::RoutePrefix(values),
        "_match_domain_" => {
            Matcher::Domain(values.iter().map(|d| DomainPattern::parse(d)).collect())
        }
        _ => Matcher::Service(values),
    })
}

#[inline(never)]
fn string_list(v: Option<&Value>, field: &str) -> Result<Vec<String>, ConfigError> {
    let Some(Value::Array(items)) = v else {
        return err(field, "must be a list of strings");
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            _ => err(&format!("{field}[{i}]"), "must be a non-empty string"),
        })
        .collect()
}

// Why the parsers below are `#[inline(never)]`: LLVM inlines every function with one caller, which
// made `Builder::profile` one 13 KB function. V8 compiles every function of the module with
// TurboFan at load, and its scratch memory grows faster than the function; the allocator keeps
// that memory. Split into parts, the same code costs Envoy about 1 MiB less resident memory
// (bench/README.md). None of it runs per request.
struct Builder<'a> {
    env: EnvLookup<'a>,
    pools: Vec<PoolKeys>,
    profiles: Vec<Profile>,
    warnings: Vec<String>,
}

impl<'a> Builder<'a> {
    fn new(env: EnvLookup<'a>) -> Self {
        Builder {
            env,
            pools: Vec::new(),
            profiles: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn profile(&mut self, obj: &Map<String, Value>, prefix: &str) -> Result<usize, ConfigError> {
        check_unknown(obj, CONFIG_FIELDS, prefix)?;
        let field = |name: &str| format!("{prefix}{name}");

        let keys = parse_keys(obj.get("apiTokens"), &field("apiTokens"), self.env)?;
        let name = match obj.get("name") {
            None => None,
            Some(v) => Some(parse_name(v, &field("name"))?),
        };
        let provider = match obj.get("provider") {
            None => Provider::OpenAi,
            Some(v) => match v.as_str() {
                Some("openai") => Provider::OpenAi,
                Some("azure") => Provider::Azure,
                Some("anthropic") => Provider::Anthropic,
                Some("gemini") => Provider::Gemini,
                _ => {
                    return err(
                        &field("provider"),
                        "must be one of \"openai\", \"azure\", \"anthropic\", \"gemini\"; for another API set authHeader",
                    )
                }
            },
        };
        let auth = match obj.get("authHeader") {
            None => provider.auth_header(),
            Some(v) => parse_auth_header(v, &field("authHeader"))?,
        };
        let selection = match obj.get("selection") {
            None => Selection::RoundRobin,
            Some(v) => match v.as_str() {
                Some("round_robin") => Selection::RoundRobin,
                Some("random") => Selection::Random,
                Some("weighted") => Selection::Weighted,
                _ => {
                    return err(
                        &field("selection"),
                        "must be \"round_robin\", \"random\" or \"weighted\"",
                    )
                }
            },
        };
        let on_all_unavailable = match obj.get("onAllUnavailable") {
            None => OnAllUnavailable::Earliest,
            Some(v) => match v.as_str() {
                Some("earliest") => OnAllUnavailable::Earliest,
                Some("reject") => OnAllUnavailable::Reject,
                Some("wait") => OnAllUnavailable::Wait,
                _ => {
                    return err(
                        &field("onAllUnavailable"),
                        "must be \"earliest\", \"reject\" or \"wait\"",
                    )
                }
            },
        };
        let expose_key_name = match obj.get("exposeKeyName") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return err(&field("exposeKeyName"), "must be true or false"),
        };
        let failover = self.parse_failover(obj.get("failover"), &field("failover"))?;
        let (affinity_header, max_wait_ms) = parse_affinity_and_wait(obj, prefix)?;
        let retry = self.parse_retry(obj.get("retryOnFailure"), &field("retryOnFailure"))?;
        let pool = self.pool_for(keys, name, &field("name"))?;
        let fallbacks = self.parse_fallbacks(obj, prefix)?;
        if fallbacks
            .iter()
            .any(|&f| self.profiles.get(f).is_some_and(|p| p.pool == pool))
        {
            return err(
                &field("fallbacks"),
                "a fallback lists the same keys as the pool it backs; give it other keys",
            );
        }
        self.profiles.push(Profile {
            pool,
            provider,
            auth,
            selection,
            failover,
            on_all_unavailable,
            expose_key_name,
            retry,
            fallbacks,
            model: None,
            cluster: None,
            affinity_header,
            max_wait_ms,
        });
        Ok(self.profiles.len() - 1)
    }

    /// `fallbacks`: each entry is a pool of its own; what it does not set it takes from `base`.
    #[inline(never)]
    fn parse_fallbacks(
        &mut self,
        base: &Map<String, Value>,
        prefix: &str,
    ) -> Result<Vec<usize>, ConfigError> {
        let list_field = format!("{prefix}fallbacks");
        let items =
            match base.get("fallbacks") {
                None => return Ok(Vec::new()),
                Some(Value::Array(items)) => items,
                Some(_) => return err(
                    &list_field,
                    "must be a list of pools: {\"name\", \"apiTokens\", \"provider\", \"model\"}",
                ),
            };
        let mut inherited = base.clone();
        for own in ["name", "apiTokens", "fallbacks", "provider", "authHeader"] {
            inherited.remove(own);
        }
        let mut profiles = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = format!("{list_field}[{i}]");
            let Value::Object(entry) = item else {
                return err(&at, "must be an object with \"name\" and \"apiTokens\"");
            };
            check_unknown(entry, FALLBACK_FIELDS, &format!("{at}."))?;
            let Some(name) = entry.get("name") else {
                return err(
                    &format!("{at}.name"),
                    "required: it names the pool in x-ai-key-failover-pool, logs and stats",
                );
            };
            parse_name(name, &format!("{at}.name"))?;
            let text = |key: &str, what: &str| -> Result<Option<String>, ConfigError> {
                match entry.get(key) {
                    None => Ok(None),
                    Some(Value::String(s))
                        if !s.is_empty() && s.bytes().all(|b| (0x20..=0x7e).contains(&b)) =>
                    {
                        Ok(Some(s.clone()))
                    }
                    Some(_) => err(&format!("{at}.{key}"), what.to_string()),
                }
            };
            let model = text("model", "must be a model name (printable text)")?;
            let cluster = text("cluster", "must be the name of an Envoy cluster")?;
            let mut own = entry.clone();
            own.remove("model");
            own.remove("cluster");
            let merged = deep_merge(&inherited, &own);
            let profile = self.profile(&merged, &format!("{at}."))?;
            if let Some(p) = self.profiles.get_mut(profile) {
                p.model = model;
                p.cluster = cluster;
            }
            profiles.push(profile);
        }
        Ok(profiles)
    }

    /// Profiles with the same key list share one pool, whatever order they list the keys in.
    #[inline(never)]
    fn pool_for(
        &mut self,
        keys: Vec<KeyConfig>,
        name: Option<String>,
        name_field: &str,
    ) -> Result<usize, ConfigError> {
        let mut fingerprints: Vec<u64> = keys.iter().map(|k| k.fingerprint).collect();
        fingerprints.sort_unstable();
        let id = fnv1a64(
            &fingerprints
                .iter()
                .flat_map(|fp| fp.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        if let Some(pos) = self.pools.iter().position(|p| p.id == id) {
            if let (Some(name), Some(existing)) = (&name, self.pools.get(pos)) {
                if existing.label != *name {
                    return err(
                        name_field,
                        format!(
                            "{name:?} names the same key list as pool {:?}; one key list is one pool with one name",
                            existing.label
                        ),
                    );
                }
            }
            return Ok(pos);
        }
        let label = name.unwrap_or_else(|| short_hash("pool", id));
        if self.pools.iter().any(|p| p.label == label) {
            return err(
                name_field,
                format!(
                    "{label:?} already names a pool with other keys; give each pool its own name"
                ),
            );
        }
        self.pools.push(PoolKeys { id, label, keys });
        Ok(self.pools.len() - 1)
    }

    #[inline(never)]
    fn parse_failover(&mut self, v: Option<&Value>, prefix: &str) -> Result<Failover, ConfigError> {
        let empty = Map::new();
        let obj = match v {
            None => &empty,
            Some(Value::Object(o)) => o,
            Some(_) => return err(prefix, "must be an object"),
        };
        check_unknown(obj, FAILOVER_FIELDS, &format!("{prefix}."))?;
        let field = |name: &str| format!("{prefix}.{name}");
        let enabled = match obj.get("enabled") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return err(&field("enabled"), "must be true or false"),
        };
        let failure_threshold = integer(
            obj.get("failureThreshold"),
            &field("failureThreshold"),
            1,
            1,
            1_000,
        )? as u32;
        let cooldown_ms = integer(
            obj.get("cooldownDuration"),
            &field("cooldownDuration"),
            60_000,
            1,
            MAX_DURATION_MS,
        )?;
        let max_cooldown_ms = integer(
            obj.get("maxCooldownDuration"),
            &field("maxCooldownDuration"),
            600_000,
            1,
            MAX_DURATION_MS,
        )?;
        let min_cooldown_ms = match obj.get("minCooldownDuration") {
            Some(v) => integer(
                Some(v),
                &field("minCooldownDuration"),
                DEFAULT_MIN_COOLDOWN_MS,
                1,
                MAX_DURATION_MS,
            )?,
            // Higress has no minimum: a `failover` block pasted from it with a 100 ms cooldown
            // means 100 ms, so an explicit shorter cooldown (or maximum) lowers the default.
            None => DEFAULT_MIN_COOLDOWN_MS
                .min(cooldown_ms)
                .min(max_cooldown_ms),
        };
        if min_cooldown_ms > max_cooldown_ms {
            return err(
                &field("minCooldownDuration"),
                format!("({min_cooldown_ms}) is above maxCooldownDuration ({max_cooldown_ms}); lower it or raise the maximum"),
            );
        }
        if !(min_cooldown_ms..=max_cooldown_ms).contains(&cooldown_ms) {
            return err(
                &field("cooldownDuration"),
                format!(
                    "({cooldown_ms}) must lie between minCooldownDuration ({min_cooldown_ms}) and maxCooldownDuration ({max_cooldown_ms}); move it or the bound"
                ),
            );
        }
        let disable_ms = integer(
            obj.get("disableDuration"),
            &field("disableDuration"),
            3_600_000,
            0,
            MAX_DURATION_MS,
        )?;
        let respect_retry_after = match obj.get("respectRetryAfter") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return err(&field("respectRetryAfter"), "must be true or false"),
        };
        let backoff_permille = match obj.get("cooldownBackoff") {
            None => 2_000,
            Some(v) => match v.as_f64() {
                Some(f) if (1.0..=10.0).contains(&f) => (f * 1000.0).round() as u32,
                _ => {
                    return err(
                        &field("cooldownBackoff"),
                        format!(
                        "must be a number from 1 (no backoff) to 10 (got {v}); the default is 2"
                    ),
                    )
                }
            },
        };
        let health_check = self.parse_health_check(obj, prefix)?;
        let failover_on_status = self.patterns(
            obj.get("failoverOnStatus"),
            &field("failoverOnStatus"),
            &["429", "5xx"],
        )?;
        let disable_on_status = self.patterns(
            obj.get("disableOnStatus"),
            &field("disableOnStatus"),
            &["401", "402", "403"],
        )?;
        Ok(Failover {
            enabled,
            failure_threshold,
            failover_on_status,
            disable_on_status,
            cooldown_ms,
            disable_ms,
            respect_retry_after,
            min_cooldown_ms,
            max_cooldown_ms,
            backoff_permille,
            health_check,
            preemptive_cooldown: parse_preemptive_cooldown(obj, prefix)?,
        })
    }

    #[inline(never)]
    fn parse_health_check(
        &mut self,
        obj: &Map<String, Value>,
        prefix: &str,
    ) -> Result<Option<HealthCheck>, ConfigError> {
        let field = |name: &str| format!("{prefix}.{name}");
        // Any positive interval loads, as in Higress; ticks come no faster than every
        // `schedule::MIN_TICK_MS`, so a shorter one is checked that often.
        let interval_ms = integer(
            obj.get("healthCheckInterval"),
            &field("healthCheckInterval"),
            5_000,
            1,
            MAX_DURATION_MS,
        )?;
        let timeout_ms = integer(
            obj.get("healthCheckTimeout"),
            &field("healthCheckTimeout"),
            5_000,
            1,
            MAX_DURATION_MS,
        )?;
        let success_threshold = integer(
            obj.get("successThreshold"),
            &field("successThreshold"),
            1,
            1,
            1_000,
        )? as u32;
        let text = |name: &str,
                    what: &str,
                    valid: fn(&str) -> bool|
         -> Result<Option<String>, ConfigError> {
            match obj.get(name) {
                None => Ok(None),
                Some(Value::String(s)) if valid(s) => Ok(Some(s.clone())),
                Some(_) => err(&field(name), what.to_string()),
            }
        };
        let model = text(
            "healthCheckModel",
            "must be a model name such as \"gpt-4o-mini\" (printable ASCII, no spaces); it turns on health checks",
            |s| !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\'),
        )?;
        let path = text(
            "healthCheckPath",
            "must be a request path starting with '/', such as \"/v1/chat/completions\"",
            |s| {
                s.starts_with('/')
                    && s.len() <= 2048
                    && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
            },
        )?;
        let cluster = text(
            "healthCheckCluster",
            "must be the name of an Envoy cluster",
            |s| !s.is_empty() && s.len() <= 1024 && s.bytes().all(|b| (0x21..=0x7e).contains(&b)),
        )?;
        if model.is_some() && interval_ms < crate::core::schedule::MIN_TICK_MS {
            self.warn(format!(
                "{}: {interval_ms} ms is shorter than the plugin's fastest tick; keys are checked every {} ms at most",
                field("healthCheckInterval"),
                crate::core::schedule::MIN_TICK_MS
            ));
        }
        let authority = text(
            "healthCheckAuthority",
            "must be the provider's host name, as in \"api.openai.com\" or \"my-resource.openai.azure.com:443\"",
            is_authority,
        )?;
        Ok(model.map(|model| HealthCheck {
            model,
            interval_ms,
            timeout_ms,
            success_threshold,
            path,
            cluster,
            authority,
        }))
    }

    #[inline(never)]
    fn parse_retry(
        &mut self,
        v: Option<&Value>,
        prefix: &str,
    ) -> Result<RetryOnFailure, ConfigError> {
        let empty = Map::new();
        let obj = match v {
            None => &empty,
            Some(Value::Object(o)) => o,
            Some(_) => return err(prefix, "must be an object"),
        };
        check_unknown(obj, RETRY_FIELDS, &format!("{prefix}."))?;
        let field = |name: &str| format!("{prefix}.{name}");
        let enabled = match obj.get("enabled") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return err(&field("enabled"), "must be true or false"),
        };
        let max_retries = integer(obj.get("maxRetries"), &field("maxRetries"), 1, 1, 10)? as u32;
        let timeout_ms = integer(
            obj.get("retryTimeout"),
            &field("retryTimeout"),
            30_000,
            1,
            MAX_DURATION_MS,
        )?;
        let max_body_bytes = integer(
            obj.get("maxBodyBytes"),
            &field("maxBodyBytes"),
            DEFAULT_MAX_BODY_BYTES,
            0,
            256 * 1024 * 1024,
        )? as usize;
        let on_status = self.patterns(
            obj.get("retryOnStatus"),
            &field("retryOnStatus"),
            &["429", "5xx"],
        )?;
        if on_status.is_empty() {
            return err(
                &field("retryOnStatus"),
                "must list at least one pattern; to never retry, set retryOnFailure.enabled to false",
            );
        }
        Ok(RetryOnFailure {
            enabled,
            max_retries,
            timeout_ms,
            on_status,
            max_body_bytes,
        })
    }

    /// A list of status patterns; warns when one covers codes that never count against a key.
    #[inline(never)]
    fn patterns(
        &mut self,
        v: Option<&Value>,
        list_field: &str,
        default: &[&str],
    ) -> Result<Vec<StatusPattern>, ConfigError> {
        let texts = match v {
            None => default.iter().map(|s| s.to_string()).collect(),
            Some(v) => string_list(Some(v), list_field)?,
        };
        if texts.is_empty() && list_field.ends_with("failoverOnStatus") {
            return err(
                list_field,
                "must list at least one pattern; to never take keys out, set failover.enabled to false",
            );
        }
        let mut patterns = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let pattern = StatusPattern::parse(text).map_err(|e| ConfigError {
                field: format!("{list_field}[{i}]"),
                message: e.0,
            })?;
            let shadowed = shadowed_codes(&pattern);
            if v.is_some() && !shadowed.is_empty() {
                self.warn(format!(
                    "{list_field}[{i}]: {text:?} covers {shadowed:?}, which are the request's or the provider's fault, not the key's; those never take a key out"
                ));
            }
            patterns.push(pattern);
        }
        Ok(patterns)
    }

    fn warn(&mut self, message: String) {
        if !self.warnings.contains(&message) {
            self.warnings.push(message);
        }
    }
}

fn integer(
    v: Option<&Value>,
    field: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let Some(v) = v else {
        return Ok(default);
    };
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => err(
            field,
            format!(
                "must be a whole number from {min} to {max} (got {v}); the default is {default}"
            ),
        ),
    }
}

/// A host name or address with an optional port: what an `:authority` may hold.
fn is_authority(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
}

/// `maxWaitMs`'s default and bound: a held request keeps its client waiting.
pub const MAX_WAIT_DEFAULT_MS: u64 = 2_000;
const MAX_WAIT_LIMIT_MS: u64 = 30_000;

/// `affinity: {"header": ...}` and `maxWaitMs`.
#[inline(never)]
fn parse_affinity_and_wait(
    obj: &Map<String, Value>,
    prefix: &str,
) -> Result<(Option<String>, u64), ConfigError> {
    let field = format!("{prefix}affinity");
    let header = match obj.get("affinity") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => {
            check_unknown(o, &["header"], &format!("{field}."))?;
            match o.get("header").and_then(Value::as_str) {
                Some(name) if is_header_token(name) => Some(name.to_ascii_lowercase()),
                _ => {
                    return err(
                        &format!("{field}.header"),
                        "required: the request header whose value names the session, such as \"x-session-id\"",
                    )
                }
            }
        }
        Some(_) => return err(&field, "must be an object {\"header\": \"x-session-id\"}"),
    };
    let max_wait_ms = integer(
        obj.get("maxWaitMs"),
        &format!("{prefix}maxWaitMs"),
        MAX_WAIT_DEFAULT_MS,
        1,
        MAX_WAIT_LIMIT_MS,
    )?;
    Ok((header, max_wait_ms))
}

fn parse_preemptive_cooldown(obj: &Map<String, Value>, prefix: &str) -> Result<bool, ConfigError> {
    match obj.get("preemptiveCooldown") {
        None => Ok(PREEMPTIVE_COOLDOWN_DEFAULT),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => err(
            &format!("{prefix}.preemptiveCooldown"),
            "must be true or false",
        ),
    }
}

fn is_valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_name(v: &Value, field: &str) -> Result<String, ConfigError> {
    match v.as_str() {
        Some(s) if is_valid_name(s) => Ok(s.to_string()),
        _ => err(
            field,
            "must be 1 to 64 characters of letters, digits, '_' and '-', starting with a letter or digit (it names stats)",
        ),
    }
}

#[inline(never)]
fn parse_keys(
    v: Option<&Value>,
    field: &str,
    env: EnvLookup,
) -> Result<Vec<KeyConfig>, ConfigError> {
    let items = match v {
        None => return err(field, "required: list the provider API keys of this pool"),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return err(
                field,
                "must be a list of keys: strings, or objects {\"fromEnv\": \"VARIABLE\", \"name\": \"...\", \"weight\": 1} or {\"token\": \"...\", ...}",
            )
        }
    };
    if items.is_empty() {
        return err(field, "must list at least one key");
    }
    let mut entries = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        key_entries(item, &format!("{field}[{i}]"), env, &mut entries)?;
    }
    if entries.len() > MAX_KEYS_PER_POOL {
        return err(
            field,
            format!(
                "lists {} keys; at most {MAX_KEYS_PER_POOL} are supported",
                entries.len()
            ),
        );
    }
    let mut keys: Vec<KeyConfig> = Vec::with_capacity(entries.len());
    let mut origins: Vec<String> = Vec::with_capacity(entries.len());
    // Positions by key and by name: a linear search per key made 10,000 keys cost 50 million
    // comparisons at every load on every VM.
    let mut position_of_token: HashMap<String, usize> = HashMap::with_capacity(entries.len());
    let mut position_of_name: HashMap<String, usize> = HashMap::new();
    for KeyEntry {
        at,
        token,
        name,
        weight,
    } in entries
    {
        if token.is_empty() {
            return err(&at, "the key is empty");
        }
        if token.len() > MAX_TOKEN_LEN {
            return err(
                &at,
                format!("the key is longer than {MAX_TOKEN_LEN} characters"),
            );
        }
        // Printable ASCII only: anything else could split or inject headers.
        if !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return err(
                &at,
                "the key contains whitespace, a control character or non-ASCII text; check for a stray newline or space",
            );
        }
        if let Some(&j) = position_of_token.get(&token) {
            let first = origins.get(j).map_or("", String::as_str);
            return err(&at, format!("the same key as {first}; list each key once"));
        }
        if let Some(name) = &name {
            if let Some(&j) = position_of_name.get(name) {
                let first = origins.get(j).map_or("", String::as_str);
                return err(
                    &format!("{at}.name"),
                    format!("{name:?} is already the name of {first}"),
                );
            }
            position_of_name.insert(name.clone(), keys.len());
        }
        position_of_token.insert(token.clone(), keys.len());
        keys.push(KeyConfig {
            fingerprint: fnv1a64(token.as_bytes()),
            token,
            name,
            weight,
            label: String::new(),
        });
        origins.push(at);
    }
    unique_labels(&mut keys, |fp| short_hash("key", fp));
    Ok(keys)
}

/// One key of a pool before validation. `at` names where it came from in errors, never the key:
/// `apiTokens[2]`, or `apiTokens[2] (key 3 of $OPENAI_KEYS)` for one of a variable's list.
struct KeyEntry {
    at: String,
    token: String,
    name: Option<String>,
    weight: u32,
}

/// The key(s) of one `apiTokens` entry: a string, `{"token": ...}`, or `{"fromEnv": ...}`, which
/// may stand for several keys.
#[inline(never)]
fn key_entries(
    item: &Value,
    at: &str,
    env: EnvLookup,
    out: &mut Vec<KeyEntry>,
) -> Result<(), ConfigError> {
    let o = match item {
        Value::String(s) => {
            out.push(KeyEntry {
                at: at.to_string(),
                token: s.clone(),
                name: None,
                weight: 1,
            });
            return Ok(());
        }
        Value::Object(o) => o,
        _ => {
            return err(
                at,
                "must be a key string or an object with \"fromEnv\" or \"token\"",
            )
        }
    };
    check_unknown(
        o,
        &["fromEnv", "token", "name", "weight"],
        &format!("{at}."),
    )?;
    let name = match o.get("name") {
        None => None,
        Some(n) => Some(parse_name(n, &format!("{at}.name"))?),
    };
    let weight = integer(o.get("weight"), &format!("{at}.weight"), 1, 1, MAX_WEIGHT)? as u32;
    let var = match (o.get("token"), o.get("fromEnv")) {
        (Some(Value::String(token)), None) => {
            out.push(KeyEntry {
                at: at.to_string(),
                token: token.clone(),
                name,
                weight,
            });
            return Ok(());
        }
        (None, Some(Value::String(var))) => var,
        (Some(_), Some(_)) => {
            return err(
                at,
                "has both \"token\" and \"fromEnv\"; keep one (\"fromEnv\" keeps the key out of the configuration)",
            )
        }
        (None, Some(_)) => {
            return err(
                &format!("{at}.fromEnv"),
                "must be the name of an environment variable, as a string",
            )
        }
        _ => {
            return err(
                &format!("{at}.token"),
                "required: the API key as a string, or \"fromEnv\": the environment variable that holds it",
            )
        }
    };
    let tokens = env_keys::read_keys(env, var, &format!("{at}.fromEnv"))?;
    let several = tokens.len() > 1;
    for (n, token) in (1..).zip(tokens) {
        // Each key of a list is a key of its own, so it needs a name of its own.
        let name = match (&name, several) {
            (Some(base), true) => {
                let suffixed = format!("{base}-{n}");
                if !is_valid_name(&suffixed) {
                    return err(
                        &format!("{at}.name"),
                        format!(
                            "with the suffix -{n} for the keys of {var} it is longer than 64 characters; shorten it"
                        ),
                    );
                }
                Some(suffixed)
            }
            _ => name.clone(),
        };
        out.push(KeyEntry {
            at: if several {
                format!("{at} (key {n} of ${var})")
            } else {
                format!("{at} (${var})")
            },
            token,
            name,
            weight,
        });
    }
    Ok(())
}

fn is_header_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[inline(never)]
fn parse_auth_header(v: &Value, field: &str) -> Result<AuthHeader, ConfigError> {
    let Value::Object(o) = v else {
        return err(
            field,
            "must be an object {\"name\": \"x-api-key\", \"prefix\": \"\"}",
        );
    };
    check_unknown(o, &["name", "prefix"], &format!("{field}."))?;
    let name = match o.get("name").and_then(Value::as_str) {
        Some(n) if is_header_token(n) => n.to_ascii_lowercase(),
        _ => {
            return err(
                &format!("{field}.name"),
                "required: a header name such as \"x-api-key\"",
            )
        }
    };
    const RESERVED: [&str; 7] = [
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
    ];
    if RESERVED.contains(&name.as_str()) {
        return err(
            &format!("{field}.name"),
            format!(
                "{name:?} is not a credential header; pick the header your API reads the key from"
            ),
        );
    }
    let prefix = match o.get("prefix") {
        None => String::new(),
        Some(Value::String(p)) if p.bytes().all(|b| (0x20..=0x7e).contains(&b)) => p.clone(),
        Some(_) => {
            return err(
                &format!("{field}.prefix"),
                "must be printable ASCII text such as \"Bearer \" (no control characters)",
            )
        }
    };
    Ok(AuthHeader { name, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(json: &str) -> PluginConfig {
        parse(json.as_bytes()).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    fn fails(json: &str) -> ConfigError {
        match parse(json.as_bytes()) {
            Ok(_) => panic!("accepted: {json}"),
            Err(e) => e,
        }
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = ok(r#"{"apiTokens": ["sk-a", "sk-b"]}"#);
        let p = &c.profiles[c.global.unwrap()];
        assert_eq!(p.provider, Provider::OpenAi);
        assert_eq!(
            p.auth,
            AuthHeader {
                name: "authorization".into(),
                prefix: "Bearer ".into()
            }
        );
        assert_eq!(p.selection, Selection::RoundRobin);
        assert_eq!(p.on_all_unavailable, OnAllUnavailable::Earliest);
        assert!(p.failover.enabled);
        assert_eq!(p.failover.failure_threshold, 1);
        assert_eq!(p.failover.cooldown_ms, 60_000);
        assert_eq!(p.failover.disable_ms, 3_600_000);
        assert!(p.failover.respect_retry_after);
        assert_eq!(
            (p.failover.min_cooldown_ms, p.failover.max_cooldown_ms),
            (1_000, 600_000)
        );
        assert_eq!(p.failover.backoff_permille, 2_000);
        assert!(p.failover.disable_on_status.iter().any(|s| s.matches(402)));
        assert!(!p.failover.disable_on_status.iter().any(|s| s.matches(429)));
        assert!(!p.retry.enabled);
        assert_eq!(
            (
                p.retry.max_retries,
                p.retry.timeout_ms,
                p.retry.max_body_bytes
            ),
            (1, 30_000, 256 * 1024)
        );
        assert!(p.retry.on_status.iter().any(|s| s.matches(503)));
        assert!(p.failover.failover_on_status.iter().any(|s| s.matches(429)));
        assert!(p.failover.failover_on_status.iter().any(|s| s.matches(503)));
        assert!(!p.failover.failover_on_status.iter().any(|s| s.matches(401)));
        let pool = &c.pools[p.pool];
        assert_eq!(pool.keys.len(), 2);
        assert_eq!(pool.keys[0].weight, 1);
        assert!(pool.label.starts_with("pool-"));
        assert!(c.rules.is_empty());
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn providers_put_the_key_in_their_header() {
        for (provider, header, prefix) in [
            ("openai", "authorization", "Bearer "),
            ("azure", "api-key", ""),
            ("anthropic", "x-api-key", ""),
            ("gemini", "x-goog-api-key", ""),
        ] {
            let c = ok(&format!(
                r#"{{"apiTokens": ["k"], "provider": "{provider}"}}"#
            ));
            let auth = &c.profiles[0].auth;
            assert_eq!((auth.name.as_str(), auth.prefix.as_str()), (header, prefix));
        }
        let c = ok(
            r#"{"apiTokens": ["k"], "authHeader": {"name": "X-Custom-Auth", "prefix": "Token "}}"#,
        );
        assert_eq!(
            c.profiles[0].auth,
            AuthHeader {
                name: "x-custom-auth".into(),
                prefix: "Token ".into()
            }
        );
    }

    #[test]
    fn object_keys_carry_name_and_weight() {
        let c = ok(
            r#"{"apiTokens": [{"token": "a", "name": "primary", "weight": 3}, "b"], "selection": "weighted"}"#,
        );
        let keys = &c.pools[0].keys;
        assert_eq!(keys[0].label(), "primary");
        assert_eq!(keys[0].weight, 3);
        assert!(keys[1].label().starts_with("key-"));
        assert_eq!(keys[1].label().len(), 12);
    }

    #[test]
    fn every_invalid_config_is_refused_naming_the_field() {
        let table: &[(&str, &str, &str)] = &[
            ("not json", "", "not valid JSON"),
            ("[1]", "", "JSON object"),
            ("{}", "apiTokens", "required"),
            (r#"{"apiTokens": []}"#, "apiTokens", "at least one"),
            (r#"{"apiTokens": "sk"}"#, "apiTokens", "list of keys"),
            (r#"{"apiTokens": [""]}"#, "apiTokens[0]", "empty"),
            (
                r#"{"apiTokens": ["a", "a"]}"#,
                "apiTokens[1]",
                "same key as apiTokens[0]",
            ),
            (r#"{"apiTokens": ["a b"]}"#, "apiTokens[0]", "whitespace"),
            (
                r#"{"apiTokens": ["a\r\nx-evil: 1"]}"#,
                "apiTokens[0]",
                "control",
            ),
            (r#"{"apiTokens": ["a\u0000"]}"#, "apiTokens[0]", "control"),
            (r#"{"apiTokens": ["é"]}"#, "apiTokens[0]", "non-ASCII"),
            (r#"{"apiTokens": [7]}"#, "apiTokens[0]", "key string"),
            (
                r#"{"apiTokens": [{"name": "x"}]}"#,
                "apiTokens[0].token",
                "required",
            ),
            (
                r#"{"apiTokens": [{"token": "a", "weight": 0}]}"#,
                "apiTokens[0].weight",
                "from 1 to 1000",
            ),
            (
                r#"{"apiTokens": [{"token": "a", "weight": 2.5}]}"#,
                "apiTokens[0].weight",
                "whole number",
            ),
            (
                r#"{"apiTokens": [{"token": "a", "wieght": 2}]}"#,
                "apiTokens[0].wieght",
                "unknown field",
            ),
            (
                r#"{"apiTokens": [{"token": "a", "name": "bad name"}]}"#,
                "apiTokens[0].name",
                "letters",
            ),
            (
                r#"{"apiTokens": [{"token": "a", "name": "n"}, {"token": "b", "name": "n"}]}"#,
                "apiTokens[1].name",
                "already",
            ),
            (
                r#"{"apiTokens": ["a"], "provider": "bedrock"}"#,
                "provider",
                "authHeader",
            ),
            (
                r#"{"apiTokens": ["a"], "authHeader": {"prefix": "x"}}"#,
                "authHeader.name",
                "required",
            ),
            (
                r#"{"apiTokens": ["a"], "authHeader": {"name": "bad header"}}"#,
                "authHeader.name",
                "header name",
            ),
            (
                r#"{"apiTokens": ["a"], "authHeader": {"name": "host"}}"#,
                "authHeader.name",
                "not a credential header",
            ),
            (
                r#"{"apiTokens": ["a"], "authHeader": {"name": "x-k", "prefix": "a\nb"}}"#,
                "authHeader.prefix",
                "control",
            ),
            (
                r#"{"apiTokens": ["a"], "selection": "fastest"}"#,
                "selection",
                "round_robin",
            ),
            (
                r#"{"apiTokens": ["a"], "onAllUnavailable": "hold"}"#,
                "onAllUnavailable",
                "\"earliest\", \"reject\" or \"wait\"",
            ),
            (
                r#"{"apiTokens": ["a"], "maxWaitMs": 30001}"#,
                "maxWaitMs",
                "from 1 to 30000",
            ),
            (
                r#"{"apiTokens": ["a"], "maxWaitMs": 0}"#,
                "maxWaitMs",
                "from 1",
            ),
            (
                r#"{"apiTokens": ["a"], "affinity": "x-s"}"#,
                "affinity",
                "object",
            ),
            (
                r#"{"apiTokens": ["a"], "affinity": {}}"#,
                "affinity.header",
                "required",
            ),
            (
                r#"{"apiTokens": ["a"], "affinity": {"header": "bad name"}}"#,
                "affinity.header",
                "x-session-id",
            ),
            (
                r#"{"apiTokens": ["a"], "affinity": {"header": ":path"}}"#,
                "affinity.header",
                "required",
            ),
            (
                r#"{"apiTokens": ["a"], "affinity": {"header": "x", "hash": "ring"}}"#,
                "affinity.hash",
                "",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"preemptiveCooldown": 1}}"#,
                "failover.preemptiveCooldown",
                "true or false",
            ),
            (
                r#"{"apiTokens": ["a"], "name": "has space"}"#,
                "name",
                "letters",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": true}"#,
                "failover",
                "object",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"enabled": "yes"}}"#,
                "failover.enabled",
                "true or false",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"failureThreshold": 0}}"#,
                "failover.failureThreshold",
                "from 1",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"failureThreshold": -1}}"#,
                "failover.failureThreshold",
                "whole number",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": 0}}"#,
                "failover.cooldownDuration",
                "from 1",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": "60s"}}"#,
                "failover.cooldownDuration",
                "whole number",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"healthCheckInterval": 0}}"#,
                "failover.healthCheckInterval",
                "from 1",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"failoverOnStatus": "429"}}"#,
                "failover.failoverOnStatus",
                "list",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"failoverOnStatus": []}}"#,
                "failover.failoverOnStatus",
                "enabled to false",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"failoverOnStatus": ["429", "5*"]}}"#,
                "failover.failoverOnStatus[1]",
                "status pattern",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"cooldown": 5}}"#,
                "failover.cooldown",
                "unknown field",
            ),
            (
                r#"{"apiTokens": ["a"], "retries": 3}"#,
                "retries",
                "unknown field",
            ),
            (r#"{"apiTokens": ["a"], "_rules_": {}}"#, "_rules_", "list"),
            (
                r#"{"apiTokens": ["a"], "_rules_": [5]}"#,
                "_rules_[0]",
                "object",
            ),
            (
                r#"{"apiTokens": ["a"], "_rules_": [{"apiTokens": ["b"]}]}"#,
                "_rules_[0]",
                "no match key",
            ),
            (
                r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": ["r"], "_match_domain_": ["d"]}]}"#,
                "_rules_[0]",
                "several match keys",
            ),
            (
                r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": []}]}"#,
                "_rules_[0]._match_route_",
                "at least one",
            ),
            (
                r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": "r"}]}"#,
                "_rules_[0]._match_route_",
                "list of strings",
            ),
            (
                r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": [""]}]}"#,
                "_rules_[0]._match_route_[0]",
                "non-empty",
            ),
            (
                r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": ["r"], "failover": {"cooldownDuration": -5}}]}"#,
                "_rules_[0].failover.cooldownDuration",
                "whole number",
            ),
            (
                r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": ["r"], "bogus": 1}]}"#,
                "_rules_[0].bogus",
                "unknown field",
            ),
            (
                r#"{"_rules_": [{"_match_route_": ["r"], "provider": "azure"}]}"#,
                "_rules_[0].apiTokens",
                "required",
            ),
            (
                r#"{"provider": "nope", "_rules_": [{"_match_route_": ["r"], "apiTokens": ["a"]}]}"#,
                "provider",
                "one of",
            ),
            (
                r#"{"apiTokens": ["a"], "name": "p", "_rules_": [{"_match_route_": ["r"], "apiTokens": ["b"], "name": "p"}]}"#,
                "_rules_[0].name",
                "already names a pool",
            ),
        ];
        for (json, field, needle) in table {
            let e = fails(json);
            assert_eq!(e.field, *field, "{json}: {e}");
            assert!(
                e.message.contains(needle),
                "{json}: {e} (wanted {needle:?})"
            );
        }
    }

    #[test]
    fn errors_never_contain_a_key() {
        let secret = "sk-very-secret-123";
        for json in [
            format!(r#"{{"apiTokens": ["{secret}", "{secret}"]}}"#),
            format!(r#"{{"apiTokens": ["{secret} "]}}"#),
            format!(r#"{{"apiTokens": [{{"token": "{secret}", "weight": 0}}]}}"#),
        ] {
            let e = fails(&json).to_string();
            assert!(!e.contains(secret), "{e}");
        }
    }

    #[test]
    fn higress_failover_block_pastes_as_is() {
        let c = ok(
            r#"{"apiTokens": ["a"], "failover": {"enabled": true, "failureThreshold": 3, "successThreshold": 1,
            "healthCheckInterval": 5000, "healthCheckTimeout": 5000, "healthCheckModel": "gpt-4o-mini",
            "failoverOnStatus": ["4.*", "5.*"]}, "_comment_": "ignored"}"#,
        );
        assert_eq!(c.profiles[0].failover.failure_threshold, 3);
        let hc = c.profiles[0].failover.health_check.as_ref().unwrap();
        assert_eq!(
            (
                hc.model.as_str(),
                hc.interval_ms,
                hc.timeout_ms,
                hc.success_threshold
            ),
            ("gpt-4o-mini", 5000, 5000, 1)
        );
        assert!(c
            .warnings
            .iter()
            .any(|w| w.contains("[400, 404, 405, 413, 415, 422]")));
    }

    #[test]
    fn rules_inherit_and_override_field_by_field() {
        let c = ok(r#"{
            "apiTokens": ["g1", "g2"],
            "failover": {"cooldownDuration": 5000, "failureThreshold": 2},
            "_rules_": [
                {"_match_route_": ["route-chat"], "failover": {"cooldownDuration": 1500}},
                {"_match_domain_": ["*.team-a.com"], "apiTokens": ["a1"], "provider": "azure"},
                {"_match_route_": ["other"], "apiTokens": ["g2", "g1"]}
            ]}"#);
        assert_eq!(c.rules.len(), 3);
        let global = &c.profiles[c.global.unwrap()];
        let r0 = &c.profiles[c.rules[0].profile];
        assert_eq!(r0.failover.cooldown_ms, 1500);
        assert_eq!(
            r0.failover.failure_threshold, 2,
            "inherited from the global failover block"
        );
        assert_eq!(r0.pool, global.pool, "same key list, same pool");
        let r1 = &c.profiles[c.rules[1].profile];
        assert_ne!(r1.pool, global.pool);
        assert_eq!(r1.auth.name, "api-key");
        assert_eq!(r1.failover.cooldown_ms, 5000);
        let r2 = &c.profiles[c.rules[2].profile];
        assert_eq!(r2.pool, global.pool, "key order does not make another pool");
        assert_eq!(c.pools.len(), 2);
    }

    #[test]
    fn rules_do_not_inherit_the_pool_name() {
        let c = ok(r#"{"name": "main", "apiTokens": ["a"], "_rules_": [
            {"_match_route_": ["r1"], "apiTokens": ["b"]},
            {"_match_route_": ["r2"], "failover": {"cooldownDuration": 2000}}]}"#);
        assert_eq!(c.pools[0].label, "main");
        assert!(c.pools[1].label.starts_with("pool-"));
        assert_eq!(
            c.profiles[c.rules[1].profile].pool, 0,
            "same keys: the named global pool"
        );
    }

    #[test]
    fn rules_only_config_leaves_unmatched_requests_alone() {
        let c = ok(r#"{"_rules_": [{"_match_service_": ["llm.svc"], "apiTokens": ["a"]}]}"#);
        assert_eq!(c.global, None);
        assert_eq!(c.rules.len(), 1);
    }

    #[test]
    fn fingerprints_and_labels_are_stable_and_do_not_reveal_the_key() {
        let c = ok(r#"{"apiTokens": ["sk-abcdef0123456789"]}"#);
        let k = &c.pools[0].keys[0];
        assert_eq!(k.fingerprint, fnv1a64(b"sk-abcdef0123456789"));
        assert!(!k.label().contains("abcdef"));
        let again = ok(r#"{"apiTokens": ["sk-abcdef0123456789"]}"#);
        assert_eq!(again.pools[0].id, c.pools[0].id);
    }

    #[test]
    fn retry_on_failure_errors_name_the_field() {
        let table: &[(&str, &str, &str)] = &[
            (
                r#"{"apiTokens": ["a"], "retryOnFailure": true}"#,
                "retryOnFailure",
                "object",
            ),
            (
                r#"{"apiTokens": ["a"], "retryOnFailure": {"maxRetries": 0}}"#,
                "retryOnFailure.maxRetries",
                "from 1 to 10",
            ),
            (
                r#"{"apiTokens": ["a"], "retryOnFailure": {"retryTimeout": 0}}"#,
                "retryOnFailure.retryTimeout",
                "from 1",
            ),
            (
                r#"{"apiTokens": ["a"], "retryOnFailure": {"retryOnStatus": []}}"#,
                "retryOnFailure.retryOnStatus",
                "never retry",
            ),
            (
                r#"{"apiTokens": ["a"], "retryOnFailure": {"retryOnStatus": ["4x"]}}"#,
                "retryOnFailure.retryOnStatus[0]",
                "status pattern",
            ),
            (
                r#"{"apiTokens": ["a"], "retryOnFailure": {"attempts": 2}}"#,
                "retryOnFailure.attempts",
                "unknown field",
            ),
            (
                r#"{"apiTokens": ["a"], "retryOnFailure": {"enabled": "yes"}}"#,
                "retryOnFailure.enabled",
                "true or false",
            ),
        ];
        for (json, field, needle) in table {
            let e = fails(json);
            assert_eq!(e.field, *field, "{json}: {e}");
            assert!(
                e.message.contains(needle),
                "{json}: {e} (wanted {needle:?})"
            );
        }
        let c = ok(
            r#"{"apiTokens": ["a"], "retryOnFailure": {"enabled": true, "maxRetries": 3, "retryTimeout": 5000,
            "retryOnStatus": ["429"], "maxBodyBytes": 1024}}"#,
        );
        let r = &c.profiles[0].retry;
        assert!(
            r.enabled && r.max_retries == 3 && r.timeout_ms == 5000 && r.max_body_bytes == 1024
        );
        assert!(
            r.on_status.iter().any(|p| p.matches(429))
                && !r.on_status.iter().any(|p| p.matches(503))
        );
    }

    #[test]
    fn health_check_fields_are_validated() {
        let table: &[(&str, &str, &str)] = &[
            (
                r#"{"apiTokens": ["a"], "failover": {"healthCheckModel": ""}}"#,
                "failover.healthCheckModel",
                "model name",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"healthCheckModel": "a b"}}"#,
                "failover.healthCheckModel",
                "no spaces",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"healthCheckModel": 4}}"#,
                "failover.healthCheckModel",
                "model name",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"healthCheckTimeout": 0}}"#,
                "failover.healthCheckTimeout",
                "from 1",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"successThreshold": 0}}"#,
                "failover.successThreshold",
                "from 1",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"healthCheckPath": "v1/chat"}}"#,
                "failover.healthCheckPath",
                "starting with '/'",
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"healthCheckCluster": ""}}"#,
                "failover.healthCheckCluster",
                "cluster",
            ),
        ];
        for (json, field, needle) in table {
            let e = fails(json);
            assert_eq!(e.field, *field, "{json}: {e}");
            assert!(
                e.message.contains(needle),
                "{json}: {e} (wanted {needle:?})"
            );
        }
        let c = ok(r#"{"apiTokens": ["a"], "failover": {"healthCheckInterval": 2000}}"#);
        assert_eq!(
            c.profiles[0].failover.health_check, None,
            "no model, no checks"
        );
        let c = ok(
            r#"{"apiTokens": ["a"], "failover": {"healthCheckModel": "m", "healthCheckPath": "/x",
            "healthCheckCluster": "outbound|443||api.openai.com", "successThreshold": 2}}"#,
        );
        let hc = c.profiles[0].failover.health_check.clone().unwrap();
        assert_eq!(hc.path.as_deref(), Some("/x"));
        assert_eq!(hc.cluster.as_deref(), Some("outbound|443||api.openai.com"));
        assert_eq!(hc.success_threshold, 2);
    }

    #[test]
    fn fallbacks_are_pools_of_their_own_that_inherit_settings() {
        let c = ok(
            r#"{"name": "primary", "apiTokens": ["p1", "p2"], "failover": {"cooldownDuration": 5000},
            "authHeader": {"name": "x-p", "prefix": ""}, "exposeKeyName": true,
            "fallbacks": [
                {"name": "backup", "apiTokens": ["b1"], "provider": "anthropic", "model": "claude-x", "cluster": "anthropic"},
                {"name": "last", "apiTokens": ["l1"], "failover": {"failureThreshold": 3}}
            ]}"#,
        );
        let primary = &c.profiles[c.global.unwrap()];
        assert_eq!(primary.fallbacks.len(), 2);
        let backup = &c.profiles[primary.fallbacks[0]];
        assert_eq!(c.pools[backup.pool].label, "backup");
        assert_eq!(
            backup.auth.name, "x-api-key",
            "a fallback's provider wins over the inherited authHeader"
        );
        assert_eq!(backup.model.as_deref(), Some("claude-x"));
        assert_eq!(backup.cluster.as_deref(), Some("anthropic"));
        assert_eq!(backup.failover.cooldown_ms, 5000, "inherited");
        assert!(backup.fallbacks.is_empty());
        let last = &c.profiles[primary.fallbacks[1]];
        assert_eq!(
            last.auth.name, "authorization",
            "no provider set: the default, not the primary's header"
        );
        assert_eq!(last.failover.failure_threshold, 3);
        assert_eq!(last.failover.cooldown_ms, 5000);
        assert_eq!(last.model, None);
        assert_eq!(c.pools.len(), 3);
    }

    #[test]
    fn fallback_errors_name_the_field() {
        let table: &[(&str, &str, &str)] = &[
            (
                r#"{"apiTokens": ["a"], "fallbacks": {}}"#,
                "fallbacks",
                "list of pools",
            ),
            (
                r#"{"apiTokens": ["a"], "fallbacks": [3]}"#,
                "fallbacks[0]",
                "object",
            ),
            (
                r#"{"apiTokens": ["a"], "fallbacks": [{"apiTokens": ["b"]}]}"#,
                "fallbacks[0].name",
                "required",
            ),
            (
                r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f"}]}"#,
                "fallbacks[0].apiTokens",
                "required",
            ),
            (
                r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["b"], "model": ""}]}"#,
                "fallbacks[0].model",
                "model name",
            ),
            (
                r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["b"], "retryOnFailure": {}}]}"#,
                "fallbacks[0].retryOnFailure",
                "unknown field",
            ),
            (
                r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["b"], "fallbacks": []}]}"#,
                "fallbacks[0].fallbacks",
                "unknown field",
            ),
            (
                r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["a"]}]}"#,
                "fallbacks[0].name",
                "same key list",
            ),
            (
                r#"{"name": "f", "apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["a"]}]}"#,
                "fallbacks",
                "same keys",
            ),
            (
                r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["b"], "failover": {"cooldownDuration": 500, "minCooldownDuration": 1000}}]}"#,
                "fallbacks[0].failover.cooldownDuration",
                "between",
            ),
            (
                r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["b"]}, {"name": "f", "apiTokens": ["c"]}]}"#,
                "fallbacks[1].name",
                "already names a pool",
            ),
        ];
        for (json, field, needle) in table {
            let e = fails(json);
            assert_eq!(e.field, *field, "{json}: {e}");
            assert!(
                e.message.contains(needle),
                "{json}: {e} (wanted {needle:?})"
            );
        }
    }

    #[test]
    fn higress_sub_second_timings_load_and_lower_the_default_minimum() {
        for ms in [100, 200, 300, 500] {
            let c = ok(&format!(
                r#"{{"apiTokens": ["a"], "failover": {{"cooldownDuration": {ms}, "healthCheckModel": "m",
                "healthCheckInterval": {ms}, "healthCheckTimeout": {ms}}}}}"#
            ));
            let f = &c.profiles[0].failover;
            assert_eq!(
                (f.cooldown_ms, f.min_cooldown_ms),
                (ms, ms),
                "an explicit shorter cooldown is the minimum"
            );
            let hc = f.health_check.as_ref().unwrap();
            assert_eq!((hc.interval_ms, hc.timeout_ms), (ms, ms));
            assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        }
        let c = ok(r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": 5000}}"#);
        assert_eq!(
            c.profiles[0].failover.min_cooldown_ms, 1_000,
            "a longer cooldown keeps the default minimum"
        );
        let c = ok(
            r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": 300, "minCooldownDuration": 50}}"#,
        );
        assert_eq!(c.profiles[0].failover.min_cooldown_ms, 50);
        let e = fails(
            r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": 100, "minCooldownDuration": 200}}"#,
        );
        assert_eq!(e.field, "failover.cooldownDuration", "{e}");
        assert!(
            e.message.contains("between minCooldownDuration (200)"),
            "{e}"
        );
        let c = ok(
            r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": 50, "maxCooldownDuration": 60}}"#,
        );
        assert_eq!(
            (
                c.profiles[0].failover.min_cooldown_ms,
                c.profiles[0].failover.max_cooldown_ms
            ),
            (50, 60)
        );
        // Higress takes any positive interval; below the fastest tick it loads with a warning.
        let c = ok(
            r#"{"apiTokens": ["a"], "failover": {"healthCheckModel": "m", "healthCheckInterval": 50}}"#,
        );
        assert_eq!(
            c.profiles[0]
                .failover
                .health_check
                .as_ref()
                .unwrap()
                .interval_ms,
            50
        );
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("failover.healthCheckInterval") && w.contains("every 100 ms")),
            "{:?}",
            c.warnings
        );
        // A rule inherits the global cooldown; its own shorter one lowers only its minimum.
        let c = ok(
            r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": 2000},
            "_rules_": [{"_match_route_": ["r"], "apiTokens": ["b"], "failover": {"cooldownDuration": 100}}]}"#,
        );
        let (g, r) = (&c.profiles[0].failover, &c.profiles[1].failover);
        assert_eq!((g.min_cooldown_ms, r.min_cooldown_ms), (1_000, 100));
    }

    #[test]
    fn health_check_authority_is_validated() {
        let c = ok(
            r#"{"apiTokens": ["a"], "failover": {"healthCheckModel": "m", "healthCheckAuthority": "api.openai.com:443"}}"#,
        );
        assert_eq!(
            c.profiles[0]
                .failover
                .health_check
                .as_ref()
                .unwrap()
                .authority
                .as_deref(),
            Some("api.openai.com:443")
        );
        for bad in [
            r#""""#,
            r#""a b""#,
            r#""api.openai.com/v1""#,
            "7",
            r#""x\r\ny""#,
        ] {
            let e = fails(&format!(
                r#"{{"apiTokens": ["a"], "failover": {{"healthCheckModel": "m", "healthCheckAuthority": {bad}}}}}"#
            ));
            assert_eq!(e.field, "failover.healthCheckAuthority", "{bad}: {e}");
            assert!(e.message.contains("host name"), "{e}");
        }
    }

    /// Two keys whose 32-bit short hashes are equal, found by brute force (about 2^16 tries).
    fn short_hash_collision() -> (String, String) {
        let mut seen = std::collections::HashMap::new();
        for i in 0u64.. {
            let token = format!("sk-collide-{i}");
            let short = short_hash("key", fnv1a64(token.as_bytes()));
            if let Some(other) = seen.insert(short, token.clone()) {
                return (other, token);
            }
        }
        unreachable!()
    }

    #[test]
    fn keys_whose_short_hashes_collide_get_distinct_labels_and_stats() {
        let (a, b) = short_hash_collision();
        let (fa, fb) = (fnv1a64(a.as_bytes()), fnv1a64(b.as_bytes()));
        assert_eq!(
            short_hash("key", fa),
            short_hash("key", fb),
            "a real collision"
        );
        let c = ok(&format!(
            r#"{{"name": "p", "apiTokens": ["{a}", "sk-other", "{b}"]}}"#
        ));
        let labels: Vec<String> = c.pools[0].keys.iter().map(|k| k.label()).collect();
        assert_eq!(
            labels[0],
            format!("key-{fa:016x}"),
            "lengthened to the whole fingerprint"
        );
        assert_eq!(labels[2], format!("key-{fb:016x}"));
        assert_eq!(
            labels[1],
            short_hash("key", fnv1a64(b"sk-other")),
            "others keep theirs"
        );
        let stats: std::collections::HashSet<String> = labels
            .iter()
            .map(|l| crate::core::metrics::key_metric_name("p", l, "available"))
            .collect();
        assert_eq!(stats.len(), 3, "one stat per key: {stats:?}");
        assert!(labels.iter().all(|l| !l.contains("collide")), "{labels:?}");
        // The same list in another order gets the same labels.
        let again = ok(&format!(
            r#"{{"name": "p", "apiTokens": ["{b}", "sk-other", "{a}"]}}"#
        ));
        let mut l1 = labels.clone();
        let mut l2: Vec<String> = again.pools[0].keys.iter().map(|k| k.label()).collect();
        l1.sort();
        l2.sort();
        assert_eq!(l1, l2);
    }

    #[test]
    fn a_name_that_equals_another_keys_short_hash_does_not_share_its_stats() {
        let fp = fnv1a64(b"sk-plain");
        let taken = short_hash("key", fp);
        let c = ok(&format!(
            r#"{{"apiTokens": ["sk-plain", {{"token": "sk-named", "name": "{taken}"}}]}}"#
        ));
        let keys = &c.pools[0].keys;
        assert_eq!(keys[1].label(), taken, "a configured name is kept");
        assert_eq!(keys[0].label(), format!("key-{fp:016x}"));
        // Even the long form taken by a name: a suffix keeps labels apart.
        let long = format!("key-{fp:016x}");
        let c = ok(&format!(
            r#"{{"apiTokens": ["sk-plain", {{"token": "sk-b", "name": "{taken}"}}, {{"token": "sk-c", "name": "{long}"}}]}}"#
        ));
        assert_eq!(c.pools[0].keys[0].label(), format!("{long}-2"));
    }

    #[test]
    fn labels_are_unique_even_when_every_short_hash_collides() {
        let mut keys: Vec<KeyConfig> = (0..50u64)
            .map(|i| KeyConfig {
                token: format!("t{i}"),
                name: (i % 7 == 0).then(|| format!("key-{:016x}", i + 1)),
                weight: 1,
                fingerprint: i,
                label: String::new(),
            })
            .collect();
        unique_labels(&mut keys, |_| "key-00000000".to_string());
        let labels: std::collections::HashSet<String> = keys.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), keys.len(), "{labels:?}");
    }

    #[test]
    fn ten_thousand_keys_get_unique_labels() {
        let tokens: Vec<String> = (0..MAX_KEYS_PER_POOL)
            .map(|i| format!("\"sk-bulk-{i:05}\""))
            .collect();
        let c = ok(&format!(r#"{{"apiTokens": [{}]}}"#, tokens.join(",")));
        let labels: std::collections::HashSet<String> =
            c.pools[0].keys.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), MAX_KEYS_PER_POOL);
    }

    #[test]
    fn affinity_wait_and_preemptive_cooldown_parse_and_rules_inherit_them() {
        let c = ok(
            r#"{"apiTokens": ["a"], "affinity": {"header": "X-Session-ID"},
                      "onAllUnavailable": "wait", "maxWaitMs": 500,
                      "failover": {"preemptiveCooldown": true},
                      "_rules_": [{"_match_route_": ["r"], "apiTokens": ["b"]},
                                  {"_match_route_": ["q"], "apiTokens": ["c"], "maxWaitMs": 30000,
                                   "affinity": {"header": "x-mse-consumer"}}]}"#,
        );
        let p = &c.profiles;
        assert_eq!(p[0].affinity_header.as_deref(), Some("x-session-id"));
        assert_eq!(p[0].on_all_unavailable, OnAllUnavailable::Wait);
        assert_eq!(
            (p[0].max_wait_ms, p[1].max_wait_ms, p[2].max_wait_ms),
            (500, 500, 30_000)
        );
        assert_eq!(p[1].affinity_header.as_deref(), Some("x-session-id"));
        assert_eq!(p[2].affinity_header.as_deref(), Some("x-mse-consumer"));
        assert!(p.iter().all(|p| p.failover.preemptive_cooldown));
        let d = ok(r#"{"apiTokens": ["a"]}"#);
        assert_eq!(d.profiles[0].affinity_header, None);
        assert_eq!(d.profiles[0].max_wait_ms, MAX_WAIT_DEFAULT_MS);
        assert_eq!(
            d.profiles[0].failover.preemptive_cooldown,
            PREEMPTIVE_COOLDOWN_DEFAULT
        );
    }
}
