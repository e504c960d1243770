//! Processes: clone into namespaces, identity, rlimits, signals, waiting, exec.

use crate::{cvt, cvt_long};
use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub use libc::{
    CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER,
    CLONE_NEWUTS,
};

/// Result of [`clone_fork`].
pub enum Forked {
    /// In the parent: the child's pid (in the parent's pid namespace) and a pidfd for it.
    Parent { pid: libc::pid_t, pidfd: OwnedFd },
    /// In the child.
    Child,
}

/// `clone(2)` with fork semantics (the child continues on a copy of the caller's stack) and
/// the given namespace flags, returning a pidfd for the child.
///
/// Refused with `Unsupported` in a multi-threaded process: like `fork`, only the calling
/// thread would exist in the child, so locks held by other threads would never be released
/// there.
pub fn clone_fork(ns_flags: libc::c_int) -> io::Result<Forked> {
    if !is_single_threaded() {
        return Err(multi_threaded());
    }
    let mut pidfd: libc::c_int = -1;
    let flags = (ns_flags | libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong;
    // Raw clone with a null stack behaves like fork(2): the child gets a copy of the address
    // space and continues here; x86_64 argument order is (flags, stack, parent_tid,
    // child_tid, tls).
    // SAFETY: single-threaded (checked above); `pidfd` outlives the call (CLONE_PIDFD writes
    // the new fd into it in the parent).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            std::ptr::null_mut::<libc::c_void>(),
            &mut pidfd as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    let pid = cvt_long(ret)?;
    if pid == 0 {
        Ok(Forked::Child)
    } else {
        // SAFETY: CLONE_PIDFD stored a fresh fd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        Ok(Forked::Parent {
            pid: pid as libc::pid_t,
            pidfd,
        })
    }
}

/// `fork(2)`. Returns 0 in the child. Refused in a multi-threaded process, like
/// [`clone_fork`].
pub fn fork() -> io::Result<libc::pid_t> {
    if !is_single_threaded() {
        return Err(multi_threaded());
    }
    // SAFETY: plain fork in a single-threaded process (checked above).
    cvt(unsafe { libc::fork() })
}

fn multi_threaded() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "refusing to fork a multi-threaded process (use a single-threaded spawner)",
    )
}

/// `unshare(2)`.
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes only an integer.
    cvt(unsafe { libc::unshare(flags) }).map(drop)
}

/// `setsid(2)`.
pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments.
    cvt(unsafe { libc::setsid() }).map(drop)
}

/// Sets real, effective and saved ids, and an empty supplementary group list.
pub fn set_ids(uid: u32, gid: u32, clear_groups: bool) -> io::Result<()> {
    if clear_groups {
        // SAFETY: a zero-length list with a null pointer is valid for setgroups.
        cvt(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    }
    // SAFETY: integers only.
    cvt(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integers only.
    cvt(unsafe { libc::setresuid(uid, uid, uid) })?;
    Ok(())
}

/// Like [`set_ids`] with an empty group list, but the real and saved uid become `real` and
/// only the effective (and so the filesystem) uid becomes `uid`: the process acts on files as
/// `uid`, while processes running as `uid` cannot signal or ptrace it (the kernel checks the
/// sender's ids against the target's real and saved uid). It can still make its children
/// `uid` through and through (`uid` is one of its ids).
pub fn set_ids_apart(real: u32, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: a zero-length list with a null pointer is valid for setgroups.
    cvt(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integers only.
    cvt(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integers only.
    cvt(unsafe { libc::setresuid(real, uid, real) })?;
    Ok(())
}

/// `setrlimit(2)` with soft = hard = `value`.
pub fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `lim` is a valid rlimit that lives across the call.
    cvt(unsafe { libc::setrlimit(resource, &lim) }).map(drop)
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }).map(drop)
}

/// Reads `PR_GET_NO_NEW_PRIVS`.
pub fn no_new_privs() -> io::Result<bool> {
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) }).map(|v| v == 1)
}

/// `prctl(PR_SET_PDEATHSIG, sig)`.
pub fn set_parent_death_signal(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) }).map(drop)
}

/// `prctl(PR_SET_DUMPABLE, 0)`: no core dumps, no ptrace by same-uid processes, /proc/PID
/// owned by root.
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }).map(drop)
}

/// Creates a pipe with `O_CLOEXEC`: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two fresh fds that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `dup2(2)`; the new fd has no `O_CLOEXEC`.
pub fn dup2(old: RawFd, new: RawFd) -> io::Result<()> {
    // SAFETY: integers only; the caller is replacing `new` on purpose.
    cvt(unsafe { libc::dup2(old, new) }).map(drop)
}

/// Closes every fd from `first` up, except `keep` (if any).
pub fn close_fds_from(first: libc::c_uint, keep: Option<libc::c_uint>) -> io::Result<()> {
    let ranges: Vec<(libc::c_uint, libc::c_uint)> = match keep {
        Some(k) if k >= first => {
            let mut v = Vec::new();
            if k > first {
                v.push((first, k - 1));
            }
            v.push((k + 1, libc::c_uint::MAX));
            v
        }
        _ => vec![(first, libc::c_uint::MAX)],
    };
    for (lo, hi) in ranges {
        close_range(lo, hi)?;
    }
    Ok(())
}

/// `close_range(lo, hi, 0)`. gVisor refuses a `hi` above `i32::MAX` (`EINVAL`, where Linux
/// takes `~0`): then the call is made again with `i32::MAX`, which covers every fd there can
/// be.
fn close_range(lo: libc::c_uint, hi: libc::c_uint) -> io::Result<()> {
    // The callers (a single-threaded child about to exec, or one cleaning up what it
    // inherited) use none of the closed fds afterwards.
    // SAFETY: close_range takes integers; closing fds this process owns is the intent.
    let r = cvt_long(unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0 as libc::c_uint) });
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && hi > i32::MAX as libc::c_uint => {
            let hi = i32::MAX as libc::c_uint;
            if lo > hi {
                return Ok(());
            }
            // SAFETY: as above.
            cvt_long(unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0 as libc::c_uint) })
                .map(drop)
        }
        r => r.map(drop),
    }
}

/// Sets or clears `O_NONBLOCK`.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL on any fd number is harmless.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL with flags derived from F_GETFL.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, new) }).map(drop)
}

/// Clears `O_CLOEXEC` so the fd survives an exec.
pub fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: integers only.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }).map(drop)
}

/// `read(2)` into `buf`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `write(2)` from `buf`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes all of `buf`, retrying on EINTR.
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match write(fd, buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How a waited-for process ended, with its resource usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitInfo {
    pub pid: libc::pid_t,
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal when it was killed by one.
    pub signal: Option<i32>,
    pub utime_us: u64,
    pub stime_us: u64,
    pub maxrss_kb: u64,
}

/// `wait4(pid, ..., flags)`. `Ok(None)` when `WNOHANG` found nothing to reap.
pub fn wait4(pid: libc::pid_t, flags: libc::c_int) -> io::Result<Option<ExitInfo>> {
    let mut status: libc::c_int = 0;
    // SAFETY: zeroed rusage is a valid value for an out-parameter of plain integers.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both out-pointers point to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
    let r = cvt(r)?;
    if r == 0 {
        return Ok(None);
    }
    let us = |t: libc::timeval| (t.tv_sec as u64) * 1_000_000 + t.tv_usec as u64;
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    Ok(Some(ExitInfo {
        pid: r,
        code,
        signal,
        utime_us: us(ru.ru_utime),
        stime_us: us(ru.ru_stime),
        maxrss_kb: ru.ru_maxrss as u64,
    }))
}

/// `kill(2)`.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: integers only.
    cvt(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// `pidfd_send_signal(2)`: signals the exact process the pidfd refers to (no pid reuse race).
pub fn pidfd_kill(pidfd: RawFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: integers and a null siginfo, as the syscall allows.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    })
    .map(drop)
}

/// Blocks the given signals in this thread and returns the previous mask.
pub fn block_signals(sigs: &[libc::c_int]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // SAFETY: `set` is a valid, initialised sigset_t.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: both pointers refer to live sigset_t values.
    cvt(unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) })?;
    Ok(old)
}

/// Restores a signal mask saved by [`block_signals`].
pub fn set_signal_mask(mask: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: `mask` is a valid sigset_t.
    cvt(unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, mask, std::ptr::null_mut()) }).map(drop)
}

/// Resets every signal disposition to the default (what exec would do for handled signals,
/// also for ignored ones).
pub fn reset_signal_dispositions() {
    // Only ignored and caught signals have a disposition to reset; the kernel lists them
    // (3 syscalls instead of one per signal: this runs in every process a sandbox starts).
    let mask = non_default_signals().unwrap_or(u64::MAX);
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP || mask & (1u64 << (sig - 1)) == 0 {
            continue;
        }
        // SAFETY: SIG_DFL is always a valid disposition; errors (invalid signals) are ignored.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

/// The signals whose disposition is not the default (`SigIgn | SigCgt` of
/// `/proc/thread-self/status`, bit `n - 1` for signal `n`); `None` when that cannot be read.
fn non_default_signals() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find_map(|l| l.strip_prefix(name))?;
        u64::from_str_radix(line.trim(), 16).ok()
    };
    Some(field("SigIgn:")? | field("SigCgt:")?)
}

/// A signalfd for the given signals (which the caller has blocked).
pub fn signalfd(sigs: &[libc::c_int]) -> io::Result<OwnedFd> {
    // SAFETY: plain data, initialised by sigemptyset below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // SAFETY: `set` is a valid, initialised sigset_t.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: `set` is valid; -1 asks for a new fd.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: signalfd returned a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal number from a signalfd, `None` when none is pending.
pub fn read_signalfd(fd: RawFd) -> io::Result<Option<i32>> {
    // SAFETY: plain data out-parameter.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is valid for `size` bytes of writes.
    let n = unsafe { libc::read(fd, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e);
    }
    if n as usize != size {
        return Ok(None);
    }
    Ok(Some(info.ssi_signo as i32))
}

/// `poll(2)` on `(fd, events)` pairs; returns revents per entry. `timeout_ms < 0` waits forever.
pub fn poll(fds: &[(RawFd, i16)], timeout_ms: i32) -> io::Result<Vec<i16>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of the given length.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![0; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents).collect())
}

/// `execve(2)`. Returns only on failure.
pub fn execve(path: &CString, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut a: Vec<*const libc::c_char> = argv.iter().map(|s| s.as_ptr()).collect();
    a.push(std::ptr::null());
    let mut e: Vec<*const libc::c_char> = envp.iter().map(|s| s.as_ptr()).collect();
    e.push(std::ptr::null());
    // SAFETY: every pointer refers to a NUL-terminated CString that outlives the call, and
    // both arrays end with a null pointer as execve requires.
    unsafe { libc::execve(path.as_ptr(), a.as_ptr(), e.as_ptr()) };
    io::Error::last_os_error()
}

/// `_exit(2)`: leaves without running atexit handlers or flushing stdio (for forked children).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// `sethostname(2)` and `setdomainname(2)` (in a fresh UTS namespace).
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`'s bytes.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    // SAFETY: pointer and length describe `name`'s bytes.
    cvt(unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// `getuid(2)` and `getgid(2)`.
pub fn real_ids() -> (u32, u32) {
    // SAFETY: no arguments, cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// `geteuid(2)`.
pub fn effective_uid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() }
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: `Ok(false)` when another holder has it.
pub fn try_lock(fd: RawFd) -> io::Result<bool> {
    // SAFETY: integers only.
    match cvt(unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether this process is the only thread in its thread group.
pub fn is_single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim() == "1"))
        })
        .unwrap_or(false)
}

/// An empty signal set.
pub fn empty_sigset() -> libc::sigset_t {
    // SAFETY: plain data, initialised by sigemptyset below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    set
}

/// Whether `fd` is an open file descriptor.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on any fd number is harmless.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Replaces this process's command line (what `/proc/PID/cmdline` shows) with `title` and
/// zeroes its environment block (`/proc/PID/environ`), in place. For a forked child that will
/// never exec: its argv and environ are still the parent's, which may name host paths or
/// secrets. The caller must not read `std::env::args()`/`vars()` afterwards.
pub fn scrub_cmdline_and_environ(title: &str) -> io::Result<()> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed /proc/self/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // /proc/PID/stat fields 48..=51 (1-based) are arg_start, arg_end, env_start, env_end; `f`
    // starts at field 3.
    let field = |n: usize| -> io::Result<usize> {
        f.get(n - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other("malformed /proc/self/stat"))
    };
    let (arg_start, arg_end, env_start, env_end) = (field(48)?, field(49)?, field(50)?, field(51)?);
    if arg_end <= arg_start || env_end < env_start {
        return Err(io::Error::other("unexpected argv/environ bounds"));
    }
    let len = arg_end - arg_start;
    let t = title.as_bytes();
    let n = t.len().min(len.saturating_sub(1));
    // [arg_start, arg_end) and [env_start, env_end) are this process's own argv and environ
    // strings on its initial stack, reported by the kernel for this very process.
    // SAFETY: that memory is mapped and writable, nothing else runs in this process (a
    // single-threaded forked child), and the caller does not read argv/environ through std.
    unsafe {
        let p = arg_start as *mut u8;
        std::ptr::write_bytes(p, 0, len);
        std::ptr::copy_nonoverlapping(t.as_ptr(), p, n);
        std::ptr::write_bytes(env_start as *mut u8, 0, env_end - env_start);
    }
    Ok(())
}

/// The CPUs `pid` (0: this thread) may run on.
pub fn affinity(pid: libc::pid_t) -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    cvt(unsafe { libc::sched_getaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) })?;
    Ok(set)
}

/// Sets the CPUs `pid` (0: this thread) may run on.
pub fn set_affinity(pid: libc::pid_t, set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    cvt(unsafe { libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), set) })
        .map(drop)
}

/// A set holding only `cpu`.
pub fn single_cpu(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu < 8 * std::mem::size_of::<libc::cpu_set_t>() {
        // SAFETY: `cpu` is within the set's bit array (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set
}

/// The CPU this thread runs on now.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: no arguments.
    let c = unsafe { libc::sched_getcpu() };
    (c >= 0).then_some(c as usize)
}

/// Whether `cpu` is in `set`.
pub fn cpu_in(set: &libc::cpu_set_t, cpu: usize) -> bool {
    // SAFETY: `cpu` is within the set's bit array (checked first).
    cpu < 8 * std::mem::size_of::<libc::cpu_set_t>() && unsafe { libc::CPU_ISSET(cpu, set) }
}

/// Closes every fd from 3 up except those in `keep` (for a long-lived child that must not
/// hold its parent's descriptors).
pub fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<libc::c_uint> = keep
        .iter()
        .filter(|&&fd| fd >= 3)
        .map(|&fd| fd as libc::c_uint)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut lo: libc::c_uint = 3;
    for k in keep.into_iter().chain(std::iter::once(libc::c_uint::MAX)) {
        if k > lo {
            let hi = if k == libc::c_uint::MAX { k } else { k - 1 };
            close_range(lo, hi)?;
        }
        lo = k.saturating_add(1);
    }
    Ok(())
}

/// Sets the disposition of `sig` to ignore (`SIG_IGN`). For `SIGCHLD` this makes the
/// kernel reap exited children at once.
pub fn ignore_signal(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: SIG_IGN is a valid disposition for every catchable signal.
    let r = unsafe { libc::signal(sig, libc::SIG_IGN) };
    if r == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `pidfd_open(2)`: a pidfd for `pid` (in the caller's pid namespace).
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: integers only.
    let fd = cvt_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) })?;
    // SAFETY: pidfd_open returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `waitid(P_PIDFD, pidfd, WEXITED | WNOHANG | __WALL)`: reaps the process if it is our
/// child and has exited. `Ok(false)` when it still runs; `ECHILD` when it is not our child.
pub fn reap_pidfd(pidfd: RawFd) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain data; zeroed is a valid out-parameter.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a live siginfo_t; P_PIDFD takes the fd as the id.
    cvt(unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::__WALL,
        )
    })?;
    // SAFETY: waitid filled `info` (or left it zeroed, where si_pid reads 0).
    Ok(unsafe { info.si_pid() } != 0)
}

/// Signals a whole process group: `kill(-pgid, sig)`. Refuses 0 and 1 (which would mean
/// "our own group" and "every process").
pub fn kill_group(pgid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    if pgid <= 1 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    kill(-pgid, sig)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of `/proc/PID/stat` times.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf takes an integer.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// The page size in bytes (`sysconf(_SC_PAGESIZE)`), the unit of `/proc/PID/stat` RSS.
pub fn page_size() -> u64 {
    // SAFETY: sysconf takes an integer.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Opens a new pseudo-terminal in the devpts instance of `ptmx` (e.g. `/dev/pts/ptmx`):
/// unlocks it and returns the master and its peer (the terminal end, opened through the
/// master with `TIOCGPTPEER`, so no path lookup can be raced), both `O_CLOEXEC`, plus the
/// terminal's number (`/dev/pts/N`).
pub fn open_pty(ptmx: &str) -> io::Result<(OwnedFd, OwnedFd, u32)> {
    let path = crate::cstr(ptmx)?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let fd = cvt(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: open returned a fresh fd that we now own.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which points to a live local.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSPTLCK, &unlock) })?;
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int into the live local.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCGPTN, &mut n) })?;
    // SAFETY: TIOCGPTPEER takes open flags as an integer and returns a fresh fd.
    let peer = cvt(unsafe {
        libc::ioctl(
            fd,
            libc::TIOCGPTPEER,
            (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as libc::c_ulong,
        )
    });
    let peer = match peer {
        // SAFETY: TIOCGPTPEER returned a fresh fd that we now own.
        Ok(peer) => unsafe { OwnedFd::from_raw_fd(peer) },
        // A kernel without TIOCGPTPEER (Linux before 4.13, gVisor before 2023): the peer by
        // its name, `N` beside `ptmx` in the same devpts instance.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
            let dir = std::path::Path::new(ptmx).parent().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "ptmx has no directory")
            })?;
            let name = dir.join(n.to_string());
            let name = crate::cstr(&name.to_string_lossy())?;
            // SAFETY: `name` is a NUL-terminated string that outlives the call.
            let peer = cvt(unsafe {
                libc::open(
                    name.as_ptr(),
                    libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
                )
            })?;
            // SAFETY: open returned a fresh fd that we now own.
            unsafe { OwnedFd::from_raw_fd(peer) }
        }
        Err(e) => return Err(e),
    };
    Ok((master, peer, n))
}

/// Sets a terminal's window size (`TIOCSWINSZ`) on either end of a pty.
pub fn set_window_size(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points to a live local.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// Makes the terminal `fd` the controlling terminal of this (session leader) process
/// (`TIOCSCTTY`).
pub fn set_controlling_tty(fd: RawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal).
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0 as libc::c_ulong) }).map(drop)
}

/// Gives the C allocator's free memory back to the kernel (`malloc_trim(0)`: the free top
/// of the heap, and the whole free pages inside it), so a long-lived process that is idle
/// holds only what it uses. A no-op where the C library has no such call.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator to the kernel; it takes
    // the allocator's own locks and touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (no privilege needed) and
/// returns the new soft limit.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live rlimit the call fills.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit that lives across the call.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disposition(sig: libc::c_int) -> libc::sighandler_t {
        // SAFETY: plain data, filled in by sigaction.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null new action only queries; `old` is a valid out-pointer.
        unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
        old.sa_sigaction
    }

    #[test]
    fn reset_signal_dispositions_resets_ignored_signals() {
        // SIGURG and SIGWINCH: nothing in the test harness uses them.
        ignore_signal(libc::SIGURG).unwrap();
        ignore_signal(libc::SIGWINCH).unwrap();
        let mask = non_default_signals().unwrap();
        assert_ne!(mask & (1 << (libc::SIGURG - 1)), 0, "{mask:x}");
        reset_signal_dispositions();
        assert_eq!(disposition(libc::SIGURG), libc::SIG_DFL);
        assert_eq!(disposition(libc::SIGWINCH), libc::SIG_DFL);
        let mask = non_default_signals().unwrap();
        assert_eq!(mask & (1 << (libc::SIGURG - 1)), 0, "{mask:x}");
    }
}
