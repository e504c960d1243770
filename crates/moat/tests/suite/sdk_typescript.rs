//! The TypeScript SDK (`sdk/typescript`, npm package `moat-sdk`): its own suite, node's test
//! runner, run against this build's `moat` (MOAT_BIN). The suite starts its own `moat serve`
//! on a free port with a temporary state directory, deletes every sandbox it made and stops
//! the daemon. Needs node (>= 18) and npm; the npm registry for `npm ci` (typescript and
//! @types/node, dev dependencies only).

use super::harness::{have, require};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/typescript")
}

/// Runs `npm ARGS` in the SDK's directory in a process group of its own, output to a file;
/// past `limit` the whole group is killed. Answers (success, output).
fn npm(args: &[&str], limit: Duration) -> (bool, String) {
    let dir = sdk_dir();
    let log_path = std::env::temp_dir().join(format!(
        "moat-sdk-ts-{}-{}.log",
        std::process::id(),
        args.join("-")
    ));
    let log = File::create(&log_path).unwrap();
    let mut child = Command::new("npm")
        .args(args)
        .current_dir(&dir)
        .env("MOAT_BIN", env!("CARGO_BIN_EXE_moat"))
        .env_remove("MOAT_URL")
        .env_remove("MOAT_API_KEY")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn npm {args:?} in {}: {e}", dir.display()));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > limit {
            let _ = moat_sys::process::kill_group(child.id() as i32, libc::SIGKILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    match status {
        Some(st) => (st.success(), format!("npm {args:?}: {st}\n{out}")),
        None => (
            false,
            format!("npm {args:?}: killed after {limit:?} (the limit)\n{out}"),
        ),
    }
}

#[test]
fn typescript_sdk_suite() {
    if !require(
        have("node") && have("npm"),
        "node (>= 18) and npm, for the TypeScript SDK's suite (sdk/typescript)",
    ) {
        return;
    }
    let (ok, out) = npm(
        &["ci", "--no-audit", "--no-fund", "--prefer-offline"],
        Duration::from_secs(600),
    );
    assert!(ok, "npm ci in sdk/typescript failed:\n{out}");
    let (ok, out) = npm(&["test"], Duration::from_secs(900));
    assert!(ok, "the TypeScript SDK's suite failed:\n{out}");
    // Everything the suite checked passed; show its summary in the test's output.
    for line in out.lines().filter(|l| l.starts_with("# ")) {
        println!("{line}");
    }
    assert!(
        out.contains("# fail 0") && !out.contains("# pass 0"),
        "the suite's summary is not a pass:\n{out}"
    );
}
