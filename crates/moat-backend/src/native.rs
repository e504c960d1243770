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

use crate::cgroup::{self, Cgroup};
use crate::idmap::IdMap;
use crate::probe;
use crate::rootfs;
use moat_api::{ExecResult, Layers, Status, Truncated};
use moat_policy::{Layer, Policy};
use moat_sys::landlock as ll;
use moat_sys::process::{self as sys, Forked};
use moat_sys::seccomp::SockFilter;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
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
/// Signals init handles.
const INIT_SIGNALS: [libc::c_int; 8] = [
    libc::SIGCHLD,
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

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

/// Creates the sandbox's cgroup (or decides to go without, when the policy allows it).
fn make_cgroup(
    policy: &Policy,
    name: &str,
    missing: &mut Vec<String>,
) -> Result<Option<Cgroup>, RunError> {
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
                "cgroup limits are not available here ({}): run as root, or on a cgroup v2 host \
                 with delegation (e.g. `systemd-run --user --scope -p Delegate=yes moat run ...`), \
                 or set security.allow_missing = [\"cgroups\"] to run without memory/pids/cpu \
                 limits",
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
    cgroup::sweep_stale(&host, stale_cgroup);
    let l = &policy.limits;
    Cgroup::create(
        &host,
        name,
        cgroup::Limits {
            memory: l.memory,
            pids: l.pids,
            cpus: l.cpus,
        },
    )
    .map(Some)
    .map_err(|e| {
        RunError::Setup(format!(
            "{e} (set security.allow_missing = [\"cgroups\"] to run without limits)"
        ))
    })
}

/// Runs one command in a fresh native sandbox and tears it down.
///
/// Must be called from a single-threaded process (the sandbox is forked from it).
///
/// The parent's slow work (the cgroup, whose v1 attach can wait for an RCU grace period)
/// overlaps with the child building its root: the child is released twice, once when its id
/// maps are written ("G": it can build), once its cgroup exists ("C" and the cgroup v1 `tasks`
/// files it then writes itself into, which is much faster than the parent moving it).
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
    let mut plan = plan(&req.policy)?;
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

    let (sync_r, sync_w) = sys::pipe().map_err(io_ctx("pipe"))?;
    let (st_r, st_w) = sys::pipe().map_err(io_ctx("pipe"))?;
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

    let flags = NAMESPACES;
    let cpus = sys::affinity(0).ok();
    trace.mark("host", "clone");
    let (pid, pidfd) = match sys::clone_fork(flags) {
        Err(e) => {
            let _ = sys::set_signal_mask(&old_mask);
            return Err(RunError::Refused(format!(
                "cannot create the sandbox's namespaces ({e}): check `moat doctor` (user \
                 namespaces may be disabled by sysctl kernel.unprivileged_userns_clone=0, \
                 user.max_user_namespaces=0 or an AppArmor restriction)"
            )));
        }
        Ok(Forked::Child) => {
            drop((sync_w, st_r, in_w, out_r, err_r, sigfd));
            let fds = ChildFds {
                sync_r,
                st_w,
                in_r,
                out_w,
                err_w,
            };
            let policy = &req.policy;
            let argv = &req.argv;
            let landlock_abi = plan.landlock_abi;
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                init_main(
                    policy,
                    argv,
                    rootless,
                    landlock_abi,
                    prog,
                    &mountpoint,
                    fds,
                    trace,
                    cpus,
                )
            }));
            sys::exit_now(125);
        }
        Ok(Forked::Parent { pid, pidfd }) => (pid, pidfd),
    };
    drop((sync_r, st_w, in_r, out_w, err_w));
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
        let (uid_map, gid_map) = ids.maps(req.policy.process.uid, req.policy.process.gid);
        if rootless {
            fs::write(format!("/proc/{pid}/setgroups"), "deny")
                .map_err(io_ctx("write setgroups"))?;
        }
        fs::write(format!("/proc/{pid}/uid_map"), uid_map).map_err(io_ctx("write uid_map"))?;
        fs::write(format!("/proc/{pid}/gid_map"), gid_map).map_err(io_ctx("write gid_map"))?;
        sys::write_all(sync_w.as_raw_fd(), b"G").map_err(io_ctx("start the sandbox"))?;
        trace.mark("host", "released");
        cg = make_cgroup(&req.policy, &name, &mut plan.missing)?;
        // "C", then the cgroup files init writes "0" to itself (v1), then a NUL.
        let mut msg = b"C".to_vec();
        if let Some(cg) = &cg {
            let (uid, gid) = ids.host_root();
            let files = cg
                .delegate_self_join(uid, gid)
                .map_err(|e| RunError::Setup(e.to_string()))?;
            match files {
                Some(files) => {
                    let joined: Vec<String> =
                        files.iter().map(|f| f.display().to_string()).collect();
                    msg.extend_from_slice(joined.join("\n").as_bytes());
                }
                None => cg.add(pid).map_err(|e| RunError::Setup(e.to_string()))?,
            }
        }
        trace.mark("host", "cgroup-ready");
        msg.push(0);
        sys::write_all(sync_w.as_raw_fd(), &msg).map_err(io_ctx("start the sandbox"))?;
        Ok(())
    })();
    drop(sync_w);
    if let Err(e) = setup {
        let _ = sys::pidfd_kill(pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = sys::wait4(pid, libc::__WALL);
        let _ = sys::set_signal_mask(&old_mask);
        if let Some(cg) = cg.as_mut() {
            cg.destroy();
        }
        return Err(e);
    }

    let mut relay = Relay::new(req, in_w, out_r, err_r, st_r);
    let outcome = relay.run(pid, &pidfd, &sigfd, started);
    let _ = sys::set_signal_mask(&old_mask);

    trace.mark("host", "sandbox-exited");
    let oom = cg.as_ref().is_some_and(|c| c.oom_kills() > 0);
    let cgroup_version = cg
        .as_ref()
        .map_or_else(|| "none".to_string(), |c| c.version.as_str().to_string());
    if let Some(cg) = cg.as_mut() {
        cg.destroy();
    }
    trace.mark("host", "cleaned-up");
    drop(ids);

    Ok(outcome.into_result(
        req,
        oom,
        started,
        Layers {
            tier: "native".into(),
            landlock_abi: plan.landlock_abi,
            seccomp: true,
            cgroup: cgroup_version,
            missing: plan.missing,
        },
    ))
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

struct ChildFds {
    sync_r: OwnedFd,
    st_w: OwnedFd,
    in_r: OwnedFd,
    out_w: OwnedFd,
    err_w: OwnedFd,
}

fn report(st_w: RawFd, line: &str) {
    let mut l = line.replace('\n', " ");
    l.push('\n');
    let _ = sys::write_all(st_w, l.as_bytes());
}

/// PID 1 of the sandbox. Never returns.
#[allow(clippy::too_many_arguments)]
fn init_main(
    policy: &Policy,
    argv: &[String],
    rootless: bool,
    landlock_abi: u32,
    prog: &[SockFilter],
    mountpoint: &str,
    fds: ChildFds,
    trace: Trace,
    cpus: Option<libc::cpu_set_t>,
) -> ! {
    let _ = sys::set_parent_death_signal(libc::SIGKILL);
    let mut go = [0u8; 1];
    match sys::read(fds.sync_r.as_raw_fd(), &mut go) {
        Ok(1) if go[0] == b'G' => {}
        _ => sys::exit_now(125),
    }
    // From here on no same-uid process may ptrace init or open its /proc entries (/proc/1/exe
    // is moat's own binary on the host: runc CVE-2019-5736). Not earlier: while dumpable, the
    // parent (rootless: the same user) can still write our uid_map.
    let _ = sys::set_not_dumpable();
    // Our argv and environ are still moat's, which name host paths, mount sources and --env
    // values: /proc/1/cmdline is world-readable.
    let _ = sys::scrub_cmdline_and_environ("moat-init");
    trace.mark("init", "released");
    let st_w = fds.st_w.as_raw_fd();
    let root = match init_setup(policy, rootless, mountpoint) {
        Ok(root) => root,
        Err(e) => {
            report(st_w, &format!("error {e}"));
            sys::exit_now(125);
        }
    };
    // Empty the bounding set now (while the parent may still be making the cgroup): the
    // workload inherits it, so nothing it ever executes can gain a capability.
    if let Err(e) = moat_sys::caps::drop_bounding_and_ambient() {
        report(
            st_w,
            &format!("error drop the capability bounding set: {e}"),
        );
        sys::exit_now(125);
    }
    // Die with moat. Set again here: becoming root of the user namespace (set_ids) changed our
    // euid, and the kernel clears the parent-death signal on every such change. If moat died
    // before this point, the read below sees EOF and we exit.
    if let Err(e) = sys::set_parent_death_signal(libc::SIGKILL) {
        report(st_w, &format!("error parent-death signal: {e}"));
        sys::exit_now(125);
    }
    // Wait for the sandbox's cgroup; join it (v1: by writing ourselves in, while the host's
    // cgroupfs is still reachable), take a cgroup namespace rooted there (so /proc/self/cgroup
    // shows "/"), then switch to the sandbox's root.
    trace.mark("init", "root-built");
    let msg = read_until_nul(fds.sync_r.as_raw_fd());
    drop(fds.sync_r);
    let Some(files) = msg.strip_prefix(b"C") else {
        sys::exit_now(125)
    };
    for f in files.split(|&b| b == b'\n').filter(|f| !f.is_empty()) {
        let path = String::from_utf8_lossy(f);
        if let Err(e) = fs::write(&*path, "0") {
            report(
                st_w,
                &format!("error join the sandbox's cgroup ({path}): {e}"),
            );
            sys::exit_now(125);
        }
    }
    if let Err(e) = sys::unshare(libc::CLONE_NEWCGROUP) {
        report(st_w, &format!("error cgroup namespace: {e}"));
        sys::exit_now(125);
    }
    trace.mark("init", "cgroup-joined");
    if let Some(cpus) = &cpus {
        let _ = sys::set_affinity(0, cpus);
    }
    if let Err(e) = rootfs::enter(&root) {
        report(st_w, &format!("error {e}"));
        sys::exit_now(125);
    }
    if let Err(e) = sys::block_signals(&INIT_SIGNALS) {
        report(st_w, &format!("error block signals: {e}"));
        sys::exit_now(125);
    }
    let sigfd = match sys::signalfd(&INIT_SIGNALS) {
        Ok(f) => f,
        Err(e) => {
            report(st_w, &format!("error signalfd: {e}"));
            sys::exit_now(125);
        }
    };
    let (xe_r, xe_w) = match sys::pipe() {
        Ok(p) => p,
        Err(e) => {
            report(st_w, &format!("error pipe: {e}"));
            sys::exit_now(125);
        }
    };
    let workload = match sys::fork() {
        Ok(0) => {
            let w = Workload {
                policy,
                argv,
                set_groups: !rootless,
                landlock_abi,
                prog,
                stdin: fds.in_r.as_raw_fd(),
                stdout: fds.out_w.as_raw_fd(),
                stderr: fds.err_w.as_raw_fd(),
                xe_w: xe_w.as_raw_fd(),
            };
            w.exec()
        }
        Ok(pid) => pid,
        Err(e) => {
            report(st_w, &format!("error fork the workload: {e}"));
            sys::exit_now(125);
        }
    };
    drop((fds.in_r, fds.out_w, fds.err_w, xe_w));
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
        report(st_w, &format!("execfail {code} {msg}"));
    } else {
        report(
            st_w,
            &format!(
                "exit {} {} {} {} {}",
                s.code.unwrap_or(-1),
                s.signal.unwrap_or(-1),
                s.utime_us,
                s.stime_us,
                s.maxrss_kb
            ),
        );
    }
    sys::exit_now(0)
}

/// Reads up to a NUL byte (not included) or EOF; EOF before the NUL gives an empty vector.
fn read_until_nul(fd: RawFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match sys::read(fd, &mut b) {
            Ok(1) if b[0] == 0 => return out,
            Ok(1) if out.len() < 64 << 10 => out.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => return Vec::new(),
        }
    }
}

fn read_to_end(fd: RawFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sys::read(fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > 64 << 10 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    out
}

fn init_setup(policy: &Policy, rootless: bool, mountpoint: &str) -> io::Result<String> {
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
    )?;
    moat_sys::fs::umask(0o022);
    Ok(root)
}

/// The workload process, between fork and exec.
struct Workload<'a> {
    policy: &'a Policy,
    argv: &'a [String],
    set_groups: bool,
    landlock_abi: u32,
    prog: &'a [SockFilter],
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    xe_w: RawFd,
}

impl Workload<'_> {
    fn fail(&self, code: i32, msg: &str) -> ! {
        let _ = sys::write_all(self.xe_w, format!("{code}\t{msg}").as_bytes());
        sys::exit_now(code)
    }

    fn exec(&self) -> ! {
        match self.prepare() {
            Ok((path, argv, envp)) => {
                let e = sys::execve(&path, &argv, &envp);
                let code = if e.raw_os_error() == Some(libc::ENOENT) {
                    127
                } else {
                    126
                };
                self.fail(code, &format!("cannot execute {}: {e}", self.argv[0]))
            }
            Err((code, msg)) => self.fail(code, &msg),
        }
    }

    #[allow(clippy::type_complexity)]
    fn prepare(&self) -> Result<(CString, Vec<CString>, Vec<CString>), (i32, String)> {
        let e = |what: &str| {
            let what = what.to_string();
            move |err: io::Error| (125, format!("{what}: {err}"))
        };
        sys::set_signal_mask(&sys::empty_sigset()).map_err(e("signal mask"))?;
        sys::reset_signal_dispositions();
        sys::setsid().map_err(e("setsid"))?;
        sys::dup2(self.stdin, 0).map_err(e("stdin"))?;
        sys::dup2(self.stdout, 1).map_err(e("stdout"))?;
        sys::dup2(self.stderr, 2).map_err(e("stderr"))?;
        let p = self.policy;
        std::env::set_current_dir(&p.fs.workdir).map_err(e("chdir to the working directory"))?;
        let l = &p.limits;
        sys::set_rlimit(libc::RLIMIT_CORE, 0).map_err(e("rlimit core"))?;
        sys::set_rlimit(libc::RLIMIT_NOFILE, l.nofile).map_err(e("rlimit nofile"))?;
        sys::set_rlimit(libc::RLIMIT_FSIZE, l.fsize).map_err(e("rlimit fsize"))?;
        sys::set_rlimit(libc::RLIMIT_STACK, l.stack).map_err(e("rlimit stack"))?;
        // The bounding set is already empty (init emptied it before forking us).
        moat_sys::caps::clear_ambient().map_err(e("clear ambient capabilities"))?;
        sys::set_ids(p.process.uid, p.process.gid, self.set_groups).map_err(e("set uid/gid"))?;
        moat_sys::caps::clear_all().map_err(e("clear capabilities"))?;
        sys::set_no_new_privs().map_err(e("no_new_privs"))?;
        if self.landlock_abi > 0 {
            self.landlock().map_err(e("landlock"))?;
        }
        let env = self.env();
        let path = resolve(
            &self.argv[0],
            env.iter()
                .find_map(|(k, v)| (k == "PATH").then_some(v.as_str())),
        )?;
        let to_c =
            |s: &str| CString::new(s).map_err(|_| (125, format!("`{s}` contains a NUL byte")));
        let argv = self
            .argv
            .iter()
            .map(|a| to_c(a))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = env
            .iter()
            .map(|(k, v)| to_c(&format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        let path = to_c(&path)?;
        sys::close_fds_from(3, Some(self.xe_w as libc::c_uint))
            .map_err(e("close inherited fds"))?;
        moat_sys::seccomp::install(self.prog).map_err(e("install seccomp filter"))?;
        Ok((path, argv, envp))
    }

    fn env(&self) -> Vec<(String, String)> {
        let p = self.policy;
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), p.fs.workdir.clone()),
            ("USER".into(), "user".into()),
            ("LOGNAME".into(), "user".into()),
            ("HOSTNAME".into(), p.process.hostname.clone()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TMPDIR".into(), "/tmp".into()),
        ];
        for (k, v) in &p.env {
            if let Some(slot) = env.iter_mut().find(|(x, _)| x == k) {
                slot.1 = v.clone();
            } else {
                env.push((k.clone(), v.clone()));
            }
        }
        env
    }

    fn landlock(&self) -> io::Result<()> {
        let abi = self.landlock_abi;
        let all = ll::fs_rights_for_abi(abi);
        let scoped = if abi >= 6 {
            ll::SCOPE_SIGNAL | ll::SCOPE_ABSTRACT_UNIX_SOCKET
        } else {
            0
        };
        let mut rs = ll::Ruleset::new(all, scoped)?;
        let read = ll::ACCESS_FS_READ_FILE | ll::ACCESS_FS_READ_DIR | ll::ACCESS_FS_EXECUTE;
        rs.allow("/", read)?;
        rs.allow("/proc", read | ll::ACCESS_FS_WRITE_FILE)?;
        let dev =
            read | ll::ACCESS_FS_WRITE_FILE | ll::ACCESS_FS_IOCTL_DEV | ll::ACCESS_FS_TRUNCATE;
        // One rule for /dev: it is read-only, so write rights only reach the device nodes moat
        // bound there (null, zero, full, random, urandom, tty) and the private devpts.
        rs.allow("/dev", dev)?;
        rs.allow("/dev/shm", all)?;
        rs.allow("/tmp", all)?;
        rs.allow(&self.policy.fs.workdir, all)?;
        for m in &self.policy.fs.mounts {
            rs.allow(&m.dst, if m.rw { all } else { read })?;
        }
        rs.restrict_self()
    }
}

/// Finds the program the way execvp would, in the sandbox's own view of the filesystem.
fn resolve(cmd: &str, path: Option<&str>) -> Result<String, (i32, String)> {
    use std::os::unix::fs::PermissionsExt;
    if cmd.is_empty() {
        return Err((127, "empty command".into()));
    }
    if cmd.contains('/') {
        return Ok(cmd.to_string());
    }
    let mut found_not_exec = None;
    for dir in path
        .unwrap_or("/usr/bin:/bin")
        .split(':')
        .filter(|d| !d.is_empty())
    {
        let cand = format!("{dir}/{cmd}");
        if let Ok(m) = fs::metadata(&cand) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
            found_not_exec.get_or_insert(cand);
        }
    }
    match found_not_exec {
        Some(c) => Err((126, format!("{c} is not executable"))),
        None => Err((127, format!("command not found in the sandbox: {cmd}"))),
    }
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
        let line = self.status_line.unwrap_or_default();
        let mut words = line.splitn(2, ' ');
        let kind = words.next().unwrap_or("");
        let rest = words.next().unwrap_or("");
        match kind {
            "exit" => {
                let n: Vec<i64> = rest.split(' ').filter_map(|w| w.parse().ok()).collect();
                if n.len() == 5 {
                    r.exit_code = (n[0] >= 0).then_some(n[0] as i32);
                    r.signal = (n[1] >= 0).then_some(n[1] as i32);
                    r.cpu_ms = (n[2] as u64 + n[3] as u64) / 1000;
                    r.max_rss_kb = n[4] as u64;
                }
            }
            "execfail" => {
                let (code, msg) = rest.split_once(' ').unwrap_or((rest, ""));
                r.exit_code = code.parse().ok();
                r.status = Status::Error;
                r.message = Some(msg.to_string());
            }
            "error" => {
                r.status = Status::Error;
                r.message = Some(format!("sandbox setup failed: {rest}"));
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
        if self.timed_out {
            r.status = Status::Timeout;
            r.message = Some(format!(
                "the command ran past its {} ms timeout; the sandbox was killed",
                req.policy.limits.timeout.as_millis()
            ));
        } else if self.output_limit {
            r.status = Status::OutputLimit;
            r.message = Some(format!(
                "output went over the {} byte cap; the sandbox was killed",
                req.policy.limits.output
            ));
        } else if oom && (r.signal == Some(libc::SIGKILL) || kind != "exit") {
            r.status = Status::Oom;
            r.exit_code = None;
            r.signal = Some(libc::SIGKILL);
            r.message = Some(format!(
                "the sandbox ran out of its {} MiB memory limit and the kernel killed the command",
                req.policy.limits.memory >> 20
            ));
        } else if let Some(sig) = self.killed_by {
            r.status = Status::Killed;
            r.message = Some(format!("moat got signal {sig} and stopped the sandbox"));
        } else if r.status == Status::Ok && kind.is_empty() {
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
