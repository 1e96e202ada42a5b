//! API mode against the stand-in Kubernetes API server (`connector_devkit::kube_api`, the one
//! permitted stand-in: no API server runs here) with a real `kube::Client`, and real
//! registries (CNCF Distribution with htpasswd, and with token auth) for the probes.
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
use connector_devkit::WorkDir;
use connector_devkit::kube_api::{AccessRule, KubeApi};
use connector_devkit::registry::{Credentials, Registry};
use connector_devkit::token_server::TokenServer;
use serde_json::{Value, json};

const NS: &str = "demo";
const PROXY: &str = "http://192.168.1.10:31567";
const CONNECTOR_API: &str = "connectors.alauda.io/v1alpha1";

fn client(api: &KubeApi) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::new(api.url().parse().expect("stand-in URL"));
    kube::Client::try_from(config).expect("kube client")
}

fn settings() -> KubeSettings {
    KubeSettings {
        namespace: Some(NS.into()),
        reprobe_period: Duration::from_secs(30),
        coalesce: Duration::from_millis(100),
        ..KubeSettings::new(PROXY)
    }
}

fn set_identity(api: &KubeApi, kid: &str) {
    api.set_issuer("https://kubernetes.default.svc.cluster.local");
    api.set_jwks(
        json!({ "keys": [{ "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": "sXch", "e": "AQAB" }] }),
    );
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
        "metadata": { "name": name, "namespace": NS },
        "type": type_,
        "stringData": data,
    })
}

fn apply(api: &KubeApi, v: Value) {
    api.apply(v).expect("apply");
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
fn condition(api: &KubeApi, name: &str, type_: &str) -> Option<(String, String, String)> {
    let c = api.get(CONNECTOR_API, "Connector", NS, name)?;
    let list = c["status"]["conditions"].as_array()?.clone();
    let c = list.into_iter().find(|c| c["type"] == type_)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str()?.to_string(),
    ))
}

/// Waits for condition `type_` of `name` to have `status` and `reason`; returns its message.
async fn expect_condition(api: &KubeApi, name: &str, type_: &str, status: &str, reason: &str) -> String {
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
fn events_of(api: &KubeApi, name: &str) -> Vec<(String, String, String)> {
    api.events()
        .iter()
        .filter(|e| e["regarding"]["name"] == name || e["involvedObject"]["name"] == name)
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

async fn expect_event(api: &KubeApi, name: &str, type_: &str, reason: &str) -> String {
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
                for (at, c) in &inputs.set.connectors {
                    let key = (
                        c.metadata.namespace.clone().unwrap_or_default(),
                        c.metadata.name.clone().unwrap_or_default(),
                    );
                    let authority = connector_filter::config::Upstream::parse(&c.spec.address)
                        .map(|u| u.authority)
                        .unwrap_or_default();
                    let secret_name = &c.spec.auth.secret_ref.name;
                    let out =
                        credential_from_secret(&key.0, secret_name, inputs.set.secret(&key.0, secret_name), &authority);
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
                    connectors,
                    left_out,
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
        .connectors
        .iter()
        .find(|(_, c)| c.metadata.name.as_deref() == Some(name))
        .ok_or_else(|| format!("{name} not in the Inputs"))?;
    let authority = connector_filter::config::Upstream::parse(&c.spec.address)
        .map(|u| u.authority)
        .unwrap_or_default();
    let secret_name = &c.spec.auth.secret_ref.name;
    credential_from_secret(NS, secret_name, inputs.set.secret(NS, secret_name), &authority)
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
    let api = KubeApi::start().unwrap();
    set_identity(&api, "k1");
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
    let controller = tokio::spawn(kube_mode::run(client(&api), settings(), hub.clone()));

    // Inputs: every connector, only the Secrets they name, the cluster identity, RBAC mode.
    let inputs = eventually("Inputs published", Duration::from_secs(10), || {
        hub.inputs().borrow().clone().ok_or_else(|| "none".to_string())
    })
    .await;
    assert_eq!(inputs.set.connectors.len(), 6);
    assert_eq!(inputs.authorization, Authorization::Controller);
    assert_eq!(
        inputs.identity["issuers"],
        json!(["https://kubernetes.default.svc.cluster.local"])
    );
    assert_eq!(inputs.identity["audiences"], json!(["oci-connector"]));
    assert_eq!(inputs.identity["jwks"]["keys"][0]["kid"], "k1");
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
    let good = api.get(CONNECTOR_API, "Connector", NS, "good").unwrap();
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
            .map(|n| api.get(CONNECTOR_API, "Connector", NS, n).unwrap()["status"].to_string())
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
    let api = KubeApi::start().unwrap();
    // No keys yet: the cluster identity is incomplete, so nothing may be published.
    api.set_issuer("https://kubernetes.default.svc.cluster.local");
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
    let controller = tokio::spawn(kube_mode::run(client(&api), settings(), hub.clone()));
    let watched = |api: &KubeApi, path: &str| {
        api.requests()
            .iter()
            .any(|(_, target)| target.contains(path) && target.contains("watch=true"))
    };
    eventually("keys read and both watches open", Duration::from_secs(10), || {
        let done = api.jwks_requests() >= 1 && watched(&api, "/connectors") && watched(&api, "/secrets");
        if done {
            Ok(())
        } else {
            Err(format!("{:?}", api.requests()))
        }
    })
    .await;
    assert!(
        hub.inputs().borrow().is_none(),
        "Inputs published without the cluster's keys"
    );
    set_identity(&api, "k1");
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
    // Watches dropped by the API server resume (from their resourceVersion) and see the change.
    api.break_watches();
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
        Duration::from_secs(5),
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
    eventually("SecretReady names the new user", Duration::from_secs(10), || {
        let (_, _, m) = condition(&api, "registry", "SecretReady").ok_or("no condition")?;
        if m.contains("\"robot2\"") { Ok(()) } else { Err(m) }
    })
    .await;
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
    assert!(api.delete(CONNECTOR_API, "Connector", NS, "registry"));
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
    let api = KubeApi::start().unwrap();
    set_identity(&api, "k1");
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
    let controller = tokio::spawn(kube_mode::run(client(&api), settings(), hub.clone()));

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
    let api = KubeApi::start().unwrap();
    let puller = "system:serviceaccount:demo:puller";
    api.allow(AccessRule {
        user: Some(puller.into()),
        verb: "get".into(),
        api_group: "connectors.alauda.io".into(),
        resource: "connectors".into(),
        namespace: NS.into(),
        name: "registry".into(),
        ..AccessRule::default()
    });
    let metrics = Arc::new(Metrics::default());
    let authz = Authorizer::new(
        client(&api),
        AuthzSettings {
            strict: false,
            allow_ttl: Duration::from_secs(30),
            deny_ttl: Duration::from_millis(500),
        },
        metrics.clone(),
    );
    let groups = service_account_groups(puller);

    let d = authz.allowed(puller, &groups, NS, "registry").await.unwrap();
    assert!(d.allowed && !d.cached, "{d:?}");
    assert_eq!(d.ttl, Duration::from_secs(30));
    let reviews = api.access_reviews();
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
    let d = authz.allowed(puller, &groups, NS, "registry").await.unwrap();
    assert!(d.allowed && d.cached, "{d:?}");
    assert_eq!(api.access_reviews().len(), 1);

    // Another connector, another ServiceAccount: denied, cached briefly.
    let d = authz.allowed(puller, &groups, NS, "elsewhere").await.unwrap();
    assert!(!d.allowed && !d.cached, "{d:?}");
    let other = "system:serviceaccount:demo:other";
    let d = authz
        .allowed(other, &service_account_groups(other), NS, "registry")
        .await
        .unwrap();
    assert!(!d.allowed, "{d:?}");
    assert_eq!(api.access_reviews().len(), 3);
    let d = authz
        .allowed(other, &service_account_groups(other), NS, "registry")
        .await
        .unwrap();
    assert!(!d.allowed && d.cached, "{d:?}");
    assert_eq!(api.access_reviews().len(), 3);
    // The denial expires after deny_ttl: a new review is sent (and a rule added meanwhile counts).
    api.allow(AccessRule {
        user: Some(other.into()),
        verb: "get".into(),
        api_group: "connectors.alauda.io".into(),
        resource: "connectors".into(),
        namespace: NS.into(),
        ..AccessRule::default()
    });
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < Duration::from_secs(5) {
        let d = authz
            .allowed(other, &service_account_groups(other), NS, "registry")
            .await
            .unwrap();
        if d.allowed {
            last = Some((d, started.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (d, after) = last.expect("the denial did not expire within 5 s");
    assert!(
        !d.cached && after >= Duration::from_millis(300),
        "{d:?} after {after:?}"
    );
    assert_eq!(api.access_reviews().len(), 4);
    assert_eq!(counter(&metrics.access_reviews, "allowed"), 2);
    assert_eq!(counter(&metrics.access_reviews, "denied"), 2);
    assert!(counter(&metrics.access_reviews, "allowed_cached") >= 1);
    assert!(counter(&metrics.access_reviews, "denied_cached") >= 1);

    // Through the channel's trait (the filter names the subject only): groups count.
    let ci = "system:serviceaccount:ci:builder";
    api.allow(AccessRule {
        group: Some("system:serviceaccounts:ci".into()),
        verb: "get".into(),
        api_group: "connectors.alauda.io".into(),
        resource: "connectors".into(),
        namespace: NS.into(),
        name: "shared".into(),
        ..AccessRule::default()
    });
    let a = authz.check(ci, NS, "shared").await.unwrap();
    assert!(a.allowed && a.ttl_secs >= 29, "{a:?}");
    assert!(!authz.check(ci, NS, "registry").await.unwrap().allowed);

    // Strict mode asks for connectors/proxy: the plain `get` rule is not enough.
    let strict = Authorizer::new(
        client(&api),
        AuthzSettings {
            strict: true,
            ..AuthzSettings::default()
        },
        metrics.clone(),
    );
    let d = strict.allowed(puller, &groups, NS, "registry").await.unwrap();
    assert!(!d.allowed, "{d:?}");
    let last_review = api.access_reviews().last().cloned().unwrap();
    assert_eq!(last_review["resourceAttributes"]["subresource"], "proxy");
    api.allow(AccessRule {
        user: Some(puller.into()),
        verb: "get".into(),
        api_group: "connectors.alauda.io".into(),
        resource: "connectors".into(),
        subresource: "proxy".into(),
        namespace: NS.into(),
        name: "registry".into(),
        ..AccessRule::default()
    });
    let d = strict.allowed(puller, &groups, NS, "other-connector").await.unwrap();
    assert!(!d.allowed, "a rule for one connector allows no other: {d:?}");
    let strict_fresh = Authorizer::new(
        client(&api),
        AuthzSettings {
            strict: true,
            ..AuthzSettings::default()
        },
        metrics.clone(),
    );
    assert!(
        strict_fresh
            .allowed(puller, &groups, NS, "registry")
            .await
            .unwrap()
            .allowed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_identity_is_read_and_refreshed_on_unknown_kid_rate_limited() {
    let api = KubeApi::start().unwrap();
    set_identity(&api, "k1");
    let hub = Hub::new();
    let min_interval = Duration::from_millis(1500);
    let mut rx = cluster_identity::spawn(
        client(&api),
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
    assert_eq!(kid(&rx).as_deref(), Some("k1"));
    assert_eq!(api.jwks_requests(), 1);
    assert_eq!(counter(&hub.metrics.identity_refreshes, "ok"), 1);

    // The keys rotate; a burst of unknown-kid notices right after the read: exactly one
    // refresh, and not before min_interval has passed since the last read.
    api.set_jwks(json!({ "keys": [{ "kty": "RSA", "kid": "k2", "alg": "RS256", "n": "sXch", "e": "AQAB" }] }));
    for _ in 0..10 {
        hub.unknown_kid.notify_one();
        tokio::task::yield_now().await;
    }
    eventually("the rotated key read", Duration::from_secs(5), || {
        kid(&rx).filter(|k| k == "k2").ok_or_else(|| format!("{:?}", kid(&rx)))
    })
    .await;
    let after = read_at.elapsed();
    assert!(
        after >= min_interval - Duration::from_millis(200),
        "refreshed after {after:?}: not rate limited"
    );
    assert_eq!(api.jwks_requests(), 2, "ten notices, one refresh");

    // Later notices after the window: one more refresh each window at most.
    tokio::time::sleep(min_interval).await;
    hub.unknown_kid.notify_one();
    eventually(
        "a refresh on a notice outside the window",
        Duration::from_secs(3),
        || {
            let n = api.jwks_requests();
            if n == 3 { Ok(()) } else { Err(n.to_string()) }
        },
    )
    .await;

    // A failing API server: the last good identity stays.
    api.set_unavailable(true);
    tokio::time::sleep(min_interval).await;
    hub.unknown_kid.notify_one();
    eventually("a failed refresh counted", Duration::from_secs(5), || {
        let n = counter(&hub.metrics.identity_refreshes, "error");
        if n >= 1 { Ok(()) } else { Err(n.to_string()) }
    })
    .await;
    api.set_unavailable(false);
    assert_eq!(kid(&rx).as_deref(), Some("k2"), "the last good identity is kept");
}
