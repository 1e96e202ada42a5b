//! Containment if the filter's VM ever traps anyway (issue 10): the filter has no panicking
//! path left, so a deliberately trapping module (`devkit/trap-filter`, served by the real
//! controller in place of the filter) stands in for an unknown bug. What it shows, through the
//! real Envoy with the policy the controller sends (`FAIL_RELOAD`):
//! - the request that trapped the VM and requests that arrive while it is down get Envoy's 503,
//!   shaped into OCI error JSON by the bootstrap's local reply mapper; never passed upstream;
//! - the VM is replaced within its backoff, and requests are served again, same Envoy process;
//! - what happens to a request that was paused on the VM when it died: nothing. Envoy neither
//!   resumes nor answers it; it ends at the stream idle timeout (300 s in the bootstrap) or when
//!   its client gives up. Asserted: in the meantime it is never passed upstream.
//!
//! Needs `cargo build -p trap-filter --target wasm32-wasip1 --release` (`make test` does it).

use std::time::{Duration, Instant};

use connector_devkit::http::{Request, Response};
use connector_e2e::oci_error;
use connector_e2e::xds::{connector_yaml, put, secret_yaml, setup, start_stack};

fn send(port: u16, header: Option<&str>, timeout: Duration) -> Result<Response, String> {
    let mut req = Request::get("/v2/");
    if let Some(h) = header {
        req = req.header(h, "1");
    }
    req.timeout = timeout;
    req.send(port)
}

#[test]
fn a_trapped_vm_fails_closed_with_oci_json_and_is_reloaded() {
    let s = setup("vm-containment");
    let creds = s.registry.credentials.clone().unwrap();
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &creds));
    put(
        &s.manifests,
        "registry.yaml",
        &connector_yaml("registry", &s.registry.url(), "robot"),
    );
    let module = connector_e2e::test_module("trap-filter");
    let module = module.to_string_lossy().into_owned();
    // The last --wasm wins: the controller serves the trap module in the filter's place.
    let (_controller, envoy) = start_stack(&s, &["--wasm", &module]);

    let alive = send(envoy.port, None, Duration::from_secs(10)).unwrap();
    assert_eq!(alive.status, 200, "the trap module runs: {}", alive.summary());
    assert_eq!(alive.body_text(), "alive\n");

    // A request paused on the VM when it dies.
    let port = envoy.port;
    let held = std::thread::spawn(move || {
        let started = Instant::now();
        let r = send(port, Some("x-hold"), Duration::from_secs(15));
        (r, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));

    let trapped_at = Instant::now();
    let trapped = send(envoy.port, Some("x-trap"), Duration::from_secs(30));
    eprintln!(
        "the trapping request: {:?}",
        trapped.as_ref().map(|r| format!("{} {}", r.status, r.body_text()))
    );
    let trapped = trapped.unwrap();
    assert_eq!(trapped.status, 503, "{}", trapped.summary());

    // While the VM is down: Envoy's 503, as OCI JSON, never a pass-through.
    let down = send(envoy.port, None, Duration::from_secs(10)).unwrap();
    eprintln!(
        "right after the trap: {} {:?} {}",
        down.status,
        down.header("content-type"),
        down.body_text()
    );
    if down.status == 503 {
        assert_eq!(
            down.header("content-type"),
            Some("application/json"),
            "{}",
            down.summary()
        );
        let (code, message) = oci_error(&down);
        assert_eq!(code, "UNAVAILABLE", "{message}");
    } else {
        assert_eq!(down.status, 200, "served by a reloaded VM: {}", down.summary());
    }

    // FAIL_RELOAD: a new VM serves again, without restarting Envoy.
    let pid = envoy.pid();
    let recovered = loop {
        let r = send(envoy.port, None, Duration::from_secs(10)).unwrap();
        if r.status == 200 && r.body_text() == "alive\n" {
            break trapped_at.elapsed();
        }
        assert_eq!(r.status, 503, "while reloading: {}", r.summary());
        assert!(
            trapped_at.elapsed() < Duration::from_secs(15),
            "the VM was not reloaded within 15 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("served again {recovered:?} after the trap");
    assert_eq!(envoy.pid(), pid, "same Envoy process");
    let reloads = Request::get("/stats?filter=wasm")
        .send(envoy.admin_port)
        .unwrap()
        .body_text();
    eprintln!("wasm stats:\n{reloads}");

    let (held, took) = held.join().unwrap();
    eprintln!(
        "the request paused on the dead VM: {:?} after {took:?}",
        held.as_ref().map(|r| format!("{} {}", r.status, r.body_text()))
    );
    // Measured: no answer at all until the client's own 15 s timeout (Envoy would end it at the
    // stream idle timeout). Whatever happens, it is never served as if it had passed the filter.
    if let Ok(r) = &held {
        assert_ne!(
            r.status,
            200,
            "a request paused on a dead VM was passed on: {}",
            r.summary()
        );
    }
    assert!(
        took >= Duration::from_secs(1),
        "the paused request ended at once: {held:?}"
    );
}
