//! Owns the benchmark's static upstream: nginx (Debian's `nginx-light`) serving a manifest's
//! exact bytes with the registry's headers. Distribution itself tops out near 1,700 manifest
//! GETs/s here whatever the CPU, so it hides the proxy's cost; nginx answers tens of thousands,
//! which makes Envoy (with or without the filter) the limit and the comparison a hard one.
//! It serves HTTPS with the harness's upstream certificate, like every upstream of the harness.

use crate::procs::{self, Proc};
use crate::{Result, WorkDir};
use std::process::Command;
use std::time::Duration;

pub struct StaticUpstream {
    pub port: u16,
    proc: Proc,
}

impl StaticUpstream {
    /// Serves `body` at `path` (e.g. `/v2/bench/app/manifests/v1`) as `content_type`.
    pub fn start(work: &WorkDir, path: &str, body: &[u8], content_type: &str, digest: &str) -> Result<Self> {
        let dir = work.sub("static-upstream")?;
        let root = dir.join("root");
        let file = root.join(path.trim_start_matches('/'));
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
        }
        std::fs::write(&file, body).map_err(|e| format!("write {}: {e}", file.display()))?;
        let port = procs::free_port()?;
        let tls = crate::tls::upstream()?;
        let d = dir.display();
        // One process (no master) so stopping it stops everything; all paths in the work dir.
        // TLS with keep-alive connections that last the run: nginx closes one after 1,000
        // requests by default, and a TLS handshake every 1,000 requests is not what we measure.
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/tmp-body;\n  proxy_temp_path {d}/tmp-proxy;\n\
               fastcgi_temp_path {d}/tmp-fcgi;\n  uwsgi_temp_path {d}/tmp-uwsgi;\n  scgi_temp_path {d}/tmp-scgi;\n\
               server {{\n    listen 127.0.0.1:{port} ssl;\n    root {};\n\
                 ssl_certificate {};\n    ssl_certificate_key {};\n    keepalive_requests 1000000;\n\
                 location = /v2/ {{\n      default_type application/json;\n      return 200 '{{}}';\n    }}\n\
                 location = {path} {{\n      default_type {content_type};\n\
                   add_header Docker-Content-Digest {digest};\n\
                   add_header Docker-Distribution-Api-Version registry/2.0;\n    }}\n  }}\n}}\n",
            root.display(),
            tls.cert.display(),
            tls.key.display(),
        );
        let cfg = dir.join("nginx.conf");
        std::fs::write(&cfg, config).map_err(|e| format!("write {}: {e}", cfg.display()))?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-c").arg(&cfg).arg("-p").arg(&dir);
        crate::http::trust_port(port, &tls.ca);
        let mut proc = Proc::spawn("nginx", cmd, &dir.join("nginx.log"))?;
        proc.wait_for_http(port, path, |s| s == 200, Duration::from_secs(10))?;
        Ok(Self { port, proc })
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }
}
