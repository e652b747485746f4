//! Upstream mode: the filter runs once per attempt of Envoy's route retry, so each attempt of
//! one downstream request (they share its `x-request-id`) avoids the keys that failed the earlier
//! ones, and the attempts after the first count as retries. The memory itself is the engine's
//! (`crate::core::attempts`); this is what each attempt tells it, the same from every host.

use crate::core::engine::{Assignment, Clock, Engine, RetryOutcome};

/// The header Envoy's attempts of one request share.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The keys earlier attempts of the request `request_id` failed with; empty for a first attempt
/// (and downstream, where there is no request id to ask about).
pub fn failed_before(engine: &Engine, request_id: Option<&str>) -> Vec<(usize, usize)> {
    request_id
        .map(|id| engine.failed_for(id))
        .unwrap_or_default()
}

/// One attempt that got a key.
pub struct Attempt {
    /// Read with the request: an upstream filter cannot read request headers once the response
    /// has begun, and any attempt may fail.
    request_id: Option<String>,
    /// An earlier attempt of the request failed.
    is_retry: bool,
}

impl Attempt {
    /// The attempt of `request_id` got `assignment`, avoiding `avoid` (`failed_before`'s); an
    /// attempt after a failed one counts as a retry.
    pub fn keyed(
        engine: &mut Engine,
        assignment: Assignment,
        request_id: Option<String>,
        avoid: &[(usize, usize)],
    ) -> Self {
        let is_retry = !avoid.is_empty();
        if is_retry {
            engine.count_retry(assignment.profile, RetryOutcome::Started);
        }
        Attempt {
            request_id,
            is_retry,
        }
    }

    /// The attempt's answer has status `status`: remembered before Envoy starts the next attempt,
    /// so that one avoids this key. A status that is not the key's fault is not remembered
    /// (`Engine::note_failed_attempt`); such a request keeps what earlier attempts learned, in
    /// case Envoy's policy retries it anyway. An answer below 400 reaches the client, so no
    /// attempt follows it and the request is forgotten.
    pub fn answered(&self, engine: &mut Engine, sent: Assignment, status: u16, clock: &Clock) {
        if let Some(id) = &self.request_id {
            if status >= 400 {
                engine.note_failed_attempt(id, sent, status, clock.now());
            } else {
                engine.forget_attempts(id);
            }
        }
        if self.is_retry {
            let outcome = if (200..300).contains(&status) {
                RetryOutcome::Succeeded
            } else {
                RetryOutcome::Failed
            };
            engine.count_retry(sent.profile, outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::engine::tests::{NoFacts, TestHost};
    use crate::core::engine::Decision;

    #[test]
    fn each_attempt_avoids_the_keys_earlier_attempts_failed_with_and_counts_as_a_retry() {
        let host = TestHost::default();
        let text = r#"{"name": "p", "apiTokens": ["sk-a", "sk-b", "sk-c"]}"#;
        let mut e = Engine::new(crate::core::config::parse(text.as_bytes()).unwrap(), 1);
        e.start(&host, 0);
        let profile = e.profile_for(&mut NoFacts).unwrap();
        let attempt = |e: &mut Engine, request: &str, status: u16| {
            let avoid = failed_before(e, Some(request));
            let Decision::UseKey(a) = e.decide(&host, Some(profile), &Clock::at(0), &avoid) else {
                panic!("a key for every attempt");
            };
            assert!(!avoid.contains(&(0, a.key)), "{avoid:?} avoided");
            Attempt::keyed(e, a, Some(request.to_string()), &avoid).answered(
                e,
                a,
                status,
                &Clock::at(0),
            );
            (a.key, avoid.len())
        };
        let (first, avoided) = attempt(&mut e, "r1", 429);
        assert_eq!(avoided, 0);
        let (second, avoided) = attempt(&mut e, "r1", 503);
        assert_eq!(avoided, 1);
        assert_ne!(first, second);
        assert_eq!(failed_before(&e, Some("r1")).len(), 2);
        // The request's own fault teaches nothing about the key.
        let (_, avoided) = attempt(&mut e, "r1", 400);
        assert_eq!(avoided, 2);
        assert_eq!(failed_before(&e, Some("r1")).len(), 2);
        attempt(&mut e, "r1", 200);
        assert!(
            failed_before(&e, Some("r1")).is_empty(),
            "forgotten on success"
        );
        assert!(failed_before(&e, None).is_empty());
        e.flush_counters(&host);
        let stat = |name: &str| host.metrics.get(&format!("ai_key_failover.pool.p.{name}"));
        assert_eq!(
            (
                stat("retries"),
                stat("retries_succeeded"),
                stat("retries_failed")
            ),
            (3, 1, 2)
        );
    }
}
