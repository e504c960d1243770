//! cgroup v1 and v2: detected at run time. A sandbox's cgroup nests under moat's own cgroup
//! (so limits put on moat, e.g. by a test or a systemd unit, bound its sandboxes too).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
}

impl Controller {
    pub const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

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
        };
        for c in Controller::ALL {
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
                        host.parents.push((c, dir));
                    } else {
                        host.missing
                            .push((c, format!("{} is not writable by this user", dir.display())));
                    }
                }
                _ => host
                    .missing
                    .push((c, format!("the `{}` controller is not mounted", c.name()))),
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
#[derive(Debug)]
pub struct Cgroup {
    pub version: Version,
    dirs: Vec<(Controller, PathBuf)>,
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
        match host.version {
            Version::V1 => {
                for (c, parent) in &host.parents {
                    let dir = parent.join(name);
                    fs::create_dir(&dir).map_err(io_err(&dir, "mkdir"))?;
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
            }
        }
        if let Err(e) = cg.apply(limits) {
            cg.destroy();
            return Err(e);
        }
        Ok(cg)
    }

    fn dir(&self, c: Controller) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(x, _)| *x == c)
            .map(|(_, d)| d.as_path())
    }

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
                    write(&d.join("cpu.cfs_period_us"), &period.to_string())?;
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
                    write(&d.join("cpu.max"), &format!("{quota} {period}"))?;
                }
            }
        }
        Ok(())
    }

    /// Moves `pid` into the cgroup (every hierarchy).
    pub fn add(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        let mut done: Vec<&Path> = Vec::new();
        for (_, d) in &self.dirs {
            if done.contains(&d.as_path()) {
                continue;
            }
            write(&d.join("cgroup.procs"), &pid.to_string())?;
            done.push(d);
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process must be written to, to join this cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect();
        v.dedup();
        v
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
        for (_, d) in &self.dirs {
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

    /// Removes the directories, waiting briefly for exiting tasks to leave.
    pub fn destroy(&mut self) {
        let mut dirs: Vec<PathBuf> = self.dirs.drain(..).map(|(_, d)| d).collect();
        dirs.dedup();
        for d in dirs {
            for attempt in 0..200 {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) if attempt < 199 => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => {}
                }
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.destroy();
    }
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

/// Removes empty sandbox cgroups left by a moat that was killed before it could clean up.
/// `is_stale(name)` decides from the directory name whether its owner is gone.
pub fn sweep_stale(host: &Host, is_stale: impl Fn(&str) -> bool) {
    let mut seen: Vec<&Path> = Vec::new();
    for (_, parent) in &host.parents {
        if seen.contains(&parent.as_path()) {
            continue;
        }
        seen.push(parent);
        let Ok(entries) = fs::read_dir(parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let procs = fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
            if name.starts_with("moat-") && procs.trim().is_empty() && is_stale(&name) {
                let _ = fs::remove_dir(e.path());
            }
        }
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

    #[test]
    fn detect_finds_something_on_linux() {
        let h = Host::detect();
        assert_eq!(h.parents.len() + h.missing.len(), Controller::ALL.len());
    }
}
