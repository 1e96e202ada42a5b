//! Owns a real Kubernetes control plane for the API-mode tests and `make demo-kube`: etcd on a
//! temporary directory and `kube-apiserver` (both built by `scripts/setup.sh` from the Go module
//! proxy at the versions pinned in `scripts/kube/`), on free loopback ports, with a test CA's
//! serving and client certificates, a kubeconfig for `kubectl`, RBAC authorization, the
//! ServiceAccount issuer with signing and verification keys of our own (so a test can rotate
//! them by restarting the API server), the admission-webhook plugins on, and an audit log that
//! shows which requests reached the API server. No kubelet, scheduler or controller-manager:
//! Pods are admitted (and mutated by webhooks) by the API server alone.
//!
//! Everything stops when the [`KubeCluster`] is dropped (or, for one held in a `static`, when the
//! test process exits: see [`crate::procs`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::procs::{self, Output, Proc, free_port};
use crate::tls::TestCa;
use crate::{Result, WorkDir};

/// The ServiceAccount issuer the API server signs tokens with (what `iss` says).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The Kubernetes release `scripts/setup.sh` builds (`scripts/kube/go.mod`).
pub const KUBE_VERSION: &str = "v1.37.2";

/// The namespace and ServiceAccount the sidecar controller runs as (`deploy/base`).
pub const CONTROLLER_NAMESPACE: &str = "oci-connector-system";
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "connector-proxy";
/// The user name the controller's kubeconfig authenticates as.
pub const CONTROLLER_USER: &str = "system:serviceaccount:oci-connector-system:connector-proxy";

/// Where `scripts/setup.sh` links the binaries: `<repo>/.cache/kube/`, or `OCI_CONNECTOR_KUBE_BIN`.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("OCI_CONNECTOR_KUBE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join(".cache/kube"))
}

/// One of `kube-apiserver`, `kube-controller-manager`, `kubectl`, `etcd`, or an error saying how
/// to get it.
pub fn binary(name: &str) -> Result<PathBuf> {
    crate::setup_binary(
        &bin_dir(),
        name,
        "kube-apiserver, kube-controller-manager, kubectl and etcd from the Go module proxy",
    )
}

/// The running control plane. Fields drop in order: the API server stops before etcd.
pub struct KubeCluster {
    apiserver: Option<Proc>,
    etcd: Proc,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    pub port: u16,
    /// The admin kubeconfig (`system:masters`), for `kubectl` in tests and the demo.
    pub kubeconfig: PathBuf,
    /// The CA that signed the API server's serving certificate (and the client certificates).
    pub ca: PathBuf,
    test_ca: TestCa,
    etcd_url: String,
    dir: PathBuf,
    /// ServiceAccount keys: the file stem of each, the last one signs.
    keys: Vec<String>,
    audit_log: PathBuf,
    restarts: u32,
    keys_made: u32,
    /// How long the first start took (etcd and the API server until `/readyz`).
    pub started_in: Duration,
    _work: WorkDir,
}

impl KubeCluster {
    /// Starts etcd and the API server and waits until `/readyz` answers `ok`.
    pub fn start(label: &str) -> Result<KubeCluster> {
        let t0 = Instant::now();
        let (apiserver_bin, etcd_bin) = (binary("kube-apiserver")?, binary("etcd")?);
        binary("kubectl")?;
        let work = WorkDir::new(label)?;
        let dir = work.path().to_path_buf();

        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let mut cmd = Command::new(etcd_bin);
        cmd.args(["--name", "kube-test", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer_port}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args(["--initial-cluster", &format!("kube-test=http://127.0.0.1:{peer_port}")])
            .args(["--log-level", "warn", "--unsafe-no-fsync"]);
        let mut etcd = Proc::spawn("etcd", cmd, &dir.join("etcd.log"))?;
        etcd.wait_for_port(etcd_port, Duration::from_secs(30))?;

        let ca = TestCa::new(&dir)?;
        ca.issue_with(
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=DNS:localhost,DNS:kubernetes.default.svc,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        )?;
        ca.issue_with("admin", "/CN=admin/O=system:masters", "extendedKeyUsage=clientAuth")?;
        std::fs::write(
            dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
             - level: Request\n  resources: [{group: authorization.k8s.io, resources: [subjectaccessreviews]}]\n\
             - level: Metadata\n  nonResourceURLs: [\"/openid/*\", \"/.well-known/*\"]\n\
             - level: Metadata\n  resources: [{group: connectors.alauda.io}, {group: \"\", resources: [secrets]}]\n\
             - level: None\n",
        )
        .map_err(|e| format!("write the audit policy: {e}"))?;

        let port = free_port()?;
        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &url,
            &ca.cert,
            &format!(
                "client-certificate: {}\n    client-key: {}",
                dir.join("admin.crt").display(),
                dir.join("admin.key").display()
            ),
        )?;
        let mut cluster = KubeCluster {
            apiserver: None,
            etcd,
            url,
            port,
            kubeconfig,
            ca: ca.cert.clone(),
            test_ca: ca,
            etcd_url,
            audit_log: dir.join("audit.log"),
            dir,
            keys: Vec::new(),
            restarts: 0,
            keys_made: 0,
            started_in: Duration::ZERO,
            _work: work,
        };
        let first = cluster.new_key()?;
        cluster.keys.push(first);
        cluster.spawn_apiserver(&apiserver_bin)?;
        cluster.started_in = t0.elapsed();
        Ok(cluster)
    }

    /// A new RSA ServiceAccount key pair (`sa-<n>.key`, `sa-<n>.pub`); returns its stem.
    fn new_key(&mut self) -> Result<String> {
        self.keys_made += 1;
        let stem = format!("sa-{}", self.keys_made);
        let mut cmd = Command::new("openssl");
        cmd.args(["genrsa", "-out", &format!("{stem}.key"), "2048"])
            .current_dir(&self.dir);
        procs::run(cmd, None)?.ok()?;
        let mut cmd = Command::new("openssl");
        cmd.args([
            "rsa",
            "-in",
            &format!("{stem}.key"),
            "-pubout",
            "-out",
            &format!("{stem}.pub"),
        ])
        .current_dir(&self.dir);
        procs::run(cmd, None)?.ok()?;
        Ok(stem)
    }

    fn spawn_apiserver(&mut self, bin: &Path) -> Result<()> {
        let d = &self.dir;
        let signing = self.keys.last().ok_or("no ServiceAccount key")?;
        let mut cmd = Command::new(bin);
        cmd.args(["--etcd-servers", &self.etcd_url])
            .args(["--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1"])
            // A loopback advertise address is refused unless nothing publishes the `kubernetes` Endpoints.
            .args(["--endpoint-reconciler-type", "none"])
            .args(["--secure-port", &self.port.to_string()])
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!("--tls-cert-file={}", d.join("apiserver.crt").display()))
            .arg(format!("--tls-private-key-file={}", d.join("apiserver.key").display()))
            .arg(format!("--client-ca-file={}", self.ca.display()))
            .args(["--service-account-issuer", ISSUER])
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join(format!("{signing}.key")).display()
            ))
            // Node + NodeRestriction: a kubelet (devkit::kubelet) runs as a node, limited as on a cluster.
            .args(["--authorization-mode", "Node,RBAC"])
            .args([
                "--enable-admission-plugins",
                "NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
            ])
            .args(["--service-cluster-ip-range", "10.96.0.0/24"])
            .arg(format!("--audit-policy-file={}", d.join("audit-policy.yaml").display()))
            .arg(format!("--audit-log-path={}", self.audit_log.display()))
            .args(["--audit-log-format", "json", "--audit-log-mode", "blocking"])
            .args(["--profiling=false", "--enable-priority-and-fairness=false", "--v", "1"]);
        for k in &self.keys {
            cmd.arg(format!(
                "--service-account-key-file={}",
                d.join(format!("{k}.pub")).display()
            ));
        }
        let log = d.join(format!("kube-apiserver-{}.log", self.restarts));
        let mut proc = Proc::spawn("kube-apiserver", cmd, &log)?;
        proc.wait_for_port(self.port, Duration::from_secs(60))?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            proc.check_alive()?;
            let out = self.kubectl(&["get", "--raw", "/readyz"])?;
            if out.success && out.stdout.trim() == "ok" {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kube-apiserver not ready after 90 s ({}); log {}:\n{}",
                    out.stderr.trim(),
                    log.display(),
                    procs::log_tail(&log, 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.apiserver = Some(proc);
        Ok(())
    }

    /// Restarts the API server on the same port and etcd with a new ServiceAccount key that then
    /// signs new tokens; the old keys still verify. Returns how long the restart took.
    pub fn restart_adding_key(&mut self) -> Result<Duration> {
        let stem = self.new_key()?;
        self.keys.push(stem);
        self.restart()
    }

    /// Restarts the API server without the oldest verification key: tokens it signed stop being
    /// valid and leave the published key set.
    pub fn restart_removing_oldest_key(&mut self) -> Result<Duration> {
        if self.keys.len() < 2 {
            return Err("only one ServiceAccount key: nothing to remove".into());
        }
        self.keys.remove(0);
        self.restart()
    }

    /// Stops the API server and starts it again on the same port, keys and etcd: every watch
    /// and connection of its clients breaks. Returns how long it took.
    pub fn restart(&mut self) -> Result<Duration> {
        let t0 = Instant::now();
        self.stop_apiserver();
        self.restarts += 1;
        self.spawn_apiserver(&binary("kube-apiserver")?)?;
        Ok(t0.elapsed())
    }

    /// Stops the API server (etcd stays): its clients see connection refused until
    /// [`KubeCluster::restart`].
    pub fn stop_apiserver(&mut self) {
        if let Some(mut p) = self.apiserver.take() {
            p.stop();
        }
    }

    /// A kubeconfig for the kubelet of node `node`: a client certificate for
    /// `system:node:<node>` in group `system:nodes`, which the Node authorizer and the
    /// NodeRestriction admission plugin limit to that node's own objects.
    pub fn node_kubeconfig(&self, node: &str) -> Result<PathBuf> {
        let file = format!("node-{node}");
        self.test_ca.issue_with(
            &file,
            &format!("/CN=system:node:{node}/O=system:nodes"),
            "extendedKeyUsage=clientAuth",
        )?;
        let path = self.dir.join(format!("{file}.kubeconfig"));
        write_kubeconfig(
            &path,
            &self.url,
            &self.ca,
            &format!(
                "client-certificate: {}\n    client-key: {}",
                self.dir.join(format!("{file}.crt")).display(),
                self.dir.join(format!("{file}.key")).display()
            ),
        )?;
        Ok(path)
    }

    /// Starts `kube-controller-manager` with only the Deployment and ReplicaSet controllers, so
    /// that a Deployment gets a ReplicaSet and its Pods (which go through admission like any
    /// Pod, and stay Pending: there is no scheduler or kubelet). Stopped when the returned
    /// process is dropped.
    pub fn start_controller_manager(&self) -> Result<Proc> {
        let mut cmd = Command::new(binary("kube-controller-manager")?);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(["--controllers", "deployment,replicaset"])
            // One manager, no election; no HTTPS endpoint of its own (nothing scrapes it here).
            .args(["--leader-elect=false", "--secure-port=0", "--v=1"]);
        let log = self.dir.join("kube-controller-manager.log");
        let mut proc = Proc::spawn("kube-controller-manager", cmd, &log)?;
        // It has no port to wait for: alive after a moment means it connected and started.
        std::thread::sleep(Duration::from_millis(500));
        proc.check_alive()?;
        Ok(proc)
    }

    /// `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_stdin(args, None)
    }

    /// `kubectl` with the admin kubeconfig and `stdin` fed to it.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
        let mut cmd = Command::new(binary("kubectl")?);
        cmd.env("KUBECONFIG", &self.kubeconfig).args(args);
        procs::run(cmd, stdin)
    }

    /// `kubectl apply --server-side` of JSON or YAML documents; the objects as applied.
    pub fn apply(&self, doc: &Value) -> Result<Value> {
        let out = self
            .kubectl_stdin(
                &[
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "--field-manager=devkit",
                    "-o",
                    "json",
                    "-f",
                    "-",
                ],
                Some(doc.to_string().as_bytes()),
            )?
            .ok()?;
        serde_json::from_str(&out.stdout).map_err(|e| format!("kubectl apply printed no JSON: {e}"))
    }

    /// `kubectl get <kind> <name> -n <namespace> -o json`; `None` when it does not exist.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Result<Option<Value>> {
        let out = self.kubectl(&["get", kind, name, "-n", namespace, "-o", "json"])?;
        if !out.success {
            if out.stderr.contains("NotFound") {
                return Ok(None);
            }
            return Err(out.ok().err().unwrap_or_default());
        }
        serde_json::from_str(&out.stdout)
            .map(Some)
            .map_err(|e| format!("kubectl get printed no JSON: {e}"))
    }

    /// A ServiceAccount token from the TokenRequest API (`kubectl create token`), for `audience`,
    /// with any extra arguments (e.g. `--bound-object-kind Pod --bound-object-name p`).
    pub fn create_token(&self, namespace: &str, sa: &str, audience: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["create", "token", sa, "-n", namespace, "--audience", audience];
        args.extend_from_slice(extra);
        Ok(self.kubectl(&args)?.ok()?.stdout.trim().to_string())
    }

    /// Creates the namespace and its `default` ServiceAccount (there is no controller-manager to
    /// make it), plus any further ServiceAccounts named. Idempotent.
    pub fn namespace(&self, ns: &str, service_accounts: &[&str]) -> Result<()> {
        let mut docs = vec![serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})];
        for sa in std::iter::once(&"default").chain(service_accounts) {
            docs.push(serde_json::json!({
                "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}
            }));
        }
        self.apply(&serde_json::json!({"apiVersion": "v1", "kind": "List", "items": docs}))
            .map(|_| ())
    }

    /// Applies `deploy/crd/` with `kubectl apply --server-side` and waits until the API serves it.
    pub fn install_crd(&self) -> Result<()> {
        let crd = crate::repo_root().join("deploy/crd/connectors.alauda.io.yaml");
        self.kubectl(&["apply", "--server-side", "-f", &crd.display().to_string()])?
            .ok()?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/connectors.connectors.alauda.io",
        ])?
        .ok()?;
        Ok(())
    }

    /// Applies the controller's namespace, ServiceAccount and RBAC from `deploy/base` and writes a
    /// kubeconfig that authenticates as that ServiceAccount's user name
    /// (`system:serviceaccount:oci-connector-system:connector-proxy`, by a client certificate so
    /// that it outlives a ServiceAccount key rotation): the controller runs with exactly the
    /// permissions a deployment gives it.
    pub fn controller_kubeconfig(&self) -> Result<PathBuf> {
        let base = crate::repo_root().join("deploy/base");
        for f in ["namespace.yaml", "controller-rbac.yaml", "user-roles.yaml"] {
            self.kubectl(&["apply", "--server-side", "-f", &base.join(f).display().to_string()])?
                .ok()?;
        }
        self.write_controller_kubeconfig()
    }

    /// Like [`Self::controller_kubeconfig`], with the namespaces, ServiceAccounts and RBAC of the
    /// kustomization `deploy/<variant>` as `kubectl kustomize` builds it (e.g. `namespaced`):
    /// the controller runs with exactly that variant's permissions.
    pub fn controller_kubeconfig_for(&self, variant: &str) -> Result<PathBuf> {
        let dir = crate::repo_root().join("deploy").join(variant);
        let built = self.kubectl(&["kustomize", &dir.display().to_string()])?.ok()?.stdout;
        const KINDS: [&str; 6] = [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ];
        let mut items = vec![];
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&built).map_err(|e| format!("kubectl kustomize {variant}: {e}"))?;
        for v in docs {
            if KINDS.contains(&v["kind"].as_str().unwrap_or_default()) {
                items.push(v);
            }
        }
        // Namespaces first: the Roles live in them.
        items.sort_by_key(|v| v["kind"] != "Namespace");
        for ns in items.iter().filter_map(|v| v["metadata"]["namespace"].as_str()) {
            self.namespace(ns, &[])?;
        }
        self.apply(&serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}))?;
        self.write_controller_kubeconfig()
    }

    fn write_controller_kubeconfig(&self) -> Result<PathBuf> {
        let cert = self.test_ca.issue_with(
            "controller",
            &format!("/CN={CONTROLLER_USER}/O=system:serviceaccounts"),
            "extendedKeyUsage=clientAuth",
        )?;
        let path = self.dir.join("controller.kubeconfig");
        let user = format!(
            "client-certificate: {}\n    client-key: {}",
            cert.cert.display(),
            cert.key.display()
        );
        write_kubeconfig(&path, &self.url, &self.ca, &user)?;
        Ok(path)
    }

    /// The audit log so far: one JSON object per request that the audit policy records
    /// (SubjectAccessReviews with their body, the issuer and key documents, Connectors, Secrets).
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The SubjectAccessReview specs the API server received, oldest first.
    pub fn access_reviews(&self) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|e| e["objectRef"]["resource"] == "subjectaccessreviews")
            .map(|e| e["requestObject"]["spec"].clone())
            .collect()
    }

    /// How many times the controller's user ([`CONTROLLER_USER`]) read `/openid/v1/jwks`.
    pub fn jwks_reads(&self) -> usize {
        self.audit()
            .iter()
            .filter(|e| e["requestURI"] == "/openid/v1/jwks" && e["user"]["username"] == CONTROLLER_USER)
            .count()
    }

    /// The API server's log since its last (re)start.
    pub fn log(&self) -> String {
        let p = self.dir.join(format!("kube-apiserver-{}.log", self.restarts));
        std::fs::read_to_string(p).unwrap_or_default()
    }

    pub fn etcd_pid(&self) -> Option<u32> {
        self.etcd.pid()
    }
}

fn write_kubeconfig(path: &Path, url: &str, ca: &Path, user: &str) -> Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {}\n\
         users:\n- name: test\n  user:\n    {user}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
         current-context: test\n",
        ca.display()
    );
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}
