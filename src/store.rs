//! A pool's state in proxy shared data: a cached, decoded copy per VM, and the CAS loop that
//! changes it.
//!
//! Each pool has two entries: `state` (every key's record) and `epoch` (an empty value rewritten
//! after each change). A request reads only `epoch`; the host's CAS number on it moves with every
//! write, so `state` is read and decoded again only when something changed. This keeps the
//! per-request cost flat however many keys the pool has. The epoch is empty because a non-empty
//! value makes the host call back into the VM to allocate a copy on every read: that re-entry
//! is most of a read's cost.

use crate::codec;
use crate::pool::{Event, Health, KeyState, PoolState, FOREVER};
use crate::select::{PoolView, Selection};

/// Attempts before a change gives up; each failed attempt means another worker changed the
/// state in between, which is rare outside storms of failures.
pub const MAX_CAS_ATTEMPTS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Another writer changed the entry since we read it.
    CasMismatch,
    /// The host refused the call; the text is for logs.
    Host(String),
}

/// The two shared-data calls we need; implemented by the host glue, and by a map in tests.
pub trait SharedData {
    /// The value (None when absent) and its CAS number.
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    /// Writes only if the entry's CAS number is still `cas` (None: unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

#[derive(Debug, PartialEq, Eq)]
pub enum UpdateError {
    /// Every attempt met a concurrent change.
    GaveUp,
    Host(String),
}

pub struct PoolStore {
    pool_id: u64,
    state_key: String,
    epoch_key: String,
    fingerprints: Vec<u64>,
    weights: Vec<u32>,
    selection: Selection,
    /// The epoch's CAS number when `state` was last read (None: no epoch entry yet).
    seen_epoch: Option<u32>,
    /// Whether `state` is what the shared entry held at `seen_epoch`. Cleared by our own writes,
    /// since another write may land between ours and the next refresh.
    synced: bool,
    state: PoolState,
    view: PoolView,
    /// `affinity`: the ring of every configured key, built once; the view holds the ring of
    /// the keys in rotation, filtered from it whenever the view is rebuilt.
    ring: Option<crate::affinity::Ring>,
    /// Set when the stored entry could not be decoded, so the warning is logged once per VM.
    pub corrupt_entry_seen: bool,
}

pub fn entry_prefix(pool_id: u64) -> String {
    format!("ai-key-failover/v1/{pool_id:016x}")
}

/// Lists the pools configured so far (newest last), so a new config can take over the state of
/// keys it keeps from the pools it replaces.
pub const REGISTRY_KEY: &str = "ai-key-failover/v1/pools";
/// Older pools than this are forgotten by the registry; their keys start fresh if they return.
const REGISTRY_CAPACITY: usize = 64;

fn decode_registry(bytes: Option<&[u8]>) -> Vec<u64> {
    bytes
        .unwrap_or_default()
        .chunks_exact(8)
        .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
        .collect()
}

/// What happened to a pool's state when its config was loaded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CarryOver {
    /// Keys whose state came from a pool of an earlier config.
    pub keys_carried: usize,
    /// Keys that were disabled until the configuration changed, and now return.
    pub keys_reenabled: usize,
}

impl PoolStore {
    pub fn new(
        pool_id: u64,
        fingerprints: Vec<u64>,
        weights: Vec<u32>,
        selection: Selection,
    ) -> Self {
        let prefix = entry_prefix(pool_id);
        let state = PoolState::fresh(&fingerprints);
        let view = PoolView::build(&state, &weights, selection);
        PoolStore {
            pool_id,
            state_key: format!("{prefix}/state"),
            epoch_key: format!("{prefix}/epoch"),
            fingerprints,
            weights,
            selection,
            seen_epoch: None,
            synced: false,
            state,
            view,
            ring: None,
            corrupt_entry_seen: false,
        }
    }

    /// Keeps a session-affinity ring of this pool's keys (some profile sets `affinity`).
    pub fn with_affinity(mut self) -> Self {
        let ring = crate::affinity::Ring::build(&self.fingerprints, &self.weights);
        self.view.set_affinity(&ring, &self.state);
        self.ring = Some(ring);
        self
    }

    /// The ring of every configured key, when affinity is on.
    pub fn ring(&self) -> Option<&crate::affinity::Ring> {
        self.ring.as_ref()
    }

    pub fn state(&self) -> &PoolState {
        &self.state
    }

    pub fn view(&self) -> &PoolView {
        &self.view
    }

    /// On config load: takes over, for each of our keys, the newest state any earlier pool has
    /// of it (a key cooling down stays down), then records this pool in the registry.
    /// Keys no earlier pool knows start available; keys we no longer list are simply not taken.
    pub fn carry_over(
        &mut self,
        host: &dyn SharedData,
        now_ms: u64,
    ) -> Result<CarryOver, UpdateError> {
        let mut result = CarryOver::default();
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (registry_bytes, _) = host.get(REGISTRY_KEY).map_err(host_error)?;
            let registry = decode_registry(registry_bytes.as_deref());
            let (bytes, cas) = host.get(&self.state_key).map_err(host_error)?;
            let (mut state, _) = self.decode_or_fresh(bytes.as_deref());
            let own_written = if bytes.is_some() {
                state.written_at_ms
            } else {
                0
            };
            // Newest first, so the first record found for a key is the newest.
            let mut others: Vec<PoolState> = registry
                .iter()
                .filter(|&&id| id != self.pool_id)
                .filter_map(|&id| {
                    let (b, _) = host.get(&format!("{}/state", entry_prefix(id))).ok()?;
                    codec::decode(&b?).ok()
                })
                .filter(|other| other.written_at_ms > own_written)
                .collect();
            others.sort_by_key(|o| std::cmp::Reverse(o.written_at_ms));
            let mut carried = 0;
            for key in state.keys.iter_mut() {
                let newest = others
                    .iter()
                    .find_map(|o| o.keys.iter().find(|k| k.fingerprint == key.fingerprint));
                if let Some(record) = newest {
                    if record != key {
                        *key = record.clone();
                        carried += 1;
                    }
                }
            }
            // "Disabled until a health check passes or the configuration changes": it changed.
            let mut reenabled = 0;
            for key in state.keys.iter_mut() {
                if key.health == Health::Disabled && key.down_until_ms == FOREVER {
                    *key = KeyState::fresh(key.fingerprint);
                    reenabled += 1;
                }
            }
            result.keys_carried = carried;
            result.keys_reenabled = reenabled;
            if carried == 0 && reenabled == 0 {
                break;
            }
            state.written_at_ms = now_ms;
            match host.set(&self.state_key, &codec::encode(&state), cas) {
                Ok(()) => {
                    host.set(&self.epoch_key, &[], None).map_err(host_error)?;
                    self.adopt(state);
                    self.synced = false;
                    break;
                }
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Host(e)) => return Err(UpdateError::Host(e)),
            }
        }
        self.register(host)?;
        Ok(result)
    }

    fn register(&self, host: &dyn SharedData) -> Result<(), UpdateError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (bytes, cas) = host.get(REGISTRY_KEY).map_err(host_error)?;
            let mut ids = decode_registry(bytes.as_deref());
            if ids.last() == Some(&self.pool_id) {
                return Ok(());
            }
            ids.retain(|&id| id != self.pool_id);
            ids.push(self.pool_id);
            let excess = ids.len().saturating_sub(REGISTRY_CAPACITY);
            ids.drain(..excess);
            let encoded: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
            match host.set(REGISTRY_KEY, &encoded, cas) {
                Ok(()) => return Ok(()),
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Host(e)) => return Err(UpdateError::Host(e)),
            }
        }
        Err(UpdateError::GaveUp)
    }

    /// Takes or renews the pool's health-check lease for `owner`; false while another holds it.
    pub fn try_lead(&self, host: &dyn SharedData, owner: u64, now_ms: u64, lease_ms: u64) -> bool {
        let key = format!("{}/health-lease", self.prefix());
        let Ok((bytes, cas)) = host.get(&key) else {
            return false;
        };
        let current = bytes.as_deref().and_then(|b| {
            let owner = u64::from_le_bytes(b.get(0..8)?.try_into().ok()?);
            let until = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
            Some((owner, until))
        });
        if matches!(current, Some((holder, until)) if holder != owner && until > now_ms) {
            return false;
        }
        let mut value = owner.to_le_bytes().to_vec();
        value.extend_from_slice(&now_ms.saturating_add(lease_ms).to_le_bytes());
        host.set(&key, &value, cas).is_ok()
    }

    /// Where health checks go, as some worker learned it from live traffic.
    pub fn read_target(&self, host: &dyn SharedData) -> Option<(String, String)> {
        let (bytes, _) = host.get(&format!("{}/target", self.prefix())).ok()?;
        crate::health::decode_target(&bytes?)
    }

    pub fn write_target(&self, host: &dyn SharedData, cluster: &str, authority: &str) {
        let value = crate::health::encode_target(cluster, authority);
        let key = format!("{}/target", self.prefix());
        if host.get(&key).ok().and_then(|(b, _)| b).as_deref() != Some(value.as_slice()) {
            let _ = host.set(&key, &value, None);
        }
    }

    fn prefix(&self) -> String {
        entry_prefix(self.pool_id)
    }

    /// Makes the cached copy current: one small read, plus a full read only when it moved.
    pub fn refresh(&mut self, host: &dyn SharedData) -> Result<(), StoreError> {
        let (_, epoch) = host.get(&self.epoch_key)?;
        // A pool nobody has written yet has no epoch entry: that, too, is a version to cache.
        if self.synced && epoch == self.seen_epoch {
            return Ok(());
        }
        let (bytes, _) = host.get(&self.state_key)?;
        let (state, _) = self.decode_or_fresh(bytes.as_deref());
        self.adopt(state);
        self.seen_epoch = epoch;
        self.synced = true;
        Ok(())
    }

    /// Applies `change` to the current shared state with compare-and-swap, retrying on conflict.
    /// `change` runs on a fresh copy each attempt and returns the events it caused; no events
    /// means nothing to write.
    pub fn update(
        &mut self,
        host: &dyn SharedData,
        now_ms: u64,
        mut change: impl FnMut(&mut PoolState) -> Vec<Event>,
    ) -> Result<Vec<Event>, UpdateError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (bytes, cas) = host.get(&self.state_key).map_err(host_error)?;
            let (mut state, stored_as_is) = self.decode_or_fresh(bytes.as_deref());
            let events = change(&mut state);
            if events.is_empty() && stored_as_is {
                self.adopt(state);
                return Ok(events);
            }
            state.written_at_ms = now_ms;
            match host.set(&self.state_key, &codec::encode(&state), cas) {
                Ok(()) => {
                    // Only the epoch's CAS number is the signal; see the module comment.
                    host.set(&self.epoch_key, &[], None).map_err(host_error)?;
                    self.adopt(state);
                    // Another write may land between ours and the next refresh: read again then.
                    self.synced = false;
                    return Ok(events);
                }
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Host(e)) => return Err(UpdateError::Host(e)),
            }
        }
        Err(UpdateError::GaveUp)
    }

    /// The stored state laid over our keys, and whether the stored bytes already say exactly that.
    fn decode_or_fresh(&mut self, bytes: Option<&[u8]>) -> (PoolState, bool) {
        match bytes.map(codec::decode) {
            None => (PoolState::fresh(&self.fingerprints), false),
            Some(Ok(stored)) => {
                let (state, changed) = PoolState::reconcile(stored, &self.fingerprints);
                (state, !changed)
            }
            Some(Err(e)) => {
                if !self.corrupt_entry_seen {
                    log::warn!(
                        "shared state entry {} could not be decoded ({e}); starting from fresh state",
                        self.state_key
                    );
                    self.corrupt_entry_seen = true;
                }
                (PoolState::fresh(&self.fingerprints), false)
            }
        }
    }

    fn adopt(&mut self, state: PoolState) {
        if state != self.state {
            self.view = PoolView::build(&state, &self.weights, self.selection);
            if let Some(ring) = &self.ring {
                self.view.set_affinity(ring, &state);
            }
            self.state = state;
        }
    }
}

fn host_error(e: StoreError) -> UpdateError {
    match e {
        StoreError::CasMismatch => UpdateError::GaveUp,
        StoreError::Host(h) => UpdateError::Host(h),
    }
}

#[cfg(test)]
pub mod fake {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    pub type WriteHook = Box<dyn FnMut(&FakeShared, &str)>;

    /// Proxy shared data as Envoy implements it: every write bumps the CAS number; a CAS write
    /// to an absent key succeeds.
    #[derive(Default)]
    pub struct FakeShared {
        pub entries: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        pub gets: Cell<usize>,
        pub sets: Cell<usize>,
        /// Called before each write: lets a test play a competing worker.
        pub before_set: RefCell<Option<WriteHook>>,
    }

    impl FakeShared {
        pub fn put_raw(&self, key: &str, value: &[u8]) {
            let mut entries = self.entries.borrow_mut();
            let cas = entries.get(key).map_or(0, |e| e.1) + 1;
            entries.insert(key.to_string(), (value.to_vec(), cas));
        }
    }

    impl SharedData for FakeShared {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            self.gets.set(self.gets.get() + 1);
            Ok(match self.entries.borrow().get(key) {
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
                None => (None, None),
            })
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            let hook = self.before_set.borrow_mut().take();
            if let Some(mut hook) = hook {
                hook(self, key);
                *self.before_set.borrow_mut() = Some(hook);
            }
            self.sets.set(self.sets.get() + 1);
            let mut entries = self.entries.borrow_mut();
            let current = entries.get(key).map(|e| e.1);
            if let (Some(want), Some(have)) = (cas, current) {
                if want != 0 && want != have {
                    return Err(StoreError::CasMismatch);
                }
            }
            entries.insert(key.to_string(), (value.to_vec(), current.unwrap_or(0) + 1));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeShared;
    use super::*;
    use crate::pool::Policy;
    use std::cell::{Cell, RefCell};

    const P: Policy = Policy {
        failure_threshold: 1,
        cooldown_ms: 1_000,
        backoff_permille: 1_000,
        min_cooldown_ms: 1,
        max_cooldown_ms: 1_000_000,
        disable_ms: 0,
    };

    fn fail(status: u16) -> crate::pool::Failure {
        crate::pool::Failure {
            status,
            class: crate::status::FailureClass::RateLimit,
            hint_ms: None,
            jitter_permille: 0,
        }
    }

    fn store(fps: &[u64]) -> PoolStore {
        PoolStore::new(9, fps.to_vec(), vec![1; fps.len()], Selection::RoundRobin)
    }

    #[test]
    fn a_change_on_one_worker_is_seen_by_another_on_its_next_refresh() {
        let host = FakeShared::default();
        let mut a = store(&[1, 2]);
        let mut b = store(&[1, 2]);
        a.refresh(&host).unwrap();
        b.refresh(&host).unwrap();
        let ev = a
            .update(&host, 0, |s| {
                s.record_failure(0, &fail(429), 0, &P).into_iter().collect()
            })
            .unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(b.view().available_count(), 2);
        b.refresh(&host).unwrap();
        assert_eq!(b.view().available_count(), 1);
        assert_eq!(b.state().keys[0].health, Health::CoolingDown);
    }

    #[test]
    fn refresh_reads_the_full_state_only_when_the_epoch_moved() {
        let host = FakeShared::default();
        let mut a = store(&[1, 2]);
        a.update(&host, 0, |s| {
            s.record_failure(1, &fail(500), 0, &P).into_iter().collect()
        })
        .unwrap();
        a.refresh(&host).unwrap();
        let gets = host.gets.get();
        for _ in 0..10 {
            a.refresh(&host).unwrap();
        }
        assert_eq!(
            host.gets.get() - gets,
            10,
            "one epoch read per refresh, no state read"
        );
    }

    #[test]
    fn no_events_means_no_write() {
        let host = FakeShared::default();
        let mut a = store(&[1]);
        a.update(&host, 0, |s| {
            s.record_failure(0, &fail(429), 0, &P).into_iter().collect()
        })
        .unwrap();
        let sets = host.sets.get();
        let ev = a.update(&host, 0, |_| Vec::new()).unwrap();
        assert!(ev.is_empty());
        assert_eq!(host.sets.get(), sets);
    }

    #[test]
    fn a_competing_write_is_retried_on_the_newer_state_and_nothing_is_lost() {
        let host = FakeShared::default();
        let mut a = store(&[1, 2]);
        let mut other = store(&[1, 2]);
        a.update(&host, 0, |_| Vec::new()).unwrap();
        // The other worker marks key 1 down between our read and our write, once.
        let fired = std::rc::Rc::new(Cell::new(false));
        let f = fired.clone();
        let other_state = std::rc::Rc::new(RefCell::new(None));
        let os = other_state.clone();
        *host.before_set.borrow_mut() = Some(Box::new(move |h: &FakeShared, key: &str| {
            if !f.get() && key.ends_with("/state") {
                f.set(true);
                let mut s = codec::decode(&h.entries.borrow()[key].0).unwrap_or_default();
                s.record_failure(1, &fail(429), 0, &P);
                *os.borrow_mut() = Some(s.clone());
                h.put_raw(key, &codec::encode(&s));
            }
        }));
        let ev = a
            .update(&host, 0, |s| {
                s.record_failure(0, &fail(429), 0, &P).into_iter().collect()
            })
            .unwrap();
        assert_eq!(ev.len(), 1);
        *host.before_set.borrow_mut() = None;
        other.refresh(&host).unwrap();
        assert_eq!(
            other.view().available_count(),
            0,
            "both mark-downs survived"
        );
        assert!(other_state.borrow().is_some());
    }

    #[test]
    fn gives_up_after_bounded_attempts_when_every_write_conflicts() {
        let host = FakeShared::default();
        let mut a = store(&[1]);
        *host.before_set.borrow_mut() = Some(Box::new(|h: &FakeShared, key: &str| {
            if key.ends_with("/state") {
                let v = h
                    .entries
                    .borrow()
                    .get(key)
                    .map(|e| e.0.clone())
                    .unwrap_or_default();
                h.put_raw(key, &v);
            }
        }));
        host.put_raw(
            &format!("{}/state", entry_prefix(9)),
            &codec::encode(&PoolState::fresh(&[1])),
        );
        let r = a.update(&host, 0, |s| {
            s.record_failure(0, &fail(429), 0, &P).into_iter().collect()
        });
        assert_eq!(r, Err(UpdateError::GaveUp));
    }

    #[test]
    fn corrupt_entries_are_replaced_by_fresh_state() {
        let host = FakeShared::default();
        let key = format!("{}/state", entry_prefix(9));
        host.put_raw(&key, b"garbage from an older version");
        host.put_raw(&format!("{}/epoch", entry_prefix(9)), &[1]);
        let mut a = store(&[1, 2]);
        a.refresh(&host).unwrap();
        assert!(a.corrupt_entry_seen);
        assert_eq!(a.view().available_count(), 2);
        a.update(&host, 0, |s| {
            s.record_failure(0, &fail(429), 0, &P).into_iter().collect()
        })
        .unwrap();
        let stored = codec::decode(&host.entries.borrow()[&key].0).unwrap();
        assert_eq!(stored.keys.len(), 2);
    }

    #[test]
    fn a_stored_state_from_another_key_list_is_reconciled_and_rewritten() {
        let host = FakeShared::default();
        let mut old = store(&[1, 2]);
        old.update(&host, 0, |s| {
            s.record_failure(1, &fail(429), 0, &P).into_iter().collect()
        })
        .unwrap();
        let mut new = store(&[2, 3]);
        new.refresh(&host).unwrap();
        assert_eq!(
            new.state().keys[0].health,
            Health::CoolingDown,
            "key 2 keeps its state"
        );
        assert_eq!(new.state().keys[1].health, Health::Available);
        new.update(&host, 0, |_| Vec::new()).unwrap();
        let stored =
            codec::decode(&host.entries.borrow()[&format!("{}/state", entry_prefix(9))].0).unwrap();
        assert_eq!(
            stored
                .keys
                .iter()
                .map(|k| k.fingerprint)
                .collect::<Vec<_>>(),
            [2, 3]
        );
    }

    #[test]
    fn a_new_pool_takes_over_the_newest_state_of_keys_it_keeps() {
        let host = FakeShared::default();
        // Config A: keys 1, 2, 3; key 2 is cooling down.
        let mut a = PoolStore::new(100, vec![1, 2, 3], vec![1; 3], Selection::RoundRobin);
        assert_eq!(a.carry_over(&host, 10).unwrap(), CarryOver::default());
        a.update(&host, 20, |s| {
            s.record_failure(1, &fail(429), 20, &P)
                .into_iter()
                .collect()
        })
        .unwrap();
        // Config B drops key 3 and adds key 4: another key list, another pool id.
        let mut b = PoolStore::new(200, vec![4, 2, 1], vec![1; 3], Selection::RoundRobin);
        assert_eq!(b.carry_over(&host, 30).unwrap().keys_carried, 1);
        b.refresh(&host).unwrap();
        assert_eq!(
            b.state().keys[0],
            crate::pool::KeyState::fresh(4),
            "a new key starts available"
        );
        assert_eq!(
            b.state().keys[1].health,
            Health::CoolingDown,
            "key 2 stays down"
        );
        assert_eq!(b.state().keys[1].down_until_ms, 1_020);
        assert_eq!(b.view().available_count(), 2);
        // Back to config A: B's newer word on key 2 (restored there) wins over A's stale entry.
        b.update(&host, 2_000, |s| {
            s.restore_all();
            vec![Event::Restored { key: 1 }]
        })
        .unwrap();
        let mut a2 = PoolStore::new(100, vec![1, 2, 3], vec![1; 3], Selection::RoundRobin);
        assert_eq!(a2.carry_over(&host, 2_100).unwrap().keys_carried, 1);
        a2.refresh(&host).unwrap();
        assert_eq!(a2.view().available_count(), 3);
        let registry = decode_registry(
            host.entries
                .borrow()
                .get(REGISTRY_KEY)
                .map(|e| e.0.as_slice()),
        );
        assert_eq!(registry, vec![200, 100]);
    }

    #[test]
    fn carry_over_is_a_no_op_when_nothing_is_newer() {
        let host = FakeShared::default();
        let mut a = PoolStore::new(100, vec![1], vec![1], Selection::RoundRobin);
        a.carry_over(&host, 0).unwrap();
        let sets = host.sets.get();
        let mut a_again = PoolStore::new(100, vec![1], vec![1], Selection::RoundRobin);
        a_again.carry_over(&host, 5).unwrap();
        assert_eq!(
            host.sets.get(),
            sets,
            "no write when the registry already ends with us"
        );
    }

    #[test]
    fn a_config_load_brings_back_keys_disabled_until_the_config_changes() {
        let host = FakeShared::default();
        let mut a = PoolStore::new(7, vec![1, 2], vec![1; 2], Selection::RoundRobin);
        a.carry_over(&host, 0).unwrap();
        let forever = Policy { disable_ms: 0, ..P };
        let refused = crate::pool::Failure {
            class: crate::status::FailureClass::KeyRefused,
            ..fail(401)
        };
        a.update(&host, 10, |s| {
            s.record_failure(0, &refused, 10, &forever)
                .into_iter()
                .collect()
        })
        .unwrap();
        a.update(&host, 10, |s| {
            s.record_failure(
                1,
                &refused,
                10,
                &Policy {
                    disable_ms: 60_000,
                    ..P
                },
            )
            .into_iter()
            .collect()
        })
        .unwrap();
        let mut again = PoolStore::new(7, vec![1, 2], vec![1; 2], Selection::RoundRobin);
        let result = again.carry_over(&host, 20).unwrap();
        assert_eq!(result.keys_reenabled, 1);
        again.refresh(&host).unwrap();
        assert!(again.state().keys[0].is_available());
        assert_eq!(
            again.state().keys[1].health,
            Health::Disabled,
            "a timed disable runs its course"
        );
    }

    #[test]
    fn one_owner_holds_the_lease_until_it_lapses() {
        let host = FakeShared::default();
        let s = store(&[1]);
        assert!(s.try_lead(&host, 1, 0, 3_000));
        assert!(!s.try_lead(&host, 2, 1_000, 3_000), "held by 1");
        assert!(s.try_lead(&host, 1, 2_000, 3_000), "1 renews");
        assert!(!s.try_lead(&host, 2, 4_999, 3_000));
        assert!(s.try_lead(&host, 2, 5_000, 3_000), "1 stopped renewing");
        assert!(!s.try_lead(&host, 1, 5_001, 3_000));
    }

    #[test]
    fn the_target_is_written_once_and_read_back() {
        let host = FakeShared::default();
        let s = store(&[1]);
        assert_eq!(s.read_target(&host), None);
        s.write_target(&host, "c", "a.example");
        let sets = host.sets.get();
        s.write_target(&host, "c", "a.example");
        assert_eq!(host.sets.get(), sets);
        assert_eq!(s.read_target(&host), Some(("c".into(), "a.example".into())));
    }

    #[test]
    fn a_pool_nobody_wrote_yet_is_read_once_not_on_every_refresh() {
        let host = FakeShared::default();
        let mut a = store(&[1, 2]);
        a.refresh(&host).unwrap();
        let gets = host.gets.get();
        for _ in 0..10 {
            a.refresh(&host).unwrap();
        }
        assert_eq!(
            host.gets.get() - gets,
            10,
            "one epoch read per refresh, no state read"
        );
        let mut b = store(&[1, 2]);
        b.update(&host, 0, |s| {
            s.record_failure(0, &fail(429), 0, &P).into_iter().collect()
        })
        .unwrap();
        a.refresh(&host).unwrap();
        assert_eq!(a.view().available_count(), 1, "a write is still seen");
    }
}
