//! The `Location` / `Link` rewriter: whatever the upstream sends, a rewritten value points at
//! the proxy the client used and carries no control characters (no header injection); and a
//! `Location` that leads to the proxy's host name (or a name below it) at another origin, however
//! escaped or cased, is always caught (a client would take its token there).
#![no_main]
use connector_filter::config::Upstream;
use connector_filter::rewrite::{
    ClientView, leads_off_proxy_with_credentials, link_leads_off, location_count, rewrite_link, rewrite_url,
};
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
    caught_if_proxy_like(value, &client);
    // Two Location headers as Envoy joins them are always counted as two (or more), and a
    // value is never counted as more targets than it has comma-separated parts.
    let count = location_count(value);
    assert!(count >= 1 && count <= value.matches(',').count() + 1, "{value:?}");
    if !value.is_empty() {
        assert!(location_count(&format!("{value},https://elsewhere/x")) >= 2, "{value:?}");
    }
    // A `Link` target is held to the same check as a `Location`, unless it maps to the proxy.
    if !value.contains(['<', '>']) {
        let off = rewrite_url(value, &upstream, &client).is_none() && leads_off_proxy_with_credentials(value, &client);
        let link = format!("</v2/x>; rel=\"a\", <{value}>; rel=\"next\"");
        assert_eq!(link_leads_off(&link, &upstream, &client), off, "{link:?}");
    }
    // The same check on URLs built around the proxy's name (schemes, cases, escapes, user
    // info, names below it), the rest of the input after them: reached in seconds, where
    // the raw input alone would have to find "proxy" first.
    if let Some((&pick, rest)) = value.as_bytes().split_first()
        && let Ok(rest) = std::str::from_utf8(rest)
    {
        const SCHEMES: [&str; 5] = ["http://", "https://", "//", "HTTP://", "hTTps://"];
        const HOSTS: [&str; 9] =
            ["proxy", "PROXY", "x.proxy", "X.Proxy", "proxy.", "pro%78y", "a@proxy", "ｐroxy", "xproxy"];
        let pick = usize::from(pick);
        let scheme = SCHEMES.get(pick % SCHEMES.len()).copied().unwrap_or_default();
        let host = HOSTS.get(pick / SCHEMES.len() % HOSTS.len()).copied().unwrap_or_default();
        caught_if_proxy_like(&format!("{scheme}{host}{rest}"), &client);
    }
});

/// A `Location` that WHATWG's parser (the `url` crate: percent escapes and IDNA in hosts,
/// default ports) reads as the proxy's host name, or a name below it, at another origin than
/// the proxy's must be caught. It stands in for Go's parser on the URLs both read alike:
/// `scheme://...` or `//...`, no backslash.
fn caught_if_proxy_like(value: &str, client: &ClientView) {
    let off = leads_off_proxy_with_credentials(value, client);
    let lower = value.to_ascii_lowercase();
    let absolute = lower.starts_with("http://") || lower.starts_with("https://") || value.starts_with("//");
    if absolute
        && !value.contains('\\')
        && let Ok(u) = url::Url::parse(&client.origin).and_then(|base| base.join(value))
        && let Some(host) = u.host_str()
    {
        let host = host.strip_suffix('.').unwrap_or(host);
        let proxy_like = host == "proxy" || host.ends_with(".proxy");
        let the_proxy = host == "proxy" && u.scheme() == "http" && u.port_or_known_default() == Some(8080);
        assert!(!proxy_like || the_proxy || off, "{value:?} ({u}) is not caught");
    }
}
