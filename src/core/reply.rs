//! What the filter tells a client and a route, the same from every host: the local reply when
//! every key is out, and the names of the headers the filter adds.

/// Names the key that served a request, on the response with `exposeKeyName`.
pub const KEY_NAME_HEADER: &str = "x-ai-key-failover-key";
/// Names the pool that serves a request: on the request, so a route can send a fallback pool's
/// requests to its provider; on the response with `exposeKeyName`.
pub const POOL_HEADER: &str = "x-ai-key-failover-pool";

/// The local reply `onAllUnavailable: reject` sends.
pub struct Rejection {
    pub status: u16,
    /// Envoy's response code details, for access logs.
    pub details: &'static str,
    pub retry_after: String,
    pub content_type: &'static str,
    pub body: String,
}

/// An OpenAI-style error, so SDKs show the message and back off for `retry-after`.
pub fn all_keys_unavailable(retry_after_secs: u64) -> Rejection {
    Rejection {
        status: 429,
        details: "ai_key_failover_all_keys_down",
        retry_after: retry_after_secs.to_string(),
        content_type: "application/json",
        body: format!(
            "{{\"error\":{{\"message\":\"Every upstream API key of this route is cooling down after rate limits or errors; retry after {retry_after_secs} s.\",\"type\":\"rate_limit_error\",\"param\":null,\"code\":\"all_keys_unavailable\"}}}}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rejection_is_json_with_the_wait() {
        let r = all_keys_unavailable(7);
        assert_eq!((r.status, r.retry_after.as_str()), (429, "7"));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "all_keys_unavailable");
        assert!(v["error"]["message"].as_str().unwrap().contains("7 s"));
    }
}
