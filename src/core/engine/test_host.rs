//! What the engine's tests (and other modules' tests) run against: a host that keeps shared data
//! and stats as Envoy does, a log capture, and the few steps every test repeats.

use super::*;
use crate::core::config;
use crate::core::metrics::fake::FakeMetrics;
use crate::core::metrics::MetricKind;
use crate::core::rules::RequestFacts;
use crate::core::status::{FailureClass, Verdict};
use crate::core::store::fake::FakeShared;
use crate::core::store::{SharedData, StoreError};

/// Proxy shared data and stats as Envoy keeps them; other modules' tests use it too. It also
/// notes every shared-data read and write, for tests that count host calls.
#[derive(Default)]
pub(crate) struct TestHost {
    pub(crate) shared: FakeShared,
    pub(crate) metrics: FakeMetrics,
    /// `("get" | "set", entry name)`, in order.
    pub(crate) ops: std::cell::RefCell<Vec<(&'static str, String)>>,
}

impl TestHost {
    /// The value of pool `pool`'s stat `metric` (0 if never written).
    pub(crate) fn pool_stat(&self, pool: &str, metric: &str) -> u64 {
        self.metrics
            .get(&crate::core::metrics::pool_metric_name(pool, metric))
    }

    /// How many `op`s (`"get"` or `"set"`) went to the shared-data entry `entry`.
    pub(crate) fn count(&self, op: &str, entry: &str) -> usize {
        self.ops
            .borrow()
            .iter()
            .filter(|(o, k)| *o == op && k == entry)
            .count()
    }
}

impl SharedData for TestHost {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        self.ops.borrow_mut().push(("get", key.to_string()));
        self.shared.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.ops.borrow_mut().push(("set", key.to_string()));
        self.shared.set(key, value, cas)
    }
}

impl MetricsHost for TestHost {
    fn define(&self, kind: MetricKind, name: &str) -> Option<u32> {
        self.metrics.define(kind, name)
    }
    fn increment(&self, id: u32, delta: u64) {
        self.metrics.increment(id, delta)
    }
    fn record(&self, id: u32, value: u64) {
        self.metrics.record(id, value)
    }
}

/// A request no rule matches: it gets the global profile.
pub(crate) struct NoFacts;
impl RequestFacts for NoFacts {
    fn route_name(&mut self) -> Option<String> {
        None
    }
    fn cluster_name(&mut self) -> Option<String> {
        None
    }
    fn host(&mut self) -> Option<String> {
        None
    }
}

impl Engine {
    /// `record` of an answer judged `verdict` to a request sent as `sent`, at `now`.
    pub(crate) fn answered(
        &mut self,
        host: &dyn Host,
        sent: Assignment,
        verdict: Verdict,
        status: u16,
        hint_ms: Option<u64>,
        now: u64,
    ) {
        self.record(host, sent, verdict, status, hint_ms, &Clock::at(now));
    }

    /// The key a request of `profile` with no earlier attempts gets at `now`.
    pub(crate) fn key_for(
        &mut self,
        host: &TestHost,
        profile: Option<usize>,
        now: u64,
    ) -> (usize, usize, SentAs) {
        use_key(self.decide(host, profile, &Clock::at(now), &[]))
    }

    /// `answered` with a 200.
    pub(crate) fn succeeded(&mut self, host: &dyn Host, sent: Assignment, now: u64) {
        self.answered(host, sent, Verdict::Success, 200, None, now);
    }

    pub(crate) fn decide_for(&mut self, host: &TestHost, profile: usize, now: u64) -> Decision {
        self.decide(host, Some(profile), &Clock::at(now), &[])
    }
}

pub(crate) fn engine(json: &str, seed: u64) -> Engine {
    Engine::new(config::parse(json.as_bytes()).unwrap(), seed)
}

/// Two workers (VMs) of one config sharing `host`, both started at 0.
pub(crate) fn two_workers(host: &TestHost, json: &str) -> (Engine, Engine) {
    let (mut w1, mut w2) = (engine(json, 1), engine(json, 2));
    w1.start(host, 0);
    w2.start(host, 0);
    (w1, w2)
}

/// No request of `profile` is given `key` at any of `times` (four asked at each).
pub(crate) fn assert_never_given(
    w: &mut Engine,
    host: &TestHost,
    profile: Option<usize>,
    key: usize,
    times: &[u64],
) {
    for &now in times {
        for _ in 0..4 {
            let (_, given, _) = w.key_for(host, profile, now);
            assert_ne!(given, key, "at {now}");
        }
    }
}

pub(crate) fn use_key(d: Decision) -> (usize, usize, SentAs) {
    match d {
        Decision::UseKey(a) => (a.profile, a.key, a.sent_as),
        other => panic!("expected a key, got {other:?}"),
    }
}

pub(crate) fn sent(profile: usize, key: usize, how: SentAs) -> Assignment {
    Assignment {
        profile,
        key,
        sent_as: how,
    }
}

pub(crate) const RATE: Verdict = Verdict::KeyFailure(FailureClass::RateLimit);
pub(crate) const SERVER: Verdict = Verdict::KeyFailure(FailureClass::ServerError);

/// Captures this thread's log lines, so a test can assert on what the engine says.
pub(crate) struct CaptureLog;
thread_local! {
    static LOGGED: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}
impl log::Log for CaptureLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        LOGGED.with(|l| {
            l.borrow_mut()
                .push(format!("{} {}", record.level(), record.args()))
        });
    }
    fn flush(&self) {}
}
static CAPTURE: CaptureLog = CaptureLog;

/// The lines logged on this thread while `f` ran.
pub(crate) fn logged_by(f: impl FnOnce()) -> Vec<String> {
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Trace);
    LOGGED.with(|l| l.borrow_mut().clear());
    f();
    LOGGED.with(|l| l.take())
}
