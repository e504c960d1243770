//! The native tier: namespaces, a fresh root, seccomp, Landlock, no capabilities, rlimits and
//! cgroup limits, with moat's own init as PID 1.
//!
//! Process model for one run:
//!
//! ```text
//! moat (host) ──clone(NEWUSER|NEWPID|NEWNS|NEWNET|NEWIPC|NEWUTS)──▶ init (PID 1, ns root)
//!    │ writes the id maps, "G" ─────────────────────────────────▶   │ builds the root (another CPU)
//!    │ makes the cgroup, "C" + its files ───────────────────────▶   │ joins it, pivots, forks
//!    │ relays stdin/stdout/stderr, enforces timeout and output caps  ▼
//!    │ reads the status line                                       workload (uid 1000, no caps,
//!    ▼ removes the cgroup                                          no_new_privs, Landlock, seccomp)
//! ```
//!
//! When init exits, the kernel kills every process left in the pid namespace, so a timeout or
//! a kill only has to kill init: double-forked processes die with it. Init dies with moat
//! (parent-death signal), so a killed moat leaves nothing running either.
//!
//! A persistent sandbox ([`spawn`]) shares the whole start sequence; then init, instead of
//! forking one workload, drops to the workload's credentials and confinement itself (uid and
//! gid, no capabilities, no_new_privs, Landlock, seccomp, not dumpable) and becomes the agent
//! on the unix socket the host bound before the clone. It has no parent-death signal, holds
//! the uid slot's lock for its whole life, and its cgroup stays until the daemon removes it:
//! the sandbox outlives the daemon. [`destroy`] kills init, which takes the pid namespace with
//! it.

use crate::cgroup::{self, Cgroup};
use crate::idmap::IdMap;
use crate::probe;
use crate::rootfs;
use moat_agent::exec::{read_to_end, ExecEnv, Workload};
use moat_agent::INIT_SIGNALS;
use moat_api::outcome::{classify, Ending, Scope as OutcomeScope};
use moat_api::{ExecResult, Layers, Status, Truncated};
use moat_policy::{Layer, Policy};
use moat_proto::boot::{InitReport, InitSync};
use moat_sys::process::{self as sys, Forked};
use moat_sys::seccomp::SockFilter;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Refused(String),
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_ctx(what: impl Into<String>) -> impl FnOnce(io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

/// What to run and how to connect it.
#[derive(Clone, Debug)]
pub struct RunRequest {
    pub policy: Policy,
    pub argv: Vec<String>,
    /// Write the workload's output to this process's stdout/stderr as it arrives (still
    /// capped) instead of capturing it into the result.
    pub stream: bool,
    /// Relay this process's stdin to the workload. Otherwise the workload's stdin is empty.
    pub stdin: bool,
}

/// `MOAT_TRACE=1`: each side prints when it reaches each phase of a start, in microseconds
/// since `moat run` began (`moat-trace: host cloned 812`), to show where a start's time goes.
#[derive(Clone, Copy)]
struct Trace {
    on: bool,
    start: Instant,
}

impl Trace {
    fn mark(&self, side: &str, phase: &str) {
        if self.on {
            // One write, so the lines of init and of moat do not interleave.
            let line = format!(
                "moat-trace: {side} {phase} {}\n",
                self.start.elapsed().as_micros()
            );
            let _ = sys::write_all(2, line.as_bytes());
        }
    }
}

/// The namespaces a sandbox is cloned into (the cgroup namespace follows once init is in its
/// cgroup).
pub const NAMESPACES: libc::c_int = sys::CLONE_NEWUSER
    | sys::CLONE_NEWPID
    | sys::CLONE_NEWNS
    | sys::CLONE_NEWNET
    | sys::CLONE_NEWIPC
    | sys::CLONE_NEWUTS;

/// Signals the parent relays to the sandbox.
const RELAYED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The layers a run will have, decided before anything starts.
struct Plan {
    landlock_abi: u32,
    missing: Vec<String>,
}

/// Checks the layers that must be known before the sandbox is created.
fn plan(policy: &Policy) -> Result<Plan, RunError> {
    if let Some(why) = probe::userns_blocked() {
        return Err(RunError::Refused(why));
    }
    if !moat_sys::seccomp::supported() {
        return Err(RunError::Refused(
            "this kernel has no seccomp filter support (CONFIG_SECCOMP_FILTER); moat never runs \
             without it"
                .into(),
        ));
    }
    let mut missing = Vec::new();
    let abi = moat_sys::landlock::abi_version();
    let min = policy.security.landlock_min_abi;
    let landlock_abi = if abi >= min && abi > 0 {
        abi
    } else if policy.security.allows_missing(Layer::Landlock) {
        missing.push(format!("landlock (kernel ABI {abi}, policy minimum {min})"));
        0
    } else {
        return Err(RunError::Refused(format!(
            "Landlock ABI {abi} is below the policy's minimum {min}: boot a kernel with Landlock \
             enabled (5.13+, `lsm=landlock,...`), or set security.allow_missing = [\"landlock\"] \
             to run without it"
        )));
    };
    Ok(Plan {
        landlock_abi,
        missing,
    })
}

/// The cgroup host a sandbox's cgroup goes under, or `None` when the host has no usable
/// cgroups and the policy lets the sandbox go without them (what is missing is added to
/// `missing`). When the policy does not, the refusal's reason ends with `fix`. Both tiers.
pub(crate) fn cgroup_host(
    policy: &Policy,
    missing: &mut Vec<String>,
    fix: &str,
) -> Result<Option<cgroup::Host>, RunError> {
    let mut host = cgroup::Host::detect();
    if let Err(e) = host.resolve() {
        // cgroup v2 with no usable place for sandbox cgroups: as good as missing.
        let why = e.to_string();
        host.parents.clear();
        host.missing = cgroup::Controller::ALL
            .iter()
            .map(|c| (*c, why.clone()))
            .collect();
    }
    if !host.missing.is_empty() {
        if !policy.security.allows_missing(Layer::Cgroups) {
            let reasons: Vec<String> = host
                .missing
                .iter()
                .map(|(c, w)| format!("{}: {w}", c.name()))
                .collect();
            return Err(RunError::Refused(format!(
                "cgroup limits are not available here ({}): {fix}",
                reasons.join("; ")
            )));
        }
        for (c, why) in &host.missing {
            missing.push(format!("{} limit ({why})", c.name()));
        }
        if host.parents.is_empty() {
            return Ok(None);
        }
    }
    Ok(Some(host))
}

/// Creates a sandbox's cgroup named `name` under `host` with `limits` (both tiers).
pub(crate) fn create_cgroup(
    host: &cgroup::Host,
    name: &str,
    limits: cgroup::Limits,
) -> Result<Option<Cgroup>, RunError> {
    Cgroup::create(host, name, limits).map(Some).map_err(|e| {
        RunError::Setup(format!(
            "{e} (set security.allow_missing = [\"cgroups\"] to run without limits)"
        ))
    })
}

/// Creates the sandbox's cgroup (or decides to go without, when the policy allows it).
fn make_cgroup(
    policy: &Policy,
    name: &str,
    persistent: bool,
    missing: &mut Vec<String>,
) -> Result<Option<Cgroup>, RunError> {
    let fix = "run as root, or on a cgroup v2 host with delegation (e.g. `systemd-run --user \
               --scope -p Delegate=yes moat run ...`), or set security.allow_missing = \
               [\"cgroups\"] to run without memory/pids/cpu limits";
    let Some(mut host) = cgroup_host(policy, missing, fix)? else {
        return Ok(None);
    };
    sweep_step(&host);
    if !persistent {
        // The v1 freezer and cpuacct hierarchies serve a persistent sandbox's pause and
        // metrics; a one-shot run needs neither (its CPU time comes from wait4), and each
        // hierarchy is a directory to make, join and remove at every start.
        host.extra.clear();
    }
    let l = &policy.limits;
    create_cgroup(
        &host,
        name,
        cgroup::Limits {
            memory: l.memory,
            pids: l.pids,
            cpus: l.cpus,
        },
    )
}

/// How often a long-lived starter (the daemon's spawner) begins a sweep of stale sandbox
/// cgroups.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A bounded step of this process's sweep of stale sandbox cgroups ([`cgroup::StaleSweep`]):
/// a process's first sandbox begins a pass, a pass begins at most every [`SWEEP_EVERY`], and
/// each start goes through no more than [`cgroup::SWEEP_BUDGET`] directories of it, so a
/// spawner holding N sandboxes pays the same per start whatever N is (a `moat run` sweeps
/// the first budget's worth: all of a parent with few sandboxes). A stale cgroup is empty and
/// only waits to be removed, so removing it a few starts later changes nothing. No thread: a
/// spawner forks sandboxes.
fn sweep_step(host: &cgroup::Host) {
    use std::sync::Mutex;
    static SWEEP: Mutex<cgroup::StaleSweep> = Mutex::new(cgroup::StaleSweep::new());
    if let Ok(mut sweep) = SWEEP.lock() {
        sweep.step(host, SWEEP_EVERY, cgroup::SWEEP_BUDGET, stale_cgroup);
    }
}

/// What init does once the sandbox's root is built and entered.
enum InitJob<'a> {
    /// `moat run`: fork the workload on these pipe ends, report how it ended, exit.
    Run {
        argv: &'a [String],
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// A persistent sandbox: become the agent, serving this listening socket.
    Agent { listener: OwnedFd },
}

impl InitJob<'_> {
    /// The descriptors init keeps (all others it inherited are closed at once).
    fn fds(&self) -> Vec<RawFd> {
        match self {
            InitJob::Run {
                stdin,
                stdout,
                stderr,
                ..
            } => vec![stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()],
            InitJob::Agent { listener } => vec![listener.as_raw_fd()],
        }
    }
}

/// A sandbox whose init runs and has been released (its ids mapped, its cgroup made).
struct Sandbox {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    cg: Option<Cgroup>,
    plan: Plan,
    /// The uid range; init holds the slot's lock too, so the slot stays taken until init
    /// is gone even once this copy is dropped.
    _ids: IdMap,
    /// init's status lines (`ready`, `error ...`, `exit ...`).
    st_r: OwnedFd,
}

impl Sandbox {
    fn layers(&self) -> Layers {
        Layers {
            tier: "native".into(),
            landlock_abi: self.plan.landlock_abi,
            seccomp: true,
            cgroup: self
                .cg
                .as_ref()
                .map_or_else(|| "none".to_string(), |c| c.version.as_str().to_string()),
            missing: self.plan.missing.clone(),
        }
    }

    /// Kills init (and with it the whole pid namespace) and removes the cgroup.
    fn kill(mut self) {
        let _ = sys::pidfd_kill(self.pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = sys::wait4(self.pid, libc::__WALL);
        if let Some(cg) = self.cg.as_mut() {
            cg.destroy();
        }
    }
}

/// The start sequence `run` and `spawn` share: checks, uid range, clone into the
/// namespaces, id maps, cgroup, release. init does `job` once its root is entered.
///
/// The parent's slow work (the cgroup, whose v1 attach can wait for an RCU grace period)
/// overlaps with the child building its root: the child is released twice, once when its id
/// maps are written ("G": it can build), once its cgroup exists ("C" and the cgroup v1 `tasks`
/// files it then writes itself into, which is much faster than the parent moving it).
fn start(
    policy: &Policy,
    trace: Trace,
    started: Instant,
    job: InitJob<'_>,
) -> Result<Sandbox, RunError> {
    if !sys::is_single_threaded() {
        return Err(RunError::Setup(
            "the native tier must be started from a single-threaded process".into(),
        ));
    }
    let mut plan = plan(policy)?;
    let persistent = matches!(job, InitJob::Agent { .. });
    let rootless = sys::effective_uid() != 0;
    let prog = crate::seccomp_prog::DEFAULT_PROGRAM;
    let mountpoint = rootfs::mountpoint(rootless)
        .map_err(|e| RunError::Setup(format!("prepare moat's run directory: {e}")))?;
    let ids = IdMap::allocate(rootless).map_err(io_ctx("allocate a uid range"))?;
    let name = format!(
        "moat-{}-{:x}-{:x}",
        ids.tag(),
        std::process::id(),
        started.elapsed().as_nanos() & 0xffff_ffff
    );

    // A template's files, as a detached mount that shows them with the sandbox's ids (made
    // here, as root of the host: the sandbox cannot make it, and inherits it).
    let image_tree = match (&policy.fs.image, rootless) {
        (Some(img), false) => {
            let (u, g) = ids.maps(policy.process.uid, policy.process.gid);
            Some(
                crate::image::idmapped_tree(&img.rootfs, &u, &g)
                    .map_err(|e| RunError::Setup(format!("mount template `{}`: {e}", img.name)))?,
            )
        }
        _ => None,
    };

    let (sync_r, sync_w) = sys::pipe().map_err(io_ctx("pipe"))?;
    let (st_r, st_w) = sys::pipe().map_err(io_ctx("pipe"))?;

    let cpus = sys::affinity(0).ok();
    trace.mark("host", "clone");
    let (pid, pidfd) = match sys::clone_fork(NAMESPACES) {
        Err(e) => {
            return Err(RunError::Refused(format!(
                "cannot create the sandbox's namespaces ({e}): check `moat doctor` (user \
                 namespaces may be disabled by sysctl kernel.unprivileged_userns_clone=0, \
                 user.max_user_namespaces=0 or an AppArmor restriction)"
            )));
        }
        Ok(Forked::Child) => {
            // init keeps only what it needs: the sync and status pipes, its job's fds and
            // the uid slot's lock (held for its whole life). Everything else it inherited
            // (the parent's ends of the pipes, a spawner's socket) goes now.
            let mut keep = job.fds();
            keep.extend([sync_r.as_raw_fd(), st_w.as_raw_fd()]);
            keep.extend(ids.lock_fd());
            keep.extend(image_tree.as_ref().map(|t| t.as_raw_fd()));
            if sys::close_fds_except(&keep).is_err() {
                sys::exit_now(125);
            }
            let landlock_abi = plan.landlock_abi;
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                init_main(
                    policy,
                    rootless,
                    landlock_abi,
                    prog,
                    &mountpoint,
                    InitFds {
                        sync_r,
                        st_w,
                        image_tree: image_tree.as_ref().map(|t| t.as_raw_fd()),
                    },
                    job,
                    trace,
                    cpus,
                )
            }));
            sys::exit_now(125);
        }
        Ok(Forked::Parent { pid, pidfd }) => (pid, pidfd),
    };
    drop((sync_r, st_w, job, image_tree));
    // Start init on a CPU other than ours: it builds its root while we make its cgroup, and a
    // freshly forked child otherwise queues behind its parent on the same CPU. Init gives the
    // full set back before it starts the workload.
    if let Some(other) = other_cpu(&cpus) {
        let _ = sys::set_affinity(pid, &sys::single_cpu(other));
    }

    trace.mark("host", "cloned");
    // Parent: map ids and release the child to build its root; meanwhile make its cgroup.
    let mut cg: Option<Cgroup> = None;
    let setup = (|| -> Result<(), RunError> {
        let (uid_map, gid_map) = ids.maps(policy.process.uid, policy.process.gid);
        if rootless {
            fs::write(format!("/proc/{pid}/setgroups"), "deny")
                .map_err(io_ctx("write setgroups"))?;
        }
        fs::write(format!("/proc/{pid}/uid_map"), uid_map).map_err(io_ctx("write uid_map"))?;
        fs::write(format!("/proc/{pid}/gid_map"), gid_map).map_err(io_ctx("write gid_map"))?;
        sys::write_all(sync_w.as_raw_fd(), &InitSync::Go.encode())
            .map_err(io_ctx("start the sandbox"))?;
        trace.mark("host", "released");
        cg = make_cgroup(policy, &name, persistent, &mut plan.missing)?;
        // Then the cgroup files init writes "0" to itself (v1).
        let mut join = Vec::new();
        if let Some(cg) = &cg {
            let (uid, gid) = ids.host_root();
            let files = cg
                .delegate_self_join(uid, gid)
                .map_err(|e| RunError::Setup(e.to_string()))?;
            match files {
                Some(files) => join = files.iter().map(|f| f.display().to_string()).collect(),
                None => cg.add(pid).map_err(|e| RunError::Setup(e.to_string()))?,
            }
        }
        trace.mark("host", "cgroup-ready");
        let msg = InitSync::Cgroup { join }.encode();
        sys::write_all(sync_w.as_raw_fd(), &msg).map_err(io_ctx("start the sandbox"))?;
        Ok(())
    })();
    drop(sync_w);
    let sandbox = Sandbox {
        pid,
        pidfd,
        cg,
        plan,
        _ids: ids,
        st_r,
    };
    if let Err(e) = setup {
        sandbox.kill();
        return Err(e);
    }
    Ok(sandbox)
}

/// Runs one command in a fresh native sandbox and tears it down.
///
/// Must be called from a single-threaded process (the sandbox is forked from it).
pub fn run(req: &RunRequest) -> Result<ExecResult, RunError> {
    let started = Instant::now();
    let trace = Trace {
        on: std::env::var_os("MOAT_TRACE").is_some_and(|v| v == "1"),
        start: started,
    };
    req.policy
        .validate()
        .map_err(|e| RunError::Refused(e.to_string()))?;
    if req.argv.is_empty() {
        return Err(RunError::Refused(
            "no command given: moat run [OPTIONS] -- CMD [ARGS...]".into(),
        ));
    }
    if !sys::is_single_threaded() {
        return Err(RunError::Setup(
            "the native tier must be started from a single-threaded process".into(),
        ));
    }
    let (in_r, in_w) = sys::pipe().map_err(io_ctx("pipe"))?;
    let (out_r, out_w) = sys::pipe().map_err(io_ctx("pipe"))?;
    let (err_r, err_w) = sys::pipe().map_err(io_ctx("pipe"))?;

    let old_mask = sys::block_signals(&RELAYED).map_err(io_ctx("block signals"))?;
    let sigfd = match sys::signalfd(&RELAYED) {
        Ok(f) => f,
        Err(e) => {
            let _ = sys::set_signal_mask(&old_mask);
            return Err(io_ctx("signalfd")(e));
        }
    };
    let job = InitJob::Run {
        argv: &req.argv,
        stdin: in_r,
        stdout: out_w,
        stderr: err_w,
    };
    let mut sandbox = match start(&req.policy, trace, started, job) {
        Ok(s) => s,
        Err(e) => {
            let _ = sys::set_signal_mask(&old_mask);
            return Err(e);
        }
    };
    let pid = sandbox.pid;
    let st_r = match sandbox.st_r.try_clone() {
        Ok(f) => f,
        Err(e) => {
            let _ = sys::set_signal_mask(&old_mask);
            sandbox.kill();
            return Err(io_ctx("dup the status pipe")(e));
        }
    };
    let mut relay = Relay::new(req, in_w, out_r, err_r, st_r);
    let outcome = relay.run(pid, &sandbox.pidfd, &sigfd, started);
    let _ = sys::set_signal_mask(&old_mask);

    trace.mark("host", "sandbox-exited");
    let oom = sandbox.cg.as_ref().is_some_and(|c| c.oom_kills() > 0);
    let layers = sandbox.layers();
    if let Some(cg) = sandbox.cg.as_mut() {
        cg.destroy();
    }
    trace.mark("host", "cleaned-up");
    drop(sandbox);

    Ok(outcome.into_result(req, oom, started, layers))
}

/// What [`spawn`] needs: the policy, and where the agent listens.
#[derive(Clone, Debug)]
pub struct SpawnRequest {
    pub policy: Policy,
    /// Path of the agent's unix socket. Its directory must exist and be reachable only by
    /// the daemon (root-owned, `0700`); the socket is created `0600`. A stale socket there
    /// is replaced; any other file is an error.
    pub socket: PathBuf,
}

/// A persistent sandbox that [`spawn`] started. Store all of it: `pid` and `start_time`
/// name init exactly (for [`alive`] and [`destroy`]), `cgroup_paths` let the daemon reopen
/// and remove the cgroup later ([`crate::cgroup::Cgroup::open`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spawned {
    /// init's pid in the caller's pid namespace.
    pub pid: u32,
    /// init's start time, field 22 of `/proc/PID/stat` (clock ticks since boot): with the
    /// pid, it tells this init from a later process that got the same pid.
    pub start_time: u64,
    /// The sandbox's cgroup directories (empty without cgroups). Not removed by `spawn`'s
    /// caller's exit: remove them after [`destroy`].
    pub cgroup_paths: Vec<PathBuf>,
    /// The layers the sandbox has.
    pub layers: Layers,
    /// A gvisor-tier sandbox's runsc state (absent for the native tier, and in rows stored
    /// before the tier existed): `pid` and `start_time` then name its sentry process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gvisor: Option<crate::gvisor::GvisorState>,
}

/// How long [`spawn`] waits for init to report that the agent is ready.
const SPAWN_READY_TIMEOUT_MS: i32 = 30_000;

/// Starts a persistent sandbox: init becomes the agent (every request of [`moat_proto`])
/// listening on `req.socket`, and outlives the caller (no parent-death signal; the caller's
/// exit leaves it running). Returns once the agent listens.
///
/// Must be called from a single-threaded process (see [`crate::spawner`] for daemons).
pub fn spawn(req: &SpawnRequest) -> Result<Spawned, RunError> {
    let started = Instant::now();
    let trace = Trace {
        on: std::env::var_os("MOAT_TRACE").is_some_and(|v| v == "1"),
        start: started,
    };
    req.policy
        .validate()
        .map_err(|e| RunError::Refused(e.to_string()))?;
    let listener = listen(&req.socket)?;
    let job = InitJob::Agent {
        listener: OwnedFd::from(listener),
    };
    let sandbox = match start(&req.policy, trace, started, job) {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_file(&req.socket);
            return Err(e);
        }
    };
    let fail = |sandbox: Sandbox, e: RunError| {
        sandbox.kill();
        let _ = fs::remove_file(&req.socket);
        Err(e)
    };
    let line = match read_line(
        sandbox.st_r.as_raw_fd(),
        std::time::Duration::from_millis(SPAWN_READY_TIMEOUT_MS as u64),
    ) {
        Ok(line) => line,
        Err(e) => return fail(sandbox, io_ctx("wait for the sandbox's agent")(e)),
    };
    match InitReport::parse(&line) {
        Some(InitReport::Ready { .. }) => {}
        Some(InitReport::Error(why)) if !why.is_empty() => {
            return fail(sandbox, RunError::Setup(why))
        }
        _ if line.is_empty() => {
            return fail(
                sandbox,
                RunError::Setup("the sandbox's init died during setup".into()),
            )
        }
        _ => {
            return fail(
                sandbox,
                RunError::Setup(format!("unexpected start report: {line}")),
            )
        }
    }
    let pid = sandbox.pid as u32;
    let start_time = match start_time(pid) {
        Some(t) => t,
        None => {
            return fail(
                sandbox,
                RunError::Setup("the sandbox's init died right after it started".into()),
            )
        }
    };
    let layers = sandbox.layers();
    let mut sandbox = sandbox;
    let cgroup_paths = sandbox
        .cg
        .take()
        .map(Cgroup::into_paths)
        .unwrap_or_default();
    trace.mark("host", "spawned");
    // Our copies of the slot lock and the listener go; init holds its own.
    drop(sandbox);
    Ok(Spawned {
        pid,
        start_time,
        cgroup_paths,
        layers,
        gvisor: None,
    })
}

/// Binds and listens on a unix socket at `path`, mode `0600`.
fn listen(path: &Path) -> Result<UnixListener, RunError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let what = || format!("listen on the agent socket {}", path.display());
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            fs::remove_file(path).map_err(io_ctx(what()))?;
        }
        Ok(_) => {
            return Err(RunError::Setup(format!(
                "{} exists and is not a socket: remove it or choose another socket path",
                path.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_ctx(what())(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_ctx(what()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_ctx(what()))?;
    listener.set_nonblocking(true).map_err(io_ctx(what()))?;
    Ok(listener)
}

/// Reads one status line from a sandbox's init or agent (without the newline), for both
/// tiers; EOF first gives what was read ("" for nothing).
pub(crate) fn read_line(fd: RawFd, timeout: std::time::Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut b = [0u8; 256];
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as i32;
        if left <= 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no report within {} s", timeout.as_secs()),
            ));
        }
        let rev = sys::poll(&[(fd, libc::POLLIN)], left)?;
        if rev[0] == 0 {
            continue;
        }
        match sys::read(fd, &mut b) {
            Ok(0) => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(n) => {
                line.extend_from_slice(&b[..n]);
                if let Some(end) = line.iter().position(|&c| c == b'\n') {
                    line.truncate(end);
                    return Ok(String::from_utf8_lossy(&line).into_owned());
                }
                if line.len() > 64 << 10 {
                    return Ok(String::from_utf8_lossy(&line).into_owned());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot), unless the process
/// is gone or a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses) start after the
    // last ')': field 3 (state) is first.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first().is_some_and(|s| *s == "Z" || *s == "X") {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

/// Whether the init `pid` that started at `start_time` ([`Spawned`]) still runs.
pub fn alive(pid: u32, start_time: u64) -> bool {
    pid > 1 && self::start_time(pid) == Some(start_time)
}

/// How long [`destroy`] waits for a killed init to be gone.
const DESTROY_TIMEOUT_MS: i32 = 5_000;

/// Kills a persistent sandbox: SIGKILL to its init (which takes the whole pid namespace
/// with it), then waits until it is gone (at most 5 s). Ok when it was gone already. Does
/// not remove the cgroup (the caller has its paths).
pub fn destroy(pid: u32, start_time: u64) -> io::Result<()> {
    if pid <= 1 || pid > i32::MAX as u32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pid {pid} cannot be a sandbox's init"),
        ));
    }
    let pidfd = match sys::pidfd_open(pid as libc::pid_t) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("pidfd_open {pid}: {e}"))),
    };
    // Checked after the pidfd exists: from here the pidfd names the process we checked.
    if self::start_time(pid) != Some(start_time) {
        return Ok(());
    }
    match sys::pidfd_kill(pidfd.as_raw_fd(), libc::SIGKILL) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("kill sandbox init {pid}: {e}"),
            ))
        }
    }
    let deadline = Instant::now() + std::time::Duration::from_millis(DESTROY_TIMEOUT_MS as u64);
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as i32;
        let rev = sys::poll(&[(pidfd.as_raw_fd(), libc::POLLIN)], left.max(0))?;
        if rev[0] != 0 {
            // Exited; reap it if it is our child (a spawner reaps its own).
            let _ = sys::reap_pidfd(pidfd.as_raw_fd());
            return Ok(());
        }
        if left <= 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "sandbox init {pid} did not exit within 5 s of SIGKILL (a task stuck in the \
                     kernel, e.g. on a hung mount): try again later"
                ),
            ));
        }
    }
}

/// A CPU of `cpus` other than the one this thread runs on, if there is one.
fn other_cpu(cpus: &Option<libc::cpu_set_t>) -> Option<usize> {
    let cpus = cpus.as_ref()?;
    let me = sys::current_cpu()?;
    (0..1024).find(|&c| c != me && sys::cpu_in(cpus, c))
}

/// A cgroup `moat-s<slot>-...` is stale when its slot lock is free; `moat-p<pid>-...` when
/// that process is gone.
fn stale_cgroup(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("moat-") else {
        return false;
    };
    let tag = rest.split('-').next().unwrap_or("");
    if let Some(slot) = tag.strip_prefix('s').and_then(|s| s.parse::<u32>().ok()) {
        return IdMap::slot_is_free(slot);
    }
    if let Some(pid) = tag.strip_prefix('p').and_then(|s| s.parse::<u32>().ok()) {
        return !Path::new(&format!("/proc/{pid}")).exists();
    }
    if let Some(pid) = rest
        .strip_prefix("supervisor-")
        .and_then(|s| s.parse::<u32>().ok())
    {
        return !Path::new(&format!("/proc/{pid}")).exists();
    }
    false
}

/// init's ends of the pipes to the host.
struct InitFds {
    sync_r: OwnedFd,
    st_w: OwnedFd,
    /// A template's files as an id-mapped detached mount (root only).
    image_tree: Option<RawFd>,
}

fn report(st_w: RawFd, r: &InitReport) {
    let mut l = r.encode();
    l.push('\n');
    let _ = sys::write_all(st_w, l.as_bytes());
}

/// An `error` report.
fn report_error(st_w: RawFd, why: impl std::fmt::Display) {
    report(st_w, &InitReport::Error(why.to_string()));
}

/// PID 1 of the sandbox. Never returns.
#[allow(clippy::too_many_arguments)]
fn init_main(
    policy: &Policy,
    rootless: bool,
    landlock_abi: u32,
    prog: &[SockFilter],
    mountpoint: &str,
    fds: InitFds,
    job: InitJob<'_>,
    trace: Trace,
    cpus: Option<libc::cpu_set_t>,
) -> ! {
    let agent = matches!(job, InitJob::Agent { .. });
    if agent {
        // A persistent sandbox outlives whoever started it: no parent-death signal, its own
        // session (no job-control signals from the daemon's terminal), default signal
        // dispositions (a spawner ignores SIGCHLD, which would auto-reap our children), and
        // stdio on /dev/null instead of the daemon's.
        let _ = sys::setsid();
        sys::reset_signal_dispositions();
        // With MOAT_TRACE=1 stderr stays until the agent is ready, for init's marks.
        if !trace.on {
            stdio_to_null();
        }
    } else {
        let _ = sys::set_parent_death_signal(libc::SIGKILL);
    }
    let mut go = [0u8; 1];
    match sys::read(fds.sync_r.as_raw_fd(), &mut go) {
        Ok(1) if go[..] == InitSync::Go.encode()[..] => {}
        _ => sys::exit_now(125),
    }
    // From here on no same-uid process may ptrace init or open its /proc entries (/proc/1/exe
    // is moat's own binary on the host: runc CVE-2019-5736). Not earlier: while dumpable, the
    // parent (rootless: the same user) can still write our uid_map.
    let _ = sys::set_not_dumpable();
    // Our argv and environ are still moat's, which name host paths, mount sources and --env
    // values: /proc/1/cmdline is world-readable.
    let _ = sys::scrub_cmdline_and_environ(if agent { "moat-agent" } else { "moat-init" });
    trace.mark("init", "released");
    let st_w = fds.st_w.as_raw_fd();
    let root = match init_setup(policy, rootless, mountpoint, fds.image_tree) {
        Ok(root) => root,
        Err(e) => {
            report_error(st_w, e);
            sys::exit_now(125);
        }
    };
    // Empty the bounding set now (while the parent may still be making the cgroup): the
    // workload inherits it, so nothing it ever executes can gain a capability.
    if let Err(e) = moat_sys::caps::drop_bounding_and_ambient() {
        report_error(st_w, format_args!("drop the capability bounding set: {e}"));
        sys::exit_now(125);
    }
    // Die with moat. Set again here: becoming root of the user namespace (set_ids) changed our
    // euid, and the kernel clears the parent-death signal on every such change. If moat died
    // before this point, the read below sees EOF and we exit.
    if !agent {
        if let Err(e) = sys::set_parent_death_signal(libc::SIGKILL) {
            report_error(st_w, format_args!("parent-death signal: {e}"));
            sys::exit_now(125);
        }
    }
    // Wait for the sandbox's cgroup; join it (v1: by writing ourselves in, while the host's
    // cgroupfs is still reachable), take a cgroup namespace rooted there (so /proc/self/cgroup
    // shows "/"), then switch to the sandbox's root.
    trace.mark("init", "root-built");
    let msg = read_until_nul(fds.sync_r.as_raw_fd());
    drop(fds.sync_r);
    let Some(InitSync::Cgroup { join }) = InitSync::parse_cgroup(&msg) else {
        sys::exit_now(125)
    };
    for path in &join {
        if let Err(e) = fs::write(path, "0") {
            report_error(
                st_w,
                format_args!("join the sandbox's cgroup ({path}): {e}"),
            );
            sys::exit_now(125);
        }
    }
    if let Err(e) = sys::unshare(libc::CLONE_NEWCGROUP) {
        report_error(st_w, format_args!("cgroup namespace: {e}"));
        sys::exit_now(125);
    }
    trace.mark("init", "cgroup-joined");
    if let Some(cpus) = &cpus {
        let _ = sys::set_affinity(0, cpus);
    }
    if let Err(e) = rootfs::enter(&root) {
        report_error(st_w, e);
        sys::exit_now(125);
    }
    trace.mark("init", "root-entered");
    if let Err(e) = sys::block_signals(&INIT_SIGNALS) {
        report_error(st_w, format_args!("block signals: {e}"));
        sys::exit_now(125);
    }
    let sigfd = match sys::signalfd(&INIT_SIGNALS) {
        Ok(f) => f,
        Err(e) => {
            report_error(st_w, format_args!("signalfd: {e}"));
            sys::exit_now(125);
        }
    };
    let (argv, stdin, stdout, stderr) = match job {
        InitJob::Run {
            argv,
            stdin,
            stdout,
            stderr,
        } => (argv, stdin, stdout, stderr),
        InitJob::Agent { listener } => {
            let env = ExecEnv {
                policy,
                landlock_abi,
                prog,
                ruleset: None,
                seccomp_inherited: false,
            };
            let ruleset = match env.drop_to_sandbox_user(!rootless) {
                Ok(r) => r,
                Err(e) => {
                    report_error(st_w, format_args!("become the sandbox's user: {e}"));
                    sys::exit_now(125);
                }
            };
            // What the agent's processes start from: its own seccomp filter (inherited over
            // fork and exec) and its Landlock ruleset, kept to be enforced again by each.
            let env = ExecEnv {
                ruleset: ruleset.as_ref(),
                seccomp_inherited: true,
                ..env
            };
            trace.mark("init", "agent-ready");
            if trace.on {
                stdio_to_null();
            }
            report(st_w, &InitReport::Ready { seccomp: None });
            drop(fds.st_w);
            moat_agent::serve::serve(listener, sigfd, env)
        }
    };
    let (xe_r, xe_w) = match sys::pipe() {
        Ok(p) => p,
        Err(e) => {
            report_error(st_w, format_args!("pipe: {e}"));
            sys::exit_now(125);
        }
    };
    let no_env = BTreeMap::new();
    let workload = match sys::fork() {
        Ok(0) => {
            let w = Workload {
                env: ExecEnv {
                    policy,
                    landlock_abi,
                    prog,
                    ruleset: None,
                    seccomp_inherited: false,
                },
                argv,
                extra_env: &no_env,
                cwd: None,
                set_groups: !rootless,
                stdin: stdin.as_raw_fd(),
                stdout: stdout.as_raw_fd(),
                stderr: stderr.as_raw_fd(),
                ctty: false,
                xe_w: xe_w.as_raw_fd(),
            };
            w.exec()
        }
        Ok(pid) => pid,
        Err(e) => {
            report_error(st_w, format_args!("fork the workload: {e}"));
            sys::exit_now(125);
        }
    };
    drop((stdin, stdout, stderr, xe_w));
    trace.mark("init", "workload-forked");
    let exec_error = read_to_end(xe_r.as_raw_fd());
    trace.mark("init", "workload-execed");
    drop(xe_r);

    // init keeps nothing it does not need: not dumpable (set earlier), no new privileges, the
    // same seccomp filter as the workload, and one capability: CAP_KILL (in the sandbox's user
    // namespace only), so it can relay Ctrl-C and friends to a workload under another uid.
    let _ = moat_sys::caps::keep_only(1 << moat_sys::caps::CAP_KILL);
    let _ = sys::set_no_new_privs();
    let _ = moat_sys::seccomp::install(prog);

    let mut status = None;
    while status.is_none() {
        let _ = sys::poll(&[(sigfd.as_raw_fd(), libc::POLLIN)], -1);
        while let Ok(Some(sig)) = sys::read_signalfd(sigfd.as_raw_fd()) {
            if sig == libc::SIGCHLD {
                while let Ok(Some(info)) = sys::wait4(-1, libc::WNOHANG | libc::__WALL) {
                    if info.pid == workload {
                        status = Some(info);
                    }
                }
            } else {
                let _ = sys::kill(-workload, sig);
                let _ = sys::kill(workload, sig);
            }
        }
    }
    trace.mark("init", "workload-reaped");
    let Some(s) = status else { sys::exit_now(125) };
    if !exec_error.is_empty() {
        let text = String::from_utf8_lossy(&exec_error).into_owned();
        let (code, msg) = text.split_once('\t').unwrap_or(("125", text.as_str()));
        report(
            st_w,
            &InitReport::ExecFail {
                code: code.parse().unwrap_or(125),
                message: msg.to_string(),
            },
        );
    } else {
        report(
            st_w,
            &InitReport::Exit {
                code: s.code,
                signal: s.signal,
                utime_us: s.utime_us,
                stime_us: s.stime_us,
                maxrss_kb: s.maxrss_kb,
            },
        );
    }
    sys::exit_now(0)
}

/// Points fds 0-2 at `/dev/null` (a persistent sandbox's init keeps none of its starter's).
fn stdio_to_null() {
    if let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            let _ = sys::dup2(null.as_raw_fd(), fd);
        }
    }
}

/// Reads up to a NUL byte (not included) or EOF; EOF before the NUL gives an empty vector.
/// Reads in blocks: the host writes nothing after the NUL (it closes its end), so nothing
/// is read past it (one read per block, not one per byte: the message names ~5 files).
fn read_until_nul(fd: RawFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = [0u8; 1024];
    loop {
        match sys::read(fd, &mut b) {
            Ok(n) if n > 0 => {
                if let Some(end) = b[..n].iter().position(|&c| c == 0) {
                    out.extend_from_slice(&b[..end]);
                    return out;
                }
                if out.len() + n > 64 << 10 {
                    return Vec::new();
                }
                out.extend_from_slice(&b[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => return Vec::new(),
        }
    }
}

fn init_setup(
    policy: &Policy,
    rootless: bool,
    mountpoint: &str,
    image_tree: Option<RawFd>,
) -> io::Result<String> {
    let ctx =
        |what: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    if !rootless {
        sys::set_ids(0, 0, true).map_err(ctx("become root of the sandbox's user namespace"))?;
    }
    sys::set_hostname(&policy.process.hostname).map_err(ctx("set hostname"))?;
    moat_sys::net::loopback_up().map_err(ctx("bring up loopback"))?;
    let root = rootfs::build(
        policy,
        &rootfs::Ids {
            uid: policy.process.uid,
            gid: policy.process.gid,
        },
        mountpoint,
        image_tree,
    )?;
    moat_sys::fs::umask(0o022);
    Ok(root)
}

/// What the parent learnt while the sandbox ran.
#[derive(Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status_line: Option<String>,
    init_exit: Option<sys::ExitInfo>,
    timed_out: bool,
    output_limit: bool,
    truncated: Truncated,
    killed_by: Option<i32>,
    relay_error: Option<String>,
}

impl Outcome {
    fn into_result(
        self,
        req: &RunRequest,
        oom: bool,
        started: Instant,
        layers: Layers,
    ) -> ExecResult {
        let mut r = ExecResult {
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
            exit_code: None,
            signal: None,
            status: Status::Ok,
            wall_ms: started.elapsed().as_millis() as u64,
            cpu_ms: 0,
            max_rss_kb: 0,
            truncated: self.truncated,
            message: None,
            sandbox: layers,
        };
        let report = InitReport::parse(&self.status_line.unwrap_or_default());
        let exited = matches!(report, Some(InitReport::Exit { .. }));
        let reported = report.is_some();
        match report {
            Some(InitReport::Exit {
                code,
                signal,
                utime_us,
                stime_us,
                maxrss_kb,
            }) => {
                r.exit_code = code;
                r.signal = signal;
                r.cpu_ms = (utime_us + stime_us) / 1000;
                r.max_rss_kb = maxrss_kb;
            }
            Some(InitReport::ExecFail { code, message }) => {
                r.exit_code = Some(code);
                r.status = Status::Error;
                r.message = Some(message);
            }
            Some(InitReport::Error(why)) => {
                r.status = Status::Error;
                r.message = Some(format!("sandbox setup failed: {why}"));
            }
            _ => {
                // init died without a report: killed by us, by the OOM killer, or crashed.
                r.signal = self.init_exit.and_then(|i| i.signal);
                r.exit_code = self
                    .init_exit
                    .and_then(|i| i.code)
                    .filter(|_| r.signal.is_none());
                if r.signal.is_none() && r.exit_code.is_none() {
                    r.signal = Some(libc::SIGKILL);
                }
            }
        }
        let limits = &req.policy.limits;
        let o = classify(
            &Ending {
                exit_code: r.exit_code,
                signal: r.signal,
                timed_out_ms: self.timed_out.then_some(limits.timeout.as_millis() as u64),
                output_over: self.output_limit.then_some(limits.output),
                egress_killed: false,
                oom_with_limit: oom.then_some(limits.memory),
                runner_lost: !exited,
                moat_signal: self.killed_by,
                cancelled: false,
            },
            OutcomeScope::Sandbox,
        );
        if o.status != Status::Ok {
            r.status = o.status;
            r.exit_code = o.exit_code;
            r.signal = o.signal;
            r.message = o.message;
        } else if r.status == Status::Ok && !reported {
            r.status = Status::Error;
            r.message = Some(
                self.relay_error
                    .unwrap_or_else(|| "the sandbox's init died without reporting".into()),
            );
        }
        r
    }
}

/// Parent side: moves bytes between this process and the sandbox and enforces the caps.
struct Relay<'a> {
    req: &'a RunRequest,
    in_w: Option<OwnedFd>,
    out_r: Option<OwnedFd>,
    err_r: Option<OwnedFd>,
    st_r: Option<OwnedFd>,
    stdin_open: bool,
    pending: Vec<u8>,
    out: Outcome,
    status_buf: Vec<u8>,
    counts: [u64; 2],
}

impl<'a> Relay<'a> {
    fn new(
        req: &'a RunRequest,
        in_w: OwnedFd,
        out_r: OwnedFd,
        err_r: OwnedFd,
        st_r: OwnedFd,
    ) -> Self {
        let _ = sys::set_nonblocking(in_w.as_raw_fd(), true);
        let stdin_open = req.stdin && fd_valid(0);
        Relay {
            req,
            in_w: if stdin_open { Some(in_w) } else { None },
            out_r: Some(out_r),
            err_r: Some(err_r),
            st_r: Some(st_r),
            stdin_open,
            pending: Vec::new(),
            out: Outcome::default(),
            status_buf: Vec::new(),
            counts: [0, 0],
        }
    }

    fn run(
        &mut self,
        pid: libc::pid_t,
        pidfd: &OwnedFd,
        sigfd: &OwnedFd,
        started: Instant,
    ) -> Outcome {
        let deadline = started + self.req.policy.limits.timeout;
        let mut init_done = false;
        let mut buf = vec![0u8; 64 << 10];
        let kill = |pidfd: &OwnedFd| {
            let _ = sys::pidfd_kill(pidfd.as_raw_fd(), libc::SIGKILL);
        };
        loop {
            if init_done && self.out_r.is_none() && self.err_r.is_none() && self.st_r.is_none() {
                break;
            }
            let now = Instant::now();
            if !init_done && now >= deadline && !self.out.timed_out {
                self.out.timed_out = true;
                kill(pidfd);
            }
            let timeout_ms = if init_done || self.out.timed_out {
                1000
            } else {
                (deadline - now).as_millis().min(i32::MAX as u128) as i32 + 1
            };
            // Order of entries: pidfd, sigfd, out, err, status, stdin, in_w.
            let mut fds: Vec<(RawFd, i16)> = Vec::with_capacity(7);
            fds.push((if init_done { -1 } else { pidfd.as_raw_fd() }, libc::POLLIN));
            fds.push((sigfd.as_raw_fd(), libc::POLLIN));
            fds.push((
                self.out_r.as_ref().map_or(-1, |f| f.as_raw_fd()),
                libc::POLLIN,
            ));
            fds.push((
                self.err_r.as_ref().map_or(-1, |f| f.as_raw_fd()),
                libc::POLLIN,
            ));
            fds.push((
                self.st_r.as_ref().map_or(-1, |f| f.as_raw_fd()),
                libc::POLLIN,
            ));
            let want_stdin = self.stdin_open && self.pending.is_empty() && self.in_w.is_some();
            fds.push((if want_stdin { 0 } else { -1 }, libc::POLLIN));
            let want_write = !self.pending.is_empty() && self.in_w.is_some();
            fds.push((
                if want_write {
                    self.in_w.as_ref().map_or(-1, |f| f.as_raw_fd())
                } else {
                    -1
                },
                libc::POLLOUT,
            ));
            let rev = match sys::poll(&fds, timeout_ms) {
                Ok(r) => r,
                Err(e) => {
                    self.out.relay_error = Some(format!("poll: {e}"));
                    kill(pidfd);
                    let _ = sys::wait4(pid, libc::__WALL);
                    break;
                }
            };
            let ready = |i: usize| rev[i] & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
            if ready(1) {
                while let Ok(Some(sig)) = sys::read_signalfd(sigfd.as_raw_fd()) {
                    if self.out.killed_by.is_some() || init_done {
                        kill(pidfd);
                    } else {
                        // First signal: pass it on (init relays it to the workload).
                        let _ = sys::pidfd_kill(pidfd.as_raw_fd(), sig);
                    }
                    self.out.killed_by.get_or_insert(sig);
                }
            }
            for (i, which) in [(2usize, 0usize), (3, 1)] {
                if ready(i) && self.drain(which, &mut buf) {
                    self.out.output_limit = true;
                    kill(pidfd);
                }
            }
            if ready(4) {
                self.read_status(&mut buf);
            }
            if ready(5) {
                self.read_stdin(&mut buf);
            }
            if rev[6] & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 {
                self.write_stdin();
            }
            if !init_done && ready(0) {
                if let Ok(Some(info)) = sys::wait4(pid, libc::WNOHANG | libc::__WALL) {
                    self.out.init_exit = Some(info);
                    init_done = true;
                    self.in_w = None;
                }
            }
        }
        std::mem::take(&mut self.out)
    }

    /// Reads what is available from stdout (0) or stderr (1). Returns true when the cap is hit.
    fn drain(&mut self, which: usize, buf: &mut [u8]) -> bool {
        let fd = match which {
            0 => self.out_r.as_ref(),
            _ => self.err_r.as_ref(),
        };
        let Some(fd) = fd.map(|f| f.as_raw_fd()) else {
            return false;
        };
        match sys::read(fd, buf) {
            Ok(0) | Err(_) => {
                if which == 0 {
                    self.out_r = None;
                } else {
                    self.err_r = None;
                }
                false
            }
            Ok(n) => {
                let cap = self.req.policy.limits.output;
                let used = self.counts[which];
                let room = cap.saturating_sub(used) as usize;
                let take = n.min(room);
                self.counts[which] += n as u64;
                let chunk = &buf[..take];
                if self.req.stream {
                    let _ = sys::write_all(if which == 0 { 1 } else { 2 }, chunk);
                } else if which == 0 {
                    self.out.stdout.extend_from_slice(chunk);
                } else {
                    self.out.stderr.extend_from_slice(chunk);
                }
                if n > room {
                    if which == 0 {
                        self.out.truncated.stdout = true;
                    } else {
                        self.out.truncated.stderr = true;
                    }
                    return true;
                }
                false
            }
        }
    }

    fn read_status(&mut self, buf: &mut [u8]) {
        let Some(fd) = self.st_r.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        match sys::read(fd, buf) {
            Ok(0) | Err(_) => {
                self.st_r = None;
            }
            Ok(n) => {
                if self.status_buf.len() < 8192 {
                    self.status_buf.extend_from_slice(&buf[..n]);
                }
                if let Some(pos) = self.status_buf.iter().position(|&b| b == b'\n') {
                    if self.out.status_line.is_none() {
                        self.out.status_line =
                            Some(String::from_utf8_lossy(&self.status_buf[..pos]).into_owned());
                    }
                }
            }
        }
    }

    fn read_stdin(&mut self, buf: &mut [u8]) {
        match sys::read(0, &mut buf[..16 << 10]) {
            Ok(0) | Err(_) => {
                self.stdin_open = false;
                if self.pending.is_empty() {
                    self.in_w = None;
                }
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.write_stdin();
            }
        }
    }

    fn write_stdin(&mut self) {
        let Some(fd) = self.in_w.as_ref().map(|f| f.as_raw_fd()) else {
            self.pending.clear();
            return;
        };
        match sys::write(fd, &self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                // The workload closed its stdin: drop what is left.
                self.pending.clear();
                self.in_w = None;
                self.stdin_open = false;
            }
        }
        if self.pending.is_empty() && !self.stdin_open {
            self.in_w = None;
        }
    }
}

fn fd_valid(fd: RawFd) -> bool {
    sys::fd_is_open(fd)
}
