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
        parts: vec![],
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
        // Strings that never end: the scan through strings runs to the end and stops.
        br#"{"connectors": ["abc]}"#,
        br#"{"connectors": ["abc\"]}"#,
        br#"{"connectors": ["abc\"#,
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
fn an_entry_read_alone_is_the_entry_the_whole_document_gives() {
    let config = full();
    let json = serde_json::to_vec(&config).unwrap();
    let s = split(&json).unwrap();
    let alone: Vec<ConnectorEntry> = s.entries.iter().map(|t| parse_entry(t, true).unwrap()).collect();
    assert_eq!(alone, parse(&json).config.connectors);
    assert_eq!(alone, config.connectors);
}

#[test]
fn an_entry_with_any_problem_reads_as_none() {
    let config = full();
    let good = serde_json::to_value(&config.connectors[0]).unwrap();
    assert!(parse_entry(&good.to_string(), true).is_some());
    let mut bad_label = good.clone();
    bad_label["namespace"] = serde_json::json!("Not A Label");
    let mut unknown = good.clone();
    unknown["unknown"] = serde_json::json!(1);
    let mut no_address = good.clone();
    no_address.as_object_mut().unwrap().remove("address");
    for bad in [bad_label, unknown, no_address] {
        assert_eq!(parse_entry(&bad.to_string(), true), None, "{bad}");
        // The whole document says what is wrong.
        let mut doc = serde_json::to_value(&config).unwrap();
        doc["connectors"][0] = bad.clone();
        assert!(!parse(doc.to_string().as_bytes()).errors.is_empty(), "{bad}");
    }
    for text in ["", "[", "1", "{\"namespace\": 1}"] {
        assert_eq!(parse_entry(text, true), None, "{text}");
    }
    // A credential from the controller needs the channel, which the settings name.
    let from_controller = config
        .connectors
        .iter()
        .find(|e| matches!(e.credential, CredentialRef::FromController { .. }))
        .unwrap();
    let text = serde_json::to_string(from_controller).unwrap();
    assert!(parse_entry(&text, true).is_some());
    assert_eq!(parse_entry(&text, false), None);
}

/// The inline document and the same configuration in parts are one text once put together:
/// what the filter assembles is what the controller would have pushed inline.
#[test]
fn a_parts_document_assembles_to_the_inline_document() {
    let config = full();
    let inline = serde_json::to_string(&config).unwrap();
    let entries: Vec<String> = config
        .connectors
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    for cut in 1..=entries.len() {
        let texts: Vec<String> = entries.chunks(cut).map(|c| c.join(",")).collect();
        let ids: Vec<String> = texts.iter().map(|t| crate::channel::part_id(t.as_bytes())).collect();
        let parts_doc = serde_json::to_vec(&FilterConfig {
            parts: ids,
            connectors: vec![],
            ..config.clone()
        })
        .unwrap();
        let parsed = parse(&parts_doc);
        assert_eq!(parsed.errors, vec![]);
        assert_eq!(parsed.config.parts.len(), texts.len());
        let head = parts_head(&parts_doc).unwrap();
        assert_eq!(assemble(&head, texts.iter().map(String::as_str)), inline, "cut {cut}");
        // What the filter reads from the parts without assembling them is what it would cut
        // from the assembled document.
        let whole = split(inline.as_bytes()).unwrap();
        assert_eq!(format!("{{{}}}", head_members(&head).unwrap()), whole.settings);
        let cut_entries: Vec<&str> = texts.iter().flat_map(|t| part_entries(t).unwrap()).collect();
        assert_eq!(cut_entries, whole.entries, "cut {cut}");
    }
    assert_eq!(head_members("{\"connectors\":["), Some(""));
    assert_eq!(split(b"{\"connectors\":[]}").unwrap().settings, "{}");
    assert_eq!(
        part_entries(" {\"a\":[1,\"]\"]} , 2 ").unwrap(),
        ["{\"a\":[1,\"]\"]}", "2"]
    );
    for not_a_part in ["", "{}]", "{},", "{} {}", "1:2"] {
        assert_eq!(part_entries(not_a_part), None, "{not_a_part:?}");
    }
    // Only an object without entries of its own stands for one.
    assert_eq!(parts_head(inline.as_bytes()), None);
    assert_eq!(parts_head(b"[]"), None);
    assert_eq!(parts_head(b"{\"parts\":[]} x"), None);
    assert_eq!(
        parts_head(b" { \"a\" : 1 , \"parts\":[\"x\"], \"connectors\" : [ ] } ").as_deref(),
        Some("{\"a\":1,\"connectors\":[")
    );
    assert_eq!(assemble("{\"connectors\":[", std::iter::empty()), "{\"connectors\":[]}");
}

#[test]
fn parts_are_checked_with_their_paths() {
    let id = |t: &str| crate::channel::part_id(t.as_bytes());
    let mut config = full();
    config.connectors = vec![];
    config.parts = vec![id("a"), "sha256:ABC".into(), id("a"), "md5:00".into()];
    let mut doc = serde_json::to_value(&config).unwrap();
    doc["parts"].as_array_mut().unwrap().push(serde_json::json!(7));
    let paths = |doc: &serde_json::Value| -> Vec<String> {
        parse(doc.to_string().as_bytes())
            .errors
            .into_iter()
            .map(|e| e.path)
            .collect()
    };
    // (parts[4], not a string, is reported once: by the structure.)
    assert_eq!(paths(&doc), ["parts[4]", "parts[1]", "parts[2]", "parts[3]"]);
    // Parts come over the channel, in place of the list, and need the keys a connector needs.
    config.parts = vec![id("a")];
    config.controller = None;
    config.connectors = full().connectors;
    config.identity.jwks.keys = vec![];
    let doc = serde_json::to_value(&config).unwrap();
    let found = paths(&doc);
    for want in ["identity.jwks.keys", "parts", "connectors"] {
        assert!(found.iter().any(|p| p == want), "{want} not in {found:?}");
    }
    assert!(crate::channel::is_part_id(&id("")));
    assert_eq!(
        id(""),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert!(!parse(b"{\"parts\":{}}").errors.iter().all(|e| e.path != "parts"));
}
