//! What an upstream answer says about its key: recording a live answer or a call's, its
//! `preemptiveCooldown` budget, and reading the answer to a call of our own. Plain Rust for any
//! host: the host reads the answer, this records what it means.

use crate::core::budget;
use crate::core::engine::{Assignment, Clock, Engine, Host};
use crate::core::hints;
use crate::core::status::Verdict;

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
    let hint_ms = if engine.wants_retry_hint(sent.profile, verdict) {
        let pairs: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        hints::retry_hint_ms(&pairs, body, clock.now())
    } else {
        None
    };
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
    let verdict = engine.verdict(sent.profile, status, hints::is_insufficient_quota(body));
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
pub fn parse_status(value: &[u8]) -> Option<u16> {
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
mod tests {
    use super::*;
    use crate::core::retry::tests::pairs as headers;

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
