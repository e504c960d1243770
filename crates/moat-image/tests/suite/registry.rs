//! Against a real registry: Debian's `docker-registry` (the CNCF distribution registry) on a
//! free loopback port, images pushed with `skopeo`.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_image::{ImageError, NoProgress, ProgressEvent, PullOptions, Store};
use serde_json::json;

use super::support::*;

/// A running registry, killed on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Registry {
    fn start() -> Option<Registry> {
        if !have("docker-registry", "docker-registry") || !have("skopeo", "skopeo") {
            return None;
        }
        let dir = TempDir::new("moat-registry");
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  \
             filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: \
             127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        let cfg = dir.path().join("config.yml");
        fs::write(&cfg, config).unwrap();
        let log = fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let reg = Registry {
            child,
            port,
            _dir: dir,
        };
        let start = Instant::now();
        while !reg.ready() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "docker-registry did not come up: {}",
                fs::read_to_string(reg._dir.path().join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(reg)
    }

    fn ready(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut v = String::new();
        let _ = s.read_to_string(&mut v);
        v.starts_with("HTTP/1.0 200") || v.starts_with("HTTP/1.1 200")
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `skopeo copy` from an OCI layout to this registry.
    fn push(&self, layout: &Path, tag: &str, dest: &str, all: bool) {
        let mut c = Command::new("skopeo");
        c.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if all {
            c.arg("--all");
        }
        let out = c
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{dest}", self.host()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The manifest digest the registry serves for `reference`.
    fn digest(&self, reference: &str) -> String {
        let out = Command::new("skopeo")
            .args([
                "--insecure-policy",
                "inspect",
                "--raw",
                "--tls-verify=false",
            ])
            .arg(format!("docker://{}/{reference}", self.host()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        sha256(&out.stdout)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn pull_list_get_remove_and_import_the_same_image() {
    let Some(reg) = Registry::start() else { return };
    let work = TempDir::new("moat-image-pull");
    let layout_dir = work.path().join("bb-layout");
    let layout = Layout::new(&layout_dir);
    let image = layout.image(&busybox_layers(), "amd64", run_config());
    layout.tag(&image, "v1");
    reg.push(&layout_dir, "v1", "test/bb:v1", false);

    let store = Store::open(&work.path().join("state")).unwrap();
    let mode = fs::metadata(store.root()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let reference = format!("{}/test/bb:v1", reg.host());
    let mut events = Events::default();
    let t = store
        .pull(&reference, &PullOptions::default(), &mut events)
        .unwrap();

    assert_eq!(t.name, "test/bb:v1");
    assert_eq!(t.source, reference);
    assert_eq!(t.digest, reg.digest("test/bb:v1"));
    assert_eq!(t.config.env, ["PATH=/bin", "GREETING=hello"]);
    assert_eq!(t.config.cmd, ["/bin/sh", "-c", "echo hi"]);
    assert!(t.config.entrypoint.is_empty());
    assert_eq!(t.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(t.config.workdir.as_deref(), Some("/work"));
    assert_eq!(t.config.labels["org.example.test"], "yes");
    assert_eq!(t.config.exposed_ports, ["8080/tcp"]);
    assert_eq!(
        (t.config.architecture.as_str(), t.config.os.as_str()),
        ("amd64", "linux")
    );
    assert_eq!(t.dropped_xattrs, 0);

    // The rootfs: both layers applied, the whiteout honoured.
    let root = &t.rootfs;
    assert!(root.starts_with(store.root().join("rootfs")));
    let busybox = fs::read("/usr/bin/busybox").unwrap();
    assert_eq!(fs::read(root.join("bin/busybox")).unwrap(), busybox);
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read_link(root.join("bin/echo")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read(root.join("hello.txt")).unwrap(),
        b"hello from layer 2\n"
    );
    assert_eq!(fs::read(root.join("etc/keep")).unwrap(), b"kept\n");
    assert!(!root.join("etc/gone").exists());
    assert!(!root.join("etc/.wh.gone").exists());
    assert_eq!(names(root), ["bin", "etc", "hello.txt"]);
    assert_eq!(
        t.size_bytes,
        busybox.len() as u64 + "kept\n".len() as u64 + "hello from layer 2\n".len() as u64
    );
    // It runs.
    if moat_sys::process::effective_uid() == 0 && have("chroot", "coreutils") {
        let out = Command::new("chroot")
            .arg(root)
            .args(["/bin/sh", "-c", "echo hi from the template"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hi from the template\n"
        );
    }

    // Progress: resolved, two layers each started, extracted and done, then done.
    assert_eq!(
        events.0.first(),
        Some(&ProgressEvent::Resolved {
            reference: reference.clone(),
            digest: t.digest.clone(),
            layers: 2
        })
    );
    assert_eq!(events.0.last(), Some(&ProgressEvent::Done));
    for i in 0..2 {
        assert!(events.0.contains(&ProgressEvent::LayerDone { index: i }));
        assert!(events.0.contains(&ProgressEvent::Extracting { index: i }));
    }

    // list / get.
    let listed = store.list().unwrap();
    assert_eq!(listed, std::slice::from_ref(&t));
    assert_eq!(store.get("test/bb:v1").unwrap(), t);
    let e = store.get("test/bb").unwrap_err();
    assert!(
        matches!(&e, ImageError::NotFound(m) if m.contains("moat template ls")),
        "{e}"
    );

    // A second template of the same layers shares the rootfs, and reuses it without
    // downloading a layer.
    let mut events = Events::default();
    let opts = PullOptions {
        name: Some("other".into()),
        ..Default::default()
    };
    let t2 = store.pull(&reference, &opts, &mut events).unwrap();
    assert_eq!(t2.rootfs, t.rootfs);
    assert_eq!(t2.size_bytes, t.size_bytes);
    assert_eq!(events.0.len(), 2, "{:?}", events.0);
    assert_eq!(names(&store.root().join("rootfs")).len(), 1);
    // `other` is found as `other` (no `:latest` needed) and as nothing else.
    assert_eq!(store.get("other").unwrap().name, "other");

    // Importing the same OCI layout: the same layers, the same rootfs.
    let imported = store
        .import(&layout_dir, &PullOptions::default(), &mut NoProgress)
        .unwrap();
    assert_eq!(imported.name, "bb-layout:v1");
    assert_eq!(imported.rootfs, t.rootfs);
    assert_eq!(imported.digest, image.digest);
    assert_eq!(imported.config, t.config);

    // Remove: the rootfs stays while a template uses it.
    store.remove("test/bb:v1").unwrap();
    store.remove("bb-layout:v1").unwrap();
    assert!(t.rootfs.is_dir());
    assert!(matches!(
        store.remove("test/bb:v1"),
        Err(ImageError::NotFound(_))
    ));
    store.remove("other").unwrap();
    assert!(!t.rootfs.exists());
    assert!(store.list().unwrap().is_empty());
    assert!(names(&store.root().join("rootfs")).is_empty());
    assert!(names(&store.root().join("tmp")).is_empty());

    // `skopeo copy` to a docker-archive, then import it (gzipped too).
    let archive = work.path().join("bb.tar");
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet"])
        .arg(format!("oci:{}:v1", layout_dir.display()))
        .arg(format!("docker-archive:{}:test/bb:v1", archive.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = store
        .import(&archive, &PullOptions::default(), &mut NoProgress)
        .unwrap();
    assert_eq!(a.name, "test/bb:v1");
    assert_eq!(a.source, archive.display().to_string());
    assert_eq!(a.config, t.config);
    assert_eq!(fs::read(a.rootfs.join("bin/busybox")).unwrap(), busybox);
    assert!(!a.rootfs.join("etc/gone").exists());
    let gz = work.path().join("bb.tar.gz");
    fs::write(&gz, gzip(&fs::read(&archive).unwrap())).unwrap();
    let opts = PullOptions {
        name: Some("from-gz".into()),
        ..Default::default()
    };
    let g = store.import(&gz, &opts, &mut NoProgress).unwrap();
    assert_eq!(g.rootfs, a.rootfs);
    assert!(names(&store.root().join("tmp")).is_empty());

    // Re-pulling a name replaces it.
    let again = store.pull(&reference, &opts, &mut NoProgress).unwrap();
    assert_eq!(again.name, "from-gz");
    assert_eq!(again.source, reference);
    assert_eq!(store.get("from-gz").unwrap().source, reference);
}

#[test]
fn errors_name_the_registry_and_what_to_do() {
    let Some(reg) = Registry::start() else { return };
    let work = TempDir::new("moat-image-errors");
    let store = Store::open(work.path()).unwrap();
    // A tag that does not exist.
    let e = store
        .pull(
            &format!("{}/test/nothing:v9", reg.host()),
            &PullOptions::default(),
            &mut NoProgress,
        )
        .unwrap_err();
    match &e {
        ImageError::NotFound(m) => {
            assert!(
                m.contains("404") && m.contains("check the name and the tag"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    // A registry that is not running.
    let port = free_port();
    let e = store
        .pull(
            &format!("127.0.0.1:{port}/test/bb:v1"),
            &PullOptions::default(),
            &mut NoProgress,
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "cannot reach registry 127.0.0.1:{port}: connection refused: is it running? (moat \
             uses plain http for localhost)"
        )
    );
    assert!(matches!(e, ImageError::Registry(_)));
    assert!(store.list().unwrap().is_empty());
    assert!(names(&store.root().join("tmp")).is_empty());
}

#[test]
fn a_multi_platform_index_resolves_to_the_wanted_platform() {
    let Some(reg) = Registry::start() else { return };
    let work = TempDir::new("moat-image-multi");
    let layout_dir = work.path().join("multi");
    let layout = Layout::new(&layout_dir);
    let mut entries = Vec::new();
    for arch in ["amd64", "arm64"] {
        let layer = LayerTar::default()
            .file("arch", 0o644, arch.as_bytes())
            .done();
        let m = layout.image(&[layer], arch, json!({"Cmd": ["/bin/true"]}));
        let mut d = m.json.clone();
        d["platform"] = json!({"os": "linux", "architecture": arch});
        entries.push(d);
    }
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
    let index = layout.blob(OCI_INDEX, &serde_json::to_vec(&index).unwrap());
    layout.tag(&index, "multi");
    reg.push(&layout_dir, "multi", "test/multi:v1", true);

    let store = Store::open(work.path()).unwrap();
    let reference = format!("{}/test/multi:v1", reg.host());
    let arm = store
        .pull(
            &reference,
            &PullOptions {
                name: Some("multi-arm".into()),
                platform: Some("linux/arm64".into()),
                ..Default::default()
            },
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(fs::read(arm.rootfs.join("arch")).unwrap(), b"arm64");
    assert_eq!(arm.config.architecture, "arm64");
    // The template's digest is the index's: what `docker pull` prints, and what pins it.
    assert_eq!(arm.digest, reg.digest("test/multi:v1"));
    assert_eq!(arm.digest, index.digest);

    if cfg!(target_arch = "x86_64") {
        let host = store
            .pull(&reference, &PullOptions::default(), &mut NoProgress)
            .unwrap();
        assert_eq!(host.name, "test/multi:v1");
        assert_eq!(fs::read(host.rootfs.join("arch")).unwrap(), b"amd64");
        assert_ne!(host.rootfs, arm.rootfs);
    }

    // By digest.
    let by_digest = store
        .pull(
            &format!("{}/test/multi@{}", reg.host(), index.digest),
            &PullOptions {
                platform: Some("linux/amd64".into()),
                ..Default::default()
            },
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(
        by_digest.name,
        format!("test/multi@{}", &index.digest[..19])
    );
    assert_eq!(fs::read(by_digest.rootfs.join("arch")).unwrap(), b"amd64");

    let e = store
        .pull(
            &reference,
            &PullOptions {
                platform: Some("linux/s390x".into()),
                ..Default::default()
            },
            &mut NoProgress,
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "`{reference}` has no image for linux/s390x; it has linux/amd64, linux/arm64: pass \
             a platform it has (--platform)"
        )
    );
}
