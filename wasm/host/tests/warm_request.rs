//! Pins the proxy-wasm host calls of a warm forwarded request (see `connector_wasm_host::warm`):
//! a change that adds one per request (a stat defined or named again, a header read or written
//! twice, a property lookup) fails here, with the list that changed.

use connector_wasm_host::warm::warm_forwarded_request;

#[test]
fn a_warm_forwarded_request_makes_exactly_these_host_calls() {
    let w = warm_forwarded_request(None).unwrap();
    assert_eq!(
        w.request,
        vec![
            // One read of the whole request map, the clock for token expiry.
            "proxy_get_header_map_pairs",
            "proxy_get_current_time_nanoseconds",
            // :path, :authority and the route's cluster header.
            "proxy_replace_header_map_value",
            "proxy_replace_header_map_value",
            "proxy_replace_header_map_value",
            // forwarded and token_cache.hits, by ids defined with the configuration.
            "proxy_increment_metric",
            "proxy_increment_metric",
            // The access log's connector and subject.
            "proxy_set_property",
            "proxy_set_property",
            // The connector's credential replaces the client's.
            "proxy_replace_header_map_value",
        ],
        "request phase"
    );
    assert_eq!(w.response, vec!["proxy_get_header_map_pairs"], "response phase");
    assert_eq!(w.total(), 11);
}
