//! Pool state shared by every worker of the process, for the native host.
//!
//! A dynamic module is loaded once per Envoy process, so one process-wide map behind a mutex
//! plays the part proxy shared data plays for wasm. It is the core's `store::CasMap`, which keeps
//! Envoy's rules exactly (the core's tests run on it too), so the store and its CAS loop run
//! unchanged: every write takes the next number of one counter; a
//! write with CAS `None` or 0 is unconditional; a CAS write to an absent entry succeeds whatever
//! the number; a removal (an empty value) reads back as `(None, Some(cas))`. Like proxy shared
//! data it outlives configuration updates (Envoy keeps the module loaded) but not a restart.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::core::store::{CasMap, SharedData, StoreError};

pub struct InProcessShared {
    entries: Mutex<CasMap>,
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
            entries: Mutex::new(CasMap::new()),
        }
    }

    /// A panic elsewhere while the lock was held leaves the map whole (each operation is one
    /// insert), so a poisoned lock is taken as it is rather than failing every later request.
    fn lock(&self) -> MutexGuard<'_, CasMap> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SharedData for InProcessShared {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        Ok(self.lock().get(key))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.lock().set(key, value, cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn follows_envoys_cas_rules() {
        crate::core::store::fake::check_envoys_rules(&InProcessShared::new());
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
