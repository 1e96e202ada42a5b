//! Credentials: from the controller by revision, from environment variables, or from a docker
//! `config.json` in one; and the controller channel's settings.

use serde_json::{Map, Value};

use super::*;

/// The `auths` entry of a docker `config.json` (kubernetes.io/dockerconfigjson) for `upstream`.
pub(super) fn credential_from_docker_config(json: &str, upstream: &Upstream) -> Result<(String, String), String> {
    use connector_core::docker_config::{Problem, credential_for};
    let want = upstream.authority.as_str();
    let default_port = if upstream.scheme == "http" { 80 } else { 443 };
    match credential_for(json.as_bytes(), want, default_port) {
        Ok(found) => Ok((found.username, found.password)),
        Err(Problem::NotJson(_)) => Err("is not valid JSON: expected a docker config.json".to_string()),
        Err(Problem::NoAuths) => Err("has no \"auths\" object: expected a docker config.json".to_string()),
        Err(Problem::NoEntry(keys)) => Err(format!("has no entry for {want} (entries: {})", keys.join(", "))),
        Err(Problem::AuthNotBase64 { .. }) => Err(format!("entry for {want}: \"auth\" is not base64 of UTF-8 text")),
        Err(Problem::AuthNotPair { .. }) => Err(format!("entry for {want}: \"auth\" is not user:password")),
        Err(Problem::NoCredential { .. }) => Err(format!(
            "entry for {want} has neither \"auth\" nor username and password"
        )),
    }
}

/// Builds the upstream `Authorization` value from environment variables. The values are read
/// here once; the document only names the variables.
pub(super) fn compile_credential(
    w: &mut Walk<'_>,
    v: Option<&Value>,
    path: &str,
    upstream: Option<&Upstream>,
    env: &dyn Fn(&str) -> Option<String>,
    has_controller: bool,
) -> Option<UpstreamCredential> {
    let Some(Value::Object(m)) = v else {
        w.err(
            path,
            "is required: expected {\"username\": ..., \"passwordEnv\": ...}, {\"dockerConfigJsonEnv\": ...} or {\"fromController\": \"<revision>\"}",
        );
        return None;
    };
    if m.contains_key("fromController") {
        w.object(v, path, &["fromController"], true)?;
        let revision = w.string(m, path, "fromController", true)?;
        if !revision
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            w.err(
                format!("{path}.fromController"),
                "expected a revision label (letters, digits, '-', '.', '_')",
            );
            return None;
        }
        if !has_controller {
            w.err(
                format!("{path}.fromController"),
                "needs the controller channel: set controller.cluster",
            );
            return None;
        }
        return Some(UpstreamCredential::Controller {
            revision: revision.to_string(),
        });
    }
    compile_static_credential(w, m, v, path, upstream, env).map(UpstreamCredential::Static)
}

/// `{"cluster": "connector_controller", "authority": "connector-controller", "keyEnv": "VAR"}`.
pub(super) fn compile_controller(
    w: &mut Walk<'_>,
    v: Option<&Value>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<ControllerChannel> {
    let m = w.object(v, "controller", &["cluster", "authority", "keyEnv"], false)?;
    let cluster = w.string(m, "controller", "cluster", true);
    let authority = w
        .string(m, "controller", "authority", false)
        .unwrap_or("connector-controller")
        .to_string();
    let key = match w.string(m, "controller", "keyEnv", false) {
        None => None,
        Some(var) => match env(var) {
            Some(k) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic()) => Some(k),
            _ => {
                w.err("controller.keyEnv", format!("environment variable {var:?} is not set in the Wasm VM (or is not a printable token): list it in vm_config.environment_variables.host_env_keys and set it in Envoy's environment"));
                return None;
            }
        },
    };
    Some(ControllerChannel {
        cluster: cluster?.to_string(),
        authority,
        key,
    })
}

/// Reads a credential held in the VM's environment into a ready-made `Authorization` value.
pub(super) fn compile_static_credential(
    w: &mut Walk<'_>,
    m: &Map<String, Value>,
    v: Option<&Value>,
    path: &str,
    upstream: Option<&Upstream>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    if m.contains_key("dockerConfigJsonEnv") {
        // A kubernetes.io/dockerconfigjson Secret's .dockerconfigjson, handed over as one variable.
        w.object(v, path, &["dockerConfigJsonEnv"], true)?;
        let var = w.string(m, path, "dockerConfigJsonEnv", true)?;
        let Some(json) = env(var).filter(|j| !j.is_empty()) else {
            w.err(format!("{path}.dockerConfigJsonEnv"), format!("environment variable {var:?} is not set in the Wasm VM: list it in vm_config.environment_variables.host_env_keys and set it in Envoy's environment"));
            return None;
        };
        let upstream = upstream?;
        return match credential_from_docker_config(&json, upstream) {
            Ok((u, p)) => Some(connector_core::basic::authorization(&u, &p)),
            Err(e) => {
                w.err(
                    format!("{path}.dockerConfigJsonEnv"),
                    format!("the docker config in {var:?} {e}"),
                );
                None
            }
        };
    }
    if m.contains_key("password") {
        w.err(format!("{path}.password"), "inline passwords are refused (the plugin configuration shows in Envoy's config dump): put the password in an environment variable and name it in passwordEnv");
    }
    let known = ["username", "usernameEnv", "passwordEnv", "password"];
    w.object(v, path, &known, true)?;
    let from_env = |w: &mut Walk<'_>, key: &str| -> Option<String> {
        let var = w.string(m, path, key, false)?;
        match env(var) {
            Some(value) if !value.is_empty() => Some(value),
            _ => {
                w.err(format!("{path}.{key}"), format!("environment variable {var:?} is not set in the Wasm VM: list it in vm_config.environment_variables.host_env_keys and set it in Envoy's environment"));
                None
            }
        }
    };
    let username = match (m.get("username"), m.contains_key("usernameEnv")) {
        (Some(Value::String(u)), false) if !u.is_empty() => Some(u.clone()),
        (None, true) => from_env(w, "usernameEnv"),
        _ => {
            w.err(
                path,
                "expected exactly one of username or usernameEnv (a non-empty string)",
            );
            None
        }
    };
    if !m.contains_key("passwordEnv") {
        w.err(
            format!("{path}.passwordEnv"),
            "is required: the name of the environment variable that holds the password",
        );
    }
    let password = from_env(w, "passwordEnv");
    let username = username?;
    if username.contains(':') {
        w.err(
            path,
            "the username must not contain ':' (Basic credentials cannot carry it)",
        );
        return None;
    }
    Some(connector_core::basic::authorization(&username, &password?))
}
