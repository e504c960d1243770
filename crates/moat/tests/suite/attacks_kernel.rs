//! Kernel attack surface (SECURITY.md), native tier, default policy: the calls the seccomp
//! profile (`moat-policy/src/seccomp.rs`) refuses are refused inside a real sandbox, with the
//! profile's errno; the i386 and x32 ABIs kill the process with SIGSYS; signals reach neither
//! the sandbox's init nor the host.
//!
//! The attempts are made by `tests/attacks/kernel.c` (raw `syscall(2)`s, one case per
//! argument); it prints `RAN <case>` before anything else and then one `label: RESULT` line per
//! attempt, so every test checks that the attempt ran and what exactly it got. Where it can,
//! the program passes arguments for which the kernel itself would answer differently (e.g.
//! `unshare(0)` succeeds, `ioctl(/dev/null, TIOCSTI)` is `ENOTTY`, `socket(AF_PACKET)` is
//! `EPERM`): the expected result then shows that the seccomp filter decided.

use super::harness::*;
use moat_api::{ExecResult, Status};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// The directory holding the compiled `kernel` program, built once per test binary.
pub(super) fn kernel_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| compile_c("kernel")).as_deref()
}

/// Runs `/attack/kernel ARGS...` in a default sandbox; `None` when it cannot be built here.
pub(super) fn kernel(args: &[&str]) -> Option<ExecResult> {
    Some(attack(kernel_dir()?, "kernel", args, &[]))
}

/// Asserts the case ran to a normal exit 0 and printed exactly its marker, then `lines`.
pub(super) fn assert_lines<S: AsRef<str>>(r: &ExecResult, case: &str, lines: &[S]) {
    let mut want = format!("RAN {case}\n");
    for l in lines {
        want.push_str(l.as_ref());
        want.push('\n');
    }
    assert_eq!(r.stdout, want, "case {case}: {r:?}");
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert_eq!(r.signal, None, "{r:?}");
}

/// Asserts the case printed its marker (and nothing after) and was then killed by SIGSYS:
/// the filter's `SECCOMP_RET_KILL_PROCESS`, a signal from inside, so status `ok`.
fn assert_killed_by_sigsys(r: &ExecResult, case: &str) {
    assert_eq!(r.stdout, format!("RAN {case}\n"), "{r:?}");
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.signal, Some(libc::SIGSYS), "{r:?}");
    assert_eq!(r.exit_code, None, "{r:?}");
}

/// A host `sleep 30` that a test signals from inside a sandbox; killed when dropped.
pub(super) struct HostSleep(Child);

impl HostSleep {
    pub(super) fn start() -> HostSleep {
        HostSleep(
            Command::new("sleep")
                .arg("30")
                .stdin(Stdio::null())
                .spawn()
                .expect("start a host sleep"),
        )
    }

    pub(super) fn pid(&self) -> String {
        self.0.id().to_string()
    }

    /// Whether it is still running (not exited, not a zombie: `try_wait` reaps).
    pub(super) fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for HostSleep {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const NS_FLAGS: [&str; 8] = [
    "NEWNS",
    "NEWCGROUP",
    "NEWUTS",
    "NEWIPC",
    "NEWUSER",
    "NEWPID",
    "NEWNET",
    "NEWTIME",
];

#[test]
fn namespace_creation_is_refused() {
    let Some(r) = kernel(&["namespaces"]) else {
        return;
    };
    // unshare is denied outright (even the no-op `unshare(0)`, which the kernel allows);
    // clone only with a CLONE_NEW* flag; clone3 is ENOSYS so that libcs fall back to clone.
    let mut want = vec!["unshare 0: EPERM".to_string()];
    want.extend(NS_FLAGS.iter().map(|f| format!("unshare {f}: EPERM")));
    want.extend(NS_FLAGS.iter().map(|f| format!("clone {f}: EPERM")));
    want.extend([
        "clone3 NEWUSER|NEWNS: ENOSYS".to_string(),
        "clone3 plain: ENOSYS".to_string(),
        "fork: OK".to_string(),
    ]);
    assert_lines(&r, "namespaces", &want);
}

#[test]
fn mount_api_and_mount_are_refused() {
    let Some(r) = kernel(&["mount_api"]) else {
        return;
    };
    // `open_tree` without OPEN_TREE_CLONE needs no privilege and `move_mount` /
    // `mount_setattr` get invalid flags (EINVAL from the kernel): EPERM is the filter's.
    assert_lines(
        &r,
        "mount_api",
        &[
            "fsopen tmpfs: EPERM",
            "open_tree /: EPERM",
            "open_tree / CLONE: EPERM",
            "move_mount: EPERM",
            "mount_setattr: EPERM",
            "mount tmpfs: EPERM",
            "umount2 /: EPERM",
            "pivot_root: EPERM",
            "chroot /tmp: EPERM",
        ],
    );
}

#[test]
fn risky_kernel_subsystems_are_refused() {
    let Some(r) = kernel(&["denied"]) else {
        return;
    };
    // io_uring_setup(1, NULL) would be EFAULT, bpf(9999, NULL, 0) EINVAL,
    // perf_event_open(NULL) EFAULT, keyctl(9999) EOPNOTSUPP without the filter.
    assert_lines(
        &r,
        "denied",
        &[
            "io_uring_setup: EPERM",
            "io_uring_enter: EPERM",
            "io_uring_register: EPERM",
            "bpf: EPERM",
            "perf_event_open: EPERM",
            "userfaultfd: EPERM",
            "keyctl: EPERM",
            "add_key: EPERM",
            "request_key: EPERM",
            "kexec_load: EPERM",
            "kexec_file_load: EPERM",
            "init_module: EPERM",
            "finit_module: EPERM",
            "delete_module: EPERM",
        ],
    );
}

#[test]
fn ptrace_and_process_vm_readv_are_refused() {
    let Some(r) = kernel(&["ptrace"]) else {
        return;
    };
    // Against PID 1 (moat's init), and, as controls the kernel would allow, against the
    // process itself (process_vm_readv) and from a child (PTRACE_TRACEME).
    assert_lines(
        &r,
        "ptrace",
        &[
            "ptrace ATTACH 1: EPERM",
            "ptrace SEIZE 1: EPERM",
            "process_vm_readv 1: EPERM",
            "process_vm_readv self: EPERM",
            "ptrace TRACEME: EPERM",
            "kcmp: EPERM",
            "pidfd_getfd: EPERM",
        ],
    );
}

#[test]
fn personality_allows_only_the_query() {
    let Some(r) = kernel(&["personality"]) else {
        return;
    };
    // Accepted outcome in the gvisor tier: runsc 20221219 implements no personality(2)
    // and answers EINVAL to every call the filter lets through (the query); the three
    // EPERMs show the filter decided first, as in the native tier.
    let (query, now) = if gvisor() {
        (
            "personality query: EINVAL",
            "personality now: 0xffffffffffffffff",
        )
    } else {
        ("personality query: OK", "personality now: 0")
    };
    assert_lines(
        &r,
        "personality",
        &[
            "personality READ_IMPLIES_EXEC: EPERM",
            "personality ADDR_NO_RANDOMIZE: EPERM",
            "personality PER_BSD: EPERM",
            query,
            now,
        ],
    );
}

/// Accepted outcome in the gvisor tier for `int $0x80`: gVisor has no i386 ABI. The
/// instruction stops the workload's stub at the host's syscall entry (ptrace platform), the
/// host kernel runs nothing, and the sentry takes the number as an x86_64 syscall, which
/// moat's filter (installed inside gVisor, where every call is x86_64) judges like any
/// other: 20 is writev(-1, ...) (EBADF, -9), 165 is mount (the filter's EPERM, -1). No
/// i386 syscall table is reachable, so there is nothing for the architecture check to kill.
const GVISOR_INT80: [&str; 2] = ["int80: returned -9", "int80 165: returned -1"];

#[test]
fn i386_int80_syscall_kills_the_process_with_sigsys() {
    let Some(r) = kernel(&["int80"]) else {
        return;
    };
    if gvisor() {
        // Accepted outcome in the gvisor tier: see GVISOR_INT80.
        assert_lines(&r, "int80", &GVISOR_INT80);
        return;
    }
    // getpid through `int $0x80`: the architecture check kills before any rule is read.
    assert_killed_by_sigsys(&r, "int80");
}

#[test]
fn i386_int80_from_a_thread_kills_the_whole_process() {
    let Some(r) = kernel(&["int80_thread"]) else {
        return;
    };
    if gvisor() {
        // Accepted outcome in the gvisor tier: see GVISOR_INT80; the thread's call is
        // writev(-1, ...), EBADF.
        assert_lines(
            &r,
            "int80_thread",
            &[
                "int80_thread: thread returned -9",
                "int80_thread: main thread survived",
            ],
        );
        return;
    }
    // KILL_PROCESS, not KILL_THREAD: the main thread never prints that it survived.
    assert_killed_by_sigsys(&r, "int80_thread");
}

#[test]
fn x32_syscall_kills_the_process_with_sigsys() {
    let Some(r) = kernel(&["x32"]) else {
        return;
    };
    // `syscall(0x40000000 | 39)`; without the filter a kernel without the x32 ABI says
    // ENOSYS, which the program would print.
    assert_killed_by_sigsys(&r, "x32");
}

#[test]
fn terminal_injection_ioctls_are_refused() {
    let Some(r) = kernel(&["tty"]) else {
        return;
    };
    // On fd 0, whatever it is, and on /dev/null, where the kernel would say ENOTTY; the
    // high 32 bits of the request are ignored by the kernel, and so by the filter.
    assert_lines(
        &r,
        "tty",
        &[
            "TIOCSTI: EPERM",
            "TIOCLINUX: EPERM",
            "TIOCSTI high bits: EPERM",
            "TIOCLINUX high bits: EPERM",
            "TIOCSTI /dev/null: EPERM",
            "FIONREAD pipe: OK",
        ],
    );
}

#[test]
fn dangerous_socket_families_are_refused() {
    let Some(r) = kernel(&["sockets"]) else {
        return;
    };
    // Other families and netlink protocols: EAFNOSUPPORT from the filter (the kernel would
    // say EPERM for AF_PACKET, and create AF_ALG and, on this kind of VM, AF_VSOCK sockets).
    // Raw and packet IP sockets: EPERM. What programs need still works.
    assert_lines(
        &r,
        "sockets",
        &[
            "AF_PACKET raw: EAFNOSUPPORT",
            "AF_PACKET dgram: EAFNOSUPPORT",
            "AF_VSOCK stream: EAFNOSUPPORT",
            "AF_VSOCK dgram: EAFNOSUPPORT",
            "AF_ALG: EAFNOSUPPORT",
            "AF_NETLINK AUDIT: EAFNOSUPPORT",
            "AF_NETLINK KOBJECT_UEVENT: EAFNOSUPPORT",
            "AF_NETLINK SOCK_DIAG: EAFNOSUPPORT",
            "AF_NETLINK NETFILTER: EAFNOSUPPORT",
            "AF_NETLINK ROUTE: OK",
            "AF_INET raw ICMP: EPERM",
            "AF_INET raw RAW: EPERM",
            "AF_INET6 raw ICMPV6: EPERM",
            "AF_INET SOCK_PACKET: EPERM",
            "AF_BLUETOOTH: EAFNOSUPPORT",
            "socketpair AF_INET: EAFNOSUPPORT",
            "socketpair AF_UNIX: OK",
            "AF_INET stream: OK",
            "AF_INET6 dgram: OK",
        ],
    );
}

#[test]
fn signals_to_init_are_refused_and_init_survives() {
    let Some(r) = kernel(&["kill_init"]) else {
        return;
    };
    // Init runs as root of the sandbox's user namespace, the workload as uid 1000 with no
    // capabilities (and, from Landlock ABI 6, outside the workload's signal scope): EPERM
    // from the permission check, which comes before the pid namespace's rule that drops
    // signals to its init. The run ends normally, so init lived on.
    assert_lines(
        &r,
        "kill_init",
        &[
            "kill 1 0: EPERM",
            "kill 1 SIGTERM: EPERM",
            "kill 1 SIGKILL: EPERM",
            "kill 1 SIGSTOP: EPERM",
            "tgkill 1 SIGKILL: EPERM",
            "kill_init: alive",
        ],
    );
}

#[test]
fn kill_minus_one_reaches_only_the_sandbox() {
    let mut host = HostSleep::start();
    assert!(host.alive());
    let Some(r) = kernel(&["kill_all"]) else {
        return;
    };
    // kill(-1, SIGKILL) succeeds, kills the workload's own child, spares the caller and
    // init (the run ends with a clean result), and nothing on the host.
    assert_lines(
        &r,
        "kill_all",
        &["kill -1 SIGKILL: OK", "child: SIGKILL", "kill_all: alive"],
    );
    assert!(host.alive(), "a host process died of kill(-1) in a sandbox");
}

#[test]
fn host_pids_cannot_be_signalled() {
    let mut host = HostSleep::start();
    let pid = host.pid();
    let Some(r) = kernel(&["kill_host", &pid]) else {
        return;
    };
    // The host pid does not exist in the sandbox's pid namespace.
    // Accepted outcome in the gvisor tier: runsc 20221219 has no pidfd_open (ENOSYS); the
    // host pid does not exist in the sentry's pid namespace for the others either.
    let pidfd = if gvisor() {
        "pidfd_open host: ENOSYS"
    } else {
        "pidfd_open host: ESRCH"
    };
    assert_lines(
        &r,
        "kill_host",
        &[
            "kill host 0: ESRCH",
            "kill host SIGKILL: ESRCH",
            pidfd,
            "tgkill host: ESRCH",
            "kill -host SIGKILL: ESRCH",
        ],
    );
    assert!(host.alive(), "host process {pid} died");
}
