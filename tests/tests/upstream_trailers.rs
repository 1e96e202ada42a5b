//! Trailers from a hostile upstream: an answer whose trailers repeat the connector's credential,
//! through a real Envoy that passes trailers on, as it does for an HTTP/2 upstream (Istio's
//! clusters, or a cluster an operator set to HTTP/2). The controller's own clusters speak
//! HTTP/1.1 without trailers, where Envoy drops them (attacks_upstream pins that); here the
//! upstream cluster and the listener are told to keep them (`enable_trailers`), so the filter's
//! removal is what is tested. Real Envoy and filter, real curl over HTTP/2 and HTTP/1.1; the
//! upstream is `connector_e2e::breaker` (no real registry sends trailers, let alone echoing
//! ones).

use std::process::Command;

use connector_devkit::envoy::{Cluster, ConnectorSpec, Envoy, EnvoySpec, WasmFilter, filter_config};
use connector_devkit::http::basic_value;
use connector_devkit::tokens::Minter;
use connector_devkit::{WorkDir, require_wasm};
use connector_e2e::breaker::{Answer, Breaker};
use serde_json::{Value, json};

const PASSWORD: &str = "trailer-robot-pw-7f3a";
const CLUSTER: &str = "upstream_trailers";
const MANIFEST: &str = "/v2/namespaces/team/connectors/registry/lib/app/manifests/v1";

/// Answers every request `200` with a chunked body and two trailers: one repeating the
/// request's `Authorization` (the connector's credential, once the filter has put it there),
/// one harmless.
fn echoing_upstream() -> Breaker {
    Breaker::start(|_, _, head| {
        let auth = head
            .split("\r\n")
            .find_map(|l| {
                l.strip_prefix("authorization: ")
                    .or_else(|| l.strip_prefix("Authorization: "))
            })
            .unwrap_or("none")
            .to_string();
        Answer::Full(format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
             Trailer: X-Debug, X-Checksum\r\n\r\n2\r\n{{}}\r\n0\r\nX-Debug: you sent {auth}\r\n\
             X-Checksum: sha256:abc\r\n\r\n"
        ))
    })
}

/// Trailers kept end to end: by the upstream cluster (HTTP/1.1 `enable_trailers`, which an
/// HTTP/2 cluster does without being told) and by the listener for HTTP/1.1 clients.
fn keep_trailers(cfg: &mut Value) {
    let keep = json!({ "enable_trailers": true });
    if let Some(clusters) = cfg["static_resources"]["clusters"].as_array_mut() {
        for c in clusters {
            c["typed_extension_protocol_options"] = json!({
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": { "http_protocol_options": keep },
                },
            });
        }
    }
    cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_protocol_options"] =
        keep;
}

/// curl's whole output for a GET of `path` with `token`: head, body and trailers (`-i` prints
/// the trailers after the body).
fn curl(envoy: &Envoy, protocol: &str, path: &str, token: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-i", protocol, "--max-time", "20", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://127.0.0.1:{}{path}", envoy.port))
        .output()
        .unwrap_or_else(|e| panic!("curl: {e}"));
    assert!(
        out.status.success(),
        "curl {protocol}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the counter `name` in Envoy's stats (0 when it is not there yet).
fn counter(envoy: &Envoy, name: &str) -> u64 {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{}/stats?filter={name}", envoy.admin_port))
        .output()
        .unwrap_or_else(|e| panic!("curl stats: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn trailers_that_repeat_the_credential_are_removed_and_the_others_arrive() {
    let work = WorkDir::new("e2e-trailers").unwrap();
    let minter = Minter::new(&work.sub("keys").unwrap()).unwrap();
    let upstream = echoing_upstream();
    let connector = ConnectorSpec {
        namespace: "team".into(),
        name: "registry".into(),
        address: upstream.url(),
        cluster: CLUSTER.into(),
        username: "robot".into(),
        password_env: "TEAM_PASSWORD".into(),
        allowed_namespaces: vec![],
        allowed_service_accounts: vec![],
    };
    let spec = EnvoySpec {
        clusters: vec![Cluster {
            name: CLUSTER.into(),
            port: upstream.port,
        }],
        filter: Some(WasmFilter {
            wasm: require_wasm().unwrap(),
            config: filter_config(&minter.jwks(), std::slice::from_ref(&connector)),
            secret_env: vec![("TEAM_PASSWORD".into(), PASSWORD.into())],
            plain_route: false,
        }),
    };
    let envoy = Envoy::start_static_edited(&work, &spec, 1, keep_trailers).unwrap();
    let token = minter.valid("team", "builder").unwrap();
    let basic = basic_value("robot", PASSWORD);
    let stat = "wasmcustom.oci_connector.connector.team.registry.refused.credential_echoed";

    for (n, protocol) in ["--http2-prior-knowledge", "--http1.1"].into_iter().enumerate() {
        let text = curl(&envoy, protocol, MANIFEST, &token);
        let lower = text.to_ascii_lowercase();
        assert!(
            lower.starts_with("http/2 200") || lower.starts_with("http/1.1 200"),
            "{protocol}: {text}"
        );
        // The upstream did get the credential, so its trailer could have carried it.
        let heads = upstream.heads();
        assert!(
            heads.last().is_some_and(|h| h.contains(&basic)),
            "{protocol}: the upstream got the connector's credential: {heads:?}"
        );
        // Trailers do pass here (the harmless one arrives), so the echo's absence is the filter's.
        assert!(
            lower.contains("x-checksum: sha256:abc"),
            "{protocol}: trailers were not passed on: {text}"
        );
        assert!(
            !lower.contains("x-debug:"),
            "{protocol}: the echoing trailer arrived: {text}"
        );
        for secret in [PASSWORD, basic.as_str(), basic.trim_start_matches("Basic ")] {
            assert!(
                !text.contains(secret),
                "{protocol}: the client got the credential: {text}"
            );
        }
        assert!(
            !text.contains(&token),
            "{protocol}: the client's token came back: {text}"
        );
        assert_eq!(
            counter(&envoy, stat),
            n as u64 + 1,
            "{protocol}: one removal counted per answer"
        );
    }
    let log = envoy.log();
    assert!(log.contains("response trailer(s) removed"), "the removal is logged");
    assert!(!log.contains(PASSWORD) && !log.contains(basic.trim_start_matches("Basic ")));
}
