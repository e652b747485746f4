//! Provider retry hints: when a provider answers 429 it often says how long to wait, and a key's
//! cooldown should match the provider's limit window rather than a fixed guess.
//!
//! This module picks the hint: which header wins, what Anthropic's and OpenAI's per-limit resets
//! mean, Gemini's body `retryDelay`, OpenAI's `insufficient_quota`. The generic parsing of the
//! values (HTTP dates, RFC 3339, Go durations, decimals) is in `time`.
//!
//! Everything here reads bytes the upstream controls, so every parser is total: bad input gives
//! `None` (or `false`), never a panic, and the lint below has all arithmetic checked.
#![deny(clippy::arithmetic_side_effects)]

use serde_json::{Map, Value};

mod time;

use time::{ns_to_ms_ceil, Decimal, NS_PER_MS, NS_PER_S};
/// The value parsers other parts of the core (and the fuzz target) read header values with.
pub use time::{parse_go_duration_ms, parse_http_date_ms, parse_rfc3339_ms};

/// A hint beyond a year is treated as garbage: a key parked that long is as good as deleted, and a
/// typo'd or hostile header must not be able to do that.
const MAX_HINT_MS: u64 = 365 * 24 * 60 * 60 * 1000;

/// Error bodies are small; anything bigger is not an error body worth parsing on the request path
/// of a wasm worker.
const MAX_BODY_BYTES: usize = 64 * 1024;

const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// (reset, remaining) header pairs, one per Anthropic limit.
pub(crate) const ANTHROPIC_LIMITS: [(&str, &str); 4] = [
    (
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-requests-remaining",
    ),
    (
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-tokens-remaining",
    ),
    (
        "anthropic-ratelimit-input-tokens-reset",
        "anthropic-ratelimit-input-tokens-remaining",
    ),
    (
        "anthropic-ratelimit-output-tokens-reset",
        "anthropic-ratelimit-output-tokens-remaining",
    ),
];

/// Milliseconds until the provider says the key may be used again, from the response headers
/// (names lowercase, values raw bytes) and, when given, the (possibly truncated) response body.
/// None when no usable hint is present. `now_ms`: Unix time in ms (for absolute dates).
pub fn retry_hint_ms(headers: &[(&str, &[u8])], body: Option<&[u8]>, now_ms: u64) -> Option<u64> {
    first_valid(headers, "retry-after-ms", parse_ms_hint)
        .or_else(|| first_valid(headers, "x-ms-retry-after-ms", parse_ms_hint))
        .or_else(|| first_valid(headers, "retry-after", |v| retry_after(v, now_ms)))
        .or_else(|| openai_reset(headers))
        .or_else(|| anthropic_reset(headers, now_ms))
        .or_else(|| body.and_then(gemini_retry_delay))
}

/// True when the body is an error saying the account/key has no quota left (OpenAI
/// `{"error": {"type": "insufficient_quota", ...}}` or `"code": "insufficient_quota"`; also accept the
/// body being a JSON array whose first element has that shape). Bounded: never panics on junk.
pub fn is_insufficient_quota(body: &[u8]) -> bool {
    const QUOTA: &str = "insufficient_quota";
    let Some(root) = parse_error_body(body, QUOTA.as_bytes()) else {
        return false;
    };
    error_object(&root).is_some_and(|error| {
        ["type", "code"]
            .iter()
            .any(|key| error.get(*key).and_then(Value::as_str) == Some(QUOTA))
    })
}

/// The first occurrence of `name` whose value parses. Values are trimmed; non-UTF-8 values are
/// skipped like any other unparseable value.
pub(crate) fn first_valid<T>(
    headers: &[(&str, &[u8])],
    name: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Option<T> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .filter_map(|(_, value)| std::str::from_utf8(value).ok())
        .find_map(|value| parse(value.trim_matches(|c: char| c.is_ascii_whitespace())))
}

pub(crate) fn header_is_zero(headers: &[(&str, &[u8])], name: &str) -> bool {
    first_valid(headers, name, |v| {
        (!v.is_empty() && v.bytes().all(|b| b == b'0')).then_some(())
    })
    .is_some()
}

fn parse_ms_hint(value: &str) -> Option<u64> {
    ns_to_hint(Decimal::parse(value, false)?.ceil_ns(NS_PER_MS)?)
}

fn retry_after(value: &str, now_ms: u64) -> Option<u64> {
    match Decimal::parse(value, false) {
        Some(seconds) => ns_to_hint(seconds.ceil_ns(NS_PER_S)?),
        None => until(parse_http_date_ms(value)?, now_ms),
    }
}

/// OpenAI reports a reset per limit; the limit that is exhausted is the one to wait for. When the
/// headers do not say which, waiting for both is the safe choice.
fn openai_reset(headers: &[(&str, &[u8])]) -> Option<u64> {
    let go_hint = |v: &str| parse_go_duration_ms(v).and_then(cap);
    let requests = first_valid(headers, "x-ratelimit-reset-requests", go_hint);
    let tokens = first_valid(headers, "x-ratelimit-reset-tokens", go_hint);
    if requests.is_some() && header_is_zero(headers, "x-ratelimit-remaining-requests") {
        return requests;
    }
    if tokens.is_some() && header_is_zero(headers, "x-ratelimit-remaining-tokens") {
        return tokens;
    }
    requests.max(tokens)
}

/// Same reasoning as OpenAI, across Anthropic's four limits: wait for the exhausted ones, or for
/// all of them when none is reported exhausted.
fn anthropic_reset(headers: &[(&str, &[u8])], now_ms: u64) -> Option<u64> {
    let mut exhausted = None;
    let mut any = None;
    for (reset, remaining) in ANTHROPIC_LIMITS {
        let Some(ms) = first_valid(headers, reset, |v| until(parse_rfc3339_ms(v)?, now_ms)) else {
            continue;
        };
        any = any.max(Some(ms));
        if header_is_zero(headers, remaining) {
            exhausted = exhausted.max(Some(ms));
        }
    }
    exhausted.or(any)
}

fn gemini_retry_delay(body: &[u8]) -> Option<u64> {
    let root = parse_error_body(body, b"RetryInfo")?;
    error_object(&root)?
        .get("details")?
        .as_array()?
        .iter()
        .filter(|detail| detail.get("@type").and_then(Value::as_str) == Some(RETRY_INFO_TYPE))
        .find_map(|detail| parse_protobuf_duration_ms(detail.get("retryDelay")?.as_str()?))
}

/// The JSON mapping of `google.protobuf.Duration`: decimal seconds with an `s` suffix.
fn parse_protobuf_duration_ms(s: &str) -> Option<u64> {
    ns_to_hint(Decimal::parse(s.strip_suffix('s')?, false)?.ceil_ns(NS_PER_S)?)
}

/// Parses a body only when it could be the error we look for. The substring check skips the JSON
/// parse (and its allocations) for the common body that cannot match; a provider escaping plain
/// ASCII in a key or type name would defeat it, which none does.
fn parse_error_body(body: &[u8], needle: &[u8]) -> Option<Value> {
    if body.len() > MAX_BODY_BYTES || needle.is_empty() {
        return None;
    }
    if !body.windows(needle.len()).any(|window| window == needle) {
        return None;
    }
    // serde_json bounds nesting depth, so hostile deep nesting is an error, not a stack overflow.
    serde_json::from_slice(body).ok()
}

/// `error` of the body, or of its first element when the body is an array (Gemini and some
/// OpenAI-compatible gateways wrap the error that way).
fn error_object(root: &Value) -> Option<&Map<String, Value>> {
    let first = match root {
        Value::Array(items) => items.first()?,
        other => other,
    };
    first.get("error")?.as_object()
}

/// Time from now until an absolute instant; a past instant is no hint.
pub(crate) fn until(at_ms: u64, now_ms: u64) -> Option<u64> {
    cap(at_ms.checked_sub(now_ms)?)
}

pub(crate) fn cap(ms: u64) -> Option<u64> {
    (ms <= MAX_HINT_MS).then_some(ms)
}

fn ns_to_hint(ns: u128) -> Option<u64> {
    cap(u64::try_from(ns_to_ms_ceil(ns)?).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    type HeaderCases<'a> = &'a [(&'a [(&'a str, &'a str)], Option<u64>)];
    type RawHeaderCases<'a> = &'a [(&'a [(&'a str, &'a [u8])], Option<u64>)];

    use super::time::tests::{DAY_MS, MAY_2024_MS, RFC_EXAMPLE_MS};

    fn hint(headers: &[(&str, &str)], now_ms: u64) -> Option<u64> {
        let raw: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        retry_hint_ms(&raw, None, now_ms)
    }

    fn body_hint(body: &str) -> Option<u64> {
        retry_hint_ms(&[], Some(body.as_bytes()), 0)
    }

    #[test]
    fn millisecond_headers() {
        for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
            let cases: &[(&str, Option<u64>)] = &[
                ("1500", Some(1500)),
                ("0", Some(0)),
                ("1500.5", Some(1501)),
                ("1500.0", Some(1500)),
                ("0.001", Some(1)),
                (" 7 ", Some(7)),
                ("\t20\r\n", Some(20)),
                ("31536000000", Some(MAX_HINT_MS)),
                ("31536000000.1", None),
                ("31536000001", None),
                ("", None),
                ("   ", None),
                ("-1", None),
                ("-0", None),
                ("+5", None),
                ("NaN", None),
                ("inf", None),
                ("1e3", None),
                ("1e400", None),
                ("1.", None),
                (".5", None),
                ("1,5", None),
                ("1 5", None),
                ("1500ms", None),
                ("abc", None),
                ("99999999999999999999999999999999999999999999999", None),
            ];
            for (value, want) in cases {
                assert_eq!(hint(&[(name, value)], 0), *want, "{name}: {value:?}");
            }
        }
    }

    #[test]
    fn retry_after_header() {
        let now = RFC_EXAMPLE_MS;
        let cases: &[(&str, Option<u64>)] = &[
            ("120", Some(120_000)),
            ("0", Some(0)),
            (" 7 ", Some(7000)),
            ("1.5", Some(1500)),
            ("0.0001", Some(1)),
            ("31536000", Some(MAX_HINT_MS)),
            ("31536001", None),
            ("Sun, 06 Nov 1994 08:49:37 GMT", Some(0)),
            ("Sun, 06 Nov 1994 08:50:07 GMT", Some(30_000)),
            ("Sunday, 06-Nov-94 08:50:07 GMT", Some(30_000)),
            ("Sun Nov  6 08:50:07 1994", Some(30_000)),
            ("Sun, 06 Nov 1994 08:49:36 GMT", None),
            ("Mon, 06 Nov 1995 08:49:37 GMT", Some(365 * DAY_MS)),
            ("Wed, 06 Nov 1996 08:49:37 GMT", None),
            ("", None),
            ("-1", None),
            ("-0", None),
            ("NaN", None),
            ("inf", None),
            ("1e400", None),
            ("soon", None),
            ("120s", None),
        ];
        for (value, want) in cases {
            assert_eq!(hint(&[("retry-after", value)], now), *want, "{value:?}");
        }
    }

    #[test]
    fn openai_reset_headers() {
        let r = "x-ratelimit-reset-requests";
        let t = "x-ratelimit-reset-tokens";
        let rr = "x-ratelimit-remaining-requests";
        let rt = "x-ratelimit-remaining-tokens";
        let cases: HeaderCases = &[
            (&[(r, "1s")], Some(1000)),
            (&[(t, "6m0s")], Some(360_000)),
            (&[(r, "1s"), (t, "6m0s")], Some(360_000)),
            (&[(r, "1s"), (t, "6m0s"), (rr, "0")], Some(1000)),
            (&[(r, "1s"), (t, "6m0s"), (rr, "0"), (rt, "0")], Some(1000)),
            (
                &[(r, "1s"), (t, "6m0s"), (rr, "5"), (rt, "0")],
                Some(360_000),
            ),
            (&[(r, "9s"), (t, "20ms"), (rt, "0")], Some(20)),
            (
                &[(r, "9s"), (t, "20ms"), (rr, " 0 "), (rt, "0")],
                Some(9000),
            ),
            (&[(r, "9s"), (t, "20ms"), (rr, "10"), (rt, "1")], Some(9000)),
            // The exhausted limit's reset is missing or bad: fall back to the others.
            (&[(t, "20ms"), (rr, "0")], Some(20)),
            (&[(r, "bad"), (t, "20ms"), (rr, "0")], Some(20)),
            (&[(r, "1s"), (t, "bad"), (rt, "0")], Some(1000)),
            (&[(r, "1s"), (t, "-5s")], Some(1000)),
            (&[(r, "8761h"), (t, "2s")], Some(2000)),
            (&[(r, "1.5s")], Some(1500)),
            (&[(r, "12ms")], Some(12)),
            (&[(r, "0s")], Some(0)),
            (&[(r, " 3s ")], Some(3000)),
            (&[(r, "")], None),
            (&[(r, "-1s")], None),
            (&[(r, "NaN")], None),
            (&[(r, "1")], None),
            (&[(r, "8761h")], None),
            (&[(rr, "0"), (rt, "0")], None),
        ];
        for (headers, want) in cases {
            assert_eq!(hint(headers, 0), *want, "{headers:?}");
        }
    }

    #[test]
    fn anthropic_reset_headers() {
        let now = MAY_2024_MS;
        let req = "anthropic-ratelimit-requests-reset";
        let tok = "anthropic-ratelimit-tokens-reset";
        let inp = "anthropic-ratelimit-input-tokens-reset";
        let out = "anthropic-ratelimit-output-tokens-reset";
        let req_left = "anthropic-ratelimit-requests-remaining";
        let tok_left = "anthropic-ratelimit-tokens-remaining";
        let inp_left = "anthropic-ratelimit-input-tokens-remaining";
        let out_left = "anthropic-ratelimit-output-tokens-remaining";
        let in_10s = "2024-05-01T12:00:40Z";
        let in_60s = "2024-05-01T12:01:30Z";
        let in_5s = "2024-05-01T12:00:35.000Z";
        let cases: HeaderCases = &[
            (&[(req, in_10s)], Some(10_000)),
            (&[(req, "2024-05-01T12:00:30Z")], Some(0)),
            (&[(req, "2024-05-01T12:00:30.250Z")], Some(250)),
            (&[(req, "2024-05-01T14:00:40+02:00")], Some(10_000)),
            (&[(req, in_10s), (tok, in_60s)], Some(60_000)),
            (
                &[(req, in_10s), (tok, in_60s), (req_left, "0")],
                Some(10_000),
            ),
            (
                &[(req, in_10s), (tok, in_60s), (tok_left, "0")],
                Some(60_000),
            ),
            (
                &[
                    (req, in_10s),
                    (tok, in_60s),
                    (inp, in_5s),
                    (out, in_5s),
                    (inp_left, "0"),
                ],
                Some(5000),
            ),
            (
                &[
                    (req, in_10s),
                    (tok, in_60s),
                    (inp, in_5s),
                    (req_left, "0"),
                    (inp_left, "0"),
                ],
                Some(10_000),
            ),
            (
                &[
                    (req, in_10s),
                    (out, in_5s),
                    (out_left, "0"),
                    (req_left, "3"),
                ],
                Some(5000),
            ),
            (
                &[(req, in_10s), (inp, in_60s), (req_left, "7")],
                Some(60_000),
            ),
            // Exhausted limit with an unusable reset: use what is there.
            (
                &[(req, "2024-05-01T12:00:29Z"), (tok, in_5s), (req_left, "0")],
                Some(5000),
            ),
            (
                &[(req, "garbage"), (tok, in_5s), (req_left, "0")],
                Some(5000),
            ),
            (&[(req, "2024-05-01T12:00:29Z")], None),
            (&[(req, "2025-05-02T12:00:30Z")], None),
            (&[(req, "2025-05-01T12:00:30Z")], Some(365 * DAY_MS)),
            (&[(req, "")], None),
            (&[(req, "10s")], None),
            (&[(req, "Wed, 01 May 2024 12:00:40 GMT")], None),
            (&[(req_left, "0")], None),
        ];
        for (headers, want) in cases {
            assert_eq!(hint(headers, now), *want, "{headers:?}");
        }
    }

    #[test]
    fn header_precedence() {
        let now = RFC_EXAMPLE_MS;
        let in_30s = "Sun, 06 Nov 1994 08:50:07 GMT";
        let anthropic_in_20s = "1994-11-06T08:49:57Z";
        let gemini = r#"{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"40s"}]}}"#;
        let cases: HeaderCases = &[
            (
                &[("retry-after", "5"), ("retry-after-ms", "1500")],
                Some(1500),
            ),
            (
                &[("x-ms-retry-after-ms", "2500"), ("retry-after-ms", "1500")],
                Some(1500),
            ),
            (
                &[("retry-after", "5"), ("x-ms-retry-after-ms", "2500")],
                Some(2500),
            ),
            (
                &[("retry-after-ms", "junk"), ("x-ms-retry-after-ms", "2500")],
                Some(2500),
            ),
            (
                &[("retry-after-ms", "-1"), ("retry-after", "5")],
                Some(5000),
            ),
            (
                &[("retry-after-ms", "99999999999"), ("retry-after", "5")],
                Some(5000),
            ),
            (
                &[
                    ("retry-after", in_30s),
                    ("x-ratelimit-reset-requests", "1s"),
                ],
                Some(30_000),
            ),
            (
                &[
                    ("retry-after", "past"),
                    ("x-ratelimit-reset-requests", "1s"),
                ],
                Some(1000),
            ),
            (
                &[
                    ("anthropic-ratelimit-requests-reset", anthropic_in_20s),
                    ("retry-after", "3"),
                ],
                Some(3000),
            ),
            (
                &[
                    ("anthropic-ratelimit-requests-reset", anthropic_in_20s),
                    ("x-ratelimit-reset-tokens", "2s"),
                ],
                Some(2000),
            ),
            (
                &[("anthropic-ratelimit-requests-reset", anthropic_in_20s)],
                Some(20_000),
            ),
            // Repeated header: the first usable value wins.
            (&[("retry-after", "bad"), ("retry-after", "4")], Some(4000)),
            (&[("retry-after", "4"), ("retry-after", "9")], Some(4000)),
            // Names are matched case-insensitively in case a host does not lowercase them.
            (&[("Retry-After", "4")], Some(4000)),
            (&[("x-unrelated", "4")], None),
            (&[], None),
        ];
        for (headers, want) in cases {
            assert_eq!(hint(headers, now), *want, "{headers:?}");
        }

        let raw: &[(&str, &[u8])] = &[("retry-after", b"6")];
        assert_eq!(retry_hint_ms(raw, Some(gemini.as_bytes()), now), Some(6000));
        assert_eq!(
            retry_hint_ms(&[], Some(gemini.as_bytes()), now),
            Some(40_000)
        );
        let raw: &[(&str, &[u8])] = &[("retry-after", b"never")];
        assert_eq!(
            retry_hint_ms(raw, Some(gemini.as_bytes()), now),
            Some(40_000)
        );
    }

    #[test]
    fn non_utf8_header_values_are_skipped() {
        let cases: RawHeaderCases = &[
            (&[("retry-after-ms", b"\xff1500")], None),
            (&[("retry-after-ms", b"15\xc3\x28")], None),
            (
                &[("retry-after-ms", b"\xff"), ("retry-after", b"2")],
                Some(2000),
            ),
            (&[("retry-after", b"\xe2\x82")], None),
            (&[("x-ratelimit-reset-requests", b"1\xb5s")], None),
            (&[("x-ratelimit-reset-requests", b"1\xc2\xb5s")], Some(1)),
            (
                &[
                    ("x-ratelimit-reset-requests", b"1s"),
                    ("x-ratelimit-reset-tokens", b"9s"),
                    ("x-ratelimit-remaining-requests", b"0\xff"),
                ],
                Some(9000),
            ),
            (
                &[(
                    "anthropic-ratelimit-requests-reset",
                    b"2024-05-01T12:00:40\xffZ",
                )],
                None,
            ),
        ];
        for (headers, want) in cases {
            assert_eq!(
                retry_hint_ms(headers, None, MAY_2024_MS),
                *want,
                "{headers:?}"
            );
        }
    }

    #[test]
    fn gemini_bodies() {
        let retry_info = |delay: &str| {
            format!(
                r#"{{"error":{{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED","details":[{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]}},{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{delay}"}}]}}}}"#
            )
        };
        let good = retry_info("22s");
        let huge = format!("{}{}", " ".repeat(MAX_BODY_BYTES), good);
        let truncated = good.get(..good.len() - 3).unwrap().to_string();
        let cases: Vec<(String, Option<u64>)> = vec![
            (good.clone(), Some(22_000)),
            (format!("[{good}]"), Some(22_000)),
            (format!("[{good}, {{}}]"), Some(22_000)),
            (format!("[{{}}, {good}]"), None),
            (format!("\n  {good}\n"), Some(22_000)),
            (retry_info("1.5s"), Some(1500)),
            (retry_info("0.250s"), Some(250)),
            (retry_info("0.0001s"), Some(1)),
            (retry_info("0s"), Some(0)),
            (retry_info("31536000s"), Some(MAX_HINT_MS)),
            (retry_info("31536001s"), None),
            (retry_info("abc"), None),
            (retry_info(""), None),
            (retry_info("s"), None),
            (retry_info("22"), None),
            (retry_info("22ms"), None),
            (retry_info("-1s"), None),
            (retry_info("NaNs"), None),
            (retry_info("1e400s"), None),
            (truncated, None),
            (huge, None),
            ("".to_string(), None),
            ("RetryInfo".to_string(), None),
            ("<html>429 RetryInfo</html>".to_string(), None),
            ("\u{feff}{}".to_string(), None),
            (
                r#"{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","retryDelay":"5s"}]}}"#
                    .to_string(),
                None,
            ),
            (r#"{"error":{"details":[],"note":"RetryInfo"}}"#.to_string(), None),
            (
                r#"{"error":{"details":{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"5s"}}}"#
                    .to_string(),
                None,
            ),
            (
                r#"{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"5s"}]}"#
                    .to_string(),
                None,
            ),
            (
                r#"{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":5}]}}"#
                    .to_string(),
                None,
            ),
            (
                r#"{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"bad"},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"3s"}]}}"#
                    .to_string(),
                Some(3000),
            ),
            (r#"{"error":"RetryInfo"}"#.to_string(), None),
            (r#"["RetryInfo"]"#.to_string(), None),
            ("[]".to_string(), None),
        ];
        for (body, want) in &cases {
            let shown = body
                .get(..body.len().min(120))
                .unwrap_or("<non-char-boundary>");
            assert_eq!(body_hint(body), *want, "{shown:?}");
        }
        assert_eq!(retry_hint_ms(&[], Some(b"\xff\xfeRetryInfo"), 0), None);
    }

    #[test]
    fn insufficient_quota_bodies() {
        let openai = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        let cases: &[(&str, bool)] = &[
            (openai, true),
            (r#"{"error":{"type":"insufficient_quota"}}"#, true),
            (r#"{"error":{"code":"insufficient_quota"}}"#, true),
            (
                r#"{"error":{"type":"requests","code":"insufficient_quota"}}"#,
                true,
            ),
            (r#"[{"error":{"type":"insufficient_quota"}}]"#, true),
            (r#" [ {"error":{"code":"insufficient_quota"}} , 1 ] "#, true),
            (r#"[1, {"error":{"code":"insufficient_quota"}}]"#, false),
            (r#"[[{"error":{"code":"insufficient_quota"}}]]"#, false),
            (
                r#"{"error":{"type":"rate_limit_exceeded","code":"rate_limit_exceeded"}}"#,
                false,
            ),
            (
                r#"{"error":{"type":"invalid_request_error","message":"insufficient_quota"}}"#,
                false,
            ),
            (r#"{"error":{"type":"INSUFFICIENT_QUOTA"}}"#, false),
            (r#"{"error":{"type":"insufficient_quota_x"}}"#, false),
            (r#"{"error":{"type":["insufficient_quota"]}}"#, false),
            (r#"{"error":"insufficient_quota"}"#, false),
            (r#"{"type":"insufficient_quota"}"#, false),
            (r#"{"code":"insufficient_quota"}"#, false),
            (r#"{"error":{"type":"insufficient_quota"}"#, false),
            (r#"{"error":{"type":"insufficient_quota"}}xyz"#, false),
            ("insufficient_quota", false),
            (r#""insufficient_quota""#, false),
            ("", false),
            ("[]", false),
            ("{}", false),
            ("null", false),
            ("<html>insufficient_quota</html>", false),
        ];
        for (body, want) in cases {
            assert_eq!(is_insufficient_quota(body.as_bytes()), *want, "{body:?}");
        }

        let padded = format!("{}{}", " ".repeat(MAX_BODY_BYTES), openai);
        assert!(!is_insufficient_quota(padded.as_bytes()));
        assert!(!is_insufficient_quota(b"\xff\xfe insufficient_quota"));
        let nested = format!(
            "{}insufficient_quota{}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(!is_insufficient_quota(nested.as_bytes()));
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            self.next().checked_rem(n as u64).unwrap_or(0) as usize
        }
    }

    /// Inputs close to the real formats reach deeper into the parsers than uniform bytes do.
    const SEEDS: &[&str] = &[
        "1500",
        "1500.5",
        "1h2m3.5s",
        "500\u{b5}s",
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        "2024-05-01T12:00:30.123+02:00",
        r#"{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"22s"}]}}"#,
        r#"[{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}]"#,
    ];
    const ALPHABET: &[u8] =
        b"0123456789.:-+ ,TtZzsmhunGMTSunNovRetryInfo\"{}[]@\xb5\xc2\xce\xbc\xff\x00";
    const NAMES: &[&str] = &[
        "retry-after-ms",
        "x-ms-retry-after-ms",
        "retry-after",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
    ];

    fn random_bytes(rng: &mut XorShift) -> Vec<u8> {
        let mut bytes = SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec();
        match rng.below(3) {
            0 => {
                let len = rng.below(48);
                bytes = (0..len)
                    .map(|_| {
                        if rng.below(4) == 0 {
                            rng.next() as u8
                        } else {
                            ALPHABET[rng.below(ALPHABET.len())]
                        }
                    })
                    .collect();
            }
            _ => {
                for _ in 0..=rng.below(4) {
                    let at = rng.below(bytes.len().saturating_add(1));
                    match rng.below(4) {
                        0 if at < bytes.len() => {
                            bytes.remove(at);
                        }
                        1 if at < bytes.len() => bytes[at] = ALPHABET[rng.below(ALPHABET.len())],
                        2 => bytes.insert(at, rng.next() as u8),
                        _ => bytes.truncate(at),
                    }
                }
            }
        }
        bytes
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..300_000 {
            let bytes = random_bytes(&mut rng);
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_go_duration_ms(&text);
            let _ = parse_http_date_ms(&text);
            let _ = parse_rfc3339_ms(&text);
            let _ = is_insufficient_quota(&bytes);

            let headers = [(NAMES[rng.below(NAMES.len())], bytes.as_slice())];
            let now = match rng.below(3) {
                0 => 0,
                1 => u64::MAX,
                _ => rng.next(),
            };
            if let Some(ms) = retry_hint_ms(&headers, Some(&bytes), now) {
                assert!(ms <= MAX_HINT_MS, "{bytes:?} gave {ms}");
            }
        }
    }
}
