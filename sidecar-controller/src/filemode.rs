//! Owns file mode's source of desired state: a directory of Connector and Secret manifests
//! (the YAML a user would `kubectl apply`) and an identity file, watched with inotify (the
//! `notify` crate). A change shows up in Envoy within milliseconds plus the push.
//!
//! Cost follows the change (issue 17): each file's documents are parsed once and kept, keyed
//! by the file's size, inode, modification and change times; a change re-reads only files
//! whose key moved (the rest is one `stat` per file). While nothing changes, nothing runs but
//! a slow safety re-scan (`--poll-ms`, 30 s by default): inotify misses changes on some
//! filesystems (NFS, some bind mounts) and drops events when its queue overflows, and the
//! re-scan, a `stat` per file, is what makes those converge anyway.
//!
//! A set that does not parse is refused as a whole, every problem logged, and the last good
//! one stays in force.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::hub::{Authorization, Hub, Inputs};
use crate::manifests::{ManifestSet, Problem};

#[derive(Debug, Clone)]
pub struct FileSettings {
    pub manifests: PathBuf,
    pub identity: PathBuf,
    pub poll: Duration,
}

/// What identifies a file's content without reading it: size, inode, and modification and
/// change times to the nanosecond. A rename over it (how editors and the tests write) changes
/// the inode; an in-place write changes the times.
type Stamp = (u64, u64, i64, i64, i64, i64);

fn stamp(m: &std::fs::Metadata) -> Stamp {
    (m.len(), m.ino(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec())
}

/// The parsed documents of each manifest file, by path, with the stamp they were read at.
#[derive(Default)]
pub struct FileCache {
    files: HashMap<PathBuf, (Stamp, ManifestSet, Vec<Problem>)>,
    identity: Option<(Stamp, Result<serde_json::Value, Problem>)>,
    /// The manifest files and their stamps at the last load: an event or re-scan that finds
    /// the same publishes nothing.
    listing: Option<Vec<(PathBuf, Stamp)>>,
    /// Files parsed (not taken from the cache) by the last load.
    pub parsed: usize,
}

/// Reads the directory and the identity file into [`Inputs`]; every problem of both.
pub fn load(s: &FileSettings) -> Result<Inputs, Vec<Problem>> {
    load_cached(s, &mut FileCache::default()).map(|i| i.unwrap_or_else(unreachable_empty))
}

/// A fresh cache always loads: never reached, but no panic either.
fn unreachable_empty() -> Inputs {
    Inputs {
        set: ManifestSet::default(),
        identity: serde_json::Value::Null,
        authorization: Authorization::Rules,
    }
}

/// The identity file, with keys the proxy cannot use dropped.
fn read_identity(s: &FileSettings) -> Result<serde_json::Value, Problem> {
    // As in API mode, a key the proxy cannot use (ES512, Ed25519, short RSA) is skipped with a
    // warning; the identity is refused only when no key is usable.
    crate::render::read_identity(&s.identity).and_then(|mut identity| {
        if let Some(jwks) = identity.get("jwks").filter(|j| j.get("keys").is_some()) {
            identity["jwks"] = crate::cluster_identity::usable_keys(jwks)
                .map_err(|why| Problem::new(s.identity.display(), "jwks", why))?;
        }
        Ok(identity)
    })
}

/// [`load`], parsing only files whose stamp changed since `cache` saw them; `None` when no
/// file and not the identity changed since the last load.
pub fn load_cached(s: &FileSettings, cache: &mut FileCache) -> Result<Option<Inputs>, Vec<Problem>> {
    cache.parsed = 0;
    let identity_stamp = std::fs::metadata(&s.identity).map(|m| stamp(&m)).ok();
    let listing = listing(&s.manifests);
    let same_identity = match (&cache.identity, identity_stamp) {
        (Some((old, _)), Some(new)) => *old == new,
        _ => false,
    };
    if same_identity && listing.as_ref().ok() == cache.listing.as_ref() && cache.listing.is_some() {
        return Ok(None);
    }
    cache.listing = listing.as_ref().ok().cloned();
    let identity = match identity_stamp.ok_or(()) {
        Ok(st) => match &cache.identity {
            Some((old, v)) if *old == st => v.clone(),
            _ => {
                let v = read_identity(s);
                cache.identity = Some((st, v.clone()));
                v
            }
        },
        Err(_) => {
            cache.identity = None;
            read_identity(s)
        }
    };
    let set = listing.and_then(|files| load_dir_cached(&s.manifests, files, cache));
    match (set, identity) {
        (Ok(set), Ok(identity)) => Ok(Some(Inputs {
            set,
            identity,
            authorization: Authorization::Rules,
        })),
        (set, identity) => Err(set.err().into_iter().flatten().chain(identity.err()).collect()),
    }
}

/// The manifest files of `dir` ([`crate::manifests::manifest_files`]) with their stamps.
fn listing(dir: &Path) -> Result<Vec<(PathBuf, Stamp)>, Vec<Problem>> {
    Ok(crate::manifests::manifest_files(dir)?
        .into_iter()
        .map(|(p, m)| (p, stamp(&m)))
        .collect())
}

/// [`crate::manifests::load_dir`] with the per-file cache: the same set, the same problems in
/// the same order.
fn load_dir_cached(
    dir: &Path,
    files: Vec<(PathBuf, Stamp)>,
    cache: &mut FileCache,
) -> Result<ManifestSet, Vec<Problem>> {
    let mut problems = vec![];
    if files.is_empty() {
        problems.push(Problem::new(dir.display(), "", "no *.yaml or *.yml files"));
    }
    let mut set = ManifestSet::default();
    let mut seen = HashMap::with_capacity(files.len());
    for (file, st) in files {
        let entry = match cache.files.remove(&file) {
            Some(e) if e.0 == st => e,
            _ => {
                cache.parsed += 1;
                let mut one = ManifestSet::default();
                let mut file_problems = vec![];
                match std::fs::read_to_string(&file) {
                    Ok(text) => crate::manifests::parse_file(&file, &text, &mut one, &mut file_problems),
                    Err(e) => file_problems.push(Problem::new(file.display(), "", format!("cannot read: {e}"))),
                }
                (st, one, file_problems)
            }
        };
        problems.extend(entry.2.iter().cloned());
        set.merge(&entry.1, &mut problems);
        seen.insert(file, entry);
    }
    // Files gone since the last load leave the cache.
    cache.files = seen;
    if problems.is_empty() { Ok(set) } else { Err(problems) }
}

/// Publishes the directory's state on start and on every change, until the process ends.
pub async fn run(settings: FileSettings, hub: Hub) {
    // Events from inotify (on the manifest directory and the identity file's directory) wake
    // the loop; the timer is only the safety re-scan.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watcher = watch(&settings, tx);
    if let Err(e) = &watcher {
        tracing::warn!(error = %e, "cannot watch the manifest directory with inotify: re-scanning every --poll-ms only");
    }
    let mut cache = FileCache::default();
    loop {
        let started = std::time::Instant::now();
        match load_cached(&settings, &mut cache) {
            Ok(None) => {}
            Ok(Some(inputs)) => {
                tracing::info!(
                    connectors = inputs.set.connectors.len(),
                    secrets = inputs.set.secrets.len(),
                    files_parsed = cache.parsed,
                    load_ms = started.elapsed().as_millis() as u64,
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
        tokio::select! {
            got = rx.recv() => {
                if got.is_none() {
                    // The watcher is gone: fall back to the timer alone.
                    tokio::time::sleep(settings.poll).await;
                }
            }
            () = tokio::time::sleep(settings.poll) => {}
        }
        // Events come in bursts (a rename is several); one read after the burst.
        tokio::time::sleep(Duration::from_millis(5)).await;
        while rx.try_recv().is_ok() {}
    }
}

/// Watches the manifest directory and the identity file's directory; every event pokes `tx`.
fn watch(s: &FileSettings, tx: tokio::sync::mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let identity = s.identity.clone();
    let manifests = s.manifests.clone();
    let mut w = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            // An error (e.g. the queue overflowed): look anyway.
            Err(_) => true,
            Ok(e) => e.paths.is_empty() || e.paths.iter().any(|p| p == &identity || p.parent() == Some(&manifests)),
        };
        if relevant {
            // Full means a wake-up is already pending.
            let _ = tx.try_send(());
        }
    })?;
    w.watch(&s.manifests, notify::RecursiveMode::NonRecursive)?;
    if let Some(parent) = s
        .identity
        .parent()
        .filter(|p| *p != s.manifests && !p.as_os_str().is_empty())
    {
        w.watch(parent, notify::RecursiveMode::NonRecursive)?;
    }
    Ok(w)
}
