//! Envoy stats for pools and keys.
//!
//! Names are `ai_key_failover.pool.<pool>.<metric>` and
//! `ai_key_failover.pool.<pool>.key.<key>.key_<metric>`: pools and keys by their configured name
//! or short hash, never by the key. With the `stats_tags` in the README, Prometheus sees
//! `ai_key_failover_keys_available{pool="..."}` and `ai_key_failover_key_available{pool, key}`.
//!
//! Costs are kept off the request path: per-request counters are summed locally and flushed on
//! tick; transition counters are bumped once, by the worker whose write made the transition;
//! gauges are re-derived from the shared state on tick, writing only values that changed.

use crate::core::pool::{Event, Health, PoolState, FOREVER};
use crate::core::status::FailureClass;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// The host's stats API, behind a trait so the engine runs in host tests.
pub trait MetricsHost {
    fn define(&self, kind: MetricKind, name: &str) -> Option<u32>;
    fn increment(&self, id: u32, delta: u64);
    fn record(&self, id: u32, value: u64);
}

/// How a retry attempt ended, for the retry counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    Started,
    Succeeded,
    Failed,
}

/// What became of one health check, for the health-check counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckOutcome {
    Sent,
    Passed,
    Failed,
}

/// Retry attempts started, succeeded and failed since the last flush.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RetryCounts {
    started: u64,
    succeeded: u64,
    failed: u64,
}

fn class_index(class: FailureClass) -> usize {
    match class {
        FailureClass::RateLimit => 0,
        FailureClass::ServerError => 1,
        FailureClass::KeyRefused => 2,
        FailureClass::Other => 3,
        FailureClass::BudgetSpent => 4,
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct KeyGauges {
    available: u64,
    consecutive_failures: u64,
    down_until_s: u64,
    disabled: u64,
}

impl KeyGauges {
    fn of(state: &crate::core::pool::KeyState) -> Self {
        // A key waiting for or holding its probe is still out of rotation.
        let down = state.health != Health::Available;
        KeyGauges {
            available: u64::from(!down),
            consecutive_failures: u64::from(state.consecutive_failures),
            // A key refused until reload has no end time: 0, as for "no cooldown", and
            // `key_disabled` says why it is out (FOREVER in seconds would read as year 5.8e8).
            down_until_s: if down && state.down_until_ms != FOREVER {
                state.down_until_ms.div_ceil(1000)
            } else {
                0
            },
            disabled: u64::from(state.health == Health::Disabled),
        }
    }
}

#[derive(Default)]
struct KeyMetrics {
    available: Option<u32>,
    consecutive_failures: Option<u32>,
    down_until: Option<u32>,
    disabled: Option<u32>,
    marked_down: Option<u32>,
    restored: Option<u32>,
    /// What this worker last recorded; None until the first sync.
    recorded: Option<KeyGauges>,
}

#[derive(Default)]
pub struct PoolMetrics {
    keys_available: Option<u32>,
    requests_keyed: Option<u32>,
    requests_rejected: Option<u32>,
    requests_fallen_back: Option<u32>,
    keys_restored: Option<u32>,
    probes_failed: Option<u32>,
    cas_gave_up: Option<u32>,
    state_decode_failed: Option<u32>,
    retries: Option<u32>,
    retries_succeeded: Option<u32>,
    retries_failed: Option<u32>,
    health_checks_sent: Option<u32>,
    health_checks_passed: Option<u32>,
    health_checks_failed: Option<u32>,
    marked_down: [Option<u32>; FailureClass::ALL.len()],
    keys: Vec<KeyMetrics>,
    recorded_available: Option<u64>,
    pending_keyed: u64,
    pending_rejected: u64,
    pending_fallen_back: u64,
    pending_retries: RetryCounts,
}

pub fn pool_metric_name(pool: &str, metric: &str) -> String {
    format!("ai_key_failover.pool.{pool}.{metric}")
}

pub fn key_metric_name(pool: &str, key: &str, metric: &str) -> String {
    format!("ai_key_failover.pool.{pool}.key.{key}.key_{metric}")
}

impl PoolMetrics {
    /// Defines every stat of a pool. `key_labels` are the keys' names or short hashes.
    pub fn define(host: &dyn MetricsHost, pool: &str, key_labels: &[String]) -> Self {
        use MetricKind::{Counter, Gauge};
        let pool_metric = |kind, metric: &str| host.define(kind, &pool_metric_name(pool, metric));
        if let Some(id) = pool_metric(Gauge, "keys_configured") {
            host.record(id, key_labels.len() as u64);
        }
        let mut marked_down = [None; FailureClass::ALL.len()];
        for class in FailureClass::ALL {
            if let Some(slot) = marked_down.get_mut(class_index(class)) {
                *slot = host.define(
                    Counter,
                    &format!(
                        "ai_key_failover.pool.{pool}.class.{}.keys_marked_down",
                        class.name()
                    ),
                );
            }
        }
        let keys = key_labels
            .iter()
            .map(|key| {
                let key_metric =
                    |kind, metric: &str| host.define(kind, &key_metric_name(pool, key, metric));
                KeyMetrics {
                    available: key_metric(Gauge, "available"),
                    consecutive_failures: key_metric(Gauge, "consecutive_failures"),
                    down_until: key_metric(Gauge, "down_until_seconds"),
                    disabled: key_metric(Gauge, "disabled"),
                    marked_down: key_metric(Counter, "marked_down"),
                    restored: key_metric(Counter, "restored"),
                    recorded: None,
                }
            })
            .collect();
        PoolMetrics {
            keys_available: pool_metric(Gauge, "keys_available"),
            requests_keyed: pool_metric(Counter, "requests_keyed"),
            requests_rejected: pool_metric(Counter, "requests_rejected"),
            requests_fallen_back: pool_metric(Counter, "requests_fallen_back"),
            keys_restored: pool_metric(Counter, "keys_restored"),
            probes_failed: pool_metric(Counter, "probes_failed"),
            cas_gave_up: pool_metric(Counter, "cas_gave_up"),
            state_decode_failed: pool_metric(Counter, "state_decode_failed"),
            retries: pool_metric(Counter, "retries"),
            retries_succeeded: pool_metric(Counter, "retries_succeeded"),
            retries_failed: pool_metric(Counter, "retries_failed"),
            health_checks_sent: pool_metric(Counter, "health_checks_sent"),
            health_checks_passed: pool_metric(Counter, "health_checks_passed"),
            health_checks_failed: pool_metric(Counter, "health_checks_failed"),
            marked_down,
            keys,
            recorded_available: None,
            pending_keyed: 0,
            pending_rejected: 0,
            pending_fallen_back: 0,
            pending_retries: RetryCounts::default(),
        }
    }

    pub fn count_keyed(&mut self) {
        self.pending_keyed += 1;
    }

    pub fn count_rejected(&mut self) {
        self.pending_rejected += 1;
    }

    /// A request of this pool went to one of its fallbacks.
    pub fn count_fallen_back(&mut self) {
        self.pending_fallen_back += 1;
    }

    pub fn count_retry(&mut self, outcome: RetryOutcome) {
        let n = match outcome {
            RetryOutcome::Started => &mut self.pending_retries.started,
            RetryOutcome::Succeeded => &mut self.pending_retries.succeeded,
            RetryOutcome::Failed => &mut self.pending_retries.failed,
        };
        *n += 1;
    }

    /// Health checks are few: counted at once, not summed until the tick.
    pub fn count_health_check(&self, host: &dyn MetricsHost, outcome: CheckOutcome) {
        let id = match outcome {
            CheckOutcome::Sent => self.health_checks_sent,
            CheckOutcome::Passed => self.health_checks_passed,
            CheckOutcome::Failed => self.health_checks_failed,
        };
        increment(host, id, 1);
    }

    pub fn count_gave_up(&self, host: &dyn MetricsHost) {
        increment(host, self.cas_gave_up, 1);
    }

    /// Reads of the pool's shared state that did not decode (corrupt, foreign, or a newer
    /// build's); summed by the store and flushed on tick.
    pub fn count_decode_failed(&self, host: &dyn MetricsHost, reads: u64) {
        increment(host, self.state_decode_failed, reads);
    }

    /// Transition counters, bumped by the worker whose write made the transitions.
    pub fn count_events(&self, host: &dyn MetricsHost, events: &[Event]) {
        for event in events {
            match *event {
                Event::MarkedDown {
                    key,
                    class,
                    outage_began,
                    ..
                } => {
                    if outage_began {
                        self.count_marked_down(host, key, class);
                    } else {
                        increment(host, self.probes_failed, 1);
                    }
                }
                Event::Disabled {
                    key, outage_began, ..
                } => {
                    if outage_began {
                        self.count_marked_down(host, key, FailureClass::KeyRefused);
                    }
                }
                Event::Restored { key } => {
                    increment(host, self.keys_restored, 1);
                    increment(host, self.keys.get(key).and_then(|k| k.restored), 1);
                }
                Event::FailureCounted { .. }
                | Event::CooldownExtended { .. }
                | Event::FailuresReset { .. }
                | Event::ProbeReady { .. }
                | Event::ProbeClaimed { .. }
                | Event::ProbeReleased { .. } => {}
            }
        }
    }

    fn count_marked_down(&self, host: &dyn MetricsHost, key: usize, class: FailureClass) {
        increment(
            host,
            self.marked_down.get(class_index(class)).copied().flatten(),
            1,
        );
        increment(host, self.keys.get(key).and_then(|k| k.marked_down), 1);
    }

    /// Flushes request counters and brings gauges in line with `state`, writing only changes.
    pub fn sync(&mut self, host: &dyn MetricsHost, state: &PoolState) {
        self.flush_counters(host);
        let available = state.available_count() as u64;
        if self.recorded_available != Some(available) {
            record(host, self.keys_available, available);
            self.recorded_available = Some(available);
        }
        for (metrics, key) in self.keys.iter_mut().zip(&state.keys) {
            let now = KeyGauges::of(key);
            let before = metrics.recorded;
            if before.map(|b| b.available) != Some(now.available) {
                record(host, metrics.available, now.available);
            }
            if before.map(|b| b.consecutive_failures) != Some(now.consecutive_failures) {
                record(host, metrics.consecutive_failures, now.consecutive_failures);
            }
            if before.map(|b| b.down_until_s) != Some(now.down_until_s) {
                record(host, metrics.down_until, now.down_until_s);
            }
            if before.map(|b| b.disabled) != Some(now.disabled) {
                record(host, metrics.disabled, now.disabled);
            }
            metrics.recorded = Some(now);
        }
    }

    /// Adds the request counts summed since the last flush to Envoy's counters. Runs on tick,
    /// and once more when the engine goes away (a reload replaced its root context), so the
    /// counts since its last tick are not lost.
    pub fn flush_counters(&mut self, host: &dyn MetricsHost) {
        increment(
            host,
            self.requests_keyed,
            std::mem::take(&mut self.pending_keyed),
        );
        increment(
            host,
            self.requests_rejected,
            std::mem::take(&mut self.pending_rejected),
        );
        increment(
            host,
            self.requests_fallen_back,
            std::mem::take(&mut self.pending_fallen_back),
        );
        let retries = std::mem::take(&mut self.pending_retries);
        increment(host, self.retries, retries.started);
        increment(host, self.retries_succeeded, retries.succeeded);
        increment(host, self.retries_failed, retries.failed);
    }
}

fn increment(host: &dyn MetricsHost, id: Option<u32>, delta: u64) {
    if let (Some(id), true) = (id, delta > 0) {
        host.increment(id, delta);
    }
}

fn record(host: &dyn MetricsHost, id: Option<u32>, value: u64) {
    if let Some(id) = id {
        host.record(id, value);
    }
}

#[cfg(test)]
pub mod fake {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Envoy's stats as a map: defining an existing name returns the same id.
    #[derive(Default)]
    pub struct FakeMetrics {
        pub names: RefCell<Vec<(String, MetricKind)>>,
        pub values: RefCell<BTreeMap<String, u64>>,
        pub writes: RefCell<usize>,
    }

    impl FakeMetrics {
        pub fn get(&self, name: &str) -> u64 {
            self.values.borrow().get(name).copied().unwrap_or(0)
        }
        fn name_of(&self, id: u32) -> String {
            self.names.borrow()[id as usize].0.clone()
        }
    }

    impl MetricsHost for FakeMetrics {
        fn define(&self, kind: MetricKind, name: &str) -> Option<u32> {
            let mut names = self.names.borrow_mut();
            if let Some(i) = names.iter().position(|(n, _)| n == name) {
                return Some(i as u32);
            }
            names.push((name.to_string(), kind));
            Some(names.len() as u32 - 1)
        }
        fn increment(&self, id: u32, delta: u64) {
            *self.writes.borrow_mut() += 1;
            *self
                .values
                .borrow_mut()
                .entry(self.name_of(id))
                .or_default() += delta;
        }
        fn record(&self, id: u32, value: u64) {
            *self.writes.borrow_mut() += 1;
            self.values.borrow_mut().insert(self.name_of(id), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeMetrics;
    use super::*;
    use crate::core::pool::{Failure, Policy, SentAs};

    const P: Policy = Policy {
        failure_threshold: 1,
        cooldown_ms: 5_000,
        backoff_permille: 2_000,
        min_cooldown_ms: 1_000,
        max_cooldown_ms: 600_000,
        disable_ms: 0,
    };
    const RATE: Failure = Failure {
        status: 429,
        class: FailureClass::RateLimit,
        hint_ms: None,
        jitter_permille: 0,
    };

    /// What the engine does after a change: count its events, then bring the gauges in line.
    fn counted_and_synced(
        m: &mut PoolMetrics,
        host: &FakeMetrics,
        state: &PoolState,
        events: impl IntoIterator<Item = Event>,
    ) {
        m.count_events(host, &Vec::from_iter(events));
        m.sync(host, state);
    }

    #[test]
    fn names_follow_the_documented_scheme() {
        assert_eq!(
            pool_metric_name("main", "keys_available"),
            "ai_key_failover.pool.main.keys_available"
        );
        assert_eq!(
            key_metric_name("main", "key-0a1b2c3d", "available"),
            "ai_key_failover.pool.main.key.key-0a1b2c3d.key_available"
        );
    }

    #[test]
    fn gauges_follow_state_and_write_only_changes() {
        let host = FakeMetrics::default();
        let labels = vec!["a".to_string(), "b".to_string()];
        let mut m = PoolMetrics::define(&host, "p", &labels);
        assert_eq!(host.get("ai_key_failover.pool.p.keys_configured"), 2);
        let mut state = PoolState::fresh(&[1, 2]);
        m.sync(&host, &state);
        assert_eq!(host.get("ai_key_failover.pool.p.keys_available"), 2);
        assert_eq!(host.get("ai_key_failover.pool.p.key.a.key_available"), 1);
        let writes = *host.writes.borrow();
        m.sync(&host, &state);
        assert_eq!(
            *host.writes.borrow(),
            writes,
            "nothing changed, nothing written"
        );

        let ev = state.record_failure(1, &RATE, 10_000, &P);
        counted_and_synced(&mut m, &host, &state, ev);
        assert_eq!(host.get("ai_key_failover.pool.p.keys_available"), 1);
        assert_eq!(host.get("ai_key_failover.pool.p.key.b.key_available"), 0);
        assert_eq!(
            host.get("ai_key_failover.pool.p.key.b.key_down_until_seconds"),
            15
        );
        assert_eq!(host.get("ai_key_failover.pool.p.key.b.key_marked_down"), 1);
        assert_eq!(
            host.get("ai_key_failover.pool.p.class.rate_limit.keys_marked_down"),
            1
        );

        let ev = state.advance(15_000);
        m.count_events(&host, &ev);
        let ev = state.claim_probe(1, 15_000, 100);
        m.count_events(&host, &Vec::from_iter(ev));
        let ev = state.record_success(1, SentAs::Probe { claim_ms: 15_100 });
        counted_and_synced(&mut m, &host, &state, ev);
        assert_eq!(host.get("ai_key_failover.pool.p.keys_restored"), 1);
        assert_eq!(host.get("ai_key_failover.pool.p.key.b.key_restored"), 1);
        assert_eq!(host.get("ai_key_failover.pool.p.key.b.key_available"), 1);
        assert_eq!(
            host.get("ai_key_failover.pool.p.key.b.key_down_until_seconds"),
            0
        );
    }

    #[test]
    fn a_refused_key_reports_disabled_and_a_real_end_time_or_none() {
        const REFUSED: Failure = Failure {
            status: 401,
            class: FailureClass::KeyRefused,
            hint_ms: None,
            jitter_permille: 0,
        };
        let host = FakeMetrics::default();
        let labels = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let mut m = PoolMetrics::define(&host, "p", &labels);
        let mut state = PoolState::fresh(&[1, 2, 3]);
        m.sync(&host, &state);
        assert_eq!(host.get("ai_key_failover.pool.p.key.a.key_disabled"), 0);
        // a: refused until the next config load (disableDuration 0); b: refused for an hour;
        // c: only rate limited.
        let _ = state.record_failure(0, &REFUSED, 10_000, &P);
        let hour = Policy {
            disable_ms: 3_600_000,
            ..P
        };
        let _ = state.record_failure(1, &REFUSED, 10_000, &hour);
        let _ = state.record_failure(2, &RATE, 10_000, &P);
        m.sync(&host, &state);
        let gauge = |key: &str, metric: &str| {
            host.get(&format!("ai_key_failover.pool.p.key.{key}.key_{metric}"))
        };
        assert_eq!(gauge("a", "available"), 0);
        assert_eq!(gauge("a", "disabled"), 1);
        assert_eq!(
            gauge("a", "down_until_seconds"),
            0,
            "no end time, not u64::MAX / 1000"
        );
        assert_eq!(gauge("b", "disabled"), 1);
        assert_eq!(gauge("b", "down_until_seconds"), 3_610);
        assert_eq!(gauge("c", "disabled"), 0);
        assert_eq!(gauge("c", "down_until_seconds"), 15);
    }

    #[test]
    fn request_counters_are_flushed_in_one_write() {
        let host = FakeMetrics::default();
        let mut m = PoolMetrics::define(&host, "p", &["a".to_string()]);
        let state = PoolState::fresh(&[1]);
        m.sync(&host, &state);
        let writes = *host.writes.borrow();
        for _ in 0..100 {
            m.count_keyed();
        }
        m.count_rejected();
        m.sync(&host, &state);
        assert_eq!(host.get("ai_key_failover.pool.p.requests_keyed"), 100);
        assert_eq!(host.get("ai_key_failover.pool.p.requests_rejected"), 1);
        assert_eq!(*host.writes.borrow() - writes, 2);
    }
}
