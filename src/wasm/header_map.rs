//! The proxy-wasm ABI's serialized header map, both ways, without trusting the bytes.
//!
//! Layout: count(u32), then per pair name_len(u32) value_len(u32), then per pair
//! name NUL value NUL. All little-endian.
//!
//! The bytes come from the host and say their own lengths: every offset is computed with
//! checked or saturating arithmetic (the lint below refuses any other), so lying lengths end
//! the read instead of wrapping around.

#![deny(clippy::arithmetic_side_effects)]

pub fn serialize_header_map(headers: &[(&str, &[u8])]) -> Vec<u8> {
    // Only a capacity: saturating is exact for any map that fits in memory.
    let size = headers.iter().fold(4usize, |size, (n, v)| {
        size.saturating_add(n.len())
            .saturating_add(v.len())
            .saturating_add(10)
    });
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (name, value) in headers {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

/// The little-endian u32 the bytes start with, as a length.
fn leading_u32(bytes: &[u8]) -> Option<usize> {
    bytes
        .first_chunk::<4>()
        .map(|c| u32::from_le_bytes(*c) as usize)
}

/// Pairs with lowercase names; stops at the first inconsistency instead of misreading.
pub fn deserialize_header_map(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let Some(count) = leading_u32(bytes) else {
        return Vec::new();
    };
    let Some(mut data) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return Vec::new();
    };
    // A table longer than the bytes is a lie about every pair: none is read.
    let Some(lengths) = bytes.get(4..data) else {
        return Vec::new();
    };
    let mut pairs = Vec::new();
    for entry in lengths.chunks_exact(8) {
        let (Some(name_len), Some(value_len)) =
            (leading_u32(entry), entry.get(4..).and_then(leading_u32))
        else {
            break;
        };
        let name_end = data.saturating_add(name_len);
        let value_start = name_end.saturating_add(1);
        let value_end = value_start.saturating_add(value_len);
        let (Some(name), Some(value)) =
            (bytes.get(data..name_end), bytes.get(value_start..value_end))
        else {
            break;
        };
        pairs.push((
            String::from_utf8_lossy(name).to_ascii_lowercase(),
            value.to_vec(),
        ));
        data = value_end.saturating_add(1);
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let headers: &[(&str, &[u8])] = &[
            (":status", b"429"),
            ("Retry-After", b"1"),
            ("x-bin", b"\xff\x00\x01"),
            ("empty", b""),
        ];
        let back = deserialize_header_map(&serialize_header_map(headers));
        assert_eq!(back.len(), 4);
        assert_eq!(back[1], ("retry-after".to_string(), b"1".to_vec()));
        assert_eq!(back[2].1, b"\xff\x00\x01".to_vec());
    }

    #[test]
    fn a_truncated_map_reads_as_the_pairs_it_still_holds_whole() {
        let pairs: &[(&str, &[u8])] = &[("a", b"1"), ("bb", b"22"), ("ccc", b"")];
        let good = serialize_header_map(pairs);
        let full = deserialize_header_map(&good);
        assert_eq!(full.len(), 3);
        for len in 0..good.len() {
            let read = deserialize_header_map(&good[..len]);
            assert!(full.starts_with(&read), "at {len}: {read:?}");
        }
    }

    #[test]
    fn survives_every_truncation_and_lying_counts() {
        let good = serialize_header_map(&[("a", b"1"), ("bb", b"22")]);
        for len in 0..good.len() {
            let _ = deserialize_header_map(&good[..len]);
        }
        let mut lying = good.clone();
        lying[0] = 0xff;
        lying[1] = 0xff;
        lying[2] = 0xff;
        lying[3] = 0xff;
        let _ = deserialize_header_map(&lying);
        let mut long_name = good;
        long_name[4] = 0xff;
        assert!(deserialize_header_map(&long_name).is_empty());
    }
}
