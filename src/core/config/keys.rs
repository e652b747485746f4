//! `apiTokens`: each entry (a key string, `{"token": ...}`, or `{"fromEnv": ...}`, which may stand
//! for several keys) becomes a validated key with a label no other key of its pool has. Errors
//! name where a key came from (`apiTokens[2] (key 3 of $OPENAI_KEYS)`), never the key.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::fields::{check_unknown, err, integer, is_valid_name, is_visible_ascii, parse_name};
use super::{fnv1a64, short_hash, ConfigError, KeyConfig, MAX_KEYS_PER_POOL};
use crate::core::env_keys::{self, EnvLookup};

const MAX_TOKEN_LEN: usize = 4096;
const MAX_WEIGHT: u64 = 1000;

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
pub(super) fn unique_labels(keys: &mut [KeyConfig], short: impl Fn(u64) -> String) {
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
/// The keys of one pool, validated and labelled. `field` is the `apiTokens` path.
#[inline(never)]
pub(super) fn parse_keys(
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
        if !is_visible_ascii(&token) {
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
    let name = o
        .get("name")
        .map(|n| parse_name(n, &format!("{at}.name")))
        .transpose()?;
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

#[cfg(test)]
mod tests {
    use super::super::testing::{fails, ok};
    use super::super::*;
    use super::*;

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
    fn fingerprints_and_labels_are_stable_and_do_not_reveal_the_key() {
        let c = ok(r#"{"apiTokens": ["sk-abcdef0123456789"]}"#);
        let k = &c.pools[0].keys[0];
        assert_eq!(k.fingerprint, fnv1a64(b"sk-abcdef0123456789"));
        assert!(!k.label().contains("abcdef"));
        let again = ok(r#"{"apiTokens": ["sk-abcdef0123456789"]}"#);
        assert_eq!(again.pools[0].id, c.pools[0].id);
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
}
