//! Higress `_rules_` matching: which profile serves a request.

/// The request facts rules look at. Each is fetched from the host only if some rule needs it.
pub trait RequestFacts {
    fn route_name(&mut self) -> Option<String>;
    fn cluster_name(&mut self) -> Option<String>;
    /// `:authority` without the port, lowercased.
    fn host(&mut self) -> Option<String>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainPattern {
    Any,
    /// `*.example.com`: stored as `.example.com`.
    Suffix(String),
    /// `api.*`: stored as `api.`.
    Prefix(String),
    Exact(String),
}

impl DomainPattern {
    pub fn parse(text: &str) -> Self {
        let text = text.trim().to_ascii_lowercase();
        if text == "*" {
            DomainPattern::Any
        } else if let Some(rest) = text.strip_prefix('*') {
            DomainPattern::Suffix(rest.to_string())
        } else if let Some(rest) = text.strip_suffix('*') {
            DomainPattern::Prefix(rest.to_string())
        } else {
            DomainPattern::Exact(text)
        }
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            DomainPattern::Any => true,
            DomainPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            DomainPattern::Prefix(p) => host.len() > p.len() && host.starts_with(p.as_str()),
            DomainPattern::Exact(e) => host == e,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Matcher {
    Route(Vec<String>),
    RoutePrefix(Vec<String>),
    Domain(Vec<DomainPattern>),
    /// Higress service names (`fqdn` or `fqdn:port`), or a plain Envoy cluster name.
    Service(Vec<String>),
}

impl Matcher {
    pub fn matches(&self, facts: &mut dyn RequestFacts) -> bool {
        match self {
            Matcher::Route(names) => facts.route_name().is_some_and(|r| names.contains(&r)),
            Matcher::RoutePrefix(prefixes) => facts
                .route_name()
                .is_some_and(|r| prefixes.iter().any(|p| r.starts_with(p.as_str()))),
            Matcher::Domain(patterns) => facts
                .host()
                .is_some_and(|h| patterns.iter().any(|p| p.matches(&h))),
            Matcher::Service(services) => facts
                .cluster_name()
                .is_some_and(|c| services.iter().any(|s| service_matches(s, &c))),
        }
    }
}

/// Higress clusters are named `outbound|<port>|<subset>|<fqdn>`; a rule names `fqdn` or `fqdn:port`.
fn service_matches(service: &str, cluster: &str) -> bool {
    if service == cluster {
        return true;
    }
    let mut parts = cluster.split('|');
    let (Some("outbound"), Some(port), Some(_subset), Some(fqdn), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    match service.rsplit_once(':') {
        Some((name, p)) if p.bytes().all(|b| b.is_ascii_digit()) => name == fqdn && p == port,
        _ => service == fqdn,
    }
}

/// Strips the port from an `:authority` value (`host:port`, `[v6]:port`) and lowercases it.
pub fn host_of_authority(authority: &str) -> String {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Facts {
        route: Option<&'static str>,
        cluster: Option<&'static str>,
        host: Option<&'static str>,
        asked: Vec<&'static str>,
    }

    impl RequestFacts for Facts {
        fn route_name(&mut self) -> Option<String> {
            self.asked.push("route");
            self.route.map(String::from)
        }
        fn cluster_name(&mut self) -> Option<String> {
            self.asked.push("cluster");
            self.cluster.map(String::from)
        }
        fn host(&mut self) -> Option<String> {
            self.asked.push("host");
            self.host.map(String::from)
        }
    }

    fn domain(patterns: &[&str]) -> Matcher {
        Matcher::Domain(patterns.iter().map(|p| DomainPattern::parse(p)).collect())
    }

    #[test]
    fn matcher_table() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let cases: Vec<(Matcher, Facts, bool)> = vec![
            (
                Matcher::Route(s(&["chat"])),
                Facts {
                    route: Some("chat"),
                    ..Default::default()
                },
                true,
            ),
            (
                Matcher::Route(s(&["chat"])),
                Facts {
                    route: Some("chat2"),
                    ..Default::default()
                },
                false,
            ),
            (Matcher::Route(s(&["chat"])), Facts::default(), false),
            (
                Matcher::RoutePrefix(s(&["team-a-"])),
                Facts {
                    route: Some("team-a-chat"),
                    ..Default::default()
                },
                true,
            ),
            (
                Matcher::RoutePrefix(s(&["team-a-"])),
                Facts {
                    route: Some("team-b-chat"),
                    ..Default::default()
                },
                false,
            ),
            (
                domain(&["*.example.com"]),
                Facts {
                    host: Some("api.example.com"),
                    ..Default::default()
                },
                true,
            ),
            (
                domain(&["*.example.com"]),
                Facts {
                    host: Some("example.com"),
                    ..Default::default()
                },
                false,
            ),
            (
                domain(&["*.example.com"]),
                Facts {
                    host: Some("api.example.com.evil"),
                    ..Default::default()
                },
                false,
            ),
            (
                domain(&["api.*"]),
                Facts {
                    host: Some("api.example.com"),
                    ..Default::default()
                },
                true,
            ),
            (
                domain(&["api.*"]),
                Facts {
                    host: Some("www.api.com"),
                    ..Default::default()
                },
                false,
            ),
            (
                domain(&["*"]),
                Facts {
                    host: Some("anything"),
                    ..Default::default()
                },
                true,
            ),
            (
                domain(&["API.Example.com"]),
                Facts {
                    host: Some("api.example.com"),
                    ..Default::default()
                },
                true,
            ),
            (
                domain(&["api.example.com"]),
                Facts {
                    host: Some("api.example.org"),
                    ..Default::default()
                },
                false,
            ),
            (
                Matcher::Service(s(&["llm.svc"])),
                Facts {
                    cluster: Some("outbound|443||llm.svc"),
                    ..Default::default()
                },
                true,
            ),
            (
                Matcher::Service(s(&["llm.svc:443"])),
                Facts {
                    cluster: Some("outbound|443||llm.svc"),
                    ..Default::default()
                },
                true,
            ),
            (
                Matcher::Service(s(&["llm.svc:80"])),
                Facts {
                    cluster: Some("outbound|443||llm.svc"),
                    ..Default::default()
                },
                false,
            ),
            (
                Matcher::Service(s(&["llm"])),
                Facts {
                    cluster: Some("outbound|443||llm.svc"),
                    ..Default::default()
                },
                false,
            ),
            (
                Matcher::Service(s(&["mock_provider"])),
                Facts {
                    cluster: Some("mock_provider"),
                    ..Default::default()
                },
                true,
            ),
        ];
        for (matcher, mut facts, want) in cases {
            assert_eq!(
                matcher.matches(&mut facts),
                want,
                "{matcher:?} {:?}",
                (facts.route, facts.cluster, facts.host)
            );
        }
    }

    #[test]
    fn matchers_ask_only_for_what_they_use() {
        let mut facts = Facts {
            host: Some("a.b"),
            ..Default::default()
        };
        domain(&["a.b"]).matches(&mut facts);
        assert_eq!(facts.asked, ["host"]);
    }

    #[test]
    fn authority_port_is_stripped() {
        for (authority, host) in [
            ("api.example.com", "api.example.com"),
            ("API.example.com:8443", "api.example.com"),
            ("[::1]:10000", "::1"),
            ("[::1]", "::1"),
            ("", ""),
        ] {
            assert_eq!(host_of_authority(authority), host);
        }
    }
}
