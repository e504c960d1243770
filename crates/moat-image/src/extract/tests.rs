//! The extraction battery: normal layers, then hostile ones, each asserting the exact
//! outcome and that nothing outside the root changed.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use super::*;
use crate::digest::Digest;

/// A directory removed on drop: `<base>/root` is the image root, `<base>/sentinel` a
/// directory next to it that must stay empty.
struct Sandbox {
    base: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        let base = std::env::temp_dir().join(format!("moat-image-test-{}", hex::encode(b)));
        fs::create_dir_all(base.join("root")).unwrap();
        fs::create_dir_all(base.join("sentinel")).unwrap();
        Sandbox { base }
    }
    fn root(&self) -> PathBuf {
        self.base.join("root").canonicalize().unwrap()
    }
    fn sentinel(&self) -> PathBuf {
        self.base.join("sentinel").canonicalize().unwrap()
    }
    /// Asserts that only `root` and `sentinel` exist in the base, and the sentinel is empty.
    fn assert_contained(&self) {
        let mut names: Vec<String> = fs::read_dir(&self.base)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["root", "sentinel"]);
        assert_eq!(
            fs::read_dir(self.sentinel()).unwrap().count(),
            0,
            "sentinel touched"
        );
    }
    fn extractor(&self, max: u64) -> Extractor {
        Extractor::new(&self.root(), max).unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = crate::store::force_remove_dir_all(&self.base);
    }
}

/// Builds a layer tar with names written verbatim (the tar crate's own setters refuse `..`).
struct Layer {
    b: tar::Builder<Vec<u8>>,
}

const MTIME: u64 = 1_600_000_000;

impl Layer {
    fn new() -> Layer {
        Layer {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn raw(
        &mut self,
        name: &[u8],
        kind: EntryType,
        link: &[u8],
        mode: u32,
        data: &[u8],
    ) -> &mut Self {
        self.raw_owned(name, kind, link, mode, data, 0, 0)
    }

    #[allow(clippy::too_many_arguments)]
    fn raw_owned(
        &mut self,
        name: &[u8],
        kind: EntryType,
        link: &[u8],
        mode: u32,
        data: &[u8],
        uid: u64,
        gid: u64,
    ) -> &mut Self {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(MTIME);
        h.set_uid(uid);
        h.set_gid(gid);
        let bytes = h.as_mut_bytes();
        assert!(name.len() <= 100 && link.len() <= 100);
        bytes[..100].fill(0);
        bytes[..name.len()].copy_from_slice(name);
        bytes[157..257].fill(0);
        bytes[157..157 + link.len()].copy_from_slice(link);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.raw(name.as_bytes(), EntryType::Regular, b"", mode, data)
    }
    fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.raw(name.as_bytes(), EntryType::Directory, b"", mode, b"")
    }
    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            EntryType::Symlink,
            target.as_bytes(),
            0o777,
            b"",
        )
    }
    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            EntryType::Link,
            target.as_bytes(),
            0o644,
            b"",
        )
    }
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.b
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self
    }
    fn done(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

fn apply(ex: &mut Extractor, n: usize, layer: &[u8]) -> Result<(), ImageError> {
    ex.apply_tar(n, layer).map(drop)
}

fn refused(r: Result<(), ImageError>) -> String {
    match r {
        Err(ImageError::Refused(m)) => m,
        other => panic!("expected Refused, got {other:?}"),
    }
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn unique(prefix: &str) -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    format!("{prefix}-{}", hex::encode(b))
}

#[test]
fn a_normal_layer() {
    let sb = Sandbox::new();
    let root = sb.root();
    let mut ex = sb.extractor(1 << 30);
    let layer = Layer::new()
        .dir("./", 0o755)
        .dir("bin/", 0o755)
        .raw_owned(
            b"bin/tool",
            EntryType::Regular,
            b"",
            0o755,
            b"#!/bin/sh\necho hi\n",
            1000,
            1001,
        )
        .file("etc/conf", 0o640, b"x=1\n")
        .symlink("bin/sh", "/bin/tool")
        .symlink("rel", "bin/tool")
        .hardlink("bin/hard", "bin/tool")
        .file("usr/bin/su", 0o4755, b"setuid")
        .dir("ro/", 0o555)
        .file("ro/f", 0o444, b"in a read-only dir")
        .file("/abs/file", 0o600, b"leading slash")
        .done();
    apply(&mut ex, 1, &layer).unwrap();

    assert_eq!(
        fs::read(root.join("bin/tool")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    assert_eq!(mode(&root.join("bin/tool")), 0o755);
    assert_eq!(fs::read(root.join("etc/conf")).unwrap(), b"x=1\n");
    assert_eq!(mode(&root.join("etc/conf")), 0o640);
    // A parent the layer did not list is made 0755.
    assert_eq!(mode(&root.join("etc")), 0o755);
    assert!(root.join("etc").is_dir());
    // Symlink targets are stored verbatim, absolute ones included, and never followed.
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("/bin/tool")
    );
    assert_eq!(
        fs::read_link(root.join("rel")).unwrap(),
        Path::new("bin/tool")
    );
    // A hard link shares the inode.
    let tool = fs::metadata(root.join("bin/tool")).unwrap();
    let hard = fs::metadata(root.join("bin/hard")).unwrap();
    assert_eq!(tool.ino(), hard.ino());
    assert_eq!(tool.nlink(), 2);
    // setuid is kept (templates are mounted nosuid).
    assert_eq!(mode(&root.join("usr/bin/su")), 0o4755);
    // A 0555 directory still got its file (the mode is applied when the layer is done).
    assert_eq!(fs::read(root.join("ro/f")).unwrap(), b"in a read-only dir");
    assert_eq!(mode(&root.join("ro")), 0o555);
    assert_eq!(fs::read(root.join("abs/file")).unwrap(), b"leading slash");
    // mtimes, files and directories.
    assert_eq!(tool.mtime() as u64, MTIME);
    assert_eq!(fs::metadata(root.join("ro")).unwrap().mtime() as u64, MTIME);
    assert_eq!(fs::metadata(&root).unwrap().mtime() as u64, MTIME);
    assert_eq!(mode(&root), 0o755);
    if moat_sys::process::effective_uid() == 0 {
        assert_eq!((tool.uid(), tool.gid()), (1000, 1001));
        let conf = fs::metadata(root.join("etc/conf")).unwrap();
        assert_eq!((conf.uid(), conf.gid()), (0, 0));
        let sh = fs::symlink_metadata(root.join("bin/sh")).unwrap();
        assert_eq!((sh.uid(), sh.gid()), (0, 0));
    }
    assert_eq!(ex.written, 18 + 4 + 6 + 18 + 13);
    sb.assert_contained();
}

#[test]
fn dot_dot_is_refused_and_nothing_leaves_the_root() {
    let sb = Sandbox::new();
    for name in [
        "../../etc/x",
        "a/../../x",
        "/../x",
        "./../sentinel/x",
        "a/b/../../../sentinel/x",
    ] {
        let mut ex = sb.extractor(1 << 20);
        let layer = Layer::new().file(name, 0o644, b"pwned").done();
        let m = refused(apply(&mut ex, 3, &layer));
        assert_eq!(m, format!("layer 3: entry `{name}` escapes the image root"));
        // Directories, symlinks and hard links too.
        let layer = Layer::new().dir(name, 0o755).done();
        refused(apply(&mut ex, 1, &layer));
        let layer = Layer::new().symlink(name, "/").done();
        refused(apply(&mut ex, 1, &layer));
    }
    assert_eq!(fs::read_dir(sb.root()).unwrap().count(), 0);
    sb.assert_contained();
}

#[test]
fn symlinks_resolve_inside_the_root() {
    let sb = Sandbox::new();
    let root = sb.root();
    let pwned = unique("moat-pwned");
    let host_file = std::env::temp_dir().join(unique("moat-hostfile"));
    fs::write(&host_file, b"host").unwrap();
    let sentinel = sb.sentinel();
    let sentinel_abs = sentinel.to_str().unwrap().to_string();
    let mut ex = sb.extractor(1 << 20);
    let layer = Layer::new()
        .symlink("evil", "/")
        .file(&format!("evil/tmp/{pwned}"), 0o644, b"1")
        .symlink("evil2", "../../..")
        .file(&format!("evil2/etc/{pwned}"), 0o644, b"2")
        .dir("d/", 0o755)
        .symlink("d/up", "../../../../")
        .file("d/up/top", 0o644, b"3")
        // The real host path of the sentinel: inside the image it is just a path.
        .symlink("s", &sentinel_abs)
        .file("s/f", 0o644, b"4")
        // A symlink to a host file, then a regular file of the same name: the file replaces
        // the link and the host file is untouched.
        .symlink("link", host_file.to_str().unwrap())
        .file("link", 0o644, b"image")
        .done();
    apply(&mut ex, 1, &layer).unwrap();

    assert_eq!(fs::read(root.join("tmp").join(&pwned)).unwrap(), b"1");
    assert!(!Path::new("/tmp").join(&pwned).exists());
    assert_eq!(fs::read(root.join("etc").join(&pwned)).unwrap(), b"2");
    assert!(!Path::new("/etc").join(&pwned).exists());
    assert_eq!(fs::read(root.join("top")).unwrap(), b"3");
    let inside = root.join(sentinel_abs.trim_start_matches('/')).join("f");
    assert_eq!(fs::read(inside).unwrap(), b"4");
    assert!(fs::symlink_metadata(root.join("link")).unwrap().is_file());
    assert_eq!(fs::read(root.join("link")).unwrap(), b"image");
    assert_eq!(fs::read(&host_file).unwrap(), b"host");
    fs::remove_file(&host_file).unwrap();
    // The links themselves are still there, verbatim.
    assert_eq!(fs::read_link(root.join("evil")).unwrap(), Path::new("/"));
    assert_eq!(
        fs::read_link(root.join("evil2")).unwrap(),
        Path::new("../../..")
    );
    sb.assert_contained();
}

#[test]
fn hard_links_stay_inside_the_root() {
    let sb = Sandbox::new();
    let root = sb.root();
    let mut ex = sb.extractor(1 << 20);
    // Nothing called /etc/passwd in the image yet: refused, not linked to the host's.
    let m = refused(apply(
        &mut ex,
        1,
        &Layer::new().hardlink("h1", "/etc/passwd").done(),
    ));
    assert_eq!(
        m,
        "layer 1: hard link `h1` -> `/etc/passwd` points at nothing in the image"
    );
    let m = refused(apply(
        &mut ex,
        1,
        &Layer::new().hardlink("h3", "../../etc/passwd").done(),
    ));
    assert_eq!(
        m,
        "layer 1: hard link `h3` -> `../../etc/passwd` escapes the image root"
    );
    assert!(!root.join("h1").exists() && !root.join("h3").exists());

    let layer = Layer::new()
        .file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n")
        .hardlink("h2", "/etc/passwd")
        .symlink("evil", "/")
        .hardlink("h4", "evil/etc/passwd")
        .symlink("sl", "/etc/passwd")
        .hardlink("h5", "sl")
        .done();
    apply(&mut ex, 2, &layer).unwrap();
    let image = fs::metadata(root.join("etc/passwd")).unwrap().ino();
    let host = fs::metadata("/etc/passwd").unwrap().ino();
    assert_ne!(image, host);
    assert_eq!(fs::metadata(root.join("h2")).unwrap().ino(), image);
    assert_eq!(fs::metadata(root.join("h4")).unwrap().ino(), image);
    // A hard link to a symlink is a link to the symlink itself (linkat without
    // AT_SYMLINK_FOLLOW), never to what it points at.
    let h5 = fs::symlink_metadata(root.join("h5")).unwrap();
    assert!(h5.file_type().is_symlink());
    assert_eq!(
        h5.ino(),
        fs::symlink_metadata(root.join("sl")).unwrap().ino()
    );
    assert_eq!(
        fs::read_link(root.join("h5")).unwrap(),
        Path::new("/etc/passwd")
    );

    let m = refused(apply(
        &mut ex,
        3,
        &Layer::new().hardlink("h6", "etc").done(),
    ));
    assert_eq!(m, "layer 3: hard link `h6` -> `etc` points at a directory");
    let m = refused(apply(&mut ex, 3, &Layer::new().hardlink("h7", "").done()));
    assert_eq!(m, "layer 3: hard link `h7` -> `` points at the image root");
    sb.assert_contained();
}

#[test]
fn device_nodes_are_refused_and_fifos_skipped() {
    let sb = Sandbox::new();
    let mut ex = sb.extractor(1 << 20);
    let m = refused(apply(
        &mut ex,
        2,
        &Layer::new()
            .raw(b"dev/sda", EntryType::Block, b"", 0o660, b"")
            .done(),
    ));
    assert_eq!(
        m,
        "layer 2: `dev/sda` is a device node: moat does not create device nodes from images"
    );
    let m = refused(apply(
        &mut ex,
        1,
        &Layer::new()
            .raw(b"dev/mem", EntryType::Char, b"", 0o660, b"")
            .done(),
    ));
    assert!(m.contains("`dev/mem` is a device node"), "{m}");
    let layer = Layer::new()
        .raw(b"run/fifo", EntryType::Fifo, b"", 0o644, b"")
        .file("ok", 0o644, b"")
        .done();
    apply(&mut ex, 1, &layer).unwrap();
    assert_eq!(ex.skipped_fifos, 1);
    assert!(!sb.root().join("run/fifo").exists());
    assert!(sb.root().join("ok").exists());
    assert!(!sb.root().join("dev/sda").exists() && !sb.root().join("dev/mem").exists());
    sb.assert_contained();
}

/// `n` bytes of zeros in a tar entry, as a gzip stream built from repeated gzip members
/// (MultiGzDecoder reads them as one stream), so a test can make a huge bomb cheaply.
fn gzip_bomb(name: &str, kind: EntryType, n_mib: u64) -> Vec<u8> {
    use flate2::write::GzEncoder;
    let gz = |data: &[u8]| {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    let mut h = Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(n_mib << 20);
    h.set_cksum();
    let mib = gz(&vec![0u8; 1 << 20]);
    let mut out = gz(h.as_bytes());
    for _ in 0..n_mib {
        out.extend_from_slice(&mib);
    }
    out.extend(gz(&[0u8; 1024]));
    out
}

fn blob_input(data: Vec<u8>, diff_id: Digest) -> LayerInput<'static> {
    let d = Digest::of(&data);
    let len = data.len() as u64;
    LayerInput {
        index: 0,
        count: 1,
        reader: Box::new(io::Cursor::new(data)),
        blob: Some((d, len)),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        diff_id,
    }
}

#[test]
fn a_decompression_bomb_is_stopped() {
    let sb = Sandbox::new();
    let bomb = gzip_bomb("zeros", EntryType::Regular, 64);
    assert!(bomb.len() < 2 << 20, "the bomb is small: {}", bomb.len());
    let mut ex = sb.extractor(1 << 20);
    let r = apply_blob(
        &mut ex,
        blob_input(bomb, Digest::of(b"x")),
        &mut crate::NoProgress,
    );
    match r {
        Err(ImageError::TooLarge(m)) => assert_eq!(
            m,
            "the image expands past 1 MiB (a decompression bomb?): pass a larger --max-size if \
             it is real"
        ),
        other => panic!("{other:?}"),
    }
    assert!(ex.written <= 1 << 20);
    // No more than the limit was written.
    let f = sb.root().join("zeros");
    assert!(!f.exists() || fs::metadata(&f).unwrap().len() <= 1 << 20);

    // Data that is never written (a FIFO's payload) is bounded by the stream limit.
    let mut ex = sb.extractor(1 << 20);
    let bomb = gzip_bomb("fifo", EntryType::Fifo, 96);
    let r = apply_blob(
        &mut ex,
        blob_input(bomb, Digest::of(b"x")),
        &mut crate::NoProgress,
    );
    assert!(
        matches!(&r, Err(ImageError::TooLarge(m)) if m.starts_with("the image's layers decompress past 65 MiB")),
        "{r:?}"
    );
    assert_eq!(ex.written, 0);

    // Too many entries.
    let mut ex = sb.extractor(1 << 20).with_max_entries(100);
    let mut l = Layer::new();
    for i in 0..101 {
        l.file(&format!("f{i}"), 0o644, b"");
    }
    let r = apply(&mut ex, 1, &l.done());
    assert!(
        matches!(&r, Err(ImageError::TooLarge(m)) if m.starts_with("the image has more than 100 files")),
        "{r:?}"
    );
    sb.assert_contained();
}

#[test]
fn blobs_are_verified() {
    let sb = Sandbox::new();
    let tar = Layer::new().file("f", 0o644, b"content").done();
    let diff = Digest::of(&tar);
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    // Right: gzip, and plain tar (its diff_id is its digest).
    struct Events(Vec<ProgressEvent>);
    impl Progress for Events {
        fn event(&mut self, ev: ProgressEvent) {
            self.0.push(ev);
        }
    }
    let mut ev = Events(Vec::new());
    let mut ex = sb.extractor(1 << 20);
    apply_blob(&mut ex, blob_input(gz.clone(), diff.clone()), &mut ev).unwrap();
    assert_eq!(fs::read(sb.root().join("f")).unwrap(), b"content");
    assert_eq!(
        ev.0,
        [
            ProgressEvent::LayerStart {
                index: 0,
                digest: Digest::of(&gz).to_string(),
                size: gz.len() as u64
            },
            ProgressEvent::Extracting { index: 0 },
            ProgressEvent::LayerBytes {
                index: 0,
                done: gz.len() as u64
            },
            ProgressEvent::LayerDone { index: 0 },
        ]
    );
    let mut input = blob_input(tar.clone(), diff.clone());
    input.media_type = "application/vnd.oci.image.layer.v1.tar".into();
    apply_blob(&mut sb.extractor(1 << 20), input, &mut crate::NoProgress).unwrap();

    // The wrong diff_id.
    let r = apply_blob(
        &mut sb.extractor(1 << 20),
        blob_input(gz.clone(), Digest::of(b"other")),
        &mut crate::NoProgress,
    );
    assert!(
        matches!(&r, Err(ImageError::Digest(m)) if m.contains("does not match the diff_id")),
        "{r:?}"
    );
    // The wrong blob digest.
    let mut input = blob_input(gz.clone(), diff.clone());
    input.blob = Some((Digest::of(b"other"), gz.len() as u64));
    let r = apply_blob(&mut sb.extractor(1 << 20), input, &mut crate::NoProgress);
    assert!(
        matches!(&r, Err(ImageError::Digest(m)) if m.contains("does not match its digest")),
        "{r:?}"
    );
    // More bytes than the descriptor says: stopped at the size.
    let mut input = blob_input(gz.clone(), diff.clone());
    input.blob = Some((Digest::of(&gz), gz.len() as u64 - 1));
    let r = apply_blob(&mut sb.extractor(1 << 20), input, &mut crate::NoProgress);
    assert!(
        matches!(&r, Err(ImageError::Digest(m)) if m.contains("longer than the")),
        "{r:?}"
    );
    // Fewer.
    let mut input = blob_input(gz.clone(), diff.clone());
    input.blob = Some((Digest::of(&gz), gz.len() as u64 + 1));
    let r = apply_blob(&mut sb.extractor(1 << 20), input, &mut crate::NoProgress);
    assert!(matches!(&r, Err(ImageError::Digest(_))), "{r:?}");
    // A truncated gzip stream.
    let mut input = blob_input(gz[..gz.len() / 2].to_vec(), diff.clone());
    input.blob = None;
    let r = apply_blob(&mut sb.extractor(1 << 20), input, &mut crate::NoProgress);
    assert!(matches!(&r, Err(ImageError::Digest(_))), "{r:?}");
    // zstd, by media type and by magic.
    let mut input = blob_input(gz.clone(), diff.clone());
    input.media_type = "application/vnd.oci.image.layer.v1.tar+zstd".into();
    let r = apply_blob(&mut sb.extractor(1 << 20), input, &mut crate::NoProgress);
    assert!(
        matches!(&r, Err(ImageError::Unsupported(m)) if m.starts_with("zstd layers are not supported yet")),
        "{r:?}"
    );
    let r = apply_blob(
        &mut sb.extractor(1 << 20),
        blob_input(vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0], diff),
        &mut crate::NoProgress,
    );
    assert!(matches!(&r, Err(ImageError::Unsupported(_))), "{r:?}");
    sb.assert_contained();
}

#[test]
fn whiteouts_and_opaque_directories() {
    let sb = Sandbox::new();
    let root = sb.root();
    let mut ex = sb.extractor(1 << 20);
    let lower = Layer::new()
        .file("a/1", 0o644, b"")
        .file("a/2", 0o644, b"")
        .file("b/x", 0o644, b"")
        .file("b/sub/deep", 0o644, b"")
        .file("c/sub/y", 0o644, b"")
        .file("d/3", 0o644, b"")
        .symlink("dl", "/d")
        .file("e/old", 0o644, b"")
        .file("keep", 0o644, b"")
        .done();
    apply(&mut ex, 1, &lower).unwrap();
    let upper = Layer::new()
        .file("a/.wh.1", 0o644, b"")
        // Entries of this layer before the opaque marker stay; lower ones go.
        .file("b/new", 0o644, b"")
        .file("b/newdir/f", 0o644, b"")
        .file("b/.wh..wh..opq", 0o644, b"")
        // Marker first, then this layer's entries.
        .file("e/.wh..wh..opq", 0o644, b"")
        .file("e/sub/new", 0o644, b"")
        // A whole directory.
        .file(".wh.c", 0o644, b"")
        // Through a symlinked parent: resolved inside the root.
        .file("dl/.wh.3", 0o644, b"")
        // Nothing to hide: fine.
        .file(".wh.missing", 0o644, b"")
        .file("nodir/.wh.y", 0o644, b"")
        // AUFS bookkeeping: ignored.
        .file(".wh..wh.plnk", 0o644, b"")
        .done();
    apply(&mut ex, 2, &upper).unwrap();
    assert!(!root.join("a/1").exists());
    assert!(root.join("a/2").exists());
    assert!(!root.join("b/x").exists() && !root.join("b/sub").exists());
    assert!(root.join("b/new").exists() && root.join("b/newdir/f").exists());
    assert!(!root.join("e/old").exists() && root.join("e/sub/new").exists());
    assert!(!root.join("c").exists());
    assert!(!root.join("d/3").exists() && root.join("d").is_dir());
    assert!(root.join("keep").exists());
    assert!(!root.join("nodir").exists());
    // No whiteout file is ever created.
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            assert!(
                !e.file_name().to_string_lossy().starts_with(".wh."),
                "{:?}",
                e.path()
            );
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    // A whiteout of `..` or `.`: refused, nothing removed.
    for name in [".wh...", "a/.wh..", "a/.wh."] {
        let m = refused(apply(
            &mut ex,
            3,
            &Layer::new().file(name, 0o644, b"").done(),
        ));
        assert_eq!(m, format!("layer 3: entry `{name}` escapes the image root"));
    }
    let m = refused(apply(
        &mut ex,
        3,
        &Layer::new().file("a/.wh.x/y", 0o644, b"").done(),
    ));
    assert!(m.contains("inside a whiteout"), "{m}");
    assert!(root.join("a/2").exists() && root.join("keep").exists());
    sb.assert_contained();
}

#[test]
fn loops_and_non_directories() {
    let sb = Sandbox::new();
    let mut ex = sb.extractor(1 << 20);
    let layer = Layer::new()
        .symlink("l1", "l2")
        .symlink("l2", "/l1")
        .file("l1/x", 0o644, b"")
        .done();
    let m = refused(apply(&mut ex, 1, &layer));
    assert_eq!(
        m,
        "layer 1: `l1/x` goes through more than 40 symlinks (a loop?)"
    );
    let layer = Layer::new()
        .file("f", 0o644, b"")
        .file("f/x", 0o644, b"")
        .done();
    let m = refused(apply(&mut ex, 1, &layer));
    assert_eq!(m, "layer 1: `f/x`: `f` is not a directory");
    let layer = Layer::new().file(".", 0o644, b"").done();
    let m = refused(apply(&mut ex, 1, &layer));
    assert!(m.contains("names the image root"), "{m}");
    sb.assert_contained();
}

#[test]
fn entries_replace_what_is_there() {
    let sb = Sandbox::new();
    let root = sb.root();
    let mut ex = sb.extractor(1 << 20);
    let lower = Layer::new()
        .file("was_file", 0o644, b"")
        .file("was_dir/child", 0o644, b"")
        .file("merged/old", 0o644, b"")
        .dir("merged/", 0o700)
        .done();
    apply(&mut ex, 1, &lower).unwrap();
    let upper = Layer::new()
        .dir("was_file/", 0o755)
        .file("was_dir", 0o600, b"now a file")
        .dir("merged/", 0o751)
        .file("merged/new", 0o644, b"")
        .done();
    apply(&mut ex, 2, &upper).unwrap();
    assert!(root.join("was_file").is_dir());
    assert_eq!(fs::read(root.join("was_dir")).unwrap(), b"now a file");
    // A directory over a directory keeps its children and takes the new mode.
    assert!(root.join("merged/old").exists() && root.join("merged/new").exists());
    assert_eq!(mode(&root.join("merged")), 0o751);
    sb.assert_contained();
}

#[test]
fn pax_and_gnu_extensions() {
    let sb = Sandbox::new();
    let root = sb.root();
    let mut ex = sb.extractor(1 << 20);
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
    let mut l = Layer::new();
    // A GNU long name, through the tar crate's own builder.
    let mut h = Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_size(4);
    h.set_mode(0o644);
    h.set_entry_type(EntryType::Regular);
    l.b.append_data(&mut h, &long, &b"long"[..]).unwrap();
    l.pax(&[("path", b"pax/name"), ("mtime", b"1234567890.5")]);
    l.raw(b"ignored", EntryType::Regular, b"", 0o644, b"pax");
    l.pax(&[
        ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
        ("SCHILY.xattr.trusted.x", b"1"),
        ("uid", b"100000"),
        ("gid", b"100001"),
    ]);
    l.raw(b"capped", EntryType::Regular, b"", 0o755, b"cap");
    l.pax(&[("linkpath", b"/a/very/long/target")]);
    l.raw(b"sym", EntryType::Symlink, b"short", 0o777, b"");
    apply(&mut ex, 1, &l.done()).unwrap();
    assert_eq!(fs::read(root.join(&long)).unwrap(), b"long");
    assert_eq!(fs::read(root.join("pax/name")).unwrap(), b"pax");
    assert!(!root.join("ignored").exists());
    assert_eq!(
        fs::metadata(root.join("pax/name")).unwrap().mtime(),
        1_234_567_890
    );
    assert_eq!(ex.dropped_xattrs, 2);
    if moat_sys::process::effective_uid() == 0 {
        let m = fs::metadata(root.join("capped")).unwrap();
        assert_eq!((m.uid(), m.gid()), (100_000, 100_001));
    }
    assert_eq!(
        fs::read_link(root.join("sym")).unwrap(),
        Path::new("/a/very/long/target")
    );

    // A PAX path is checked like any other.
    let mut l = Layer::new();
    l.pax(&[("path", b"../../escape")]);
    l.raw(b"innocent", EntryType::Regular, b"", 0o644, b"");
    let m = refused(apply(&mut ex, 2, &l.done()));
    assert_eq!(m, "layer 2: entry `../../escape` escapes the image root");
    // An oversized extension record is refused before it is read.
    let mut l = Layer::new();
    l.raw(
        b"././@PaxHeader",
        EntryType::XHeader,
        b"",
        0o644,
        &vec![b'a'; 2 << 20],
    );
    let m = refused(apply(&mut ex, 2, &l.done()));
    assert!(
        m.starts_with("layer 2 has a PAX header of 2097152 bytes"),
        "{m}"
    );
    // Sparse files, either kind.
    let r = apply(
        &mut ex,
        1,
        &Layer::new()
            .raw(b"sparse", EntryType::GNUSparse, b"", 0o644, b"")
            .done(),
    );
    assert!(
        matches!(&r, Err(ImageError::Unsupported(m)) if m.contains("sparse")),
        "{r:?}"
    );
    let mut l = Layer::new();
    l.pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")]);
    l.raw(b"sparse2", EntryType::Regular, b"", 0o644, b"");
    let r = apply(&mut ex, 1, &l.done());
    assert!(
        matches!(&r, Err(ImageError::Unsupported(m)) if m.contains("sparse")),
        "{r:?}"
    );
    sb.assert_contained();
}

#[test]
fn resolving_in_the_root() {
    let sb = Sandbox::new();
    let root = sb.root();
    fs::create_dir(root.join("b")).unwrap();
    std::os::unix::fs::symlink("/b", root.join("a")).unwrap();
    std::os::unix::fs::symlink("../../../../b", root.join("up")).unwrap();
    std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
    let r = |p: &str| resolve_in_root(&root, Path::new(p));
    assert_eq!(r("a/c").unwrap(), root.join("b/c"));
    assert_eq!(r("up/c").unwrap(), root.join("b/c"));
    // The last component is not followed.
    assert_eq!(r("a").unwrap(), root.join("a"));
    assert_eq!(r("/a").unwrap(), root.join("a"));
    assert_eq!(r("../../etc/passwd").unwrap(), root.join("etc/passwd"));
    assert_eq!(r("a/../..").unwrap(), root);
    assert_eq!(r("a/..").unwrap(), root);
    assert_eq!(r("").unwrap(), root);
    assert_eq!(r("missing/../a/x").unwrap(), root.join("b/x"));
    assert_eq!(
        r("missing/deeper/x").unwrap(),
        root.join("missing/deeper/x")
    );
    assert!(matches!(r("loop/x"), Err(ImageError::Refused(_))));
    assert_eq!(r("loop").unwrap(), root.join("loop"));
}

/// Directory modes and mtimes are applied when the layer ends: by then a parent of that
/// directory may have been replaced by a symlink to a host path. The fixup must not follow
/// it (it would chmod a host directory).
#[test]
fn deferred_directory_fixups_do_not_follow_a_swapped_parent() {
    let sb = Sandbox::new();
    let host = sb.base.join("host");
    fs::create_dir_all(host.join("b")).unwrap();
    fs::set_permissions(host.join("b"), fs::Permissions::from_mode(0o700)).unwrap();
    let before = fs::metadata(host.join("b")).unwrap().mtime();
    let mut ex = sb.extractor(1 << 20);
    let layer = Layer::new()
        .dir("a/", 0o755)
        .dir("a/b/", 0o777)
        .symlink("a", host.to_str().unwrap())
        .done();
    apply(&mut ex, 1, &layer).unwrap();
    let m = fs::metadata(host.join("b")).unwrap();
    assert_eq!(
        m.permissions().mode() & 0o7777,
        0o700,
        "a host directory was chmodded"
    );
    assert_eq!(m.mtime(), before);
    assert!(fs::symlink_metadata(sb.root().join("a"))
        .unwrap()
        .file_type()
        .is_symlink());
    fs::remove_dir_all(&host).unwrap();
    sb.assert_contained();
}

#[test]
fn opening_in_the_root() {
    use std::io::Read as _;
    let sb = Sandbox::new();
    let root = sb.root();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/real"), b"image passwd").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", root.join("etc/abs")).unwrap();
    std::os::unix::fs::symlink("../../../etc/hostname", root.join("etc/rel")).unwrap();
    std::os::unix::fs::symlink("real", root.join("etc/passwd")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("e")).unwrap();
    std::os::unix::fs::symlink("l2", root.join("l1")).unwrap();
    std::os::unix::fs::symlink("l1", root.join("l2")).unwrap();
    let read = |p: &str| {
        open_in_root(&root, Path::new(p)).map(|mut f| {
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            s
        })
    };
    assert_eq!(read("etc/passwd").unwrap(), "image passwd");
    assert_eq!(read("/e/passwd").unwrap(), "image passwd");
    // Links out of the image resolve inside it, where there is nothing.
    assert!(matches!(read("etc/abs"), Err(ImageError::NotFound(_))));
    assert!(matches!(read("etc/rel"), Err(ImageError::NotFound(_))));
    fs::write(root.join("etc/shadow"), b"image shadow").unwrap();
    assert_eq!(read("etc/abs").unwrap(), "image shadow");
    assert!(matches!(read("l1"), Err(ImageError::Refused(_))));
}
