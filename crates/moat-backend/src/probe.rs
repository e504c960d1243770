//! What this host supports, and the fix for each thing it lacks (`moat doctor`).

use crate::cgroup;
use std::fs;

/// The facts `moat run` needs before it starts a sandbox (cheap: a few reads and syscalls).
#[derive(Clone, Debug)]
pub struct HostSupport {
    /// Why user namespaces cannot be created here, with the fix; `None` when they can.
    pub userns_blocked: Option<String>,
    pub seccomp: bool,
    /// 0 when Landlock is absent.
    pub landlock_abi: u32,
    pub cgroups: cgroup::Host,
}

fn read_num(path: &str) -> Option<i64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Reads the sysctls and LSM switches that block user namespaces.
pub fn userns_blocked() -> Option<String> {
    if read_num("/proc/sys/user/max_user_namespaces") == Some(0) {
        return Some(
            "user namespaces are disabled (user.max_user_namespaces = 0): run \
             `sysctl -w user.max_user_namespaces=15000`"
                .into(),
        );
    }
    let root = moat_sys::process::effective_uid() == 0;
    if !root && read_num("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        return Some(
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0): \
             run `sysctl -w kernel.unprivileged_userns_clone=1`, or run moat as root"
                .into(),
        );
    }
    if !root && read_num("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        return Some(
            "AppArmor restricts unprivileged user namespaces \
             (kernel.apparmor_restrict_unprivileged_userns = 1): run moat as root, add an \
             AppArmor profile for the moat binary that allows `userns`, or run \
             `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`"
                .into(),
        );
    }
    None
}

/// Probes the host.
pub fn host_support() -> HostSupport {
    HostSupport {
        userns_blocked: userns_blocked(),
        seccomp: moat_sys::seccomp::supported(),
        landlock_abi: moat_sys::landlock::abi_version(),
        cgroups: cgroup::Host::detect(),
    }
}

/// One line of `moat doctor`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// What to do when `ok` is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: &str, ok: bool, detail: String, fix: Option<String>) -> Check {
    Check {
        name: name.to_string(),
        ok,
        detail,
        fix: if ok { None } else { fix },
    }
}

/// Every check `moat doctor` prints. `try_userns` is a closure that really creates a user
/// namespace (the binary forks for it) and returns the error, if any.
pub fn doctor(try_userns: impl FnOnce() -> Result<(), String>) -> Vec<Check> {
    let hs = host_support();
    let mut out = Vec::new();
    let root = moat_sys::process::effective_uid() == 0;
    out.push(check(
        "user",
        true,
        if root {
            "running as root: each sandbox gets its own host uid range".into()
        } else {
            "running rootless: the sandbox's user maps to your own uid".into()
        },
        None,
    ));
    let userns = match &hs.userns_blocked {
        Some(why) => Err(why.clone()),
        None => try_userns(),
    };
    out.push(check(
        "user namespaces",
        userns.is_ok(),
        match &userns {
            Ok(()) => "a user namespace with pid, mount, net, ipc and uts namespaces was created".into(),
            Err(e) => e.clone(),
        },
        Some(
            "enable user namespaces (see the detail), or run moat as root; the native tier cannot run without them"
                .into(),
        ),
    ));
    out.push(check(
        "seccomp",
        hs.seccomp,
        if hs.seccomp {
            "seccomp-bpf filters are supported".into()
        } else {
            "no seccomp filter support".into()
        },
        Some("use a kernel built with CONFIG_SECCOMP_FILTER=y".into()),
    ));
    out.push(check(
        "landlock",
        hs.landlock_abi > 0,
        if hs.landlock_abi > 0 {
            format!("Landlock ABI {} (filesystem rules{}{})", hs.landlock_abi,
                if hs.landlock_abi >= 5 { ", device ioctls" } else { "" },
                if hs.landlock_abi >= 6 { ", signal and abstract-socket scoping" } else { "" })
        } else {
            "Landlock is not available".into()
        },
        Some("use a 5.13+ kernel with CONFIG_SECURITY_LANDLOCK=y and `landlock` in the lsm= boot parameter, or allow running without it in the policy (security.allow_missing = [\"landlock\"])".into()),
    ));
    let cg = &hs.cgroups;
    out.push(check(
        "cgroups",
        cg.missing.is_empty(),
        {
            let have: Vec<&str> = cg.parents.iter().map(|(c, _)| c.name()).collect();
            let mut d = format!("cgroup {}; usable controllers: {}", cg.version.as_str(),
                if have.is_empty() { "none".to_string() } else { have.join(", ") });
            if let Some((_, p)) = cg.parents.first() {
                d.push_str(&format!(" (under {})", p.display()));
            }
            for (c, why) in &cg.missing {
                d.push_str(&format!("; {} missing: {why}", c.name()));
            }
            d
        },
        Some("run as root, or on cgroup v2 with delegation (`systemd-run --user --scope -p Delegate=yes moat ...`); or allow running without limits in the policy (security.allow_missing = [\"cgroups\"])".into()),
    ));
    out.extend(gvisor_checks(&crate::gvisor::probe()));
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    out.push(check(
        "kvm",
        kvm,
        if kvm {
            "/dev/kvm opens read-write (the microvm tier can use hardware virtualisation)".into()
        } else {
            "/dev/kvm is missing or not accessible".into()
        },
        Some("load kvm_intel or kvm_amd and add your user to the `kvm` group (needed only for a fast microvm tier)".into()),
    ));
    out
}

/// `moat doctor`'s lines for the gvisor tier: runsc (path and version), then one line per
/// platform that runsc offers, each really tried (`runsc do true`).
pub fn gvisor_checks(p: &crate::gvisor::RunscProbe) -> Vec<Check> {
    let mut out = vec![check(
        "gvisor (runsc)",
        p.path.is_some(),
        match (&p.path, &p.version) {
            (Some(path), Some(v)) => format!("{v} at {}", path.display()),
            (Some(path), None) => format!("runsc at {} (its version did not print)", path.display()),
            (None, _) => "runsc is not installed".into(),
        },
        Some("install it: `apt-get install runsc` (needed only for the gvisor tier), or set MOAT_RUNSC to its path".into()),
    )];
    for (name, r) in &p.platforms {
        out.push(check(
            &format!("gvisor platform {name}"),
            r.is_ok(),
            match r {
                Ok(ms) => format!("`runsc --platform={name} do true` ran in {ms} ms"),
                Err(e) => e.clone(),
            },
            Some(if name == "kvm" {
                "needs a working /dev/kvm (not nested or restricted); the gvisor tier uses ptrace by default (MOAT_GVISOR_PLATFORM picks another)".into()
            } else {
                format!("run `runsc --platform={name} do true` as root to see why; MOAT_GVISOR_PLATFORM picks the platform the gvisor tier uses")
            }),
        ));
    }
    out
}

/// Whether the gvisor tier can run here, from [`doctor`]'s checks: runsc is installed and
/// the platform the tier uses ([`crate::gvisor::platform`], ptrace by default) works.
pub fn gvisor_available(checks: &[Check]) -> bool {
    let platform = format!("gvisor platform {}", crate::gvisor::platform());
    let ok = |name: &str| checks.iter().any(|c| c.name == name && c.ok);
    ok("gvisor (runsc)") && ok(&platform)
}
