//! Builds the sandbox's filesystem inside its fresh mount namespace, then switches to it.
//!
//! Runs in the sandbox's init, as root of the sandbox's user namespace, before anything of
//! the workload runs. Layout follows bubblewrap's approach: a staging tmpfs becomes the root
//! first, the host's root stays reachable under `/oldroot` while binds are made from it, and
//! is detached before the workload starts.

use moat_policy::Policy;
use moat_sys::fs::{
    mount, mount_flags, pivot_root, umount2, MNT_DETACH, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID,
    MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT, MS_SILENT,
};
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;

/// Host directories bound read-only into a default root.
const HOST_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Files copied from the host's `/etc` into the sanitised one (nothing secret, nothing that
/// names the host). Missing ones are skipped.
const ETC_FILES: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "nsswitch.conf",
    "localtime",
    "timezone",
    "os-release",
    "debian_version",
    "mime.types",
    "protocols",
    "services",
    "gai.conf",
    "inputrc",
    "bash.bashrc",
    "profile",
    "environment",
    "locale.alias",
    "magic",
    "papersize",
    "ssl/openssl.cnf",
];

/// Directories whose files are copied from the host's `/etc` (small, nothing secret).
const ETC_COPY_DIRS: &[&str] = &["ld.so.conf.d", "profile.d"];

/// Directories bound read-only from the host's `/etc`: Debian's `alternatives` symlink farm
/// and the public CA certificates. Not `/etc/ssl/private`.
const ETC_DIRS: &[&str] = &["alternatives", "ssl/certs"];

/// `/proc` paths hidden behind `/dev/null` (files) or an empty read-only tmpfs (dirs), as
/// Docker masks them.
const PROC_MASKED: &[&str] = &[
    "acpi",
    "asound",
    "interrupts",
    "kcore",
    "keys",
    "latency_stats",
    "sched_debug",
    "scsi",
    "timer_list",
    "timer_stats",
    "sysrq-trigger",
    "kmsg",
    "kallsyms",
    "config.gz",
    "buddyinfo",
    "slabinfo",
    "pagetypeinfo",
    "vmallocinfo",
    "zoneinfo",
    "iomem",
    "ioports",
    "modules",
    "mtrr",
    "fb",
    "driver",
    "sysvipc",
    "tty",
    "bootconfig",
];

/// `/proc` directories hidden behind an empty read-only tmpfs (Docker makes them read-only;
/// nothing a workload needs lives there).
const PROC_HIDDEN_DIRS: &[&str] = &["bus", "fs", "irq"];

/// `/sys` paths masked when `/sys` is mounted.
const SYS_MASKED: &[&str] = &[
    "firmware",
    "devices/virtual/powercap",
    "kernel/security",
    "kernel/debug",
];

/// Device nodes bound from the host's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

fn ctx(what: impl Into<String>) -> impl FnOnce(io::Error) -> io::Error {
    let what = what.into();
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn touch(path: &str) -> io::Result<()> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(ctx(format!("create {path}")))
}

fn mkdir_p(path: &str) -> io::Result<()> {
    fs::create_dir_all(path).map_err(ctx(format!("mkdir {path}")))
}

/// Bind `src` onto `dst` (non-recursive), then remount with `extra` flags, keeping the flags
/// the user namespace may not clear.
fn bind(src: &str, dst: &str, extra: libc::c_ulong) -> io::Result<()> {
    mount(Some(src), dst, None, MS_BIND | MS_SILENT, None)
        .map_err(ctx(format!("bind {src} on {dst}")))?;
    let keep = mount_flags(dst).unwrap_or(0);
    mount(None, dst, None, MS_BIND | MS_REMOUNT | keep | extra, None)
        .map_err(ctx(format!("remount {dst}")))
}

fn tmpfs(dst: &str, flags: libc::c_ulong, opts: &str) -> io::Result<()> {
    mount(Some("tmpfs"), dst, Some("tmpfs"), flags, Some(opts))
        .map_err(ctx(format!("tmpfs on {dst}")))
}

/// Hides `p` (when it exists) with one mount: `/dev/null` over a file (reads give nothing,
/// writes vanish), an empty read-only tmpfs over a directory.
fn mask(p: &str) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => tmpfs(
            p,
            MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "size=0,nr_inodes=1",
        ),
        Ok(_) => mount(
            Some("/newroot/dev/null"),
            p,
            None,
            MS_BIND | MS_SILENT,
            None,
        )
        .map_err(ctx(format!("mask {p}"))),
        Err(_) => Ok(()),
    }
}

fn remount_ro(dst: &str) -> io::Result<()> {
    let keep = mount_flags(dst).unwrap_or(0);
    mount(
        None,
        dst,
        None,
        MS_BIND | MS_REMOUNT | MS_RDONLY | keep,
        None,
    )
    .map_err(ctx(format!("remount {dst} read-only")))
}

/// Where a path ends up before the final switch.
fn nr(p: &str) -> String {
    format!("/newroot{p}")
}

/// Identity facts the filesystem needs.
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// Builds the root and switches into it. On return, `/` is the sandbox root and nothing of the
/// host's tree is reachable except what the policy binds.
pub fn build(policy: &Policy, ids: &Ids) -> io::Result<()> {
    // Nothing done here may propagate back to the host.
    mount(None, "/", None, MS_REC | MS_PRIVATE, None).map_err(ctx("make / private"))?;
    tmpfs(
        "/tmp",
        MS_NOSUID | MS_NODEV,
        "mode=0755,size=64k,nr_inodes=64",
    )?;
    mkdir_p("/tmp/newroot")?;
    mkdir_p("/tmp/oldroot")?;
    pivot_root("/tmp", "/tmp/oldroot").map_err(ctx("pivot_root into the staging root"))?;
    std::env::set_current_dir("/").map_err(ctx("chdir /"))?;

    let fs_ = &policy.fs;
    match &fs_.root {
        Some(root) => {
            let src = format!("/oldroot{root}");
            if !Path::new(&src).is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("root {root} is not a directory"),
                ));
            }
            bind(&src, "/newroot", MS_RDONLY | MS_NOSUID | MS_NODEV)?;
            for d in ["proc", "dev", "tmp"] {
                if !Path::new(&nr(&format!("/{d}"))).is_dir() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("root {root} has no /{d} directory: create it (moat mounts its own there)"),
                    ));
                }
            }
            if !Path::new(&nr(&fs_.workdir)).is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("root {root} has no {} directory for the working directory: create it or set fs.workdir", fs_.workdir),
                ));
            }
        }
        None => {
            tmpfs(
                "/newroot",
                MS_NOSUID | MS_NODEV,
                "mode=0755,size=1m,nr_inodes=4096",
            )?;
            for d in HOST_DIRS {
                let src = format!("/oldroot/{d}");
                match fs::symlink_metadata(&src) {
                    Ok(m) if m.file_type().is_symlink() => {
                        let target = fs::read_link(&src)?;
                        symlink(target, nr(&format!("/{d}")))
                            .map_err(ctx(format!("symlink /{d}")))?;
                    }
                    Ok(m) if m.is_dir() => {
                        mkdir_p(&nr(&format!("/{d}")))?;
                        bind(
                            &src,
                            &nr(&format!("/{d}")),
                            MS_RDONLY | MS_NOSUID | MS_NODEV,
                        )?;
                    }
                    _ => {}
                }
            }
            for d in [
                "proc", "dev", "tmp", "etc", "root", "home", "run", "var", "var/tmp",
            ] {
                mkdir_p(&nr(&format!("/{d}")))?;
            }
            build_etc(policy, ids)?;
            mkdir_p(&nr(&fs_.workdir))?;
        }
    }

    // /proc: a fresh instance for the sandbox's pid namespace.
    mount(
        Some("proc"),
        &nr("/proc"),
        Some("proc"),
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        None,
    )
    .map_err(ctx("mount /proc"))?;

    build_dev(policy)?;

    for name in PROC_MASKED.iter().chain(PROC_HIDDEN_DIRS) {
        mask(&nr(&format!("/proc/{name}")))?;
    }
    let sys = nr("/proc/sys");
    bind(&sys, &sys, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)?;

    // /tmp and the working directory: writable, size-capped, owned by the workload.
    let lim = &policy.limits;
    tmpfs(
        &nr("/tmp"),
        MS_NOSUID | MS_NODEV,
        &format!("mode=1777,size={},nr_inodes=65536", lim.tmp_size),
    )?;
    // Owner set by chown, not by `uid=`/`gid=` options: mountinfo would show those as host ids.
    tmpfs(
        &nr(&fs_.workdir),
        MS_NOSUID | MS_NODEV,
        &format!("mode=0755,size={},nr_inodes=262144", lim.workdir_size),
    )?;
    std::os::unix::fs::chown(nr(&fs_.workdir), Some(ids.uid), Some(ids.gid))
        .map_err(ctx("chown the working directory"))?;

    if fs_.sys {
        mkdir_p(&nr("/sys")).ok();
        mount(
            Some("sysfs"),
            &nr("/sys"),
            Some("sysfs"),
            MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
            None,
        )
        .map_err(ctx("mount /sys"))?;
        for name in SYS_MASKED {
            mask(&nr(&format!("/sys/{name}")))?;
        }
    }

    for m in &fs_.mounts {
        let src = format!("/oldroot{}", m.src);
        let meta = fs::metadata(&src).map_err(ctx(format!("mount source {}", m.src)))?;
        let dst = nr(&m.dst);
        if !Path::new(&dst).exists() {
            if fs_.root.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("mount target {} does not exist in the given root", m.dst),
                ));
            }
            if meta.is_dir() {
                mkdir_p(&dst)?;
            } else {
                if let Some(parent) = Path::new(&dst).parent() {
                    fs::create_dir_all(parent).map_err(ctx(format!("mkdir for {}", m.dst)))?;
                }
                touch(&dst)?;
            }
        }
        let ro = if m.rw { 0 } else { MS_RDONLY };
        bind(&src, &dst, ro | MS_NOSUID | MS_NODEV)?;
    }

    if fs_.root.is_none() {
        remount_ro("/newroot")?;
    }

    // Switch: the staging root (and the host's tree under /oldroot) is detached for good.
    std::env::set_current_dir("/newroot").map_err(ctx("chdir /newroot"))?;
    pivot_root(".", ".").map_err(ctx("pivot_root into the sandbox root"))?;
    umount2(".", MNT_DETACH).map_err(ctx("detach the host root"))?;
    std::env::set_current_dir("/").map_err(ctx("chdir /"))?;
    Ok(())
}

fn build_etc(policy: &Policy, ids: &Ids) -> io::Result<()> {
    // /etc lives in the root tmpfs, which is made read-only once the root is built.
    let etc = nr("/etc");
    mkdir_p(&format!("{etc}/ssl"))?;
    let mut files: Vec<String> = ETC_FILES.iter().map(|f| f.to_string()).collect();
    for d in ETC_COPY_DIRS {
        if let Ok(rd) = fs::read_dir(format!("/oldroot/etc/{d}")) {
            mkdir_p(&format!("{etc}/{d}"))?;
            for e in rd.flatten().take(256) {
                files.push(format!("{d}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    for f in &files {
        let src = format!("/oldroot/etc/{f}");
        let dst = format!("{etc}/{f}");
        match fs::symlink_metadata(&src) {
            Ok(m) if m.file_type().is_symlink() => {
                symlink(fs::read_link(&src)?, &dst).map_err(ctx(format!("symlink {dst}")))?
            }
            Ok(m) if m.is_file() && m.len() <= 1 << 20 => {
                let data = fs::read(&src).map_err(ctx(format!("read {src}")))?;
                fs::write(&dst, data).map_err(ctx(format!("write {dst}")))?;
            }
            _ => {}
        }
    }
    for d in ETC_DIRS {
        let src = format!("/oldroot/etc/{d}");
        if fs::symlink_metadata(&src).is_ok_and(|m| m.is_dir()) {
            let dst = format!("{etc}/{d}");
            mkdir_p(&dst)?;
            bind(&src, &dst, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)?;
        }
    }
    let (uid, gid) = (ids.uid, ids.gid);
    let home = &policy.fs.workdir;
    let host = &policy.process.hostname;
    let write = |name: &str, body: String| {
        fs::write(format!("{etc}/{name}"), body).map_err(ctx(format!("write /etc/{name}")))
    };
    write(
        "passwd",
        format!(
            "root:x:0:0:root:/root:/usr/sbin/nologin\nuser:x:{uid}:{gid}:sandbox user:{home}:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
    )?;
    write(
        "group",
        format!("root:x:0:\ntty:x:5:\nuser:x:{gid}:\nnogroup:x:65534:\n"),
    )?;
    write("hostname", format!("{host}\n"))?;
    write(
        "hosts",
        format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        ),
    )?;
    write("resolv.conf", "# no network in this sandbox\n".to_string())
}

fn build_dev(policy: &Policy) -> io::Result<()> {
    let dev = nr("/dev");
    tmpfs(
        &dev,
        MS_NOSUID | MS_NOEXEC,
        "mode=0755,size=64k,nr_inodes=64",
    )?;
    for d in DEVICES {
        let dst = format!("{dev}/{d}");
        touch(&dst)?;
        // One bind, no remount: nosuid/noexec mean nothing on a device node.
        let src = format!("/oldroot/dev/{d}");
        mount(Some(&src), &dst, None, MS_BIND | MS_SILENT, None)
            .map_err(ctx(format!("bind {src}")))?;
    }
    mkdir_p(&format!("{dev}/pts"))?;
    mount(
        Some("devpts"),
        &format!("{dev}/pts"),
        Some("devpts"),
        MS_NOSUID | MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(ctx("mount /dev/pts"))?;
    symlink("pts/ptmx", format!("{dev}/ptmx"))?;
    mkdir_p(&format!("{dev}/shm"))?;
    tmpfs(
        &format!("{dev}/shm"),
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        &format!("mode=1777,size={},nr_inodes=4096", policy.limits.tmp_size),
    )?;
    symlink("/proc/self/fd", format!("{dev}/fd"))?;
    symlink("/proc/self/fd/0", format!("{dev}/stdin"))?;
    symlink("/proc/self/fd/1", format!("{dev}/stdout"))?;
    symlink("/proc/self/fd/2", format!("{dev}/stderr"))?;
    remount_ro(&dev)
}
