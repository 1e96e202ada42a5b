//! Hostile requests, end to end through the real Envoy and filter (issue 6): a table of attacks,
//! each with its expected SAFE outcome — the exact status, the OCI error code where the filter
//! answers, and, most important, what reached the upstream (as the byte recorder saw it):
//! nothing at all, or only the connector's own credential and never the client's token. The
//! table reports every mismatch at once (request → expected → observed). After it, stateful
//! attacks (foreign mounts, reused upload sessions), then a scan of Envoy's log, its
//! `/config_dump` and every byte the upstream received in this file for any client token and the
//! upstream passwords.

use connector_devkit::http::{Request, Response, basic_value};
use connector_devkit::stack::{
    ALLOWED_NAMESPACE, BROKEN_CONNECTOR_NAME, CONNECTOR_NAME, CONNECTOR_NAMESPACE, Stack, UPSTREAM_USER, host_name,
};
use connector_e2e::{REPO, Shared, TAG, manifest_path, oci_error, path_form, with_token};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

static STACK: Shared = Shared::new("e2e-attacks", true);

/// Tokens made by hand in this file (the minter does not know them): scanned for at the end.
static HANDMADE: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Everything the upstream received during this file, for the final scan.
static UPSTREAM_SEEN: Mutex<String> = Mutex::new(String::new());

/// What the upstream may have received for a case.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Up {
    /// Not one byte.
    Nothing,
    /// At least one request, each with exactly the `demo/registry` connector's credential
    /// (or the credential-less `GET /v2/` challenge probe the filter sends once per connector).
    Connector,
    /// Same, with the `demo/stale-secret` connector's (wrong) credential.
    Stale,
}

struct Case {
    what: String,
    req: Request,
    status: u16,
    /// The OCI error code of the answer; `None`: the body is not checked (Envoy's own answer,
    /// or the upstream's).
    code: Option<&'static str>,
    /// The OCI error message must contain this (case-insensitive).
    mention: Option<&'static str>,
    up: Up,
    /// Upstream request line that must be the first forwarded one (routing unchanged).
    line: Option<String>,
    /// Substrings (case-insensitive) that must not appear in the upstream's bytes.
    forbid: Vec<String>,
}

impl Case {
    fn new(what: impl Into<String>, req: Request, status: u16, code: Option<&'static str>, up: Up) -> Self {
        Self {
            what: what.into(),
            req,
            status,
            code,
            mention: None,
            up,
            line: None,
            forbid: Vec::new(),
        }
    }

    fn mention(mut self, m: &'static str) -> Self {
        self.mention = Some(m);
        self
    }

    fn line(mut self, l: impl Into<String>) -> Self {
        self.line = Some(l.into());
        self
    }

    fn forbid(mut self, f: &str) -> Self {
        self.forbid.push(f.to_string());
        self
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn b64url_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' | b'+' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        acc = (acc << 6) | u32::from(val(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The PEM file of one of the minter's keys (`rsa-1`, `ec-1`, `rogue-1`).
fn key_pem(s: &Stack, kid: &str) -> String {
    s.work
        .path()
        .join("keys")
        .join(format!("{kid}.pem"))
        .display()
        .to_string()
}

/// Standard ServiceAccount claims for `ns/sa`, valid for an hour.
fn claims(ns: &str, sa: &str) -> Value {
    let t = now();
    json!({
        "iss": connector_devkit::tokens::ISSUER,
        "aud": [connector_devkit::tokens::AUDIENCE],
        "exp": t + 3600, "nbf": t, "iat": t,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": { "namespace": ns, "serviceaccount": { "name": sa, "uid": "00000000-0000-0000-0000-000000000000" } },
    })
}

fn remember(t: String) -> String {
    HANDMADE.lock().unwrap_or_else(|e| e.into_inner()).push(t.clone());
    t
}

/// `header.claims` signed with `key` as `alg`, the header written as given (forged tokens carry
/// headers no well-behaved library would write).
fn signed(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(signing_input.as_bytes(), key, alg).expect("sign");
    remember(format!("{signing_input}.{sig}"))
}

/// A JWT with any header, HS256-signed with `secret` as the HMAC key.
fn hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    signed(header, claims, &EncodingKey::from_secret(secret), Algorithm::HS256)
}

fn rsa_key(pem: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(pem).expect("read the key")).expect("an RSA private key")
}

/// A JWT with any header, RS256-signed with the PEM private key at `pem`.
fn rs256(header: &Value, claims: &Value, pem: &str) -> String {
    signed(header, claims, &rsa_key(pem), Algorithm::RS256)
}

/// The public JWK (`kty`, `n`, `e`, `kid`, `alg`, `use`) of an RSA private key PEM.
fn rsa_public_jwk(pem: &str, kid: &str) -> Value {
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa_key(pem), Algorithm::RS256).expect("a JWK");
    jwk.common.key_id = Some(kid.to_string());
    jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
    serde_json::to_value(&jwk).expect("JSON")
}

/// The RSA public key of the private key PEM at `pem` as an attacker finds it published: SPKI
/// PEM, PKCS#1 PEM and SPKI DER.
fn public_key_encodings(pem: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    use rsa::pkcs1::{DecodeRsaPrivateKey as _, EncodeRsaPublicKey as _};
    use rsa::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _, LineEnding};
    let text = std::fs::read_to_string(pem).expect("read the key");
    let private = rsa::RsaPrivateKey::from_pkcs8_pem(&text)
        .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(&text))
        .expect("an RSA private key");
    let public = private.to_public_key();
    (
        public.to_public_key_pem(LineEnding::LF).expect("SPKI PEM").into_bytes(),
        public.to_pkcs1_pem(LineEnding::LF).expect("PKCS#1 PEM").into_bytes(),
        public.to_public_key_der().expect("SPKI DER").as_bytes().to_vec(),
    )
}

/// `Basic base64(robot:<password>)` of a connector.
fn connector_basic(password: &str) -> String {
    format!("Basic {}", basic_value(UPSTREAM_USER, password))
}

/// The requests in recorded upstream bytes: (request line, Authorization values).
fn upstream_requests(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut in_head = false;
    for l in text.split("\r\n") {
        let is_req = ["GET ", "HEAD ", "POST ", "PUT ", "PATCH ", "DELETE ", "OPTIONS "]
            .iter()
            .any(|m| l.starts_with(m))
            && l.ends_with(" HTTP/1.1");
        if is_req {
            out.push((l.to_string(), Vec::new()));
            in_head = true;
        } else if l.is_empty() {
            in_head = false;
        } else if in_head
            && let Some((n, v)) = l.split_once(':')
            && n.eq_ignore_ascii_case("authorization")
            && let Some(last) = out.last_mut()
        {
            last.1.push(v.trim().to_string());
        }
    }
    out
}

/// Checks what the upstream received against `up`; returns the problems.
fn check_upstream(s: &Stack, text: &str, up: Up, secrets: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let requests = upstream_requests(text);
    match up {
        Up::Nothing => {
            if !text.is_empty() {
                let lines: Vec<&String> = requests.iter().map(|r| &r.0).collect();
                problems.push(format!(
                    "upstream must receive nothing, got {} bytes: {lines:?}",
                    text.len()
                ));
            }
        }
        Up::Connector | Up::Stale => {
            let want = if up == Up::Connector {
                connector_basic(s.password())
            } else {
                connector_basic(&s.broken_password)
            };
            if requests.iter().all(|(l, _)| l == "GET /v2/ HTTP/1.1") {
                problems.push(format!(
                    "the request should have been forwarded; upstream got {:?}",
                    requests.iter().map(|r| &r.0).collect::<Vec<_>>()
                ));
            }
            for (line, auths) in &requests {
                let probe = line == "GET /v2/ HTTP/1.1" && auths.is_empty();
                if !probe && (auths.len() != 1 || auths[0] != want) {
                    problems.push(format!(
                        "upstream request {line:?} must carry exactly the connector's credential, it carried {} Authorization value(s){}",
                        auths.len(),
                        if auths.iter().any(|a| a.starts_with("Basic ") && *a != want) { " (a foreign Basic)" } else { "" }
                    ));
                }
            }
        }
    }
    for secret in secrets {
        if !secret.is_empty() && text.contains(secret.as_str()) {
            problems.push("a client token (or its signature) reached the upstream".to_string());
        }
    }
    problems
}

/// Sends one case and returns (observed summary, problems).
fn run_case(s: &Stack, c: &Case) -> (String, Vec<String>) {
    s.recorder.take();
    let resp = c.req.send(s.envoy.port);
    let seen = s.recorder.take();
    UPSTREAM_SEEN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push_str(&seen.text);
    let mut problems = Vec::new();
    let resp: Response = match resp {
        Ok(r) => r,
        Err(e) => return (format!("no answer: {e}"), vec![format!("request failed: {e}")]),
    };
    let code = resp
        .json()
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string));
    let observed = format!(
        "{} {} upstream: {}",
        resp.status,
        code.as_deref().unwrap_or("-"),
        if seen.is_empty() {
            "nothing".to_string()
        } else {
            format!("{:?}", seen.request_lines())
        }
    );
    if resp.status != c.status {
        problems.push(format!(
            "status {} (expected {}): {}",
            resp.status,
            c.status,
            trunc(&resp.summary())
        ));
    }
    if let Some(want) = c.code {
        match resp.json() {
            Ok(_) if code.is_some() => {
                let (got, message) = oci_error(&resp);
                if got != want {
                    problems.push(format!("OCI code {got} (expected {want}): {}", trunc(&message)));
                }
                if let Some(m) = c.mention
                    && !message.to_lowercase().contains(&m.to_lowercase())
                {
                    problems.push(format!("message {:?} does not mention {m:?}", trunc(&message)));
                }
            }
            _ => problems.push(format!("not an OCI error body: {}", trunc(&resp.summary()))),
        }
    }
    // The proxy's own challenge, never the upstream's.
    for (n, v) in &resp.headers {
        if n.eq_ignore_ascii_case("www-authenticate")
            && v != "Basic realm=\"oci-connector\""
            && !v.starts_with("Basic realm=\"oci-connector\"")
        {
            problems.push(format!("a foreign challenge reached the client: {v}"));
        }
    }
    if resp.status == 401 && resp.header("www-authenticate").is_none() {
        problems.push("a 401 without the proxy's Basic challenge".into());
    }
    // The client's token(s) of this case: every Authorization value and the JWTs inside.
    let mut secrets = Vec::new();
    for (n, v) in &c.req.headers {
        if n.eq_ignore_ascii_case("authorization")
            || n.eq_ignore_ascii_case("proxy-authorization")
            || n.eq_ignore_ascii_case("cookie")
        {
            secrets.push(v.clone());
            if let Some(b) = v.strip_prefix("Basic ") {
                let dec = String::from_utf8_lossy(&b64url_decode(b)).into_owned();
                if let Some((_, p)) = dec.split_once(':') {
                    secrets.push(p.to_string());
                }
            }
            if let Some(t) = v.strip_prefix("Bearer ") {
                secrets.push(t.to_string());
            }
        }
    }
    let sigs: Vec<String> = secrets
        .iter()
        .filter_map(|t| t.rsplit('.').next().filter(|x| x.len() > 16).map(str::to_string))
        .collect();
    secrets.extend(sigs);
    problems.extend(check_upstream(s, &seen.text, c.up, &secrets));
    if let Some(line) = &c.line {
        let first = upstream_requests(&seen.text)
            .into_iter()
            .map(|r| r.0)
            .find(|l| l != "GET /v2/ HTTP/1.1");
        if first.as_deref() != Some(line.as_str()) {
            problems.push(format!("upstream request line {first:?}, expected {line:?}"));
        }
    }
    let lower = seen.text.to_lowercase();
    for f in &c.forbid {
        if lower.contains(&f.to_lowercase()) {
            problems.push(format!("{f:?} reached the upstream"));
        }
    }
    (observed, problems)
}

fn trunc(s: &str) -> String {
    if s.len() > 300 {
        format!(
            "{}…",
            &s[..s
                .char_indices()
                .take_while(|(i, _)| *i < 300)
                .last()
                .map(|(i, _)| i)
                .unwrap_or(0)]
        )
    } else {
        s.to_string()
    }
}

/// Runs the cases, prints the table (request → expected → observed) and returns the failures.
fn run_table(s: &Stack, cases: &[Case]) -> Vec<String> {
    let mut failures = Vec::new();
    let mut table = Vec::new();
    for c in cases {
        let (observed, problems) = run_case(s, c);
        let expected = format!("{} {}", c.status, c.code.unwrap_or("-"));
        table.push(format!(
            "{:<70} | expected {:<22} up={:?} | observed {}",
            c.what,
            expected,
            c.up,
            trunc(&observed)
        ));
        if !problems.is_empty() {
            failures.push(format!("{}:\n    {}", c.what, problems.join("\n    ")));
        }
    }
    eprintln!("attack table ({} cases):\n{}", cases.len(), table.join("\n"));
    failures
}

fn mp() -> String {
    manifest_path()
}

const OCI_ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// GET of the sample manifest (path form), accepting what the registry holds.
fn mreq() -> Request {
    get_m(&mp())
}

fn get_m(path: &str) -> Request {
    Request::get(path).header("Accept", OCI_ACCEPT)
}

fn upstream_manifest_line() -> String {
    format!("GET /v2/{REPO}/manifests/{TAG} HTTP/1.1")
}

/// Credentials and tokens.
fn token_cases(s: &Stack) -> (Vec<Case>, std::net::TcpListener) {
    let m = &s.minter;
    let good = m.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let other = m.valid("other", "default").unwrap();
    let u = || Some("UNAUTHORIZED");
    let mut v = vec![
        Case::new(
            "duplicated Authorization (same valid Basic twice)",
            with_token(mreq(), &good).basic("sa", &good),
            401,
            u(),
            Up::Nothing,
        )
        .mention("more than one Authorization"),
        Case::new(
            "duplicated Authorization, different case (authorization + Authorization)",
            mreq()
                .header("authorization", &format!("Bearer {good}"))
                .header("Authorization", &format!("Bearer {other}")),
            401,
            u(),
            Up::Nothing,
        )
        .mention("more than one Authorization"),
        Case::new(
            "Basic and Bearer at once (valid Basic, foreign Bearer)",
            with_token(mreq(), &good).bearer(&other),
            401,
            u(),
            Up::Nothing,
        )
        .mention("more than one Authorization"),
        Case::new(
            "Basic and Bearer in one header value",
            mreq().header(
                "Authorization",
                &format!("Basic {}, Bearer {good}", basic_value("sa", &good)),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("more than one Authorization"),
        Case::new(
            "valid token only in Proxy-Authorization",
            mreq().header("Proxy-Authorization", &format!("Bearer {good}")),
            401,
            u(),
            Up::Nothing,
        )
        .mention("no credential"),
        Case::new(
            "alg none",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default").alg_none().mint().unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("alg none"),
    ];
    // alg "None" / "nOnE" spelled otherwise, with a forged signature part.
    let none_mixed = {
        let h = json!({ "alg": "nOnE", "typ": "JWT", "kid": "rsa-1" });
        remember(format!(
            "{}.{}.",
            b64url(h.to_string().as_bytes()),
            b64url(claims(CONNECTOR_NAMESPACE, "default").to_string().as_bytes())
        ))
    };
    v.push(
        Case::new(
            "alg nOnE (mixed case)",
            with_token(mreq(), &none_mixed),
            401,
            u(),
            Up::Nothing,
        )
        .mention("alg none"),
    );
    // Key confusion: HS256 keyed with the RSA public key's bytes.
    let pem = key_pem(s, "rsa-1");
    let (spki_pem, pkcs1_pem, spki_der) = public_key_encodings(&pem);
    let n = s.minter.jwks()["keys"][0]["n"].as_str().unwrap_or("").to_string();
    let jwks_json = s.minter.jwks().to_string();
    let c = claims(CONNECTOR_NAMESPACE, "default");
    let hs = json!({ "alg": "HS256", "typ": "JWT", "kid": "rsa-1" });
    for (what, secret) in [
        ("SPKI PEM", spki_pem.clone()),
        ("PKCS#1 PEM", pkcs1_pem),
        ("SPKI DER", spki_der),
        ("JWK n (base64url text)", n.as_bytes().to_vec()),
        ("JWK n (decoded modulus)", b64url_decode(&n)),
        ("whole JWKS JSON", jwks_json.into_bytes()),
    ] {
        v.push(
            Case::new(
                format!("HS256 key confusion, secret = RSA public key {what}"),
                with_token(mreq(), &hs256(&hs, &c, &secret)),
                401,
                u(),
                Up::Nothing,
            )
            .mention("does not match key"),
        );
    }
    // The same without a kid, and with the EC key's kid.
    v.push(
        Case::new(
            "HS256 with the public key PEM, no kid",
            with_token(mreq(), &hs256(&json!({ "alg": "HS256", "typ": "JWT" }), &c, &spki_pem)),
            401,
            u(),
            Up::Nothing,
        )
        .mention("no 'kid'"),
    );
    // Embedded attacker keys: verification must use only the configured JWKS.
    let rogue = key_pem(s, "rogue-1");
    let rogue_jwk = rsa_public_jwk(&rogue, "rsa-1");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let trap = format!("http://127.0.0.1:{}/jwks.json", listener.local_addr().unwrap().port());
    let attacker_headers = [
        (
            "embedded jwk (attacker key) under the published kid",
            json!({ "alg": "RS256", "kid": "rsa-1", "jwk": rogue_jwk }),
            "signature does not verify",
        ),
        (
            "embedded jwk (attacker key), no kid",
            json!({ "alg": "RS256", "jwk": rogue_jwk }),
            "no 'kid'",
        ),
        (
            "jku pointing at an attacker JWKS, attacker kid",
            json!({ "alg": "RS256", "kid": "rogue-1", "jku": trap }),
            "not among the configured JWKS keys",
        ),
        (
            "jku pointing at an attacker JWKS, published kid",
            json!({ "alg": "RS256", "kid": "rsa-1", "jku": trap }),
            "signature does not verify",
        ),
        (
            "x5u pointing at an attacker certificate, published kid",
            json!({ "alg": "RS256", "kid": "rsa-1", "x5u": trap }),
            "signature does not verify",
        ),
        (
            "x5c with an attacker chain, published kid",
            json!({ "alg": "RS256", "kid": "rsa-1", "x5c": ["MIIB"] }),
            "signature does not verify",
        ),
    ];
    for (what, header, mention) in attacker_headers {
        v.push(
            Case::new(
                what,
                with_token(mreq(), &rs256(&header, &c, &rogue)),
                401,
                u(),
                Up::Nothing,
            )
            .mention(mention),
        );
    }
    v.push(Case::new(
        "jku/x5u on a genuinely signed token are ignored (forwarded, not fetched)",
        with_token(
            mreq(),
            &rs256(
                &json!({ "alg": "RS256", "kid": "rsa-1", "jku": trap, "x5u": trap, "jwk": rsa_public_jwk(&rogue, "x") }),
                &c,
                &pem,
            ),
        ),
        200,
        None,
        Up::Connector,
    ).line(upstream_manifest_line()));
    // Oversized and traversal kids.
    v.push(
        Case::new(
            "kid of 10 000 characters",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default")
                    .kid(Some(&"k".repeat(10_000)))
                    .mint()
                    .unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("not among the configured JWKS keys"),
    );
    v.push(
        Case::new(
            "kid of 20 000 characters (token over 16 KiB)",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default")
                    .kid(Some(&"k".repeat(20_000)))
                    .mint()
                    .unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("longer than"),
    );
    v.push(
        Case::new(
            "kid ../../etc/passwd",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default")
                    .kid(Some("../../etc/passwd"))
                    .mint()
                    .unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("not among the configured JWKS keys"),
    );
    v.push(
        Case::new(
            "kid rsa-1/../ec-1",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default")
                    .kid(Some("rsa-1/../ec-1"))
                    .mint()
                    .unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("not among the configured JWKS keys"),
    );
    // Wrong claim types (validly signed).
    let t = now();
    let typed = [
        (
            "exp as a string",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("exp", json!((t + 3600).to_string()))
                .mint()
                .unwrap(),
            "not a number of seconds",
        ),
        (
            "exp as a negative number",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("exp", json!(-1))
                .mint()
                .unwrap(),
            "not a number of seconds",
        ),
        (
            "nbf as an object",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("nbf", json!({"t": 1}))
                .mint()
                .unwrap(),
            "not a number of seconds",
        ),
        (
            "aud as a number",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("aud", json!(12345))
                .mint()
                .unwrap(),
            "audience does not include",
        ),
        (
            "aud as an object holding the audience",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("aud", json!({"oci-connector": true}))
                .mint()
                .unwrap(),
            "audience does not include",
        ),
        (
            "kubernetes.io as a string",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("kubernetes.io", json!("demo"))
                .mint()
                .unwrap(),
            "lacks the Kubernetes claims",
        ),
        (
            "kubernetes.io.namespace as a number",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim(
                    "kubernetes.io",
                    json!({"namespace": 7, "serviceaccount": {"name": "default"}}),
                )
                .mint()
                .unwrap(),
            "lacks the Kubernetes claims",
        ),
        (
            "sub of another namespace than kubernetes.io",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("sub", json!("system:serviceaccount:other:default"))
                .mint()
                .unwrap(),
            "'sub' does not match",
        ),
        (
            "iss as an array holding the issuer",
            m.token(CONNECTOR_NAMESPACE, "default")
                .claim("iss", json!([connector_devkit::tokens::ISSUER]))
                .mint()
                .unwrap(),
            "not an allowed issuer",
        ),
    ];
    for (what, tok, mention) in typed {
        v.push(
            Case::new(
                format!("claim type: {what}"),
                with_token(mreq(), &tok),
                401,
                u(),
                Up::Nothing,
            )
            .mention(mention),
        );
    }
    // A token valid for one year: refused (identity.maxTokenLifetimeSeconds, 24 h by default),
    // so a stolen long-lived token does not stay useful. (Was a finding of this suite.)
    v.push(
        Case::new(
            "token with a 1-year lifetime",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default")
                    .claim("exp", json!(t + 365 * 24 * 3600))
                    .mint()
                    .unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("longer than the 86400 s"),
    );
    v.push(
        Case::new(
            "token without exp",
            with_token(
                mreq(),
                &m.token(CONNECTOR_NAMESPACE, "default").without("exp").mint().unwrap(),
            ),
            401,
            u(),
            Up::Nothing,
        )
        .mention("no 'exp'"),
    );
    (v, listener)
}

fn p(rest: &str) -> String {
    path_form(CONNECTOR_NAMESPACE, CONNECTOR_NAME, rest)
}

fn mf(repo: &str) -> String {
    format!("{repo}/manifests/{TAG}")
}

/// Paths: escapes, dot segments, empty segments, parameters, NUL, length, look-alike names.
fn path_cases(s: &Stack) -> Vec<Case> {
    let good = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    // `ci` may use demo/registry but not demo/stale-secret.
    let ci = s.minter.valid(ALLOWED_NAMESPACE, "default").unwrap();
    let g = |path: &str| with_token(get_m(path), &good);
    let bad_name = Some("NAME_INVALID");
    let unknown = Some("NAME_UNKNOWN");
    let upstream_line = |repo: &str| format!("GET /v2/{repo}/manifests/{TAG} HTTP/1.1");
    vec![
        Case::new(
            "%2e%2e segments climbing out of the repository (ci token, to stale-secret)",
            with_token(get_m(&p(&format!("%2e%2e/{BROKEN_CONNECTOR_NAME}/{}", mf(REPO)))), &ci),
            403,
            Some("DENIED"),
            Up::Nothing,
        ),
        // Envoy's normalize_path decodes %2E and resolves the dot segment before the filter
        // runs: `library/../app` becomes `app`, still inside demo/registry. Safe.
        Case::new(
            "%2E%2E uppercase in the repository (resolved inside the connector)",
            g(&p("library/%2E%2E/app/manifests/v1")),
            404,
            Some("MANIFEST_UNKNOWN"),
            Up::Connector,
        )
        .line("GET /v2/app/manifests/v1 HTTP/1.1"),
        Case::new(
            "plain .. from registry into stale-secret (ci token)",
            with_token(
                get_m(&format!(
                    "/v2/namespaces/demo/connectors/registry/../{BROKEN_CONNECTOR_NAME}/{}",
                    mf(REPO)
                )),
                &ci,
            ),
            403,
            Some("DENIED"),
            Up::Nothing,
        ),
        Case::new(
            "%2f in the repository",
            g(&p(&mf("library%2fapp"))),
            400,
            None,
            Up::Nothing,
        ),
        Case::new(
            "%2F in the repository",
            g(&p(&mf("library%2Fapp"))),
            400,
            None,
            Up::Nothing,
        ),
        Case::new(
            "%2F between namespace and connector",
            g(&format!("/v2/namespaces/demo%2Fconnectors/registry/{}", mf(REPO))),
            400,
            None,
            Up::Nothing,
        ),
        Case::new(
            "// inside the repository",
            g(&p(&mf("library//app"))),
            400,
            bad_name,
            Up::Nothing,
        ),
        Case::new(
            "// after the connector",
            g(&format!("/v2/namespaces/demo/connectors/registry//{}", mf(REPO))),
            400,
            bad_name,
            Up::Nothing,
        ),
        Case::new(
            "// after /v2",
            g(&format!("/v2//namespaces/demo/connectors/registry/{}", mf(REPO))),
            404,
            unknown,
            Up::Nothing,
        ),
        Case::new(
            "; parameter in the repository",
            g(&p(&mf("library/app;x=y"))),
            400,
            bad_name,
            Up::Nothing,
        ),
        Case::new(
            "; parameter on the connector name",
            g(&format!("/v2/namespaces/demo/connectors/registry;x=y/{}", mf(REPO))),
            400,
            bad_name,
            Up::Nothing,
        ),
        Case::new(
            "; parameter on the tag",
            g(&p(&format!("{REPO}/manifests/{TAG};jsessionid=1"))),
            404,
            unknown,
            Up::Nothing,
        ),
        // Envoy refuses %00 itself (400, empty body) before the filter sees the request.
        Case::new(
            "%00 in the repository (Envoy's own 400)",
            g(&p(&mf("library/app%00"))),
            400,
            None,
            Up::Nothing,
        ),
        Case::new(
            "raw NUL byte in the path",
            g(&p(&mf("library/app\0x"))),
            400,
            None,
            Up::Nothing,
        ),
        Case::new(
            "repository name of 10 000 characters",
            g(&p(&mf(&"a".repeat(10_000)))),
            400,
            bad_name,
            Up::Nothing,
        ),
        Case::new(
            "tag of 10 000 characters",
            g(&p(&format!("{REPO}/manifests/{}", "t".repeat(10_000)))),
            404,
            unknown,
            Up::Nothing,
        ),
        Case::new(
            "repository with connectors and manifests segments (stays in the connector)",
            g(&p("a/connectors/b/manifests/x")),
            404,
            None,
            Up::Connector,
        )
        .line("GET /v2/a/connectors/b/manifests/x HTTP/1.1"),
        Case::new(
            "repository naming another connector's path form (stays in demo/registry)",
            g(&p(&mf(&format!(
                "namespaces/demo/connectors/{BROKEN_CONNECTOR_NAME}/{REPO}"
            )))),
            404,
            None,
            Up::Connector,
        )
        .line(upstream_line(&format!(
            "namespaces/demo/connectors/{BROKEN_CONNECTOR_NAME}/{REPO}"
        )))
        .forbid(&s.broken_password),
    ]
}

/// Who may use which connector: look-alike namespaces, ServiceAccounts and connector names.
fn prefix_cases(s: &Stack) -> Vec<Case> {
    let m = &s.minter;
    let tok = |ns: &str, sa: &str| m.valid(ns, sa).unwrap();
    let denied = Some("DENIED");
    let host = |ns: &str, name: &str| format!("{}:{}", host_name(ns, name), s.envoy.port);
    let hostform = format!("/v2/{}", mf(REPO));
    vec![
        Case::new(
            "token of namespace demo-a on demo/registry",
            with_token(mreq(), &tok("demo-a", "default")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "token of namespace dem on demo/registry",
            with_token(mreq(), &tok("dem", "default")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "token of namespace ci-x (ci is allowed) on demo/registry",
            with_token(mreq(), &tok("ci-x", "default")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "token of namespace c (ci is allowed) on demo/registry",
            with_token(mreq(), &tok("c", "default")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "ServiceAccount other/builder-x (other/builder allowed)",
            with_token(mreq(), &tok("other", "builder-x")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "ServiceAccount other/build (other/builder allowed)",
            with_token(mreq(), &tok("other", "build")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "demo token on connector demo/registry-a (unknown look-alike)",
            with_token(
                get_m(&path_form("demo", "registry-a", &mf(REPO))),
                &tok("demo", "default"),
            ),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "demo-a token on namespace demo-a, connector registry (unknown)",
            with_token(
                get_m(&path_form("demo-a", "registry", &mf(REPO))),
                &tok("demo-a", "default"),
            ),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "ci token on demo/stale-secret (ci listed only by demo/registry)",
            with_token(
                get_m(&path_form("demo", BROKEN_CONNECTOR_NAME, &mf(REPO))),
                &tok("ci", "default"),
            ),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "host form: demo-a token with the demo-a look-alike host",
            with_token(get_m(&hostform), &tok("demo-a", "default")).host(&host("demo-a", "registry")),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "host form: connector host with a suffix (.evil.example) and a demo token",
            with_token(get_m(&hostform), &tok("demo", "default")).host(&format!(
                "{}.evil.example:{}",
                host_name("demo", "registry"),
                s.envoy.port
            )),
            404,
            Some("NAME_UNKNOWN"),
            Up::Nothing,
        ),
        Case::new(
            "control: allowed ServiceAccount other/builder is forwarded",
            with_token(mreq(), &tok("other", "builder")),
            200,
            None,
            Up::Connector,
        )
        .line(upstream_manifest_line()),
    ]
}

/// Client-sent forwarding and routing headers: stripped or harmless, routing unchanged.
fn header_cases(s: &Stack) -> Vec<Case> {
    let good = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let fwd = |name: &str, value: &str, marker: &str| {
        Case::new(
            format!("client-sent {name}: {value}"),
            with_token(mreq(), &good).header(name, value),
            200,
            None,
            Up::Connector,
        )
        .line(upstream_manifest_line())
        .forbid(marker)
    };
    vec![
        fwd("X-Forwarded-Host", "xfh.evil.example", "xfh.evil.example"),
        // Envoy (use_remote_address unset) passes a client's X-Forwarded-Proto on and the filter
        // does not strip it: Distribution builds upload Locations from it.
        fwd("X-Forwarded-Proto", "gopher", "gopher"),
        fwd(
            "Forwarded",
            "for=1.2.3.4;host=fw.evil.example;proto=https",
            "fw.evil.example",
        ),
        // Routing is unchanged, and the header is removed (it reached the upstream before the
        // filter stripped it: a finding of this suite).
        fwd(
            "x-envoy-original-path",
            "/v2/namespaces/demo/connectors/stale-secret/evilpath/manifests/v1",
            "evilpath",
        ),
        fwd("X-Forwarded-Port", "6666", "6666"),
        fwd("X-Forwarded-Prefix", "/xfprefix", "xfprefix"),
        fwd("X-Original-URL", "/v2/origurl/manifests/v1", "origurl"),
        fwd("X-Rewrite-URL", "/v2/rewriteurl/manifests/v1", "rewriteurl"),
        fwd("Cookie", "session=cookiesecret", "cookiesecret"),
        fwd("x-oci-connector-cluster", "some_other_cluster", "some_other_cluster"),
        Case::new(
            "Host: evil.example on a path-form request",
            with_token(mreq(), &good).host("hostheader.evil.example"),
            200,
            None,
            Up::Connector,
        )
        .line(upstream_manifest_line())
        .forbid("hostheader.evil.example"),
        Case::new(
            "no credential but x-oci-connector-cluster set by the client",
            mreq().header("x-oci-connector-cluster", connector_devkit::stack::CLUSTER),
            401,
            Some("UNAUTHORIZED"),
            Up::Nothing,
        ),
        Case::new(
            "non-registry path with x-oci-connector-cluster set by the client",
            Request::get("/admin").header("x-oci-connector-cluster", connector_devkit::stack::CLUSTER),
            404,
            Some("NAME_UNKNOWN"),
            Up::Nothing,
        ),
    ]
}

/// `_catalog`, limits, the upstream's challenge.
fn misc_cases(s: &Stack) -> Vec<Case> {
    let good = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let host = format!("{}:{}", host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME), s.envoy.port);
    let mut many = with_token(mreq(), &good);
    for i in 0..150 {
        many = many.header(&format!("x-h{i}"), "1");
    }
    let mut big_put = with_token(Request::new("PUT", &p(&format!("{REPO}/manifests/huge"))), &good)
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json");
    let mut body = b"{\"schemaVersion\":2,\"pad\":\"".to_vec();
    body.extend(std::iter::repeat_n(b'x', 8 << 20));
    body.extend_from_slice(b"\"}");
    big_put.body = body;
    big_put.timeout = std::time::Duration::from_secs(60);
    vec![
        Case::new(
            "_catalog (path)",
            with_token(Request::get("/v2/_catalog"), &good),
            403,
            Some("UNSUPPORTED"),
            Up::Nothing,
        ),
        Case::new(
            "_catalog?n=1000 (path)",
            with_token(Request::get("/v2/_catalog?n=1000"), &good),
            403,
            Some("UNSUPPORTED"),
            Up::Nothing,
        ),
        Case::new(
            "_catalog (host form)",
            with_token(Request::get("/v2/_catalog"), &good).host(&host),
            403,
            Some("UNSUPPORTED"),
            Up::Nothing,
        ),
        Case::new(
            "_catalog under a connector prefix",
            with_token(Request::get(&p("_catalog")), &good),
            404,
            Some("NAME_UNKNOWN"),
            Up::Nothing,
        ),
        Case::new(
            "a 100 KB header",
            with_token(mreq(), &good).header("x-big", &"b".repeat(100 * 1024)),
            431,
            None,
            Up::Nothing,
        ),
        Case::new("150 extra headers", many, 431, None, Up::Nothing),
        Case::new("an 8 MiB manifest PUT", big_put, 400, None, Up::Connector),
        Case::new(
            "upstream 401 (stale-secret connector): the proxy's challenge, not the upstream's",
            with_token(
                get_m(&path_form(CONNECTOR_NAMESPACE, BROKEN_CONNECTOR_NAME, &mf(REPO))),
                &good,
            ),
            401,
            Some("UNAUTHORIZED"),
            Up::Stale,
        )
        .mention("refused the credential of connector"),
    ]
}

/// The request target of a `Location` (absolute or relative).
fn target_of(location: &str) -> String {
    match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map(|i| rest[i..].to_string()).unwrap_or_default(),
        None => location.to_string(),
    }
}

fn random_tag() -> String {
    connector_devkit::random_hex(4).unwrap()
}

/// Cross-repository mounts whose `from` lies outside the caller's connector: the mount is
/// dropped and a plain upload starts (202), nothing is mounted.
fn mount_cases(s: &Stack) -> Vec<Case> {
    let good = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let layer = s.image.layers.first().cloned().expect("sample image layer");
    let froms = [
        (
            "another connector (demo/stale-secret)",
            format!("namespaces/demo/connectors/{BROKEN_CONNECTOR_NAME}/{REPO}"),
        ),
        (
            "another tenant's connector (other/x)",
            format!("namespaces/other/connectors/x/{REPO}"),
        ),
        (
            "another connector, escaped",
            format!("namespaces%2Fdemo%2Fconnectors%2F{BROKEN_CONNECTOR_NAME}%2Flibrary%2Fapp"),
        ),
        (
            "dot segments out of the connector",
            format!("namespaces/demo/connectors/registry/../{BROKEN_CONNECTOR_NAME}/{REPO}"),
        ),
        ("the bare upstream name (no connector prefix)", REPO.to_string()),
    ];
    froms
        .into_iter()
        .map(|(what, from)| {
            let repo = format!("attacks/mount-{}", random_tag());
            let target = p(&format!("{repo}/blobs/uploads/?mount={layer}&from={from}"));
            Case::new(
                format!("mount from {what}: dropped, plain upload"),
                with_token(Request::new("POST", &target), &good),
                202,
                None,
                Up::Connector,
            )
            .line(format!("POST /v2/{repo}/blobs/uploads/ HTTP/1.1"))
            .forbid("mount=")
            .forbid("from=")
        })
        .collect()
}

/// An upload session opened by demo/default in demo/registry, then touched by others.
fn session_cases(s: &Stack) -> Vec<Case> {
    let owner = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let repo = format!("attacks/session-{}", random_tag());
    let start = with_token(Request::new("POST", &p(&format!("{repo}/blobs/uploads/"))), &owner)
        .send(s.envoy.port)
        .unwrap();
    assert_eq!(start.status, 202, "upload start: {}", start.summary());
    let target = target_of(
        start
            .header("location")
            .unwrap_or_else(|| panic!("no Location: {}", start.summary())),
    );
    let prefix = p(&format!("{repo}/blobs/uploads/"));
    assert!(target.starts_with(&prefix), "Location {target} under {prefix}");
    let other = s.minter.valid("other", "default").unwrap();
    let ci = s.minter.valid(ALLOWED_NAMESPACE, "default").unwrap();
    let in_stale = target.replacen(
        &format!("/connectors/{CONNECTOR_NAME}/"),
        &format!("/connectors/{BROKEN_CONNECTOR_NAME}/"),
        1,
    );
    let host_form = target.replacen(
        &format!("/v2/namespaces/{CONNECTOR_NAMESPACE}/connectors/{CONNECTOR_NAME}"),
        "/v2",
        1,
    );
    let host = format!("{}:{}", host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME), s.envoy.port);
    let with_body = |mut r: Request, b: &[u8]| {
        r.body = b.to_vec();
        r
    };
    let denied = Some("DENIED");
    vec![
        Case::new(
            "session of demo/default: PATCH by other/default",
            with_body(with_token(Request::new("PATCH", &target), &other), b"hostile"),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "session of demo/default: PUT ?digest by other/default",
            with_token(
                Request::new("PUT", &format!("{target}&digest=sha256:{}", "0".repeat(64))),
                &other,
            ),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "session of demo/default: DELETE by other/default",
            with_token(Request::new("DELETE", &target), &other),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "session of demo/default: GET status by other/default, host form",
            with_token(Request::get(&host_form), &other).host(&host),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "session of demo/registry moved to demo/stale-secret by ci/default",
            with_body(with_token(Request::new("PATCH", &in_stale), &ci), b"hostile"),
            403,
            denied,
            Up::Nothing,
        ),
        Case::new(
            "control: the owner still PATCHes its session",
            with_body(with_token(Request::new("PATCH", &target), &owner), b"mine"),
            202,
            None,
            Up::Connector,
        )
        .line(format!(
            "PATCH {} HTTP/1.1",
            target.replacen(
                &format!("/v2/namespaces/{CONNECTOR_NAMESPACE}/connectors/{CONNECTOR_NAME}"),
                "/v2",
                1
            )
        )),
    ]
}

/// An upload started with client-sent forwarding headers: the `Location` handed back must still
/// point at the proxy (its host and port, the client's path form), never at a host the client
/// chose or at the upstream. The scheme follows `X-Forwarded-Proto`, which Envoy honours for
/// `:scheme` (behind a TLS-terminating Ingress that is what makes Locations `https`); a client
/// that lies about it only breaks its own upload, and the filter sends the upstream the same
/// scheme Envoy decided on, so the two never disagree.
fn location_problems(s: &Stack) -> Vec<String> {
    let good = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let mut problems = Vec::new();
    for (name, value) in [
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "loc.evil.example"),
        ("Forwarded", "host=loc.evil.example;proto=https"),
    ] {
        let repo = format!("attacks/loc-{}", random_tag());
        let resp = with_token(Request::new("POST", &p(&format!("{repo}/blobs/uploads/"))), &good)
            .header(name, value)
            .send(s.envoy.port)
            .unwrap();
        let loc = resp.header("location").unwrap_or("").to_string();
        let listener_scheme = if s.envoy.base_url().starts_with("https") {
            "https"
        } else {
            "http"
        };
        let scheme = if name == "X-Forwarded-Proto" {
            value
        } else {
            listener_scheme
        };
        let proxy = format!("{scheme}://{}", s.envoy.authority());
        let prefix = p(&format!("{repo}/blobs/uploads/"));
        let ok = resp.status == 202 && (loc.starts_with(&format!("{proxy}{prefix}")) || loc.starts_with(&prefix));
        eprintln!("upload start with {name}: {value} → {} Location {loc}", resp.status);
        if !ok {
            problems.push(format!(
                "FINDING: upload start with client-sent {name}: {value} → {} Location {loc:?} (expected {proxy}{prefix}...)",
                resp.status
            ));
        }
    }
    s.recorder.take();
    problems
}

/// Envoy's log and config dump, and everything the upstream received in this file: no client
/// token (minted or hand-made), no upstream password; no `[critical]` wasm line.
fn final_scan(s: &Stack) -> Vec<String> {
    let mut secrets = s.secrets();
    for (i, t) in HANDMADE.lock().unwrap_or_else(|e| e.into_inner()).iter().enumerate() {
        secrets.push((format!("hand-made JWT #{i}"), t.clone()));
        if let Some(sig) = t.rsplit('.').next().filter(|x| x.len() > 16) {
            secrets.push((format!("signature of hand-made JWT #{i}"), sig.to_string()));
        }
    }
    let mut problems = connector_devkit::stack::envoy_problems(&s.envoy, &secrets).unwrap_or_else(|e| vec![e]);
    let upstream = UPSTREAM_SEEN.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // The upstream legitimately receives the connector's Basic credential; it must receive no
    // client token and never a password in clear.
    for (what, secret) in &secrets {
        if what == "upstream Basic credential" || secret.is_empty() {
            continue;
        }
        if upstream.contains(secret.as_str()) {
            problems.push(format!("{what} reached the upstream"));
        }
    }
    // Positive controls: the scanned texts are the real ones.
    if !upstream.contains(&connector_basic(s.password())) {
        problems.push("scan control: the upstream bytes lack the connector's credential".into());
    }
    if secrets
        .iter()
        .filter(|(w, _)| w.starts_with("minted JWT") || w.starts_with("hand-made JWT"))
        .count()
        < 50
    {
        problems.push(format!("scan control: only {} tokens to scan for", secrets.len()));
    }
    if !s.envoy.log().contains("wasm log oci-connector") {
        problems.push("scan control: Envoy's log has no filter line".into());
    }
    problems
}

#[test]
fn attacks_end_to_end() {
    STACK.run(|s| {
        let (mut cases, trap) = token_cases(s);
        cases.extend(path_cases(s));
        cases.extend(prefix_cases(s));
        cases.extend(header_cases(s));
        cases.extend(misc_cases(s));
        cases.extend(mount_cases(s));
        let mut failures = run_table(s, &cases);
        let sessions = session_cases(s);
        failures.extend(run_table(s, &sessions));
        if !matches!(trap.accept(), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            failures.push("the proxy fetched a jku/x5u URL named in a token header".into());
        }
        failures.extend(location_problems(s));
        let scan = final_scan(s);
        let total = cases.len() + sessions.len();
        eprintln!("{total} table cases; final scan: {} problem(s)", scan.len());
        failures.extend(scan.into_iter().map(|p| format!("final scan: {p}")));
        assert!(
            failures.is_empty(),
            "{} problem(s) in {total} attacks and the final scan:\n{}",
            failures.len(),
            failures.join("\n")
        );
    });
}
