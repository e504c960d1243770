//! The default seccomp profile as data, and a compiler from it to classic BPF (x86_64 only).
//!
//! The profile is a default-deny allowlist modelled on moby's `profiles/seccomp/default.json`
//! (the syscalls a container with no added capabilities may make), minus the calls that
//! widen the kernel attack surface or reach outside the sandbox, each listed with a reason.
//!
//! Semantics of a [`Profile`]: for a call with number `nr`, the rules for `nr` are tried in
//! the order they appear in [`Profile::rules`]; the first rule whose conditions all hold
//! ([`Rule::when`], empty = always) decides; when none does, [`Profile::default`] decides.
//! [`Profile::action_for`] is that definition written out; [`compile`] turns it into a
//! classic BPF program for `SECCOMP_SET_MODE_FILTER`, and [`evaluate`] runs such a program
//! over a `struct seccomp_data`, so tests (and `moat doctor`) can check the two agree.
//!
//! The program, in order:
//! 1. `arch != AUDIT_ARCH_X86_64` → `SECCOMP_RET_KILL_PROCESS` (kills the i386 `int 0x80`
//!    ABI, whose numbers differ and which the rules below would otherwise misread);
//! 2. `nr >= __X32_SYSCALL_BIT` (0x4000_0000) → `SECCOMP_RET_KILL_PROCESS` (the x32 ABI);
//! 3. a binary search over the syscall numbers (`jge`), whose leaves are a `ret` or, for a
//!    call with argument conditions, the inline checks of its rules. Where one side of a
//!    branch is longer than an 8-bit jump can cross, a `ja` (32-bit offset) carries it.
//!
//! Argument conditions compare an argument's low 32 bits (offset `16 + 8*i` of
//! `seccomp_data`, little endian) after a mask: every argument filtered here is an `int` or
//! `unsigned int` in the kernel (clone's flags are used as `u32` there too), so the kernel
//! ignores the high half and so must the filter: `ioctl(fd, 0xdead_0000_0000_5412)` is a
//! `TIOCSTI` and is refused like one.
//!
//! Calls absent from the x86_64 table (`vm86`, `vm86old`, `pciconfig_*`, the `*32`/`*64`
//! variants, `socketcall`, `ipc`) need no rule: they only exist in the i386 ABI, which step 1
//! kills. x86_64 entries that the kernel leaves unimplemented (`epoll_ctl_old`,
//! `set_thread_area`, `tuxcall`, `security`, ...) are not allowed and get the default.

use std::collections::BTreeMap;
use std::sync::OnceLock;

/// One classic BPF instruction; the same layout as the kernel's `struct sock_filter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// `AUDIT_ARCH_X86_64` (`EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`).
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// `AUDIT_ARCH_I386` (`EM_386 | __AUDIT_ARCH_LE`).
pub const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// `__X32_SYSCALL_BIT`: set in `nr` for a call made through the x32 ABI.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

pub const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const SECCOMP_RET_KILL_THREAD: u32 = 0x0000_0000;
pub const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
pub const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
pub const SECCOMP_RET_USER_NOTIF: u32 = 0x7FC0_0000;
pub const SECCOMP_RET_TRACE: u32 = 0x7FF0_0000;
pub const SECCOMP_RET_LOG: u32 = 0x7FFC_0000;
pub const SECCOMP_RET_ALLOW: u32 = 0x7FFF_0000;
/// Mask of the action part of a return value.
pub const SECCOMP_RET_ACTION_FULL: u32 = 0xFFFF_0000;
/// Mask of the data part (the errno for `SECCOMP_RET_ERRNO`).
pub const SECCOMP_RET_DATA: u32 = 0x0000_FFFF;

/// The kernel's limit on the length of one classic BPF program.
pub const BPF_MAXINSNS: usize = 4096;
/// `sizeof(struct seccomp_data)`.
pub const SECCOMP_DATA_SIZE: u32 = 64;
/// Offset of `nr` in `struct seccomp_data`.
pub const SECCOMP_DATA_NR: u32 = 0;
/// Offset of `arch` in `struct seccomp_data`.
pub const SECCOMP_DATA_ARCH: u32 = 4;
/// Offset of `instruction_pointer` in `struct seccomp_data`.
pub const SECCOMP_DATA_IP: u32 = 8;

/// Offset of the low 32 bits of argument `i` (0..6) in `struct seccomp_data`.
pub const fn seccomp_data_arg_lo(i: u8) -> u32 {
    16 + 8 * i as u32
}

/// Offset of the high 32 bits of argument `i` (0..6) in `struct seccomp_data`.
pub const fn seccomp_data_arg_hi(i: u8) -> u32 {
    20 + 8 * i as u32
}

// Classic BPF opcode parts (linux/bpf_common.h, linux/filter.h).
pub const BPF_LD: u16 = 0x00;
pub const BPF_LDX: u16 = 0x01;
pub const BPF_ST: u16 = 0x02;
pub const BPF_STX: u16 = 0x03;
pub const BPF_ALU: u16 = 0x04;
pub const BPF_JMP: u16 = 0x05;
pub const BPF_RET: u16 = 0x06;
pub const BPF_MISC: u16 = 0x07;
pub const BPF_W: u16 = 0x00;
pub const BPF_IMM: u16 = 0x00;
pub const BPF_ABS: u16 = 0x20;
pub const BPF_MEM: u16 = 0x60;
pub const BPF_LEN: u16 = 0x80;
pub const BPF_ADD: u16 = 0x00;
pub const BPF_SUB: u16 = 0x10;
pub const BPF_MUL: u16 = 0x20;
pub const BPF_DIV: u16 = 0x30;
pub const BPF_OR: u16 = 0x40;
pub const BPF_AND: u16 = 0x50;
pub const BPF_LSH: u16 = 0x60;
pub const BPF_RSH: u16 = 0x70;
pub const BPF_NEG: u16 = 0x80;
pub const BPF_MOD: u16 = 0x90;
pub const BPF_XOR: u16 = 0xA0;
pub const BPF_JA: u16 = 0x00;
pub const BPF_JEQ: u16 = 0x10;
pub const BPF_JGT: u16 = 0x20;
pub const BPF_JGE: u16 = 0x30;
pub const BPF_JSET: u16 = 0x40;
pub const BPF_K: u16 = 0x00;
pub const BPF_X: u16 = 0x08;
pub const BPF_A: u16 = 0x10;
pub const BPF_TAX: u16 = 0x00;
pub const BPF_TXA: u16 = 0x80;
/// Number of scratch memory words (`BPF_MEMWORDS`).
pub const BPF_MEMWORDS: u32 = 16;

pub const EPERM: u16 = 1;
pub const ENOSYS: u16 = 38;
pub const EAFNOSUPPORT: u16 = 97;

// Values the default profile filters on (x86_64 uapi).
pub const CLONE_NEWTIME: u32 = 0x0000_0080;
pub const CLONE_NEWNS: u32 = 0x0002_0000;
pub const CLONE_NEWCGROUP: u32 = 0x0200_0000;
pub const CLONE_NEWUTS: u32 = 0x0400_0000;
pub const CLONE_NEWIPC: u32 = 0x0800_0000;
pub const CLONE_NEWUSER: u32 = 0x1000_0000;
pub const CLONE_NEWPID: u32 = 0x2000_0000;
pub const CLONE_NEWNET: u32 = 0x4000_0000;
/// Every namespace flag; `clone` is allowed only with none of them set.
pub const CLONE_NEW_MASK: u32 = CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
    | CLONE_NEWTIME;
pub const TIOCSTI: u32 = 0x5412;
pub const TIOCLINUX: u32 = 0x541C;
pub const PR_SET_MM: u32 = 35;
pub const AF_UNIX: u32 = 1;
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const AF_NETLINK: u32 = 16;
pub const NETLINK_ROUTE: u32 = 0;
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const SOCK_RAW: u32 = 3;
pub const SOCK_SEQPACKET: u32 = 5;
pub const SOCK_PACKET: u32 = 10;
/// `SOCK_TYPE_MASK`: the type without `SOCK_NONBLOCK`/`SOCK_CLOEXEC`.
pub const SOCK_TYPE_MASK: u32 = 0xF;
pub const S_IFMT: u32 = 0o170_000;
pub const S_IFSOCK: u32 = 0o140_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFIFO: u32 = 0o010_000;

/// What the filter does with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the call through.
    Allow,
    /// Fail the call with this errno (at most 4095, `MAX_ERRNO`), without running it.
    Errno(u16),
    /// Kill the whole process, as by an uncatchable `SIGSYS`.
    KillProcess,
}

impl Action {
    /// The `SECCOMP_RET_*` value the filter returns for this action.
    pub const fn ret(self) -> u32 {
        match self {
            Action::Allow => SECCOMP_RET_ALLOW,
            Action::Errno(e) => SECCOMP_RET_ERRNO | e as u32,
            Action::KillProcess => SECCOMP_RET_KILL_PROCESS,
        }
    }
}

/// A condition on one argument, compared on its low 32 bits after a mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgCmp {
    /// `(low32(args[arg]) & mask) == value`.
    MaskedEq { arg: u8, mask: u32, value: u32 },
    /// `(low32(args[arg]) & mask)` is one of `values`.
    MaskedIn {
        arg: u8,
        mask: u32,
        values: &'static [u32],
    },
}

impl ArgCmp {
    /// `low32(args[arg]) == value`.
    pub const fn eq(arg: u8, value: u32) -> ArgCmp {
        ArgCmp::MaskedEq {
            arg,
            mask: u32::MAX,
            value,
        }
    }

    /// `low32(args[arg])` is one of `values`.
    pub const fn one_of(arg: u8, values: &'static [u32]) -> ArgCmp {
        ArgCmp::MaskedIn {
            arg,
            mask: u32::MAX,
            values,
        }
    }

    /// The argument index this condition reads.
    pub const fn arg(&self) -> u8 {
        match *self {
            ArgCmp::MaskedEq { arg, .. } | ArgCmp::MaskedIn { arg, .. } => arg,
        }
    }

    /// The mask applied before comparing.
    pub const fn mask(&self) -> u32 {
        match *self {
            ArgCmp::MaskedEq { mask, .. } | ArgCmp::MaskedIn { mask, .. } => mask,
        }
    }

    /// Whether the condition holds for these arguments (an index past 5 never holds).
    pub fn matches(&self, args: &[u64; 6]) -> bool {
        let Some(&raw) = args.get(usize::from(self.arg())) else {
            return false;
        };
        let v = (raw as u32) & self.mask();
        match self {
            ArgCmp::MaskedEq { value, .. } => v == *value,
            ArgCmp::MaskedIn { values, .. } => values.contains(&v),
        }
    }
}

/// One entry of a profile: what to do with a syscall, when, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The x86_64 name, as in the kernel's `syscall_64.tbl`.
    pub syscall: &'static str,
    /// The x86_64 number.
    pub nr: i64,
    pub action: Action,
    /// Conditions that must all hold; empty = unconditional.
    pub when: Vec<ArgCmp>,
    pub reason: &'static str,
}

impl Rule {
    /// A rule for the x86_64 syscall `name`; panics when the name is not in
    /// [`SYSCALLS_X86_64`] (profiles are static data, checked by the tests).
    pub fn new(
        name: &'static str,
        action: Action,
        when: Vec<ArgCmp>,
        reason: &'static str,
    ) -> Rule {
        let Some(nr) = syscall_nr(name) else {
            panic!("`{name}` is not an x86_64 syscall")
        };
        Rule {
            syscall: name,
            nr,
            action,
            when,
            reason,
        }
    }

    /// Whether every condition holds (true for an unconditional rule).
    pub fn matches(&self, args: &[u64; 6]) -> bool {
        self.when.iter().all(|c| c.matches(args))
    }
}

/// A seccomp profile: rules tried first-match per syscall, and the action for the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub default: Action,
    pub rules: Vec<Rule>,
}

impl Profile {
    /// The index of the rule that decides the call, or `None` when the default does.
    pub fn deciding_rule(&self, nr: i64, args: &[u64; 6]) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| r.nr == nr && r.matches(args))
    }

    /// The action for an x86_64 call (the architecture and x32 checks of the compiled
    /// program come before this and are not part of it).
    pub fn action_for(&self, nr: i64, args: &[u64; 6]) -> Action {
        match self.deciding_rule(nr, args) {
            Some(i) => self.rules[i].action,
            None => self.default,
        }
    }

    /// The syscalls allowed unconditionally, sorted by number.
    pub fn allowlist(&self) -> Vec<(&'static str, i64)> {
        let mut v: Vec<_> = self
            .rules
            .iter()
            .filter(|r| r.when.is_empty() && r.action == Action::Allow)
            .map(|r| (r.syscall, r.nr))
            .collect();
        v.sort_by_key(|&(_, nr)| nr);
        v
    }

    /// The syscalls with an unconditional rule whose action is not `Allow`, sorted by number.
    pub fn denylist(&self) -> Vec<(&'static str, i64, Action)> {
        let mut v: Vec<_> = self
            .rules
            .iter()
            .filter(|r| r.when.is_empty() && r.action != Action::Allow)
            .map(|r| (r.syscall, r.nr, r.action))
            .collect();
        v.sort_by_key(|&(_, nr, _)| nr);
        v
    }

    /// Checks the profile is well formed: every name and number match the x86_64 table;
    /// argument indexes are below 6; no condition compares a value outside its mask (it
    /// could never hold); a `MaskedIn` is not empty; every reason is non-empty; a
    /// syscall's rules are adjacent, with at most one unconditional rule, placed last
    /// (anything after it could never decide); no rule is shadowed by an identical earlier one.
    pub fn check(&self) -> Result<(), String> {
        let mut closed: BTreeMap<i64, usize> = BTreeMap::new();
        let mut last_nr: Option<i64> = None;
        let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
        for (i, r) in self.rules.iter().enumerate() {
            let at = format!("rule {i} ({})", r.syscall);
            match syscall_nr(r.syscall) {
                Some(nr) if nr == r.nr => {}
                Some(nr) => return Err(format!("{at}: number {} but x86_64 has {nr}", r.nr)),
                None => return Err(format!("{at}: not an x86_64 syscall")),
            }
            if r.reason.trim().is_empty() {
                return Err(format!("{at}: no reason"));
            }
            if let Action::Errno(e) = r.action {
                if e == 0 || e > 4095 {
                    return Err(format!("{at}: errno {e} out of 1..=4095"));
                }
            }
            for c in &r.when {
                if c.arg() > 5 {
                    return Err(format!("{at}: argument index {} > 5", c.arg()));
                }
                let mask = c.mask();
                match c {
                    ArgCmp::MaskedEq { value, .. } if value & !mask != 0 => {
                        return Err(format!("{at}: value {value:#x} outside mask {mask:#x}"))
                    }
                    ArgCmp::MaskedIn { values: [], .. } => {
                        return Err(format!("{at}: empty value set"))
                    }
                    ArgCmp::MaskedIn { values, .. } if values.iter().any(|v| v & !mask != 0) => {
                        return Err(format!("{at}: a value outside mask {mask:#x}"))
                    }
                    _ => {}
                }
            }
            if let Some(j) = closed.get(&r.nr) {
                return Err(format!(
                    "{at}: after unconditional rule {j}, can never decide"
                ));
            }
            if last_nr != Some(r.nr) && seen.contains_key(&r.nr) {
                return Err(format!("{at}: rules for {} are not adjacent", r.syscall));
            }
            if self.rules[..i]
                .iter()
                .any(|p| p.nr == r.nr && p.when == r.when)
            {
                return Err(format!("{at}: same conditions as an earlier rule"));
            }
            if r.when.is_empty() {
                closed.insert(r.nr, i);
            }
            seen.insert(r.nr, i);
            last_nr = Some(r.nr);
        }
        Ok(())
    }
}

/// Syscalls allowed unconditionally, grouped by purpose; the group's text is each rule's reason.
const ALLOW_GROUPS: &[(&str, &[&str])] = &[
    (
        "I/O on descriptors the process already holds",
        &[
            "read",
            "write",
            "readv",
            "writev",
            "pread64",
            "pwrite64",
            "preadv",
            "pwritev",
            "preadv2",
            "pwritev2",
            "lseek",
            "close",
            "close_range",
            "dup",
            "dup2",
            "dup3",
            "fcntl",
            "flock",
            "fsync",
            "fdatasync",
            "syncfs",
            "sync",
            "sync_file_range",
            "fallocate",
            "ftruncate",
            "truncate",
            "fadvise64",
            "readahead",
            "cachestat",
            "sendfile",
            "copy_file_range",
            "splice",
            "tee",
            "vmsplice",
        ],
    ),
    (
        "paths and file metadata: the mount namespace and Landlock bound what is reachable",
        &[
            "open",
            "openat",
            "openat2",
            "creat",
            "access",
            "faccessat",
            "faccessat2",
            "stat",
            "fstat",
            "lstat",
            "newfstatat",
            "statx",
            "statfs",
            "fstatfs",
            "chdir",
            "fchdir",
            "getcwd",
            "getdents",
            "getdents64",
            "mkdir",
            "mkdirat",
            "rmdir",
            "rename",
            "renameat",
            "renameat2",
            "link",
            "linkat",
            "unlink",
            "unlinkat",
            "symlink",
            "symlinkat",
            "readlink",
            "readlinkat",
            "chmod",
            "fchmod",
            "fchmodat",
            "fchmodat2",
            "chown",
            "fchown",
            "lchown",
            "fchownat",
            "umask",
            "utime",
            "utimes",
            "utimensat",
            "futimesat",
        ],
    ),
    (
        "extended attributes (trusted.* and security.* need capabilities the sandbox lacks)",
        &[
            "getxattr",
            "lgetxattr",
            "fgetxattr",
            "getxattrat",
            "listxattr",
            "llistxattr",
            "flistxattr",
            "listxattrat",
            "setxattr",
            "lsetxattr",
            "fsetxattr",
            "setxattrat",
            "removexattr",
            "lremovexattr",
            "fremovexattr",
            "removexattrat",
        ],
    ),
    (
        "memory management of the process's own address space",
        &[
            "brk",
            "mmap",
            "munmap",
            "mremap",
            "mprotect",
            "madvise",
            "mincore",
            "msync",
            "mlock",
            "mlock2",
            "mlockall",
            "munlock",
            "munlockall",
            "remap_file_pages",
            "pkey_alloc",
            "pkey_free",
            "pkey_mprotect",
            "map_shadow_stack",
            "mseal",
            "memfd_create",
            "memfd_secret",
        ],
    ),
    (
        "process lifecycle and resource limits (the pid namespace bounds which processes)",
        &[
            "fork",
            "vfork",
            "execve",
            "execveat",
            "exit",
            "exit_group",
            "wait4",
            "waitid",
            "getpid",
            "getppid",
            "getpgid",
            "setpgid",
            "getpgrp",
            "getsid",
            "setsid",
            "getrlimit",
            "setrlimit",
            "prlimit64",
            "getrusage",
            "times",
        ],
    ),
    (
        "threads and synchronisation (glibc, musl, Go, Node.js, the JVM)",
        &[
            "gettid",
            "set_tid_address",
            "set_robust_list",
            "get_robust_list",
            "rseq",
            "arch_prctl",
            "futex",
            "futex_waitv",
            "futex_wake",
            "futex_wait",
            "futex_requeue",
            "membarrier",
        ],
    ),
    (
        "scheduling and priorities (within the caller's rights; cgroups bound the CPU)",
        &[
            "sched_yield",
            "sched_getaffinity",
            "sched_setaffinity",
            "sched_getattr",
            "sched_setattr",
            "sched_getparam",
            "sched_setparam",
            "sched_getscheduler",
            "sched_setscheduler",
            "sched_get_priority_max",
            "sched_get_priority_min",
            "sched_rr_get_interval",
            "getpriority",
            "setpriority",
            "ioprio_get",
        ],
    ),
    (
        "signals: the pid namespace and Landlock scoping contain whom they reach",
        &[
            "rt_sigaction",
            "rt_sigprocmask",
            "rt_sigreturn",
            "rt_sigpending",
            "rt_sigsuspend",
            "rt_sigtimedwait",
            "rt_sigqueueinfo",
            "rt_tgsigqueueinfo",
            "sigaltstack",
            "pause",
            "restart_syscall",
            "kill",
            "tkill",
            "tgkill",
            "pidfd_open",
            "pidfd_send_signal",
            "process_mrelease",
        ],
    ),
    (
        "credentials: with no capabilities a process can only keep or drop its ids",
        &[
            "getuid",
            "geteuid",
            "getgid",
            "getegid",
            "getresuid",
            "getresgid",
            "getgroups",
            "setuid",
            "setgid",
            "setreuid",
            "setregid",
            "setresuid",
            "setresgid",
            "setfsuid",
            "setfsgid",
            "setgroups",
            "capget",
            "capset",
        ],
    ),
    (
        "clocks and timers (reading clocks; setting them is denied below)",
        &[
            "clock_gettime",
            "clock_getres",
            "clock_nanosleep",
            "nanosleep",
            "gettimeofday",
            "time",
            "alarm",
            "getitimer",
            "setitimer",
            "timer_create",
            "timer_settime",
            "timer_gettime",
            "timer_getoverrun",
            "timer_delete",
            "timerfd_create",
            "timerfd_settime",
            "timerfd_gettime",
        ],
    ),
    (
        "pipes and event notification",
        &[
            "pipe",
            "pipe2",
            "poll",
            "ppoll",
            "select",
            "pselect6",
            "epoll_create",
            "epoll_create1",
            "epoll_ctl",
            "epoll_wait",
            "epoll_pwait",
            "epoll_pwait2",
            "eventfd",
            "eventfd2",
            "signalfd",
            "signalfd4",
            "inotify_init",
            "inotify_init1",
            "inotify_add_watch",
            "inotify_rm_watch",
            "fanotify_mark",
        ],
    ),
    (
        "socket operations; which sockets can exist is filtered at socket() and socketpair()",
        &[
            "bind",
            "connect",
            "listen",
            "accept",
            "accept4",
            "shutdown",
            "getsockname",
            "getpeername",
            "getsockopt",
            "setsockopt",
            "sendto",
            "recvfrom",
            "sendmsg",
            "recvmsg",
            "sendmmsg",
            "recvmmsg",
        ],
    ),
    (
        "System V and POSIX IPC, private to the sandbox's IPC namespace",
        &[
            "shmget",
            "shmat",
            "shmdt",
            "shmctl",
            "semget",
            "semop",
            "semtimedop",
            "semctl",
            "msgget",
            "msgsnd",
            "msgrcv",
            "msgctl",
            "mq_open",
            "mq_unlink",
            "mq_timedsend",
            "mq_timedreceive",
            "mq_notify",
            "mq_getsetattr",
        ],
    ),
    (
        "Linux native AIO (libaio, databases); unlike io_uring it runs under seccomp per call",
        &[
            "io_setup",
            "io_destroy",
            "io_submit",
            "io_cancel",
            "io_getevents",
            "io_pgetevents",
        ],
    ),
    (
        "system information and randomness",
        &["uname", "sysinfo", "getcpu", "getrandom"],
    ),
    (
        "self-restriction: a process can only narrow its own rights further",
        &[
            "seccomp",
            "landlock_create_ruleset",
            "landlock_add_rule",
            "landlock_restrict_self",
        ],
    ),
    (
        "read-only mount listing, scoped to the sandbox's own mount namespace",
        &["statmount", "listmount"],
    ),
    (
        "entered by the kernel's uretprobe trampoline; blocking it would kill probed processes",
        &["uretprobe"],
    ),
];

/// Syscalls denied with `EPERM`, grouped by reason. Most are absent from moby's default
/// profile too; the rest (`ptrace`, `adjtimex`, `modify_ldt`, ...) are listed with why moat
/// is stricter.
const DENY_GROUPS: &[(&str, &[&str])] = &[
    (
        "io_uring: its operations bypass seccomp, and it has a long record of kernel exploits",
        &["io_uring_setup", "io_uring_enter", "io_uring_register"],
    ),
    (
        "userfaultfd lets an exploit pause the kernel on a page fault to win a race",
        &["userfaultfd"],
    ),
    ("eBPF: a large in-kernel attack surface", &["bpf"]),
    (
        "perf events: kernel attack surface and side channels",
        &["perf_event_open"],
    ),
    (
        "kernel keyrings are not namespaced: keys could leak between sandboxes and the host",
        &["keyctl", "add_key", "request_key"],
    ),
    (
        "replacing the running kernel",
        &["kexec_load", "kexec_file_load"],
    ),
    (
        "loading or unloading kernel modules",
        &["init_module", "finit_module", "delete_module"],
    ),
    (
        "inspecting or tampering with other processes (ptrace, their memory, their fds)",
        &[
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "process_madvise",
            "kcmp",
            "pidfd_getfd",
        ],
    ),
    (
        "creating or entering namespaces: the sandbox's namespaces are set up by moat only",
        &["unshare", "setns"],
    ),
    (
        "changing the mount tree or the root: the sandbox's file system view is fixed",
        &[
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "open_tree",
            "open_tree_attr",
            "move_mount",
            "mount_setattr",
        ],
    ),
    (
        "file handles open files by inode, bypassing path checks (the 'shocker' escape)",
        &["open_by_handle_at", "name_to_handle_at"],
    ),
    (
        "host-wide state: swap, reboot, kernel log, accounting, quotas, the tty",
        &[
            "swapon",
            "swapoff",
            "reboot",
            "syslog",
            "acct",
            "quotactl",
            "quotactl_fd",
            "vhangup",
        ],
    ),
    (
        "setting or tuning the system clock",
        &["settimeofday", "clock_settime", "clock_adjtime", "adjtimex"],
    ),
    (
        "host and domain names (denied even though the UTS namespace is private)",
        &["sethostname", "setdomainname"],
    ),
    ("direct I/O port access", &["iopl", "ioperm"]),
    (
        "LDT changes: 16-bit segments, a recurring source of kernel bugs",
        &["modify_ldt"],
    ),
    (
        "obsolete or removed interfaces",
        &[
            "uselib",
            "ustat",
            "sysfs",
            "_sysctl",
            "create_module",
            "get_kernel_syms",
            "query_module",
            "nfsservctl",
            "lookup_dcookie",
        ],
    ),
    (
        "NUMA memory policy and page migration (moby requires CAP_SYS_NICE)",
        &[
            "mbind",
            "set_mempolicy",
            "get_mempolicy",
            "set_mempolicy_home_node",
            "migrate_pages",
            "move_pages",
        ],
    ),
    (
        "fanotify watches whole file systems and mounts",
        &["fanotify_init"],
    ),
    (
        "LSM attribute interface: not needed by programs, new kernel surface",
        &["lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules"],
    ),
    (
        "I/O priority can be set for other processes and users",
        &["ioprio_set"],
    ),
];

/// `personality` values moby allows: `PER_LINUX`, `UNAME26`, `UNAME26|ADDR_NO_RANDOMIZE`,
/// and the query `0xffffffff`.
const PERSONALITY_ALLOWED: &[u32] = &[0x0, 0x0008, 0x0002_0008, 0xFFFF_FFFF];
const INET_FAMILIES: &[u32] = &[AF_INET, AF_INET6];
const INET_TYPES: &[u32] = &[SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET];
/// Node types `mknod` may create: regular files, FIFOs (`mkfifo`), sockets (0 = regular).
const MKNOD_TYPES: &[u32] = &[0, S_IFREG, S_IFIFO, S_IFSOCK];

/// The default profile: default `Errno(EPERM)`, the allowlist, the argument-filtered
/// calls, and an explicit rule for every denied call, each with its reason.
pub fn default_profile() -> Profile {
    use Action::{Allow, Errno};
    let deny = Errno(EPERM);
    let mut rules = Vec::new();
    for (reason, names) in ALLOW_GROUPS {
        for name in *names {
            rules.push(Rule::new(name, Allow, vec![], reason));
        }
    }

    rules.push(Rule::new(
        "clone",
        Allow,
        vec![ArgCmp::MaskedEq {
            arg: 0,
            mask: CLONE_NEW_MASK,
            value: 0,
        }],
        "processes and threads without new namespaces (on x86_64 flags are argument 0)",
    ));
    rules.push(Rule::new(
        "clone",
        deny,
        vec![],
        "clone with a CLONE_NEW* flag would create namespaces (CLONE_NEWTIME, 0x80, is also \
         an invalid exit signal for clone)",
    ));
    rules.push(Rule::new(
        "clone3",
        Errno(ENOSYS),
        vec![],
        "its flags sit in memory a filter cannot read; ENOSYS makes glibc fall back to clone",
    ));

    rules.push(Rule::new(
        "ioctl",
        deny,
        vec![ArgCmp::eq(1, TIOCSTI)],
        "TIOCSTI pushes input into a terminal: it could type commands into the user's shell",
    ));
    rules.push(Rule::new(
        "ioctl",
        deny,
        vec![ArgCmp::eq(1, TIOCLINUX)],
        "TIOCLINUX can inject console selections as input, like TIOCSTI",
    ));
    rules.push(Rule::new(
        "ioctl",
        Allow,
        vec![],
        "device and terminal control on descriptors the process holds",
    ));

    rules.push(Rule::new(
        "prctl",
        deny,
        vec![ArgCmp::eq(0, PR_SET_MM)],
        "PR_SET_MM rewrites the process's memory map layout (needs CAP_SYS_RESOURCE anyway)",
    ));
    rules.push(Rule::new(
        "prctl",
        Allow,
        vec![],
        "process attributes: names, no_new_privs, dumpable, child subreaper, ...",
    ));

    rules.push(Rule::new(
        "personality",
        Allow,
        vec![ArgCmp::one_of(0, PERSONALITY_ALLOWED)],
        "Linux personality, UNAME26, and the query (moby's list)",
    ));
    rules.push(Rule::new(
        "personality",
        deny,
        vec![],
        "other execution domains change how the kernel treats the process (READ_IMPLIES_EXEC, ...)",
    ));

    rules.push(Rule::new(
        "socket",
        Allow,
        vec![ArgCmp::eq(0, AF_UNIX)],
        "Unix domain sockets",
    ));
    rules.push(Rule::new(
        "socket",
        Allow,
        vec![
            ArgCmp::one_of(0, INET_FAMILIES),
            ArgCmp::MaskedIn {
                arg: 1,
                mask: SOCK_TYPE_MASK,
                values: INET_TYPES,
            },
        ],
        "IPv4 and IPv6 stream, datagram and seqpacket sockets (egress is policed outside)",
    ));
    rules.push(Rule::new(
        "socket",
        deny,
        vec![ArgCmp::one_of(0, INET_FAMILIES)],
        "raw and packet IP sockets (and rarer types) see and forge traffic",
    ));
    rules.push(Rule::new(
        "socket",
        Allow,
        vec![ArgCmp::eq(0, AF_NETLINK), ArgCmp::eq(2, NETLINK_ROUTE)],
        "NETLINK_ROUTE: getifaddrs and if_nameindex read interfaces through it",
    ));
    rules.push(Rule::new(
        "socket",
        Errno(EAFNOSUPPORT),
        vec![],
        "every other family (AF_PACKET, AF_VSOCK, AF_ALG, AF_BLUETOOTH, other netlink \
         protocols, ...) is kernel surface programs do not need; EAFNOSUPPORT reads as \
         'not built in'",
    ));
    rules.push(Rule::new(
        "socketpair",
        Allow,
        vec![ArgCmp::eq(0, AF_UNIX)],
        "connected Unix socket pairs",
    ));
    rules.push(Rule::new(
        "socketpair",
        Errno(EAFNOSUPPORT),
        vec![],
        "only AF_UNIX supports socketpair",
    ));

    for (name, mode_arg) in [("mknod", 1), ("mknodat", 2)] {
        rules.push(Rule::new(
            name,
            Allow,
            vec![ArgCmp::MaskedIn {
                arg: mode_arg,
                mask: S_IFMT,
                values: MKNOD_TYPES,
            }],
            "FIFOs (mkfifo), sockets and regular files",
        ));
        rules.push(Rule::new(
            name,
            deny,
            vec![],
            "device nodes: access to host devices",
        ));
    }

    for (reason, names) in DENY_GROUPS {
        for name in *names {
            rules.push(Rule::new(name, deny, vec![], reason));
        }
    }

    Profile {
        default: deny,
        rules,
    }
}

/// [`compile`]`(&`[`default_profile`]`())`, computed once.
pub fn default_program() -> Vec<BpfInsn> {
    static PROGRAM: OnceLock<Vec<BpfInsn>> = OnceLock::new();
    PROGRAM.get_or_init(|| compile(&default_profile())).clone()
}

const fn stmt(code: u16, k: u32) -> BpfInsn {
    BpfInsn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> BpfInsn {
    BpfInsn { code, jt, jf, k }
}

const fn ret(k: u32) -> BpfInsn {
    stmt(BPF_RET | BPF_K, k)
}

/// A jump offset that must fit the 8-bit `jt`/`jf` fields.
fn short(offset: usize) -> u8 {
    match u8::try_from(offset) {
        Ok(o) => o,
        Err(_) => panic!("seccomp: a rule's conditions are too long for an 8-bit jump ({offset})"),
    }
}

/// What the search tree ends in for a range of numbers.
enum Leaf {
    /// Return this value.
    Ret(u32),
    /// The inline checks of one syscall's conditional rules.
    Code(Vec<BpfInsn>),
}

/// Compiles a profile to classic BPF for `SECCOMP_SET_MODE_FILTER` on x86_64 (see the
/// module documentation for the shape). Rules for numbers outside `0..0x4000_0000` can
/// never match (the program kills those calls first) and are skipped. Panics on an
/// argument index above 5 or a condition list too long for 8-bit jumps; [`Profile::check`]
/// reports the first.
pub fn compile(p: &Profile) -> Vec<BpfInsn> {
    let mut prog = vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_ARCH),
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        ret(SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_NR),
        jump(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, 0, 1),
        ret(SECCOMP_RET_KILL_PROCESS),
    ];
    let default = p.default.ret();

    let mut by_nr: BTreeMap<u32, Vec<&Rule>> = BTreeMap::new();
    for r in &p.rules {
        if let Ok(nr) = u32::try_from(r.nr) {
            if nr < X32_SYSCALL_BIT {
                by_nr.entry(nr).or_default().push(r);
            }
        }
    }

    // Intervals of numbers, each starting at `.0` and running to the next one's start.
    let mut intervals: Vec<(u32, Leaf)> = Vec::new();
    // Adjacent ranges that return the same value merge.
    fn push(start: u32, leaf: Leaf, intervals: &mut Vec<(u32, Leaf)>) {
        if let (Leaf::Ret(v), Some((_, Leaf::Ret(last)))) = (&leaf, intervals.last()) {
            if v == last {
                return;
            }
        }
        intervals.push((start, leaf));
    }
    let mut next = 0u32;
    for (nr, rules) in by_nr {
        if nr > next {
            push(next, Leaf::Ret(default), &mut intervals);
        }
        // Rules after the first unconditional one can never decide.
        let mut conditional: Vec<&Rule> = Vec::new();
        let mut fallback = default;
        for r in rules {
            if r.when.is_empty() {
                fallback = r.action.ret();
                break;
            }
            conditional.push(r);
        }
        // A trailing conditional rule with the fallback's action changes nothing.
        while conditional
            .last()
            .is_some_and(|r| r.action.ret() == fallback)
        {
            conditional.pop();
        }
        let leaf = if conditional.is_empty() {
            Leaf::Ret(fallback)
        } else {
            let mut code = Vec::new();
            for r in conditional {
                code.extend(rule_block(r));
            }
            code.push(ret(fallback));
            Leaf::Code(code)
        };
        push(nr, leaf, &mut intervals);
        next = nr + 1;
    }
    if next < X32_SYSCALL_BIT {
        push(next, Leaf::Ret(default), &mut intervals);
    }
    prog.extend(search_tree(&intervals));
    prog
}

/// The checks of one conditional rule: each condition loads its argument's low word, masks
/// it and compares; a failed condition jumps past the block (to the next rule), and when
/// all hold the block returns the rule's action.
fn rule_block(r: &Rule) -> Vec<BpfInsn> {
    /// Which field of an instruction is the "condition failed" exit, patched at the end.
    #[derive(Clone, Copy, PartialEq)]
    enum Exit {
        None,
        Jf,
        Ja,
    }
    let mut code: Vec<(BpfInsn, Exit)> = Vec::new();
    for c in &r.when {
        let arg = c.arg();
        assert!(
            arg <= 5,
            "seccomp: argument index {arg} > 5 in a {} rule",
            r.syscall
        );
        let values: &[u32] = match c {
            ArgCmp::MaskedEq { value, .. } => std::slice::from_ref(value),
            ArgCmp::MaskedIn { values, .. } => values,
        };
        if values.is_empty() {
            // An empty set never matches.
            code.push((stmt(BPF_JMP | BPF_JA, 0), Exit::Ja));
            continue;
        }
        code.push((
            stmt(BPF_LD | BPF_W | BPF_ABS, seccomp_data_arg_lo(arg)),
            Exit::None,
        ));
        if c.mask() != u32::MAX {
            code.push((stmt(BPF_ALU | BPF_AND | BPF_K, c.mask()), Exit::None));
        }
        for (i, &v) in values.iter().enumerate() {
            let others = values.len() - 1 - i;
            if others == 0 {
                code.push((jump(BPF_JMP | BPF_JEQ | BPF_K, v, 0, 0), Exit::Jf));
            } else {
                // Equal: skip the remaining comparisons, on to the next condition.
                code.push((
                    jump(BPF_JMP | BPF_JEQ | BPF_K, v, short(others), 0),
                    Exit::None,
                ));
            }
        }
    }
    code.push((ret(r.action.ret()), Exit::None));
    let end = code.len();
    code.into_iter()
        .enumerate()
        .map(|(i, (mut insn, exit))| {
            // The exit is the first instruction after this block: the next rule.
            let off = end - (i + 1);
            match exit {
                Exit::None => {}
                Exit::Jf => insn.jf = short(off),
                Exit::Ja => insn.k = u32::try_from(off).unwrap_or(u32::MAX),
            }
            insn
        })
        .collect()
}

/// A balanced binary search over interval starts with `jge`; each leaf is inline code that
/// ends in `ret`, so every jump is forward and local to its subtree.
fn search_tree(intervals: &[(u32, Leaf)]) -> Vec<BpfInsn> {
    match intervals {
        [] => vec![],
        [(_, Leaf::Ret(v))] => vec![ret(*v)],
        [(_, Leaf::Code(code))] => code.clone(),
        _ => {
            let mid = intervals.len() / 2;
            let below = search_tree(&intervals[..mid]);
            let above = search_tree(&intervals[mid..]);
            let k = intervals[mid].0;
            let mut out = Vec::with_capacity(below.len() + above.len() + 2);
            match u8::try_from(below.len()) {
                Ok(skip) => out.push(jump(BPF_JMP | BPF_JGE | BPF_K, k, skip, 0)),
                Err(_) => {
                    // Too far for `jt`: branch onto a `ja`, whose offset has 32 bits.
                    out.push(jump(BPF_JMP | BPF_JGE | BPF_K, k, 0, 1));
                    let far = u32::try_from(below.len()).unwrap_or(u32::MAX);
                    out.push(stmt(BPF_JMP | BPF_JA, far));
                }
            }
            out.extend(below);
            out.extend(above);
            out
        }
    }
}

/// Builds the `struct seccomp_data` the kernel hands a filter (instruction pointer 0).
fn seccomp_data(arch: u32, nr: i32, args: [u64; 6]) -> [u8; 64] {
    let mut d = [0u8; 64];
    d[0..4].copy_from_slice(&nr.to_le_bytes());
    d[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        d[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    d
}

/// Whether `code` is an instruction the kernel's seccomp checker accepts
/// (`seccomp_check_filter` plus `bpf_check_classic`), with a valid `k` for its kind.
fn insn_ok(insn: &BpfInsn) -> Result<(), &'static str> {
    let k = insn.k;
    match insn.code {
        c if c == BPF_LD | BPF_W | BPF_ABS => {
            if k & 3 != 0 || k >= SECCOMP_DATA_SIZE {
                return Err("load outside struct seccomp_data or unaligned");
            }
        }
        c if c == BPF_LD | BPF_W | BPF_LEN
            || c == BPF_LDX | BPF_W | BPF_LEN
            || c == BPF_LD | BPF_IMM
            || c == BPF_LDX | BPF_IMM
            || c == BPF_RET | BPF_K
            || c == BPF_RET | BPF_A
            || c == BPF_MISC | BPF_TAX
            || c == BPF_MISC | BPF_TXA
            || c == BPF_ALU | BPF_NEG => {}
        c if c == BPF_LD | BPF_MEM || c == BPF_LDX | BPF_MEM || c == BPF_ST || c == BPF_STX => {
            if k >= BPF_MEMWORDS {
                return Err("scratch memory index out of range");
            }
        }
        c if c & 0x07 == BPF_ALU => {
            let op = c & 0xF0;
            if c & !0xFF != 0 || !matches!(op, 0x00..=0x70 | 0x90 | 0xA0) {
                return Err("unknown ALU operation");
            }
            if c & BPF_X == 0 {
                if (op == BPF_DIV || op == BPF_MOD) && k == 0 {
                    return Err("division by constant zero");
                }
                if (op == BPF_LSH || op == BPF_RSH) && k >= 32 {
                    return Err("shift by 32 or more");
                }
            }
        }
        c if c & 0x07 == BPF_JMP => {
            let op = c & 0xF0;
            if c & !0xFF != 0 || !matches!(op, BPF_JA | BPF_JEQ | BPF_JGT | BPF_JGE | BPF_JSET) {
                return Err("unknown jump");
            }
            if op == BPF_JA && c != BPF_JMP | BPF_JA {
                return Err("unknown jump");
            }
        }
        _ => return Err("instruction not allowed in a seccomp filter"),
    }
    Ok(())
}

/// Checks a program the way the kernel does before accepting it: 1 to 4096 instructions,
/// only instructions seccomp permits, loads inside `struct seccomp_data`, every jump
/// target inside the program, and a `ret` last (so no path runs off the end). Scratch
/// memory reads before writes, which the kernel also refuses, are not tracked.
pub fn validate(prog: &[BpfInsn]) -> Result<(), String> {
    if prog.is_empty() || prog.len() > BPF_MAXINSNS {
        return Err(format!("length {} outside 1..={BPF_MAXINSNS}", prog.len()));
    }
    for (pc, insn) in prog.iter().enumerate() {
        insn_ok(insn).map_err(|e| format!("instruction {pc} {insn:?}: {e}"))?;
        if insn.code & 0x07 == BPF_JMP {
            let rest = prog.len() - pc - 1;
            let in_range = if insn.code == BPF_JMP | BPF_JA {
                (insn.k as usize) < rest
            } else {
                usize::from(insn.jt) < rest && usize::from(insn.jf) < rest
            };
            if !in_range {
                return Err(format!("instruction {pc} {insn:?}: jumps past the end"));
            }
        }
    }
    match prog.last() {
        Some(l) if l.code & 0x07 == BPF_RET => Ok(()),
        _ => Err("the last instruction is not a ret".into()),
    }
}

/// Runs a classic seccomp BPF program over the `struct seccomp_data` of an x86_64-layout
/// call (instruction pointer 0) and returns its `SECCOMP_RET_*` value. An instruction the
/// kernel would have refused, or running off the end, yields `SECCOMP_RET_KILL_PROCESS`;
/// division by a zero `X` yields 0 (`SECCOMP_RET_KILL_THREAD`) as in the kernel.
pub fn evaluate(prog: &[BpfInsn], arch: u32, nr: i32, args: [u64; 6]) -> u32 {
    const KILL: u32 = SECCOMP_RET_KILL_PROCESS;
    let data = seccomp_data(arch, nr, args);
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; BPF_MEMWORDS as usize];
    let mut pc = 0usize;
    // Jumps only go forward, so this loop runs at most `prog.len()` times.
    while let Some(insn) = prog.get(pc) {
        if insn_ok(insn).is_err() {
            return KILL;
        }
        pc += 1;
        let k = insn.k;
        let code = insn.code;
        match code & 0x07 {
            BPF_RET => return if code & BPF_A != 0 { a } else { k },
            BPF_LD | BPF_LDX => {
                let v = match code & 0xE0 {
                    BPF_ABS => {
                        let o = k as usize;
                        u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]])
                    }
                    BPF_LEN => SECCOMP_DATA_SIZE,
                    BPF_MEM => mem[k as usize],
                    _ => k,
                };
                if code & 0x07 == BPF_LD {
                    a = v;
                } else {
                    x = v;
                }
            }
            BPF_ST => mem[k as usize] = a,
            BPF_STX => mem[k as usize] = x,
            BPF_MISC => {
                if code & BPF_TXA != 0 {
                    a = x;
                } else {
                    x = a;
                }
            }
            BPF_ALU => {
                let src = if code & BPF_X != 0 { x } else { k };
                a = match code & 0xF0 {
                    BPF_ADD => a.wrapping_add(src),
                    BPF_SUB => a.wrapping_sub(src),
                    BPF_MUL => a.wrapping_mul(src),
                    BPF_DIV | BPF_MOD if src == 0 => return SECCOMP_RET_KILL_THREAD,
                    BPF_DIV => a / src,
                    BPF_MOD => a % src,
                    BPF_OR => a | src,
                    BPF_AND => a & src,
                    BPF_LSH => a.checked_shl(src).unwrap_or(0),
                    BPF_RSH => a.checked_shr(src).unwrap_or(0),
                    BPF_NEG => a.wrapping_neg(),
                    _ => a ^ src,
                };
            }
            _ => {
                // BPF_JMP
                let src = if code & BPF_X != 0 { x } else { k };
                let offset = match code & 0xF0 {
                    BPF_JA => k as usize,
                    op => {
                        let taken = match op {
                            BPF_JEQ => a == src,
                            BPF_JGT => a > src,
                            BPF_JGE => a >= src,
                            _ => a & src != 0,
                        };
                        usize::from(if taken { insn.jt } else { insn.jf })
                    }
                };
                pc = match pc.checked_add(offset) {
                    Some(p) => p,
                    None => return KILL,
                };
            }
        }
    }
    KILL
}

/// The x86_64 number of a syscall name.
pub fn syscall_nr(name: &str) -> Option<i64> {
    SYSCALLS_X86_64
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, nr)| nr)
}

/// The x86_64 name of a syscall number.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALLS_X86_64
        .iter()
        .find(|&&(_, n)| n == nr)
        .map(|&(name, _)| name)
}

/// Every x86_64 syscall (`common` and `64` ABI entries of the kernel's
/// `arch/x86/entry/syscalls/syscall_64.tbl`, through Linux 6.18), sorted by number.
pub const SYSCALLS_X86_64: &[(&str, i64)] = &[
    ("read", 0),
    ("write", 1),
    ("open", 2),
    ("close", 3),
    ("stat", 4),
    ("fstat", 5),
    ("lstat", 6),
    ("poll", 7),
    ("lseek", 8),
    ("mmap", 9),
    ("mprotect", 10),
    ("munmap", 11),
    ("brk", 12),
    ("rt_sigaction", 13),
    ("rt_sigprocmask", 14),
    ("rt_sigreturn", 15),
    ("ioctl", 16),
    ("pread64", 17),
    ("pwrite64", 18),
    ("readv", 19),
    ("writev", 20),
    ("access", 21),
    ("pipe", 22),
    ("select", 23),
    ("sched_yield", 24),
    ("mremap", 25),
    ("msync", 26),
    ("mincore", 27),
    ("madvise", 28),
    ("shmget", 29),
    ("shmat", 30),
    ("shmctl", 31),
    ("dup", 32),
    ("dup2", 33),
    ("pause", 34),
    ("nanosleep", 35),
    ("getitimer", 36),
    ("alarm", 37),
    ("setitimer", 38),
    ("getpid", 39),
    ("sendfile", 40),
    ("socket", 41),
    ("connect", 42),
    ("accept", 43),
    ("sendto", 44),
    ("recvfrom", 45),
    ("sendmsg", 46),
    ("recvmsg", 47),
    ("shutdown", 48),
    ("bind", 49),
    ("listen", 50),
    ("getsockname", 51),
    ("getpeername", 52),
    ("socketpair", 53),
    ("setsockopt", 54),
    ("getsockopt", 55),
    ("clone", 56),
    ("fork", 57),
    ("vfork", 58),
    ("execve", 59),
    ("exit", 60),
    ("wait4", 61),
    ("kill", 62),
    ("uname", 63),
    ("semget", 64),
    ("semop", 65),
    ("semctl", 66),
    ("shmdt", 67),
    ("msgget", 68),
    ("msgsnd", 69),
    ("msgrcv", 70),
    ("msgctl", 71),
    ("fcntl", 72),
    ("flock", 73),
    ("fsync", 74),
    ("fdatasync", 75),
    ("truncate", 76),
    ("ftruncate", 77),
    ("getdents", 78),
    ("getcwd", 79),
    ("chdir", 80),
    ("fchdir", 81),
    ("rename", 82),
    ("mkdir", 83),
    ("rmdir", 84),
    ("creat", 85),
    ("link", 86),
    ("unlink", 87),
    ("symlink", 88),
    ("readlink", 89),
    ("chmod", 90),
    ("fchmod", 91),
    ("chown", 92),
    ("fchown", 93),
    ("lchown", 94),
    ("umask", 95),
    ("gettimeofday", 96),
    ("getrlimit", 97),
    ("getrusage", 98),
    ("sysinfo", 99),
    ("times", 100),
    ("ptrace", 101),
    ("getuid", 102),
    ("syslog", 103),
    ("getgid", 104),
    ("setuid", 105),
    ("setgid", 106),
    ("geteuid", 107),
    ("getegid", 108),
    ("setpgid", 109),
    ("getppid", 110),
    ("getpgrp", 111),
    ("setsid", 112),
    ("setreuid", 113),
    ("setregid", 114),
    ("getgroups", 115),
    ("setgroups", 116),
    ("setresuid", 117),
    ("getresuid", 118),
    ("setresgid", 119),
    ("getresgid", 120),
    ("getpgid", 121),
    ("setfsuid", 122),
    ("setfsgid", 123),
    ("getsid", 124),
    ("capget", 125),
    ("capset", 126),
    ("rt_sigpending", 127),
    ("rt_sigtimedwait", 128),
    ("rt_sigqueueinfo", 129),
    ("rt_sigsuspend", 130),
    ("sigaltstack", 131),
    ("utime", 132),
    ("mknod", 133),
    ("uselib", 134),
    ("personality", 135),
    ("ustat", 136),
    ("statfs", 137),
    ("fstatfs", 138),
    ("sysfs", 139),
    ("getpriority", 140),
    ("setpriority", 141),
    ("sched_setparam", 142),
    ("sched_getparam", 143),
    ("sched_setscheduler", 144),
    ("sched_getscheduler", 145),
    ("sched_get_priority_max", 146),
    ("sched_get_priority_min", 147),
    ("sched_rr_get_interval", 148),
    ("mlock", 149),
    ("munlock", 150),
    ("mlockall", 151),
    ("munlockall", 152),
    ("vhangup", 153),
    ("modify_ldt", 154),
    ("pivot_root", 155),
    ("_sysctl", 156),
    ("prctl", 157),
    ("arch_prctl", 158),
    ("adjtimex", 159),
    ("setrlimit", 160),
    ("chroot", 161),
    ("sync", 162),
    ("acct", 163),
    ("settimeofday", 164),
    ("mount", 165),
    ("umount2", 166),
    ("swapon", 167),
    ("swapoff", 168),
    ("reboot", 169),
    ("sethostname", 170),
    ("setdomainname", 171),
    ("iopl", 172),
    ("ioperm", 173),
    ("create_module", 174),
    ("init_module", 175),
    ("delete_module", 176),
    ("get_kernel_syms", 177),
    ("query_module", 178),
    ("quotactl", 179),
    ("nfsservctl", 180),
    ("getpmsg", 181),
    ("putpmsg", 182),
    ("afs_syscall", 183),
    ("tuxcall", 184),
    ("security", 185),
    ("gettid", 186),
    ("readahead", 187),
    ("setxattr", 188),
    ("lsetxattr", 189),
    ("fsetxattr", 190),
    ("getxattr", 191),
    ("lgetxattr", 192),
    ("fgetxattr", 193),
    ("listxattr", 194),
    ("llistxattr", 195),
    ("flistxattr", 196),
    ("removexattr", 197),
    ("lremovexattr", 198),
    ("fremovexattr", 199),
    ("tkill", 200),
    ("time", 201),
    ("futex", 202),
    ("sched_setaffinity", 203),
    ("sched_getaffinity", 204),
    ("set_thread_area", 205),
    ("io_setup", 206),
    ("io_destroy", 207),
    ("io_getevents", 208),
    ("io_submit", 209),
    ("io_cancel", 210),
    ("get_thread_area", 211),
    ("lookup_dcookie", 212),
    ("epoll_create", 213),
    ("epoll_ctl_old", 214),
    ("epoll_wait_old", 215),
    ("remap_file_pages", 216),
    ("getdents64", 217),
    ("set_tid_address", 218),
    ("restart_syscall", 219),
    ("semtimedop", 220),
    ("fadvise64", 221),
    ("timer_create", 222),
    ("timer_settime", 223),
    ("timer_gettime", 224),
    ("timer_getoverrun", 225),
    ("timer_delete", 226),
    ("clock_settime", 227),
    ("clock_gettime", 228),
    ("clock_getres", 229),
    ("clock_nanosleep", 230),
    ("exit_group", 231),
    ("epoll_wait", 232),
    ("epoll_ctl", 233),
    ("tgkill", 234),
    ("utimes", 235),
    ("vserver", 236),
    ("mbind", 237),
    ("set_mempolicy", 238),
    ("get_mempolicy", 239),
    ("mq_open", 240),
    ("mq_unlink", 241),
    ("mq_timedsend", 242),
    ("mq_timedreceive", 243),
    ("mq_notify", 244),
    ("mq_getsetattr", 245),
    ("kexec_load", 246),
    ("waitid", 247),
    ("add_key", 248),
    ("request_key", 249),
    ("keyctl", 250),
    ("ioprio_set", 251),
    ("ioprio_get", 252),
    ("inotify_init", 253),
    ("inotify_add_watch", 254),
    ("inotify_rm_watch", 255),
    ("migrate_pages", 256),
    ("openat", 257),
    ("mkdirat", 258),
    ("mknodat", 259),
    ("fchownat", 260),
    ("futimesat", 261),
    ("newfstatat", 262),
    ("unlinkat", 263),
    ("renameat", 264),
    ("linkat", 265),
    ("symlinkat", 266),
    ("readlinkat", 267),
    ("fchmodat", 268),
    ("faccessat", 269),
    ("pselect6", 270),
    ("ppoll", 271),
    ("unshare", 272),
    ("set_robust_list", 273),
    ("get_robust_list", 274),
    ("splice", 275),
    ("tee", 276),
    ("sync_file_range", 277),
    ("vmsplice", 278),
    ("move_pages", 279),
    ("utimensat", 280),
    ("epoll_pwait", 281),
    ("signalfd", 282),
    ("timerfd_create", 283),
    ("eventfd", 284),
    ("fallocate", 285),
    ("timerfd_settime", 286),
    ("timerfd_gettime", 287),
    ("accept4", 288),
    ("signalfd4", 289),
    ("eventfd2", 290),
    ("epoll_create1", 291),
    ("dup3", 292),
    ("pipe2", 293),
    ("inotify_init1", 294),
    ("preadv", 295),
    ("pwritev", 296),
    ("rt_tgsigqueueinfo", 297),
    ("perf_event_open", 298),
    ("recvmmsg", 299),
    ("fanotify_init", 300),
    ("fanotify_mark", 301),
    ("prlimit64", 302),
    ("name_to_handle_at", 303),
    ("open_by_handle_at", 304),
    ("clock_adjtime", 305),
    ("syncfs", 306),
    ("sendmmsg", 307),
    ("setns", 308),
    ("getcpu", 309),
    ("process_vm_readv", 310),
    ("process_vm_writev", 311),
    ("kcmp", 312),
    ("finit_module", 313),
    ("sched_setattr", 314),
    ("sched_getattr", 315),
    ("renameat2", 316),
    ("seccomp", 317),
    ("getrandom", 318),
    ("memfd_create", 319),
    ("kexec_file_load", 320),
    ("bpf", 321),
    ("execveat", 322),
    ("userfaultfd", 323),
    ("membarrier", 324),
    ("mlock2", 325),
    ("copy_file_range", 326),
    ("preadv2", 327),
    ("pwritev2", 328),
    ("pkey_mprotect", 329),
    ("pkey_alloc", 330),
    ("pkey_free", 331),
    ("statx", 332),
    ("io_pgetevents", 333),
    ("rseq", 334),
    ("uretprobe", 335),
    ("uprobe", 336),
    ("pidfd_send_signal", 424),
    ("io_uring_setup", 425),
    ("io_uring_enter", 426),
    ("io_uring_register", 427),
    ("open_tree", 428),
    ("move_mount", 429),
    ("fsopen", 430),
    ("fsconfig", 431),
    ("fsmount", 432),
    ("fspick", 433),
    ("pidfd_open", 434),
    ("clone3", 435),
    ("close_range", 436),
    ("openat2", 437),
    ("pidfd_getfd", 438),
    ("faccessat2", 439),
    ("process_madvise", 440),
    ("epoll_pwait2", 441),
    ("mount_setattr", 442),
    ("quotactl_fd", 443),
    ("landlock_create_ruleset", 444),
    ("landlock_add_rule", 445),
    ("landlock_restrict_self", 446),
    ("memfd_secret", 447),
    ("process_mrelease", 448),
    ("futex_waitv", 449),
    ("set_mempolicy_home_node", 450),
    ("cachestat", 451),
    ("fchmodat2", 452),
    ("map_shadow_stack", 453),
    ("futex_wake", 454),
    ("futex_wait", 455),
    ("futex_requeue", 456),
    ("statmount", 457),
    ("listmount", 458),
    ("lsm_get_self_attr", 459),
    ("lsm_set_self_attr", 460),
    ("lsm_list_modules", 461),
    ("mseal", 462),
    ("setxattrat", 463),
    ("getxattrat", 464),
    ("listxattrat", 465),
    ("removexattrat", 466),
    ("open_tree_attr", 467),
    ("file_getattr", 468),
    ("file_setattr", 469),
    ("listns", 470),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const ZERO: [u64; 6] = [0; 6];
    const ERRNO_EPERM: u32 = SECCOMP_RET_ERRNO | EPERM as u32;
    const ERRNO_ENOSYS: u32 = SECCOMP_RET_ERRNO | ENOSYS as u32;
    const ERRNO_EAFNOSUPPORT: u32 = SECCOMP_RET_ERRNO | EAFNOSUPPORT as u32;

    fn nr(name: &str) -> i32 {
        match syscall_nr(name) {
            Some(n) => n as i32,
            None => panic!("no syscall {name}"),
        }
    }

    fn run(name: &str, args: [u64; 6]) -> u32 {
        evaluate(&default_program(), AUDIT_ARCH_X86_64, nr(name), args)
    }

    fn args(a: &[u64]) -> [u64; 6] {
        let mut v = [0u64; 6];
        v[..a.len()].copy_from_slice(a);
        v
    }

    #[test]
    fn syscall_table_is_sorted_unique_and_matches_the_kernel() {
        let mut names = BTreeSet::new();
        for w in SYSCALLS_X86_64.windows(2) {
            assert!(w[0].1 < w[1].1, "{:?} then {:?}", w[0], w[1]);
        }
        for (name, _) in SYSCALLS_X86_64 {
            assert!(names.insert(*name), "{name} twice");
        }
        let expect = [
            ("read", 0),
            ("write", 1),
            ("open", 2),
            ("close", 3),
            ("ioctl", 16),
            ("socket", 41),
            ("socketpair", 53),
            ("clone", 56),
            ("fork", 57),
            ("vfork", 58),
            ("execve", 59),
            ("ptrace", 101),
            ("personality", 135),
            ("pivot_root", 155),
            ("_sysctl", 156),
            ("prctl", 157),
            ("arch_prctl", 158),
            ("chroot", 161),
            ("mount", 165),
            ("umount2", 166),
            ("futex", 202),
            ("openat", 257),
            ("mknodat", 259),
            ("unshare", 272),
            ("setns", 308),
            ("seccomp", 317),
            ("bpf", 321),
            ("execveat", 322),
            ("userfaultfd", 323),
            ("rseq", 334),
            ("uretprobe", 335),
            ("pidfd_send_signal", 424),
            ("io_uring_setup", 425),
            ("io_uring_enter", 426),
            ("io_uring_register", 427),
            ("open_tree", 428),
            ("move_mount", 429),
            ("fsopen", 430),
            ("fsconfig", 431),
            ("fsmount", 432),
            ("fspick", 433),
            ("pidfd_open", 434),
            ("clone3", 435),
            ("close_range", 436),
            ("openat2", 437),
            ("pidfd_getfd", 438),
            ("faccessat2", 439),
            ("process_madvise", 440),
            ("epoll_pwait2", 441),
            ("mount_setattr", 442),
            ("quotactl_fd", 443),
            ("landlock_create_ruleset", 444),
            ("landlock_add_rule", 445),
            ("landlock_restrict_self", 446),
            ("memfd_secret", 447),
            ("process_mrelease", 448),
            ("futex_waitv", 449),
            ("set_mempolicy_home_node", 450),
            ("cachestat", 451),
            ("fchmodat2", 452),
            ("map_shadow_stack", 453),
            ("futex_wake", 454),
            ("futex_wait", 455),
            ("futex_requeue", 456),
            ("statmount", 457),
            ("listmount", 458),
            ("lsm_get_self_attr", 459),
            ("lsm_set_self_attr", 460),
            ("lsm_list_modules", 461),
            ("mseal", 462),
            ("setxattrat", 463),
            ("getxattrat", 464),
            ("listxattrat", 465),
            ("removexattrat", 466),
            ("open_tree_attr", 467),
        ];
        for (name, n) in expect {
            assert_eq!(syscall_nr(name), Some(n), "{name}");
            assert_eq!(syscall_name(n), Some(name), "{n}");
        }
        assert_eq!(syscall_nr("vm86"), None);
        assert_eq!(syscall_nr("socketcall"), None);
    }

    #[test]
    fn constants() {
        assert_eq!(CLONE_NEW_MASK, 0x7E02_0080);
        assert_eq!(Action::Errno(EPERM).ret(), 0x0005_0001);
        assert_eq!(Action::Allow.ret(), SECCOMP_RET_ALLOW);
        assert_eq!(Action::KillProcess.ret(), SECCOMP_RET_KILL_PROCESS);
        assert_eq!(seccomp_data_arg_lo(1), 24);
        assert_eq!(seccomp_data_arg_hi(5), 60);
    }

    #[test]
    fn default_profile_is_well_formed() {
        let p = default_profile();
        assert_eq!(p.check(), Ok(()));
        assert_eq!(p.default, Action::Errno(EPERM));
        for r in &p.rules {
            assert!(!r.reason.is_empty(), "{}", r.syscall);
        }
    }

    #[test]
    fn allowlist_is_sorted_and_deduplicated() {
        let p = default_profile();
        let allow = p.allowlist();
        let names: BTreeSet<_> = allow.iter().map(|&(n, _)| n).collect();
        let nrs: BTreeSet<_> = allow.iter().map(|&(_, n)| n).collect();
        assert_eq!(names.len(), allow.len(), "a name allowed twice");
        assert_eq!(nrs.len(), allow.len(), "a number allowed twice");
        assert!(allow.windows(2).all(|w| w[0].1 < w[1].1));
        // Every syscall with an unconditional rule has exactly one.
        let mut uncond = BTreeSet::new();
        for r in p.rules.iter().filter(|r| r.when.is_empty()) {
            assert!(uncond.insert(r.syscall), "{} twice", r.syscall);
        }
        // Nothing is both allowed and explicitly denied.
        for (name, _, _) in p.denylist() {
            assert!(!names.contains(name), "{name} allowed and denied");
        }
    }

    #[test]
    fn other_architectures_are_killed() {
        let prog = default_program();
        for arch in [AUDIT_ARCH_I386, 0xC000_00B7, 0x4000_0028, 0] {
            for n in [0, 1, 3, 11, 59, 102, 120, 999, -1] {
                assert_eq!(
                    evaluate(&prog, arch, n, ZERO),
                    SECCOMP_RET_KILL_PROCESS,
                    "arch {arch:#x} nr {n}"
                );
            }
        }
    }

    #[test]
    fn x32_calls_are_killed() {
        let prog = default_program();
        for n in [0, 1, 3, 59, 512, 520, 545, 999] {
            let x32 = (n as u32 | X32_SYSCALL_BIT) as i32;
            assert_eq!(
                evaluate(&prog, AUDIT_ARCH_X86_64, x32, ZERO),
                SECCOMP_RET_KILL_PROCESS,
                "{n}"
            );
        }
        assert_eq!(
            evaluate(&prog, AUDIT_ARCH_X86_64, -1, ZERO),
            SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn ordinary_calls_are_allowed() {
        for name in ["read", "write", "execve", "futex", "exit_group", "rseq"] {
            assert_eq!(run(name, ZERO), SECCOMP_RET_ALLOW, "{name}");
        }
        // pthread_create (glibc): VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
        assert_eq!(run("clone", args(&[0x003D_0F00])), SECCOMP_RET_ALLOW);
        // fork(): CHILD_SETTID|CHILD_CLEARTID|SIGCHLD
        assert_eq!(run("clone", args(&[0x0120_0011])), SECCOMP_RET_ALLOW);
        // posix_spawn: VM|VFORK|SIGCHLD
        assert_eq!(run("clone", args(&[0x4111])), SECCOMP_RET_ALLOW);
        // The kernel reads clone's flags as 32 bits; high bits do not matter.
        assert_eq!(
            run("clone", args(&[0xFFFF_FFFF_0000_0011])),
            SECCOMP_RET_ALLOW
        );
    }

    #[test]
    fn clone_with_namespace_flags_is_denied() {
        for flag in [
            CLONE_NEWNS,
            CLONE_NEWCGROUP,
            CLONE_NEWUTS,
            CLONE_NEWIPC,
            CLONE_NEWUSER,
            CLONE_NEWPID,
            CLONE_NEWNET,
            CLONE_NEWTIME,
        ] {
            let flags = u64::from(flag | 0x11);
            assert_eq!(run("clone", args(&[flags])), ERRNO_EPERM, "{flag:#x}");
            assert_eq!(
                run("clone", args(&[flags | 0xDEAD_0000_0000_0000])),
                ERRNO_EPERM
            );
        }
        assert_eq!(run("clone3", ZERO), ERRNO_ENOSYS);
        assert_eq!(run("clone3", args(&[0x1000, 88])), ERRNO_ENOSYS);
    }

    #[test]
    fn terminal_injection_ioctls_are_denied_on_the_low_32_bits() {
        for cmd in [0x5412, 0xDEAD_0000_0000_5412, 0x541C, 0xFFFF_FFFF_0000_541C] {
            assert_eq!(run("ioctl", args(&[0, cmd])), ERRNO_EPERM, "{cmd:#x}");
        }
        for cmd in [0x5401, 0x5413, 0x5402, 0x0001_5412, 0x8000_5412, 0] {
            assert_eq!(run("ioctl", args(&[1, cmd])), SECCOMP_RET_ALLOW, "{cmd:#x}");
        }
    }

    #[test]
    fn socket_families_and_types() {
        let cloexec = 0x80000;
        let nonblock = 0x800;
        let cases: &[(&[u64], u32)] = &[
            (&[17, 3, 0x0300], ERRNO_EAFNOSUPPORT),     // AF_PACKET
            (&[40, 1, 0], ERRNO_EAFNOSUPPORT),          // AF_VSOCK
            (&[38, 5, 0], ERRNO_EAFNOSUPPORT),          // AF_ALG
            (&[31, 1, 0], ERRNO_EAFNOSUPPORT),          // AF_BLUETOOTH
            (&[0, 1, 0], ERRNO_EAFNOSUPPORT),           // AF_UNSPEC
            (&[16, 3, 9], ERRNO_EAFNOSUPPORT),          // NETLINK_AUDIT
            (&[16, 3, 12], ERRNO_EAFNOSUPPORT),         // NETLINK_NETFILTER
            (&[16, 3 | cloexec, 0], SECCOMP_RET_ALLOW), // NETLINK_ROUTE
            (&[2, 3, 1], ERRNO_EPERM),                  // raw ICMP
            (&[10, 3, 58], ERRNO_EPERM),                // raw ICMPv6
            (&[2, 3 | cloexec, 255], ERRNO_EPERM),
            (&[2, 10, 0x0300], ERRNO_EPERM), // SOCK_PACKET
            (&[2, 4, 0], ERRNO_EPERM),       // SOCK_RDM
            (&[2, 6, 0], ERRNO_EPERM),       // SOCK_DCCP
            (&[2, 1 | cloexec, 0], SECCOMP_RET_ALLOW),
            (&[2, 2 | nonblock | cloexec, 0], SECCOMP_RET_ALLOW),
            (&[10, 1, 6], SECCOMP_RET_ALLOW),
            (&[10, 2, 17], SECCOMP_RET_ALLOW),
            (&[2, 2, 1], SECCOMP_RET_ALLOW), // ping socket
            (&[2, 5, 132], SECCOMP_RET_ALLOW),
            (&[1, 1 | cloexec, 0], SECCOMP_RET_ALLOW),
            (&[1, 2, 0], SECCOMP_RET_ALLOW),
            (&[1, 5, 0], SECCOMP_RET_ALLOW),
            // high halves are ignored: still AF_INET + SOCK_RAW
            (&[0xFFFF_FFFF_0000_0002, 0x1_0000_0003, 0], ERRNO_EPERM),
            (&[0x1_0000_0011, 3, 0], ERRNO_EAFNOSUPPORT),
        ];
        for (a, want) in cases {
            assert_eq!(run("socket", args(a)), *want, "socket{a:x?}");
        }
        assert_eq!(run("socketpair", args(&[1, 1, 0])), SECCOMP_RET_ALLOW);
        assert_eq!(run("socketpair", args(&[2, 1, 0])), ERRNO_EAFNOSUPPORT);
    }

    #[test]
    fn prctl_personality_and_mknod() {
        assert_eq!(run("prctl", args(&[35, 1])), ERRNO_EPERM); // PR_SET_MM
        for option in [15, 16, 38, 4, 36, 1] {
            assert_eq!(run("prctl", args(&[option])), SECCOMP_RET_ALLOW, "{option}");
        }
        for persona in [0, 8, 0x20008, 0xFFFF_FFFF] {
            assert_eq!(run("personality", args(&[persona])), SECCOMP_RET_ALLOW);
        }
        for persona in [0x20000, 0x40_0000, 0x0400_0000, 1] {
            assert_eq!(run("personality", args(&[persona])), ERRNO_EPERM);
        }
        let fifo = u64::from(S_IFIFO | 0o644);
        assert_eq!(run("mknodat", args(&[0, 0, fifo])), SECCOMP_RET_ALLOW);
        assert_eq!(run("mknod", args(&[0, fifo])), SECCOMP_RET_ALLOW);
        let chr = 0o020_644; // S_IFCHR
        let blk = 0o060_644; // S_IFBLK
        for mode in [chr, blk] {
            assert_eq!(run("mknodat", args(&[0, 0, mode, 0x103])), ERRNO_EPERM);
            assert_eq!(run("mknod", args(&[0, mode, 0x103])), ERRNO_EPERM);
        }
    }

    #[test]
    fn dangerous_calls_are_denied() {
        for name in [
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "bpf",
            "userfaultfd",
            "unshare",
            "setns",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "open_tree",
            "open_tree_attr",
            "move_mount",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
            "keyctl",
            "add_key",
            "request_key",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "pidfd_getfd",
            "kcmp",
            "perf_event_open",
            "kexec_load",
            "init_module",
            "finit_module",
            "open_by_handle_at",
            "name_to_handle_at",
            "reboot",
            "swapon",
            "syslog",
            "settimeofday",
            "clock_settime",
            "adjtimex",
            "iopl",
            "ioperm",
            "modify_ldt",
            "mbind",
            "set_mempolicy",
            "migrate_pages",
            "move_pages",
            "fanotify_init",
            "lsm_list_modules",
            "ioprio_set",
            "sethostname",
        ] {
            assert_eq!(run(name, ZERO), ERRNO_EPERM, "{name}");
            assert_eq!(run(name, [u64::MAX; 6]), ERRNO_EPERM, "{name}");
        }
        let prog = default_program();
        for n in [999, 471, 500, 547, 1000, 0x3FFF_FFFF, 181, 184, 205] {
            assert_eq!(
                evaluate(&prog, AUDIT_ARCH_X86_64, n, ZERO),
                ERRNO_EPERM,
                "{n}"
            );
        }
    }

    #[test]
    fn essentials_are_allowed() {
        let essentials = [
            "read",
            "write",
            "open",
            "openat",
            "openat2",
            "close",
            "close_range",
            "fstat",
            "stat",
            "lstat",
            "newfstatat",
            "statx",
            "lseek",
            "mmap",
            "mprotect",
            "munmap",
            "mremap",
            "madvise",
            "brk",
            "mlock",
            "mseal",
            "map_shadow_stack",
            "rt_sigaction",
            "rt_sigprocmask",
            "rt_sigreturn",
            "sigaltstack",
            "pread64",
            "pwrite64",
            "readv",
            "writev",
            "access",
            "faccessat2",
            "pipe",
            "pipe2",
            "select",
            "pselect6",
            "poll",
            "ppoll",
            "epoll_create1",
            "epoll_ctl",
            "epoll_wait",
            "epoll_pwait",
            "epoll_pwait2",
            "eventfd2",
            "timerfd_create",
            "timerfd_settime",
            "signalfd4",
            "inotify_init1",
            "inotify_add_watch",
            "inotify_rm_watch",
            "sched_yield",
            "sched_getaffinity",
            "nanosleep",
            "clock_nanosleep",
            "clock_gettime",
            "gettimeofday",
            "getpid",
            "getppid",
            "gettid",
            "sendfile",
            "copy_file_range",
            "splice",
            "tee",
            "connect",
            "accept",
            "accept4",
            "sendto",
            "recvfrom",
            "sendmsg",
            "recvmsg",
            "shutdown",
            "bind",
            "listen",
            "getsockname",
            "getpeername",
            "setsockopt",
            "getsockopt",
            "fork",
            "vfork",
            "execve",
            "execveat",
            "exit",
            "exit_group",
            "wait4",
            "waitid",
            "kill",
            "tkill",
            "tgkill",
            "uname",
            "fcntl",
            "flock",
            "fsync",
            "fdatasync",
            "truncate",
            "ftruncate",
            "getdents64",
            "getcwd",
            "chdir",
            "fchdir",
            "rename",
            "renameat2",
            "mkdir",
            "rmdir",
            "unlink",
            "unlinkat",
            "link",
            "symlink",
            "readlink",
            "readlinkat",
            "chmod",
            "fchmod",
            "fchmodat2",
            "chown",
            "umask",
            "utimensat",
            "getrlimit",
            "setrlimit",
            "prlimit64",
            "getrusage",
            "getuid",
            "geteuid",
            "getgid",
            "getegid",
            "getgroups",
            "setuid",
            "setgid",
            "setgroups",
            "setresuid",
            "setresgid",
            "setpgid",
            "getpgrp",
            "setsid",
            "futex",
            "futex_waitv",
            "set_robust_list",
            "get_robust_list",
            "set_tid_address",
            "rseq",
            "membarrier",
            "arch_prctl",
            "getrandom",
            "memfd_create",
            "pidfd_open",
            "pidfd_send_signal",
            "sysinfo",
            "times",
            "statfs",
            "fstatfs",
            "fadvise64",
            "fallocate",
            "shmget",
            "shmat",
            "semget",
            "capget",
            "capset",
            "seccomp",
            "landlock_create_ruleset",
            "landlock_add_rule",
            "landlock_restrict_self",
            "prctl",
            "ioctl",
            "clone",
            "personality",
            "umask",
            "getxattr",
            "io_setup",
        ];
        let p = default_profile();
        for name in essentials {
            let n = nr(name);
            assert_eq!(p.action_for(i64::from(n), &ZERO), Action::Allow, "{name}");
            assert_eq!(run(name, ZERO), SECCOMP_RET_ALLOW, "{name}");
        }
        assert_eq!(run("socket", args(&[1, 1])), SECCOMP_RET_ALLOW);
        assert_eq!(run("socket", args(&[2, 1])), SECCOMP_RET_ALLOW);
        assert_eq!(run("socket", args(&[10, 2])), SECCOMP_RET_ALLOW);
    }

    /// Candidate values for each argument some rule of `nr` reads.
    fn candidates(p: &Profile, nr: i64) -> Vec<(usize, Vec<u64>)> {
        let mut by_arg: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        for r in p.rules.iter().filter(|r| r.nr == nr) {
            for c in &r.when {
                let set = by_arg.entry(usize::from(c.arg())).or_default();
                let values: Vec<u32> = match c {
                    ArgCmp::MaskedEq { value, .. } => vec![*value],
                    ArgCmp::MaskedIn { values, .. } => values.to_vec(),
                };
                for v in values {
                    for w in [v, v | (!c.mask() & 0x0008_0800), v.wrapping_add(1)] {
                        set.insert(u64::from(w));
                        set.insert(u64::from(w) | 0xDEAD_BEEF_0000_0000);
                    }
                }
                set.extend([0, 3, u64::from(c.mask()), u64::from(u32::MAX)]);
            }
        }
        by_arg
            .into_iter()
            .map(|(a, s)| (a, s.into_iter().collect()))
            .collect()
    }

    /// Arguments for which rule `i` is the one that decides, if any exist among the candidates.
    fn witness(p: &Profile, i: usize) -> Option<[u64; 6]> {
        let nr = p.rules[i].nr;
        let cands = candidates(p, nr);
        let mut idx = vec![0usize; cands.len()];
        loop {
            let mut a = ZERO;
            for (slot, (arg, values)) in cands.iter().enumerate() {
                a[*arg] = values[idx[slot]];
            }
            if p.deciding_rule(nr, &a) == Some(i) {
                return Some(a);
            }
            // Next combination.
            let mut slot = 0;
            loop {
                if slot == idx.len() {
                    return None;
                }
                idx[slot] += 1;
                if idx[slot] < cands[slot].1.len() {
                    break;
                }
                idx[slot] = 0;
                slot += 1;
            }
        }
    }

    #[test]
    fn every_rule_decides_some_call_with_its_declared_action() {
        let p = default_profile();
        let prog = compile(&p);
        for (i, r) in p.rules.iter().enumerate() {
            let Some(a) = witness(&p, i) else {
                panic!("rule {i} ({}) never decides: shadowed", r.syscall)
            };
            assert_eq!(
                evaluate(&prog, AUDIT_ARCH_X86_64, r.nr as i32, a),
                r.action.ret(),
                "rule {i} ({}) with {a:x?}",
                r.syscall
            );
        }
    }

    /// A small deterministic generator of interesting argument vectors.
    fn arg_vectors() -> Vec<[u64; 6]> {
        let interesting: [u64; 16] = [
            0,
            1,
            2,
            3,
            5,
            10,
            16,
            17,
            35,
            0x5412,
            0x541C,
            0x80003,
            u64::from(S_IFIFO),
            u64::from(CLONE_NEWUSER),
            0xDEAD_0000_0000_5412,
            u64::MAX,
        ];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut out = vec![ZERO, [u64::MAX; 6]];
        for _ in 0..64 {
            let mut a = ZERO;
            for slot in &mut a {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *slot = interesting[(seed % 16) as usize];
            }
            out.push(a);
        }
        out
    }

    fn assert_agrees(p: &Profile, prog: &[BpfInsn], numbers: impl Iterator<Item = i64>) {
        let vectors = arg_vectors();
        for n in numbers {
            for a in &vectors {
                assert_eq!(
                    evaluate(prog, AUDIT_ARCH_X86_64, n as i32, *a),
                    p.action_for(n, a).ret(),
                    "nr {n} args {a:x?}"
                );
            }
        }
    }

    #[test]
    fn program_agrees_with_the_profile_for_every_number() {
        let p = default_profile();
        let prog = compile(&p);
        assert_agrees(&p, &prog, (0..=560).chain([999, 4096, 0x3FFF_FFFF]));
    }

    #[test]
    fn program_is_valid_and_small() {
        let prog = default_program();
        assert_eq!(validate(&prog), Ok(()));
        assert!(prog.len() < BPF_MAXINSNS, "{}", prog.len());
        assert_eq!(prog, compile(&default_profile()));
        // The x86_64 architecture check comes first.
        assert_eq!(prog[0], stmt(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_ARCH));
    }

    #[test]
    fn long_programs_use_far_jumps_correctly() {
        // Every other number allowed, plus conditional rules: far more than 255
        // instructions on each side of the root.
        let mut rules = Vec::new();
        for (name, n) in SYSCALLS_X86_64 {
            if n % 2 == 0 {
                rules.push(Rule {
                    syscall: name,
                    nr: *n,
                    action: Action::Allow,
                    when: vec![],
                    reason: "test",
                });
            } else if n % 7 == 0 {
                rules.push(Rule {
                    syscall: name,
                    nr: *n,
                    action: Action::Errno(5),
                    when: vec![ArgCmp::MaskedIn {
                        arg: (n % 6) as u8,
                        mask: 0xFF,
                        values: &[3, 16, 35],
                    }],
                    reason: "test",
                });
                rules.push(Rule {
                    syscall: name,
                    nr: *n,
                    action: Action::KillProcess,
                    when: vec![ArgCmp::eq(1, 0x5412), ArgCmp::eq(0, 0)],
                    reason: "test",
                });
            }
        }
        let p = Profile {
            default: Action::Errno(EPERM),
            rules,
        };
        assert_eq!(p.check(), Ok(()));
        let prog = compile(&p);
        assert!(prog.len() > 600, "{}", prog.len());
        assert!(prog.iter().any(|i| i.code == BPF_JMP | BPF_JA && i.k > 255));
        assert_eq!(validate(&prog), Ok(()));
        assert_agrees(&p, &prog, 0..=560);
    }

    #[test]
    fn empty_profiles_compile() {
        for default in [Action::Allow, Action::KillProcess, Action::Errno(13)] {
            let p = Profile {
                default,
                rules: vec![],
            };
            let prog = compile(&p);
            assert_eq!(validate(&prog), Ok(()));
            assert_agrees(&p, &prog, [0, 1, 59, 999].into_iter());
        }
    }

    #[test]
    fn check_rejects_bad_profiles() {
        let ok = Rule::new("read", Action::Allow, vec![], "r");
        let bad = |rules: Vec<Rule>| {
            Profile {
                default: Action::Errno(EPERM),
                rules,
            }
            .check()
        };
        let mut wrong_nr = ok.clone();
        wrong_nr.nr = 1;
        assert!(bad(vec![wrong_nr]).is_err());
        assert!(bad(vec![ok.clone(), ok.clone()]).is_err());
        let cond = Rule::new("read", Action::Allow, vec![ArgCmp::eq(0, 1)], "r");
        assert!(bad(vec![ok.clone(), cond.clone()]).is_err());
        let other = Rule::new("write", Action::Allow, vec![], "w");
        assert!(bad(vec![cond.clone(), other, ok.clone()]).is_err());
        assert!(bad(vec![cond.clone(), ok.clone()]).is_ok());
        let arg9 = Rule::new("read", Action::Allow, vec![ArgCmp::eq(9, 1)], "r");
        assert!(bad(vec![arg9]).is_err());
        let outside = Rule::new(
            "read",
            Action::Allow,
            vec![ArgCmp::MaskedEq {
                arg: 0,
                mask: 0xF,
                value: 0x10,
            }],
            "r",
        );
        assert!(bad(vec![outside]).is_err());
        let no_reason = Rule::new("read", Action::Allow, vec![], " ");
        assert!(bad(vec![no_reason]).is_err());
    }

    #[test]
    fn validate_rejects_bad_programs() {
        let allow = ret(SECCOMP_RET_ALLOW);
        assert!(validate(&[]).is_err());
        assert!(validate(&[allow]).is_ok());
        assert!(validate(&vec![allow; BPF_MAXINSNS + 1]).is_err());
        assert!(validate(&[stmt(BPF_LD | BPF_W | BPF_ABS, 0)]).is_err());
        assert!(validate(&[stmt(BPF_LD | BPF_W | BPF_ABS, 2), allow]).is_err());
        assert!(validate(&[stmt(BPF_LD | BPF_W | BPF_ABS, 64), allow]).is_err());
        assert!(validate(&[stmt(BPF_LD | BPF_W | BPF_ABS, 60), allow]).is_ok());
        assert!(validate(&[jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0), allow]).is_err());
        assert!(validate(&[jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 2), allow, allow]).is_err());
        assert!(validate(&[jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0), allow, allow]).is_ok());
        assert!(validate(&[stmt(BPF_JMP | BPF_JA, 1), allow]).is_err());
        assert!(validate(&[stmt(BPF_JMP | BPF_JA, 1), allow, allow]).is_ok());
        assert!(validate(&[stmt(BPF_LD | 0x08 | BPF_ABS, 0), allow]).is_err()); // half word
        assert!(validate(&[stmt(BPF_ALU | BPF_DIV | BPF_K, 0), allow]).is_err());
        assert!(validate(&[stmt(BPF_ST, 16), allow]).is_err());
    }

    #[test]
    fn evaluate_runs_the_seccomp_instruction_set() {
        // A = arg0 low; X = A; A = arg1 low; A += X; A <<= 1; mem[3] = A; A = 0; A = mem[3];
        // return A if it equals 20, else return ERRNO|(A & 0xffff)
        let prog = [
            stmt(BPF_LD | BPF_W | BPF_ABS, seccomp_data_arg_lo(0)),
            stmt(BPF_MISC | BPF_TAX, 0),
            stmt(BPF_LD | BPF_W | BPF_ABS, seccomp_data_arg_lo(1)),
            stmt(BPF_ALU | BPF_ADD | BPF_X, 0),
            stmt(BPF_ALU | BPF_LSH | BPF_K, 1),
            stmt(BPF_ST, 3),
            stmt(BPF_LD | BPF_IMM, 0),
            stmt(BPF_LD | BPF_MEM, 3),
            jump(BPF_JMP | BPF_JEQ | BPF_K, 20, 0, 1),
            stmt(BPF_RET | BPF_A, 0),
            stmt(BPF_ALU | BPF_AND | BPF_K, 0xFFFF),
            stmt(BPF_ALU | BPF_OR | BPF_K, SECCOMP_RET_ERRNO),
            stmt(BPF_RET | BPF_A, 0),
        ];
        assert_eq!(validate(&prog), Ok(()));
        assert_eq!(evaluate(&prog, 0, 0, args(&[4, 6])), 20);
        assert_eq!(evaluate(&prog, 0, 0, args(&[4, 7])), SECCOMP_RET_ERRNO | 22);
        // High halves are separate words.
        let hi = [
            stmt(BPF_LD | BPF_W | BPF_ABS, seccomp_data_arg_hi(2)),
            stmt(BPF_RET | BPF_A, 0),
        ];
        assert_eq!(
            evaluate(&hi, 0, 0, args(&[0, 0, 0x1234_5678_0000_0001])),
            0x1234_5678
        );
        let nr_arch = [
            stmt(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_NR),
            stmt(BPF_MISC | BPF_TAX, 0),
            stmt(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_ARCH),
            stmt(BPF_ALU | BPF_XOR | BPF_X, 0),
            stmt(BPF_RET | BPF_A, 0),
        ];
        assert_eq!(evaluate(&nr_arch, 0xF0, 0x0F, ZERO), 0xFF);
        // Running off the end, or a bad instruction, kills.
        assert_eq!(
            evaluate(&[stmt(BPF_LD | BPF_IMM, 1)], 0, 0, ZERO),
            SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(
            evaluate(&[stmt(BPF_LD | BPF_W | BPF_ABS, 64), ret(0)], 0, 0, ZERO),
            SECCOMP_RET_KILL_PROCESS
        );
        // Division by a zero X returns 0, as in the kernel.
        let div = [stmt(BPF_ALU | BPF_DIV | BPF_X, 0), ret(SECCOMP_RET_ALLOW)];
        assert_eq!(evaluate(&div, 0, 0, ZERO), SECCOMP_RET_KILL_THREAD);
    }
}
