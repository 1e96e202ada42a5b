//! Owns the recording relay between Envoy and the upstream registry: a transparent TCP relay
//! that forwards every byte unchanged and keeps a copy of what the upstream receives. It is how
//! the tests prove what crossed the wire to the registry (which credential, that no client JWT
//! did, that a refused request sent nothing).

use crate::Result;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

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
    shared: Arc<Shared>,
}

impl Recorder {
    /// Listens on a free loopback port and relays each connection to 127.0.0.1:upstream_port.
    pub fn start(upstream_port: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("recorder bind: {e}"))?;
        let port = listener.local_addr().map_err(|e| format!("recorder addr: {e}"))?.port();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        thread::Builder::new()
            .name(format!("recorder-{port}"))
            .spawn(move || accept_loop(listener, upstream_port, s))
            .map_err(|e| format!("recorder thread: {e}"))?;
        Ok(Self { port, shared })
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

fn accept_loop(listener: TcpListener, upstream_port: u16, shared: Arc<Shared>) {
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
        let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
            continue;
        };
        let rec = shared.clone();
        // Client (Envoy) -> upstream: recorded.
        thread::spawn(move || pump(client, upstream, Some(rec)));
        // Upstream -> client: passed through only.
        thread::spawn(move || pump(u2, c2, None));
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
