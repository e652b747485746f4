//! A request's way to its key, the same from every host: what its arrival says (`arrive`), and
//! putting the chosen key on it (`put_key`): which client credentials go,
//! the key header, the pool header a route may match, Gemini's `?key=`, a fallback's `model`
//! rewrite, the cluster learned for health checks and re-sends, and what the request remembers
//! for its later callbacks (the key, the upstream attempt or the `retryOnFailure` state).
//!
//! The decisions are made here; a host only carries them out through [`RequestHeaders`], each
//! the way its host calls cost least (a native call into Envoy costs about 2,500 instructions, so
//! the native host looks at the header map once and removes only what is there; wasm removes
//! blindly).

use crate::core::affinity;
use crate::core::config::Provider;
use crate::core::credentials::{strip_query_param, CLIENT_CREDENTIAL_HEADERS};
use crate::core::engine::{Ask, Assignment, Engine, Host};
use crate::core::reply::POOL_HEADER;
use crate::core::retry::RetryState;
use crate::core::rules::RequestFacts;
use crate::core::upstream_attempt::{self, Attempt, REQUEST_ID_HEADER};
use crate::core::waiting::Arrival;

/// The request's headers as the host can read and change them, in the request-headers phase.
/// `RequestFacts::cluster_name` names the cluster the request is routed to.
pub trait RequestHeaders: RequestFacts {
    fn get(&mut self, name: &str) -> Option<Vec<u8>>;
    /// False: the host refused the write.
    fn set(&mut self, name: &str, value: &[u8]) -> bool;
    fn remove(&mut self, name: &str);
    /// Which of `names` the request may carry. A host whose removal of an absent header costs no
    /// more than a look says all of them, and so removes blindly.
    fn which_present<const N: usize>(&mut self, names: [&'static str; N]) -> [bool; N];
    /// The pool header was set or removed: Envoy must select the route again. Envoy's wasm host
    /// does that on every request-header change by itself.
    fn reselect_route(&mut self);
    /// Every request header, names lowercase: what a `retryOnFailure` re-send sends again.
    fn all(&mut self) -> Vec<(String, Vec<u8>)>;
}

/// What a keyed request remembers for its later callbacks.
#[derive(Default)]
pub struct Keyed {
    /// The key the request (or attempt) went out with, until its response is judged.
    pub chosen: Option<Assignment>,
    /// Upstream mode: this attempt of Envoy's route retry.
    pub attempt: Option<Attempt>,
    /// Downstream `retryOnFailure`: the request kept for re-sends.
    pub retry: Option<RetryState>,
    /// A fallback pool's `model`: the request body is held until complete and rewritten to it.
    pub rewrite_to: Option<String>,
}

/// Logged once per engine, when the host has learned where its filter runs.
pub fn log_mode(upstream: bool) {
    log::info!(
        "running as {} filter",
        if upstream {
            "an upstream (per retry attempt)"
        } else {
            "a downstream"
        }
    );
}

/// What a request brings to the key choice, read as it arrives: its profile, and only what that
/// profile needs (the request id upstream, the session header with `affinity`).
pub fn arrive(
    engine: &Engine,
    request: &mut impl RequestHeaders,
    upstream: bool,
    end_of_stream: bool,
) -> Arrival {
    let profile = engine.profile_for(request);
    // Some pool has fallbacks, so a route may match the pool header: a value a client sent
    // must not reach the upstream or pick a route, whether or not this request is keyed.
    let drop_pool_header = engine.config().has_fallbacks;
    // Upstream mode: Envoy's retry attempts of one request share its x-request-id.
    let request_id = if upstream {
        request.get(REQUEST_ID_HEADER).map(header_text)
    } else {
        None
    };
    let avoid = upstream_attempt::failed_before(engine, request_id.as_deref());
    // One header read, only where `affinity` is configured; the value is only hashed.
    let session = profile
        .and_then(|p| engine.affinity_header(p))
        .and_then(|name| request.get(name))
        .map(|value| affinity::session_hash(&value));
    Arrival {
        profile,
        upstream,
        request_id,
        avoid,
        ask: Ask { session },
        end_of_stream,
        drop_pool_header,
    }
}

/// A request the filter does not key: a pool header a client sent is removed when some pool has
/// fallbacks (`drop_pool_header`). Looked for first: it is almost never there, and a look that
/// finds nothing leaves Envoy's route cache alone, where a removal makes Envoy select the route
/// again.
pub fn pass_untouched(request: &mut impl RequestHeaders, drop_pool_header: bool) {
    if drop_pool_header && request.get(POOL_HEADER).is_some() {
        request.remove(POOL_HEADER);
        request.reselect_route();
    }
}

/// Puts `assignment`'s key on the request that arrived as `arrival`, and returns what the
/// request must remember.
pub fn put_key(
    engine: &mut Engine,
    host: &dyn Host,
    request: &mut impl RequestHeaders,
    arrival: Arrival,
    assignment: Assignment,
) -> Keyed {
    let mut keyed = Keyed::default();
    let Some((auth_name, auth_value)) = engine.key_header(assignment.profile, assignment.key)
    else {
        pass_untouched(request, arrival.drop_pool_header);
        return keyed;
    };
    // The key header itself is overwritten below, not removed first: one host call fewer.
    let present = request.which_present(CLIENT_CREDENTIAL_HEADERS);
    for (&name, &here) in CLIENT_CREDENTIAL_HEADERS.iter().zip(present.iter()) {
        if here && name != auth_name {
            request.remove(name);
        }
    }
    if !request.set(auth_name, auth_value.as_bytes()) {
        log::warn!("could not set the {auth_name} header");
    }
    let primary = arrival.profile.and_then(|p| engine.profile(p));
    let has_chain = primary.is_some_and(|p| !p.fallbacks.is_empty());
    let retry_enabled = primary.is_some_and(|p| p.retry.enabled);
    if has_chain {
        // The operator's route on this header sends a fallback pool to its provider; the
        // primary's name is set too, so a client cannot pick a route itself.
        if let Some((_, label)) = engine.pool_of(assignment.profile) {
            request.set(POOL_HEADER, label.as_bytes());
            request.reselect_route();
        }
    } else if arrival.drop_pool_header {
        // Unread: after the key header's write a removal costs no more than a look would.
        request.remove(POOL_HEADER);
        request.reselect_route();
    }
    let used = engine.profile(assignment.profile);
    if used.is_some_and(|p| p.provider == Provider::Gemini) {
        if let Some(path) = request.get(":path") {
            if let Some(stripped) = strip_query_param(&path, "key") {
                request.set(":path", &stripped);
            }
        }
    }
    if let Some(model) = used.and_then(|p| p.model.clone()) {
        if !arrival.end_of_stream {
            // The body grows or shrinks: let Envoy frame it anew.
            request.remove("content-length");
            keyed.rewrite_to = Some(model);
        }
    }
    if engine.wants_target(assignment.profile) {
        // Learned once per engine and pool (after the pool header re-selected the route), so
        // health checks and re-sends into this pool know its cluster.
        let authority = request
            .get(":authority")
            .map(header_text)
            .unwrap_or_default();
        if let Some(cluster) = request.cluster_name() {
            engine.learn_target(host, assignment.profile, &cluster, &authority);
        }
    }
    if arrival.upstream {
        keyed.attempt = Some(Attempt::keyed(
            engine,
            assignment,
            arrival.request_id,
            &arrival.avoid,
        ));
    } else if let (true, Some(primary_profile)) = (retry_enabled, arrival.profile) {
        keyed.retry = Some(RetryState::new(
            engine,
            primary_profile,
            assignment,
            request.all(),
            arrival.end_of_stream,
        ));
    }
    keyed.chosen = Some(assignment);
    keyed
}

/// A header value or property as text. Keeps the host's buffer when it is UTF-8, as it almost
/// always is: no second allocation.
pub fn header_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::engine::tests::{NoFacts, TestHost};
    use crate::core::engine::{Ask, Clock, Decision};
    use crate::core::status::{FailureClass, Verdict};

    /// A request's headers as a host keeps them, with every host call written down.
    struct FakeRequest {
        headers: Vec<(String, Vec<u8>)>,
        /// Says every credential header may be there, as the wasm host does.
        blind: bool,
        cluster: Option<String>,
        calls: Vec<String>,
    }

    impl FakeRequest {
        fn new(headers: &[(&str, &str)]) -> Self {
            FakeRequest {
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                    .collect(),
                blind: false,
                cluster: Some("provider".to_string()),
                calls: Vec::new(),
            }
        }
        fn value(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| std::str::from_utf8(v).unwrap())
        }
        fn called(&self, call: &str) -> bool {
            self.calls.iter().any(|c| c == call)
        }
    }

    impl RequestFacts for FakeRequest {
        fn route_name(&mut self) -> Option<String> {
            None
        }
        fn cluster_name(&mut self) -> Option<String> {
            self.calls.push("cluster".to_string());
            self.cluster.clone()
        }
        fn host(&mut self) -> Option<String> {
            None
        }
    }

    impl RequestHeaders for FakeRequest {
        fn get(&mut self, name: &str) -> Option<Vec<u8>> {
            self.calls.push(format!("get {name}"));
            self.value(name).map(|v| v.as_bytes().to_vec())
        }
        fn set(&mut self, name: &str, value: &[u8]) -> bool {
            self.calls.push(format!("set {name}"));
            self.headers.retain(|(n, _)| n != name);
            self.headers.push((name.to_string(), value.to_vec()));
            true
        }
        fn remove(&mut self, name: &str) {
            self.calls.push(format!("remove {name}"));
            self.headers.retain(|(n, _)| n != name);
        }
        fn which_present<const N: usize>(&mut self, names: [&'static str; N]) -> [bool; N] {
            names.map(|name| self.blind || self.headers.iter().any(|(n, _)| n == name))
        }
        fn reselect_route(&mut self) {
            self.calls.push("reselect".to_string());
        }
        fn all(&mut self) -> Vec<(String, Vec<u8>)> {
            self.headers.clone()
        }
    }

    struct Setup {
        host: TestHost,
        engine: Engine,
        profile: Option<usize>,
    }

    fn setup(json: &str) -> Setup {
        let host = TestHost::default();
        let mut engine = Engine::new(crate::core::config::parse(json.as_bytes()).unwrap(), 1);
        engine.start(&host, 0);
        let profile = engine.profile_for(&mut NoFacts);
        Setup {
            host,
            engine,
            profile,
        }
    }

    impl Setup {
        fn arrival(&self, upstream: bool, end_of_stream: bool) -> Arrival {
            Arrival {
                profile: self.profile,
                upstream,
                request_id: upstream.then(|| "r1".to_string()),
                avoid: Vec::new(),
                ask: Ask::default(),
                end_of_stream,
                drop_pool_header: self.engine.config().has_fallbacks,
            }
        }
        fn assignment(&mut self) -> Assignment {
            match self
                .engine
                .decide(&self.host, self.profile, &Clock::at(0), &[])
            {
                Decision::UseKey(a) => a,
                other => panic!("expected a key, got {other:?}"),
            }
        }
        fn key(&mut self, request: &mut FakeRequest, arrival: Arrival) -> (Assignment, Keyed) {
            let a = self.assignment();
            let keyed = put_key(&mut self.engine, &self.host, request, arrival, a);
            (a, keyed)
        }
    }

    #[test]
    fn a_plain_pool_replaces_the_client_credentials_with_its_key() {
        let mut s = setup(r#"{"name": "main", "apiTokens": ["sk-a"]}"#);
        let mut request = FakeRequest::new(&[
            ("authorization", "Bearer client"),
            ("x-api-key", "client"),
            (POOL_HEADER, "other"),
        ]);
        let arrival = s.arrival(false, false);
        let (a, keyed) = s.key(&mut request, arrival);
        assert_eq!(request.value("authorization"), Some("Bearer sk-a"));
        assert_eq!(request.value("x-api-key"), None);
        // Only what was there is removed, and the key header is overwritten, not removed.
        assert!(!request.called("remove api-key") && !request.called("remove authorization"));
        // No pool has fallbacks: the pool header means nothing to routes and is left alone.
        assert_eq!(request.value(POOL_HEADER), Some("other"));
        assert!(!request.called("reselect"));
        assert_eq!(keyed.chosen, Some(a));
        assert!(keyed.attempt.is_none() && keyed.retry.is_none() && keyed.rewrite_to.is_none());
    }

    #[test]
    fn a_blind_host_removes_every_other_credential_header() {
        let mut s = setup(r#"{"apiTokens": ["sk-a"], "provider": "anthropic"}"#);
        let mut request = FakeRequest::new(&[]);
        request.blind = true;
        let arrival = s.arrival(false, false);
        s.key(&mut request, arrival);
        for name in ["authorization", "api-key", "x-goog-api-key"] {
            assert!(request.called(&format!("remove {name}")), "{name}");
        }
        assert!(!request.called("remove x-api-key"));
        assert_eq!(request.value("x-api-key"), Some("sk-a"));
    }

    const CHAIN: &str = r#"{"name": "main", "apiTokens": ["sk-a"],
        "fallbacks": [{"name": "backup", "apiTokens": ["sk-b"], "model": "small"}]}"#;

    #[test]
    fn a_profile_with_fallbacks_names_the_pool_that_serves_and_reselects_the_route() {
        let mut s = setup(CHAIN);
        let mut request = FakeRequest::new(&[(POOL_HEADER, "backup")]);
        let arrival = s.arrival(false, false);
        let (_, keyed) = s.key(&mut request, arrival);
        assert_eq!(
            request.value(POOL_HEADER),
            Some("main"),
            "the client's value is replaced"
        );
        assert!(request.called("reselect"));
        // The primary has no model: its body is not touched.
        assert!(keyed.rewrite_to.is_none());
        assert!(!request.called("remove content-length"));
    }

    #[test]
    fn a_fallback_with_a_model_drops_content_length_and_remembers_the_rewrite() {
        let mut s = setup(CHAIN);
        let main_key = s.assignment();
        s.engine.answered(
            &s.host,
            main_key,
            Verdict::KeyFailure(FailureClass::RateLimit),
            429,
            None,
            0,
        );
        let mut request = FakeRequest::new(&[("content-length", "42")]);
        let arrival = s.arrival(false, false);
        let (a, keyed) = s.key(&mut request, arrival);
        assert_eq!(s.engine.pool_of(a.profile).map(|(_, l)| l), Some("backup"));
        assert_eq!(request.value(POOL_HEADER), Some("backup"));
        assert_eq!(request.value("authorization"), Some("Bearer sk-b"));
        assert_eq!(request.value("content-length"), None);
        assert_eq!(keyed.rewrite_to.as_deref(), Some("small"));
        // A request without a body has nothing to rewrite.
        let mut bodiless = FakeRequest::new(&[("content-length", "0")]);
        let arrival = s.arrival(false, true);
        let (_, keyed) = s.key(&mut bodiless, arrival);
        assert_eq!(bodiless.value("content-length"), Some("0"));
        assert!(keyed.rewrite_to.is_none());
    }

    #[test]
    fn without_fallbacks_a_client_pool_header_is_removed_when_some_route_may_match_it() {
        // The global part has no fallbacks, a rule does: routes may match the header.
        let mut s = setup(
            r#"{"name": "main", "apiTokens": ["sk-a"], "_rules_": [{"_match_route_": ["r"],
                "name": "ruled", "apiTokens": ["sk-r"], "fallbacks": [{"name": "fb", "apiTokens": ["sk-f"]}]}]}"#,
        );
        let mut request = FakeRequest::new(&[(POOL_HEADER, "fb")]);
        let arrival = s.arrival(false, false);
        assert!(arrival.drop_pool_header);
        s.key(&mut request, arrival);
        assert_eq!(request.value(POOL_HEADER), None);
        assert!(request.called("reselect"));
        // Unkeyed requests lose it too, and one without it costs only the look.
        let mut untouched = FakeRequest::new(&[(POOL_HEADER, "fb")]);
        pass_untouched(&mut untouched, true);
        assert_eq!(untouched.value(POOL_HEADER), None);
        let mut clean = FakeRequest::new(&[]);
        pass_untouched(&mut clean, true);
        assert_eq!(clean.calls, ["get x-ai-key-failover-pool"]);
    }

    #[test]
    fn gemini_strips_the_client_key_from_the_query() {
        let mut s = setup(r#"{"apiTokens": ["sk-a"], "provider": "gemini"}"#);
        let mut request = FakeRequest::new(&[(
            ":path",
            "/v1beta/models/m:generateContent?key=client&alt=sse",
        )]);
        let arrival = s.arrival(false, false);
        s.key(&mut request, arrival);
        assert_eq!(
            request.value(":path"),
            Some("/v1beta/models/m:generateContent?alt=sse")
        );
        assert_eq!(request.value("x-goog-api-key"), Some("sk-a"));
        // Any other provider leaves the path alone.
        let mut s = setup(r#"{"apiTokens": ["sk-a"]}"#);
        let mut request = FakeRequest::new(&[(":path", "/v1/chat?key=x")]);
        let arrival = s.arrival(false, false);
        s.key(&mut request, arrival);
        assert!(!request.called("get :path"));
    }

    #[test]
    fn the_target_is_learned_from_the_first_keyed_request_only() {
        let mut s = setup(r#"{"apiTokens": ["sk-a"]}"#);
        let profile = s.profile.unwrap();
        let mut first = FakeRequest::new(&[(":authority", "api.example.com")]);
        let arrival = s.arrival(false, false);
        s.key(&mut first, arrival);
        assert!(first.called("cluster"));
        assert_eq!(
            s.engine.cluster_for(&s.host, profile).as_deref(),
            Some("provider")
        );
        let mut second = FakeRequest::new(&[(":authority", "api.example.com")]);
        let arrival = s.arrival(false, false);
        s.key(&mut second, arrival);
        assert!(!second.called("cluster") && !second.called("get :authority"));
    }

    #[test]
    fn upstream_mode_remembers_the_attempt_and_downstream_retry_the_request() {
        let json = r#"{"apiTokens": ["sk-a", "sk-b"], "retryOnFailure": {"enabled": true}}"#;
        let mut s = setup(json);
        let mut request = FakeRequest::new(&[("x-request-id", "r1")]);
        let arrival = s.arrival(true, false);
        let (_, keyed) = s.key(&mut request, arrival);
        assert!(
            keyed.attempt.is_some(),
            "upstream: Envoy retries, per attempt"
        );
        assert!(keyed.retry.is_none(), "no re-sends of our own upstream");
        let mut request = FakeRequest::new(&[("content-type", "application/json")]);
        let arrival = s.arrival(false, false);
        let (_, keyed) = s.key(&mut request, arrival);
        assert!(keyed.attempt.is_none());
        assert!(keyed.retry.is_some(), "downstream with retryOnFailure");
        // Without retryOnFailure, nothing is kept for a re-send.
        let mut s = setup(r#"{"apiTokens": ["sk-a"]}"#);
        let arrival = s.arrival(false, false);
        let (_, keyed) = s.key(&mut FakeRequest::new(&[]), arrival);
        assert!(keyed.retry.is_none() && keyed.attempt.is_none());
    }

    #[test]
    fn an_arrival_reads_only_what_its_profile_needs() {
        let mut s = setup(r#"{"apiTokens": ["sk-a", "sk-b"]}"#);
        let mut request = FakeRequest::new(&[("x-request-id", "r1"), ("x-session", "u")]);
        let downstream = arrive(&s.engine, &mut request, false, true);
        assert_eq!(downstream.profile, s.profile);
        assert!(downstream.request_id.is_none() && downstream.ask.session.is_none());
        assert!(downstream.end_of_stream && !downstream.upstream && !downstream.drop_pool_header);
        assert!(request.calls.is_empty(), "{:?}", request.calls);
        // Upstream, the request id names the attempts, and the keys they failed with are avoided.
        let first = s.assignment();
        s.engine.note_failed_attempt("r1", first, 429, 0);
        let upstream = arrive(&s.engine, &mut request, true, false);
        assert_eq!(upstream.request_id.as_deref(), Some("r1"));
        assert_eq!(upstream.avoid, [(0, first.key)]);
        assert_eq!(request.calls, ["get x-request-id"]);
        // With `affinity`, the session header is read and hashed.
        let s = setup(r#"{"apiTokens": ["sk-a"], "affinity": {"header": "x-session"}}"#);
        let mut request = FakeRequest::new(&[("x-session", "u")]);
        let arrival = arrive(&s.engine, &mut request, false, false);
        assert_eq!(arrival.ask.session, Some(affinity::session_hash(b"u")));
        let mut request = FakeRequest::new(&[]);
        assert_eq!(
            arrive(&s.engine, &mut request, false, false).ask.session,
            None
        );
        let chain = setup(CHAIN);
        assert!(arrive(&chain.engine, &mut FakeRequest::new(&[]), false, false).drop_pool_header);
    }

    #[test]
    fn header_text_keeps_utf8_and_replaces_the_rest() {
        assert_eq!(header_text(b"abc".to_vec()), "abc");
        assert_eq!(header_text(b"a\xffc".to_vec()), "a\u{fffd}c");
    }
}
