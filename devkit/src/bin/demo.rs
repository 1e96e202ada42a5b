//! The whole story in one run: a private registry with a robot account, a Connector and its
//! Secret as manifest files, the sidecar controller in file mode serving them to Envoy over
//! xDS, a ServiceAccount-style token, pulls in both address forms with skopeo, one refused pull,
//! a Connector added and deleted live, the proxy's TLS certificate rotated live, and proof that
//! the upstream saw the robot's credential and never the token, and that no secret reached
//! Envoy's config dump or any log. The proxy speaks TLS (a CA made for the demo; skopeo verifies
//! with it, no `--tls-verify=false`), and so does the registry behind it (the harness's upstream
//! CA, which Envoy and the controller verify with `--upstream-ca`).
//! `cargo run -p connector-devkit --bin demo` (after `make demo`'s setup and builds).

use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::http::{Request, basic_value};
use connector_devkit::image::{self, SampleImage};
use connector_devkit::recorder::Recorder;
use connector_devkit::registry::Registry;
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::stack::{
    CONNECTOR_NAME, CONNECTOR_NAMESPACE, REPO, TAG, UPSTREAM_USER, check_host_form_resolves, envoy_problems, host_name,
    seed_upstream,
};
use connector_devkit::tokens::{AUDIENCE, ISSUER, Minter};
use connector_devkit::{Result, WorkDir, wasm_path};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Everything the demo runs. Dropped at the end: every process stops.
struct Demo {
    envoy: Envoy,
    controller: Controller,
    recorder: Recorder,
    registry: Registry,
    image: SampleImage,
    minter: Minter,
    skopeo: Skopeo,
    manifests: PathBuf,
    password: String,
    work: WorkDir,
}

impl Demo {
    fn start() -> Result<Self> {
        let work = WorkDir::new("demo")?;
        let skopeo = Skopeo::new(&work)?;
        let registry = Registry::start_with_auth(&work, UPSTREAM_USER)?;
        let creds = registry.credentials.clone().ok_or("registry without credentials")?;
        let (image, recorder, minter) = seed_upstream(&work, &skopeo, &registry, &creds.username, &creds.password)?;
        // What a platform team would `kubectl apply`, here files the controller watches. The
        // Secret names the Connectors that may use it: this one and the one applied live below.
        let manifests = work.sub("manifests")?;
        write(
            &manifests.join("connector.yaml"),
            &connector_yaml(CONNECTOR_NAME, recorder.port),
        )?;
        write(
            &manifests.join("secret.yaml"),
            &format!(
                "apiVersion: v1\nkind: Secret\nmetadata:\n  name: registry-robot\n  namespace: {CONNECTOR_NAMESPACE}\n  annotations:\n    connectors.alauda.io/allowed-connectors: {CONNECTOR_NAME},mirror\ntype: cpaas.io/distribution-registry-token\nstringData:\n  username: {}\n  password: {}\n",
                creds.username, creds.password
            ),
        )?;
        let identity = work.path().join("identity.json");
        write(
            &identity,
            &serde_json::json!({ "issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": minter.jwks() }).to_string(),
        )?;
        let controller = Controller::start(&work, &manifests, &identity)?;
        let envoy = Envoy::start_xds(
            &work,
            controller.ports.xds,
            controller.ports.channel,
            &controller.envoy_env(),
        )?;
        Ok(Self {
            envoy,
            controller,
            recorder,
            registry,
            image,
            minter,
            skopeo,
            manifests,
            password: creds.password,
            work,
        })
    }

    fn path_ref(&self, name: &str) -> String {
        format!(
            "docker://{}/namespaces/{CONNECTOR_NAMESPACE}/connectors/{name}/{REPO}:{TAG}",
            self.envoy.authority()
        )
    }

    fn manifest_status(&self, name: &str, token: &str) -> u16 {
        Request::get(&format!(
            "/v2/namespaces/{CONNECTOR_NAMESPACE}/connectors/{name}/{REPO}/manifests/{TAG}"
        ))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .bearer(token)
        .send(self.envoy.port)
        .map(|r| r.status)
        .unwrap_or(0)
    }

    /// Time until `name` answers `want` (at most 15 s).
    fn until(&self, name: &str, token: &str, want: u16) -> Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if self.manifest_status(name, token) == want {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("connector {name} did not answer {want} within 15 s"))
    }
}

fn connector_yaml(name: &str, port: u16) -> String {
    format!(
        "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata:\n  name: {name}\n  namespace: {CONNECTOR_NAMESPACE}\nspec:\n  address: https://127.0.0.1:{port}\n  auth:\n    name: basicAuth\n    secretRef:\n      name: registry-robot\n  connectorClassName: oci\n"
    )
}

fn write(path: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

fn main() -> ExitCode {
    println!("OCI connector demo: secretless pulls from a private registry through Envoy\n");
    let demo = match Demo::start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("FAIL  could not start the demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let module_kb = std::fs::metadata(wasm_path()).map(|m| m.len() / 1024).unwrap_or(0);
    println!(
        "      upstream registry  {} (CNCF Distribution, htpasswd, user {UPSTREAM_USER}, password generated, not shown)",
        demo.registry.url()
    );
    println!(
        "      sample image       {REPO}:{TAG}, {} layers, pushed straight to the registry",
        demo.image.layers.len()
    );
    println!(
        "      controller         connector-controller serve --manifests {} (xDS on :{}, loopback channel on :{})",
        demo.manifests.display(),
        demo.controller.ports.xds,
        demo.controller.ports.channel
    );
    println!(
        "      proxy              Envoy on {}, filter ({module_kb} KB wasm), clusters and TLS certificate (SDS) pushed by the controller",
        demo.envoy.base_url()
    );
    if let Some(c) = &demo.controller.proxy_cert {
        println!(
            "      proxy TLS          certificate {} (controller --proxy-tls-cert/--proxy-tls-key), clients trust the CA {}",
            c.cert.display(),
            c.ca.display()
        );
    }
    println!(
        "      connector          {CONNECTOR_NAMESPACE}/{CONNECTOR_NAME}; the password reaches the filter only over the controller's loopback channel\n"
    );

    let mut failures = 0;
    let mut step = |name: &str, r: Result<String>| match r {
        Ok(detail) => println!("ok    {name}: {detail}"),
        Err(e) => {
            failures += 1;
            println!("FAIL  {name}: {e}");
        }
    };
    let token = match demo.minter.valid(CONNECTOR_NAMESPACE, "default") {
        Ok(t) => t,
        Err(e) => {
            println!("FAIL  mint a token: {e}");
            return ExitCode::FAILURE;
        }
    };
    step(
        "token",
        Ok(format!(
            "system:serviceaccount:{CONNECTOR_NAMESPACE}:default, audience oci-connector, 1 h (the client's only secret)"
        )),
    );

    step(
        "pull, path form",
        pull(&demo, &demo.path_ref(CONNECTOR_NAME), &token, "pulled-path"),
    );
    let host_ref = format!(
        "docker://{}:{}/{REPO}:{TAG}",
        host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME),
        demo.envoy.port
    );
    step(
        "pull, host form",
        check_host_form_resolves(CONNECTOR_NAMESPACE, CONNECTOR_NAME)
            .and_then(|_| pull(&demo, &host_ref, &token, "pulled-host")),
    );
    step("what the upstream received", upstream_check(&demo, &token));
    step("refused pull", refused(&demo));
    step("a Connector applied live", live_change(&demo, &token));
    step("TLS certificate rotated live", rotate(&demo, &token));
    step("Envoy log and config dump, controller log", hygiene(&demo, &token));
    drop(demo);
    println!();
    if failures == 0 {
        println!("demo: every step behaved as expected; all processes stopped");
        ExitCode::SUCCESS
    } else {
        println!("demo: {failures} step(s) did not behave as expected");
        ExitCode::FAILURE
    }
}

/// A new Connector file is served within seconds; deleting it refuses it again.
fn live_change(demo: &Demo, token: &str) -> Result<String> {
    let file = demo.manifests.join("mirror.yaml");
    write(&file, &connector_yaml("mirror", demo.recorder.port))?;
    let served = demo.until("mirror", token, 200)?;
    std::fs::remove_file(&file).map_err(|e| format!("remove {}: {e}", file.display()))?;
    let refused = demo.until("mirror", token, 403)?;
    Ok(format!(
        "{CONNECTOR_NAMESPACE}/mirror served {} ms after its file appeared, refused {} ms after it was deleted; no restart",
        served.as_millis(),
        refused.as_millis()
    ))
}

/// curl over verified TLS: (HTTP version, status, subject of the served certificate).
fn curl_tls(demo: &Demo, token: &str) -> Result<(String, String, String)> {
    let ca = demo
        .controller
        .proxy_cert
        .as_ref()
        .ok_or("the proxy has no TLS certificate")?
        .ca
        .clone();
    let url = format!(
        "{}/v2/namespaces/{CONNECTOR_NAMESPACE}/connectors/{CONNECTOR_NAME}/{REPO}/manifests/{TAG}",
        demo.envoy.base_url()
    );
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-o",
            "/dev/null",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
        ])
        .arg("--cacert")
        .arg(&ca)
        .arg("-u")
        .arg(format!("sa:{token}"))
        .args(["-w", "%{http_version} %{http_code}\n%{certs}"])
        .arg(&url)
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (version, status) = (first.next().unwrap_or_default(), first.next().unwrap_or_default());
    let subject = lines
        .find_map(|l| l.strip_prefix("Subject:"))
        .unwrap_or_default()
        .trim();
    if !out.status.success() {
        return Err(format!(
            "curl over TLS failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((version.to_string(), status.to_string(), subject.to_string()))
}

/// The certificate files replaced: the controller hands the new one to Envoy over SDS; the next
/// connection gets it, verified against the same CA, with no restart.
fn rotate(demo: &Demo, token: &str) -> Result<String> {
    let cert = demo
        .controller
        .proxy_cert
        .as_ref()
        .ok_or("the proxy has no TLS certificate")?;
    let (version, status, before) = curl_tls(demo, token)?;
    if status != "200" {
        return Err(format!("HTTP/{version} {status} before the rotation, expected 200"));
    }
    cert.rotate(1)?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        let (_, status, now) = curl_tls(demo, token)?;
        if now != before && status == "200" {
            return Ok(format!(
                "HTTP/{version} {status} with {before:?}; new files served as {now:?} after {} ms, verified with the same CA; no restart",
                start.elapsed().as_millis()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("the rotated certificate was not served within 15 s".into())
}

fn hygiene(demo: &Demo, token: &str) -> Result<String> {
    let mut secrets = vec![
        ("the upstream password".to_string(), demo.password.clone()),
        ("the client token".to_string(), token.to_string()),
        ("the channel key".to_string(), demo.controller.key().to_string()),
    ];
    // The proxy's private key (SDS keys are redacted in Envoy's config dump): any of its lines.
    if let Some(c) = &demo.controller.proxy_cert {
        let key = std::fs::read_to_string(&c.key).map_err(|e| format!("read {}: {e}", c.key.display()))?;
        for l in key.lines().filter(|l| !l.starts_with("-----") && l.len() > 20) {
            secrets.push(("the proxy's TLS private key".to_string(), l.to_string()));
        }
    }
    let mut problems = envoy_problems(&demo.envoy, &secrets)?;
    let log = demo.controller.log();
    for (what, value) in &secrets {
        if log.contains(value.as_str()) {
            problems.push(format!("{what} appears in the controller's log"));
        }
    }
    if problems.is_empty() {
        Ok("no password, no token, no channel key, no TLS private key, no [critical] wasm line".into())
    } else {
        Err(problems.join("; "))
    }
}

/// skopeo inspect + copy through the proxy; layers must equal what was pushed.
fn pull(stack: &Demo, reference: &str, token: &str, label: &str) -> Result<String> {
    let out = stack
        .skopeo
        .inspect(reference, Creds::Basic("sa", token), false)?
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| format!("inspect output: {e}"))?;
    let inspected: Vec<String> = serde_json::from_value(v["Layers"].clone()).unwrap_or_default();
    if inspected != stack.image.layers {
        return Err(format!(
            "inspect shows layers {inspected:?}, pushed {:?}",
            stack.image.layers
        ));
    }
    let dest = stack.work.sub(label)?;
    let dest_ref = format!("oci:{}:{TAG}", dest.display());
    stack
        .skopeo
        .copy(reference, Creds::Basic("sa", token), &dest_ref, Creds::None)?
        .ok()?;
    let copied = image::oci_layers(&dest, TAG)?;
    if copied != stack.image.layers {
        return Err(format!("copied layers {copied:?}, pushed {:?}", stack.image.layers));
    }
    Ok(format!(
        "{} -> {} layers identical to the pushed image (skopeo verified the proxy's TLS certificate with the CA)",
        reference.trim_start_matches("docker://"),
        copied.len()
    ))
}

fn upstream_check(stack: &Demo, token: &str) -> Result<String> {
    let seen = stack.recorder.take();
    let robot = format!("Basic {}", basic_value(UPSTREAM_USER, &stack.password));
    let auths = seen.authorizations();
    if auths.is_empty() || auths.iter().any(|a| *a != robot) {
        return Err(format!(
            "expected only the robot's credential on {} requests",
            seen.requests
        ));
    }
    if seen.text.contains(token) || seen.text.contains(&basic_value("sa", token)) {
        return Err("the client's token reached the upstream".into());
    }
    Ok(format!(
        "{} requests, all with the robot's Basic credential, none with the client's token",
        seen.requests
    ))
}

/// A token of namespace `other` against demo/registry: skopeo must fail and the upstream see
/// nothing; the OCI error message is shown.
fn refused(stack: &Demo) -> Result<String> {
    let outsider = stack.minter.valid("other", "default")?;
    let reference = stack.path_ref(CONNECTOR_NAME);
    stack.recorder.take();
    let out = stack.skopeo.inspect(&reference, Creds::Basic("sa", &outsider), false)?;
    if out.success {
        return Err("a token of namespace other could read demo/registry".into());
    }
    let path = format!("/v2/namespaces/{CONNECTOR_NAMESPACE}/connectors/{CONNECTOR_NAME}/{REPO}/manifests/{TAG}");
    let resp = Request::get(&path).basic("sa", &outsider).send(stack.envoy.port)?;
    let body = resp.json()?;
    let message = body["errors"][0]["message"]
        .as_str()
        .unwrap_or("<no OCI error message>");
    let code = body["errors"][0]["code"].as_str().unwrap_or("?");
    let seen = stack.recorder.take();
    if !seen.is_empty() {
        return Err(format!("the upstream received {:?}", seen.request_lines()));
    }
    if !(400..500).contains(&resp.status) {
        return Err(format!("expected a 4xx refusal, got {}", resp.summary()));
    }
    Ok(format!(
        "system:serviceaccount:other:default -> {} {code}: {message} (skopeo failed too; upstream received nothing)",
        resp.status
    ))
}
