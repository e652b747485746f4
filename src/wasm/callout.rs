//! Our own `dispatch_http_call` bookkeeping: which context an answer belongs to.
//!
//! The SDK's `hostcalls::dispatch_http_call` panics on any host status but Ok, BadArgument and
//! InternalFailure, and the SDK's `proxy_on_http_call_response` panics on a token it did not
//! register; a panic traps the VM and fails every request through it. So the plugin issues the
//! call through the raw import (`host::dispatch_http_call`, where every status but Ok is an
//! error), records the token here, and the build exports the plugin's own
//! `proxy_on_http_call_response` (`wasm::exports`, renamed by `scripts/wasm-export-swap.py`) in
//! place of the SDK's; it routes the answer through this registry (`wasm::filter::call_answered`).
//!
//! Envoy issues every call on the caller's root context and passes that root's id with the
//! answer, not the caller's; tokens are unique per VM. So, like the SDK, the registry keys by
//! token and remembers the context that made the call, whose id the answer handler makes the
//! effective context before touching its stream.

use std::collections::HashMap;
use std::fmt;

/// A host status other than Ok from `proxy_http_call`: the call was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DispatchError {
    pub status: u32,
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names as in the proxy-wasm ABI; a host may return codes the SDK's enum lacks.
        let name = match self.status {
            1 => "NotFound",
            2 => "BadArgument",
            3 => "SerializationFailure",
            4 => "ParseFailure",
            5 => "BadExpression",
            6 => "InvalidMemoryAccess",
            7 => "Empty",
            8 => "CasMismatch",
            9 => "ResultMismatch",
            10 => "InternalFailure",
            11 => "BrokenConnection",
            12 => "Unimplemented",
            _ => "unknown status",
        };
        write!(f, "{name} ({})", self.status)
    }
}

/// What `proxy_http_call` returned, as the caller sees it. The status is read as a plain
/// integer: a host may return a code that is no variant of the SDK's `Status` enum.
pub fn dispatch_result(status: u32, token: u32) -> Result<u32, DispatchError> {
    match status {
        0 => Ok(token),
        status => Err(DispatchError { status }),
    }
}

/// Calls in flight: token → (context that made the call, what its answer is for).
pub struct Callouts<T> {
    pending: HashMap<u32, (u32, T)>,
}

impl<T> Default for Callouts<T> {
    fn default() -> Self {
        Callouts {
            pending: HashMap::new(),
        }
    }
}

/// Where an answer goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<T> {
    /// No call of ours has this token (the SDK would panic here): the answer is dropped.
    Unknown,
    /// The context that made the call is gone (the host refused to make it effective).
    ContextGone(T),
    /// The context is effective now: hand it the answer.
    Deliver(T),
}

impl<T> Callouts<T> {
    /// Remembers a call. A token the host hands out twice replaces the older entry, whose
    /// answer can no longer be told apart; it is returned so the caller can give it up.
    pub fn register(&mut self, token: u32, context_id: u32, target: T) -> Option<T> {
        self.pending
            .insert(token, (context_id, target))
            .map(|(_, old)| old)
    }

    /// Routes an answer: forgets the call, then asks the host (`make_effective`) to make the
    /// caller's context current.
    pub fn route(&mut self, token: u32, make_effective: impl FnOnce(u32) -> bool) -> Route<T> {
        match self.pending.remove(&token) {
            None => Route::Unknown,
            Some((context_id, target)) if make_effective(context_id) => Route::Deliver(target),
            Some((_, target)) => Route::ContextGone(target),
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ok_is_a_sent_call_and_no_status_is_unexpected() {
        assert_eq!(dispatch_result(0, 42), Ok(42));
        // Every other status, including those the SDK's dispatch_http_call panics on
        // (anything but 2 and 10) and codes no enum knows, is an error the caller handles.
        for status in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 99, u32::MAX] {
            assert_eq!(dispatch_result(status, 42), Err(DispatchError { status }));
        }
        assert_eq!(
            DispatchError { status: 6 }.to_string(),
            "InvalidMemoryAccess (6)"
        );
        assert_eq!(
            DispatchError { status: 77 }.to_string(),
            "unknown status (77)"
        );
    }

    #[test]
    fn an_answer_goes_to_the_context_that_made_the_call_once() {
        let mut calls = Callouts::default();
        assert_eq!(calls.register(7, 3, "retry of request 3"), None);
        assert_eq!(calls.register(8, 1, "health check"), None);
        let mut made_effective = Vec::new();
        assert_eq!(
            calls.route(7, |id| {
                made_effective.push(id);
                true
            }),
            Route::Deliver("retry of request 3")
        );
        assert_eq!(
            made_effective,
            vec![3],
            "the caller's context, not the root's"
        );
        // A second answer with the same token, or a token never handed out, goes nowhere.
        assert_eq!(calls.route(7, |_| true), Route::Unknown);
        assert_eq!(calls.route(12345, |_| true), Route::Unknown);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls.route(8, |id| id == 1), Route::Deliver("health check"));
        assert!(calls.is_empty());
    }

    #[test]
    fn an_answer_for_a_context_that_is_gone_is_not_delivered() {
        let mut calls = Callouts::default();
        calls.register(5, 9, "retry");
        assert_eq!(calls.route(5, |_| false), Route::ContextGone("retry"));
        assert!(calls.is_empty(), "forgotten either way");
    }

    #[test]
    fn a_token_handed_out_twice_replaces_the_older_call() {
        let mut calls = Callouts::default();
        calls.register(5, 1, "old");
        assert_eq!(calls.register(5, 2, "new"), Some("old"));
        let mut context = 0;
        assert_eq!(
            calls.route(5, |id| {
                context = id;
                true
            }),
            Route::Deliver("new")
        );
        assert_eq!(context, 2);
    }
}
