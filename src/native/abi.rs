//! Envoy 1.40's dynamic-module ABI (`abi.h`, ABI version v0.2.0): the few callbacks the filter
//! calls, the hooks Envoy calls, and every `unsafe` of the native host.
//!
//! Declarations were checked against Envoy's `source/extensions/dynamic_modules/abi.h` (and
//! `abi/abi.h`) of the 1.38-1.41 line and against the symbols `envoy` 1.40.0 exports
//! (`test/e2e/test_native.py` compares them on every `make test`). C enums are `int`-sized: they
//! are passed as `u32` with the values below. Envoy resolves callbacks lazily, so a callback the
//! binary lacks would only fail at its first call: that is what the symbol test guards.
//!
//! No panic crosses this boundary: every exported hook runs its body under `catch_unwind` (the
//! native build unwinds, `[profile.native]`) and on a panic logs it and answers as if the filter
//! were absent (continue, no change).
//!
//! Sizes and counts here come from Envoy: arithmetic on them is checked (the lint below).

#![deny(clippy::arithmetic_side_effects)]

use std::ffi::c_void;
use std::ptr::{null, null_mut};

use super::filter::{Config, Filter};
use super::guard;

/// What `envoy_dynamic_module_on_program_init` returns: Envoy 1.40 logs "Dynamic module ABI
/// version v0.2.0 matched." for it.
const ABI_VERSION: &[u8] = b"v0.2.0\0";

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const u8,
    length: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleBuffer {
    ptr: *const u8,
    length: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> Self {
        ModuleBuffer {
            ptr: bytes.as_ptr(),
            length: bytes.len(),
        }
    }
}

/// Same layout for module-owned and Envoy-owned headers.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HttpHeader {
    key_ptr: *const u8,
    key_length: usize,
    value_ptr: *const u8,
    value_length: usize,
}

// envoy_dynamic_module_type_http_header_type
const REQUEST_HEADER: u32 = 0;
const RESPONSE_HEADER: u32 = 2;
// envoy_dynamic_module_type_http_body_type
const RECEIVED_REQUEST_BODY: u32 = 0;
const BUFFERED_REQUEST_BODY: u32 = 1;
const RECEIVED_RESPONSE_BODY: u32 = 2;
// envoy_dynamic_module_type_log_level
const LOG_TRACE: u32 = 0;
const LOG_DEBUG: u32 = 1;
const LOG_INFO: u32 = 2;
const LOG_WARN: u32 = 3;
const LOG_ERROR: u32 = 4;
// envoy_dynamic_module_type_metrics_result / http_callout_init_result / http_callout_result
const METRICS_SUCCESS: u32 = 0;
const CALLOUT_INIT_SUCCESS: u32 = 0;
const CALLOUT_SUCCESS: u32 = 0;

/// `envoy_dynamic_module_type_attribute_id` values the filter reads.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Attribute {
    ResponseCodeDetails = 16,
    UpstreamAddress = 41,
    XdsClusterName = 57,
    XdsRouteName = 61,
}

// The status enums returned from hooks: 0 is Continue in each of them.
pub const CONTINUE: u32 = 0;
/// `..._request_headers_status_StopIteration`: the local reply is being sent.
pub const HEADERS_STOP_ITERATION: u32 = 1;
/// `..._request_headers_status_StopAllIterationAndWatermark`: a request held by `wait`; its body
/// stays in Envoy (flow control stops reading more) and reaches the body hook once it continues,
/// as wasm's `Action::Pause` does.
pub const REQUEST_HEADERS_STOP_ALL: u32 = 4;
/// `..._request_body_status_StopIterationAndBuffer`: Envoy keeps the chunks until we continue.
pub const BODY_STOP_AND_BUFFER: u32 = 1;
/// `..._response_headers_status_StopAllIterationAndWatermark`: a re-send's answer will replace
/// this one, so neither its headers nor its body may pass (with plain StopIteration, the body's
/// Continue would send both). What wasm's `Action::Pause` becomes in Envoy.
pub const RESPONSE_HEADERS_STOP_ALL: u32 = 4;

extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

    fn envoy_dynamic_module_callback_http_get_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: *mut c_void,
        header_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: *mut c_void,
        header_type: u32,
        result_headers: *mut HttpHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter: *mut c_void,
        status_code: u32,
        headers: *mut HttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter: *mut c_void,
        body_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: *mut c_void,
        body_type: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_body_size(
        filter: *mut c_void,
        body_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_drain_body(
        filter: *mut c_void,
        body_type: u32,
        bytes: usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_append_body(
        filter: *mut c_void,
        body_type: u32,
        data: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_upstream_remote_address(
        filter: *mut c_void,
        address_out: *mut EnvoyBuffer,
        port_out: *mut u32,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_clear_route_cache(filter: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: *mut c_void,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut HttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_continue_encoding(filter: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: *mut c_void) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);
    fn envoy_dynamic_module_callback_get_concurrency() -> u32;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: *mut c_void,
        attribute: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        config: *mut c_void,
    ) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: *mut c_void,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut HttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;
}

/// Copies an Envoy-owned buffer: Envoy keeps it valid only until the hook returns or a setter
/// runs, so nothing borrowed from it may outlive the call.
fn copy(buffer: EnvoyBuffer) -> Option<Vec<u8>> {
    if buffer.ptr.is_null() {
        return None;
    }
    // SAFETY: Envoy hands a pointer to `length` readable bytes, valid for this hook.
    Some(unsafe { std::slice::from_raw_parts(buffer.ptr, buffer.length) }.to_vec())
}

fn copy_headers(headers: &[HttpHeader]) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .filter_map(|h| {
            let key = copy(EnvoyBuffer {
                ptr: h.key_ptr,
                length: h.key_length,
            })?;
            let value = copy(EnvoyBuffer {
                ptr: h.value_ptr,
                length: h.value_length,
            })
            .unwrap_or_default();
            Some((String::from_utf8_lossy(&key).to_ascii_lowercase(), value))
        })
        .collect()
}

fn module_headers(headers: &[(&str, &[u8])]) -> Vec<HttpHeader> {
    headers
        .iter()
        .map(|(k, v)| HttpHeader {
            key_ptr: k.as_ptr(),
            key_length: k.len(),
            value_ptr: v.as_ptr(),
            value_length: v.len(),
        })
        .collect()
}

/// A stream's and a configuration's callout take the same arguments.
type CalloutStart = unsafe extern "C" fn(
    *mut c_void,
    *mut u64,
    ModuleBuffer,
    *mut HttpHeader,
    usize,
    ModuleBuffer,
    u64,
) -> u32;

/// Starts a callout with `start` for `owner` (the stream or configuration it belongs to); its
/// id, or `None` when Envoy could not start it.
fn callout(
    start: CalloutStart,
    owner: *mut c_void,
    cluster: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
    timeout_ms: u64,
) -> Option<u64> {
    let mut headers = module_headers(headers);
    let mut id: u64 = 0;
    // SAFETY: `owner` is the object `start` takes, alive for the call; every other pointer
    // describes a live slice or value for the call.
    let result = unsafe {
        start(
            owner,
            &mut id,
            ModuleBuffer::of(cluster.as_bytes()),
            headers.as_mut_ptr(),
            headers.len(),
            ModuleBuffer::of(body),
            timeout_ms,
        )
    };
    (result == CALLOUT_INIT_SUCCESS).then_some(id)
}

/// The stream a hook was called for. Only handed out for the duration of that hook.
pub struct Stream {
    ptr: *mut c_void,
}

impl Stream {
    fn header(&self, map: u32, name: &str) -> Option<Vec<u8>> {
        let mut out = EnvoyBuffer {
            ptr: null(),
            length: 0,
        };
        // SAFETY: `self.ptr` is the filter Envoy passed to the running hook; key and out-pointer
        // are valid for the call; a null size pointer is allowed.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.ptr,
                map,
                ModuleBuffer::of(name.as_bytes()),
                &mut out,
                0,
                null_mut(),
            )
        };
        if !found {
            return None;
        }
        copy(out)
    }

    fn set(&self, map: u32, name: &str, value: Option<&[u8]>) -> bool {
        let value = value.map_or(
            ModuleBuffer {
                ptr: null(),
                length: 0,
            },
            ModuleBuffer::of,
        );
        // SAFETY: as above; a null value removes the header.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.ptr,
                map,
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        }
    }

    /// Every header of `map` as Envoy holds it: its buffers are valid only for this hook.
    fn raw_headers(&self, map: u32) -> Vec<HttpHeader> {
        // SAFETY: as above.
        let count = unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.ptr, map) };
        if count == 0 {
            return Vec::new();
        }
        let mut out = vec![
            HttpHeader {
                key_ptr: null(),
                key_length: 0,
                value_ptr: null(),
                value_length: 0,
            };
            count
        ];
        // SAFETY: `out` has room for the `count` headers Envoy just reported.
        if !unsafe {
            envoy_dynamic_module_callback_http_get_headers(self.ptr, map, out.as_mut_ptr())
        } {
            return Vec::new();
        }
        out
    }

    fn headers(&self, map: u32) -> Vec<(String, Vec<u8>)> {
        copy_headers(&self.raw_headers(map))
    }

    /// Which of `names` the request carries, from one look at the header map: cheaper than a
    /// call per name, since each call into Envoy costs about as much as the map walk.
    pub fn request_has<const N: usize>(&self, names: [&str; N]) -> [bool; N] {
        let mut found = [false; N];
        for header in &self.raw_headers(REQUEST_HEADER) {
            if header.key_ptr.is_null() {
                continue;
            }
            // SAFETY: Envoy's key buffer, valid for this hook; only compared, never kept.
            let key = unsafe { std::slice::from_raw_parts(header.key_ptr, header.key_length) };
            for (name, hit) in names.iter().zip(found.iter_mut()) {
                *hit |= key.eq_ignore_ascii_case(name.as_bytes());
            }
        }
        found
    }

    pub fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.header(REQUEST_HEADER, name)
    }
    pub fn set_request_header(&self, name: &str, value: &[u8]) -> bool {
        self.set(REQUEST_HEADER, name, Some(value))
    }
    pub fn remove_request_header(&self, name: &str) -> bool {
        self.set(REQUEST_HEADER, name, None)
    }
    pub fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.header(RESPONSE_HEADER, name)
    }
    pub fn set_response_header(&self, name: &str, value: &[u8]) -> bool {
        self.set(RESPONSE_HEADER, name, Some(value))
    }
    pub fn response_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.headers(RESPONSE_HEADER)
    }
    /// Every request header, names lowercased.
    pub fn request_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.headers(REQUEST_HEADER)
    }

    /// Sends a request of our own for this stream; its answer comes to `Filter::callout_done`
    /// on this stream's worker. `None`: Envoy could not start it.
    pub fn http_callout(
        &self,
        cluster: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
        timeout_ms: u64,
    ) -> Option<u64> {
        callout(
            envoy_dynamic_module_callback_http_filter_http_callout,
            self.ptr,
            cluster,
            headers,
            body,
            timeout_ms,
        )
    }

    /// Lets a held response continue to the client.
    pub fn continue_encoding(&self) {
        // SAFETY: as above.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_encoding(self.ptr) }
    }

    /// Lets a held request continue upstream. Envoy runs this filter's body hook for what it
    /// buffered before it returns, so call it from no hook of this filter.
    pub fn continue_decoding(&self) {
        // SAFETY: as above.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.ptr) }
    }

    /// A way to run `Filter::scheduled` on this stream's worker later, from any thread.
    pub fn scheduler(&self) -> Option<Scheduler> {
        // SAFETY: as above.
        let ptr = unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(self.ptr) };
        (!ptr.is_null()).then_some(Scheduler {
            ptr,
            commit: envoy_dynamic_module_callback_http_filter_scheduler_commit,
            delete: envoy_dynamic_module_callback_http_filter_scheduler_delete,
        })
    }

    pub fn attribute(&self, attribute: Attribute) -> Option<Vec<u8>> {
        let mut out = EnvoyBuffer {
            ptr: null(),
            length: 0,
        };
        // SAFETY: as above.
        let found = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.ptr,
                attribute as u32,
                &mut out,
            )
        };
        if !found {
            return None;
        }
        copy(out)
    }

    /// Whether the stream already has an upstream host: only an upstream filter's does when its
    /// request headers arrive.
    pub fn has_upstream_host(&self) -> bool {
        let mut address = EnvoyBuffer {
            ptr: null(),
            length: 0,
        };
        let mut port: u32 = 0;
        // SAFETY: as above; both out-pointers are valid for the call.
        unsafe {
            envoy_dynamic_module_callback_http_get_upstream_remote_address(
                self.ptr,
                &mut address,
                &mut port,
            )
        }
    }

    /// Makes Envoy select the route again for the headers as they are now. Envoy's wasm host
    /// does this on every request-header change; a dynamic module asks for it.
    pub fn clear_route_cache(&self) {
        // SAFETY: as above.
        unsafe { envoy_dynamic_module_callback_http_clear_route_cache(self.ptr) }
    }

    /// Sends a local reply. Envoy runs this filter's encoder hooks before it returns, so the
    /// caller must hold no lock those hooks take.
    pub fn send_response(
        &self,
        status: u16,
        headers: &[(&str, &[u8])],
        body: &[u8],
        details: &str,
    ) {
        let mut headers = module_headers(headers);
        // SAFETY: every pointer describes a live slice for the call.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.ptr,
                u32::from(status),
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(details.as_bytes()),
            )
        }
    }

    fn body(&self, body_type: u32, max: usize) -> Vec<u8> {
        // SAFETY: as above.
        let count =
            unsafe { envoy_dynamic_module_callback_http_get_body_chunks_size(self.ptr, body_type) };
        if count == 0 {
            return Vec::new();
        }
        let mut chunks = vec![
            EnvoyBuffer {
                ptr: null(),
                length: 0,
            };
            count
        ];
        // SAFETY: `chunks` has room for the `count` buffers Envoy just reported.
        if !unsafe {
            envoy_dynamic_module_callback_http_get_body_chunks(
                self.ptr,
                body_type,
                chunks.as_mut_ptr(),
            )
        } {
            return Vec::new();
        }
        let mut body = Vec::new();
        for chunk in chunks {
            let room = max.saturating_sub(body.len());
            if room == 0 {
                break;
            }
            if chunk.ptr.is_null() {
                continue;
            }
            // SAFETY: each buffer is `length` readable bytes owned by Envoy for this hook.
            let bytes = unsafe { std::slice::from_raw_parts(chunk.ptr, chunk.length) };
            body.extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
        }
        body
    }

    /// The size of the chunk of request body this hook was given.
    pub fn received_request_body_size(&self) -> usize {
        // SAFETY: as above.
        unsafe { envoy_dynamic_module_callback_http_get_body_size(self.ptr, RECEIVED_REQUEST_BODY) }
    }

    /// The chunk of request body this hook was given, up to `max` bytes.
    pub fn received_request_body(&self, max: usize) -> Vec<u8> {
        self.body(RECEIVED_REQUEST_BODY, max)
    }

    /// The chunk of response body this hook was given, up to `max` bytes.
    pub fn received_response_body(&self, max: usize) -> Vec<u8> {
        self.body(RECEIVED_RESPONSE_BODY, max)
    }

    /// The whole request body at its end: what Envoy buffered for us, then the last chunk.
    pub fn whole_request_body(&self) -> Vec<u8> {
        let mut body = self.body(BUFFERED_REQUEST_BODY, usize::MAX);
        body.extend(self.body(RECEIVED_REQUEST_BODY, usize::MAX));
        body
    }

    /// Replaces the request body (buffered part and last chunk) with `body`.
    pub fn replace_request_body(&self, body: &[u8]) -> bool {
        // SAFETY: as above.
        unsafe {
            for body_type in [BUFFERED_REQUEST_BODY, RECEIVED_REQUEST_BODY] {
                let size = envoy_dynamic_module_callback_http_get_body_size(self.ptr, body_type);
                if size > 0 {
                    envoy_dynamic_module_callback_http_drain_body(self.ptr, body_type, size);
                }
            }
            envoy_dynamic_module_callback_http_append_body(
                self.ptr,
                RECEIVED_REQUEST_BODY,
                ModuleBuffer::of(body),
            )
        }
    }
}

/// Envoy's object for one filter configuration. Its stats and scheduler are thread-safe in
/// Envoy, and it outlives every filter and callout made from it (Envoy destroys it last).
#[derive(Clone, Copy)]
pub struct ConfigHandle {
    ptr: *mut c_void,
}

// SAFETY: see the type's doc: the callbacks used through it may be called from any thread.
unsafe impl Send for ConfigHandle {}
// SAFETY: as above.
unsafe impl Sync for ConfigHandle {}

impl ConfigHandle {
    fn define(&self, gauge: bool, name: &str) -> Option<usize> {
        let mut id: usize = 0;
        // SAFETY: name and out-pointer are valid for the call; no labels.
        let result = unsafe {
            if gauge {
                envoy_dynamic_module_callback_http_filter_config_define_gauge(
                    self.ptr,
                    ModuleBuffer::of(name.as_bytes()),
                    null_mut(),
                    0,
                    &mut id,
                )
            } else {
                envoy_dynamic_module_callback_http_filter_config_define_counter(
                    self.ptr,
                    ModuleBuffer::of(name.as_bytes()),
                    null_mut(),
                    0,
                    &mut id,
                )
            }
        };
        (result == METRICS_SUCCESS).then_some(id)
    }

    pub fn define_counter(&self, name: &str) -> Option<usize> {
        self.define(false, name)
    }
    pub fn define_gauge(&self, name: &str) -> Option<usize> {
        self.define(true, name)
    }
    pub fn increment_counter(&self, id: usize, value: u64) {
        // SAFETY: plain values; an unknown id is refused by Envoy, not trusted.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_increment_counter(
                self.ptr,
                id,
                null_mut(),
                0,
                value,
            );
        }
    }
    pub fn set_gauge(&self, id: usize, value: u64) {
        // SAFETY: as above.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_set_gauge(
                self.ptr,
                id,
                null_mut(),
                0,
                value,
            );
        }
    }

    pub fn scheduler(&self) -> Option<Scheduler> {
        // SAFETY: plain pointer argument.
        let ptr =
            unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.ptr) };
        (!ptr.is_null()).then_some(Scheduler {
            ptr,
            commit: envoy_dynamic_module_callback_http_filter_config_scheduler_commit,
            delete: envoy_dynamic_module_callback_http_filter_config_scheduler_delete,
        })
    }

    /// Sends a request of our own; the answer comes to `Config::callout_done` on the main
    /// thread. Envoy may answer a callout that fails at once before this returns.
    pub fn http_callout(
        &self,
        cluster: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
        timeout_ms: u64,
    ) -> Option<u64> {
        callout(
            envoy_dynamic_module_callback_http_filter_config_http_callout,
            self.ptr,
            cluster,
            headers,
            body,
            timeout_ms,
        )
    }
}

/// One of Envoy's schedulers: an event committed from any thread runs a hook later on the
/// thread the scheduler belongs to. A configuration's runs `Config::scheduled` on the main
/// thread; a stream's runs `Filter::scheduled` on its worker, and never once the stream is gone
/// (Envoy keeps only a weak reference to the stream in it).
pub struct Scheduler {
    ptr: *mut c_void,
    commit: unsafe extern "C" fn(*mut c_void, u64),
    delete: unsafe extern "C" fn(*mut c_void),
}

// SAFETY: Envoy's schedulers exist to be committed from other threads (they post to a
// dispatcher), and deleting one touches no more than its weak reference to its owner.
unsafe impl Send for Scheduler {}
// SAFETY: as above.
unsafe impl Sync for Scheduler {}

impl Scheduler {
    pub fn commit(&self) {
        // SAFETY: the scheduler lives until `drop`; `commit` is its own kind's.
        unsafe { (self.commit)(self.ptr, 0) }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: created by its kind's scheduler_new, deleted once, with its kind's delete.
        unsafe { (self.delete)(self.ptr) }
    }
}

/// Envoy's worker count; only on the main thread (a configuration is created there).
pub fn concurrency() -> u32 {
    // SAFETY: no arguments; `Config::new` calls it from `on_http_filter_config_new`, on the
    // main thread, as Envoy requires.
    unsafe { envoy_dynamic_module_callback_get_concurrency() }
}

struct Logger;

static LOGGER: Logger = Logger;

fn envoy_level(level: log::Level) -> u32 {
    match level {
        log::Level::Error => LOG_ERROR,
        log::Level::Warn => LOG_WARN,
        log::Level::Info => LOG_INFO,
        log::Level::Debug => LOG_DEBUG,
        log::Level::Trace => LOG_TRACE,
    }
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        // SAFETY: plain value argument.
        unsafe { envoy_dynamic_module_callback_log_enabled(envoy_level(metadata.level())) }
    }

    /// Formats only what Envoy's `dynamic_modules` logger would print.
    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        // SAFETY: the buffer describes `message`, alive for the call.
        unsafe {
            envoy_dynamic_module_callback_log(
                envoy_level(record.level()),
                ModuleBuffer::of(message.as_bytes()),
            )
        }
    }

    fn flush(&self) {}
}

thread_local! {
    /// The filter whose hook is running on this thread. Envoy calls some hooks from inside a
    /// callback: a local reply runs the stream's encoder hooks before `send_response` returns,
    /// and a callout that fails at once may be answered inside `http_callout`. Such a nested
    /// hook for the same filter is answered as if the filter were absent (it has nothing to do
    /// there: the outer hook holds the stream's state), so no second `&mut` to it ever exists.
    static RUNNING: std::cell::Cell<*const c_void> = const { std::cell::Cell::new(null()) };
}

/// Runs `body` with the module's filter of a stream, from the pointer `on_http_filter_new`
/// returned; `fallback` when the pointer is null or a hook of this filter is already running.
///
/// SAFETY (for callers): Envoy passes back exactly that pointer, calls a stream's hooks on its
/// one worker thread, and never after `on_http_filter_destroy`.
unsafe fn with_filter<T>(
    ptr: *const c_void,
    fallback: T,
    body: impl FnOnce(&mut Filter<'static>) -> T,
) -> T {
    if ptr.is_null() || RUNNING.with(|r| r.get()) == ptr {
        return fallback;
    }
    let Some(filter) = (ptr as *mut Filter<'static>).as_mut() else {
        return fallback;
    };
    let outer = RUNNING.with(|r| r.replace(ptr));
    let value = body(filter);
    RUNNING.with(|r| r.set(outer));
    value
}

/// SAFETY (for callers): the pointer `on_http_filter_config_new` returned, not yet destroyed.
/// Envoy destroys a config only after every stream and callout made from it, so a filter may
/// keep the reference for its whole life (`Filter<'static>`).
unsafe fn config<'a>(ptr: *const c_void) -> Option<&'a Config> {
    (ptr as *const Config).as_ref()
}

/// A callout's answer, copied: empty when the callout failed (reset, body over the limit).
///
/// SAFETY (for callers): the pointers and sizes Envoy passed to a callout-done hook.
unsafe fn callout_answer(
    result: u32,
    headers: *const HttpHeader,
    headers_size: usize,
    body_chunks: *const EnvoyBuffer,
    body_chunks_size: usize,
) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    if result != CALLOUT_SUCCESS {
        return (Vec::new(), Vec::new());
    }
    let headers = if headers.is_null() {
        Vec::new()
    } else {
        copy_headers(std::slice::from_raw_parts(headers, headers_size))
    };
    let mut body = Vec::new();
    if !body_chunks.is_null() {
        for chunk in std::slice::from_raw_parts(body_chunks, body_chunks_size) {
            body.extend(copy(*chunk).unwrap_or_default());
        }
    }
    (headers, body)
}

fn stream(ptr: *mut c_void) -> Stream {
    Stream { ptr }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
    guard("on_program_init", null(), || {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Trace);
        ABI_VERSION.as_ptr()
    })
}

/// # Safety
/// Called by Envoy with its config object and two buffers valid for the call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy_ptr: *mut c_void,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard("on_http_filter_config_new", null(), || {
        let name = copy(name).unwrap_or_default();
        let text = copy(config).unwrap_or_default();
        match Config::new(
            ConfigHandle {
                ptr: config_envoy_ptr,
            },
            &name,
            &text,
        ) {
            Some(config) => Box::into_raw(Box::new(config)) as *const c_void,
            // Null makes Envoy refuse the filter (fail at boot, NACK an update).
            None => null(),
        }
    })
}

/// # Safety
/// Called once by Envoy with the pointer `on_http_filter_config_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(ptr: *const c_void) {
    guard("on_http_filter_config_destroy", (), || {
        if !ptr.is_null() {
            drop(Box::from_raw(ptr as *mut Config));
        }
    })
}

/// # Safety
/// Called by Envoy on the main thread with the config pointer it was given.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _config_envoy_ptr: *mut c_void,
    config_ptr: *const c_void,
    _event_id: u64,
) {
    guard("on_http_filter_config_scheduled", (), || {
        if let Some(config) = config(config_ptr) {
            config.scheduled();
        }
    })
}

/// # Safety
/// Called by Envoy on the main thread; headers and chunks are valid for the call (may be null).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy_ptr: *mut c_void,
    config_ptr: *const c_void,
    callout_id: u64,
    result: u32,
    headers: *const HttpHeader,
    headers_size: usize,
    body_chunks: *const EnvoyBuffer,
    body_chunks_size: usize,
) {
    guard("on_http_filter_config_http_callout_done", (), || {
        let Some(config) = config(config_ptr) else {
            return;
        };
        let (headers, body) =
            callout_answer(result, headers, headers_size, body_chunks, body_chunks_size);
        config.callout_done(callout_id, &headers, &body);
    })
}

/// # Safety
/// Called by Envoy with the config pointer and its filter object for a new stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config_ptr: *const c_void,
    _filter_envoy_ptr: *mut c_void,
) -> *const c_void {
    guard("on_http_filter_new", null(), || match config(config_ptr) {
        Some(config) => Box::into_raw(Box::new(Filter::new(config))) as *const c_void,
        None => null(),
    })
}

/// # Safety
/// Called once by Envoy with the pointer `on_http_filter_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(ptr: *const c_void) {
    guard("on_http_filter_destroy", (), || {
        if !ptr.is_null() {
            drop(Box::from_raw(ptr as *mut Filter<'static>));
        }
    })
}

/// Exports hooks that hand the filter its stream and `end_of_stream` and answer with its
/// status: each runs the filter's method of the same name, under `guard` and `with_filter`.
macro_rules! stream_hooks {
    ($($export:ident => $method:ident;)*) => {$(
        /// # Safety
        /// Called by Envoy with the stream's filter objects, on the stream's worker.
        #[no_mangle]
        pub unsafe extern "C" fn $export(
            envoy: *mut c_void,
            ptr: *const c_void,
            end_of_stream: bool,
        ) -> u32 {
            guard(concat!("on_http_filter_", stringify!($method)), CONTINUE, || {
                with_filter(ptr, CONTINUE, |f| f.$method(&stream(envoy), end_of_stream))
            })
        }
    )*};
}

stream_hooks! {
    envoy_dynamic_module_on_http_filter_request_headers => request_headers;
    envoy_dynamic_module_on_http_filter_request_body => request_body;
    envoy_dynamic_module_on_http_filter_response_headers => response_headers;
    envoy_dynamic_module_on_http_filter_response_body => response_body;
}

/// # Safety
/// As above; the last hook of a stream before `on_http_filter_destroy`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _envoy: *mut c_void,
    ptr: *const c_void,
) {
    guard("on_http_filter_stream_complete", (), || {
        with_filter(ptr, (), |f| f.complete());
    })
}

/// Exports hooks that do nothing: Envoy requires every hook of the ABI, and a status hook
/// answers `CONTINUE`.
macro_rules! unused_hooks {
    ($($export:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty = $value:expr)?;)*) => {$(
        #[no_mangle]
        pub extern "C" fn $export($($arg: $ty),*) $(-> $ret)? {
            $($value)?
        }
    )*};
}

// Hooks Envoy requires the module to export but this filter has no use for: trailers pass as
// they are, it opens no HTTP streams of its own, keeps no per-route config, and leaves
// watermarks and local replies to Envoy.
unused_hooks! {
    envoy_dynamic_module_on_http_filter_request_trailers(
        _envoy: *mut c_void,
        _ptr: *const c_void,
    ) -> u32 = CONTINUE;
    envoy_dynamic_module_on_http_filter_response_trailers(
        _envoy: *mut c_void,
        _ptr: *const c_void,
    ) -> u32 = CONTINUE;
    envoy_dynamic_module_on_http_filter_per_route_config_destroy(_ptr: *const c_void);
    envoy_dynamic_module_on_http_filter_http_stream_headers(
        _envoy: *mut c_void,
        _ptr: *const c_void,
        _stream_id: u64,
        _headers: *const HttpHeader,
        _headers_size: usize,
        _end_stream: bool,
    );
    envoy_dynamic_module_on_http_filter_http_stream_data(
        _envoy: *mut c_void,
        _ptr: *const c_void,
        _stream_id: u64,
        _data: *const EnvoyBuffer,
        _data_count: usize,
        _end_stream: bool,
    );
    envoy_dynamic_module_on_http_filter_http_stream_trailers(
        _envoy: *mut c_void,
        _ptr: *const c_void,
        _stream_id: u64,
        _trailers: *const HttpHeader,
        _trailers_size: usize,
    );
    envoy_dynamic_module_on_http_filter_http_stream_complete(
        _envoy: *mut c_void,
        _ptr: *const c_void,
        _stream_id: u64,
    );
    envoy_dynamic_module_on_http_filter_http_stream_reset(
        _envoy: *mut c_void,
        _ptr: *const c_void,
        _stream_id: u64,
        _reason: u32,
    );
    envoy_dynamic_module_on_http_filter_config_http_stream_headers(
        _config_envoy_ptr: *mut c_void,
        _config_ptr: *const c_void,
        _stream_id: u64,
        _headers: *const HttpHeader,
        _headers_size: usize,
        _end_stream: bool,
    );
    envoy_dynamic_module_on_http_filter_config_http_stream_data(
        _config_envoy_ptr: *mut c_void,
        _config_ptr: *const c_void,
        _stream_id: u64,
        _data: *const EnvoyBuffer,
        _data_count: usize,
        _end_stream: bool,
    );
    envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
        _config_envoy_ptr: *mut c_void,
        _config_ptr: *const c_void,
        _stream_id: u64,
        _trailers: *const HttpHeader,
        _trailers_size: usize,
    );
    envoy_dynamic_module_on_http_filter_config_http_stream_complete(
        _config_envoy_ptr: *mut c_void,
        _config_ptr: *const c_void,
        _stream_id: u64,
    );
    envoy_dynamic_module_on_http_filter_config_http_stream_reset(
        _config_envoy_ptr: *mut c_void,
        _config_ptr: *const c_void,
        _stream_id: u64,
        _reason: u32,
    );
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
        _envoy: *mut c_void,
        _ptr: *const c_void,
    );
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
        _envoy: *mut c_void,
        _ptr: *const c_void,
    );
    envoy_dynamic_module_on_http_filter_local_reply(
        _envoy: *mut c_void,
        _ptr: *const c_void,
        _response_code: u32,
        _details: EnvoyBuffer,
        _reset_imminent: bool,
    ) -> u32 = CONTINUE;
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const c_void {
    log::error!(
        "ai_key_failover takes no per-route config: per-route behaviour comes from _rules_"
    );
    null()
}

/// # Safety
/// Called by Envoy on the stream's worker; headers and chunks are valid for the call (may be
/// null).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    envoy: *mut c_void,
    ptr: *const c_void,
    callout_id: u64,
    result: u32,
    headers: *const HttpHeader,
    headers_size: usize,
    body_chunks: *const EnvoyBuffer,
    body_chunks_size: usize,
) {
    guard("on_http_filter_http_callout_done", (), || {
        let (headers, body) =
            callout_answer(result, headers, headers_size, body_chunks, body_chunks_size);
        with_filter(ptr, (), |f| {
            f.callout_done(&stream(envoy), callout_id, &headers, &body)
        })
    })
}

/// # Safety
/// Called by Envoy on the stream's worker for an event its scheduler committed.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    envoy: *mut c_void,
    ptr: *const c_void,
    _event_id: u64,
) {
    guard("on_http_filter_scheduled", (), || {
        let s = stream(envoy);
        // Continued once the filter's hook is over: Envoy runs its body hook from inside.
        if with_filter(ptr, false, |f| f.scheduled(&s)) {
            s.continue_decoding();
        }
    })
}
