//! One definition of each concept the connector's parts share: the Kubernetes name grammars, the
//! per-connector host pattern, the access rule of rules mode, the RBAC verbs, Docker Hub's names,
//! reading a docker `config.json`, Basic credentials, percent-decoding, upstream addresses, and
//! the filter's configuration document (typed, parsed and checked).
//!
//! The filter (Wasm), the controller, the webhook and the credential provider all depend on this
//! crate instead of on each other, so a change of a rule is made once and seen by all of them.

pub mod access;
pub mod address;
pub mod basic;
pub mod channel;
pub mod cli;
pub mod config;
pub mod docker_config;
pub mod host;
#[cfg(feature = "keys")]
pub mod keys;
pub mod names;
pub mod percent;
pub mod reference;
pub mod registry;
pub mod token_service;
pub mod verb;
