//! The proxy-wasm ABI's entry points: Envoy calls these, and each finds the context the call is
//! for (`wasm::contexts`) and runs its callback in `wasm::filter`.
//!
//! They take the place of the SDK's dispatcher. A Rust symbol cannot have the name of the SDK's
//! `#[no_mangle]` callback it replaces (the link would have two), so each is exported under
//! the plugin's name, and the build (`scripts/wasm-export-swap.py`) gives it the ABI's; then
//! `wasm-metadce` drops the SDK's dispatcher, which nothing reaches any more. Why: the SDK's
//! dispatch costs about 330 instructions per callback under callgrind (SipHash lookups, a boxed
//! trait object per context, a new request's root looked up twice), a request makes six, and
//! it panics on a context id it does not know.
//!
//! Nothing here can trap: a callback for a context the table does not know, or one whose
//! context is busy (the host called in while its callback ran), does what Envoy does for a
//! filter that does nothing.

// `no_mangle` counts as unsafe code (a symbol the linker may clash); the exports need names.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::types::Action;

use crate::wasm::contexts::{Contexts, Removed};
use crate::wasm::filter::{self, Request, Root};
use crate::wasm::host;

proxy_wasm::main! {{
    host::install_logger();
}}

thread_local! {
    static CONTEXTS: RefCell<Contexts<Root, Request>> = const { RefCell::new(Contexts::new()) };
}

fn root(id: u32) -> Option<Rc<RefCell<Root>>> {
    CONTEXTS.with(|table| table.try_borrow().ok()?.root(id))
}

fn request(id: u32) -> Option<Rc<RefCell<Request>>> {
    CONTEXTS.with(|table| table.try_borrow().ok()?.request(id))
}

/// Runs a context's callback; `fallback` when the context is unknown or busy.
fn run<C, T>(
    context: Option<Rc<RefCell<C>>>,
    fallback: T,
    callback: impl FnOnce(&mut C) -> T,
) -> T {
    let Some(context) = context else {
        return fallback;
    };
    let Ok(mut context) = context.try_borrow_mut() else {
        return fallback;
    };
    callback(&mut context)
}

fn on_request<T>(id: u32, fallback: T, callback: impl FnOnce(&mut Request) -> T) -> T {
    run(request(id), fallback, callback)
}

fn on_root<T>(id: u32, fallback: T, callback: impl FnOnce(&mut Root) -> T) -> T {
    run(root(id), fallback, callback)
}

#[no_mangle]
pub extern "C" fn ai_key_failover_on_context_create(context_id: u32, root_context_id: u32) {
    if root_context_id == 0 {
        CONTEXTS.with(|table| {
            if let Ok(mut table) = table.try_borrow_mut() {
                table.add_root(context_id, Root::new(context_id));
            }
        });
        return;
    }
    let Some(request) = on_root(root_context_id, None, |root| {
        Some(root.new_request(context_id))
    }) else {
        // No root: every callback of this request finds nothing and lets it through.
        return;
    };
    let replaced = CONTEXTS.with(|table| {
        table
            .try_borrow_mut()
            .ok()
            .and_then(|mut table| table.add_request(context_id, request))
    });
    drop(replaced);
}

#[no_mangle]
pub extern "C" fn ai_key_failover_on_vm_start(_context_id: u32, _size: usize) -> bool {
    true
}

#[no_mangle]
pub extern "C" fn ai_key_failover_on_configure(context_id: u32, size: usize) -> bool {
    on_root(context_id, false, |root| root.on_configure(size))
}

#[no_mangle]
pub extern "C" fn ai_key_failover_on_tick(context_id: u32) {
    on_root(context_id, (), Root::on_tick);
}

#[no_mangle]
pub extern "C" fn ai_key_failover_on_request_headers(
    context_id: u32,
    num_headers: usize,
    end_of_stream: bool,
) -> Action {
    on_request(context_id, Action::Continue, |r| {
        r.on_http_request_headers(num_headers, end_of_stream)
    })
}

#[no_mangle]
pub extern "C" fn ai_key_failover_on_request_body(
    context_id: u32,
    body_size: usize,
    end_of_stream: bool,
) -> Action {
    on_request(context_id, Action::Continue, |r| {
        r.on_http_request_body(body_size, end_of_stream)
    })
}

#[no_mangle]
pub extern "C" fn ai_key_failover_on_response_headers(
    context_id: u32,
    num_headers: usize,
    end_of_stream: bool,
) -> Action {
    on_request(context_id, Action::Continue, |r| {
        r.on_http_response_headers(num_headers, end_of_stream)
    })
}

#[no_mangle]
pub extern "C" fn ai_key_failover_on_response_body(
    context_id: u32,
    body_size: usize,
    end_of_stream: bool,
) -> Action {
    on_request(context_id, Action::Continue, |r| {
        r.on_http_response_body(body_size, end_of_stream)
    })
}

/// The last word on a context, however its request ended (answered, reset, client gone). The
/// build exports no `proxy_on_done` or `proxy_on_log`, so Envoy makes two VM calls fewer per
/// request (see `scripts/wasm-exports.json`): a request's last work runs when it is dropped.
#[no_mangle]
pub extern "C" fn ai_key_failover_on_delete(context_id: u32) {
    let removed = CONTEXTS.with(|table| match table.try_borrow_mut() {
        Ok(mut table) => table.remove(context_id),
        Err(_) => Removed::Unknown,
    });
    // Dropped here, with the table free: a request gives back its key, a root its engine.
    drop(removed);
}

/// The answer to one of our `dispatch_http_call`s (see `crate::wasm::callout`).
#[no_mangle]
pub extern "C" fn ai_key_failover_on_http_call_response(
    _root_context_id: u32,
    token_id: u32,
    num_headers: usize,
    body_size: usize,
    num_trailers: usize,
) {
    filter::call_answered(token_id, num_headers, body_size, num_trailers);
}
