//! Builds the sandbox's filesystem inside its fresh mount namespace, then switches to it.
//!
//! Runs in the sandbox's init, as root of the sandbox's user namespace, in its private mount
//! namespace, before anything of the workload runs. The new root is a small tmpfs mounted on
//! an empty directory of moat's run directory (the host never sees it: the mount exists only
//! in the sandbox's namespace); it gets mount points, the `/bin -> usr/bin` style symlinks, a
//! sanitised `/etc` and `/dev` entries, then the host's `/usr` ..., a fresh `/proc`, devices
//! and tmpfs `/tmp` and working directory are mounted on top, everything but those is made
//! read-only, and [`enter`] pivots into it and detaches the host's tree.

use moat_policy::Policy;
use moat_sys::fs::{
    mount, mount_flags, pivot_root, umount2, MNT_DETACH, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID,
    MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT, MS_SILENT,
};
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// Host directories bound read-only into a default root.
pub(crate) const HOST_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Files copied (or, larger than a page, bound read-only) from the host's `/etc` into the sanitised one (nothing secret, nothing that
/// names the host): what the C library and common runtimes read. Missing ones are skipped;
/// only world-readable files are copied. Kept short: every file is paid for at each start.
pub(crate) const ETC_FILES: &[&str] = &[
    "ld.so.cache",
    "nsswitch.conf",
    "localtime",
    "os-release",
    "services",
    "protocols",
    "mime.types",
];

/// Largest `ETC_FILES` file copied (one page of the root tmpfs); larger ones are bound.
const ETC_COPY_MAX: u64 = 4096;

/// Directories bound read-only from the host's `/etc`: Debian's `alternatives` symlink farm
/// and the public CA certificates. Not `/etc/ssl/private`.
pub(crate) const ETC_DIRS: &[&str] = &["alternatives", "ssl/certs"];

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
    "modules",
    "config.gz",
    "iomem",
    "ioports",
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
    // One mkdir in the common case (parent exists); create_dir_all stats first.
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(_) => fs::create_dir_all(path).map_err(ctx(format!("mkdir {path}"))),
    }
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

fn bind_plain(src: &str, dst: &str) -> io::Result<()> {
    mount(Some(src), dst, None, MS_BIND | MS_SILENT, None)
        .map_err(ctx(format!("bind {src} on {dst}")))
}

fn tmpfs(dst: &str, flags: libc::c_ulong, opts: &str) -> io::Result<()> {
    mount(Some("tmpfs"), dst, Some("tmpfs"), flags, Some(opts))
        .map_err(ctx(format!("tmpfs on {dst}")))
}

/// Hides paths with one mount each: `/dev/null` over a file (reads give nothing, writes
/// vanish), an empty read-only tmpfs over a directory. Every masked directory shows the same
/// tmpfs (the first one mounted, bound onto the others): it is read-only at the superblock
/// and holds nothing, so sharing it shares nothing, and each further directory costs a bind
/// instead of a filesystem instance of its own (a superblock, its root inode and dentry).
///
/// Where the root already has an empty directory that nothing will write to (`seed`: the
/// default root's `/tmp` before its own tmpfs covers it, a template root's staging
/// directory), the first masked directory is a read-only bind of it instead, and no
/// filesystem instance is made at all: every superblock costs each memory cgroup on the host
/// a slot in its shrinker maps, so fewer per sandbox keeps creates flat.
#[derive(Default)]
struct Masker {
    empty_dir: Option<String>,
    seed: Option<String>,
}

impl Masker {
    fn mask(&mut self, p: &str) -> io::Result<()> {
        match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => match (&self.empty_dir, self.seed.take()) {
                (Some(empty), _) => bind_plain(empty, p),
                // A bind inherits its source mount's read-only flag: the others stay read-only.
                (None, Some(seed)) => {
                    bind(&seed, p, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)?;
                    self.empty_dir = Some(p.to_string());
                    Ok(())
                }
                (None, None) => {
                    tmpfs(
                        p,
                        MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                        "size=0,nr_inodes=1",
                    )?;
                    self.empty_dir = Some(p.to_string());
                    Ok(())
                }
            },
            Ok(_) => bind_plain("/dev/null", p),
            Err(_) => Ok(()),
        }
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

/// Identity facts the filesystem needs.
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

fn not_found(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, msg)
}

/// Builds the root (every mount, all read-only but the writable ones) and returns its path;
/// [`enter`] switches into it. `mountpoint` is an empty directory to build a default root on;
/// with `fs.root` set, that directory is used instead. The host's tree stays visible until
/// [`enter`].
pub fn build(
    policy: &Policy,
    ids: &Ids,
    mountpoint: &str,
    image_tree: Option<std::os::fd::RawFd>,
) -> io::Result<String> {
    // Nothing done here may propagate back to the host.
    mount(None, "/", None, MS_REC | MS_PRIVATE, None).map_err(ctx("make / private"))?;
    let fs_ = &policy.fs;
    let root: String = match (&fs_.image, &fs_.root) {
        (Some(_), _) => format!("{mountpoint}/root"),
        (None, Some(r)) => r.clone(),
        (None, None) => mountpoint.to_string(),
    };
    let nr = |p: &str| format!("{root}{p}");
    let default_root = fs_.root.is_none() && fs_.image.is_none();
    if let Some(img) = &fs_.image {
        image_root(policy, img, mountpoint, image_tree)?;
    } else if !Path::new(&root).is_dir() {
        return Err(not_found(format!("root {root} is not a directory")));
    }
    if fs_.image.is_some() {
        populate_image(policy, &root)?;
    } else if default_root {
        // noexec: nothing on the root tmpfs itself (/etc, the /dev entries) is a program;
        // /usr, /tmp and the working directory are mounts of their own.
        tmpfs(
            &root,
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "mode=0755,size=2m,nr_inodes=4096",
        )?;
        populate(policy, &root)?;
    } else {
        // The given root becomes a mount point of its own (made read-only below).
        mount(Some(&root), &root, None, MS_BIND | MS_SILENT, None).map_err(ctx("bind the root"))?;
        for d in ["/proc", "/dev", "/tmp"] {
            if !Path::new(&nr(d)).is_dir() {
                return Err(not_found(format!(
                    "root {root} has no {d} directory: create it (moat mounts its own there)"
                )));
            }
        }
    }
    if !Path::new(&nr(&fs_.workdir)).is_dir() {
        return Err(not_found(format!(
            "root {root} has no {} directory for the working directory: create it or set fs.workdir",
            fs_.workdir
        )));
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

    build_dev(policy, &nr("/dev"), default_root || fs_.image.is_some())?;

    let mut masker = Masker {
        empty_dir: None,
        seed: if fs_.image.is_some() {
            Some(format!("{mountpoint}/empty"))
        } else if default_root {
            Some(nr("/tmp"))
        } else {
            None
        },
    };
    for name in PROC_MASKED.iter().chain(PROC_HIDDEN_DIRS) {
        masker.mask(&nr(&format!("/proc/{name}")))?;
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
    tmpfs(
        &nr(&fs_.workdir),
        MS_NOSUID | MS_NODEV,
        &format!("mode=0755,size={},nr_inodes=262144", lim.workdir_size),
    )?;
    std::os::unix::fs::chown(nr(&fs_.workdir), Some(ids.uid), Some(ids.gid))
        .map_err(ctx("chown the working directory"))?;

    if fs_.sys {
        if !Path::new(&nr("/sys")).is_dir() {
            return Err(not_found(format!("root {root} has no /sys directory")));
        }
        mount(
            Some("sysfs"),
            &nr("/sys"),
            Some("sysfs"),
            MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
            None,
        )
        .map_err(ctx("mount /sys"))?;
        for name in SYS_MASKED {
            masker.mask(&nr(&format!("/sys/{name}")))?;
        }
    }

    for m in &fs_.mounts {
        fs::metadata(&m.src).map_err(ctx(format!("mount source {}", m.src)))?;
        let dst = nr(&m.dst);
        if fs::symlink_metadata(&dst).is_err() {
            return Err(not_found(format!(
                "mount target {} does not exist in the root",
                m.dst
            )));
        }
        let ro = if m.rw { 0 } else { MS_RDONLY };
        bind(&m.src, &dst, ro | MS_NOSUID | MS_NODEV)?;
    }

    if fs_.image.is_none() {
        remount_ro(&root)?;
    }
    Ok(root)
}

/// A template's root: an overlay whose lower layer is the template's files (the id-mapped
/// mount the host made, or rootless a plain read-only bind that shows them as nobody's) and
/// whose upper layer is the sandbox's own, on a tmpfs of `limits.root_size` (counted in its
/// memory). Built on `mountpoint`; the root is `{mountpoint}/root`.
fn image_root(
    policy: &Policy,
    img: &moat_policy::ImageRoot,
    mountpoint: &str,
    tree: Option<std::os::fd::RawFd>,
) -> io::Result<()> {
    tmpfs(
        mountpoint,
        MS_NOSUID | MS_NODEV,
        &format!(
            "mode=0755,size={},nr_inodes=1048576",
            policy.limits.root_size
        ),
    )?;
    let at = |p: &str| format!("{mountpoint}/{p}");
    for d in ["lower", "upper", "work", "root", "empty"] {
        mkdir_p(&at(d))?;
    }
    match tree {
        // init's own descriptor, inherited and kept open for this.
        Some(fd) => moat_sys::fs::move_mount_to(fd, &at("lower"))
            .map_err(ctx(format!("attach template `{}`", img.name)))?,
        None => bind(&img.rootfs, &at("lower"), MS_RDONLY | MS_NOSUID | MS_NODEV)?,
    }
    mount(
        Some("overlay"),
        &at("root"),
        Some("overlay"),
        MS_NOSUID | MS_NODEV,
        Some(&format!(
            "lowerdir={},upperdir={},workdir={},userxattr",
            at("lower"),
            at("upper"),
            at("work")
        )),
    )
    .map_err(ctx(format!(
        "overlay over template `{}` (needs Linux 5.11+ for overlayfs in a user namespace)",
        img.name
    )))
}

/// The mount points and files moat needs in a template's root, made in its writable layer
/// where the image lacks them: `/proc`, `/dev` (its entries), `/tmp`, the working directory,
/// mount targets, and in `/etc` the host name, `hosts`, `resolv.conf` and a passwd entry for
/// the workload's uid.
fn populate_image(policy: &Policy, root: &str) -> io::Result<()> {
    let nr = |p: &str| format!("{root}{p}");
    for d in ["/proc", "/dev", "/tmp", "/etc"] {
        ensure_dir(&nr(d))?;
    }
    let dev = nr("/dev");
    for d in ["pts", "shm"] {
        ensure_dir(&format!("{dev}/{d}"))?;
    }
    for d in DEVICES {
        let p = format!("{dev}/{d}");
        if fs::symlink_metadata(&p).is_ok_and(|m| !m.is_file()) {
            remove_any(&p)?;
        }
        touch(&p)?;
    }
    for (target, name) in DEV_LINKS {
        let p = format!("{dev}/{name}");
        if fs::symlink_metadata(&p).is_ok() {
            remove_any(&p)?;
        }
        symlink(target, &p).map_err(ctx(format!("symlink {p}")))?;
    }
    if policy.fs.sys {
        ensure_dir(&nr("/sys"))?;
    }
    fs::create_dir_all(nr(&policy.fs.workdir))
        .map_err(ctx(format!("mkdir {}", policy.fs.workdir)))?;
    for m in &policy.fs.mounts {
        let dst = nr(&m.dst);
        if Path::new(&m.src).is_dir() {
            fs::create_dir_all(&dst).map_err(ctx(format!("mkdir {}", m.dst)))?;
        } else {
            if let Some(parent) = Path::new(&dst).parent() {
                fs::create_dir_all(parent).map_err(ctx(format!("mkdir for {}", m.dst)))?;
            }
            touch(&dst)?;
        }
    }
    let etc = nr("/etc");
    let host = &policy.process.hostname;
    let write = |name: &str, body: String| {
        let p = format!("{etc}/{name}");
        if fs::symlink_metadata(&p).is_ok_and(|m| !m.is_file()) {
            remove_any(&p)?;
        }
        fs::write(&p, body).map_err(ctx(format!("write /etc/{name}")))
    };
    for (name, body) in host_files(host) {
        write(name, body)?;
    }
    // The workload's uid gets a name (`whoami`, shells, Python's getpass) if the image has
    // none for it; its home is the working directory.
    let (uid, gid) = (policy.process.uid, policy.process.gid);
    let line = format!(
        "user:x:{uid}:{gid}:sandbox user:{}:/bin/sh",
        policy.fs.workdir
    );
    if let Some(body) = with_id(&etc, "passwd", uid, &line) {
        write("passwd", body)?;
    }
    if let Some(body) = with_id(&etc, "group", gid, &format!("user:x:{gid}:")) {
        write("group", body)?;
    }
    if let Some(ca) = &policy.network.ca_pem {
        ensure_dir(&format!("{etc}/ssl"))?;
        trust_ca(&etc, ca)?;
    }
    Ok(())
}

/// The image's `/etc/{file}` with `line` added when no entry has id `id` (the third field);
/// `None` when one has.
fn with_id(etc: &str, file: &str, id: u32, line: &str) -> Option<String> {
    let mut body = fs::read_to_string(format!("{etc}/{file}")).unwrap_or_default();
    let id = id.to_string();
    if body
        .lines()
        .any(|l| l.split(':').nth(2) == Some(id.as_str()))
    {
        return None;
    }
    if !body.is_empty() && !body.ends_with('\n') {
        body.push('\n');
    }
    body.push_str(line);
    body.push('\n');
    Some(body)
}

/// A directory at `p` (an image's symlink or file there is replaced: moat mounts its own).
fn ensure_dir(p: &str) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => {
            remove_any(p)?;
            fs::create_dir(p).map_err(ctx(format!("mkdir {p}")))
        }
        Err(_) => fs::create_dir_all(p).map_err(ctx(format!("mkdir {p}"))),
    }
}

fn remove_any(p: &str) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(_) => Ok(()),
    }
    .map_err(ctx(format!("remove {p}")))
}

/// Switches into the root [`build`] prepared: the host's tree is detached for good.
pub fn enter(root: &str) -> io::Result<()> {
    std::env::set_current_dir(root).map_err(ctx("chdir to the new root"))?;
    pivot_root(".", ".").map_err(ctx("pivot_root into the sandbox root"))?;
    umount2(".", MNT_DETACH).map_err(ctx("detach the host root"))?;
    std::env::set_current_dir("/").map_err(ctx("chdir /"))?;
    Ok(())
}

/// `/dev`: device nodes bound from the host's, a private devpts and a tmpfs `/dev/shm`. In a
/// skeleton the entries exist already (and `/dev` is read-only with the root); in a given
/// root `/dev` becomes a small tmpfs first.
fn build_dev(policy: &Policy, dev: &str, prepared: bool) -> io::Result<()> {
    if !prepared {
        tmpfs(
            dev,
            MS_NOSUID | MS_NOEXEC,
            "mode=0755,size=64k,nr_inodes=64",
        )?;
        for d in DEVICES {
            touch(&format!("{dev}/{d}"))?;
        }
        mkdir_p(&format!("{dev}/pts"))?;
        mkdir_p(&format!("{dev}/shm"))?;
        for (target, name) in DEV_LINKS {
            symlink(target, format!("{dev}/{name}"))?;
        }
    }
    for d in DEVICES {
        // One bind, no remount: nosuid/noexec mean nothing on a device node.
        bind_plain(&format!("/dev/{d}"), &format!("{dev}/{d}"))?;
    }
    mount(
        Some("devpts"),
        &format!("{dev}/pts"),
        Some("devpts"),
        MS_NOSUID | MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(ctx("mount /dev/pts"))?;
    tmpfs(
        &format!("{dev}/shm"),
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        &format!("mode=1777,size={},nr_inodes=4096", policy.limits.tmp_size),
    )?;
    if !prepared {
        remount_ro(dev)?;
    }
    Ok(())
}

/// Symlinks in `/dev`: (target, name).
const DEV_LINKS: &[(&str, &str)] = &[
    ("pts/ptmx", "ptmx"),
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
];

/// Where moat keeps its run-time state: `$MOAT_RUN_DIR`, else `/run/moat` as root, else
/// `$XDG_RUNTIME_DIR/moat`, else `/tmp/moat-UID`.
pub fn run_dir(rootless: bool) -> PathBuf {
    if let Some(d) = std::env::var_os("MOAT_RUN_DIR") {
        return PathBuf::from(d);
    }
    if !rootless {
        return PathBuf::from("/run/moat");
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(x).join("moat");
    }
    PathBuf::from(format!("/tmp/moat-{}", moat_sys::process::effective_uid()))
}

/// Checks that `dir` is a real directory owned by us and writable by nobody else (a shared
/// `/tmp` must not let another user plant or swap it).
fn check_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(dir)?;
    let me = moat_sys::process::effective_uid();
    if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} must be a directory owned by uid {me} and writable only by it; remove it or set MOAT_RUN_DIR",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// The empty directory sandboxes build their root on (each in its own mount namespace, so the
/// host only ever sees it empty). Created on first use.
pub fn mountpoint(rootless: bool) -> io::Result<String> {
    let base = run_dir(rootless);
    let dir = base.join("root");
    if !dir.is_dir() {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(ctx(format!("create {}", dir.display())))?;
    }
    check_private_dir(&base)?;
    check_private_dir(&dir)?;
    dir.into_os_string()
        .into_string()
        .map_err(|_| io::Error::other("non-UTF-8 run directory"))
}

/// Fills a fresh root tmpfs: mount points, symlinks, `/dev` entries and `/etc`.
fn populate(policy: &Policy, root: &str) -> io::Result<()> {
    let nr = |p: &str| format!("{root}{p}");
    for d in HOST_DIRS {
        let src = format!("/{d}");
        match fs::symlink_metadata(&src) {
            Ok(m) if m.file_type().is_symlink() => {
                symlink(fs::read_link(&src)?, nr(&src)).map_err(ctx(format!("symlink {src}")))?
            }
            Ok(m) if m.is_dir() => {
                mkdir_p(&nr(&src))?;
                bind(&src, &nr(&src), MS_RDONLY | MS_NOSUID | MS_NODEV)?;
            }
            _ => {}
        }
    }
    for d in [
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/tmp", "/etc", "/etc/ssl", "/root", "/home",
        "/run", "/var", "/var/tmp",
    ] {
        mkdir_p(&nr(d))?;
    }
    if policy.fs.sys {
        mkdir_p(&nr("/sys"))?;
    }
    for d in DEVICES {
        touch(&nr(&format!("/dev/{d}")))?;
    }
    for (target, name) in DEV_LINKS {
        symlink(target, nr(&format!("/dev/{name}")))?;
    }
    fill_etc(policy, &nr("/etc"))?;
    mkdir_p(&nr(&policy.fs.workdir))?;
    for m in &policy.fs.mounts {
        let dst = nr(&m.dst);
        if Path::new(&m.src).is_dir() {
            mkdir_p(&dst)?;
        } else {
            if let Some(parent) = Path::new(&dst).parent() {
                fs::create_dir_all(parent).map_err(ctx(format!("mkdir for {}", m.dst)))?;
            }
            touch(&dst)?;
        }
    }
    Ok(())
}

/// The system bundle (Debian's), which tools read when no variable names another.
pub(crate) const SYSTEM_BUNDLE: &str = "ssl/certs/ca-certificates.crt";

/// Makes the sandbox trust its proxy's CA: the CA alone and the host's bundle plus it as
/// files of the sandbox's `/etc/ssl`, the second also bound over the system bundle.
fn trust_ca(etc: &str, ca: &str) -> io::Result<()> {
    fs::write(format!("{etc}/ssl/moat-ca.crt"), ca).map_err(ctx("write /etc/ssl/moat-ca.crt"))?;
    let mut bundle = fs::read(format!("/etc/{SYSTEM_BUNDLE}")).unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca.as_bytes());
    let dst = format!("{etc}/ssl/moat-bundle.crt");
    fs::write(&dst, &bundle).map_err(ctx("write /etc/ssl/moat-bundle.crt"))?;
    let system = format!("{etc}/{SYSTEM_BUNDLE}");
    if Path::new(&system).exists() {
        bind(&dst, &system, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)?;
    }
    Ok(())
}

fn fill_etc(policy: &Policy, etc: &str) -> io::Result<()> {
    for f in ETC_FILES {
        let src = format!("/etc/{f}");
        let dst = format!("{etc}/{f}");
        match fs::symlink_metadata(&src) {
            Ok(m) if m.file_type().is_symlink() => {
                symlink(fs::read_link(&src)?, &dst).map_err(ctx(format!("symlink {dst}")))?
            }
            // Only world-readable files: nothing the host keeps private is copied. A file of
            // more than a page is bound read-only instead: the sandbox reads the same bytes
            // (from the host's page cache, shared by every sandbox) rather than a private
            // copy in its root tmpfs (ld.so.cache, mime.types and services: ~130 KiB of
            // memory per sandbox, and the copying). It cannot write it: read-only mount,
            // root-owned on the host, and outside Landlock's writable paths.
            Ok(m)
                if m.is_file() && m.len() <= 4 << 20 && {
                    use std::os::unix::fs::PermissionsExt;
                    m.permissions().mode() & 0o004 != 0
                } =>
            {
                if m.len() > ETC_COPY_MAX {
                    touch(&dst)?;
                    bind(&src, &dst, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)?;
                } else {
                    moat_sys::fs::copy_small_file(&src, &dst, 0o644, 1 << 20)
                        .map_err(ctx(format!("copy {src}")))?;
                }
            }
            _ => {}
        }
    }
    for d in ETC_DIRS {
        let src = format!("/etc/{d}");
        if fs::symlink_metadata(&src).is_ok_and(|m| m.is_dir()) {
            let dst = format!("{etc}/{d}");
            mkdir_p(&dst)?;
            bind(&src, &dst, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)?;
        }
    }
    if let Some(ca) = &policy.network.ca_pem {
        trust_ca(etc, ca)?;
    }
    let (uid, gid) = (policy.process.uid, policy.process.gid);
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
    for (name, body) in host_files(host) {
        write(name, body)?;
    }
    Ok(())
}

/// The `/etc` files that name the sandbox's host and its (absent) network, every tier alike:
/// (name, contents).
pub(crate) fn host_files(host: &str) -> [(&'static str, String); 3] {
    [
        ("hostname", format!("{host}\n")),
        (
            "hosts",
            format!(
                "127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            ),
        ),
        ("resolv.conf", "# no network in this sandbox\n".to_string()),
    ]
}
