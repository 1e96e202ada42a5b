//! Owns the controller's end of the loopback channel the filter calls (the protocol is
//! `connector_core::channel`'s, shared with the filter): upstream credentials, RBAC access decisions, and the
//! unknown-kid notice. It listens on loopback only (in the pod: only Envoy's container and
//! ours reach it) and, when a key is configured, also requires `Authorization: Bearer <key>`.
//!
//! Credentials cross only this channel: never xDS, never a log line. Answers carry
//! `Cache-Control: no-store`.
//!
//! Make before break ([`CredentialTable`]): a connector's credential at a revision is served
//! before any filter configuration names it, and until every connected Envoy has acknowledged
//! a configuration that no longer names it, plus a short drain. A deleted connector or a rotated
//! Secret therefore never leaves an Envoy worker, still on the previous configuration, without
//! the credential that configuration names (issue 17: a 503 at 5,000 connectors).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use connector_core::channel::{
    ACCESS_ROUTE, AccessQuery, CREDENTIAL_ROUTE, CredentialAnswer, CredentialQuery, ErrorAnswer, PART_ROUTE,
    UNKNOWN_KID_PATH, access_verb,
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::hub::{ConnectorKey, Hub};
use crate::ops::Metrics;
use crate::secrets::Credential;
use crate::sharded::ByNamespace;

/// The credentials the channel serves, by connector, each with its revision (what a filter
/// configuration names): the current one first, then revisions an Envoy may still run
/// (see [`CredentialTable`]). Published on every render and on every retirement; a copy
/// shares every namespace's entries, and a change copies only the namespaces it touches.
pub type Credentials = ByNamespace<Vec<(Credential, String)>>;

/// How long a credential stays served after every Envoy acknowledged a filter configuration
/// without it. The ECDS ACK leaves Envoy's main thread before its workers have switched to the
/// new configuration, and a request that began on the old one may still ask for the
/// credential; both take milliseconds, so two seconds is ample and still short.
pub const DRAIN: Duration = Duration::from_secs(2);

/// A credential no longer in the rendered set, kept while an Envoy may still use it.
#[derive(Clone)]
struct Retired {
    key: ConnectorKey,
    credential: Credential,
    revision: String,
    /// The first filter-configuration version that does not name it.
    dropped_in: u64,
    /// When every connected Envoy had acknowledged `dropped_in` or later.
    acked_at: Option<Instant>,
}

/// The credential table behind the channel: the current rendering's credentials, plus the
/// retired ones Envoy may still run (make before break). Pure: time and Envoy's
/// acknowledgements are passed in, so the rules are unit-tested.
#[derive(Default)]
pub struct CredentialTable {
    current: ByNamespace<(Credential, String)>,
    retired: Vec<Retired>,
    /// `current` and `retired` together, as the channel serves them.
    served: Credentials,
}

impl CredentialTable {
    /// Installs a new rendering, sent to Envoy as filter-configuration `version`: what the
    /// previous rendering had and this one lacks (a deleted connector, a rotated revision) is
    /// retired, not forgotten. Only namespaces whose entries changed are looked at.
    pub fn install(&mut self, current: ByNamespace<(Credential, String)>, version: u64) {
        let old = std::mem::replace(&mut self.current, current);
        let namespaces = self.current.differing_namespaces(&old);
        for ns in &namespaces {
            for (name, (credential, revision)) in old.shard(ns).map(|s| s.iter()).into_iter().flatten() {
                let kept = self.current.get(ns, name).is_some_and(|(_, r)| r == revision);
                if !kept {
                    self.retired.push(Retired {
                        key: (ns.clone(), name.clone()),
                        credential: credential.clone(),
                        revision: revision.clone(),
                        dropped_in: version,
                        acked_at: None,
                    });
                }
            }
        }
        // A connector back at a revision it had: the current entry serves it.
        let current = &self.current;
        self.retired.retain(|r| {
            current
                .get(&r.key.0, &r.key.1)
                .is_none_or(|(_, rev)| *rev != r.revision)
        });
        for ns in &namespaces {
            self.reserve(ns);
        }
    }

    /// Brings what is served in namespace `ns` up to `current` and `retired`.
    fn reserve(&mut self, ns: &str) {
        let mut entries: BTreeMap<String, Vec<(Credential, String)>> = self
            .current
            .shard(ns)
            .map(|s| s.iter().map(|(name, v)| (name.clone(), vec![v.clone()])).collect())
            .unwrap_or_default();
        for r in self.retired.iter().filter(|r| r.key.0 == ns) {
            entries
                .entry(r.key.1.clone())
                .or_default()
                .push((r.credential.clone(), r.revision.clone()));
        }
        self.served.replace_namespace(ns, entries);
    }

    /// Envoy's progress: `floor` is the lowest filter-configuration version every connected
    /// Envoy has acknowledged (`None`: no Envoy connected, or one that has acknowledged
    /// nothing yet, which may still run anything older). Drops what drained by `now`; returns
    /// whether the table changed.
    pub fn advance(&mut self, floor: Option<u64>, now: Instant) -> bool {
        if let Some(floor) = floor {
            for r in &mut self.retired {
                if r.acked_at.is_none() && r.dropped_in <= floor {
                    r.acked_at = Some(now);
                }
            }
        }
        let mut dropped = BTreeSet::new();
        self.retired.retain(|r| {
            let keep = r.acked_at.is_none_or(|at| now.duration_since(at) < DRAIN);
            if !keep {
                dropped.insert(r.key.0.clone());
            }
            keep
        });
        for ns in &dropped {
            self.reserve(ns);
        }
        !dropped.is_empty()
    }

    /// When [`Self::advance`] next has something to drop.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.retired
            .iter()
            .filter_map(|r| r.acked_at)
            .min()
            .map(|at| at + DRAIN)
    }

    /// Credentials kept for configurations Envoy may still run.
    pub fn retired_len(&self) -> usize {
        self.retired.len()
    }

    /// What the channel serves (a copy sharing the table's entries).
    pub fn served(&self) -> Credentials {
        self.served.clone()
    }
}

/// The parts the channel serves, by id (`--config-parts`).
pub type Parts = Arc<std::collections::HashMap<Arc<str>, Arc<str>>>;

/// A part's text, the first version whose document does not list it, and when every Envoy
/// had acknowledged that version.
type KeptPart = (Arc<str>, Option<u64>, Option<Instant>);

/// The parts behind the channel: those the current document lists, plus those of documents an
/// Envoy may still be assembling, by the credential table's rule (make before break): a part
/// no longer listed stays until every Envoy acknowledged a configuration without it, plus
/// [`DRAIN`]. A worker fetches the parts of a configuration after Envoy acknowledged it, so a
/// part must outlive its document's acknowledgement by at least that fetch. Pure, like
/// [`CredentialTable`]. A change touches one or two parts; the served map is made again per
/// change, a pointer per part (one per 64–128 connectors).
#[derive(Default)]
pub struct PartTable {
    parts: std::collections::HashMap<Arc<str>, KeptPart>,
    served: Parts,
}

impl PartTable {
    /// The parts of the document sent as filter-configuration `version`.
    pub fn install(&mut self, current: &[(Arc<str>, Arc<str>)], version: u64) {
        let listed: std::collections::HashSet<&str> = current.iter().map(|(id, _)| &**id).collect();
        for (id, (_, dropped_in, _)) in self.parts.iter_mut() {
            if !listed.contains(&**id) && dropped_in.is_none() {
                *dropped_in = Some(version);
            }
        }
        for (id, text) in current {
            self.parts.insert(Arc::clone(id), (Arc::clone(text), None, None));
        }
        self.serve();
    }

    /// Envoy's progress, as [`CredentialTable::advance`]: drops what drained by `now`; returns
    /// whether the table changed.
    pub fn advance(&mut self, floor: Option<u64>, now: Instant) -> bool {
        if let Some(floor) = floor {
            for (_, dropped_in, acked_at) in self.parts.values_mut() {
                if acked_at.is_none() && dropped_in.is_some_and(|v| v <= floor) {
                    *acked_at = Some(now);
                }
            }
        }
        let before = self.parts.len();
        self.parts
            .retain(|_, (_, _, acked_at)| acked_at.is_none_or(|at| now.duration_since(at) < DRAIN));
        let changed = self.parts.len() != before;
        if changed {
            self.serve();
        }
        changed
    }

    /// When [`Self::advance`] next has something to drop.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.parts
            .values()
            .filter_map(|(_, _, at)| *at)
            .min()
            .map(|at| at + DRAIN)
    }

    fn serve(&mut self) {
        self.served = Arc::new(
            self.parts
                .iter()
                .map(|(id, (text, _, _))| (Arc::clone(id), Arc::clone(text)))
                .collect(),
        );
    }

    pub fn served(&self) -> Parts {
        Arc::clone(&self.served)
    }
}

pub use connector_api::authz::{AccessAnswer, AccessCheck, BoundTo};

#[derive(Clone)]
pub struct Channel {
    credentials: watch::Receiver<Credentials>,
    key_digest: Option<[u8; 32]>,
    access: Option<Arc<dyn AccessCheck>>,
    hub: Hub,
    parts: Option<watch::Receiver<Parts>>,
}

impl Channel {
    pub fn new(
        credentials: watch::Receiver<Credentials>,
        key: Option<&str>,
        access: Option<Arc<dyn AccessCheck>>,
        hub: Hub,
    ) -> Self {
        Self {
            credentials,
            key_digest: key.map(|k| Sha256::digest(k.as_bytes()).into()),
            access,
            hub,
            parts: None,
        }
    }

    /// Serves the parts of documents that list them (`--config-parts`).
    pub fn with_parts(mut self, parts: watch::Receiver<Parts>) -> Self {
        self.parts = Some(parts);
        self
    }

    pub fn router(self) -> axum::Router {
        axum::Router::new()
            .route(CREDENTIAL_ROUTE, get(credential))
            .route(ACCESS_ROUTE, get(access))
            .route(UNKNOWN_KID_PATH, post(unknown_kid))
            .route(PART_ROUTE, get(part))
            .with_state(self)
    }

    /// Compares digests, so the comparison's time says nothing about the key.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(want) = self.key_digest else {
            return true;
        };
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|k| <[u8; 32]>::from(Sha256::digest(k.as_bytes())));
        got == Some(want)
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(ErrorAnswer { error: message })).into_response()
}

fn refused_key() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "the channel key is missing or wrong: the filter's controller.keyEnv must name the variable holding the controller's key".into(),
    )
}

async fn credential(
    State(ch): State<Channel>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<CredentialQuery>,
    headers: HeaderMap,
) -> Response {
    let metrics: &Metrics = &ch.hub.metrics;
    if !ch.authorized(&headers) {
        Metrics::result(&metrics.credential_fetches, "unauthorized");
        return refused_key();
    }
    let creds = ch.credentials.borrow().clone();
    let Some(known) = creds.get(&namespace, &name) else {
        Metrics::result(&metrics.credential_fetches, "unknown");
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "connector {namespace}/{name} is not configured, or its Secret is not ready: see the Connector's status"
            ),
        );
    };
    // Bound to the filter's configuration (issue 12.7): the filter gets exactly the revision
    // its configuration names, the current one or one an Envoy may still run (make before
    // break), never another; a revision the controller does not know (e.g. from before its
    // restart) answers 409, the filter answers 503 and asks again on a later request.
    let Some((c, revision)) = known.iter().find(|(_, r)| q.revision.as_deref() == Some(r.as_str())) else {
        Metrics::result(&metrics.credential_fetches, "other_revision");
        return error(
            StatusCode::CONFLICT,
            format!(
                "connector {namespace}/{name}'s credential is at another revision than the one asked for: the filter's configuration is older or newer than the controller's, and the next one agrees"
            ),
        );
    };
    Metrics::result(&metrics.credential_fetches, "ok");
    tracing::debug!(connector = %format!("{namespace}/{name}"), "credential handed to the filter");
    let authorization = connector_core::basic::authorization(&c.username, &c.password);
    let answer = CredentialAnswer {
        authorization,
        revision: revision.clone(),
    };
    let mut response = Json(answer).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A part of a document that lists `parts`: its text, which the filter checks against the
/// id (its SHA-256) before using it. Not a secret (the document's own text), but behind the
/// channel key like everything here.
async fn part(State(ch): State<Channel>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if !ch.authorized(&headers) {
        return refused_key();
    }
    let text = ch.parts.as_ref().and_then(|p| p.borrow().get(id.as_str()).cloned());
    match text {
        Some(text) => {
            let mut response = text.to_string().into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        None => error(
            StatusCode::NOT_FOUND,
            format!(
                "no part {id}: the filter configuration that lists it is not the controller's current one, nor one an Envoy may still run"
            ),
        ),
    }
}

async fn access(
    State(ch): State<Channel>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<AccessQuery>,
    headers: HeaderMap,
) -> Response {
    if !ch.authorized(&headers) {
        return refused_key();
    }
    let Some(check) = ch.access.as_ref() else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "this controller runs without RBAC (file mode): the filter configuration should use authorization \"rules\"".into(),
        );
    };
    let verb = match access_verb(&q) {
        Ok(verb) => verb,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let bound = BoundTo {
        service_account_uid: q.sa_uid.filter(|u| !u.is_empty()),
        pod: q.pod.zip(q.pod_uid),
    };
    match check.check_bound(&q.user, &bound, &namespace, &name, verb).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => {
            tracing::warn!(connector = %format!("{namespace}/{name}"), user = %q.user, error = %e, "access check failed");
            error(StatusCode::SERVICE_UNAVAILABLE, format!("the access check failed: {e}"))
        }
    }
}

async fn unknown_kid(State(ch): State<Channel>, headers: HeaderMap) -> Response {
    if !ch.authorized(&headers) {
        return refused_key();
    }
    ch.hub.unknown_kid.notify_one();
    StatusCode::ACCEPTED.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(p: &str) -> Credential {
        Credential {
            username: "robot".into(),
            password: p.into(),
        }
    }

    fn key(n: &str) -> ConnectorKey {
        ("demo".into(), n.into())
    }

    fn revisions(t: &CredentialTable, n: &str) -> Vec<String> {
        t.served()
            .get("demo", n)
            .map(|v| v.iter().map(|(_, r)| r.clone()).collect())
            .unwrap_or_default()
    }

    /// Issue 17: a deleted connector's and a rotated Secret's old credential stay served until
    /// every Envoy acknowledged a configuration without them, plus the drain; never before.
    #[test]
    fn removed_credentials_stay_until_envoy_acknowledged_and_drained() {
        let t0 = Instant::now();
        let mut t = CredentialTable::default();
        t.install(
            [
                (key("a"), (cred("a1"), "r1".into())),
                (key("b"), (cred("b1"), "s1".into())),
            ]
            .into_iter()
            .collect(),
            1,
        );
        assert!(!t.advance(Some(1), t0));
        // v2: a is deleted, b rotated. The new revision is served at once (before Envoy has v2).
        t.install([(key("b"), (cred("b2"), "s2".into()))].into_iter().collect(), 2);
        assert_eq!(revisions(&t, "a"), ["r1"]);
        assert_eq!(revisions(&t, "b"), ["s2", "s1"], "current first, then the retired one");
        // No Envoy, or one still on v1, or one that acknowledged nothing: all kept.
        for floor in [None, Some(1)] {
            assert!(!t.advance(floor, t0 + DRAIN * 10));
            assert_eq!(t.retired_len(), 2);
        }
        assert_eq!(t.next_deadline(), None);
        // Envoy acknowledged v2: kept for the drain, dropped after it.
        let acked = t0 + DRAIN * 10;
        assert!(!t.advance(Some(2), acked));
        assert_eq!(t.next_deadline(), Some(acked + DRAIN));
        assert!(!t.advance(Some(2), acked + DRAIN / 2));
        assert_eq!(revisions(&t, "a"), ["r1"]);
        assert!(t.advance(Some(2), acked + DRAIN));
        assert_eq!(revisions(&t, "a"), Vec::<String>::new());
        assert_eq!(revisions(&t, "b"), ["s2"]);
        assert_eq!(t.retired_len(), 0);
    }

    #[test]
    fn a_connector_back_at_its_revision_is_served_once_and_a_later_version_retires_earlier_drops() {
        let t0 = Instant::now();
        let mut t = CredentialTable::default();
        t.install([(key("a"), (cred("a1"), "r1".into()))].into_iter().collect(), 1);
        t.install(ByNamespace::default(), 2);
        t.install([(key("a"), (cred("a1"), "r1".into()))].into_iter().collect(), 3);
        assert_eq!(revisions(&t, "a"), ["r1"], "no duplicate of the current revision");
        t.install(ByNamespace::default(), 4);
        // Envoy skipped v4 and acknowledged v5 directly: v4's drops are covered.
        t.install(ByNamespace::default(), 5);
        t.advance(Some(5), t0);
        assert!(t.advance(Some(5), t0 + DRAIN));
        assert!(t.served().is_empty());
    }

    /// `--config-parts`: a part no longer listed stays served until every Envoy acknowledged a
    /// configuration without it, plus the drain (a worker fetches after the acknowledgement);
    /// listed again, it stays for good.
    #[test]
    fn parts_no_longer_listed_stay_until_envoy_acknowledged_and_drained() {
        let t0 = Instant::now();
        let part = |t: &str| (Arc::<str>::from(format!("id-{t}")), Arc::<str>::from(t));
        let ids = |t: &PartTable| {
            let mut v: Vec<String> = t.served().keys().map(|k| k.to_string()).collect();
            v.sort();
            v
        };
        let mut t = PartTable::default();
        t.install(&[part("a"), part("b")], 1);
        assert_eq!(ids(&t), ["id-a", "id-b"]);
        t.install(&[part("a"), part("c")], 2);
        assert_eq!(ids(&t), ["id-a", "id-b", "id-c"]);
        assert!(!t.advance(None, t0 + DRAIN * 10), "nobody acknowledged");
        assert!(!t.advance(Some(1), t0), "version 1 still lists b");
        assert!(!t.advance(Some(2), t0));
        assert_eq!(t.next_deadline(), Some(t0 + DRAIN));
        assert!(!t.advance(Some(2), t0 + DRAIN / 2));
        assert_eq!(ids(&t), ["id-a", "id-b", "id-c"]);
        assert!(t.advance(Some(2), t0 + DRAIN));
        assert_eq!(ids(&t), ["id-a", "id-c"]);
        assert_eq!(&*t.served()[&Arc::<str>::from("id-c")], "c");
        // Dropped, then listed again before it drained: kept.
        t.install(&[part("a")], 3);
        t.advance(Some(3), t0 + DRAIN * 2);
        t.install(&[part("a"), part("c")], 4);
        assert!(!t.advance(Some(4), t0 + DRAIN * 4));
        assert_eq!(ids(&t), ["id-a", "id-c"]);
        assert_eq!(t.next_deadline(), None);
    }
}
