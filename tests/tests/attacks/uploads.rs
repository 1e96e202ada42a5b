//! Stateful attacks on uploads: foreign mounts, reused sessions, `Location` steering.

use super::*;

/// The request target of a `Location` (absolute or relative).
fn target_of(location: &str) -> String {
    match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map(|i| rest[i..].to_string()).unwrap_or_default(),
        None => location.to_string(),
    }
}

fn random_tag() -> String {
    connector_devkit::random_hex(4).unwrap()
}

/// Cross-repository mounts whose `from` lies outside the caller's connector: the mount is
/// dropped and a plain upload starts (202), nothing is mounted.
pub(super) fn mount_cases(s: &Stack) -> Vec<Case> {
    let good = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let layer = s.image.layers.first().cloned().expect("sample image layer");
    let froms = [
        (
            "another connector (demo/stale-secret)",
            format!("namespaces/demo/connectors/{BROKEN_CONNECTOR_NAME}/{REPO}"),
        ),
        (
            "another tenant's connector (other/x)",
            format!("namespaces/other/connectors/x/{REPO}"),
        ),
        (
            "another connector, escaped",
            format!("namespaces%2Fdemo%2Fconnectors%2F{BROKEN_CONNECTOR_NAME}%2Flibrary%2Fapp"),
        ),
        (
            "dot segments out of the connector",
            format!("namespaces/demo/connectors/registry/../{BROKEN_CONNECTOR_NAME}/{REPO}"),
        ),
        ("the bare upstream name (no connector prefix)", REPO.to_string()),
    ];
    froms
        .into_iter()
        .map(|(what, from)| {
            let repo = format!("attacks/mount-{}", random_tag());
            let target = p(&format!("{repo}/blobs/uploads/?mount={layer}&from={from}"));
            Case::new(
                format!("mount from {what}: dropped, plain upload"),
                with_token(Request::new("POST", &target), &good),
                202,
                None,
                Up::Connector,
            )
            .line(format!("POST /v2/{repo}/blobs/uploads/ HTTP/1.1"))
            .forbid("mount=")
            .forbid("from=")
        })
        .collect()
}

/// An upload session opened by demo/default in demo/registry, then touched by others.
pub(super) fn session_cases(s: &Stack) -> Vec<Case> {
    let owner = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let repo = format!("attacks/session-{}", random_tag());
    let start = with_token(Request::new("POST", &p(&format!("{repo}/blobs/uploads/"))), &owner)
        .send(s.envoy.port)
        .unwrap();
    assert_eq!(start.status, 202, "upload start: {}", start.summary());
    let target = target_of(
        start
            .header("location")
            .unwrap_or_else(|| panic!("no Location: {}", start.summary())),
    );
    let prefix = p(&format!("{repo}/blobs/uploads/"));
    assert!(target.starts_with(&prefix), "Location {target} under {prefix}");
    let other = s.minter.valid("other", "default").unwrap();
    let ci = s.minter.valid(ALLOWED_NAMESPACE, "default").unwrap();
    let in_stale = target.replacen(
        &format!("/connectors/{CONNECTOR_NAME}/"),
        &format!("/connectors/{BROKEN_CONNECTOR_NAME}/"),
        1,
    );
    let host_form = target.replacen(
        &format!("/v2/namespaces/{CONNECTOR_NAMESPACE}/connectors/{CONNECTOR_NAME}"),
        "/v2",
        1,
    );
    let host = format!("{}:{}", host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME), s.envoy.port);
    let with_body = |mut r: Request, b: &[u8]| {
        r.body = b.to_vec();
        r
    };
    let denied = Some("DENIED");
    vec![
        Case::new(
            "session of demo/default: PATCH by other/default",
            with_body(with_token(Request::new("PATCH", &target), &other), b"hostile"),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "session of demo/default: PUT ?digest by other/default",
            with_token(
                Request::new("PUT", &format!("{target}&digest=sha256:{}", "0".repeat(64))),
                &other,
            ),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "session of demo/default: DELETE by other/default",
            with_token(Request::new("DELETE", &target), &other),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "session of demo/default: GET status by other/default, host form",
            with_token(Request::get(&host_form), &other).host(&host),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "session of demo/registry moved to demo/stale-secret by ci/default",
            with_body(with_token(Request::new("PATCH", &in_stale), &ci), b"hostile"),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "control: the owner still PATCHes its session",
            with_body(with_token(Request::new("PATCH", &target), &owner), b"mine"),
            202,
            None,
            Up::Connector,
        )
        .line(format!(
            "PATCH {} HTTP/1.1",
            target.replacen(
                &format!("/v2/namespaces/{CONNECTOR_NAMESPACE}/connectors/{CONNECTOR_NAME}"),
                "/v2",
                1
            )
        )),
    ]
}

/// An upload started with client-sent forwarding headers: the `Location` handed back must still
/// point at the proxy (its host and port, the client's path form), never at a host the client
/// chose or at the upstream. The scheme follows `X-Forwarded-Proto`, which Envoy honours for
/// `:scheme` (behind a TLS-terminating Ingress that is what makes Locations `https`); a client
/// that lies about it only breaks its own upload, and the filter sends the upstream the same
/// scheme Envoy decided on, so the two never disagree.
pub(super) fn location_problems(s: &Stack) -> Vec<String> {
    let good = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let mut problems = Vec::new();
    for (name, value) in [
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "loc.evil.example"),
        ("Forwarded", "host=loc.evil.example;proto=https"),
    ] {
        let repo = format!("attacks/loc-{}", random_tag());
        let resp = with_token(Request::new("POST", &p(&format!("{repo}/blobs/uploads/"))), &good)
            .header(name, value)
            .send(s.envoy.port)
            .unwrap();
        let loc = resp.header("location").unwrap_or("").to_string();
        let listener_scheme = if s.envoy.base_url().starts_with("https") {
            "https"
        } else {
            "http"
        };
        let scheme = if name == "X-Forwarded-Proto" {
            value
        } else {
            listener_scheme
        };
        let proxy = format!("{scheme}://{}", s.envoy.authority());
        let prefix = p(&format!("{repo}/blobs/uploads/"));
        let ok = resp.status == 202 && (loc.starts_with(&format!("{proxy}{prefix}")) || loc.starts_with(&prefix));
        eprintln!("upload start with {name}: {value} → {} Location {loc}", resp.status);
        if !ok {
            problems.push(format!(
                "FINDING: upload start with client-sent {name}: {value} → {} Location {loc:?} (expected {proxy}{prefix}...)",
                resp.status
            ));
        }
    }
    s.recorder.take();
    problems
}
