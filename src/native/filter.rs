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
//! and health checks go out without traffic. With a profile that uses `onAllUnavailable: wait`
//! it wakes every 50 ms, and the tick also lets held requests go (`super::waiting`); a held
//! request comes back to its own worker through `Filter::scheduled`.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::abi::{
    self, Attribute, ConfigHandle, Scheduler, Stream, BODY_STOP_AND_BUFFER, CONTINUE,
    HEADERS_STOP_ITERATION, REQUEST_HEADERS_STOP_ALL, RESPONSE_HEADERS_STOP_ALL,
};
use super::shared::STORE;
use super::waiting::{Held, Waiting};
use crate::core::answer::{self, AfterHeaders, CallAnswer, ErrorBody, LiveResponse};
use crate::core::config;
use crate::core::engine::{Assignment, CheckAnswer, Clock, Decision, Engine, Host};
use crate::core::env_keys::HostEnv;
use crate::core::keying::{self, header_text, RequestHeaders};
use crate::core::metrics::{MetricKind, MetricsHost};
use crate::core::reply;
use crate::core::retry::{AfterCall, Dispatch, Resend, RetryState};
use crate::core::rules::{host_of_authority, RequestFacts};
use crate::core::select::OnAllUnavailable;
use crate::core::store::{SharedData, StoreError};
use crate::core::upstream_attempt::Attempt;
use crate::core::waiting::{Arrival, HELD_TICK_MS};

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
    /// `onAllUnavailable: wait`: the held requests; only when some profile waits.
    waiting: Option<Waiting>,
    /// The engine's tick period: the periodic work keeps it while held requests tick faster.
    base_tick_ms: u64,
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
        let parsed = match config::parse_with_env(text, &HostEnv::EnvoyProcess) {
            Ok(parsed) => parsed,
            Err(e) => {
                log::error!("invalid configuration: {e}");
                return None;
            }
        };
        parsed.log_loaded();
        let waiting = parsed
            .profiles
            .iter()
            .any(|p| p.on_all_unavailable == OnAllUnavailable::Wait)
            .then(|| Waiting::new(abi::concurrency()));
        let host = NativeHost { handle };
        let mut engine = Engine::new(parsed, random_seed());
        engine.start(&host, now_ms());
        let base_tick_ms = engine.tick_period_ms();
        // Held requests are looked at every HELD_TICK_MS (wasm speeds its tick up only while
        // it holds any; here an idle tick costs the main thread one event and no engine work).
        let period = Duration::from_millis(match waiting {
            Some(_) => base_tick_ms.min(u64::from(HELD_TICK_MS)),
            None => base_tick_ms,
        });
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
            waiting,
            base_tick_ms,
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
                keying::log_mode(upstream);
                upstream
            }
        }
    }

    /// The tick, on the main thread.
    pub fn scheduled(&self) {
        let now = now_ms();
        let periodic = self
            .waiting
            .as_ref()
            .is_none_or(|w| w.periodic_work_due(now, self.base_tick_ms));
        if periodic {
            self.periodic_work(now);
        }
        if let Some(waiting) = self.waiting.as_ref().filter(|w| w.is_holding()) {
            waiting.run(&mut self.engine(), &self.host, now);
        }
    }

    /// The engine's tick (time outs, stats) and the health checks due.
    fn periodic_work(&self, now: u64) {
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
        let answer = CheckAnswer {
            status: CallAnswer::of(headers, body).upstream_status(),
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

/// A stream's request: its facts, read from Envoy only when a rule asks, and its headers as
/// `keying` changes them.
struct Facts<'s> {
    stream: &'s Stream,
}

impl RequestFacts for Facts<'_> {
    fn route_name(&mut self) -> Option<String> {
        self.stream
            .attribute(Attribute::XdsRouteName)
            .map(header_text)
    }
    fn cluster_name(&mut self) -> Option<String> {
        self.stream
            .attribute(Attribute::XdsClusterName)
            .map(header_text)
    }
    fn host(&mut self) -> Option<String> {
        self.stream
            .request_header(":authority")
            .map(|a| host_of_authority(&String::from_utf8_lossy(&a)))
    }
}

impl RequestHeaders for Facts<'_> {
    fn get(&mut self, name: &str) -> Option<Vec<u8>> {
        self.stream.request_header(name)
    }
    fn set(&mut self, name: &str, value: &[u8]) -> bool {
        self.stream.set_request_header(name, value)
    }
    fn remove(&mut self, name: &str) {
        self.stream.remove_request_header(name);
    }
    /// One look at the map: each call into Envoy costs about as much as the walk, so a removal
    /// is made only for what a client actually sent.
    fn which_present<const N: usize>(&mut self, names: [&'static str; N]) -> [bool; N] {
        self.stream.request_has(names)
    }
    /// Unlike its wasm host, Envoy selects the route again for a dynamic module only when asked.
    fn reselect_route(&mut self) {
        self.stream.clear_route_cache();
    }
    fn all(&mut self) -> Vec<(String, Vec<u8>)> {
        self.stream.request_headers()
    }
}

/// One stream's state.
pub struct Filter<'c> {
    config: &'c Config,
    /// The key this request (or attempt) went out with, until its response is judged.
    chosen: Option<Assignment>,
    attempt: Option<Attempt>,
    /// A 429 whose body is being read as it streams past; nothing is held back from the client.
    reading_error: Option<ErrorBody>,
    /// A fallback pool's model: the request body is held until complete and rewritten.
    rewrite_to: Option<String>,
    /// Downstream `retryOnFailure`: the request kept for re-sends, and the one in flight.
    retry: Option<RetryState>,
    /// Set while `onAllUnavailable: wait` holds this request.
    held: Option<Arc<Held>>,
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
            held: None,
        }
    }

    pub fn request_headers(&mut self, s: &Stream, end_of_stream: bool) -> u32 {
        let config = self.config;
        let host = &config.host;
        let mut engine = config.engine();
        let upstream = config.is_upstream(s);
        let arrival = keying::arrive(&engine, &mut Facts { stream: s }, upstream, end_of_stream);
        let profile = arrival.profile;
        // Arrival order: while requests of this profile are held, a new one waits behind them.
        if let (Some(p), Some(waiting)) = (profile, &config.waiting) {
            if waiting.queues_behind(p) {
                let max_wait_ms = engine.profile(p).map_or(0, |p| p.max_wait_ms);
                // The queue has room, so the reject answer's wait is never used here.
                return self.hold(s, engine, arrival, max_wait_ms, 1);
            }
        }
        let clock = Clock::new(&now_ms);
        let decision = engine.decide_with(host, profile, &clock, &arrival.avoid, arrival.ask);
        if let Decision::Hold {
            max_wait_ms,
            retry_after_secs,
        } = decision
        {
            return self.hold(s, engine, arrival, max_wait_ms, retry_after_secs);
        }
        self.apply(s, engine, arrival, decision)
    }

    /// Holds the request (`onAllUnavailable: wait`) until a key returns or `max_wait_ms` ends;
    /// with the queue full, it gets the `reject` answer now.
    fn hold(
        &mut self,
        s: &Stream,
        mut engine: MutexGuard<'_, Engine>,
        arrival: Arrival,
        max_wait_ms: u64,
        retry_after_secs: u64,
    ) -> u32 {
        let group = arrival.profile.unwrap_or(usize::MAX);
        let deadline = now_ms().saturating_add(max_wait_ms);
        let held = match &self.config.waiting {
            Some(waiting) => waiting.hold(s, arrival, deadline),
            None => Err(arrival),
        };
        match held {
            Ok(held) => {
                self.held = Some(held);
                REQUEST_HEADERS_STOP_ALL
            }
            Err(arrival) => {
                engine.count_rejected(group);
                self.apply(s, engine, arrival, Decision::Reject { retry_after_secs })
            }
        }
    }

    /// A held request's event, on its worker: the queue let it go with a decision, applied as
    /// at its arrival. True: the request goes on (the caller continues it, after this hook).
    pub fn scheduled(&mut self, s: &Stream) -> bool {
        let Some((decision, arrival)) = self.held.as_ref().and_then(|h| h.take_released()) else {
            return false;
        };
        self.held = None;
        let engine = self.config.engine();
        self.apply(s, engine, arrival, decision) == CONTINUE
    }

    /// Acts on the key decision for a request: sends it with its key (or untouched), or answers
    /// it as `reject` does.
    fn apply(
        &mut self,
        s: &Stream,
        mut engine: MutexGuard<'_, Engine>,
        arrival: Arrival,
        decision: Decision,
    ) -> u32 {
        match decision {
            Decision::Untouched => {
                keying::pass_untouched(&mut Facts { stream: s }, arrival.drop_pool_header);
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
                let keyed = keying::put_key(
                    &mut engine,
                    &self.config.host,
                    &mut Facts { stream: s },
                    arrival,
                    assignment,
                );
                self.chosen = keyed.chosen;
                self.attempt = keyed.attempt;
                self.retry = keyed.retry;
                self.rewrite_to = keyed.rewrite_to;
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
                retry.keep_whole_body(&body);
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
        retry.keep_body_chunk(
            end_of_stream,
            || s.received_request_body_size(),
            || Some(s.received_request_body(usize::MAX)),
        );
        CONTINUE
    }

    pub fn response_headers(&mut self, s: &Stream, end_of_stream: bool) -> u32 {
        let Some(sent) = self.chosen.take() else {
            return CONTINUE;
        };
        let config = self.config;
        let clock = Clock::new(&now_ms);
        let after = answer::on_response_headers(
            &mut config.engine(),
            &config.host,
            &NativeResponse(s),
            sent,
            self.attempt.as_ref(),
            self.retry.is_some(),
            end_of_stream,
            &clock,
        );
        match after {
            AfterHeaders::Continue => {}
            AfterHeaders::ReadBody(body) => self.reading_error = Some(body),
            AfterHeaders::Retry => {
                let dispatch = NativeDispatch { config, stream: s };
                let resent = self
                    .retry
                    .as_mut()
                    .is_some_and(|retry| retry.after_first_failure(&dispatch, sent, clock.now()));
                if resent {
                    // Held back; the re-send's answer replaces it.
                    return RESPONSE_HEADERS_STOP_ALL;
                }
            }
        }
        CONTINUE
    }

    pub fn response_body(&mut self, s: &Stream, end_of_stream: bool) -> u32 {
        let Some(reading) = self.reading_error.as_mut() else {
            return CONTINUE;
        };
        if reading.keep_chunk(end_of_stream, |room| Some(s.received_response_body(room))) {
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
        let Some(retry) = self.retry.as_mut() else {
            s.continue_encoding();
            return;
        };
        let dispatch = NativeDispatch {
            config: self.config,
            stream: s,
        };
        match retry.on_call_answer(&dispatch, id, headers, body, now_ms()) {
            AfterCall::NotOurs | AfterCall::Resent => {}
            AfterCall::PassThrough => s.continue_encoding(),
            // The reply runs this filter's encoder hooks before it returns: no lock is held.
            AfterCall::Reply(reply) => {
                s.send_response(reply.status, &reply.headers(), reply.body, reply.details)
            }
        }
    }

    /// The stream ended, however it ended: judge an error body read so far, give back a key
    /// whose answer never came (a probe, a vanished client, a request held by `wait` whose key
    /// was decided as its client hung up, or a re-send Envoy cancels because the client hung up
    /// while it ran).
    pub fn complete(&mut self) {
        self.finish_error_response();
        let in_flight = self.retry.as_mut().and_then(RetryState::take_in_flight);
        // A held request whose client hung up leaves the queue, with a key decided for it.
        let released = self.held.take().and_then(|held| held.forget());
        let unanswered = [self.chosen.take(), in_flight, released];
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
        if let Some(reading) = self.reading_error.take() {
            let config = self.config;
            reading.judge(&mut config.engine(), &config.host, &Clock::new(&now_ms));
        }
    }
}

impl Drop for Filter<'_> {
    fn drop(&mut self) {
        self.complete();
    }
}

/// A response whose headers are still Envoy's to read and write.
struct NativeResponse<'s>(&'s Stream);

impl LiveResponse for NativeResponse<'_> {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.0.response_header(name)
    }
    fn headers(&self) -> Vec<(String, Vec<u8>)> {
        self.0.response_headers()
    }
    fn set_header(&self, name: &str, value: &[u8]) {
        self.0.set_response_header(name, value);
    }
    fn via_upstream(&self) -> bool {
        self.0.attribute(Attribute::ResponseCodeDetails).as_deref() == Some(b"via_upstream")
    }
}

/// The retry state machine's host: this stream, and its config's engine (locked only while the
/// engine decides or records, never while Envoy starts a call).
struct NativeDispatch<'a> {
    config: &'a Config,
    stream: &'a Stream,
}

impl Dispatch for NativeDispatch<'_> {
    type Engine<'e>
        = MutexGuard<'e, Engine>
    where
        Self: 'e;
    fn engine(&self) -> Option<MutexGuard<'_, Engine>> {
        Some(self.config.engine())
    }
    fn host(&self) -> &dyn Host {
        &self.config.host
    }
    fn own_cluster(&self) -> Option<String> {
        (Facts {
            stream: self.stream,
        })
        .cluster_name()
    }
    /// As this stream's callout, whose answer comes to `Filter::callout_done`.
    fn send(&self, resend: &Resend) -> Option<u64> {
        self.stream.http_callout(
            &resend.cluster,
            &resend.header_refs(),
            &resend.body,
            resend.timeout_ms,
        )
    }
}
