//! Owns the admission decision: given a Pod's AdmissionRequest, the webhook's [`Config`] and a
//! lookup of the connector the pod names, either let the pod through untouched, let it through
//! with a JSONPatch that points its images at the connector proxy, or deny it with a message
//! that says what is wrong and how to fix it. Pure: the server does the I/O (the lookup) and
//! turns a [`Decision`] into an AdmissionReview response with [`review_response`].

use connector_core::access::{AllowLists, admits};
use connector_core::names::{is_dns_label, is_dns_subdomain};
use std::collections::BTreeMap;

use base64::Engine;
use connector_api::crd::Connector;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation, TestOperation};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::AdmissionRequest;
use serde_json::{Value, json};

use connector_core::reference::{self, ImageRef};

/// The opt-in label; only the value `"true"` opts in.
pub const INJECT_LABEL: &str = "connectors.cpaas.io/proxy-inject";
/// `<namespace>/<name>` of the Connector whose registry the pod's images come from.
pub const CONNECTOR_ANNOTATION: &str = "connectors.cpaas.io/connector";
/// Set by the webhook: the images it rewrote, as they were written, per container kind.
pub const ORIGINAL_IMAGES_ANNOTATION: &str = "connectors.cpaas.io/original-images";
/// The host-form name of a connector unless `--host-pattern` says otherwise: the filter's own
/// definition, shared with the credential provider, so the three never disagree on a host.
pub use connector_core::host::DEFAULT_HOST_PATTERN;
use connector_core::host::render_host;

/// The three places a pod lists images, with the field name the API (and the patch) uses.
const KINDS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];

/// Which address form rewritten images use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressForm {
    /// `<proxy host>/namespaces/<ns>/connectors/<name>/<repo>`.
    Path,
    /// `<host from the pattern>/<repo>`.
    Host,
}

/// The webhook's settings, validated once at start-up.
#[derive(Debug, Clone)]
pub struct Config {
    /// `host[:port]` of the proxy as image references name it, lowercased.
    proxy_host: String,
    host_pattern: String,
    form: AddressForm,
    /// When false every opted-in pod is denied, as the original product does.
    enabled: bool,
}

impl Config {
    /// Checks that `proxy_host` is a registry `host[:port]` and that `host_pattern` has both
    /// `{name}` and `{namespace}` and gives a valid host name.
    pub fn new(proxy_host: &str, form: AddressForm, host_pattern: Option<&str>, enabled: bool) -> Result<Self, String> {
        reference::check_domain(proxy_host).map_err(|e| format!("--proxy-host: {e}"))?;
        let host_pattern = host_pattern.unwrap_or(DEFAULT_HOST_PATTERN).to_string();
        if !host_pattern.contains("{name}") || !host_pattern.contains("{namespace}") {
            return Err(format!(
                "--host-pattern {host_pattern:?} must contain both {{name}} and {{namespace}}"
            ));
        }
        let sample = render_host(&host_pattern, "namespace", "name");
        reference::check_domain(&sample)
            .map_err(|e| format!("--host-pattern {host_pattern:?} does not give a host name: {e}"))?;
        Ok(Self {
            proxy_host: proxy_host.to_ascii_lowercase(),
            host_pattern,
            form,
            enabled,
        })
    }

    /// The host-form name of a connector.
    pub fn host_of(&self, c: &ConnectorRef) -> String {
        render_host(&self.host_pattern, &c.namespace, &c.name).to_ascii_lowercase()
    }
}

/// A connector named by the pod's annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ConnectorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ConnectorRef {
    /// `<namespace>/<name>`: a DNS-1123 label and a DNS-1123 subdomain, nothing around them.
    pub fn parse(value: &str) -> Result<Self, String> {
        let Some((namespace, name)) = value.split_once('/') else {
            return Err("it has no '/'".into());
        };
        if !is_dns_label(namespace) {
            return Err(format!("{namespace:?} is not a namespace name (DNS-1123 label)"));
        }
        if !is_dns_subdomain(name) {
            return Err(format!("{name:?} is not a Connector name (DNS-1123 subdomain)"));
        }
        Ok(Self {
            namespace: namespace.into(),
            name: name.into(),
        })
    }
}

/// What the webhook needs to know about a Connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorInfo {
    /// The upstream registry as images name it: `spec.address` without scheme and default port.
    pub registry: String,
    /// `spec.allowedNamespaces`.
    pub allowed_namespaces: Vec<String>,
    /// `spec.allowedServiceAccounts` (`namespace/name`).
    pub allowed_service_accounts: Vec<String>,
    /// RBAC mode: whether the pod's ServiceAccount may pull through the connector, by the
    /// SubjectAccessReview the proxy asks (the lists above then do not count). `None`: rules
    /// mode, the lists decide, as in the filter.
    pub rbac_allowed: Option<bool>,
}

impl ConnectorInfo {
    pub fn from_connector(c: &Connector) -> Result<Self, String> {
        Ok(Self {
            registry: reference::registry_of_address(&c.spec.address).map_err(|e| e.to_string())?,
            allowed_namespaces: c.spec.allowed_namespaces.clone(),
            allowed_service_accounts: c.spec.allowed_service_accounts.clone(),
            rbac_allowed: None,
        })
    }
}

/// The connector's lists, for the rule the filter applies ([`connector_core::access`]).
impl AllowLists for ConnectorInfo {
    fn allows_namespace(&self, namespace: &str) -> bool {
        self.allowed_namespaces.iter().any(|n| n == namespace)
    }

    fn allows_service_account(&self, namespace: &str, service_account: &str) -> bool {
        self.allowed_service_accounts
            .iter()
            .any(|entry| entry.split_once('/') == Some((namespace, service_account)))
    }
}

/// The answer of a connector lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(ConnectorInfo),
    NotFound,
    /// The API server could not be asked (or the Connector is unusable); the pod is denied.
    Failed(String),
}

/// Why a pod was denied; `as_str` is the log and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    Disabled,
    MissingAnnotation,
    MalformedAnnotation,
    UnknownConnector,
    NamespaceNotAllowed,
    InvalidImage,
    LookupFailed,
    NoNamespace,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::MissingAnnotation => "missing_annotation",
            Self::MalformedAnnotation => "malformed_annotation",
            Self::UnknownConnector => "unknown_connector",
            Self::NamespaceNotAllowed => "namespace_not_allowed",
            Self::InvalidImage => "invalid_image",
            Self::LookupFailed => "lookup_failed",
            Self::NoNamespace => "no_namespace",
        }
    }
}

/// One rewritten image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// `containers`, `initContainers` or `ephemeralContainers`.
    pub kind: &'static str,
    pub container: String,
    pub from: String,
    pub to: String,
}

/// The outcome of [`review`].
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Admitted untouched; `why` is for the log.
    Allow { why: &'static str },
    /// Admitted with this patch.
    Patch { patch: Patch, rewrites: Vec<Rewrite> },
    /// Refused; `code` is 400 for a pod that is wrong, 403 for one that is not allowed, 500 when
    /// the connector could not be looked up.
    Deny {
        code: u16,
        reason: DenyReason,
        message: String,
    },
}

fn deny(code: u16, reason: DenyReason, message: String) -> Decision {
    Decision::Deny { code, reason, message }
}

/// The connector a request needs looked up, if the decision gets that far: the pod opts in,
/// rewriting is on and the annotation is well formed.
pub fn wanted_connector(req: &AdmissionRequest<Pod>, cfg: &Config) -> Option<ConnectorRef> {
    let pod = req.object.as_ref()?;
    if !cfg.enabled || !opted_in(pod) {
        return None;
    }
    ConnectorRef::parse(annotation(pod, CONNECTOR_ANNOTATION)?).ok()
}

fn opted_in(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_LABEL))
        .is_some_and(|v| v == "true")
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The decision for one admission request. `lookup` is called at most once, with the connector
/// the annotation names, and only for an opted-in pod with a well-formed annotation.
pub fn review(req: &AdmissionRequest<Pod>, cfg: &Config, lookup: impl FnOnce(&ConnectorRef) -> Lookup) -> Decision {
    let Some(pod) = req.object.as_ref() else {
        return Decision::Allow { why: "no object" };
    };
    if !opted_in(pod) {
        return Decision::Allow { why: "not opted in" };
    }
    let how_to_opt_out =
        format!("remove the label {INJECT_LABEL} (and the annotation {CONNECTOR_ANNOTATION}) to pull images directly");
    if !cfg.enabled {
        return deny(
            403,
            DenyReason::Disabled,
            format!(
                "image rewriting to the connector proxy is turned off in this cluster, so pods labelled \
                 {INJECT_LABEL}=true are refused: {how_to_opt_out}, or ask the cluster administrator to \
                 turn rewriting on"
            ),
        );
    }
    let Some(value) = annotation(pod, CONNECTOR_ANNOTATION) else {
        return deny(
            400,
            DenyReason::MissingAnnotation,
            format!(
                "the pod is labelled {INJECT_LABEL}=true but has no annotation {CONNECTOR_ANNOTATION}: add \
                 `{CONNECTOR_ANNOTATION}: <namespace>/<connector name>`, or {how_to_opt_out}"
            ),
        );
    };
    let connector = match ConnectorRef::parse(value) {
        Ok(c) => c,
        Err(why) => {
            return deny(
                400,
                DenyReason::MalformedAnnotation,
                format!(
                    "annotation {CONNECTOR_ANNOTATION}={value:?} is malformed ({why}): it must be \
                     `<namespace>/<connector name>`, e.g. `team-a/harbor`"
                ),
            );
        }
    };
    let pod_ns = req
        .namespace
        .as_deref()
        .or(pod.metadata.namespace.as_deref())
        .unwrap_or_default();
    if pod_ns.is_empty() {
        return deny(
            400,
            DenyReason::NoNamespace,
            "the admission request names no namespace for the pod".into(),
        );
    }
    let info = match lookup(&connector) {
        Lookup::Found(info) => info,
        Lookup::NotFound if connector.namespace == pod_ns => {
            return deny(
                400,
                DenyReason::UnknownConnector,
                format!(
                    "Connector {connector} (annotation {CONNECTOR_ANNOTATION}) does not exist: create it \
                     (`kubectl get connector -n {}`), or fix the annotation",
                    connector.namespace
                ),
            );
        }
        // Another namespace's connector that does not exist gets the same answer as one the pod
        // may not use, as at the proxy: the pod's author learns nothing about other namespaces.
        Lookup::NotFound => return not_allowed(&connector, pod_ns),
        Lookup::Failed(why) => {
            return deny(
                500,
                DenyReason::LookupFailed,
                format!("could not read Connector {connector}: {why}; try again"),
            );
        }
    };
    let sa = format!("{pod_ns}/{}", pod_service_account(pod));
    match info.rbac_allowed {
        Some(true) => {}
        Some(false) => return not_allowed_rbac(&connector, &sa),
        None => {
            let allowed = admits(&connector.namespace, &info, pod_ns, pod_service_account(pod));
            if !allowed {
                return not_allowed(&connector, pod_ns);
            }
        }
    }
    rewrite(pod, cfg, &connector, &info)
}

/// The ServiceAccount a pod runs as (`default` when it names none): whose pulls the proxy
/// will authorize, so whose access the webhook checks.
pub fn pod_service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// RBAC mode's denial: the same grant the proxy would ask for, named.
fn not_allowed_rbac(connector: &ConnectorRef, sa: &str) -> Decision {
    let (ns, name) = sa.split_once('/').unwrap_or((sa, ""));
    deny(
        403,
        DenyReason::NamespaceNotAllowed,
        format!(
            "Connector {connector} does not exist or ServiceAccount {sa} may not pull through it, so its \
             pods could not pull the rewritten images: grant system:serviceaccount:{ns}:{name} `get` on \
             connectors.alauda.io {:?} in namespace {} (e.g. a RoleBinding to the ClusterRole \
             oci-connector-user), or run the pod as a ServiceAccount that has it",
            connector.name, connector.namespace
        ),
    )
}

fn not_allowed(connector: &ConnectorRef, pod_ns: &str) -> Decision {
    deny(
        403,
        DenyReason::NamespaceNotAllowed,
        format!(
            "Connector {connector} does not exist or may not be used from namespace {pod_ns}: a connector \
             serves pods of its own namespace, the namespaces in its spec.allowedNamespaces and the \
             ServiceAccounts in its spec.allowedServiceAccounts; use a connector of namespace {pod_ns}, or \
             ask the owner of {connector} to add {pod_ns} to spec.allowedNamespaces"
        ),
    )
}

/// The patch for an admitted pod (or an untouched admission when no image is the connector's).
fn rewrite(pod: &Pod, cfg: &Config, connector: &ConnectorRef, info: &ConnectorInfo) -> Decision {
    // Serialised once so the three container lists are read the same way.
    let spec = pod
        .spec
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null);
    let host_form_host = cfg.host_of(connector);
    let mut rewrites = Vec::new();
    let mut invalid = Vec::new();
    let mut ops = Vec::new();
    for kind in KINDS {
        let list = spec[kind].as_array().map(Vec::as_slice).unwrap_or_default();
        for (i, c) in list.iter().enumerate() {
            let name = c["name"].as_str().unwrap_or_default();
            // An empty image is the API server's to refuse, not ours.
            let Some(image) = c["image"].as_str().filter(|s| !s.is_empty()) else {
                continue;
            };
            let parsed = match ImageRef::parse(image) {
                Ok(p) => p,
                Err(e) => {
                    invalid.push(format!("{kind}[{name}] image {image:?}: {e}"));
                    continue;
                }
            };
            if parsed.registry == cfg.proxy_host || parsed.registry == host_form_host {
                continue; // already on the proxy
            }
            if parsed.registry != info.registry {
                continue; // another registry
            }
            let to = match cfg.form {
                AddressForm::Path => format!(
                    "{}/namespaces/{}/connectors/{}/{}{}",
                    cfg.proxy_host,
                    connector.namespace,
                    connector.name,
                    parsed.repository,
                    parsed.suffix()
                ),
                AddressForm::Host => format!("{host_form_host}/{}{}", parsed.repository, parsed.suffix()),
            };
            if let Err(e) = ImageRef::parse(&to) {
                invalid.push(format!(
                    "{kind}[{name}] image {image:?} cannot be rewritten to a valid reference ({to:?}: {e})"
                ));
                continue;
            }
            let path = PointerBuf::from_tokens(["spec", kind, &i.to_string(), "image"]);
            ops.push(PatchOperation::Test(TestOperation {
                path: path.clone(),
                value: json!(image),
            }));
            ops.push(PatchOperation::Replace(ReplaceOperation { path, value: json!(to) }));
            rewrites.push(Rewrite {
                kind,
                container: name.to_string(),
                from: image.to_string(),
                to,
            });
        }
    }
    if !invalid.is_empty() {
        return deny(
            400,
            DenyReason::InvalidImage,
            format!(
                "the pod opts in to image rewriting but these images are not valid image references, so it \
                 cannot tell which belong to Connector {connector}'s registry {}: {}; fix the image names",
                info.registry,
                invalid.join("; ")
            ),
        );
    }
    if rewrites.is_empty() {
        return Decision::Allow {
            why: "no image of the connector's registry",
        };
    }
    ops.push(original_images_op(pod, &rewrites));
    Decision::Patch {
        patch: Patch(ops),
        rewrites,
    }
}

/// Records the rewritten images as written, `{"<kind>": {"<container>": "<image>"}}`, merged into
/// a value already there (an update that adds an ephemeral container keeps earlier entries).
fn original_images_op(pod: &Pod, rewrites: &[Rewrite]) -> PatchOperation {
    let mut record: BTreeMap<String, BTreeMap<String, String>> = annotation(pod, ORIGINAL_IMAGES_ANNOTATION)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    for r in rewrites {
        record
            .entry(r.kind.to_string())
            .or_default()
            .insert(r.container.clone(), r.from.clone());
    }
    let value = serde_json::to_string(&record).unwrap_or_default();
    if pod.metadata.annotations.is_some() {
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations", ORIGINAL_IMAGES_ANNOTATION]),
            value: json!(value),
        })
    } else {
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations"]),
            value: json!({ ORIGINAL_IMAGES_ANNOTATION: value }),
        })
    }
}

/// An AdmissionReview v1 response for `uid`: `patchType: JSONPatch` with the patch base64
/// encoded, or `allowed: false` with `status.code` and `status.message`.
pub fn review_response(uid: &str, decision: &Decision) -> Value {
    let response = match decision {
        Decision::Allow { .. } => json!({ "uid": uid, "allowed": true }),
        Decision::Patch { patch, .. } => {
            let bytes = serde_json::to_vec(patch).unwrap_or_default();
            json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
            })
        }
        Decision::Deny { code, message, .. } => json!({
            "uid": uid,
            "allowed": false,
            "status": {
                "status": "Failure",
                "code": code,
                "reason": status_reason(*code),
                "message": message,
            },
        }),
    };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

fn status_reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        403 => "Forbidden",
        _ => "InternalError",
    }
}

#[cfg(test)]
mod tests;
