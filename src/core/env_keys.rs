//! Keys read from the environment: an `apiTokens` entry `{"fromEnv": "OPENAI_KEYS", ...}` takes
//! its key(s) from that variable when the configuration is loaded, so the key is neither in the
//! filter configuration nor in Envoy's `/config_dump`.
//!
//! Where the variable comes from depends on the host ([`HostEnv`]): the wasm VM sees a variable
//! of Envoy's process only when the filter's `vm_config.environment_variables.host_env_keys`
//! lists it (Istio: `vmConfig.env` with `valueFrom: HOST`; Envoy Gateway: `env.hostKeys`); the
//! native module runs in Envoy's process and reads the variable there. Either way only the
//! variables the configuration names are read, one by one. The lookup is injected
//! ([`Environment`]), so the parser stays a pure function that host tests drive with a map, and
//! an error for a missing or empty variable says how to set it for the host that reads it.
//!
//! One variable may hold a list (a Kubernetes Secret with several keys): items are separated by
//! commas or newlines, and each is trimmed. Empty items (a trailing newline, `a,,b`) are skipped,
//! but a variable that yields no key at all is refused. No error here ever contains the value.

use std::ffi::OsString;

use crate::core::config::ConfigError;

/// The environment `fromEnv` entries are read from.
pub trait Environment {
    /// One variable's value; `None` when it is not set.
    fn var(&self, name: &str) -> Option<OsString>;
    /// Where the variable was looked for, for "is not set …".
    fn looked_in(&self) -> &'static str;
    /// How to get `var` there, for every error about a missing or empty variable.
    fn how_to_pass(&self, var: &str) -> String;
}

pub type EnvLookup<'a> = &'a dyn Environment;

/// The host's own environment, as each host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostEnv {
    /// The wasm VM's: on wasm32-wasip1, what Envoy passed through WASI (`host_env_keys`).
    WasmVm,
    /// The native module's: Envoy's own process environment.
    EnvoyProcess,
}

impl Environment for HostEnv {
    fn var(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }

    fn looked_in(&self) -> &'static str {
        match self {
            HostEnv::WasmVm => "in the plugin's VM",
            HostEnv::EnvoyProcess => "in Envoy's environment",
        }
    }

    fn how_to_pass(&self, var: &str) -> String {
        match self {
            HostEnv::WasmVm => format!(
                "set {var} in Envoy's environment and list it in the wasm filter's \
                 vm_config.environment_variables.host_env_keys: [\"{var}\"] \
                 (Istio: vmConfig.env {{name: {var}, valueFrom: HOST}}; Envoy Gateway: env.hostKeys)"
            ),
            HostEnv::EnvoyProcess => format!(
                "set {var} in the environment Envoy is started with (the container's env, the \
                 service unit's Environment=); the native module reads it there when the \
                 configuration loads"
            ),
        }
    }
}

/// Longer names are refused: a variable name is an identifier, not a place for text.
const MAX_VAR_NAME_LEN: usize = 128;

/// A POSIX-style variable name: letters, digits and `_`, not starting with a digit. The name is
/// quoted in errors and logs, so nothing else is let through.
pub fn is_valid_var_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_VAR_NAME_LEN
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The keys variable `var` holds, in order. `field` names the `apiTokens` entry for errors.
/// The caller validates each key as it validates keys written in the configuration.
pub fn read_keys(env: EnvLookup, var: &str, field: &str) -> Result<Vec<String>, ConfigError> {
    let fail = |message: String| ConfigError {
        field: field.to_string(),
        message,
    };
    if !is_valid_var_name(var) {
        return Err(fail(format!(
            "must name an environment variable: letters, digits and '_', not starting with a digit, \
             at most {MAX_VAR_NAME_LEN} characters"
        )));
    }
    let Some(raw) = env.var(var) else {
        return Err(fail(format!(
            "environment variable {var} is not set {}; {}",
            env.looked_in(),
            env.how_to_pass(var)
        )));
    };
    // Never echo the value, not even part of it: it is a secret, valid or not.
    let Some(text) = raw.to_str() else {
        return Err(fail(format!(
            "environment variable {var} is not valid UTF-8 text; it must hold API keys \
             separated by commas or newlines"
        )));
    };
    let keys: Vec<String> = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        return Err(fail(format!(
            "environment variable {var} is empty (or holds only separators); it must hold at \
             least one API key; {}",
            env.how_to_pass(var)
        )));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host's environment holding exactly `pairs`.
    struct Vars {
        pairs: Vec<(String, OsString)>,
        host: HostEnv,
    }

    impl Environment for Vars {
        fn var(&self, name: &str) -> Option<OsString> {
            self.pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
        fn looked_in(&self) -> &'static str {
            self.host.looked_in()
        }
        fn how_to_pass(&self, var: &str) -> String {
            self.host.how_to_pass(var)
        }
    }

    fn vars_of<V: Into<OsString> + Clone>(pairs: &[(&str, V)], host: HostEnv) -> Vars {
        Vars {
            pairs: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone().into()))
                .collect(),
            host,
        }
    }

    fn env_of(pairs: &[(&str, &str)]) -> Vars {
        vars_of(pairs, HostEnv::WasmVm)
    }

    fn read(pairs: &[(&str, &str)], var: &str) -> Result<Vec<String>, ConfigError> {
        read_keys(&env_of(pairs), var, "apiTokens[0].fromEnv")
    }

    #[test]
    fn one_key_is_read_as_it_is() {
        assert_eq!(read(&[("K", "sk-one")], "K").unwrap(), vec!["sk-one"]);
    }

    #[test]
    fn a_list_splits_on_commas_and_newlines_and_trims_each_item() {
        let value = "sk-a, sk-b\nsk-c\r\n\n ,sk-d,\n";
        assert_eq!(
            read(&[("KEYS", value)], "KEYS").unwrap(),
            vec!["sk-a", "sk-b", "sk-c", "sk-d"]
        );
    }

    #[test]
    fn missing_and_empty_variables_name_the_variable_and_how_to_pass_it() {
        for (pairs, var, says) in [
            (&[][..], "OPENAI_KEYS", "is not set"),
            (&[("OPENAI_KEYS", "")][..], "OPENAI_KEYS", "is empty"),
            (&[("OPENAI_KEYS", " ,\n , ")][..], "OPENAI_KEYS", "is empty"),
        ] {
            let e = read(pairs, var).unwrap_err();
            assert_eq!(e.field, "apiTokens[0].fromEnv");
            assert!(e.message.contains("OPENAI_KEYS"), "{e}");
            assert!(e.message.contains(says), "{e}");
            assert!(e.message.contains("host_env_keys"), "{e}");
        }
    }

    #[test]
    fn the_native_module_is_told_to_set_the_variable_in_envoys_environment() {
        let native = |pairs: &[(&str, &str)]| {
            read_keys(
                &vars_of(pairs, HostEnv::EnvoyProcess),
                "OPENAI_KEYS",
                "apiTokens[0].fromEnv",
            )
            .unwrap_err()
        };
        for (e, says) in [
            (native(&[]), "OPENAI_KEYS is not set in Envoy's environment"),
            (native(&[("OPENAI_KEYS", " , ")]), "OPENAI_KEYS is empty"),
        ] {
            assert!(e.message.contains(says), "{e}");
            assert!(
                e.message
                    .contains("set OPENAI_KEYS in the environment Envoy is started with"),
                "{e}"
            );
            assert!(!e.message.contains("host_env_keys"), "a wasm-only fix: {e}");
        }
    }

    #[test]
    fn each_host_reads_its_own_environment_one_named_variable_at_a_time() {
        // The test process's own environment stands in for both: PATH is set, this is not.
        for host in [HostEnv::WasmVm, HostEnv::EnvoyProcess] {
            assert!(host.var("PATH").is_some());
            assert_eq!(host.var("AKF_UNIT_NOT_SET_ANYWHERE"), None);
        }
    }

    #[test]
    fn a_value_that_is_not_utf8_is_refused_without_quoting_it() {
        use std::os::unix::ffi::OsStringExt;
        let raw = OsString::from_vec(b"sk-secret-\xff\xfe".to_vec());
        let env = vars_of(&[("K", raw)], HostEnv::WasmVm);
        let e = read_keys(&env, "K", "apiTokens[0].fromEnv").unwrap_err();
        assert!(e.message.contains("K is not valid UTF-8"), "{e}");
        assert!(!e.to_string().contains("sk-secret"), "{e}");
    }

    #[test]
    fn variable_names_are_identifiers() {
        for good in ["K", "_K", "OPENAI_KEY_1", "a1"] {
            assert!(is_valid_var_name(good), "{good}");
        }
        let long = "K".repeat(MAX_VAR_NAME_LEN + 1);
        for bad in ["", "1K", "K-1", "K 1", "K\n", "K=V", "ключ", long.as_str()] {
            assert!(!is_valid_var_name(bad), "{bad:?}");
            let e = read(&[(bad, "sk-x")], bad).unwrap_err();
            assert!(
                e.message.contains("must name an environment variable"),
                "{e}"
            );
        }
    }

    // The `fromEnv` entry as the configuration parser sees it.

    use crate::core::config::{parse_with_env, PluginConfig};

    fn parse(json: &str, pairs: &[(&str, &str)]) -> Result<PluginConfig, ConfigError> {
        parse_with_env(json.as_bytes(), &env_of(pairs))
    }

    fn keys_of(c: &PluginConfig, pool: usize) -> Vec<(String, String, u32)> {
        c.pools[pool]
            .keys
            .iter()
            .map(|k| (k.token.clone(), k.label(), k.weight))
            .collect()
    }

    #[test]
    fn a_from_env_entry_is_the_variables_key_with_its_name_and_weight() {
        let c = parse(
            r#"{"apiTokens": [{"fromEnv": "OPENAI_KEY_1", "name": "primary", "weight": 2}, "sk-inline"],
                "selection": "weighted"}"#,
            &[("OPENAI_KEY_1", "sk-from-env\n")],
        )
        .unwrap();
        let inline_label = c.pools[0].keys[1].label();
        assert_eq!(
            keys_of(&c, 0),
            vec![
                ("sk-from-env".into(), "primary".into(), 2),
                ("sk-inline".into(), inline_label, 1)
            ]
        );
    }

    #[test]
    fn a_variable_with_a_list_gives_one_key_each_with_suffixed_names() {
        let c = parse(
            r#"{"apiTokens": [{"fromEnv": "KEYS", "name": "team", "weight": 3}]}"#,
            &[("KEYS", "sk-1,sk-2\nsk-3")],
        )
        .unwrap();
        assert_eq!(
            keys_of(&c, 0),
            vec![
                ("sk-1".into(), "team-1".into(), 3),
                ("sk-2".into(), "team-2".into(), 3),
                ("sk-3".into(), "team-3".into(), 3)
            ]
        );
        // Without a name each key is named by its short hash, as any unnamed key.
        let c = parse(
            r#"{"apiTokens": [{"fromEnv": "KEYS"}]}"#,
            &[("KEYS", "sk-1,sk-2")],
        )
        .unwrap();
        let labels: Vec<String> = c.pools[0].keys.iter().map(|k| k.label()).collect();
        assert!(labels.iter().all(|l| l.starts_with("key-")), "{labels:?}");
        assert_eq!(c.pools[0].keys.len(), 2);
    }

    #[test]
    fn from_env_works_in_rules_and_fallbacks() {
        let c = parse(
            r#"{"_rules_": [{"_match_route_": ["r"], "apiTokens": [{"fromEnv": "RULE_KEYS"}],
                              "fallbacks": [{"name": "fb", "apiTokens": [{"fromEnv": "FB_KEY"}]}]}]}"#,
            &[("RULE_KEYS", "sk-r1,sk-r2"), ("FB_KEY", "sk-fb")],
        )
        .unwrap();
        let mut all: Vec<String> = c
            .pools
            .iter()
            .flat_map(|p| p.keys.iter().map(|k| k.token.clone()))
            .collect();
        all.sort();
        assert_eq!(all, vec!["sk-fb", "sk-r1", "sk-r2"]);
        // Fallbacks of a global part that lists no keys are still checked, variables included.
        let e = parse(
            r#"{"fallbacks": [{"name": "fb", "apiTokens": [{"fromEnv": "NOPE"}]}],
                "_rules_": [{"_match_route_": ["r"], "apiTokens": ["sk-r"]}]}"#,
            &[],
        )
        .unwrap_err();
        assert_eq!(e.field, "fallbacks[0].apiTokens[0].fromEnv", "{e}");
    }

    #[test]
    fn bad_from_env_entries_are_refused_by_position_and_variable_never_by_value() {
        let secret = "sk-VERY-SECRET";
        let env = [
            ("EMPTY", "\n"),
            ("SPACE", "sk-VERY-SECRET,sk-VERY SECRET"),
            ("CTRL", "sk-VERY-SECRET\u{7}"),
            ("DUP", "sk-VERY-SECRET"),
            (
                "THREE",
                "sk-VERY-SECRET-1,sk-VERY-SECRET-2,sk-VERY-SECRET-3",
            ),
        ];
        let long_name = "n".repeat(63);
        let too_long =
            format!(r#"{{"apiTokens": [{{"fromEnv": "THREE", "name": "{long_name}"}}]}}"#);
        let table: Vec<(&str, &str, &str)> = vec![
            (
                r#"{"apiTokens": [{"fromEnv": "MISSING"}]}"#,
                "apiTokens[0].fromEnv",
                "MISSING is not set",
            ),
            (
                r#"{"apiTokens": [{"fromEnv": "EMPTY"}]}"#,
                "apiTokens[0].fromEnv",
                "EMPTY is empty",
            ),
            (
                r#"{"apiTokens": [{"fromEnv": "bad-name"}]}"#,
                "apiTokens[0].fromEnv",
                "must name an environment variable",
            ),
            (
                r#"{"apiTokens": [{"fromEnv": 7}]}"#,
                "apiTokens[0].fromEnv",
                "as a string",
            ),
            (
                r#"{"apiTokens": [{"fromEnv": "DUP", "token": "sk-x"}]}"#,
                "apiTokens[0]",
                "both",
            ),
            (
                r#"{"apiTokens": [{"fromEnv": "DUP", "tokn": "x"}]}"#,
                "apiTokens[0].tokn",
                "unknown field",
            ),
            (
                r#"{"apiTokens": [{"fromEnv": "SPACE"}]}"#,
                "apiTokens[0] (key 2 of $SPACE)",
                "whitespace",
            ),
            (
                r#"{"apiTokens": [{"fromEnv": "CTRL"}]}"#,
                "apiTokens[0] ($CTRL)",
                "control character",
            ),
            (
                r#"{"apiTokens": ["sk-VERY-SECRET", {"fromEnv": "DUP"}]}"#,
                "apiTokens[1] ($DUP)",
                "the same key as apiTokens[0]",
            ),
            (
                r#"{"apiTokens": [{"fromEnv": "DUP"}, {"fromEnv": "SPACE"}]}"#,
                "apiTokens[1] (key 1 of $SPACE)",
                "the same key as apiTokens[0] ($DUP)",
            ),
            (
                r#"{"apiTokens": [{"fromEnv": "THREE", "name": "k"}, {"token": "sk-o", "name": "k-2"}]}"#,
                "apiTokens[1].name",
                "already the name of apiTokens[0] (key 2 of $THREE)",
            ),
            (too_long.as_str(), "apiTokens[0].name", "suffix -1"),
        ];
        for (json, field, needle) in table {
            let e = parse(json, &env).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(
                e.message.contains(needle),
                "{json}: {e} (wanted {needle:?})"
            );
            assert!(
                !e.to_string().contains(secret),
                "an error quotes the value: {e}"
            );
        }
    }

    #[test]
    fn the_key_limit_counts_the_keys_a_variable_expands_to() {
        let many = (0..crate::core::config::MAX_KEYS_PER_POOL)
            .map(|i| format!("sk-{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let e = parse(
            r#"{"apiTokens": ["sk-extra", {"fromEnv": "MANY"}]}"#,
            &[("MANY", many.as_str())],
        )
        .unwrap_err();
        assert_eq!(e.field, "apiTokens");
        assert!(e.message.contains("at most"), "{e}");
    }
}
