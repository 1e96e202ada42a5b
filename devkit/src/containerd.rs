//! Owns a real containerd daemon for the tests (Debian's containerd 1.6, as root): its own
//! `--config` with root, state and gRPC/ttrpc sockets in the work dir (the CRI plugin disabled:
//! no kubelet talks to it), and pulls with its `ctr` client, `--user sa:<jwt>` over TLS verified with the proxy's CA (`--tlscacert`), which
//! exercises containerd's own resolver, the code path a node's image pulls go through.

use crate::procs::{self, Output, Proc};
use crate::{Result, WorkDir};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The containerd namespace the tests' images live in (containerd's, not Kubernetes').
pub const NAMESPACE: &str = "connector-e2e";

pub struct Containerd {
    pub socket: PathBuf,
    proc: Proc,
}

impl Containerd {
    pub fn start(work: &WorkDir) -> Result<Self> {
        let dir = work.sub("containerd")?;
        let socket = dir.join("containerd.sock");
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"\"\n\
             [metrics]\n  address = \"\"\n",
            root = work.sub("containerd/root")?.display(),
            state = work.sub("containerd/state")?.display(),
            sock = socket.display(),
        );
        let cfg_path = dir.join("config.toml");
        std::fs::write(&cfg_path, config).map_err(|e| format!("write {}: {e}", cfg_path.display()))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&cfg_path);
        let mut proc = Proc::spawn("containerd", cmd, &dir.join("containerd.log"))?;
        // Ready when `ctr version` reaches the server over the socket.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            proc.check_alive()?;
            let mut probe = ctr_base(&socket);
            probe.arg("version");
            if procs::run(probe, None).map(|o| o.success).unwrap_or(false) {
                return Ok(Self { socket, proc });
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "containerd not answering on {} after 20 s; log:\n{}",
                    socket.display(),
                    procs::log_tail(proc.log_path(), 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ctr(&self) -> Command {
        let mut c = ctr_base(&self.socket);
        c.args(["--namespace", NAMESPACE]);
        c
    }

    /// `ctr images pull --user <user> <reference>` (reference without `docker://`), verifying
    /// TLS verified against the CA of a harness TLS listener (the proxy), through a hosts dir.
    /// Any other reference is an error: ctr would speak plain HTTP to a loopback host.
    pub fn pull(&self, reference: &str, user: Option<&str>) -> Result<Output> {
        let mut cmd = self.ctr();
        cmd.args(["images", "pull"]);
        match crate::http::tls_ca_of_reference(reference) {
            // ctr speaks plain HTTP to 127.0.0.1 whatever --tlscacert says; a hosts.toml (as
            // client-config renders it for nodes) names the https origin and its `ca`.
            Some(ca) => cmd.arg("--hosts-dir").arg(self.hosts_dir(reference, &ca)?),
            None => {
                return Err(format!(
                    "{reference}: not a harness TLS listener; ctr would pull it over plain HTTP"
                ));
            }
        };
        if let Some(u) = user {
            cmd.arg("--user").arg(u);
        }
        cmd.arg(reference);
        procs::run(cmd, None)
    }

    /// A hosts dir whose `<authority>/hosts.toml` sends pulls to `https://<authority>`,
    /// verified against `ca`.
    fn hosts_dir(&self, reference: &str, ca: &std::path::Path) -> Result<PathBuf> {
        let authority = reference.split('/').next().unwrap_or_default();
        let base = self.socket.with_file_name("hosts.d");
        let dir = base.join(authority);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let origin = format!("https://{authority}");
        let text = format!(
            "server = \"{origin}\"\n\n[host.\"{origin}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            ca.display()
        );
        let file = dir.join("hosts.toml");
        std::fs::write(&file, text).map_err(|e| format!("write {}: {e}", file.display()))?;
        Ok(base)
    }

    /// The manifest digest containerd recorded for an image it pulled.
    pub fn image_digest(&self, reference: &str) -> Result<String> {
        let mut cmd = self.ctr();
        cmd.args(["images", "ls"]);
        let out = procs::run(cmd, None)?.ok()?;
        out.stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&reference))
            .and_then(|cols| cols.iter().find(|c| c.starts_with("sha256:")).map(|d| d.to_string()))
            .ok_or_else(|| format!("containerd has no image {reference}:\n{}", out.stdout))
    }

    pub fn log_path(&self) -> &std::path::Path {
        self.proc.log_path()
    }
}

fn ctr_base(socket: &std::path::Path) -> Command {
    let mut c = Command::new("ctr");
    c.arg("--address").arg(socket);
    c
}
