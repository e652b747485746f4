//! header_map::deserialize_header_map on arbitrary bytes (what the host hands the VM): never panics,
//! never allocates beyond the input, and what it returns serializes and parses back the same.
#![no_main]

use ai_key_failover::wasm::header_map;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pairs = header_map::deserialize_header_map(data);
    let total: usize = pairs.iter().map(|(n, v)| n.len() + v.len()).sum();
    // Lossy UTF-8 may grow a name up to 3x (U+FFFD for each bad byte).
    assert!(total <= data.len() * 3, "more bytes out than in");
    let borrowed: Vec<(&str, &[u8])> = pairs
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    let again = header_map::deserialize_header_map(&header_map::serialize_header_map(&borrowed));
    assert_eq!(again, pairs);
});
