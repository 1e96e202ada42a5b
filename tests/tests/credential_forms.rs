//! The connector's credential given as a docker `config.json` (what a `kubernetes.io/dockerconfigjson`
//! Secret holds), handed to the filter in one environment variable: a real pull through Envoy
//! works, the upstream receives exactly the robot's Basic credential taken from the matching
//! `auths` entry, and neither the password nor the config document shows in Envoy's config dump
//! or log.

use connector_devkit::envoy::{Cluster, ConnectorSpec, Envoy, EnvoySpec, WasmFilter, filter_config};
use connector_devkit::http::basic_value;
use connector_devkit::image;
use connector_devkit::recorder::Recorder;
use connector_devkit::registry::Registry;
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::stack::envoy_problems;
use connector_devkit::tokens::Minter;
use connector_devkit::{WorkDir, require_wasm};

#[test]
fn a_docker_config_json_secret_is_a_working_credential() {
    let work = WorkDir::new("e2e-dockerconfig").unwrap();
    let skopeo = Skopeo::new(&work).unwrap();
    let registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    let sample = image::build_sample(&work, "app", "v1", 2).unwrap();
    image::push(
        &skopeo,
        &sample,
        &registry.authority(),
        "team/app",
        Creds::Basic(&creds.username, &creds.password),
    )
    .unwrap();
    let recorder = Recorder::start(registry.port).unwrap();
    let minter = Minter::new(&work.sub("keys").unwrap()).unwrap();

    // A config.json with an entry for another registry first: the filter must pick the one
    // for the connector's address, not the first.
    let auth = basic_value(&creds.username, &creds.password);
    let docker_config = serde_json::json!({
        "auths": {
            "other.example.com": {"auth": basic_value("someone", "else")},
            format!("127.0.0.1:{}", recorder.port): {"auth": auth},
        }
    })
    .to_string();
    let connector = ConnectorSpec {
        namespace: "team".into(),
        name: "registry".into(),
        address: recorder.url(),
        cluster: "upstream_team".into(),
        username: String::new(),
        password_env: String::new(),
        allowed_namespaces: vec![],
        allowed_service_accounts: vec![],
    };
    let mut config = filter_config(&minter.jwks(), std::slice::from_ref(&connector));
    config["connectors"][0]["credential"] = serde_json::json!({"dockerConfigJsonEnv": "TEAM_DOCKER_CONFIG"});
    // The listener speaks TLS (a CA made for this work dir); skopeo verifies it.
    let envoy = Envoy::start_tls(
        &work,
        &EnvoySpec {
            clusters: vec![Cluster {
                name: connector.cluster.clone(),
                port: recorder.port,
            }],
            filter: Some(WasmFilter {
                wasm: require_wasm().unwrap(),
                config,
                secret_env: vec![("TEAM_DOCKER_CONFIG".into(), docker_config.clone())],
                plain_route: false,
            }),
        },
        &connector_devkit::controller::ProxyCert::for_work(&work).unwrap(),
    )
    .unwrap();

    let jwt = minter.valid("team", "builder").unwrap();
    let reference = format!(
        "docker://{}/namespaces/team/connectors/registry/team/app:v1",
        envoy.authority()
    );
    let dest = work.sub("pulled").unwrap();
    skopeo
        .copy(
            &reference,
            Creds::Basic("sa", &jwt),
            &format!("oci:{}:v1", dest.display()),
            Creds::None,
        )
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(
        image::oci_layers(&dest, "v1").unwrap(),
        sample.layers,
        "pulled layers differ from the pushed ones"
    );

    let seen = recorder.take();
    let robot = format!("Basic {auth}");
    let auths = seen.authorizations();
    assert!(
        !auths.is_empty() && auths.iter().all(|a| *a == robot),
        "upstream saw {} credential(s), not all the robot's",
        auths.len()
    );
    assert!(!seen.text.contains(&jwt), "the client's token reached the upstream");

    let dump = envoy.config_dump().unwrap();
    assert!(
        dump.contains("TEAM_DOCKER_CONFIG"),
        "the config dump should name the variable (positive control)"
    );
    let secrets = [
        ("password".to_string(), creds.password.clone()),
        ("config.json auth".to_string(), auth.clone()),
        ("client token".to_string(), jwt.clone()),
    ];
    let problems = envoy_problems(&envoy, &secrets).unwrap();
    assert!(problems.is_empty(), "Envoy hygiene:\n{}", problems.join("\n"));
}
