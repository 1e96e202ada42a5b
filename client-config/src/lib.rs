//! Owns the client side of one connector (issue 5, "Client configuration"): the files that make
//! docker, containerd, BuildKit and the containers/image tools (CRI-O, podman, skopeo, buildah)
//! reach the upstream registry through the proxy, logging in with a ServiceAccount token.
//!
//! Every renderer is a pure function from [`ClientSettings`] to a [`Rendered`] file: its text,
//! where it goes under the output directory, where a real consumer reads it, and notes for the
//! human installing it. [`write_all`] is the only part that touches the disk.
//!
//! Two ways to aim a client at the proxy, chosen per format by what the client supports:
//! - the path form `PROXY/namespaces/<ns>/connectors/<name>/<repo>`, which the client is told to
//!   use *in place of the upstream's name* (containerd `override_path`, registries.conf
//!   `location`, BuildKit mirrors with a path), so image references keep naming the upstream;
//! - the proxy's own name (docker `config.json`, `daemon.json`), where the user writes path-form
//!   references themselves.
//!
//! The token is a secret: it appears only in `config.json` (written 0600), never in `Debug`.
//!
//! The proxy speaks TLS: with the CA that issued its certificate (`proxy_ca`), each client gets
//! the trust it reads, next to its file: containerd's `ca` in `hosts.toml`, the containers
//! tools' `certs.d/<proxy>/ca.crt`, BuildKit's `ca`, Docker's `certs.d/<proxy>/ca.crt`; and no
//! `insecure` / `skip_verify` / `http` anywhere unless the proxy is plain http or `skip_verify`.

use connector_core::names::is_dns_label;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};
use toml::Table;

/// The user name put next to the token. The proxy ignores it (any user name is accepted); a
/// fixed, descriptive one makes the credential's nature obvious in `docker info` and logs.
pub const USERNAME: &str = "serviceaccount";

/// Why settings cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientConfigError {
    #[error("proxy address {0:?}: expected http(s)://host[:port] without a path")]
    Proxy(String),
    #[error("upstream address {0:?}: expected [http(s)://]host[:port] without a path")]
    Upstream(String),
    #[error("connector {0:?}: expected a DNS label (lowercase letters, digits, '-')")]
    Name(String),
    #[error("host name {0:?}: expected a DNS name")]
    HostName(String),
    #[error("the token is empty or contains whitespace or control characters")]
    Token,
    #[error("unknown format {0:?}: expected one of docker, containerd, buildkit, registries, daemon")]
    Format(String),
    #[error("writing TOML failed: {0}")]
    Toml(String),
}

/// One client file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// docker `config.json` (also read by skopeo/podman/buildah as `--authfile`, and by BuildKit).
    Docker,
    /// containerd `certs.d/<upstream>/hosts.toml`.
    Containerd,
    /// `buildkitd.toml`.
    Buildkit,
    /// containers-registries.conf(5) v2, for CRI-O, podman, skopeo, buildah.
    Registries,
    /// docker `daemon.json`.
    Daemon,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::Docker,
        Format::Containerd,
        Format::Buildkit,
        Format::Registries,
        Format::Daemon,
    ];

    /// The CLI spelling: `docker`, `containerd`, `buildkit`, `registries`, `daemon`.
    pub fn parse(s: &str) -> Result<Format, ClientConfigError> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| ClientConfigError::Format(s.to_string()))
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Docker => "docker",
            Format::Containerd => "containerd",
            Format::Buildkit => "buildkit",
            Format::Registries => "registries",
            Format::Daemon => "daemon",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the files are rendered from. `Debug` hides the token.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// The connector's namespace and name.
    pub namespace: String,
    pub name: String,
    /// The connector's `spec.address`: `[http(s)://]host[:port]` (no scheme means https).
    pub upstream: String,
    /// The proxy's external address, `http(s)://host[:port]`.
    pub proxy: String,
    /// The connector's host-form name (`c-<name>-connector.<ns>.svc.cluster.local`), when the
    /// client can resolve it to the proxy. Only Docker's Hub mirror uses it: Docker refuses
    /// mirrors with a path.
    pub host_name: Option<String>,
    /// A ServiceAccount token to store in `config.json`; without one the entry is left for
    /// `docker login`.
    pub token: Option<String>,
    /// The proxy is https with a certificate the client cannot verify: mark it insecure /
    /// `skip_verify` everywhere. (An http proxy is always marked plain-http / insecure.)
    pub skip_verify: bool,
    /// The CA certificate(s) (PEM) the proxy's certificate chains to, when clients do not trust
    /// it already: written where each client reads it.
    pub proxy_ca: Option<String>,
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSettings")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("upstream", &self.upstream)
            .field("proxy", &self.proxy)
            .field("host_name", &self.host_name)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("skip_verify", &self.skip_verify)
            .field("proxy_ca", &self.proxy_ca.as_ref().map(|_| "<PEM>"))
            .finish()
    }
}

/// One rendered file.
#[derive(Clone, PartialEq, Eq)]
pub struct Rendered {
    pub format: Format,
    /// Where [`write_all`] puts it, relative to the output directory.
    pub relative_path: PathBuf,
    /// Where its consumer reads it on a machine, for the human installing it.
    pub install_to: String,
    pub text: String,
    /// Holds a credential: written 0600.
    pub secret: bool,
    /// What the human must know (login, merging, limits of the format).
    pub notes: Vec<String>,
}

impl fmt::Debug for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text: &str = if self.secret { "<redacted>" } else { &self.text };
        f.debug_struct("Rendered")
            .field("format", &self.format)
            .field("relative_path", &self.relative_path)
            .field("install_to", &self.install_to)
            .field("text", &text)
            .field("secret", &self.secret)
            .field("notes", &self.notes)
            .finish()
    }
}

/// The settings, checked and taken apart once for every renderer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoints {
    /// `host[:port]` of the proxy, as clients name it.
    proxy: String,
    proxy_tls: bool,
    /// The client must not verify the proxy's TLS (or it is plain http).
    proxy_insecure: bool,
    /// The registry name clients use for the upstream (`docker.io` for Docker Hub).
    upstream_name: String,
    /// The upstream's API origin, `https://registry-1.docker.io` for Docker Hub.
    upstream_origin: String,
    /// `namespaces/<ns>/connectors/<name>`.
    connector_path: String,
}

impl Endpoints {
    fn new(s: &ClientSettings) -> Result<Self, ClientConfigError> {
        for label in [&s.namespace, &s.name] {
            if !is_dns_label(label) {
                return Err(ClientConfigError::Name(format!("{}/{}", s.namespace, s.name)));
            }
        }
        if let Some(h) = &s.host_name
            && !(h.split('.').all(is_dns_label))
        {
            return Err(ClientConfigError::HostName(h.clone()));
        }
        if let Some(t) = &s.token
            && (t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ClientConfigError::Token);
        }
        let (scheme, proxy) = split_address(&s.proxy).ok_or_else(|| ClientConfigError::Proxy(s.proxy.clone()))?;
        let proxy_tls = match scheme {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(ClientConfigError::Proxy(s.proxy.clone())),
        };
        let (up_scheme, up) =
            split_address(&s.upstream).ok_or_else(|| ClientConfigError::Upstream(s.upstream.clone()))?;
        let up_scheme = match up_scheme {
            None | Some("https") => "https",
            Some("http") => "http",
            Some(_) => return Err(ClientConfigError::Upstream(s.upstream.clone())),
        };
        let (upstream_name, upstream_origin) = if connector_core::registry::is_docker_hub(&up) {
            ("docker.io".to_string(), "https://registry-1.docker.io".to_string())
        } else {
            (up.clone(), format!("{up_scheme}://{up}"))
        };
        Ok(Self {
            proxy,
            proxy_tls,
            proxy_insecure: !proxy_tls || s.skip_verify,
            upstream_name,
            upstream_origin,
            connector_path: format!("namespaces/{}/connectors/{}", s.namespace, s.name),
        })
    }

    fn proxy_origin(&self) -> String {
        let scheme = if self.proxy_tls { "https" } else { "http" };
        format!("{scheme}://{}", self.proxy)
    }

    /// Clients must be given the proxy's CA: an https proxy they verify, with a CA to verify by.
    fn gives_ca(&self, s: &ClientSettings) -> bool {
        self.proxy_tls && !s.skip_verify && s.proxy_ca.is_some()
    }

    /// `<proxy host:port>/namespaces/<ns>/connectors/<name>`: a registry "name" with a path,
    /// as registries.conf and BuildKit mirrors take it.
    fn proxy_path_name(&self) -> String {
        format!("{}/{}", self.proxy, self.connector_path)
    }
}

/// `[scheme://]host[:port][/]` → (scheme, `host[:port]`); `None` when a path, user info, query
/// or an unusable host is present.
fn split_address(addr: &str) -> Option<(Option<&str>, String)> {
    let (scheme, rest) = match addr.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, addr),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || authority
            .chars()
            .any(|c| matches!(c, '/' | '@' | '?' | '#' | '"' | '\\') || c.is_whitespace() || c.is_control())
    {
        return None;
    }
    // host, [v6]:port or host:port with a numeric port.
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (_, after) = v6.split_once(']')?;
        (authority, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    if let Some(p) = port
        && p.parse::<u16>().ok().filter(|p| *p != 0).is_none()
    {
        return None;
    }
    Some((scheme, authority.to_ascii_lowercase()))
}

/// A comment header, then the document as the `toml` crate writes it (every name and URL quoted
/// as TOML requires).
fn toml_text(header: &str, doc: &Table) -> Result<String, ClientConfigError> {
    let body = toml::to_string(doc).map_err(|e| ClientConfigError::Toml(e.to_string()))?;
    Ok(format!("{header}{body}"))
}

fn json_text(v: &Value) -> String {
    // Serializing a Value cannot fail (string keys only).
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// docker `config.json`: an `auths` entry for the proxy's `host:port`.
///
/// With a token, `auth` is base64(`serviceaccount:<token>`): docker, podman, skopeo, buildah and
/// BuildKit all send it as Basic credentials after the proxy's challenge. Without one, the entry
/// is an empty object: Docker treats it as "no credentials" and `docker login` fills it in, so the
/// file stays valid and names the registry it is for; the note tells how to log in. Tokens expire
/// (1 h by default), so a stored one has to be refreshed.
pub fn docker_config(s: &ClientSettings) -> Result<Rendered, ClientConfigError> {
    let e = Endpoints::new(s)?;
    let entry = match &s.token {
        Some(t) => {
            let auth = connector_core::basic::encode_pair(USERNAME, t);
            json!({ "auth": auth })
        }
        None => json!({}),
    };
    let mut auths = Map::new();
    auths.insert(e.proxy.clone(), entry);
    let mut notes = vec![format!(
        "image references name the proxy in path form: {}/<repo>:<tag>",
        e.proxy_path_name()
    )];
    if s.token.is_some() {
        notes.push(
            "the token expires (1 h by default for `kubectl create token`): render again or `docker login` with a fresh one"
                .into(),
        );
    } else {
        notes.push(format!(
            "no token stored: kubectl create token <serviceaccount> -n {} --audience oci-connector | docker login {} -u {USERNAME} --password-stdin",
            s.namespace, e.proxy
        ));
    }
    Ok(Rendered {
        format: Format::Docker,
        relative_path: PathBuf::from("docker/config.json"),
        install_to: "~/.docker/config.json (or $DOCKER_CONFIG/config.json; skopeo/podman --authfile)".into(),
        text: json_text(&json!({ "auths": auths })),
        secret: s.token.is_some(),
        notes,
    })
}

/// containerd `hosts.toml` for the *upstream's* name: pulls of `<upstream>/<repo>` go to
/// `<proxy>/v2/namespaces/<ns>/connectors/<name>/<repo>/...` (`override_path = true` makes
/// containerd use the host URL's path instead of adding `/v2`), pull and resolve only.
///
/// `server` is the proxy as well, not the upstream: containerd falls back to `server` when a
/// `[host]` fails, and with the upstream there a pull the connector refuses (403) was retried
/// against the upstream with the client's `serviceaccount:<token>` as Basic credentials (seen in
/// `tests/client_config.rs`). The upstream's origin stays in a comment for the human. The cost:
/// a failing pull is tried twice against the proxy.
///
/// containerd takes `http://` in the URL as plain HTTP; `skip_verify` is for an https proxy
/// whose certificate cannot be verified. Credentials come from the CRI (pull secret, credential
/// provider) or `ctr --user`, never from this file.
pub fn containerd_hosts(s: &ClientSettings) -> Result<Rendered, ClientConfigError> {
    let e = Endpoints::new(s)?;
    let url = format!("{}/v2/{}", e.proxy_origin(), e.connector_path);
    // The same settings for `server` and its one `[host]`.
    let mut settings = Table::new();
    settings.insert("capabilities".into(), toml::Value::from(vec!["pull", "resolve"]));
    settings.insert("override_path".into(), true.into());
    if e.proxy_tls && s.skip_verify {
        settings.insert("skip_verify".into(), true.into());
    } else if e.gives_ca(s) {
        // Relative: containerd reads it beside this hosts.toml (see containerd_ca_file).
        settings.insert("ca".into(), "proxy-ca.crt".into());
    }
    let mut doc = Table::new();
    doc.insert("server".into(), url.clone().into());
    doc.extend(settings.clone());
    doc.insert("host".into(), Table::from_iter([(url, settings.into())]).into());
    let text = toml_text(
        &format!(
            "# Pulls of {name} ({origin}) go through the connector {ns}/{conn}.\n\
             # server is the proxy too: containerd falls back to server, and the upstream must never\n\
             # receive the ServiceAccount token.\n",
            name = e.upstream_name,
            origin = e.upstream_origin,
            ns = s.namespace,
            conn = s.name,
        ),
        &doc,
    )?;
    Ok(Rendered {
        format: Format::Containerd,
        relative_path: PathBuf::from("certs.d").join(&e.upstream_name).join("hosts.toml"),
        install_to: format!(
            "/etc/containerd/certs.d/{}/hosts.toml (config_path of the CRI registry; ctr --hosts-dir)",
            e.upstream_name
        ),
        text,
        secret: false,
        notes: vec![format!(
            "clients log in with any user name and the ServiceAccount token as password, e.g. ctr images pull --hosts-dir <dir> --user {USERNAME}:$TOKEN {}/<repo>:<tag>",
            e.upstream_name
        )],
    })
}

/// `buildkitd.toml`: the upstream's name gets the proxy's path form as a mirror (BuildKit puts
/// `/v2` in front of a mirror's path), and the proxy's `host:port` gets `http = true` for a plain
/// http proxy or `insecure = true` for an unverifiable certificate. BuildKit reads credentials
/// from the client's docker `config.json`, keyed by the mirror's `host:port`.
pub fn buildkitd(s: &ClientSettings) -> Result<Rendered, ClientConfigError> {
    let e = Endpoints::new(s)?;
    let mut registries = Table::new();
    registries.insert(
        e.upstream_name.clone(),
        Table::from_iter([("mirrors".to_string(), toml::Value::from(vec![e.proxy_path_name()]))]).into(),
    );
    let proxy_section = if e.proxy_insecure && e.proxy_tls {
        Some(Table::from_iter([("insecure".to_string(), true.into())]))
    } else if e.proxy_insecure {
        Some(Table::from_iter([
            ("http".to_string(), true.into()),
            ("insecure".to_string(), true.into()),
        ]))
    } else if e.gives_ca(s) {
        let ca = format!("{BUILDKIT_CERTS}/{}/ca.crt", e.proxy);
        Some(Table::from_iter([("ca".to_string(), toml::Value::from(vec![ca]))]))
    } else {
        None
    };
    if let Some(section) = proxy_section {
        registries.insert(e.proxy.clone(), section.into());
    }
    let text = toml_text(
        &format!(
            "# Pulls of {} go through the connector {}/{}.\n",
            e.upstream_name, s.namespace, s.name
        ),
        &Table::from_iter([("registry".to_string(), registries.into())]),
    )?;
    Ok(Rendered {
        format: Format::Buildkit,
        relative_path: PathBuf::from("buildkitd.toml"),
        install_to: "/etc/buildkit/buildkitd.toml (merge into an existing one)".into(),
        text,
        secret: false,
        notes: vec![format!(
            "BuildKit mirrors only pull; credentials for {} come from the docker config.json",
            e.proxy
        )],
    })
}

/// containers-registries.conf(5) v2: references under the upstream's name are rewritten to the
/// proxy's path form (`prefix` → `location`), so CRI-O, podman, skopeo and buildah pull the
/// upstream's images by their usual name. `insecure = true` for an http proxy (or an
/// unverifiable certificate). Credentials: the `config.json` entry for the proxy's `host:port`.
pub fn registries_conf(s: &ClientSettings) -> Result<Rendered, ClientConfigError> {
    let e = Endpoints::new(s)?;
    let mut registry = Table::new();
    registry.insert("prefix".into(), e.upstream_name.clone().into());
    registry.insert("location".into(), e.proxy_path_name().into());
    if e.proxy_insecure {
        registry.insert("insecure".into(), true.into());
    }
    let text = toml_text(
        &format!(
            "# Pulls of {} go through the connector {}/{}.\n",
            e.upstream_name, s.namespace, s.name
        ),
        &Table::from_iter([("registry".to_string(), toml::Value::Array(vec![registry.into()]))]),
    )?;
    Ok(Rendered {
        format: Format::Registries,
        relative_path: PathBuf::from("registries.conf"),
        install_to: format!(
            "/etc/containers/registries.conf.d/50-connector-{}-{}.conf",
            s.namespace, s.name
        ),
        text,
        secret: false,
        notes: vec!["a drop-in: it is a complete v2 file too (skopeo/podman CONTAINERS_REGISTRIES_CONF)".into()],
    })
}

/// Where BuildKit is told to read the proxy's CA (`buildkitd.toml`'s `ca` needs an absolute path).
pub const BUILDKIT_CERTS: &str = "/etc/buildkit/certs";

/// The proxy's CA, one copy per client that reads it from its own place (`None` when the
/// clients need none: a plain-http or unverified proxy, or no CA given). Installed as the notes
/// say; [`write_all`] writes them next to the format's own file.
pub fn ca_files(s: &ClientSettings, format: Format) -> Result<Vec<Rendered>, ClientConfigError> {
    let e = Endpoints::new(s)?;
    let (Some(ca), true) = (&s.proxy_ca, e.gives_ca(s)) else {
        return Ok(vec![]);
    };
    let file = |relative: String, install: String| Rendered {
        format,
        relative_path: PathBuf::from(relative),
        install_to: install,
        text: ca.clone(),
        secret: false,
        notes: vec!["the CA the proxy's certificate chains to".into()],
    };
    Ok(match format {
        Format::Docker => vec![],
        Format::Containerd => vec![file(
            format!("certs.d/{}/proxy-ca.crt", e.upstream_name),
            format!(
                "/etc/containerd/certs.d/{}/proxy-ca.crt (beside hosts.toml)",
                e.upstream_name
            ),
        )],
        Format::Registries => vec![file(
            format!("containers/certs.d/{}/ca.crt", e.proxy),
            format!("/etc/containers/certs.d/{}/ca.crt", e.proxy),
        )],
        Format::Buildkit => vec![file(
            format!("buildkit/certs/{}/ca.crt", e.proxy),
            format!("{BUILDKIT_CERTS}/{}/ca.crt", e.proxy),
        )],
        Format::Daemon => {
            let mut hosts = vec![e.proxy.clone()];
            if let (Some(h), "docker.io") = (&s.host_name, e.upstream_name.as_str()) {
                let port = e
                    .proxy
                    .rsplit_once(':')
                    .map(|(_, p)| format!(":{p}"))
                    .unwrap_or_default();
                hosts.push(format!("{h}{port}"));
            }
            hosts
                .into_iter()
                .map(|h| {
                    file(
                        format!("docker/certs.d/{h}/ca.crt"),
                        format!("/etc/docker/certs.d/{h}/ca.crt"),
                    )
                })
                .collect()
        }
    })
}

/// docker `daemon.json`: the proxy in `insecure-registries` when it is plain http (or its
/// certificate cannot be verified). Docker mirrors only Docker Hub (`registry-mirrors`) and
/// refuses a mirror URL with a path, so a Hub connector is mirrored through its host-form name
/// when one is given; every other upstream is reached by writing path-form references.
pub fn daemon_json(s: &ClientSettings) -> Result<Rendered, ClientConfigError> {
    let e = Endpoints::new(s)?;
    let mut doc = Map::new();
    let mut insecure = Vec::new();
    let mut notes = vec![format!(
        "merge into an existing daemon.json and restart dockerd; Docker mirrors only Docker Hub, so pull other registries' images as {}/<repo>:<tag>",
        e.proxy_path_name()
    )];
    if e.proxy_insecure {
        insecure.push(Value::String(e.proxy.clone()));
    }
    if e.upstream_name == "docker.io" {
        match &s.host_name {
            Some(h) => {
                let port = e
                    .proxy
                    .rsplit_once(':')
                    .map(|(_, p)| format!(":{p}"))
                    .unwrap_or_default();
                let scheme = if e.proxy_tls { "https" } else { "http" };
                let mirror_host = format!("{h}{port}");
                if e.proxy_insecure {
                    insecure.push(Value::String(mirror_host.clone()));
                }
                doc.insert("registry-mirrors".into(), json!([format!("{scheme}://{mirror_host}")]));
                notes.push(format!(
                    "{h} must resolve to the proxy; Docker sends no credentials to mirrors, so mirrored pulls are anonymous to the proxy and are refused unless docker login {mirror_host} is done"
                ));
            }
            None => notes.push(
                "no host-form name given: Docker Hub cannot be mirrored (Docker refuses mirrors with a path)".into(),
            ),
        }
    }
    if !insecure.is_empty() {
        doc.insert("insecure-registries".into(), Value::Array(insecure));
    }
    Ok(Rendered {
        format: Format::Daemon,
        relative_path: PathBuf::from("docker/daemon.json"),
        install_to: "/etc/docker/daemon.json (merge)".into(),
        text: json_text(&Value::Object(doc)),
        secret: false,
        notes,
    })
}

/// A token file's content without the trailing newline `kubectl create token > F` leaves; a
/// mounted projected token has none. Empty is `InvalidData`.
pub fn read_token_file(path: &Path) -> std::io::Result<String> {
    let t = std::fs::read_to_string(path)?.trim().to_string();
    if t.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} holds no token", path.display()),
        ));
    }
    Ok(t)
}

/// One format's file.
pub fn render(s: &ClientSettings, format: Format) -> Result<Rendered, ClientConfigError> {
    match format {
        Format::Docker => docker_config(s),
        Format::Containerd => containerd_hosts(s),
        Format::Buildkit => buildkitd(s),
        Format::Registries => registries_conf(s),
        Format::Daemon => daemon_json(s),
    }
}

/// Renders `formats` (all of them when empty) and writes them under `out`, creating
/// directories; files holding a token are created 0600. Returns the written paths in the order
/// of `formats`, each format's file before its CA copies ([`ca_files`]). Invalid settings are `InvalidInput`; nothing is written then.
pub fn write_all(settings: &ClientSettings, formats: &[Format], out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let formats: &[Format] = if formats.is_empty() { &Format::ALL } else { formats };
    let rendered = formats
        .iter()
        .map(|f| {
            let mut all = vec![render(settings, *f)?];
            all.extend(ca_files(settings, *f)?);
            Ok(all)
        })
        .collect::<Result<Vec<Vec<_>>, ClientConfigError>>()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?
        .into_iter()
        .flatten();
    let mut written = Vec::new();
    for r in rendered {
        let path = out.join(&r.relative_path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_file(&path, r.text.as_bytes(), r.secret)?;
        written.push(path);
    }
    Ok(written)
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    if secret {
        // An existing file keeps its mode on open: tighten it before the token goes in.
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rendered TOML file read back as its consumer would.
    fn parsed(r: &Rendered) -> Table {
        toml::from_str(&r.text).unwrap_or_else(|e| panic!("{}: {e}\n{}", r.relative_path.display(), r.text))
    }

    fn http_settings() -> ClientSettings {
        ClientSettings {
            namespace: "demo".into(),
            name: "registry".into(),
            upstream: "https://harbor.example.com:8443/".into(),
            proxy: "http://10.0.0.5:31567".into(),
            host_name: None,
            token: Some("eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into()),
            skip_verify: false,
            proxy_ca: None,
        }
    }

    fn https_settings() -> ClientSettings {
        ClientSettings {
            proxy: "https://proxy.example.com".into(),
            ..http_settings()
        }
    }

    fn hub_settings() -> ClientSettings {
        ClientSettings {
            upstream: "https://registry-1.docker.io".into(),
            host_name: Some("c-registry-connector.demo.svc.cluster.local".into()),
            ..http_settings()
        }
    }

    fn json(r: &Rendered) -> Value {
        serde_json::from_str(&r.text).expect("valid JSON")
    }

    #[test]
    fn formats_parse_by_their_cli_names() {
        for (s, f) in [
            ("docker", Format::Docker),
            ("containerd", Format::Containerd),
            ("buildkit", Format::Buildkit),
            ("registries", Format::Registries),
            ("daemon", Format::Daemon),
        ] {
            assert_eq!(Format::parse(s), Ok(f));
            assert_eq!(f.to_string(), s);
        }
        for bad in ["", "Docker", "podman", "docker "] {
            assert_eq!(Format::parse(bad), Err(ClientConfigError::Format(bad.into())));
        }
    }

    #[test]
    fn docker_config_stores_serviceaccount_and_token_for_the_proxy() {
        let r = docker_config(&http_settings()).unwrap();
        assert_eq!(r.relative_path, Path::new("docker/config.json"));
        assert!(r.secret);
        let v = json(&r);
        let auths = v["auths"].as_object().unwrap();
        assert_eq!(auths.len(), 1);
        let auth = auths["10.0.0.5:31567"]["auth"].as_str().unwrap();
        let decoded = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, auth).unwrap();
        assert_eq!(decoded, b"serviceaccount:eyJhbGciOiJSUzI1NiJ9.e30.c2ln".to_vec());
        assert_eq!(v.as_object().unwrap().len(), 1, "only auths: {v}");
    }

    #[test]
    fn docker_config_without_token_leaves_an_empty_entry_for_docker_login() {
        let s = ClientSettings {
            token: None,
            ..http_settings()
        };
        let r = docker_config(&s).unwrap();
        assert!(!r.secret);
        assert_eq!(json(&r), json!({"auths": {"10.0.0.5:31567": {}}}));
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains("docker login 10.0.0.5:31567 -u serviceaccount --password-stdin")),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn containerd_hosts_points_the_upstream_name_at_the_proxy_path() {
        let r = containerd_hosts(&http_settings()).unwrap();
        assert_eq!(r.relative_path, Path::new("certs.d/harbor.example.com:8443/hosts.toml"));
        assert!(r.text.starts_with(
            "# Pulls of harbor.example.com:8443 (https://harbor.example.com:8443) go through the connector demo/registry.\n\
             # server is the proxy too: containerd falls back to server, and the upstream must never\n\
             # receive the ServiceAccount token.\n"
        ));
        assert_eq!(
            parsed(&r),
            toml::toml! {
                server = "http://10.0.0.5:31567/v2/namespaces/demo/connectors/registry"
                capabilities = ["pull", "resolve"]
                override_path = true
                [host."http://10.0.0.5:31567/v2/namespaces/demo/connectors/registry"]
                capabilities = ["pull", "resolve"]
                override_path = true
            }
        );
        assert!(!r.secret);
        assert!(!r.text.contains("eyJ"), "no token in hosts.toml");
    }

    #[test]
    fn containerd_hosts_skip_verify_only_for_an_unverifiable_https_proxy() {
        let verified = containerd_hosts(&https_settings()).unwrap();
        assert!(
            verified
                .text
                .contains("[host.\"https://proxy.example.com/v2/namespaces/demo/connectors/registry\"]")
        );
        assert!(!verified.text.contains("skip_verify"));
        let unverified = containerd_hosts(&ClientSettings {
            skip_verify: true,
            proxy_ca: None,
            ..https_settings()
        })
        .unwrap();
        let doc = parsed(&unverified);
        let url = "https://proxy.example.com/v2/namespaces/demo/connectors/registry";
        assert_eq!(doc["skip_verify"].as_bool(), Some(true), "{doc}");
        assert_eq!(doc["host"][url]["skip_verify"].as_bool(), Some(true), "{doc}");
    }

    #[test]
    fn containerd_hosts_has_no_route_to_the_upstream() {
        for s in [http_settings(), https_settings(), hub_settings()] {
            let r = containerd_hosts(&s).unwrap();
            let urls: Vec<&str> = r
                .text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| l.contains("://"))
                .collect();
            assert_eq!(urls.len(), 2, "{}", r.text);
            assert!(
                urls.iter()
                    .all(|l| l.contains("/v2/namespaces/demo/connectors/registry\"")),
                "only the proxy path: {urls:?}"
            );
        }
    }

    #[test]
    fn docker_hub_is_named_docker_io_with_its_api_host_as_origin() {
        let r = containerd_hosts(&hub_settings()).unwrap();
        assert_eq!(r.relative_path, Path::new("certs.d/docker.io/hosts.toml"));
        assert!(
            r.text
                .starts_with("# Pulls of docker.io (https://registry-1.docker.io) go")
        );
        let reg = registries_conf(&hub_settings()).unwrap();
        assert!(reg.text.contains("prefix = \"docker.io\"\n"));
    }

    #[test]
    fn upstream_without_scheme_is_https_and_http_is_kept() {
        for (addr, server) in [
            ("harbor.example.com", "https://harbor.example.com"),
            ("http://10.1.2.3:5000", "http://10.1.2.3:5000"),
        ] {
            let r = containerd_hosts(&ClientSettings {
                upstream: addr.into(),
                ..http_settings()
            })
            .unwrap();
            assert!(r.text.contains(&format!(" ({server}) go")), "{}", r.text);
        }
    }

    #[test]
    fn buildkitd_mirrors_the_upstream_and_marks_an_http_proxy() {
        let r = buildkitd(&http_settings()).unwrap();
        assert_eq!(r.relative_path, Path::new("buildkitd.toml"));
        assert!(
            r.text
                .starts_with("# Pulls of harbor.example.com:8443 go through the connector demo/registry.\n")
        );
        assert_eq!(
            parsed(&r),
            toml::toml! {
                [registry."harbor.example.com:8443"]
                mirrors = ["10.0.0.5:31567/namespaces/demo/connectors/registry"]
                [registry."10.0.0.5:31567"]
                http = true
                insecure = true
            }
        );
    }

    #[test]
    fn buildkitd_https_proxy_needs_no_section_unless_unverifiable() {
        let r = buildkitd(&https_settings()).unwrap();
        assert!(!r.text.contains("[registry.\"proxy.example.com\"]"), "{}", r.text);
        assert!(!r.text.contains("http = true"));
        let r = buildkitd(&ClientSettings {
            skip_verify: true,
            proxy_ca: None,
            ..https_settings()
        })
        .unwrap();
        assert_eq!(
            parsed(&r)["registry"]["proxy.example.com"],
            toml::Value::Table(toml::toml! { insecure = true }),
            "{}",
            r.text
        );
        assert!(!r.text.contains("http = true"));
    }

    #[test]
    fn registries_conf_rewrites_the_upstream_prefix_to_the_proxy_path() {
        let r = registries_conf(&http_settings()).unwrap();
        assert!(
            r.text
                .starts_with("# Pulls of harbor.example.com:8443 go through the connector demo/registry.\n")
        );
        assert_eq!(
            parsed(&r),
            toml::toml! {
                [[registry]]
                prefix = "harbor.example.com:8443"
                location = "10.0.0.5:31567/namespaces/demo/connectors/registry"
                insecure = true
            }
        );
        let tls = registries_conf(&https_settings()).unwrap();
        assert!(!tls.text.contains("insecure"), "{}", tls.text);
        assert!(
            tls.text
                .contains("location = \"proxy.example.com/namespaces/demo/connectors/registry\"\n")
        );
    }

    #[test]
    fn daemon_json_lists_an_http_proxy_as_insecure_and_mirrors_only_the_hub() {
        let r = daemon_json(&http_settings()).unwrap();
        assert_eq!(json(&r), json!({"insecure-registries": ["10.0.0.5:31567"]}));
        assert_eq!(json(&daemon_json(&https_settings()).unwrap()), json!({}));
        let hub = daemon_json(&hub_settings()).unwrap();
        assert_eq!(
            json(&hub),
            json!({
                "insecure-registries": [
                    "10.0.0.5:31567",
                    "c-registry-connector.demo.svc.cluster.local:31567"
                ],
                "registry-mirrors": ["http://c-registry-connector.demo.svc.cluster.local:31567"]
            })
        );
        let hub_without_name = daemon_json(&ClientSettings {
            host_name: None,
            ..hub_settings()
        })
        .unwrap();
        assert!(json(&hub_without_name).get("registry-mirrors").is_none());
    }

    #[test]
    fn bad_settings_are_refused_with_what_is_wrong() {
        let cases: Vec<(ClientSettings, ClientConfigError)> = vec![
            (
                ClientSettings {
                    proxy: "10.0.0.5:31567".into(),
                    ..http_settings()
                },
                ClientConfigError::Proxy("10.0.0.5:31567".into()),
            ),
            (
                ClientSettings {
                    proxy: "http://10.0.0.5:31567/namespaces/demo".into(),
                    ..http_settings()
                },
                ClientConfigError::Proxy("http://10.0.0.5:31567/namespaces/demo".into()),
            ),
            (
                ClientSettings {
                    proxy: "ftp://10.0.0.5".into(),
                    ..http_settings()
                },
                ClientConfigError::Proxy("ftp://10.0.0.5".into()),
            ),
            (
                ClientSettings {
                    proxy: "http://10.0.0.5:99999".into(),
                    ..http_settings()
                },
                ClientConfigError::Proxy("http://10.0.0.5:99999".into()),
            ),
            (
                ClientSettings {
                    upstream: "https://harbor.example.com/v2".into(),
                    ..http_settings()
                },
                ClientConfigError::Upstream("https://harbor.example.com/v2".into()),
            ),
            (
                ClientSettings {
                    upstream: "https://u:p@harbor.example.com".into(),
                    ..http_settings()
                },
                ClientConfigError::Upstream("https://u:p@harbor.example.com".into()),
            ),
            (
                ClientSettings {
                    name: "Registry".into(),
                    ..http_settings()
                },
                ClientConfigError::Name("demo/Registry".into()),
            ),
            (
                ClientSettings {
                    namespace: "".into(),
                    ..http_settings()
                },
                ClientConfigError::Name("/registry".into()),
            ),
            (
                ClientSettings {
                    host_name: Some("c-registry-connector..svc".into()),
                    ..http_settings()
                },
                ClientConfigError::HostName("c-registry-connector..svc".into()),
            ),
            (
                ClientSettings {
                    token: Some("abc\n".into()),
                    ..http_settings()
                },
                ClientConfigError::Token,
            ),
            (
                ClientSettings {
                    token: Some(String::new()),
                    ..http_settings()
                },
                ClientConfigError::Token,
            ),
        ];
        for (s, want) in cases {
            for f in Format::ALL {
                assert_eq!(render(&s, f), Err(want.clone()), "{f} with {s:?}");
            }
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let s = http_settings();
        assert!(!format!("{s:?}").contains("c2ln"));
        let r = docker_config(&s).unwrap();
        assert!(!format!("{r:?}").contains(&r.text));
        let hosts = containerd_hosts(&s).unwrap();
        assert!(format!("{hosts:?}").contains("override_path"));
    }

    #[test]
    fn toml_text_quotes_what_toml_requires() {
        let odd = "a\"b\\c\u{7}]#";
        let doc = Table::from_iter([(odd.to_string(), toml::Value::from(odd))]);
        let text = toml_text("# header\n", &doc).unwrap();
        assert!(text.starts_with("# header\n"));
        let back: Table = toml::from_str(&text).unwrap();
        assert_eq!(back, doc, "{text}");
    }

    #[test]
    fn write_all_writes_every_format_and_the_token_file_0600() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_all(&http_settings(), &[], dir.path()).unwrap();
        let rel: Vec<PathBuf> = paths
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            rel,
            [
                "docker/config.json",
                "certs.d/harbor.example.com:8443/hosts.toml",
                "buildkitd.toml",
                "registries.conf",
                "docker/daemon.json",
            ]
            .map(PathBuf::from)
        );
        for (p, f) in paths.iter().zip(Format::ALL) {
            let want = render(&http_settings(), f).unwrap().text;
            assert_eq!(std::fs::read_to_string(p).unwrap(), want, "{f}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&paths[0]), 0o600);
            assert_eq!(mode(&paths[3]), 0o644);
            // An existing, looser file is tightened before the token goes in.
            std::fs::set_permissions(&paths[0], std::fs::Permissions::from_mode(0o644)).unwrap();
            write_all(&http_settings(), &[Format::Docker], dir.path()).unwrap();
            assert_eq!(mode(&paths[0]), 0o600);
        }
    }

    #[test]
    fn write_all_writes_nothing_for_bad_settings() {
        let dir = tempfile::tempdir().unwrap();
        let bad = ClientSettings {
            proxy: "nope".into(),
            ..http_settings()
        };
        let err = write_all(&bad, &[Format::Docker, Format::Daemon], dir.path()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn token_files_lose_their_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "abc.def.ghi\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "abc.def.ghi");
        std::fs::write(&p, "\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_verified_https_proxy_gets_its_ca_where_each_client_reads_it_and_no_insecure_setting() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_string();
        let s = ClientSettings {
            proxy: "https://10.0.0.5:31567".into(),
            upstream: "docker.io".into(),
            host_name: Some("c-registry-connector.demo.svc.cluster.local".into()),
            proxy_ca: Some(pem.clone()),
            ..http_settings()
        };
        for f in Format::ALL {
            let text = render(&s, f).unwrap().text;
            for bad in ["insecure", "skip_verify", "http = true", "http://"] {
                assert!(!text.contains(bad), "{f}: {bad} in {text}");
            }
        }
        assert_eq!(
            parsed(&containerd_hosts(&s).unwrap())["host"]["https://10.0.0.5:31567/v2/namespaces/demo/connectors/registry"],
            toml::Value::Table(toml::toml! {
                capabilities = ["pull", "resolve"]
                override_path = true
                ca = "proxy-ca.crt"
            })
        );
        assert_eq!(
            parsed(&buildkitd(&s).unwrap())["registry"]["10.0.0.5:31567"],
            toml::Value::Table(toml::toml! { ca = ["/etc/buildkit/certs/10.0.0.5:31567/ca.crt"] })
        );
        let paths = |f| -> Vec<String> {
            ca_files(&s, f)
                .unwrap()
                .into_iter()
                .inspect(|r| assert_eq!(r.text, pem))
                .map(|r| r.relative_path.display().to_string())
                .collect()
        };
        assert_eq!(paths(Format::Containerd), ["certs.d/docker.io/proxy-ca.crt"]);
        assert_eq!(paths(Format::Registries), ["containers/certs.d/10.0.0.5:31567/ca.crt"]);
        assert_eq!(paths(Format::Buildkit), ["buildkit/certs/10.0.0.5:31567/ca.crt"]);
        assert_eq!(
            paths(Format::Daemon),
            [
                "docker/certs.d/10.0.0.5:31567/ca.crt",
                "docker/certs.d/c-registry-connector.demo.svc.cluster.local:31567/ca.crt"
            ]
        );
        assert!(paths(Format::Docker).is_empty());
        // No CA to give: unverified or plain proxies, or clients that trust it already.
        for other in [
            ClientSettings {
                skip_verify: true,
                ..s.clone()
            },
            ClientSettings {
                proxy: "http://10.0.0.5:31567".into(),
                ..s.clone()
            },
            ClientSettings {
                proxy_ca: None,
                ..s.clone()
            },
        ] {
            assert!(Format::ALL.iter().all(|f| ca_files(&other, *f).unwrap().is_empty()));
        }
    }
}
