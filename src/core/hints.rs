//! Provider retry hints: when a provider answers 429 it often says how long to wait, and a key's
//! cooldown should match the provider's limit window rather than a fixed guess.
//!
//! Everything here reads bytes the upstream controls, so every parser is total: bad input gives
//! `None` (or `false`), never a panic, and all arithmetic is checked.

use serde_json::{Map, Value};

/// A hint beyond a year is treated as garbage: a key parked that long is as good as deleted, and a
/// typo'd or hostile header must not be able to do that.
const MAX_HINT_MS: u64 = 365 * 24 * 60 * 60 * 1000;

/// Error bodies are small; anything bigger is not an error body worth parsing on the request path
/// of a wasm worker.
const MAX_BODY_BYTES: usize = 64 * 1024;

const NS_PER_US: u128 = 1_000;
const NS_PER_MS: u128 = 1_000_000;
const NS_PER_S: u128 = 1_000_000_000;

/// Fraction digits kept exactly. Any further nonzero digit only rounds up: precision finer than
/// 10^-18 of a unit is noise, and this keeps every product well inside u128.
const MAX_FRACTION_DIGITS: u32 = 18;

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

const SHORT_DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const LONG_DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
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

/// A Go `time.Duration` string ("1h2m3.5s", "500us", "0") in milliseconds, rounded up. Negative
/// durations are None: a reset cannot lie in the past.
pub fn parse_go_duration_ms(s: &str) -> Option<u64> {
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    // Go's own formatter writes a zero duration as a bare "0", the only unitless form it accepts.
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total_ns: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at_checked(number_end)?;
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at_checked(unit_end)?;
        let unit_ns = match unit {
            "ns" => 1,
            // Go accepts both the micro sign (U+00B5) and the Greek mu (U+03BC).
            "us" | "\u{b5}s" | "\u{3bc}s" => NS_PER_US,
            "ms" => NS_PER_MS,
            "s" => NS_PER_S,
            "m" => 60 * NS_PER_S,
            "h" => 3600 * NS_PER_S,
            _ => return None,
        };
        let segment = Decimal::parse(number, true)?.ceil_ns(unit_ns)?;
        total_ns = total_ns.checked_add(segment)?;
        rest = next;
    }
    u64::try_from(ns_to_ms_ceil(total_ns)?).ok()
}

/// An HTTP date (IMF-fixdate, RFC 850 or asctime) as Unix milliseconds. Names of days and months
/// are matched case-insensitively; the weekday is not checked against the date.
pub fn parse_http_date_ms(s: &str) -> Option<u64> {
    match s.split_once(", ") {
        Some((day, rest)) if is_one_of(day, &SHORT_DAYS) => imf_fixdate(rest),
        Some((day, rest)) if is_one_of(day, &LONG_DAYS) => rfc850_date(rest),
        Some(_) => None,
        None => asctime_date(s),
    }
}

/// An RFC 3339 timestamp ("2024-05-01T12:00:30.123+02:00") as Unix milliseconds, fractions
/// rounded up. Also accepts lowercase `t`/`z` and the space separator RFC 3339 allows.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let (date, rest) = s.split_at_checked(10)?;
    let mut parts = date.split('-');
    let year = fixed_digits(parts.next()?, 4)?;
    let month = fixed_digits(parts.next()?, 2)?;
    let day = fixed_digits(parts.next()?, 2)?;
    if parts.next().is_some() {
        return None;
    }

    let rest = rest.strip_prefix(['T', 't', ' '])?;
    let (time, rest) = rest.split_at_checked(8)?;
    let (hour, minute, second) = clock(time)?;

    let (fraction_ms, zone) = match rest.strip_prefix('.') {
        Some(fraction) => {
            let end = fraction
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(fraction.len());
            let (digits, zone) = fraction.split_at_checked(end)?;
            (fraction_ms_ceil(digits)?, zone)
        }
        None => (0, rest),
    };

    let local_ms = unix_ms(year, month, day, hour, minute, second)?.checked_add(fraction_ms)?;
    match zone {
        "Z" | "z" => Some(local_ms),
        _ => {
            let (sign, offset) = zone.split_at_checked(1)?;
            let (offset_hours, offset_minutes) = offset.split_once(':')?;
            let offset_hours = u64::from(fixed_digits(offset_hours, 2)?);
            let offset_minutes = u64::from(fixed_digits(offset_minutes, 2)?);
            if offset_hours >= 24 || offset_minutes >= 60 {
                return None;
            }
            let offset_ms = offset_hours
                .checked_mul(60)?
                .checked_add(offset_minutes)?
                .checked_mul(60_000)?;
            // Local time is ahead of UTC by a positive offset.
            match sign {
                "+" => local_ms.checked_sub(offset_ms),
                "-" => local_ms.checked_add(offset_ms),
                _ => None,
            }
        }
    }
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

fn ns_to_ms_ceil(ns: u128) -> Option<u128> {
    let ms = ns.checked_div(NS_PER_MS)?;
    if ns.checked_rem(NS_PER_MS)? == 0 {
        Some(ms)
    } else {
        ms.checked_add(1)
    }
}

/// A non-negative decimal number, kept exact so rounding happens once, at the end.
struct Decimal {
    whole: u128,
    fraction: u128,
    fraction_digits: u32,
    /// A nonzero digit past `MAX_FRACTION_DIGITS` was dropped.
    fraction_beyond: bool,
}

impl Decimal {
    /// Digits with an optional fraction; no sign, exponent or non-finite forms. `lenient` admits
    /// Go's ".5" and "5." in addition to "0.5" and "5".
    fn parse(s: &str, lenient: bool) -> Option<Self> {
        let (whole, fraction) = match s.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (s, None),
        };
        let fraction_text = fraction.unwrap_or("");
        let well_formed = if lenient {
            !(whole.is_empty() && fraction_text.is_empty())
        } else {
            !whole.is_empty() && fraction.is_none_or(|f| !f.is_empty())
        };
        if !well_formed || !all_digits(whole) || !all_digits(fraction_text) {
            return None;
        }

        let mut whole_value: u128 = 0;
        for digit in whole.bytes().map(digit_value) {
            whole_value = whole_value.checked_mul(10)?.checked_add(digit)?;
        }
        let mut decimal = Decimal {
            whole: whole_value,
            fraction: 0,
            fraction_digits: 0,
            fraction_beyond: false,
        };
        for digit in fraction_text.bytes().map(digit_value) {
            if decimal.fraction_digits < MAX_FRACTION_DIGITS {
                decimal.fraction = decimal.fraction.checked_mul(10)?.checked_add(digit)?;
                decimal.fraction_digits = decimal.fraction_digits.checked_add(1)?;
            } else if digit != 0 {
                decimal.fraction_beyond = true;
            }
        }
        Some(decimal)
    }

    /// The value times `unit_ns`, in nanoseconds, rounded up.
    fn ceil_ns(&self, unit_ns: u128) -> Option<u128> {
        let whole_ns = self.whole.checked_mul(unit_ns)?;
        let scale = 10u128.checked_pow(self.fraction_digits)?;
        let scaled = self.fraction.checked_mul(unit_ns)?;
        let mut fraction_ns = scaled.checked_div(scale)?;
        if scaled.checked_rem(scale)? != 0 || self.fraction_beyond {
            fraction_ns = fraction_ns.checked_add(1)?;
        }
        whole_ns.checked_add(fraction_ns)
    }
}

fn all_digits(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit())
}

fn digit_value(b: u8) -> u128 {
    u128::from(b.saturating_sub(b'0'))
}

/// Exactly `len` ASCII digits.
fn fixed_digits(s: &str, len: usize) -> Option<u32> {
    if s.len() != len || !all_digits(s) {
        return None;
    }
    s.bytes().try_fold(0u32, |acc, b| {
        acc.checked_mul(10)?
            .checked_add(u32::from(b.saturating_sub(b'0')))
    })
}

/// Fraction-of-a-second digits as milliseconds, rounded up.
fn fraction_ms_ceil(digits: &str) -> Option<u64> {
    if digits.is_empty() || !all_digits(digits) {
        return None;
    }
    let mut bytes = digits.bytes();
    let mut ms: u64 = 0;
    for _ in 0..3 {
        let digit = bytes
            .next()
            .map_or(0, |b| u64::from(b.saturating_sub(b'0')));
        ms = ms.checked_mul(10)?.checked_add(digit)?;
    }
    if bytes.any(|b| b != b'0') {
        ms = ms.checked_add(1)?;
    }
    Some(ms)
}

fn is_one_of(s: &str, names: &[&str]) -> bool {
    names.iter().any(|name| name.eq_ignore_ascii_case(s))
}

fn month_number(s: &str) -> Option<u32> {
    let index = MONTHS
        .iter()
        .position(|name| name.eq_ignore_ascii_case(s))?;
    u32::try_from(index).ok()?.checked_add(1)
}

/// "HH:MM:SS", each exactly two digits; ranges are checked by `unix_ms`.
fn clock(s: &str) -> Option<(u32, u32, u32)> {
    let mut parts = s.split(':');
    let hour = fixed_digits(parts.next()?, 2)?;
    let minute = fixed_digits(parts.next()?, 2)?;
    let second = fixed_digits(parts.next()?, 2)?;
    if parts.next().is_some() {
        return None;
    }
    Some((hour, minute, second))
}

fn is_gmt(s: &str) -> bool {
    s.eq_ignore_ascii_case("GMT")
}

/// "06 Nov 1994 08:49:37 GMT" (after the day name).
fn imf_fixdate(rest: &str) -> Option<u64> {
    let mut parts = rest.split(' ');
    let day = fixed_digits(parts.next()?, 2)?;
    let month = month_number(parts.next()?)?;
    let year = fixed_digits(parts.next()?, 4)?;
    let (hour, minute, second) = clock(parts.next()?)?;
    if !is_gmt(parts.next()?) || parts.next().is_some() {
        return None;
    }
    unix_ms(year, month, day, hour, minute, second)
}

/// "06-Nov-94 08:49:37 GMT" (after the day name).
fn rfc850_date(rest: &str) -> Option<u64> {
    let mut parts = rest.split(' ');
    let mut date = parts.next()?.split('-');
    let (hour, minute, second) = clock(parts.next()?)?;
    if !is_gmt(parts.next()?) || parts.next().is_some() {
        return None;
    }
    let day = fixed_digits(date.next()?, 2)?;
    let month = month_number(date.next()?)?;
    let short_year = fixed_digits(date.next()?, 2)?;
    if date.next().is_some() {
        return None;
    }
    let century: u32 = if short_year < 70 { 2000 } else { 1900 };
    unix_ms(
        century.checked_add(short_year)?,
        month,
        day,
        hour,
        minute,
        second,
    )
}

/// "Sun Nov  6 08:49:37 1994": a one-digit day is padded with a space, not a zero.
fn asctime_date(s: &str) -> Option<u64> {
    let mut parts = s.split(' ');
    if !is_one_of(parts.next()?, &SHORT_DAYS) {
        return None;
    }
    let month = month_number(parts.next()?)?;
    let day = match parts.next()? {
        "" => fixed_digits(parts.next()?, 1)?,
        two => fixed_digits(two, 2)?,
    };
    let (hour, minute, second) = clock(parts.next()?)?;
    let year = fixed_digits(parts.next()?, 4)?;
    if parts.next().is_some() {
        return None;
    }
    unix_ms(year, month, day, hour, minute, second)
}

fn is_leap_year(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u32, month: u32) -> Option<u32> {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => Some(31),
        4 | 6 | 9 | 11 => Some(30),
        2 if is_leap_year(year) => Some(29),
        2 => Some(28),
        _ => None,
    }
}

/// Days since 1970-01-01 of a valid date no earlier than that (Howard Hinnant's
/// `days_from_civil`, restricted to non-negative years so it stays in unsigned arithmetic).
fn days_from_civil(year: u32, month: u32, day: u32) -> Option<u64> {
    let (year, month, day) = (u64::from(year), u64::from(month), u64::from(day));
    // The algorithm's year starts in March so the leap day falls at its end.
    let y = if month <= 2 {
        year.checked_sub(1)?
    } else {
        year
    };
    let era = y / 400;
    let year_of_era = y.checked_sub(era.checked_mul(400)?)?;
    let shifted_month = if month > 2 {
        month.checked_sub(3)?
    } else {
        month.checked_add(9)?
    };
    let day_of_year = shifted_month
        .checked_mul(153)?
        .checked_add(2)?
        .checked_div(5)?
        .checked_add(day)?
        .checked_sub(1)?;
    let day_of_era = year_of_era
        .checked_mul(365)?
        .checked_add(year_of_era / 4)?
        .checked_sub(year_of_era / 100)?
        .checked_add(day_of_year)?;
    era.checked_mul(146_097)?
        .checked_add(day_of_era)?
        .checked_sub(719_468)
}

/// A validated UTC civil time as Unix milliseconds. A leap second (:60) counts as :59, since Unix
/// time has no slot for it.
fn unix_ms(year: u32, month: u32, day: u32, hour: u32, minute: u32, second: u32) -> Option<u64> {
    if !(1970..=9999).contains(&year)
        || day == 0
        || day > days_in_month(year, month)?
        || hour >= 24
        || minute >= 60
        || second > 60
    {
        return None;
    }
    let second = second.min(59);
    let seconds = days_from_civil(year, month, day)?
        .checked_mul(86_400)?
        .checked_add(u64::from(hour).checked_mul(3600)?)?
        .checked_add(u64::from(minute).checked_mul(60)?)?
        .checked_add(u64::from(second))?;
    seconds.checked_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    type HeaderCases<'a> = &'a [(&'a [(&'a str, &'a str)], Option<u64>)];
    type RawHeaderCases<'a> = &'a [(&'a [(&'a str, &'a [u8])], Option<u64>)];

    const DAY_MS: u64 = 86_400_000;
    /// 1994-11-06T08:49:37Z, the RFC 9110 example date.
    const RFC_EXAMPLE_MS: u64 = 784_111_777_000;
    /// 2024-05-01T12:00:30Z.
    const MAY_2024_MS: u64 = 1_714_564_830_000;

    fn hint(headers: &[(&str, &str)], now_ms: u64) -> Option<u64> {
        let raw: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        retry_hint_ms(&raw, None, now_ms)
    }

    fn body_hint(body: &str) -> Option<u64> {
        retry_hint_ms(&[], Some(body.as_bytes()), 0)
    }

    #[test]
    fn go_durations() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("0s", Some(0)),
            ("+0", Some(0)),
            ("1s", Some(1000)),
            ("6m0s", Some(360_000)),
            ("12ms", Some(12)),
            ("1h2m3.5s", Some(3_723_500)),
            ("500us", Some(1)),
            ("500\u{b5}s", Some(1)),
            ("500\u{3bc}s", Some(1)),
            ("1500ns", Some(1)),
            ("1000001ns", Some(2)),
            ("1000000ns", Some(1)),
            ("1.5s", Some(1500)),
            ("0.001s", Some(1)),
            ("0.0011s", Some(2)),
            ("0.0000000000000000000001s", Some(1)),
            (".5s", Some(500)),
            ("5.s", Some(5000)),
            ("2h", Some(7_200_000)),
            ("1m30s", Some(90_000)),
            ("20ms500ns", Some(21)),
            ("+1s", Some(1000)),
            ("8760h", Some(365 * DAY_MS)),
            ("100000h", Some(360_000_000_000)),
            ("", None),
            ("+", None),
            ("s", None),
            ("1", None),
            ("00", None),
            ("1x", None),
            ("1S", None),
            ("1ss", None),
            ("-1s", None),
            ("-0", None),
            ("-0s", None),
            ("++1s", None),
            ("1.2.3s", None),
            (".s", None),
            ("1 s", None),
            (" 1s", None),
            ("1s ", None),
            ("1e3s", None),
            ("0x10s", None),
            ("1h-2m", None),
            ("NaN", None),
            ("inf", None),
            ("infs", None),
            ("99999999999999999999999999999999999999999999s", None),
            ("99999999999999999999h", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_go_duration_ms(input), *want, "{input:?}");
        }
    }

    #[test]
    fn http_dates() {
        let cases: &[(&str, Option<u64>)] = &[
            ("Sun, 06 Nov 1994 08:49:37 GMT", Some(RFC_EXAMPLE_MS)),
            ("sun, 06 nov 1994 08:49:37 gmt", Some(RFC_EXAMPLE_MS)),
            // The weekday is decoration; a wrong one does not void the date.
            ("Mon, 06 Nov 1994 08:49:37 GMT", Some(RFC_EXAMPLE_MS)),
            ("Sunday, 06-Nov-94 08:49:37 GMT", Some(RFC_EXAMPLE_MS)),
            ("Sun Nov  6 08:49:37 1994", Some(RFC_EXAMPLE_MS)),
            (
                "Wed Nov 16 08:49:37 1994",
                Some(RFC_EXAMPLE_MS + 10 * DAY_MS),
            ),
            ("Sun Nov 06 08:49:37 1994", Some(RFC_EXAMPLE_MS)),
            ("Thu, 01 Jan 1970 00:00:00 GMT", Some(0)),
            ("Thursday, 01-Jan-70 00:00:00 GMT", Some(0)),
            ("Saturday, 01-Jan-00 00:00:00 GMT", Some(946_684_800_000)),
            ("Sunday, 31-Dec-69 23:59:59 GMT", Some(3_155_759_999_000)),
            ("Thu, 29 Feb 2024 00:00:00 GMT", Some(1_709_164_800_000)),
            ("Sat, 29 Feb 2000 00:00:00 GMT", Some(951_782_400_000)),
            ("Mon, 01 Mar 2100 00:00:00 GMT", Some(4_107_542_400_000)),
            ("Fri, 31 Dec 9999 23:59:59 GMT", Some(253_402_300_799_000)),
            ("Sat, 31 Dec 2016 23:59:60 GMT", Some(1_483_228_799_000)),
            ("Sat, 31 Dec 2016 23:59:59 GMT", Some(1_483_228_799_000)),
            ("", None),
            ("GMT", None),
            ("Sun, 06 Nov 1994 08:49:37", None),
            ("Sun, 06 Nov 1994 08:49:37 UTC", None),
            ("Sun, 06 Nov 1994 08:49:37 GMT ", None),
            ("Sun,  06 Nov 1994 08:49:37 GMT", None),
            ("Sun, 6 Nov 1994 08:49:37 GMT", None),
            ("Sun, 06 Foo 1994 08:49:37 GMT", None),
            ("Sun, 06 November 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 94 08:49:37 GMT", None),
            ("Sun, 06 Nov 1969 08:49:37 GMT", None),
            ("Sun, 06 Nov 10000 08:49:37 GMT", None),
            ("Sun, 00 Nov 1994 08:49:37 GMT", None),
            ("Sun, 31 Nov 1994 08:49:37 GMT", None),
            ("Wed, 29 Feb 2023 00:00:00 GMT", None),
            ("Mon, 29 Feb 2100 00:00:00 GMT", None),
            ("Sun, 06 Nov 1994 24:00:00 GMT", None),
            ("Sun, 06 Nov 1994 08:60:00 GMT", None),
            ("Sun, 06 Nov 1994 08:49:61 GMT", None),
            ("Sun, 06 Nov 1994 8:49:37 GMT", None),
            ("Sun, 06 Nov 1994 08:49 GMT", None),
            ("Sun, 06 Nov 1994 08:49:37:00 GMT", None),
            ("Sun, +6 Nov 1994 08:49:37 GMT", None),
            ("Sundae, 06 Nov 1994 08:49:37 GMT", None),
            ("Sunday, 06 Nov 1994 08:49:37 GMT", None),
            ("Sun, 06-Nov-94 08:49:37 GMT", None),
            ("Sunday, 06-Nov-1994 08:49:37 GMT", None),
            ("Sunday, 06-Nov-94-1 08:49:37 GMT", None),
            ("Sun Nov 6 08:49:37 1994", None),
            ("Sun Nov  16 08:49:37 1994", None),
            ("Sun Nov  6 08:49:37 1994 ", None),
            ("Sun Nov  6 08:49:37 94", None),
            ("Son Nov  6 08:49:37 1994", None),
            ("2024-05-01T12:00:30Z", None),
            ("1714564830", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_http_date_ms(input), *want, "{input:?}");
        }
    }

    #[test]
    fn rfc3339_times() {
        let cases: &[(&str, Option<u64>)] = &[
            ("2024-05-01T12:00:30Z", Some(MAY_2024_MS)),
            ("2024-05-01t12:00:30z", Some(MAY_2024_MS)),
            ("2024-05-01 12:00:30Z", Some(MAY_2024_MS)),
            ("2024-05-01T12:00:30.123Z", Some(MAY_2024_MS + 123)),
            ("2024-05-01T12:00:30.1Z", Some(MAY_2024_MS + 100)),
            ("2024-05-01T12:00:30.000Z", Some(MAY_2024_MS)),
            ("2024-05-01T12:00:30.000000000Z", Some(MAY_2024_MS)),
            ("2024-05-01T12:00:30.0001Z", Some(MAY_2024_MS + 1)),
            ("2024-05-01T12:00:30.999999Z", Some(MAY_2024_MS + 1000)),
            ("2024-05-01T14:00:30+02:00", Some(MAY_2024_MS)),
            ("2024-05-01T06:30:30-05:30", Some(MAY_2024_MS)),
            ("2024-05-01T12:00:30+00:00", Some(MAY_2024_MS)),
            ("2024-05-01T12:00:30-00:00", Some(MAY_2024_MS)),
            ("2024-05-01T14:00:30.5+02:00", Some(MAY_2024_MS + 500)),
            ("1970-01-01T00:00:00Z", Some(0)),
            ("1970-01-01T01:00:00+01:00", Some(0)),
            ("2016-12-31T23:59:60Z", Some(1_483_228_799_000)),
            ("9999-12-31T23:59:59Z", Some(253_402_300_799_000)),
            ("", None),
            ("2024-05-01", None),
            ("2024-05-01T12:00:30", None),
            ("2024-05-01T12:00:30.Z", None),
            ("2024-05-01T12:00:30.12a Z", None),
            ("2024-05-01T12:00:30ZZ", None),
            ("2024-05-01T12:00:30Z ", None),
            (" 2024-05-01T12:00:30Z", None),
            ("2024-05-01X12:00:30Z", None),
            ("2024-5-01T12:00:30Z", None),
            ("24-05-01T12:00:30Z", None),
            ("2024-13-01T12:00:30Z", None),
            ("2024-00-01T12:00:30Z", None),
            ("2024-04-31T12:00:30Z", None),
            ("2023-02-29T12:00:30Z", None),
            ("2024-05-01T24:00:00Z", None),
            ("2024-05-01T12:60:00Z", None),
            ("2024-05-01T12:00:61Z", None),
            ("2024-05-01T12:00:30+24:00", None),
            ("2024-05-01T12:00:30+02:60", None),
            ("2024-05-01T12:00:30+0200", None),
            ("2024-05-01T12:00:30+2:00", None),
            ("2024-05-01T12:00:30*02:00", None),
            ("1969-12-31T23:59:59Z", None),
            ("1970-01-01T00:30:00+01:00", None),
            ("10000-01-01T00:00:00Z", None),
            ("2024-05-01T12:00:30.\u{e9}Z", None),
            ("2024-05-\u{e9}T12:00:30Z", None),
            ("2024-05-01T12:00:3\u{e9}Z", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_rfc3339_ms(input), *want, "{input:?}");
        }
    }

    #[test]
    fn days_from_civil_matches_day_counting() {
        let mut expected = 0u64;
        for year in 1970..=9999 {
            for month in 1..=12 {
                for day in 1..=days_in_month(year, month).unwrap() {
                    assert_eq!(days_from_civil(year, month, day), Some(expected));
                    expected += 1;
                }
            }
        }
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
            (self.next() % n as u64) as usize
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
                    let at = rng.below(bytes.len() + 1);
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
