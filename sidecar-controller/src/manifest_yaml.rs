//! Manifest YAML → JSON values: a fast path for the plain YAML manifests are written in, with
//! serde-saphyr for everything else.
//!
//! Why: at 20,000 connectors file mode's cold start spent most of its time in serde-saphyr
//! (55–120 µs of CPU per two-document manifest file on the 2-core test machine; the event
//! parser of `yaml-rust2` plus this builder take 20–30 µs). The fast path reads a strict
//! subset: block and flow mappings and sequences, string keys, and scalars whose meaning is not
//! in doubt (strings, `null`, `true`/`false`, plain decimal integers). Anything else — anchors,
//! aliases, tags, merge keys, duplicate keys, YAML 1.1 booleans (`yes`, `off`), floats, octal or
//! signed numbers, a syntax error, a file near serde-saphyr's budget — makes it give up on the
//! file and serde-saphyr reads it, so the values (and every error message) are serde-saphyr's
//! by construction; `the_fast_path_gives_what_saphyr_gives` checks the two against each other
//! on generated documents.

use serde_json::Value;
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::TScalarStyle;

/// The non-null documents of `text`, as serde-saphyr's `from_multiple` gives them; the error is
/// serde-saphyr's.
pub fn documents(text: &str) -> Result<Vec<Value>, serde_saphyr::Error> {
    match fast_documents(text) {
        Some(docs) => Ok(docs),
        None => serde_saphyr::from_multiple::<Value>(text),
    }
}

/// The documents of `text` if all of it is in the fast path's subset; `None` otherwise.
pub fn fast_documents(text: &str) -> Option<Vec<Value>> {
    if text.len() > MAX_BYTES {
        return None;
    }
    let mut parser = Parser::new_from_str(text);
    let mut docs = vec![];
    let mut nodes = 0;
    loop {
        match parser.next_token().ok()?.0 {
            Event::StreamStart | Event::DocumentEnd => {}
            Event::StreamEnd => return Some(docs),
            Event::DocumentStart => {
                if docs.len() >= MAX_DOCUMENTS {
                    return None;
                }
                let first = parser.next_token().ok()?.0;
                let value = node(&mut parser, first, 0, &mut nodes)?;
                // Empty documents (`---` at the start or end of a file) are skipped, as serde-saphyr does.
                if !value.is_null() {
                    docs.push(value);
                }
            }
            _ => return None,
        }
    }
}

/// Well inside serde-saphyr's default budget (depth 64, 1,024 documents, 250,000 nodes,
/// 1,000,000 events, 256 MiB of input, 64 MiB of scalars): a file beyond any of these is left
/// to serde-saphyr, which refuses what exceeds its budget, so the fast path never accepts a
/// file serde-saphyr would refuse. (The depth also keeps this recursion shallow.)
const MAX_DEPTH: usize = 32;
const MAX_DOCUMENTS: usize = 512;
const MAX_NODES: usize = 100_000;
const MAX_BYTES: usize = 4 << 20;

fn node<T: Iterator<Item = char>>(
    parser: &mut Parser<T>,
    event: Event,
    depth: usize,
    nodes: &mut usize,
) -> Option<Value> {
    *nodes += 1;
    if depth > MAX_DEPTH || *nodes > MAX_NODES {
        return None;
    }
    match event {
        // Anchor id 0 and no tag: anchored or tagged nodes are serde-saphyr's.
        Event::Scalar(text, style, 0, None) => scalar(text, style),
        Event::MappingStart(0, None) => {
            let mut map = serde_json::Map::new();
            loop {
                let key = match parser.next_token().ok()?.0 {
                    Event::MappingEnd => return Some(Value::Object(map)),
                    Event::Scalar(text, style, 0, None) => match scalar(text, style)? {
                        Value::String(key) if key != "<<" => key,
                        _ => return None, // null, bool or number keys; merge keys
                    },
                    _ => return None, // complex keys
                };
                let next = parser.next_token().ok()?.0;
                let value = node(parser, next, depth + 1, nodes)?;
                if map.insert(key, value).is_some() {
                    return None; // duplicate key: serde-saphyr's error
                }
            }
        }
        Event::SequenceStart(0, None) => {
            let mut items = vec![];
            loop {
                match parser.next_token().ok()?.0 {
                    Event::SequenceEnd => return Some(Value::Array(items)),
                    next => items.push(node(parser, next, depth + 1, nodes)?),
                }
            }
        }
        _ => None,
    }
}

/// A scalar's value when its meaning is not in doubt; `None` leaves it to serde-saphyr.
fn scalar(text: String, style: TScalarStyle) -> Option<Value> {
    if style != TScalarStyle::Plain {
        return Some(Value::String(text)); // quoted, literal or folded: always a string
    }
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Some(Value::Null),
        "true" | "True" | "TRUE" => return Some(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Some(Value::Bool(false)),
        _ => {}
    }
    let first = text.as_bytes().first().copied().unwrap_or_default();
    if first.is_ascii_digit() || matches!(first, b'+' | b'-' | b'.') {
        // Only plain decimal integers without a leading zero; floats, octal, hex, signs, `.inf`
        // and `1_000` are serde-saphyr's.
        if text.bytes().all(|b| b.is_ascii_digit()) && (text.len() == 1 || first != b'0') {
            return text.parse::<u64>().ok().map(Value::from);
        }
        return None;
    }
    // YAML 1.1 booleans and non-finite spellings, in any case (compared without a lowercase copy
    // of every string).
    const DOUBTFUL: [&str; 9] = ["yes", "no", "on", "off", "y", "n", "inf", "infinity", "nan"];
    if DOUBTFUL.iter().any(|d| d.eq_ignore_ascii_case(&text)) {
        return None;
    }
    Some(Value::String(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    /// A manifest file as file mode's users (and `bench_scale`) write them.
    const MANIFEST: &str = "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {name: c1, namespace: ns1}\nspec:\n  address: https://127.0.0.1:5000\n  auth: {name: basicAuth, secretRef: {name: c1}}\n  connectorClassName: oci\n  hosts: [a.example, 'b.example']\n  tokenRealms:\n  - url: https://auth.example/token\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: c1\n  namespace: ns1\n  annotations: {connectors.alauda.io/allowed-connectors: \"c1\"}\ntype: kubernetes.io/basic-auth\nstringData: {username: robot-1, password: hunter2}\ndata:\n  token: |\n    bGl0ZXJhbA==\n---\n";

    #[test]
    fn plain_manifests_take_the_fast_path_and_match_saphyr() {
        let fast = fast_documents(MANIFEST).expect("a plain manifest is in the fast path's subset");
        assert_eq!(fast.len(), 2);
        assert_eq!(fast, serde_saphyr::from_multiple::<Value>(MANIFEST).unwrap());
        assert_eq!(fast[0]["spec"]["hosts"][1], "b.example");
        assert_eq!(fast[1]["data"]["token"], "bGl0ZXJhbA==\n");
    }

    #[test]
    fn anything_outside_the_subset_is_left_to_saphyr() {
        for text in [
            "a: &x 1\nb: *x\n",               // anchor and alias
            "a: !!str 1\n",                   // tag
            "base: &b {x: 1}\nc: {<<: *b}\n", // merge key
            "a: 1\na: 2\n",                   // duplicate key
            "a: yes\n",                       // YAML 1.1 boolean
            "a: Off\n",
            "a: 0755\n", // leading zero
            "a: 1.5\n",
            "a: -3\n",
            "a: .inf\n",
            "a: 1_000\n",
            "a: 99999999999999999999999\n", // beyond u64
            "1: a\n",                       // number key
            "? [a]\n: b\n",                 // complex key
            "a: [\n",                       // syntax error
            "a: b: c\n",
        ] {
            assert_eq!(fast_documents(text), None, "{text:?} must be left to serde-saphyr");
            // And `documents` gives exactly what serde-saphyr gives for it.
            match (documents(text), serde_saphyr::from_multiple::<Value>(text)) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{text:?}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{text:?}"),
                (a, b) => panic!("{text:?}: {a:?} vs {b:?}"),
            }
        }
    }

    #[test]
    fn files_beyond_the_fast_paths_limits_are_left_to_saphyr() {
        let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert!(fast_documents(&nested(MAX_DEPTH)).is_some());
        assert_eq!(fast_documents(&nested(MAX_DEPTH + 2)), None);
        let list = |n: usize| format!("[{}]", vec!["1"; n].join(","));
        assert!(fast_documents(&list(MAX_NODES - 1)).is_some());
        assert_eq!(fast_documents(&list(MAX_NODES + 1)), None);
        let docs = |n: usize| vec!["a: 1\n"; n].join("---\n");
        assert_eq!(
            fast_documents(&docs(MAX_DOCUMENTS)).map(|d| d.len()),
            Some(MAX_DOCUMENTS)
        );
        assert_eq!(fast_documents(&docs(MAX_DOCUMENTS + 1)), None);
        let big = format!("a: '{}'\n", "x".repeat(MAX_BYTES));
        assert_eq!(fast_documents(&big), None);
        // At the limits, both read the same.
        for text in [nested(MAX_DEPTH), list(MAX_NODES - 1), docs(MAX_DOCUMENTS)] {
            assert_eq!(fast_documents(&text), serde_saphyr::from_multiple::<Value>(&text).ok());
        }
        // What serde-saphyr refuses for its budget, the fast path does not take either.
        let too_many = list(300_000);
        assert!(serde_saphyr::from_multiple::<Value>(&too_many).is_err());
        assert_eq!(fast_documents(&too_many), None);
    }

    /// Scalar spellings the fast path decides, quoted and not.
    const DECIDED: &[&str] = &[
        "plain",
        "robot-1",
        "https://r.example:5000/v2",
        "a b",
        "0",
        "7",
        "42",
        "~",
        "null",
        "Null",
        "NULL",
        "true",
        "True",
        "TRUE",
        "false",
        "FALSE",
        "'quoted'",
        "\"dq\"",
        "'007'",
        "\"true\"",
        "'~'",
        "\"a\\tb\"",
        "'it''s'",
        "18446744073709551615",
        "2001-12-14",
        "a:b",
        "a#b",
        "\"\"",
    ];
    /// Spellings whose meaning is in doubt: the fast path must leave them alone.
    const DOUBTFUL: &[&str] = &[
        "007",
        "1.0",
        "-1",
        "+1",
        "0x1F",
        "0o17",
        "1e3",
        "1_000",
        ".5",
        ".inf",
        "-.inf",
        ".nan",
        "nan",
        "inf",
        "yes",
        "No",
        "ON",
        "off",
        "y",
        "n",
        "18446744073709551616",
    ];
    const KEYS: &[&str] = &["a", "b", "name", "kind", "a-b", "'q'", "\"dq\""];
    const DOUBTFUL_KEYS: &[&str] = &["<<", "1", "true", "~", "yes"];

    impl Rng {
        /// Mostly decided spellings, now and then a doubtful one.
        fn scalar(&mut self) -> &'static str {
            if self.below(60) == 0 {
                self.pick(DOUBTFUL)
            } else {
                self.pick(DECIDED)
            }
        }
        fn key(&mut self) -> &'static str {
            if self.below(80) == 0 {
                self.pick(DOUBTFUL_KEYS)
            } else {
                self.pick(KEYS)
            }
        }
    }

    fn value(rng: &mut Rng, depth: usize, indent: usize) -> String {
        match if depth > 3 { 0 } else { rng.below(5) } {
            0 | 1 => rng.scalar().to_string(),
            2 => {
                let items: Vec<String> = (0..rng.below(4)).map(|_| value(rng, depth + 1, 0)).collect();
                if items.iter().any(|i| i.contains('\n')) {
                    "[]".to_string()
                } else {
                    format!("[{}]", items.join(", "))
                }
            }
            3 => {
                let pairs: Vec<String> = (0..rng.below(4))
                    .map(|_| format!("{}: {}", rng.key(), rng.scalar()))
                    .collect();
                format!("{{{}}}", pairs.join(", "))
            }
            _ => block(rng, depth + 1, indent + 2),
        }
    }

    fn block(rng: &mut Rng, depth: usize, indent: usize) -> String {
        let pad = " ".repeat(indent);
        let mut out = String::new();
        for _ in 0..1 + rng.below(4) {
            let v = value(rng, depth, indent);
            let sep = if v.starts_with('\n') { "" } else { " " };
            out.push_str(&format!("\n{pad}{}:{sep}{v}", rng.key()));
        }
        out
    }

    #[test]
    fn the_fast_path_gives_what_saphyr_gives() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut fast_taken, mut cases) = (0, 0);
        for _ in 0..3000 {
            let docs: Vec<String> = (0..1 + rng.below(3)).map(|_| block(&mut rng, 0, 0)).collect();
            let text = docs.join("\n---");
            cases += 1;
            let saphyr = serde_saphyr::from_multiple::<Value>(&text);
            if let Some(fast) = fast_documents(&text) {
                fast_taken += 1;
                match saphyr {
                    Ok(expected) => assert_eq!(fast, expected, "{text}"),
                    Err(e) => panic!("the fast path accepted what serde-saphyr refuses ({e}):\n{text}"),
                }
            }
        }
        eprintln!("fast path taken for {fast_taken} of {cases} generated files");
        // The generator must exercise both sides, or the comparison proves nothing.
        assert!(fast_taken > cases / 10, "fast path taken {fast_taken} of {cases}");
        assert!(fast_taken < cases * 9 / 10, "fast path taken {fast_taken} of {cases}");
    }
}
