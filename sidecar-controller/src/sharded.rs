//! Owns [`ByNamespace`], the map the controller publishes per-connector state in (what is
//! served, what is left out, the credentials the channel hands out).
//!
//! Each namespace's entries sit behind their own `Arc`: a published copy costs one pointer per
//! namespace, and a change copies only the namespace it touches (issue 17: at 20,000
//! connectors, copying every entry on every change was most of a change's cost).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// An object's identity as a shared allocation: the same address, the same unchanged object
/// (how file mode's cache and the reflector's store hand out objects that did not change).
pub fn address<T>(a: &Arc<T>) -> usize {
    Arc::as_ptr(a).cast::<()>() as usize
}

/// `(namespace, name) → V`, sharded by namespace. Cloning shares every namespace's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByNamespace<V> {
    shards: BTreeMap<String, Arc<BTreeMap<String, V>>>,
    len: usize,
}

impl<V> Default for ByNamespace<V> {
    fn default() -> Self {
        Self {
            shards: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<V: Clone> ByNamespace<V> {
    pub fn get(&self, namespace: &str, name: &str) -> Option<&V> {
        self.shards.get(namespace)?.get(name)
    }

    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        self.get(namespace, name).is_some()
    }

    /// Inserts, copying the namespace's entries first if a published copy still shares them.
    pub fn insert(&mut self, namespace: &str, name: &str, value: V) -> Option<V> {
        let shard = match self.shards.get_mut(namespace) {
            Some(s) => s,
            None => self.shards.entry(namespace.to_string()).or_default(),
        };
        let old = Arc::make_mut(shard).insert(name.to_string(), value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<V> {
        let shard = self.shards.get_mut(namespace)?;
        if !shard.contains_key(name) {
            return None;
        }
        let old = Arc::make_mut(shard).remove(name);
        if shard.is_empty() {
            self.shards.remove(namespace);
        }
        self.len -= usize::from(old.is_some());
        old
    }

    /// Sets namespace `namespace`'s entries to `entries` (none: the namespace goes).
    pub fn replace_namespace(&mut self, namespace: &str, entries: BTreeMap<String, V>) {
        let before = self.shards.get(namespace).map_or(0, |s| s.len());
        self.len = self.len - before + entries.len();
        if entries.is_empty() {
            self.shards.remove(namespace);
        } else {
            self.shards.insert(namespace.to_string(), Arc::new(entries));
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, by namespace then name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &V)> {
        self.shards
            .iter()
            .flat_map(|(ns, shard)| shard.iter().map(move |(name, v)| (ns.as_str(), name.as_str(), v)))
    }

    /// The namespace's entries, shared (for comparing two maps without walking them).
    pub fn shard(&self, namespace: &str) -> Option<&Arc<BTreeMap<String, V>>> {
        self.shards.get(namespace)
    }

    /// Namespaces whose entries are not the very ones `other` holds (added, removed, or
    /// copied on a change), found by comparing each namespace's shared entries by address,
    /// without looking at them.
    pub fn differing_namespaces(&self, other: &Self) -> BTreeSet<String> {
        self.namespaces()
            .chain(other.namespaces())
            .filter(|ns| match (self.shard(ns), other.shard(ns)) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                _ => true,
            })
            .map(str::to_string)
            .collect()
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.shards.keys().map(String::as_str)
    }
}

impl<V: Clone> FromIterator<((String, String), V)> for ByNamespace<V> {
    fn from_iter<I: IntoIterator<Item = ((String, String), V)>>(iter: I) -> Self {
        let mut m = Self::default();
        for ((ns, name), v) in iter {
            m.insert(&ns, &name, v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_copies_only_its_namespace_and_leaves_published_copies_alone() {
        let mut m: ByNamespace<u32> = ByNamespace::default();
        m.insert("a", "x", 1);
        m.insert("a", "y", 2);
        m.insert("b", "z", 3);
        let published = m.clone();
        m.insert("a", "x", 10);
        assert_eq!(published.get("a", "x"), Some(&1), "the published copy keeps its value");
        assert_eq!(m.get("a", "x"), Some(&10));
        assert!(
            Arc::ptr_eq(published.shard("b").unwrap(), m.shard("b").unwrap()),
            "an untouched namespace stays shared"
        );
        assert!(!Arc::ptr_eq(published.shard("a").unwrap(), m.shard("a").unwrap()));
        assert_eq!(m.differing_namespaces(&published), BTreeSet::from(["a".to_string()]));
        assert_eq!(m.remove("b", "z"), Some(3));
        assert_eq!(m.remove("b", "z"), None);
        assert_eq!((m.len(), published.len()), (2, 3));
        assert!(m.shard("b").is_none(), "an emptied namespace goes");
        let all: Vec<_> = m.iter().map(|(ns, n, v)| format!("{ns}/{n}={v}")).collect();
        assert_eq!(all, ["a/x=10", "a/y=2"]);
    }
}
