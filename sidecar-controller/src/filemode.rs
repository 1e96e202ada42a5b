//! Owns file mode's source of desired state: a directory of Connector and Secret manifests
//! (the YAML a user would `kubectl apply`) and an identity file, watched with inotify (the
//! `notify` crate). A change shows up in Envoy within milliseconds plus the push.
//!
//! Cost follows the change (issue 17): each file's documents are parsed once and kept, keyed
//! by the file's size, inode, modification and change times; a change re-reads only files
//! whose key moved. An inotify event names the files it is about, and only those are looked
//! at again (at 5,000 files, listing and `stat`ing the directory was most of a change's CPU);
//! an event without paths, an error (a queue overflow) and the timer re-scan the whole
//! directory, a `stat` per file. While nothing changes, nothing runs but
//! a slow safety re-scan (`--poll-ms`, 30 s by default): inotify misses changes on some
//! filesystems (NFS, some bind mounts) and drops events when its queue overflows, and the
//! re-scan, a `stat` per file, is what makes those converge anyway.
//!
//! A set that does not parse is refused as a whole, every problem logged, and the last good
//! one stays in force.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
    /// The manifest files and their stamps at the last load, in path order: an event or
    /// re-scan that finds the same publishes nothing.
    listing: Option<BTreeMap<PathBuf, Stamp>>,
    /// Files parsed (not taken from the cache) by the last load.
    pub parsed: usize,
    /// Every file's objects merged, when the last load had no problem: an event naming a few
    /// files changes this set by theirs (a copy of it shares every namespace it does not touch).
    merged: Option<ManifestSet>,
    /// Whether the last load changed the set in place (`true`) or merged every file (`false`).
    pub in_place: bool,
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
/// file and not the identity changed since the last load. Lists the whole directory.
pub fn load_cached(s: &FileSettings, cache: &mut FileCache) -> Result<Option<Inputs>, Vec<Problem>> {
    load_hinted(s, cache, None)
}

/// [`load_cached`]; with `changed` (the paths inotify named since the last load), only those
/// manifest files are looked at again, the rest of the listing is the cache's.
pub fn load_hinted(
    s: &FileSettings,
    cache: &mut FileCache,
    changed: Option<&HashSet<PathBuf>>,
) -> Result<Option<Inputs>, Vec<Problem>> {
    cache.parsed = 0;
    let identity_stamp = std::fs::metadata(&s.identity).map(|m| stamp(&m)).ok();
    let same_identity = match (&cache.identity, identity_stamp) {
        (Some((old, _)), Some(new)) => *old == new,
        _ => false,
    };
    let hinted = match (changed, cache.listing.as_mut()) {
        (Some(paths), Some(listing)) => relist(&s.manifests, listing, paths),
        _ => None,
    };
    // Only the named files changed: the set can be changed in place by theirs.
    let changed = changed.filter(|_| hinted.is_some());
    // A directory that cannot be listed is reported with the identity's problems, if any.
    let mut unlisted = None;
    let same_listing = match hinted {
        Some(same) => same,
        None => match listing(&s.manifests) {
            Ok(new) => {
                let same = cache.listing.as_ref() == Some(&new);
                cache.listing = Some(new);
                same
            }
            Err(problems) => {
                cache.listing = None;
                unlisted = Some(problems);
                false
            }
        },
    };
    if same_identity && same_listing {
        return Ok(None);
    }
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
    let set = match (unlisted, cache.listing.take()) {
        (Some(problems), _) => Err(problems),
        (None, files) => {
            let files = files.unwrap_or_default();
            let set = load_dir_cached(&s.manifests, &files, cache, changed);
            cache.listing = Some(files);
            set
        }
    };
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
fn listing(dir: &Path) -> Result<BTreeMap<PathBuf, Stamp>, Vec<Problem>> {
    Ok(crate::manifests::manifest_files(dir)?
        .into_iter()
        .map(|(p, m)| (p, stamp(&m)))
        .collect())
}

/// Brings `listing` up to date for the `changed` paths of `dir` alone (a `stat` each);
/// whether it stayed the same. `None` when the paths cannot tell: a directory or symlink
/// changed that is not itself a manifest file (a ConfigMap volume swaps its `..data` link, and
/// every `*.yaml` link then resolves elsewhere with no event of its own), so the caller lists
/// the whole directory.
fn relist(dir: &Path, listing: &mut BTreeMap<PathBuf, Stamp>, changed: &HashSet<PathBuf>) -> Option<bool> {
    let mut same = true;
    for path in changed.iter().filter(|p| p.parent() == Some(dir)) {
        if !crate::manifests::is_manifest_name(path) {
            let linked = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() || m.is_symlink());
            if linked {
                return None;
            }
            continue;
        }
        let now = std::fs::metadata(path).ok().filter(|m| m.is_file()).map(|m| stamp(&m));
        let before = match now {
            Some(st) => listing.insert(path.clone(), st),
            None => listing.remove(path),
        };
        same &= before == now;
    }
    Some(same)
}

/// One file parsed: its objects and its problems.
fn parse(file: &Path) -> (ManifestSet, Vec<Problem>) {
    let mut one = ManifestSet::default();
    let mut problems = vec![];
    match std::fs::read_to_string(file) {
        Ok(text) => crate::manifests::parse_file(file, &text, &mut one, &mut problems),
        Err(e) => problems.push(Problem::new(file.display(), "", format!("cannot read: {e}"))),
    }
    (one, problems)
}

/// Each file of `files` parsed ([`parse`]), on as many threads as there are cores.
fn parse_all(files: &[&PathBuf]) -> HashMap<PathBuf, (ManifestSet, Vec<Problem>)> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(8);
    if threads < 2 || files.len() < 64 {
        return files.iter().map(|f| ((*f).clone(), parse(f))).collect();
    }
    let chunk = files.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = files
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|f| ((*f).clone(), parse(f))).collect::<Vec<_>>()))
            .collect();
        // A worker that panicked (a parser bug) leaves its files refused, not the process down.
        workers
            .into_iter()
            .zip(files.chunks(chunk))
            .flat_map(|(w, part)| {
                w.join().unwrap_or_else(|_| {
                    part.iter()
                        .map(|f| {
                            let problem = Problem::new(f.display(), "", "the parser failed on this file");
                            ((*f).clone(), (ManifestSet::default(), vec![problem]))
                        })
                        .collect()
                })
            })
            .collect()
    })
}

/// [`crate::manifests::load_dir`] with the per-file cache: the same set, the same problems in
/// the same order. With `changed` (the only paths that may differ from the last load) and a
/// last load without problems, the last set is changed by those files alone
/// ([`change_in_place`]); otherwise every file is merged again.
fn load_dir_cached(
    dir: &Path,
    files: &BTreeMap<PathBuf, Stamp>,
    cache: &mut FileCache,
    changed: Option<&HashSet<PathBuf>>,
) -> Result<ManifestSet, Vec<Problem>> {
    cache.in_place = false;
    if let (Some(paths), Some(mut merged)) = (changed, cache.merged.take())
        && !files.is_empty()
        && change_in_place(files, cache, &mut merged, paths)
    {
        cache.in_place = true;
        cache.merged = Some(merged.clone());
        return Ok(merged);
    }
    let mut problems = vec![];
    if files.is_empty() {
        problems.push(Problem::new(dir.display(), "", "no *.yaml or *.yml files"));
    }
    // Files to read again, parsed on every core first: parsing is most of a cold start (40,000
    // files at 20,000 connectors); merging stays in path order, so problems keep their order.
    let stale: Vec<&PathBuf> = files
        .iter()
        .filter(|(file, st)| cache.files.get(*file).is_none_or(|e| e.0 != **st))
        .map(|(file, _)| file)
        .collect();
    let mut parsed = parse_all(&stale);
    cache.parsed += parsed.len();
    let mut set = ManifestSet::default();
    let mut seen = HashMap::with_capacity(files.len());
    for (file, &st) in files {
        // The cache's own key moves to the new cache: no path is copied for an unchanged file.
        let (file, entry) = match (cache.files.remove_entry(file), parsed.remove(file)) {
            (Some((key, e)), None) => (key, e),
            (_, Some((one, file_problems))) => (file.clone(), (st, one, file_problems)),
            (None, None) => (file.clone(), (st, ManifestSet::default(), vec![])),
        };
        problems.extend(entry.2.iter().cloned());
        set.merge(&entry.1, &mut problems);
        seen.insert(file, entry);
    }
    // Files gone since the last load leave the cache.
    cache.files = seen;
    if problems.is_empty() {
        cache.merged = Some(set.clone());
        Ok(set)
    } else {
        Err(problems)
    }
}

/// Changes `merged` (every file's objects at the last load, which had no problem) by the
/// files in `paths`: a changed file's old objects go and its new ones come, a removed file's
/// go. `false` when that cannot be done without changing the outcome (a changed file has a
/// problem, or defines an object another file defines): the caller merges every file again,
/// which lists every problem in order. The per-file cache is kept right either way.
fn change_in_place(
    files: &BTreeMap<PathBuf, Stamp>,
    cache: &mut FileCache,
    merged: &mut ManifestSet,
    paths: &HashSet<PathBuf>,
) -> bool {
    // Every changed file's old objects go first: an object may move from one file to another.
    let mut parse_again = vec![];
    for path in paths {
        let now = files.get(path).copied();
        let before = cache.files.get(path).map(|(st, ..)| *st);
        if now == before {
            continue;
        }
        if let Some((_, old, _)) = cache.files.remove(path) {
            merged.unmerge(&old);
        }
        if let Some(st) = now {
            parse_again.push((path, st));
        }
    }
    let mut fine = true;
    for (path, st) in parse_again {
        cache.parsed += 1;
        let (one, problems) = parse(path);
        let mut duplicates = vec![];
        merged.merge(&one, &mut duplicates);
        fine &= problems.is_empty() && duplicates.is_empty();
        cache.files.insert(path.clone(), (st, one, problems));
    }
    fine
}

/// Publishes the directory's state on start and on every change, until the process ends.
pub async fn run(settings: FileSettings, hub: Hub) {
    // Events from inotify (on the manifest directory and the identity file's directory) wake
    // the loop; the timer is only the safety re-scan.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let dirty = Arc::new(Mutex::new(Dirty::default()));
    let watcher = watch(&settings, tx, Arc::clone(&dirty));
    if let Err(e) = &watcher {
        tracing::warn!(error = %e, "cannot watch the manifest directory with inotify: re-scanning every --poll-ms only");
    }
    let mut cache = FileCache::default();
    // The first load, and every timer tick, re-scans the whole directory.
    let mut rescan = true;
    loop {
        let started = std::time::Instant::now();
        let hint = match dirty.lock() {
            Ok(mut d) => std::mem::take(&mut *d),
            Err(_) => Dirty {
                all: true,
                ..Dirty::default()
            },
        };
        let changed = (!rescan && !hint.all && watcher.is_ok()).then_some(&hint.paths);
        match load_hinted(&settings, &mut cache, changed) {
            Ok(None) => {}
            Ok(Some(inputs)) => {
                tracing::info!(
                    connectors = inputs.set.connector_count(),
                    secrets = inputs.set.secret_count(),
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
        rescan = tokio::select! {
            got = rx.recv() => {
                if got.is_none() {
                    // The watcher is gone: fall back to the timer alone.
                    tokio::time::sleep(settings.poll).await;
                }
                got.is_none()
            }
            () = tokio::time::sleep(settings.poll) => true,
        };
        // Events come in bursts (a rename is several); one read after the burst.
        tokio::time::sleep(Duration::from_millis(5)).await;
        while rx.try_recv().is_ok() {}
    }
}

/// What inotify reported since the last load: the paths it named, or that the whole directory
/// must be looked at (an event without paths, a rescan flag, an error such as a queue overflow).
#[derive(Default)]
struct Dirty {
    all: bool,
    paths: HashSet<PathBuf>,
}

/// Watches the manifest directory and the identity file's directory; every event is noted in
/// `dirty` and pokes `tx`.
fn watch(
    s: &FileSettings,
    tx: tokio::sync::mpsc::Sender<()>,
    dirty: Arc<Mutex<Dirty>>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let identity = s.identity.clone();
    let manifests = s.manifests.clone();
    let mut w = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            // An error (e.g. the queue overflowed): look anyway.
            Err(_) => true,
            Ok(e) => e.paths.is_empty() || e.paths.iter().any(|p| p == &identity || p.parent() == Some(&manifests)),
        };
        if let Ok(mut d) = dirty.lock() {
            match &event {
                Ok(e) if !e.paths.is_empty() && !e.need_rescan() => d.paths.extend(e.paths.iter().cloned()),
                _ => d.all = true,
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, password: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: demo}}\ntype: kubernetes.io/basic-auth\nstringData: {{username: robot, password: {password}}}\n"
        )
    }

    fn settings(dir: &Path) -> FileSettings {
        let identity = dir.join("identity.json");
        let example: serde_json::Value =
            serde_json::from_str(include_str!("../../envoy/connectors.example.json")).unwrap();
        std::fs::write(&identity, example["identity"].to_string()).unwrap();
        let manifests = dir.join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        FileSettings {
            manifests,
            identity,
            poll: Duration::from_secs(30),
        }
    }

    fn passwords(inputs: &Inputs) -> Vec<String> {
        let mut v: Vec<String> = inputs
            .set
            .secrets()
            .map(|(_, s)| {
                let data = s.string_data.clone().unwrap_or_default();
                format!("{}={}", s.metadata.name.clone().unwrap_or_default(), data["password"])
            })
            .collect();
        v.sort();
        v
    }

    fn hint(paths: &[&Path]) -> HashSet<PathBuf> {
        paths.iter().map(|p| p.to_path_buf()).collect()
    }

    #[test]
    fn an_event_looks_again_at_the_files_it_names_only() {
        let tmp = tempfile::tempdir().unwrap();
        let s = settings(tmp.path());
        let (a, b) = (s.manifests.join("a.yaml"), s.manifests.join("b.yaml"));
        std::fs::write(&a, secret("a", "one")).unwrap();
        std::fs::write(&b, secret("b", "one")).unwrap();
        let mut cache = FileCache::default();
        let first = load_hinted(&s, &mut cache, None).unwrap().unwrap();
        assert_eq!(passwords(&first), ["a=one", "b=one"]);

        // The named file is read again; nothing else is.
        std::fs::write(&a, secret("a", "two")).unwrap();
        let got = load_hinted(&s, &mut cache, Some(&hint(&[&a]))).unwrap().unwrap();
        assert_eq!(passwords(&got), ["a=two", "b=one"]);
        assert_eq!(
            (cache.parsed, cache.in_place),
            (1, true),
            "the last set changed by a.yaml alone"
        );

        // An event about a file that did not change, or about a non-manifest file: no load.
        assert!(load_hinted(&s, &mut cache, Some(&hint(&[&a]))).unwrap().is_none());
        std::fs::write(s.manifests.join(".a.tmp"), "x").unwrap();
        assert!(
            load_hinted(&s, &mut cache, Some(&hint(&[&s.manifests.join(".a.tmp")])))
                .unwrap()
                .is_none()
        );

        // A new file and a removed one, each named by its event.
        let c = s.manifests.join("c.yml");
        std::fs::write(&c, secret("c", "one")).unwrap();
        std::fs::remove_file(&b).unwrap();
        let got = load_hinted(&s, &mut cache, Some(&hint(&[&b, &c]))).unwrap().unwrap();
        assert_eq!(passwords(&got), ["a=two", "c=one"]);
        assert!(cache.in_place);

        // A change no event named is seen by the next full re-scan (the timer's), not before.
        std::fs::write(&c, secret("c", "three-longer")).unwrap();
        assert!(load_hinted(&s, &mut cache, Some(&hint(&[&a]))).unwrap().is_none());
        let got = load_hinted(&s, &mut cache, None).unwrap().unwrap();
        assert_eq!(passwords(&got), ["a=two", "c=three-longer"]);
        assert!(!cache.in_place, "a re-scan merges every file");
    }

    /// Issue 17: a cold load parses files on every core; the set and the problems (in path
    /// order) are what the one-file-at-a-time reader gives.
    #[test]
    fn parsing_on_every_core_gives_the_set_and_problems_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let s = settings(tmp.path());
        for i in 0..150 {
            std::fs::write(
                s.manifests.join(format!("f{i:03}.yaml")),
                secret(&format!("s{i}"), "pw"),
            )
            .unwrap();
        }
        let got = load_hinted(&s, &mut FileCache::default(), None).unwrap().unwrap();
        let serial = crate::manifests::load_dir(&s.manifests).unwrap();
        assert_eq!(got.set.secret_count(), 150);
        assert_eq!(
            got.set.secrets().map(|(at, _)| at.clone()).collect::<Vec<_>>(),
            serial.secrets().map(|(at, _)| at.clone()).collect::<Vec<_>>()
        );
        std::fs::write(s.manifests.join("f020.yaml"), "a: [").unwrap();
        std::fs::write(s.manifests.join("f140.yaml"), secret("s3", "again")).unwrap();
        let mut cache = FileCache::default();
        let problems = load_hinted(&s, &mut cache, None).unwrap_err();
        assert_eq!(problems, crate::manifests::load_dir(&s.manifests).unwrap_err());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(cache.parsed, 150);
    }

    /// Issue 17: changing the last set in place gives what a full load gives, problems
    /// included: an object moved between files in one event, a duplicate (refused with both
    /// places named, as a full load names them), and the set after the duplicate is fixed.
    #[test]
    fn a_set_changed_in_place_is_the_set_a_full_load_gives() {
        let tmp = tempfile::tempdir().unwrap();
        let s = settings(tmp.path());
        let (a, b) = (s.manifests.join("a.yaml"), s.manifests.join("b.yaml"));
        std::fs::write(&a, secret("sx", "one") + "---\n" + &secret("sy", "one")).unwrap();
        std::fs::write(&b, secret("sz", "one")).unwrap();
        let mut cache = FileCache::default();
        load_hinted(&s, &mut cache, None).unwrap().unwrap();
        // sy moves from a.yaml to b.yaml; both files are named by the event.
        std::fs::write(&a, secret("sx", "one")).unwrap();
        std::fs::write(&b, secret("sy", "two") + "---\n" + &secret("sz", "one")).unwrap();
        let got = load_hinted(&s, &mut cache, Some(&hint(&[&b, &a]))).unwrap().unwrap();
        assert!(cache.in_place);
        assert_eq!(passwords(&got), passwords(&load(&s).unwrap()));
        assert_eq!(passwords(&got), ["sx=one", "sy=two", "sz=one"]);
        // sz also defined in a.yaml: refused as a full load refuses it.
        std::fs::write(&a, secret("sx", "one") + "---\n" + &secret("sz", "dup")).unwrap();
        let in_place = load_hinted(&s, &mut cache, Some(&hint(&[&a]))).unwrap_err();
        let full = load(&s).unwrap_err();
        assert_eq!(in_place, full);
        assert!(full[0].message.contains("already defined"), "{full:?}");
        // Fixed: the next event's load merges every file again (the last load had a problem).
        std::fs::write(&a, secret("sx", "one")).unwrap();
        let got = load_hinted(&s, &mut cache, Some(&hint(&[&a]))).unwrap().unwrap();
        assert!(!cache.in_place);
        assert_eq!(passwords(&got), ["sx=one", "sy=two", "sz=one"]);
        // And the one after that changes it in place again.
        std::fs::write(&b, secret("sy", "three") + "---\n" + &secret("sz", "one")).unwrap();
        let got = load_hinted(&s, &mut cache, Some(&hint(&[&b]))).unwrap().unwrap();
        assert!(cache.in_place);
        assert_eq!(passwords(&got), ["sx=one", "sy=three", "sz=one"]);
    }

    #[test]
    fn a_directory_that_cannot_be_listed_is_reported_with_the_identitys_problems() {
        let tmp = tempfile::tempdir().unwrap();
        let s = settings(tmp.path());
        std::fs::remove_dir(&s.manifests).unwrap();
        std::fs::write(&s.identity, "not json").unwrap();
        let problems = load_hinted(&s, &mut FileCache::default(), None)
            .err()
            .unwrap_or_default();
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 2, "{text:?}");
        assert!(text[0].contains("cannot read the manifest directory"), "{text:?}");
        assert!(text[1].contains("not JSON"), "{text:?}");
    }

    #[test]
    fn a_swapped_link_directory_lists_the_whole_directory() {
        // A ConfigMap volume: `*.yaml` links into `..data`, which is swapped as a whole; the
        // event names `..data` only.
        let tmp = tempfile::tempdir().unwrap();
        let s = settings(tmp.path());
        let (v1, v2) = (s.manifests.join("..v1"), s.manifests.join("..v2"));
        for (dir, password) in [(&v1, "one"), (&v2, "two")] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join("a.yaml"), secret("a", password)).unwrap();
        }
        let data = s.manifests.join("..data");
        std::os::unix::fs::symlink("..v1", &data).unwrap();
        std::os::unix::fs::symlink("..data/a.yaml", s.manifests.join("a.yaml")).unwrap();
        let mut cache = FileCache::default();
        assert_eq!(
            passwords(&load_hinted(&s, &mut cache, None).unwrap().unwrap()),
            ["a=one"]
        );

        let tmp_link = s.manifests.join("..data_tmp");
        std::os::unix::fs::symlink("..v2", &tmp_link).unwrap();
        std::fs::rename(&tmp_link, &data).unwrap();
        let got = load_hinted(&s, &mut cache, Some(&hint(&[&tmp_link, &data])))
            .unwrap()
            .unwrap();
        assert_eq!(passwords(&got), ["a=two"]);
    }
}
