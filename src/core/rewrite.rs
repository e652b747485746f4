//! Rewriting the `model` of a JSON request body for a fallback pool that serves another model.

use serde_json::Value;

/// The body with its top-level `"model"` set to `model`, or None when the body is not a JSON
/// object (it then goes on unchanged: the provider will say what it thinks of it).
pub fn rewrite_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object_mut()?;
    object.insert("model".to_string(), Value::String(model.to_string()));
    serde_json::to_vec(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_model_and_keeps_everything_else() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi \u00e9"}],"stream":true}"#;
        let out: Value = serde_json::from_slice(&rewrite_model(body, "claude-3").unwrap()).unwrap();
        assert_eq!(out["model"], "claude-3");
        assert_eq!(out["messages"][0]["content"], "hi é");
        assert_eq!(out["stream"], true);
        let added: Value =
            serde_json::from_slice(&rewrite_model(br#"{"messages":[]}"#, "m").unwrap()).unwrap();
        assert_eq!(added["model"], "m");
    }

    #[test]
    fn leaves_anything_else_alone() {
        for body in [
            &b""[..],
            b"[1,2]",
            b"not json",
            b"\xff\xfe",
            b"{\"model\":",
            b"\"str\"",
        ] {
            assert_eq!(rewrite_model(body, "m"), None);
        }
    }
}
