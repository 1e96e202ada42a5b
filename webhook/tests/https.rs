//! The real `connector-webhook` binary over HTTPS (a certificate from a test CA made by openssl),
//! reading Connectors from a real kube-apiserver (one per test binary, shared), answering
//! AdmissionReview v1 requests: posted by the tests (the client verifies the server certificate
//! against the test CA), and sent by the API server itself once a `MutatingWebhookConfiguration`
//! with the CA bundle registers it, when `kubectl apply` creates a Pod.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use connector_devkit::WorkDir;
use connector_devkit::kube::KubeCluster;
use connector_devkit::procs::{Proc, free_port};
use connector_devkit::tls::TestCa;
use serde_json::{Value, json};

const PROXY: &str = "proxy.example.com:31567";
const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const LABEL: &str = "connectors.cpaas.io/proxy-inject";
const ANNOTATION: &str = "connectors.cpaas.io/connector";
const ORIGINAL: &str = "connectors.cpaas.io/original-images";

/// The API server every test here shares: the CRD, namespaces `demo`, `shared`, `private`, and
/// three Connectors. Started once; stopped when the test process exits.
fn cluster() -> &'static KubeCluster {
    static CLUSTER: OnceLock<KubeCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let kube = KubeCluster::start("webhook-kube").unwrap_or_else(|e| panic!("{e}"));
        eprintln!("kube-apiserver ready in {:?}", kube.started_in);
        kube.install_crd().unwrap();
        for (ns, name, address, allowed) in [
            ("demo", "hub", "https://index.docker.io", json!([])),
            ("shared", "harbor", "https://harbor.example.com:8443", json!(["demo"])),
            ("private", "harbor", "https://harbor.example.com:8443", json!([])),
        ] {
            kube.namespace(ns, &[]).unwrap();
            kube.apply(&json!({
                "apiVersion": "connectors.alauda.io/v1alpha1",
                "kind": "Connector",
                "metadata": { "name": name, "namespace": ns },
                "spec": {
                    "address": address,
                    "auth": { "name": "tokenAuth", "secretRef": { "name": "robot" } },
                    "connectorClassName": "oci",
                    "allowedNamespaces": allowed,
                }
            }))
            .unwrap();
        }
        kube
    })
}

/// A running webhook, the API server it reads and an HTTPS client trusting only the test CA.
struct Webhook {
    kube: &'static KubeCluster,
    client: reqwest::Client,
    port: u16,
    ca_pem: Vec<u8>,
    proc: Proc,
    work: WorkDir,
}

impl Webhook {
    fn start(extra: &[&str]) -> Webhook {
        let kube = cluster();
        Self::start_with(extra, kube, &kube.kubeconfig)
    }

    /// As [`Webhook::start`], reading the API server through `kubeconfig`.
    fn start_with(extra: &[&str], kube: &'static KubeCluster, kubeconfig: &Path) -> Webhook {
        let work = WorkDir::new("webhook").unwrap();
        let ca = TestCa::new(work.path()).unwrap();
        let cert = ca.issue("localhost").unwrap();
        let port = free_port().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_connector-webhook"));
        cmd.args(["--tls-cert", path(&cert.cert), "--tls-key", path(&cert.key)])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--proxy-host", PROXY])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "debug");
        let mut proc = Proc::spawn("connector-webhook", cmd, &work.path().join("webhook.log")).unwrap();
        proc.wait_for_port(port, Duration::from_secs(20)).unwrap();
        let ca_pem = std::fs::read(&ca.cert).unwrap();
        let client = https_client(Some(&ca_pem));
        Webhook {
            kube,
            client,
            port,
            ca_pem,
            proc,
            work,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// POSTs an AdmissionReview for `pod` (in namespace `demo`) and returns the response review.
    async fn admit(&self, pod: &Value) -> Value {
        let resp = self
            .client
            .post(self.url("/mutate"))
            .json(&admission_review(pod))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "POST /mutate");
        let review: Value = resp.json().await.unwrap();
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1", "{review}");
        assert_eq!(review["kind"], "AdmissionReview", "{review}");
        assert_eq!(review["response"]["uid"], UID, "{review}");
        review["response"].clone()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.proc.log_path()).unwrap_or_default()
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn https_client(ca_pem: Option<&[u8]>) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .resolve("localhost", ([127, 0, 0, 1], 0).into())
        .timeout(Duration::from_secs(20));
    if let Some(pem) = ca_pem {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap());
    }
    b.build().unwrap()
}

const UID: &str = "705ab4f5-6393-11e8-b7cc-42010a800002";

/// An AdmissionReview v1 request as the API server sends it for a pod CREATE in `demo`.
fn admission_review(pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": UID,
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "name": "app",
            "namespace": "demo",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "a1b2",
                "groups": ["system:serviceaccounts", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": { "kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1" }
        }
    })
}

/// A pod in `demo`; `label`/`connector` None leave them out.
fn pod(label: Option<&str>, connector: Option<&str>) -> Value {
    let mut labels = json!({ "app": "web" });
    if let Some(l) = label {
        labels[LABEL] = json!(l);
    }
    let mut annotations = json!({ "team": "a" });
    if let Some(c) = connector {
        annotations[ANNOTATION] = json!(c);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "app", "namespace": "demo", "labels": labels, "annotations": annotations },
        "spec": {
            "serviceAccountName": "default",
            "initContainers": [
                { "name": "setup", "image": format!("library/busybox@{D}") },
                { "name": "tools", "image": "quay.io/org/tools:1" }
            ],
            "containers": [
                { "name": "web", "image": "nginx:1.27", "ports": [{ "containerPort": 80 }] },
                { "name": "side", "image": "ghcr.io/org/side:2" },
                { "name": "cache", "image": format!("docker.io/library/redis:7@{D}") },
                { "name": "done", "image": format!("{PROXY}/namespaces/demo/connectors/hub/library/envoy:1") }
            ],
            "ephemeralContainers": [
                { "name": "debug", "image": "index.docker.io/library/alpine:3.20" }
            ]
        }
    })
}

fn images(pod: &Value, kind: &str) -> Vec<String> {
    pod["spec"][kind]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["image"].as_str().unwrap().to_string())
        .collect()
}

fn denial(resp: &Value) -> (u64, String) {
    assert_eq!(resp["allowed"], false, "{resp}");
    assert!(resp["patch"].is_null(), "a denial carries no patch: {resp}");
    (
        resp["status"]["code"].as_u64().unwrap(),
        resp["status"]["message"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opted_in_pod_gets_its_images_rewritten() {
    let w = Webhook::start(&[]);
    let original = pod(Some("true"), Some("demo/hub"));
    let resp = w.admit(&original).await;
    assert_eq!(resp["allowed"], true, "{resp}");
    assert_eq!(resp["patchType"], "JSONPatch", "{resp}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(resp["patch"].as_str().expect("a base64 patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut patched = original.clone();
    json_patch::patch(&mut patched, &patch).unwrap();

    let px = |s: &str| format!("{PROXY}/namespaces/demo/connectors/hub/library/{s}");
    assert_eq!(
        images(&patched, "initContainers"),
        [px(&format!("busybox@{D}")), "quay.io/org/tools:1".into()]
    );
    assert_eq!(
        images(&patched, "containers"),
        [
            px("nginx:1.27"),
            "ghcr.io/org/side:2".into(),
            px(&format!("redis:7@{D}")),
            px("envoy:1"),
        ]
    );
    assert_eq!(images(&patched, "ephemeralContainers"), [px("alpine:3.20")]);
    let recorded: Value = serde_json::from_str(patched["metadata"]["annotations"][ORIGINAL].as_str().unwrap()).unwrap();
    assert_eq!(
        recorded,
        json!({
            "initContainers": { "setup": format!("library/busybox@{D}") },
            "containers": { "web": "nginx:1.27", "cache": format!("docker.io/library/redis:7@{D}") },
            "ephemeralContainers": { "debug": "index.docker.io/library/alpine:3.20" },
        })
    );
    // Nothing but the images and the recording annotation changed.
    let mut expected = original.clone();
    for kind in ["initContainers", "containers", "ephemeralContainers"] {
        for (i, image) in images(&patched, kind).into_iter().enumerate() {
            expected["spec"][kind][i]["image"] = json!(image);
        }
    }
    expected["metadata"]["annotations"][ORIGINAL] = patched["metadata"]["annotations"][ORIGINAL].clone();
    assert_eq!(patched, expected);
    // The connector was read from the API server (its audit log).
    assert!(
        w.kube.audit().iter().any(|e| e["verb"] == "get"
            && e["objectRef"]["resource"] == "connectors"
            && e["objectRef"]["namespace"] == "demo"
            && e["objectRef"]["name"] == "hub"),
        "no GET of Connector demo/hub in the API server's audit log"
    );
    assert!(w.log().contains("images rewritten"), "{}", w.log());

    // A connector of another namespace that allows `demo`, on a registry with a port.
    let mut p = pod(Some("true"), Some("shared/harbor"));
    p["spec"]["containers"] = json!([{ "name": "app", "image": "harbor.example.com:8443/team/app:v1" }]);
    let resp = w.admit(&p).await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(resp["patch"].as_str().expect("a base64 patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    json_patch::patch(&mut p, &patch).unwrap();
    assert_eq!(
        images(&p, "containers"),
        [format!("{PROXY}/namespaces/shared/connectors/harbor/team/app:v1")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_form_rewrites_to_the_connectors_host() {
    let w = Webhook::start(&["--host-form"]);
    let mut p = pod(Some("true"), Some("demo/hub"));
    p["spec"] = json!({ "containers": [{ "name": "web", "image": "nginx:1.27" }] });
    let resp = w.admit(&p).await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(resp["patch"].as_str().expect("a base64 patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    json_patch::patch(&mut p, &patch).unwrap();
    assert_eq!(
        images(&p, "containers"),
        ["c-hub-connector.demo.svc.cluster.local/library/nginx:1.27"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_forbidden_connectors_are_denied_with_a_message() {
    let w = Webhook::start(&[]);
    let (code, message) = denial(&w.admit(&pod(Some("true"), Some("demo/nope"))).await);
    assert_eq!(code, 400);
    assert!(message.contains("Connector demo/nope"), "{message}");
    assert!(message.contains("does not exist"), "{message}");

    // Another namespace's connector that does not list `demo`, and one that does not exist:
    // the same answer.
    let (code, forbidden) = denial(&w.admit(&pod(Some("true"), Some("private/harbor"))).await);
    assert_eq!(code, 403);
    assert!(forbidden.contains("may not be used from namespace demo"), "{forbidden}");
    assert!(forbidden.contains("spec.allowedNamespaces"), "{forbidden}");
    let (code, missing) = denial(&w.admit(&pod(Some("true"), Some("elsewhere/harbor"))).await);
    assert_eq!(code, 403);
    assert_eq!(
        missing.replace("elsewhere/harbor", "X"),
        forbidden.replace("private/harbor", "X")
    );

    let (code, message) = denial(&w.admit(&pod(Some("true"), Some("demo"))).await);
    assert_eq!(code, 400);
    assert!(message.contains("is malformed"), "{message}");

    // The API server unreachable (a kubeconfig naming a port nothing listens on): denied (fail
    // closed), saying so.
    let dead = w.work.path().join("dead.kubeconfig");
    let text = std::fs::read_to_string(&w.kube.kubeconfig).unwrap();
    let dead_url = format!("https://127.0.0.1:{}", free_port().unwrap());
    std::fs::write(&dead, text.replace(&w.kube.url, &dead_url)).unwrap();
    let w = Webhook::start_with(&[], w.kube, &dead);
    let (code, message) = denial(&w.admit(&pod(Some("true"), Some("demo/hub"))).await);
    assert_eq!(code, 500);
    assert!(message.contains("could not read Connector demo/hub"), "{message}");
}

/// Issue 12.8: with `--rbac` the webhook decides as the proxy in API mode does, by the
/// SubjectAccessReview for the pod's ServiceAccount (verb `get` on the connector, the pull the
/// rewritten images will make), not by the Connector's lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_mode_decides_by_the_proxys_subject_access_review() {
    let w = Webhook::start(&["--rbac"]);
    // demo/webhook-rbac may get private/harbor (whose lists do not admit demo), and nothing
    // else; shared/harbor's lists admit demo.
    w.kube
        .apply(&json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "use-harbor", "namespace": "private"},
             "rules": [{"apiGroups": ["connectors.alauda.io"], "resources": ["connectors"],
                        "resourceNames": ["harbor"], "verbs": ["get"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "webhook-rbac-uses-harbor", "namespace": "private"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "use-harbor"},
             "subjects": [{"kind": "ServiceAccount", "name": "webhook-rbac", "namespace": "demo"}]},
        ]}))
        .unwrap();
    let as_sa = |connector: &str| {
        let mut p = pod(Some("true"), Some(connector));
        p["spec"]["serviceAccountName"] = json!("webhook-rbac");
        p["spec"]["containers"][0]["image"] = json!("harbor.example.com:8443/team/web:1");
        p
    };
    let resp = w.admit(&as_sa("private/harbor")).await;
    assert_eq!(resp["allowed"], true, "granted by RBAC: {resp}");
    assert_eq!(resp["patchType"], "JSONPatch", "{resp}");

    let (code, message) = denial(&w.admit(&as_sa("shared/harbor")).await);
    assert_eq!(code, 403, "admitted by the lists, not by RBAC");
    assert!(
        message.contains(
            "system:serviceaccount:demo:webhook-rbac `get` on connectors.alauda.io \"harbor\" in namespace shared"
        ),
        "{message}"
    );

    // The question the API server got is the proxy's: the pod's ServiceAccount with its groups,
    // `get` on connectors.alauda.io connectors/<name> in the connector's namespace.
    let reviews = w.kube.access_reviews();
    let asked = reviews
        .iter()
        .find(|r| {
            r["user"] == "system:serviceaccount:demo:webhook-rbac" && r["resourceAttributes"]["namespace"] == "private"
        })
        .unwrap_or_else(|| panic!("no SubjectAccessReview for the pod's ServiceAccount: {reviews:?}"));
    assert_eq!(
        asked["resourceAttributes"],
        json!({"group": "connectors.alauda.io", "resource": "connectors", "verb": "get", "namespace": "private", "name": "harbor"}),
        "{asked}"
    );
    assert!(
        asked["groups"]
            .as_array()
            .unwrap()
            .contains(&json!("system:serviceaccounts:demo")),
        "{asked}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_without_the_label_pass_untouched_and_labelled_pods_need_the_annotation() {
    let w = Webhook::start(&[]);
    for p in [
        pod(None, None),
        pod(None, Some("demo/hub")),
        pod(Some("false"), Some("demo/hub")),
    ] {
        let resp = w.admit(&p).await;
        assert_eq!(resp["allowed"], true, "{resp}");
        assert!(resp["patch"].is_null(), "{resp}");
        assert!(resp["patchType"].is_null(), "{resp}");
    }
    let (code, message) = denial(&w.admit(&pod(Some("true"), None)).await);
    assert_eq!(code, 400);
    assert!(
        message.contains("has no annotation connectors.cpaas.io/connector"),
        "{message}"
    );
    assert!(message.contains("<namespace>/<connector name>"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_webhook_denies_opted_in_pods() {
    let w = Webhook::start(&["--disabled"]);
    let (code, message) = denial(&w.admit(&pod(Some("true"), Some("demo/hub"))).await);
    assert_eq!(code, 403);
    assert!(message.contains("turned off"), "{message}");
    assert!(
        message.contains("remove the label connectors.cpaas.io/proxy-inject"),
        "{message}"
    );
    let resp = w.admit(&pod(None, Some("demo/hub"))).await;
    assert_eq!(resp["allowed"], true, "{resp}");
    assert!(resp["patch"].is_null(), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified_and_bad_requests_are_refused() {
    let w = Webhook::start(&[]);
    let health = w.client.get(w.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");
    // A client that does not trust the test CA cannot talk to it.
    let untrusting = https_client(None);
    let err = untrusting.get(w.url("/healthz")).send().await;
    assert!(err.is_err(), "{err:?}");
    // Trusting the CA is what made the difference.
    assert!(
        https_client(Some(&w.ca_pem))
            .get(w.url("/healthz"))
            .send()
            .await
            .is_ok()
    );

    let resp = w
        .client
        .post(w.url("/mutate"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["response"]["allowed"], false);
}

/// The shipped `MutatingWebhookConfiguration` (deploy/base/webhook.yaml) with its service
/// reference replaced by this webhook's URL and the test CA as its caBundle.
fn register(w: &Webhook) {
    let file = connector_devkit::repo_root().join("deploy/base/webhook.yaml");
    let out = w
        .kube
        .kubectl(&["create", "--dry-run=client", "-o", "json", "-f", path(&file)])
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));
    // One JSON document per object, one after the other.
    let mut config = serde_json::Deserializer::from_str(&out.stdout)
        .into_iter::<Value>()
        .map(Result::unwrap)
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .expect("deploy/base/webhook.yaml has a MutatingWebhookConfiguration");
    config["webhooks"][0]["clientConfig"] = json!({
        "url": w.url("/mutate"),
        "caBundle": base64::engine::general_purpose::STANDARD.encode(&w.ca_pem),
    });
    w.kube.apply(&config).unwrap();
}

/// `kubectl create` of a Pod (no kubelet: it is admitted, stored and never run).
fn create_pod(kube: &KubeCluster, name: &str, labelled: bool, connector: &str, image: &str) -> Result<Value, String> {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "demo", "annotations": { ANNOTATION: connector } },
        "spec": { "containers": [{ "name": "app", "image": image }] },
    });
    if labelled {
        p["metadata"]["labels"] = json!({ LABEL: "true" });
    }
    let out = kube.kubectl_stdin(&["create", "-o", "json", "-f", "-"], Some(p.to_string().as_bytes()))?;
    if !out.success {
        return Err(out.stderr);
    }
    serde_json::from_str(&out.stdout).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_calls_the_registered_webhook_when_pods_are_created() {
    let w = Webhook::start(&[]);
    register(&w);
    let kube = w.kube;
    // The API server's webhook client may take a moment to see the new configuration.
    let mut admitted = Err(String::new());
    for _ in 0..40 {
        admitted = create_pod(kube, "web", true, "demo/hub", "nginx:1.27");
        match &admitted {
            Ok(p) if p["spec"]["containers"][0]["image"] != "nginx:1.27" => break,
            Ok(_) => {
                kube.kubectl(&["delete", "pod", "web", "-n", "demo", "--wait=false"])
                    .unwrap();
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let admitted = admitted.unwrap_or_else(|e| panic!("kubectl create of a labelled Pod: {e}"));
    assert_eq!(
        admitted["spec"]["containers"][0]["image"],
        format!("{PROXY}/namespaces/demo/connectors/hub/library/nginx:1.27"),
        "the API server stored the rewritten image"
    );
    let stored = kube.get("pod", "demo", "web").unwrap().unwrap();
    assert_eq!(
        stored["spec"]["containers"][0]["image"],
        admitted["spec"]["containers"][0]["image"]
    );
    assert!(
        stored["metadata"]["annotations"][ORIGINAL]
            .as_str()
            .unwrap()
            .contains("nginx:1.27")
    );
    assert!(w.log().contains("images rewritten"), "{}", w.log());

    // Unlabelled: the objectSelector keeps it away from the webhook; untouched.
    let plain = create_pod(kube, "plain", false, "demo/hub", "nginx:1.27").unwrap();
    assert_eq!(plain["spec"]["containers"][0]["image"], "nginx:1.27");
    assert!(plain["metadata"]["annotations"][ORIGINAL].is_null());

    // A connector the pod's namespace may not use: kubectl gets the webhook's message.
    let refused = create_pod(
        kube,
        "sneaky",
        true,
        "private/harbor",
        "harbor.example.com:8443/team/app:v1",
    )
    .expect_err("a Pod naming a connector it may not use was created");
    assert!(refused.contains("denied the request"), "{refused}");
    assert!(refused.contains("may not be used from namespace demo"), "{refused}");
    assert!(kube.get("pod", "demo", "sneaky").unwrap().is_none());

    // A Deployment: the real controller-manager's ReplicaSet controller creates its Pod, which
    // goes through the same webhook. The Deployment keeps the image its author wrote (what
    // `kubectl apply` shows and GitOps diffs against); the Pod runs the rewritten one.
    let _manager = kube.start_controller_manager().unwrap_or_else(|e| panic!("{e}"));
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": "shop", "namespace": "demo" },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": "shop" } },
            "template": {
                "metadata": { "labels": { "app": "shop", LABEL: "true" }, "annotations": { ANNOTATION: "demo/hub" } },
                "spec": { "containers": [{ "name": "app", "image": "nginx:1.27" }] },
            },
        },
    });
    let applied = kube.apply(&deployment).unwrap();
    assert_eq!(
        applied["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.27"
    );
    let mut pods = Value::Null;
    for _ in 0..120 {
        let out = kube
            .kubectl(&["get", "pods", "-n", "demo", "-l", "app=shop", "-o", "json"])
            .and_then(|o| o.ok())
            .unwrap();
        pods = serde_json::from_str(&out.stdout).unwrap();
        if pods["items"].as_array().is_some_and(|i| !i.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let pod = &pods["items"][0];
    assert!(pod.is_object(), "the ReplicaSet controller created no Pod in 30 s");
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "ReplicaSet");
    assert_eq!(
        pod["spec"]["containers"][0]["image"],
        format!("{PROXY}/namespaces/demo/connectors/hub/library/nginx:1.27"),
        "the Deployment's Pod was admitted with the rewritten image"
    );
}
