//! What an upstream answer says about its key, and `retryOnFailure`: sending a downstream request
//! again with another key when its answer is a failure another key could cure. Plain Rust for any
//! host: the host reads, sends and replies; this decides what is recorded, what is sent again,
//! where, and what the client gets.
//!
//! Both hosts record answers and judge re-sends with the functions here. The native host also
//! plans and concludes its re-sends here; the wasm glue still plans its own (`send_retry`), with
//! the callout registry and held requests around it.

use crate::core::budget;
use crate::core::engine::{Assignment, Clock, Decision, Engine, Host, RetryOutcome};
use crate::core::reply::{KEY_NAME_HEADER, POOL_HEADER};
use crate::core::rewrite::rewrite_model;
use crate::core::status::{Verdict, NEVER_THE_KEYS_FAULT};

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

/// Whether `retryOnFailure` re-sends after this status.
pub fn retriable(engine: &Engine, profile: usize, status: u16) -> bool {
    engine.profile(profile).is_some_and(|p| {
        p.retry.enabled
            && !NEVER_THE_KEYS_FAULT.contains(&status)
            && p.retry.on_status.iter().any(|s| s.matches(status))
    })
}

/// The (pool, key) a request was sent with, as remembered in `RetryState::tried`.
pub fn tried_pair(engine: &Engine, sent: Assignment) -> (usize, usize) {
    (
        engine
            .pool_of(sent.profile)
            .map_or(usize::MAX, |(pool, _)| pool),
        sent.key,
    )
}

/// Downstream `retryOnFailure`: what is needed to send the request again.
pub struct RetryState {
    pub profile: usize,
    /// The request as it went upstream, minus the key header (set per attempt).
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub body_complete: bool,
    pub body_too_large: bool,
    /// (pool, key) pairs that failed for this request, in order.
    pub tried: Vec<(usize, usize)>,
    /// The pool of the first attempt, which went to the request's own cluster.
    pub first_pool: usize,
    pub retries_done: u32,
    /// The re-send in flight: the host's call id and its key.
    pub in_flight: Option<(u64, Assignment)>,
}

impl RetryState {
    /// For a request of `primary` sent with `first`; `request_headers` as they went upstream
    /// (names lowercase): all but the key header, hop-by-hop headers and `content-length` are
    /// sent again.
    pub fn new(
        engine: &Engine,
        primary: usize,
        first: Assignment,
        request_headers: Vec<(String, Vec<u8>)>,
        body_complete: bool,
    ) -> Self {
        let auth = engine
            .profile(first.profile)
            .map_or("", |p| p.auth.name.as_str());
        let headers = request_headers
            .into_iter()
            .filter(|(n, _)| n != auth && !is_hop_by_hop(n) && n != "content-length")
            .collect();
        RetryState {
            profile: primary,
            headers,
            body: Vec::new(),
            body_complete,
            body_too_large: false,
            tried: Vec::new(),
            first_pool: engine.pool_of(first.profile).map_or(usize::MAX, |(p, _)| p),
            retries_done: 0,
            in_flight: None,
        }
    }

    /// The most request body a re-send keeps (`retryOnFailure.maxBodyBytes`).
    pub fn body_limit(&self, engine: &Engine) -> usize {
        engine
            .profile(self.profile)
            .map_or(0, |p| p.retry.max_body_bytes)
    }
}

/// One re-send, for the host to send.
pub struct Resend {
    pub sent: Assignment,
    pub cluster: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

impl Resend {
    pub fn header_refs(&self) -> Vec<(&str, &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect()
    }
}

/// The next re-send with a key this request has not tried, if the budget and the pools allow:
/// first the other keys of its pool, then its fallback pools in order. `own_cluster` is the
/// request's own cluster, which reaches the first attempt's pool. A key picked but not used is
/// given back.
pub fn plan(
    engine: &mut Engine,
    host: &dyn Host,
    retry: &RetryState,
    now: u64,
    own_cluster: &mut dyn FnMut() -> Option<String>,
) -> Option<Resend> {
    let p = engine.profile(retry.profile)?;
    let (max_retries, timeout_ms) = (p.retry.max_retries, p.retry.timeout_ms);
    if retry.retries_done >= max_retries || !retry.body_complete || retry.body_too_large {
        return None;
    }
    let tried = &retry.tried;
    let sent = match engine.decide(host, Some(retry.profile), &Clock::at(now), tried) {
        Decision::UseKey(a) if !tried.contains(&tried_pair(engine, a)) => a,
        // No key left that this request has not failed with: the client gets the failure.
        Decision::UseKey(a) => {
            engine.abandon(host, a, now);
            return None;
        }
        _ => return None,
    };
    // The first attempt's pool is reached through the request's own cluster; a fallback pool
    // through its configured cluster, or the one its traffic was seen to take.
    let same_pool = engine.pool_of(sent.profile).map(|(pool, _)| pool) == Some(retry.first_pool);
    let cluster = if same_pool {
        own_cluster()
    } else {
        engine.cluster_for(host, sent.profile)
    };
    let Some(cluster) = cluster else {
        log::debug!("no known cluster for a fallback pool; not retrying there");
        engine.abandon(host, sent, now);
        return None;
    };
    let (auth_name, auth_value) = engine.key_header(sent.profile, sent.key)?;
    let pool_label = engine
        .pool_of(sent.profile)
        .map(|(_, l)| l.to_string())
        .unwrap_or_default();
    let mut headers: Vec<(String, Vec<u8>)> = retry
        .headers
        .iter()
        .filter(|(n, _)| n != POOL_HEADER)
        .cloned()
        .collect();
    headers.push((auth_name.to_string(), auth_value.as_bytes().to_vec()));
    headers.push((POOL_HEADER.to_string(), pool_label.into_bytes()));
    let body = engine
        .profile(sent.profile)
        .and_then(|p| p.model.as_deref())
        .and_then(|model| rewrite_model(&retry.body, model))
        .unwrap_or_else(|| retry.body.clone());
    Some(Resend {
        sent,
        cluster,
        headers,
        body,
        timeout_ms,
    })
}

/// The host sent `sent` as call `call_id`.
pub fn started(engine: &mut Engine, retry: &mut RetryState, call_id: u64, sent: Assignment) {
    retry.retries_done += 1;
    retry.in_flight = Some((call_id, sent));
    engine.count_retry(retry.profile, RetryOutcome::Started);
}

/// What a re-send got back.
pub enum CallAnswer<'a> {
    /// From the upstream (Envoy's router marked it so).
    Upstream {
        status: u16,
        headers: &'a [(String, Vec<u8>)],
        body: &'a [u8],
    },
    /// Envoy answered the call itself (timeout, reset, no host), or nothing came back.
    Local(Option<u16>),
}

/// What the client gets when no re-send follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The last answer's status, with its headers (`reply_headers`) and body.
    Reply(u16),
    /// 502 with `NO_ANSWER_BODY`.
    NoAnswer,
}

pub const NO_ANSWER_DETAILS: &str = "ai_key_failover_retry_failed";
pub const NO_ANSWER_BODY: &[u8] = b"{\"error\":{\"message\":\"the retried request got no answer from the upstream\",\"type\":\"upstream_error\",\"param\":null,\"code\":\"retry_failed\"}}";
pub const REPLY_DETAILS: &str = "ai_key_failover_retried";

pub enum Next {
    /// Send this; if the host cannot, the client gets `otherwise` (through `conclude`).
    Resend {
        resend: Resend,
        otherwise: Outcome,
    },
    Done(Outcome),
}

/// Judges a re-send's answer and says what follows it.
pub fn on_answer(
    engine: &mut Engine,
    host: &dyn Host,
    retry: &mut RetryState,
    sent: Assignment,
    answer: CallAnswer,
    now: u64,
    own_cluster: &mut dyn FnMut() -> Option<String>,
) -> Next {
    let otherwise = match answer {
        CallAnswer::Upstream {
            status,
            headers,
            body,
        } => {
            let clock = Clock::at(now);
            judge_with_body(engine, host, sent, status, headers, body, &clock);
            if (200..300).contains(&status) {
                note_budget(engine, host, sent, &clock, |family, now_ms| {
                    budget::spent_for_ms_in(family, now_ms, headers)
                });
            }
            if !retriable(engine, sent.profile, status) {
                return Next::Done(Outcome::Reply(status));
            }
            Outcome::Reply(status)
        }
        CallAnswer::Local(status) => {
            engine.record(host, sent, Verdict::Neutral, 0, None, &Clock::at(now));
            status.map_or(Outcome::NoAnswer, Outcome::Reply)
        }
    };
    retry.tried.push(tried_pair(engine, sent));
    match plan(engine, host, retry, now, own_cluster) {
        Some(resend) => Next::Resend { resend, otherwise },
        None => Next::Done(otherwise),
    }
}

/// Another re-send (`next`, call `call_id`) follows `previous`, which therefore failed.
pub fn resent(
    engine: &mut Engine,
    retry: &mut RetryState,
    call_id: u64,
    next: Assignment,
    previous: Assignment,
) {
    started(engine, retry, call_id, next);
    engine.count_retry(previous.profile, RetryOutcome::Failed);
}

/// No re-send follows `sent`: counts how it ended and returns what the client gets.
pub fn conclude(engine: &mut Engine, sent: Assignment, outcome: Outcome) -> Outcome {
    let counted = match outcome {
        Outcome::Reply(status) if (200..300).contains(&status) => RetryOutcome::Succeeded,
        _ => RetryOutcome::Failed,
    };
    engine.count_retry(sent.profile, counted);
    outcome
}

/// The key's name for the reply's `x-ai-key-failover-key`, with `exposeKeyName`.
pub fn reply_label(engine: &Engine, sent: Assignment) -> Option<String> {
    engine
        .profile(sent.profile)
        .filter(|p| p.expose_key_name)
        .and_then(|_| engine.key_label(sent.profile, sent.key))
}

/// The headers the client gets with a re-send's answer.
pub fn reply_headers<'a>(
    headers: &'a [(String, Vec<u8>)],
    label: Option<&'a str>,
) -> Vec<(&'a str, &'a [u8])> {
    let mut reply: Vec<(&str, &[u8])> = headers
        .iter()
        .filter(|(n, _)| !n.starts_with(':') && !is_hop_by_hop(n) && n != "content-length")
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    if let Some(label) = label {
        reply.push((KEY_NAME_HEADER, label.as_bytes()));
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(retry: &str) -> Engine {
        let text =
            format!(r#"{{"name": "p", "apiTokens": ["sk-a", "sk-b"], "retryOnFailure": {retry}}}"#);
        Engine::new(crate::core::config::parse(text.as_bytes()).unwrap(), 1)
    }

    #[test]
    fn never_retries_what_is_not_the_keys_fault() {
        let e = engine(r#"{"enabled": true, "retryOnStatus": ["4.*", "5.*"]}"#);
        let profile = e.profile_for(&mut NoFacts).unwrap();
        assert!(retriable(&e, profile, 429));
        assert!(retriable(&e, profile, 503));
        for status in NEVER_THE_KEYS_FAULT {
            assert!(!retriable(&e, profile, status), "{status}");
        }
        let off = engine(r#"{"enabled": false}"#);
        assert!(!retriable(
            &off,
            off.profile_for(&mut NoFacts).unwrap(),
            429
        ));
    }

    #[test]
    fn the_client_gets_the_answer_without_connection_headers_and_with_the_key_name() {
        let headers: Vec<(String, Vec<u8>)> = [
            (":status", "200"),
            ("content-type", "application/json"),
            ("content-length", "12"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),
            ("x-ratelimit-remaining-requests", "9"),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
        let names: Vec<&str> = reply_headers(&headers, Some("alfa"))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                "content-type",
                "x-ratelimit-remaining-requests",
                KEY_NAME_HEADER
            ]
        );
    }

    #[test]
    fn a_re_sends_success_that_reports_the_budget_spent_rests_its_key() {
        let host = crate::core::engine::tests::TestHost::default();
        let mut e = engine(r#"{"enabled": true}, "failover": {"preemptiveCooldown": true}"#);
        e.start(&host, 0);
        let profile = e.profile_for(&mut NoFacts).unwrap();
        let Decision::UseKey(first) = e.decide(&host, Some(profile), &Clock::at(0), &[]) else {
            panic!("a key for the first attempt");
        };
        let mut retry = RetryState::new(&e, profile, first, Vec::new(), true);
        retry.tried.push(tried_pair(&e, first));
        let next = plan(&mut e, &host, &retry, 0, &mut || Some("c".to_string())).unwrap();
        assert_ne!(next.sent.key, first.key);
        started(&mut e, &mut retry, 7, next.sent);
        let headers: Vec<(String, Vec<u8>)> = [
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "30s"),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
        let answer = CallAnswer::Upstream {
            status: 200,
            headers: &headers,
            body: b"{}",
        };
        let after = on_answer(
            &mut e,
            &host,
            &mut retry,
            next.sent,
            answer,
            10,
            &mut || None,
        );
        assert!(matches!(after, Next::Done(Outcome::Reply(200))));
        for _ in 0..4 {
            let Decision::UseKey(a) = e.decide(&host, Some(profile), &Clock::at(20), &[]) else {
                panic!("the other key serves");
            };
            assert_eq!(a.key, first.key, "the spent key rests until its reset");
        }
    }

    struct NoFacts;

    impl crate::core::rules::RequestFacts for NoFacts {
        fn route_name(&mut self) -> Option<String> {
            None
        }
        fn cluster_name(&mut self) -> Option<String> {
            None
        }
        fn host(&mut self) -> Option<String> {
            None
        }
    }
}
