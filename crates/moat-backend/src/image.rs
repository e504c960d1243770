//! A template's files as the sandbox sees them: one read-only, id-mapped mount of the
//! template's root directory, shared by every sandbox of the template.
//!
//! Templates are stored with the ids their image gives (root's files owned by 0). Each
//! sandbox has its own host uid range, so the files must show each sandbox the image's ids
//! shifted into its range, without a copy: an id-mapped mount (`mount_setattr(2)` with
//! `MOUNT_ATTR_IDMAP`) does that, with the user namespace whose mapping it applies. Only root
//! of the host may make one, and the sandbox's own user namespace does not exist before its
//! init is cloned, so a short-lived process gets a user namespace with the sandbox's mapping,
//! the mount is made against it, and init inherits the detached mount and attaches it under
//! its overlay (runc passes such mounts to its init the same way; idmapped overlay layers are
//! supported from Linux 5.19).

use moat_sys::fs as sysfs;
use moat_sys::process::{self as sys, Forked};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// A detached, read-only, nosuid, nodev mount of `rootfs` that shows its files with the ids
/// that `uid_map`/`gid_map` (the sandbox's `/proc/PID/uid_map` lines) give them.
pub(crate) fn idmapped_tree(rootfs: &str, uid_map: &str, gid_map: &str) -> io::Result<OwnedFd> {
    let userns = userns_with(uid_map, gid_map)?;
    let tree = sysfs::open_tree_clone(rootfs, false)
        .map_err(|e| io::Error::new(e.kind(), format!("open_tree {rootfs}: {e}")))?;
    sysfs::mount_setattr(
        tree.as_fd(),
        sysfs::MOUNT_ATTR_IDMAP
            | sysfs::MOUNT_ATTR_RDONLY
            | sysfs::MOUNT_ATTR_NOSUID
            | sysfs::MOUNT_ATTR_NODEV,
        Some(userns.as_fd()),
    )
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "id-mapped mount of {rootfs}: {e} (needs Linux 5.12+ and a filesystem that \
                 supports id-mapped mounts, such as ext4, xfs, btrfs or tmpfs)"
            ),
        )
    })?;
    Ok(tree)
}

/// A user namespace with the given mapping, held by a descriptor: a child is cloned into a
/// new one, its maps are written, its namespace opened, and it exits.
fn userns_with(uid_map: &str, gid_map: &str) -> io::Result<OwnedFd> {
    let (r, w) = sys::pipe()?;
    match sys::clone_fork(libc::CLONE_NEWUSER)? {
        Forked::Child => {
            drop(w);
            let _ = sys::set_parent_death_signal(libc::SIGKILL);
            // Wait for the parent to be done with our namespace (EOF), then go.
            let mut b = [0u8; 1];
            let _ = sys::read(r.as_raw_fd(), &mut b);
            sys::exit_now(0);
        }
        Forked::Parent { pid, pidfd } => {
            drop(r);
            let got = (|| {
                std::fs::write(format!("/proc/{pid}/uid_map"), uid_map)?;
                std::fs::write(format!("/proc/{pid}/gid_map"), gid_map)?;
                std::fs::File::open(format!("/proc/{pid}/ns/user")).map(OwnedFd::from)
            })();
            drop(w);
            let _ = sys::pidfd_kill(pidfd.as_raw_fd(), libc::SIGKILL);
            let _ = sys::wait4(pid, libc::__WALL);
            got.map_err(|e| {
                io::Error::new(e.kind(), format!("user namespace for the mapping: {e}"))
            })
        }
    }
}
