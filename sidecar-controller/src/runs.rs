//! Owns an ordered map kept as runs of neighbouring entries, each run with its entries' text
//! joined and kept (issue 17: a change costs what it changes). The live renderer keeps the
//! served connectors in it, in settling order: a change re-joins the runs it touched (at most
//! `2 * RUN` entries each), and the configuration document is made of the runs' texts, shared,
//! where it was a walk over every served part (20,000 scattered allocations at 20,000
//! connectors, a third of a change's controller CPU in a `perf` profile).
//!
//! Invariant: a run's key is at most its first entry's key and greater than every entry of the
//! run before it, so the run holding a key is the last run whose key is at most that key.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Entries per run after a split; a run splits past twice this.
const RUN: usize = 64;

struct Run<K, V> {
    entries: BTreeMap<K, V>,
    /// The entries' texts joined with `,`, as of the last [`Runs::refresh`]; shared with the
    /// documents made since.
    text: Arc<str>,
    /// `text`'s part id, made when first asked for ([`Runs::parts`]) and kept while the text is.
    id: Option<Arc<str>>,
    /// An entry went in or out since.
    stale: bool,
}

impl<K, V> Run<K, V> {
    fn new(entries: BTreeMap<K, V>) -> Self {
        Self {
            entries,
            text: Arc::from(""),
            id: None,
            stale: true,
        }
    }
}

pub(crate) struct Runs<K, V> {
    runs: BTreeMap<K, Run<K, V>>,
    /// A run was made since the last [`Runs::refresh`] (the document may differ even where
    /// every old run's text is the same).
    reshaped: bool,
}

impl<K, V> Default for Runs<K, V> {
    fn default() -> Self {
        Self {
            runs: BTreeMap::new(),
            reshaped: false,
        }
    }
}

impl<K: Ord + Clone, V> Runs<K, V> {
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let start = self
            .runs
            .range(..=&key)
            .next_back()
            .or_else(|| self.runs.iter().next())
            .map(|(start, _)| start.clone());
        let Some(mut start) = start else {
            self.reshaped = true;
            self.runs.insert(key.clone(), Run::new(BTreeMap::from([(key, value)])));
            return None;
        };
        if key < start {
            // Before every run: the first run takes it, keyed by it from now on.
            if let Some(run) = self.runs.remove(&start) {
                self.runs.insert(key.clone(), run);
            }
            start = key.clone();
        }
        let run = self.runs.get_mut(&start)?;
        run.stale = true;
        let old = run.entries.insert(key, value);
        if run.entries.len() > 2 * RUN
            && let Some(middle) = run.entries.keys().nth(RUN).cloned()
        {
            let tail = run.entries.split_off(&middle);
            self.runs.insert(middle, Run::new(tail));
            self.reshaped = true;
        }
        old
    }

    /// An emptied run stays until the next [`Runs::refresh`], so that taking an entry out and
    /// putting it back (settling again) leaves the runs as they were.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let run = self.runs.range_mut(..=key).next_back()?.1;
        let old = run.entries.remove(key)?;
        run.stale = true;
        Some(old)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.runs.values().flat_map(|run| run.entries.values())
    }

    /// Joins again the texts of the runs touched since the last call (entries without a text
    /// are skipped). Gives whether [`Runs::pieces`] may now give something else than it did
    /// before the call (`false`: the same, byte for byte).
    pub fn refresh<F: Fn(&V) -> Option<&str>>(&mut self, text: F) -> bool {
        let mut changed = std::mem::take(&mut self.reshaped);
        self.runs.retain(|_, run| {
            if run.entries.is_empty() {
                // Its text is no longer in the document.
                changed |= !run.text.is_empty();
                return false;
            }
            true
        });
        for run in self.runs.values_mut().filter(|run| run.stale) {
            let texts = || run.entries.values().filter_map(&text);
            let mut joined = String::with_capacity(texts().map(|t| t.len() + 1).sum());
            for (i, t) in texts().enumerate() {
                if i > 0 {
                    joined.push(',');
                }
                joined.push_str(t);
            }
            if *joined != *run.text {
                changed = true;
                run.text = joined.into();
                run.id = None;
            }
            run.stale = false;
        }
        changed
    }

    /// The runs' texts as of the last [`Runs::refresh`], each with its part id
    /// (`connector_core::channel::part_id`; hashed only for a run whose text changed): the
    /// parts of a document that lists `parts`.
    pub fn parts(&mut self) -> Vec<(Arc<str>, Arc<str>)> {
        let runs = self.runs.values_mut().filter(|run| !run.text.is_empty());
        runs.map(|run| {
            let text = &run.text;
            let id = run
                .id
                .get_or_insert_with(|| Arc::from(connector_core::channel::part_id(text.as_bytes())));
            (Arc::clone(id), Arc::clone(text))
        })
        .collect()
    }

    /// Every entry's text, as of the last [`Runs::refresh`], joined with `,`, as pieces: each
    /// run's joined text (shared, not copied) and the commas between them.
    pub fn pieces(&self, out: &mut Vec<Arc<str>>) {
        let comma: Arc<str> = Arc::from(",");
        let texts = self.runs.values().map(|run| &run.text).filter(|t| !t.is_empty());
        for (i, t) in texts.enumerate() {
            if i > 0 {
                out.push(Arc::clone(&comma));
            }
            out.push(Arc::clone(t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    fn text(v: &Option<String>) -> Option<&str> {
        v.as_deref()
    }

    fn written(runs: &Runs<u32, Option<String>>) -> String {
        let mut pieces = vec![];
        runs.pieces(&mut pieces);
        pieces.concat()
    }

    /// Random inserts, replacements and removals (some of an entry that is put back as it
    /// was, as settling again does), in batches: after each batch the runs write what joining
    /// a plain ordered map gives, and `refresh` says "unchanged" only when that is so.
    #[test]
    fn the_runs_write_what_joining_the_whole_map_gives() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut runs: Runs<u32, Option<String>> = Runs::default();
        let mut model: BTreeMap<u32, Option<String>> = BTreeMap::new();
        let mut last = String::new();
        let (mut unchanged, mut most_runs) = (0, 0);
        for batch in 0..400 {
            // Grow to about 1,000 entries, then hover there; keys from a space of 2,000.
            for _ in 0..rng.below(12) {
                let key = rng.below(2_000) as u32;
                match rng.below(5) {
                    0 | 1 if batch < 150 || model.len() < 1_000 => {
                        let value = (rng.below(8) > 0).then(|| format!("e{key}.{}", rng.below(3)));
                        assert_eq!(runs.insert(key, value.clone()), model.insert(key, value));
                    }
                    2 => assert_eq!(runs.remove(&key), model.remove(&key)),
                    3 => {
                        if let Some(v) = model.get(&key) {
                            let back = runs.remove(&key);
                            assert_eq!(back.as_ref(), Some(v));
                            runs.insert(key, back.flatten());
                        }
                    }
                    _ => {
                        let key = model.keys().next_back().map_or(0, |k| k + 1);
                        assert_eq!(
                            runs.insert(key, Some(format!("tail{key}"))),
                            model.insert(key, Some(format!("tail{key}")))
                        );
                    }
                }
            }
            let changed = runs.refresh(text);
            let now = written(&runs);
            let expected: Vec<&str> = model.values().filter_map(|v| v.as_deref()).collect();
            assert_eq!(now, expected.join(","), "batch {batch}");
            // The parts are the same text cut at the runs, each named by its content.
            let parts = runs.parts();
            let texts: Vec<&str> = parts.iter().map(|(_, t)| &**t).collect();
            assert_eq!(texts.join(","), now, "batch {batch}");
            for (id, t) in &parts {
                assert_eq!(**id, connector_core::channel::part_id(t.as_bytes()));
            }
            if !changed {
                assert_eq!(now, last, "batch {batch}: unchanged, it said");
                unchanged += 1;
            }
            let values: Vec<&Option<String>> = runs.values().collect();
            assert_eq!(values, model.values().collect::<Vec<_>>());
            most_runs = most_runs.max(runs.runs.len());
            assert!(runs.runs.values().all(|r| r.entries.len() <= 2 * RUN));
            last = now;
        }
        // The test exercised what it claims: batches that changed nothing, and many runs.
        assert!(unchanged > 20, "{unchanged} unchanged batches");
        assert!(most_runs > 10, "{most_runs} runs at most");
    }

    /// A change joins again the run it touches, not the others.
    #[test]
    fn a_change_joins_again_only_the_run_it_touches() {
        let mut runs: Runs<u32, Option<String>> = Runs::default();
        for k in 0..5_000 {
            runs.insert(k * 2, Some(format!("e{k}")));
        }
        assert!(runs.refresh(text));
        assert!(!runs.refresh(text), "nothing changed");
        let count = runs.runs.len();
        assert!(count >= 5_000 / (2 * RUN), "{count} runs");
        runs.insert(1_001, Some("new".into()));
        assert_eq!(runs.runs.values().filter(|r| r.stale).count(), 1);
        assert!(runs.refresh(text));
        runs.remove(&4_000);
        assert_eq!(runs.runs.values().filter(|r| r.stale).count(), 1);
        assert!(runs.refresh(text));
        assert!(written(&runs).contains("e500,new,e501"));
    }
}
