//! The native host's filter: what `wasm/filter.rs` does for wasm, over the dynamic-module ABI.
//!
//! One `Config` per filter configuration holds the engine behind a mutex: Envoy creates the
//! config on the main thread and every worker's streams use it, so all of them share one cached
//! view of each pool (kept in step with the process-wide store by the same epoch check as in
//! wasm). The lock is held only while the engine decides or records, never across a host call
//! that can call back into this filter (a local reply runs our encoder hooks before it returns).
//!
//! Time comes from the system clock. A thread per config wakes at the engine's tick period (100 ms
//! to 1 s, as the shortest cooldown or check interval needs) and commits an event to Envoy's
//! config scheduler, so `scheduled` runs on the main thread like wasm's `on_tick`: timeouts end
//! and health checks go out without traffic.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::abi::{
    Attribute, ConfigHandle, Scheduler, Stream, BODY_STOP_AND_BUFFER, CONTINUE,
    HEADERS_STOP_ITERATION, RESPONSE_HEADERS_STOP_ALL,
};
use super::shared::STORE;
use crate::core::affinity;
use crate::core::budget;
use crate::core::config::{self, Provider};
use crate::core::credentials::{strip_query_param, CLIENT_CREDENTIAL_HEADERS};
use crate::core::engine::{Ask, Assignment, CheckAnswer, Clock, Decision, Engine, RetryOutcome};
use crate::core::metrics::{MetricKind, MetricsHost};
use crate::core::reply::{self, KEY_NAME_HEADER, POOL_HEADER};
use crate::core::resend::{self, record_answer, CallAnswer, Next, Outcome, Resend, RetryState};
use crate::core::rules::{host_of_authority, RequestFacts};
use crate::core::select::OnAllUnavailable;
use crate::core::status::Verdict;
use crate::core::store::{SharedData, StoreError};

/// Enough for any provider's error JSON; a longer body is judged on its start.
const MAX_ERROR_BODY: usize = 64 * 1024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The engine's host: the process-wide store and this config's stats.
struct NativeHost {
    handle: ConfigHandle,
}

impl SharedData for NativeHost {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        STORE.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        STORE.set(key, value, cas)
    }
}

impl MetricsHost for NativeHost {
    fn define(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let id = match kind {
            MetricKind::Counter => self.handle.define_counter(name),
            MetricKind::Gauge => self.handle.define_gauge(name),
        }?;
        u32::try_from(id).ok()
    }
    fn increment(&self, id: u32, delta: u64) {
        self.handle.increment_counter(id as usize, delta);
    }
    fn record(&self, id: u32, value: u64) {
        self.handle.set_gauge(id as usize, value);
    }
}

/// Wakes the main thread once per period until dropped.
struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    /// Deleted only after the thread, its other user, has ended.
    _scheduler: Arc<Scheduler>,
}

impl Ticker {
    fn start(scheduler: Scheduler, period: Duration) -> Option<Self> {
        let scheduler = Arc::new(scheduler);
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (thread_stop, thread_scheduler) = (Arc::clone(&stop), Arc::clone(&scheduler));
        let thread = std::thread::Builder::new()
            .name("akf-tick".to_string())
            .spawn(move || {
                let (lock, wake) = &*thread_stop;
                let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    let (guard, _) = wake
                        .wait_timeout(stopped, period)
                        .unwrap_or_else(PoisonError::into_inner);
                    stopped = guard;
                    if *stopped {
                        return;
                    }
                    thread_scheduler.commit();
                }
            })
            .ok()?;
        Some(Ticker {
            stop,
            thread: Some(thread),
            _scheduler: scheduler,
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Health checks in flight, by callout id.
#[derive(Default)]
struct Checks {
    by_id: HashMap<u64, (usize, usize)>,
    /// The check being dispatched: Envoy answers a callout that fails at once from inside the
    /// dispatch call, before its id is known here.
    dispatching: Option<(usize, usize)>,
}

pub struct Config {
    host: NativeHost,
    engine: Mutex<Engine>,
    /// 0: not known yet, 1: downstream, 2: upstream; learned on the first request.
    mode: AtomicU8,
    checks: Mutex<Checks>,
    /// Dropped first (fields drop in order): no tick runs once the config goes.
    ticker: Option<Ticker>,
}

/// The engine goes with its config (a configuration update makes a new one): counts since its
/// last tick would be lost with it, so they are flushed once no tick can run any more.
impl Drop for Config {
    fn drop(&mut self) {
        self.ticker.take();
        self.engine().flush_counters(&self.host);
    }
}

impl Config {
    /// Parses the filter's config string; `None` (after logging why) makes Envoy refuse it.
    pub fn new(handle: ConfigHandle, _name: &[u8], text: &[u8]) -> Option<Config> {
        let parsed = match config::parse(text) {
            Ok(parsed) => parsed,
            Err(e) => {
                log::error!("invalid configuration: {e}");
                return None;
            }
        };
        for warning in &parsed.warnings {
            log::warn!("{warning}");
        }
        if parsed
            .profiles
            .iter()
            .any(|p| p.on_all_unavailable == OnAllUnavailable::Wait)
        {
            log::warn!(
                "onAllUnavailable \"wait\" is not implemented by the native module yet: with every key down, requests get the \"reject\" answer at once"
            );
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
        let host = NativeHost { handle };
        let mut engine = Engine::new(parsed, random_seed());
        engine.start(&host, now_ms());
        let period = Duration::from_millis(engine.tick_period_ms());
        let ticker = handle
            .scheduler()
            .and_then(|scheduler| Ticker::start(scheduler, period));
        if ticker.is_none() {
            log::warn!("could not start the tick; keys return only on traffic");
        }
        Some(Config {
            host,
            engine: Mutex::new(engine),
            mode: AtomicU8::new(0),
            checks: Mutex::new(Checks::default()),
            ticker,
        })
    }

    /// A panic while the engine was locked is caught at the hook; the engine's state is a cache
    /// of the shared store and stays usable, so later requests go on with it.
    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn checks(&self) -> MutexGuard<'_, Checks> {
        self.checks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_upstream(&self, s: &Stream) -> bool {
        match self.mode.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => {
                // Only an upstream filter already knows the upstream host.
                let upstream =
                    s.attribute(Attribute::UpstreamAddress).is_some() || s.has_upstream_host();
                self.mode
                    .store(if upstream { 2 } else { 1 }, Ordering::Relaxed);
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
        }
    }

    /// The tick, on the main thread.
    pub fn scheduled(&self) {
        let now = now_ms();
        let due = {
            let mut engine = self.engine();
            engine.tick(&self.host, now);
            engine.health_checks_due(&self.host, now)
        };
        for check in due {
            let headers: Vec<(&str, &[u8])> = check
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes()))
                .collect();
            self.checks().dispatching = Some((check.pool, check.key));
            let id = self.host.handle.http_callout(
                &check.cluster,
                &headers,
                &check.body,
                check.timeout_ms,
            );
            let still_pending = self.checks().dispatching.take();
            match (id, still_pending) {
                (Some(id), Some(pair)) => {
                    self.checks().by_id.insert(id, pair);
                }
                // Answered from inside the call: already recorded.
                (Some(_), None) => {}
                (None, _) => {
                    log::warn!(
                        "could not send a health check to cluster {:?}; is healthCheckCluster right?",
                        check.cluster
                    );
                    self.engine().health_check_not_sent(check.pool, check.key);
                }
            }
        }
    }

    /// A health check's answer, on the main thread. Empty headers: Envoy got no answer.
    pub fn callout_done(&self, id: u64, headers: &[(String, Vec<u8>)], body: &[u8]) {
        let pair = {
            let mut checks = self.checks();
            match checks.by_id.remove(&id) {
                Some(pair) => Some(pair),
                None => checks.dispatching.take(),
            }
        };
        let Some((pool, key)) = pair else {
            return;
        };
        let status = headers
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u16>().ok());
        // Envoy's router marks answers that came from the upstream; its own replies to the call
        // (timeout, no healthy host, reset) say nothing about a key.
        let from_upstream = headers
            .iter()
            .any(|(n, _)| n == "x-envoy-upstream-service-time");
        let answer = CheckAnswer {
            status: status.filter(|_| from_upstream),
            headers,
            body,
        };
        self.engine()
            .health_check_done(&self.host, pool, key, answer, now_ms());
    }
}

fn random_seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(now_ms());
    hasher.finish()
}

/// Keeps the host's buffer when it is UTF-8, as it almost always is: no second allocation.
fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Request facts read from Envoy, only when a rule asks.
struct Facts<'s> {
    stream: &'s Stream,
}

impl RequestFacts for Facts<'_> {
    fn route_name(&mut self) -> Option<String> {
        self.stream
            .attribute(Attribute::XdsRouteName)
            .map(into_text)
    }
    fn cluster_name(&mut self) -> Option<String> {
        self.stream
            .attribute(Attribute::XdsClusterName)
            .map(into_text)
    }
    fn host(&mut self) -> Option<String> {
        self.stream
            .request_header(":authority")
            .map(|a| host_of_authority(&String::from_utf8_lossy(&a)))
    }
}

/// Upstream mode: which downstream request this attempt belongs to.
struct Attempt {
    /// Read with the request: an upstream filter cannot read request headers once the response
    /// has begun, and any attempt may fail.
    request_id: Option<String>,
    is_retry: bool,
}

struct ErrorResponse {
    sent: Assignment,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// One stream's state.
pub struct Filter<'c> {
    config: &'c Config,
    /// The key this request (or attempt) went out with, until its response is judged.
    chosen: Option<Assignment>,
    attempt: Option<Attempt>,
    /// A 429 whose body is being read as it streams past; nothing is held back from the client.
    reading_error: Option<ErrorResponse>,
    /// A fallback pool's model: the request body is held until complete and rewritten.
    rewrite_to: Option<String>,
    /// Downstream `retryOnFailure`: the request kept for re-sends, and the one in flight.
    retry: Option<RetryState>,
}

impl<'c> Filter<'c> {
    pub fn new(config: &'c Config) -> Self {
        Filter {
            config,
            chosen: None,
            attempt: None,
            reading_error: None,
            rewrite_to: None,
            retry: None,
        }
    }

    pub fn request_headers(&mut self, s: &Stream, end_of_stream: bool) -> u32 {
        let config = self.config;
        let host = &config.host;
        let mut engine = config.engine();
        let upstream = config.is_upstream(s);
        let profile = engine.profile_for(&mut Facts { stream: s });
        // Some pool has fallbacks, so a route may match the pool header: a value a client sent
        // must not reach the upstream or pick a route, whether or not this request is keyed.
        let drop_pool_header = engine.config().has_fallbacks;
        // Upstream mode: Envoy's retry attempts of one request share its x-request-id.
        let request_id = if upstream {
            s.request_header("x-request-id").map(into_text)
        } else {
            None
        };
        let avoid = request_id
            .as_deref()
            .map(|id| engine.failed_for(id))
            .unwrap_or_default();
        // One header read, only where `affinity` is configured; the value is only hashed.
        let session = profile
            .and_then(|p| engine.affinity_header(p))
            .and_then(|name| s.request_header(name))
            .map(|value| affinity::session_hash(&value));
        let clock = Clock::new(&now_ms);
        let decision = engine.decide_with(host, profile, &clock, &avoid, Ask { session });
        if let (Decision::Hold { .. }, Some(profile)) = (decision, profile) {
            // `wait` needs a request paused and resumed from the tick, which this host does not
            // do yet (logged at load): the request gets what `reject` gives, counted as rejected.
            engine.count_rejected(profile);
        }
        match decision {
            Decision::Untouched => {
                if drop_pool_header {
                    drop_client_pool_header(s);
                }
                CONTINUE
            }
            Decision::Reject { retry_after_secs }
            | Decision::Hold {
                retry_after_secs, ..
            } => {
                drop(engine);
                let r = reply::all_keys_unavailable(retry_after_secs);
                s.send_response(
                    r.status,
                    &[
                        ("retry-after", r.retry_after.as_bytes()),
                        ("content-type", r.content_type.as_bytes()),
                    ],
                    r.body.as_bytes(),
                    r.details,
                );
                HEADERS_STOP_ITERATION
            }
            Decision::UseKey(assignment) => {
                let Some((auth_name, auth_value)) =
                    engine.key_header(assignment.profile, assignment.key)
                else {
                    if drop_pool_header {
                        drop_client_pool_header(s);
                    }
                    return CONTINUE;
                };
                // One look at the map, then a removal only for what a client actually sent.
                let present = s.request_has(CLIENT_CREDENTIAL_HEADERS);
                for (name, here) in CLIENT_CREDENTIAL_HEADERS.into_iter().zip(present) {
                    if here && name != auth_name {
                        s.remove_request_header(name);
                    }
                }
                if !s.set_request_header(auth_name, auth_value.as_bytes()) {
                    log::warn!("could not set the {auth_name} header");
                }
                let primary = profile.and_then(|p| engine.profile(p));
                let has_chain = primary.is_some_and(|p| !p.fallbacks.is_empty());
                let retry_enabled = primary.is_some_and(|p| p.retry.enabled);
                if has_chain {
                    // The operator's route on this header sends a fallback pool to its provider;
                    // the primary's name is set too, so a client cannot pick a route itself.
                    if let Some((_, label)) = engine.pool_of(assignment.profile) {
                        s.set_request_header(POOL_HEADER, label.as_bytes());
                        s.clear_route_cache();
                    }
                } else if drop_pool_header {
                    s.remove_request_header(POOL_HEADER);
                    s.clear_route_cache();
                }
                let used = engine.profile(assignment.profile);
                if used.is_some_and(|p| p.provider == Provider::Gemini) {
                    if let Some(path) = s.request_header(":path") {
                        if let Some(stripped) = strip_query_param(&path, "key") {
                            s.set_request_header(":path", &stripped);
                        }
                    }
                }
                if let Some(model) = used.and_then(|p| p.model.clone()) {
                    if !end_of_stream {
                        // The body grows or shrinks: let Envoy frame it anew.
                        s.remove_request_header("content-length");
                        self.rewrite_to = Some(model);
                    }
                }
                if engine.wants_target(assignment.profile) {
                    // Learned once per config and pool (after the pool header re-selected the
                    // route), so health checks into this pool know its cluster.
                    let authority = s
                        .request_header(":authority")
                        .map(into_text)
                        .unwrap_or_default();
                    if let Some(cluster) = (Facts { stream: s }).cluster_name() {
                        engine.learn_target(host, assignment.profile, &cluster, &authority);
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
                        s.request_headers(),
                        end_of_stream,
                    ));
                }
                self.chosen = Some(assignment);
                CONTINUE
            }
        }
    }

    pub fn request_body(&mut self, s: &Stream, end_of_stream: bool) -> u32 {
        if let Some(model) = self.rewrite_to.as_deref() {
            // Held (Envoy buffers it) until complete, then rewritten whole.
            if !end_of_stream {
                return BODY_STOP_AND_BUFFER;
            }
            let body = s.whole_request_body();
            if let Some(retry) = self.retry.as_mut() {
                let limit = retry.body_limit(&self.config.engine());
                retry.body_complete = true;
                if body.len() <= limit {
                    retry.body = body.clone();
                } else {
                    retry.body_too_large = true;
                }
            }
            if let Some(new_body) = crate::core::rewrite::rewrite_model(&body, model) {
                s.replace_request_body(&new_body);
            }
            self.rewrite_to = None;
            return CONTINUE;
        }
        let Some(retry) = self.retry.as_mut() else {
            return CONTINUE;
        };
        // Kept for a re-send as it streams past, up to the limit.
        if !retry.body_too_large {
            let limit = retry.body_limit(&self.config.engine());
            if retry
                .body
                .len()
                .saturating_add(s.received_request_body_size())
                > limit
            {
                retry.body_too_large = true;
                retry.body = Vec::new();
            } else {
                retry.body.extend(s.received_request_body(usize::MAX));
            }
        }
        retry.body_complete = end_of_stream;
        CONTINUE
    }

    pub fn response_headers(&mut self, s: &Stream, end_of_stream: bool) -> u32 {
        let Some(sent) = self.chosen.take() else {
            return CONTINUE;
        };
        let host = &self.config.host;
        let mut engine = self.config.engine();
        if engine
            .profile(sent.profile)
            .is_some_and(|p| p.expose_key_name)
        {
            if let Some(label) = engine.key_label(sent.profile, sent.key) {
                s.set_response_header(KEY_NAME_HEADER, label.as_bytes());
            }
            if let Some((_, pool)) = engine.pool_of(sent.profile) {
                s.set_response_header(POOL_HEADER, pool.as_bytes());
            }
        }
        let Some(status) = s
            .response_header(":status")
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u16>().ok())
        else {
            engine.abandon(host, sent, now_ms());
            return CONTINUE;
        };
        let clock = Clock::new(&now_ms);
        if let Some(attempt) = &self.attempt {
            // Before Envoy starts the next attempt, so that attempt avoids this key. A status
            // that is not the key's fault is not remembered.
            if let Some(id) = &attempt.request_id {
                if status >= 400 {
                    engine.note_failed_attempt(id, sent, status, clock.now());
                } else {
                    // No attempt follows an answer that reached the client.
                    engine.forget_attempts(id);
                }
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
        let first_look = engine.verdict(sent.profile, status, None);
        // Asked only of answers that could count: a success needs no host call.
        let via_upstream = (matches!(first_look, Verdict::KeyFailure(_)) || status >= 400)
            && s.attribute(Attribute::ResponseCodeDetails).as_deref() == Some(b"via_upstream");
        // Envoy's own replies (timeouts, resets, no healthy upstream) say nothing about the key.
        if matches!(first_look, Verdict::KeyFailure(_)) && !via_upstream {
            engine.record(host, sent, Verdict::Neutral, status, None, &clock);
            return CONTINUE;
        }
        if let Some(retry) = self.retry.as_mut() {
            if via_upstream && resend::retriable(&engine, sent.profile, status) {
                record_live_answer(&mut engine, host, s, sent, status, first_look, &clock);
                retry.tried.push(resend::tried_pair(&engine, sent));
                let now = now_ms();
                let mut own_cluster = || (Facts { stream: s }).cluster_name();
                if let Some(next) = resend::plan(&mut engine, host, retry, now, &mut own_cluster) {
                    // Unlocked while Envoy starts the call: it may answer a failed one at once.
                    drop(engine);
                    let id = send(s, &next);
                    let mut engine = self.config.engine();
                    match id {
                        Some(id) => {
                            resend::started(&mut engine, retry, id, next.sent);
                            // Held back; the re-send's answer replaces it.
                            return RESPONSE_HEADERS_STOP_ALL;
                        }
                        None => engine.abandon(host, next.sent, now),
                    }
                }
                return CONTINUE;
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
                headers: s.response_headers(),
                body: Vec::new(),
            });
            return CONTINUE;
        }
        record_live_answer(&mut engine, host, s, sent, status, first_look, &clock);
        if first_look == Verdict::Success {
            // Only the remaining counts are read, and a reset only for a count that is 0.
            resend::note_budget(&mut engine, host, sent, &clock, |family, now_ms| {
                budget::spent_for_ms(family, now_ms, |name| s.response_header(name))
            });
        }
        CONTINUE
    }

    pub fn response_body(&mut self, s: &Stream, end_of_stream: bool) -> u32 {
        let Some(reading) = self.reading_error.as_mut() else {
            return CONTINUE;
        };
        let room = MAX_ERROR_BODY.saturating_sub(reading.body.len());
        if room > 0 {
            reading.body.extend(s.received_response_body(room));
        }
        if end_of_stream || reading.body.len() >= MAX_ERROR_BODY {
            self.finish_error_response();
        }
        CONTINUE
    }

    /// A re-send's answer, on this stream's worker. Whatever happens, the held response must
    /// not hang: it is replaced by an answer, or let through.
    pub fn callout_done(
        &mut self,
        s: &Stream,
        id: u64,
        headers: &[(String, Vec<u8>)],
        body: &[u8],
    ) {
        let host = &self.config.host;
        let Some(retry) = self.retry.as_mut() else {
            s.continue_encoding();
            return;
        };
        let Some((in_flight, sent)) = retry.in_flight.take() else {
            s.continue_encoding();
            return;
        };
        if in_flight != id {
            retry.in_flight = Some((in_flight, sent));
            return;
        }
        let status = headers
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u16>().ok());
        // Envoy's router marks answers that came from the upstream; its own replies to the call
        // (timeout, reset, no healthy host) say nothing about a key.
        let from_upstream = headers
            .iter()
            .any(|(n, _)| n == "x-envoy-upstream-service-time");
        let answer = match status {
            Some(status) if from_upstream => CallAnswer::Upstream {
                status,
                headers,
                body,
            },
            local => CallAnswer::Local(local),
        };
        let now = now_ms();
        let mut own_cluster = || (Facts { stream: s }).cluster_name();
        let mut engine = self.config.engine();
        let outcome = match resend::on_answer(
            &mut engine,
            host,
            retry,
            sent,
            answer,
            now,
            &mut own_cluster,
        ) {
            Next::Resend {
                resend: next,
                otherwise,
            } => {
                drop(engine);
                let id = send(s, &next);
                engine = self.config.engine();
                match id {
                    Some(id) => {
                        resend::resent(&mut engine, retry, id, next.sent, sent);
                        return;
                    }
                    None => {
                        engine.abandon(host, next.sent, now);
                        otherwise
                    }
                }
            }
            Next::Done(outcome) => outcome,
        };
        let outcome = resend::conclude(&mut engine, sent, outcome);
        let label = resend::reply_label(&engine, sent);
        // The reply runs this filter's encoder hooks before it returns: no lock held.
        drop(engine);
        match outcome {
            Outcome::NoAnswer => s.send_response(
                502,
                &[("content-type", b"application/json")],
                resend::NO_ANSWER_BODY,
                resend::NO_ANSWER_DETAILS,
            ),
            Outcome::Reply(status) => s.send_response(
                status,
                &resend::reply_headers(headers, label.as_deref()),
                body,
                resend::REPLY_DETAILS,
            ),
        }
    }

    /// The stream ended, however it ended: judge an error body read so far, give back a key
    /// whose answer never came (a probe, a vanished client, or a re-send Envoy cancels because
    /// the client hung up while it ran).
    pub fn complete(&mut self) {
        self.finish_error_response();
        let in_flight = self
            .retry
            .as_mut()
            .and_then(|r| r.in_flight.take())
            .map(|(_, sent)| sent);
        let unanswered = [self.chosen.take(), in_flight];
        if unanswered.iter().all(Option::is_none) {
            return;
        }
        let mut engine = self.config.engine();
        let now = now_ms();
        for sent in unanswered.into_iter().flatten() {
            engine.abandon(&self.config.host, sent, now);
        }
    }

    fn finish_error_response(&mut self) {
        let Some(reading) = self.reading_error.take() else {
            return;
        };
        resend::judge_with_body(
            &mut self.config.engine(),
            &self.config.host,
            reading.sent,
            reading.status,
            &reading.headers,
            &reading.body,
            &Clock::new(&now_ms),
        );
    }
}

impl Drop for Filter<'_> {
    fn drop(&mut self) {
        self.complete();
    }
}

/// Sends a re-send as this stream's callout; its id, if it went out.
/// Records a response whose headers are still Envoy's to read: they are read only when the
/// verdict takes retry hints.
fn record_live_answer(
    engine: &mut Engine,
    host: &dyn crate::core::engine::Host,
    s: &Stream,
    sent: Assignment,
    status: u16,
    verdict: Verdict,
    clock: &Clock,
) {
    let headers = if engine.wants_retry_hint(sent.profile, verdict) {
        s.response_headers()
    } else {
        Vec::new()
    };
    record_answer(engine, host, sent, status, verdict, &headers, None, clock);
}

fn send(s: &Stream, next: &Resend) -> Option<u64> {
    s.http_callout(
        &next.cluster,
        &next.header_refs(),
        &next.body,
        next.timeout_ms,
    )
}

/// Removes a client's `x-ai-key-failover-pool` from a request the filter does not key. Read
/// first: the header is almost never there, and a read that finds nothing leaves Envoy's route
/// cache alone, where a removal makes Envoy select the route again.
fn drop_client_pool_header(s: &Stream) {
    if s.request_header(POOL_HEADER).is_some() {
        s.remove_request_header(POOL_HEADER);
        s.clear_route_cache();
    }
}
