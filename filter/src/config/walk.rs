//! The validating walk over the JSON document: every problem collected with its field path,
//! unknown keys reported, typed reads of strings, numbers, lists.

use serde_json::{Map, Value};

use super::*;

/// Collects errors while walking the document.
pub(super) struct Walk<'e> {
    pub(super) errors: &'e mut Vec<ConfigError>,
}

impl Walk<'_> {
    pub(super) fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
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

    pub(super) fn string<'v>(
        &mut self,
        m: &'v Map<String, Value>,
        path: &str,
        key: &str,
        required: bool,
    ) -> Option<&'v str> {
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
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                self.err(format!("{path}.{key}"), "expected a string");
                None
            }
        }
    }

    pub(super) fn strings(&mut self, m: &Map<String, Value>, path: &str, key: &str, required: bool) -> Vec<String> {
        let p = format!("{path}.{key}");
        match m.get(key) {
            None if required => {
                self.err(p, "is required: expected a non-empty list of strings");
                vec![]
            }
            None => vec![],
            Some(Value::Array(items)) => {
                if required && items.is_empty() {
                    self.err(&p, "must not be empty");
                }
                let mut out = vec![];
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) if !s.is_empty() => out.push(s.clone()),
                        _ => self.err(format!("{p}[{i}]"), "expected a non-empty string"),
                    }
                }
                out
            }
            Some(_) => {
                self.err(p, "expected a list of strings");
                vec![]
            }
        }
    }

    pub(super) fn number(
        &mut self,
        m: &Map<String, Value>,
        path: &str,
        key: &str,
        range: (u64, u64),
        default: u64,
    ) -> u64 {
        match m.get(key) {
            None => default,
            Some(v) => match v.as_u64() {
                Some(n) if n >= range.0 && n <= range.1 => n,
                _ => {
                    self.err(
                        format!("{path}.{key}"),
                        format!("expected an integer from {} to {}", range.0, range.1),
                    );
                    default
                }
            },
        }
    }
}
