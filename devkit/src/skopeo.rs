//! Owns how the harness runs `skopeo`: a project trust policy, a per-work-dir temp dir, auth
//! file and blob-info cache, and the credential flags. Runs are hermetic so parallel tests and a
//! developer's own `skopeo login` cannot leak into each other.

use crate::procs::{self, Output};
use crate::{Result, WorkDir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// How skopeo authenticates to the registry it talks to.
#[derive(Debug, Clone, Copy)]
pub enum Creds<'a> {
    /// `--no-creds`: after a Basic challenge skopeo still sends `Authorization: Basic Og==`.
    None,
    /// `--creds user:password` (Basic after the challenge).
    Basic(&'a str, &'a str),
    /// `--registry-token token` (Bearer).
    Bearer(&'a str),
}

pub struct Skopeo {
    policy: PathBuf,
    tmp: PathBuf,
    cache: PathBuf,
    auth_file: PathBuf,
    /// Registries (`host:port`) reached over verified TLS, with the `--cert-dir` holding the CA
    /// to trust (`ca.crt`), besides the harness's TLS ports ([`crate::http::tls_ca`]).
    trusted: Mutex<Vec<(String, PathBuf)>>,
    /// Registries (`host:port`) a test declared plain HTTP: the legacy opt-in, the only place
    /// skopeo gets `--tls-verify=false`.
    plain_http: Mutex<Vec<String>>,
    dir: PathBuf,
}

impl Skopeo {
    pub fn new(work: &WorkDir) -> Result<Self> {
        let dir = work.sub("skopeo")?;
        let policy = dir.join("policy.json");
        // Same content as scripts/skopeo-policy.json: signature policy is not what we test.
        std::fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#)
            .map_err(|e| format!("write {}: {e}", policy.display()))?;
        Ok(Self {
            policy,
            tmp: work.sub("skopeo/tmp")?,
            cache: work.sub("skopeo/cache")?,
            auth_file: dir.join("auth.json"),
            trusted: Mutex::new(vec![]),
            plain_http: Mutex::new(vec![]),
            dir,
        })
    }

    /// From now on `authority` (`host:port`, e.g. the TLS proxy) is reached over TLS verified
    /// against `ca` (PEM): no `--tls-verify=false` for it.
    pub fn trust(&self, authority: &str, ca: &Path) -> Result<()> {
        let mut trusted = self.trusted.lock().map_err(|_| "skopeo trust list poisoned")?;
        let dir = self.dir.join(format!("certs-{}", trusted.len()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        std::fs::copy(ca, dir.join("ca.crt")).map_err(|e| format!("copy {}: {e}", ca.display()))?;
        trusted.push((authority.to_string(), dir));
        Ok(())
    }

    /// From now on `authority` is reached over plain HTTP (`--tls-verify=false`): only for the
    /// legacy plain-HTTP opt-in, a proxy started with `--proxy-plain-http`.
    pub fn plain_http(&self, authority: &str) -> Result<()> {
        let mut plain = self.plain_http.lock().map_err(|_| "skopeo plain-HTTP list poisoned")?;
        plain.push(authority.to_string());
        Ok(())
    }

    /// The TLS flags for `reference` (`--<prefix>tls-verify...`): verified with the CA of a
    /// trusted authority or harness TLS port, plain HTTP for a declared [`Skopeo::plain_http`]
    /// authority, otherwise verified against the system's CAs.
    fn tls_flags(&self, prefix: &str, reference: &str) -> Vec<String> {
        let authority = reference
            .strip_prefix("docker://")
            .and_then(|r| r.split('/').next())
            .unwrap_or("");
        let trusted = self.trusted.lock().map(|t| t.clone()).unwrap_or_default();
        let dir = trusted
            .iter()
            .find(|(a, _)| a == authority)
            .map(|(_, d)| d.clone())
            .or_else(|| {
                // A loopback TLS listener of the harness (the proxy): its CA, in a cert dir per port.
                let port = authority.rsplit_once(':')?.1.parse::<u16>().ok()?;
                let ca = crate::http::tls_ca(port)?;
                let dir = self.dir.join(format!("certs-port-{port}"));
                std::fs::create_dir_all(&dir).ok()?;
                std::fs::copy(&ca, dir.join("ca.crt")).ok()?;
                Some(dir)
            });
        let plain = self
            .plain_http
            .lock()
            .map(|p| p.iter().any(|a| a == authority))
            .unwrap_or(false);
        match dir {
            Some(dir) => vec![
                format!("--{prefix}tls-verify=true"),
                format!("--{prefix}cert-dir={}", dir.display()),
            ],
            None if plain => vec![format!("--{prefix}tls-verify=false")],
            None => vec![format!("--{prefix}tls-verify=true")],
        }
    }

    /// The configured base command (trust policy, temp dir, no stray auth files, a private
    /// blob-info cache): a caller adds global flags, then the subcommand.
    pub fn command(&self) -> Command {
        // As root, skopeo keeps its blob-info cache in /var/lib/containers/cache and has no flag to
        // move it. In a private mount namespace we bind our own directory over /var/lib/containers
        // so each work dir has its own cache; where unshare is not permitted we run skopeo as is.
        let mut cmd = if can_unshare() {
            let mut c = Command::new("unshare");
            c.args([
                "-m",
                "sh",
                "-c",
                r#"mount --bind "$0" /var/lib/containers && exec skopeo "$@""#,
            ]);
            c.arg(&self.cache);
            c
        } else {
            Command::new("skopeo")
        };
        cmd.arg("--policy").arg(&self.policy).arg("--tmpdir").arg(&self.tmp);
        // No stray credentials from a developer's own logins.
        cmd.env("REGISTRY_AUTH_FILE", &self.auth_file);
        cmd.env("DOCKER_CONFIG", &self.tmp);
        cmd
    }

    /// `skopeo inspect` (parsed config view); `raw` returns the manifest bytes instead.
    pub fn inspect(&self, reference: &str, creds: Creds<'_>, raw: bool) -> Result<Output> {
        let mut cmd = self.command();
        cmd.args(["inspect", "--command-timeout", "60s"]);
        cmd.args(self.tls_flags("", reference));
        if raw {
            cmd.arg("--raw");
        }
        add_creds(&mut cmd, "", creds);
        cmd.arg(reference);
        procs::run(cmd, None)
    }

    /// `skopeo copy src dest`; registries on either side verified as [`Skopeo::trust`] and the
    /// harness's TLS ports say.
    pub fn copy(&self, src: &str, src_creds: Creds<'_>, dest: &str, dest_creds: Creds<'_>) -> Result<Output> {
        let mut cmd = self.command();
        cmd.args(["copy", "--command-timeout", "120s"]);
        cmd.args(self.tls_flags("src-", src));
        cmd.args(self.tls_flags("dest-", dest));
        if src.starts_with("docker://") {
            add_creds(&mut cmd, "src-", src_creds);
        }
        if dest.starts_with("docker://") {
            add_creds(&mut cmd, "dest-", dest_creds);
        }
        cmd.args([src, dest]);
        procs::run(cmd, None)
    }
}

fn add_creds(cmd: &mut Command, prefix: &str, creds: Creds<'_>) {
    match creds {
        Creds::None => {
            cmd.arg(format!("--{prefix}no-creds"));
        }
        Creds::Basic(u, p) => {
            cmd.arg(format!("--{prefix}creds")).arg(format!("{u}:{p}"));
        }
        Creds::Bearer(t) => {
            cmd.arg(format!("--{prefix}registry-token")).arg(t);
        }
    }
}

/// Whether a private mount namespace with a bind mount works here (root, and not forbidden by a
/// container runtime's seccomp profile). Checked once per process.
pub(crate) fn can_unshare() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::fs::create_dir_all("/var/lib/containers").is_err() {
            return false;
        }
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "sh", "-c", r#"mount --bind "$0" /var/lib/containers"#, "/tmp"]);
        procs::run(cmd, None).map(|o| o.success).unwrap_or(false)
    })
}
