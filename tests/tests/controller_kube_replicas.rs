//! Two proxy replicas (controller + Envoy each, as `deploy/` runs with `replicas: 2`) against one
//! real kube-apiserver, electing through a `coordination.k8s.io` Lease
//! (`--leader-lease oci-connector-system/connector-controller`) the one replica that writes
//! status and Events. Both serve their own Envoy. The leader stopped with SIGTERM hands the Lease
//! back and the other takes it at once; its controller restarts; then the new leader is SIGKILLed
//! and the restarted one takes the Lease within its duration (+ at most 1 s of the lease crate's
//! back-off) and keeps status up to date (a Connector applied after the kill gets its
//! conditions); pulls through both replicas never fail meanwhile; `ProxyReady` never flaps.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use connector_devkit::WorkDir;
use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::http::Request;
use connector_devkit::kube::KubeCluster;
use connector_devkit::registry::Registry;
use connector_devkit::skopeo::Skopeo;
use connector_devkit::stack::seed_upstream;
use serde_json::{Value, json};

const NS: &str = "demo";
const LEASE: &str = "oci-connector-system/connector-controller";
const LEASE_SECONDS: u64 = 4;

fn connector(name: &str, address: &str) -> Value {
    json!({
        "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"address": address, "auth": {"name": "basicAuth", "secretRef": {"name": "registry-robot"}}, "connectorClassName": "oci"},
    })
}

fn manifest_status(port: u16, token: &str) -> u16 {
    Request::get(&format!(
        "/v2/namespaces/{NS}/connectors/registry/library/app/manifests/v1"
    ))
    .header("Accept", "application/vnd.oci.image.manifest.v1+json")
    .bearer(token)
    .send(port)
    .map(|r| r.status)
    .unwrap_or(0)
}

fn condition(kube: &KubeCluster, name: &str, type_: &str) -> Option<String> {
    let c = kube.get("connector", NS, name).ok()??;
    c["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(str::to_string))
}

/// `status/reason` of a condition.
fn condition_reason(kube: &KubeCluster, name: &str, type_: &str) -> Option<String> {
    let c = kube.get("connector", NS, name).ok()??;
    let found = c["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?
        .clone();
    Some(format!("{}/{}", found["status"].as_str()?, found["reason"].as_str()?))
}

/// The pid in the Lease's holder identity (`<hostname>-<pid>` without `POD_NAME`).
fn holder_pid(kube: &KubeCluster) -> Option<u32> {
    let (ns, name) = LEASE.split_once('/')?;
    let lease = kube.get("lease", ns, name).ok()??;
    lease["spec"]["holderIdentity"]
        .as_str()?
        .rsplit('-')
        .next()?
        .parse()
        .ok()
}

fn until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_replicas_one_lease_holder_writes_status_and_pulls_survive_the_leaders_death() {
    connector_devkit::require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new("kube-replicas").unwrap();
    let skopeo = Skopeo::new(&work).unwrap();
    let registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    seed_upstream(&work, &skopeo, &registry, &creds.username, &creds.password).unwrap();

    let kube = KubeCluster::start("kube-replicas-api").unwrap_or_else(|e| panic!("{e}"));
    kube.install_crd().unwrap();
    kube.namespace(NS, &[]).unwrap();
    let kubeconfig = kube.controller_kubeconfig().unwrap();
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "registry-robot", "namespace": NS,
            "annotations": {"connectors.alauda.io/allowed-connectors": "*"}},
        "type": "cpaas.io/distribution-registry-token",
        "stringData": {"username": creds.username, "password": creds.password},
    }))
    .unwrap();
    kube.apply(&connector("registry", &registry.url())).unwrap();
    kube.kubectl(&[
        "create",
        "rolebinding",
        "use",
        "-n",
        NS,
        "--clusterrole=oci-connector-user",
        "--group=system:serviceaccounts:demo",
    ])
    .and_then(|o| o.ok())
    .unwrap();

    let lease_seconds = LEASE_SECONDS.to_string();
    let args = [
        "--leader-lease",
        LEASE,
        "--leader-lease-seconds",
        lease_seconds.as_str(),
        "--reprobe-seconds",
        "2",
        // The killed leader's Envoy keeps serving on the access answers it holds, which its
        // dead controller cannot renew: they must outlast the rest of the test (about 10 s).
        // The default 5 s trades that for revoking a deleted ServiceAccount's tokens sooner
        // (README "Revocation").
        "--revocation-seconds",
        "30",
    ];
    let proxy_url = "https://192.168.1.10:31567";
    let mut replicas: Vec<Option<Controller>> = vec![];
    let mut envoys = vec![];
    for i in 0..2 {
        let work_i = WorkDir::new(&format!("kube-replica-{i}")).unwrap();
        let c = Controller::start_kube(&work_i, &kubeconfig, proxy_url, &args).unwrap_or_else(|e| panic!("{e}"));
        let e = Envoy::start_xds(&work_i, c.ports.xds, c.ports.channel, &c.envoy_env()).unwrap();
        replicas.push(Some(c));
        envoys.push((e, work_i));
    }
    let token = kube.create_token(NS, "default", "oci-connector", &[]).unwrap();
    for (e, _) in &envoys {
        until("each replica's Envoy serves", Duration::from_secs(20), || {
            (manifest_status(e.port, &token) == 200).then_some(())
        });
    }
    until("Ready=True", Duration::from_secs(30), || {
        (condition(&kube, "registry", "Ready").as_deref() == Some("True")).then_some(())
    });

    // Exactly one replica holds the Lease and writes; the other only serves its Envoy.
    let (leader_pid, _) = until("a Lease holder", Duration::from_secs(20), || holder_pid(&kube));
    let leader = replicas
        .iter()
        .position(|c| c.as_ref().and_then(Controller::pid) == Some(leader_pid))
        .expect("the Lease holder is one of the two replicas");
    let follower = 1 - leader;
    let log = |replicas: &[Option<Controller>], i: usize| replicas[i].as_ref().map(Controller::log).unwrap_or_default();
    assert!(
        log(&replicas, leader).contains("holding the Lease"),
        "{}",
        log(&replicas, leader)
    );
    assert!(!log(&replicas, follower).contains("holding the Lease"));
    assert!(log(&replicas, leader).contains("condition changed"));
    assert!(
        !log(&replicas, follower).contains("condition changed"),
        "the follower wrote status"
    );

    // Pulls through both replicas and ProxyReady, watched continuously from here on.
    let stop = Arc::new(AtomicBool::new(false));
    let (requests, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let pullers: Vec<_> = envoys
        .iter()
        .map(|(e, _)| {
            let (port, token, stop) = (e.port, token.clone(), stop.clone());
            let (requests, failures) = (requests.clone(), failures.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let code = manifest_status(port, &token);
                    requests.fetch_add(1, Ordering::Relaxed);
                    if code != 200 {
                        failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("pull through :{port} answered {code}");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    // ProxyReady of `registry` as the API server shows it: during the takeover (no configuration
    // change), while a new Connector is added (a new configuration), and after.
    let (mut during_takeover, mut during_change, mut after) = (vec![], vec![], vec![]);

    // 1. The leader is stopped as Kubernetes stops a pod (SIGTERM): it hands the Lease back,
    // and the follower takes it at once rather than after the Lease's duration.
    let leader_ports = replicas[leader]
        .as_ref()
        .map(|c| (c.ports, c.key().to_string()))
        .unwrap();
    let status = replicas[leader]
        .take()
        .and_then(|c| c.terminate(Duration::from_secs(10)));
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM: the leader exits cleanly: {status:?}"
    );
    let (_, took) = until(
        "the follower takes the handed-back Lease",
        Duration::from_secs(3 * LEASE_SECONDS + 5),
        || {
            during_takeover.push(condition_reason(&kube, "registry", "ProxyReady"));
            (holder_pid(&kube) == replicas[follower].as_ref().and_then(Controller::pid)).then_some(())
        },
    );
    eprintln!("Lease taken over {took:?} after the leader was stopped with SIGTERM (duration {LEASE_SECONDS} s)");
    assert!(
        took < Duration::from_secs(LEASE_SECONDS),
        "a handed-back Lease is taken within its duration: {took:?}"
    );
    // The stopped replica's pod restarts its controller beside the same Envoy: now the follower.
    let (ports, key) = leader_ports;
    replicas[leader] = Some(
        Controller::restart_kube(
            &envoys[leader].1,
            "controller-restarted",
            &kubeconfig,
            proxy_url,
            (ports, &key),
            &args,
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let (leader, follower) = (follower, leader);

    // 2. The new leader dies without a goodbye (SIGKILL: a crash, an OOM kill). The Lease must
    // expire first: the follower takes it within its duration plus kube-lease-manager's random
    // 0.1-1 s back-off before a forced take-over (the bound the README states).
    let killed_at = Instant::now();
    if let Some(c) = replicas[leader].take() {
        c.kill();
    }
    let (_, took) = until(
        "the follower takes the Lease",
        Duration::from_secs(3 * LEASE_SECONDS + 5),
        || {
            during_takeover.push(condition_reason(&kube, "registry", "ProxyReady"));
            (holder_pid(&kube) == replicas[follower].as_ref().and_then(Controller::pid)).then_some(())
        },
    );
    eprintln!("Lease taken over {took:?} after the leader was killed (duration {LEASE_SECONDS} s)");
    assert!(
        took < Duration::from_millis(LEASE_SECONDS * 1000 + 1500),
        "a crashed leader's Lease is taken within its duration + 1 s back-off (+0.5 s polling): {took:?}"
    );
    // Status keeps being written: a Connector applied now gets its conditions from the new leader.
    kube.apply(&connector("mirror", &registry.url())).unwrap();
    let (_, took) = until("the new Connector's status", Duration::from_secs(30), || {
        during_change.push(condition_reason(&kube, "registry", "ProxyReady"));
        (condition(&kube, "mirror", "Ready").as_deref() == Some("True")).then_some(())
    });
    eprintln!(
        "a Connector applied after the takeover was Ready in {took:?} ({:?} after the kill)",
        killed_at.elapsed()
    );
    assert!(log(&replicas, follower).contains("holding the Lease"));
    for _ in 0..10 {
        after.push(condition_reason(&kube, "registry", "ProxyReady"));
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for p in pullers {
        p.join().unwrap();
    }
    let (n, failed) = (requests.load(Ordering::Relaxed), failures.load(Ordering::Relaxed));
    eprintln!("pulls through both replicas during the takeover: {n}, failed {failed}");
    assert!(n > 50, "the pull loops ran: {n}");
    assert_eq!(failed, 0, "pulls failed while the leader changed");
    let accepted = |seen: &[Option<String>]| seen.iter().all(|s| s.as_deref() == Some("True/Accepted"));
    assert!(
        accepted(&during_takeover),
        "ProxyReady changed with the leader: {during_takeover:?}"
    );
    assert!(accepted(&after), "ProxyReady after the takeover: {after:?}");
    // A new configuration (the added Connector) may show `Pending` for every connector until
    // Envoy acknowledges it: that is one replica's own view, not a flap between replicas.
    assert!(
        during_change
            .iter()
            .all(|s| matches!(s.as_deref(), Some("True/Accepted" | "False/Pending"))),
        "ProxyReady while a Connector was added: {during_change:?}"
    );
    let pending = during_change
        .iter()
        .filter(|s| s.as_deref() == Some("False/Pending"))
        .count();
    eprintln!(
        "ProxyReady samples: takeover {} (all Accepted), while adding a Connector {} ({pending} Pending), after {}",
        during_takeover.len(),
        during_change.len(),
        after.len()
    );
}
