//! Host uid/gid ranges: each sandbox gets its own, so two sandboxes never share a host uid.
//!
//! As root, a sandbox takes one of [`SLOTS`] ranges of 65536 ids above [`BASE`], held by an
//! exclusive `flock` on `/run/moat/slots/N.lock` for as long as the sandbox lives (the lock
//! goes away with the holder, so a killed moat leaks nothing). Rootless, the user's own uid
//! and gid are the only ids there are, mapped to the workload's ids.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// First host id of the first range.
pub const BASE: u32 = 0x4000_0000;
/// Ids per range.
pub const RANGE: u32 = 65536;
/// Number of ranges.
pub const SLOTS: u32 = 16384;

/// Where this process's next search for a free slot starts ([`SLOTS`] or more: nowhere yet).
static NEXT_SLOT: AtomicU32 = AtomicU32::new(u32::MAX);

/// Directory of the slot lock files.
pub fn slot_dir() -> PathBuf {
    crate::rootfs::run_dir(false).join("slots")
}

/// How the sandbox's ids map onto the host's.
#[derive(Debug)]
pub enum IdMap {
    /// Root: ids 0..65536 inside map to `BASE + slot * RANGE ...` on the host.
    Range {
        slot: u32,
        host_base: u32,
        _lock: File,
    },
    /// Rootless: only the workload's uid/gid, mapped to the user's own.
    Single { host_uid: u32, host_gid: u32 },
}

impl IdMap {
    /// Takes a free range (root) or the user's own ids (rootless).
    pub fn allocate(rootless: bool) -> io::Result<IdMap> {
        if rootless {
            let (host_uid, host_gid) = moat_sys::process::real_ids();
            return Ok(IdMap::Single { host_uid, host_gid });
        }
        let dir = slot_dir();
        fs::create_dir_all(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", dir.display())))?;
        // Next fit: probe from just after this process's last slot (a random one at first,
        // so that processes start apart), so that a long-lived spawner finds a free slot at
        // the first probe while there are free slots ahead, however many it holds. Another
        // process may take any slot meanwhile: the lock decides.
        let start = match NEXT_SLOT.load(Ordering::Relaxed) {
            n if n < SLOTS => n,
            _ => seed() % SLOTS,
        };
        for i in 0..SLOTS {
            let slot = (start + i) % SLOTS;
            let path = dir.join(format!("{slot}.lock"));
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "open {}: {e}: moat keeps its uid slot locks in {}, which must be \
                             writable by root",
                            path.display(),
                            dir.display()
                        ),
                    )
                })?;
            if moat_sys::process::try_lock(f.as_raw_fd())? {
                NEXT_SLOT.store((slot + 1) % SLOTS, Ordering::Relaxed);
                return Ok(IdMap::Range {
                    slot,
                    host_base: BASE + slot * RANGE,
                    _lock: f,
                });
            }
        }
        Err(io::Error::other(format!(
            "all {SLOTS} uid ranges are in use: too many sandboxes at once"
        )))
    }

    /// Whether a slot's lock is free (its sandbox is gone).
    pub fn slot_is_free(slot: u32) -> bool {
        let Ok(f) = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(slot_dir().join(format!("{slot}.lock")))
        else {
            return true;
        };
        moat_sys::process::try_lock(f.as_raw_fd()).unwrap_or(false)
    }

    /// Lines for `/proc/PID/uid_map` and `/proc/PID/gid_map`.
    pub fn maps(&self, uid: u32, gid: u32) -> (String, String) {
        match self {
            IdMap::Range { host_base, .. } => (
                format!("0 {host_base} {RANGE}\n"),
                format!("0 {host_base} {RANGE}\n"),
            ),
            IdMap::Single { host_uid, host_gid } => (
                format!("{uid} {host_uid} 1\n"),
                format!("{gid} {host_gid} 1\n"),
            ),
        }
    }

    /// The host uid and gid of the sandbox's root (init), as the host sees them.
    pub fn host_root(&self) -> (u32, u32) {
        match self {
            IdMap::Range { host_base, .. } => (*host_base, *host_base),
            IdMap::Single { host_uid, host_gid } => (*host_uid, *host_gid),
        }
    }

    /// The slot lock's descriptor (root only). A sandbox's init keeps it open for its whole
    /// life, so the slot stays taken until init is gone, whoever started it.
    pub fn lock_fd(&self) -> Option<std::os::fd::RawFd> {
        match self {
            IdMap::Range { _lock, .. } => Some(_lock.as_raw_fd()),
            IdMap::Single { .. } => None,
        }
    }

    /// A short tag for cgroup names.
    pub fn tag(&self) -> String {
        match self {
            IdMap::Range { slot, .. } => format!("s{slot}"),
            IdMap::Single { .. } => format!("p{}", std::process::id()),
        }
    }
}

fn seed() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let x = t ^ ((std::process::id() as u64) << 32) ^ 0x9E37_79B9_7F4A_7C15;
    // splitmix64 finaliser
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}
