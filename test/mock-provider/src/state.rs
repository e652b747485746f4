//! Shared state: configuration, per-key counters, request log, and the
//! decision of what to answer. Everything here is synchronous; the lock is
//! never held across an await.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderName, HeaderValue, StatusCode};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::config::{Config, Entry, KeySpec};
use crate::util::go_duration;

pub type Shared = Arc<Mutex<State>>;

pub fn shared(config: Config) -> Shared {
    Arc::new(Mutex::new(State::new(config)))
}

/// Locks the state; a poisoned lock is recovered (nothing panics under it).
pub fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
pub struct KeyState {
    pub limit: Option<u64>,
    /// Tokens per window, counted from the requests served (see `request_tokens`).
    pub token_limit: Option<u64>,
    pub window_ms: Option<u64>,
    pub delay_ms: u64,
    pub script: VecDeque<Entry>,
    pub always: Option<Entry>,
    /// Start of the current fixed window, requests counted in it, tokens served in it.
    pub window: Option<(Instant, u64, u64)>,
}

/// A request's tokens as rate limits count them, roughly: a quarter of its body's bytes (at
/// least 1) plus the `max_tokens` it asks for, as OpenAI reserves the completion up front.
pub fn request_tokens(body: &[u8]) -> u64 {
    let prompt = (body.len() as u64).div_ceil(4).max(1);
    let completion = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("max_tokens")?.as_u64())
        .unwrap_or(0);
    prompt.saturating_add(completion)
}

impl From<KeySpec> for KeyState {
    fn from(s: KeySpec) -> Self {
        KeyState {
            limit: s.limit,
            token_limit: s.token_limit,
            window_ms: s.window_ms,
            delay_ms: s.delay_ms,
            script: s.script.into(),
            always: s.always,
            window: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    pub key: Option<String>,
    pub status: Option<u16>,
    pub time_ms: u64,
}

/// What the provider answers, decided under the lock.
#[derive(Debug)]
pub struct Plan {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: PlanBody,
    pub delay_ms: u64,
}

#[derive(Debug)]
pub enum PlanBody {
    /// JSON text.
    Json(String),
    Text(String),
    /// The normal chat completion (JSON or SSE, depending on the request).
    Completion,
}

#[derive(Debug)]
pub struct State {
    pub require_known_key: bool,
    pub extra_key_headers: Vec<String>,
    pub stream_chunk_delay_ms: u64,
    pub keys: BTreeMap<String, KeyState>,
    pub log: Vec<LogEntry>,
    next_seq: u64,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    typ: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// `{"error":{"message":..,"type":..,"param":null,"code":..}}` in that order.
pub fn openai_error(message: &str, typ: &str, code: Option<&str>) -> String {
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            typ,
            param: None,
            code,
        },
    };
    serde_json::to_string(&body).unwrap_or_default()
}

/// The body of a scripted non-2xx answer that has no body of its own.
pub fn default_error(status: StatusCode) -> String {
    match status.as_u16() {
        401 => openai_error(
            "Incorrect API key provided",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        429 => openai_error(
            "Rate limit reached for requests",
            "requests",
            Some("rate_limit_exceeded"),
        ),
        code => {
            let msg = format!(
                "mock error: {} {}",
                code,
                status.canonical_reason().unwrap_or("")
            );
            let typ = if code >= 500 {
                "server_error"
            } else {
                "invalid_request_error"
            };
            openai_error(msg.trim_end(), typ, None)
        }
    }
}

fn header(name: &'static str, value: impl ToString) -> Option<(HeaderName, HeaderValue)> {
    let v = HeaderValue::from_bytes(value.to_string().as_bytes()).ok()?;
    Some((HeaderName::from_static(name), v))
}

impl State {
    pub fn new(config: Config) -> State {
        let mut s = State {
            require_known_key: false,
            extra_key_headers: Vec::new(),
            stream_chunk_delay_ms: 0,
            keys: BTreeMap::new(),
            log: Vec::new(),
            next_seq: 1,
        };
        s.apply(config);
        s
    }

    /// Replaces the configuration and resets all counters (not the log).
    pub fn apply(&mut self, config: Config) {
        self.require_known_key = config.require_known_key;
        self.extra_key_headers = config.extra_key_headers;
        self.stream_chunk_delay_ms = config.stream_chunk_delay_ms;
        self.keys = config
            .keys
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect();
    }

    /// Appends a log entry and returns its sequence number.
    pub fn record(&mut self, mut entry: LogEntry) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        entry.seq = seq;
        self.log.push(entry);
        seq
    }

    /// Sets the answered status of a log entry (if not cleared meanwhile).
    pub fn set_status(&mut self, seq: u64, status: u16) {
        if let Ok(i) = self.log.binary_search_by_key(&seq, |e| e.seq) {
            if let Some(e) = self.log.get_mut(i) {
                e.status = Some(status);
            }
        }
    }

    /// Decides the answer for a request carrying `key` that counts as one token.
    #[cfg(test)]
    pub fn decide(&mut self, key: Option<&str>, now: Instant) -> Plan {
        self.decide_tokens(key, 1, now)
    }

    /// Decides the answer for a request carrying `key` that counts as `tokens` tokens.
    pub fn decide_tokens(&mut self, key: Option<&str>, tokens: u64, now: Instant) -> Plan {
        let unauthorized = |message: &str| Plan {
            status: StatusCode::UNAUTHORIZED,
            headers: Vec::new(),
            body: PlanBody::Json(openai_error(
                message,
                "invalid_request_error",
                Some("invalid_api_key"),
            )),
            delay_ms: 0,
        };
        let ok = |headers, delay_ms| Plan {
            status: StatusCode::OK,
            headers,
            body: PlanBody::Completion,
            delay_ms,
        };
        let Some(key) = key else {
            return if self.require_known_key {
                unauthorized("missing API key")
            } else {
                ok(Vec::new(), 0)
            };
        };
        let Some(ks) = self.keys.get_mut(key) else {
            return if self.require_known_key {
                unauthorized("Incorrect API key provided")
            } else {
                ok(Vec::new(), 0)
            };
        };
        if let Some(entry) = ks.script.pop_front() {
            return plan_from_entry(entry, ks.delay_ms);
        }
        if let Some(entry) = &ks.always {
            return plan_from_entry(entry.clone(), ks.delay_ms);
        }
        let Some(window_ms) = ks.window_ms else {
            return ok(Vec::new(), ks.delay_ms);
        };
        let window = Duration::from_millis(window_ms);
        let (start, count, used) = match ks.window {
            Some((start, count, used)) if now.saturating_duration_since(start) < window => {
                (start, count, used)
            }
            _ => (now, 0, 0),
        };
        // Every request counts against the request limit; only served tokens count.
        let count = count.saturating_add(1);
        let over_requests = ks.limit.is_some_and(|limit| count > limit);
        let over_tokens = ks
            .token_limit
            .is_some_and(|limit| used.saturating_add(tokens) > limit);
        let over = over_requests || over_tokens;
        let used = if over {
            used
        } else {
            used.saturating_add(tokens)
        };
        ks.window = Some((start, count, used));
        // Time until the window resets, rounded up to whole milliseconds.
        let left = window.saturating_sub(now.saturating_duration_since(start));
        let left_ms = u64::try_from(left.as_nanos().div_ceil(1_000_000))
            .unwrap_or(u64::MAX)
            .max(1);
        let reset = go_duration(Duration::from_millis(left_ms));
        let mut headers = Vec::new();
        if let Some(limit) = ks.limit {
            headers.extend([
                header("x-ratelimit-limit-requests", limit),
                header(
                    "x-ratelimit-remaining-requests",
                    limit.saturating_sub(count),
                ),
                header("x-ratelimit-reset-requests", &reset),
            ]);
        }
        if let Some(limit) = ks.token_limit {
            headers.extend([
                header("x-ratelimit-limit-tokens", limit),
                header("x-ratelimit-remaining-tokens", limit.saturating_sub(used)),
                header("x-ratelimit-reset-tokens", &reset),
            ]);
        }
        if over {
            headers.extend([
                header("retry-after", left_ms.div_ceil(1000).max(1)),
                header("retry-after-ms", left_ms),
            ]);
            let (message, typ) = if over_requests {
                ("Rate limit reached for requests", "requests")
            } else {
                ("Rate limit reached for tokens", "tokens")
            };
            Plan {
                status: StatusCode::TOO_MANY_REQUESTS,
                headers: headers.into_iter().flatten().collect(),
                body: PlanBody::Json(openai_error(message, typ, Some("rate_limit_exceeded"))),
                delay_ms: ks.delay_ms,
            }
        } else {
            ok(headers.into_iter().flatten().collect(), ks.delay_ms)
        }
    }

    /// `GET /_mock/keys`: the current configuration with live counters.
    pub fn view(&self, now: Instant) -> Value {
        let keys: Map<String, Value> = self
            .keys
            .iter()
            .map(|(k, ks)| {
                let mut v = json!({
                    "limit": ks.limit,
                    "tokenLimit": ks.token_limit,
                    "windowMs": ks.window_ms,
                    "delayMs": ks.delay_ms,
                    "script": ks.script,
                    "always": ks.always,
                });
                if let (Some((start, count, used)), Some(window_ms), Some(obj)) =
                    (ks.window, ks.window_ms, v.as_object_mut())
                {
                    let elapsed = now.saturating_duration_since(start);
                    let window = Duration::from_millis(window_ms);
                    if elapsed < window {
                        obj.insert("windowCount".into(), json!(count));
                        obj.insert("windowTokens".into(), json!(used));
                        let left = u64::try_from(window.saturating_sub(elapsed).as_millis())
                            .unwrap_or(u64::MAX);
                        obj.insert("windowResetMs".into(), json!(left));
                    }
                }
                (k.clone(), v)
            })
            .collect();
        json!({
            "requireKnownKey": self.require_known_key,
            "extraKeyHeaders": self.extra_key_headers,
            "streamChunkDelayMs": self.stream_chunk_delay_ms,
            "keys": keys,
        })
    }

    /// `GET /_mock/stats`, computed from the request log.
    pub fn stats(&self) -> Value {
        let mut by_key: BTreeMap<String, (u64, BTreeMap<String, u64>)> = BTreeMap::new();
        let mut no_key: (u64, BTreeMap<String, u64>) = (0, BTreeMap::new());
        for e in &self.log {
            let slot = match &e.key {
                Some(k) => by_key.entry(k.clone()).or_default(),
                None => &mut no_key,
            };
            slot.0 += 1;
            if let Some(s) = e.status {
                *slot.1.entry(s.to_string()).or_default() += 1;
            }
        }
        let render = |(received, status): &(u64, BTreeMap<String, u64>)| json!({"received": received, "status": status});
        let by_key: Map<String, Value> =
            by_key.iter().map(|(k, v)| (k.clone(), render(v))).collect();
        json!({"total": self.log.len(), "by_key": by_key, "no_key": render(&no_key)})
    }
}

fn plan_from_entry(entry: Entry, key_delay_ms: u64) -> Plan {
    // Validated on input; an invalid status cannot get here, but stay safe.
    let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = entry
        .headers
        .iter()
        .filter_map(|(k, v)| {
            let name = HeaderName::from_bytes(k.as_bytes()).ok()?;
            let value = HeaderValue::from_bytes(v.as_bytes()).ok()?;
            Some((name, value))
        })
        .collect();
    let body = match entry.body {
        Some(raw) => match serde_json::from_str::<String>(raw.get()) {
            Ok(text) => PlanBody::Text(text),
            Err(_) => PlanBody::Json(raw.get().to_string()),
        },
        None if status.is_success() => PlanBody::Completion,
        None => PlanBody::Json(default_error(status)),
    };
    Plan {
        status,
        headers,
        body,
        delay_ms: key_delay_ms.saturating_add(entry.delay_ms),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header_of(plan: &Plan, name: &str) -> Option<String> {
        plan.headers
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v.to_str().unwrap().to_string())
    }

    #[test]
    fn fixed_window_limit() {
        let mut s =
            State::new(Config::parse(br#"{"keys":{"k":{"limit":2,"windowMs":10000}}}"#).unwrap());
        let t0 = Instant::now();
        let p = s.decide(Some("k"), t0);
        assert_eq!(p.status, StatusCode::OK);
        assert_eq!(
            header_of(&p, "x-ratelimit-remaining-requests").as_deref(),
            Some("1")
        );
        assert_eq!(
            header_of(&p, "x-ratelimit-reset-requests").as_deref(),
            Some("10s")
        );
        let p = s.decide(Some("k"), t0 + Duration::from_millis(150));
        assert_eq!(
            header_of(&p, "x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
        assert_eq!(
            header_of(&p, "x-ratelimit-reset-requests").as_deref(),
            Some("9.85s")
        );
        let p = s.decide(Some("k"), t0 + Duration::from_millis(8_700));
        assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header_of(&p, "retry-after").as_deref(), Some("2"));
        assert_eq!(header_of(&p, "retry-after-ms").as_deref(), Some("1300"));
        assert_eq!(
            header_of(&p, "x-ratelimit-reset-requests").as_deref(),
            Some("1.3s")
        );
        // A new window starts at the first request after the old one ended.
        let p = s.decide(Some("k"), t0 + Duration::from_millis(10_000));
        assert_eq!(p.status, StatusCode::OK);
        assert_eq!(
            header_of(&p, "x-ratelimit-remaining-requests").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn unknown_and_missing_keys() {
        let mut s = State::new(Config::parse(br#"{"keys":{"k":{}}}"#).unwrap());
        let now = Instant::now();
        assert_eq!(s.decide(None, now).status, StatusCode::UNAUTHORIZED);
        assert_eq!(s.decide(Some("x"), now).status, StatusCode::UNAUTHORIZED);
        assert_eq!(s.decide(Some("k"), now).status, StatusCode::OK);
        let mut s = State::new(Config::default());
        assert_eq!(s.decide(None, now).status, StatusCode::OK);
        assert_eq!(s.decide(Some("x"), now).status, StatusCode::OK);
    }

    #[test]
    fn script_then_always() {
        let cfg = br#"{"keys":{"k":{"delayMs":5,"script":[{"status":500,"delayMs":7}],
            "always":{"status":403,"body":"nope"}}}}"#;
        let mut s = State::new(Config::parse(cfg).unwrap());
        let now = Instant::now();
        let p = s.decide(Some("k"), now);
        assert_eq!(p.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(p.delay_ms, 12);
        assert!(matches!(p.body, PlanBody::Json(_)));
        for _ in 0..2 {
            let p = s.decide(Some("k"), now);
            assert_eq!(p.status, StatusCode::FORBIDDEN);
            assert!(matches!(p.body, PlanBody::Text(ref t) if t == "nope"));
        }
    }

    #[test]
    fn token_limit_counts_served_tokens_and_reports_them() {
        let mut s = State::new(
            Config::parse(br#"{"keys":{"k":{"tokenLimit":100,"windowMs":2000}}}"#).unwrap(),
        );
        let t0 = Instant::now();
        let p = s.decide_tokens(Some("k"), 60, t0);
        assert_eq!(p.status, StatusCode::OK);
        assert_eq!(
            header_of(&p, "x-ratelimit-remaining-tokens").as_deref(),
            Some("40")
        );
        assert_eq!(
            header_of(&p, "x-ratelimit-reset-tokens").as_deref(),
            Some("2s")
        );
        assert_eq!(header_of(&p, "x-ratelimit-remaining-requests"), None);
        let p = s.decide_tokens(Some("k"), 41, t0);
        assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            header_of(&p, "x-ratelimit-remaining-tokens").as_deref(),
            Some("40")
        );
        let p = s.decide_tokens(Some("k"), 40, t0);
        assert_eq!(p.status, StatusCode::OK, "a refused request used no tokens");
        assert_eq!(
            header_of(&p, "x-ratelimit-remaining-tokens").as_deref(),
            Some("0")
        );
        assert_eq!(request_tokens(b""), 1);
        assert_eq!(request_tokens(br#"{"max_tokens": 10}"#), 5 + 10);
    }
}
