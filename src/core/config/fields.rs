//! The small typed readers the parser is built from: one JSON value, the field's path for errors,
//! and the default when the field is absent. Each error names the field and says what it must be.

use serde_json::{Map, Value};

use super::ConfigError;

pub(super) fn err<T>(field: &str, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.to_string(),
        message: message.into(),
    })
}

/// A whole number in `min..=max`, or `default` when absent.
pub(super) fn integer(
    v: Option<&Value>,
    field: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let Some(v) = v else {
        return Ok(default);
    };
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => err(
            field,
            format!(
                "must be a whole number from {min} to {max} (got {v}); the default is {default}"
            ),
        ),
    }
}

/// `true` or `false`, or `default` when absent.
pub(super) fn boolean(v: Option<&Value>, field: &str, default: bool) -> Result<bool, ConfigError> {
    match v {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => err(field, "must be true or false"),
    }
}

/// One of the strings `choices` names, or `default` when absent. `message` lists the choices the
/// way the README does, so it is written out rather than built from `choices`.
pub(super) fn one_of<T: Copy>(
    v: Option<&Value>,
    field: &str,
    default: T,
    choices: &[(&str, T)],
    message: &str,
) -> Result<T, ConfigError> {
    let Some(v) = v else {
        return Ok(default);
    };
    let chosen = v
        .as_str()
        .and_then(|s| choices.iter().find(|(name, _)| *name == s));
    match chosen {
        Some(&(_, value)) => Ok(value),
        None => err(field, message),
    }
}

/// A string that `valid` accepts, or None when absent; `message` says what it must be.
pub(super) fn text(
    v: Option<&Value>,
    field: &str,
    valid: fn(&str) -> bool,
    message: &str,
) -> Result<Option<String>, ConfigError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) if valid(s) => Ok(Some(s.clone())),
        Some(_) => err(field, message),
    }
}

/// A section that is an object, or `empty` when absent (every field of it then takes its default).
pub(super) fn section<'v>(
    v: Option<&'v Value>,
    field: &str,
    empty: &'v Map<String, Value>,
) -> Result<&'v Map<String, Value>, ConfigError> {
    match v {
        None => Ok(empty),
        Some(Value::Object(o)) => Ok(o),
        Some(_) => err(field, "must be an object"),
    }
}

/// A list of non-empty strings, each trimmed.
#[inline(never)]
pub(super) fn string_list(v: Option<&Value>, field: &str) -> Result<Vec<String>, ConfigError> {
    let Some(Value::Array(items)) = v else {
        return err(field, "must be a list of strings");
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            _ => err(&format!("{field}[{i}]"), "must be a non-empty string"),
        })
        .collect()
}

/// Refuses a field `allowed` does not list; keys starting with `_` are Higress's and pass.
#[inline(never)]
pub(super) fn check_unknown(
    obj: &Map<String, Value>,
    allowed: &[&str],
    prefix: &str,
) -> Result<(), ConfigError> {
    for key in obj.keys() {
        if !key.starts_with('_') && !allowed.contains(&key.as_str()) {
            return err(
                &format!("{prefix}{key}"),
                format!("unknown field; the fields here are: {}", allowed.join(", ")),
            );
        }
    }
    Ok(())
}

/// A pool or key name: it names stats, so only what a stat name may hold.
pub(super) fn is_valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub(super) fn parse_name(v: &Value, field: &str) -> Result<String, ConfigError> {
    match v.as_str() {
        Some(s) if is_valid_name(s) => Ok(s.to_string()),
        _ => err(
            field,
            "must be 1 to 64 characters of letters, digits, '_' and '-', starting with a letter or digit (it names stats)",
        ),
    }
}

/// An HTTP header name (RFC 9110 token).
pub(super) fn is_header_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A host name or address with an optional port: what an `:authority` may hold.
pub(super) fn is_authority(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
}

/// Printable ASCII without space: what may go into a header value or path unquoted.
pub(super) fn is_visible_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// Printable ASCII, space included: no control character can split a header.
pub(super) fn is_printable_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn boolean_takes_only_true_or_false() {
        assert_eq!(boolean(None, "f", true), Ok(true));
        assert_eq!(boolean(Some(&json!(false)), "f", true), Ok(false));
        for bad in [json!("yes"), json!(1), json!(null)] {
            let e = boolean(Some(&bad), "a.f", false).unwrap_err();
            assert_eq!(e.to_string(), "a.f: must be true or false", "{bad}");
        }
    }

    #[test]
    fn one_of_takes_only_a_listed_string() {
        let choices = [("a", 1), ("b", 2)];
        assert_eq!(one_of(None, "f", 0, &choices, "m"), Ok(0));
        assert_eq!(one_of(Some(&json!("b")), "f", 0, &choices, "m"), Ok(2));
        for bad in [json!("A"), json!("c"), json!(1), json!(["a"])] {
            let e = one_of(Some(&bad), "f", 0, &choices, "must be \"a\" or \"b\"").unwrap_err();
            assert_eq!(e.to_string(), "f: must be \"a\" or \"b\"", "{bad}");
        }
    }

    #[test]
    fn text_takes_a_valid_string_or_nothing() {
        let non_empty: fn(&str) -> bool = |s| !s.is_empty();
        assert_eq!(text(None, "f", non_empty, "m"), Ok(None));
        assert_eq!(
            text(Some(&json!("x")), "f", non_empty, "m"),
            Ok(Some("x".into()))
        );
        for bad in [json!(""), json!(7)] {
            let e = text(Some(&bad), "f", non_empty, "must be x").unwrap_err();
            assert_eq!(e.to_string(), "f: must be x", "{bad}");
        }
    }
}
