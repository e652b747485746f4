//! The native host: the same core as the wasm filter, as an Envoy dynamic module (a `cdylib`
//! loaded by `envoy.filters.http.dynamic_modules`; `make build-native`).
//!
//! `shared` (the in-process store) builds on every host target so `cargo test` covers it; the
//! ABI layer (`abi`), the filter (`filter`) and the requests `onAllUnavailable: wait` holds
//! (`waiting`) build only with the `native` feature, since they call into Envoy.

pub mod shared;

// Envoy's C ABI: the one place of the native host that may use `unsafe`.
#[cfg(feature = "native")]
#[allow(unsafe_code)]
mod abi;
#[cfg(feature = "native")]
mod filter;
#[cfg(feature = "native")]
mod waiting;

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs a hook's body; a panic is logged and answered with `fallback`. A panic unwinding into
/// Envoy's C++ would abort the process, so every exported hook runs under this (the native
/// profile unwinds for it).
pub fn guard<T>(hook: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(_) => {
            log::error!("panic in {hook}; passing the request through unchanged");
            fallback
        }
    }
}

#[cfg(test)]
mod tests {
    use super::guard;

    #[test]
    fn a_panicking_hook_answers_with_its_fallback() {
        let status = guard("test_hook", 0u32, || -> u32 {
            let empty: Vec<u32> = Vec::new();
            empty[3]
        });
        assert_eq!(status, 0);
        assert_eq!(guard("test_hook", 0u32, || 7), 7);
    }
}
