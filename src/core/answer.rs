//! What an upstream answer says about its key: a live response as its headers pass
//! (`on_response_headers`, with its error body read as it streams past), or the answer to a call
//! of our own; its `preemptiveCooldown` budget. Plain Rust for any host: the host reads and
//! writes the response through `LiveResponse` (each read a host call, made only when needed);
//! this decides what is read, what is recorded and whether `retryOnFailure` takes over.

use crate::core::budget;
use crate::core::engine::{Assignment, Clock, Engine, Host};
use crate::core::reply::{KEY_NAME_HEADER, POOL_HEADER};
use crate::core::status::{Verdict, NEVER_THE_KEYS_FAULT};
use crate::core::upstream_attempt::Attempt;

/// Enough for any provider's error JSON; a longer body is judged on its start.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A response whose headers are still the host's to read and write.
pub trait LiveResponse {
    fn header(&self, name: &str) -> Option<Vec<u8>>;
    /// Every header: costs more than any other host call, so read only when a hint needs them.
    fn headers(&self) -> Vec<(String, Vec<u8>)>;
    fn set_header(&self, name: &str, value: &[u8]);
    /// Whether Envoy's router got the response from the upstream (`via_upstream`), rather than
    /// answering itself (a timeout, a reset, no healthy upstream).
    fn via_upstream(&self) -> bool;
}

/// What a host does after a response's headers.
pub enum AfterHeaders {
    /// Let the response go on.
    Continue,
    /// A failure `retryOnFailure` re-sends, recorded: the host hands it to
    /// `RetryState::after_first_failure` with the engine released.
    Retry,
    /// A failure whose error body may change its verdict: read it as it streams past
    /// (`ErrorBody::keep_chunk`), then `ErrorBody::judge`.
    ReadBody(ErrorBody),
}

/// Judges a response to a request sent with `sent` as its headers pass: sets the key and pool
/// headers with `exposeKeyName`, tells an upstream-mode `attempt` its status, records what the
/// answer says about the key, and says what follows. `retries`: the request has
/// `retryOnFailure` state (downstream mode).
#[allow(clippy::too_many_arguments)]
pub fn on_response_headers(
    engine: &mut Engine,
    host: &dyn Host,
    live: &impl LiveResponse,
    sent: Assignment,
    attempt: Option<&Attempt>,
    retries: bool,
    end_of_stream: bool,
    clock: &Clock,
) -> AfterHeaders {
    if engine
        .profile(sent.profile)
        .is_some_and(|p| p.expose_key_name)
    {
        if let Some(label) = engine.key_label(sent.profile, sent.key) {
            live.set_header(KEY_NAME_HEADER, label.as_bytes());
        }
        if let Some((_, pool)) = engine.pool_of(sent.profile) {
            live.set_header(POOL_HEADER, pool.as_bytes());
        }
    }
    let Some(status) = live.header(":status").and_then(|s| parse_status(&s)) else {
        engine.abandon(host, sent, clock.now());
        return AfterHeaders::Continue;
    };
    if let Some(attempt) = attempt {
        attempt.answered(engine, sent, status, clock);
    }
    // The verdict without an error body; only a 429 whose body is read can change it.
    let first_look = engine.verdict(sent.profile, status, None);
    // Asked only of answers that could count or be retried: a success needs no host call.
    let via_upstream =
        (matches!(first_look, Verdict::KeyFailure(_)) || status >= 400) && live.via_upstream();
    // Envoy's own replies (timeouts, resets, no healthy upstream) say nothing about the key.
    if matches!(first_look, Verdict::KeyFailure(_)) && !via_upstream {
        engine.record(host, sent, Verdict::Neutral, status, None, clock);
        return AfterHeaders::Continue;
    }
    if retries && via_upstream && retriable(engine, sent.profile, status) {
        record_live(engine, host, live, sent, status, first_look, clock);
        return AfterHeaders::Retry;
    }
    // An upstream filter's attempt is reset by Envoy's retry before its body arrives.
    let read_body =
        attempt.is_none() && engine.wants_error_body(sent.profile, status) && !end_of_stream;
    if read_body {
        return AfterHeaders::ReadBody(ErrorBody {
            sent,
            status,
            headers: live.headers(),
            body: Vec::new(),
        });
    }
    record_live(engine, host, live, sent, status, first_look, clock);
    if first_look == Verdict::Success {
        // Only the remaining counts are read, and a reset only for a count that is 0.
        note_budget(engine, host, sent, clock, |family, now_ms| {
            budget::spent_for_ms(family, now_ms, |name| live.header(name))
        });
    }
    AfterHeaders::Continue
}

/// Whether `retryOnFailure` re-sends after this status: a failure another key could cure.
pub fn retriable(engine: &Engine, profile: usize, status: u16) -> bool {
    engine.profile(profile).is_some_and(|p| {
        p.retry.enabled
            && !NEVER_THE_KEYS_FAULT.contains(&status)
            && p.retry.on_status.contains(status)
    })
}

/// Records a live response: its headers are read only when the verdict takes retry hints.
fn record_live(
    engine: &mut Engine,
    host: &dyn Host,
    live: &impl LiveResponse,
    sent: Assignment,
    status: u16,
    verdict: Verdict,
    clock: &Clock,
) {
    let headers = if engine.wants_retry_hint(sent.profile, verdict) {
        live.headers()
    } else {
        Vec::new()
    };
    record_answer(engine, host, sent, status, verdict, &headers, None, clock);
}

/// A failure's error body (for `insufficient_quota` or a Gemini retry delay), read as it
/// streams past; nothing is held back from the client.
pub struct ErrorBody {
    sent: Assignment,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl ErrorBody {
    /// A chunk streamed past: `read` reads at most the given number of bytes of it, and is
    /// called only while there is room. True when the body is complete or the room used up:
    /// judge it now.
    pub fn keep_chunk(
        &mut self,
        end_of_stream: bool,
        read: impl FnOnce(usize) -> Option<Vec<u8>>,
    ) -> bool {
        let room = MAX_ERROR_BODY.saturating_sub(self.body.len());
        if room > 0 {
            if let Some(chunk) = read(room) {
                self.body.extend_from_slice(&chunk);
            }
        }
        end_of_stream || self.body.len() >= MAX_ERROR_BODY
    }

    /// Records the answer with what was read of its body (all of it, or the stream ended).
    pub fn judge(self, engine: &mut Engine, host: &dyn Host, clock: &Clock) {
        judge_with_body(
            engine,
            host,
            self.sent,
            self.status,
            &self.headers,
            &self.body,
            clock,
        );
    }
}

/// Records what an upstream response says about its key; `headers` are needed only when the
/// verdict takes retry hints (`Engine::wants_retry_hint`), `body` only for a body's hint.
#[allow(clippy::too_many_arguments)]
pub fn record_answer(
    engine: &mut Engine,
    host: &dyn Host,
    sent: Assignment,
    status: u16,
    verdict: Verdict,
    headers: &[(String, Vec<u8>)],
    body: Option<&[u8]>,
    clock: &Clock,
) {
    let hint_ms = engine.retry_hint_ms(sent.profile, verdict, headers, body, clock);
    engine.record(host, sent, verdict, status, hint_ms, clock);
}

/// Classifies an upstream response with the error body that was read, and records it.
pub fn judge_with_body(
    engine: &mut Engine,
    host: &dyn Host,
    sent: Assignment,
    status: u16,
    headers: &[(String, Vec<u8>)],
    body: &[u8],
    clock: &Clock,
) {
    let verdict = engine.verdict(sent.profile, status, Some(body));
    record_answer(
        engine,
        host,
        sent,
        status,
        verdict,
        headers,
        Some(body),
        clock,
    );
}

/// `preemptiveCooldown`: a success that says the key's budget is used up rests the key until
/// the reset. `spent_for` reads the answer's budget headers (`budget::spent_for_ms` on live
/// headers, `budget::spent_for_ms_in` on read ones) for the key's family at `now_ms`.
pub fn note_budget(
    engine: &mut Engine,
    host: &dyn Host,
    sent: Assignment,
    clock: &Clock,
    spent_for: impl FnOnce(budget::Family, u64) -> Option<u64>,
) {
    let Some(family) = engine.wants_budget(sent.profile) else {
        return;
    };
    // Only Anthropic's resets are absolute times; OpenAI's need no clock read.
    let now_ms = if family == budget::Family::Anthropic {
        clock.now()
    } else {
        0
    };
    if let Some(ms) = spent_for(family, now_ms) {
        engine.spend(host, sent, ms, clock);
    }
}

/// Headers that describe one connection, never copied into another request or response.
pub fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
    )
}

/// A `:status` header's value as a number; None when it is not one.
fn parse_status(value: &[u8]) -> Option<u16> {
    std::str::from_utf8(value).ok()?.parse::<u16>().ok()
}

/// What a call of our own (a re-send, a health check) got back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallAnswer<'a> {
    /// From the upstream (Envoy's router marked it so).
    Upstream {
        status: u16,
        headers: &'a [(String, Vec<u8>)],
        body: &'a [u8],
    },
    /// Envoy answered the call itself (timeout, reset, no healthy host), or nothing came back
    /// (no headers at all).
    Local(Option<u16>),
}

impl<'a> CallAnswer<'a> {
    /// Reads a call's answer as the host handed it over: `headers` empty when none came.
    pub fn of(headers: &'a [(String, Vec<u8>)], body: &'a [u8]) -> Self {
        let status = headers
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| parse_status(v));
        // Envoy's router marks answers that came from the upstream; its own replies to the call
        // (timeout, no healthy host, reset) carry no such header and say nothing about a key.
        let from_upstream = headers
            .iter()
            .any(|(n, _)| n == "x-envoy-upstream-service-time");
        match status {
            Some(status) if from_upstream => CallAnswer::Upstream {
                status,
                headers,
                body,
            },
            local => CallAnswer::Local(local),
        }
    }

    /// The upstream's status; None for an answer Envoy gave itself.
    pub fn upstream_status(&self) -> Option<u16> {
        match self {
            CallAnswer::Upstream { status, .. } => Some(*status),
            CallAnswer::Local(_) => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;
    use crate::core::engine::tests::{NoFacts, TestHost};
    use crate::core::engine::Decision;

    /// Header pairs as a host hands them over.
    pub(crate) fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    /// A response as a host has it; counts the host calls that cost.
    struct FakeResponse {
        headers: Vec<(String, Vec<u8>)>,
        via_upstream: bool,
        set: RefCell<Vec<(String, Vec<u8>)>>,
        upstream_asked: Cell<u32>,
        all_read: Cell<u32>,
    }

    impl FakeResponse {
        fn new(pairs: &[(&str, &str)], via_upstream: bool) -> Self {
            FakeResponse {
                headers: headers(pairs),
                via_upstream,
                set: RefCell::default(),
                upstream_asked: Cell::new(0),
                all_read: Cell::new(0),
            }
        }
    }

    impl LiveResponse for FakeResponse {
        fn header(&self, name: &str) -> Option<Vec<u8>> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        }
        fn headers(&self) -> Vec<(String, Vec<u8>)> {
            self.all_read.set(self.all_read.get() + 1);
            self.headers.clone()
        }
        fn set_header(&self, name: &str, value: &[u8]) {
            self.set
                .borrow_mut()
                .push((name.to_string(), value.to_vec()));
        }
        fn via_upstream(&self) -> bool {
            self.upstream_asked.set(self.upstream_asked.get() + 1);
            self.via_upstream
        }
    }

    /// Sends one request of a two-key pool and judges its response's headers; then the key the
    /// next request gets (every key but a rested one serves in turn).
    fn judge(
        config: &str,
        response: &FakeResponse,
        retries: bool,
    ) -> (AfterHeaders, Assignment, Vec<usize>) {
        let host = TestHost::default();
        let mut e = Engine::new(crate::core::config::parse(config.as_bytes()).unwrap(), 1);
        e.start(&host, 0);
        let profile = e.profile_for(&mut NoFacts).unwrap();
        let Decision::UseKey(sent) = e.decide(&host, Some(profile), &Clock::at(0), &[]) else {
            panic!("a key");
        };
        let clock = Clock::at(1);
        let after =
            on_response_headers(&mut e, &host, response, sent, None, retries, false, &clock);
        let next = (0..4)
            .filter_map(
                |_| match e.decide(&host, Some(profile), &Clock::at(2), &[]) {
                    Decision::UseKey(a) => Some(a.key),
                    _ => None,
                },
            )
            .collect();
        (after, sent, next)
    }

    const POOL: &str = r#"{"name": "p", "apiTokens": ["sk-a", "sk-b"], "exposeKeyName": true,
        "retryOnFailure": {"enabled": true}}"#;

    #[test]
    fn a_success_costs_no_extra_host_call_and_names_its_key() {
        let ok = FakeResponse::new(&[(":status", "200")], true);
        let (after, _, next) = judge(POOL, &ok, true);
        assert!(matches!(after, AfterHeaders::Continue));
        assert_eq!((ok.upstream_asked.get(), ok.all_read.get()), (0, 0));
        let set: Vec<String> = ok.set.borrow().iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(set, [KEY_NAME_HEADER, POOL_HEADER]);
        assert!(next.contains(&0) && next.contains(&1), "both keys serve on");
    }

    #[test]
    fn envoys_own_failure_spares_the_key_and_is_not_retried() {
        let own = FakeResponse::new(&[(":status", "503")], false);
        let (after, _, next) = judge(POOL, &own, true);
        assert!(matches!(after, AfterHeaders::Continue));
        assert!(next.contains(&0) && next.contains(&1), "both keys serve on");
    }

    #[test]
    fn an_upstream_failure_rests_its_key_and_goes_to_retry_or_has_its_body_read() {
        let limited = FakeResponse::new(&[(":status", "429"), ("retry-after", "30")], true);
        let (after, sent, next) = judge(POOL, &limited, true);
        assert!(matches!(after, AfterHeaders::Retry));
        assert_eq!(limited.all_read.get(), 1, "read for its hint");
        assert!(!next.contains(&sent.key), "{next:?}: the key rests");
        // Without retryOnFailure, a 429's body may say more: it is read before judging.
        let (after, sent, next) = judge(POOL, &limited, false);
        let AfterHeaders::ReadBody(mut body) = after else {
            panic!("the body is read");
        };
        assert!(next.contains(&sent.key), "not judged before its body");
        assert!(!body.keep_chunk(false, |room| Some(vec![b' '; room.min(10)])));
        assert!(
            body.keep_chunk(false, |room| Some(vec![b' '; room])),
            "full"
        );
        assert!(body.keep_chunk(true, |_| panic!("no room left")));
        let missing = FakeResponse::new(&[], true);
        assert!(matches!(
            judge(POOL, &missing, true).0,
            AfterHeaders::Continue
        ));
    }

    #[test]
    fn only_an_answer_the_router_marks_as_the_upstreams_is_the_upstreams() {
        let upstream = headers(&[(":status", "429"), ("x-envoy-upstream-service-time", "3")]);
        assert_eq!(CallAnswer::of(&upstream, b"x").upstream_status(), Some(429));
        let envoys = headers(&[(":status", "504")]);
        assert_eq!(CallAnswer::of(&envoys, b""), CallAnswer::Local(Some(504)));
        assert_eq!(CallAnswer::of(&[], b""), CallAnswer::Local(None));
        let garbled = headers(&[(":status", "4x9"), ("x-envoy-upstream-service-time", "3")]);
        assert_eq!(CallAnswer::of(&garbled, b""), CallAnswer::Local(None));
        assert_eq!(parse_status(b"\xff"), None);
    }
}
