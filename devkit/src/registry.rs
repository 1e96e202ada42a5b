//! Owns the upstream registry: Debian's `docker-registry` (CNCF Distribution 2.8) on a free
//! loopback port with filesystem storage in the work dir, with htpasswd auth (the private
//! registry the connector fronts) or without (a benchmark upstream that is not the bottleneck:
//! htpasswd runs bcrypt on every request).

use crate::procs::{self, Proc};
use crate::{Result, WorkDir};
use std::path::Path;
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

    /// Starts a registry anyone may use.
    pub fn start_open(work: &WorkDir) -> Result<Self> {
        Self::start(work, None, false)
    }

    /// An open registry tuned to cost as little CPU per request as Distribution can: in-memory
    /// storage and blob-descriptor cache, no access log. The benchmark's upstream, so that the
    /// proxy, not the registry, is what the numbers compare.
    pub fn start_lean(work: &WorkDir) -> Result<Self> {
        Self::start(work, None, true)
    }

    fn start(work: &WorkDir, credentials: Option<Credentials>, lean: bool) -> Result<Self> {
        let dir = work.sub("registry")?;
        let storage = work.sub("registry/storage")?;
        let port = procs::free_port()?;
        let auth = match &credentials {
            Some(c) => {
                let file = dir.join("htpasswd");
                write_htpasswd(&file, c)?;
                format!(
                    "auth:\n  htpasswd:\n    realm: upstream-registry\n    path: {}\n",
                    file.display()
                )
            }
            None => String::new(),
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
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&cfg_path);
        let mut proc = Proc::spawn("docker-registry", cmd, &dir.join("registry.log"))?;
        // /v2/ answers 200 (open) or 401 (htpasswd) once the registry serves.
        proc.wait_for_http(port, "/v2/", |s| s == 200 || s == 401, Duration::from_secs(20))?;
        Ok(Self {
            port,
            credentials,
            proc,
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

/// Writes a bcrypt htpasswd line with `htpasswd` from apache2-utils; the password goes through
/// stdin so it never appears in a process list.
fn write_htpasswd(file: &Path, c: &Credentials) -> Result<()> {
    let mut cmd = Command::new("htpasswd");
    cmd.args(["-niB", &c.username]);
    let out = procs::run(cmd, Some(format!("{}\n", c.password).as_bytes()))?.ok()?;
    std::fs::write(file, out.stdout.trim_end().to_string() + "\n").map_err(|e| format!("write {}: {e}", file.display()))
}
