//! The connector filter: a proxy-wasm HTTP filter that lets workloads reach private OCI
//! registries with their Kubernetes ServiceAccount token instead of a registry password.
//!
//! Everything that decides lives in plain modules that native `cargo test` covers:
//! - [`config`]: the JSON configuration, validated as a whole and compiled;
//! - [`route`]: distribution paths, address forms and name grammars;
//! - [`identity`]: credential extraction, JWT verification, the verified-token cache;
//! - [`pkcs1`]: RSA PKCS#1 v1.5 signature checks on keys prepared per configuration;
//! - [`engine`]: the request and response decisions;
//! - [`flow`]: the forwarded request's flow (access check, controller credential, challenge
//!   probe, upstream token single flight) as a state machine the shim drives;
//! - [`rewrite`]: `Location` / `Link` mapping back to the client's address form;
//! - [`respond`]: refusals as OCI error responses;
//! - [`leak`]: whether an upstream answer repeats the credential the filter sent;
//! - [`channel`]: the sidecar controller's loopback channel (credentials, access decisions);
//! - [`parts`]: a configuration whose connectors come as parts over the channel, assembled;
//! - [`tarpit`]: refusals past a per-second threshold answered after a delay;
//! - [`stats`]: names of the Envoy stats and access-log properties the filter exports;
//! - [`wire`]: the proxy-wasm ABI's byte formats (header maps, property paths).
//!
//! The proxy-wasm host is touched only by `host` (every host call, every status handled) and
//! `shim` (the callbacks), compiled for wasm32 only.

pub mod channel;
pub mod config;
pub mod engine;
pub mod flow;
pub mod identity;
pub mod leak;
pub use connector_core::keys::pkcs1;
pub mod parts;
pub mod respond;
pub mod rewrite;
pub mod route;
pub mod stats;
pub mod tarpit;
pub mod upstream;
pub mod wire;

#[cfg(target_arch = "wasm32")]
mod host;
#[cfg(target_arch = "wasm32")]
mod shim;

#[cfg(test)]
mod testkeys;
