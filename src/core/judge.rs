//! One judgement of an upstream answer, for live traffic and health checks alike: its verdict
//! (`status::classify` under a pool's `failover` settings, with what a 429's error body says about
//! quota) and, when that verdict takes one, the provider's retry hint (`hints`).
//!
//! The parts of an answer cost host calls to read, so the judgement is asked in steps a live
//! request can stop after: the status alone gives a verdict; the error body is read only when
//! `wants_error_body`, the headers only when `wants_hint`. A health check has its answer whole
//! and asks `judge`, which takes the same steps.
//!
//! Whether failover is on at all is the live path's question (`Engine::verdict`): a health check
//! judges its answer whatever that switch says, as it always has.

use crate::core::config::Failover;
use crate::core::hints;
use crate::core::status::{classify, Verdict};

/// What an answer says about its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    /// How long the provider asked the key to rest, when the verdict takes retry hints and
    /// `respectRetryAfter` is on.
    pub hint_ms: Option<u64>,
}

/// The verdict of `status`. `error_body`: the answer's body, when it was read; only a 429's can
/// say `insufficient_quota` and so refuse the key, so other bodies are not parsed.
pub fn verdict(failover: &Failover, status: u16, error_body: Option<&[u8]>) -> Verdict {
    let quota_exhausted =
        wants_error_body(status) && error_body.is_some_and(hints::is_insufficient_quota);
    classify(
        status,
        &failover.failover_on_status,
        &failover.disable_on_status,
        quota_exhausted,
    )
}

/// Whether the body may change the verdict or carry a retry hint: only a 429's, so no success
/// body is ever read.
pub fn wants_error_body(status: u16) -> bool {
    status == 429
}

/// Whether the verdict takes the provider's retry hints: a rate limit (or a status a pattern
/// adds) with `respectRetryAfter` on. A server error's `retry-after` speaks of the provider, a
/// refusal's of nothing the key's rest should follow.
pub fn wants_hint(failover: &Failover, verdict: Verdict) -> bool {
    match verdict {
        Verdict::KeyFailure(class) => failover.respect_retry_after && class.takes_retry_hints(),
        Verdict::Success | Verdict::Neutral => false,
    }
}

/// The retry hint of an answer judged `verdict`, or None when the verdict takes none (then
/// neither the headers nor the clock are looked at). `now_ms` is asked only for a hint given as
/// a time.
pub fn hint_ms(
    failover: &Failover,
    verdict: Verdict,
    headers: &[(String, Vec<u8>)],
    error_body: Option<&[u8]>,
    now_ms: impl FnOnce() -> u64,
) -> Option<u64> {
    if !wants_hint(failover, verdict) {
        return None;
    }
    let pairs: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    hints::retry_hint_ms(&pairs, error_body, now_ms())
}

/// The whole judgement of an answer whose parts are all at hand (a health check's). Its body
/// may carry a hint whatever the status; only a 429's is asked about quota.
pub fn judge(
    failover: &Failover,
    status: u16,
    headers: &[(String, Vec<u8>)],
    body: &[u8],
    now_ms: u64,
) -> Judgement {
    let verdict = verdict(failover, status, Some(body));
    Judgement {
        verdict,
        hint_ms: hint_ms(failover, verdict, headers, Some(body), || now_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config;
    use crate::core::status::FailureClass;

    fn failover(json_failover: &str) -> Failover {
        let json = format!(r#"{{"apiTokens": ["a"], "failover": {json_failover}}}"#);
        let cfg = config::parse(json.as_bytes()).unwrap();
        cfg.profiles[0].failover.clone()
    }

    fn header(name: &str, value: &str) -> (String, Vec<u8>) {
        (name.to_string(), value.as_bytes().to_vec())
    }

    const QUOTA_BODY: &[u8] = br#"{"error": {"type": "insufficient_quota", "message": "no"}}"#;

    #[test]
    fn an_answer_gives_its_verdict_and_the_hint_only_a_rate_limit_takes() {
        use FailureClass::{KeyRefused, RateLimit, ServerError};
        let f = failover("{}");
        let wait = [header("retry-after", "7")];
        let cases = [
            (429, &b""[..], Verdict::KeyFailure(RateLimit), Some(7_000)),
            (503, b"", Verdict::KeyFailure(ServerError), None),
            (429, QUOTA_BODY, Verdict::KeyFailure(KeyRefused), None),
            (401, b"", Verdict::KeyFailure(KeyRefused), None),
            (400, QUOTA_BODY, Verdict::Neutral, None),
            (200, QUOTA_BODY, Verdict::Success, None),
        ];
        for (status, body, verdict, hint_ms) in cases {
            assert_eq!(
                judge(&f, status, &wait, body, 0),
                Judgement { verdict, hint_ms },
                "status {status}, body {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn hints_are_ignored_when_respect_retry_after_is_off() {
        let f = failover(r#"{"respectRetryAfter": false}"#);
        let j = judge(&f, 429, &[header("retry-after", "7")], b"", 0);
        assert_eq!(j.verdict, Verdict::KeyFailure(FailureClass::RateLimit));
        assert_eq!(j.hint_ms, None);
    }

    #[test]
    fn the_live_steps_come_to_the_same_judgement_and_read_only_what_they_need() {
        let f = failover("{}");
        let headers = [header("retry-after-ms", "1500")];
        for (status, body) in [
            (429, &b""[..]),
            (429, QUOTA_BODY),
            (503, &b""[..]),
            (200, &b""[..]),
        ] {
            let whole = judge(&f, status, &headers, body, 0);
            // A live request: the status first; the body only if wanted; the headers only if
            // the verdict takes a hint.
            let read_body = wants_error_body(status).then_some(body);
            let live_verdict = verdict(&f, status, read_body);
            let mut clock_read = false;
            let live_hint = if wants_hint(&f, live_verdict) {
                hint_ms(&f, live_verdict, &headers, read_body, || {
                    clock_read = true;
                    0
                })
            } else {
                None
            };
            assert_eq!(
                Judgement {
                    verdict: live_verdict,
                    hint_ms: live_hint
                },
                whole,
                "status {status}"
            );
            assert_eq!(clock_read, whole.hint_ms.is_some(), "status {status}");
        }
        assert!(!wants_error_body(200) && !wants_error_body(503));
    }
}
