//! Status patterns (`failoverOnStatus`) and the classification of an upstream response.

use std::fmt;

/// One `failoverOnStatus` entry: each of the three digits is either fixed or a wildcard.
/// Written as an exact code (`429`), or a class (`5xx`, `5.*`, `50.`); it always matches a whole code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusPattern {
    digits: [Option<u8>; 3],
}

/// The codes (100 to 999) a list of patterns matches, one bit each: judging an answer is one
/// bit test, not a walk over every pattern's digits.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusSet {
    bits: [u64; 15],
}

/// The lowest code a set holds; a set's bit `n` is code `FIRST_CODE + n`.
const FIRST_CODE: u16 = 100;
const LAST_CODE: u16 = 999;

impl StatusSet {
    pub fn of(patterns: &[StatusPattern]) -> Self {
        let mut set = StatusSet { bits: [0; 15] };
        for code in FIRST_CODE..=LAST_CODE {
            if patterns.iter().any(|p| p.matches(code)) {
                set.insert(code);
            }
        }
        set
    }

    /// The word and bit of `code`, None outside 100..=999.
    fn slot(code: u16) -> Option<(usize, u64)> {
        let n = code.checked_sub(FIRST_CODE).filter(|_| code <= LAST_CODE)?;
        Some((usize::from(n / 64), 1u64 << (n % 64)))
    }

    fn insert(&mut self, code: u16) {
        if let Some((word, bit)) = Self::slot(code) {
            if let Some(w) = self.bits.get_mut(word) {
                *w |= bit;
            }
        }
    }

    pub fn contains(&self, code: u16) -> bool {
        Self::slot(code)
            .and_then(|(word, bit)| self.bits.get(word).map(|w| w & bit != 0))
            .unwrap_or(false)
    }
}

/// The codes, not the bits: what a failing test should show.
impl fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries((FIRST_CODE..=LAST_CODE).filter(|&c| self.contains(c)))
            .finish()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct PatternError(pub String);

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StatusPattern {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let invalid = || {
            PatternError(format!(
                "{text:?} is not a status pattern; write an exact code such as \"429\", \
                 or a class such as \"5xx\", \"5.*\" or \"50.\""
            ))
        };
        let bytes = text.trim().as_bytes();
        // `5.*` and `50.*` mean "the remaining digits are anything".
        let (fixed, open_tail) = match bytes {
            [head @ .., b'.', b'*'] => (head, true),
            _ => (bytes, false),
        };
        if fixed.is_empty() || fixed.len() > 3 || (!open_tail && fixed.len() != 3) {
            return Err(invalid());
        }
        let mut digits = [None; 3];
        for (slot, &b) in digits.iter_mut().zip(fixed) {
            *slot = match b {
                b'0'..=b'9' => Some(b - b'0'),
                b'x' | b'X' | b'.' => None,
                _ => return Err(invalid()),
            };
        }
        match digits[0] {
            Some(1..=5) | None => {}
            Some(_) => {
                return Err(PatternError(format!(
                    "{text:?} cannot match any HTTP status; codes run from 100 to 599"
                )))
            }
        }
        Ok(StatusPattern { digits })
    }

    pub fn matches(&self, status: u16) -> bool {
        if !(100..=999).contains(&status) {
            return false;
        }
        let actual = [
            (status / 100) as u8,
            ((status / 10) % 10) as u8,
            (status % 10) as u8,
        ];
        self.digits
            .iter()
            .zip(actual)
            .all(|(want, got)| want.is_none_or(|w| w == got))
    }
}

/// Answers that say something about the request or the provider as a whole, never about the key.
/// Whatever the patterns say, they never count against a key: otherwise a client could empty the
/// pool by sending bad requests.
pub const NEVER_THE_KEYS_FAULT: [u16; 7] = [400, 404, 405, 413, 415, 422, 529];

/// Why an answer counts against a key; each class has its own treatment and counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// 429: cools down, for as long as the provider says when it says.
    RateLimit,
    /// 5xx: cools down with `cooldownDuration` (and backoff).
    ServerError,
    /// `disableOnStatus` (401/402/403) or a 429 saying `insufficient_quota`: out for
    /// `disableDuration`, since a revoked or unpaid key will not heal in a minute.
    KeyRefused,
    /// Any other code a `failoverOnStatus` pattern adds: treated like a rate limit.
    Other,
    /// Not an error: a success said the key's budget is used up (`preemptiveCooldown`), so it
    /// rests until the provider's reset. `classify` never gives it.
    BudgetSpent,
}

impl FailureClass {
    pub const ALL: [FailureClass; 5] = [
        FailureClass::RateLimit,
        FailureClass::ServerError,
        FailureClass::KeyRefused,
        FailureClass::Other,
        FailureClass::BudgetSpent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FailureClass::RateLimit => "rate_limit",
            FailureClass::ServerError => "server_error",
            FailureClass::KeyRefused => "key_refused",
            FailureClass::Other => "other",
            FailureClass::BudgetSpent => "budget_spent",
        }
    }

    /// Whether the provider's retry hints apply (a server error's `retry-after` is about the
    /// provider, not the key's limit window).
    pub fn takes_retry_hints(self) -> bool {
        matches!(self, FailureClass::RateLimit | FailureClass::Other)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The key served the request: its failure run and backoff start again.
    Success,
    /// The answer counts against the key.
    KeyFailure(FailureClass),
    /// Says nothing about the key.
    Neutral,
}

/// Classifies an upstream status. `quota_exhausted` says a 429's error body reported
/// `insufficient_quota` (the caller reads the body only for 429s).
pub fn classify(
    status: u16,
    failover_on: &StatusSet,
    disable_on: &StatusSet,
    quota_exhausted: bool,
) -> Verdict {
    if NEVER_THE_KEYS_FAULT.contains(&status) {
        return Verdict::Neutral;
    }
    if disable_on.contains(status) || (status == 429 && quota_exhausted) {
        return Verdict::KeyFailure(FailureClass::KeyRefused);
    }
    if failover_on.contains(status) {
        let class = match status {
            429 => FailureClass::RateLimit,
            500..=599 => FailureClass::ServerError,
            _ => FailureClass::Other,
        };
        return Verdict::KeyFailure(class);
    }
    if (200..300).contains(&status) {
        Verdict::Success
    } else {
        Verdict::Neutral
    }
}

/// The protected codes a configured pattern would match, for a warning at load.
pub fn shadowed_codes(pattern: &StatusPattern) -> Vec<u16> {
    NEVER_THE_KEYS_FAULT
        .iter()
        .copied()
        .filter(|&code| pattern.matches(code))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> StatusPattern {
        StatusPattern::parse(s).unwrap()
    }

    #[test]
    fn patterns_match_whole_codes() {
        let table: &[(&str, &[u16], &[u16])] = &[
            ("429", &[429], &[428, 430, 529, 42, 4290]),
            ("5.*", &[500, 503, 599], &[499, 600, 250, 405]),
            ("5xx", &[500, 502, 599], &[400, 600, 150]),
            ("5XX", &[500], &[400]),
            ("50.", &[500, 503, 509], &[510, 499]),
            ("50.*", &[500, 509], &[510]),
            ("4.*", &[400, 429, 499], &[500]),
            ("..3", &[403, 503, 203], &[404]),
            (" 429 ", &[429], &[428]),
        ];
        for (text, yes, no) in table {
            let pat = p(text);
            for code in *yes {
                assert!(pat.matches(*code), "{text} should match {code}");
            }
            for code in *no {
                assert!(!pat.matches(*code), "{text} should not match {code}");
            }
        }
    }

    #[test]
    fn bad_patterns_are_refused_with_a_hint() {
        for bad in [
            "", "5", "5*", "42", "4290", "abc", "5.+", ".*", "6xx", "0..", "5x", "4 29", "5.*.",
            "∞", "429,500",
        ] {
            let err = StatusPattern::parse(bad).unwrap_err();
            assert!(
                err.0.contains("status") || err.0.contains("HTTP"),
                "{bad:?}: {}",
                err.0
            );
        }
    }

    #[test]
    fn classification_table() {
        use FailureClass::*;
        let broad = [p("4.*"), p("5.*")];
        let default = [p("429"), p("5xx")];
        let refuse = [p("401"), p("402"), p("403")];
        type Row<'a> = (u16, &'a [StatusPattern], &'a [StatusPattern], bool, Verdict);
        let table: &[Row] = &[
            (
                429,
                &default,
                &refuse,
                false,
                Verdict::KeyFailure(RateLimit),
            ),
            (
                429,
                &default,
                &refuse,
                true,
                Verdict::KeyFailure(KeyRefused),
            ),
            (429, &[], &refuse, true, Verdict::KeyFailure(KeyRefused)),
            (429, &[p("5xx")], &refuse, false, Verdict::Neutral),
            (
                503,
                &default,
                &refuse,
                false,
                Verdict::KeyFailure(ServerError),
            ),
            (500, &[p("429")], &refuse, false, Verdict::Neutral),
            (
                401,
                &default,
                &refuse,
                false,
                Verdict::KeyFailure(KeyRefused),
            ),
            (403, &[], &refuse, false, Verdict::KeyFailure(KeyRefused)),
            (401, &default, &[], false, Verdict::Neutral),
            (409, &broad, &[], false, Verdict::KeyFailure(Other)),
            (200, &broad, &refuse, false, Verdict::Success),
            (204, &broad, &refuse, false, Verdict::Success),
            (302, &broad, &refuse, false, Verdict::Neutral),
        ];
        for (status, failover_on, disable_on, quota, want) in table {
            let (failover_on, disable_on) = (StatusSet::of(failover_on), StatusSet::of(disable_on));
            assert_eq!(
                classify(*status, &failover_on, &disable_on, *quota),
                *want,
                "{status}"
            );
        }
    }

    #[test]
    fn the_requests_own_faults_never_count_whatever_the_patterns() {
        let all = StatusSet::of(&[p("1xx"), p("2xx"), p("3xx"), p("4xx"), p("5xx")]);
        for code in NEVER_THE_KEYS_FAULT {
            assert_eq!(classify(code, &all, &all, true), Verdict::Neutral, "{code}");
        }
    }

    #[test]
    fn a_set_holds_exactly_the_codes_its_patterns_match() {
        // "x.*" matches any code, 600 to 999 too (an upstream may send one).
        let patterns = [p("429"), p("5xx"), p("40."), p("x9.*")];
        let set = StatusSet::of(&patterns);
        for code in 0..=1_100u16 {
            let want = patterns.iter().any(|pat| pat.matches(code));
            assert_eq!(set.contains(code), want, "{code}");
        }
        assert!(set.contains(999) && set.contains(190) && !set.contains(1_000));
        assert_eq!(format!("{:?}", StatusSet::of(&[p("429")])), "{429}");
        assert_eq!(format!("{:?}", StatusSet::of(&[])), "{}");
    }

    #[test]
    fn shadowed_codes_are_reported() {
        assert_eq!(
            shadowed_codes(&p("4.*")),
            vec![400, 404, 405, 413, 415, 422]
        );
        assert_eq!(shadowed_codes(&p("5xx")), vec![529]);
        assert!(shadowed_codes(&p("429")).is_empty());
    }
}
