//! Attacks through the request path: escapes, dot and empty segments, look-alike namespaces,
//! ServiceAccounts and connector names.

use super::*;

/// Paths: escapes, dot segments, empty segments, parameters, NUL, length, look-alike names.
pub(super) fn path_cases(s: &Stack) -> Vec<Case> {
    let good = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    // `ci` may use demo/registry but not demo/stale-secret.
    let ci = s.minter.valid(ALLOWED_NAMESPACE, "default").unwrap();
    let g = |path: &str| with_token(get_m(path), &good);
    let bad_name = Some("NAME_INVALID");
    let unknown = Some("NAME_UNKNOWN");
    let upstream_line = |repo: &str| format!("GET /v2/{repo}/manifests/{TAG} HTTP/1.1");
    vec![
        Case::new(
            "%2e%2e segments climbing out of the repository (ci token, to stale-secret)",
            with_token(get_m(&p(&format!("%2e%2e/{BROKEN_CONNECTOR_NAME}/{}", mf(REPO)))), &ci),
            403,
            Some("DENIED"),
            Up::Nothing,
        ),
        // Envoy's normalize_path decodes %2E and resolves the dot segment before the filter
        // runs: `library/../app` becomes `app`, still inside demo/registry. Safe.
        Case::new(
            "%2E%2E uppercase in the repository (resolved inside the connector)",
            g(&p("library/%2E%2E/app/manifests/v1")),
            404,
            Some("MANIFEST_UNKNOWN"),
            Up::Connector,
        )
        .line("GET /v2/app/manifests/v1 HTTP/1.1"),
        Case::new(
            "plain .. from registry into stale-secret (ci token)",
            with_token(
                get_m(&format!(
                    "/v2/namespaces/demo/connectors/registry/../{BROKEN_CONNECTOR_NAME}/{}",
                    mf(REPO)
                )),
                &ci,
            ),
            403,
            Some("DENIED"),
            Up::Nothing,
        ),
        Case::new(
            "%2f in the repository",
            g(&p(&mf("library%2fapp"))),
            400,
            None,
            Up::Nothing,
        ),
        Case::new(
            "%2F in the repository",
            g(&p(&mf("library%2Fapp"))),
            400,
            None,
            Up::Nothing,
        ),
        Case::new(
            "%2F between namespace and connector",
            g(&format!("/v2/namespaces/demo%2Fconnectors/registry/{}", mf(REPO))),
            400,
            None,
            Up::Nothing,
        ),
        Case::new(
            "// inside the repository",
            g(&p(&mf("library//app"))),
            400,
            bad_name,
            Up::Nothing,
        ),
        Case::new(
            "// after the connector",
            g(&format!("/v2/namespaces/demo/connectors/registry//{}", mf(REPO))),
            400,
            bad_name,
            Up::Nothing,
        ),
        Case::new(
            "// after /v2",
            g(&format!("/v2//namespaces/demo/connectors/registry/{}", mf(REPO))),
            404,
            unknown,
            Up::Nothing,
        ),
        Case::new(
            "; parameter in the repository",
            g(&p(&mf("library/app;x=y"))),
            400,
            bad_name,
            Up::Nothing,
        ),
        Case::new(
            "; parameter on the connector name",
            g(&format!("/v2/namespaces/demo/connectors/registry;x=y/{}", mf(REPO))),
            400,
            bad_name,
            Up::Nothing,
        ),
        Case::new(
            "; parameter on the tag",
            g(&p(&format!("{REPO}/manifests/{TAG};jsessionid=1"))),
            404,
            unknown,
            Up::Nothing,
        ),
        // Envoy refuses %00 itself (400, empty body) before the filter sees the request.
        Case::new(
            "%00 in the repository (Envoy's own 400)",
            g(&p(&mf("library/app%00"))),
            400,
            None,
            Up::Nothing,
        ),
        Case::new(
            "raw NUL byte in the path",
            g(&p(&mf("library/app\0x"))),
            400,
            None,
            Up::Nothing,
        ),
        Case::new(
            "repository name of 10 000 characters",
            g(&p(&mf(&"a".repeat(10_000)))),
            400,
            bad_name,
            Up::Nothing,
        ),
        Case::new(
            "tag of 10 000 characters",
            g(&p(&format!("{REPO}/manifests/{}", "t".repeat(10_000)))),
            404,
            unknown,
            Up::Nothing,
        ),
        Case::new(
            "repository with connectors and manifests segments (stays in the connector)",
            g(&p("a/connectors/b/manifests/x")),
            404,
            None,
            Up::Connector,
        )
        .line("GET /v2/a/connectors/b/manifests/x HTTP/1.1"),
        Case::new(
            "repository naming another connector's path form (stays in demo/registry)",
            g(&p(&mf(&format!(
                "namespaces/demo/connectors/{BROKEN_CONNECTOR_NAME}/{REPO}"
            )))),
            404,
            None,
            Up::Connector,
        )
        .line(upstream_line(&format!(
            "namespaces/demo/connectors/{BROKEN_CONNECTOR_NAME}/{REPO}"
        )))
        .forbid(&s.broken_password),
    ]
}

/// Who may use which connector: look-alike namespaces, ServiceAccounts and connector names.
pub(super) fn prefix_cases(s: &Stack) -> Vec<Case> {
    let m = &s.minter;
    let tok = |ns: &str, sa: &str| m.valid(ns, sa).unwrap();
    let denied = Some("DENIED");
    let host = |ns: &str, name: &str| format!("{}:{}", host_name(ns, name), s.envoy.port);
    let hostform = format!("/v2/{}", mf(REPO));
    vec![
        Case::new(
            "token of namespace demo-a on demo/registry",
            with_token(mreq(), &tok("demo-a", "default")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "token of namespace dem on demo/registry",
            with_token(mreq(), &tok("dem", "default")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "token of namespace ci-x (ci is allowed) on demo/registry",
            with_token(mreq(), &tok("ci-x", "default")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "token of namespace c (ci is allowed) on demo/registry",
            with_token(mreq(), &tok("c", "default")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "ServiceAccount other/builder-x (other/builder allowed)",
            with_token(mreq(), &tok("other", "builder-x")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "ServiceAccount other/build (other/builder allowed)",
            with_token(mreq(), &tok("other", "build")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "demo token on connector demo/registry-a (unknown look-alike)",
            with_token(
                get_m(&path_form("demo", "registry-a", &mf(REPO))),
                &tok("demo", "default"),
            ),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "demo-a token on namespace demo-a, connector registry (unknown)",
            with_token(
                get_m(&path_form("demo-a", "registry", &mf(REPO))),
                &tok("demo-a", "default"),
            ),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "ci token on demo/stale-secret (ci listed only by demo/registry)",
            with_token(
                get_m(&path_form("demo", BROKEN_CONNECTOR_NAME, &mf(REPO))),
                &tok("ci", "default"),
            ),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "host form: demo-a token with the demo-a look-alike host",
            with_token(get_m(&hostform), &tok("demo-a", "default")).host(&host("demo-a", "registry")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "host form: connector host with a suffix (.evil.example) and a demo token",
            with_token(get_m(&hostform), &tok("demo", "default")).host(&format!(
                "{}.evil.example:{}",
                host_name("demo", "registry"),
                s.envoy.port
            )),
            404,
            Some("NAME_UNKNOWN"),
            Up::Nothing,
        ),
        Case::new(
            "control: allowed ServiceAccount other/builder is forwarded",
            with_token(mreq(), &tok("other", "builder")),
            200,
            None,
            Up::Connector,
        )
        .line(upstream_manifest_line()),
    ]
}
