//! The proxy-wasm ABI imports and every `unsafe` of the wasm host.
//!
//! Each import gets one safe function here that passes slices as pointer and length, gives the
//! host valid out-pointers, and takes ownership of what the host allocated; it returns the
//! host's status as it came. What a status means (and never panicking on one) is `host`'s
//! business, which holds no `unsafe`.

use std::ptr::{null, null_mut};

use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status, StreamType};

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
        metric_type: MetricType,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> Status;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> Status;
    fn proxy_record_metric(metric_id: u32, value: u64) -> Status;
    fn proxy_continue_stream(stream_type: StreamType) -> Status;
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
/// (a boxed slice of exactly `size` bytes); None when the host gave none.
fn owned(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the host wrote `size` bytes into memory it obtained from our allocator with
    // capacity `size`, and hands its ownership to us.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Some hosts want a null pointer, not a dangling one, for an empty body.
fn ptr_or_null(bytes: &[u8]) -> *const u8 {
    if bytes.is_empty() {
        null()
    } else {
        bytes.as_ptr()
    }
}

/// A call that returns a host-allocated buffer through out-pointers: `Ok(None)` when the call
/// succeeded but handed back no buffer.
fn returning_buffer(
    call: impl FnOnce(*mut *mut u8, *mut usize) -> Status,
) -> Result<Option<Vec<u8>>, Status> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    match call(&mut data, &mut size) {
        Status::Ok => Ok(owned(data, size)),
        other => Err(other),
    }
}

pub fn log(level: LogLevel, message: &str) -> Status {
    // SAFETY: pointer and length describe `message`, alive for the call.
    unsafe { proxy_log(level, message.as_ptr(), message.len()) }
}

pub fn get_log_level() -> Result<LogLevel, Status> {
    let mut level = LogLevel::Info;
    // SAFETY: `level` is a valid place for the host to write a log level.
    match unsafe { proxy_get_log_level(&mut level) } {
        Status::Ok => Ok(level),
        other => Err(other),
    }
}

pub fn get_current_time_nanos() -> Result<u64, Status> {
    let mut nanos: u64 = 0;
    // SAFETY: `nanos` is a valid place for the host to write the time.
    match unsafe { proxy_get_current_time_nanoseconds(&mut nanos) } {
        Status::Ok => Ok(nanos),
        other => Err(other),
    }
}

pub fn set_tick_period_ms(period: u32) -> Status {
    // SAFETY: plain value argument.
    unsafe { proxy_set_tick_period_milliseconds(period) }
}

pub fn get_buffer(
    buffer_type: BufferType,
    start: usize,
    max: usize,
) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: the out-pointers are valid; the host allocates the result through our allocator.
    returning_buffer(|data, size| unsafe {
        proxy_get_buffer_bytes(buffer_type, start, max, data, size)
    })
}

pub fn set_buffer(buffer_type: BufferType, start: usize, size: usize, bytes: &[u8]) -> Status {
    // SAFETY: pointer and length describe a live slice.
    unsafe { proxy_set_buffer_bytes(buffer_type, start, size, bytes.as_ptr(), bytes.len()) }
}

/// The map in the ABI's serialized form (`crate::wasm::header_map`).
pub fn get_header_map_pairs(map: MapType) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: the out-pointers are valid; the host allocates the result through our allocator.
    returning_buffer(|data, size| unsafe { proxy_get_header_map_pairs(map, data, size) })
}

pub fn get_header_map_value(map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: pointer and length describe `name`; the out-pointers are valid.
    returning_buffer(|data, size| unsafe {
        proxy_get_header_map_value(map, name.as_ptr(), name.len(), data, size)
    })
}

pub fn replace_header_map_value(map: MapType, name: &str, value: &[u8]) -> Status {
    // SAFETY: pointers and lengths describe live slices.
    unsafe {
        proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    }
}

pub fn remove_header_map_value(map: MapType, name: &str) -> Status {
    // SAFETY: pointer and length describe a live slice.
    unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) }
}

/// `path` is the property's segments joined by NUL.
pub fn get_property(path: &str) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: pointer and length describe `path`; the out-pointers are valid.
    returning_buffer(|data, size| unsafe {
        proxy_get_property(path.as_ptr(), path.len(), data, size)
    })
}

/// The value (None when the host handed none back) and the CAS number the host wrote.
pub fn get_shared_data(key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
    let mut cas: u32 = 0;
    // SAFETY: pointer and length describe `key`; the out-pointers are valid.
    let value = returning_buffer(|data, size| unsafe {
        proxy_get_shared_data(key.as_ptr(), key.len(), data, size, &mut cas)
    })?;
    Ok((value, cas))
}

pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Status {
    // SAFETY: pointers and lengths describe live slices.
    unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) }
}

pub fn define_metric(metric_type: MetricType, name: &str) -> Result<u32, Status> {
    let mut id: u32 = 0;
    // SAFETY: pointer and length describe `name`; `id` is a valid out-pointer.
    match unsafe { proxy_define_metric(metric_type, name.as_ptr(), name.len(), &mut id) } {
        Status::Ok => Ok(id),
        other => Err(other),
    }
}

pub fn increment_metric(id: u32, offset: i64) -> Status {
    // SAFETY: plain value arguments.
    unsafe { proxy_increment_metric(id, offset) }
}

pub fn record_metric(id: u32, value: u64) -> Status {
    // SAFETY: plain value arguments.
    unsafe { proxy_record_metric(id, value) }
}

pub fn continue_stream(stream: StreamType) -> Status {
    // SAFETY: plain value argument.
    unsafe { proxy_continue_stream(stream) }
}

/// The raw status (see the import) and the token the host wrote.
pub fn http_call(
    cluster: &str,
    headers: &[u8],
    body: &[u8],
    trailers: &[u8],
    timeout_ms: u32,
) -> (u32, u32) {
    let mut token: u32 = 0;
    // SAFETY: every pointer and length describes a live slice for the call; `token` is a
    // valid out-pointer.
    let status = unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            headers.as_ptr(),
            headers.len(),
            ptr_or_null(body),
            body.len(),
            trailers.as_ptr(),
            trailers.len(),
            timeout_ms,
            &mut token,
        )
    };
    (status, token)
}

/// The raw status: 0 is Ok.
pub fn set_effective_context(context_id: u32) -> u32 {
    // SAFETY: plain value argument.
    unsafe { proxy_set_effective_context(context_id) }
}

/// `headers` in the ABI's serialized form.
pub fn send_local_response(status: u32, details: &str, headers: &[u8], body: &[u8]) -> Status {
    // SAFETY: every pointer and length describes a live slice for the call.
    unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            ptr_or_null(body),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    }
}
