//! SECURITY.md, "Information leaks": nothing of the host (environment, kernel memory and
//! logs, processes, names, paths) nor of another sandbox is visible in a default-policy
//! sandbox (native tier). Probes run `tests/attacks/fs_escape.c` (which prints `RAN <action>`
//! first) or a shell script that echoes a marker, and the tests assert the whole output.

use super::harness::*;
use moat_api::{ExecResult, Status};
use moat_backend::cgroup::{self, Cgroup};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn probe(dir: &Path, args: &[&str], opts: &[&str]) -> ExecResult {
    let r = attack(dir, "fs_escape", args, opts);
    assert_eq!(r.status, Status::Ok, "{args:?}: {r:?}");
    assert_eq!(r.exit_code, Some(0), "{args:?}: {r:?}");
    r
}

/// `moat run --json OPTS -- CMD` with `key=value` in moat's own environment (the harness
/// passes the test's environment, which a test may not change safely). Fenced like the
/// harness: a cgroup of its own with memory and pids limits, plus `timeout`.
fn run_with_host_env(key: &str, value: &str, opts: &[&str], cmd: &[&str]) -> Option<ExecResult> {
    let host = cgroup::Host::detect();
    let name = format!("moattest-leak-{}-{key}", std::process::id());
    let fence = Cgroup::create(
        &host,
        &name,
        cgroup::Limits {
            memory: 1 << 30,
            pids: 512,
            cpus: 1.0,
        },
    );
    let mut fence = match fence {
        Ok(c) => c,
        Err(e) => {
            require(false, &format!("a test cgroup fence ({e})"));
            return None;
        }
    };
    let mut script = String::new();
    for f in fence.procs_files() {
        script.push_str(&format!("echo $$ > '{}' && ", f.display()));
    }
    script.push_str("exec timeout -k 5 60 \"$0\" \"$@\"");
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg(moat_bin())
        .args(["run", "--json", "--memory", "256M", "--pids", "64"])
        .args(opts)
        .arg("--")
        .args(cmd)
        .env(key, value)
        .stdin(Stdio::null())
        .output()
        .expect("spawn moat");
    fence.destroy();
    Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "moat did not print a JSON result ({e}): {:?} stdout: {} stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }))
}

#[test]
fn host_environment_is_not_visible() {
    let secret = format!("moat-secret-{}-{:x}", std::process::id(), line!() * 7919);
    // The workload's environment is exactly moat's clean one; the secret is in moat's (and
    // so init's) memory only. /proc/1/environ: init is not dumpable, so /proc/1 belongs to
    // the host's root (unmapped, shown as nobody) and environ is 0400: EACCES for uid 1000.
    let script = "echo RAN env; env | cut -d= -f1 | sort | tr '\\n' ' '; echo; \
                  cat /proc/self/environ | tr '\\0' '\\n' | cut -d= -f1 | sort | tr '\\n' ' '; echo; \
                  cat /proc/1/environ 2>&1 >/dev/null | sed 's/.*: //'; \
                  for p in /proc/[0-9]*; do cat $p/environ $p/cmdline 2>/dev/null; done | tr '\\0' '\\n'";
    let Some(r) = run_with_host_env("MOAT_TEST_SECRET", &secret, &[], &["/bin/sh", "-c", script])
    else {
        return;
    };
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert!(
        !r.stdout.contains(&secret),
        "the host's secret leaked: {r:?}"
    );
    assert!(
        !r.stderr.contains(&secret),
        "the host's secret leaked: {r:?}"
    );
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("RAN env"));
    // `env` run by sh adds PWD (and SHLVL, `_` where the shell sets them); /proc/self/environ
    // of `tr` holds what sh exported.
    let clean = "HOME HOSTNAME LANG LOGNAME PATH PWD TMPDIR USER ";
    assert_eq!(lines.next(), Some(clean), "{r:?}");
    assert_eq!(lines.next(), Some(clean), "{r:?}");
    if gvisor() {
        // Accepted outcome in the gvisor tier: gVisor lets the workload read PID 1's
        // environ (the agent is not dumpable, but gVisor does not check that for environ;
        // see gvisor.rs). It is runsc's own start environment of the agent, PATH and HOME
        // only, never moat's: the `cat` prints no error, and the walk's first process is
        // the agent with exactly that environment and its command line.
        for want in [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "/.moat-agent",
            "__moat-gvisor-agent",
        ] {
            assert_eq!(lines.next(), Some(want), "{r:?}");
        }
    } else {
        assert_eq!(lines.next(), Some("Permission denied"), "{r:?}");
    }
}

#[test]
fn masked_proc_files_show_nothing() {
    let Some(dir) = compile_c("fs_escape") else {
        return;
    };
    // Docker's masked paths: a file the kernel has is covered by /dev/null (reads nothing),
    // a directory by an empty read-only tmpfs; one the kernel lacks stays absent (ENOENT).
    let files = [
        "/proc/kcore",
        "/proc/keys",
        "/proc/sched_debug",
        "/proc/timer_list",
        "/proc/kallsyms",
        "/proc/kmsg",
        "/proc/sysrq-trigger",
    ];
    let dirs = ["/proc/acpi", "/proc/scsi"];
    let mut args = vec!["read"];
    args.extend_from_slice(&files);
    args.extend_from_slice(&dirs);
    if gvisor() {
        // Accepted outcome in the gvisor tier: /proc is gVisor's own, which has none of
        // these (no kernel memory, keys, scheduler or timer state, symbols, log, sysrq,
        // ACPI or SCSI): ENOENT for all, with nothing of the host kernel to mask. Proof the
        // probe reads: gVisor's /proc/version (its fixed banner) reads.
        args.push("/proc/version");
        let r = probe(&dir, &args, &[]);
        let mut lines: Vec<String> = files
            .iter()
            .chain(&dirs)
            .map(|p| format!("{p}: ENOENT"))
            .collect();
        lines.push("/proc/version: 56 bytes".into());
        assert_eq!(r.stdout, expect("read", &lines));
        return;
    }
    let r = probe(&dir, &args, &[]);
    let mut lines = Vec::new();
    for f in files {
        let v = if host_has(f) { "null_mask" } else { "ENOENT" };
        lines.push(format!("{f}: {v}"));
    }
    for d in dirs {
        let v = if host_has(d) { "empty_dir" } else { "ENOENT" };
        lines.push(format!("{d}: {v}"));
    }
    assert_eq!(r.stdout, expect("read", &lines));
    // Proof that at least one mask is in force on this kernel.
    assert!(lines.iter().any(|l| l.ends_with("null_mask")), "{lines:?}");
}

#[test]
fn kernel_log_is_not_readable() {
    let Some(dir) = compile_c("fs_escape") else {
        return;
    };
    // dmesg goes through syslog(2), which the seccomp filter denies with EPERM (no
    // CAP_SYSLOG); /dev/kmsg is not in the minimal /dev.
    let r = probe(&dir, &["syslog"], &[]);
    assert_eq!(
        r.stdout,
        expect(
            "syslog",
            &[
                "syslog READ_ALL: EPERM",
                "syslog SIZE_BUFFER: EPERM",
                "syslog READ: EPERM",
                "open /dev/kmsg: ENOENT",
            ]
            .map(String::from)
        )
    );
    if !require(have("dmesg"), "dmesg (util-linux) on the host") {
        return;
    }
    let r = sh(
        &[],
        "echo RAN dmesg; dmesg > /tmp/d 2>&1; echo rc=$?; head -c 300 /tmp/d",
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(
        r.stdout, "RAN dmesg\nrc=1\ndmesg: read kernel buffer failed: Operation not permitted\n",
        "{r:?}"
    );
}

#[test]
fn sys_firmware_is_absent_or_masked() {
    let Some(dir) = compile_c("fs_escape") else {
        return;
    };
    // No /sys by default.
    // Accepted outcome in the gvisor tier: runsc always mounts a /sys, so moat covers it
    // with an empty read-only tmpfs: /sys is an empty directory.
    let sys = if gvisor() {
        "/sys: empty_dir"
    } else {
        "/sys: ENOENT"
    };
    let r = probe(&dir, &["read", "/sys", "/sys/firmware"], &[]);
    assert_eq!(
        r.stdout,
        expect("read", &[sys, "/sys/firmware: ENOENT"].map(String::from))
    );
    // With --sys: /sys/firmware (ACPI tables, DMI, memmap) is an empty read-only tmpfs.
    if !require(host_has("/sys/firmware"), "/sys/firmware on the host") {
        return;
    }
    let r = probe(&dir, &["read", "/sys/firmware", "/sys/kernel"], &["--sys"]);
    let lines = r.stdout.lines().collect::<Vec<_>>();
    assert_eq!(
        lines[..2],
        ["RAN read", "/sys/firmware: empty_dir"],
        "{r:?}"
    );
    if gvisor() {
        // Accepted outcome in the gvisor tier: --sys is gVisor's own small sysfs, whose
        // firmware and kernel directories are empty (nothing of the host's).
        assert_eq!(lines[2..], ["/sys/kernel: empty_dir"], "{r:?}");
    } else {
        assert!(lines[2].starts_with("/sys/kernel: dir "), "{r:?}");
    }
}

#[test]
fn only_the_sandbox_processes_are_visible() {
    let Some(dir) = compile_c("fs_escape") else {
        return;
    };
    // A fresh pid namespace and /proc: PID 1 is moat's init, the workload PID 2; no host
    // process (and none of another sandbox) appears.
    // Accepted outcome in the gvisor tier: PID 1 is the agent, moat's binary bound at
    // /.moat-agent (its comm is that name); the processes are the sentry's, none of the host.
    let init = if gvisor() {
        "pid 1: .moat-agent"
    } else {
        "pid 1: moat"
    };
    let r = probe(&dir, &["pids"], &[]);
    assert_eq!(
        r.stdout,
        expect(
            "pids",
            &["self: 2", init, "pid 2: fs_escape"].map(String::from)
        )
    );
}

#[test]
fn init_cmdline_reveals_no_host_paths() {
    // /proc/1/cmdline is world-readable. moat's init is a fork of the `moat run` process
    // that never execs, so its command line must not carry the host's paths: neither the
    // host path of moat's binary nor the host source of a --mount.
    let src = scratch_dir("leak-cmdline-src");
    let mount = format!("{}:/data", src.display());
    let r = run_json(
        &["--mount", &mount],
        &[
            "/bin/sh",
            "-c",
            "echo RAN cmdline; tr '\\0' ' ' < /proc/1/cmdline; echo",
        ],
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert!(r.stdout.starts_with("RAN cmdline\n"), "{r:?}");
    let host_src = src.display().to_string();
    let host_bin = moat_bin().display().to_string();
    assert!(
        !r.stdout.contains(&host_src),
        "/proc/1/cmdline shows the host path of a mount source: {}",
        r.stdout
    );
    assert!(
        !r.stdout.contains(&host_bin),
        "/proc/1/cmdline shows the host path of moat: {}",
        r.stdout
    );
}

#[test]
fn hostname_is_the_sandbox_one() {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim();
    let Some(dir) = compile_c("fs_escape") else {
        return;
    };
    let r = probe(&dir, &["uts"], &[]);
    assert_eq!(
        r.stdout,
        expect(
            "uts",
            &["nodename: sandbox", "domainname: sandbox"].map(String::from)
        )
    );
    let r = sh(
        &[],
        "echo RAN names; hostname; cat /etc/hostname /proc/sys/kernel/hostname \
         /proc/sys/kernel/domainname; echo ---; cat /etc/hosts",
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let (names, hosts) = r.stdout.split_once("---\n").expect("ran");
    if gvisor() {
        // Accepted outcome in the gvisor tier: gVisor's /proc/sys/kernel has no domainname
        // (uname's, above, is the sandbox's).
        assert_eq!(names, "RAN names\nsandbox\nsandbox\nsandbox\n");
        assert_eq!(
            r.stderr,
            "cat: /proc/sys/kernel/domainname: No such file or directory\n"
        );
    } else {
        assert_eq!(names, "RAN names\nsandbox\nsandbox\nsandbox\nsandbox\n");
    }
    assert_eq!(
        hosts,
        "127.0.0.1\tlocalhost\n127.0.1.1\tsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    );
    if host != "sandbox" && host != "localhost" {
        assert!(
            !r.stdout.split_whitespace().any(|w| w == host),
            "the host's name {host} is visible: {}",
            r.stdout
        );
    }
}

#[test]
fn secret_files_are_absent() {
    let Some(dir) = compile_c("fs_escape") else {
        return;
    };
    let paths = [
        "/etc/shadow",
        "/etc/gshadow",
        "/etc/shadow-",
        "/etc/sudoers",
        "/etc/ssh",
        "/etc/ssl/private",
        "/etc/machine-id",
        "/root/.ssh",
        "/root/.bash_history",
        "/var/lib",
        "/home",
    ];
    let mut args = vec!["read"];
    args.extend_from_slice(&paths);
    let r = probe(&dir, &args, &[]);
    let lines: Vec<String> = paths
        .iter()
        .map(|p| {
            format!(
                "{p}: {}",
                if *p == "/home" { "empty_dir" } else { "ENOENT" }
            )
        })
        .collect();
    assert_eq!(r.stdout, expect("read", &lines));
}

#[test]
fn cgroup_paths_and_mounts_show_no_host_names() {
    // A cgroup namespace rooted at the sandbox's cgroup: every hierarchy shows "/", so the
    // sandbox's own (host) cgroup name, which carries its id, is not visible; no cgroup
    // filesystem is mounted. tmpfs options carry host uids (kernel behaviour), but no line
    // names a host path, moat's cgroups or the fence.
    let r = sh(
        &[],
        "echo RAN cgroup; cat /proc/self/cgroup; echo ---; cat /proc/1/cgroup; echo ---; \
         cat /proc/self/mountinfo",
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let mut parts = r.stdout.split("---\n");
    let own = parts
        .next()
        .unwrap()
        .strip_prefix("RAN cgroup\n")
        .expect("ran");
    let init = parts.next().unwrap();
    let mountinfo = parts.next().unwrap();
    if gvisor() {
        // Accepted outcome in the gvisor tier: gVisor's /proc/PID/cgroup is empty when no
        // cgroup filesystem is mounted inside (runsc --ignore-cgroups; moat's cgroup holds
        // the whole sandbox from outside): no cgroup path at all is visible.
        assert_eq!((own, init), ("", ""), "{r:?}");
        assert!(mountinfo.lines().count() >= 10, "{r:?}");
    } else {
        assert!(!own.is_empty());
    }
    for line in own.lines().chain(init.lines()) {
        assert!(line.ends_with(":/"), "cgroup path not /: {line}");
    }
    for line in mountinfo.lines() {
        // The gvisor tier's agent is bound at the fixed path /.moat-agent (no sandbox id).
        let line = &line.replace(" /.moat-agent ", " /AGENT ");
        for bad in ["cgroup", "moat-", "moattest", "/run/", "/var/lib", "/home"] {
            assert!(!line.contains(bad), "mountinfo shows {bad}: {line}");
        }
    }
}

#[test]
fn files_of_another_sandbox_are_invisible() {
    // Sandbox A writes into its /tmp, /dev/shm and /work, signals through a shared rw
    // directory and stays alive; sandbox B, started meanwhile, sees none of it. Afterwards a
    // third sandbox sees nothing left either.
    use std::os::unix::fs::PermissionsExt;
    let shared = scratch_dir("leak-between");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mount = format!("{}:/out:rw", shared.display());
    let m2 = mount.clone();
    let a = std::thread::spawn(move || {
        sh(
            &["--mount", &m2, "--timeout", "30s"],
            "echo a > /tmp/leak-a && echo a > /dev/shm/leak-a && echo a > /work/leak-a && \
             : > /out/ready && i=0; while [ ! -e /out/done ] && [ $i -lt 400 ]; do \
             sleep 0.05; i=$((i+1)); done; echo A-done $i",
        )
    });
    let start = Instant::now();
    while !shared.join("ready").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "sandbox A never got ready"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Accepted in the gvisor tier: this runsc refuses coreutils' statx (`ls` fails with
    // EINVAL), so the shell's glob lists there, in the same format.
    let list = if gvisor() {
        "echo RAN list; for d in /tmp /dev/shm /work; do printf '%s: ' $d; \
         for f in $d/.* $d/*; do b=${f##*/}; case $b in .|..|'.*'|'*') ;; \
         *) printf '%s ' \"$b\";; esac; done; echo; done; \
         n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo $n"
    } else {
        "echo RAN list; for d in /tmp /dev/shm /work; do echo \"$d: $(ls -A $d | tr '\\n' ' ')\"; done; \
                ls /proc | grep -c '^[0-9]'"
    };
    let b = sh(&[], list);
    std::fs::write(shared.join("done"), "").unwrap();
    let a = a.join().unwrap();
    assert_eq!(a.status, Status::Ok, "{a:?}");
    assert!(a.stdout.starts_with("A-done "), "{a:?}");
    let n: u32 = a.stdout.trim()["A-done ".len()..].parse().unwrap();
    assert!(
        n < 400,
        "A timed out waiting instead of overlapping with B: {a:?}"
    );
    // B: empty directories; its /proc shows init, sh and the `ls | grep` pipeline at most.
    assert_eq!(b.status, Status::Ok, "{b:?}");
    let (dirs, count) = b.stdout.rsplit_once("/work: \n").expect(&b.stdout);
    assert_eq!(dirs, "RAN list\n/tmp: \n/dev/shm: \n", "{b:?}");
    let count: u32 = count.trim().parse().unwrap();
    if gvisor() {
        // The gvisor listing is the shell's own: the agent and sh only.
        assert_eq!(count, 2, "{b:?}");
    } else {
        assert!((3..=5).contains(&count), "{b:?}");
    }
    let c = sh(&[], list);
    assert!(
        c.stdout
            .starts_with("RAN list\n/tmp: \n/dev/shm: \n/work: \n"),
        "{c:?}"
    );
}
