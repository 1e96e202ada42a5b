//! Attack suite, hostile upstream and data-path leaks (issue 12, items 1-3): an upstream that
//! echoes what it is sent, sends clients elsewhere, or sets cookies, and clients that try methods
//! the distribution API does not define. Each case asserts the safe outcome and what reached the
//! upstream. Real controller (file mode), real Envoy, real curl for HTTP/2 and redirects; the
//! hostile upstream is `connector_e2e::breaker` (no real registry echoes credentials on demand).

use std::process::Command;
use std::sync::OnceLock;

use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::http::{Request, Response, basic_value};
use connector_e2e::breaker::{Answer, Breaker};
use connector_e2e::oci_error;
use connector_e2e::xds::{NS, Setup, connector_yaml, put, secret_yaml, setup, start_stack};

const PREFIX: &str = "/v2/namespaces/demo/connectors/echo/lib/app";
const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn full(status: &str, extra_headers: &str, body: &str) -> Answer {
    Answer::Full(format!(
        "HTTP/1.1 {status}\r\n{extra_headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
}

/// The hostile upstream: challenges with Basic, then per path echoes, redirects, sets cookies.
/// Plain HTTP (a hand-written [`Breaker`]): its hostile answers are the test, not its transport.
fn hostile(elsewhere: u16, storage: u16) -> Breaker {
    Breaker::start(move |method, path, head| {
        let auth_line = head
            .split("\r\n")
            .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
            .unwrap_or("")
            .to_string();
        let echo = head.replace("\r\n", "\n").replace('"', "'");
        match (method, path) {
            ("GET", "/v2/") => full(
                "401 Unauthorized",
                "WWW-Authenticate: Basic realm=\"hostile\"\r\nDocker-Distribution-Api-Version: registry/2.0\r\n",
                "{}",
            ),
            (_, p) if p.ends_with("/manifests/echo-error") => full(
                "400 Bad Request",
                "",
                &format!("{{\"errors\":[{{\"code\":\"MANIFEST_INVALID\",\"message\":\"{echo}\"}}]}}"),
            ),
            (_, p) if p.ends_with("/manifests/echo-header") => {
                full("200 OK", &format!("X-Debug: {auth_line}\r\n"), "{}")
            }
            // The request's Authorization URL-encoded into an error page (the base64's `=`
            // padding becomes `%3D`).
            (_, p) if p.ends_with("/manifests/echo-urlencoded") => full(
                "400 Bad Request",
                "",
                &format!(
                    "{{\"errors\":[{{\"code\":\"MANIFEST_INVALID\",\"detail\":\"{}\"}}]}}",
                    percent_encoded(&auth_line, false)
                ),
            ),
            // The password in an error message as Go's `encoding/json` writes it (`&`, `<`, `>`
            // as `\u0026`, `\u003c`, `\u003e`), as a header value escaped by Go's
            // `html/template` (`+` as `&#43;`), and URL-encoded with lowercase hex.
            (_, p) if p.ends_with("/manifests/echo-go-json") => full(
                "400 Bad Request",
                "",
                &format!(
                    "{{\"errors\":[{{\"code\":\"DENIED\",\"message\":{}}}]}}",
                    go_json(&format!("bad password {}", password_of(&auth_line)))
                ),
            ),
            (_, p) if p.ends_with("/manifests/echo-html-header") => full(
                "200 OK",
                &format!("X-Debug: <b>{}</b>\r\n", html_escaped(&password_of(&auth_line))),
                "{}",
            ),
            (_, p) if p.ends_with("/manifests/echo-urlencoded-lower") => full(
                "400 Bad Request",
                "",
                &format!(
                    "{{\"errors\":[{{\"code\":\"DENIED\",\"detail\":\"{}\"}}]}}",
                    percent_encoded(&auth_line, true)
                ),
            ),
            // Two redirects in one answer: storage under another name, then the proxy's host
            // name at the storage's port.
            (_, p) if p.ends_with("/manifests/two-locations") => full(
                "307 Temporary Redirect",
                &format!(
                    "Location: http://localhost:{storage}/bucket/a\r\nLocation: http://127.0.0.1:{storage}/bucket/b\r\n"
                ),
                "",
            ),
            // A tag list whose next page is on the proxy's host name at another port (crane
            // asks with `?n=1000`).
            ("GET", p) if p.contains("/tags/list") => full(
                "200 OK",
                &format!("Link: <http://127.0.0.1:{storage}/v2/lib/app/tags/list?last=a>; rel=\"next\"\r\n"),
                r#"{"name":"lib/app","tags":["a"]}"#,
            ),
            // The password as a header's *name* (URL-safe base64, as the test's, is all name
            // characters); Envoy passes names on lowercased.
            (_, p) if p.ends_with("/manifests/echo-header-name") => {
                full("200 OK", &format!("X-Echo-{}: 1\r\n", password_of(&auth_line)), "{}")
            }
            // The credential in an error body compressed as a front proxy would for a client
            // that accepts gzip (every Go client does, unasked).
            (_, p) if p.ends_with("/manifests/echo-gzip") => {
                let body = gzip(&format!(
                    "{{\"errors\":[{{\"code\":\"MANIFEST_INVALID\",\"message\":\"{echo}\"}}]}}"
                ));
                let mut answer = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n\
                     Content-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                answer.extend_from_slice(&body);
                Answer::Bytes(answer)
            }
            // The credential in a trailer, after a clean head and body.
            (_, p) if p.ends_with("/manifests/echo-trailer") => Answer::Full(format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
                 Trailer: X-Debug\r\n\r\n2\r\n{{}}\r\n0\r\nX-Debug: {auth_line}\r\n\r\n"
            )),
            // The credential in an informational (1xx) answer's headers, before a clean 200.
            (_, p) if p.ends_with("/manifests/echo-early-hints") => Answer::Full(format!(
                "HTTP/1.1 103 Early Hints\r\nX-Debug: {auth_line}\r\n\r\nHTTP/1.1 102 Processing\r\n\
                 X-Debug: {auth_line}\r\n\r\nHTTP/1.1 100 Continue\r\nX-Debug: {auth_line}\r\n\r\n\
                 HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
            )),
            // The credential as the status line's reason phrase, with a clean body.
            (_, p) if p.ends_with("/manifests/echo-reason") => full(
                &format!("404 {auth_line}"),
                "",
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
            ),
            (_, p) if p.ends_with("/manifests/unavailable") => full(
                "503 Service Unavailable",
                "",
                r#"{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}"#,
            ),
            (_, p) if p.ends_with("/manifests/cookie") => full(
                "200 OK",
                "Set-Cookie: session=upstream-session; Path=/\r\nSet-Cookie: other=1\r\n\
                 Alt-Svc: h2=\"elsewhere.example:443\"; ma=86400\r\n",
                "{}",
            ),
            ("POST", p) if p.ends_with("/blobs/uploads/") => full(
                "202 Accepted",
                &format!(
                    "Location: http://127.0.0.1:{elsewhere}/v2/lib/app/blobs/uploads/u-1?_state=s\r\nDocker-Upload-UUID: u-1\r\n"
                ),
                "",
            ),
            // An image whose config blob redirects to the proxy's own host name (127.0.0.1, as
            // the client reaches the proxy) at the storage's port: a Go client would follow it
            // with the credential it gave the proxy.
            ("GET", "/v2/lib/redir/manifests/v1") => Answer::Full(format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                 Content-Length: {}\r\n\r\n{REDIR_MANIFEST}",
                REDIR_MANIFEST.len()
            )),
            ("GET", p) if p.starts_with("/v2/lib/redir/blobs/sha256:") => full(
                "307 Temporary Redirect",
                &format!("Location: http://127.0.0.1:{storage}/bucket/config\r\n"),
                "",
            ),
            // Storage under another host name than the proxy's (`localhost`): clients follow
            // without credentials.
            ("GET", p) if p.contains("/blobs/sha256:") => full(
                "307 Temporary Redirect",
                &format!("Location: http://localhost:{storage}/bucket/blob?X-Amz-Signature=sig\r\n"),
                "",
            ),
            // Anything else: the whole request echoed back, as a TRACE-happy server would.
            _ => full("200 OK", "", &format!("{{\"echo\":\"{echo}\"}}")),
        }
    })
}

/// The manifest of `lib/redir:v1`, whose config blob the hostile upstream redirects.
const REDIR_MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":10},"layers":[]}"#;

/// `text` percent-encoded as a form value (all but letters, digits and `-._~`), the hex
/// digits in upper case as most encoders write them (`%2B`), or in lower case (`%2b`), which
/// RFC 3986 allows and some write.
fn percent_encoded(text: &str, lower: bool) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ if lower => format!("%{b:02x}"),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `text` as a JSON string the way Go's `encoding/json` writes it: HTML's `<`, `>` and `&`
/// escaped as `\u003c`, `\u003e` and `\u0026` (Go's default, `SetEscapeHTML(true)`).
fn go_json(text: &str) -> String {
    serde_json::to_string(text)
        .unwrap()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// `text` as Go's `html/template` writes it into HTML: `&`, `<`, `>`, quotes and `+` as
/// character references (`+` is `&#43;`).
fn html_escaped(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&#34;".to_string(),
            '\'' => "&#39;".to_string(),
            '+' => "&#43;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// The password of an `Authorization: Basic ...` line (empty for anything else).
fn password_of(auth_line: &str) -> String {
    use base64::Engine;
    let b64 = auth_line.rsplit(' ').next().unwrap_or_default();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&decoded).into_owned();
    text.split_once(':').map(|(_, p)| p.to_string()).unwrap_or_default()
}

/// `text` compressed by Debian's `gzip`.
fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("gzip: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("gzip stdin: {e}"));
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("gzip: {e}"));
    assert!(out.status.success(), "gzip failed");
    out.stdout
}

struct World {
    /// Kept for its registry and work directory.
    _s: Setup,
    _controller: Controller,
    envoy: Envoy,
    upstream: Breaker,
    elsewhere: Breaker,
    storage: Breaker,
    token: String,
    password: String,
}

/// The password of the `escaped` connector: characters Go's JSON encoder, `html/template` and
/// URL encoding each escape, and a base64 (`cm9ib3QyOlMzYyZyPGU+dCvDqX4/cHc=`) with `+` and `/`.
const SPECIAL_PASSWORD: &str = "S3c&r<e>t+\u{e9}~?pw";

/// The CA the proxy's certificate chains to (curl's `--cacert`).
fn proxy_ca(w: &World) -> String {
    connector_devkit::http::tls_ca(w.envoy.port)
        .expect("the proxy speaks TLS")
        .display()
        .to_string()
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let s = setup("attacks-upstream");
        let elsewhere = Breaker::start(|_, _, _| full("200 OK", "", "{}"));
        let storage = Breaker::start(|_, _, _| full("200 OK", "", "blob-bytes"));
        let upstream = hostile(elsewhere.port, storage.port);
        let creds = s.registry.credentials.clone().unwrap();
        put(&s.manifests, "secret.yaml", &secret_yaml("robot", &creds));
        put(
            &s.manifests,
            "echo.yaml",
            &connector_yaml("echo", &upstream.url(), "robot"),
        );
        // The same upstream through a Connector that serves pulls only.
        let read_only = connector_yaml("readonly", &upstream.url(), "robot") + "  readOnly: true\n";
        put(&s.manifests, "readonly.yaml", &read_only);
        // And through one whose password escapes.
        let special = connector_devkit::registry::Credentials {
            username: "robot2".into(),
            password: SPECIAL_PASSWORD.into(),
        };
        put(&s.manifests, "special.yaml", &secret_yaml("special", &special));
        put(
            &s.manifests,
            "escaped.yaml",
            &connector_yaml("escaped", &upstream.url(), "special"),
        );
        let (controller, envoy) = start_stack(&s, &[]);
        let token = s.minter.valid(NS, "default").unwrap();
        World {
            password: creds.password.clone(),
            _s: s,
            _controller: controller,
            envoy,
            upstream,
            elsewhere,
            storage,
            token,
        }
    })
}

/// Tests share one stack; the hostile peers' logs are read per test, so one test at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    fn secrets(&self) -> Vec<String> {
        let basic = basic_value("robot", &self.password);
        let special = basic_value("robot2", SPECIAL_PASSWORD);
        vec![
            self.password.clone(),
            basic.trim_start_matches("Basic ").to_string(),
            self.token.clone(),
            SPECIAL_PASSWORD.to_string(),
            special.trim_start_matches("Basic ").to_string(),
        ]
    }

    fn assert_no_secret(&self, what: &str, text: &str) {
        for s in self.secrets() {
            assert!(!text.contains(&s), "{what} carries a secret: {text}");
        }
    }

    /// What curl printed (`curl_get`) is a 502 saying `message`, with no secret in it.
    fn assert_refused(&self, what: &str, text: &str, message: &str) {
        assert!(text.contains(" 502"), "{what}: {text}");
        assert!(text.contains(message), "{what}: {text}");
        self.assert_no_secret(what, text);
    }

    /// curl `-v` GETting `path` with the client's token and `args` (protocol, `--compressed`):
    /// what it printed of the answer (`-i`), then every head it received (`-v`'s `<` lines,
    /// informational ones included). Its own request (`>` and `*` lines, the client's token)
    /// is left out.
    fn curl_get(&self, args: &[&str], path: &str) -> String {
        let out = Command::new("curl")
            .args(["-s", "-i", "-v", "--cacert", &proxy_ca(self)])
            .args(args)
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.token))
            .arg(format!("{}{path}", self.envoy.base_url()))
            .output()
            .unwrap();
        let received: Vec<&str> = std::str::from_utf8(&out.stderr)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("< "))
            .collect();
        format!("{}\n{}", String::from_utf8_lossy(&out.stdout), received.join("\n"))
    }

    /// The upstream's last request carried the connector's credential, so its answer could
    /// echo it: what makes an echo test able to fail.
    fn assert_upstream_got_the_credential(&self) {
        let basic = basic_value("robot", &self.password);
        assert!(
            self.upstream.heads().last().is_some_and(|h| h.contains(&basic)),
            "the upstream got the connector's credential (so it could echo it)"
        );
    }

    fn send(&self, method: &str, path: &str) -> Response {
        Request::new(method, path)
            .bearer(&self.token)
            .send(self.envoy.port)
            .unwrap()
    }

    /// Makes sure the connector's challenge is learned, so later requests go straight upstream.
    fn warm(&self) {
        let r = self.send("GET", &format!("{PREFIX}/manifests/warm"));
        assert_eq!(r.status, 200, "{}", r.summary());
    }
}

fn response_text(r: &Response) -> String {
    let headers: Vec<String> = r.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{}\n{}", headers.join("\n"), r.body_text())
}

#[test]
fn methods_the_api_does_not_define_get_405_and_reach_nothing_http1() {
    let _t = serial();
    let w = world();
    w.warm();
    let before = w.upstream.heads().len();
    for (method, path) in [
        ("TRACE", format!("{PREFIX}/manifests/v1")),
        ("PROPFIND", format!("{PREFIX}/manifests/v1")),
        ("OPTIONS", format!("{PREFIX}/blobs/{DIGEST}")),
        ("POST", format!("{PREFIX}/manifests/v1")),
        ("PUT", format!("{PREFIX}/tags/list")),
        ("DELETE", "/v2/".to_string()),
        (
            "TRACE",
            "/v2/namespaces/demo/connectors/nope/lib/app/manifests/v1".to_string(),
        ),
    ] {
        let r = w.send(method, &path);
        assert_eq!(r.status, 405, "{method} {path}: {}", r.summary());
        let (code, message) = oci_error(&r);
        assert_eq!(code, "UNSUPPORTED", "{message}");
        assert!(message.contains(method), "{message}");
        assert!(r.header("allow").is_some(), "{method} {path}: no Allow header");
        w.assert_no_secret(method, &response_text(&r));
    }
    assert_eq!(
        w.upstream.heads().len(),
        before,
        "a refused method reached the upstream"
    );
}

#[test]
fn methods_the_api_does_not_define_get_405_over_h2() {
    let _t = serial();
    let w = world();
    w.warm();
    let before = w.upstream.heads().len();
    for method in ["TRACE", "PROPFIND", "OPTIONS"] {
        let url = format!("{}{PREFIX}/manifests/v1", w.envoy.base_url());
        let out = Command::new("curl")
            .args(["-s", "-i", "--http2", "--cacert", &proxy_ca(w), "-X", method, "-H"])
            .arg(format!("Authorization: Bearer {}", w.token))
            .arg(&url)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.starts_with("HTTP/2 405"), "{method} over h2: {text}");
        assert!(text.contains("UNSUPPORTED"), "{text}");
        w.assert_no_secret(method, &text);
    }
    assert_eq!(
        w.upstream.heads().len(),
        before,
        "a refused method reached the upstream over h2"
    );
}

#[test]
fn an_upstream_that_echoes_the_credential_is_withheld() {
    let _t = serial();
    let w = world();
    w.warm();
    // An echoing error body is replaced (the upstream's status stays: its head has gone on); an
    // echoing header replaces the whole answer with 502.
    for (what, tag, status) in [
        ("error body", "echo-error", 400),
        ("URL-encoded error body", "echo-urlencoded", 400),
        ("response header", "echo-header", 502),
    ] {
        let before = w.upstream.heads().len();
        let r = w.send("GET", &format!("{PREFIX}/manifests/{tag}"));
        let seen = w.upstream.heads();
        assert!(seen.len() > before, "{what}: the request was forwarded");
        let basic = basic_value("robot", &w.password);
        assert!(
            seen.last().unwrap().contains(&basic),
            "{what}: the upstream got the connector's credential (so it could echo it)"
        );
        assert_eq!(r.status, status, "{what}: {}", r.summary());
        let (code, message) = oci_error(&r);
        assert_eq!(code, "UNAVAILABLE");
        assert!(message.contains("repeated the connector's credential"), "{message}");
        w.assert_no_secret(what, &response_text(&r));
    }
}

/// Echoes with the escapes real encoders put on a password: Go's `encoding/json` (what every
/// Go registry's error JSON goes through) writes `&`, `<`, `>` as `\u0026`..., Go's
/// `html/template` writes `+` as `&#43;`, and a URL-encoding with lowercase hex breaks the
/// base64 at `+` and `/` as `%2b` and `%2f`. (Through the module before, the first of them,
/// the Go JSON body, already reached the client.)
#[test]
fn a_credential_echoed_with_escapes_never_reaches_the_client() {
    let _t = serial();
    let w = world();
    let basic = basic_value("robot2", SPECIAL_PASSWORD);
    let escaped_forms = [
        go_json(SPECIAL_PASSWORD).trim_matches('"').to_string(),
        html_escaped(SPECIAL_PASSWORD),
        percent_encoded(&basic, true),
    ];
    for (what, tag, status) in [
        ("Go JSON error body", "echo-go-json", 400),
        ("HTML-escaped header", "echo-html-header", 502),
        ("lowercase URL-encoded error body", "echo-urlencoded-lower", 400),
    ] {
        let path = format!("/v2/namespaces/demo/connectors/escaped/lib/app/manifests/{tag}");
        let r = w.send("GET", &path);
        assert!(
            w.upstream.heads().last().is_some_and(|h| h.contains(&basic)),
            "{what}: the upstream got the connector's credential (so it could echo it)"
        );
        assert_eq!(r.status, status, "{what}: {}", r.summary());
        let (code, message) = oci_error(&r);
        assert_eq!(code, "UNAVAILABLE", "{what}");
        assert!(
            message.contains("repeated the connector's credential"),
            "{what}: {message}"
        );
        let text = response_text(&r);
        w.assert_no_secret(what, &text);
        for form in &escaped_forms {
            assert!(!text.contains(form.as_str()), "{what}: {form} arrived: {text}");
        }
    }
}

/// An upstream that puts the password into a header's name: Envoy lowercases the name, which
/// leaves little of a mixed-case password to guess, so the answer is withheld as for a value.
/// (Through the module before, the lowercased password reached the client as a header name.)
#[test]
fn a_credential_echoed_as_a_header_name_never_reaches_the_client() {
    let _t = serial();
    let w = world();
    w.warm();
    let lower = w.password.to_ascii_lowercase();
    for (what, args) in [("HTTP/1.1", &["--http1.1"][..]), ("h2", &["--http2"][..])] {
        let text = w.curl_get(args, &format!("{PREFIX}/manifests/echo-header-name"));
        w.assert_upstream_got_the_credential();
        assert!(text.contains("502"), "{what}: {text}");
        assert!(text.contains("repeated the connector's credential"), "{what}: {text}");
        assert!(
            !text.to_ascii_lowercase().contains(&lower),
            "{what}: the password arrived: {text}"
        );
        w.assert_no_secret(what, &text);
    }
}

/// An error body the filter cannot read as sent is not passed on: the client keeps the status
/// and gets the proxy's own JSON, never the upstream's body decoded.
#[test]
fn a_credential_echoed_in_a_gzipped_error_body_never_reaches_the_client() {
    let _t = serial();
    let w = world();
    w.warm();
    let text = w.curl_get(&["--compressed", "--http2"], &format!("{PREFIX}/manifests/echo-gzip"));
    w.assert_upstream_got_the_credential();
    w.assert_no_secret("a gzip'd error body, decoded by curl", &text);
    assert!(text.starts_with("HTTP/2 400"), "the upstream's status stays: {text}");
    assert!(!text.to_ascii_lowercase().contains("content-encoding"), "{text}");
    assert!(text.contains("encoded as"), "{text}");
}

/// The controller's upstream clusters speak HTTP/1.1 without trailers, so Envoy drops an
/// upstream's trailers before the filter sees them; where they do pass (an HTTP/2 upstream), the
/// filter removes the echoing ones (upstream_trailers.rs).
#[test]
fn a_credential_echoed_in_a_trailer_never_reaches_the_client() {
    let _t = serial();
    let w = world();
    w.warm();
    let path = format!("{PREFIX}/manifests/echo-trailer");
    let r = w.send("GET", &path);
    assert_eq!(r.status, 200, "{}", r.summary());
    w.assert_upstream_got_the_credential();
    w.assert_no_secret("HTTP/1.1 answer with an echoing trailer", &response_text(&r));
    let text = w.curl_get(&["--http2"], &path);
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    w.assert_no_secret("h2 answer with an echoing trailer", &text);
}

/// Envoy does not hand an upstream's informational answers to wasm filters, so the filter
/// cannot check their headers: they must not reach the client at all.
#[test]
fn a_credential_echoed_in_an_informational_answer_never_reaches_the_client() {
    let _t = serial();
    let w = world();
    w.warm();
    let path = format!("{PREFIX}/manifests/echo-early-hints");
    let r = w.send("GET", &path);
    assert_eq!(r.status, 200, "{}", r.summary());
    w.assert_upstream_got_the_credential();
    w.assert_no_secret("HTTP/1.1 answer after 1xx answers", &response_text(&r));
    for protocol in ["--http2", "--http1.1"] {
        let text = w.curl_get(&[protocol], &path);
        assert!(text.contains(" 200"), "{protocol}: {text}");
        w.assert_no_secret(protocol, &text);
    }
}

/// The filter never sees an upstream's reason phrase (proxy-wasm shows `:status` only): Envoy
/// must not pass it on, over HTTP/1.1 (which has one) or h2 (which has none).
#[test]
fn a_credential_echoed_in_a_reason_phrase_never_reaches_the_client() {
    let _t = serial();
    let w = world();
    w.warm();
    let path = format!("{PREFIX}/manifests/echo-reason");
    for protocol in ["--http1.1", "--http2"] {
        let text = w.curl_get(&[protocol], &path);
        w.assert_upstream_got_the_credential();
        assert!(text.contains(" 404"), "{protocol}: {text}");
        assert!(
            text.contains("MANIFEST_UNKNOWN"),
            "{protocol}: the clean body passes: {text}"
        );
        w.assert_no_secret(protocol, &text);
    }
}

#[test]
fn an_upload_location_on_another_host_is_refused_and_nothing_goes_there() {
    let _t = serial();
    let w = world();
    w.warm();
    let r = w.send("POST", &format!("{PREFIX}/blobs/uploads/"));
    assert_eq!(r.status, 502, "{}", r.summary());
    assert!(
        r.header("location").is_none(),
        "the off-origin Location reached the client"
    );
    let (_, message) = oci_error(&r);
    assert!(message.contains("upload Location outside"), "{message}");
    assert!(w.elsewhere.heads().is_empty(), "something was sent to the other host");
}

#[test]
fn a_blob_redirect_to_storage_still_works_and_carries_no_credential() {
    let _t = serial();
    let w = world();
    w.warm();
    let r = w.send("GET", &format!("{PREFIX}/blobs/{DIGEST}"));
    assert_eq!(r.status, 307, "{}", r.summary());
    let location = r.header("location").unwrap_or_default().to_string();
    assert!(
        location.starts_with(&format!("http://localhost:{}/bucket/blob", w.storage.port)),
        "the storage redirect passes untouched: {location}"
    );
    // A real client follows it: curl drops the Authorization header for another host.
    let url = format!("{}{PREFIX}/blobs/{DIGEST}", w.envoy.base_url());
    let out = Command::new("curl")
        .args(["-s", "-L", "--cacert", &proxy_ca(w), "-H"])
        .arg(format!("Authorization: Bearer {}", w.token))
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "blob-bytes");
    let heads = w.storage.heads();
    assert!(!heads.is_empty(), "the storage host was reached");
    for h in heads {
        assert!(
            !h.to_ascii_lowercase().contains("authorization:"),
            "credential at storage: {h}"
        );
        w.assert_no_secret("storage request", &h);
    }
}

/// A redirect to the proxy's own host name at another port (a NodePort, any listener on the
/// node's address) would take the client's token there: Go's net/http, which containerd,
/// CRI-O, skopeo and podman use, copies `Authorization` to a redirect on the same host name
/// whatever the port (since Go 1.2x; the machine's skopeo 1.9.3 is built with an older Go that
/// did not). The proxy refuses it, and nothing reaches that port. (Through the module before, a
/// client built with today's Go followed it and the listener got the client's token.)
#[test]
fn a_redirect_to_another_port_on_the_proxys_host_is_refused_and_the_token_stays() {
    let _t = serial();
    let w = world();
    w.warm();
    let before = w.storage.heads().len();
    let path = format!("/v2/namespaces/demo/connectors/echo/lib/redir/blobs/{DIGEST}");
    let out = Command::new(connector_e2e::go_client(&w._s.work, "redirect-client"))
        .arg(format!("{}{path}", w.envoy.base_url()))
        .arg(&w.token)
        .arg(proxy_ca(w))
        .output()
        .unwrap_or_else(|e| panic!("redirect-client: {e}"));
    let reached: Vec<String> = w.storage.heads().into_iter().skip(before).collect();
    assert!(reached.is_empty(), "the redirect's target was reached: {reached:?}");
    let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        status,
        "502",
        "redirect-client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A registry client pulling the image hits the same refusal.
    let reference = format!(
        "docker://{}/namespaces/demo/connectors/echo/lib/redir:v1",
        w.envoy.authority()
    );
    let pull =
        w._s.skopeo
            .inspect(
                &reference,
                connector_devkit::skopeo::Creds::Basic("sa", &w.token),
                false,
            )
            .unwrap();
    assert!(!pull.success && pull.stderr.contains("502"), "skopeo: {}", pull.stderr);
    assert_eq!(w.storage.heads().len(), before, "skopeo reached the redirect's target");
    // What the client is told, without following.
    let text = w.curl_get(&[], &path);
    w.assert_refused("refused redirect", &text, "on the proxy's host name but not the proxy");
}

/// Two `Location` values in one redirect: clients differ on which they follow (Go's and curl
/// the first, Java's `HttpURLConnection` the last), so the answer is refused whole rather than
/// one of them checked, and neither place is reached. (Through the module before, only the
/// first was checked and the second, on the proxy's host name at another port, passed.)
#[test]
fn a_redirect_with_two_locations_is_refused_and_neither_is_reached() {
    let _t = serial();
    let w = world();
    w.warm();
    let before = w.storage.heads().len();
    let text = w.curl_get(&["-L"], &format!("{PREFIX}/manifests/two-locations"));
    w.assert_refused("two Locations", &text, "2 Location headers");
    assert!(
        !text.to_ascii_lowercase().contains("\n< location:"),
        "a Location arrived: {text}"
    );
    assert_eq!(w.storage.heads().len(), before, "a redirect target was reached");
}

/// A tag list's `Link` to its next page on the proxy's host name at another port: a client
/// that follows it with its credential would take the token there, as with a `Location`. The
/// answer is refused and the place not reached; `crane ls` (go-containerregistry, which follows
/// `Link`) gets the refusal's message. (Through the module before, the `Link` reached the client as sent.)
#[test]
fn a_link_to_another_port_on_the_proxys_host_is_refused() {
    let _t = serial();
    let w = world();
    w.warm();
    let before = w.storage.heads().len();
    let text = w.curl_get(&[], "/v2/namespaces/demo/connectors/echo/lib/app/tags/list");
    w.assert_refused("Link", &text, "a Link on the proxy's host name but not the proxy");
    assert!(
        !text.to_ascii_lowercase().contains("\n< link:"),
        "the Link arrived: {text}"
    );
    let proxy = w.envoy.authority();
    let ca = std::path::PathBuf::from(proxy_ca(w));
    let clients = connector_devkit::oci_tools::Clients::new(&w._s.work, &[&proxy], &w.token, &ca).unwrap();
    let repo = format!("{proxy}/namespaces/demo/connectors/echo/lib/app");
    let out = clients.run("crane", &["ls", &repo], &[]).unwrap();
    assert!(
        !out.success
            && out
                .stderr
                .contains("UNAVAILABLE: the upstream registry of connector \"demo/echo\" sent a Link"),
        "crane ls: {}",
        out.stderr
    );
    assert_eq!(w.storage.heads().len(), before, "the Link's target was reached");
}

#[test]
fn upstream_cookies_and_alt_svc_are_stripped_and_client_addresses_not_passed() {
    let _t = serial();
    let w = world();
    w.warm();
    let r = Request::get(&format!("{PREFIX}/manifests/cookie"))
        .bearer(&w.token)
        .header("X-Forwarded-For", "10.9.8.7")
        .header("X-Real-IP", "10.9.8.7")
        .send(w.envoy.port)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.summary());
    assert!(
        r.header("set-cookie").is_none(),
        "an upstream cookie reached the client"
    );
    assert!(
        r.header("alt-svc").is_none(),
        "an upstream's alternative service reached the client"
    );
    let last = w.upstream.heads().pop().unwrap();
    assert!(
        !last.contains("10.9.8.7"),
        "a client-claimed address reached the upstream: {last}"
    );
}

#[test]
fn an_unsupported_authorization_is_refused_without_echoing_it() {
    let _t = serial();
    let w = world();
    let secretish = "NoSpaceCredentialValue-9f8e7d6c5b4a";
    let r = Request::get(&format!("{PREFIX}/manifests/v1"))
        .header("Authorization", secretish)
        .send(w.envoy.port)
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.summary());
    assert!(
        !response_text(&r).contains("NoSpace"),
        "the credential is echoed: {}",
        r.body_text()
    );
}

#[test]
fn envoy_log_and_config_dump_hold_no_secret() {
    let _t = serial();
    let w = world();
    let mut secrets: Vec<(String, String)> = w
        .secrets()
        .into_iter()
        .enumerate()
        .map(|(i, s)| (format!("secret #{i}"), s))
        .collect();
    secrets.push(("password".into(), w.password.clone()));
    let problems = connector_devkit::stack::envoy_problems(&w.envoy, &secrets).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn a_client_trickling_its_headers_is_cut_after_the_headers_timeout() {
    use std::io::{Read, Write};
    let _t = serial();
    let w = world();
    let mut c = connector_devkit::http::open(w.envoy.port, std::time::Duration::from_secs(30)).unwrap();
    let started = std::time::Instant::now();
    c.write_all(b"GET /v2/ HTTP/1.1\r\nHost: proxy\r\n").unwrap();
    // One more header line every second, never the blank line that ends the head.
    let mut buf = [0u8; 512];
    let mut answer = Vec::new();
    for i in 0..30 {
        if c.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).is_err() {
            break;
        }
        c.set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if !answer.is_empty() {
            break;
        }
    }
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&answer).into_owned();
    eprintln!("trickling client cut after {took:?}: {text:?}");
    assert!(
        took >= std::time::Duration::from_secs(9) && took < std::time::Duration::from_secs(16),
        "request_headers_timeout is 10 s; the connection lasted {took:?}"
    );
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[test]
fn a_read_only_connector_serves_pulls_and_refuses_writes_before_the_upstream() {
    let _t = serial();
    let w = world();
    let base = "/v2/namespaces/demo/connectors/readonly/lib/app";
    let r = w.send("GET", &format!("{base}/manifests/warm"));
    assert_eq!(r.status, 200, "a pull: {}", r.summary());
    let before = w.upstream.heads().len();
    for (method, path) in [
        ("POST", format!("{base}/blobs/uploads/")),
        ("PUT", format!("{base}/manifests/v1")),
        ("DELETE", format!("{base}/manifests/v1")),
    ] {
        let r = w.send(method, &path);
        assert_eq!(r.status, 403, "{method}: {}", r.summary());
        let (code, message) = oci_error(&r);
        assert_eq!(code, "DENIED");
        assert!(message.contains("spec.readOnly"), "{message}");
    }
    assert_eq!(
        w.upstream.heads().len(),
        before,
        "a write reached the upstream of a read-only connector"
    );
}

/// A client cannot make Envoy multiply its requests to the upstream (each with the connector's
/// credential, against a registry's rate limit every tenant shares): Envoy's retry and timeout
/// headers from a client are not honoured.
#[test]
fn a_client_asking_envoy_to_retry_reaches_the_upstream_once() {
    let _t = serial();
    let w = world();
    w.warm();
    let before = w.upstream.heads().len();
    let r = Request::get(&format!("{PREFIX}/manifests/unavailable"))
        .bearer(&w.token)
        .header("x-envoy-retry-on", "5xx,reset,retriable-status-codes")
        .header("x-envoy-retriable-status-codes", "503")
        .header("x-envoy-max-retries", "5")
        .send(w.envoy.port)
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.summary());
    let seen: Vec<String> = w.upstream.heads().into_iter().skip(before).collect();
    assert_eq!(seen.len(), 1, "the upstream got {} requests", seen.len());
    assert!(
        !seen[0].to_ascii_lowercase().contains("x-envoy-retry-on"),
        "a client's Envoy header reached the upstream: {}",
        seen[0]
    );
}
