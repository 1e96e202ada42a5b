//! Faults, end to end: what a registry client sees when a part of the path fails, and proof that
//! nothing was lost or leaked. Real controller (file mode, xDS), real Envoy, real Distribution,
//! and, where a misbehaving upstream is needed, a stand-in TCP server written here.
//!
//! Needs `cargo build -p connector-controller` and the release filter module (`make test` does both).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use connector_devkit::controller::Controller;
use connector_devkit::envoy::{Envoy, envoy_binary, xds_bootstrap};
use connector_devkit::http::{Request, Response, basic_value};
use connector_devkit::procs::{self, Proc};
use connector_devkit::stack::{CONNECTOR_NAME, envoy_problems};
use connector_devkit::token_server::TokenServer;
use connector_devkit::token_stack::TokenStack;
use connector_devkit::{WorkDir, random_secret};
use connector_e2e::oci_error;
use connector_e2e::xds::{NS, Setup, connector_yaml, pull, put, secret_yaml, setup, start_stack};

const REPO: &str = "library/app";
const TAG: &str = "v1";
const MANIFEST_TYPES: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Two shared cores: one fault scenario at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes the Secret `robot` and one Connector per `(name, address)`, starts the controller (with
/// `args`) and Envoy fed by it, and mints a token of `demo/default`.
fn serve(s: &Setup, connectors: &[(&str, &str)], args: &[&str]) -> (Controller, Envoy, String) {
    let creds = s.registry.credentials.clone().unwrap();
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &creds));
    for (name, address) in connectors {
        put(
            &s.manifests,
            &format!("{name}.yaml"),
            &connector_yaml(name, address, "robot"),
        );
    }
    let (controller, envoy) = start_stack(s, args);
    (controller, envoy, s.minter.valid(NS, "default").unwrap())
}

fn manifest_path(connector: &str) -> String {
    format!("/v2/namespaces/{NS}/connectors/{connector}/{REPO}/manifests/{TAG}")
}

/// `GET manifest` through `connector`, and how long the answer took.
fn get_manifest(port: u16, connector: &str, token: &str) -> (Response, Duration) {
    let started = Instant::now();
    let mut req = Request::get(&manifest_path(connector))
        .header("Accept", MANIFEST_TYPES)
        .bearer(token);
    req.timeout = Duration::from_secs(30);
    let r = req
        .send(port)
        .unwrap_or_else(|e| panic!("GET manifest via {connector}: no answer: {e}"));
    (r, started.elapsed())
}

/// Polls until `GET manifest` answers 200; returns how long it took.
fn until_ok(port: u16, connector: &str, token: &str, deadline: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = Request::get(&manifest_path(connector))
            .header("Accept", MANIFEST_TYPES)
            .bearer(token)
            .send(port)
            .map(|r| r.status)
            .unwrap_or(0);
        if got == 200 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < deadline,
            "connector {connector}: still {got} after {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILL to a process this test started, by its id.
fn kill(pid: u32) {
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
}

/// Waits until nothing accepts connections on `port` any more.
fn until_closed(port: u16) {
    let start = Instant::now();
    while TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok() {
        assert!(start.elapsed() < Duration::from_secs(10), "port {port} still accepts");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The upstream secrets and the client token, for the hygiene scans.
fn secrets(s: &Setup, controller: &Controller, token: &str) -> Vec<(String, String)> {
    let creds = s.registry.credentials.clone().unwrap();
    vec![
        ("upstream password".into(), creds.password.clone()),
        (
            "upstream Basic value".into(),
            basic_value(&creds.username, &creds.password),
        ),
        ("channel key".into(), controller.key().to_string()),
        ("client token".into(), token.to_string()),
    ]
}

fn hygiene(envoy: &Envoy, controller: &Controller, secrets: &[(String, String)]) {
    let problems = envoy_problems(envoy, secrets).unwrap();
    assert!(problems.is_empty(), "Envoy hygiene:\n{}", problems.join("\n"));
    let log = controller.log();
    for (what, value) in secrets {
        assert!(!log.contains(value.as_str()), "{what} appears in the controller's log");
    }
}

/// How a 503 looked: the filter's OCI error or Envoy's own plain text.
fn describe(r: &Response) -> String {
    format!(
        "{} content-type={:?} body={:?}",
        r.status,
        r.header("content-type"),
        r.body_text()
    )
}

/// Fault 1: The registry process stops. Before the first request (the filter's `/v2/` probe cannot
/// reach it) and after requests were served (the request itself is forwarded and its connection
/// refused). Then the registry is restarted on its port and requests succeed again, same Envoy.
#[test]
fn upstream_down_answers_503_and_recovers_without_restarting_envoy() {
    let _turn = serial();
    let mut s = setup("faults-upstream-down");
    let address = s.registry.url();
    let (controller, envoy, token) = serve(&s, &[("registry", &address)], &[]);
    let envoy_pid = envoy.pid().unwrap();

    // Down before the first request: the filter's probe of /v2/ fails, the filter answers.
    kill(s.registry.pid().unwrap());
    until_closed(s.registry.port);
    let (r, took) = get_manifest(envoy.port, "registry", &token);
    eprintln!("registry down, first request: {} after {took:?}", describe(&r));
    assert_eq!(r.status, 503, "{}", r.summary());
    let (code, message) = oci_error(&r);
    assert_eq!(code, "UNAVAILABLE", "{message}");
    assert!(
        message.contains("demo/registry"),
        "the error must name the connector: {message}"
    );
    assert!(took < Duration::from_secs(6), "took {took:?}");

    s.registry.restart().unwrap();
    let took = until_ok(envoy.port, "registry", &token, Duration::from_secs(10));
    eprintln!("registry restarted: 200 after {took:?}");

    // Down after requests were served: the request itself is forwarded to a closed port, and
    // Envoy's router answers.
    kill(s.registry.pid().unwrap());
    until_closed(s.registry.port);
    let (r, took) = get_manifest(envoy.port, "registry", &token);
    eprintln!("registry down, after success: {} after {took:?}", describe(&r));
    assert_eq!(r.status, 503, "{}", r.summary());
    assert!(took < Duration::from_secs(6), "took {took:?}");
    // Envoy's own 503, shaped into OCI JSON by the bootstrap's local_reply_config (it was plain
    // text: a finding of this suite).
    assert_eq!(r.header("content-type"), Some("application/json"), "{}", r.summary());
    let (code, message) = oci_error(&r);
    assert_eq!(code, "UNAVAILABLE", "{message}");
    assert!(message.contains("could not reach the upstream registry"), "{message}");

    s.registry.restart().unwrap();
    let took = until_ok(envoy.port, "registry", &token, Duration::from_secs(10));
    eprintln!("registry restarted again: 200 after {took:?}");
    // Nothing lost: a whole pull, same layers, same Envoy process.
    pull(&s, &envoy.authority(), "registry", &token, "pulled-after-outage");
    assert_eq!(envoy.pid(), Some(envoy_pid), "Envoy was not restarted");
    hygiene(&envoy, &controller, &secrets(&s, &controller, &token));
}

/// A stand-in upstream: records every request head it receives; either never answers, or
/// challenges `/v2/` with Basic and answers everything else `503` with an OCI body. Plain HTTP
/// on purpose: a raw socket that stays silent or answers 503 is the point, not its transport.
struct StandIn {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Silent,
    Overloaded,
}

impl StandIn {
    fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (heads.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = conn else { continue };
                let h = h.clone();
                std::thread::spawn(move || stand_in_serve(stream, behaviour, &h));
            }
        });
        Self { port, heads, stop }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn request_lines(&self) -> Vec<String> {
        self.heads()
            .iter()
            .map(|h| h.split("\r\n").next().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn stand_in_serve(mut stream: TcpStream, behaviour: Behaviour, heads: &Mutex<Vec<String>>) {
    stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let body_len = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        buf.drain(..head_end + 4);
        while buf.len() < body_len {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..body_len);
        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
        heads.lock().unwrap_or_else(|e| e.into_inner()).push(head);
        let out = match behaviour {
            // Hold the connection without a byte of answer until the peer gives up.
            Behaviour::Silent => {
                while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
                return;
            }
            Behaviour::Overloaded if path == "/v2/" => {
                let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
                format!(
                    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"stand-in\"\r\nDocker-Distribution-Api-Version: registry/2.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            }
            Behaviour::Overloaded => {
                let body = STAND_IN_503;
                format!(
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            }
        };
        if stream.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

const STAND_IN_503: &str = r#"{"errors":[{"code":"UNAVAILABLE","message":"stand-in upstream is overloaded"}]}"#;

/// Fault 2: A slow upstream: one that never answers the filter's `/v2/` probe gets a 503 from the
/// filter within its 5 s limit, naming the connector's upstream, and the client's request is
/// never forwarded. A write the upstream answers 503 reaches it exactly once (no retry) and the
/// client gets that 503.
#[test]
fn silent_upstream_times_out_and_writes_are_never_retried() {
    let _turn = serial();
    let s = setup("faults-slow-upstream");
    let silent = StandIn::start(Behaviour::Silent);
    let overloaded = StandIn::start(Behaviour::Overloaded);
    let silent_url = format!("http://127.0.0.1:{}", silent.port);
    let overloaded_url = format!("http://127.0.0.1:{}", overloaded.port);
    let (controller, envoy, token) = serve(&s, &[("silent", &silent_url), ("overloaded", &overloaded_url)], &[]);
    eprintln!(
        "stand-ins before any request: silent {:?}, overloaded {:?}",
        silent.request_lines(),
        overloaded.request_lines()
    );
    let silent_before = silent.heads().len();

    let (r, took) = get_manifest(envoy.port, "silent", &token);
    eprintln!("silent upstream: {} after {took:?}", describe(&r));
    assert_eq!(r.status, 503, "{}", r.summary());
    let (code, message) = oci_error(&r);
    assert_eq!(code, "UNAVAILABLE", "{message}");
    assert!(
        message.contains("demo/silent") && message.contains("upstream"),
        "{message}"
    );
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(7),
        "the filter's limit is 5 s; answered after {took:?}"
    );
    let seen: Vec<String> = silent.heads()[silent_before..].to_vec();
    let lines: Vec<&str> = seen.iter().map(|h| h.split("\r\n").next().unwrap_or("")).collect();
    eprintln!("silent stand-in received: {lines:?}");
    assert_eq!(
        lines.len(),
        1,
        "exactly one probe should have reached the stand-in: {lines:?}"
    );
    assert!(
        lines.iter().all(|l| l.starts_with("GET /v2/ ")),
        "only the probe may reach a silent upstream, not the client's request: {lines:?}"
    );
    assert!(
        seen.iter().all(|h| !h.to_ascii_lowercase().contains("authorization:")),
        "the probe is sent without credentials"
    );

    // Writes on an upstream that answers 503: each arrives once.
    let base = format!("/v2/namespaces/{NS}/connectors/overloaded/{REPO}/blobs/uploads");
    let digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let writes = [
        ("POST", format!("{base}/")),
        ("PATCH", format!("{base}/00000000-0000-0000-0000-000000000001?_state=x")),
        (
            "PUT",
            format!("{base}/00000000-0000-0000-0000-000000000001?_state=x&digest={digest}"),
        ),
    ];
    for (method, path) in &writes {
        let before = overloaded.heads().len();
        let mut req = Request::new(method, path).bearer(&token);
        req.body = vec![b'x'; 4096];
        req.timeout = Duration::from_secs(30);
        let started = Instant::now();
        let r = req.send(envoy.port).unwrap();
        let took = started.elapsed();
        eprintln!("{method} on an overloaded upstream: {} after {took:?}", describe(&r));
        assert_eq!(r.status, 503, "{method}: {}", r.summary());
        assert_eq!(
            r.body_text(),
            STAND_IN_503,
            "{method}: the upstream's own answer is passed on"
        );
        std::thread::sleep(Duration::from_millis(300));
        let seen: Vec<String> = overloaded.heads()[before..].to_vec();
        let arrivals = seen.iter().filter(|h| h.starts_with(&format!("{method} "))).count();
        eprintln!(
            "{method}: the upstream saw {arrivals} {method}(s); all: {:?}",
            seen.iter()
                .map(|h| h.split("\r\n").next().unwrap_or(""))
                .collect::<Vec<_>>()
        );
        assert_eq!(arrivals, 1, "{method} must reach the upstream exactly once");
        let robot = format!(
            "basic {}",
            basic_value("robot", &s.registry.credentials.clone().unwrap().password).to_ascii_lowercase()
        );
        for h in seen.iter().filter(|h| h.starts_with(&format!("{method} "))) {
            let lower = h.to_ascii_lowercase();
            assert!(
                lower.contains(&format!("authorization: {robot}")),
                "{method} carries the connector's credential"
            );
            assert!(!h.contains(&token), "the client's token reached the upstream");
        }
    }
    hygiene(&envoy, &controller, &secrets(&s, &controller, &token));
}

/// Fault 3: The token service of a token-auth upstream is down (its listener closed): 503 naming the
/// token service, and the connector's credential goes nowhere (the registry sees no credential).
#[test]
fn token_service_down_answers_503_and_the_credential_goes_nowhere() {
    let _turn = serial();
    let mut s = TokenStack::start("faults-token-down", true).unwrap();
    let realm = s.token_server.realm();
    let old_port = s.token_server.port;
    let issued = s.token_server.issued();
    // The token server stops; a placeholder (another port, nobody's realm) takes its field.
    let spare = WorkDir::new("faults-token-spare").unwrap();
    let placeholder = TokenServer::start(&spare, "nobody", &random_secret().unwrap()).unwrap();
    drop(std::mem::replace(&mut s.token_server, placeholder));
    until_closed(old_port);
    s.recorder.take();

    let jwt = s.minter.valid(NS, "default").unwrap();
    let path = format!("/v2/namespaces/{NS}/connectors/{CONNECTOR_NAME}/{REPO}/manifests/{TAG}");
    let started = Instant::now();
    let mut req = Request::get(&path).basic("sa", &jwt).header("Accept", MANIFEST_TYPES);
    req.timeout = Duration::from_secs(30);
    let r = req.send(s.envoy.port).unwrap();
    let took = started.elapsed();
    eprintln!("token service down: {} after {took:?}", describe(&r));
    assert_eq!(r.status, 503, "{}", r.summary());
    let (code, message) = oci_error(&r);
    assert_eq!(code, "UNAVAILABLE", "{message}");
    assert!(
        message.contains("token service") && message.contains(&realm),
        "the error must name the token service {realm}: {message}"
    );
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert!(
        r.header("www-authenticate").is_none_or(|c| !c.starts_with("Bearer")),
        "the upstream's challenge must not reach the client"
    );
    let seen = s.recorder.take();
    eprintln!("registry received: {:?}", seen.request_lines());
    assert!(
        seen.authorizations().is_empty(),
        "no credential may reach the registry: {:?}",
        seen.request_lines()
    );
    assert!(!seen.text.contains(&jwt), "the client's token reached the registry");
    assert!(
        seen.request_lines().iter().all(|l| l.starts_with("GET /v2/ ")),
        "only the unauthenticated probe may reach the registry: {:?}",
        seen.request_lines()
    );
    assert!(s.token_server.take().is_empty(), "the placeholder is nobody's realm");
    let mut secrets = s.secrets();
    secrets.extend(
        issued
            .into_iter()
            .enumerate()
            .map(|(i, t)| (format!("upstream token #{i}"), t)),
    );
    let problems = envoy_problems(&s.envoy, &secrets).unwrap();
    assert!(problems.is_empty(), "Envoy hygiene:\n{}", problems.join("\n"));
}

fn sh(script: &str) -> String {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    procs::run(cmd, None).unwrap().ok().unwrap().stdout.trim().to_string()
}

const BIG_MIB: u64 = 128;

/// Fault 6: Envoy killed with a large blob download in flight: the client detects the truncation
/// (short body against Content-Length, or a reset); a new Envoy on the same controller serves
/// the retry, whole and with the right digest.
#[test]
fn envoy_killed_mid_download_truncates_and_a_new_envoy_serves_the_retry() {
    let _turn = serial();
    let s = setup("faults-envoy-restart");
    let creds = s.registry.credentials.clone().unwrap();
    let upstream = s.recorder.url();
    let (controller, envoy, token) = serve(&s, &[("registry", &upstream)], &[]);
    until_ok(envoy.port, "registry", &token, Duration::from_secs(10));

    // A large layer, pushed straight to the registry with the robot account.
    let file = s.work.path().join("big-layer.bin");
    let f = file.display();
    let digest = format!(
        "sha256:{}",
        sh(&format!(
            "head -c {BIG_MIB}M /dev/urandom > '{f}' && sha256sum '{f}' | cut -d' ' -f1"
        ))
    );
    let direct = s.registry.url();
    // The registry's TLS is verified: curl trusts the harness's upstream CA.
    let upstream_ca = connector_devkit::tls::upstream().unwrap().ca;
    let ca = format!("--cacert '{}'", upstream_ca.display());
    let up = format!("{}:{}", creds.username, creds.password);
    let location = sh(&format!(
        "curl -sS {ca} -u '{up}' -X POST -D - -o /dev/null '{direct}/v2/big/layer/blobs/uploads/' | tr -d '\\r' | sed -n 's/^[Ll]ocation: //p'"
    ));
    let sep = if location.contains('?') { '&' } else { '?' };
    let code = sh(&format!(
        "curl -sS {ca} -u '{up}' -X PUT -H 'Content-Type: application/octet-stream' -T '{f}' -o /dev/null -w '%{{http_code}}' '{location}{sep}digest={digest}'"
    ));
    assert_eq!(code, "201", "push of the {BIG_MIB} MiB layer straight to the registry");
    std::fs::remove_file(&file).ok();
    s.recorder.take();

    // The pull through Envoy: read 16 MiB, kill Envoy, read on.
    let blob = format!("/v2/namespaces/{NS}/connectors/registry/big/layer/blobs/{digest}");
    let mut conn = connector_devkit::http::open(envoy.port, Duration::from_secs(30)).unwrap();
    write!(
        conn,
        "GET {blob} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n",
        envoy.port
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w: &[u8]| w == b"\r\n\r\n") {
            break i;
        }
        let n = conn.read(&mut chunk).unwrap();
        assert!(n > 0, "Envoy closed before the response head");
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "blob GET: {head}");
    let content_length: u64 = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length: {head}"));
    assert_eq!(content_length, BIG_MIB << 20);
    let mut received = (raw.len() - head_end - 4) as u64;
    while received < 16 << 20 {
        let n = conn.read(&mut chunk).unwrap();
        assert!(n > 0, "Envoy closed early at {received} bytes");
        received += n as u64;
    }
    let at_kill = received;
    let killed = Instant::now();
    kill(envoy.pid().unwrap());
    let ending = loop {
        match conn.read(&mut chunk) {
            Ok(0) => break "EOF".to_string(),
            Ok(n) => received += n as u64,
            Err(e) => break format!("error: {e}"),
        }
    };
    eprintln!(
        "Envoy killed after {at_kill} bytes; the client got {received} of {content_length} bytes, then {ending} ({:?} after the kill)",
        killed.elapsed()
    );
    assert!(
        received < content_length,
        "the client must see a truncated transfer: {received} of {content_length}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "the client hung after the kill"
    );
    let envoy1_log = envoy.log();
    drop(envoy);

    // A new Envoy on the same controller: the retry succeeds, whole, same digest.
    let envoy2 = Envoy::start_xds_in(
        &s.work,
        "envoy-2",
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )
    .unwrap();
    let took = until_ok(envoy2.port, "registry", &token, Duration::from_secs(10));
    eprintln!("new Envoy served after {took:?}");
    let (base, ca) = (envoy2.base_url(), envoy2.curl_ca_arg());
    let pulled = sh(&format!(
        "curl -sS -f {ca} -H 'Authorization: Bearer {token}' '{base}{blob}' | sha256sum | cut -d' ' -f1"
    ));
    assert_eq!(format!("sha256:{pulled}"), digest, "the retried pull");
    let seen = s.recorder.take();
    assert!(!seen.text.contains(&token), "the client's token reached the upstream");
    let secrets = secrets(&s, &controller, &token);
    for (what, value) in &secrets {
        assert!(
            !envoy1_log.contains(value.as_str()),
            "{what} appears in the killed Envoy's log"
        );
    }
    hygiene(&envoy2, &controller, &secrets);
}

/// Fault 7: The filter's VM cannot start: the controller hands Envoy a module path whose file is not
/// WebAssembly. Envoy must fail closed, at once: an error status, no hang, nothing upstream.
#[test]
fn a_module_envoy_cannot_load_fails_closed_without_hanging() {
    let _turn = serial();
    let s = setup("faults-bad-module");
    let garbage = s.work.path().join("corrupt.wasm");
    let mut bytes = b"\0asm\x01\0\0\0".to_vec();
    bytes.extend(connector_devkit::random_bytes(4096).unwrap());
    std::fs::write(&garbage, &bytes).unwrap();
    let upstream = s.recorder.url();
    let garbage_arg = garbage.to_string_lossy().into_owned();
    // A second `--wasm` overrides the devkit's (the last value wins in the controller's parser).
    let args = ["--wasm", garbage_arg.as_str()];
    let creds = s.registry.credentials.clone().unwrap();
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &creds));
    put(
        &s.manifests,
        "registry.yaml",
        &connector_yaml("registry", &upstream, "robot"),
    );
    let controller = Controller::start_with_args(&s.work, &s.manifests, &s.identity, &args).unwrap();
    let token = s.minter.valid(NS, "default").unwrap();
    let (mut envoy, port, admin_port) = start_raw_envoy(&s.work, &controller);
    s.recorder.take();

    // The first answer the listener gives, however long it takes to come up.
    let started = Instant::now();
    let mut first = None;
    while started.elapsed() < Duration::from_secs(30) {
        envoy.check_alive().unwrap();
        let mut req = Request::get(&manifest_path("registry")).bearer(&token);
        req.timeout = Duration::from_secs(10);
        if let Ok(r) = req.send(port) {
            first = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let first = first.unwrap_or_else(|| {
        panic!(
            "the listener never answered; log:\n{}",
            procs::log_tail(envoy.log_path(), 40)
        )
    });
    eprintln!(
        "bad module, first answer after {:?}: {}",
        started.elapsed(),
        describe(&first)
    );
    let mut statuses = vec![];
    for _ in 0..5 {
        let (r, took) = get_manifest(port, "registry", &token);
        eprintln!("bad module: {} after {took:?}", describe(&r));
        assert!(took < Duration::from_secs(3), "a request hung for {took:?}");
        statuses.push(r.status);
    }
    // Fail closed: Envoy's own reply for a filter whose configuration it never accepted (access
    // log flag NFCF, "no filter config found"), mapped by the bootstrap's local_reply_config to a
    // 503 with an OCI error body (it was an empty 500: a finding of this suite).
    assert_eq!(first.status, 503, "fail closed: {}", first.summary());
    let (code, message) = oci_error(&first);
    assert_eq!(code, "UNAVAILABLE", "{message}");
    assert!(message.contains("no working filter"), "{message}");
    assert!(statuses.iter().all(|st| *st == 503), "{statuses:?}");
    let seen = s.recorder.take();
    assert!(
        seen.is_empty(),
        "nothing may reach the upstream: {:?}",
        seen.request_lines()
    );
    let nacks = controller
        .metric("connector_controller_xds_nacks_total{resource=\"filter\"}")
        .unwrap();
    eprintln!("controller NACKs of the filter configuration: {nacks:?}");
    assert_eq!(
        nacks,
        Some(1.0),
        "Envoy rejected the filter configuration once, and it was recorded"
    );
    // Envoy flushes its log every 100 ms.
    std::thread::sleep(Duration::from_millis(400));
    let log = std::fs::read_to_string(envoy.log_path()).unwrap_or_default();
    let dump = Request::get("/config_dump")
        .send(admin_port)
        .map(|r| r.body_text())
        .unwrap_or_default();
    assert!(!dump.is_empty(), "config dump");
    assert!(
        log.contains("Plugin configured to fail closed failed to load"),
        "Envoy's log should say the module failed to load, fail closed"
    );
    let refused = log
        .lines()
        .filter(|l| l.contains("[access]") && l.contains(" GET 503 NFCF "))
        .count();
    assert_eq!(
        refused, 6,
        "every request answered by Envoy's missing-config reply (NFCF), mapped to 503"
    );
    for (what, value) in &secrets(&s, &controller, &token) {
        assert!(!log.contains(value.as_str()), "{what} appears in Envoy's log");
        assert!(!dump.contains(value.as_str()), "{what} appears in Envoy's config dump");
    }
}

/// Envoy on the controller's xDS bootstrap, started without waiting for it to become ready
/// (it may never serve the filter): the process, its listener port and its admin port.
fn start_raw_envoy(work: &WorkDir, controller: &Controller) -> (Proc, u16, u16) {
    let port = procs::free_port().unwrap();
    let admin_port = procs::free_port().unwrap();
    let cfg = xds_bootstrap(port, admin_port, controller.ports.xds, controller.ports.channel);
    // The listener speaks TLS with the harness's certificate the controller serves.
    let cert = connector_devkit::controller::ProxyCert::of(work).expect("the controller's proxy certificate");
    connector_devkit::http::trust_port(port, &cert.ca);
    let dir = work.sub("envoy-raw").unwrap();
    let config_path = dir.join("envoy.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let mut cmd = Command::new(envoy_binary().unwrap());
    cmd.arg("-c")
        .arg(&config_path)
        .args(["--concurrency", "1", "-l", "info", "--disable-hot-restart"])
        .arg("--log-path")
        .arg(dir.join("envoy.log"))
        .args(["--file-flush-interval-msec", "100"]);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in controller.envoy_env() {
        cmd.env(k, v);
    }
    let mut proc = Proc::spawn("envoy", cmd, &dir.join("envoy.log")).unwrap();
    proc.wait_for_port(admin_port, Duration::from_secs(30)).unwrap();
    (proc, port, admin_port)
}
