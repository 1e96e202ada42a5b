//! The benchmark's second floor: an HTTP filter that makes exactly the host calls the connector
//! filter makes for a warm forwarded request (pinned by `wasm/host/tests/warm_request.rs`), in the
//! same order, with no decision behind them: no token check, no cache, no access rule. What it
//! costs over the do-nothing module is what Envoy and its wasm runtime charge any filter that
//! reads and edits a request this way; what the connector filter costs over it is the filter's
//! own work. Built only for wasm32; never shipped.
//!
//! Two variants, for measuring what the floor is made of (docs/benchmark-log.md, "2026-12-03,
//! afternoon"); build them into their own target directory, so the benchmark's floor stays the
//! default build:
//! `CARGO_TARGET_DIR=.work/floor-variant cargo build -p floor-filter --target wasm32-wasip1
//! --release --features <feature>`, then `bench --warm-only 1 --baseline-module <it>`.
//! - `one-map-write`: the four request-header replaces made as one write of the whole map
//!   (`proxy_set_header_map_pairs`): 8 calls.
//! - `no-routing-edits`: without the `:path`, `:authority` and route-header replaces (8 calls),
//!   as if Envoy routed and rewrote per connector itself; run it with `--baseline-plain-route 1`.
//! - `no-clock-no-counters`: without the clock and the two counters (8 calls), as if the clock
//!   were read and the counters handed over on a once-a-second tick instead of per request
//!   (docs/benchmark-log.md, "2026-12-03, late night").
//! - `no-properties`: without the two access-log properties (9 calls): what the access log's
//!   fields cost (docs/benchmark-log.md, "2026-12-04").

// The variants replace the same calls in two ways: together they would measure neither.
#[cfg(all(feature = "one-map-write", feature = "no-routing-edits"))]
compile_error!(
    "floor-filter: the features one-map-write and no-routing-edits are two variants of the floor: build one at a time"
);

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, MetricType};

    /// The route header the connector filter sets (`connector_devkit::envoy::CLUSTER_HEADER`) and
    /// the benchmark's one cluster.
    #[cfg(not(feature = "no-routing-edits"))]
    const CLUSTER_HEADER: &str = "x-oci-connector-cluster";
    #[cfg(not(feature = "no-routing-edits"))]
    const CLUSTER: &str = "upstream_bench";
    /// The credential the connector filter sets (the benchmark's upstreams ignore it).
    const CREDENTIAL: &str = "Basic cm9ib3Q6dW51c2VkLWJ5LWFuLW9wZW4tdXBzdHJlYW0=";

    #[derive(Default)]
    struct Root {
        /// The two counters a warm request increments, defined once with the configuration
        /// as the connector filter defines its own.
        metrics: Option<(u32, u32)>,
    }
    impl Context for Root {}
    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            let define = |name| hostcalls::define_metric(MetricType::Counter, name).ok();
            self.metrics = define("oci_connector_floor.forwarded").zip(define("oci_connector_floor.token_cache.hits"));
            self.metrics.is_some()
        }
        fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Floor { metrics: self.metrics }))
        }
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Floor {
        metrics: Option<(u32, u32)>,
    }
    impl Context for Floor {}
    impl HttpContext for Floor {
        fn on_http_request_headers(&mut self, _headers: usize, _end: bool) -> Action {
            // One read of the whole map, the clock (the connector filter's token expiry check).
            let headers = self.get_http_request_headers();
            #[cfg(not(feature = "no-clock-no-counters"))]
            let _now = self.get_current_time();
            #[cfg(feature = "one-map-write")]
            {
                let path = upstream_path(&headers);
                self.set_http_request_headers(one_map(&headers, path.as_deref()));
            }
            #[cfg(not(any(feature = "one-map-write", feature = "no-routing-edits")))]
            {
                if let Some(path) = upstream_path(&headers) {
                    self.set_http_request_header(":path", Some(&path));
                }
                self.set_http_request_header(":authority", Some("127.0.0.1"));
                self.set_http_request_header(CLUSTER_HEADER, Some(CLUSTER));
            }
            #[cfg(feature = "no-routing-edits")]
            let _ = &headers;
            #[cfg(feature = "no-clock-no-counters")]
            let _ = self.metrics;
            #[cfg(not(feature = "no-clock-no-counters"))]
            if let Some((forwarded, hits)) = self.metrics {
                let _ = hostcalls::increment_metric(forwarded, 1);
                let _ = hostcalls::increment_metric(hits, 1);
            }
            #[cfg(not(feature = "no-properties"))]
            {
                self.set_property(vec!["oci_connector.connector"], Some(b"bench/registry"));
                self.set_property(vec!["oci_connector.subject"], Some(b"bench/default"));
            }
            #[cfg(not(feature = "one-map-write"))]
            self.set_http_request_header("authorization", Some(CREDENTIAL));
            Action::Continue
        }
        fn on_http_response_headers(&mut self, _headers: usize, _end: bool) -> Action {
            // The connector filter reads the answer's headers once (echoed credentials, challenges).
            let _ = self.get_http_response_headers();
            Action::Continue
        }
    }

    /// `/v2/namespaces/<ns>/connectors/<name>/<rest>` → `/v2/<rest>`: the benchmark's requests
    /// always have this shape; anything else is sent on unchanged (`None`).
    #[cfg(not(feature = "no-routing-edits"))]
    fn upstream_path(headers: &[(String, String)]) -> Option<String> {
        let path = headers.iter().find(|(k, _)| k == ":path").map(|(_, v)| v.as_str())?;
        path.splitn(7, '/').nth(6).map(|rest| format!("/v2/{rest}"))
    }

    /// `one-map-write`: the request's map with the four edits made in it, written back whole.
    #[cfg(feature = "one-map-write")]
    fn one_map<'a>(headers: &'a [(String, String)], path: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
        let mut out: Vec<(&str, &str)> = Vec::with_capacity(headers.len() + 1);
        for (k, v) in headers {
            let value = match k.as_str() {
                ":path" => path.unwrap_or(v),
                ":authority" => "127.0.0.1",
                "authorization" => CREDENTIAL,
                _ => v,
            };
            out.push((k, value));
        }
        out.push((CLUSTER_HEADER, CLUSTER));
        out
    }

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| Box::<Root>::default());
    }}
}
