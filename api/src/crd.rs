//! Owns the `Connector` custom resource (`connectors.alauda.io/v1alpha1`): its Rust types, the
//! CRD generated from them, and the test that keeps the committed CRD YAML
//! (`deploy/crd/connectors.alauda.io.yaml`) equal to what the types generate.
//!
//! The schema checks what a schema can (required fields, the auth and class enums, the address
//! scheme, name shapes); what needs other objects (the Secret, the upstream) is the controller's
//! job and shows in `status.conditions`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where the committed CRD lives, relative to the repository root.
pub const CRD_PATH: &str = "deploy/crd/connectors.alauda.io.yaml";
/// The command that regenerates [`CRD_PATH`]; named when the drift test fails.
pub const CRD_REGENERATE: &str = "cargo run -q -p connector-controller -- crd > deploy/crd/connectors.alauda.io.yaml";

/// A connector: an upstream OCI registry that workloads reach through the proxy with their
/// ServiceAccount token, and the Secret holding the registry credential.
// Each printer column repeats `type_ = "string"`; clippy reads that as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "connectors.alauda.io",
    version = "v1alpha1",
    kind = "Connector",
    namespaced,
    doc = "An upstream OCI registry reached through the connector proxy with a ServiceAccount token",
    status = "ConnectorStatus",
    shortname = "ctr",
    printcolumn(name = "CLASS", type_ = "string", json_path = ".spec.connectorClassName"),
    printcolumn(name = "ADDRESS", type_ = "string", json_path = ".spec.address"),
    printcolumn(
        name = "READY",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "REASON",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "AGE", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorSpec {
    /// Upstream registry origin, `http(s)://host[:port]` (Distribution serves `/v2/` at the root).
    #[schemars(regex(pattern = r"^https?://[^/?#\s]+/?$"))]
    pub address: String,
    pub auth: ConnectorAuth,
    /// Which connector class serves this connector; only `oci` exists.
    pub connector_class_name: ConnectorClass,
    /// Other namespaces whose ServiceAccounts may use this connector (its own namespace always may).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")))]
    pub allowed_namespaces: Vec<String>,
    /// Individual ServiceAccounts, as `namespace/name`, that may use this connector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")))]
    pub allowed_service_accounts: Vec<String>,
    /// Token realms off the registry's host that may receive the connector's credential. A realm
    /// on the registry's own host needs no entry; any other realm is refused before the
    /// credential leaves the proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_realms: Vec<TokenRealm>,
    /// Extra host-form names (besides `c-<name>-connector.<namespace>.svc.cluster.local`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Pulls only: pushes and deletes through this connector are refused (403), whoever asks,
    /// in either access mode.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorAuth {
    /// How the upstream authenticates. The proxy reads the upstream's challenge itself, so both
    /// take a username and password Secret; the name documents the registry's kind.
    pub name: AuthName,
    pub secret_ref: SecretRef,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AuthName {
    TokenAuth,
    BasicAuth,
}

/// A Secret in the connector's own namespace: a connector never reads another namespace's Secret.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ConnectorClass {
    Oci,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRealm {
    /// The realm URL as the upstream's `WWW-Authenticate: Bearer realm=...` names it.
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// The Envoy cluster that reaches the realm's host. Optional: by default the controller
    /// derives one from the URL's origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorStatus {
    /// `SecretReady`, `LivenessReady`, `AuthReady`, `ProxyReady` and `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyStatus>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_address: Option<HttpAddress>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
pub struct HttpAddress {
    /// The proxy address in path form: `http(s)://<proxy>/namespaces/<ns>/connectors/<name>`.
    pub url: String,
}

/// The CRD as YAML, exactly as committed at [`CRD_PATH`].
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt;
    let crd: CustomResourceDefinition = Connector::crd();
    let body = serde_saphyr::to_string(&crd)?;
    Ok(format!(
        "# Generated from api/src/crd.rs; do not edit. Regenerate with:\n#   {CRD_REGENERATE}\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn crd_json() -> Value {
        use kube::CustomResourceExt;
        serde_json::to_value(Connector::crd()).unwrap()
    }

    fn spec_schema() -> Value {
        crd_json()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    }

    #[test]
    fn committed_crd_matches_the_rust_types() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CRD_PATH);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = crd_yaml().unwrap();
        assert!(
            committed == generated,
            "{CRD_PATH} differs from the CRD the Rust types generate; regenerate it with:\n  {CRD_REGENERATE}"
        );
    }

    #[test]
    fn printer_columns_are_the_ones_users_know() {
        let cols = &crd_json()["spec"]["versions"][0]["additionalPrinterColumns"];
        let names: Vec<&str> = cols
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["CLASS", "ADDRESS", "READY", "REASON", "AGE"]);
        assert_eq!(cols[2]["jsonPath"], ".status.conditions[?(@.type==\"Ready\")].status");
        assert_eq!(cols[3]["jsonPath"], ".status.conditions[?(@.type==\"Ready\")].reason");
    }

    #[test]
    fn schema_validates_what_a_schema_can() {
        let crd = crd_json();
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["versions"][0]["subresources"]["status"], json!({}));
        let spec = spec_schema();
        let required: Vec<&str> = spec["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for field in ["address", "auth", "connectorClassName"] {
            assert!(required.contains(&field), "spec.{field} must be required: {required:?}");
        }
        assert!(
            spec["properties"]["address"]["pattern"]
                .as_str()
                .unwrap()
                .starts_with("^https?://")
        );
        assert_eq!(
            spec["properties"]["auth"]["properties"]["name"]["enum"],
            json!(["tokenAuth", "basicAuth"])
        );
        assert_eq!(spec["properties"]["connectorClassName"]["enum"], json!(["oci"]));
        assert_eq!(
            spec["properties"]["auth"]["properties"]["secretRef"]["required"],
            json!(["name"])
        );
    }

    #[test]
    fn address_pattern_accepts_origins_only() {
        let pattern = spec_schema()["properties"]["address"]["pattern"]
            .as_str()
            .unwrap()
            .to_string();
        // The pattern is simple enough to check without a regex engine: scheme, then an
        // authority with no path, query or fragment (a trailing `/` allowed).
        let matches = |s: &str| {
            let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://"));
            rest.is_some_and(|r| {
                let r = r.strip_suffix('/').unwrap_or(r);
                !r.is_empty() && !r.contains(['/', '?', '#', ' '])
            })
        };
        assert_eq!(pattern, r"^https?://[^/?#\s]+/?$");
        for (address, ok) in [
            ("https://harbor.example.com", true),
            ("http://127.0.0.1:5000/", true),
            ("harbor.example.com", false),
            ("ftp://x", false),
            ("https://x/library", false),
        ] {
            assert_eq!(matches(address), ok, "{address}");
        }
    }

    #[test]
    fn a_user_manifest_deserialises() {
        let c: Connector = serde_saphyr::from_str(
            r#"
apiVersion: connectors.alauda.io/v1alpha1
kind: Connector
metadata: { name: harbor, namespace: team-a }
spec:
  address: https://harbor.example.com
  auth: { name: tokenAuth, secretRef: { name: harbor-robot } }
  connectorClassName: oci
  allowedServiceAccounts: [ci/builder]
"#,
        )
        .unwrap();
        assert_eq!(c.spec.auth.name, AuthName::TokenAuth);
        assert_eq!(c.spec.allowed_service_accounts, ["ci/builder"]);
        assert!(c.spec.token_realms.is_empty());
    }
}
