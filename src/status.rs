//! Status patterns (`failoverOnStatus`) and the classification of an upstream response.

use std::fmt;

/// One `failoverOnStatus` entry: each of the three digits is either fixed or a wildcard.
/// Written as an exact code (`429`), or a class (`5xx`, `5.*`, `50.`); it always matches a whole code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusPattern {
    digits: [Option<u8>; 3],
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The key served the request: consecutive failures start again from zero.
    Success,
    /// The answer counts against the key.
    KeyFailure,
    /// Says nothing about the key.
    Neutral,
}

pub fn classify(status: u16, failover_on: &[StatusPattern]) -> Verdict {
    if NEVER_THE_KEYS_FAULT.contains(&status) {
        return Verdict::Neutral;
    }
    if failover_on.iter().any(|p| p.matches(status)) {
        return Verdict::KeyFailure;
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
    fn classification_protects_the_requests_own_faults() {
        let pats = [p("4.*"), p("5.*")];
        for code in NEVER_THE_KEYS_FAULT {
            assert_eq!(classify(code, &pats), Verdict::Neutral, "{code}");
        }
        assert_eq!(classify(429, &pats), Verdict::KeyFailure);
        assert_eq!(classify(401, &pats), Verdict::KeyFailure);
        assert_eq!(classify(503, &pats), Verdict::KeyFailure);
        assert_eq!(classify(200, &pats), Verdict::Success);
        assert_eq!(classify(204, &pats), Verdict::Success);
        assert_eq!(classify(302, &pats), Verdict::Neutral);
        let only_429 = [p("429")];
        assert_eq!(classify(500, &only_429), Verdict::Neutral);
        assert_eq!(classify(429, &only_429), Verdict::KeyFailure);
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
