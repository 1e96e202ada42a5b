//! Credentials: from the controller by revision, or read from the VM's environment (a username
//! and password, or a docker `config.json` in one variable); and the controller channel's key.
//! The values are read here once; the document only names the variables.

use connector_core::config::{ChannelConfig, CredentialRef, DEFAULT_CHANNEL_AUTHORITY, Username};

use super::*;

fn not_set(var: &str) -> String {
    format!(
        "environment variable {var:?} is not set in the Wasm VM: list it in vm_config.environment_variables.host_env_keys and set it in Envoy's environment"
    )
}

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

/// The credential of one connector (`path` is its `credential`); `None` with the problem in
/// `found` when the environment does not hold it. `upstream` is `None` when the address is
/// wrong (already reported): a docker config cannot be looked up then.
pub(super) fn compile_credential(
    credential: &CredentialRef,
    path: &str,
    upstream: Option<&Upstream>,
    env: &dyn Fn(&str) -> Option<String>,
    found: &mut Vec<ConfigError>,
) -> Option<UpstreamCredential> {
    let mut read = |key: &str, var: &str| -> Option<String> {
        let value = env(var).filter(|v| !v.is_empty());
        if value.is_none() {
            found.push(ConfigError::new(format!("{path}.{key}"), not_set(var)));
        }
        value
    };
    match credential {
        CredentialRef::FromController { revision } => Some(UpstreamCredential::Controller {
            revision: revision.clone(),
        }),
        CredentialRef::DockerConfig { var } => {
            let json = read("dockerConfigJsonEnv", var)?;
            match credential_from_docker_config(&json, upstream?) {
                Ok((u, p)) => Some(UpstreamCredential::Static(connector_core::basic::authorization(&u, &p))),
                Err(e) => {
                    found.push(ConfigError::new(
                        format!("{path}.dockerConfigJsonEnv"),
                        format!("the docker config in {var:?} {e}"),
                    ));
                    None
                }
            }
        }
        CredentialRef::Env { username, password_env } => {
            let username = match username {
                Username::Literal(u) => Some(u.clone()),
                Username::Env(var) => read("usernameEnv", var),
            };
            let password = read("passwordEnv", password_env);
            let username = username?;
            if username.contains(':') {
                found.push(ConfigError::new(
                    path,
                    "the username must not contain ':' (Basic credentials cannot carry it)",
                ));
                return None;
            }
            Some(UpstreamCredential::Static(connector_core::basic::authorization(
                &username, &password?,
            )))
        }
    }
}

/// `{"cluster": "connector_controller", "authority": "connector-controller", "keyEnv": "VAR"}`.
pub(super) fn compile_channel(
    channel: &ChannelConfig,
    env: &dyn Fn(&str) -> Option<String>,
    found: &mut Vec<ConfigError>,
) -> Option<ControllerChannel> {
    let key = match &channel.key_env {
        None => None,
        Some(var) => match env(var) {
            Some(k) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic()) => Some(k),
            _ => {
                found.push(ConfigError::new("controller.keyEnv", format!("environment variable {var:?} is not set in the Wasm VM (or is not a printable token): list it in vm_config.environment_variables.host_env_keys and set it in Envoy's environment")));
                return None;
            }
        },
    };
    Some(ControllerChannel {
        cluster: channel.cluster.clone(),
        authority: channel
            .authority
            .as_deref()
            .unwrap_or(DEFAULT_CHANNEL_AUTHORITY)
            .to_string(),
        key,
    })
}
