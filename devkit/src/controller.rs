//! Owns the sidecar controller as the tests and the demo run it: the real `connector-controller`
//! binary in file mode (`serve --manifests --identity`), on free loopback ports, with a fresh
//! channel key that only it and its Envoy get (through their environments).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{self, Proc};
use crate::{Result, WorkDir};

/// The channel key's variable in both processes' environments.
pub const CHANNEL_KEY_ENV: &str = "CONNECTOR_CHANNEL_KEY";
pub const CONTROLLER_BUILD_COMMAND: &str = "cargo build -p connector-controller";

/// `CONNECTOR_CONTROLLER_BIN`, else the debug build under the target dir.
pub fn controller_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CONNECTOR_CONTROLLER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"));
    let target = if target.is_relative() {
        crate::repo_root().join(target)
    } else {
        target
    };
    let p = target.join("debug/connector-controller");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "the controller binary {} is missing: build it first with `{CONTROLLER_BUILD_COMMAND}` (or `make test`)",
            p.display()
        ))
    }
}

/// Where the controller listens.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub xds: u16,
    pub channel: u16,
    pub ops: u16,
}

impl Ports {
    pub fn free() -> Result<Self> {
        Ok(Self {
            xds: procs::free_port()?,
            channel: procs::free_port()?,
            ops: procs::free_port()?,
        })
    }
}

pub struct Controller {
    pub ports: Ports,
    key: String,
    proc: Proc,
}

impl Controller {
    /// Starts the controller on `manifests` and `identity` and waits for `/readyz` (a
    /// configuration rendered).
    pub fn start(work: &WorkDir, manifests: &Path, identity: &Path) -> Result<Self> {
        Self::start_with_args(work, manifests, identity, &[])
    }

    /// As [`Controller::start`] with extra `serve` arguments (e.g. `--upstream-ca <file>`).
    pub fn start_with_args(work: &WorkDir, manifests: &Path, identity: &Path, args: &[&str]) -> Result<Self> {
        let (ports, key) = (Ports::free()?, crate::random_secret()?);
        let mut c = Self::start_on(work, "controller", manifests, identity, ports, &key, args)?;
        c.wait_ready()?;
        Ok(c)
    }

    /// API mode: `serve --kube` against the API server `kubeconfig` names (a real
    /// kube-apiserver, [`crate::kube::KubeCluster`], in tests), reporting `proxy_url` as the
    /// proxy's address. Waits for `/readyz` (caches synced, identity read, a configuration
    /// rendered).
    pub fn start_kube(work: &WorkDir, kubeconfig: &Path, proxy_url: &str, args: &[&str]) -> Result<Self> {
        let mut all = vec!["--kube", "--proxy-url", proxy_url];
        all.extend_from_slice(args);
        let (ports, key) = (Ports::free()?, crate::random_secret()?);
        let mut c = Self::spawn(work, "controller", None, ports, &key, &all, Some(kubeconfig))?;
        c.wait_ready()?;
        Ok(c)
    }

    /// As [`Controller::start_kube`] on given ports and key: a replica's controller restarted
    /// beside the Envoy it served (which keeps those ports and key), as its pod would restart it.
    pub fn restart_kube(
        work: &WorkDir,
        dir: &str,
        kubeconfig: &Path,
        proxy_url: &str,
        (ports, key): (Ports, &str),
        args: &[&str],
    ) -> Result<Self> {
        let mut all = vec!["--kube", "--proxy-url", proxy_url];
        all.extend_from_slice(args);
        let mut c = Self::spawn(work, dir, None, ports, key, &all, Some(kubeconfig))?;
        c.wait_ready()?;
        Ok(c)
    }

    /// Waits for `/readyz`: the manifests were read and a configuration rendered.
    pub fn wait_ready(&mut self) -> Result<()> {
        self.proc
            .wait_for_http(self.ports.ops, "/readyz", |s| s == 200, Duration::from_secs(30))
    }

    /// `GET /readyz`'s status.
    pub fn readyz(&self) -> Result<u16> {
        Ok(crate::http::Request::get("/readyz").send(self.ports.ops)?.status)
    }

    /// As [`Controller::start`] on given ports and key (a restart, as a Deployment would do
    /// it), but returns as soon as it listens, ready or not: see [`Controller::wait_ready`].
    pub fn start_on(
        work: &WorkDir,
        dir: &str,
        manifests: &Path,
        identity: &Path,
        ports: Ports,
        key: &str,
        args: &[&str],
    ) -> Result<Self> {
        Self::spawn(work, dir, Some((manifests, identity)), ports, key, args, None)
    }

    fn spawn(
        work: &WorkDir,
        dir: &str,
        files: Option<(&Path, &Path)>,
        ports: Ports,
        key: &str,
        args: &[&str],
        kubeconfig: Option<&Path>,
    ) -> Result<Self> {
        let wasm = crate::require_wasm()?;
        let log = work.sub(dir)?.join("controller.log");
        let mut cmd = Command::new(controller_binary()?);
        cmd.arg("serve");
        if let Some((manifests, identity)) = files {
            cmd.arg("--manifests")
                .arg(manifests)
                .arg("--identity")
                .arg(identity)
                .args(["--poll-ms", "200"]);
        }
        cmd.arg("--wasm")
            .arg(&wasm)
            .args(["--xds", &format!("127.0.0.1:{}", ports.xds)])
            .args(["--channel", &format!("127.0.0.1:{}", ports.channel)])
            .args(["--ops", &format!("127.0.0.1:{}", ports.ops)])
            // Every registry and token service of the tests and the demo listens on 127.0.0.1:
            // this is the one place the operator's opt-in for local upstreams is given.
            .arg("--allow-local-upstreams")
            .args(args);
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        if let Some(k) = kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        cmd.env(CHANNEL_KEY_ENV, key)
            .env("RUST_LOG", "info,connector_controller=debug");
        let mut proc = Proc::spawn("connector-controller", cmd, &log)?;
        proc.wait_for_port(ports.ops, Duration::from_secs(30))?;
        proc.wait_for_port(ports.xds, Duration::from_secs(5))?;
        Ok(Self {
            ports,
            key: key.to_string(),
            proc,
        })
    }

    /// What Envoy's process environment needs: the channel key.
    pub fn envoy_env(&self) -> Vec<(String, String)> {
        vec![(CHANNEL_KEY_ENV.to_string(), self.key.clone())]
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        let r = crate::http::Request::get("/metrics").send(self.ports.ops)?;
        if r.status != 200 {
            return Err(format!("/metrics answered {}", r.status));
        }
        Ok(r.body_text())
    }

    /// The value of one metric sample line (`name{labels}` exactly as exported), if present.
    pub fn metric(&self, sample: &str) -> Result<Option<f64>> {
        Ok(self.metrics()?.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        }))
    }

    pub fn log(&self) -> String {
        std::fs::read(self.proc.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// SIGTERM, as Kubernetes stops a pod: the exit status if it ended within `timeout`.
    pub fn terminate(mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.proc.terminate(timeout)
    }

    /// SIGKILL: the controller dies without a goodbye, as in a crash or an OOM kill.
    pub fn kill(mut self) {
        if let Some(pid) = self.proc.pid() {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        self.proc.stop();
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.proc.check_alive()
    }
}
