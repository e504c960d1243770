//! How every process in a sandbox is started and confined ([`Workload`]), and what the agent
//! itself drops to ([`ExecEnv::drop_to_sandbox_user`]): the sandbox user's uid and gid, no
//! capabilities, no_new_privs, rlimits, the environment, Landlock and seccomp. The native
//! tier's one-shot workload and every agent exec go through [`Workload::exec`].

use moat_policy::Policy;
use moat_proto::boot;
use moat_sys::landlock as ll;
use moat_sys::process as sys;
use moat_sys::seccomp::SockFilter;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::RawFd;

/// Reads `fd` to its end (at most a little over 64 KiB).
pub fn read_to_end(fd: RawFd) -> Vec<u8> {
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

/// What every process started in a sandbox is confined by: the policy, the Landlock ABI in
/// use and the seccomp program. init (agent mode) applies the same to itself.
#[derive(Clone, Copy)]
pub struct ExecEnv<'a> {
    pub policy: &'a Policy,
    pub landlock_abi: u32,
    pub prog: &'a [SockFilter],
    /// The sandbox's Landlock ruleset, already built (by the agent, from this policy, in
    /// this root): a process enforces it instead of building the same one again. It still
    /// gets a Landlock layer of its own, nested in the agent's (so it cannot ptrace or,
    /// from ABI 6, signal the agent); only the ~25 syscalls of building it go.
    pub ruleset: Option<&'a ll::Ruleset>,
    /// This process (the agent) runs under `prog` already, and every process it forks
    /// inherits that filter over fork and exec: a second copy of the same program would
    /// return the same verdicts (no syscall more or less is allowed), and only cost its
    /// install and a second run on every syscall.
    pub seccomp_inherited: bool,
}

impl ExecEnv<'_> {
    /// The base environment of every process: moat's clean defaults, then the policy's
    /// `env`.
    pub fn base_env(&self) -> Vec<(String, String)> {
        boot::base_env(self.policy)
    }

    /// Enforces the sandbox's Landlock ruleset on this process: the prebuilt one when there
    /// is one, else built now ([`ExecEnv::ruleset`]).
    pub fn landlock(&self) -> io::Result<()> {
        match self.ruleset {
            Some(rs) => rs.enforce(),
            None => self.build_ruleset()?.restrict_self(),
        }
    }

    /// The Landlock ruleset of the sandbox: read and execute everywhere, write only where
    /// the policy makes the file system writable.
    fn build_ruleset(&self) -> io::Result<ll::Ruleset> {
        let abi = self.landlock_abi;
        let all = ll::fs_rights_for_abi(abi);
        let scoped = if abi >= 6 {
            ll::SCOPE_SIGNAL | ll::SCOPE_ABSTRACT_UNIX_SOCKET
        } else {
            0
        };
        let mut rs = ll::Ruleset::new(all, scoped)?;
        let read = ll::ACCESS_FS_READ_FILE | ll::ACCESS_FS_READ_DIR | ll::ACCESS_FS_EXECUTE;
        if self.policy.fs.image.is_some() {
            // A template's root is the sandbox's own writable layer over shared read-only
            // files (their owners' permissions still apply); never device nodes.
            rs.allow(
                "/",
                all & !(ll::ACCESS_FS_MAKE_CHAR | ll::ACCESS_FS_MAKE_BLOCK),
            )?;
        } else {
            rs.allow("/", read)?;
        }
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
        Ok(rs)
    }

    /// init becoming the agent: the workload's uid and gid, no capabilities, no new
    /// privileges, the workload's Landlock ruleset and seccomp filter, not dumpable. From
    /// here every file operation of the agent is the sandbox user's, inside the sandbox.
    /// Returns the Landlock ruleset (when Landlock is on), for the agent's processes.
    pub fn drop_to_sandbox_user(&self, set_groups: bool) -> io::Result<Option<ll::Ruleset>> {
        let ctx = |what: &'static str| {
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        let p = self.policy;
        moat_sys::caps::clear_ambient().map_err(ctx("clear ambient capabilities"))?;
        sys::set_ids(p.process.uid, p.process.gid, set_groups).map_err(ctx("set uid/gid"))?;
        moat_sys::caps::clear_all().map_err(ctx("clear capabilities"))?;
        sys::set_no_new_privs().map_err(ctx("no_new_privs"))?;
        let ruleset = if self.landlock_abi > 0 {
            let rs = self.build_ruleset().map_err(ctx("landlock"))?;
            rs.enforce().map_err(ctx("landlock"))?;
            Some(rs)
        } else {
            None
        };
        // Changing the euid made us dumpable again.
        sys::set_not_dumpable().map_err(ctx("not dumpable"))?;
        moat_sys::seccomp::install(self.prog).map_err(ctx("install seccomp filter"))?;
        Ok(ruleset)
    }
}

/// A process started in the sandbox (the workload of `moat run`, or an agent exec),
/// between fork and exec.
pub struct Workload<'a> {
    pub env: ExecEnv<'a>,
    pub argv: &'a [String],
    /// Variables on top of [`ExecEnv::base_env`] (an exec request's `env`).
    pub extra_env: &'a BTreeMap<String, String>,
    /// Working directory; `None`: the policy's.
    pub cwd: Option<&'a str>,
    /// Clear the supplementary groups (needs CAP_SETGID: init as root of the namespace).
    pub set_groups: bool,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// stdin is a terminal to make the controlling terminal of the new session.
    pub ctty: bool,
    /// Where a failure is reported (`code\tmessage`) before exiting with `code`: 127 not
    /// found, 126 not executable, 125 anything else. Closed by a successful exec.
    pub xe_w: RawFd,
}

impl Workload<'_> {
    fn fail(&self, code: i32, msg: &str) -> ! {
        let _ = sys::write_all(self.xe_w, format!("{code}\t{msg}").as_bytes());
        sys::exit_now(code)
    }

    /// Prepares and executes the process; never returns.
    pub fn exec(&self) -> ! {
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
        if self.ctty {
            sys::set_controlling_tty(0).map_err(e("controlling terminal"))?;
        }
        let p = self.env.policy;
        match self.cwd {
            None => std::env::set_current_dir(&p.fs.workdir)
                .map_err(e("chdir to the working directory"))?,
            Some(cwd) => std::env::set_current_dir(cwd).map_err(|err| {
                let code = match err.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => 127,
                    io::ErrorKind::PermissionDenied => 126,
                    _ => 125,
                };
                (code, format!("cannot change to the directory {cwd}: {err}"))
            })?,
        }
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
        if self.env.landlock_abi > 0 {
            self.env.landlock().map_err(e("landlock"))?;
        }
        let mut env = self.env.base_env();
        for (k, v) in self.extra_env {
            if let Some(slot) = env.iter_mut().find(|(x, _)| x == k) {
                slot.1 = v.clone();
            } else {
                env.push((k.clone(), v.clone()));
            }
        }
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
        if !self.env.seccomp_inherited {
            moat_sys::seccomp::install(self.env.prog).map_err(e("install seccomp filter"))?;
        }
        Ok((path, argv, envp))
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
