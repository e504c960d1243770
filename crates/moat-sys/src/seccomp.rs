//! Installing a classic-BPF seccomp filter compiled elsewhere (moat-policy).

use crate::cvt_long;
use std::io;

/// One instruction, laid out as `struct sock_filter`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const SockFilter,
}

const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;

/// Installs `prog` for this thread with `seccomp(SECCOMP_SET_MODE_FILTER)`. Requires
/// no_new_privs (or CAP_SYS_ADMIN).
pub fn install(prog: &[SockFilter]) -> io::Result<()> {
    if prog.is_empty() || prog.len() > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "seccomp program must have 1..=4096 instructions",
        ));
    }
    let fprog = SockFprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr(),
    };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel copies the program.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            &fprog as *const SockFprog,
        )
    })
    .map(drop)
}

/// Whether this kernel supports seccomp filters (asks with an invalid call that a kernel
/// with filter support answers with EFAULT).
pub fn supported() -> bool {
    // SAFETY: a null program pointer: the kernel validates and rejects it without side effects.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            std::ptr::null::<SockFprog>(),
        )
    };
    r == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EFAULT)
}
