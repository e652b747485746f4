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
            // Once per config load, whatever the carry-over did.
            if let Some(index) = self.indexes.get_mut(pool) {
                index.rebuild(store.state());
            }
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
                m.sync(host, store.state());
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

    /// Rebuilds the pool's selection tables when its cached state changed.
    fn reindex(&mut self, pool: usize, change: StateChange) {
        if change == StateChange::Unchanged {
            return;
        }
        if let (Some(index), Some(store)) = (self.indexes.get_mut(pool), self.stores.get(pool)) {
            index.rebuild(store.state());
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
pub(crate) mod tests {
    use super::test_host::*;
    /// Other modules' tests run the engine against these.
    pub(crate) use super::test_host::{NoFacts, TestHost};
    use super::*;
    use crate::core::schema::PoolKeys;
    use crate::core::status::FailureClass;
    use crate::core::store::fake::FakeShared;

    const KEYS_A_B_C: &str = r#"{"name": "main", "apiTokens": ["a", "b", "c"], "failover": {"cooldownDuration": 60000}}"#;

    /// A configuration of keys a and b started on `host`, whose first key chosen got a 429 (60 s
    /// cooldown) at 10 ms: the key that is down.
    fn a_key_down_under_keys_a_and_b(host: &TestHost) -> usize {
        let cfg =
            r#"{"name": "main", "apiTokens": ["a", "b"], "failover": {"cooldownDuration": 60000}}"#;
        let mut old = engine(cfg, 1);
        old.start(host, 0);
        let g = old.profile_for(&mut NoFacts);
        let (p, down, _) = old.key_for(host, g, 0);
        let v = old.verdict(p, 429, None);
        old.answered(host, sent(p, down, SentAs::Normal), v, 429, None, 10);
        down
    }

    #[test]
    fn a_key_carried_over_down_at_a_config_load_is_out_from_the_first_request() {
        let host = TestHost::default();
        let down = a_key_down_under_keys_a_and_b(&host);
        // A new key list keeping both keys: a new pool, which takes the down key's state over.
        let mut new = engine(KEYS_A_B_C, 2);
        new.start(&host, 20);
        let g = new.profile_for(&mut NoFacts);
        let picked: Vec<usize> = (0..6).map(|i| new.key_for(&host, g, 30 + i).1).collect();
        assert!(!picked.contains(&down), "key {down} is down: {picked:?}");
        assert_eq!(new.indexes()[0].view().available_count(), 2);
    }

    #[test]
    fn a_carry_over_that_gives_up_is_logged_and_counted_as_such() {
        let host = TestHost::default();
        a_key_down_under_keys_a_and_b(&host);
        // A new key list: it would carry the down key over, but every write of it conflicts.
        let mut new = engine(KEYS_A_B_C, 2);
        let state_key = PoolKeys::of(new.stores()[0].pool_id()).state;
        *host.shared.before_set.borrow_mut() = Some(Box::new(move |h: &FakeShared, key: &str| {
            if key == state_key {
                let v = h.value(key);
                h.put_raw(key, &v);
            }
        }));
        let lines = logged_by(|| new.start(&host, 20));
        *host.shared.before_set.borrow_mut() = None;
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("WARN pool main: gave up taking over")),
            "{lines:?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("kept the state")),
            "{lines:?}"
        );
        assert_eq!(host.metrics.get("ai_key_failover.pool.main.cas_gave_up"), 1);
    }

    #[test]
    fn reads_of_a_corrupt_state_entry_show_in_the_decode_failed_stat() {
        let host = TestHost::default();
        let cfg = r#"{"name": "main", "apiTokens": ["a", "b"]}"#;
        let mut w = engine(cfg, 1);
        w.start(&host, 0);
        let stat = "ai_key_failover.pool.main.state_decode_failed";
        assert_eq!(host.metrics.get(stat), 0);
        let keys = PoolKeys::of(w.stores()[0].pool_id());
        host.shared.put_raw(&keys.state, b"not a state entry");
        host.shared.put_raw(&keys.epoch, &[]);
        w.tick(&host, 1_000);
        assert_eq!(host.metrics.get(stat), 1);
        w.tick(&host, 2_000);
        assert_eq!(
            host.metrics.get(stat),
            1,
            "counted once per read, not per tick"
        );
    }

    #[test]
    fn a_429_on_one_worker_moves_every_worker_off_the_key_until_the_cooldown_ends() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 1000}}"#;
        let (mut w1, mut w2) = two_workers(&host, cfg);
        let g = w1.profile_for(&mut NoFacts);
        let (p, k, _) = w1.key_for(&host, g, 0);
        let v = w1.verdict(p, 429, None);
        w1.answered(&host, sent(p, k, SentAs::Normal), v, 429, None, 10);
        assert_never_given(&mut w2, &host, g, k, &[20, 500, 1009]);
        // Back after 10 + 1000 ms plus up to 10% jitter: first as exactly one probe.
        let (_, probe_key, how) = w2.key_for(&host, g, 1120);
        assert_eq!(probe_key, k);
        assert!(how.is_probe(), "{how:?}");
        for _ in 0..4 {
            let (_, k2, how) = w1.key_for(&host, g, 1121);
            assert_ne!(k2, k, "one probe at a time, on any worker");
            assert_eq!(how, SentAs::Normal);
        }
        w2.succeeded(&host, sent(p, k, how), 1130);
        let seen: std::collections::HashSet<usize> =
            (0..4).map(|_| w1.key_for(&host, g, 1131).1).collect();
        assert_eq!(seen.len(), 2, "the probe's success restored it");
    }

    #[test]
    fn a_request_sent_before_an_outage_that_fails_after_it_leaves_the_probe_alone() {
        let host = TestHost::default();
        let cfg = r#"{"name": "p", "apiTokens": [{"token": "a", "name": "ka"}, "b"],
                      "failover": {"cooldownDuration": 1000}}"#;
        let mut a = engine(cfg, 1);
        let mut b = engine(cfg, 2);
        a.start(&host, 0);
        b.start(&host, 0);
        // A's request goes out with key 0 while it is available; it answers late.
        let slow = sent(0, 0, SentAs::Normal);
        b.answered(&host, sent(0, 0, SentAs::Normal), RATE, 429, None, 10);
        let (_, k, probe) = use_key(b.decide(&host, Some(0), &Clock::at(1_200), &[]));
        assert_eq!(k, 0);
        assert!(probe.is_probe(), "{probe:?}");
        a.record(&host, slow, SERVER, 503, None, &Clock::at(1_300));
        for _ in 0..4 {
            let (_, k, how) = use_key(a.decide(&host, Some(0), &Clock::at(1_400), &[]));
            assert_eq!((k, how), (1, SentAs::Normal), "the probe is still out");
        }
        let SentAs::Probe { claim_ms } = probe else {
            unreachable!()
        };
        let key = &a.stores()[0].state().keys[0];
        assert!(
            key.probe_held_by(claim_ms),
            "the probe keeps its claim: {key:?}"
        );
        assert_eq!(key.strikes, 1);
        let m = |name: &str| host.pool_stat("p", name);
        assert_eq!(
            m("probes_failed"),
            0,
            "the stale failure was not the probe's"
        );
        assert_eq!(m("key.ka.key_marked_down"), 1, "one outage");
        b.succeeded(&host, sent(0, 0, probe), 1_500);
        a.tick(&host, 1_600);
        let key = &a.stores()[0].state().keys[0];
        assert!(key.is_available() && key.strikes == 0, "{key:?}");
        assert_eq!(m("keys_restored"), 1);
    }

    #[test]
    fn a_failed_probe_backs_off_and_a_silent_probe_is_released() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 1000, "cooldownBackoff": 3}}"#;
        let mut w = engine(cfg, 9);
        w.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 0);
        let (_, k, how) = use_key(w.decide(&host, Some(0), &Clock::at(1200), &[]));
        assert_eq!(k, 0);
        assert!(how.is_probe(), "{how:?}");
        w.answered(&host, sent(0, 0, how), SERVER, 503, None, 1200);
        let key = &w.stores()[0].state().keys[0];
        assert_eq!(key.strikes, 2);
        let cooldown = key.down_until_ms - 1200;
        assert!((3_000..=3_300).contains(&cooldown), "{cooldown}");
        // The next probe comes back with nothing to say (a local reply): another may probe.
        let (_, k, how) = use_key(w.decide(&host, Some(0), &Clock::at(5000), &[]));
        assert_eq!(k, 0);
        assert!(how.is_probe(), "{how:?}");
        w.answered(&host, sent(0, 0, how), Verdict::Neutral, 504, None, 5001);
        let (_, k, how) = use_key(w.decide(&host, Some(0), &Clock::at(5002), &[]));
        assert_eq!(k, 0);
        assert!(how.is_probe(), "{how:?}");
        w.abandon(&host, sent(0, 0, how), 5003);
        assert!(w.stores()[0].state().keys[0].probe_claimable());
    }

    #[test]
    fn retry_hints_and_refusals_set_how_long_a_key_stays_out() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a", "b", "c"], "failover": {"cooldownDuration": 60000}}"#;
        let mut w = engine(cfg, 4);
        w.answered(&host, sent(0, 0, SentAs::Normal), RATE, 429, Some(1_000), 0);
        let refused = Verdict::KeyFailure(FailureClass::KeyRefused);
        w.answered(&host, sent(0, 1, SentAs::Normal), refused, 401, None, 0);
        w.answered(
            &host,
            sent(0, 2, SentAs::Normal),
            SERVER,
            503,
            Some(1_000),
            0,
        );
        let keys = &w.stores()[0].state().keys;
        assert!(
            (1_000..=1_100).contains(&keys[0].down_until_ms),
            "the hint rules a rate limit"
        );
        assert_eq!(
            keys[1].down_until_ms, 3_600_000,
            "refused keys stay out for disableDuration"
        );
        assert!(
            keys[2].down_until_ms >= 60_000,
            "a server error's hint is ignored"
        );
        let no_hints = engine(
            r#"{"apiTokens": ["a"], "failover": {"respectRetryAfter": false}}"#,
            1,
        );
        assert!(!no_hints.wants_retry_hint(0, RATE));
        assert!(w.wants_retry_hint(0, RATE));
        assert!(!w.wants_retry_hint(0, SERVER));
        assert!(
            w.wants_error_body(0, 429)
                && !w.wants_error_body(0, 200)
                && !w.wants_error_body(0, 503)
        );
        assert_eq!(
            w.verdict(
                0,
                429,
                Some(br#"{"error": {"type": "insufficient_quota"}}"#)
            ),
            refused,
            "insufficient_quota is a refusal"
        );
    }

    #[test]
    fn tick_restores_without_traffic_and_only_one_worker_writes() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": 1000}}"#;
        let mut w1 = engine(cfg, 1);
        let mut w2 = engine(cfg, 2);
        w1.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 0);
        w1.tick(&host, 500);
        w2.tick(&host, 500);
        assert_eq!(w2.indexes()[0].view().available_count(), 0);
        let sets = host.shared.sets.get();
        w1.tick(&host, 1200);
        w2.tick(&host, 1200);
        assert_eq!(
            host.shared.sets.get() - sets,
            2,
            "one state write and one epoch write"
        );
        assert_eq!(w2.indexes()[0].view().probe_candidate(), Some(0));
    }

    #[test]
    fn successes_write_only_when_they_change_something() {
        let host = TestHost::default();
        let mut w = engine(
            r#"{"apiTokens": ["a"], "failover": {"failureThreshold": 3}}"#,
            1,
        );
        for _ in 0..5 {
            w.decide(&host, Some(0), &Clock::at(0), &[]);
            w.succeeded(&host, sent(0, 0, SentAs::Normal), 0);
        }
        assert_eq!(host.shared.sets.get(), 0);
        w.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 500, None, 0);
        w.decide(&host, Some(0), &Clock::at(0), &[]);
        w.succeeded(&host, sent(0, 0, SentAs::Normal), 0);
        assert_eq!(w.stores()[0].state().keys[0].consecutive_failures, 0);
        assert_eq!(host.shared.sets.get(), 4);
    }

    #[test]
    fn a_success_on_one_worker_resets_the_count_a_failure_on_another_raised() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"failureThreshold": 2}}"#;
        let mut a = engine(cfg, 1);
        let mut b = engine(cfg, 2);
        // Both requests start (and refresh their worker's cache) before either answer is in.
        a.decide(&host, Some(0), &Clock::at(0), &[]);
        b.decide(&host, Some(0), &Clock::at(0), &[]);
        a.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 10);
        b.succeeded(&host, sent(0, 0, SentAs::Normal), 20);
        a.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 30);
        let shared = |w: &mut Engine| {
            w.tick(&host, 40);
            w.stores()[0].state().keys[0].clone()
        };
        let key = shared(&mut b);
        assert!(
            key.is_available(),
            "a success came between the two failures: {key:?}"
        );
        assert_eq!(
            key.consecutive_failures, 1,
            "the failure after the success is the first again"
        );
        assert_eq!(shared(&mut a), key, "both workers see the same state");
        // Threshold 1 (the default) keeps successes free of shared-data reads: an available
        // key never holds a count there.
        let one = r#"{"apiTokens": ["a", "b"]}"#;
        let host = TestHost::default();
        let mut w = engine(one, 3);
        w.decide(&host, Some(0), &Clock::at(0), &[]);
        let gets = host.shared.gets.get();
        w.succeeded(&host, sent(0, 0, SentAs::Normal), 1);
        assert_eq!(host.shared.gets.get(), gets);
    }

    #[test]
    fn reject_answers_with_whole_seconds_until_the_first_return() {
        let host = TestHost::default();
        let mut w = engine(
            r#"{"apiTokens": ["a", "b"], "onAllUnavailable": "reject", "failover": {"cooldownDuration": 2500}}"#,
            1,
        );
        w.answered(&host, sent(0, 0, SentAs::Normal), RATE, 429, None, 0);
        w.answered(&host, sent(0, 1, SentAs::Normal), RATE, 429, None, 1000);
        assert_eq!(
            w.decide(&host, Some(0), &Clock::at(1000), &[]),
            Decision::Reject {
                retry_after_secs: 2
            }
        );
        assert_eq!(
            w.decide(&host, Some(0), &Clock::at(2499), &[]),
            Decision::Reject {
                retry_after_secs: 1
            }
        );
        assert!(matches!(
            w.decide(&host, Some(0), &Clock::at(2800), &[]),
            Decision::UseKey(Assignment {
                key: 0,
                sent_as: SentAs::Probe { .. },
                ..
            })
        ));
    }

    #[test]
    fn earliest_uses_the_first_returning_key_and_a_success_brings_it_back() {
        let host = TestHost::default();
        let mut w = engine(
            r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 10000}}"#,
            1,
        );
        // Hints fix the order whatever the jitter: b returns at about 5 s, a at about 20 s.
        w.answered(&host, sent(0, 1, SentAs::Normal), RATE, 429, Some(5_000), 0);
        w.answered(
            &host,
            sent(0, 0, SentAs::Normal),
            RATE,
            429,
            Some(20_000),
            100,
        );
        let (p, k, down) = use_key(w.decide(&host, Some(0), &Clock::at(200), &[]));
        assert_eq!((k, down), (1, SentAs::WhileDown));
        w.succeeded(&host, sent(p, k, down), 200);
        assert_eq!(w.indexes()[0].view().available_count(), 1);
    }

    #[test]
    fn disabled_failover_never_marks_keys() {
        let w = engine(r#"{"apiTokens": ["a"], "failover": {"enabled": false}}"#, 1);
        assert_eq!(w.verdict(0, 429, None), Verdict::Neutral);
    }

    #[test]
    fn key_header_follows_the_profile() {
        let w = engine(
            r#"{"apiTokens": ["sk-1"], "authHeader": {"name": "x-token", "prefix": "Key "}}"#,
            1,
        );
        assert_eq!(w.key_header(0, 0), Some(("x-token", "Key sk-1")));
        assert_eq!(w.key_header(0, 5), None);
    }

    #[test]
    fn workers_start_round_robin_at_different_keys() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a", "b", "c", "d", "e", "f", "g", "h"]}"#;
        let firsts: std::collections::HashSet<usize> = (0..8)
            .map(|seed| {
                use_key(engine(cfg, seed * 7919).decide(&host, Some(0), &Clock::at(0), &[])).1
            })
            .collect();
        assert!(firsts.len() > 1);
    }

    #[test]
    fn request_counts_since_the_last_tick_are_flushed_when_the_engine_goes() {
        let host = TestHost::default();
        let cfg = r#"{"name": "main", "apiTokens": ["a", "b"]}"#;
        let mut old = engine(cfg, 3);
        old.start(&host, 0);
        old.decide(&host, Some(0), &Clock::at(0), &[]);
        old.tick(&host, 1000);
        for _ in 0..3 {
            old.decide(&host, Some(0), &Clock::at(1500), &[]);
        }
        let keyed = || host.metrics.get("ai_key_failover.pool.main.requests_keyed");
        assert_eq!(keyed(), 1, "counted locally until the next tick");
        // A reload: the new engine defines the same stats; the old one never ticks again.
        let mut new = engine(cfg, 4);
        new.start(&host, 1600);
        old.flush_counters(&host);
        assert_eq!(keyed(), 4);
        old.flush_counters(&host);
        new.tick(&host, 2000);
        assert_eq!(keyed(), 4, "each count is flushed once");
    }

    #[test]
    fn metrics_count_requests_transitions_and_follow_availability() {
        let host = TestHost::default();
        let cfg = r#"{"name": "main", "apiTokens": [{"token": "a", "name": "ka"}, "b"], "onAllUnavailable": "reject",
                      "failover": {"cooldownDuration": 1000}}"#;
        let mut w = engine(cfg, 3);
        w.start(&host, 0);
        let m = |name: &str| host.pool_stat("main", name);
        assert_eq!(m("keys_configured"), 2);
        assert_eq!(m("keys_available"), 2);
        for _ in 0..5 {
            w.decide(&host, Some(0), &Clock::at(0), &[]);
        }
        w.answered(&host, sent(0, 0, SentAs::Normal), RATE, 429, None, 10);
        w.answered(&host, sent(0, 1, SentAs::Normal), SERVER, 503, None, 10);
        w.decide(&host, Some(0), &Clock::at(20), &[]);
        w.tick(&host, 20);
        assert_eq!(m("requests_keyed"), 5);
        assert_eq!(m("requests_rejected"), 1);
        assert_eq!(m("keys_available"), 0);
        assert_eq!(m("class.rate_limit.keys_marked_down"), 1);
        assert_eq!(m("class.server_error.keys_marked_down"), 1);
        assert_eq!(m("key.ka.key_available"), 0);
        assert_eq!(m("key.ka.key_down_until_seconds"), 2);
        w.tick(&host, 1200);
        assert_eq!(
            m("keys_restored"),
            0,
            "a key whose time out ended waits for its probe"
        );
        let (_, k, how) = use_key(w.decide(&host, Some(0), &Clock::at(1200), &[]));
        assert!(how.is_probe(), "{how:?}");
        w.succeeded(&host, sent(0, k, how), 1201);
        w.tick(&host, 1202);
        assert_eq!(m("keys_restored"), 1);
        assert_eq!(m("keys_available"), 1);
    }

    #[test]
    fn a_pool_with_no_key_left_falls_back_in_order_and_returns_when_it_recovers() {
        let host = TestHost::default();
        let cfg = r#"{"name": "primary", "apiTokens": ["p1"], "onAllUnavailable": "reject",
            "failover": {"cooldownDuration": 1000},
            "fallbacks": [{"name": "second", "apiTokens": ["s1"], "model": "m2"},
                          {"name": "third", "apiTokens": ["t1"]}]}"#;
        let mut w = engine(cfg, 3);
        w.start(&host, 0);
        let primary = w.config().global.unwrap();
        let chain = w.profile(primary).unwrap().fallbacks.clone();
        let label = |w: &Engine, d: Decision| match d {
            Decision::UseKey(a) => w.pool_of(a.profile).unwrap().1.to_string(),
            other => format!("{other:?}"),
        };
        let served_by = |w: &mut Engine, now: u64| {
            let d = w.decide_for(&host, primary, now);
            label(w, d)
        };
        assert_eq!(served_by(&mut w, 0), "primary");
        w.answered(
            &host,
            sent(primary, 0, SentAs::Normal),
            RATE,
            429,
            Some(5_000),
            0,
        );
        assert_eq!(served_by(&mut w, 10), "second");
        w.answered(
            &host,
            sent(chain[0], 0, SentAs::Normal),
            SERVER,
            503,
            None,
            10,
        );
        assert_eq!(served_by(&mut w, 20), "third");
        w.answered(
            &host,
            sent(chain[1], 0, SentAs::Normal),
            SERVER,
            503,
            None,
            20,
        );
        match w.decide_for(&host, primary, 30) {
            Decision::Reject { retry_after_secs } => {
                assert!((1..=2).contains(&retry_after_secs), "{retry_after_secs}")
            }
            other => panic!("the whole chain is down: {other:?}"),
        }
        // The primary's key comes back (as a probe) before the others: traffic returns to it.
        let d = w.decide_for(&host, primary, 5_600);
        assert_eq!(label(&w, d), "primary");
        assert!(matches!(
            d,
            Decision::UseKey(Assignment {
                sent_as: SentAs::Probe { .. },
                ..
            })
        ));
        w.tick(&host, 5_700);
        let m = |name: &str| host.pool_stat("primary", name);
        assert_eq!(m("requests_fallen_back"), 2);
        assert_eq!(m("requests_rejected"), 1);
    }

    #[test]
    fn keys_a_request_already_failed_with_are_left_for_the_next_pool() {
        let host = TestHost::default();
        let cfg =
            r#"{"apiTokens": ["p1", "p2"], "fallbacks": [{"name": "f", "apiTokens": ["f1"]}]}"#;
        let mut w = engine(cfg, 3);
        let primary = w.config().global.unwrap();
        let pool = w.pool_of(primary).unwrap().0;
        match w.decide(&host, Some(primary), &Clock::at(0), &[(pool, 0), (pool, 1)]) {
            Decision::UseKey(a) => assert_eq!(w.pool_of(a.profile).unwrap().1, "f"),
            other => panic!("{other:?}"),
        }
        match w.decide(&host, Some(primary), &Clock::at(0), &[(pool, 0)]) {
            Decision::UseKey(a) => assert_eq!((a.profile, a.key), (primary, 1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_that_failed_with_every_key_still_gets_one() {
        let host = TestHost::default();
        let mut w = engine(r#"{"apiTokens": ["a", "b", "c"]}"#, 5);
        let g = w.config().global.unwrap();
        let pool = w.pool_of(g).unwrap().0;
        let tried = [(pool, 0), (pool, 1), (pool, 2)];
        for now in 0..6 {
            let (p, k, how) = use_key(w.decide(&host, Some(g), &Clock::at(now), &tried));
            assert_eq!((p, how), (g, SentAs::Normal));
            assert!(k < 3, "{k}");
        }
    }

    #[test]
    fn attempts_remember_only_failures_another_key_could_cure() {
        let cfg = r#"{"apiTokens": ["a", "b", "c"],
            "failover": {"enabled": false, "failoverOnStatus": ["4.*", "5.*"]}}"#;
        let mut w = engine(cfg, 1);
        let g = w.config().global.unwrap();
        let pool = w.pool_of(g).unwrap().0;
        // The request's own faults, even under a pattern that covers them, and successes.
        for status in [200, 302, 400, 404, 405, 413, 415, 422, 529] {
            w.note_failed_attempt("r", sent(g, 0, SentAs::Normal), status, 0);
        }
        assert!(w.failed_for("r").is_empty());
        assert!(
            w.attempts.is_empty(),
            "a flood of bad requests fills no memory"
        );
        w.note_failed_attempt("r", sent(g, 0, SentAs::Normal), 429, 0);
        w.note_failed_attempt("r", sent(g, 1, SentAs::Normal), 503, 0);
        w.note_failed_attempt("r", sent(g, 2, SentAs::Normal), 401, 0);
        assert_eq!(w.failed_for("r"), [(pool, 0), (pool, 1), (pool, 2)]);
        // Without the patterns that cover it, a status is not the key's failure.
        let mut narrow = engine(
            r#"{"apiTokens": ["a"], "failover": {"failoverOnStatus": ["429"]}}"#,
            1,
        );
        let g = narrow.config().global.unwrap();
        narrow.note_failed_attempt("r", sent(g, 0, SentAs::Normal), 500, 0);
        assert!(narrow.failed_for("r").is_empty());
    }

    #[test]
    fn a_100_ms_cooldown_ends_on_the_next_100_ms_tick_without_traffic() {
        let host = TestHost::default();
        // A Higress value: a 100 ms cooldown.
        let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 100}}"#;
        let mut w = engine(cfg, 1);
        assert_eq!(w.tick_period_ms(), 100);
        w.start(&host, 0);
        w.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 1_000);
        let until = w.stores()[0].state().keys[0].down_until_ms;
        assert!(
            (1_100..=1_110).contains(&until),
            "100 ms plus jitter: {until}"
        );
        let mut back_at = None;
        for now in (1_000..=2_000).step_by(100) {
            w.tick(&host, now);
            if w.indexes()[0].view().probe_candidate() == Some(0) {
                back_at = Some(now);
                break;
            }
        }
        let back_at = back_at.expect("the key never became a probe candidate");
        assert!(
            back_at <= 1_200,
            "back at {back_at}, not at the next 1 s tick"
        );
        // With traffic the request itself ends the time out, to the millisecond.
        let host = TestHost::default();
        let mut w2 = engine(cfg, 2);
        w2.start(&host, 0);
        w2.answered(&host, sent(0, 1, SentAs::Normal), SERVER, 503, None, 3_000);
        let until = w2.stores()[0].state().keys[1].down_until_ms;
        let (_, key, how) = use_key(w2.decide_for(&host, 0, until));
        assert_eq!(key, 1);
        assert!(matches!(how, SentAs::Probe { .. }), "{how:?}");
    }

    #[test]
    fn a_fast_tick_does_not_flush_stats_renew_the_lease_or_advance_slow_pools_more_often() {
        let host = TestHost::default();
        // The rule's pool needs 100 ms ticks; the global pool keeps its 1 s period.
        let cfg = r#"{"name": "slow", "apiTokens": ["a", "b"], "failover": {"healthCheckModel": "m",
            "healthCheckCluster": "c", "cooldownDuration": 60000},
            "_rules_": [{"_match_route_": ["r"], "name": "fast", "apiTokens": ["c"],
                         "failover": {"cooldownDuration": 100}}]}"#;
        let mut w = engine(cfg, 1);
        assert_eq!(w.tick_period_ms(), 100);
        let (slow_id, fast_id) = (w.config().pools[0].id, w.config().pools[1].id);
        w.start(&host, 0);
        // A key of the slow pool is out, so its checks have something to plan.
        w.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 0);
        host.ops.borrow_mut().clear();
        let keyed = |host: &TestHost| host.metrics.get("ai_key_failover.pool.slow.requests_keyed");
        let mut flushed_at = Vec::new();
        for now in (100..=3_000).step_by(100) {
            w.decide(&host, Some(0), &Clock::at(now), &[]);
            let before = keyed(&host);
            w.tick(&host, now);
            w.health_checks_due(&host, now);
            if keyed(&host) != before {
                flushed_at.push(now);
            }
        }
        assert_eq!(
            flushed_at,
            vec![1_000, 2_000, 3_000],
            "stats flush once a second"
        );
        let lease_looks = host.count("get", &PoolKeys::of(slow_id).lease);
        assert!(
            (3..=4).contains(&lease_looks)
                && host.count("set", &PoolKeys::of(slow_id).lease) == lease_looks,
            "the lease is renewed once a second: {lease_looks} looks in 3 s"
        );
        // Ticks alone: 30 for the fast pool; the slow pool's are once a second (requests read
        // its epoch too, 30 of them).
        assert_eq!(host.count("get", &PoolKeys::of(fast_id).epoch), 30);
        let slow_epoch_reads = host.count("get", &PoolKeys::of(slow_id).epoch);
        assert!(
            (33..=34).contains(&slow_epoch_reads),
            "30 requests and one tick a second: {slow_epoch_reads}"
        );
    }

    #[test]
    fn a_spent_budget_moves_every_worker_off_the_key_until_the_reset_with_no_probe_or_strike() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"preemptiveCooldown": true}}"#;
        let (mut w1, mut w2) = two_workers(&host, cfg);
        let g = w1.profile_for(&mut NoFacts);
        let (p, k, _) = w1.key_for(&host, g, 0);
        assert!(w1.wants_budget(p).is_some());
        w1.succeeded(&host, sent(p, k, SentAs::Normal), 10);
        // 300 ms is below minCooldownDuration: the rest is clamped up to 1 s.
        w1.spend(&host, sent(p, k, SentAs::Normal), 300, &Clock::at(10));
        assert_never_given(&mut w2, &host, g, k, &[20, 600, 1_009]);
        let pool = "ai_key_failover.pool.";
        let counted = |name: &str| {
            host.metrics
                .values
                .borrow()
                .iter()
                .filter(|(n, _)| n.starts_with(pool) && n.ends_with(name))
                .map(|(_, v)| *v)
                .sum::<u64>()
        };
        assert_eq!(counted("class.budget_spent.keys_marked_down"), 1);
        assert_eq!(counted("class.rate_limit.keys_marked_down"), 0);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            let (_, k2, how) = w2.key_for(&host, g, 1_010);
            assert_eq!(
                how,
                SentAs::Normal,
                "back in rotation at the reset: no probe"
            );
            seen.insert(k2);
        }
        assert!(seen.contains(&k));
        let key = &w2.stores()[0].state().keys[k];
        assert_eq!((key.strikes, key.consecutive_failures), (0, 0));
        assert_eq!(counted("keys_restored"), 1);
    }

    #[test]
    fn preemptive_cooldown_is_read_only_when_on_and_the_provider_reports_budgets() {
        for (cfg, wanted) in [
            (
                r#"{"apiTokens": ["a"]}"#,
                crate::core::config::PREEMPTIVE_COOLDOWN_DEFAULT,
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"preemptiveCooldown": true}}"#,
                true,
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"preemptiveCooldown": false}}"#,
                false,
            ),
            (
                r#"{"apiTokens": ["a"], "provider": "gemini", "failover": {"preemptiveCooldown": true}}"#,
                false,
            ),
            (
                r#"{"apiTokens": ["a"], "failover": {"preemptiveCooldown": true, "enabled": false}}"#,
                false,
            ),
        ] {
            let e = engine(cfg, 1);
            assert_eq!(e.wants_budget(0).is_some(), wanted, "{cfg}");
        }
    }

    #[test]
    fn a_session_keeps_its_key_moves_only_when_it_goes_out_and_returns_with_its_probe() {
        let host = TestHost::default();
        let cfg = r#"{"apiTokens": ["a", "b", "c", "d"], "affinity": {"header": "x-session-id"},
                      "failover": {"cooldownDuration": 1000}}"#;
        let mut w = engine(cfg, 1);
        w.start(&host, 0);
        let g = w.profile_for(&mut NoFacts);
        let session = |i: usize| Ask {
            session: Some(crate::core::affinity::session_hash(
                format!("s{i}").as_bytes(),
            )),
        };
        let pick = |w: &mut Engine, i: usize, now: u64| {
            use_key(w.decide_with(&host, g, &Clock::at(now), &[], session(i)))
        };
        let home: Vec<usize> = (0..40).map(|i| pick(&mut w, i, 0).1).collect();
        for _ in 0..3 {
            for (i, &k) in home.iter().enumerate() {
                assert_eq!(pick(&mut w, i, 0).1, k, "session {i}");
            }
        }
        let used: std::collections::HashSet<_> = home.iter().collect();
        assert!(used.len() >= 3, "sessions spread over the pool: {used:?}");
        let out = home[0];
        let p = g.unwrap();
        let v = w.verdict(p, 429, None);
        w.answered(&host, sent(p, out, SentAs::Normal), v, 429, None, 10);
        let moved: Vec<usize> = (0..40).map(|i| pick(&mut w, i, 20).1).collect();
        for (i, (&before, &now)) in home.iter().zip(&moved).enumerate() {
            if before == out {
                assert_ne!(now, out, "session {i} left the key that went out");
                assert_eq!(pick(&mut w, i, 30).1, now, "and stays on one other key");
            } else {
                assert_eq!(now, before, "session {i} of another key kept it");
            }
        }
        // After the cooldown, the key's own session probes it and its sessions come back.
        let (_, k, how) = pick(&mut w, 0, 1_200);
        assert_eq!(k, out);
        assert!(matches!(how, SentAs::Probe { .. }), "{how:?}");
        w.succeeded(&host, sent(p, out, how), 1_210);
        for (i, &k) in home.iter().enumerate() {
            assert_eq!(pick(&mut w, i, 1_220).1, k, "session {i} is home again");
        }
        // A request without the header uses `selection` as before.
        let plain: std::collections::HashSet<_> =
            (0..8).map(|_| w.key_for(&host, g, 1_230).1).collect();
        assert_eq!(plain.len(), 4);
    }

    #[test]
    fn wait_mode_holds_without_counting_a_rejection_until_told() {
        let host = TestHost::default();
        let cfg = r#"{"name": "p", "apiTokens": ["a"], "onAllUnavailable": "wait", "maxWaitMs": 1500,
                      "failover": {"cooldownDuration": 1000}}"#;
        let mut w = engine(cfg, 1);
        w.start(&host, 0);
        let g = w.profile_for(&mut NoFacts);
        let p = g.unwrap();
        let v = w.verdict(p, 429, None);
        w.answered(&host, sent(p, 0, SentAs::Normal), v, 429, None, 0);
        for now in [10, 500] {
            assert!(matches!(
                w.decide_for(&host, p, now),
                Decision::Hold {
                    max_wait_ms: 1_500,
                    retry_after_secs: 1 | 2
                }
            ));
        }
        w.count_rejected(p);
        w.tick(&host, 600);
        assert_eq!(
            host.metrics.get("ai_key_failover.pool.p.requests_rejected"),
            1
        );
        let (_, _, how) = use_key(w.decide_for(&host, p, 1_200));
        assert!(
            matches!(how, SentAs::Probe { .. }),
            "the first held request to ask after the time out probes: {how:?}"
        );
        assert!(matches!(
            w.decide_for(&host, p, 1_201),
            Decision::Hold { .. }
        ));
    }
}
