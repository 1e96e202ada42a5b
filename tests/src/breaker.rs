//! A misbehaving HTTP/1.1 peer for the fault suites: per request path it answers normally, or
//! sends a response head and a few body bytes and then closes, resets or stalls, or relays the
//! request to a real server. No real registry breaks off mid-answer on demand, which is why this
//! one is written here; everything else in those suites is real.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What happens after a head and a few body bytes were sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// FIN: the connection is closed cleanly mid-body.
    Close,
    /// RST: the connection is reset (SO_LINGER 0).
    Reset,
    /// Nothing more is sent; the connection stays open until the peer gives up.
    Stall,
}

/// The answer to one request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// A whole response, bytes as given.
    Full(String),
    /// A whole response whose body is not text (a gzip'd one).
    Bytes(Vec<u8>),
    /// `head` (status line and headers, announcing more body than follows), three body bytes,
    /// then [`Then`].
    Broken(String, Then),
    /// The request goes to `127.0.0.1:port` and its answer comes back unchanged.
    Relay(u16),
}

/// `(method, path, whole request head)` → the answer.
type Rule = dyn Fn(&str, &str, &str) -> Answer + Send + Sync;

pub struct Breaker {
    pub port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

/// A `401` head with a Basic challenge and a 1000-byte body announced: the case that trapped
/// the filter's VM (issue 10).
pub fn basic_challenge_head() -> String {
    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"breaker\"\r\nDocker-Distribution-Api-Version: registry/2.0\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n".to_string()
}

/// A `200` JSON head announcing a 1000-byte body.
pub fn json_ok_head() -> String {
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n".to_string()
}

/// A whole `401` with a Bearer challenge to `realm`.
pub fn bearer_challenge(realm: &str) -> String {
    let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
    format!(
        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"breaker\"\r\nDocker-Distribution-Api-Version: registry/2.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

impl Breaker {
    /// Starts on a free loopback port; `rule(method, path, head)` decides each answer.
    pub fn start(rule: impl Fn(&str, &str, &str) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let rule: Arc<Rule> = Arc::new(rule);
        let (sn, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = conn else { continue };
                let (rule, sn, st) = (rule.clone(), sn.clone(), st.clone());
                std::thread::spawn(move || serve(stream, &*rule, &sn, &st));
            }
        });
        Self { port, seen, stop }
    }

    /// Plain HTTP on purpose: what it tests is a peer breaking off byte by byte (FIN, RST,
    /// stall mid-body) at a raw socket; the TLS path to an upstream is tested on the real ones.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The request heads received so far.
    pub fn heads(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Breaker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn read_head(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            let rest = buf[i + 4..].to_vec();
            return Some((head, rest));
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn serve(mut stream: TcpStream, rule: &Rule, seen: &Mutex<Vec<String>>, stop: &AtomicBool) {
    stream.set_read_timeout(Some(Duration::from_secs(120))).ok();
    // One request per connection for anything that breaks; whole answers keep the connection.
    while let Some((head, _body_start)) = read_head(&mut stream) {
        let mut words = head.split_whitespace();
        let (method, path) = (
            words.next().unwrap_or("").to_string(),
            words.next().unwrap_or("").to_string(),
        );
        seen.lock().unwrap_or_else(|e| e.into_inner()).push(head.clone());
        match rule(&method, &path, &head) {
            Answer::Full(bytes) => {
                if stream.write_all(bytes.as_bytes()).is_err() {
                    return;
                }
            }
            Answer::Bytes(bytes) => {
                if stream.write_all(&bytes).is_err() {
                    return;
                }
            }
            Answer::Broken(h, then) => {
                let _ = stream.write_all(h.as_bytes());
                let _ = stream.write_all(b"{\"e");
                let _ = stream.flush();
                std::thread::sleep(Duration::from_millis(50));
                match then {
                    Then::Close => {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                    Then::Reset => reset(stream),
                    Then::Stall => {
                        let mut sink = [0u8; 1024];
                        while !stop.load(Ordering::SeqCst) && matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                    }
                }
                return;
            }
            Answer::Relay(port) => {
                relay(&mut stream, &head, port);
                return;
            }
        }
    }
}

/// Closes with an RST instead of a FIN: SO_LINGER with a zero timeout.
fn reset(stream: TcpStream) {
    let socket = socket2::Socket::from(stream);
    let _ = socket.set_linger(Some(Duration::ZERO));
    drop(socket);
}

/// Sends `head` (a GET: no body) to the real server with `Connection: close` and copies its
/// whole answer back, then closes.
fn relay(client: &mut TcpStream, head: &str, port: u16) {
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let mut out = String::new();
    for line in head.split("\r\n") {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    if upstream.write_all(out.as_bytes()).is_err() {
        return;
    }
    let mut answer = Vec::new();
    let _ = upstream.read_to_end(&mut answer);
    let _ = client.write_all(&answer);
    let _ = client.shutdown(Shutdown::Both);
}
