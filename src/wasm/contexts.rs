//! Which plugin object a proxy-wasm callback is for: the host names a context by its id, and
//! this table holds the root (one per plugin configuration) or request behind each id.
//!
//! It does what the SDK's dispatcher did for us, more cheaply: the SDK hashed every callback's
//! id with SipHash, kept each context behind a boxed trait object and looked a new request's
//! root up twice. Ids here are hashed with one multiplication; requests are found in one probe.
//! Pure, so `cargo test` covers it; `wasm::exports` holds the one table per VM.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

/// Hashes a context id (a small integer the host counts up) with one multiplication by an
/// odd constant: the bits hashbrown uses (the top ones too) all depend on the id.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// What an id named when it was removed: dropped by the caller once the table is no longer
/// borrowed (a request's drop gives its key back, which calls the host).
pub enum Removed<R, Q> {
    Root(Rc<RefCell<R>>),
    Request(Rc<RefCell<Q>>),
    Unknown,
}

/// Roots `R` and requests `Q` by context id. Each is shared (`Rc`): a callback takes its
/// context out of the table before running, so a callback the host makes while another runs
/// (a resumed request's body, a local reply's response) finds the table free.
pub struct Contexts<R, Q> {
    /// A handful at most: one per plugin configuration this VM serves.
    roots: Vec<(u32, Rc<RefCell<R>>)>,
    requests: HashMap<u32, Rc<RefCell<Q>>, BuildHasherDefault<IdHasher>>,
}

impl<R, Q> Default for Contexts<R, Q> {
    fn default() -> Self {
        Contexts {
            roots: Vec::new(),
            requests: HashMap::default(),
        }
    }
}

impl<R, Q> Contexts<R, Q> {
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

    /// A request the host created; what it replaced, if the host reused a live id, is returned
    /// to be dropped outside the table's borrow.
    pub fn add_request(&mut self, id: u32, request: Rc<RefCell<Q>>) -> Option<Rc<RefCell<Q>>> {
        self.requests.insert(id, request)
    }

    pub fn request(&self, id: u32) -> Option<Rc<RefCell<Q>>> {
        self.requests.get(&id).cloned()
    }

    pub fn remove(&mut self, id: u32) -> Removed<R, Q> {
        if let Some(request) = self.requests.remove(&id) {
            return Removed::Request(request);
        }
        match self.roots.iter().position(|(known, _)| *known == id) {
            Some(at) => Removed::Root(self.roots.swap_remove(at).1),
            None => Removed::Unknown,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::Hash;

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

    #[test]
    fn consecutive_ids_spread_over_the_hash_bits() {
        let hash = |id: u32| {
            let mut h = IdHasher::default();
            id.hash(&mut h);
            h.finish()
        };
        // hashbrown takes its 7-bit tag from the top bits of the hash as 64 bits, or of its low
        // 32 bits on a 32-bit target (wasm32): consecutive ids must not share it.
        let tags64: std::collections::HashSet<u64> = (1..=64).map(|id| hash(id) >> 57).collect();
        let tags32: std::collections::HashSet<u32> =
            (1..=64).map(|id| (hash(id) as u32) >> 25).collect();
        assert!(tags64.len() > 32, "{} distinct 64-bit tags", tags64.len());
        assert!(tags32.len() > 32, "{} distinct 32-bit tags", tags32.len());
        assert_ne!(hash(1), hash(2));
    }
}
