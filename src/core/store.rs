//! A pool's state in proxy shared data: a cached, decoded copy per VM, and the CAS loop that
//! changes it.
//!
//! Each pool has four entries (named, and their bytes laid out, in `schema`): `state` (every
//! key's record), `epoch` (an empty value rewritten after each change), `health-lease` and
//! `target`. A request reads only `epoch`; the host's CAS number on it moves with every write,
//! so `state` is read and decoded again only when something changed. This keeps the per-request
//! cost flat however many keys the pool has. The epoch is empty because a non-empty value makes
//! the host call back into the VM to allocate a copy on every read: that re-entry is most of a
//! read's cost.
//!
//! The store keeps the state and nothing derived from it: `refresh` and `update` say whether the
//! cached copy changed (`StateChange`), and the engine rebuilds its selection tables
//! (`select::PoolIndex`) when it did.
//!
//! Envoy writes an absent entry whatever CAS number comes with the write, so the first write of
//! an entry is where two workers can lose one another's change. Every entry is created on config
//! load (`carry_over`), and a write to an entry found absent carries `CREATE_CAS`, which Envoy
//! refuses once someone else has created it: the loser re-reads and retries on what the winner
//! wrote, like any other conflict.
//!
//! The key space carries the format version (`schema::VERSION`). During an upgrade the previous
//! build, still serving draining connections under the same `vm_id`, keeps its own entries
//! (`previous`), which this build reads once on load and never writes.

use crate::core::pool::{Event, Health, KeyState, PoolState, FOREVER};
use crate::core::schema::{self, previous, DecodeError, Lease, PoolKeys, REGISTRY_KEY};

/// Envoy's rule for a shared-data write with `cas` to an entry whose CAS number is `current`
/// (None: the entry does not exist): no CAS, or 0, writes unconditionally; a write to an absent
/// entry succeeds whatever its CAS; otherwise the numbers must match.
fn cas_admits(cas: Option<u32>, current: Option<u32>) -> bool {
    match (cas, current) {
        (Some(want), Some(have)) => want == 0 || want == have,
        _ => true,
    }
}

/// Proxy shared data as Envoy keeps it, as a plain map: every write takes the next number of
/// one process-wide CAS counter; a write is admitted by `cas_admits`; a removal stores an empty
/// value, which a later get returns as `(None, Some(cas))`. The native host keeps the process's
/// shared data in one (behind a lock); tests use one as the host's.
#[derive(Debug, Default)]
pub struct CasMap {
    entries: std::collections::BTreeMap<String, (Vec<u8>, u32)>,
    last_cas: u32,
}

impl CasMap {
    pub const fn new() -> Self {
        CasMap {
            entries: std::collections::BTreeMap::new(),
            last_cas: 0,
        }
    }

    pub fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.entries.get(key) {
            Some((value, cas)) => ((!value.is_empty()).then(|| value.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    pub fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        if !cas_admits(cas, self.entries.get(key).map(|e| e.1)) {
            return Err(StoreError::CasMismatch);
        }
        // Envoy's counter starts at 1 and never hands out 0, which means "no CAS".
        self.last_cas = self.last_cas.wrapping_add(1).max(1);
        self.entries
            .insert(key.to_string(), (value.to_vec(), self.last_cas));
        Ok(())
    }

    /// Every entry's name, removed ones included (they still exist for CAS).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
}

/// Attempts before a change gives up; each failed attempt means another worker changed the
/// state in between, which is rare outside storms of failures.
pub const MAX_CAS_ATTEMPTS: usize = 16;

/// The CAS number of a write to an entry that was absent when read. Envoy lets a CAS write to an
/// absent key through whatever its number, and refuses it once the key exists with another
/// number, so of two workers creating the same entry one wins and the other re-reads. Envoy
/// numbers writes from one process-wide counter starting at 1, so an existing entry carries this
/// number only if it was the 4,294,967,295th write to shared data since Envoy started: that is
/// the window that remains.
pub const CREATE_CAS: u32 = u32::MAX;

fn cas_for(cas: Option<u32>) -> Option<u32> {
    Some(cas.unwrap_or(CREATE_CAS))
}

/// Envoy's removal leaves the entry in place, empty: an empty value is no value.
fn present(bytes: Option<Vec<u8>>) -> Option<Vec<u8>> {
    bytes.filter(|b| !b.is_empty())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Another writer changed the entry since we read it.
    CasMismatch,
    /// The host refused the call; the text is for logs.
    Host(String),
}

/// The two shared-data calls we need; implemented by each host, and by a map in tests.
pub trait SharedData {
    /// The value (None when absent or removed) and its CAS number (None when absent).
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    /// Writes only if the entry's CAS number is still `cas` (None or 0: unconditionally; an
    /// absent entry: whatever `cas` is).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

#[derive(Debug, PartialEq, Eq)]
pub enum UpdateError {
    /// Every attempt met a concurrent change.
    GaveUp,
    Host(String),
}

/// Whether the cached copy of a pool's state changed: what views derived from it
/// (`select::PoolIndex`) are rebuilt on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange {
    Changed,
    Unchanged,
}

/// What an `update` did: the events its change caused, and whether the cached copy changed
/// (it may change with no event, when another worker's write was read).
#[derive(Debug, PartialEq, Eq)]
pub struct Updated {
    pub events: Vec<Event>,
    pub state: StateChange,
}

pub struct PoolStore {
    pool_id: u64,
    keys: PoolKeys,
    fingerprints: Vec<u64>,
    /// The epoch's CAS number when `state` was last read (None: no epoch entry yet).
    seen_epoch: Option<u32>,
    /// Whether `state` is what the shared entry held at `seen_epoch`. Cleared by our own writes,
    /// since another write may land between ours and the next refresh.
    synced: bool,
    state: PoolState,
    /// Set when the stored entry could not be decoded, so the warning is logged once per VM.
    pub corrupt_entry_seen: bool,
    /// Set when the stored entry is a newer build's, so that warning too is logged once per VM.
    pub newer_entry_seen: bool,
    /// Reads of an entry of this pool that did not decode, since `take_decode_failures`.
    decode_failures: u64,
}

/// Older pools than this are forgotten by the registry and their entries cleared; their keys
/// start fresh if they return. A configuration with more pools keeps all of its own.
pub const REGISTRY_CAPACITY: usize = 64;

/// Records a configuration's pools in the registry (newest last) after they have carried over
/// the earlier pools' state, and clears every entry of the pools this pushes out of it.
/// Returns the pools cleared. Only the worker whose registry write lands clears anything.
pub fn register(host: &dyn SharedData, pool_ids: &[u64]) -> Result<Vec<u64>, UpdateError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = host.get(REGISTRY_KEY).map_err(host_error)?;
        let mut ids = schema::decode_registry(bytes.as_deref());
        if ids.ends_with(pool_ids) {
            return Ok(Vec::new());
        }
        ids.retain(|id| !pool_ids.contains(id));
        ids.extend_from_slice(pool_ids);
        let excess = ids
            .len()
            .saturating_sub(REGISTRY_CAPACITY.max(pool_ids.len()));
        let evicted: Vec<u64> = ids.drain(..excess).collect();
        match host.set(REGISTRY_KEY, &schema::encode_registry(&ids), cas_for(cas)) {
            Ok(()) => {
                for &id in &evicted {
                    clear_pool(host, id);
                }
                return Ok(evicted);
            }
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Host(e)) => return Err(UpdateError::Host(e)),
        }
    }
    Err(UpdateError::GaveUp)
}

/// Empties a forgotten pool's entries, as Envoy's own removal would: the names stay, the
/// values (a state entry holds a record per key) go.
fn clear_pool(host: &dyn SharedData, pool_id: u64) {
    for key in PoolKeys::of(pool_id).all() {
        if let Err(e) = host.set(key, &[], None) {
            log::debug!("clearing {key} failed: {e:?}");
        }
    }
}

/// Creates an entry empty unless someone has; losing that race to another creator is fine.
fn create_empty(host: &dyn SharedData, key: &str) -> Result<(), StoreError> {
    let (_, cas) = host.get(key)?;
    if cas.is_some() {
        return Ok(());
    }
    match host.set(key, &[], Some(CREATE_CAS)) {
        Ok(()) | Err(StoreError::CasMismatch) => Ok(()),
        Err(e) => Err(e),
    }
}

/// What happened to a pool's state when its config was loaded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CarryOver {
    /// Keys whose state came from a pool of an earlier config or the previous build.
    pub keys_carried: usize,
    /// Keys that were disabled until the configuration changed, and now return.
    pub keys_reenabled: usize,
}

/// A stored `state` entry as this build sees it.
enum Stored {
    /// Absent, removed, or not decodable: this build starts the pool fresh and may replace it.
    Fresh(PoolState),
    /// Decoded and laid over our keys; `as_is` when the stored bytes already say exactly that.
    Current { state: PoolState, as_is: bool },
    /// A newer build's: left as it is.
    Newer,
}

impl PoolStore {
    pub fn new(pool_id: u64, fingerprints: Vec<u64>) -> Self {
        PoolStore {
            pool_id,
            keys: PoolKeys::of(pool_id),
            state: PoolState::fresh(&fingerprints),
            fingerprints,
            seen_epoch: None,
            synced: false,
            corrupt_entry_seen: false,
            newer_entry_seen: false,
            decode_failures: 0,
        }
    }

    pub fn pool_id(&self) -> u64 {
        self.pool_id
    }

    pub fn state(&self) -> &PoolState {
        &self.state
    }

    /// Reads of this pool's entries that failed to decode since the last call (for the stat).
    pub fn take_decode_failures(&mut self) -> u64 {
        std::mem::take(&mut self.decode_failures)
    }

    /// On config load: takes over, for each of our keys, the newest state any earlier pool or
    /// the previous build has of it (a key cooling down stays down), and creates every entry
    /// of the pool that does not exist yet, so every later change is a real compare-and-swap.
    /// Keys nobody knows start available; keys we no longer list are simply not taken.
    /// `Err(GaveUp)` when every attempt met a concurrent change: nothing was carried over.
    pub fn carry_over(
        &mut self,
        host: &dyn SharedData,
        now_ms: u64,
    ) -> Result<CarryOver, UpdateError> {
        let earlier = self.earlier_states(host)?;
        let mut result = CarryOver::default();
        let (landed, _) = self.cas_change(host, now_ms, &mut |state| {
            // Fresh state was written at 0: anything anyone stored is newer.
            let own_written = state.written_at_ms;
            let mut carried = 0;
            for key in state.keys.iter_mut() {
                // `earlier` is newest first, so the first record found for a key is the newest.
                let newest = earlier
                    .iter()
                    .filter(|other| other.written_at_ms > own_written)
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
            result = CarryOver {
                keys_carried: carried,
                keys_reenabled: reenabled,
            };
            carried > 0 || reenabled > 0
        })?;
        // A newer build's pool: not ours to create entries in either.
        if landed != Landed::LocalOnly {
            self.create_side_entries(host);
        }
        Ok(result)
    }

    /// The other pools' states in the registry and the previous build's states, newest first.
    fn earlier_states(&self, host: &dyn SharedData) -> Result<Vec<PoolState>, UpdateError> {
        let (registry, _) = host.get(REGISTRY_KEY).map_err(host_error)?;
        let (previous_registry, _) = host.get(previous::REGISTRY_KEY).map_err(host_error)?;
        let mut previous_ids = schema::decode_registry(previous_registry.as_deref());
        if !previous_ids.contains(&self.pool_id) {
            previous_ids.push(self.pool_id);
        }
        let current = schema::decode_registry(registry.as_deref())
            .into_iter()
            .filter(|&id| id != self.pool_id)
            .map(|id| (PoolKeys::of(id).state, schema::decode_state as Decoder));
        let older = previous_ids.into_iter().map(|id| {
            (
                previous::state_key(id),
                schema::decode_previous_state as Decoder,
            )
        });
        let mut states: Vec<PoolState> = current
            .chain(older)
            .filter_map(|(key, decode)| {
                let (bytes, _) = host.get(&key).ok()?;
                match decode(&present(bytes)?) {
                    Ok(state) => Some(state),
                    Err(e) => {
                        log::debug!("earlier state entry {key} not used: {e}");
                        None
                    }
                }
            })
            .collect();
        states.sort_by_key(|o| std::cmp::Reverse(o.written_at_ms));
        Ok(states)
    }

    /// Best effort: an entry left absent is still written with `CREATE_CAS` later.
    fn create_side_entries(&self, host: &dyn SharedData) {
        for key in [&self.keys.epoch, &self.keys.lease, &self.keys.target] {
            if let Err(e) = create_empty(host, key) {
                log::debug!("creating {key} failed: {e:?}");
            }
        }
    }

    /// Takes or renews the pool's health-check lease for `owner`; false while another holds it.
    pub fn try_lead(&self, host: &dyn SharedData, owner: u64, now_ms: u64, lease_ms: u64) -> bool {
        let Ok((bytes, cas)) = host.get(&self.keys.lease) else {
            return false;
        };
        let current = bytes.as_deref().and_then(schema::decode_lease);
        if matches!(current, Some(held) if held.owner != owner && held.until_ms > now_ms) {
            return false;
        }
        let value = schema::encode_lease(Lease {
            owner,
            until_ms: now_ms.saturating_add(lease_ms),
        });
        host.set(&self.keys.lease, &value, cas_for(cas)).is_ok()
    }

    /// Where health checks go, as some worker learned it from live traffic.
    pub fn read_target(&self, host: &dyn SharedData) -> Option<(String, String)> {
        let (bytes, _) = host.get(&self.keys.target).ok()?;
        schema::decode_target(&present(bytes)?)
    }

    pub fn write_target(&self, host: &dyn SharedData, cluster: &str, authority: &str) {
        let value = schema::encode_target(cluster, authority);
        let Ok((bytes, cas)) = host.get(&self.keys.target) else {
            return;
        };
        if bytes.as_deref() != Some(value.as_slice()) {
            // A conflict means another worker just stored what it learned: that will do.
            let _ = host.set(&self.keys.target, &value, cas_for(cas));
        }
    }

    /// Makes the cached copy current: one small read, plus a full read only when it moved.
    pub fn refresh(&mut self, host: &dyn SharedData) -> Result<StateChange, StoreError> {
        let (_, epoch) = host.get(&self.keys.epoch)?;
        // A pool nobody has written yet has no epoch entry: that, too, is a version to cache.
        if self.synced && epoch == self.seen_epoch {
            return Ok(StateChange::Unchanged);
        }
        let (bytes, _) = host.get(&self.keys.state)?;
        let change = match self.read_stored(bytes.as_deref()) {
            Stored::Fresh(state) | Stored::Current { state, .. } => self.adopt(state),
            // A newer build's entry says nothing we can read: keep what this VM knows.
            Stored::Newer => StateChange::Unchanged,
        };
        self.seen_epoch = epoch;
        self.synced = true;
        Ok(change)
    }

    /// Applies `change` to the current shared state with compare-and-swap, retrying on conflict.
    /// `change` runs on a fresh copy each attempt and returns the events it caused; no events
    /// means nothing to write. A newer build's entry is not written: the change applies to this
    /// VM's copy only.
    pub fn update(
        &mut self,
        host: &dyn SharedData,
        now_ms: u64,
        mut change: impl FnMut(&mut PoolState) -> Vec<Event>,
    ) -> Result<Updated, UpdateError> {
        let mut events = Vec::new();
        let (_, state) = self.cas_change(host, now_ms, &mut |s| {
            events = change(s);
            !events.is_empty()
        })?;
        Ok(Updated { events, state })
    }

    /// The CAS loop of `update` and `carry_over`. Each attempt reads `state` and lets `change`
    /// work on the copy read; it says whether it changed anything (and keeps its own account of
    /// what, the last attempt's being the one that counts). When it did not and the stored bytes
    /// already say so, nothing is written; otherwise the copy is written with the CAS number
    /// read, then the epoch (only its CAS number is the signal: see the module comment). A
    /// conflict starts the next attempt; a newer build's entry is not written. `dyn`, so the
    /// loop is compiled once rather than once per caller's closure.
    fn cas_change(
        &mut self,
        host: &dyn SharedData,
        now_ms: u64,
        change: &mut dyn FnMut(&mut PoolState) -> bool,
    ) -> Result<(Landed, StateChange), UpdateError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (bytes, cas) = host.get(&self.keys.state).map_err(host_error)?;
            let (mut state, stored_as_is, writable) = match self.read_stored(bytes.as_deref()) {
                Stored::Fresh(state) => (state, false, true),
                Stored::Current { state, as_is } => (state, as_is, true),
                Stored::Newer => (self.state.clone(), true, false),
            };
            let changed = change(&mut state);
            if !changed && stored_as_is {
                return Ok((Landed::AsIs, self.adopt(state)));
            }
            state.written_at_ms = now_ms;
            if !writable {
                // Not ours to replace: this VM goes on with the change, on its own.
                return Ok((Landed::LocalOnly, self.adopt(state)));
            }
            match host.set(
                &self.keys.state,
                &schema::encode_state(&state),
                cas_for(cas),
            ) {
                Ok(()) => {
                    host.set(&self.keys.epoch, &[], None).map_err(host_error)?;
                    let cached = self.adopt(state);
                    // Another write may land between ours and the next refresh: read again then.
                    self.synced = false;
                    return Ok((Landed::Shared, cached));
                }
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Host(e)) => return Err(UpdateError::Host(e)),
            }
        }
        Err(UpdateError::GaveUp)
    }

    /// The stored `state` entry laid over our keys. Counts and (once per VM) logs what does not
    /// decode.
    fn read_stored(&mut self, bytes: Option<&[u8]>) -> Stored {
        let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
            return Stored::Fresh(PoolState::fresh(&self.fingerprints));
        };
        match schema::decode_state(bytes) {
            Ok(stored) => {
                let (state, changed) = PoolState::reconcile(stored, &self.fingerprints);
                Stored::Current {
                    state,
                    as_is: !changed,
                }
            }
            Err(e) => {
                self.decode_failures += 1;
                if let DecodeError::NewerVersion(_) = e {
                    if !self.newer_entry_seen {
                        log::warn!(
                            "shared state entry {} was written by a newer build ({e}); this VM keeps its own copy of the pool's state",
                            self.keys.state
                        );
                        self.newer_entry_seen = true;
                    }
                    return Stored::Newer;
                }
                if !self.corrupt_entry_seen {
                    log::warn!(
                        "shared state entry {} could not be decoded ({e}); starting from fresh state",
                        self.keys.state
                    );
                    self.corrupt_entry_seen = true;
                }
                Stored::Fresh(PoolState::fresh(&self.fingerprints))
            }
        }
    }

    fn adopt(&mut self, state: PoolState) -> StateChange {
        if state == self.state {
            return StateChange::Unchanged;
        }
        self.state = state;
        StateChange::Changed
    }
}

type Decoder = fn(&[u8]) -> Result<PoolState, DecodeError>;

/// Where a `cas_change` left its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landed {
    /// The stored entry already said it: nothing written.
    AsIs,
    /// Written to shared data.
    Shared,
    /// A newer build's entry: kept in this VM's copy only.
    LocalOnly,
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

    pub type WriteHook = Box<dyn FnMut(&FakeShared, &str)>;

    /// Proxy shared data as Envoy implements it (`CasMap`), counting the calls, with a hook that
    /// lets a test play a competing worker.
    #[derive(Default)]
    pub struct FakeShared {
        pub entries: RefCell<CasMap>,
        pub gets: Cell<usize>,
        pub sets: Cell<usize>,
        /// Called before each write: lets a test play a competing worker.
        pub before_set: RefCell<Option<WriteHook>>,
    }

    impl FakeShared {
        /// Writes as another plugin (or a test) would, unconditionally and without the hook.
        pub fn put_raw(&self, key: &str, value: &[u8]) {
            let _ = self.entries.borrow_mut().set(key, value, None);
        }

        /// What `remove_shared_data` does.
        pub fn remove(&self, key: &str) {
            self.put_raw(key, &[]);
        }

        /// The stored value, empty for absent and removed entries.
        pub fn value(&self, key: &str) -> Vec<u8> {
            self.entries.borrow().get(key).0.unwrap_or_default()
        }
    }

    impl SharedData for FakeShared {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            self.gets.set(self.gets.get() + 1);
            Ok(self.entries.borrow().get(key))
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            let hook = self.before_set.borrow_mut().take();
            if let Some(mut hook) = hook {
                hook(self, key);
                *self.before_set.borrow_mut() = Some(hook);
            }
            self.sets.set(self.sets.get() + 1);
            self.entries.borrow_mut().set(key, value, cas)
        }
    }

    /// Checks that `h` keeps Envoy's shared-data rules, the ones the CAS loop relies on; run
    /// against every implementation.
    pub fn check_envoys_rules(h: &dyn SharedData) {
        assert_eq!(h.get("k").unwrap(), (None, None));
        assert!(h.set("k", b"a", Some(12345)).is_ok(), "absent: any CAS");
        let (v, cas) = h.get("k").unwrap();
        assert_eq!(v.as_deref(), Some(&b"a"[..]));
        let cas = cas.unwrap();
        assert_eq!(
            h.set("k", b"b", Some(cas + 1)),
            Err(StoreError::CasMismatch)
        );
        assert!(h.set("k", b"b", Some(cas)).is_ok());
        assert!(h.set("k", b"c", Some(0)).is_ok(), "0 is unconditional");
        assert!(h.set("k", b"d", None).is_ok(), "None is unconditional");
        h.set("other", b"x", None).unwrap();
        let (_, k_cas) = h.get("k").unwrap();
        let (_, other_cas) = h.get("other").unwrap();
        assert_ne!(k_cas, other_cas, "one counter for all keys");
        // What `remove_shared_data` does.
        h.set("k", b"", None).unwrap();
        let (v, cas) = h.get("k").unwrap();
        assert_eq!(v, None, "a removed entry reads as no value");
        let cas = cas.unwrap();
        assert_eq!(
            h.set("k", b"e", Some(CREATE_CAS)),
            Err(StoreError::CasMismatch),
            "a removed entry still exists for CAS"
        );
        assert!(h.set("k", b"e", Some(cas)).is_ok());
    }

    #[test]
    fn the_fake_follows_envoys_rules() {
        let h = FakeShared::default();
        check_envoys_rules(&h);
        h.remove("k");
        assert_eq!(h.get("k").unwrap().0, None, "remove empties the entry");
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeShared;
    use super::*;
    use crate::core::pool::Policy;
    use std::cell::{Cell, RefCell};

    use crate::core::pool::test_fixtures::{ONE_SECOND as P, RATE_LIMITED};

    fn fail(status: u16) -> crate::core::pool::Failure {
        crate::core::pool::Failure {
            status,
            ..RATE_LIMITED
        }
    }

    /// What a config load does for one pool: carry over, then register.
    fn load(
        host: &FakeShared,
        store: &mut PoolStore,
        now_ms: u64,
    ) -> Result<CarryOver, UpdateError> {
        let result = store.carry_over(host, now_ms);
        register(host, &[store.pool_id()])?;
        result
    }

    /// Ten refreshes with nothing written in between: one epoch read each, no state read.
    fn assert_refreshes_read_only_the_epoch(host: &FakeShared, store: &mut PoolStore) {
        let gets = host.gets.get();
        for _ in 0..10 {
            assert_eq!(store.refresh(host).unwrap(), StateChange::Unchanged);
        }
        assert_eq!(
            host.gets.get() - gets,
            10,
            "one epoch read per refresh, no state read"
        );
    }

    /// How many of the store's keys its cached state has in rotation.
    fn available(store: &PoolStore) -> usize {
        store
            .state()
            .keys
            .iter()
            .filter(|k| k.is_available())
            .count()
    }

    fn store(fps: &[u64]) -> PoolStore {
        PoolStore::new(9, fps.to_vec())
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
        assert_eq!(ev.events.len(), 1);
        assert_eq!(available(&b), 2);
        b.refresh(&host).unwrap();
        assert_eq!(available(&b), 1);
        assert_eq!(b.state().keys[0].health, Health::CoolingDown);
    }

    #[test]
    fn refresh_and_update_say_whether_the_cached_state_changed() {
        let host = FakeShared::default();
        let mut a = store(&[1, 2]);
        let mut b = store(&[1, 2]);
        assert_eq!(
            a.refresh(&host).unwrap(),
            StateChange::Unchanged,
            "nothing stored yet: still the fresh state"
        );
        let marked = b
            .update(&host, 0, |s| {
                s.record_failure(0, &fail(429), 0, &P).into_iter().collect()
            })
            .unwrap();
        assert_eq!(marked.state, StateChange::Changed);
        assert_eq!(
            a.refresh(&host).unwrap(),
            StateChange::Changed,
            "another worker's write"
        );
        assert_eq!(a.refresh(&host).unwrap(), StateChange::Unchanged);
        b.update(&host, 5, |s| {
            s.record_failure(1, &fail(429), 5, &P).into_iter().collect()
        })
        .unwrap();
        let read = a.update(&host, 6, |_| Vec::new()).unwrap();
        assert_eq!(
            read,
            Updated {
                events: Vec::new(),
                state: StateChange::Changed
            },
            "a change with no events still brings in what another worker wrote"
        );
        let again = a.update(&host, 7, |_| Vec::new()).unwrap();
        assert_eq!(again.state, StateChange::Unchanged);
    }

    #[test]
    fn refresh_reads_the_full_state_only_when_the_epoch_moved() {
        let host = FakeShared::default();
        let mut a = store(&[1, 2]);
        mark_down(&host, &mut a, 1, 0);
        a.refresh(&host).unwrap();
        assert_refreshes_read_only_the_epoch(&host, &mut a);
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
        assert!(ev.events.is_empty());
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
                let mut s = schema::decode_state(&h.value(key)).unwrap_or_default();
                s.record_failure(1, &fail(429), 0, &P);
                *os.borrow_mut() = Some(s.clone());
                h.put_raw(key, &schema::encode_state(&s));
            }
        }));
        let ev = a
            .update(&host, 0, |s| {
                s.record_failure(0, &fail(429), 0, &P).into_iter().collect()
            })
            .unwrap();
        assert_eq!(ev.events.len(), 1);
        *host.before_set.borrow_mut() = None;
        other.refresh(&host).unwrap();
        assert_eq!(available(&other), 0, "both mark-downs survived");
        assert!(other_state.borrow().is_some());
    }

    #[test]
    fn gives_up_after_bounded_attempts_when_every_write_conflicts() {
        let host = FakeShared::default();
        let mut a = store(&[1]);
        *host.before_set.borrow_mut() = Some(Box::new(|h: &FakeShared, key: &str| {
            if key.ends_with("/state") {
                let v = h.value(key);
                h.put_raw(key, &v);
            }
        }));
        host.put_raw(
            &PoolKeys::of(9).state,
            &schema::encode_state(&PoolState::fresh(&[1])),
        );
        let r = a.update(&host, 0, |s| {
            s.record_failure(0, &fail(429), 0, &P).into_iter().collect()
        });
        assert_eq!(r, Err(UpdateError::GaveUp));
    }

    #[test]
    fn corrupt_entries_are_replaced_by_fresh_state() {
        let host = FakeShared::default();
        let key = PoolKeys::of(9).state;
        host.put_raw(&key, b"garbage from an older version");
        host.put_raw(&PoolKeys::of(9).epoch, &[1]);
        let mut a = store(&[1, 2]);
        a.refresh(&host).unwrap();
        assert!(a.corrupt_entry_seen);
        assert_eq!(available(&a), 2);
        a.update(&host, 0, |s| {
            s.record_failure(0, &fail(429), 0, &P).into_iter().collect()
        })
        .unwrap();
        let stored = schema::decode_state(&host.value(&key)).unwrap();
        assert_eq!(stored.keys.len(), 2);
    }

    fn state_key(pool_id: u64) -> String {
        PoolKeys::of(pool_id).state
    }

    /// Marks key `key` of store `s` down (a 429 at `now`) and returns nothing.
    fn mark_down(host: &FakeShared, s: &mut PoolStore, key: usize, now: u64) {
        let events = s
            .update(host, now, |st| {
                st.record_failure(key, &fail(429), now, &P)
                    .into_iter()
                    .collect()
            })
            .unwrap();
        assert!(!events.events.is_empty(), "key {key} was marked down");
    }

    #[test]
    fn two_stores_racing_their_first_update_of_a_pool_lose_nothing() {
        let host = FakeShared::default();
        let mut a = store(&[1, 2]);
        let b = std::rc::Rc::new(RefCell::new(store(&[1, 2])));
        // Both read the absent entry; B writes first, between A's read and A's write.
        let racer = b.clone();
        *host.before_set.borrow_mut() = Some(Box::new(move |h: &FakeShared, key: &str| {
            if key.ends_with("/state") && h.value(key).is_empty() {
                mark_down(h, &mut racer.borrow_mut(), 1, 0);
            }
        }));
        mark_down(&host, &mut a, 0, 0);
        *host.before_set.borrow_mut() = None;
        let mut reader = store(&[1, 2]);
        reader.refresh(&host).unwrap();
        assert_eq!(
            reader
                .state()
                .keys
                .iter()
                .map(|k| k.health)
                .collect::<Vec<_>>(),
            [Health::CoolingDown, Health::CoolingDown],
            "both first updates survived"
        );
    }

    #[test]
    fn two_workers_taking_an_absent_lease_at_once_do_not_both_lead() {
        let host = FakeShared::default();
        let s = store(&[1]);
        let other = store(&[1]);
        let won_by_other = std::rc::Rc::new(Cell::new(false));
        let w = won_by_other.clone();
        *host.before_set.borrow_mut() = Some(Box::new(move |h: &FakeShared, key: &str| {
            if key.ends_with("/health-lease") && h.value(key).is_empty() {
                w.set(other.try_lead(h, 2, 0, 3_000));
            }
        }));
        let won_by_us = s.try_lead(&host, 1, 0, 3_000);
        assert!(won_by_other.get(), "the other worker took the lease first");
        assert!(!won_by_us, "only one worker leads");
    }

    #[test]
    fn every_entry_of_a_pool_exists_after_a_config_load() {
        let host = FakeShared::default();
        let mut a = store(&[1, 2]);
        load(&host, &mut a, 5).unwrap();
        for key in PoolKeys::of(9).all() {
            let (_, cas) = host.get(key).unwrap();
            assert!(cas.is_some(), "{key} was created");
        }
        assert_eq!(a.read_target(&host), None, "an empty target is no target");
        let stored = schema::decode_state(&host.value(&state_key(9))).unwrap();
        assert_eq!(
            stored,
            PoolState {
                written_at_ms: 5,
                ..PoolState::fresh(&[1, 2])
            }
        );
    }

    #[test]
    fn a_key_cooling_down_under_the_previous_build_stays_down() {
        let host = FakeShared::default();
        // What the previous build left: format 2 under its own names, key 2 out until 61 s.
        let mut old = PoolState::fresh(&[1, 2, 3]);
        old.record_failure(
            1,
            &fail(429),
            1_000,
            &Policy {
                cooldown_ms: 60_000,
                ..P
            },
        );
        old.written_at_ms = 1_000;
        let bytes =
            schema::written_by::with_version(&schema::encode_state(&old), schema::PREVIOUS_VERSION);
        host.put_raw(&previous::state_key(9), &bytes);
        host.put_raw(previous::REGISTRY_KEY, &9u64.to_le_bytes());
        let mut new = store(&[1, 2, 3]);
        assert_eq!(load(&host, &mut new, 2_000).unwrap().keys_carried, 1);
        let mut worker = store(&[1, 2, 3]);
        worker.refresh(&host).unwrap();
        assert_eq!(worker.state().keys[1].health, Health::CoolingDown);
        assert_eq!(worker.state().keys[1].down_until_ms, 61_000);
        assert_eq!(available(&worker), 2);
        assert_eq!(
            host.value(&previous::state_key(9)),
            bytes,
            "the previous build's entry is left to it"
        );
        // A second VM of the new build loads later: it finds its own entry newer, writes nothing.
        let sets = host.sets.get();
        let mut second = store(&[1, 2, 3]);
        assert_eq!(load(&host, &mut second, 2_500).unwrap().keys_carried, 0);
        assert_eq!(host.sets.get(), sets);
    }

    #[test]
    fn an_entry_in_a_newer_format_is_never_overwritten() {
        let host = FakeShared::default();
        let newer = schema::written_by::with_version(
            &schema::encode_state(&PoolState::fresh(&[1, 2])),
            schema::VERSION + 1,
        );
        host.put_raw(&state_key(9), &newer);
        let mut a = store(&[1, 2]);
        load(&host, &mut a, 0).unwrap();
        a.refresh(&host).unwrap();
        mark_down(&host, &mut a, 0, 10);
        assert_eq!(
            host.value(&state_key(9)),
            newer,
            "left as the newer build wrote it"
        );
        assert!(a.newer_entry_seen);
        assert_eq!(
            available(&a),
            1,
            "this VM still keeps the failed key out on its own"
        );
        a.refresh(&host).unwrap();
        assert_eq!(available(&a), 1);
    }

    #[test]
    fn every_read_of_a_corrupt_or_foreign_entry_is_counted() {
        let host = FakeShared::default();
        let mut a = store(&[1, 2]);
        load(&host, &mut a, 0).unwrap();
        assert_eq!(a.take_decode_failures(), 0);
        for damage in [&b"garbage"[..], b"AKF", &[0xff; 64]] {
            host.put_raw(&state_key(9), damage);
            host.put_raw(&PoolKeys::of(9).epoch, &[]);
            a.refresh(&host).unwrap();
        }
        assert_eq!(
            a.take_decode_failures(),
            3,
            "each bad read counts, not only the first"
        );
        assert_eq!(a.take_decode_failures(), 0, "taken once");
    }

    #[test]
    fn carry_over_that_meets_a_conflict_on_every_attempt_reports_it_gave_up() {
        let host = FakeShared::default();
        let mut a = PoolStore::new(100, vec![1, 2]);
        load(&host, &mut a, 10).unwrap();
        mark_down(&host, &mut a, 1, 20);
        let mut b = PoolStore::new(200, vec![2, 3]);
        *host.before_set.borrow_mut() = Some(Box::new(|h: &FakeShared, key: &str| {
            if key == state_key(200) {
                let v = h.value(key);
                h.put_raw(key, &v);
            }
        }));
        assert_eq!(b.carry_over(&host, 30), Err(UpdateError::GaveUp));
        *host.before_set.borrow_mut() = None;
        assert!(
            host.value(&state_key(200)).is_empty(),
            "nothing was written"
        );
    }

    #[test]
    fn a_pool_pushed_out_of_the_registry_has_its_entries_cleared() {
        let host = FakeShared::default();
        let mut first = PoolStore::new(1, vec![1]);
        load(&host, &mut first, 0).unwrap();
        mark_down(&host, &mut first, 0, 0);
        first.write_target(&host, "c", "a.example");
        assert!(first.try_lead(&host, 7, 0, 3_000));
        let keys = PoolKeys::of(1);
        for id in 2..=REGISTRY_CAPACITY as u64 {
            assert_eq!(register(&host, &[id]).unwrap(), Vec::<u64>::new());
        }
        assert!(!host.value(&keys.state).is_empty(), "still registered");
        assert_eq!(register(&host, &[1_000]).unwrap(), vec![1]);
        for key in keys.all() {
            let (value, cas) = host.get(key).unwrap();
            assert_eq!((value, cas.is_some()), (None, true), "{key} cleared");
        }
        let registry = schema::decode_registry(Some(&host.value(REGISTRY_KEY)));
        assert_eq!(registry.len(), REGISTRY_CAPACITY);
        assert!(!registry.contains(&1));
        // A configuration with more pools than the registry holds keeps all of its own.
        let many: Vec<u64> = (5_000..5_000 + REGISTRY_CAPACITY as u64 + 3).collect();
        let cleared = register(&host, &many).unwrap();
        assert_eq!(cleared.len(), REGISTRY_CAPACITY);
        assert_eq!(
            schema::decode_registry(Some(&host.value(REGISTRY_KEY))),
            many
        );
    }

    #[test]
    fn a_stored_state_from_another_key_list_is_reconciled_and_rewritten() {
        let host = FakeShared::default();
        let mut old = store(&[1, 2]);
        mark_down(&host, &mut old, 1, 0);
        let mut new = store(&[2, 3]);
        new.refresh(&host).unwrap();
        assert_eq!(
            new.state().keys[0].health,
            Health::CoolingDown,
            "key 2 keeps its state"
        );
        assert_eq!(new.state().keys[1].health, Health::Available);
        new.update(&host, 0, |_| Vec::new()).unwrap();
        let stored = schema::decode_state(&host.value(&PoolKeys::of(9).state)).unwrap();
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
        let mut a = PoolStore::new(100, vec![1, 2, 3]);
        assert_eq!(load(&host, &mut a, 10).unwrap(), CarryOver::default());
        a.update(&host, 20, |s| {
            s.record_failure(1, &fail(429), 20, &P)
                .into_iter()
                .collect()
        })
        .unwrap();
        // Config B drops key 3 and adds key 4: another key list, another pool id.
        let mut b = PoolStore::new(200, vec![4, 2, 1]);
        assert_eq!(load(&host, &mut b, 30).unwrap().keys_carried, 1);
        b.refresh(&host).unwrap();
        assert_eq!(
            b.state().keys[0],
            crate::core::pool::KeyState::fresh(4),
            "a new key starts available"
        );
        assert_eq!(
            b.state().keys[1].health,
            Health::CoolingDown,
            "key 2 stays down"
        );
        assert_eq!(b.state().keys[1].down_until_ms, 1_020);
        assert_eq!(available(&b), 2);
        // Back to config A: B's newer word on key 2 (restored there) wins over A's stale entry.
        b.update(&host, 2_000, |s| {
            s.restore_all();
            vec![Event::Restored { key: 1 }]
        })
        .unwrap();
        let mut a2 = PoolStore::new(100, vec![1, 2, 3]);
        assert_eq!(load(&host, &mut a2, 2_100).unwrap().keys_carried, 1);
        a2.refresh(&host).unwrap();
        assert_eq!(available(&a2), 3);
        let registry = schema::decode_registry(Some(&host.value(REGISTRY_KEY)));
        assert_eq!(registry, vec![200, 100]);
    }

    #[test]
    fn carry_over_is_a_no_op_when_nothing_is_newer() {
        let host = FakeShared::default();
        let mut a = PoolStore::new(100, vec![1]);
        load(&host, &mut a, 0).unwrap();
        let sets = host.sets.get();
        let mut a_again = PoolStore::new(100, vec![1]);
        load(&host, &mut a_again, 5).unwrap();
        assert_eq!(
            host.sets.get(),
            sets,
            "no write when the entries exist and the registry already ends with us"
        );
    }

    #[test]
    fn a_config_load_brings_back_keys_disabled_until_the_config_changes() {
        let host = FakeShared::default();
        let mut a = PoolStore::new(7, vec![1, 2]);
        load(&host, &mut a, 0).unwrap();
        let forever = Policy { disable_ms: 0, ..P };
        let refused = crate::core::pool::Failure {
            class: crate::core::status::FailureClass::KeyRefused,
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
        let mut again = PoolStore::new(7, vec![1, 2]);
        let result = load(&host, &mut again, 20).unwrap();
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
        assert_refreshes_read_only_the_epoch(&host, &mut a);
        let mut b = store(&[1, 2]);
        b.update(&host, 0, |s| {
            s.record_failure(0, &fail(429), 0, &P).into_iter().collect()
        })
        .unwrap();
        a.refresh(&host).unwrap();
        assert_eq!(available(&a), 1, "a write is still seen");
    }
}

#[cfg(test)]
mod golden {
    use super::fake::FakeShared;
    use super::*;

    /// What one known pool leaves in shared data, byte for byte: a change of any name or layout
    /// here is a change an upgrade would trip on (the previous build reads these bytes).
    #[test]
    fn names_and_bytes_are_those_earlier_builds_wrote() {
        let host = FakeShared::default();
        let mut s = PoolStore::new(0x1234, vec![7, 8]);
        s.carry_over(&host, 5).unwrap();
        register(&host, &[0x1234]).unwrap();
        assert!(s.try_lead(&host, 0xAB, 100, 3_000));
        s.write_target(&host, "outbound|443||api.x", "api.x");
        let names: Vec<String> = {
            let mut v: Vec<String> = host.entries.borrow().names().map(String::from).collect();
            v.sort();
            v
        };
        assert_eq!(
            names,
            [
                "ai-key-failover/v3/0000000000001234/epoch",
                "ai-key-failover/v3/0000000000001234/health-lease",
                "ai-key-failover/v3/0000000000001234/state",
                "ai-key-failover/v3/0000000000001234/target",
                "ai-key-failover/v3/pools",
            ]
        );
        let p = "ai-key-failover/v3/0000000000001234";
        assert_eq!(host.value(&format!("{p}/epoch")), b"");
        assert_eq!(
            host.value("ai-key-failover/v3/pools"),
            0x1234u64.to_le_bytes()
        );
        let mut lease = 0xABu64.to_le_bytes().to_vec();
        lease.extend_from_slice(&3_100u64.to_le_bytes());
        assert_eq!(host.value(&format!("{p}/health-lease")), lease);
        assert_eq!(
            host.value(&format!("{p}/target")),
            b"outbound|443||api.x\napi.x"
        );
        let mut state = b"AKF\x03".to_vec();
        state.extend_from_slice(&5u64.to_le_bytes());
        state.extend_from_slice(&2u32.to_le_bytes());
        for fp in [7u64, 8] {
            state.extend_from_slice(&fp.to_le_bytes());
            state.extend_from_slice(&[0u8; 1 + 4 + 4 + 8 + 8 + 8]);
        }
        // FNV-1a 32 of everything before it.
        let mut hash: u32 = 0x811c_9dc5;
        for &b in &state {
            hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        state.extend_from_slice(&hash.to_le_bytes());
        assert_eq!(host.value(&format!("{p}/state")), state);
        // The previous build's names, read on load.
        assert_eq!(previous::REGISTRY_KEY, "ai-key-failover/v1/pools");
        assert_eq!(
            previous::state_key(0x1234),
            "ai-key-failover/v1/0000000000001234/state"
        );
    }
}
