//! Pool state shared by every worker of the process, for the native host.
//!
//! A dynamic module is loaded once per Envoy process, so one process-wide map behind a mutex
//! plays the part proxy shared data plays for wasm. It keeps Envoy's rules exactly, so the core's
//! store and its CAS loop run unchanged: every write takes the next number of one counter; a
//! write with CAS `None` or 0 is unconditional; a CAS write to an absent entry succeeds whatever
//! the number; a removal (an empty value) reads back as `(None, Some(cas))`. Like proxy shared
//! data it outlives configuration updates (Envoy keeps the module loaded) but not a restart.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::core::store::{SharedData, StoreError};

#[derive(Default)]
struct Entries {
    map: BTreeMap<String, (Vec<u8>, u32)>,
    last_cas: u32,
}

pub struct InProcessShared {
    entries: Mutex<Entries>,
}

/// The process's one store: every filter config, on every worker, reads and writes here.
pub static STORE: InProcessShared = InProcessShared::new();

impl Default for InProcessShared {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcessShared {
    pub const fn new() -> Self {
        InProcessShared {
            entries: Mutex::new(Entries {
                map: BTreeMap::new(),
                last_cas: 0,
            }),
        }
    }

    /// A panic elsewhere while the lock was held leaves the map whole (each operation is one
    /// insert), so a poisoned lock is taken as it is rather than failing every later request.
    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SharedData for InProcessShared {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        let entries = self.lock();
        Ok(match entries.map.get(key) {
            Some((value, cas)) => ((!value.is_empty()).then(|| value.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let mut entries = self.lock();
        let current = entries.map.get(key).map(|e| e.1);
        if !crate::core::store::cas_admits(cas, current) {
            return Err(StoreError::CasMismatch);
        }
        let next = entries.last_cas.wrapping_add(1).max(1);
        entries.last_cas = next;
        entries.map.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn follows_envoys_cas_rules() {
        let h = InProcessShared::new();
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
        h.set("k", b"", None).unwrap();
        let (v, cas) = h.get("k").unwrap();
        assert_eq!(v, None, "a removed entry has no value");
        assert!(cas.is_some(), "but keeps a CAS number");
        assert_eq!(
            h.set("k", b"e", Some(crate::core::store::CREATE_CAS)),
            Err(StoreError::CasMismatch),
            "CREATE_CAS loses to an entry someone else created"
        );
    }

    /// Two workers' read-modify-write loops lose no update: the property the core's CAS loop
    /// relies on when workers change the same pool at once.
    #[test]
    fn concurrent_cas_loops_lose_no_update() {
        let h = Arc::new(InProcessShared::new());
        let per_thread = 2000u32;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = Arc::clone(&h);
                std::thread::spawn(move || {
                    for _ in 0..per_thread {
                        loop {
                            let (v, cas) = h.get("n").unwrap();
                            let n = v
                                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                                .unwrap_or(0);
                            let write = h.set(
                                "n",
                                &(n + 1).to_le_bytes(),
                                Some(cas.unwrap_or(crate::core::store::CREATE_CAS)),
                            );
                            if write.is_ok() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (v, _) = h.get("n").unwrap();
        assert_eq!(
            u32::from_le_bytes(v.unwrap().try_into().unwrap()),
            4 * per_thread
        );
    }
}
