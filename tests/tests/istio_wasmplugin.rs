//! Issue 16 item 5: the `deploy/istio` variant checked by Istio's own validation, and working
//! as shipped. No istiod runs here; what does run:
//!
//! - `istioctl validate -f` and `istioctl analyze --use-kube=false -A` (istioctl built from the
//!   Go module proxy by `scripts/setup.sh`) on the variant exactly as `kubectl kustomize
//!   deploy/istio` renders it: no error, no warning but the one named below; and a broken copy of
//!   the WasmPlugin is refused, so the check can fail.
//! - On a real kube-apiserver (devkit) with Istio's WasmPlugin CRD (tests/testdata, copied from
//!   the same istio module): the shipped WasmPlugin applied with kubectl, then the controller
//!   with `--istio-wasmplugin`, running with exactly the variant's RBAC, writes the rendered
//!   filter configuration into `spec.pluginConfig` (field manager
//!   `connector-controller-wasmplugin`), with no secret in the object; a real Envoy with the
//!   filter, given first the shipped placeholder (every request refused with 401 and OCI error
//!   JSON, not a 503), then exactly the pluginConfig the controller wrote, pulls an image with
//!   skopeo and a token from the TokenRequest API; re-applying the shipped placeholder is put
//!   right by the controller again.
//! - With Istio's ServiceEntry and DestinationRule CRDs (tests/testdata, same module): the
//!   controller names each upstream cluster as Istio does (`outbound|<port>||<host>`) and writes
//!   one ServiceEntry per upstream host and, for https hosts, a DestinationRule originating TLS
//!   with the host as SNI and subjectAltName; `istioctl validate`/`analyze` accept them as the
//!   API server holds them; the clusters the pluginConfig names are exactly those Istio builds
//!   for them; they go with the last Connector needing them; `ProxyReady` is
//!   `PluginConfigWritten`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use connector_devkit::controller::Controller;
use connector_devkit::envoy::{Cluster, Envoy, EnvoySpec, WasmFilter};
use connector_devkit::http::Request;
use connector_devkit::kube::{CONTROLLER_USER, KubeCluster};
use connector_devkit::{procs, repo_root};
use serde_json::{Value, json};

/// The WasmPlugin of the variant and the controller's flag naming it.
const PLUGIN_NS: &str = "oci-connector-system";
const PLUGIN: &str = "oci-connector";
/// The cluster Istio builds for the variant's channel ServiceEntry.
const CHANNEL_CLUSTER: &str = "outbound|18001||connector-controller.local";
const NS: &str = connector_e2e::xds::NS;
const DEADLINE: Duration = Duration::from_secs(30);

/// `.cache/tools/istioctl`, which `scripts/setup.sh` builds and links.
fn istioctl() -> PathBuf {
    let p = repo_root().join(".cache/tools/istioctl");
    assert!(
        p.is_file(),
        "{} is missing: run `bash scripts/setup.sh` (builds istioctl from the Go module proxy)",
        p.display()
    );
    p
}

fn run(bin: &PathBuf, args: &[&str]) -> procs::Output {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    procs::run(cmd, None).unwrap_or_else(|e| panic!("{} {args:?}: {e}", bin.display()))
}

/// `kubectl kustomize deploy/istio`: what `kubectl apply -k deploy/istio` applies.
fn rendered_variant() -> String {
    let kubectl = connector_devkit::kube::binary("kubectl").unwrap_or_else(|e| panic!("{e}"));
    let dir = repo_root().join("deploy/istio");
    let out = run(&kubectl, &["kustomize", &dir.display().to_string()]);
    assert!(out.success, "kubectl kustomize deploy/istio: {}", out.stderr);
    out.stdout
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn shipped_plugin() -> Value {
    documents(&rendered_variant())
        .into_iter()
        .find(|d| d["kind"] == "WasmPlugin" && d["metadata"]["name"] == PLUGIN)
        .expect("deploy/istio renders the WasmPlugin")
}

#[test]
fn istioctl_validates_and_analyzes_the_rendered_variant() {
    let istioctl = istioctl();
    let work = connector_devkit::WorkDir::new("istioctl").unwrap();
    let rendered = rendered_variant();
    let kinds: Vec<String> = documents(&rendered)
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    for k in ["WasmPlugin", "Gateway", "ServiceEntry", "Deployment"] {
        assert!(kinds.iter().any(|x| x == k), "the render has a {k}: {kinds:?}");
    }
    let file = work.path().join("istio.yaml");
    std::fs::write(&file, &rendered).unwrap();
    let file = file.display().to_string();

    let started = Instant::now();
    let validate = run(&istioctl, &["validate", "-f", &file]);
    let text = format!("{}{}", validate.stdout, validate.stderr);
    assert!(validate.success, "istioctl validate -f: {text}");
    assert!(text.contains("is valid"), "{text}");
    // The one warning left: the webhook Deployment (deploy/base, not in the mesh: its namespace
    // has no sidecar injection) lacks Istio's telemetry labels `app`/`version`. The gateway has them.
    for line in text.lines().filter(|l| !l.trim().is_empty() && !l.contains("is valid")) {
        assert!(
            line.contains("deployment \"connector-webhook/oci-connector-system:\" may not provide Istio metrics and telemetry labels"),
            "unexpected istioctl validate output: {line}\n{text}"
        );
    }

    let analyze = run(
        &istioctl,
        &[
            "analyze",
            "--use-kube=false",
            "-A",
            "--output-threshold",
            "Info",
            "-o",
            "json",
            &file,
        ],
    );
    assert!(
        analyze.success,
        "istioctl analyze: {}{}",
        analyze.stdout, analyze.stderr
    );
    let messages: Value = serde_json::from_str(analyze.stdout.trim())
        .unwrap_or_else(|e| panic!("istioctl analyze -o json: {e}: {}", analyze.stdout));
    assert_eq!(
        messages,
        json!([]),
        "istioctl analyze found something: {}",
        analyze.stderr
    );
    let took = started.elapsed();

    // The checks can fail: a WasmPlugin Istio refuses (an enum value it does not know, an URL
    // scheme it does not fetch) makes both commands fail.
    for (what, from, to) in [
        (
            "failStrategy",
            "failStrategy: FAIL_CLOSE",
            "failStrategy: FAIL_SOMETIMES",
        ),
        ("url", "url: oci://", "url: ftp://"),
    ] {
        assert!(rendered.contains(from), "{from}");
        let broken = work.path().join(format!("broken-{what}.yaml"));
        std::fs::write(&broken, rendered.replace(from, to)).unwrap();
        let broken = broken.display().to_string();
        let v = run(&istioctl, &["validate", "-f", &broken]);
        assert!(
            !v.success,
            "istioctl validate accepted a broken {what}: {}{}",
            v.stdout, v.stderr
        );
        assert!(
            format!("{}{}", v.stdout, v.stderr).contains("WasmPlugin/oci-connector-system/oci-connector"),
            "{what}: {}{}",
            v.stdout,
            v.stderr
        );
        if what == "failStrategy" {
            let a = run(&istioctl, &["analyze", "--use-kube=false", "-A", &broken]);
            assert!(!a.success, "istioctl analyze accepted a broken {what}");
        }
    }
    eprintln!("istioctl validate + analyze of deploy/istio: {took:?}");
}

/// The files agree with each other: the gateway's controller writes the WasmPlugin the variant
/// ships, names the channel by the cluster its placeholder names, and its ServiceAccount may
/// patch exactly that WasmPlugin.
#[test]
fn the_gateway_controller_is_pointed_at_the_shipped_wasmplugin() {
    let all = documents(&rendered_variant());
    let find = |kind: &str, name: &str| {
        all.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name}"))
            .clone()
    };
    let plugin = shipped_plugin();
    let pod = find("Deployment", "connector-gateway")["spec"]["template"]["spec"].clone();
    let controller = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "controller")
        .unwrap()
        .clone();
    let args: Vec<&str> = controller["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let want = [
        format!(
            "--istio-wasmplugin={}/{}",
            plugin["metadata"]["namespace"].as_str().unwrap(),
            plugin["metadata"]["name"].as_str().unwrap()
        ),
        format!(
            "--channel-cluster={}",
            plugin["spec"]["pluginConfig"]["controller"]["cluster"]
                .as_str()
                .unwrap()
        ),
    ];
    for w in &want {
        assert!(args.contains(&w.as_str()), "controller args lack {w}: {args:?}");
    }
    let role = find("Role", "oci-connector-controller-wasmplugin");
    assert_eq!(role["metadata"]["namespace"], plugin["metadata"]["namespace"]);
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": ["extensions.istio.io"], "resources": ["wasmplugins"],
            "resourceNames": [plugin["metadata"]["name"]], "verbs": ["get", "list", "watch", "patch"]}])
    );
    let binding = find("RoleBinding", "oci-connector-controller-wasmplugin");
    assert_eq!(binding["subjects"][0]["name"], pod["serviceAccountName"]);
    // The upstreams' ServiceEntries/DestinationRules: found by label, written by server-side
    // apply, deleted; no get, no watch, nothing else of Istio's.
    let role = find("Role", "oci-connector-controller-istio-upstreams");
    assert_eq!(role["metadata"]["namespace"], plugin["metadata"]["namespace"]);
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": ["networking.istio.io"], "resources": ["serviceentries", "destinationrules"],
            "verbs": ["list", "create", "patch", "delete"]}])
    );
    let binding = find("RoleBinding", "oci-connector-controller-istio-upstreams");
    assert_eq!(binding["subjects"][0]["name"], pod["serviceAccountName"]);
}

fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < DEADLINE, "{what}: not within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn can_i(kube: &KubeCluster, args: &[&str]) -> String {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--as", CONTROLLER_USER]);
    kube.kubectl(&all).unwrap().stdout.trim().to_string()
}

/// A static Envoy with the filter configured by `plugin_config` exactly (as istiod hands a
/// WasmPlugin's pluginConfig to the gateway's Envoy), the channel cluster Istio would build, and
/// the connector's upstream cluster.
fn envoy_with(
    work: &connector_devkit::WorkDir,
    plugin_config: &Value,
    (channel_port, env): (u16, Vec<(String, String)>),
    upstream: Option<(&str, u16)>,
) -> Envoy {
    let mut clusters = vec![Cluster {
        name: CHANNEL_CLUSTER.into(),
        port: channel_port,
    }];
    if let Some((name, port)) = upstream {
        clusters.push(Cluster {
            name: name.into(),
            port,
        });
    }
    Envoy::start(
        work,
        &EnvoySpec {
            clusters,
            filter: Some(WasmFilter {
                wasm: connector_devkit::require_wasm().unwrap(),
                config: plugin_config.clone(),
                secret_env: env,
                plain_route: false,
            }),
        },
    )
    .unwrap()
}

/// A real kube-apiserver with the project's and Istio's CRDs, the demo namespace and the shipped
/// WasmPlugin applied as `kubectl apply -k deploy/istio` would (client-side); the harness's
/// registry; the controller's kubeconfig with exactly the variant's RBAC (deploy/base +
/// wasmplugin-rbac.yaml).
fn istio_api(label: &str) -> (connector_e2e::xds::Setup, KubeCluster, PathBuf) {
    let s = connector_e2e::xds::setup(label);
    let kube = KubeCluster::start(label).unwrap_or_else(|e| panic!("{e}"));
    kube.install_crd().unwrap();
    for crds in ["istio-wasmplugin-crd.yaml", "istio-networking-crds.yaml"] {
        let crd = repo_root().join("tests/testdata").join(crds);
        kube.kubectl(&["apply", "--server-side", "-f", &crd.display().to_string()])
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    kube.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/wasmplugins.extensions.istio.io",
        "crd/serviceentries.networking.istio.io",
        "crd/destinationrules.networking.istio.io",
    ])
    .and_then(|o| o.ok())
    .unwrap_or_else(|e| panic!("{e}"));
    let kubeconfig = kube.controller_kubeconfig_for("istio").unwrap();
    kube.namespace(NS, &[]).unwrap();
    kube.kubectl_stdin(&["apply", "-f", "-"], Some(shipped_plugin().to_string().as_bytes()))
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));
    (s, kube, kubeconfig)
}

/// The gateway's controller as the variant runs it: writing the shipped WasmPlugin, its
/// channel reached through the cluster Istio builds, TLS terminated by the Gateway.
fn gateway_controller(work: &connector_devkit::WorkDir, kubeconfig: &std::path::Path) -> Controller {
    Controller::start_kube(
        work,
        kubeconfig,
        "https://192.168.1.10:31568",
        &[
            "--istio-wasmplugin",
            &format!("{PLUGIN_NS}/{PLUGIN}"),
            "--channel-cluster",
            CHANNEL_CLUSTER,
            "--proxy-tls-external",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_controller_writes_the_wasmplugin_and_envoy_pulls_with_exactly_that_configuration() {
    let (s, kube, kubeconfig) = istio_api("istio-wasmplugin");
    let creds = s.registry.credentials.clone().unwrap();
    let shipped = shipped_plugin();
    let placeholder = shipped["spec"]["pluginConfig"].clone();
    // RBAC: this WasmPlugin only.
    assert_eq!(
        can_i(
            &kube,
            &[
                "patch",
                "wasmplugins.extensions.istio.io/oci-connector",
                "-n",
                PLUGIN_NS
            ]
        ),
        "yes"
    );
    assert_eq!(
        can_i(
            &kube,
            &["patch", "wasmplugins.extensions.istio.io/other", "-n", PLUGIN_NS]
        ),
        "no"
    );
    assert_eq!(
        can_i(&kube, &["create", "wasmplugins.extensions.istio.io", "-n", PLUGIN_NS]),
        "no"
    );
    assert_eq!(
        can_i(
            &kube,
            &["patch", "wasmplugins.extensions.istio.io/oci-connector", "-n", NS]
        ),
        "no"
    );
    // The upstreams' ServiceEntries and DestinationRules: in the gateway's namespace only.
    for kind in [
        "serviceentries.networking.istio.io",
        "destinationrules.networking.istio.io",
    ] {
        for verb in ["list", "create", "patch", "delete"] {
            assert_eq!(can_i(&kube, &[verb, kind, "-n", PLUGIN_NS]), "yes", "{verb} {kind}");
            assert_eq!(can_i(&kube, &[verb, kind, "-n", NS]), "no", "{verb} {kind} in {NS}");
        }
        assert_eq!(can_i(&kube, &["watch", kind, "-n", PLUGIN_NS]), "no", "watch {kind}");
    }
    assert_eq!(
        can_i(
            &kube,
            &["create", "virtualservices.networking.istio.io", "-n", PLUGIN_NS]
        ),
        "no"
    );

    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "robot", "namespace": NS,
            "annotations": {"connectors.alauda.io/allowed-connectors": "registry"}},
        "type": "kubernetes.io/basic-auth",
        "stringData": {"username": creds.username, "password": creds.password},
    }))
    .unwrap();
    kube.apply(&json!({
        "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": "registry", "namespace": NS},
        "spec": {"address": s.registry.url(), "auth": {"name": "basicAuth", "secretRef": {"name": "robot"}}, "connectorClassName": "oci"},
    }))
    .unwrap();
    kube.kubectl(&[
        "create",
        "rolebinding",
        "default-uses-connectors",
        "-n",
        NS,
        "--clusterrole=oci-connector-user",
        "--serviceaccount=demo:default",
    ])
    .and_then(|o| o.ok())
    .unwrap_or_else(|e| panic!("{e}"));
    let token = kube.create_token(NS, "default", "oci-connector", &[]).unwrap();

    // As shipped (what Envoy runs before the controller wrote anything): the filter loads and
    // refuses every request with 401 and OCI error JSON; no 503, nothing forwarded.
    {
        let work = connector_devkit::WorkDir::new("istio-placeholder").unwrap();
        // No controller yet: the channel cluster leads nowhere, the key is a fresh one.
        let key = vec![(
            connector_devkit::controller::CHANNEL_KEY_ENV.to_string(),
            connector_devkit::random_secret().unwrap(),
        )];
        let envoy = envoy_with(&work, &placeholder, (procs::free_port().unwrap(), key), None);
        for path in [
            "/v2/",
            "/v2/namespaces/demo/connectors/registry/library/app/manifests/v1",
        ] {
            let r = Request::get(path)
                .header("authorization", &format!("Bearer {token}"))
                .send(envoy.port)
                .unwrap();
            assert_eq!(r.status, 401, "{path}: {}", r.body_text());
            let body = r.json().unwrap_or_else(|e| panic!("{path}: {e}: {}", r.body_text()));
            assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED", "{path}: {body}");
            assert!(
                body["errors"][0]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("no ServiceAccount keys yet"),
                "{path}: {body}"
            );
        }
        let log = envoy.log();
        assert!(
            log.contains("configuration accepted: 0 connector(s), 0 key(s)"),
            "{log}"
        );
        assert!(
            envoy.critical_wasm_lines().is_empty(),
            "{:?}",
            envoy.critical_wasm_lines()
        );
    }

    let started = Instant::now();
    let controller = gateway_controller(&s.work, &kubeconfig);
    let ready = started.elapsed();

    // The controller writes the WasmPlugin: the cluster's keys, the connector, the channel cluster.
    let (plugin, took) = until("the controller writes the WasmPlugin's pluginConfig", || {
        let p = kube.get("wasmplugin", PLUGIN_NS, PLUGIN).ok()??;
        let connectors = p["spec"]["pluginConfig"]["connectors"].as_array()?;
        (connectors.len() == 1).then_some(p)
    });
    let config = plugin["spec"]["pluginConfig"].clone();
    assert_eq!(config["controller"]["cluster"], CHANNEL_CLUSTER);
    assert_eq!(config["controller"]["keyEnv"], "CONNECTOR_CHANNEL_KEY");
    assert_eq!(config["authorization"], "controller");
    assert!(!config["identity"]["jwks"]["keys"].as_array().unwrap().is_empty());
    let entry = &config["connectors"][0];
    assert_eq!(
        (entry["namespace"].as_str(), entry["name"].as_str()),
        (Some(NS), Some("registry"))
    );
    assert!(entry["credential"]["fromController"].is_string(), "{entry}");
    // The cluster is the one Istio builds for the ServiceEntry the controller wrote for the
    // registry's address (an IP: a never-resolved name, the address its STATIC endpoint).
    let registry_host = "127-0-0-1.ipv4.oci-connector.invalid";
    assert_eq!(
        entry["cluster"],
        format!("outbound|{}||{registry_host}", s.registry.port)
    );
    let (entries, se_took) = until("the registry's ServiceEntry", || {
        let e = upstream_objects(&kube, "serviceentries");
        (!e.is_empty()).then_some(e)
    });
    assert_eq!(entries.len(), 1, "{entries:?}");
    let se = &entries[0];
    assert_eq!(se["spec"]["hosts"], json!([registry_host]));
    assert_eq!(se["spec"]["resolution"], "STATIC");
    assert_eq!(se["spec"]["location"], "MESH_EXTERNAL");
    assert_eq!(se["spec"]["exportTo"], json!(["."]));
    assert_eq!(se["spec"]["endpoints"], json!([{"address": "127.0.0.1"}]));
    assert_eq!(
        se["spec"]["ports"],
        json!([{"number": s.registry.port, "name": format!("https-{}", s.registry.port), "protocol": "HTTPS"}])
    );
    // The harness's registry serves TLS: one DestinationRule originates it, verified against the
    // upstream CA, the certificate required to name the address (no SNI for an address).
    // Written after the ServiceEntry, so waited for in turn (read at once, it raced the write).
    let (rules, _) = until("the registry's DestinationRule", || {
        let r = upstream_objects(&kube, "destinationrules");
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(rules.len(), 1, "{rules:?}");
    let tls = &rules[0]["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"];
    assert_eq!(tls["mode"], "SIMPLE", "{tls}");
    assert_eq!(tls["subjectAltNames"], json!(["127.0.0.1"]), "{tls}");
    assert!(tls["sni"].is_null() && tls["caCertificates"].is_string(), "{tls}");
    assert_eq!(istio_clusters(&entries), referenced_clusters(&config));
    // ProxyReady says what the controller saw: the WasmPlugin and the ServiceEntries carry the
    // configuration (no Envoy connects to its xDS server in Istio mode).
    let (proxy_ready, _) = until("ProxyReady is PluginConfigWritten", || {
        let c = kube.get("connector", NS, "registry").ok()??;
        let ready = c["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "ProxyReady")?
            .clone();
        (ready["reason"] == "PluginConfigWritten").then_some(ready)
    });
    assert_eq!(proxy_ready["status"], "True", "{proxy_ready}");
    assert!(
        proxy_ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains("istiod delivers it"),
        "{proxy_ready}"
    );
    // Everything else of the shipped object is the operator's, untouched.
    for field in ["url", "failStrategy", "selector", "phase", "vmConfig", "pluginName"] {
        assert_eq!(plugin["spec"][field], shipped["spec"][field], "spec.{field}");
    }
    // pluginConfig is the controller's field manager's (server-side apply).
    let with_fields: Value = serde_json::from_str(
        &kube
            .kubectl(&[
                "get",
                "wasmplugin",
                PLUGIN,
                "-n",
                PLUGIN_NS,
                "--show-managed-fields",
                "-o",
                "json",
            ])
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("{e}"))
            .stdout,
    )
    .unwrap();
    let ours = with_fields["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["manager"] == "connector-controller-wasmplugin")
        .unwrap_or_else(|| panic!("{}", with_fields["metadata"]["managedFields"]));
    assert_eq!(ours["operation"], "Apply");
    assert!(ours["fieldsV1"]["f:spec"]["f:pluginConfig"].is_object(), "{ours}");
    // No secret in the WasmPlugin: not the password, not the username:password pair, not the key.
    let whole = plugin.to_string();
    assert!(
        !whole.contains(&creds.password),
        "the registry password is in the WasmPlugin"
    );
    assert!(
        !whole.contains(controller.key()),
        "the channel key is in the WasmPlugin"
    );
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", creds.username, creds.password));
    assert!(!whole.contains(&basic));

    // Exactly that pluginConfig in a real Envoy with the filter: an image pulled through it.
    let cluster = entry["cluster"].as_str().unwrap().to_string();
    let envoy = envoy_with(
        &s.work,
        &config,
        (controller.ports.channel, controller.envoy_env()),
        Some((&cluster, s.registry.port)),
    );
    // In the Istio variant the Gateway terminates TLS in front of the filter
    // (--proxy-tls-external): this Envoy stands in for the filter's side of it, so its listener
    // is plain, and the client is told so explicitly.
    s.skopeo.plain_http(&envoy.authority()).unwrap();
    let pulled = Instant::now();
    connector_e2e::xds::pull(&s, &envoy.authority(), "registry", &token, "pulled");
    let pull_took = pulled.elapsed();
    assert!(
        envoy.critical_wasm_lines().is_empty(),
        "{:?}",
        envoy.critical_wasm_lines()
    );
    // Another namespace's token is refused with an OCI error (RBAC through the controller).
    kube.namespace("other", &[]).unwrap();
    let other = kube.create_token("other", "default", "oci-connector", &[]).unwrap();
    let r = Request::get("/v2/namespaces/demo/connectors/registry/library/app/manifests/v1")
        .header("authorization", &format!("Bearer {other}"))
        .send(envoy.port)
        .unwrap();
    assert!(matches!(r.status, 403 | 404), "{}: {}", r.status, r.body_text());

    // A second replica (its own ports, the channel key every replica shares) writes the same
    // configuration: the WasmPlugin is not rewritten, and a second gateway Envoy given that one
    // pluginConfig pulls through the second controller's channel (same credential revisions).
    let rv = plugin["metadata"]["resourceVersion"].clone();
    let replica = Controller::restart_kube(
        &s.work,
        "controller-2",
        &kubeconfig,
        "https://192.168.1.10:31568",
        (connector_devkit::controller::Ports::free().unwrap(), controller.key()),
        &[
            "--istio-wasmplugin",
            &format!("{PLUGIN_NS}/{PLUGIN}"),
            "--channel-cluster",
            CHANNEL_CLUSTER,
            "--proxy-tls-external",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(1));
    let now = kube.get("wasmplugin", PLUGIN_NS, PLUGIN).unwrap().unwrap();
    assert_eq!(
        now["metadata"]["resourceVersion"], rv,
        "the second replica rewrote the WasmPlugin"
    );
    let replica_work = connector_devkit::WorkDir::new("istio-replica").unwrap();
    let second = envoy_with(
        &replica_work,
        &config,
        (replica.ports.channel, replica.envoy_env()),
        Some((&cluster, s.registry.port)),
    );
    s.skopeo.plain_http(&second.authority()).unwrap();
    connector_e2e::xds::pull(&s, &second.authority(), "registry", &token, "pulled-replica");
    drop(second);
    drop(replica);

    // The credential rotated: a new revision in the WasmPlugin, and still no password in it.
    let revision = entry["credential"]["fromController"].clone();
    let rotated = "rotated-password-for-the-revision-check";
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "robot", "namespace": NS,
            "annotations": {"connectors.alauda.io/allowed-connectors": "registry"}},
        "type": "kubernetes.io/basic-auth",
        "stringData": {"username": creds.username, "password": rotated},
    }))
    .unwrap();
    let (after, rotation) = until("a rotated credential gets a new revision in the WasmPlugin", || {
        let p = kube.get("wasmplugin", PLUGIN_NS, PLUGIN).ok()??;
        let r = p["spec"]["pluginConfig"]["connectors"][0]["credential"]["fromController"].clone();
        (r.is_string() && r != revision).then_some(p)
    });
    assert!(
        !after.to_string().contains(rotated),
        "the rotated password is in the WasmPlugin"
    );
    // Back to the working credential, and the configuration the rest of the test compares with.
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "robot", "namespace": NS,
            "annotations": {"connectors.alauda.io/allowed-connectors": "registry"}},
        "type": "kubernetes.io/basic-auth",
        "stringData": {"username": creds.username, "password": creds.password},
    }))
    .unwrap();
    until("the credential's first revision is back", || {
        let p = kube.get("wasmplugin", PLUGIN_NS, PLUGIN).ok()??;
        (p["spec"]["pluginConfig"] == config).then_some(())
    });

    // `kubectl apply -k deploy/istio` again resets pluginConfig to the placeholder: the
    // controller, watching the WasmPlugin, writes its configuration back.
    kube.kubectl_stdin(&["apply", "-f", "-"], Some(shipped.to_string().as_bytes()))
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, restored) = until("the controller restores the WasmPlugin's pluginConfig", || {
        let p = kube.get("wasmplugin", PLUGIN_NS, PLUGIN).ok()??;
        (p["spec"]["pluginConfig"] == config).then_some(())
    });
    let tls = tls_upstreams(&kube, &creds);
    let log = controller.log();
    assert!(
        !log.contains(&creds.password),
        "the password is in the controller's log"
    );
    eprintln!(
        "controller ready (/readyz) {ready:?} after its start; pluginConfig seen written {took:?} later; registry ServiceEntry seen {se_took:?} after that; pull through Envoy with it: {pull_took:?}; rotated credential's new revision written in {rotation:?}; placeholder re-applied, restored in {restored:?}; {tls}"
    );
}

/// The ServiceEntries or DestinationRules the controller wrote for the WasmPlugin's upstreams.
fn upstream_objects(kube: &KubeCluster, resource: &str) -> Vec<Value> {
    let out = kube
        .kubectl(&[
            "get",
            &format!("{resource}.networking.istio.io"),
            "-n",
            PLUGIN_NS,
            "-l",
            &format!("app.kubernetes.io/managed-by=oci-connector-controller,connectors.alauda.io/wasmplugin={PLUGIN}"),
            "--show-managed-fields",
            "-o",
            "json",
        ])
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));
    let list: Value = serde_json::from_str(&out.stdout).unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

/// The clusters Istio builds for ServiceEntries: `outbound|<port>||<host>` for every host and
/// port (`model.BuildSubsetKey`, no subsets).
fn istio_clusters(entries: &[Value]) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for e in entries {
        for h in e["spec"]["hosts"].as_array().unwrap() {
            for p in e["spec"]["ports"].as_array().unwrap() {
                names.insert(format!("outbound|{}||{}", p["number"], h.as_str().unwrap()));
            }
        }
    }
    names
}

/// Every upstream and token-realm cluster a filter configuration names.
fn referenced_clusters(config: &Value) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for c in config["connectors"].as_array().unwrap() {
        names.insert(c["cluster"].as_str().unwrap().to_string());
        for r in c["tokenRealms"].as_array().into_iter().flatten() {
            names.insert(r["cluster"].as_str().unwrap().to_string());
        }
    }
    names
}

/// Two connectors on one https registry (one with an https token realm): one ServiceEntry
/// and one DestinationRule per host, TLS verified against the host; Istio's own validation
/// accepts them as the API server holds them; each goes when the last connector needing it
/// does. Returns the timings.
fn tls_upstreams(kube: &KubeCluster, creds: &connector_devkit::registry::Credentials) -> String {
    let (registry, realm) = ("registry.example.com", "auth.example.com");
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "robot-tls", "namespace": NS,
            "annotations": {"connectors.alauda.io/allowed-connectors": "*"}},
        "type": "kubernetes.io/basic-auth",
        "stringData": {"username": creds.username, "password": creds.password},
    }))
    .unwrap();
    for (name, realms) in [
        ("tls", json!([{"url": format!("https://{realm}/token")}])),
        ("tls-2", json!([])),
    ] {
        kube.apply(&json!({
            "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"address": format!("https://{registry}"), "tokenRealms": realms,
                "auth": {"name": "basicAuth", "secretRef": {"name": "robot-tls"}}, "connectorClassName": "oci"},
        }))
        .unwrap();
    }
    let started = Instant::now();
    let ((entries, rules, config), _) = until("ServiceEntries and DestinationRules for the https upstreams", || {
        let config = kube.get("wasmplugin", PLUGIN_NS, PLUGIN).ok()??["spec"]["pluginConfig"].clone();
        let (e, r) = (
            upstream_objects(kube, "serviceentries"),
            upstream_objects(kube, "destinationrules"),
        );
        // The harness registry (TLS too) keeps its own pair beside the two hosts here.
        (config["connectors"].as_array()?.len() == 3 && e.len() == 3 && r.len() == 3).then_some((e, r, config))
    });
    let written = started.elapsed();
    // The controller's --upstream-ca (devkit gives every controller the harness's upstream CA).
    let upstream_ca = connector_devkit::tls::upstream().unwrap().ca.display().to_string();
    let tls_entry = config["connectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tls")
        .unwrap();
    assert_eq!(tls_entry["cluster"], format!("outbound|443||{registry}"));
    assert_eq!(tls_entry["tokenRealms"][0]["cluster"], format!("outbound|443||{realm}"));
    // What the pluginConfig names is exactly what Istio builds from the ServiceEntries.
    assert_eq!(istio_clusters(&entries), referenced_clusters(&config));
    for host in [registry, realm] {
        let se = entries
            .iter()
            .find(|e| e["spec"]["hosts"] == json!([host]))
            .unwrap_or_else(|| panic!("no ServiceEntry for {host}: {entries:?}"));
        // These names do not resolve here: the controller pinned no address, and the gateway's
        // Envoy resolves nothing itself.
        assert_eq!(se["spec"]["resolution"], "STATIC");
        assert!(se["spec"]["endpoints"].is_null(), "{se}");
        assert_eq!(se["spec"]["location"], "MESH_EXTERNAL");
        assert_eq!(se["spec"]["exportTo"], json!(["."]));
        assert_eq!(
            se["spec"]["ports"],
            json!([{"number": 443, "name": "https-443", "protocol": "HTTPS"}])
        );
        let dr = rules
            .iter()
            .find(|r| r["spec"]["host"] == host)
            .unwrap_or_else(|| panic!("no DestinationRule for {host}: {rules:?}"));
        assert_eq!(dr["metadata"]["name"], se["metadata"]["name"]);
        assert_eq!(dr["spec"]["exportTo"], json!(["."]));
        assert_eq!(
            dr["spec"]["trafficPolicy"]["portLevelSettings"],
            json!([{"port": {"number": 443}, "tls": {"mode": "SIMPLE", "sni": host,
                "subjectAltNames": [host], "caCertificates": upstream_ca}}])
        );
        for o in [se, dr] {
            let managers: Vec<&str> = o["metadata"]["managedFields"]
                .as_array()
                .map(|m| m.iter().filter_map(|f| f["manager"].as_str()).collect())
                .unwrap_or_default();
            assert_eq!(managers, ["connector-controller-istio-upstreams"], "{o}");
        }
    }

    // Istio's own validation on the objects as the API server holds them.
    let work = connector_devkit::WorkDir::new("istio-upstreams").unwrap();
    let mut docs = vec![];
    for mut o in entries.iter().chain(&rules).cloned() {
        for f in [
            "managedFields",
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
        ] {
            o["metadata"].as_object_mut().unwrap().remove(f);
        }
        docs.push(serde_json::to_string_pretty(&o).unwrap());
    }
    let file = work.path().join("upstreams.yaml");
    std::fs::write(&file, docs.join("\n---\n")).unwrap();
    let file = file.display().to_string();
    let istioctl = istioctl();
    let validate = run(&istioctl, &["validate", "-f", &file]);
    let text = format!("{}{}", validate.stdout, validate.stderr);
    assert!(validate.success, "istioctl validate -f: {text}");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|l| l.contains("is valid")),
        "{text}"
    );
    // analyze with the variant itself (its Gateway and gateway Deployment in the same namespace).
    let variant = work.path().join("istio.yaml");
    std::fs::write(&variant, rendered_variant()).unwrap();
    let analyze = run(
        &istioctl,
        &[
            "analyze",
            "--use-kube=false",
            "-A",
            "--output-threshold",
            "Info",
            "-o",
            "json",
            &variant.display().to_string(),
            &file,
        ],
    );
    assert!(
        analyze.success,
        "istioctl analyze: {}{}",
        analyze.stdout, analyze.stderr
    );
    let messages: Value = serde_json::from_str(analyze.stdout.trim())
        .unwrap_or_else(|e| panic!("istioctl analyze -o json: {e}: {}", analyze.stdout));
    assert_eq!(messages, json!([]), "istioctl analyze: {}", analyze.stderr);

    // The realm's host goes with the one connector using it; the registry's stays for tls-2.
    kube.kubectl(&["delete", "connector", "tls", "-n", NS])
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, realm_gone) = until("the token realm's ServiceEntry/DestinationRule removed", || {
        let (e, r) = (
            upstream_objects(kube, "serviceentries"),
            upstream_objects(kube, "destinationrules"),
        );
        let hosts: Vec<Value> = e.iter().map(|e| e["spec"]["hosts"][0].clone()).collect();
        (!hosts.contains(&json!(realm)) && r.len() == 2).then_some(())
    });
    let hosts: Vec<Value> = upstream_objects(kube, "serviceentries")
        .iter()
        .map(|e| e["spec"]["hosts"][0].clone())
        .collect();
    assert!(hosts.contains(&json!(registry)), "{hosts:?}");
    let rule_hosts: Vec<Value> = upstream_objects(kube, "destinationrules")
        .iter()
        .map(|r| r["spec"]["host"].clone())
        .collect();
    assert!(rule_hosts.contains(&json!(registry)), "{rule_hosts:?}");
    kube.kubectl(&["delete", "connector", "tls-2", "-n", NS])
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));
    let (left, registry_gone) = until("the https registry's ServiceEntry/DestinationRule removed", || {
        let (e, r) = (
            upstream_objects(kube, "serviceentries"),
            upstream_objects(kube, "destinationrules"),
        );
        (e.len() == 1 && r.len() == 1).then_some((e, r))
    });
    let (left, left_rules) = left;
    assert_eq!(
        left[0]["spec"]["hosts"],
        json!(["127-0-0-1.ipv4.oci-connector.invalid"])
    );
    assert_eq!(left_rules[0]["spec"]["host"], "127-0-0-1.ipv4.oci-connector.invalid");
    format!(
        "https upstreams' ServiceEntries/DestinationRules seen {written:?} after the Connectors were applied; removed {realm_gone:?} (realm) and {registry_gone:?} (registry) after their last Connector was deleted"
    )
}

/// `pilot-discovery` (istiod) built from the same istio module as istioctl, if present. Not
/// built by `scripts/setup.sh`: the experiment below is `#[ignore]`d.
fn pilot_discovery() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home)
        .join(".cache/oci-connector/tools/pilot-discovery-v0.0.0-20260827124520-eed52ebb66ad/pilot-discovery");
    p.is_file().then_some(p)
}

/// Experiment (README "Istio variant", what was run): istiod against devkit's kube-apiserver
/// with Istio's CRDs, the variant's Gateway and WasmPlugin and the objects the controller
/// writes for an https upstream, and a plain Envoy connected to istiod's plaintext xDS port as
/// the gateway's node: what Envoy gets. Run with `--ignored` after building pilot-discovery
/// into `~/.cache/oci-connector/tools/` (see the README).
#[test]
#[ignore = "needs pilot-discovery (istiod), which scripts/setup.sh does not build"]
fn istiod_turns_the_variant_and_the_controllers_objects_into_gateway_config() {
    let Some(istiod) = pilot_discovery() else {
        panic!("pilot-discovery is not built (README \"Istio variant\")");
    };
    let kube = KubeCluster::start("istiod").unwrap_or_else(|e| panic!("{e}"));
    let all_crds = PathBuf::from(std::env::var("HOME").unwrap()).join(
        "go/pkg/mod/istio.io/istio@v0.0.0-20260827124520-eed52ebb66ad/manifests/charts/base/files/crd-all.gen.yaml",
    );
    kube.kubectl(&["apply", "--server-side", "-f", &all_crds.display().to_string()])
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));
    kube.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"])
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));
    for ns in ["istio-system", PLUGIN_NS] {
        kube.namespace(ns, &[]).unwrap();
    }
    // The variant's Istio objects (Gateway, WasmPlugin, the channel's ServiceEntry).
    for d in documents(&rendered_variant()) {
        if d["apiVersion"].as_str().unwrap_or_default().contains("istio.io") {
            kube.apply(&d).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // The gateway's Service, and a Pod with an EndpointSlice standing for the gateway pod (no
    // kubelet or controller-manager here; an address outside loopback, which EndpointSlices refuse): istiod builds a Gateway's listeners only for a proxy
    // it finds behind a Service (otherwise: "failed to get proxy service targets from
    // metadata: no instances found").
    for d in documents(&rendered_variant()) {
        if d["kind"] == "ServiceAccount" || (d["kind"] == "Service" && d["metadata"]["name"] == "connector-gateway") {
            kube.apply(&d).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "connector-gateway-0", "namespace": PLUGIN_NS,
            "labels": {"istio": "connector-gateway", "app": "connector-gateway"}},
        "spec": {"serviceAccountName": "connector-proxy", "nodeName": "nowhere",
            "containers": [{"name": "istio-proxy", "image": "example.invalid/proxy:1"}]},
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    kube.kubectl(&[
        "patch", "pod", "connector-gateway-0", "-n", PLUGIN_NS, "--subresource=status", "--type=merge", "-p",
        r#"{"status":{"phase":"Running","podIP":"10.244.0.5","podIPs":[{"ip":"10.244.0.5"}],"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ])
    .and_then(|o| o.ok())
    .unwrap_or_else(|e| panic!("{e}"));
    kube.apply(&json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "connector-gateway-0", "namespace": PLUGIN_NS,
            "labels": {"kubernetes.io/service-name": "connector-gateway"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "name": "connector-gateway-0", "namespace": PLUGIN_NS}}],
        "ports": [{"name": "https-registry", "port": 8443, "protocol": "TCP"}],
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    // What the controller writes for one https upstream.
    let upstream = connector_controller::render::UpstreamCluster {
        name: "unused".into(),
        host: "registry.example.com".into(),
        port: 443,
        tls: true,
        sni: Some("registry.example.com".into()),
    };
    // The address the controller would have resolved and admitted for the name (nothing is
    // sent to it here).
    let mut pins = connector_controller::pin::PinMap::new();
    pins.insert(
        ("registry.example.com".into(), 443),
        connector_controller::pin::Pin {
            addresses: vec!["127.0.0.1".parse().unwrap()],
            problem: None,
        },
    );
    for (_, _, o) in connector_controller::istio::objects(
        std::slice::from_ref(&upstream),
        PLUGIN_NS,
        PLUGIN,
        "/etc/ssl/certs/ca-certificates.crt",
        &pins,
    ) {
        kube.apply(&o).unwrap_or_else(|e| panic!("{e}"));
    }

    let work = connector_devkit::WorkDir::new("istiod").unwrap();
    let (grpc, http, mon, https) = (
        procs::free_port().unwrap(),
        procs::free_port().unwrap(),
        procs::free_port().unwrap(),
        procs::free_port().unwrap(),
    );
    let mut cmd = Command::new(&istiod);
    cmd.args(["discovery", "--kubeconfig"])
        .arg(&kube.kubeconfig)
        .args(["--grpcAddr", &format!("127.0.0.1:{grpc}")])
        .args(["--httpAddr", &format!("127.0.0.1:{http}")])
        .args(["--monitoringAddr", &format!("127.0.0.1:{mon}")])
        .args(["--httpsAddr", &format!("127.0.0.1:{https}")])
        .args(["--secureGRPCAddr", ""])
        .args(["--domain", "cluster.local"])
        .env("POD_NAMESPACE", "istio-system")
        .env("POD_NAME", "istiod-test")
        .env("REVISION", "default")
        .env("PILOT_ENABLE_ANALYSIS", "false")
        .env("ENABLE_CA_SERVER", "false")
        .env("INJECTION_WEBHOOK_CONFIG_NAME", "")
        .env("VALIDATION_WEBHOOK_CONFIG_NAME", "")
        .env("PILOT_ENABLE_GATEWAY_API", "false")
        // Istio's telemetry filter (`istio.metadata_exchange`) is built into istio-proxy only: a
        // plain Envoy refuses every cluster carrying it (seen: "Didn't find a registered
        // implementation for 'istio.metadata_exchange'").
        .env("PILOT_ENABLE_METADATA_EXCHANGE", "false");
    let log = work.path().join("istiod.log");
    let started = Instant::now();
    let mut pilot = procs::Proc::spawn("istiod", cmd, &log).unwrap_or_else(|e| panic!("{e}"));
    pilot
        .wait_for_http(http, "/ready", |s| s == 200, Duration::from_secs(60))
        .unwrap_or_else(|e| {
            panic!(
                "istiod not ready: {e}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    let istiod_ready = started.elapsed();

    // A plain Envoy as the gateway's node: its labels select the Gateway and the WasmPlugin.
    let admin = procs::free_port().unwrap();
    let bootstrap = json!({
        "node": {
            "id": format!("router~10.244.0.5~connector-gateway-0.{PLUGIN_NS}~{PLUGIN_NS}.svc.cluster.local"),
            "cluster": "connector-gateway",
            "metadata": {
                "NAMESPACE": PLUGIN_NS,
                "NAME": "connector-gateway-0",
                "LABELS": {"istio": "connector-gateway", "app": "connector-gateway"},
                "CLUSTER_ID": "Kubernetes",
                "ISTIO_VERSION": "1.30.0",
                "SERVICE_ACCOUNT": "connector-proxy",
                "INSTANCE_IPS": "10.244.0.5",
            },
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds-grpc", "type": "STATIC", "connect_timeout": "5s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": grpc}}}}]}]},
        }]},
    });
    let config = work.path().join("envoy.json");
    std::fs::write(&config, serde_json::to_string_pretty(&bootstrap).unwrap()).unwrap();
    let envoy_log = work.path().join("envoy.log");
    let mut cmd = Command::new(connector_devkit::envoy::envoy_binary().unwrap());
    cmd.arg("-c")
        .arg(&config)
        .args([
            "--concurrency",
            "1",
            "-l",
            "info",
            "--disable-hot-restart",
            "--log-path",
        ])
        .arg(&envoy_log);
    let _envoy = procs::Proc::spawn("envoy-istio", cmd, &envoy_log).unwrap_or_else(|e| panic!("{e}"));
    let outbound = connector_controller::istio::outbound_name(&upstream.host, upstream.port);
    let begun = Instant::now();
    let (dump, took) = loop {
        let text = Request::get("/config_dump?include_eds")
            .send(admin)
            .map(|r| r.body_text())
            .unwrap_or_default();
        if text.contains(&outbound) {
            break (text, begun.elapsed());
        }
        if begun.elapsed() > DEADLINE {
            let interesting = |p: &PathBuf| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| {
                        let l = l.to_ascii_lowercase();
                        l.contains("warn") || l.contains("error") || l.contains("connect") || l.contains("push")
                    })
                    .take(60)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let names: Vec<String> = text
                .match_indices("\"name\": \"")
                .map(|(k, _)| text[k + 9..].split('"').next().unwrap_or_default().to_string())
                .take(40)
                .collect();
            panic!(
                "Envoy has no {outbound} within {DEADLINE:?}; names in its dump: {names:?}\n--- envoy\n{}\n--- istiod\n{}",
                interesting(&envoy_log),
                interesting(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let dump: Value = serde_json::from_str(&dump).unwrap();
    std::fs::write(
        work.path().join("config_dump.json"),
        serde_json::to_string_pretty(&dump).unwrap(),
    )
    .unwrap();
    let clusters: Vec<Value> = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["@type"].as_str().unwrap_or_default().contains("ClustersConfigDump"))
        // Warming too (a cluster may wait for its endpoints).
        .flat_map(|c| {
            let mut all = c["dynamic_active_clusters"].as_array().cloned().unwrap_or_default();
            all.extend(c["dynamic_warming_clusters"].as_array().cloned().unwrap_or_default());
            all
        })
        .map(|c| c["cluster"].clone())
        .collect();
    let ours = clusters
        .iter()
        .find(|c| c["name"] == outbound.as_str())
        .unwrap_or_else(|| panic!("no {outbound}"));
    let tls = &ours["transport_socket"]["typed_config"];
    assert_eq!(tls["sni"], "registry.example.com", "{ours}");
    // The ServiceEntry's pinned address is the cluster's endpoint (EDS): the gateway's Envoy
    // resolves no upstream name.
    assert_ne!(ours["type"], "STRICT_DNS", "{ours}");
    assert_ne!(ours["type"], "LOGICAL_DNS", "{ours}");
    // EDS comes once the cluster has warmed (it waits up to 15 s for its CA over SDS, absent
    // here).
    let eds_of = |dump: &Value| -> Vec<String> {
        dump["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["dynamic_endpoint_configs"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["endpoint_config"]["cluster_name"] == outbound.as_str())
            .flat_map(|e| {
                e["endpoint_config"]["endpoints"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .flat_map(|l| l["lb_endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| {
                Some(
                    e["endpoint"]["address"]["socket_address"]["address"]
                        .as_str()?
                        .to_string(),
                )
            })
            .collect()
    };
    let begun = Instant::now();
    let endpoints = loop {
        let now: Value = Request::get("/config_dump?include_eds")
            .send(admin)
            .ok()
            .and_then(|r| serde_json::from_str(&r.body_text()).ok())
            .unwrap_or_default();
        let found = eds_of(&now);
        if !found.is_empty() || begun.elapsed() > Duration::from_secs(25) {
            break found;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("{outbound} endpoints {endpoints:?} after {:?}", begun.elapsed());
    assert_eq!(endpoints, ["127.0.0.1"], "{ours}");
    let names: Vec<&str> = clusters.iter().filter_map(|c| c["name"].as_str()).collect();
    assert!(names.contains(&CHANNEL_CLUSTER), "{names:?}");
    eprintln!(
        "istiod ready {istiod_ready:?} after its start; Envoy had {outbound} {took:?} after its start; clusters: {names:?}; {outbound}: {ours}; dump in {}",
        work.path().display()
    );
    // What else the gateway got: listeners (the Gateway's server) and the WasmPlugin (ECDS).
    // Envoy asks for listeners once its clusters are initialized; the upstream's cluster waits
    // for its CA over SDS (`sds-grpc`, pilot-agent's, absent here) up to the 15 s initial
    // fetch timeout.
    let begun = Instant::now();
    let text = loop {
        let text = Request::get("/config_dump")
            .send(admin)
            .map(|r| r.body_text())
            .unwrap_or_default();
        if text.contains("0.0.0.0_8443") || begun.elapsed() > Duration::from_secs(20) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "listener seen: {} after {:?}",
        text.contains("0.0.0.0_8443"),
        begun.elapsed()
    );
    std::fs::write(work.path().join("config_dump_final.json"), &text).ok();
    // What istiod generates for this node, listeners included (its debug endpoint on --httpAddr).
    let generated = Request::get(&format!("/debug/config_dump?proxyID=connector-gateway-0.{PLUGIN_NS}"))
        .send(http)
        .map(|r| format!("{} {}", r.status, r.body_text()))
        .unwrap_or_else(|e| e.to_string());
    std::fs::write(work.path().join("istiod_config_dump.json"), &generated).ok();
    // Seen 2026-11-30: no listener and no ECDS in it (LDS pushes 0 resources), so the
    // Gateway's listener and the WasmPlugin's filter were not observed (README).
    eprintln!(
        "istiod's own dump for the node has a listener: {}; the WasmPlugin's filter (ECDS): {}",
        generated.contains("0.0.0.0_8443"),
        generated.contains("envoy.filters.http.wasm")
    );
    let listeners: Vec<&str> = text
        .match_indices("\"name\": \"")
        .map(|(k, _)| text[k + 9..].split('"').next().unwrap_or_default())
        .filter(|n| n.contains("0.0.0.0") || n.contains("oci-connector") || n.contains("wasm"))
        .collect();
    eprintln!("listener/extension names in Envoy's dump: {listeners:?}");
    let envoy_text = std::fs::read_to_string(&envoy_log).unwrap_or_default();
    for l in envoy_text.lines().filter(|l| {
        (l.contains("[warning]") || l.contains("[error]") || l.contains("wasm")) && !l.contains("Deprecated")
    }) {
        eprintln!("envoy: {}", &l[..l.len().min(700)]);
    }
    let istiod_text = std::fs::read_to_string(&log).unwrap_or_default();
    for l in istiod_text
        .lines()
        .filter(|l| l.contains("PUSH") || l.contains("ACK") || l.contains("ateway") || l.contains("asm"))
    {
        eprintln!("istiod: {}", &l[..l.len().min(700)]);
    }
}

/// The ProxyReady condition of one connector, once it exists.
fn proxy_ready_of(kube: &KubeCluster, name: &str) -> Option<Value> {
    let c = kube.get("connector", NS, name).ok()??;
    c["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "ProxyReady")
        .cloned()
}

#[test]
fn a_configuration_too_large_for_the_wasmplugin_is_reported_and_the_last_one_kept() {
    let (s, kube, kubeconfig) = istio_api("istio-too-large");
    let creds = s.registry.credentials.clone().unwrap();
    kube.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "robot", "namespace": NS,
            "annotations": {"connectors.alauda.io/allowed-connectors": "*"}},
        "type": "kubernetes.io/basic-auth",
        "stringData": {"username": creds.username, "password": creds.password},
    }))
    .unwrap();
    let connector = |name: &str, accounts: Vec<String>| {
        json!({
            "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"address": s.registry.url(), "auth": {"name": "basicAuth", "secretRef": {"name": "robot"}},
                "connectorClassName": "oci", "allowedServiceAccounts": accounts},
        })
    };
    kube.apply(&connector("registry", vec![])).unwrap();
    // A connector whose address moves while the configuration is refused (below).
    let mover = |address: &str| {
        let mut c = connector("mover", vec![]);
        c["spec"]["address"] = json!(address);
        c
    };
    kube.apply(&mover("https://old-home.example.com")).unwrap();
    let controller = gateway_controller(&s.work, &kubeconfig);
    until("the small configuration is written", || {
        let r = proxy_ready_of(&kube, "mover")?;
        (r["reason"] == "PluginConfigWritten").then_some(())
    });
    let upstream_hosts = || -> Vec<String> {
        upstream_objects(&kube, "serviceentries")
            .iter()
            .filter_map(|e| e["spec"]["hosts"][0].as_str().map(String::from))
            .collect()
    };
    until("the mover's upstream ServiceEntry is written", || {
        upstream_hosts()
            .contains(&"old-home.example.com".to_string())
            .then_some(())
    });
    // Six connectors of 5,000 ServiceAccounts each: about 1.9 MB of configuration.
    let accounts: Vec<String> = (0..5000)
        .map(|i| format!("tenant-{:04}/builder-service-account-with-a-long-name-{i:04}", i % 977))
        .collect();
    for i in 0..6 {
        kube.apply(&connector(&format!("big-{i}"), accounts.clone())).unwrap();
    }
    // Refused by the API server (etcd's request limit): every connector's ProxyReady says so,
    // with the numbers, and the WasmPlugin keeps the last configuration written.
    let (refused, took) = until("ProxyReady says the configuration is too large", || {
        let r = proxy_ready_of(&kube, "big-5")?;
        (r["reason"] == "PluginConfigTooLarge").then_some(r)
    });
    assert_eq!(refused["status"], "False");
    let message = refused["message"].as_str().unwrap_or_default();
    for part in [
        "8 connectors",
        "etcdserver: request is too large",
        "keeps configuration version",
        "--max-request-bytes",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    let served = proxy_ready_of(&kube, "registry").unwrap();
    assert_eq!(served["reason"], "PluginConfigTooLarge", "{served}");
    let plugin = kube.get("wasmplugin", PLUGIN_NS, PLUGIN).unwrap().unwrap();
    let kept: Vec<&str> = plugin["spec"]["pluginConfig"]["connectors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        kept.contains(&"registry") && kept.contains(&"mover") && kept.len() < 8,
        "{kept:?}"
    );
    // Not sent again while it stays the same, and no write against a stale resourceVersion.
    let refusals = |log: &str| log.matches("is too large for the WasmPlugin").count();
    let before = refusals(&controller.log());
    std::thread::sleep(Duration::from_secs(5));
    let log = controller.log();
    assert_eq!(refusals(&log), before, "the refused configuration was sent again");
    assert!(
        !log.contains("the object has been modified"),
        "a write with a stale resourceVersion"
    );
    // The same in the metrics: the configuration's size, one refusal.
    let metric = |sample: &str| controller.metric(sample).unwrap().unwrap_or(0.0);
    assert!(metric("connector_controller_filter_config_bytes") > 1_572_864.0);
    assert_eq!(
        metric("connector_controller_wasmplugin_writes_total{result=\"too_large\"}"),
        1.0
    );
    assert!(metric("connector_controller_wasmplugin_writes_total{result=\"written\"}") >= 2.0);
    assert!(
        !log.contains(&creds.password),
        "the password is in the controller's log"
    );
    // The placeholder re-applied meanwhile: the last configuration written is put back.
    let kept_config = plugin["spec"]["pluginConfig"].clone();
    kube.kubectl_stdin(&["apply", "-f", "-"], Some(shipped_plugin().to_string().as_bytes()))
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("{e}"));
    until("the last written configuration is put back", || {
        let p = kube.get("wasmplugin", PLUGIN_NS, PLUGIN).ok()??;
        (p["spec"]["pluginConfig"] == kept_config).then_some(())
    });
    assert_eq!(
        proxy_ready_of(&kube, "big-5").unwrap()["reason"],
        "PluginConfigTooLarge"
    );

    // The mover moves in a configuration that is refused too: the WasmPlugin still routes it
    // to its old home, so that host's ServiceEntry stays beside the new one's.
    kube.apply(&mover("https://new-home.example.com")).unwrap();
    until("the moved connector's new upstream ServiceEntry is written", || {
        upstream_hosts()
            .contains(&"new-home.example.com".to_string())
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let hosts = upstream_hosts();
    assert!(
        hosts.contains(&"old-home.example.com".to_string()),
        "the upstream of the configuration the WasmPlugin holds was removed: {hosts:?}"
    );

    // Small enough again: written, and every connector's ProxyReady is back.
    for i in 1..6 {
        kube.kubectl(&["delete", "connector", &format!("big-{i}"), "-n", NS])
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (_, recovered) = until("the smaller configuration is written", || {
        let p = kube.get("wasmplugin", PLUGIN_NS, PLUGIN).ok()??;
        let mut names: Vec<String> = p["spec"]["pluginConfig"]["connectors"]
            .as_array()?
            .iter()
            .filter_map(|c| c["name"].as_str().map(String::from))
            .collect();
        names.sort();
        (names == ["big-0", "mover", "registry"]).then_some(())
    });
    // The WasmPlugin holds the moved address now: the old home's ServiceEntry goes.
    until("the old home's ServiceEntry is removed", || {
        let hosts = upstream_hosts();
        (!hosts.contains(&"old-home.example.com".to_string()) && hosts.contains(&"new-home.example.com".to_string()))
            .then_some(())
    });
    for name in ["registry", "big-0"] {
        let (r, _) = until("ProxyReady is PluginConfigWritten again", || {
            let r = proxy_ready_of(&kube, name)?;
            (r["reason"] == "PluginConfigWritten").then_some(r)
        });
        assert_eq!(r["status"], "True", "{name}: {r}");
    }
    eprintln!(
        "refusal reported {took:?} after the big connectors were applied ({before} refusal(s) logged; the WasmPlugin kept {} connectors): {message}; smaller configuration written {recovered:?} after the deletes",
        kept.len()
    );
}
