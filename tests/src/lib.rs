//! Shared fixture and assertions of the end-to-end tests: one real stack (registry, recorder,
//! Envoy) per test binary, tests serialised on it so the recorder's contents belong to exactly
//! one test, and the checks every refusal makes (status, OCI error body, challenge, nothing sent
//! upstream).

pub mod breaker;
pub mod xds;

use connector_devkit::http::{Request, Response};
use connector_devkit::stack::Stack;
use connector_devkit::token_stack::TokenStack;
use std::sync::{Mutex, MutexGuard, OnceLock};

pub use connector_devkit::stack::{CONNECTOR_NAME, CONNECTOR_NAMESPACE, REPO, TAG};

/// A scenario a test file shares: how to start it, what to clear between tests, and what to
/// check after each one.
pub trait Fixture: Sized + Send + Sync {
    fn start(label: &str, with_filter: bool) -> Result<Self, String>;
    /// Clears what the previous test left behind (recorded traffic, test switches).
    fn reset(&self);
    /// Secrets in Envoy's log or config dump and `[critical]` wasm lines; empty means clean.
    fn hygiene_problems(&self) -> Result<Vec<String>, String>;
}

impl Fixture for Stack {
    fn start(label: &str, with_filter: bool) -> Result<Self, String> {
        Stack::start(label, with_filter)
    }

    fn reset(&self) {
        self.recorder.take();
    }

    fn hygiene_problems(&self) -> Result<Vec<String>, String> {
        self.envoy_hygiene_problems()
    }
}

impl Fixture for TokenStack {
    fn start(label: &str, with_filter: bool) -> Result<Self, String> {
        TokenStack::start(label, with_filter)
    }

    /// Also restores the token server's defaults and clears its request log.
    fn reset(&self) {
        self.token_server.reset();
        self.token_server.take();
        self.recorder.take();
    }

    fn hygiene_problems(&self) -> Result<Vec<String>, String> {
        self.envoy_hygiene_problems()
    }
}

/// A stack shared by the tests of one file. Starting it once per binary keeps the process count
/// low on a 2-core machine; the lock keeps each test's upstream traffic its own.
pub struct SharedFixture<S> {
    label: &'static str,
    with_filter: bool,
    stack: OnceLock<Result<S, String>>,
    lock: Mutex<()>,
}

/// The htpasswd-upstream scenario ([`Stack`]).
pub type Shared = SharedFixture<Stack>;
/// The token-auth scenario ([`TokenStack`]).
pub type SharedTokenStack = SharedFixture<TokenStack>;

impl<S: Fixture> SharedFixture<S> {
    pub const fn new(label: &'static str, with_filter: bool) -> Self {
        Self {
            label,
            with_filter,
            stack: OnceLock::new(),
            lock: Mutex::new(()),
        }
    }

    /// Runs `test` with exclusive use of the stack, then checks Envoy's hygiene: no secret in its
    /// log or config dump and no `[critical]` wasm line. The last test of a file to run thereby
    /// checks everything the whole file did.
    pub fn run(&self, test: impl FnOnce(&S)) {
        // A failed test poisons the lock; the next one may still use the stack.
        let _turn: MutexGuard<'_, ()> = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let stack = match self.stack.get_or_init(|| S::start(self.label, self.with_filter)) {
            Ok(s) => s,
            Err(e) => panic!("could not start the test stack {}: {e}", self.label),
        };
        stack.reset();
        test(stack);
        let problems = stack.hygiene_problems().unwrap_or_else(|e| vec![e]);
        assert!(
            problems.is_empty(),
            "Envoy hygiene after the test:\n{}",
            problems.join("\n")
        );
    }
}

/// `tests/testdata/<name>.go` (a client only Go's standard library has: request trailers,
/// net/http's redirect rules), built into `work` with the Go toolchain set-up installs.
pub fn go_client(work: &connector_devkit::WorkDir, name: &str) -> std::path::PathBuf {
    let bin = work.sub("go").unwrap().join(name);
    let src = connector_devkit::repo_root().join(format!("tests/testdata/{name}.go"));
    let out = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(&src)
        .env("GOFLAGS", "-mod=mod")
        .output()
        .unwrap_or_else(|e| panic!("go build (the Go toolchain comes with scripts/setup.sh): {e}"));
    assert!(
        out.status.success(),
        "go build {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// A test-only module of the workspace's (`package`, built as `<package with _>.wasm`) next to
/// the filter's release module: the trapping one, the do-nothing one. `make test` builds them.
pub fn test_module(package: &str) -> std::path::PathBuf {
    let file = format!("{}.wasm", package.replace('-', "_"));
    let p = connector_devkit::wasm_path().with_file_name(file);
    assert!(
        p.is_file(),
        "{} is missing: cargo build -p {package} --target wasm32-wasip1 --release",
        p.display()
    );
    p
}

/// `/v2/namespaces/<ns>/connectors/<name>/<rest>`.
pub fn path_form(ns: &str, name: &str, rest: &str) -> String {
    format!("/v2/namespaces/{ns}/connectors/{name}/{rest}")
}

/// The manifest of the sample image, path form.
pub fn manifest_path() -> String {
    path_form(CONNECTOR_NAMESPACE, CONNECTOR_NAME, &format!("{REPO}/manifests/{TAG}"))
}

/// `Authorization: Basic base64(sa:<jwt>)`, as `skopeo --creds sa:<jwt>` sends it.
pub fn with_token(req: Request, jwt: &str) -> Request {
    req.basic("sa", jwt)
}

/// `n` GETs of `path` sent at once to the proxy on `port`, each on its own connection: half
/// log in with Basic `sa:<jwt>` (skopeo, buildah), half send the JWT as Bearer (scripts). The
/// answers in the order the clients were started.
pub fn concurrent_gets(port: u16, path: &str, accept: &str, jwt: &str, n: usize) -> Vec<Response> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                scope.spawn(move || {
                    let req = Request::get(path).header("Accept", accept);
                    let req = if i % 2 == 0 {
                        req.basic("sa", jwt)
                    } else {
                        req.bearer(jwt)
                    };
                    req.send(port).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The single error of an OCI error body: `{"errors":[{"code":..,"message":..}]}`.
pub fn oci_error(resp: &Response) -> (String, String) {
    let body = resp
        .json()
        .unwrap_or_else(|e| panic!("refusal body is not JSON: {e}; response: {}", resp.summary()));
    let err = &body["errors"][0];
    let code = err["code"].as_str();
    let message = err["message"].as_str();
    match (code, message) {
        (Some(c), Some(m)) => (c.to_string(), m.to_string()),
        _ => panic!(
            "refusal body is not an OCI error {{\"errors\":[{{\"code\",\"message\"}}]}}: {}",
            resp.summary()
        ),
    }
}

/// What a refusal must look like.
pub struct Refusal<'a> {
    /// Acceptable statuses (usually one).
    pub statuses: &'a [u16],
    /// Acceptable OCI error codes.
    pub codes: &'a [&'a str],
    /// The message must mention one of these (case-insensitive): it names the failed check.
    pub mentions: &'a [&'a str],
}

pub const UNAUTHORIZED: &[&str] = &["UNAUTHORIZED"];

/// Sends `req` through Envoy and asserts the refusal: status, OCI error body naming the failed
/// check, a Basic challenge on 401, and that the upstream received not one byte meanwhile.
pub fn assert_refused(stack: &Stack, what: &str, req: Request, r: Refusal<'_>) -> Response {
    stack.recorder.take();
    let resp = req
        .send(stack.envoy.port)
        .unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    let upstream = stack.recorder.take();
    assert!(
        r.statuses.contains(&resp.status),
        "{what}: expected status {:?}, got {}",
        r.statuses,
        resp.summary()
    );
    let (code, message) = oci_error(&resp);
    assert!(
        r.codes.contains(&code.as_str()),
        "{what}: expected OCI error code in {:?}, got {code:?} ({message:?})",
        r.codes
    );
    let lower = message.to_lowercase();
    assert!(
        r.mentions.iter().any(|m| lower.contains(&m.to_lowercase())),
        "{what}: the error message should name the failed check (one of {:?}), got {message:?}",
        r.mentions
    );
    if resp.status == 401 {
        let challenge = resp.header("www-authenticate").unwrap_or("");
        assert!(
            challenge.starts_with("Basic ") && challenge.contains("realm=\"oci-connector\""),
            "{what}: a 401 must challenge with Basic realm=\"oci-connector\", got {challenge:?}"
        );
    }
    assert!(
        upstream.is_empty(),
        "{what}: the upstream must receive nothing for a refused request, it received {} request(s): {:?}",
        upstream.requests,
        upstream.request_lines()
    );
    resp
}
