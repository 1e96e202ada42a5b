//! The kubelet credential provider (issue 5): request in, response out, as pure functions.
//!
//! Owns the decision of the `connector-credential-provider` exec plugin: which images are the
//! connector proxy's (path form `PROXY/namespaces/<ns>/connectors/<name>/<repo>`, host form
//! `<host of a configured connector>/<repo>`), what the kubelet gets for them (the pod's
//! ServiceAccount token as the password, cached no longer than the token lives), and why a request
//! is refused. `main.rs` only moves bytes.

use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use connector_core::host::{DEFAULT_HOST_PATTERN, render_host};
use connector_core::names::{is_dns_label, is_dns_subdomain};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// The only API version the kubelet speaks to exec plugins that we answer.
pub const API_VERSION: &str = "credentialprovider.kubelet.k8s.io/v1";
pub const REQUEST_KIND: &str = "CredentialProviderRequest";
pub const RESPONSE_KIND: &str = "CredentialProviderResponse";
/// The proxy ignores the username; a fixed one makes the kubelet's logs and registry logs legible.
pub const USERNAME: &str = "serviceaccount";
/// The audience the proxy verifies; named in the configuration advice.
pub const AUDIENCE: &str = "oci-connector";
/// How long a token without a readable `exp` may be cached: short, so a token we cannot judge is
/// not reused for long.
pub const UNKNOWN_EXPIRY_CACHE_SECS: u64 = 60;
/// Never cache closer than this to the token's expiry (a pull started just before expiry still
/// has to finish its blob requests)...
pub const MIN_EXPIRY_MARGIN_SECS: u64 = 60;
/// ...and never for more than 90% of what remains.
pub const EXPIRY_MARGIN_DIVISOR: u64 = 10;

/// Environment variables read when the matching flag is absent.
pub const ENV_PROXY: &str = "OCI_CONNECTOR_PROXY";
pub const ENV_HOST_CONNECTORS: &str = "OCI_CONNECTOR_HOST_CONNECTORS";
pub const ENV_HOST_PATTERN: &str = "OCI_CONNECTOR_HOST_PATTERN";
pub const ENV_HOST_PORT: &str = "OCI_CONNECTOR_HOST_PORT";

/// Where the connector proxy is, as image references name it. Only names the operator configured
/// get a token: `--proxy` for the path form, and for the host form exactly the names of the
/// connectors listed in `--host-connectors`. Any namespace can create a Service called
/// `c-<x>-connector.<its ns>`; answering every name of that shape would hand a pod's token to it
/// (issue 12, item 12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `host[:port]` of the proxy for the path form (lower-cased host).
    pub proxy: Authority,
    /// Host form: the `host[:port]` of each configured connector, rendered from the host pattern
    /// the filter and the webhook use ([`connector_core::host::render_host`]). Empty: the
    /// host form gets no credential.
    pub hosts: Vec<HostEntry>,
}

/// One host-form name the operator configured, and the connector it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    pub authority: Authority,
    pub namespace: String,
    pub name: String,
}

/// A `host[:port]`, host lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub host: String,
    pub port: Option<u16>,
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

impl Authority {
    /// Parses `host[:port]` (a bracketed IPv6 literal allowed). No scheme, path or user info:
    /// image references never carry them.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty".into());
        }
        if s.contains("://") || s.contains('/') || s.contains('@') {
            return Err(format!(
                "{s:?} is not host[:port] (no scheme, path or user: as image references name the proxy, e.g. 192.168.1.10:31567)"
            ));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| format!("{s:?}: unclosed '['"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| format!("{s:?}: junk after ']'"))?),
            };
            (format!("[{h}]"), port)
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (s.to_string(), None),
            }
        };
        if host.is_empty() || host.contains(':') && !host.starts_with('[') {
            return Err(format!("{s:?}: not host[:port]"));
        }
        let port = match port {
            None => None,
            Some(p) => Some(parse_port(p).map_err(|e| format!("{s:?}: {e}"))?),
        };
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {p:?} is not 1-65535"))
}

/// The host form as the operator configures it: which connectors, the pattern that names their
/// hosts (default: the filter's [`DEFAULT_HOST_PATTERN`]) and the port images name (none: no port).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostForm<'a> {
    /// `<ns>/<name>[,<ns>/<name>...]`.
    pub connectors: Option<&'a str>,
    pub pattern: Option<&'a str>,
    pub port: Option<&'a str>,
}

impl Settings {
    /// `proxy`: `host[:port]`; `host_form`: see [`HostForm`].
    pub fn new(proxy: &str, host_form: HostForm<'_>) -> Result<Self, String> {
        let proxy = Authority::parse(proxy.trim()).map_err(|e| format!("--proxy: {e}"))?;
        Ok(Self {
            proxy,
            hosts: host_entries(&host_form)?,
        })
    }
}

fn given(v: Option<&str>) -> Option<&str> {
    v.map(str::trim).filter(|v| !v.is_empty())
}

fn host_entries(h: &HostForm<'_>) -> Result<Vec<HostEntry>, String> {
    let Some(list) = given(h.connectors) else {
        for (flag, v) in [("--host-pattern", h.pattern), ("--host-port", h.port)] {
            if given(v).is_some() {
                return Err(format!(
                    "{flag} is set but --host-connectors is not: the host form answers only the connectors an operator lists \
                     (--host-connectors <ns>/<name>[,<ns>/<name>...], or {ENV_HOST_CONNECTORS})"
                ));
            }
        }
        return Ok(Vec::new());
    };
    let pattern = given(h.pattern).unwrap_or(DEFAULT_HOST_PATTERN);
    if pattern.matches("{name}").count() != 1 || pattern.matches("{namespace}").count() != 1 {
        return Err(format!(
            "--host-pattern {pattern:?} must contain {{name}} and {{namespace}} exactly once, \
             e.g. {DEFAULT_HOST_PATTERN} (the same pattern as the filter's proxy.hostPattern and the webhook's --host-pattern)"
        ));
    }
    let port = given(h.port)
        .map(parse_port)
        .transpose()
        .map_err(|e| format!("--host-port: {e}"))?;
    let mut hosts: Vec<HostEntry> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (namespace, name) = item
            .split_once('/')
            .filter(|(ns, name)| is_dns_label(ns) && is_dns_subdomain(name))
            .ok_or_else(|| {
                format!(
                    "--host-connectors: {item:?} is not <namespace>/<name> (a namespace and a Connector name: lowercase letters, digits, '-', and '.' in the name)"
                )
            })?;
        let host = render_host(pattern, namespace, name);
        if !is_dns_subdomain(&host) {
            return Err(format!(
                "--host-pattern {pattern:?} gives {host:?} for {item}, which is not a DNS name \
                 (lowercase letters, digits, '-' and '.')"
            ));
        }
        let entry = HostEntry {
            authority: Authority { host, port },
            namespace: namespace.into(),
            name: name.into(),
        };
        if !hosts.contains(&entry) {
            hosts.push(entry);
        }
    }
    if hosts.is_empty() {
        return Err(
            "--host-connectors is empty: list <ns>/<name>[,<ns>/<name>...], or leave it out to answer only the path form"
                .into(),
        );
    }
    Ok(hosts)
}

/// The plugin's flags (clap), before their environment fallbacks. Values are kept as text here:
/// [`Settings::new`] checks them, with messages that say what was expected.
#[derive(clap::Parser, Debug)]
#[command(name = "connector-credential-provider", disable_version_flag = true)]
struct Flags {
    #[arg(long)]
    proxy: Option<String>,
    #[arg(long)]
    host_connectors: Option<String>,
    #[arg(long)]
    host_pattern: Option<String>,
    #[arg(long)]
    host_port: Option<String>,
    /// Removed (answered every host of the connector shape); kept to explain what replaces it.
    #[arg(long, hide = true)]
    host_suffix: Option<String>,
}

impl Settings {
    /// From the plugin's `args` (as the kubelet's CredentialProviderConfig passes them), each
    /// flag falling back to its environment variable (the config's `env`). `Ok(None)`: `--help`.
    pub fn from_args(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        use clap::Parser as _;
        let flags = match Flags::try_parse_from(
            std::iter::once("connector-credential-provider").chain(args.iter().map(String::as_str)),
        ) {
            Ok(f) => f,
            Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => return Ok(None),
            Err(e) => return Err(clap_message(&e)),
        };
        if flags.host_suffix.is_some() {
            return Err(format!(
                "--host-suffix was removed: it answered every c-<name>-connector.<ns>.<suffix> host, and any namespace can create a \
                 Service of that name to collect the tokens of pods that pull from it. List the connectors whose host-form \
                 names get a token: --host-connectors <ns>/<name>[,<ns>/<name>...] (names from --host-pattern, default \
                 {DEFAULT_HOST_PATTERN}; --host-port if images name a port)"
            ));
        }
        let proxy = flags
            .proxy
            .or_else(|| env(ENV_PROXY))
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| {
                format!("the proxy address is not configured: pass --proxy <host[:port]> or set {ENV_PROXY}")
            })?;
        let connectors = flags.host_connectors.or_else(|| env(ENV_HOST_CONNECTORS));
        let pattern = flags.host_pattern.or_else(|| env(ENV_HOST_PATTERN));
        let port = flags.host_port.or_else(|| env(ENV_HOST_PORT));
        let host_form = HostForm {
            connectors: connectors.as_deref(),
            pattern: pattern.as_deref(),
            port: port.as_deref(),
        };
        Self::new(&proxy, host_form).map(Some)
    }
}

fn clap_message(e: &clap::Error) -> String {
    connector_core::cli::one_line(&e.to_string())
}

/// The fields of the kubelet's request we use (unknown fields ignored, as the kubelet may add
/// some). Read by hand from a `Value` so that no error message can quote a field's value: serde's
/// "invalid type: string ..." would otherwise print whatever was there, possibly a token.
struct Request {
    api_version: Option<String>,
    kind: Option<String>,
    image: Option<String>,
    service_account_token: Option<String>,
}

impl Request {
    fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| Error::NotJson(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::NotJson(format!("a JSON {}, not an object", json_type(&value))))?;
        let field = |name: &str| -> Result<Option<String>, Error> {
            match obj.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(Error::NotJson(format!(
                    "field {name:?} is a JSON {}, expected a string",
                    json_type(other)
                ))),
            }
        };
        Ok(Self {
            api_version: field("apiVersion")?,
            kind: field("kind")?,
            image: field("image")?,
            service_account_token: field("serviceAccountToken")?,
        })
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// `CredentialProviderResponse`. `Debug` hides passwords so a logged response leaks nothing.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub api_version: String,
    pub kind: String,
    /// `Image`, `Registry` or `Global`: the kubelet discards a response with any other value.
    pub cache_key_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_duration: Option<String>,
    pub auth: BTreeMap<String, AuthConfig>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthConfig {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("cache_key_type", &self.cache_key_type)
            .field("cache_duration", &self.cache_duration)
            .field("auth", &self.auth)
            .finish()
    }
}

impl Response {
    /// "No credentials from this provider": the kubelet goes on with other providers and pull
    /// secrets.
    fn empty() -> Self {
        Self {
            api_version: API_VERSION.into(),
            kind: RESPONSE_KIND.into(),
            cache_key_type: "Registry".into(),
            cache_duration: None,
            auth: BTreeMap::new(),
        }
    }
}

/// Why a request gets no response. Messages say what was wrong and what is expected; none
/// carries the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// stdin is not a JSON object of the expected shape.
    NotJson(String),
    WrongApiVersion(Option<String>),
    WrongKind(Option<String>),
    NoImage,
    /// An image of the proxy, but the kubelet sent no ServiceAccount token.
    NoToken {
        image: String,
    },
}

impl Error {
    /// Process exit code for `main`: 2 malformed request, 3 no token. (1 is left to usage errors.)
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NoToken { .. } => 3,
            _ => 2,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotJson(e) => write!(
                f,
                "the request on stdin is not a CredentialProviderRequest JSON object ({e}); expected \
                 {{\"apiVersion\":\"{API_VERSION}\",\"kind\":\"{REQUEST_KIND}\",\"image\":\"...\",\"serviceAccountToken\":\"...\"}}"
            ),
            Error::WrongApiVersion(v) => write!(
                f,
                "request apiVersion is {}, expected {API_VERSION:?}: set apiVersion: {API_VERSION} on this provider in the kubelet's CredentialProviderConfig",
                shown(v)
            ),
            Error::WrongKind(k) => write!(f, "request kind is {}, expected {REQUEST_KIND:?}", shown(k)),
            Error::NoImage => write!(
                f,
                "request has no \"image\" (an image reference such as PROXY/namespaces/<ns>/connectors/<name>/<repo>:<tag>)"
            ),
            Error::NoToken { image } => write!(
                f,
                "no serviceAccountToken in the request for {image:?}: the connector proxy takes the pod's ServiceAccount token as the password. \
                 Either this provider's entry in the kubelet's CredentialProviderConfig (--image-credential-provider-config) lacks \
                 tokenAttributes {{serviceAccountTokenAudience: {AUDIENCE}, cacheType: Token, requireServiceAccount: true}} \
                 (Kubernetes 1.34+, feature KubeletServiceAccountTokenForCredentialProviders, beta and on by default; the node also needs \
                 RBAC verb request-serviceaccounts-token-audience on audience {AUDIENCE}), or the pod has no ServiceAccount. Without a token this provider gives no credentials."
            ),
        }
    }
}

impl std::error::Error for Error {}

fn shown(v: &Option<String>) -> String {
    match v {
        Some(v) => format!("{v:?}"),
        None => "missing".into(),
    }
}

/// Which connector an image names (for tests and messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Path form on the proxy: the auth key is the proxy's `host[:port]`.
    Path { namespace: String, name: String },
    /// Host form: the auth key is the image's own `host[:port]`.
    Host { namespace: String, name: String },
}

/// Decides the response with the system clock.
pub fn respond(request_json: &[u8], settings: &Settings) -> Result<Response, Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    respond_at(request_json, settings, now)
}

/// Decides the response at `now` (Unix seconds).
pub fn respond_at(request_json: &[u8], settings: &Settings, now: u64) -> Result<Response, Error> {
    let req = Request::parse(request_json)?;
    if req.api_version.as_deref() != Some(API_VERSION) {
        return Err(Error::WrongApiVersion(req.api_version));
    }
    if req.kind.as_deref() != Some(REQUEST_KIND) {
        return Err(Error::WrongKind(req.kind));
    }
    let image = req.image.filter(|i| !i.trim().is_empty()).ok_or(Error::NoImage)?;
    let Some((key, _target)) = classify(&image, settings) else {
        return Ok(Response::empty());
    };
    let token = req
        .service_account_token
        .filter(|t| !t.is_empty())
        .ok_or(Error::NoToken { image: image.clone() })?;
    let cache = match token_exp(&token) {
        Some(exp) => cache_secs(exp, now),
        None => UNKNOWN_EXPIRY_CACHE_SECS,
    };
    let mut auth = BTreeMap::new();
    auth.insert(
        key,
        AuthConfig {
            username: USERNAME.into(),
            password: token,
        },
    );
    Ok(Response {
        cache_duration: Some(go_duration(cache)),
        auth,
        ..Response::empty()
    })
}

/// How long the kubelet may reuse a credential whose token expires at `exp`: a little under what
/// remains, never negative.
pub fn cache_secs(exp: u64, now: u64) -> u64 {
    let remaining = exp.saturating_sub(now);
    let margin = (remaining / EXPIRY_MARGIN_DIVISOR).max(MIN_EXPIRY_MARGIN_SECS);
    remaining.saturating_sub(margin)
}

/// The token's `exp` claim, read WITHOUT verifying the signature: only to bound caching. The
/// proxy verifies the token; a forged `exp` here only changes how long the kubelet caches it.
pub fn token_exp(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload) = (parts.next()?, parts.next()?);
    parts.next()?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .or_else(|_| URL_SAFE.decode(payload))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = &claims["exp"];
    exp.as_u64()
        .or_else(|| exp.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64))
}

/// `metav1.Duration` text as Go prints it (`54m0s`, `1h0m0s`, `0s`); the kubelet parses it with
/// `time.ParseDuration`.
pub fn go_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// The auth key and connector when `image` is the proxy's; None for any other registry, and for
/// a reference the runtime could not pull either (`connector_core::reference`'s grammar, the
/// webhook's). A reference without a registry (`nginx`) is Docker Hub's, never the proxy's.
pub fn classify(image: &str, settings: &Settings) -> Option<(String, Target)> {
    // The kubelet's matcher tolerates a scheme in front of an image; the reference grammar not.
    let image = image.trim();
    let image = ["docker://", "https://", "http://"]
        .iter()
        .find_map(|p| image.strip_prefix(p))
        .unwrap_or(image);
    let parsed = connector_core::reference::ImageRef::parse(image).ok()?;
    let authority = Authority::parse(&parsed.registry).ok()?;
    let path = parsed.repository.as_str();
    if authority == settings.proxy {
        let rest = path.strip_prefix("namespaces/")?;
        let (namespace, rest) = rest.split_once('/')?;
        let rest = rest.strip_prefix("connectors/")?;
        let (name, repo) = rest.split_once('/')?;
        if !is_dns_label(namespace) || !is_dns_label(name) || repo.is_empty() {
            return None;
        }
        return Some((
            settings.proxy.to_string(),
            Target::Path {
                namespace: namespace.into(),
                name: name.into(),
            },
        ));
    }
    let entry = settings.hosts.iter().find(|h| h.authority == authority)?;
    Some((
        authority.to_string(),
        Target::Host {
            namespace: entry.namespace.clone(),
            name: entry.name.clone(),
        },
    ))
}

#[cfg(test)]
mod tests;
