//! Table-driven tests of the decision: which images are the proxy's, what the kubelet gets, and
//! every refusal. `kubelet_match` mirrors the kubelet's `URLsMatch` so the auth keys and the
//! example config's `matchImages` are checked the way the kubelet reads them.

use super::*;
use serde_json::{Value, json};

const NOW: u64 = 1_750_000_000;
const PROXY: &str = "192.168.1.10:31567";

fn host_form<'a>(connectors: &'a str, pattern: Option<&'a str>, port: Option<&'a str>) -> HostForm<'a> {
    HostForm {
        connectors: Some(connectors),
        pattern,
        port,
    }
}

/// The proxy, and the host form for the connector `demo/registry` only.
fn settings() -> Settings {
    Settings::new(PROXY, host_form("demo/registry", None, None)).unwrap()
}

/// An unsigned JWT-shaped token with these claims (the provider never verifies signatures).
fn jwt(claims: Value) -> String {
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.c2lnbmF0dXJl",
        enc(&json!({"alg": "RS256", "kid": "k"})),
        enc(&claims)
    )
}

fn token_expiring_in(secs: i64) -> String {
    jwt(json!({"sub": "system:serviceaccount:demo:default", "exp": NOW as i64 + secs, "aud": ["oci-connector"]}))
}

fn request(image: &str, token: Option<&str>) -> Vec<u8> {
    let mut r = json!({
        "apiVersion": API_VERSION,
        "kind": REQUEST_KIND,
        "image": image,
        "serviceAccountAnnotations": {"example.com/role": "puller"},
    });
    if let Some(t) = token {
        r["serviceAccountToken"] = json!(t);
    }
    r.to_string().into_bytes()
}

/// The kubelet's `URLsMatch`: same number of DNS labels each matching its glob, equal ports,
/// the glob's path a prefix of the image's path.
fn kubelet_match(glob: &str, image: &str) -> bool {
    fn split(s: &str) -> (String, String, String) {
        let s = s.split_once("://").map(|(_, r)| r).unwrap_or(s);
        let (authority, path) = match s.find('/') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => (authority, ""),
        };
        (host.to_string(), port.to_string(), path.to_string())
    }
    /// Go's `filepath.Match` on one label: `*` is any run of characters.
    fn glob_label(g: &[u8], t: &[u8]) -> bool {
        match g.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| glob_label(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && glob_label(rest, &t[1..]),
        }
    }
    let (gh, gp, gpath) = split(glob);
    let (th, tp, tpath) = split(image);
    let (gl, tl): (Vec<_>, Vec<_>) = (gh.split('.').collect(), th.split('.').collect());
    gp == tp
        && gl.len() == tl.len()
        && tpath.starts_with(&gpath)
        && gl.iter().zip(&tl).all(|(g, t)| glob_label(g.as_bytes(), t.as_bytes()))
}

#[test]
fn the_matcher_behaves_like_the_kubelets() {
    for (glob, image, want) in [
        (
            "*.*.svc.cluster.local",
            "c-r-connector.demo.svc.cluster.local/lib/app:v1",
            true,
        ),
        (
            "*.svc.cluster.local",
            "c-r-connector.demo.svc.cluster.local/lib/app:v1",
            false,
        ),
        (
            "192.168.1.10:31567",
            "192.168.1.10:31567/namespaces/a/connectors/b/x:v1",
            true,
        ),
        (
            "192.168.1.10:31567",
            "192.168.1.10/namespaces/a/connectors/b/x:v1",
            false,
        ),
        ("192.168.1.10", "192.168.1.10:31567/x:v1", false),
        ("reg.io:8080/path", "reg.io:8080/path/x:v1", true),
        ("reg.io:8080/path", "reg.io:8080/other/x:v1", false),
        ("k8s.*.io", "k8s.gcr.io/x", true),
    ] {
        assert_eq!(kubelet_match(glob, image), want, "{glob} vs {image}");
    }
}

#[test]
fn which_images_are_the_proxys() {
    let host_port = Settings::new(PROXY, host_form("team-a/harbor", None, Some("8080"))).unwrap();
    let no_host_form = Settings::new(PROXY, HostForm::default()).unwrap();
    let own_pattern = Settings::new(
        PROXY,
        host_form(
            "team-a/harbor, team-b/hub.v2",
            Some("{name}.{namespace}.registry.example"),
            None,
        ),
    )
    .unwrap();
    let path = |ns: &str, name: &str| {
        Some((
            PROXY.to_string(),
            Target::Path {
                namespace: ns.into(),
                name: name.into(),
            },
        ))
    };
    let host = |key: &str, ns: &str, name: &str| {
        Some((
            key.to_string(),
            Target::Host {
                namespace: ns.into(),
                name: name.into(),
            },
        ))
    };
    let s = settings();
    for (settings, image, want) in [
        // path form: tag, digest, nested repository, scheme prefixes, upper-case host
        (
            &s,
            "192.168.1.10:31567/namespaces/demo/connectors/registry/library/app:v1",
            path("demo", "registry"),
        ),
        (
            &s,
            "192.168.1.10:31567/namespaces/demo/connectors/registry/app",
            path("demo", "registry"),
        ),
        (
            &s,
            "192.168.1.10:31567/namespaces/ns-1/connectors/harbor/a/b/c@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            path("ns-1", "harbor"),
        ),
        (
            &s,
            "docker://192.168.1.10:31567/namespaces/demo/connectors/registry/app:v1",
            path("demo", "registry"),
        ),
        // host form: the key is the image's own host
        (
            &s,
            "c-registry-connector.demo.svc.cluster.local/library/app:v1",
            host("c-registry-connector.demo.svc.cluster.local", "demo", "registry"),
        ),
        (
            &host_port,
            "c-harbor-connector.team-a.svc.cluster.local:8080/lib/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            host("c-harbor-connector.team-a.svc.cluster.local:8080", "team-a", "harbor"),
        ),
        (
            &host_port,
            "c-harbor-connector.team-a.svc.cluster.local/lib/app:v1",
            None,
        ),
        (&s, "c-harbor-connector.team-a.svc.cluster.local:8080/lib/app:v1", None),
        (
            &no_host_form,
            "c-registry-connector.demo.svc.cluster.local/library/app:v1",
            None,
        ),
        (&s, "c-registry-connector.demo.svc.example.com/library/app:v1", None),
        // host form: only configured connectors, however well a host fits the pattern. Any
        // namespace can create a Service `c-x-connector.<its ns>`: no token for it.
        (&s, "c-x-connector.evil.svc.cluster.local/library/app:v1", None),
        (&s, "c-registry-connector.evil.svc.cluster.local/library/app:v1", None),
        (&s, "c-x-connector.demo.svc.cluster.local/library/app:v1", None),
        (
            &host_port,
            "c-registry-connector.demo.svc.cluster.local:8080/app:v1",
            None,
        ),
        // the operator's own pattern, shared with the filter and the webhook
        (
            &own_pattern,
            "hub.v2.team-b.registry.example/app:v1",
            host("hub.v2.team-b.registry.example", "team-b", "hub.v2"),
        ),
        (
            &own_pattern,
            "Harbor.Team-A.Registry.Example/app:v1",
            host("harbor.team-a.registry.example", "team-a", "harbor"),
        ),
        (&own_pattern, "c-harbor-connector.team-a.svc.cluster.local/app:v1", None),
        (&own_pattern, "x.evil.registry.example/app:v1", None),
        (&s, "registry-connector.demo.svc.cluster.local/library/app:v1", None),
        (&s, "c-registry-connector.svc.cluster.local/library/app:v1", None),
        (&s, "c-registry-connector.demo.svc.cluster.local/", None),
        // other registries
        (&s, "nginx", None),
        (&s, "nginx:1.27", None),
        (&s, "library/nginx:1.27", None),
        (&s, "docker.io/library/nginx:1.27", None),
        (&s, "ghcr.io/org/app:v1", None),
        (&s, "192.168.1.10:5000/namespaces/demo/connectors/registry/app:v1", None),
        (&s, "192.168.1.10/namespaces/demo/connectors/registry/app:v1", None),
        // the proxy, but not a connector address
        (&s, "192.168.1.10:31567/library/app:v1", None),
        (&s, "192.168.1.10:31567/namespaces/demo/connectors/registry", None),
        (&s, "192.168.1.10:31567/namespaces/demo/connectors/registry/", None),
        (
            &s,
            "192.168.1.10:31567/namespaces/Demo/connectors/registry/app:v1",
            None,
        ),
        (&s, "192.168.1.10:31567/namespaces/demo/registry/app:v1", None),
    ] {
        assert_eq!(classify(image, settings), want, "{image}");
    }
}

#[test]
fn auth_keys_match_the_images_as_the_kubelet_matches_them() {
    let s = settings();
    for image in [
        "192.168.1.10:31567/namespaces/demo/connectors/registry/library/app:v1",
        "c-registry-connector.demo.svc.cluster.local/library/app:v1",
    ] {
        let r = respond_at(&request(image, Some(&token_expiring_in(3600))), &s, NOW).unwrap();
        let keys: Vec<_> = r.auth.keys().collect();
        assert_eq!(keys.len(), 1, "{image}");
        assert!(kubelet_match(keys[0], image), "{} must match {image}", keys[0]);
    }
}

#[test]
fn token_mode_response_fields() {
    let s = settings();
    let image = "192.168.1.10:31567/namespaces/demo/connectors/registry/library/app:v1";
    // (token, cacheDuration)
    let float_exp = jwt(json!({"exp": NOW as f64 + 3600.5}));
    let string_exp = jwt(json!({"exp": (NOW + 3600).to_string()}));
    let no_exp = jwt(json!({"sub": "system:serviceaccount:demo:default"}));
    let padded = {
        let claims = URL_SAFE.encode(json!({"exp": NOW + 3600, "x": "a"}).to_string());
        format!("e30.{claims}.sig")
    };
    for (token, want) in [
        (token_expiring_in(3600), "54m0s"),              // 1 h token: 10% margin
        (token_expiring_in(7 * 24 * 3600), "151h12m0s"), // a week: 10% margin
        (token_expiring_in(600), "9m0s"),                // 10 min: 60 s margin
        (token_expiring_in(61), "1s"),
        (token_expiring_in(60), "0s"),
        (token_expiring_in(30), "0s"),
        (token_expiring_in(0), "0s"),
        (token_expiring_in(-3600), "0s"), // expired: never negative, never cached
        (float_exp, "54m0s"),
        (padded, "54m0s"),
        (string_exp, "1m0s"), // unreadable exp: short
        (no_exp, "1m0s"),
        ("not-a-jwt".to_string(), "1m0s"),
        ("a.%%%.c".to_string(), "1m0s"),
        (format!("a.{}.c", URL_SAFE_NO_PAD.encode("[1]")), "1m0s"),
    ] {
        let r = respond_at(&request(image, Some(&token)), &s, NOW).unwrap();
        assert_eq!(r.api_version, API_VERSION);
        assert_eq!(r.kind, RESPONSE_KIND);
        assert_eq!(
            r.cache_key_type, "Registry",
            "the kubelet discards any value but Image/Registry/Global"
        );
        assert_eq!(r.cache_duration.as_deref(), Some(want), "{token}");
        let auth = &r.auth[PROXY];
        assert_eq!(auth.username, USERNAME);
        assert_eq!(auth.password, token);
        assert_eq!(r.auth.len(), 1);
    }
}

#[test]
fn the_response_is_the_kubelets_json() {
    let token = token_expiring_in(3600);
    let image = "c-registry-connector.demo.svc.cluster.local/library/app:v1";
    let r = respond_at(&request(image, Some(&token)), &settings(), NOW).unwrap();
    assert_eq!(
        serde_json::to_value(&r).unwrap(),
        json!({
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "kind": "CredentialProviderResponse",
            "cacheKeyType": "Registry",
            "cacheDuration": "54m0s",
            "auth": {"c-registry-connector.demo.svc.cluster.local": {"username": "serviceaccount", "password": token}},
        })
    );
    assert!(!format!("{r:?}").contains(&token), "Debug must redact the token");
}

#[test]
fn other_registries_get_an_empty_answer() {
    for (image, token) in [
        ("docker.io/library/nginx:1.27", Some(token_expiring_in(3600))),
        ("nginx", Some(token_expiring_in(3600))),
        ("ghcr.io/org/app:v1", None), // no token needed to say "not mine"
        ("192.168.1.10:31567/library/app:v1", None),
    ] {
        let r = respond_at(&request(image, token.as_deref()), &settings(), NOW).unwrap();
        assert!(r.auth.is_empty(), "{image}");
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"apiVersion": API_VERSION, "kind": RESPONSE_KIND, "cacheKeyType": "Registry", "auth": {}}),
            "{image}"
        );
    }
}

#[test]
fn refusals() {
    let image = "192.168.1.10:31567/namespaces/demo/connectors/registry/library/app:v1";
    let token = token_expiring_in(3600);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut r: Value = serde_json::from_slice(&request(image, Some(&token))).unwrap();
        f(&mut r);
        r.to_string().into_bytes()
    };
    let no_token = Error::NoToken { image: image.into() };
    // (request, error, exit code, words the message must hold)
    let cases: Vec<(Vec<u8>, Error, i32, &[&str])> = vec![
        (
            b"".to_vec(),
            Error::NotJson("EOF while parsing a value at line 1 column 0".into()),
            2,
            &["not a CredentialProviderRequest", API_VERSION],
        ),
        (
            b"image: x".to_vec(),
            Error::NotJson("expected value at line 1 column 1".into()),
            2,
            &["expected"],
        ),
        (
            b"[1]".to_vec(),
            Error::NotJson("a JSON array, not an object".into()),
            2,
            &["array"],
        ),
        (
            with(&|r| r["image"] = json!(7)),
            Error::NotJson("field \"image\" is a JSON number, expected a string".into()),
            2,
            &["\"image\"", "string"],
        ),
        (
            with(&|r| r["serviceAccountToken"] = json!({"t": token})),
            Error::NotJson("field \"serviceAccountToken\" is a JSON object, expected a string".into()),
            2,
            &["serviceAccountToken"],
        ),
        (
            with(&|r| r["kind"] = json!("CredentialProviderResponse")),
            Error::WrongKind(Some("CredentialProviderResponse".into())),
            2,
            &[REQUEST_KIND],
        ),
        (
            with(&|r| {
                r.as_object_mut().unwrap().remove("kind");
            }),
            Error::WrongKind(None),
            2,
            &["missing", REQUEST_KIND],
        ),
        (
            with(&|r| r["apiVersion"] = json!("credentialprovider.kubelet.k8s.io/v1alpha1")),
            Error::WrongApiVersion(Some("credentialprovider.kubelet.k8s.io/v1alpha1".into())),
            2,
            &["v1alpha1", API_VERSION, "CredentialProviderConfig"],
        ),
        (
            with(&|r| {
                r.as_object_mut().unwrap().remove("apiVersion");
            }),
            Error::WrongApiVersion(None),
            2,
            &["missing"],
        ),
        (
            with(&|r| {
                r.as_object_mut().unwrap().remove("image");
            }),
            Error::NoImage,
            2,
            &["\"image\""],
        ),
        (with(&|r| r["image"] = json!("  ")), Error::NoImage, 2, &["\"image\""]),
        (
            request(image, None),
            no_token.clone(),
            3,
            &[
                "tokenAttributes",
                "serviceAccountTokenAudience: oci-connector",
                "cacheType: Token",
                "request-serviceaccounts-token-audience",
                "1.34",
                "ServiceAccount",
            ],
        ),
        (request(image, Some("")), no_token.clone(), 3, &["tokenAttributes"]),
        (
            with(&|r| r["serviceAccountToken"] = Value::Null),
            no_token,
            3,
            &["tokenAttributes"],
        ),
    ];
    for (req, want, code, words) in cases {
        let got = respond_at(&req, &settings(), NOW).unwrap_err();
        assert_eq!(got, want, "{}", String::from_utf8_lossy(&req));
        assert_eq!(got.exit_code(), code);
        let msg = got.to_string();
        for w in words {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}");
        }
        assert!(!msg.contains(&token), "the message must not carry the token");
    }
}

#[test]
fn go_durations() {
    for (secs, want) in [
        (0, "0s"),
        (59, "59s"),
        (60, "1m0s"),
        (3599, "59m59s"),
        (3600, "1h0m0s"),
        (90061, "25h1m1s"),
    ] {
        assert_eq!(go_duration(secs), want);
    }
}

#[test]
fn settings_from_flags_and_env() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let no_env = |_: &str| None;
    let env = |k: &str| match k {
        ENV_PROXY => Some("proxy.example.com".to_string()),
        ENV_HOST_CONNECTORS => Some("demo/registry".to_string()),
        ENV_HOST_PORT => Some("8443".to_string()),
        _ => None,
    };
    let ok = |proxy: &str, h: HostForm| Ok(Some(Settings::new(proxy, h).unwrap()));
    type Env<'a> = &'a dyn Fn(&str) -> Option<String>;
    type Case<'a> = (Vec<String>, Env<'a>, Result<Option<Settings>, String>);
    let cases: Vec<Case> = vec![
        (args(&["--proxy", PROXY]), &no_env, ok(PROXY, HostForm::default())),
        (
            args(&[
                "--proxy=10.0.0.1:80",
                "--host-connectors=demo/registry,team-a/harbor",
                "--host-pattern",
                "{name}.{namespace}.example",
            ]),
            &no_env,
            ok(
                "10.0.0.1:80",
                host_form("demo/registry,team-a/harbor", Some("{name}.{namespace}.example"), None),
            ),
        ),
        (
            args(&[]),
            &env,
            ok("proxy.example.com", host_form("demo/registry", None, Some("8443"))),
        ),
        (
            args(&["--proxy", PROXY, "--host-port=9000"]),
            &env,
            ok(PROXY, host_form("demo/registry", None, Some("9000"))),
        ),
        (args(&["--help"]), &no_env, Ok(None)),
    ];
    for (a, e, want) in cases {
        assert_eq!(Settings::from_args(&a, e), want, "{a:?}");
    }
    assert_eq!(
        Settings::new("Proxy.Example.COM:443", HostForm::default())
            .unwrap()
            .proxy
            .to_string(),
        "proxy.example.com:443"
    );
    assert_eq!(
        Settings::new("[::1]:5000", HostForm::default())
            .unwrap()
            .proxy
            .to_string(),
        "[::1]:5000"
    );
    for (a, words) in [
        (args(&[]), "--proxy <host[:port]>"),
        (args(&["--proxy"]), "a value is required for '--proxy <PROXY>'"),
        (args(&["--registry", "x"]), "unexpected argument '--registry'"),
        (args(&["--proxy", "http://192.168.1.10:31567"]), "not host[:port]"),
        (
            args(&["--proxy", "192.168.1.10:31567/namespaces/demo/connectors/harbor"]),
            "not host[:port]",
        ),
        (args(&["--proxy", "192.168.1.10:0"]), "1-65535"),
        (args(&["--proxy", "192.168.1.10:http"]), "1-65535"),
        (
            args(&["--proxy", PROXY, "--host-suffix", "*.svc.cluster.local"]),
            "--host-suffix was removed",
        ),
        (
            args(&["--proxy", PROXY, "--host-suffix=x"]),
            "--host-connectors <ns>/<name>",
        ),
        (
            args(&["--proxy", PROXY, "--host-port", "8080"]),
            "--host-port is set but --host-connectors is not",
        ),
        (
            args(&["--proxy", PROXY, "--host-pattern", "{name}.example"]),
            "--host-pattern is set but --host-connectors is not",
        ),
        (
            args(&["--proxy", PROXY, "--host-connectors", " , "]),
            "--host-connectors is empty",
        ),
        (
            args(&["--proxy", PROXY, "--host-connectors", "registry"]),
            "not <namespace>/<name>",
        ),
        (
            args(&["--proxy", PROXY, "--host-connectors", "Demo/registry"]),
            "not <namespace>/<name>",
        ),
        (
            args(&[
                "--proxy",
                PROXY,
                "--host-connectors",
                "demo/registry",
                "--host-pattern",
                "{name}.example",
            ]),
            "exactly once",
        ),
        (
            args(&[
                "--proxy",
                PROXY,
                "--host-connectors",
                "demo/r",
                "--host-pattern",
                "{name}_{namespace}.example",
            ]),
            "not a DNS name",
        ),
        (
            args(&["--proxy", PROXY, "--host-connectors", "demo/r", "--host-port", "0"]),
            "1-65535",
        ),
    ] {
        let e = Settings::from_args(&a, no_env).unwrap_err();
        assert!(e.contains(words), "{a:?}: {e}");
    }
}

/// The shipped example is what the docs tell operators to install: it must name this binary,
/// the v1 protocol, the token mode the provider needs, and args the binary accepts, and its
/// `matchImages` must send both address forms here.
#[test]
fn the_example_config_fits_the_binary() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/credential-provider-config.yaml");
    let doc: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(doc["apiVersion"], "kubelet.config.k8s.io/v1");
    assert_eq!(doc["kind"], "CredentialProviderConfig");
    let providers = doc["providers"].as_array().unwrap();
    assert_eq!(providers.len(), 1);
    let p = &providers[0];
    assert_eq!(p["name"], env!("CARGO_PKG_NAME"), "the kubelet execs <bin-dir>/<name>");
    assert_eq!(p["apiVersion"], API_VERSION);
    assert!(
        p["defaultCacheDuration"].as_str().is_some_and(|d| !d.is_empty()),
        "required by the kubelet"
    );
    let ta = &p["tokenAttributes"];
    assert_eq!(ta["serviceAccountTokenAudience"], AUDIENCE);
    assert_eq!(ta["cacheType"], "Token");
    assert_eq!(ta["requireServiceAccount"], true);
    let args: Vec<String> = p["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let s = Settings::from_args(&args, |_| None).unwrap().unwrap();
    let globs: Vec<&str> = p["matchImages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    let token = token_expiring_in(3600);
    for image in [
        format!("{}/namespaces/demo/connectors/registry/library/app:v1", s.proxy),
        "c-registry-connector.demo.svc.cluster.local/library/app:v1".to_string(),
    ] {
        assert!(
            globs.iter().any(|g| kubelet_match(g, &image)),
            "matchImages {globs:?} miss {image}"
        );
        let r = respond_at(&request(&image, Some(&token)), &s, NOW).unwrap();
        assert_eq!(r.auth.len(), 1, "{image}");
    }
    // matchImages sends any c-*-connector.<ns> host here; only the configured ones get a token.
    let evil = "c-x-connector.evil.svc.cluster.local/library/app:v1";
    assert!(globs.iter().any(|g| kubelet_match(g, evil)));
    let r = respond_at(&request(evil, Some(&token)), &s, NOW).unwrap();
    assert!(r.auth.is_empty(), "{evil}: {r:?}");
}
