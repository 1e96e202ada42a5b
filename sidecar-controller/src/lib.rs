//! The sidecar controller (issue 4): turns `Connector` resources and their Secrets into the
//! connector filter's configuration.
//!
//! - [`crd`]: the `Connector` resource and its generated CRD;
//! - [`secrets`]: Secret → upstream credential plus the `SecretReady` condition, as pure functions;
//! - [`manifests`]: Connector and Secret manifests read from files, every problem located;
//! - [`render`]: file mode, the stop-gap until the controller serves xDS.

pub mod crd;
pub mod hub;
pub mod manifests;
pub mod ops;
pub mod render;
pub mod secrets;
