//! The thin Envoy layer: reads what a request says, asks the engine, writes headers back.
//!
//! The same filter runs downstream (the listener's HTTP filters) or upstream (a cluster's
//! upstream HTTP filters, once per retry attempt of the route). It tells which on the first
//! request: only an upstream filter already knows the upstream host.

use std::cell::{Cell, RefCell, RefMut};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::{Rc, Weak};

use proxy_wasm::types::Action;

use crate::core::answer::{self, AfterHeaders, CallAnswer, ErrorBody, LiveResponse};
use crate::core::config;
use crate::core::engine::{Assignment, CheckAnswer, Clock, Decision, Engine, Host};
use crate::core::keying::{self, header_text, Keyed, RequestHeaders};
use crate::core::reply;
use crate::core::retry::{AfterCall, Dispatch, Resend, RetryState};
use crate::core::rewrite::rewrite_model;
use crate::core::rules::{host_of_authority, RequestFacts};
use crate::core::upstream_attempt::Attempt;
use crate::core::waiting::{self, Arrival, Served};
use crate::wasm::callout::{Callouts, DispatchError, Route};
use crate::wasm::host::{self, WasmHost};

/// The plugin as one configuration made it: held by its root context and by the requests
/// (and health checks) started under it, so a reconfigure replaces it without disturbing them.
struct Instance {
    engine: RefCell<Engine>,
    /// Whether this filter runs as an upstream filter; learned on the first request.
    upstream: std::cell::Cell<Option<bool>>,
}

/// The engine goes when the last holder lets go: its root context on reconfigure or when
/// Envoy deletes the root (a reload's new plugin config gets a new root), or the last request
/// that started under it. Counts since its last tick would be lost with it.
impl Drop for Instance {
    fn drop(&mut self) {
        if let Ok(mut engine) = self.engine.try_borrow_mut() {
            engine.flush_counters(&WasmHost);
        }
    }
}

pub struct Root {
    /// Health checks are made on it, so their answers are read with it effective.
    context_id: u32,
    /// Replaced whole on reconfigure; requests in flight keep the one they started with.
    instance: Option<Rc<Instance>>,
    /// `onAllUnavailable: wait`: this worker's held requests; outlives a reconfigure, since
    /// each held request keeps the engine it started with.
    waiting: Rc<Waiting>,
    /// When the periodic work last ran: ticks come faster while requests are held.
    last_tick_work_ms: u64,
}

/// This worker's held requests and the tick period they need.
struct Waiting {
    queue: RefCell<waiting::Queue<std::rc::Weak<Held>>>,
    /// The period the host ticks at now.
    tick_ms: std::cell::Cell<u32>,
    /// The period the engine asks for (the shortest cooldown or check interval, 100 ms to
    /// 1 s); held requests make the ticks faster than this, never slower.
    base_ms: std::cell::Cell<u32>,
}

impl Default for Waiting {
    fn default() -> Self {
        Waiting {
            queue: RefCell::new(waiting::Queue::default()),
            tick_ms: std::cell::Cell::new(1_000),
            base_ms: std::cell::Cell::new(1_000),
        }
    }
}

impl Waiting {
    /// Sets the tick period the queue needs now, if it changed (a host call only then).
    fn sync_tick_period(&self) {
        let wanted = self
            .queue
            .try_borrow()
            .map_or(self.base_ms.get(), |q| q.tick_period_ms(self.base_ms.get()));
        if wanted != self.tick_ms.get() && host::set_tick_period_ms(wanted) {
            self.tick_ms.set(wanted);
        }
    }
}

/// A request held by `onAllUnavailable: wait`. The request owns it; the queue has a weak
/// reference, so a request whose client hangs up (its context is dropped) is forgotten.
struct Held {
    context_id: u32,
    instance: Rc<Instance>,
    /// Taken by the pass that sends the request on (the key's bookkeeping keeps its parts).
    arrival: Cell<Option<Arrival>>,
    /// Set by the root when it sends the request on; the request takes it at its next callback.
    keyed: RefCell<Option<Keyed>>,
}

/// What the answer to one of our `dispatch_http_call`s is for (see `crate::wasm::callout`).
enum Callout {
    /// A `retryOnFailure` re-send of this request.
    Retry(Weak<RefCell<Request>>),
    /// A health check of a pool's key, sent by the engine that planned it (an answer that
    /// outlives that configuration is dropped: its pool and key numbers are not the new one's).
    HealthCheck {
        instance: Weak<Instance>,
        pool: usize,
        key: usize,
    },
}

// A Cell, not a RefCell: taken and put back around each use, it cannot fail to borrow.
thread_local! {
    static CALLOUTS: Cell<Callouts<Callout>> = Cell::new(Callouts::default());
}

/// Sends a call and registers its answer for `callout` on context `context_id`.
fn dispatch_http_call(
    cluster: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
    timeout_ms: u64,
    context_id: u32,
    callout: Callout,
) -> Result<u32, DispatchError> {
    let token = host::dispatch_http_call(cluster, headers, body, timeout_ms)?;
    let displaced = CALLOUTS.with(|cell| {
        let mut calls = cell.take();
        let displaced = calls.register(token, context_id, callout);
        cell.set(calls);
        displaced
    });
    if displaced.is_some() {
        log::warn!("the host reused call token {token}; an older call's answer is lost");
    }
    Ok(token)
}

/// A re-send for `request` (context `context_id`); None when it was not sent.
fn dispatch_retry(
    resend: &Resend,
    context_id: u32,
    request: Weak<RefCell<Request>>,
) -> Option<u32> {
    let callout = Callout::Retry(request);
    let headers = resend.header_refs();
    match dispatch_http_call(
        &resend.cluster,
        &headers,
        &resend.body,
        resend.timeout_ms,
        context_id,
        callout,
    ) {
        Ok(token) => Some(token),
        Err(e) => {
            log::debug!("a re-send was not sent (host status {e})");
            None
        }
    }
}

/// The answer to one of our calls (`proxy_on_http_call_response`, see `crate::wasm::callout`).
/// Nothing here can trap: an answer nobody waits for is dropped.
pub fn call_answered(token_id: u32, num_headers: usize, body_size: usize, num_trailers: usize) {
    let route = CALLOUTS.with(|cell| {
        let mut calls = cell.take();
        // The host call in `route` cannot call back into the VM, so nothing sees the
        // registry while it is taken.
        let route = calls.route(token_id, host::set_effective_context);
        cell.set(calls);
        route
    });
    match route {
        Route::Deliver(Callout::Retry(request)) => {
            let Some(live) = request.upgrade() else {
                return;
            };
            let Ok(mut held) = live.try_borrow_mut() else {
                // The held response must not hang.
                host::resume_response();
                return;
            };
            held.on_http_call_response(token_id, num_headers, body_size, num_trailers);
        }
        Route::Deliver(Callout::HealthCheck {
            instance,
            pool,
            key,
        }) => {
            if let Some(instance) = instance.upgrade() {
                health_check_answered(&instance, pool, key, body_size);
            }
        }
        Route::ContextGone(_) => log::debug!("an answer came for a context that is gone"),
        Route::Unknown => log::debug!("an answer came for call token {token_id}, not ours"),
    }
}

fn health_check_answered(instance: &Instance, pool: usize, key: usize, body_size: usize) {
    let Ok(mut engine) = instance.engine.try_borrow_mut() else {
        return;
    };
    let (headers, body) = host::call_response(body_size);
    let answer = CheckAnswer {
        status: CallAnswer::of(&headers, &body).upstream_status(),
        headers: &headers,
        body: &body,
    };
    engine.health_check_done(&WasmHost, pool, key, answer, host::now_ms());
}

impl Root {
    pub fn new(context_id: u32) -> Self {
        Root {
            context_id,
            instance: None,
            waiting: Rc::new(Waiting::default()),
            last_tick_work_ms: 0,
        }
    }

    pub fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        host::sync_log_level();
        let bytes = host::plugin_configuration().unwrap_or_default();
        let parsed = match config::parse(&bytes) {
            Ok(parsed) => parsed,
            Err(e) => {
                log::error!("invalid configuration: {e}");
                return false;
            }
        };
        parsed.log_loaded();
        let mut engine = Engine::new(parsed, random_seed());
        engine.start(&WasmHost, host::now_ms());
        // Ends time outs during quiet periods (under traffic, requests do it themselves): as
        // often as the shortest cooldown or check interval needs, from 100 ms to 1 s.
        let tick_ms = u32::try_from(engine.tick_period_ms()).unwrap_or(u32::MAX);
        self.instance = Some(Rc::new(Instance {
            engine: RefCell::new(engine),
            upstream: std::cell::Cell::new(None),
        }));
        self.waiting.base_ms.set(tick_ms);
        if host::set_tick_period_ms(tick_ms) {
            // Requests held across the reload still need their fast ticks.
            self.waiting.tick_ms.set(tick_ms);
            self.waiting.sync_tick_period();
        } else {
            log::warn!("could not set the tick period; keys return only on traffic");
        }
        true
    }

    pub fn on_tick(&mut self) {
        let now = host::now_ms();
        // Ticks come every HELD_TICK_MS while requests are held; the periodic work keeps the
        // engine's pace.
        if waiting::periodic_work_due(
            now,
            self.last_tick_work_ms,
            u64::from(self.waiting.base_ms.get()),
        ) {
            self.last_tick_work_ms = now;
            self.tick_work(now);
        }
        // Last: it makes held requests' contexts the effective one, then gives it back.
        if self.waiting.queue.try_borrow().is_ok_and(|q| !q.is_empty()) {
            run_held(&self.waiting, now);
            host::set_effective_context(self.context_id);
        }
        self.waiting.sync_tick_period();
    }

    /// A request the host created under this configuration.
    pub fn new_request(&self, context_id: u32) -> Rc<RefCell<Request>> {
        Rc::new_cyclic(|this| {
            RefCell::new(Request {
                context_id,
                this: this.clone(),
                instance: self.instance.clone(),
                chosen: None,
                attempt: None,
                reading_error: None,
                retry: None,
                rewrite_to: None,
                waiting: self.waiting.clone(),
                held: None,
            })
        })
    }

    /// The periodic work: the engine's tick (time outs, stats) and health checks.
    fn tick_work(&mut self, now: u64) {
        host::sync_log_level();
        let Some(instance) = &self.instance else {
            return;
        };
        let Ok(mut engine) = instance.engine.try_borrow_mut() else {
            return;
        };
        engine.tick(&WasmHost, now);
        for check in engine.health_checks_due(&WasmHost, now) {
            let headers: Vec<(&str, &[u8])> = check
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes()))
                .collect();
            let callout = Callout::HealthCheck {
                instance: Rc::downgrade(instance),
                pool: check.pool,
                key: check.key,
            };
            if let Err(e) = dispatch_http_call(
                &check.cluster,
                &headers,
                &check.body,
                check.timeout_ms,
                self.context_id,
                callout,
            ) {
                log::warn!(
                    "could not send a health check to cluster {:?} (host status {e}); is healthCheckCluster right?",
                    check.cluster
                );
                engine.health_check_not_sent(check.pool, check.key);
            }
        }
    }
}

/// One pass over the held requests, in arrival order: each is sent on if a key can take it
/// now; one whose wait is over gets the `reject` answer.
fn run_held(waiting: &Waiting, now: u64) {
    let Ok(mut queue) = waiting.queue.try_borrow_mut() else {
        return;
    };
    queue.run(
        now,
        |held| held.upgrade().is_none(),
        |held| match held.upgrade() {
            Some(held) => release_held(&held, now, false),
            None => Served::Yes,
        },
        |held| {
            if let Some(held) = held.upgrade() {
                release_held(&held, now, true);
            }
        },
    );
}

/// Asks the held request's engine again. A key: it is put on the request, which goes on. No key
/// yet: it stays, unless its wait is `over`, when it gets what `reject` gives.
fn release_held(held: &Held, now: u64, over: bool) -> Served {
    // Header writes, the reply and the resume below act on the held request. A host that no
    // longer knows the context has dropped the request: nothing to do.
    if !host::set_effective_context(held.context_id) {
        return Served::Yes;
    }
    // The engine is borrowed only to decide: resuming runs the request's own callbacks (its
    // buffered body) at once, and they need the engine too.
    let (keyed, reject) = {
        let Ok(mut engine) = held.instance.engine.try_borrow_mut() else {
            return Served::NotYet;
        };
        let Some(a) = held.arrival.take() else {
            return Served::Yes;
        };
        let released = waiting::release(
            &mut engine,
            &WasmHost,
            a.profile,
            &a.avoid,
            a.ask,
            now,
            over,
        );
        match released {
            None => {
                held.arrival.set(Some(a));
                return Served::NotYet;
            }
            Some(
                Decision::Reject { retry_after_secs }
                | Decision::Hold {
                    retry_after_secs, ..
                },
            ) => (None, Some(retry_after_secs)),
            Some(Decision::Untouched) => (Some(Keyed::default()), None),
            Some(Decision::UseKey(assignment)) => {
                let keyed = keying::put_key(&mut engine, &WasmHost, &mut HostFacts, a, assignment);
                (Some(keyed), None)
            }
        }
    };
    if let Some(retry_after_secs) = reject {
        send_reject(retry_after_secs);
        return Served::Yes;
    }
    if let Ok(mut slot) = held.keyed.try_borrow_mut() {
        *slot = keyed;
    }
    host::resume_request();
    Served::Yes
}

fn random_seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(host::now_ms());
    hasher.finish()
}

/// The request of the effective context: its facts, read only when a rule asks, and its headers
/// as `keying` changes them.
struct HostFacts;

fn property_string(paths: &[&[&str]]) -> Option<String> {
    paths
        .iter()
        .find_map(|path| host::property(path))
        .map(header_text)
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

impl RequestHeaders for HostFacts {
    fn get(&mut self, name: &str) -> Option<Vec<u8>> {
        host::request_header(name)
    }
    fn set(&mut self, name: &str, value: &[u8]) -> bool {
        host::set_request_header(name, value)
    }
    fn remove(&mut self, name: &str) {
        host::remove_request_header(name);
    }
    /// A look costs a host call as a removal does: every name may be there.
    fn which_present<const N: usize>(&mut self, _names: [&'static str; N]) -> [bool; N] {
        [true; N]
    }
    /// Envoy's wasm host selects the route again on every request-header change.
    fn reselect_route(&mut self) {}
    fn all(&mut self) -> Vec<(String, Vec<u8>)> {
        host::request_headers()
    }
}

pub struct Request {
    /// Its re-sends' answers are handled with it effective.
    context_id: u32,
    /// Itself, for the call registry: a re-send's answer comes back to it.
    this: Weak<RefCell<Request>>,
    instance: Option<Rc<Instance>>,
    /// The key this request (or attempt) went out with, until its response is judged.
    chosen: Option<Assignment>,
    attempt: Option<Attempt>,
    /// A 429 whose body is being read (for `insufficient_quota` or a Gemini retry delay) as it
    /// streams past; nothing is held back from the client.
    reading_error: Option<ErrorBody>,
    retry: Option<RetryState>,
    /// A fallback pool's model: the request body is held until complete and rewritten.
    rewrite_to: Option<String>,
    waiting: Rc<Waiting>,
    /// Set while `onAllUnavailable: wait` holds this request, until it adopts what it was sent
    /// on with.
    held: Option<Rc<Held>>,
}

impl Request {
    /// A re-send's answer. Whatever happens, the held response must not hang: it is replaced by
    /// an answer, or let through.
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let (Some(instance), Some(retry)) = (self.instance.clone(), self.retry.as_mut()) else {
            host::resume_response();
            return;
        };
        let (headers, body) = host::call_response(body_size);
        let dispatch = WasmDispatch {
            instance: &instance,
            context_id: self.context_id,
            request: &self.this,
        };
        match retry.on_call_answer(
            &dispatch,
            u64::from(token_id),
            &headers,
            &body,
            host::now_ms(),
        ) {
            AfterCall::NotOurs | AfterCall::Resent => {}
            AfterCall::PassThrough => {
                host::resume_response();
            }
            AfterCall::Reply(reply) => {
                let status = u32::from(reply.status);
                if !host::send_local_response(status, reply.details, &reply.headers(), reply.body) {
                    host::resume_response();
                }
            }
        }
    }
}

/// The retry state machine's host: the request's engine, and re-sends made for the request.
struct WasmDispatch<'a> {
    instance: &'a Instance,
    context_id: u32,
    request: &'a Weak<RefCell<Request>>,
}

impl Dispatch for WasmDispatch<'_> {
    type Engine<'e>
        = RefMut<'e, Engine>
    where
        Self: 'e;
    fn engine(&self) -> Option<RefMut<'_, Engine>> {
        self.instance.engine.try_borrow_mut().ok()
    }
    fn host(&self) -> &dyn Host {
        &WasmHost
    }
    fn own_cluster(&self) -> Option<String> {
        cluster_name()
    }
    fn send(&self, resend: &Resend) -> Option<u64> {
        dispatch_retry(resend, self.context_id, self.request.clone()).map(u64::from)
    }
}

impl Request {
    fn reject(&self, retry_after_secs: u64) {
        send_reject(retry_after_secs);
    }

    /// A held request that was sent on takes what the root put on it: its key and the rest.
    fn adopt_released(&mut self) {
        let Some(held) = &self.held else {
            return;
        };
        // None: still waiting.
        let keyed = held.keyed.try_borrow_mut().ok().and_then(|mut k| k.take());
        if let Some(keyed) = keyed {
            self.held = None;
            self.adopt(keyed);
        }
    }

    fn adopt(&mut self, keyed: Keyed) {
        self.chosen = keyed.chosen;
        self.attempt = keyed.attempt;
        self.retry = keyed.retry;
        self.rewrite_to = keyed.rewrite_to;
    }

    /// Holds the request (`onAllUnavailable: wait`) until a key returns or `max_wait_ms` ends;
    /// with the worker's queue full, it gets the `reject` answer now.
    fn hold(
        &mut self,
        engine: &mut Engine,
        instance: &Rc<Instance>,
        arrival: Arrival,
        max_wait_ms: u64,
        retry_after_secs: u64,
    ) -> Action {
        let group = arrival.profile.unwrap_or(usize::MAX);
        let held = Rc::new(Held {
            context_id: self.context_id,
            instance: instance.clone(),
            arrival: Cell::new(Some(arrival)),
            keyed: RefCell::new(None),
        });
        let deadline = host::now_ms().saturating_add(max_wait_ms);
        let pushed = self
            .waiting
            .queue
            .try_borrow_mut()
            .is_ok_and(|mut q| q.push(Rc::downgrade(&held), group, deadline).is_ok());
        if !pushed {
            engine.count_rejected(group);
            self.reject(retry_after_secs);
            return Action::Pause;
        }
        self.held = Some(held);
        self.waiting.sync_tick_period();
        Action::Pause
    }
}

/// `onAllUnavailable: reject`'s answer: 429, `retry-after`, and an OpenAI-style error body.
fn send_reject(retry_after_secs: u64) {
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

impl Request {
    /// The stream ended: judge an error body read so far, or give back an unanswered probe,
    /// whichever attempt holds it: the request's own, or a `retryOnFailure` re-send still in
    /// flight (the client hung up while it ran; Envoy cancels the call, so no answer will come).
    fn finish(&mut self) {
        self.finish_error_response();
        let in_flight = self.retry.as_mut().and_then(RetryState::take_in_flight);
        let unanswered = [self.chosen.take(), in_flight];
        // A request that was answered holds nothing: no borrow, no clock read.
        if unanswered.iter().all(Option::is_none) {
            return;
        }
        let Some(instance) = self.instance.clone() else {
            return;
        };
        let Ok(mut engine) = instance.engine.try_borrow_mut() else {
            return;
        };
        let now = host::now_ms();
        for sent in unanswered.into_iter().flatten() {
            engine.abandon(&WasmHost, sent, now);
        }
    }

    fn finish_error_response(&mut self) {
        let Some(reading) = self.reading_error.take() else {
            return;
        };
        let Some(instance) = self.instance.clone() else {
            return;
        };
        let Ok(mut engine) = instance.engine.try_borrow_mut() else {
            return;
        };
        reading.judge(&mut engine, &WasmHost, &Clock::new(&host::now_ms));
    }
}

/// The request callbacks `wasm::exports` runs.
impl Request {
    pub fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(instance) = self.instance.clone() else {
            return Action::Continue;
        };
        let Ok(mut engine) = instance.engine.try_borrow_mut() else {
            return Action::Continue;
        };
        let upstream = match instance.upstream.get() {
            Some(known) => known,
            None => {
                let upstream = host::property(&["upstream", "address"]).is_some();
                instance.upstream.set(Some(upstream));
                keying::log_mode(upstream);
                upstream
            }
        };
        let arrival = keying::arrive(&engine, &mut HostFacts, upstream, end_of_stream);
        let profile = arrival.profile;
        // Arrival order: while requests of this profile are held, a new one waits behind them.
        if let Some(p) = profile {
            let queued = self
                .waiting
                .queue
                .try_borrow()
                .is_ok_and(|q| q.queues_behind(p));
            if queued {
                let max_wait_ms = engine.profile(p).map_or(0, |p| p.max_wait_ms);
                // The queue has room, so the reject answer's wait is never used here.
                return self.hold(&mut engine, &instance, arrival, max_wait_ms, 1);
            }
        }
        let clock = Clock::new(&host::now_ms);
        match engine.decide_with(&WasmHost, profile, &clock, &arrival.avoid, arrival.ask) {
            Decision::Untouched => {
                keying::pass_untouched(&mut HostFacts, arrival.drop_pool_header);
                Action::Continue
            }
            Decision::Reject { retry_after_secs } => {
                self.reject(retry_after_secs);
                Action::Pause
            }
            Decision::Hold {
                max_wait_ms,
                retry_after_secs,
            } => self.hold(
                &mut engine,
                &instance,
                arrival,
                max_wait_ms,
                retry_after_secs,
            ),
            Decision::UseKey(assignment) => {
                let keyed =
                    keying::put_key(&mut engine, &WasmHost, &mut HostFacts, arrival, assignment);
                self.adopt(keyed);
                Action::Continue
            }
        }
    }

    pub fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.adopt_released();
        if self.rewrite_to.is_some() {
            // Held (Envoy buffers it) until complete, then rewritten whole.
            if !end_of_stream {
                return Action::Pause;
            }
            let body = host::request_body(body_size).unwrap_or_default();
            if let Some(retry) = self.retry.as_mut() {
                retry.keep_whole_body(&body);
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
        let Some(retry) = self.retry.as_mut() else {
            return Action::Continue;
        };
        retry.keep_body_chunk(
            end_of_stream,
            || body_size,
            || host::request_body(body_size),
        );
        Action::Continue
    }

    pub fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.adopt_released();
        let (Some(sent), Some(instance)) = (self.chosen.take(), self.instance.clone()) else {
            return Action::Continue;
        };
        let Ok(mut engine) = instance.engine.try_borrow_mut() else {
            return Action::Continue;
        };
        // Most responses (a success on a healthy key) never need the time.
        let clock = Clock::new(&host::now_ms);
        let after = answer::on_response_headers(
            &mut engine,
            &WasmHost,
            &WasmResponse,
            sent,
            self.attempt.as_ref(),
            self.retry.is_some(),
            end_of_stream,
            &clock,
        );
        drop(engine);
        match after {
            AfterHeaders::Continue => {}
            AfterHeaders::ReadBody(body) => self.reading_error = Some(body),
            AfterHeaders::Retry => {
                let dispatch = WasmDispatch {
                    instance: &instance,
                    context_id: self.context_id,
                    request: &self.this,
                };
                let resent = self
                    .retry
                    .as_mut()
                    .is_some_and(|retry| retry.after_first_failure(&dispatch, sent, clock.now()));
                if resent {
                    // Hold this answer back; the re-send's answer replaces it.
                    return Action::Pause;
                }
            }
        }
        Action::Continue
    }

    pub fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(reading) = self.reading_error.as_mut() else {
            return Action::Continue;
        };
        if reading.keep_chunk(end_of_stream, |room| {
            host::response_body(body_size.min(room))
        }) {
            self.finish_error_response();
        }
        Action::Continue
    }
}

/// The last word on a request, however it ended (answered, reset, client gone): `wasm::exports`
/// drops it on `proxy_on_delete`.
impl Drop for Request {
    fn drop(&mut self) {
        // A held request that was sent on but never got further still holds its key's probe.
        self.adopt_released();
        self.finish();
    }
}

/// The response of the request whose callback is running, as the host has it.
struct WasmResponse;

impl LiveResponse for WasmResponse {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        host::response_header(name)
    }
    fn headers(&self) -> Vec<(String, Vec<u8>)> {
        host::response_headers()
    }
    fn set_header(&self, name: &str, value: &[u8]) {
        host::set_response_header(name, value);
    }
    fn via_upstream(&self) -> bool {
        host::property(&["response", "code_details"]).is_some_and(|d| d == b"via_upstream")
    }
}
