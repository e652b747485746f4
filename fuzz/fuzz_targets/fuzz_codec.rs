//! schema::decode_state of arbitrary shared-data bytes: never panics, and whatever decodes encodes back
//! to exactly the same bytes; reconciling it with any key list never panics either.
//! schema::decode_previous_state (the previous build's format, read on load) never panics either.
//! Random bytes almost never carry a valid checksum, so each input is also tried with its correct
//! checksum appended: that reaches the header and record checks behind it.
#![no_main]

use ai_key_failover::core::{pool::PoolState, schema};
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    if let Ok(previous) = schema::decode_previous_state(data) {
        assert!(previous.keys.len() <= schema::MAX_KEYS);
    }
    let Ok(state) = schema::decode_state(data) else {
        return;
    };
    assert_eq!(
        schema::encode_state(&state),
        data,
        "decode/encode is not a round trip"
    );
    assert!(state.keys.len() <= schema::MAX_KEYS);
    // Lay the stored state over a key list made of its own fingerprints, shifted, plus a new one.
    let mut fps: Vec<u64> = state.keys.iter().map(|k| k.fingerprint).collect();
    let half = fps.len() / 2;
    fps.rotate_left(half);
    fps.push(0x5eed);
    let (merged, _) = PoolState::reconcile(state.clone(), &fps);
    assert_eq!(merged.keys.len(), fps.len());
    for (k, fp) in merged.keys.iter().zip(&fps) {
        assert_eq!(k.fingerprint, *fp);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut signed = data.to_vec();
    signed.extend_from_slice(&schema::fnv1a32(data).to_le_bytes());
    check(&signed);
});
