//! A bounded mixed load (issue 6, "Soak"): pulls and pushes over 20 connectors served by the
//! controller in file mode, every client's token replaced every few seconds, one Secret rotated
//! half way; zero unexpected errors, and Envoy's and the controller's memory sampled throughout.
//! `cargo run --release -p connector-devkit --bin soak -- --minutes 10` (make soak).
//! Exits non-zero on any unexpected error.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::http::Request;
use connector_devkit::image;
use connector_devkit::registry::{Credentials, Registry};
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::tokens::{AUDIENCE, ISSUER, Minter};
use connector_devkit::{Result, WorkDir, random_hex, random_secret};

const NS: &str = "soak";
const CONNECTORS: usize = 20;
const WORKERS: usize = 4;
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn arg(name: &str, default: u64) -> u64 {
    connector_devkit::arg(name, default)
}

/// Resident memory in MiB.
fn rss_mib(pid: Option<u32>) -> f64 {
    connector_devkit::procs::rss_kib(pid) as f64 / 1024.0
}

fn secret_yaml(name: &str, c: &Credentials) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {NS}\n  annotations:\n    connectors.alauda.io/allowed-connectors: \"*\"\ntype: cpaas.io/distribution-registry-token\nstringData:\n  username: {}\n  password: {}\n",
        c.username, c.password
    )
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool> {
    let minutes = arg("--minutes", 10);
    let work = WorkDir::new("soak")?;
    let skopeo = Skopeo::new(&work)?;
    let mut registry = Registry::start_with_auth(&work, "robot")?;
    let old = registry.credentials.clone().ok_or("no credentials")?;
    let new = Credentials {
        username: "robot2".into(),
        password: random_secret()?,
    };
    registry.add_user(&new)?;
    let sample = image::build_sample(&work, "soak", "v1", 2)?;
    image::push(
        &skopeo,
        &sample,
        &registry.authority(),
        "soak/app",
        Creds::Basic(&old.username, &old.password),
    )?;
    let minter = Minter::new(&work.sub("keys")?)?;
    let manifests = work.sub("manifests")?;
    // Connectors 0..9 use Secret `robot-a` (rotated half way), 10..19 `robot-b`.
    for i in 0..CONNECTORS {
        let secret = if i < CONNECTORS / 2 { "robot-a" } else { "robot-b" };
        std::fs::write(
            manifests.join(format!("c{i}.yaml")),
            format!(
                "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata:\n  name: c{i}\n  namespace: {NS}\nspec:\n  address: {}\n  auth:\n    name: basicAuth\n    secretRef:\n      name: {secret}\n  connectorClassName: oci\n",
                registry.url()
            ),
        )
        .map_err(|e| e.to_string())?;
    }
    std::fs::write(manifests.join("robot-a.yaml"), secret_yaml("robot-a", &old)).map_err(|e| e.to_string())?;
    std::fs::write(manifests.join("robot-b.yaml"), secret_yaml("robot-b", &old)).map_err(|e| e.to_string())?;
    let identity = work.path().join("identity.json");
    std::fs::write(
        &identity,
        serde_json::json!({ "issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": minter.jwks() }).to_string(),
    )
    .map_err(|e| e.to_string())?;
    let controller = Controller::start(&work, &manifests, &identity)?;
    let envoy = Envoy::start_xds(
        &work,
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )?;
    let minter = Arc::new(minter);
    let layer = sample.layers.first().cloned().ok_or("no layer")?;

    let stop = Arc::new(AtomicBool::new(false));
    let (pulls, pushes, tokens) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let port = envoy.port;
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (stop, pulls, pushes, tokens, errors, minter, layer) = (
                stop.clone(),
                pulls.clone(),
                pushes.clone(),
                tokens.clone(),
                errors.clone(),
                minter.clone(),
                layer.clone(),
            );
            std::thread::spawn(move || {
                let mut token = String::new();
                let mut minted_at = Instant::now() - Duration::from_secs(3600);
                let mut n: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    // A fresh token every 5 s: a new signature verification per worker.
                    if minted_at.elapsed() > Duration::from_secs(5) {
                        match minter.valid(NS, &format!("worker-{w}")) {
                            Ok(t) => {
                                token = t;
                                minted_at = Instant::now();
                                tokens.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => errors
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(format!("mint: {e}")),
                        }
                    }
                    n += 1;
                    let c = (n as usize * 7 + w) % CONNECTORS;
                    let base = format!("/v2/namespaces/{NS}/connectors/c{c}/soak/app");
                    let result = if n.is_multiple_of(5) {
                        push(port, &base, &token).map(|_| pushes.fetch_add(1, Ordering::Relaxed))
                    } else {
                        pull(port, &base, &layer, &token).map(|_| pulls.fetch_add(1, Ordering::Relaxed))
                    };
                    if let Err(e) = result {
                        errors.lock().unwrap_or_else(|e| e.into_inner()).push(e);
                    }
                }
            })
        })
        .collect();

    let started = Instant::now();
    let total = Duration::from_secs(minutes * 60);
    let mut samples = vec![];
    let mut rotated = false;
    println!("| minute | pulls | pushes | tokens minted | errors | Envoy RSS MiB | controller RSS MiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    while started.elapsed() < total {
        std::thread::sleep(Duration::from_secs(30).min(total.saturating_sub(started.elapsed())));
        if !rotated && started.elapsed() >= total / 2 {
            // Rotate one Secret under load (the registry accepts both robot accounts).
            let tmp = manifests.join(".robot-a.tmp");
            std::fs::write(&tmp, secret_yaml("robot-a", &new)).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, manifests.join("robot-a.yaml")).map_err(|e| e.to_string())?;
            rotated = true;
            eprintln!("rotated Secret robot-a at {:?}", started.elapsed());
        }
        let (e, c) = (rss_mib(envoy.pid()), rss_mib(controller.pid()));
        samples.push((e, c));
        let err_count = errors.lock().unwrap_or_else(|e| e.into_inner()).len();
        println!(
            "| {:.1} | {} | {} | {} | {err_count} | {e:.0} | {c:.0} |",
            started.elapsed().as_secs_f64() / 60.0,
            pulls.load(Ordering::Relaxed),
            pushes.load(Ordering::Relaxed),
            tokens.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let errors = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let first = samples.first().copied().unwrap_or_default();
    let last = samples.last().copied().unwrap_or_default();
    let peak = samples
        .iter()
        .fold((0.0f64, 0.0f64), |a, s| (a.0.max(s.0), a.1.max(s.1)));
    println!();
    println!(
        "soak: {minutes} min, {CONNECTORS} connectors, {WORKERS} clients; {} pulls, {} pushes, {} tokens; {} unexpected errors",
        pulls.load(Ordering::Relaxed),
        pushes.load(Ordering::Relaxed),
        tokens.load(Ordering::Relaxed),
        errors.len()
    );
    println!(
        "Envoy RSS {:.0} → {:.0} MiB (peak {:.0}); controller RSS {:.0} → {:.0} MiB (peak {:.0})",
        first.0, last.0, peak.0, first.1, last.1, peak.1
    );
    for e in errors.iter().take(10) {
        println!("error: {e}");
    }
    Ok(errors.is_empty())
}

/// Manifest and one layer through the connector; both must be 200.
fn pull(port: u16, base: &str, layer: &str, token: &str) -> std::result::Result<(), String> {
    for path in [format!("{base}/manifests/v1"), format!("{base}/blobs/{layer}")] {
        let r = Request::get(&path)
            .header("Accept", MANIFEST)
            .bearer(token)
            .send(port)
            .map_err(|e| format!("{path}: {e}"))?;
        if r.status != 200 {
            return Err(format!("{path}: {} {}", r.status, r.body_text()));
        }
    }
    Ok(())
}

/// A small blob pushed monolithically: POST, then PUT ?digest= with the bytes.
fn push(port: u16, base: &str, token: &str) -> std::result::Result<(), String> {
    use sha2_digest::hex_sha256;
    let body = format!("soak blob {}", random_hex(8).unwrap_or_default()).into_bytes();
    let digest = format!("sha256:{}", hex_sha256(&body));
    let start = Request::new("POST", &format!("{base}/blobs/uploads/"))
        .bearer(token)
        .send(port)
        .map_err(|e| format!("upload start: {e}"))?;
    if start.status != 202 {
        return Err(format!("upload start: {} {}", start.status, start.body_text()));
    }
    let location = start.header("location").ok_or("upload start: no Location")?.to_string();
    let path = location
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_string()))
        .unwrap_or(location);
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut put = Request::new("PUT", &format!("{path}{sep}digest={digest}"))
        .bearer(token)
        .header("Content-Type", "application/octet-stream");
    put.body = body;
    let done = put.send(port).map_err(|e| format!("upload: {e}"))?;
    if done.status != 201 {
        return Err(format!("upload: {} {}", done.status, done.body_text()));
    }
    Ok(())
}

/// SHA-256 through the `sha256sum` a Debian machine has, to keep the devkit's dependencies as they are.
mod sha2_digest {
    pub fn hex_sha256(bytes: &[u8]) -> String {
        let mut cmd = std::process::Command::new("sha256sum");
        cmd.arg("-");
        match connector_devkit::procs::run(cmd, Some(bytes)) {
            Ok(o) => o.stdout.split_whitespace().next().unwrap_or_default().to_string(),
            Err(_) => String::new(),
        }
    }
}
