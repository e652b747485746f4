//! `onAllUnavailable: wait` on the native host: the held requests of one filter configuration.
//!
//! wasm keeps a queue per worker, run by each VM's `on_tick`. Here the engine is one per
//! configuration for every worker, so the queue is too: a request that finds no key is paused
//! on its worker (`REQUEST_HEADERS_STOP_ALL`) and queued here; the configuration's tick runs the
//! queue on the main thread (`core::waiting::Queue::run`, arrival order, no faster than keys
//! return) and decides what each released request gets (`core::waiting::release`); the request's
//! own scheduler then takes that decision to its worker (`Filter::scheduled`), which applies it
//! as it would have at the request's arrival and continues the request.
//!
//! A client that hangs up is forgotten: Envoy destroys its filter, which marks the entry gone
//! (`Held::forget`), and an event committed for a stream that is gone is never delivered. A key
//! decided for a request whose client hung up in between is handed back by `forget`, so a probe
//! is not lost with it.
//!
//! Locks are taken in one order, engine → queue → entry, and a worker never holds an entry's
//! lock while it takes the engine.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use super::abi::{Scheduler, Stream};
use crate::core::engine::{Assignment, Decision, Engine, Host};
use crate::core::waiting::{self, Arrival, Queue, Served, MAX_HELD};

enum State {
    /// In the queue, with what its headers said.
    Waiting(Arrival),
    /// Let go on the main thread; its worker applies the decision at its next event.
    Released(Decision, Arrival),
    /// Applied, or the client hung up: nothing more to do.
    Done,
}

/// One held request. Its filter owns it; the queue has a weak reference.
pub struct Held {
    scheduler: Scheduler,
    state: Mutex<State>,
}

impl Held {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// On the request's worker: the decision to apply and what the headers said, once the
    /// queue let the request go.
    pub fn take_released(&self) -> Option<(Decision, Arrival)> {
        let mut state = self.state();
        match std::mem::replace(&mut *state, State::Done) {
            State::Released(decision, arrival) => Some((decision, arrival)),
            other => {
                *state = other;
                None
            }
        }
    }

    /// The request ended while held (its client hung up): it leaves the queue, and a key
    /// already decided for it comes back to the caller to be given back.
    pub fn forget(&self) -> Option<Assignment> {
        match std::mem::replace(&mut *self.state(), State::Done) {
            State::Released(Decision::UseKey(sent), _) => Some(sent),
            _ => None,
        }
    }
}

pub struct Waiting {
    queue: Mutex<Queue<Weak<Held>>>,
    /// The queue's length as last seen under its lock: a request reads this, not the lock,
    /// to learn that nothing is held.
    held: AtomicUsize,
    /// When the tick last did the periodic work: ticks come every `HELD_TICK_MS` here.
    last_work_ms: AtomicU64,
}

impl Waiting {
    /// At most `MAX_HELD` per worker, as wasm holds, for the whole process.
    pub fn new(workers: u32) -> Self {
        let workers = usize::try_from(workers.max(1)).unwrap_or(1);
        Waiting {
            queue: Mutex::new(Queue::new(MAX_HELD.saturating_mul(workers))),
            held: AtomicUsize::new(0),
            last_work_ms: AtomicU64::new(0),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue<Weak<Held>>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a new request of `group` waits behind held ones (arrival order). One atomic
    /// read while nothing is held.
    pub fn queues_behind(&self, group: usize) -> bool {
        self.held.load(Ordering::Relaxed) > 0 && self.queue().queues_behind(group)
    }

    /// Holds the request on this stream until `deadline_ms`; the arrival comes back when the
    /// queue is full (or Envoy gave no scheduler), for the `reject` answer.
    pub fn hold(
        &self,
        s: &Stream,
        arrival: Arrival,
        deadline_ms: u64,
    ) -> Result<Arc<Held>, Arrival> {
        let group = arrival.profile.unwrap_or(usize::MAX);
        let mut queue = self.queue();
        if !queue.has_room() {
            return Err(arrival);
        }
        let Some(scheduler) = s.scheduler() else {
            return Err(arrival);
        };
        let held = Arc::new(Held {
            scheduler,
            state: Mutex::new(State::Waiting(arrival)),
        });
        if queue
            .push(Arc::downgrade(&held), group, deadline_ms)
            .is_err()
        {
            // Not reached: the room was checked under the same lock.
            let state = std::mem::replace(&mut *held.state(), State::Done);
            return match state {
                State::Waiting(arrival) | State::Released(_, arrival) => Err(arrival),
                State::Done => Ok(held),
            };
        }
        self.held.store(queue.len(), Ordering::Relaxed);
        Ok(held)
    }

    /// Whether this tick also does the periodic work, which keeps the engine's pace `base_ms`.
    pub fn periodic_work_due(&self, now_ms: u64, base_ms: u64) -> bool {
        let last = self.last_work_ms.load(Ordering::Relaxed);
        let due = waiting::periodic_work_due(now_ms, last, base_ms);
        if due {
            self.last_work_ms.store(now_ms, Ordering::Relaxed);
        }
        due
    }

    pub fn is_holding(&self) -> bool {
        self.held.load(Ordering::Relaxed) > 0
    }

    /// One pass over the held requests, on the main thread: each that a key can take now, or
    /// whose wait is over, is let go with its decision and woken on its worker.
    pub fn run(&self, engine: &mut Engine, host: &dyn Host, now_ms: u64) {
        let mut queue = self.queue();
        // Both of the queue's callbacks decide with the engine, one at a time.
        let engine = std::cell::RefCell::new(engine);
        let let_go = |held: &Held, over: bool| -> Served {
            let mut state = held.state();
            let State::Waiting(arrival) = &*state else {
                return Served::Yes;
            };
            let Some(decision) = waiting::release(
                &mut engine.borrow_mut(),
                host,
                arrival.profile,
                &arrival.avoid,
                arrival.ask,
                now_ms,
                over,
            ) else {
                return Served::NotYet;
            };
            if let State::Waiting(arrival) = std::mem::replace(&mut *state, State::Done) {
                *state = State::Released(decision, arrival);
            }
            held.scheduler.commit();
            Served::Yes
        };
        queue.run(
            now_ms,
            |held| {
                held.upgrade()
                    .is_none_or(|h| matches!(*h.state(), State::Done))
            },
            |held| held.upgrade().map_or(Served::Yes, |h| let_go(&h, false)),
            |held| {
                if let Some(h) = held.upgrade() {
                    let_go(&h, true);
                }
            },
        );
        self.held.store(queue.len(), Ordering::Relaxed);
    }
}
