//! The gvisor tier: the same sandbox behind gVisor's user-space kernel (`runsc`, Debian's
//! `runsc` package), with the same agent as PID 1 serving the same protocol.
//!
//! Start of one sandbox ([`spawn`]):
//!
//! ```text
//! moat (host, single-threaded) ── makes the cgroup (limits + gVisor's own headroom)
//!   │ writes <run>/gvisor/ID/{bundle/config.json, bundle/rootfs, bundle/etc, ctl/policy.json}
//!   │ forks; the child joins the cgroup and execs
//!   ▼ runsc --ignore-cgroups --network=none --host-uds=create run --detach
//!         runsc-gofer + runsc-sandbox (the sentry) + its stub processes, all in the cgroup
//!            └─ PID 1 inside: this binary, bind-mounted read-only at /.moat-agent
//!               `/.moat-agent __moat-gvisor-agent`: reads /.moat/policy.json, binds
//!               /.moat/agent.sock (a real host socket, made by the gofer; /.moat is
//!               root's, 0700), drops to the sandbox user, installs seccomp, reports "ready" on its stdout
//!               (a pipe to the host), then serves the agent protocol (crate::agent).
//! ```
//!
//! The socket path the caller asked for ([`SpawnRequest::socket`]) becomes a symlink to the
//! socket in the sandbox's control directory. Limits are moat's own cgroup (v1 or v2, the
//! same `cgroup_paths` as the native tier: pause, stats, OOM detection and removal work
//! unchanged); runsc is told to leave cgroups alone. The cgroup holds gVisor's own processes
//! and threads as well as the workload's memory, so its pids and memory limits are the
//! policy's plus gVisor's headroom ([`host_limits`]); the workload's own process limit is
//! enforced inside gVisor (`RLIMIT_NPROC`).
//!
//! What differs from the native tier (checked with Debian's runsc 20221219, ptrace):
//! - no Landlock (gVisor implements none; its kernel is the boundary, and the layers say so
//!   in `missing`); the same seccomp filter, installed inside gVisor (it filters calls into
//!   the user-space kernel, not the host's);
//! - gVisor does not shield PID 1 from signals of its own namespace, so the agent keeps a
//!   real and saved uid of its own ([`agent_real_uid`]) and acts on files with the sandbox
//!   user's effective uid: the workload cannot kill, stop or ptrace it, nor open its
//!   `/proc/1/mem`; `/proc/1/maps` and `/proc/1/environ` (runsc's `PATH` and `HOME=/root`
//!   only) stay readable;
//! - the workload's process limit is `RLIMIT_NPROC` inside gVisor; the cgroup bounds gVisor
//!   itself ([`host_limits`]);
//! - going over the memory limit is an OOM kill in the cgroup, which takes the whole sandbox
//!   (the sentry holds all of the workload's memory): the cgroup's OOM count says `oom`;
//!   `/proc/meminfo` inside shows the host's memory;
//! - `/dev` is gVisor's minimal one (plus the sandbox's `/dev/shm`); `/sys` is empty unless
//!   `fs.sys`;
//! - this runsc refuses `AT_NO_AUTOMOUNT` in `statx`/`fstatat` (EINVAL), so coreutils'
//!   `ls -l` and `stat` fail inside (Python, Rust and most runtimes are unaffected); a pty
//!   has no `tty` name and no `/dev/tty`, and a Ctrl-D does not end a reader's input: newer
//!   runsc releases fix these;
//! - `fs.root` is refused (the agent needs the host's `/usr` and `/lib` inside).

use crate::cgroup::{self, Cgroup};
use crate::native::{RunError, SpawnRequest, Spawned};
use crate::rootfs;
use moat_api::Layers;
use moat_policy::Policy;
use moat_proto::boot::{self, InitReport};
use moat_sys::process::{self as sys, Forked};
use oci_spec::runtime as oci;
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The hidden first argument that makes the moat binary (or `moat-spawner`) the gvisor
/// tier's agent: `moat __moat-gvisor-agent` runs [`moat_agent::gvisor::main`].
pub const AGENT_ARG: &str = boot::GVISOR_AGENT_ARG;
use boot::{
    GVISOR_AGENT_PATH as AGENT_IN, GVISOR_CONFIG_FILE as POLICY_FILE, GVISOR_CONTROL_DIR as CTL_IN,
    GVISOR_SOCKET_FILE as SOCKET_FILE,
};

/// How many host tasks (threads and processes) the cgroup allows per task of the workload.
/// gVisor's ptrace platform runs each workload address space as a stub process with a stub
/// thread per sentry thread that ever entered it, and the sentry and gofer themselves run
/// about 50 threads when idle: measured here (2 CPUs, ptrace), an idle sandbox holds 52 host
/// tasks, one with 20 sleeping processes 582, one with 64 (its `RLIMIT_NPROC`) 1207: about
/// 19 host tasks per workload process. The workload's own limit is enforced
/// inside gVisor (`RLIMIT_NPROC` = `limits.pids` for the sandbox user, which gVisor
/// applies), so a fork bomb gets `EAGAIN` there; the cgroup's pids limit only keeps gVisor
/// itself bounded: `(limits.pids + PIDS_HEADROOM) * PIDS_PER_TASK`.
pub const PIDS_PER_TASK: u64 = 24;
/// Workload tasks' worth of room in the cgroup for gVisor's own threads (see
/// [`PIDS_PER_TASK`]).
pub const PIDS_HEADROOM: u64 = 64;
/// Memory gVisor itself uses in a sandbox's cgroup on top of the workload's: the sentry's and
/// gofer's heaps, page tables and stubs (an idle sandbox peaks at about 28 MiB here). The
/// cgroup's memory limit is `limits.memory` plus this.
pub const MEMORY_HEADROOM: u64 = 64 << 20;

/// How long [`spawn`] waits for the agent to report.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one runsc command of the teardown may take.
const RUNSC_CMD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a platform probe (`runsc do true`) may take before it counts as not working.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What [`destroy`] and a re-attaching daemon need of a gvisor sandbox, stored in
/// [`Spawned::gvisor`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GvisorState {
    /// The runsc container id.
    pub id: String,
    /// The sandbox's own directory: `bundle/` (config.json, rootfs, etc), `state/` (runsc's
    /// `--root`), `ctl/` (policy.json and the agent's socket), `runsc.log`.
    pub dir: PathBuf,
    /// The runsc binary it was started with.
    pub runsc: PathBuf,
    /// The symlink made at [`SpawnRequest::socket`] (removed by [`destroy`]).
    pub socket: PathBuf,
}

impl GvisorState {
    fn state_root(&self) -> PathBuf {
        self.dir.join("state")
    }
}

/// Where the gvisor tier keeps its sandboxes' directories: `<moat's run dir>/gvisor`.
pub fn base_dir() -> PathBuf {
    rootfs::run_dir(false).join("gvisor")
}

/// The runsc binary: `$MOAT_RUNSC` when set, else the first `runsc` in `PATH`, `/usr/bin`,
/// `/usr/sbin` or `/usr/local/bin`.
pub fn find_runsc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOAT_RUNSC") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|d| d.starts_with('/'))
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"])
        .map(|d| Path::new(d).join("runsc"))
        .find(|p| p.is_file());
    found
}

/// The gVisor platform sandboxes use: `$MOAT_GVISOR_PLATFORM` (`ptrace`, `kvm`, `systrap`
/// where runsc has it), default `ptrace` (works wherever runsc does; `moat doctor` says
/// which others work here).
pub fn platform() -> String {
    match std::env::var("MOAT_GVISOR_PLATFORM") {
        Ok(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()) => p,
        _ => "ptrace".to_string(),
    }
}

/// Whether this host can start gvisor sandboxes at all (cheap: no runsc is run), with the
/// runsc binary. The error says what to install or do.
pub fn check_host() -> Result<PathBuf, String> {
    let Some(runsc) = find_runsc() else {
        return Err(
            "the gvisor tier needs gVisor's runsc, which is not installed: run \
                    `apt-get install runsc` (Debian/Ubuntu) or set MOAT_RUNSC to its path; or \
                    use tier native"
                .into(),
        );
    };
    if sys::effective_uid() != 0 {
        return Err(
            "the gvisor tier needs root here (runsc starts its sandbox and gofer as \
                    root): run moat as root, or use tier native"
                .into(),
        );
    }
    Ok(runsc)
}

/// The cgroup limits of a gvisor sandbox: the policy's plus gVisor's own headroom.
pub fn host_limits(policy: &Policy) -> cgroup::Limits {
    let l = &policy.limits;
    cgroup::Limits {
        memory: l.memory.saturating_add(MEMORY_HEADROOM),
        pids: l
            .pids
            .saturating_add(PIDS_HEADROOM)
            .saturating_mul(PIDS_PER_TASK),
        cpus: l.cpus,
    }
}

fn io_ctx(what: impl Into<String>) -> impl FnOnce(io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

fn mkdir(path: &Path, mode: u32) -> Result<(), RunError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_ctx(format!("create {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_ctx(format!("chmod {}", path.display())))
}

/// `MOAT_TRACE=1`: where a start's time goes (`moat-trace: gvisor PHASE MICROS`).
fn trace(started: Instant, phase: &str) {
    if std::env::var_os("MOAT_TRACE").is_some_and(|v| v == "1") {
        let line = format!(
            "moat-trace: gvisor {phase} {}\n",
            started.elapsed().as_micros()
        );
        let _ = sys::write_all(2, line.as_bytes());
    }
}

/// What is undone when a start fails.
struct Pending {
    state: GvisorState,
    cg: Option<Cgroup>,
    armed: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            let _ = teardown(&self.state, None);
            if let Some(cg) = self.cg.as_mut() {
                let _ = cg.kill_all();
                cg.destroy();
            }
            let _ = fs::remove_dir_all(&self.state.dir);
        }
    }
}

/// Starts a persistent gvisor sandbox whose agent listens on `req.socket` (a symlink to the
/// real socket in the sandbox's control directory); returns once the agent listens. The
/// socket's directory must exist; a stale socket or symlink there is replaced.
///
/// Must be called from a single-threaded process (see [`crate::spawner`] for daemons).
pub fn spawn(req: &SpawnRequest) -> Result<Spawned, RunError> {
    let started = Instant::now();
    let policy = &req.policy;
    policy
        .validate()
        .map_err(|e| RunError::Refused(e.to_string()))?;
    if policy.fs.root.is_some() {
        // The agent (moat's own binary) is started inside the sandbox, so it needs the
        // host's /usr and /lib there: a root of the policy's own would lack them.
        return Err(RunError::Refused(
            "the gvisor tier does not take fs.root yet (moat's agent runs inside the \
             sandbox and needs the host's /usr and /lib): leave fs.root unset, or use tier \
             native"
                .into(),
        ));
    }
    let runsc = check_host().map_err(RunError::Refused)?;
    if !sys::is_single_threaded() {
        return Err(RunError::Setup(
            "the gvisor tier must be started from a single-threaded process".into(),
        ));
    }
    let agent = agent_binary()?;
    check_socket_path(&req.socket)?;
    let base = base_dir();
    mkdir(&base, 0o700)?;
    sweep_stale(&base);
    let id = format!(
        "moat-g{:x}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() & 0xffff_ffff_ffff)
    );
    let dir = base.join(&id);
    fs::create_dir(&dir).map_err(io_ctx(format!("create {}", dir.display())))?;
    let mut pending = Pending {
        state: GvisorState {
            id: id.clone(),
            dir: dir.clone(),
            runsc: runsc.clone(),
            socket: req.socket.clone(),
        },
        cg: None,
        armed: true,
    };
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .map_err(io_ctx(format!("chmod {}", dir.display())))?;
    let ctl = dir.join("ctl");
    mkdir(&ctl, 0o700)?;
    mkdir(&dir.join("state"), 0o700)?;
    let policy_json = serde_json::to_vec(&boot::GvisorConfig {
        policy: serde_json::to_value(policy)
            .map_err(|e| RunError::Setup(format!("encode the policy: {e}")))?,
        ca_pem: policy.network.ca_pem.clone(),
    })
    .map_err(|e| RunError::Setup(format!("encode the policy: {e}")))?;
    write_private(&ctl.join(POLICY_FILE), &policy_json)?;
    let bundle = dir.join("bundle");
    mkdir(&bundle, 0o755)?;
    let spec = build_spec(policy, &bundle, &ctl, &agent)?;
    spec.save(bundle.join("config.json"))
        .map_err(|e| RunError::Setup(format!("write the OCI bundle: {e}")))?;

    trace(started, "bundle-written");
    let mut missing = vec![
        "landlock (not in the gvisor tier: gVisor has no Landlock; its user-space kernel is \
         the filesystem boundary)"
            .to_string(),
    ];
    pending.cg = make_cgroup(policy, &id, &mut missing)?;
    let cg_version = pending
        .cg
        .as_ref()
        .map_or_else(|| "none".to_string(), |c| c.version.as_str().to_string());

    trace(started, "cgroup-made");
    let log_path = dir.join("runsc.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(io_ctx(format!("create {}", log_path.display())))?;
    let (st_r, st_w) = sys::pipe().map_err(io_ctx("pipe"))?;
    // The files runsc's process writes itself into: on v1 the `tasks` files (a single
    // thread moving itself skips the wait for an RCU grace period that moving a whole
    // process costs, as the native tier's init does), on v2 `cgroup.procs`.
    let procs_files: Vec<String> = pending.cg.as_ref().map_or_else(Vec::new, |c| {
        let v1 = c.version == cgroup::Version::V1;
        c.paths()
            .iter()
            .map(|d| {
                d.join(if v1 { "tasks" } else { "cgroup.procs" })
                    .display()
                    .to_string()
            })
            .collect()
    });
    let plat = platform();
    let mut args: Vec<String> = vec![
        "runsc".into(),
        format!("--root={}", dir.join("state").display()),
        "--network=none".into(),
        "--ignore-cgroups".into(),
        "--host-uds=create".into(),
        format!("--platform={plat}"),
    ];
    args.extend([
        "run".into(),
        "--detach".into(),
        "--bundle".into(),
        bundle.display().to_string(),
        id.clone(),
    ]);
    let image = policy.fs.image.as_ref().map(|img| ImageMount {
        lower: img.rootfs.clone(),
        layer: dir.join("layer"),
        root: bundle.join("rootfs"),
        size: policy.limits.root_size,
    });
    if let Some(m) = &image {
        mkdir(&m.layer, 0o700)?;
    }
    let child = exec_runsc(
        &runsc,
        &args,
        st_w,
        log.as_raw_fd(),
        &procs_files,
        image.as_ref(),
    )?;
    drop(log);
    trace(started, "runsc-forked");
    let line = crate::native::read_line(st_r.as_raw_fd(), READY_TIMEOUT);
    trace(started, "agent-reported");
    // runsc run --detach exits once the container started; reap it if it is our child (a
    // spawner, which ignores SIGCHLD, has it reaped by the kernel).
    wait_exit(&child, Duration::from_secs(5));
    let line = line.map_err(io_ctx("wait for the gvisor sandbox's agent"))?;
    let seccomp = match InitReport::parse(&line) {
        Some(InitReport::Ready {
            seccomp: Some(Err(why)),
        }) => {
            missing.push(format!(
                "seccomp (gVisor refused the filter: {why}; gVisor's kernel is the boundary)"
            ));
            false
        }
        Some(InitReport::Ready { .. }) => true,
        other => {
            let why = if let Some(InitReport::Error(why)) = other {
                why
            } else if line.is_empty() {
                let log = read_tail(&log_path, 4096);
                if log.trim().is_empty() {
                    "the gvisor sandbox exited before its agent was ready".into()
                } else {
                    format!("runsc failed: {}", log.trim())
                }
            } else {
                format!("unexpected start report: {line}")
            };
            return Err(RunError::Setup(format!(
                "{why} (run `moat doctor` to check gVisor on this host)"
            )));
        }
    };
    let (pid, start_time) = find_sentry(&pending.state).ok_or_else(|| {
        RunError::Setup("the gvisor sandbox's process is gone right after it started".into())
    })?;
    link_socket(&ctl.join(SOCKET_FILE), &req.socket)?;
    let layers = Layers {
        tier: "gvisor".into(),
        landlock_abi: 0,
        seccomp,
        cgroup: cg_version,
        missing,
    };
    pending.armed = false;
    let cgroup_paths = pending
        .cg
        .take()
        .map(Cgroup::into_paths)
        .unwrap_or_default();
    trace(started, "spawned");
    Ok(Spawned {
        pid,
        start_time,
        cgroup_paths,
        layers,
        gvisor: Some(pending.state.clone()),
    })
}

/// How old a sandbox directory without a runsc process must be before a start removes it.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// Removes what crashed starts and sandboxes that died without [`destroy`] left in `base`:
/// sandbox directories older than [`STALE_AFTER`] that no runsc process names. At most every
/// 10 s per process (a spawner starts many sandboxes).
fn sweep_stale(base: &Path) {
    use std::sync::Mutex;
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    if let Ok(mut last) = LAST.lock() {
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return;
        }
        *last = Some(Instant::now());
    }
    let Ok(rd) = fs::read_dir(base) else {
        return;
    };
    let old: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("moat-g"))
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_AFTER)
        })
        .map(|e| e.path())
        .collect();
    if old.is_empty() {
        return;
    }
    let mut live = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
                for a in cmd.split(|&b| b == 0) {
                    if let Some(root) = a.strip_prefix(b"--root=") {
                        live.push(PathBuf::from(String::from_utf8_lossy(root).into_owned()));
                    }
                }
            }
        }
    }
    for dir in old {
        if !live.iter().any(|r| r.starts_with(&dir)) {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_ctx(format!("create {}", path.display())))?;
    f.write_all(bytes)
        .map_err(io_ctx(format!("write {}", path.display())))
}

/// The moat binary that runs (never a path the sandbox can write: it is bound read-only).
fn agent_binary() -> Result<PathBuf, RunError> {
    let p = fs::read_link("/proc/self/exe").map_err(io_ctx("find moat's own binary"))?;
    if !p.is_file() {
        return Err(RunError::Setup(format!(
            "moat's own binary {} is gone (replaced while running?): restart moat",
            p.display()
        )));
    }
    Ok(p)
}

/// The socket path must be free, a stale socket or a symlink (replaced), in a directory
/// that exists.
fn check_socket_path(path: &Path) -> Result<(), RunError> {
    use std::os::unix::fs::FileTypeExt;
    match path.parent() {
        Some(d) if d.is_dir() => {}
        _ => {
            return Err(RunError::Setup(format!(
                "listen on the agent socket {}: its directory does not exist",
                path.display()
            )))
        }
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() || m.file_type().is_symlink() => Ok(()),
        Ok(_) => Err(RunError::Setup(format!(
            "{} exists and is not a socket: remove it or choose another socket path",
            path.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_ctx(format!(
            "listen on the agent socket {}",
            path.display()
        ))(e)),
    }
}

fn link_socket(real: &Path, at: &Path) -> Result<(), RunError> {
    let what = || format!("link the agent socket at {}", at.display());
    match fs::remove_file(at) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_ctx(what())(e)),
    }
    std::os::unix::fs::symlink(real, at).map_err(io_ctx(what()))
}

fn make_cgroup(
    policy: &Policy,
    id: &str,
    missing: &mut Vec<String>,
) -> Result<Option<Cgroup>, RunError> {
    let fix = "the gvisor tier puts runsc in a cgroup of moat's; run as root on a host with the \
               memory, pids and cpu controllers, or set security.allow_missing = [\"cgroups\"]";
    match crate::native::cgroup_host(policy, missing, fix)? {
        Some(host) => crate::native::create_cgroup(&host, id, host_limits(policy)),
        None => Ok(None),
    }
}

/// Forks and executes runsc with stdin on /dev/null, stdout on `st_w`, stderr on `log`,
/// in the cgroup whose `cgroup.procs` files are `procs_files`, in a session of its own and
/// with default signal dispositions. Returns its pidfd.
/// A template's root for runsc: an overlay of the template's files (read-only, shared) and a
/// writable layer of the sandbox's own on a tmpfs of `size`, mounted at `root` in a mount
/// namespace of runsc's own (so its sandbox and gofer see it, the host never does, and it
/// goes away with them). runsc creates the spec's mount points in the root on the host side:
/// they land in the sandbox's layer, never in the shared template.
struct ImageMount {
    lower: String,
    layer: PathBuf,
    root: PathBuf,
    size: u64,
}

impl ImageMount {
    /// Runs in runsc's child before exec.
    fn mount(&self) -> io::Result<()> {
        use moat_sys::fs as m;
        let s = |p: &Path| p.display().to_string();
        sys::unshare(libc::CLONE_NEWNS)?;
        m::mount(None, "/", None, m::MS_REC | m::MS_SLAVE, None)?;
        m::mount(
            Some("tmpfs"),
            &s(&self.layer),
            Some("tmpfs"),
            m::MS_NOSUID | m::MS_NODEV,
            Some(&format!("mode=0700,size={}", self.size)),
        )?;
        let (upper, work) = (self.layer.join("upper"), self.layer.join("work"));
        fs::create_dir(&upper)?;
        fs::create_dir(&work)?;
        m::mount(
            Some("overlay"),
            &s(&self.root),
            Some("overlay"),
            m::MS_NOSUID | m::MS_NODEV,
            Some(&format!(
                "lowerdir={},upperdir={},workdir={}",
                self.lower,
                s(&upper),
                s(&work)
            )),
        )
    }
}

fn exec_runsc(
    runsc: &Path,
    args: &[String],
    st_w: OwnedFd,
    log: RawFd,
    procs_files: &[String],
    image: Option<&ImageMount>,
) -> Result<OwnedFd, RunError> {
    let to_c = |s: &str| {
        CString::new(s).map_err(|_| RunError::Setup(format!("`{s}` contains a NUL byte")))
    };
    let path = to_c(&runsc.display().to_string())?;
    let argv = args
        .iter()
        .map(|a| to_c(a))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = vec![to_c(
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    )?];
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(io_ctx("open /dev/null"))?;
    match sys::clone_fork(0) {
        Err(e) => Err(io_ctx("fork runsc")(e)),
        Ok(Forked::Child) => {
            let fail = |what: &str, e: io::Error| -> ! {
                let _ = sys::write_all(log, format!("moat: {what}: {e}\n").as_bytes());
                sys::exit_now(125)
            };
            for f in procs_files {
                if let Err(e) = fs::write(f, "0") {
                    fail(&format!("join the sandbox's cgroup ({f})"), e);
                }
            }
            if let Some(img) = image {
                if let Err(e) = img.mount() {
                    fail("mount the template's root", e);
                }
            }
            let _ = sys::setsid();
            sys::reset_signal_dispositions();
            if let Err(e) = sys::set_signal_mask(&sys::empty_sigset()) {
                fail("signal mask", e);
            }
            for (from, to) in [(null.as_raw_fd(), 0), (st_w.as_raw_fd(), 1), (log, 2)] {
                if let Err(e) = sys::dup2(from, to) {
                    fail("stdio", e);
                }
            }
            if let Err(e) = sys::close_fds_from(3, None) {
                fail("close fds", e);
            }
            let e = sys::execve(&path, &argv, &envp);
            fail(&format!("execute {}", runsc.display()), e)
        }
        Ok(Forked::Parent { pidfd, .. }) => Ok(pidfd),
    }
}

/// Waits (at most `timeout`) for the process of `pidfd` to exit, and reaps it if it is our
/// child.
fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let exited = matches!(sys::poll(&[(pidfd.as_raw_fd(), libc::POLLIN)], ms), Ok(r) if r[0] != 0);
    if exited {
        let _ = sys::reap_pidfd(pidfd.as_raw_fd());
    }
    exited
}

fn read_tail(path: &Path, max: usize) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Field 22 of `/proc/PID/stat`, unless the process is gone or a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first().is_some_and(|s| *s == "Z" || *s == "X") {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

/// The processes runsc started for this sandbox (runsc itself, its gofer and its sandbox),
/// each with its argv[0]: those whose command line has `--root=<this sandbox's state dir>`
/// (unique to it). The ptrace stubs are the sandbox's children and die with it.
fn runsc_procs(state: &GvisorState) -> Vec<(u32, String)> {
    let marker = format!("--root={}", state.state_root().display());
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let mut args = cmd.split(|&b| b == 0);
        let argv0 = String::from_utf8_lossy(args.next().unwrap_or_default()).into_owned();
        if cmd.split(|&b| b == 0).any(|a| a == marker.as_bytes()) {
            out.push((pid, argv0));
        }
    }
    out
}

/// The sentry's (`runsc-sandbox`) pid and start time.
fn find_sentry(state: &GvisorState) -> Option<(u32, u64)> {
    runsc_procs(state)
        .into_iter()
        .find(|(_, argv0)| argv0 == "runsc-sandbox")
        .and_then(|(pid, _)| Some((pid, start_time(pid)?)))
}

/// Runs one runsc command for this sandbox, waiting at most [`RUNSC_CMD_TIMEOUT`]; true when
/// it exited 0. Works in a multi-threaded process (the daemon).
fn runsc_cmd(state: &GvisorState, args: &[&str]) -> bool {
    let mut cmd = std::process::Command::new(&state.runsc);
    cmd.arg(format!("--root={}", state.state_root().display()))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let deadline = Instant::now() + RUNSC_CMD_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            // ECHILD: SIGCHLD is ignored here and the kernel reaped it.
            Err(_) => return true,
        }
    }
}

/// Stops everything of the sandbox: SIGKILL to each of its processes (the sentry first,
/// checked by its start time; its stubs die with it, so no `runsc kill`, which costs a
/// runsc start, tens of ms, for the same end), waits for the sentry to exit, and
/// removes runsc's state: by `runsc delete --force` while one of its processes is still
/// there, else directly (runsc's `--root` is the sandbox's own directory, and `delete` would
/// only wait for a dead sentry's zombie to be reaped by whoever inherited it). Does not
/// remove the other directories or the cgroup.
fn teardown(state: &GvisorState, sentry: Option<(u32, u64)>) -> io::Result<()> {
    let state_root = state.state_root();
    let mut pidfd = None;
    if let Some((pid, st)) = sentry {
        if pid > 1 && pid <= i32::MAX as u32 {
            if let Ok(fd) = sys::pidfd_open(pid as libc::pid_t) {
                if start_time(pid) == Some(st) {
                    let _ = sys::pidfd_kill(fd.as_raw_fd(), libc::SIGKILL);
                    pidfd = Some(fd);
                }
            }
        }
    }
    let mut others = Vec::new();
    for (pid, _) in runsc_procs(state) {
        if let Ok(fd) = sys::pidfd_open(pid as libc::pid_t) {
            let _ = sys::pidfd_kill(fd.as_raw_fd(), libc::SIGKILL);
            others.push(fd);
        }
    }
    let mut result = Ok(());
    let deadline = Instant::now() + Duration::from_secs(5);
    // The gofer and runsc's own processes take a moment to die too: waiting for them here
    // spares the `runsc delete --force` below (a second runsc start, up to a second here).
    for fd in &others {
        wait_exit(fd, deadline.saturating_duration_since(Instant::now()));
    }
    if let Some(fd) = pidfd {
        if !wait_exit(&fd, deadline.saturating_duration_since(Instant::now())) {
            result = Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the gvisor sandbox {} did not exit within 5 s of SIGKILL: try again later",
                    state.id
                ),
            ));
        }
    }
    if state_root.is_dir() {
        let live = runsc_procs(state)
            .iter()
            .any(|(pid, _)| start_time(*pid).is_some());
        if live {
            runsc_cmd(state, &["delete", "--force", &state.id]);
        }
        if let Err(e) = fs::remove_dir_all(&state_root) {
            if e.kind() != io::ErrorKind::NotFound && result.is_ok() {
                result = Err(io::Error::new(
                    e.kind(),
                    format!("remove {}: {e}", state_root.display()),
                ));
            }
        }
    }
    result
}

/// Whether the gvisor sandbox `s` still runs (its sentry, by pid and start time).
pub fn alive(s: &Spawned) -> bool {
    s.pid > 1 && start_time(s.pid) == Some(s.start_time)
}

/// Kills a gvisor sandbox and removes what the tier made for it: every runsc, gofer and
/// sandbox process (and with the sandbox its stubs), runsc's state, the bundle, the control
/// directory with the socket, and the socket's symlink. Thaws a frozen cgroup first (a frozen
/// sentry cannot die) and kills whatever is left in it, but leaves the cgroup directories to
/// the caller, as the native tier's [`crate::native::destroy`] does. Ok when it was gone
/// already.
pub fn destroy(s: &Spawned) -> io::Result<()> {
    let Some(state) = &s.gvisor else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a gvisor sandbox",
        ));
    };
    // Only ever a directory of the tier's own: a stored path never removes anything else.
    let base = base_dir();
    if state.dir.parent() != Some(base.as_path())
        || !state
            .dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("moat-g") && n == state.id)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a gvisor sandbox directory under {}",
                state.dir.display(),
                base.display()
            ),
        ));
    }
    let cg = if s.cgroup_paths.is_empty() {
        None
    } else {
        Cgroup::open(s.cgroup_paths.clone()).ok()
    };
    if let Some(cg) = &cg {
        if cg.is_frozen() {
            let _ = cg.thaw();
        }
    }
    let result = teardown(state, Some((s.pid, s.start_time)));
    if let Some(cg) = cg {
        let _ = cg.kill_all();
        let _ = cg.into_paths();
    }
    let ours = fs::symlink_metadata(&state.socket).is_ok_and(|m| m.file_type().is_symlink())
        && fs::read_link(&state.socket).is_ok_and(|t| t.starts_with(&state.dir));
    if ours {
        let _ = fs::remove_file(&state.socket);
    }
    match fs::remove_dir_all(&state.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("remove {}: {e}", state.dir.display()),
            ))
        }
    }
    result
}

// ---------------------------------------------------------------------------------------
// The OCI bundle.

fn mount(dst: &str, typ: &str, src: &str, opts: &[&str]) -> Result<oci::Mount, RunError> {
    oci::MountBuilder::default()
        .destination(dst)
        .typ(typ)
        .source(src)
        .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(|e| RunError::Setup(format!("OCI mount {dst}: {e}")))
}

fn touch(path: &Path) -> Result<(), RunError> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map(drop)
        .map_err(io_ctx(format!("create {}", path.display())))
}

/// Writes the sanitised `/etc` (as the native tier's, see [`rootfs`]) into `etc`, and
/// returns the read-only binds it needs inside.
fn build_etc(policy: &Policy, etc: &Path) -> Result<Vec<oci::Mount>, RunError> {
    mkdir(etc, 0o755)?;
    for f in rootfs::ETC_FILES {
        let src = Path::new("/etc").join(f);
        let dst = etc.join(f);
        match fs::symlink_metadata(&src) {
            Ok(m) if m.file_type().is_symlink() => {
                let t = fs::read_link(&src).map_err(io_ctx(format!("read {}", src.display())))?;
                std::os::unix::fs::symlink(t, &dst)
                    .map_err(io_ctx(format!("symlink {}", dst.display())))?;
            }
            Ok(m) if m.is_file() && m.len() <= 4 << 20 && m.permissions().mode() & 0o004 != 0 => {
                fs::copy(&src, &dst).map_err(io_ctx(format!("copy {}", src.display())))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o644))
                    .map_err(io_ctx(format!("chmod {}", dst.display())))?;
            }
            _ => {}
        }
    }
    let mut binds = Vec::new();
    for d in rootfs::ETC_DIRS {
        let src = Path::new("/etc").join(d);
        if fs::symlink_metadata(&src).is_ok_and(|m| m.is_dir()) {
            mkdir(&etc.join(d), 0o755)?;
            binds.push(mount(
                &format!("/etc/{d}"),
                "bind",
                &src.display().to_string(),
                &["rbind", "ro", "nosuid", "nodev", "noexec"],
            )?);
        }
    }
    if let Some(ca) = &policy.network.ca_pem {
        binds.extend(trust_ca(etc, ca)?);
    }
    let (uid, gid) = (policy.process.uid, policy.process.gid);
    let home = &policy.fs.workdir;
    let host = &policy.process.hostname;
    let write = |name: &str, body: String| {
        fs::write(etc.join(name), body).map_err(io_ctx(format!("write /etc/{name}")))
    };
    write(
        "passwd",
        format!(
            "root:x:0:0:root:/root:/usr/sbin/nologin\nuser:x:{uid}:{gid}:sandbox user:{home}:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
    )?;
    write(
        "group",
        format!("root:x:0:\ntty:x:5:\nuser:x:{gid}:\nnogroup:x:65534:\n"),
    )?;
    for (name, body) in rootfs::host_files(host) {
        write(name, body)?;
    }
    Ok(binds)
}

/// Makes the sandbox trust its proxy's CA, as the native tier does: the CA alone and the
/// host's bundle plus it as files of the sandbox's `/etc/ssl`, the second also bound over
/// the system bundle. Returns that bind.
fn trust_ca(etc: &Path, ca: &str) -> Result<Vec<oci::Mount>, RunError> {
    let in_etc = |p: &str| etc.join(p.trim_start_matches("/etc/"));
    mkdir(&etc.join("ssl"), 0o755)?;
    let ca_file = in_etc(boot::CA_FILE);
    fs::write(&ca_file, ca).map_err(io_ctx(format!("write {}", boot::CA_FILE)))?;
    let system = Path::new("/etc").join(rootfs::SYSTEM_BUNDLE);
    let mut bundle = fs::read(&system).unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca.as_bytes());
    let bundle_file = in_etc(boot::BUNDLE_FILE);
    fs::write(&bundle_file, &bundle).map_err(io_ctx(format!("write {}", boot::BUNDLE_FILE)))?;
    for f in [&ca_file, &bundle_file] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644))
            .map_err(io_ctx(format!("chmod {}", f.display())))?;
    }
    let mut binds = Vec::new();
    if system.is_file() {
        binds.push(mount(
            &format!("/etc/{}", rootfs::SYSTEM_BUNDLE),
            "bind",
            &bundle_file.display().to_string(),
            &["bind", "ro", "nosuid", "nodev", "noexec"],
        )?);
    }
    Ok(binds)
}

/// The OCI runtime spec of the sandbox (see the module doc).
fn build_spec(
    policy: &Policy,
    bundle: &Path,
    ctl: &Path,
    agent: &Path,
) -> Result<oci::Spec, RunError> {
    let rootfs_dir = bundle.join("rootfs");
    mkdir(&rootfs_dir, 0o755)?;
    let nr = |p: &str| rootfs_dir.join(p.trim_start_matches('/'));
    let mut mounts = vec![mount(
        "/proc",
        "proc",
        "proc",
        &["nosuid", "nodev", "noexec"],
    )?];
    let own_root = policy.fs.root.is_none() && policy.fs.image.is_none();
    let root_path = match (&policy.fs.image, &policy.fs.root) {
        // A template's files: read-only, shared; runsc keeps the sandbox's writes in a
        // memory-backed overlay of its own (`--overlay2=root:memory`, counted in the
        // sandbox's memory). The host name, hosts and resolver files are moat's.
        (Some(img), _) => {
            let etc = bundle.join("etc");
            mkdir(&etc, 0o755)?;
            let host = &policy.process.hostname;
            for (name, body) in rootfs::host_files(host) {
                let f = etc.join(name);
                fs::write(&f, body).map_err(io_ctx(format!("write {}", f.display())))?;
                mounts.push(mount(
                    &format!("/etc/{name}"),
                    "bind",
                    &f.display().to_string(),
                    &["bind", "ro", "nosuid", "nodev", "noexec"],
                )?);
            }
            // The overlay exec_runsc mounts there, in runsc's own mount namespace.
            let _ = img;
            rootfs_dir.clone()
        }
        (None, Some(r)) => PathBuf::from(r),
        (None, None) => {
            for d in rootfs::HOST_DIRS {
                let src = format!("/{d}");
                match fs::symlink_metadata(&src) {
                    Ok(m) if m.file_type().is_symlink() => {
                        let t = fs::read_link(&src).map_err(io_ctx(format!("read {src}")))?;
                        std::os::unix::fs::symlink(t, nr(&src))
                            .map_err(io_ctx(format!("symlink {src}")))?;
                    }
                    Ok(m) if m.is_dir() => {
                        mkdir(&nr(&src), 0o755)?;
                        mounts.push(mount(
                            &src,
                            "bind",
                            &src,
                            &["rbind", "ro", "nosuid", "nodev"],
                        )?);
                    }
                    _ => {}
                }
            }
            for d in [
                "/proc", "/dev", "/tmp", "/etc", "/root", "/home", "/run", "/var", "/var/tmp",
            ] {
                mkdir(&nr(d), 0o755)?;
            }
            let etc_binds = build_etc(policy, &bundle.join("etc"))?;
            mounts.push(mount(
                "/etc",
                "bind",
                &bundle.join("etc").display().to_string(),
                &["rbind", "ro", "nosuid", "nodev", "noexec"],
            )?);
            mounts.extend(etc_binds);
            rootfs_dir.clone()
        }
    };
    if own_root {
        mkdir(&nr("/sys"), 0o755)?;
    }
    if policy.fs.sys {
        mounts.push(mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["ro", "nosuid", "nodev", "noexec"],
        )?);
    } else {
        // runsc mounts its sysfs where the spec has no /sys: an empty read-only tmpfs
        // instead, as the native tier has no /sys.
        mounts.push(mount(
            "/sys",
            "tmpfs",
            "tmpfs",
            &["ro", "nosuid", "nodev", "noexec", "size=4k"],
        )?);
    }
    let l = &policy.limits;
    // gVisor's own /dev (null, zero, full, random, urandom, tty, ptmx, pts, fd links) has a
    // /dev/shm only root may write: the sandbox gets its own, as in the native tier.
    mounts.push(mount(
        "/dev/shm",
        "tmpfs",
        "tmpfs",
        &[
            "nosuid",
            "nodev",
            "noexec",
            "mode=1777",
            &format!("size={}", l.tmp_size),
        ],
    )?);
    mounts.push(mount(
        "/tmp",
        "tmpfs",
        "tmpfs",
        &[
            "nosuid",
            "nodev",
            "mode=1777",
            &format!("size={}", l.tmp_size),
        ],
    )?);
    if own_root {
        mkdir(&nr(&policy.fs.workdir), 0o755)?;
    }
    mounts.push(mount(
        &policy.fs.workdir,
        "tmpfs",
        "tmpfs",
        &[
            "nosuid",
            "nodev",
            "mode=0755",
            &format!("uid={}", policy.process.uid),
            &format!("gid={}", policy.process.gid),
            &format!("size={}", l.workdir_size),
        ],
    )?);
    for m in &policy.fs.mounts {
        if own_root {
            let dst = nr(&m.dst);
            if Path::new(&m.src).is_dir() {
                mkdir(&dst, 0o755)?;
            } else {
                if let Some(parent) = dst.parent() {
                    mkdir(parent, 0o755)?;
                }
                touch(&dst)?;
            }
        }
        mounts.push(mount(
            &m.dst,
            "bind",
            &m.src,
            &["rbind", if m.rw { "rw" } else { "ro" }, "nosuid", "nodev"],
        )?);
    }
    if own_root {
        touch(&nr(AGENT_IN))?;
        mkdir(&nr(CTL_IN), 0o700)?;
    }
    mounts.push(mount(
        AGENT_IN,
        "bind",
        &agent.display().to_string(),
        &["bind", "ro", "nosuid", "nodev"],
    )?);
    mounts.push(mount(
        CTL_IN,
        "bind",
        &ctl.display().to_string(),
        &["bind", "rw", "nosuid", "nodev", "noexec"],
    )?);

    use oci::Capability as C;
    // The agent starts as root of the sandbox with only what it needs to become the sandbox
    // user (setuid/setgid), to empty its bounding set (setpcap) and to signal the workload
    // (kill); it drops them all before serving. Capabilities inside gVisor are the
    // sentry's, never the host's.
    let caps: oci::Capabilities = [C::Setuid, C::Setgid, C::Setpcap, C::Kill]
        .into_iter()
        .collect();
    let capabilities = oci::LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(oci::Capabilities::new())
        .ambient(oci::Capabilities::new())
        .build()
        .map_err(|e| RunError::Setup(format!("OCI capabilities: {e}")))?;
    // No core dumps; and the workload's process limit, which gVisor enforces per user inside
    // the sandbox (the agent's real uid is another: it can always start a process).
    let rlimit = |typ: oci::PosixRlimitType, v: u64| {
        oci::PosixRlimitBuilder::default()
            .typ(typ)
            .soft(v)
            .hard(v)
            .build()
            .map_err(|e| RunError::Setup(format!("OCI rlimits: {e}")))
    };
    let rlimits = vec![
        rlimit(oci::PosixRlimitType::RlimitCore, 0)?,
        rlimit(oci::PosixRlimitType::RlimitNproc, policy.limits.pids)?,
    ];
    let user = oci::UserBuilder::default()
        .uid(0u32)
        .gid(0u32)
        .build()
        .map_err(|e| RunError::Setup(format!("OCI user: {e}")))?;
    let process = oci::ProcessBuilder::default()
        .terminal(false)
        .user(user)
        .args(vec![AGENT_IN.to_string(), AGENT_ARG.to_string()])
        .env(vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ])
        .cwd("/")
        .capabilities(capabilities)
        .rlimits(rlimits)
        .no_new_privileges(true)
        .build()
        .map_err(|e| RunError::Setup(format!("OCI process: {e}")))?;
    let root = oci::RootBuilder::default()
        .path(root_path)
        .readonly(policy.fs.image.is_none())
        .build()
        .map_err(|e| RunError::Setup(format!("OCI root: {e}")))?;
    let ns = |t: oci::LinuxNamespaceType| {
        oci::LinuxNamespaceBuilder::default()
            .typ(t)
            .build()
            .map_err(|e| RunError::Setup(format!("OCI namespace: {e}")))
    };
    use oci::LinuxNamespaceType as N;
    let namespaces = vec![
        ns(N::Pid)?,
        ns(N::Network)?,
        ns(N::Ipc)?,
        ns(N::Uts)?,
        ns(N::Mount)?,
    ];
    // The limits as the workload's view of them (gVisor sizes its reported memory from
    // them); the host enforces them through moat's cgroup (runsc --ignore-cgroups).
    let period = 100_000u64;
    let resources = oci::LinuxResourcesBuilder::default()
        .memory(
            oci::LinuxMemoryBuilder::default()
                .limit(l.memory as i64)
                .build()
                .map_err(|e| RunError::Setup(format!("OCI memory: {e}")))?,
        )
        .pids(
            oci::LinuxPidsBuilder::default()
                .limit(l.pids as i64)
                .build()
                .map_err(|e| RunError::Setup(format!("OCI pids: {e}")))?,
        )
        .cpu(
            oci::LinuxCpuBuilder::default()
                .period(period)
                .quota(((l.cpus * period as f64) as i64).max(1000))
                .build()
                .map_err(|e| RunError::Setup(format!("OCI cpu: {e}")))?,
        )
        .build()
        .map_err(|e| RunError::Setup(format!("OCI resources: {e}")))?;
    let linux = oci::LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources)
        .build()
        .map_err(|e| RunError::Setup(format!("OCI linux: {e}")))?;
    oci::SpecBuilder::default()
        .version("1.0.2")
        .process(process)
        .root(root)
        .hostname(policy.process.hostname.clone())
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(|e| RunError::Setup(format!("OCI spec: {e}")))
}

// ---------------------------------------------------------------------------------------
// `moat doctor`.

/// What `moat doctor` says about gVisor here.
#[derive(Clone, Debug, Serialize)]
pub struct RunscProbe {
    /// The runsc binary, when installed.
    pub path: Option<PathBuf>,
    /// `runsc --version`'s first line.
    pub version: Option<String>,
    /// Each platform tried: (name, Ok(ms to run `true`) or why not).
    pub platforms: Vec<(String, Result<u64, String>)>,
}

/// The platforms a runsc build offers, from `runsc flags` (ptrace and kvm in older builds,
/// systrap too in newer ones).
fn platforms_of(runsc: &Path) -> Vec<String> {
    let flags = std::process::Command::new(runsc)
        .arg("flags")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default();
    let line = flags
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("-platform "))
        .nth(1)
        .unwrap_or("")
        .to_string();
    let mut v: Vec<String> = ["systrap", "ptrace", "kvm"]
        .iter()
        .filter(|p| line.contains(*p))
        .map(|p| p.to_string())
        .collect();
    if v.is_empty() {
        v = vec!["ptrace".into(), "kvm".into()];
    }
    v
}

/// Tries each platform of this runsc: `runsc --network=none --platform=P do true`, killed
/// (with everything it started) after 3 s.
pub fn probe() -> RunscProbe {
    let Some(runsc) = find_runsc() else {
        return RunscProbe {
            path: None,
            version: None,
            platforms: Vec::new(),
        };
    };
    let version = std::process::Command::new(&runsc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        });
    let mut platforms = Vec::new();
    if sys::effective_uid() != 0 {
        for p in platforms_of(&runsc) {
            platforms.push((p, Err("not tried: runsc needs root here".to_string())));
        }
    } else {
        for p in platforms_of(&runsc) {
            let r = try_platform(&runsc, &p);
            platforms.push((p, r));
        }
    }
    RunscProbe {
        path: Some(runsc),
        version,
        platforms,
    }
}

fn try_platform(runsc: &Path, platform: &str) -> Result<u64, String> {
    let base = base_dir();
    if fs::create_dir_all(&base).is_err() {
        return Err(format!("cannot create {}", base.display()));
    }
    let root = base.join(format!("moat-gprobe-{}-{platform}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
    let state = GvisorState {
        id: String::new(),
        dir: root.clone(),
        runsc: runsc.to_path_buf(),
        socket: PathBuf::new(),
    };
    let _ = fs::create_dir(state.state_root());
    let t = Instant::now();
    let child = std::process::Command::new(runsc)
        .arg(format!("--root={}", state.state_root().display()))
        .arg("--network=none")
        // A probe that hangs (kvm on a nested host) is killed; a cgroup of runsc's own would
        // be left behind then (runsc-NNNNNN in every hierarchy).
        .arg("--ignore-cgroups")
        .arg(format!("--platform={platform}"))
        .args(["do", "true"])
        .current_dir(&root)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_dir_all(&root);
            return Err(format!("cannot run {}: {e}", runsc.display()));
        }
    };
    let result = loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                break if st.success() {
                    Ok(t.elapsed().as_millis() as u64)
                } else {
                    let last = err.lines().last().unwrap_or("").trim().to_string();
                    Err(format!(
                        "`runsc --platform={platform} do true` failed: {last}"
                    ))
                };
            }
            Ok(None) if t.elapsed() < PROBE_TIMEOUT => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "`runsc --platform={platform} do true` did not finish within {} s (on a \
                     nested or restricted KVM it hangs)",
                    PROBE_TIMEOUT.as_secs()
                ));
            }
            Err(e) => break Err(format!("wait for runsc: {e}")),
        }
    };
    for (pid, _) in runsc_procs(&state) {
        let _ = sys::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(20));
    let _ = fs::remove_dir_all(&root);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_round_trips_through_the_agents_file() {
        let text = r#"
            env = { A = "b" }
            tier = "gvisor"
            [limits]
            memory = "100M"
            pids = 77
            timeout = "1500ms"
            [fs]
            workdir = "/w"
            [[fs.mount]]
            src = "/usr/share"
            dst = "/data"
            rw = true
            [network]
            mode = "allowlist"
            allow = ["example.com:443"]
            secrets = { K = ["example.com"] }
            [security]
            allow_missing = ["landlock"]
        "#;
        let p = Policy::from_toml(text).unwrap();
        let back: Policy = serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        let d = Policy::default();
        let back: Policy = serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn the_spec_has_the_policys_mounts_and_user() {
        let dir = std::env::temp_dir().join(format!("moat-gvisor-spec-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("ctl")).unwrap();
        let mut p = Policy::default();
        p.fs.mounts.push(moat_policy::Mount {
            src: "/usr/share".into(),
            dst: "/data".into(),
            rw: false,
        });
        let spec = build_spec(
            &p,
            &dir.join("bundle"),
            &dir.join("ctl"),
            Path::new("/bin/true"),
        )
        .unwrap();
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(v["process"]["args"][1], AGENT_ARG);
        assert_eq!(v["process"]["noNewPrivileges"], true);
        assert_eq!(v["root"]["readonly"], true);
        let mounts = v["mounts"].as_array().unwrap();
        let find = |d: &str| mounts.iter().find(|m| m["destination"] == d).cloned();
        assert!(find("/data").unwrap()["options"]
            .as_array()
            .unwrap()
            .contains(&"ro".into()));
        assert!(find("/work").unwrap()["options"]
            .as_array()
            .unwrap()
            .contains(&"uid=1000".into()));
        assert_eq!(find(AGENT_IN).unwrap()["source"], "/bin/true");
        let etc = fs::read_to_string(dir.join("bundle/etc/passwd")).unwrap();
        assert!(etc.contains("user:x:1000:1000"));
        assert!(dir.join("bundle/rootfs/data").is_dir());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn host_limits_have_headroom() {
        let p = Policy::default();
        let l = host_limits(&p);
        assert_eq!(l.memory, p.limits.memory + MEMORY_HEADROOM);
        assert_eq!(l.pids, (p.limits.pids + PIDS_HEADROOM) * PIDS_PER_TASK);
    }
}
