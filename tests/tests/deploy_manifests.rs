//! The deployable pieces are checked offline (no cluster, no Docker engine, no Istio here):
//! - every Kubernetes manifest under `deploy/` validates against the Kubernetes schemas with
//!   PyPI's `kubernetes-validate` (strict: unknown fields are errors), the CRD included;
//! - Connector documents validate against the CRD's own OpenAPI schema (Python `jsonschema`),
//!   and a broken one is refused;
//! - each kustomization lists files that exist, and every manifest is listed somewhere;
//! - the proxy's Envoy bootstrap in the ConfigMap and in the compose demo equal the one the
//!   tests run, and the ports and paths the Deployment and `docker-compose.yml` name agree with it;
//! - Istio's WasmPlugin fails closed and pulls an OCI artifact; RBAC grants no wildcards.

use std::path::{Path, PathBuf};
use std::process::Command;

use connector_devkit::{WorkDir, procs, repo_root};
use serde_json::{Value, json};

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn deploy() -> PathBuf {
    repo_root().join("deploy")
}

fn venv(bin: &str) -> PathBuf {
    repo_root().join(".venv/bin").join(bin)
}

const CUSTOM_KINDS: &[&str] = &[
    "Connector",
    "WasmPlugin",
    "ServiceEntry",
    "Gateway",
    "Certificate",
    "Issuer",
];

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    // Built-in kinds only; the custom ones are checked below against their own schemas.
    let mut files = vec![];
    for f in yaml_files(&deploy()) {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        if name == "kustomization.yaml" || f.starts_with(deploy().join("compose")) {
            continue;
        }
        let all = docs(&f);
        let builtin: Vec<&Value> = all
            .iter()
            .filter(|d| !CUSTOM_KINDS.contains(&d["kind"].as_str().unwrap_or_default()))
            .collect();
        if builtin.is_empty() {
            continue;
        }
        // One document per file for the validator, so its messages name the object.
        for (i, d) in builtin.iter().enumerate() {
            let out = std::env::temp_dir().join(format!("kv-{}-{name}-{i}.yaml", std::process::id()));
            // JSON (valid YAML) keeps strings such as "off" strings for the YAML 1.1 reader.
            std::fs::write(&out, serde_json::to_string(d).unwrap()).unwrap();
            files.push((format!("{} document {i} ({})", f.display(), d["kind"]), out));
        }
    }
    assert!(
        files.len() >= 15,
        "expected the CRD, RBAC, webhook and proxy objects: {}",
        files.len()
    );
    let mut cmd = Command::new(venv("kubernetes-validate"));
    cmd.args(["--strict", "-k", "1.35.0"])
        .args(files.iter().map(|(_, p)| p));
    let out = procs::run(cmd, None).unwrap_or_else(|e| panic!("{e} (run scripts/setup.sh)"));
    let text = format!("{}{}", out.stdout, out.stderr);
    for (_, p) in &files {
        let _ = std::fs::remove_file(p);
    }
    assert!(out.success, "kubernetes-validate failed:\n{text}");
    let passed = text.lines().filter(|l| l.contains(" passed ")).count();
    assert_eq!(
        passed,
        files.len(),
        "every object validated (none skipped for a missing schema):\n{text}"
    );
}

#[test]
fn connectors_validate_against_the_crd_schema_and_a_broken_one_is_refused() {
    let crd = &docs(&deploy().join("crd/connectors.alauda.io.yaml"))[0];
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut connectors: Vec<Value> = yaml_files(&deploy())
        .iter()
        .flat_map(|f| docs(f))
        .filter(|d| d["kind"] == "Connector")
        .collect();
    assert!(connectors.len() >= 2, "the example and the compose demo's Connector");
    let mut broken = connectors[0].clone();
    broken["spec"]["address"] = json!("ftp://nope/with/path");
    broken["spec"]["connectorClassName"] = json!("helm");
    connectors.push(broken);
    let script = r#"
import json, sys, jsonschema
schema, docs = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
for d in docs:
    errs = sorted(e.message for e in jsonschema.Draft7Validator(schema).iter_errors(d))
    print(json.dumps(errs))
"#;
    // Removed when the test ends (files named by pid under /tmp were left behind every run).
    let dir = WorkDir::new("crd-schema").unwrap();
    let (sp, dp) = (dir.path().join("crd-schema.json"), dir.path().join("crd-docs.json"));
    std::fs::write(&sp, schema.to_string()).unwrap();
    std::fs::write(&dp, Value::Array(connectors).to_string()).unwrap();
    let mut cmd = Command::new(venv("python"));
    cmd.arg("-c").arg(script).arg(&sp).arg(&dp);
    let out = procs::run(cmd, None).unwrap().ok().unwrap();
    let results: Vec<Vec<String>> = out.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (last, good) = results.split_last().unwrap();
    for (i, errs) in good.iter().enumerate() {
        assert!(errs.is_empty(), "Connector {i} does not match the CRD: {errs:?}");
    }
    assert!(
        last.iter().any(|e| e.contains("ftp://")),
        "bad address refused: {last:?}"
    );
    assert!(last.iter().any(|e| e.contains("helm")), "bad class refused: {last:?}");
}

#[test]
fn kustomizations_list_existing_files_and_every_manifest_is_listed() {
    let mut listed = vec![];
    for k in yaml_files(&deploy())
        .into_iter()
        .filter(|f| f.ends_with("kustomization.yaml"))
    {
        let dir = k.parent().unwrap().to_path_buf();
        let doc = &docs(&k)[0];
        // Components (deploy/images: the image names) must exist and be components.
        for c in doc["components"].as_array().into_iter().flatten() {
            let p = dir.join(c.as_str().unwrap()).join("kustomization.yaml");
            assert_eq!(
                docs(&p)[0]["kind"],
                "Component",
                "{} lists {}",
                k.display(),
                p.display()
            );
        }
        if doc["kind"] == "Component" {
            continue;
        }
        for r in doc["resources"].as_array().unwrap() {
            let p = dir.join(r.as_str().unwrap());
            assert!(p.exists(), "{} lists {} which does not exist", k.display(), p.display());
            if p.is_dir() {
                assert!(
                    p.join("kustomization.yaml").is_file(),
                    "{} is not a kustomization",
                    p.display()
                );
            } else {
                listed.push(p.canonicalize().unwrap());
            }
        }
    }
    for f in yaml_files(&deploy()) {
        if f.ends_with("kustomization.yaml")
            || f.starts_with(deploy().join("compose"))
            || f.starts_with(deploy().join("examples"))
        {
            continue;
        }
        assert!(
            listed.contains(&f.canonicalize().unwrap()),
            "{} is in no kustomization",
            f.display()
        );
    }
}

/// The bootstrap the tests run, with the listener on all interfaces (inside a pod or container).
fn bootstrap_for_containers() -> Value {
    let mut b = connector_devkit::envoy::xds_bootstrap(8080, 9901, 18000, 18001);
    b["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] = json!("0.0.0.0");
    b
}

fn find<'a>(all: &'a [Value], kind: &str, name: &str) -> &'a Value {
    all.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_proxy_deployment_agrees_with_the_envoy_bootstrap() {
    let all = docs(&deploy().join("standalone/proxy.yaml"));
    let cm = find(&all, "ConfigMap", "connector-envoy");
    let envoy: Value = serde_saphyr::from_str(cm["data"]["envoy.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(envoy, bootstrap_for_containers());
    let pod = &find(&all, "Deployment", "connector-proxy")["spec"]["template"]["spec"];
    let container = |n: &str| {
        pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap()
            .clone()
    };
    let args: Vec<String> = container("controller")["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    for want in [
        "--xds=127.0.0.1:18000",
        "--channel=127.0.0.1:18001",
        "--kube",
        "--wasm=/wasm/connector_filter.wasm",
        "--proxy-tls-secret=oci-connector-system/connector-proxy-tls",
        "--proxy-url=https://192.168.1.10:31567",
    ] {
        assert!(args.iter().any(|a| a == want), "controller args lack {want}: {args:?}");
    }
    // The module the controller names is baked into the proxy image (deploy/images/Containerfile.proxy).
    assert_eq!(container("envoy")["image"], "oci-connector/proxy:0.1.0");
    let containerfile = std::fs::read_to_string(repo_root().join("deploy/images/Containerfile.proxy")).unwrap();
    assert!(
        containerfile.contains("COPY connector_filter.wasm /wasm/connector_filter.wasm"),
        "the proxy image holds the module at the path --wasm names"
    );
    // Every variant takes its image names from the one component, and every image is named there.
    let images = docs(&deploy().join("images/kustomization.yaml"))[0]["images"].clone();
    for (variant, names) in [
        ("standalone", &["controller", "proxy", "webhook"][..]),
        ("istio", &["controller", "webhook"][..]),
    ] {
        let k = &docs(&deploy().join(variant).join("kustomization.yaml"))[0];
        assert!(
            k["components"].as_array().unwrap().iter().any(|c| c == "../images"),
            "{variant} uses deploy/images"
        );
        for n in names {
            let entry = images
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["name"] == format!("oci-connector/{n}"));
            let new_name = entry
                .map(|e| e["newName"].as_str().unwrap_or_default())
                .unwrap_or_default();
            assert!(
                new_name.ends_with(&format!("/oci-connector/{n}")) && new_name.contains('.'),
                "{n}: a fully qualified name in deploy/images, got {new_name:?}"
            );
            // Pinned by digest (what `make images PUSH=1` pushed), not by a tag that can move.
            let digest = entry
                .map(|e| e["digest"].as_str().unwrap_or_default())
                .unwrap_or_default();
            assert!(
                digest.starts_with("sha256:") && digest.len() == 71,
                "{n}: pinned by digest, got {digest:?}"
            );
        }
    }
    assert_eq!(container("envoy")["ports"][0]["containerPort"], 8080);
    // The API token is mounted into the controller only (issue 12.9): not automounted into
    // every container, and a projected ServiceAccount token on the controller's in-cluster path.
    assert_eq!(pod["automountServiceAccountToken"], json!(false));
    let token_path = "/var/run/secrets/kubernetes.io/serviceaccount";
    let mounts_of = |n: &str| container(n)["volumeMounts"].as_array().cloned().unwrap_or_default();
    assert!(
        !mounts_of("envoy").iter().any(|m| m["mountPath"] == token_path),
        "Envoy holds no API token"
    );
    let token_mount = mounts_of("controller")
        .into_iter()
        .find(|m| m["mountPath"] == token_path)
        .expect("the controller mounts the API token");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == token_mount["name"])
        .unwrap();
    assert!(
        volume["projected"]["sources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["serviceAccountToken"]["path"] == "token"),
        "{volume}"
    );
    let svc = find(&all, "Service", "connector-proxy");
    assert_eq!(svc["spec"]["type"], "NodePort");
    // The controller's ServiceAccount has exactly the RBAC the README lists, no wildcards.
    let rbac = docs(&deploy().join("base/controller-rbac.yaml"));
    for d in &rbac {
        for rule in d["rules"].as_array().into_iter().flatten() {
            for key in ["verbs", "resources", "apiGroups"] {
                assert!(
                    !rule[key].as_array().into_iter().flatten().any(|v| v == "*"),
                    "wildcard in {}: {rule}",
                    d["metadata"]["name"]
                );
            }
        }
    }
    let role = find(&rbac, "ClusterRole", "oci-connector-controller");
    let secrets = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"] == json!(["secrets"]))
        .unwrap();
    assert_eq!(
        secrets["verbs"],
        json!(["get", "list", "watch"]),
        "Secrets are only read"
    );
    let webhook = docs(&deploy().join("base/webhook.yaml"));
    let hook = find(&webhook, "MutatingWebhookConfiguration", "oci-connector-image-rewrite");
    assert_eq!(hook["webhooks"][0]["failurePolicy"], "Fail");
    assert_eq!(
        hook["webhooks"][0]["objectSelector"]["matchLabels"]["connectors.cpaas.io/proxy-inject"],
        "true"
    );
}

#[test]
fn the_istio_variant_fails_closed_and_pulls_the_oci_artifact() {
    let all = docs(&deploy().join("istio/wasmplugin.yaml"));
    let plugin = find(&all, "WasmPlugin", "oci-connector");
    assert_eq!(plugin["apiVersion"], "extensions.istio.io/v1alpha1");
    assert_eq!(plugin["spec"]["failStrategy"], "FAIL_CLOSE");
    assert!(plugin["spec"]["url"].as_str().unwrap().starts_with("oci://"));
    let config = &plugin["spec"]["pluginConfig"];
    assert_eq!(config["authorization"], "controller");
    let entry = find(&all, "ServiceEntry", "connector-controller-channel");
    assert_eq!(
        config["controller"]["cluster"],
        format!(
            "outbound|{}||{}",
            entry["spec"]["ports"][0]["number"],
            entry["spec"]["hosts"][0].as_str().unwrap()
        ),
        "the filter's channel cluster is the one Istio builds for the ServiceEntry"
    );
}

#[test]
fn the_compose_demo_names_only_what_exists_and_agrees_with_envoy() {
    let root = repo_root();
    let compose = &docs(&root.join("docker-compose.yml"))[0];
    let services = compose["services"].as_object().unwrap();
    for (name, svc) in services {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let spec = v.as_str().unwrap();
            // `${OCI_CONNECTOR_COMPOSE_DIR:-./deploy/compose/local}`: the generated files
            // (deploy/compose/make-files.sh, or `make compose-demo`), not in the repository.
            if let Some(rest) = spec.strip_prefix("${OCI_CONNECTOR_COMPOSE_DIR:-") {
                assert!(rest.starts_with("./deploy/compose/local}:"), "{name}: {spec}");
                assert!(root.join("deploy/compose/make-files.sh").is_file());
                continue;
            }
            let src = spec.split(':').next().unwrap();
            if !src.starts_with('.') && !src.starts_with('/') {
                // A named volume: declared at the top level.
                assert!(
                    compose["volumes"].get(src).is_some(),
                    "{name} mounts undeclared volume {src}"
                );
                continue;
            }
            let path = root.join(src.trim_start_matches("./"));
            if src.starts_with("./target/") {
                // A build output: the path `make wasm` writes.
                assert_eq!(path, connector_devkit::wasm_path(), "{name}: {src}");
            } else {
                assert!(path.exists(), "{name} mounts {src}, which is not in the repository");
            }
        }
    }
    let envoy_file = root.join("deploy/compose/envoy.yaml");
    let envoy: Value = serde_saphyr::from_str(&std::fs::read_to_string(&envoy_file).unwrap()).unwrap();
    assert_eq!(envoy, bootstrap_for_containers(), "deploy/compose/envoy.yaml");
    let listener_port = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        .as_u64()
        .unwrap();
    let published = services["envoy"]["ports"][0].as_str().unwrap();
    assert_eq!(
        published,
        format!("{listener_port}:{listener_port}"),
        "compose publishes Envoy's listener"
    );
    let controller = &services["controller"];
    assert_eq!(
        controller["network_mode"], "service:envoy",
        "loopback shared with Envoy"
    );
    let command: Vec<&str> = controller["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let port_of = |cluster: &str| -> u64 {
        let c = envoy["static_resources"]["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == cluster)
            .unwrap();
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"]
            .as_u64()
            .unwrap()
    };
    assert!(
        command.contains(&format!("--xds=127.0.0.1:{}", port_of("xds_controller")).as_str()),
        "{command:?}"
    );
    assert!(
        command.contains(&format!("--channel=127.0.0.1:{}", port_of("connector_controller")).as_str()),
        "{command:?}"
    );
    assert_eq!(
        services["envoy"]["environment"]["CONNECTOR_CHANNEL_KEY"], controller["environment"]["CONNECTOR_CHANNEL_KEY"],
        "one channel key"
    );
    // The listener speaks TLS: the controller serves the certificate make-files.sh (or
    // `make compose-demo`) wrote, and reads the identity from the same directory.
    for want in [
        "--proxy-tls-cert=/local/tls/tls.crt",
        "--proxy-tls-key=/local/tls/tls.key",
        "--upstream-ca=/local/tls/ca.crt",
        "--identity=/local/identity.json",
    ] {
        assert!(command.contains(&want), "{command:?}");
    }
    let make_files = std::fs::read_to_string(root.join("deploy/compose/make-files.sh")).unwrap();
    assert!(make_files.contains("\"$d/tls/tls.crt\"") && make_files.contains("\"$d/identity.json\""));
    // Every image is the project's own, under the one registry variable.
    for (name, svc) in services {
        let image = svc["image"].as_str().unwrap();
        assert!(
            image.starts_with("${OCI_CONNECTOR_IMAGE_REGISTRY:-localhost}/oci-connector/"),
            "{name}: {image}"
        );
    }
    // The compose manifests are what the controller accepts: they render with one connector
    // whose cluster reaches the `registry` service.
    let hub_inputs = connector_controller::filemode::load(&connector_controller::filemode::FileSettings {
        manifests: root.join("deploy/compose/manifests"),
        identity: root.join("deploy/compose/identity.json"),
        poll: std::time::Duration::from_secs(1),
    })
    .unwrap_or_else(|p| panic!("{p:?}"));
    let rendered = connector_controller::pipeline::render_live(
        &hub_inputs,
        &connector_controller::pipeline::ChannelSettings {
            cluster: "connector_controller".into(),
            key_env: Some("CONNECTOR_CHANNEL_KEY".into()),
            delivery: connector_controller::pipeline::Delivery::Inline,
        },
        &connector_controller::pipeline::Revisions::new(),
        &connector_controller::pipeline::Tenancy::default(),
    )
    .unwrap_or_else(|p| panic!("{p:?}"));
    assert_eq!(rendered.connectors.len(), 1, "{:?}", rendered.left_out);
    assert_eq!(rendered.clusters[0].host, "registry");
    assert_eq!(rendered.clusters[0].port, 5000);
    // The registry speaks TLS (make-files.sh issues its certificate from the demo CA).
    assert!(rendered.clusters[0].tls, "the compose registry is reached over TLS");
    assert!(make_files.contains("\"$d/tls/registry.crt\""));
    assert!(services.contains_key("registry"));
}

/// Issue 13: the cert-manager example issues the Secret the proxy Deployment's controller
/// watches, as a kubernetes.io/tls Secret, with names covering both address forms: the proxy
/// Service (path form) and the host form's `c-<name>-connector.<ns>.svc.cluster.local` for the
/// example Connector (a wildcard, checked as RFC 6125 matches it: one leftmost label).
#[test]
fn the_cert_manager_example_issues_the_secret_the_proxy_serves_for_both_address_forms() {
    let all = docs(&deploy().join("cert-manager/proxy-certificate.yaml"));
    let cert = find(&all, "Certificate", "connector-proxy");
    assert_eq!(cert["apiVersion"], "cert-manager.io/v1");
    let issuer = find(&all, "Issuer", cert["spec"]["issuerRef"]["name"].as_str().unwrap());
    assert_eq!(issuer["metadata"]["namespace"], cert["metadata"]["namespace"]);
    let proxy = docs(&deploy().join("standalone/proxy.yaml"));
    let args =
        find(&proxy, "Deployment", "connector-proxy")["spec"]["template"]["spec"]["containers"][1]["args"].clone();
    let secret = format!(
        "--proxy-tls-secret={}/{}",
        cert["metadata"]["namespace"].as_str().unwrap(),
        cert["spec"]["secretName"].as_str().unwrap()
    );
    assert!(args.as_array().unwrap().iter().any(|a| a == &json!(secret)), "{args}");
    let names: Vec<&str> = cert["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    let covers = |host: &str| {
        names.iter().any(|n| match n.strip_prefix("*.") {
            Some(suffix) => host.split_once('.').is_some_and(|(_, rest)| rest == suffix),
            None => *n == host,
        })
    };
    assert!(
        covers("connector-proxy.oci-connector-system.svc.cluster.local"),
        "{names:?}"
    );
    let example = docs(&deploy().join("examples/connector.yaml"));
    let c = example.iter().find(|d| d["kind"] == "Connector").unwrap();
    let host = connector_devkit::stack::host_name(
        c["metadata"]["namespace"].as_str().unwrap(),
        c["metadata"]["name"].as_str().unwrap(),
    );
    assert!(covers(&host), "{host} not covered by {names:?}");
}
