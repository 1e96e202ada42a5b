//! A stand-in Kubernetes API server for the sidecar controller's tests: it owns the Connector
//! custom resources, Secrets, Events, TokenReviews, SubjectAccessReviews and the service-account
//! issuer's OIDC discovery documents. It is the one permitted stand-in in this harness: no
//! Kubernetes API server can be installed or run on this machine.
//!
//! It speaks the API server's HTTP/JSON shapes closely enough that a real kube-rs client (plain
//! `Api` calls, kube-runtime's `watcher`/`reflector`/`Controller` and the events `Recorder`) works
//! against it over plain HTTP/1.1: real list/watch semantics with one global, increasing
//! resourceVersion and a replayable event history (410 Expired once a watch asks for history that
//! is gone), real `Status` error objects, merge / strategic-merge / JSON / server-side-apply
//! patches, a `status` subresource that alone may change `.status`, and `metadata.generation`
//! bumped on spec changes only. Tests drive it from the side through [`KubeApi`]'s methods and
//! can break it on purpose ([`KubeApi::set_unavailable`], [`KubeApi::break_watches`]).
//!
//! The server is std-only: one thread accepts, one thread serves each (keep-alive) connection,
//! and everything stops when the [`KubeApi`] is dropped.

use crate::Result;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How many watch events are kept for replay; a watch from an older resourceVersion gets 410.
const HISTORY: usize = 2000;

/// One SubjectAccessReview rule: who ([`user`](Self::user) or [`group`](Self::group); neither =
/// anyone) may do what. For the string fields `""` or `"*"` match anything, except
/// [`subresource`](Self::subresource), where `""` matches only a request without a subresource.
#[derive(Clone, Debug, Default)]
pub struct AccessRule {
    pub user: Option<String>,
    pub group: Option<String>,
    pub verb: String,
    pub api_group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

/// One stored object and the resourceVersion at which it was created (for creation order).
struct Entry {
    object: Value,
    created: u64,
}

/// One change, kept for watches that resume from an older resourceVersion.
struct Change {
    rv: u64,
    resource: &'static str,
    namespace: String,
    kind: &'static str,
    object: Value,
}

struct TokenInfo {
    username: String,
    groups: Vec<String>,
    audiences: Vec<String>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (resource id, namespace, name) → object.
    objects: BTreeMap<(&'static str, String, String), Entry>,
    history: VecDeque<Change>,
    /// Watches from a resourceVersion below this one have lost history: 410 Expired.
    history_floor: u64,
    issuer: String,
    jwks: Value,
    jwks_requests: usize,
    tokens: HashMap<String, TokenInfo>,
    rules: Vec<AccessRule>,
    reviews: Vec<Value>,
    requests: Vec<(String, String)>,
    unavailable: bool,
    /// Bumped by `break_watches`: every watch started under an older epoch ends.
    watch_epoch: u64,
    stopped: bool,
}

/// A connection's socket (to shut down) and its thread (to join).
type Conn = (TcpStream, Option<JoinHandle<()>>);

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    port: u16,
    stop: AtomicBool,
    next_conn: AtomicU64,
    /// Open connections, so Drop can shut them down and join their threads.
    conns: Mutex<HashMap<u64, Conn>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running stand-in API server on `127.0.0.1:<random port>`; stops when dropped.
pub struct KubeApi {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl KubeApi {
    /// Binds 127.0.0.1:0 and starts serving.
    pub fn start() -> Result<KubeApi> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("kube_api: bind 127.0.0.1:0: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("kube_api: local_addr: {e}"))?
            .port();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                issuer: "https://kubernetes.default.svc.cluster.local".into(),
                jwks: json!({"keys": []}),
                // Like etcd's revision, never 0: a list of nothing still names a version a watch
                // can resume from (a watch from "0" starts from now).
                rv: 1,
                ..State::default()
            }),
            changed: Condvar::new(),
            port,
            stop: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("kube-api-accept".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| format!("kube_api: spawn accept thread: {e}"))?;
        Ok(KubeApi {
            shared,
            accept: Some(accept),
        })
    }

    /// `http://127.0.0.1:PORT`, for `kube::Config::new(url.parse()?)`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.shared.port)
    }

    /// The listening port, for raw requests with [`crate::http::Request::send`].
    pub fn port(&self) -> u16 {
        self.shared.port
    }

    /// Creates or replaces a Connector or Secret (or Event) by apiVersion/kind/namespace/name,
    /// exactly as given (including `.status`; the namespace defaults to `default`), keeping the
    /// uid and creationTimestamp of an object it replaces. Returns the stored object; watchers
    /// see ADDED or MODIFIED (nothing for a no-op, as on a real server).
    pub fn apply(&self, object: Value) -> Result<Value> {
        let api_version = object["apiVersion"].as_str().unwrap_or("").to_string();
        let kind = object["kind"].as_str().unwrap_or("").to_string();
        let res = Res::by_kind(&api_version, &kind)
            .ok_or_else(|| format!("kube_api: apply: {api_version:?} {kind:?} is not a served kind"))?;
        let name = match object["metadata"]["name"].as_str() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => return Err(format!("kube_api: apply: {kind} without metadata.name")),
        };
        let ns = match object["metadata"]["namespace"].as_str() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => "default".to_string(),
        };
        let mut object = object;
        if let Some(m) = object["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let (code, stored) = self.shared.lock().commit(res, &ns, &name, object, Part::All);
        self.shared.changed.notify_all();
        if code >= 400 {
            return Err(format!("kube_api: apply {kind} {ns}/{name}: {}", stored["message"]));
        }
        Ok(stored)
    }

    /// Deletes like a DELETE request (an object with finalizers only gets a deletionTimestamp);
    /// false when there was no such object.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(res) = Res::by_kind(api_version, kind) else {
            return false;
        };
        let (code, _) = self.shared.lock().remove(res, namespace, name);
        self.shared.changed.notify_all();
        code == 200
    }

    /// The stored object, if any.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = Res::by_kind(api_version, kind)?;
        let st = self.shared.lock();
        st.objects
            .get(&(res.id, namespace.to_string(), name.to_string()))
            .map(|e| e.object.clone())
    }

    /// Every stored Event of both APIs (events.k8s.io/v1 and core v1), oldest first.
    pub fn events(&self) -> Vec<Value> {
        let st = self.shared.lock();
        let mut all: Vec<(u64, Value)> = st
            .objects
            .iter()
            .filter(|((id, _, _), _)| *id == "events" || *id == "events.k8s.io/events")
            .map(|(_, e)| (e.created, e.object.clone()))
            .collect();
        all.sort_by_key(|(created, _)| *created);
        all.into_iter().map(|(_, v)| v).collect()
    }

    /// The `issuer` of `/.well-known/openid-configuration`.
    pub fn set_issuer(&self, issuer: &str) {
        self.shared.lock().issuer = issuer.to_string();
    }

    /// The document served at `/openid/v1/jwks`.
    pub fn set_jwks(&self, jwks: Value) {
        self.shared.lock().jwks = jwks;
    }

    /// How many times `/openid/v1/jwks` was fetched.
    pub fn jwks_requests(&self) -> usize {
        self.shared.lock().jwks_requests
    }

    /// A token TokenReview accepts, with the user, groups and audiences it reports.
    pub fn set_token(&self, token: &str, username: &str, groups: &[&str], audiences: &[&str]) {
        let info = TokenInfo {
            username: username.to_string(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
        };
        self.shared.lock().tokens.insert(token.to_string(), info);
    }

    /// Adds a rule SubjectAccessReviews are answered from (default: deny everything).
    pub fn allow(&self, rule: AccessRule) {
        self.shared.lock().rules.push(rule);
    }

    pub fn clear_rules(&self) {
        self.shared.lock().rules.clear();
    }

    /// The `spec` of every SubjectAccessReview received, oldest first.
    pub fn access_reviews(&self) -> Vec<Value> {
        self.shared.lock().reviews.clone()
    }

    /// (method, path?query) of every request received, oldest first.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.lock().requests.clone()
    }

    /// While on, every request is answered 503 ServiceUnavailable.
    pub fn set_unavailable(&self, on: bool) {
        self.shared.lock().unavailable = on;
    }

    /// Ends every open watch stream (each gets its terminating chunk and its connection closes).
    pub fn break_watches(&self) {
        self.shared.lock().watch_epoch += 1;
        self.shared.changed.notify_all();
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.lock().stopped = true;
        self.shared.changed.notify_all();
        // Unblock accept().
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.shared.port)),
            Duration::from_secs(1),
        );
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let conns: Vec<_> = {
            let mut c = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
            c.drain().map(|(_, v)| v).collect()
        };
        for (stream, _) in &conns {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, handle) in conns {
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let Ok(clone) = stream.try_clone() else { continue };
        let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        let s = shared.clone();
        let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        let handle = std::thread::Builder::new()
            .name(format!("kube-api-conn-{id}"))
            .spawn(move || {
                serve_connection(stream, &s);
                s.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            })
            .ok();
        conns.insert(id, (clone, handle));
    }
}

/// One parsed HTTP request.
struct Req {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    /// The raw `path?query` as received.
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// What a handler answers: a JSON body with a status code, or a watch stream.
enum Reply {
    Json(u16, Value),
    Watch(Box<WatchSpec>),
}

/// Serves requests on one connection until the peer closes it, asks to close, or the server stops.
fn serve_connection(stream: TcpStream, shared: &Shared) {
    let Ok(write_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut out = write_half;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let req = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let _ = write_json(&mut out, 400, &status_json(400, "BadRequest", &e, None), true);
                return;
            }
        };
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let reply = handle(shared, &req);
        let keep = match reply {
            Reply::Json(code, body) => write_json(&mut out, code, &body, close).is_ok() && !close,
            Reply::Watch(spec) => serve_watch(&mut out, shared, *spec) && !close,
        };
        if !keep {
            let _ = out.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Reads one request; `Ok(None)` when the peer closed the connection between requests.
fn read_request(r: &mut BufReader<TcpStream>) -> std::result::Result<Option<Req>, String> {
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) if line.trim().is_empty() => continue, // tolerate stray CRLF between requests
            Ok(_) => break,
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(format!("malformed request line {:?}", line.trim_end()));
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        match r.read_line(&mut h) {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).map_err(|e| format!("read chunk size: {e}"))?;
            let size = size.trim().split(';').next().unwrap_or("").to_string();
            let n = usize::from_str_radix(&size, 16).map_err(|_| format!("bad chunk size {size:?}"))?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).map_err(|e| format!("read chunk: {e}"))?;
            if n == 0 {
                // Trailers are not used by any client here; the 2 bytes read were the final CRLF.
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = find("content-length") {
        let n: usize = len.parse().map_err(|_| format!("bad Content-Length {len:?}"))?;
        body = vec![0u8; n];
        r.read_exact(&mut body).map_err(|e| format!("read body: {e}"))?;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_query(q)),
        None => (target.clone(), Vec::new()),
    };
    Ok(Some(Req {
        method,
        path: percent_decode(&path),
        query,
        target,
        headers,
        body,
    }))
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k, true), decode(v, true)),
            None => (decode(p, true), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    decode(s, false)
}

fn decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn write_json(out: &mut TcpStream, code: u16, body: &Value, close: bool) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
        reason_phrase(code),
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    out.write_all(head.as_bytes())?;
    out.write_all(&body)?;
    out.flush()
}

/// A `Status` object as the API server sends it for failures.
fn status_json(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

/// Routes one request: records it, applies the fault switches, dispatches, and wakes watches
/// after a write.
fn handle(shared: &Shared, req: &Req) -> Reply {
    {
        let mut st = shared.lock();
        st.requests.push((req.method.clone(), req.target.clone()));
        if st.unavailable {
            let msg = "the server is currently unable to handle the request";
            return Reply::Json(503, status_json(503, "ServiceUnavailable", msg, None));
        }
    }
    let reply = route(shared, req);
    if req.method != "GET" {
        shared.changed.notify_all();
    }
    reply
}

fn not_found_path() -> Reply {
    let msg = "the server could not find the requested resource";
    Reply::Json(404, status_json(404, "NotFound", msg, Some(json!({}))))
}

fn method_not_allowed(method: &str) -> Reply {
    let msg = format!("the server does not allow this method on the requested resource ({method})");
    Reply::Json(405, status_json(405, "MethodNotAllowed", &msg, Some(json!({}))))
}

/// Parses a request body as JSON, or answers 400 naming the problem.
fn parse_body(req: &Req) -> std::result::Result<Value, Reply> {
    serde_json::from_slice(&req.body).map_err(|e| {
        let msg = format!(
            "the body of the request could not be decoded as JSON ({e}); accepted media types include application/json"
        );
        Reply::Json(400, status_json(400, "BadRequest", &msg, None))
    })
}

fn route(shared: &Shared, req: &Req) -> Reply {
    let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
    match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["version"]) => Reply::Json(200, version_info()),
        ("GET", ["api"]) => Reply::Json(200, api_versions(shared.port)),
        ("GET", ["apis"]) => Reply::Json(200, api_group_list()),
        ("GET", ["api", "v1"]) => Reply::Json(200, api_resource_list("", "v1")),
        ("GET", ["apis", group, version]) => match api_group_version(group, version) {
            true => Reply::Json(200, api_resource_list(group, version)),
            false => not_found_path(),
        },
        ("GET", [".well-known", "openid-configuration"]) => {
            let issuer = shared.lock().issuer.clone();
            Reply::Json(200, openid_configuration(&issuer, shared.port))
        }
        ("GET", ["openid", "v1", "jwks"]) => {
            let mut st = shared.lock();
            st.jwks_requests += 1;
            Reply::Json(200, st.jwks.clone())
        }
        ("POST", ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => match parse_body(req) {
            Ok(body) => Reply::Json(201, token_review(&shared.lock(), body)),
            Err(r) => r,
        },
        ("POST", ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"]) => match parse_body(req) {
            Ok(body) => Reply::Json(201, subject_access_review(&mut shared.lock(), body)),
            Err(r) => r,
        },
        (_, ["api", version, rest @ ..]) => resource_request(shared, req, "", version, rest),
        (_, ["apis", group, version, rest @ ..]) => resource_request(shared, req, group, version, rest),
        _ => not_found_path(),
    }
}

/// `.../{plural}`, `.../namespaces/{ns}/{plural}[/{name}[/status]]` for the served resources.
fn resource_request(shared: &Shared, req: &Req, group: &str, version: &str, rest: &[&str]) -> Reply {
    let (ns, plural, name, sub) = match rest {
        [plural] => (None, *plural, None, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        _ => return not_found_path(),
    };
    let Some(res) = Res::by_path(group, version, plural) else {
        return not_found_path();
    };
    let part = match sub {
        None => Part::Main,
        Some("status") if res.crd => Part::Status,
        Some(_) => return not_found_path(),
    };
    let watch = matches!(req.param("watch"), Some("true" | "1"));
    let selector = match Selector::parse(req.param("fieldSelector"), req.param("labelSelector")) {
        Ok(s) => s,
        Err(e) => return Reply::Json(400, status_json(400, "BadRequest", &e, None)),
    };
    let (code, body) = match (req.method.as_str(), ns, name) {
        ("GET", _, None) if watch => {
            return match WatchSpec::new(shared, req, res, ns, selector) {
                Ok(spec) => Reply::Watch(Box::new(spec)),
                Err((code, body)) => Reply::Json(code, body),
            };
        }
        ("GET", _, None) => list(&shared.lock(), res, ns, &selector),
        ("GET", Some(ns), Some(name)) => match shared.lock().objects.get(&(res.id, ns.into(), name.into())) {
            Some(e) => (200, e.object.clone()),
            None => res.not_found(name),
        },
        ("POST", Some(ns), None) => match parse_body(req) {
            Ok(body) => create(&mut shared.lock(), res, ns, body),
            Err(r) => return r,
        },
        ("PUT", Some(ns), Some(name)) => match parse_body(req) {
            Ok(body) => update(&mut shared.lock(), res, ns, name, body, part),
            Err(r) => return r,
        },
        ("PATCH", Some(ns), Some(name)) => match parse_body(req) {
            Ok(body) => patch(&mut shared.lock(), req, res, ns, name, body, part),
            Err(r) => return r,
        },
        ("DELETE", Some(ns), Some(name)) if part == Part::Main => shared.lock().remove(res, ns, name),
        (m, _, _) => return method_not_allowed(m),
    };
    Reply::Json(code, body)
}

fn list(st: &State, res: &'static Res, ns: Option<&str>, selector: &Selector) -> (u16, Value) {
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((id, n, _), e)| *id == res.id && ns.is_none_or(|ns| ns == n) && selector.matches(&e.object))
        .map(|(_, e)| e.object.clone())
        .collect();
    let body = json!({
        "kind": res.list_kind,
        "apiVersion": res.api_version(),
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    });
    (200, body)
}

fn create(st: &mut State, res: &'static Res, ns: &str, mut body: Value) -> (u16, Value) {
    if !body.is_object() {
        return bad_request("the request body must be a JSON object");
    }
    if let Some(body_ns) = body["metadata"]["namespace"].as_str()
        && !body_ns.is_empty()
        && body_ns != ns
    {
        return bad_request("the namespace of the provided object does not match the namespace sent on the request");
    }
    let name = match body["metadata"]["name"].as_str() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => match body["metadata"]["generateName"].as_str() {
            Some(prefix) if !prefix.is_empty() => {
                let suffix = crate::random_hex(3).unwrap_or_else(|_| format!("{:06x}", st.rv));
                format!("{prefix}{}", &suffix[..5])
            }
            _ => return bad_request("metadata.name: Required value: name or generateName is required"),
        },
    };
    if st.objects.contains_key(&(res.id, ns.to_string(), name.clone())) {
        return res.already_exists(&name);
    }
    body["metadata"]["name"] = json!(name);
    st.commit(res, ns, &name, body, Part::Main)
}

fn update(st: &mut State, res: &'static Res, ns: &str, name: &str, body: Value, part: Part) -> (u16, Value) {
    if let Some(body_name) = body["metadata"]["name"].as_str()
        && body_name != name
    {
        return bad_request("the name of the object does not match the name on the URL");
    }
    if !st.objects.contains_key(&(res.id, ns.to_string(), name.to_string())) {
        return res.not_found(name);
    }
    st.commit(res, ns, name, body, part)
}

fn patch(st: &mut State, req: &Req, res: &'static Res, ns: &str, name: &str, body: Value, part: Part) -> (u16, Value) {
    let content_type = req
        .header("content-type")
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    let existing = st
        .objects
        .get(&(res.id, ns.to_string(), name.to_string()))
        .map(|e| e.object.clone());
    let mut doc = match content_type {
        "application/json-patch+json" => {
            let Some(mut doc) = existing else {
                return res.not_found(name);
            };
            if let Err(e) = json_patch(&mut doc, &body) {
                return (422, status_json(422, "Invalid", &e, Some(res.details(name))));
            }
            return st.commit(res, ns, name, doc, part);
        }
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => match existing {
            Some(doc) => doc,
            None => return res.not_found(name),
        },
        "application/apply-patch+yaml" => {
            if req.param("fieldManager").is_none_or(str::is_empty) {
                let msg = "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch";
                return (422, status_json(422, "Invalid", msg, None));
            }
            match existing {
                Some(doc) => doc,
                None if part == Part::Status => return res.not_found(name),
                None => json!({"metadata": {"name": name, "namespace": ns}}),
            }
        }
        // The events API takes any patch as a merge patch.
        _ if res.plural == "events" => match existing {
            Some(doc) => doc,
            None => return res.not_found(name),
        },
        other => {
            let msg = format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
            );
            return (415, status_json(415, "UnsupportedMediaType", &msg, None));
        }
    };
    if !body.is_object() {
        return bad_request("a merge or apply patch must be a JSON object");
    }
    // A resourceVersion in the patch is a precondition against the stored object.
    let created = doc["metadata"]["resourceVersion"].is_null();
    merge_patch(&mut doc, &body);
    if created {
        if let Some(m) = doc["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        return st.commit(res, ns, name, doc, Part::Main);
    }
    st.commit(res, ns, name, doc, part)
}

/// Group versions served beyond core v1, with their non-CRUD review resources.
const GROUP_VERSIONS: &[(&str, &str)] = &[
    ("connectors.alauda.io", "v1alpha1"),
    ("events.k8s.io", "v1"),
    ("authorization.k8s.io", "v1"),
    ("authentication.k8s.io", "v1"),
];

fn api_group_version(group: &str, version: &str) -> bool {
    GROUP_VERSIONS.contains(&(group, version))
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "35",
        "gitVersion": "v1.35.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-12-17T00:00:00Z",
        "goVersion": "go1.25.5",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_versions(port: u16) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": format!("127.0.0.1:{port}")}],
    })
}

fn api_group_list() -> Value {
    let groups: Vec<Value> = GROUP_VERSIONS
        .iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn api_resource_list(group: &str, version: &str) -> Value {
    let crud = ["create", "delete", "get", "list", "patch", "update", "watch"];
    let mut resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(|r| {
            let main = json!({
                "name": r.plural,
                "singularName": r.kind.to_ascii_lowercase(),
                "namespaced": true,
                "kind": r.kind,
                "verbs": crud,
            });
            let status = r.crd.then(|| {
                json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": true,
                       "kind": r.kind, "verbs": ["get", "patch", "update"]})
            });
            std::iter::once(main).chain(status)
        })
        .collect();
    let review = |name: &str, kind: &str| json!({"name": name, "singularName": kind.to_ascii_lowercase(), "namespaced": false, "kind": kind, "verbs": ["create"]});
    match group {
        "authorization.k8s.io" => resources.push(review("subjectaccessreviews", "SubjectAccessReview")),
        "authentication.k8s.io" => resources.push(review("tokenreviews", "TokenReview")),
        _ => {}
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn openid_configuration(issuer: &str, port: u16) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("http://127.0.0.1:{port}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    })
}

/// Answers a TokenReview from the token table: with `spec.audiences` the token must hold one of
/// them and `status.audiences` is the intersection, as on a real API server.
fn token_review(st: &State, mut review: Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let status = match st.tokens.get(token) {
        None => json!({"authenticated": false, "user": {}, "error": "[invalid bearer token, token lookup failed]"}),
        Some(info) => {
            let audiences: Vec<String> = if wanted.is_empty() {
                info.audiences.clone()
            } else {
                wanted.iter().filter(|a| info.audiences.contains(a)).cloned().collect()
            };
            if !wanted.is_empty() && audiences.is_empty() {
                json!({"authenticated": false, "user": {},
                       "error": format!("[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]", info.audiences, wanted)})
            } else {
                json!({"authenticated": true, "audiences": audiences,
                       "user": {"username": info.username, "groups": info.groups}})
            }
        }
    };
    review["apiVersion"] = json!("authentication.k8s.io/v1");
    review["kind"] = json!("TokenReview");
    review["status"] = status;
    review
}

/// Answers a SubjectAccessReview from the rules and records its spec.
fn subject_access_review(st: &mut State, mut review: Value) -> Value {
    let spec = review["spec"].clone();
    st.reviews.push(spec.clone());
    let user = spec["user"].as_str().unwrap_or("");
    let groups: Vec<&str> = spec["groups"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let ra = &spec["resourceAttributes"];
    let attr = |k: &str| ra[k].as_str().unwrap_or("").to_string();
    let any = |rule: &str, v: &str| rule.is_empty() || rule == "*" || rule == v;
    let allowed = ra.is_object()
        && st.rules.iter().any(|r| {
            r.user.as_deref().is_none_or(|u| u == user)
                && r.group.as_deref().is_none_or(|g| groups.contains(&g))
                && any(&r.verb, &attr("verb"))
                && any(&r.api_group, &attr("group"))
                && any(&r.resource, &attr("resource"))
                && (r.subresource == "*" || r.subresource == attr("subresource"))
                && any(&r.namespace, &attr("namespace"))
                && any(&r.name, &attr("name"))
        });
    let reason = if allowed {
        format!("allowed by a test rule for user {user:?}")
    } else {
        format!(
            "no test rule allows user {user:?} (groups {groups:?}) to {:?} {ra}",
            attr("verb")
        )
    };
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SubjectAccessReview");
    review["status"] = json!({"allowed": allowed, "reason": reason});
    review
}

/// How often an idle watch with `allowWatchBookmarks=true` gets a BOOKMARK.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

/// One watch request, parsed and checked against the retained history.
struct WatchSpec {
    res: &'static Res,
    ns: Option<String>,
    selector: Selector,
    /// Changes with a resourceVersion above this one are sent.
    from: u64,
    deadline: Instant,
    bookmarks: bool,
    /// `sendInitialEvents=true`: ADDED for every current object, then the initial-events-end bookmark.
    initial: Vec<Value>,
    send_initial: bool,
    epoch: u64,
    /// The requested resourceVersion is older than the retained history: one 410 ERROR, then close.
    expired: Option<u64>,
}

impl WatchSpec {
    fn new(
        shared: &Shared,
        req: &Req,
        res: &'static Res,
        ns: Option<&str>,
        selector: Selector,
    ) -> std::result::Result<WatchSpec, (u16, Value)> {
        let st = shared.lock();
        let send_initial = req.param("sendInitialEvents") == Some("true");
        let from = match req.param("resourceVersion").unwrap_or("") {
            "" | "0" => st.rv,
            rv => rv
                .parse::<u64>()
                .map_err(|_| bad_request(&format!("invalid resourceVersion {rv:?}: not a number")))?,
        };
        let timeout = match req.param("timeoutSeconds") {
            Some(t) => t
                .parse::<u64>()
                .map_err(|_| bad_request(&format!("invalid timeoutSeconds {t:?}")))?,
            None => 1800,
        };
        let initial = if send_initial {
            list(&st, res, ns, &selector).1["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Ok(WatchSpec {
            res,
            ns: ns.map(str::to_string),
            selector,
            from: if send_initial { st.rv } else { from },
            deadline: Instant::now() + Duration::from_secs(timeout),
            bookmarks: req.param("allowWatchBookmarks") == Some("true") || send_initial,
            initial,
            send_initial,
            epoch: st.watch_epoch,
            expired: (!send_initial && from < st.history_floor).then_some(from),
        })
    }

    fn matches(&self, c: &Change) -> bool {
        c.resource == self.res.id
            && self.ns.as_deref().is_none_or(|ns| ns == c.namespace)
            && self.selector.matches(&c.object)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Value {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        json!({"type": "BOOKMARK", "object": {"kind": self.res.kind, "apiVersion": self.res.api_version(), "metadata": meta}})
    }
}

fn write_chunk(out: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    out.write_all(format!("{:x}\r\n", line.len()).as_bytes())?;
    out.write_all(&line)?;
    out.write_all(b"\r\n")?;
    out.flush()
}

/// Streams watch events as chunked newline-delimited JSON until timeoutSeconds, `break_watches`,
/// server stop or a write failure. Returns whether the connection may be reused.
fn serve_watch(out: &mut TcpStream, shared: &Shared, spec: WatchSpec) -> bool {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if out.write_all(head.as_bytes()).and_then(|_| out.flush()).is_err() {
        return false;
    }
    if let Some(rv) = spec.expired {
        let msg = format!("too old resource version: {rv} ({})", shared.lock().history_floor);
        let ev = json!({"type": "ERROR", "object": status_json(410, "Expired", &msg, None)});
        let _ = write_chunk(out, &ev).and_then(|_| out.write_all(b"0\r\n\r\n"));
        return false;
    }
    for obj in &spec.initial {
        if write_chunk(out, &json!({"type": "ADDED", "object": obj})).is_err() {
            return false;
        }
    }
    let mut last = spec.from;
    if spec.send_initial && write_chunk(out, &spec.bookmark(last, true)).is_err() {
        return false;
    }
    let mut last_sent = Instant::now();
    loop {
        let (events, ended, broken, rv_now) = {
            let mut st = shared.lock();
            loop {
                let broken = st.stopped || st.watch_epoch != spec.epoch;
                let fresh: Vec<Value> = st
                    .history
                    .iter()
                    .rev()
                    .take_while(|c| c.rv > last)
                    .filter(|c| spec.matches(c))
                    .map(|c| json!({"type": c.kind, "object": c.object}))
                    .collect();
                let now = Instant::now();
                let ended = now >= spec.deadline;
                let bookmark_due = spec.bookmarks && now.duration_since(last_sent) >= BOOKMARK_EVERY;
                if broken || ended || !fresh.is_empty() || bookmark_due {
                    let rv = st.rv;
                    break (fresh.into_iter().rev().collect::<Vec<_>>(), ended, broken, rv);
                }
                let mut wait = spec.deadline.saturating_duration_since(now);
                if spec.bookmarks {
                    wait = wait.min(BOOKMARK_EVERY.saturating_sub(now.duration_since(last_sent)));
                }
                st = shared
                    .changed
                    .wait_timeout(st, wait.max(Duration::from_millis(1)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        if broken {
            let _ = out.write_all(b"0\r\n\r\n").and_then(|_| out.flush());
            return false;
        }
        for ev in &events {
            if write_chunk(out, ev).is_err() {
                return false;
            }
        }
        last = rv_now;
        if spec.bookmarks && (events.is_empty() || ended) && write_chunk(out, &spec.bookmark(last, false)).is_err() {
            return false;
        }
        last_sent = Instant::now();
        if ended {
            return out.write_all(b"0\r\n\r\n").and_then(|_| out.flush()).is_ok();
        }
    }
}

/// One served resource type.
struct Res {
    /// Unique store key (`events` exists in two API groups).
    id: &'static str,
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    list_kind: &'static str,
    /// A custom resource with a `status` subresource and spec-driven `metadata.generation`.
    crd: bool,
}

const RESOURCES: &[Res] = &[
    Res {
        id: "connectors",
        group: "connectors.alauda.io",
        version: "v1alpha1",
        plural: "connectors",
        kind: "Connector",
        list_kind: "ConnectorList",
        crd: true,
    },
    Res {
        id: "secrets",
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        list_kind: "SecretList",
        crd: false,
    },
    Res {
        id: "events.k8s.io/events",
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        list_kind: "EventList",
        crd: false,
    },
    Res {
        id: "events",
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        list_kind: "EventList",
        crd: false,
    },
];

impl Res {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `connectors.connectors.alauda.io`, `secrets`: the name used in error messages.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn by_path(group: &str, version: &str, plural: &str) -> Option<&'static Res> {
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    fn by_kind(api_version: &str, kind: &str) -> Option<&'static Res> {
        RESOURCES
            .iter()
            .find(|r| r.api_version() == api_version && r.kind == kind)
    }

    fn not_found(&self, name: &str) -> (u16, Value) {
        (
            404,
            status_json(
                404,
                "NotFound",
                &format!("{} \"{name}\" not found", self.qualified()),
                Some(self.details(name)),
            ),
        )
    }

    fn already_exists(&self, name: &str) -> (u16, Value) {
        let msg = format!("{} \"{name}\" already exists", self.qualified());
        (409, status_json(409, "AlreadyExists", &msg, Some(self.details(name))))
    }

    fn conflict(&self, name: &str) -> (u16, Value) {
        let msg = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            self.qualified()
        );
        (409, status_json(409, "Conflict", &msg, Some(self.details(name))))
    }

    fn details(&self, name: &str) -> Value {
        let mut d = json!({"name": name, "kind": self.plural});
        if !self.group.is_empty() {
            d["group"] = json!(self.group);
        }
        d
    }
}

fn bad_request(message: &str) -> (u16, Value) {
    (400, status_json(400, "BadRequest", message, None))
}

/// Which part of an object a write may change.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    /// Everything (the test-side [`KubeApi::apply`]).
    All,
    /// The main resource: on a custom resource `.status` is kept as stored.
    Main,
    /// The `status` subresource: only `.status` changes.
    Status,
}

impl State {
    /// Writes `candidate` as the new state of (res, ns, name) the way the API server does: keeps
    /// uid and creationTimestamp, applies the subresource rules, converts `stringData`, checks a
    /// `metadata.resourceVersion` precondition, bumps generation on spec changes, skips no-op
    /// writes, and records the change for watches. Answers (200|201, stored object) or a Status.
    fn commit(&mut self, res: &'static Res, ns: &str, name: &str, candidate: Value, part: Part) -> (u16, Value) {
        if !candidate.is_object() {
            return bad_request("the request body must be a JSON object");
        }
        let key = (res.id, ns.to_string(), name.to_string());
        let existing = self.objects.get(&key).map(|e| e.object.clone());
        let wanted_rv = candidate["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let mut obj = match (&existing, part) {
            (None, Part::Status) => return res.not_found(name),
            (Some(old), Part::Status) => {
                let mut o = old.clone();
                set_or_remove(&mut o, "status", candidate.get("status"));
                o
            }
            (Some(old), Part::Main) if res.crd => {
                let mut o = candidate;
                set_or_remove(&mut o, "status", old.get("status"));
                o
            }
            (None, Part::Main) if res.crd => {
                let mut o = candidate;
                set_or_remove(&mut o, "status", None);
                o
            }
            _ => candidate,
        };
        if !wanted_rv.is_empty() {
            match &existing {
                Some(old) if old["metadata"]["resourceVersion"].as_str() != Some(wanted_rv.as_str()) => {
                    return res.conflict(name);
                }
                None if part != Part::All => {
                    return bad_request("metadata.resourceVersion: Invalid value: must not be set on create");
                }
                _ => {}
            }
        }
        obj["kind"] = json!(res.kind);
        obj["apiVersion"] = json!(res.api_version());
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if res.id == "secrets"
            && let Some(Value::Object(sd)) = obj.as_object_mut().and_then(|o| o.remove("stringData"))
        {
            use base64::Engine;
            if !obj["data"].is_object() {
                obj["data"] = json!({});
            }
            for (k, v) in sd {
                let text = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
            }
        }
        if res.id == "secrets" && obj.get("type").is_none_or(Value::is_null) {
            obj["type"] = json!("Opaque"); // defaulted as the API server does
        }
        let meta = obj["metadata"].as_object_mut().expect("metadata is an object");
        meta.insert("name".into(), json!(name));
        meta.insert("namespace".into(), json!(ns));
        meta.remove("resourceVersion");
        match &existing {
            Some(old) => {
                for f in ["uid", "creationTimestamp", "deletionTimestamp", "generation"] {
                    set_or_remove_map(meta, f, old["metadata"].get(f));
                }
            }
            None => {
                if part != Part::All || !meta.get("uid").is_some_and(Value::is_string) {
                    meta.insert("uid".into(), json!(new_uid()));
                }
                if part != Part::All || !meta.get("creationTimestamp").is_some_and(Value::is_string) {
                    meta.insert("creationTimestamp".into(), json!(rfc3339_now()));
                }
                meta.remove("deletionTimestamp");
                meta.remove("generation");
            }
        }
        if res.crd {
            let generation = match &existing {
                Some(old) => {
                    let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                    if without_meta_status(old) != without_meta_status(&obj) {
                        g + 1
                    } else {
                        g
                    }
                }
                None => 1,
            };
            obj["metadata"]["generation"] = json!(generation);
        }
        if let Some(old) = &existing {
            let mut same = obj.clone();
            same["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
            if &same == old {
                return (200, old.clone()); // a no-op write changes nothing, as on a real server
            }
        }
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let finalized = obj["metadata"].get("deletionTimestamp").is_some_and(|t| !t.is_null())
            && obj["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty);
        if finalized {
            self.objects.remove(&key);
            self.record(rv, res, ns, "DELETED", &obj);
            return (200, obj);
        }
        let created = existing.is_none();
        let since = self.objects.get(&key).map(|e| e.created).unwrap_or(rv);
        self.objects.insert(
            key,
            Entry {
                object: obj.clone(),
                created: since,
            },
        );
        self.record(rv, res, ns, if created { "ADDED" } else { "MODIFIED" }, &obj);
        (if created { 201 } else { 200 }, obj)
    }

    /// Deletes like the API server: an object with finalizers only gets a deletionTimestamp.
    fn remove(&mut self, res: &'static Res, ns: &str, name: &str) -> (u16, Value) {
        let key = (res.id, ns.to_string(), name.to_string());
        let Some(entry) = self.objects.get(&key) else {
            return res.not_found(name);
        };
        let mut obj = entry.object.clone();
        let has_finalizers = obj["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj["metadata"].get("deletionTimestamp").is_some_and(|t| !t.is_null()) {
                return (200, obj);
            }
            obj["metadata"]["deletionTimestamp"] = json!(rfc3339_now());
            let rv = self.next_rv();
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            if let Some(e) = self.objects.get_mut(&key) {
                e.object = obj.clone();
            }
            self.record(rv, res, ns, "MODIFIED", &obj);
            return (200, obj);
        }
        self.objects.remove(&key);
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(rv, res, ns, "DELETED", &obj);
        (200, obj)
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, rv: u64, res: &'static Res, ns: &str, kind: &'static str, obj: &Value) {
        self.history.push_back(Change {
            rv,
            resource: res.id,
            namespace: ns.to_string(),
            kind,
            object: obj.clone(),
        });
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.history_floor = old.rv;
            }
        }
    }
}

fn set_or_remove(obj: &mut Value, field: &str, value: Option<&Value>) {
    if let Some(m) = obj.as_object_mut() {
        set_or_remove_map(m, field, value);
    }
}

fn set_or_remove_map(m: &mut Map<String, Value>, field: &str, value: Option<&Value>) {
    match value {
        Some(v) if !v.is_null() => {
            m.insert(field.to_string(), v.clone());
        }
        _ => {
            m.remove(field);
        }
    }
}

/// The object without `metadata` and `status`: what a generation bump compares.
fn without_meta_status(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let hex = crate::random_hex(16).unwrap_or_else(|_| format!("{:032x}", COUNTER.fetch_add(1, Ordering::SeqCst) + 1));
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Now as RFC 3339 UTC with second precision, e.g. `2026-01-02T03:04:05Z`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
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
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("target is an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// RFC 6902 JSON patch: add, remove, replace, test, move, copy.
fn json_patch(doc: &mut Value, ops: &Value) -> std::result::Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array of operations")?;
    for op in ops {
        let name = op["op"]
            .as_str()
            .ok_or_else(|| format!("JSON patch operation without \"op\": {op}"))?;
        let path = op["path"]
            .as_str()
            .ok_or_else(|| format!("JSON patch operation without \"path\": {op}"))?;
        match name {
            "add" => pointer_add(doc, path, op.get("value").cloned().ok_or("add without value")?)?,
            "remove" => {
                pointer_remove(doc, path)?;
            }
            "replace" => {
                let value = op.get("value").cloned().ok_or("replace without value")?;
                let slot = doc
                    .pointer_mut(path)
                    .ok_or_else(|| format!("replace operation does not apply: doc is missing path: {path}"))?;
                *slot = value;
            }
            "test" => {
                if doc.pointer(path) != op.get("value") {
                    return Err(format!("test operation failed at {path}"));
                }
            }
            "move" | "copy" => {
                let from = op["from"].as_str().ok_or_else(|| format!("{name} without \"from\""))?;
                let value = if name == "move" {
                    pointer_remove(doc, from)?
                } else {
                    doc.pointer(from)
                        .cloned()
                        .ok_or_else(|| format!("copy: missing path {from}"))?
                };
                pointer_add(doc, path, value)?;
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> std::result::Result<(String, String), String> {
    let Some(idx) = path.rfind('/') else {
        return Err(format!("invalid JSON pointer {path:?}"));
    };
    let last = path[idx + 1..].replace("~1", "/").replace("~0", "~");
    Ok((path[..idx].to_string(), last))
}

fn pointer_add(doc: &mut Value, path: &str, value: Value) -> std::result::Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    let target = doc
        .pointer_mut(&parent)
        .ok_or_else(|| format!("add operation does not apply: doc is missing path: {parent}"))?;
    match target {
        Value::Object(m) => {
            m.insert(last, value);
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>().map_err(|_| format!("bad array index {last:?}"))?
            };
            if i > a.len() {
                return Err(format!(
                    "add operation does not apply: index {i} out of bounds at {path}"
                ));
            }
            a.insert(i, value);
        }
        _ => return Err(format!("add operation does not apply: {parent} is not a container")),
    }
    Ok(())
}

fn pointer_remove(doc: &mut Value, path: &str) -> std::result::Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    let missing = || format!("remove operation does not apply: doc is missing path: {path}");
    match doc.pointer_mut(&parent).ok_or_else(missing)? {
        Value::Object(m) => m.remove(&last).ok_or_else(missing),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() { Ok(a.remove(i)) } else { Err(missing()) }
        }
        _ => Err(missing()),
    }
}

/// A parsed `fieldSelector` + `labelSelector`.
#[derive(Default, Clone)]
struct Selector {
    /// (field path, equal?, value); `metadata.name` and `metadata.namespace`.
    fields: Vec<(String, bool, String)>,
    /// (key, operator, values) with operators `=`, `!=`, `in`, `notin`, `exists`, `!exists`.
    labels: Vec<(String, String, Vec<String>)>,
}

impl Selector {
    fn parse(fields: Option<&str>, labels: Option<&str>) -> std::result::Result<Selector, String> {
        let mut sel = Selector::default();
        for term in fields.unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, eq, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            if k != "metadata.name" && k != "metadata.namespace" {
                return Err(format!("field label not supported: {k}"));
            }
            sel.fields.push((k.to_string(), eq, v.to_string()));
        }
        let labels = labels.unwrap_or("");
        let mut terms = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in labels.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    terms.push(&labels[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        terms.push(&labels[start..]);
        for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
            let set = |rest: &str| -> Vec<String> {
                rest.trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect()
            };
            let parsed = if let Some((k, v)) = term.split_once(" notin ") {
                (k.trim(), "notin", set(v))
            } else if let Some((k, v)) = term.split_once(" in ") {
                (k.trim(), "in", set(v))
            } else if let Some((k, v)) = term.split_once("!=") {
                (k.trim(), "!=", vec![v.trim().to_string()])
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k.trim(), "=", vec![v.trim().to_string()])
            } else if let Some(k) = term.strip_prefix('!') {
                (k.trim(), "!exists", vec![])
            } else {
                (term, "exists", vec![])
            };
            sel.labels.push((parsed.0.to_string(), parsed.1.to_string(), parsed.2));
        }
        Ok(sel)
    }

    fn matches(&self, obj: &Value) -> bool {
        let fields_ok = self.fields.iter().all(|(k, eq, v)| {
            let actual = match k.as_str() {
                "metadata.name" => obj["metadata"]["name"].as_str(),
                _ => obj["metadata"]["namespace"].as_str(),
            };
            (actual == Some(v.as_str())) == *eq
        });
        let labels = &obj["metadata"]["labels"];
        fields_ok
            && self.labels.iter().all(|(k, op, vals)| {
                let actual = labels.get(k).and_then(Value::as_str);
                match op.as_str() {
                    "=" | "in" => actual.is_some_and(|a| vals.iter().any(|v| v == a)),
                    "!=" | "notin" => actual.is_none_or(|a| vals.iter().all(|v| v != a)),
                    "exists" => actual.is_some(),
                    _ => actual.is_none(),
                }
            })
    }
}
