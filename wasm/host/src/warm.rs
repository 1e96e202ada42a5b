//! Owns the measurement of a warm forwarded request: the proxy-wasm host calls the shipped
//! module makes for one manifest GET once every cache is warm (token verified, upstream scheme
//! learned, metrics defined). Host calls are the filter's main per-request cost inside Envoy, so
//! the test `warm_request` pins this list and `make bench` prints its length (`host-calls`).

use anyhow::{Result, bail};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::{Action, Host, Options, headers};

const NOW: u64 = 1_800_000_000;
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const AUDIENCE: &str = "oci-connector";
const KID: &str = "rsa-1";
const EC384_KID: &str = "ec384-1";
/// The filter's unit-test keys (generated for tests only, trusted by nothing else).
const RSA_PEM: &[u8] = include_bytes!("../../../core/src/keys/testdata/rsa.pem");
const EC384_PEM: &[u8] = include_bytes!("../../../core/src/keys/testdata/ec384.pem");
const PATH: &str = "/v2/namespaces/demo/connectors/registry/lib/app/manifests/v1";
/// The connector's own host name: the host form of the same request is `GET /v2/lib/app/...`
/// at it.
const HOST_FORM: &str = "registry.demo.example";

/// The host calls of one warm forwarded request, by phase, in the order made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmCalls {
    pub request: Vec<&'static str>,
    pub response: Vec<&'static str>,
}

impl WarmCalls {
    pub fn total(&self) -> usize {
        self.request.len() + self.response.len()
    }
}

/// The public JWK of the unit-test key, as the configuration's `identity.jwks` lists it.
pub fn test_jwk() -> Result<Jwk> {
    let key = EncodingKey::from_rsa_pem(RSA_PEM)?;
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256)?;
    jwk.common.key_id = Some(KID.to_string());
    Ok(jwk)
}

/// A host with the warm-request configuration accepted, and the request and answer it is sent.
pub struct Warm {
    host: Host,
    request: crate::Headers,
    answer: crate::Headers,
    key: EncodingKey,
    es384: EncodingKey,
}

impl Warm {
    /// `optimized`: Cranelift's optimisations on, as a timing wants.
    pub fn new(module: Option<std::path::PathBuf>, optimized: bool) -> Result<Warm> {
        let key = EncodingKey::from_rsa_pem(RSA_PEM)?;
        let jwk = test_jwk()?;
        let es384 = EncodingKey::from_ec_pem(EC384_PEM)?;
        let mut es384_jwk = Jwk::from_encoding_key(&es384, Algorithm::ES384)?;
        es384_jwk.common.key_id = Some(EC384_KID.to_string());
        let config = json!({
            "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": {"keys": [jwk, es384_jwk]}},
            "connectors": [{"namespace": "demo", "name": "registry", "address": "http://registry.internal:5000",
                "cluster": "upstream_demo", "credential": {"username": "robot", "passwordEnv": "REG_PASSWORD"},
                "hosts": [HOST_FORM]}]
        });
        let token = token(&key, Algorithm::RS256, KID, "u-1")?;
        let mut host = Host::with(Options {
            env: vec![("REG_PASSWORD".into(), "s3cret-pw".into())],
            now_nanos: Some(NOW * 1_000_000_000),
            module,
            optimized,
            ..Options::default()
        })?;
        if !host.configure(config.to_string().as_bytes())? {
            bail!("the configuration was refused: {:?}", host.rec().logs);
        }
        // What Envoy hands the filter for `curl`/`wrk` through the HTTP connection manager.
        let auth = format!("Bearer {token}");
        let request = headers(&[
            (":authority", "127.0.0.1:8080"),
            (":path", PATH),
            (":method", "GET"),
            (":scheme", "http"),
            ("accept", "application/vnd.oci.image.manifest.v1+json"),
            ("authorization", &auth),
            ("x-forwarded-proto", "http"),
            ("x-request-id", "3f0c6a4e-0000-4000-8000-000000000000"),
        ]);
        let answer = headers(&[
            (":status", "200"),
            ("content-type", "application/vnd.oci.image.manifest.v1+json"),
            ("content-length", "2"),
            (
                "docker-content-digest",
                "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            ),
            ("docker-distribution-api-version", "registry/2.0"),
            ("x-envoy-upstream-service-time", "1"),
        ]);
        Ok(Warm {
            host,
            request,
            answer,
            key,
            es384,
        })
    }

    /// A token of the same ServiceAccount that no request has sent yet: `uid` makes it unique.
    pub fn new_token(&self, uid: &str) -> Result<String> {
        token(&self.key, Algorithm::RS256, KID, uid)
    }

    /// The same, signed ES384 with the P-384 test key.
    pub fn new_es384_token(&self, uid: &str) -> Result<String> {
        token(&self.es384, Algorithm::ES384, EC384_KID, uid)
    }

    /// The request's `Authorization` becomes `Bearer <token>` for the requests that follow.
    pub fn use_token(&mut self, token: &str) {
        let auth = format!("Bearer {token}").into_bytes();
        for (name, value) in self.request.iter_mut() {
            if name.as_slice() == b"authorization" {
                value.clone_from(&auth);
            }
        }
    }

    /// The requests that follow use the host form (`/v2/lib/app/manifests/v1` at the
    /// connector's own host name) instead of the path form.
    pub fn use_host_form(&mut self) {
        for (name, value) in self.request.iter_mut() {
            match name.as_slice() {
                b":authority" => *value = HOST_FORM.as_bytes().to_vec(),
                b":path" => *value = b"/v2/lib/app/manifests/v1".to_vec(),
                _ => {}
            }
        }
    }

    /// What the host recorded (calls of the last request are cleared after it), to read
    /// metrics and logs, or to inject faults.
    pub fn record(&mut self) -> &mut crate::Record {
        self.host.rec_mut()
    }

    /// The module's linear memory now: what the filter's heap has grown to (it never shrinks).
    pub fn memory_bytes(&mut self) -> Result<usize> {
        self.host.memory_bytes()
    }

    /// One request through: request headers, the upstream's 200 (headers and body), the end of
    /// the stream; the host calls of each phase.
    pub fn request(&mut self) -> Result<WarmCalls> {
        Ok(self.request_seen(&[])?.0)
    }

    /// [`Warm::request`], and the values of request headers `names` as the upstream got them
    /// (`None`: not sent).
    pub fn request_seen(&mut self, names: &[&str]) -> Result<(WarmCalls, Vec<Option<String>>)> {
        let h = &mut self.host;
        let id = h.new_stream()?;
        let before = h.rec().calls.len();
        let mut action = h.request_headers(id, self.request.clone(), true)?;
        if action == Action::Pause && h.stream(id).local().is_none() {
            // The connector's first request asks the upstream for its scheme.
            let Some(probe) = h.pending_calls().first().map(|c| c.token) else {
                bail!("the request paused without a call: {:?}", h.rec().logs);
            };
            h.answer_call(probe, 401, &[("www-authenticate", r#"Basic realm="r""#)], b"")?;
            action = Action::Continue;
        }
        if action != Action::Continue || h.stream(id).local().is_some() {
            bail!("the request was not forwarded: {:?}", h.stream(id).local());
        }
        let seen = names.iter().map(|n| h.stream(id).request_header(n)).collect();
        let middle = h.rec().calls.len();
        h.response_headers(id, self.answer.clone(), false)?;
        h.response_body(id, b"{}", true)?;
        h.finish(id)?;
        let calls = &mut h.rec_mut().calls;
        let names = |from: usize, to: usize| calls.get(from..to).unwrap_or_default().iter().map(|c| c.0).collect();
        let out = WarmCalls {
            request: names(before, middle),
            response: names(middle, calls.len()),
        };
        // A timing loop must not grow the record without bound.
        calls.clear();
        h.rec_mut().streams.remove(&id);
        Ok((out, seen))
    }
}

/// A ServiceAccount token of `demo:default` signed with the unit-test key `kid`.
fn token(key: &EncodingKey, alg: Algorithm, kid: &str, uid: &str) -> Result<String> {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    let claims = json!({
        "iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 600, "nbf": NOW - 10, "iat": NOW - 10,
        "sub": "system:serviceaccount:demo:default",
        "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "default", "uid": uid}}
    });
    Ok(jsonwebtoken::encode(&header, &claims, key)?)
}

/// Sends the same authenticated manifest GET twice through a Basic-credential connector and
/// returns the host calls of the second (warm) one: request headers, then the upstream's 200
/// answer (headers and body) and the end of the stream.
pub fn warm_forwarded_request(module: Option<std::path::PathBuf>) -> Result<WarmCalls> {
    let mut warm = Warm::new(module, false)?;
    warm.request()?;
    let calls = warm.request()?;
    if !warm.host.pending_calls().is_empty() {
        bail!("the warm request made an HTTP call: {:?}", warm.host.pending_calls());
    }
    Ok(calls)
}
