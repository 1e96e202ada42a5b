//! The filter's configuration document, typed once for both of its sides: the controller builds
//! values of these types and serialises them (serde), the filter parses the JSON back into them
//! ([`parse`]) and compiles them into its runtime tables (environment look-ups, key material).
//!
//! [`parse`] walks the document itself rather than through serde's derived `Deserialize`, which
//! stops at the first problem: a malformed configuration is refused as a whole with *every*
//! problem listed, each with its field path. The checks on typed values ([`check_entry`],
//! [`check_settings`]) are the one validator: the parser runs them, and the controller runs them
//! on what it builds before anything is pushed. The test `serialised_values_parse_back` keeps
//! the serde names and the parser's names one schema.
//!
//! Secrets never appear in the document: a credential names the environment variables that hold
//! it, or the revision the controller serves it under.

use serde::Serialize;

mod check;
mod parse;
mod walk;

pub use check::{check, check_entry, check_jwk_shape, check_settings, covered, entry_hosts, parse_service_account};
pub use parse::{
    Parsed, Split, assemble, head_members, merge, parse, parse_entry, parse_jwk, part_entries, parts_head,
    read_identity, read_settings, split,
};

pub const DEFAULT_REALM: &str = "oci-connector";
pub const DEFAULT_TOKEN_CACHE_SIZE: u64 = 10_000;
/// 24 h: ServiceAccount tokens for a custom audience are short-lived (1 h by default; the API
/// server's one-year extension applies only to its own audience).
pub const DEFAULT_MAX_TOKEN_LIFETIME: u64 = 86_400;
/// Clock skew is bounded to a minute.
pub const MAX_CLOCK_SKEW: u64 = 60;
/// The controller channel's `:authority` unless `controller.authority` names another.
pub const DEFAULT_CHANNEL_AUTHORITY: &str = "connector-controller";

/// One validation problem, located by its JSON path (e.g. `connectors[1].credential.passwordEnv`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The whole document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FilterConfig {
    #[serde(skip_serializing_if = "Proxy::is_default")]
    pub proxy: Proxy,
    pub identity: IdentityConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<ChannelConfig>,
    pub authorization: AccessMode,
    /// Where the connector entries are when the controller delivers them in parts over its
    /// channel (`--config-parts`): each a content id (`sha256:<hex>` of the part's text, a run
    /// of entries joined with `,`), fetched by the filter and put together in this order as
    /// `connectors`, which is then empty here. Keeps the pushed document small at any number of
    /// connectors (issue 17): a change pushes new ids, and the filter fetches only the parts it
    /// does not hold. (Before `connectors`: the controller writes the document up to it.)
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<String>,
    pub connectors: Vec<ConnectorEntry>,
}

/// `proxy`: what the proxy calls itself and how it names connectors by host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Proxy {
    /// The `realm` of the proxy's own Basic/Bearer challenges ([`DEFAULT_REALM`] if unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
    /// `{name}` and `{namespace}` in a host name ([`crate::host::DEFAULT_HOST_PATTERN`] if unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_pattern: Option<String>,
}

impl Proxy {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn realm(&self) -> &str {
        self.realm.as_deref().unwrap_or(DEFAULT_REALM)
    }

    pub fn host_pattern(&self) -> &str {
        self.host_pattern
            .as_deref()
            .unwrap_or(crate::host::DEFAULT_HOST_PATTERN)
    }
}

/// `identity`: whose ServiceAccount tokens are accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityConfig {
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub jwks: Jwks,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_skew_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_cache_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_token_lifetime_seconds: Option<u64>,
}

impl IdentityConfig {
    pub fn clock_skew(&self) -> u64 {
        self.clock_skew_seconds.unwrap_or(MAX_CLOCK_SKEW)
    }

    pub fn token_cache_size(&self) -> u64 {
        self.token_cache_size.unwrap_or(DEFAULT_TOKEN_CACHE_SIZE)
    }

    pub fn max_token_lifetime(&self) -> u64 {
        self.max_token_lifetime_seconds.unwrap_or(DEFAULT_MAX_TOKEN_LIFETIME)
    }
}

/// The cluster's `/openid/v1/jwks`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// A JWK public key, as the cluster publishes it (fields the filter does not use are dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Jwk {
    pub kid: String,
    pub kty: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
}

/// The signature algorithms a configured key may have (a token's header `alg` must name its key's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
        }
    }
}

/// A JWK's key material, decoded and checked for shape (sizes, curve, algorithm): what the filter
/// turns into a verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    Rsa {
        algorithm: Algorithm,
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ec {
        algorithm: Algorithm,
        x: Vec<u8>,
        y: Vec<u8>,
    },
}

/// `controller`: the sidecar controller's loopback channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelConfig {
    /// The Envoy cluster that reaches the controller on loopback.
    pub cluster: String,
    /// `:authority` sent to it ([`DEFAULT_CHANNEL_AUTHORITY`] if unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// The environment variable holding the key the controller requires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
}

/// `authorization`: who decides whether a caller may use a connector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// The connector's own lists ([`crate::access::admits`]), in the filter.
    #[default]
    Rules,
    /// Kubernetes RBAC: the controller answers (SubjectAccessReview), the filter caches.
    Controller,
}

/// One `connectors[i]`: a registry reachable through the proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorEntry {
    pub namespace: String,
    pub name: String,
    /// `http(s)://host[:port]` of the upstream registry.
    pub address: String,
    /// The Envoy cluster that reaches the upstream.
    pub cluster: String,
    pub credential: CredentialRef,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_namespaces: Vec<String>,
    /// `<namespace>/<serviceaccount>`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_service_accounts: Vec<String>,
    /// Extra host names (the pattern's host is always served).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Token realms off the upstream's host that may receive the connector's credential.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub token_realms: Vec<RealmEntry>,
    /// Pulls only: pushes and deletes through this connector are refused, whoever asks.
    #[serde(skip_serializing_if = "is_false")]
    pub read_only: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ConnectorEntry {
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `tokenRealms[i]`: `{"url": "https://auth.example.com/token", "cluster": "auth_example"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct RealmEntry {
    pub url: String,
    pub cluster: String,
}

/// Where a connector's upstream credential comes from. Never the credential itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum CredentialRef {
    /// `{"fromController": "<revision>"}`: served by the controller's channel under a revision
    /// that changes whenever the Secret does.
    FromController {
        #[serde(rename = "fromController")]
        revision: String,
    },
    /// `{"dockerConfigJsonEnv": "VAR"}`: a kubernetes.io/dockerconfigjson Secret's
    /// `.dockerconfigjson`, handed to the VM as one environment variable.
    DockerConfig {
        #[serde(rename = "dockerConfigJsonEnv")]
        var: String,
    },
    /// `{"username": ..., "passwordEnv": ...}` or `{"usernameEnv": ..., "passwordEnv": ...}`.
    Env {
        #[serde(flatten)]
        username: Username,
        #[serde(rename = "passwordEnv")]
        password_env: String,
    },
}

impl Default for CredentialRef {
    fn default() -> Self {
        Self::FromController {
            revision: String::new(),
        }
    }
}

/// The username of an environment credential: written in the document, or named by a variable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Username {
    #[serde(rename = "username")]
    Literal(String),
    #[serde(rename = "usernameEnv")]
    Env(String),
}

#[cfg(test)]
mod tests;
