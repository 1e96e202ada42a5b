//! Table-driven tests of the admission decision: every case the issue names, with the pod
//! patched for real (json_patch) and the images and annotation read back.

use super::*;
use std::cell::Cell;

const PROXY: &str = "proxy.example.com:31567";
const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn path_cfg() -> Config {
    Config::new(PROXY, AddressForm::Path, None, true).unwrap()
}

fn host_cfg() -> Config {
    Config::new(PROXY, AddressForm::Host, None, true).unwrap()
}

/// Connectors of the tests: `demo/hub` (Docker Hub), `demo/harbor` (a registry on port 8443),
/// `demo/plain` (https on the default port), `shared/hub` (allows namespace `demo`),
/// `shared/private` (allows ServiceAccount `demo/builder` only).
fn connectors(c: &ConnectorRef) -> Lookup {
    let info = |address: &str, ns: &[&str], sas: &[&str]| {
        let connector: Connector = serde_json::from_value(json!({
            "apiVersion": "connectors.alauda.io/v1alpha1",
            "kind": "Connector",
            "metadata": { "name": c.name, "namespace": c.namespace },
            "spec": {
                "address": address,
                "auth": { "name": "tokenAuth", "secretRef": { "name": "s" } },
                "connectorClassName": "oci",
                "allowedNamespaces": ns,
                "allowedServiceAccounts": sas,
            }
        }))
        .unwrap();
        Lookup::Found(ConnectorInfo::from_connector(&connector).unwrap())
    };
    match (c.namespace.as_str(), c.name.as_str()) {
        ("demo", "hub") => info("https://index.docker.io", &[], &[]),
        ("demo", "harbor") => info("https://Harbor.example.com:8443/", &[], &[]),
        ("demo", "plain") => info("https://harbor.example.com:443", &[], &[]),
        ("shared", "hub") => info("https://registry-1.docker.io", &["other", "demo"], &[]),
        ("shared", "private") => info("https://harbor.example.com", &[], &["demo/builder"]),
        _ => Lookup::NotFound,
    }
}

/// A pod in namespace `demo` as the API server sends it.
struct PodSpec {
    label: Option<&'static str>,
    connector: Option<&'static str>,
    containers: Vec<(&'static str, &'static str)>,
    init: Vec<(&'static str, &'static str)>,
    ephemeral: Vec<(&'static str, &'static str)>,
    service_account: Option<&'static str>,
    annotations: Vec<(&'static str, &'static str)>,
}

fn pod(connector: &'static str, images: &[&'static str]) -> PodSpec {
    PodSpec {
        label: Some("true"),
        connector: Some(connector),
        containers: images.iter().enumerate().map(|(i, im)| (NAMES[i], *im)).collect(),
        init: vec![],
        ephemeral: vec![],
        service_account: None,
        annotations: vec![],
    }
}

const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

impl PodSpec {
    fn json(&self) -> Value {
        let list = |v: &[(&str, &str)]| -> Value {
            v.iter()
                .map(|(n, im)| json!({ "name": n, "image": im }))
                .collect::<Vec<_>>()
                .into()
        };
        let mut labels = serde_json::Map::new();
        labels.insert("app".into(), json!("x"));
        if let Some(l) = self.label {
            labels.insert(INJECT_LABEL.into(), json!(l));
        }
        let mut annotations = serde_json::Map::new();
        if let Some(c) = self.connector {
            annotations.insert(CONNECTOR_ANNOTATION.into(), json!(c));
        }
        for (k, v) in &self.annotations {
            annotations.insert((*k).into(), json!(v));
        }
        let mut metadata = json!({ "name": "p", "namespace": "demo", "labels": labels });
        if !annotations.is_empty() {
            metadata["annotations"] = annotations.into();
        }
        let mut spec = json!({ "containers": list(&self.containers) });
        if !self.init.is_empty() {
            spec["initContainers"] = list(&self.init);
        }
        if !self.ephemeral.is_empty() {
            spec["ephemeralContainers"] = list(&self.ephemeral);
        }
        if let Some(sa) = self.service_account {
            spec["serviceAccountName"] = json!(sa);
        }
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec })
    }
}

fn request(pod: &Value) -> AdmissionRequest<Pod> {
    let review: kube::core::admission::AdmissionReview<Pod> = serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "demo",
            "operation": "CREATE",
            "userInfo": { "username": "alice" },
            "object": pod,
            "dryRun": false,
        }
    }))
    .unwrap();
    review.try_into().unwrap()
}

/// The decision, and how many times the lookup ran.
fn decide(p: &PodSpec, cfg: &Config) -> (Decision, usize) {
    let calls = Cell::new(0);
    let d = review(&request(&p.json()), cfg, |c| {
        calls.set(calls.get() + 1);
        connectors(c)
    });
    (d, calls.get())
}

/// The pod after the decision's patch: (container images per kind, original-images annotation).
fn patched(p: &PodSpec, cfg: &Config) -> (Vec<String>, Option<Value>, Value) {
    let mut doc = p.json();
    match decide(p, cfg).0 {
        Decision::Patch { patch, .. } => json_patch::patch(&mut doc, &patch).unwrap(),
        Decision::Allow { .. } => {}
        other => panic!("expected admission, got {other:?}"),
    }
    let mut images = Vec::new();
    for kind in KINDS {
        for c in doc["spec"][kind].as_array().cloned().unwrap_or_default() {
            images.push(c["image"].as_str().unwrap().to_string());
        }
    }
    let original = doc["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION]
        .as_str()
        .map(|s| serde_json::from_str(s).unwrap());
    (images, original, doc)
}

#[test]
fn images_of_the_connectors_registry_are_rewritten_in_path_form() {
    let p = |s: &str| format!("{PROXY}/namespaces/demo/connectors/{s}");
    let cases: Vec<(&str, &str, String)> = vec![
        // Docker Hub short names, `library/`, aliases, tags and digests.
        ("demo/hub", "nginx", p("hub/library/nginx")),
        ("demo/hub", "nginx:1.27", p("hub/library/nginx:1.27")),
        ("demo/hub", "library/nginx:1.27", p("hub/library/nginx:1.27")),
        ("demo/hub", "bitnami/redis:7", p("hub/bitnami/redis:7")),
        ("demo/hub", "docker.io/nginx", p("hub/library/nginx")),
        ("demo/hub", "index.docker.io/library/nginx:x", p("hub/library/nginx:x")),
        ("demo/hub", "registry-1.docker.io/a/b/c:t", p("hub/a/b/c:t")),
        (
            "demo/hub",
            leak(format!("nginx@{D}")),
            p(&format!("hub/library/nginx@{D}")),
        ),
        (
            "demo/hub",
            leak(format!("nginx:1@{D}")),
            p(&format!("hub/library/nginx:1@{D}")),
        ),
        // A registry with a port; host names are case-insensitive.
        (
            "demo/harbor",
            "harbor.example.com:8443/team/app:v1",
            p("harbor/team/app:v1"),
        ),
        ("demo/harbor", "HARBOR.example.com:8443/team/app", p("harbor/team/app")),
        (
            "demo/harbor",
            leak(format!("harbor.example.com:8443/t/a:v@{D}")),
            p(&format!("harbor/t/a:v@{D}")),
        ),
        // The address's default port is omitted: the image names the host alone.
        ("demo/plain", "harbor.example.com/team/app:v1", p("plain/team/app:v1")),
        // Other registries stay.
        ("demo/hub", "ghcr.io/org/app:v1", "ghcr.io/org/app:v1".into()),
        ("demo/hub", "localhost/app", "localhost/app".into()),
        (
            "demo/harbor",
            "harbor.example.com/team/app",
            "harbor.example.com/team/app".into(),
        ),
        ("demo/harbor", "nginx", "nginx".into()),
        (
            "demo/plain",
            "harbor.example.com:8443/team/app",
            "harbor.example.com:8443/team/app".into(),
        ),
        // Already rewritten (either form) stays.
        ("demo/hub", leak(p("hub/library/nginx:1")), p("hub/library/nginx:1")),
        (
            "demo/hub",
            "c-hub-connector.demo.svc.cluster.local/library/nginx",
            "c-hub-connector.demo.svc.cluster.local/library/nginx".into(),
        ),
    ];
    for (connector, image, want) in cases {
        let (images, _, _) = patched(&pod(connector, &[image]), &path_cfg());
        assert_eq!(images, [want], "{connector} {image}");
    }
}

/// Test inputs built with `format!` that must live as long as the table.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[test]
fn host_form_and_a_custom_pattern() {
    let (images, _, _) = patched(&pod("demo/hub", &["nginx:1", "ghcr.io/x/y"]), &host_cfg());
    assert_eq!(
        images,
        ["c-hub-connector.demo.svc.cluster.local/library/nginx:1", "ghcr.io/x/y"]
    );
    let cfg = Config::new(
        PROXY,
        AddressForm::Host,
        Some("{name}.{namespace}.registry.internal:5443"),
        true,
    )
    .unwrap();
    let image = leak(format!("harbor.example.com:8443/team/app:v1@{D}"));
    let (images, _, _) = patched(&pod("demo/harbor", &[image]), &cfg);
    assert_eq!(images, [format!("harbor.demo.registry.internal:5443/team/app:v1@{D}")]);
    // Already on the path-form proxy address: left alone in host form too.
    let already = leak(format!("{PROXY}/namespaces/demo/connectors/hub/library/nginx"));
    let (images, original, _) = patched(&pod("demo/hub", &[already]), &host_cfg());
    assert_eq!(images, [already]);
    assert_eq!(original, None);
}

#[test]
fn init_and_ephemeral_containers_and_the_original_images_annotation() {
    let mut p = pod("demo/hub", &["nginx:1", "ghcr.io/org/sidecar:2"]);
    p.init = vec![("setup", "busybox"), ("other", "quay.io/x/y")];
    p.ephemeral = vec![("debug", "docker.io/library/alpine:3")];
    p.annotations = vec![("keep", "me")];
    let (images, original, doc) = patched(&p, &path_cfg());
    let px = |s: &str| format!("{PROXY}/namespaces/demo/connectors/hub/library/{s}");
    assert_eq!(
        images,
        [
            px("nginx:1"),
            "ghcr.io/org/sidecar:2".into(),
            px("busybox"),
            "quay.io/x/y".into(),
            px("alpine:3")
        ]
    );
    assert_eq!(
        original,
        Some(json!({
            "containers": { "a": "nginx:1" },
            "initContainers": { "setup": "busybox" },
            "ephemeralContainers": { "debug": "docker.io/library/alpine:3" },
        }))
    );
    assert_eq!(doc["metadata"]["annotations"]["keep"], "me");
    assert_eq!(doc["metadata"]["annotations"][CONNECTOR_ANNOTATION], "demo/hub");
}

#[test]
fn the_annotation_is_created_when_the_pod_has_none_and_merged_when_it_has_one() {
    // A pod without annotations at all cannot opt in (it needs the connector annotation), so
    // the "no annotations map" branch is checked on the patch operation directly.
    let mut bare = pod("demo/hub", &["nginx"]);
    bare.connector = None;
    let pod_obj: Pod = serde_json::from_value(bare.json()).unwrap();
    let rw = [Rewrite {
        kind: "containers",
        container: "a".into(),
        from: "nginx".into(),
        to: "x".into(),
    }];
    let mut doc = bare.json();
    json_patch::patch(&mut doc, &[original_images_op(&pod_obj, &rw)]).unwrap();
    assert_eq!(
        doc["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION],
        r#"{"containers":{"a":"nginx"}}"#
    );
    // An update (e.g. an ephemeral container added) keeps what was recorded before.
    let mut p = pod(
        "demo/hub",
        &[leak(format!("{PROXY}/namespaces/demo/connectors/hub/library/nginx"))],
    );
    p.ephemeral = vec![("debug", "alpine")];
    p.annotations = vec![(ORIGINAL_IMAGES_ANNOTATION, r#"{"containers":{"a":"nginx"}}"#)];
    let (_, original, _) = patched(&p, &path_cfg());
    assert_eq!(
        original,
        Some(json!({ "containers": { "a": "nginx" }, "ephemeralContainers": { "debug": "alpine" } }))
    );
}

#[test]
fn the_patch_only_applies_to_the_images_it_was_made_for() {
    let p = pod("demo/hub", &["nginx"]);
    let Decision::Patch { patch, rewrites } = decide(&p, &path_cfg()).0 else {
        panic!("expected a patch");
    };
    assert_eq!(rewrites.len(), 1);
    assert_eq!(rewrites[0].from, "nginx");
    let mut changed = pod("demo/hub", &["nginx:2"]).json();
    assert!(json_patch::patch(&mut changed, &patch).is_err());
}

/// Expected outcome of a decision case.
#[derive(Debug)]
enum Want {
    /// Admitted without a patch; whether the connector was looked up.
    Untouched {
        looked_up: bool,
    },
    Patched,
    Denied(u16, DenyReason, &'static [&'static str]),
}

#[test]
fn decision_table() {
    use DenyReason::*;
    let base = || pod("demo/hub", &["nginx"]);
    let with = |f: &dyn Fn(&mut PodSpec)| {
        let mut p = base();
        f(&mut p);
        p
    };
    let on = path_cfg();
    let off = Config::new(PROXY, AddressForm::Path, None, false).unwrap();
    let cases: Vec<(&str, PodSpec, &Config, Want)> = vec![
        ("opted in", base(), &on, Want::Patched),
        (
            "no label",
            with(&|p| p.label = None),
            &on,
            Want::Untouched { looked_up: false },
        ),
        (
            "label false",
            with(&|p| p.label = Some("false")),
            &on,
            Want::Untouched { looked_up: false },
        ),
        (
            "label True",
            with(&|p| p.label = Some("True")),
            &on,
            Want::Untouched { looked_up: false },
        ),
        (
            "annotation without label",
            with(&|p| {
                p.label = None;
                p.connector = Some("nope/nope");
            }),
            &on,
            Want::Untouched { looked_up: false },
        ),
        (
            "label without annotation",
            with(&|p| p.connector = None),
            &on,
            Want::Denied(
                400,
                MissingAnnotation,
                &[
                    "has no annotation connectors.cpaas.io/connector",
                    "<namespace>/<connector name>",
                    "remove the label",
                ],
            ),
        ),
        (
            "annotation with no slash",
            with(&|p| p.connector = Some("hub")),
            &on,
            Want::Denied(
                400,
                MalformedAnnotation,
                &["\"hub\" is malformed", "<namespace>/<connector name>"],
            ),
        ),
        (
            "empty name",
            with(&|p| p.connector = Some("demo/")),
            &on,
            Want::Denied(400, MalformedAnnotation, &["malformed"]),
        ),
        (
            "empty namespace",
            with(&|p| p.connector = Some("/hub")),
            &on,
            Want::Denied(400, MalformedAnnotation, &["malformed"]),
        ),
        (
            "uppercase",
            with(&|p| p.connector = Some("Demo/hub")),
            &on,
            Want::Denied(400, MalformedAnnotation, &["not a namespace name"]),
        ),
        (
            "three parts",
            with(&|p| p.connector = Some("demo/hub/x")),
            &on,
            Want::Denied(400, MalformedAnnotation, &["not a Connector name"]),
        ),
        (
            "spaces",
            with(&|p| p.connector = Some(" demo/hub")),
            &on,
            Want::Denied(400, MalformedAnnotation, &["malformed"]),
        ),
        (
            "unknown connector, own namespace",
            with(&|p| p.connector = Some("demo/nope")),
            &on,
            Want::Denied(
                400,
                UnknownConnector,
                &["Connector demo/nope", "does not exist", "kubectl get connector -n demo"],
            ),
        ),
        (
            "unknown connector, other namespace",
            with(&|p| p.connector = Some("elsewhere/nope")),
            &on,
            Want::Denied(
                403,
                NamespaceNotAllowed,
                &[
                    "elsewhere/nope does not exist or may not be used from namespace demo",
                    "spec.allowedNamespaces",
                ],
            ),
        ),
        (
            "other namespace, allowed",
            with(&|p| p.connector = Some("shared/hub")),
            &on,
            Want::Patched,
        ),
        (
            "other namespace, not allowed",
            with(&|p| {
                p.connector = Some("shared/private");
                p.containers = vec![("a", "harbor.example.com/x")];
            }),
            &on,
            Want::Denied(
                403,
                NamespaceNotAllowed,
                &[
                    "shared/private does not exist or may not be used from namespace demo",
                    "add demo to spec.allowedNamespaces",
                ],
            ),
        ),
        (
            "other namespace, ServiceAccount allowed",
            with(&|p| {
                p.connector = Some("shared/private");
                p.containers = vec![("a", "harbor.example.com/x")];
                p.service_account = Some("builder");
            }),
            &on,
            Want::Patched,
        ),
        (
            "other namespace, another ServiceAccount",
            with(&|p| {
                p.connector = Some("shared/private");
                p.service_account = Some("runner");
            }),
            &on,
            Want::Denied(403, NamespaceNotAllowed, &["may not be used from namespace demo"]),
        ),
        (
            "invalid images",
            with(&|p| p.containers = vec![("a", "Nginx"), ("b", "ghcr.io/x/y:"), ("c", "nginx")]),
            &on,
            Want::Denied(
                400,
                InvalidImage,
                &[
                    "containers[a] image \"Nginx\"",
                    "containers[b] image \"ghcr.io/x/y:\"",
                    "fix the image names",
                ],
            ),
        ),
        (
            "invalid init image",
            with(&|p| p.init = vec![("i", "x@sha256:12")]),
            &on,
            Want::Denied(400, InvalidImage, &["initContainers[i]"]),
        ),
        (
            "nothing of the registry",
            with(&|p| p.containers = vec![("a", "ghcr.io/x/y"), ("b", "quay.io/a/b:1")]),
            &on,
            Want::Untouched { looked_up: true },
        ),
        (
            "empty image",
            with(&|p| p.containers = vec![("a", "")]),
            &on,
            Want::Untouched { looked_up: true },
        ),
        (
            "rewriting off",
            base(),
            &off,
            Want::Denied(
                403,
                Disabled,
                &[
                    "image rewriting to the connector proxy is turned off",
                    "remove the label connectors.cpaas.io/proxy-inject",
                ],
            ),
        ),
        (
            "rewriting off, label without annotation",
            with(&|p| p.connector = None),
            &off,
            Want::Denied(403, Disabled, &["turned off"]),
        ),
        (
            "rewriting off, no label",
            with(&|p| p.label = None),
            &off,
            Want::Untouched { looked_up: false },
        ),
    ];
    for (name, p, cfg, want) in cases {
        let (decision, calls) = decide(&p, cfg);
        match (&want, &decision) {
            (Want::Untouched { looked_up }, Decision::Allow { .. }) => {
                assert_eq!(calls, usize::from(*looked_up), "{name}: lookups");
            }
            (Want::Patched, Decision::Patch { rewrites, .. }) => {
                assert!(!rewrites.is_empty(), "{name}");
                assert_eq!(calls, 1, "{name}: lookups");
            }
            (
                Want::Denied(code, reason, needles),
                Decision::Deny {
                    code: c,
                    reason: r,
                    message,
                },
            ) => {
                assert_eq!((c, r), (code, reason), "{name}: {message}");
                for needle in *needles {
                    assert!(message.contains(needle), "{name}: {message:?} lacks {needle:?}");
                }
            }
            _ => panic!("{name}: wanted {want:?}, got {decision:?}"),
        }
    }
}

#[test]
fn a_failed_lookup_denies() {
    let d = review(&request(&pod("demo/hub", &["nginx"]).json()), &path_cfg(), |_| {
        Lookup::Failed("connection refused".into())
    });
    let Decision::Deny { code, reason, message } = d else {
        panic!("{d:?}")
    };
    assert_eq!((code, reason), (500, DenyReason::LookupFailed));
    assert!(
        message.contains("could not read Connector demo/hub: connection refused"),
        "{message}"
    );
}

#[test]
fn a_request_without_an_object_is_allowed() {
    let mut req = request(&pod("demo/hub", &["nginx"]).json());
    req.object = None;
    let d = review(&req, &path_cfg(), |_| {
        panic!("no lookup for a request without an object")
    });
    assert!(matches!(d, Decision::Allow { .. }), "{d:?}");
}

#[test]
fn wanted_connector_is_what_review_looks_up() {
    let cfg = path_cfg();
    let r = |p: PodSpec| wanted_connector(&request(&p.json()), &cfg);
    assert_eq!(
        r(pod("shared/hub", &[])),
        Some(ConnectorRef {
            namespace: "shared".into(),
            name: "hub".into()
        })
    );
    assert_eq!(r(pod("bad", &[])), None);
    let mut p = pod("demo/hub", &[]);
    p.label = None;
    assert_eq!(r(p), None);
    let off = Config::new(PROXY, AddressForm::Path, None, false).unwrap();
    assert_eq!(wanted_connector(&request(&pod("demo/hub", &[]).json()), &off), None);
}

#[test]
fn config_is_checked_at_start() {
    assert!(Config::new("proxy.example.com", AddressForm::Path, None, true).is_ok());
    assert!(Config::new("10.0.0.1:31567", AddressForm::Path, None, true).is_ok());
    for bad in ["", "http://proxy", "proxy/x", "proxy:port", "pro xy"] {
        assert!(Config::new(bad, AddressForm::Path, None, true).is_err(), "{bad:?}");
    }
    for bad in [
        "c-{name}.svc",
        "{namespace}.svc",
        "{name}_{namespace}.svc",
        "{name}.{namespace}/x",
    ] {
        let e = Config::new(PROXY, AddressForm::Host, Some(bad), true).unwrap_err();
        assert!(e.contains("--host-pattern"), "{e}");
    }
    let cfg = host_cfg();
    let c = ConnectorRef::parse("demo/hub").unwrap();
    assert_eq!(cfg.host_of(&c), "c-hub-connector.demo.svc.cluster.local");
}

#[test]
fn responses_are_admission_review_v1() {
    use base64::Engine;
    let decision = decide(&pod("demo/hub", &["nginx"]), &path_cfg()).0;
    let v = review_response("u-1", &decision);
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    assert_eq!(v["response"]["uid"], "u-1");
    assert_eq!(v["response"]["allowed"], true);
    assert_eq!(v["response"]["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(patch[1]["op"], "replace");
    assert_eq!(patch[1]["path"], "/spec/containers/0/image");
    assert_eq!(
        patch[2]["path"],
        "/metadata/annotations/connectors.cpaas.io~1original-images"
    );

    let v = review_response("u-2", &Decision::Allow { why: "x" });
    assert_eq!(v["response"], json!({ "uid": "u-2", "allowed": true }));

    let decision = decide(&pod("demo/nope", &["nginx"]), &path_cfg()).0;
    let v = review_response("u-3", &decision);
    assert_eq!(v["response"]["allowed"], false);
    assert_eq!(v["response"]["status"]["code"], 400);
    assert_eq!(v["response"]["status"]["reason"], "BadRequest");
    assert!(v["response"]["patch"].is_null());
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("demo/nope")
    );
}
