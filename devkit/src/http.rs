//! A deliberately raw HTTP/1.1 client over `TcpStream`: the refusal tests must send what no
//! well-behaved client library would (two `Authorization` headers, `a//b` paths, odd Host
//! headers), byte for byte, and read the status, headers and body as Envoy sent them.
//!
//! Also owns which loopback ports speak TLS: a proxy listener registered with [`trust_port`]
//! is reached over TLS verified against its CA (the certificate must name 127.0.0.1, the
//! address dialled), so the same raw requests go to a TLS proxy unchanged. The harness's
//! client wrappers (skopeo, buildah, containerd) read the same registry.

use crate::Result;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Loopback ports whose listener speaks TLS, with the CA (PEM file) their certificate chains to.
static TLS_PORTS: Mutex<BTreeMap<u16, PathBuf>> = Mutex::new(BTreeMap::new());

/// From now on 127.0.0.1:`port` speaks TLS with a certificate `ca` signed.
pub fn trust_port(port: u16, ca: &Path) {
    if let Ok(mut m) = TLS_PORTS.lock() {
        m.insert(port, ca.to_path_buf());
    }
}

/// The CA of a TLS port ([`trust_port`]); `None` for a plain one.
pub fn tls_ca(port: u16) -> Option<PathBuf> {
    TLS_PORTS.lock().ok().and_then(|m| m.get(&port).cloned())
}

/// The CA of the TLS listener an image reference names (`[docker://]host:port/...`), when its
/// port is one of the harness's TLS ports; `None` for a plain registry.
pub fn tls_ca_of_reference(reference: &str) -> Option<PathBuf> {
    let r = reference.strip_prefix("docker://").unwrap_or(reference);
    let authority = r.split('/').next()?;
    tls_ca(authority.rsplit_once(':')?.1.parse().ok()?)
}

/// A directory holding `ca` as `ca.crt`: what the containers tools take as `--cert-dir`.
pub fn cert_dir_for(ca: &Path) -> Result<PathBuf> {
    let dir = ca.with_extension("certdir");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    std::fs::copy(ca, dir.join("ca.crt")).map_err(|e| format!("copy {}: {e}", ca.display()))?;
    Ok(dir)
}

/// A connection to 127.0.0.1:`port` with read and write timeouts: TLS verified against the
/// port's CA when it is a TLS listener ([`trust_port`]), plain TCP otherwise. For tests that
/// write bytes themselves (a client trickling its headers).
pub fn open(port: u16, timeout: Duration) -> Result<Conn> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_read_timeout(Some(timeout)).ok();
    tcp.set_write_timeout(Some(timeout)).ok();
    Ok(match tls_ca(port) {
        Some(ca) => {
            let name = rustls::pki_types::ServerName::from(std::net::IpAddr::from([127, 0, 0, 1]));
            let conn =
                rustls::ClientConnection::new(tls_client(&ca)?, name).map_err(|e| format!("TLS to {addr}: {e}"))?;
            Conn::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
        }
        None => Conn::Plain(tcp),
    })
}

/// A rustls client trusting only `ca`.
pub(crate) fn tls_client(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("read CA {}: {e}", ca.display()))? {
        let c = c.map_err(|e| format!("CA {}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("CA {}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A connection: plain TCP or TLS over it (for a port registered with [`trust_port`]).
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    /// The TCP socket's read timeout (also under TLS).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.set_read_timeout(timeout),
            Conn::Tls(s) => s.sock.set_read_timeout(timeout),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            // A peer that closes without close_notify has still ended the answer.
            Conn::Tls(s) => match s.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// One request; headers keep their order and may repeat.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Sent as-is in the request line: no normalisation or escaping.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }

    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    pub fn head(path: &str) -> Self {
        Self::new("HEAD", path)
    }

    /// Adds a header (repeats allowed).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn host(self, host: &str) -> Self {
        self.header("Host", host)
    }

    /// `Authorization: Basic base64(user:pass)`.
    pub fn basic(self, user: &str, pass: &str) -> Self {
        let v = format!("Basic {}", basic_value(user, pass));
        self.header("Authorization", &v)
    }

    /// `Authorization: Bearer token`.
    pub fn bearer(self, token: &str) -> Self {
        let v = format!("Bearer {token}");
        self.header("Authorization", &v)
    }

    /// Sends the request to 127.0.0.1:port on a fresh connection and reads the whole answer.
    pub fn send(&self, port: u16) -> Result<Response> {
        let mut s = open(port, self.timeout)?;
        self.exchange(&mut s, port, true)
    }

    /// Sends the request on an open connection and leaves it open (HTTP/1.1 keep-alive): for a
    /// load that should measure the proxy, not a TCP and TLS handshake per request.
    pub fn send_on(&self, conn: &mut Conn, port: u16) -> Result<Response> {
        self.exchange(conn, port, false)
    }

    fn exchange(&self, s: &mut Conn, port: u16, close: bool) -> Result<Response> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut head = format!("{} {} HTTP/1.1\r\n", self.method, self.path);
        if !self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
        }
        for (n, v) in &self.headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        if !self.body.is_empty() || matches!(self.method.as_str(), "POST" | "PUT" | "PATCH") {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())
            .and_then(|_| s.write_all(&self.body))
            .map_err(|e| format!("send {} {} to {addr}: {e}", self.method, self.path))?;
        let raw = read_response(s, self.method == "HEAD")
            .map_err(|e| format!("read answer to {} {} from {addr}: {e}", self.method, self.path))?;
        Response::parse(&raw, self.method == "HEAD").map_err(|e| format!("{} {}: {e}", self.method, self.path))
    }
}

/// Reads one response: up to the end of its body by Content-Length or the last chunk, else to
/// EOF. Reading to EOF alone would wait out Envoy's delayed close (1 s) on every request.
fn read_response(s: &mut impl Read, head_only: bool) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let body = &raw[split + 4..];
            let content_length = head
                .split("\r\n")
                .filter_map(|l| l.strip_prefix("content-length:"))
                .find_map(|v| v.trim().parse::<usize>().ok());
            let chunked = head.contains("transfer-encoding: chunked");
            let no_body = head.starts_with("http/1.1 204") || head.starts_with("http/1.1 304");
            if head_only || no_body {
                return Ok(raw);
            }
            if let Some(n) = content_length
                && !chunked
                && body.len() >= n
            {
                return Ok(raw);
            }
            if chunked && body.ends_with(b"0\r\n\r\n") {
                return Ok(raw);
            }
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(raw);
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// base64(user:pass) as used in Basic authorization.
pub fn basic_value(user: &str, pass: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    fn parse(raw: &[u8], head_only: bool) -> Result<Self> {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| {
            format!(
                "no complete HTTP head in {} bytes: {:?}",
                raw.len(),
                String::from_utf8_lossy(raw)
            )
        })?;
        let head = String::from_utf8_lossy(&raw[..split]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let rest = &raw[split + 4..];
        let chunked = headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked"));
        let body = if head_only {
            Vec::new()
        } else if chunked {
            dechunk(rest)?
        } else {
            rest.to_vec()
        };
        Ok(Self { status, headers, body })
    }

    /// First value of a header, case-insensitive.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| format!("body is not JSON ({e}): {:?}", self.body_text()))
    }

    /// A one-line description for assertion messages.
    pub fn summary(&self) -> String {
        let hdrs: Vec<String> = self.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect();
        format!("{} [{}] {}", self.status, hdrs.join("; "), self.body_text())
    }
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunked body")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_and_plain_bodies() {
        let r = Response::parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        let r = Response::parse(
            b"HTTP/1.1 401 Unauthorized\r\nWww-Authenticate: Basic realm=\"x\"\r\n\r\n{}",
            false,
        )
        .unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"x\""));
        assert_eq!(r.body_text(), "{}");
    }

    #[test]
    fn basic_value_is_standard_base64() {
        assert_eq!(basic_value("", ""), "Og==");
        assert_eq!(basic_value("robot", "pw"), "cm9ib3Q6cHc=");
    }
}
