//! Owns test TLS material: a throwaway certificate authority and server certificates it signs,
//! made by the `openssl` CLI at run time (nothing committed). Used to put a real registry
//! behind HTTPS so the controller's TLS clusters (SNI, CA validation) are tested for real.

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
