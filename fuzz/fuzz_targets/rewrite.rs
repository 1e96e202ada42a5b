//! The `Location` / `Link` rewriter: whatever the upstream sends, a rewritten value points at
//! the proxy the client used and carries no control characters (no header injection).
#![no_main]
use connector_filter::config::Upstream;
use connector_filter::rewrite::{ClientView, rewrite_link, rewrite_url};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else { return };
    let Ok(upstream) = Upstream::parse("https://registry.example.com:5000") else {
        return;
    };
    let client = ClientView {
        origin: "http://proxy:8080".into(),
        prefix: "/v2/namespaces/demo/connectors/registry".into(),
    };
    for out in [
        rewrite_url(value, &upstream, &client),
        rewrite_link(value, &upstream, &client),
    ]
    .into_iter()
    .flatten()
    {
        assert!(!out.bytes().any(|b| b.is_ascii_control()), "{out:?}");
    }
});
