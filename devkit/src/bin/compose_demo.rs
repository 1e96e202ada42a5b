//! `make compose-demo`: `docker-compose.yml` run for real, with podman-compose and podman (there
//! is no Docker engine here) on the images `make images` built (FROM scratch, static binaries).
//! It writes what the compose file mounts from `$OCI_CONNECTOR_COMPOSE_DIR`: the proxy's and the
//! registry's TLS certificates (from a CA of its own, which Envoy and the controller trust for
//! the upstream) and an identity file with the public key of a token signer made now; starts the
//! stack; seeds the demo registry with the robot account over TLS verified with that CA; pulls
//! through the proxy with skopeo, verifying TLS with that CA, with a ServiceAccount-style token;
//! shows a refused pull; and takes the stack down again.

use connector_devkit::image;
use connector_devkit::procs::{self, Output};
use connector_devkit::skopeo::Skopeo;
use connector_devkit::tls::TestCa;
use connector_devkit::tokens::{AUDIENCE, ISSUER, Minter};
use connector_devkit::{Result, WorkDir, repo_root};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const PROJECT: &str = "oci-connector-demo";
/// The demo registry's robot account (deploy/compose/htpasswd, deploy/compose/manifests).
const ROBOT: (&str, &str) = ("robot", "compose-demo-password");

fn compose(dir: &std::path::Path, args: &[&str]) -> Result<Output> {
    let root = repo_root();
    let mut c = Command::new(root.join(".venv/bin/podman-compose"));
    c.current_dir(&root)
        .args(["-p", PROJECT, "-f", "docker-compose.yml"])
        .args(args)
        .env("OCI_CONNECTOR_COMPOSE_DIR", dir)
        .env("OCI_CONNECTOR_IMAGE_REGISTRY", "localhost")
        // This sandbox: runc (crun cannot set up hybrid cgroups here) and no default ulimits
        // (setrlimit is refused): scripts/podman-containers.conf says why.
        .env("CONTAINERS_CONF", root.join("scripts/podman-containers.conf"));
    procs::run(c, None)
}

fn step(n: u32, what: &str) {
    println!("\n== {n}. {what}");
}

fn run() -> Result<()> {
    let work = WorkDir::new("compose-demo")?;
    let dir = work.sub("compose")?;
    step(
        1,
        "the files the compose file mounts: proxy certificate and token-signer identity",
    );
    let ca = TestCa::new(&work.sub("ca")?)?;
    let cert = ca.issue_with(
        "proxy",
        "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    )?;
    // The registry's, from the same CA: `registry` in the compose network, localhost from here.
    let registry_cert = ca.issue_with(
        "registry",
        "/CN=registry",
        "subjectAltName=DNS:registry,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    )?;
    std::fs::create_dir_all(dir.join("tls")).map_err(|e| e.to_string())?;
    std::fs::copy(&ca.cert, dir.join("tls/ca.crt")).map_err(|e| e.to_string())?;
    for (from, to) in [
        (&cert.cert, "tls.crt"),
        (&cert.key, "tls.key"),
        (&registry_cert.cert, "registry.crt"),
        (&registry_cert.key, "registry.key"),
    ] {
        std::fs::copy(from, dir.join("tls").join(to)).map_err(|e| e.to_string())?;
    }
    // The controller's and the registry's images run as non-root users: the demo keys must be
    // readable by them.
    for key in ["tls/tls.key", "tls/registry.key"] {
        std::fs::set_permissions(dir.join(key), std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .map_err(|e| e.to_string())?;
    }
    let minter = Minter::new(&work.sub("keys")?)?;
    std::fs::write(
        dir.join("identity.json"),
        serde_json::json!({ "issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": minter.jwks() }).to_string(),
    )
    .map_err(|e| e.to_string())?;
    println!("   CA {}, identity with {} public keys", ca.cert.display(), 2);

    step(2, "podman-compose up (images from `make images`, FROM scratch)");
    let _ = compose(&dir, &["down", "-t", "2"]);
    let t0 = Instant::now();
    let up = compose(&dir, &["up", "-d"])?;
    if !up.success {
        return Err(format!("podman-compose up failed:\n{}\n{}", up.stdout, up.stderr));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&ca.cert)
            .arg("https://localhost:8080/v2/");
        let code = procs::run(c, None)?.stdout;
        if code == "401" {
            break;
        }
        if Instant::now() > deadline {
            let logs = compose(&dir, &["logs"])
                .map(|o| o.stdout + &o.stderr)
                .unwrap_or_default();
            return Err(format!(
                "the proxy did not answer /v2/ with 401 in 60 s (last {code:?}):\n{logs}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("   the TLS proxy answers /v2/ with 401 {:?} after up", t0.elapsed());

    step(3, "the demo registry gets an image, pushed with its robot account");
    let skopeo = Skopeo::new(&work)?;
    let sample = image::build_sample(&work, "app", "v1", 2)?;
    // Verified against the demo CA, like every client here.
    let certs = work.sub("client-certs")?;
    std::fs::copy(&ca.cert, certs.join("ca.crt")).map_err(|e| e.to_string())?;
    let mut c = skopeo.command();
    c.args(["copy", "--dest-cert-dir"])
        .arg(&certs)
        .arg("--dest-creds")
        .arg(format!("{}:{}", ROBOT.0, ROBOT.1))
        .arg(sample.oci_ref())
        .arg("docker://localhost:5000/library/app:v1");
    procs::run(c, None)?.ok()?;

    step(4, "pull through the proxy with a ServiceAccount token, TLS verified");
    let token = minter.valid("demo", "default")?;
    let pull = |token: &str, dest: &str| -> Result<Output> {
        let mut c = skopeo.command();
        c.args(["copy", "--src-cert-dir"])
            .arg(&certs)
            .args(["--src-creds", &format!("sa:{token}")])
            .arg("docker://localhost:8080/namespaces/demo/connectors/registry/library/app:v1")
            .arg(format!("oci:{}:v1", work.path().join(dest).display()));
        procs::run(c, None)
    };
    pull(&token, "pulled")?.ok()?;
    let layers = image::oci_layers(&work.path().join("pulled"), "v1")?;
    if layers != sample.layers {
        return Err(format!("pulled layers {layers:?}, pushed {:?}", sample.layers));
    }
    println!("   pulled {} layers, identical to what was pushed", layers.len());

    step(5, "a token of another namespace is refused");
    let other = minter.valid("other", "default")?;
    let refused = pull(&other, "refused")?;
    if refused.success || !refused.stderr.contains("403") && !refused.stderr.to_lowercase().contains("denied") {
        return Err(format!("another namespace's pull was not refused: {}", refused.stderr));
    }
    println!("   refused: {}", refused.stderr.lines().last().unwrap_or_default());

    step(6, "podman-compose down");
    compose(&dir, &["down", "-t", "2"])?.ok()?;
    println!("\ncompose demo done in {:?}", t0.elapsed());
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compose demo failed: {e}");
            if let Ok(d) = WorkDir::new("compose-demo-down") {
                let _ = compose(d.path(), &["down", "-t", "2"]);
            }
            ExitCode::FAILURE
        }
    }
}
