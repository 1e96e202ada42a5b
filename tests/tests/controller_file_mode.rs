//! File mode end to end: Connector and Secret manifests as a user writes them, rendered by the
//! controller's library (`connector_controller::render`), then real Envoy started with exactly
//! the rendered configuration, env file and clusters, and a real skopeo pull through it from a
//! real htpasswd registry.

use connector_controller::render::{self, Rendered};
use connector_devkit::envoy::{Cluster, Envoy, EnvoySpec, WasmFilter};
use connector_devkit::image;
use connector_devkit::registry::Registry;
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::stack::envoy_problems;
use connector_devkit::tokens::{AUDIENCE, ISSUER, Minter};
use connector_devkit::{WorkDir, require_wasm};

const NS: &str = "demo";
const NAME: &str = "registry";
const REPO: &str = "library/app";
const TAG: &str = "v1";

#[test]
fn rendered_manifests_drive_envoy_and_a_pull_succeeds() {
    let wasm = require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new("controller-file-mode").unwrap();
    let skopeo = Skopeo::new(&work).unwrap();
    let registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    let sample = image::build_sample(&work, "app", TAG, 3).unwrap();
    image::push(
        &skopeo,
        &sample,
        &registry.authority(),
        REPO,
        Creds::Basic(&creds.username, &creds.password),
    )
    .unwrap();
    let minter = Minter::new(&work.sub("keys").unwrap()).unwrap();

    // What a user would `kubectl apply`: one file with the Connector, one with its Secret.
    let manifests = work.sub("manifests").unwrap();
    std::fs::write(
        manifests.join("connector.yaml"),
        format!(
            "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata:\n  name: {NAME}\n  namespace: {NS}\nspec:\n  address: {}\n  auth:\n    name: basicAuth\n    secretRef:\n      name: registry-robot\n  connectorClassName: oci\n",
            registry.url()
        ),
    )
    .unwrap();
    std::fs::write(
        manifests.join("secret.yaml"),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: registry-robot\n  namespace: {NS}\n  annotations:\n    connectors.alauda.io/allowed-connectors: \"*\"\ntype: kubernetes.io/basic-auth\nstringData:\n  username: {}\n  password: {}\n",
            creds.username, creds.password
        ),
    )
    .unwrap();
    let identity = work.path().join("identity.json");
    std::fs::write(
        &identity,
        serde_json::json!({ "issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": minter.jwks() }).to_string(),
    )
    .unwrap();

    let rendered: Rendered = render::render_files(&manifests, &identity).unwrap_or_else(|p| {
        panic!(
            "render refused the manifests: {}",
            p.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
        )
    });
    let written = rendered.write(&work.sub("out").unwrap()).unwrap();

    // Envoy gets only what was written: the configuration file, the env file, the clusters file.
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(&written.filter_config).unwrap()).unwrap();
    let env = render::parse_env_file(&std::fs::read_to_string(&written.env).unwrap());
    let clusters: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&written.clusters).unwrap()).unwrap();
    assert_eq!(clusters.len(), 1, "one upstream, one cluster: {clusters:?}");
    assert_eq!(clusters[0]["host"], "127.0.0.1");
    // The registry speaks TLS (devkit's upstream CA): the rendered cluster says so, and the
    // static Envoy below verifies it (devkit's clusters for a harness TLS port).
    assert_eq!(clusters[0]["tls"], true);
    let clusters = clusters
        .iter()
        .map(|c| Cluster {
            name: c["name"].as_str().unwrap().to_string(),
            port: c["port"].as_u64().unwrap() as u16,
        })
        .collect();
    // The listener speaks TLS (a CA made for this work dir); skopeo verifies it.
    let envoy = Envoy::start_tls(
        &work,
        &EnvoySpec {
            clusters,
            filter: Some(WasmFilter {
                wasm,
                config,
                plain_route: false,
                secret_env: env.clone(),
            }),
        },
        &connector_devkit::controller::ProxyCert::for_work(&work).unwrap(),
    )
    .unwrap();

    let jwt = minter.valid(NS, "default").unwrap();
    let reference = format!(
        "docker://{}/namespaces/{NS}/connectors/{NAME}/{REPO}:{TAG}",
        envoy.authority()
    );
    let dest = work.sub("pulled").unwrap();
    skopeo
        .copy(
            &reference,
            Creds::Basic("sa", &jwt),
            &format!("oci:{}:{TAG}", dest.display()),
            Creds::None,
        )
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("skopeo copy {reference}: {e}"));
    assert_eq!(image::oci_layers(&dest, TAG).unwrap(), sample.layers, "pulled layers");

    let mut secrets = vec![("upstream password".to_string(), creds.password.clone())];
    // Usernames are not secret (and short enough to match unrelated text); passwords are.
    secrets.extend(
        env.into_iter()
            .filter(|(k, _)| k.ends_with("_PASSWORD"))
            .map(|(k, v)| (format!("value of {k}"), v)),
    );
    secrets.push(("client token".into(), jwt));
    let problems = envoy_problems(&envoy, &secrets).unwrap();
    assert!(problems.is_empty(), "Envoy hygiene:\n{}", problems.join("\n"));
    let written_config = std::fs::read_to_string(&written.filter_config).unwrap();
    assert!(
        !written_config.contains(&creds.password),
        "the password is in the rendered configuration"
    );
}

/// `render` writes the clusters as Envoy configuration too (`envoy-clusters.json`), with the
/// same TLS as CDS: SNI, the CA bundle, and the certificate name checked (a DNS SAN for a host
/// name, an IP SAN for an IP literal). Envoy loads them.
#[test]
fn rendered_envoy_clusters_verify_upstream_names_and_load_in_envoy() {
    let work = WorkDir::new("render-envoy-clusters").unwrap();
    let minter = Minter::new(&work.sub("keys").unwrap()).unwrap();
    let manifests = work.sub("manifests").unwrap();
    let mut docs = String::new();
    for (name, address) in [
        ("harbor", "https://harbor.example.com"),
        ("byip", "https://10.0.0.1:8443"),
    ] {
        docs.push_str(&format!(
            "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  address: {address}\n  auth:\n    name: basicAuth\n    secretRef:\n      name: robot\n  connectorClassName: oci\n---\n"
        ));
    }
    docs.push_str(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: robot\n  namespace: {NS}\n  annotations:\n    connectors.alauda.io/allowed-connectors: \"*\"\ntype: kubernetes.io/basic-auth\nstringData:\n  username: robot\n  password: not-used\n"
    ));
    std::fs::write(manifests.join("all.yaml"), docs).unwrap();
    let identity = work.path().join("identity.json");
    std::fs::write(
        &identity,
        serde_json::json!({ "issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": minter.jwks() }).to_string(),
    )
    .unwrap();
    let rendered = render::render_files(&manifests, &identity).unwrap_or_else(|p| panic!("{p:?}"));
    let written = rendered
        .write_with_ca(&work.sub("out").unwrap(), "/etc/ssl/certs/ca-certificates.crt")
        .unwrap();
    let clusters: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&written.envoy_clusters).unwrap()).unwrap();
    assert_eq!(clusters.len(), 2);
    let sans: Vec<(String, String)> = clusters
        .iter()
        .map(|c| {
            let m = &c["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
                ["match_typed_subject_alt_names"][0];
            (
                m["san_type"].as_str().unwrap().to_string(),
                m["matcher"]["exact"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(sans.contains(&("DNS".into(), "harbor.example.com".into())), "{sans:?}");
    assert!(sans.contains(&("IP_ADDRESS".into(), "10.0.0.1".into())), "{sans:?}");

    // Envoy takes them as they are.
    let bootstrap = work.path().join("bootstrap.json");
    std::fs::write(
        &bootstrap,
        serde_json::json!({ "static_resources": { "clusters": clusters } }).to_string(),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(connector_devkit::envoy::envoy_binary().unwrap());
    cmd.args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&bootstrap);
    let out = connector_devkit::procs::run(cmd, None).unwrap();
    assert!(out.success, "envoy --mode validate:\n{}{}", out.stdout, out.stderr);
}
