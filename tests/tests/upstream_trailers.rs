//! Trailers in both directions through a real Envoy that passes them on, as it does for an
//! HTTP/2 upstream (Istio's clusters, or a cluster an operator set to HTTP/2). The controller's
//! own clusters speak HTTP/1.1 without trailers, where Envoy drops them (attacks_upstream pins
//! that); here the upstream cluster and the listener are told to keep them (`enable_trailers`),
//! so what is tested is the filter's own removal:
//!
//! - an answer whose trailers repeat the connector's credential (the upstream is
//!   `connector_e2e::breaker`: no real registry sends trailers, let alone echoing ones), read
//!   with real curl over HTTP/2 and HTTP/1.1;
//! - a request whose trailers repeat the client's token, sent by Go's net/http over HTTP/2
//!   (`tests/testdata/trailer-client.go`, built with the Go toolchain set-up installs; no
//!   registry client sends trailers), to an upstream that records the bytes it receives.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};

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

/// Envoy with the filter and one connector, `team/registry`, to the open upstream on
/// 127.0.0.1:`upstream_port` (Basic `robot`), trailers kept ([`keep_trailers`]).
fn proxy(work: &WorkDir, minter: &Minter, upstream_port: u16) -> Envoy {
    let connector = ConnectorSpec {
        namespace: "team".into(),
        name: "registry".into(),
        address: format!("http://127.0.0.1:{upstream_port}"),
        cluster: CLUSTER.into(),
        username: "robot".into(),
        password_env: "TEAM_PASSWORD".into(),
        allowed_namespaces: vec![],
        allowed_service_accounts: vec![],
    };
    let spec = EnvoySpec {
        clusters: vec![Cluster {
            name: CLUSTER.into(),
            port: upstream_port,
        }],
        filter: Some(WasmFilter {
            wasm: require_wasm().unwrap(),
            config: filter_config(&minter.jwks(), std::slice::from_ref(&connector)),
            secret_env: vec![("TEAM_PASSWORD".into(), PASSWORD.into())],
            plain_route: false,
        }),
    };
    Envoy::start_static_edited(work, &spec, 1, keep_trailers).unwrap()
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
    let envoy = proxy(&work, &minter, upstream.port);
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

/// An upstream that answers `GET /v2/` with `200 {}` (an open registry: the filter sends its
/// Basic credential straight away) and anything else with `201`, after reading the whole
/// request, chunked body and trailers included; it keeps every request's bytes as received.
fn recording_upstream() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(stream) = conn else { continue };
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut out = stream.try_clone().unwrap_or_else(|e| panic!("clone: {e}"));
                let mut reader = BufReader::new(stream);
                while let Some((raw, get_base)) = read_request(&mut reader) {
                    keep.lock().unwrap_or_else(|e| e.into_inner()).push(raw);
                    let answer: &[u8] = if get_base {
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                    } else {
                        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
                    };
                    if out.write_all(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// One request as received (head, body and trailers), and whether it is `GET /v2/`; `None` at
/// the connection's end.
fn read_request(r: &mut BufReader<std::net::TcpStream>) -> Option<(String, bool)> {
    let mut raw = String::new();
    let mut line = String::new();
    let (mut chunked, mut length) = (false, 0usize);
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        raw.push_str(&line);
        let lower = line.to_ascii_lowercase();
        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let get_base = raw.starts_with("GET /v2/ ");
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).ok()?;
            raw.push_str(&line);
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).ok()?;
            if size == 0 {
                // The trailers, up to the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line).ok()? == 0 {
                        return None;
                    }
                    raw.push_str(&line);
                    if line == "\r\n" {
                        return Some((raw, get_base));
                    }
                }
            }
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk).ok()?;
            raw.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).ok()?;
    raw.push_str(&String::from_utf8_lossy(&body));
    Some((raw, get_base))
}

#[test]
fn the_clients_token_in_request_trailers_never_reaches_the_upstream() {
    let work = WorkDir::new("e2e-request-trailers").unwrap();
    let minter = Minter::new(&work.sub("keys").unwrap()).unwrap();
    let (port, seen) = recording_upstream();
    let envoy = proxy(&work, &minter, port);
    let token = minter.valid("team", "builder").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/v2/namespaces/team/connectors/registry/lib/app/blobs/uploads/u-1?digest=sha256:{}",
        envoy.port,
        "1".repeat(64)
    );
    let out = Command::new(connector_e2e::go_client(&work, "trailer-client"))
        .arg(&url)
        .arg(&token)
        .output()
        .unwrap_or_else(|e| panic!("trailer-client: {e}"));
    let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        status,
        "201",
        "trailer-client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let put = seen
        .iter()
        .find(|r| r.starts_with("PUT "))
        .unwrap_or_else(|| panic!("the upload reached the upstream: {seen:?}"));
    let lower = put.to_ascii_lowercase();
    // The trailers do pass here (the harmless one arrives after the body), so the token's
    // absence is the filter's.
    assert!(lower.contains("layer-bytes"), "{put}");
    assert!(
        lower.contains("\r\nx-checksum: sha256:abc\r\n"),
        "trailers were not passed on: {put}"
    );
    assert!(!put.contains(&token), "the upstream got the client's token: {put}");
    assert!(
        put.contains(&basic_value("robot", PASSWORD)),
        "the upstream got the connector's credential in the head: {put}"
    );
}
