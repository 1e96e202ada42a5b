//! The compiled configuration's lookups: connectors by name and by host name. The maps are
//! sharded and the shards shared (`Rc`) between a configuration and the next one compiled from
//! it, so that a push changing one connector of 20,000 copies the few shards that connector's
//! keys fall in, not two maps of 20,000 (issue 17).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hash};
use std::rc::Rc;

use super::Connector;

/// At 20,000 connectors about 300 keys a shard: what one changed key costs to copy.
const SHARDS: usize = 64;

/// A map cut into [`SHARDS`] maps by a fixed hash of the key; a clone shares every shard, and
/// a change copies the one shard it touches.
pub(super) struct Sharded<K, V> {
    shards: Vec<Rc<HashMap<K, V>>>,
}

impl<K, V> Clone for Sharded<K, V> {
    fn clone(&self) -> Self {
        Self {
            shards: self.shards.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Sharded<K, V> {
    /// Room for about `n` keys (a map grown key by key rehashes every shard many times).
    fn with_capacity(n: usize) -> Self {
        let each = n / SHARDS + n / SHARDS / 4;
        Self {
            shards: (0..SHARDS).map(|_| Rc::new(HashMap::with_capacity(each))).collect(),
        }
    }

    /// The shard of a key. The same in every VM of a build (the maps inside draw their own
    /// keys); `Borrow` guarantees a borrowed key hashes as the owned one.
    fn shard_of<Q: Hash + ?Sized>(key: &Q) -> usize {
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        usize::try_from(hash % SHARDS as u64).unwrap_or(0)
    }

    pub(super) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards.get(Self::shard_of(key))?.get(key)
    }

    fn insert(&mut self, key: K, value: V) {
        if let Some(shard) = self.shards.get_mut(Self::shard_of(&key)) {
            Rc::make_mut(shard).insert(key, value);
        }
    }

    /// Removes `key` if `is_it` says its value is the one to remove.
    fn remove_if<Q>(&mut self, key: &Q, is_it: impl Fn(&V) -> bool)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(shard) = self.shards.get_mut(Self::shard_of(key)) else {
            return;
        };
        // Looked at before `make_mut`: a key that is not there copies nothing.
        if shard.get(key).is_some_and(&is_it) {
            Rc::make_mut(shard).remove(key);
        }
    }
}

/// One accepted entry: its text as it stood in the document, its compiled connector and the
/// host names it claims (the pattern's and its own).
pub(super) struct Slot {
    pub text: Rc<str>,
    pub connector: Rc<Connector>,
    pub hosts: Vec<String>,
}

/// One map type for both lookups (one copy of the map code in the module, which is held under
/// 700 KB): a connector's name is keyed `<namespace>/<name>` (neither has a `/`).
#[derive(Clone)]
pub(super) struct Index {
    pub by_name: Sharded<Rc<str>, Rc<Slot>>,
    pub by_host: Sharded<Rc<str>, Rc<Slot>>,
}

pub(super) fn name_key(namespace: &str, name: &str) -> String {
    [namespace, "/", name].concat()
}

impl Index {
    /// Room for `n` connectors.
    pub(super) fn with_capacity(n: usize) -> Self {
        Self {
            by_name: Sharded::with_capacity(n),
            by_host: Sharded::with_capacity(n),
        }
    }

    /// How many shards of the two maps differ from `other`'s (copied), and how many are
    /// shared.
    #[cfg(test)]
    pub(super) fn shards_changed(&self, other: &Index) -> (usize, usize) {
        fn count<K, V>(a: &Sharded<K, V>, b: &Sharded<K, V>) -> (usize, usize) {
            let same = a.shards.iter().zip(&b.shards).filter(|(x, y)| Rc::ptr_eq(x, y)).count();
            (a.shards.len() - same, same)
        }
        let (n, h) = (
            count(&self.by_name, &other.by_name),
            count(&self.by_host, &other.by_host),
        );
        (n.0 + h.0, n.1 + h.1)
    }

    /// Whether `slot`'s name or one of its host names belongs to another entry.
    pub(super) fn conflicts(&self, slot: &Rc<Slot>) -> bool {
        let c = &slot.connector;
        let other = |held: &Rc<Slot>| !Rc::ptr_eq(held, slot);
        self.by_name.get(c.label()).is_some_and(other)
            || slot
                .hosts
                .iter()
                .any(|h| self.by_host.get(h.as_str()).is_some_and(other))
    }

    /// Adds `slot` under its name and host names.
    pub(super) fn insert(&mut self, slot: &Rc<Slot>) {
        let c = &slot.connector;
        self.by_name.insert(Rc::from(c.label()), Rc::clone(slot));
        for h in &slot.hosts {
            self.by_host.insert(Rc::from(h.as_str()), Rc::clone(slot));
        }
    }

    /// Takes away what `slot` was found by.
    pub(super) fn remove(&mut self, slot: &Rc<Slot>) {
        let c = &slot.connector;
        let is_it = |held: &Rc<Slot>| Rc::ptr_eq(held, slot);
        self.by_name.remove_if(c.label(), is_it);
        for h in &slot.hosts {
            self.by_host.remove_if(h.as_str(), is_it);
        }
    }
}
