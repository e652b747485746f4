//! The key configuration accepted by `PUT /_mock/keys` and `--keys FILE`.

use std::collections::BTreeMap;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One scripted answer (`script` entries and `always`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    #[serde(default = "default_status")]
    pub status: u16,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// JSON value (sent verbatim as JSON) or string (sent as is). Missing or
    /// null: an OpenAI-style error for non-2xx, the normal completion for 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Box<RawValue>>,
    #[serde(default)]
    pub delay_ms: u64,
}

fn default_status() -> u16 {
    200
}

impl Entry {
    pub fn validate(&self) -> Result<(), String> {
        match StatusCode::from_u16(self.status) {
            Ok(s) if s.as_u16() >= 200 && s.as_u16() <= 599 => {}
            _ => return Err(format!("status {} is not in 200..=599", self.status)),
        }
        for (k, v) in &self.headers {
            HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("invalid header name {k:?}"))?;
            HeaderValue::from_bytes(v.as_bytes())
                .map_err(|_| format!("invalid value for header {k:?}"))?;
        }
        Ok(())
    }
}

/// Per-key behaviour.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Tokens per window (see `state::request_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub script: Vec<Entry>,
    #[serde(default)]
    pub always: Option<Entry>,
}

impl KeySpec {
    pub fn validate(&self) -> Result<(), String> {
        let limited = self.limit.is_some() || self.token_limit.is_some();
        match (limited, self.window_ms) {
            (true, Some(0)) => return Err("windowMs must be > 0".into()),
            (true, None) => return Err("limit and tokenLimit need windowMs".into()),
            (false, Some(_)) => return Err("windowMs needs limit or tokenLimit".into()),
            _ => {}
        }
        for (i, e) in self.script.iter().enumerate() {
            e.validate().map_err(|m| format!("script[{i}]: {m}"))?;
        }
        if let Some(e) = &self.always {
            e.validate().map_err(|m| format!("always: {m}"))?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigIn {
    require_known_key: Option<bool>,
    #[serde(default)]
    extra_key_headers: Vec<String>,
    #[serde(default)]
    stream_chunk_delay_ms: u64,
    #[serde(default)]
    keys: BTreeMap<String, KeySpec>,
}

/// A validated configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub require_known_key: bool,
    /// Lowercase header names.
    pub extra_key_headers: Vec<String>,
    pub stream_chunk_delay_ms: u64,
    pub keys: BTreeMap<String, KeySpec>,
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, String> {
        let raw: ConfigIn =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid configuration: {e}"))?;
        let mut extra = Vec::new();
        for h in raw.extra_key_headers {
            let name = HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("extraKeyHeaders: invalid header name {h:?}"))?;
            extra.push(name.as_str().to_string());
        }
        for (k, spec) in &raw.keys {
            spec.validate().map_err(|m| format!("keys[{k:?}]: {m}"))?;
        }
        Ok(Config {
            require_known_key: raw.require_known_key.unwrap_or(!raw.keys.is_empty()),
            extra_key_headers: extra,
            stream_chunk_delay_ms: raw.stream_chunk_delay_ms,
            keys: raw.keys,
        })
    }

    /// `--demo`: three keys with small windows so failover is visible.
    pub fn demo() -> Config {
        let limited = |limit| KeySpec {
            limit: Some(limit),
            window_ms: Some(10_000),
            ..KeySpec::default()
        };
        Config {
            require_known_key: true,
            extra_key_headers: Vec::new(),
            stream_chunk_delay_ms: 0,
            keys: BTreeMap::from([
                ("demo-key-1".to_string(), limited(3)),
                ("demo-key-2".to_string(), limited(5)),
                ("demo-key-3".to_string(), limited(20)),
            ]),
        }
    }
}

/// Body of `POST /_mock/keys/<key>/script`: a list of entries (a single
/// entry object is accepted too).
pub fn parse_entries(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let is_object = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    let entries = if is_object {
        vec![serde_json::from_slice::<Entry>(bytes).map_err(|e| format!("invalid entry: {e}"))?]
    } else {
        serde_json::from_slice::<Vec<Entry>>(bytes)
            .map_err(|e| format!("expected a list of entries: {e}"))?
    };
    for (i, e) in entries.iter().enumerate() {
        e.validate().map_err(|m| format!("entry {i}: {m}"))?;
    }
    Ok(entries)
}

/// Body of `PUT /_mock/keys/<key>/always`: an entry or `null`.
pub fn parse_always(bytes: &[u8]) -> Result<Option<Entry>, String> {
    let entry: Option<Entry> =
        serde_json::from_slice(bytes).map_err(|e| format!("expected an entry or null: {e}"))?;
    if let Some(e) = &entry {
        e.validate()?;
    }
    Ok(entry)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn require_known_key_defaults() {
        assert!(!Config::parse(b"{}").unwrap().require_known_key);
        assert!(
            Config::parse(br#"{"keys":{"a":{}}}"#)
                .unwrap()
                .require_known_key
        );
        let c = Config::parse(br#"{"requireKnownKey":false,"keys":{"a":{}}}"#).unwrap();
        assert!(!c.require_known_key);
    }

    #[test]
    fn rejects_bad_configs() {
        for bad in [
            &b"not json"[..],
            br#"{"keys":{"a":{"limit":3}}}"#,
            br#"{"keys":{"a":{"limit":3,"windowMs":0}}}"#,
            br#"{"keys":{"a":{"tokenLimit":3}}}"#,
            br#"{"keys":{"a":{"windowMs":3}}}"#,
            br#"{"keys":{"a":{"limt":3}}}"#,
            br#"{"keys":{"a":{"script":[{"status":42}]}}}"#,
            br#"{"keys":{"a":{"always":{"headers":{"bad name":"x"}}}}}"#,
            br#"{"extraKeyHeaders":["no good"]}"#,
        ] {
            assert!(
                Config::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn parses_entries() {
        assert_eq!(parse_entries(br#"[{"status":429},{}]"#).unwrap().len(), 2);
        assert_eq!(parse_entries(br#"{"status":500}"#).unwrap().len(), 1);
        assert!(parse_entries(br#"[{"status":1000}]"#).is_err());
        assert!(parse_entries(b"[").is_err());
        assert!(parse_always(b"null").unwrap().is_none());
        assert_eq!(
            parse_always(br#"{"status":401}"#).unwrap().unwrap().status,
            401
        );
    }
}
