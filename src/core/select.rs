//! Choosing a key for a request in O(1), whatever the pool size.
//!
//! A `PoolView` is derived from the pool state once, when the shared entry changes; each request
//! then indexes into it. The view lists the available keys and, for `weighted`, an alias table
//! over them (Vose), so a weighted pick is two random numbers and a comparison.

use crate::core::pool::{Health, KeyState, PoolState};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    RoundRobin,
    Random,
    Weighted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnAllUnavailable {
    /// Use the key whose cooldown ends first.
    Earliest,
    /// Answer locally with 429 and `retry-after`.
    Reject,
    /// Hold the request until a key returns, for up to `maxWaitMs`; then as `Reject`.
    Wait,
}

/// When every key is out for good, how long a rejected client is told to wait.
const RETRY_AFTER_WHEN_ALL_DISABLED_MS: u64 = 60_000;

/// xorshift64*: fast, small and good enough to spread load; not for secrets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..bound` (bound > 0), without modulo bias worth caring about at our sizes.
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

#[derive(Clone, Debug, Default)]
struct AliasTable {
    /// Per column: keep the column's own entry when a draw in `0..total` falls below this.
    threshold: Vec<u64>,
    alias: Vec<u32>,
    total: u64,
}

impl AliasTable {
    fn build(weights: &[u64]) -> Self {
        let n = weights.len() as u64;
        let total: u64 = weights.iter().sum();
        if n == 0 || total == 0 {
            return AliasTable::default();
        }
        // Column i holds weight w_i * n out of `total` per column.
        let mut scaled: Vec<u64> = weights.iter().map(|w| w * n).collect();
        let mut alias: Vec<u32> = (0..weights.len() as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..weights.len()).partition(|&i| scaled.get(i).is_some_and(|&s| s < total));
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            if let Some(slot) = alias.get_mut(s) {
                *slot = l as u32;
            }
            let deficit = total - scaled.get(s).copied().unwrap_or(total);
            if let Some(large_weight) = scaled.get_mut(l) {
                *large_weight = large_weight.saturating_sub(deficit);
                if *large_weight < total {
                    large.pop();
                    small.push(l);
                }
            }
        }
        // Whatever is left is full up to rounding.
        for i in large.into_iter().chain(small) {
            if let Some(v) = scaled.get_mut(i) {
                *v = total;
            }
        }
        AliasTable {
            threshold: scaled,
            alias,
            total,
        }
    }

    fn sample(&self, rng: &mut Rng) -> Option<usize> {
        let n = self.threshold.len() as u64;
        if n == 0 {
            return None;
        }
        let column = rng.below(n) as usize;
        let keep = *self.threshold.get(column)? > rng.below(self.total);
        if keep {
            Some(column)
        } else {
            self.alias.get(column).map(|&a| a as usize)
        }
    }
}

/// What a request needs to know about a pool, derived from its state.
#[derive(Clone, Debug, Default)]
pub struct PoolView {
    available: Vec<u32>,
    weighted: AliasTable,
    /// Keys whose time out is over and whose probe nobody holds.
    probe_candidates: Vec<u32>,
    /// The key `earliest` falls back to when nothing is available, and when it returns.
    earliest_down: Option<(usize, u64)>,
    next_change_ms: Option<u64>,
    /// `affinity`: the consistent-hash ring of the keys in rotation.
    affinity: Option<crate::core::affinity::Ring>,
}

/// How a key that is out comes back, best first: the order `earliest` falls back in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Return {
    /// Its time out ends at a known moment.
    ByItself,
    /// Its probe is out; it is back if the probe succeeds.
    WhenProbed,
    /// Refused until a health check or a new configuration.
    Never,
}

fn indices_where(state: &PoolState, keep: impl Fn(&KeyState) -> bool) -> Vec<u32> {
    state
        .keys
        .iter()
        .enumerate()
        .filter(|(_, k)| keep(k))
        .map(|(i, _)| i as u32)
        .collect()
}

impl PoolView {
    pub fn build(state: &PoolState, weights: &[u32], selection: Selection) -> Self {
        let available = indices_where(state, KeyState::is_available);
        let weighted = if selection == Selection::Weighted {
            let w: Vec<u64> = available
                .iter()
                .map(|&i| u64::from(weights.get(i as usize).copied().unwrap_or(1).max(1)))
                .collect();
            AliasTable::build(&w)
        } else {
            AliasTable::default()
        };
        let probe_candidates = indices_where(state, KeyState::probe_claimable);
        // Prefer the key whose time out ends first; then a key being probed; a key refused
        // for good never.
        let rank = |k: &KeyState| match k.health {
            Health::CoolingDown | Health::Spent => (Return::ByItself, k.down_until_ms),
            Health::Disabled if k.down_until_ms != crate::core::pool::FOREVER => {
                (Return::ByItself, k.down_until_ms)
            }
            Health::Probing => (Return::WhenProbed, k.probe_until_ms),
            _ => (Return::Never, u64::MAX),
        };
        let earliest_down = state
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| !k.is_available())
            .min_by_key(|(_, k)| rank(k))
            .map(|(i, k)| (i, rank(k)))
            .and_then(|(i, (ret, until))| (ret != Return::Never).then_some((i, until)));
        PoolView {
            available,
            weighted,
            probe_candidates,
            earliest_down,
            next_change_ms: state.next_change_ms(),
            affinity: None,
        }
    }

    /// Filters `full` (every configured key's ring) down to the keys `state` has in rotation.
    pub fn set_affinity(&mut self, full: &crate::core::affinity::Ring, state: &PoolState) {
        self.affinity = Some(full.only(|k| state.keys.get(k).is_some_and(KeyState::is_available)));
    }

    /// The key in rotation a session goes to, when affinity is on and any key is in rotation.
    pub fn session_key(&self, hash: u32) -> Option<usize> {
        self.affinity.as_ref()?.owner(hash)
    }

    pub fn available_count(&self) -> usize {
        self.available.len()
    }

    /// When some key's state next changes by itself (a time out or a probe claim ends).
    pub fn next_change_ms(&self) -> Option<u64> {
        self.next_change_ms
    }

    /// A key ready to be probed, if any.
    pub fn probe_candidate(&self) -> Option<usize> {
        self.probe_candidates.first().map(|&k| k as usize)
    }

    /// An available key that is not in `avoid` (keys this request already failed with), or None.
    /// `cursor` is this worker's round-robin position for the pool.
    pub fn pick_available(
        &self,
        selection: Selection,
        cursor: &mut u64,
        rng: &mut Rng,
        avoid: &[usize],
    ) -> Option<usize> {
        let n = self.available.len() as u64;
        if n == 0 {
            return None;
        }
        let slot = match selection {
            Selection::RoundRobin => {
                let slot = *cursor % n;
                *cursor = cursor.wrapping_add(1);
                Some(slot as usize)
            }
            Selection::Random => Some(rng.below(n) as usize),
            Selection::Weighted => self.weighted.sample(rng),
        }?;
        if avoid.is_empty() {
            return self.available.get(slot).map(|&k| k as usize);
        }
        // A short walk: `avoid` holds the few keys this request already tried.
        let len = self.available.len();
        (0..len)
            .filter_map(|step| self.available.get((slot + step) % len))
            .map(|&k| k as usize)
            .find(|k| !avoid.contains(k))
    }

    /// The key `earliest` falls back to when nothing is available, and when it returns.
    pub fn earliest_down(&self) -> Option<(usize, u64)> {
        self.earliest_down
    }

    /// How long a rejected client is told to wait.
    pub fn retry_after_ms(&self, now_ms: u64) -> u64 {
        self.next_change_ms
            .map_or(RETRY_AFTER_WHEN_ALL_DISABLED_MS, |t| {
                t.saturating_sub(now_ms)
            })
    }
}

/// A pool's `PoolView` together with what it is built from besides the state (weights, the
/// selection mode, the ring of every configured key): the engine keeps one per pool and
/// rebuilds it when the store reports that the pool's state changed, so a request reads
/// prebuilt tables.
pub struct PoolIndex {
    weights: Vec<u32>,
    selection: Selection,
    /// `affinity`: the ring of every configured key, built once; the view holds the ring of
    /// the keys in rotation, filtered from it whenever the view is rebuilt.
    ring: Option<crate::core::affinity::Ring>,
    view: PoolView,
}

impl PoolIndex {
    /// `affinity`: keep a session-affinity ring of the pool's keys (some profile sets it).
    pub fn new(state: &PoolState, weights: Vec<u32>, selection: Selection, affinity: bool) -> Self {
        let fingerprints: Vec<u64> = state.keys.iter().map(|k| k.fingerprint).collect();
        let ring = affinity.then(|| crate::core::affinity::Ring::build(&fingerprints, &weights));
        let mut index = PoolIndex {
            view: PoolView::build(state, &weights, selection),
            weights,
            selection,
            ring,
        };
        index.set_ring(state);
        index
    }

    /// After the pool's state changed.
    pub fn rebuild(&mut self, state: &PoolState) {
        self.view = PoolView::build(state, &self.weights, self.selection);
        self.set_ring(state);
    }

    fn set_ring(&mut self, state: &PoolState) {
        if let Some(ring) = &self.ring {
            self.view.set_affinity(ring, state);
        }
    }

    pub fn view(&self) -> &PoolView {
        &self.view
    }

    /// The ring of every configured key, when affinity is on.
    pub fn ring(&self) -> Option<&crate::core::affinity::Ring> {
        self.ring.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::test_fixtures::{ONE_SECOND as P, RATE_LIMITED as F};
    use crate::core::pool::Failure;
    use crate::core::status::FailureClass;

    fn picks(view: &PoolView, sel: Selection, n: usize, cursor: u64) -> Vec<usize> {
        let mut c = cursor;
        let mut rng = Rng::new(42);
        (0..n)
            .map(|_| {
                view.pick_available(sel, &mut c, &mut rng, &[])
                    .unwrap_or(usize::MAX)
            })
            .collect()
    }

    #[test]
    fn round_robin_cycles_over_available_keys_from_the_cursor() {
        let mut s = PoolState::fresh(&[1, 2, 3, 4]);
        let view = PoolView::build(&s, &[], Selection::RoundRobin);
        assert_eq!(picks(&view, Selection::RoundRobin, 5, 0), [0, 1, 2, 3, 0]);
        assert_eq!(picks(&view, Selection::RoundRobin, 3, 2), [2, 3, 0]);
        s.record_failure(1, &F, 0, &P);
        let view = PoolView::build(&s, &[], Selection::RoundRobin);
        assert_eq!(
            picks(&view, Selection::RoundRobin, 6, 0),
            [0, 2, 3, 0, 2, 3]
        );
    }

    #[test]
    fn random_spreads_over_available_keys_only() {
        let mut s = PoolState::fresh(&[1, 2, 3]);
        s.record_failure(0, &F, 0, &P);
        let view = PoolView::build(&s, &[], Selection::Random);
        let mut counts = [0usize; 3];
        for k in picks(&view, Selection::Random, 3000, 0) {
            counts[k] += 1;
        }
        assert_eq!(counts[0], 0);
        assert!(counts[1] > 1300 && counts[2] > 1300, "{counts:?}");
    }

    #[test]
    fn weighted_follows_weights_and_skips_down_keys() {
        let mut s = PoolState::fresh(&[1, 2, 3, 4]);
        let weights = [1, 3, 6, 5];
        s.record_failure(3, &F, 0, &P);
        let view = PoolView::build(&s, &weights, Selection::Weighted);
        let mut counts = [0usize; 4];
        for k in picks(&view, Selection::Weighted, 100_000, 0) {
            counts[k] += 1;
        }
        assert_eq!(counts[3], 0);
        for (i, expected) in [(0, 10_000.0), (1, 30_000.0), (2, 60_000.0)] {
            let got = counts[i] as f64;
            assert!(
                (got - expected).abs() < expected * 0.05,
                "key {i}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn alias_table_handles_equal_and_extreme_weights() {
        for weights in [
            vec![1u64],
            vec![5, 5, 5],
            vec![1, 1000],
            vec![1000, 1, 1, 1],
        ] {
            let table = AliasTable::build(&weights);
            let total: u64 = weights.iter().sum();
            let mut rng = Rng::new(7);
            let mut counts = vec![0u64; weights.len()];
            let draws = 200_000u64;
            for _ in 0..draws {
                counts[table.sample(&mut rng).unwrap()] += 1;
            }
            for (i, w) in weights.iter().enumerate() {
                let expected = draws as f64 * *w as f64 / total as f64;
                assert!(
                    (counts[i] as f64 - expected).abs() < expected * 0.1 + 200.0,
                    "{weights:?}: {counts:?}"
                );
            }
        }
    }

    /// What `Engine::decide` falls back on when no key is available: `earliest` takes
    /// `earliest_down`'s key, `reject` answers with `retry_after_ms`.
    #[test]
    fn all_down_names_the_earliest_key_and_the_wait() {
        let mut s = PoolState::fresh(&[1, 2]);
        s.record_failure(0, &F, 500, &P); // back at 1500
        s.record_failure(1, &F, 100, &P); // back at 1100
        let view = PoolView::build(&s, &[], Selection::RoundRobin);
        let (mut c, mut rng) = (0, Rng::new(1));
        assert_eq!(
            view.pick_available(Selection::RoundRobin, &mut c, &mut rng, &[]),
            None
        );
        assert_eq!(view.earliest_down(), Some((1, 1_100)));
        assert_eq!(view.retry_after_ms(600), 500);
    }

    #[test]
    fn rng_below_stays_in_range() {
        let mut rng = Rng::new(0);
        for bound in [1u64, 2, 3, 1000, u64::MAX] {
            for _ in 0..1000 {
                assert!(rng.below(bound) < bound);
            }
        }
    }

    #[test]
    fn probe_candidates_and_the_all_disabled_case() {
        let refused = Failure {
            status: 401,
            class: FailureClass::KeyRefused,
            ..F
        };
        let mut s = PoolState::fresh(&[1, 2]);
        s.record_failure(0, &F, 0, &P);
        s.record_failure(1, &refused, 0, &P);
        s.advance(1_000);
        let view = PoolView::build(&s, &[], Selection::RoundRobin);
        assert_eq!(view.probe_candidate(), Some(0));
        assert_eq!(view.next_change_ms(), None);
        s.claim_probe(0, 1_000, 500);
        let view = PoolView::build(&s, &[], Selection::RoundRobin);
        assert_eq!(view.probe_candidate(), None);
        let (mut c, mut rng) = (0, Rng::new(1));
        assert_eq!(
            view.pick_available(Selection::RoundRobin, &mut c, &mut rng, &[]),
            None
        );
        assert_eq!(
            view.earliest_down().map(|(key, _)| key),
            Some(0),
            "the probed key before a key refused for good"
        );
        assert_eq!(view.retry_after_ms(1_000), 500);
    }

    /// That a request which tried every key still gets one is `Engine::decide`'s second pass
    /// (`a_request_that_failed_with_every_key_still_gets_one`).
    #[test]
    fn keys_a_request_already_tried_are_skipped_while_another_is_available() {
        let s = PoolState::fresh(&[1, 2, 3]);
        let view = PoolView::build(&s, &[], Selection::RoundRobin);
        let mut rng = Rng::new(5);
        for start in 0..6u64 {
            let mut c = start;
            assert_eq!(
                view.pick_available(Selection::RoundRobin, &mut c, &mut rng, &[0, 1]),
                Some(2)
            );
            let pick = view.pick_available(Selection::Random, &mut c, &mut rng, &[2]);
            assert!(matches!(pick, Some(0 | 1)), "{pick:?}");
        }
        let mut c = 0;
        assert_eq!(
            view.pick_available(Selection::RoundRobin, &mut c, &mut rng, &[0, 1, 2]),
            None,
            "nothing left in this pass"
        );
    }
}
