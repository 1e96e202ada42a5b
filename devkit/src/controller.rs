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

/// The names the harness's proxy certificate carries: the loopback address clients use in the
/// path form, and a wildcard per connector namespace of the tests for the host form
/// (`c-<name>-connector.<ns>.svc.cluster.local`, [`crate::envoy::HOST_PATTERN`]).
pub const PROXY_CERT_SANS: &str = "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:*.demo.svc.cluster.local,DNS:*.ci.svc.cluster.local,DNS:*.other.svc.cluster.local";

/// The proxy listener's certificate as the harness makes it: a fresh CA (what clients are
/// told to trust) and a server certificate it signs (what the controller serves over SDS).
#[derive(Debug, Clone)]
pub struct ProxyCert {
    /// The CA certificate clients trust (PEM).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    dir: PathBuf,
}

impl ProxyCert {
    /// The certificate the harness made for `work` (by the first controller started there
    /// without a TLS choice of its own), if any.
    pub fn of(work: &WorkDir) -> Option<Self> {
        let dir = work.path().join("proxy-tls");
        dir.join("proxy.crt").is_file().then(|| Self {
            ca: dir.join("ca.crt"),
            cert: dir.join("proxy.crt"),
            key: dir.join("proxy.key"),
            dir,
        })
    }

    /// The harness's certificate for `work`: the one made before, or a new one.
    pub fn for_work(work: &WorkDir) -> Result<Self> {
        match Self::of(work) {
            Some(c) => Ok(c),
            None => Self::generate(&work.sub("proxy-tls")?, PROXY_CERT_SANS),
        }
    }

    /// A new CA in `dir` and a server certificate with `sans` (`subjectAltName=...`).
    pub fn generate(dir: &Path, sans: &str) -> Result<Self> {
        let ca = crate::tls::TestCa::new(dir)?;
        let c = ca.issue_with("proxy", "/CN=oci-connector proxy", sans)?;
        Ok(Self {
            ca: ca.cert.clone(),
            cert: c.cert,
            key: c.key,
            dir: dir.to_path_buf(),
        })
    }

    /// Replaces the served certificate and key (same CA, new key, serial `n` in the subject)
    /// the way a rotation does: both written to temporary files and renamed into place.
    pub fn rotate(&self, n: u32) -> Result<()> {
        let ca = crate::tls::TestCa::existing(&self.dir)?;
        let c = ca.issue_with(
            &format!("proxy-{n}"),
            &format!("/CN=oci-connector proxy {n}"),
            PROXY_CERT_SANS,
        )?;
        for (from, to) in [(&c.key, &self.key), (&c.cert, &self.cert)] {
            std::fs::rename(from, to).map_err(|e| format!("rename {} to {}: {e}", from.display(), to.display()))?;
        }
        Ok(())
    }

    /// The `serve` flags that make the controller serve this certificate.
    pub fn serve_args(&self) -> Vec<String> {
        vec![
            "--proxy-tls-cert".into(),
            self.cert.display().to_string(),
            "--proxy-tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

/// What the controller's process sees besides its flags.
#[derive(Default, Clone, Copy)]
struct Surroundings<'a> {
    /// API mode: the API server's kubeconfig (`KUBECONFIG`).
    kubeconfig: Option<&'a Path>,
    /// Bind-mounted over `/etc/resolv.conf` in the controller's own mount namespace.
    resolv_conf: Option<&'a Path>,
}

impl<'a> Surroundings<'a> {
    fn kube(kubeconfig: &'a Path) -> Self {
        Self {
            kubeconfig: Some(kubeconfig),
            ..Self::default()
        }
    }
}

pub struct Controller {
    pub ports: Ports,
    /// The certificate the controller serves for the proxy listener (made by the harness
    /// unless the caller passed its own `--proxy-tls-*` or `--proxy-plain-http`).
    pub proxy_cert: Option<ProxyCert>,
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
        let mut c = Self::start_listening(work, manifests, identity, args)?;
        c.wait_ready()?;
        Ok(c)
    }

    /// As [`Controller::start_with_args`] on fresh ports and key, but returns as soon as it
    /// listens, ready or not (the scale benchmark starts Envoy then, as a pod starts both).
    pub fn start_listening(work: &WorkDir, manifests: &Path, identity: &Path, args: &[&str]) -> Result<Self> {
        Self::listening(work, manifests, identity, args, Surroundings::default())
    }

    /// File mode on fresh ports and key, in `around`; returns once it listens.
    fn listening(
        work: &WorkDir,
        manifests: &Path,
        identity: &Path,
        args: &[&str],
        around: Surroundings<'_>,
    ) -> Result<Self> {
        let (ports, key) = (Ports::free()?, crate::random_secret()?);
        Self::spawn(
            work,
            "controller",
            Some((manifests, identity)),
            ports,
            &key,
            args,
            around,
        )
    }

    /// API mode: `serve --kube` against the API server `kubeconfig` names (a real
    /// kube-apiserver, [`crate::kube::KubeCluster`], in tests), reporting `proxy_url` as the
    /// proxy's address. Waits for `/readyz` (caches synced, identity read, a configuration
    /// rendered).
    pub fn start_kube(work: &WorkDir, kubeconfig: &Path, proxy_url: &str, args: &[&str]) -> Result<Self> {
        let mut all = vec!["--kube", "--proxy-url", proxy_url];
        all.extend_from_slice(args);
        let (ports, key) = (Ports::free()?, crate::random_secret()?);
        let mut c = Self::spawn(
            work,
            "controller",
            None,
            ports,
            &key,
            &all,
            Surroundings::kube(kubeconfig),
        )?;
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
        let mut c = Self::spawn(work, dir, None, ports, key, &all, Surroundings::kube(kubeconfig))?;
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
        Self::spawn(
            work,
            dir,
            Some((manifests, identity)),
            ports,
            key,
            args,
            Surroundings::default(),
        )
    }

    /// As [`Controller::start_with_args`], the controller's system resolver reading
    /// `resolv_conf` in place of `/etc/resolv.conf` (its own mount namespace, `unshare -m`,
    /// with the file bind-mounted there; needs root, as `scripts/setup.sh` does): a test's DNS
    /// server for the names `/etc/hosts` does not hold.
    pub fn start_with_resolver(
        work: &WorkDir,
        manifests: &Path,
        identity: &Path,
        args: &[&str],
        resolv_conf: &Path,
    ) -> Result<Self> {
        let around = Surroundings {
            resolv_conf: Some(resolv_conf),
            ..Surroundings::default()
        };
        let mut c = Self::listening(work, manifests, identity, args, around)?;
        c.wait_ready()?;
        Ok(c)
    }

    fn spawn(
        work: &WorkDir,
        dir: &str,
        files: Option<(&Path, &Path)>,
        ports: Ports,
        key: &str,
        args: &[&str],
        around: Surroundings<'_>,
    ) -> Result<Self> {
        let wasm = crate::require_wasm()?;
        let log = work.sub(dir)?.join("controller.log");
        // The proxy listener speaks TLS unless the caller chose otherwise: a certificate the
        // harness makes (one per work dir, shared by restarts and replicas).
        let chose = args
            .iter()
            .any(|a| a.starts_with("--proxy-tls-") || *a == "--proxy-plain-http");
        let proxy_cert = if chose { None } else { Some(ProxyCert::for_work(work)?) };
        let mut cmd = match around.resolv_conf {
            None => Command::new(controller_binary()?),
            Some(conf) => {
                // `unshare` and `sh` exec the controller: the process is the controller's.
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
                    .arg(conf)
                    .arg(controller_binary()?);
                c
            }
        };
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
        if !args.contains(&"--upstream-ca") {
            // The harness's upstreams serve certificates of its upstream CA: Envoy's clusters
            // and the controller's probes verify them against it (unless a test names its own).
            cmd.arg("--upstream-ca").arg(&crate::tls::upstream()?.ca);
        }
        if let Some(c) = &proxy_cert {
            cmd.args(c.serve_args());
        }
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        if let Some(k) = around.kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        cmd.env(CHANNEL_KEY_ENV, key)
            .env("RUST_LOG", "info,connector_controller=debug");
        let mut proc = Proc::spawn("connector-controller", cmd, &log)?;
        proc.wait_for_port(ports.ops, Duration::from_secs(30))?;
        proc.wait_for_port(ports.xds, Duration::from_secs(5))?;
        Ok(Self {
            ports,
            proxy_cert,
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
