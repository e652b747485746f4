//! Which keys already failed for a request, across Envoy's retry attempts (upstream mode).
//!
//! Every attempt of one downstream request runs on the worker that owns the request, so a
//! per-VM map keyed by the request id is enough: no shared data, no host call. A request id a
//! client reuses on purpose only steers its own retries.
//!
//! Only failures another key could cure are recorded (the caller decides; see
//! `Engine::note_failed_attempt`), so a flood of bad requests leaves nothing here. The memory is
//! bounded: when full, the request touched longest ago makes room, never the newest, so a burst
//! cannot stop later retries from being steered. An entry lives only while another attempt may
//! still follow its last failure, and is dropped at once when an attempt succeeds.
//!
//! Every operation is O(1) or amortized O(1): `order` lists requests by last touch, oldest
//! first, so expiry and eviction pop from its front; it never walks the map.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

const MAX_REQUESTS: usize = 10_000;
/// How long after its last failed attempt a request is remembered. The next attempt follows a
/// failure after Envoy's retry back-off: 25 ms to 250 ms by default, and a rate-limited back-off
/// (`rate_limited_retry_back_off`, from `retry-after`) is bounded by its `max_interval`,
/// seconds in practice. A minute covers both with room for a loaded machine; the clock restarts
/// at every failure, so a request whose attempts are slow to fail keeps its memory.
const TTL_MS: u64 = 60_000;
/// Retries beyond this many keys are not tracked; the pool's own state still steers them.
const MAX_KEYS_PER_REQUEST: usize = 32;

#[derive(Default)]
pub struct Attempts {
    requests: HashMap<Rc<str>, Tried>,
    /// (request id, touch number), oldest touch first. An entry whose number is not its
    /// request's current one is stale (touched again later, forgotten or evicted) and skipped.
    order: VecDeque<(Rc<str>, u64)>,
    touches: u64,
}

struct Tried {
    /// (pool, key) pairs.
    keys: Vec<(usize, usize)>,
    last_ms: u64,
    /// This request's entry in `order`.
    touch: u64,
}

impl Attempts {
    /// Keys that failed for this request so far (empty for a first attempt).
    pub fn failed(&self, request_id: &str) -> &[(usize, usize)] {
        self.requests
            .get(request_id)
            .map_or(&[], |t| t.keys.as_slice())
    }

    pub fn note_failure(&mut self, request_id: &str, key: (usize, usize), now_ms: u64) {
        self.purge(now_ms);
        self.touches = self.touches.wrapping_add(1);
        let touch = self.touches;
        let id: Rc<str> = match self.requests.get_key_value(request_id) {
            Some((id, _)) => Rc::clone(id),
            None => {
                while self.requests.len() >= MAX_REQUESTS {
                    if !self.evict_oldest() {
                        break;
                    }
                }
                let id: Rc<str> = Rc::from(request_id);
                self.requests.insert(
                    Rc::clone(&id),
                    Tried {
                        keys: Vec::new(),
                        last_ms: now_ms,
                        touch,
                    },
                );
                id
            }
        };
        if let Some(tried) = self.requests.get_mut(request_id) {
            if !tried.keys.contains(&key) && tried.keys.len() < MAX_KEYS_PER_REQUEST {
                tried.keys.push(key);
            }
            tried.last_ms = now_ms;
            tried.touch = touch;
        }
        self.order.push_back((id, touch));
        // Stale entries pile up when requests are touched again or forgotten; sweeping them once
        // `order` holds twice the cap keeps its memory bounded at amortized O(1) per touch.
        if self.order.len() > 2 * MAX_REQUESTS {
            let requests = &self.requests;
            self.order
                .retain(|(id, touch)| is_current(requests, id, *touch));
        }
    }

    /// An attempt succeeded: no attempt of this request follows.
    pub fn forget(&mut self, request_id: &str) {
        self.requests.remove(request_id);
    }

    /// Drops requests whose last failure is older than any retry back-off.
    pub fn purge(&mut self, now_ms: u64) {
        while let Some((id, touch)) = self.order.front() {
            if let Some(tried) = self.requests.get(id).filter(|t| t.touch == *touch) {
                if now_ms.saturating_sub(tried.last_ms) < TTL_MS {
                    return;
                }
                self.requests.remove(id);
            }
            self.order.pop_front();
        }
    }

    /// Removes the request touched longest ago; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((id, touch)) = self.order.pop_front() {
            if is_current(&self.requests, &id, touch) {
                self.requests.remove(&id);
                return true;
            }
        }
        false
    }

    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

fn is_current(requests: &HashMap<Rc<str>, Tried>, id: &str, touch: u64) -> bool {
    requests.get(id).is_some_and(|t| t.touch == touch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_failed_keys_per_request_until_forgotten() {
        let mut a = Attempts::default();
        assert!(a.failed("r1").is_empty());
        a.note_failure("r1", (0, 2), 0);
        a.note_failure("r1", (0, 2), 1);
        a.note_failure("r1", (0, 5), 2);
        a.note_failure("r2", (0, 1), 3);
        assert_eq!(a.failed("r1"), [(0, 2), (0, 5)]);
        assert_eq!(a.failed("r2"), [(0, 1)]);
        a.forget("r2");
        assert!(a.failed("r2").is_empty());
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn a_request_is_kept_for_the_ttl_after_its_last_failure() {
        let mut a = Attempts::default();
        a.note_failure("slow", (0, 0), 0);
        a.note_failure("fast", (0, 0), 10);
        // A second failure late in the first one's life restarts its clock.
        a.note_failure("slow", (0, 1), TTL_MS - 1);
        a.purge(TTL_MS + 9);
        assert_eq!(a.failed("slow"), [(0, 0), (0, 1)]);
        assert_eq!(a.failed("fast"), [(0, 0)]);
        a.purge(TTL_MS + 10);
        assert!(
            a.failed("fast").is_empty(),
            "expired {TTL_MS} ms after its failure"
        );
        assert_eq!(a.failed("slow").len(), 2);
        a.purge(2 * TTL_MS - 1);
        assert!(a.is_empty());
        // Expiry also happens on the next failure, with no tick in between.
        a.note_failure("old", (0, 0), 0);
        a.note_failure("new", (0, 0), TTL_MS);
        assert!(a.failed("old").is_empty());
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn when_full_the_request_touched_longest_ago_makes_room() {
        let mut a = Attempts::default();
        for i in 0..MAX_REQUESTS {
            a.note_failure(&i.to_string(), (0, 0), 0);
        }
        // Touching "0" again makes "1" the oldest.
        a.note_failure("0", (0, 1), 1);
        a.note_failure("new", (0, 0), 2);
        assert_eq!(a.len(), MAX_REQUESTS);
        assert_eq!(a.failed("new"), [(0, 0)], "the newest is kept");
        assert!(a.failed("1").is_empty(), "the oldest made room");
        assert_eq!(a.failed("0"), [(0, 0), (0, 1)]);
        assert_eq!(a.failed("2"), [(0, 0)]);
        // Forgotten requests free their place: nothing is evicted for the next ones.
        a.forget("2");
        a.forget("3");
        a.note_failure("newer", (0, 0), 3);
        a.note_failure("newest", (0, 0), 3);
        assert_eq!(a.failed("4"), [(0, 0)]);
        assert_eq!(a.len(), MAX_REQUESTS);
    }

    #[test]
    fn memory_stays_bounded_however_requests_are_touched() {
        let mut a = Attempts::default();
        // Many retries of few requests, then a flood of new ones.
        for round in 0..5 {
            for i in 0..100 {
                a.note_failure(&i.to_string(), (0, round), 0);
            }
        }
        for i in 0..(3 * MAX_REQUESTS) {
            a.note_failure(&format!("f{i}"), (0, 0), 0);
            assert!(a.order.len() <= 2 * MAX_REQUESTS + 1);
        }
        assert_eq!(a.len(), MAX_REQUESTS);
        assert_eq!(a.failed(&format!("f{}", 3 * MAX_REQUESTS - 1)), [(0, 0)]);
        for k in 0..100 {
            a.note_failure("many", (0, k), 0);
        }
        assert_eq!(a.failed("many").len(), MAX_KEYS_PER_REQUEST);
    }
}
