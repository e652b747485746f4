//! The key-pool state machine: pure functions of the pool's state, the time and the settings.
//! Nothing here talks to the host; `store` persists the state and `engine` feeds in the events.
//!
//! A key is Available, CoolingDown (until a time), Disabled (refused by the provider: until a
//! time, or until a health check or config change), Probing: its time out is over and exactly
//! one request, across all workers, may try it (that probe's success makes it Available; its
//! failure sends it back down for longer), or Spent: a success said its budget is used up, so it
//! rests until the provider's reset and is Available again then, with no probe.

use crate::status::FailureClass;

/// A `down_until_ms` that never comes: a refused key with `disableDuration: 0`.
pub const FOREVER: u64 = u64::MAX;

/// Time is milliseconds since the Unix epoch, read from the host clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Available,
    CoolingDown,
    Disabled,
    Probing,
    /// The provider said on a success that the key's budget is used up (`preemptiveCooldown`):
    /// out until `down_until_ms`, then Available at once. Not a failure: no strike, no probe.
    Spent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyState {
    /// Identifies the key across config reloads without storing the key itself.
    pub fingerprint: u64,
    pub health: Health,
    /// Failures in a row while available; reaching `failureThreshold` takes the key out.
    pub consecutive_failures: u32,
    /// Times in a row the key was taken out without a success in between; drives backoff.
    pub strikes: u32,
    pub down_since_ms: u64,
    pub down_until_ms: u64,
    /// While probing: when the probe's claim lapses (0: nobody holds it).
    pub probe_until_ms: u64,
}

impl KeyState {
    pub fn fresh(fingerprint: u64) -> Self {
        KeyState {
            fingerprint,
            health: Health::Available,
            consecutive_failures: 0,
            strikes: 0,
            down_since_ms: 0,
            down_until_ms: 0,
            probe_until_ms: 0,
        }
    }

    pub fn is_available(&self) -> bool {
        self.health == Health::Available
    }

    pub fn probe_claimable(&self) -> bool {
        self.health == Health::Probing && self.probe_until_ms == 0
    }

    /// When this key's state next changes by itself, if ever.
    pub fn next_change_ms(&self) -> Option<u64> {
        match self.health {
            Health::CoolingDown | Health::Spent => Some(self.down_until_ms),
            Health::Disabled if self.down_until_ms != FOREVER => Some(self.down_until_ms),
            Health::Probing if self.probe_until_ms != 0 => Some(self.probe_until_ms),
            _ => None,
        }
    }
}

/// Every key of one pool, in the order of the pool's configured keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolState {
    /// When the entry was last written; on a config change, the newest entry's records win.
    pub written_at_ms: u64,
    pub keys: Vec<KeyState>,
}

/// The settings that drive transitions; taken from the matched config on every call, so a changed
/// setting applies from the next event on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub failure_threshold: u32,
    pub cooldown_ms: u64,
    /// Each further strike multiplies the cooldown by this many thousandths (2000 = x2).
    pub backoff_permille: u32,
    pub min_cooldown_ms: u64,
    pub max_cooldown_ms: u64,
    /// How long a refused key stays out; 0 = until a health check passes or the config changes.
    pub disable_ms: u64,
}

/// One failure as the engine saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub class: FailureClass,
    /// The provider's own word on when to retry, already validated; used as given, clamped.
    pub hint_ms: Option<u64>,
    /// 0 to 100: adds up to 10% so keys that went down together do not return together.
    pub jitter_permille: u32,
}

impl Policy {
    /// The cooldown for a key's `strikes`-th time out in a row.
    pub fn cooldown_ms(&self, strikes: u32, failure: &Failure) -> u64 {
        let base = match failure.hint_ms {
            Some(hint) => hint,
            None => {
                let mut ms = u128::from(self.cooldown_ms);
                for _ in 1..strikes {
                    ms = ms * u128::from(self.backoff_permille) / 1000;
                    if ms >= u128::from(self.max_cooldown_ms) {
                        break;
                    }
                }
                u64::try_from(ms).unwrap_or(u64::MAX)
            }
        };
        let clamped = base.clamp(
            self.min_cooldown_ms,
            self.max_cooldown_ms.max(self.min_cooldown_ms),
        );
        let jitter = clamped / 1000 * u64::from(failure.jitter_permille.min(100));
        clamped
            .saturating_add(jitter)
            .min(self.max_cooldown_ms.max(clamped))
    }

    fn disabled_until(&self, now_ms: u64) -> u64 {
        if self.disable_ms == 0 {
            FOREVER
        } else {
            now_ms.saturating_add(self.disable_ms)
        }
    }
}

/// How the request that reports a success was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SentAs {
    /// The key was available.
    Normal,
    /// This request held the key's probe.
    Probe,
    /// Every key was down and `earliest` chose this one anyway.
    WhileDown,
}

/// A change worth a log line or a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    FailureCounted {
        key: usize,
        consecutive: u32,
    },
    /// Taken out of rotation. `outage_began`: the key was available until now; false when its
    /// probe failed, which only continues the same outage (so counters add up: outages begun =
    /// keys restored + keys still out).
    MarkedDown {
        key: usize,
        status: u16,
        class: FailureClass,
        until_ms: u64,
        strikes: u32,
        outage_began: bool,
    },
    /// Refused by the provider: out for `disableDuration`, or indefinitely.
    Disabled {
        key: usize,
        status: u16,
        until_ms: u64,
        outage_began: bool,
    },
    /// An in-flight request failed on a key that was already out: its return moves later.
    CooldownExtended {
        key: usize,
        until_ms: u64,
    },
    FailuresReset {
        key: usize,
    },
    /// The time out is over; the next request may probe the key.
    ProbeReady {
        key: usize,
    },
    ProbeClaimed {
        key: usize,
    },
    /// The probe ended without a word about the key (a local reply, a disconnect), or its claim
    /// lapsed: another request may probe.
    ProbeReleased {
        key: usize,
    },
    Restored {
        key: usize,
    },
}

impl PoolState {
    pub fn fresh(fingerprints: &[u64]) -> Self {
        PoolState {
            written_at_ms: 0,
            keys: fingerprints.iter().map(|&fp| KeyState::fresh(fp)).collect(),
        }
    }

    /// Lays a stored state over the configured keys: a key still configured keeps its state,
    /// a key no longer configured is dropped, a new key starts available.
    /// Returns the state and whether it differs from what was stored.
    pub fn reconcile(stored: PoolState, fingerprints: &[u64]) -> (PoolState, bool) {
        let already_aligned = stored.keys.len() == fingerprints.len()
            && stored
                .keys
                .iter()
                .zip(fingerprints)
                .all(|(k, fp)| k.fingerprint == *fp);
        if already_aligned {
            return (stored, false);
        }
        let keys = fingerprints
            .iter()
            .map(|&fp| {
                stored
                    .keys
                    .iter()
                    .find(|k| k.fingerprint == fp)
                    .cloned()
                    .unwrap_or_else(|| KeyState::fresh(fp))
            })
            .collect();
        (
            PoolState {
                written_at_ms: stored.written_at_ms,
                keys,
            },
            true,
        )
    }

    pub fn available_count(&self) -> usize {
        self.keys.iter().filter(|k| k.is_available()).count()
    }

    /// The upstream's answer for a request sent with key `key` counts against it.
    pub fn record_failure(
        &mut self,
        key: usize,
        failure: &Failure,
        now_ms: u64,
        policy: &Policy,
    ) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        let status = failure.status;
        if failure.class == FailureClass::KeyRefused {
            let until_ms = policy.disabled_until(now_ms);
            if state.health == Health::Disabled && until_ms <= state.down_until_ms {
                return None;
            }
            if state.health != Health::Disabled {
                state.down_since_ms = now_ms;
            }
            let outage_began = state.is_available();
            state.health = Health::Disabled;
            state.down_until_ms = until_ms;
            state.probe_until_ms = 0;
            state.strikes = state.strikes.saturating_add(1);
            return Some(Event::Disabled {
                key,
                status,
                until_ms,
                outage_began,
            });
        }
        match state.health {
            // A spent key's in-flight requests meeting the limit it already reported say
            // nothing new: its rest may only grow longer, and it still needs no probe.
            Health::CoolingDown | Health::Disabled | Health::Spent => {
                // Never shorten a time out: a late failure only pushes the return further out.
                let until_ms =
                    now_ms.saturating_add(policy.cooldown_ms(state.strikes.max(1), failure));
                if until_ms > state.down_until_ms {
                    state.down_until_ms = until_ms;
                    Some(Event::CooldownExtended { key, until_ms })
                } else {
                    None
                }
            }
            Health::Available | Health::Probing => {
                let probing = state.health == Health::Probing;
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                if !probing && state.consecutive_failures < policy.failure_threshold.max(1) {
                    return Some(Event::FailureCounted {
                        key,
                        consecutive: state.consecutive_failures,
                    });
                }
                state.strikes = state.strikes.saturating_add(1);
                let until_ms = now_ms.saturating_add(policy.cooldown_ms(state.strikes, failure));
                state.health = Health::CoolingDown;
                state.down_since_ms = now_ms;
                state.down_until_ms = until_ms;
                state.probe_until_ms = 0;
                Some(Event::MarkedDown {
                    key,
                    status,
                    class: failure.class,
                    until_ms,
                    strikes: state.strikes,
                    outage_began: !probing,
                })
            }
        }
    }

    /// The key served a request. A success proves the key works only if the request was sent
    /// while the key was out (its probe, or `earliest`); one that merely started before another
    /// took the key out proves nothing about the limit that tripped.
    pub fn record_success(&mut self, key: usize, sent: SentAs) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        match (state.health, sent) {
            (Health::Available, _) => {
                if state.consecutive_failures == 0 && state.strikes == 0 {
                    return None;
                }
                state.consecutive_failures = 0;
                state.strikes = 0;
                Some(Event::FailuresReset { key })
            }
            (_, SentAs::Probe | SentAs::WhileDown) => {
                *state = KeyState::fresh(state.fingerprint);
                Some(Event::Restored { key })
            }
            (_, SentAs::Normal) => None,
        }
    }

    /// A success said the key's budget is used up until `until_ms` (already clamped): it rests
    /// until then. Only an available key starts a rest; a resting key's rest only grows. The
    /// key's failure count and strikes are left as the success left them: no backoff.
    pub fn spend(&mut self, key: usize, now_ms: u64, until_ms: u64) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        match state.health {
            Health::Available => {
                state.health = Health::Spent;
                state.down_since_ms = now_ms;
                state.down_until_ms = until_ms;
                Some(Event::MarkedDown {
                    key,
                    status: 200,
                    class: FailureClass::BudgetSpent,
                    until_ms,
                    strikes: state.strikes,
                    outage_began: true,
                })
            }
            Health::Spent if until_ms > state.down_until_ms => {
                state.down_until_ms = until_ms;
                Some(Event::CooldownExtended { key, until_ms })
            }
            _ => None,
        }
    }

    /// Ends time outs that are over (the key becomes a probe candidate) and lapsed probe claims.
    pub fn advance(&mut self, now_ms: u64) -> Vec<Event> {
        let mut events = Vec::new();
        for (key, state) in self.keys.iter_mut().enumerate() {
            match state.health {
                Health::CoolingDown | Health::Disabled if state.down_until_ms <= now_ms => {
                    state.health = Health::Probing;
                    state.consecutive_failures = 0;
                    state.probe_until_ms = 0;
                    events.push(Event::ProbeReady { key });
                }
                // The provider's budget window is over: nothing failed, so nothing to probe.
                Health::Spent if state.down_until_ms <= now_ms => {
                    *state = KeyState {
                        health: Health::Available,
                        down_since_ms: 0,
                        down_until_ms: 0,
                        ..state.clone()
                    };
                    events.push(Event::Restored { key });
                }
                Health::Probing if state.probe_until_ms != 0 && state.probe_until_ms <= now_ms => {
                    state.probe_until_ms = 0;
                    events.push(Event::ProbeReleased { key });
                }
                _ => {}
            }
        }
        events
    }

    /// Takes the probe of a key whose time out is over, for `lease_ms`.
    pub fn claim_probe(&mut self, key: usize, now_ms: u64, lease_ms: u64) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        if state.health != Health::Probing
            || (state.probe_until_ms != 0 && state.probe_until_ms > now_ms)
        {
            return None;
        }
        state.probe_until_ms = now_ms.saturating_add(lease_ms).max(1);
        Some(Event::ProbeClaimed { key })
    }

    /// The probe came back without a verdict: let another request try.
    pub fn release_probe(&mut self, key: usize) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        if state.health != Health::Probing || state.probe_until_ms == 0 {
            return None;
        }
        state.probe_until_ms = 0;
        Some(Event::ProbeReleased { key })
    }

    /// A health check of a key that is out failed: it stays out, for longer (backoff applies).
    /// A key refused for good stays refused.
    pub fn check_failed(
        &mut self,
        key: usize,
        failure: &Failure,
        now_ms: u64,
        policy: &Policy,
    ) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        if state.is_available()
            || (state.health == Health::Disabled && state.down_until_ms == FOREVER)
        {
            return None;
        }
        if failure.class == FailureClass::KeyRefused {
            let until_ms = policy.disabled_until(now_ms).max(state.down_until_ms);
            state.health = Health::Disabled;
            state.down_until_ms = until_ms;
            state.probe_until_ms = 0;
            return Some(Event::Disabled {
                key,
                status: failure.status,
                until_ms,
                outage_began: false,
            });
        }
        state.strikes = state.strikes.saturating_add(1);
        let until_ms = now_ms
            .saturating_add(policy.cooldown_ms(state.strikes, failure))
            .max(state.down_until_ms);
        if state.health == Health::Probing {
            state.health = Health::CoolingDown;
            state.probe_until_ms = 0;
        }
        state.down_until_ms = until_ms;
        Some(Event::CooldownExtended { key, until_ms })
    }

    /// Health checks passed `successThreshold` times in a row: the key is back.
    pub fn restore_checked(&mut self, key: usize) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        if state.is_available() {
            return None;
        }
        *state = KeyState::fresh(state.fingerprint);
        Some(Event::Restored { key })
    }

    /// Restores every key that is out, at once (a health check or an operator said so).
    #[cfg(test)]
    pub fn restore_all(&mut self) {
        for state in &mut self.keys {
            *state = KeyState::fresh(state.fingerprint);
        }
    }

    /// The earliest moment a key's state changes by itself.
    pub fn next_change_ms(&self) -> Option<u64> {
        self.keys.iter().filter_map(KeyState::next_change_ms).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        failure_threshold: 1,
        cooldown_ms: 60_000,
        backoff_permille: 2_000,
        min_cooldown_ms: 1_000,
        max_cooldown_ms: 600_000,
        disable_ms: 3_600_000,
    };

    fn rate_limit(hint_ms: Option<u64>) -> Failure {
        Failure {
            status: 429,
            class: FailureClass::RateLimit,
            hint_ms,
            jitter_permille: 0,
        }
    }

    const SERVER: Failure = Failure {
        status: 503,
        class: FailureClass::ServerError,
        hint_ms: None,
        jitter_permille: 0,
    };

    const REFUSED: Failure = Failure {
        status: 401,
        class: FailureClass::KeyRefused,
        hint_ms: None,
        jitter_permille: 0,
    };

    #[test]
    fn a_failure_at_threshold_one_takes_the_key_out_then_one_probe_brings_it_back() {
        let mut s = PoolState::fresh(&[1, 2]);
        let ev = s.record_failure(0, &rate_limit(None), 1_000, &POLICY);
        assert_eq!(
            ev,
            Some(Event::MarkedDown {
                key: 0,
                status: 429,
                class: FailureClass::RateLimit,
                until_ms: 61_000,
                strikes: 1,
                outage_began: true
            })
        );
        assert_eq!(s.available_count(), 1);
        assert_eq!(s.next_change_ms(), Some(61_000));
        assert!(s.advance(60_999).is_empty());
        assert_eq!(s.advance(61_000), vec![Event::ProbeReady { key: 0 }]);
        assert_eq!(
            s.available_count(),
            1,
            "a probe candidate is not in rotation yet"
        );
        assert_eq!(
            s.claim_probe(0, 61_001, 30_000),
            Some(Event::ProbeClaimed { key: 0 })
        );
        assert_eq!(s.claim_probe(0, 61_002, 30_000), None, "exactly one probe");
        assert_eq!(
            s.record_success(0, SentAs::Probe),
            Some(Event::Restored { key: 0 })
        );
        assert_eq!(s.keys[0], KeyState::fresh(1));
    }

    #[test]
    fn a_failed_probe_sends_the_key_back_for_longer_and_backoff_caps_at_the_maximum() {
        let mut s = PoolState::fresh(&[1]);
        let policy = Policy {
            cooldown_ms: 1_000,
            max_cooldown_ms: 5_000,
            ..POLICY
        };
        let mut now = 0;
        let mut cooldowns = Vec::new();
        for _ in 0..5 {
            match s.record_failure(0, &SERVER, now, &policy) {
                Some(Event::MarkedDown { until_ms, .. }) => {
                    cooldowns.push(until_ms - now);
                    now = until_ms;
                }
                other => panic!("{other:?}"),
            }
            s.advance(now);
            s.claim_probe(0, now, 10_000);
        }
        assert_eq!(cooldowns, [1_000, 2_000, 4_000, 5_000, 5_000]);
        s.record_success(0, SentAs::Probe);
        assert_eq!(
            s.record_failure(0, &SERVER, now, &policy),
            Some(Event::MarkedDown {
                key: 0,
                status: 503,
                class: FailureClass::ServerError,
                until_ms: now + 1_000,
                strikes: 1,
                outage_began: true
            }),
            "a success resets the backoff"
        );
    }

    #[test]
    fn provider_hints_set_the_cooldown_within_the_clamp() {
        let mut s = PoolState::fresh(&[1, 2, 3]);
        s.record_failure(0, &rate_limit(Some(1_500)), 0, &POLICY);
        s.record_failure(1, &rate_limit(Some(10)), 0, &POLICY);
        s.record_failure(2, &rate_limit(Some(86_400_000)), 0, &POLICY);
        let untils: Vec<u64> = s.keys.iter().map(|k| k.down_until_ms).collect();
        assert_eq!(untils, [1_500, 1_000, 600_000]);
    }

    #[test]
    fn jitter_adds_at_most_ten_percent_and_never_passes_the_maximum() {
        let f = |jitter_permille| Failure {
            jitter_permille,
            ..SERVER
        };
        assert_eq!(POLICY.cooldown_ms(1, &f(0)), 60_000);
        assert_eq!(POLICY.cooldown_ms(1, &f(100)), 66_000);
        assert_eq!(POLICY.cooldown_ms(1, &f(5000)), 66_000, "clamped to 10%");
        assert_eq!(POLICY.cooldown_ms(30, &f(100)), 600_000);
    }

    #[test]
    fn threshold_counts_consecutive_failures_and_success_resets() {
        let policy = Policy {
            failure_threshold: 2,
            ..POLICY
        };
        let mut s = PoolState::fresh(&[7]);
        assert_eq!(
            s.record_failure(0, &SERVER, 0, &policy),
            Some(Event::FailureCounted {
                key: 0,
                consecutive: 1
            })
        );
        assert_eq!(
            s.record_success(0, SentAs::Normal),
            Some(Event::FailuresReset { key: 0 })
        );
        assert_eq!(
            s.record_success(0, SentAs::Normal),
            None,
            "nothing to write"
        );
        s.record_failure(0, &SERVER, 0, &policy);
        assert!(matches!(
            s.record_failure(0, &SERVER, 5, &policy),
            Some(Event::MarkedDown { .. })
        ));
    }

    #[test]
    fn refused_keys_stay_out_for_the_disable_duration_or_for_good() {
        let mut s = PoolState::fresh(&[1, 2]);
        assert_eq!(
            s.record_failure(0, &REFUSED, 0, &POLICY),
            Some(Event::Disabled {
                key: 0,
                status: 401,
                until_ms: 3_600_000,
                outage_began: true
            })
        );
        let forever = Policy {
            disable_ms: 0,
            ..POLICY
        };
        s.record_failure(1, &REFUSED, 0, &forever);
        assert_eq!(s.keys[1].down_until_ms, FOREVER);
        assert_eq!(s.next_change_ms(), Some(3_600_000));
        assert_eq!(s.advance(u64::MAX - 1), vec![Event::ProbeReady { key: 0 }]);
        assert_eq!(s.keys[1].health, Health::Disabled);
    }

    #[test]
    fn a_refusal_overrides_a_cooldown_and_ignores_the_threshold() {
        let policy = Policy {
            failure_threshold: 5,
            ..POLICY
        };
        let mut s = PoolState::fresh(&[1]);
        assert!(matches!(
            s.record_failure(0, &REFUSED, 0, &policy),
            Some(Event::Disabled { .. })
        ));
        let mut s = PoolState::fresh(&[1]);
        s.record_failure(0, &rate_limit(None), 0, &POLICY);
        assert!(matches!(
            s.record_failure(0, &REFUSED, 10, &POLICY),
            Some(Event::Disabled { .. })
        ));
        assert_eq!(s.keys[0].health, Health::Disabled);
    }

    #[test]
    fn late_failures_extend_but_never_shorten_a_time_out() {
        let mut s = PoolState::fresh(&[1]);
        s.record_failure(0, &rate_limit(None), 0, &POLICY);
        assert_eq!(
            s.record_failure(0, &rate_limit(None), 5_000, &POLICY),
            Some(Event::CooldownExtended {
                key: 0,
                until_ms: 65_000
            })
        );
        assert_eq!(
            s.record_failure(0, &rate_limit(Some(1_000)), 6_000, &POLICY),
            None
        );
        assert_eq!(s.keys[0].down_until_ms, 65_000);
    }

    #[test]
    fn only_a_probe_or_an_earliest_request_proves_a_key_that_is_out() {
        let mut s = PoolState::fresh(&[1]);
        s.record_failure(0, &rate_limit(None), 0, &POLICY);
        assert_eq!(s.record_success(0, SentAs::Normal), None);
        assert_eq!(
            s.record_success(0, SentAs::WhileDown),
            Some(Event::Restored { key: 0 })
        );
    }

    #[test]
    fn a_probe_that_says_nothing_frees_the_claim_and_a_lapsed_claim_frees_itself() {
        let mut s = PoolState::fresh(&[1]);
        s.record_failure(0, &rate_limit(None), 0, &POLICY);
        s.advance(60_000);
        s.claim_probe(0, 60_000, 1_000);
        assert_eq!(s.release_probe(0), Some(Event::ProbeReleased { key: 0 }));
        assert_eq!(s.release_probe(0), None);
        s.claim_probe(0, 60_100, 1_000);
        assert_eq!(s.next_change_ms(), Some(61_100));
        assert_eq!(s.advance(61_100), vec![Event::ProbeReleased { key: 0 }]);
        assert!(s.keys[0].probe_claimable());
    }

    #[test]
    fn out_of_range_keys_are_ignored() {
        let mut s = PoolState::fresh(&[1]);
        assert_eq!(s.record_failure(3, &SERVER, 0, &POLICY), None);
        assert_eq!(s.record_success(3, SentAs::Probe), None);
        assert_eq!(s.claim_probe(3, 0, 1), None);
        assert_eq!(s.release_probe(3), None);
    }

    #[test]
    fn reconcile_keeps_known_keys_forgets_removed_and_adds_new() {
        let mut stored = PoolState::fresh(&[1, 2, 3]);
        stored.record_failure(1, &SERVER, 0, &POLICY);
        let (same, changed) = PoolState::reconcile(stored.clone(), &[1, 2, 3]);
        assert!(!changed);
        assert_eq!(same, stored);
        let (s, changed) = PoolState::reconcile(stored, &[4, 2]);
        assert!(changed);
        assert_eq!(s.keys[0], KeyState::fresh(4));
        assert_eq!(s.keys[1].health, Health::CoolingDown);
    }

    #[test]
    fn restore_all_brings_every_key_back() {
        let mut s = PoolState::fresh(&[1, 2]);
        s.record_failure(
            0,
            &REFUSED,
            0,
            &Policy {
                disable_ms: 0,
                ..POLICY
            },
        );
        s.record_failure(1, &SERVER, 0, &POLICY);
        s.restore_all();
        assert_eq!(s.available_count(), 2);
    }

    #[test]
    fn failed_checks_extend_with_backoff_and_passing_checks_restore() {
        let mut s = PoolState::fresh(&[1, 2, 3]);
        assert_eq!(
            s.check_failed(0, &SERVER, 0, &POLICY),
            None,
            "available keys are never checked"
        );
        s.record_failure(0, &SERVER, 0, &POLICY);
        assert_eq!(
            s.check_failed(0, &SERVER, 10_000, &POLICY),
            Some(Event::CooldownExtended {
                key: 0,
                until_ms: 130_000
            })
        );
        assert_eq!(s.keys[0].strikes, 2);
        let forever = Policy {
            disable_ms: 0,
            ..POLICY
        };
        s.record_failure(1, &REFUSED, 0, &forever);
        assert_eq!(
            s.check_failed(1, &REFUSED, 5, &forever),
            None,
            "refused for good stays refused"
        );
        assert_eq!(s.restore_checked(1), Some(Event::Restored { key: 1 }));
        assert_eq!(s.restore_checked(1), None);
        assert!(s.keys[1].is_available());
        s.record_failure(2, &SERVER, 0, &POLICY);
        s.advance(60_000);
        assert_eq!(s.keys[2].health, Health::Probing);
        s.check_failed(2, &SERVER, 60_000, &POLICY);
        assert_eq!(
            s.keys[2].health,
            Health::CoolingDown,
            "a failed check ends the probe wait"
        );
    }

    #[test]
    fn a_failed_probe_continues_the_outage_it_does_not_begin_one() {
        let mut s = PoolState::fresh(&[1]);
        assert!(matches!(
            s.record_failure(0, &SERVER, 0, &POLICY),
            Some(Event::MarkedDown {
                outage_began: true,
                ..
            })
        ));
        s.advance(60_000);
        s.claim_probe(0, 60_000, 1_000);
        assert!(matches!(
            s.record_failure(0, &SERVER, 60_001, &POLICY),
            Some(Event::MarkedDown {
                outage_began: false,
                strikes: 2,
                ..
            })
        ));
        assert!(matches!(
            s.record_failure(0, &REFUSED, 60_002, &POLICY),
            Some(Event::Disabled {
                outage_began: false,
                ..
            })
        ));
    }

    #[test]
    fn a_spent_budget_rests_the_key_until_the_reset_then_it_is_back_without_a_probe() {
        let mut s = PoolState::fresh(&[1, 2]);
        s.keys[0].strikes = 2;
        assert_eq!(
            s.spend(0, 1_000, 3_000),
            Some(Event::MarkedDown {
                key: 0,
                status: 200,
                class: FailureClass::BudgetSpent,
                until_ms: 3_000,
                strikes: 2,
                outage_began: true
            })
        );
        assert_eq!(s.keys[0].health, Health::Spent);
        assert_eq!(s.available_count(), 1);
        assert_eq!(s.next_change_ms(), Some(3_000));
        // Requests already in flight meet the limit: the rest only grows, still with no probe.
        assert_eq!(
            s.record_failure(0, &rate_limit(Some(2_500)), 1_100, &POLICY),
            Some(Event::CooldownExtended {
                key: 0,
                until_ms: 3_600
            })
        );
        assert_eq!(s.keys[0].health, Health::Spent);
        assert_eq!(s.keys[0].strikes, 2, "no strike: nothing failed");
        assert_eq!(s.spend(0, 1_200, 2_000), None, "a rest never shortens");
        assert!(s.advance(3_599).is_empty());
        assert_eq!(s.advance(3_600), vec![Event::Restored { key: 0 }]);
        assert!(
            s.keys[0].is_available(),
            "back at the reset, not a probe candidate"
        );
        assert_eq!(s.keys[0].down_until_ms, 0);
    }

    #[test]
    fn only_an_available_key_starts_a_rest() {
        let mut s = PoolState::fresh(&[1, 2, 3]);
        s.record_failure(0, &SERVER, 0, &POLICY);
        s.record_failure(1, &REFUSED, 0, &POLICY);
        s.record_failure(2, &SERVER, 0, &POLICY);
        s.advance(61_000);
        let before = s.clone();
        for key in 0..3 {
            assert_eq!(s.spend(key, 500, 5_000), None);
        }
        assert_eq!(s, before);
    }
}
