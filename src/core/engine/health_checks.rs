//! Health-check orchestration inside the engine: which checks this VM sends (it holds the pool's
//! lease), and what an answer does to the key. What to send and when is planned by the pure
//! `core::health`; this ties it to the store, the stats and the key's transitions.

use super::{pool_label, Engine, Host};
use crate::core::config::{HealthCheck, PluginConfig, Profile};
use crate::core::health::{self, CheckRequest};
use crate::core::judge::{self, Judgement};
use crate::core::metrics::CheckOutcome;
use crate::core::pool::Failure;
use crate::core::status::{FailureClass, Verdict};

/// What a health check's request got back.
pub struct CheckAnswer<'a> {
    /// None when Envoy answered itself (timeout, no healthy host) or nothing came back.
    pub status: Option<u16>,
    pub headers: &'a [(String, Vec<u8>)],
    pub body: &'a [u8],
}

impl Engine {
    /// The checks this VM should send now: for each health-checked pool whose lease it holds,
    /// one per key that is out and due.
    pub fn health_checks_due(&mut self, host: &dyn Host, now_ms: u64) -> Vec<CheckRequest> {
        let mut due = Vec::new();
        for pool in 0..self.stores.len() {
            let Some((profile, check)) = pool_health(&self.config, pool) else {
                continue;
            };
            let (Some(store), Some(checks), Some(keys)) = (
                self.stores.get(pool),
                self.checks.get_mut(pool),
                self.config.pools.get(pool).map(|p| &p.keys),
            ) else {
                continue;
            };
            let owner_id = self.owner_id;
            if !checks.lead(now_ms, || {
                store.try_lead(host, owner_id, now_ms, health::LEASE_MS)
            }) || !checks.planning_due(now_ms)
            {
                continue;
            }
            let keys_due = checks.due(
                store.state(),
                check,
                profile.failover.min_cooldown_ms,
                now_ms,
            );
            if keys_due.is_empty() {
                continue;
            }
            let Some(target) = health::target(check, store.read_target(host)) else {
                log::debug!(
                    "pool {}: no traffic seen yet; health checks wait to learn the cluster",
                    pool_label(&self.config, pool)
                );
                continue;
            };
            let path = check
                .path
                .clone()
                .unwrap_or_else(|| health::default_path(profile.provider, &check.model));
            let body = health::body(profile.provider, &check.model);
            for key in keys_due {
                let Some(k) = keys.get(key) else {
                    continue;
                };
                due.push(CheckRequest {
                    pool,
                    key,
                    cluster: target.cluster.clone(),
                    headers: health::headers(
                        profile.provider,
                        &profile.auth,
                        &k.token,
                        &path,
                        &target.authority,
                    ),
                    body: body.clone(),
                    timeout_ms: check.timeout_ms,
                });
            }
            checks.set_target(target);
        }
        for req in &due {
            if let Some(checks) = self.checks.get_mut(req.pool) {
                checks.started(req.key, now_ms);
            }
            if let Some(m) = self.metrics.get(req.pool) {
                m.count_health_check(host, CheckOutcome::Sent);
            }
        }
        due
    }

    /// The host could not send a planned check: it is not in flight.
    pub fn health_check_not_sent(&mut self, pool: usize, key: usize) {
        if let Some(checks) = self.checks.get_mut(pool) {
            checks.finished(key);
        }
    }

    /// A check came back. Success counts toward `successThreshold`; a failure or a timeout keeps
    /// the key out for longer. Counted once: each check finishes once.
    pub fn health_check_done(
        &mut self,
        host: &dyn Host,
        pool: usize,
        key: usize,
        answer: CheckAnswer,
        now_ms: u64,
    ) {
        let Some((profile, check)) = pool_health(&self.config, pool) else {
            return;
        };
        let (threshold, policy) = (check.success_threshold, profile.failover.policy());
        // Judged as live traffic is (`judge`); no answer at all is judged below.
        let judgement = answer
            .status
            .map(|s| judge::judge(&profile.failover, s, answer.headers, answer.body, now_ms));
        let label = self
            .config
            .pools
            .get(pool)
            .and_then(|p| p.keys.get(key))
            .map_or_else(|| "?".to_string(), |k| k.label());
        let Some(checks) = self.checks.get_mut(pool) else {
            return;
        };
        checks.finished(key);
        let pool_label = pool_label(&self.config, pool).to_string();
        match (answer.status, judgement) {
            (
                Some(status),
                Some(Judgement {
                    verdict: Verdict::Success,
                    ..
                }),
            ) => {
                if let Some(m) = self.metrics.get(pool) {
                    m.count_health_check(host, CheckOutcome::Passed);
                }
                if checks.passed(key, threshold) {
                    let events = self.change(host, pool, now_ms, |s| {
                        s.restore_checked(key).into_iter().collect()
                    });
                    if !events.is_empty() {
                        log::info!("pool {pool_label}: key {label} passed its health check (status {status}); back in rotation");
                    }
                } else {
                    log::info!(
                        "pool {pool_label}: key {label} passed a health check ({}/{threshold})",
                        checks.passes(key)
                    );
                }
            }
            (status, judgement) => {
                checks.failed(key);
                if let Some(m) = self.metrics.get(pool) {
                    m.count_health_check(host, CheckOutcome::Failed);
                }
                let (class, hint_ms) = match judgement {
                    Some(Judgement {
                        verdict: Verdict::KeyFailure(class),
                        hint_ms,
                    }) => (class, hint_ms),
                    Some(Judgement {
                        verdict: Verdict::Neutral,
                        ..
                    }) => {
                        log::warn!(
                            "{}",
                            health::neutral_answer_warning(
                                &pool_label,
                                &label,
                                status.unwrap_or(0),
                                checks.target()
                            )
                        );
                        return;
                    }
                    // No answer from the upstream (timeout, reset): a failure like a server
                    // error, which takes no hint.
                    _ => (FailureClass::ServerError, None),
                };
                let failure = Failure {
                    status: status.unwrap_or(0),
                    class,
                    hint_ms,
                    jitter_permille: self.draw_jitter(),
                };
                log::info!(
                    "pool {pool_label}: health check of key {label} failed ({}); it stays out",
                    status.map_or_else(|| "no answer".to_string(), |s| format!("status {s}"))
                );
                self.change(host, pool, now_ms, |s| {
                    s.check_failed(key, &failure, now_ms, &policy)
                        .into_iter()
                        .collect()
                });
            }
        }
    }
}

/// The health-check settings of a pool: those of the first profile using it that has some.
/// A function of the config alone, so the engine's other fields stay free to borrow.
fn pool_health(config: &PluginConfig, pool: usize) -> Option<(&Profile, &HealthCheck)> {
    config
        .profiles
        .iter()
        .filter(|p| p.pool == pool)
        .find_map(|p| p.failover.health_check.as_ref().map(|h| (p, h)))
}

#[cfg(test)]
mod tests {
    use super::super::test_host::*;
    use super::super::Clock;
    use super::*;
    use crate::core::pool::SentAs;
    #[test]
    fn health_checks_run_on_one_engine_and_bring_a_refused_key_back() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": [{"token": "sk-a", "name": "a"}, "b"], "failover": {"disableDuration": 0,
                      "healthCheckModel": "m", "healthCheckInterval": 2000, "successThreshold": 2}}"#;
        let (mut w1, mut w2) = two_workers(&host, cfg);
        assert!(w1.wants_target(0));
        w1.learn_target(&host, 0, "mock_provider", "api.example");
        assert!(!w1.wants_target(0));
        let refused = Verdict::KeyFailure(FailureClass::KeyRefused);
        w1.answered(&host, sent(0, 0, SentAs::Normal), refused, 401, None, 100);
        assert!(
            w1.health_checks_due(&host, 500).is_empty(),
            "not before the minimum cooldown"
        );
        let first = w1.health_checks_due(&host, 1_200);
        assert_eq!(first.len(), 1);
        assert!(
            w2.health_checks_due(&host, 1_300).is_empty(),
            "the other engine does not hold the lease"
        );
        let c = &first[0];
        assert_eq!((c.pool, c.key, c.cluster.as_str()), (0, 0, "mock_provider"));
        assert!(c
            .headers
            .contains(&("authorization".into(), "Bearer sk-a".into())));
        assert!(c
            .headers
            .contains(&(":authority".into(), "api.example".into())));
        assert!(
            w1.health_checks_due(&host, 1_300).is_empty(),
            "one check in flight per key"
        );
        let ok = bare_answer(Some(200), b"{}");
        w1.health_check_done(&host, 0, 0, ok, 1_400);
        assert!(
            !w1.stores()[0].state().keys[0].is_available(),
            "1 of 2 passes"
        );
        assert!(
            w1.health_checks_due(&host, 2_000).is_empty(),
            "the interval"
        );
        assert_eq!(w1.health_checks_due(&host, 3_300).len(), 1);
        let ok = bare_answer(Some(200), b"{}");
        w1.health_check_done(&host, 0, 0, ok, 3_400);
        assert!(
            w1.stores()[0].state().keys[0].is_available(),
            "restored after 2 passes"
        );
        let m = |name: &str| host.pool_stat(&w1.config().pools[0].label, name);
        assert_eq!(
            (
                m("health_checks_sent"),
                m("health_checks_passed"),
                m("health_checks_failed")
            ),
            (2, 2, 0)
        );
    }

    /// A check's answer without headers.
    fn bare_answer(status: Option<u16>, body: &[u8]) -> CheckAnswer<'_> {
        CheckAnswer {
            status,
            headers: &[],
            body,
        }
    }

    /// A check's answer gets the judgement a live answer gets (`judge`): a 429's `retry-after`
    /// sets the rest when `respectRetryAfter` is on, a 429 saying `insufficient_quota` refuses
    /// the key, a server error's `retry-after` is ignored.
    #[test]
    fn a_check_answer_is_judged_as_a_live_answer_is() {
        let quota = br#"{"error": {"type": "insufficient_quota"}}"#;
        let wait = [("retry-after".to_string(), b"300".to_vec())];
        let check_of = |respect: bool, status: u16, body: &[u8]| {
            let host = TestHost::default();
            let cfg = format!(
                r#"{{"apiTokens": ["a", "b"], "failover": {{"cooldownDuration": 10000,
                    "maxCooldownDuration": 900000, "respectRetryAfter": {respect},
                    "healthCheckModel": "m", "healthCheckCluster": "c"}}}}"#
            );
            let mut w = engine(&cfg, 1);
            w.start(&host, 0);
            w.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 0);
            assert_eq!(w.health_checks_due(&host, 1_000).len(), 1);
            let answer = CheckAnswer {
                status: Some(status),
                headers: &wait,
                body,
            };
            w.health_check_done(&host, 0, 0, answer, 1_000);
            // What the live path makes of the same answer, through the engine's live API.
            let live = w.verdict(0, status, Some(body));
            let live_hint = w.retry_hint_ms(0, live, &wait, Some(body), &Clock::at(1_000));
            let key = w.stores()[0].state().keys[0].clone();
            (key.health, key.down_until_ms - 1_000, live, live_hint)
        };
        use crate::core::pool::Health;
        let (health, rest, live, hint) = check_of(true, 429, b"");
        assert_eq!(health, Health::CoolingDown);
        assert!((300_000..=330_000).contains(&rest), "the hint: {rest}");
        assert_eq!(
            (live, hint),
            (Verdict::KeyFailure(FailureClass::RateLimit), Some(300_000))
        );
        let (_, rest, _, hint) = check_of(false, 429, b"");
        assert!(
            (20_000..=22_000).contains(&rest),
            "backoff, no hint: {rest}"
        );
        assert_eq!(hint, None);
        let (_, rest, live, hint) = check_of(true, 503, b"");
        assert!(
            (20_000..=22_000).contains(&rest),
            "a 5xx takes no hint: {rest}"
        );
        assert_eq!((live, hint), (SERVER, None));
        let (health, _, live, _) = check_of(true, 429, quota);
        assert_eq!(health, Health::Disabled);
        assert_eq!(live, Verdict::KeyFailure(FailureClass::KeyRefused));
    }

    #[test]
    fn a_failed_or_unanswered_check_keeps_the_key_out_longer() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 10000, "healthCheckModel": "m",
                      "healthCheckCluster": "c"}}"#;
        let mut w = engine(cfg, 1);
        w.start(&host, 0);
        w.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 0);
        let until = w.stores()[0].state().keys[0].down_until_ms;
        assert_eq!(
            w.health_checks_due(&host, 1_000).len(),
            1,
            "a configured cluster needs no traffic"
        );
        w.health_check_done(&host, 0, 0, bare_answer(None, b""), 1_500);
        let key = &w.stores()[0].state().keys[0];
        assert!(
            key.down_until_ms > until && key.strikes == 2,
            "timeout counts as a failure with backoff"
        );
        assert!(w.health_checks_due(&host, 6_600).len() == 1);
        w.health_check_done(&host, 0, 0, bare_answer(Some(400), b""), 6_700);
        assert_eq!(
            w.stores()[0].state().keys[0].strikes,
            2,
            "a 400 says nothing about the key"
        );
        assert!(
            w.health_checks_due(&host, 20_000)
                .iter()
                .all(|c| c.key == 0),
            "available keys are never checked"
        );
    }

    #[test]
    fn checks_remember_whether_their_authority_was_only_the_cluster_name() {
        use crate::core::health::AuthoritySource;
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 10000,
                      "healthCheckModel": "m", "healthCheckCluster": "provider_cluster"}}"#;
        let mut w = engine(cfg, 1);
        w.start(&host, 0);
        w.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 0);
        let due = w.health_checks_due(&host, 1_000);
        assert!(due[0]
            .headers
            .contains(&(":authority".into(), "provider_cluster".into())));
        let target = w.checks[0].target().unwrap();
        assert_eq!(target.source, AuthoritySource::ClusterName);
        let neutral = bare_answer(Some(404), b"");
        w.health_check_done(&host, 0, 0, neutral, 1_100);
        assert!(
            !w.stores()[0].state().keys[0].is_available(),
            "a 404 says nothing about the key"
        );
        // Live traffic then shows the provider's host: later checks carry it.
        w.learn_target(&host, 0, "provider_cluster", "api.provider.test");
        let due = w.health_checks_due(&host, 6_000);
        assert!(due[0]
            .headers
            .contains(&(":authority".into(), "api.provider.test".into())));
        assert_eq!(
            w.checks[0].target().map(|t| t.source),
            Some(AuthoritySource::Learned)
        );
    }
}
