//! End to end: what the kubelet would do with the provider's answer. A real stack (Distribution
//! behind the recorder, Envoy with the release filter, the token minter, skopeo); the real
//! provider binary gets the kubelet's request for a proxy image with a minted ServiceAccount
//! token, and skopeo pulls with exactly the username and password of the auth entry whose key
//! matches the image. The image must arrive intact, the upstream must never see the token, and
//! neither the provider's stderr nor Envoy's log may carry it.

use connector_devkit::image;
use connector_devkit::skopeo::Creds;
use connector_devkit::stack::{
    CONNECTOR_NAME, CONNECTOR_NAMESPACE, REPO, Stack, TAG, check_host_form_resolves, host_name,
};
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_connector-credential-provider");

struct Answer {
    code: i32,
    response: Value,
    stderr: String,
}

/// Runs the provider as the kubelet does: flags from the config's `args`, the request on stdin.
fn ask(args: &[&str], image: &str, token: &str) -> Answer {
    let request = json!({
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
        "kind": "CredentialProviderRequest",
        "image": image,
        "serviceAccountToken": token,
        "serviceAccountAnnotations": {},
    });
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the provider");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let response = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("provider stdout is not JSON ({e}); stderr: {stderr}"));
    Answer {
        code: out.status.code().unwrap_or(-1),
        response,
        stderr,
    }
}

/// The credential the kubelet would hand the runtime: the one auth entry, whose key must be the
/// registry authority of the image (the kubelet matches keys against the image).
fn credential(answer: &Answer, authority: &str) -> (String, String) {
    assert_eq!(answer.code, 0, "provider refused: {}", answer.stderr);
    assert_eq!(answer.response["kind"], "CredentialProviderResponse");
    let auth = answer.response["auth"].as_object().expect("auth object");
    assert_eq!(auth.len(), 1, "one auth entry");
    let entry = auth.get(authority).unwrap_or_else(|| {
        panic!(
            "no auth entry for {authority}; keys {:?}",
            auth.keys().collect::<Vec<_>>()
        )
    });
    (
        entry["username"].as_str().unwrap().to_string(),
        entry["password"].as_str().unwrap().to_string(),
    )
}

fn pull(s: &Stack, reference: &str, user: &str, password: &str, label: &str) -> Vec<String> {
    let dest = s.work.sub(label).unwrap();
    let dest_ref = format!("oci:{}:{TAG}", dest.display());
    s.skopeo
        .copy(reference, Creds::Basic(user, password), &dest_ref, Creds::None)
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("skopeo copy {reference}: {e}"));
    image::oci_layers(&dest, TAG).unwrap()
}

#[test]
fn the_providers_answer_pulls_through_the_proxy() {
    connector_devkit::require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let s = Stack::start("credprov", true).unwrap_or_else(|e| panic!("start the stack: {e}"));
    let proxy = s.envoy.authority();
    let connectors = format!("{CONNECTOR_NAMESPACE}/{CONNECTOR_NAME}");
    let port = s.envoy.port.to_string();
    let args = [
        "--proxy",
        proxy.as_str(),
        "--host-connectors",
        connectors.as_str(),
        "--host-port",
        port.as_str(),
    ];
    let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();

    // Path form: the kubelet's image reference has no transport prefix.
    let image = format!("{proxy}/namespaces/{CONNECTOR_NAMESPACE}/connectors/{CONNECTOR_NAME}/{REPO}:{TAG}");
    let answer = ask(&args, &image, &jwt);
    assert_eq!(answer.response["cacheKeyType"], "Registry");
    let d = answer.response["cacheDuration"].as_str().unwrap_or("");
    assert!(
        matches!(d, "54m0s" | "53m59s" | "53m58s"),
        "a 1 h token is cached 10% less: {d}"
    );
    let (user, password) = credential(&answer, &proxy);
    assert_eq!(password, jwt, "the password is the pod's token itself");
    s.recorder.take();
    let layers = pull(&s, &format!("docker://{image}"), &user, &password, "pulled-path");
    assert_eq!(layers, s.image.layers, "path form: the image arrived intact");
    let seen = s.recorder.take();
    assert!(seen.requests > 0, "the pull reached the upstream");
    assert!(!seen.text.contains(&jwt), "the token reached the upstream");
    assert!(!answer.stderr.contains(&jwt), "the token reached the provider's stderr");

    // Host form, when the connector host names resolve here (scripts/setup.sh).
    match check_host_form_resolves(CONNECTOR_NAMESPACE, CONNECTOR_NAME) {
        Ok(()) => {
            let host = format!("{}:{}", host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME), s.envoy.port);
            let image = format!("{host}/{REPO}:{TAG}");
            let answer = ask(&args, &image, &jwt);
            let (user, password) = credential(&answer, &host);
            let layers = pull(&s, &format!("docker://{image}"), &user, &password, "pulled-host");
            assert_eq!(layers, s.image.layers, "host form: the image arrived intact");
            assert!(!answer.stderr.contains(&jwt));
        }
        Err(e) => panic!("host form not checked: {e}"),
    }

    // Another registry (the upstream itself, reached directly): no credential from us.
    let other = format!("{}/{REPO}:{TAG}", s.registry.authority());
    let answer = ask(&args, &other, &jwt);
    assert_eq!(answer.code, 0, "{}", answer.stderr);
    assert_eq!(answer.response["auth"], json!({}), "another host gets empty auth");
    assert!(!answer.stderr.contains(&jwt));

    // The kubelet without tokenAttributes: no token, a refusal that never prints one either.
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let req = json!({"apiVersion": "credentialprovider.kubelet.k8s.io/v1", "kind": "CredentialProviderRequest", "image": image});
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenAttributes"));

    // An expired token still gets an answer (cached "0s"), and the proxy is what refuses it.
    let expired = s
        .minter
        .token(CONNECTOR_NAMESPACE, "default")
        .expired_since(120)
        .mint()
        .unwrap();
    let answer = ask(&args, &image, &expired);
    assert_eq!(answer.response["cacheDuration"], "0s");
    let (user, password) = credential(&answer, &proxy);
    let dest = s.work.sub("pulled-expired").unwrap();
    let out = s
        .skopeo
        .copy(
            &format!("docker://{image}"),
            Creds::Basic(&user, &password),
            &format!("oci:{}:{TAG}", dest.display()),
            Creds::None,
        )
        .unwrap();
    assert!(!out.success, "an expired token must not pull");

    let problems = s.envoy_hygiene_problems().unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}
