//! Owns the step from a connector's Secret to its upstream credential, and the `SecretReady`
//! condition that explains the outcome. Pure functions over the Secret object, so the same code
//! serves file mode and (later) the reconciler.
//!
//! Messages name the Secret, its type and its keys so a person can fix it, and never contain a
//! value read from the Secret: conditions and events are readable by far more people than the
//! Secret is.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;

pub const TYPE_REGISTRY_TOKEN: &str = "cpaas.io/distribution-registry-token";
pub const TYPE_BASIC_AUTH: &str = "kubernetes.io/basic-auth";
pub const TYPE_DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

/// The annotation by which a Secret opts in to being used by Connectors (issue 12.6): a
/// comma-separated list of the names of the Connectors in the Secret's namespace that may send
/// its credential upstream, or `*` for every Connector there. Whoever may create a Connector may
/// point its `address` anywhere, so without this opt-in they could have any registry Secret of
/// the namespace sent to a host of their choosing; annotating a Secret takes `update` on that
/// Secret, a right the Secret's owner holds and a Connector author need not.
pub const ALLOWED_CONNECTORS_ANNOTATION: &str = "connectors.alauda.io/allowed-connectors";

/// Why `SecretReady` has the status it has; the string is the condition's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    SecretReady,
    SecretNotFound,
    SecretTypeUnsupported,
    SecretKeyMissing,
    /// A key is there but its value cannot be used (not UTF-8, empty, control characters,
    /// malformed docker config).
    SecretInvalid,
    /// A docker config Secret without an entry for the connector's registry.
    SecretHostMissing,
    /// The Secret does not name the connector in [`ALLOWED_CONNECTORS_ANNOTATION`].
    SecretNotAllowed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SecretReady => "SecretReady",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretTypeUnsupported => "SecretTypeUnsupported",
            Reason::SecretKeyMissing => "SecretKeyMissing",
            Reason::SecretInvalid => "SecretInvalid",
            Reason::SecretHostMissing => "SecretHostMissing",
            Reason::SecretNotAllowed => "SecretNotAllowed",
        }
    }
}

/// The `SecretReady` condition's content (the reconciler adds times and generations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretReady {
    pub status: bool,
    pub reason: Reason,
    pub message: String,
}

/// An upstream username and password. `Debug` redacts the password so the credential can sit
/// inside structures that get logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credential {{ username: {:?}, password: <redacted> }}",
            self.username
        )
    }
}

/// What a connector gets from its Secret: the condition, and the credential when it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretOutcome {
    pub condition: SecretReady,
    pub credential: Option<Credential>,
}

impl SecretOutcome {
    fn fail(reason: Reason, message: String) -> Self {
        Self {
            condition: SecretReady {
                status: false,
                reason,
                message,
            },
            credential: None,
        }
    }
}

/// The credential in `secret` (named `name`, in the connector's namespace `namespace`) for the
/// connector `connector` whose upstream is `authority` (`host[:port]`, as
/// `connector_core::address::Upstream` normalises it). `None`: the Secret does not exist.
/// A Secret that does not opt in to this connector ([`ALLOWED_CONNECTORS_ANNOTATION`]) yields
/// no credential, whatever it holds: its data is not even read.
pub fn credential_from_secret(
    namespace: &str,
    name: &str,
    connector: &str,
    secret: Option<&Secret>,
    authority: &str,
) -> SecretOutcome {
    let Some(secret) = secret else {
        return SecretOutcome::fail(
            Reason::SecretNotFound,
            format!(
                "Secret {namespace}/{name} not found: create it (type {TYPE_REGISTRY_TOKEN} with keys username and password, annotated {ALLOWED_CONNECTORS_ANNOTATION}: \"{connector}\") or fix spec.auth.secretRef.name"
            ),
        );
    };
    if let Some(message) = not_allowed(namespace, name, connector, secret) {
        return SecretOutcome::fail(Reason::SecretNotAllowed, message);
    }
    let data = merged_data(secret);
    let type_ = secret.type_.as_deref().unwrap_or("Opaque");
    let what = format!("Secret {namespace}/{name} (type {type_})");
    let credential = match type_ {
        TYPE_REGISTRY_TOKEN | TYPE_BASIC_AUTH => username_password(&what, &data),
        TYPE_DOCKER_CONFIG_JSON => docker_config(&what, &data, authority),
        _ => Err((
            Reason::SecretTypeUnsupported,
            format!(
                "{what}: unsupported type; use {TYPE_REGISTRY_TOKEN} or {TYPE_BASIC_AUTH} (keys username and password) or {TYPE_DOCKER_CONFIG_JSON}"
            ),
        )),
    };
    match credential {
        Ok(c) => SecretOutcome {
            condition: SecretReady {
                status: true,
                reason: Reason::SecretReady,
                message: format!("{what} holds the credential of user {:?}", c.username),
            },
            credential: Some(c),
        },
        Err((reason, message)) => SecretOutcome::fail(reason, message),
    }
}

/// Why `secret` may not be used by `connector`, or `None` when it opts in: its
/// [`ALLOWED_CONNECTORS_ANNOTATION`] lists the connector's name or `*`. The message says which
/// annotation to add and how; the annotation's value is not secret and may be quoted.
fn not_allowed(namespace: &str, name: &str, connector: &str, secret: &Secret) -> Option<String> {
    let listed = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ALLOWED_CONNECTORS_ANNOTATION));
    let names: Vec<&str> = listed
        .map(|v| v.split(',').map(str::trim).filter(|n| !n.is_empty()).collect())
        .unwrap_or_default();
    if names.iter().any(|n| *n == "*" || *n == connector) {
        return None;
    }
    let now = match listed {
        None => format!("it has no annotation {ALLOWED_CONNECTORS_ANNOTATION}"),
        Some(v) => format!("its annotation {ALLOWED_CONNECTORS_ANNOTATION} is {v:?}"),
    };
    let wanted = if names.is_empty() {
        connector.to_string()
    } else {
        format!("{},{connector}", names.join(","))
    };
    Some(format!(
        "Secret {namespace}/{name} does not allow Connector {namespace}/{connector} to use it ({now}): a Secret's credential goes only to the Connectors it names; if this Connector may send it to {connector}'s spec.address, run: kubectl annotate secret -n {namespace} {name} --overwrite {ALLOWED_CONNECTORS_ANNOTATION}={wanted} (comma-separated Connector names, or * for every Connector in {namespace})"
    ))
}

/// `data` with `stringData` laid over it, as the API server stores a Secret written with both
/// (file mode reads manifests before any API server has merged them).
fn merged_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

type Refusal = (Reason, String);

fn username_password(what: &str, data: &BTreeMap<String, Vec<u8>>) -> Result<Credential, Refusal> {
    let missing: Vec<&str> = ["username", "password"]
        .into_iter()
        .filter(|k| !data.contains_key(*k))
        .collect();
    if !missing.is_empty() {
        return Err((
            Reason::SecretKeyMissing,
            format!(
                "{what}: missing key(s) {}; it needs username and password",
                missing.join(", ")
            ),
        ));
    }
    let value = |key: &str| usable(what, key, data.get(key).map(Vec::as_slice).unwrap_or_default());
    Ok(Credential {
        username: value("username")?,
        password: value("password")?,
    })
}

/// A value the filter can take from an environment variable: UTF-8, not empty, one line.
fn usable(what: &str, key: &str, bytes: &[u8]) -> Result<String, Refusal> {
    let invalid = |why: &str| Err((Reason::SecretInvalid, format!("{what}: key {key} {why}")));
    let Ok(s) = std::str::from_utf8(bytes) else {
        return invalid("is not UTF-8 text");
    };
    if s.is_empty() {
        return invalid("is empty");
    }
    if s.chars().any(char::is_control) {
        // A trailing newline is the usual slip (`echo` instead of `echo -n`); say so.
        return invalid("contains control characters (a trailing newline?); the value must be one line");
    }
    Ok(s.to_string())
}

fn docker_config(what: &str, data: &BTreeMap<String, Vec<u8>>, authority: &str) -> Result<Credential, Refusal> {
    let Some(raw) = data.get(DOCKER_CONFIG_KEY) else {
        return Err((
            Reason::SecretKeyMissing,
            format!("{what}: missing key {DOCKER_CONFIG_KEY}"),
        ));
    };
    use connector_core::docker_config::{Problem, credential_for};
    let found = credential_for(raw, &authority.to_ascii_lowercase(), 443).map_err(|problem| {
        let field = |key: &str| format!("{DOCKER_CONFIG_KEY} auths[{key:?}]");
        match problem {
            // serde_json's errors quote no input, only positions: safe to show.
            Problem::NotJson(e) => (
                Reason::SecretInvalid,
                format!("{what}: key {DOCKER_CONFIG_KEY} is not JSON ({e})"),
            ),
            Problem::NoAuths => (
                Reason::SecretInvalid,
                format!("{what}: key {DOCKER_CONFIG_KEY} has no \"auths\" object"),
            ),
            Problem::NoEntry(keys) => (
                Reason::SecretHostMissing,
                format!(
                    "{what}: {DOCKER_CONFIG_KEY} has no auths entry for {authority} (entries: {}); add one keyed by the registry host",
                    if keys.is_empty() {
                        "none".to_string()
                    } else {
                        keys.join(", ")
                    }
                ),
            ),
            Problem::AuthNotBase64 { key } => (
                Reason::SecretInvalid,
                format!("{what}: {}.auth is not base64 of UTF-8 text", field(&key)),
            ),
            Problem::AuthNotPair { key } => (
                Reason::SecretInvalid,
                format!("{what}: {}.auth does not decode to username:password", field(&key)),
            ),
            Problem::NoCredential { key } => (
                Reason::SecretKeyMissing,
                format!("{what}: {} has neither username and password nor auth", field(&key)),
            ),
        }
    })?;
    let field = format!("{DOCKER_CONFIG_KEY} auths[{:?}]", found.key);
    let (username, password) = (found.username, found.password);
    Ok(Credential {
        username: usable(what, &format!("{field} username"), username.as_bytes())?,
        password: usable(what, &format!("{field} password"), password.as_bytes())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    const PASSWORD: &str = "s3cr3t-Pa55";

    /// A Secret that every Connector of its namespace may use.
    fn secret(type_: &str, data: &[(&str, &[u8])], string_data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: annotated("*"),
            type_: Some(type_.to_string()),
            data: (!data.is_empty()).then(|| {
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect()
            }),
            string_data: (!string_data.is_empty()).then(|| {
                string_data
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            ..Secret::default()
        }
    }

    fn annotated(value: &str) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            annotations: Some([(ALLOWED_CONNECTORS_ANNOTATION.to_string(), value.to_string())].into()),
            ..Default::default()
        }
    }

    fn docker(auths: serde_json::Value) -> Secret {
        let doc = serde_json::json!({ "auths": auths }).to_string();
        secret(TYPE_DOCKER_CONFIG_JSON, &[(DOCKER_CONFIG_KEY, doc.as_bytes())], &[])
    }

    fn b64(s: &str) -> String {
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s)
    }

    #[test]
    fn secrets_to_credentials() {
        let robot = Some(("robot", PASSWORD));
        // (case, secret, connector authority, reason, credential, part of the message)
        type Case<'a> = (
            &'a str,
            Option<Secret>,
            &'a str,
            Reason,
            Option<(&'a str, &'a str)>,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "registry token secret",
                Some(secret(
                    TYPE_REGISTRY_TOKEN,
                    &[("username", b"robot"), ("password", PASSWORD.as_bytes())],
                    &[],
                )),
                "harbor.example.com",
                Reason::SecretReady,
                robot,
                "user \"robot\"",
            ),
            (
                "basic-auth secret written with stringData",
                Some(secret(
                    TYPE_BASIC_AUTH,
                    &[],
                    &[("username", "robot"), ("password", PASSWORD)],
                )),
                "harbor.example.com",
                Reason::SecretReady,
                robot,
                "kubernetes.io/basic-auth",
            ),
            (
                "stringData wins over data, as on the API server",
                Some(secret(
                    TYPE_BASIC_AUTH,
                    &[("username", b"old"), ("password", b"old")],
                    &[("username", "robot"), ("password", PASSWORD)],
                )),
                "h",
                Reason::SecretReady,
                robot,
                "",
            ),
            (
                "no secret",
                None,
                "h",
                Reason::SecretNotFound,
                None,
                "Secret team-a/creds not found",
            ),
            (
                "opaque secret",
                Some(secret(
                    "Opaque",
                    &[("username", b"robot"), ("password", PASSWORD.as_bytes())],
                    &[],
                )),
                "h",
                Reason::SecretTypeUnsupported,
                None,
                "type Opaque",
            ),
            (
                "missing password",
                Some(secret(TYPE_REGISTRY_TOKEN, &[("username", b"robot")], &[])),
                "h",
                Reason::SecretKeyMissing,
                None,
                "missing key(s) password",
            ),
            (
                "password with a trailing newline",
                Some(secret(
                    TYPE_REGISTRY_TOKEN,
                    &[("username", b"robot"), ("password", format!("{PASSWORD}\n").as_bytes())],
                    &[],
                )),
                "h",
                Reason::SecretInvalid,
                None,
                "key password contains control characters",
            ),
            (
                "empty username",
                Some(secret(
                    TYPE_BASIC_AUTH,
                    &[("username", b""), ("password", PASSWORD.as_bytes())],
                    &[],
                )),
                "h",
                Reason::SecretInvalid,
                None,
                "key username is empty",
            ),
            (
                "password not UTF-8",
                Some(secret(
                    TYPE_BASIC_AUTH,
                    &[("username", b"robot"), ("password", &[0xff, 0xfe])],
                    &[],
                )),
                "h",
                Reason::SecretInvalid,
                None,
                "not UTF-8",
            ),
            (
                "docker config with auth",
                Some(docker(
                    serde_json::json!({ "harbor.example.com": { "auth": b64(&format!("robot:{PASSWORD}")) } }),
                )),
                "harbor.example.com",
                Reason::SecretReady,
                robot,
                "",
            ),
            (
                "docker config with username/password, keyed by URL",
                Some(docker(
                    serde_json::json!({ "https://harbor.example.com/": { "username": "robot", "password": PASSWORD } }),
                )),
                "harbor.example.com",
                Reason::SecretReady,
                robot,
                "",
            ),
            (
                "docker config with port",
                Some(docker(
                    serde_json::json!({ "127.0.0.1:5000": { "auth": b64(&format!("robot:{PASSWORD}")) } }),
                )),
                "127.0.0.1:5000",
                Reason::SecretReady,
                robot,
                "",
            ),
            (
                "Docker Hub under its legacy key",
                Some(docker(
                    serde_json::json!({ "https://index.docker.io/v1/": { "auth": b64(&format!("robot:{PASSWORD}")) } }),
                )),
                "registry-1.docker.io",
                Reason::SecretReady,
                robot,
                "",
            ),
            (
                "docker config for another registry",
                Some(docker(
                    serde_json::json!({ "ghcr.io": { "auth": b64(&format!("robot:{PASSWORD}")) } }),
                )),
                "harbor.example.com",
                Reason::SecretHostMissing,
                None,
                "no auths entry for harbor.example.com (entries: ghcr.io)",
            ),
            (
                "docker config auth without a colon",
                Some(docker(serde_json::json!({ "h": { "auth": b64(PASSWORD) } }))),
                "h",
                Reason::SecretInvalid,
                None,
                "does not decode to username:password",
            ),
            (
                "docker config entry without credentials",
                Some(docker(serde_json::json!({ "h": { "email": "x@example.com" } }))),
                "h",
                Reason::SecretKeyMissing,
                None,
                "neither username and password nor auth",
            ),
            (
                "docker config that is not JSON",
                Some(secret(
                    TYPE_DOCKER_CONFIG_JSON,
                    &[(DOCKER_CONFIG_KEY, format!("{{{PASSWORD}").as_bytes())],
                    &[],
                )),
                "h",
                Reason::SecretInvalid,
                None,
                "is not JSON",
            ),
            (
                "docker config secret without its key",
                Some(secret(TYPE_DOCKER_CONFIG_JSON, &[("config.json", b"{}")], &[])),
                "h",
                Reason::SecretKeyMissing,
                None,
                "missing key .dockerconfigjson",
            ),
        ];
        for (case, secret, authority, reason, credential, message_part) in cases {
            let out = credential_from_secret("team-a", "creds", "harbor", secret.as_ref(), authority);
            assert_eq!(out.condition.reason, reason, "{case}: {}", out.condition.message);
            assert_eq!(out.condition.status, reason == Reason::SecretReady, "{case}");
            assert_eq!(
                out.credential
                    .as_ref()
                    .map(|c| (c.username.as_str(), c.password.as_str())),
                credential,
                "{case}"
            );
            assert!(
                out.condition.message.contains(message_part),
                "{case}: message {:?} should contain {message_part:?}",
                out.condition.message
            );
            assert!(
                !out.condition.message.contains(PASSWORD),
                "{case}: the message shows the password"
            );
            assert!(
                !format!("{out:?}").contains(PASSWORD),
                "{case}: Debug shows the password"
            );
            assert!(
                out.condition.message.contains("team-a/creds"),
                "{case}: the message names the Secret"
            );
        }
    }

    #[test]
    fn a_secret_serves_only_the_connectors_it_names() {
        let robot = [("username", b"robot".as_slice()), ("password", PASSWORD.as_bytes())];
        // (annotation value, or none; used by connector "harbor"; part of the message)
        let cases: [(Option<&str>, bool, &str); 8] = [
            (Some("*"), true, ""),
            (Some("harbor"), true, ""),
            (Some("ghcr, harbor"), true, ""),
            (
                None,
                false,
                "it has no annotation connectors.alauda.io/allowed-connectors",
            ),
            (
                Some(""),
                false,
                "--overwrite connectors.alauda.io/allowed-connectors=harbor (",
            ),
            (
                Some("ghcr"),
                false,
                "kubectl annotate secret -n team-a creds --overwrite connectors.alauda.io/allowed-connectors=ghcr,harbor",
            ),
            // Names, not patterns: a prefix or another namespace's connector is not this one.
            (Some("harb*"), false, "is \"harb*\""),
            (Some("team-a/harbor"), false, "Connector team-a/harbor to use it"),
        ];
        for (value, allowed, message_part) in cases {
            let mut s = secret(TYPE_REGISTRY_TOKEN, &robot, &[]);
            s.metadata = match value {
                Some(v) => annotated(v),
                None => Default::default(),
            };
            let out = credential_from_secret("team-a", "creds", "harbor", Some(&s), "h");
            assert_eq!(
                out.credential.is_some(),
                allowed,
                "{value:?}: {}",
                out.condition.message
            );
            assert_eq!(out.condition.status, allowed, "{value:?}");
            if !allowed {
                assert_eq!(out.condition.reason, Reason::SecretNotAllowed, "{value:?}");
                assert!(
                    out.condition.message.contains(message_part),
                    "{value:?}: {:?} should contain {message_part:?}",
                    out.condition.message
                );
                assert!(!out.condition.message.contains(PASSWORD));
            }
        }
        // Not allowed wins over a broken Secret: its data is not looked at.
        let mut broken = secret(TYPE_BASIC_AUTH, &[("username", b"robot")], &[]);
        broken.metadata = Default::default();
        let out = credential_from_secret("team-a", "creds", "harbor", Some(&broken), "h");
        assert_eq!(out.condition.reason, Reason::SecretNotAllowed);
    }

    #[test]
    fn docker_config_keys_name_hosts() {
        for (key, host) in [
            ("harbor.example.com", "harbor.example.com"),
            ("https://Harbor.Example.com/v1/", "harbor.example.com"),
            ("http://127.0.0.1:5000", "127.0.0.1:5000"),
            ("https://h:443", "h"),
        ] {
            assert_eq!(connector_core::docker_config::key_authority(key, 443), host, "{key}");
        }
    }
}
