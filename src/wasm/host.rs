//! The few proxy-wasm host calls the plugin makes, without the SDK's panics.
//!
//! The SDK's `hostcalls` panic on any status they do not expect, and its String getters unwrap
//! UTF-8; a panic traps the VM and fails every request through it. These wrappers call the same
//! ABI functions (through `hostcalls`, which holds every `unsafe` of the wasm host) and turn
//! every failure into a `None` or an `Err` the caller can ignore.

use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status, StreamType};

use crate::core::metrics::{MetricKind, MetricsHost};
use crate::core::store::{SharedData, StoreError};
use crate::wasm::callout::{dispatch_result, DispatchError};
use crate::wasm::hostcalls;

struct Logger;

static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Trace => LogLevel::Trace,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        let message = record.args().to_string();
        let _ = hostcalls::log(level, &message);
    }

    fn flush(&self) {}
}

/// Installs the logger. Runs in `_initialize`, where the host allows no calls back into it.
pub fn install_logger() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// Follows the host's log level, so messages the host would drop are not even formatted.
pub fn sync_log_level() {
    let filter = match hostcalls::get_log_level() {
        Ok(LogLevel::Trace) => log::LevelFilter::Trace,
        Ok(LogLevel::Debug) => log::LevelFilter::Debug,
        Ok(LogLevel::Info) => log::LevelFilter::Info,
        Ok(LogLevel::Warn) => log::LevelFilter::Warn,
        Ok(LogLevel::Error) => log::LevelFilter::Error,
        Ok(LogLevel::Critical) => log::LevelFilter::Off,
        Err(_) => log::LevelFilter::Info,
    };
    log::set_max_level(filter);
}

pub fn now_ms() -> u64 {
    hostcalls::get_current_time_nanos().map_or(0, |nanos| nanos / 1_000_000)
}

pub fn set_tick_period_ms(period: u32) -> bool {
    hostcalls::set_tick_period_ms(period) == Status::Ok
}

pub fn plugin_configuration() -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
        .ok()
        .flatten()
}

fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    // A header that is there with no bytes is an empty value, not an absent header.
    hostcalls::get_header_map_value(map, name)
        .ok()
        .map(Option::unwrap_or_default)
}

pub fn request_header(name: &str) -> Option<Vec<u8>> {
    header(MapType::HttpRequestHeaders, name)
}

pub fn response_header(name: &str) -> Option<Vec<u8>> {
    header(MapType::HttpResponseHeaders, name)
}

pub fn set_request_header(name: &str, value: &[u8]) -> bool {
    hostcalls::replace_header_map_value(MapType::HttpRequestHeaders, name, value) == Status::Ok
}

pub fn set_response_header(name: &str, value: &[u8]) -> bool {
    hostcalls::replace_header_map_value(MapType::HttpResponseHeaders, name, value) == Status::Ok
}

pub fn remove_request_header(name: &str) -> bool {
    hostcalls::remove_header_map_value(MapType::HttpRequestHeaders, name) == Status::Ok
}

/// A property by path, e.g. `["xds", "route_name"]`.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(&path.join("\0")).ok().flatten()
}

/// Sends a local reply instead of forwarding the request (or instead of a held response).
pub fn send_local_response(
    status: u32,
    details: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> bool {
    let map = crate::wasm::header_map::serialize_header_map(headers);
    hostcalls::send_local_response(status, details, &map, body) == Status::Ok
}

fn header_map(map_type: MapType) -> Vec<(String, Vec<u8>)> {
    hostcalls::get_header_map_pairs(map_type)
        .ok()
        .flatten()
        .map(|bytes| crate::wasm::header_map::deserialize_header_map(&bytes))
        .unwrap_or_default()
}

fn buffer(buffer_type: BufferType, max: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(buffer_type, 0, max).ok().flatten()
}

/// Every request header, names lowercased, in one host call.
pub fn request_headers() -> Vec<(String, Vec<u8>)> {
    header_map(MapType::HttpRequestHeaders)
}

/// Replaces the first `size` bytes of the (buffered) request body with `body`.
pub fn set_request_body(size: usize, body: &[u8]) -> bool {
    hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body) == Status::Ok
}

/// The request body chunk this callback was given (up to `max` bytes).
pub fn request_body(max: usize) -> Option<Vec<u8>> {
    buffer(BufferType::HttpRequestBody, max)
}

/// The response headers and body of a finished `dispatch_http_call`.
pub fn call_response(body_size: usize) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    (
        header_map(MapType::HttpCallResponseHeaders),
        buffer(BufferType::HttpCallResponseBody, body_size).unwrap_or_default(),
    )
}

/// Sends a request of our own to `cluster` through the raw import: unlike the SDK's
/// `dispatch_http_call`, which panics on any status but Ok/BadArgument/InternalFailure, every
/// status but Ok is an `Err` the caller handles. The SDK does not learn the token, so the
/// caller must register it (`crate::wasm::callout`) for `wasm::filter::on_http_call_response` to route the
/// answer. Header values that are not UTF-8 are dropped, as they were when this went through
/// the SDK's text API: a re-send carries what it always carried.
pub fn dispatch_http_call(
    cluster: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
    timeout_ms: u64,
) -> Result<u32, DispatchError> {
    let text: Vec<(&str, &[u8])> = headers
        .iter()
        .filter(|(_, v)| std::str::from_utf8(v).is_ok())
        .copied()
        .collect();
    let headers = crate::wasm::header_map::serialize_header_map(&text);
    let trailers = crate::wasm::header_map::serialize_header_map(&[]);
    let timeout = u32::try_from(timeout_ms).unwrap_or(u32::MAX);
    let (status, token) = hostcalls::http_call(cluster, &headers, body, &trailers, timeout);
    dispatch_result(status, token)
}

/// Makes `context_id` the context later host calls act on (as the SDK does before it hands a
/// context an answer, and from a root callback to resume or answer a held request); false when
/// the host knows no such context (it is gone: a client that hung up).
pub fn set_effective_context(context_id: u32) -> bool {
    hostcalls::set_effective_context(context_id) == 0
}

/// Lets a held request continue upstream.
pub fn resume_request() -> bool {
    hostcalls::continue_stream(StreamType::HttpRequest) == Status::Ok
}

/// Lets a held response continue to the client.
pub fn resume_response() -> bool {
    hostcalls::continue_stream(StreamType::HttpResponse) == Status::Ok
}

/// Every response header, names lowercased, in one host call.
pub fn response_headers() -> Vec<(String, Vec<u8>)> {
    header_map(MapType::HttpResponseHeaders)
}

/// The response body chunk this callback was given (up to `max` bytes).
pub fn response_body(max: usize) -> Option<Vec<u8>> {
    buffer(BufferType::HttpResponseBody, max)
}

/// The engine's host on proxy-wasm: the proxy shared data of this VM's `vm_id`, and Envoy's
/// stats.
pub struct WasmHost;

impl SharedData for WasmHost {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((value, cas)) => Ok((value, (cas != 0).then_some(cas))),
            Err(Status::NotFound) => Ok((None, None)),
            Err(other) => Err(StoreError::Host(format!(
                "get_shared_data returned status {}",
                other as u32
            ))),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, value, cas.unwrap_or(0)) {
            Status::Ok => Ok(()),
            Status::CasMismatch => Err(StoreError::CasMismatch),
            other => Err(StoreError::Host(format!(
                "set_shared_data returned status {}",
                other as u32
            ))),
        }
    }
}

impl MetricsHost for WasmHost {
    fn define(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let metric_type = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
        };
        hostcalls::define_metric(metric_type, name).ok()
    }

    fn increment(&self, id: u32, delta: u64) {
        let offset = i64::try_from(delta).unwrap_or(i64::MAX);
        let _ = hostcalls::increment_metric(id, offset);
    }

    fn record(&self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }
}
