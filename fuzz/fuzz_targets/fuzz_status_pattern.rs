//! status::StatusPattern::parse and matches on arbitrary text; classify with the parsed patterns.
#![no_main]

use ai_key_failover::core::status::{self, StatusPattern, StatusSet, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes pick a status to match against; the rest is the pattern text.
    let (probe, text) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]), rest),
        _ => (429, data),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(pattern) = StatusPattern::parse(text) else {
        return;
    };
    // Only codes 100..=999 ever match; a pattern never matches nothing-but-junk.
    for s in [0, 1, 99, 1000, 6553, u16::MAX, probe] {
        if !(100..=999).contains(&s) {
            assert!(!pattern.matches(s), "{text:?} matched {s}");
        }
    }
    let matched: Vec<u16> = (100..=999).filter(|&s| pattern.matches(s)).collect();
    assert!(!matched.is_empty(), "{text:?} parsed but matches nothing");
    // An exact code matches exactly itself.
    let t = text.trim();
    if t.len() == 3 && t.bytes().all(|b| b.is_ascii_digit()) {
        let code: u16 = t.parse().unwrap_or(0);
        assert_eq!(matched, vec![code]);
    }
    // The set holds exactly what the pattern matches.
    let set = StatusSet::of(&[pattern]);
    for s in [0, 1, 99, 1000, 6553, u16::MAX, probe] {
        assert_eq!(set.contains(s), pattern.matches(s), "{text:?} at {s}");
    }
    // The request's own faults never count against a key, whatever the pattern.
    for code in status::NEVER_THE_KEYS_FAULT {
        assert_eq!(status::classify(code, &set, &set, true), Verdict::Neutral);
    }
    let _ = status::classify(probe, &set, &StatusSet::of(&[]), probe == 429);
    let _ = status::shadowed_codes(&pattern);
});
