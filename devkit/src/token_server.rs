//! Owns the test token server: the one stand-in of the harness, an implementation of the
//! distribution token specification (https://distribution.github.io/distribution/spec/auth/token/)
//! that a real `docker-registry` with `auth: token` trusts. It answers
//! `GET /token?service=S&scope=repository:NAME:ACTIONS[&scope=...][&account=A]` for the robot's
//! Basic credential with `{"token","access_token","expires_in","issued_at"}`; the token is an
//! RS256 JWT whose header carries the signing certificate as `x5c`, which Distribution 2.8
//! verifies against its `rootcertbundle` (it also checks `iss`, `aud` = service and `exp`/`nbf`
//! with 60 s leeway, then grants what the `access` claim lists). Tests steer it (lifetime,
//! failing, hanging, key rotation) and read back every request it received: how often tokens
//! were fetched, for which scopes, and which Authorization arrived (never a client's JWT).
//! It serves HTTPS with the harness's upstream certificate ([`crate::tls::upstream`]), so the
//! realm is an `https://` URL and every client of it (the proxy, skopeo) verifies it.

use crate::{Result, WorkDir, procs};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The registry's `auth.token.service`, and the `aud` of every token.
pub const SERVICE: &str = "upstream-registry";
/// The registry's `auth.token.issuer`, and the `iss` of every token.
pub const ISSUER: &str = "connector-test-token-server";

/// How the server answers token requests (credential checks come first in every mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Issue tokens.
    Normal,
    /// `500` with an error body: an outage of the token service.
    Fail,
    /// Sleep this long before answering (then answer normally): longer than the proxy's timeout,
    /// so the proxy must give up first.
    Hang(Duration),
}

/// One request the token server received, whatever its outcome.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub method: String,
    /// The request target as sent (path and query, still percent-encoded).
    pub target: String,
    pub service: Option<String>,
    pub account: Option<String>,
    /// Every `scope` parameter, decoded, in order.
    pub scopes: Vec<String>,
    /// The `Authorization` header exactly as received.
    pub authorization: Option<String>,
    /// Whether that header was the robot's Basic credential.
    pub credential_ok: bool,
    pub status: u16,
}

struct Key {
    encoding: EncodingKey,
    /// Base64 (standard) DER of the self-signed certificate: the `x5c` chain of one.
    x5c: String,
    cert_pem_path: PathBuf,
}

struct State {
    mode: Mode,
    expires_in: u64,
    key: Key,
    key_generation: u32,
    requests: Vec<TokenRequest>,
    /// Every token handed out, so tests can prove none reached a client.
    issued: Vec<String>,
}

struct Shared {
    username: String,
    password: String,
    keys_dir: PathBuf,
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct TokenServer {
    pub port: u16,
    shared: Arc<Shared>,
}

/// One client connection, TLS over TCP.
type Conn = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

impl TokenServer {
    /// Generates a signing key and certificate under `<work>/token-server` and listens on a free
    /// loopback port, accepting `username` / `password` (the robot account) as Basic credential.
    pub fn start(work: &WorkDir, username: &str, password: &str) -> Result<Self> {
        let keys_dir = work.sub("token-server")?;
        let key = generate_key(&keys_dir, 1)?;
        let upstream = crate::tls::upstream()?;
        let tls = crate::tls::server_config(&upstream.server_cert())?;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("token server bind: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("token server addr: {e}"))?
            .port();
        crate::http::trust_port(port, &upstream.ca);
        let shared = Arc::new(Shared {
            username: username.into(),
            password: password.into(),
            keys_dir,
            state: Mutex::new(State {
                mode: Mode::Normal,
                expires_in: 300,
                key,
                key_generation: 1,
                requests: Vec::new(),
                issued: Vec::new(),
            }),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        thread::Builder::new()
            .name(format!("token-server-{port}"))
            .spawn(move || accept_loop(listener, s, tls))
            .map_err(|e| format!("token server thread: {e}"))?;
        Ok(Self { port, shared })
    }

    /// The realm the registry names in its challenge: `https://127.0.0.1:<port>/token`.
    pub fn realm(&self) -> String {
        format!("https://127.0.0.1:{}/token", self.port)
    }

    /// The PEM certificate of the current signing key (what the registry's rootcertbundle holds).
    pub fn cert_path(&self) -> PathBuf {
        self.shared.lock().key.cert_pem_path.clone()
    }

    /// `expires_in` of tokens issued from now on (and their `exp` = issue time + this).
    pub fn set_expires_in(&self, secs: u64) {
        self.shared.lock().expires_in = secs;
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.lock().mode = mode;
    }

    /// Back to the defaults: normal mode, 300 s tokens.
    pub fn reset(&self) {
        let mut st = self.shared.lock();
        st.mode = Mode::Normal;
        st.expires_in = 300;
    }

    /// Signs with a fresh key and certificate from now on. A registry whose bundle holds only the
    /// old certificate rejects the new tokens; one restarted with only the new certificate
    /// rejects every token issued before (that is how the harness revokes tokens, see
    /// [`crate::registry::Registry::trust_only`]).
    pub fn rotate_key(&self) -> Result<PathBuf> {
        let generation = self.shared.lock().key_generation + 1;
        let key = generate_key(&self.shared.keys_dir, generation)?;
        let path = key.cert_pem_path.clone();
        let mut st = self.shared.lock();
        st.key = key;
        st.key_generation = generation;
        Ok(path)
    }

    /// Requests received so far, without clearing.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.lock().requests.clone()
    }

    /// Requests received so far, and clears the list.
    pub fn take(&self) -> Vec<TokenRequest> {
        std::mem::take(&mut self.shared.lock().requests)
    }

    /// Every token issued since start.
    pub fn issued(&self) -> Vec<String> {
        self.shared.lock().issued.clone()
    }

    /// A token for `scopes`, as a client with the robot credential would get it (for checks by
    /// hand and direct requests to the registry); recorded like any other request.
    pub fn fetch(&self, scopes: &[&str]) -> Result<String> {
        let mut q = format!("/token?service={}", encode(SERVICE));
        for s in scopes {
            q.push_str(&format!("&scope={}", encode(s)));
        }
        let r = crate::http::Request::get(&q)
            .basic(&self.shared.username, &self.shared.password)
            .send(self.port)?;
        if r.status != 200 {
            return Err(format!("token server answered {}", r.summary()));
        }
        r.json()?["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "token server answer without token".into())
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// An RSA key and its self-signed certificate, made by the `openssl` CLI. The certificate is
/// valid from a day ago so clock skew cannot make Go's x509 verification reject it.
fn generate_key(dir: &Path, generation: u32) -> Result<Key> {
    let key_path = dir.join(format!("signing-{generation}.key"));
    let cert_path = dir.join(format!("signing-{generation}.crt"));
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN=connector test token issuer {generation}"))
        .arg("-keyout")
        .arg(&key_path)
        .arg("-out")
        .arg(&cert_path);
    procs::run(cmd, None)?.ok()?;
    let key_pem = std::fs::read(&key_path).map_err(|e| format!("read {}: {e}", key_path.display()))?;
    let encoding = EncodingKey::from_rsa_pem(&key_pem).map_err(|e| format!("load {}: {e}", key_path.display()))?;
    let cert_pem = std::fs::read_to_string(&cert_path).map_err(|e| format!("read {}: {e}", cert_path.display()))?;
    // The PEM body is the standard base64 of the DER certificate, which is what x5c holds.
    let x5c: String = cert_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    STANDARD
        .decode(&x5c)
        .map_err(|e| format!("certificate {} is not PEM: {e}", cert_path.display()))?;
    Ok(Key {
        encoding,
        x5c,
        cert_pem_path: cert_path,
    })
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Arc<rustls::ServerConfig>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let Ok(server) = rustls::ServerConnection::new(tls.clone()) else {
            continue;
        };
        let s = shared.clone();
        // One thread per connection: a hanging answer must not hold up the others. The TLS
        // handshake happens on the first read.
        thread::spawn(move || serve(rustls::StreamOwned::new(server, stream), &s));
    }
}

/// Serves requests on one connection until the peer closes it (Envoy keeps connections alive).
fn serve(mut stream: Conn, shared: &Shared) {
    stream.sock.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        // Token requests are GETs without a body; a body (if any) is skipped by its length.
        let body_len = header(&head, "content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let consumed = (head_end + 4 + body_len).min(buf.len());
        buf.drain(..consumed);
        let close = header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let (status, extra, body) = answer(&head, shared);
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            _ => "Internal Server Error",
        };
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
            body.len()
        );
        for (n, v) in extra {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        out.push_str(&body);
        if stream.write_all(out.as_bytes()).and_then(|_| stream.flush()).is_err() || close {
            stream.conn.send_close_notify();
            let _ = stream.flush();
            let _ = stream.sock.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// The status, extra headers and JSON body for one request; records it.
fn answer(head: &str, shared: &Shared) -> (u16, Vec<(String, String)>, String) {
    let line = head.split("\r\n").next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let params: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string))
        .filter(|s| !s.is_empty())
        .collect();
    let authorization = header(head, "authorization").map(str::to_string);
    let expected = format!("Basic {}", crate::http::basic_value(&shared.username, &shared.password));
    let credential_ok = authorization.as_deref() == Some(expected.as_str());
    let mut record = TokenRequest {
        method: method.clone(),
        target: target.clone(),
        service: param("service"),
        account: param("account"),
        scopes: scopes.clone(),
        authorization,
        credential_ok,
        status: 0,
    };

    let (mode, expires_in) = {
        let st = shared.lock();
        (st.mode, st.expires_in)
    };
    let (status, extra, body) = if method != "GET" || path != "/token" {
        (404, vec![], error_body("NOT_FOUND", "only GET /token is served here"))
    } else if !credential_ok {
        // The spec: a failed authentication to the token server is a 401.
        (
            401,
            vec![(
                "WWW-Authenticate".to_string(),
                "Basic realm=\"test-token-server\"".to_string(),
            )],
            error_body("UNAUTHORIZED", "the robot's Basic credential is required"),
        )
    } else if record.service.as_deref() != Some(SERVICE) {
        (
            400,
            vec![],
            error_body("INVALID_REQUEST", &format!("service must be {SERVICE:?}")),
        )
    } else {
        if let Mode::Hang(d) = mode {
            thread::sleep(d);
        }
        if mode == Mode::Fail {
            (
                500,
                vec![],
                error_body("UNAVAILABLE", "token service failure (test switch)"),
            )
        } else {
            match issue(shared, &scopes, record.account.as_deref(), expires_in) {
                Ok(body) => (200, vec![], body),
                Err(e) => (500, vec![], error_body("UNAVAILABLE", &e)),
            }
        }
    };
    record.status = status;
    shared.lock().requests.push(record);
    (status, extra, body)
}

/// Signs a token granting every requested scope (this server's policy: the robot may do all).
fn issue(shared: &Shared, scopes: &[String], account: Option<&str>, expires_in: u64) -> Result<String> {
    let now = now_secs();
    let access: Vec<Value> = scopes
        .iter()
        .filter_map(|s| parse_scope(s))
        .map(|(typ, name, actions)| json!({ "type": typ, "name": name, "actions": actions }))
        .collect();
    let claims = json!({
        "iss": ISSUER,
        "sub": account.unwrap_or(&shared.username),
        // Distribution 2.8 reads `aud` as a single string.
        "aud": SERVICE,
        "exp": now + expires_in,
        "nbf": now,
        "iat": now,
        "jti": crate::random_hex(12)?,
        "access": access,
    });
    let mut st = shared.lock();
    let mut header = Header::new(Algorithm::RS256);
    header.typ = Some("JWT".into());
    header.x5c = Some(vec![st.key.x5c.clone()]);
    let token = jsonwebtoken::encode(&header, &claims, &st.key.encoding).map_err(|e| format!("sign token: {e}"))?;
    st.issued.push(token.clone());
    Ok(json!({
        "token": token,
        "access_token": token,
        "expires_in": expires_in,
        "issued_at": rfc3339(now),
    })
    .to_string())
}

/// `type:name:actions` where the name may itself contain `:` (a registry host with a port).
fn parse_scope(scope: &str) -> Option<(String, String, Vec<String>)> {
    let (typ, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((
        typ.to_string(),
        name.to_string(),
        actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

fn error_body(code: &str, message: &str) -> String {
    json!({ "errors": [{ "code": code, "message": message }] }).to_string()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Percent-decoding of a query component (`+` is a space, as in form encoding).
pub fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Percent-encoding of everything but unreserved characters.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (c as char).to_string(),
            _ => format!("%{c:02X}"),
        })
        .collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (days-to-civil conversion of the proleptic Gregorian
/// calendar).
fn rfc3339(t: u64) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The claims of a token, unverified (tests read `exp` and `access` of what the server issued).
pub fn claims(token: &str) -> Result<Value> {
    let part = token.split('.').nth(1).ok_or("not a JWT")?;
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|e| format!("JWT claims: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("JWT claims: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_components_round_trip() {
        let scope = "repository:library/app:pull,push";
        assert_eq!(encode(scope), "repository%3Alibrary%2Fapp%3Apull%2Cpush");
        assert_eq!(decode(&encode(scope)), scope);
        assert_eq!(decode("a+b%20c%2"), "a b c%2");
    }

    #[test]
    fn scopes_split_at_the_last_colon() {
        let (t, n, a) = parse_scope("repository:127.0.0.1:5000/app:pull,push").unwrap();
        assert_eq!((t.as_str(), n.as_str()), ("repository", "127.0.0.1:5000/app"));
        assert_eq!(a, ["pull", "push"]);
        assert!(parse_scope("nonsense").is_none());
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
