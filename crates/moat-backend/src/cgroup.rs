//! cgroup v1 and v2: detected at run time. A sandbox's cgroup nests under moat's own cgroup
//! (so limits put on moat, e.g. by a test or a systemd unit, bound its sandboxes too).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which cgroup hierarchy the host runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// A controller moat uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
    /// CPU accounting (v1: `cpuacct.usage`; v2: the core `cpu.stat`).
    Cpuacct,
    /// Pausing a sandbox (v1: `freezer.state`; v2: the core `cgroup.freeze`).
    Freezer,
}

impl Controller {
    /// The controllers that enforce limits (a sandbox's policy depends on them).
    pub const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];
    /// cgroup v1 hierarchies used when mounted, for accounting and pausing only.
    pub const EXTRA: [Controller; 2] = [Controller::Cpuacct, Controller::Freezer];
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Freezer => "freezer",
        }
    }
}

/// How long [`Cgroup::freeze`] and [`Cgroup::thaw`] wait for the kernel.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Cgroup::destroy`] retries removing a directory whose tasks are still exiting.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
    #[error("cgroup {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// A stored path that is not a sandbox cgroup moat could have made.
    #[error("{path}: not a moat sandbox cgroup: {why}")]
    NotSandbox { path: PathBuf, why: String },
    #[error("cgroup {path}: {what}")]
    Timeout { path: PathBuf, what: String },
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { path, op, source }
}

/// Where each controller can be managed from this process.
#[derive(Clone, Debug)]
pub struct Host {
    pub version: Version,
    /// v1: one parent directory per controller (moat's own cgroup in that hierarchy).
    /// v2: the same directory for every controller.
    pub parents: Vec<(Controller, PathBuf)>,
    /// Controllers that are missing or not writable here, with the reason.
    pub missing: Vec<(Controller, String)>,
    /// v2: the hierarchy's root directory (its mount point), when this process can see it.
    pub v2_root: Option<PathBuf>,
    /// v1: moat's own cgroup in the `cpuacct` and `freezer` hierarchies
    /// ([`Controller::EXTRA`]), those mounted and writable here. No limit depends on them, so
    /// a missing one is not in `missing`. Empty on v2, where both are core files.
    pub extra: Vec<(Controller, PathBuf)>,
}

struct MountEntry {
    root: String,
    mount_point: String,
    fstype: String,
    super_opts: String,
}

fn mountinfo() -> Vec<MountEntry> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let lf: Vec<&str> = left.split(' ').collect();
            let rf: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                root: lf.get(3)?.to_string(),
                mount_point: unescape(lf.get(4)?),
                fstype: rf.first()?.to_string(),
                super_opts: rf.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// This process's cgroup paths: (hierarchy id, controllers, path).
fn self_cgroups() -> Vec<(String, Vec<String>, String)> {
    let text = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let id = it.next()?.to_string();
            let ctrls = it
                .next()?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            Some((id, ctrls, it.next()?.to_string()))
        })
        .collect()
}

fn join_rel(base: &str, rel: &str, mount_root: &str) -> PathBuf {
    // The path in /proc/self/cgroup is relative to the hierarchy's root; the mount may show a
    // subtree (mount_root) of it, as in a container.
    let rel = rel.strip_prefix(mount_root).unwrap_or(rel);
    let mut p = PathBuf::from(base);
    for c in rel.split('/').filter(|c| !c.is_empty()) {
        p.push(c);
    }
    p
}

fn writable(dir: &Path) -> bool {
    let c = match std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        Ok(c) => c,
        Err(_) => return false,
    };
    moat_sys::fs::access_w(&c)
}

impl Host {
    /// Detects the hierarchy and where this process may create sandbox cgroups.
    pub fn detect() -> Host {
        let mounts = mountinfo();
        let selfs = self_cgroups();
        let v2_mount = mounts.iter().find(|m| m.fstype == "cgroup2");
        let v1_mounts: Vec<&MountEntry> = mounts.iter().filter(|m| m.fstype == "cgroup").collect();
        // A pure v2 host, or a hybrid one whose v2 tree has the controllers.
        if let Some(m2) = v2_mount {
            let own = selfs
                .iter()
                .find(|(id, _, _)| id == "0")
                .map(|(_, _, p)| p.clone());
            let v2_has_controllers = own.as_ref().is_some_and(|own| {
                let dir = join_rel(&m2.mount_point, own, &m2.root);
                let ctrls = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                ctrls.split_whitespace().any(|c| c == "memory")
            });
            if v1_mounts.is_empty() || v2_has_controllers {
                let mut host = Host {
                    version: Version::V2,
                    parents: Vec::new(),
                    missing: Vec::new(),
                    v2_root: (m2.root == "/").then(|| PathBuf::from(&m2.mount_point)),
                    extra: Vec::new(),
                };
                let Some(own) = own else {
                    for c in Controller::ALL {
                        host.missing
                            .push((c, "this process is in no cgroup v2".into()));
                    }
                    return host;
                };
                let dir = join_rel(&m2.mount_point, &own, &m2.root);
                let ctrls = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                for c in Controller::ALL {
                    if !ctrls.split_whitespace().any(|x| x == c.name()) {
                        host.missing.push((
                            c,
                            format!(
                                "controller `{}` is not delegated to {}",
                                c.name(),
                                dir.display()
                            ),
                        ));
                    } else if !writable(&dir) {
                        host.missing.push((
                            c,
                            format!(
                                "{} is not writable by this user (no delegation)",
                                dir.display()
                            ),
                        ));
                    } else {
                        host.parents.push((c, dir.clone()));
                    }
                }
                return host;
            }
        }
        let mut host = Host {
            version: Version::V1,
            parents: Vec::new(),
            missing: Vec::new(),
            v2_root: None,
            extra: Vec::new(),
        };
        let own_dir = |c: Controller| -> Result<PathBuf, String> {
            let mount = v1_mounts
                .iter()
                .find(|m| m.super_opts.split(',').any(|o| o == c.name()));
            let own = selfs
                .iter()
                .find(|(_, ctrls, _)| ctrls.iter().any(|x| x == c.name()));
            match (mount, own) {
                (Some(m), Some((_, _, p))) => {
                    let dir = join_rel(&m.mount_point, p, &m.root);
                    if writable(&dir) {
                        Ok(dir)
                    } else {
                        Err(format!("{} is not writable by this user", dir.display()))
                    }
                }
                _ => Err(format!("the `{}` controller is not mounted", c.name())),
            }
        };
        for c in Controller::ALL {
            match own_dir(c) {
                Ok(dir) => host.parents.push((c, dir)),
                Err(why) => host.missing.push((c, why)),
            }
        }
        if !host.parents.is_empty() {
            for c in Controller::EXTRA {
                if let Ok(dir) = own_dir(c) {
                    host.extra.push((c, dir));
                }
            }
        }
        host
    }
}

/// Limits to apply.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub memory: u64,
    pub pids: u64,
    pub cpus: f64,
}

/// One sandbox's cgroup (one directory per v1 hierarchy, or one v2 directory).
///
/// A handle only: dropping it never removes anything. The cgroup goes when its owner says so,
/// with [`Cgroup::destroy`] (or [`Cgroup::remove`]), in the one teardown of each path; a
/// persistent sandbox's cgroup outlives every handle and is reopened with [`Cgroup::open`].
#[derive(Debug)]
pub struct Cgroup {
    pub version: Version,
    /// Each controller's directory; several controllers may share one (v2, or v1 hierarchies
    /// mounted together such as `cpu,cpuacct`).
    dirs: Vec<(Controller, PathBuf)>,
}

/// What a sandbox's cgroup has used, read from the kernel's counters (a counter whose file is
/// missing reads 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// CPU time of all its tasks, microseconds.
    pub cpu_usec: u64,
    /// Memory charged to it now, bytes (page cache included).
    pub memory_bytes: u64,
    /// Tasks (threads included) in it now.
    pub pids: u64,
}

fn read_u64(path: &Path) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The value of `key` in a flat-keyed file (`key value` lines: `cpu.stat`, `cgroup.events`).
fn read_key(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The pids listed in a `cgroup.procs` file.
fn read_procs(dir: &Path) -> Vec<libc::pid_t> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path, "write"))
}

impl Cgroup {
    /// Creates `name` under each usable parent and applies the limits.
    pub fn create(host: &Host, name: &str, limits: Limits) -> Result<Cgroup, CgroupError> {
        let mut host = host.clone();
        host.resolve()?;
        let host = &host;
        if host.parents.is_empty() {
            return Err(CgroupError::Unavailable(
                host.missing
                    .iter()
                    .map(|(_, r)| r.clone())
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        let mut cg = Cgroup {
            version: host.version,
            dirs: Vec::new(),
        };
        // What was made before a failure is removed before the error is returned.
        if let Err(e) = cg.make_dirs(host, name) {
            cg.destroy();
            return Err(e);
        }
        if let Err(e) = cg.apply(limits) {
            cg.destroy();
            return Err(e);
        }
        Ok(cg)
    }

    /// Creates the directories of [`Cgroup::create`], recording each as it is made.
    fn make_dirs(&mut self, host: &Host, name: &str) -> Result<(), CgroupError> {
        let cg = self;
        match host.version {
            Version::V1 => {
                for (c, parent) in host.parents.iter().chain(&host.extra) {
                    let dir = parent.join(name);
                    // Hierarchies mounted together (`cpu,cpuacct`) share the directory.
                    if !cg.dirs.iter().any(|(_, d)| *d == dir) {
                        fs::create_dir(&dir).map_err(io_err(&dir, "mkdir"))?;
                    }
                    cg.dirs.push((*c, dir));
                }
            }
            Version::V2 => {
                let parent = &host.parents[0].1;
                let names: Vec<&str> = host.parents.iter().map(|(c, _)| c.name()).collect();
                enable_v2_controllers(parent, &names)?;
                let dir = parent.join(name);
                fs::create_dir(&dir).map_err(io_err(&dir, "mkdir"))?;
                for (c, _) in &host.parents {
                    cg.dirs.push((*c, dir.clone()));
                }
                // Core in v2: `cpu.stat` and `cgroup.freeze` are in every non-root cgroup.
                for c in Controller::EXTRA {
                    cg.dirs.push((c, dir.clone()));
                }
            }
        }
        Ok(())
    }

    /// The cgroup's directories, each once: the one v2 directory, or one per v1 hierarchy
    /// (the freezer's and cpuacct's included, where mounted). Store them to [`Cgroup::open`]
    /// the cgroup again later.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = Vec::new();
        for (_, d) in &self.dirs {
            if !v.contains(d) {
                v.push(d.clone());
            }
        }
        v
    }

    /// The handle's [`Cgroup::paths`], for storing (the cgroup stays).
    pub fn into_paths(self) -> Vec<PathBuf> {
        self.paths()
    }

    /// A handle to an existing sandbox cgroup from its stored [`Cgroup::paths`] (e.g. a
    /// restarted daemon reattaching). Each path must be a directory under `/sys/fs/cgroup`
    /// whose name starts with `moat` (what moat names its sandboxes' and tests' cgroups):
    /// a stored path can never make moat freeze, or remove, another cgroup of the host.
    pub fn open(paths: Vec<PathBuf>) -> Result<Cgroup, CgroupError> {
        open_under(Path::new("/sys/fs/cgroup"), paths)
    }

    fn dir(&self, c: Controller) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(x, _)| *x == c)
            .map(|(_, d)| d.as_path())
    }

    /// Writes the limits into a cgroup [`Cgroup::create`] has just made.
    fn apply(&self, l: Limits) -> Result<(), CgroupError> {
        let period: u64 = 100_000;
        let quota = ((l.cpus * period as f64) as u64).max(1000);
        match self.version {
            Version::V1 => {
                if let Some(d) = self.dir(Controller::Memory) {
                    write(&d.join("memory.limit_in_bytes"), &l.memory.to_string())?;
                    let memsw = d.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &l.memory.to_string())?;
                    }
                    let _ = fs::write(d.join("memory.swappiness"), "0");
                }
                if let Some(d) = self.dir(Controller::Pids) {
                    write(&d.join("pids.max"), &l.pids.to_string())?;
                }
                if let Some(d) = self.dir(Controller::Cpu) {
                    // Only the quota: a cgroup made just now has the default period,
                    // 100000 µs (the kernel's init_cfs_bandwidth), and each write of either
                    // file walks every CPU cgroup on the host (tg_set_cfs_bandwidth), which
                    // costs more the more sandboxes there are.
                    write(&d.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
            }
            Version::V2 => {
                if let Some(d) = self.dir(Controller::Memory) {
                    write(&d.join("memory.max"), &l.memory.to_string())?;
                    let swap = d.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                    let _ = fs::write(d.join("memory.oom.group"), "1");
                }
                if let Some(d) = self.dir(Controller::Pids) {
                    write(&d.join("pids.max"), &l.pids.to_string())?;
                }
                if let Some(d) = self.dir(Controller::Cpu) {
                    // Quota and period in one write: one walk of the CPU cgroups.
                    write(&d.join("cpu.max"), &format!("{quota} {period}"))?;
                }
            }
        }
        Ok(())
    }

    /// Moves `pid` into the cgroup (every hierarchy).
    pub fn add(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        for d in self.paths() {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process must be written to, to join this cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.paths()
            .iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// cgroup v1: lets host uid `uid` move its own thread in, by writing `0` to the returned
    /// `tasks` files. A process moving itself (a single thread) skips the kernel's global
    /// threadgroup lock, whose write side waits for an RCU grace period (milliseconds) when
    /// another process moves it. `None` on v2 (use [`Cgroup::add`]).
    pub fn delegate_self_join(
        &self,
        uid: u32,
        gid: u32,
    ) -> Result<Option<Vec<PathBuf>>, CgroupError> {
        if self.version != Version::V1 {
            return Ok(None);
        }
        let mut v = Vec::new();
        for d in self.paths() {
            let f = d.join("tasks");
            std::os::unix::fs::chown(&f, Some(uid), Some(gid)).map_err(io_err(&f, "chown"))?;
            v.push(f);
        }
        Ok(Some(v))
    }

    /// How many times the kernel's OOM killer killed a process in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let Some(d) = self.dir(Controller::Memory) else {
            return 0;
        };
        let file = match self.version {
            Version::V1 => d.join("memory.oom_control"),
            Version::V2 => d.join("memory.events"),
        };
        fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Pauses every task in the cgroup and waits (up to [`FREEZE_TIMEOUT`]) until the kernel
    /// reports it frozen. On a timeout the cgroup is thawed again and an error returned.
    pub fn freeze(&self) -> Result<(), CgroupError> {
        self.set_frozen(true)
    }

    /// Resumes a frozen cgroup and waits (up to [`FREEZE_TIMEOUT`]) until it runs again.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.set_frozen(false)
    }

    /// Whether the kernel reports the cgroup frozen (false without a freezer).
    pub fn is_frozen(&self) -> bool {
        let Some(d) = self.dir(Controller::Freezer) else {
            return false;
        };
        match self.version {
            Version::V1 => {
                fs::read_to_string(d.join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN")
            }
            Version::V2 => read_key(&d.join("cgroup.events"), "frozen") == Some(1),
        }
    }

    fn set_frozen(&self, on: bool) -> Result<(), CgroupError> {
        let Some(d) = self.dir(Controller::Freezer) else {
            return Err(CgroupError::Unavailable(
                "this sandbox's cgroup has no freezer: on cgroup v1, mount the `freezer` \
                 hierarchy (`mkdir -p /sys/fs/cgroup/freezer && mount -t cgroup -o freezer \
                 freezer /sys/fs/cgroup/freezer`) and create the sandbox again"
                    .into(),
            ));
        };
        let (file, value, state): (PathBuf, &str, Box<dyn Fn() -> bool>) = match self.version {
            Version::V1 => {
                let f = d.join("freezer.state");
                let want = if on { "FROZEN" } else { "THAWED" };
                let f2 = f.clone();
                let check = move || fs::read_to_string(&f2).is_ok_and(|s| s.trim() == want);
                (f, want, Box::new(check))
            }
            Version::V2 => {
                let events = d.join("cgroup.events");
                let want = u64::from(on);
                let check = move || read_key(&events, "frozen") == Some(want);
                (
                    d.join("cgroup.freeze"),
                    if on { "1" } else { "0" },
                    Box::new(check),
                )
            }
        };
        write(&file, value)?;
        let start = Instant::now();
        let mut last_write = start;
        let mut pause = Backoff::new(Duration::from_millis(2));
        while !state() {
            if start.elapsed() >= FREEZE_TIMEOUT {
                if on {
                    let _ = self.set_frozen(false);
                }
                return Err(CgroupError::Timeout {
                    path: d.to_path_buf(),
                    what: if on {
                        format!(
                            "its tasks did not all freeze within {} s (one may be stuck in \
                             the kernel, e.g. on I/O); the sandbox was left running: retry \
                             later",
                            FREEZE_TIMEOUT.as_secs()
                        )
                    } else {
                        format!(
                            "its tasks did not thaw within {} s: retry the thaw, or destroy \
                             the sandbox",
                            FREEZE_TIMEOUT.as_secs()
                        )
                    },
                });
            }
            // v1 moves on from FREEZING only when asked again after tasks that were busy in
            // the kernel have stopped.
            if self.version == Version::V1 && last_write.elapsed() >= Duration::from_millis(100) {
                write(&file, value)?;
                last_write = Instant::now();
            }
            pause.sleep();
        }
        Ok(())
    }

    /// CPU, memory and task counts from the kernel's counters.
    pub fn stats(&self) -> Stats {
        let file = |c: Controller, name: &str| self.dir(c).map(|d| d.join(name));
        match self.version {
            Version::V1 => Stats {
                cpu_usec: file(Controller::Cpuacct, "cpuacct.usage")
                    .map_or(0, |f| read_u64(&f) / 1000),
                memory_bytes: file(Controller::Memory, "memory.usage_in_bytes")
                    .map_or(0, |f| read_u64(&f)),
                pids: file(Controller::Pids, "pids.current").map_or(0, |f| read_u64(&f)),
            },
            Version::V2 => Stats {
                cpu_usec: file(Controller::Cpuacct, "cpu.stat")
                    .and_then(|f| read_key(&f, "usage_usec"))
                    .unwrap_or(0),
                memory_bytes: file(Controller::Memory, "memory.current")
                    .map_or(0, |f| read_u64(&f)),
                pids: file(Controller::Pids, "pids.current").map_or(0, |f| read_u64(&f)),
            },
        }
    }

    /// Sends SIGKILL to every process in the cgroup: v2 by `cgroup.kill` (5.14+), otherwise
    /// to each pid listed, frozen first (when there is a freezer) so that no pid is reused
    /// between the listing and the signal, then thawed (v1's frozen tasks die only once
    /// thawed). Returns without waiting for them to exit; [`Cgroup::destroy`] waits.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let paths = self.paths();
        if let (Version::V2, Some(d)) = (self.version, paths.first()) {
            let f = d.join("cgroup.kill");
            if f.exists() {
                return write(&f, "1");
            }
        }
        // Nothing left in it (the common case when the sandbox's init is gone: its pid
        // namespace took every process with it, and none can be forked in a dead one):
        // nothing to kill, and no pid to keep from being reused by freezing first.
        if paths.iter().all(|d| read_procs(d).is_empty()) {
            return Ok(());
        }
        let frozen = self.dir(Controller::Freezer).is_some() && self.freeze().is_ok();
        for d in &paths {
            for pid in read_procs(d) {
                if pid > 0 {
                    let _ = moat_sys::process::kill(pid, libc::SIGKILL);
                }
            }
        }
        if frozen || self.is_frozen() {
            self.thaw()?;
        }
        Ok(())
    }

    /// Removes the directories, retrying (up to [`REMOVE_TIMEOUT`]) while the kernel is still
    /// releasing tasks that exit (a killed pid namespace's tasks exit asynchronously). Thaws
    /// a frozen cgroup first (a killed task that is frozen never exits on v1). Does not kill:
    /// call [`Cgroup::kill_all`] first for a cgroup that may hold live processes.
    pub fn destroy(&mut self) {
        let _ = self.remove();
    }

    /// [`Cgroup::destroy`], saying which directories could not be removed.
    pub fn remove(&mut self) -> Result<(), CgroupError> {
        if self.is_frozen() {
            let _ = self.thaw();
        }
        let dirs = self.paths();
        self.dirs.clear();
        let start = Instant::now();
        let mut failed = None;
        let mut pause = Backoff::new(Duration::from_millis(5));
        for d in dirs {
            loop {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if start.elapsed() >= REMOVE_TIMEOUT => {
                        let procs = read_procs(&d);
                        let why = if procs.is_empty() {
                            format!("{e}")
                        } else {
                            format!("{e}; it still holds processes {procs:?}: kill them and retry")
                        };
                        failed.get_or_insert(CgroupError::Io {
                            path: d.clone(),
                            op: "rmdir",
                            source: io::Error::new(e.kind(), why),
                        });
                        break;
                    }
                    Err(_) => pause.sleep(),
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Sleeps between checks of something the kernel finishes soon (a freeze, the last task of
/// a killed sandbox leaving its cgroup): 50 µs first, doubling up to `max`, so a wait that
/// ends within a fraction of a millisecond costs no more than that.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_micros(50),
            max,
        }
    }

    fn sleep(&mut self) {
        std::thread::sleep(self.next);
        self.next = (self.next * 2).min(self.max);
    }
}

/// [`Cgroup::open`] with the cgroupfs at `root` (tests lay out a fake one).
fn open_under(root: &Path, paths: Vec<PathBuf>) -> Result<Cgroup, CgroupError> {
    let not = |path: &Path, why: &str| CgroupError::NotSandbox {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    if paths.is_empty() {
        return Err(CgroupError::Unavailable(
            "no cgroup paths given: pass the paths Cgroup::paths returned".into(),
        ));
    }
    let root = fs::canonicalize(root).map_err(io_err(root, "resolve"))?;
    let mut dirs: Vec<(Controller, PathBuf)> = Vec::new();
    let mut version = None;
    for p in paths {
        let canon = fs::canonicalize(&p).map_err(io_err(&p, "resolve"))?;
        if !canon.starts_with(&root) || canon == root {
            return Err(not(&p, &format!("not under {}", root.display())));
        }
        if !canon.is_dir() {
            return Err(not(&p, "not a directory"));
        }
        let named = canon
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("moat"));
        if !named {
            return Err(not(&p, "its name does not start with `moat`"));
        }
        let v = if canon.join("cgroup.controllers").exists() {
            Version::V2
        } else {
            Version::V1
        };
        if version.is_some_and(|x| x != v) || (v == Version::V2 && version.is_some()) {
            return Err(not(
                &p,
                "a sandbox's cgroup is one v2 directory or v1 directories only",
            ));
        }
        version = Some(v);
        let found: Vec<Controller> = match v {
            Version::V2 => {
                let ctrls =
                    fs::read_to_string(canon.join("cgroup.controllers")).unwrap_or_default();
                Controller::ALL
                    .into_iter()
                    .filter(|c| ctrls.split_whitespace().any(|x| x == c.name()))
                    .chain(Controller::EXTRA)
                    .collect()
            }
            Version::V1 => [
                (Controller::Memory, "memory.limit_in_bytes"),
                (Controller::Pids, "pids.max"),
                (Controller::Cpu, "cpu.cfs_quota_us"),
                (Controller::Cpuacct, "cpuacct.usage"),
                (Controller::Freezer, "freezer.state"),
            ]
            .into_iter()
            .filter(|(_, f)| canon.join(f).exists())
            .map(|(c, _)| c)
            .collect(),
        };
        if found.is_empty() {
            return Err(not(
                &p,
                "none of the memory, pids, cpu, cpuacct or freezer hierarchies",
            ));
        }
        for c in found {
            if dirs.iter().any(|(x, _)| *x == c) {
                return Err(not(
                    &p,
                    &format!("a second path in the {} hierarchy", c.name()),
                ));
            }
            dirs.push((c, canon.clone()));
        }
    }
    Ok(Cgroup {
        version: version.unwrap_or(Version::V1),
        dirs,
    })
}

impl Host {
    /// cgroup v2: settles where sandbox cgroups go (rewriting `parents`), enabling the
    /// controllers there. v2 allows no processes in a cgroup whose children use controllers,
    /// so, in order:
    /// 1. `$MOAT_CGROUP_PARENT` (a path in the hierarchy), when set;
    /// 2. moat's own cgroup, when its controllers can be enabled for children (moat runs in a
    ///    delegated cgroup with no processes of its own, or one already prepared);
    /// 3. moat's own cgroup, when moat is its only process: moat moves itself into a leaf
    ///    `moat-supervisor-PID` first (e.g. under `systemd-run --scope -p Delegate=yes`, or a
    ///    test's fence);
    /// 4. as root: `moat/` under the hierarchy's root;
    /// 5. otherwise an error that says how to give moat a cgroup of its own.
    ///
    /// Does nothing on v1 or when nothing is usable.
    pub fn resolve(&mut self) -> Result<(), CgroupError> {
        if self.version != Version::V2 || self.parents.is_empty() {
            return Ok(());
        }
        let own = self.parents[0].1.clone();
        let names: Vec<&str> = self.parents.iter().map(|(c, _)| c.name()).collect();
        let chosen = choose_v2_parent(
            &own,
            self.v2_root.as_deref(),
            &names,
            std::env::var_os("MOAT_CGROUP_PARENT").as_deref(),
        )?;
        for p in &mut self.parents {
            p.1 = chosen.clone();
        }
        Ok(())
    }
}

fn choose_v2_parent(
    own: &Path,
    root: Option<&Path>,
    names: &[&str],
    explicit: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, CgroupError> {
    if let Some(p) = explicit {
        let Some(root) = root else {
            return Err(CgroupError::Unavailable(
                "MOAT_CGROUP_PARENT is set but the cgroup v2 root is not visible here".into(),
            ));
        };
        let rel = Path::new(p);
        let dir = root.join(rel.strip_prefix("/").unwrap_or(rel));
        fs::create_dir_all(&dir).map_err(io_err(&dir, "mkdir"))?;
        enable_v2_controllers(&dir, names)?;
        return Ok(dir);
    }
    if enable_v2_controllers(own, names).is_ok() {
        return Ok(own.to_path_buf());
    }
    let me = std::process::id().to_string();
    let procs = fs::read_to_string(own.join("cgroup.procs")).unwrap_or_default();
    if procs.lines().all(|l| l.trim() == me) {
        let leaf = own.join(format!("moat-supervisor-{me}"));
        match fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&leaf, "mkdir")(e)),
        }
        write(&leaf.join("cgroup.procs"), "0")?;
        enable_v2_controllers(own, names)?;
        return Ok(own.to_path_buf());
    }
    if let (Some(root), 0) = (root, moat_sys::process::effective_uid()) {
        let dir = root.join("moat");
        fs::create_dir_all(&dir).map_err(io_err(&dir, "mkdir"))?;
        let _ = enable_v2_controllers(root, names);
        enable_v2_controllers(&dir, names)?;
        return Ok(dir);
    }
    Err(CgroupError::Unavailable(format!(
        "{} holds other processes, so cgroup v2 lets moat create no limited cgroups under it: \
         start moat in a cgroup of its own (`systemd-run --user --scope -p Delegate=yes moat \
         run ...`) or set MOAT_CGROUP_PARENT to a delegated cgroup",
        own.display()
    )))
}

/// cgroup v2: enables the controllers `names` for `dir`'s children (no-op when they are).
fn enable_v2_controllers(dir: &Path, names: &[&str]) -> Result<(), CgroupError> {
    let sc = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&sc).unwrap_or_default();
    let want: Vec<String> = names
        .iter()
        .filter(|n| !current.split_whitespace().any(|x| x == **n))
        .map(|n| format!("+{n}"))
        .collect();
    if want.is_empty() {
        return Ok(());
    }
    write(&sc, &want.join(" "))
}

/// How many directories one [`StaleSweep::step`] looks at, at most.
pub const SWEEP_BUDGET: usize = 32;

/// Removes empty sandbox cgroups left by a moat that was killed before it could clean up, a
/// few at a time, so that what a sandbox's start pays for it does not grow with the number
/// of sandboxes: each [`StaleSweep::step`] looks at no more than a budget of directories and
/// the next one resumes where it stopped. A pass goes through every hierarchy's parent
/// directory once; the next pass starts no sooner than `every` after the last one began.
///
/// A directory is looked at by its name alone: a `moat-*` one whose owner is gone
/// (`is_stale(name)`, e.g. its uid slot's lock is free) is removed, which the kernel refuses
/// (`EBUSY`) for a cgroup that still holds a task or a child, so nothing in use is lost and no
/// `cgroup.procs` is read.
#[derive(Debug, Default)]
pub struct StaleSweep {
    /// Every parent directory of this pass, each once.
    parents: Vec<PathBuf>,
    /// The parent directories this pass has still to go through, the current one first.
    todo: Vec<PathBuf>,
    /// The open listing of `todo[0]`, once started.
    listing: Option<fs::ReadDir>,
    /// When the last pass began (`None`: none has yet).
    began: Option<Instant>,
}

impl StaleSweep {
    /// No pass begun yet: the first [`StaleSweep::step`] begins one.
    pub const fn new() -> StaleSweep {
        StaleSweep {
            parents: Vec::new(),
            todo: Vec::new(),
            listing: None,
            began: None,
        }
    }

    /// Goes on with the pass (beginning one over `host`'s parent directories when none is
    /// under way and `every` has passed since the last began), looking at no more than
    /// `budget` directories (opening a parent's listing counts as one). Returns how many
    /// directories of stale cgroups it removed (v1: one per hierarchy).
    pub fn step(
        &mut self,
        host: &Host,
        every: Duration,
        budget: usize,
        is_stale: impl Fn(&str) -> bool,
    ) -> usize {
        if self.todo.is_empty() {
            if self.began.is_some_and(|t| t.elapsed() < every) {
                return 0;
            }
            self.began = Some(Instant::now());
            self.parents.clear();
            for (_, parent) in host.parents.iter().chain(&host.extra) {
                if !self.parents.contains(parent) {
                    self.parents.push(parent.clone());
                }
            }
            self.todo = self.parents.clone();
            self.listing = None;
        }
        let mut left = budget;
        let mut removed = 0;
        while left > 0 {
            let Some(parent) = self.todo.first() else {
                break;
            };
            let listing = match &mut self.listing {
                Some(l) => l,
                None => {
                    left -= 1;
                    match fs::read_dir(parent) {
                        Ok(l) => self.listing.insert(l),
                        Err(_) => {
                            self.todo.remove(0);
                            continue;
                        }
                    }
                }
            };
            let Some(Ok(e)) = listing.next() else {
                // The end of this parent's listing (or a broken one): on to the next parent.
                self.listing = None;
                self.todo.remove(0);
                continue;
            };
            // The type comes with the listing (no stat); a cgroup's control files are not
            // counted: a directory has a bounded number of them.
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            left -= 1;
            let name = e.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if name.starts_with("moat-") && is_stale(name) && fs::remove_dir(e.path()).is_ok() {
                removed += 1;
                // v1: the sandbox has a directory of the same name in the other hierarchies
                // (the ones still to list, and those listed before it was left behind).
                for other in &self.parents {
                    if other != parent && fs::remove_dir(other.join(name)).is_ok() {
                        removed += 1;
                    }
                }
            }
        }
        removed
    }

    /// Whether a pass is under way (begun and not yet through every parent).
    pub fn in_pass(&self) -> bool {
        !self.todo.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_handles_container_mount_roots() {
        assert_eq!(
            join_rel("/sys/fs/cgroup/memory", "/a/b", "/"),
            PathBuf::from("/sys/fs/cgroup/memory/a/b")
        );
        assert_eq!(
            join_rel("/sys/fs/cgroup", "/docker/x/a", "/docker/x"),
            PathBuf::from("/sys/fs/cgroup/a")
        );
        assert_eq!(
            join_rel("/sys/fs/cgroup", "/", "/"),
            PathBuf::from("/sys/fs/cgroup")
        );
    }

    /// The v2 logic against a directory laid out like a delegated cgroup v2 subtree (plain
    /// files stand in for the kernel's; this host runs v1, where the real thing is tested).
    #[test]
    fn v2_writes_the_limits_and_enables_controllers() {
        let root = std::env::temp_dir().join(format!("moat-cgv2-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let host = Host {
            version: Version::V2,
            parents: Controller::ALL.iter().map(|c| (*c, root.clone())).collect(),
            missing: Vec::new(),
            v2_root: Some(root.clone()),
            extra: Vec::new(),
        };
        let mut cg = Cgroup::create(
            &host,
            "moat-x",
            Limits {
                memory: 256 << 20,
                pids: 64,
                cpus: 0.5,
            },
        )
        .unwrap();
        let dir = root.join("moat-x");
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu"
        );
        assert_eq!(read("memory.max"), (256u64 << 20).to_string());
        assert_eq!(read("memory.oom.group"), "1");
        assert_eq!(read("pids.max"), "64");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(cg.procs_files(), vec![dir.join("cgroup.procs")]);
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), 2);
        assert_eq!(cg.dir(Controller::Freezer), Some(dir.as_path()));
        cg.dirs.clear();
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn v2_explicit_parent_is_created_and_enabled() {
        let root = std::env::temp_dir().join(format!("moat-cgv2e-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("own")).unwrap();
        let got = choose_v2_parent(
            &root.join("own"),
            Some(&root),
            &["memory", "pids"],
            Some(std::ffi::OsStr::new("/moat.slice/sandboxes")),
        )
        .unwrap();
        assert_eq!(got, root.join("moat.slice/sandboxes"));
        assert_eq!(
            fs::read_to_string(got.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        // Without MOAT_CGROUP_PARENT and with an own cgroup whose controllers can be enabled
        // (here: a plain file accepts the write), the own cgroup is used.
        let own = root.join("own");
        let got = choose_v2_parent(&own, Some(&root), &["memory"], None).unwrap();
        assert_eq!(got, own);
        assert_eq!(
            fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        let _ = fs::remove_dir_all(&root);
    }

    /// A v2 sandbox cgroup laid out under a fake cgroupfs root (plain files stand in for the
    /// kernel's).
    fn fake_v2(tag: &str) -> (PathBuf, PathBuf) {
        let root = std::env::temp_dir().join(format!("moat-cgfake-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = root.join("moat.slice/moat-sbx");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        (root, dir)
    }

    #[test]
    fn v2_open_freeze_stats_on_a_fake_tree() {
        let (root, dir) = fake_v2("open");
        let cg = open_under(&root, vec![dir.clone()]).unwrap();
        assert_eq!(cg.version, Version::V2);
        assert_eq!(cg.paths(), vec![fs::canonicalize(&dir).unwrap()]);
        for c in [Controller::Memory, Controller::Pids, Controller::Cpu] {
            assert!(cg.dir(c).is_some(), "{c:?}");
        }
        // Freezing writes cgroup.freeze and waits for cgroup.events to say "frozen 1".
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        cg.freeze().unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "1");
        assert!(cg.is_frozen());
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        cg.thaw().unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "0");
        assert!(!cg.is_frozen());
        // Missing counters read 0.
        assert_eq!(cg.stats(), Stats::default());
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n",
        )
        .unwrap();
        fs::write(dir.join("memory.current"), "4096\n").unwrap();
        fs::write(dir.join("pids.current"), "3\n").unwrap();
        assert_eq!(
            cg.stats(),
            Stats {
                cpu_usec: 1234,
                memory_bytes: 4096,
                pids: 3
            }
        );
        // v2 kills through cgroup.kill.
        fs::write(dir.join("cgroup.kill"), "").unwrap();
        cg.kill_all().unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.kill")).unwrap(), "1");
        let _ = cg.into_paths();
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn v2_open_without_controllers_still_freezes_and_removes() {
        let (root, dir) = fake_v2("bare");
        fs::write(dir.join("cgroup.controllers"), "").unwrap();
        let cg = open_under(&root, vec![dir.clone()]).unwrap();
        assert!(cg.dir(Controller::Memory).is_none());
        assert!(cg.dir(Controller::Freezer).is_some());
        assert_eq!(cg.paths().len(), 1);
        let _ = cg.into_paths();
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn v1_open_sorts_dirs_by_hierarchy() {
        let root = std::env::temp_dir().join(format!("moat-cgfake-v1-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let mk = |h: &str, files: &[&str]| {
            let d = root.join(h).join("moat-x");
            fs::create_dir_all(&d).unwrap();
            for f in files {
                fs::write(d.join(f), "0\n").unwrap();
            }
            d
        };
        let mem = mk(
            "memory",
            &["memory.limit_in_bytes", "memory.usage_in_bytes"],
        );
        let cpu = mk("cpu,cpuacct", &["cpu.cfs_quota_us", "cpuacct.usage"]);
        let frz = mk("freezer", &["freezer.state"]);
        fs::write(cpu.join("cpuacct.usage"), "5000000\n").unwrap();
        fs::write(mem.join("memory.usage_in_bytes"), "8192\n").unwrap();
        let cg = open_under(&root, vec![mem.clone(), cpu.clone(), frz.clone()]).unwrap();
        assert_eq!(cg.version, Version::V1);
        assert_eq!(cg.dir(Controller::Cpuacct), cg.dir(Controller::Cpu));
        assert_eq!(cg.dir(Controller::Freezer), Some(frz.as_path()));
        assert!(cg.dir(Controller::Pids).is_none());
        assert_eq!(cg.paths(), vec![mem.clone(), cpu.clone(), frz.clone()]);
        assert_eq!(
            cg.stats(),
            Stats {
                cpu_usec: 5000,
                memory_bytes: 8192,
                pids: 0
            }
        );
        fs::write(frz.join("freezer.state"), "FROZEN\n").unwrap();
        assert!(cg.is_frozen());
        // Two dirs of one hierarchy, a dir with no known hierarchy, and v1 mixed with v2
        // are refused.
        let other = mk("memory2", &["memory.limit_in_bytes"]);
        assert!(matches!(
            open_under(&root, vec![mem.clone(), other]),
            Err(CgroupError::NotSandbox { .. })
        ));
        let blank = mk("blank", &[]);
        assert!(open_under(&root, vec![blank]).is_err());
        let v2 = mk("unified", &["cgroup.controllers"]);
        assert!(open_under(&root, vec![mem.clone(), v2]).is_err());
        let _ = cg.into_paths();
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn open_refuses_paths_that_are_not_sandbox_cgroups() {
        let (root, dir) = fake_v2("refuse");
        // Outside the root, the root itself, a name that is not moat's, a file, no paths.
        let outside = std::env::temp_dir();
        assert!(open_under(&root, vec![outside]).is_err());
        assert!(open_under(&root, vec![root.clone()]).is_err());
        let dotted = open_under(&root, vec![root.join("moat.slice/../moat.slice/moat-sbx")]);
        assert_eq!(
            dotted.unwrap().into_paths(),
            vec![fs::canonicalize(&dir).unwrap()]
        );
        let other = root.join("system.slice");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("cgroup.controllers"), "").unwrap();
        assert!(matches!(
            open_under(&root, vec![other]),
            Err(CgroupError::NotSandbox { .. })
        ));
        assert!(open_under(&root, vec![dir.join("cgroup.procs")]).is_err());
        assert!(open_under(&root, vec![]).is_err());
        assert!(open_under(&root, vec![root.join("moat-missing")]).is_err());
        // The real entry point checks against /sys/fs/cgroup.
        assert!(Cgroup::open(vec![dir.clone()]).is_err());
        assert!(Cgroup::open(vec![PathBuf::from("/sys/fs/cgroup/memory")]).is_err());
        let _ = fs::remove_dir_all(&root);
    }

    /// The kernel's cgroupfs, as root: a sandbox cgroup with a busy child freezes (its CPU
    /// time stops), thaws (it runs again), counts its tasks, and is removed through a handle
    /// reopened from its stored paths.
    #[test]
    fn real_freeze_thaw_stats_reopen_destroy() {
        let host = Host::detect();
        if moat_sys::process::effective_uid() != 0 || !host.missing.is_empty() {
            eprintln!(
                "skipped: needs root and every cgroup controller ({:?})",
                host.missing
            );
            return;
        }
        if host.version == Version::V1 {
            let has = |c| host.extra.iter().any(|(x, _)| *x == c);
            assert!(has(Controller::Freezer), "freezer not detected: {host:?}");
            assert!(has(Controller::Cpuacct), "cpuacct not detected: {host:?}");
        }
        let name = format!("moat-cgtest-{}", std::process::id());
        let cg = Cgroup::create(
            &host,
            &name,
            Limits {
                memory: 64 << 20,
                pids: 16,
                cpus: 0.2,
            },
        )
        .unwrap();
        let paths = cg.paths();
        if host.version == Version::V1 {
            assert_eq!(paths.len(), 5, "{paths:?}");
            let tasks = cg.delegate_self_join(0, 0).unwrap().unwrap();
            assert!(tasks
                .iter()
                .any(|t| t.starts_with("/sys/fs/cgroup/freezer")));
            assert_eq!(cg.procs_files().len(), 5);
        }
        /// Kills the busy child even when an assertion fails.
        struct Child(std::process::Child);
        impl Drop for Child {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = Child(
            std::process::Command::new("/bin/sh")
                .args(["-c", "while :; do :; done"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id() as libc::pid_t;
        cg.add(pid).unwrap();
        for p in &paths {
            assert!(read_procs(p).contains(&pid), "{p:?}");
        }
        let cpu_time = || {
            // utime + stime, fields 14 and 15 of /proc/PID/stat (after the `(comm)`).
            let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let rest = &s[s.rfind(')').unwrap() + 2..];
            let f: Vec<u64> = rest
                .split(' ')
                .skip(11)
                .take(2)
                .map(|x| x.parse().unwrap())
                .collect();
            f[0] + f[1]
        };
        let state = || {
            fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_string()))
                .unwrap()
        };
        std::thread::sleep(Duration::from_millis(300));
        let st = cg.stats();
        assert!(st.pids >= 1, "{st:?}");
        assert!(st.cpu_usec > 0, "{st:?}");
        // (memory_bytes may be 0: v1 leaves a moved task's pages charged where they were.)

        cg.freeze().unwrap();
        assert!(cg.is_frozen());
        let frozen_state = state();
        assert!(
            !frozen_state.starts_with('R'),
            "frozen child: {frozen_state}"
        );
        let (t0, c0) = (cpu_time(), cg.stats().cpu_usec);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(cpu_time(), t0, "a frozen child ran");
        assert_eq!(cg.stats().cpu_usec, c0, "a frozen cgroup used CPU");

        cg.thaw().unwrap();
        assert!(!cg.is_frozen());
        let t1 = cpu_time();
        let mut ran = false;
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(20));
            if cpu_time() > t1 {
                ran = true;
                break;
            }
        }
        assert!(ran, "the thawed child did not run ({})", state());

        // A daemon restarted: reattach from the stored paths, freeze again, kill, remove.
        let stored = cg.into_paths();
        assert_eq!(stored, paths);
        let mut again = Cgroup::open(stored.clone()).unwrap();
        assert_eq!(again.version, host.version);
        assert_eq!(again.paths(), paths);
        again.freeze().unwrap();
        again.kill_all().unwrap();
        child.0.wait().unwrap();
        again.remove().unwrap();
        for p in &paths {
            assert!(!p.exists(), "{p:?} left behind");
        }
        assert!(again.paths().is_empty());
    }

    /// The sweep on plain directories standing in for two v1 hierarchies' parents (an empty
    /// directory is removed; one with something in it is refused, as the kernel refuses a
    /// cgroup with a task or a child).
    #[test]
    fn stale_sweep_is_bounded_resumes_and_spares_the_live() {
        let root = std::env::temp_dir().join(format!("moat-cgsweep-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (p1, p2) = (root.join("memory"), root.join("pids"));
        for p in [&p1, &p2] {
            fs::create_dir_all(p.join("moat-s1-gone")).unwrap();
            fs::create_dir_all(p.join("moat-s2-live")).unwrap();
            fs::create_dir_all(p.join("other-s1")).unwrap();
            fs::write(p.join("cgroup.procs"), "").unwrap();
        }
        // Stale by its name but still in use: the removal is refused and it stays.
        fs::create_dir_all(p1.join("moat-s3-busy/child")).unwrap();
        let host = Host {
            version: Version::V1,
            parents: vec![
                (Controller::Memory, p1.clone()),
                (Controller::Pids, p2.clone()),
            ],
            missing: Vec::new(),
            v2_root: None,
            extra: vec![(Controller::Cpuacct, p1.clone())],
        };
        let asked = std::cell::RefCell::new(Vec::<String>::new());
        let is_stale = |n: &str| {
            asked.borrow_mut().push(n.to_string());
            !n.starts_with("moat-s2-")
        };
        let mut sw = StaleSweep::new();
        let every = Duration::from_secs(3600);
        assert_eq!(sw.step(&host, every, 100, is_stale), 2);
        assert!(!sw.in_pass());
        let names = |p: &Path| {
            let mut v: Vec<String> = fs::read_dir(p)
                .unwrap()
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&p1), ["moat-s2-live", "moat-s3-busy", "other-s1"]);
        assert_eq!(names(&p2), ["moat-s2-live", "other-s1"]);
        // Only `moat-*` names are asked about, and `moat-s1-gone` once: its second parent's
        // copy went with the first.
        let mut a = asked.borrow().clone();
        a.sort();
        assert_eq!(
            a,
            [
                "moat-s1-gone",
                "moat-s2-live",
                "moat-s2-live",
                "moat-s3-busy"
            ]
        );
        // Within `every` of the last pass's beginning, nothing is looked at.
        asked.borrow_mut().clear();
        fs::create_dir(p1.join("moat-s4-gone")).unwrap();
        assert_eq!(sw.step(&host, every, 100, is_stale), 0);
        assert!(asked.borrow().is_empty());

        // A budget of 3 looks at no more than 3 directories a step (opening a listing counts
        // as one), and the next step resumes: 20 stale ones go in a few steps.
        for i in 0..20 {
            fs::create_dir(p1.join(format!("moat-s9-{i}"))).unwrap();
        }
        let mut sw = StaleSweep::new();
        let mut steps = 0;
        let mut removed = 0;
        loop {
            asked.borrow_mut().clear();
            removed += sw.step(&host, every, 3, is_stale);
            assert!(asked.borrow().len() <= 3, "{:?}", asked.borrow());
            steps += 1;
            if !sw.in_pass() {
                break;
            }
            assert!(steps < 100, "the pass never ended");
        }
        assert_eq!(removed, 21);
        assert!(steps >= 9, "{steps} steps");
        assert_eq!(names(&p1), ["moat-s2-live", "moat-s3-busy", "other-s1"]);
        // With `every` passed, the next step begins a new pass.
        fs::create_dir(p2.join("moat-s5-gone")).unwrap();
        assert_eq!(sw.step(&host, Duration::ZERO, 100, is_stale), 1);
        assert_eq!(names(&p2), ["moat-s2-live", "other-s1"]);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn detect_finds_something_on_linux() {
        let h = Host::detect();
        assert_eq!(h.parents.len() + h.missing.len(), Controller::ALL.len());
    }
}
