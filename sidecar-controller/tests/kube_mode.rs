//! API mode against a real kube-apiserver (one per test, [`KubeCluster`], with the Connector CRD
//! installed), reached with a real `kube::Client` authenticated as the controller's
//! ServiceAccount with the RBAC of `deploy/base`, and real registries (CNCF Distribution with
//! htpasswd, and with token auth) for the probes. What reached the API server is read from its
//! audit log.
//!
//! The xDS side is played by the test: when Inputs arrive it publishes what the pipeline
//! would have rendered and sets Envoy's ACK (or NACK) state, exactly through the hub the real
//! xDS server writes to (the real path is tested end to end elsewhere).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_controller::authz::{Authorizer, AuthzSettings, service_account_groups};
use connector_controller::channel::AccessCheck;
use connector_controller::cluster_identity::{self, IdentitySettings};
use connector_controller::hub::{Authorization, Hub, Inputs, Published};
use connector_controller::kube_mode::{self, KubeSettings};
use connector_controller::manifests::Problem;
use connector_controller::ops::{Metrics, ResultLabel};
use connector_controller::secrets::credential_from_secret;
use connector_core::verb::Verb;
use connector_devkit::WorkDir;
use connector_devkit::kube::KubeCluster;
use connector_devkit::registry::{Credentials, Registry};
use connector_devkit::token_server::TokenServer;
use serde_json::{Value, json};

const NS: &str = "demo";
const PROXY: &str = "http://192.168.1.10:31567";
const CONNECTOR_API: &str = "connectors.alauda.io/v1alpha1";

/// A real API server with the CRD and namespace `demo`, and the controller's kubeconfig.
struct Api {
    kube: KubeCluster,
    kubeconfig: std::path::PathBuf,
}

fn start_api(label: &str) -> Api {
    let kube = KubeCluster::start(label).unwrap_or_else(|e| panic!("{e}"));
    kube.install_crd().unwrap();
    kube.namespace(NS, &[]).unwrap();
    let kubeconfig = kube.controller_kubeconfig().unwrap();
    Api { kube, kubeconfig }
}

impl Api {
    fn get(&self, name: &str) -> Option<Value> {
        self.kube.get("connector", NS, name).unwrap()
    }

    /// Events in `demo` (as `kubectl get events` shows them: core/v1 view).
    fn events(&self) -> Vec<Value> {
        let out = self
            .kube
            .kubectl(&["get", "events", "-n", NS, "-o", "json"])
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("{e}"));
        let list: Value = serde_json::from_str(&out.stdout).unwrap();
        list["items"].as_array().cloned().unwrap_or_default()
    }

    fn delete_connector(&self, name: &str) {
        self.kube
            .kubectl(&["delete", "connector", name, "-n", NS])
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Whether the controller's user has opened a watch on `resource`.
    fn watching(&self, resource: &str) -> bool {
        self.kube.audit().iter().any(|e| {
            e["verb"] == "watch"
                && e["objectRef"]["resource"] == resource
                && e["user"]["username"] == connector_devkit::kube::CONTROLLER_USER
        })
    }

    /// The `kid` of the first key the API server publishes.
    fn kid(&self) -> String {
        let out = self
            .kube
            .kubectl(&["get", "--raw", "/openid/v1/jwks"])
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("{e}"));
        let jwks: Value = serde_json::from_str(&out.stdout).unwrap();
        jwks["keys"][0]["kid"].as_str().unwrap().to_string()
    }

    /// RBAC as a user sets it up: a Role with `rule` in `demo`, bound to `subject`
    /// (`{"kind": "ServiceAccount", ...}` or `{"kind": "Group", ...}`).
    fn grant(&self, name: &str, rule: Value, subject: Value) {
        let mut subject = subject;
        if subject["kind"] == "Group" {
            subject["apiGroup"] = json!("rbac.authorization.k8s.io");
        }
        self.kube
            .apply(&json!({"apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                 "metadata": {"name": name, "namespace": NS}, "rules": [rule]},
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                 "metadata": {"name": name, "namespace": NS},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                 "subjects": [subject.clone()]},
            ]}))
            .unwrap();
        // The API server's authorizer follows RBAC objects through an informer: wait until it
        // answers for the new binding, as `kubectl auth can-i` sees it.
        let (resource, subresource) = rule["resources"][0]
            .as_str()
            .unwrap()
            .split_once('/')
            .unwrap_or((rule["resources"][0].as_str().unwrap(), ""));
        let mut target = format!("{resource}.connectors.alauda.io");
        if let Some(n) = rule["resourceNames"][0].as_str() {
            target = format!("{target}/{n}");
        }
        let who = if subject["kind"] == "Group" {
            vec![
                "--as=probe".to_string(),
                format!("--as-group={}", subject["name"].as_str().unwrap()),
            ]
        } else {
            vec![format!(
                "--as=system:serviceaccount:{NS}:{}",
                subject["name"].as_str().unwrap()
            )]
        };
        let mut args = vec!["auth", "can-i", "get", target.as_str(), "-n", NS];
        let sub = format!("--subresource={subresource}");
        if !subresource.is_empty() {
            args.push(&sub);
        }
        args.extend(who.iter().map(String::as_str));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.kube.kubectl(&args).unwrap().stdout.trim() != "yes" {
            assert!(Instant::now() < deadline, "RBAC never allowed {args:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A kube client authenticated as the controller's ServiceAccount.
async fn client(api: &Api) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = kube::config::Kubeconfig::read_from(&api.kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kube config");
    kube::Client::try_from(config).expect("kube client")
}

fn settings() -> KubeSettings {
    // The harness's registries serve TLS from devkit's upstream CA: the probes trust exactly
    // it, as the controller's --upstream-ca makes them in the e2e suites.
    let ca = connector_devkit::tls::upstream().expect("the harness's upstream CA");
    connector_controller::probe::use_upstream_ca(&ca.ca.display().to_string()).expect("the probes trust it");
    KubeSettings {
        namespace: Some(NS.into()),
        reprobe_period: Duration::from_secs(30),
        coalesce: Duration::from_millis(100),
        ..KubeSettings::new(PROXY)
    }
}

fn connector(name: &str, address: &str, secret: &str, realms: &[String]) -> Value {
    let mut spec = json!({
        "address": address,
        "auth": { "name": "basicAuth", "secretRef": { "name": secret } },
        "connectorClassName": "oci",
    });
    if !realms.is_empty() {
        spec["tokenRealms"] = realms.iter().map(|r| json!({ "url": r })).collect();
    }
    json!({
        "apiVersion": CONNECTOR_API,
        "kind": "Connector",
        "metadata": { "name": name, "namespace": NS },
        "spec": spec,
    })
}

fn secret(name: &str, type_: &str, data: &[(&str, &str)]) -> Value {
    let data: serde_json::Map<String, Value> = data.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name, "namespace": NS,
            "annotations": { connector_controller::secrets::ALLOWED_CONNECTORS_ANNOTATION: "*" },
        },
        "type": type_,
        "stringData": data,
    })
}

fn apply(api: &Api, v: Value) {
    api.kube.apply(&v).expect("apply");
}

/// Polls `f` every 50 ms until it gives `Some`, or fails naming `what` and the last state.
async fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => panic!("{what}: not within {limit:?}; last seen: {last}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `(status, reason, message)` of a condition of connector `name`.
fn condition(api: &Api, name: &str, type_: &str) -> Option<(String, String, String)> {
    let c = api.get(name)?;
    let list = c["status"]["conditions"].as_array()?.clone();
    let c = list.into_iter().find(|c| c["type"] == type_)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str()?.to_string(),
    ))
}

/// Waits for condition `type_` of `name` to have `status` and `reason`; returns its message.
async fn expect_condition(api: &Api, name: &str, type_: &str, status: &str, reason: &str) -> String {
    eventually(
        &format!("{name} {type_}={status} reason {reason}"),
        Duration::from_secs(15),
        || match condition(api, name, type_) {
            Some((s, r, m)) if s == status && r == reason => Ok(m),
            other => Err(format!("{other:?}")),
        },
    )
    .await
}

/// Events about `name` as `(type, reason, note)`.
fn events_of(api: &Api, name: &str) -> Vec<(String, String, String)> {
    api.events()
        .iter()
        .filter(|e| e["involvedObject"]["name"] == name && e["involvedObject"]["kind"] == "Connector")
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (
                s("type"),
                s("reason"),
                if e["note"].is_string() { s("note") } else { s("message") },
            )
        })
        .collect()
}

async fn expect_event(api: &Api, name: &str, type_: &str, reason: &str) -> String {
    eventually(
        &format!("{type_} event {reason} for {name}"),
        Duration::from_secs(15),
        || {
            let events = events_of(api, name);
            events
                .iter()
                .find(|(t, r, _)| t == type_ && r == reason)
                .map(|(_, _, n)| n.clone())
                .ok_or_else(|| format!("{events:?}"))
        },
    )
    .await
}

/// Plays the pipeline + xDS server: every Inputs becomes a new version with the connectors
/// whose Secret yields a credential, acknowledged by "Envoy".
fn play_proxy(hub: Hub) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rx = hub.inputs();
        let mut version = 0;
        loop {
            let inputs = rx.borrow_and_update().clone();
            if let Some(inputs) = inputs {
                version = hub
                    .published()
                    .borrow()
                    .as_ref()
                    .map_or(version, |p| p.version.max(version))
                    + 1;
                let mut connectors = BTreeSet::new();
                let mut left_out = BTreeMap::new();
                for (at, c) in inputs.set.connectors() {
                    let key = (
                        c.metadata.namespace.clone().unwrap_or_default(),
                        c.metadata.name.clone().unwrap_or_default(),
                    );
                    let authority = connector_core::address::Upstream::parse(&c.spec.address)
                        .map(|u| u.authority)
                        .unwrap_or_default();
                    let secret_name = &c.spec.auth.secret_ref.name;
                    let out = credential_from_secret(
                        &key.0,
                        secret_name,
                        &key.1,
                        inputs.set.secret(&key.0, secret_name),
                        &authority,
                    );
                    if out.credential.is_some() {
                        connectors.insert(key);
                    } else {
                        left_out.insert(
                            key,
                            vec![Problem::new(at, "spec.auth.secretRef.name", out.condition.message)],
                        );
                    }
                }
                hub.publish_rendered(Published {
                    version,
                    connectors: connectors.into_iter().map(|k| (k, ())).collect(),
                    left_out: left_out.into_iter().collect(),
                    refused: vec![],
                });
                hub.set_proxy(|s| {
                    s.connected = true;
                    s.accepted = Some(version);
                    s.rejected = None;
                });
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
}

/// The credential the latest Inputs carry for connector `name`: `(username, password)`.
fn published_credential(hub: &Hub, name: &str) -> Result<(String, String), String> {
    let inputs: Option<Arc<Inputs>> = hub.inputs().borrow().clone();
    let inputs = inputs.ok_or("no Inputs yet")?;
    let (_, c) = inputs
        .set
        .connectors()
        .find(|(_, c)| c.metadata.name.as_deref() == Some(name))
        .ok_or_else(|| format!("{name} not in the Inputs"))?;
    let authority = connector_core::address::Upstream::parse(&c.spec.address)
        .map(|u| u.authority)
        .unwrap_or_default();
    let secret_name = &c.spec.auth.secret_ref.name;
    credential_from_secret(NS, secret_name, name, inputs.set.secret(NS, secret_name), &authority)
        .credential
        .map(|c| (c.username, c.password))
        .ok_or_else(|| format!("{name}: no credential in the Inputs"))
}

fn counter(
    family: &prometheus_client::metrics::family::Family<ResultLabel, prometheus_client::metrics::counter::Counter>,
    result: &str,
) -> u64 {
    family.get_or_create(&ResultLabel { result: result.into() }).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_events_and_the_proxy_state() {
    let api = start_api("kube-mode-conditions-api");
    let work = WorkDir::new("kube-mode-conditions").unwrap();
    let registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let registry_type = "cpaas.io/distribution-registry-token";

    apply(
        &api,
        secret(
            "robot",
            registry_type,
            &[("username", &creds.username), ("password", &creds.password)],
        ),
    );
    apply(
        &api,
        secret(
            "wrong",
            registry_type,
            &[("username", &creds.username), ("password", "not-the-password")],
        ),
    );
    apply(
        &api,
        secret(
            "opaque",
            "Opaque",
            &[("username", &creds.username), ("password", &creds.password)],
        ),
    );
    apply(&api, secret("nokey", registry_type, &[("username", &creds.username)]));
    for (name, address, secret) in [
        ("good", registry.url(), "robot"),
        ("missing", registry.url(), "nope"),
        ("opaque", registry.url(), "opaque"),
        ("nokey", registry.url(), "nokey"),
        ("down", format!("http://127.0.0.1:{closed_port}"), "robot"),
        ("wrong", registry.url(), "wrong"),
    ] {
        apply(&api, connector(name, &address, secret, &[]));
    }

    let hub = Hub::new();
    let proxy = play_proxy(hub.clone());
    let controller = tokio::spawn(kube_mode::run(client(&api).await, settings(), hub.clone()));

    // Inputs: every connector, only the Secrets they name, the cluster identity, RBAC mode.
    let inputs = eventually("Inputs published", Duration::from_secs(10), || {
        hub.inputs().borrow().clone().ok_or_else(|| "none".to_string())
    })
    .await;
    assert_eq!(inputs.set.connector_count(), 6);
    assert_eq!(inputs.authorization, Authorization::Controller);
    assert_eq!(
        inputs.identity["issuers"],
        json!(["https://kubernetes.default.svc.cluster.local"])
    );
    assert_eq!(inputs.identity["audiences"], json!(["oci-connector"]));
    assert_eq!(inputs.identity["jwks"]["keys"][0]["kid"], api.kid().as_str());
    assert!(inputs.set.secret(NS, "robot").is_some());
    assert!(inputs.set.secret(NS, "nope").is_none());
    assert_eq!(
        published_credential(&hub, "good").unwrap(),
        (creds.username.clone(), creds.password.clone())
    );

    // A ready connector: every condition True, the proxy address, Normal events.
    for t in ["SecretReady", "LivenessReady", "AuthReady", "ProxyReady", "Ready"] {
        let reason = match t {
            "SecretReady" => "SecretReady",
            "LivenessReady" => "UpstreamReachable",
            "AuthReady" => "CredentialAccepted",
            "ProxyReady" => "Accepted",
            _ => "Ready",
        };
        expect_condition(&api, "good", t, "True", reason).await;
    }
    let good = api.get("good").unwrap();
    assert_eq!(
        good["status"]["proxy"]["httpAddress"]["url"],
        format!("{PROXY}/namespaces/{NS}/connectors/good")
    );
    assert_eq!(good["status"]["conditions"].as_array().unwrap().len(), 5);
    expect_event(&api, "good", "Normal", "CredentialAccepted").await;
    expect_event(&api, "good", "Normal", "Ready").await;
    // Warnings for "good" can only be from before the proxy had its configuration.
    let warnings: Vec<_> = events_of(&api, "good")
        .into_iter()
        .filter(|(t, _, _)| t != "Normal")
        .collect();
    assert!(
        warnings
            .iter()
            .all(|(_, r, _)| ["NotRendered", "NotConfigured", "Pending", "ProxyDisconnected"].contains(&r.as_str())),
        "unexpected Warning events for a ready connector: {warnings:?}"
    );

    // Secret problems.
    let m = expect_condition(&api, "missing", "SecretReady", "False", "SecretNotFound").await;
    assert!(m.contains("demo/nope"), "{m}");
    expect_condition(&api, "missing", "Ready", "False", "SecretNotFound").await;
    expect_condition(&api, "missing", "AuthReady", "Unknown", "SecretNotReady").await;
    let note = expect_event(&api, "missing", "Warning", "SecretNotFound").await;
    assert!(note.contains("demo/nope"), "{note}");
    expect_condition(&api, "opaque", "SecretReady", "False", "SecretTypeUnsupported").await;
    let m = expect_condition(&api, "nokey", "SecretReady", "False", "SecretKeyMissing").await;
    assert!(m.contains("password"), "{m}");

    // Unreachable upstream.
    let m = expect_condition(&api, "down", "LivenessReady", "False", "UpstreamUnreachable").await;
    assert!(m.contains(&closed_port.to_string()), "{m}");
    expect_condition(&api, "down", "AuthReady", "Unknown", "UpstreamNotLive").await;
    expect_event(&api, "down", "Warning", "UpstreamUnreachable").await;

    // Wrong credential.
    expect_condition(&api, "wrong", "LivenessReady", "True", "UpstreamReachable").await;
    expect_condition(&api, "wrong", "AuthReady", "False", "CredentialRejected").await;
    expect_event(&api, "wrong", "Warning", "CredentialRejected").await;

    // Only "good" is Ready.
    eventually("connectors_ready = 1", Duration::from_secs(10), || {
        let n = hub.metrics.connectors_ready.get();
        if n == 1 { Ok(()) } else { Err(n.to_string()) }
    })
    .await;
    assert!(hub.metrics.reconciles.get() >= 6);

    // No condition or event carries a password.
    let everything = format!(
        "{} {}",
        serde_json::to_string(&api.events()).unwrap(),
        ["good", "missing", "opaque", "nokey", "down", "wrong"]
            .iter()
            .map(|n| api.get(n).unwrap()["status"].to_string())
            .collect::<String>()
    );
    assert!(!everything.contains(&creds.password), "a password in status or events");

    // Envoy rejects the next configuration: ProxyReady False, reason Rejected; an ACK heals it.
    // First let the reconciles settle, so that only the proxy state can trigger the next one.
    let mut seen = (hub.metrics.reconciles.get(), Instant::now());
    eventually("reconciles settle", Duration::from_secs(10), || {
        let n = hub.metrics.reconciles.get();
        if n != seen.0 {
            seen = (n, Instant::now());
        }
        if seen.1.elapsed() >= Duration::from_millis(500) {
            Ok(())
        } else {
            Err(n.to_string())
        }
    })
    .await;
    let current = hub.published().borrow().clone().unwrap();
    let next = current.version + 1;
    hub.publish_rendered(Published {
        version: next,
        ..(*current).clone()
    });
    hub.set_proxy(|s| s.rejected = Some((next, "Proto constraint validation failed".into())));
    let m = expect_condition(&api, "good", "ProxyReady", "False", "Rejected").await;
    assert!(m.contains("Proto constraint validation failed"), "{m}");
    expect_condition(&api, "good", "Ready", "False", "Rejected").await;
    expect_event(&api, "good", "Warning", "Rejected").await;
    hub.set_proxy(|s| {
        s.accepted = Some(next);
        s.rejected = None;
    });
    expect_condition(&api, "good", "ProxyReady", "True", "Accepted").await;
    expect_condition(&api, "good", "Ready", "True", "Ready").await;

    // With the proxy side stopped (nothing published any more, so no reconcile-all), only the
    // Secret watch can make "missing" see its new Secret.
    proxy.abort();
    let _ = proxy.await;
    apply(
        &api,
        secret(
            "nope",
            registry_type,
            &[("username", &creds.username), ("password", &creds.password)],
        ),
    );
    expect_condition(&api, "missing", "SecretReady", "True", "SecretReady").await;
    expect_condition(&api, "missing", "AuthReady", "True", "CredentialAccepted").await;
    expect_event(&api, "missing", "Normal", "SecretReady").await;

    controller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_deletion() {
    let mut api = start_api("kube-mode-rotation-api");
    let work = WorkDir::new("kube-mode-rotation").unwrap();
    let mut registry = Registry::start_with_auth(&work, "robot").unwrap();
    let first = registry.credentials.clone().unwrap();
    let registry_type = "cpaas.io/distribution-registry-token";
    apply(
        &api,
        secret(
            "robot",
            registry_type,
            &[("username", &first.username), ("password", &first.password)],
        ),
    );
    apply(&api, connector("registry", &registry.url(), "robot", &[]));
    apply(&api, connector("other", &registry.url(), "robot", &[]));

    let hub = Hub::new();
    let proxy = play_proxy(hub.clone());
    let controller = tokio::spawn(kube_mode::run(client(&api).await, settings(), hub.clone()));
    eventually("keys read and both watches open", Duration::from_secs(10), || {
        let done = api.kube.jwks_reads() >= 1 && api.watching("connectors") && api.watching("secrets");
        if done { Ok(()) } else { Err("not yet".to_string()) }
    })
    .await;
    expect_condition(&api, "registry", "Ready", "True", "Ready").await;
    assert_eq!(
        published_credential(&hub, "registry").unwrap(),
        (first.username.clone(), first.password.clone())
    );

    // Rotation to a second robot account the registry also accepts.
    let second = Credentials {
        username: "robot2".into(),
        password: connector_devkit::random_secret().unwrap(),
    };
    registry.add_user(&second).unwrap();
    // Watches dropped by the API server (restarted) resume and see the change.
    let took = api.kube.restart().unwrap();
    eprintln!("kube-apiserver restarted in {took:?}");
    let changed_at = Instant::now();
    apply(
        &api,
        secret(
            "robot",
            registry_type,
            &[("username", &second.username), ("password", &second.password)],
        ),
    );
    eventually(
        "the new credential in the Inputs",
        Duration::from_secs(30),
        || match published_credential(&hub, "registry")? {
            (u, _) if u == second.username => Ok(()),
            other => Err(other.0),
        },
    )
    .await;
    let took = changed_at.elapsed();
    assert_eq!(published_credential(&hub, "registry").unwrap().1, second.password);
    // The reconcile triggered by the Secret change: SecretReady names the new user, and the
    // login with the new credential (same reconcile) succeeded.
    // The reconciler's own Secret watch resumes after the restart within its backoff
    // (kube-runtime's default: exponential from 0.8 s), so this may take longer than the Inputs.
    eventually("SecretReady names the new user", Duration::from_secs(40), || {
        let (_, _, m) = condition(&api, "registry", "SecretReady").ok_or("no condition")?;
        if m.contains("\"robot2\"") { Ok(()) } else { Err(m) }
    })
    .await;
    eprintln!("the Secret change reached SecretReady in {:?}", changed_at.elapsed());
    expect_condition(&api, "registry", "AuthReady", "True", "CredentialAccepted").await;
    expect_condition(&api, "registry", "Ready", "True", "Ready").await;

    // Rotation to a credential the registry refuses: AuthReady False for both connectors.
    apply(
        &api,
        secret(
            "robot",
            registry_type,
            &[("username", &second.username), ("password", "wrong-password")],
        ),
    );
    expect_condition(&api, "registry", "AuthReady", "False", "CredentialRejected").await;
    expect_condition(&api, "other", "AuthReady", "False", "CredentialRejected").await;
    expect_event(&api, "registry", "Warning", "CredentialRejected").await;

    // Deletion: the next Inputs no longer carry it; the other stays.
    api.delete_connector("registry");
    eventually(
        "the deleted connector gone from the Inputs",
        Duration::from_secs(5),
        || match published_credential(&hub, "registry") {
            Err(e) if e.contains("not in the Inputs") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert!(published_credential(&hub, "other").is_ok());
    eprintln!("rotation reached the Inputs in {took:?}");

    controller.abort();
    proxy.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_upstream_login_and_realm_rules() {
    let api = start_api("kube-mode-token-api");
    let work = WorkDir::new("kube-mode-token").unwrap();
    let password = connector_devkit::random_secret().unwrap();
    let tokens = TokenServer::start(&work, "robot", &password).unwrap();
    let registry = Registry::start_token_auth(
        &work,
        &tokens,
        Credentials {
            username: "robot".into(),
            password: password.clone(),
        },
    )
    .unwrap();
    let registry_type = "cpaas.io/distribution-registry-token";
    apply(
        &api,
        secret(
            "robot",
            registry_type,
            &[("username", "robot"), ("password", &password)],
        ),
    );
    apply(
        &api,
        secret("wrong", registry_type, &[("username", "robot"), ("password", "not-it")]),
    );

    let hub = Hub::new();
    let proxy = play_proxy(hub.clone());
    let controller = tokio::spawn(kube_mode::run(client(&api).await, settings(), hub.clone()));

    // The realm is on another port of 127.0.0.1: not the registry's host[:port], not listed.
    apply(&api, connector("unlisted", &registry.url(), "robot", &[]));
    let m = expect_condition(&api, "unlisted", "AuthReady", "False", "RealmNotAllowed").await;
    assert!(m.contains(&tokens.realm()), "{m}");
    assert!(tokens.requests().is_empty(), "the credential went to an unlisted realm");

    apply(&api, connector("listed", &registry.url(), "robot", &[tokens.realm()]));
    expect_condition(&api, "listed", "AuthReady", "True", "CredentialAccepted").await;
    expect_condition(&api, "listed", "Ready", "True", "Ready").await;
    let requests = tokens.requests();
    assert!(
        requests.iter().any(|r| r.credential_ok && r.status == 200),
        "a token fetched with the robot's credential: {requests:?}"
    );

    apply(&api, connector("refused", &registry.url(), "wrong", &[tokens.realm()]));
    expect_condition(&api, "refused", "AuthReady", "False", "CredentialRejected").await;
    assert!(tokens.requests().iter().any(|r| !r.credential_ok));

    controller.abort();
    proxy.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_access_reviews_follow_rbac_and_are_cached() {
    let api = start_api("kube-mode-sar-api");
    let puller = "system:serviceaccount:demo:puller";
    let get_connectors = |names: &[&str]| {
        let mut rule = json!({"apiGroups": ["connectors.alauda.io"], "resources": ["connectors"], "verbs": ["get"]});
        if !names.is_empty() {
            rule["resourceNames"] = json!(names);
        }
        rule
    };
    let sa = |name: &str| json!({"kind": "ServiceAccount", "name": name, "namespace": NS});
    api.grant("puller", get_connectors(&["registry"]), sa("puller"));
    let metrics = Arc::new(Metrics::default());
    let authz = Authorizer::new(
        client(&api).await,
        AuthzSettings {
            strict: false,
            allow_ttl: Duration::from_secs(30),
            deny_ttl: Duration::from_millis(500),
            ..AuthzSettings::default()
        },
        metrics.review_observer(),
    );
    let groups = service_account_groups(puller);

    let d = authz
        .allowed(puller, &groups, NS, "registry", Verb::Pull)
        .await
        .unwrap();
    assert!(d.allowed && !d.cached, "{d:?}");
    assert_eq!(d.ttl, Duration::from_secs(30));
    let reviews = api.kube.access_reviews();
    assert_eq!(reviews.len(), 1);
    let spec = &reviews[0];
    assert_eq!(spec["user"], puller);
    assert_eq!(
        spec["groups"],
        json!([
            "system:authenticated",
            "system:serviceaccounts",
            "system:serviceaccounts:demo"
        ])
    );
    let attrs = &spec["resourceAttributes"];
    assert_eq!(
        (
            &attrs["verb"],
            &attrs["group"],
            &attrs["resource"],
            &attrs["namespace"],
            &attrs["name"]
        ),
        (
            &json!("get"),
            &json!("connectors.alauda.io"),
            &json!("connectors"),
            &json!(NS),
            &json!("registry")
        )
    );
    assert!(attrs.get("subresource").is_none_or(Value::is_null), "{attrs}");

    // Cached: no second review.
    let d = authz
        .allowed(puller, &groups, NS, "registry", Verb::Pull)
        .await
        .unwrap();
    assert!(d.allowed && d.cached, "{d:?}");
    assert_eq!(api.kube.access_reviews().len(), 1);

    // Another connector, another ServiceAccount: denied, cached briefly.
    let d = authz
        .allowed(puller, &groups, NS, "elsewhere", Verb::Pull)
        .await
        .unwrap();
    assert!(!d.allowed && !d.cached, "{d:?}");
    let other = "system:serviceaccount:demo:other";
    let d = authz
        .allowed(other, &service_account_groups(other), NS, "registry", Verb::Pull)
        .await
        .unwrap();
    assert!(!d.allowed, "{d:?}");
    let denied_at = Instant::now();
    assert_eq!(api.kube.access_reviews().len(), 3);
    let d = authz
        .allowed(other, &service_account_groups(other), NS, "registry", Verb::Pull)
        .await
        .unwrap();
    assert!(!d.allowed && d.cached, "{d:?}");
    assert_eq!(api.kube.access_reviews().len(), 3);
    // The denial expires after deny_ttl: a new review is sent (and a rule added meanwhile counts).
    api.grant("other", get_connectors(&[]), sa("other"));
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < Duration::from_secs(5) {
        let d = authz
            .allowed(other, &service_account_groups(other), NS, "registry", Verb::Pull)
            .await
            .unwrap();
        if d.allowed {
            last = Some((d, denied_at.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (d, after) = last.expect("the denial did not expire within 5 s");
    assert!(
        !d.cached && after >= Duration::from_millis(300),
        "{d:?} after {after:?}"
    );
    assert_eq!(api.kube.access_reviews().len(), 4);
    assert_eq!(counter(&metrics.access_reviews, "allowed"), 2);
    assert_eq!(counter(&metrics.access_reviews, "denied"), 2);
    assert!(counter(&metrics.access_reviews, "allowed_cached") >= 1);
    assert!(counter(&metrics.access_reviews, "denied_cached") >= 1);

    // Through the channel's trait (the filter names the subject only): groups count.
    let ci = "system:serviceaccount:ci:builder";
    api.grant(
        "ci",
        get_connectors(&["shared"]),
        json!({"kind": "Group", "name": "system:serviceaccounts:ci"}),
    );
    let a = authz.check(ci, NS, "shared", Verb::Pull).await.unwrap();
    assert!(a.allowed && a.ttl_seconds >= 29, "{a:?}");
    assert!(!authz.check(ci, NS, "registry", Verb::Pull).await.unwrap().allowed);

    // Strict mode asks for connectors/proxy: the plain `get` rule is not enough.
    let strict = Authorizer::new(
        client(&api).await,
        AuthzSettings {
            strict: true,
            ..AuthzSettings::default()
        },
        metrics.review_observer(),
    );
    let d = strict
        .allowed(puller, &groups, NS, "registry", Verb::Pull)
        .await
        .unwrap();
    assert!(!d.allowed, "{d:?}");
    let last_review = api.kube.access_reviews().last().cloned().unwrap();
    assert_eq!(last_review["resourceAttributes"]["subresource"], "proxy");
    api.grant(
        "puller-proxy",
        json!({"apiGroups": ["connectors.alauda.io"], "resources": ["connectors/proxy"], "verbs": ["get"], "resourceNames": ["registry"]}),
        sa("puller"),
    );
    let d = strict
        .allowed(puller, &groups, NS, "other-connector", Verb::Pull)
        .await
        .unwrap();
    assert!(!d.allowed, "a rule for one connector allows no other: {d:?}");
    let strict_fresh = Authorizer::new(
        client(&api).await,
        AuthzSettings {
            strict: true,
            ..AuthzSettings::default()
        },
        metrics.review_observer(),
    );
    assert!(
        strict_fresh
            .allowed(puller, &groups, NS, "registry", Verb::Pull)
            .await
            .unwrap()
            .allowed
    );

    // A pull grant is not a push grant, nor a delete grant: each asks for its own verb.
    for verb in [Verb::Push, Verb::Delete] {
        let d = authz.allowed(puller, &groups, NS, "registry", verb).await.unwrap();
        assert!(!d.allowed, "{verb:?} with only `get`: {d:?}");
        assert!(d.reason.contains(verb.rbac_verb()), "{}", d.reason);
        let last_review = api.kube.access_reviews().last().cloned().unwrap();
        assert_eq!(last_review["resourceAttributes"]["verb"], verb.rbac_verb());
        assert!(
            last_review["resourceAttributes"]
                .get("subresource")
                .is_none_or(Value::is_null)
        );
    }
    api.grant(
        "puller-push",
        json!({"apiGroups": ["connectors.alauda.io"], "resources": ["connectors"], "verbs": ["push"], "resourceNames": ["registry"]}),
        sa("puller"),
    );
    let started = Instant::now();
    while !authz
        .allowed(puller, &groups, NS, "registry", Verb::Push)
        .await
        .unwrap()
        .allowed
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the push grant did not take effect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = authz
        .allowed(puller, &groups, NS, "registry", Verb::Delete)
        .await
        .unwrap();
    assert!(!d.allowed, "push does not grant delete: {d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_identity_is_read_and_refreshed_on_unknown_kid_rate_limited() {
    let mut api = start_api("kube-mode-identity-api");
    let first_kid = api.kid();
    let hub = Hub::new();
    let min_interval = Duration::from_millis(1500);
    let mut rx = cluster_identity::spawn(
        client(&api).await,
        IdentitySettings {
            audiences: vec!["oci-connector".into(), "other".into()],
            refresh: Duration::from_secs(300),
            min_interval,
            fetch_timeout: Duration::from_secs(1),
        },
        hub.clone(),
    );
    let kid = |rx: &tokio::sync::watch::Receiver<Option<Value>>| {
        rx.borrow()
            .as_ref()
            .and_then(|v| v["jwks"]["keys"][0]["kid"].as_str().map(str::to_string))
    };
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
        .await
        .expect("identity within 10 s")
        .unwrap();
    let read_at = Instant::now();
    let identity = rx.borrow().clone().unwrap();
    assert_eq!(
        identity["issuers"],
        json!(["https://kubernetes.default.svc.cluster.local"])
    );
    assert_eq!(identity["audiences"], json!(["oci-connector", "other"]));
    assert_eq!(kid(&rx).as_deref(), Some(first_kid.as_str()));
    assert_eq!(api.kube.jwks_reads(), 1);
    assert_eq!(counter(&hub.metrics.identity_refreshes, "ok"), 1);

    // The keys rotate (the API server restarted with a second key, then without the first); a
    // burst of unknown-kid notices: exactly one refresh, and not before min_interval has passed
    // since the last read.
    api.kube.restart_adding_key().unwrap();
    api.kube.restart_removing_oldest_key().unwrap();
    let second_kid = api.kid();
    assert_ne!(second_kid, first_kid);
    // The restarts took longer than min_interval: the first notice refreshes at once.
    assert!(read_at.elapsed() > min_interval);
    for _ in 0..10 {
        hub.unknown_kid.notify_one();
        tokio::task::yield_now().await;
    }
    eventually("the rotated key read", Duration::from_secs(5), || {
        kid(&rx)
            .filter(|k| *k == second_kid)
            .ok_or_else(|| format!("{:?}", kid(&rx)))
    })
    .await;
    let read_at = Instant::now();
    assert_eq!(api.kube.jwks_reads(), 2, "ten notices, one refresh");

    // Notices right after that read: one more refresh, not before min_interval has passed.
    for _ in 0..10 {
        hub.unknown_kid.notify_one();
        tokio::task::yield_now().await;
    }
    eventually("a refresh after the window", Duration::from_secs(5), || {
        let n = api.kube.jwks_reads();
        if n == 3 { Ok(()) } else { Err(n.to_string()) }
    })
    .await;
    let after = read_at.elapsed();
    assert!(
        after >= min_interval - Duration::from_millis(200),
        "refreshed after {after:?}: not rate limited"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.kube.jwks_reads(), 3, "twenty notices, two refreshes");

    // A failing API server (stopped): the last good identity stays.
    api.kube.stop_apiserver();
    tokio::time::sleep(min_interval).await;
    hub.unknown_kid.notify_one();
    eventually("a failed refresh counted", Duration::from_secs(5), || {
        let n = counter(&hub.metrics.identity_refreshes, "error");
        if n >= 1 { Ok(()) } else { Err(n.to_string()) }
    })
    .await;
    assert_eq!(
        kid(&rx).as_deref(),
        Some(second_kid.as_str()),
        "the last good identity is kept"
    );
}
