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
    if let Some(rest) = url.strip_prefix("//") {
        // Scheme-relative: same scheme as the request that the upstream answered.
        let (authority, path) = split_authority(rest);
        if !upstream.is_origin(&upstream.scheme, authority) {
            return None;
        }
        return map_path(path, client).map(|p| format!("{}{p}", client.origin));
    }
    if url.starts_with('/') {
        return map_path(url, client);
    }
    let (scheme, rest) = url.split_once("://")?;
    let (authority, path) = split_authority(rest);
    if !upstream.is_origin(scheme, authority) {
        return None;
    }
    map_path(path, client).map(|p| format!("{}{p}", client.origin))
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

#[cfg(test)]
mod tests {
    use super::*;

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
