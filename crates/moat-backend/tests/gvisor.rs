//! The gvisor tier against the real runsc: the spawner starts sandboxes with `tier =
//! "gvisor"`, the same blocking client as tests/agent.rs speaks the agent protocol to them,
//! `destroy_spawned` ends them. Root and runsc only: without runsc a failure when CI=true,
//! a printed skip otherwise.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use moat_api::Status;
use moat_backend::cgroup::Cgroup;
use moat_backend::spawner::Spawner;
use moat_backend::{alive_spawned, destroy_spawned, Spawned};
use moat_proto::{Channel, Encoder, ErrorCode, Hello, PtySize, Request, Response, Role};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|v| v.split_whitespace().nth(1) == Some("0"))
            })
        })
        .unwrap_or(false)
}

/// Whether the gvisor tests can run here; prints why not (and fails in CI, where runsc must
/// be installed).
fn can_run() -> bool {
    if !is_root() {
        eprintln!("skipped: gvisor sandbox tests need root");
        return false;
    }
    if moat_backend::gvisor::find_runsc().is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("runsc is not installed: `apt-get install runsc` (CI must run the gvisor tier)");
        }
        eprintln!("skipped: runsc is not installed (apt-get install runsc)");
        return false;
    }
    true
}

/// Runs `f` on a thread and fails the test if it takes longer than `secs`.
fn fenced<F: FnOnce() + Send + 'static>(secs: u64, f: F) {
    if !can_run() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => handle.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(e) = handle.join() {
                std::panic::resume_unwind(e);
            }
        }
        Err(_) => panic!("test ran past its {secs} s fence"),
    }
}

fn start_spawner_with(env: &[(&str, &str)]) -> (Spawner, Child) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat-spawner"));
    cmd.stdin(Stdio::from(OwnedFd::from(theirs)));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    (Spawner::from_socket(ours, pid), child)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn test_dir() -> PathBuf {
    let dir = PathBuf::from(format!(
        "/run/moat-gvisor-test/{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

struct Sandbox {
    spawned: Spawned,
    socket: PathBuf,
    dir: PathBuf,
    spawner: Option<(Spawner, Child)>,
    spawn_time: Duration,
}

impl Sandbox {
    fn start() -> Sandbox {
        Self::start_with(serde_json::json!({}))
    }

    fn start_with(mut policy: serde_json::Value) -> Sandbox {
        policy["tier"] = "gvisor".into();
        let dir = test_dir();
        let socket = dir.join("agent.sock");
        let (mut spawner, child) = start_spawner_with(&[]);
        let t = Instant::now();
        let spawned = match spawner.spawn(&policy, &socket) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("spawn a gvisor sandbox: {e}");
            }
        };
        let spawn_time = t.elapsed();
        if std::env::var_os("MOAT_TEST_TIMING").is_some() {
            eprintln!("gvisor spawn took {spawn_time:?}");
        }
        assert!(alive_spawned(&spawned));
        assert!(spawned.gvisor.is_some());
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
        Sandbox {
            spawned,
            socket,
            dir,
            spawner: Some((spawner, child)),
            spawn_time,
        }
    }

    fn connect(&self) -> Client {
        Client::connect(&self.socket)
    }

    fn cgroup_oom_kills(&self) -> u64 {
        let cg = Cgroup::open(self.spawned.cgroup_paths.clone()).unwrap();
        let n = cg.oom_kills();
        let _ = cg.into_paths();
        n
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = destroy_spawned(&self.spawned);
        if !self.spawned.cgroup_paths.is_empty() {
            if let Ok(mut cg) = Cgroup::open(self.spawned.cgroup_paths.clone()) {
                let _ = cg.kill_all();
                let _ = cg.remove();
            }
        }
        if let Some((_, mut child)) = self.spawner.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn background(argv: &[&str]) -> Request {
    with(exec(argv), |r| {
        if let Request::Exec { background, .. } = r {
            *background = true;
        }
    })
}

fn with_timeout(argv: &[&str], ms: u64) -> Request {
    with(exec(argv), |r| {
        if let Request::Exec { timeout_ms, .. } = r {
            *timeout_ms = Some(ms);
        }
    })
}

/// Processes started by runsc for the sandbox whose state directory is `root` (their
/// command lines name it).
fn runsc_processes(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(marker) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn the_workload_runs_under_gvisor_and_the_agent_serves_it() {
    fenced(180, || {
        let sb = Sandbox::start();
        let l = &sb.spawned.layers;
        assert_eq!(l.tier, "gvisor");
        assert_eq!(l.landlock_abi, 0);
        assert!(l.missing.iter().any(|m| m.starts_with("landlock")), "{l:?}");
        eprintln!("layers: {l:?}; spawn {:?}", sb.spawn_time);
        let mut c = sb.connect();

        // The kernel it talks to is gVisor's: it reports itself as Linux 4.4.0 with gVisor's
        // fixed version string (this host runs another kernel), and the process the host
        // knows as the sandbox is runsc's sentry.
        let o = c.sh("uname -r; cat /proc/version");
        assert_eq!(o.exit(), (Some(0), None, Status::Ok), "{o:?}");
        assert_eq!(
            o.out(),
            "4.4.0\nLinux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016\n",
            "{o:?}"
        );
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_ne!(host.trim(), "4.4.0");
        let cmd = std::fs::read(format!("/proc/{}/cmdline", sb.spawned.pid)).unwrap();
        assert!(
            cmd.starts_with(b"runsc-sandbox\0"),
            "{}",
            String::from_utf8_lossy(&cmd)
        );

        let o = c.run(&["echo", "hello"]);
        assert_eq!(o.out(), "hello\n");
        assert!(o.started.is_some_and(|p| p > 1));
        assert_eq!(o.exit(), (Some(0), None, Status::Ok));
        let o = c.sh("echo out; echo err >&2; exit 3");
        assert_eq!(
            (o.out().as_str(), o.stderr.as_slice()),
            ("out\n", &b"err\n"[..])
        );
        assert_eq!(o.exit(), (Some(3), None, Status::Ok));

        // Who and where: the sandbox user, no capabilities, the working directory, the
        // sanitised /etc, the hostname; moat's control directory cannot be entered.
        // (gVisor's /proc/PID/status has no NoNewPrivs line to check.)
        let o = c.sh(
            "id -u; id -g; pwd; echo $HOME; hostname; grep CapEff /proc/self/status; \
             grep -c . /etc/passwd; ls /.moat 2>/dev/null || echo no-ctl",
        );
        assert_eq!(
            o.out(),
            "1000\n1000\n/work\n/work\nsandbox\nCapEff:\t0000000000000000\n3\nno-ctl\n",
            "{o:?}"
        );
        // No /sys (an empty one), a writable /dev/shm and gVisor's minimal /dev.
        let o = c
            .sh("ls -A /sys | wc -l; touch /dev/shm/x && echo shm; test -c /dev/null && echo null");
        assert_eq!(o.out(), "0\nshm\nnull\n", "{o:?}");
        // Read-only root, host directories and agent binary; writable /tmp and /work.
        let o = c.sh(
            "touch /x 2>/dev/null || echo root-ro; touch /usr/x 2>/dev/null || echo usr-ro; \
             echo x > /.moat-agent 2>/dev/null || echo agent-ro; touch /tmp/a /work/b && echo rw",
        );
        assert_eq!(o.out(), "root-ro\nusr-ro\nagent-ro\nrw\n", "{o:?}");

        // Files through the agent.
        let o = c.write_file("/work/sub/f.txt", b"through gVisor");
        assert_eq!(o.last, Some(Response::FileDone { bytes: 14 }), "{o:?}");
        let o = c.read_file("/work/sub/f.txt");
        assert_eq!(o.stdout, b"through gVisor");
        assert_eq!(c.sh("cat /work/sub/f.txt").out(), "through gVisor");
        let o = c.read_file("/etc/shadow");
        assert!(matches!(o.last, Some(Response::Error { .. })), "{o:?}");

        // Background processes.
        let o = c.call(&background(&["sleep", "777"]));
        let Some(Response::Started { pid: sleeper }) = o.last else {
            panic!("{o:?}");
        };
        let procs = c.procs();
        assert!(
            procs
                .iter()
                .any(|p| p.pid == sleeper && p.running && p.argv == ["sleep", "777"]),
            "{procs:?}"
        );
        c.ok(&Request::SignalPid {
            pid: sleeper,
            signal: 9,
        });

        // Timeouts kill the process group.
        let t = Instant::now();
        let o = c.call(&with_timeout(&["sh", "-c", "sleep 100 & sleep 100"], 300));
        assert_eq!(o.exit(), (None, Some(9), Status::Timeout));
        assert!(t.elapsed() < Duration::from_secs(10));

        // stdin relay, and cancel.
        let s = c.request(&with(exec(&["cat"]), set_stdin));
        assert!(matches!(c.first_response(s), Response::Started { .. }));
        c.stdin(s, b"piped ");
        c.stdin(s, b"bytes");
        c.eof(s);
        assert_eq!(c.finish(s).out(), "piped bytes");
        let s = c.request(&exec(&["sleep", "100"]));
        assert!(matches!(c.first_response(s), Response::Started { .. }));
        c.cancel(s);
        assert_eq!(c.finish(s).exit(), (None, Some(9), Status::Killed));

        // Not found is an error, as in the native tier.
        assert_eq!(c.run(&["no-such-program-xyz"]).error(), ErrorCode::NotFound);

        // The workload cannot take the agent down.
        let o = c.sh("kill -KILL 1; kill -TERM 1; echo sent");
        assert_eq!(o.out(), "sent\n");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(c.run(&["true"]).exit(), (Some(0), None, Status::Ok));

        // Nor look into it: no ptrace, no /proc/1/mem. (Where gVisor differs from Linux, as
        // accepted here: /proc/1/maps and /proc/1/environ, which hold only the agent's
        // address layout and its PATH, are readable.)
        let script = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
print(libc.ptrace(16, 1, 0, 0), os.strerror(ctypes.get_errno()))
try:
    open("/proc/1/mem", "rb")
    print("mem open")
except OSError as e:
    print(e.strerror)
"#;
        let o = c.run(&["python3", "-c", script]);
        assert_eq!(
            o.out(),
            "-1 Operation not permitted\nPermission denied\n",
            "{o:?}"
        );

        // No network but loopback.
        let o = c.sh("cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '");
        assert_eq!(o.out(), "lo\n", "{o:?}");

        // A foreground process dies with its connection.
        let mut c2 = sb.connect();
        let s = c2.request(&exec(&["sleep", "1001"]));
        assert!(matches!(c2.first_response(s), Response::Started { .. }));
        drop(c2);
        let deadline = Instant::now() + Duration::from_secs(10);
        while c
            .sh("cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
            .out()
            .contains("sleep 1001")
        {
            assert!(
                Instant::now() < deadline,
                "the closed connection's process lives on"
            );
            std::thread::sleep(Duration::from_millis(50));
        }

        if std::env::var_os("MOAT_TEST_TIMING").is_some() {
            let t = Instant::now();
            for _ in 0..20 {
                c.run(&["true"]);
            }
            eprintln!("gvisor exec of true, round trip: {:?}", t.elapsed() / 20);
        }
    });
}

fn cgroup_value(sb: &Sandbox, file: &str) -> Option<u64> {
    sb.spawned
        .cgroup_paths
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The policy's process limit holds inside gVisor (a fork loop gets EAGAIN, the sandbox
/// lives on); going over the memory limit is an OOM kill in the sandbox's cgroup. In the
/// gvisor tier the kernel's OOM killer takes the whole sandbox (the sentry holds all of the
/// workload's memory), where the native tier loses only the biggest process: the daemon
/// reports `oom` from the cgroup's OOM count either way.
#[test]
fn fork_loops_and_memory_balloons_are_stopped() {
    fenced(180, || {
        let sb = Sandbox::start_with(serde_json::json!({"limits": {"pids": 32, "memory": "96M"}}));
        let mut c = sb.connect();
        let o = c.call(&with_timeout(
            &[
                "sh",
                "-c",
                "i=0; while [ $i -lt 200 ]; do (sleep 30 &) 2>/dev/null; i=$((i+1)); done; \
                 echo done",
            ],
            60_000,
        ));
        assert_eq!(o.out(), "done\n", "{o:?}");
        // The agent still starts processes (its real uid is another), and the sandbox user
        // has at most its limit's worth (plus this ps, which the agent started).
        let o = c.run(&["ps", "-e", "-o", "user="]);
        let procs = o.out().lines().filter(|l| l.trim() == "user").count();
        assert!((20..=33).contains(&procs), "{procs}: {}", o.out());
        let (cur, max) = (
            cgroup_value(&sb, "pids.current").unwrap(),
            cgroup_value(&sb, "pids.max").unwrap(),
        );
        assert!(cur < max, "{cur} host tasks of {max}");
        eprintln!("32 workload processes: {cur} host tasks (limit {max})");
        assert!(alive_spawned(&sb.spawned));
        assert_eq!(c.run(&["echo", "alive"]).out(), "alive\n");
        // Every process of the sandbox user, but not the agent (another real uid).
        c.sh("kill -9 -1");
        assert_eq!(c.run(&["echo", "still"]).out(), "still\n");
        drop(c);

        let mut c = sb.connect();
        assert_eq!(sb.cgroup_oom_kills(), 0);
        let t = Instant::now();
        let s = c.request(&with_timeout(&["tail", "/dev/zero"], 60_000));
        // The balloon ends: killed, or its sandbox killed under it (the connection closes).
        if let Some(r) = c.try_final(s) {
            assert!(
                matches!(
                    r,
                    Response::Exit {
                        signal: Some(9),
                        ..
                    }
                ),
                "{r:?}"
            );
        }
        assert!(t.elapsed() < Duration::from_secs(50));
        assert!(
            sb.cgroup_oom_kills() > 0,
            "no OOM kill in the sandbox's cgroup"
        );
        let limit = cgroup_value(&sb, "memory.limit_in_bytes")
            .or_else(|| cgroup_value(&sb, "memory.max"))
            .unwrap();
        assert_eq!(limit, (96 << 20) + moat_backend::gvisor::MEMORY_HEADROOM);
        eprintln!(
            "balloon ended after {:?}; sandbox alive: {}",
            t.elapsed(),
            alive_spawned(&sb.spawned)
        );
    });
}

/// The daemon's path: the spawner that started the sandbox dies, the sandbox lives on; a
/// later process re-attaches from the stored `Spawned` (as JSON, like the registry row) and
/// destroys it, which leaves no process, state directory, socket or mount behind, and the
/// cgroup removable.
#[test]
fn sandboxes_outlive_the_spawner_and_destroy_leaves_nothing() {
    fenced(120, || {
        let mut sb = Sandbox::start();
        let mut c = sb.connect();
        c.call(&background(&["sleep", "1000"]));
        drop(c);
        let (spawner, mut child) = sb.spawner.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        drop(spawner);
        std::thread::sleep(Duration::from_millis(200));

        let row = serde_json::to_string(&sb.spawned).unwrap();
        let back: Spawned = serde_json::from_str(&row).unwrap();
        assert_eq!(back, sb.spawned);
        assert!(alive_spawned(&back));
        let mut c = sb.connect();
        assert_eq!(c.run(&["echo", "still here"]).out(), "still here\n");
        assert!(c
            .procs()
            .iter()
            .any(|p| p.running && p.argv == ["sleep", "1000"]));
        drop(c);

        let state = back.gvisor.clone().unwrap();
        let marker = format!("--root={}", state.dir.join("state").display());
        let before = runsc_processes(&marker);
        assert!(before.len() >= 2, "gofer and sandbox: {before:?}");
        assert!(before.contains(&back.pid));
        let t = Instant::now();
        destroy_spawned(&back).unwrap();
        eprintln!("destroy took {:?}", t.elapsed());
        assert!(!alive_spawned(&back));
        assert_eq!(runsc_processes(&marker), Vec::<u32>::new());
        for p in before {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
            assert!(
                status.is_empty() || status.contains("State:\tZ"),
                "{p} survived"
            );
        }
        assert!(!state.dir.exists(), "{} is left", state.dir.display());
        assert!(
            std::fs::symlink_metadata(&sb.socket).is_err(),
            "the socket link is left"
        );
        assert!(UnixStream::connect(&sb.socket).is_err());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&state.id), "{mounts}");
        // Nothing is left in the cgroup: it is removed at once.
        for p in &sb.spawned.cgroup_paths {
            std::fs::remove_dir(p).unwrap_or_else(|e| panic!("rmdir {}: {e}", p.display()));
        }
        sb.spawned.cgroup_paths.clear();
        // Again: fine.
        destroy_spawned(&back).unwrap();
    });
}

/// A row stored before the gvisor tier existed still parses, as a native sandbox.
#[test]
fn old_registry_rows_parse_as_native() {
    let row = r#"{"pid": 42, "start_time": 7, "cgroup_paths": [],
        "layers": {"tier": "native", "landlock_abi": 6, "seccomp": true, "cgroup": "v2"}}"#;
    let s: Spawned = serde_json::from_str(row).unwrap();
    assert!(s.gvisor.is_none());
    assert!(!serde_json::to_string(&s).unwrap().contains("gvisor"));
}

/// Where runsc is missing, a gvisor spawn is refused with what to install; a policy the tier
/// cannot run (its own root) is refused with why.
#[test]
fn a_host_without_runsc_refuses_the_tier_saying_what_to_install() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = test_dir();
    let (mut spawner, mut child) = start_spawner_with(&[("MOAT_RUNSC", "/nonexistent/runsc")]);
    let e = spawner
        .spawn(
            &serde_json::json!({"tier": "gvisor"}),
            &dir.join("agent.sock"),
        )
        .unwrap_err();
    assert!(e.contains("apt-get install runsc"), "{e}");
    assert!(!dir.join("agent.sock").exists());
    // A root of the policy's own is refused too, saying why.
    let e = spawner
        .spawn(
            &serde_json::json!({"tier": "gvisor", "fs": {"root": "/srv"}}),
            &dir.join("agent.sock"),
        )
        .unwrap_err();
    assert!(e.contains("fs.root"), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `moat doctor`'s view: runsc's path and version, and each platform tried.
#[test]
fn the_probe_reports_runsc_and_its_platforms() {
    if !can_run() {
        return;
    }
    let p = moat_backend::gvisor::probe();
    assert!(p.path.is_some());
    assert!(
        p.version.as_deref().is_some_and(|v| v.contains("runsc")),
        "{p:?}"
    );
    let ptrace = p.platforms.iter().find(|(n, _)| n == "ptrace").unwrap();
    assert!(ptrace.1.is_ok(), "{p:?}");
    assert!(p.platforms.iter().any(|(n, _)| n == "kvm"), "{p:?}");
    let checks = moat_backend::probe::gvisor_checks(&p);
    assert_eq!(checks[0].name, "gvisor (runsc)");
    assert!(checks.iter().all(|c| c.ok || c.fix.is_some()), "{checks:?}");
    assert!(moat_backend::probe::gvisor_available(&checks));
    eprintln!("{p:?}");
    // Nothing of the probes is left.
    let left: Vec<_> = std::fs::read_dir(moat_backend::gvisor::base_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("gprobe"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(runsc_processes("moat-gprobe").is_empty());
}

/// Pause and resume as the daemon does them, by the cgroup freezer: a frozen gvisor sandbox
/// runs nothing (a running counter stops), a thawed one goes on; its stats come from the
/// same cgroup.
#[test]
fn the_cgroup_freezer_pauses_and_resumes_it() {
    fenced(120, || {
        let sb = Sandbox::start();
        let mut c = sb.connect();
        c.call(&background(&[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.01; done",
        ]));
        std::thread::sleep(Duration::from_millis(300));
        let cg = Cgroup::open(sb.spawned.cgroup_paths.clone()).unwrap();
        let stats = cg.stats();
        assert!(stats.pids > 10 && stats.memory_bytes > 0, "{stats:?}");
        cg.freeze().unwrap();
        assert!(cg.is_frozen());
        std::thread::sleep(Duration::from_millis(300));
        cg.thaw().unwrap();
        let a = c.read_file("/tmp/n").out();
        std::thread::sleep(Duration::from_millis(300));
        let b = c.read_file("/tmp/n").out();
        assert_ne!(a, b, "the counter did not go on after the thaw");
        // Frozen: the agent does not answer.
        cg.freeze().unwrap();
        let mut frozen = UnixStream::connect(&sb.socket).unwrap();
        frozen
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut out = Vec::new();
        Encoder::new()
            .hello(&mut out, &Hello::new(Role::Host))
            .unwrap();
        frozen.write_all(&out).unwrap();
        let mut buf = [0u8; 64];
        assert!(frozen.read(&mut buf).is_err());
        cg.thaw().unwrap();
        let _ = cg.into_paths();
        assert_eq!(c.run(&["echo", "resumed"]).out(), "resumed\n");
    });
}

/// With MOAT_TEST_TIMING: a gvisor spawn (to the agent's first answer) against `runsc
/// --network=none do true`, each the median of 5.
#[test]
fn timing_against_runsc_do() {
    if std::env::var_os("MOAT_TEST_TIMING").is_none() || !can_run() {
        return;
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let runsc = moat_backend::gvisor::find_runsc().unwrap();
    let mut d = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let st = Command::new(&runsc)
            .args(["--network=none", "do", "true"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        d.push(t.elapsed());
    }
    let mut s = Vec::new();
    let mut e = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let sb = Sandbox::start();
        let mut c = sb.connect();
        assert_eq!(c.run(&["true"]).exit(), (Some(0), None, Status::Ok));
        e.push(t.elapsed());
        s.push(sb.spawn_time);
    }
    eprintln!(
        "runsc do true: {:?}; gvisor spawn: {:?}; spawn + first exec: {:?}",
        median(d),
        median(s),
        median(e)
    );
}

/// The egress relay works unchanged: a workload connection to the agent's loopback port in
/// gVisor's network stack arrives raw on a host connection that asked for a relay, both ways.
#[test]
fn the_egress_relay_carries_a_workload_connection() {
    fenced(120, || {
        let sb = Sandbox::start_with(serde_json::json!({"network": {"mode": "allowlist"}}));
        let mut relay = ask_relay(&sb.socket);
        let mut c = sb.connect();
        let script = r#"
import socket
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"hello from gvisor")
s.shutdown(socket.SHUT_WR)
got = b""
while True:
    b = s.recv(1 << 16)
    if not b:
        break
    got += b
print(got.decode())
"#;
        let bg = c.request(&background(&["python3", "-c", script]));
        let pid = match c.first_response(bg) {
            Response::Started { pid } => pid,
            other => panic!("{other:?}"),
        };
        let f = read_exact_frame(&mut relay);
        let Response::Relayed { peer_port } = f.response().unwrap() else {
            panic!("{f:?}")
        };
        assert!(peer_port > 0);
        let mut got = Vec::new();
        relay.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello from gvisor");
        relay.write_all(b"and back").unwrap();
        relay.shutdown(std::net::Shutdown::Write).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let out = loop {
            let o = c.call(&Request::ProcOutput { pid, follow: true });
            if matches!(o.last, Some(Response::Exit { .. })) {
                break o;
            }
            assert!(Instant::now() < deadline, "the workload did not finish");
        };
        assert_eq!(out.out(), "and back\n", "{out:?}");
    });
}

/// A pty exec: output (stderr merged), size, resize and input, as in the native tier.
#[test]
fn pty_exec_and_resize_in_gvisor() {
    fenced(60, || {
        let sb = Sandbox::start();
        let mut c = sb.connect();
        let pty = |rows, cols| {
            move |r: &mut Request| {
                if let Request::Exec { pty, .. } = r {
                    *pty = Some(PtySize { rows, cols });
                }
            }
        };
        let o = c.call(&with(
            exec(&["sh", "-c", "echo out; echo err >&2"]),
            pty(24, 80),
        ));
        assert_eq!(o.out(), "out\r\nerr\r\n");
        assert_eq!(o.eofs, [Channel::Stdout], "no channel 2 with a pty");
        assert_eq!(o.exit(), (Some(0), None, Status::Ok));

        let o = c.call(&with(exec(&["stty", "size"]), pty(24, 80)));
        assert_eq!(o.out().trim(), "24 80");

        let s = c.request(&with(
            with(
                exec(&["sh", "-c", "read x; stty size; echo got $x"]),
                pty(24, 80),
            ),
            set_stdin,
        ));
        assert!(matches!(c.first_response(s), Response::Started { .. }));
        c.ok(&Request::Resize {
            stream: s,
            rows: 30,
            cols: 100,
        });
        c.stdin(s, b"go\n");
        let o = c.finish(s);
        let out = o.out();
        assert!(out.contains("30 100"), "{out:?}");
        assert!(out.contains("got go"), "{out:?}");
        // Where gVisor (runsc 20221219) differs from Linux, as this test accepts: tty(1)
        // prints nothing and /dev/tty cannot be opened (EIO), and the end of stdin sent as
        // the terminal's Ctrl-D does not end a reader's input; the terminal's output, size
        // and input work as on Linux.
        // Resize of a process without a pty.
        let s = c.request(&exec(&["sleep", "100"]));
        c.first_response(s);
        let o = c.call(&Request::Resize {
            stream: s,
            rows: 1,
            cols: 1,
        });
        assert_eq!(o.error(), ErrorCode::InvalidRequest);
        c.cancel(s);
        c.finish(s);
    });
}

/// The policy's mounts: read-only ones cannot be written, read-write ones can, and what the
/// workload writes there is the sandbox user's on the host too.
#[test]
fn policy_mounts_are_bound_read_only_or_read_write() {
    fenced(60, || {
        let host = test_dir();
        let (ro, rw) = (host.join("ro"), host.join("rw"));
        std::fs::create_dir_all(&ro).unwrap();
        std::fs::create_dir_all(&rw).unwrap();
        std::fs::write(ro.join("given"), "from the host").unwrap();
        std::fs::set_permissions(&rw, std::fs::Permissions::from_mode(0o777)).unwrap();
        let sb = Sandbox::start_with(serde_json::json!({"fs": {"mount": [
            {"src": ro.display().to_string(), "dst": "/in"},
            {"src": rw.display().to_string(), "dst": "/out", "rw": true},
        ]}}));
        let mut c = sb.connect();
        let o = c.sh(
            "cat /in/given; echo; touch /in/x 2>/dev/null || echo ro; echo made > /out/f && echo rw",
        );
        assert_eq!(o.out(), "from the host\nro\nrw\n", "{o:?}");
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(rw.join("f")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 1000));
        assert_eq!(std::fs::read_to_string(rw.join("f")).unwrap(), "made\n");
        drop(c);
        drop(sb);
        let _ = std::fs::remove_dir_all(&host);
    });
}

/// An allowlist sandbox with a CA (as the daemon starts one whose secrets are bound) trusts
/// it, as in the native tier: the CA's files, the system bundle with it, the variables.
#[test]
fn an_allowlist_sandbox_trusts_its_proxy_ca() {
    fenced(60, || {
        let dir = test_dir();
        let socket = dir.join("agent.sock");
        let (mut spawner, mut child) = start_spawner_with(&[]);
        let ca = "-----BEGIN CERTIFICATE-----\nMOATTESTCA\n-----END CERTIFICATE-----\n";
        let policy = serde_json::json!({"tier": "gvisor", "network": {"mode": "allowlist"}});
        let spawned = spawner.spawn_with_ca(&policy, &socket, Some(ca)).unwrap();
        let sb = Sandbox {
            spawned,
            socket,
            dir,
            spawner: None,
            spawn_time: Duration::ZERO,
        };
        let mut c = sb.connect();
        let o = c.sh(
            "cat /etc/ssl/moat-ca.crt; tail -n 3 /etc/ssl/certs/ca-certificates.crt; \
             echo $SSL_CERT_FILE $HTTPS_PROXY",
        );
        assert_eq!(
            o.out(),
            format!("{ca}{ca}/etc/ssl/moat-bundle.crt http://127.0.0.1:3128\n"),
            "{o:?}"
        );
        drop(c);
        drop(sb);
        child.kill().unwrap();
        child.wait().unwrap();
    });
}
