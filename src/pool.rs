//! The key-pool state machine: pure functions of the pool's state, the time and the settings.
//! Nothing here talks to the host; `store` persists the state and `glue` feeds in the events.

/// Where one key stands. Time is milliseconds since the Unix epoch, read from the host clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Available,
    /// Out of rotation until `down_until_ms`.
    CoolingDown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyState {
    /// Identifies the key across config reloads without storing the key itself.
    pub fingerprint: u64,
    pub health: Health,
    /// Consecutive failures seen while available; reaches `failureThreshold` to mark the key down.
    pub consecutive_failures: u32,
    pub down_since_ms: u64,
    pub down_until_ms: u64,
}

impl KeyState {
    pub fn fresh(fingerprint: u64) -> Self {
        KeyState {
            fingerprint,
            health: Health::Available,
            consecutive_failures: 0,
            down_since_ms: 0,
            down_until_ms: 0,
        }
    }

    pub fn is_available(&self) -> bool {
        self.health == Health::Available
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
/// threshold applies from the next event on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub failure_threshold: u32,
    pub cooldown_ms: u64,
}

/// A change worth a log line (and, later, a metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    FailureCounted {
        key: usize,
        consecutive: u32,
    },
    MarkedDown {
        key: usize,
        status: u16,
        until_ms: u64,
    },
    /// An in-flight request failed on a key that was already down: its return moves later.
    CooldownExtended {
        key: usize,
        until_ms: u64,
    },
    FailuresReset {
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

    /// The upstream answered `status` for a request sent with key `key`, and the status counts
    /// against the key.
    pub fn record_failure(
        &mut self,
        key: usize,
        status: u16,
        now_ms: u64,
        policy: &Policy,
    ) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        let until_ms = now_ms.saturating_add(policy.cooldown_ms);
        match state.health {
            Health::CoolingDown => {
                // Never shorten a cooldown: a late failure only pushes the return further out.
                if until_ms > state.down_until_ms {
                    state.down_until_ms = until_ms;
                    Some(Event::CooldownExtended { key, until_ms })
                } else {
                    None
                }
            }
            Health::Available => {
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                if state.consecutive_failures >= policy.failure_threshold.max(1) {
                    state.health = Health::CoolingDown;
                    state.down_since_ms = now_ms;
                    state.down_until_ms = until_ms;
                    Some(Event::MarkedDown {
                        key,
                        status,
                        until_ms,
                    })
                } else {
                    Some(Event::FailureCounted {
                        key,
                        consecutive: state.consecutive_failures,
                    })
                }
            }
        }
    }

    /// The key served a request. `sent_while_down` says the request went out with a key that was
    /// already cooling down (every key was down and `earliest` chose it): then the success is proof
    /// the key works again. A request that merely started before another marked the key down
    /// proves nothing about the limit that tripped, so it leaves the cooldown alone.
    pub fn record_success(&mut self, key: usize, sent_while_down: bool) -> Option<Event> {
        let state = self.keys.get_mut(key)?;
        match state.health {
            Health::CoolingDown if sent_while_down => {
                *state = KeyState::fresh(state.fingerprint);
                Some(Event::Restored { key })
            }
            Health::CoolingDown => None,
            Health::Available if state.consecutive_failures > 0 => {
                state.consecutive_failures = 0;
                Some(Event::FailuresReset { key })
            }
            Health::Available => None,
        }
    }

    /// Brings back every key whose cooldown has passed.
    pub fn restore_due(&mut self, now_ms: u64) -> Vec<Event> {
        let mut events = Vec::new();
        for (key, state) in self.keys.iter_mut().enumerate() {
            if state.health == Health::CoolingDown && state.down_until_ms <= now_ms {
                *state = KeyState::fresh(state.fingerprint);
                events.push(Event::Restored { key });
            }
        }
        events
    }

    /// The earliest moment a cooling key returns, if any key is cooling down.
    pub fn next_return_ms(&self) -> Option<u64> {
        self.keys
            .iter()
            .filter(|k| k.health == Health::CoolingDown)
            .map(|k| k.down_until_ms)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        failure_threshold: 1,
        cooldown_ms: 60_000,
    };

    #[test]
    fn a_failure_at_threshold_one_marks_the_key_down_until_the_cooldown_ends() {
        let mut s = PoolState::fresh(&[1, 2]);
        let ev = s.record_failure(0, 429, 1_000, &POLICY);
        assert_eq!(
            ev,
            Some(Event::MarkedDown {
                key: 0,
                status: 429,
                until_ms: 61_000
            })
        );
        assert_eq!(s.available_count(), 1);
        assert_eq!(s.next_return_ms(), Some(61_000));
        assert!(s.restore_due(60_999).is_empty());
        assert_eq!(s.restore_due(61_000), vec![Event::Restored { key: 0 }]);
        assert_eq!(s.keys[0], KeyState::fresh(1));
        assert_eq!(s.next_return_ms(), None);
    }

    #[test]
    fn threshold_counts_consecutive_failures_and_success_resets() {
        let policy = Policy {
            failure_threshold: 2,
            cooldown_ms: 10,
        };
        let mut s = PoolState::fresh(&[7]);
        assert_eq!(
            s.record_failure(0, 503, 0, &policy),
            Some(Event::FailureCounted {
                key: 0,
                consecutive: 1
            })
        );
        assert_eq!(
            s.record_success(0, false),
            Some(Event::FailuresReset { key: 0 })
        );
        assert_eq!(s.record_success(0, false), None, "nothing to write");
        s.record_failure(0, 503, 0, &policy);
        assert!(matches!(
            s.record_failure(0, 503, 5, &policy),
            Some(Event::MarkedDown { until_ms: 15, .. })
        ));
    }

    #[test]
    fn late_failures_extend_but_never_shorten_a_cooldown() {
        let mut s = PoolState::fresh(&[1]);
        s.record_failure(0, 429, 0, &POLICY);
        assert_eq!(
            s.record_failure(0, 429, 5_000, &POLICY),
            Some(Event::CooldownExtended {
                key: 0,
                until_ms: 65_000
            })
        );
        let shorter = Policy {
            failure_threshold: 1,
            cooldown_ms: 1_000,
        };
        assert_eq!(s.record_failure(0, 429, 6_000, &shorter), None);
        assert_eq!(s.keys[0].down_until_ms, 65_000);
    }

    #[test]
    fn success_on_a_down_key_restores_it_only_when_it_was_sent_while_down() {
        let mut s = PoolState::fresh(&[1]);
        s.record_failure(0, 429, 0, &POLICY);
        assert_eq!(s.record_success(0, false), None);
        assert_eq!(s.available_count(), 0);
        assert_eq!(s.record_success(0, true), Some(Event::Restored { key: 0 }));
        assert_eq!(s.available_count(), 1);
    }

    #[test]
    fn out_of_range_keys_are_ignored() {
        let mut s = PoolState::fresh(&[1]);
        assert_eq!(s.record_failure(3, 429, 0, &POLICY), None);
        assert_eq!(s.record_success(3, true), None);
    }

    #[test]
    fn reconcile_keeps_known_keys_forgets_removed_and_adds_new() {
        let mut stored = PoolState::fresh(&[1, 2, 3]);
        stored.record_failure(1, 429, 0, &POLICY);
        let (same, changed) = PoolState::reconcile(stored.clone(), &[1, 2, 3]);
        assert!(!changed);
        assert_eq!(same, stored);
        let (s, changed) = PoolState::reconcile(stored, &[4, 2]);
        assert!(changed);
        assert_eq!(s.keys.len(), 2);
        assert_eq!(s.keys[0], KeyState::fresh(4));
        assert_eq!(s.keys[1].fingerprint, 2);
        assert_eq!(s.keys[1].health, Health::CoolingDown);
    }

    #[test]
    fn restore_due_restores_several_keys_at_once() {
        let mut s = PoolState::fresh(&[1, 2, 3]);
        s.record_failure(0, 429, 0, &POLICY);
        s.record_failure(2, 500, 10, &POLICY);
        assert_eq!(s.next_return_ms(), Some(60_000));
        let ev = s.restore_due(70_000);
        assert_eq!(ev.len(), 2);
        assert_eq!(s.available_count(), 3);
    }
}
