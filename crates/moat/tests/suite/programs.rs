//! Ordinary programs work in the default sandbox, and `moat run` reports them faithfully.

use super::harness::*;
use moat_api::Status;
use std::time::Duration;

#[test]
fn exit_code_and_output_pass_through() {
    let r = moat_raw(
        &[
            "run",
            "--",
            "/bin/sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ],
        None,
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 7);
    assert_eq!(r.stdout_str(), "out\n");
    assert_eq!(r.stderr, "err\n");
}

#[test]
fn signal_exit_is_128_plus_n() {
    let r = moat_raw(
        &["run", "--", "/bin/sh", "-c", "kill -USR1 $$"],
        None,
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 128 + 10);
    let j = sh(&[], "kill -USR1 $$");
    assert_eq!(j.status, Status::Ok);
    assert_eq!(j.signal, Some(10));
    assert_eq!(j.exit_code, None);
}

#[test]
fn stdin_is_passed_through() {
    let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let r = moat_raw(
        &["run", "--", "/usr/bin/sha256sum"],
        Some(&data),
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let host = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&data)?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(r.stdout, host.stdout);
}

#[test]
fn json_result_has_every_field() {
    let r = moat_raw(
        &["run", "--json", "--", "/bin/echo", "hi"],
        None,
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    for k in [
        "stdout",
        "stderr",
        "exit_code",
        "signal",
        "status",
        "wall_ms",
        "cpu_ms",
        "max_rss_kb",
        "truncated",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
    assert_eq!(v["stdout"], "hi\n");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["sandbox"]["seccomp"], true);
    if gvisor() {
        // Accepted outcome in the gvisor tier: gVisor has no Landlock (its user-space kernel
        // is the filesystem boundary), and the result says so; max_rss_kb is the sandbox's
        // cgroup peak (the command's own rusage stays inside the sentry).
        assert_eq!(v["sandbox"]["tier"], "gvisor");
        assert_eq!(v["sandbox"]["landlock_abi"], 0);
        assert!(
            v["sandbox"]["missing"]
                .as_array()
                .is_some_and(|m| m.iter().any(|x| x
                    .as_str()
                    .is_some_and(|x| x.starts_with("landlock (not in the gvisor tier")))),
            "{v}"
        );
    } else {
        assert!(v["sandbox"]["landlock_abi"].as_u64().unwrap() >= 1);
    }
    assert!(v["max_rss_kb"].as_u64().unwrap() > 0);
}

#[test]
fn python_with_its_standard_library() {
    if !require(have("python3"), "python3 on the host") {
        return;
    }
    let r = run_json(
        &[],
        &[
            "python3",
            "-c",
            "import json, sqlite3, hashlib, threading, subprocess, tempfile, os\n\
             db = sqlite3.connect(':memory:'); db.execute('create table t(x)'); db.execute('insert into t values (41)')\n\
             with tempfile.NamedTemporaryFile() as f: f.write(b'x'); f.flush()\n\
             out = subprocess.run(['echo', 'sub'], capture_output=True, text=True).stdout.strip()\n\
             print(json.dumps({'x': db.execute('select x+1 from t').fetchone()[0], 'sub': out, 'cwd': os.getcwd(), 'h': hashlib.sha256(b'a').hexdigest()[:8]}))",
        ],
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(
        r.stdout.trim(),
        r#"{"x": 42, "sub": "sub", "cwd": "/work", "h": "ca978112"}"#
    );
}

#[test]
fn shell_pipeline() {
    let r = sh(&[], "seq 1 1000 | grep 7 | sort -rn | head -3 | tr '\\n' ,");
    assert_eq!(r.status, Status::Ok);
    assert_eq!(r.stdout, "997,987,979,");
}

#[test]
fn compiled_c_program_and_threads() {
    if !require(have("cc"), "cc on the host") {
        return;
    }
    let r = sh(
        &["--memory", "1G"],
        "cat > t.c <<'EOF'\n#include <pthread.h>\n#include <stdio.h>\nstatic long n[4];\nstatic void *w(void *a){long i=(long)a; for(int k=0;k<1000000;k++) n[i]++; return 0;}\nint main(){pthread_t t[4]; for(long i=0;i<4;i++) pthread_create(&t[i],0,w,(void*)i); long s=0; for(int i=0;i<4;i++){pthread_join(t[i],0); s+=n[i];} printf(\"%ld\\n\", s); return 0;}\nEOF\ncc -O1 -pthread -o t t.c && ./t",
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.stdout, "4000000\n");
}

#[test]
fn program_that_reads_stdin() {
    let r = moat_raw(
        &[
            "run",
            "--json",
            "--",
            "/bin/sh",
            "-c",
            "read a; read b; echo $((a+b))",
        ],
        Some(b"40\n2\n"),
        Duration::from_secs(30),
    );
    let j = r.json();
    assert_eq!(j.stdout, "42\n");
}

#[test]
fn missing_command_is_a_clear_error() {
    let r = run_json(&[], &["no-such-program"]);
    assert_eq!(r.status, Status::Error);
    assert_eq!(r.exit_code, Some(127));
    assert!(r.message.unwrap().contains("no-such-program"));
}

#[test]
fn workdir_env_and_mounts() {
    let dir = scratch_dir("mounts");
    std::fs::write(dir.join("in.txt"), "from host").unwrap();
    let m = format!("{}:/data", dir.display());
    let r = sh(
        &["--mount", &m, "--env", "GREETING=hi", "--workdir", "/home/agent"],
        "cat /data/in.txt; echo; echo $GREETING $HOME; pwd; echo x > /data/new 2>/dev/null || echo read-only",
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(
        r.stdout,
        "from host\nhi /home/agent\n/home/agent\nread-only\n"
    );
    assert!(!dir.join("new").exists());
    // As root, the sandbox's uids are its own host range: a writable mount must be writable
    // by that range (here: by everyone).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let m = format!("{}:/data:rw", dir.display());
    let r = sh(&["--mount", &m], "echo written > /data/new");
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(dir.join("new")).unwrap(),
        "written\n"
    );
}

#[test]
fn bad_flags_are_explained() {
    let r = moat_raw(
        &["run", "--memory", "lots", "--", "true"],
        None,
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 125);
    assert!(r.stderr.contains("--memory"), "{}", r.stderr);
    let r = moat_raw(
        &["run", "--mount", "relative:/x", "--", "true"],
        None,
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 125);
    assert!(r.stderr.contains("absolute"), "{}", r.stderr);
    let r = moat_raw(
        &["run", "--tier", "quantum", "--", "true"],
        None,
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 125);
    assert!(
        r.stderr.contains("write `native` or `gvisor`"),
        "{}",
        r.stderr
    );
}

#[test]
fn policy_file_is_used_and_checked() {
    let dir = scratch_dir("policy");
    let p = dir.join("p.toml");
    std::fs::write(
        &p,
        "env = { A = \"from-policy\" }\n[limits]\ntimeout = \"300ms\"\n",
    )
    .unwrap();
    let ps = p.to_str().unwrap();
    let r = sh(&["--policy", ps], "echo $A; sleep 5");
    assert_eq!(r.status, Status::Timeout);
    assert_eq!(r.stdout, "from-policy\n");
    std::fs::write(&p, "[limits]\nmemroy = \"1G\"\n").unwrap();
    let r = moat_raw(
        &["run", "--policy", ps, "--", "true"],
        None,
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 125);
    assert!(r.stderr.contains("memroy"), "{}", r.stderr);
}

#[test]
fn custom_root_directory() {
    if !require(
        std::path::Path::new("/bin/busybox").is_file(),
        "busybox-static at /bin/busybox",
    ) {
        return;
    }
    let root = scratch_dir("root");
    for d in ["bin", "proc", "dev", "tmp", "work"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/ls")).unwrap();
    let r = run_json(
        &["--root", root.to_str().unwrap()],
        &["/bin/sh", "-c", "ls /; touch /bin/x 2>&1 || echo ro"],
    );
    if gvisor() {
        // Accepted outcome in the gvisor tier (runsc 20221219 as packaged): fs.root is
        // refused before anything starts, with the reason and the way out.
        assert_eq!(r.status, Status::Error, "{r:?}");
        assert_eq!(
            r.message.as_deref(),
            Some(
                "refusing to run: the gvisor tier does not take fs.root yet (moat's agent runs \
                 inside the sandbox and needs the host's /usr and /lib): leave fs.root unset, \
                 or use tier native"
            )
        );
        assert_eq!(r.stdout, "");
        return;
    }
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert!(
        r.stdout.contains("bin\ndev\nproc\ntmp\nwork\n"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.ends_with("ro\n"), "{}", r.stdout);
}

#[test]
fn init_reaps_orphans() {
    // Orphans (double-forked children that exit) are reparented to init, which must reap them:
    // after they exit, no zombie is left while the workload still runs.
    let r = sh(
        &[],
        "for i in 1 2 3 4 5; do (sh -c 'exit 0' &) ; done; sleep 0.3; \
         z=0; for s in /proc/[0-9]*/stat; do case $(cut -d' ' -f3 $s 2>/dev/null) in Z) z=$((z+1));; esac; done; \
         echo zombies=$z; cut -d' ' -f1,2 /proc/1/stat",
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    if gvisor() {
        // Accepted outcome in the gvisor tier: PID 1 of the sandbox is moat's agent (runsc
        // runs it as the container's init) and it reaps the orphans.
        assert_eq!(r.stdout, "zombies=0\n1 (.moat-agent)\n");
    } else {
        assert_eq!(r.stdout, "zombies=0\n1 (moat)\n");
    }
}
