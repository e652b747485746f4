//! One VM's view of the plugin: the parsed config, a cached store per pool, and the decisions a
//! request needs. Free of proxy-wasm so the whole flow runs in host tests against a fake store;
//! `glue` only reads headers and properties and calls in here.

use crate::config::{PluginConfig, Profile};
use crate::metrics::{MetricsHost, PoolMetrics};
use crate::pool::{Event, Policy};
use crate::rules::{needed_facts, NeededFacts, RequestFacts};
use crate::select::{Pick, Rng, Selection};
use crate::status::{classify, Verdict};
use crate::store::{PoolStore, SharedData, UpdateError};

/// The key a request was sent with, remembered until its response arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub profile: usize,
    pub key: usize,
    /// Every key was down; `earliest` chose this one anyway.
    pub while_down: bool,
}

/// Everything the engine needs from the host: shared data and stats.
pub trait Host: SharedData + MetricsHost {}
impl<T: SharedData + MetricsHost> Host for T {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No rule matches and there is no global pool: the request passes untouched.
    Untouched,
    UseKey(Assignment),
    /// Every key is down and the profile says `reject`.
    Reject {
        retry_after_secs: u64,
    },
}

pub struct Engine {
    config: PluginConfig,
    stores: Vec<PoolStore>,
    /// Per pool, this worker's round-robin position; starts at a random offset so workers
    /// do not all begin with the same key.
    cursors: Vec<u64>,
    rng: Rng,
    needed: NeededFacts,
    /// Per pool; empty until `start` defines them.
    metrics: Vec<PoolMetrics>,
}

impl Engine {
    pub fn new(config: PluginConfig, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let stores: Vec<PoolStore> = config
            .pools
            .iter()
            .enumerate()
            .map(|(i, pool)| {
                let weighted = config
                    .profiles
                    .iter()
                    .any(|p| p.pool == i && p.selection == Selection::Weighted);
                let selection = if weighted {
                    Selection::Weighted
                } else {
                    Selection::RoundRobin
                };
                PoolStore::new(pool.id, pool.fingerprints(), pool.weights(), selection)
            })
            .collect();
        let cursors = stores.iter().map(|_| rng.next_u64()).collect();
        let needed = needed_facts(config.rules.iter().map(|r| &r.matcher));
        Engine {
            config,
            stores,
            cursors,
            rng,
            needed,
            metrics: Vec::new(),
        }
    }

    /// Runs once per config load on each VM: defines the stats, takes over what earlier configs
    /// knew about the keys this one keeps, and brings back keys that are due.
    pub fn start(&mut self, host: &dyn Host, now_ms: u64) {
        self.metrics = self
            .config
            .pools
            .iter()
            .map(|pool| {
                let labels: Vec<String> = pool.keys.iter().map(|k| k.label()).collect();
                PoolMetrics::define(host, &pool.label, &labels)
            })
            .collect();
        for (pool, store) in self.stores.iter_mut().enumerate() {
            let label = self
                .config
                .pools
                .get(pool)
                .map_or("?", |p| p.label.as_str());
            match store.carry_over(host, now_ms) {
                Ok(c) if c.keys_carried > 0 => log::info!(
                    "pool {label}: kept the state of {} keys from the previous configuration",
                    c.keys_carried
                ),
                Ok(_) => {}
                Err(e) => log::warn!("pool {label}: could not take over earlier state: {e:?}"),
            }
        }
        self.tick(host, now_ms);
    }

    pub fn config(&self) -> &PluginConfig {
        &self.config
    }

    pub fn needed_facts(&self) -> NeededFacts {
        self.needed
    }

    /// First matching rule wins; otherwise the global part, if it has keys.
    pub fn profile_for(&self, facts: &mut dyn RequestFacts) -> Option<usize> {
        self.config
            .rules
            .iter()
            .find(|rule| rule.matcher.matches(facts))
            .map(|rule| rule.profile)
            .or(self.config.global)
    }

    pub fn profile(&self, profile: usize) -> Option<&Profile> {
        self.config.profiles.get(profile)
    }

    pub fn decide(&mut self, host: &dyn Host, profile: Option<usize>, now_ms: u64) -> Decision {
        let Some((profile_idx, p)) =
            profile.and_then(|i| self.config.profiles.get(i).map(|p| (i, p)))
        else {
            return Decision::Untouched;
        };
        let (pool, selection, on_all) = (p.pool, p.selection, p.on_all_unavailable);
        self.refresh_and_restore(host, pool, now_ms);
        let (Some(store), Some(cursor)) = (self.stores.get(pool), self.cursors.get_mut(pool))
        else {
            return Decision::Untouched;
        };
        let pick = store
            .view()
            .pick(selection, on_all, cursor, &mut self.rng, now_ms);
        let metrics = self.metrics.get_mut(pool);
        match pick {
            Pick::Key { key, while_down } => {
                if let Some(m) = metrics {
                    m.count_keyed();
                }
                Decision::UseKey(Assignment {
                    profile: profile_idx,
                    key,
                    while_down,
                })
            }
            Pick::Reject { retry_after_ms } => {
                if let Some(m) = metrics {
                    m.count_rejected();
                }
                Decision::Reject {
                    retry_after_secs: retry_after_ms.div_ceil(1000).max(1),
                }
            }
        }
    }

    /// The header to put on the upstream request for this key: `(name, value)`.
    pub fn key_header(&self, profile: usize, key: usize) -> Option<(&str, String)> {
        let p = self.config.profiles.get(profile)?;
        let k = self.config.pools.get(p.pool)?.keys.get(key)?;
        Some((
            p.auth.name.as_str(),
            format!("{}{}", p.auth.prefix, k.token),
        ))
    }

    pub fn key_label(&self, profile: usize, key: usize) -> Option<String> {
        let p = self.config.profiles.get(profile)?;
        Some(self.config.pools.get(p.pool)?.keys.get(key)?.label())
    }

    /// What an upstream status means for the key, before asking where the response came from.
    pub fn verdict(&self, profile: usize, status: u16) -> Verdict {
        match self.config.profiles.get(profile) {
            Some(p) if p.failover.enabled => classify(status, &p.failover.failover_on_status),
            _ => Verdict::Neutral,
        }
    }

    /// Records what the upstream said about a key. Writes shared data only if the key's state
    /// changes (a success on a key with no failures writes nothing).
    pub fn record(
        &mut self,
        host: &dyn Host,
        sent: Assignment,
        verdict: Verdict,
        status: u16,
        now_ms: u64,
    ) {
        let Assignment {
            profile,
            key,
            while_down,
        } = sent;
        let Some(p) = self.config.profiles.get(profile) else {
            return;
        };
        let pool = p.pool;
        let policy = Policy {
            failure_threshold: p.failover.failure_threshold,
            cooldown_ms: p.failover.cooldown_ms,
        };
        let Some(store) = self.stores.get(pool) else {
            return;
        };
        let needs_write =
            match verdict {
                Verdict::KeyFailure => true,
                Verdict::Success => store.state().keys.get(key).is_some_and(|k| {
                    k.consecutive_failures > 0 || (while_down && !k.is_available())
                }),
                Verdict::Neutral => false,
            };
        if !needs_write {
            return;
        }
        self.change(host, pool, now_ms, |s| match verdict {
            Verdict::KeyFailure => s
                .record_failure(key, status, now_ms, &policy)
                .into_iter()
                .collect(),
            Verdict::Success => s.record_success(key, while_down).into_iter().collect(),
            Verdict::Neutral => Vec::new(),
        });
    }

    /// Periodic work: bring back keys whose cooldown passed, even with no traffic, and bring
    /// the stats in line with the shared state.
    pub fn tick(&mut self, host: &dyn Host, now_ms: u64) {
        for pool in 0..self.stores.len() {
            self.refresh_and_restore(host, pool, now_ms);
            if let (Some(m), Some(store)) = (self.metrics.get_mut(pool), self.stores.get(pool)) {
                m.sync(host, store.state());
            }
        }
    }

    pub fn stores(&self) -> &[PoolStore] {
        &self.stores
    }

    fn refresh_and_restore(&mut self, host: &dyn Host, pool: usize, now_ms: u64) {
        let Some(store) = self.stores.get_mut(pool) else {
            return;
        };
        if let Err(e) = store.refresh(host) {
            log::debug!("reading shared state failed ({e:?}); using the cached copy");
        }
        if store.view().next_return_ms().is_some_and(|t| t <= now_ms) {
            self.change(host, pool, now_ms, |s| s.restore_due(now_ms));
        }
    }

    fn change(
        &mut self,
        host: &dyn Host,
        pool: usize,
        now_ms: u64,
        change: impl FnMut(&mut crate::pool::PoolState) -> Vec<Event>,
    ) {
        let Some(store) = self.stores.get_mut(pool) else {
            return;
        };
        match store.update(host, now_ms, change) {
            Ok(events) => {
                if let Some(m) = self.metrics.get(pool) {
                    m.count_events(host, &events);
                }
                self.log_events(pool, &events, now_ms);
            }
            Err(UpdateError::GaveUp) => {
                if let Some(m) = self.metrics.get(pool) {
                    m.count_gave_up(host);
                }
                log::warn!(
                    "pool {}: gave up updating shared state after repeated concurrent changes",
                    self.pool_label(pool)
                );
            }
            Err(UpdateError::Host(e)) => log::warn!(
                "pool {}: shared state write failed: {e}",
                self.pool_label(pool)
            ),
        }
    }

    fn pool_label(&self, pool: usize) -> &str {
        self.config
            .pools
            .get(pool)
            .map_or("?", |p| p.label.as_str())
    }

    fn log_events(&self, pool: usize, events: &[Event], now_ms: u64) {
        let Some(pool_cfg) = self.config.pools.get(pool) else {
            return;
        };
        let key_label = |k: usize| {
            pool_cfg
                .keys
                .get(k)
                .map_or_else(|| "?".to_string(), |k| k.label())
        };
        let secs = |until: u64| until.saturating_sub(now_ms) as f64 / 1000.0;
        let mut marked_down = false;
        for event in events {
            match *event {
                Event::MarkedDown {
                    key,
                    status,
                    until_ms,
                } => {
                    marked_down = true;
                    log::warn!(
                        "pool {}: key {} marked down after status {status}; back in {:.1}s",
                        pool_cfg.label,
                        key_label(key),
                        secs(until_ms)
                    );
                }
                Event::CooldownExtended { key, until_ms } => log::info!(
                    "pool {}: key {} failed again while down; back in {:.1}s",
                    pool_cfg.label,
                    key_label(key),
                    secs(until_ms)
                ),
                Event::Restored { key } => {
                    log::info!("pool {}: key {} restored", pool_cfg.label, key_label(key))
                }
                Event::FailureCounted { key, consecutive } => log::info!(
                    "pool {}: key {} failure {consecutive} counted",
                    pool_cfg.label,
                    key_label(key)
                ),
                Event::FailuresReset { key } => log::debug!(
                    "pool {}: key {} succeeded; failure count reset",
                    pool_cfg.label,
                    key_label(key)
                ),
            }
        }
        if marked_down {
            if let Some(store) = self.stores.get(pool) {
                if store.view().available_count() == 0 {
                    log::warn!(
                        "pool {}: all {} keys are down; the first returns in {:.1}s",
                        pool_cfg.label,
                        pool_cfg.keys.len(),
                        store.view().next_return_ms().map_or(0.0, secs)
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::metrics::fake::FakeMetrics;
    use crate::metrics::MetricKind;
    use crate::store::fake::FakeShared;
    use crate::store::StoreError;

    #[derive(Default)]
    struct TestHost {
        shared: FakeShared,
        metrics: FakeMetrics,
    }

    impl SharedData for TestHost {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            self.shared.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.shared.set(key, value, cas)
        }
    }

    impl MetricsHost for TestHost {
        fn define(&self, kind: MetricKind, name: &str) -> Option<u32> {
            self.metrics.define(kind, name)
        }
        fn increment(&self, id: u32, delta: u64) {
            self.metrics.increment(id, delta)
        }
        fn record(&self, id: u32, value: u64) {
            self.metrics.record(id, value)
        }
    }

    struct NoFacts;
    impl RequestFacts for NoFacts {
        fn route_name(&mut self) -> Option<String> {
            None
        }
        fn cluster_name(&mut self) -> Option<String> {
            None
        }
        fn host(&mut self) -> Option<String> {
            None
        }
    }

    fn engine(json: &str, seed: u64) -> Engine {
        Engine::new(config::parse(json.as_bytes()).unwrap(), seed)
    }

    fn use_key(d: Decision) -> (usize, usize, bool) {
        match d {
            Decision::UseKey(a) => (a.profile, a.key, a.while_down),
            other => panic!("expected a key, got {other:?}"),
        }
    }

    fn sent(profile: usize, key: usize, while_down: bool) -> Assignment {
        Assignment {
            profile,
            key,
            while_down,
        }
    }

    #[test]
    fn a_429_on_one_worker_moves_every_worker_off_the_key_until_the_cooldown_ends() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 1000}}"#;
        let mut w1 = engine(cfg, 1);
        let mut w2 = engine(cfg, 2);
        let g = w1.profile_for(&mut NoFacts);
        let (p, k, _) = use_key(w1.decide(&host, g, 0));
        let v = w1.verdict(p, 429);
        w1.record(&host, sent(p, k, false), v, 429, 10);
        for now in [20, 500, 1009] {
            for _ in 0..4 {
                let (_, k2, _) = use_key(w2.decide(&host, g, now));
                assert_ne!(k2, k, "at {now}");
            }
        }
        let seen: std::collections::HashSet<usize> = (0..4)
            .map(|_| use_key(w2.decide(&host, g, 1010)).1)
            .collect();
        assert_eq!(seen.len(), 2, "restored at 10 + 1000");
    }

    #[test]
    fn tick_restores_without_traffic_and_only_one_worker_writes() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": 100}}"#;
        let mut w1 = engine(cfg, 1);
        let mut w2 = engine(cfg, 2);
        w1.record(&host, sent(0, 0, false), Verdict::KeyFailure, 503, 0);
        w1.tick(&host, 50);
        w2.tick(&host, 50);
        assert_eq!(w2.stores()[0].view().available_count(), 0);
        let sets = host.shared.sets.get();
        w1.tick(&host, 100);
        w2.tick(&host, 100);
        assert_eq!(
            host.shared.sets.get() - sets,
            2,
            "one state write and one epoch write"
        );
        assert_eq!(w2.stores()[0].view().available_count(), 1);
    }

    #[test]
    fn successes_write_only_when_they_change_something() {
        let host = TestHost::default();
        let mut w = engine(
            r#"{"apiTokens": ["a"], "failover": {"failureThreshold": 3}}"#,
            1,
        );
        for _ in 0..5 {
            w.decide(&host, Some(0), 0);
            w.record(&host, sent(0, 0, false), Verdict::Success, 200, 0);
        }
        assert_eq!(host.shared.sets.get(), 0);
        w.record(&host, sent(0, 0, false), Verdict::KeyFailure, 500, 0);
        w.decide(&host, Some(0), 0);
        w.record(&host, sent(0, 0, false), Verdict::Success, 200, 0);
        assert_eq!(w.stores()[0].state().keys[0].consecutive_failures, 0);
        assert_eq!(host.shared.sets.get(), 4);
    }

    #[test]
    fn reject_answers_with_whole_seconds_until_the_first_return() {
        let host = TestHost::default();
        let mut w = engine(
            r#"{"apiTokens": ["a", "b"], "onAllUnavailable": "reject", "failover": {"cooldownDuration": 2500}}"#,
            1,
        );
        w.record(&host, sent(0, 0, false), Verdict::KeyFailure, 429, 0);
        w.record(&host, sent(0, 1, false), Verdict::KeyFailure, 429, 1000);
        assert_eq!(
            w.decide(&host, Some(0), 1000),
            Decision::Reject {
                retry_after_secs: 2
            }
        );
        assert_eq!(
            w.decide(&host, Some(0), 2499),
            Decision::Reject {
                retry_after_secs: 1
            }
        );
        assert!(matches!(
            w.decide(&host, Some(0), 2500),
            Decision::UseKey(Assignment { key: 0, .. })
        ));
    }

    #[test]
    fn earliest_uses_the_first_returning_key_and_a_success_brings_it_back() {
        let host = TestHost::default();
        let mut w = engine(
            r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 10000}}"#,
            1,
        );
        w.record(&host, sent(0, 1, false), Verdict::KeyFailure, 429, 0);
        w.record(&host, sent(0, 0, false), Verdict::KeyFailure, 429, 100);
        let (p, k, down) = use_key(w.decide(&host, Some(0), 200));
        assert_eq!((k, down), (1, true));
        w.record(&host, sent(p, k, down), Verdict::Success, 200, 200);
        assert_eq!(w.stores()[0].view().available_count(), 1);
    }

    #[test]
    fn disabled_failover_never_marks_keys() {
        let w = engine(r#"{"apiTokens": ["a"], "failover": {"enabled": false}}"#, 1);
        assert_eq!(w.verdict(0, 429), Verdict::Neutral);
    }

    #[test]
    fn key_header_follows_the_profile() {
        let w = engine(
            r#"{"apiTokens": ["sk-1"], "authHeader": {"name": "x-token", "prefix": "Key "}}"#,
            1,
        );
        assert_eq!(
            w.key_header(0, 0),
            Some(("x-token", "Key sk-1".to_string()))
        );
        assert_eq!(w.key_header(0, 5), None);
    }

    #[test]
    fn workers_start_round_robin_at_different_keys() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a", "b", "c", "d", "e", "f", "g", "h"]}"#;
        let firsts: std::collections::HashSet<usize> = (0..8)
            .map(|seed| use_key(engine(cfg, seed * 7919).decide(&host, Some(0), 0)).1)
            .collect();
        assert!(firsts.len() > 1);
    }

    #[test]
    fn metrics_count_requests_transitions_and_follow_availability() {
        let host = TestHost::default();
        let cfg = r#"{"name": "main", "apiTokens": [{"token": "a", "name": "ka"}, "b"], "onAllUnavailable": "reject",
                      "failover": {"cooldownDuration": 1000}}"#;
        let mut w = engine(cfg, 3);
        w.start(&host, 0);
        let m = |name: &str| {
            host.metrics
                .get(&format!("ai_key_failover.pool.main.{name}"))
        };
        assert_eq!(m("keys_configured"), 2);
        assert_eq!(m("keys_available"), 2);
        for _ in 0..5 {
            w.decide(&host, Some(0), 0);
        }
        w.record(&host, sent(0, 0, false), Verdict::KeyFailure, 429, 10);
        w.record(&host, sent(0, 1, false), Verdict::KeyFailure, 503, 10);
        w.decide(&host, Some(0), 20);
        w.tick(&host, 20);
        assert_eq!(m("requests_keyed"), 5);
        assert_eq!(m("requests_rejected"), 1);
        assert_eq!(m("keys_available"), 0);
        assert_eq!(m("class.rate_limit.keys_marked_down"), 1);
        assert_eq!(m("class.server_error.keys_marked_down"), 1);
        assert_eq!(m("key.ka.key_available"), 0);
        assert_eq!(m("key.ka.key_down_until_seconds"), 2);
        w.tick(&host, 1010);
        assert_eq!(m("keys_restored"), 2);
        assert_eq!(m("key.ka.key_restored"), 1);
        assert_eq!(m("keys_available"), 2);
    }
}
