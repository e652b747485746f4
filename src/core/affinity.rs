//! Session affinity (`affinity.header`): requests that carry the same header value get the
//! same key while that key is in rotation.
//!
//! A consistent-hash ring: each configured key owns points on a 32-bit circle, as many as its
//! weight asks for, and a session goes to the owner of the first point at or after its hash.
//! The ring of every configured key is built once per configuration; the ring of the keys in
//! rotation is filtered from it (no sort) each time the pool's state changes, beside the
//! `PoolView`. A request then costs one hash of the header value and a binary search: O(log n)
//! in the pool size. Taking a key out removes only its points, so only its sessions move, each
//! to the key after it on the circle; putting it back restores the same points, so they return.
//! Point positions depend only on the key's fingerprint, so a configuration change that keeps a
//! key keeps its sessions.

/// Points per unit of weight, when the pool is small enough: about 10% spread in a key's share.
const POINTS_PER_WEIGHT: u64 = 100;
/// Points in all, at most: 128 KiB per ring whatever the pool (8 bytes a point).
const MAX_POINTS: u64 = 16_384;

/// A sorted circle of points, each `position << 32 | key`: plain u64s sort with the code the
/// module already has, where a sort of pairs would add its own copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    points: Vec<u64>,
}

fn key_of(point: u64) -> usize {
    (point & 0xffff_ffff) as usize
}

/// splitmix64's finaliser: spreads nearby inputs over the whole range.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Where a session falls on the circle. FNV-1a over the raw header bytes (any bytes, UTF-8 or
/// not), then mixed: FNV alone clusters short, similar values such as `user-1`, `user-2`.
pub fn session_hash(value: &[u8]) -> u32 {
    (mix(crate::core::config::fnv1a64(value)) >> 32) as u32
}

impl Ring {
    /// The ring of every configured key: key i gets points in proportion to `weights[i]`.
    pub fn build(fingerprints: &[u64], weights: &[u32]) -> Ring {
        let weight = |i: usize| u64::from(weights.get(i).copied().unwrap_or(1).max(1));
        let total: u64 = (0..fingerprints.len()).map(weight).sum::<u64>().max(1);
        let mut points = Vec::new();
        for (i, &fp) in fingerprints.iter().enumerate() {
            let w = weight(i);
            let count = (w * POINTS_PER_WEIGHT).min(w * MAX_POINTS / total).max(1);
            points.extend((0..count).map(|replica| {
                let position = mix(fp ^ mix(replica.wrapping_add(1))) >> 32;
                position << 32 | (i as u64 & 0xffff_ffff)
            }));
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The ring of the keys `keep` says are in rotation: the same points, fewer of them.
    pub fn only(&self, keep: impl Fn(usize) -> bool) -> Ring {
        Ring {
            points: self
                .points
                .iter()
                .copied()
                .filter(|&point| keep(key_of(point)))
                .collect(),
        }
    }

    /// The key of the first point at or after `hash`, going round; None for an empty ring.
    pub fn owner(&self, hash: u32) -> Option<usize> {
        let at = self
            .points
            .partition_point(|&point| point >> 32 < u64::from(hash));
        self.points
            .get(at)
            .or_else(|| self.points.first())
            .map(|&point| key_of(point))
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::select::Rng;

    fn fingerprints(n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| crate::core::config::fnv1a64(format!("sk-{i}").as_bytes()))
            .collect()
    }

    fn sessions(n: usize) -> Vec<u32> {
        (0..n)
            .map(|i| session_hash(format!("session-{i}").as_bytes()))
            .collect()
    }

    #[test]
    fn the_same_value_always_gets_the_same_key_and_any_bytes_hash() {
        let ring = Ring::build(&fingerprints(5), &[1; 5]);
        for s in sessions(200) {
            assert_eq!(ring.owner(s), ring.owner(s));
        }
        assert_eq!(session_hash(b"abc"), session_hash(b"abc"));
        assert_ne!(session_hash(b"user-1"), session_hash(b"user-2"));
        let _ = session_hash(&[0xff, 0x00, 0xfe]);
        assert_eq!(Ring::default().owner(7), None);
    }

    #[test]
    fn a_key_going_out_moves_only_its_sessions_and_they_return_when_it_returns() {
        let n = 8;
        let full = Ring::build(&fingerprints(n), &vec![1; n]);
        let all = sessions(10_000);
        let home: Vec<usize> = all.iter().map(|&s| full.owner(s).unwrap()).collect();
        for out in 0..n {
            let without = full.only(|k| k != out);
            let mut moved_to = std::collections::HashSet::new();
            for (s, &h) in all.iter().zip(&home) {
                let now = without.owner(*s).unwrap();
                if h == out {
                    assert_ne!(now, out);
                    moved_to.insert(now);
                } else {
                    assert_eq!(now, h, "a session of another key moved");
                }
            }
            assert!(
                moved_to.len() > 1,
                "the spent key's sessions spread over several keys"
            );
            // Back in rotation, the key's ring is rebuilt from the full one: the same points.
            let restored = full.only(|_| true);
            assert_eq!(restored, full);
            assert!(all
                .iter()
                .zip(&home)
                .all(|(s, &h)| restored.owner(*s) == Some(h)));
        }
        // Two keys out: still only their sessions move.
        let without = full.only(|k| k != 2 && k != 5);
        for (s, &h) in all.iter().zip(&home) {
            if h != 2 && h != 5 {
                assert_eq!(without.owner(*s), Some(h));
            }
        }
    }

    #[test]
    fn sessions_spread_in_proportion_to_weights() {
        let weights = [1, 3, 6, 2];
        let ring = Ring::build(&fingerprints(4), &weights);
        let mut rng = Rng::new(42);
        let draws = 200_000;
        let mut counts = [0f64; 4];
        for _ in 0..draws {
            let value = rng.next_u64().to_le_bytes();
            counts[ring.owner(session_hash(&value)).unwrap()] += 1.0;
        }
        let total: u32 = weights.iter().sum();
        for (i, w) in weights.iter().enumerate() {
            let expected = f64::from(draws) * f64::from(*w) / f64::from(total);
            assert!(
                (counts[i] - expected).abs() < expected * 0.2,
                "key {i}: {} vs {expected} ({counts:?})",
                counts[i]
            );
        }
    }

    #[test]
    fn large_pools_stay_within_the_point_budget_and_every_key_has_a_point() {
        let n = 1_000;
        let ring = Ring::build(&fingerprints(n), &vec![1; n]);
        assert!(ring.len() as u64 <= MAX_POINTS);
        let weighted: Vec<u32> = (0..n as u32).map(|i| 1 + i % 1000).collect();
        let ring = Ring::build(&fingerprints(n), &weighted);
        assert!(ring.len() as u64 <= MAX_POINTS + n as u64);
        let owners: std::collections::HashSet<usize> =
            ring.points.iter().map(|&p| key_of(p)).collect();
        assert_eq!(owners.len(), n);
        assert_eq!(Ring::build(&fingerprints(2), &[1, 1]).len(), 200);
    }
}
