//! Persistent sandboxes against the real kernel: the spawner starts them, a small blocking
//! client speaks the agent protocol to them over their unix socket, `destroy` ends them.
//! Root only (uid ranges, cgroups); skipped with a note otherwise.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use moat_api::Status;
use moat_backend::spawner::Spawner;
use moat_backend::{alive, destroy, Spawned};
use moat_proto::{Channel, Encoder, ErrorCode, FrameKind, PtySize, Request, Response};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
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

/// Runs `f` on a thread and fails the test if it takes longer than `secs`.
fn fenced<F: FnOnce() + Send + 'static>(secs: u64, f: F) {
    if !is_root() {
        eprintln!("skipped: persistent sandbox tests need root");
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

/// A spawner process of its own (the test harness is multi-threaded, so it cannot fork one).
fn start_spawner() -> (Spawner, Child) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_moat-spawner"))
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .spawn()
        .unwrap();
    let pid = child.id();
    (Spawner::from_socket(ours, pid), child)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

struct Sandbox {
    spawned: Spawned,
    socket: PathBuf,
    dir: PathBuf,
    spawner: Option<(Spawner, Child)>,
}

impl Sandbox {
    fn start() -> Sandbox {
        Self::start_with(serde_json::json!({}))
    }

    fn start_with(policy: serde_json::Value) -> Sandbox {
        let dir = PathBuf::from(format!(
            "/run/moat-agent-test/{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = dir.join("agent.sock");
        let (mut spawner, child) = start_spawner();
        let t = Instant::now();
        let spawned = spawner.spawn(&policy, &socket).expect("spawn a sandbox");
        if std::env::var_os("MOAT_TEST_TIMING").is_some() {
            eprintln!("spawn took {:?}", t.elapsed());
        }
        assert!(alive(spawned.pid, spawned.start_time));
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
        Sandbox {
            spawned,
            socket,
            dir,
            spawner: Some((spawner, child)),
        }
    }

    fn connect(&self) -> Client {
        Client::connect(&self.socket)
    }

    /// The uid slot of the sandbox, from its cgroup's name (`moat-s<slot>-...`).
    fn slot(&self) -> Option<u32> {
        self.spawned.cgroup_paths.iter().find_map(|p| {
            let name = p.file_name()?.to_str()?;
            name.strip_prefix("moat-s")?.split('-').next()?.parse().ok()
        })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = destroy(self.spawned.pid, self.spawned.start_time);
        for p in &self.spawned.cgroup_paths {
            let _ = std::fs::remove_dir(p);
        }
        if let Some((_, mut child)) = self.spawner.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn exec_pipes_exit_codes_errors_timeout_cancel() {
    fenced(120, || {
        let sb = Sandbox::start();
        let mut c = sb.connect();

        let o = c.run(&["echo", "hello"]);
        assert_eq!(o.out(), "hello\n");
        assert!(o.started.is_some_and(|p| p > 1));
        assert_eq!(o.eofs, [Channel::Stdout, Channel::Stderr]);
        assert_eq!(o.exit(), (Some(0), None, Status::Ok));

        let o = c.sh("echo out; echo err >&2; exit 3");
        assert_eq!(o.out(), "out\n");
        assert_eq!(o.stderr, b"err\n");
        assert_eq!(o.exit(), (Some(3), None, Status::Ok));

        // Who and where: the sandbox user, in the working directory, with the base env.
        let o = c.sh("id -u; id -g; pwd; echo $HOME $FOO");
        assert_eq!(o.out(), "1000\n1000\n/work\n/work\n");
        let o = c.call(&with(exec(&["sh", "-c", "pwd; echo $FOO"]), |r| {
            if let Request::Exec { env, cwd, .. } = r {
                *env = BTreeMap::from([("FOO".to_string(), "bar".to_string())]);
                *cwd = Some("/tmp".into());
            }
        }));
        assert_eq!(o.out(), "/tmp\nbar\n");

        // stdin relay.
        let s = c.request(&with(exec(&["cat"]), set_stdin));
        assert!(matches!(c.first_response(s), Response::Started { .. }));
        c.stdin(s, b"piped ");
        c.stdin(s, b"bytes");
        c.eof(s);
        let o = c.finish(s);
        assert_eq!(o.out(), "piped bytes");
        assert_eq!(o.exit(), (Some(0), None, Status::Ok));
        // Without stdin the process reads /dev/null.
        assert_eq!(c.run(&["cat"]).out(), "");

        // Cannot start: a lone Error.
        let o = c.run(&["no-such-program-xyz"]);
        assert_eq!(o.error(), ErrorCode::NotFound);
        assert!(o.started.is_none());
        let o = c.run(&["/etc/hostname"]);
        assert_eq!(o.error(), ErrorCode::PermissionDenied);
        let o = c.call(&with(exec(&["true"]), |r| {
            if let Request::Exec { cwd, .. } = r {
                *cwd = Some("/no/such/dir".into());
            }
        }));
        assert_eq!(o.error(), ErrorCode::NotFound);

        // Signals from inside the sandbox.
        let o = c.sh("kill -TERM $$");
        assert_eq!(o.exit(), (None, Some(15), Status::Ok));

        // Timeout kills the process group, grandchildren included.
        let t = Instant::now();
        let o = c.call(&with(exec(&["sh", "-c", "sleep 100 & sleep 100"]), |r| {
            if let Request::Exec { timeout_ms, .. } = r {
                *timeout_ms = Some(300);
            }
        }));
        assert_eq!(o.exit(), (None, Some(9), Status::Timeout));
        assert!(t.elapsed() < Duration::from_secs(10));

        // A timeout too far away to represent is no timeout.
        let o = c.call(&with(exec(&["true"]), |r| {
            if let Request::Exec { timeout_ms, .. } = r {
                *timeout_ms = Some(u64::MAX);
            }
        }));
        assert_eq!(o.exit(), (Some(0), None, Status::Ok));

        // Cancel.
        let s = c.request(&exec(&["sleep", "100"]));
        assert!(matches!(c.first_response(s), Response::Started { .. }));
        c.cancel(s);
        let o = c.finish(s);
        assert_eq!(o.exit(), (None, Some(9), Status::Killed));

        // Signal by stream.
        let s = c.request(&exec(&["sleep", "100"]));
        assert!(matches!(c.first_response(s), Response::Started { .. }));
        c.ok(&Request::Signal {
            stream: s,
            signal: 15,
        });
        assert_eq!(c.finish(s).exit(), (None, Some(15), Status::Ok));
        let o = c.call(&Request::Signal {
            stream: s,
            signal: 15,
        });
        assert_eq!(o.error(), ErrorCode::NotFound);

        // Invalid requests are answered; the connection stays.
        let o = c.call(&Request::exec(Vec::<String>::new()));
        assert_eq!(o.error(), ErrorCode::InvalidRequest);

        // A large output, with backpressure: the exact bytes arrive.
        let o = c.sh("head -c 20000000 /dev/zero");
        assert_eq!(o.stdout.len(), 20_000_000);
        assert!(o.stdout.iter().all(|&b| b == 0));

        // The workload cannot take the agent down or look into it: PID 1 of the pid
        // namespace drops the signals, and it is not dumpable.
        let o =
            c.sh("kill -KILL 1; kill -STOP 1; kill -TERM 1; kill -INT 1; kill -SEGV 1; echo sent");
        assert_eq!(o.out(), "sent\n");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(c.run(&["true"]).exit(), (Some(0), None, Status::Ok));
        for path in ["/proc/1/maps", "/proc/1/environ", "/proc/1/mem"] {
            let o = c.sh(&format!("head -c 100 {path} | od -c | head -2"));
            assert!(
                o.out().trim().is_empty() || !o.stderr.is_empty(),
                "{path}: {o:?}"
            );
        }
        let o = c.sh("ls /proc/1/fd 2>&1; ls -l /proc/1/exe 2>&1");
        assert!(!o.out().contains("socket:"), "{}", o.out());
        assert!(!o.out().contains("moat"), "{}", o.out());

        if std::env::var_os("MOAT_TEST_TIMING").is_some() {
            let t = Instant::now();
            for _ in 0..50 {
                c.run(&["true"]);
            }
            eprintln!("exec of true, round trip: {:?}", t.elapsed() / 50);
        }

        // Many execs at once on one connection.
        let streams: Vec<u32> = (0..12)
            .map(|i| c.request(&exec(&["sh", "-c", &format!("sleep 0.2; echo {i}")])))
            .collect();
        for (i, s) in streams.into_iter().enumerate() {
            let o = c.finish(s);
            assert_eq!(o.out(), format!("{i}\n"));
        }

        // Metrics of the whole sandbox.
        match c.call(&Request::Metrics {}).last {
            Some(Response::Metrics {
                pids, memory_bytes, ..
            }) => {
                assert!(pids >= 1);
                assert!(memory_bytes > 0);
            }
            other => panic!("{other:?}"),
        }
    });
}

/// An exec'd process runs under the agent's seccomp filter (inherited, one copy), with no
/// capabilities and no_new_privs, in a Landlock domain nested inside the agent's: from ABI
/// 6 it cannot even probe the agent with a signal.
#[test]
fn an_exec_inherits_the_seccomp_filter_and_gets_its_own_landlock_layer() {
    fenced(60, || {
        let sb = Sandbox::start();
        let mut c = sb.connect();
        let o = c
            .sh("grep -E '^(Seccomp|Seccomp_filters|NoNewPrivs|CapEff|CapBnd):' /proc/self/status");
        assert_eq!(o.exit(), (Some(0), None, Status::Ok), "{o:?}");
        let status = o.out();
        for want in [
            "Seccomp:\t2\n",
            "Seccomp_filters:\t1\n",
            "NoNewPrivs:\t1\n",
            "CapEff:\t0000000000000000\n",
            "CapBnd:\t0000000000000000\n",
        ] {
            assert!(status.contains(want), "{want:?} not in {status:?}");
        }
        // A syscall the filter denies stays denied (unshare of a user namespace).
        let o = c.run(&["unshare", "-U", "true"]);
        assert_ne!(o.exit().0, Some(0), "{o:?}");
        // Landlock: writes only where the policy allows, also for what the exec starts.
        let o = c.sh("echo x > /tmp/ok && cat /tmp/ok");
        assert_eq!(o.out(), "x\n");
        if sb.spawned.layers.landlock_abi >= 6 {
            // Same uid as the agent, but another (nested) Landlock domain: no signal.
            let o = c.sh("kill -0 1 2>&1; echo $?");
            assert!(o.out().ends_with("1\n"), "{:?}", o.out());
        }
    });
}

#[test]
fn pty_exec_and_resize() {
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
        let o = c.call(&with(exec(&["tty"]), pty(24, 80)));
        assert!(o.out().starts_with("/dev/pts/"), "{:?}", o.out());
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
        // The end of stdin on a pty is Ctrl-D: cat sees end of file.
        let s = c.request(&with(with(exec(&["cat"]), pty(24, 80)), set_stdin));
        assert!(matches!(c.first_response(s), Response::Started { .. }));
        c.stdin(s, b"line\n");
        c.eof(s);
        let o = c.finish(s);
        assert!(o.out().contains("line"), "{:?}", o.out());
        assert_eq!(o.exit(), (Some(0), None, Status::Ok));
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

fn background(argv: &[&str], stdin: bool) -> Request {
    with(exec(argv), |r| {
        if let Request::Exec {
            background,
            stdin: s,
            ..
        } = r
        {
            *background = true;
            *s = stdin;
        }
    })
}

#[test]
fn background_processes_and_connections() {
    fenced(120, || {
        let sb = Sandbox::start();
        let mut c = sb.connect();

        let o = c.call(&background(&["sleep", "777"], false));
        let Some(Response::Started { pid: sleeper }) = o.last else {
            panic!("{o:?}");
        };
        let o = c.call(&background(
            &["sh", "-c", "echo hi; echo err >&2; cat; echo bye"],
            true,
        ));
        let Some(Response::Started { pid: catter }) = o.last else {
            panic!("{o:?}");
        };
        let procs = c.procs();
        let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
        assert!(
            pids.contains(&sleeper) && pids.contains(&catter),
            "{procs:?}"
        );
        assert!(procs.iter().all(|p| p.running && p.started_ms > 0));
        assert_eq!(
            procs.iter().find(|p| p.pid == sleeper).unwrap().argv,
            ["sleep", "777"]
        );

        // Retained output, not following: what is there, then Ok (still running).
        std::thread::sleep(Duration::from_millis(300));
        let o = c.call(&Request::ProcOutput {
            pid: catter,
            follow: false,
        });
        assert_eq!(o.started, Some(catter));
        assert_eq!(o.out(), "hi\n");
        assert_eq!(o.stderr, b"err\n");
        assert_eq!(o.eofs, [Channel::Stdout, Channel::Stderr]);
        assert_eq!(o.last, Some(Response::Ok {}));

        // Follow while writing its stdin, on another connection.
        let follower = c.request(&Request::ProcOutput {
            pid: catter,
            follow: true,
        });
        assert_eq!(
            c.first_response(follower),
            Response::Started { pid: catter }
        );
        let mut c2 = sb.connect();
        let s = c2.request(&Request::ProcStdin {
            pid: catter,
            close: false,
        });
        c2.stdin(s, b"abc\n");
        c2.eof(s);
        assert_eq!(c2.finish(s).last, Some(Response::Ok {}));
        // Another write, closing the pipe: cat ends, the script says bye and exits.
        let s = c2.request(&Request::ProcStdin {
            pid: catter,
            close: true,
        });
        c2.stdin(s, b"def\n");
        c2.eof(s);
        assert_eq!(c2.finish(s).last, Some(Response::Ok {}));
        let o = c.finish(follower);
        assert_eq!(o.out(), "hi\nabc\ndef\nbye\n");
        assert_eq!(o.stderr, b"err\n");
        assert_eq!(o.exit(), (Some(0), None, Status::Ok));
        // Its stdin is gone now; unknown pids are not found.
        let s = c2.request(&Request::ProcStdin {
            pid: catter,
            close: true,
        });
        assert_eq!(c2.finish(s).error(), ErrorCode::InvalidRequest);
        let o = c2.call(&Request::ProcOutput {
            pid: 99_999,
            follow: false,
        });
        assert_eq!(o.error(), ErrorCode::NotFound);
        // Finished ones are listed with their exit.
        let procs = c2.procs();
        let done = procs.iter().find(|p| p.pid == catter).unwrap();
        assert!(!done.running);
        assert_eq!(done.exit_code, Some(0));
        assert_eq!(done.status, Some(Status::Ok));
        assert!(done.finished_ms.is_some());
        // And their output can still be read whole.
        let o = c2.call(&Request::ProcOutput {
            pid: catter,
            follow: true,
        });
        assert_eq!(o.out(), "hi\nabc\ndef\nbye\n");
        assert_eq!(o.exit(), (Some(0), None, Status::Ok));

        // A Cancel ends a proc_output stream and leaves the process alone.
        let f = c2.request(&Request::ProcOutput {
            pid: sleeper,
            follow: true,
        });
        assert_eq!(c2.first_response(f), Response::Started { pid: sleeper });
        c2.cancel(f);
        let o = c2.finish(f);
        assert_eq!(o.last, Some(Response::Ok {}));

        // A foreground process dies with its connection; background ones live on.
        let fg = c2.request(&exec(&["sleep", "999"]));
        let Response::Started { pid: fg_pid } = c2.first_response(fg) else {
            panic!()
        };
        drop(c2);
        drop(c);
        let mut c3 = sb.connect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = c3.sh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '");
            let all = o.out();
            assert!(all.contains("sleep 777"), "{all}");
            if !all.contains("sleep 999") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "foreground sleep survived: {all}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let o = c3.call(&Request::SignalPid {
            pid: fg_pid,
            signal: 9,
        });
        assert_eq!(o.error(), ErrorCode::NotFound);
        // The new connection sees the background process, and can signal it.
        let procs = c3.procs();
        assert!(
            procs.iter().any(|p| p.pid == sleeper && p.running),
            "{procs:?}"
        );
        c3.ok(&Request::SignalPid {
            pid: sleeper,
            signal: 15,
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = c3.procs();
            let p = procs.iter().find(|p| p.pid == sleeper).unwrap();
            if !p.running {
                assert_eq!(p.signal, Some(15));
                assert_eq!(p.exit_code, None);
                break;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(50));
        }
        // 64 connections at most (the agent's MAX_CONNS): 1 is open, so 7 of 70 more go over.
        let extra: Vec<UnixStream> = (0..70)
            .map(|_| UnixStream::connect(&sb.socket).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut closed = 0;
        for mut s in extra {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 64];
            if matches!(s.read(&mut b), Ok(0)) {
                closed += 1;
            }
        }
        assert!(
            closed >= 5,
            "{closed} of 70 extra connections closed (1 was open)"
        );
        // A protocol violation closes only that connection.
        let mut bad = UnixStream::connect(&sb.socket).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        bad.write_all(&[0xff; 64]).unwrap();
        let mut sink = Vec::new();
        let _ = bad.read_to_end(&mut sink);
        assert_eq!(c3.run(&["true"]).exit(), (Some(0), None, Status::Ok));
    });
}

#[test]
fn a_flooding_host_connection_is_bounded_and_others_stay_served() {
    fenced(120, || {
        let sb = Sandbox::start();
        let mut a = sb.connect();
        // A process that never reads its stdin, and a host that keeps sending it.
        let s = a.request(&with(exec(&["sleep", "1000"]), set_stdin));
        let Response::Started { pid } = a.first_response(s) else {
            panic!()
        };
        let mut writer = a.sock.try_clone().unwrap();
        let enc = Encoder::new();
        let flood = std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 20];
            let mut sent = 0usize;
            for _ in 0..64 {
                let mut out = Vec::new();
                enc.data(&mut out, s, Channel::Stdin, &chunk).unwrap();
                if writer.write_all(&out).is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(500));
        // The agent stopped reading that connection (its queue is bounded), and still serves
        // another one.
        let mut b = sb.connect();
        assert_eq!(b.run(&["echo", "ok"]).out(), "ok\n");
        match b.call(&Request::Metrics {}).last {
            Some(Response::Metrics { memory_bytes, .. }) => {
                assert!(
                    memory_bytes < 200 << 20,
                    "agent queued the flood: {memory_bytes}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Closing the flooding connection kills its process and unblocks the writer.
        a.sock.shutdown(std::net::Shutdown::Both).unwrap();
        drop(a);
        let sent = flood.join().unwrap();
        assert!(sent < 64 << 20, "the whole flood was taken: {sent}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while b
            .sh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
            .out()
            .contains("sleep 1000")
        {
            assert!(
                Instant::now() < deadline,
                "the flooding connection's process lives on"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let o = b.call(&Request::SignalPid { pid, signal: 9 });
        assert_eq!(o.error(), ErrorCode::NotFound);
        // A background process with a timeout is killed at its deadline too.
        let o = b.call(&with(background(&["sleep", "100"], false), |r| {
            if let Request::Exec { timeout_ms, .. } = r {
                *timeout_ms = Some(200);
            }
        }));
        let Some(Response::Started { pid }) = o.last else {
            panic!("{o:?}")
        };
        let o = b.call(&Request::ProcOutput { pid, follow: true });
        assert_eq!(o.exit(), (None, Some(9), Status::Timeout));
    });
}

/// xorshift64*: reproducible pseudo-random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

#[test]
fn random_requests_never_take_the_agent_down() {
    fenced(240, || {
        let sb = Sandbox::start();
        let mut c = sb.connect();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let paths = [
            "/",
            "/work",
            "/work/../..",
            "/proc/self/fd/0",
            "/proc/self/fd/3",
            "/proc/self/fd/4",
            "/proc/self/fd/5",
            "/proc/self/fd/6",
            "/proc/self/mem",
            "/proc/1/mem",
            "/dev/zero",
            "/dev/pts/ptmx",
            "/dev/tty",
            "/etc",
            "/etc/passwd",
            "/tmp/x",
            "/work/f",
            "/work/d/e",
            "/sys",
            "/proc/self/cwd",
            "/proc/self/root/etc/passwd",
            "/run/moat",
        ];
        let numbers = [
            0u64,
            1,
            2,
            3,
            255,
            65535,
            i32::MAX as u64,
            u32::MAX as u64,
            u64::MAX,
        ];
        let mut last_stream = 1u32;
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for i in 0..400 {
            let path = rng.pick(&paths).to_string();
            let n = *rng.pick(&numbers);
            let small = (rng.next() % 70) as i32 - 3;
            let request = match rng.next() % 16 {
                0 => Request::Exec {
                    argv: rng
                        .pick(&[
                            vec!["true"],
                            vec!["sh", "-c", "exit 7"],
                            vec!["cat"],
                            vec!["nope"],
                            vec!["/"],
                            vec!["sleep", "0.05"],
                        ])
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    env: BTreeMap::new(),
                    cwd: (rng.next().is_multiple_of(2)).then(|| path.clone()),
                    stdin: rng.next().is_multiple_of(2),
                    pty: (rng.next().is_multiple_of(3)).then_some(PtySize {
                        rows: (n % 65536).max(1) as u16,
                        cols: (n % 65536).max(1) as u16,
                    }),
                    timeout_ms: (rng.next().is_multiple_of(2)).then_some(n.max(1)),
                    background: rng.next().is_multiple_of(4),
                },
                1 => Request::Signal {
                    stream: last_stream | 1,
                    signal: small,
                },
                2 => Request::Resize {
                    stream: last_stream | 1,
                    rows: n as u16,
                    cols: (n >> 3) as u16,
                },
                3 => Request::ReadFile { path },
                4 => Request::WriteFile {
                    path,
                    mode: (rng.next().is_multiple_of(2)).then_some(n as u32),
                    create_parents: rng.next().is_multiple_of(2),
                },
                5 => Request::ListDir {
                    path,
                    depth: (n % 20) as u32,
                },
                6 => Request::Stat { path },
                7 => Request::Mkdir {
                    path,
                    parents: rng.next().is_multiple_of(2),
                },
                8 => Request::Remove {
                    path,
                    recursive: rng.next().is_multiple_of(2),
                },
                9 => Request::Rename {
                    from: path,
                    to: rng.pick(&paths).to_string(),
                },
                10 => Request::Metrics {},
                11 => Request::Procs {},
                12 => Request::ProcOutput {
                    pid: n as u32,
                    follow: false,
                },
                13 => Request::ProcStdin {
                    pid: n as u32,
                    close: rng.next().is_multiple_of(2),
                },
                14 => Request::SignalPid {
                    pid: (n as u32).min(3),
                    signal: small,
                },
                _ => Request::exec(["true"]),
            };
            let s = c.request(&request);
            last_stream = s;
            // Whatever a request takes on channel 0, it gets a little and an end.
            if rng.next().is_multiple_of(2) {
                c.stdin(s, b"data");
            }
            c.eof(s);
            if rng.next().is_multiple_of(3) {
                c.cancel(s);
            }
            let o = c.finish(s);
            let Some(last) = &o.last else {
                panic!("{i}: {request:?}")
            };
            *kinds.entry(last.type_name()).or_insert(0usize) += 1;
        }
        eprintln!("answers: {kinds:?}");
        assert!(kinds.get("exit").copied().unwrap_or(0) > 10, "{kinds:?}");
        assert!(kinds.get("error").copied().unwrap_or(0) > 10, "{kinds:?}");
        assert_eq!(c.run(&["echo", "alive"]).out(), "alive\n");
        assert!(alive(sb.spawned.pid, sb.spawned.start_time));
    });
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    let mut v = vec![0u8; n];
    f.read_exact(&mut v).unwrap();
    v
}

#[test]
fn files_round_trip_and_stay_inside() {
    fenced(120, || {
        let sb = Sandbox::start();
        let mut c = sb.connect();

        let data = random_bytes(20 << 20);
        let o = c.write_file("/work/big/blob.bin", &data);
        assert_eq!(o.last, Some(Response::FileDone { bytes: 20 << 20 }));
        let o = c.read_file("/work/big/blob.bin");
        assert_eq!(o.started, Some(0));
        assert_eq!(o.eofs, [Channel::Stdout]);
        assert_eq!(o.last, Some(Response::FileDone { bytes: 20 << 20 }));
        assert!(o.stdout == data, "20 MiB round trip differs");
        // Owned by the sandbox user, inside.
        let o = c.sh("stat -c '%u %g %a' /work/big/blob.bin");
        assert_eq!(o.out(), "1000 1000 644\n");

        // Replace keeps nothing of the old; a mode is applied exactly.
        let s = c.request(&Request::WriteFile {
            path: "/work/x.sh".into(),
            mode: Some(0o750),
            create_parents: false,
        });
        c.stdin(s, b"#!/bin/sh\necho run\n");
        c.eof(s);
        assert_eq!(c.finish(s).last, Some(Response::FileDone { bytes: 19 }));
        assert_eq!(c.run(&["/work/x.sh"]).out(), "run\n");
        // A cancelled write leaves the old file, and no temporary file.
        let s = c.request(&Request::WriteFile {
            path: "/work/x.sh".into(),
            mode: None,
            create_parents: false,
        });
        c.stdin(s, b"garbage");
        c.cancel(s);
        assert_eq!(c.finish(s).error(), ErrorCode::Cancelled);
        assert_eq!(c.read_file("/work/x.sh").stdout, b"#!/bin/sh\necho run\n");
        assert_eq!(c.sh("ls -A /work").out(), "big\nx.sh\n");

        // mkdir, stat, list_dir, rename, remove.
        c.ok(&Request::Mkdir {
            path: "/work/d/e/f".into(),
            parents: true,
        });
        c.ok(&Request::Mkdir {
            path: "/work/d/e/f".into(),
            parents: true,
        });
        let o = c.call(&Request::Mkdir {
            path: "/work/d".into(),
            parents: false,
        });
        assert_eq!(o.error(), ErrorCode::AlreadyExists);
        c.write_file("/work/d/e/f/g.txt", b"g");
        c.sh("ln -s /etc /work/d/link");
        match c
            .call(&Request::Stat {
                path: "/work/d/link".into(),
            })
            .last
        {
            Some(Response::StatResult(e)) => {
                assert_eq!(e.kind, moat_proto::EntryKind::Symlink);
                assert_eq!(e.size, 4);
            }
            other => panic!("{other:?}"),
        }
        match c
            .call(&Request::ListDir {
                path: "/work/d".into(),
                depth: 5,
            })
            .last
        {
            Some(Response::Listing { entries, truncated }) => {
                let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
                assert_eq!(
                    paths,
                    [
                        "/work/d/e",
                        "/work/d/e/f",
                        "/work/d/e/f/g.txt",
                        "/work/d/link"
                    ]
                );
                assert!(!truncated);
                assert_eq!(entries[2].size, 1);
            }
            other => panic!("{other:?}"),
        }
        match c
            .call(&Request::ListDir {
                path: "/work/d".into(),
                depth: 0,
            })
            .last
        {
            Some(Response::Listing { entries, .. }) => assert_eq!(entries.len(), 2),
            other => panic!("{other:?}"),
        }
        c.ok(&Request::Rename {
            from: "/work/d/e".into(),
            to: "/work/d/moved".into(),
        });
        assert_eq!(c.read_file("/work/d/moved/f/g.txt").stdout, b"g");
        let o = c.call(&Request::Remove {
            path: "/work/d".into(),
            recursive: false,
        });
        assert_eq!(o.error(), ErrorCode::NotEmpty);
        // Removing a symlink to a directory removes the link, never what it points to.
        c.ok(&Request::Remove {
            path: "/work/d/link".into(),
            recursive: true,
        });
        c.sh("ln -s /work/big /work/d/biglink");
        c.ok(&Request::Remove {
            path: "/work/d".into(),
            recursive: true,
        });
        assert_eq!(c.read_file("/work/big/blob.bin").stdout.len(), 20 << 20);
        let o = c.call(&Request::Stat {
            path: "/work/d".into(),
        });
        assert_eq!(o.error(), ErrorCode::NotFound);
        assert_eq!(c.read_file("/work").error(), ErrorCode::IsADirectory);
        assert_eq!(c.read_file("/work/nope").error(), ErrorCode::NotFound);

        // Writes outside the writable places are refused.
        for path in ["/etc/passwd", "/usr/bin/x", "/x", "/etc/ssl/certs/evil.pem"] {
            let o = c.write_file(path, b"pwned");
            assert_eq!(o.error(), ErrorCode::PermissionDenied, "{path}: {o:?}");
        }
        for path in ["/etc/hosts", "/usr/bin"] {
            let o = c.call(&Request::Remove {
                path: path.into(),
                recursive: true,
            });
            assert!(
                matches!(
                    o.error(),
                    ErrorCode::PermissionDenied | ErrorCode::Busy | ErrorCode::NotEmpty
                ),
                "{path}: {o:?}"
            );
        }
        let o = c.call(&Request::Mkdir {
            path: "/etc/evil".into(),
            parents: false,
        });
        assert_eq!(o.error(), ErrorCode::PermissionDenied);
        let o = c.call(&Request::Rename {
            from: "/work/x.sh".into(),
            to: "/etc/x.sh".into(),
        });
        assert!(matches!(
            o.error(),
            ErrorCode::PermissionDenied | ErrorCode::Internal
        ));

        // Symlinks and `..` resolve inside the sandbox: never host content.
        let host_shadow = std::fs::read("/etc/shadow").ok();
        c.sh("ln -s /etc/shadow /work/l; ln -s ../../../../etc /work/up");
        let o = c.read_file("/work/l");
        match &o.last {
            Some(Response::Error { code, .. }) => {
                assert!(matches!(
                    code,
                    ErrorCode::NotFound | ErrorCode::PermissionDenied
                ))
            }
            _ => assert!(
                Some(&o.stdout) != host_shadow.as_ref(),
                "host /etc/shadow leaked"
            ),
        }
        let sandbox_hostname = c.sh("cat /etc/hostname").stdout;
        for path in [
            "/work/../../../../etc/hostname",
            "/work/up/hostname",
            "/tmp/../../etc/hostname",
        ] {
            let o = c.read_file(path);
            assert_eq!(o.stdout, sandbox_hostname, "{path}");
        }
        // The agent's own magic links lead to host files (its binary, the uid slot's lock):
        // Landlock keeps them closed even to the agent.
        for path in ["/proc/self/exe", "/proc/1/exe"] {
            let o = c.read_file(path);
            assert!(
                matches!(o.error(), ErrorCode::PermissionDenied | ErrorCode::NotFound),
                "{path}: {o:?}"
            );
        }
        for fd in 3..16 {
            let path = format!("/proc/self/fd/{fd}");
            let o = c.read_file(&path);
            if let Some(Response::FileDone { bytes }) = o.last {
                panic!("{path} of the agent opened ({bytes} bytes)");
            }
            let o = c.write_file(&path, b"x");
            assert!(
                matches!(o.last, Some(Response::Error { .. })),
                "{path}: {o:?}"
            );
        }
        let o = c.read_file("/proc/1/environ");
        assert!(
            o.stdout.iter().all(|&b| b == 0),
            "agent environ readable: {o:?}"
        );
    });
}

#[test]
fn lifecycle_destroy_frees_everything_and_sandboxes_outlive_the_spawner() {
    fenced(120, || {
        let mut sb = Sandbox::start();
        let mut c = sb.connect();
        c.call(&background(&["sleep", "1000"], false));
        // The spawner (the daemon's child) dies: the sandbox lives on.
        let (spawner, mut child) = sb.spawner.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        drop(spawner);
        std::thread::sleep(Duration::from_millis(200));
        assert!(alive(sb.spawned.pid, sb.spawned.start_time));
        assert_eq!(c.run(&["echo", "still here"]).out(), "still here\n");
        drop(c);
        let mut c = sb.connect();
        assert!(c.procs().iter().any(|p| p.running));
        drop(c);

        let slot = sb.slot();
        let pid = sb.spawned.pid;
        let start = sb.spawned.start_time;
        // The pid namespace's processes, seen from the host: init and its descendants.
        let in_sandbox = || -> Vec<u32> {
            let mut out = Vec::new();
            for e in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let status =
                    std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
                // NSpid has two entries for processes in a child pid namespace.
                let nspid = status
                    .lines()
                    .find(|l| l.starts_with("NSpid:"))
                    .map(|l| l.split_whitespace().count())
                    .unwrap_or(0);
                let ns = std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
                let init_ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
                if nspid > 2 && ns.is_some() && ns == init_ns {
                    out.push(p);
                }
            }
            out
        };
        let before = in_sandbox();
        assert!(!before.is_empty(), "no sandbox processes seen");
        destroy(pid, start).unwrap();
        assert!(!alive(pid, start));
        for p in before {
            assert!(
                !Path::new(&format!("/proc/{p}/status")).exists()
                    || std::fs::read_to_string(format!("/proc/{p}/status"))
                        .unwrap_or_default()
                        .contains("State:\tZ"),
                "process {p} of the sandbox survived destroy"
            );
        }
        // Destroying again is fine; so is a wrong start time.
        destroy(pid, start).unwrap();
        destroy(pid, start + 1).unwrap();
        if let Some(slot) = slot {
            assert!(
                moat_backend::idmap::IdMap::slot_is_free(slot),
                "slot {slot} still taken"
            );
        }
        for p in &sb.spawned.cgroup_paths {
            std::fs::remove_dir(p).unwrap_or_else(|e| panic!("rmdir {}: {e}", p.display()));
        }
        sb.spawned.cgroup_paths.clear();
        assert!(UnixStream::connect(&sb.socket).is_err());
    });
}

#[test]
fn bad_spawn_requests_are_errors() {
    fenced(60, || {
        let (mut spawner, mut child) = start_spawner();
        let e = spawner
            .spawn(
                &serde_json::json!({"process": {"uid": 0}}),
                Path::new("/run/x.sock"),
            )
            .unwrap_err();
        assert!(e.contains("uid"), "{e}");
        let e = spawner
            .spawn(&serde_json::json!({"bogus": 1}), Path::new("/run/x.sock"))
            .unwrap_err();
        assert!(e.contains("invalid policy"), "{e}");
        let e = spawner
            .spawn(&serde_json::json!({}), Path::new("/proc/none/x.sock"))
            .unwrap_err();
        assert!(e.contains("agent socket"), "{e}");
        child.kill().unwrap();
        child.wait().unwrap();
        let e = spawner
            .spawn(&serde_json::json!({}), Path::new("/run/x.sock"))
            .unwrap_err();
        assert!(e.contains("restart the daemon"), "{e}");
    });
}

#[test]
fn egress_relay_carries_a_workload_connection_raw_both_ways() {
    fenced(120, || {
        let sb = Sandbox::start_with(serde_json::json!({"network": {"mode": "allowlist"}}));
        // Two relays wait before any workload connects; each takes one connection.
        let mut relays = [ask_relay(&sb.socket), ask_relay(&sb.socket)];
        let mut c = sb.connect();
        let script = r#"
import socket, sys
n = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"x" * n)
s.shutdown(socket.SHUT_WR)
got = 0
while True:
    b = s.recv(1 << 16)
    if not b:
        break
    got += len(b)
print(got)
"#;
        let bg = c.request(&with(exec(&["python3", "-c", script, "8388608"]), |r| {
            if let Request::Exec { background, .. } = r {
                *background = true;
            }
        }));
        let pid = match c.first_response(bg) {
            Response::Started { pid } => pid,
            other => panic!("{other:?}"),
        };
        let relay = &mut relays[0];
        let f = read_exact_frame(relay);
        assert_eq!(f.kind, FrameKind::Response);
        let Response::Relayed { peer_port } = f.response().unwrap() else {
            panic!("{f:?}")
        };
        assert!(peer_port > 0);
        // Read the workload's 8 MiB to its end, then answer with 3 MiB and end.
        let mut got = Vec::new();
        relay.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 8 << 20);
        assert!(got.iter().all(|&b| b == b'x'));
        relay.write_all(&vec![b'y'; 3 << 20]).unwrap();
        relay.shutdown(std::net::Shutdown::Write).unwrap();
        // The workload saw all of it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let out = loop {
            let o = c.call(&Request::ProcOutput { pid, follow: true });
            if matches!(o.last, Some(Response::Exit { .. })) {
                break o;
            }
            assert!(Instant::now() < deadline, "the workload did not finish");
        };
        assert_eq!(out.out().trim(), (3 << 20).to_string(), "{out:?}");
        // The second relay still waits; a second workload connection takes it.
        let o = c.sh("python3 -c 'import socket; s=socket.create_connection((\"127.0.0.1\",3128)); s.sendall(b\"hi\"); s.close()'");
        assert_eq!(o.exit().0, Some(0), "{o:?}");
        let relay = &mut relays[1];
        let f = read_exact_frame(relay);
        assert!(matches!(f.response().unwrap(), Response::Relayed { .. }));
        let mut got = Vec::new();
        relay.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hi");
    });
}

#[test]
fn a_relay_without_an_egress_port_or_beside_other_requests_is_refused() {
    fenced(60, || {
        let sb = Sandbox::start();
        let mut c = sb.connect();
        assert_eq!(
            c.call(&Request::Relay {}).error(),
            ErrorCode::InvalidRequest
        );
        // Nothing listens on the egress port of a sandbox without network.
        let o =
            c.sh("python3 -c 'import socket; socket.create_connection((\"127.0.0.1\",3128))' 2>&1");
        assert_eq!(o.exit().0, Some(1));
        assert!(o.out().contains("ConnectionRefusedError"), "{o:?}");
        let sb = Sandbox::start_with(serde_json::json!({"network": {"mode": "allowlist"}}));
        let mut c = sb.connect();
        let s = c.request(&exec(&["sleep", "5"]));
        assert!(matches!(c.first_response(s), Response::Started { .. }));
        assert_eq!(
            c.call(&Request::Relay {}).error(),
            ErrorCode::InvalidRequest
        );
    });
}
