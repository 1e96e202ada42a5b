//! The sidecar controller (issue 4): turns `Connector` resources and their Secrets into live
//! Envoy configuration.
//!
//! - [`crd`] and [`authz`]: the `Connector` resource and the RBAC rule, from the `connector-api`
//!   crate the webhook shares (the host-free rules come from `connector-core`);
//! - [`secrets`]: Secret → upstream credential plus the `SecretReady` condition, as pure functions;
//! - [`manifests`]: Connector and Secret manifests read from files, every problem located
//!   ([`manifest_yaml`]: their YAML, a fast path beside serde-saphyr);
//! - [`render`]: file mode's one-shot output for a static Envoy (`connector-controller render`);
//! - [`hub`]: the seam between sources of desired state and their consumers;
//! - [`filemode`]: the manifest-directory source, watched;
//! - [`pipeline`]: desired state → filter configuration, clusters and the credential table;
//! - [`xds`]: the ADS server Envoy's bootstrap points at (CDS + ECDS + the listener's SDS);
//! - [`pin`]: the upstreams' host names resolved and screened by the controller, pinned into
//!   Envoy's clusters (Envoy resolves no upstream name itself);
//! - [`proxy_tls`]: the proxy listener's serving certificate (a `kubernetes.io/tls` Secret or files);
//! - [`channel`]: the loopback channel the filter gets credentials and access decisions from;
//! - [`serve`]: the running controller (pipeline, listeners, graceful shutdown);
//! - [`ops`]: metrics, `/healthz`, `/readyz`;
//! - [`kube_mode`] and its parts ([`conditions`], [`probe`], [`authz`], [`cluster_identity`]): API mode;
//! - [`wasmplugin`]: the rendered filter configuration written into an Istio `WasmPlugin`;
//! - [`istio`]: Istio mode's cluster names, upstream ServiceEntries/DestinationRules, `ProxyReady`.

/// The Connector API crate's RBAC rule, under the name the controller's modules use.
pub use connector_api::authz;
pub mod channel;
pub mod cluster_identity;
pub mod conditions;
pub mod document;
/// The Connector CRD types, from the API crate the webhook shares.
pub use connector_api::crd;
pub mod filemode;
pub mod hub;
pub mod istio;
pub mod kube_mode;
pub mod live;
pub mod manifest_yaml;
pub mod manifests;
pub mod ops;
pub mod pin;
pub mod pipeline;
pub mod probe;
pub mod proxy_tls;
pub mod render;
mod runs;
pub mod secrets;
pub mod serve;
pub mod sharded;
#[cfg(test)]
mod test_rng;
pub mod wasmplugin;
pub mod xds;
