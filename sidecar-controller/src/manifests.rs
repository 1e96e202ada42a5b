//! Owns reading Connector and Secret manifests from files (the YAML a user would `kubectl
//! apply`, several documents per file allowed) into typed objects, with every problem located by
//! file, document index and field path.
//!
//! A problem inside a Secret document is reported by path only: serde's messages quote the
//! offending value, and in a Secret that value may be the password.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::crd::Connector;

const CONNECTOR_API_VERSION: &str = "connectors.alauda.io/v1alpha1";

/// Where a document came from: its file and its 0-based index among the file's documents.
#[derive(Debug, Clone, PartialEq, Eq)]
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
/// Indexed by `(namespace, name)`, so looking a Secret up or finding a duplicate costs the same
/// at 20,000 objects as at 10 (issue 17: both were linear scans inside loops). Objects added
/// through [`Self::add_connector`] / [`Self::add_secret`] are indexed; a set whose vectors were
/// pushed to directly falls back to scanning.
#[derive(Debug, Default, Clone)]
pub struct ManifestSet {
    /// Shared, not copied: file mode's per-file cache and the set it publishes hold the same
    /// objects (a copy of every object per change cost memory and time linear in N, issue 17).
    pub connectors: Vec<(Location, Arc<Connector>)>,
    pub secrets: Vec<(Location, Arc<Secret>)>,
    connector_index: Index<usize>,
    secret_index: Index<usize>,
    /// A digest of each object's content, when its source computed one: what the pipeline's
    /// render cache is keyed by, so an unchanged object is not rendered again.
    connector_content: Index<Content>,
    secret_content: Index<Content>,
}

/// namespace → name → value: looked up with borrowed names, so the pipeline's walk over every
/// connector allocates nothing per lookup.
#[derive(Debug, Clone)]
struct Index<V> {
    by_ns: HashMap<String, HashMap<String, V>>,
    len: usize,
}

impl<V> Default for Index<V> {
    fn default() -> Self {
        Self {
            by_ns: HashMap::new(),
            len: 0,
        }
    }
}

impl<V: Copy> Index<V> {
    fn get(&self, namespace: &str, name: &str) -> Option<V> {
        self.by_ns.get(namespace)?.get(name).copied()
    }

    fn insert(&mut self, (namespace, name): ObjectKey, v: V) {
        let names = match self.by_ns.get_mut(&namespace) {
            Some(n) => n,
            None => self.by_ns.entry(namespace).or_default(),
        };
        if names.insert(name, v).is_none() {
            self.len += 1;
        }
    }

    fn len(&self) -> usize {
        self.len
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
        let c = c.into();
        let key = key_of(&c.metadata);
        if self.connector_index.len() == self.connectors.len() {
            self.connector_index.insert(key.clone(), self.connectors.len());
        }
        if let Some(d) = content {
            self.connector_content.insert(key, d);
        }
        self.connectors.push((at, c));
    }

    /// Adds a Secret (the caller has checked it is not a duplicate), with its content digest.
    pub fn add_secret(&mut self, at: Location, s: impl Into<Arc<Secret>>, content: Option<Content>) {
        let s = s.into();
        let key = key_of(&s.metadata);
        if self.secret_index.len() == self.secrets.len() {
            self.secret_index.insert(key.clone(), self.secrets.len());
        }
        if let Some(d) = content {
            self.secret_content.insert(key, d);
        }
        self.secrets.push((at, s));
    }

    /// The Secret `namespace/name`, if the set has it.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<&Secret> {
        self.shared_secret(namespace, name).map(|s| &**s)
    }

    /// The Secret `namespace/name` as the set shares it: an unchanged Secret is the same
    /// allocation from one set to the next (file mode's per-file cache), which the pipeline
    /// compares instead of the content.
    pub fn shared_secret(&self, namespace: &str, name: &str) -> Option<&Arc<Secret>> {
        if self.secret_index.len() == self.secrets.len() {
            let i = self.secret_index.get(namespace, name)?;
            return self.secrets.get(i).map(|(_, s)| s);
        }
        self.secrets
            .iter()
            .map(|(_, s)| s)
            .find(|s| s.metadata.namespace.as_deref() == Some(namespace) && s.metadata.name.as_deref() == Some(name))
    }

    /// Where the Connector `namespace/name` was defined, if the set has it.
    fn connector_at(&self, key: &ObjectKey) -> Option<&Location> {
        if self.connector_index.len() == self.connectors.len() {
            return self
                .connector_index
                .get(&key.0, &key.1)
                .and_then(|i| self.connectors.get(i))
                .map(|(l, _)| l);
        }
        self.connectors
            .iter()
            .find(|(_, c)| key_of(&c.metadata) == *key)
            .map(|(l, _)| l)
    }

    fn secret_at(&self, key: &ObjectKey) -> Option<&Location> {
        if self.secret_index.len() == self.secrets.len() {
            return self
                .secret_index
                .get(&key.0, &key.1)
                .and_then(|i| self.secrets.get(i))
                .map(|(l, _)| l);
        }
        self.secrets
            .iter()
            .find(|(_, s)| key_of(&s.metadata) == *key)
            .map(|(l, _)| l)
    }

    /// The content digest of the Connector `namespace/name`, when its source computed one.
    pub fn connector_content(&self, namespace: &str, name: &str) -> Option<Content> {
        self.connector_content.get(namespace, name)
    }

    /// The content digest of the Secret `namespace/name`, when its source computed one.
    pub fn secret_content(&self, namespace: &str, name: &str) -> Option<Content> {
        self.secret_content.get(namespace, name)
    }

    /// Adds every object of `other` (parsed from another file) that is not already defined
    /// here; a duplicate is a problem at its location, as when both were in one file.
    pub fn merge(&mut self, other: &ManifestSet, problems: &mut Vec<Problem>) {
        for (at, c) in &other.connectors {
            let key = key_of(&c.metadata);
            if let Some(first) = self.connector_at(&key) {
                problems.push(duplicate(at, "Connector", &key, first));
                continue;
            }
            self.add_connector(at.clone(), c.clone(), other.connector_content(&key.0, &key.1));
        }
        for (at, s) in &other.secrets {
            let key = key_of(&s.metadata);
            if let Some(first) = self.secret_at(&key) {
                problems.push(duplicate(at, "Secret", &key, first));
                continue;
            }
            self.add_secret(at.clone(), s.clone(), other.secret_content(&key.0, &key.1));
        }
    }
}

fn duplicate(at: &Location, kind: &str, key: &ObjectKey, first: &Location) -> Problem {
    Problem::new(
        at,
        "metadata.name",
        format!("{kind} {}/{} is already defined at {first}", key.0, key.1),
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
    let files: Vec<PathBuf> = manifest_files(dir)?.into_iter().map(|(p, _)| p).collect();
    let mut set = ManifestSet::default();
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
    if problems.is_empty() { Ok(set) } else { Err(problems) }
}

/// Adds the documents of one file to `set`; problems go to `problems`.
pub fn parse_file(file: &Path, text: &str, set: &mut ManifestSet, problems: &mut Vec<Problem>) {
    // The whole file at once: a syntax error anywhere refuses it (and so the whole set), and
    // documents after it could not be located reliably anyway.
    let docs = match serde_saphyr::from_multiple::<serde_json::Value>(text) {
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
        problems.push(duplicate(at, kind, &key, first));
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
            assert_eq!(set.connectors.len(), connectors, "{case}: {problems:?}");
            assert_eq!(set.secrets.len(), secrets, "{case}: {problems:?}");
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
        assert_eq!(set.connectors.len(), 1);
        assert!(set.secret("demo", "creds").is_some());
        assert!(set.connectors[0].0.file.ends_with("a.yaml"));
    }
}
