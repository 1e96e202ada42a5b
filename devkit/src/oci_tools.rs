//! Owns the OCI 1.1 parts built from the Go module proxy by `scripts/setup.sh` (linked into
//! `.cache/tools/`): the `olareg` registry (distribution-spec 1.1: referrers API, `OCI-Subject`,
//! tag pagination, sha512; referrers can be switched off to make clients use the tag-schema
//! fallback), and the clients people use for artifacts and signatures (`crane`, `oras`,
//! `regctl`, `cosign`), each run hermetically: its own `DOCKER_CONFIG` and `HOME` in the work
//! dir, holding only the ServiceAccount token the test logs in with, and `SSL_CERT_FILE` naming
//! the proxy's CA as the only one trusted (no flag turns verification off).

use crate::procs::{self, Output, Proc, free_port};
use crate::{Result, WorkDir};
use base64::Engine;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where `scripts/setup.sh` links the tools: `<repo>/.cache/tools/`.
pub fn bin_dir() -> PathBuf {
    crate::repo_root().join(".cache/tools")
}

/// One of `olareg`, `crane`, `oras`, `regctl`, `cosign`, or an error saying how to get it.
pub fn binary(name: &str) -> Result<PathBuf> {
    crate::setup_binary(&bin_dir(), name, "the OCI tools from the Go module proxy")
}

/// A running olareg on a free loopback port, storing under the work dir, serving HTTPS with the
/// harness's upstream certificate. No authentication of its own (olareg has none): the tests
/// here are about the protocol passing through the proxy; the credential handling is the
/// Distribution suites'.
pub struct Olareg {
    pub port: u16,
    proc: Proc,
}

impl Olareg {
    /// `referrers: false` turns the referrers API off (`--api-referrer=false`): a 1.0 registry
    /// as far as referrers go, so clients fall back to the referrers tag schema.
    pub fn start(work: &WorkDir, dir: &str, referrers: bool) -> Result<Self> {
        let port = free_port()?;
        let store = work.sub(&format!("{dir}/store"))?;
        let tls = crate::tls::upstream()?;
        let mut cmd = Command::new(binary("olareg")?);
        cmd.args(["serve", "--addr", "127.0.0.1", "--port", &port.to_string()])
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .arg("--dir")
            .arg(&store)
            .arg(format!("--api-referrer={referrers}"))
            .args(["--api-delete", "--gc-frequency", "-1s", "-v", "info"]);
        let mut proc = Proc::spawn("olareg", cmd, &work.sub(dir)?.join("olareg.log"))?;
        proc.wait_for_port(port, Duration::from_secs(20))?;
        crate::http::trust_port(port, &tls.ca);
        Ok(Self { port, proc })
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read(self.proc.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

/// The Go clients, configured for one proxy: a docker `config.json` with the ServiceAccount
/// token as the password for each proxy host they are told about.
pub struct Clients {
    home: PathBuf,
    docker_config: PathBuf,
    /// The CA the proxy's certificate chains to: every Go client reads `SSL_CERT_FILE`.
    ca: PathBuf,
}

impl Clients {
    /// `hosts`: the registry hosts (`host:port`) the clients log in to with `token`; `ca`: the
    /// only CA they trust (the proxy's), so every TLS connection is verified against it.
    pub fn new(work: &WorkDir, hosts: &[&str], token: &str, ca: &Path) -> Result<Self> {
        let home = work.sub("clients-home")?;
        let docker_config = work.sub("clients-home/.docker")?;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("serviceaccount:{token}"));
        let auths: serde_json::Map<String, serde_json::Value> = hosts
            .iter()
            .map(|h| (h.to_string(), serde_json::json!({ "auth": auth })))
            .collect();
        let path = docker_config.join("config.json");
        std::fs::write(&path, serde_json::json!({ "auths": auths }).to_string())
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(Self {
            home,
            docker_config,
            ca: ca.to_path_buf(),
        })
    }

    fn command(&self, tool: &str) -> Result<Command> {
        let mut c = Command::new(binary(tool)?);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("DOCKER_CONFIG", &self.docker_config)
            .env("SSL_CERT_FILE", &self.ca)
            // Nothing here may reach a public service (cosign's TUF root, Rekor, Fulcio).
            .env("TUF_ROOT", self.home.join(".sigstore"))
            .env("SIGSTORE_NO_CACHE", "true");
        Ok(c)
    }

    /// Runs `tool args...` with `env` added; the output, whatever the exit status.
    pub fn run(&self, tool: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let mut c = self.command(tool)?;
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        procs::run(c, None)
    }

    /// As [`Clients::run`], an error with the command's stderr unless it succeeded.
    pub fn ok(&self, tool: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        self.run(tool, args, env)?.ok()
    }

    /// The directory the clients use as `HOME` (key files, downloaded artifacts).
    pub fn home(&self) -> &Path {
        &self.home
    }
}
