//! Owns test TLS material: a throwaway certificate authority and server certificates it signs,
//! made by the `openssl` CLI at run time (nothing committed), and the harness's upstream
//! identity ([`upstream`]): every registry, token server and relay the tests put behind the
//! proxy serves HTTPS with a certificate of one upstream CA, which the proxy's clusters, the
//! controller (`--upstream-ca`) and the seeding clients trust, so no test needs to turn
//! certificate verification off.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Result;
use crate::procs;

pub struct TestCa {
    pub cert: PathBuf,
    key: PathBuf,
    dir: PathBuf,
}

/// A server certificate and its key.
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(args).current_dir(dir);
    procs::run(cmd, None)?.ok().map(|_| ())
}

impl TestCa {
    /// The CA [`TestCa::new`] made in `dir` earlier, to sign more certificates.
    pub fn existing(dir: &Path) -> Result<Self> {
        let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        if !cert.is_file() || !key.is_file() {
            return Err(format!("no test CA in {}", dir.display()));
        }
        Ok(Self {
            cert,
            key,
            dir: dir.to_path_buf(),
        })
    }

    pub fn new(dir: &Path) -> Result<Self> {
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=connector test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
            dir,
        )?;
        Ok(Self {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
            dir: dir.to_path_buf(),
        })
    }

    /// A certificate for DNS name `host`, signed by this CA.
    pub fn issue(&self, host: &str) -> Result<ServerCert> {
        let (key, csr, cert, ext) = (
            format!("{host}.key"),
            format!("{host}.csr"),
            format!("{host}.crt"),
            format!("{host}.ext"),
        );
        std::fs::write(self.dir.join(&ext), format!("subjectAltName=DNS:{host}\n"))
            .map_err(|e| format!("write {ext}: {e}"))?;
        openssl(
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={host}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
            &self.dir,
        )?;
        let (ca_cert, ca_key) = (self.cert.display().to_string(), self.key.display().to_string());
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
            &self.dir,
        )?;
        Ok(ServerCert {
            cert: self.dir.join(cert),
            key: self.dir.join(key),
        })
    }
}

impl TestCa {
    /// A certificate for `subject` (e.g. `/CN=admin/O=system:masters`) with the extension lines
    /// in `ext` (e.g. `subjectAltName=DNS:localhost,IP:127.0.0.1`), signed by this CA and saved
    /// as `<file>.crt` / `<file>.key`: the API server's serving and client certificates.
    pub fn issue_with(&self, file: &str, subject: &str, ext: &str) -> Result<ServerCert> {
        let (key, csr, cert, extfile) = (
            format!("{file}.key"),
            format!("{file}.csr"),
            format!("{file}.crt"),
            format!("{file}.ext"),
        );
        std::fs::write(self.dir.join(&extfile), format!("{ext}\n")).map_err(|e| format!("write {extfile}: {e}"))?;
        openssl(
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr,
            ],
            &self.dir,
        )?;
        let (ca_cert, ca_key) = (self.cert.display().to_string(), self.key.display().to_string());
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &extfile,
                "-out",
                &cert,
            ],
            &self.dir,
        )?;
        Ok(ServerCert {
            cert: self.dir.join(cert),
            key: self.dir.join(key),
        })
    }
}

/// The harness's upstream TLS identity: a CA (what Envoy's upstream clusters, the controller's
/// `--upstream-ca` and the seeding clients trust) and one server certificate it signs for
/// `127.0.0.1` and `localhost`, served by every upstream of the harness (Distribution, olareg,
/// nginx, the token server, the recorder). Kept apart from the proxy's CA: a client of the
/// proxy trusts the proxy, Envoy trusts the upstreams.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl UpstreamTls {
    /// The server certificate and key as a [`ServerCert`].
    pub fn server_cert(&self) -> ServerCert {
        ServerCert {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    /// A directory holding the CA as `ca.crt`: skopeo's and buildah's `--cert-dir`.
    pub fn cert_dir(&self) -> Result<PathBuf> {
        crate::http::cert_dir_for(&self.ca)
    }
}

/// Where the upstream identity lives: `<repo>/.work/upstream-tls/`, shared by the test binaries
/// and tools of one checkout (made once, remade when a day old: the certificates last two).
fn upstream_dir() -> PathBuf {
    crate::repo_root().join(".work/upstream-tls")
}

/// The harness's upstream identity ([`UpstreamTls`]), made on first use in this checkout.
pub fn upstream() -> Result<UpstreamTls> {
    static MADE: std::sync::Mutex<Option<UpstreamTls>> = std::sync::Mutex::new(None);
    let mut made = MADE.lock().map_err(|_| "upstream TLS lock poisoned")?;
    if let Some(u) = made.as_ref() {
        return Ok(u.clone());
    }
    let dir = upstream_dir();
    let fresh = std::fs::metadata(dir.join("upstream.crt"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < std::time::Duration::from_secs(86_400));
    if !fresh {
        make_upstream(&dir)?;
    }
    let u = UpstreamTls {
        ca: dir.join("ca.crt"),
        cert: dir.join("upstream.crt"),
        key: dir.join("upstream.key"),
    };
    *made = Some(u.clone());
    Ok(u)
}

/// Makes a CA and the upstream certificate in a private directory, then renames it into place,
/// so a test binary running at the same time sees either the old set or the new one, whole.
fn make_upstream(dir: &Path) -> Result<()> {
    let parent = dir.parent().ok_or("upstream TLS dir has no parent")?;
    std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("upstream-tls-new-")
        .tempdir_in(parent)
        .map_err(|e| format!("create a temp dir in {}: {e}", parent.display()))?;
    let ca = TestCa::new(tmp.path())?;
    ca.issue_with(
        "upstream",
        "/CN=connector test upstream",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
    )?;
    let tmp = tmp.keep();
    if dir.exists() {
        // Out of the way first (a directory cannot be renamed over a non-empty one).
        let old = parent.join(format!("upstream-tls-old-{}", std::process::id()));
        let _ = std::fs::rename(dir, &old);
        let _ = std::fs::remove_dir_all(&old);
    }
    if std::fs::rename(&tmp, dir).is_err() {
        // Another process put a fresh set in place meanwhile: use that one.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("upstream.crt").is_file() {
            return Err(format!("could not put the upstream TLS set in {}", dir.display()));
        }
    }
    Ok(())
}

/// A rustls server presenting `cert` (PEM chain and key files): the harness's own TLS servers
/// (the token server, the recorder) serve the upstream certificate with it.
pub(crate) fn server_config(cert: &ServerCert) -> Result<std::sync::Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(&cert.cert)
        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| format!("read {}: {e}", cert.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&cert.key).map_err(|e| format!("read {}: {e}", cert.key.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("TLS certificate {}: {e}", cert.cert.display()))?;
    Ok(std::sync::Arc::new(config))
}
