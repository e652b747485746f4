//! The few proxy-wasm host calls the plugin makes, without the SDK's panics.
//!
//! The SDK's `hostcalls` panic on any status they do not expect, and its String getters unwrap
//! UTF-8; a panic traps the VM and fails every request through it. These wrappers call the same
//! ABI functions and turn every failure into a `None` or an `Err` the caller can ignore.

use std::ptr::{null, null_mut};

use proxy_wasm::types::{BufferType, LogLevel, MapType, Status};

use crate::core::metrics::{MetricKind, MetricsHost};
use crate::core::store::{SharedData, StoreError};
use crate::wasm::callout::{dispatch_result, DispatchError};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: LogLevel, message_data: *const u8, message_size: usize) -> Status;
    fn proxy_get_log_level(return_level: *mut LogLevel) -> Status;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> Status;
    fn proxy_set_tick_period_milliseconds(period: u32) -> Status;
    fn proxy_get_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> Status;
    fn proxy_set_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> Status;
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_remove_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
    ) -> Status;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> Status;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> Status;
    fn proxy_define_metric(
        metric_type: proxy_wasm::types::MetricType,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> Status;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> Status;
    fn proxy_record_metric(metric_id: u32, value: u64) -> Status;
    fn proxy_continue_stream(stream_type: proxy_wasm::types::StreamType) -> Status;
    // Status as a plain integer: these answers decide whether the VM keeps running, and a host
    // may return a code that is no variant of the SDK's enum.
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_milliseconds: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
}

/// Takes ownership of a buffer the host allocated through the SDK's `proxy_on_memory_allocate`
/// (a boxed slice of exactly `size` bytes).
fn owned(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the host wrote `size` bytes into memory it obtained from our allocator with
    // capacity `size`, and hands its ownership to us.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

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
        // SAFETY: pointer and length describe `message`, alive for the call.
        let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
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
    let mut level = LogLevel::Info;
    // SAFETY: `level` is a valid place for the host to write a log level.
    let status = unsafe { proxy_get_log_level(&mut level) };
    let filter = match (status, level) {
        (Status::Ok, LogLevel::Trace) => log::LevelFilter::Trace,
        (Status::Ok, LogLevel::Debug) => log::LevelFilter::Debug,
        (Status::Ok, LogLevel::Info) => log::LevelFilter::Info,
        (Status::Ok, LogLevel::Warn) => log::LevelFilter::Warn,
        (Status::Ok, LogLevel::Error) => log::LevelFilter::Error,
        (Status::Ok, LogLevel::Critical) => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    };
    log::set_max_level(filter);
}

pub fn now_ms() -> u64 {
    let mut nanos: u64 = 0;
    // SAFETY: `nanos` is a valid place for the host to write the time.
    match unsafe { proxy_get_current_time_nanoseconds(&mut nanos) } {
        Status::Ok => nanos / 1_000_000,
        _ => 0,
    }
}

pub fn set_tick_period_ms(period: u32) -> bool {
    // SAFETY: plain value argument.
    unsafe { proxy_set_tick_period_milliseconds(period) == Status::Ok }
}

pub fn plugin_configuration() -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: out-pointers are valid; the host allocates the result through our allocator.
    match unsafe {
        proxy_get_buffer_bytes(
            BufferType::PluginConfiguration,
            0,
            usize::MAX,
            &mut data,
            &mut size,
        )
    } {
        Status::Ok => owned(data, size),
        _ => None,
    }
}

fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as above.
    match unsafe {
        proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size)
    } {
        Status::Ok => Some(owned(data, size).unwrap_or_default()),
        _ => None,
    }
}

pub fn request_header(name: &str) -> Option<Vec<u8>> {
    header(MapType::HttpRequestHeaders, name)
}

pub fn response_header(name: &str) -> Option<Vec<u8>> {
    header(MapType::HttpResponseHeaders, name)
}

pub fn set_request_header(name: &str, value: &[u8]) -> bool {
    // SAFETY: pointers and lengths describe live slices.
    unsafe {
        proxy_replace_header_map_value(
            MapType::HttpRequestHeaders,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        ) == Status::Ok
    }
}

pub fn set_response_header(name: &str, value: &[u8]) -> bool {
    // SAFETY: pointers and lengths describe live slices.
    unsafe {
        proxy_replace_header_map_value(
            MapType::HttpResponseHeaders,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        ) == Status::Ok
    }
}

pub fn remove_request_header(name: &str) -> bool {
    // SAFETY: pointer and length describe a live slice.
    unsafe {
        proxy_remove_header_map_value(MapType::HttpRequestHeaders, name.as_ptr(), name.len())
            == Status::Ok
    }
}

/// A property by path, e.g. `["xds", "route_name"]`.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let serialized = path.join("\0");
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as above.
    match unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) }
    {
        Status::Ok => owned(data, size),
        _ => None,
    }
}

/// Sends a local reply instead of forwarding the request (or instead of a held response).
pub fn send_local_response(
    status: u32,
    details: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> bool {
    let map = crate::wasm::header_map::serialize_header_map(headers);
    // SAFETY: every pointer and length describes a live slice for the call.
    unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            if body.is_empty() {
                null()
            } else {
                body.as_ptr()
            },
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        ) == Status::Ok
    }
}

fn header_map(map_type: MapType) -> Vec<(String, Vec<u8>)> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: out-pointers are valid; the host allocates the result through our allocator.
    match unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) } {
        Status::Ok => owned(data, size)
            .map(|bytes| crate::wasm::header_map::deserialize_header_map(&bytes))
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn buffer(buffer_type: BufferType, max: usize) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as above.
    match unsafe { proxy_get_buffer_bytes(buffer_type, 0, max, &mut data, &mut size) } {
        Status::Ok => owned(data, size),
        _ => None,
    }
}

/// Every request header, names lowercased, in one host call.
pub fn request_headers() -> Vec<(String, Vec<u8>)> {
    header_map(MapType::HttpRequestHeaders)
}

/// Replaces the first `size` bytes of the (buffered) request body with `body`.
pub fn set_request_body(size: usize, body: &[u8]) -> bool {
    // SAFETY: pointer and length describe a live slice.
    unsafe {
        proxy_set_buffer_bytes(
            BufferType::HttpRequestBody,
            0,
            size,
            body.as_ptr(),
            body.len(),
        ) == Status::Ok
    }
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
    let mut token: u32 = 0;
    // SAFETY: every pointer and length describes a live slice for the call; `token` is a
    // valid out-pointer.
    let status = unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            headers.as_ptr(),
            headers.len(),
            if body.is_empty() {
                null()
            } else {
                body.as_ptr()
            },
            body.len(),
            trailers.as_ptr(),
            trailers.len(),
            timeout,
            &mut token,
        )
    };
    dispatch_result(status, token)
}

/// Makes `context_id` the context later host calls act on (as the SDK does before it hands a
/// context an answer, and from a root callback to resume or answer a held request); false when
/// the host knows no such context (it is gone: a client that hung up).
pub fn set_effective_context(context_id: u32) -> bool {
    // SAFETY: plain value argument.
    unsafe { proxy_set_effective_context(context_id) == 0 }
}

/// Lets a held request continue upstream.
pub fn resume_request() -> bool {
    // SAFETY: plain value argument.
    unsafe { proxy_continue_stream(proxy_wasm::types::StreamType::HttpRequest) == Status::Ok }
}

/// Lets a held response continue to the client.
pub fn resume_response() -> bool {
    // SAFETY: plain value argument.
    unsafe { proxy_continue_stream(proxy_wasm::types::StreamType::HttpResponse) == Status::Ok }
}

/// Every response header, names lowercased, in one host call.
pub fn response_headers() -> Vec<(String, Vec<u8>)> {
    header_map(MapType::HttpResponseHeaders)
}

/// The response body chunk this callback was given (up to `max` bytes).
pub fn response_body(max: usize) -> Option<Vec<u8>> {
    buffer(BufferType::HttpResponseBody, max)
}

/// Proxy shared data of this VM's `vm_id`.
pub struct HostShared;

impl SharedData for HostShared {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        let mut cas: u32 = 0;
        // SAFETY: as above.
        match unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        } {
            Status::Ok => Ok((owned(data, size), (cas != 0).then_some(cas))),
            Status::NotFound => Ok((None, None)),
            other => Err(StoreError::Host(format!(
                "get_shared_data returned status {}",
                other as u32
            ))),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        // SAFETY: as above.
        match unsafe {
            proxy_set_shared_data(
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
                cas.unwrap_or(0),
            )
        } {
            Status::Ok => Ok(()),
            Status::CasMismatch => Err(StoreError::CasMismatch),
            other => Err(StoreError::Host(format!(
                "set_shared_data returned status {}",
                other as u32
            ))),
        }
    }
}

impl MetricsHost for HostShared {
    fn define(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let metric_type = match kind {
            MetricKind::Counter => proxy_wasm::types::MetricType::Counter,
            MetricKind::Gauge => proxy_wasm::types::MetricType::Gauge,
        };
        let mut id: u32 = 0;
        // SAFETY: pointer and length describe `name`; `id` is a valid out-pointer.
        match unsafe { proxy_define_metric(metric_type, name.as_ptr(), name.len(), &mut id) } {
            Status::Ok => Some(id),
            _ => None,
        }
    }

    fn increment(&self, id: u32, delta: u64) {
        let offset = i64::try_from(delta).unwrap_or(i64::MAX);
        // SAFETY: plain value arguments.
        let _ = unsafe { proxy_increment_metric(id, offset) };
    }

    fn record(&self, id: u32, value: u64) {
        // SAFETY: plain value arguments.
        let _ = unsafe { proxy_record_metric(id, value) };
    }
}
