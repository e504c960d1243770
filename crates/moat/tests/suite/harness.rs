//! Test harness: runs the real `moat` binary inside a fence and parses its results.

#![allow(dead_code)]

use moat_api::ExecResult;
use moat_backend::cgroup::{self, Cgroup};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The `moat` binary under test.
pub fn moat_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moat"))
}

/// The tier this run of the suite tests: `$MOAT_TIER` (`native` or `gvisor`), which every
/// `moat` the tests start inherits (`moat run`'s and `moat serve`'s default tier). CI runs
/// the whole suite once per tier.
pub fn tier() -> &'static str {
    static TIER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TIER.get_or_init(|| match std::env::var("MOAT_TIER").as_deref() {
        Ok("gvisor") => "gvisor".into(),
        Ok("native") | Ok("") | Err(_) => "native".into(),
        Ok(other) => panic!("MOAT_TIER={other}: the suite knows the tiers native and gvisor"),
    })
}

/// Whether this run tests the gvisor tier.
pub fn gvisor() -> bool {
    tier() == "gvisor"
}

pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// When `ok` is false: fails in CI, skips (returns false) with a printed reason elsewhere.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("required for this test and missing in CI: {what}");
    }
    eprintln!("SKIP: {what}");
    false
}

/// Whether an executable exists on the host.
pub fn have(bin: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| Path::new(d).join(bin).is_file())
}

/// The fence: a cgroup with its own memory and pids limits that the moat process (and so
/// every sandbox it nests under itself) runs in.
pub struct Fence {
    cg: Option<Cgroup>,
}

static FENCE_SEQ: AtomicU32 = AtomicU32::new(0);

impl Fence {
    pub fn new() -> Fence {
        let host = cgroup::Host::detect();
        let name = format!(
            "moattest-{}-{}",
            std::process::id(),
            FENCE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let cg = Cgroup::create(
            &host,
            &name,
            cgroup::Limits {
                memory: 3 << 30,
                // gVisor's ptrace platform backs every task of a sandbox with host threads
                // (the stubs) besides the sentry's own: its load tests need more.
                pids: if gvisor() { 8192 } else { 2048 },
                cpus: 2.0,
            },
        );
        match cg {
            Ok(cg) => Fence { cg: Some(cg) },
            Err(e) => {
                require(false, &format!("a test cgroup fence ({e})"));
                Fence { cg: None }
            }
        }
    }

    /// The fence's cgroup directories.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.cg.as_ref().map(|c| c.paths()).unwrap_or_default()
    }

    /// A shell prefix that moves the shell into the fence before it execs moat.
    pub fn prefix(&self) -> String {
        let mut s = String::new();
        if let Some(cg) = &self.cg {
            for f in cg.procs_files() {
                s.push_str(&format!("echo $$ > '{}' && ", f.display()));
            }
        }
        s
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        if let Some(mut cg) = self.cg.take() {
            cg.destroy();
        }
    }
}

/// Output of one `moat` invocation.
pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// The `--json` result.
    pub fn json(&self) -> ExecResult {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "moat did not print a JSON result ({e}); exit {} stdout: {} stderr: {}",
                self.code,
                self.stdout_str(),
                self.stderr
            )
        })
    }
}

/// Runs `moat ARGS...` inside a fresh fence, with `stdin` as its input, killed after
/// `limit` (the fence's own timeout).
pub fn moat_raw(args: &[&str], stdin: Option<&[u8]>, limit: Duration) -> Run {
    moat_raw_env(args, stdin, limit, &[])
}

/// [`moat_raw`] with extra variables in moat's own environment.
pub fn moat_raw_env(
    args: &[&str],
    stdin: Option<&[u8]>,
    limit: Duration,
    env: &[(&str, &str)],
) -> Run {
    let fence = Fence::new();
    let mut script = fence.prefix();
    script.push_str("exec \"$0\" \"$@\"");
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script).arg(moat_bin()).args(args);
    cmd.envs(env.iter().copied());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn moat");
    if let Some(data) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fence timeout: moat {args:?} ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    drop(fence);
    use std::os::unix::process::ExitStatusExt;
    Run {
        code: status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

/// `moat run --json OPTS -- CMD...` with a 60 s fence.
pub fn run_json(opts: &[&str], cmd: &[&str]) -> ExecResult {
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(opts);
    args.push("--");
    args.extend_from_slice(cmd);
    moat_raw(&args, None, Duration::from_secs(60)).json()
}

/// Runs a shell script in the sandbox (`sh -c SCRIPT`), JSON result.
pub fn sh(opts: &[&str], script: &str) -> ExecResult {
    run_json(opts, &["/bin/sh", "-c", script])
}

/// Compiles a C program from `tests/attacks/NAME.c` with the host's cc into a fresh directory,
/// returning that directory (bind it into the sandbox with `--mount DIR:/attack`).
pub fn compile_c(name: &str) -> Option<PathBuf> {
    if !require(have("cc"), "a C compiler (cc) to build the attack programs") {
        return None;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/attacks/{name}.c"));
    let dir = scratch_dir(name);
    let out = dir.join(name);
    let st = Command::new("cc")
        .args(["-O1", "-w", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(st.success(), "compiling {}", src.display());
    Some(dir)
}

/// A fresh host directory for a test, under `$TMPDIR/moat-tests/`. Directories left by test
/// processes that are gone are removed the first time this runs.
pub fn scratch_dir(name: &str) -> PathBuf {
    static CLEANED: std::sync::Once = std::sync::Once::new();
    let base = std::env::temp_dir().join("moat-tests");
    CLEANED.call_once(|| {
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let pid = n.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
                if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    });
    let dir = base.join(format!(
        "{name}-{}-{}",
        std::process::id(),
        FENCE_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    // Reachable by the sandbox's own host uid range (for `:rw` mounts of subdirectories).
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755));
    dir
}

/// Runs an attack program built by [`compile_c`] with `args`, mounted at `/attack`.
pub fn attack(dir: &Path, name: &str, args: &[&str], opts: &[&str]) -> ExecResult {
    let mount = format!("{}:/attack", dir.display());
    let mut o: Vec<&str> = vec!["--mount", &mount];
    o.extend_from_slice(opts);
    let bin = format!("/attack/{name}");
    let mut cmd: Vec<&str> = vec![&bin];
    cmd.extend_from_slice(args);
    run_json(&o, &cmd)
}

/// A snapshot of host state that a sandbox must leave as it found it.
#[derive(Debug, PartialEq, Eq)]
pub struct HostState {
    pub mounts: usize,
    pub moat_cgroups: Vec<String>,
    pub fds: usize,
}

pub fn host_state() -> HostState {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| s.lines().count())
        .unwrap_or(0);
    let host = cgroup::Host::detect();
    let mut moat_cgroups = Vec::new();
    for (_, p) in &host.parents {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("moat-") {
                    moat_cgroups.push(format!("{}/{n}", p.display()));
                }
            }
        }
    }
    moat_cgroups.sort();
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    HostState {
        mounts,
        moat_cgroups,
        fds,
    }
}

/// Processes on the host whose command line mentions `needle`.
pub fn host_processes_matching(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let s = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if s.contains(needle) {
                    out.push(format!("{name}: {s}"));
                }
            }
        }
    }
    out
}

/// The expected output of an attack program: `RAN <action>` then `lines`, one a line.
pub fn expect(action: &str, lines: &[String]) -> String {
    let mut s = format!("RAN {action}\n");
    for l in lines {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// Whether `path` exists on the host (without following a final symlink).
pub fn host_has(path: &str) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
