//! One VM's view of the plugin: the parsed config, a cached store per pool, and the decisions a
//! request needs. Free of proxy-wasm so the whole flow runs in host tests against a fake store;
//! a host (`wasm`, `native`) only reads headers and properties and calls in here.
//!
//! This file holds the request path (which key, what an answer does to it) and the tick;
//! `health_checks` runs the health checks this VM leads, `transitions` logs what changed.

use crate::core::attempts::Attempts;
use crate::core::config::{PluginConfig, Profile};
use crate::core::health::PoolChecks;
use crate::core::judge;
use crate::core::metrics::{MetricsHost, PoolMetrics};
use crate::core::pool::{Event, Failure, PoolState, SentAs, MAX_JITTER_PERMILLE};
use crate::core::rules::RequestFacts;
use crate::core::schedule::{self, Every};
use crate::core::select::{OnAllUnavailable, PoolIndex, Rng, Selection};
use crate::core::status::Verdict;
use crate::core::store::{
    self, PoolStore, SharedData, StateChange, UpdateError, Updated, MAX_CAS_ATTEMPTS,
};

mod health_checks;
#[cfg(test)]
mod test_host;
mod transitions;

pub use health_checks::CheckAnswer;
// The hosts name the retry counters' outcomes with the rest of the engine's API.
pub use crate::core::metrics::RetryOutcome;

/// How long a probe may stay unanswered before another request may probe the key. Long enough
/// for a slow first byte; a probe that never answers (a vanished client) frees it sooner.
pub const PROBE_LEASE_MS: u64 = 60_000;

/// The host's clock, read at most once and only if needed: with every key healthy, a request
/// never needs the time, and each host call costs.
pub struct Clock<'a> {
    read: Option<&'a dyn Fn() -> u64>,
    cached: std::cell::Cell<Option<u64>>,
}

impl<'a> Clock<'a> {
    pub fn new(read: &'a dyn Fn() -> u64) -> Self {
        Clock {
            read: Some(read),
            cached: std::cell::Cell::new(None),
        }
    }

    /// A clock stopped at `ms` (tests, and callers that already know the time).
    pub fn at(ms: u64) -> Clock<'static> {
        Clock {
            read: None,
            cached: std::cell::Cell::new(Some(ms)),
        }
    }

    pub fn now(&self) -> u64 {
        if let Some(ms) = self.cached.get() {
            return ms;
        }
        let ms = self.read.map_or(0, |read| read());
        self.cached.set(Some(ms));
        ms
    }
}

/// The key a request was sent with, remembered until its response arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub profile: usize,
    pub key: usize,
    /// How it went: as a normal pick, as the key's probe, or while every key was out.
    pub sent_as: SentAs,
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
    /// Every key is down and the profile says `wait`: hold the request for up to
    /// `max_wait_ms` and ask again; `retry_after_secs` is what `reject` would say now.
    Hold {
        max_wait_ms: u64,
        retry_after_secs: u64,
    },
}

/// What a request brings to the key choice besides its profile and the keys it already failed
/// with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    /// `affinity`: the hash of the session header's value, when the request carries it.
    pub session: Option<u32>,
}

pub struct Engine {
    config: PluginConfig,
    stores: Vec<PoolStore>,
    /// Per pool: the selection tables built from its cached state, rebuilt when it changes.
    indexes: Vec<PoolIndex>,
    /// Per pool, this worker's round-robin position; starts at a random offset so workers
    /// do not all begin with the same key.
    cursors: Vec<u64>,
    rng: Rng,
    /// Per pool; empty until `start` defines them.
    metrics: Vec<PoolMetrics>,
    /// Keys that failed per request across Envoy's retry attempts (upstream mode).
    attempts: Attempts,
    /// Identifies this engine in health-check leases.
    owner_id: u64,
    /// Per pool: the checks this VM runs while it holds the pool's lease.
    checks: Vec<PoolChecks>,
    /// Per pool: whether this VM already stored where the pool's traffic goes.
    target_learned: Vec<bool>,
    /// Per pool: whether its state changed since the key gauges were last brought in line, so
    /// a quiet second's housekeeping does not walk every key of a large pool.
    gauges_stale: Vec<bool>,
    /// Per profile and key: the credential header's value (`Bearer sk-...`), built once.
    header_values: Vec<Vec<String>>,
    /// The VM's tick period (`schedule::tick_period_ms`).
    tick_ms: u64,
    /// Per pool: its tick work runs on its own period, however fast the VM ticks.
    pool_ticks: Vec<Every>,
    /// Stats flush and purges: once a second.
    housekeeping: Every,
}

impl Engine {
    pub fn new(config: PluginConfig, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let (stores, indexes): (Vec<PoolStore>, Vec<PoolIndex>) = config
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
                let store = PoolStore::new(pool.id, pool.fingerprints());
                let affinity = config
                    .profiles
                    .iter()
                    .any(|p| p.pool == i && p.affinity_header.is_some());
                let index = PoolIndex::new(store.state(), pool.weights(), selection, affinity);
                (store, index)
            })
            .unzip();
        let cursors = stores.iter().map(|_| rng.next_u64()).collect();
        let owner_id = rng.next_u64();
        let periods: Vec<u64> = (0..config.pools.len())
            .map(|pool| schedule::pool_period_ms(&config, pool))
            .collect();
        let tick_ms = schedule::tick_period_ms(&periods);
        let pool_ticks = periods.iter().map(|&p| Every::new(p, tick_ms)).collect();
        let checks = config
            .pools
            .iter()
            .zip(&periods)
            .map(|(p, &period)| PoolChecks::new(p.keys.len(), period, tick_ms))
            .collect();
        let target_learned = vec![false; config.pools.len()];
        let gauges_stale = vec![true; config.pools.len()];
        let header_values = config
            .profiles
            .iter()
            .map(|p| {
                config.pools.get(p.pool).map_or_else(Vec::new, |pool| {
                    pool.keys
                        .iter()
                        .map(|k| format!("{}{}", p.auth.prefix, k.token))
                        .collect()
                })
            })
            .collect();
        Engine {
            config,
            stores,
            indexes,
            cursors,
            rng,
            metrics: Vec::new(),
            attempts: Attempts::default(),
            owner_id,
            checks,
            target_learned,
            gauges_stale,
            header_values,
            tick_ms,
            pool_ticks,
            housekeeping: Every::new(schedule::HOUSEKEEPING_MS, tick_ms),
        }
    }

    /// How often the host should call `tick`, in ms.
    pub fn tick_period_ms(&self) -> u64 {
        self.tick_ms
    }

    /// Whether a request of this profile should tell the engine where it goes: once per VM and
    /// pool, so health checks and retries into fallback pools know the cluster.
    pub fn wants_target(&self, profile: usize) -> bool {
        let Some(pool) = self.config.profiles.get(profile).map(|p| p.pool) else {
            return false;
        };
        !self.target_learned.get(pool).copied().unwrap_or(true)
    }

    /// The cluster that reaches a profile's provider: configured, or learned from traffic.
    pub fn cluster_for(&self, host: &dyn Host, profile: usize) -> Option<String> {
        let p = self.config.profiles.get(profile)?;
        if let Some(cluster) = &p.cluster {
            return Some(cluster.clone());
        }
        self.stores
            .get(p.pool)?
            .read_target(host)
            .map(|(cluster, _)| cluster)
    }

    pub fn learn_target(
        &mut self,
        host: &dyn Host,
        profile: usize,
        cluster: &str,
        authority: &str,
    ) {
        let Some(pool) = self.config.profiles.get(profile).map(|p| p.pool) else {
            return;
        };
        if let Some(store) = self.stores.get(pool) {
            store.write_target(host, cluster, authority);
        }
        if let Some(learned) = self.target_learned.get_mut(pool) {
            *learned = true;
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
            let label = pool_label(&self.config, pool);
            match store.carry_over(host, now_ms) {
                Ok(c) => {
                    if c.keys_carried > 0 {
                        log::info!(
                            "pool {label}: kept the state of {} keys from the previous configuration",
                            c.keys_carried
                        );
                    }
                    if c.keys_reenabled > 0 {
                        log::info!(
                            "pool {label}: {} keys disabled until the configuration changed are back",
                            c.keys_reenabled
                        );
                    }
                }
                Err(UpdateError::GaveUp) => {
                    if let Some(m) = self.metrics.get(pool) {
                        m.count_gave_up(host);
                    }
                    log::warn!(
                        "pool {label}: gave up taking over the previous configuration's state after {MAX_CAS_ATTEMPTS} concurrent changes; its keys keep the shared state as it is"
                    );
                }
                Err(UpdateError::Host(e)) => {
                    log::warn!("pool {label}: could not take over earlier state: {e}")
                }
            }
        }
        // Once per config load, whatever the carry-over did.
        for pool in 0..self.stores.len() {
            self.reindex(pool, StateChange::Changed);
        }
        // After the carry-over, so this load's pools do not read one another as earlier pools.
        let pool_ids: Vec<u64> = self.stores.iter().map(PoolStore::pool_id).collect();
        match store::register(host, &pool_ids) {
            Ok(cleared) if !cleared.is_empty() => log::info!(
                "cleared the shared state of {} pools the registry no longer lists (it keeps the last {})",
                cleared.len(),
                store::REGISTRY_CAPACITY
            ),
            Ok(_) => {}
            Err(e) => log::warn!("could not record this configuration's pools in the shared registry ({e:?}); the next configuration will not take over their state"),
        }
        self.tick(host, now_ms);
    }

    pub fn config(&self) -> &PluginConfig {
        &self.config
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

    /// `avoid`: (pool, key) pairs that already failed for this request (its earlier attempts).
    ///
    /// The profile's own pool serves when it has a key; otherwise its fallbacks, in order. A key
    /// this request already failed with is taken only when nothing else anywhere can serve.
    pub fn decide(
        &mut self,
        host: &dyn Host,
        profile: Option<usize>,
        clock: &Clock,
        avoid: &[(usize, usize)],
    ) -> Decision {
        self.decide_with(host, profile, clock, avoid, Ask::default())
    }

    /// `decide`, with what the request brings (its session).
    pub fn decide_with(
        &mut self,
        host: &dyn Host,
        profile: Option<usize>,
        clock: &Clock,
        avoid: &[(usize, usize)],
        ask: Ask,
    ) -> Decision {
        let Some((primary, p)) = profile.and_then(|i| self.config.profiles.get(i).map(|p| (i, p)))
        else {
            return Decision::Untouched;
        };
        let (on_all, primary_pool, chain_len) =
            (p.on_all_unavailable, p.pool, 1 + p.fallbacks.len());
        let passes: &[bool] = if avoid.is_empty() {
            &[true]
        } else {
            &[true, false]
        };
        for &honour_avoid in passes {
            for position in 0..chain_len {
                // Indexes, not a collected list: no allocation per request.
                let Some(profile_idx) = self.chain_member(primary, position) else {
                    continue;
                };
                if let Some((key, sent_as)) =
                    self.serve_from(host, profile_idx, clock, avoid, honour_avoid, ask)
                {
                    let pool = self.config.profiles.get(profile_idx).map_or(0, |p| p.pool);
                    self.count_keyed(pool);
                    if profile_idx != primary {
                        if let Some(m) = self
                            .config
                            .profiles
                            .get(primary)
                            .and_then(|p| self.metrics.get_mut(p.pool))
                        {
                            m.count_fallen_back();
                        }
                    }
                    return Decision::UseKey(Assignment {
                        profile: profile_idx,
                        key,
                        sent_as,
                    });
                }
            }
        }
        // Nothing in the whole chain can serve: `onAllUnavailable` of the profile decides.
        let views: Vec<(usize, &crate::core::select::PoolView)> = (0..chain_len)
            .filter_map(|position| {
                let i = self.chain_member(primary, position)?;
                let pool = self.config.profiles.get(i)?.pool;
                Some((i, self.indexes.get(pool)?.view()))
            })
            .collect();
        let earliest = views
            .iter()
            .filter_map(|(i, v)| v.earliest_down().map(|(key, until)| (until, *i, key)))
            .min();
        let retry_after_ms = views
            .iter()
            .map(|(_, v)| v.retry_after_ms(clock.now()))
            .min()
            .unwrap_or(0);
        match (on_all, earliest) {
            (OnAllUnavailable::Earliest, Some((_, profile_idx, key))) => {
                let pool = self.config.profiles.get(profile_idx).map_or(0, |p| p.pool);
                self.count_keyed(pool);
                Decision::UseKey(Assignment {
                    profile: profile_idx,
                    key,
                    sent_as: SentAs::WhileDown,
                })
            }
            (OnAllUnavailable::Wait, _) => Decision::Hold {
                max_wait_ms: self
                    .config
                    .profiles
                    .get(primary)
                    .map_or(0, |p| p.max_wait_ms),
                retry_after_secs: whole_seconds(retry_after_ms),
            },
            _ => {
                self.count_rejected_in(primary_pool);
                Decision::Reject {
                    retry_after_secs: whole_seconds(retry_after_ms),
                }
            }
        }
    }

    /// A held request is answered as `reject` after all (its wait ran out, or the queue is
    /// full): counted as rejected then, once, not on every look while it was held.
    pub fn count_rejected(&mut self, profile: usize) {
        if let Some(pool) = self.config.profiles.get(profile).map(|p| p.pool) {
            self.count_rejected_in(pool);
        }
    }

    /// `affinity`: the header whose value names a request's session, for this profile.
    pub fn affinity_header(&self, profile: usize) -> Option<&str> {
        self.config
            .profiles
            .get(profile)?
            .affinity_header
            .as_deref()
    }

    /// A session's key: its own (the owner on the ring of every key) while in rotation, or its
    /// probe when the key's time out is over; else the next key in rotation on the ring.
    /// None when no key fits: the request is then served as one without a session.
    fn serve_session(
        &mut self,
        host: &dyn Host,
        pool: usize,
        hash: u32,
        clock: &Clock,
        avoid: &[usize],
    ) -> Option<(usize, SentAs)> {
        let home = self.indexes.get(pool)?.ring()?.owner(hash)?;
        if !avoid.contains(&home) {
            let state = self.stores.get(pool)?.state().keys.get(home)?;
            if state.is_available() {
                return Some((home, SentAs::Normal));
            }
            // Its own sessions bring a key back: nobody else's request is moved to probe it.
            if state.probe_claimable() {
                if let Some(claim_ms) = self.claim_probe(host, pool, home, clock.now()) {
                    return Some((home, SentAs::Probe { claim_ms }));
                }
            }
        }
        self.indexes
            .get(pool)?
            .view()
            .session_key(hash)
            .filter(|k| !avoid.contains(k))
            .map(|k| (k, SentAs::Normal))
    }

    /// The profile at `position` in `primary`'s chain: itself first, then its fallbacks.
    fn chain_member(&self, primary: usize, position: usize) -> Option<usize> {
        match position {
            0 => Some(primary),
            n => self
                .config
                .profiles
                .get(primary)?
                .fallbacks
                .get(n - 1)
                .copied(),
        }
    }

    /// A key of this profile's pool that can serve now: a probe to claim, or an available key.
    fn serve_from(
        &mut self,
        host: &dyn Host,
        profile: usize,
        clock: &Clock,
        avoid: &[(usize, usize)],
        honour_avoid: bool,
        ask: Ask,
    ) -> Option<(usize, SentAs)> {
        let p = self.config.profiles.get(profile)?;
        let (pool, selection) = (p.pool, p.selection);
        let session = ask.session.filter(|_| p.affinity_header.is_some());
        let avoid_here: Vec<usize> = if honour_avoid {
            avoid
                .iter()
                .filter(|(ap, _)| *ap == pool)
                .map(|(_, k)| *k)
                .collect()
        } else {
            Vec::new()
        };
        self.refresh_and_advance(host, pool, clock);
        if let Some(hash) = session {
            if let Some(found) = self.serve_session(host, pool, hash, clock, &avoid_here) {
                return Some(found);
            }
        }
        // A key whose time out is over is tried by exactly one request: whoever claims it.
        let candidate = self
            .indexes
            .get(pool)
            .and_then(|index| index.view().probe_candidate())
            .filter(|k| !avoid_here.contains(k));
        if let Some(key) = candidate {
            if let Some(claim_ms) = self.claim_probe(host, pool, key, clock.now()) {
                return Some((key, SentAs::Probe { claim_ms }));
            }
        }
        let index = self.indexes.get(pool)?;
        let cursor = self.cursors.get_mut(pool)?;
        let key = index
            .view()
            .pick_available(selection, cursor, &mut self.rng, &avoid_here)?;
        Some((key, SentAs::Normal))
    }

    /// The pool a profile draws from, and its name.
    pub fn pool_of(&self, profile: usize) -> Option<(usize, &str)> {
        let pool = self.config.profiles.get(profile)?.pool;
        Some((pool, self.config.pools.get(pool)?.label.as_str()))
    }

    /// (pool, key) pairs that failed for this request in its earlier attempts.
    pub fn failed_for(&self, request_id: &str) -> Vec<(usize, usize)> {
        self.attempts.failed(request_id).to_vec()
    }

    pub fn forget_attempts(&mut self, request_id: &str) {
        self.attempts.forget(request_id);
    }

    /// Upstream mode: an attempt got `status`. Remembered only when another key could do better
    /// (a status the pool's `failoverOnStatus` or `disableOnStatus` covers, never one that is the
    /// request's own fault), so bad requests fill no memory. Whether `failover` takes keys out
    /// does not matter here: Envoy retries anyway, and the retry should use another key.
    pub fn note_failed_attempt(
        &mut self,
        request_id: &str,
        sent: Assignment,
        status: u16,
        now_ms: u64,
    ) {
        let Some(p) = self.config.profiles.get(sent.profile) else {
            return;
        };
        if matches!(
            judge::verdict(&p.failover, status, None),
            Verdict::KeyFailure(_)
        ) {
            self.attempts
                .note_failure(request_id, (p.pool, sent.key), now_ms);
        }
    }

    pub fn count_retry(&mut self, profile: usize, outcome: RetryOutcome) {
        let Some(pool) = self.config.profiles.get(profile).map(|p| p.pool) else {
            return;
        };
        if let Some(m) = self.metrics.get_mut(pool) {
            m.count_retry(outcome);
        }
    }

    /// A request of `pool` was given a key.
    fn count_keyed(&mut self, pool: usize) {
        if let Some(m) = self.metrics.get_mut(pool) {
            m.count_keyed();
        }
    }

    /// A request of `pool` was answered locally: no key could serve it.
    fn count_rejected_in(&mut self, pool: usize) {
        if let Some(m) = self.metrics.get_mut(pool) {
            m.count_rejected();
        }
    }

    /// A cooldown's jitter, 0 to `MAX_JITTER_PERMILLE` thousandths.
    fn draw_jitter(&mut self) -> u32 {
        self.rng.below(u64::from(MAX_JITTER_PERMILLE) + 1) as u32
    }

    /// Claims the probe of `key`; on success, what names the claim (see `SentAs::Probe`).
    fn claim_probe(
        &mut self,
        host: &dyn Host,
        pool: usize,
        key: usize,
        now_ms: u64,
    ) -> Option<u64> {
        let events = self.change(host, pool, now_ms, |s| {
            s.claim_probe(key, now_ms, PROBE_LEASE_MS)
                .into_iter()
                .collect()
        });
        events.iter().find_map(|e| match *e {
            Event::ProbeClaimed { key: k, until_ms } if k == key => Some(until_ms),
            _ => None,
        })
    }

    /// The header to put on the upstream request for this key: `(name, value)`.
    pub fn key_header(&self, profile: usize, key: usize) -> Option<(&str, &str)> {
        let p = self.config.profiles.get(profile)?;
        let value = self.header_values.get(profile)?.get(key)?;
        Some((p.auth.name.as_str(), value.as_str()))
    }

    pub fn key_label(&self, profile: usize, key: usize) -> Option<String> {
        let p = self.config.profiles.get(profile)?;
        Some(self.config.pools.get(p.pool)?.keys.get(key)?.label())
    }

    /// What an upstream status means for the key (`judge::verdict`); with failover off, nothing.
    /// `error_body`: the body, when `wants_error_body` had it read.
    pub fn verdict(&self, profile: usize, status: u16, error_body: Option<&[u8]>) -> Verdict {
        match self.config.profiles.get(profile) {
            Some(p) if p.failover.enabled => judge::verdict(&p.failover, status, error_body),
            _ => Verdict::Neutral,
        }
    }

    /// Whether the response body may change the verdict or carry a retry hint
    /// (`judge::wants_error_body`), with failover on.
    pub fn wants_error_body(&self, profile: usize, status: u16) -> bool {
        judge::wants_error_body(status)
            && self
                .config
                .profiles
                .get(profile)
                .is_some_and(|p| p.failover.enabled)
    }

    /// Whether retry hints are read for this verdict (`judge::wants_hint`): ask before reading
    /// the headers.
    pub fn wants_retry_hint(&self, profile: usize, verdict: Verdict) -> bool {
        self.config
            .profiles
            .get(profile)
            .is_some_and(|p| judge::wants_hint(&p.failover, verdict))
    }

    /// The retry hint of an answer judged `verdict` (`judge::hint_ms`); the clock is read only
    /// for a hint.
    pub fn retry_hint_ms(
        &self,
        profile: usize,
        verdict: Verdict,
        headers: &[(String, Vec<u8>)],
        error_body: Option<&[u8]>,
        clock: &Clock,
    ) -> Option<u64> {
        let p = self.config.profiles.get(profile)?;
        judge::hint_ms(&p.failover, verdict, headers, error_body, || clock.now())
    }

    /// Records what the upstream said about a key. Writes shared data only if the key's state
    /// changes (a success on a key with no failures writes nothing). A probe that got no verdict
    /// gives its claim back.
    pub fn record(
        &mut self,
        host: &dyn Host,
        sent: Assignment,
        verdict: Verdict,
        status: u16,
        hint_ms: Option<u64>,
        clock: &Clock,
    ) {
        let Some(p) = self.config.profiles.get(sent.profile) else {
            return;
        };
        let (pool, policy, wants_hint) = (
            p.pool,
            p.failover.policy(),
            judge::wants_hint(&p.failover, verdict),
        );
        let key = sent.key;
        let needs_write = |store: &PoolStore| {
            store.state().keys.get(key).map(|cached| match verdict {
                Verdict::KeyFailure(_) => true,
                Verdict::Success => {
                    !cached.is_available()
                        || cached.consecutive_failures > 0
                        || cached.strikes > 0
                        || sent.sent_as.is_probe()
                }
                Verdict::Neutral => sent.sent_as.is_probe(),
            })
        };
        let Some(mut write) = self.stores.get(pool).and_then(needs_write) else {
            return;
        };
        if !write && verdict == Verdict::Success && policy.failure_threshold > 1 {
            // The cache is as old as the request: another worker may have counted a failure
            // since. This success comes after that failure, so it must reset the count, or that
            // worker's next failure would be taken as the next in a row. One epoch read (the
            // state only if it moved). With a threshold of 1 no count ever stays on an available
            // key, so successes there read nothing.
            self.refresh(host, pool);
            write = self.stores.get(pool).and_then(needs_write).unwrap_or(false);
        }
        if !write {
            return;
        }
        let now_ms = clock.now();
        let failure = match verdict {
            Verdict::KeyFailure(class) => Some(Failure {
                status,
                class,
                hint_ms: hint_ms.filter(|_| wants_hint),
                jitter_permille: self.draw_jitter(),
            }),
            _ => None,
        };
        self.change(host, pool, now_ms, |s| {
            let event = match (verdict, failure, sent.sent_as) {
                (Verdict::KeyFailure(_), Some(f), SentAs::Probe { claim_ms }) => {
                    s.record_probe_failure(key, claim_ms, &f, now_ms, &policy)
                }
                (Verdict::KeyFailure(_), Some(f), _) => s.record_failure(key, &f, now_ms, &policy),
                (Verdict::Success, _, _) => s.record_success(key, sent.sent_as),
                (_, _, SentAs::Probe { claim_ms }) => s.release_probe(key, claim_ms),
                _ => None,
            };
            event.into_iter().collect()
        });
    }

    /// `failover.preemptiveCooldown`: the budget headers a success of this profile should be
    /// read for, or None (off, failover off, or a provider that sends none).
    pub fn wants_budget(&self, profile: usize) -> Option<crate::core::budget::Family> {
        let p = self.config.profiles.get(profile)?;
        if !(p.failover.enabled && p.failover.preemptive_cooldown) {
            return None;
        }
        crate::core::budget::family(p.provider)
    }

    /// A success said the key's budget is used up for `spent_for_ms`: the key rests until the
    /// reset, clamped to `[minCooldownDuration, maxCooldownDuration]`, with no failure counted.
    pub fn spend(&mut self, host: &dyn Host, sent: Assignment, spent_for_ms: u64, clock: &Clock) {
        let Some(p) = self.config.profiles.get(sent.profile) else {
            return;
        };
        let (pool, min, max) = (
            p.pool,
            p.failover.min_cooldown_ms,
            p.failover.max_cooldown_ms,
        );
        let now_ms = clock.now();
        let until_ms = now_ms.saturating_add(spent_for_ms.clamp(min, max.max(min)));
        self.change(host, pool, now_ms, |s| {
            s.spend(sent.key, now_ms, until_ms).into_iter().collect()
        });
    }

    /// The request ended without a response the plugin could judge (a client disconnect, a
    /// reset): a probe it held is given back.
    pub fn abandon(&mut self, host: &dyn Host, sent: Assignment, now_ms: u64) {
        let SentAs::Probe { claim_ms } = sent.sent_as else {
            return;
        };
        let Some(pool) = self.config.profiles.get(sent.profile).map(|p| p.pool) else {
            return;
        };
        self.change(host, pool, now_ms, |s| {
            s.release_probe(sent.key, claim_ms).into_iter().collect()
        });
    }

    /// Periodic work: end time outs that are over, even with no traffic, and bring the stats in
    /// line with the shared state.
    ///
    /// The VM may tick faster than a pool needs (another pool has a 100 ms cooldown): each pool
    /// is advanced on its own period, and stats and purges run once a second, so a fast tick
    /// adds only the work that needs it.
    pub fn tick(&mut self, host: &dyn Host, now_ms: u64) {
        let housekeeping = self.housekeeping.due(now_ms);
        if housekeeping {
            self.attempts.purge(now_ms);
        }
        for pool in 0..self.stores.len() {
            if self.pool_ticks.get_mut(pool).is_some_and(|t| t.due(now_ms)) {
                self.refresh_and_advance(host, pool, &Clock::at(now_ms));
            }
            if !housekeeping {
                continue;
            }
            if let (Some(m), Some(store)) = (self.metrics.get_mut(pool), self.stores.get_mut(pool))
            {
                m.count_decode_failed(host, store.take_decode_failures());
                // The gauges are a function of the state alone: unchanged state, nothing to do.
                if self.gauges_stale.get_mut(pool).is_none_or(std::mem::take) {
                    m.sync(host, store.state());
                } else {
                    m.flush_counters(host);
                }
            }
        }
    }

    /// Flushes the request counters summed since the last tick: the engine's last act before
    /// it goes away (Envoy replaced its root context on a reload, or the VM stops).
    pub fn flush_counters(&mut self, host: &dyn Host) {
        for m in &mut self.metrics {
            m.flush_counters(host);
        }
    }

    pub fn stores(&self) -> &[PoolStore] {
        &self.stores
    }

    pub fn indexes(&self) -> &[PoolIndex] {
        &self.indexes
    }

    /// Makes the pool's cached state current, and its selection tables with it.
    fn refresh(&mut self, host: &dyn Host, pool: usize) {
        let Some(store) = self.stores.get_mut(pool) else {
            return;
        };
        match store.refresh(host) {
            Ok(change) => self.reindex(pool, change),
            Err(e) => log::debug!("reading shared state failed ({e:?}); using the cached copy"),
        }
    }

    /// Rebuilds the pool's selection tables when its cached state changed, and has the next
    /// housekeeping bring its gauges in line.
    fn reindex(&mut self, pool: usize, change: StateChange) {
        if change == StateChange::Unchanged {
            return;
        }
        if let (Some(index), Some(store)) = (self.indexes.get_mut(pool), self.stores.get(pool)) {
            index.rebuild(store.state());
        }
        if let Some(stale) = self.gauges_stale.get_mut(pool) {
            *stale = true;
        }
    }

    fn refresh_and_advance(&mut self, host: &dyn Host, pool: usize, clock: &Clock) {
        self.refresh(host, pool);
        // Only a pool with something due later needs the time at all.
        let due = self
            .indexes
            .get(pool)
            .and_then(|index| index.view().next_change_ms());
        if let Some(now_ms) = due
            .map(|_| clock.now())
            .filter(|&now| due.is_some_and(|t| t <= now))
        {
            self.change(host, pool, now_ms, |s| s.advance(now_ms));
        }
    }

    /// Applies a change with CAS, then counts and logs what it caused. Returns the events.
    fn change(
        &mut self,
        host: &dyn Host,
        pool: usize,
        now_ms: u64,
        change: impl FnMut(&mut PoolState) -> Vec<Event>,
    ) -> Vec<Event> {
        let Some(store) = self.stores.get_mut(pool) else {
            return Vec::new();
        };
        match store.update(host, now_ms, change) {
            Ok(Updated { events, state }) => {
                self.reindex(pool, state);
                if let Some(m) = self.metrics.get(pool) {
                    m.count_events(host, &events);
                }
                self.log_events(pool, &events, now_ms);
                events
            }
            Err(UpdateError::GaveUp) => {
                if let Some(m) = self.metrics.get(pool) {
                    m.count_gave_up(host);
                }
                log::warn!(
                    "pool {}: gave up updating shared state after repeated concurrent changes",
                    self.pool_label(pool)
                );
                Vec::new()
            }
            Err(UpdateError::Host(e)) => {
                log::warn!(
                    "pool {}: shared state write failed: {e}",
                    self.pool_label(pool)
                );
                Vec::new()
            }
        }
    }

    fn pool_label(&self, pool: usize) -> &str {
        pool_label(&self.config, pool)
    }
}

/// A wait as `retry-after` says it: whole seconds, rounded up, at least 1.
fn whole_seconds(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// A pool's name for log lines. A function of the config alone, so it can be called while
/// another of the engine's fields is borrowed.
fn pool_label(config: &PluginConfig, pool: usize) -> &str {
    config.pools.get(pool).map_or("?", |p| p.label.as_str())
}

#[cfg(test)]
pub(crate) mod tests;
