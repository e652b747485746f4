//! How often the periodic work runs, as plain functions of the configuration and the time.
//!
//! Ticks end time outs when no request does, and run health checks. Higress takes any positive
//! `cooldownDuration` and `healthCheckInterval`, so a pool with a 100 ms cooldown must tick every
//! 100 ms, or its keys would come back at the next 1 s tick. The VM ticks as often as its most
//! demanding pool needs; everything else stays on its own period, so a fast tick costs only the
//! work that needs it:
//! - each pool is advanced (one shared-data read, a write only when a key's state changes) on
//!   its own period, however fast the VM ticks for another pool;
//! - stats are flushed and gauges re-derived once a second (`HOUSEKEEPING_MS`);
//! - the health-check lease is renewed once a second (`health::LEASE_RENEW_MS`).

use crate::core::config::PluginConfig;

/// The fastest tick: every 100 ms. Each tick is one VM call on every worker plus the main
/// thread; below this the cost grows faster than anything a key's return gains.
pub const MIN_TICK_MS: u64 = 100;
/// The slowest tick, and the one every pool with second-scale timings gets.
pub const MAX_TICK_MS: u64 = 1_000;
/// Stats flush, gauge re-derivation and the purge of old retry attempts.
pub const HOUSEKEEPING_MS: u64 = 1_000;

/// How often a pool's periodic work runs: its shortest possible time out (`minCooldownDuration`,
/// which hints are clamped to as well, or a non-zero `disableDuration`) or health-check
/// interval, over every profile that uses the pool, within `[MIN_TICK_MS, MAX_TICK_MS]`. A key
/// that sees no traffic is then back at most one period after its time out ends.
pub fn pool_period_ms(config: &PluginConfig, pool: usize) -> u64 {
    config
        .profiles
        .iter()
        .filter(|p| p.pool == pool)
        .flat_map(|p| {
            let f = &p.failover;
            [
                Some(f.min_cooldown_ms),
                Some(f.disable_ms).filter(|&ms| ms > 0),
                f.health_check.as_ref().map(|h| h.interval_ms),
            ]
        })
        .flatten()
        .min()
        .unwrap_or(MAX_TICK_MS)
        .clamp(MIN_TICK_MS, MAX_TICK_MS)
}

/// The VM's tick period: the shortest pool period.
pub fn tick_period_ms(pool_periods: &[u64]) -> u64 {
    pool_periods
        .iter()
        .copied()
        .min()
        .unwrap_or(MAX_TICK_MS)
        .clamp(MIN_TICK_MS, MAX_TICK_MS)
}

/// A job that runs on ticks, every `period_ms`. A job whose period is no longer than the tick
/// runs on every tick. Otherwise a tick may come a little early (timers are not exact): one up
/// to a quarter tick early still counts, or a job whose period is a whole number of ticks would
/// slip by one tick each time.
#[derive(Clone, Debug)]
pub struct Every {
    period_ms: u64,
    slack_ms: u64,
    every_tick: bool,
    last_ms: Option<u64>,
}

impl Every {
    pub fn new(period_ms: u64, tick_ms: u64) -> Self {
        Every {
            period_ms,
            slack_ms: tick_ms.min(period_ms) / 4,
            every_tick: period_ms <= tick_ms,
            last_ms: None,
        }
    }

    /// Whether the job runs at `now_ms`; when it does, the next run is a period later.
    pub fn due(&mut self, now_ms: u64) -> bool {
        let due = self.every_tick
            || self.last_ms.is_none_or(|last| {
                now_ms.saturating_add(self.slack_ms) >= last.saturating_add(self.period_ms)
            });
        if due {
            self.last_ms = Some(now_ms);
        }
        due
    }

    /// How far a tick may come early and still count (a quarter tick).
    pub fn slack_ms(&self) -> u64 {
        self.slack_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config;

    fn periods(json: &str) -> Vec<u64> {
        let c = config::parse(json.as_bytes()).unwrap();
        (0..c.pools.len()).map(|p| pool_period_ms(&c, p)).collect()
    }

    #[test]
    fn the_tick_follows_the_shortest_time_out_or_check_interval() {
        let failover_cases = [
            ("{}", 1_000, "defaults: 1 s"),
            (r#"{"cooldownDuration": 100}"#, 100, "a 100 ms cooldown"),
            (r#"{"cooldownDuration": 500}"#, 500, "a 500 ms cooldown"),
            (
                r#"{"cooldownDuration": 20}"#,
                MIN_TICK_MS,
                "never faster than the floor",
            ),
            (
                r#"{"healthCheckModel": "m", "healthCheckInterval": 200}"#,
                200,
                "the check interval",
            ),
            (
                r#"{"healthCheckInterval": 200}"#,
                1_000,
                "no model, no checks: the interval does not matter",
            ),
            (r#"{"disableDuration": 300}"#, 300, "a 300 ms disable"),
            (
                r#"{"disableDuration": 0}"#,
                1_000,
                "0 means until a check or reload, not now",
            ),
        ];
        for (failover, period, why) in failover_cases {
            let json = format!(r#"{{"apiTokens": ["a"], "failover": {failover}}}"#);
            assert_eq!(periods(&json), vec![period], "{why}: {failover}");
        }
        // A rule with its own keys is its own pool with its own period; one sharing the global
        // keys makes the shared pool as fast as its fastest user.
        let p = periods(
            r#"{"apiTokens": ["a"], "_rules_": [
                {"_match_route_": ["fast"], "apiTokens": ["b"], "failover": {"cooldownDuration": 300}},
                {"_match_route_": ["same"], "failover": {"cooldownDuration": 700}}]}"#,
        );
        assert_eq!(p, vec![700, 300]);
        assert_eq!(tick_period_ms(&p), 300);
        assert_eq!(tick_period_ms(&[]), MAX_TICK_MS);
    }

    #[test]
    fn a_job_runs_once_per_period_whatever_the_tick() {
        let mut every_second = Every::new(1_000, 100);
        let runs: Vec<u64> = (0..=30)
            .map(|i| i * 100)
            .filter(|&now| every_second.due(now))
            .collect();
        assert_eq!(runs, vec![0, 1_000, 2_000, 3_000]);
        // Ticks that come a little early (up to a quarter tick) still run the job on time.
        let mut every = Every::new(1_000, 500);
        assert!(every.due(0));
        assert!(every.due(900), "100 ms early");
        assert!(!every.due(1_400), "half a period is not a period");
        assert!(every.due(1_800));
        // A period no longer than the tick runs on every tick, however irregular the ticks.
        let mut fast = Every::new(100, 100);
        assert!([0, 10, 20, 500, 501].iter().all(|&now| fast.due(now)));
        let mut second = Every::new(1_000, 1_000);
        assert!(second.due(0) && second.due(10));
    }
}
