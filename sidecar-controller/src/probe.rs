//! Owns the controller's own look at a connector's upstream: `LivenessReady` (does `/v2/`
//! answer like a registry?) and `AuthReady` (does the Secret's credential log in, the way
//! `docker login` does it?). Real HTTP with reqwest, 5 s per request. https upstreams are
//! trusted exactly as Envoy trusts them: the CA bundle of `--upstream-ca` (Debian's by default,
//! never built-in roots) and a certificate that names the address's host.
//!
//! The credential goes to the registry itself and, for a Bearer challenge, only to a token
//! realm on the registry's own `host[:port]` or one the connector lists in `spec.tokenRealms`:
//! the same rule the filter applies, so a probe never sends the credential where the proxy
//! would not. Errors carry a reason (the condition's `reason`) and a message a person can act
//! on; neither ever holds the credential or a token.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use connector_core::address::split_url;
use connector_core::percent::encode_query_value;
use connector_core::token_service::parse_challenge;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, WWW_AUTHENTICATE};

use crate::crd::TokenRealm;
use crate::secrets::Credential;

/// Per request; a registry that takes longer is not usable through the proxy either (the
/// filter gives up after 5 s too).
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub const UPSTREAM_UNREACHABLE: &str = "UpstreamUnreachable";
pub const UPSTREAM_UNEXPECTED_STATUS: &str = "UpstreamUnexpectedStatus";
pub const CREDENTIAL_REJECTED: &str = "CredentialRejected";
pub const REALM_NOT_ALLOWED: &str = "RealmNotAllowed";
pub const CHALLENGE_UNSUPPORTED: &str = "ChallengeUnsupported";
pub const TOKEN_SERVICE_FAILED: &str = "TokenServiceFailed";
pub const UPSTREAM_NOT_ALLOWED: &str = "UpstreamNotAllowed";

/// Why a probe failed: `reason` becomes the condition's reason, `message` its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError {
    pub reason: &'static str,
    pub message: String,
}

impl ProbeError {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for ProbeError {}

/// Where the probes may go, set once by [`use_tenancy`]: the proxy's own rule, so a probe
/// never reaches (nor sends a credential to) an address the proxy refuses.
static POLICY: OnceLock<crate::pipeline::Tenancy> = OnceLock::new();

/// Makes every probe refuse, without a connection, the upstreams `tenancy` refuses (loopback,
/// link-local, the pod's own ports ...). Call once at start-up; unset, probes go anywhere
/// (in-process tests of the reconciler).
pub fn use_tenancy(tenancy: crate::pipeline::Tenancy) {
    let _ = POLICY.set(tenancy);
}

/// Why the probes must not contact `url` under `tenancy`, as a [`ProbeError`].
pub fn check_target(url: &str, tenancy: &crate::pipeline::Tenancy) -> Result<(), ProbeError> {
    checked_target(url, tenancy).map(drop)
}

/// [`check_target`], giving the cluster `url` stands for when it may be contacted.
fn checked_target(url: &str, tenancy: &crate::pipeline::Tenancy) -> Result<crate::render::UpstreamCluster, ProbeError> {
    let origin = crate::render::realm_origin(url)
        .map_err(|e| ProbeError::new(UPSTREAM_NOT_ALLOWED, format!("{url:?} is not an http(s) URL: {e}")))?;
    let cluster = crate::render::cluster_for(&origin);
    match tenancy.refuse_upstream(&cluster) {
        Some(why) => Err(ProbeError::new(UPSTREAM_NOT_ALLOWED, format!("not probed: {why}"))),
        None => Ok(cluster),
    }
}

/// [`check_target`], and for a host name the addresses it resolves to by the same rule (the
/// client's resolver screens them again when it connects: a name rebound in between is caught
/// there).
async fn allowed(url: &str) -> Result<(), ProbeError> {
    let Some(tenancy) = POLICY.get() else {
        return Ok(());
    };
    let cluster = checked_target(url, tenancy)?;
    if !crate::pin::is_named(&cluster) {
        return Ok(());
    }
    // A name that does not resolve fails the request itself, with reqwest's own words.
    let Ok(ips) = crate::pin::resolve(&cluster.host).await else {
        return Ok(());
    };
    crate::pin::screen(tenancy, &cluster.host, cluster.port, &ips)
        .map(drop)
        .map_err(|why| ProbeError::new(UPSTREAM_NOT_ALLOWED, format!("not probed: {why}")))
}

/// The client every probe uses, set once by [`use_upstream_ca`]; until then, one validating
/// against Debian's CA bundle (Envoy's default too).
static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();

/// Makes the probes validate https upstreams against `ca_bundle` (PEM), the file Envoy's
/// clusters use (`--upstream-ca`), with the same name rule: the certificate must name the
/// address's host (DNS or IP SAN). Call once at start-up, before any probe. Fails when the file
/// cannot be read or holds no certificate.
pub fn use_upstream_ca(ca_bundle: &str) -> Result<(), String> {
    let client = client_with_ca(ca_bundle)?;
    // Set once; a second call (tests) keeps the first client.
    let _ = CLIENT.set(client);
    Ok(())
}

/// A probe client trusting exactly the certificates in `ca_bundle`: no built-in roots, so the
/// controller trusts what Envoy trusts and nothing more. rustls checks the certificate's name
/// against the URL's host, as Envoy's SAN matcher does. Redirects are not followed: `/v2/`
/// answers directly, and a redirect must not carry the credential anywhere.
pub fn client_with_ca(ca_bundle: &str) -> Result<reqwest::Client, String> {
    // reqwest is built without a default crypto provider; kube uses ring too. Installing
    // twice fails harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(ca_bundle).map_err(|e| format!("cannot read the upstream CA bundle {ca_bundle}: {e}"))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("the upstream CA bundle {ca_bundle} is not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("the upstream CA bundle {ca_bundle} holds no certificate"));
    }
    let mut builder = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("connector-controller-probe")
        .dns_resolver(Arc::new(crate::pin::ScreenedResolver { policy: &POLICY }))
        .tls_built_in_root_certs(false);
    for c in certs {
        builder = builder.add_root_certificate(c);
    }
    builder
        .build()
        .map_err(|e| format!("the upstream CA bundle {ca_bundle}: {}", chain(&e)))
}

fn client() -> &'static reqwest::Client {
    CLIENT.get_or_init(|| {
        client_with_ca(crate::xds::SYSTEM_CA_BUNDLE).unwrap_or_else(|e| {
            // No bundle: no https upstream is trusted (each probe says why), never a silent default.
            tracing::warn!(error = %e, "https upstreams cannot be verified by the probes");
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::builder()
                .timeout(TIMEOUT)
                .connect_timeout(TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .dns_resolver(Arc::new(crate::pin::ScreenedResolver { policy: &POLICY }))
                .tls_built_in_root_certs(false)
                .build()
                .unwrap_or_else(|_| reqwest::Client::new())
        })
    })
}

/// An error with its causes (reqwest's own text names only the URL; the cause says e.g. which
/// certificate check failed). Never holds a header.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

fn base_url(address: &str) -> String {
    format!("{}/v2/", address.trim_end_matches('/'))
}

fn unreachable(what: &str, url: &str, e: &reqwest::Error) -> ProbeError {
    // The resolver refused every address of the name (module `pin`).
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<crate::pin::Refused>() {
            return ProbeError::new(UPSTREAM_NOT_ALLOWED, format!("not probed: {refused}"));
        }
        source = s.source();
    }
    let detail = chain(e);
    let why = if e.is_timeout() {
        format!("did not answer within {} s", TIMEOUT.as_secs())
    } else if detail.contains("certificate") {
        "failed TLS verification (the certificate must come from the upstream CA bundle and name the address's host)"
            .to_string()
    } else if e.is_connect() {
        "refused or failed the connection".to_string()
    } else {
        "failed the request".to_string()
    };
    // reqwest's error text names the URL and the I/O or TLS cause, never a header.
    ProbeError::new(
        UPSTREAM_UNREACHABLE,
        format!(
            "{what} {url} {why} ({detail}); check spec.address and that the registry is reachable from the controller"
        ),
    )
}

/// `GET <address>/v2/` without credentials: `200` (open) or `401` (asks for credentials) is a
/// live registry; anything else is not.
pub async fn liveness(address: &str) -> Result<(), ProbeError> {
    liveness_with(client(), address).await
}

/// [`liveness`] with a given client (see [`client_with_ca`]).
pub async fn liveness_with(client: &reqwest::Client, address: &str) -> Result<(), ProbeError> {
    allowed(address).await?;
    let url = base_url(address);
    let r = client
        .get(&url)
        .send()
        .await
        .map_err(|e| unreachable("the upstream registry", &url, &e))?;
    match r.status() {
        StatusCode::OK | StatusCode::UNAUTHORIZED => Ok(()),
        other => Err(unexpected(&url, other)),
    }
}

fn unexpected(url: &str, status: StatusCode) -> ProbeError {
    ProbeError::new(
        UPSTREAM_UNEXPECTED_STATUS,
        format!(
            "GET {url} answered {status} (a registry answers 200 or 401): check that spec.address is the registry's origin"
        ),
    )
}

fn basic(c: &Credential) -> String {
    connector_core::basic::authorization(&c.username, &c.password)
}

/// Logs in to the registry at `address` with `credential`, as `docker login` does:
/// `GET /v2/`; on a `Basic` challenge `GET /v2/` with the credential must answer 200; on a
/// `Bearer realm=..,service=..` challenge the realm (checked against the registry's host and
/// `token_realms`) must hand out a token for the credential, and `GET /v2/` with that token
/// must answer 200. An open registry (200 without credentials) logs anyone in.
pub async fn login(address: &str, credential: &Credential, token_realms: &[TokenRealm]) -> Result<(), ProbeError> {
    login_with(client(), address, credential, token_realms).await
}

/// [`login`] with a given client (see [`client_with_ca`]).
pub async fn login_with(
    client: &reqwest::Client,
    address: &str,
    credential: &Credential,
    token_realms: &[TokenRealm],
) -> Result<(), ProbeError> {
    allowed(address).await?;
    let url = base_url(address);
    let r = client
        .get(&url)
        .send()
        .await
        .map_err(|e| unreachable("the upstream registry", &url, &e))?;
    match r.status() {
        StatusCode::OK => return Ok(()),
        StatusCode::UNAUTHORIZED => {}
        other => return Err(unexpected(&url, other)),
    }
    let challenge = r
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some((scheme, params)) = challenge.as_deref().and_then(parse_challenge) else {
        return Err(ProbeError::new(
            CHALLENGE_UNSUPPORTED,
            format!("GET {url} answered 401 without a usable WWW-Authenticate challenge"),
        ));
    };
    match scheme.as_str() {
        "basic" => with_authorization(client, &url, &basic(credential), "the Secret's credential").await,
        "bearer" => {
            let realm = params.get("realm").cloned().unwrap_or_default();
            let service = params.get("service").cloned().unwrap_or_default();
            check_realm(address, &realm, token_realms)?;
            allowed(&realm).await?;
            let token = fetch_token(client, &realm, &service, credential).await?;
            with_authorization(client, &url, &token, "a token the registry's token service issued").await
        }
        other => Err(ProbeError::new(
            CHALLENGE_UNSUPPORTED,
            format!(
                "the registry asks for {other:?} authentication; the proxy speaks Basic and Bearer (token service)"
            ),
        )),
    }
}

async fn with_authorization(
    client: &reqwest::Client,
    url: &str,
    authorization: &str,
    what: &str,
) -> Result<(), ProbeError> {
    let r = client
        .get(url)
        .header(AUTHORIZATION, authorization)
        .send()
        .await
        .map_err(|e| unreachable("the upstream registry", url, &e))?;
    match r.status() {
        StatusCode::OK => Ok(()),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(ProbeError::new(
            CREDENTIAL_REJECTED,
            format!(
                "GET {url} with {what} answered {}: the registry refuses the credential; fix the username or password in the connector's Secret",
                r.status()
            ),
        )),
        other => Err(unexpected(url, other)),
    }
}

/// The realm must be on the registry's own `host[:port]` or listed in `spec.tokenRealms`
/// (same scheme, authority and path), exactly as the filter decides.
pub fn check_realm(address: &str, realm: &str, token_realms: &[TokenRealm]) -> Result<(), ProbeError> {
    let refused = || {
        ProbeError::new(
            REALM_NOT_ALLOWED,
            format!(
                "the registry sends clients to the token realm {realm:?}, which is neither on the registry's host nor listed in spec.tokenRealms; the credential was not sent. Add the realm to spec.tokenRealms if it belongs to the registry"
            ),
        )
    };
    let (scheme, authority, path) = split_url(realm).ok_or_else(refused)?;
    let own = split_url(address).map(|(_, a, _)| a);
    if own.as_deref() == Some(authority.as_str()) {
        return Ok(());
    }
    let listed = token_realms
        .iter()
        .any(|r| split_url(&r.url).is_some_and(|(s, a, p)| s == scheme && a == authority && p == path));
    if listed { Ok(()) } else { Err(refused()) }
}

async fn fetch_token(
    client: &reqwest::Client,
    realm: &str,
    service: &str,
    credential: &Credential,
) -> Result<String, ProbeError> {
    let mut url = realm.to_string();
    let mut sep = if url.contains('?') { '&' } else { '?' };
    for (k, v) in [("service", service), ("account", credential.username.as_str())] {
        if !v.is_empty() {
            url.push(sep);
            url.push_str(k);
            url.push('=');
            url.push_str(&encode_query_value(v));
            sep = '&';
        }
    }
    let r = client
        .get(&url)
        .header(AUTHORIZATION, basic(credential))
        .send()
        .await
        .map_err(|e| {
            let mut err = unreachable("the token service", realm, &e);
            err.reason = TOKEN_SERVICE_FAILED;
            err
        })?;
    let status = r.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(ProbeError::new(
            CREDENTIAL_REJECTED,
            format!(
                "the token service {realm:?} refused the Secret's credential ({status}): fix the username or password in the connector's Secret, or grant the account access"
            ),
        ));
    }
    if status != StatusCode::OK {
        return Err(ProbeError::new(
            TOKEN_SERVICE_FAILED,
            format!("the token service {realm:?} answered {status}: retry later or check the registry"),
        ));
    }
    let body = r.bytes().await.map_err(|e| {
        ProbeError::new(
            TOKEN_SERVICE_FAILED,
            format!("reading the token service's answer from {realm:?} failed: {e}"),
        )
    })?;
    connector_core::token_service::token_from_answer(200, &body)
        .map(|(authorization, _)| authorization)
        .map_err(|why| ProbeError::new(TOKEN_SERVICE_FAILED, format!("the token service at {realm:?} {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn realm(url: &str) -> TokenRealm {
        TokenRealm {
            url: url.into(),
            cluster: None,
        }
    }

    #[test]
    fn realms_on_the_registry_host_or_listed() {
        let listed = [realm("https://auth.example.com/token")];
        for (address, r, ok) in [
            (
                "https://harbor.example.com",
                "https://harbor.example.com/service/token",
                true,
            ),
            (
                "https://Harbor.example.com:443/",
                "https://harbor.example.com/service/token",
                true,
            ),
            ("http://127.0.0.1:5000", "http://127.0.0.1:5000/token", true),
            ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token", false),
            ("https://harbor.example.com", "https://auth.example.com/token", true),
            ("https://harbor.example.com", "https://auth.example.com/other", false),
            ("https://harbor.example.com", "http://auth.example.com/token", false),
            ("https://harbor.example.com", "https://evil.example.net/token", false),
            ("https://harbor.example.com", "not a url", false),
            ("https://harbor.example.com", "", false),
        ] {
            let got = check_realm(address, r, &listed);
            assert_eq!(got.is_ok(), ok, "{address} {r}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.reason, REALM_NOT_ALLOWED);
                assert!(e.message.contains("spec.tokenRealms"), "{}", e.message);
            }
        }
    }

    #[test]
    fn targets_the_proxy_refuses_are_not_probed() {
        let tenancy = crate::pipeline::Tenancy {
            own_ports: vec![18001],
            ..Default::default()
        };
        for (url, refused) in [
            ("http://127.0.0.1:5000", true),
            ("http://169.254.169.254", true),
            ("http://127.0.0.1:18001/v1/credentials/demo/a", true),
            ("https://harbor.example.com", false),
            ("https://auth.example.com/service/token?x=1", false),
            ("ftp://x", true),
        ] {
            let got = check_target(url, &tenancy);
            assert_eq!(got.is_err(), refused, "{url}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.reason, UPSTREAM_NOT_ALLOWED, "{url}");
            }
        }
        let local = crate::pipeline::Tenancy {
            allow_local_upstreams: true,
            ..tenancy
        };
        assert!(check_target("http://127.0.0.1:5000", &local).is_ok());
        assert!(check_target("http://127.0.0.1:18001", &local).is_err());
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = liveness(&format!("http://127.0.0.1:{port}")).await.unwrap_err();
        assert_eq!(e.reason, UPSTREAM_UNREACHABLE, "{e}");
        assert!(e.message.contains(&format!("127.0.0.1:{port}/v2/")), "{e}");
    }
}
