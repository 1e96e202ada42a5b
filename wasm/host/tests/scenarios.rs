//! Whole requests through the shipped filter module (`target/wasm32-wasip1/release/
//! connector_filter.wasm`) under wasmtime, with the test host answering the proxy-wasm ABI as
//! Envoy does. Each test has its own `Host` (its own module instance and record).

mod common;

use base64::Engine as _;
use common::*;
use connector_wasm_host::{Action, Headers, Host, Options, headers};
use serde_json::json;

#[test]
fn module_loads_and_every_import_is_provided() {
    let h = Host::with(options()).unwrap();
    let imports = h.imports();
    eprintln!("imports: {imports:?}");
    assert!(imports.iter().any(|i| i == "env::proxy_http_call"));
    assert!(imports.iter().any(|i| i == "wasi_snapshot_preview1::random_get"));
    let exports = h.exports();
    for e in [
        "proxy_abi_version_0_2_1",
        "proxy_on_memory_allocate",
        "proxy_on_vm_start",
        "proxy_on_configure",
        "proxy_on_request_headers",
        "proxy_on_http_call_response",
    ] {
        assert!(exports.iter().any(|x| x == e), "export {e} missing: {exports:?}");
    }
}

#[test]
fn challenge_on_api_base_without_credentials() {
    let mut h = host();
    let (id, action) = request(&mut h, "GET", "/v2/", None);
    assert_eq!(action, Action::Pause);
    let r = h.stream(id).local().expect("a local response").clone();
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some(r#"Basic realm="oci-connector""#)
    );
    assert_eq!(
        r.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    assert_eq!(r.body_json()["errors"][0]["code"], "UNAUTHORIZED");
    h.finish(id).unwrap();
}

/// Like [`request`], with extra client headers (values as raw bytes).
fn request_raw(h: &mut Host, hs: Headers) -> (u32, Action) {
    let id = h.new_stream().unwrap();
    let a = h.request_headers(id, hs, true).unwrap();
    (id, a)
}

#[test]
fn valid_token_is_forwarded_with_the_connector_credential() {
    let mut h = host();
    let t = token("demo", "default");
    let path = format!("{REGISTRY}/lib/app/manifests/v1");
    let mut hs = headers(&[
        (":method", "GET"),
        (":path", &path),
        (":authority", "proxy.local:8080"),
        (":scheme", "http"),
        ("authorization", &bearer(&t)),
        ("cookie", "session=1"),
        ("proxy-authorization", "Basic eDp5"),
        ("x-forwarded-host", "evil.example"),
        // Sent twice: both go.
        ("cookie", "other=2"),
        ("x-real-ip", "10.0.0.1"),
    ]);
    hs.push((
        b"accept".to_vec(),
        b"application/vnd.oci.image.manifest.v1+json".to_vec(),
    ));
    let (id, action) = request_raw(&mut h, hs);
    // The first request to a connector asks the upstream which scheme it wants.
    assert_eq!(action, Action::Pause);
    assert!(
        h.stream(id).request_header("authorization").is_none(),
        "client token dropped while waiting"
    );
    answer_basic_probe(&mut h, "upstream_demo");
    let s = h.stream(id);
    assert_eq!(s.resumed_requests, 1, "resumed after the probe");
    assert!(s.local().is_none());
    assert_eq!(s.request_header_all("authorization"), vec![basic_credential()]);
    assert_eq!(s.request_header(":path").as_deref(), Some("/v2/lib/app/manifests/v1"));
    assert_eq!(
        s.request_header(":authority").as_deref(),
        Some("registry.internal:5000")
    );
    assert_eq!(
        s.request_header("x-oci-connector-cluster").as_deref(),
        Some("upstream_demo")
    );
    assert_eq!(s.request_header("x-forwarded-proto").as_deref(), Some("http"));
    for gone in ["cookie", "proxy-authorization", "x-forwarded-host", "x-real-ip"] {
        assert!(s.request_header(gone).is_none(), "{gone} must not reach the upstream");
    }
    assert!(s.request_header("accept").is_some(), "other headers kept");
    assert!(
        !s.request_headers
            .iter()
            .any(|(_, v)| String::from_utf8_lossy(v).contains(&t)),
        "the client's token never reaches the upstream"
    );
    let props = &h.rec().properties;
    assert_eq!(
        props.get(b"oci_connector.connector".as_slice()).map(Vec::as_slice),
        Some(b"demo/registry".as_slice())
    );
    assert_eq!(
        props.get(b"oci_connector.subject".as_slice()).map(Vec::as_slice),
        Some(b"system:serviceaccount:demo:default".as_slice())
    );
    // The upstream's answer passes; the stream ends as Envoy ends it.
    let a = h
        .response_headers(
            id,
            headers(&[(":status", "200"), ("content-type", "application/json")]),
            false,
        )
        .unwrap();
    assert_eq!(a, Action::Continue);
    assert_eq!(h.response_body(id, b"{}", true).unwrap(), Action::Continue);
    h.finish(id).unwrap();

    // Second request, Basic login form (`sa:<token>`): the scheme is known, no probe.
    let login = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("sa:{}", token("ci", "builder")))
    );
    let (id2, a2) = request(
        &mut h,
        "HEAD",
        &format!("{REGISTRY}/lib/app/blobs/sha256:{}", "a".repeat(64)),
        Some(&login),
    );
    assert_eq!(a2, Action::Continue, "logs {:?}", h.rec().logs);
    assert!(h.pending_calls().is_empty());
    let s2 = h.stream(id2);
    assert_eq!(s2.request_header_all("authorization"), vec![basic_credential()]);
    assert_eq!(
        s2.request_header(":path").as_deref(),
        Some(format!("/v2/lib/app/blobs/sha256:{}", "a".repeat(64)).as_str())
    );
    assert_eq!(h.rec().http_calls.len(), 1, "one probe for the connector, ever");
}

#[test]
fn host_form_is_forwarded_too() {
    let mut h = host();
    let t = token("demo", "default");
    let hs = headers(&[
        (":method", "GET"),
        (":path", "/v2/lib/app/tags/list"),
        (":authority", "c-registry-connector.demo.svc.cluster.local"),
        (":scheme", "http"),
        ("authorization", &bearer(&t)),
    ]);
    let (id, action) = request_raw(&mut h, hs);
    assert_eq!(action, Action::Pause);
    answer_basic_probe(&mut h, "upstream_demo");
    let s = h.stream(id);
    assert_eq!(s.resumed_requests, 1);
    assert_eq!(s.request_header(":path").as_deref(), Some("/v2/lib/app/tags/list"));
    assert_eq!(
        s.request_header(":authority").as_deref(),
        Some("registry.internal:5000")
    );
    assert_eq!(s.request_header_all("authorization"), vec![basic_credential()]);
}

#[test]
fn every_refusal_answers_with_status_and_oci_json() {
    let mut h = host();
    let manifest = format!("{REGISTRY}/lib/app/manifests/v1");
    let mut expired = claims("demo", "default");
    expired["exp"] = json!(NOW - 3600);
    expired["nbf"] = json!(NOW - 7200);
    expired["iat"] = json!(NOW - 7200);
    let mut wrong_aud = claims("demo", "default");
    wrong_aud["aud"] = json!("someone-else");
    let cases: Vec<(&str, String, Option<String>, u32, &str)> = vec![
        ("no credential", manifest.clone(), None, 401, "UNAUTHORIZED"),
        (
            "empty basic",
            manifest.clone(),
            Some("Basic Og==".into()),
            401,
            "UNAUTHORIZED",
        ),
        (
            "expired",
            manifest.clone(),
            Some(bearer(&sign_kid(KID, &expired))),
            401,
            "UNAUTHORIZED",
        ),
        (
            "wrong audience",
            manifest.clone(),
            Some(bearer(&sign_kid(KID, &wrong_aud))),
            401,
            "UNAUTHORIZED",
        ),
        (
            "unknown kid",
            manifest.clone(),
            Some(bearer(&sign_kid("rsa-9", &claims("demo", "default")))),
            401,
            "UNAUTHORIZED",
        ),
        (
            "other namespace",
            manifest.clone(),
            Some(bearer(&token("evil", "default"))),
            403,
            "DENIED",
        ),
        (
            "unknown connector",
            "/v2/namespaces/demo/connectors/nope/lib/app/manifests/v1".into(),
            Some(bearer(&token("evil", "default"))),
            403,
            "DENIED",
        ),
        (
            "bad name",
            format!("{REGISTRY}/Lib/App/manifests/v1"),
            Some(bearer(&token("demo", "default"))),
            400,
            "NAME_INVALID",
        ),
        (
            "catalog",
            "/v2/_catalog".into(),
            Some(bearer(&token("demo", "default"))),
            403,
            "UNSUPPORTED",
        ),
    ];
    let mut messages = Vec::new();
    for (what, path, auth, status, code) in &cases {
        let (id, action) = request(&mut h, "GET", path, auth.as_deref());
        assert_eq!(action, Action::Pause, "{what}");
        let message = assert_refused(&h, id, *status, code);
        assert!(!message.is_empty(), "{what}: the message names the problem");
        let r = h.stream(id).local().unwrap();
        assert_eq!(r.header("content-type").as_deref(), Some("application/json"), "{what}");
        if *status == 401 {
            assert_eq!(
                r.header("www-authenticate").as_deref(),
                Some(r#"Basic realm="oci-connector""#),
                "{what}"
            );
        }
        // The client's credential was not replaced by the connector's on a refusal.
        assert!(
            h.stream(id)
                .request_header_all("authorization")
                .iter()
                .all(|v| !v.contains("cm9ib3Q")),
            "{what}"
        );
        h.finish(id).unwrap();
        messages.push((what.to_string(), message));
    }
    eprintln!("{messages:#?}");
    let msg = |w: &str| messages.iter().find(|(x, _)| x == w).unwrap().1.to_lowercase();
    assert!(msg("expired").contains("expired"), "{}", msg("expired"));
    assert!(msg("wrong audience").contains("audience"), "{}", msg("wrong audience"));
    assert!(msg("unknown kid").contains("key"), "{}", msg("unknown kid"));
    // One message for "unknown" and "not yours": no probing for connectors.
    assert_eq!(
        msg("other namespace").replace("demo/registry", "X"),
        msg("unknown connector").replace("demo/nope", "X")
    );
    assert!(h.rec().http_calls.is_empty(), "no refusal sent anything anywhere");
}

#[test]
fn upload_location_is_mapped_back_to_the_client_path() {
    let mut h = host();
    let id = forwarded(&mut h, "POST", &format!("{REGISTRY}/lib/app/blobs/uploads/"));
    assert_eq!(
        h.stream(id).request_header(":path").as_deref(),
        Some("/v2/lib/app/blobs/uploads/")
    );
    let a = h
        .response_headers(
            id,
            headers(&[
                (":status", "202"),
                ("location", "/v2/lib/app/blobs/uploads/3f1c?_state=abc"),
                ("docker-upload-uuid", "3f1c"),
                ("range", "0-0"),
            ]),
            true,
        )
        .unwrap();
    assert_eq!(a, Action::Continue);
    let s = h.stream(id);
    assert_eq!(
        s.response_header("location").as_deref(),
        Some(format!("{REGISTRY}/lib/app/blobs/uploads/3f1c?_state=abc").as_str())
    );
    assert!(s.local().is_none());

    // An absolute Location on the upstream's own address is mapped back too.
    let id = forwarded(&mut h, "POST", &format!("{REGISTRY}/lib/app/blobs/uploads/"));
    h.response_headers(
        id,
        headers(&[
            (":status", "202"),
            (
                "location",
                "http://registry.internal:5000/v2/lib/app/blobs/uploads/77?_state=x",
            ),
        ]),
        true,
    )
    .unwrap();
    let loc = h.stream(id).response_header("location").unwrap();
    eprintln!("absolute location became {loc}");
    assert!(
        loc.ends_with(&format!("{REGISTRY}/lib/app/blobs/uploads/77?_state=x")),
        "{loc}"
    );
    assert!(!loc.contains("registry.internal"), "{loc}");

    // Link (pagination) is mapped back as well.
    let id = forwarded(&mut h, "GET", &format!("{REGISTRY}/lib/app/tags/list?n=1"));
    h.response_headers(
        id,
        headers(&[
            (":status", "200"),
            ("link", r#"</v2/lib/app/tags/list?n=1&last=a>; rel="next""#),
        ]),
        false,
    )
    .unwrap();
    assert_eq!(
        h.stream(id).response_header("link").as_deref(),
        Some(format!(r#"<{REGISTRY}/lib/app/tags/list?n=1&last=a>; rel="next""#).as_str())
    );
}

#[test]
fn upstream_challenge_never_reaches_the_client() {
    let mut h = host();
    let id = forwarded(&mut h, "GET", &format!("{REGISTRY}/lib/app/manifests/v1"));
    let a = h
        .response_headers(
            id,
            headers(&[
                (":status", "401"),
                ("www-authenticate", r#"Basic realm="upstream-registry""#),
                ("content-type", "application/json"),
            ]),
            false,
        )
        .unwrap();
    assert_eq!(a, Action::Pause);
    let r = h.stream(id).local().expect("replaced by a local answer").clone();
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some(r#"Basic realm="oci-connector""#)
    );
    assert_eq!(r.body_json()["errors"][0]["code"], "UNAUTHORIZED");
    assert!(r.body_text().contains("credential"), "{}", r.body_text());
    assert!(!r.body_text().contains("upstream-registry"));
}

#[test]
fn bearer_upstream_token_is_fetched_once_and_cached() {
    let mut h = host();
    let path = "/v2/namespaces/demo/connectors/tokened/lib/app/manifests/v1";
    let (id, action) = request(&mut h, "GET", path, Some(&bearer(&token("demo", "default"))));
    assert_eq!(action, Action::Pause);
    let probe = h.pending_calls().remove(0);
    assert_eq!(probe.cluster, "upstream_tokened");
    assert_eq!(probe.header(":path").as_deref(), Some("/v2/"));
    assert_eq!(probe.header(":authority").as_deref(), Some("reg.example"));
    answer_bearer_probe(&mut h, probe.token);
    assert_eq!(h.stream(id).resumed_requests, 0, "still waiting for the token");
    let calls = h.pending_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let fetch = &calls[0];
    assert_eq!(fetch.cluster, "auth_cluster");
    assert_eq!(fetch.header(":authority").as_deref(), Some("auth.example"));
    let fpath = fetch.header(":path").unwrap();
    assert!(fpath.starts_with("/token?"), "{fpath}");
    assert!(fpath.contains("service=s"), "{fpath}");
    assert!(
        fpath.contains("repository%3Alib%2Fapp%3Apull") || fpath.contains("repository:lib/app:pull"),
        "{fpath}"
    );
    assert_eq!(
        fetch.header("authorization"),
        Some(basic_credential()),
        "the realm gets the connector's credential"
    );
    h.answer_call(
        fetch.token,
        200,
        &[("content-type", "application/json")],
        br#"{"token":"t","expires_in":300}"#,
    )
    .unwrap();
    let s = h.stream(id);
    assert_eq!(s.resumed_requests, 1);
    assert!(s.local().is_none(), "{:?}", s.local());
    assert_eq!(s.request_header_all("authorization"), vec!["Bearer t".to_string()]);
    assert_eq!(s.request_header(":authority").as_deref(), Some("reg.example"));
    assert_eq!(
        s.request_header("x-oci-connector-cluster").as_deref(),
        Some("upstream_tokened")
    );
    h.response_headers(id, headers(&[(":status", "200")]), true).unwrap();
    h.finish(id).unwrap();

    // The cached token: no second call.
    let (id2, a2) = request(&mut h, "GET", path, Some(&bearer(&token("demo", "default"))));
    assert_eq!(a2, Action::Continue);
    assert!(h.pending_calls().is_empty());
    assert_eq!(h.rec().http_calls.len(), 2, "probe + one token fetch");
    assert_eq!(
        h.stream(id2).request_header_all("authorization"),
        vec!["Bearer t".to_string()]
    );
    assert_eq!(
        h.rec()
            .metric("oci_connector.connector.demo.tokened.upstream_token_fetches")
            .map(|m| m.value),
        Some(1)
    );
}

#[test]
fn unlisted_token_realm_is_refused_and_gets_nothing() {
    let mut h = host();
    let path = "/v2/namespaces/demo/connectors/tokened/lib/app/manifests/v1";
    let (id, _) = request(&mut h, "GET", path, Some(&bearer(&token("demo", "default"))));
    let probe = h.pending_calls().remove(0);
    h.answer_call(
        probe.token,
        401,
        &[(
            "www-authenticate",
            r#"Bearer realm="http://evil.example/token",service="s""#,
        )],
        b"",
    )
    .unwrap();
    let r = h.stream(id).local().expect("refused").clone();
    assert_eq!(r.status, 503);
    assert_eq!(r.body_json()["errors"][0]["code"], "UNAVAILABLE");
    assert!(r.body_text().contains("evil.example"), "{}", r.body_text());
    assert!(
        h.pending_calls().is_empty(),
        "no token fetch: the credential is not sent"
    );
    assert_eq!(h.stream(id).resumed_requests, 0);
}

#[test]
fn bad_configuration_is_refused_with_every_problem_and_fails_closed() {
    let mut h = Host::with(options()).unwrap();
    let mut bad = config();
    bad["identity"]["audiences"] = json!([]);
    bad["connectors"][0]["address"] = json!("ftp://registry.internal");
    bad["connectors"][1]["credential"]["passwordEnv"] = json!("NOT_SET_ANYWHERE");
    let accepted = h.configure(bad.to_string().as_bytes()).unwrap();
    assert!(!accepted, "proxy_on_configure must return false");
    let logs: Vec<String> = h.rec().logs.iter().map(|(_, m)| m.clone()).collect();
    eprintln!("{logs:#?}");
    let header = h.rec().logs_containing("configuration refused");
    assert_eq!(header.len(), 1, "{logs:?}");
    assert!(header[0].contains("3 problem(s)"), "{}", header[0]);
    let problems: Vec<&String> = logs.iter().filter(|m| m.starts_with("config ")).collect();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(
        problems.iter().any(|m| m.contains("identity.audiences")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|m| m.contains("connectors[0].address")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|m| m.contains("connectors[1].credential.passwordEnv") && m.contains("NOT_SET_ANYWHERE")),
        "{problems:?}"
    );
    assert!(
        h.rec()
            .logs
            .iter()
            .filter(|(_, m)| m.starts_with("config "))
            .all(|(l, _)| *l == 4),
        "error level"
    );

    // Fail closed: even a valid token gets no forward.
    let (id, action) = request(
        &mut h,
        "GET",
        &format!("{REGISTRY}/lib/app/manifests/v1"),
        Some(&bearer(&token("demo", "default"))),
    );
    assert_eq!(action, Action::Pause);
    let r = h.stream(id).local().expect("refused").clone();
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert_eq!(r.body_json()["errors"][0]["code"], "UNAVAILABLE");
    assert!(h.stream(id).request_header("x-oci-connector-cluster").is_none());
    assert!(h.pending_calls().is_empty());

    // Not JSON at all: refused too, then a good configuration is accepted on the same VM.
    assert!(!h.configure(b"{not json").unwrap());
    assert!(h.configure(config().to_string().as_bytes()).unwrap());
    let (id, _) = request(&mut h, "GET", "/v2/", Some(&bearer(&token("demo", "default"))));
    assert_eq!(h.stream(id).local().map(|r| r.status), Some(200));
}

#[test]
fn metrics_are_defined_and_incremented() {
    let mut h = host();
    let (id, _) = request(&mut h, "GET", "/v2/", None);
    h.finish(id).unwrap();
    let (id, _) = request(&mut h, "GET", "/v2/", None);
    h.finish(id).unwrap();
    let answered: Vec<_> = h
        .rec()
        .metrics
        .iter()
        .filter(|m| m.name.starts_with("oci_connector.answered."))
        .cloned()
        .collect();
    assert_eq!(answered.len(), 1, "one counter for the reason: {answered:?}");
    assert_eq!(answered[0].value, 2);
    assert_eq!(answered[0].kind, 0, "a counter");

    let id = forwarded(&mut h, "GET", &format!("{REGISTRY}/lib/app/manifests/v1"));
    h.finish(id).unwrap();
    let id = forwarded(&mut h, "GET", &format!("{REGISTRY}/lib/app/manifests/v2"));
    h.finish(id).unwrap();
    let value = |n: &str| h.rec().metric(n).map(|m| m.value);
    assert_eq!(value("oci_connector.connector.demo.registry.forwarded"), Some(2));
    assert_eq!(value("oci_connector.token_cache.misses"), Some(1));
    assert_eq!(
        value("oci_connector.token_cache.hits"),
        Some(1),
        "same token: verified once"
    );
    let defines = h.rec().call_count("proxy_define_metric");
    assert_eq!(
        defines,
        h.rec().metrics.len(),
        "each metric defined once, then only incremented"
    );
    eprintln!("{:#?}", h.rec().metrics);
}

/// A request with hostile bytes must be answered or forwarded, never trap the module.
fn survives(h: &mut Host, what: &str, hs: Headers) -> u32 {
    let id = h.new_stream().unwrap();
    let action = h
        .request_headers(id, hs, true)
        .unwrap_or_else(|e| panic!("{what}: the module trapped: {e:#}"));
    assert!(matches!(action, Action::Continue | Action::Pause), "{what}: {action:?}");
    id
}

fn base_headers(path: &[u8], auth: &[u8]) -> Headers {
    vec![
        (b":method".to_vec(), b"GET".to_vec()),
        (b":path".to_vec(), path.to_vec()),
        (b":authority".to_vec(), b"proxy.local".to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (b"authorization".to_vec(), auth.to_vec()),
    ]
}

#[test]
fn hostile_header_values_never_trap_the_module() {
    let mut h = host();
    let manifest = format!("{REGISTRY}/lib/app/manifests/v1").into_bytes();
    let good = bearer(&token("demo", "default")).into_bytes();
    let huge = vec![b'A'; 1 << 20];
    let mut huge_bearer = b"Bearer ".to_vec();
    huge_bearer.extend_from_slice(&huge);
    let mut bad_utf8_path = manifest.clone();
    bad_utf8_path.extend_from_slice(b"\xff\xfe");
    let mut basic_bad = b"Basic ".to_vec();
    basic_bad.extend_from_slice(
        base64::engine::general_purpose::STANDARD
            .encode(b"sa:\xff\xfe\x00")
            .as_bytes(),
    );
    let cases: Vec<(&str, Headers)> = vec![
        (
            "non-UTF-8 authorization",
            base_headers(&manifest, b"Bearer \xff\xfe\xfd"),
        ),
        ("non-UTF-8 basic credential", base_headers(&manifest, &basic_bad)),
        ("1 MiB authorization", base_headers(&manifest, &huge_bearer)),
        (
            "1 MiB basic",
            base_headers(&manifest, &[b"Basic ".as_slice(), &huge].concat()),
        ),
        ("non-UTF-8 path", base_headers(&bad_utf8_path, &good)),
        ("1 MiB path", base_headers(&[b"/v2/".as_slice(), &huge].concat(), &good)),
        ("empty path", base_headers(b"", &good)),
        ("NUL in path", base_headers(b"/v2/\0/manifests/x", &good)),
        ("token of dots", base_headers(&manifest, b"Bearer ..")),
        (
            "token of garbage base64",
            base_headers(&manifest, b"Bearer e30.e30.////"),
        ),
        ("non-UTF-8 authority", {
            let mut hs = base_headers(b"/v2/lib/app/manifests/v1", &good);
            hs[2].1 = b"c-registry-connector.\xff.svc".to_vec();
            hs
        }),
        ("huge authority", {
            let mut hs = base_headers(b"/v2/lib/app/manifests/v1", &good);
            hs[2].1 = huge.clone();
            hs
        }),
        (
            "no pseudo-headers at all",
            vec![(b"authorization".to_vec(), good.clone())],
        ),
        ("two authorization headers", {
            let mut hs = base_headers(&manifest, &good);
            hs.push((b"authorization".to_vec(), b"\xff".to_vec()));
            hs
        }),
        ("non-UTF-8 cookie and forwarded", {
            let mut hs = base_headers(&manifest, &good);
            hs.push((b"cookie".to_vec(), b"\xff\xff".to_vec()));
            hs.push((b"x-forwarded-proto".to_vec(), b"\xff".to_vec()));
            hs
        }),
        ("many headers", {
            let mut hs = base_headers(&manifest, &good);
            for i in 0..2000 {
                hs.push((format!("x-h-{i}").into_bytes(), vec![0x80 + (i % 64) as u8; 64]));
            }
            hs
        }),
    ];
    let mut probe_answered = false;
    for (what, hs) in cases {
        let id = survives(&mut h, what, hs);
        // The first forward asks for the challenge: answer it with hostile bytes too.
        if !probe_answered && let Some(call) = h.pending_calls().first().cloned() {
            h.answer_call_raw(
                call.token,
                vec![
                    (b":status".to_vec(), b"401".to_vec()),
                    (b"www-authenticate".to_vec(), b"Basic realm=\"\xff\xfe\"".to_vec()),
                ],
                vec![0xff; 4096],
            )
            .unwrap_or_else(|e| panic!("{what}: probe answer trapped: {e:#}"));
            probe_answered = true;
        }
        let s = h.stream(id);
        assert!(
            s.local().is_some() || s.request_header("x-oci-connector-cluster").is_some(),
            "{what}: neither answered nor forwarded"
        );
        if let Some(r) = s.local() {
            assert!(r.status >= 400, "{what}: {}", r.status);
        }
        // The response phase with hostile bytes.
        h.response_headers(
            id,
            vec![
                (b":status".to_vec(), b"\xff01".to_vec()),
                (b"location".to_vec(), b"/v2/\xff\xfe/blobs/uploads/x".to_vec()),
                (b"link".to_vec(), huge.clone()),
                (b"www-authenticate".to_vec(), b"Bearer realm=\"\xff\"".to_vec()),
            ],
            false,
        )
        .unwrap_or_else(|e| panic!("{what}: response phase trapped: {e:#}"));
        h.response_body(id, &[0xff; 70_000], true)
            .unwrap_or_else(|e| panic!("{what}: response body trapped: {e:#}"));
        h.finish(id).unwrap_or_else(|e| panic!("{what}: finish trapped: {e:#}"));
    }
    assert!(probe_answered, "one case reached the upstream probe");
    // Still healthy afterwards: a normal request is forwarded.
    let id = forwarded(&mut h, "GET", &format!("{REGISTRY}/lib/app/manifests/v1"));
    assert_eq!(
        h.stream(id).request_header_all("authorization"),
        vec![basic_credential()]
    );
    assert!(
        h.rec().logs.iter().all(|(level, _)| *level < 5),
        "no critical (panic) log"
    );
}

#[test]
fn hostile_upstream_answers_never_trap_the_module() {
    let mut h = host();
    let path = "/v2/namespaces/demo/connectors/tokened/lib/app/manifests/v1";
    // (what, :status, content-type, body)
    type Answer = (&'static str, Vec<u8>, Vec<u8>, Vec<u8>);
    let answers: Vec<Answer> = vec![
        (
            "non-UTF-8 token body",
            b"200".to_vec(),
            b"application/json".to_vec(),
            b"{\"token\":\"\xff\xfe\"}".to_vec(),
        ),
        (
            "huge token body",
            b"200".to_vec(),
            b"application/json".to_vec(),
            vec![b'{'; 2 << 20],
        ),
        (
            "status not a number",
            b"\xff".to_vec(),
            b"\xff".to_vec(),
            b"{}".to_vec(),
        ),
        (
            "token with CRLF",
            b"200".to_vec(),
            b"application/json".to_vec(),
            br#"{"token":"a\r\nx-evil: 1"}"#.to_vec(),
        ),
    ];
    for (what, status, ctype, body) in answers {
        let (id, _) = request(&mut h, "GET", path, Some(&bearer(&token("demo", "default"))));
        let mut calls = h.pending_calls();
        if calls.first().is_some_and(|c| c.cluster == "upstream_tokened") {
            h.answer_call(
                calls[0].token,
                401,
                &[(
                    "www-authenticate",
                    r#"Bearer realm="http://auth.example/token",service="s""#,
                )],
                b"",
            )
            .unwrap();
            calls = h.pending_calls();
        }
        let fetch = calls.first().unwrap_or_else(|| panic!("{what}: a token fetch")).clone();
        h.answer_call_raw(
            fetch.token,
            vec![(b":status".to_vec(), status), (b"content-type".to_vec(), ctype)],
            body,
        )
        .unwrap_or_else(|e| panic!("{what}: trapped: {e:#}"));
        let s = h.stream(id);
        let r = s
            .local()
            .unwrap_or_else(|| panic!("{what}: refused, {:?}", s.request_header("authorization")));
        assert_eq!(r.status, 503, "{what}: {}", r.body_text());
        h.finish(id).unwrap();
    }
}

#[test]
fn an_unimplemented_import_fails_loudly() {
    // (module (import "env" "proxy_frobnicate" (func)))
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    wasm.extend_from_slice(&[0x01, 0x04, 0x01, 0x60, 0x00, 0x00]);
    let name = b"proxy_frobnicate";
    let mut import = vec![0x01, 0x03];
    import.extend_from_slice(b"env");
    import.push(name.len() as u8);
    import.extend_from_slice(name);
    import.extend_from_slice(&[0x00, 0x00]);
    wasm.push(0x02);
    wasm.push(import.len() as u8);
    wasm.extend_from_slice(&import);
    let dir = std::env::temp_dir().join(format!("wasm-host-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("frob.wasm");
    std::fs::write(&path, &wasm).unwrap();
    let err = Host::with(Options {
        module: Some(path),
        ..Options::default()
    })
    .err()
    .expect("refused");
    let text = format!("{err:#}");
    assert!(text.contains("env::proxy_frobnicate"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
