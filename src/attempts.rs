//! Which keys already failed for a request, across Envoy's retry attempts (upstream mode).
//!
//! Every attempt of one downstream request runs on the worker that owns the request, so a
//! per-VM map keyed by the request id is enough: no shared data, no host call. Entries expire;
//! a request id a client reuses on purpose only steers its own retries.

use std::collections::HashMap;

const MAX_REQUESTS: usize = 10_000;
/// Longer than any sane retry budget; only bounds memory for requests whose end we never see.
const TTL_MS: u64 = 300_000;
/// Retries beyond this many keys are not tracked; the pool's own state still steers them.
const MAX_KEYS_PER_REQUEST: usize = 32;

#[derive(Default)]
pub struct Attempts {
    requests: HashMap<String, Tried>,
}

struct Tried {
    /// (pool, key) pairs.
    keys: Vec<(usize, usize)>,
    first_ms: u64,
}

impl Attempts {
    /// Keys that failed for this request so far (empty for a first attempt).
    pub fn failed(&self, request_id: &str) -> &[(usize, usize)] {
        self.requests
            .get(request_id)
            .map_or(&[], |t| t.keys.as_slice())
    }

    pub fn note_failure(&mut self, request_id: &str, key: (usize, usize), now_ms: u64) {
        if let Some(tried) = self.requests.get_mut(request_id) {
            if !tried.keys.contains(&key) && tried.keys.len() < MAX_KEYS_PER_REQUEST {
                tried.keys.push(key);
            }
            return;
        }
        if self.requests.len() >= MAX_REQUESTS {
            self.purge(now_ms);
            if self.requests.len() >= MAX_REQUESTS {
                return;
            }
        }
        self.requests.insert(
            request_id.to_string(),
            Tried {
                keys: vec![key],
                first_ms: now_ms,
            },
        );
    }

    pub fn forget(&mut self, request_id: &str) {
        self.requests.remove(request_id);
    }

    pub fn purge(&mut self, now_ms: u64) {
        self.requests
            .retain(|_, t| now_ms.saturating_sub(t.first_ms) < TTL_MS);
    }

    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_failed_keys_per_request_and_forgets_old_ones() {
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
        a.purge(TTL_MS + 3);
        assert!(a.is_empty());
    }

    #[test]
    fn stays_bounded() {
        let mut a = Attempts::default();
        for i in 0..(MAX_REQUESTS + 50) {
            a.note_failure(&i.to_string(), (0, 0), 0);
        }
        assert_eq!(a.len(), MAX_REQUESTS);
        for k in 0..100 {
            a.note_failure("0", (0, k), 0);
        }
        assert_eq!(a.failed("0").len(), MAX_KEYS_PER_REQUEST);
    }
}
