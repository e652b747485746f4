//! config::parse on arbitrary bytes: never panics; whatever it accepts is internally consistent
//! and carries no token that could inject a header; no error or warning quotes a key.
#![no_main]

use ai_key_failover::core::config;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => {
            for (k, x) in o {
                out.push(k.clone());
                strings(x, out);
            }
        }
        _ => {}
    }
}

/// The strings under any `apiTokens` (plain or `{"token": ...}`), at any depth.
fn tokens(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| tokens(x, out)),
        Value::Object(o) => {
            for (k, x) in o {
                if k == "apiTokens" {
                    for t in x.as_array().into_iter().flatten() {
                        match t {
                            Value::String(s) => out.push(s.clone()),
                            Value::Object(t) => {
                                if let Some(Value::String(s)) = t.get("token") {
                                    out.push(s.clone());
                                }
                            }
                            _ => {}
                        }
                    }
                }
                tokens(x, out);
            }
        }
        _ => {}
    }
}

/// Keys (under `apiTokens`) of at least 12 characters, starting with `sk-`, that occur in exactly
/// one string of the document: if a message holds one, it can only have come from the key.
fn unique_keylike(text: &[u8]) -> Vec<String> {
    let Ok(root) = serde_json::from_slice::<Value>(text) else {
        return Vec::new();
    };
    let (mut all, mut keys) = (Vec::new(), Vec::new());
    strings(&root, &mut all);
    tokens(&root, &mut keys);
    keys.into_iter()
        .filter(|s| s.starts_with("sk-") && s.len() >= 12)
        .filter(|s| all.iter().filter(|t| t.contains(s.as_str())).count() == 1)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    match config::parse(data) {
        Err(e) => {
            let message = e.to_string();
            for key in unique_keylike(data) {
                assert!(!message.contains(&key), "an error quotes a key: {message}");
            }
        }
        Ok(cfg) => {
            assert!(cfg.global.is_none_or(|g| g < cfg.profiles.len()));
            assert!(cfg.rules.iter().all(|r| r.profile < cfg.profiles.len()));
            for p in &cfg.profiles {
                assert!(p.pool < cfg.pools.len());
                // The header the key goes in, and its prefix, cannot split a header line.
                assert!(!p.auth.name.is_empty());
                assert!(p
                    .auth
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b':'));
                assert!(p.auth.prefix.bytes().all(|b| (0x20..=0x7e).contains(&b)));
                let f = &p.failover;
                assert!(f.min_cooldown_ms <= f.cooldown_ms && f.cooldown_ms <= f.max_cooldown_ms);
                assert!(f.failure_threshold >= 1);
            }
            for pool in &cfg.pools {
                assert!(!pool.keys.is_empty() && pool.keys.len() <= config::MAX_KEYS_PER_POOL);
                for k in &pool.keys {
                    // Printable ASCII, no whitespace, no control characters: no header injection.
                    assert!(!k.token.is_empty());
                    assert!(k.token.bytes().all(|b| (0x21..=0x7e).contains(&b)));
                    assert_eq!(k.fingerprint, config::fnv1a64(k.token.as_bytes()));
                    // What logs and stats call the key is never the key (unless named so).
                    if k.name.is_none() {
                        assert_ne!(k.label(), k.token);
                    }
                }
            }
            let keys = unique_keylike(data);
            for w in &cfg.warnings {
                for key in &keys {
                    assert!(!w.contains(key.as_str()), "a warning quotes a key: {w}");
                }
            }
        }
    }
});
