//! Downstream `retryOnFailure`: the filter sends a failed request again with another key when
//! its answer is a failure another key could cure. One state machine for every host: it decides
//! which statuses are retried, the next key (the other keys of the request's pool, then its
//! fallback pools in order, with a fallback's `model`), what a re-send that Envoy answered itself
//! means, when to give up, what the client gets, and the `retries*` counts.
//!
//! A host implements `Dispatch` (the engine, the request's own cluster, sending a call) and only
//! moves bytes: it keeps the request body as it streams past (`keep_body_chunk`), holds the first
//! answer back while a re-send runs (`after_first_failure` says whether one went out), hands each
//! call's answer to `on_call_answer` and sends the client the `Reply` it returns.

use std::ops::DerefMut;

use crate::core::answer::{is_hop_by_hop, judge_with_body, note_budget, retriable, CallAnswer};
use crate::core::budget;
use crate::core::engine::{Assignment, Clock, Decision, Engine, Host, RetryOutcome};
use crate::core::reply::{KEY_NAME_HEADER, POOL_HEADER};
use crate::core::rewrite::rewrite_model;
use crate::core::status::Verdict;

/// What the state machine needs from a host, for one request.
pub trait Dispatch {
    /// The engine, borrowed or locked until the guard drops.
    type Engine<'e>: DerefMut<Target = Engine>
    where
        Self: 'e;
    /// None when it is busy (already borrowed further up the stack). Never held across `send`:
    /// Envoy may answer a call that fails at once from inside the call.
    fn engine(&self) -> Option<Self::Engine<'_>>;
    /// The shared data and stats the engine works on.
    fn host(&self) -> &dyn Host;
    /// The request's own cluster (its route's), which reaches the first attempt's pool; asked
    /// only for a re-send into that pool.
    fn own_cluster(&self) -> Option<String>;
    /// Sends a re-send as a call of this request; the call's id, or None when it did not go out.
    fn send(&self, resend: &Resend) -> Option<u64>;
}

/// The (pool, key) a request was sent with, as `Engine::decide` takes keys to avoid.
fn tried_pair(engine: &Engine, sent: Assignment) -> (usize, usize) {
    (
        engine
            .pool_of(sent.profile)
            .map_or(usize::MAX, |(pool, _)| pool),
        sent.key,
    )
}

/// One request's re-sends: the request kept to send again, the keys it failed with, and the
/// re-send in flight.
pub struct RetryState {
    /// The request's own profile, whose `retryOnFailure` applies to every re-send.
    profile: usize,
    /// The request as it went upstream, minus the key header (set per re-send).
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    body_complete: bool,
    /// Over `max_body`: the request is served as usual but never re-sent.
    body_too_large: bool,
    /// `retryOnFailure.maxBodyBytes`.
    max_body: usize,
    /// (pool, key) pairs that failed for this request, in order.
    tried: Vec<(usize, usize)>,
    /// The pool of the first attempt, which went to the request's own cluster.
    first_pool: usize,
    retries_done: u32,
    /// The re-send in flight: the host's call id and its key.
    in_flight: Option<(u64, Assignment)>,
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

/// What follows a call's answer, for the host to do.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterCall<'a> {
    /// Not the re-send in flight: nothing changes.
    NotOurs,
    /// Another re-send went out; the client waits for its answer.
    Resent,
    /// The client gets this in place of the answer held back.
    Reply(Reply<'a>),
    /// Nothing can be said (no re-send in flight, the engine busy): the answer held back goes
    /// on to the client as it is.
    PassThrough,
}

/// What the client gets when no re-send follows.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply<'a> {
    pub status: u16,
    /// Envoy's response code details, for access logs.
    pub details: &'static str,
    pub body: &'a [u8],
    /// The last answer's headers, relayed; None for the filter's own JSON error.
    relayed: Option<&'a [(String, Vec<u8>)]>,
    /// `exposeKeyName`: the name of the key of the last answer.
    key_name: Option<String>,
}

const NO_ANSWER_DETAILS: &str = "ai_key_failover_retry_failed";
const NO_ANSWER_BODY: &[u8] = b"{\"error\":{\"message\":\"the retried request got no answer from the upstream\",\"type\":\"upstream_error\",\"param\":null,\"code\":\"retry_failed\"}}";
const REPLY_DETAILS: &str = "ai_key_failover_retried";

impl Reply<'_> {
    /// The reply's headers: the last answer's without pseudo-headers, connection headers and
    /// `content-length` (the host frames the body anew), plus the key's name with
    /// `exposeKeyName`; or a JSON content type for the filter's own error.
    pub fn headers(&self) -> Vec<(&str, &[u8])> {
        let Some(relayed) = self.relayed else {
            return vec![("content-type", b"application/json")];
        };
        let mut reply: Vec<(&str, &[u8])> = relayed
            .iter()
            .filter(|(n, _)| !n.starts_with(':') && !is_hop_by_hop(n) && n != "content-length")
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        if let Some(name) = &self.key_name {
            reply.push((KEY_NAME_HEADER, name.as_bytes()));
        }
        reply
    }
}

/// How a request ends when no re-send follows its last answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// The last answer's status, with its headers and body.
    Relay(u16),
    /// 502 with `NO_ANSWER_BODY`: nothing came back at all.
    NoAnswer,
}

enum Next {
    /// Send this; if the host cannot, the client gets `otherwise`.
    Resend {
        resend: Resend,
        otherwise: Outcome,
    },
    Done(Outcome),
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
            max_body: engine
                .profile(primary)
                .map_or(0, |p| p.retry.max_body_bytes),
            tried: Vec::new(),
            first_pool: engine.pool_of(first.profile).map_or(usize::MAX, |(p, _)| p),
            retries_done: 0,
            in_flight: None,
        }
    }

    /// A chunk of the request body streamed past: kept while the whole body fits the limit.
    /// `len` and `read` ask the host for its size and bytes, only while they can be kept.
    pub fn keep_body_chunk(
        &mut self,
        end_of_stream: bool,
        len: impl FnOnce() -> usize,
        read: impl FnOnce() -> Option<Vec<u8>>,
    ) {
        if !self.body_too_large {
            if self.body.len().saturating_add(len()) > self.max_body {
                self.body_too_large = true;
                self.body = Vec::new();
            } else if let Some(chunk) = read() {
                self.body.extend_from_slice(&chunk);
            }
        }
        self.body_complete = end_of_stream;
    }

    /// The whole request body, read at once (it was buffered for a `model` rewrite).
    pub fn keep_whole_body(&mut self, body: &[u8]) {
        self.body_complete = true;
        if body.len() <= self.max_body {
            self.body = body.to_vec();
        } else {
            self.body_too_large = true;
        }
    }

    /// The first answer (the request's own, `sent`) failed with a status `retriable` accepts,
    /// and was recorded. Sends the request again if the budget and the pools allow; true when a
    /// re-send went out: the host holds the answer back until `on_call_answer` replaces it.
    pub fn after_first_failure<D: Dispatch>(&mut self, d: &D, sent: Assignment, now: u64) -> bool {
        let resend = {
            let Some(mut engine) = d.engine() else {
                return false;
            };
            self.tried.push(tried_pair(&engine, sent));
            self.plan(&mut engine, d, now)
        };
        resend.is_some_and(|resend| self.dispatch(d, resend, None, now))
    }

    /// A call's answer (`headers` empty when none came). Judges it if it answers the re-send in
    /// flight, and says what follows.
    pub fn on_call_answer<'a, D: Dispatch>(
        &mut self,
        d: &D,
        call_id: u64,
        headers: &'a [(String, Vec<u8>)],
        body: &'a [u8],
        now: u64,
    ) -> AfterCall<'a> {
        let next = {
            let Some(mut engine) = d.engine() else {
                return AfterCall::PassThrough;
            };
            let Some((in_flight, sent)) = self.in_flight.take() else {
                return AfterCall::PassThrough;
            };
            if in_flight != call_id {
                self.in_flight = Some((in_flight, sent));
                return AfterCall::NotOurs;
            }
            let answer = CallAnswer::of(headers, body);
            (sent, self.judge(&mut engine, d, sent, answer, now))
        };
        let (sent, outcome) = match next {
            (sent, Next::Resend { resend, otherwise }) => {
                if self.dispatch(d, resend, Some(sent), now) {
                    return AfterCall::Resent;
                }
                (sent, otherwise)
            }
            (sent, Next::Done(outcome)) => (sent, outcome),
        };
        let key_name = d.engine().and_then(|mut engine| {
            let counted = match outcome {
                Outcome::Relay(status) if (200..300).contains(&status) => RetryOutcome::Succeeded,
                _ => RetryOutcome::Failed,
            };
            engine.count_retry(sent.profile, counted);
            engine
                .profile(sent.profile)
                .filter(|p| p.expose_key_name)
                .and_then(|_| engine.key_label(sent.profile, sent.key))
        });
        AfterCall::Reply(match outcome {
            Outcome::Relay(status) => Reply {
                status,
                details: REPLY_DETAILS,
                body,
                relayed: Some(headers),
                key_name,
            },
            Outcome::NoAnswer => Reply {
                status: 502,
                details: NO_ANSWER_DETAILS,
                body: NO_ANSWER_BODY,
                relayed: None,
                key_name: None,
            },
        })
    }

    /// The re-send in flight, taken: the stream ended before its answer (the client went away
    /// and Envoy cancels the call), so the host gives its key back with the request's own.
    pub fn take_in_flight(&mut self) -> Option<Assignment> {
        self.in_flight.take().map(|(_, sent)| sent)
    }

    /// Records a re-send's answer and plans what follows it.
    fn judge<D: Dispatch>(
        &mut self,
        engine: &mut Engine,
        d: &D,
        sent: Assignment,
        answer: CallAnswer,
        now: u64,
    ) -> Next {
        let host = d.host();
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
                    return Next::Done(Outcome::Relay(status));
                }
                Outcome::Relay(status)
            }
            // Envoy's own answer (timeout, reset, no healthy host) says nothing about the key,
            // but another key's re-send may still get through.
            CallAnswer::Local(status) => {
                engine.record(host, sent, Verdict::Neutral, 0, None, &Clock::at(now));
                status.map_or(Outcome::NoAnswer, Outcome::Relay)
            }
        };
        self.tried.push(tried_pair(engine, sent));
        match self.plan(engine, d, now) {
            Some(resend) => Next::Resend { resend, otherwise },
            None => Next::Done(otherwise),
        }
    }

    /// The next re-send with a key this request has not tried, if the budget and the pools
    /// allow: first the other keys of its pool, then its fallback pools in order. A key picked
    /// but not used is given back.
    fn plan<D: Dispatch>(&self, engine: &mut Engine, d: &D, now: u64) -> Option<Resend> {
        let host = d.host();
        let p = engine.profile(self.profile)?;
        let (max_retries, timeout_ms) = (p.retry.max_retries, p.retry.timeout_ms);
        if self.retries_done >= max_retries || !self.body_complete || self.body_too_large {
            return None;
        }
        let tried = &self.tried;
        let sent = match engine.decide(host, Some(self.profile), &Clock::at(now), tried) {
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
        let same_pool = engine.pool_of(sent.profile).map(|(pool, _)| pool) == Some(self.first_pool);
        let cluster = if same_pool {
            d.own_cluster()
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
        let mut headers: Vec<(String, Vec<u8>)> = self
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
            .and_then(|model| rewrite_model(&self.body, model))
            .unwrap_or_else(|| self.body.clone());
        Some(Resend {
            sent,
            cluster,
            headers,
            body,
            timeout_ms,
        })
    }

    /// Sends `resend` (after `previous`, which therefore failed, if there was one); true when it
    /// went out. One that did not gives its key back.
    fn dispatch<D: Dispatch>(
        &mut self,
        d: &D,
        resend: Resend,
        previous: Option<Assignment>,
        now: u64,
    ) -> bool {
        let id = d.send(&resend);
        let mut engine = d.engine();
        let Some(id) = id else {
            if let Some(engine) = engine.as_deref_mut() {
                engine.abandon(d.host(), resend.sent, now);
            }
            return false;
        };
        self.retries_done += 1;
        self.in_flight = Some((id, resend.sent));
        if let Some(engine) = engine.as_deref_mut() {
            engine.count_retry(self.profile, RetryOutcome::Started);
            if let Some(previous) = previous {
                engine.count_retry(previous.profile, RetryOutcome::Failed);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell, RefMut};

    use super::*;
    use crate::core::answer::record_answer;
    use crate::core::answer::tests::headers as pairs;
    use crate::core::engine::tests::{NoFacts, TestHost};
    use crate::core::status::NEVER_THE_KEYS_FAULT;

    /// A host that sends nothing: it keeps what it was asked to send and numbers the calls.
    struct FakeDispatch {
        engine: RefCell<Engine>,
        host: TestHost,
        own_cluster: Option<String>,
        sent: RefCell<Vec<Resend>>,
        /// Sends fail (the host refused the call) while set.
        refuse: Cell<bool>,
    }

    impl Dispatch for FakeDispatch {
        type Engine<'e> = RefMut<'e, Engine>;
        fn engine(&self) -> Option<RefMut<'_, Engine>> {
            self.engine.try_borrow_mut().ok()
        }
        fn host(&self) -> &dyn Host {
            &self.host
        }
        fn own_cluster(&self) -> Option<String> {
            self.own_cluster.clone()
        }
        fn send(&self, resend: &Resend) -> Option<u64> {
            assert!(
                self.engine.try_borrow_mut().is_ok(),
                "the engine is released while a call is sent"
            );
            if self.refuse.get() {
                return None;
            }
            let mut sent = self.sent.borrow_mut();
            sent.push(Resend {
                sent: resend.sent,
                cluster: resend.cluster.clone(),
                headers: resend.headers.clone(),
                body: resend.body.clone(),
                timeout_ms: resend.timeout_ms,
            });
            Some(100 + sent.len() as u64)
        }
    }

    impl FakeDispatch {
        fn new(config: &str) -> Self {
            let host = TestHost::default();
            let mut engine = Engine::new(crate::core::config::parse(config.as_bytes()).unwrap(), 1);
            engine.start(&host, 0);
            FakeDispatch {
                engine: RefCell::new(engine),
                host,
                own_cluster: Some("own".to_string()),
                sent: RefCell::new(Vec::new()),
                refuse: Cell::new(false),
            }
        }

        /// The request's first attempt: keyed, kept for re-sends with `body`, answered `status`
        /// by the upstream (recorded as the host records a live answer, unless None).
        fn first_attempt(
            &self,
            now: u64,
            body: &[u8],
            status: Option<u16>,
        ) -> (RetryState, Assignment) {
            let mut engine = self.engine.borrow_mut();
            let profile = engine.profile_for(&mut NoFacts).unwrap();
            let Decision::UseKey(first) =
                engine.decide(&self.host, Some(profile), &Clock::at(now), &[])
            else {
                panic!("a key for the first attempt");
            };
            let request = [
                (":path", "/v1/chat/completions"),
                ("authorization", "Bearer client"),
                ("content-length", "99"),
                ("connection", "keep-alive"),
                (POOL_HEADER, "from-the-client"),
                ("content-type", "application/json"),
            ];
            let mut retry = RetryState::new(&engine, profile, first, pairs(&request), false);
            let mut reads = 0;
            retry.keep_body_chunk(
                true,
                || body.len(),
                || {
                    reads += 1;
                    Some(body.to_vec())
                },
            );
            assert!(reads <= 1);
            if let Some(status) = status {
                let verdict = engine.verdict(first.profile, status, None);
                let clock = Clock::at(now);
                record_answer(
                    &mut engine,
                    &self.host,
                    first,
                    status,
                    verdict,
                    &[],
                    None,
                    &clock,
                );
                assert!(retriable(&engine, first.profile, status));
            }
            (retry, first)
        }

        fn key_of(&self, sent: Assignment) -> String {
            let engine = self.engine.borrow();
            engine
                .key_header(sent.profile, sent.key)
                .unwrap()
                .1
                .to_string()
        }

        fn stat(&self, name: &str) -> u64 {
            self.engine.borrow_mut().flush_counters(&self.host);
            self.host
                .metrics
                .get(&format!("ai_key_failover.pool.{name}"))
        }
    }

    /// A request of `config` whose first attempt failed with `status` and was sent again.
    fn re_sent(config: &str, status: u16) -> (FakeDispatch, RetryState, Assignment) {
        let d = FakeDispatch::new(config);
        let (mut retry, first) = d.first_attempt(0, BODY, Some(status));
        assert!(
            retry.after_first_failure(&d, first, 1),
            "a re-send went out"
        );
        (d, retry, first)
    }

    fn upstream(status: &str, more: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        let mut headers = pairs(&[(":status", status), ("x-envoy-upstream-service-time", "5")]);
        headers.extend(pairs(more));
        headers
    }

    fn header<'a>(resend: &'a Resend, name: &str) -> Option<&'a str> {
        resend
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    const BODY: &[u8] = br#"{"model":"m1","messages":[]}"#;

    #[test]
    fn a_failure_goes_to_the_next_key_then_the_fallback_pool_with_its_model_and_the_success_is_relayed(
    ) {
        let (d, mut retry, first) = re_sent(
            r#"{"name": "main", "apiTokens": ["sk-a", "sk-b"], "exposeKeyName": true,
                "retryOnFailure": {"enabled": true, "maxRetries": 3, "retryTimeout": 7000},
                "fallbacks": [{"name": "second", "apiTokens": ["sk-s"], "model": "m2",
                               "cluster": "second_cluster"}]}"#,
            429,
        );
        let resend = d.sent.borrow()[0].sent;
        {
            let sent = d.sent.borrow();
            let again = &sent[0];
            assert_eq!(
                again.cluster, "own",
                "the first pool through the request's cluster"
            );
            assert_ne!(d.key_of(again.sent), d.key_of(first));
            assert_eq!(
                header(again, "authorization").map(str::to_string),
                Some(d.key_of(again.sent))
            );
            assert_eq!(header(again, POOL_HEADER), Some("main"));
            assert_eq!(header(again, "content-type"), Some("application/json"));
            assert_eq!(header(again, "content-length"), None);
            assert_eq!(header(again, "connection"), None);
            assert_eq!(again.body, BODY);
            assert_eq!(again.timeout_ms, 7000);
        }
        // Another call's answer changes nothing.
        assert_eq!(
            retry.on_call_answer(&d, 7, &upstream("200", &[]), b"", 2),
            AfterCall::NotOurs
        );
        let failed = upstream("503", &[]);
        assert_eq!(
            retry.on_call_answer(&d, 101, &failed, b"busy", 2),
            AfterCall::Resent
        );
        {
            let sent = d.sent.borrow();
            let fallback = &sent[1];
            assert_ne!(fallback.sent.profile, resend.profile);
            assert_eq!(fallback.cluster, "second_cluster");
            assert_eq!(header(fallback, POOL_HEADER), Some("second"));
            assert_eq!(header(fallback, "authorization"), Some("Bearer sk-s"));
            let body: serde_json::Value = serde_json::from_slice(&fallback.body).unwrap();
            assert_eq!(body["model"], "m2");
        }
        let ok = upstream(
            "200",
            &[
                ("content-type", "application/json"),
                ("content-length", "2"),
                ("x-id", "1"),
            ],
        );
        let AfterCall::Reply(reply) = retry.on_call_answer(&d, 102, &ok, b"{}", 3) else {
            panic!("the success is relayed");
        };
        assert_eq!(
            (reply.status, reply.details, reply.body),
            (200, REPLY_DETAILS, &b"{}"[..])
        );
        let names: Vec<&str> = reply.headers().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "x-envoy-upstream-service-time",
                "content-type",
                "x-id",
                KEY_NAME_HEADER
            ]
        );
        assert_eq!(retry.take_in_flight(), None, "nothing is left in flight");
        assert_eq!(
            (
                d.stat("main.retries"),
                d.stat("main.retries_succeeded"),
                d.stat("main.retries_failed")
            ),
            (2, 0, 1)
        );
        assert_eq!(d.stat("second.retries_succeeded"), 1);
    }

    #[test]
    fn after_max_retries_the_client_gets_the_last_failure() {
        let (d, mut retry, _) = re_sent(
            r#"{"name": "p", "apiTokens": ["sk-a", "sk-b", "sk-c"],
                "retryOnFailure": {"enabled": true, "maxRetries": 1}}"#,
            429,
        );
        let limited = upstream("429", &[("retry-after", "3")]);
        let AfterCall::Reply(reply) = retry.on_call_answer(&d, 101, &limited, b"slow down", 2)
        else {
            panic!("the failure is relayed");
        };
        assert_eq!((reply.status, reply.body), (429, &b"slow down"[..]));
        assert!(reply.headers().contains(&("retry-after", &b"3"[..])));
        assert_eq!(d.sent.borrow().len(), 1, "one re-send, as configured");
        assert_eq!(
            (
                d.stat("p.retries"),
                d.stat("p.retries_succeeded"),
                d.stat("p.retries_failed")
            ),
            (1, 0, 1)
        );
    }

    #[test]
    fn a_body_over_the_limit_or_not_yet_complete_is_not_re_sent() {
        let config = r#"{"name": "p", "apiTokens": ["sk-a", "sk-b"],
                "retryOnFailure": {"enabled": true, "maxBodyBytes": 16}}"#;
        let d = FakeDispatch::new(config);
        let (mut too_large, first) = d.first_attempt(0, BODY, Some(429));
        assert!(BODY.len() > 16);
        // Past the limit, chunks are no longer read.
        too_large.keep_body_chunk(true, || 1, || panic!("not read"));
        assert!(!too_large.after_first_failure(&d, first, 1));
        let d = FakeDispatch::new(config);
        let (mut streaming, first) = d.first_attempt(0, b"{}", Some(429));
        streaming.keep_body_chunk(false, || 2, || Some(b"{}".to_vec()));
        assert!(!streaming.after_first_failure(&d, first, 1));
        let mut whole = streaming;
        whole.keep_whole_body(&[b' '; 17]);
        assert!(!whole.after_first_failure(&d, first, 1));
        assert!(d.sent.borrow().is_empty());
        assert_eq!(d.stat("p.retries"), 0);
    }

    #[test]
    fn an_answer_envoy_gave_itself_spares_the_key_and_the_next_one_is_tried() {
        let (d, mut retry, first) = re_sent(
            r#"{"name": "p", "apiTokens": ["sk-a", "sk-b", "sk-c"], "onAllUnavailable": "reject",
                "retryOnFailure": {"enabled": true, "maxRetries": 2}}"#,
            429,
        );
        let timed_out = pairs(&[(":status", "504"), ("content-type", "text/plain")]);
        assert_eq!(
            retry.on_call_answer(&d, 101, &timed_out, b"upstream request timeout", 2),
            AfterCall::Resent
        );
        let spared = d.sent.borrow()[0].sent;
        // Nothing came back for the last re-send; the client is told so.
        let AfterCall::Reply(reply) = retry.on_call_answer(&d, 102, &[], b"", 3) else {
            panic!("the client gets an answer");
        };
        assert_eq!(
            (reply.status, reply.details, reply.body),
            (502, NO_ANSWER_DETAILS, NO_ANSWER_BODY)
        );
        assert_eq!(
            reply.headers(),
            [("content-type", &b"application/json"[..])]
        );
        // The key Envoy timed out on is still in rotation; the first one cools down.
        let mut engine = d.engine.borrow_mut();
        let profile = first.profile;
        let avoid = [tried_pair(&engine, d.sent.borrow()[1].sent)];
        let Decision::UseKey(next) = engine.decide(&d.host, Some(profile), &Clock::at(4), &avoid)
        else {
            panic!("a key is left");
        };
        assert_eq!(next.key, spared.key);
        drop(engine);
        assert_eq!(
            (
                d.stat("p.retries"),
                d.stat("p.retries_succeeded"),
                d.stat("p.retries_failed")
            ),
            (2, 0, 2)
        );
    }

    #[test]
    fn envoys_own_answer_is_relayed_when_no_key_is_left() {
        let (d, mut retry, _) = re_sent(
            r#"{"name": "p", "apiTokens": ["sk-a", "sk-b"],
                "retryOnFailure": {"enabled": true, "maxRetries": 3}}"#,
            503,
        );
        let reset = pairs(&[(":status", "503"), ("content-type", "text/plain")]);
        let AfterCall::Reply(reply) = retry.on_call_answer(&d, 101, &reset, b"reset", 2) else {
            panic!("Envoy's answer is relayed");
        };
        assert_eq!((reply.status, reply.body), (503, &b"reset"[..]));
        assert_eq!(reply.headers(), [("content-type", &b"text/plain"[..])]);
        assert_eq!(d.sent.borrow().len(), 1, "every key was tried");
    }

    #[test]
    fn a_re_send_the_host_could_not_send_leaves_the_client_with_the_last_failure() {
        let (d, mut retry, _) = re_sent(
            r#"{"name": "p", "apiTokens": ["sk-a", "sk-b", "sk-c"],
                "retryOnFailure": {"enabled": true, "maxRetries": 2}}"#,
            429,
        );
        d.refuse.set(true);
        let failed = upstream("500", &[]);
        let AfterCall::Reply(reply) = retry.on_call_answer(&d, 101, &failed, b"oops", 2) else {
            panic!("the failure is relayed");
        };
        assert_eq!(reply.status, 500);
        assert_eq!((d.stat("p.retries"), d.stat("p.retries_failed")), (1, 1));
    }

    #[test]
    fn a_client_gone_while_a_re_send_runs_gives_the_re_sends_probe_back() {
        let d = FakeDispatch::new(
            r#"{"name": "p", "apiTokens": ["sk-a", "sk-b"], "onAllUnavailable": "reject",
                "failover": {"cooldownDuration": 300000},
                "retryOnFailure": {"enabled": true}}"#,
        );
        // One key rests for the 1 s its rate limit asked; that is over by the time the first
        // answer (a slow one, which rests the other key for 300 s) comes back, so the re-send
        // that takes it is its probe.
        let resting = {
            let mut engine = d.engine.borrow_mut();
            let profile = engine.profile_for(&mut NoFacts).unwrap();
            let Decision::UseKey(a) = engine.decide(&d.host, Some(profile), &Clock::at(0), &[])
            else {
                panic!("a key");
            };
            let verdict = engine.verdict(a.profile, 429, None);
            engine.record(&d.host, a, verdict, 429, Some(1_000), &Clock::at(0));
            a
        };
        let (mut retry, first) = d.first_attempt(500, BODY, Some(429));
        assert_ne!(first.key, resting.key);
        assert!(retry.after_first_failure(&d, first, 60_001));
        let probe = d.sent.borrow()[0].sent;
        assert_eq!(probe.key, resting.key);
        assert!(probe.sent_as.is_probe());
        let mut engine = d.engine.borrow_mut();
        let ask = |engine: &mut Engine| {
            engine.decide(&d.host, Some(first.profile), &Clock::at(60_002), &[])
        };
        assert!(
            matches!(ask(&mut engine), Decision::Reject { .. }),
            "the probe is taken while the re-send runs"
        );
        let gone = retry.take_in_flight().unwrap();
        assert_eq!(gone, probe);
        engine.abandon(&d.host, gone, 60_002);
        assert!(
            matches!(ask(&mut engine), Decision::UseKey(a) if a.key == probe.key),
            "the probe is free again"
        );
        drop(engine);
        // Its answer, if it came at all, would find nothing in flight.
        assert_eq!(
            retry.on_call_answer(&d, 101, &upstream("200", &[]), b"", 60_003),
            AfterCall::PassThrough
        );
    }

    #[test]
    fn never_retries_what_is_not_the_keys_fault() {
        let d = FakeDispatch::new(
            r#"{"name": "p", "apiTokens": ["sk-a", "sk-b"],
                "retryOnFailure": {"enabled": true, "retryOnStatus": ["4.*", "5.*"]}}"#,
        );
        let e = d.engine.borrow();
        let profile = e.profile_for(&mut NoFacts).unwrap();
        assert!(retriable(&e, profile, 429));
        assert!(retriable(&e, profile, 503));
        for status in NEVER_THE_KEYS_FAULT {
            assert!(!retriable(&e, profile, status), "{status}");
        }
        let off = FakeDispatch::new(
            r#"{"name": "p", "apiTokens": ["sk-a"], "retryOnFailure": {"enabled": false}}"#,
        );
        let off = off.engine.borrow();
        assert!(!retriable(
            &off,
            off.profile_for(&mut NoFacts).unwrap(),
            429
        ));
    }

    #[test]
    fn the_client_gets_the_answer_without_connection_headers_and_with_the_key_name() {
        let headers = pairs(&[
            (":status", "200"),
            ("content-type", "application/json"),
            ("content-length", "12"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),
            ("x-ratelimit-remaining-requests", "9"),
        ]);
        let reply = Reply {
            status: 200,
            details: REPLY_DETAILS,
            body: b"",
            relayed: Some(&headers),
            key_name: Some("alfa".to_string()),
        };
        let names: Vec<&str> = reply.headers().into_iter().map(|(n, _)| n).collect();
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
        let d = FakeDispatch::new(
            r#"{"name": "p", "apiTokens": ["sk-a", "sk-b"], "retryOnFailure": {"enabled": true},
                "failover": {"preemptiveCooldown": true}}"#,
        );
        let (mut retry, first) = d.first_attempt(0, b"{}", None);
        assert!(retry.after_first_failure(&d, first, 0));
        let next = d.sent.borrow()[0].sent;
        assert_ne!(next.key, first.key);
        let spent = upstream(
            "200",
            &[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "30s"),
            ],
        );
        let after = retry.on_call_answer(&d, 101, &spent, b"{}", 10);
        assert!(matches!(after, AfterCall::Reply(Reply { status: 200, .. })));
        let mut e = d.engine.borrow_mut();
        for _ in 0..4 {
            let Decision::UseKey(a) = e.decide(&d.host, Some(first.profile), &Clock::at(20), &[])
            else {
                panic!("the other key serves");
            };
            assert_eq!(a.key, first.key, "the spent key rests until its reset");
        }
    }
}
