//! Rootless runs and `moat doctor`.

use super::harness::*;
use moat_api::{ExecResult, Status};
use std::process::Command;

/// Runs `moat ARGS` as the unprivileged user `nobody` (65534) with setpriv, under a timeout.
fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .args([
            "60",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .arg(moat_bin())
        .args(args)
        .current_dir("/")
        .output()
        .expect("run setpriv")
}

/// How the gvisor tier refuses a run by an ordinary user.
const GVISOR_NEEDS_ROOT: &str = "refusing to run: the gvisor tier needs root here (runsc starts \
     its sandbox and gofer as root): run moat as root, or use tier native";

fn can_setpriv() -> bool {
    require(
        have("setpriv"),
        "setpriv (util-linux) to run moat as an ordinary user",
    ) && require(
        moat_sys::process::effective_uid() == 0,
        "root, to switch to an ordinary user",
    )
}

#[test]
fn rootless_without_cgroup_delegation_refuses_with_the_fix() {
    if !can_setpriv() {
        return;
    }
    let host = moat_backend::cgroup::Host::detect();
    if host.version == moat_backend::cgroup::Version::V2 {
        // A v2 host may delegate to nobody; only the v1 case is certain here.
        eprintln!("SKIP: cgroup v2 host (the refusal depends on its delegation)");
        return;
    }
    let out = as_nobody(&["run", "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    if gvisor() {
        // Accepted outcome in the gvisor tier: an ordinary user is refused before cgroups
        // come into it (moat's gvisor backend runs runsc as root only), with the way out.
        assert_eq!(
            err.trim_end(),
            format!("moat: {}", GVISOR_NEEDS_ROOT),
            "{err}"
        );
        return;
    }
    assert!(err.contains("cgroup limits are not available"), "{err}");
    assert!(err.contains("allow_missing"), "{err}");
}

#[test]
fn rootless_run_maps_the_users_own_uid_and_reports_missing_limits() {
    if !can_setpriv() {
        return;
    }
    let out = as_nobody(&[
        "run",
        "--json",
        "--allow-missing",
        "cgroups",
        "--",
        "/bin/sh",
        "-c",
        "id -u; cat /proc/self/uid_map; echo hi > /work/f && cat /work/f",
    ]);
    let r: ExecResult = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    if gvisor() {
        // Accepted outcome in the gvisor tier: rootless runs are refused (moat's gvisor
        // backend runs runsc as root only), with the way out, and nothing ran.
        assert_eq!(r.status, Status::Error, "{r:?}");
        assert_eq!(r.message.as_deref(), Some(GVISOR_NEEDS_ROOT));
        assert_eq!(out.status.code(), Some(125));
        assert_eq!(r.stdout, "");
        return;
    }
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "1000");
    let map: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(map, ["1000", "65534", "1"]);
    assert_eq!(lines[2], "hi");
    assert!(r.sandbox.landlock_abi > 0);
    assert!(r.sandbox.seccomp);
    if r.sandbox.cgroup == "none" {
        assert!(
            r.sandbox
                .missing
                .iter()
                .any(|m| m.starts_with("memory limit")),
            "{:?}",
            r.sandbox.missing
        );
    }
}

#[test]
fn root_runs_get_distinct_host_uid_ranges() {
    if !require(moat_sys::process::effective_uid() == 0, "root") {
        return;
    }
    // Two sandboxes alive at once: each reports its uid_map; the host ranges must differ.
    let a = std::thread::spawn(|| sh(&[], "cat /proc/self/uid_map; sleep 1"));
    let b = std::thread::spawn(|| sh(&[], "cat /proc/self/uid_map; sleep 1"));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    if gvisor() {
        // Accepted outcome in the gvisor tier: uids inside are gVisor's own (its kernel's
        // user namespace maps every uid to itself), not host uids; on the host each
        // sandbox is its sentry, which runs as nobody in a one-uid user namespace.
        assert_eq!(a.status, Status::Ok, "{a:?}");
        assert_eq!(b.status, Status::Ok, "{b:?}");
        for r in [&a, &b] {
            let f: Vec<&str> = r.stdout.split_whitespace().collect();
            assert_eq!(f, ["0", "0", "4294967295"], "{}", r.stdout);
        }
        return;
    }
    let host_base = |r: &ExecResult| -> u64 {
        let f: Vec<&str> = r.stdout.split_whitespace().collect();
        assert_eq!(f[0], "0", "{}", r.stdout);
        assert_eq!(f[2], "65536", "{}", r.stdout);
        f[1].parse().unwrap()
    };
    let (ba, bb) = (host_base(&a), host_base(&b));
    assert_ne!(ba, bb);
    assert!(ba >= 0x4000_0000 && bb >= 0x4000_0000);
    assert!(ba.abs_diff(bb) >= 65536);
}

/// runsc's own cgroups (`runsc-NNNNNN`): at the top of cgroup v2, or of each v1 hierarchy.
fn runsc_cgroups() -> Vec<std::path::PathBuf> {
    let runsc = |e: &std::fs::DirEntry| e.file_name().to_string_lossy().starts_with("runsc-");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        if runsc(&e) {
            out.push(e.path());
        } else if let Ok(rd) = std::fs::read_dir(e.path()) {
            out.extend(rd.flatten().filter(runsc).map(|e| e.path()));
        }
    }
    out.sort();
    out
}

#[test]
fn doctor_reports_each_layer() {
    let runsc_before = runsc_cgroups();
    let out = Command::new(moat_bin())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "user namespaces",
        "seccomp",
        "landlock",
        "cgroups",
        "gvisor (runsc)",
        "kvm",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    assert_eq!(v["tiers"]["native"], true);
    assert_eq!(out.status.code(), Some(0));
    // Every failed check carries a fix.
    for c in v["checks"].as_array().unwrap() {
        if c["ok"] == false {
            assert!(c["fix"].as_str().is_some_and(|f| !f.is_empty()), "{c}");
        }
    }
    let text = Command::new(moat_bin()).arg("doctor").output().unwrap();
    let t = String::from_utf8_lossy(&text.stdout);
    assert!(
        t.contains("landlock") && t.contains("tiers: native available"),
        "{t}"
    );
    // Its runsc probes (one of which hangs and is killed on a nested-KVM host) leave no
    // cgroup of runsc's behind.
    let left: Vec<_> = runsc_cgroups()
        .into_iter()
        .filter(|p| !runsc_before.contains(p))
        .collect();
    assert!(left.is_empty(), "moat doctor left runsc cgroups: {left:?}");
}

#[test]
fn landlock_minimum_above_the_kernel_is_refused() {
    let dir = scratch_dir("llmin");
    let p = dir.join("p.toml");
    std::fs::write(&p, "[security]\nlandlock_min_abi = 60\n").unwrap();
    let r = moat_raw(
        &["run", "--policy", p.to_str().unwrap(), "--", "/bin/true"],
        None,
        std::time::Duration::from_secs(30),
    );
    assert_eq!(r.code, 125);
    assert!(
        r.stderr.contains("Landlock ABI") && r.stderr.contains("minimum 60"),
        "{}",
        r.stderr
    );
}
