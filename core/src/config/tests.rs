use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::*;

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_jwk(kid: &str) -> Jwk {
    Jwk {
        kid: kid.into(),
        kty: "RSA".into(),
        alg: Some("RS256".into()),
        use_: Some("sig".into()),
        n: Some(b64(&[0xc5; 256])),
        e: Some("AQAB".into()),
        ..Jwk::default()
    }
}

fn entry(name: &str, credential: CredentialRef) -> ConnectorEntry {
    ConnectorEntry {
        namespace: "team-a".into(),
        name: name.into(),
        address: "https://harbor.example.com".into(),
        cluster: "harbor_example_com_443".into(),
        credential,
        ..ConnectorEntry::default()
    }
}

/// Every field of the schema set: the serde names (what the controller writes) and the
/// parser's names (what the filter reads) must be the same schema, or this round trip fails
/// with an "unknown field" or a "required" finding.
fn full() -> FilterConfig {
    let mut harbor = entry(
        "harbor",
        CredentialRef::FromController {
            revision: "r-1.a_b".into(),
        },
    );
    harbor.allowed_namespaces = vec!["team-b".into()];
    harbor.allowed_service_accounts = vec!["team-c/builder".into()];
    harbor.hosts = vec!["harbor.proxy.example.com".into()];
    harbor.token_realms = vec![RealmEntry {
        url: "https://auth.example.com/token".into(),
        cluster: "auth_example_com_443".into(),
    }];
    harbor.read_only = true;
    let hub = entry(
        "hub",
        CredentialRef::Env {
            username: Username::Literal("robot".into()),
            password_env: "HUB_PASSWORD".into(),
        },
    );
    let ghcr = entry(
        "ghcr",
        CredentialRef::Env {
            username: Username::Env("GHCR_USER".into()),
            password_env: "GHCR_PASSWORD".into(),
        },
    );
    let quay = entry(
        "quay",
        CredentialRef::DockerConfig {
            var: "QUAY_CONFIG".into(),
        },
    );
    let ec = Jwk {
        kid: "ec".into(),
        kty: "EC".into(),
        alg: Some("ES256".into()),
        crv: Some("P-256".into()),
        x: Some(b64(&[1; 32])),
        y: Some(b64(&[2; 32])),
        ..Jwk::default()
    };
    FilterConfig {
        proxy: Proxy {
            realm: Some("proxy".into()),
            host_pattern: Some("{name}.{namespace}.registry.example.com".into()),
        },
        identity: IdentityConfig {
            issuers: vec!["https://kubernetes.default.svc".into()],
            audiences: vec!["oci-connector".into()],
            jwks: Jwks {
                keys: vec![rsa_jwk("rsa"), ec],
            },
            clock_skew_seconds: Some(30),
            token_cache_size: Some(500),
            max_token_lifetime_seconds: Some(3600),
        },
        controller: Some(ChannelConfig {
            cluster: "connector_controller".into(),
            authority: Some("controller".into()),
            key_env: Some("CHANNEL_KEY".into()),
        }),
        authorization: AccessMode::Controller,
        connectors: vec![harbor, hub, ghcr, quay],
    }
}

#[test]
fn serialised_values_parse_back() {
    let config = full();
    let json = serde_json::to_vec(&config).unwrap();
    let parsed = parse(&json);
    assert_eq!(parsed.errors, vec![]);
    assert_eq!(parsed.config, config);
    // And the smallest document: defaults are not written, and read back as defaults.
    let mut small = full();
    small.proxy = Proxy::default();
    small.controller = None;
    small.authorization = AccessMode::Rules;
    small.identity.clock_skew_seconds = None;
    small.identity.token_cache_size = None;
    small.identity.max_token_lifetime_seconds = None;
    small
        .connectors
        .retain(|c| !matches!(c.credential, CredentialRef::FromController { .. }));
    let json = serde_json::to_value(&small).unwrap();
    assert_eq!(json.get("proxy"), None);
    assert_eq!(json["connectors"][0].get("readOnly"), None);
    let parsed = parse(json.to_string().as_bytes());
    assert_eq!(parsed.errors, vec![]);
    assert_eq!(parsed.config, small);
    assert_eq!(parsed.config.identity.clock_skew(), MAX_CLOCK_SKEW);
    assert_eq!(parsed.config.proxy.host_pattern(), crate::host::DEFAULT_HOST_PATTERN);
}

#[test]
fn checks_on_built_values_report_paths() {
    let mut e = entry("Bad_Name", CredentialRef::FromController { revision: "r 1".into() });
    e.address = "ftp://x".into();
    e.cluster = "a b".into();
    e.allowed_service_accounts = vec!["nobody".into()];
    e.token_realms = vec![RealmEntry {
        url: "ftp://auth".into(),
        cluster: String::new(),
    }];
    let paths: Vec<String> = check_entry(&e, "connectors[3]", true)
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(
        paths,
        [
            "connectors[3].name",
            "connectors[3].address",
            "connectors[3].cluster",
            "connectors[3].credential.fromController",
            "connectors[3].tokenRealms[0].url",
            "connectors[3].tokenRealms[0].cluster",
            "connectors[3].allowedServiceAccounts[0]",
        ]
    );
    // A controller credential needs the channel.
    let e = entry("ok", CredentialRef::FromController { revision: "r1".into() });
    assert!(check_entry(&e, "c", true).is_empty());
    assert_eq!(check_entry(&e, "c", false)[0].path, "c.credential.fromController");
}

#[test]
fn settings_without_connectors() {
    let mut config = full();
    config.connectors.clear();
    assert_eq!(check_settings(&config), vec![]);
    config.identity.jwks.keys.clear();
    assert_eq!(
        check_settings(&config),
        vec![],
        "a controller may start without keys or connectors"
    );
    config.controller = None;
    let paths: Vec<String> = check_settings(&config).into_iter().map(|e| e.path).collect();
    assert_eq!(paths, ["identity.jwks.keys", "authorization", "connectors"]);
}

#[test]
fn wrong_types_are_reported_once() {
    let mut doc = serde_json::to_value(full()).unwrap();
    doc["connectors"][0]["namespace"] = serde_json::json!(5);
    doc["connectors"][0]["allowedNamespaces"] = serde_json::json!(["ok", 7, "Bad"]);
    doc["connectors"][1] = serde_json::json!("nope");
    doc["identity"]["clockSkewSeconds"] = serde_json::json!(-1);
    let errors = parse(doc.to_string().as_bytes()).errors;
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "identity.clockSkewSeconds",
            "connectors[0].namespace",
            "connectors[0].allowedNamespaces[1]",
            "connectors[1]",
            "connectors[0].allowedNamespaces[2]",
        ],
        "{errors:?}"
    );
    assert_eq!(errors[1].message, "expected a string");
}

#[test]
fn jwk_shapes() {
    assert!(matches!(
        check_jwk_shape(&rsa_jwk("k"), "k"),
        Ok(KeyMaterial::Rsa {
            algorithm: Algorithm::RS256,
            ..
        })
    ));
    let mut short = rsa_jwk("k");
    short.n = Some(b64(&[0xc5; 128]));
    short.use_ = Some("enc".into());
    let paths: Vec<String> = check_jwk_shape(&short, "k")
        .unwrap_err()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(paths, ["k.use", "k.n"]);
    let ed = Jwk {
        kid: "ed".into(),
        kty: "OKP".into(),
        ..Jwk::default()
    };
    assert_eq!(check_jwk_shape(&ed, "k").unwrap_err()[0].path, "k.kty");
    let p521 = Jwk {
        kid: "p".into(),
        kty: "EC".into(),
        crv: Some("P-521".into()),
        x: Some(b64(&[1; 66])),
        y: Some(b64(&[1; 66])),
        ..Jwk::default()
    };
    assert_eq!(check_jwk_shape(&p521, "k").unwrap_err()[0].path, "k.crv");
}

#[test]
fn covered_paths() {
    let reported = [ConfigError::new("connectors[1].credential", "x")];
    assert!(covered(&reported, "connectors[1].credential"));
    assert!(covered(&reported, "connectors[1].credential.passwordEnv"));
    assert!(!covered(&reported, "connectors[1].credentials"));
    assert!(!covered(&reported, "connectors[10].credential"));
}

/// `parse_reusing` with a `known` built from an earlier accepted parse, as the filter keeps it.
/// Also how many entries `known` handed out.
fn reparse(json: &[u8], earlier: &[u8]) -> (Reparsed, usize) {
    let before = parse(earlier);
    assert_eq!(before.errors, vec![], "the earlier document must be accepted");
    let old = split(earlier).unwrap();
    let new = split(json).unwrap();
    let known: std::collections::HashMap<&str, &ConnectorEntry> =
        old.entries.iter().copied().zip(&before.config.connectors).collect();
    let same = old.settings == new.settings;
    let handed = std::cell::Cell::new(0);
    let r = parse_reusing(json, &new, &|_, text| {
        let e = same.then(|| known.get(text).map(|e| (*e).clone())).flatten();
        handed.set(handed.get() + usize::from(e.is_some()));
        e
    });
    (r, handed.get())
}

#[test]
fn split_cuts_at_the_entries() {
    let json =
        br#"{"identity": {"issuers": ["i"]}, "connectors": [ {"name": "a"} , {"name":"b"}], "authorization": "rules"}"#;
    let s = split(json).unwrap();
    assert_eq!(s.entries, vec![r#"{"name": "a"}"#, r#"{"name":"b"}"#]);
    assert_eq!(s.settings, r#"{"identity":{"issuers": ["i"]},"authorization":"rules"}"#);
    // Strings holding the characters the scan looks for, numbers, literals, nesting.
    let json = br#" { "proxy" : {"realm": "a\"},]\\"} , "connectors" : [ "x,y" , 12.5e3,true,null, [1,[2]] , {"a":{"b":"}"}} ] } "#;
    let s = split(json).unwrap();
    assert_eq!(
        s.entries,
        vec![r#""x,y""#, "12.5e3", "true", "null", "[1,[2]]", r#"{"a":{"b":"}"}}"#]
    );
    assert_eq!(s.settings, r#"{"proxy":{"realm": "a\"},]\\"}}"#);
    let empty = split(br#"{"connectors": []}"#).unwrap();
    assert_eq!((empty.settings.as_str(), empty.entries.len()), ("{}", 0));
    // Not JSON, not an object, no connectors, connectors not a list, written twice or with
    // an escape: only `parse` can say.
    for bad in [
        &b"[]"[..],
        br#"{"identity": {}}"#,
        br#"{"connectors": {}}"#,
        b"{",
        br#"{"connectors": [], "connectors": []}"#,
        br#"{"conn\u0065ctors": []}"#,
        br#"{"connectors": [1,]}"#,
        br#"{"connectors": [1 2]}"#,
        br#"{"connectors": [], }"#,
        br#"{"a": , "connectors": []}"#,
        br#"{"a" 1, "connectors": []}"#,
        br#"{1: 1, "connectors": []}"#,
        br#"{"connectors": []} x"#,
        br#"{"connectors": ["#,
    ] {
        assert_eq!(split(bad), None, "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn split_entries_are_the_documents_entries() {
    for json in [
        serde_json::to_vec(&full()).unwrap(),
        serde_json::to_vec_pretty(&full()).unwrap(),
    ] {
        let doc: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let s = split(&json).unwrap();
        let items: Vec<serde_json::Value> = s.entries.iter().map(|t| serde_json::from_str(t).unwrap()).collect();
        assert_eq!(&serde_json::Value::from(items), &doc["connectors"]);
        let mut rest = doc.clone();
        rest.as_object_mut().unwrap().remove("connectors");
        let settings: serde_json::Value = serde_json::from_str(&s.settings).unwrap();
        assert_eq!(settings, rest);
    }
}

#[test]
fn reusing_entries_gives_what_a_full_parse_gives() {
    let config = full();
    let earlier = serde_json::to_vec(&config).unwrap();
    // One entry changed, one added, one removed.
    let mut changed = config.clone();
    changed.connectors[1].allowed_namespaces = vec!["team-z".into()];
    changed
        .connectors
        .push(entry("new", CredentialRef::FromController { revision: "r-2".into() }));
    changed.connectors.remove(2);
    let json = serde_json::to_vec(&changed).unwrap();
    let (r, reused) = reparse(&json, &earlier);
    assert_eq!(r.parsed.errors, vec![]);
    assert_eq!(r.parsed.config, changed);
    assert_eq!(r.parsed.config, parse(&json).config);
    // harbor and quay reused; the changed hub and the new entry read.
    assert!(!r.full);
    assert_eq!(reused, 2);

    // Settings changed (no controller any more): nothing is reused, and an entry an earlier
    // parse accepted is refused now, with the full parse's problems.
    let mut no_channel = changed.clone();
    no_channel.controller = None;
    no_channel.authorization = AccessMode::Rules;
    let json = serde_json::to_vec(&no_channel).unwrap();
    let (r, _) = reparse(&json, &earlier);
    assert!(r.full);
    assert_eq!(r.parsed.errors, parse(&json).errors);
    assert!(
        r.parsed
            .errors
            .iter()
            .any(|e| e.path == "connectors[0].credential.fromController"),
        "{:?}",
        r.parsed.errors
    );
}

#[test]
fn a_problem_in_a_reparsed_document_is_reported_as_a_full_parse_reports_it() {
    let config = full();
    let earlier = serde_json::to_vec(&config).unwrap();
    let mut docs = vec![];
    // A new entry that claims a name already used, one with a bad field, an unknown field.
    let mut twice = config.clone();
    twice.connectors.push(twice.connectors[0].clone());
    docs.push(serde_json::to_value(&twice).unwrap());
    let mut bad = serde_json::to_value(&config).unwrap();
    bad["connectors"][1]["namespace"] = serde_json::json!("Not A Label");
    bad["connectors"][2]["unknown"] = serde_json::json!(1);
    docs.push(bad);
    let mut root = serde_json::to_value(&config).unwrap();
    root["extra"] = serde_json::json!(true);
    docs.push(root);
    for doc in docs {
        let json = doc.to_string();
        let (r, _) = reparse(json.as_bytes(), &earlier);
        let full = parse(json.as_bytes());
        assert!(!full.errors.is_empty(), "{json}");
        assert_eq!(r.parsed.errors, full.errors, "{json}");
        assert!(r.full);
    }
}
