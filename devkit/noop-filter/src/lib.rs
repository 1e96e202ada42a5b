//! The benchmark's floor: an HTTP filter whose callbacks do nothing. Envoy still creates a
//! context per request and calls into the VM for each stream event, which is the cost every
//! proxy-wasm filter pays before doing any work. Built only for wasm32.

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::ContextType;

    struct Root;
    impl Context for Root {}
    impl RootContext for Root {
        fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Noop))
        }
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Noop;
    impl Context for Noop {}
    impl HttpContext for Noop {}

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| Box::new(Root));
    }}
}
