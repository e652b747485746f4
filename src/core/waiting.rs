//! `onAllUnavailable: "wait"`: requests that found no key, held per worker until one returns.
//!
//! A request that finds every key out is paused (Envoy keeps what it already buffered, and its
//! watermarks stop reading more) and queued here with a deadline. The host runs the queue on
//! ticks, which it makes frequent while anything is held (`tick_period_ms`): in arrival order,
//! each entry is sent if a key can serve it now; an entry whose deadline has passed gets the
//! `reject` answer. Entries of one group (the request's profile) keep their order: once one
//! cannot be served, later ones of its group are not tried before it on that run. A key that
//! returns through its probe therefore takes exactly one held request (the probe), and the rest
//! follow once that probe has succeeded: requests are released no faster than keys return.
//! Entries whose client hung up are forgotten (the host filter's `gone`). The queue is bounded; a
//! request that finds it full is rejected at once. Nothing here talks to the host: [`release`]
//! asks the engine (through its injected host) what a held request gets, and each host applies
//! that to the request as it would have at its arrival.

use crate::core::engine::{Ask, Clock, Decision, Engine, Host};

/// Held requests per worker, at most. Each keeps a connection, its headers and up to Envoy's
/// buffer limit of its body in Envoy, and an entry here; 256 per worker is far beyond a burst
/// that spends every key for a second or two, and bounds what a flood during an outage holds.
pub const MAX_HELD: usize = 256;

/// How often the queue runs while it holds anything: a returning key is used within this, and
/// a deadline is met within this. An idle worker keeps its usual tick.
pub const HELD_TICK_MS: u32 = 50;

/// What a request's headers said, kept while it is held so that it can be sent on later as it
/// would have been at its arrival.
pub struct Arrival {
    pub profile: Option<usize>,
    /// Whether the filter runs as an upstream filter (per retry attempt).
    pub upstream: bool,
    /// Upstream mode: the request's `x-request-id`, which its attempts share.
    pub request_id: Option<String>,
    /// Upstream mode: the (pool, key) pairs earlier attempts of this request failed with.
    pub avoid: Vec<(usize, usize)>,
    pub ask: Ask,
    pub end_of_stream: bool,
    /// Whether a client's pool header is removed (some pool has fallbacks).
    pub drop_pool_header: bool,
}

struct Entry<T> {
    item: T,
    group: usize,
    deadline_ms: u64,
}

pub struct Queue<T> {
    entries: Vec<Entry<T>>,
    bound: usize,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue::new(MAX_HELD)
    }
}

/// What the host did with an entry it was asked to serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Sent with a key (or answered): it leaves the queue.
    Yes,
    /// No key can serve it yet: it stays, and blocks later entries of its group on this run.
    NotYet,
}

impl<T> Queue<T> {
    pub fn new(bound: usize) -> Self {
        Queue {
            entries: Vec::new(),
            bound,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn has_room(&self) -> bool {
        self.entries.len() < self.bound
    }

    /// Holds `item` until `deadline_ms`; gives it back when the queue is full.
    pub fn push(&mut self, item: T, group: usize, deadline_ms: u64) -> Result<(), T> {
        if self.entries.len() >= self.bound {
            return Err(item);
        }
        self.entries.push(Entry {
            item,
            group,
            deadline_ms,
        });
        Ok(())
    }

    /// Whether a request of `group` is held: a new one queues behind it, in arrival order.
    pub fn holds_group(&self, group: usize) -> bool {
        self.entries.iter().any(|e| e.group == group)
    }

    /// Whether a new request of `group` must queue behind held ones (arrival order) rather than
    /// ask for a key: only while some of its group are held and there is room for it.
    pub fn queues_behind(&self, group: usize) -> bool {
        !self.entries.is_empty() && self.has_room() && self.holds_group(group)
    }

    /// One pass in arrival order. `gone`: the client hung up (dropped silently). `serve`: send
    /// it now if a key can take it. `expire`: its deadline passed and no key could take it.
    pub fn run(
        &mut self,
        now_ms: u64,
        gone: impl Fn(&T) -> bool,
        mut serve: impl FnMut(&T) -> Served,
        mut expire: impl FnMut(T),
    ) {
        let mut blocked: Vec<usize> = Vec::new();
        let mut kept = Vec::with_capacity(self.entries.len());
        for entry in self.entries.drain(..) {
            if gone(&entry.item) {
                continue;
            }
            if !blocked.contains(&entry.group) && serve(&entry.item) == Served::Yes {
                continue;
            }
            if !blocked.contains(&entry.group) {
                blocked.push(entry.group);
            }
            if entry.deadline_ms <= now_ms {
                expire(entry.item);
            } else {
                kept.push(entry);
            }
        }
        self.entries = kept;
    }

    /// The tick period the worker needs: frequent while anything is held, else `idle_ms`.
    pub fn tick_period_ms(&self, idle_ms: u32) -> u32 {
        if self.entries.is_empty() {
            idle_ms
        } else {
            idle_ms.min(HELD_TICK_MS)
        }
    }
}

/// What a held request gets when the queue runs: `None` while no key can serve it and its wait
/// is not `over`. A wait that is over with still no key becomes the `reject` answer, counted as
/// rejected then (once, not on every look while it was held).
pub fn release(
    engine: &mut Engine,
    host: &dyn Host,
    profile: Option<usize>,
    avoid: &[(usize, usize)],
    ask: Ask,
    now_ms: u64,
    over: bool,
) -> Option<Decision> {
    match engine.decide_with(host, profile, &Clock::at(now_ms), avoid, ask) {
        Decision::Hold {
            retry_after_secs, ..
        } => {
            if !over {
                return None;
            }
            if let Some(profile) = profile {
                engine.count_rejected(profile);
            }
            Some(Decision::Reject { retry_after_secs })
        }
        decision => Some(decision),
    }
}

/// Whether a tick at `now_ms` also does the periodic work (the engine's tick, health checks):
/// ticks come every [`HELD_TICK_MS`] while requests are held, and the periodic work keeps the
/// engine's pace `base_ms`, last done at `last_ms`.
pub fn periodic_work_due(now_ms: u64, last_ms: u64, base_ms: u64) -> bool {
    now_ms
        .saturating_sub(last_ms)
        .saturating_add(u64::from(HELD_TICK_MS))
        >= base_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A pool with `keys` free slots: each served request takes one.
    fn run(
        q: &mut Queue<u32>,
        now: u64,
        free: &RefCell<usize>,
        gone: &[u32],
    ) -> (Vec<u32>, Vec<u32>) {
        let (served, expired) = (RefCell::new(Vec::new()), RefCell::new(Vec::new()));
        q.run(
            now,
            |id| gone.contains(id),
            |id| {
                let mut f = free.borrow_mut();
                if *f == 0 {
                    return Served::NotYet;
                }
                *f -= 1;
                served.borrow_mut().push(*id);
                Served::Yes
            },
            |id| expired.borrow_mut().push(id),
        );
        (served.into_inner(), expired.into_inner())
    }

    #[test]
    fn held_requests_leave_in_arrival_order_no_faster_than_keys_return() {
        let mut q = Queue::new(10);
        for id in 1..=4 {
            q.push(id, 0, 1_000 + u64::from(id)).unwrap();
        }
        let free = RefCell::new(0);
        assert_eq!(run(&mut q, 100, &free, &[]), (vec![], vec![]));
        *free.borrow_mut() = 1;
        assert_eq!(run(&mut q, 200, &free, &[]), (vec![1], vec![]));
        *free.borrow_mut() = 2;
        assert_eq!(run(&mut q, 300, &free, &[]), (vec![2, 3], vec![]));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn a_request_past_its_deadline_gets_the_reject_answer_unless_a_key_is_back_just_then() {
        let mut q = Queue::new(10);
        q.push(1, 0, 500).unwrap();
        q.push(2, 0, 600).unwrap();
        q.push(3, 0, 900).unwrap();
        let free = RefCell::new(0);
        assert_eq!(run(&mut q, 600, &free, &[]), (vec![], vec![1, 2]));
        *free.borrow_mut() = 1;
        assert_eq!(run(&mut q, 950, &free, &[]), (vec![3], vec![]));
        assert!(q.is_empty());
    }

    #[test]
    fn a_client_that_hung_up_is_forgotten_and_takes_no_key() {
        let mut q = Queue::new(10);
        for id in 1..=3 {
            q.push(id, 0, 1_000).unwrap();
        }
        let free = RefCell::new(1);
        assert_eq!(run(&mut q, 10, &free, &[1]), (vec![2], vec![]));
        assert_eq!(run(&mut q, 2_000, &RefCell::new(0), &[3]), (vec![], vec![]));
        assert!(q.is_empty());
    }

    #[test]
    fn a_group_with_no_key_does_not_hold_up_another_group() {
        let mut q = Queue::new(10);
        q.push(1, 7, 1_000).unwrap();
        q.push(2, 8, 1_000).unwrap();
        let mut served = Vec::new();
        q.run(
            0,
            |_| false,
            |id| {
                if *id == 2 {
                    served.push(*id);
                    Served::Yes
                } else {
                    Served::NotYet
                }
            },
            |_| {},
        );
        assert_eq!(served, [2]);
        assert!(q.holds_group(7) && !q.holds_group(8));
    }

    #[test]
    fn the_queue_is_bounded_and_asks_for_ticks_only_while_it_holds_something() {
        let mut q = Queue::new(2);
        assert_eq!(q.tick_period_ms(1_000), 1_000);
        assert!(q.push(1, 0, 10).is_ok() && q.push(2, 0, 10).is_ok());
        assert_eq!(q.push(3, 0, 10), Err(3));
        assert_eq!(q.tick_period_ms(1_000), HELD_TICK_MS);
        assert_eq!(q.tick_period_ms(20), 20);
        assert_eq!(Queue::<u8>::default().bound, MAX_HELD);
    }

    #[test]
    fn a_new_request_queues_behind_its_group_only_while_there_is_room() {
        let mut q = Queue::new(2);
        assert!(!q.queues_behind(0), "nothing held: it asks for a key");
        q.push(1, 0, 10).unwrap();
        assert!(q.queues_behind(0) && !q.queues_behind(1));
        q.push(2, 1, 10).unwrap();
        assert!(
            !q.queues_behind(0),
            "full: it gets the reject answer instead"
        );
    }

    #[test]
    fn the_periodic_work_keeps_the_engines_pace_under_fast_ticks() {
        assert!(periodic_work_due(1_000, 0, 1_000));
        assert!(
            periodic_work_due(960, 0, 1_000),
            "within one fast tick of its time"
        );
        assert!(!periodic_work_due(900, 0, 1_000));
        assert!(periodic_work_due(u64::MAX, 0, u64::MAX));
        assert!(
            !periodic_work_due(0, u64::MAX, 1_000),
            "a clock that went back waits"
        );
    }

    #[test]
    fn a_held_request_waits_until_a_key_returns_or_its_wait_is_over() {
        use crate::core::engine::tests::TestHost;
        use crate::core::engine::Assignment;
        let host = TestHost::default();
        let config = crate::core::config::parse(
            br#"{"name": "p", "apiTokens": ["sk-a"], "onAllUnavailable": "wait",
                 "failover": {"cooldownDuration": 1000}}"#,
        )
        .unwrap();
        let mut engine = Engine::new(config, 1);
        engine.start(&host, 0);
        // The configuration's only profile, the global one.
        let profile = Some(0);
        assert!(engine.profile(0).is_some_and(|p| p.max_wait_ms == 2_000));
        let ask = Ask::default();
        let Some(Decision::UseKey(sent)) = release(&mut engine, &host, profile, &[], ask, 0, false)
        else {
            panic!("a key that is in serves at once");
        };
        let verdict = engine.verdict(sent.profile, 429, None);
        engine.record(&host, sent, verdict, 429, None, &Clock::at(0));
        assert_eq!(
            release(&mut engine, &host, profile, &[], ask, 10, false),
            None
        );
        let over = release(&mut engine, &host, profile, &[], ask, 20, true);
        assert!(
            matches!(
                over,
                Some(Decision::Reject {
                    retry_after_secs: 1 | 2
                })
            ),
            "{over:?}"
        );
        let back = release(&mut engine, &host, profile, &[], ask, 2_100, false);
        assert!(
            matches!(back, Some(Decision::UseKey(Assignment { key: 0, .. }))),
            "{back:?}"
        );
    }
}
