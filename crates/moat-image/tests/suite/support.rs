//! Shared helpers: temporary directories, layer tars, OCI layouts, a progress recorder, and
//! the check for the external programs a test needs.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use moat_image::{Progress, ProgressEvent};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        let p = std::env::temp_dir().join(format!("{prefix}-{}", hex::encode(b)));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether `program` is installed. Missing: a failure under CI (an attack or an integration
/// that could not run is never a silent pass there), else a skip with the reason printed.
pub fn have(program: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    if found {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("`{program}` is not installed: install the Debian package `{package}`");
    }
    eprintln!("skipping: `{program}` is not installed (Debian package `{package}`)");
    false
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A layer tar built with the tar crate.
pub struct LayerTar(tar::Builder<Vec<u8>>);

impl Default for LayerTar {
    fn default() -> Self {
        LayerTar(tar::Builder::new(Vec::new()))
    }
}

impl LayerTar {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }
    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    pub fn dir(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    /// An entry with its name written verbatim (`..` included).
    pub fn raw_file(mut self, name: &str, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        let b = h.as_mut_bytes();
        b[..100].fill(0);
        b[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    pub fn done(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// The run config of a test image.
pub fn run_config() -> Value {
    json!({
        "Env": ["PATH=/bin", "GREETING=hello"],
        "Cmd": ["/bin/sh", "-c", "echo hi"],
        "User": "1000:1000",
        "WorkingDir": "/work",
        "Labels": {"org.example.test": "yes"},
        "ExposedPorts": {"8080/tcp": {}},
    })
}

/// An OCI image layout on disk, written blob by blob.
pub struct Layout {
    pub dir: PathBuf,
}

/// A descriptor (JSON) and the digest of what it describes.
pub struct Desc {
    pub json: Value,
    pub digest: String,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_path_buf(),
        }
    }

    pub fn blob(&self, media_type: &str, data: &[u8]) -> Desc {
        let digest = sha256(data);
        fs::write(
            self.dir
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
            data,
        )
        .unwrap();
        Desc {
            json: json!({"mediaType": media_type, "digest": digest, "size": data.len()}),
            digest,
        }
    }

    /// An image of `layers` (uncompressed tars, stored gzipped) for `arch`.
    pub fn image(&self, layers: &[Vec<u8>], arch: &str, config: Value) -> Desc {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for l in layers {
            diff_ids.push(sha256(l));
            descs.push(self.blob(OCI_LAYER_GZIP, &gzip(l)).json);
        }
        let cfg = json!({
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let cfg = self.blob(OCI_CONFIG, &serde_json::to_vec(&cfg).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": cfg.json,
            "layers": descs,
        });
        self.blob(OCI_MANIFEST, &serde_json::to_vec(&manifest).unwrap())
    }

    /// `index.json` naming `desc` as tag `tag`.
    pub fn tag(&self, desc: &Desc, tag: &str) {
        let mut d = desc.json.clone();
        d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d]});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}

/// Layer 1: busybox (copied from the host's busybox-static) with `sh` and `echo` links, and
/// two files in /etc; layer 2: a new file, and a whiteout of one of those.
pub fn busybox_layers() -> Vec<Vec<u8>> {
    let busybox = fs::read("/usr/bin/busybox").unwrap();
    let l1 = LayerTar::default()
        .dir("bin")
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox")
        .symlink("bin/echo", "busybox")
        .file("etc/gone", 0o644, b"to be whited out\n")
        .file("etc/keep", 0o644, b"kept\n")
        .done();
    let l2 = LayerTar::default()
        .file("hello.txt", 0o644, b"hello from layer 2\n")
        .file("etc/.wh.gone", 0o644, b"")
        .done();
    vec![l1, l2]
}

/// Records every progress event.
#[derive(Default)]
pub struct Events(pub Vec<ProgressEvent>);

impl Progress for Events {
    fn event(&mut self, ev: ProgressEvent) {
        self.0.push(ev);
    }
}

/// The names in a directory, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
