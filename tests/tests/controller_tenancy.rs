//! Issue 12 items 5 and 7 in API mode, on a real kube-apiserver with the real controller binary
//! and a real Envoy: what a Connector author in one namespace can claim. A host name of another
//! namespace, a token realm's cluster and an address on the link-local metadata service are
//! refused on the claimant's own `ProxyReady` condition (and the controller's probes do not
//! contact the metadata address either); a newer Connector claiming a host another one holds is
//! left out while the older keeps serving.

use std::time::{Duration, Instant};

use connector_devkit::WorkDir;
use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::kube::KubeCluster;
use connector_devkit::registry::Registry;
use serde_json::{Value, json};

const PROXY_URL: &str = "http://192.168.1.10:31567";
const DEADLINE: Duration = Duration::from_secs(30);

fn connector(ns: &str, name: &str, address: &str, extra: Value) -> Value {
    let mut spec = json!({"address": address, "auth": {"name": "basicAuth", "secretRef": {"name": "robot"}}, "connectorClassName": "oci"});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    json!({
        "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

/// `ProxyReady` of a Connector: `(status, reason, message)`.
fn proxy_ready(kube: &KubeCluster, ns: &str, name: &str) -> Option<(String, String, String)> {
    let c = kube.get("connector", ns, name).ok()??;
    let found = c["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "ProxyReady")?
        .clone();
    Some((
        found["status"].as_str()?.to_string(),
        found["reason"].as_str().unwrap_or_default().to_string(),
        found["message"].as_str().unwrap_or_default().to_string(),
    ))
}

fn until_condition(kube: &KubeCluster, ns: &str, name: &str, status: &str) -> (String, String) {
    let start = Instant::now();
    loop {
        if let Some((s, reason, message)) = proxy_ready(kube, ns, name)
            && s == status
        {
            return (reason, message);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{ns}/{name}: ProxyReady not {status} within {DEADLINE:?}: {:?}",
            proxy_ready(kube, ns, name)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_tenant_claims_only_its_own_names_and_the_older_connector_keeps_a_contested_one() {
    connector_devkit::require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new("controller-tenancy").unwrap();
    let registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    let kube = KubeCluster::start("kube-tenancy").unwrap_or_else(|e| panic!("{e}"));
    kube.install_crd().unwrap();
    for ns in ["team-a", "team-b"] {
        kube.namespace(ns, &[]).unwrap();
        kube.apply(&json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "robot", "namespace": ns},
            "type": "kubernetes.io/basic-auth",
            "stringData": {"username": creds.username, "password": creds.password},
        }))
        .unwrap();
    }
    let host = "registry.team-a.svc.cluster.local";
    // The victim first; a second later (creation times have whole seconds) the rest.
    kube.apply(&connector(
        "team-a",
        "victim",
        &registry.url(),
        json!({"hosts": [host]}),
    ))
    .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    kube.apply(&connector("team-a", "late", &registry.url(), json!({"hosts": [host]})))
        .unwrap();
    kube.apply(&connector("team-b", "thief", &registry.url(), json!({"hosts": [host]})))
        .unwrap();
    kube.apply(&connector(
        "team-b",
        "realm",
        &registry.url(),
        json!({"tokenRealms": [{"url": "https://auth.example.com/token", "cluster": "connector_controller"}]}),
    ))
    .unwrap();
    kube.apply(&connector("team-b", "metadata", "http://169.254.169.254", json!({})))
        .unwrap();
    kube.apply(&connector("team-b", "fine", &registry.url(), json!({})))
        .unwrap();

    let kubeconfig = kube.controller_kubeconfig().unwrap();
    let controller = Controller::start_kube(&work, &kubeconfig, PROXY_URL, &["--reprobe-seconds", "2"])
        .unwrap_or_else(|e| panic!("{e}"));
    // ProxyReady True needs Envoy's ACK of a configuration carrying the connector.
    let _envoy = Envoy::start_xds(
        &work,
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )
    .unwrap();

    for (ns, name) in [("team-a", "victim"), ("team-b", "fine")] {
        let (reason, message) = until_condition(&kube, ns, name, "True");
        eprintln!("{ns}/{name}: ProxyReady True {reason}: {message}");
    }
    for (ns, name, why) in [
        ("team-a", "late", "already used by another connector"),
        ("team-b", "thief", "outside namespace team-b's own names"),
        ("team-b", "realm", "spec.tokenRealms[0].cluster"),
        ("team-b", "metadata", "link-local"),
    ] {
        let (reason, message) = until_condition(&kube, ns, name, "False");
        eprintln!("{ns}/{name}: ProxyReady False {reason}: {message}");
        assert_eq!(reason, "NotConfigured", "{ns}/{name}: {message}");
        assert!(message.contains(why), "{ns}/{name}: {message}");
    }

    // The controller's own probes do not go where the proxy may not: the metadata address is
    // never contacted (a connection attempt would end as UpstreamUnreachable after 5 s).
    let start = Instant::now();
    let liveness = loop {
        let c = kube.get("connector", "team-b", "metadata").ok().flatten();
        let found = c.as_ref().and_then(|c| {
            c["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "LivenessReady")
                .cloned()
        });
        if let Some(f) = found {
            break f;
        }
        assert!(start.elapsed() < DEADLINE, "no LivenessReady on team-b/metadata");
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("team-b/metadata LivenessReady: {liveness}");
    assert_eq!(liveness["status"], "False", "{liveness}");
    assert_eq!(liveness["reason"], "UpstreamNotAllowed", "{liveness}");
    let log = controller.log();
    assert!(!log.contains(&creds.password), "no password in the controller's log");
}
