//! The least a key-failover wasm filter must do, with nothing between Envoy and the work: on the
//! raw proxy-wasm ABI (no SDK), it sets `authorization` to the configured key (a JSON string) on
//! each request and reads `:status` from each response. It exports the same callbacks as the
//! plugin (the body callbacks too, which a failover filter needs for re-sends and error bodies),
//! so Envoy makes the same VM calls per request.

use std::cell::RefCell;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(map: u32, key: *const u8, key_size: usize, value: *const u8, value_size: usize) -> u32;
    fn proxy_get_header_map_value(map: u32, key: *const u8, key_size: usize, value: *mut *mut u8, value_size: *mut usize) -> u32;
}

const PLUGIN_CONFIGURATION: u32 = 7;
const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;

thread_local! {
    /// `Bearer <key>`, once configured.
    static KEY: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Takes ownership of a buffer the host allocated with `proxy_on_memory_allocate`.
fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    unsafe { Vec::from_raw_parts(data, size, size) }
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut buffer: Vec<u8> = Vec::with_capacity(size);
    let data = buffer.as_mut_ptr();
    std::mem::forget(buffer);
    data
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context_id: u32, _root_context_id: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_context_id: u32, _size: usize) -> bool {
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_context_id: u32, size: usize) -> bool {
    let (mut data, mut len) = (std::ptr::null_mut(), 0);
    unsafe { proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, size, &mut data, &mut len) };
    let text = owned(data, len);
    let key = text.strip_prefix(b"\"").and_then(|t| t.strip_suffix(b"\"")).unwrap_or(b"");
    KEY.with(|k| *k.borrow_mut() = [b"Bearer ".as_slice(), key].concat());
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_context_id: u32, _headers: usize, _end: bool) -> u32 {
    let name = b"authorization";
    KEY.with(|k| {
        let k = k.borrow();
        unsafe { proxy_replace_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len(), k.as_ptr(), k.len()) };
    });
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(_context_id: u32, _size: usize, _end: bool) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(_context_id: u32, _headers: usize, _end: bool) -> u32 {
    let name = b":status";
    let (mut data, mut len) = (std::ptr::null_mut(), 0);
    unsafe { proxy_get_header_map_value(RESPONSE_HEADERS, name.as_ptr(), name.len(), &mut data, &mut len) };
    drop(owned(data, len));
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(_context_id: u32, _size: usize, _end: bool) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context_id: u32) {}
