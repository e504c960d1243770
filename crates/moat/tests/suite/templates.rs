//! Templates end to end: an image built here (busybox with a few files, with umoci), pushed
//! with skopeo to a real OCI registry on loopback (Debian's docker-registry), pulled and
//! imported with `moat template`, and run with `moat run --template` and the daemon, in the
//! tier under test.

use super::daemon::Daemon;
use super::harness::*;
use serde_json::{json, Value};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tools() -> bool {
    require(
        have("docker-registry"),
        "docker-registry (Debian package docker-registry) to serve images",
    ) && require(
        have("skopeo"),
        "skopeo (Debian package skopeo) to push images",
    ) && require(
        have("umoci"),
        "umoci (Debian package umoci) to build images",
    ) && require(
        Path::new("/usr/bin/busybox").is_file(),
        "busybox-static for the image's programs",
    ) && require(
        moat_sys::process::effective_uid() == 0,
        "root (templates keep their image's owners)",
    )
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A registry on 127.0.0.1, killed on drop.
struct Registry {
    child: Child,
    port: u16,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let cfg = dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )
        .expect("registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "docker-registry did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { child, port }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the test image as an OCI layout `dir/layout:v1`: busybox and its links in /bin, a
/// file in /app, a home owned by uid 1000, a setuid-root copy of busybox, an environment.
fn build_image(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let img = format!("{}:v1", layout.display());
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &img]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &img])
        .arg(&bundle));
    let root = bundle.join("rootfs");
    let script = format!(
        "set -e; cd {r}; mkdir -p bin etc app home/user; cp /usr/bin/busybox bin/busybox; \
         for c in sh ls cat id echo touch stat rm; do ln -sf busybox bin/$c; done; \
         mkdir suid; cp /usr/bin/busybox suid/id; chmod 4755 suid/id; \
         echo hello-from-the-image > app/hello.txt; chown 1000:1000 home/user; \
         printf 'root:x:0:0:root:/root:/bin/sh\\nuser:x:1000:1000::/home/user:/bin/sh\\n' > etc/passwd; \
         printf 'root:x:0:\\nuser:x:1000:\\n' > etc/group",
        r = root.display()
    );
    run(Command::new("sh").arg("-c").arg(script));
    run(Command::new("umoci")
        .args(["repack", "--image", &img])
        .arg(&bundle));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &img,
        "--config.env",
        "GREETING=hello-from-env",
        "--config.env",
        "PATH=/bin",
        "--config.cmd",
        "/bin/sh",
    ]));
    layout
}

fn push(layout: &Path, port: u16, name: &str) {
    run(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://127.0.0.1:{port}/{name}"),
    ]));
}

fn moat(args: &[&str]) -> Run {
    moat_raw(args, None, Duration::from_secs(120))
}

fn ok(r: &Run) -> String {
    assert_eq!(
        r.code,
        0,
        "stdout: {}\nstderr: {}",
        r.stdout_str(),
        r.stderr
    );
    r.stdout_str()
}

#[test]
fn pull_run_and_remove_a_template_from_a_real_registry() {
    if !tools() {
        return;
    }
    let dir = scratch_dir("tpl-pull");
    let reg = Registry::start(&dir);
    let layout = build_image(&dir);
    push(&layout, reg.port, "test/bb:v1");
    let state = dir.join("state");
    let s = state.to_str().expect("utf-8");
    let reference = format!("127.0.0.1:{}/test/bb:v1", reg.port);

    let out = ok(&moat(&["template", "pull", &reference, "--state-dir", s]));
    assert!(out.contains("template test/bb:v1"), "{out}");
    let ls: Value =
        serde_json::from_str(&ok(&moat(&["template", "ls", "--json", "--state-dir", s])))
            .expect("ls --json");
    let list = ls.as_array().expect("array");
    assert_eq!(list.len(), 1, "{ls}");
    assert_eq!(list[0]["name"], "test/bb:v1");
    let rootfs = PathBuf::from(list[0]["rootfs"].as_str().expect("rootfs"));
    assert!(rootfs.join("app/hello.txt").is_file());

    // The sandbox sees the image's files, environment and owners, as the policy's user.
    let tpl = ["--template", "test/bb:v1", "--state-dir", s];
    let r = sh(
        &tpl,
        "cat /app/hello.txt; echo $GREETING; id -u; stat -c '%u %U' /app/hello.txt /home/user; \
         echo mine > /home/user/f && cat /home/user/f; echo w > /work/w && cat /work/w; \
         /suid/id -u; echo x > /app/new 2>/dev/null || echo app-read-only",
    );
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert_eq!(
        r.stdout,
        "hello-from-the-image\nhello-from-env\n1000\n0 root\n1000 user\nmine\nw\n1000\napp-read-only\n",
        "{r:?}"
    );
    // Writes stay in that sandbox: the next one and the template itself never see them.
    let r = sh(&tpl, "cat /home/user/f 2>&1 || echo gone");
    assert!(r.stdout.ends_with("gone\n"), "{r:?}");
    assert!(!rootfs.join("home/user/f").exists());
    assert!(
        std::fs::read_dir(&rootfs)
            .expect("rootfs")
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".moat")),
        "the sandbox's mount points were made in the shared template"
    );

    // A second name for the same image shares its files.
    ok(&moat(&[
        "template",
        "pull",
        &reference,
        "--name",
        "again",
        "--state-dir",
        s,
    ]));
    let again: Value = serde_json::from_str(&ok(&moat(&[
        "template",
        "inspect",
        "again",
        "--state-dir",
        s,
    ])))
    .expect("inspect");
    assert_eq!(
        again["rootfs"].as_str(),
        Some(rootfs.to_str().expect("utf-8"))
    );
    assert_eq!(again["config"]["env"][0], "GREETING=hello-from-env");

    ok(&moat(&["template", "rm", "test/bb:v1", "--state-dir", s]));
    assert!(rootfs.is_dir(), "still used by `again`");
    ok(&moat(&["template", "rm", "again", "--state-dir", s]));
    assert!(!rootfs.exists(), "the last template's files are removed");
    let r = moat(&["run", "--template", "again", "--state-dir", s, "--", "true"]);
    assert_eq!(r.code, 125);
    assert!(r.stderr.contains("moat template ls"), "{}", r.stderr);
}

#[test]
fn a_template_serves_the_daemon_s_sandboxes_and_fs_image_is_refused() {
    if !tools() {
        return;
    }
    let dir = scratch_dir("tpl-daemon");
    let reg = Registry::start(&dir);
    let layout = build_image(&dir);
    push(&layout, reg.port, "test/bb:v1");
    let d = Daemon::start();
    let s = d.state.to_str().expect("utf-8").to_string();
    let reference = format!("127.0.0.1:{}/test/bb:v1", reg.port);
    ok(&moat(&["template", "pull", &reference, "--state-dir", &s]));

    let id = d.create(json!({"policy": {"fs": {"template": "test/bb:v1"}}}));
    let r = d.sh(&id, "cat /app/hello.txt; echo $GREETING; id -u");
    assert_eq!(
        r["stdout"], "hello-from-the-image\nhello-from-env\n1000\n",
        "{r}"
    );
    // Files through the API see the same root.
    let a = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/files?path=/app/hello.txt"),
        Some(&d.key),
        None,
        &[],
    );
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.text(), "hello-from-the-image\n");

    let a = d.api(
        "POST",
        "/v1/sandboxes",
        Some(json!({"policy": {"fs": {"template": "no/such:tag"}}})),
    );
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.text().contains("moat template ls"), "{}", a.text());
    let a = d.api(
        "POST",
        "/v1/sandboxes",
        Some(json!({"policy": {"fs": {"image": {"rootfs": "/", "name": "host"}}}})),
    );
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.text().contains("fs.image is moat's own"), "{}", a.text());
}

#[test]
fn import_of_a_docker_archive_and_pulls_that_cannot_work() {
    if !tools() {
        return;
    }
    let dir = scratch_dir("tpl-import");
    let layout = build_image(&dir);
    let archive = dir.join("bb.tar");
    run(Command::new("skopeo").args([
        "copy",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker-archive:{}:test/bb:v1", archive.display()),
    ]));
    let state = dir.join("state");
    let s = state.to_str().expect("utf-8");
    let out = ok(&moat(&[
        "template",
        "import",
        archive.to_str().expect("utf-8"),
        "--name",
        "imported",
        "--state-dir",
        s,
    ]));
    assert!(out.contains("template imported"), "{out}");
    let r = sh(
        &["--template", "imported", "--state-dir", s],
        "cat /app/hello.txt",
    );
    assert_eq!(r.stdout, "hello-from-the-image\n", "{r:?}");
    // The OCI layout itself imports too.
    ok(&moat(&[
        "template",
        "import",
        layout.to_str().expect("utf-8"),
        "--name",
        "from-layout",
        "--state-dir",
        s,
    ]));

    // Nothing listens: a clear error, and nothing half-made is left.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let r = moat(&[
        "template",
        "pull",
        &format!("127.0.0.1:{port}/test/bb:v1"),
        "--state-dir",
        s,
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("cannot reach"), "{}", r.stderr);
    // A tag the registry does not have.
    let reg = Registry::start(&dir);
    let r = moat(&[
        "template",
        "pull",
        &format!("127.0.0.1:{}/test/none:v9", reg.port),
        "--state-dir",
        s,
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.to_lowercase().contains("not found")
            || r.stderr.to_lowercase().contains("unknown"),
        "{}",
        r.stderr
    );
    let tmp = state.join("templates/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}
