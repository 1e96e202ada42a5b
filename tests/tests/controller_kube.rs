//! API mode end to end: the real controller binary (`serve --kube`) against the project's
//! stand-in Kubernetes API server (`connector_devkit::kube_api`, the one permitted stand-in: no
//! API server can run here; a real kube-rs client talks to it over HTTP), a real Envoy fed over
//! xDS, a real htpasswd registry, real skopeo.
//!
//! What it proves: a Connector and Secret applied to the API are pulled through within seconds;
//! access follows RBAC (SubjectAccessReview) through the filter; the Connector's status and
//! Events are written back; a broken Secret shows in `AuthReady`; a rotated ServiceAccount key
//! is picked up after the filter reports the unknown `kid`, and a removed one is refused after
//! the next read of the keys; a deleted Connector is refused.

use std::time::{Duration, Instant};

use connector_devkit::WorkDir;
use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::http::Request;
use connector_devkit::image;
use connector_devkit::kube_api::{AccessRule, KubeApi};
use connector_devkit::registry::Registry;
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::stack::{envoy_problems, seed_upstream};
use connector_devkit::tokens::{ISSUER, Minter};
use serde_json::{Value, json};

const NS: &str = "demo";
const REPO: &str = "library/app";
const TAG: &str = "v1";
const PROXY_URL: &str = "http://192.168.1.10:31567";
const MANIFEST_TYPES: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
const DEADLINE: Duration = Duration::from_secs(15);

fn secret(username: &str, password: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "registry-robot", "namespace": NS},
        "type": "cpaas.io/distribution-registry-token",
        "stringData": {"username": username, "password": password},
    })
}

fn connector(name: &str, address: &str) -> Value {
    json!({
        "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"address": address, "auth": {"name": "basicAuth", "secretRef": {"name": "registry-robot"}}, "connectorClassName": "oci"},
    })
}

fn may_get(user: &str, name: &str) -> AccessRule {
    AccessRule {
        user: Some(user.into()),
        verb: "get".into(),
        api_group: "connectors.alauda.io".into(),
        resource: "connectors".into(),
        namespace: NS.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn status(envoy: &Envoy, name: &str, token: &str) -> (u16, String) {
    Request::get(&format!("/v2/namespaces/{NS}/connectors/{name}/{REPO}/manifests/{TAG}"))
        .header("Accept", MANIFEST_TYPES)
        .bearer(token)
        .send(envoy.port)
        .map(|r| (r.status, r.body_text()))
        .unwrap_or((0, String::new()))
}

fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < DEADLINE, "{what}: not within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(150));
    }
}

fn condition(api: &KubeApi, name: &str, type_: &str) -> Option<(String, String, String)> {
    let c = api.get("connectors.alauda.io/v1alpha1", "Connector", NS, name)?;
    let conds = c["status"]["conditions"].as_array()?.clone();
    let found = conds.iter().find(|c| c["type"] == type_)?;
    Some((
        found["status"].as_str()?.to_string(),
        found["reason"].as_str().unwrap_or_default().to_string(),
        found["message"].as_str().unwrap_or_default().to_string(),
    ))
}

#[test]
fn api_mode_status_rbac_key_rotation_and_deletion() {
    connector_devkit::require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new("controller-kube").unwrap();
    let skopeo = Skopeo::new(&work).unwrap();
    let registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    let (sample, _recorder, minter) =
        seed_upstream(&work, &skopeo, &registry, &creds.username, &creds.password).unwrap();

    let api = KubeApi::start().unwrap();
    api.set_issuer(ISSUER);
    api.set_jwks(minter.jwks());
    api.apply(secret(&creds.username, &creds.password)).unwrap();
    api.apply(connector("registry", &registry.url())).unwrap();
    let builder = "system:serviceaccount:demo:builder";
    api.allow(may_get(builder, "registry"));

    let controller = Controller::start_kube(
        &work,
        &api.url(),
        PROXY_URL,
        &[
            "--identity-min-interval-seconds",
            "1",
            "--identity-refresh-seconds",
            "2",
            "--access-deny-ttl-seconds",
            "1",
            "--reprobe-seconds",
            "2",
        ],
    )
    .unwrap();
    let envoy = Envoy::start_xds(
        &work,
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )
    .unwrap();

    // RBAC: the ServiceAccount the rule names pulls; one without a rule is refused with a 403.
    let token = minter.valid(NS, "builder").unwrap();
    let (_, took) = until("the allowed ServiceAccount pulls", || {
        (status(&envoy, "registry", &token).0 == 200).then_some(())
    });
    eprintln!("Connector applied to the API: served after {took:?} (from Envoy's start)");
    let reference = format!(
        "docker://{}/namespaces/{NS}/connectors/registry/{REPO}:{TAG}",
        envoy.authority()
    );
    let dest = work.sub("pulled").unwrap();
    skopeo
        .copy(
            &reference,
            Creds::Basic("sa", &token),
            &format!("oci:{}:{TAG}", dest.display()),
            Creds::None,
        )
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("skopeo copy: {e}"));
    assert_eq!(image::oci_layers(&dest, TAG).unwrap(), sample.layers);

    let stranger = minter.valid(NS, "default").unwrap();
    let (code, body) = status(&envoy, "registry", &stranger);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("DENIED"), "OCI error body: {body}");
    let reviews = api.access_reviews();
    assert!(
        reviews.iter().any(|r| r["user"] == "system:serviceaccount:demo:default" && r["resourceAttributes"]["name"] == "registry"),
        "the filter's question reached the API as a SubjectAccessReview: {reviews:?}"
    );
    // Granted: allowed once the short-lived denial has expired.
    api.allow(may_get("system:serviceaccount:demo:default", "registry"));
    until("a new RoleBinding takes effect", || {
        (status(&envoy, "registry", &stranger).0 == 200).then_some(())
    });
    // Decisions are cached: repeated pulls do not ask the API each time.
    let before = api.access_reviews().len();
    for _ in 0..20 {
        assert_eq!(status(&envoy, "registry", &token).0, 200);
    }
    assert!(api.access_reviews().len() <= before + 1, "allow decisions are cached");

    // Status written back: Ready, with the proxy address in path form; Events on the way.
    until("Ready=True", || {
        condition(&api, "registry", "Ready").filter(|c| c.0 == "True")
    });
    let c = api
        .get("connectors.alauda.io/v1alpha1", "Connector", NS, "registry")
        .unwrap();
    assert_eq!(
        c["status"]["proxy"]["httpAddress"]["url"],
        format!("{PROXY_URL}/namespaces/{NS}/connectors/registry")
    );
    for t in ["SecretReady", "LivenessReady", "AuthReady", "ProxyReady"] {
        assert_eq!(condition(&api, "registry", t).map(|c| c.0), Some("True".into()), "{t}");
    }
    assert!(
        api.events()
            .iter()
            .any(|e| e["regarding"]["name"] == "registry" || e["involvedObject"]["name"] == "registry"),
        "Events about the Connector: {:?}",
        api.events()
    );

    // The Secret now holds a wrong password: AuthReady=False with a reason a person can act on.
    api.apply(secret(&creds.username, "not-the-password")).unwrap();
    let (auth, _) = until("AuthReady=False", || {
        condition(&api, "registry", "AuthReady").filter(|c| c.0 == "False")
    });
    assert_eq!(auth.1, "CredentialRejected", "{auth:?}");
    assert!(!auth.2.contains("not-the-password"), "no Secret value in a condition");
    api.apply(secret(&creds.username, &creds.password)).unwrap();
    until("AuthReady=True again", || {
        condition(&api, "registry", "AuthReady").filter(|c| c.0 == "True")
    });

    // The cluster's keys rotate: a token signed with the new key is refused once (unknown kid),
    // the filter tells the controller, which re-reads the keys; then the token works.
    // A second key pair; its RSA key is published as `rsa-2` (the minter names its own `rsa-1`).
    let rotated = Minter::new(&work.sub("keys-2").unwrap()).unwrap();
    let mut new_key = rotated.jwks()["keys"][0].clone();
    new_key["kid"] = json!("rsa-2");
    let mut keys = minter.jwks();
    keys["keys"].as_array_mut().unwrap().push(new_key);
    api.set_jwks(keys);
    let new_token = rotated.token(NS, "builder").kid(Some("rsa-2")).mint().unwrap();
    let jwks_reads = api.jwks_requests();
    let (first, _) = status(&envoy, "registry", &new_token);
    assert_eq!(first, 401, "a key the filter does not know yet");
    let (_, took) = until("the rotated key is accepted", || {
        (status(&envoy, "registry", &new_token).0 == 200).then_some(())
    });
    eprintln!("rotated ServiceAccount key accepted after {took:?}");
    assert!(api.jwks_requests() > jwks_reads, "the keys were read again");

    // The old key is removed from the cluster: tokens it signed are refused after the next
    // periodic read of the keys (the verified-token cache goes with the old configuration).
    let only_new = json!({ "keys": [rotated.jwks()["keys"][0].clone()] });
    let mut only_new = only_new;
    only_new["keys"][0]["kid"] = json!("rsa-2");
    api.set_jwks(only_new);
    let (_, took) = until("a token of the removed key is refused", || {
        (status(&envoy, "registry", &token).0 == 401).then_some(())
    });
    eprintln!("removed ServiceAccount key refused after {took:?}");
    assert_eq!(
        status(&envoy, "registry", &new_token).0,
        200,
        "the remaining key still works"
    );

    // Deleted: refused for new requests within seconds.
    assert!(api.delete("connectors.alauda.io/v1alpha1", "Connector", NS, "registry"));
    let (_, took) = until("the deleted Connector is refused", || {
        (status(&envoy, "registry", &new_token).0 == 403).then_some(())
    });
    eprintln!("deleted Connector refused after {took:?}");

    let problems = envoy_problems(
        &envoy,
        &[
            ("upstream password".into(), creds.password.clone()),
            ("channel key".into(), controller.key().to_string()),
            ("client token".into(), token.clone()),
        ],
    )
    .unwrap();
    assert!(problems.is_empty(), "Envoy hygiene:\n{}", problems.join("\n"));
    let log = controller.log();
    assert!(
        !log.contains(&creds.password),
        "the password is in the controller's log"
    );
    for e in api.events() {
        assert!(!e.to_string().contains(&creds.password), "the password is in an Event");
    }
}
