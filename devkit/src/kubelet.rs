//! Owns a real node for the tests: containerd with its CRI plugin on, and a real `kubelet`
//! (v1.37.2, built by `scripts/setup.sh`) registered with a [`crate::kube::KubeCluster`] as
//! `system:node:<name>` (Node authorizer, NodeRestriction), running pods with runc. What it
//! leaves out, and why:
//! - no CNI: pods use the host network (the kubelet runs host-network pods while the runtime
//!   reports its network not ready);
//! - cgroup v1 (what this machine has) is allowed with `failCgroupV1: false`, per-QoS cgroups
//!   and node allocatable enforcement are off, eviction thresholds are minimal: a shared test
//!   machine must not evict;
//! - containerd's `restrict_oom_score_adj`: this sandbox refuses lowering `oom_score_adj` (runc:
//!   `failed to update /proc/self/oom_score_adj: Permission denied`), which the CRI asks for the
//!   pause container;
//! - the pause (sandbox) image is built here from a static C program (`gcc -static`) with umoci
//!   and imported into containerd: nothing is fetched from registry.k8s.io.
//!
//! The image-credential-provider configuration is the test's: that is what is under test.

use crate::kube::KubeCluster;
use crate::procs::{self, Proc, free_port};
use crate::{Result, WorkDir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The node name the kubelet registers.
pub const NODE: &str = "e2e-node";
/// The sandbox image containerd's CRI plugin is told to use (imported, never pulled).
pub const PAUSE_IMAGE: &str = "pause.connector.test/pause:e2e";

/// containerd (CRI on) + kubelet. Fields drop in order: the kubelet stops first.
pub struct Node {
    kubelet: Proc,
    containerd: Proc,
    /// containerd's gRPC socket (CRI and `ctr`).
    pub socket: PathBuf,
    dir: PathBuf,
}

/// A static `pause` binary (gcc -static): the sandbox's process, and a runnable app image for
/// tests that want a container to start.
pub fn pause_binary(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("pause.c");
    std::fs::write(
        &src,
        "#include <signal.h>\n#include <unistd.h>\nstatic void bye(int s){(void)s;_exit(0);}\n\
         int main(void){signal(SIGINT,bye);signal(SIGTERM,bye);for(;;)pause();}\n",
    )
    .map_err(|e| format!("write {}: {e}", src.display()))?;
    let bin = dir.join("pause");
    let mut cmd = Command::new("gcc");
    cmd.args(["-static", "-Os", "-o"]).arg(&bin).arg(&src);
    procs::run(cmd, None)?.ok()?;
    Ok(bin)
}

/// An OCI layout at `<dir>/layout` holding `tag`: one layer with `/pause`, entrypoint `/pause`.
pub fn pause_layout(dir: &Path, tag: &str) -> Result<PathBuf> {
    let bin = pause_binary(dir)?;
    let layout = dir.join("layout");
    let image = format!("{}:{tag}", layout.display());
    let umoci = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new("umoci");
        cmd.args(args);
        procs::run(cmd, None)?.ok().map(|_| ())
    };
    let layout_s = layout.display().to_string();
    umoci(&["init", "--layout", &layout_s])?;
    umoci(&["new", "--image", &image])?;
    umoci(&["config", "--image", &image, "--config.entrypoint", "/pause"])?;
    let bundle = dir.join("bundle");
    let bundle_s = bundle.display().to_string();
    umoci(&["unpack", "--rootless", "--image", &image, &bundle_s])?;
    std::fs::copy(&bin, bundle.join("rootfs/pause")).map_err(|e| format!("copy pause: {e}"))?;
    umoci(&["repack", "--image", &image, &bundle_s])?;
    std::fs::remove_dir_all(&bundle).map_err(|e| format!("remove {}: {e}", bundle.display()))?;
    Ok(layout)
}

impl Node {
    /// Starts containerd (CRI on, `hosts_toml` written as `certs.d/<host>/hosts.toml` for each
    /// `(host, contents)`), imports the pause image, then starts the kubelet with
    /// `credential_provider_config` and `provider_bin_dir`, and waits until the Node is
    /// registered.
    pub fn start(
        work: &WorkDir,
        kube: &KubeCluster,
        hosts_toml: &[(&str, String)],
        credential_provider_config: &Path,
        provider_bin_dir: &Path,
    ) -> Result<Node> {
        let dir = work.sub("node")?;
        let kubelet_bin = crate::kube::binary("kubelet")?;
        // Short paths: a unix socket path must stay under 108 bytes.
        let run = work.sub("node/run")?;
        let socket = run.join("c.sock");
        let certs_d = work.sub("node/certs.d")?;
        for (host, contents) in hosts_toml {
            let d = certs_d.join(host);
            std::fs::create_dir_all(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
            std::fs::write(d.join("hosts.toml"), contents).map_err(|e| format!("write hosts.toml: {e}"))?;
        }
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"\"\n\
             [metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{PAUSE_IMAGE}\"\n\
             \x20 restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"runc\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n  SystemdCgroup = false\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{cni}\"\n  conf_dir = \"{cni}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{certs}\"\n",
            root = work.sub("node/containerd-root")?.display(),
            state = work.sub("node/containerd-state")?.display(),
            sock = socket.display(),
            cni = work.sub("node/cni")?.display(),
            certs = certs_d.display(),
        );
        let cfg = dir.join("containerd.toml");
        std::fs::write(&cfg, config).map_err(|e| format!("write {}: {e}", cfg.display()))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&cfg);
        let mut containerd = Proc::spawn("containerd-cri", cmd, &dir.join("containerd.log"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ctr(&socket, &["version"]).map(|o| o.success).unwrap_or(false) {
            containerd.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "containerd (CRI) not answering after 20 s:\n{}",
                    procs::log_tail(containerd.log_path(), 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }

        // The sandbox image, into the namespace the CRI plugin uses.
        let layout = pause_layout(&work.sub("node/pause")?, "e2e")?;
        let archive = dir.join("pause.tar");
        let mut cmd = Command::new("skopeo");
        cmd.arg("copy")
            .arg(format!("oci:{}:e2e", layout.display()))
            .arg(format!("docker-archive:{}:{PAUSE_IMAGE}", archive.display()));
        procs::run(cmd, None)?.ok()?;
        ctr(
            &socket,
            &[
                "--namespace",
                "k8s.io",
                "images",
                "import",
                &archive.display().to_string(),
            ],
        )?
        .ok()?;

        let (port, healthz) = (free_port()?, free_port()?);
        let kubelet_config = dir.join("kubelet.yaml");
        std::fs::write(
            &kubelet_config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                 failCgroupV1: false\nfailSwapOn: false\ncgroupDriver: cgroupfs\ncgroupsPerQOS: false\n\
                 enforceNodeAllocatable: []\nlocalStorageCapacityIsolation: false\n\
                 containerRuntimeEndpoint: unix://{sock}\n\
                 address: 127.0.0.1\nport: {port}\nreadOnlyPort: 0\n\
                 healthzBindAddress: 127.0.0.1\nhealthzPort: {healthz}\n\
                 authentication: {{anonymous: {{enabled: false}}, webhook: {{enabled: false}}}}\n\
                 authorization: {{mode: AlwaysAllow}}\n\
                 evictionHard: {{memory.available: 1Mi, nodefs.available: 1%, imagefs.available: 1%}}\n\
                 imageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n\
                 resolvConf: \"\"\nnodeStatusUpdateFrequency: 2s\nsyncFrequency: 2s\n\
                 volumePluginDir: {plugins}\n",
                sock = socket.display(),
                plugins = work.sub("node/volume-plugins")?.display(),
            ),
        )
        .map_err(|e| format!("write {}: {e}", kubelet_config.display()))?;
        let mut cmd = Command::new(kubelet_bin);
        cmd.arg(format!("--kubeconfig={}", kube.node_kubeconfig(NODE)?.display()))
            .arg(format!("--config={}", kubelet_config.display()))
            .arg(format!("--root-dir={}", work.sub("node/kubelet")?.display()))
            .arg(format!("--cert-dir={}", work.sub("node/pki")?.display()))
            .args(["--hostname-override", NODE, "--v=2"])
            .arg(format!(
                "--image-credential-provider-config={}",
                credential_provider_config.display()
            ))
            .arg(format!(
                "--image-credential-provider-bin-dir={}",
                provider_bin_dir.display()
            ));
        let mut kubelet = Proc::spawn("kubelet", cmd, &dir.join("kubelet.log"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            kubelet.check_alive()?;
            if kube.kubectl(&["get", "node", NODE])?.success {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the kubelet registered no Node in 60 s:\n{}",
                    procs::log_tail(kubelet.log_path(), 40)
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(Node {
            kubelet,
            containerd,
            socket,
            dir,
        })
    }

    /// The kubelet's log so far.
    pub fn kubelet_log(&self) -> String {
        std::fs::read(self.kubelet.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// containerd's log so far.
    pub fn containerd_log(&self) -> String {
        std::fs::read(self.containerd.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `ctr --namespace k8s.io images ls -q`: what the CRI plugin holds.
    pub fn images(&self) -> Result<Vec<String>> {
        let out = ctr(&self.socket, &["--namespace", "k8s.io", "images", "ls", "-q"])?.ok()?;
        Ok(out.stdout.lines().map(str::to_string).collect())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Pods outlive the kubelet and containerd (each has a shim and its own processes): take them
/// down first, then the daemons, then every mount left under the node's directory.
impl Drop for Node {
    fn drop(&mut self) {
        self.kubelet.stop();
        let ns = ["--namespace", "k8s.io"];
        let tasks = ctr(&self.socket, &[ns[0], ns[1], "tasks", "ls", "-q"])
            .map(|o| o.stdout)
            .unwrap_or_default();
        for id in tasks.lines().filter(|l| !l.is_empty()) {
            let _ = ctr(&self.socket, &[ns[0], ns[1], "tasks", "kill", "-s", "SIGKILL", id]);
        }
        for id in tasks.lines().filter(|l| !l.is_empty()) {
            // Deleting a task waits for its exit; the shim then exits too.
            let _ = ctr(&self.socket, &[ns[0], ns[1], "tasks", "delete", "--force", id]);
            let _ = ctr(&self.socket, &[ns[0], ns[1], "containers", "delete", id]);
        }
        self.containerd.stop();
        let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
            return;
        };
        let node = self.dir.display().to_string();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&node))
            .collect();
        // Deepest first.
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
    }
}

fn ctr(socket: &Path, args: &[&str]) -> Result<procs::Output> {
    let mut c = Command::new("ctr");
    c.arg("--address").arg(socket).args(args);
    procs::run(c, None)
}
