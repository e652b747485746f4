//! Active health checks: a minimal real request with each key that is out, so a key returns as
//! soon as the provider accepts it again (Higress ai-proxy's `healthCheckModel`).
//!
//! Per pool, one VM in the whole process runs the checks: the holder of a lease in shared data
//! (renewed every second, lapsing when its holder stops ticking). This module holds the pure
//! parts: who leads, who is due a check, where the check goes and what it looks like.

use crate::core::config::{AuthHeader, HealthCheck, Provider};
use crate::core::pool::PoolState;
use crate::core::schedule::Every;

/// Three renewals: a holder that misses two in a row loses the lease.
pub const LEASE_MS: u64 = 3_000;
/// The lease is renewed (and a VM that does not hold it looks again) once a second, however
/// fast the VM ticks: one shared-data read and write per second, as with 1 s ticks.
pub const LEASE_RENEW_MS: u64 = 1_000;

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
#[derive(Clone, Debug)]
pub struct PoolChecks {
    in_flight: Vec<bool>,
    last_started_ms: Vec<u64>,
    passes: Vec<u32>,
    /// When to renew (or look for) the lease; `leading` is what the last look found.
    lease_renewal: Every,
    leading: bool,
    /// Checks are planned on the pool's own period, not on every tick of a faster VM tick.
    planning: Every,
    /// Where the last planned checks went: named in the warning when a check says nothing.
    target: Option<Target>,
}

impl PoolChecks {
    /// `period_ms`: the pool's period (`schedule::pool_period_ms`); `tick_ms`: the VM's tick.
    pub fn new(keys: usize, period_ms: u64, tick_ms: u64) -> Self {
        PoolChecks {
            in_flight: vec![false; keys],
            last_started_ms: vec![0; keys],
            passes: vec![0; keys],
            lease_renewal: Every::new(LEASE_RENEW_MS, tick_ms),
            leading: false,
            planning: Every::new(period_ms, tick_ms),
            target: None,
        }
    }

    /// Whether this VM runs the pool's checks. `try_lead` takes or renews the lease in shared
    /// data; it is called once a second at most, and between calls the last answer holds: a
    /// lease renewed less than a second ago has two more seconds to run, and no one else can
    /// take it before it lapses.
    pub fn lead(&mut self, now_ms: u64, try_lead: impl FnOnce() -> bool) -> bool {
        if self.lease_renewal.due(now_ms) {
            self.leading = try_lead();
        }
        self.leading
    }

    /// Whether checks are planned on this tick (the pool's period has passed).
    pub fn planning_due(&mut self, now_ms: u64) -> bool {
        self.planning.due(now_ms)
    }

    pub fn set_target(&mut self, target: Target) {
        self.target = Some(target);
    }

    pub fn target(&self) -> Option<&Target> {
        self.target.as_ref()
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
            .filter(|(_, k)| !k.is_available() && k.health != crate::core::pool::Health::Spent)
            .filter(|(i, k)| {
                !self.in_flight.get(*i).copied().unwrap_or(true)
                    && now_ms >= k.down_since_ms.saturating_add(min_cooldown_ms)
                    && self.last_started_ms.get(*i).is_some_and(|&last| {
                        // A tick a little early must not push a check to the tick after, or
                        // a 1 s interval would become 2 s.
                        let slack = self.planning.slack_ms().min(check.interval_ms / 4);
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

/// Where a check's `:authority` came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthoritySource {
    /// `healthCheckAuthority`.
    Configured,
    /// The `:authority` of the pool's live traffic.
    Learned,
    /// Nothing better known: the cluster name, which a provider behind it rarely accepts.
    ClusterName,
}

/// Where a pool's checks go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub cluster: String,
    pub authority: String,
    pub source: AuthoritySource,
}

/// The check's cluster and `:authority`: configured ones win, then what live traffic taught
/// (`learned`: cluster, authority). None while the cluster is unknown.
pub fn target(check: &HealthCheck, learned: Option<(String, String)>) -> Option<Target> {
    let (learned_cluster, learned_authority) = match learned {
        Some((c, a)) => (Some(c), Some(a).filter(|a| !a.is_empty())),
        None => (None, None),
    };
    let cluster = check.cluster.clone().or(learned_cluster)?;
    let (authority, source) = match (&check.authority, learned_authority) {
        (Some(configured), _) => (configured.clone(), AuthoritySource::Configured),
        (None, Some(learned)) => (learned, AuthoritySource::Learned),
        (None, None) => (cluster.clone(), AuthoritySource::ClusterName),
    };
    Some(Target {
        cluster,
        authority,
        source,
    })
}

/// The warning for a check answered with a status that says nothing about the key (a 400, 404,
/// 421...). It names what most likely caused it: a guessed `:authority` if the check had to use
/// the cluster name, else the model or path.
pub fn neutral_answer_warning(
    pool: &str,
    key: &str,
    status: u16,
    target: Option<&Target>,
) -> String {
    let start = format!(
        "pool {pool}: health check of key {key} got status {status}, which says nothing about the key"
    );
    match target {
        Some(t) if t.source == AuthoritySource::ClusterName => format!(
            "{start}; no live request has shown the provider's host yet, so the check was sent with :authority {:?} (the cluster name), which providers usually refuse: set failover.healthCheckAuthority to the provider's host (such as \"api.openai.com\"), or let one request through the pool; if the host is right, check healthCheckModel and healthCheckPath",
            t.authority
        ),
        Some(t) if t.source == AuthoritySource::Learned => format!(
            "{start}; check healthCheckModel and healthCheckPath, and the :authority {:?} learned from live traffic (if a route rewrites the host, set failover.healthCheckAuthority)",
            t.authority
        ),
        _ => format!("{start}; check healthCheckModel and healthCheckPath"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::{Failure, Policy};
    use crate::core::status::FailureClass;

    fn check(interval_ms: u64) -> HealthCheck {
        HealthCheck {
            model: "m".into(),
            interval_ms,
            timeout_ms: 1_000,
            success_threshold: 2,
            path: None,
            cluster: None,
            authority: None,
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
        let mut c = PoolChecks::new(3, 1_000, 1_000);
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
        let mut c = PoolChecks::new(1, 1_000, 1_000);
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
    fn the_check_target_prefers_configured_then_learned_then_the_cluster_name() {
        let learned = || Some(("outbound|443||api.x".to_string(), "api.x".to_string()));
        let mut hc = check(1_000);
        assert_eq!(target(&hc, None), None, "no cluster known: no check");
        let t = target(&hc, learned()).unwrap();
        assert_eq!(
            (t.cluster.as_str(), t.authority.as_str(), t.source),
            ("outbound|443||api.x", "api.x", AuthoritySource::Learned)
        );
        hc.cluster = Some("provider".into());
        let t = target(&hc, None).unwrap();
        assert_eq!(
            (t.cluster.as_str(), t.authority.as_str(), t.source),
            ("provider", "provider", AuthoritySource::ClusterName),
            "nothing better known: the cluster name"
        );
        let t = target(&hc, Some(("other".into(), String::new()))).unwrap();
        assert_eq!(
            t.source,
            AuthoritySource::ClusterName,
            "an empty learned authority"
        );
        assert_eq!(t.cluster, "provider", "a configured cluster wins");
        hc.authority = Some("api.openai.com".into());
        let t = target(&hc, learned()).unwrap();
        assert_eq!(
            (t.authority.as_str(), t.source),
            ("api.openai.com", AuthoritySource::Configured)
        );
    }

    #[test]
    fn a_check_refused_for_a_guessed_authority_says_so() {
        let mut hc = check(1_000);
        hc.cluster = Some("provider_cluster".into());
        let guessed = target(&hc, None);
        let w = neutral_answer_warning("main", "alpha", 404, guessed.as_ref());
        assert!(
            w.starts_with("pool main: health check of key alpha got status 404"),
            "{w}"
        );
        assert!(
            w.contains(r#":authority "provider_cluster" (the cluster name)"#),
            "{w}"
        );
        assert!(w.contains("set failover.healthCheckAuthority"), "{w}");
        assert!(w.contains("let one request through"), "{w}");
        // With a host that live traffic taught or the operator set, the model and path are
        // the likelier cause; the authority is not blamed.
        let learned = target(&hc, Some(("c".into(), "api.x".into())));
        let w = neutral_answer_warning("main", "alpha", 404, learned.as_ref());
        assert!(
            w.contains("check healthCheckModel and healthCheckPath"),
            "{w}"
        );
        assert!(!w.contains("cluster name"), "{w}");
        hc.authority = Some("api.openai.com".into());
        let w = neutral_answer_warning("main", "alpha", 400, target(&hc, None).as_ref());
        assert!(
            w.ends_with(
                "which says nothing about the key; check healthCheckModel and healthCheckPath"
            ),
            "{w}"
        );
    }

    #[test]
    fn the_lease_is_looked_at_once_a_second_however_fast_the_tick() {
        let mut c = PoolChecks::new(1, 100, 100);
        let mut looks = 0;
        let mut leading = Vec::new();
        for now in (0..=3_000).step_by(100) {
            leading.push(c.lead(now, || {
                looks += 1;
                true
            }));
        }
        assert_eq!(looks, 4, "at 0, 1000, 2000 and 3000 ms");
        assert!(
            leading.iter().all(|&l| l),
            "the lease is held between looks"
        );
        // Checks, though, are planned on every 100 ms tick of a 100 ms pool.
        assert!((0..10).all(|i| c.planning_due(i * 100)));
        let mut slow = PoolChecks::new(1, 1_000, 100);
        let plans = (0..20).filter(|i| slow.planning_due(i * 100)).count();
        assert_eq!(plans, 2, "a 1 s pool is planned once a second");
    }
}
