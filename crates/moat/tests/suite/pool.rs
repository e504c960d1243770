//! Warm pools (`moat serve --pool TIER=N`), in the suite's tier: a create with the tier's
//! default policy takes a ready sandbox, any other starts cold, the pool refills, and its
//! ready sandboxes go with the daemon (on SIGTERM, or at the next start after a `kill -9`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use super::daemon::Daemon;
use super::harness::{moat_bin, tier};
use super::teardown::wait_until;

/// The ready sandboxes in `STATE_DIR/pool`: each one's directory and its stored runtime.
fn ready_dirs(state: &Path) -> Vec<(PathBuf, Value)> {
    let Ok(rd) = std::fs::read_dir(state.join("pool")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let rt = std::fs::read(e.path().join("runtime.json")).ok()?;
            Some((e.path(), serde_json::from_slice(&rt).ok()?))
        })
        .collect()
}

/// Whether a process still runs (a zombie counts as gone).
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

/// The runsc state directory of a gvisor-tier runtime (none in the native tier).
fn tier_dir(rt: &Value) -> Option<PathBuf> {
    rt["tier_state"]["dir"].as_str().map(PathBuf::from)
}

fn wait_ready(d: &Daemon, n: f64) {
    let name = format!("moat_pool_ready{{tier=\"{}\"}}", tier());
    let (ok, took) = wait_until(Duration::from_secs(120), || d.metric(&name) == Some(n));
    assert!(
        ok,
        "the pool did not reach {n} ready in {took:?}: {}",
        d.log()
    );
}

fn created_event(d: &Daemon, id: &str) -> Value {
    let ev = d
        .api("GET", &format!("/v1/sandboxes/{id}/events"), None)
        .json();
    ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "sandbox_created")
        .cloned()
        .unwrap_or_else(|| panic!("no sandbox_created event for {id}: {ev}"))
}

#[test]
fn a_pool_serves_creates_of_its_default_policy_and_refills() {
    let mut d = Daemon::start_with(&["--pool", &format!("{}=2", tier())]);
    wait_ready(&d, 2.0);
    let ready = ready_dirs(&d.state);
    assert_eq!(ready.len(), 2, "{ready:?}");
    let pool_pids: Vec<u64> = ready
        .iter()
        .map(|(_, rt)| rt["init_pid"].as_u64().unwrap())
        .collect();

    // Two creates of the default policy: each takes one of the ready sandboxes.
    let a = d.create(json!({"timeout_s": 7, "metadata": {"who": "a"}}));
    let b = d.create(json!({}));
    assert_eq!(d.metric("moat_pool_hits_total"), Some(2.0));
    assert_eq!(d.metric("moat_pool_misses_total"), Some(0.0));
    let mut taken = Vec::new();
    for id in [&a, &b] {
        let ev = created_event(&d, id);
        assert_eq!(ev["data"]["pooled"], true, "{ev}");
        taken.push(ev["data"]["pid"].as_u64().unwrap());
        // The pool's directory moved to the sandbox's, without the pool's runtime file.
        let dir = d.state.join("sandboxes").join(id);
        assert!(dir.join("agent.sock").exists(), "{}", dir.display());
        assert!(!dir.join("runtime.json").exists());
    }
    taken.sort();
    let mut want = pool_pids.clone();
    want.sort();
    assert_eq!(taken, want, "the creates took the pool's sandboxes");

    // The take gives the sandbox its own lifetime, metadata and tier, from the call.
    let sa = d.api("GET", &format!("/v1/sandboxes/{a}"), None).json();
    assert_eq!(
        sa["expires_at"].as_u64().unwrap() - sa["created_at"].as_u64().unwrap(),
        7000,
        "{sa}"
    );
    assert_eq!(sa["metadata"]["who"], "a");
    assert_eq!(sa["tier"], tier());
    assert_eq!(sa["sandbox"]["tier"], tier(), "{sa}");

    // Each is a sandbox of its own, working: exec and the file API.
    let r = d.sh(&a, "echo mine > /work/f && cat /work/f && id -u");
    assert_eq!(r["stdout"], "mine\n1000\n", "{r}");
    let r = d.sh(&b, "cat /work/f 2>&1; echo $?");
    assert_eq!(
        r["stdout"], "cat: /work/f: No such file or directory\n1\n",
        "{r}"
    );
    let f = d.api(
        "GET",
        &format!("/v1/sandboxes/{a}/files?path=/work/f"),
        None,
    );
    assert_eq!(f.status, 200, "{}", f.text());
    assert_eq!(f.text(), "mine\n");

    // Another policy starts cold, and still works.
    let c = d.create(json!({"policy": {"limits": {"memory": "300M"}}}));
    assert_eq!(d.metric("moat_pool_misses_total"), Some(1.0));
    assert_eq!(d.metric("moat_pool_hits_total"), Some(2.0));
    assert_eq!(created_event(&d, &c)["data"]["pooled"], false);
    assert_eq!(d.sh(&c, "echo cold")["stdout"], "cold\n");

    // The pool refills with new sandboxes.
    wait_ready(&d, 2.0);
    let refilled = ready_dirs(&d.state);
    assert_eq!(refilled.len(), 2);
    for (_, rt) in &refilled {
        let pid = rt["init_pid"].as_u64().unwrap();
        assert!(!pool_pids.contains(&pid), "pid {pid} was taken already");
        assert!(running(pid));
    }

    for id in [&a, &b, &c] {
        let r = d.api("DELETE", &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(r.status, 204, "{}", r.text());
    }
    for pid in &taken {
        assert!(!running(*pid), "a deleted pooled sandbox's init {pid} runs");
    }

    // SIGTERM: the ready sandboxes go with the daemon; nothing of them is left.
    let st = d.stop();
    assert!(st.success(), "moat serve: {st}: {}", d.log());
    for (dir, rt) in &refilled {
        let pid = rt["init_pid"].as_u64().unwrap();
        assert!(!running(pid), "ready sandbox {pid} outlived the daemon");
        assert!(!dir.exists(), "{} is left", dir.display());
        if let Some(t) = tier_dir(rt) {
            assert!(!t.exists(), "{} is left", t.display());
        }
    }
    assert!(!d.state.join("pool").exists());
    let left = d.cgroups_left(Duration::from_secs(10));
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

#[test]
fn a_killed_daemon_s_ready_sandboxes_are_destroyed_and_its_taken_ones_reattached() {
    let mut d = Daemon::start_with(&["--pool", &format!("{}=1", tier())]);
    wait_ready(&d, 1.0);
    // One taken from the pool before the kill: a sandbox like any other, re-attached.
    let kept = d.create(json!({}));
    assert_eq!(d.sh(&kept, "echo before > /work/f")["exit_code"], 0);
    wait_ready(&d, 1.0);
    let before = ready_dirs(&d.state);
    assert_eq!(before.len(), 1);
    let old = before[0].1["init_pid"].as_u64().unwrap();
    d.kill9();
    // A kill -9 leaves the ready sandbox running: the next daemon must find it.
    assert!(running(old), "the ready sandbox died with the daemon");
    d.restart();
    let (gone, took) = wait_until(Duration::from_secs(30), || !running(old));
    assert!(
        gone,
        "the old ready sandbox {old} still runs after {took:?}"
    );
    if let Some(t) = tier_dir(&before[0].1) {
        assert!(!t.exists(), "{} is left", t.display());
    }
    assert!(
        d.log()
            .contains("moat: destroyed 1 ready pool sandboxes a previous daemon left"),
        "{}",
        d.log()
    );
    assert!(d.log().contains("1 sandboxes re-attached"), "{}", d.log());
    let r = d.sh(&kept, "cat /work/f");
    assert_eq!(r["stdout"], "before\n", "{r}");
    assert_eq!(
        d.api("DELETE", &format!("/v1/sandboxes/{kept}"), None)
            .status,
        204
    );
    wait_ready(&d, 1.0);
    let after = ready_dirs(&d.state);
    assert_eq!(after.len(), 1);
    assert_ne!(after[0].1["init_pid"].as_u64().unwrap(), old);
    assert!(d.stop().success());
    assert!(!running(after[0].1["init_pid"].as_u64().unwrap()));
}

#[test]
fn bad_pool_flags_are_refused_with_what_to_write() {
    for (flag, want) in [
        (
            "gvisor",
            "--pool gvisor: write TIER=N, e.g. --pool gvisor=2",
        ),
        (
            "vm=1",
            "--pool vm=1: policy: tier: `vm` is not a tier: write `native` or `gvisor`",
        ),
        ("native=x", "--pool native=x: N must be a whole number"),
        (
            "native=65",
            "--pool native=65: 65 is more than the 64 ready sandboxes a pool may keep",
        ),
    ] {
        let out = Command::new(moat_bin())
            .args(["serve", "--listen", "127.0.0.1:1", "--pool", flag])
            .output()
            .expect("run moat serve");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--pool {flag}: {err}");
        assert!(err.contains(want), "--pool {flag}: {err}");
    }
}

#[test]
fn a_ready_sandbox_that_died_is_not_handed_out() {
    let mut d = Daemon::start_with(&["--pool", &format!("{}=1", tier())]);
    wait_ready(&d, 1.0);
    let ready = ready_dirs(&d.state);
    assert_eq!(ready.len(), 1);
    let (dir, rt) = &ready[0];
    let pid = rt["init_pid"].as_u64().unwrap();
    // The sandbox dies while it waits (its init, or gVisor's sentry, is killed).
    moat_sys::process::kill(pid as i32, libc::SIGKILL).expect("kill the ready sandbox");
    let (gone, _) = wait_until(Duration::from_secs(10), || !running(pid));
    assert!(gone, "the ready sandbox {pid} did not die");
    // The create starts a sandbox cold rather than hand out the dead one, which is cleaned up.
    let id = d.create(json!({}));
    assert_eq!(d.metric("moat_pool_misses_total"), Some(1.0));
    assert_eq!(d.metric("moat_pool_hits_total"), Some(0.0));
    assert_eq!(created_event(&d, &id)["data"]["pooled"], false);
    assert_eq!(d.sh(&id, "echo alive")["stdout"], "alive\n");
    let tier_left = tier_dir(rt);
    let (cleaned, _) = wait_until(Duration::from_secs(10), || {
        !dir.exists() && tier_left.as_ref().is_none_or(|t| !t.exists())
    });
    assert!(cleaned, "{} or {tier_left:?} is left", dir.display());
    assert!(
        d.log().contains("a ready sandbox died; starting another"),
        "{}",
        d.log()
    );
    wait_ready(&d, 1.0);
    assert_eq!(
        d.api("DELETE", &format!("/v1/sandboxes/{id}"), None).status,
        204
    );
    assert!(d.stop().success());
}
