//! The connector in front of a registry whose token service is a real one: Keycloak's
//! `docker-v2` protocol (the harness's own token server, `token_upstream`, stays for the faults
//! a real service cannot be made to commit on cue). Distribution 3 with `auth: token` trusts
//! Keycloak's realm; the connector's Secret holds a Keycloak user; the realm is listed in
//! `tokenRealms`. A pull and a push through the proxy go with tokens Keycloak issued to that
//! user, the client's ServiceAccount JWT reaching neither Keycloak nor the registry; eight
//! concurrent requests cost Keycloak one token (its login events counted); a connector
//! whose Secret holds a wrong password is refused by Keycloak and its client gets an OCI error
//! with nothing of Keycloak's answer or the password in it.

use connector_devkit::envoy::{Cluster, ConnectorSpec, Envoy, EnvoySpec, WasmFilter, filter_config};
use connector_devkit::http::{Request, basic_value};
use connector_devkit::image;
use connector_devkit::keycloak::Keycloak;
use connector_devkit::registry::{Credentials, Registry};
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::stack::{CONNECTOR_NAMESPACE, UPSTREAM_USER, envoy_problems, seed_upstream};
use connector_devkit::token_server::claims;
use connector_devkit::{WorkDir, random_secret};
use connector_e2e::{REPO, TAG};
use serde_json::json;

const UPSTREAM_CLUSTER: &str = "upstream_keycloak_registry";
const KEYCLOAK_CLUSTER: &str = "token_realm_keycloak";
const GOOD: &str = "keycloak";
const WRONG: &str = "keycloak-wrong-password";

fn reference(envoy: &Envoy, connector: &str, repo: &str) -> String {
    format!(
        "docker://{}/namespaces/{CONNECTOR_NAMESPACE}/connectors/{connector}/{repo}:{TAG}",
        envoy.authority()
    )
}

#[test]
fn pull_and_push_with_tokens_keycloak_issued() {
    let work = WorkDir::new("e2e-keycloak").unwrap();
    let skopeo = Skopeo::new(&work).unwrap();
    let password = random_secret().unwrap();
    let keycloak = Keycloak::start(&work, UPSTREAM_USER, &password).unwrap();
    let trust = keycloak.trust(UPSTREAM_USER, &password).unwrap();
    let registry = Registry::start_trusting(
        &work,
        &trust,
        Credentials {
            username: UPSTREAM_USER.into(),
            password: password.clone(),
        },
    )
    .unwrap();
    // skopeo does the token dance with Keycloak itself to seed the registry.
    let (sample, recorder, minter) = seed_upstream(&work, &skopeo, &registry, UPSTREAM_USER, &password).unwrap();

    let connector = |name: &str, password_env: &str| {
        let mut c = ConnectorSpec {
            namespace: CONNECTOR_NAMESPACE.into(),
            name: name.into(),
            address: recorder.url(),
            cluster: UPSTREAM_CLUSTER.into(),
            username: UPSTREAM_USER.into(),
            password_env: password_env.into(),
            allowed_namespaces: vec![],
            allowed_service_accounts: vec![],
        }
        .to_json();
        c["tokenRealms"] = json!([{ "url": keycloak.realm(), "cluster": KEYCLOAK_CLUSTER }]);
        c
    };
    let wrong_password = random_secret().unwrap();
    let mut config = filter_config(&minter.jwks(), &[]);
    config["connectors"] = json!([connector(GOOD, "KC_PASSWORD"), connector(WRONG, "KC_WRONG_PASSWORD")]);
    let filter = WasmFilter {
        wasm: connector_devkit::require_wasm().unwrap(),
        config,
        plain_route: false,
        secret_env: vec![
            ("KC_PASSWORD".into(), password.clone()),
            ("KC_WRONG_PASSWORD".into(), wrong_password.clone()),
        ],
    };
    let clusters = vec![
        Cluster {
            name: UPSTREAM_CLUSTER.into(),
            port: recorder.port,
        },
        Cluster {
            name: KEYCLOAK_CLUSTER.into(),
            port: keycloak.port,
        },
    ];
    let proxy_cert = connector_devkit::controller::ProxyCert::for_work(&work).unwrap();
    let envoy = Envoy::start_tls(
        &work,
        &EnvoySpec {
            clusters,
            filter: Some(filter),
        },
        &proxy_cert,
    )
    .unwrap();
    recorder.take();

    // Pull through the proxy: the layers pushed.
    let jwt = minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    // Pulls `repo` through the proxy into a new OCI layout and checks its layers.
    let pull = |repo: &str, into: &str| {
        let out = work.sub(into).unwrap();
        skopeo
            .copy(
                &reference(&envoy, GOOD, repo),
                Creds::Basic("sa", &jwt),
                &format!("oci:{}:{TAG}", out.display()),
                Creds::None,
            )
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("pull of {repo} with Keycloak's tokens: {e}\n{}", keycloak.log()));
        assert_eq!(image::oci_layers(&out, TAG).unwrap(), sample.layers, "layers of {repo}");
        out
    };
    let pulled = pull(REPO, "pulled");

    // Push it back under another repository, then pull that: the same layers.
    let pushed_repo = "pushed/by-proxy";
    skopeo
        .copy(
            &format!("oci:{}:{TAG}", pulled.display()),
            Creds::None,
            &reference(&envoy, GOOD, pushed_repo),
            Creds::Basic("sa", &jwt),
        )
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("push through the proxy with Keycloak's tokens: {e}"));
    pull(pushed_repo, "pulled-again");

    // Eight clients at once for a repository no request has asked a token for: Keycloak
    // issues one token (single flight), counted by its login events.
    let fresh = "concurrent/app";
    image::push(
        &skopeo,
        &sample,
        &format!("127.0.0.1:{}", registry.port),
        fresh,
        Creds::Basic(UPSTREAM_USER, &password),
    )
    .unwrap();
    let logins = |kind: &str| {
        keycloak
            .logins()
            .unwrap()
            .iter()
            .filter(|(t, user)| t == kind && user == UPSTREAM_USER)
            .count()
    };
    let before = logins("LOGIN");
    let path = format!("/v2/namespaces/{CONNECTOR_NAMESPACE}/connectors/{GOOD}/{fresh}/manifests/{TAG}");
    let statuses: Vec<u16> =
        connector_e2e::concurrent_gets(envoy.port, &path, "application/vnd.oci.image.manifest.v1+json", &jwt, 8)
            .iter()
            .map(|r| r.status)
            .collect();
    assert_eq!(statuses, vec![200; 8]);
    assert_eq!(
        logins("LOGIN"),
        before + 1,
        "tokens Keycloak issued for 8 concurrent requests"
    );

    // The registry saw Keycloak's tokens for the robot, scoped to the upstream repositories, and
    // nothing of the client's.
    let seen = recorder.take();
    assert!(!seen.text.contains(&jwt), "the client's JWT reached the registry");
    let bearers: Vec<String> = seen
        .authorizations()
        .iter()
        .map(|a| {
            a.strip_prefix("Bearer ")
                .unwrap_or_else(|| panic!("only Bearer tokens may reach the registry: {:?}", a.split(' ').next()))
                .to_string()
        })
        .collect();
    assert!(!bearers.is_empty(), "the registry saw no token");
    let mut scoped = std::collections::BTreeSet::new();
    for t in &bearers {
        let c = claims(t).unwrap();
        assert_eq!(c["iss"], keycloak.issuer(), "{c}");
        assert_eq!(c["sub"], UPSTREAM_USER, "{c}");
        assert_eq!(c["aud"], connector_devkit::keycloak::SERVICE, "{c}");
        for a in c["access"].as_array().unwrap() {
            scoped.insert(a["name"].as_str().unwrap().to_string());
        }
    }
    assert!(
        scoped.contains(REPO) && scoped.contains(pushed_repo) && scoped.contains(fresh),
        "tokens for the upstream repositories: {scoped:?}"
    );

    // A Secret with the wrong password: Keycloak refuses it, the client gets an OCI error that
    // carries nothing of it, and the registry gets no credential.
    let r = Request::get(&format!(
        "/v2/namespaces/{CONNECTOR_NAMESPACE}/connectors/{WRONG}/{REPO}/manifests/{TAG}"
    ))
    .basic("sa", &jwt)
    .send(envoy.port)
    .unwrap();
    let errors = r.json().unwrap();
    assert_eq!(
        (r.status, &errors["errors"][0]["code"]),
        (503, &json!("UNAVAILABLE")),
        "{}",
        r.summary()
    );
    let message = errors["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("refused the connector's credential (401)") && message.contains(&keycloak.realm()),
        "{message}"
    );
    let shown = format!("{:?}\n{}", r.headers, r.body_text());
    assert!(
        !shown.contains(&wrong_password) && !shown.contains(&password),
        "a password reached the client"
    );
    assert!(
        !shown.contains("Invalid username or password"),
        "Keycloak's own answer reached the client: {shown}"
    );
    assert!(logins("LOGIN_ERROR") >= 1, "Keycloak refused the wrong password");
    // At most the request that learns the registry's challenge, which carries no credential.
    let seen = recorder.take();
    assert!(
        seen.authorizations().is_empty(),
        "a credential reached the registry: {:?}",
        seen.request_lines()
    );

    // Nothing secret in Envoy's log or configuration dump.
    let mut secrets = vec![
        ("upstream password".to_string(), password.clone()),
        ("wrong password".to_string(), wrong_password.clone()),
        (
            "upstream Basic credential".to_string(),
            basic_value(UPSTREAM_USER, &password),
        ),
        ("client JWT".to_string(), jwt.clone()),
    ];
    for (i, t) in bearers.iter().enumerate() {
        secrets.push((format!("Keycloak token #{i}"), t.clone()));
    }
    assert_eq!(envoy_problems(&envoy, &secrets).unwrap(), Vec::<String>::new());
}
