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

mod headers;
mod paths;
mod tokens;
mod uploads;

use headers::{header_cases, misc_cases};
use paths::{path_cases, prefix_cases};
use tokens::token_cases;
use uploads::{location_problems, mount_cases, session_cases};

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

fn p(rest: &str) -> String {
    path_form(CONNECTOR_NAMESPACE, CONNECTOR_NAME, rest)
}

fn mf(repo: &str) -> String {
    format!("{repo}/manifests/{TAG}")
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
