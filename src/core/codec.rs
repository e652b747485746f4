//! The byte layout of a pool's state in proxy shared data.
//!
//! Fixed-size little-endian records, so decoding is a bounded loop with no allocation per field
//! and a corrupt or foreign entry is recognised (magic, version, length, checksum) rather than
//! misread. Layout: `AKF` version(1) written_at_ms(u64) count(u32) then per key
//! fingerprint(u64) health(u8) consecutive_failures(u32) strikes(u32) down_since_ms(u64)
//! down_until_ms(u64) probe_until_ms(u64),
//! then an FNV-1a checksum (u32) of everything before it.
//!
//! The version is that of the whole shared-data schema, and the entries' names carry it too
//! (`store::KEY_SPACE`), so two builds with different versions loaded under one `vm_id` during an
//! upgrade each keep their own entries instead of overwriting each other's. Version 3 keeps the
//! record layout of version 2; what changed is the key space and that every entry exists from the
//! start (see `store`). Version 2 is still read (`decode_previous`) so a new build starts from
//! what the previous one knew; a version newer than ours is reported as such
//! (`DecodeError::NewerVersion`) so it is left alone rather than replaced.

use crate::core::pool::{Health, KeyState, PoolState};

const MAGIC: &[u8; 3] = b"AKF";
pub const VERSION: u8 = 3;
/// The version the previous build wrote, read on load (same record layout).
pub const PREVIOUS_VERSION: u8 = 2;
const HEADER_LEN: usize = 3 + 1 + 8 + 4;
const RECORD_LEN: usize = 8 + 1 + 4 + 4 + 8 + 8 + 8;
const CHECKSUM_LEN: usize = 4;
/// Far above any real pool; bounds what a corrupt length field can make us allocate.
pub const MAX_KEYS: usize = 100_000;

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    TooShort,
    BadMagic,
    /// An older version this build no longer reads.
    UnknownVersion(u8),
    /// Written by a newer build: not ours to replace.
    NewerVersion(u8),
    LengthMismatch,
    BadChecksum,
    BadHealth(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooShort => f.write_str("entry too short"),
            DecodeError::BadMagic => f.write_str("not an ai-key-failover state entry"),
            DecodeError::UnknownVersion(v) => write!(f, "unknown state version {v}"),
            DecodeError::NewerVersion(v) => write!(
                f,
                "state version {v} is newer than this build's {VERSION}; left as is"
            ),
            DecodeError::LengthMismatch => f.write_str("length does not match key count"),
            DecodeError::BadChecksum => f.write_str("checksum mismatch"),
            DecodeError::BadHealth(h) => write!(f, "unknown key health {h}"),
        }
    }
}

pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in bytes {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

pub fn encode(state: &PoolState) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + state.keys.len() * RECORD_LEN + CHECKSUM_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&state.written_at_ms.to_le_bytes());
    out.extend_from_slice(&(state.keys.len() as u32).to_le_bytes());
    for key in &state.keys {
        out.extend_from_slice(&key.fingerprint.to_le_bytes());
        out.push(match key.health {
            Health::Available => 0,
            Health::CoolingDown => 1,
            Health::Disabled => 2,
            Health::Probing => 3,
            Health::Spent => 4,
        });
        out.extend_from_slice(&key.consecutive_failures.to_le_bytes());
        out.extend_from_slice(&key.strikes.to_le_bytes());
        out.extend_from_slice(&key.down_since_ms.to_le_bytes());
        out.extend_from_slice(&key.down_until_ms.to_le_bytes());
        out.extend_from_slice(&key.probe_until_ms.to_le_bytes());
    }
    let checksum = fnv1a32(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(DecodeError::TooShort)?;
        self.rest = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

/// An entry in this build's format.
pub fn decode(bytes: &[u8]) -> Result<PoolState, DecodeError> {
    decode_version(bytes, VERSION)
}

/// An entry in the previous build's format (what it left under its own key names).
pub fn decode_previous(bytes: &[u8]) -> Result<PoolState, DecodeError> {
    decode_version(bytes, PREVIOUS_VERSION)
}

fn decode_version(bytes: &[u8], expected: u8) -> Result<PoolState, DecodeError> {
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(DecodeError::TooShort);
    }
    let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    let mut r = Reader { rest: body };
    if &r.take::<3>()? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = r.u8()?;
    // The checksum comes before the version check so that a damaged version byte reads as
    // damage (replaced) and not as a newer build's entry (left alone). Every version keeps
    // magic and version first and this checksum last, so an intact newer entry is recognised.
    let stored_checksum =
        u32::from_le_bytes(checksum.try_into().map_err(|_| DecodeError::TooShort)?);
    if fnv1a32(body) != stored_checksum {
        return Err(DecodeError::BadChecksum);
    }
    if version > VERSION {
        return Err(DecodeError::NewerVersion(version));
    }
    if version != expected {
        return Err(DecodeError::UnknownVersion(version));
    }
    let written_at_ms = r.u64()?;
    let count = r.u32()? as usize;
    if count > MAX_KEYS || r.rest.len() != count * RECORD_LEN {
        return Err(DecodeError::LengthMismatch);
    }
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        let fingerprint = r.u64()?;
        let health = match r.u8()? {
            0 => Health::Available,
            1 => Health::CoolingDown,
            2 => Health::Disabled,
            3 => Health::Probing,
            4 => Health::Spent,
            other => return Err(DecodeError::BadHealth(other)),
        };
        keys.push(KeyState {
            fingerprint,
            health,
            consecutive_failures: r.u32()?,
            strikes: r.u32()?,
            down_since_ms: r.u64()?,
            down_until_ms: r.u64()?,
            probe_until_ms: r.u64()?,
        });
    }
    Ok(PoolState {
        written_at_ms,
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    fn sample() -> PoolState {
        let mut s = PoolState::fresh(&[11, 22, u64::MAX, 44]);
        s.keys[1].health = Health::CoolingDown;
        s.keys[1].down_since_ms = 1_700_000_000_000;
        s.keys[1].down_until_ms = 1_700_000_060_000;
        s.keys[1].strikes = 2;
        s.keys[2].consecutive_failures = 3;
        s.keys[2].health = Health::Disabled;
        s.keys[2].down_until_ms = crate::core::pool::FOREVER;
        s.keys[3].health = Health::Probing;
        s.keys[3].probe_until_ms = 99;
        s.keys[0].health = Health::Spent;
        s.keys[0].down_until_ms = 1_700_000_001_000;
        s.written_at_ms = 1_700_000_000_123;
        s
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(decode(&encode(&s)).unwrap(), s);
        let empty = PoolState::default();
        assert_eq!(decode(&encode(&empty)).unwrap(), empty);
    }

    /// `bytes` with its checksum made right again, as a writer of that content would have left it.
    fn signed(mut bytes: Vec<u8>) -> Vec<u8> {
        let body = bytes.len() - CHECKSUM_LEN;
        let checksum = fnv1a32(&bytes[..body]);
        bytes[body..].copy_from_slice(&checksum.to_le_bytes());
        bytes
    }

    fn with_version(bytes: &[u8], version: u8) -> Vec<u8> {
        let mut v = bytes.to_vec();
        v[3] = version;
        signed(v)
    }

    #[test]
    fn rejects_every_kind_of_damage() {
        let good = encode(&sample());
        assert_eq!(decode(&[]), Err(DecodeError::TooShort));
        assert_eq!(decode(&good[..5]), Err(DecodeError::TooShort));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(DecodeError::BadMagic));
        let newer = with_version(&good, 9);
        assert_eq!(decode(&newer), Err(DecodeError::NewerVersion(9)));
        assert_eq!(decode_previous(&newer), Err(DecodeError::NewerVersion(9)));
        let mut flipped = good.clone();
        flipped[3] = 9;
        assert_eq!(
            decode(&flipped),
            Err(DecodeError::BadChecksum),
            "a damaged version byte is damage, not a newer build"
        );
        assert_eq!(
            decode(&with_version(&good, 1)),
            Err(DecodeError::UnknownVersion(1)),
            "an older layout is refused, not misread"
        );
        assert_eq!(decode_previous(&good), Err(DecodeError::UnknownVersion(3)));
        let mut bad = good.clone();
        bad[12] = 200;
        assert_eq!(decode(&signed(bad)), Err(DecodeError::LengthMismatch));
        let mut bad = good.clone();
        bad[20] ^= 1;
        assert_eq!(decode(&bad), Err(DecodeError::BadChecksum));
        let short = good[..good.len() - 1].to_vec();
        assert_eq!(decode(&signed(short)), Err(DecodeError::LengthMismatch));
    }

    #[test]
    fn the_previous_format_is_read_only_through_decode_previous() {
        let s = sample();
        let old = with_version(&encode(&s), PREVIOUS_VERSION);
        assert_eq!(decode_previous(&old).unwrap(), s);
        assert_eq!(
            decode(&old),
            Err(DecodeError::UnknownVersion(PREVIOUS_VERSION))
        );
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_or_a_valid_state() {
        let good = encode(&sample());
        for len in 0..good.len() {
            let _ = decode(&good[..len]);
        }
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert!(decode(&bad).is_err(), "flip at {i}:{bit} went unnoticed");
            }
        }
    }
}
