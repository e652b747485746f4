//! Active health checks: a minimal real request with each key that is out, so a key returns as
//! soon as the provider accepts it again (Higress ai-proxy's `healthCheckModel`).
//!
//! Per pool, one VM in the whole process runs the checks: the holder of a lease in shared data
//! (renewed every tick, lapsing when its holder stops ticking). This module holds the pure parts:
//! who is due a check, and what the check request looks like.

use crate::config::{AuthHeader, HealthCheck, Provider};
use crate::pool::PoolState;

/// Three ticks: a holder that misses two ticks in a row loses the lease.
pub const LEASE_MS: u64 = 3_000;
/// Checks are planned on ticks (once a second); a tick that comes a little early must not push a
/// check to the tick after, or a 1 s interval would become 2 s.
const TICK_SLACK_MS: u64 = 250;

/// One check to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRequest {
    pub pool: usize,
    pub key: usize,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

/// This VM's record of the checks it runs for one pool.
#[derive(Clone, Debug, Default)]
pub struct PoolChecks {
    in_flight: Vec<bool>,
    last_started_ms: Vec<u64>,
    passes: Vec<u32>,
}

impl PoolChecks {
    pub fn new(keys: usize) -> Self {
        PoolChecks {
            in_flight: vec![false; keys],
            last_started_ms: vec![0; keys],
            passes: vec![0; keys],
        }
    }

    /// Keys that are out and due a check: none in flight for them, the interval since the last
    /// one passed, and out for at least `min_cooldown_ms` (a check never beats the minimum).
    pub fn due(
        &self,
        state: &PoolState,
        check: &HealthCheck,
        min_cooldown_ms: u64,
        now_ms: u64,
    ) -> Vec<usize> {
        state
            .keys
            .iter()
            .enumerate()
            // A spent key returns by itself at its reset; a check would only spend more.
            .filter(|(_, k)| !k.is_available() && k.health != crate::pool::Health::Spent)
            .filter(|(i, k)| {
                !self.in_flight.get(*i).copied().unwrap_or(true)
                    && now_ms >= k.down_since_ms.saturating_add(min_cooldown_ms)
                    && self.last_started_ms.get(*i).is_some_and(|&last| {
                        let slack = TICK_SLACK_MS.min(check.interval_ms / 4);
                        last == 0
                            || now_ms.saturating_add(slack)
                                >= last.saturating_add(check.interval_ms)
                    })
            })
            .map(|(i, _)| i)
            .collect()
    }

    pub fn started(&mut self, key: usize, now_ms: u64) {
        if let (Some(f), Some(t)) = (
            self.in_flight.get_mut(key),
            self.last_started_ms.get_mut(key),
        ) {
            *f = true;
            *t = now_ms;
        }
    }

    /// The check came back (or could not be sent).
    pub fn finished(&mut self, key: usize) {
        if let Some(f) = self.in_flight.get_mut(key) {
            *f = false;
        }
    }

    /// Counts a passed check; true when the key has passed `success_threshold` in a row.
    pub fn passed(&mut self, key: usize, success_threshold: u32) -> bool {
        let Some(p) = self.passes.get_mut(key) else {
            return false;
        };
        *p = p.saturating_add(1);
        if *p >= success_threshold {
            *p = 0;
            true
        } else {
            false
        }
    }

    pub fn failed(&mut self, key: usize) {
        if let Some(p) = self.passes.get_mut(key) {
            *p = 0;
        }
    }

    pub fn passes(&self, key: usize) -> u32 {
        self.passes.get(key).copied().unwrap_or(0)
    }
}

/// The provider's usual path for a one-token completion.
pub fn default_path(provider: Provider, model: &str) -> String {
    match provider {
        Provider::Anthropic => "/v1/messages".to_string(),
        Provider::Gemini => format!("/v1beta/models/{model}:generateContent"),
        Provider::OpenAi | Provider::Azure => "/v1/chat/completions".to_string(),
    }
}

/// The smallest request that proves a key works: one short message, one output token.
pub fn body(provider: Provider, model: &str) -> Vec<u8> {
    let body = match provider {
        Provider::Gemini => serde_json::json!({
            "contents": [{"role": "user", "parts": [{"text": "ping"}]}],
            "generationConfig": {"maxOutputTokens": 1}
        }),
        Provider::OpenAi | Provider::Azure | Provider::Anthropic => serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "ping"}],
            "max_tokens": 1
        }),
    };
    body.to_string().into_bytes()
}

/// Headers of a check: the key in the pool's header, and what the provider requires.
pub fn headers(
    provider: Provider,
    auth: &AuthHeader,
    token: &str,
    path: &str,
    authority: &str,
) -> Vec<(String, String)> {
    let mut headers = vec![
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), path.to_string()),
        (":authority".to_string(), authority.to_string()),
        ("content-type".to_string(), "application/json".to_string()),
        (auth.name.clone(), format!("{}{}", auth.prefix, token)),
        (
            "user-agent".to_string(),
            "ai-key-failover-health-check".to_string(),
        ),
    ];
    if provider == Provider::Anthropic {
        headers.push(("anthropic-version".to_string(), "2023-06-01".to_string()));
    }
    headers
}

/// Where checks go, as learned from live traffic: stored in shared data as `cluster\nauthority`.
pub fn encode_target(cluster: &str, authority: &str) -> Vec<u8> {
    format!("{cluster}\n{authority}").into_bytes()
}

pub fn decode_target(bytes: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (cluster, authority) = text.split_once('\n')?;
    (!cluster.is_empty()).then(|| (cluster.to_string(), authority.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{Failure, Policy};
    use crate::status::FailureClass;

    fn check(interval_ms: u64) -> HealthCheck {
        HealthCheck {
            model: "m".into(),
            interval_ms,
            timeout_ms: 1_000,
            success_threshold: 2,
            path: None,
            cluster: None,
        }
    }

    #[test]
    fn only_keys_that_are_out_past_the_minimum_and_not_in_flight_are_due() {
        let mut s = PoolState::fresh(&[1, 2, 3]);
        let policy = Policy {
            failure_threshold: 1,
            cooldown_ms: 60_000,
            backoff_permille: 2_000,
            min_cooldown_ms: 1_000,
            max_cooldown_ms: 600_000,
            disable_ms: 0,
        };
        let f = Failure {
            status: 401,
            class: FailureClass::KeyRefused,
            hint_ms: None,
            jitter_permille: 0,
        };
        s.record_failure(1, &f, 10_000, &policy);
        s.record_failure(2, &f, 10_500, &policy);
        let mut c = PoolChecks::new(3);
        let hc = check(5_000);
        assert_eq!(
            c.due(&s, &hc, 1_000, 10_900),
            Vec::<usize>::new(),
            "not before the minimum"
        );
        assert_eq!(c.due(&s, &hc, 1_000, 11_000), vec![1]);
        c.started(1, 11_000);
        assert_eq!(
            c.due(&s, &hc, 1_000, 11_500),
            vec![2],
            "one check per key in flight"
        );
        c.finished(1);
        assert_eq!(
            c.due(&s, &hc, 1_000, 15_700),
            vec![2],
            "key 1 waits out the interval"
        );
        assert_eq!(
            c.due(&s, &hc, 1_000, 15_750),
            vec![1, 2],
            "a tick a little early still checks"
        );
    }

    #[test]
    fn success_threshold_counts_passes_in_a_row() {
        let mut c = PoolChecks::new(1);
        assert!(!c.passed(0, 2));
        c.failed(0);
        assert!(!c.passed(0, 2));
        assert!(c.passed(0, 2));
        assert_eq!(c.passes(0), 0);
        assert!(!c.passed(5, 1), "out of range is ignored");
    }

    #[test]
    fn requests_follow_the_provider() {
        let auth = AuthHeader {
            name: "x-api-key".into(),
            prefix: String::new(),
        };
        let h = headers(
            Provider::Anthropic,
            &auth,
            "sk-a",
            "/v1/messages",
            "api.anthropic.com",
        );
        assert!(h.contains(&("x-api-key".into(), "sk-a".into())));
        assert!(h.contains(&("anthropic-version".into(), "2023-06-01".into())));
        let b: serde_json::Value =
            serde_json::from_slice(&body(Provider::OpenAi, "gpt-4o-mini")).unwrap();
        assert_eq!(b["model"], "gpt-4o-mini");
        assert_eq!(b["max_tokens"], 1);
        let g: serde_json::Value =
            serde_json::from_slice(&body(Provider::Gemini, "gemini-2.0-flash")).unwrap();
        assert_eq!(g["generationConfig"]["maxOutputTokens"], 1);
        assert_eq!(
            default_path(Provider::Gemini, "g"),
            "/v1beta/models/g:generateContent"
        );
        assert_eq!(default_path(Provider::Azure, "g"), "/v1/chat/completions");
    }

    #[test]
    fn targets_round_trip_and_junk_is_refused() {
        assert_eq!(
            decode_target(&encode_target(
                "outbound|443||api.openai.com",
                "api.openai.com"
            )),
            Some((
                "outbound|443||api.openai.com".into(),
                "api.openai.com".into()
            ))
        );
        assert_eq!(decode_target(b"no newline"), None);
        assert_eq!(decode_target(b"\nauthority"), None);
        assert_eq!(decode_target(b"\xff\n"), None);
    }
}
