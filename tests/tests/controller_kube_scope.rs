//! Issue 12 item 9 on a real kube-apiserver: the blast radius of the edge pod's controller.
//! It runs with the RBAC of `deploy/namespaced` (a Role in its one namespace, `--namespace
//! demo`): its Connector gets Ready there, and it may not read Secrets of any other namespace.
//! It watches only the Secret types it reads, each once, by a field selector on `type` (read
//! back from the API server's audit log), so 5,000 Opaque Secrets created in its own namespace
//! leave its memory flat.

use std::time::{Duration, Instant};

use connector_devkit::WorkDir;
use connector_devkit::kube::{CONTROLLER_USER, KubeCluster};
use connector_devkit::registry::Registry;
use connector_e2e::xds::start_kube_stack;
use serde_json::{Value, json};

const NS: &str = "demo";
const DEADLINE: Duration = Duration::from_secs(30);
const UNRELATED: usize = 5000;
/// Each unrelated Secret's data: 5,000 of them hold 20 MB, which a cache of them could not hide.
const UNRELATED_BYTES: usize = 4096;

/// The controller's resident set, from `/proc`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn ready(kube: &KubeCluster, name: &str) -> Option<String> {
    let c = kube.get("connector", NS, name).ok()??;
    let found = c["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?
        .clone();
    Some(found["status"].as_str()?.to_string())
}

fn can_i(kube: &KubeCluster, args: &[&str]) -> String {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--as", CONTROLLER_USER]);
    kube.kubectl(&all).unwrap().stdout.trim().to_string()
}

#[test]
fn a_namespaced_controller_watches_only_its_secret_types_and_its_memory_stays_flat() {
    connector_devkit::require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new("controller-kube-scope").unwrap();
    let registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    let kube = KubeCluster::start("kube-scope").unwrap_or_else(|e| panic!("{e}"));
    kube.install_crd().unwrap();
    kube.namespace(NS, &[]).unwrap();
    kube.namespace("other", &[]).unwrap();
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "robot", "namespace": NS,
            "annotations": {"connectors.alauda.io/allowed-connectors": "registry"}},
        "type": "kubernetes.io/basic-auth",
        "stringData": {"username": creds.username, "password": creds.password},
    }))
    .unwrap();
    kube.apply(&json!({
        "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": "registry", "namespace": NS},
        "spec": {"address": registry.url(), "auth": {"name": "basicAuth", "secretRef": {"name": "robot"}}, "connectorClassName": "oci"},
    }))
    .unwrap();

    let kubeconfig = kube.controller_kubeconfig_for("namespaced").unwrap();
    // deploy/namespaced's RBAC: Secrets of its own namespace only.
    assert_eq!(can_i(&kube, &["list", "secrets", "-n", NS]), "yes");
    for (verb, ns) in [("list", "other"), ("get", "other"), ("list", "oci-connector-system")] {
        assert_eq!(
            can_i(&kube, &[verb, "secrets", "-n", ns]),
            "no",
            "{verb} secrets -n {ns}"
        );
    }
    assert_eq!(can_i(&kube, &["list", "secrets", "--all-namespaces"]), "no");

    let (controller, _envoy) = start_kube_stack(&work, &kubeconfig, "https://192.168.1.10:31567", &["--namespace", NS]);
    let start = Instant::now();
    while ready(&kube, "registry").as_deref() != Some("True") {
        assert!(
            start.elapsed() < DEADLINE,
            "demo/registry not Ready with deploy/namespaced's RBAC: {:?}\n{}",
            kube.get("connector", NS, "registry"),
            controller.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let pid = controller.pid().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let before = rss_kib(pid);

    // 5,000 Opaque Secrets in the controller's own namespace: four kubectl creates of one List
    // each, side by side.
    let created = Instant::now();
    let filler = "x".repeat(UNRELATED_BYTES);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let items: Vec<Value> = (w * UNRELATED / 4..(w + 1) * UNRELATED / 4)
                .map(|i| {
                    json!({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": format!("unrelated-{i}"), "namespace": NS},
                        "type": "Opaque", "stringData": {"blob": filler}})
                })
                .collect();
            let list = json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string();
            let kubeconfig = kube.kubectl(&["config", "view", "--raw"]).unwrap().stdout;
            let dir = work.sub(&format!("filler-{w}")).unwrap();
            std::fs::write(dir.join("kubeconfig"), kubeconfig).unwrap();
            std::fs::write(dir.join("list.json"), list).unwrap();
            std::thread::spawn(move || {
                let out = std::process::Command::new(connector_devkit::kube::binary("kubectl").unwrap())
                    .env("KUBECONFIG", dir.join("kubeconfig"))
                    .args(["create", "-o", "name", "-f"])
                    .arg(dir.join("list.json"))
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let took = created.elapsed();
    let listed = kube
        .kubectl(&["get", "secrets", "-n", NS, "-o", "name"])
        .unwrap()
        .stdout;
    assert!(listed.lines().count() > UNRELATED, "{} Secrets", listed.lines().count());
    std::thread::sleep(Duration::from_secs(5));
    let after = rss_kib(pid);
    eprintln!(
        "controller RSS {before} KiB before, {after} KiB after {UNRELATED} Opaque Secrets of {UNRELATED_BYTES} bytes (created in {took:.1?})"
    );
    // A cache of them would hold at least their 20 MB of data.
    assert!(after < before + 8 * 1024, "RSS grew from {before} KiB to {after} KiB");

    // The API server's record: every Secret list and watch the controller made was for one of
    // the three types it reads, each type watched by one watch at a time.
    let mut selectors = std::collections::BTreeMap::<String, usize>::new();
    for e in kube.audit() {
        if e["user"]["username"] != CONTROLLER_USER
            || e["objectRef"]["resource"] != "secrets"
            || e["stage"] != "ResponseComplete" && e["stage"] != "ResponseStarted"
        {
            continue;
        }
        let uri = e["requestURI"].as_str().unwrap_or_default().to_string();
        let verb = e["verb"].as_str().unwrap_or_default();
        if verb == "list" || verb == "watch" {
            let selector = uri
                .split(['?', '&'])
                .find_map(|p| p.strip_prefix("fieldSelector="))
                .unwrap_or_else(|| panic!("a Secret {verb} without a field selector: {uri}"))
                .replace("%3D", "=")
                .replace("%2F", "/");
            assert!(uri.starts_with(&format!("/api/v1/namespaces/{NS}/secrets")), "{uri}");
            if verb == "watch" && e["stage"] == "ResponseStarted" {
                *selectors.entry(selector).or_default() += 1;
            }
        }
    }
    eprintln!("Secret watches by field selector: {selectors:?}");
    let types: Vec<&str> = selectors.keys().map(String::as_str).collect();
    assert_eq!(
        types,
        [
            "type=cpaas.io/distribution-registry-token",
            "type=kubernetes.io/basic-auth",
            "type=kubernetes.io/dockerconfigjson",
        ]
    );
    assert!(
        selectors.values().all(|n| *n == 1),
        "each type watched once: {selectors:?}"
    );
    // Still serving: the Connector stays Ready.
    assert_eq!(ready(&kube, "registry").as_deref(), Some("True"));
    assert!(!controller.log().contains(&creds.password));
}
