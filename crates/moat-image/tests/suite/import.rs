//! Imports without a registry: OCI layouts (a directory, a tar) built here, and the
//! store's guarantees when an image is hostile or broken: nothing is left behind.

use std::fs;
use std::path::Path;

use moat_image::{ImageError, NoProgress, PullOptions, Store};
use serde_json::json;

use super::support::*;

fn assert_clean(store: &Store) {
    for sub in ["tmp", "rootfs", "index"] {
        assert!(
            names(&store.root().join(sub)).is_empty(),
            "{sub}/ is not empty"
        );
    }
}

fn opts(max_bytes: u64) -> PullOptions {
    PullOptions {
        max_bytes: Some(max_bytes),
        ..Default::default()
    }
}

/// A layout with one image of `layers`, tagged `v1`.
fn layout_with(dir: &Path, layers: &[Vec<u8>]) -> Desc {
    let layout = Layout::new(dir);
    let image = layout.image(layers, "amd64", json!({"Cmd": ["/bin/sh"]}));
    layout.tag(&image, "v1");
    image
}

#[test]
fn an_oci_layout_directory_and_tar() {
    let work = TempDir::new("moat-image-import");
    let dir = work.path().join("my image");
    let image = layout_with(&dir, &busybox_layers());
    let store = Store::open(&work.path().join("state")).unwrap();
    let mut events = Events::default();
    let t = store
        .import(&dir, &PullOptions::default(), &mut events)
        .unwrap();
    // The directory's name (cleaned), with the layout's tag.
    assert_eq!(t.name, "my-image:v1");
    assert_eq!(t.digest, image.digest);
    assert_eq!(t.source, dir.display().to_string());
    assert_eq!(t.config.cmd, ["/bin/sh"]);
    assert_eq!(
        fs::read(t.rootfs.join("hello.txt")).unwrap(),
        b"hello from layer 2\n"
    );
    assert!(!t.rootfs.join("etc/gone").exists());
    let done: Vec<_> = events
        .0
        .iter()
        .filter(|e| matches!(e, moat_image::ProgressEvent::LayerDone { .. }))
        .collect();
    assert_eq!(done.len(), 2, "{:?}", events.0);
    assert_eq!(events.0.last(), Some(&moat_image::ProgressEvent::Done));

    // The same layout as a tar, under a name of our choosing.
    let tar_path = work.path().join("layout.tar");
    let mut b = tar::Builder::new(fs::File::create(&tar_path).unwrap());
    b.append_dir_all(".", &dir).unwrap();
    b.into_inner().unwrap();
    let named = PullOptions {
        name: Some("from/tar:1".into()),
        ..Default::default()
    };
    let t2 = store.import(&tar_path, &named, &mut NoProgress).unwrap();
    assert_eq!(t2.name, "from/tar:1");
    assert_eq!(t2.rootfs, t.rootfs);
    assert_eq!(store.list().unwrap().len(), 2);

    // Not an image.
    let e = store.import(
        work.path().join("state").as_path(),
        &PullOptions::default(),
        &mut NoProgress,
    );
    assert!(matches!(e, Err(ImageError::Unsupported(_))), "{e:?}");
    let e = store.import(
        &work.path().join("nope.tar"),
        &PullOptions::default(),
        &mut NoProgress,
    );
    assert!(matches!(e, Err(ImageError::NotFound(_))), "{e:?}");
    let bad = PullOptions {
        name: Some("../evil".into()),
        ..Default::default()
    };
    let e = store.import(&dir, &bad, &mut NoProgress);
    assert!(matches!(e, Err(ImageError::BadReference(_))), "{e:?}");
}

#[test]
fn a_decompression_bomb_leaves_nothing_behind() {
    let work = TempDir::new("moat-image-bomb");
    // 64 MiB of zeros in one file: a gzip of about 64 KiB.
    let zeros = vec![0u8; 64 << 20];
    let layer = LayerTar::default().file("zeros", 0o644, &zeros).done();
    drop(zeros);
    layout_with(&work.path().join("bomb"), &[layer]);
    let store = Store::open(&work.path().join("state")).unwrap();
    let e = store
        .import(&work.path().join("bomb"), &opts(1 << 20), &mut NoProgress)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the image expands past 1 MiB (a decompression bomb?): pass a larger --max-size if it \
         is real"
    );
    assert!(matches!(e, ImageError::TooLarge(_)));
    assert_clean(&store);
}

#[test]
fn a_hostile_or_corrupt_layer_leaves_nothing_behind() {
    let work = TempDir::new("moat-image-hostile");
    let store = Store::open(&work.path().join("state")).unwrap();
    let good = LayerTar::default().file("ok", 0o644, b"fine").done();

    // An escape in the second layer: the first layer's tree goes too.
    let evil = LayerTar::default()
        .raw_file("../../outside", b"pwned")
        .done();
    layout_with(&work.path().join("evil"), &[good.clone(), evil]);
    let e = store
        .import(
            &work.path().join("evil"),
            &PullOptions::default(),
            &mut NoProgress,
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "layer 2: entry `../../outside` escapes the image root"
    );
    assert_clean(&store);
    assert!(!work.path().join("outside").exists());
    assert!(!work.path().join("state/outside").exists());

    // A device node.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Block);
    h.set_mode(0o660);
    h.set_size(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_device_major(8).unwrap();
    h.set_device_minor(0).unwrap();
    b.append_data(&mut h, "dev/sda", &[][..]).unwrap();
    layout_with(&work.path().join("dev"), &[b.into_inner().unwrap()]);
    let e = store
        .import(
            &work.path().join("dev"),
            &PullOptions::default(),
            &mut NoProgress,
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "layer 1: `dev/sda` is a device node: moat does not create device nodes from images"
    );
    assert_clean(&store);

    // A layer blob changed after the manifest was written.
    let dir = work.path().join("corrupt");
    let image = layout_with(&dir, &[good]);
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(
            dir.join("blobs/sha256")
                .join(image.digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let path = dir
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let other = gzip(&LayerTar::default().file("ok", 0o644, b"evil").done());
    fs::write(&path, other).unwrap();
    let e = store
        .import(&dir, &PullOptions::default(), &mut NoProgress)
        .unwrap_err();
    assert!(matches!(e, ImageError::Digest(_)), "{e}");
    assert_clean(&store);
}

#[test]
fn stale_build_directories_are_removed_on_open() {
    let work = TempDir::new("moat-image-stale");
    let store = Store::open(work.path()).unwrap();
    let tmp = store.root().join("tmp");
    // pid_max is at most 2^22: this process cannot exist.
    fs::create_dir_all(tmp.join("999999999-dead/usr/bin")).unwrap();
    fs::write(tmp.join("999999999-dead/usr/bin/x"), b"").unwrap();
    fs::write(tmp.join("999999999-dead.tar"), b"").unwrap();
    let mine = tmp.join(format!("{}-alive", std::process::id()));
    fs::create_dir(&mine).unwrap();
    let store = Store::open(work.path()).unwrap();
    assert_eq!(
        names(&store.root().join("tmp")),
        [format!("{}-alive", std::process::id())]
    );
}
