//! moat's container images: pull an OCI image from a registry, or import a `docker save`
//! archive or an OCI image layout, and store it as a **template**: a flattened root
//! filesystem directory under moat's state directory, plus the image's config.
//!
//! ```text
//! <state_dir>/templates/            mode 0700: nobody but root walks into an image's tree
//!   rootfs/<chain-id hex>/          one flattened rootfs per layer chain, shared by templates
//!   index/<escaped name>.json       one Template per name (written to a temporary file + rename)
//!   tmp/<pid>-<random>/             a rootfs being built; renamed into rootfs/ when complete
//!   .lock                           flock held while committing or removing
//! ```
//!
//! The security-critical part is applying layers (module `extract`): moat runs as root and
//! the layers are hostile input. Every path in a layer is resolved *inside* the rootfs being
//! built (never on the host, see [`resolve_in_root`]), nothing is ever followed on the final
//! component, device nodes are refused, and the bytes and entries written are bounded while
//! they are written. Code that later reads a template's files from the host should do it
//! through [`open_in_root`] for the same reason.
//!
//! Nothing here is async: the daemon calls it from a blocking thread.

#![forbid(unsafe_code)]

mod archive;
mod digest;
mod extract;
mod manifest;
mod reference;
mod registry;
mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use extract::{open_in_root, resolve_in_root};
pub use reference::{default_name, Reference};
pub use store::Store;

/// The default limit on an image's extracted size: 8 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 30;

/// The limit on the number of entries (files, directories, links, whiteouts) across all the
/// layers of one image.
pub const MAX_ENTRIES: u64 = 2_000_000;

/// How to pull or import an image.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// The template name to store the image under. Default: see [`default_name`] for a pull;
    /// for an import, the archive's own tag (`RepoTags[0]`, or the OCI
    /// `org.opencontainers.image.ref.name` annotation), else the file's stem.
    pub name: Option<String>,
    /// Use plain http for every registry. `localhost`, `127.0.0.1` and `[::1]` always use http.
    pub insecure: bool,
    /// Registry credentials. Without them, `~/.docker/config.json` (`auths.<registry>.auth`,
    /// base64 `user:password`) is used when it has an entry for the registry, else anonymous.
    pub username: Option<String>,
    /// The password (or token) that goes with `username`.
    pub password: Option<String>,
    /// The limit on the extracted size in bytes. Default [`DEFAULT_MAX_BYTES`] (8 GiB).
    pub max_bytes: Option<u64>,
    /// `os/arch[/variant]`, e.g. `linux/arm64`. Default: the host's (`x86_64` -> `amd64`,
    /// `aarch64` -> `arm64`).
    pub platform: Option<String>,
}

/// Receives progress events from a pull or an import.
pub trait Progress {
    /// Called for each event, in order.
    fn event(&mut self, ev: ProgressEvent);
}

/// One step of a pull or an import. Layer `index`es count from 0.
///
/// Layers are streamed: a layer is extracted while it downloads, so a layer's events come as
/// `LayerStart`, `Extracting`, any number of `LayerBytes`, then `LayerDone`. When the image's
/// layers are already stored (another template uses them), only `Resolved` and `Done` come.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgressEvent {
    /// The reference resolved to the manifest `digest`, with `layers` layers.
    Resolved {
        reference: String,
        digest: String,
        layers: usize,
    },
    /// A layer blob of `size` compressed bytes starts downloading (or reading, for an import).
    LayerStart {
        index: usize,
        digest: String,
        size: u64,
    },
    /// `done` compressed bytes of the layer were read so far.
    LayerBytes { index: usize, done: u64 },
    /// The layer was read, verified (digest and diff_id) and extracted.
    LayerDone { index: usize },
    /// The layer is being applied to the root filesystem.
    Extracting { index: usize },
    /// The template is stored.
    Done,
}

/// A [`Progress`] that ignores every event.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&mut self, _ev: ProgressEvent) {}
}

/// A stored image: a name, where it came from, and its flattened root filesystem.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Template {
    /// The template's name, e.g. `busybox:latest`.
    pub name: String,
    /// The reference it was pulled from (normalised, e.g. `docker.io/library/busybox:latest`)
    /// or the absolute path of the file it was imported from.
    pub source: String,
    /// `sha256:...`: the digest of the manifest the reference resolved to (the image index's
    /// for a multi-platform image, as `docker pull` prints it). For a `docker save` archive,
    /// which has no manifest, the config's digest (the docker image id).
    pub digest: String,
    /// When it was stored, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The size of the extracted files in bytes (each hard-linked file counted once).
    pub size_bytes: u64,
    /// The absolute path of the flattened root directory. Shared by every template with the
    /// same layers: never write into it.
    pub rootfs: PathBuf,
    /// The image's config.
    pub config: ImageConfig,
    /// Extended attributes in the layers that were not applied: anything but `user.*`
    /// (`security.capability` file capabilities above all), and `user.*` ones the filesystem
    /// refused.
    pub dropped_xattrs: u64,
}

/// What an image's config says about how to run it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`; `None` when the image sets none (root).
    pub user: Option<String>,
    /// The working directory; `None` when the image sets none (`/`).
    pub workdir: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// `80/tcp` style, sorted.
    pub exposed_ports: Vec<String>,
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `linux`.
    pub os: String,
}

/// Why a pull, an import or a store operation failed. Each message says what went wrong and
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No such template, image, tag or file.
    #[error("{0}")]
    NotFound(String),
    /// The image reference or template name is malformed.
    #[error("{0}")]
    BadReference(String),
    /// The registry is unreachable, answered an unexpected status, or sent garbage.
    #[error("{0}")]
    Registry(String),
    /// A manifest, config or layer did not match its digest.
    #[error("{0}")]
    Digest(String),
    /// A layer holds content moat will not create (an escape, a device node, ...).
    #[error("{0}")]
    Refused(String),
    /// The image is larger than the limit.
    #[error("{0}")]
    TooLarge(String),
    /// A format or feature moat does not handle (zstd layers, sparse files, ...).
    #[error("{0}")]
    Unsupported(String),
    /// A local filesystem error.
    #[error("{0}")]
    Io(String),
}

impl ImageError {
    /// An [`ImageError::Io`] saying what was being done to which path, with a hint for the
    /// errors a user can fix (a full disk, permissions).
    pub(crate) fn io(what: &str, path: &std::path::Path, e: &std::io::Error) -> ImageError {
        let hint = match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ": the disk is full: free some space",
            Some(libc::EACCES) | Some(libc::EPERM) => ": permission denied: moat needs root here",
            Some(libc::EROFS) => ": the filesystem is read-only",
            _ => "",
        };
        ImageError::Io(format!("{what} {}: {e}{hint}", path.display()))
    }
}
