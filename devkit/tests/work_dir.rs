//! A work directory held by a `static` (whose `Drop` never runs, like the e2e tests' shared
//! stacks) is removed when the process that made it exits.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use connector_devkit::WorkDir;

const NAME: &str = "a_work_dir_held_by_a_static_is_removed_when_the_process_exits";

#[test]
fn a_work_dir_held_by_a_static_is_removed_when_the_process_exits() {
    if std::env::var_os("WORK_DIR_CHILD").is_some() {
        static HELD: OnceLock<WorkDir> = OnceLock::new();
        let held = HELD.get_or_init(|| WorkDir::new("static-held").unwrap());
        std::fs::write(held.path().join("log"), "kept open by nobody").unwrap();
        println!("HELD={}", held.path().display());
        return;
    }
    // This same test, run in a child process, makes the directory and exits.
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
        .env("WORK_DIR_CHILD", "1")
        .env_remove("CONNECTOR_KEEP_WORK")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The harness prints the test's name first, on the same line.
    let held = stdout
        .split("HELD=")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_else(|| panic!("the child printed no directory: {stdout}"));
    let held = Path::new(held);
    assert!(
        held.starts_with(connector_devkit::repo_root().join(".work")),
        "{}",
        held.display()
    );
    // It goes once the child's end of the sweeper's pipe has closed: a moment after its exit.
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!held.exists(), "{} was left behind", held.display());
}
