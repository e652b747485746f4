//! The key-pool state machine: pure functions of the pool's state, the time and the settings.
//! Nothing here talks to the host; `store` persists the state and `engine` feeds in the events.
//!
//! A key is Available, CoolingDown (until a time), Disabled (refused by the provider: until a
//! time, or until a health check or config change), Probing: its time out is over and exactly
//! one request, across all workers, may try it (that probe's success makes it Available; its
//! failure sends it back down for longer), or Spent: a success said its budget is used up, so it
//! rests until the provider's reset and is Available again then, with no probe.

use crate::core::status::FailureClass;

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

    /// Whether the claim that wrote `claim_ms` still holds this key's probe.
    pub fn probe_held_by(&self, claim_ms: u64) -> bool {
        self.health == Health::Probing && claim_ms != 0 && self.probe_until_ms == claim_ms
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
            None => self.backed_off_ms(strikes),
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

    /// `cooldownDuration × cooldownBackoff^(strikes-1)`, at most `maxCooldownDuration`, in
    /// constant time. Strikes grow with every failed health check and are never capped, so a
    /// multiplication per strike could run billions of rounds (and with a factor of 1, or one
    /// that integer steps round away, it never reached the maximum to stop early).
    fn backed_off_ms(&self, strikes: u32) -> u64 {
        let steps = strikes.saturating_sub(1);
        if steps == 0 || self.backoff_permille <= 1000 || self.cooldown_ms >= self.max_cooldown_ms {
            return self.cooldown_ms;
        }
        // powi squares its way to the exponent; a factor above 1 raised far enough is infinite,
        // which the comparison below turns into the maximum. Durations are far below 2^53 ms,
        // so the f64 holds them exactly enough for a cooldown.
        let factor = (f64::from(self.backoff_permille) / 1000.0)
            .powi(i32::try_from(steps).unwrap_or(i32::MAX));
        let ms = self.cooldown_ms as f64 * factor;
        if ms >= self.max_cooldown_ms as f64 {
            self.max_cooldown_ms
        } else {
            // In range by the check above (and `as` saturates in any case).
            ms as u64
        }
    }

    fn disabled_until(&self, now_ms: u64) -> u64 {
        if self.disable_ms == 0 {
            FOREVER
        } else {
            now_ms.saturating_add(self.disable_ms)
        }
    }
}

/// How the request whose answer is recorded was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SentAs {
    /// The key was available.
    Normal,
    /// This request claimed the key's probe. `claim_ms` is the `probe_until_ms` its claim wrote:
    /// it names the claim, so a request whose claim lapsed (and was taken by another) or whose
    /// outage is over knows it is no longer the probe.
    Probe { claim_ms: u64 },
    /// Every key was down and `earliest` chose this one anyway.
    WhileDown,
}

impl SentAs {
    pub fn is_probe(self) -> bool {
        matches!(self, SentAs::Probe { .. })
    }
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
    /// `until_ms`: when the claim lapses; it also names the claim (see `SentAs::Probe`).
    ProbeClaimed {
        key: usize,
        until_ms: u64,
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

    /// The upstream's answer for a request sent with key `key`, not as its probe, counts
    /// against it: a request sent while the key was available, or with `earliest` while it was
    /// out. See `record_probe_failure` for the probe's own answer.
    ///
    /// While the key is Probing (its time out is over) such a failure changes nothing: the
    /// request was sent before the time out ended, so it reports on the limit that time out was
    /// for, not on the key now. Finding out about the key now is the probe's job, and its claim
    /// stays. A refusal is the exception, as everywhere: the provider refuses the key itself.
    pub fn record_failure(
        &mut self,
        key: usize,
        failure: &Failure,
        now_ms: u64,
        policy: &Policy,
    ) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        if failure.class == FailureClass::KeyRefused {
            return Self::refuse(key, state, failure.status, now_ms, policy);
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
            Health::Probing => None,
            Health::Available => {
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                if state.consecutive_failures < policy.failure_threshold.max(1) {
                    return Some(Event::FailureCounted {
                        key,
                        consecutive: state.consecutive_failures,
                    });
                }
                Some(Self::take_out(key, state, failure, now_ms, policy, true))
            }
        }
    }

    /// The answer of a request sent as key `key`'s probe, whose claim wrote `claim_ms`. If that
    /// claim still holds the probe, the probe failed: the key goes back out, for longer, in the
    /// same outage. Otherwise the request is no longer the probe (its claim lapsed and another
    /// request's holds the probe now, or the outage it probed is over) and its failure is judged
    /// like any other request's (`record_failure`).
    pub fn record_probe_failure(
        &mut self,
        key: usize,
        claim_ms: u64,
        failure: &Failure,
        now_ms: u64,
        policy: &Policy,
    ) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        if failure.class == FailureClass::KeyRefused || !state.probe_held_by(claim_ms) {
            return self.record_failure(key, failure, now_ms, policy);
        }
        Some(Self::take_out(key, state, failure, now_ms, policy, false))
    }

    /// Out for the computed cooldown (or the hint), one strike more.
    fn take_out(
        key: usize,
        state: &mut KeyState,
        failure: &Failure,
        now_ms: u64,
        policy: &Policy,
        outage_began: bool,
    ) -> Event {
        state.strikes = state.strikes.saturating_add(1);
        let until_ms = now_ms.saturating_add(policy.cooldown_ms(state.strikes, failure));
        state.health = Health::CoolingDown;
        state.down_since_ms = now_ms;
        state.down_until_ms = until_ms;
        state.probe_until_ms = 0;
        Event::MarkedDown {
            key,
            status: failure.status,
            class: failure.class,
            until_ms,
            strikes: state.strikes,
            outage_began,
        }
    }

    /// Refused by the provider: disabled, whatever the threshold or the key's state.
    fn refuse(
        key: usize,
        state: &mut KeyState,
        status: u16,
        now_ms: u64,
        policy: &Policy,
    ) -> Option<Event> {
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
        Some(Event::Disabled {
            key,
            status,
            until_ms,
            outage_began,
        })
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
            (_, SentAs::Probe { .. } | SentAs::WhileDown) => {
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
        // A claim is taken only once the one before lapsed (so at or after its end) or was
        // given back by its holder, which then reports nothing more: the value is unlike that
        // of any claim whose request may still answer, so it names this claim.
        let until_ms = now_ms.saturating_add(lease_ms).max(1);
        state.probe_until_ms = until_ms;
        Some(Event::ProbeClaimed { key, until_ms })
    }

    /// The probe whose claim wrote `claim_ms` came back without a verdict: let another request
    /// try. A request whose claim lapsed leaves alone the claim another request took since.
    pub fn release_probe(&mut self, key: usize, claim_ms: u64) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        if !state.probe_held_by(claim_ms) {
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

/// What tests across the core fail keys with.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// One failure takes a key out for a second, every time; a refusal disables it until the
    /// configuration changes.
    pub const ONE_STRIKE: Policy = Policy {
        failure_threshold: 1,
        cooldown_ms: 1_000,
        backoff_permille: 1_000,
        min_cooldown_ms: 1,
        max_cooldown_ms: 1_000_000,
        disable_ms: 0,
    };

    /// A 429 with no retry hint.
    pub const RATE_LIMITED: Failure = Failure {
        status: 429,
        class: FailureClass::RateLimit,
        hint_ms: None,
        jitter_permille: 0,
    };
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
            Some(Event::ProbeClaimed {
                key: 0,
                until_ms: 91_001
            })
        );
        assert_eq!(s.claim_probe(0, 61_002, 30_000), None, "exactly one probe");
        assert_eq!(
            s.record_success(0, SentAs::Probe { claim_ms: 91_001 }),
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
        let mut claim = None;
        for _ in 0..5 {
            let event = match claim {
                None => s.record_failure(0, &SERVER, now, &policy),
                Some(claim_ms) => s.record_probe_failure(0, claim_ms, &SERVER, now, &policy),
            };
            match event {
                Some(Event::MarkedDown { until_ms, .. }) => {
                    cooldowns.push(until_ms - now);
                    now = until_ms;
                }
                other => panic!("{other:?}"),
            }
            s.advance(now);
            claim = match s.claim_probe(0, now, 10_000) {
                Some(Event::ProbeClaimed { until_ms, .. }) => Some(until_ms),
                other => panic!("{other:?}"),
            };
        }
        assert_eq!(cooldowns, [1_000, 2_000, 4_000, 5_000, 5_000]);
        s.record_success(
            0,
            SentAs::Probe {
                claim_ms: claim.unwrap(),
            },
        );
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
    fn backoff_takes_constant_time_whatever_the_strike_count() {
        let started = std::time::Instant::now();
        let no_backoff = Policy {
            backoff_permille: 1_000,
            ..POLICY
        };
        // A factor of 1 never reaches the maximum: a loop per strike had nothing to stop it.
        assert_eq!(no_backoff.cooldown_ms(u32::MAX, &SERVER), 60_000);
        assert_eq!(POLICY.cooldown_ms(u32::MAX, &SERVER), 600_000);
        // A factor just above 1 on a short cooldown: 1.001 × 500 ms rounds back to 500 ms in
        // integer steps, so stepping never grew; the closed form reaches the maximum.
        let creeping = Policy {
            cooldown_ms: 500,
            min_cooldown_ms: 1,
            backoff_permille: 1_001,
            ..POLICY
        };
        assert_eq!(creeping.cooldown_ms(u32::MAX, &SERVER), 600_000);
        assert_eq!(creeping.cooldown_ms(2, &SERVER), 500);
        assert_eq!(creeping.cooldown_ms(7_000, &SERVER), 545_856);
        let halves = Policy {
            cooldown_ms: 1_000,
            backoff_permille: 1_500,
            ..POLICY
        };
        assert_eq!(
            (1..=5)
                .map(|n| halves.cooldown_ms(n, &SERVER))
                .collect::<Vec<_>>(),
            [1_000, 1_500, 2_250, 3_375, 5_062]
        );
        assert_eq!(POLICY.cooldown_ms(0, &SERVER), 60_000, "no strike yet");
        // Generous for a loaded machine; a loop per strike takes minutes here.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            started.elapsed()
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
        assert_eq!(
            s.release_probe(0, 61_000),
            Some(Event::ProbeReleased { key: 0 })
        );
        assert_eq!(s.release_probe(0, 61_000), None);
        s.claim_probe(0, 60_100, 1_000);
        assert_eq!(s.next_change_ms(), Some(61_100));
        assert_eq!(s.advance(61_100), vec![Event::ProbeReleased { key: 0 }]);
        assert!(s.keys[0].probe_claimable());
    }

    #[test]
    fn out_of_range_keys_are_ignored() {
        let mut s = PoolState::fresh(&[1]);
        assert_eq!(s.record_failure(3, &SERVER, 0, &POLICY), None);
        assert_eq!(s.record_success(3, SentAs::Probe { claim_ms: 1 }), None);
        assert_eq!(s.claim_probe(3, 0, 1), None);
        assert_eq!(s.release_probe(3, 1), None);
        assert_eq!(s.record_probe_failure(3, 1, &SERVER, 0, &POLICY), None);
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
            s.record_probe_failure(0, 61_000, &SERVER, 60_001, &POLICY),
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
    /// Out at 0 for 60 s, then Probing from 60 s; returns the claim taken at `claim_at`.
    fn probing(s: &mut PoolState, claim_at: u64, lease_ms: u64) -> u64 {
        s.record_failure(0, &rate_limit(None), 0, &POLICY);
        s.advance(60_000);
        match s.claim_probe(0, claim_at, lease_ms) {
            Some(Event::ProbeClaimed { until_ms, .. }) => until_ms,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_sent_before_the_time_out_ended_that_fails_after_it_is_not_the_probe() {
        let mut s = PoolState::fresh(&[1, 2]);
        s.record_failure(0, &rate_limit(None), 0, &POLICY);
        s.advance(60_000);
        // Nobody has claimed the probe yet: a stale failure does not take the key out again.
        assert_eq!(s.record_failure(0, &SERVER, 60_100, &POLICY), None);
        assert!(s.keys[0].probe_claimable());
        let claim = match s.claim_probe(0, 60_200, 30_000) {
            Some(Event::ProbeClaimed { until_ms, .. }) => until_ms,
            other => panic!("{other:?}"),
        };
        let before = s.keys[0].clone();
        // Sent normally before the outage, or with `earliest` during it; answered now.
        assert_eq!(
            s.record_failure(0, &rate_limit(None), 60_300, &POLICY),
            None
        );
        assert_eq!(s.record_failure(0, &SERVER, 60_400, &POLICY), None);
        assert_eq!(s.keys[0], before, "the probe's claim and the strikes stay");
        assert!(s.keys[0].probe_held_by(claim));
        // The probe's own failure is the one that sends the key back, in the same outage.
        assert!(matches!(
            s.record_probe_failure(0, claim, &SERVER, 60_500, &POLICY),
            Some(Event::MarkedDown {
                strikes: 2,
                outage_began: false,
                ..
            })
        ));
        // A refusal is about the key itself, stale or not.
        let back = s.keys[0].down_until_ms;
        assert_eq!(s.advance(back), vec![Event::ProbeReady { key: 0 }]);
        assert!(s.claim_probe(0, back, 30_000).is_some());
        assert!(matches!(
            s.record_failure(0, &REFUSED, back + 1, &POLICY),
            Some(Event::Disabled {
                outage_began: false,
                ..
            })
        ));
    }

    #[test]
    fn a_probe_whose_claim_lapsed_leaves_the_next_claim_alone() {
        let mut s = PoolState::fresh(&[1]);
        let first = probing(&mut s, 60_000, 1_000);
        assert_eq!(s.advance(first), vec![Event::ProbeReleased { key: 0 }]);
        let second = match s.claim_probe(0, 61_500, 1_000) {
            Some(Event::ProbeClaimed { until_ms, .. }) => until_ms,
            other => panic!("{other:?}"),
        };
        assert_ne!(first, second);
        // The first probe answers at last, with a failure or with nothing.
        assert_eq!(
            s.record_probe_failure(0, first, &SERVER, 61_600, &POLICY),
            None
        );
        assert_eq!(s.release_probe(0, first), None);
        assert!(s.keys[0].probe_held_by(second), "{:?}", s.keys[0]);
        assert!(matches!(
            s.record_probe_failure(0, second, &SERVER, 61_700, &POLICY),
            Some(Event::MarkedDown {
                strikes: 2,
                outage_began: false,
                ..
            })
        ));
        // Once the key is out again, the first probe's failure is an ordinary late one: it may
        // push the return later, never earlier, and it is not a second failed probe.
        let until = s.keys[0].down_until_ms;
        assert_eq!(
            s.record_probe_failure(0, first, &SERVER, 61_800, &POLICY),
            Some(Event::CooldownExtended {
                key: 0,
                until_ms: 61_800 + 120_000
            })
        );
        assert!(s.keys[0].down_until_ms > until);
        assert_eq!(s.keys[0].strikes, 2);
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
