//! What a client may have sent as a credential, and removing it before the request goes upstream.

/// Headers that carry an API key for some provider. A client's value in any of them is dropped:
/// the upstream sees only the pool's key.
pub const CLIENT_CREDENTIAL_HEADERS: [&str; 4] =
    ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// Removes every `name=` parameter from the query of a request path (Gemini accepts `?key=`).
/// Returns None when the path has no such parameter, so the caller writes nothing.
pub fn strip_query_param(path: &[u8], name: &str) -> Option<Vec<u8>> {
    let query_start = path.iter().position(|&b| b == b'?')?;
    let (base, query) = path.split_at(query_start);
    let query = query.get(1..).unwrap_or_default();
    let (query, fragment) = match query.iter().position(|&b| b == b'#') {
        Some(i) => query.split_at(i),
        None => (query, &[][..]),
    };
    let is_target = |param: &[u8]| {
        let key = param.split(|&b| b == b'=').next().unwrap_or_default();
        key == name.as_bytes()
    };
    let params: Vec<&[u8]> = query.split(|&b| b == b'&').collect();
    if !params.iter().any(|p| is_target(p)) {
        return None;
    }
    let kept: Vec<&[u8]> = params
        .into_iter()
        .filter(|p| !p.is_empty() && !is_target(p))
        .collect();
    let mut out = base.to_vec();
    if !kept.is_empty() {
        out.push(b'?');
        out.extend_from_slice(&kept.join(&b'&'));
    }
    out.extend_from_slice(fragment);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_the_named_parameter() {
        let table: &[(&str, Option<&str>)] = &[
            ("/v1beta/models/m:generateContent", None),
            ("/v1beta/models/m:generateContent?alt=sse", None),
            (
                "/v1beta/models/m:generateContent?key=abc",
                Some("/v1beta/models/m:generateContent"),
            ),
            ("/m?key=abc&alt=sse", Some("/m?alt=sse")),
            ("/m?alt=sse&key=abc", Some("/m?alt=sse")),
            ("/m?alt=sse&key=abc&key=def&x=1", Some("/m?alt=sse&x=1")),
            ("/m?key", Some("/m")),
            ("/m?keys=1", None),
            ("/m?monkey=1", None),
            ("/m?key=a#frag", Some("/m#frag")),
            ("?key=a", Some("")),
        ];
        for (path, want) in table {
            let got =
                strip_query_param(path.as_bytes(), "key").map(|v| String::from_utf8(v).unwrap());
            assert_eq!(got.as_deref(), *want, "{path}");
        }
    }

    #[test]
    fn survives_non_utf8() {
        assert_eq!(
            strip_query_param(b"/m?\xff=1&key=\xfe", "key"),
            Some(b"/m?\xff=1".to_vec())
        );
    }
}
