//! Transition logging: one line per key that goes out or comes back, in the operator's words,
//! and a warning when a pool has no key left. Keys are named by label, never by token.

use super::Engine;
use crate::core::pool::{Event, FOREVER};
use crate::core::status::FailureClass;

impl Engine {
    pub(super) fn log_events(&self, pool: usize, events: &[Event], now_ms: u64) {
        let Some(pool_cfg) = self.config.pools.get(pool) else {
            return;
        };
        let p = &pool_cfg.label;
        let key_label = |k: usize| {
            pool_cfg
                .keys
                .get(k)
                .map_or_else(|| "?".to_string(), |k| k.label())
        };
        let back_in = |until: u64| {
            if until == FOREVER {
                "until a health check passes or the configuration changes".to_string()
            } else {
                format!("back in {}", seconds(until.saturating_sub(now_ms)))
            }
        };
        let mut went_out = false;
        for event in events {
            match *event {
                Event::MarkedDown {
                    key,
                    class: FailureClass::BudgetSpent,
                    until_ms,
                    ..
                } => {
                    went_out = true;
                    log::info!(
                        "pool {p}: key {} reported its budget used up ({}); rests, {} without a probe",
                        key_label(key),
                        FailureClass::BudgetSpent.name(),
                        back_in(until_ms)
                    );
                }
                Event::MarkedDown {
                    key,
                    status,
                    class,
                    until_ms,
                    strikes,
                    ..
                } => {
                    went_out = true;
                    let streak = if strikes > 1 {
                        format!(", time out {strikes} in a row")
                    } else {
                        String::new()
                    };
                    log::warn!(
                        "pool {p}: key {} marked down after status {status} ({}); {}{streak}",
                        key_label(key),
                        class.name(),
                        back_in(until_ms)
                    );
                }
                Event::Disabled {
                    key,
                    status,
                    until_ms,
                    ..
                } => {
                    went_out = true;
                    log::warn!(
                        "pool {p}: key {} refused by the provider (status {status}, {}); disabled, {}",
                        key_label(key),
                        FailureClass::KeyRefused.name(),
                        back_in(until_ms)
                    );
                }
                Event::CooldownExtended { key, until_ms } => log::info!(
                    "pool {p}: key {} failed again while out; {}",
                    key_label(key),
                    back_in(until_ms)
                ),
                Event::ProbeReady { key } => log::info!(
                    "pool {p}: key {} time out over; the next request probes it",
                    key_label(key)
                ),
                Event::Restored { key } => log::info!("pool {p}: key {} restored", key_label(key)),
                Event::FailureCounted { key, consecutive } => {
                    log::info!(
                        "pool {p}: key {} failure {consecutive} counted",
                        key_label(key)
                    )
                }
                Event::ProbeClaimed { key, .. } => {
                    log::debug!("pool {p}: probing key {}", key_label(key))
                }
                Event::ProbeReleased { key } => {
                    log::debug!(
                        "pool {p}: probe of key {} gave no answer; released",
                        key_label(key)
                    )
                }
                Event::FailuresReset { key } => {
                    log::debug!(
                        "pool {p}: key {} succeeded; failure count reset",
                        key_label(key)
                    )
                }
            }
        }
        if went_out {
            self.warn_if_all_down(pool, now_ms);
        }
    }

    /// A key just went out: if it was the pool's last, say so, and when the first comes back.
    fn warn_if_all_down(&self, pool: usize, now_ms: u64) {
        let (Some(index), Some(pool_cfg)) = (self.indexes.get(pool), self.config.pools.get(pool))
        else {
            return;
        };
        if index.view().available_count() > 0 {
            return;
        }
        let first = index.view().next_change_ms().map_or_else(
            || "none returns by itself".to_string(),
            |t| format!("the first returns in {}", seconds(t.saturating_sub(now_ms))),
        );
        log::warn!(
            "pool {}: all {} keys are down; {first}",
            pool_cfg.label,
            pool_cfg.keys.len()
        );
    }
}

/// `1234` ms as `1.2s`: integer arithmetic, so no float formatting code ends up in the module.
fn seconds(ms: u64) -> String {
    format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
}

#[cfg(test)]
mod tests {
    use super::super::test_host::*;
    use super::*;
    use crate::core::pool::SentAs;

    #[test]
    fn transitions_are_logged_by_key_name_and_the_last_key_out_says_so() {
        let host = TestHost::default();
        let cfg = r#"{"name": "p", "apiTokens": [{"token": "sk-secret-a", "name": "ka"}, "sk-secret-b"],
                      "failover": {"cooldownDuration": 2000}}"#;
        let mut w = engine(cfg, 1);
        w.start(&host, 0);
        let first = logged_by(|| w.answered(&host, sent(0, 0, SentAs::Normal), RATE, 429, None, 0));
        assert!(
            first.iter().any(|l| l.starts_with(
                "WARN pool p: key ka marked down after status 429 (rate_limit); back in 2."
            )),
            "{first:?}"
        );
        assert!(!first.iter().any(|l| l.contains("all 2 keys")), "{first:?}");
        let last =
            logged_by(|| w.answered(&host, sent(0, 1, SentAs::Normal), SERVER, 503, None, 500));
        assert!(
            last.iter()
                .any(|l| l.starts_with("WARN pool p: all 2 keys are down; the first returns in 1.")),
            "{last:?}"
        );
        for line in first.iter().chain(&last) {
            assert!(!line.contains("sk-secret"), "a key in a log line: {line}");
        }
    }

    #[test]
    fn durations_are_written_to_a_tenth_of_a_second() {
        assert_eq!(seconds(0), "0.0s");
        assert_eq!(seconds(1_234), "1.2s");
        assert_eq!(seconds(60_000), "60.0s");
        assert_eq!(seconds(3_600_099), "3600.0s");
    }
}
