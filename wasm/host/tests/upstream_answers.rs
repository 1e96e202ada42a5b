//! Upstream answers the shipped module must not pass on as they are (issue 12): answers that
//! repeat the connector's credential, in a header's value or name, a trailer or an error body,
//! and cookies.

mod common;

use common::*;
use connector_wasm_host::{Action, headers};

const MANIFEST: &str = "/v2/namespaces/demo/connectors/registry/lib/app/manifests/v1";

#[test]
fn an_error_body_that_repeats_the_credential_is_replaced() {
    let mut h = host();
    let id = forwarded(&mut h, "GET", MANIFEST);
    let a = h
        .response_headers(id, headers(&[(":status", "400"), ("content-length", "200")]), false)
        .unwrap();
    assert_eq!(a, Action::Continue);
    assert!(h.stream(id).response_header("content-length").is_none());
    let echo = format!(
        "{{\"errors\":[{{\"message\":\"you sent Authorization: {}\"}}]}}",
        basic_credential()
    );
    assert_eq!(
        h.response_body(id, &echo.as_bytes()[..10], false).unwrap(),
        Action::Pause
    );
    assert_eq!(
        h.response_body(id, &echo.as_bytes()[10..], true).unwrap(),
        Action::Continue
    );
    let body = String::from_utf8_lossy(&h.stream(id).response_body).into_owned();
    assert!(
        !body.contains(PASSWORD) && !body.contains(&basic_credential()),
        "{body}"
    );
    assert!(body.contains("repeated the connector's credential"), "{body}");
}

#[test]
fn a_clean_error_body_passes_unchanged() {
    let mut h = host();
    let id = forwarded(&mut h, "GET", MANIFEST);
    h.response_headers(id, headers(&[(":status", "404")]), false).unwrap();
    let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
    assert_eq!(h.response_body(id, body, true).unwrap(), Action::Continue);
    assert_eq!(h.stream(id).response_body, body.to_vec());
}

#[test]
fn a_header_that_repeats_the_credential_replaces_the_answer_and_cookies_go() {
    let mut h = host();
    let id = forwarded(&mut h, "GET", MANIFEST);
    let cred = basic_credential();
    h.response_headers(id, headers(&[(":status", "200"), ("x-debug", cred.as_str())]), true)
        .unwrap();
    let local = h.stream(id).local().cloned().unwrap();
    assert_eq!(local.status, 502);
    assert!(!local.body_text().contains(PASSWORD));

    // The password as a header *name*, lowercased as Envoy passes names on.
    let name = format!("x-echo-{}", PASSWORD.to_ascii_lowercase());
    let id = forwarded(&mut h, "GET", MANIFEST);
    h.response_headers(id, headers(&[(":status", "200"), (name.as_str(), "1")]), true)
        .unwrap();
    let local = h.stream(id).local().cloned().unwrap();
    assert_eq!(local.status, 502, "an echoing name replaces the answer too");
    assert!(
        !local
            .body_text()
            .to_ascii_lowercase()
            .contains(&PASSWORD.to_ascii_lowercase())
    );

    let id = forwarded(&mut h, "GET", MANIFEST);
    h.response_headers(
        id,
        headers(&[
            (":status", "200"),
            ("set-cookie", "s=1"),
            ("alt-svc", "h2=\"x.example:443\""),
        ]),
        true,
    )
    .unwrap();
    assert!(h.stream(id).response_header("set-cookie").is_none());
    assert!(h.stream(id).response_header("alt-svc").is_none());
    assert!(h.stream(id).local().is_none());
}

/// Names of a trailer map, in order.
fn names(map: &connector_wasm_host::Headers) -> Vec<String> {
    map.iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect()
}

#[test]
fn trailers_that_repeat_the_credential_are_removed_and_the_others_pass() {
    let mut h = host();
    let id = forwarded(&mut h, "GET", MANIFEST);
    h.response_headers(id, headers(&[(":status", "200")]), false).unwrap();
    assert_eq!(h.response_body(id, b"{}", false).unwrap(), Action::Continue);
    let cred = basic_credential();
    // The password as a trailer's name, lowercased as Envoy passes names on.
    let name = format!("x-echo-{}", PASSWORD.to_ascii_lowercase());
    let trailers = [
        ("x-debug", cred.as_str()),
        ("x-checksum", "sha256:abc"),
        ("x-password", PASSWORD),
        ("x-debug", "again"),
        (name.as_str(), "1"),
    ];
    assert_eq!(h.response_trailers(id, headers(&trailers)).unwrap(), Action::Continue);
    let s = h.stream(id);
    // Every value under an echoing name goes (a name is removed whole), the clean one stays.
    assert_eq!(names(&s.response_trailers), ["x-checksum"]);
    assert!(s.local().is_none(), "head and body are gone: nothing to replace");
    let stat = "oci_connector.connector.demo.registry.refused.credential_echoed";
    assert_eq!(h.rec().metric(stat).map(|m| m.value), Some(1));
    let warned = h.rec().logs_containing("trailer");
    assert_eq!(warned.len(), 1, "{:?}", h.rec().logs);
    assert!(
        !warned[0].contains(PASSWORD) && !warned[0].contains(&cred),
        "{}",
        warned[0]
    );

    // Clean trailers pass untouched, and count nothing.
    let id = forwarded(&mut h, "GET", MANIFEST);
    h.response_headers(id, headers(&[(":status", "200")]), false).unwrap();
    let clean = [("x-checksum", "sha256:abc"), ("grpc-status", "0")];
    assert_eq!(h.response_trailers(id, headers(&clean)).unwrap(), Action::Continue);
    assert_eq!(names(&h.stream(id).response_trailers), ["x-checksum", "grpc-status"]);
    assert_eq!(h.rec().metric(stat).map(|m| m.value), Some(1));
}

#[test]
fn the_clients_token_and_stripped_names_never_ride_in_request_trailers() {
    let mut h = host();
    let id = forwarded(
        &mut h,
        "PUT",
        "/v2/namespaces/demo/connectors/registry/lib/app/blobs/uploads/u-1?digest=sha256:0",
    );
    let t = bearer(&token("demo", "default"));
    let trailers = [
        ("authorization", t.as_str()),
        ("x-checksum", "sha256:abc"),
        ("cookie", "session=client-secret"),
        ("authorization", "Bearer second"),
    ];
    assert_eq!(h.request_trailers(id, headers(&trailers)).unwrap(), Action::Continue);
    let s = h.stream(id);
    assert_eq!(names(&s.request_trailers), ["x-checksum"]);
    assert!(s.local().is_none());
}

#[test]
fn an_encoded_error_body_is_replaced_unread_and_keeps_its_status() {
    let mut h = host();
    let id = forwarded(&mut h, "GET", MANIFEST);
    let head = [
        (":status", "404"),
        ("content-encoding", "gzip"),
        ("content-type", "text/html"),
        ("content-length", "31"),
    ];
    assert_eq!(h.response_headers(id, headers(&head), false).unwrap(), Action::Continue);
    let s = h.stream(id);
    assert!(
        s.response_header("content-encoding").is_none(),
        "the replacement is not gzip"
    );
    assert_eq!(s.response_header("content-type").as_deref(), Some("application/json"));
    // Whatever the bytes (here: gzip's magic and then anything), they are not passed on.
    let gz = [0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, b'x', b'y'];
    assert_eq!(h.response_body(id, &gz, true).unwrap(), Action::Continue);
    let s = h.stream(id);
    assert!(s.local().is_none(), "the head (404) went on; only the body is replaced");
    let body: serde_json::Value = serde_json::from_slice(&s.response_body).unwrap();
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("answered 404 with an error body encoded as \"gzip\""),
        "{message}"
    );
    let stat = "oci_connector.connector.demo.registry.refused.error_body_encoded";
    assert_eq!(h.rec().metric(stat).map(|m| m.value), Some(1));

    // `identity` is the bytes as sent: checked and passed as before.
    let id = forwarded(&mut h, "GET", MANIFEST);
    let head = [(":status", "404"), ("content-encoding", "identity")];
    h.response_headers(id, headers(&head), false).unwrap();
    let plain = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
    assert_eq!(h.response_body(id, plain, true).unwrap(), Action::Continue);
    assert_eq!(h.stream(id).response_body, plain.to_vec());
    // A success's body is never read, encoded or not (a gzip'd tag list goes on as sent).
    let id = forwarded(&mut h, "GET", MANIFEST);
    h.response_headers(id, headers(&[(":status", "200"), ("content-encoding", "gzip")]), false)
        .unwrap();
    assert_eq!(
        h.stream(id).response_header("content-encoding").as_deref(),
        Some("gzip")
    );
}
