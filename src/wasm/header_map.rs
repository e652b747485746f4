//! The proxy-wasm ABI's serialized header map, both ways, without trusting the bytes.
//!
//! Layout: count(u32), then per pair name_len(u32) value_len(u32), then per pair
//! name NUL value NUL. All little-endian.

pub fn serialize_header_map(headers: &[(&str, &[u8])]) -> Vec<u8> {
    let size = 4 + headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 10)
        .sum::<usize>();
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

/// Pairs with lowercase names; stops at the first inconsistency instead of misreading.
pub fn deserialize_header_map(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let read_u32 = |at: usize| -> Option<usize> {
        let chunk = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(chunk.try_into().ok()?) as usize)
    };
    let Some(count) = read_u32(0) else {
        return Vec::new();
    };
    let Some(mut data) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return Vec::new();
    };
    let mut pairs = Vec::new();
    for i in 0..count {
        let (Some(name_len), Some(value_len)) = (read_u32(4 + i * 8), read_u32(8 + i * 8)) else {
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
