//! `moat run` through a sandbox's agent: for sandboxes that need more than a forked
//! command, i.e. the gvisor tier (runsc runs the agent as the sandbox's PID 1) and network
//! mode `allowlist` (the agent relays connections to an egress proxy this process runs). The sandbox is started (while this process is still
//! single-threaded), the command runs as the agent's exec with our stdin, stdout and stderr,
//! and the sandbox is destroyed, whatever happened, before the result is reported.

use moat_api::{ExecResult, Layers, Status, Truncated};
use moat_backend::cgroup::Cgroup;
use moat_backend::{SpawnRequest, Spawned};
use moat_egress::{ConnEvent, EgressSink};
use moat_policy::Policy;
use moat_server::agent_client::{AgentClient, ExecEvent, ExecSpec};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the egress proxy reported during the run.
#[derive(Default)]
struct Sink {
    /// Print denials to stderr as they happen (not with `--json`).
    print: bool,
    events: Mutex<Vec<ConnEvent>>,
    killed: AtomicBool,
    kill: tokio::sync::Notify,
}

impl EgressSink for Sink {
    fn event(&self, e: ConnEvent) {
        if self.print && e.decision == "deny" {
            eprintln!(
                "moat: egress denied: {}:{}: {}",
                e.host,
                e.port,
                e.reason.as_deref().unwrap_or("not allowed")
            );
        }
        if let Ok(mut v) = self.events.lock() {
            if v.len() < 10_000 {
                v.push(e);
            }
        }
    }

    fn denial_limit(&self, _sandbox: &str) {
        self.killed.store(true, Ordering::SeqCst);
        self.kill.notify_one();
    }
}

/// A started sandbox, destroyed on drop.
struct Started {
    spawned: Spawned,
    dir: PathBuf,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = moat_backend::destroy_spawned(&self.spawned);
        if !self.spawned.cgroup_paths.is_empty() {
            if let Ok(mut cg) = Cgroup::open(self.spawned.cgroup_paths.clone()) {
                let _ = cg.kill_all();
                let _ = cg.remove();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A private (0700) directory for the agent's socket.
fn socket_dir(id: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let base = if moat_sys::process::effective_uid() == 0 {
        PathBuf::from("/run/moat")
    } else {
        std::env::temp_dir()
    };
    let _ = std::fs::create_dir_all(&base);
    let dir = base.join(format!("run-{id}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Runs `argv` in a fresh sandbox through its agent. Must be called while the process is
/// single-threaded (it forks the sandbox first).
pub fn run(
    mut policy: Policy,
    argv: Vec<String>,
    json: bool,
    operator: moat_egress::Operator,
) -> Result<(ExecResult, Option<Vec<ConnEvent>>), String> {
    let started_at = Instant::now();
    let id = format!("{}-{}", std::process::id(), random_hex(4));
    // Secrets' values come from this process's environment and never enter the sandbox.
    let mut values = BTreeMap::new();
    for name in policy.network.secrets.keys() {
        match std::env::var(name) {
            Ok(v) if !v.is_empty() => {
                values.insert(name.clone(), v);
            }
            _ => {
                return Err(format!(
                    "secret {name} is bound in network.secrets but not set: export {name}=... \
                     in moat's environment (the sandbox gets a placeholder, never the value)"
                ))
            }
        }
    }
    let prepared = moat_server::egress::prepare(&format!("run-{id}"), &policy, &values)?;
    if let Some(p) = &prepared {
        for (k, v) in &p.env {
            policy.env.insert(k.clone(), v.clone());
        }
        policy.network.ca_pem = p.ca_pem.clone();
    }
    let timeout = policy.limits.timeout;
    let memory = policy.limits.memory;
    let output_cap = policy.limits.output;
    let dir = socket_dir(&id)?;
    let socket = dir.join("agent.sock");
    let spawned = match moat_backend::spawn_any(&SpawnRequest {
        policy,
        socket: socket.clone(),
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(match e {
                moat_backend::RunError::Refused(_) => format!("refusing to run: {e}"),
                _ => e.to_string(),
            });
        }
    };
    let layers = spawned.layers.clone();
    let cgroup_paths = spawned.cgroup_paths.clone();
    let sandbox = Started { spawned, dir };

    // From here on threads are fine: the sandbox is started.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let sink = Arc::new(Sink {
        print: !json,
        ..Sink::default()
    });
    let had_egress = prepared.is_some();
    let outcome = rt.block_on(async {
        let _pump = match prepared {
            Some(p) => {
                let proxy = moat_egress::Proxy::new(operator)
                    .map_err(|e| format!("cannot start the egress proxy: {e}"))?;
                Some(moat_server::egress::start(
                    &proxy,
                    socket.clone(),
                    p.cfg,
                    sink.clone(),
                ))
            }
            None => None,
        };
        let agent = AgentClient::connect(&socket)
            .await
            .map_err(|e| format!("the sandbox started but its agent did not answer: {e}"))?;
        let mut spec = ExecSpec::new(argv);
        spec.stdin = true;
        spec.timeout_ms = Some(timeout.as_millis().min(u64::MAX as u128) as u64);
        let mut exec = agent.exec(spec).await.map_err(|e| e.to_string())?;
        // Our stdin to the command's, on a thread of its own (a blocking read).
        let input = exec.stdin();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(4);
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.blocking_send(None);
                        return;
                    }
                    Ok(n) => {
                        if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                match chunk {
                    Some(b) => {
                        if input.write(b.into()).await.is_err() {
                            return;
                        }
                    }
                    None => {
                        let _ = input.close().await;
                        return;
                    }
                }
            }
        });
        let mut out = (Vec::new(), Vec::new());
        let mut counts = (0u64, 0u64);
        let mut over = false;
        let mut lost = None;
        let end = loop {
            let ev = tokio::select! {
                ev = exec.next() => ev,
                () = sink.kill.notified() => {
                    let _ = exec.stdin().cancel();
                    break None;
                }
            };
            match ev {
                Some(ExecEvent::Started { .. }) => {}
                Some(ExecEvent::Stdout(b)) | Some(ExecEvent::Stderr(b)) if over => drop(b),
                // Up to the cap and not a byte more, as `moat run` in the native tier.
                Some(ExecEvent::Stdout(b)) => {
                    let keep = room(&mut counts.0, output_cap, b.len());
                    over |= keep < b.len();
                    emit(json, &mut out.0, &b[..keep], std::io::stdout());
                }
                Some(ExecEvent::Stderr(b)) => {
                    let keep = room(&mut counts.1, output_cap, b.len());
                    over |= keep < b.len();
                    emit(json, &mut out.1, &b[..keep], std::io::stderr());
                }
                Some(ExecEvent::Exit {
                    exit_code,
                    signal,
                    status,
                }) => break Some((exit_code, signal, status)),
                // The agent went away: in the gvisor tier that is how the host's OOM killer
                // ends a sandbox (it kills the sentry); told apart below by the cgroup.
                Some(ExecEvent::Failed(e)) => {
                    lost = Some(e.to_string());
                    break None;
                }
                None => break None,
            }
            if over {
                let _ = exec.stdin().cancel();
            }
        };
        Ok::<_, String>((end, out, counts, over, lost))
    });
    let cg = Cgroup::open(cgroup_paths.clone()).ok();
    let oom = cg.as_ref().is_some_and(|c| c.oom_kills() > 0);
    let cpu_ms = cg.as_ref().map_or(0, |c| c.stats().cpu_usec / 1000);
    if let Some(c) = cg {
        // Not ours to remove here: `sandbox`'s drop does it after the kill.
        let _ = c.into_paths();
    }
    drop(sandbox);
    let events = had_egress.then(|| sink.events.lock().map(|v| v.clone()).unwrap_or_default());
    let (end, out, counts, over, lost) = outcome?;
    if let (Some(e), false) = (&lost, oom) {
        return Err(format!("the sandbox's agent went away: {e}"));
    }
    let killed = sink.killed.load(Ordering::SeqCst);
    let (exit_code, signal, mut status) = end.unwrap_or((None, Some(9), Status::Killed));
    // The same statuses and words as the native tier's one-shot run.
    let mut message = None;
    let (mut exit_code, mut signal) = (exit_code, signal);
    if status == Status::Timeout {
        message = Some(format!(
            "the command ran past its {} ms timeout; the sandbox was killed",
            timeout.as_millis()
        ));
    } else if over {
        status = Status::OutputLimit;
        message = Some(format!(
            "output went over the {output_cap} byte cap; the sandbox was killed"
        ));
    } else if killed {
        status = Status::PolicyDenied;
        message = Some("the sandbox was killed after too many denied connections".into());
    } else if oom && (signal == Some(libc::SIGKILL) || lost.is_some()) {
        status = Status::Oom;
        exit_code = None;
        signal = Some(libc::SIGKILL);
        message = Some(format!(
            "the sandbox ran out of its {} MiB memory limit and the kernel killed the command",
            memory >> 20
        ));
    }
    let cap = |v: Vec<u8>| {
        let mut v = v;
        v.truncate(output_cap as usize);
        String::from_utf8_lossy(&v).into_owned()
    };
    let result = ExecResult {
        stdout: cap(out.0),
        stderr: cap(out.1),
        exit_code,
        signal,
        status,
        wall_ms: started_at.elapsed().as_millis() as u64,
        cpu_ms,
        max_rss_kb: 0,
        truncated: Truncated {
            stdout: counts.0 > output_cap,
            stderr: counts.1 > output_cap,
        },
        message,
        sandbox: Layers { ..layers },
    };
    Ok((result, events))
}

/// How much of a `len`-byte chunk fits under `cap` after `sent` bytes; counts it in.
fn room(sent: &mut u64, cap: u64, len: usize) -> usize {
    let keep = (cap.saturating_sub(*sent) as usize).min(len);
    *sent += len as u64;
    keep
}

/// Output: captured (`--json`) or written through.
fn emit(json: bool, buf: &mut Vec<u8>, bytes: &[u8], mut to: impl Write) {
    if json {
        buf.extend_from_slice(bytes);
    } else {
        let _ = to.write_all(bytes);
        let _ = to.flush();
    }
}
