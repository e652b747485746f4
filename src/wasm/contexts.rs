//! Which plugin object a proxy-wasm callback is for: the host names a context by its id, and
//! this table holds the root (one per plugin configuration) or request behind each id.
//!
//! It does what the SDK's dispatcher did for us, more cheaply: the SDK hashed every callback's
//! id with SipHash, kept each context behind a boxed trait object and looked a new request's
//! root up twice. Here a request is found in the slot its id names.
//! Pure, so `cargo test` covers it; `wasm::exports` holds the one table per VM.

use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::rc::Rc;

/// What an id named when it was removed: dropped by the caller once the table is no longer
/// borrowed (a request's drop gives its key back, which calls the host).
pub enum Removed<R, Q> {
    Root(Rc<RefCell<R>>),
    Request(Rc<RefCell<Q>>),
    Unknown,
}

type Entry<Q> = (u32, Rc<RefCell<Q>>);

/// Roots `R` and requests `Q` by context id. Each is shared (`Rc`): a callback takes its
/// context out of the table before running, so a callback the host makes while another runs
/// (a resumed request's body, a local reply's response) finds the table free.
pub struct Contexts<R, Q> {
    /// A handful at most: one per plugin configuration this VM serves.
    roots: Vec<(u32, Rc<RefCell<R>>)>,
    /// A request lives in slot `id % slots.len()`. The host counts ids up, so the requests
    /// alive at once have nearby ids and distinct slots; one that outlives the slots' turn
    /// (a long stream) can be in the way of a new one, which then goes to `overflow`. Hashed
    /// only there, so a host with many long streams still finds each request in O(1); the ids
    /// are the host's, not a client's, so a fixed hash key is safe.
    slots: Vec<Option<Entry<Q>>>,
    overflow: HashMap<u32, Rc<RefCell<Q>>, BuildHasherDefault<DefaultHasher>>,
    live: usize,
}

/// The first table's slots; doubled whenever more than half are in use.
const FIRST_SLOTS: usize = 64;

impl<R, Q> Contexts<R, Q> {
    pub const fn new() -> Self {
        Contexts {
            roots: Vec::new(),
            slots: Vec::new(),
            overflow: HashMap::with_hasher(BuildHasherDefault::new()),
            live: 0,
        }
    }

    /// A root the host created (a new one with the same id replaces it: the host reused it).
    pub fn add_root(&mut self, id: u32, root: R) {
        self.roots.retain(|(known, _)| *known != id);
        self.roots.push((id, Rc::new(RefCell::new(root))));
    }

    pub fn root(&self, id: u32) -> Option<Rc<RefCell<R>>> {
        self.roots
            .iter()
            .find(|(known, _)| *known == id)
            .map(|(_, root)| root.clone())
    }

    fn slot_of(&self, id: u32) -> usize {
        // An empty table (nothing added yet) has no slots: `max(1)` keeps this defined, and the
        // caller's `get` finds nothing. A u32 fits a usize on every target this builds for.
        (id as usize) % self.slots.len().max(1)
    }

    /// A request the host created; what it replaced, if the host reused a live id, is returned
    /// to be dropped outside the table's borrow.
    pub fn add_request(&mut self, id: u32, request: Rc<RefCell<Q>>) -> Option<Rc<RefCell<Q>>> {
        let replaced = self.take_request(id);
        if self.live.saturating_mul(2) >= self.slots.len() {
            self.grow();
        }
        self.place((id, request));
        self.live = self.live.saturating_add(1);
        replaced
    }

    /// Puts an entry in its slot, or in `overflow` when another request holds the slot.
    fn place(&mut self, entry: Entry<Q>) {
        let at = self.slot_of(entry.0);
        match self.slots.get_mut(at) {
            Some(slot @ None) => *slot = Some(entry),
            _ => {
                self.overflow.insert(entry.0, entry.1);
            }
        }
    }

    fn grow(&mut self) {
        let size = self.slots.len().saturating_mul(2).max(FIRST_SLOTS);
        let old = std::mem::replace(&mut self.slots, (0..size).map(|_| None).collect());
        let spilled = std::mem::take(&mut self.overflow);
        for entry in old.into_iter().flatten().chain(spilled) {
            self.place(entry);
        }
    }

    pub fn request(&self, id: u32) -> Option<Rc<RefCell<Q>>> {
        if let Some(Some((known, request))) = self.slots.get(self.slot_of(id)) {
            if *known == id {
                return Some(request.clone());
            }
        }
        if self.overflow.is_empty() {
            return None;
        }
        self.overflow.get(&id).cloned()
    }

    fn take_request(&mut self, id: u32) -> Option<Rc<RefCell<Q>>> {
        let at = self.slot_of(id);
        let taken = match self.slots.get_mut(at) {
            Some(slot) if slot.as_ref().is_some_and(|(known, _)| *known == id) => {
                slot.take().map(|(_, request)| request)
            }
            _ if self.overflow.is_empty() => None,
            _ => self.overflow.remove(&id),
        };
        if taken.is_some() {
            self.live = self.live.saturating_sub(1);
        }
        taken
    }

    pub fn remove(&mut self, id: u32) -> Removed<R, Q> {
        if let Some(request) = self.take_request(id) {
            return Removed::Request(request);
        }
        match self.roots.iter().position(|(known, _)| *known == id) {
            Some(at) => Removed::Root(self.roots.swap_remove(at).1),
            None => Removed::Unknown,
        }
    }

    #[cfg(test)]
    pub fn requests(&self) -> usize {
        self.live
    }
}

impl<R, Q> Default for Contexts<R, Q> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_roots_and_requests_by_id_and_forgets_them_once_removed() {
        let mut table: Contexts<&str, u32> = Contexts::default();
        table.add_root(1, "root");
        for id in 2..2_002 {
            assert!(table
                .add_request(id, Rc::new(RefCell::new(id * 10)))
                .is_none());
        }
        assert_eq!(*table.root(1).unwrap().borrow(), "root");
        assert!(table.root(2).is_none(), "a request is not a root");
        assert_eq!(*table.request(1_500).unwrap().borrow(), 15_000);
        assert!(table.request(1).is_none(), "a root is not a request");
        assert!(matches!(table.remove(1_500), Removed::Request(r) if *r.borrow() == 15_000));
        assert!(table.request(1_500).is_none());
        assert!(matches!(table.remove(1_500), Removed::Unknown));
        assert!(matches!(table.remove(1), Removed::Root(_)));
        assert!(table.root(1).is_none());
        assert_eq!(table.requests(), 1_999);
    }

    #[test]
    fn a_reused_id_replaces_what_it_named() {
        let mut table: Contexts<u8, u8> = Contexts::default();
        table.add_root(7, 1);
        table.add_root(7, 2);
        assert_eq!(*table.root(7).unwrap().borrow(), 2);
        assert!(table.add_request(9, Rc::new(RefCell::new(1))).is_none());
        let old = table.add_request(9, Rc::new(RefCell::new(2)));
        assert_eq!(old.map(|r| *r.borrow()), Some(1));
        assert_eq!(*table.request(9).unwrap().borrow(), 2);
    }

    #[test]
    fn a_context_in_use_is_still_found_by_a_callback_made_meanwhile() {
        let mut table: Contexts<(), u8> = Contexts::default();
        table.add_request(3, Rc::new(RefCell::new(0)));
        let running = table.request(3).unwrap();
        let _busy = running.borrow_mut();
        // The table is free; the request itself says it is busy.
        let again = table.request(3).unwrap();
        assert!(again.try_borrow_mut().is_err());
    }

    /// Requests that live long (streams) and short, ids counting up as the host's do: the
    /// table must always agree with a plain map, whatever shares a slot.
    #[test]
    fn agrees_with_a_map_under_long_and_short_lived_requests() {
        let mut table: Contexts<(), u32> = Contexts::default();
        let mut model = std::collections::BTreeMap::new();
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        let (mut peak, mut spilled) = (0, 0);
        for id in 1..20_000u32 {
            assert!(table.add_request(id, Rc::new(RefCell::new(id))).is_none());
            model.insert(id, id);
            peak = peak.max(model.len());
            spilled = spilled.max(table.overflow.len());
            // Most end soon; one in 50 lives for thousands of ids.
            let ending: Vec<u32> = model
                .keys()
                .copied()
                .filter(|&old| {
                    old != id && (next() % 4 == 0) && (old % 50 != 0 || next() % 500 == 0)
                })
                .collect();
            for old in ending {
                assert!(matches!(table.remove(old), Removed::Request(r) if *r.borrow() == old));
                model.remove(&old);
            }
            if id % 997 == 0 {
                for (&k, &v) in &model {
                    assert_eq!(table.request(k).map(|r| *r.borrow()), Some(v), "{k}");
                }
                assert!(table.request(id + 1).is_none());
            }
            assert_eq!(table.requests(), model.len());
        }
        assert!(
            spilled > 0,
            "no request ever found its slot taken: the test misses that path"
        );
        assert!(
            table.slots.len() <= 4 * peak.max(FIRST_SLOTS),
            "{} slots",
            table.slots.len()
        );
    }
}
