//! The engine's tests: the request path, carry-over, the tick, several workers on one host.

use super::test_host::*;
/// Other modules' tests run the engine against these.
pub(crate) use super::test_host::{NoFacts, TestHost};
use super::*;
use crate::core::schema::PoolKeys;
use crate::core::status::FailureClass;
use crate::core::store::fake::FakeShared;

const KEYS_A_B_C: &str =
    r#"{"name": "main", "apiTokens": ["a", "b", "c"], "failover": {"cooldownDuration": 60000}}"#;

/// A configuration of keys a and b started on `host`, whose first key chosen got a 429 (60 s
/// cooldown) at 10 ms: the key that is down.
fn a_key_down_under_keys_a_and_b(host: &TestHost) -> usize {
    let cfg =
        r#"{"name": "main", "apiTokens": ["a", "b"], "failover": {"cooldownDuration": 60000}}"#;
    let mut old = engine(cfg, 1);
    old.start(host, 0);
    let g = old.profile_for(&mut NoFacts);
    let (p, down, _) = old.key_for(host, g, 0);
    let v = old.verdict(p, 429, None);
    old.answered(host, sent(p, down, SentAs::Normal), v, 429, None, 10);
    down
}

#[test]
fn a_key_carried_over_down_at_a_config_load_is_out_from_the_first_request() {
    let host = TestHost::default();
    let down = a_key_down_under_keys_a_and_b(&host);
    // A new key list keeping both keys: a new pool, which takes the down key's state over.
    let mut new = engine(KEYS_A_B_C, 2);
    new.start(&host, 20);
    let g = new.profile_for(&mut NoFacts);
    let picked: Vec<usize> = (0..6).map(|i| new.key_for(&host, g, 30 + i).1).collect();
    assert!(!picked.contains(&down), "key {down} is down: {picked:?}");
    assert_eq!(new.indexes()[0].view().available_count(), 2);
}

#[test]
fn a_carry_over_that_gives_up_is_logged_and_counted_as_such() {
    let host = TestHost::default();
    a_key_down_under_keys_a_and_b(&host);
    // A new key list: it would carry the down key over, but every write of it conflicts.
    let mut new = engine(KEYS_A_B_C, 2);
    let state_key = PoolKeys::of(new.stores()[0].pool_id()).state;
    *host.shared.before_set.borrow_mut() = Some(Box::new(move |h: &FakeShared, key: &str| {
        if key == state_key {
            let v = h.value(key);
            h.put_raw(key, &v);
        }
    }));
    let lines = logged_by(|| new.start(&host, 20));
    *host.shared.before_set.borrow_mut() = None;
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("WARN pool main: gave up taking over")),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("kept the state")),
        "{lines:?}"
    );
    assert_eq!(host.metrics.get("ai_key_failover.pool.main.cas_gave_up"), 1);
}

#[test]
fn reads_of_a_corrupt_state_entry_show_in_the_decode_failed_stat() {
    let host = TestHost::default();
    let cfg = r#"{"name": "main", "apiTokens": ["a", "b"]}"#;
    let mut w = engine(cfg, 1);
    w.start(&host, 0);
    let stat = "ai_key_failover.pool.main.state_decode_failed";
    assert_eq!(host.metrics.get(stat), 0);
    let keys = PoolKeys::of(w.stores()[0].pool_id());
    host.shared.put_raw(&keys.state, b"not a state entry");
    host.shared.put_raw(&keys.epoch, &[]);
    w.tick(&host, 1_000);
    assert_eq!(host.metrics.get(stat), 1);
    w.tick(&host, 2_000);
    assert_eq!(
        host.metrics.get(stat),
        1,
        "counted once per read, not per tick"
    );
}

#[test]
fn a_429_on_one_worker_moves_every_worker_off_the_key_until_the_cooldown_ends() {
    let host = TestHost::default();
    let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 1000}}"#;
    let (mut w1, mut w2) = two_workers(&host, cfg);
    let g = w1.profile_for(&mut NoFacts);
    let (p, k, _) = w1.key_for(&host, g, 0);
    let v = w1.verdict(p, 429, None);
    w1.answered(&host, sent(p, k, SentAs::Normal), v, 429, None, 10);
    assert_never_given(&mut w2, &host, g, k, &[20, 500, 1009]);
    // Back after 10 + 1000 ms plus up to 10% jitter: first as exactly one probe.
    let (_, probe_key, how) = w2.key_for(&host, g, 1120);
    assert_eq!(probe_key, k);
    assert!(how.is_probe(), "{how:?}");
    for _ in 0..4 {
        let (_, k2, how) = w1.key_for(&host, g, 1121);
        assert_ne!(k2, k, "one probe at a time, on any worker");
        assert_eq!(how, SentAs::Normal);
    }
    w2.succeeded(&host, sent(p, k, how), 1130);
    let seen: std::collections::HashSet<usize> =
        (0..4).map(|_| w1.key_for(&host, g, 1131).1).collect();
    assert_eq!(seen.len(), 2, "the probe's success restored it");
}

#[test]
fn a_request_sent_before_an_outage_that_fails_after_it_leaves_the_probe_alone() {
    let host = TestHost::default();
    let cfg = r#"{"name": "p", "apiTokens": [{"token": "a", "name": "ka"}, "b"],
                  "failover": {"cooldownDuration": 1000}}"#;
    let mut a = engine(cfg, 1);
    let mut b = engine(cfg, 2);
    a.start(&host, 0);
    b.start(&host, 0);
    // A's request goes out with key 0 while it is available; it answers late.
    let slow = sent(0, 0, SentAs::Normal);
    b.answered(&host, sent(0, 0, SentAs::Normal), RATE, 429, None, 10);
    let (_, k, probe) = use_key(b.decide(&host, Some(0), &Clock::at(1_200), &[]));
    assert_eq!(k, 0);
    assert!(probe.is_probe(), "{probe:?}");
    a.record(&host, slow, SERVER, 503, None, &Clock::at(1_300));
    for _ in 0..4 {
        let (_, k, how) = use_key(a.decide(&host, Some(0), &Clock::at(1_400), &[]));
        assert_eq!((k, how), (1, SentAs::Normal), "the probe is still out");
    }
    let SentAs::Probe { claim_ms } = probe else {
        unreachable!()
    };
    let key = &a.stores()[0].state().keys[0];
    assert!(
        key.probe_held_by(claim_ms),
        "the probe keeps its claim: {key:?}"
    );
    assert_eq!(key.strikes, 1);
    let m = |name: &str| host.pool_stat("p", name);
    assert_eq!(
        m("probes_failed"),
        0,
        "the stale failure was not the probe's"
    );
    assert_eq!(m("key.ka.key_marked_down"), 1, "one outage");
    b.succeeded(&host, sent(0, 0, probe), 1_500);
    a.tick(&host, 1_600);
    let key = &a.stores()[0].state().keys[0];
    assert!(key.is_available() && key.strikes == 0, "{key:?}");
    assert_eq!(m("keys_restored"), 1);
}

#[test]
fn a_failed_probe_backs_off_and_a_silent_probe_is_released() {
    let host = TestHost::default();
    let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 1000, "cooldownBackoff": 3}}"#;
    let mut w = engine(cfg, 9);
    w.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 0);
    let (_, k, how) = use_key(w.decide(&host, Some(0), &Clock::at(1200), &[]));
    assert_eq!(k, 0);
    assert!(how.is_probe(), "{how:?}");
    w.answered(&host, sent(0, 0, how), SERVER, 503, None, 1200);
    let key = &w.stores()[0].state().keys[0];
    assert_eq!(key.strikes, 2);
    let cooldown = key.down_until_ms - 1200;
    assert!((3_000..=3_300).contains(&cooldown), "{cooldown}");
    // The next probe comes back with nothing to say (a local reply): another may probe.
    let (_, k, how) = use_key(w.decide(&host, Some(0), &Clock::at(5000), &[]));
    assert_eq!(k, 0);
    assert!(how.is_probe(), "{how:?}");
    w.answered(&host, sent(0, 0, how), Verdict::Neutral, 504, None, 5001);
    let (_, k, how) = use_key(w.decide(&host, Some(0), &Clock::at(5002), &[]));
    assert_eq!(k, 0);
    assert!(how.is_probe(), "{how:?}");
    w.abandon(&host, sent(0, 0, how), 5003);
    assert!(w.stores()[0].state().keys[0].probe_claimable());
}

#[test]
fn retry_hints_and_refusals_set_how_long_a_key_stays_out() {
    let host = TestHost::default();
    let cfg = r#"{"apiTokens": ["a", "b", "c"], "failover": {"cooldownDuration": 60000}}"#;
    let mut w = engine(cfg, 4);
    w.answered(&host, sent(0, 0, SentAs::Normal), RATE, 429, Some(1_000), 0);
    let refused = Verdict::KeyFailure(FailureClass::KeyRefused);
    w.answered(&host, sent(0, 1, SentAs::Normal), refused, 401, None, 0);
    w.answered(
        &host,
        sent(0, 2, SentAs::Normal),
        SERVER,
        503,
        Some(1_000),
        0,
    );
    let keys = &w.stores()[0].state().keys;
    assert!(
        (1_000..=1_100).contains(&keys[0].down_until_ms),
        "the hint rules a rate limit"
    );
    assert_eq!(
        keys[1].down_until_ms, 3_600_000,
        "refused keys stay out for disableDuration"
    );
    assert!(
        keys[2].down_until_ms >= 60_000,
        "a server error's hint is ignored"
    );
    let no_hints = engine(
        r#"{"apiTokens": ["a"], "failover": {"respectRetryAfter": false}}"#,
        1,
    );
    assert!(!no_hints.wants_retry_hint(0, RATE));
    assert!(w.wants_retry_hint(0, RATE));
    assert!(!w.wants_retry_hint(0, SERVER));
    assert!(
        w.wants_error_body(0, 429) && !w.wants_error_body(0, 200) && !w.wants_error_body(0, 503)
    );
    assert_eq!(
        w.verdict(
            0,
            429,
            Some(br#"{"error": {"type": "insufficient_quota"}}"#)
        ),
        refused,
        "insufficient_quota is a refusal"
    );
}

#[test]
fn tick_restores_without_traffic_and_only_one_worker_writes() {
    let host = TestHost::default();
    let cfg = r#"{"apiTokens": ["a"], "failover": {"cooldownDuration": 1000}}"#;
    let mut w1 = engine(cfg, 1);
    let mut w2 = engine(cfg, 2);
    w1.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 0);
    w1.tick(&host, 500);
    w2.tick(&host, 500);
    assert_eq!(w2.indexes()[0].view().available_count(), 0);
    let sets = host.shared.sets.get();
    w1.tick(&host, 1200);
    w2.tick(&host, 1200);
    assert_eq!(
        host.shared.sets.get() - sets,
        2,
        "one state write and one epoch write"
    );
    assert_eq!(w2.indexes()[0].view().probe_candidate(), Some(0));
}

#[test]
fn successes_write_only_when_they_change_something() {
    let host = TestHost::default();
    let mut w = engine(
        r#"{"apiTokens": ["a"], "failover": {"failureThreshold": 3}}"#,
        1,
    );
    for _ in 0..5 {
        w.decide(&host, Some(0), &Clock::at(0), &[]);
        w.succeeded(&host, sent(0, 0, SentAs::Normal), 0);
    }
    assert_eq!(host.shared.sets.get(), 0);
    w.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 500, None, 0);
    w.decide(&host, Some(0), &Clock::at(0), &[]);
    w.succeeded(&host, sent(0, 0, SentAs::Normal), 0);
    assert_eq!(w.stores()[0].state().keys[0].consecutive_failures, 0);
    assert_eq!(host.shared.sets.get(), 4);
}

#[test]
fn a_success_on_one_worker_resets_the_count_a_failure_on_another_raised() {
    let host = TestHost::default();
    let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"failureThreshold": 2}}"#;
    let mut a = engine(cfg, 1);
    let mut b = engine(cfg, 2);
    // Both requests start (and refresh their worker's cache) before either answer is in.
    a.decide(&host, Some(0), &Clock::at(0), &[]);
    b.decide(&host, Some(0), &Clock::at(0), &[]);
    a.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 10);
    b.succeeded(&host, sent(0, 0, SentAs::Normal), 20);
    a.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 30);
    let shared = |w: &mut Engine| {
        w.tick(&host, 40);
        w.stores()[0].state().keys[0].clone()
    };
    let key = shared(&mut b);
    assert!(
        key.is_available(),
        "a success came between the two failures: {key:?}"
    );
    assert_eq!(
        key.consecutive_failures, 1,
        "the failure after the success is the first again"
    );
    assert_eq!(shared(&mut a), key, "both workers see the same state");
    // Threshold 1 (the default) keeps successes free of shared-data reads: an available
    // key never holds a count there.
    let one = r#"{"apiTokens": ["a", "b"]}"#;
    let host = TestHost::default();
    let mut w = engine(one, 3);
    w.decide(&host, Some(0), &Clock::at(0), &[]);
    let gets = host.shared.gets.get();
    w.succeeded(&host, sent(0, 0, SentAs::Normal), 1);
    assert_eq!(host.shared.gets.get(), gets);
}

#[test]
fn reject_answers_with_whole_seconds_until_the_first_return() {
    let host = TestHost::default();
    let mut w = engine(
        r#"{"apiTokens": ["a", "b"], "onAllUnavailable": "reject", "failover": {"cooldownDuration": 2500}}"#,
        1,
    );
    w.answered(&host, sent(0, 0, SentAs::Normal), RATE, 429, None, 0);
    w.answered(&host, sent(0, 1, SentAs::Normal), RATE, 429, None, 1000);
    assert_eq!(
        w.decide(&host, Some(0), &Clock::at(1000), &[]),
        Decision::Reject {
            retry_after_secs: 2
        }
    );
    assert_eq!(
        w.decide(&host, Some(0), &Clock::at(2499), &[]),
        Decision::Reject {
            retry_after_secs: 1
        }
    );
    assert!(matches!(
        w.decide(&host, Some(0), &Clock::at(2800), &[]),
        Decision::UseKey(Assignment {
            key: 0,
            sent_as: SentAs::Probe { .. },
            ..
        })
    ));
}

#[test]
fn earliest_uses_the_first_returning_key_and_a_success_brings_it_back() {
    let host = TestHost::default();
    let mut w = engine(
        r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 10000}}"#,
        1,
    );
    // Hints fix the order whatever the jitter: b returns at about 5 s, a at about 20 s.
    w.answered(&host, sent(0, 1, SentAs::Normal), RATE, 429, Some(5_000), 0);
    w.answered(
        &host,
        sent(0, 0, SentAs::Normal),
        RATE,
        429,
        Some(20_000),
        100,
    );
    let (p, k, down) = use_key(w.decide(&host, Some(0), &Clock::at(200), &[]));
    assert_eq!((k, down), (1, SentAs::WhileDown));
    w.succeeded(&host, sent(p, k, down), 200);
    assert_eq!(w.indexes()[0].view().available_count(), 1);
}

#[test]
fn disabled_failover_never_marks_keys() {
    let w = engine(r#"{"apiTokens": ["a"], "failover": {"enabled": false}}"#, 1);
    assert_eq!(w.verdict(0, 429, None), Verdict::Neutral);
}

#[test]
fn key_header_follows_the_profile() {
    let w = engine(
        r#"{"apiTokens": ["sk-1"], "authHeader": {"name": "x-token", "prefix": "Key "}}"#,
        1,
    );
    assert_eq!(w.key_header(0, 0), Some(("x-token", "Key sk-1")));
    assert_eq!(w.key_header(0, 5), None);
}

#[test]
fn workers_start_round_robin_at_different_keys() {
    let host = TestHost::default();
    let cfg = r#"{"apiTokens": ["a", "b", "c", "d", "e", "f", "g", "h"]}"#;
    let firsts: std::collections::HashSet<usize> = (0..8)
        .map(|seed| use_key(engine(cfg, seed * 7919).decide(&host, Some(0), &Clock::at(0), &[])).1)
        .collect();
    assert!(firsts.len() > 1);
}

#[test]
fn request_counts_since_the_last_tick_are_flushed_when_the_engine_goes() {
    let host = TestHost::default();
    let cfg = r#"{"name": "main", "apiTokens": ["a", "b"]}"#;
    let mut old = engine(cfg, 3);
    old.start(&host, 0);
    old.decide(&host, Some(0), &Clock::at(0), &[]);
    old.tick(&host, 1000);
    for _ in 0..3 {
        old.decide(&host, Some(0), &Clock::at(1500), &[]);
    }
    let keyed = || host.metrics.get("ai_key_failover.pool.main.requests_keyed");
    assert_eq!(keyed(), 1, "counted locally until the next tick");
    // A reload: the new engine defines the same stats; the old one never ticks again.
    let mut new = engine(cfg, 4);
    new.start(&host, 1600);
    old.flush_counters(&host);
    assert_eq!(keyed(), 4);
    old.flush_counters(&host);
    new.tick(&host, 2000);
    assert_eq!(keyed(), 4, "each count is flushed once");
}

#[test]
fn metrics_count_requests_transitions_and_follow_availability() {
    let host = TestHost::default();
    let cfg = r#"{"name": "main", "apiTokens": [{"token": "a", "name": "ka"}, "b"], "onAllUnavailable": "reject",
                  "failover": {"cooldownDuration": 1000}}"#;
    let mut w = engine(cfg, 3);
    w.start(&host, 0);
    let m = |name: &str| host.pool_stat("main", name);
    assert_eq!(m("keys_configured"), 2);
    assert_eq!(m("keys_available"), 2);
    for _ in 0..5 {
        w.decide(&host, Some(0), &Clock::at(0), &[]);
    }
    w.answered(&host, sent(0, 0, SentAs::Normal), RATE, 429, None, 10);
    w.answered(&host, sent(0, 1, SentAs::Normal), SERVER, 503, None, 10);
    w.decide(&host, Some(0), &Clock::at(20), &[]);
    w.tick(&host, 20);
    assert_eq!(m("requests_keyed"), 5);
    assert_eq!(m("requests_rejected"), 1);
    assert_eq!(m("keys_available"), 0);
    assert_eq!(m("class.rate_limit.keys_marked_down"), 1);
    assert_eq!(m("class.server_error.keys_marked_down"), 1);
    assert_eq!(m("key.ka.key_available"), 0);
    assert_eq!(m("key.ka.key_down_until_seconds"), 2);
    w.tick(&host, 1200);
    assert_eq!(
        m("keys_restored"),
        0,
        "a key whose time out ended waits for its probe"
    );
    let (_, k, how) = use_key(w.decide(&host, Some(0), &Clock::at(1200), &[]));
    assert!(how.is_probe(), "{how:?}");
    w.succeeded(&host, sent(0, k, how), 1201);
    w.tick(&host, 1202);
    assert_eq!(m("keys_restored"), 1);
    assert_eq!(m("keys_available"), 1);
}

#[test]
fn a_pool_with_no_key_left_falls_back_in_order_and_returns_when_it_recovers() {
    let host = TestHost::default();
    let cfg = r#"{"name": "primary", "apiTokens": ["p1"], "onAllUnavailable": "reject",
        "failover": {"cooldownDuration": 1000},
        "fallbacks": [{"name": "second", "apiTokens": ["s1"], "model": "m2"},
                      {"name": "third", "apiTokens": ["t1"]}]}"#;
    let mut w = engine(cfg, 3);
    w.start(&host, 0);
    let primary = w.config().global.unwrap();
    let chain = w.profile(primary).unwrap().fallbacks.clone();
    let label = |w: &Engine, d: Decision| match d {
        Decision::UseKey(a) => w.pool_of(a.profile).unwrap().1.to_string(),
        other => format!("{other:?}"),
    };
    let served_by = |w: &mut Engine, now: u64| {
        let d = w.decide_for(&host, primary, now);
        label(w, d)
    };
    assert_eq!(served_by(&mut w, 0), "primary");
    w.answered(
        &host,
        sent(primary, 0, SentAs::Normal),
        RATE,
        429,
        Some(5_000),
        0,
    );
    assert_eq!(served_by(&mut w, 10), "second");
    w.answered(
        &host,
        sent(chain[0], 0, SentAs::Normal),
        SERVER,
        503,
        None,
        10,
    );
    assert_eq!(served_by(&mut w, 20), "third");
    w.answered(
        &host,
        sent(chain[1], 0, SentAs::Normal),
        SERVER,
        503,
        None,
        20,
    );
    match w.decide_for(&host, primary, 30) {
        Decision::Reject { retry_after_secs } => {
            assert!((1..=2).contains(&retry_after_secs), "{retry_after_secs}")
        }
        other => panic!("the whole chain is down: {other:?}"),
    }
    // The primary's key comes back (as a probe) before the others: traffic returns to it.
    let d = w.decide_for(&host, primary, 5_600);
    assert_eq!(label(&w, d), "primary");
    assert!(matches!(
        d,
        Decision::UseKey(Assignment {
            sent_as: SentAs::Probe { .. },
            ..
        })
    ));
    w.tick(&host, 5_700);
    let m = |name: &str| host.pool_stat("primary", name);
    assert_eq!(m("requests_fallen_back"), 2);
    assert_eq!(m("requests_rejected"), 1);
}

#[test]
fn keys_a_request_already_failed_with_are_left_for_the_next_pool() {
    let host = TestHost::default();
    let cfg = r#"{"apiTokens": ["p1", "p2"], "fallbacks": [{"name": "f", "apiTokens": ["f1"]}]}"#;
    let mut w = engine(cfg, 3);
    let primary = w.config().global.unwrap();
    let pool = w.pool_of(primary).unwrap().0;
    match w.decide(&host, Some(primary), &Clock::at(0), &[(pool, 0), (pool, 1)]) {
        Decision::UseKey(a) => assert_eq!(w.pool_of(a.profile).unwrap().1, "f"),
        other => panic!("{other:?}"),
    }
    match w.decide(&host, Some(primary), &Clock::at(0), &[(pool, 0)]) {
        Decision::UseKey(a) => assert_eq!((a.profile, a.key), (primary, 1)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_request_that_failed_with_every_key_still_gets_one() {
    let host = TestHost::default();
    let mut w = engine(r#"{"apiTokens": ["a", "b", "c"]}"#, 5);
    let g = w.config().global.unwrap();
    let pool = w.pool_of(g).unwrap().0;
    let tried = [(pool, 0), (pool, 1), (pool, 2)];
    for now in 0..6 {
        let (p, k, how) = use_key(w.decide(&host, Some(g), &Clock::at(now), &tried));
        assert_eq!((p, how), (g, SentAs::Normal));
        assert!(k < 3, "{k}");
    }
}

#[test]
fn attempts_remember_only_failures_another_key_could_cure() {
    let cfg = r#"{"apiTokens": ["a", "b", "c"],
        "failover": {"enabled": false, "failoverOnStatus": ["4.*", "5.*"]}}"#;
    let mut w = engine(cfg, 1);
    let g = w.config().global.unwrap();
    let pool = w.pool_of(g).unwrap().0;
    // The request's own faults, even under a pattern that covers them, and successes.
    for status in [200, 302, 400, 404, 405, 413, 415, 422, 529] {
        w.note_failed_attempt("r", sent(g, 0, SentAs::Normal), status, 0);
    }
    assert!(w.failed_for("r").is_empty());
    assert!(
        w.attempts.is_empty(),
        "a flood of bad requests fills no memory"
    );
    w.note_failed_attempt("r", sent(g, 0, SentAs::Normal), 429, 0);
    w.note_failed_attempt("r", sent(g, 1, SentAs::Normal), 503, 0);
    w.note_failed_attempt("r", sent(g, 2, SentAs::Normal), 401, 0);
    assert_eq!(w.failed_for("r"), [(pool, 0), (pool, 1), (pool, 2)]);
    // Without the patterns that cover it, a status is not the key's failure.
    let mut narrow = engine(
        r#"{"apiTokens": ["a"], "failover": {"failoverOnStatus": ["429"]}}"#,
        1,
    );
    let g = narrow.config().global.unwrap();
    narrow.note_failed_attempt("r", sent(g, 0, SentAs::Normal), 500, 0);
    assert!(narrow.failed_for("r").is_empty());
}

#[test]
fn a_100_ms_cooldown_ends_on_the_next_100_ms_tick_without_traffic() {
    let host = TestHost::default();
    // A Higress value: a 100 ms cooldown.
    let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"cooldownDuration": 100}}"#;
    let mut w = engine(cfg, 1);
    assert_eq!(w.tick_period_ms(), 100);
    w.start(&host, 0);
    w.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 1_000);
    let until = w.stores()[0].state().keys[0].down_until_ms;
    assert!(
        (1_100..=1_110).contains(&until),
        "100 ms plus jitter: {until}"
    );
    let mut back_at = None;
    for now in (1_000..=2_000).step_by(100) {
        w.tick(&host, now);
        if w.indexes()[0].view().probe_candidate() == Some(0) {
            back_at = Some(now);
            break;
        }
    }
    let back_at = back_at.expect("the key never became a probe candidate");
    assert!(
        back_at <= 1_200,
        "back at {back_at}, not at the next 1 s tick"
    );
    // With traffic the request itself ends the time out, to the millisecond.
    let host = TestHost::default();
    let mut w2 = engine(cfg, 2);
    w2.start(&host, 0);
    w2.answered(&host, sent(0, 1, SentAs::Normal), SERVER, 503, None, 3_000);
    let until = w2.stores()[0].state().keys[1].down_until_ms;
    let (_, key, how) = use_key(w2.decide_for(&host, 0, until));
    assert_eq!(key, 1);
    assert!(matches!(how, SentAs::Probe { .. }), "{how:?}");
}

#[test]
fn a_fast_tick_does_not_flush_stats_renew_the_lease_or_advance_slow_pools_more_often() {
    let host = TestHost::default();
    // The rule's pool needs 100 ms ticks; the global pool keeps its 1 s period.
    let cfg = r#"{"name": "slow", "apiTokens": ["a", "b"], "failover": {"healthCheckModel": "m",
        "healthCheckCluster": "c", "cooldownDuration": 60000},
        "_rules_": [{"_match_route_": ["r"], "name": "fast", "apiTokens": ["c"],
                     "failover": {"cooldownDuration": 100}}]}"#;
    let mut w = engine(cfg, 1);
    assert_eq!(w.tick_period_ms(), 100);
    let (slow_id, fast_id) = (w.config().pools[0].id, w.config().pools[1].id);
    w.start(&host, 0);
    // A key of the slow pool is out, so its checks have something to plan.
    w.answered(&host, sent(0, 0, SentAs::Normal), SERVER, 503, None, 0);
    host.ops.borrow_mut().clear();
    let keyed = |host: &TestHost| host.metrics.get("ai_key_failover.pool.slow.requests_keyed");
    let mut flushed_at = Vec::new();
    for now in (100..=3_000).step_by(100) {
        w.decide(&host, Some(0), &Clock::at(now), &[]);
        let before = keyed(&host);
        w.tick(&host, now);
        w.health_checks_due(&host, now);
        if keyed(&host) != before {
            flushed_at.push(now);
        }
    }
    assert_eq!(
        flushed_at,
        vec![1_000, 2_000, 3_000],
        "stats flush once a second"
    );
    let lease_looks = host.count("get", &PoolKeys::of(slow_id).lease);
    assert!(
        (3..=4).contains(&lease_looks)
            && host.count("set", &PoolKeys::of(slow_id).lease) == lease_looks,
        "the lease is renewed once a second: {lease_looks} looks in 3 s"
    );
    // Ticks alone: 30 for the fast pool; the slow pool's are once a second (requests read
    // its epoch too, 30 of them).
    assert_eq!(host.count("get", &PoolKeys::of(fast_id).epoch), 30);
    let slow_epoch_reads = host.count("get", &PoolKeys::of(slow_id).epoch);
    assert!(
        (33..=34).contains(&slow_epoch_reads),
        "30 requests and one tick a second: {slow_epoch_reads}"
    );
}

#[test]
fn a_spent_budget_moves_every_worker_off_the_key_until_the_reset_with_no_probe_or_strike() {
    let host = TestHost::default();
    let cfg = r#"{"apiTokens": ["a", "b"], "failover": {"preemptiveCooldown": true}}"#;
    let (mut w1, mut w2) = two_workers(&host, cfg);
    let g = w1.profile_for(&mut NoFacts);
    let (p, k, _) = w1.key_for(&host, g, 0);
    assert!(w1.wants_budget(p).is_some());
    w1.succeeded(&host, sent(p, k, SentAs::Normal), 10);
    // 300 ms is below minCooldownDuration: the rest is clamped up to 1 s.
    w1.spend(&host, sent(p, k, SentAs::Normal), 300, &Clock::at(10));
    assert_never_given(&mut w2, &host, g, k, &[20, 600, 1_009]);
    let pool = "ai_key_failover.pool.";
    let counted = |name: &str| {
        host.metrics
            .values
            .borrow()
            .iter()
            .filter(|(n, _)| n.starts_with(pool) && n.ends_with(name))
            .map(|(_, v)| *v)
            .sum::<u64>()
    };
    assert_eq!(counted("class.budget_spent.keys_marked_down"), 1);
    assert_eq!(counted("class.rate_limit.keys_marked_down"), 0);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let (_, k2, how) = w2.key_for(&host, g, 1_010);
        assert_eq!(
            how,
            SentAs::Normal,
            "back in rotation at the reset: no probe"
        );
        seen.insert(k2);
    }
    assert!(seen.contains(&k));
    let key = &w2.stores()[0].state().keys[k];
    assert_eq!((key.strikes, key.consecutive_failures), (0, 0));
    assert_eq!(counted("keys_restored"), 1);
}

#[test]
fn preemptive_cooldown_is_read_only_when_on_and_the_provider_reports_budgets() {
    for (cfg, wanted) in [
        (
            r#"{"apiTokens": ["a"]}"#,
            crate::core::config::PREEMPTIVE_COOLDOWN_DEFAULT,
        ),
        (
            r#"{"apiTokens": ["a"], "failover": {"preemptiveCooldown": true}}"#,
            true,
        ),
        (
            r#"{"apiTokens": ["a"], "failover": {"preemptiveCooldown": false}}"#,
            false,
        ),
        (
            r#"{"apiTokens": ["a"], "provider": "gemini", "failover": {"preemptiveCooldown": true}}"#,
            false,
        ),
        (
            r#"{"apiTokens": ["a"], "failover": {"preemptiveCooldown": true, "enabled": false}}"#,
            false,
        ),
    ] {
        let e = engine(cfg, 1);
        assert_eq!(e.wants_budget(0).is_some(), wanted, "{cfg}");
    }
}

#[test]
fn a_session_keeps_its_key_moves_only_when_it_goes_out_and_returns_with_its_probe() {
    let host = TestHost::default();
    let cfg = r#"{"apiTokens": ["a", "b", "c", "d"], "affinity": {"header": "x-session-id"},
                  "failover": {"cooldownDuration": 1000}}"#;
    let mut w = engine(cfg, 1);
    w.start(&host, 0);
    let g = w.profile_for(&mut NoFacts);
    let session = |i: usize| Ask {
        session: Some(crate::core::affinity::session_hash(
            format!("s{i}").as_bytes(),
        )),
    };
    let pick = |w: &mut Engine, i: usize, now: u64| {
        use_key(w.decide_with(&host, g, &Clock::at(now), &[], session(i)))
    };
    let home: Vec<usize> = (0..40).map(|i| pick(&mut w, i, 0).1).collect();
    for _ in 0..3 {
        for (i, &k) in home.iter().enumerate() {
            assert_eq!(pick(&mut w, i, 0).1, k, "session {i}");
        }
    }
    let used: std::collections::HashSet<_> = home.iter().collect();
    assert!(used.len() >= 3, "sessions spread over the pool: {used:?}");
    let out = home[0];
    let p = g.unwrap();
    let v = w.verdict(p, 429, None);
    w.answered(&host, sent(p, out, SentAs::Normal), v, 429, None, 10);
    let moved: Vec<usize> = (0..40).map(|i| pick(&mut w, i, 20).1).collect();
    for (i, (&before, &now)) in home.iter().zip(&moved).enumerate() {
        if before == out {
            assert_ne!(now, out, "session {i} left the key that went out");
            assert_eq!(pick(&mut w, i, 30).1, now, "and stays on one other key");
        } else {
            assert_eq!(now, before, "session {i} of another key kept it");
        }
    }
    // After the cooldown, the key's own session probes it and its sessions come back.
    let (_, k, how) = pick(&mut w, 0, 1_200);
    assert_eq!(k, out);
    assert!(matches!(how, SentAs::Probe { .. }), "{how:?}");
    w.succeeded(&host, sent(p, out, how), 1_210);
    for (i, &k) in home.iter().enumerate() {
        assert_eq!(pick(&mut w, i, 1_220).1, k, "session {i} is home again");
    }
    // A request without the header uses `selection` as before.
    let plain: std::collections::HashSet<_> =
        (0..8).map(|_| w.key_for(&host, g, 1_230).1).collect();
    assert_eq!(plain.len(), 4);
}

#[test]
fn wait_mode_holds_without_counting_a_rejection_until_told() {
    let host = TestHost::default();
    let cfg = r#"{"name": "p", "apiTokens": ["a"], "onAllUnavailable": "wait", "maxWaitMs": 1500,
                  "failover": {"cooldownDuration": 1000}}"#;
    let mut w = engine(cfg, 1);
    w.start(&host, 0);
    let g = w.profile_for(&mut NoFacts);
    let p = g.unwrap();
    let v = w.verdict(p, 429, None);
    w.answered(&host, sent(p, 0, SentAs::Normal), v, 429, None, 0);
    for now in [10, 500] {
        assert!(matches!(
            w.decide_for(&host, p, now),
            Decision::Hold {
                max_wait_ms: 1_500,
                retry_after_secs: 1 | 2
            }
        ));
    }
    w.count_rejected(p);
    w.tick(&host, 600);
    assert_eq!(
        host.metrics.get("ai_key_failover.pool.p.requests_rejected"),
        1
    );
    let (_, _, how) = use_key(w.decide_for(&host, p, 1_200));
    assert!(
        matches!(how, SentAs::Probe { .. }),
        "the first held request to ask after the time out probes: {how:?}"
    );
    assert!(matches!(
        w.decide_for(&host, p, 1_201),
        Decision::Hold { .. }
    ));
}
