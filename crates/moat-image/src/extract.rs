//! Applying layers to a root filesystem directory: the part of moat that handles hostile
//! image content as root.
//!
//! The rules, and where they come from:
//!
//! - **Every path is resolved inside the root, never on the host.** A layer can plant a
//!   symlink (`evil -> /`) and then write `evil/etc/passwd`; resolving that with the host's
//!   path walk would write the host's `/etc/passwd` (the bug class behind Docker
//!   CVE-2018-15664 and the "zip slip" family). [`resolve_in_root`] walks a path one
//!   component at a time with `lstat`, and replaces a symlink by its target read as if the
//!   root were `/`: absolute targets restart at the root, `..` stops at the root, at most
//!   40 expansions (Linux's own limit). That is cyphar/filepath-securejoin's legacy
//!   `SecureJoin` (runc, Kubernetes), containerd's `fs.RootPath` (continuity) and umoci's fork
//!   of Docker's `EvalSymlinksInScope`, and what `openat2(RESOLVE_IN_ROOT)` does in the
//!   kernel. securejoin's own docs warn that this path-based walk is not safe against a
//!   *racing* attacker; it is enough here because nothing runs in the tree while it is built:
//!   it is a fresh directory under a 0700 directory that only this extraction writes, and the
//!   layers are applied one entry at a time.
//! - **The final component is never followed.** It is `lstat`ed; whatever is there (a
//!   symlink included) is removed and created anew, except a directory over a directory,
//!   which is kept and gets the new mode and owner (containerd does the same). Files are
//!   created with `O_CREAT|O_EXCL|O_NOFOLLOW`, so even a racing symlink could not redirect
//!   the write.
//! - **Hard links** are resolved the same way (their target's last component not followed:
//!   `linkat` without `AT_SYMLINK_FOLLOW`, which is what `std::fs::hard_link` calls on Linux,
//!   links a symlink itself), must name an existing non-directory inside the root, and are
//!   otherwise refused. containerd's `RootPath` *does* follow a final symlink for a hard-link
//!   target; following nothing is stricter and still correct.
//! - **`..` in an entry's name is refused** (rather than clamped), so that a layer that tries
//!   is reported, not silently rewritten.
//! - **No device nodes** (the sandbox must never get a raw disk), FIFOs are skipped.
//!   Setuid/setgid bits are kept: moat mounts templates `nosuid`, and the 0700 store keeps
//!   unprivileged host users from reaching them.
//! - **Whiteouts** (`.wh.name`) and opaque markers (`.wh..wh..opq`) follow image-spec
//!   `layer.md`; an opaque directory loses everything that this same layer did not create,
//!   tracked by the set of paths the layer created (containerd's `unpackedPaths`).
//! - **Limits are checked while writing**: the bytes of file content across all layers, the
//!   number of entries, and the decompressed stream itself (which bounds data that is read
//!   but not written: skipped payloads, padding). A PAX or GNU long-name record is read
//!   into memory by the `tar` crate without a bound, so the archive is walked in `raw` mode
//!   and those records are read here, bounded to 1 MiB each.
//! - Directory modes and mtimes are applied when the layer is done (creating a child would
//!   change the mtime, and a 0555 directory could not be filled by a non-root extraction).
//!   By then a later entry may have replaced a parent of that directory with a symlink to a
//!   host path, so the fixup walks the path again following nothing, and checks that it
//!   reached the same inode: a stored host path is never trusted twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tar::EntryType;

use crate::digest::{limit_error, Digest, HashReader, Overflow, SizeMismatch};
use crate::manifest::{check_layer_media_type, sniff, Compression};
use crate::{ImageError, Progress, ProgressEvent, MAX_ENTRIES};

/// Linux's limit on symlink expansions in one path walk (`MAXSYMLINKS`).
const MAX_LINKS: u32 = 40;
/// The most a PAX header or a GNU long name/link record may hold.
const MAX_EXTENSION_BYTES: u64 = 1 << 20;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Resolves `rel` inside `root` as if `root` were `/` (go-securejoin's `SecureJoin`,
/// `openat2(RESOLVE_IN_ROOT)`): every component but the last is walked with `lstat`, a
/// symlink among them is replaced by its target read relative to `root` (absolute targets
/// restart at `root`, `..` stops at `root`, at most 40 expansions), and components that do
/// not exist are appended as they are. The last component is not followed, so the result
/// may itself be a symlink: `lstat` it, never `stat` it. The result is always `root` or
/// below it.
///
/// Like `SecureJoin`, this is only safe while nobody else can change the tree under `root`
/// (a template's rootfs, before any sandbox runs on it, qualifies).
pub fn resolve_in_root(root: &Path, rel: &Path) -> Result<PathBuf, ImageError> {
    let shown = rel.display().to_string();
    let mut comps: Vec<OsString> = split(rel.as_os_str().as_bytes());
    while comps.last().is_some_and(|c| c == ".") {
        comps.pop();
    }
    // A trailing `..` names the directory the walk ends in, which must then be walked too.
    let last = match comps.last() {
        Some(c) if c != ".." => comps.pop(),
        _ => None,
    };
    let dir = walk(root, comps.into(), Missing::Append, &mut |_| Ok(()))
        .map_err(|e| e.into_error(&format!("`{shown}`")))?
        .unwrap_or_else(|| root.to_path_buf());
    Ok(match last {
        Some(name) => dir.join(name),
        None => dir,
    })
}

/// Opens the file at `rel` inside `root` for reading, every symlink on the way (the last
/// one included) resolved inside `root` as [`resolve_in_root`] does: for reading an image's
/// own files from the host (`/etc/passwd` to map a user name, say) without an image symlink
/// such as `etc/passwd -> /etc/shadow` reaching a host file. Opened with `O_NOFOLLOW`.
pub fn open_in_root(root: &Path, rel: &Path) -> Result<fs::File, ImageError> {
    let shown = rel.display().to_string();
    let mut comps: VecDeque<OsString> = split(rel.as_os_str().as_bytes()).into();
    for _ in 0..=MAX_LINKS {
        let path = resolve_in_root(root, &join_comps(&comps))?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&path)
                    .map_err(|e| ImageError::io("cannot read the symlink", &path, &e))?;
                let target = target.as_os_str().as_bytes();
                // Where the link is, then its target: relative targets start from its dir.
                let mut next: VecDeque<OsString> = if target.first() == Some(&b'/') {
                    VecDeque::new()
                } else {
                    let dir = path.parent().unwrap_or(root);
                    let dir = dir.strip_prefix(root).unwrap_or(Path::new(""));
                    split(dir.as_os_str().as_bytes()).into()
                };
                next.extend(split(target));
                comps = next;
            }
            _ => {
                return OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::NotFound => {
                            ImageError::NotFound(format!("`{shown}` is not in the image"))
                        }
                        _ => ImageError::io("cannot open", &path, &e),
                    });
            }
        }
    }
    Err(ImageError::Refused(format!(
        "`{shown}` goes through more than {MAX_LINKS} symlinks (a loop?)"
    )))
}

fn join_comps(comps: &VecDeque<OsString>) -> PathBuf {
    let mut p = PathBuf::new();
    for c in comps {
        p.push(c);
    }
    p
}

/// A path's components as they are written, `..` and `.` included (empty ones dropped).
fn split(path: &[u8]) -> Vec<OsString> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(|c| OsString::from_vec(c.to_vec()))
        .collect()
}

/// What [`walk`] does with a component that does not exist.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Missing {
    /// Create it as a directory (through the callback).
    Create,
    /// Keep going lexically (its children do not exist either, so `lstat` says so).
    Append,
    /// Stop: the walk returns `None`.
    Stop,
}

enum WalkError {
    Loop,
    NotDir(String),
    Io(String, PathBuf, io::Error),
}

impl WalkError {
    fn into_error(self, what: &str) -> ImageError {
        match self {
            WalkError::Loop => ImageError::Refused(format!(
                "{what} goes through more than {MAX_LINKS} symlinks (a loop?)"
            )),
            WalkError::NotDir(p) => {
                ImageError::Refused(format!("{what}: `{p}` is not a directory"))
            }
            WalkError::Io(op, p, e) => ImageError::io(&op, &p, &e),
        }
    }
}

/// Walks `queue` (components, `..` allowed) from `root`, every component treated as a
/// directory: the engine of [`resolve_in_root`], see there.
fn walk(
    root: &Path,
    mut queue: VecDeque<OsString>,
    missing: Missing,
    on_create: &mut dyn FnMut(&Path) -> io::Result<()>,
) -> Result<Option<PathBuf>, WalkError> {
    // The resolved path so far, as components below the root: only real directories.
    let mut stack: Vec<OsString> = Vec::new();
    let mut here = root.to_path_buf();
    let mut links = 0;
    while let Some(c) = queue.pop_front() {
        if c == "." {
            continue;
        }
        if c == ".." {
            // Clamped at the root: popping an empty stack stays at the root.
            if stack.pop().is_some() {
                here.pop();
            }
            continue;
        }
        let next = here.join(&c);
        match fs::symlink_metadata(&next) {
            Ok(m) if m.is_dir() => {
                stack.push(c);
                here = next;
            }
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(WalkError::Loop);
                }
                let target = fs::read_link(&next)
                    .map_err(|e| WalkError::Io("cannot read the symlink".into(), next, e))?;
                let target = target.as_os_str().as_bytes();
                if target.first() == Some(&b'/') {
                    stack.clear();
                    here = root.to_path_buf();
                }
                let mut expanded: VecDeque<OsString> = split(target).into();
                expanded.extend(queue.drain(..));
                queue = expanded;
            }
            Ok(_) => {
                stack.push(c);
                return Err(WalkError::NotDir(display(&stack)));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match missing {
                Missing::Stop => return Ok(None),
                Missing::Append => {
                    stack.push(c);
                    here = next;
                }
                Missing::Create => {
                    on_create(&next).map_err(|e| {
                        WalkError::Io("cannot create the directory".into(), next.clone(), e)
                    })?;
                    stack.push(c);
                    here = next;
                }
            },
            Err(e) => return Err(WalkError::Io("cannot inspect".into(), next, e)),
        }
    }
    Ok(Some(here))
}

fn display(comps: &[OsString]) -> String {
    let v: Vec<_> = comps.iter().map(|c| c.to_string_lossy()).collect();
    v.join("/")
}

/// One tar entry's metadata, PAX and GNU extensions applied.
struct Meta {
    path: Vec<u8>,
    link: Option<Vec<u8>>,
    kind: EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Option<SystemTime>,
    size: u64,
    xattrs: Vec<(String, Vec<u8>)>,
    dropped_xattrs: u64,
}

/// Extension records waiting for the entry they describe.
#[derive(Default)]
struct Pending {
    pax: Option<Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

/// Per-layer state.
struct Layer {
    /// 1-based, for messages.
    n: usize,
    /// Paths this layer created (the parents it made included): what an opaque marker keeps.
    created: HashSet<PathBuf>,
    /// Directory modes and mtimes, applied when the layer is done.
    dirs: HashMap<PathBuf, DirFix>,
}

/// A directory's mode and mtime to apply at the end of the layer, and its identity: by then
/// a parent of its path may have been replaced by a symlink (to a host path, even), so the
/// fixup re-walks the path without following anything and checks it found the same inode.
struct DirFix {
    mode: u32,
    mtime: Option<SystemTime>,
    dev: u64,
    ino: u64,
}

/// Applies layers, in order, to one root directory.
pub(crate) struct Extractor {
    root: PathBuf,
    max_bytes: u64,
    max_entries: u64,
    /// File content written so far, across layers.
    written: u64,
    /// Decompressed tar stream bytes read so far, across layers, and their bound.
    streamed: u64,
    max_stream: u64,
    entries: u64,
    as_root: bool,
    pub(crate) dropped_xattrs: u64,
    pub(crate) skipped_fifos: u64,
    buf: Vec<u8>,
}

impl Extractor {
    /// An extractor into `root` (an existing, empty, private directory).
    pub(crate) fn new(root: &Path, max_bytes: u64) -> Result<Extractor, ImageError> {
        let root = root
            .canonicalize()
            .map_err(|e| ImageError::io("cannot open", root, &e))?;
        Ok(Extractor {
            root,
            max_bytes,
            max_entries: MAX_ENTRIES,
            written: 0,
            streamed: 0,
            // What is not file content (headers, padding, skipped payloads) may add a
            // quarter, and at least 64 MiB.
            max_stream: max_bytes.saturating_add((max_bytes / 4).max(64 << 20)),
            entries: 0,
            as_root: moat_sys::process::effective_uid() == 0,
            dropped_xattrs: 0,
            skipped_fifos: 0,
            buf: vec![0; 128 << 10],
        })
    }

    #[cfg(test)]
    fn with_max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }

    /// The message for an image over its size limit.
    fn too_large(&self) -> ImageError {
        ImageError::TooLarge(format!(
            "the image expands past {} (a decompression bomb?): pass a larger --max-size if \
             it is real",
            human(self.max_bytes)
        ))
    }

    /// Applies the tar stream of layer `n` (1-based) and hands the stream back, read up to
    /// the end of the archive, for the caller to drain and verify.
    pub(crate) fn apply_tar<R: Read>(&mut self, n: usize, tar: R) -> Result<R, ImageError> {
        let mut layer = Layer {
            n,
            created: HashSet::new(),
            dirs: HashMap::new(),
        };
        let mut archive = tar::Archive::new(tar);
        {
            let entries = archive.entries().map_err(|e| self.stream_error(n, &e))?;
            // Raw: extension records come to us as entries, so that we bound them.
            let mut pending = Pending::default();
            for entry in entries.raw(true) {
                let mut entry = entry.map_err(|e| self.stream_error(n, &e))?;
                let kind = entry.header().entry_type();
                match kind {
                    EntryType::XHeader => {
                        pending.pax = Some(self.read_extension(n, &mut entry, "a PAX header")?);
                        continue;
                    }
                    EntryType::XGlobalHeader => {
                        // Global defaults for every entry; images do not use them. Ignored.
                        self.read_extension(n, &mut entry, "a PAX global header")?;
                        continue;
                    }
                    EntryType::GNULongName => {
                        pending.long_name = Some(trim_nul(self.read_extension(
                            n,
                            &mut entry,
                            "a long name",
                        )?));
                        continue;
                    }
                    EntryType::GNULongLink => {
                        pending.long_link = Some(trim_nul(self.read_extension(
                            n,
                            &mut entry,
                            "a long link",
                        )?));
                        continue;
                    }
                    _ => {}
                }
                let meta = self.meta(n, &entry, std::mem::take(&mut pending))?;
                self.apply_entry(&mut layer, meta, &mut entry)?;
            }
        }
        self.finish_layer(&layer)?;
        Ok(archive.into_inner())
    }

    /// The error for a failure reading the layer stream: a limit, or a corrupt stream.
    fn stream_error(&self, n: usize, e: &io::Error) -> ImageError {
        limit_error(e).unwrap_or_else(|| corrupt(n, e))
    }

    fn read_extension<R: Read>(
        &self,
        n: usize,
        entry: &mut tar::Entry<'_, R>,
        what: &str,
    ) -> Result<Vec<u8>, ImageError> {
        if entry.size() > MAX_EXTENSION_BYTES {
            return Err(ImageError::Refused(format!(
                "layer {n} has {what} of {} bytes: moat reads at most {}",
                entry.size(),
                human(MAX_EXTENSION_BYTES)
            )));
        }
        let mut v = Vec::new();
        entry
            .take(MAX_EXTENSION_BYTES)
            .read_to_end(&mut v)
            .map_err(|e| self.stream_error(n, &e))?;
        Ok(v)
    }

    fn meta<R: Read>(
        &self,
        n: usize,
        entry: &tar::Entry<'_, R>,
        pending: Pending,
    ) -> Result<Meta, ImageError> {
        let h = entry.header();
        let bad =
            |e: io::Error| ImageError::Refused(format!("layer {n} has a bad tar header: {e}"));
        let mut meta = Meta {
            path: pending
                .long_name
                .unwrap_or_else(|| h.path_bytes().into_owned()),
            link: pending
                .long_link
                .or_else(|| h.link_name_bytes().map(|l| l.into_owned())),
            kind: h.entry_type(),
            mode: h.mode().map_err(bad)? & 0o7777,
            uid: 0,
            gid: 0,
            mtime: h.mtime().ok().and_then(|s| from_unix(s, 0)),
            size: entry.size(),
            xattrs: Vec::new(),
            dropped_xattrs: 0,
        };
        let mut uid = h.uid().map_err(bad)?;
        let mut gid = h.gid().map_err(bad)?;
        if let Some(pax) = &pending.pax {
            for rec in tar::PaxExtensions::new(pax) {
                let rec = rec.map_err(|e| {
                    ImageError::Refused(format!("layer {n} has a malformed PAX header: {e}"))
                })?;
                let (key, value) = (rec.key_bytes(), rec.value_bytes());
                let number = || {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                };
                match key {
                    b"path" => meta.path = value.to_vec(),
                    b"linkpath" => meta.link = Some(value.to_vec()),
                    b"uid" => uid = number().ok_or_else(|| bad(io::Error::other("PAX uid")))?,
                    b"gid" => gid = number().ok_or_else(|| bad(io::Error::other("PAX gid")))?,
                    b"mtime" => meta.mtime = parse_pax_time(value),
                    // In raw mode the tar crate steps over the header's size; a PAX size
                    // that differs (files over 8 GiB) would desynchronise the walk.
                    b"size" if number() != Some(entry.size()) => {
                        return Err(ImageError::Unsupported(format!(
                            "layer {n}: `{}` has a PAX size record (a file over 8 GiB?): moat \
                             does not read those",
                            String::from_utf8_lossy(&meta.path)
                        )));
                    }
                    k if k.starts_with(b"GNU.sparse.") => {
                        return Err(sparse(n, &meta.path));
                    }
                    k if k.starts_with(b"SCHILY.xattr.") => {
                        match std::str::from_utf8(&k[b"SCHILY.xattr.".len()..]) {
                            Ok(name) if name.starts_with("user.") => {
                                meta.xattrs.push((name.to_string(), value.to_vec()))
                            }
                            // security.capability (file capabilities), trusted.*, system.*
                            // (ACLs), security.selinux: not from an image.
                            _ => meta.dropped_xattrs += 1,
                        }
                    }
                    k if k.starts_with(b"LIBARCHIVE.xattr.") => meta.dropped_xattrs += 1,
                    _ => {}
                }
            }
        }
        let id = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| {
                ImageError::Refused(format!(
                    "layer {n}: `{}` has {what} {v}, out of range",
                    String::from_utf8_lossy(&meta.path)
                ))
            })
        };
        meta.uid = id(uid, "uid")?;
        meta.gid = id(gid, "gid")?;
        Ok(meta)
    }

    fn apply_entry(
        &mut self,
        layer: &mut Layer,
        meta: Meta,
        data: &mut dyn Read,
    ) -> Result<(), ImageError> {
        let n = layer.n;
        let shown = String::from_utf8_lossy(&meta.path).into_owned();
        self.entries += 1;
        if self.entries > self.max_entries {
            return Err(ImageError::TooLarge(format!(
                "the image has more than {} files (a bomb?): moat stores at most that many",
                self.max_entries
            )));
        }
        self.dropped_xattrs += meta.dropped_xattrs;
        match meta.kind {
            EntryType::Char | EntryType::Block => {
                return Err(ImageError::Refused(format!(
                    "layer {n}: `{shown}` is a device node: moat does not create device nodes \
                     from images"
                )));
            }
            EntryType::Fifo => {
                self.skipped_fifos += 1;
                return Ok(());
            }
            EntryType::GNUSparse => return Err(sparse(n, &meta.path)),
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link => {}
            other => {
                return Err(ImageError::Unsupported(format!(
                    "layer {n}: `{shown}` has tar entry type `{}`, which moat does not know",
                    char::from(other.as_byte()).escape_default()
                )));
            }
        }
        let mut comps = normalise(&meta.path).ok_or_else(|| escapes(n, &shown))?;
        let Some(name) = comps.pop() else {
            // The entry for the root itself: only a directory makes sense.
            if meta.kind != EntryType::Directory {
                return Err(ImageError::Refused(format!(
                    "layer {n}: `{shown}` names the image root but is not a directory"
                )));
            }
            let root = self.root.clone();
            return self.update_dir(layer, &root, &meta);
        };
        if comps
            .iter()
            .any(|c| c.as_bytes().starts_with(WHITEOUT.as_bytes()))
        {
            return Err(ImageError::Refused(format!(
                "layer {n}: `{shown}` puts an entry inside a whiteout (`.wh.`) name"
            )));
        }
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT.as_bytes()) {
            return self.whiteout(layer, &comps, hidden, &shown);
        }

        let parent = self.parent(layer, &comps, &shown)?;
        let path = parent.join(&name);
        match meta.kind {
            EntryType::Directory => self.make_dir(layer, &path, &meta)?,
            EntryType::Regular | EntryType::Continuous => self.make_file(&path, &meta, data, n)?,
            EntryType::Symlink => self.make_symlink(&path, &meta, n, &shown)?,
            _ => {
                if !self.make_hardlink(&path, &meta, n, &shown)? {
                    return Ok(());
                }
            }
        }
        layer.created.insert(path);
        Ok(())
    }

    /// Resolves (creating as needed) the parent directory of an entry.
    fn parent(
        &mut self,
        layer: &mut Layer,
        comps: &[OsString],
        shown: &str,
    ) -> Result<PathBuf, ImageError> {
        let as_root = self.as_root;
        let created = &mut layer.created;
        let dir = walk(
            &self.root,
            comps.iter().cloned().collect(),
            Missing::Create,
            &mut |p| {
                // A missing parent: 0755, owned by the image's root.
                fs::DirBuilder::new().mode(0o755).create(p)?;
                fs::set_permissions(p, Permissions::from_mode(0o755))?;
                if as_root {
                    std::os::unix::fs::lchown(p, Some(0), Some(0))?;
                }
                created.insert(p.to_path_buf());
                Ok(())
            },
        )
        .map_err(|e| e.into_error(&format!("layer {}: `{shown}`", layer.n)))?;
        // Missing::Create always ends somewhere.
        Ok(dir.unwrap_or_else(|| self.root.clone()))
    }

    /// Removes whatever is at `path` (not following it; a directory with its contents).
    fn remove_existing(&self, path: &Path) -> Result<(), ImageError> {
        match fs::symlink_metadata(path) {
            Ok(m) => remove(path, &m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io("cannot inspect", path, &e)),
        }
    }

    fn make_dir(&mut self, layer: &mut Layer, path: &Path, meta: &Meta) -> Result<(), ImageError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                remove(path, &m)?;
                create_dir(path)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_dir(path)?,
            Err(e) => return Err(ImageError::io("cannot inspect", path, &e)),
        }
        self.update_dir(layer, path, meta)
    }

    /// Owner and xattrs now, mode and mtime when the layer is done.
    fn update_dir(
        &mut self,
        layer: &mut Layer,
        path: &Path,
        meta: &Meta,
    ) -> Result<(), ImageError> {
        if self.as_root {
            std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))
                .map_err(|e| ImageError::io("cannot chown", path, &e))?;
        }
        self.set_xattrs(path, meta);
        let m =
            fs::symlink_metadata(path).map_err(|e| ImageError::io("cannot inspect", path, &e))?;
        layer.dirs.insert(
            path.to_path_buf(),
            DirFix {
                mode: meta.mode,
                mtime: meta.mtime,
                dev: m.dev(),
                ino: m.ino(),
            },
        );
        Ok(())
    }

    fn make_file(
        &mut self,
        path: &Path,
        meta: &Meta,
        data: &mut dyn Read,
        n: usize,
    ) -> Result<(), ImageError> {
        // A file declared larger than what is left fails before anything is written.
        if meta.size > self.max_bytes.saturating_sub(self.written) {
            return Err(self.too_large());
        }
        self.remove_existing(path)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| ImageError::io("cannot create", path, &e))?;
        let mut copied = 0u64;
        loop {
            let got = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.stream_error(n, &e)),
            };
            // Checked per chunk, so one huge file stops mid-write.
            if self.written + got as u64 > self.max_bytes {
                return Err(self.too_large());
            }
            file.write_all(&self.buf[..got])
                .map_err(|e| ImageError::io("cannot write", path, &e))?;
            self.written += got as u64;
            copied += got as u64;
        }
        if copied != meta.size {
            return Err(ImageError::Refused(format!(
                "layer {n} ends inside `{}`: the download broke off or the blob is corrupt",
                String::from_utf8_lossy(&meta.path)
            )));
        }
        // chown before chmod: chown clears the setuid and setgid bits.
        if self.as_root {
            std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid))
                .map_err(|e| ImageError::io("cannot chown", path, &e))?;
        }
        file.set_permissions(Permissions::from_mode(meta.mode))
            .map_err(|e| ImageError::io("cannot chmod", path, &e))?;
        self.set_xattrs(path, meta);
        if let Some(t) = meta.mtime {
            file.set_modified(t)
                .map_err(|e| ImageError::io("cannot set the mtime of", path, &e))?;
        }
        Ok(())
    }

    fn make_symlink(
        &mut self,
        path: &Path,
        meta: &Meta,
        n: usize,
        shown: &str,
    ) -> Result<(), ImageError> {
        let target = match &meta.link {
            Some(t) if !t.is_empty() => OsStr::from_bytes(t),
            _ => {
                return Err(ImageError::Refused(format!(
                    "layer {n}: symlink `{shown}` has no target"
                )))
            }
        };
        self.remove_existing(path)?;
        // The target is stored verbatim: it is only ever resolved inside the sandbox (or by
        // resolve_in_root), never followed here.
        std::os::unix::fs::symlink(target, path)
            .map_err(|e| ImageError::io("cannot create the symlink", path, &e))?;
        if self.as_root {
            std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))
                .map_err(|e| ImageError::io("cannot chown", path, &e))?;
        }
        // user.* xattrs are not allowed on symlinks: set_xattrs counts them as dropped.
        self.set_xattrs(path, meta);
        Ok(())
    }

    /// Returns whether a link was made (a link to itself is a no-op).
    fn make_hardlink(
        &mut self,
        path: &Path,
        meta: &Meta,
        n: usize,
        shown: &str,
    ) -> Result<bool, ImageError> {
        let raw = meta.link.as_deref().unwrap_or_default();
        let target_shown = String::from_utf8_lossy(raw).into_owned();
        let refuse = |why: &str| {
            ImageError::Refused(format!(
                "layer {n}: hard link `{shown}` -> `{target_shown}` {why}"
            ))
        };
        let mut comps = normalise(raw).ok_or_else(|| refuse("escapes the image root"))?;
        let name = comps
            .pop()
            .ok_or_else(|| refuse("points at the image root"))?;
        // The target's directories resolve inside the root; its last component is not
        // followed (so a symlink target gets a hard link to the symlink itself).
        let dir = walk(&self.root, comps.into(), Missing::Stop, &mut |_| Ok(()))
            .map_err(|e| e.into_error(&format!("layer {n}: hard link `{shown}`")))?
            .ok_or_else(|| refuse("points at nothing in the image"))?;
        let target = dir.join(name);
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => return Err(refuse("points at a directory")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(refuse("points at nothing in the image"))
            }
            Err(e) => return Err(ImageError::io("cannot inspect", &target, &e)),
        }
        if target == path {
            return Ok(false);
        }
        self.remove_existing(path)?;
        fs::hard_link(&target, path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => refuse("points at what the link itself replaced"),
            _ => ImageError::io("cannot create the hard link", path, &e),
        })?;
        Ok(true)
    }

    /// `dir/.wh.name` deletes `dir/name`; `dir/.wh..wh..opq` empties `dir` of what lower
    /// layers put there.
    fn whiteout(
        &mut self,
        layer: &mut Layer,
        dir: &[OsString],
        hidden: &[u8],
        shown: &str,
    ) -> Result<(), ImageError> {
        let n = layer.n;
        let opaque = &OPAQUE.as_bytes()[WHITEOUT.len()..];
        if hidden.starts_with(WHITEOUT.as_bytes()) && hidden != opaque {
            // Other `.wh..wh.` names are AUFS bookkeeping (`.wh..wh.plnk`): not content.
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(escapes(n, shown));
        }
        let Some(dir) = walk(
            &self.root,
            dir.iter().cloned().collect(),
            Missing::Stop,
            &mut |_| Ok(()),
        )
        .map_err(|e| e.into_error(&format!("layer {n}: whiteout `{shown}`")))?
        else {
            return Ok(()); // Its directory is not there: nothing to hide.
        };
        if hidden != opaque {
            return self.remove_existing(&dir.join(OsStr::from_bytes(hidden)));
        }
        let mut todo = vec![dir];
        while let Some(d) = todo.pop() {
            let rd = fs::read_dir(&d).map_err(|e| ImageError::io("cannot list", &d, &e))?;
            for entry in rd {
                let entry = entry.map_err(|e| ImageError::io("cannot list", &d, &e))?;
                let p = entry.path();
                let ty = entry
                    .file_type()
                    .map_err(|e| ImageError::io("cannot inspect", &p, &e))?;
                if layer.created.contains(&p) {
                    if ty.is_dir() {
                        todo.push(p);
                    }
                } else if ty.is_dir() {
                    fs::remove_dir_all(&p).map_err(|e| ImageError::io("cannot remove", &p, &e))?;
                } else {
                    fs::remove_file(&p).map_err(|e| ImageError::io("cannot remove", &p, &e))?;
                }
            }
        }
        Ok(())
    }

    fn set_xattrs(&mut self, path: &Path, meta: &Meta) {
        for (name, value) in &meta.xattrs {
            if moat_sys::fs::lsetxattr(path, name, value).is_err() {
                // Not supported by the filesystem, or on a symlink.
                self.dropped_xattrs += 1;
            }
        }
    }

    fn finish_layer(&mut self, layer: &Layer) -> Result<(), ImageError> {
        for (path, fix) in &layer.dirs {
            // If the directory was replaced or moved behind a symlink later in the layer,
            // there is nothing of ours to fix.
            let Some(dir) = self.reopen_dir(path) else {
                continue;
            };
            match dir.metadata() {
                Ok(m) if (m.dev(), m.ino()) == (fix.dev, fix.ino) => {}
                _ => continue,
            }
            dir.set_permissions(Permissions::from_mode(fix.mode))
                .map_err(|e| ImageError::io("cannot chmod", path, &e))?;
            if let Some(t) = fix.mtime {
                dir.set_modified(t)
                    .map_err(|e| ImageError::io("cannot set the mtime of", path, &e))?;
            }
        }
        Ok(())
    }

    /// Opens the directory at `path` (under the root) if every component of it is a real
    /// directory: no symlink is followed anywhere on the way.
    fn reopen_dir(&self, path: &Path) -> Option<fs::File> {
        let rel = path.strip_prefix(&self.root).ok()?;
        let mut cur = self.root.clone();
        for c in rel.components() {
            cur.push(c);
            if !fs::symlink_metadata(&cur).ok()?.is_dir() {
                return None;
            }
        }
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .ok()
    }
}

/// An entry's name as components, `.` and empty ones dropped; `None` if any is `..`.
fn normalise(path: &[u8]) -> Option<Vec<OsString>> {
    let mut out = Vec::new();
    for c in split(path) {
        if c == ".." {
            return None;
        }
        if c != "." {
            out.push(c);
        }
    }
    Some(out)
}

fn escapes(n: usize, shown: &str) -> ImageError {
    ImageError::Refused(format!("layer {n}: entry `{shown}` escapes the image root"))
}

fn sparse(n: usize, path: &[u8]) -> ImageError {
    ImageError::Unsupported(format!(
        "layer {n}: `{}` is a sparse file, which moat does not read: rebuild the image \
         without sparse files",
        String::from_utf8_lossy(path)
    ))
}

fn create_dir(path: &Path) -> Result<(), ImageError> {
    // 0700 until the layer is done and the entry's own mode is applied.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|e| ImageError::io("cannot create the directory", path, &e))
}

/// Removes `path`, whose `lstat` is `m`, without following it. `remove_dir_all` does not
/// follow symlinks inside the tree either (std, since CVE-2022-21658).
fn remove(path: &Path, m: &fs::Metadata) -> Result<(), ImageError> {
    let r = if m.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    r.map_err(|e| ImageError::io("cannot remove", path, &e))
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn from_unix(secs: u64, nanos: u32) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// A PAX time, `seconds[.fraction]`; negative times are dropped.
fn parse_pax_time(v: &[u8]) -> Option<SystemTime> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: u64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nanos = if digits.is_empty() {
        0
    } else {
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    from_unix(secs, nanos)
}

/// `1 MiB`, `8 GiB`, or bytes.
pub(crate) fn human(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{} {unit}", n >> shift);
        }
    }
    if n >= 1 << 20 {
        return format!("{:.1} MiB", n as f64 / f64::from(1 << 20));
    }
    format!("{n} bytes")
}

/// One layer blob to apply.
pub(crate) struct LayerInput<'a> {
    /// 0-based.
    pub index: usize,
    pub count: usize,
    pub reader: Box<dyn Read + 'a>,
    /// The blob's digest and size when known (a registry blob, an OCI layout blob);
    /// `None` for a `docker save` layer, which only has its diff_id.
    pub blob: Option<(Digest, u64)>,
    pub media_type: String,
    pub diff_id: Digest,
}

/// Streams one layer blob into the extractor: blob bytes (bounded by the descriptor's size,
/// hashed) -> gunzip (if gzip, by its magic bytes) -> tar bytes (hashed for the diff_id,
/// bounded) -> extraction. Both digests are checked at the end of the stream; a mismatch
/// fails the whole build, whose directory the caller then deletes, so unverified content
/// never becomes a template.
pub(crate) fn apply_blob(
    ex: &mut Extractor,
    input: LayerInput<'_>,
    progress: &mut dyn Progress,
) -> Result<(), ImageError> {
    let LayerInput {
        index,
        count,
        reader,
        blob,
        media_type,
        diff_id,
    } = input;
    let n = index + 1;
    let what = format!("layer {n} of {count}");
    check_layer_media_type(&media_type, &what)?;
    let (size_limit, shown_digest, size) = match &blob {
        Some((d, s)) => (*s, d.to_string(), *s),
        None => (u64::MAX, diff_id.to_string(), 0),
    };
    if size_limit != u64::MAX && size_limit > ex.max_stream.saturating_sub(ex.streamed) {
        return Err(ex.too_large());
    }
    progress.event(ProgressEvent::LayerStart {
        index,
        digest: shown_digest,
        size,
    });
    progress.event(ProgressEvent::Extracting { index });
    let too_long: fn(u64) -> io::Error = |lim| {
        io::Error::other(SizeMismatch(format!(
            "a layer blob is longer than the {lim} bytes its descriptor says: the registry \
             sent something else: pull again"
        )))
    };
    let stream_over: fn(u64) -> io::Error = |lim| {
        io::Error::other(Overflow(format!(
            "the image's layers decompress past {} (a decompression bomb?): pass a larger \
             --max-size if it is real",
            human(lim)
        )))
    };
    let remaining = ex.max_stream.saturating_sub(ex.streamed);
    let blob_digest;
    let blob_len;
    let tar_digest;
    {
        let tick = |done| progress.event(ProgressEvent::LayerBytes { index, done });
        let compressed = HashReader::new(reader, size_limit, too_long).with_tick(Box::new(tick));
        let mut buffered = BufReader::with_capacity(256 << 10, compressed);
        let magic = buffered
            .fill_buf()
            .map_err(|e| ex.stream_error(n, &e))?
            .to_vec();
        let finish = |e: io::Error| limit_error(&e).unwrap_or_else(|| corrupt(n, &e));
        let mut compressed = match sniff(&magic, &what)? {
            Compression::Gzip => {
                let gz = flate2::bufread::MultiGzDecoder::new(buffered);
                let tar = HashReader::new(gz, remaining, stream_over);
                let mut tar = ex.apply_tar(n, tar)?;
                let (d, len) = tar.finish().map_err(finish)?;
                tar_digest = d;
                ex.streamed += len;
                tar.into_inner().into_inner().into_inner()
            }
            Compression::None => {
                let tar = HashReader::new(buffered, remaining, stream_over);
                let mut tar = ex.apply_tar(n, tar)?;
                let (d, len) = tar.finish().map_err(finish)?;
                tar_digest = d;
                ex.streamed += len;
                tar.into_inner().into_inner()
            }
        };
        let (d, len) = compressed.finish().map_err(finish)?;
        blob_digest = d;
        blob_len = len;
    }
    if let Some((want, want_len)) = &blob {
        if blob_len != *want_len {
            return Err(ImageError::Digest(format!(
                "{what} has {blob_len} bytes, its descriptor says {want_len}: the download \
                 broke off or the blob is not the one named: pull again"
            )));
        }
        if blob_digest != *want {
            return Err(ImageError::Digest(format!(
                "{what} does not match its digest: got {blob_digest}, want {want}: the \
                 registry (or a proxy) sent other content: pull again"
            )));
        }
    }
    if tar_digest != diff_id {
        return Err(ImageError::Digest(format!(
            "{what} does not match the diff_id in the image config: got {tar_digest}, want \
             {diff_id}: the image is corrupt or was tampered with"
        )));
    }
    progress.event(ProgressEvent::LayerDone { index });
    Ok(())
}

/// A layer stream that cannot be read to its end: the content is not what it should be.
fn corrupt(n: usize, e: &io::Error) -> ImageError {
    ImageError::Digest(format!(
        "layer {n} cannot be read to its end ({e}): the download broke off or the blob is \
         corrupt: pull it again"
    ))
}

#[cfg(test)]
mod tests;
