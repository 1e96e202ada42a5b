//! Owns the upstream registry: Debian's `docker-registry` (CNCF Distribution 2.8) on a free
//! loopback port with filesystem storage in the work dir, with htpasswd auth (the private
//! registry the connector fronts), with token auth (`auth: token`, trusting the harness's
//! [`TokenServer`]: the Bearer-challenge upstream), or without (a benchmark upstream that is not
//! the bottleneck: htpasswd runs bcrypt on every request).

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
}

/// How clients authenticate to the registry.
enum Auth<'a> {
    None,
    Htpasswd(&'a Credentials),
    Token(&'a TokenServer),
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

    /// Starts a registry with `auth: token`: it challenges with
    /// `Bearer realm="<token server>/token",service="upstream-registry",scope=...` and accepts
    /// only tokens signed by the token server's current key. `credentials` are the token server's
    /// robot account (what a connector's Secret holds for this upstream).
    pub fn start_token_auth(work: &WorkDir, token_server: &TokenServer, credentials: Credentials) -> Result<Self> {
        Self::start_with(work, Some(credentials), false, Auth::Token(token_server))
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

    /// Switches the registry to HTTPS with `cert` (storage and accounts kept): it is then
    /// `https://<cert's host>:<port>`. Push test content before, over plain HTTP.
    pub fn serve_tls(&mut self, cert: &crate::tls::ServerCert) -> Result<()> {
        let config =
            std::fs::read_to_string(&self.cfg_path).map_err(|e| format!("read {}: {e}", self.cfg_path.display()))?;
        let marker = format!("http:\n  addr: 127.0.0.1:{}\n", self.port);
        if !config.contains(&marker) {
            return Err(format!("{} has no http section to add TLS to", self.cfg_path.display()));
        }
        let config = config.replace(
            &marker,
            &format!(
                "{marker}  tls:\n    certificate: {}\n    key: {}\n",
                cert.cert.display(),
                cert.key.display()
            ),
        );
        std::fs::write(&self.cfg_path, config).map_err(|e| format!("write {}: {e}", self.cfg_path.display()))?;
        self.proc.stop();
        let log = self.proc.log_path().to_path_buf();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&self.cfg_path);
        let mut proc = Proc::spawn("docker-registry", cmd, &log)?;
        proc.wait_for_port(self.port, Duration::from_secs(20))?;
        self.proc = proc;
        Ok(())
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
             http:\n  addr: 127.0.0.1:{port}\n  secret: {}\n\
             proxy:\n  remoteurl: {remote}\n{auth}",
            storage.display(),
            crate::random_hex(16)?
        );
        let cfg_path = dir.join("config.yml");
        std::fs::write(&cfg_path, config).map_err(|e| format!("write {}: {e}", cfg_path.display()))?;
        let proc = spawn(&cfg_path, &dir.join("registry.log"), port)?;
        Ok(Self {
            port,
            credentials: None,
            proc,
            cfg_path,
            bundle: None,
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
        let config = std::fs::read_to_string(&self.cfg_path).unwrap_or_default();
        if config.contains("\n  tls:\n") {
            // Behind TLS (see `serve_tls`): the certificate files are read again, and the
            // plain-HTTP readiness check cannot speak to it; the port answering is enough.
            let mut cmd = Command::new("docker-registry");
            cmd.arg("serve").arg(&self.cfg_path);
            let mut proc = Proc::spawn("docker-registry", cmd, &log)?;
            proc.wait_for_port(self.port, Duration::from_secs(20))?;
            self.proc = proc;
        } else {
            self.proc = spawn(&self.cfg_path, &log, self.port)?;
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
                let s = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    ts.realm(),
                    token_server::SERVICE,
                    token_server::ISSUER,
                    path.display()
                );
                bundle = Some(path);
                s
            }
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
        // JSON is valid YAML, but Distribution's docs and errors speak YAML: keep it readable.
        let config = if lean {
            format!(
                "version: 0.1\n\
                 log:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  inmemory: {{}}\n  cache:\n    blobdescriptor: inmemory\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: {}\n",
                crate::random_hex(16)?
            )
        } else {
            format!(
                "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: {}\n\
             {auth}",
                storage.display(),
                crate::random_hex(16)?
            )
        };
        let cfg_path = dir.join("config.yml");
        std::fs::write(&cfg_path, config).map_err(|e| format!("write {}: {e}", cfg_path.display()))?;
        let proc = spawn(&cfg_path, &dir.join("registry.log"), port)?;
        Ok(Self {
            port,
            credentials,
            proc,
            cfg_path,
            bundle,
        })
    }

    /// The registry process id (for CPU accounting in the benchmark).
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:port`, as in image references.
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }
}

fn spawn(cfg_path: &Path, log: &Path, port: u16) -> Result<Proc> {
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(cfg_path);
    let mut proc = Proc::spawn("docker-registry", cmd, log)?;
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
