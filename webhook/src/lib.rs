//! The image-rewrite admission webhook (issue 5): pods that opt in get the images of their
//! connector's registry rewritten to the connector proxy's address.
//!
//! - [`mutate`]: the pure decision (image references are `connector_core::reference`'s) over an AdmissionRequest and a connector lookup;
//! - [`server`]: the HTTPS server (`POST /mutate`, `/healthz`) and the kube-backed lookup.

pub mod mutate;
pub mod server;
