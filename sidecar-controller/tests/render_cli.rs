//! `connector-controller render` as a user runs it: good manifests give the four files (the
//! env file 0600) and a note naming each upstream reached by host name, which a static Envoy
//! resolves without the screening `serve` applies; a bad manifest gives every problem and no
//! file. Nothing secret on the terminal either way.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

const PASSWORD: &str = "render-cli-s3cret";

fn render(manifests: &Path, identity: &Path, out: &Path) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_connector-controller"))
        .arg("render")
        .arg("--manifests")
        .arg(manifests)
        .arg("--identity")
        .arg(identity)
        .arg("--out")
        .arg(out)
        .env_clear()
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn connector(name: &str, address: &str) -> String {
    format!(
        "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  address: {address}\n  auth:\n    name: basicAuth\n    secretRef:\n      name: robot\n  connectorClassName: oci\n"
    )
}

#[test]
fn render_writes_the_files_and_names_the_upstreams_a_static_envoy_resolves_unscreened() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("by-name.yaml"),
        connector("by-name", "https://registry.example.com:5000"),
    )
    .unwrap();
    std::fs::write(
        manifests.join("by-ip.yaml"),
        connector("by-ip", "https://10.1.2.3:5000"),
    )
    .unwrap();
    std::fs::write(
        manifests.join("secret.yaml"),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: robot\n  namespace: demo\n  annotations:\n    connectors.alauda.io/allowed-connectors: \"*\"\ntype: kubernetes.io/basic-auth\nstringData:\n  username: robot\n  password: {PASSWORD}\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    let minter = connector_devkit::tokens::Minter::new(&dir.path().join("keys")).unwrap();
    let identity = dir.path().join("identity.json");
    std::fs::write(
        &identity,
        serde_json::json!({ "issuers": ["https://kubernetes.default.svc"], "audiences": ["oci-connector"], "jwks": minter.jwks() })
            .to_string(),
    )
    .unwrap();

    let out = dir.path().join("out");
    let (code, stdout, stderr) = render(&manifests, &identity, &out);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("rendered 2 connector(s), 2 cluster(s)"), "{stdout}");
    assert!(
        stderr.contains("1 upstream(s) named by host name (registry.example.com:5000)")
            && stderr.contains("LOGICAL_DNS")
            && !stderr.contains("10.1.2.3"),
        "{stderr}"
    );
    let clusters: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("envoy-clusters.json")).unwrap()).unwrap();
    let kinds: Vec<(&str, &str)> = clusters
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                    ["address"]
                    .as_str()
                    .unwrap(),
                c["type"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("registry.example.com", "LOGICAL_DNS")) && kinds.contains(&("10.1.2.3", "STATIC")),
        "{kinds:?}"
    );
    let env = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "env"))
        .expect("an env file");
    assert_eq!(std::fs::metadata(&env).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&env).unwrap().contains(PASSWORD));
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "the password on the terminal"
    );

    // A Connector without an address and one whose address is not a URL: both problems, no file.
    std::fs::write(manifests.join("by-name.yaml"), connector("by-name", "not a url")).unwrap();
    std::fs::write(manifests.join("by-ip.yaml"), connector("by-ip", "")).unwrap();
    let fresh = dir.path().join("out-bad");
    let (code, stdout, stderr) = render(&manifests, &identity, &fresh);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("nothing written") && stderr.contains("by-name") && stderr.contains("by-ip"),
        "{stderr}"
    );
    assert!(!fresh.exists(), "render wrote into {} after refusing", fresh.display());
    assert!(!stderr.contains(PASSWORD), "the password on the terminal");
}
