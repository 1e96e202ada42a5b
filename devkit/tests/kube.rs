//! The real control plane the API-mode tests run on: etcd and kube-apiserver start on loopback
//! with RBAC and the ServiceAccount issuer; a TokenRequest token verifies against the keys the
//! API server publishes and names its ServiceAccount; RBAC refuses what is not bound; the
//! audit log sees the requests; a restart with a new key publishes both keys, and one without
//! the old key drops it.

use connector_devkit::kube::{ISSUER, KubeCluster};
use jsonwebtoken::{DecodingKey, Validation, decode, jwk::JwkSet};
use serde_json::Value;

fn raw(kube: &KubeCluster, path: &str) -> Value {
    let out = kube
        .kubectl(&["get", "--raw", path])
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&out.stdout).unwrap()
}

fn verify(jwks: &Value, token: &str) -> Result<Value, String> {
    let set: JwkSet = serde_json::from_value(jwks.clone()).map_err(|e| e.to_string())?;
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("no kid")?;
    let jwk = set.find(&kid).ok_or("unknown kid")?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut v = Validation::new(header.alg);
    v.set_audience(&["oci-connector"]);
    v.set_issuer(&[ISSUER]);
    decode::<Value>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

#[test]
fn a_real_api_server_issues_tokens_publishes_keys_and_enforces_rbac() {
    let mut kube = KubeCluster::start("kube-selftest").unwrap_or_else(|e| panic!("{e}"));
    eprintln!("etcd + kube-apiserver ready in {:?}", kube.started_in);
    let version = kube.kubectl(&["version", "-o", "json"]).unwrap().ok().unwrap();
    let version: Value = serde_json::from_str(&version.stdout).unwrap();
    assert_eq!(
        version["serverVersion"]["gitVersion"],
        connector_devkit::kube::KUBE_VERSION
    );
    assert_eq!(
        version["clientVersion"]["gitVersion"],
        connector_devkit::kube::KUBE_VERSION
    );

    let discovery = raw(&kube, "/.well-known/openid-configuration");
    assert_eq!(discovery["issuer"], ISSUER);
    // The key set is served by the API server itself (its external address, no --service-account-jwks-uri).
    assert_eq!(discovery["jwks_uri"], format!("{}/openid/v1/jwks", kube.url));
    let jwks = raw(&kube, "/openid/v1/jwks");
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);

    kube.namespace("demo", &["builder"]).unwrap();
    let token = kube.create_token("demo", "builder", "oci-connector", &[]).unwrap();
    let claims = verify(&jwks, &token).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(claims["sub"], "system:serviceaccount:demo:builder");
    assert_eq!(claims["kubernetes.io"]["namespace"], "demo");
    assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "builder");
    assert!(verify(&jwks, &kube.create_token("demo", "builder", "other", &[]).unwrap()).is_err());

    // RBAC is on: the ServiceAccount may not list Secrets until bound.
    let can_i = |kube: &KubeCluster| {
        kube.kubectl(&[
            "auth",
            "can-i",
            "list",
            "secrets",
            "-n",
            "demo",
            "--as",
            "system:serviceaccount:demo:builder",
        ])
        .unwrap()
        .stdout
        .trim()
        .to_string()
    };
    assert_eq!(can_i(&kube), "no");
    kube.kubectl(&[
        "create",
        "rolebinding",
        "b",
        "-n",
        "demo",
        "--clusterrole=view",
        "--serviceaccount=demo:builder",
    ])
    .unwrap()
    .ok()
    .unwrap();
    kube.kubectl(&["create", "role", "s", "-n", "demo", "--verb=list", "--resource=secrets"])
        .unwrap()
        .ok()
        .unwrap();
    kube.kubectl(&[
        "create",
        "rolebinding",
        "s",
        "-n",
        "demo",
        "--role=s",
        "--serviceaccount=demo:builder",
    ])
    .unwrap()
    .ok()
    .unwrap();
    assert_eq!(can_i(&kube), "yes");
    assert!(
        kube.audit()
            .iter()
            .any(|e| e["requestURI"] == "/openid/v1/jwks" && e["user"]["username"] == "admin"),
        "the audit log records the key reads"
    );

    // Rotation: a second key signs; both verify; then the first is gone.
    let took = kube.restart_adding_key().unwrap();
    eprintln!("restart with a new key: {took:?}");
    let both = raw(&kube, "/openid/v1/jwks");
    assert_eq!(both["keys"].as_array().unwrap().len(), 2);
    let new_token = kube.create_token("demo", "builder", "oci-connector", &[]).unwrap();
    assert!(verify(&jwks, &new_token).is_err(), "signed by a key the old set lacks");
    verify(&both, &new_token).unwrap();
    verify(&both, &token).unwrap();
    kube.restart_removing_oldest_key().unwrap();
    let last = raw(&kube, "/openid/v1/jwks");
    assert_eq!(last["keys"].as_array().unwrap().len(), 1);
    verify(&last, &new_token).unwrap();
    assert!(verify(&last, &token).is_err(), "the removed key's token");
}
