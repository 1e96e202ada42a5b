//! Keycloak, a real Docker-registry token service (its `docker-v2` protocol, the one
//! self-hosted registries use besides Harbor's own), from the distribution `scripts/setup.sh`
//! fetches from Maven Central. One realm holds the robot account (a connector's Secret) and one
//! `docker-v2` client, the registry's service, granted whatever scope it is asked (Keycloak's
//! allow-all mapper): what Keycloak decides is who may get a token, as a registry's own token
//! service does. It serves the harness's upstream TLS on loopback.
//!
//! Keycloak signs docker tokens with the realm's RS256 key and names that key by a libtrust key
//! id, which Distribution v3 only finds through a JWKS file giving that id (distribution issue
//! 4533): [`Keycloak::trust`] writes that file and the key's certificate for the registry.

use crate::Result;
use crate::WorkDir;
use crate::http::Request;
use crate::procs::{self, Proc};
use crate::registry::TokenTrust;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The version `scripts/setup.sh` installs: the last whose server runs on Debian 12's Java 17.
pub const VERSION: &str = "25.0.6";
/// The realm and the registry's service (the `docker-v2` client's id).
pub const REALM: &str = "registry";
pub const SERVICE: &str = "registry.keycloak.test";

pub struct Keycloak {
    pub port: u16,
    proc: Proc,
    dir: PathBuf,
    admin_password: String,
    /// Held while this Keycloak runs (declared after `proc`, so released after it stops).
    _home: std::fs::File,
}

/// How long a start waits for another checkout's Keycloak to finish with the shared home.
const HOME_WAIT: Duration = Duration::from_secs(300);

/// An exclusive lock on the shared home, taken before starting: `start-dev` rebuilds the server
/// into the distribution's own directory (`lib/quarkus`) and keeps files under `data/`, and
/// the distribution is shared by every checkout on the machine (set-up caches it once per
/// version), so two checkouts starting it at once would write the same files.
fn lock_home(home: &std::path::Path, wait: Duration) -> Result<std::fs::File> {
    let path = home.join(".devkit-in-use.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(format!(
                    "Keycloak's home {} stayed in use by another run for {} s",
                    home.display(),
                    wait.as_secs_f64()
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
}

/// Where `scripts/setup.sh` links the distribution.
fn home() -> Result<PathBuf> {
    let home = crate::repo_root().join(".cache/keycloak");
    if home.join("bin/kc.sh").is_file() {
        Ok(home)
    } else {
        Err(format!(
            "Keycloak {VERSION} is missing at {}: run `bash scripts/setup.sh` (it fetches it from Maven Central)",
            home.display()
        ))
    }
}

impl Keycloak {
    /// Starts Keycloak on free loopback ports (in-memory database) and sets the realm up with
    /// the robot account `username` / `password`. About 20 s on 2 cores.
    pub fn start(work: &WorkDir, username: &str, password: &str) -> Result<Self> {
        let home = home()?;
        let lock = lock_home(&home, HOME_WAIT)?;
        let dir = work.sub("keycloak")?;
        let (port, http_port, management_port) = (procs::free_port()?, procs::free_port()?, procs::free_port()?);
        let upstream = crate::tls::upstream()?;
        crate::http::trust_port(port, &upstream.ca);
        let admin_password = crate::random_secret()?;
        let mut cmd = Command::new(home.join("bin/kc.sh"));
        cmd.arg("start-dev")
            .args(["--features=docker", "--db=dev-mem", "--http-host=127.0.0.1"])
            .arg(format!("--http-port={http_port}"))
            .arg(format!("--https-port={port}"))
            .arg(format!("--http-management-port={management_port}"))
            .arg(format!("--https-certificate-file={}", upstream.cert.display()))
            .arg(format!("--https-certificate-key-file={}", upstream.key.display()))
            .arg(format!("--hostname=https://127.0.0.1:{port}"))
            .env("KEYCLOAK_ADMIN", "admin")
            .env("KEYCLOAK_ADMIN_PASSWORD", &admin_password);
        let mut proc = Proc::spawn("keycloak", cmd, &dir.join("keycloak.log"))?;
        proc.wait_for_http(port, "/realms/master", |s| s == 200, Duration::from_secs(120))?;
        let kc = Self {
            port,
            proc,
            dir,
            admin_password,
            _home: lock,
        };
        kc.create_realm(username, password)?;
        Ok(kc)
    }

    /// The realm a registry names in its challenge.
    pub fn realm(&self) -> String {
        format!("https://127.0.0.1:{}/realms/{REALM}/protocol/docker-v2/auth", self.port)
    }

    /// The `iss` of its tokens.
    pub fn issuer(&self) -> String {
        format!("https://127.0.0.1:{}/realms/{REALM}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.proc.log_path()).unwrap_or_default()
    }

    fn send(&self, req: Request) -> Result<Value> {
        let what = format!("{} {}", req.method, req.path);
        let resp = req.send(self.port)?;
        if !(200..300).contains(&resp.status) {
            return Err(format!("Keycloak {what}: {}", resp.summary()));
        }
        if resp.body.is_empty() {
            return Ok(Value::Null);
        }
        resp.json().map_err(|e| format!("Keycloak {what}: {e}"))
    }

    /// An access token of the master realm's admin (they last a minute: one per use).
    fn admin_token(&self) -> Result<String> {
        let form = format!(
            "grant_type=password&client_id=admin-cli&username=admin&password={}",
            crate::token_server::encode(&self.admin_password)
        );
        let mut req = Request::new("POST", "/realms/master/protocol/openid-connect/token")
            .header("Content-Type", "application/x-www-form-urlencoded");
        req.body = form.into_bytes();
        self.send(req)?["access_token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "Keycloak gave the admin no access_token".to_string())
    }

    /// The realm's login events so far, oldest first, as `(type, username)`: a docker token
    /// issued is a `LOGIN`, a credential refused a `LOGIN_ERROR`.
    pub fn logins(&self) -> Result<Vec<(String, String)>> {
        let admin = self.admin_token()?;
        let events = self.send(Request::get(&format!("/admin/realms/{REALM}/events?max=10000")).bearer(&admin))?;
        let mut out: Vec<(String, String)> = events
            .as_array()
            .ok_or_else(|| format!("Keycloak's events are not a list: {events}"))?
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or_default().to_string(),
                    e["details"]["username"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    fn create_realm(&self, username: &str, password: &str) -> Result<()> {
        let admin = self.admin_token()?;
        let realm = json!({
            "realm": REALM,
            "enabled": true,
            // Login events: what the tests count token issuances by.
            "eventsEnabled": true,
            "users": [{
                "username": username,
                "enabled": true,
                "email": format!("{username}@keycloak.test"),
                "emailVerified": true,
                "firstName": "Robot",
                "lastName": "Account",
                "credentials": [{"type": "password", "value": password, "temporary": false}],
            }],
            "clients": [{
                "clientId": SERVICE,
                "protocol": "docker-v2",
                "enabled": true,
                "publicClient": true,
                "protocolMappers": [{
                    "name": "allow all",
                    "protocol": "docker-v2",
                    "protocolMapper": "docker-v2-allow-all-mapper",
                    "config": {},
                }],
            }],
        });
        let mut req = Request::new("POST", "/admin/realms")
            .bearer(&admin)
            .header("Content-Type", "application/json");
        req.body = realm.to_string().into_bytes();
        self.send(req).map(drop)
    }

    /// A token for `scope` with the Basic credential `username` / `password`, as a registry
    /// client asks for one.
    pub fn token(&self, username: &str, password: &str, scope: &str) -> Result<String> {
        let path = format!(
            "/realms/{REALM}/protocol/docker-v2/auth?service={}&scope={}",
            crate::token_server::encode(SERVICE),
            crate::token_server::encode(scope)
        );
        let answer = self.send(Request::get(&path).basic(username, password))?;
        answer["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("Keycloak's docker-v2 answer has no token: {answer}"))
    }

    /// What a registry needs to trust this realm's tokens: the realm's signing key as a JWKS
    /// under the libtrust id Keycloak puts in its tokens' `kid`, and its certificate. Asks for
    /// one token (as `username`) to learn that id.
    pub fn trust(&self, username: &str, password: &str) -> Result<TokenTrust> {
        let token = self.token(username, password, "repository:keycloak/probe:pull")?;
        let head = token.split('.').next().ok_or("Keycloak token is not a JWT")?;
        let head: Value = URL_SAFE_NO_PAD
            .decode(head)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("Keycloak token head does not decode")?;
        let kid = head["kid"].as_str().ok_or("Keycloak token names no kid")?;
        let certs = self.send(Request::get(&format!("/realms/{REALM}/protocol/openid-connect/certs")))?;
        let mut key = certs["keys"]
            .as_array()
            .and_then(|keys| {
                keys.iter()
                    .find(|k| k["use"] == "sig" && k["alg"] == head["alg"])
                    .cloned()
            })
            .ok_or_else(|| format!("Keycloak's realm has no {} signing key: {certs}", head["alg"]))?;
        let der = key["x5c"][0]
            .as_str()
            .ok_or("Keycloak's key has no certificate")?
            .to_string();
        key["kid"] = json!(kid);
        let jwks = self.dir.join("jwks.json");
        std::fs::write(&jwks, json!({"keys": [key]}).to_string())
            .map_err(|e| format!("write {}: {e}", jwks.display()))?;
        let wrapped: Vec<&str> = der
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect();
        STANDARD
            .decode(&der)
            .map_err(|e| format!("Keycloak's certificate is not base64: {e}"))?;
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            wrapped.join("\n")
        );
        let bundle = self.dir.join("rootcertbundle.pem");
        std::fs::write(&bundle, pem).map_err(|e| format!("write {}: {e}", bundle.display()))?;
        Ok(TokenTrust {
            realm: self.realm(),
            service: SERVICE.into(),
            issuer: self.issuer(),
            rootcertbundle: bundle,
            jwks: Some(jwks),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second start waits while the shared home is in use and says so when it gives up; once
    /// the first is done, the home is taken at once.
    #[test]
    fn a_second_run_waits_for_the_shared_home() {
        let home = std::env::temp_dir().join(format!("kc-home-{}", std::process::id()));
        std::fs::create_dir_all(&home).unwrap();
        let first = lock_home(&home, Duration::ZERO).unwrap();
        let start = std::time::Instant::now();
        let e = lock_home(&home, Duration::from_millis(400)).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(400), "{:?}", start.elapsed());
        assert!(e.contains("stayed in use by another run"), "{e}");
        drop(first);
        let start = std::time::Instant::now();
        let again = lock_home(&home, Duration::from_secs(5)).unwrap();
        assert!(start.elapsed() < Duration::from_millis(100), "{:?}", start.elapsed());
        drop(again);
        std::fs::remove_dir_all(&home).unwrap();
    }
}
