//! The committed example configuration is real: `envoy/envoy.example.yaml` loads in Envoy with the
//! release filter (`envoy --mode validate` starts the VM and runs the filter's configuration
//! check), its embedded filter configuration is `envoy/connectors.example.json`, and without the
//! credential variables the filter refuses to start, listing every missing one; and
//! `envoy/envoy.xds.yaml`, the bootstrap beside the controller, loads and is exactly what the
//! tests run.

use connector_devkit::envoy::envoy_binary;
use connector_devkit::{procs, repo_root, require_wasm};
use serde_json::Value;
use std::process::Command;

fn validate(env: &[(&str, &str)]) -> procs::Output {
    validate_file("envoy/envoy.example.yaml", env)
}

fn validate_file(file: &str, env: &[(&str, &str)]) -> procs::Output {
    require_wasm().unwrap();
    let mut cmd = Command::new(envoy_binary().unwrap());
    // The example names the module relative to the repository root.
    cmd.current_dir(repo_root())
        .args(["--mode", "validate", "--disable-hot-restart", "-l", "info", "-c", file])
        .env_clear()
        .envs(env.iter().copied());
    procs::run(cmd, None).unwrap()
}

#[test]
fn the_example_loads_with_its_credentials_in_the_environment() {
    let out = validate(&[
        ("DEMO_REGISTRY_PASSWORD", "example-secret-1"),
        ("TEAM_A_HARBOR_USERNAME", "robot$team-a"),
        ("TEAM_A_HARBOR_PASSWORD", "example-secret-2"),
    ]);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(out.success, "envoy --mode validate failed:\n{all}");
    assert!(
        all.contains("configuration accepted: 2 connector(s), 1 key(s)"),
        "{all}"
    );
    assert!(!all.contains("example-secret"), "a password reached Envoy's output");
}

#[test]
fn without_the_credentials_the_filter_refuses_to_start_and_lists_each_problem() {
    let out = validate(&[("TEAM_A_HARBOR_USERNAME", "robot$team-a")]);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        !out.success,
        "Envoy must refuse a configuration the filter rejects:\n{all}"
    );
    for want in [
        "configuration refused, 2 problem(s)",
        "connectors[0].credential.passwordEnv: environment variable \"DEMO_REGISTRY_PASSWORD\" is not set",
        "connectors[1].credential.passwordEnv: environment variable \"TEAM_A_HARBOR_PASSWORD\" is not set",
    ] {
        assert!(all.contains(want), "missing {want:?} in:\n{all}");
    }
}

#[test]
fn the_embedded_filter_configuration_is_the_documented_example() {
    let root = repo_root();
    let yaml = std::fs::read_to_string(root.join("envoy/envoy.example.yaml")).unwrap();
    // The block scalar after `value: |`, dedented: the YAML embeds the JSON verbatim.
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "value: |").skip(1);
    let first = lines.next().unwrap();
    let indent = first.len() - first.trim_start().len();
    let mut block = vec![first.trim_start()];
    block.extend(
        lines
            .take_while(|l| l.len() > indent && l[..indent].trim().is_empty())
            .map(|l| &l[indent..]),
    );
    let embedded: Value = serde_json::from_str(&block.join("\n")).unwrap();
    let documented: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("envoy/connectors.example.json")).unwrap()).unwrap();
    assert_eq!(embedded, documented);
}

#[test]
fn the_xds_bootstrap_loads_and_is_what_the_tests_run() {
    let out = validate_file("envoy/envoy.xds.yaml", &[]);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(out.success, "envoy --mode validate failed:\n{all}");
    let yaml: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(repo_root().join("envoy/envoy.xds.yaml")).unwrap()).unwrap();
    assert_eq!(yaml, connector_devkit::envoy::xds_bootstrap(8080, 9901, 18000, 18001));
}

/// Envoy checks an upstream certificate's name only when told to: every TLS cluster of the
/// example names the host its certificate must carry (issue 13).
#[test]
fn every_tls_cluster_of_the_example_verifies_the_upstream_name() {
    let yaml: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(repo_root().join("envoy/envoy.example.yaml")).unwrap())
            .unwrap();
    let clusters = yaml["static_resources"]["clusters"].as_array().unwrap();
    let tls: Vec<&Value> = clusters
        .iter()
        .filter(|c| c["transport_socket"]["name"] == "envoy.transport_sockets.tls")
        .collect();
    assert_eq!(
        tls.len(),
        clusters.len(),
        "every upstream of the example is TLS: {clusters:?}"
    );
    for c in tls {
        let config = &c["transport_socket"]["typed_config"];
        let host = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"];
        let sans = &config["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"];
        assert_eq!(&sans[0]["matcher"]["exact"], host, "{c}");
        if host.as_str().is_some_and(|h| h.parse::<std::net::IpAddr>().is_ok()) {
            // An address is never sent as SNI (RFC 6066); the certificate must name it.
            assert_eq!(sans[0]["san_type"], "IP_ADDRESS", "{c}");
            assert!(config["sni"].is_null(), "{c}");
        } else {
            assert_eq!(&config["sni"], host, "{c}");
            assert_eq!(sans[0]["san_type"], "DNS", "{c}");
        }
    }
}

/// Issue 13: the example's listener and the xDS bootstrap's speak TLS with ALPN h2 and
/// http/1.1, their certificate an SDS secret (a file here, the controller there), never a key
/// inline in the file.
#[test]
fn both_listeners_speak_tls_with_the_certificate_from_sds() {
    for file in ["envoy/envoy.example.yaml", "envoy/envoy.xds.yaml"] {
        let yaml: Value = serde_saphyr::from_str(&std::fs::read_to_string(repo_root().join(file)).unwrap()).unwrap();
        let chain = &yaml["static_resources"]["listeners"][0]["filter_chains"][0];
        let ctx = &chain["transport_socket"]["typed_config"]["common_tls_context"];
        assert_eq!(ctx["alpn_protocols"], serde_json::json!(["h2", "http/1.1"]), "{file}");
        assert_eq!(
            ctx["tls_certificate_sds_secret_configs"][0]["name"], "proxy-tls",
            "{file}"
        );
        assert!(ctx.get("tls_certificates").is_none(), "{file}: no inline certificate");
    }
}
