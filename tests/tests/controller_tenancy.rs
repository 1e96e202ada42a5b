//! Issue 12 items 5 and 7 in API mode, on a real kube-apiserver with the real controller binary
//! and a real Envoy: what a Connector author in one namespace can claim. A host name of another
//! namespace, a token realm's cluster and an address on the link-local metadata service are
//! refused on the claimant's own `ProxyReady` condition (and the controller's probes do not
//! contact the metadata address either); a newer Connector claiming a host another one holds is
//! left out while the older keeps serving. A Connector whose address is a host name resolving to
//! the proxy pod's own port is `LivenessReady=False UpstreamNotAllowed`, saying so.
//!
//! Item 6: a Connector may use only a Secret that names it in the annotation
//! `connectors.alauda.io/allowed-connectors`. A Connector in team-b pointing `secretRef` at an
//! un-annotated Secret and `address` at a recording relay gets `SecretReady=False
//! SecretNotAllowed` (and `Ready=False`) with the `kubectl annotate` that fixes it, the relay
//! never sees the credential and the channel hands it to nobody; once the Secret's owner
//! annotates it, the same Connector logs in through the relay (so the relay would have seen it).

use std::time::{Duration, Instant};

use connector_devkit::WorkDir;
use connector_devkit::http::{Request, basic_value};
use connector_devkit::kube::KubeCluster;
use connector_devkit::recorder::Recorder;
use connector_devkit::registry::Registry;
use connector_e2e::xds::start_kube_stack;
use serde_json::{Value, json};

const PROXY_URL: &str = "https://192.168.1.10:31567";
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

/// A condition of a Connector: `(status, reason, message)`.
fn condition(kube: &KubeCluster, ns: &str, name: &str, type_: &str) -> Option<(String, String, String)> {
    let c = kube.get("connector", ns, name).ok()??;
    let found = c["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?
        .clone();
    Some((
        found["status"].as_str()?.to_string(),
        found["reason"].as_str().unwrap_or_default().to_string(),
        found["message"].as_str().unwrap_or_default().to_string(),
    ))
}

fn until_condition(kube: &KubeCluster, ns: &str, name: &str, status: &str) -> (String, String) {
    until(kube, ns, name, "ProxyReady", status)
}

/// Waits until condition `type_` of a Connector has `status`: `(reason, message)`.
fn until(kube: &KubeCluster, ns: &str, name: &str, type_: &str, status: &str) -> (String, String) {
    let start = Instant::now();
    loop {
        if let Some((s, reason, message)) = condition(kube, ns, name, type_)
            && s == status
        {
            return (reason, message);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{ns}/{name}: {type_} not {status} within {DEADLINE:?}: {:?}",
            condition(kube, ns, name, type_)
        );
        std::thread::sleep(Duration::from_millis(100));
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
            "metadata": {"name": "robot", "namespace": ns,
                "annotations": {"connectors.alauda.io/allowed-connectors": "*"}},
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
    // Item 6: team-a's robot account in a Secret that opts in to no Connector, and a Connector
    // of team-a aimed at a relay that records what it is sent.
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "private", "namespace": "team-a"},
        "type": "cpaas.io/distribution-registry-token",
        "stringData": {"username": creds.username, "password": creds.password},
    }))
    .unwrap();
    let relay = Recorder::start(registry.port).unwrap();
    let mut borrower = connector("team-a", "borrower", &relay.url(), json!({}));
    borrower["spec"]["auth"]["secretRef"]["name"] = json!("private");
    kube.apply(&borrower).unwrap();

    let kubeconfig = kube.controller_kubeconfig().unwrap();
    // ProxyReady True needs Envoy's ACK of a configuration carrying the connector.
    let (controller, envoy) = start_kube_stack(&work, &kubeconfig, PROXY_URL, &["--reprobe-seconds", "2"]);

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

    // A host *name* is screened by what it resolves to: one `/etc/hosts` maps to 127.0.0.1 (as
    // a tenant's own DNS could), on the controller's ops port. Its probe is refused with why
    // (the literal would be refused at render; the name passes there), before any connection.
    connector_devkit::stack::check_host_form_resolves("demo", "other").unwrap_or_else(|e| panic!("{e}"));
    let rebound_host = connector_devkit::stack::host_name("demo", "other");
    let rebound = format!("http://{rebound_host}:{}", controller.ports.ops);
    kube.apply(&connector("team-b", "rebound", &rebound, json!({})))
        .unwrap();
    let (reason, message) = until(&kube, "team-b", "rebound", "LivenessReady", "False");
    eprintln!("team-b/rebound: LivenessReady False {reason}: {message}");
    assert_eq!(reason, "UpstreamNotAllowed", "{message}");
    assert!(
        message.contains(&format!("{rebound_host} resolves only to refused addresses"))
            && message.contains("one of the proxy pod's own ports"),
        "{message}"
    );
    let (reason, _) = until(&kube, "team-b", "rebound", "Ready", "False");
    eprintln!("team-b/rebound: Ready False {reason}");

    // Item 6: the un-annotated Secret is refused on the borrower's conditions, with the fix.
    let (reason, message) = until(&kube, "team-a", "borrower", "SecretReady", "False");
    eprintln!("team-a/borrower: SecretReady False {reason}: {message}");
    assert_eq!(reason, "SecretNotAllowed", "{message}");
    assert!(
        message.contains(
            "kubectl annotate secret -n team-a private --overwrite connectors.alauda.io/allowed-connectors=borrower"
        ),
        "{message}"
    );
    let (reason, _) = until(&kube, "team-a", "borrower", "Ready", "False");
    assert_eq!(reason, "SecretNotAllowed");
    let (reason, _) = until(&kube, "team-a", "borrower", "ProxyReady", "False");
    assert_eq!(reason, "NotConfigured");
    // Let a few reprobe periods (2 s) pass: the probes reach the relay, the credential does not.
    std::thread::sleep(Duration::from_secs(5));
    let basic = basic_value(&creds.username, &creds.password);
    let seen = relay.snapshot();
    eprintln!("relay before the opt-in: {:?}", seen.request_lines());
    assert!(
        seen.requests > 0,
        "the liveness probe went to the relay: the check below means something"
    );
    assert!(seen.authorizations().is_empty(), "{:?}", seen.authorizations());
    assert!(!seen.text.contains(&creds.password) && !seen.text.contains(&basic));
    // Nor does the channel hand it to anyone holding the channel key (what Envoy would ask).
    let answer = Request::get("/v1/credentials/team-a/borrower")
        .bearer(controller.key())
        .send(controller.ports.channel)
        .unwrap();
    assert_ne!(answer.status, 200, "{}", answer.summary());
    assert!(!answer.body_text().contains(&basic), "{}", answer.summary());

    // Item 7: a credential answer is bound to the revision Envoy's configuration names for
    // the connector (read from its config dump): none or another gets 409, no credential.
    let dump = envoy.config_dump().unwrap();
    let at = dump
        .find("fromController")
        .expect("a controller-held credential in the dump");
    let revision: String = dump[at..]
        .split(':')
        .nth(1)
        .unwrap_or_default()
        .trim_matches(|c: char| !c.is_ascii_hexdigit())
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    assert_eq!(revision.len(), 16, "{}", &dump[at..at + 60]);
    let fine = "/v1/credentials/team-b/fine";
    let ask = |path: &str| {
        Request::get(path)
            .bearer(controller.key())
            .send(controller.ports.channel)
            .unwrap()
    };
    let mut answered = vec![];
    for q in [
        "".to_string(),
        "?revision=0000000000000000".to_string(),
        format!("?revision={revision}"),
    ] {
        let r = ask(&format!("{fine}{q}"));
        answered.push((q, r.status));
        if r.status == 200 {
            assert_eq!(r.json().unwrap()["revision"], revision.as_str(), "{}", r.summary());
        } else {
            assert_eq!(r.status, 409, "{}", r.summary());
            assert!(!r.body_text().contains(&basic), "{}", r.summary());
        }
    }
    eprintln!("credential answers by revision asked: {answered:?}");
    // The connectors here share one robot account, so one revision (a keyed digest of the
    // credential) is every configured connector's, team-b/fine's included.
    assert_eq!(
        answered.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        [409, 409, 200],
        "{answered:?}"
    );

    // The Secret's owner opts in: the same Connector logs in through the relay.
    let annotated = Instant::now();
    kube.kubectl(&[
        "annotate",
        "secret",
        "-n",
        "team-a",
        "private",
        "connectors.alauda.io/allowed-connectors=borrower",
    ])
    .unwrap()
    .ok()
    .unwrap();
    until(&kube, "team-a", "borrower", "AuthReady", "True");
    until(&kube, "team-a", "borrower", "Ready", "True");
    eprintln!("team-a/borrower Ready {:?} after the annotation", annotated.elapsed());
    let seen = relay.snapshot();
    assert!(
        seen.authorizations().iter().any(|a| a.contains(&basic)),
        "after the opt-in the login carries the credential: {:?}",
        seen.request_lines()
    );

    let log = controller.log();
    assert!(!log.contains(&creds.password), "no password in the controller's log");
}
