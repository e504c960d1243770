//! Landlock: unprivileged filesystem (and, from ABI 6, signal and abstract-socket) scoping.

use crate::{cstr, cvt, cvt_long};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const ACCESS_FS_EXECUTE: u64 = 1 << 0;
pub const ACCESS_FS_WRITE_FILE: u64 = 1 << 1;
pub const ACCESS_FS_READ_FILE: u64 = 1 << 2;
pub const ACCESS_FS_READ_DIR: u64 = 1 << 3;
pub const ACCESS_FS_REMOVE_DIR: u64 = 1 << 4;
pub const ACCESS_FS_REMOVE_FILE: u64 = 1 << 5;
pub const ACCESS_FS_MAKE_CHAR: u64 = 1 << 6;
pub const ACCESS_FS_MAKE_DIR: u64 = 1 << 7;
pub const ACCESS_FS_MAKE_REG: u64 = 1 << 8;
pub const ACCESS_FS_MAKE_SOCK: u64 = 1 << 9;
pub const ACCESS_FS_MAKE_FIFO: u64 = 1 << 10;
pub const ACCESS_FS_MAKE_BLOCK: u64 = 1 << 11;
pub const ACCESS_FS_MAKE_SYM: u64 = 1 << 12;
/// ABI 2.
pub const ACCESS_FS_REFER: u64 = 1 << 13;
/// ABI 3.
pub const ACCESS_FS_TRUNCATE: u64 = 1 << 14;
/// ABI 5.
pub const ACCESS_FS_IOCTL_DEV: u64 = 1 << 15;
/// ABI 6.
pub const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
/// ABI 6.
pub const SCOPE_SIGNAL: u64 = 1 << 1;

/// Rights that apply to a regular file (the rest only make sense on directories).
pub const FILE_RIGHTS: u64 = ACCESS_FS_EXECUTE
    | ACCESS_FS_WRITE_FILE
    | ACCESS_FS_READ_FILE
    | ACCESS_FS_TRUNCATE
    | ACCESS_FS_IOCTL_DEV;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

const CREATE_RULESET_VERSION: u32 = 1 << 0;
const RULE_PATH_BENEATH: libc::c_int = 1;

/// The Landlock ABI version of this kernel, 0 when Landlock is absent or disabled.
pub fn abi_version() -> u32 {
    // SAFETY: the documented version query: null attr, size 0, the VERSION flag.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if r < 0 {
        0
    } else {
        r as u32
    }
}

/// Every filesystem right the given ABI knows.
pub fn fs_rights_for_abi(abi: u32) -> u64 {
    let mut r = (1 << 13) - 1;
    if abi >= 2 {
        r |= ACCESS_FS_REFER;
    }
    if abi >= 3 {
        r |= ACCESS_FS_TRUNCATE;
    }
    if abi >= 5 {
        r |= ACCESS_FS_IOCTL_DEV;
    }
    r
}

/// A ruleset being built.
pub struct Ruleset {
    fd: OwnedFd,
    handled: u64,
}

impl Ruleset {
    /// Creates a ruleset handling `fs` rights and the `scoped` scopes.
    pub fn new(fs: u64, scoped: u64) -> io::Result<Ruleset> {
        let attr = RulesetAttr {
            handled_access_fs: fs,
            handled_access_net: 0,
            scoped,
        };
        let size = if scoped != 0 {
            std::mem::size_of::<RulesetAttr>()
        } else {
            // Older kernels reject a size that includes fields they don't know unless zero;
            // they accept trailing zeros, but pass the ABI 1 size when nothing newer is used.
            std::mem::size_of::<u64>()
        };
        // SAFETY: `attr` lives across the call and `size` does not exceed it.
        let fd = cvt_long(unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size,
                0u32,
            )
        })?;
        // SAFETY: a fresh fd that we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Ruleset { fd, handled: fs })
    }

    /// Allows `access` beneath `path`. A missing path is skipped (returns `Ok(false)`).
    pub fn allow(&mut self, path: &str, access: u64) -> io::Result<bool> {
        let p = cstr(path)?;
        // SAFETY: `p` is a valid C string; O_PATH opens without reading.
        let fd = unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::NotFound {
                return Ok(false);
            }
            return Err(e);
        }
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain data out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out-pointer.
        cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
        let mut access = access & self.handled;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            access &= FILE_RIGHTS;
        }
        let attr = PathBeneathAttr {
            allowed_access: access,
            parent_fd: fd.as_raw_fd(),
        };
        // SAFETY: `attr` lives across the call; the kernel copies it.
        cvt_long(unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd.as_raw_fd(),
                RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0u32,
            )
        })?;
        Ok(true)
    }

    /// Enforces the ruleset on this thread (needs no_new_privs).
    pub fn restrict_self(self) -> io::Result<()> {
        self.enforce()
    }

    /// Enforces the ruleset on this thread and keeps it: a process that starts many
    /// children can build it once and let each child [`Ruleset::enforce`] it again (each
    /// gets a new domain layer with the same rules, exactly as if it had built the ruleset
    /// itself; the kernel copies the rules into the domain, so a ruleset changed later does
    /// not change a domain already made).
    pub fn enforce(&self) -> io::Result<()> {
        // SAFETY: valid ruleset fd, flags 0.
        cvt_long(unsafe {
            libc::syscall(libc::SYS_landlock_restrict_self, self.fd.as_raw_fd(), 0u32)
        })
        .map(drop)
    }
}
