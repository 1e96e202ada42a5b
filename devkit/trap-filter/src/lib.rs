//! A module that traps when asked, for the containment test (`tests/tests/vm_containment.rs`).
//! The connector filter itself has no panicking path; this one stands in for "a bug we have
//! not found", so the test can show what Envoy's failure policy does to a dead VM and to the
//! requests in flight on it. Built only for wasm32; never shipped.
//!
//! Every request is answered locally: `200 alive` (so the test sees the VM working), except
//! - `x-trap: 1`: the VM panics (a trap, like any panic inside proxy-wasm);
//! - `x-hold: 1`: the request is paused and never resumed (a request waiting on a call).

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType};

    struct Root;
    impl Context for Root {}
    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            true
        }
        fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Trap))
        }
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Trap;
    impl Context for Trap {}
    impl HttpContext for Trap {
        #[allow(clippy::panic)]
        fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
            if self.get_http_request_header("x-trap").is_some() {
                panic!("deliberate trap (trap-filter)");
            }
            if self.get_http_request_header("x-hold").is_some() {
                return Action::Pause;
            }
            self.send_http_response(200, vec![("content-type", "text/plain")], Some(b"alive\n"));
            Action::Pause
        }
    }

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| Box::new(Root));
    }}
}
