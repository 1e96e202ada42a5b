//! Owns file mode's source of desired state: a directory of Connector and Secret manifests
//! (the YAML a user would `kubectl apply`) and an identity file, watched by polling. A change
//! shows up in Envoy within about a second plus the push.
//!
//! Polling rather than inotify: it works the same on every filesystem (bind mounts, ConfigMap
//! volumes whose files are symlink swaps), and one `stat` per file per second costs nothing.
//! A set that does not parse is refused as a whole, every problem logged, and the last good
//! one stays in force.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::hub::{Authorization, Hub, Inputs};
use crate::manifests::Problem;

#[derive(Debug, Clone)]
pub struct FileSettings {
    pub manifests: PathBuf,
    pub identity: PathBuf,
    pub poll: Duration,
}

/// What the directory looks like: names, sizes, modification times of the manifest files and
/// the identity file. Cheap to take every poll.
fn fingerprint(s: &FileSettings) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = vec![];
    let mut add = |p: &Path| {
        if let Ok(m) = std::fs::metadata(p) {
            out.push((p.to_path_buf(), m.len(), m.modified().ok()));
        }
    };
    add(&s.identity);
    if let Ok(entries) = std::fs::read_dir(&s.manifests) {
        for e in entries.flatten() {
            add(&e.path());
        }
    }
    out.sort();
    out
}

/// Reads the directory and the identity file into [`Inputs`]; every problem of both.
pub fn load(s: &FileSettings) -> Result<Inputs, Vec<Problem>> {
    let set = crate::manifests::load_dir(&s.manifests);
    // As in API mode, a key the proxy cannot use (ES512, Ed25519, short RSA) is skipped with a
    // warning; the identity is refused only when no key is usable.
    let identity = crate::render::read_identity(&s.identity).and_then(|mut identity| {
        if let Some(jwks) = identity.get("jwks").filter(|j| j.get("keys").is_some()) {
            identity["jwks"] = crate::cluster_identity::usable_keys(jwks)
                .map_err(|why| Problem::new(s.identity.display(), "jwks", why))?;
        }
        Ok(identity)
    });
    match (set, identity) {
        (Ok(set), Ok(identity)) => Ok(Inputs {
            set,
            identity,
            authorization: Authorization::Rules,
        }),
        (set, identity) => Err(set.err().into_iter().flatten().chain(identity.err()).collect()),
    }
}

/// Publishes the directory's state on start and on every change, until the process ends.
pub async fn run(settings: FileSettings, hub: Hub) {
    let mut last = None;
    loop {
        let now = fingerprint(&settings);
        if last.as_ref() != Some(&now) {
            last = Some(now);
            match load(&settings) {
                Ok(inputs) => {
                    tracing::info!(
                        connectors = inputs.set.connectors.len(),
                        secrets = inputs.set.secrets.len(),
                        dir = %settings.manifests.display(),
                        "manifests read"
                    );
                    hub.publish_inputs(inputs);
                }
                Err(problems) => {
                    hub.metrics.reason(&hub.metrics.reconcile_errors, "ManifestsInvalid");
                    tracing::error!(
                        problems = problems.len(),
                        "manifests refused as a whole; the previous configuration stays in force"
                    );
                    for p in problems {
                        tracing::error!(problem = %p, "manifest problem");
                    }
                }
            }
        }
        tokio::time::sleep(settings.poll).await;
    }
}
