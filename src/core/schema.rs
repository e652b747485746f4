//! Every entry the plugin keeps in proxy shared data: its name and the bytes of its value.
//!
//! | entry | name | value |
//! | --- | --- | --- |
//! | pool state | `ai-key-failover/v3/<pool id, 16 hex digits>/state` | the state record (below) |
//! | epoch | `.../epoch` | empty: only its CAS number, which moves with every write, is read |
//! | health-check lease | `.../health-lease` | owner(u64) until_ms(u64) |
//! | learned target | `.../target` | `cluster` `\n` `authority`, UTF-8 |
//! | registry of pools | `ai-key-failover/v3/pools` | pool ids (u64 each), oldest first |
//! | previous build's registry | `ai-key-failover/v1/pools` | as ours; read on load only |
//! | previous build's state | `ai-key-failover/v1/<pool id>/state` | state record version 2 |
//!
//! Integers are little-endian. The key space carries the schema version (`VERSION`), so two
//! builds with different versions loaded under one `vm_id` during an upgrade each keep their own
//! entries instead of overwriting each other's. Every value here is read as hostile input (another
//! build, another plugin, or damage may have written it): decoding never panics, never trusts a
//! length, and says what it found instead of misreading. Arithmetic is checked by the lint below.
//!
//! The state record: fixed-size records, so decoding is a bounded loop with no allocation per
//! field and a corrupt or foreign entry is recognised (magic, version, length, checksum) rather
//! than misread. Layout: `AKF` version(1) written_at_ms(u64) count(u32) then per key
//! fingerprint(u64) health(u8) consecutive_failures(u32) strikes(u32) down_since_ms(u64)
//! down_until_ms(u64) probe_until_ms(u64), then an FNV-1a checksum (u32) of everything before it.
//! Version 3 keeps the record layout of version 2; what changed is the key space and that every
//! entry exists from the start (see `store`). Version 2 is still read (`decode_previous_state`)
//! so a new build starts from what the previous one knew; a version newer than ours is reported
//! as such (`DecodeError::NewerVersion`) so it is left alone rather than replaced.

#![deny(clippy::arithmetic_side_effects)]

use crate::core::pool::{Health, KeyState, PoolState};

/// This build's key space; the name carries `VERSION`.
pub const KEY_SPACE: &str = "ai-key-failover/v3";

/// Lists the pools configured so far (newest last), so a new config can take over the state of
/// keys it keeps from the pools it replaces.
pub const REGISTRY_KEY: &str = "ai-key-failover/v3/pools";

/// The names of one pool's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKeys {
    /// Every key's record.
    pub state: String,
    /// Rewritten (empty) after each change of `state`.
    pub epoch: String,
    pub lease: String,
    pub target: String,
}

impl PoolKeys {
    pub fn of(pool_id: u64) -> Self {
        let prefix = format!("{KEY_SPACE}/{pool_id:016x}");
        PoolKeys {
            state: format!("{prefix}/state"),
            epoch: format!("{prefix}/epoch"),
            lease: format!("{prefix}/health-lease"),
            target: format!("{prefix}/target"),
        }
    }

    /// `state` first, then those created empty on config load.
    pub fn all(&self) -> [&str; 4] {
        [&self.state, &self.epoch, &self.lease, &self.target]
    }
}

/// Where the previous build (state record `PREVIOUS_VERSION`) keeps its entries. Read on config
/// load so a key it had taken out stays out; never written, since that build may still be
/// serving draining connections from them.
pub mod previous {
    pub const REGISTRY_KEY: &str = "ai-key-failover/v1/pools";

    pub fn state_key(pool_id: u64) -> String {
        format!("ai-key-failover/v1/{pool_id:016x}/state")
    }
}

/// The registry's pool ids; a trailing partial id (damage) is dropped.
pub fn decode_registry(bytes: Option<&[u8]>) -> Vec<u64> {
    bytes
        .unwrap_or_default()
        .chunks_exact(8)
        .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
        .collect()
}

pub fn encode_registry(pool_ids: &[u64]) -> Vec<u8> {
    pool_ids.iter().flat_map(|id| id.to_le_bytes()).collect()
}

/// Who runs a pool's health checks, and until when unless renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub owner: u64,
    pub until_ms: u64,
}

pub fn encode_lease(lease: Lease) -> Vec<u8> {
    let mut value = lease.owner.to_le_bytes().to_vec();
    value.extend_from_slice(&lease.until_ms.to_le_bytes());
    value
}

/// None for an empty or short value: nobody holds the lease.
pub fn decode_lease(bytes: &[u8]) -> Option<Lease> {
    let (owner, rest) = bytes.split_first_chunk::<8>()?;
    let (until, _) = rest.split_first_chunk::<8>()?;
    Some(Lease {
        owner: u64::from_le_bytes(*owner),
        until_ms: u64::from_le_bytes(*until),
    })
}

/// Where health checks go, as learned from live traffic.
pub fn encode_target(cluster: &str, authority: &str) -> Vec<u8> {
    format!("{cluster}\n{authority}").into_bytes()
}

pub fn decode_target(bytes: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (cluster, authority) = text.split_once('\n')?;
    (!cluster.is_empty()).then(|| (cluster.to_string(), authority.to_string()))
}

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

pub fn encode_state(state: &PoolState) -> Vec<u8> {
    let records = state.keys.len().saturating_mul(RECORD_LEN);
    let mut out = Vec::with_capacity(records.saturating_add(HEADER_LEN + CHECKSUM_LEN));
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

/// A state entry in this build's format.
pub fn decode_state(bytes: &[u8]) -> Result<PoolState, DecodeError> {
    decode_version(bytes, VERSION)
}

/// A state entry in the previous build's format (what it left under its own key names).
pub fn decode_previous_state(bytes: &[u8]) -> Result<PoolState, DecodeError> {
    decode_version(bytes, PREVIOUS_VERSION)
}

fn decode_version(bytes: &[u8], expected: u8) -> Result<PoolState, DecodeError> {
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(DecodeError::TooShort);
    }
    let (body, checksum) = bytes
        .split_last_chunk::<CHECKSUM_LEN>()
        .ok_or(DecodeError::TooShort)?;
    let mut r = Reader { rest: body };
    if &r.take::<3>()? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = r.u8()?;
    // The checksum comes before the version check so that a damaged version byte reads as
    // damage (replaced) and not as a newer build's entry (left alone). Every version keeps
    // magic and version first and this checksum last, so an intact newer entry is recognised.
    if fnv1a32(body) != u32::from_le_bytes(*checksum) {
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
    if count > MAX_KEYS || count.checked_mul(RECORD_LEN) != Some(r.rest.len()) {
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

/// State entries as other builds would write them, for tests here and in `store`.
#[cfg(test)]
pub mod written_by {
    use super::*;

    /// `bytes` with its checksum made right again, as a writer of that content would have left it.
    pub fn signed(mut bytes: Vec<u8>) -> Vec<u8> {
        let (body, checksum) = bytes.split_last_chunk_mut::<CHECKSUM_LEN>().unwrap();
        *checksum = fnv1a32(body).to_le_bytes();
        bytes
    }

    /// A state entry with this content as a build of schema `version` would have written it.
    pub fn with_version(bytes: &[u8], version: u8) -> Vec<u8> {
        let mut v = bytes.to_vec();
        v[3] = version;
        signed(v)
    }
}

#[cfg(test)]
mod tests {
    use super::written_by::{signed, with_version};
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
    fn the_key_space_carries_the_format_version() {
        let version = format!("ai-key-failover/v{VERSION}");
        assert_eq!(KEY_SPACE, version);
        assert!(REGISTRY_KEY.starts_with(&format!("{version}/")));
        for key in PoolKeys::of(9).all() {
            assert!(key.starts_with(&format!("{version}/")), "{key}");
        }
        assert!(!previous::state_key(9).starts_with(&format!("{version}/")));
        assert!(!previous::REGISTRY_KEY.starts_with(&format!("{version}/")));
    }

    #[test]
    fn registry_lease_and_target_round_trip_and_junk_is_refused() {
        let ids = [1, u64::MAX, 0x1234];
        assert_eq!(decode_registry(Some(&encode_registry(&ids))), ids);
        let mut damaged = encode_registry(&ids);
        damaged.push(7);
        assert_eq!(
            decode_registry(Some(&damaged)),
            ids,
            "a partial id is dropped"
        );
        assert_eq!(decode_registry(None), Vec::<u64>::new());
        let lease = Lease {
            owner: 0xAB,
            until_ms: u64::MAX,
        };
        assert_eq!(decode_lease(&encode_lease(lease)), Some(lease));
        assert_eq!(decode_lease(&encode_lease(lease)[..15]), None);
        assert_eq!(decode_lease(&[]), None);
        assert_eq!(
            decode_target(&encode_target(
                "outbound|443||api.openai.com",
                "api.openai.com"
            )),
            Some((
                "outbound|443||api.openai.com".into(),
                "api.openai.com".into()
            ))
        );
        assert_eq!(decode_target(b"no newline"), None);
        assert_eq!(decode_target(b"\nauthority"), None);
        assert_eq!(decode_target(b"\xff\n"), None);
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(decode_state(&encode_state(&s)).unwrap(), s);
        let empty = PoolState::default();
        assert_eq!(decode_state(&encode_state(&empty)).unwrap(), empty);
    }

    #[test]
    fn rejects_every_kind_of_damage() {
        let good = encode_state(&sample());
        assert_eq!(decode_state(&[]), Err(DecodeError::TooShort));
        assert_eq!(decode_state(&good[..5]), Err(DecodeError::TooShort));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode_state(&bad), Err(DecodeError::BadMagic));
        let newer = with_version(&good, 9);
        assert_eq!(decode_state(&newer), Err(DecodeError::NewerVersion(9)));
        assert_eq!(
            decode_previous_state(&newer),
            Err(DecodeError::NewerVersion(9))
        );
        let mut flipped = good.clone();
        flipped[3] = 9;
        assert_eq!(
            decode_state(&flipped),
            Err(DecodeError::BadChecksum),
            "a damaged version byte is damage, not a newer build"
        );
        assert_eq!(
            decode_state(&with_version(&good, 1)),
            Err(DecodeError::UnknownVersion(1)),
            "an older layout is refused, not misread"
        );
        assert_eq!(
            decode_previous_state(&good),
            Err(DecodeError::UnknownVersion(3))
        );
        let mut bad = good.clone();
        bad[12] = 200;
        assert_eq!(decode_state(&signed(bad)), Err(DecodeError::LengthMismatch));
        let mut bad = good.clone();
        bad[20] ^= 1;
        assert_eq!(decode_state(&bad), Err(DecodeError::BadChecksum));
        let short = good[..good.len() - 1].to_vec();
        assert_eq!(
            decode_state(&signed(short)),
            Err(DecodeError::LengthMismatch)
        );
    }

    #[test]
    fn the_previous_format_is_read_only_through_decode_previous() {
        let s = sample();
        let old = with_version(&encode_state(&s), PREVIOUS_VERSION);
        assert_eq!(decode_previous_state(&old).unwrap(), s);
        assert_eq!(
            decode_state(&old),
            Err(DecodeError::UnknownVersion(PREVIOUS_VERSION))
        );
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_or_a_valid_state() {
        let good = encode_state(&sample());
        for len in 0..good.len() {
            let _ = decode_state(&good[..len]);
        }
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    decode_state(&bad).is_err(),
                    "flip at {i}:{bit} went unnoticed"
                );
            }
        }
    }
}
