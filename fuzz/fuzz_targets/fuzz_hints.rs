//! Provider retry hints: every header format, Gemini's body, insufficient_quota, on arbitrary
//! input. Input layout (readable, so seeds are plain text): an optional first line `@<now_ms>`,
//! then header lines `name: value` up to an empty line, then the response body.
//! Never panics; a hint is never longer than a year.
#![no_main]

use ai_key_failover::core::hints;
use libfuzzer_sys::fuzz_target;

const YEAR_MS: u64 = 365 * 24 * 60 * 60 * 1000;
const DEFAULT_NOW_MS: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn split_once<'a>(data: &'a [u8], sep: &[u8]) -> Option<(&'a [u8], &'a [u8])> {
    let at = data.windows(sep.len()).position(|w| w == sep)?;
    Some((&data[..at], &data[at + sep.len()..]))
}

fuzz_target!(|data: &[u8]| {
    let (mut now_ms, mut rest) = (DEFAULT_NOW_MS, data);
    if let Some(after) = rest.strip_prefix(b"@") {
        let (line, tail) = split_once(after, b"\n").unwrap_or((after, b""));
        if let Some(n) = std::str::from_utf8(line).ok().and_then(|s| s.parse().ok()) {
            now_ms = n;
        }
        rest = tail;
    }
    let (head, body) = split_once(rest, b"\n\n").unwrap_or((rest, b""));
    let mut names = Vec::new();
    let mut values: Vec<&[u8]> = Vec::new();
    for line in head.split(|&b| b == b'\n') {
        let Some((name, value)) = split_once(line, b":") else {
            continue;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        names.push(String::from_utf8_lossy(name).to_ascii_lowercase());
        values.push(value);
    }
    let headers: Vec<(&str, &[u8])> = names
        .iter()
        .map(String::as_str)
        .zip(values.iter().copied())
        .collect();

    for body in [None, Some(body)] {
        if let Some(ms) = hints::retry_hint_ms(&headers, body, now_ms) {
            assert!(ms <= YEAR_MS, "a hint of {ms} ms was accepted");
        }
    }
    let _ = hints::is_insufficient_quota(body);
    for v in &values {
        if let Ok(s) = std::str::from_utf8(v) {
            let _ = hints::parse_go_duration_ms(s);
            let _ = hints::parse_http_date_ms(s);
            let _ = hints::parse_rfc3339_ms(s);
        }
    }
    if let Ok(s) = std::str::from_utf8(body) {
        let _ = hints::parse_go_duration_ms(s);
        let _ = hints::parse_http_date_ms(s);
        let _ = hints::parse_rfc3339_ms(s);
    }
});
