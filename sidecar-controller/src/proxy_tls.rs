//! Owns the proxy listener's serving certificate: where it comes from (a `kubernetes.io/tls`
//! Secret in API mode, watched; or a certificate and key file, polled), its validation, and the
//! SDS resource ([`SDS_SECRET_NAME`]) the xDS server hands Envoy over the same ADS stream.
//!
//! Rotation is a new SDS resource: Envoy builds a new TLS context for new connections and lets
//! the open ones finish on the old one, so no listener drains and no request in flight fails.
//! A certificate that does not parse, or whose key does not match it, is refused and the last
//! good one stays in force (Envoy keeps serving it).
//!
//! The private key only ever travels inside the SDS resource: it is in no log line, error,
//! metric or status, and Envoy's `/config_dump` shows SDS private keys as `[redacted]`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, TlsCertificate, secret};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::hub::Hub;

/// The SDS resource the proxy listener's `DownstreamTlsContext` names.
pub const SDS_SECRET_NAME: &str = "proxy-tls";
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// cert-manager's (and `kubectl create secret tls`'s) Secret type and keys.
pub const KUBE_TLS_TYPE: &str = "kubernetes.io/tls";
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";

/// A validated certificate chain and its key. `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingCert {
    /// PEM, leaf first, as served.
    pub chain_pem: String,
    key_pem: String,
    /// SHA-256 of the leaf certificate (DER), hex: what logs and tests identify it by.
    pub fingerprint: String,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("fingerprint", &self.fingerprint)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl ServingCert {
    /// Parses and checks a PEM chain and key: at least one certificate, a key rustls can sign
    /// with, and (when the key type tells) the key belonging to the leaf. Errors never quote
    /// the key.
    pub fn parse(chain: &[u8], key: &[u8]) -> Result<Self, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the certificate chain is not PEM: {e}"))?;
        let Some(leaf) = certs.first() else {
            return Err("no CERTIFICATE block in the certificate chain".into());
        };
        let fingerprint = hex(&Sha256::digest(leaf.as_ref()));
        // The key's PEM error is generic on purpose: no part of the key ends up in a message.
        let der = PrivateKeyDer::from_pem_slice(key).map_err(|_| {
            "the private key is not a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block".to_string()
        })?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|_| {
            "the private key is of a type this proxy cannot serve (RSA, ECDSA P-256/P-384, Ed25519)".to_string()
        })?;
        let certified = rustls::sign::CertifiedKey::new(certs, signer);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => return Err("the private key does not belong to the certificate".into()),
        }
        let as_text = |b: &[u8], what: &str| {
            String::from_utf8(b.to_vec()).map_err(|_| format!("the {what} is not text (PEM expected)"))
        };
        Ok(Self {
            chain_pem: as_text(chain, "certificate chain")?,
            key_pem: as_text(key, "private key")?,
            fingerprint,
        })
    }

    /// The SDS resource: the chain and key inline (Envoy redacts the key in `/config_dump`).
    pub fn sds_resource(&self) -> Secret {
        let inline = |s: &str| DataSource {
            specifier: Some(data_source::Specifier::InlineString(s.to_string())),
            ..Default::default()
        };
        Secret {
            name: SDS_SECRET_NAME.into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(&self.chain_pem)),
                private_key: Some(inline(&self.key_pem)),
                ..Default::default()
            })),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `kubernetes.io/tls` Secret's certificate (cert-manager writes `tls.crt`, `tls.key` and
/// `ca.crt`; the CA is for clients, so it is not served).
pub fn from_secret(s: &k8s_openapi::api::core::v1::Secret) -> Result<ServingCert, String> {
    let ty = s.type_.as_deref().unwrap_or("Opaque");
    if ty != KUBE_TLS_TYPE {
        return Err(format!(
            "the Secret is of type {ty:?}; the proxy's certificate needs {KUBE_TLS_TYPE:?}"
        ));
    }
    let data = s.data.as_ref();
    let get = |k: &str| {
        data.and_then(|d| d.get(k))
            .map(|b| b.0.clone())
            .ok_or_else(|| format!("the Secret has no {k:?}"))
    };
    ServingCert::parse(&get(TLS_CRT)?, &get(TLS_KEY)?)
}

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM files, polled (a mounted Secret volume swaps them through a symlink: polling sees it).
    Files {
        cert: PathBuf,
        key: PathBuf,
        poll: Duration,
    },
    /// A `kubernetes.io/tls` Secret, watched (API mode).
    Secret { namespace: String, name: String },
}

/// Publishes `cert` to the hub, logging which certificate is now served (never the key).
fn publish(hub: &Hub, cert: ServingCert, from: &str) {
    let fingerprint = cert.fingerprint.clone();
    hub.metrics.set_awaiting_proxy_cert(false);
    if hub.publish_proxy_cert(cert) {
        crate::ops::Metrics::result(&hub.metrics.proxy_cert_loads, "ok");
        tracing::info!(from, sha256 = %fingerprint, "proxy serving certificate loaded");
    }
}

fn refuse(hub: &Hub, from: &str, why: &str) {
    crate::ops::Metrics::result(&hub.metrics.proxy_cert_loads, "refused");
    tracing::error!(
        from,
        problem = why,
        "proxy serving certificate refused; the last good one stays in force"
    );
}

/// File mode's watcher: re-reads both files whenever either's size or time changes.
pub async fn watch_files(cert: PathBuf, key: PathBuf, poll: Duration, hub: Hub) {
    let stamp = |p: &PathBuf| -> Option<(u64, Option<SystemTime>)> {
        std::fs::metadata(p).ok().map(|m| (m.len(), m.modified().ok()))
    };
    let mut last = None;
    let from = cert.display().to_string();
    loop {
        let now = (stamp(&cert), stamp(&key));
        if last.as_ref() != Some(&now) {
            last = Some(now);
            let read = std::fs::read(&cert)
                .map_err(|e| format!("cannot read {}: {e}", cert.display()))
                .and_then(|c| {
                    std::fs::read(&key)
                        .map_err(|e| format!("cannot read {}: {e}", key.display()))
                        .map(|k| (c, k))
                });
            match read.and_then(|(c, k)| ServingCert::parse(&c, &k)) {
                Ok(c) => publish(&hub, c, &from),
                Err(why) => refuse(&hub, &from, &why),
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// API mode's watcher: one Secret by name (a field selector, so no other Secret is listed).
pub async fn watch_secret(client: kube::Client, namespace: String, name: String, hub: Hub) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client, &namespace);
    let from = format!("Secret {namespace}/{name}");
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut seen = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                seen = true;
                match from_secret(&s) {
                    Ok(c) => publish(&hub, c, &from),
                    Err(why) => refuse(&hub, &from, &why),
                }
            }
            Ok(watcher::Event::Delete(_)) => refuse(
                &hub,
                &from,
                "the Secret was deleted (Envoy keeps the certificate it has)",
            ),
            Ok(watcher::Event::Init) => seen = false,
            Ok(watcher::Event::InitDone) if !seen => refuse(&hub, &from, "the Secret does not exist"),
            Ok(watcher::Event::InitDone) => {}
            Err(e) => tracing::warn!(from, error = %e, "watching the proxy's certificate Secret failed; retrying"),
        }
    }
}

/// Runs the watcher `source` names until the process ends. `/readyz` says not ready until a
/// first certificate is loaded.
pub async fn run(source: CertSource, client: Option<kube::Client>, hub: Hub) {
    hub.metrics.set_awaiting_proxy_cert(true);
    match (source, client) {
        (CertSource::Files { cert, key, poll }, _) => watch_files(cert, key, poll, hub).await,
        (CertSource::Secret { namespace, name }, Some(client)) => watch_secret(client, namespace, name, hub).await,
        (CertSource::Secret { .. }, None) => {
            refuse(&hub, "--proxy-tls-secret", "a Secret needs API mode (--kube)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(dir: &std::path::Path, host: &str) -> (Vec<u8>, Vec<u8>) {
        let ca = connector_devkit::tls::TestCa::new(dir).unwrap();
        let c = ca.issue(host).unwrap();
        (std::fs::read(c.cert).unwrap(), std::fs::read(c.key).unwrap())
    }

    #[test]
    fn a_matching_chain_and_key_parse_and_the_key_never_shows_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = make(dir.path(), "proxy.example");
        let c = ServingCert::parse(&crt, &key).unwrap();
        assert_eq!(c.fingerprint.len(), 64);
        let dbg = format!("{c:?}");
        assert!(dbg.contains("[redacted]") && !dbg.contains("PRIVATE KEY"), "{dbg}");
        let Some(secret::Type::TlsCertificate(t)) = c.sds_resource().r#type else {
            panic!("a TLS certificate")
        };
        assert!(matches!(
            t.private_key.unwrap().specifier,
            Some(data_source::Specifier::InlineString(k)) if k.contains("PRIVATE KEY")
        ));
    }

    #[test]
    fn bad_input_is_refused_with_a_message_that_never_quotes_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = make(dir.path(), "a.example");
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = make(other.path(), "b.example");
        let key_text = String::from_utf8(key.clone()).unwrap();
        let cases: Vec<(&[u8], &[u8], &str)> = vec![
            (b"", &key, "no CERTIFICATE"),
            (&crt, b"not a key", "not a PEM"),
            (&crt, &other_key, "does not belong"),
            (&key, &key, "no CERTIFICATE"),
        ];
        for (c, k, want) in cases {
            let e = ServingCert::parse(c, k).unwrap_err();
            assert!(e.contains(want), "{e} should say {want}");
            assert!(!key_text.lines().skip(1).take(3).any(|l| e.contains(l)), "{e}");
        }
    }

    #[test]
    fn only_kubernetes_io_tls_secrets_with_both_keys_are_taken() {
        use k8s_openapi::ByteString;
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = make(dir.path(), "proxy.example");
        let secret = |ty: &str, keys: &[(&str, &Vec<u8>)]| k8s_openapi::api::core::v1::Secret {
            type_: Some(ty.into()),
            data: Some(
                keys.iter()
                    .map(|(k, v)| (k.to_string(), ByteString((*v).clone())))
                    .collect(),
            ),
            ..Default::default()
        };
        let ca = b"ignored".to_vec();
        assert!(
            from_secret(&secret(
                KUBE_TLS_TYPE,
                &[(TLS_CRT, &crt), (TLS_KEY, &key), ("ca.crt", &ca)]
            ))
            .is_ok()
        );
        let e = from_secret(&secret("Opaque", &[(TLS_CRT, &crt), (TLS_KEY, &key)])).unwrap_err();
        assert!(e.contains("kubernetes.io/tls"), "{e}");
        let e = from_secret(&secret(KUBE_TLS_TYPE, &[(TLS_CRT, &crt)])).unwrap_err();
        assert!(e.contains("tls.key"), "{e}");
    }
}
