//! What comes back through the proxy, through the real Envoy and registry: upload `Location`s
//! mapped back to the client's address form (and usable as given, which
//! proves the query survived byte for byte: Distribution signs `_state`), an upstream 401
//! answered with the proxy's own challenge, and dot segments that cannot leave a connector.

use connector_devkit::http::Request;
use connector_devkit::skopeo::Creds;
use connector_devkit::stack::{BROKEN_CONNECTOR_NAME, CONNECTOR_NAME, CONNECTOR_NAMESPACE, Stack, host_name};
use connector_e2e::{REPO, Refusal, Shared, TAG, UNAUTHORIZED, assert_refused, oci_error, path_form, with_token};

static STACK: Shared = Shared::new("e2e-responses", true);

/// The filter learns an upstream's challenge with one credential-less `GET /v2/` per connector.
fn is_probe(request_line: &str) -> bool {
    request_line == "GET /v2/ HTTP/1.1"
}

fn token(s: &Stack) -> String {
    s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap()
}

fn host(s: &Stack) -> String {
    format!("{}:{}", host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME), s.envoy.port)
}

/// Starts an upload, checks its Location against `expected_prefix`, then uses that Location
/// verbatim for the status GET and the cancel DELETE.
fn upload_round_trip(s: &Stack, start_path: &str, host_header: Option<&str>, expected_prefix: &str) {
    let jwt = token(s);
    let with_host = |r: Request| match host_header {
        Some(h) => r.host(h),
        None => r,
    };
    let started = with_host(with_token(Request::new("POST", start_path), &jwt))
        .send(s.envoy.port)
        .unwrap();
    assert_eq!(started.status, 202, "{}", started.summary());
    let location = started.header("location").unwrap_or_default().to_string();
    assert!(
        location.starts_with(expected_prefix),
        "Location {location:?} should start with {expected_prefix:?}"
    );
    assert!(
        location.contains("?_state="),
        "the upload state must survive: {location:?}"
    );
    let upstream = s.recorder.take();
    assert!(
        !upstream.text.contains("namespaces/"),
        "the upstream must see plain /v2/<repo> paths: {:?}",
        upstream.request_lines()
    );

    // The client follows the Location exactly as given: path and query relative to the proxy.
    let after_origin = location
        .splitn(4, '/')
        .nth(3)
        .map(|p| format!("/{p}"))
        .unwrap_or_default();
    let status = with_host(with_token(Request::get(&after_origin), &jwt))
        .send(s.envoy.port)
        .unwrap();
    assert_eq!(
        status.status,
        204,
        "upload status via the rewritten Location: {}",
        status.summary()
    );
    assert!(
        status
            .header("location")
            .is_some_and(|l| l.starts_with(expected_prefix)),
        "status Location: {}",
        status.summary()
    );
    let cancelled = with_host(with_token(Request::new("DELETE", &after_origin), &jwt))
        .send(s.envoy.port)
        .unwrap();
    assert_eq!(
        cancelled.status,
        204,
        "cancel via the rewritten Location: {}",
        cancelled.summary()
    );
}

#[test]
fn upload_location_is_mapped_back_to_the_path_form() {
    STACK.run(|s| {
        let start = path_form(CONNECTOR_NAMESPACE, CONNECTOR_NAME, &format!("{REPO}/blobs/uploads/"));
        let prefix = format!(
            "https://127.0.0.1:{}/v2/namespaces/{CONNECTOR_NAMESPACE}/connectors/{CONNECTOR_NAME}/{REPO}/blobs/uploads/",
            s.envoy.port
        );
        upload_round_trip(s, &start, None, &prefix);
    });
}

#[test]
fn upload_location_keeps_the_host_form() {
    STACK.run(|s| {
        let h = host(s);
        let prefix = format!("https://{h}/v2/{REPO}/blobs/uploads/");
        upload_round_trip(s, &format!("/v2/{REPO}/blobs/uploads/"), Some(&h), &prefix);
    });
}

#[test]
fn tags_list_passes_through_both_forms() {
    // Distribution 2.8 ignores `n`/`last` on tags/list and sends no `Link` (tag pagination came
    // with Distribution 3), so `Link` rewriting is covered by the filter's unit tests
    // (`rewrite::tests::links`); here the listing itself goes through unchanged.
    STACK.run(|s| {
        // A second tag, written straight to the registry (not through the proxy).
        let creds = s.registry.credentials.clone().unwrap();
        s.skopeo
            .copy(
                &s.image.oci_ref(),
                Creds::None,
                &format!("docker://{}/{REPO}:v2", s.registry.authority()),
                Creds::Basic(&creds.username, &creds.password),
            )
            .unwrap()
            .ok()
            .unwrap();
        let jwt = token(s);
        let path = path_form(CONNECTOR_NAMESPACE, CONNECTOR_NAME, &format!("{REPO}/tags/list?n=1"));
        let listed = with_token(Request::get(&path), &jwt).send(s.envoy.port).unwrap();
        assert_eq!(listed.status, 200, "{}", listed.summary());
        assert_eq!(
            listed.json().unwrap()["tags"],
            serde_json::json!([TAG, "v2"]),
            "{}",
            listed.summary()
        );
        assert_eq!(
            listed.json().unwrap()["name"],
            serde_json::json!(REPO),
            "{}",
            listed.summary()
        );
        let upstream = s.recorder.take();
        // The connector's one challenge probe lands here when this test is the first to use it.
        let forwarded: Vec<&str> = upstream.request_lines().into_iter().filter(|l| !is_probe(l)).collect();
        assert_eq!(
            forwarded,
            vec![format!("GET /v2/{REPO}/tags/list?n=1 HTTP/1.1").as_str()]
        );

        let listed = with_token(Request::get(&format!("/v2/{REPO}/tags/list")), &jwt)
            .host(&host(s))
            .send(s.envoy.port)
            .unwrap();
        assert_eq!(
            listed.json().unwrap()["tags"],
            serde_json::json!([TAG, "v2"]),
            "{}",
            listed.summary()
        );
    });
}

#[test]
fn an_upstream_401_becomes_the_proxys_own_challenge() {
    STACK.run(|s| {
        let jwt = token(s);
        let path = path_form(
            CONNECTOR_NAMESPACE,
            BROKEN_CONNECTOR_NAME,
            &format!("{REPO}/manifests/{TAG}"),
        );
        for method in ["GET", "HEAD"] {
            s.recorder.take();
            let resp = with_token(Request::new(method, &path), &jwt)
                .send(s.envoy.port)
                .unwrap();
            let upstream = s.recorder.take();
            assert_eq!(resp.status, 401, "{method}: {}", resp.summary());
            // Exactly the proxy's challenge: the upstream's realm would make the client send
            // its ServiceAccount token to the upstream.
            assert_eq!(
                resp.header("www-authenticate"),
                Some("Basic realm=\"oci-connector\""),
                "{}",
                resp.summary()
            );
            assert!(!resp.summary().contains("upstream-registry"), "{}", resp.summary());
            if method == "GET" {
                let (code, message) = oci_error(&resp);
                assert_eq!(code, "UNAUTHORIZED");
                assert!(
                    message.contains(&format!(
                        "refused the credential of connector \"{CONNECTOR_NAMESPACE}/{BROKEN_CONNECTOR_NAME}\""
                    )),
                    "{message}"
                );
            }
            // The request did go upstream, with the connector's (stale) credential only (the
            // first request to a connector is preceded by the probe of its challenge).
            let forwarded: Vec<&str> = upstream.request_lines().into_iter().filter(|l| !is_probe(l)).collect();
            assert_eq!(forwarded.len(), 1, "{:?}", upstream.request_lines());
            assert!(!upstream.text.contains(&jwt), "the client's token reached the upstream");
        }
    });
}

#[test]
fn dot_segments_cannot_leave_the_connector() {
    STACK.run(|s| {
        let jwt = token(s);
        // Envoy resolves dot segments before the filter; the filter authorises the result.
        for escape in [
            "../../../../other/connectors/registry",
            "%2e%2e/%2e%2e/%2e%2e/%2e%2e/other/connectors/registry",
        ] {
            let path = path_form(
                CONNECTOR_NAMESPACE,
                CONNECTOR_NAME,
                &format!("library/{escape}/{REPO}/manifests/{TAG}"),
            );
            assert_refused(
                s,
                &format!("dot segments towards another namespace's connector ({escape})"),
                with_token(Request::get(&path), &jwt),
                Refusal {
                    statuses: &[403],
                    codes: &["DENIED"],
                    mentions: &["\"other/registry\" does not exist or ServiceAccount"],
                },
            );
        }
        // A harmless "." resolves to the same image.
        let path = path_form(
            CONNECTOR_NAMESPACE,
            CONNECTOR_NAME,
            &format!("library/./app/manifests/{TAG}"),
        );
        let resp = with_token(Request::get(&path), &jwt)
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send(s.envoy.port)
            .unwrap();
        assert_eq!(resp.status, 200, "{}", resp.summary());
        let upstream = s.recorder.take();
        let forwarded: Vec<&str> = upstream.request_lines().into_iter().filter(|l| !is_probe(l)).collect();
        assert_eq!(
            forwarded,
            vec![format!("GET /v2/{REPO}/manifests/{TAG} HTTP/1.1").as_str()]
        );
        // An unauthenticated traversal is challenged before anything else.
        assert_refused(
            s,
            "unauthenticated traversal",
            Request::get(&path_form(
                CONNECTOR_NAMESPACE,
                CONNECTOR_NAME,
                "library/../../../../other/connectors/x/a/manifests/v1",
            )),
            Refusal {
                statuses: &[401],
                codes: UNAUTHORIZED,
                mentions: &["no credential"],
            },
        );
    });
}

#[test]
fn the_upstream_challenge_is_learned_once_without_a_credential() {
    STACK.run(|s| {
        let jwt = token(s);
        let path = path_form(CONNECTOR_NAMESPACE, CONNECTOR_NAME, &format!("{REPO}/manifests/{TAG}"));
        for _ in 0..3 {
            let resp = with_token(Request::new("HEAD", &path), &jwt)
                .header("Accept", "application/vnd.oci.image.manifest.v1+json")
                .send(s.envoy.port)
                .unwrap();
            assert_eq!(resp.status, 200, "{}", resp.summary());
        }
        let upstream = s.recorder.take();
        let lines = upstream.request_lines();
        // Earlier tests of this file may have probed already: at most one probe, never repeated.
        assert!(lines.iter().filter(|l| is_probe(l)).count() <= 1, "{lines:?}");
        assert_eq!(lines.iter().filter(|l| !is_probe(l)).count(), 3, "{lines:?}");
        // Every forwarded request carries the connector's Basic credential; a probe carries none.
        assert_eq!(upstream.authorizations().len(), 3, "{:?}", upstream.authorizations());
        assert!(
            upstream.authorizations().iter().all(|a| a.starts_with("Basic ")),
            "{:?}",
            upstream.authorizations()
        );
    });
}
