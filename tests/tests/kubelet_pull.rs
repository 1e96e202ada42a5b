//! The node path with no pull secret anywhere: a real kubelet (v1.37.2, containerd's CRI, runc)
//! registered with a real kube-apiserver runs a Pod whose image names the connector proxy. The
//! kubelet asks `connector-credential-provider` for credentials, giving it a ServiceAccount
//! token it minted for the Pod (KEP-4412 `tokenAttributes`, audience `oci-connector`); containerd
//! pulls through Envoy + the filter, which checks that token and the namespace's RoleBinding and
//! pulls from the registry with the connector's robot account. The Pod runs. A Pod in a namespace
//! without the binding, same image, same node, is refused (ErrImagePull), even though the
//! image's layers are already on the node.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use connector_devkit::WorkDir;
use connector_devkit::kube::KubeCluster;
use connector_devkit::kubelet::{self, Node};
use connector_devkit::registry::Registry;
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_e2e::xds::start_kube_stack;
use serde_json::{Value, json};

/// The kubelet's plugin directory: `connector-credential-provider` is a two-line wrapper that
/// keeps each request the kubelet sends (to check the token in it) and runs the real binary.
fn provider_bin_dir(work: &WorkDir) -> (PathBuf, PathBuf) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| connector_devkit::repo_root().join("target"));
    let real = target.join("debug/connector-credential-provider");
    assert!(
        real.is_file(),
        "`cargo build -p connector-credential-provider` first (make e2e does)"
    );
    let dir = work.sub("provider").unwrap();
    let requests = dir.join("requests.jsonl");
    let wrapper = dir.join("connector-credential-provider");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nin=$(cat); printf '%s\\n' \"$in\" >> {}\nprintf '%s' \"$in\" | exec {} \"$@\"\n",
            requests.display(),
            real.display()
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&wrapper).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&wrapper, perms).unwrap();
    (dir, requests)
}

/// The claims of a JWT (unverified: the proxy verified it; this only reads whom it names).
fn claims(jwt: &str) -> Value {
    use base64::Engine;
    let payload = jwt.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

fn pod(ns: &str, name: &str, image: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            // No scheduler runs: the Pod is bound to the node directly. Host network: no CNI here.
            "nodeName": kubelet::NODE,
            "hostNetwork": true,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 0,
            // Always: a second Pod must be authorised for the image, not served from the node's cache.
            "containers": [{"name": "app", "image": image, "imagePullPolicy": "Always"}],
        },
    })
}

/// `(phase, waiting reason, imageID)` of a Pod's first container.
fn pod_state(kube: &KubeCluster, ns: &str, name: &str) -> (String, String, String) {
    let p = kube.get("pod", ns, name).ok().flatten().unwrap_or(Value::Null);
    let c = &p["status"]["containerStatuses"][0];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&p["status"]["phase"]),
        s(&c["state"]["waiting"]["reason"]),
        s(&c["imageID"]),
    )
}

#[test]
fn a_real_kubelet_pulls_through_the_proxy_with_the_pods_own_token_and_no_pull_secret() {
    connector_devkit::require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new("kubelet-pull").unwrap();
    let skopeo = Skopeo::new(&work).unwrap();
    let registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    // A runnable image (a static `pause`), pushed straight to the registry with the robot account.
    let layout = kubelet::pause_layout(&work.sub("app").unwrap(), "v1").unwrap();
    skopeo
        .copy(
            &format!("oci:{}:v1", layout.display()),
            Creds::None,
            &format!("docker://{}/library/app:v1", registry.authority()),
            Creds::Basic(&creds.username, &creds.password),
        )
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));

    let kube = KubeCluster::start("kubelet-pull-api").unwrap_or_else(|e| panic!("{e}"));
    kube.install_crd().unwrap();
    kube.namespace("demo", &[]).unwrap();
    kube.namespace("other", &[]).unwrap();
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "registry-robot", "namespace": "demo", "annotations": {"connectors.alauda.io/allowed-connectors": "registry"}},
        "type": "cpaas.io/distribution-registry-token",
        "stringData": {"username": creds.username, "password": creds.password},
    }))
    .unwrap();
    kube.apply(&json!({
        "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": "registry", "namespace": "demo"},
        "spec": {"address": registry.url(), "auth": {"name": "basicAuth", "secretRef": {"name": "registry-robot"}}, "connectorClassName": "oci"},
    }))
    .unwrap();
    // demo's ServiceAccounts may pull through demo/registry; other's may not.
    kube.kubectl(&[
        "create",
        "rolebinding",
        "use",
        "-n",
        "demo",
        "--clusterrole=oci-connector-user",
        "--group=system:serviceaccounts:demo",
    ])
    .and_then(|o| o.ok())
    .unwrap();

    // The nodes may mint tokens for the proxy's audience: the RBAC docs/credential-provider.md ships.
    let node_rbac = connector_devkit::repo_root().join("credential-provider/examples/node-rbac.yaml");
    kube.kubectl(&["apply", "-f", &node_rbac.display().to_string()])
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));
    let kubeconfig = kube.controller_kubeconfig().unwrap();
    let (controller, envoy) = start_kube_stack(&work, &kubeconfig, "https://127.0.0.1:1", &[]);
    let proxy = format!("127.0.0.1:{}", envoy.port);

    // The node's configuration: containerd reaches the proxy over TLS, the kubelet asks the
    // provider about images on it, with a token for the Pod.
    let provider_config = work.path().join("credential-provider.yaml");
    std::fs::write(
        &provider_config,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n\
             - name: connector-credential-provider\n  matchImages: [\"{proxy}\"]\n\
             \x20 defaultCacheDuration: 1m\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n\
             \x20 args: [\"--proxy={proxy}\"]\n\
             \x20 tokenAttributes: {{serviceAccountTokenAudience: oci-connector, cacheType: Token, requireServiceAccount: true}}\n"
        ),
    )
    .unwrap();
    // containerd verifies the proxy's certificate against the proxy's CA (no insecure setting).
    let ca = controller
        .proxy_cert
        .as_ref()
        .expect("the harness made the proxy's certificate")
        .ca
        .clone();
    let hosts = format!(
        "server = \"https://{proxy}\"\n[host.\"https://{proxy}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
        ca.display()
    );
    let t0 = Instant::now();
    let (bin_dir, requests) = provider_bin_dir(&work);
    let node = Node::start(&work, &kube, &[(proxy.as_str(), hosts)], &provider_config, &bin_dir)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("containerd (CRI) + kubelet: Node registered in {:?}", t0.elapsed());

    let image = format!("{proxy}/namespaces/demo/connectors/registry/library/app:v1");
    kube.apply(&pod("demo", "app", &image)).unwrap();
    let t0 = Instant::now();
    let mut state = Default::default();
    while t0.elapsed() < Duration::from_secs(120) {
        state = pod_state(&kube, "demo", "app");
        if state.0 == "Running" {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (phase, waiting, image_id) = state;
    assert_eq!(
        phase,
        "Running",
        "the Pod did not run (waiting: {waiting}); kubelet log:\n{}",
        connector_devkit::procs::log_tail(&node.dir().join("kubelet.log"), 40)
    );
    eprintln!(
        "Pod demo/app Running {:?} after it was created ({image_id})",
        t0.elapsed()
    );
    assert!(image_id.contains("@sha256:"), "{image_id}");
    let stored = kube.get("pod", "demo", "app").unwrap().unwrap();
    assert!(
        stored["spec"]["imagePullSecrets"].is_null(),
        "no pull secret was involved"
    );
    assert!(
        node.images().unwrap().iter().any(|i| i == &image),
        "{:?}",
        node.images()
    );
    // The kubelet asked the provider with a token it minted for this very Pod.
    let asked: Vec<Value> = std::fs::read_to_string(&requests)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let first = asked
        .first()
        .unwrap_or_else(|| panic!("the kubelet never ran the provider"));
    // The kubelet names the repository, without the tag.
    assert_eq!(first["image"], image.trim_end_matches(":v1"));
    let token = claims(first["serviceAccountToken"].as_str().unwrap_or_default());
    assert_eq!(token["sub"], "system:serviceaccount:demo:default", "{token}");
    assert_eq!(token["aud"][0], "oci-connector", "{token}");
    assert_eq!(
        token["kubernetes.io"]["pod"]["name"], "app",
        "a token bound to the Pod: {token}"
    );

    // Another namespace, same image, same node, already holding its layers: refused.
    kube.apply(&pod("other", "intruder", &image)).unwrap();
    let t0 = Instant::now();
    let mut state = Default::default();
    while t0.elapsed() < Duration::from_secs(60) {
        state = pod_state(&kube, "other", "intruder");
        if matches!(state.1.as_str(), "ErrImagePull" | "ImagePullBackOff") || state.0 == "Running" {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_ne!(state.0, "Running", "a namespace without a RoleBinding ran the image");
    assert!(
        matches!(state.1.as_str(), "ErrImagePull" | "ImagePullBackOff"),
        "the intruder's pull was not refused: {state:?}"
    );
    let log = node.kubelet_log();
    assert!(
        log.contains("403"),
        "the refusal reached the kubelet as the proxy's 403"
    );
    // The robot's password never reached the node.
    assert!(!log.contains(&creds.password) && !node.containerd_log().contains(&creds.password));
}
