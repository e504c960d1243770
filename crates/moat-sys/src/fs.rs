//! Mounts and the root switch.

use crate::{cstr, cvt, cvt_long};
use std::io;

pub use libc::{
    MNT_DETACH, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT,
    MS_SILENT, MS_SLAVE,
};

/// `mount(2)`. `None` arguments are passed as null pointers.
pub fn mount(
    src: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = src.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    let p = |c: &Option<std::ffi::CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated CString alive for the whole call.
    cvt(unsafe {
        libc::mount(
            p(&src),
            target.as_ptr(),
            p(&fstype),
            flags,
            p(&data).cast::<libc::c_void>(),
        )
    })
    .map(drop)
}

/// `umount2(2)`.
pub fn umount2(target: &str, flags: libc::c_int) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: `t` is a valid C string for the call's duration.
    cvt(unsafe { libc::umount2(t.as_ptr(), flags) }).map(drop)
}

/// `pivot_root(2)`.
pub fn pivot_root(new_root: &str, put_old: &str) -> io::Result<()> {
    let n = cstr(new_root)?;
    let o = cstr(put_old)?;
    // SAFETY: both are valid C strings for the call's duration.
    cvt_long(unsafe { libc::syscall(libc::SYS_pivot_root, n.as_ptr(), o.as_ptr()) }).map(drop)
}

/// The mount flags (`MS_*`) currently in force on the mount holding `path`, as far as a
/// read-only remount must keep them (a user namespace may not clear locked flags).
pub fn mount_flags(path: &str) -> io::Result<libc::c_ulong> {
    let p = cstr(path)?;
    // SAFETY: plain data out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `p` is a valid C string and `st` a live out-parameter.
    cvt(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
    let f = st.f_flag;
    let mut out = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if f & st_flag != 0 {
            out |= ms_flag;
        }
    }
    Ok(out)
}

/// Sets the process umask, returning the old one.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// `access(path, W_OK)` with the real ids.
pub fn access_w(path: &std::ffi::CStr) -> bool {
    // SAFETY: `path` is a valid C string.
    unsafe { libc::access(path.as_ptr(), libc::W_OK) == 0 }
}

/// Copies a small regular file in as few system calls as the kernel allows: `open`, `open`,
/// `sendfile` (until EOF, at most `max` bytes), `close`, `close`. The copy gets `mode`.
pub fn copy_small_file(src: &str, dst: &str, mode: u32, max: usize) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let s = crate::cstr(src)?;
    let d = crate::cstr(dst)?;
    // SAFETY: `s` is a valid C string.
    let in_fd = crate::cvt(unsafe {
        libc::open(
            s.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    })?;
    // SAFETY: fresh fd we own.
    let in_fd = unsafe { OwnedFd::from_raw_fd(in_fd) };
    // SAFETY: `d` is a valid C string.
    let out_fd = crate::cvt(unsafe {
        libc::open(
            d.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: fresh fd we own.
    let out_fd = unsafe { OwnedFd::from_raw_fd(out_fd) };
    let mut left = max;
    while left > 0 {
        // SAFETY: two valid fds and a null offset (use the file position).
        let n = unsafe {
            libc::sendfile(
                out_fd.as_raw_fd(),
                in_fd.as_raw_fd(),
                std::ptr::null_mut(),
                left,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            break;
        }
        left -= n as usize;
    }
    Ok(())
}
