//! The proxy listener speaks TLS (issue 13): Envoy terminates TLS with the certificate the
//! controller serves over SDS, from files (file mode) or a `kubernetes.io/tls` Secret (API
//! mode, a real kube-apiserver); ALPN h2 and http/1.1; clients verify it against the CA they
//! are given (skopeo without `--tls-verify=false`, curl `--cacert`), in the path form and in the
//! host form (a wildcard SAN); a rotation under load swaps the certificate with no failed
//! request; the private key shows in no config dump, log or metric. Plain HTTP is the one
//! explicit legacy opt-in shown here.
//!
//! Needs `cargo build -p connector-controller` and the release filter module (`make test` does both).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use connector_devkit::controller::{Controller, ProxyCert};
use connector_devkit::envoy::{Envoy, ListenerMode};
use connector_devkit::stack::host_name;
use connector_e2e::xds::{NS, connector_yaml, pull, put, secret_yaml, setup};

const MANIFEST: &str = "/v2/namespaces/demo/connectors/registry/library/app/manifests/v1";
const ACCEPT: &str =
    "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
/// How long a rotated certificate may take to be served.
const ROTATION_DEADLINE: Duration = Duration::from_secs(15);

/// `curl -s` with `args`: (exit success, stdout, stderr).
fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The subject of the certificate the proxy serves, verified against `ca` (empty when the
/// handshake fails).
fn served_subject(envoy: &Envoy, ca: &str) -> String {
    let url = format!("{}/v2/", envoy.base_url());
    let (_, out, _) = curl(&["--cacert", ca, "-o", "/dev/null", "-w", "%{certs}", &url]);
    out.lines()
        .find_map(|l| l.strip_prefix("Subject:"))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The base64 body lines of a PEM key: any of them in a dump or log is a leak.
fn key_lines(key: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(key)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 20)
        .map(str::to_string)
        .collect()
}

fn assert_no_key(what: &str, text: &str, key: &std::path::Path) {
    for l in key_lines(key) {
        assert!(!text.contains(&l), "the proxy's private key appears in {what}");
    }
}

#[test]
fn file_mode_tls_listener_verified_by_clients_and_rotated_under_load() {
    let s = setup("proxy-tls-files");
    let creds = s.registry.credentials.clone().unwrap();
    put(
        &s.manifests,
        "registry.yaml",
        &connector_yaml("registry", &s.recorder.url(), "robot"),
    );
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &creds));
    // The harness's controller serves a certificate it made (CA + server certificate naming
    // 127.0.0.1 and *.demo.svc.cluster.local) unless told otherwise.
    let controller = Controller::start_with_args(&s.work, &s.manifests, &s.identity, &[]).unwrap();
    let cert = controller.proxy_cert.clone().expect("a TLS controller by default");
    let envoy = Envoy::start_xds_mode(
        &s.work,
        "envoy",
        None,
        ListenerMode::Tls,
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )
    .unwrap();
    let ca = cert.ca.display().to_string();
    let token = s.minter.valid(NS, "default").unwrap();
    let auth = format!("sa:{token}");
    let url = format!("{}{MANIFEST}", envoy.base_url());

    // ALPN: h2 and http/1.1, both verified against the CA.
    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (ok, out, err) = curl(&[
            flag,
            "--cacert",
            &ca,
            "-u",
            &auth,
            "-H",
            ACCEPT,
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            &url,
        ]);
        assert!(ok, "curl {flag}: {err}");
        assert_eq!(out, format!("{want} 200"), "curl {flag}");
    }
    // Without the CA the certificate is not trusted, and plain HTTP gets no answer.
    let (ok, _, err) = curl(&["-u", &auth, "-o", "/dev/null", &url]);
    assert!(
        !ok && err.contains("certificate"),
        "an untrusted proxy certificate: {err}"
    );
    let (ok, _, _) = curl(&["-o", "/dev/null", &url.replacen("https://", "http://", 1)]);
    assert!(!ok, "plain HTTP on the TLS listener was answered");

    // skopeo verifies TLS: no --tls-verify=false for the proxy.
    s.skopeo.trust(&envoy.authority(), &cert.ca).unwrap();
    pull(&s, &envoy.authority(), "registry", &token, "pulled-path");

    // Host form: the wildcard SAN covers c-<name>-connector.demo.svc.cluster.local; a name in
    // a namespace the certificate does not name is refused by the client.
    connector_devkit::stack::check_host_form_resolves(NS, "registry").unwrap_or_else(|e| panic!("{e}"));
    let host = format!("{}:{}", host_name(NS, "registry"), envoy.port);
    let host_url = format!("https://{host}/v2/library/app/manifests/v1");
    let (ok, out, err) = curl(&[
        "--cacert",
        &ca,
        "-u",
        &auth,
        "-H",
        ACCEPT,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &host_url,
    ]);
    assert!(ok && out == "200", "host form over verified TLS: {out} {err}");
    let stranger = host_name("elsewhere", "registry");
    let (ok, _, err) = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        &format!("{stranger}:{}:127.0.0.1", envoy.port),
        "-o",
        "/dev/null",
        &format!("https://{stranger}:{}/v2/", envoy.port),
    ]);
    assert!(!ok && err.contains("subject"), "a name outside the certificate: {err}");
    s.skopeo.trust(&host, &cert.ca).unwrap();
    let dest = s.work.sub("pulled-host").unwrap();
    s.skopeo
        .copy(
            &format!("docker://{host}/library/app:v1"),
            connector_devkit::skopeo::Creds::Basic("sa", &token),
            &format!("oci:{}:v1", dest.display()),
            connector_devkit::skopeo::Creds::None,
        )
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("host-form skopeo copy over TLS: {e}"));
    assert_eq!(
        connector_devkit::image::oci_layers(&dest, "v1").unwrap(),
        s.sample.layers
    );

    // The private key: never in Envoy's config dump (SDS keys are redacted), its log, the
    // controller's log or metrics.
    let dump = envoy.config_dump().unwrap();
    assert!(dump.contains("\"proxy-tls\""), "the SDS secret is in the dump");
    assert!(dump.contains("[redacted]"), "Envoy redacts the SDS private key");
    assert_no_key("Envoy's /config_dump", &dump, &cert.key);
    assert_no_key("Envoy's log", &envoy.log(), &cert.key);
    assert_no_key("the controller's log", &controller.log(), &cert.key);
    assert_no_key("the controller's metrics", &controller.metrics().unwrap(), &cert.key);

    // Rotation under load: curl GETs on fresh connections (h2 and http/1.1 alternating) and
    // skopeo pulls, none may fail; each of 3 rotations must be served within the deadline.
    let before = served_subject(&envoy, &ca);
    assert_eq!(before, "CN = oci-connector proxy");
    let stop = Arc::new(AtomicBool::new(false));
    let (requests, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(vec![])));
    let loader = {
        let (stop, requests, failures) = (stop.clone(), requests.clone(), failures.clone());
        let (ca, auth, url) = (ca.clone(), auth.clone(), url.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let flag = if i % 2 == 0 { "--http2" } else { "--http1.1" };
                i += 1;
                let (ok, out, err) = curl(&[
                    flag,
                    "--cacert",
                    &ca,
                    "-u",
                    &auth,
                    "-H",
                    ACCEPT,
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &url,
                ]);
                requests.fetch_add(1, Ordering::Relaxed);
                if !ok || out != "200" {
                    failures.lock().unwrap().push(format!("GET {flag}: {out} {err}"));
                }
            }
        })
    };
    // One HTTP/2 connection opened on the old certificate and kept through the rotations: 20
    // requests, 5 a second, all on it.
    let held = {
        let (ca, auth, url) = (ca.clone(), auth.clone(), url.clone());
        std::thread::spawn(move || {
            let mut args: Vec<String> = ["--http2", "--rate", "5/s", "--cacert", &ca, "-u", &auth, "-H", ACCEPT]
                .iter()
                .map(|a| a.to_string())
                .collect();
            for _ in 0..20 {
                args.extend(["-o", "/dev/null", "-w", "%{num_connects} %{http_code}\n", &url].map(String::from));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&args)
        })
    };
    let started = Instant::now();
    let mut pulls = 0;
    let mut took = vec![];
    for n in 1..=3u32 {
        let t0 = Instant::now();
        cert.rotate(n).unwrap();
        let want = format!("CN = oci-connector proxy {n}");
        loop {
            if served_subject(&envoy, &ca) == want {
                took.push(t0.elapsed());
                break;
            }
            assert!(
                t0.elapsed() < ROTATION_DEADLINE,
                "rotation {n} not served after {ROTATION_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // A full pull between rotations, on the new certificate.
        pull(
            &s,
            &envoy.authority(),
            "registry",
            &token,
            &format!("pulled-rotation-{n}"),
        );
        pulls += 1;
    }
    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
    let (ok, out, err) = held.join().unwrap();
    assert!(ok, "the held connection: {err}");
    let answers: Vec<&str> = out.lines().collect();
    assert_eq!(answers.len(), 20, "{out}");
    assert_eq!(answers[0], "1 200");
    assert!(
        answers[1..].iter().all(|a| *a == "0 200"),
        "one connection, every request 200, through the rotations:\n{out}"
    );
    let failures = failures.lock().unwrap().clone();
    let requests = requests.load(Ordering::Relaxed);
    eprintln!(
        "3 rotations in {:?}: new certificate served after {took:?}; {requests} GETs on fresh TLS connections, 20 on one held HTTP/2 connection and {pulls} skopeo pulls, {} failed",
        started.elapsed(),
        failures.len()
    );
    assert!(requests > 10, "the load ran ({requests} requests)");
    assert!(
        failures.is_empty(),
        "requests failed during rotation:\n{}",
        failures.join("\n")
    );

    // A certificate whose key does not match is refused; the last good one stays served.
    // (A poll between the two renames of a rotation may already have seen a pair that does
    // not match: count from here.)
    let refused = || {
        controller
            .metric("connector_controller_proxy_cert_loads_total{result=\"refused\"}")
            .unwrap()
            .unwrap_or(0.0)
    };
    let refused_before = refused();
    let other = ProxyCert::generate(&s.work.sub("other-ca").unwrap(), "subjectAltName=IP:127.0.0.1").unwrap();
    std::fs::copy(&other.key, &cert.key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused() <= refused_before {
        assert!(Instant::now() < deadline, "the mismatched key was not refused");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(served_subject(&envoy, &ca), "CN = oci-connector proxy 3");
    assert!(controller.log().contains("does not belong to the certificate"));
    assert_no_key("the controller's log", &controller.log(), &other.key);
}

use std::sync::Mutex;

#[test]
fn the_controller_needs_a_choice_and_plain_http_is_the_explicit_legacy_opt_in() {
    // Without a certificate source and without the opt-in, `serve` refuses to start.
    let bin = connector_devkit::controller::controller_binary().unwrap();
    let out = Command::new(&bin)
        .args([
            "serve",
            "--manifests",
            "/nonexistent",
            "--identity",
            "/nonexistent",
            "--wasm",
            "/x.wasm",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--proxy-plain-http (legacy"), "{err}");

    // The one plain-HTTP stack: the controller serves no certificate, Envoy's listener is plain.
    let s = setup("proxy-plain-http");
    let creds = s.registry.credentials.clone().unwrap();
    put(
        &s.manifests,
        "registry.yaml",
        &connector_yaml("registry", &s.recorder.url(), "robot"),
    );
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &creds));
    let controller = Controller::start_with_args(&s.work, &s.manifests, &s.identity, &["--proxy-plain-http"]).unwrap();
    assert!(controller.proxy_cert.is_none());
    let envoy = Envoy::start_xds_mode(
        &s.work,
        "envoy",
        None,
        ListenerMode::Plain,
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )
    .unwrap();
    assert!(envoy.base_url().starts_with("http://"));
    let token = s.minter.valid(NS, "default").unwrap();
    // skopeo needs --tls-verify=false for it: the cost of the legacy setup, and the only
    // place a test turns verification off on the proxy side.
    s.skopeo.plain_http(&envoy.authority()).unwrap();
    pull(&s, &envoy.authority(), "registry", &token, "pulled");
}

/// A `kubernetes.io/tls` Secret in cert-manager's shape (`tls.crt`, `tls.key`, `ca.crt`).
fn tls_secret(ns: &str, name: &str, cert: &ProxyCert) -> serde_json::Value {
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": { "name": name, "namespace": ns },
        "stringData": { "tls.crt": read(&cert.cert), "tls.key": read(&cert.key), "ca.crt": read(&cert.ca) },
    })
}

#[test]
fn api_mode_serves_the_kubernetes_io_tls_secret_and_follows_its_updates() {
    use connector_devkit::kube::KubeCluster;
    connector_devkit::require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let work = connector_devkit::WorkDir::new("proxy-tls-kube").unwrap();
    let kube = KubeCluster::start("proxy-tls-kube-api").unwrap_or_else(|e| panic!("{e}"));
    kube.install_crd().unwrap();
    let system = "oci-connector-system";
    kube.namespace(system, &[]).unwrap();
    let cert = ProxyCert::generate(
        &work.sub("proxy-tls").unwrap(),
        connector_devkit::controller::PROXY_CERT_SANS,
    )
    .unwrap();
    kube.apply(&tls_secret(system, "connector-proxy-tls", &cert)).unwrap();
    let kubeconfig = kube.controller_kubeconfig().unwrap();
    let secret_flag = format!("{system}/connector-proxy-tls");
    let controller = Controller::start_kube(
        &work,
        &kubeconfig,
        "https://127.0.0.1:8443",
        &["--proxy-tls-secret", &secret_flag],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let envoy = Envoy::start_xds_mode(
        &work,
        "envoy",
        None,
        ListenerMode::Tls,
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )
    .unwrap();
    let ca = cert.ca.display().to_string();
    assert_eq!(served_subject(&envoy, &ca), "CN = oci-connector proxy");

    // cert-manager renews: the Secret is updated in place; the new certificate is served.
    let mut took = vec![];
    for n in 1..=2u32 {
        cert.rotate(n).unwrap();
        let t0 = Instant::now();
        kube.apply(&tls_secret(system, "connector-proxy-tls", &cert)).unwrap();
        let want = format!("CN = oci-connector proxy {n}");
        while served_subject(&envoy, &ca) != want {
            assert!(t0.elapsed() < ROTATION_DEADLINE, "Secret update {n} not served");
            std::thread::sleep(Duration::from_millis(50));
        }
        took.push(t0.elapsed());
    }
    eprintln!("Secret updated with kubectl apply: new certificate served after {took:?}");

    // A Secret that is not kubernetes.io/tls is refused by name; the served one stays.
    kube.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": { "name": "not-tls", "namespace": system },
        "stringData": { "tls.crt": "x", "tls.key": "y" },
    }))
    .unwrap();
    assert_eq!(served_subject(&envoy, &ca), "CN = oci-connector proxy 2");
    assert_no_key("Envoy's /config_dump", &envoy.config_dump().unwrap(), &cert.key);
    assert_no_key("the controller's log", &controller.log(), &cert.key);
    assert_no_key("the controller's metrics", &controller.metrics().unwrap(), &cert.key);
    assert!(
        !controller.log().contains("not-tls"),
        "only the named Secret is watched"
    );
}

/// `/readyz` says not ready while the certificate it was told to serve is missing (Envoy could
/// not complete a handshake), names why, and turns ready once valid files appear.
#[test]
fn the_controller_is_not_ready_until_the_proxy_certificate_is_loaded() {
    use connector_devkit::controller::Ports;
    let s = setup("proxy-tls-ready");
    let creds = s.registry.credentials.clone().unwrap();
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &creds));
    let dir = s.work.sub("late-cert").unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let args = [
        "--proxy-tls-cert",
        cert.to_str().unwrap(),
        "--proxy-tls-key",
        key.to_str().unwrap(),
    ];
    let key_secret = connector_devkit::random_secret().unwrap();
    let controller = Controller::start_on(
        &s.work,
        "controller",
        &s.manifests,
        &s.identity,
        Ports::free().unwrap(),
        &key_secret,
        &args,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let r = connector_devkit::http::Request::get("/readyz")
        .send(controller.ports.ops)
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.summary());
    assert!(
        r.body_text().contains("no valid proxy TLS certificate"),
        "{}",
        r.summary()
    );
    assert!(controller.log().contains("cannot read"), "the log says why");
    let made = ProxyCert::generate(&s.work.sub("late-ca").unwrap(), "subjectAltName=IP:127.0.0.1").unwrap();
    std::fs::copy(&made.key, &key).unwrap();
    std::fs::copy(&made.cert, &cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while controller.readyz().unwrap() != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready 10 s after the certificate appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The upstream side's legacy opt-in: a connector whose address is `http://...` reaches a
/// plain-HTTP registry through the TLS proxy, and Envoy's cluster for it has no TLS, exactly as
/// the address asked. It is the one plain-HTTP registry of the tests (seeding it is the one
/// `--dest-tls-verify=false` on the upstream side); every other upstream is verified TLS, like
/// the connector beside it here, whose cluster verifies the upstream CA.
#[test]
fn an_http_upstream_is_the_explicit_legacy_opt_in() {
    use connector_devkit::registry::Registry;
    use connector_devkit::skopeo::Creds;
    let s = setup("upstream-plain-http");
    let tls_creds = s.registry.credentials.clone().unwrap();
    let plain_work = connector_devkit::WorkDir::new("upstream-plain-http-registry").unwrap();
    let plain = Registry::start_plain_http_with_auth(&plain_work, "plain-robot").unwrap();
    let creds = plain.credentials.clone().unwrap();
    assert!(plain.url().starts_with("http://"), "{}", plain.url());
    s.skopeo.plain_http(&plain.authority()).unwrap();
    connector_devkit::image::push(
        &s.skopeo,
        &s.sample,
        &plain.authority(),
        "library/app",
        Creds::Basic(&creds.username, &creds.password),
    )
    .unwrap();
    put(
        &s.manifests,
        "plain.yaml",
        &connector_yaml("plain", &plain.url(), "plain-robot"),
    );
    put(&s.manifests, "plain-secret.yaml", &secret_yaml("plain-robot", &creds));
    put(
        &s.manifests,
        "registry.yaml",
        &connector_yaml("registry", &s.recorder.url(), "robot"),
    );
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &tls_creds));
    let controller = Controller::start(&s.work, &s.manifests, &s.identity).unwrap();
    let envoy = connector_e2e::xds::envoy_fed_by(&s, &controller);
    let token = s.minter.valid(NS, "default").unwrap();
    // Clients still verify the proxy: only the proxy's hop to this one upstream is plain.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = s.skopeo.inspect(
            &format!(
                "docker://{}/namespaces/{NS}/connectors/plain/library/app:v1",
                envoy.authority()
            ),
            connector_devkit::skopeo::Creds::Basic("sa", &token),
            true,
        );
        if out.as_ref().is_ok_and(|o| o.success) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    pull(&s, &envoy.authority(), "plain", &token, "pulled-plain");

    // The clusters Envoy got: TLS for the https connector, none for the http one.
    let dump: serde_json::Value = serde_json::from_str(&envoy.config_dump().unwrap()).unwrap();
    let clusters: Vec<&serde_json::Value> = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["dynamic_active_clusters"].as_array())
        .flatten()
        .map(|c| &c["cluster"])
        .collect();
    let by_prefix = |prefix: &str| {
        clusters
            .iter()
            .find(|c| c["name"].as_str().unwrap_or_default().starts_with(prefix))
            .unwrap_or_else(|| panic!("no cluster {prefix}* in {clusters:?}"))
    };
    let http = by_prefix(&format!("upstream_http_127_0_0_1_{}_", plain.port));
    assert!(
        http.get("transport_socket").is_none(),
        "an http upstream gets no TLS: {http}"
    );
    let https = by_prefix(&format!("upstream_https_127_0_0_1_{}_", s.recorder.port));
    assert!(
        https["transport_socket"].to_string().contains("UpstreamTlsContext"),
        "an https upstream is verified TLS: {https}"
    );
}
