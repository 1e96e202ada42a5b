//! The real binary as the kubelet runs it: a request on stdin, flags from the config's `args`,
//! variables from its `env`; the response on stdout, refusals as an exit code and a line on
//! stderr. Every run checks that the token never reaches stderr.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_connector-credential-provider");
const PROXY: &str = "10.1.2.3:31567";
const PATH_IMAGE: &str = "10.1.2.3:31567/namespaces/demo/connectors/registry/library/app:v1";
const HOST_IMAGE: &str = "c-registry-connector.demo.svc.cluster.local/library/app:v1";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Run {
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the provider");
    // The kubelet writes the whole request and closes stdin. A usage error exits without reading
    // it: a broken pipe is then expected.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write the request: {e}");
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A JWT-shaped token expiring `secs` from now (the provider reads `exp` without verifying).
fn token(secs: i64) -> String {
    let enc = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        enc(json!({"alg": "RS256", "kid": "rsa-1"})),
        enc(json!({"sub": "system:serviceaccount:demo:default", "aud": ["oci-connector"], "exp": now() + secs})),
        URL_SAFE_NO_PAD.encode(b"not-a-real-signature-but-long-enough")
    )
}

fn request(image: &str, token: Option<&str>) -> Vec<u8> {
    let mut r = json!({
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
        "kind": "CredentialProviderRequest",
        "image": image,
        "serviceAccountAnnotations": {},
    });
    if let Some(t) = token {
        r["serviceAccountToken"] = json!(t);
    }
    r.to_string().into_bytes()
}

/// Go duration text (`54m0s`) back to seconds.
fn seconds(d: &str) -> u64 {
    let (mut total, mut n) = (0, 0);
    for c in d.chars() {
        match c {
            '0'..='9' => n = n * 10 + c.to_digit(10).unwrap() as u64,
            'h' => (total, n) = (total + n * 3600, 0),
            'm' => (total, n) = (total + n * 60, 0),
            's' => (total, n) = (total + n, 0),
            _ => panic!("not a Go duration: {d}"),
        }
    }
    total
}

fn ok_response(r: &Run) -> Value {
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert!(
        r.stderr.is_empty(),
        "a served request writes nothing on stderr: {}",
        r.stderr
    );
    let v: Value = serde_json::from_str(&r.stdout).expect("stdout is one JSON response");
    assert_eq!(v["apiVersion"], "credentialprovider.kubelet.k8s.io/v1");
    assert_eq!(v["kind"], "CredentialProviderResponse");
    assert_eq!(v["cacheKeyType"], "Registry");
    v
}

#[test]
fn proxy_images_get_the_token_as_password() {
    let t = token(3600);
    let suffix_env = [
        ("OCI_CONNECTOR_PROXY", PROXY),
        ("OCI_CONNECTOR_HOST_CONNECTORS", "demo/registry"),
    ];
    /// (args, env, image, auth key)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: [Case; 4] = [
        (&["--proxy", PROXY], &[], PATH_IMAGE, PROXY),
        (
            &["--proxy", PROXY, "--host-connectors", "demo/registry"],
            &[],
            HOST_IMAGE,
            "c-registry-connector.demo.svc.cluster.local",
        ),
        (&[], &suffix_env, PATH_IMAGE, PROXY),
        (
            &[],
            &suffix_env,
            HOST_IMAGE,
            "c-registry-connector.demo.svc.cluster.local",
        ),
    ];
    for (args, env, image, key) in cases {
        let r = run(args, env, &request(image, Some(&t)));
        let v = ok_response(&r);
        let auth = v["auth"].as_object().unwrap();
        assert_eq!(auth.len(), 1, "{image}: {}", v["auth"]);
        assert_eq!(auth[key]["username"], "serviceaccount");
        assert_eq!(auth[key]["password"], t.as_str());
        // One hour left: cached ten per cent less (a second may pass between minting and answering).
        let d = seconds(v["cacheDuration"].as_str().unwrap());
        assert!((3230..=3240).contains(&d), "cacheDuration {d}s for a 1 h token");
    }
}

#[test]
fn cache_duration_follows_the_token() {
    for (token, lo, hi) in [
        (token(600), 530, 540),
        (token(-60), 0, 0),        // expired: "0s", never negative
        ("opaque".into(), 60, 60), // no readable exp: short
    ] {
        let v = ok_response(&run(&["--proxy", PROXY], &[], &request(PATH_IMAGE, Some(&token))));
        let d = seconds(v["cacheDuration"].as_str().unwrap());
        assert!((lo..=hi).contains(&d), "{d} not in {lo}..={hi}");
        assert_eq!(v["auth"][PROXY]["password"], token.as_str());
    }
}

#[test]
fn other_registries_get_empty_auth() {
    let t = token(3600);
    for image in [
        "docker.io/library/nginx:1.27",
        "nginx",
        "ghcr.io/org/app:v1",
        "10.1.2.3:5000/namespaces/demo/connectors/registry/app:v1",
    ] {
        for tok in [Some(t.as_str()), None] {
            let r = run(&["--proxy", PROXY], &[], &request(image, tok));
            let v = ok_response(&r);
            assert_eq!(v["auth"], json!({}), "{image}");
            assert!(v.get("cacheDuration").is_none());
        }
    }
}

#[test]
fn refusals_exit_non_zero_and_say_what_to_fix() {
    let t = token(3600);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut r: Value = serde_json::from_slice(&request(PATH_IMAGE, Some(&t))).unwrap();
        f(&mut r);
        r.to_string().into_bytes()
    };
    // (stdin, exit code, words on stderr)
    let cases: Vec<(Vec<u8>, i32, Vec<&str>)> = vec![
        (
            request(PATH_IMAGE, None),
            3,
            vec![
                "no serviceAccountToken",
                "tokenAttributes",
                "serviceAccountTokenAudience: oci-connector",
                "request-serviceaccounts-token-audience",
            ],
        ),
        (request(PATH_IMAGE, Some("")), 3, vec!["tokenAttributes"]),
        (
            b"not json".to_vec(),
            2,
            vec![
                "not a CredentialProviderRequest JSON object",
                "credentialprovider.kubelet.k8s.io/v1",
            ],
        ),
        (b"".to_vec(), 2, vec!["not a CredentialProviderRequest JSON object"]),
        (
            with(&|r| r["kind"] = json!("Pod")),
            2,
            vec!["kind is \"Pod\"", "expected \"CredentialProviderRequest\""],
        ),
        (
            with(&|r| r["apiVersion"] = json!("credentialprovider.kubelet.k8s.io/v1beta1")),
            2,
            vec!["v1beta1", "expected \"credentialprovider.kubelet.k8s.io/v1\""],
        ),
        (
            with(&|r| {
                r.as_object_mut().unwrap().remove("image");
            }),
            2,
            vec!["no \"image\""],
        ),
        (with(&|r| r["serviceAccountAnnotations"] = json!(t)), 0, vec![]), // annotations are not read
    ];
    for (stdin, code, words) in cases {
        let r = run(&["--proxy", PROXY], &[], &stdin);
        assert_eq!(r.code, code, "{}: stderr {}", String::from_utf8_lossy(&stdin), r.stderr);
        assert!(!r.stderr.contains(&t), "the token reached stderr");
        if code == 0 {
            continue;
        }
        assert!(r.stdout.is_empty(), "a refusal writes no response: {}", r.stdout);
        assert_eq!(
            r.stderr.lines().count(),
            1,
            "one line for the kubelet's log: {}",
            r.stderr
        );
        for w in words {
            assert!(r.stderr.contains(w), "stderr {:?} lacks {w:?}", r.stderr);
        }
    }
}

/// Issue 12, item 12: any namespace can create a Service `c-<x>-connector.<its ns>`. Only the
/// host names of the connectors the operator lists get the pod's token; every other name of
/// that shape gets an empty answer, like any other registry.
#[test]
fn only_configured_host_names_get_a_token() {
    let t = token(3600);
    let args = ["--proxy", PROXY, "--host-connectors", "demo/registry"];
    for (image, key) in [
        (HOST_IMAGE, Some("c-registry-connector.demo.svc.cluster.local")),
        ("c-x-connector.evil.svc.cluster.local/library/app:v1", None),
        ("c-registry-connector.evil.svc.cluster.local/library/app:v1", None),
        ("c-other-connector.demo.svc.cluster.local/library/app:v1", None),
        ("c-registry-connector.demo.svc.cluster.local:8080/library/app:v1", None),
    ] {
        let v = ok_response(&run(&args, &[], &request(image, Some(&t))));
        match key {
            Some(key) => {
                assert_eq!(v["auth"].as_object().unwrap().len(), 1, "{image}: {}", v["auth"]);
                assert_eq!(v["auth"][key]["password"], t.as_str(), "{image}");
            }
            None => {
                assert_eq!(v["auth"], json!({}), "{image} is not configured: no token");
                assert!(!v.to_string().contains(&t), "{image}");
            }
        }
    }
    // Without --host-connectors the host form is off altogether.
    let v = ok_response(&run(&["--proxy", PROXY], &[], &request(HOST_IMAGE, Some(&t))));
    assert_eq!(v["auth"], json!({}), "host form not configured");
}

#[test]
fn usage_errors() {
    let req = request(PATH_IMAGE, Some("x.y.z"));
    for (args, code, words) in [
        (&[][..], 1, "--proxy <host[:port]> or set OCI_CONNECTOR_PROXY"),
        (&["--proxy", "http://10.1.2.3:31567"][..], 1, "not host[:port]"),
        (&["--bogus"][..], 1, "unexpected argument '--bogus'"),
        (
            &["--proxy", PROXY, "--host-suffix", "*.svc.cluster.local"][..],
            1,
            "--host-suffix was removed",
        ),
        (
            &["--proxy", PROXY, "--host-port", "8080"][..],
            1,
            "--host-port is set but --host-connectors is not",
        ),
        (&["--help"][..], 0, ""),
    ] {
        let r = run(args, &[], &req);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(words), "{args:?}: {}", r.stderr);
        if code == 0 {
            assert!(r.stdout.contains("CredentialProvider"), "{}", r.stdout);
        }
    }
}
