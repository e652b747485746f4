//! HTTP layer: the router, the provider handler and the `/_mock/` control API.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State as AxState};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde_json::{json, Value};

use crate::config::{self, Config};
use crate::state::{lock, openai_error, unix_ms, LogEntry, Plan, PlanBody, Shared};
use crate::util::{extract_key, key_hint};

/// Largest provider request body read; larger ones get 413.
const MAX_BODY: usize = 32 * 1024 * 1024;

pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/_mock/health", get(|| async { "ok" }))
        .route("/_mock/keys", get(get_keys).put(put_keys))
        .route(
            "/_mock/keys/{key}/script",
            post(post_script).delete(delete_script),
        )
        .route("/_mock/keys/{key}/always", put(put_always))
        .route("/_mock/requests", get(get_requests).delete(delete_requests))
        .route("/_mock/stats", get(get_stats))
        .fallback(provider)
        .with_state(shared)
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    json_text_response(status, value.to_string())
}

fn json_text_response(status: StatusCode, text: String) -> Response {
    let mut resp = Response::new(Body::from(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn bad_request(message: String) -> Response {
    json_response(StatusCode::BAD_REQUEST, &json!({"error": message}))
}

/// Set by the unit tests to keep their output clean.
static QUIET: AtomicBool = AtomicBool::new(false);

fn log_line(method: &Method, path: &str, key: Option<&str>, status: u16, seq: u64) {
    if QUIET.load(Ordering::Relaxed) {
        return;
    }
    // Never print a key: only a short hint. Never panic if stderr is gone.
    let _ = writeln!(
        std::io::stderr(),
        "{method} {path} key={} -> {status} #{seq}",
        key_hint(key)
    );
}

/// Every path not under `/_mock/`, any method: the fake LLM API.
async fn provider(AxState(shared): AxState<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if parts.uri.path().starts_with("/_mock/") {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("unknown control endpoint {}", parts.uri.path())}),
        );
    }
    let body = axum::body::to_bytes(body, MAX_BODY).await;
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    let mut headers = BTreeMap::<String, String>::new();
    for (name, value) in &parts.headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_string())
            .and_modify(|acc| {
                acc.push_str(", ");
                acc.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }

    let now = Instant::now();
    let (seq, key, plan, chunk_delay_ms) = {
        let mut st = lock(&shared);
        let key = extract_key(&parts.headers, parts.uri.query(), &st.extra_key_headers);
        let seq = st.record(LogEntry {
            seq: 0,
            method: parts.method.to_string(),
            path,
            headers,
            body: body
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
            key: key.clone(),
            status: None,
            time_ms: unix_ms(),
        });
        let plan = match &body {
            Ok(b) => st.decide_tokens(key.as_deref(), crate::state::request_tokens(b), now),
            Err(e) => Plan {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                headers: Vec::new(),
                body: PlanBody::Json(openai_error(
                    &format!("could not read request body: {e}"),
                    "invalid_request_error",
                    None,
                )),
                delay_ms: 0,
            },
        };
        (seq, key, plan, st.stream_chunk_delay_ms)
    };

    if plan.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(plan.delay_ms)).await;
    }

    let (model, stream) = match &body {
        Ok(b) => request_model_and_stream(b),
        Err(_) => (None, false),
    };
    let status = plan.status;
    let mut resp = match plan.body {
        PlanBody::Json(text) => json_text_response(status, text),
        PlanBody::Text(t) => {
            let mut r = Response::new(Body::from(t));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        PlanBody::Completion if stream => sse_completion(model, chunk_delay_ms),
        PlanBody::Completion => json_text_response(status, completion(model)),
    };
    *resp.status_mut() = status;
    for (name, value) in plan.headers {
        resp.headers_mut().insert(name, value);
    }
    resp.headers_mut()
        .insert("x-mock-request-id", HeaderValue::from(seq));

    lock(&shared).set_status(seq, status.as_u16());
    log_line(
        &parts.method,
        parts.uri.path(),
        key.as_deref(),
        status.as_u16(),
        seq,
    );
    resp
}

/// `model` and `stream` from a JSON request body; anything else is ignored.
fn request_model_and_stream(body: &[u8]) -> (Option<String>, bool) {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => (
            v.get("model").and_then(Value::as_str).map(str::to_string),
            v.get("stream").and_then(Value::as_bool).unwrap_or(false),
        ),
        Err(_) => (None, false),
    }
}

/// A JSON string literal (quoted and escaped).
fn json_str(s: &str) -> String {
    Value::from(s).to_string()
}

/// The chat completion, fields in OpenAI's order (hence not via `json!`).
fn completion(model: Option<String>) -> String {
    let model = json_str(model.as_deref().unwrap_or("mock-model"));
    format!(
        concat!(
            r#"{{"id":"chatcmpl-mock","object":"chat.completion","model":{},"#,
            r#""choices":[{{"index":0,"message":{{"role":"assistant","content":"hello from mock"}},"#,
            r#""finish_reason":"stop"}}],"#,
            r#""usage":{{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}}}"#
        ),
        model
    )
}

fn sse_completion(model: Option<String>, chunk_delay_ms: u64) -> Response {
    let model = json_str(model.as_deref().unwrap_or("mock-model"));
    let mut events: Vec<Bytes> = ["hello", " from", " mock"]
        .iter()
        .map(|word| {
            Bytes::from(format!(
                concat!(
                    r#"data: {{"id":"chatcmpl-mock","object":"chat.completion.chunk","model":{},"#,
                    r#""choices":[{{"index":0,"delta":{{"content":{}}}}}]}}"#,
                    "\n\n"
                ),
                model,
                json_str(word)
            ))
        })
        .collect();
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let delay = Duration::from_millis(chunk_delay_ms);
    let stream = futures_util::stream::unfold((0usize, events), move |(i, events)| async move {
        let event = events.get(i)?.clone();
        if i > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, Infallible>(event), (i + 1, events)))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn get_keys(AxState(shared): AxState<Shared>) -> Response {
    let view = lock(&shared).view(Instant::now());
    json_response(StatusCode::OK, &view)
}

async fn put_keys(AxState(shared): AxState<Shared>, body: Bytes) -> Response {
    match Config::parse(&body) {
        Ok(cfg) => {
            let view = {
                let mut st = lock(&shared);
                st.apply(cfg);
                st.view(Instant::now())
            };
            json_response(StatusCode::OK, &view)
        }
        Err(e) => bad_request(e),
    }
}

async fn post_script(
    AxState(shared): AxState<Shared>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    match config::parse_entries(&body) {
        Ok(entries) => {
            let len = {
                let mut st = lock(&shared);
                let ks = st.keys.entry(key.clone()).or_default();
                ks.script.extend(entries);
                ks.script.len()
            };
            json_response(StatusCode::OK, &json!({"key": key, "scriptLength": len}))
        }
        Err(e) => bad_request(e),
    }
}

async fn delete_script(AxState(shared): AxState<Shared>, Path(key): Path<String>) -> Response {
    if let Some(ks) = lock(&shared).keys.get_mut(&key) {
        ks.script.clear();
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn put_always(
    AxState(shared): AxState<Shared>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    match config::parse_always(&body) {
        Ok(entry) => {
            let always = {
                let mut st = lock(&shared);
                match entry {
                    Some(e) => {
                        let ks = st.keys.entry(key.clone()).or_default();
                        ks.always = Some(e);
                        json!(ks.always)
                    }
                    None => {
                        if let Some(ks) = st.keys.get_mut(&key) {
                            ks.always = None;
                        }
                        Value::Null
                    }
                }
            };
            json_response(StatusCode::OK, &json!({"key": key, "always": always}))
        }
        Err(e) => bad_request(e),
    }
}

async fn get_requests(AxState(shared): AxState<Shared>) -> Response {
    let log = json!(lock(&shared).log);
    json_response(StatusCode::OK, &log)
}

async fn delete_requests(AxState(shared): AxState<Shared>) -> Response {
    lock(&shared).log.clear();
    StatusCode::NO_CONTENT.into_response()
}

async fn get_stats(AxState(shared): AxState<Shared>) -> Response {
    let stats = lock(&shared).stats();
    json_response(StatusCode::OK, &stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::state;
    use std::io::Read;
    use std::net::TcpStream;

    /// Starts the server on a free loopback port in its own runtime thread.
    fn start(config: Config) -> u16 {
        QUIET.store(true, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap().port()).unwrap();
                axum::serve(listener, router(state::shared(config)))
                    .await
                    .unwrap();
            });
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }
        fn json(&self) -> Value {
            serde_json::from_str(&self.body).unwrap()
        }
    }

    /// A minimal HTTP/1.1 client: raw request bytes, `Connection: close`.
    fn http(port: u16, method: &str, path: &str, headers: &[(&str, &[u8])], body: &str) -> Reply {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
            body.len()
        )
        .into_bytes();
        for (k, v) in headers {
            req.extend_from_slice(k.as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(v);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body.as_bytes());
        s.write_all(&req).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, rest) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    fn dechunk(mut s: &str) -> String {
        let mut out = String::new();
        loop {
            let (size, rest) = s.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                return out;
            }
            out.push_str(&rest[..size]);
            s = &rest[size + 2..];
        }
    }

    const CHAT: &str = r#"{"model":"gpt-x","messages":[]}"#;

    #[test]
    fn limit_then_429_and_script_consumption() {
        let port = start(Config::default());
        let cfg = r#"{"keys":{"k1":{"limit":2,"windowMs":60000},"k2":{"script":[{"status":503},{"status":429,"headers":{"retry-after":"1"}}]}}}"#;
        assert_eq!(http(port, "PUT", "/_mock/keys", &[], cfg).status, 200);

        let auth: &[(&str, &[u8])] = &[("authorization", b"Bearer k1")];
        let r = http(port, "POST", "/v1/chat/completions", auth, CHAT);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["model"], "gpt-x");
        assert_eq!(
            r.json()["choices"][0]["message"]["content"],
            "hello from mock"
        );
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("1"));
        assert_eq!(r.header("x-mock-request-id"), Some("1"));
        let r = http(port, "POST", "/v1/chat/completions", auth, CHAT);
        assert_eq!(
            (r.status, r.header("x-ratelimit-remaining-requests")),
            (200, Some("0"))
        );
        let r = http(port, "POST", "/v1/chat/completions", auth, CHAT);
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after"), Some("60"));
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
        assert!(r
            .header("x-ratelimit-reset-requests")
            .unwrap()
            .ends_with('s'));
        assert!(r.header("retry-after-ms").unwrap().parse::<u64>().unwrap() > 59_000);
        assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");

        // Script entries are consumed in order, then the key answers 200.
        let k2: &[(&str, &[u8])] = &[("x-api-key", b"k2")];
        let r = http(port, "POST", "/v1/messages", k2, "not json");
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"]["type"], "server_error");
        let r = http(port, "POST", "/v1/messages", k2, CHAT);
        assert_eq!((r.status, r.header("retry-after")), (429, Some("1")));
        let r = http(port, "POST", "/v1/messages", k2, "not json");
        assert_eq!(
            (r.status, r.json()["model"].as_str()),
            (200, Some("mock-model"))
        );

        // Mid-test changes: `always`, then cleared; more script appended.
        let always = http(
            port,
            "PUT",
            "/_mock/keys/k2/always",
            &[],
            r#"{"status":401}"#,
        );
        assert_eq!(always.status, 200);
        for _ in 0..2 {
            let r = http(port, "POST", "/v1/messages", k2, CHAT);
            assert_eq!(
                (r.status, r.json()["error"]["code"].as_str()),
                (401, Some("invalid_api_key"))
            );
        }
        assert_eq!(
            http(port, "PUT", "/_mock/keys/k2/always", &[], "null").status,
            200
        );
        let s = http(
            port,
            "POST",
            "/_mock/keys/k2/script",
            &[],
            r#"[{"status":500,"body":{"z": 1, "a": [2]}}]"#,
        );
        assert_eq!(s.json()["scriptLength"], 1);
        let r = http(port, "POST", "/v1/messages", k2, CHAT);
        assert_eq!((r.status, r.body.as_str()), (500, r#"{"z": 1, "a": [2]}"#));
        assert_eq!(http(port, "POST", "/v1/messages", k2, CHAT).status, 200);

        // Unknown and missing keys.
        let r = http(
            port,
            "POST",
            "/v1/embeddings",
            &[("api-key", b"nope")],
            CHAT,
        );
        assert_eq!(
            (r.status, r.json()["error"]["message"].as_str()),
            (401, Some("Incorrect API key provided"))
        );
        let r = http(port, "POST", "/v1/embeddings", &[], CHAT);
        assert_eq!(
            r.body,
            r#"{"error":{"message":"missing API key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#
        );
        assert_eq!(
            (r.status, r.json()["error"]["message"].as_str()),
            (401, Some("missing API key"))
        );

        // Request log and stats.
        let log = http(port, "GET", "/_mock/requests", &[], "").json();
        let log = log.as_array().unwrap();
        assert_eq!(log.len(), 12);
        assert_eq!(log[0]["seq"], 1);
        assert_eq!(log[0]["key"], "k1");
        assert_eq!(log[0]["status"], 200);
        assert_eq!(log[0]["headers"]["authorization"], "Bearer k1");
        assert_eq!(log[0]["body"], CHAT);
        assert_eq!(log[11]["key"], Value::Null);
        let stats = http(port, "GET", "/_mock/stats", &[], "").json();
        assert_eq!(stats["total"], 12);
        assert_eq!(stats["by_key"]["k1"]["received"], 3);
        assert_eq!(stats["by_key"]["k1"]["status"]["429"], 1);
        assert_eq!(stats["by_key"]["k2"]["status"]["401"], 2);
        assert_eq!(http(port, "DELETE", "/_mock/requests", &[], "").status, 204);
        assert_eq!(
            http(port, "GET", "/_mock/stats", &[], "").json()["total"],
            0
        );
    }

    #[test]
    fn streams_sse_and_survives_odd_input() {
        let port = start(Config::default());
        assert_eq!(http(port, "GET", "/_mock/health", &[], "").body, "ok");
        let r = http(
            port,
            "POST",
            "/v1/chat/completions?key=q",
            &[],
            r#"{"model":"m1","stream":true}"#,
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let events: Vec<&str> = r.body.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 4);
        let first: Value = serde_json::from_str(events[0].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(first["model"], "m1");
        assert_eq!(first["choices"][0]["delta"]["content"], "hello");
        assert_eq!(events[3], "data: [DONE]");
        assert_eq!(
            events[1],
            r#"data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","model":"m1","choices":[{"index":0,"delta":{"content":" from"}}]}"#
        );
        let r = http(
            port,
            "POST",
            "/v1/chat/completions",
            &[],
            r#"{"model":"a\"b"}"#,
        );
        assert_eq!(
            r.body,
            r#"{"id":"chatcmpl-mock","object":"chat.completion","model":"a\"b","choices":[{"index":0,"message":{"role":"assistant","content":"hello from mock"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}"#
        );

        // Non-UTF-8 header bytes, bad JSON: no panic, 400 on control calls.
        let r = http(
            port,
            "POST",
            "/v1/chat/completions",
            &[("x-api-key", b"\xff\xfek")],
            "\x01",
        );
        assert_eq!(r.status, 200);
        let log = http(port, "GET", "/_mock/requests", &[], "").json();
        assert_eq!(log[2]["headers"]["x-api-key"], "\u{fffd}\u{fffd}k");
        assert_eq!(log[0]["key"], "q");
        assert_eq!(log[0]["path"], "/v1/chat/completions?key=q");
        assert_eq!(http(port, "PUT", "/_mock/keys", &[], "{").status, 400);
        assert_eq!(
            http(
                port,
                "PUT",
                "/_mock/keys",
                &[],
                r#"{"keys":{"a":{"limit":1}}}"#
            )
            .status,
            400
        );
        assert_eq!(
            http(port, "POST", "/_mock/keys/a/script", &[], "[{]").status,
            400
        );
        assert_eq!(
            http(port, "PUT", "/_mock/keys/a/always", &[], "7").status,
            400
        );
        assert_eq!(http(port, "GET", "/_mock/nope", &[], "").status, 404);
    }
}
