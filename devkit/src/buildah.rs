//! Owns how the harness runs `buildah` (Debian's buildah, as root, no systemd): storage in the
//! work dir (`--root`, `--runroot`, the `vfs` driver, which needs no overlay mounts), a project
//! signature policy, an empty registries.conf and auth file, and the same private mount namespace
//! as skopeo so its blob-info cache (kept in /var/lib/containers/cache as root) is per work dir.
//! Pushes and pulls log in as `sa:<jwt>`, exactly what a CI job using the connector does.

use crate::procs::{self, Output};
use crate::{Result, WorkDir};
use std::path::PathBuf;
use std::process::Command;

pub struct Buildah {
    root: PathBuf,
    runroot: PathBuf,
    cache: PathBuf,
    policy: PathBuf,
    registries_conf: PathBuf,
    auth_file: PathBuf,
    tmp: PathBuf,
}

impl Buildah {
    /// A buildah with its own storage under `<work>/buildah-<label>`.
    pub fn new(work: &WorkDir, label: &str) -> Result<Self> {
        let dir = work.sub(&format!("buildah-{label}"))?;
        let policy = dir.join("policy.json");
        std::fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#)
            .map_err(|e| format!("write {}: {e}", policy.display()))?;
        // No search registries and no mirrors: references are always fully qualified here, and
        // the machine's own registries.conf must not redirect them.
        let registries_conf = dir.join("registries.conf");
        std::fs::write(&registries_conf, "unqualified-search-registries = []\n")
            .map_err(|e| format!("write {}: {e}", registries_conf.display()))?;
        // buildah refuses a REGISTRY_AUTH_FILE that does not exist: an empty one, so only the
        // `--creds` of each command count.
        let auth_file = dir.join("auth.json");
        std::fs::write(&auth_file, r#"{"auths":{}}"#).map_err(|e| format!("write {}: {e}", auth_file.display()))?;
        Ok(Self {
            root: work.sub(&format!("buildah-{label}/root"))?,
            runroot: work.sub(&format!("buildah-{label}/runroot"))?,
            cache: work.sub(&format!("buildah-{label}/cache"))?,
            tmp: work.sub(&format!("buildah-{label}/tmp"))?,
            policy,
            registries_conf,
            auth_file,
        })
    }

    fn command(&self) -> Command {
        let mut cmd = if crate::skopeo::can_unshare() {
            let mut c = Command::new("unshare");
            c.args([
                "-m",
                "sh",
                "-c",
                r#"mount --bind "$0" /var/lib/containers && exec buildah "$@""#,
            ]);
            c.arg(&self.cache);
            c
        } else {
            Command::new("buildah")
        };
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "vfs"]);
        cmd.env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf)
            .env("REGISTRY_AUTH_FILE", &self.auth_file)
            .env("TMPDIR", &self.tmp)
            // As root buildah would otherwise look for the systemd user runtime dir.
            .env("XDG_RUNTIME_DIR", &self.runroot)
            .env("BUILDAH_ISOLATION", "chroot");
        cmd
    }

    /// `buildah pull` of `src` (`docker://...`, `oci:<layout>:<tag>`); `creds` as `user:password`.
    pub fn pull(&self, src: &str, creds: Option<&str>) -> Result<Output> {
        let mut cmd = self.command();
        cmd.arg("pull")
            .arg("--signature-policy")
            .arg(&self.policy)
            .args(tls_flags(src)?)
            .arg("--quiet");
        if let Some(c) = creds {
            cmd.arg("--creds").arg(c);
        }
        cmd.arg(src);
        procs::run(cmd, None)
    }

    /// `buildah push image dest`; returns the manifest digest buildah wrote (`--digestfile`).
    pub fn push(&self, image: &str, dest: &str, creds: Option<&str>) -> Result<String> {
        let digest_file = self.tmp.join(format!("digest-{}", crate::random_hex(4)?));
        let mut cmd = self.command();
        cmd.arg("push")
            .arg("--signature-policy")
            .arg(&self.policy)
            .args(tls_flags(dest)?)
            .arg("--quiet")
            .arg("--digestfile")
            .arg(&digest_file);
        if let Some(c) = creds {
            cmd.arg("--creds").arg(c);
        }
        cmd.args([image, dest]);
        procs::run(cmd, None)?.ok()?;
        std::fs::read_to_string(&digest_file)
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("read {}: {e}", digest_file.display()))
    }

    /// `containers-storage:[vfs@<root>+<runroot>]<name>`: this buildah's storage as a skopeo
    /// destination. How an image from an OCI layout gets in under a chosen name (`buildah pull
    /// oci:<path>` names the image after the path, which fails on upper-case work dir names).
    pub fn storage_ref(&self, name: &str) -> String {
        format!(
            "containers-storage:[vfs@{}+{}]{name}",
            self.root.display(),
            self.runroot.display()
        )
    }

    /// The manifest digest of a local image (`buildah images --digests`), by its name.
    pub fn image_digest(&self, name: &str) -> Result<String> {
        let mut cmd = self.command();
        cmd.args([
            "images",
            "--digests",
            "--noheading",
            "--format",
            "{{.Name}}:{{.Tag}} {{.Digest}}",
        ]);
        let out = procs::run(cmd, None)?.ok()?;
        out.stdout
            .lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(n, _)| *n == name)
            .map(|(_, d)| d.trim().to_string())
            .ok_or_else(|| format!("no image {name} in buildah storage:\n{}", out.stdout))
    }
}

/// TLS verified against the CA of a harness TLS listener (the proxy, a registry), otherwise
/// against the system's CAs: never unverified.
fn tls_flags(reference: &str) -> Result<Vec<String>> {
    Ok(match crate::http::tls_ca_of_reference(reference) {
        Some(ca) => vec![
            "--tls-verify=true".into(),
            format!("--cert-dir={}", crate::http::cert_dir_for(&ca)?.display()),
        ],
        None => vec!["--tls-verify=true".into()],
    })
}
