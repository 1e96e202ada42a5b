//! Response header rewriting: `Location` and `Link` values that point at the upstream are
//! mapped back to the address form the client used (prefix restored, the proxy's own origin,
//! query kept byte for byte). URLs on any other host (object-storage or CDN redirects) pass
//! untouched.

use crate::config::Upstream;

/// How the client addressed the registry, captured from the request for the response phase
/// (proxy-wasm must not read request headers while handling the response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientView {
    /// `scheme://authority` the client used to reach the proxy.
    pub origin: String,
    /// What replaces the upstream's `/v2`: `/v2/namespaces/<ns>/connectors/<name>` in path
    /// form, `/v2` in host form.
    pub prefix: String,
}

/// Rewrites one URL (absolute, scheme-relative or path-absolute). `None`: leave it as is.
/// A value with control characters is never rewritten: the filter must not be the one that puts
/// them into a header Envoy then sends (found by the `rewrite` fuzz target).
pub fn rewrite_url(url: &str, upstream: &Upstream, client: &ClientView) -> Option<String> {
    if url.bytes().any(|b| b.is_ascii_control()) {
        return None;
    }
    if url.starts_with('/') && !url.starts_with("//") {
        return map_path(url, client);
    }
    // Scheme-relative: same scheme as the request that the upstream answered.
    let (scheme, authority, path) = absolute(url, &upstream.scheme)?;
    if !upstream.is_origin(scheme, authority) {
        return None;
    }
    map_path(path, client).map(|p| format!("{}{p}", client.origin))
}

/// The scheme, authority and the rest of an absolute (`http://h/p`) or scheme-relative
/// (`//h/p`, of scheme `default`) URL; `None` for anything else.
fn absolute<'a>(url: &'a str, default: &'a str) -> Option<(&'a str, &'a str, &'a str)> {
    let (scheme, rest) = match url.strip_prefix("//") {
        Some(rest) => (default, rest),
        None => url.split_once("://")?,
    };
    let (authority, path) = split_authority(rest);
    Some((scheme, authority, path))
}

/// Whether a client that follows `url` (a `Location` the filter did not map back to itself)
/// would hand the credential it gave the proxy to something that is not the proxy. Go's HTTP
/// client (containerd, CRI-O, skopeo, podman, buildah) copies a request's `Authorization` to a
/// redirect on the same host name or a name below it, whatever the scheme and port: a Location
/// at another port of the proxy's address (a NodePort, any listener on a node) or on a name
/// under the proxy's would receive the client's ServiceAccount token. A host that does not read
/// as a plain name or address (user info, percent escapes, non-ASCII that IDNA could fold into
/// the proxy's name) counts as such a place. A relative URL, or one at the proxy's own origin,
/// leads back to the proxy.
pub fn leads_off_proxy_with_credentials(url: &str, client: &ClientView) -> bool {
    let (proxy_scheme, proxy_authority) = client.origin.split_once("://").unwrap_or(("https", &client.origin));
    // A relative URL stays on the proxy; anything but http(s) is not followed.
    let Some((scheme, authority, _)) = absolute(url, proxy_scheme) else {
        return false;
    };
    if !same(scheme, "http") && !same(scheme, "https") {
        return false;
    }
    let (Some((host, port)), Some((proxy_host, proxy_port))) =
        (origin_of(scheme, authority), origin_of(proxy_scheme, proxy_authority))
    else {
        return true;
    };
    if same(host, proxy_host) {
        return !(port == proxy_port && same(scheme, proxy_scheme));
    }
    // A name below the proxy's (an IPv6 address has none).
    let dot = host.len().wrapping_sub(proxy_host.len() + 1);
    !host.starts_with('[')
        && host.as_bytes().get(dot) == Some(&b'.')
        && host.get(dot + 1..).is_some_and(|tail| same(tail, proxy_host))
}

/// ASCII case-insensitive equality, one copy in the module (it is on the 700 KB budget).
#[inline(never)]
fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// An authority as (host without a trailing dot, port or the scheme's default); `None` for
/// anything but a plain name or address (user info, escapes, non-ASCII). Not
/// `normalise_authority`, which `rewrite_url` uses: that one builds a new string per call and
/// refuses `_`, which Go's client accepts in a host name; this one borrows and splits.
fn origin_of<'a>(scheme: &str, authority: &'a str) -> Option<(&'a str, &'a str)> {
    for b in authority.bytes() {
        if !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')) {
            return None;
        }
    }
    let end = match authority.rfind(']') {
        Some(i) => i + 1,
        None => authority.find(':').unwrap_or(authority.len()),
    };
    let (host, port) = authority.split_at_checked(end)?;
    let port = match port.strip_prefix(':').unwrap_or(port) {
        "" if same(scheme, "https") => "443",
        "" => "80",
        p => p,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then_some((host, port))
}

fn split_authority(rest: &str) -> (&str, &str) {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest.split_at_checked(end).unwrap_or((rest, ""))
}

/// `/v2/<...>` (with query) becomes `<prefix>/<...>`; other paths are not the registry API.
fn map_path(path_and_query: &str, client: &ClientView) -> Option<String> {
    let after = path_and_query.strip_prefix("/v2")?;
    if !(after.starts_with('/') || after.starts_with('?') || after.is_empty()) {
        return None;
    }
    Some(format!("{}{after}", client.prefix))
}

/// Rewrites every `<URL>` target in a `Link` header value (RFC 8288), keeping parameters.
pub fn rewrite_link(value: &str, upstream: &Upstream, client: &ClientView) -> Option<String> {
    if value.bytes().any(|b| b.is_ascii_control()) {
        return None;
    }
    let mut out = String::with_capacity(value.len() + client.prefix.len());
    let mut rest = value;
    let mut changed = false;
    while let Some(open) = rest.find('<') {
        let (before, from_open) = rest.split_at_checked(open)?;
        let inner_and_more = from_open.get(1..)?;
        let close = inner_and_more.find('>')?;
        let (target, after) = inner_and_more.split_at_checked(close)?;
        out.push_str(before);
        out.push('<');
        match rewrite_url(target, upstream, client) {
            Some(new) => {
                changed = true;
                out.push_str(&new);
            }
            None => out.push_str(target),
        }
        rest = after;
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// How many redirect targets one `Location` value holds. Envoy joins a header repeated in an
/// answer into one value, comma-separated, so two `Location` headers reach the filter as one:
/// a comma followed by an absolute URL (`scheme://`) or a network-path reference (`//host`)
/// starts another. A comma elsewhere (in a path or query) is part of the one URL.
pub fn location_count(value: &str) -> usize {
    1 + value
        .split(',')
        .skip(1)
        .filter(|rest| starts_a_url(rest.trim_start_matches([' ', '\t'])))
        .count()
}

/// Whether `text` begins with `//` or with a URI scheme (RFC 3986 3.1) and `://`. Not
/// [`absolute`], which takes any text before `://` as a scheme: a query's `?next=http://`
/// after a comma in one URL would count as a second.
fn starts_a_url(text: &str) -> bool {
    if text.starts_with("//") {
        return true;
    }
    let scheme_len = text
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        .count();
    text.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && text.get(scheme_len..).is_some_and(|rest| rest.starts_with("://"))
}

/// Whether a target of a `Link` value is left pointing where a client that follows it (a tag
/// list's next page) would take its credential off the proxy: what
/// [`leads_off_proxy_with_credentials`] refuses in a `Location`, for each `<URL>` that
/// [`rewrite_link`] does not map back to the proxy.
pub fn link_leads_off(value: &str, upstream: &Upstream, client: &ClientView) -> bool {
    value
        .split('<')
        .skip(1)
        .filter_map(|piece| piece.split_once('>'))
        .any(|(target, _)| {
            rewrite_url(target, upstream, client).is_none() && leads_off_proxy_with_credentials(target, client)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_at_another_port_or_below_the_proxys_name_would_carry_the_clients_credential() {
        let view = |origin: &str| ClientView {
            origin: origin.into(),
            prefix: "/v2/namespaces/demo/connectors/reg".into(),
        };
        let ip = view("https://127.0.0.1:10443");
        for url in [
            "http://127.0.0.1:31000/steal",
            "https://127.0.0.1/steal",
            "http://127.0.0.1:10443/plain-http-same-port",
            "//127.0.0.1:9/scheme-relative",
            "HTTP://127.0.0.1.:9/trailing-dot",
            "https://sa@127.0.0.1:10443/user-info",
            "https://127.0.0.%31:9/percent-escaped",
            "https://１２７.0.0.1:9/non-ascii",
        ] {
            assert!(leads_off_proxy_with_credentials(url, &ip), "{url}");
        }
        for url in [
            "https://127.0.0.1:10443/v2/namespaces/demo/connectors/reg/a/blobs/sha256:1",
            "https://127.0.0.1:10443/elsewhere-on-the-proxy",
            "/relative/path?next=https://127.0.0.1:9/",
            "blob?x=1",
            "http://localhost:31000/another-host-name",
            "https://127.0.0.2/another-address",
            "https://bucket.s3.example/blob?X-Amz-Signature=abc",
            "ftp://127.0.0.1:21/not-followed",
        ] {
            assert!(!leads_off_proxy_with_credentials(url, &ip), "{url}");
        }
        let name = view("https://registry.corp.example");
        for url in [
            "https://harbor.registry.corp.example/v2/a",
            "https://REGISTRY.corp.example:8443/other-port",
            "http://registry.corp.example/plain-http",
        ] {
            assert!(leads_off_proxy_with_credentials(url, &name), "{url}");
        }
        for url in [
            "https://registry.corp.example:443/default-port",
            "https://corp.example/the-parent",
            "https://evilregistry.corp.example/not-below-it",
            "https://storage.example/x",
        ] {
            assert!(!leads_off_proxy_with_credentials(url, &name), "{url}");
        }
        let v6 = view("https://[::1]:10443");
        assert!(leads_off_proxy_with_credentials("http://[::1]:9/x", &v6));
        assert!(!leads_off_proxy_with_credentials("https://[::1]:10443/x", &v6));
    }

    fn upstream() -> Upstream {
        Upstream::parse("http://127.0.0.1:5000").unwrap()
    }

    fn path_form() -> ClientView {
        ClientView {
            origin: "http://proxy:8080".into(),
            prefix: "/v2/namespaces/demo/connectors/reg".into(),
        }
    }

    #[test]
    fn joined_locations_are_counted() {
        for (value, n) in [
            ("https://s3.example/b?X-Amz-Signature=a,b", 1),
            ("/v2/a/blobs/uploads/u,1?_state=x", 1),
            ("http://localhost:1/a,http://127.0.0.1:1/b", 2),
            ("https://a/x, //b/y,HTTPS://c/z", 3),
            ("https://a/x,,://b,1http://c", 1),
            ("https://a/x,", 1),
        ] {
            assert_eq!(location_count(value), n, "{value}");
        }
    }

    #[test]
    fn locations() {
        let u = upstream();
        let c = path_form();
        let table = [
            // Relative upload location: prefix restored, query byte for byte.
            (
                "/v2/lib/app/blobs/uploads/3f-2a?_state=ab%2Bcd%3D%3D&digest=sha256%3Aff",
                Some(
                    "/v2/namespaces/demo/connectors/reg/lib/app/blobs/uploads/3f-2a?_state=ab%2Bcd%3D%3D&digest=sha256%3Aff",
                ),
            ),
            // Absolute on the upstream (any case, explicit default port would match too).
            (
                "http://127.0.0.1:5000/v2/lib/app/blobs/uploads/u?_state=x",
                Some("http://proxy:8080/v2/namespaces/demo/connectors/reg/lib/app/blobs/uploads/u?_state=x"),
            ),
            (
                "//127.0.0.1:5000/v2/a/blobs/sha256:1",
                Some("http://proxy:8080/v2/namespaces/demo/connectors/reg/a/blobs/sha256:1"),
            ),
            // Foreign hosts (S3, CDN) and non-registry paths pass unchanged.
            (
                "https://bucket.s3.amazonaws.com/docker/registry/v2/blobs/x?X-Amz-Signature=1",
                None,
            ),
            ("http://127.0.0.1:5001/v2/a/blobs/uploads/u", None),
            // Same host and port under the other scheme (a TLS-terminating front): still the upstream.
            (
                "https://127.0.0.1:5000/v2/a",
                Some("http://proxy:8080/v2/namespaces/demo/connectors/reg/a"),
            ),
            ("/v2x/a", None),
            ("/other", None),
            ("relative/path", None),
        ];
        for (input, want) in table {
            assert_eq!(rewrite_url(input, &u, &c).as_deref(), want, "{input}");
        }
    }

    #[test]
    fn host_form_keeps_plain_paths() {
        let c = ClientView {
            origin: "http://c-reg-connector.demo.svc:80".into(),
            prefix: "/v2".into(),
        };
        assert_eq!(
            rewrite_url("http://127.0.0.1:5000/v2/a/blobs/uploads/u?_state=q", &upstream(), &c).as_deref(),
            Some("http://c-reg-connector.demo.svc:80/v2/a/blobs/uploads/u?_state=q")
        );
    }

    #[test]
    fn links() {
        let u = upstream();
        let c = path_form();
        assert_eq!(
            rewrite_link("</v2/lib/app/tags/list?last=v9&n=10>; rel=\"next\"", &u, &c).as_deref(),
            Some("</v2/namespaces/demo/connectors/reg/lib/app/tags/list?last=v9&n=10>; rel=\"next\"")
        );
        assert_eq!(
            rewrite_link("<http://127.0.0.1:5000/v2/a/tags/list?n=1&last=b>; rel=\"next\", <https://docs.example/x>; rel=\"help\"", &u, &c).as_deref(),
            Some("<http://proxy:8080/v2/namespaces/demo/connectors/reg/a/tags/list?n=1&last=b>; rel=\"next\", <https://docs.example/x>; rel=\"help\"")
        );
        assert_eq!(rewrite_link("<https://elsewhere/x>; rel=\"next\"", &u, &c), None);
        assert_eq!(rewrite_link("<unterminated", &u, &c), None);
    }

    #[test]
    fn control_characters_are_never_rewritten_fuzz_regression() {
        // fuzz/artifacts/rewrite crash: a path-absolute Location with NUL bytes.
        let up = Upstream::parse("https://registry.example.com:5000").unwrap();
        let client = ClientView {
            origin: "http://proxy:8080".into(),
            prefix: "/v2/namespaces/demo/connectors/registry".into(),
        };
        assert_eq!(rewrite_url("/v2//\0\0\0\0", &up, &client), None);
        assert_eq!(
            rewrite_url("/v2/a/blobs/uploads/x\r\nSet-Cookie: a=b", &up, &client),
            None
        );
        assert_eq!(
            rewrite_link("</v2/a/tags/list?n=1\n>; rel=\"next\"", &up, &client),
            None
        );
        assert!(rewrite_url("/v2/a/blobs/uploads/x?_state=y", &up, &client).is_some());
    }
}
