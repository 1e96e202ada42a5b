//! Owns the controller's end of the loopback channel the filter calls (protocol in the filter's
//! `channel` module and the README): upstream credentials, RBAC access decisions, and the
//! unknown-kid notice. It listens on loopback only (in the pod: only Envoy's container and
//! ours reach it) and, when a key is configured, also requires `Authorization: Bearer <key>`.
//!
//! Credentials cross only this channel: never xDS, never a log line. Answers carry
//! `Cache-Control: no-store`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use connector_core::verb::Verb;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::hub::{ConnectorKey, Hub};
use crate::ops::Metrics;
use crate::secrets::Credential;

/// The credentials of the configured connectors with their revisions (what the filter
/// configuration names), replaced on every render.
pub type Credentials = Arc<HashMap<ConnectorKey, (Credential, String)>>;

pub use connector_api::authz::{AccessAnswer, AccessCheck, BoundTo};

#[derive(Clone)]
pub struct Channel {
    credentials: watch::Receiver<Credentials>,
    key_digest: Option<[u8; 32]>,
    access: Option<Arc<dyn AccessCheck>>,
    hub: Hub,
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
        }
    }

    pub fn router(self) -> axum::Router {
        axum::Router::new()
            .route("/v1/credentials/{namespace}/{name}", get(credential))
            .route("/v1/access/{namespace}/{name}", get(access))
            .route("/v1/unknown-kid", post(unknown_kid))
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
    (status, Json(json!({ "error": message }))).into_response()
}

fn refused_key() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "the channel key is missing or wrong: the filter's controller.keyEnv must name the variable holding the controller's key".into(),
    )
}

#[derive(Deserialize)]
struct CredentialQuery {
    /// The revision the filter's configuration names for this connector.
    revision: Option<String>,
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
    let Some((c, revision)) = creds.get(&(namespace.clone(), name.clone())) else {
        Metrics::result(&metrics.credential_fetches, "unknown");
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "connector {namespace}/{name} is not configured, or its Secret is not ready: see the Connector's status"
            ),
        );
    };
    // Bound to the filter's configuration (issue 12.7): a filter still configured with an
    // older revision (the Secret changed, its new configuration not yet applied) gets no
    // credential it was not configured for; it answers 503 and asks again on a later request.
    if q.revision.as_deref() != Some(revision.as_str()) {
        Metrics::result(&metrics.credential_fetches, "other_revision");
        return error(
            StatusCode::CONFLICT,
            format!(
                "connector {namespace}/{name}'s credential is at another revision than the one asked for: the filter's configuration is older or newer than the controller's, and the next one agrees"
            ),
        );
    }
    Metrics::result(&metrics.credential_fetches, "ok");
    tracing::debug!(connector = %format!("{namespace}/{name}"), "credential handed to the filter");
    let authorization = connector_core::basic::authorization(&c.username, &c.password);
    let mut response = Json(json!({ "authorization": authorization, "revision": revision })).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Deserialize)]
struct AccessQuery {
    user: String,
    /// `pull`, `push` or `delete` (the filter's `Verb`); absent: pull, as older filters ask.
    verb: Option<String>,
    /// The token's `kubernetes.io.serviceaccount.uid`.
    #[serde(rename = "saUid")]
    sa_uid: Option<String>,
    /// The Pod a token is bound to: `kubernetes.io.pod.name` and `.uid`.
    pod: Option<String>,
    #[serde(rename = "podUid")]
    pod_uid: Option<String>,
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
    let verb = match q.verb.as_deref() {
        None => Verb::Pull,
        Some(v) => match Verb::parse(v) {
            Some(verb) => verb,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown verb {v:?}: expected pull, push or delete"),
                );
            }
        },
    };
    let bound = BoundTo {
        service_account_uid: q.sa_uid.filter(|u| !u.is_empty()),
        pod: q.pod.zip(q.pod_uid),
    };
    match check.check_bound(&q.user, &bound, &namespace, &name, verb).await {
        Ok(a) => Json(json!({ "allowed": a.allowed, "ttlSeconds": a.ttl_secs, "reason": a.reason })).into_response(),
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
