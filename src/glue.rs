//! The thin Envoy layer: reads what a request says, asks the engine, writes headers back.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::config::{self, Provider};
use crate::credentials::{strip_query_param, CLIENT_CREDENTIAL_HEADERS};
use crate::engine::{Assignment, Decision, Engine};
use crate::hints;
use crate::host::{self, HostShared};
use crate::rules::{host_of_authority, RequestFacts};
use crate::status::Verdict;

/// Restores keys during quiet periods; under traffic, requests restore due keys themselves.
const TICK_PERIOD_MS: u32 = 1000;

proxy_wasm::main! {{
    host::install_logger();
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { engine: None }) });
}}

struct Root {
    /// Replaced whole on reconfigure; requests in flight keep the engine they started with.
    engine: Option<Rc<RefCell<Engine>>>,
}

impl Context for Root {}

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
        self.engine = Some(Rc::new(RefCell::new(engine)));
        if !host::set_tick_period_ms(TICK_PERIOD_MS) {
            log::warn!("could not set the tick period; keys return only on traffic");
        }
        true
    }

    fn on_tick(&mut self) {
        host::sync_log_level();
        if let Some(engine) = &self.engine {
            if let Ok(mut engine) = engine.try_borrow_mut() {
                engine.tick(&HostShared, host::now_ms());
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            engine: self.engine.clone(),
            chosen: None,
            reading_error: None,
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

struct Request {
    engine: Option<Rc<RefCell<Engine>>>,
    /// The key this request went out with, until its response is judged.
    chosen: Option<Assignment>,
    /// A 429 whose body is being read (for `insufficient_quota` or a Gemini retry delay) as it
    /// streams past; nothing is held back from the client.
    reading_error: Option<ErrorResponse>,
}

struct ErrorResponse {
    sent: Assignment,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// Enough for any provider's error JSON; a longer body is judged on its start.
const MAX_ERROR_BODY: usize = 64 * 1024;

impl Context for Request {}

/// Request facts read from the host, each at most once and only if a rule asks.
#[derive(Default)]
struct HostFacts;

fn property_string(paths: &[&[&str]]) -> Option<String> {
    paths
        .iter()
        .find_map(|path| host::property(path))
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

impl RequestFacts for HostFacts {
    fn route_name(&mut self) -> Option<String> {
        // Envoy >= 1.33 names it xds.route_name; Higress's Envoy may know only route_name.
        property_string(&[&["xds", "route_name"], &["route_name"]])
    }
    fn cluster_name(&mut self) -> Option<String> {
        property_string(&[&["xds", "cluster_name"], &["cluster_name"]])
    }
    fn host(&mut self) -> Option<String> {
        host::request_header(":authority").map(|a| host_of_authority(&String::from_utf8_lossy(&a)))
    }
}

impl Request {
    fn reject(&self, retry_after_secs: u64) {
        let retry_after = retry_after_secs.to_string();
        let body = format!(
            "{{\"error\":{{\"message\":\"Every upstream API key of this route is cooling down after rate limits or errors; retry after {retry_after_secs} s.\",\"type\":\"rate_limit_error\",\"param\":null,\"code\":\"all_keys_unavailable\"}}}}"
        );
        host::send_local_response(
            429,
            "ai_key_failover_all_keys_down",
            &[
                ("retry-after", &retry_after),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
        );
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(engine) = self.engine.clone() else {
            return Action::Continue;
        };
        let Ok(mut engine) = engine.try_borrow_mut() else {
            return Action::Continue;
        };
        let profile = engine.profile_for(&mut HostFacts);
        match engine.decide(&HostShared, profile, host::now_ms()) {
            Decision::Untouched => Action::Continue,
            Decision::Reject { retry_after_secs } => {
                self.reject(retry_after_secs);
                Action::Pause
            }
            Decision::UseKey(assignment) => {
                let Some((auth_name, auth_value)) =
                    engine.key_header(assignment.profile, assignment.key)
                else {
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
                if engine
                    .profile(assignment.profile)
                    .is_some_and(|p| p.provider == Provider::Gemini)
                {
                    strip_gemini_query_key();
                }
                self.chosen = Some(assignment);
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let (Some(sent), Some(engine)) = (self.chosen.take(), self.engine.clone()) else {
            return Action::Continue;
        };
        let Ok(mut engine) = engine.try_borrow_mut() else {
            return Action::Continue;
        };
        if engine
            .profile(sent.profile)
            .is_some_and(|p| p.expose_key_name)
        {
            if let Some(label) = engine.key_label(sent.profile, sent.key) {
                host::set_response_header("x-ai-key-failover-key", label.as_bytes());
            }
        }
        let Some(status) = host::response_header(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
        else {
            engine.abandon(&HostShared, sent, host::now_ms());
            return Action::Continue;
        };
        let first_look = engine.verdict(sent.profile, status, false);
        // Envoy's own replies (timeouts, resets, no healthy upstream) say nothing about the key.
        if matches!(first_look, Verdict::KeyFailure(_)) && !from_upstream() {
            engine.record(
                &HostShared,
                sent,
                Verdict::Neutral,
                status,
                None,
                host::now_ms(),
            );
            return Action::Continue;
        }
        if engine.wants_error_body(sent.profile, status) && !end_of_stream {
            self.reading_error = Some(ErrorResponse {
                sent,
                status,
                headers: host::response_headers(),
                body: Vec::new(),
            });
            return Action::Continue;
        }
        let headers = if engine.wants_retry_hint(sent.profile, first_look) {
            host::response_headers()
        } else {
            Vec::new()
        };
        judge(&mut engine, sent, status, &headers, None);
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

    fn on_log(&mut self) {
        // The stream ended: judge an error body read so far, or give back an unanswered probe.
        self.finish_error_response();
        let (Some(sent), Some(engine)) = (self.chosen.take(), self.engine.clone()) else {
            return;
        };
        let Ok(mut engine) = engine.try_borrow_mut() else {
            return;
        };
        engine.abandon(&HostShared, sent, host::now_ms());
    }
}

impl Request {
    fn finish_error_response(&mut self) {
        let (Some(reading), Some(engine)) = (self.reading_error.take(), self.engine.clone()) else {
            return;
        };
        let Ok(mut engine) = engine.try_borrow_mut() else {
            return;
        };
        judge(
            &mut engine,
            reading.sent,
            reading.status,
            &reading.headers,
            Some(&reading.body),
        );
    }
}

/// Classifies an upstream response (with its error body when one was read) and records it.
fn judge(
    engine: &mut Engine,
    sent: Assignment,
    status: u16,
    headers: &[(String, Vec<u8>)],
    body: Option<&[u8]>,
) {
    let quota_exhausted = body.is_some_and(hints::is_insufficient_quota);
    let verdict = engine.verdict(sent.profile, status, quota_exhausted);
    let now = host::now_ms();
    let hint_ms = if engine.wants_retry_hint(sent.profile, verdict) {
        let pairs: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        hints::retry_hint_ms(&pairs, body, now)
    } else {
        None
    };
    engine.record(&HostShared, sent, verdict, status, hint_ms, now);
}

fn from_upstream() -> bool {
    host::property(&["response", "code_details"]).is_some_and(|d| d == b"via_upstream")
}

fn strip_gemini_query_key() {
    if let Some(path) = host::request_header(":path") {
        if let Some(stripped) = strip_query_param(&path, "key") {
            host::set_request_header(":path", &stripped);
        }
    }
}
