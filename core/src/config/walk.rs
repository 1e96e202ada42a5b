//! The validating walk over the JSON document: typed reads of objects, strings, lists and
//! numbers, every problem collected with its field path, unknown keys reported.
//!
//! A value of the wrong type is reported here and read as empty, and a list keeps an empty
//! placeholder at a bad item's index, so the typed checks that follow name the same paths
//! (their findings under a path already reported are dropped, see [`super::covered`]).

use serde_json::{Map, Value};

use super::ConfigError;

/// Collects errors while walking the document.
pub(super) struct Walk<'e> {
    pub(super) errors: &'e mut Vec<ConfigError>,
}

impl Walk<'_> {
    pub(super) fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    /// An object with only `known` keys (all unknown keys are reported).
    pub(super) fn object<'v>(
        &mut self,
        v: Option<&'v Value>,
        path: &str,
        known: &[&str],
        required: bool,
    ) -> Option<&'v Map<String, Value>> {
        match v {
            None if required => {
                self.err(path, "is required");
                None
            }
            None => None,
            Some(Value::Object(m)) => {
                for k in m.keys() {
                    if !known.contains(&k.as_str()) {
                        self.err(
                            format!("{path}.{k}"),
                            format!("unknown field: expected one of {}", known.join(", ")),
                        );
                    }
                }
                Some(m)
            }
            Some(_) => {
                self.err(path, "expected an object");
                None
            }
        }
    }

    /// A non-empty string; `None` (reported if required, or if present but not a usable string).
    pub(super) fn string(&mut self, m: &Map<String, Value>, path: &str, key: &str, required: bool) -> Option<String> {
        match m.get(key) {
            None if required => {
                self.err(format!("{path}.{key}"), "is required");
                None
            }
            None => None,
            Some(Value::String(s)) if s.is_empty() => {
                self.err(format!("{path}.{key}"), "must not be empty");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.err(format!("{path}.{key}"), "expected a string");
                None
            }
        }
    }

    /// A required string, read as empty when it is missing or unusable (reported).
    pub(super) fn required(&mut self, m: &Map<String, Value>, path: &str, key: &str) -> String {
        self.string(m, path, key, true).unwrap_or_default()
    }

    /// A list of non-empty strings; a bad item is reported and kept as `""` at its index.
    pub(super) fn strings(&mut self, m: &Map<String, Value>, path: &str, key: &str, required: bool) -> Vec<String> {
        // The path is formatted only for a problem: this runs for every list of every entry.
        let p = || format!("{path}.{key}");
        match m.get(key) {
            None if required => {
                self.err(p(), "is required: expected a non-empty list of strings");
                vec![]
            }
            None => vec![],
            Some(Value::Array(items)) => {
                if required && items.is_empty() {
                    self.err(p(), "must not be empty");
                }
                let mut out = vec![];
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) if !s.is_empty() => out.push(s.clone()),
                        _ => {
                            self.err(format!("{}[{i}]", p()), "expected a non-empty string");
                            out.push(String::new());
                        }
                    }
                }
                out
            }
            Some(_) => {
                self.err(p(), "expected a list of strings");
                vec![]
            }
        }
    }

    /// An optional integer; one that is not a non-negative integer is reported with the range
    /// the typed check enforces.
    pub(super) fn number(&mut self, m: &Map<String, Value>, path: &str, key: &str, range: (u64, u64)) -> Option<u64> {
        let v = m.get(key)?;
        let n = v.as_u64();
        if n.is_none() {
            self.err(format!("{path}.{key}"), super::check::range_message(range));
        }
        n
    }

    pub(super) fn boolean(&mut self, m: &Map<String, Value>, path: &str, key: &str) -> bool {
        match m.get(key) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                self.err(format!("{path}.{key}"), "expected true or false");
                false
            }
        }
    }
}
