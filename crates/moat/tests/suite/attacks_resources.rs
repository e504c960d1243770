//! Resource exhaustion (SECURITY.md): each attack is stopped with a clear status (`oom`,
//! `timeout`, `output_limit`, or a plain errno the program sees and status `ok`), and the host
//! and moat stay healthy: moat reports a result in bounded time and memory, and nothing of the
//! sandbox is left running.
//!
//! The attack program is `tests/attacks/res.c`: it prints `RAN MODE` before the attack and one
//! `name: VALUE` line per outcome. A unique marker is passed as its last argument, so that
//! leftovers can be found on the host by command line.

use super::harness::*;
use super::teardown::{processes_running, unique_marker, wait_until, OwnFence};
use moat_api::{ExecResult, Status};
use std::time::{Duration, Instant};

/// Builds `res.c` once per test (each test gets its own copy, as the harness does).
fn res() -> Option<std::path::PathBuf> {
    compile_c("res")
}

/// Runs `/attack/res MODE ARGS... MARKER` with `opts`; returns the result and the marker.
fn run_res(mode: &str, args: &[&str], opts: &[&str]) -> Option<(ExecResult, String)> {
    let dir = res()?;
    let marker = unique_marker(mode);
    let mut a = vec![mode];
    a.extend_from_slice(args);
    a.push(&marker);
    let r = attack(&dir, "res", &a, opts);
    Some((r, marker))
}

/// Nothing whose command line has `marker` is left on the host.
fn nothing_left(marker: &str) {
    assert_eq!(
        host_processes_matching(marker),
        Vec::<String>::new(),
        "left running on the host"
    );
}

fn assert_oom(r: &ExecResult, ran: &str) {
    assert_eq!(r.status, Status::Oom, "{r:?}");
    assert_eq!(r.signal, Some(9), "{r:?}");
    assert_eq!(r.exit_code, None, "{r:?}");
    assert_eq!(r.stdout, format!("RAN {ran}\n"), "{r:?}");
    assert_eq!(
        r.message.as_deref(),
        Some("the sandbox ran out of its 64 MiB memory limit and the kernel killed the command")
    );
}

// ---- fork bomb ----

#[test]
fn fork_bomb_hits_the_pids_limit_with_eagain() {
    // Every process forks forever; the first one reports after 1 s and exits, which ends the
    // sandbox. pids.max 32 = init + the reporter + 30 bombers.
    let Some((r, marker)) = run_res("forkbomb", &["1"], &["--pids", "32", "--timeout", "20s"])
    else {
        return;
    };
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    if gvisor() {
        // Accepted outcome in the gvisor tier: the limit is RLIMIT_NPROC (32) inside gVisor,
        // which counts the workload user's processes only (the agent runs under a uid of its
        // own), so the reporter and 31 bombers; the bombers retry more slowly under gVisor's
        // ptrace platform, so the count of refused forks in the second is not asserted.
        assert!(
            r.stdout
                .starts_with("RAN forkbomb\nforks_ok: 31\nfork_failed: EAGAIN\n")
                || r.stdout
                    .starts_with("RAN forkbomb\nforks_ok: 32\nfork_failed: EAGAIN\n"),
            "{r:?}"
        );
        assert!(r.stdout.ends_with("other_failures: 0\n"), "{r:?}");
    } else {
        assert_eq!(
            r.stdout,
            "RAN forkbomb\nforks_ok: 30\nfork_failed: EAGAIN\neagain_over_1000: yes\nother_failures: 0\n"
        );
    }
    nothing_left(&marker);
}

#[test]
fn fork_bomb_that_never_stops_ends_at_the_timeout() {
    let Some((r, marker)) = run_res("forkbomb", &["600"], &["--pids", "32", "--timeout", "2s"])
    else {
        return;
    };
    assert_eq!(r.status, Status::Timeout, "{r:?}");
    assert_eq!(r.signal, Some(9), "{r:?}");
    assert_eq!(r.stdout, "RAN forkbomb\n");
    assert!((2000..4000).contains(&r.wall_ms), "{r:?}");
    nothing_left(&marker);
}

#[test]
fn shell_fork_bomb_is_contained() {
    // The classic `:(){ :|:& };:` (as `b`): it spawns until the pids limit refuses, each shell
    // backgrounds and returns, so the workload itself exits at once and its init's exit kills
    // every bomber left in the sandbox.
    let marker = unique_marker("shbomb");
    let r = sh(
        &["--pids", "32", "--timeout", "3s"],
        &format!("echo RAN; b() {{ b | b & }}; b; sleep 1; : {marker}"),
    );
    assert_eq!(r.stdout, "RAN\n", "{r:?}");
    assert!(
        r.stderr.contains("Cannot fork"),
        "the bomb never hit the pids limit: {r:?}"
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    // 0, or 2 when the bombers took the last pids before the workload's own shell forked
    // `sleep` (the same limit refusing it too: "Cannot fork").
    assert!(matches!(r.exit_code, Some(0) | Some(2)), "{r:?}");
    nothing_left(&marker);
}

// ---- memory ----

#[test]
fn heap_balloon_is_oom() {
    let Some((r, marker)) = run_res("heap", &["1024"], &["--memory", "64M"]) else {
        return;
    };
    assert_oom(&r, "heap");
    nothing_left(&marker);
}

#[test]
fn python_heap_balloon_exits_137() {
    if !require(have("python3"), "python3 on the host") {
        return;
    }
    let r = moat_raw(
        &[
            "run",
            "--memory",
            "64M",
            "--",
            "python3",
            "-c",
            "print('RAN', flush=True); b = b'x' * (1 << 30); print('survived')",
        ],
        None,
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 137, "{}", r.stderr);
    assert_eq!(r.stdout_str(), "RAN\n");
    assert_eq!(
        r.stderr,
        "moat: oom: the sandbox ran out of its 64 MiB memory limit and the kernel killed the command\n"
    );
}

#[test]
fn map_populate_balloon_is_oom() {
    let Some((r, marker)) = run_res("populate", &["1024"], &["--memory", "64M"]) else {
        return;
    };
    assert_oom(&r, "populate");
    nothing_left(&marker);
}

#[test]
fn memfd_balloon_is_oom() {
    let Some((r, marker)) = run_res("memfd", &["1024"], &["--memory", "64M"]) else {
        return;
    };
    assert_oom(&r, "memfd");
    nothing_left(&marker);
}

#[test]
fn tmpfs_bigger_than_the_memory_limit_is_oom() {
    // The working directory's tmpfs (256M) is bigger than the memory limit (64M): its pages
    // count against the sandbox's memory, so filling it ends in the OOM killer, not in host
    // memory pressure.
    let Some((r, marker)) = run_res("fill", &["/work/f", "1024"], &["--memory", "64M"]) else {
        return;
    };
    assert_oom(&r, "fill");
    nothing_left(&marker);
}

// ---- disk and inodes ----

#[test]
fn tmp_and_shm_fill_stop_at_tmp_size_with_enospc() {
    let r = sh(
        &[],
        "echo RAN; \
         dd if=/dev/zero of=/tmp/f bs=1M count=200 2>/work/err; echo tmp_rc=$?; head -1 /work/err >&2; \
         du -m /tmp/f; rm /tmp/f; \
         dd if=/dev/zero of=/dev/shm/f bs=1M count=200 2>/work/err; echo shm_rc=$?; head -1 /work/err >&2; \
         du -m /dev/shm/f",
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(
        r.stdout,
        "RAN\ntmp_rc=1\n64\t/tmp/f\nshm_rc=1\n64\t/dev/shm/f\n"
    );
    assert_eq!(
        r.stderr,
        "dd: error writing '/tmp/f': No space left on device\n\
         dd: error writing '/dev/shm/f': No space left on device\n"
    );
}

#[test]
fn disk_fill_gets_enospc_at_each_tmpfs_size() {
    let Some(dir) = res() else {
        return;
    };
    for (path, mib) in [("/tmp/f", 64), ("/dev/shm/f", 64), ("/work/f", 256)] {
        let r = attack(&dir, "res", &["fill", path, "1024"], &[]);
        assert_eq!(r.status, Status::Ok, "{path}: {r:?}");
        assert_eq!(
            r.stdout,
            format!("RAN fill\nfill_mib: {mib}\nfill: ENOSPC\n"),
            "{path}"
        );
    }
}

#[test]
fn inode_fill_gets_enospc_at_nr_inodes() {
    let Some(dir) = res() else {
        return;
    };
    if gvisor() {
        // Accepted outcome in the gvisor tier: runsc 20221219's tmpfs has no inode limit (it
        // refuses `nr_inodes` with EINVAL), so empty files are bounded only by the memory
        // they take in the sentry: the cgroup's limit is hit and the OOM kill takes the
        // sandbox, reported as `oom`, before any ENOSPC. A 64 MiB sandbox (and a timeout
        // the ptrace platform cannot reach first) keeps the run short.
        let mount = format!("{}:/attack", dir.display());
        for path in ["/tmp", "/dev/shm"] {
            let r = moat_raw(
                &[
                    "run",
                    "--json",
                    "--memory",
                    "64M",
                    "--timeout",
                    "120s",
                    "--mount",
                    &mount,
                    "--",
                    "/attack/res",
                    "inodes",
                    path,
                ],
                None,
                Duration::from_secs(180),
            )
            .json();
            assert_eq!(r.status, Status::Oom, "{path}: {r:?}");
            assert_eq!(r.signal, Some(9), "{path}: {r:?}");
            assert_eq!(r.stdout, "RAN inodes\n", "{path}: {r:?}");
            assert_eq!(
                r.message.as_deref(),
                Some(
                    "the sandbox ran out of its 64 MiB memory limit and the kernel killed the \
                     command"
                ),
                "{path}"
            );
        }
        return;
    }
    // nr_inodes=65536 on /tmp and 4096 on /dev/shm; the root directory takes one.
    for (path, files) in [("/tmp", 65535), ("/dev/shm", 4095)] {
        let r = attack(&dir, "res", &["inodes", path], &[]);
        assert_eq!(r.status, Status::Ok, "{path}: {r:?}");
        assert_eq!(
            r.stdout,
            format!("RAN inodes\nfiles: {files}\ninodes: ENOSPC\n"),
            "{path}"
        );
    }
}

// ---- fds ----

#[test]
fn fd_exhaustion_stops_at_rlimit_nofile() {
    let Some((r, _)) = run_res("fds", &[], &[]) else {
        return;
    };
    assert_eq!(r.status, Status::Ok, "{r:?}");
    // 1024 minus stdin, stdout and stderr.
    assert_eq!(
        r.stdout,
        "RAN fds\nnofile: 1024\nopened: 1021\nfds: EMFILE\n"
    );
}

// ---- cpu ----

/// Reads `name: N` from the program's output.
fn field(out: &str, name: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{name}` in {out:?}"))
}

/// CPU time (ms) the processes of a fence's cgroup have used, from the host's accounting.
fn fence_cpu_ms(fence: &OwnFence) -> u64 {
    for d in fence.dirs() {
        if let Ok(ns) = std::fs::read_to_string(d.join("cpuacct.usage")) {
            return ns.trim().parse::<u64>().expect("cpuacct.usage") / 1_000_000;
        }
        if let Ok(stat) = std::fs::read_to_string(d.join("cpu.stat")) {
            if let Some(us) = stat.lines().find_map(|l| l.strip_prefix("usage_usec ")) {
                return us.trim().parse::<u64>().expect("usage_usec") / 1000;
            }
        }
    }
    panic!("no CPU accounting in the fence {:?}", fence.dirs());
}

#[test]
fn spinning_threads_are_held_to_the_cpu_quota() {
    if gvisor() {
        // Accepted outcome in the gvisor tier: the CPU clocks inside are gVisor's, which on
        // the ptrace platform count the time a thread was in the workload, including the
        // time the host throttled it (the program sees more CPU than the quota gives, even
        // more than the two cores could). The host's own accounting of the fence (moat, runsc,
        // the sentry, its stubs) shows the quota held: about 0.5 CPU over the run.
        let Some(dir) = res() else {
            return;
        };
        let Some(fence) = OwnFence::new("cpuquota") else {
            return;
        };
        let mount = format!("{}:/attack", dir.display());
        let before = fence_cpu_ms(&fence);
        let started = Instant::now();
        let moat = moat_bin();
        let e = fence
            .spawn(
                moat.to_str().unwrap(),
                &[
                    "run",
                    "--json",
                    "--cpus",
                    "0.5",
                    "--timeout",
                    "10s",
                    "--mount",
                    &mount,
                    "--",
                    "/attack/res",
                    "spin",
                    "4",
                    "1.5",
                ],
            )
            .finish(Duration::from_secs(60));
        let took = started.elapsed().as_millis() as u64;
        let used = fence_cpu_ms(&fence) - before;
        let r = e.json();
        assert_eq!(r.status, Status::Ok, "{r:?}");
        assert!(r.stdout.starts_with("RAN spin\n"), "{r:?}");
        let wall = field(&r.stdout, "wall_ms");
        let inside = field(&r.stdout, "cpu_ms");
        eprintln!(
            "gvisor: 4 spinners, 0.5 cpus, {wall} ms wall ({took} ms the whole run): {used} ms \
             host cpu, {inside} ms as gVisor counts it"
        );
        assert!((1500..3000).contains(&wall), "{r:?}");
        // Unthrottled, four spinners on two cores would take 3 s of CPU in 1.5 s. The
        // sandbox's cgroup (runsc, the sentry, its stubs: start and teardown included)
        // gets at most half a CPU of the run's time on the host; moat itself, outside it
        // but in the fence, adds a little.
        assert!(
            used <= took / 2 + 400,
            "the CPU quota did not hold: {used} ms in {took} ms"
        );
        assert!(used >= 500, "the spinners did not spin: {used} ms");
        assert!(inside >= 500, "the spinners did not spin: {r:?}");
        return;
    }
    // Four threads spin for 1.5 s of wall time under a 0.5 CPU quota: the process gets about
    // 750 ms of CPU (it would get 3 s on two free cores).
    let Some((r, _)) = run_res(
        "spin",
        &["4", "1.5"],
        &["--cpus", "0.5", "--timeout", "10s"],
    ) else {
        return;
    };
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert!(r.stdout.starts_with("RAN spin\n"), "{r:?}");
    let wall = field(&r.stdout, "wall_ms");
    let cpu = field(&r.stdout, "cpu_ms");
    eprintln!(
        "4 spinners, 0.5 cpus, {wall} ms wall: {cpu} ms cpu; result cpu_ms {}",
        r.cpu_ms
    );
    assert!((1500..3000).contains(&wall), "{r:?}");
    assert!(
        cpu <= 1000,
        "the CPU quota did not hold: {cpu} ms in {wall} ms"
    );
    assert!(cpu >= 100, "the spinners did not spin: {cpu} ms");
    // The result's cpu_ms is the workload's own rusage, reported by init when it exits.
    assert!(r.cpu_ms.abs_diff(cpu) <= 50, "{r:?}");
}

#[test]
fn spinning_threads_forever_end_at_the_timeout() {
    let Some((r, marker)) = run_res("spin", &["4", "0"], &["--cpus", "0.5", "--timeout", "2s"])
    else {
        return;
    };
    assert_eq!(r.status, Status::Timeout, "{r:?}");
    assert_eq!(r.stdout, "RAN spin\n");
    assert_eq!(r.signal, Some(9));
    assert_eq!(r.exit_code, None);
    assert_eq!(
        r.message.as_deref(),
        Some("the command ran past its 2000 ms timeout; the sandbox was killed")
    );
    if gvisor() {
        // Accepted outcome in the gvisor tier: the agent kills the workload inside the
        // sandbox and reports its rusage before the sandbox goes, so cpu_ms is the spinners'
        // CPU as gVisor counts it (throttled time included: see
        // spinning_threads_are_held_to_the_cpu_quota), at most four threads' worth of wall.
        assert!(r.cpu_ms >= 100, "{r:?}");
        assert!(r.cpu_ms <= 4 * r.wall_ms, "{r:?}");
    } else {
        // init was killed, so nothing reported the workload's rusage: cpu_ms is 0 and the
        // only measure is the wall clock, which stops at the timeout.
        assert_eq!(r.cpu_ms, 0);
    }
    // In the gvisor tier the kill goes through the agent and the sentry's teardown on the
    // ptrace platform: up to a second more (as for the sleepers below).
    let slack = if gvisor() { 2000 } else { 1000 };
    assert!((2000..2000 + slack).contains(&r.wall_ms), "{r:?}");
    nothing_left(&marker);
}

// ---- output floods ----

#[test]
fn stdout_flood_without_newlines_is_cut_at_the_cap() {
    let marker = unique_marker("flood");
    let r = sh(
        &["--output-limit", "1M", "--timeout", "20s"],
        &format!("echo RAN >&2; yes {marker} | tr -d '\\n'"),
    );
    assert_eq!(r.status, Status::OutputLimit, "{}", r.stderr);
    assert_eq!(r.stderr, "RAN\n");
    assert!(r.truncated.stdout && !r.truncated.stderr);
    assert_eq!(r.stdout.len(), 1 << 20);
    assert!(r.stdout.starts_with(&marker));
    assert_eq!(r.signal, Some(9));
    assert_eq!(
        r.message.as_deref(),
        Some("output went over the 1048576 byte cap; the sandbox was killed")
    );
    nothing_left(&marker);
}

#[test]
fn stderr_flood_is_cut_at_the_cap() {
    let r = sh(
        &["--output-limit", "1M", "--timeout", "20s"],
        "echo RAN; cat /dev/zero >&2",
    );
    assert_eq!(r.status, Status::OutputLimit, "{r:?}");
    assert_eq!(r.stdout, "RAN\n");
    assert!(r.truncated.stderr && !r.truncated.stdout);
    assert_eq!(r.stderr.len(), 1 << 20);
    assert!(r.stderr.bytes().all(|b| b == 0));
    // Without --json moat exits 141.
    let raw = moat_raw(
        &[
            "run",
            "--output-limit",
            "1M",
            "--",
            "/bin/sh",
            "-c",
            "cat /dev/zero >&2",
        ],
        None,
        Duration::from_secs(30),
    );
    assert_eq!(raw.code, 141);
    assert_eq!(
        raw.stderr.len(),
        (1 << 20)
            + "moat: output_limit: output went over the 1048576 byte cap; the sandbox was killed\n"
                .len()
    );
}

#[test]
fn gigabyte_flood_keeps_moat_small_and_fast() {
    // 1 GiB with no newline against the default 16 MiB cap. moat runs under a python3 parent
    // that reports the peak RSS of its waited-for descendants (moat, init, the workload).
    if !require(have("python3"), "python3 on the host") {
        return;
    }
    let Some(fence) = OwnFence::new("gigaflood") else {
        return;
    };
    let moat = moat_bin();
    let start = Instant::now();
    let e = fence
        .spawn(
            "python3",
            &[
                "-c",
                "import resource, subprocess, sys\n\
                 rc = subprocess.run(sys.argv[1:]).returncode\n\
                 sys.stderr.write('RC %d MAXRSS_KB %d\\n' % (rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))",
                moat.to_str().unwrap(),
                "run",
                "--json",
                "--",
                "/bin/sh",
                "-c",
                "echo RAN >&2; yes | tr -d '\\n' | head -c 1G",
            ],
        )
        .finish(Duration::from_secs(60));
    let took = start.elapsed();
    let r = e.json();
    let line = e.stderr.trim();
    let rss: u64 = line
        .strip_prefix("RC 141 MAXRSS_KB ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    eprintln!("1 GiB flood: {took:?}, moat peak RSS {rss} KiB");
    assert_eq!(r.status, Status::OutputLimit, "{:?}", r.message);
    assert_eq!(r.stderr, "RAN\n");
    assert_eq!(r.stdout.len(), 16 << 20);
    assert!(r.truncated.stdout);
    // It holds one capped copy of the output (and one for the JSON), not the gigabyte.
    assert!(rss < 128 << 10, "moat grew to {rss} KiB");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(fence.leftovers(), Vec::<String>::new());
}

// ---- a process that will not die ----

#[test]
fn sigterm_ignoring_double_forked_sleepers_end_at_the_timeout() {
    let Some(dir) = res() else {
        return;
    };
    let marker = unique_marker("immortal");
    let m2 = marker.clone();
    let t =
        std::thread::spawn(move || attack(&dir, "res", &["immortal", &m2], &["--timeout", "2s"]));
    // While it runs: the program and its three double-forked grandchildren (each in a session
    // of its own, reparented to the sandbox's init) are on the host.
    // Accepted outcome in the gvisor tier: the workload's processes live inside gVisor's
    // sentry, so none is on the host; the program's own count from inside (its /proc) is
    // the proof that they ran, in both tiers.
    let pat = format!("/attack/res immortal {marker} ");
    let want = if gvisor() { 0 } else { 4 };
    let (seen, _) = wait_until(Duration::from_secs(10), || {
        processes_running(&pat).len() == want
    });
    let during = processes_running(&pat);
    let r = t.join().unwrap();
    assert!(seen, "the sleepers never all ran: {during:?}");
    assert_eq!(r.status, Status::Timeout, "{r:?}");
    assert_eq!(
        r.stdout,
        "RAN immortal\nimmortal: sleepers 3, in other sessions 3\nimmortal: forked\n"
    );
    assert_eq!(r.signal, Some(9));
    assert!((2000..4000).contains(&r.wall_ms), "{r:?}");
    nothing_left(&marker);
}
