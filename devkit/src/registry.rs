//! Owns the upstream registry: Debian's `docker-registry` (CNCF Distribution 2.8) on a free
//! loopback port with filesystem storage in the work dir, with htpasswd auth (the private
//! registry the connector fronts), with token auth (`auth: token`, trusting the harness's
//! [`TokenServer`]: the Bearer-challenge upstream), or without (a benchmark upstream that is not
//! the bottleneck: htpasswd runs bcrypt on every request). Every registry serves HTTPS with
//! the harness's upstream certificate ([`crate::tls::upstream`]) and its port is registered as a
//! TLS port ([`crate::http::trust_port`]), so clients verify it; plain HTTP is only the explicit
//! legacy opt-in [`Registry::start_plain_http_with_auth`].

use crate::procs::{self, Proc};
use crate::token_server::{self, TokenServer};
use crate::{Result, WorkDir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Credentials the registry accepts.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password must never reach a log or an assertion message.
        write!(
            f,
            "Credentials {{ username: {:?}, password: <redacted> }}",
            self.username
        )
    }
}

pub struct Registry {
    pub port: u16,
    pub credentials: Option<Credentials>,
    proc: Proc,
    cfg_path: PathBuf,
    /// Token auth: the rootcertbundle file the registry reads at start.
    bundle: Option<PathBuf>,
    /// Serves HTTPS (the default); false only for the plain-HTTP legacy opt-in.
    tls: bool,
    /// [`Registry::serve_tls`] replaced the harness certificate with one of another CA: the
    /// harness's readiness check (which trusts the upstream CA) cannot speak to it.
    foreign_cert: bool,
}

/// How the registry listens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listen {
    Tls,
    PlainHttp,
}

/// What a registry with `auth: token` needs to trust an issuer's tokens.
pub struct TokenTrust {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub rootcertbundle: PathBuf,
    pub jwks: Option<PathBuf>,
}

/// How clients authenticate to the registry.
enum Auth<'a> {
    None,
    Htpasswd(&'a Credentials),
    Token(&'a TokenServer),
    /// Another token issuer (Keycloak): its realm, service, issuer and keys as given.
    Trust(&'a TokenTrust),
}

impl Registry {
    /// Starts a registry requiring `username` and a password generated now.
    pub fn start_with_auth(work: &WorkDir, username: &str) -> Result<Self> {
        let creds = Credentials {
            username: username.into(),
            password: crate::random_secret()?,
        };
        Self::start(work, Some(creds), false)
    }

    /// The legacy opt-in: a registry requiring `username` that speaks plain HTTP, reached by a
    /// connector whose address is `http://...`. The one test that shows an http upstream
    /// still works uses it; every other upstream of the harness speaks verified TLS.
    pub fn start_plain_http_with_auth(work: &WorkDir, username: &str) -> Result<Self> {
        let creds = Credentials {
            username: username.into(),
            password: crate::random_secret()?,
        };
        let htpasswd = creds.clone();
        Self::start_listening(work, Some(creds), false, Auth::Htpasswd(&htpasswd), Listen::PlainHttp)
    }

    /// Starts a registry with `auth: token`: it challenges with
    /// `Bearer realm="<token server>/token",service="upstream-registry",scope=...` and accepts
    /// only tokens signed by the token server's current key. `credentials` are the token server's
    /// robot account (what a connector's Secret holds for this upstream).
    pub fn start_token_auth(work: &WorkDir, token_server: &TokenServer, credentials: Credentials) -> Result<Self> {
        Self::start_with(work, Some(credentials), false, Auth::Token(token_server))
    }

    /// Starts a registry with `auth: token` trusting `trust`'s issuer (Keycloak's realm, say);
    /// `credentials` are the issuer's robot account.
    pub fn start_trusting(work: &WorkDir, trust: &TokenTrust, credentials: Credentials) -> Result<Self> {
        Self::start_with(work, Some(credentials), false, Auth::Trust(trust))
    }

    /// Adds a second htpasswd user (a rotated robot account) and restarts the registry, which
    /// reads the file at start. Storage survives the restart.
    pub fn add_user(&mut self, creds: &Credentials) -> Result<()> {
        let file = self
            .cfg_path
            .parent()
            .map(|d| d.join("htpasswd"))
            .ok_or("registry config has no directory")?;
        let existing = std::fs::read_to_string(&file).map_err(|e| format!("read {}: {e}", file.display()))?;
        let tmp = file.with_extension("new");
        write_htpasswd(&tmp, creds)?;
        let added = std::fs::read_to_string(&tmp).map_err(|e| format!("read {}: {e}", tmp.display()))?;
        std::fs::write(&file, existing + &added).map_err(|e| format!("write {}: {e}", file.display()))?;
        self.restart()
    }

    /// Serves `cert` (e.g. one of a test's own CA, or naming another host) instead of the
    /// harness's upstream certificate, storage and accounts kept; it is then
    /// `https://<cert's host>:<port>`, trusted only by whoever trusts that certificate's CA.
    pub fn serve_tls(&mut self, cert: &crate::tls::ServerCert) -> Result<()> {
        let config =
            std::fs::read_to_string(&self.cfg_path).map_err(|e| format!("read {}: {e}", self.cfg_path.display()))?;
        let marker = format!("http:\n  addr: 127.0.0.1:{}\n", self.port);
        if !config.contains(&marker) {
            return Err(format!("{} has no http section to add TLS to", self.cfg_path.display()));
        }
        // Without the harness certificate's section, then with `cert`'s.
        let harness = tls_section(&crate::tls::upstream()?.server_cert());
        let config = config
            .replace(&harness, "")
            .replace(&marker, &format!("{marker}{}", tls_section(cert)));
        std::fs::write(&self.cfg_path, config).map_err(|e| format!("write {}: {e}", self.cfg_path.display()))?;
        self.tls = true;
        self.foreign_cert = true;
        self.restart()
    }

    /// CNCF Distribution in pull-through proxy mode (the neighbour the benchmark compares with):
    /// it pulls from `remote` with `credentials` and caches on its filesystem; its own clients
    /// need no credential (which is exactly its weak point: anyone who reaches it reads the cache).
    pub fn start_pull_through(
        work: &WorkDir,
        dir: &str,
        remote: &str,
        credentials: Option<&Credentials>,
    ) -> Result<Self> {
        let dir = work.sub(dir)?;
        let storage = dir.join("storage");
        let port = procs::free_port()?;
        let auth = credentials
            .map(|c| format!("  username: {}\n  password: {}\n", c.username, c.password))
            .unwrap_or_default();
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: {}\n{}\
             proxy:\n  remoteurl: {remote}\n{auth}",
            storage.display(),
            crate::random_hex(16)?,
            tls_section(&crate::tls::upstream()?.server_cert()),
        );
        let cfg_path = dir.join("config.yml");
        std::fs::write(&cfg_path, config).map_err(|e| format!("write {}: {e}", cfg_path.display()))?;
        let proc = spawn(&cfg_path, &dir.join("registry.log"), port, Listen::Tls)?;
        Ok(Self {
            port,
            credentials: None,
            proc,
            cfg_path,
            bundle: None,
            tls: true,
            foreign_cert: false,
        })
    }

    /// Starts a registry anyone may use.
    pub fn start_open(work: &WorkDir) -> Result<Self> {
        Self::start(work, None, false)
    }

    /// Revokes every token issued so far: rotates the token server's key and restarts the
    /// registry (same port, same storage) trusting only the new certificate. Distribution
    /// reads its rootcertbundle once at start, so a restart is the honest way to change trust.
    pub fn trust_only_new_tokens(&mut self, token_server: &TokenServer) -> Result<()> {
        let bundle = self
            .bundle
            .clone()
            .ok_or("trust_only_new_tokens: not a token-auth registry")?;
        let cert = token_server.rotate_key()?;
        std::fs::copy(&cert, &bundle).map_err(|e| format!("copy {} to {}: {e}", cert.display(), bundle.display()))?;
        self.restart()
    }

    /// Stops the registry and starts it again with the same configuration file and port.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.stop();
        let log = self.proc.log_path().to_path_buf();
        if self.foreign_cert {
            // A certificate the harness does not trust (see `serve_tls`): the readiness check
            // cannot speak to it; the port answering is enough.
            let mut proc = Proc::spawn("docker-registry", command(&self.cfg_path)?, &log)?;
            proc.wait_for_port(self.port, Duration::from_secs(20))?;
            self.proc = proc;
        } else {
            let listen = if self.tls { Listen::Tls } else { Listen::PlainHttp };
            self.proc = spawn(&self.cfg_path, &log, self.port, listen)?;
        }
        Ok(())
    }

    /// An open registry tuned to cost as little CPU per request as Distribution can: in-memory
    /// storage and blob-descriptor cache, no access log. The benchmark's upstream, so that the
    /// proxy, not the registry, is what the numbers compare.
    pub fn start_lean(work: &WorkDir) -> Result<Self> {
        Self::start(work, None, true)
    }

    fn start(work: &WorkDir, credentials: Option<Credentials>, lean: bool) -> Result<Self> {
        // A copy for the config writer: the credentials themselves move into the result.
        let htpasswd = credentials.clone();
        let auth = htpasswd.as_ref().map_or(Auth::None, Auth::Htpasswd);
        Self::start_with(work, credentials, lean, auth)
    }

    fn start_with(work: &WorkDir, credentials: Option<Credentials>, lean: bool, auth: Auth<'_>) -> Result<Self> {
        Self::start_listening(work, credentials, lean, auth, Listen::Tls)
    }

    fn start_listening(
        work: &WorkDir,
        credentials: Option<Credentials>,
        lean: bool,
        auth: Auth<'_>,
        listen: Listen,
    ) -> Result<Self> {
        let dir = work.sub("registry")?;
        let storage = work.sub("registry/storage")?;
        let port = procs::free_port()?;
        let mut bundle = None;
        let auth = match auth {
            Auth::Token(ts) => {
                // A copy, so that rotating the token server's key changes nothing until the
                // registry is told to trust the new certificate.
                let path = dir.join("token-rootcertbundle.pem");
                std::fs::copy(ts.cert_path(), &path).map_err(|e| format!("copy token certificate: {e}"))?;
                let s = token_section(&TokenTrust {
                    realm: ts.realm(),
                    service: token_server::SERVICE.into(),
                    issuer: token_server::ISSUER.into(),
                    rootcertbundle: path.clone(),
                    jwks: None,
                });
                bundle = Some(path);
                s
            }
            Auth::Trust(t) => token_section(t),
            Auth::Htpasswd(c) => {
                let file = dir.join("htpasswd");
                write_htpasswd(&file, c)?;
                format!(
                    "auth:\n  htpasswd:\n    realm: upstream-registry\n    path: {}\n",
                    file.display()
                )
            }
            Auth::None => String::new(),
        };
        let tls = match listen {
            Listen::Tls => tls_section(&crate::tls::upstream()?.server_cert()),
            Listen::PlainHttp => String::new(),
        };
        // JSON is valid YAML, but Distribution's docs and errors speak YAML: keep it readable.
        let config = if lean {
            format!(
                "version: 0.1\n\
                 log:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  inmemory: {{}}\n  cache:\n    blobdescriptor: inmemory\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: {}\n{tls}",
                crate::random_hex(16)?
            )
        } else {
            format!(
                "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: {}\n{tls}\
             {auth}",
                storage.display(),
                crate::random_hex(16)?
            )
        };
        let cfg_path = dir.join("config.yml");
        std::fs::write(&cfg_path, config).map_err(|e| format!("write {}: {e}", cfg_path.display()))?;
        let proc = spawn(&cfg_path, &dir.join("registry.log"), port, listen)?;
        Ok(Self {
            port,
            credentials,
            proc,
            cfg_path,
            bundle,
            tls: listen == Listen::Tls,
            foreign_cert: false,
        })
    }

    /// The registry process id (for CPU accounting in the benchmark).
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// `https://127.0.0.1:port` (`http://` for the plain-HTTP legacy opt-in).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:port`, as in image references.
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }
}

/// `docker-registry serve <config>`, trusting the harness's upstream CA for its own outgoing
/// TLS (a pull-through cache's remote): Go reads `SSL_CERT_FILE`.
fn command(cfg_path: &Path) -> Result<Command> {
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(cfg_path);
    cmd.env("SSL_CERT_FILE", crate::tls::upstream()?.ca);
    Ok(cmd)
}

/// Distribution's `auth: token` section trusting `t`'s issuer.
fn token_section(t: &TokenTrust) -> String {
    let jwks = t
        .jwks
        .as_ref()
        .map(|j| format!("    jwks: {}\n", j.display()))
        .unwrap_or_default();
    format!(
        "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n{jwks}",
        t.realm,
        t.service,
        t.issuer,
        t.rootcertbundle.display()
    )
}

/// The `http.tls` section serving `cert`.
fn tls_section(cert: &crate::tls::ServerCert) -> String {
    format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        cert.cert.display(),
        cert.key.display()
    )
}

fn spawn(cfg_path: &Path, log: &Path, port: u16, listen: Listen) -> Result<Proc> {
    if listen == Listen::Tls {
        // Clients of the harness (the readiness check below, skopeo, the raw HTTP client)
        // verify this port against the upstream CA.
        crate::http::trust_port(port, &crate::tls::upstream()?.ca);
    }
    let mut proc = Proc::spawn("docker-registry", command(cfg_path)?, log)?;
    // /v2/ answers 200 (open) or 401 (htpasswd, token) once the registry serves.
    proc.wait_for_http(port, "/v2/", |s| s == 200 || s == 401, Duration::from_secs(20))?;
    Ok(proc)
}

/// Writes a bcrypt htpasswd line with `htpasswd` from apache2-utils; the password goes through
/// stdin so it never appears in a process list.
fn write_htpasswd(file: &Path, c: &Credentials) -> Result<()> {
    let mut cmd = Command::new("htpasswd");
    cmd.args(["-niB", &c.username]);
    let out = procs::run(cmd, Some(format!("{}\n", c.password).as_bytes()))?.ok()?;
    std::fs::write(file, out.stdout.trim_end().to_string() + "\n").map_err(|e| format!("write {}: {e}", file.display()))
}
