//! Helpers shared by the scenario suites: the test configuration, tokens, requests, probes.

#![allow(dead_code)]

use base64::Engine as _;
use connector_wasm_host::{Action, Host, Options, headers};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const NOW: u64 = 1_800_000_000;
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const AUDIENCE: &str = "oci-connector";
pub const KID: &str = "rsa-1";
pub const RSA_PEM: &[u8] = include_bytes!("../../../../core/src/keys/testdata/rsa.pem");
pub const PASSWORD: &str = "s3cret-pw";
pub const REGISTRY: &str = "/v2/namespaces/demo/connectors/registry";

pub fn key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_PEM).unwrap()
}

pub fn jwks() -> Value {
    let mut jwk = Jwk::from_encoding_key(&key(), Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(KID.to_string());
    json!({ "keys": [jwk] })
}

pub fn claims(ns: &str, sa: &str) -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 600, "nbf": NOW - 10, "iat": NOW - 10,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u-1"}}
    })
}

pub fn sign_kid(kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &key()).unwrap()
}

pub fn token(ns: &str, sa: &str) -> String {
    sign_kid(KID, &claims(ns, sa))
}

pub fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

pub fn config() -> Value {
    json!({
        "proxy": {"realm": "oci-connector"},
        "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": jwks()},
        "connectors": [
            {"namespace": "demo", "name": "registry", "address": "http://registry.internal:5000",
             "cluster": "upstream_demo", "credential": {"username": "robot", "passwordEnv": "REG_PASSWORD"},
             "allowedNamespaces": ["ci"]},
            {"namespace": "demo", "name": "tokened", "address": "https://reg.example",
             "cluster": "upstream_tokened", "credential": {"username": "robot", "passwordEnv": "REG_PASSWORD"},
             "tokenRealms": [{"url": "http://auth.example/token", "cluster": "auth_cluster"}]}
        ]
    })
}

pub fn options() -> Options {
    Options {
        env: vec![("REG_PASSWORD".into(), PASSWORD.into())],
        now_nanos: Some(NOW * 1_000_000_000),
        ..Options::default()
    }
}

/// A host with the module started and the test configuration accepted.
pub fn host() -> Host {
    let mut h = Host::with(options()).unwrap();
    assert!(
        h.configure(config().to_string().as_bytes()).unwrap(),
        "logs: {:?}",
        h.rec().logs
    );
    h
}

/// Sends request headers on a new stream; returns the stream id and the filter's action.
pub fn request(h: &mut Host, method: &str, path: &str, auth: Option<&str>) -> (u32, Action) {
    let mut hs = vec![
        (":method", method),
        (":path", path),
        (":authority", "proxy.local:8080"),
        (":scheme", "http"),
        ("user-agent", "skopeo"),
    ];
    if let Some(a) = auth {
        hs.push(("authorization", a));
    }
    let id = h.new_stream().unwrap();
    let a = h.request_headers(id, headers(&hs), true).unwrap();
    (id, a)
}

pub fn basic_credential() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("robot:{PASSWORD}"))
    )
}

/// Answers the one pending probe (`GET /v2/` to the connector's cluster) with a Basic challenge.
pub fn answer_basic_probe(h: &mut Host, cluster: &str) {
    let calls = h.pending_calls();
    assert_eq!(calls.len(), 1, "one probe call: {calls:?}");
    let probe = &calls[0];
    assert_eq!(probe.cluster, cluster);
    assert_eq!(probe.header(":method").as_deref(), Some("GET"));
    assert_eq!(probe.header(":path").as_deref(), Some("/v2/"));
    assert!(
        probe.header("authorization").is_none(),
        "the probe carries no credential"
    );
    h.answer_call(probe.token, 401, &[("www-authenticate", r#"Basic realm="x""#)], b"")
        .unwrap();
}

/// Asserts a local OCI error answer.
pub fn assert_refused(h: &Host, id: u32, status: u32, code: &str) -> String {
    let s = h.stream(id);
    let r = s
        .local()
        .unwrap_or_else(|| panic!("expected a local {status} {code}, logs {:?}", h.rec().logs));
    assert_eq!(r.status, status, "body {}", r.body_text());
    let body = r.body_json();
    assert_eq!(body["errors"][0]["code"], code, "body {}", r.body_text());
    assert_eq!(s.resumed_requests, 0, "a refused request is never resumed");
    assert!(h.pending_calls().is_empty(), "nothing sent upstream for a refusal");
    body["errors"][0]["message"].as_str().unwrap_or_default().to_string()
}

/// A forwarded request on `h` (probe answered if it is the connector's first).
pub fn forwarded(h: &mut Host, method: &str, path: &str) -> u32 {
    let t = token("demo", "default");
    let (id, action) = request(h, method, path, Some(&bearer(&t)));
    if action == Action::Pause && h.stream(id).local().is_none() {
        answer_basic_probe(h, "upstream_demo");
    }
    let s = h.stream(id);
    assert!(s.local().is_none(), "forwarded, not answered: {:?}", s.local());
    id
}

/// Answers the pending probe `token` of the `tokened` connector with its Bearer challenge (realm
/// `http://auth.example/token`, service `s`).
pub fn answer_bearer_probe(h: &mut Host, token: u32) {
    h.answer_call(
        token,
        401,
        &[(
            "www-authenticate",
            r#"Bearer realm="http://auth.example/token",service="s""#,
        )],
        b"",
    )
    .unwrap();
}
