//! Owns the filter's side of the sidecar controller's loopback channel: the requests it sends
//! (an upstream credential, an access decision, "a token had an unknown key"), how their
//! answers are read, and the caches that keep the channel off the request path.
//!
//! The protocol (paths, queries, answers) is `connector_core::channel`'s, which the controller
//! serves.
//!
//! Everything here fails closed: an answer the filter cannot read refuses the request (503), it
//! never lets it through.

use std::collections::HashMap;

use serde_json::Value;

use crate::config::ControllerChannel;
use crate::identity::Bound;
use crate::respond::{Refusal, quote};
use connector_core::channel::AccessQuery;

/// Answers larger than this are not from our controller.
const MAX_ANSWER: usize = 64 * 1024;
/// Access decisions kept per VM; past this the expired ones go, then all.
const MAX_DECISIONS: usize = 10_000;
/// Bounds on how long the filter keeps a decision, whatever the controller says.
const MIN_TTL: u64 = 1;
const MAX_TTL: u64 = 300;
/// At most one unknown-kid notice per VM in this many seconds.
pub const UNKNOWN_KID_INTERVAL: u64 = 10;

/// One request to the controller: headers ready for `dispatch_http_call`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelCall {
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl ChannelCall {
    fn new(ch: &ControllerChannel, method: &'static str, path: String) -> Self {
        let mut headers = vec![
            (":method".to_string(), method.to_string()),
            (":path".to_string(), path.clone()),
            (":authority".to_string(), ch.authority.clone()),
            ("accept".to_string(), "application/json".to_string()),
        ];
        if let Some(k) = &ch.key {
            headers.push(("authorization".to_string(), format!("Bearer {k}")));
        }
        Self { method, path, headers }
    }

    pub fn header_refs(&self) -> Vec<(&str, &str)> {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
}

pub use connector_core::verb::Verb;

/// Asks for a part of the configuration (`path`: `connector_core::channel::part_path`).
pub fn part_call(ch: &ControllerChannel, path: String) -> ChannelCall {
    ChannelCall::new(ch, "GET", path)
}

/// Asks for the connector's credential at `revision`, the one the filter's configuration names:
/// the controller answers only for that revision (issue 12.7).
pub fn credential_call(ch: &ControllerChannel, namespace: &str, name: &str, revision: &str) -> ChannelCall {
    let path = connector_core::channel::credential_path(namespace, name, revision);
    ChannelCall::new(ch, "GET", path)
}

/// Asks whether `subject` may do `verb` through the connector. `bound` names the objects the
/// caller's token is bound to (`saUid`, `pod`, `podUid`): the controller refuses a token whose
/// ServiceAccount or Pod no longer exists (or was re-created under the same name).
pub fn access_call(
    ch: &ControllerChannel,
    namespace: &str,
    name: &str,
    subject: &str,
    bound: &Bound,
    verb: Verb,
) -> ChannelCall {
    let query = AccessQuery {
        user: subject.to_string(),
        verb: Some(verb.as_str().to_string()),
        sa_uid: Some(bound.service_account_uid.clone()).filter(|u| !u.is_empty()),
        pod: bound.pod.as_ref().map(|(pod, _)| pod.clone()),
        pod_uid: bound.pod.as_ref().map(|(_, uid)| uid.clone()),
    };
    ChannelCall::new(ch, "GET", connector_core::channel::access_path(namespace, name, &query))
}

/// The key of a caller in the [`AccessCache`]: the subject and the objects its token is bound
/// to, so a token of a re-created ServiceAccount is not answered by the decision about the
/// deleted one's, nor the other way round.
pub fn access_key(subject: &str, bound: &Bound) -> String {
    match &bound.pod {
        None => format!("{subject}/{}", bound.service_account_uid),
        Some((_, pod_uid)) => format!("{subject}/{}/{pod_uid}", bound.service_account_uid),
    }
}

pub fn unknown_kid_call(ch: &ControllerChannel) -> ChannelCall {
    ChannelCall::new(ch, "POST", connector_core::channel::UNKNOWN_KID_PATH.to_string())
}

fn channel_failure(connector: &str, what: &str, why: String) -> Refusal {
    Refusal::unavailable(format!(
        "the connector controller could not supply {what} for connector {}: {why}",
        quote(connector)
    ))
    .with_reason("controller_unavailable")
}

pub(crate) fn error_of(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("error")
        .and_then(Value::as_str)
        .map(|s| s.chars().take(300).collect())
}

/// The JSON of a `200` answer; any other status (0: no answer in time), an oversized or
/// non-JSON body becomes the refusal `fail` builds, with the controller's own reason if given.
fn answer(status: u32, body: &[u8], fail: &dyn Fn(String) -> Refusal) -> Result<Value, Refusal> {
    match status {
        200 => {}
        0 => return Err(fail("it did not answer (is the controller running?): retry".into())),
        other => {
            let why = error_of(body).unwrap_or_else(|| "no reason given".into());
            return Err(fail(format!("it answered {other}: {why}")));
        }
    }
    if body.len() > MAX_ANSWER {
        return Err(fail("its answer is oversized".into()));
    }
    serde_json::from_slice(body).map_err(|_| fail("its answer is not JSON".into()))
}

/// Reads the controller's answer to [`credential_call`]: the upstream `Authorization` value.
/// An answer for another revision than
/// `revision` (or naming none) is refused like a failed call: 503 for this request, nothing
/// cached, asked again on the next one.
pub fn parse_credential(status: u32, body: &[u8], connector: &str, revision: &str) -> Result<String, Refusal> {
    let fail = |why: String| channel_failure(connector, "the upstream credential", why);
    // Read field by field, not through `CredentialAnswer`'s derived `Deserialize` (41 KB of
    // the module with `AccessAnswer`'s); the tests feed these readers serialised answers.
    let v = answer(status, body, &fail)?;
    if v.get("revision").and_then(Value::as_str) != Some(revision) {
        return Err(fail(format!(
            "its answer is not for the credential revision {} this configuration names",
            quote(revision)
        )));
    }
    match v.get("authorization").and_then(Value::as_str) {
        Some(a)
            if (a.starts_with("Basic ") || a.starts_with("Bearer "))
                && a.bytes().all(|b| (0x20..0x7f).contains(&b)) =>
        {
            Ok(a.to_string())
        }
        _ => Err(fail("its answer has no usable authorization value".into())),
    }
}

/// Reads the controller's answer to [`access_call`]: whether allowed, and for how long the
/// decision may be kept.
pub fn parse_access(status: u32, body: &[u8], connector: &str) -> Result<(bool, u64), Refusal> {
    let fail = |why: String| channel_failure(connector, "an access decision", why);
    let v = answer(status, body, &fail)?;
    let allowed = v
        .get("allowed")
        .and_then(Value::as_bool)
        .ok_or_else(|| fail("its answer has no \"allowed\"".into()))?;
    let ttl = v
        .get("ttlSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(MIN_TTL)
        .clamp(MIN_TTL, MAX_TTL);
    Ok((allowed, ttl))
}

/// Access decisions of this VM, by (subject, connector label, verb).
#[derive(Debug, Default)]
pub struct AccessCache {
    entries: HashMap<(String, String, Verb), (bool, u64)>,
}

impl AccessCache {
    /// `Some(allowed)` while a decision is fresh.
    pub fn get(&self, subject: &str, connector: &str, verb: Verb, now: u64) -> Option<bool> {
        self.entries
            .get(&(subject.to_string(), connector.to_string(), verb))
            .filter(|(_, until)| now < *until)
            .map(|(allowed, _)| *allowed)
    }

    pub fn insert(&mut self, subject: &str, connector: &str, verb: Verb, allowed: bool, ttl: u64, now: u64) {
        if self.entries.len() >= MAX_DECISIONS {
            self.entries.retain(|_, (_, until)| now < *until);
            if self.entries.len() >= MAX_DECISIONS {
                self.entries.clear();
            }
        }
        self.entries
            .insert((subject.to_string(), connector.to_string(), verb), (allowed, now + ttl));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keeps the decisions about connectors `keep` names (a new configuration's): a decision
    /// is about the subject's grants on that connector, which a configuration push does not change.
    pub fn retain_connectors(&mut self, keep: impl Fn(&str) -> bool) {
        self.entries.retain(|(_, connector, _), _| keep(connector));
    }
}

/// Upstream credentials fetched from the controller, by connector label. A VM's state lives as
/// long as one configuration, whose revisions are fixed, so the label is the whole key.
#[derive(Default)]
pub struct CredentialCache {
    entries: HashMap<String, String>,
}

impl std::fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCache")
            .field("connectors", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl CredentialCache {
    pub fn get(&self, connector: &str) -> Option<&str> {
        self.entries.get(connector).map(String::as_str)
    }

    pub fn insert(&mut self, connector: &str, authorization: String) {
        self.entries.insert(connector.to_string(), authorization);
    }

    /// Keeps the credentials of connectors `keep` names: a new configuration whose entry for the
    /// connector is unchanged (same credential revision) still has the same credential.
    pub fn retain_connectors(&mut self, keep: impl Fn(&str) -> bool) {
        self.entries.retain(|connector, _| keep(connector));
    }
}

/// Rate limit for unknown-kid notices: `true` when one may be sent now (and records it).
pub fn may_notify(last: &mut Option<u64>, now: u64) -> bool {
    match *last {
        Some(t) if now < t + UNKNOWN_KID_INTERVAL => false,
        _ => {
            *last = Some(now);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(key: Option<&str>) -> ControllerChannel {
        ControllerChannel {
            cluster: "connector_controller".into(),
            authority: "connector-controller".into(),
            key: key.map(str::to_string),
        }
    }

    #[test]
    fn calls_carry_the_key_only_when_configured() {
        let c = credential_call(&ch(Some("k")), "demo", "reg", "ab12");
        assert_eq!(c.path, "/v1/credentials/demo/reg?revision=ab12");
        assert!(c.headers.contains(&("authorization".into(), "Bearer k".into())));
        let subject = "system:serviceaccount:ci:builder";
        let c = access_call(&ch(None), "demo", "reg", subject, &Bound::default(), Verb::Push);
        assert_eq!(
            c.path,
            "/v1/access/demo/reg?user=system%3Aserviceaccount%3Aci%3Abuilder&verb=push"
        );
        let bound = Bound {
            service_account_uid: "u-1".into(),
            pod: Some(("build-1".into(), "p-9".into())),
        };
        let c = access_call(&ch(None), "demo", "reg", subject, &bound, Verb::Pull);
        assert_eq!(
            c.path,
            "/v1/access/demo/reg?user=system%3Aserviceaccount%3Aci%3Abuilder&verb=pull&saUid=u-1&pod=build-1&podUid=p-9"
        );
        // A re-created ServiceAccount (new uid) is a different caller to the decision cache.
        let again = Bound {
            service_account_uid: "u-2".into(),
            pod: None,
        };
        assert_ne!(access_key(subject, &bound), access_key(subject, &again));
        assert_ne!(access_key(subject, &Bound::default()), access_key(subject, &again));
        assert!(!c.headers.iter().any(|(k, _)| k == "authorization"));
        assert_eq!(unknown_kid_call(&ch(None)).method, "POST");
    }

    #[test]
    fn verbs_follow_the_method() {
        for (m, v) in [
            ("GET", Verb::Pull),
            ("HEAD", Verb::Pull),
            ("PUT", Verb::Push),
            ("POST", Verb::Push),
            ("PATCH", Verb::Push),
            ("DELETE", Verb::Delete),
        ] {
            assert_eq!(Verb::of_method(m), v, "{m}");
            assert_eq!(Verb::parse(v.as_str()), Some(v));
        }
        assert_eq!(Verb::parse("get"), None);
    }

    #[test]
    fn credential_answers() {
        // As the controller writes it (connector-core's type, serialised).
        let ok = serde_json::to_vec(&connector_core::channel::CredentialAnswer {
            authorization: "Basic cm9ib3Q6cHc=".into(),
            revision: "3".into(),
        })
        .unwrap();
        assert_eq!(
            parse_credential(200, &ok, "demo/reg", "3").unwrap(),
            "Basic cm9ib3Q6cHc="
        );
        for (status, body, needle) in [
            (0, &b""[..], "did not answer"),
            (
                404,
                br#"{"error":"connector demo/reg has no usable Secret"}"#,
                "has no usable Secret",
            ),
            (401, b"", "answered 401: no reason given"),
            (200, b"nope", "not JSON"),
            (
                200,
                br#"{"revision":"3","authorization":"Digest x"}"#,
                "no usable authorization",
            ),
            (
                200,
                br#"{"revision":"3","authorization":"Basic a\nb"}"#,
                "no usable authorization",
            ),
            // Bound to the configuration's revision: another one, or none, is no credential.
            (
                200,
                br#"{"revision":"4","authorization":"Basic cm9ib3Q6cHc="}"#,
                "not for the credential revision \"3\"",
            ),
            (
                200,
                br#"{"authorization":"Basic cm9ib3Q6cHc="}"#,
                "not for the credential revision",
            ),
            (409, br#"{"error":"another revision"}"#, "another revision"),
        ] {
            let r = parse_credential(status, body, "demo/reg", "3").unwrap_err();
            assert_eq!(r.status, 503, "{needle}");
            assert!(r.message.contains(needle), "{needle}: {}", r.message);
            assert!(r.message.contains("demo/reg"));
        }
    }

    #[test]
    fn access_answers_and_cache() {
        // As the controller writes it (connector-core's type, serialised).
        let answer = serde_json::to_vec(&connector_core::channel::AccessAnswer {
            allowed: true,
            ttl_seconds: 30,
            reason: "RBAC".into(),
        })
        .unwrap();
        assert_eq!(parse_access(200, &answer, "d/r").unwrap(), (true, 30));
        assert_eq!(
            parse_access(200, br#"{"allowed":false,"ttlSeconds":99999}"#, "d/r").unwrap(),
            (false, MAX_TTL)
        );
        assert_eq!(
            parse_access(200, br#"{"allowed":false}"#, "d/r").unwrap(),
            (false, MIN_TTL)
        );
        assert!(
            parse_access(200, br#"{"ttlSeconds":3}"#, "d/r").is_err(),
            "no decision is no access"
        );
        assert!(parse_access(503, b"", "d/r").is_err());

        let mut c = AccessCache::default();
        let pull = Verb::Pull;
        assert_eq!(c.get("s", "d/r", pull, 100), None);
        c.insert("s", "d/r", pull, true, 30, 100);
        c.insert("s", "d/other", pull, false, 5, 100);
        assert_eq!(c.get("s", "d/r", pull, 129), Some(true));
        assert_eq!(c.get("s", "d/r", pull, 130), None, "expired");
        assert_eq!(c.get("s", "d/other", pull, 104), Some(false));
        assert_eq!(c.get("t", "d/r", pull, 101), None, "another subject decides for itself");
        assert_eq!(
            c.get("s", "d/r", Verb::Push, 101),
            None,
            "a pull grant says nothing about push"
        );
        assert_eq!(c.get("s", "d/r", Verb::Delete, 101), None);
    }

    #[test]
    fn unknown_kid_notices_are_rate_limited() {
        let mut last = None;
        assert!(may_notify(&mut last, 100));
        assert!(!may_notify(&mut last, 105));
        assert!(may_notify(&mut last, 100 + UNKNOWN_KID_INTERVAL));
    }

    #[test]
    fn credential_cache_debug_shows_no_value() {
        let mut c = CredentialCache::default();
        c.insert("demo/reg", "Basic c2VjcmV0".into());
        assert_eq!(c.get("demo/reg"), Some("Basic c2VjcmV0"));
        assert!(!format!("{c:?}").contains("c2VjcmV0"));
    }
}
