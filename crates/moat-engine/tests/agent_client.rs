//! The agent client against a real sandbox's agent.
//!
//! A test harness is multi-threaded, so it cannot fork a sandbox itself: the sandbox is
//! started through moat-backend's `moat-spawner` helper (found next to this test's
//! executable, or at `$MOAT_SPAWNER`; build it with `cargo build -p moat-backend --bin
//! moat-spawner`). Without the helper, root or the kernel features moat needs, the test is
//! skipped with the reason printed, and fails instead when `CI` is set.

#![allow(clippy::unwrap_used)]

use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use moat_api::Status;
use moat_backend::spawner::Spawner;
use moat_backend::Spawned;
use moat_engine::agent_client::{AgentClient, ClientError, Exec, ExecEvent, ExecSpec};
use moat_proto::{EntryKind, ErrorCode};

/// Skips the test (returns `None`), or fails it under `CI`.
fn skip(why: &str) -> Option<Sandbox> {
    if std::env::var_os("CI").is_some() {
        panic!("cannot run the agent client against a real sandbox: {why}");
    }
    eprintln!("skipped: {why}");
    None
}

fn spawner_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("MOAT_SPAWNER") {
        return Some(path.into());
    }
    // target/<profile>/deps/agent_client-HASH -> target/<profile>/moat-spawner
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("moat-spawner");
    path.exists().then_some(path)
}

/// A persistent sandbox, destroyed on drop.
struct Sandbox {
    spawned: Spawned,
    socket: PathBuf,
    dir: PathBuf,
    helper: Child,
}

impl Sandbox {
    fn start() -> Option<Sandbox> {
        let Some(binary) = spawner_binary() else {
            return skip(
                "no moat-spawner helper next to this test: build it with `cargo build -p \
                 moat-backend --bin moat-spawner` (`cargo test --workspace` does), or set \
                 MOAT_SPAWNER to its path",
            );
        };
        let dir = std::env::temp_dir().join(format!("moat-agent-client-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let (ours, theirs) = UnixStream::pair().unwrap();
        let helper = Command::new(&binary)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .spawn()
            .unwrap();
        let mut spawner = Spawner::from_socket(ours, helper.id());
        let policy = serde_json::json!({ "limits": { "timeout": "5m" } });
        match spawner.spawn(&policy, &socket) {
            Ok(spawned) => Some(Sandbox {
                spawned,
                socket,
                dir,
                helper,
            }),
            Err(why) => {
                let _ = std::fs::remove_dir_all(&dir);
                skip(&format!("the sandbox did not start: {why}"))
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = moat_backend::destroy(self.spawned.pid, self.spawned.start_time);
        for path in self.spawned.cgroup_paths.iter().rev() {
            let _ = std::fs::remove_dir(path);
        }
        let _ = self.helper.kill();
        let _ = self.helper.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Everything an exec gave: stdout, stderr, the last event.
async fn collect(exec: &mut Exec) -> (Vec<u8>, Vec<u8>, Option<ExecEvent>) {
    let (mut out, mut err, mut last) = (Vec::new(), Vec::new(), None);
    while let Some(event) = exec.next().await {
        match event {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(b) => out.extend_from_slice(&b),
            ExecEvent::Stderr(b) => err.extend_from_slice(&b),
            other => last = Some(other),
        }
    }
    (out, err, last)
}

fn sh(script: &str) -> ExecSpec {
    let mut spec = ExecSpec::new(["/bin/sh", "-c", script]);
    spec.env
        .insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
    spec
}

async fn exercise(socket: &Path) {
    let client = AgentClient::connect(socket).await.unwrap();

    // Exec with stdin, stdout, stderr and an exit code.
    let mut spec = sh("read x; echo \"got $x\"; echo oops >&2; exit 3");
    spec.stdin = true;
    let mut exec = client.exec(spec).await.unwrap();
    let input = exec.stdin();
    input.write(Bytes::from_static(b"hello\n")).await.unwrap();
    input.close().await.unwrap();
    let (out, err, last) = collect(&mut exec).await;
    assert_eq!(String::from_utf8_lossy(&out), "got hello\n");
    assert_eq!(String::from_utf8_lossy(&err), "oops\n");
    assert!(
        matches!(
            last,
            Some(ExecEvent::Exit {
                exit_code: Some(3),
                signal: None,
                status: Status::Ok
            })
        ),
        "{last:?}"
    );

    // A missing program.
    let mut exec = client
        .exec(ExecSpec::new(["/no/such/program"]))
        .await
        .unwrap();
    match exec.next().await {
        Some(ExecEvent::Failed(ClientError::Agent { code, .. })) => {
            assert_eq!(code, ErrorCode::NotFound)
        }
        other => panic!("{other:?}"),
    }

    // Cancel kills it.
    let mut exec = client.exec(sh("sleep 100")).await.unwrap();
    assert!(matches!(exec.next().await, Some(ExecEvent::Started { .. })));
    exec.stdin().cancel().unwrap();
    let (_, _, last) = collect(&mut exec).await;
    assert!(
        matches!(
            last,
            Some(ExecEvent::Exit {
                status: Status::Killed,
                ..
            })
        ),
        "{last:?}"
    );

    // Files: a 3 MiB round trip, then stat, list, rename, remove.
    let content: Vec<u8> = (0..3 * (1 << 20) + 17).map(|i| (i % 253) as u8).collect();
    client.mkdir("/tmp/t/sub", true).await.unwrap();
    let mut file = client
        .write_file("/tmp/t/sub/data.bin", Some(0o600), false)
        .await
        .unwrap();
    for piece in content.chunks(700_000) {
        file.write(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    assert_eq!(file.finish().await.unwrap(), content.len() as u64);
    let read = client.read_file("/tmp/t/sub/data.bin").await.unwrap();
    assert_eq!(read.read_to_end(1 << 30).await.unwrap(), content);
    let entry = client.stat("/tmp/t/sub/data.bin").await.unwrap();
    assert_eq!(
        (entry.kind, entry.size, entry.mode),
        (EntryKind::File, content.len() as u64, 0o600)
    );
    let (entries, truncated) = client.list_dir("/tmp/t", 1).await.unwrap();
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/tmp/t/sub", "/tmp/t/sub/data.bin"]);
    assert!(!truncated);
    client
        .rename("/tmp/t/sub/data.bin", "/tmp/t/moved.bin")
        .await
        .unwrap();
    let err = client.read_file("/tmp/t/sub/data.bin").await.unwrap_err();
    assert!(matches!(
        err,
        ClientError::Agent {
            code: ErrorCode::NotFound,
            ..
        }
    ));
    let err = client.remove("/tmp/t", false).await.unwrap_err();
    assert!(matches!(err, ClientError::Agent { .. }), "{err:?}");
    client.remove("/tmp/t", true).await.unwrap();
    assert!(client.stat("/tmp/t").await.is_err());

    // A background process, its stdin, output and signal, over a second connection.
    let mut spec = sh("while read line; do echo \"bg $line\"; done; echo end >&2");
    spec.background = true;
    spec.stdin = true;
    let mut exec = client.exec(spec).await.unwrap();
    let pid = match exec.next().await {
        Some(ExecEvent::Started { pid }) => pid,
        other => panic!("{other:?}"),
    };
    assert!(exec.next().await.is_none());
    drop(exec);
    let other = AgentClient::connect(socket).await.unwrap();
    other
        .proc_stdin(pid, Bytes::from_static(b"one\ntwo\n"), true)
        .await
        .unwrap();
    let mut output = other.proc_output(pid, true).await.unwrap();
    let (out, err, last) = collect(&mut output).await;
    assert_eq!(String::from_utf8_lossy(&out), "bg one\nbg two\n");
    assert_eq!(String::from_utf8_lossy(&err), "end\n");
    assert!(
        matches!(
            last,
            Some(ExecEvent::Exit {
                exit_code: Some(0),
                ..
            })
        ),
        "{last:?}"
    );
    let procs = other.procs().await.unwrap();
    let proc = procs.iter().find(|p| p.pid == pid).unwrap();
    assert!(!proc.running);
    assert_eq!(proc.exit_code, Some(0));
    let err = other.signal_pid(pid, 15).await.unwrap_err();
    assert!(matches!(
        err,
        ClientError::Agent {
            code: ErrorCode::NotFound,
            ..
        }
    ));

    let metrics = client.metrics().await.unwrap();
    assert!(metrics.pids >= 1, "{metrics:?}");

    // Many execs at once on one connection.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut exec = client.exec(sh(&format!("echo {i}"))).await.unwrap();
            let (out, _, last) = collect(&mut exec).await;
            assert_eq!(String::from_utf8_lossy(&out), format!("{i}\n"));
            assert!(matches!(
                last,
                Some(ExecEvent::Exit {
                    exit_code: Some(0),
                    ..
                })
            ));
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(!client.is_closed());
}

async fn exercise_streams(socket: &Path) {
    let client = AgentClient::connect(socket).await.unwrap();

    // 24 MiB of output arrives whole, in frames of at most 1 MiB.
    let mut exec = client
        .exec(sh("head -c 25165824 /dev/zero; echo done >&2"))
        .await
        .unwrap();
    let mut total = 0usize;
    let mut last = None;
    while let Some(event) = exec.next().await {
        match event {
            ExecEvent::Stdout(b) => {
                assert!(b.len() <= 1 << 20);
                assert!(b.iter().all(|&x| x == 0));
                total += b.len();
            }
            ExecEvent::Started { .. } | ExecEvent::Stderr(_) => {}
            other => last = Some(other),
        }
    }
    assert_eq!(total, 24 << 20);
    assert!(
        matches!(
            last,
            Some(ExecEvent::Exit {
                exit_code: Some(0),
                ..
            })
        ),
        "{last:?}"
    );

    // The agent's timeout.
    let mut spec = sh("sleep 30");
    spec.timeout_ms = Some(200);
    let mut exec = client.exec(spec).await.unwrap();
    let (_, _, last) = collect(&mut exec).await;
    assert!(
        matches!(
            last,
            Some(ExecEvent::Exit {
                status: Status::Timeout,
                ..
            })
        ),
        "{last:?}"
    );

    // A pty, resized while it runs.
    let mut spec = sh("stty size; read x; stty size");
    spec.stdin = true;
    spec.pty = Some(moat_proto::PtySize { rows: 24, cols: 80 });
    let mut exec = client.exec(spec).await.unwrap();
    let input = exec.stdin();
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("24 80") {
        match exec.next().await {
            Some(ExecEvent::Stdout(b)) => out.extend_from_slice(&b),
            Some(ExecEvent::Started { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    input.resize(40, 100).await.unwrap();
    input.write(Bytes::from_static(b"\n")).await.unwrap();
    let (rest, _, last) = collect(&mut exec).await;
    assert!(
        String::from_utf8_lossy(&rest).contains("40 100"),
        "{rest:?}"
    );
    assert!(
        matches!(
            last,
            Some(ExecEvent::Exit {
                exit_code: Some(0),
                ..
            })
        ),
        "{last:?}"
    );

    // Dropping an exec in the middle of its output kills it and leaves the connection good.
    let mut exec = client.exec(sh("yes")).await.unwrap();
    for _ in 0..3 {
        exec.next().await.unwrap();
    }
    drop(exec);
    let mut exec = client.exec(sh("echo still")).await.unwrap();
    let (out, _, _) = collect(&mut exec).await;
    assert_eq!(out, b"still\n");
    // The agent killed `yes`: only the agent (and maybe a reaped zombie) is left soon.
    let mut left = u32::MAX;
    for _ in 0..50 {
        left = client.metrics().await.unwrap().pids;
        if left <= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(left <= 2, "{left} processes left");

    // Signals by stream.
    let mut exec = client.exec(sh("sleep 30")).await.unwrap();
    assert!(matches!(exec.next().await, Some(ExecEvent::Started { .. })));
    exec.stdin().signal(15).await.unwrap();
    let (_, _, last) = collect(&mut exec).await;
    assert!(
        matches!(
            last,
            Some(ExecEvent::Exit {
                signal: Some(15),
                exit_code: None,
                ..
            })
        ),
        "{last:?}"
    );
}

#[test]
fn exec_and_files_through_a_real_agent() {
    let Some(sandbox) = Sandbox::start() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), exercise(&sandbox.socket))
            .await
            .expect("the exercise took over 2 minutes");
        tokio::time::timeout(Duration::from_secs(120), exercise_streams(&sandbox.socket))
            .await
            .expect("the stream exercise took over 2 minutes");
    });
    drop(sandbox);
}
