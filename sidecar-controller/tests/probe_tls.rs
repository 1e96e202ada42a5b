//! The controller's own probes (LivenessReady, AuthReady) trust an https registry exactly as
//! Envoy's clusters do: the CA bundle of `--upstream-ca` and a certificate that names the
//! address's host. Against a real Distribution registry behind TLS with a test CA.

use connector_controller::probe::{self, UPSTREAM_UNREACHABLE};
use connector_controller::secrets::Credential;
use connector_devkit::WorkDir;
use connector_devkit::registry::Registry;
use connector_devkit::tls::TestCa;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_use_the_upstream_ca_and_check_the_certificate_name() {
    let work = WorkDir::new("probe-tls").unwrap();
    let mut registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    let credential = Credential {
        username: creds.username.clone(),
        password: creds.password.clone(),
    };
    let ca = TestCa::new(&work.sub("ca").unwrap()).unwrap();
    let right = ca.issue("localhost").unwrap();
    // Signed by the same trusted CA, but for another host.
    let other = ca.issue("registry.other.test").unwrap();
    registry.serve_tls(&right).unwrap();
    let address = format!("https://localhost:{}", registry.port);

    let ours = probe::client_with_ca(&ca.cert.display().to_string()).unwrap();
    probe::liveness_with(&ours, &address).await.unwrap();
    probe::login_with(&ours, &address, &credential, &[]).await.unwrap();

    // Debian's bundle (the default, as for Envoy) does not hold the test CA; no built-in roots
    // either.
    let system = probe::client_with_ca(connector_controller::xds::SYSTEM_CA_BUNDLE).unwrap();
    let e = probe::liveness_with(&system, &address).await.unwrap_err();
    assert_eq!(e.reason, UPSTREAM_UNREACHABLE, "{e}");
    assert!(e.message.contains("failed TLS verification"), "{e}");
    assert!(e.message.contains("UnknownIssuer"), "{e}");

    // The registry now presents the other host's certificate: a valid chain, the wrong name.
    std::fs::copy(&other.cert, &right.cert).unwrap();
    std::fs::copy(&other.key, &right.key).unwrap();
    registry.restart().unwrap();
    let seen = std::fs::read_to_string(registry.log_path()).unwrap_or_default().len();
    let e = probe::liveness_with(&ours, &address).await.unwrap_err();
    assert_eq!(e.reason, UPSTREAM_UNREACHABLE, "{e}");
    assert!(e.message.contains("failed TLS verification"), "{e}");
    assert!(e.message.contains("not valid for name \"localhost\""), "{e}");
    let e = probe::login_with(&ours, &address, &credential, &[]).await.unwrap_err();
    assert_eq!(e.reason, UPSTREAM_UNREACHABLE, "{e}");
    assert!(!e.message.contains(&creds.password), "{e}");
    // The credential never reached the impostor: no request got past the handshake.
    let log = std::fs::read_to_string(registry.log_path()).unwrap_or_default();
    let after = log.get(seen..).unwrap_or_default();
    assert!(!after.contains("/v2/"), "a request reached the registry: {after}");

    // A bundle that cannot be read or holds no certificate is a start-up error, not a silent default.
    let missing = work.path().join("missing.pem");
    assert!(probe::use_upstream_ca(&missing.display().to_string()).is_err());
    let empty = work.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let e = probe::client_with_ca(&empty.display().to_string()).unwrap_err();
    assert!(e.contains("no certificate"), "{e}");
}
