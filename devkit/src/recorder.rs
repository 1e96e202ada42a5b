//! Owns the recording relay between Envoy and the upstream registry: a transparent TCP relay
//! that forwards every byte unchanged and keeps a copy of what the upstream receives. It is how
//! the tests prove what crossed the wire to the registry (which credential, that no client JWT
//! did, that a refused request sent nothing). In front of a TLS upstream (every upstream of the
//! harness but the plain-HTTP opt-in) it speaks TLS on both sides: it serves the harness's
//! upstream certificate to the proxy and verifies the upstream's against the upstream CA, and
//! records the plaintext in between, so the proxy's hop to "the registry" is verified TLS too.

use crate::Result;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Default)]
struct Shared {
    bytes: Mutex<Vec<u8>>,
    connections: AtomicUsize,
    stop: AtomicBool,
}

/// What the upstream received since the last [`Recorder::take`].
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// The bytes as text (lossy: blob bodies may not be UTF-8).
    pub text: String,
    /// Connections accepted from the proxy (counted since start).
    pub connections: usize,
    /// Request lines (`METHOD /path HTTP/1.1`) found in the bytes.
    pub requests: usize,
}

impl Recorded {
    /// True when the upstream received not a single byte.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The request lines, for assertion messages.
    pub fn request_lines(&self) -> Vec<&str> {
        self.text.split("\r\n").filter(|l| is_request_line(l)).collect()
    }

    /// Values of every `Authorization` header the upstream received.
    pub fn authorizations(&self) -> Vec<&str> {
        self.text
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.trim())
            .collect()
    }
}

fn is_request_line(l: &str) -> bool {
    const METHODS: [&str; 7] = ["GET ", "HEAD ", "POST ", "PUT ", "PATCH ", "DELETE ", "OPTIONS "];
    METHODS.iter().any(|m| l.starts_with(m)) && l.ends_with(" HTTP/1.1")
}

pub struct Recorder {
    pub port: u16,
    /// Speaks TLS (its upstream does).
    tls: bool,
    shared: Arc<Shared>,
}

/// The two TLS configurations of a recorder in front of a TLS upstream.
#[derive(Clone)]
struct TlsRelay {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl Recorder {
    /// Listens on a free loopback port and relays each connection to 127.0.0.1:upstream_port;
    /// over TLS on both sides when that port is a harness TLS port ([`crate::http::trust_port`]),
    /// and then registered as one itself.
    pub fn start(upstream_port: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("recorder bind: {e}"))?;
        let port = listener.local_addr().map_err(|e| format!("recorder addr: {e}"))?.port();
        let tls = match crate::http::tls_ca(upstream_port) {
            Some(upstream_ca) => {
                let own = crate::tls::upstream()?;
                crate::http::trust_port(port, &own.ca);
                Some(TlsRelay {
                    server: crate::tls::server_config(&own.server_cert())?,
                    client: crate::http::tls_client(&upstream_ca)?,
                })
            }
            None => None,
        };
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let is_tls = tls.is_some();
        thread::Builder::new()
            .name(format!("recorder-{port}"))
            .spawn(move || accept_loop(listener, upstream_port, s, tls))
            .map_err(|e| format!("recorder thread: {e}"))?;
        Ok(Self {
            port,
            tls: is_tls,
            shared,
        })
    }

    /// `https://127.0.0.1:<port>` (`http://` in front of a plain-HTTP upstream): a connector's
    /// address when the proxy reaches the registry through the recorder.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// What was received so far, without clearing.
    pub fn snapshot(&self) -> Recorded {
        let bytes = self.shared.bytes.lock().map(|b| b.clone()).unwrap_or_default();
        self.describe(&bytes)
    }

    /// What was received so far, and clears the buffer.
    pub fn take(&self) -> Recorded {
        let bytes = self
            .shared
            .bytes
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default();
        self.describe(&bytes)
    }

    fn describe(&self, bytes: &[u8]) -> Recorded {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let requests = text.split("\r\n").filter(|l| is_request_line(l)).count();
        Recorded {
            text,
            connections: self.shared.connections.load(Ordering::SeqCst),
            requests,
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn accept_loop(listener: TcpListener, upstream_port: u16, shared: Arc<Shared>, tls: Option<TlsRelay>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let upstream = match TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], upstream_port))) {
            Ok(u) => u,
            Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let rec = shared.clone();
        match &tls {
            Some(t) => {
                let t = t.clone();
                // The handshakes run on the connection's own thread: a slow peer holds up nobody.
                thread::spawn(move || relay_tls(client, upstream, &t, rec));
            }
            None => {
                let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                    continue;
                };
                // Client (Envoy) -> upstream: recorded.
                thread::spawn(move || pump(client, upstream, Some(rec)));
                // Upstream -> client: passed through only.
                thread::spawn(move || pump(u2, c2, None));
            }
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, record: Option<Arc<Shared>>) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // Record before forwarding so a test that saw the answer also sees the request.
                if let Some(r) = &record
                    && let Ok(mut b) = r.bytes.lock()
                {
                    b.extend_from_slice(&buf[..n]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    // Propagate the half-close so keep-alive and Connection: close both behave as without us.
    let _ = to.shutdown(Shutdown::Write);
}

/// One TLS side of the relay. The connection state is behind `conn`, held only briefly (to
/// feed it received records, or to encrypt plaintext): never across a socket operation, so a
/// peer that stops reading (a registry refusing a large body) cannot keep the other direction
/// from decrypting its answer. `send` orders the socket writes: whoever holds it drains every
/// record the connection queued, in sequence, and writes them.
struct Side {
    conn: Mutex<rustls::Connection>,
    send: Mutex<()>,
    sock: TcpStream,
}

impl Side {
    /// Completes the handshake on the calling thread (bounded: a peer that stalls is dropped).
    fn handshake(mut conn: rustls::Connection, sock: TcpStream) -> Option<Arc<Self>> {
        sock.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let mut s = &sock;
        while conn.is_handshaking() {
            conn.complete_io(&mut s).ok()?;
        }
        sock.set_read_timeout(None).ok()?;
        Some(Arc::new(Self {
            conn: Mutex::new(conn),
            send: Mutex::new(()),
            sock,
        }))
    }

    /// Encrypts `plain` (and, with `close`, a close_notify after it) and writes every queued
    /// record to the socket, including those the other direction's reads queued (alerts, key
    /// updates).
    fn send(&self, plain: &[u8], close: bool) -> std::io::Result<()> {
        let _order = self
            .send
            .lock()
            .map_err(|_| std::io::Error::other("send lock poisoned"))?;
        let mut out = Vec::new();
        {
            let mut conn = self
                .conn
                .lock()
                .map_err(|_| std::io::Error::other("TLS state poisoned"))?;
            conn.writer().write_all(plain)?;
            if close {
                conn.send_close_notify();
            }
            while conn.wants_write() {
                conn.write_tls(&mut out)?;
            }
        }
        (&self.sock).write_all(&out)
    }
}

fn relay_tls(client: TcpStream, upstream: TcpStream, tls: &TlsRelay, rec: Arc<Shared>) {
    let name = rustls::pki_types::ServerName::from(std::net::IpAddr::from([127, 0, 0, 1]));
    let (Ok(mut server), Ok(mut to_upstream)) = (
        rustls::ServerConnection::new(tls.server.clone()),
        rustls::ClientConnection::new(tls.client.clone(), name),
    ) else {
        return;
    };
    // rustls holds at most 64 KiB of unsent records by default and then accepts a short write;
    // a socket read here (64 KiB) can decrypt to more than fits beside queued records. The
    // relay drains every record it encrypts right away, so the buffer stays bounded anyway.
    server.set_buffer_limit(None);
    to_upstream.set_buffer_limit(None);
    let Some(down) = Side::handshake(server.into(), client) else {
        return;
    };
    let Some(up) = Side::handshake(to_upstream.into(), upstream) else {
        let _ = down.sock.shutdown(Shutdown::Both);
        return;
    };
    let (d, u) = (down.clone(), up.clone());
    // Proxy -> upstream: recorded; upstream -> proxy: passed through only.
    thread::spawn(move || pump_tls(&d, &u, Some(rec)));
    pump_tls(&up, &down, None);
}

/// Reads TLS records from `from`'s socket, decrypts them, and sends the plaintext on through `to`.
fn pump_tls(from: &Side, to: &Side, record: Option<Arc<Shared>>) {
    let mut buf = [0u8; 64 * 1024];
    let mut plain = Vec::new();
    // Nothing read yet, but the handshake may have read records past its end (a client's first
    // request in the same segment as its Finished): those are decrypted first.
    let mut n = 0;
    loop {
        plain.clear();
        let mut closed = false;
        {
            let Ok(mut conn) = from.conn.lock() else { break };
            let mut rest = &buf[..n];
            loop {
                if !rest.is_empty() && conn.read_tls(&mut rest).is_err() {
                    closed = true;
                    break;
                }
                if conn.process_new_packets().is_err() {
                    closed = true;
                    break;
                }
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match conn.reader().read(&mut chunk) {
                        Ok(0) => {
                            // close_notify from the peer.
                            closed = true;
                            break;
                        }
                        Ok(m) => plain.extend_from_slice(&chunk[..m]),
                        Err(_) => break,
                    }
                }
                if rest.is_empty() || closed {
                    break;
                }
            }
        }
        if !plain.is_empty() {
            if let Some(r) = &record
                && let Ok(mut b) = r.bytes.lock()
            {
                b.extend_from_slice(&plain);
            }
            if to.send(&plain, false).is_err() {
                break;
            }
        }
        if closed {
            break;
        }
        n = match (&from.sock).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
    }
    // Propagate the half-close, as the plain relay does.
    let _ = to.send(&[], true);
    let _ = to.sock.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    /// The TLS relay in front of a real TLS registry: a verified request through it gets the
    /// registry's answer, and the recorder saw the plaintext request.
    #[test]
    fn relays_tls_to_a_tls_registry_and_records_the_plaintext() {
        let work = crate::WorkDir::new("recorder-selftest").unwrap();
        let registry = crate::registry::Registry::start_open(&work).unwrap();
        let recorder = super::Recorder::start(registry.port).unwrap();
        assert!(recorder.url().starts_with("https://"));
        for _ in 0..3 {
            let r = crate::http::Request::get("/v2/").send(recorder.port).unwrap();
            assert_eq!(r.status, 200, "{}", r.summary());
        }
        let seen = recorder.take();
        assert_eq!(seen.requests, 3, "{:?}", seen.text);
    }
}
