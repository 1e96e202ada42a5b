//! JSON → [`FilterConfig`]: the structure (objects, types, required and unknown fields), then
//! the typed checks of [`super::check`], every problem of both with its path.

use serde_json::{Map, Value};

use super::check::{self, covered};
use super::walk::Walk;
use super::*;

/// A parsed document and everything wrong with it. `config` holds what could be read even when
/// there are errors (a bad value read as empty), so that a caller that checks further (the
/// filter reads the environment) can report its own findings too; it is usable only when
/// `errors` is empty.
#[derive(Debug)]
pub struct Parsed {
    pub config: FilterConfig,
    pub errors: Vec<ConfigError>,
}

/// Parses and checks a whole configuration document.
pub fn parse(json: &[u8]) -> Parsed {
    let doc: Value = match serde_json::from_slice(json) {
        Ok(v) => v,
        Err(e) => {
            let message = format!("not valid JSON: {e} (line {}, column {})", e.line(), e.column());
            return Parsed {
                config: FilterConfig::default(),
                errors: vec![ConfigError::new("$", message)],
            };
        }
    };
    let mut errors = vec![];
    let mut w = Walk { errors: &mut errors };
    let empty = Map::new();
    let root = w.object(Some(&doc), "$", &ROOT_KEYS, true).unwrap_or(&empty);
    let mut config = walk_settings(&mut w, root);
    config.connectors = match root.get("connectors") {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| walk_entry(&mut w, item, &format!("connectors[{i}]")))
            .collect(),
        None => {
            w.err("connectors", "is required: expected a list of connectors");
            vec![]
        }
        Some(_) => {
            w.err("connectors", "expected a list of connectors");
            vec![]
        }
    };
    merge(&mut errors, check::check(&config));
    Parsed { config, errors }
}

const ROOT_KEYS: [&str; 6] = [
    "proxy",
    "identity",
    "connectors",
    "controller",
    "authorization",
    "parts",
];

/// Everything of the document but its connectors.
fn walk_settings(w: &mut Walk<'_>, root: &Map<String, Value>) -> FilterConfig {
    let proxy = match w.object(root.get("proxy"), "proxy", &["realm", "hostPattern"], false) {
        Some(m) => Proxy {
            realm: w.string(m, "proxy", "realm", false),
            host_pattern: w.string(m, "proxy", "hostPattern", false),
        },
        None => Proxy::default(),
    };
    let identity = walk_identity(w, root.get("identity"));
    let controller = w
        .object(
            root.get("controller"),
            "controller",
            &["cluster", "authority", "keyEnv"],
            false,
        )
        .map(|m| ChannelConfig {
            cluster: w.required(m, "controller", "cluster"),
            authority: w.string(m, "controller", "authority", false),
            key_env: w.string(m, "controller", "keyEnv", false),
        });
    let authorization = match root.get("authorization") {
        None => AccessMode::Rules,
        Some(Value::String(s)) if s == "rules" => AccessMode::Rules,
        Some(Value::String(s)) if s == "controller" => AccessMode::Controller,
        Some(_) => {
            w.err(
                "authorization",
                "expected \"rules\" (the connector's lists) or \"controller\" (Kubernetes RBAC through the controller)",
            );
            AccessMode::Rules
        }
    };
    let parts = match root.get("parts") {
        None => vec![],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => s.clone(),
                _ => {
                    w.err(
                        format!("parts[{i}]"),
                        "expected a part id (sha256:<64 lowercase hex digits>)",
                    );
                    String::new()
                }
            })
            .collect(),
        Some(_) => {
            w.err("parts", "expected a list of part ids");
            vec![]
        }
    };
    FilterConfig {
        proxy,
        identity,
        controller,
        authorization,
        parts,
        connectors: vec![],
    }
}

/// A document cut at its connector entries: each entry's JSON text as it stands in the
/// document, and everything else as an object of its own (its members as they stand). Two
/// documents with the same `settings` give an entry of the same text the same meaning.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split<'a> {
    pub settings: String,
    pub entries: Vec<&'a str>,
}

/// Cuts `json` at its connector entries ([`Split`]); `None` when it is not an object whose
/// `connectors` is a list, or has a member name written with escapes (then only [`parse`] can
/// say what it means).
///
/// A strict scan of the structure: braces, brackets, strings, and the commas and colons
/// between members and items. The pieces themselves are left to serde_json: the settings and
/// every entry [`parse_entry`] reads are parsed by it, and an entry a caller keeps is text an
/// earlier parse accepted. (serde_json's `RawValue` cuts the same way, but its feature costs the filter
/// module 47 KB, and the module is held under 700 KB.)
pub fn split(json: &[u8]) -> Option<Split<'_>> {
    let text = std::str::from_utf8(json).ok()?;
    let mut settings = String::from("{");
    let mut entries = None;
    members(text, |scan, key| {
        if key == "\"connectors\"" {
            if entries.is_some() {
                return None;
            }
            entries = Some(scan.items()?);
        } else {
            if settings.len() > 1 {
                settings.push(',');
            }
            settings.push_str(key);
            settings.push(':');
            settings.push_str(scan.value()?);
        }
        Some(())
    })?;
    settings.push('}');
    Some(Split {
        settings,
        entries: entries?,
    })
}

/// Walks the members of the one object `text` is: `member(scan, key)` reads each member's
/// value (the scan stands after its colon). `None` when `text` is anything else (or has
/// something after the object), a member name is written with escapes, or `member` says so.
fn members<'a>(text: &'a str, mut member: impl FnMut(&mut Scan<'a>, &'a str) -> Option<()>) -> Option<()> {
    let mut scan = Scan { text, at: 0 };
    scan.expect(b'{')?;
    if scan.peek()? == b'}' {
        scan.at += 1;
    } else {
        loop {
            if scan.peek()? != b'"' {
                return None;
            }
            let key = scan.value()?;
            if key.contains('\\') {
                return None;
            }
            scan.expect(b':')?;
            member(&mut scan, key)?;
            if scan.close(b'}')? {
                break;
            }
        }
    }
    // Nothing after the document.
    if scan.peek().is_some() {
        return None;
    }
    Some(())
}

/// The text a parts document ([`FilterConfig::parts`]) stands for, up to its entries: its
/// members as they stand but `parts` and `connectors`, then `"connectors":[`. The entries are
/// the parts' texts in order ([`assemble`]). Written so that the controller's inline document
/// and the same configuration in parts give the same text, byte for byte. `None` when `json`
/// is not an object, has a member name written with escapes, or has connectors of its own.
pub fn parts_head(json: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(json).ok()?;
    let mut head = String::from("{");
    members(text, |scan, key| {
        match key {
            "\"parts\"" => {
                scan.value()?;
            }
            "\"connectors\"" => {
                if !scan.items()?.is_empty() {
                    return None;
                }
            }
            _ => {
                head.push_str(key);
                head.push(':');
                head.push_str(scan.value()?);
                head.push(',');
            }
        }
        Some(())
    })?;
    head.push_str("\"connectors\":[");
    Some(head)
}

/// The whole document a parts document stands for: [`parts_head`]'s text, the parts' texts
/// joined with `,`, and `]}`.
pub fn assemble<'a>(head: &str, parts: impl IntoIterator<Item = &'a str> + Clone) -> String {
    let len = head.len() + parts.clone().into_iter().map(|p| p.len() + 1).sum::<usize>() + 2;
    let mut out = String::with_capacity(len);
    out.push_str(head);
    for (i, p) in parts.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(p);
    }
    out.push_str("]}");
    out
}

/// The members of the settings ([`Split::settings`] without its braces) of the document
/// [`assemble`] makes from `head` (a [`parts_head`]), without making it: what the filter
/// compares before it keeps connectors compiled under an earlier document.
pub fn head_members(head: &str) -> Option<&str> {
    let members = head.strip_prefix('{')?.strip_suffix("\"connectors\":[")?;
    Some(members.strip_suffix(',').unwrap_or(members))
}

/// The entries of one part (entries joined with `,`): each entry's text as [`split`] cuts it
/// from the document [`assemble`] makes. `None` when the text is not such a list (then only
/// the assembled document's [`parse`] can say what is wrong).
pub fn part_entries(part: &str) -> Option<Vec<&str>> {
    let mut scan = Scan { text: part, at: 0 };
    let mut out = vec![];
    loop {
        out.push(scan.value()?);
        match scan.peek() {
            None => return Some(out),
            Some(b',') => scan.at += 1,
            Some(_) => return None,
        }
    }
}

/// A cursor over JSON text: the structure only (see [`split`]).
struct Scan<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scan<'a> {
    /// The next byte that is not whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        let bytes = self.text.as_bytes();
        while bytes.get(self.at).is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
        bytes.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// After a member or item: a comma (`false`, more follow) or the `end` (`true`).
    fn close(&mut self, end: u8) -> Option<bool> {
        let next = self.peek()?;
        self.at += 1;
        match next {
            b',' => Some(false),
            b if b == end => Some(true),
            _ => None,
        }
    }

    /// The text of the value here: a string, an object or list (to its matching end), or a
    /// literal or number.
    fn value(&mut self) -> Option<&'a str> {
        let bytes = self.text.as_bytes();
        let first = self.peek()?;
        let start = self.at;
        let mut depth = 0usize;
        let mut in_string = false;
        let mut i = self.at;
        while let Some(&b) = bytes.get(i) {
            i += 1;
            if in_string {
                match b {
                    b'\\' => i += 1,
                    b'"' => {
                        in_string = false;
                        if depth == 0 {
                            break;
                        }
                    }
                    // On to the next quote or backslash, a word at a time: most of a
                    // document's bytes are inside strings (Envoy's canary splits the 4 MB
                    // document of 20,000 connectors twice per change).
                    _ => {
                        i = memchr::memchr2(b'"', b'\\', bytes.get(i..).unwrap_or_default())
                            .map_or(bytes.len(), |n| i + n)
                    }
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth == 0 => {
                    i -= 1;
                    break;
                }
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                b',' | b':' if depth == 0 && first != b'"' => {
                    i -= 1;
                    break;
                }
                _ if depth == 0 && b.is_ascii_whitespace() => {
                    i -= 1;
                    break;
                }
                _ => {}
            }
        }
        self.at = i;
        self.text.get(start..i).filter(|v| !v.is_empty())
    }

    /// The texts of a list's items.
    fn items(&mut self) -> Option<Vec<&'a str>> {
        self.expect(b'[')?;
        let mut out = vec![];
        if self.peek()? == b']' {
            self.at += 1;
            return Some(out);
        }
        loop {
            out.push(self.value()?);
            if self.close(b']')? {
                return Some(out);
            }
        }
    }
}

/// The settings of a cut document ([`Split::settings`]) read alone, for a caller that knows
/// them accepted before (the same text in a document [`parse`] accepted); `None` if they do not
/// read cleanly.
pub fn read_settings(settings: &str) -> Option<FilterConfig> {
    let doc = serde_json::from_slice::<Value>(settings.as_bytes()).ok()?;
    let mut errors = vec![];
    let mut w = Walk { errors: &mut errors };
    let root = w.object(Some(&doc), "$", &ROOT_KEYS, true)?;
    let config = walk_settings(&mut w, root);
    errors.is_empty().then_some(config)
}

/// One connector entry's text ([`Split::entries`]), read and checked alone, for a caller that
/// checks what spans entries itself (the filter, against the configuration it runs);
/// `has_controller`: whether the document names the controller channel. `None` on any problem:
/// only [`parse`] of the whole document lists them, with their paths.
pub fn parse_entry(text: &str, has_controller: bool) -> Option<ConnectorEntry> {
    // (`from_slice` everywhere: a `from_str` would be a second copy of the parser in the module.)
    let item = serde_json::from_slice::<Value>(text.as_bytes()).ok()?;
    let mut errors = vec![];
    let entry = walk_entry(&mut Walk { errors: &mut errors }, &item, "connectors[]");
    (errors.is_empty() && check::check_entry(&entry, "connectors[]", has_controller).is_empty()).then_some(entry)
}

/// Reads an `identity` section alone (the controller's identity file, or what it builds from
/// the cluster's discovery documents): its structure only. The checks run on the whole
/// document ([`check_settings`]), which knows whether keys may be missing.
pub fn read_identity(v: &Value) -> (IdentityConfig, Vec<ConfigError>) {
    let mut errors = vec![];
    let identity = walk_identity(&mut Walk { errors: &mut errors }, Some(v));
    (identity, errors)
}

/// Adds to `errors` the `found` problems that no reported path covers (a value already found
/// wrong was read as empty; its checks would only repeat that).
pub fn merge(errors: &mut Vec<ConfigError>, found: Vec<ConfigError>) {
    let found: Vec<ConfigError> = found.into_iter().filter(|e| !covered(errors, &e.path)).collect();
    errors.extend(found);
}

/// Reads one JWK (a key of the cluster's JWKS) and checks its shape ([`check_jwk_shape`]).
pub fn parse_jwk(v: &Value, path: &str) -> Result<(Jwk, KeyMaterial), Vec<ConfigError>> {
    let mut errors = vec![];
    let jwk = walk_jwk(&mut Walk { errors: &mut errors }, v, path);
    match check_jwk_shape(&jwk, path) {
        Ok(material) if errors.is_empty() => Ok((jwk, material)),
        Ok(_) => Err(errors),
        Err(found) => {
            merge(&mut errors, found);
            Err(errors)
        }
    }
}

fn walk_identity(w: &mut Walk<'_>, v: Option<&Value>) -> IdentityConfig {
    let known = [
        "issuers",
        "audiences",
        "jwks",
        "clockSkewSeconds",
        "tokenCacheSize",
        "maxTokenLifetimeSeconds",
    ];
    let Some(m) = w.object(v, "identity", &known, true) else {
        return IdentityConfig::default();
    };
    let mut keys = vec![];
    if let Some(jwks) = w.object(m.get("jwks"), "identity.jwks", &["keys"], true) {
        match jwks.get("keys") {
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    keys.push(walk_jwk(w, item, &format!("identity.jwks.keys[{i}]")));
                }
            }
            _ => w.err(
                "identity.jwks.keys",
                "is required: expected a non-empty list of JWK public keys (the cluster's /openid/v1/jwks)",
            ),
        }
    }
    IdentityConfig {
        issuers: w.strings(m, "identity", "issuers", true),
        audiences: w.strings(m, "identity", "audiences", true),
        jwks: Jwks { keys },
        clock_skew_seconds: w.number(m, "identity", "clockSkewSeconds", check::CLOCK_SKEW),
        token_cache_size: w.number(m, "identity", "tokenCacheSize", check::TOKEN_CACHE_SIZE),
        max_token_lifetime_seconds: w.number(m, "identity", "maxTokenLifetimeSeconds", check::TOKEN_LIFETIME),
    }
}

/// A JWK's fields as strings; fields the filter does not read are ignored (the cluster's JWKS
/// may carry more).
fn walk_jwk(w: &mut Walk<'_>, v: &Value, path: &str) -> Jwk {
    let Value::Object(m) = v else {
        w.err(path, "expected a JWK object");
        return Jwk::default();
    };
    Jwk {
        kid: w.required(m, path, "kid"),
        kty: w.required(m, path, "kty"),
        alg: w.string(m, path, "alg", false),
        use_: w.string(m, path, "use", false),
        n: w.string(m, path, "n", false),
        e: w.string(m, path, "e", false),
        crv: w.string(m, path, "crv", false),
        x: w.string(m, path, "x", false),
        y: w.string(m, path, "y", false),
    }
}

fn walk_entry(w: &mut Walk<'_>, v: &Value, path: &str) -> ConnectorEntry {
    let known = [
        "namespace",
        "name",
        "address",
        "cluster",
        "credential",
        "allowedNamespaces",
        "allowedServiceAccounts",
        "hosts",
        "tokenRealms",
        "readOnly",
    ];
    let Some(m) = w.object(Some(v), path, &known, true) else {
        return ConnectorEntry::default();
    };
    ConnectorEntry {
        namespace: w.required(m, path, "namespace"),
        name: w.required(m, path, "name"),
        address: w.required(m, path, "address"),
        cluster: w.required(m, path, "cluster"),
        credential: walk_credential(w, m.get("credential"), &format!("{path}.credential")),
        allowed_namespaces: w.strings(m, path, "allowedNamespaces", false),
        allowed_service_accounts: w.strings(m, path, "allowedServiceAccounts", false),
        hosts: w.strings(m, path, "hosts", false),
        token_realms: match m.get("tokenRealms") {
            None => vec![],
            realms => walk_realms(w, realms, &format!("{path}.tokenRealms")),
        },
        read_only: w.boolean(m, path, "readOnly"),
    }
}

/// One of the three credential shapes, told apart by their keys. An unusable credential is
/// reported at `path` and read as the default (whose checks that path then covers).
fn walk_credential(w: &mut Walk<'_>, v: Option<&Value>, path: &str) -> CredentialRef {
    let Some(Value::Object(m)) = v else {
        w.err(
            path,
            "is required: expected {\"username\": ..., \"passwordEnv\": ...}, {\"dockerConfigJsonEnv\": ...} or {\"fromController\": \"<revision>\"}",
        );
        return CredentialRef::default();
    };
    if m.contains_key("fromController") {
        w.object(v, path, &["fromController"], true);
        return CredentialRef::FromController {
            revision: w.required(m, path, "fromController"),
        };
    }
    if m.contains_key("dockerConfigJsonEnv") {
        w.object(v, path, &["dockerConfigJsonEnv"], true);
        return CredentialRef::DockerConfig {
            var: w.required(m, path, "dockerConfigJsonEnv"),
        };
    }
    if m.contains_key("password") {
        w.err(format!("{path}.password"), "inline passwords are refused (the plugin configuration shows in Envoy's config dump): put the password in an environment variable and name it in passwordEnv");
    }
    w.object(v, path, &["username", "usernameEnv", "passwordEnv", "password"], true);
    let username = match (m.get("username"), m.contains_key("usernameEnv")) {
        (Some(Value::String(u)), false) if !u.is_empty() => Username::Literal(u.clone()),
        (None, true) => Username::Env(w.required(m, path, "usernameEnv")),
        _ => {
            w.err(
                path,
                "expected exactly one of username or usernameEnv (a non-empty string)",
            );
            Username::Env(String::new())
        }
    };
    if !m.contains_key("passwordEnv") {
        w.err(
            format!("{path}.passwordEnv"),
            "is required: the name of the environment variable that holds the password",
        );
    }
    CredentialRef::Env {
        username,
        password_env: w.string(m, path, "passwordEnv", false).unwrap_or_default(),
    }
}

/// `tokenRealms`; an item that is not an object is reported and kept as an empty placeholder.
fn walk_realms(w: &mut Walk<'_>, v: Option<&Value>, path: &str) -> Vec<RealmEntry> {
    let items = match v {
        None => return vec![],
        Some(Value::Array(items)) => items,
        Some(_) => {
            w.err(path, "expected a list of {\"url\": ..., \"cluster\": ...}");
            return vec![];
        }
    };
    let mut out = vec![];
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        out.push(match w.object(Some(item), &p, &["url", "cluster"], true) {
            Some(m) => RealmEntry {
                url: w.required(m, &p, "url"),
                cluster: w.required(m, &p, "cluster"),
            },
            None => RealmEntry::default(),
        });
    }
    out
}
