//! `failover.preemptiveCooldown`: the provider's remaining budget, read from a success.
//!
//! OpenAI and Azure send `x-ratelimit-remaining-{requests,tokens}` with
//! `x-ratelimit-reset-{requests,tokens}` (Go durations) on every answer; Anthropic sends
//! `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-remaining` with `-reset`
//! (RFC 3339 times). A success whose remaining count is 0 means the key's next request gets a
//! 429, so the key can rest until the reset instead. Every header read is a host call, so the
//! remaining counts are read first and a reset only for a count that is 0. The parsers are
//! `hints`' own; bad values are ignored, like bad hints.

use crate::core::config::Provider;
use crate::core::hints;

/// Which headers a provider reports its budget in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// OpenAI, Azure, and anything OpenAI-compatible: relative Go-duration resets.
    OpenAi,
    /// Anthropic: absolute RFC 3339 resets.
    Anthropic,
}

/// (remaining, reset) header pairs of OpenAI's two limits.
const OPENAI_LIMITS: [(&str, &str); 2] = [
    (
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
];

/// The budget headers a provider sends; Gemini sends none, so its successes cost nothing.
pub fn family(provider: Provider) -> Option<Family> {
    match provider {
        Provider::OpenAi | Provider::Azure => Some(Family::OpenAi),
        Provider::Anthropic => Some(Family::Anthropic),
        Provider::Gemini => None,
    }
}

/// Milliseconds until the budget a success reported as used up resets: the latest reset among
/// the limits whose remaining count is 0. None when no limit is at 0, or when no exhausted
/// limit's reset parses. `read` returns a response header's value; it is asked for every
/// remaining count of the family and for the reset of each count that is 0, nothing else.
pub fn spent_for_ms(
    family: Family,
    now_ms: u64,
    mut read: impl FnMut(&str) -> Option<Vec<u8>>,
) -> Option<u64> {
    let mut spent_for: Option<u64> = None;
    let mut exhausted = |remaining: &str, reset: &str, parse: &dyn Fn(&str) -> Option<u64>| {
        let Some(count) = read(remaining) else {
            return;
        };
        if !hints::header_is_zero(&[(remaining, count.as_slice())], remaining) {
            return;
        }
        let Some(value) = read(reset) else {
            return;
        };
        if let Some(ms) = hints::first_valid(&[(reset, value.as_slice())], reset, parse) {
            spent_for = spent_for.max(Some(ms));
        }
    };
    match family {
        Family::OpenAi => {
            let go = |v: &str| hints::parse_go_duration_ms(v).and_then(hints::cap);
            for (remaining, reset) in OPENAI_LIMITS {
                exhausted(remaining, reset, &go);
            }
        }
        Family::Anthropic => {
            let at = |v: &str| hints::until(hints::parse_rfc3339_ms(v)?, now_ms);
            for (reset, remaining) in hints::ANTHROPIC_LIMITS {
                exhausted(remaining, reset, &at);
            }
        }
    }
    spent_for
}

/// The same over headers already read (a `retryOnFailure` re-send's answer).
pub fn spent_for_ms_in(family: Family, now_ms: u64, headers: &[(String, Vec<u8>)]) -> Option<u64> {
    spent_for_ms(family, now_ms, |name| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn openai_a_zero_count_rests_until_its_own_reset() {
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1.5s"),
            ("x-ratelimit-remaining-tokens", "9000"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(spent_for_ms_in(Family::OpenAi, 0, &h), Some(1_500));
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "12"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "250ms"),
        ]);
        assert_eq!(spent_for_ms_in(Family::OpenAi, 0, &h), Some(250));
    }

    #[test]
    fn both_spent_waits_for_the_later_reset() {
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "2s"),
            ("x-ratelimit-remaining-tokens", " 0 "),
            ("x-ratelimit-reset-tokens", "1m"),
        ]);
        assert_eq!(spent_for_ms_in(Family::OpenAi, 0, &h), Some(60_000));
    }

    #[test]
    fn budget_left_or_malformed_values_give_nothing() {
        for pairs in [
            vec![],
            vec![
                ("x-ratelimit-remaining-requests", "1"),
                ("x-ratelimit-reset-requests", "1s"),
            ],
            // A 0 without a usable reset says nothing about when to come back.
            vec![("x-ratelimit-remaining-requests", "0")],
            vec![
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "soon"),
            ],
            vec![
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "-1s"),
            ],
            vec![
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "99999999h"),
            ],
            vec![
                ("x-ratelimit-remaining-requests", "-0"),
                ("x-ratelimit-reset-requests", "1s"),
            ],
            vec![
                ("x-ratelimit-remaining-requests", ""),
                ("x-ratelimit-reset-requests", "1s"),
            ],
            vec![
                ("x-ratelimit-remaining-requests", "0.5"),
                ("x-ratelimit-reset-requests", "1s"),
            ],
        ] {
            assert_eq!(
                spent_for_ms_in(Family::OpenAi, 0, &headers(&pairs)),
                None,
                "{pairs:?}"
            );
        }
        let not_utf8 = vec![
            ("x-ratelimit-remaining-requests".to_string(), b"0".to_vec()),
            ("x-ratelimit-reset-requests".to_string(), vec![0xff, b's']),
        ];
        assert_eq!(spent_for_ms_in(Family::OpenAi, 0, &not_utf8), None);
    }

    #[test]
    fn anthropic_resets_are_absolute_times() {
        let now = hints::parse_rfc3339_ms("2026-01-01T00:00:00Z").unwrap();
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "5"),
            ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:30Z"),
            ("anthropic-ratelimit-output-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-01-01T00:00:02Z",
            ),
        ]);
        assert_eq!(spent_for_ms_in(Family::Anthropic, now, &h), Some(2_000));
        let past = headers(&[
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2025-12-31T23:59:59Z"),
        ]);
        assert_eq!(spent_for_ms_in(Family::Anthropic, now, &past), None);
        assert_eq!(
            spent_for_ms_in(
                Family::OpenAi,
                now,
                &headers(&[("anthropic-ratelimit-tokens-remaining", "0")])
            ),
            None
        );
    }

    #[test]
    fn only_remaining_counts_are_read_until_one_is_zero() {
        let mut asked = Vec::new();
        let got = spent_for_ms(Family::OpenAi, 0, |name| {
            asked.push(name.to_string());
            Some(b"7".to_vec())
        });
        assert_eq!(got, None);
        assert_eq!(
            asked,
            [
                "x-ratelimit-remaining-requests",
                "x-ratelimit-remaining-tokens"
            ],
            "a success with budget left costs two reads"
        );
        asked.clear();
        spent_for_ms(Family::OpenAi, 0, |name| {
            asked.push(name.to_string());
            Some(if name.contains("remaining-requests") {
                b"0".to_vec()
            } else {
                b"1s".to_vec()
            })
        });
        assert_eq!(
            asked,
            [
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
                "x-ratelimit-remaining-tokens"
            ]
        );
        assert_eq!(family(Provider::Gemini), None);
        assert_eq!(family(Provider::Azure), Some(Family::OpenAi));
    }
}
