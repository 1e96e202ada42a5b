//! Owns child processes of the harness: spawning with output to a log file, readiness waits that
//! fail with the log tail, free loopback ports, and making sure no server outlives the test
//! process (a watchdog kills the server when our end of a pipe closes, which covers servers held
//! in `static` fixtures whose `Drop` never runs).

use crate::Result;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1. The listener is closed before returning, so another process can
/// in theory take it first; servers are started right after, and a bind failure shows in their log.
/// Ports are never handed out twice by one process (the kernel may offer a just-closed port again,
/// e.g. Envoy's listener and admin port asked for back to back).
pub fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("allocate a free port on 127.0.0.1: {e}"))?;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
    Err("no fresh free port on 127.0.0.1 after 50 tries".into())
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A shell running `script` with its stdin on a pipe this process holds: the pipe closes when
/// this process exits, however it exits, so a script that reads to the end of its input acts
/// then. `None` when no shell starts.
pub(crate) fn on_exit_shell(script: &str) -> Option<(Child, ChildStdin)> {
    Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
        .and_then(|mut shell| shell.stdin.take().map(|pipe| (shell, pipe)))
}

/// A running server. Killed (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// Kept open for the watchdog: when this process exits for any reason the pipe closes and
    /// the watchdog kills the server.
    watchdog: Option<(Child, ChildStdin)>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("open log {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("dup log fd: {e}"))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("start {name} ({:?}): {e}", cmd.get_program()))?;
        let pid = child.id();
        let watchdog = on_exit_shell(&format!(
            "read _ignored; kill -TERM {pid} 2>/dev/null; sleep 2; kill -KILL {pid} 2>/dev/null; true"
        ));
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
            watchdog,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Errors when the process has already exited, with its log tail.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(format!(
                "{} exited early with {status}; log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 40)
            ));
        }
        Ok(())
    }

    /// Waits until something accepts TCP connections on 127.0.0.1:port.
    pub fn wait_for_port(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.timeout_error(&format!("port {port} to accept connections"), timeout));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `GET path` on 127.0.0.1:port answers with a status `ready` accepts.
    pub fn wait_for_http(
        &mut self,
        port: u16,
        path: &str,
        ready: impl Fn(u16) -> bool,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let last = match crate::http::Request::get(path).send(port) {
                Ok(resp) if ready(resp.status) => return Ok(()),
                Ok(resp) => format!("last answer: {}", resp.status),
                Err(e) => format!("last error: {e}"),
            };
            if Instant::now() > deadline {
                return Err(self.timeout_error(&format!("GET {path} on port {port} ({last})"), timeout));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn timeout_error(&self, what: &str, timeout: Duration) -> String {
        format!(
            "{} not ready after {timeout:?} waiting for {what}; log {}:\n{}",
            self.name,
            self.log.display(),
            log_tail(&self.log, 40)
        )
    }

    /// SIGTERM, then waits up to `timeout` for the process to exit by itself; its exit status,
    /// or `None` when it had to be killed. For tests of graceful shutdown.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        if let Some((mut w, stdin)) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
            drop(stdin);
        }
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Stops the process: SIGTERM (servers flush logs on it), SIGKILL after a grace period.
    pub fn stop(&mut self) {
        if let Some((mut w, stdin)) = self.watchdog.take() {
            // Kill the watchdog before the server so it cannot signal a recycled pid later.
            let _ = w.kill();
            let _ = w.wait();
            drop(stdin);
        }
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Output of a finished command.
#[derive(Debug, Clone)]
pub struct Output {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The command line, for error messages.
    pub command: String,
}

impl Output {
    /// Turns a failure into an error naming the command and its stderr.
    pub fn ok(self) -> Result<Self> {
        if self.success {
            Ok(self)
        } else {
            Err(format!(
                "`{}` failed ({:?}):\n{}{}",
                self.command, self.code, self.stderr, self.stdout
            ))
        }
    }
}

/// Flags whose value is a secret: the command line shown in errors carries `<redacted>` instead.
const SECRET_FLAGS: &[&str] = &[
    "--creds",
    "--src-creds",
    "--dest-creds",
    "--registry-token",
    "--src-registry-token",
    "--dest-registry-token",
    // ctr's `user[:password]`.
    "--user",
];

/// The command line for messages, with secret flag values redacted so that a failing test or the
/// demo never prints a password or a token.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    let mut hide_next = false;
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if hide_next {
            parts.push("<redacted>".into());
            hide_next = false;
        } else if let Some((flag, _)) = a.split_once('=').filter(|(f, _)| SECRET_FLAGS.contains(f)) {
            parts.push(format!("{flag}=<redacted>"));
        } else {
            hide_next = SECRET_FLAGS.contains(&a.as_ref());
            parts.push(a.into_owned());
        }
    }
    parts.join(" ")
}

/// Runs a short-lived command to completion, optionally feeding stdin.
pub fn run(mut cmd: Command, stdin: Option<&[u8]>) -> Result<Output> {
    let command = describe(&cmd);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("start `{command}`: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)
            .map_err(|e| format!("write stdin of `{command}`: {e}"))?;
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    // Read stderr on a thread so a chatty command cannot fill one pipe and block on it.
    let err_pipe = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = err_pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    if let Some(mut p) = child.stdout.take() {
        let _ = p.read_to_end(&mut stdout);
    }
    if let Ok(buf) = err_thread.join() {
        stderr = buf;
    }
    let status = child.wait().map_err(|e| format!("wait for `{command}`: {e}"))?;
    Ok(Output {
        success: status.success(),
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        command,
    })
}

/// Resident memory of a process in KiB (`VmRSS`), 0 when it cannot be read: the benchmark, the
/// soak and the large-blob test all watch Envoy's memory this way.
pub fn rss_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
