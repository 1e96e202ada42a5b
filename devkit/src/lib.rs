//! Real-parts harness for the OCI connector: every helper here starts or drives a real process
//! (Envoy, CNCF Distribution, skopeo, umoci, openssl) on loopback, so the end-to-end tests and the
//! demo exercise exactly what a deployment runs. Nothing on the data path is mocked; the one piece
//! of our own on it, the [`recorder`], is a byte-for-byte relay that only watches.

pub mod buildah;
pub mod containerd;
pub mod controller;
pub mod envoy;
pub mod http;
pub mod image;
pub mod keycloak;
pub mod kube;
pub mod kubelet;
pub mod oci_tools;
pub mod procs;
pub mod recorder;
pub mod registry;
pub mod skopeo;
pub mod stack;
pub mod static_upstream;
pub mod tls;
pub mod token_server;
pub mod token_stack;
pub mod tokens;

use std::path::{Path, PathBuf};

/// Errors are plain strings with enough context to act on: which process, what it said.
pub type Result<T> = std::result::Result<T, String>;

/// The workspace root, found from this crate's manifest dir so it works from tests, the demo
/// binary and any current directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `<dir>/<name>` if `scripts/setup.sh` put it there, or an error saying that setup builds
/// `what`: the lookup of every binary setup builds into a cache (kube, OCI tools).
pub fn setup_binary(dir: &Path, name: &str, what: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: run `scripts/setup.sh` (it builds {what})",
            p.display()
        ))
    }
}

/// The release build of the filter that Envoy loads: `CONNECTOR_FILTER_WASM` if set, else under
/// the target dir (honouring CARGO_TARGET_DIR so a developer's separate target dir works too).
pub fn wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CONNECTOR_FILTER_WASM") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let target = if target.is_relative() {
        repo_root().join(target)
    } else {
        target
    };
    target.join("wasm32-wasip1/release/connector_filter.wasm")
}

/// The command that builds [`wasm_path`]; named in every "missing module" error.
pub const WASM_BUILD_COMMAND: &str = "bash scripts/build-filter.sh";

/// Fails with the build command when the filter module has not been built.
pub fn require_wasm() -> Result<PathBuf> {
    let p = wasm_path();
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "the filter module {} is missing: build it first with `{WASM_BUILD_COMMAND}` (or `make test`)",
            p.display()
        ))
    }
}

/// A per-test (or per-demo) directory holding configs, logs and storage. It lives under
/// `<repo>/.work/`; it is deleted on drop, or when the process exits if it is never dropped (a
/// shared stack held in a `static`), unless `CONNECTOR_KEEP_WORK=1` keeps it to be read.
pub struct WorkDir {
    dir: tempfile::TempDir,
}

impl WorkDir {
    pub fn new(label: &str) -> Result<Self> {
        let base = repo_root().join(".work");
        std::fs::create_dir_all(&base).map_err(|e| format!("create {}: {e}", base.display()))?;
        let mut dir = tempfile::Builder::new()
            .prefix(&format!("{label}-"))
            .tempdir_in(&base)
            .map_err(|e| format!("create work dir in {}: {e}", base.display()))?;
        if std::env::var("CONNECTOR_KEEP_WORK").as_deref() == Ok("1") {
            dir.disable_cleanup(true);
        } else {
            remove_at_exit(dir.path());
        }
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A sub-directory, created on first use.
    pub fn sub(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
        Ok(p)
    }
}

/// Has `dir` removed when this process exits, however it exits, if it is still there then: the
/// e2e tests' shared stacks live in `static`s whose `Drop` never runs. One shell per process
/// ([`procs::on_exit_shell`], as the servers' watchdogs) reads the paths from its pipe and, at
/// its end, removes them. Without a shell the directory is only left behind, as before.
fn remove_at_exit(dir: &Path) {
    use std::io::Write as _;
    static SWEEPER: std::sync::Mutex<Option<std::process::ChildStdin>> = std::sync::Mutex::new(None);
    let mut sweeper = SWEEPER.lock().unwrap_or_else(|e| e.into_inner());
    if sweeper.is_none() {
        // Collects the paths as its arguments until the pipe ends, then removes them.
        let script = r#"while IFS= read -r d; do set -- "$@" "$d"; done; rm -rf -- "$@""#;
        *sweeper = procs::on_exit_shell(script).map(|(_, pipe)| pipe);
    }
    if let Some(pipe) = sweeper.as_mut() {
        let _ = writeln!(pipe, "{}", dir.display());
    }
}

/// `n` random bytes from the kernel, for passwords and uids generated at run time.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| format!("the OS random source failed: {e}"))?;
    Ok(buf)
}

/// A random secret that is safe inside `user:pass` strings, htpasswd and env vars.
pub fn random_secret() -> Result<String> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes(24)?))
}

/// Lowercase hex of random bytes.
pub fn random_hex(n: usize) -> Result<String> {
    Ok(random_bytes(n)?.iter().map(|b| format!("{b:02x}")).collect())
}

/// The value after `name` on the command line (`--seconds 10`), parsed; `default` when it is
/// missing or does not parse. For the benchmark and soak binaries.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
