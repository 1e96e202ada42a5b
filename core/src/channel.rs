//! The loopback channel between the filter and the sidecar controller, defined once for both
//! ends: its paths, its queries and its answers. The filter builds the queries and reads the
//! answers; the controller routes the paths, reads the queries (serde, through axum) and writes
//! the answers (serde). The round-trip tests below hold the two directions to one spelling.
//!
//! Plain HTTP/1.1 JSON on loopback, through the Envoy cluster the configuration's
//! `controller.cluster` names; `Authorization: Bearer <key>` when a key is configured:
//! - `GET /v1/credentials/<ns>/<name>?revision=<r>` → `200` [`CredentialAnswer`]
//! - `GET /v1/access/<ns>/<name>?`[`AccessQuery`] → `200` [`AccessAnswer`]
//! - `POST /v1/unknown-kid` → `202`: the controller re-reads the cluster's keys (rate limited there)
//! - `GET /v1/parts/<id>` → `200`, the part's text (a run of connector entries joined with `,`,
//!   whose SHA-256 is the id): the entries of a document that lists `parts`
//! - any refusal: its status and [`ErrorAnswer`].

use serde::{Deserialize, Serialize};

use crate::percent::encode_query_value;
use crate::verb::Verb;

/// The routes, as axum writes path parameters.
pub const CREDENTIAL_ROUTE: &str = "/v1/credentials/{namespace}/{name}";
pub const ACCESS_ROUTE: &str = "/v1/access/{namespace}/{name}";
pub const UNKNOWN_KID_PATH: &str = "/v1/unknown-kid";
pub const PART_ROUTE: &str = "/v1/parts/{id}";

/// The prefix of a part id; the rest is the SHA-256 of the part's text in lowercase hex.
pub const PART_ID_PREFIX: &str = "sha256:";

/// Whether `id` has a part id's shape: `sha256:` and 64 lowercase hex digits.
pub fn is_part_id(id: &str) -> bool {
    id.strip_prefix(PART_ID_PREFIX)
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// The id of a part whose text is `text`: its content address, so an id names one text for
/// good and a holder of the text needs nothing else to trust it.
#[cfg(feature = "keys")]
pub fn part_id(text: &[u8]) -> String {
    use sha2::Digest as _;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha2::Sha256::digest(text);
    let mut id = String::with_capacity(PART_ID_PREFIX.len() + 64);
    id.push_str(PART_ID_PREFIX);
    for b in digest {
        for nibble in [b >> 4, b & 15] {
            id.push(char::from(HEX.get(usize::from(nibble)).copied().unwrap_or(b'0')));
        }
    }
    id
}

/// `:path` of a part request.
pub fn part_path(id: &str) -> String {
    format!("/v1/parts/{id}")
}

/// The query of a credential request: the revision the filter's configuration names for the
/// connector (the controller answers for exactly that one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialQuery {
    pub revision: Option<String>,
}

/// The query of an access request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessQuery {
    /// `system:serviceaccount:<ns>:<name>`.
    pub user: String,
    /// `pull`, `push` or `delete` ([`Verb`]); absent: pull, as older filters ask.
    pub verb: Option<String>,
    /// The token's `kubernetes.io.serviceaccount.uid`.
    #[serde(rename = "saUid")]
    pub sa_uid: Option<String>,
    /// The Pod a token is bound to: `kubernetes.io.pod.name` and `.uid`.
    pub pod: Option<String>,
    #[serde(rename = "podUid")]
    pub pod_uid: Option<String>,
}

/// `200` to a credential request. Read leniently (a missing field is empty), so that the filter
/// names what is wrong with an answer instead of "not the expected JSON".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialAnswer {
    /// The upstream `Authorization` value. Never logged.
    #[serde(default)]
    pub authorization: String,
    /// The revision it is for.
    #[serde(default)]
    pub revision: String,
}

/// `200` to an access request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessAnswer {
    pub allowed: bool,
    /// How long the filter may keep the decision (it clamps this to its own bounds).
    #[serde(default)]
    pub ttl_seconds: u64,
    #[serde(default)]
    pub reason: String,
}

/// The body of every refusal on the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: String,
}

/// `:path` of a credential request.
pub fn credential_path(namespace: &str, name: &str, revision: &str) -> String {
    format!(
        "/v1/credentials/{namespace}/{name}?revision={}",
        encode_query_value(revision)
    )
}

/// `:path` of an access request.
pub fn access_path(namespace: &str, name: &str, q: &AccessQuery) -> String {
    let mut path = format!("/v1/access/{namespace}/{name}?user={}", encode_query_value(&q.user));
    for (key, value) in [
        ("verb", &q.verb),
        ("saUid", &q.sa_uid),
        ("pod", &q.pod),
        ("podUid", &q.pod_uid),
    ] {
        if let Some(v) = value {
            path.push_str(&format!("&{key}={}", encode_query_value(v)));
        }
    }
    path
}

/// The verb an access query asks about: `Err` names an unknown one.
pub fn access_verb(q: &AccessQuery) -> Result<Verb, String> {
    match q.verb.as_deref() {
        None => Ok(Verb::Pull),
        Some(v) => Verb::parse(v).ok_or_else(|| format!("unknown verb {v:?}: expected pull, push or delete")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The query string of `path` read back as `application/x-www-form-urlencoded`.
    fn query_pairs(path: &str) -> Vec<(String, String)> {
        let query = path.split_once('?').map(|(_, q)| q).unwrap_or_default();
        query
            .split('&')
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap();
                (k.to_string(), crate::percent::decode_query_value(v).unwrap())
            })
            .collect()
    }

    #[test]
    fn queries_read_back_under_their_serde_names() {
        let q = AccessQuery {
            user: "system:serviceaccount:team-a:builder".into(),
            verb: Some("push".into()),
            sa_uid: Some("1f0c-uid".into()),
            pod: Some("builder-7d9/x y".into()),
            pod_uid: Some("p&q=1".into()),
        };
        let path = access_path("team-a", "harbor", &q);
        assert!(path.starts_with("/v1/access/team-a/harbor?"), "{path}");
        // Rebuilt from the serde names of the fields: a renamed field on one side fails here.
        let pairs = query_pairs(&path);
        let as_json: serde_json::Map<String, serde_json::Value> = pairs
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        let back: AccessQuery = serde_json::from_value(serde_json::Value::Object(as_json)).unwrap();
        assert_eq!(back, q);
        let minimal = AccessQuery {
            user: "u".into(),
            ..AccessQuery::default()
        };
        assert_eq!(access_path("n", "c", &minimal), "/v1/access/n/c?user=u");
        assert_eq!(access_verb(&minimal), Ok(Verb::Pull));
        assert!(access_verb(&q).is_ok());

        let path = credential_path("team-a", "harbor", "r-1");
        assert_eq!(query_pairs(&path), [("revision".to_string(), "r-1".to_string())]);
        assert!(path.starts_with("/v1/credentials/team-a/harbor?"));
    }

    #[test]
    fn answers_are_camel_case_json() {
        let a = AccessAnswer {
            allowed: true,
            ttl_seconds: 30,
            reason: "RBAC".into(),
        };
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"allowed": true, "ttlSeconds": 30, "reason": "RBAC"})
        );
        let c = CredentialAnswer {
            authorization: "Basic eDp5".into(),
            revision: "r".into(),
        };
        assert_eq!(
            serde_json::from_value::<CredentialAnswer>(serde_json::to_value(&c).unwrap()).unwrap(),
            c
        );
    }
}
