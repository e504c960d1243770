//! The template store: `<state_dir>/templates`, see the crate docs for its layout.
//!
//! Consistency rules:
//! - A rootfs is built in `tmp/<pid>-<random>/` and renamed into `rootfs/<chain id>/` only
//!   when every layer was applied and verified; any failure drops the tmp directory, so a
//!   half-built or unverified tree is never visible. `open` removes tmp directories whose
//!   process is gone.
//! - An index entry is written to a temporary file and renamed over the old one: readers
//!   see the old template or the new one, never a torn file.
//! - Committing (rename + index write + garbage collection) and removing happen under an
//!   `flock` on `.lock`, so a concurrent remove cannot collect a rootfs that a pull is about
//!   to reference.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::archive;
use crate::digest::{chain_id, Digest};
use crate::extract::{apply_blob, Extractor, LayerInput};
use crate::manifest::{Config, Platform};
use crate::reference::{escape_name, has_tag_or_digest, validate_name, Reference};
use crate::registry::{self, Client};
use crate::{ImageError, Progress, ProgressEvent, PullOptions, Template, DEFAULT_MAX_BYTES};

/// How long to wait for another moat process holding the store's lock.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// The templates under one state directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// An image ready to be built into a template.
struct Plan {
    source: String,
    digest: Digest,
    config: Config,
    layers: usize,
}

impl Store {
    /// Opens (creating, mode 0700) `<state_dir>/templates`, and removes what failed or
    /// interrupted builds left in its `tmp/`.
    pub fn open(state_dir: &Path) -> Result<Store, ImageError> {
        let root = state_dir.join("templates");
        mkdir_private(&root)?;
        // The store holds setuid binaries and whatever else images carry: 0700 keeps every
        // unprivileged host user out of it, whatever its parents' modes are.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(|e| ImageError::io("cannot chmod", &root, &e))?;
        let root = root
            .canonicalize()
            .map_err(|e| ImageError::io("cannot open", &root, &e))?;
        for sub in ["rootfs", "index", "tmp"] {
            mkdir_private(&root.join(sub))?;
        }
        let store = Store { root };
        store.clean_tmp()?;
        Ok(store)
    }

    /// `<state_dir>/templates`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Pulls `reference` from its registry and stores it as a template named `opts.name`
    /// (default: [`crate::default_name`]). A template of that name is replaced atomically,
    /// and its old rootfs removed if no other template uses it.
    pub fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &mut dyn Progress,
    ) -> Result<Template, ImageError> {
        let r = Reference::parse(reference)?;
        let name = opts.name.clone().unwrap_or_else(|| r.default_name());
        validate_name(&name)?;
        let platform = platform(opts)?;
        let mut client = Client::new(&r, opts)?;
        let resolved = client.resolve(&platform)?;
        let what = format!("`{r}`");
        registry::check_layers(&resolved.manifest, &resolved.config, &what)?;
        check_platform(opts, &resolved.config, &platform, &what)?;
        let layers = resolved.manifest.layers.clone();
        let digests = registry::layer_digests(&layers)?;
        for (i, l) in layers.iter().enumerate() {
            // Refuse zstd and the like before downloading anything.
            crate::manifest::check_layer_media_type(
                &l.media_type,
                &format!("layer {} of {}", i + 1, layers.len()),
            )?;
        }
        let plan = Plan {
            source: r.to_string(),
            digest: resolved.digest,
            config: resolved.config,
            layers: layers.len(),
        };
        let diff_ids = plan.config.diff_ids.clone();
        self.build(&name, plan, opts, progress, &mut |i| {
            let reader = client.open_blob(&digests[i])?;
            Ok(LayerInput {
                index: i,
                count: layers.len(),
                reader: Box::new(reader),
                blob: Some((digests[i].clone(), layers[i].size)),
                media_type: layers[i].media_type.clone(),
                diff_id: diff_ids[i].clone(),
            })
        })
    }

    /// Imports a `docker save` archive (a tar, possibly gzipped) or an OCI image layout (a
    /// directory, or a tar of one) as a template named `opts.name`, else the archive's own
    /// tag, else the file's stem. Registry options in `opts` are ignored.
    pub fn import(
        &self,
        path: &Path,
        opts: &PullOptions,
        progress: &mut dyn Progress,
    ) -> Result<Template, ImageError> {
        let path =
            std::path::absolute(path).map_err(|e| ImageError::io("cannot open", path, &e))?;
        if let Some(n) = &opts.name {
            validate_name(n)?;
        }
        let platform = platform(opts)?;
        // Where a gzipped archive is decompressed to, if it is; removed when done.
        let scratch = TmpFile(self.root.join("tmp").join(format!(
            "{}-{}.tar",
            std::process::id(),
            random_hex()?
        )));
        let imported = archive::open(
            &path,
            &scratch.0,
            &platform,
            opts.max_bytes.unwrap_or(DEFAULT_MAX_BYTES),
        )?;
        let name = match (&opts.name, &imported.name) {
            (Some(n), _) => n.clone(),
            (None, Some(n)) => n.clone(),
            (None, None) => archive::stem(&path),
        };
        validate_name(&name)?;
        let what = format!("`{}`", path.display());
        check_platform(opts, &imported.config, &platform, &what)?;
        let plan = Plan {
            source: path.display().to_string(),
            digest: imported.digest.clone(),
            config: imported.config.clone(),
            layers: imported.layer_count(),
        };
        self.build(&name, plan, opts, progress, &mut |i| imported.layer(i))
    }

    /// Every template, sorted by name. An unreadable index entry is skipped.
    pub fn list(&self) -> Result<Vec<Template>, ImageError> {
        let mut out: Vec<Template> = self
            .index_files()?
            .iter()
            .filter_map(|p| self.load(p).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The template called `name`; `busybox` also finds `busybox:latest`.
    pub fn get(&self, name: &str) -> Result<Template, ImageError> {
        let path = self.find(name)?;
        self.load(&path)
    }

    /// Removes the template and any rootfs no other template uses.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        let _lock = self.lock()?;
        let path = self.find(name)?;
        fs::remove_file(&path).map_err(|e| ImageError::io("cannot remove", &path, &e))?;
        self.collect_garbage()
    }

    fn find(&self, name: &str) -> Result<PathBuf, ImageError> {
        validate_name(name)?;
        let mut candidates = vec![name.to_string()];
        if !has_tag_or_digest(name) {
            candidates.push(format!("{name}:latest"));
        }
        for c in &candidates {
            let p = self.root.join("index").join(escape_name(c));
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(ImageError::NotFound(format!(
            "there is no template `{name}`: `moat template ls` lists them, `moat template \
             pull <image>` adds one"
        )))
    }

    fn load(&self, path: &Path) -> Result<Template, ImageError> {
        let body = fs::read(path).map_err(|e| ImageError::io("cannot read", path, &e))?;
        let mut t: Template = serde_json::from_slice(&body).map_err(|e| {
            ImageError::Io(format!(
                "the template entry {} is corrupt ({e}): remove it and pull the image again",
                path.display()
            ))
        })?;
        // The rootfs is always this store's: a moved state directory still works.
        if let Some(hex) = t.rootfs.file_name().and_then(|h| h.to_str()) {
            if Digest::parse(&format!("sha256:{hex}")).is_ok() {
                t.rootfs = self.root.join("rootfs").join(hex);
            }
        }
        Ok(t)
    }

    fn index_files(&self) -> Result<Vec<PathBuf>, ImageError> {
        let dir = self.root.join("index");
        let rd = fs::read_dir(&dir).map_err(|e| ImageError::io("cannot list", &dir, &e))?;
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|e| ImageError::io("cannot list", &dir, &e))?;
            let n = e.file_name();
            let n = n.to_string_lossy();
            if !n.starts_with('.') && n.ends_with(".json") {
                out.push(e.path());
            }
        }
        Ok(out)
    }

    /// Builds (or reuses) the rootfs for `plan` and commits the template.
    fn build(
        &self,
        name: &str,
        plan: Plan,
        opts: &PullOptions,
        progress: &mut dyn Progress,
        open: &mut dyn FnMut(usize) -> Result<LayerInput<'static>, ImageError>,
    ) -> Result<Template, ImageError> {
        progress.event(ProgressEvent::Resolved {
            reference: plan.source.clone(),
            digest: plan.digest.to_string(),
            layers: plan.layers,
        });
        let chain = chain_id(&plan.config.diff_ids);
        let rootfs = self.root.join("rootfs").join(chain.hex());
        let max_bytes = opts.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
        // Twice at most: a rootfs seen as present may be collected before we lock.
        for _ in 0..2 {
            if rootfs.is_dir() {
                let _lock = self.lock()?;
                if !rootfs.is_dir() {
                    continue;
                }
                let (size, dropped) = self.stats_of(&rootfs)?;
                let t = self.commit(name, &plan, &rootfs, size, dropped)?;
                progress.event(ProgressEvent::Done);
                return Ok(t);
            }
            let tmp = TmpDir::new(&self.root.join("tmp"))?;
            // The image's root entry, if any, sets the final mode.
            fs::set_permissions(&tmp.path, fs::Permissions::from_mode(0o755))
                .map_err(|e| ImageError::io("cannot chmod", &tmp.path, &e))?;
            let mut ex = Extractor::new(&tmp.path, max_bytes)?;
            for i in 0..plan.layers {
                apply_blob(&mut ex, open(i)?, progress)?;
            }
            let size = disk_usage(&tmp.path)?;
            let _lock = self.lock()?;
            match fs::rename(&tmp.path, &rootfs) {
                Ok(()) => tmp.disarm(),
                // Another pull of the same layers won: use its tree, drop ours.
                Err(_) if rootfs.is_dir() => {}
                Err(e) => return Err(ImageError::io("cannot store", &rootfs, &e)),
            }
            let t = self.commit(name, &plan, &rootfs, size, ex.dropped_xattrs)?;
            progress.event(ProgressEvent::Done);
            return Ok(t);
        }
        Err(ImageError::Io(format!(
            "the rootfs {} keeps disappearing: is another moat removing templates?",
            rootfs.display()
        )))
    }

    /// Writes the index entry (tmp file + rename) and collects unused rootfs trees. The
    /// caller holds the lock.
    fn commit(
        &self,
        name: &str,
        plan: &Plan,
        rootfs: &Path,
        size_bytes: u64,
        dropped_xattrs: u64,
    ) -> Result<Template, ImageError> {
        let t = Template {
            name: name.to_string(),
            source: plan.source.clone(),
            digest: plan.digest.to_string(),
            created_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            size_bytes,
            rootfs: rootfs.to_path_buf(),
            config: plan.config.image.clone(),
            dropped_xattrs,
        };
        let body = serde_json::to_vec_pretty(&t)
            .map_err(|e| ImageError::Io(format!("cannot encode the template: {e}")))?;
        let dir = self.root.join("index");
        let final_path = dir.join(escape_name(name));
        let tmp_path = dir.join(format!(".tmp-{}-{}", std::process::id(), random_hex()?));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp_path)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp_path, &final_path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp_path);
            return Err(ImageError::io("cannot write", &final_path, &e));
        }
        self.collect_garbage()?;
        Ok(t)
    }

    /// The size and dropped xattrs recorded for `rootfs` by another template, else measured.
    fn stats_of(&self, rootfs: &Path) -> Result<(u64, u64), ImageError> {
        for p in self.index_files()? {
            if let Ok(t) = self.load(&p) {
                if t.rootfs == rootfs {
                    return Ok((t.size_bytes, t.dropped_xattrs));
                }
            }
        }
        Ok((disk_usage(rootfs)?, 0))
    }

    /// Removes every rootfs no index entry references. Skipped entirely if an index entry
    /// cannot be read (it might reference any of them). The caller holds the lock.
    fn collect_garbage(&self) -> Result<(), ImageError> {
        let mut used = HashSet::new();
        for p in self.index_files()? {
            match self.load(&p) {
                Ok(t) => {
                    used.insert(t.rootfs);
                }
                Err(_) => return Ok(()),
            }
        }
        let dir = self.root.join("rootfs");
        let rd = fs::read_dir(&dir).map_err(|e| ImageError::io("cannot list", &dir, &e))?;
        for e in rd {
            let e = e.map_err(|e| ImageError::io("cannot list", &dir, &e))?;
            let p = e.path();
            if used.contains(&p) {
                continue;
            }
            // Out of rootfs/ first, in one rename, then deleted at leisure.
            let doomed =
                self.root
                    .join("tmp")
                    .join(format!("{}-gc-{}", std::process::id(), random_hex()?));
            fs::rename(&p, &doomed).map_err(|e| ImageError::io("cannot remove", &p, &e))?;
            force_remove_dir_all(&doomed)
                .map_err(|e| ImageError::io("cannot remove", &doomed, &e))?;
        }
        Ok(())
    }

    /// Removes `tmp/` entries whose owning process (the pid before the `-`) is gone.
    fn clean_tmp(&self) -> Result<(), ImageError> {
        let dir = self.root.join("tmp");
        let rd = fs::read_dir(&dir).map_err(|e| ImageError::io("cannot list", &dir, &e))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .split(['-', '.'])
                .next()
                .and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if alive {
                continue;
            }
            let p = e.path();
            let r = match e.file_type() {
                Ok(t) if t.is_dir() => force_remove_dir_all(&p),
                _ => fs::remove_file(&p),
            };
            r.map_err(|e| ImageError::io("cannot remove the stale", &p, &e))?;
        }
        Ok(())
    }

    /// Takes the store's lock (waiting for another holder, up to two minutes).
    fn lock(&self) -> Result<File, ImageError> {
        let path = self.root.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| ImageError::io("cannot open", &path, &e))?;
        let start = Instant::now();
        loop {
            match moat_sys::process::try_lock(f.as_raw_fd()) {
                Ok(true) => return Ok(f),
                Ok(false) if start.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(false) => {
                    return Err(ImageError::Io(format!(
                        "{} stays locked: another moat process is storing or removing a \
                         template; try again when it is done",
                        path.display()
                    )))
                }
                Err(e) => return Err(ImageError::io("cannot lock", &path, &e)),
            }
        }
    }
}

/// The platform asked for, or the host's.
fn platform(opts: &PullOptions) -> Result<Platform, ImageError> {
    match &opts.platform {
        Some(p) => Platform::parse(p),
        None => Ok(Platform::host()),
    }
}

/// An explicitly asked-for platform must be what a single-platform image is built for.
fn check_platform(
    opts: &PullOptions,
    config: &Config,
    wanted: &Platform,
    what: &str,
) -> Result<(), ImageError> {
    if opts.platform.is_none() || config.image.architecture.is_empty() {
        return Ok(());
    }
    let have = Platform {
        os: config.image.os.clone(),
        architecture: config.image.architecture.clone(),
        variant: config.variant.clone(),
    };
    if have.satisfies(wanted) {
        Ok(())
    } else {
        Err(ImageError::NotFound(format!(
            "{what} is built for {have}, not {wanted}: pull it without --platform, or pick an \
             image for {wanted}"
        )))
    }
}

fn mkdir_private(p: &Path) -> Result<(), ImageError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(|e| ImageError::io("cannot create the directory", p, &e))
}

fn random_hex() -> Result<String, ImageError> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| ImageError::Io(format!("cannot get random bytes: {e}")))?;
    Ok(hex::encode(b))
}

/// A directory under `tmp/` removed on drop unless disarmed.
struct TmpDir {
    path: PathBuf,
    armed: bool,
}

impl TmpDir {
    fn new(tmp: &Path) -> Result<TmpDir, ImageError> {
        let path = tmp.join(format!("{}-{}", std::process::id(), random_hex()?));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| ImageError::io("cannot create the directory", &path, &e))?;
        Ok(TmpDir { path, armed: true })
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if self.armed {
            let _ = force_remove_dir_all(&self.path);
        }
    }
}

/// A file removed on drop (if it exists).
struct TmpFile(PathBuf);

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `remove_dir_all`, retried after making every directory in the tree writable (an image's
/// 0555 directories stop a non-root removal). Symlinks are never followed.
pub(crate) fn force_remove_dir_all(p: &Path) -> io::Result<()> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            let mut todo = vec![p.to_path_buf()];
            while let Some(d) = todo.pop() {
                match fs::symlink_metadata(&d) {
                    Ok(m) if m.is_dir() => {
                        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o700));
                        if let Ok(rd) = fs::read_dir(&d) {
                            todo.extend(rd.flatten().map(|e| e.path()));
                        }
                    }
                    _ => {}
                }
            }
            fs::remove_dir_all(p)
        }
    }
}

/// The bytes of the regular files under `root`, each inode once; never follows symlinks.
fn disk_usage(root: &Path) -> Result<u64, ImageError> {
    let mut total = 0u64;
    let mut seen = HashSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        let rd = fs::read_dir(&d).map_err(|e| ImageError::io("cannot list", &d, &e))?;
        for e in rd {
            let e = e.map_err(|e| ImageError::io("cannot list", &d, &e))?;
            let m = fs::symlink_metadata(e.path())
                .map_err(|err| ImageError::io("cannot inspect", &e.path(), &err))?;
            if m.is_dir() {
                todo.push(e.path());
            } else if m.is_file() && (m.nlink() == 1 || seen.insert((m.dev(), m.ino()))) {
                total += m.len();
            }
        }
    }
    Ok(total)
}
