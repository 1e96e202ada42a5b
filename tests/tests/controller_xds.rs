//! The sidecar controller serving xDS to a real Envoy, in file mode: Connector and Secret
//! manifests in a directory, the real `connector-controller` binary, real Envoy fed over ADS
//! (CDS for the upstream clusters, ECDS for the filter configuration), a real htpasswd
//! registry, real skopeo. The filter gets the upstream credential over the controller's
//! loopback channel; no secret travels in xDS.
//!
//! Needs `cargo build -p connector-controller` and the release filter module (`make test` does both).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::http::{Request, basic_value};
use connector_devkit::random_secret;
use connector_devkit::registry::Credentials;
use connector_devkit::stack::envoy_problems;
use connector_devkit::tokens::KeyChoice;
use connector_e2e::xds::{NS, Setup, connector_yaml, envoy_fed_by, pull, put, secret_yaml, setup, start_stack};

const REPO: &str = "library/app";
const TAG: &str = "v1";
const MANIFEST_TYPES: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
/// "Within seconds": how long a manifest change may take to reach Envoy.
const FOLLOW_DEADLINE: Duration = Duration::from_secs(10);

/// Writes `registry.yaml` (Connector `registry` at `address`) and `secret.yaml` (`creds`), starts
/// the controller (with `args`) and Envoy fed by it, and mints a token of `demo/default`.
fn serve(s: &Setup, address: &str, creds: &Credentials, args: &[&str]) -> (Controller, Envoy, String) {
    put(
        &s.manifests,
        "registry.yaml",
        &connector_yaml("registry", address, "robot"),
    );
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", creds));
    let (controller, envoy) = start_stack(s, args);
    (controller, envoy, s.minter.valid(NS, "default").unwrap())
}

fn manifest_status(envoy: &Envoy, connector: &str, token: &str) -> u16 {
    Request::get(&format!(
        "/v2/namespaces/{NS}/connectors/{connector}/{REPO}/manifests/{TAG}"
    ))
    .header("Accept", MANIFEST_TYPES)
    .bearer(token)
    .send(envoy.port)
    .map(|r| r.status)
    .unwrap_or(0)
}

/// Polls until `GET manifest` through `connector` answers `want`; returns how long it took.
fn until_status(envoy: &Envoy, connector: &str, token: &str, want: u16) -> Duration {
    let start = Instant::now();
    loop {
        let got = manifest_status(envoy, connector, token);
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < FOLLOW_DEADLINE,
            "connector {connector}: still {got} after {FOLLOW_DEADLINE:?}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The end of a test that left a bad Connector out: `registry` is still served, and nothing
/// holds the upstream password.
fn others_served_and_clean(envoy: &Envoy, controller: &Controller, token: &str, creds: &Credentials) {
    assert_eq!(
        manifest_status(envoy, "registry", token),
        200,
        "the others still served"
    );
    hygiene(
        envoy,
        &controller.log(),
        &[("upstream password".into(), creds.password.clone())],
    );
}

fn hygiene(envoy: &Envoy, controller_log: &str, secrets: &[(String, String)]) {
    let problems = envoy_problems(envoy, secrets).unwrap();
    assert!(problems.is_empty(), "Envoy hygiene:\n{}", problems.join("\n"));
    for (what, value) in secrets {
        assert!(
            !controller_log.contains(value.as_str()),
            "{what} appears in the controller's log"
        );
    }
}

#[test]
fn envoy_follows_the_manifests_and_keeps_serving_when_the_controller_dies() {
    let s = setup("controller-xds");
    let creds = s.registry.credentials.clone().unwrap();
    let (controller, envoy, token) = serve(&s, &s.registry.url(), &creds, &[]);

    // Applied before Envoy started: served as soon as Envoy has its configuration.
    until_status(&envoy, "registry", &token, 200);
    pull(&s, &envoy.authority(), "registry", &token, "pulled-1");

    // A new Connector file: served within seconds, no restart.
    assert_eq!(manifest_status(&envoy, "second", &token), 403, "not applied yet");
    put(
        &s.manifests,
        "second.yaml",
        &connector_yaml("second", &s.registry.url(), "robot"),
    );
    let took = until_status(&envoy, "second", &token, 200);
    eprintln!("new connector served after {took:?}");

    // A Connector whose Secret is missing is left out, the others go on.
    put(
        &s.manifests,
        "broken.yaml",
        &connector_yaml("broken", &s.registry.url(), "missing"),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(manifest_status(&envoy, "broken", &token), 403);
    assert_eq!(manifest_status(&envoy, "registry", &token), 200);

    // A manifest that does not parse refuses the set as a whole; the last good one stays.
    put(
        &s.manifests,
        "garbage.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: [not, a, map]\n",
    );
    std::fs::remove_file(s.manifests.join("second.yaml")).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        manifest_status(&envoy, "second", &token),
        200,
        "refused set must not change Envoy"
    );
    std::fs::remove_file(s.manifests.join("garbage.yaml")).unwrap();

    // The deleted Connector stops working for new requests within seconds.
    let took = until_status(&envoy, "second", &token, 403);
    eprintln!("deleted connector refused after {took:?}");
    assert_eq!(manifest_status(&envoy, "registry", &token), 200);

    let metrics = controller.metrics().unwrap();
    let sample = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    // Initial, second added, second deleted: the broken connector changed nothing Envoy gets.
    assert_eq!(
        sample("connector_controller_xds_pushes_total{resource=\"filter\"}"),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        sample("connector_controller_xds_nacks_total{resource=\"filter\"}"),
        0.0,
        "{metrics}"
    );
    assert!(
        sample("connector_controller_credential_fetches_total{result=\"ok\"}") >= 1.0,
        "{metrics}"
    );
    assert_eq!(sample("connector_controller_connectors_configured"), 1.0, "{metrics}");
    assert!(sample("connector_controller_filter_config_bytes") > 100.0, "{metrics}");
    assert!(
        sample("connector_controller_reconcile_errors_total{reason=\"ManifestsInvalid\"}") >= 1.0,
        "{metrics}"
    );

    // The controller dies: Envoy keeps its configuration and the filter its credential.
    let key = controller.key().to_string();
    let log = controller.log();
    controller.kill();
    for _ in 0..10 {
        assert_eq!(
            manifest_status(&envoy, "registry", &token),
            200,
            "pull after the controller died"
        );
    }
    pull(&s, &envoy.authority(), "registry", &token, "pulled-2");

    hygiene(
        &envoy,
        &log,
        &[
            ("upstream password".into(), creds.password.clone()),
            (
                "upstream Basic value".into(),
                basic_value(&creds.username, &creds.password),
            ),
            ("channel key".into(), key),
            ("client token".into(), token),
        ],
    );
    drop(s.recorder);
}

#[test]
fn rotation_and_connector_changes_under_load_fail_no_request() {
    let mut s = setup("controller-rotation");
    let old = s.registry.credentials.clone().unwrap();
    let new = Credentials {
        username: "robot2".into(),
        password: random_secret().unwrap(),
    };
    // The registry accepts both robot accounts, as during a real rotation window.
    s.registry.add_user(&new).unwrap();
    let upstream = s.recorder.url();
    let (controller, envoy, token) = serve(&s, &upstream, &old, &[]);
    until_status(&envoy, "registry", &token, 200);

    // Continuous load: manifest and blob GETs from 4 clients, every answer counted.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let blob = s.sample.layers[0].clone();
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let (stop, ok, failures, token, blob, port) = (
                stop.clone(),
                ok.clone(),
                failures.clone(),
                token.clone(),
                blob.clone(),
                envoy.port,
            );
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let path = if (n + i).is_multiple_of(2) {
                        format!("/v2/namespaces/{NS}/connectors/registry/{REPO}/manifests/{TAG}")
                    } else {
                        format!("/v2/namespaces/{NS}/connectors/registry/{REPO}/blobs/{blob}")
                    };
                    match Request::get(&path)
                        .header("Accept", MANIFEST_TYPES)
                        .bearer(&token)
                        .send(port)
                    {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{path}: {} {}", r.status, r.body_text())),
                        Err(e) => failures.lock().unwrap().push(format!("{path}: {e}")),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let old_value = format!("Basic {}", basic_value(&old.username, &old.password));
    let new_value = format!("Basic {}", basic_value(&new.username, &new.password));
    assert!(
        s.recorder.take().authorizations().contains(&old_value.as_str()),
        "the old credential was in use"
    );

    // Rotate the Secret under load: the new credential reaches the upstream within seconds.
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &new));
    let start = Instant::now();
    loop {
        let seen = s.recorder.take();
        if seen.authorizations().contains(&new_value.as_str()) {
            break;
        }
        assert!(
            start.elapsed() < FOLLOW_DEADLINE,
            "the rotated credential did not reach the upstream"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("rotated credential in use after {:?}", start.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    s.recorder.take();

    // Connectors added and removed under the same load.
    put(
        &s.manifests,
        "second.yaml",
        &connector_yaml("second", &upstream, "robot"),
    );
    until_status(&envoy, "second", &token, 200);
    std::fs::remove_file(s.manifests.join("second.yaml")).unwrap();
    until_status(&envoy, "second", &token, 403);
    std::thread::sleep(Duration::from_secs(1));

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    let served = ok.load(Ordering::Relaxed);
    eprintln!("under load: {served} requests served, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(served > 100, "the load ran ({served} requests)");
    // After the switch only the new credential went upstream.
    let after = s.recorder.take();
    assert!(!after.authorizations().is_empty());
    assert!(
        after.authorizations().iter().all(|a| *a == new_value),
        "old credential still used after rotation"
    );

    hygiene(
        &envoy,
        &controller.log(),
        &[
            ("old password".into(), old.password.clone()),
            ("new password".into(), new.password.clone()),
            ("channel key".into(), controller.key().to_string()),
            ("client token".into(), token),
        ],
    );
}

#[test]
fn an_https_registry_is_reached_with_tls_sni_and_the_configured_ca() {
    let mut s = setup("controller-tls");
    let creds = s.registry.credentials.clone().unwrap();
    // The sample is already pushed (over the harness's verified TLS); now the registry serves a
    // certificate for `localhost` from a CA of this test (not in the system bundle).
    let ca = connector_devkit::tls::TestCa::new(&s.work.sub("ca").unwrap()).unwrap();
    s.registry.serve_tls(&ca.issue("localhost").unwrap()).unwrap();
    let address = format!("https://localhost:{}", s.registry.port);
    let ca_path = ca.cert.display().to_string();
    let (controller, envoy, token) = serve(&s, &address, &creds, &["--upstream-ca", &ca_path]);
    until_status(&envoy, "registry", &token, 200);
    pull(&s, &envoy.authority(), "registry", &token, "pulled-tls");

    // The cluster Envoy got over CDS: TLS, SNI = the registry's host, validated against the CA.
    let dump = envoy.config_dump().unwrap();
    let cluster = format!("upstream_https_localhost_{}", s.registry.port);
    assert!(dump.contains(&cluster), "cluster {cluster} in the config dump");
    assert!(dump.contains("\"sni\": \"localhost\""), "SNI in the config dump");
    assert!(dump.contains(&ca_path), "the configured CA validates the upstream");
    hygiene(
        &envoy,
        &controller.log(),
        &[("upstream password".into(), creds.password.clone())],
    );
}

#[test]
fn an_upstream_certificate_from_an_unknown_ca_is_refused() {
    let mut s = setup("controller-tls-untrusted");
    let creds = s.registry.credentials.clone().unwrap();
    let ca = connector_devkit::tls::TestCa::new(&s.work.sub("ca").unwrap()).unwrap();
    s.registry.serve_tls(&ca.issue("localhost").unwrap()).unwrap();
    // Default CA bundle: the test CA is not in it, so Envoy must not talk to the registry.
    let (controller, envoy, token) = serve(&s, &format!("https://localhost:{}", s.registry.port), &creds, &[]);
    let r = Request::get(&format!(
        "/v2/namespaces/{NS}/connectors/registry/{REPO}/manifests/{TAG}"
    ))
    .header("Accept", MANIFEST_TYPES)
    .bearer(&token)
    .send(envoy.port)
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert!(r.body_text().contains("UNAVAILABLE"), "an OCI error: {}", r.body_text());
    hygiene(
        &envoy,
        &controller.log(),
        &[("upstream password".into(), creds.password.clone())],
    );
}

/// Issue 13: a certificate from the trusted CA is not enough, it must name the registry's host.
/// The registry presents, in turn, a certificate for another host (refused before the first
/// request reaches it), the right one (served), and the other again once the filter knows the
/// registry (the forwarded request is refused by Envoy, naming the TLS failure).
#[test]
fn an_upstream_certificate_for_another_host_is_refused_even_from_the_trusted_ca() {
    use connector_devkit::tls::{ServerCert, TestCa};
    let mut s = setup("controller-tls-name");
    let creds = s.registry.credentials.clone().unwrap();
    let ca = TestCa::new(&s.work.sub("ca").unwrap()).unwrap();
    let right = ca.issue("localhost").unwrap();
    let other = ca.issue("registry.other.test").unwrap();
    // The files the registry serves; the test copies one certificate or the other into them.
    let dir = s.work.sub("served-cert").unwrap();
    let served = ServerCert {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    let present = |c: &ServerCert| {
        std::fs::copy(&c.cert, &served.cert).unwrap();
        std::fs::copy(&c.key, &served.key).unwrap();
    };
    present(&other);
    s.registry.serve_tls(&served).unwrap();
    let address = format!("https://localhost:{}", s.registry.port);
    let ca_path = ca.cert.display().to_string();
    let (controller, envoy, token) = serve(&s, &address, &creds, &["--upstream-ca", &ca_path]);
    let manifest = || {
        Request::get(&format!(
            "/v2/namespaces/{NS}/connectors/registry/{REPO}/manifests/{TAG}"
        ))
        .header("Accept", MANIFEST_TYPES)
        .bearer(&token)
        .send(envoy.port)
        .unwrap()
    };
    let oci_error = |r: &connector_devkit::http::Response| {
        let body: serde_json::Value =
            serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not OCI error JSON ({e}): {}", r.body_text()));
        (
            body["errors"][0]["code"].as_str().unwrap_or_default().to_string(),
            body["errors"][0]["message"].as_str().unwrap_or_default().to_string(),
        )
    };
    let san_failures = || {
        let stats = Request::get("/stats").send(envoy.admin_port).unwrap().body_text();
        stats
            .lines()
            .filter(|l| l.starts_with("cluster.upstream_https_localhost") && l.contains(".ssl.fail_verify_san: "))
            .filter_map(|l| l.rsplit(": ").next()?.parse::<u64>().ok())
            .sum::<u64>()
    };

    // 1. The impostor from the start: the filter's first look at /v2/ never gets past the handshake.
    let mut r = manifest();
    let deadline = Instant::now() + FOLLOW_DEADLINE;
    while r.status == 403 && Instant::now() < deadline {
        // The configuration is still on its way.
        std::thread::sleep(Duration::from_millis(100));
        r = manifest();
    }
    assert_eq!(r.status, 503, "{}", r.body_text());
    let (code, message) = oci_error(&r);
    assert_eq!(code, "UNAVAILABLE", "{message}");
    eprintln!("the impostor, first request: {message}");
    assert!(message.contains("demo/registry"), "{message}");
    // The filter's own 503 carries what Envoy said about its /v2/ probe. Envoy's HTTP-call
    // client reports only "remote connection failure" there, not the TLS reason (measured with
    // Envoy 1.40); requests the router forwards (below) get the TLS reason itself.
    assert!(
        message.contains("(Envoy: upstream connect error") && message.contains("connection failure"),
        "the first request's 503 should carry Envoy's reason: {message}"
    );
    assert!(
        san_failures() >= 1,
        "Envoy refused the certificate's name (ssl.fail_verify_san)"
    );

    // 2. The right certificate: served, same Envoy, same configuration.
    present(&right);
    s.registry.restart().unwrap();
    until_status(&envoy, "registry", &token, 200);
    let refused_before = san_failures();

    // 3. The impostor again: the request is forwarded and Envoy's router refuses the upstream,
    // saying why in an OCI error.
    present(&other);
    s.registry.restart().unwrap();
    let log_seen = std::fs::read_to_string(s.registry.log_path()).unwrap_or_default().len();
    let r = manifest();
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert_eq!(r.header("content-type"), Some("application/json"), "{}", r.body_text());
    let (code, message) = oci_error(&r);
    assert_eq!(code, "UNAVAILABLE", "{message}");
    assert!(message.contains("could not reach the upstream registry"), "{message}");
    eprintln!("the impostor, after the filter knew the registry: {message}");
    assert!(
        message.contains("CERTIFICATE_VERIFY_FAILED"),
        "the TLS failure is named: {message}"
    );
    assert!(san_failures() > refused_before, "refused for the name");
    // Nothing reached the impostor: no request line after the handshake failures.
    let log = std::fs::read_to_string(s.registry.log_path()).unwrap_or_default();
    let after = log.get(log_seen..).unwrap_or_default();
    assert!(!after.contains("/v2/"), "a request reached the impostor: {after}");

    hygiene(
        &envoy,
        &controller.log(),
        &[
            ("upstream password".into(), creds.password.clone()),
            ("client token".into(), token.clone()),
        ],
    );
}

/// Issue 12 item 7 through the real binary: a Connector aimed at the controller's own
/// credential channel, or at the link-local metadata address, is left out with its reason (even
/// with the tests' `--allow-local-upstreams`, for the channel), while a good Connector added at
/// the same time is served; the channel never hands out the thief's credential.
#[test]
fn connectors_aimed_at_the_pods_own_ports_or_metadata_are_left_out_and_the_others_served() {
    let s = setup("controller-ssrf");
    let creds = s.registry.credentials.clone().unwrap();
    let (controller, envoy, token) = serve(&s, &s.registry.url(), &creds, &[]);
    until_status(&envoy, "registry", &token, 200);
    let channel = format!("http://127.0.0.1:{}", controller.ports.channel);
    put(&s.manifests, "thief.yaml", &connector_yaml("thief", &channel, "robot"));
    put(
        &s.manifests,
        "metadata.yaml",
        &connector_yaml("metadata", "http://169.254.169.254", "robot"),
    );
    put(
        &s.manifests,
        "second.yaml",
        &connector_yaml("second", &s.registry.url(), "robot"),
    );
    until_status(&envoy, "second", &token, 200);
    for left_out in ["thief", "metadata"] {
        assert_eq!(
            manifest_status(&envoy, left_out, &token),
            403,
            "{left_out} is not served"
        );
    }
    let log = controller.log();
    assert!(
        log.contains("one of the proxy pod's own ports"),
        "the thief's reason is logged: {log}"
    );
    assert!(
        log.contains("169.254.169.254:80 is a link-local address"),
        "the metadata connector's reason is logged"
    );
    assert!(
        !log.contains("/v1/credentials/demo/thief"),
        "no credential asked for the thief"
    );
    others_served_and_clean(&envoy, &controller, &token, &creds);
}

/// The clusters Envoy runs (`dynamic_active_clusters`) whose name starts with `prefix`:
/// `(name, type, endpoint addresses)`.
fn active_clusters(envoy: &Envoy, prefix: &str) -> Vec<(String, String, Vec<String>)> {
    let dump: serde_json::Value = serde_json::from_str(&envoy.config_dump().unwrap()).unwrap();
    let mut out = vec![];
    for config in dump["configs"].as_array().into_iter().flatten() {
        for active in config["dynamic_active_clusters"].as_array().into_iter().flatten() {
            let c = &active["cluster"];
            let name = c["name"].as_str().unwrap_or_default();
            if !name.starts_with(prefix) {
                continue;
            }
            let addresses = c["load_assignment"]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|l| l["lb_endpoints"].as_array().into_iter().flatten())
                .map(|e| {
                    let sa = &e["endpoint"]["address"]["socket_address"];
                    format!("{}:{}", sa["address"].as_str().unwrap_or_default(), sa["port_value"])
                })
                .collect();
            out.push((
                name.to_string(),
                c["type"].as_str().unwrap_or("STATIC").to_string(),
                addresses,
            ));
        }
    }
    out
}

/// The sum of Envoy's `cluster.<prefix...>.<stat>` counters.
fn cluster_stat(envoy: &Envoy, prefix: &str, stat: &str) -> u64 {
    let stats = Request::get("/stats").send(envoy.admin_port).unwrap().body_text();
    stats
        .lines()
        .filter(|l| l.starts_with(&format!("cluster.{prefix}")) && l.contains(&format!(".{stat}: ")))
        .filter_map(|l| l.rsplit(": ").next()?.parse::<u64>().ok())
        .sum()
}

/// A Connector whose address is a host *name* that resolves to an address the proxy refuses
/// (here a name `scripts/setup.sh` maps to 127.0.0.1 in /etc/hosts, as a tenant's own DNS
/// would, on the controller's credential-channel port): the literal is refused at render (the
/// test above), and the name used to pass, Envoy resolving it itself and connecting with the
/// connector's credential. Now the controller resolves it, refuses the address, and Envoy's
/// cluster has no endpoint: the request gets 503 and no connection is made. A good Connector
/// reached by name (`localhost`, allowed by the tests' `--allow-local-upstreams`) is served
/// through a `STATIC` cluster pinned to 127.0.0.1, its certificate still checked for the name.
/// `connector`'s requests get 503 `UNAVAILABLE` OCI JSON: its cluster (named `prefix`...) is
/// `STATIC` with no endpoint, and Envoy has never connected anywhere for it.
fn unavailable_and_unconnected(envoy: &Envoy, connector: &str, token: &str, prefix: &str) {
    let r = Request::get(&format!(
        "/v2/namespaces/{NS}/connectors/{connector}/{REPO}/manifests/{TAG}"
    ))
    .header("Accept", MANIFEST_TYPES)
    .bearer(token)
    .send(envoy.port)
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert!(
        r.body_text().contains("\"UNAVAILABLE\""),
        "an OCI error: {}",
        r.body_text()
    );
    let clusters = active_clusters(envoy, prefix);
    assert_eq!(clusters.len(), 1, "{clusters:?}");
    assert_eq!(
        (clusters[0].1.as_str(), clusters[0].2.len()),
        ("STATIC", 0),
        "{clusters:?}"
    );
    assert_eq!(
        cluster_stat(envoy, prefix, "upstream_cx_total"),
        0,
        "Envoy never connected for {connector}"
    );
    assert!(cluster_stat(envoy, prefix, "upstream_cx_none_healthy") >= 1);
}

#[test]
fn an_upstream_name_resolving_to_a_refused_address_gets_no_endpoint_and_a_good_name_is_pinned() {
    let s = setup("controller-pin");
    let creds = s.registry.credentials.clone().unwrap();
    let named = format!("https://localhost:{}", s.registry.port);
    let (controller, envoy, token) = serve(&s, &named, &creds, &[]);
    until_status(&envoy, "registry", &token, 200);
    pull(&s, &envoy.authority(), "registry", &token, "pulled-pinned");
    let good = active_clusters(&envoy, &format!("upstream_https_localhost_{}", s.registry.port));
    assert_eq!(good.len(), 1, "{good:?}");
    assert_eq!(
        (good[0].1.as_str(), good[0].2.clone()),
        ("STATIC", vec![format!("127.0.0.1:{}", s.registry.port)]),
        "the name is pinned to its address; Envoy resolves nothing"
    );

    let rebound_host = connector_devkit::stack::host_name(NS, "other");
    connector_devkit::stack::check_host_form_resolves(NS, "other").unwrap_or_else(|e| panic!("{e}"));
    let rebound = format!("http://{rebound_host}:{}", controller.ports.channel);
    put(
        &s.manifests,
        "rebound.yaml",
        &connector_yaml("rebound", &rebound, "robot"),
    );
    // Served (its name passes the render), so the filter forwards; Envoy has nowhere to send it.
    let start = Instant::now();
    let status = loop {
        let got = manifest_status(&envoy, "rebound", &token);
        if got != 403 || start.elapsed() > FOLLOW_DEADLINE {
            break got;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 503, "no endpoint for a name resolving to the pod's own port");
    let prefix = "upstream_http_c_other_connector";
    unavailable_and_unconnected(&envoy, "rebound", &token, prefix);
    let metrics = controller.metrics().unwrap();
    for line in [
        "connector_controller_upstream_names{result=\"pinned\"} 1",
        "connector_controller_upstream_names{result=\"none\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let log = controller.log();
    assert!(
        log.contains(&format!("{rebound_host} resolves only to refused addresses"))
            && log.contains("one of the proxy pod's own ports"),
        "the refusal is logged with why: {log}"
    );
    others_served_and_clean(&envoy, &controller, &token, &creds);
}

/// A name whose lookup never comes back (its DNS server answers nothing, as a tenant's own
/// could) holds no other change up: removing another Connector in the same change reaches
/// Envoy within the controller's pin wait (1 s), not after the lookup's 5 s, and the slow
/// connector's requests get 503 `UNAVAILABLE` meanwhile, Envoy connecting nowhere. A hundred
/// more such names in flight take the controller no thread each, during the lookups or after
/// they are given up (the system resolver held one per lookup until its own 30 s here). The
/// controller runs in its own mount namespace with a `resolv.conf` naming a DNS server of this
/// test's that never answers (`unshare`, root: as `scripts/setup.sh`); `/etc/hosts` still
/// answers `localhost`.
#[test]
fn a_name_whose_lookup_never_answers_holds_no_other_change_up() {
    let s = setup("controller-slow-dns");
    let creds = s.registry.credentials.clone().unwrap();
    // A DNS server that takes every query and answers none, on a loopback address of its own.
    let salt = std::process::id();
    let dns_ip = format!("127.53.{}.{}", (salt >> 8) % 250 + 1, salt % 250 + 1);
    let _silent_dns = std::net::UdpSocket::bind((dns_ip.as_str(), 53))
        .unwrap_or_else(|e| panic!("binding a DNS server on {dns_ip}:53 (needs root): {e}"));
    let resolv = s.work.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {dns_ip}\noptions timeout:30 attempts:1\n")).unwrap();

    let local = format!("https://localhost:{}", s.registry.port);
    put(
        &s.manifests,
        "registry.yaml",
        &connector_yaml("registry", &local, "robot"),
    );
    put(&s.manifests, "second.yaml", &connector_yaml("second", &local, "robot"));
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &creds));
    let controller = Controller::start_with_resolver(&s.work, &s.manifests, &s.identity, &[], &resolv).unwrap();
    let envoy = envoy_fed_by(&s, &controller);
    let token = s.minter.valid(NS, "default").unwrap();
    until_status(&envoy, "registry", &token, 200);
    until_status(&envoy, "second", &token, 200);

    let threads = || {
        let pid = controller.pid().unwrap();
        std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count()
    };
    let threads_before = threads();

    // One change: Connectors at names the silent server is asked for, and `second` removed.
    let slow_host = "registry.slow-dns.example";
    put(
        &s.manifests,
        "slow.yaml",
        &connector_yaml("slow", &format!("https://{slow_host}:443"), "robot"),
    );
    for i in 0..100 {
        put(
            &s.manifests,
            &format!("slow-{i}.yaml"),
            &connector_yaml(
                &format!("slow-{i}"),
                &format!("https://n{i}.slow-dns.example:443"),
                "robot",
            ),
        );
    }
    std::fs::remove_file(s.manifests.join("second.yaml")).unwrap();
    let took = until_status(&envoy, "second", &token, 403);
    eprintln!("the removal reached Envoy after {took:?}");
    assert!(
        took < Duration::from_secs(4),
        "the removal waited {took:?}: the lookup of {slow_host} (5 s) held it up"
    );
    unavailable_and_unconnected(&envoy, "slow", &token, "upstream_https_registry_slow_dns_example");
    let threads_during = threads();
    eprintln!("controller threads: {threads_before} before, {threads_during} with 101 lookups in flight");
    assert!(
        threads_during < threads_before + 32,
        "101 lookups in flight took a thread each: {threads_before} -> {threads_during}"
    );

    // The lookup gives up after its 5 s: still no address, and the log says why.
    let start = Instant::now();
    while !controller
        .log()
        .contains(&format!("{slow_host} did not resolve within 5 s"))
    {
        assert!(
            start.elapsed() < FOLLOW_DEADLINE,
            "no lookup failure logged: {}",
            controller.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(manifest_status(&envoy, "slow", &token), 503);
    let threads_after = threads();
    eprintln!("controller threads: {threads_after} after the lookups were given up");
    assert!(
        threads_after < threads_before + 32,
        "given-up lookups still hold threads: {threads_before} -> {threads_after}"
    );
    others_served_and_clean(&envoy, &controller, &token, &creds);
}

/// Issue 12 item 11 through the real binary and Envoy: keys the proxy cannot verify with (an
/// ES512 key, an Ed25519 key, a 1024-bit RSA key) beside the cluster's usable key are skipped
/// with a warning, the configuration is served and tokens signed with the usable key verify.
#[test]
fn unusable_keys_in_the_key_set_are_skipped_and_the_rest_served() {
    // base64url of 66 bytes 0x07, 66 bytes 0x08 (P-521 coordinates), 32 bytes 0x09 (an Ed25519
    // key) and 128 bytes 0xc5 (a 1024-bit modulus).
    const X521: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH";
    const Y521: &str = "CAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI";
    const ED: &str = "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk";
    const N1024: &str = "xcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcU";
    let s = setup("controller-jwks");
    let creds = s.registry.credentials.clone().unwrap();
    let mut identity: serde_json::Value = serde_json::from_slice(&std::fs::read(&s.identity).unwrap()).unwrap();
    let usable = identity["jwks"]["keys"].as_array().unwrap().len();
    let keys = identity["jwks"]["keys"].as_array_mut().unwrap();
    keys.insert(
        0,
        serde_json::json!({"kty": "EC", "crv": "P-521", "alg": "ES512", "kid": "es512", "x": X521, "y": Y521}),
    );
    keys.push(serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed25519", "x": ED}));
    keys.push(serde_json::json!({"kty": "RSA", "kid": "rsa1024", "n": N1024, "e": "AQAB"}));
    std::fs::write(&s.identity, identity.to_string()).unwrap();

    let (controller, envoy, token) = serve(&s, &s.registry.url(), &creds, &[]);
    until_status(&envoy, "registry", &token, 200);
    let log = controller.log();
    for kid in ["es512", "ed25519", "rsa1024"] {
        assert!(
            log.lines()
                .any(|l| l.contains("skipping a key") && l.contains(&format!("\"kid\":\"{kid}\""))),
            "{kid} skipped with a warning: {log}"
        );
    }
    // Only the usable key(s) reached Envoy.
    let dump = envoy.config_dump().unwrap();
    assert!(
        !dump.contains("es512") && !dump.contains("ed25519"),
        "unusable keys left out"
    );
    assert!(usable >= 1);

    // With no usable key at all, the identity is refused and Envoy keeps what it has.
    identity["jwks"]["keys"] = serde_json::json!([{"kty": "OKP", "crv": "Ed25519", "kid": "only", "x": ED}]);
    std::fs::write(&s.identity, identity.to_string()).unwrap();
    let deadline = Instant::now() + FOLLOW_DEADLINE;
    while !controller.log().contains("none of its 1 key(s) is usable") {
        assert!(Instant::now() < deadline, "the refusal is logged: {}", controller.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        manifest_status(&envoy, "registry", &token),
        200,
        "the previous configuration stays"
    );
}

#[test]
fn a_restarted_controller_pushes_nothing_until_its_manifests_are_good() {
    use connector_devkit::controller::Controller as C;
    let s = setup("controller-restart");
    let creds = s.registry.credentials.clone().unwrap();
    put(
        &s.manifests,
        "registry.yaml",
        &connector_yaml("registry", &s.registry.url(), "robot"),
    );
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &creds));
    let controller = C::start(&s.work, &s.manifests, &s.identity).unwrap();
    let (ports, key) = (controller.ports, controller.key().to_string());
    let envoy = Envoy::start_xds(&s.work, ports.xds, ports.channel, &controller.envoy_env()).unwrap();
    let token = s.minter.valid(NS, "default").unwrap();
    until_status(&envoy, "registry", &token, 200);
    controller.kill();

    // While it is down, its directory breaks (a half-edited file) and the Connector is deleted.
    std::fs::remove_file(s.manifests.join("registry.yaml")).unwrap();
    put(&s.manifests, "broken.yaml", "kind: [Connector\n");
    let mut restarted = C::start_on(&s.work, "controller-2", &s.manifests, &s.identity, ports, &key, &[]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        restarted.readyz().unwrap(),
        503,
        "not ready with a directory it cannot read"
    );
    // Envoy reconnected, but got nothing: it keeps serving what it had.
    for _ in 0..5 {
        assert_eq!(manifest_status(&envoy, "registry", &token), 200);
    }
    assert!(
        restarted.log().contains("manifests refused as a whole"),
        "the refusal is logged"
    );
    assert_eq!(
        restarted
            .metric("connector_controller_xds_pushes_total{resource=\"filter\"}")
            .unwrap(),
        None,
        "no filter configuration was pushed"
    );

    // The directory is fixed: the restarted controller now pushes, and the deletion takes effect.
    std::fs::remove_file(s.manifests.join("broken.yaml")).unwrap();
    restarted.wait_ready().unwrap();
    until_status(&envoy, "registry", &token, 403);
    hygiene(
        &envoy,
        &restarted.log(),
        &[
            ("upstream password".into(), creds.password.clone()),
            ("channel key".into(), key),
        ],
    );
}

#[test]
fn sigterm_shuts_the_controller_down_gracefully_and_envoy_keeps_serving() {
    let s = setup("controller-sigterm");
    let creds = s.registry.credentials.clone().unwrap();
    let (controller, envoy, token) = serve(&s, &s.registry.url(), &creds, &[]);
    until_status(&envoy, "registry", &token, 200);
    let log_before = controller.log();
    assert!(log_before.contains("listening"), "{log_before}");
    let ops = controller.ports.ops;
    let status = controller
        .terminate(Duration::from_secs(8))
        .expect("exited by itself within 8 s");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        Request::get("/healthz").send(ops).is_err(),
        "the ops endpoint is closed"
    );
    for _ in 0..5 {
        assert_eq!(
            manifest_status(&envoy, "registry", &token),
            200,
            "Envoy keeps its configuration"
        );
    }
}

#[test]
fn stats_and_access_log_name_the_connector_and_the_caller_never_a_credential() {
    let s = setup("observability");
    let creds = s.registry.credentials.clone().unwrap();
    let (controller, envoy, token) = serve(&s, &s.registry.url(), &creds, &[]);
    until_status(&envoy, "registry", &token, 200);
    for _ in 0..4 {
        assert_eq!(manifest_status(&envoy, "registry", &token), 200);
    }
    let outsider = s.minter.valid("other", "builder").unwrap();
    assert_eq!(manifest_status(&envoy, "registry", &outsider), 403);
    let r = Request::get("/v2/").bearer(&token).send(envoy.port).unwrap();
    assert_eq!(r.status, 200);
    // An ES256 token: Envoy's verify_signature confirms it too (the signature goes as DER).
    let confirmed = || -> u64 {
        let stats = Request::get("/stats").send(envoy.admin_port).unwrap().body_text();
        stats
            .lines()
            .find_map(|l| l.strip_prefix("wasmcustom.oci_connector.signatures.host_confirmed: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let before_ec = confirmed();
    let ec = s.minter.token("demo", "default").key(KeyChoice::Ec).mint().unwrap();
    assert_eq!(manifest_status(&envoy, "registry", &ec), 200);
    assert_eq!(confirmed(), before_ec + 1, "the new ES256 token was confirmed by Envoy");
    // ES384 the same way: SHA-384, the P-384 key's DER, the 96-byte signature as DER.
    let ec384 = s.minter.token("demo", "default").key(KeyChoice::Ec384).mint().unwrap();
    assert_eq!(manifest_status(&envoy, "registry", &ec384), 200);
    assert_eq!(confirmed(), before_ec + 2, "the new ES384 token was confirmed by Envoy");

    let stats = Request::get("/stats").send(envoy.admin_port).unwrap().body_text();
    let stat = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("wasmcustom.{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no stat {name} in:\n{}",
                    stats
                        .lines()
                        .filter(|l| l.contains("oci_connector"))
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })
    };
    assert!(stat("oci_connector.connector.demo.registry.forwarded") >= 5);
    assert!(
        stat("oci_connector.token_cache.hits") >= 4,
        "repeated tokens are served from the cache"
    );
    assert_eq!(stat("oci_connector.answered.connector_denied"), 1);
    assert_eq!(stat("oci_connector.answered.api_base"), 1);
    // Four tokens were new once, two RS256, one ES256 and one ES384: Envoy's own
    // verify_signature (BoringSSL) confirmed each, which it does only if the filter's key DER,
    // ECDSA signature DER and protobuf arguments are what Envoy reads.
    assert!(
        stat("oci_connector.signatures.host_confirmed") >= 4,
        "new RS256, ES256 and ES384 tokens are checked by Envoy's verify_signature"
    );

    let log = envoy.log();
    let access: Vec<&str> = log.lines().filter(|l| l.starts_with("[access]")).collect();
    assert!(
        access
            .iter()
            .any(|l| l.contains(" 200 ")
                && l.contains("connector=demo/registry subject=system:serviceaccount:demo:default")),
        "access log lines:\n{}",
        access.join("\n")
    );
    assert!(access.iter().any(|l| l.contains(" 403 ")), "the refusal is logged too");
    hygiene(
        &envoy,
        &controller.log(),
        &[
            ("upstream password".into(), creds.password.clone()),
            ("client token".into(), token),
            ("outsider token".into(), outsider),
        ],
    );
}
