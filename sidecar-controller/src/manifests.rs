//! Owns reading Connector and Secret manifests from files (the YAML a user would `kubectl
//! apply`, several documents per file allowed) into typed objects, with every problem located by
//! file, document index and field path.
//!
//! A problem inside a Secret document is reported by path only: serde's messages quote the
//! offending value, and in a Secret that value may be the password.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::crd::Connector;
use crate::sharded::ByNamespace;

const CONNECTOR_API_VERSION: &str = "connectors.alauda.io/v1alpha1";

/// Where a document came from: its file and its 0-based index among the file's documents.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub file: PathBuf,
    pub index: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file.display(), self.index)
    }
}

/// One problem of a manifest set. `at` says where (a document, or the identity file), `path`
/// the field within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: String,
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(at: impl fmt::Display, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            at: at.to_string(),
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.at, self.message)
        } else {
            write!(f, "{}: {}: {}", self.at, self.path, self.message)
        }
    }
}

/// The objects of a manifest directory, each with where it came from.
///
/// Kept by namespace and name ([`ByNamespace`]): looking a Secret up or finding a duplicate
/// costs the same at 20,000 objects as at 10, a copy of the set shares every namespace's
/// objects, and a change to one object copies only its namespace's map (issue 17: file mode
/// keeps one set and changes it per event, instead of merging every file into a new one).
#[derive(Debug, Default, Clone)]
pub struct ManifestSet {
    connectors: ByNamespace<Entry<Connector>>,
    secrets: ByNamespace<Entry<Secret>>,
}

/// One object: where it was defined, the object (shared, not copied: file mode's per-file
/// cache and the set hold the same one), and a digest of its content when its source computed
/// one (what the pipeline compares, so an unchanged object is not rendered again).
#[derive(Debug)]
struct Entry<T> {
    at: Location,
    object: Arc<T>,
    content: Option<Content>,
}

impl<T> Clone for Entry<T> {
    fn clone(&self) -> Self {
        Self {
            at: self.at.clone(),
            object: Arc::clone(&self.object),
            content: self.content,
        }
    }
}

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

/// A digest of an object's content (128 bits of SHA-256).
pub type Content = u128;

/// The [`Content`] digest of a document's bytes.
pub fn content_of(bytes: &[u8]) -> Content {
    let d = Sha256::digest(bytes);
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    u128::from_le_bytes(b)
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

impl ManifestSet {
    /// Adds a Connector (the caller has checked it is not a duplicate), with its content digest.
    pub fn add_connector(&mut self, at: Location, c: impl Into<Arc<Connector>>, content: Option<Content>) {
        let object = c.into();
        let (ns, name) = key_of(&object.metadata);
        self.connectors.insert(&ns, &name, Entry { at, object, content });
    }

    /// Adds a Secret (the caller has checked it is not a duplicate), with its content digest.
    pub fn add_secret(&mut self, at: Location, s: impl Into<Arc<Secret>>, content: Option<Content>) {
        let object = s.into();
        let (ns, name) = key_of(&object.metadata);
        self.secrets.insert(&ns, &name, Entry { at, object, content });
    }

    /// Takes the Connector `namespace/name` out.
    pub fn remove_connector(&mut self, namespace: &str, name: &str) {
        self.connectors.remove(namespace, name);
    }

    /// Takes the Secret `namespace/name` out.
    pub fn remove_secret(&mut self, namespace: &str, name: &str) {
        self.secrets.remove(namespace, name);
    }

    /// Every Connector with where it was defined, by namespace and name.
    pub fn connectors(&self) -> impl Iterator<Item = (&Location, &Arc<Connector>)> {
        self.connectors.iter().map(|(_, _, e)| (&e.at, &e.object))
    }

    /// The Connectors of namespace `namespace`, by name.
    pub fn connectors_in(&self, namespace: &str) -> impl Iterator<Item = (&Location, &Arc<Connector>)> {
        self.connectors
            .shard(namespace)
            .into_iter()
            .flat_map(|m| m.values().map(|e| (&e.at, &e.object)))
    }

    /// Every Secret with where it was defined, by namespace and name.
    pub fn secrets(&self) -> impl Iterator<Item = (&Location, &Arc<Secret>)> {
        self.secrets.iter().map(|(_, _, e)| (&e.at, &e.object))
    }

    pub fn connector_count(&self) -> usize {
        self.connectors.len()
    }

    pub fn secret_count(&self) -> usize {
        self.secrets.len()
    }

    /// Namespaces with Connectors or Secrets whose objects differ between `self` and `other`,
    /// found without looking at unchanged namespaces' objects (they are shared).
    pub fn changed_namespaces(&self, other: &ManifestSet) -> std::collections::BTreeSet<String> {
        let mut out = self.connectors.differing_namespaces(&other.connectors);
        out.extend(self.secrets.differing_namespaces(&other.secrets));
        out
    }

    /// The Secret `namespace/name`, if the set has it.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<&Secret> {
        self.shared_secret(namespace, name).map(|s| &**s)
    }

    /// The Secret `namespace/name` as the set shares it: an unchanged Secret is the same
    /// allocation from one set to the next (file mode's per-file cache), which the pipeline
    /// compares instead of the content.
    pub fn shared_secret(&self, namespace: &str, name: &str) -> Option<&Arc<Secret>> {
        self.secrets.get(namespace, name).map(|e| &e.object)
    }

    /// Where the Connector `namespace/name` was defined, if the set has it.
    fn connector_at(&self, key: &ObjectKey) -> Option<&Location> {
        self.connectors.get(&key.0, &key.1).map(|e| &e.at)
    }

    fn secret_at(&self, key: &ObjectKey) -> Option<&Location> {
        self.secrets.get(&key.0, &key.1).map(|e| &e.at)
    }

    /// The content digest of the Connector `namespace/name`, when its source computed one.
    pub fn connector_content(&self, namespace: &str, name: &str) -> Option<Content> {
        self.connectors.get(namespace, name)?.content
    }

    /// The content digest of the Secret `namespace/name`, when its source computed one.
    pub fn secret_content(&self, namespace: &str, name: &str) -> Option<Content> {
        self.secrets.get(namespace, name)?.content
    }

    /// Adds every object of `other` (parsed from another file) that is not already defined
    /// here; a duplicate is a problem at its location, as when both were in one file.
    pub fn merge(&mut self, other: &ManifestSet, problems: &mut Vec<Problem>) {
        for (ns, name, e) in other.connectors.iter() {
            if let Some(first) = self.connectors.get(ns, name) {
                problems.push(duplicate(&e.at, "Connector", ns, name, &first.at));
                continue;
            }
            self.connectors.insert(ns, name, e.clone());
        }
        for (ns, name, e) in other.secrets.iter() {
            if let Some(first) = self.secrets.get(ns, name) {
                problems.push(duplicate(&e.at, "Secret", ns, name, &first.at));
                continue;
            }
            self.secrets.insert(ns, name, e.clone());
        }
    }

    /// Takes out every object `other` (one file's objects) has, defined where `other` says:
    /// the opposite of a [`Self::merge`] that had no duplicates.
    pub fn unmerge(&mut self, other: &ManifestSet) {
        for (ns, name, e) in other.connectors.iter() {
            if self.connectors.get(ns, name).is_some_and(|mine| mine.at == e.at) {
                self.connectors.remove(ns, name);
            }
        }
        for (ns, name, e) in other.secrets.iter() {
            if self.secrets.get(ns, name).is_some_and(|mine| mine.at == e.at) {
                self.secrets.remove(ns, name);
            }
        }
    }
}

fn duplicate(at: &Location, kind: &str, namespace: &str, name: &str, first: &Location) -> Problem {
    Problem::new(
        at,
        "metadata.name",
        format!("{kind} {namespace}/{name} is already defined at {first}"),
    )
}

/// Whether a file's name makes it a manifest file: `*.yaml` or `*.yml`.
pub fn is_manifest_name(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// The `*.yaml` / `*.yml` files of `dir` (not recursing; following symlinks, as ConfigMap
/// volumes need) with their metadata, in name order so problems come out in a stable order.
/// File mode's watch stamps them from that metadata; [`load_dir`] reads them.
pub fn manifest_files(dir: &Path) -> Result<Vec<(PathBuf, std::fs::Metadata)>, Vec<Problem>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        vec![Problem::new(
            dir.display(),
            "",
            format!("cannot read the manifest directory: {e}"),
        )]
    })?;
    let mut files: Vec<(PathBuf, std::fs::Metadata)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_manifest_name(p))
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok().filter(std::fs::Metadata::is_file)?;
            Some((p, m))
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// Reads every manifest file of `dir` ([`manifest_files`]).
pub fn load_dir(dir: &Path) -> Result<ManifestSet, Vec<Problem>> {
    let (set, problems) = load_dir_all(dir);
    if problems.is_empty() { Ok(set) } else { Err(problems) }
}

/// [`load_dir`], keeping what did parse beside the problems: `render` checks those documents
/// too, so a set refused for one malformed document still lists every other problem at once.
pub fn load_dir_all(dir: &Path) -> (ManifestSet, Vec<Problem>) {
    let mut set = ManifestSet::default();
    let files: Vec<PathBuf> = match manifest_files(dir) {
        Ok(files) => files.into_iter().map(|(p, _)| p).collect(),
        Err(problems) => return (set, problems),
    };
    let mut problems = vec![];
    if files.is_empty() {
        problems.push(Problem::new(dir.display(), "", "no *.yaml or *.yml files"));
    }
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_file(&file, &text, &mut set, &mut problems),
            Err(e) => problems.push(Problem::new(file.display(), "", format!("cannot read: {e}"))),
        }
    }
    (set, problems)
}

/// Adds the documents of one file to `set`; problems go to `problems`.
pub fn parse_file(file: &Path, text: &str, set: &mut ManifestSet, problems: &mut Vec<Problem>) {
    // The whole file at once: a syntax error anywhere refuses it (and so the whole set), and
    // documents after it could not be located reliably anyway.
    let docs = match crate::manifest_yaml::documents(text) {
        Ok(docs) => docs,
        Err(e) => {
            let at = Location {
                file: file.to_path_buf(),
                index: 0,
            };
            problems.push(Problem::new(&at, "", format!("not YAML: {}", location_only(&e))));
            return;
        }
    };
    for (index, value) in docs.into_iter().enumerate() {
        let at = Location {
            file: file.to_path_buf(),
            index,
        };
        if value.is_null() {
            continue; // `---` at the start or end of a file
        }
        parse_document(at, value, set, problems);
    }
}

fn parse_document(at: Location, value: serde_json::Value, set: &mut ManifestSet, problems: &mut Vec<Problem>) {
    let field = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let content = serde_json::to_vec(&value).ok().map(|b| content_of(&b));
    match (api_version.as_str(), kind.as_str()) {
        (CONNECTOR_API_VERSION, "Connector") => {
            if let Some(c) = typed::<Connector>(&at, value, false, problems)
                && check_metadata(&at, "Connector", &c.metadata, |k| set.connector_at(k), problems)
            {
                set.add_connector(at, c, content);
            }
        }
        ("v1", "Secret") => {
            if let Some(s) = typed::<Secret>(&at, value, true, problems)
                && check_metadata(&at, "Secret", &s.metadata, |k| set.secret_at(k), problems)
            {
                set.add_secret(at, s, content);
            }
        }
        _ => problems.push(Problem::new(
            &at,
            "kind",
            format!(
                "{api_version:?} {kind:?}: file mode reads Connector ({CONNECTOR_API_VERSION}) and Secret (v1) manifests only"
            ),
        )),
    }
}

fn typed<T: DeserializeOwned>(
    at: &Location,
    value: serde_json::Value,
    secret: bool,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(t) => Some(t),
        Err(e) => {
            let message = if secret {
                "invalid value (not shown: a Secret's values may be credentials); data values must be base64 strings, stringData values strings".to_string()
            } else {
                e.inner().to_string()
            };
            problems.push(Problem::new(at, e.path().to_string(), message));
            None
        }
    }
}

/// Name and namespace present and unique within the set; `false` when the object must be left out.
fn check_metadata<'a>(
    at: &Location,
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    defined_at: impl Fn(&ObjectKey) -> Option<&'a Location>,
    problems: &mut Vec<Problem>,
) -> bool {
    let before = problems.len();
    if meta.name.as_deref().unwrap_or_default().is_empty() {
        problems.push(Problem::new(at, "metadata.name", "required"));
    }
    if meta.namespace.as_deref().unwrap_or_default().is_empty() {
        problems.push(Problem::new(
            at,
            "metadata.namespace",
            "required in file mode (there is no kubectl context to default it from)",
        ));
    }
    if problems.len() > before {
        return false;
    }
    let key = key_of(meta);
    if let Some(first) = defined_at(&key) {
        problems.push(duplicate(at, kind, &key.0, &key.1, first));
        return false;
    }
    true
}

/// A YAML error's position without the text around it (the text may be in a Secret).
fn location_only(e: &serde_saphyr::Error) -> String {
    match e.location() {
        Some(l) => format!("syntax error at line {}, column {}", l.line(), l.column()),
        None => "syntax error".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECTOR: &str = "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {name: registry, namespace: demo}\nspec: {address: 'http://127.0.0.1:5000', auth: {name: basicAuth, secretRef: {name: creds}}, connectorClassName: oci}\n";
    const SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: creds, namespace: demo}\ntype: kubernetes.io/basic-auth\nstringData: {username: robot, password: hunter2-secret}\n";

    fn parse(text: &str) -> (ManifestSet, Vec<String>) {
        let mut set = ManifestSet::default();
        let mut problems = vec![];
        parse_file(Path::new("m.yaml"), text, &mut set, &mut problems);
        (set, problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn documents_and_their_problems() {
        let cases: Vec<(&str, String, usize, usize, Vec<&str>)> = vec![
            (
                "connector and secret",
                format!("{CONNECTOR}---\n{SECRET}"),
                1,
                1,
                vec![],
            ),
            (
                "leading and trailing separators",
                format!("---\n{CONNECTOR}---\n"),
                1,
                0,
                vec![],
            ),
            (
                "unknown kind",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: y}\n".into(),
                0,
                0,
                vec!["m.yaml document 0: kind: \"v1\" \"ConfigMap\": file mode reads Connector"],
            ),
            (
                "bad auth name, second document",
                format!("{SECRET}---\n{}", CONNECTOR.replace("basicAuth", "bearer")),
                0,
                1,
                vec!["m.yaml document 1: spec.auth.name: unknown variant `bearer`"],
            ),
            (
                "missing namespace and name",
                CONNECTOR.replace("{name: registry, namespace: demo}", "{}"),
                0,
                0,
                vec![
                    "document 0: metadata.name: required",
                    "document 0: metadata.namespace: required in file mode",
                ],
            ),
            (
                "duplicate connector",
                format!("{CONNECTOR}---\n{CONNECTOR}"),
                1,
                0,
                vec![
                    "m.yaml document 1: metadata.name: Connector demo/registry is already defined at m.yaml document 0",
                ],
            ),
            (
                "secret value of the wrong type is not echoed",
                SECRET.replace("password: hunter2-secret", "password: [hunter2-secret]"),
                0,
                0,
                vec!["m.yaml document 0: stringData.password: invalid value (not shown"],
            ),
            (
                "yaml syntax error",
                "a: [\n".into(),
                0,
                0,
                vec!["m.yaml document 0: not YAML: syntax error at line"],
            ),
        ];
        for (case, text, connectors, secrets, expected) in cases {
            let (set, problems) = parse(&text);
            assert_eq!(set.connector_count(), connectors, "{case}: {problems:?}");
            assert_eq!(set.secret_count(), secrets, "{case}: {problems:?}");
            assert_eq!(problems.len(), expected.len(), "{case}: {problems:?}");
            for (p, e) in problems.iter().zip(&expected) {
                assert!(p.contains(e), "{case}: {p:?} should contain {e:?}");
                assert!(!p.contains("hunter2"), "{case}: a Secret value in {p:?}");
            }
        }
    }

    #[test]
    fn a_directory_is_read_in_name_order_and_empty_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_dir(dir.path()).unwrap_err();
        assert!(err[0].message.contains("no *.yaml"), "{err:?}");
        std::fs::write(dir.path().join("b.yml"), SECRET).unwrap();
        std::fs::write(dir.path().join("a.yaml"), CONNECTOR).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let set = load_dir(dir.path()).unwrap();
        assert_eq!(set.connector_count(), 1);
        assert!(set.secret("demo", "creds").is_some());
        assert!(set.connectors().next().unwrap().0.file.ends_with("a.yaml"));
    }
}
