//! JSON → [`PluginConfig`]: the global part, each `_rules_` entry merged over it, and each
//! fallback, checked field by field. Unknown fields are refused; keys starting with `_` are
//! Higress's and pass. A rule inherits every global field it does not set.

use serde_json::{Map, Value};

use super::fields::{
    boolean, check_unknown, err, integer, is_authority, is_header_token, is_printable_ascii,
    is_visible_ascii, one_of, parse_name, section, string_list, text,
};
use super::keys::parse_keys;
use super::*;
use crate::core::env_keys::{self, EnvLookup};
use crate::core::rules::DomainPattern;
use crate::core::status::{shadowed_codes, StatusPattern};

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

// Why the parsers below are `#[inline(never)]`: LLVM inlines every function with one caller, which
// made `Builder::profile` one 13 KB function. V8 compiles every function of the module with
// TurboFan at load, and its scratch memory grows faster than the function; the allocator keeps
// that memory. Split into parts, the same code costs Envoy about 1 MiB less resident memory
// (README.md, Performance). None of it runs per request.
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
        let name = obj
            .get("name")
            .map(|v| parse_name(v, &field("name")))
            .transpose()?;
        let provider = one_of(
            obj.get("provider"),
            &field("provider"),
            DEFAULT_PROVIDER,
            &PROVIDER_NAMES,
            "must be one of \"openai\", \"azure\", \"anthropic\", \"gemini\"; for another API set authHeader",
        )?;
        let auth = match obj.get("authHeader") {
            None => provider.auth_header(),
            Some(v) => parse_auth_header(v, &field("authHeader"))?,
        };
        let selection = one_of(
            obj.get("selection"),
            &field("selection"),
            DEFAULT_SELECTION,
            &SELECTION_NAMES,
            "must be \"round_robin\", \"random\" or \"weighted\"",
        )?;
        let on_all_unavailable = one_of(
            obj.get("onAllUnavailable"),
            &field("onAllUnavailable"),
            DEFAULT_ON_ALL_UNAVAILABLE,
            &ON_ALL_UNAVAILABLE_NAMES,
            "must be \"earliest\", \"reject\" or \"wait\"",
        )?;
        let expose_key_name = boolean(
            obj.get("exposeKeyName"),
            &field("exposeKeyName"),
            DEFAULT_EXPOSE_KEY_NAME,
        )?;
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
            let printable: fn(&str) -> bool = |s| !s.is_empty() && is_printable_ascii(s);
            let model = text(
                entry.get("model"),
                &format!("{at}.model"),
                printable,
                "must be a model name (printable text)",
            )?;
            let cluster = text(
                entry.get("cluster"),
                &format!("{at}.cluster"),
                printable,
                "must be the name of an Envoy cluster",
            )?;
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
        let obj = section(v, prefix, &empty)?;
        check_unknown(obj, FAILOVER_FIELDS, &format!("{prefix}."))?;
        let field = |name: &str| format!("{prefix}.{name}");
        let enabled = boolean(
            obj.get("enabled"),
            &field("enabled"),
            DEFAULT_FAILOVER_ENABLED,
        )?;
        let failure_threshold = integer(
            obj.get("failureThreshold"),
            &field("failureThreshold"),
            DEFAULT_FAILURE_THRESHOLD,
            1,
            MAX_FAILURE_THRESHOLD,
        )? as u32;
        let cooldown_ms = integer(
            obj.get("cooldownDuration"),
            &field("cooldownDuration"),
            DEFAULT_COOLDOWN_MS,
            1,
            MAX_DURATION_MS,
        )?;
        let max_cooldown_ms = integer(
            obj.get("maxCooldownDuration"),
            &field("maxCooldownDuration"),
            DEFAULT_MAX_COOLDOWN_MS,
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
            DEFAULT_DISABLE_MS,
            0,
            MAX_DURATION_MS,
        )?;
        let respect_retry_after = boolean(
            obj.get("respectRetryAfter"),
            &field("respectRetryAfter"),
            DEFAULT_RESPECT_RETRY_AFTER,
        )?;
        let backoff_permille = match obj.get("cooldownBackoff") {
            None => DEFAULT_BACKOFF_PERMILLE,
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
            &DEFAULT_FAILOVER_ON_STATUS,
        )?;
        let disable_on_status = self.patterns(
            obj.get("disableOnStatus"),
            &field("disableOnStatus"),
            &DEFAULT_DISABLE_ON_STATUS,
        )?;
        Ok(Failover {
            enabled,
            failure_threshold,
            failover_on_status: StatusSet::of(&failover_on_status),
            disable_on_status: StatusSet::of(&disable_on_status),
            cooldown_ms,
            disable_ms,
            respect_retry_after,
            min_cooldown_ms,
            max_cooldown_ms,
            backoff_permille,
            health_check,
            preemptive_cooldown: boolean(
                obj.get("preemptiveCooldown"),
                &field("preemptiveCooldown"),
                PREEMPTIVE_COOLDOWN_DEFAULT,
            )?,
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
            DEFAULT_HEALTH_CHECK_INTERVAL_MS,
            1,
            MAX_DURATION_MS,
        )?;
        let timeout_ms = integer(
            obj.get("healthCheckTimeout"),
            &field("healthCheckTimeout"),
            DEFAULT_HEALTH_CHECK_TIMEOUT_MS,
            1,
            MAX_DURATION_MS,
        )?;
        let success_threshold = integer(
            obj.get("successThreshold"),
            &field("successThreshold"),
            DEFAULT_SUCCESS_THRESHOLD,
            1,
            MAX_SUCCESS_THRESHOLD,
        )? as u32;
        let text_field = |name: &str, message: &str, valid: fn(&str) -> bool| {
            text(obj.get(name), &field(name), valid, message)
        };
        let model = text_field(
            "healthCheckModel",
            "must be a model name such as \"gpt-4o-mini\" (printable ASCII, no spaces); it turns on health checks",
            |s| !s.is_empty() && s.len() <= 256 && is_visible_ascii(s) && !s.contains(['"', '\\']),
        )?;
        let path = text_field(
            "healthCheckPath",
            "must be a request path starting with '/', such as \"/v1/chat/completions\"",
            |s| s.starts_with('/') && s.len() <= 2048 && is_visible_ascii(s),
        )?;
        let cluster = text_field(
            "healthCheckCluster",
            "must be the name of an Envoy cluster",
            |s| !s.is_empty() && s.len() <= 1024 && is_visible_ascii(s),
        )?;
        if model.is_some() && interval_ms < crate::core::schedule::MIN_TICK_MS {
            self.warn(format!(
                "{}: {interval_ms} ms is shorter than the plugin's fastest tick; keys are checked every {} ms at most",
                field("healthCheckInterval"),
                crate::core::schedule::MIN_TICK_MS
            ));
        }
        let authority = text_field(
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
        let obj = section(v, prefix, &empty)?;
        check_unknown(obj, RETRY_FIELDS, &format!("{prefix}."))?;
        let field = |name: &str| format!("{prefix}.{name}");
        let enabled = boolean(obj.get("enabled"), &field("enabled"), DEFAULT_RETRY_ENABLED)?;
        let max_retries = integer(
            obj.get("maxRetries"),
            &field("maxRetries"),
            DEFAULT_MAX_RETRIES,
            1,
            MAX_RETRIES_LIMIT,
        )? as u32;
        let timeout_ms = integer(
            obj.get("retryTimeout"),
            &field("retryTimeout"),
            DEFAULT_RETRY_TIMEOUT_MS,
            1,
            MAX_DURATION_MS,
        )?;
        let max_body_bytes = integer(
            obj.get("maxBodyBytes"),
            &field("maxBodyBytes"),
            DEFAULT_MAX_BODY_BYTES,
            0,
            MAX_BODY_BYTES_LIMIT,
        )? as usize;
        let on_status = self.patterns(
            obj.get("retryOnStatus"),
            &field("retryOnStatus"),
            &DEFAULT_RETRY_ON_STATUS,
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
            on_status: StatusSet::of(&on_status),
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
        Some(Value::String(p)) if is_printable_ascii(p) => p.clone(),
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
    use super::super::testing::{assert_refused, fails, ok};
    use super::super::*;

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
        assert!(p.failover.disable_on_status.contains(402));
        assert!(!p.failover.disable_on_status.contains(429));
        assert!(!p.retry.enabled);
        assert_eq!(
            (
                p.retry.max_retries,
                p.retry.timeout_ms,
                p.retry.max_body_bytes
            ),
            (1, 30_000, 256 * 1024)
        );
        assert!(p.retry.on_status.contains(503));
        assert!(p.failover.failover_on_status.contains(429));
        assert!(p.failover.failover_on_status.contains(503));
        assert!(!p.failover.failover_on_status.contains(401));
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
    fn every_invalid_config_is_refused_naming_the_field() {
        // One row a line, so the table reads as one: (config, the field named, words of the error).
        #[rustfmt::skip]
        let table: &[(&str, &str, &str)] = &[
            ("not json", "", "not valid JSON"),
            ("[1]", "", "JSON object"),
            ("{}", "apiTokens", "required"),
            (r#"{"apiTokens": []}"#, "apiTokens", "at least one"),
            (r#"{"apiTokens": "sk"}"#, "apiTokens", "list of keys"),
            (r#"{"apiTokens": [""]}"#, "apiTokens[0]", "empty"),
            (r#"{"apiTokens": ["a", "a"]}"#, "apiTokens[1]", "same key as apiTokens[0]"),
            (r#"{"apiTokens": ["a b"]}"#, "apiTokens[0]", "whitespace"),
            (r#"{"apiTokens": ["a\r\nx-evil: 1"]}"#, "apiTokens[0]", "control"),
            (r#"{"apiTokens": ["a\u0000"]}"#, "apiTokens[0]", "control"),
            (r#"{"apiTokens": ["é"]}"#, "apiTokens[0]", "non-ASCII"),
            (r#"{"apiTokens": [7]}"#, "apiTokens[0]", "key string"),
            (r#"{"apiTokens": [{"name": "x"}]}"#, "apiTokens[0].token", "required"),
            (r#"{"apiTokens": [{"token": "a", "weight": 0}]}"#, "apiTokens[0].weight", "from 1 to 1000"),
            (r#"{"apiTokens": [{"token": "a", "weight": 2.5}]}"#, "apiTokens[0].weight", "whole number"),
            (r#"{"apiTokens": [{"token": "a", "wieght": 2}]}"#, "apiTokens[0].wieght", "unknown field"),
            (r#"{"apiTokens": [{"token": "a", "name": "bad name"}]}"#, "apiTokens[0].name", "letters"),
            (r#"{"apiTokens": [{"token": "a", "name": "n"}, {"token": "b", "name": "n"}]}"#, "apiTokens[1].name", "already"),
            (r#"{"apiTokens": ["a"], "provider": "bedrock"}"#, "provider", "authHeader"),
            (r#"{"apiTokens": ["a"], "authHeader": {"prefix": "x"}}"#, "authHeader.name", "required"),
            (r#"{"apiTokens": ["a"], "authHeader": {"name": "bad header"}}"#, "authHeader.name", "header name"),
            (r#"{"apiTokens": ["a"], "authHeader": {"name": "host"}}"#, "authHeader.name", "not a credential header"),
            (r#"{"apiTokens": ["a"], "authHeader": {"name": "x-k", "prefix": "a\nb"}}"#, "authHeader.prefix", "control"),
            (r#"{"apiTokens": ["a"], "selection": "fastest"}"#, "selection", "round_robin"),
            (r#"{"apiTokens": ["a"], "onAllUnavailable": "hold"}"#, "onAllUnavailable", "\"earliest\", \"reject\" or \"wait\""),
            (r#"{"apiTokens": ["a"], "maxWaitMs": 30001}"#, "maxWaitMs", "from 1 to 30000"),
            (r#"{"apiTokens": ["a"], "maxWaitMs": 0}"#, "maxWaitMs", "from 1"),
            (r#"{"apiTokens": ["a"], "affinity": "x-s"}"#, "affinity", "object"),
            (r#"{"apiTokens": ["a"], "affinity": {}}"#, "affinity.header", "required"),
            (r#"{"apiTokens": ["a"], "affinity": {"header": "bad name"}}"#, "affinity.header", "x-session-id"),
            (r#"{"apiTokens": ["a"], "affinity": {"header": ":path"}}"#, "affinity.header", "required"),
            (r#"{"apiTokens": ["a"], "affinity": {"header": "x", "hash": "ring"}}"#, "affinity.hash", ""),
            (r#"{"apiTokens": ["a"], "failover": {"preemptiveCooldown": 1}}"#, "failover.preemptiveCooldown", "true or false"),
            (r#"{"apiTokens": ["a"], "name": "has space"}"#, "name", "letters"),
            (r#"{"apiTokens": ["a"], "failover": true}"#, "failover", "object"),
            (r#"{"apiTokens": ["a"], "failover": {"enabled": "yes"}}"#, "failover.enabled", "true or false"),
            (r#"{"apiTokens": ["a"], "failover": {"failureThreshold": 0}}"#, "failover.failureThreshold", "from 1"),
            (r#"{"apiTokens": ["a"], "failover": {"failureThreshold": -1}}"#, "failover.failureThreshold", "whole number"),
            (r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": 0}}"#, "failover.cooldownDuration", "from 1"),
            (r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": "60s"}}"#, "failover.cooldownDuration", "whole number"),
            (r#"{"apiTokens": ["a"], "failover": {"healthCheckInterval": 0}}"#, "failover.healthCheckInterval", "from 1"),
            (r#"{"apiTokens": ["a"], "failover": {"failoverOnStatus": "429"}}"#, "failover.failoverOnStatus", "list"),
            (r#"{"apiTokens": ["a"], "failover": {"failoverOnStatus": []}}"#, "failover.failoverOnStatus", "enabled to false"),
            (r#"{"apiTokens": ["a"], "failover": {"failoverOnStatus": ["429", "5*"]}}"#, "failover.failoverOnStatus[1]", "status pattern"),
            (r#"{"apiTokens": ["a"], "failover": {"cooldown": 5}}"#, "failover.cooldown", "unknown field"),
            (r#"{"apiTokens": ["a"], "retries": 3}"#, "retries", "unknown field"),
            (r#"{"apiTokens": ["a"], "_rules_": {}}"#, "_rules_", "list"),
            (r#"{"apiTokens": ["a"], "_rules_": [5]}"#, "_rules_[0]", "object"),
            (r#"{"apiTokens": ["a"], "_rules_": [{"apiTokens": ["b"]}]}"#, "_rules_[0]", "no match key"),
            (r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": ["r"], "_match_domain_": ["d"]}]}"#, "_rules_[0]", "several match keys"),
            (r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": []}]}"#, "_rules_[0]._match_route_", "at least one"),
            (r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": "r"}]}"#, "_rules_[0]._match_route_", "list of strings"),
            (r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": [""]}]}"#, "_rules_[0]._match_route_[0]", "non-empty"),
            (r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": ["r"], "failover": {"cooldownDuration": -5}}]}"#, "_rules_[0].failover.cooldownDuration", "whole number"),
            (r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": ["r"], "bogus": 1}]}"#, "_rules_[0].bogus", "unknown field"),
            (r#"{"_rules_": [{"_match_route_": ["r"], "provider": "azure"}]}"#, "_rules_[0].apiTokens", "required"),
            (r#"{"provider": "nope", "_rules_": [{"_match_route_": ["r"], "apiTokens": ["a"]}]}"#, "provider", "one of"),
            (r#"{"apiTokens": ["a"], "name": "p", "_rules_": [{"_match_route_": ["r"], "apiTokens": ["b"], "name": "p"}]}"#, "_rules_[0].name", "already names a pool"),
            // retryOnFailure
            (r#"{"apiTokens": ["a"], "retryOnFailure": true}"#, "retryOnFailure", "object"),
            (r#"{"apiTokens": ["a"], "retryOnFailure": {"maxRetries": 0}}"#, "retryOnFailure.maxRetries", "from 1 to 10"),
            (r#"{"apiTokens": ["a"], "retryOnFailure": {"retryTimeout": 0}}"#, "retryOnFailure.retryTimeout", "from 1"),
            (r#"{"apiTokens": ["a"], "retryOnFailure": {"retryOnStatus": []}}"#, "retryOnFailure.retryOnStatus", "never retry"),
            (r#"{"apiTokens": ["a"], "retryOnFailure": {"retryOnStatus": ["4x"]}}"#, "retryOnFailure.retryOnStatus[0]", "status pattern"),
            (r#"{"apiTokens": ["a"], "retryOnFailure": {"attempts": 2}}"#, "retryOnFailure.attempts", "unknown field"),
            (r#"{"apiTokens": ["a"], "retryOnFailure": {"enabled": "yes"}}"#, "retryOnFailure.enabled", "true or false"),
            // health checks
            (r#"{"apiTokens": ["a"], "failover": {"healthCheckModel": ""}}"#, "failover.healthCheckModel", "model name"),
            (r#"{"apiTokens": ["a"], "failover": {"healthCheckModel": "a b"}}"#, "failover.healthCheckModel", "no spaces"),
            (r#"{"apiTokens": ["a"], "failover": {"healthCheckModel": 4}}"#, "failover.healthCheckModel", "model name"),
            (r#"{"apiTokens": ["a"], "failover": {"healthCheckTimeout": 0}}"#, "failover.healthCheckTimeout", "from 1"),
            (r#"{"apiTokens": ["a"], "failover": {"successThreshold": 0}}"#, "failover.successThreshold", "from 1"),
            (r#"{"apiTokens": ["a"], "failover": {"healthCheckPath": "v1/chat"}}"#, "failover.healthCheckPath", "starting with '/'"),
            (r#"{"apiTokens": ["a"], "failover": {"healthCheckCluster": ""}}"#, "failover.healthCheckCluster", "cluster"),
            // fallbacks
            (r#"{"apiTokens": ["a"], "fallbacks": {}}"#, "fallbacks", "list of pools"),
            (r#"{"apiTokens": ["a"], "fallbacks": [3]}"#, "fallbacks[0]", "object"),
            (r#"{"apiTokens": ["a"], "fallbacks": [{"apiTokens": ["b"]}]}"#, "fallbacks[0].name", "required"),
            (r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f"}]}"#, "fallbacks[0].apiTokens", "required"),
            (r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["b"], "model": ""}]}"#, "fallbacks[0].model", "model name"),
            (r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["b"], "retryOnFailure": {}}]}"#, "fallbacks[0].retryOnFailure", "unknown field"),
            (r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["b"], "fallbacks": []}]}"#, "fallbacks[0].fallbacks", "unknown field"),
            (r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["a"]}]}"#, "fallbacks[0].name", "same key list"),
            (r#"{"name": "f", "apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["a"]}]}"#, "fallbacks", "same keys"),
            (r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["b"], "failover": {"cooldownDuration": 500, "minCooldownDuration": 1000}}]}"#, "fallbacks[0].failover.cooldownDuration", "between"),
            (r#"{"apiTokens": ["a"], "fallbacks": [{"name": "f", "apiTokens": ["b"]}, {"name": "f", "apiTokens": ["c"]}]}"#, "fallbacks[1].name", "already names a pool"),
            // the rest of what test/e2e/test_config.py used to boot Envoy for
            (r#"{"apiTokens": ["a "]}"#, "apiTokens[0]", "whitespace"),
            (r#"{"apiTokens": ["a\r\nx-injected: 1"]}"#, "apiTokens[0]", "control character"),
            (r#"{"apiTokens": []}"#, "apiTokens", "at least one key"),
            (r#"{"apiTokens": ["a"], "provider": "bedrock"}"#, "provider", "must be one of"),
            (r#"{"apiTokens": ["a"], "failover": {"failureThreshold": 0}}"#, "failover.failureThreshold", "whole number from 1"),
            (r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": 0}}"#, "failover.cooldownDuration", "whole number from 1"),
            (r#"{"apiTokens": ["a"], "failover": {"failoverOnStatus": ["5*"]}}"#, "failover.failoverOnStatus[0]", "not a status pattern"),
            (r#"{"apiTokens": ["a"], "cooldown": 5}"#, "cooldown", "unknown field"),
            (r#"{"apiTokens": ["a"], "_rules_": [{"_match_route_": ["r"], "failover": {"cooldownDuration": -1}}]}"#, "_rules_[0].failover.cooldownDuration", "whole number"),
        ];
        assert_refused(table);
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
    fn retry_on_failure_fields_are_read() {
        let c = ok(
            r#"{"apiTokens": ["a"], "retryOnFailure": {"enabled": true, "maxRetries": 3, "retryTimeout": 5000,
            "retryOnStatus": ["429"], "maxBodyBytes": 1024}}"#,
        );
        let r = &c.profiles[0].retry;
        assert!(
            r.enabled && r.max_retries == 3 && r.timeout_ms == 5000 && r.max_body_bytes == 1024
        );
        assert!(r.on_status.contains(429) && !r.on_status.contains(503));
    }

    #[test]
    fn health_check_fields_are_read() {
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
