//! Client-sent forwarding and routing headers, `_catalog`, limits, the upstream's challenge.

use super::*;

/// Client-sent forwarding and routing headers: stripped or harmless, routing unchanged.
pub(super) fn header_cases(s: &Stack) -> Vec<Case> {
    let good = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let fwd = |name: &str, value: &str, marker: &str| {
        Case::new(
            format!("client-sent {name}: {value}"),
            with_token(mreq(), &good).header(name, value),
            200,
            None,
            Up::Connector,
        )
        .line(upstream_manifest_line())
        .forbid(marker)
    };
    vec![
        fwd("X-Forwarded-Host", "xfh.evil.example", "xfh.evil.example"),
        // Envoy (use_remote_address unset) passes a client's X-Forwarded-Proto on and the filter
        // does not strip it: Distribution builds upload Locations from it.
        fwd("X-Forwarded-Proto", "gopher", "gopher"),
        fwd(
            "Forwarded",
            "for=1.2.3.4;host=fw.evil.example;proto=https",
            "fw.evil.example",
        ),
        // Routing is unchanged, and the header is removed (it reached the upstream before the
        // filter stripped it: a finding of this suite).
        fwd(
            "x-envoy-original-path",
            "/v2/namespaces/demo/connectors/stale-secret/evilpath/manifests/v1",
            "evilpath",
        ),
        fwd("X-Forwarded-Port", "6666", "6666"),
        fwd("X-Forwarded-Prefix", "/xfprefix", "xfprefix"),
        fwd("X-Original-URL", "/v2/origurl/manifests/v1", "origurl"),
        fwd("X-Rewrite-URL", "/v2/rewriteurl/manifests/v1", "rewriteurl"),
        fwd("Cookie", "session=cookiesecret", "cookiesecret"),
        fwd("x-oci-connector-cluster", "some_other_cluster", "some_other_cluster"),
        Case::new(
            "Host: evil.example on a path-form request",
            with_token(mreq(), &good).host("hostheader.evil.example"),
            200,
            None,
            Up::Connector,
        )
        .line(upstream_manifest_line())
        .forbid("hostheader.evil.example"),
        Case::new(
            "no credential but x-oci-connector-cluster set by the client",
            mreq().header("x-oci-connector-cluster", connector_devkit::stack::CLUSTER),
            401,
            Some("UNAUTHORIZED"),
            Up::Nothing,
        ),
        Case::new(
            "non-registry path with x-oci-connector-cluster set by the client",
            Request::get("/admin").header("x-oci-connector-cluster", connector_devkit::stack::CLUSTER),
            404,
            Some("NAME_UNKNOWN"),
            Up::Nothing,
        ),
    ]
}

/// `_catalog`, limits, the upstream's challenge.
pub(super) fn misc_cases(s: &Stack) -> Vec<Case> {
    let good = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let host = format!("{}:{}", host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME), s.envoy.port);
    let mut many = with_token(mreq(), &good);
    for i in 0..150 {
        many = many.header(&format!("x-h{i}"), "1");
    }
    let mut big_put = with_token(Request::new("PUT", &p(&format!("{REPO}/manifests/huge"))), &good)
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json");
    let mut body = b"{\"schemaVersion\":2,\"pad\":\"".to_vec();
    body.extend(std::iter::repeat_n(b'x', 8 << 20));
    body.extend_from_slice(b"\"}");
    big_put.body = body;
    big_put.timeout = std::time::Duration::from_secs(60);
    vec![
        Case::new(
            "_catalog (path)",
            with_token(Request::get("/v2/_catalog"), &good),
            403,
            Some("UNSUPPORTED"),
            Up::Nothing,
        ),
        Case::new(
            "_catalog?n=1000 (path)",
            with_token(Request::get("/v2/_catalog?n=1000"), &good),
            403,
            Some("UNSUPPORTED"),
            Up::Nothing,
        ),
        Case::new(
            "_catalog (host form)",
            with_token(Request::get("/v2/_catalog"), &good).host(&host),
            403,
            Some("UNSUPPORTED"),
            Up::Nothing,
        ),
        Case::new(
            "_catalog under a connector prefix",
            with_token(Request::get(&p("_catalog")), &good),
            404,
            Some("NAME_UNKNOWN"),
            Up::Nothing,
        ),
        Case::new(
            "a 100 KB header",
            with_token(mreq(), &good).header("x-big", &"b".repeat(100 * 1024)),
            431,
            None,
            Up::Nothing,
        ),
        Case::new("150 extra headers", many, 431, None, Up::Nothing),
        Case::new("an 8 MiB manifest PUT", big_put, 400, None, Up::Connector),
        Case::new(
            "upstream 401 (stale-secret connector): the proxy's challenge, not the upstream's",
            with_token(
                get_m(&path_form(CONNECTOR_NAMESPACE, BROKEN_CONNECTOR_NAME, &mf(REPO))),
                &good,
            ),
            401,
            Some("UNAUTHORIZED"),
            Up::Stale,
        )
        .mention("refused the credential of connector"),
    ]
}
