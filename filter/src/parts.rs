//! Owns the assembly of a configuration that lists its connectors as parts (the controller's
//! `--config-parts`, issue 17): which parts a VM still lacks, the channel calls that fetch
//! them, the check of each answer against its id, and the document they make together.
//!
//! Why: with the entries inline, every change sent every connector's text through the xDS
//! server, Envoy's main thread and each VM (4 MB at 20,000 connectors). With parts, the pushed
//! document is the settings and a list of ids (one per 64–128 connectors); a VM keeps the
//! parts it holds and fetches the new ones, usually one per change.
//!
//! The rules, in plain code the native tests cover (the shim does the host calls):
//! - the configuration a VM runs stays until every part of the new one is here and the whole
//!   compiles (make before break); a fetch that fails is tried again, a newer push replaces
//!   the assembly (keeping what it fetched);
//! - a part is taken only if its SHA-256 is its id: an answer from anything but the part
//!   asked for is refused, whatever the channel says;
//! - the assembled text is the inline document, byte for byte, so it is compiled, checked and
//!   refused exactly as a pushed one would be; a VM that runs parts under the same settings
//!   keeps the connectors of the parts it holds at both ends of the list and reads only the
//!   parts between ([`crate::config::compile_parts`]), with the same outcome (tested against
//!   the assembled document's compile).

use std::rc::Rc;

use crate::channel::ChannelCall;
use crate::config::{Config, ConfigError, ControllerChannel};

/// Parts fetched at once, per VM: a cold start at 20,000 connectors has about 200.
pub const MAX_IN_FLIGHT: usize = 8;
/// How long after a failed fetch the part is asked for again.
pub const RETRY_MS: u64 = 200;
/// A call not answered after this long is taken as lost (its root context went away with a
/// newer configuration, say) and its part asked for again. Longer than the calls' own timeout.
pub const LOST_MS: u64 = 10_000;
/// Larger answers are not a part of ours (a run is 64–128 entries).
pub const MAX_PART: usize = 8 * 1024 * 1024;

/// Parts with their ids: what a VM holds between configurations. (Lists, not maps: a few
/// hundred parts at most, and every map type costs the module its own code, which is held
/// under 700 KB.)
pub type Held = Vec<(String, Rc<str>)>;

/// A configuration waiting for its parts.
pub struct Assembly {
    /// The pushed document up to its entries (`connector_core::config::parts_head`).
    head: String,
    ids: Vec<String>,
    channel: ControllerChannel,
    /// The root context of the configuration (the calls are made on it).
    pub root: u32,
    /// The text of each id, once here.
    got: Vec<Option<Rc<str>>>,
    /// Call token → the index of the part it asks for, and when it was made (ms).
    in_flight: Vec<(u32, usize, u64)>,
    /// No call before this (ms), after a failure.
    not_before: u64,
    /// When the configuration arrived (ms): the log says how long the assembly took.
    pub started: u64,
}

/// What an answer did to an assembly.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Not one of its calls (an earlier assembly's, or not a part call at all).
    NotOurs,
    /// Its part, kept.
    Kept,
    /// Refused, with why; the part is asked for again after [`RETRY_MS`].
    Refused(String),
}

impl Assembly {
    /// The assembly of `json`, a document that lists `ids` and names `channel`; what `held`
    /// (the parts of the running configuration, and of an assembly this one replaces) has of
    /// them is taken from there. `None` if `json` cannot be cut at its members.
    pub fn new(
        json: &[u8],
        ids: &[String],
        channel: ControllerChannel,
        root: u32,
        held: &Held,
        now_ms: u64,
    ) -> Option<Self> {
        let head = connector_core::config::parts_head(json)?;
        // Looked up from where the last one was found: a push lists the parts it keeps in the
        // order it had them.
        let mut at = 0;
        let got = ids
            .iter()
            .map(|id| {
                let n = held.len();
                let found = (0..n)
                    .map(|k| (at + k) % n)
                    .find(|&i| held.get(i).is_some_and(|(h, _)| h == id))?;
                at = found + 1;
                held.get(found).map(|(_, text)| Rc::clone(text))
            })
            .collect();
        Some(Self {
            head,
            ids: ids.to_vec(),
            channel,
            root,
            got,
            in_flight: Vec::new(),
            not_before: 0,
            started: now_ms,
        })
    }

    /// How many parts are still missing.
    pub fn missing(&self) -> usize {
        self.got.iter().filter(|g| g.is_none()).count()
    }

    /// The cluster the calls go to.
    pub fn cluster(&self) -> &str {
        &self.channel.cluster
    }

    /// The calls to make now: parts neither held nor asked for, up to [`MAX_IN_FLIGHT`] in
    /// flight, none before a failed call's retry time. Each is made, then reported with
    /// [`Self::sent`] or [`Self::not_sent`].
    pub fn calls(&mut self, now_ms: u64) -> Vec<(usize, ChannelCall)> {
        self.in_flight.retain(|(_, _, at)| now_ms.saturating_sub(*at) < LOST_MS);
        if now_ms < self.not_before {
            return vec![];
        }
        let room = MAX_IN_FLIGHT.saturating_sub(self.in_flight.len());
        let asked = |i: usize| self.in_flight.iter().any(|(_, a, _)| *a == i);
        (self.ids.iter().zip(&self.got).enumerate())
            .filter(|(i, (_, got))| got.is_none() && !asked(*i))
            .take(room)
            .map(|(i, (id, _))| {
                let path = connector_core::channel::part_path(id);
                (i, crate::channel::part_call(&self.channel, path))
            })
            .collect()
    }

    /// Call `token`, made at `now_ms`, asks for part `part` (an index [`Self::calls`] gave).
    pub fn sent(&mut self, token: u32, part: usize, now_ms: u64) {
        self.in_flight.push((token, part, now_ms));
    }

    /// The host would not make a call: try again later.
    pub fn not_sent(&mut self, now_ms: u64) {
        self.not_before = now_ms + RETRY_MS;
    }

    /// An answer to call `token`: `status` 0 when the call failed.
    pub fn answer(&mut self, token: u32, status: u32, body: &[u8], now_ms: u64) -> Answer {
        let Some(k) = self.in_flight.iter().position(|(t, _, _)| *t == token) else {
            return Answer::NotOurs;
        };
        let (_, part, _) = self.in_flight.swap_remove(k);
        let Some(id) = self.ids.get(part) else {
            return Answer::NotOurs;
        };
        let why = if status != 200 {
            let detail = crate::channel::error_of(body)
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            match status {
                0 => "the controller channel did not answer".to_string(),
                s => format!("the controller answered {s}{detail}"),
            }
        } else if body.len() > MAX_PART {
            format!("the answer is larger than {MAX_PART} bytes")
        } else if connector_core::channel::part_id(body) != *id {
            "the answer is not the part asked for (its SHA-256 is another)".to_string()
        } else {
            match (std::str::from_utf8(body), self.got.get_mut(part)) {
                (Ok(text), Some(slot)) => {
                    *slot = Some(Rc::from(text));
                    return Answer::Kept;
                }
                (_, None) => return Answer::NotOurs,
                (Err(_), _) => "the part is not UTF-8".to_string(),
            }
        };
        self.not_before = now_ms + RETRY_MS;
        Answer::Refused(format!("configuration part {id}: {why}; asked again"))
    }

    /// The document the parts make, once every one is here.
    #[cfg(test)]
    pub fn document(&self) -> Option<String> {
        let parts = self.parts()?;
        Some(connector_core::config::assemble(
            &self.head,
            parts.iter().map(|(_, t)| *t),
        ))
    }

    /// Each part's id and text, in order, once every one is here.
    fn parts(&self) -> Option<Vec<(&str, &str)>> {
        (self.ids.iter().zip(&self.got))
            .map(|(id, got)| Some((id.as_str(), &**got.as_ref()?)))
            .collect()
    }

    /// The size of [`Self::document`], without making it (for the log).
    pub fn document_len(&self) -> usize {
        let texts = self.got.iter().flatten();
        self.head.len() + texts.clone().map(|t| t.len()).sum::<usize>() + texts.count().saturating_sub(1) + 2
    }

    /// The configuration the parts make, once every one is here: [`compile_parts`] against
    /// `running` when it can keep what `running` holds part by part, else the assembled
    /// document compiled as a pushed one (with `running` lending what it can).
    ///
    /// [`compile_parts`]: crate::config::compile_parts
    pub fn compile(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        running: Option<&Config>,
    ) -> Option<Result<Config, Vec<ConfigError>>> {
        let parts = self.parts()?;
        if let Some(config) = running.and_then(|r| crate::config::compile_parts(&self.head, &parts, r, env)) {
            return Some(Ok(config));
        }
        let document = connector_core::config::assemble(&self.head, parts.iter().map(|(_, t)| *t));
        Some(crate::config::compile_after(document.as_bytes(), env, running))
    }

    /// The parts it holds: kept by the VM for the next configuration (or the next assembly).
    pub fn into_held(self) -> Held {
        let got = self.got.into_iter();
        self.ids
            .into_iter()
            .zip(got)
            .filter_map(|(id, t)| Some((id, t?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use connector_core::channel::part_id;

    fn channel() -> ControllerChannel {
        ControllerChannel {
            cluster: "connector_controller".into(),
            authority: "controller".into(),
            key: Some("k".into()),
        }
    }

    const DOC: &str = r#"{"identity":{"x":1},"controller":{"cluster":"c"},"parts":["A","B","C"],"connectors":[]}"#;

    fn parts() -> Vec<(String, &'static str)> {
        [
            "{\"name\":\"a\"}",
            "{\"name\":\"b\"},{\"name\":\"c\"}",
            "{\"name\":\"d\"}",
        ]
        .into_iter()
        .map(|t| (part_id(t.as_bytes()), t))
        .collect()
    }

    fn ids() -> Vec<String> {
        parts().into_iter().map(|(id, _)| id).collect()
    }

    #[test]
    fn the_parts_fetched_and_checked_make_the_inline_document() {
        let mut a = Assembly::new(DOC.as_bytes(), &ids(), channel(), 1, &Held::new(), 0).unwrap();
        assert_eq!(a.missing(), 3);
        let calls = a.calls(0);
        assert_eq!(calls.len(), 3);
        let (i0, call) = &calls[0];
        assert_eq!(call.path, format!("/v1/parts/{}", ids()[*i0]));
        assert!(call.headers.contains(&("authorization".into(), "Bearer k".into())));
        for (token, (i, _)) in calls.iter().enumerate() {
            a.sent(token as u32 + 10, *i, 0);
        }
        assert!(a.calls(0).is_empty(), "all asked for already");
        assert_eq!(a.document(), None);
        // Another part's text, a failed call and an error answer are refused and asked again.
        let texts = parts();
        assert!(
            matches!(a.answer(10, 200, texts[1].1.as_bytes(), 5), Answer::Refused(ref w) if w.contains("not the part asked for"))
        );
        assert!(matches!(a.answer(11, 0, b"", 5), Answer::Refused(ref w) if w.contains("did not answer")));
        assert!(
            matches!(a.answer(12, 404, br#"{"error":"no part"}"#, 5), Answer::Refused(ref w) if w.contains("404: no part"))
        );
        assert_eq!(
            a.answer(12, 200, texts[2].1.as_bytes(), 5),
            Answer::NotOurs,
            "answered once"
        );
        assert!(a.calls(5 + RETRY_MS - 1).is_empty(), "not before the retry time");
        let again = a.calls(5 + RETRY_MS);
        assert_eq!(again.len(), 3);
        for (token, (i, _)) in again.iter().enumerate() {
            let text = texts[*i].1;
            a.sent(token as u32 + 20, *i, 5 + RETRY_MS);
            assert_eq!(a.answer(token as u32 + 20, 200, text.as_bytes(), 300), Answer::Kept);
        }
        assert_eq!(a.missing(), 0);
        assert_eq!(a.document_len(), a.document().unwrap().len());
        assert_eq!(
            a.document().unwrap(),
            r#"{"identity":{"x":1},"controller":{"cluster":"c"},"connectors":[{"name":"a"},{"name":"b"},{"name":"c"},{"name":"d"}]}"#
        );
        // The next push holds what this one fetched: only its new part is asked for.
        let held = a.into_held();
        let mut next_ids = ids();
        next_ids[1] = part_id(b"{\"name\":\"e\"}");
        let mut b = Assembly::new(DOC.as_bytes(), &next_ids, channel(), 2, &held, 400).unwrap();
        let calls = b.calls(400);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, 1);
    }

    #[test]
    fn at_most_a_few_parts_are_asked_for_at_once() {
        let many: Vec<String> = (0..30).map(|i| part_id(format!("{{\"n\":{i}}}").as_bytes())).collect();
        let mut a = Assembly::new(DOC.as_bytes(), &many, channel(), 1, &Held::new(), 0).unwrap();
        let first = a.calls(0);
        assert_eq!(first.len(), MAX_IN_FLIGHT);
        for (t, (i, _)) in first.into_iter().enumerate() {
            a.sent(t as u32, i, 0);
        }
        assert!(a.calls(0).is_empty());
        assert_eq!(a.answer(0, 200, b"{\"n\":0}", 1), Answer::Kept);
        assert_eq!(a.calls(1).len(), 1);
        // A host that will not make the call: later.
        a.not_sent(1);
        assert!(a.calls(2).is_empty());
        assert_eq!(a.calls(1 + RETRY_MS).len(), 1);
        // Calls never answered (their root context went away) are made again.
        let again = a.calls(LOST_MS);
        assert_eq!(again.len(), MAX_IN_FLIGHT, "the 7 lost ones and one more");
        assert_eq!(again[0].0, 1, "the first part still missing, asked again");
        // A document that cannot be cut, or has entries of its own, is no assembly.
        assert!(Assembly::new(b"[1]", &many, channel(), 1, &Held::new(), 0).is_none());
        assert!(Assembly::new(b"{\"connectors\":[{}]}", &many, channel(), 1, &Held::new(), 0).is_none());
    }
}
