//! API mode end to end on a real Kubernetes control plane: etcd and kube-apiserver
//! ([`connector_devkit::kube::KubeCluster`]), the real controller binary (`serve --kube`)
//! running as the `connector-proxy` ServiceAccount with exactly the RBAC of `deploy/base`, a
//! real Envoy fed over xDS, a real htpasswd registry, real skopeo and real `kubectl`.
//!
//! What it proves: the CRD applied with `kubectl apply --server-side` validates Connectors (a bad
//! one is refused with the schema's message) and prints its columns; a Connector and Secret
//! applied with kubectl are pulled through with tokens from the TokenRequest API (`kubectl
//! create token --audience oci-connector`, also bound to a Pod), verified with the keys the
//! controller read from the API server's `/openid/v1/jwks`; access follows real RBAC through
//! SubjectAccessReviews (a RoleBinding added or removed takes effect within the cache TTLs);
//! the Connector's status is written by server-side apply under the controller's field
//! manager, and Events are recorded; a broken Secret shows in `AuthReady`; the credential
//! provider's answer for a bound token pulls through the proxy; the API server restarted with a
//! new ServiceAccount key, then without the old one: tokens follow; a deleted Connector is refused.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use connector_devkit::WorkDir;
use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::http::Request;
use connector_devkit::image;
use connector_devkit::kube::KubeCluster;
use connector_devkit::registry::Registry;
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::stack::{envoy_problems, seed_upstream};
use serde_json::{Value, json};

const NS: &str = "demo";
const REPO: &str = "library/app";
const TAG: &str = "v1";
const AUDIENCE: &str = "oci-connector";
const PROXY_URL: &str = "https://192.168.1.10:31567";
const MANIFEST_TYPES: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
const DEADLINE: Duration = Duration::from_secs(30);
/// The controller's access cache TTLs in this test (`--access-allow-ttl-seconds`,
/// `--access-deny-ttl-seconds`); the filter caches for the same time.
const ALLOW_TTL: u64 = 3;
const DENY_TTL: u64 = 1;

fn secret(username: &str, password: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "registry-robot", "namespace": NS,
            "annotations": {"connectors.alauda.io/allowed-connectors": "*"}},
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

fn status(envoy: &Envoy, name: &str, token: &str) -> (u16, String) {
    Request::get(&format!("/v2/namespaces/{NS}/connectors/{name}/{REPO}/manifests/{TAG}"))
        .header("Accept", MANIFEST_TYPES)
        .bearer(token)
        .send(envoy.port)
        .map(|r| (r.status, r.body_text()))
        .unwrap_or((0, String::new()))
}

fn until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(150));
    }
}

fn condition(kube: &KubeCluster, name: &str, type_: &str) -> Option<(String, String, String)> {
    let c = kube.get("connector", NS, name).ok()??;
    let conds = c["status"]["conditions"].as_array()?.clone();
    let found = conds.iter().find(|c| c["type"] == type_)?;
    Some((
        found["status"].as_str()?.to_string(),
        found["reason"].as_str().unwrap_or_default().to_string(),
        found["message"].as_str().unwrap_or_default().to_string(),
    ))
}

fn kubectl(kube: &KubeCluster, args: &[&str]) -> String {
    kube.kubectl(args)
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"))
        .stdout
}

/// The credential provider binary `make e2e` builds next to the controller.
fn provider_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| connector_devkit::repo_root().join("target"));
    let p = target.join("debug/connector-credential-provider");
    assert!(
        p.is_file(),
        "{} is missing: `cargo build -p connector-credential-provider` (make e2e does)",
        p.display()
    );
    p
}

/// Runs the provider as the kubelet would, with the pod's token in the request.
fn provider_answer(proxy: &str, image: &str, token: &str) -> (Value, String) {
    use std::io::Write;
    let request = json!({
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
        "kind": "CredentialProviderRequest",
        "image": image,
        "serviceAccountToken": token,
        "serviceAccountAnnotations": {},
    });
    let mut child = Command::new(provider_binary())
        .args(["--proxy", proxy])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the credential provider");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "provider refused: {stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

#[test]
fn api_mode_on_a_real_api_server() {
    connector_devkit::require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new("controller-kube").unwrap();
    let skopeo = Skopeo::new(&work).unwrap();
    let registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    let (sample, recorder, _minter) =
        seed_upstream(&work, &skopeo, &registry, &creds.username, &creds.password).unwrap();

    let mut kube = KubeCluster::start("kube-e2e").unwrap_or_else(|e| panic!("{e}"));
    eprintln!("etcd + kube-apiserver ready in {:?}", kube.started_in);

    // The CRD, as a user installs it; the API server now validates Connectors itself.
    kube.install_crd().unwrap();
    kube.namespace(NS, &["builder"]).unwrap();
    let bad = kube
        .kubectl_stdin(
            &["apply", "--server-side", "-f", "-"],
            Some(connector("broken", "ftp://registry.example.com").to_string().as_bytes()),
        )
        .unwrap();
    assert!(!bad.success, "a Connector with an ftp:// address was accepted");
    assert!(
        bad.stderr.contains("spec.address") && bad.stderr.contains("should match"),
        "the schema's message: {}",
        bad.stderr
    );

    let kubeconfig = kube.controller_kubeconfig().unwrap();
    kube.apply(&secret(&creds.username, &creds.password)).unwrap();
    kube.apply(&connector("registry", &registry.url())).unwrap();
    // RBAC mode: `builder` may use the connector through the ClusterRole deploy/base ships.
    kubectl(
        &kube,
        &[
            "create",
            "rolebinding",
            "builder-uses-connectors",
            "-n",
            NS,
            "--clusterrole=oci-connector-user",
            "--serviceaccount=demo:builder",
        ],
    );

    let allow_ttl = ALLOW_TTL.to_string();
    let deny_ttl = DENY_TTL.to_string();
    let controller = Controller::start_kube(
        &work,
        &kubeconfig,
        PROXY_URL,
        &[
            "--identity-min-interval-seconds",
            "1",
            "--identity-refresh-seconds",
            "3",
            "--access-allow-ttl-seconds",
            &allow_ttl,
            "--access-deny-ttl-seconds",
            &deny_ttl,
            "--reprobe-seconds",
            "2",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let envoy = Envoy::start_xds(
        &work,
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )
    .unwrap();

    // Real tokens from the TokenRequest API.
    let token = kube.create_token(NS, "builder", AUDIENCE, &[]).unwrap();
    let (_, took) = until("the allowed ServiceAccount pulls", DEADLINE, || {
        (status(&envoy, "registry", &token).0 == 200).then_some(())
    });
    eprintln!("Connector applied with kubectl: served after {took:?} (from Envoy's start)");
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
    // A pull grant is not a push grant: the upload is refused with the verb to grant, and
    // nothing reaches the registry; bound to oci-connector-pusher (deploy/base), it starts.
    let upload = || {
        Request::new(
            "POST",
            &format!("/v2/namespaces/{NS}/connectors/registry/{REPO}/blobs/uploads/"),
        )
        .bearer(&token)
        .send(envoy.port)
        .map(|r| (r.status, r.body_text()))
        .unwrap_or((0, String::new()))
    };
    recorder.take();
    let (code, body) = upload();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("may not push") && body.contains("`push`"), "{body}");
    assert!(
        recorder.take().request_lines().is_empty(),
        "a refused push reached the registry"
    );
    kubectl(
        &kube,
        &[
            "create",
            "rolebinding",
            "builder-pushes",
            "-n",
            NS,
            "--clusterrole=oci-connector-pusher",
            "--serviceaccount=demo:builder",
        ],
    );
    let (_, took) = until("a push grant takes effect", DEADLINE, || {
        (upload().0 == 202).then_some(())
    });
    eprintln!("push granted with oci-connector-pusher: uploads start after {took:?}");

    // A token for another audience is not one for the proxy.
    let other_audience = kube.create_token(NS, "builder", "something-else", &[]).unwrap();
    assert_eq!(status(&envoy, "registry", &other_audience).0, 401);

    // A token bound to a Pod (`--bound-object-kind Pod`), handed to the kubelet credential
    // provider as the kubelet would: its answer pulls through the proxy.
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "puller", "namespace": NS},
        "spec": {"serviceAccountName": "builder", "containers": [{"name": "c", "image": "example.com/app:v1"}]},
    }))
    .unwrap();
    let bound = kube
        .create_token(
            NS,
            "builder",
            AUDIENCE,
            &["--bound-object-kind", "Pod", "--bound-object-name", "puller"],
        )
        .unwrap();
    let proxy = envoy.authority();
    let image_ref = format!("{proxy}/namespaces/{NS}/connectors/registry/{REPO}:{TAG}");
    let (answer, stderr) = provider_answer(&proxy, &image_ref, &bound);
    let entry = &answer["auth"][proxy.as_str()];
    assert_eq!(
        entry["password"],
        bound.as_str(),
        "the pod's bound token is the password"
    );
    assert!(!stderr.contains(&bound), "the token reached the provider's stderr");
    let dest = work.sub("pulled-bound").unwrap();
    recorder.take();
    skopeo
        .copy(
            &format!("docker://{image_ref}"),
            Creds::Basic(entry["username"].as_str().unwrap(), &bound),
            &format!("oci:{}:{TAG}", dest.display()),
            Creds::None,
        )
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("skopeo copy with the provider's answer: {e}"));
    assert_eq!(image::oci_layers(&dest, TAG).unwrap(), sample.layers);
    assert!(!recorder.take().text.contains(&bound), "the token reached the upstream");

    // RBAC: `default` has no binding and is refused; the SubjectAccessReview reached the API.
    let stranger = kube.create_token(NS, "default", AUDIENCE, &[]).unwrap();
    let (code, body) = status(&envoy, "registry", &stranger);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("DENIED"), "OCI error body: {body}");
    let reviews = kube.access_reviews();
    assert!(
        reviews.iter().any(|r| r["user"] == "system:serviceaccount:demo:default"
            && r["resourceAttributes"]["name"] == "registry"
            && r["resourceAttributes"]["resource"] == "connectors"),
        "the filter's question reached the API server as a SubjectAccessReview: {reviews:?}"
    );
    // A RoleBinding added with kubectl takes effect once the denial's TTL has passed.
    kubectl(
        &kube,
        &[
            "create",
            "rolebinding",
            "default-uses-connectors",
            "-n",
            NS,
            "--clusterrole=oci-connector-user",
            "--serviceaccount=demo:default",
        ],
    );
    let (_, took) = until("a new RoleBinding takes effect", DEADLINE, || {
        (status(&envoy, "registry", &stranger).0 == 200).then_some(())
    });
    eprintln!("RoleBinding added: allowed after {took:?} (deny TTL {DENY_TTL} s)");
    assert!(
        took < Duration::from_secs(DENY_TTL + 3),
        "within the deny TTL: {took:?}"
    );
    // Decisions are cached: repeated pulls do not ask the API each time.
    let before = kube.access_reviews().len();
    for _ in 0..20 {
        assert_eq!(status(&envoy, "registry", &token).0, 200);
    }
    assert!(kube.access_reviews().len() <= before + 1, "allow decisions are cached");
    // Removed: refused again once the allow's TTL has passed.
    kubectl(&kube, &["delete", "rolebinding", "default-uses-connectors", "-n", NS]);
    let (_, took) = until("a removed RoleBinding takes effect", DEADLINE, || {
        (status(&envoy, "registry", &stranger).0 == 403).then_some(())
    });
    eprintln!("RoleBinding removed: refused after {took:?} (allow TTL {ALLOW_TTL} s)");
    assert!(
        took < Duration::from_secs(ALLOW_TTL + 3),
        "within the allow TTL: {took:?}"
    );

    // Status: Ready with every condition and the proxy URL, written by server-side apply under
    // the controller's field manager; printer columns; Events.
    until("Ready=True", DEADLINE, || {
        condition(&kube, "registry", "Ready").filter(|c| c.0 == "True")
    });
    let c = kube.get("connector", NS, "registry").unwrap().unwrap();
    assert_eq!(
        c["status"]["proxy"]["httpAddress"]["url"],
        format!("{PROXY_URL}/namespaces/{NS}/connectors/registry")
    );
    for t in ["SecretReady", "LivenessReady", "AuthReady", "ProxyReady"] {
        assert_eq!(condition(&kube, "registry", t).map(|c| c.0), Some("True".into()), "{t}");
    }
    let managed = kubectl(
        &kube,
        &[
            "get",
            "connector",
            "registry",
            "-n",
            NS,
            "--show-managed-fields",
            "-o",
            "json",
        ],
    );
    let managed: Value = serde_json::from_str(&managed).unwrap();
    let status_manager = managed["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["subresource"] == "status")
        .cloned()
        .unwrap_or_default();
    assert_eq!(status_manager["manager"], "connector-controller", "{managed}");
    assert_eq!(
        status_manager["operation"], "Apply",
        "status by server-side apply: {status_manager}"
    );
    let table = kubectl(&kube, &["get", "connectors", "-n", NS]);
    eprintln!("kubectl get connectors -n {NS}:\n{table}");
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "CLASS", "ADDRESS", "READY", "REASON", "AGE"]);
    let row: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        &row[..4],
        ["registry", "oci", registry.url().as_str(), "True"],
        "{table}"
    );
    let events = kubectl(&kube, &["get", "events", "-n", NS, "-o", "json"]);
    let events: Value = serde_json::from_str(&events).unwrap();
    let ours: Vec<&Value> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["involvedObject"]["name"] == "registry" && e["involvedObject"]["kind"] == "Connector")
        .collect();
    assert!(
        ours.iter().any(|e| e["type"] == "Normal" && e["reason"] == "Ready"),
        "Events about the Connector: {ours:?}"
    );

    // The Secret now holds a wrong password: AuthReady=False with a reason a person can act on.
    kube.apply(&secret(&creds.username, "not-the-password")).unwrap();
    let (auth, _) = until("AuthReady=False", DEADLINE, || {
        condition(&kube, "registry", "AuthReady").filter(|c| c.0 == "False")
    });
    assert_eq!(auth.1, "CredentialRejected", "{auth:?}");
    assert!(!auth.2.contains("not-the-password"), "no Secret value in a condition");
    kube.apply(&secret(&creds.username, &creds.password)).unwrap();
    until("AuthReady=True again", DEADLINE, || {
        condition(&kube, "registry", "AuthReady").filter(|c| c.0 == "True")
    });

    // Key rotation, as a cluster does it: the API server restarts with a new signing key (the
    // old one still verifies). Tokens it now issues carry the new key's `kid`: the filter
    // reports the unknown kid, the controller re-reads /openid/v1/jwks, and the token works.
    let jwks_before = kube.jwks_reads();
    let took = kube.restart_adding_key().unwrap();
    eprintln!("kube-apiserver restarted with a second key in {took:?}");
    let new_token = kube.create_token(NS, "builder", AUDIENCE, &[]).unwrap();
    let (_, took) = until("a token of the new key is accepted", DEADLINE, || {
        (status(&envoy, "registry", &new_token).0 == 200).then_some(())
    });
    eprintln!("token signed by the new key accepted after {took:?}");
    assert!(kube.jwks_reads() > jwks_before, "the keys were read again");
    assert_eq!(status(&envoy, "registry", &token).0, 200, "the old key still verifies");
    // The old key is removed: its tokens are refused after the controller's next read.
    let took = kube.restart_removing_oldest_key().unwrap();
    eprintln!("kube-apiserver restarted without the first key in {took:?}");
    let (_, took) = until("a token of the removed key is refused", DEADLINE, || {
        (status(&envoy, "registry", &token).0 == 401).then_some(())
    });
    eprintln!("token of the removed key refused after {took:?}");
    assert_eq!(status(&envoy, "registry", &new_token).0, 200, "the remaining key works");

    // Deleted: refused for new requests within seconds.
    kubectl(&kube, &["delete", "connector", "registry", "-n", NS]);
    let (_, took) = until("the deleted Connector is refused", DEADLINE, || {
        (status(&envoy, "registry", &new_token).0 == 403).then_some(())
    });
    eprintln!("deleted Connector refused after {took:?}");

    let problems = envoy_problems(
        &envoy,
        &[
            ("upstream password".into(), creds.password.clone()),
            ("channel key".into(), controller.key().to_string()),
            ("client token".into(), token.clone()),
            ("bound token".into(), bound.clone()),
        ],
    )
    .unwrap();
    assert!(problems.is_empty(), "Envoy hygiene:\n{}", problems.join("\n"));
    assert!(
        !controller.log().contains(&creds.password),
        "the password is in the controller's log"
    );
    let events = kubectl(&kube, &["get", "events", "-A", "-o", "json"]);
    assert!(!events.contains(&creds.password), "the password is in an Event");
}
