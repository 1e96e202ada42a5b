//! What a VM that accepted a document leaves for the VMs that have none: the document, and the
//! names and host names its connectors claim (sorted). With it a fresh VM can decide whether
//! a new document is valid as a change of that one, without compiling the connectors it
//! repeats.
//!
//! Why: Envoy validates every pushed filter configuration in a fresh "canary" VM (a clone that
//! is configured once and killed), which can never reuse a running configuration. At 20,000
//! connectors its full compile was most of a push's CPU in Envoy (issue 17). The canary, and
//! any other VM with no configuration yet, reads the memo from the VM's shared data (one per
//! `vm_id` and process: the environment the credentials come from is the same), decides with
//! [`check_change`], and writes the memo of what it accepted.
//!
//! Format: the document's length (u32, little endian), the document, then the claimed keys
//! joined by `\n` in sorted order: `n:<namespace>/<name>` and `h:<host>`. A key is built only
//! from accepted names and host names (DNS labels and names: no `\n`).

use std::collections::{HashMap, HashSet};

use connector_core::config::{ConnectorEntry, entry_hosts, parse_entry, read_settings, split};

use super::{Config, common_ends, compile_connector};

/// The shared data key. The module's version is part of it: a memo says "accepted by these
/// rules", and another build may have other rules.
pub const KEY: &str = concat!("oci-connector/accepted-document/1/", env!("CARGO_PKG_VERSION"));

/// The memo of `json`, which compiled to `config` (`None` when the document could not be cut
/// at its entries: nothing to compare with then).
pub fn memo_of(json: &[u8], config: &Config) -> Option<Vec<u8>> {
    config.settings.as_ref()?;
    let mut keys: Vec<String> = vec![];
    for slot in &config.slots {
        let c = &slot.connector;
        keys.push(name_key(&c.namespace, &c.name));
        keys.extend(slot.hosts.iter().map(|h| host_key(h)));
    }
    keys.sort_unstable();
    keys.dedup();
    encode(json, keys.iter().map(String::as_str))
}

/// Whether `json` is valid, decided as a change of the document in `memo` (accepted before by
/// this module, in this process): `Some(its memo)` when it is. `None` when it is not, or when
/// this cannot tell (other settings, no entries on either side, anything unexpected): then
/// only a full compile can say, and list the problems.
///
/// The same decision as [`super::compile_change`], on the memo instead of a compiled
/// configuration: entries with unchanged text are valid (same settings, same environment), a
/// new one is read, checked and compiled alone, and the names and host names it claims must be
/// free: not claimed by a kept entry, nor by another new one.
pub fn check_change(json: &[u8], memo: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Option<Vec<u8>> {
    let (doc, keys) = decode(memo)?;
    let (new, old) = (split(json)?, split(doc)?);
    if new.settings != old.settings || new.entries.is_empty() || old.entries.is_empty() {
        return None;
    }
    let settings = read_settings(&new.settings)?;
    let (has_controller, pattern) = (settings.controller.is_some(), settings.proxy.host_pattern());
    let (n, o) = (&new.entries, &old.entries);
    let (head, tail) = common_ends(n, o, |o| o);
    let new_middle = n.get(head..n.len().saturating_sub(tail))?;
    let old_middle = o.get(head..o.len().saturating_sub(tail))?;
    // Each old entry of the middle may be kept once (a repeated text is read again, and then
    // claims a name already taken).
    let mut claimable: HashMap<&str, usize> = HashMap::new();
    for text in old_middle {
        *claimable.entry(text).or_default() += 1;
    }
    let mut fresh = vec![];
    for text in new_middle {
        match claimable.get_mut(text) {
            Some(left) if *left > 0 => *left -= 1,
            _ => fresh.push(*text),
        }
    }
    let mut removed: HashSet<String> = HashSet::new();
    for (text, left) in claimable {
        for _ in 0..left {
            removed.extend(claims(&parse_entry(text, has_controller)?, pattern));
        }
    }
    let claimed = |k: &str| keys.binary_search(&k).is_ok() && !removed.contains(k);
    let mut added: HashSet<String> = HashSet::new();
    for text in fresh {
        let entry = parse_entry(text, has_controller)?;
        let mut found = vec![];
        compile_connector(&entry, "connectors[]", env, &mut found).filter(|_| found.is_empty())?;
        let mine = claims(&entry, pattern);
        if mine.iter().any(|k| claimed(k) || added.contains(k)) {
            return None;
        }
        added.extend(mine);
    }
    let mut all: Vec<&str> = keys.iter().copied().filter(|k| !removed.contains(*k)).collect();
    all.extend(added.iter().map(String::as_str));
    all.sort_unstable();
    encode(json, all.into_iter())
}

fn name_key(namespace: &str, name: &str) -> String {
    format!("n:{namespace}/{name}")
}

fn host_key(host: &str) -> String {
    format!("h:{host}")
}

/// The keys an entry claims, each once (an entry may name its pattern host again).
fn claims(entry: &ConnectorEntry, pattern: &str) -> HashSet<String> {
    let mut keys: HashSet<String> = entry_hosts(entry, pattern).iter().map(|h| host_key(h)).collect();
    keys.insert(name_key(&entry.namespace, &entry.name));
    keys
}

fn encode<'a>(json: &[u8], keys: impl Iterator<Item = &'a str>) -> Option<Vec<u8>> {
    let len = u32::try_from(json.len()).ok()?;
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(json);
    for (i, k) in keys.enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend_from_slice(k.as_bytes());
    }
    Some(out)
}

fn decode(memo: &[u8]) -> Option<(&[u8], Vec<&str>)> {
    let len = usize::try_from(u32::from_le_bytes(memo.get(..4)?.try_into().ok()?)).ok()?;
    let doc = memo.get(4..4usize.checked_add(len)?)?;
    let rest = std::str::from_utf8(memo.get(4 + len..)?).ok()?;
    let keys: Vec<&str> = if rest.is_empty() {
        vec![]
    } else {
        rest.split('\n').collect()
    };
    // Sorted, or the binary search would miss keys: a memo that is not is no memo.
    keys.windows(2)
        .all(|w| matches!(w, [a, b] if a < b))
        .then_some((doc, keys))
}
