//! The user's walk-through on a real Kubernetes API server (`make demo-kube`): etcd and
//! kube-apiserver started on loopback, the CRD, a registry Secret and a Connector applied with
//! kubectl, the controller in API mode (as the `connector-proxy` ServiceAccount of
//! `deploy/base`) feeding Envoy, Ready and the proxy URL read from the status, a token from
//! `kubectl create token`, pulls in both address forms, a labelled Pod rewritten by the webhook
//! the API server calls, and a refused pull from another namespace. Every step prints the
//! command a user would type. `make demo` stays the fast file-mode default.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use base64::Engine;
use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::http::Request;
use connector_devkit::image::{self, SampleImage};
use connector_devkit::kube::KubeCluster;
use connector_devkit::procs::{Proc, free_port};
use connector_devkit::registry::Registry;
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::stack::{REPO, TAG, UPSTREAM_USER, check_host_form_resolves, host_name, seed_upstream};
use connector_devkit::tls::TestCa;
use connector_devkit::{Result, WorkDir};
use serde_json::{Value, json};

const NS: &str = "demo";
const NAME: &str = "registry";
const PROXY_URL_HOST: &str = "127.0.0.1";

struct Demo {
    // Dropped in order: clients of the API server first, then the API server.
    webhook: Option<Proc>,
    envoy: Envoy,
    _controller: Controller,
    kube: KubeCluster,
    registry: Registry,
    image: SampleImage,
    skopeo: Skopeo,
    work: WorkDir,
}

fn step(n: u32, what: &str, command: &str) {
    println!("\n{n}. {what}\n   $ {command}");
}

fn kubectl(kube: &KubeCluster, args: &[&str]) -> Result<String> {
    Ok(kube.kubectl(args)?.ok()?.stdout)
}

fn target_binary(name: &str) -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| connector_devkit::repo_root().join("target"));
    let p = target.join("debug").join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} is missing: `cargo build -p {name}`", p.display()))
    }
}

fn run() -> Result<()> {
    println!("OCI connector on a real Kubernetes API server (kube-apiserver + etcd on loopback)");
    let work = WorkDir::new("demo-kube")?;
    let skopeo = Skopeo::new(&work)?;
    let registry = Registry::start_with_auth(&work, UPSTREAM_USER)?;
    let creds = registry.credentials.clone().ok_or("registry without credentials")?;
    let (image, _recorder, _minter) = seed_upstream(&work, &skopeo, &registry, &creds.username, &creds.password)?;
    println!(
        "   upstream registry {} (CNCF Distribution, htpasswd user {UPSTREAM_USER}, password generated, not shown)",
        registry.url()
    );
    let kube = KubeCluster::start("demo-kube-api")?;
    println!(
        "   kube-apiserver {} at {} ready in {:.1} s; KUBECONFIG={}",
        connector_devkit::kube::KUBE_VERSION,
        kube.url,
        kube.started_in.as_secs_f64(),
        kube.kubeconfig.display()
    );

    step(
        1,
        "Apply the CRD, a registry Secret and a Connector",
        "kubectl apply --server-side -f deploy/crd/ -f secret.yaml -f connector.yaml",
    );
    kube.install_crd()?;
    kube.namespace(NS, &[])?;
    kube.namespace("other", &[])?;
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "registry-robot", "namespace": NS,
            "annotations": {"connectors.alauda.io/allowed-connectors": NAME}},
        "type": "cpaas.io/distribution-registry-token",
        "stringData": {"username": creds.username, "password": creds.password},
    }))?;
    kube.apply(&json!({
        "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {"address": registry.url(), "auth": {"name": "basicAuth", "secretRef": {"name": "registry-robot"}}, "connectorClassName": "oci"},
    }))?;
    // Who may use it: the ServiceAccounts of `demo`, through the ClusterRole deploy/base ships.
    let kubeconfig = kube.controller_kubeconfig()?;
    kubectl(
        &kube,
        &[
            "create",
            "rolebinding",
            "use-connectors",
            "-n",
            NS,
            "--clusterrole=oci-connector-user",
            "--group=system:serviceaccounts:demo",
        ],
    )?;
    println!(
        "   Secret demo/registry-robot (cpaas.io/distribution-registry-token), Connector demo/registry, RoleBinding use-connectors"
    );

    let envoy_port = free_port()?;
    let proxy_url = format!("https://{PROXY_URL_HOST}:{envoy_port}");
    let controller = Controller::start_kube(&work, &kubeconfig, &proxy_url, &["--reprobe-seconds", "5"])?;
    let envoy = Envoy::start_xds_on(
        &work,
        envoy_port,
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )?;
    let mut demo = Demo {
        webhook: None,
        envoy,
        _controller: controller,
        kube,
        registry,
        image,
        skopeo,
        work,
    };

    step(
        2,
        "Wait for Ready and read the proxy URL from the status",
        "kubectl wait --for=condition=Ready connector/registry -n demo; kubectl get connectors -n demo",
    );
    kubectl(
        &demo.kube,
        &[
            "wait",
            "--for=condition=Ready",
            "--timeout=60s",
            "connector/registry",
            "-n",
            NS,
        ],
    )?;
    print!("{}", indent(&kubectl(&demo.kube, &["get", "connectors", "-n", NS])?));
    let url = kubectl(
        &demo.kube,
        &[
            "get",
            "connector",
            NAME,
            "-n",
            NS,
            "-o",
            "jsonpath={.status.proxy.httpAddress.url}",
        ],
    )?;
    println!("   status.proxy.httpAddress.url = {url}");

    step(
        3,
        "A ServiceAccount token for the proxy",
        "TOKEN=$(kubectl create token default -n demo --audience oci-connector)",
    );
    let token = demo.kube.create_token(NS, "default", "oci-connector", &[])?;
    println!("   a {}-byte JWT signed by the API server (not shown)", token.len());

    step(
        4,
        "Pull through the proxy, both address forms",
        "skopeo copy --src-cert-dir <dir with the proxy CA> --src-creds \"sa:$TOKEN\" docker://PROXY/namespaces/demo/connectors/registry/library/app:v1 oci:...",
    );
    let until = Instant::now();
    while demo.status(&token) != 200 && until.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let path_ref = format!(
        "{}/namespaces/{NS}/connectors/{NAME}/{REPO}:{TAG}",
        demo.envoy.authority()
    );
    println!("   path form: {}", demo.pull(&path_ref, &token, "pulled-path")?);
    match check_host_form_resolves(NS, NAME) {
        Ok(()) => {
            let host_ref = format!("{}:{}/{REPO}:{TAG}", host_name(NS, NAME), demo.envoy.port);
            println!("   host form: {}", demo.pull(&host_ref, &token, "pulled-host")?);
        }
        Err(e) => println!("   host form skipped: {e}"),
    }

    step(
        5,
        "Apply a labelled Pod: the API server calls the webhook, which rewrites its image",
        "kubectl apply -f pod.yaml  # label connectors.cpaas.io/proxy-inject=true, annotation connectors.cpaas.io/connector=demo/registry",
    );
    demo.start_webhook()?;
    let original = format!("{}/{REPO}:{TAG}", demo.registry.authority());
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "namespace": NS,
            "labels": {"connectors.cpaas.io/proxy-inject": "true"},
            "annotations": {"connectors.cpaas.io/connector": format!("{NS}/{NAME}")}},
        "spec": {"containers": [{"name": "app", "image": original}]},
    });
    let mut created = None;
    for _ in 0..40 {
        let out = demo
            .kube
            .kubectl_stdin(&["apply", "-o", "json", "-f", "-"], Some(pod.to_string().as_bytes()))?;
        if out.success {
            let v: Value = serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
            created = Some(
                v["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let rewritten = created.ok_or("the Pod was not admitted")?;
    println!("   image in the manifest: {original}\n   image the API server stored: {rewritten}");
    if rewritten == original {
        return Err("the image was not rewritten".into());
    }

    step(
        6,
        "A token of another namespace is refused",
        "kubectl create token default -n other --audience oci-connector; skopeo inspect ...",
    );
    let outsider = demo.kube.create_token("other", "default", "oci-connector", &[])?;
    let resp = Request::get(&format!("/v2/namespaces/{NS}/connectors/{NAME}/{REPO}/manifests/{TAG}"))
        .bearer(&outsider)
        .send(demo.envoy.port)?;
    let body = resp.json()?;
    println!(
        "   system:serviceaccount:other:default -> {} {}: {}",
        resp.status,
        body["errors"][0]["code"].as_str().unwrap_or("?"),
        body["errors"][0]["message"].as_str().unwrap_or("?")
    );
    if resp.status != 403 {
        return Err(format!("expected 403, got {}", resp.status));
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

impl Demo {
    fn status(&self, token: &str) -> u16 {
        Request::get(&format!("/v2/namespaces/{NS}/connectors/{NAME}/{REPO}/manifests/{TAG}"))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .bearer(token)
            .send(self.envoy.port)
            .map(|r| r.status)
            .unwrap_or(0)
    }

    fn pull(&self, reference: &str, token: &str, label: &str) -> Result<String> {
        let dest = self.work.sub(label)?;
        self.skopeo
            .copy(
                &format!("docker://{reference}"),
                Creds::Basic("sa", token),
                &format!("oci:{}:{TAG}", dest.display()),
                Creds::None,
            )?
            .ok()?;
        let layers = image::oci_layers(&dest, TAG)?;
        if layers != self.image.layers {
            return Err(format!("pulled layers {layers:?}, pushed {:?}", self.image.layers));
        }
        Ok(format!(
            "{reference} -> {} layers identical to the pushed image",
            layers.len()
        ))
    }

    /// The webhook over HTTPS with a test CA, registered by the shipped
    /// MutatingWebhookConfiguration with its URL and caBundle filled in.
    fn start_webhook(&mut self) -> Result<()> {
        let dir = self.work.sub("webhook")?;
        let ca = TestCa::new(&dir)?;
        let cert = ca.issue("localhost")?;
        let port = free_port()?;
        let mut cmd = Command::new(target_binary("connector-webhook")?);
        cmd.arg("--tls-cert")
            .arg(&cert.cert)
            .arg("--tls-key")
            .arg(&cert.key)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--proxy-host", &self.envoy.authority()])
            .env("KUBECONFIG", &self.kube.kubeconfig);
        let mut proc = Proc::spawn("connector-webhook", cmd, &dir.join("webhook.log"))?;
        proc.wait_for_port(port, Duration::from_secs(20))?;
        self.webhook = Some(proc);
        let file = connector_devkit::repo_root().join("deploy/base/webhook.yaml");
        let objects = kubectl(
            &self.kube,
            &[
                "create",
                "--dry-run=client",
                "-o",
                "json",
                "-f",
                &file.display().to_string(),
            ],
        )?;
        let mut config = serde_json::Deserializer::from_str(&objects)
            .into_iter::<Value>()
            .filter_map(|o| o.ok())
            .find(|o| o["kind"] == "MutatingWebhookConfiguration")
            .ok_or("no MutatingWebhookConfiguration in deploy/base/webhook.yaml")?;
        let ca_pem = std::fs::read(&ca.cert).map_err(|e| e.to_string())?;
        config["webhooks"][0]["clientConfig"] = json!({
            "url": format!("https://localhost:{port}/mutate"),
            "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
        });
        self.kube.apply(&config)?;
        println!("   connector-webhook on https://localhost:{port}, registered with its caBundle");
        Ok(())
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("\ndemo-kube: every step behaved as expected; all processes stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("\nFAIL  {e}");
            ExitCode::FAILURE
        }
    }
}
