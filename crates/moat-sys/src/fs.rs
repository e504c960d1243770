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

/// `lsetxattr(2)`: sets an extended attribute on `path` itself (a symlink is not followed).
pub fn lsetxattr(path: &std::path::Path, name: &str, value: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))?;
    let n = cstr(name)?;
    // SAFETY: `p` and `n` are valid C strings and `value` a live slice of `value.len()` bytes,
    // all alive for the call's duration.
    cvt(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast::<libc::c_void>(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// `open_tree(2)` flags and `mount_setattr(2)` attributes (linux/mount.h).
pub const OPEN_TREE_CLONE: libc::c_uint = 1;
pub const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
pub const AT_RECURSIVE: libc::c_uint = 0x8000;
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// `struct mount_attr` (linux/mount.h, MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC [| AT_RECURSIVE])`: a
/// detached copy of the mount tree at `path`, as a descriptor that [`mount_setattr`] can
/// change and [`move_mount_to`] can attach somewhere.
pub fn open_tree_clone(path: &str, recursive: bool) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let p = cstr(path)?;
    let flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: `p` is a valid C string for the call's duration; the flags are plain integers.
    let fd =
        cvt_long(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, p.as_ptr(), flags) })?;
    // SAFETY: open_tree returned a fresh descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `mount_setattr(2)` on a detached tree from [`open_tree_clone`]: sets `attr_set` (the
/// `MOUNT_ATTR_*` flags) on every mount of it; with [`MOUNT_ATTR_IDMAP`], `userns` is the user
/// namespace whose id mapping the mount applies to the files it shows.
pub fn mount_setattr(
    tree: std::os::fd::BorrowedFd<'_>,
    attr_set: u64,
    userns: Option<std::os::fd::BorrowedFd<'_>>,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |u| u.as_raw_fd() as u64),
    };
    let empty = c"";
    // SAFETY: `tree` is a live descriptor, `empty` a valid C string and `attr` a live
    // `struct mount_attr` whose size is passed with it.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            (libc::AT_EMPTY_PATH as libc::c_uint) | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// `move_mount(2)`: attaches the detached tree `tree` (a descriptor from
/// [`open_tree_clone`], possibly inherited) at `target` in the caller's mount namespace.
pub fn move_mount_to(tree: std::os::fd::RawFd, target: &str) -> io::Result<()> {
    let t = cstr(target)?;
    let empty = c"";
    // SAFETY: both strings are valid C strings for the call; `tree` is an integer the kernel
    // checks (a descriptor that is not a mount tree fails with EBADF or EINVAL).
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree,
            empty.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}
