//! The thin Envoy layer: reads what a request says, asks the engine, writes headers back.
//!
//! The same filter runs downstream (the listener's HTTP filters) or upstream (a cluster's
//! upstream HTTP filters, once per retry attempt of the route). It tells which on the first
//! request: only an upstream filter already knows the upstream host.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::config::{self, Provider};
use crate::credentials::{strip_query_param, CLIENT_CREDENTIAL_HEADERS};
use crate::engine::{Assignment, CheckAnswer, Clock, Decision, Engine, RetryOutcome};
use crate::host::{self, HostShared};
use crate::reply::{self, KEY_NAME_HEADER, POOL_HEADER};
use crate::resend::{self, CallAnswer, Next, Outcome, Resend, RetryState};
use crate::rewrite::rewrite_model;
use crate::rules::{host_of_authority, RequestFacts};
use crate::status::Verdict;

/// Ends time outs during quiet periods; under traffic, requests do it themselves.
const TICK_PERIOD_MS: u32 = 1000;
/// Enough for any provider's error JSON; a longer body is judged on its start.
const MAX_ERROR_BODY: usize = 64 * 1024;

proxy_wasm::main! {{
    host::install_logger();
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root {
            shared: None,
            checks: HashMap::new(),
        })
    });
}}

/// What a root context shares with the requests it creates.
struct Shared {
    engine: RefCell<Engine>,
    /// Whether this filter instance runs as an upstream filter; learned on the first request.
    upstream: std::cell::Cell<Option<bool>>,
}

struct Root {
    /// Replaced whole on reconfigure; requests in flight keep the one they started with.
    shared: Option<Rc<Shared>>,
    /// Health checks in flight: call token → (pool, key).
    checks: HashMap<u32, (usize, usize)>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some((pool, key)) = self.checks.remove(&token_id) else {
            return;
        };
        let Some(shared) = &self.shared else {
            return;
        };
        let Ok(mut engine) = shared.engine.try_borrow_mut() else {
            return;
        };
        let CallResponse {
            status,
            from_upstream,
            headers,
            body,
        } = CallResponse::read(body_size);
        let answer = CheckAnswer {
            status: status.filter(|_| from_upstream),
            headers: &headers,
            body: &body,
        };
        engine.health_check_done(&HostShared, pool, key, answer, host::now_ms());
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        host::sync_log_level();
        let bytes = host::plugin_configuration().unwrap_or_default();
        let parsed = match config::parse(&bytes) {
            Ok(parsed) => parsed,
            Err(e) => {
                log::error!("invalid configuration: {e}");
                return false;
            }
        };
        for warning in &parsed.warnings {
            log::warn!("{warning}");
        }
        let pools: Vec<String> = parsed
            .pools
            .iter()
            .map(|p| format!("{} ({} keys)", p.label, p.keys.len()))
            .collect();
        log::info!(
            "configured pools {}; {} rules",
            pools.join(", "),
            parsed.rules.len()
        );
        let mut engine = Engine::new(parsed, random_seed());
        engine.start(&HostShared, host::now_ms());
        self.shared = Some(Rc::new(Shared {
            engine: RefCell::new(engine),
            upstream: std::cell::Cell::new(None),
        }));
        if !host::set_tick_period_ms(TICK_PERIOD_MS) {
            log::warn!("could not set the tick period; keys return only on traffic");
        }
        true
    }

    fn on_tick(&mut self) {
        host::sync_log_level();
        let Some(shared) = &self.shared else {
            return;
        };
        let Ok(mut engine) = shared.engine.try_borrow_mut() else {
            return;
        };
        let now = host::now_ms();
        engine.tick(&HostShared, now);
        for check in engine.health_checks_due(&HostShared, now) {
            let headers: Vec<(&str, &[u8])> = check
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes()))
                .collect();
            match host::dispatch_http_call(&check.cluster, &headers, &check.body, check.timeout_ms)
            {
                Some(token) => {
                    self.checks.insert(token, (check.pool, check.key));
                }
                None => {
                    log::warn!(
                        "could not send a health check to cluster {:?}; is healthCheckCluster right?",
                        check.cluster
                    );
                    engine.health_check_not_sent(check.pool, check.key);
                }
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            shared: self.shared.clone(),
            chosen: None,
            attempt: None,
            reading_error: None,
            retry: None,
            rewrite_to: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn random_seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(host::now_ms());
    hasher.finish()
}

/// Request facts read from the host, only when a rule asks.
struct HostFacts;

fn property_string(paths: &[&[&str]]) -> Option<String> {
    paths
        .iter()
        .find_map(|path| host::property(path))
        .map(into_text)
}

fn cluster_name() -> Option<String> {
    // Envoy >= 1.33 names it xds.cluster_name; Higress's Envoy may know only cluster_name.
    property_string(&[&["xds", "cluster_name"], &["cluster_name"]])
}

impl RequestFacts for HostFacts {
    fn route_name(&mut self) -> Option<String> {
        property_string(&[&["xds", "route_name"], &["route_name"]])
    }
    fn cluster_name(&mut self) -> Option<String> {
        cluster_name()
    }
    fn host(&mut self) -> Option<String> {
        host::request_header(":authority").map(|a| host_of_authority(&String::from_utf8_lossy(&a)))
    }
}

/// The answer to one of our own `dispatch_http_call`s.
struct CallResponse {
    status: Option<u16>,
    /// Envoy's router marks answers that came from the upstream; its own replies to the call
    /// (timeout, no healthy host, reset) carry no such header and say nothing about a key.
    from_upstream: bool,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl CallResponse {
    fn read(body_size: usize) -> Self {
        let (headers, body) = host::call_response(body_size);
        let status = headers
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u16>().ok());
        let from_upstream = headers
            .iter()
            .any(|(n, _)| n == "x-envoy-upstream-service-time");
        CallResponse {
            status,
            from_upstream,
            headers,
            body,
        }
    }
}

/// Upstream mode: which downstream request this attempt belongs to.
struct Attempt {
    /// Read with the request: an upstream filter cannot read request headers once the response
    /// has begun, and any attempt may fail.
    request_id: Option<String>,
    is_retry: bool,
}

fn request_id() -> Option<String> {
    host::request_header("x-request-id").map(into_text)
}

/// Keeps the host's buffer when it is UTF-8, as it almost always is: no second allocation.
fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

struct Request {
    shared: Option<Rc<Shared>>,
    /// The key this request (or attempt) went out with, until its response is judged.
    chosen: Option<Assignment>,
    attempt: Option<Attempt>,
    /// A 429 whose body is being read (for `insufficient_quota` or a Gemini retry delay) as it
    /// streams past; nothing is held back from the client.
    reading_error: Option<ErrorResponse>,
    retry: Option<RetryState>,
    /// A fallback pool's model: the request body is held until complete and rewritten.
    rewrite_to: Option<String>,
}

struct ErrorResponse {
    sent: Assignment,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Context for Request {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        // Whatever happens, the held response must not hang: let it through if we cannot answer.
        let Some(shared) = self.shared.clone() else {
            host::resume_response();
            return;
        };
        let Ok(mut engine) = shared.engine.try_borrow_mut() else {
            host::resume_response();
            return;
        };
        let Some(retry) = self.retry.as_mut() else {
            host::resume_response();
            return;
        };
        let Some((token, sent)) = retry.in_flight.take() else {
            host::resume_response();
            return;
        };
        if token != u64::from(token_id) {
            retry.in_flight = Some((token, sent));
            return;
        }
        let CallResponse {
            status,
            from_upstream,
            headers,
            body,
        } = CallResponse::read(body_size);
        let now = host::now_ms();
        let answer = match status {
            Some(status) if from_upstream => CallAnswer::Upstream {
                status,
                headers: &headers,
                body: &body,
            },
            local => CallAnswer::Local(local),
        };
        let cluster = &mut cluster_name;
        let outcome =
            match resend::on_answer(&mut engine, &HostShared, retry, sent, answer, now, cluster) {
                Next::Resend {
                    resend: next,
                    otherwise,
                } => match dispatch(&next) {
                    Some(id) => {
                        resend::resent(&mut engine, retry, id, next.sent, sent);
                        return;
                    }
                    None => {
                        engine.abandon(&HostShared, next.sent, now);
                        otherwise
                    }
                },
                Next::Done(outcome) => outcome,
            };
        let sent_ok = match resend::conclude(&mut engine, sent, outcome) {
            Outcome::NoAnswer => host::send_local_response(
                502,
                resend::NO_ANSWER_DETAILS,
                &[("content-type", b"application/json")],
                resend::NO_ANSWER_BODY,
            ),
            Outcome::Reply(status) => {
                let label = resend::reply_label(&engine, sent);
                let reply = resend::reply_headers(&headers, label.as_deref());
                host::send_local_response(u32::from(status), resend::REPLY_DETAILS, &reply, &body)
            }
        };
        if !sent_ok {
            host::resume_response();
        }
    }
}

/// Sends a re-send as a `dispatch_http_call`; its id, if it went out.
fn dispatch(next: &Resend) -> Option<u64> {
    host::dispatch_http_call(
        &next.cluster,
        &next.header_refs(),
        &next.body,
        next.timeout_ms,
    )
    .map(u64::from)
}

impl Request {
    fn retry_body_limit(&self, profile: usize) -> usize {
        self.shared
            .as_ref()
            .and_then(|s| {
                s.engine
                    .try_borrow()
                    .ok()?
                    .profile(profile)
                    .map(|p| p.retry.max_body_bytes)
            })
            .unwrap_or(0)
    }

    fn reject(&self, retry_after_secs: u64) {
        let reply = reply::all_keys_unavailable(retry_after_secs);
        host::send_local_response(
            u32::from(reply.status),
            reply.details,
            &[
                ("retry-after", reply.retry_after.as_bytes()),
                ("content-type", reply.content_type.as_bytes()),
            ],
            reply.body.as_bytes(),
        );
    }

    /// The stream ended: judge an error body read so far, or give back an unanswered probe,
    /// whichever attempt holds it: the request's own, or a `retryOnFailure` re-send still in
    /// flight (the client hung up while it ran; Envoy cancels the call, so no answer will come).
    fn finish(&mut self) {
        self.finish_error_response();
        let in_flight = self
            .retry
            .as_mut()
            .and_then(|r| r.in_flight.take())
            .map(|(_, sent)| sent);
        let unanswered = [self.chosen.take(), in_flight];
        // A request that was answered holds nothing: no borrow, no clock read.
        if unanswered.iter().all(Option::is_none) {
            return;
        }
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let Ok(mut engine) = shared.engine.try_borrow_mut() else {
            return;
        };
        let now = host::now_ms();
        for sent in unanswered.into_iter().flatten() {
            engine.abandon(&HostShared, sent, now);
        }
    }

    fn finish_error_response(&mut self) {
        let (Some(reading), Some(shared)) = (self.reading_error.take(), self.shared.clone()) else {
            return;
        };
        let Ok(mut engine) = shared.engine.try_borrow_mut() else {
            return;
        };
        resend::judge_with_body(
            &mut engine,
            &HostShared,
            reading.sent,
            reading.status,
            &reading.headers,
            &reading.body,
            &Clock::new(&host::now_ms),
        );
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        let Ok(mut engine) = shared.engine.try_borrow_mut() else {
            return Action::Continue;
        };
        let upstream = match shared.upstream.get() {
            Some(known) => known,
            None => {
                let upstream = host::property(&["upstream", "address"]).is_some();
                shared.upstream.set(Some(upstream));
                log::info!(
                    "running as {} filter",
                    if upstream {
                        "an upstream (per retry attempt)"
                    } else {
                        "a downstream"
                    }
                );
                upstream
            }
        };
        let profile = engine.profile_for(&mut HostFacts);
        // Some pool has fallbacks, so a route may match the pool header: a value a client sent
        // must not reach the upstream or pick a route, whether or not this request is keyed.
        let drop_pool_header = engine.config().has_fallbacks;
        // Upstream mode: Envoy's retry attempts of one request share its x-request-id.
        let request_id = if upstream { request_id() } else { None };
        let avoid = request_id
            .as_deref()
            .map(|id| engine.failed_for(id))
            .unwrap_or_default();
        let clock = Clock::new(&host::now_ms);
        match engine.decide(&HostShared, profile, &clock, &avoid) {
            Decision::Untouched => {
                if drop_pool_header {
                    drop_client_pool_header();
                }
                Action::Continue
            }
            Decision::Reject { retry_after_secs } => {
                self.reject(retry_after_secs);
                Action::Pause
            }
            Decision::UseKey(assignment) => {
                let Some((auth_name, auth_value)) =
                    engine.key_header(assignment.profile, assignment.key)
                else {
                    if drop_pool_header {
                        drop_client_pool_header();
                    }
                    return Action::Continue;
                };
                for name in CLIENT_CREDENTIAL_HEADERS {
                    if name != auth_name {
                        host::remove_request_header(name);
                    }
                }
                if !host::set_request_header(auth_name, auth_value.as_bytes()) {
                    log::warn!("could not set the {auth_name} header");
                }
                let primary = profile.and_then(|p| engine.profile(p));
                let has_chain = primary.is_some_and(|p| !p.fallbacks.is_empty());
                if has_chain {
                    // The operator's route on this header sends a fallback pool to its provider;
                    // the primary's name is set too, so a client cannot pick a route itself.
                    if let Some((_, label)) = engine.pool_of(assignment.profile) {
                        host::set_request_header(POOL_HEADER, label.as_bytes());
                    }
                } else if drop_pool_header {
                    // Unread: the key header's write already made Envoy select the route again,
                    // so a removal costs no more than a read would.
                    host::remove_request_header(POOL_HEADER);
                }
                let retry_enabled = primary.is_some_and(|p| p.retry.enabled);
                let used = engine.profile(assignment.profile);
                if used.is_some_and(|p| p.provider == Provider::Gemini) {
                    strip_gemini_query_key();
                }
                if let Some(model) = used.and_then(|p| p.model.clone()) {
                    if !end_of_stream {
                        // The body grows or shrinks: let Envoy frame it anew.
                        host::remove_request_header("content-length");
                        self.rewrite_to = Some(model);
                    }
                }
                if engine.wants_target(assignment.profile) {
                    // Learned once per VM and pool (after the pool header re-selected the
                    // route), so health checks and retries into this pool know its cluster.
                    let authority = host::request_header(":authority")
                        .map(into_text)
                        .unwrap_or_default();
                    if let Some(cluster) = cluster_name() {
                        engine.learn_target(&HostShared, assignment.profile, &cluster, &authority);
                    }
                }
                if upstream {
                    if !avoid.is_empty() {
                        engine.count_retry(assignment.profile, RetryOutcome::Started);
                    }
                    self.attempt = Some(Attempt {
                        is_retry: !avoid.is_empty(),
                        request_id,
                    });
                } else if let (true, Some(primary_profile)) = (retry_enabled, profile) {
                    self.retry = Some(RetryState::new(
                        &engine,
                        primary_profile,
                        assignment,
                        host::request_headers(),
                        end_of_stream,
                    ));
                }
                self.chosen = Some(assignment);
                Action::Continue
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.rewrite_to.is_some() {
            // Held (Envoy buffers it) until complete, then rewritten whole.
            if !end_of_stream {
                return Action::Pause;
            }
            let body = host::request_body(body_size).unwrap_or_default();
            let limit = self
                .retry
                .as_ref()
                .map_or(0, |r| self.retry_body_limit(r.profile));
            if let Some(retry) = self.retry.as_mut() {
                retry.body_complete = true;
                if body.len() <= limit {
                    retry.body = body.clone();
                } else {
                    retry.body_too_large = true;
                }
            }
            if let Some(new_body) = self
                .rewrite_to
                .take()
                .and_then(|m| rewrite_model(&body, &m))
            {
                host::set_request_body(body_size, &new_body);
            }
            return Action::Continue;
        }
        let Some(retry_profile) = self.retry.as_ref().map(|r| r.profile) else {
            return Action::Continue;
        };
        let limit = self.retry_body_limit(retry_profile);
        let Some(retry) = self.retry.as_mut() else {
            return Action::Continue;
        };
        if !retry.body_too_large {
            if retry.body.len().saturating_add(body_size) > limit {
                retry.body_too_large = true;
                retry.body = Vec::new();
            } else if let Some(chunk) = host::request_body(body_size) {
                retry.body.extend_from_slice(&chunk);
            }
        }
        retry.body_complete = end_of_stream;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let (Some(sent), Some(shared)) = (self.chosen.take(), self.shared.clone()) else {
            return Action::Continue;
        };
        let Ok(mut engine) = shared.engine.try_borrow_mut() else {
            return Action::Continue;
        };
        if engine
            .profile(sent.profile)
            .is_some_and(|p| p.expose_key_name)
        {
            if let Some(label) = engine.key_label(sent.profile, sent.key) {
                host::set_response_header(KEY_NAME_HEADER, label.as_bytes());
            }
            if let Some((_, pool)) = engine.pool_of(sent.profile) {
                host::set_response_header(POOL_HEADER, pool.as_bytes());
            }
        }
        let Some(status) = host::response_header(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
        else {
            engine.abandon(&HostShared, sent, host::now_ms());
            return Action::Continue;
        };
        // Most responses (a success on a healthy key) never need the time.
        let clock = Clock::new(&host::now_ms);
        if let Some(attempt) = &self.attempt {
            // Before Envoy starts the next attempt, so that attempt avoids this key. A status
            // that is not the key's fault is not remembered; such a request keeps what earlier
            // attempts learned, in case Envoy's policy retries it anyway.
            if status >= 400 {
                if let Some(id) = &attempt.request_id {
                    engine.note_failed_attempt(id, sent, status, clock.now());
                }
            } else if let Some(id) = &attempt.request_id {
                // No attempt follows an answer that reached the client.
                engine.forget_attempts(id);
            }
            if attempt.is_retry {
                let outcome = if (200..300).contains(&status) {
                    RetryOutcome::Succeeded
                } else {
                    RetryOutcome::Failed
                };
                engine.count_retry(sent.profile, outcome);
            }
        }
        // The verdict without an error body; only a 429 whose body is read can change it.
        let first_look = engine.verdict(sent.profile, status, false);
        // Asked only of answers that could count or be retried: a success needs no host call.
        let via_upstream =
            (matches!(first_look, Verdict::KeyFailure(_)) || status >= 400) && from_upstream();
        // Envoy's own replies (timeouts, resets, no healthy upstream) say nothing about the key.
        if matches!(first_look, Verdict::KeyFailure(_)) && !via_upstream {
            engine.record(&HostShared, sent, Verdict::Neutral, status, None, &clock);
            return Action::Continue;
        }
        if let Some(retry) = self.retry.as_mut() {
            if via_upstream && resend::retriable(&engine, sent.profile, status) {
                record_live_answer(&mut engine, sent, status, first_look, &clock);
                retry.tried.push(resend::tried_pair(&engine, sent));
                let now = host::now_ms();
                if let Some(next) =
                    resend::plan(&mut engine, &HostShared, retry, now, &mut cluster_name)
                {
                    match dispatch(&next) {
                        Some(id) => {
                            resend::started(&mut engine, retry, id, next.sent);
                            // Hold this answer back; the retry's answer replaces it.
                            return Action::Pause;
                        }
                        None => engine.abandon(&HostShared, next.sent, now),
                    }
                }
                return Action::Continue;
            }
        }
        // An upstream filter's attempt is reset by Envoy's retry before its body arrives.
        let read_body = self.attempt.is_none()
            && engine.wants_error_body(sent.profile, status)
            && !end_of_stream;
        if read_body {
            self.reading_error = Some(ErrorResponse {
                sent,
                status,
                headers: host::response_headers(),
                body: Vec::new(),
            });
            return Action::Continue;
        }
        record_live_answer(&mut engine, sent, status, first_look, &clock);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(reading) = self.reading_error.as_mut() else {
            return Action::Continue;
        };
        let room = MAX_ERROR_BODY.saturating_sub(reading.body.len());
        if room > 0 {
            if let Some(chunk) = host::response_body(body_size.min(room)) {
                reading.body.extend_from_slice(&chunk);
            }
        }
        if end_of_stream || reading.body.len() >= MAX_ERROR_BODY {
            self.finish_error_response();
        }
        Action::Continue
    }
}

/// The last word on a request, however it ended (answered, reset, client gone): the SDK drops
/// the context on `proxy_on_delete`. The build does not export `proxy_on_done` or
/// `proxy_on_log`, so Envoy makes two VM calls fewer per request (see `scripts/wasm-exports.json`).
impl Drop for Request {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Records a response whose headers are still the host's to read: they are read only when the
/// verdict takes retry hints, as reading them all costs more than any other host call.
fn record_live_answer(
    engine: &mut Engine,
    sent: Assignment,
    status: u16,
    verdict: Verdict,
    clock: &Clock,
) {
    let headers = if engine.wants_retry_hint(sent.profile, verdict) {
        host::response_headers()
    } else {
        Vec::new()
    };
    resend::record_answer(
        engine,
        &HostShared,
        sent,
        status,
        verdict,
        &headers,
        None,
        clock,
    );
}

fn from_upstream() -> bool {
    host::property(&["response", "code_details"]).is_some_and(|d| d == b"via_upstream")
}

/// Removes a client's `x-ai-key-failover-pool` from a request the plugin does not key. Read
/// first: the header is almost never there, and a read that finds nothing costs one host call
/// and leaves Envoy's route cache alone, where a removal always clears it and makes Envoy select
/// the route again.
fn drop_client_pool_header() {
    if host::request_header(POOL_HEADER).is_some() {
        host::remove_request_header(POOL_HEADER);
    }
}

fn strip_gemini_query_key() {
    if let Some(path) = host::request_header(":path") {
        if let Some(stripped) = strip_query_param(&path, "key") {
            host::set_request_header(":path", &stripped);
        }
    }
}
