//! The Python SDK's own test suite (sdk/python/tests, pytest) against this build's `moat`:
//! a fresh venv, `pip install ./sdk/python pytest`, then pytest with MOAT_BIN set. The suite
//! starts its own `moat serve` on a free port with a temp state directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::harness::{have, moat_bin, require, scratch_dir};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

/// Runs `cmd` in its own process group with its output in `log`; kills the group after
/// `limit`. Returns the exit status (None on a timeout) and the output.
fn run_logged(mut cmd: Command, log: &Path, limit: Duration) -> (Option<ExitStatus>, String) {
    use std::os::unix::process::CommandExt;
    let out = File::create(log).expect("create the log file");
    let err = out.try_clone().expect("clone the log file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the child") {
            break Some(st);
        }
        if start.elapsed() > limit {
            // The whole group: pytest and the `moat serve` it started.
            let pgid = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-TERM", "--", &pgid]).status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = Command::new("kill").args(["-KILL", "--", &pgid]).status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    (status, std::fs::read_to_string(log).unwrap_or_default())
}

fn check(what: &str, (status, output): (Option<ExitStatus>, String), limit: Duration) -> String {
    match status {
        Some(st) if st.success() => output,
        Some(st) => panic!("{what} failed ({st}):\n{output}"),
        None => panic!(
            "{what} ran past {} s and was killed:\n{output}",
            limit.as_secs()
        ),
    }
}

#[test]
fn python_sdk_pytest_suite() {
    if !require(
        have("python3"),
        "python3 (for the Python SDK's pytest suite)",
    ) {
        return;
    }
    let root = repo_root();
    let tmp = scratch_dir("sdk-python");
    let venv = tmp.join("venv");

    let mut mk = Command::new("python3");
    mk.args(["-m", "venv"]).arg(&venv);
    let limit = Duration::from_secs(180);
    let (st, out) = run_logged(mk, &tmp.join("venv.log"), limit);
    let ok = st.is_some_and(|s| s.success()) && venv.join("bin/python").exists();
    if !require(
        ok,
        &format!("python3 -m venv (Debian: apt-get install python3-venv):\n{out}"),
    ) {
        return;
    }
    let py = venv.join("bin/python");

    let limit = Duration::from_secs(600);
    let mut pip = Command::new(&py);
    pip.current_dir(&root)
        .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
        .args(["./sdk/python", "pytest"])
        .env("PIP_NO_INPUT", "1");
    check(
        "pip install ./sdk/python pytest (needs PyPI)",
        run_logged(pip, &tmp.join("pip.log"), limit),
        limit,
    );

    let limit = Duration::from_secs(900);
    let mut pytest = Command::new(&py);
    pytest
        .current_dir(&root)
        .args([
            "-m",
            "pytest",
            "sdk/python/tests",
            "-q",
            "-p",
            "no:cacheprovider",
        ])
        .env("MOAT_BIN", moat_bin())
        .env_remove("MOAT_URL")
        .env_remove("MOAT_API_KEY");
    let out = check(
        "the Python SDK's pytest suite",
        run_logged(pytest, &tmp.join("pytest.log"), limit),
        limit,
    );
    eprintln!("{out}");
    assert!(out.contains(" passed"), "pytest printed no summary:\n{out}");
    assert!(!out.contains(" skipped"), "pytest skipped tests:\n{out}");
    let _ = std::fs::remove_dir_all(&tmp);
}
