//! Small helpers: Go-style durations, API-key extraction, key hints for logs.

use std::time::Duration;

use axum::http::HeaderMap;

/// Formats a duration like Go's `time.Duration.String()`:
/// `0s`, `850ms`, `1.5µs`, `1s`, `9.873s`, `6m0s`, `1h0m0s`.
/// OpenAI sends `x-ratelimit-reset-requests` in this format.
pub fn go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".to_string();
    }
    if ns < 1_000_000_000 {
        // Below one second Go picks ns, µs or ms and prints a decimal fraction.
        let (unit, div, digits) = if ns < 1_000 {
            ("ns", 1u128, 0usize)
        } else if ns < 1_000_000 {
            ("µs", 1_000, 3)
        } else {
            ("ms", 1_000_000, 6)
        };
        return format!("{}{}{}", ns / div, fraction(ns % div, digits), unit);
    }
    let secs = ns / 1_000_000_000;
    let frac = fraction(ns % 1_000_000_000, 9);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{s}{frac}s"));
    out
}

/// `.ddd` with `digits` places and trailing zeros removed; empty when zero.
fn fraction(value: u128, digits: usize) -> String {
    if value == 0 || digits == 0 {
        return String::new();
    }
    let s = format!("{value:0digits$}");
    format!(".{}", s.trim_end_matches('0'))
}

/// Removes a leading `Bearer ` / `Token ` word (case-insensitive) and trims;
/// a lone `Bearer` gives an empty key.
fn strip_scheme(value: &str) -> &str {
    let v = value.trim();
    for scheme in ["bearer", "token"] {
        if v.eq_ignore_ascii_case(scheme) {
            return "";
        }
        if let (Some(head), Some(rest)) = (v.get(..scheme.len()), v.get(scheme.len()..)) {
            if head.eq_ignore_ascii_case(scheme) && rest.starts_with([' ', '\t']) {
                return rest.trim();
            }
        }
    }
    v
}

fn header_lossy(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Extracts the API key of a provider request. First match wins:
/// `authorization` (`Bearer <k>` or a bare value), `x-api-key`, `api-key`,
/// `x-goog-api-key`, query parameter `key`, then the configured extra headers
/// (whole value, a leading `Bearer `/`Token ` word stripped). Empty values are
/// skipped. Non-UTF-8 bytes are converted lossily (such a key never matches).
pub fn extract_key(headers: &HeaderMap, query: Option<&str>, extra: &[String]) -> Option<String> {
    if let Some(v) = header_lossy(headers, "authorization") {
        let k = strip_scheme(&v);
        if !k.is_empty() {
            return Some(k.to_string());
        }
    }
    for name in ["x-api-key", "api-key", "x-goog-api-key"] {
        if let Some(v) = header_lossy(headers, name) {
            let k = v.trim();
            if !k.is_empty() {
                return Some(k.to_string());
            }
        }
    }
    if let Some(k) = query.and_then(|q| query_param(q, "key")) {
        if !k.is_empty() {
            return Some(k);
        }
    }
    for name in extra {
        if let Some(v) = header_lossy(headers, name) {
            let k = strip_scheme(&v);
            if !k.is_empty() {
                return Some(k.to_string());
            }
        }
    }
    None
}

/// First value of query parameter `name`, form-decoded (`+` is a space).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(v) = hex {
                    out.push(v);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A short, non-secret hint of a key for logs: at most its last 4 characters
/// (fewer for short keys, never more than half of the key).
pub fn key_hint(key: Option<&str>) -> String {
    match key {
        None => "-".to_string(),
        Some(k) => {
            let chars: Vec<char> = k.chars().collect();
            let n = (chars.len() / 2).min(4);
            let tail: String = chars.iter().skip(chars.len() - n).collect();
            format!("…{tail}")
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn go_duration_matches_go() {
        let ms = Duration::from_millis;
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(ms(850)), "850ms");
        assert_eq!(go_duration(ms(1)), "1ms");
        assert_eq!(go_duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(go_duration(Duration::from_nanos(1500)), "1.5µs");
        assert_eq!(go_duration(Duration::from_nanos(7)), "7ns");
        assert_eq!(go_duration(ms(1000)), "1s");
        assert_eq!(go_duration(ms(1500)), "1.5s");
        assert_eq!(go_duration(ms(9873)), "9.873s");
        assert_eq!(go_duration(ms(60_000)), "1m0s");
        assert_eq!(go_duration(ms(360_000)), "6m0s");
        assert_eq!(go_duration(ms(61_500)), "1m1.5s");
        assert_eq!(go_duration(ms(3_600_000)), "1h0m0s");
        assert_eq!(go_duration(ms(3_723_000)), "1h2m3s");
        assert_eq!(
            go_duration(Duration::from_nanos(1_000_000_001)),
            "1.000000001s"
        );
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn extracts_keys_in_order() {
        let none: &[String] = &[];
        let h = headers(&[("authorization", b"Bearer sk-a"), ("x-api-key", b"sk-b")]);
        assert_eq!(
            extract_key(&h, Some("key=sk-q"), none).as_deref(),
            Some("sk-a")
        );
        let h = headers(&[("authorization", b"bearer   sk-a ")]);
        assert_eq!(extract_key(&h, None, none).as_deref(), Some("sk-a"));
        let h = headers(&[("authorization", b"sk-bare")]);
        assert_eq!(extract_key(&h, None, none).as_deref(), Some("sk-bare"));
        let h = headers(&[("authorization", b"Bearer "), ("x-api-key", b"sk-b")]);
        assert_eq!(extract_key(&h, None, none).as_deref(), Some("sk-b"));
        let h = headers(&[("api-key", b"az"), ("x-goog-api-key", b"g")]);
        assert_eq!(extract_key(&h, None, none).as_deref(), Some("az"));
        let h = headers(&[("x-goog-api-key", b"g")]);
        assert_eq!(extract_key(&h, Some("key=q"), none).as_deref(), Some("g"));
        let h = HeaderMap::new();
        assert_eq!(
            extract_key(&h, Some("alt=sse&key=AIza%2Bx"), none).as_deref(),
            Some("AIza+x")
        );
        assert_eq!(extract_key(&h, Some("keys=1&k=2"), none), None);
        assert_eq!(extract_key(&h, None, none), None);
        let extra = vec!["x-custom-auth".to_string()];
        let h = headers(&[("x-custom-auth", b"Token abc")]);
        assert_eq!(extract_key(&h, None, &extra).as_deref(), Some("abc"));
        let h = headers(&[("x-custom-auth", b"plain")]);
        assert_eq!(extract_key(&h, None, &extra).as_deref(), Some("plain"));
        assert_eq!(extract_key(&h, None, none), None);
        // Non-UTF-8 bytes do not panic; they are converted lossily.
        let h = headers(&[("x-api-key", b"k\xff\xfe")]);
        assert_eq!(
            extract_key(&h, None, none).as_deref(),
            Some("k\u{fffd}\u{fffd}")
        );
    }

    #[test]
    fn percent_decoding_is_lenient() {
        assert_eq!(percent_decode("a%zzb%4"), "a%zzb%4");
        assert_eq!(percent_decode("%41+b"), "A b");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
    }

    #[test]
    fn key_hints_never_show_whole_key() {
        assert_eq!(key_hint(None), "-");
        assert_eq!(key_hint(Some("demo-key-1")), "…ey-1");
        assert_eq!(key_hint(Some("sk-abcdefghijklmnop")), "…mnop");
        assert_eq!(key_hint(Some("abc")), "…c");
        assert_eq!(key_hint(Some("a")), "…");
    }
}
