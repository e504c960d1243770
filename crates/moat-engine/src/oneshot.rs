//! `moat run`: the engine's one-shot path ([`run`]). A native sandbox without egress runs its
//! command as init's forked workload (`moat_backend::run`, the fastest start). A sandbox that
//! needs more runs it through its agent: the gvisor tier (runsc runs the agent as the
//! sandbox's PID 1) and network mode `allowlist` (the agent relays connections to an egress
//! proxy this process runs). The sandbox is started (while this process is still
//! single-threaded), the command runs as the agent's exec with our stdin, stdout and stderr,
//! and the sandbox is destroyed, whatever happened, before the result is reported.

use crate::agent_client::{AgentClient, ClientError, ExecEvent, ExecSpec};
use moat_api::outcome::{classify, Ending, Scope as OutcomeScope};
use moat_api::{ExecResult, Layers, Status, Truncated};
use moat_backend::cgroup::Cgroup;
use moat_backend::{SpawnRequest, Spawned};
use moat_egress::{ConnEvent, EgressSink};
use moat_policy::Policy;
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

/// `MOAT_TRACE=1`: where a one-shot's time goes after the start (`moat-trace: run PHASE
/// MICROS`, since `moat run` began).
fn trace(started: Instant, phase: &str) {
    if std::env::var_os("MOAT_TRACE").is_some_and(|v| v == "1") {
        eprintln!("moat-trace: run {phase} {}", started.elapsed().as_micros());
    }
}

/// A started sandbox, destroyed on drop.
struct Started {
    spawned: Spawned,
    dir: PathBuf,
    /// The watcher that destroys the sandbox if this process dies first (see [`watch_main`]).
    watcher: Option<std::process::Child>,
}

impl Drop for Started {
    fn drop(&mut self) {
        destroy(&self.spawned, &self.dir);
        if let Some(mut w) = self.watcher.take() {
            // Done: the watcher exits without touching anything.
            if let Some(mut input) = w.stdin.take() {
                let _ = input.write_all(WATCH_DONE);
            }
            let _ = w.wait();
        }
    }
}

/// Stops a sandbox and removes what it left: its processes, its cgroup, the socket's
/// directory. Fine to repeat.
fn destroy(spawned: &Spawned, dir: &std::path::Path) {
    let _ = moat_backend::destroy_spawned(spawned);
    if !spawned.cgroup_paths.is_empty() {
        if let Ok(mut cg) = Cgroup::open(spawned.cgroup_paths.clone()) {
            let _ = cg.kill_all();
            let _ = cg.remove();
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The first argument that makes `moat` the watcher of a `moat run`'s sandbox.
pub const WATCH_ARG: &str = "__moat-run-watch";
/// What `moat run` writes to its watcher when it has destroyed the sandbox itself.
const WATCH_DONE: &[u8] = b"done\n";

/// What the watcher is told about the sandbox, as the first line of its stdin.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Watched {
    spawned: Spawned,
    dir: PathBuf,
}

/// The sandboxes behind an agent (the gvisor tier's runsc sandbox, the native tier's
/// persistent init) outlive the process that started them, so a `moat run` killed by
/// SIGKILL would leave its sandbox running. A watcher process (`moat-watch`, in a process
/// group of its own so that a terminal's ^C does not reach it) holds the read end of a pipe
/// from this process: at EOF without [`WATCH_DONE`] (this process died) it destroys the
/// sandbox. None when it cannot be started (then only this process's own teardown is left).
fn start_watcher(spawned: &Spawned, dir: &std::path::Path) -> Option<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().ok()?;
    let line = serde_json::to_string(&Watched {
        spawned: spawned.clone(),
        dir: dir.to_path_buf(),
    })
    .ok()?;
    let mut child = std::process::Command::new(exe)
        .arg0("moat-watch")
        .arg(WATCH_ARG)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .ok()?;
    let input = child.stdin.as_mut()?;
    if input.write_all(format!("{line}\n").as_bytes()).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    Some(child)
}

/// `moat __moat-run-watch`: the watcher of [`start_watcher`]. Returns the exit code.
pub fn watch_main() -> i32 {
    let mut input = String::new();
    let _ = std::io::stdin().lock().read_to_string(&mut input);
    let Some((first, rest)) = input.split_once('\n') else {
        return 1;
    };
    let Ok(w) = serde_json::from_str::<Watched>(first) else {
        return 1;
    };
    if rest.as_bytes() != WATCH_DONE {
        destroy(&w.spawned, &w.dir);
    }
    0
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

/// Runs `argv` in a fresh sandbox and tears it down: with `json`, output is collected into
/// the result, else streamed to this process's stdout and stderr as it comes; stdin is passed
/// through. Returns the result and, when an egress proxy ran, its connections. Must be called
/// while the process is single-threaded (it forks the sandbox first).
pub fn run(
    policy: Policy,
    argv: Vec<String>,
    json: bool,
    operator: moat_egress::Operator,
) -> Result<(ExecResult, Option<Vec<ConnEvent>>), String> {
    if policy.network.mode == moat_policy::NetworkMode::Allowlist
        || policy.tier != moat_policy::Tier::Native
    {
        return run_agent(policy, argv, json, operator);
    }
    let req = moat_backend::RunRequest {
        policy,
        argv,
        stream: !json,
        stdin: true,
    };
    match moat_backend::run(&req) {
        Ok(r) => Ok((r, None)),
        Err(e @ moat_backend::RunError::Refused(_)) => Err(format!("refusing to run: {e}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs `argv` in a fresh sandbox through its agent.
fn run_agent(
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
    let prepared = crate::egress::prepare(&format!("run-{id}"), &policy, &values)?;
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
    trace(started_at, "spawned");
    let layers = spawned.layers.clone();
    let cgroup_paths = spawned.cgroup_paths.clone();
    let watcher = start_watcher(&spawned, &dir);
    trace(started_at, "watcher-started");
    let sandbox = Started {
        spawned,
        dir,
        watcher,
    };

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
    // The first of SIGINT, SIGTERM, SIGHUP, SIGQUIT that reached this process.
    let mut killed_by: Option<i32> = None;
    let outcome = rt.block_on(async {
        let _pump = match prepared {
            Some(p) => {
                let proxy = moat_egress::Proxy::new(operator)
                    .map_err(|e| format!("cannot start the egress proxy: {e}"))?;
                Some(crate::egress::start(
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
        trace(started_at, "connected");
        // SIGINT, SIGTERM, SIGHUP and SIGQUIT as in the native tier: the first is passed on
        // to the command's process group, a second one stops the sandbox.
        let mut signals = Signals::new()?;
        let mut spec = ExecSpec::new(argv);
        spec.stdin = true;
        spec.timeout_ms = Some(timeout.as_millis().min(u64::MAX as u128) as u64);
        let mut exec = match agent.exec(spec).await {
            Ok(exec) => exec,
            Err(e) => match not_started(&e) {
                Some(failure) => return Ok(Ended::NotStarted(failure)),
                None => return Err(e.to_string()),
            },
        };
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
        let mut started = false;
        // The agent enforces the timeout inside the sandbox; this is the host's own fence in
        // case it cannot (a stuck or killed agent): the sandbox is stopped a little later.
        let fence = tokio::time::sleep(timeout + std::time::Duration::from_secs(2));
        tokio::pin!(fence);
        let end = loop {
            let ev = tokio::select! {
                ev = exec.next() => ev,
                () = &mut fence => {
                    let _ = exec.stdin().cancel();
                    break Some((None, Some(libc::SIGKILL), Status::Timeout));
                }
                () = sink.kill.notified() => {
                    let _ = exec.stdin().cancel();
                    break None;
                }
                sig = signals.next() => {
                    if killed_by.is_some() {
                        // The second signal: the sandbox is stopped (below, by its drop).
                        let _ = exec.stdin().cancel();
                        break None;
                    }
                    killed_by = Some(sig);
                    let _ = exec.stdin().signal(sig).await;
                    continue;
                }
            };
            match ev {
                Some(ExecEvent::Started { .. }) => started = true,
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
                    if !started {
                        if let Some(failure) = not_started(&e) {
                            return Ok(Ended::NotStarted(failure));
                        }
                    }
                    lost = Some(e.to_string());
                    break None;
                }
                None => break None,
            }
            if over {
                let _ = exec.stdin().cancel();
            }
        };
        Ok::<_, String>(Ended::Ran {
            end,
            out,
            counts,
            over,
            lost,
        })
    });
    // From the sandbox's start to the command's end, as in the native tier: the teardown
    // that follows is not the command's time.
    let wall_ms = started_at.elapsed().as_millis() as u64;
    trace(started_at, "command-done");
    let cg = Cgroup::open(cgroup_paths.clone()).ok();
    let oom = cg.as_ref().is_some_and(|c| c.oom_kills() > 0);
    let cpu_ms = cg.as_ref().map_or(0, |c| c.stats().cpu_usec / 1000);
    let max_rss_kb = peak_memory_kb(&cgroup_paths);
    if let Some(c) = cg {
        // Not ours to remove here: `sandbox`'s drop does it after the kill.
        let _ = c.into_paths();
    }
    drop(sandbox);
    trace(started_at, "destroyed");
    let events = had_egress.then(|| sink.events.lock().map(|v| v.clone()).unwrap_or_default());
    let (end, out, counts, over, lost) = match outcome? {
        Ended::Ran {
            end,
            out,
            counts,
            over,
            lost,
        } => (end, out, counts, over, lost),
        // As the native tier's `execfail`: status error, the shell's exit code, the reason.
        Ended::NotStarted((exit_code, message)) => {
            let result = ExecResult {
                stdout: String::new(),
                stderr: String::new(),
                exit_code,
                signal: None,
                status: Status::Error,
                wall_ms,
                cpu_ms,
                max_rss_kb,
                truncated: Truncated::default(),
                message: Some(message),
                sandbox: Layers { ..layers },
            };
            return Ok((result, events));
        }
    };
    if let (Some(e), false) = (&lost, oom) {
        return Err(format!("the sandbox's agent went away: {e}"));
    }
    let killed = sink.killed.load(Ordering::SeqCst);
    let (exit_code, signal, status) = end.unwrap_or((None, Some(9), Status::Killed));
    // The same statuses and words as the native tier's one-shot run.
    let o = classify(
        &Ending {
            exit_code,
            signal,
            timed_out_ms: (status == Status::Timeout).then_some(timeout.as_millis() as u64),
            output_over: over.then_some(output_cap),
            egress_killed: killed,
            oom_with_limit: oom.then_some(memory),
            runner_lost: lost.is_some(),
            moat_signal: killed_by,
            cancelled: status == Status::Killed,
        },
        OutcomeScope::Sandbox,
    );
    let (exit_code, signal, status, message) = (o.exit_code, o.signal, o.status, o.message);
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
        wall_ms,
        cpu_ms,
        max_rss_kb,
        truncated: Truncated {
            stdout: counts.0 > output_cap,
            stderr: counts.1 > output_cap,
        },
        message,
        sandbox: Layers { ..layers },
    };
    Ok((result, events))
}

/// How the exec through the agent ended.
enum Ended {
    /// The command ran: how it ended (`None`: the sandbox was stopped, or its agent went
    /// away), its captured output and byte counts, whether it went over the output cap, and
    /// why the agent was lost, if it was.
    Ran {
        end: Option<(Option<i32>, Option<i32>, Status)>,
        out: (Vec<u8>, Vec<u8>),
        counts: (u64, u64),
        over: bool,
        lost: Option<String>,
    },
    /// The command could not start: the shell's exit code for that, and the agent's reason.
    NotStarted((Option<i32>, String)),
}

/// The agent's refusal to start a command (no such program, not executable), as the native
/// tier's `execfail` reports it: the shell's exit code (127, 126) and the agent's words.
fn not_started(e: &ClientError) -> Option<(Option<i32>, String)> {
    match e {
        ClientError::Agent { code, message } => match code.as_str() {
            "not_found" => Some((Some(127), message.clone())),
            "permission_denied" => Some((Some(126), message.clone())),
            _ => None,
        },
        _ => None,
    }
}

/// The signals `moat run` relays, as in the native tier.
struct Signals {
    streams: Vec<(i32, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut streams = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            let s = signal(SignalKind::from_raw(sig))
                .map_err(|e| format!("cannot handle signal {sig}: {e}"))?;
            streams.push((sig, s));
        }
        Ok(Signals { streams })
    }

    /// The next of them to arrive.
    async fn next(&mut self) -> i32 {
        std::future::poll_fn(|cx| {
            for (sig, s) in &mut self.streams {
                if s.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*sig);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// The sandbox's peak memory in KiB, from its cgroup (v1 `memory.max_usage_in_bytes`, v2
/// `memory.peak`). In the gvisor tier the command's own rusage stays inside the sentry, so
/// this is what `max_rss_kb` reports there: the whole sandbox's peak, the sentry included.
fn peak_memory_kb(paths: &[PathBuf]) -> u64 {
    paths
        .iter()
        .flat_map(|p| [p.join("memory.max_usage_in_bytes"), p.join("memory.peak")])
        .find_map(|f| std::fs::read_to_string(f).ok()?.trim().parse::<u64>().ok())
        .map_or(0, |b| b / 1024)
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
