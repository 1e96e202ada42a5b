//! The configuration's tests: every field's checks, every problem reported with its path.

use super::*;
use crate::testkeys;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::Value;

fn env(name: &str) -> Option<String> {
    match name {
        "REG_PASSWORD" => Some("s3cret-pass".into()),
        "REG_USER" => Some("robot$ci".into()),
        _ => None,
    }
}

pub fn doc() -> Value {
    serde_json::json!({
        "identity": {
            "issuers": [testkeys::ISSUER],
            "audiences": [testkeys::AUDIENCE],
            "jwks": testkeys::jwks()
        },
        "connectors": [{
            "namespace": "demo", "name": "registry",
            "address": "http://127.0.0.1:5000/",
            "cluster": "upstream_demo",
            "credential": {"username": "robot", "passwordEnv": "REG_PASSWORD"},
            "allowedNamespaces": ["ci"],
            "allowedServiceAccounts": ["build/kaniko"],
            "hosts": ["Registry.Internal"]
        }]
    })
}

/// The connectors in document order, as a list to index.
fn list(c: &Config) -> Vec<std::rc::Rc<Connector>> {
    c.connectors().cloned().collect()
}

fn compile_value(v: &Value) -> Result<Config, Vec<ConfigError>> {
    compile(v.to_string().as_bytes(), &env)
}

#[test]
fn cluster_names_as_envoy_and_istio_write_them() {
    for (name, ok) in [
        ("upstream_https_harbor_example_com_443_0123abcd", true),
        ("outbound|443||registry.example.com", true),
        ("a b", false),
        ("a\r\nx-injected: 1", false),
        ("a,b", false),
    ] {
        let mut d = doc();
        d["connectors"][0]["cluster"] = serde_json::json!(name);
        let paths: Vec<String> = compile_value(&d)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(
            !paths.contains(&"connectors[0].cluster".to_string()),
            ok,
            "{name:?}: {paths:?}"
        );
    }
}

/// The state of a proxy whose controller has not written its configuration yet (the Istio
/// WasmPlugin as shipped): no keys and no connectors is valid only under a controller.
#[test]
fn an_empty_key_set_is_valid_only_for_a_controller_managed_configuration_without_connectors() {
    let waiting = serde_json::json!({
        "controller": {"cluster": "outbound|18001||connector-controller.local"},
        "authorization": "controller",
        "identity": {"issuers": ["https://k8s"], "audiences": ["oci-connector"], "jwks": {"keys": []}},
        "connectors": []
    });
    let c = compile_value(&waiting).unwrap();
    assert!(c.policy.keys.is_empty() && c.connectors().len() == 0);

    let mut with_connector = doc();
    with_connector["controller"] = serde_json::json!({"cluster": "channel"});
    with_connector["identity"]["jwks"] = serde_json::json!({"keys": []});
    let mut without_controller = waiting.clone();
    without_controller.as_object_mut().unwrap().remove("controller");
    without_controller["authorization"] = serde_json::json!("rules");
    let mut bad_connector_only = waiting.clone();
    bad_connector_only["connectors"] = serde_json::json!([{"name": "x"}]);
    for (what, d) in [
        ("a connector nobody could use", with_connector),
        ("no controller", without_controller),
        ("a connector the validator refuses", bad_connector_only),
    ] {
        let Err(errors) = compile_value(&d) else {
            panic!("{what}: accepted")
        };
        assert!(
            errors.iter().any(|e| e.path == "identity.jwks.keys"),
            "{what}: {errors:?}"
        );
    }
}

#[test]
fn a_valid_document_compiles_with_defaults() {
    let c = compile_value(&doc()).unwrap();
    assert_eq!(c.realm, DEFAULT_REALM);
    assert_eq!(c.policy.clock_skew, 60);
    assert_eq!(c.token_cache_size, 10_000);
    let k = c.connector("demo", "registry").unwrap();
    assert_eq!(
        k.upstream,
        Upstream {
            scheme: "http".into(),
            authority: "127.0.0.1:5000".into()
        }
    );
    let basic = format!("Basic {}", STANDARD.encode("robot:s3cret-pass"));
    assert_eq!(k.credential, UpstreamCredential::Static(basic.clone()));
    assert!(format!("{k:?}").contains("<redacted>"));
    assert!(!format!("{k:?}").contains(&basic));
    assert!(
        c.connector_by_host("c-registry-connector.demo.svc.cluster.local")
            .is_some()
    );
    assert!(c.connector_by_host("registry.internal").is_some());
    assert!(
        c.connector_by_host("c-other-connector.demo.svc.cluster.local")
            .is_none()
    );
    assert!(c.looks_like_connector_host("c-other-connector.demo.svc.cluster.local"));
    assert!(c.looks_like_connector_host("c-a.b-c-connector.x-y.svc.cluster.local"));
    assert!(!c.looks_like_connector_host("127.0.0.1"));
    assert!(!c.looks_like_connector_host("c--connector.demo.svc.cluster.local"));
}

#[test]
fn username_from_env() {
    let mut d = doc();
    d["connectors"][0]["credential"] = serde_json::json!({"usernameEnv": "REG_USER", "passwordEnv": "REG_PASSWORD"});
    let c = compile_value(&d).unwrap();
    assert_eq!(
        list(&c)[0].credential,
        UpstreamCredential::Static(format!("Basic {}", STANDARD.encode("robot$ci:s3cret-pass")))
    );
}

#[test]
fn every_error_is_listed_with_its_path() {
    let mut d = doc();
    d["identity"]["audiences"] = serde_json::json!([]);
    d["identity"]["clockSkewSeconds"] = serde_json::json!(300);
    d["identity"]["jwks"]["keys"][0]["kty"] = serde_json::json!("oct");
    d["identity"]["extra"] = serde_json::json!(1);
    d["proxy"] = serde_json::json!({"hostPattern": "{name}.example"});
    d["connectors"][0]["address"] = serde_json::json!("ftp://x");
    d["connectors"][0]["credential"] =
        serde_json::json!({"username": "u", "password": "hunter2-secret", "passwordEnv": "MISSING"});
    d["connectors"][0]["allowedServiceAccounts"] = serde_json::json!(["nobody"]);
    d["connectors"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"namespace": "Bad_NS"}));
    let errors = compile_value(&d).err().unwrap();
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "identity.audiences",
        "identity.clockSkewSeconds",
        "identity.jwks.keys[0].kty",
        "identity.extra",
        "proxy.hostPattern",
        "connectors[0].address",
        "connectors[0].credential.password",
        "connectors[0].credential.passwordEnv",
        "connectors[0].allowedServiceAccounts[0]",
        "connectors[1].namespace",
        "connectors[1].name",
        "connectors[1].address",
        "connectors[1].cluster",
        "connectors[1].credential",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
    // No error message ever carries a secret value.
    for e in &errors {
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}

#[test]
fn docker_config_json_credentials() {
    let config = |json: &str, address: &str| {
        let mut d = doc();
        d["connectors"][0]["address"] = serde_json::json!(address);
        d["connectors"][0]["credential"] = serde_json::json!({"dockerConfigJsonEnv": "DOCKER_CONFIG_JSON"});
        let json = json.to_string();
        compile(d.to_string().as_bytes(), &move |k| {
            (k == "DOCKER_CONFIG_JSON").then(|| json.clone())
        })
    };
    let b64 = STANDARD.encode("robot$x:s3cret");
    let want = format!("Basic {b64}");
    for (json, address) in [
        (
            format!(r#"{{"auths":{{"harbor.example.com":{{"auth":"{b64}"}}}}}}"#),
            "https://harbor.example.com",
        ),
        (
            format!(r#"{{"auths":{{"https://harbor.example.com":{{"auth":"{b64}"}}}}}}"#),
            "https://harbor.example.com:443",
        ),
        (
            r#"{"auths":{"127.0.0.1:5000":{"username":"robot$x","password":"s3cret"}}}"#.to_string(),
            "http://127.0.0.1:5000",
        ),
        (
            format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{b64}"}}}}}}"#),
            "https://registry-1.docker.io",
        ),
    ] {
        let c = config(&json, address).map_err(|e| format!("{e:?}")).unwrap();
        assert_eq!(
            list(&c)[0].credential,
            UpstreamCredential::Static(want.clone()),
            "{json}"
        );
    }
    for (json, needle) in [
        (
            r#"{"auths":{"other.example.com":{"auth":"eDp5"}}}"#,
            "has no entry for harbor.example.com (entries: other.example.com)",
        ),
        ("not json", "is not valid JSON"),
        (r#"{"auths":{"harbor.example.com":{"auth":"!!"}}}"#, "is not base64"),
        (r#"{"auths":{"harbor.example.com":{}}}"#, "neither"),
    ] {
        let errors = config(json, "https://harbor.example.com").err().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e.path == "connectors[0].credential.dockerConfigJsonEnv" && e.message.contains(needle)),
            "{json}: {errors:?}"
        );
    }
}

#[test]
fn token_realms_are_validated() {
    let mut d = doc();
    d["connectors"][0]["tokenRealms"] =
        serde_json::json!([{"url": "https://auth.example.com/token", "cluster": "auth"}, {"url": "ftp://x"}, "nope"]);
    let errors = compile_value(&d).err().unwrap();
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "connectors[0].tokenRealms[1].url",
        "connectors[0].tokenRealms[1].cluster",
        "connectors[0].tokenRealms[2]",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
    d["connectors"][0]["tokenRealms"] =
        serde_json::json!([{"url": "https://Auth.Example.com:443/token", "cluster": "auth"}]);
    let c = compile_value(&d).unwrap();
    let r = &list(&c)[0].token_realms[0];
    assert_eq!(
        (r.scheme.as_str(), r.authority.as_str(), r.path.as_str()),
        ("https", "auth.example.com", "/token")
    );
}

#[test]
fn duplicates_are_refused() {
    let mut d = doc();
    let copy = d["connectors"][0].clone();
    d["connectors"].as_array_mut().unwrap().push(copy);
    let errors = compile_value(&d).err().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.path == "connectors[1]" && e.message.contains("twice")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.path == "connectors[1].hosts"), "{errors:?}");
}

#[test]
fn malformed_json_and_wrong_types() {
    let e = compile(b"{", &env).err().unwrap();
    assert_eq!(e[0].path, "$");
    let e = compile(b"[]", &env).err().unwrap();
    assert!(e.iter().any(|e| e.path == "$" && e.message.contains("object")));
    assert!(e.iter().any(|e| e.path == "identity"));
    assert!(e.iter().any(|e| e.path == "connectors"));
}

#[test]
fn weak_or_mismatched_keys_are_refused() {
    let mut d = doc();
    d["identity"]["jwks"]["keys"][0]["n"] = serde_json::json!("AQAB");
    d["identity"]["jwks"]["keys"][1]["alg"] = serde_json::json!("ES384");
    let errors = compile_value(&d).err().unwrap();
    assert!(errors.iter().any(|e| e.path == "identity.jwks.keys[0].n"), "{errors:?}");
    assert!(
        errors.iter().any(|e| e.path == "identity.jwks.keys[1].alg"),
        "{errors:?}"
    );
}

#[test]
fn check_jwk_accepts_what_compile_accepts_and_explains_the_rest() {
    let good = doc()["identity"]["jwks"]["keys"][0].clone();
    assert!(check_jwk(&good, "k").is_ok());
    for (key, path) in [
        (
            serde_json::json!({"kty": "EC", "crv": "P-521", "kid": "a", "x": "AA", "y": "AA"}),
            "k.crv",
        ),
        (
            serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "b", "x": "AA"}),
            "k.kty",
        ),
        (
            serde_json::json!({"kty": "RSA", "kid": "c", "n": URL_SAFE_NO_PAD.encode([0xc5u8; 128]), "e": "AQAB"}),
            "k.n",
        ),
    ] {
        let errors = check_jwk(&key, "k").unwrap_err();
        assert!(errors.iter().any(|e| e.path == path), "{key}: {errors:?}");
    }
}

#[test]
fn credential_from_the_controller_channel() {
    let env = |k: &str| (k == "CHANNEL_KEY").then(|| "k3y".to_string());
    let mut d = doc();
    d["controller"] = serde_json::json!({"cluster": "connector_controller", "keyEnv": "CHANNEL_KEY"});
    d["authorization"] = serde_json::json!("controller");
    d["connectors"][0]["credential"] = serde_json::json!({"fromController": "r7"});
    let c = compile(d.to_string().as_bytes(), &env).unwrap();
    assert_eq!(
        list(&c)[0].credential,
        UpstreamCredential::Controller { revision: "r7".into() }
    );
    assert_eq!(c.access, AccessMode::Controller);
    let ch = c.controller.as_ref().unwrap();
    assert_eq!(
        (ch.cluster.as_str(), ch.authority.as_str(), ch.key.as_deref()),
        ("connector_controller", "connector-controller", Some("k3y"))
    );
    assert!(!format!("{ch:?}").contains("k3y"), "the channel key is redacted");

    // Every problem at once: no channel for fromController or RBAC, bad revision, key unset.
    let mut d = doc();
    d["authorization"] = serde_json::json!("controller");
    d["connectors"][0]["credential"] = serde_json::json!({"fromController": "r7"});
    let mut second = d["connectors"][0].clone();
    second["name"] = serde_json::json!("second");
    second["hosts"] = serde_json::json!([]);
    second["credential"] = serde_json::json!({"fromController": "r 7"});
    d["connectors"].as_array_mut().unwrap().push(second);
    let errs = compile(d.to_string().as_bytes(), &env).err().unwrap();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "authorization",
            "connectors[0].credential.fromController",
            "connectors[1].credential.fromController"
        ],
        "{errs:?}"
    );
    let mut d = doc();
    d["controller"] = serde_json::json!({"cluster": "c", "keyEnv": "UNSET"});
    d["authorization"] = serde_json::json!("rbac");
    let errs = compile(d.to_string().as_bytes(), &env).err().unwrap();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    // The document's own problems first, then what the VM's environment lacks.
    assert_eq!(
        paths,
        [
            "authorization",
            "controller.keyEnv",
            "connectors[0].credential.passwordEnv"
        ],
        "{errs:?}"
    );
}

/// `n` connectors the controller's way (credentials from the channel), connector `changed`
/// with revision `rev`.
fn controller_doc(n: usize, changed: usize, rev: &str) -> Value {
    let mut d = doc();
    d["controller"] = serde_json::json!({"cluster": "ctl", "authority": "controller"});
    d["connectors"] = (0..n)
        .map(|i| {
            serde_json::json!({
                "namespace": format!("team-{}", i % 3), "name": format!("c{i}"),
                "address": "https://registry.internal:5000",
                "cluster": "upstream_registry",
                "credential": {"fromController": if i == changed { rev.to_string() } else { format!("r0-{i}") }},
            })
        })
        .collect();
    d
}

#[test]
fn a_push_reuses_the_keys_it_repeats_and_builds_a_changed_one() {
    use connector_core::keys::PublicKey;
    let ec_table = |c: &Config| match c.policy.keys.get(testkeys::EC_KID).map(|k| &k.key) {
        Some(PublicKey::P256(k)) => std::rc::Rc::clone(k),
        _ => panic!("the EC key is ES256"),
    };
    let first = compile_value(&controller_doc(3, 9, "")).unwrap();
    let next = compile_after(controller_doc(3, 1, "r").to_string().as_bytes(), &env, Some(&first)).unwrap();
    assert!(
        std::rc::Rc::ptr_eq(&ec_table(&first), &ec_table(&next)),
        "same kid, same key: reused"
    );
    // The same kid naming another point is built anew (and still verifies with its own key).
    let mut doc = controller_doc(3, 1, "r");
    let other = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": testkeys::EC_KID, "alg": "ES256",
        "x": "axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY", "y": "T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU"});
    let keys = doc["identity"]["jwks"]["keys"].as_array_mut().unwrap();
    let at = keys.iter().position(|k| k["kid"] == testkeys::EC_KID).unwrap();
    keys[at] = other;
    let after = compile_after(doc.to_string().as_bytes(), &env, Some(&next)).unwrap();
    assert!(
        !std::rc::Rc::ptr_eq(&ec_table(&next), &ec_table(&after)),
        "another point: rebuilt"
    );
    let now = testkeys::NOW;
    let claims = serde_json::json!({
        "iss": testkeys::ISSUER, "aud": [testkeys::AUDIENCE], "exp": now + 600, "iat": now - 5,
        "sub": "system:serviceaccount:demo:default",
        "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "default", "uid": "u-1"}}
    });
    let ec = testkeys::sign(testkeys::EC_KID, jsonwebtoken::Algorithm::ES256, &claims);
    assert!(crate::identity::verify(&ec, &next.policy, testkeys::NOW).is_ok());
    assert!(
        crate::identity::verify(&ec, &after.policy, testkeys::NOW).is_err(),
        "the old key is gone"
    );
}

#[test]
fn a_push_shares_the_connectors_it_repeats_and_compiles_the_rest() {
    let first = compile_value(&controller_doc(5, 99, "")).unwrap();
    let next_doc = controller_doc(5, 2, "r1-2");
    let next = compile_after(next_doc.to_string().as_bytes(), &env, Some(&first)).unwrap();
    let shared: Vec<bool> = (0..5)
        .map(|i| std::rc::Rc::ptr_eq(&list(&first)[i], &list(&next)[i]))
        .collect();
    assert_eq!(shared, [true, true, false, true, true]);
    assert_eq!(
        next.connector("team-2", "c2").map(|c| c.credential.clone()),
        Some(UpstreamCredential::Controller {
            revision: "r1-2".into()
        })
    );
    // The same configuration as compiled from nothing.
    let fresh = compile_value(&next_doc).unwrap();
    let view = |c: &Config| format!("{:?}", c.connectors().map(|c| (c, c.revision)).collect::<Vec<_>>());
    assert_eq!(view(&next), view(&fresh));

    // Other settings (a second issuer): nothing is shared.
    let mut other = next_doc.clone();
    other["identity"]["issuers"] = serde_json::json!([testkeys::ISSUER, "https://other.example"]);
    let after = compile_after(other.to_string().as_bytes(), &env, Some(&next)).unwrap();
    assert!((0..5).all(|i| !std::rc::Rc::ptr_eq(&list(&next)[i], &list(&after)[i])));

    // A bad push is refused with the full list, whatever it repeats.
    let mut bad = controller_doc(5, 2, "r1-2");
    bad["connectors"][4]["name"] = serde_json::json!("c0");
    bad["connectors"][4]["namespace"] = serde_json::json!("team-0");
    bad["connectors"][1]["address"] = serde_json::json!("ftp://x");
    let errors = compile_after(bad.to_string().as_bytes(), &env, Some(&next))
        .err()
        .unwrap_or_default();
    assert_eq!(errors, compile_value(&bad).err().unwrap_or_default());
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert!(
        paths.contains(&"connectors[1].address") && paths.contains(&"connectors[4]"),
        "{paths:?}"
    );
}

/// Everything a compiled connector holds, in a stable order, and what the lookups give.
fn full_view(c: &Config, names: &[(String, String)]) -> String {
    let sorted = |set: Vec<String>| {
        let mut v = set;
        v.sort();
        v
    };
    let mut issuers: Vec<&String> = c.policy.issuers.iter().collect();
    issuers.sort();
    let mut out = format!("settings {:?}, issuers {issuers:?}\n", c.settings);
    for k in c.connectors() {
        out += &format!(
            "{k:?} {:?} {:?} {:?} {:?} {} {}\n",
            sorted(k.allowed_namespaces.iter().cloned().collect()),
            sorted(
                k.allowed_service_accounts
                    .iter()
                    .map(|(a, b)| format!("{a}/{b}"))
                    .collect()
            ),
            k.hosts,
            k.token_realms,
            k.read_only,
            k.revision
        );
        let host = render_host(&c.host_pattern, &k.namespace, &k.name);
        for h in std::iter::once(&host).chain(&k.hosts) {
            out += &format!("  {h} -> {:?}\n", c.connector_by_host(h).map(|c| c.label()));
        }
    }
    for (ns, name) in names {
        out += &format!("{ns}/{name}: {:?}\n", c.connector(ns, name).map(|c| c.label()));
    }
    out
}

/// `doc` with its connectors cut into parts of `each`: the parts document, and each part's id
/// and text.
fn in_parts(doc: &Value, each: usize) -> (String, Vec<(String, String)>) {
    let entries = doc["connectors"].as_array().unwrap();
    let parts: Vec<(String, String)> = entries
        .chunks(each)
        .map(|c| c.iter().map(Value::to_string).collect::<Vec<_>>().join(","))
        .map(|text| (connector_core::channel::part_id(text.as_bytes()), text))
        .collect();
    let mut d = doc.clone();
    d["parts"] = parts.iter().map(|(id, _)| Value::from(id.as_str())).collect();
    d["connectors"] = serde_json::json!([]);
    (d.to_string(), parts)
}

/// Issue 17: a push compiled against the running configuration (keeping what it repeats)
/// gives what a compile from nothing gives, whatever the change: adds, deletes, edits, moves,
/// an entry written twice, a name or host claimed twice, a bad entry, other settings, an
/// empty list. Each step is compiled against the last accepted configuration, as in the VM.
/// The same pushes in parts (cut as the controller cuts its runs: mostly at the same places,
/// so that untouched parts keep their ids) go through the assembly's compile, which keeps
/// the running configuration's parts whole: the same outcome again.
#[test]
fn every_push_compiled_against_the_running_one_is_the_push_compiled_from_nothing() {
    let mut rng = crate::testkeys::Xorshift(0x2545_f491_4f6c_dd1d);
    let mut next = move |n: u64| rng.below(n);
    let entry = |i: u64, rev: u64| {
        serde_json::json!({
            "namespace": format!("team-{}", i % 4), "name": format!("c{i}"),
            "address": "https://registry.internal:5000",
            "cluster": "upstream_registry",
            "credential": {"fromController": format!("r{rev}")},
        })
    };
    let mut d = doc();
    d["controller"] = serde_json::json!({"cluster": "ctl", "authority": "controller"});
    d["connectors"] = (0..40).map(|i| entry(i, 0)).collect();
    let names: Vec<(String, String)> = (0..60).map(|i| (format!("team-{}", i % 4), format!("c{i}"))).collect();
    let mut running = compile_value(&d).unwrap();
    let mut running_parts = compile_value(&d).unwrap();
    let mut by_parts = 0;
    // What a VM without a configuration (Envoy's canary) decides by: the memo of the last
    // accepted document.
    let mut memo = memo::memo_of(d.to_string().as_bytes(), &running).unwrap();
    let mut last = d.to_string();
    let (mut kept_total, mut accepted, mut refused, mut by_memo) = (0, 0, 0, 0);
    for step in 0..400 {
        let mut t = d.clone();
        let list = t["connectors"].as_array_mut().unwrap();
        let len = list.len() as u64;
        let at = |n: u64| usize::try_from(n).unwrap();
        match next(11) {
            0 if len < 50 => {
                let e = entry(40 + next(20), step);
                // Now and then written twice (two new entries claiming one name).
                if next(3) == 0 {
                    list.insert(at(next(len + 1)), e.clone());
                }
                list.insert(at(next(len + 1)), e);
            }
            1 if len > 1 => drop(list.remove(at(next(len)))),
            2 | 3 if len > 0 => list[at(next(len))]["credential"]["fromController"] = format!("r{step}").into(),
            4 if len > 1 => {
                let e = list.remove(at(next(len)));
                list.insert(at(next(len)), e);
            }
            5 if len > 0 => {
                // The same text twice.
                let e = list[at(next(len))].clone();
                list.insert(at(next(len)), e);
            }
            6 if len > 1 => {
                // Another entry's name, or a host another entry is reached by.
                let (a, b) = (at(next(len)), at(next(len)));
                if next(2) == 0 {
                    list[a]["name"] = list[b]["name"].clone();
                    list[a]["namespace"] = list[b]["namespace"].clone();
                } else {
                    let host = render_host(
                        DEFAULT_HOST_PATTERN,
                        list[b]["namespace"].as_str().unwrap(),
                        list[b]["name"].as_str().unwrap(),
                    );
                    list[a]["hosts"] = serde_json::json!([host]);
                }
            }
            7 if len > 0 => list[at(next(len))]["namespace"] = "Not A Label".into(),
            8 => {
                let issuers = if next(2) == 0 {
                    vec![testkeys::ISSUER]
                } else {
                    vec![testkeys::ISSUER, "https://b"]
                };
                t["identity"]["issuers"] = serde_json::json!(issuers);
            }
            // Emptied now and then (a controller-managed document may be), and filled again.
            9 if len < 5 => t["connectors"] = (0..40).map(|i| entry(i, step)).collect(),
            9 if next(4) == 0 => t["connectors"] = serde_json::json!([]),
            _ => {
                let e = entry(next(60), step);
                if len > 0 {
                    list[at(next(len))] = e;
                } else {
                    list.push(e);
                }
            }
        }
        let text = t.to_string();
        let fresh = compile(text.as_bytes(), &env);
        let pushed = compile_after(text.as_bytes(), &env, Some(&running));
        let each = if next(4) == 0 { 1 + next(9) } else { 7 };
        let (parts_doc, parts) = in_parts(&t, usize::try_from(each).unwrap());
        let assembly = crate::parts::Assembly::new(
            parts_doc.as_bytes(),
            &parts.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
            running_parts.controller.clone().unwrap(),
            1,
            &parts
                .iter()
                .map(|(id, text)| (id.clone(), Rc::from(text.as_str())))
                .collect(),
            0,
        )
        .unwrap();
        let pairs: Vec<(&str, &str)> = parts.iter().map(|(i, t)| (i.as_str(), t.as_str())).collect();
        let head = connector_core::config::parts_head(parts_doc.as_bytes()).unwrap();
        by_parts += usize::from(compile_parts(&head, &pairs, &running_parts, &env).is_some());
        match (&fresh, assembly.compile(&env, Some(&running_parts)).unwrap()) {
            (Ok(fresh), Ok(assembled)) => {
                assert_eq!(full_view(&assembled, &names), full_view(fresh, &names), "step {step}");
                running_parts = assembled;
            }
            (Err(fresh), Err(assembled)) => assert_eq!(&assembled, fresh, "step {step}"),
            (fresh, assembled) => panic!(
                "step {step}: from nothing {:?}, assembled {:?}",
                fresh.as_ref().err(),
                assembled.err()
            ),
        }
        let checked = memo::check_change(text.as_bytes(), &memo, &env);
        let (a, b) = (
            connector_core::config::split(text.as_bytes()).unwrap(),
            connector_core::config::split(last.as_bytes()).unwrap(),
        );
        let comparable = a.settings == b.settings && !a.entries.is_empty() && !b.entries.is_empty();
        match (&fresh, checked) {
            (Ok(fresh), Some(checked)) => {
                assert_eq!(checked, memo::memo_of(text.as_bytes(), fresh).unwrap(), "step {step}");
                memo = checked;
                by_memo += 1;
            }
            (Ok(_), None) => {
                assert!(
                    !comparable,
                    "step {step}: valid, comparable, and the memo could not tell"
                );
                memo = memo::memo_of(text.as_bytes(), pushed.as_ref().unwrap()).unwrap();
            }
            (Err(e), Some(_)) => panic!("step {step}: the memo accepted a document with problems: {e:?}"),
            (Err(_), None) => {}
        }
        match (fresh, pushed) {
            (Ok(fresh), Ok(pushed)) => {
                last.clone_from(&text);
                assert_eq!(full_view(&pushed, &names), full_view(&fresh, &names), "step {step}");
                kept_total += pushed.kept;
                accepted += 1;
                running = pushed;
                d = t;
            }
            (Err(fresh), Err(pushed)) => {
                assert_eq!(pushed, fresh, "step {step}");
                refused += 1;
            }
            (fresh, pushed) => panic!(
                "step {step}: from nothing {:?}, against the running one {:?}",
                fresh.err(),
                pushed.err()
            ),
        }
    }
    // The walk went through both outcomes, and the accepted pushes mostly kept connectors.
    eprintln!(
        "{accepted} accepted ({by_memo} by the memo, {by_parts} by parts), {refused} refused, {kept_total} connectors kept"
    );
    assert!(
        accepted > 150 && refused > 50 && by_memo > 120 && by_parts > 120,
        "{accepted} accepted ({by_memo} by the memo, {by_parts} by parts), {refused} refused"
    );
    assert!(kept_total > accepted * 15, "{kept_total} kept over {accepted} pushes");
}

#[test]
fn a_push_changing_one_entry_keeps_the_others_and_copies_few_index_shards() {
    let first = compile_value(&controller_doc(2000, 9999, "")).unwrap();
    let next = compile_after(
        controller_doc(2000, 1000, "r-1").to_string().as_bytes(),
        &env,
        Some(&first),
    )
    .unwrap();
    assert_eq!(next.kept, 1999);
    let (changed, same) = next.index.shards_changed(&first.index);
    assert!(
        changed <= 4 && same >= 2 * 64 - 4,
        "{changed} shards copied, {same} shared"
    );
    assert_eq!(
        next.connector("team-1", "c1000").map(|c| c.credential.clone()),
        Some(UpstreamCredential::Controller { revision: "r-1".into() })
    );
    assert_eq!(
        first.connector("team-1", "c1000").map(|c| c.credential.clone()),
        Some(UpstreamCredential::Controller {
            revision: "r0-1000".into()
        }),
        "the running configuration is untouched"
    );
}
