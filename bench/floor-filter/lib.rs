//! The floors a wasm filter cannot go below. Without configuration it does nothing: Envoy still
//! creates a context and calls into the VM for every request event. Configured with a JSON
//! string (a key), it does the least a key-failover filter must: sets `authorization` on the
//! request and reads `:status` from the response.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { key: None }) });
}}

struct Root {
    /// `Bearer <key>` when configured with a JSON string.
    key: Option<std::rc::Rc<str>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        self.key = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .map(|k| format!("Bearer {k}").into());
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            key: self.key.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    key: Option<std::rc::Rc<str>>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(key) = &self.key {
            self.set_http_request_header("authorization", Some(key));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.key.is_some() {
            let _ = self.get_http_response_header_bytes(":status");
        }
        Action::Continue
    }
}
