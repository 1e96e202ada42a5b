//! Owns the filter's `identity` object in API mode: the cluster's ServiceAccount issuer
//! (`/.well-known/openid-configuration` → `issuer`) and signing keys (`/openid/v1/jwks`), read
//! through the API server with the controller's own client, plus the audiences the settings
//! name. Read again every `refresh` (5 min by default) and when the filter reports a token with
//! an unknown `kid` (the API server's keys rotated), at most once per `min_interval` (30 s):
//! a flood of bad tokens must not become a flood of API requests. A failed read keeps the last
//! good identity.

use std::time::Duration;

use kube::api::GetParams;
use kube::core::Request;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::hub::Hub;
use crate::ops::Metrics;

#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// Accepted token audiences (`kubectl create token --audience <one of these>`).
    pub audiences: Vec<String>,
    pub refresh: Duration,
    /// Unknown-kid refreshes happen at most this often.
    pub min_interval: Duration,
    /// One read (both documents) gives up after this long. The kube client retries 503s on
    /// its own for minutes; a refresh must not hang that long.
    pub fetch_timeout: Duration,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            audiences: vec!["oci-connector".into()],
            refresh: Duration::from_secs(300),
            min_interval: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading {path} from the API server failed: {source}")]
    Api {
        path: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("reading the cluster identity from the API server took longer than {0:?}")]
    Timeout(Duration),
    #[error("{path} from the API server is not usable: {why}")]
    Invalid { path: &'static str, why: String },
}

const DISCOVERY: &str = "/.well-known/openid-configuration";
const JWKS: &str = "/openid/v1/jwks";

async fn get_json(client: &kube::Client, dir: &str, name: &str, path: &'static str) -> Result<Value, IdentityError> {
    let request = Request::new(dir)
        .get(name, &GetParams::default())
        .map_err(|e| IdentityError::Api {
            path,
            source: kube::Error::BuildRequest(e),
        })?;
    let text = client
        .request_text(request)
        .await
        .map_err(|source| IdentityError::Api { path, source })?;
    serde_json::from_str(&text).map_err(|e| IdentityError::Invalid {
        path,
        why: format!("not JSON ({e})"),
    })
}

/// The cluster's issuer and key set, as the API server publishes them.
pub async fn fetch(client: &kube::Client) -> Result<(String, Value), IdentityError> {
    let discovery = get_json(client, "/.well-known", "openid-configuration", DISCOVERY).await?;
    let issuer = discovery
        .get("issuer")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| IdentityError::Invalid {
            path: DISCOVERY,
            why: "no issuer".into(),
        })?
        .to_string();
    let jwks = get_json(client, "/openid/v1", "jwks", JWKS).await?;
    let jwks = usable_keys(&jwks).map_err(|why| IdentityError::Invalid { path: JWKS, why })?;
    Ok((issuer, jwks))
}

/// The key set with only the keys the filter can verify tokens with (its own check,
/// `connector_core::keys::check_jwk`): an ES512, Ed25519 or 1024-bit RSA key, or a repeated
/// `kid`, is skipped with a warning instead of making every later configuration fail. Tokens
/// signed with a skipped key are refused like any unknown key. `Err` when no key is usable.
pub fn usable_keys(jwks: &Value) -> Result<Value, String> {
    let Some(keys) = jwks.get("keys").and_then(Value::as_array).filter(|k| !k.is_empty()) else {
        return Err("no keys".into());
    };
    let mut kept: Vec<Value> = vec![];
    let mut problems = vec![];
    for (i, key) in keys.iter().enumerate() {
        let kid = key.get("kid").and_then(Value::as_str).unwrap_or_default();
        let why = match connector_core::keys::check_jwk(key, &format!("keys[{i}]")) {
            Ok(()) if kept.iter().any(|k| k.get("kid").and_then(Value::as_str) == Some(kid)) => {
                format!("keys[{i}].kid: key id {kid:?} appears twice; the first is used")
            }
            Ok(()) => {
                kept.push(key.clone());
                continue;
            }
            Err(errors) => errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        };
        // Public keys only: nothing secret in the reason.
        tracing::warn!(kid, reason = %why, "skipping a key of the cluster's JWKS the proxy cannot use");
        problems.push(why);
    }
    if kept.is_empty() {
        return Err(format!(
            "none of its {} key(s) is usable by the proxy: {}",
            keys.len(),
            problems.join("; ")
        ));
    }
    Ok(json!({ "keys": kept }))
}

/// The filter's `identity` object.
pub fn identity_object(issuer: &str, audiences: &[String], jwks: &Value) -> Value {
    json!({ "issuers": [issuer], "audiences": audiences, "jwks": jwks })
}

/// Starts reading the identity; the receiver holds `None` until the first good read.
pub fn spawn(client: kube::Client, settings: IdentitySettings, hub: Hub) -> watch::Receiver<Option<Value>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(run(client, settings, hub, tx));
    rx
}

/// Reads, then re-reads on the period and on unknown-kid notices, publishing into `tx` when
/// the identity changes. Ends when every receiver is gone.
pub async fn run(client: kube::Client, settings: IdentitySettings, hub: Hub, tx: watch::Sender<Option<Value>>) {
    let mut last_attempt: Option<Instant> = None;
    let mut failures = 0u32;
    // When the next read is due; now for the first.
    let mut due = Instant::now();
    loop {
        let kid_notice = tokio::select! {
            _ = tokio::time::sleep_until(due) => false,
            _ = hub.unknown_kid.notified() => true,
            _ = tx.closed() => return,
        };
        if kid_notice {
            // Rate limit: a notice inside the window moves the read to the window's end.
            let earliest = last_attempt.map_or(Instant::now(), |t| t + settings.min_interval);
            if earliest > Instant::now() {
                due = due.min(earliest);
                tracing::debug!("unknown kid reported; keys are re-read at most once per min_interval");
                continue;
            }
        }
        last_attempt = Some(Instant::now());
        let read = tokio::time::timeout(settings.fetch_timeout, fetch(&client))
            .await
            .unwrap_or(Err(IdentityError::Timeout(settings.fetch_timeout)));
        match read {
            Ok((issuer, jwks)) => {
                failures = 0;
                Metrics::result(&hub.metrics.identity_refreshes, "ok");
                let identity = identity_object(&issuer, &settings.audiences, &jwks);
                let keys = jwks["keys"].as_array().map_or(0, Vec::len);
                tx.send_if_modified(|current| {
                    if current.as_ref() == Some(&identity) {
                        false
                    } else {
                        tracing::info!(%issuer, keys, "cluster identity read");
                        *current = Some(identity);
                        true
                    }
                });
                due = Instant::now() + settings.refresh;
            }
            Err(e) => {
                failures += 1;
                Metrics::result(&hub.metrics.identity_refreshes, "error");
                tracing::warn!(error = %e, "reading the cluster's ServiceAccount issuer and keys failed; keeping the last good identity");
                // Retry sooner than the period, backing off up to it.
                let backoff = Duration::from_secs(1u64 << failures.min(8)).min(settings.refresh);
                due = Instant::now() + backoff;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example configuration's key: an RSA key the filter accepts.
    fn good_key() -> Value {
        let example: Value = serde_json::from_str(include_str!("../../envoy/connectors.example.json")).unwrap();
        example["identity"]["jwks"]["keys"][0].clone()
    }

    #[test]
    fn unusable_keys_are_skipped_and_only_no_usable_key_is_refused() {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let es512 = json!({"kty": "EC", "crv": "P-521", "alg": "ES512", "kid": "es512", "x": b64(&[7; 66]), "y": b64(&[8; 66])});
        let ed25519 = json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(&[9; 32])});
        let rsa1024 = json!({"kty": "RSA", "kid": "rsa1024", "n": b64(&[0xc5; 128]), "e": "AQAB"});
        let good = good_key();
        let jwks = json!({ "keys": [es512.clone(), ed25519.clone(), good.clone(), rsa1024.clone(), good.clone()] });
        let kept = usable_keys(&jwks).unwrap();
        assert_eq!(kept, json!({ "keys": [good] }), "only the usable key, once");
        // The kept set is one the filter's validator takes.
        let config = json!({
            "identity": identity_object("https://kubernetes.default.svc", &["oci-connector".into()], &kept),
            "connectors": [{"namespace": "demo", "name": "r", "address": "http://r", "cluster": "c",
                "credential": {"fromController": "v1"}}],
            "controller": {"cluster": "connector_controller"},
        });
        let compiled = connector_filter::config::compile(config.to_string().as_bytes(), &|_| None);
        assert!(compiled.is_ok(), "{:?}", compiled.err());

        let e = usable_keys(&json!({ "keys": [es512, ed25519, rsa1024] })).unwrap_err();
        assert!(e.starts_with("none of its 3 key(s) is usable"), "{e}");
        for why in ["keys[0].crv", "keys[1].kty", "keys[2].n"] {
            assert!(e.contains(why), "{why} in {e}");
        }
        assert_eq!(usable_keys(&json!({ "keys": [] })).unwrap_err(), "no keys");
    }

    #[test]
    fn identity_object_has_the_filter_shape() {
        let jwks = json!({ "keys": [{ "kty": "RSA", "kid": "k1" }] });
        let v = identity_object("https://kubernetes.default.svc", &["oci-connector".into()], &jwks);
        assert_eq!(v["issuers"], json!(["https://kubernetes.default.svc"]));
        assert_eq!(v["audiences"], json!(["oci-connector"]));
        assert_eq!(v["jwks"]["keys"][0]["kid"], "k1");
    }
}
