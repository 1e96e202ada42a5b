//! RBAC mode's access call (issue 10), on the real kube-apiserver: the controller's answer to the
//! filter's `/v1/access` question breaks off after its head. The request that asked gets a 503
//! naming the controller at once, the failure is not taken for a decision (the next request asks
//! again), a healthy connector keeps answering 200 on the same worker, and no `[critical]` line
//! appears. The break is made by `connector_e2e::breaker` relaying Envoy's channel calls to the
//! real controller and breaking only the access answers for one connector.

use std::time::{Duration, Instant};

use connector_devkit::WorkDir;
use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::http::Request;
use connector_devkit::kube::KubeCluster;
use connector_devkit::registry::Registry;
use connector_devkit::skopeo::Skopeo;
use connector_devkit::stack::seed_upstream;
use connector_e2e::breaker::{Answer, Breaker, Then, json_ok_head};
use connector_e2e::oci_error;
use serde_json::json;

const NS: &str = "demo";
const MANIFEST_TYPES: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

fn get(envoy: &Envoy, connector: &str, token: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let r = Request::get(&format!(
        "/v2/namespaces/{NS}/connectors/{connector}/library/app/manifests/v1"
    ))
    .header("Accept", MANIFEST_TYPES)
    .bearer(token)
    .send(envoy.port)
    .unwrap_or_else(|e| panic!("{connector}: no answer: {e}"));
    let message = if r.status == 200 {
        String::new()
    } else {
        oci_error(&r).1
    };
    (r.status, message, started.elapsed())
}

#[test]
fn an_access_answer_that_breaks_off_costs_only_its_request() {
    connector_devkit::require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new("broken-answers-rbac").unwrap();
    let skopeo = Skopeo::new(&work).unwrap();
    let registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    let (_sample, _recorder, _minter) =
        seed_upstream(&work, &skopeo, &registry, &creds.username, &creds.password).unwrap();
    let kube = KubeCluster::start("broken-answers-rbac-kube").unwrap_or_else(|e| panic!("{e}"));
    kube.install_crd().unwrap();
    kube.namespace(NS, &["builder"]).unwrap();
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "registry-robot", "namespace": NS,
            "annotations": {"connectors.alauda.io/allowed-connectors": "*"}},
        "type": "cpaas.io/distribution-registry-token",
        "stringData": {"username": creds.username, "password": creds.password},
    }))
    .unwrap();
    for name in ["healthy", "broken-access"] {
        kube.apply(&json!({
            "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"address": registry.url(), "auth": {"name": "basicAuth", "secretRef": {"name": "registry-robot"}}, "connectorClassName": "oci"},
        }))
        .unwrap();
    }
    let kubeconfig = kube.controller_kubeconfig().unwrap();
    kube.kubectl(&[
        "create",
        "rolebinding",
        "builder-uses-connectors",
        "-n",
        NS,
        "--clusterrole=oci-connector-user",
        "--serviceaccount=demo:builder",
    ])
    .unwrap();
    let controller = Controller::start_kube(&work, &kubeconfig, "https://127.0.0.1:8080", &[]).unwrap();
    let channel_port = controller.ports.channel;
    let relay = Breaker::start(move |_, path, _| {
        if path.starts_with(&format!("/v1/access/{NS}/broken-access")) {
            Answer::Broken(json_ok_head(), Then::Close)
        } else {
            Answer::Relay(channel_port)
        }
    });
    let envoy = Envoy::start_xds(&work, controller.ports.xds, relay.port, &controller.envoy_env()).unwrap();
    let token = kube.create_token(NS, "builder", "oci-connector", &[]).unwrap();

    let started = Instant::now();
    while get(&envoy, "healthy", &token).0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the healthy connector is never served"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for attempt in 1..=2 {
        let (status, message, took) = get(&envoy, "broken-access", &token);
        eprintln!("broken access answer, attempt {attempt}: {status} after {took:?}: {message}");
        assert_eq!(status, 503, "{message}");
        assert!(
            message.contains("controller") && message.contains("demo/broken-access"),
            "{message}"
        );
        assert!(took < Duration::from_secs(3), "took {took:?}");
        let (ok, message, _) = get(&envoy, "healthy", &token);
        assert_eq!(ok, 200, "the healthy connector after the broken answer: {message}");
    }
    let asked = relay
        .heads()
        .iter()
        .filter(|h| h.contains("/v1/access/demo/broken-access"))
        .count();
    assert_eq!(asked, 2, "each request asked again: a failed answer is not a decision");
    let critical = envoy.critical_wasm_lines();
    assert!(critical.is_empty(), "a trap of the filter's VM: {critical:?}");
}
