//! Reading images from disk: a `docker save` archive (a tar with `manifest.json`), or an OCI
//! image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`) as a directory or a tar.
//!
//! A tar archive is indexed once (member name -> offset and size) and its members are then
//! read in place, in any order. A gzip-compressed archive is first decompressed into the
//! store's tmp directory (bounded), since gzip cannot seek.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tar::EntryType;

use crate::digest::{Digest, HashReader, Overflow, SizeMismatch};
use crate::extract::{human, LayerInput};
use crate::manifest::{
    parse_config, parse_manifest, select_platform, Config, Descriptor, Parsed, Platform,
    MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, OCI_INDEX,
};
use crate::reference::Reference;
use crate::ImageError;

/// The most members an archive may have.
const MAX_MEMBERS: usize = 1_000_000;
/// The most a PAX or GNU long-name record of an archive member may hold.
const MAX_EXTENSION_BYTES: u64 = 1 << 20;

/// An image read from disk, ready to be built.
pub(crate) struct Imported {
    /// The name the archive gives the image, if any (already a valid template name).
    pub name: Option<String>,
    /// The manifest digest (OCI) or the config digest (docker save).
    pub digest: Digest,
    pub config: Config,
    layers: Vec<Layer>,
    container: Container,
}

struct Layer {
    location: String,
    blob: Option<(Digest, u64)>,
    media_type: String,
}

/// Where the members are.
enum Container {
    Dir(PathBuf),
    Tar {
        file: PathBuf,
        members: HashMap<String, Member>,
    },
}

#[derive(Clone)]
enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink or hard link, its target as an archive path.
    Link(String),
}

impl Imported {
    /// The number of layers.
    pub(crate) fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Opens layer `index` for [`crate::extract::apply_blob`].
    pub(crate) fn layer(&self, index: usize) -> Result<LayerInput<'static>, ImageError> {
        let l = &self.layers[index];
        let (reader, _) = self.container.open(&l.location)?;
        Ok(LayerInput {
            index,
            count: self.layers.len(),
            reader,
            blob: l.blob.clone(),
            media_type: l.media_type.clone(),
            diff_id: self.config.diff_ids[index].clone(),
        })
    }
}

/// Reads the image at `path`. `scratch` is where a gzip-compressed archive is decompressed
/// to (the caller removes it afterwards); `max_bytes` bounds that.
pub(crate) fn open(
    path: &Path,
    scratch: &Path,
    platform: &Platform,
    max_bytes: u64,
) -> Result<Imported, ImageError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ImageError::NotFound(format!(
            "there is no `{}` to import: give the path of a `docker save` archive or of an \
             OCI image layout",
            path.display()
        )),
        _ => ImageError::io("cannot open", path, &e),
    })?;
    let container = if meta.is_dir() {
        Container::Dir(path.to_path_buf())
    } else {
        let mut f = File::open(path).map_err(|e| ImageError::io("cannot open", path, &e))?;
        let mut magic = [0u8; 2];
        let got = f
            .read(&mut magic)
            .map_err(|e| ImageError::io("cannot read", path, &e))?;
        let file = if got == 2 && magic == [0x1f, 0x8b] {
            gunzip_to(path, scratch, max_bytes)?;
            scratch.to_path_buf()
        } else {
            path.to_path_buf()
        };
        let members = index_tar(&file, path)?;
        Container::Tar { file, members }
    };
    let shown = path.display().to_string();
    if container.exists("oci-layout") && container.exists("index.json") {
        open_oci(container, &shown, platform)
    } else if container.exists("manifest.json") {
        open_docker(container, &shown)
    } else {
        Err(ImageError::Unsupported(format!(
            "`{shown}` is neither a `docker save` archive (it has no manifest.json) nor an OCI \
             image layout (no oci-layout and index.json)"
        )))
    }
}

fn open_oci(
    container: Container,
    shown: &str,
    platform: &Platform,
) -> Result<Imported, ImageError> {
    let index = container.read_small("index.json", MAX_MANIFEST_BYTES, shown)?;
    let what = format!("the index.json of `{shown}`");
    let entries = match parse_manifest(&index, Some(OCI_INDEX), &what)? {
        Parsed::Index(e) => e,
        Parsed::Manifest(_) => {
            return Err(ImageError::Unsupported(format!(
                "{what} is a manifest, not an index"
            )))
        }
    };
    // One image: that one. Several: the first for the platform (an entry without a platform
    // counts as any).
    let top: &Descriptor = match entries.as_slice() {
        [] => {
            return Err(ImageError::NotFound(format!("{what} lists no image")));
        }
        [one] => one,
        many => match many.iter().find(|d| d.platform.is_none()) {
            Some(d) => d,
            None => select_platform(many, platform, &what)?,
        },
    };
    let name = top
        .annotation("io.containerd.image.name")
        .and_then(|n| Reference::parse(n).ok())
        .map(|r| r.default_name())
        .or_else(|| {
            let r = top.annotation("org.opencontainers.image.ref.name")?;
            if r.contains(['/', ':', '@']) {
                Reference::parse(r).ok().map(|r| r.default_name())
            } else {
                // A bare tag, as skopeo writes it: under the layout's own name.
                Some(format!("{}:{r}", stem(Path::new(shown))))
            }
        });
    let top_digest = top.digest()?;
    let mut desc = top.clone();
    let mut depth = 0;
    let manifest = loop {
        let d = desc.digest()?;
        let body = container.read_blob(&d, desc.size, MAX_MANIFEST_BYTES, shown)?;
        match parse_manifest(
            &body,
            Some(&desc.media_type),
            &format!("manifest {d} of `{shown}`"),
        )? {
            Parsed::Manifest(m) => break m,
            Parsed::Index(entries) => {
                depth += 1;
                if depth > 2 {
                    return Err(ImageError::Unsupported(format!(
                        "`{shown}` nests image indexes too deep"
                    )));
                }
                desc = select_platform(&entries, platform, &format!("`{shown}`"))?.clone();
            }
        }
    };
    let cd = manifest.config.digest()?;
    let body = container.read_blob(&cd, manifest.config.size, MAX_CONFIG_BYTES, shown)?;
    let config = parse_config(&body, &format!("the config of `{shown}`"))?;
    crate::registry::check_layers(&manifest, &config, &format!("`{shown}`"))?;
    let layers = manifest
        .layers
        .iter()
        .map(|l| {
            let d = l.digest()?;
            Ok(Layer {
                location: format!("blobs/sha256/{}", d.hex()),
                blob: Some((d, l.size)),
                media_type: l.media_type.clone(),
            })
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    Ok(Imported {
        name: name.filter(|n| crate::reference::validate_name(n).is_ok()),
        digest: top_digest,
        config,
        layers,
        container,
    })
}

fn open_docker(container: Container, shown: &str) -> Result<Imported, ImageError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        repo_tags: Option<Vec<String>>,
        layers: Vec<String>,
    }
    let body = container.read_small("manifest.json", MAX_MANIFEST_BYTES, shown)?;
    let entries: Vec<Entry> = serde_json::from_slice(&body).map_err(|e| {
        ImageError::Unsupported(format!(
            "the manifest.json of `{shown}` is not a `docker save` manifest ({e})"
        ))
    })?;
    let Some(entry) = entries.into_iter().next() else {
        return Err(ImageError::NotFound(format!(
            "the manifest.json of `{shown}` lists no image"
        )));
    };
    let config_bytes = container.read_small(&entry.config, MAX_CONFIG_BYTES, shown)?;
    let digest = Digest::of(&config_bytes);
    // Docker names the config by its digest (`<hex>.json`, or `blobs/sha256/<hex>`).
    if let Some(named) = digest_in_name(&entry.config) {
        if named != digest {
            return Err(ImageError::Digest(format!(
                "the config `{}` in `{shown}` does not match its name (its sha256 is \
                 {digest}): the archive is corrupt",
                entry.config
            )));
        }
    }
    let config = parse_config(&config_bytes, &format!("the config of `{shown}`"))?;
    if entry.layers.len() != config.diff_ids.len() {
        return Err(ImageError::Unsupported(format!(
            "`{shown}` has {} layers but its config lists {} diff_ids: the archive is malformed",
            entry.layers.len(),
            config.diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for l in &entry.layers {
        // A layer stored as a blob is verified against its name too; otherwise the diff_id
        // check (the tar's sha256) is what verifies it.
        let blob = match (
            digest_in_name(l).filter(|_| l.contains("blobs/")),
            container.size(l),
        ) {
            (Some(d), Some(size)) => Some((d, size)),
            _ => None,
        };
        layers.push(Layer {
            location: l.clone(),
            blob,
            media_type: String::new(),
        });
    }
    let name = entry
        .repo_tags
        .and_then(|t| t.into_iter().next())
        .and_then(|t| Reference::parse(&t).ok())
        .map(|r| r.default_name());
    Ok(Imported {
        name,
        digest,
        config,
        layers,
        container,
    })
}

/// `<64 hex>` in `x/<hex>.json`, `<hex>.tar`, `blobs/sha256/<hex>`.
fn digest_in_name(name: &str) -> Option<Digest> {
    let last = name.rsplit('/').next()?;
    let hex = last.split('.').next()?;
    Digest::parse(&format!("sha256:{hex}")).ok()
}

/// The file or directory's name without an extension, as a template name can hold it.
pub(crate) fn stem(path: &Path) -> String {
    let s = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let s = s.strip_suffix(".tar").unwrap_or(&s);
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cleaned = cleaned
        .trim_start_matches(['.', '-', '_'])
        .replace("..", ".");
    if cleaned.is_empty() {
        "image".to_string()
    } else {
        cleaned.chars().take(100).collect()
    }
}

impl Container {
    fn exists(&self, name: &str) -> bool {
        match self {
            Container::Dir(d) => d.join(name).is_file(),
            Container::Tar { members, .. } => resolve(members, name).is_some(),
        }
    }

    fn size(&self, name: &str) -> Option<u64> {
        match self {
            Container::Dir(d) => std::fs::metadata(d.join(clean(name)?))
                .ok()
                .map(|m| m.len()),
            Container::Tar { members, .. } => resolve(members, name).map(|(_, size)| size),
        }
    }

    /// A member's content as a stream, and its size.
    fn open(&self, name: &str) -> Result<(Box<dyn Read>, u64), ImageError> {
        let missing = || {
            ImageError::NotFound(format!(
                "`{name}` is missing from the archive: it is incomplete or not an image"
            ))
        };
        match self {
            Container::Dir(d) => {
                let p = d.join(clean(name).ok_or_else(missing)?);
                let f = File::open(&p).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => missing(),
                    _ => ImageError::io("cannot open", &p, &e),
                })?;
                let m = f
                    .metadata()
                    .map_err(|e| ImageError::io("cannot open", &p, &e))?;
                if !m.is_file() {
                    return Err(ImageError::Unsupported(format!(
                        "`{}` is not a regular file",
                        p.display()
                    )));
                }
                Ok((Box::new(f), m.len()))
            }
            Container::Tar { file, members } => {
                let (offset, size) = resolve(members, name).ok_or_else(missing)?;
                let mut f =
                    File::open(file).map_err(|e| ImageError::io("cannot open", file, &e))?;
                f.seek(SeekFrom::Start(offset))
                    .map_err(|e| ImageError::io("cannot read", file, &e))?;
                Ok((Box::new(f.take(size)), size))
            }
        }
    }

    /// A small member (a manifest, a config), read whole, at most `limit` bytes.
    fn read_small(&self, name: &str, limit: u64, shown: &str) -> Result<Vec<u8>, ImageError> {
        let (mut r, size) = self.open(name)?;
        if size > limit {
            return Err(ImageError::Unsupported(format!(
                "`{name}` in `{shown}` is {size} bytes: moat reads at most {}",
                human(limit)
            )));
        }
        let mut v = Vec::new();
        r.by_ref()
            .take(limit)
            .read_to_end(&mut v)
            .map_err(|e| ImageError::Io(format!("cannot read `{name}` in `{shown}`: {e}")))?;
        Ok(v)
    }

    /// A blob by digest, bounded by its descriptor's size and `limit`, verified.
    fn read_blob(
        &self,
        d: &Digest,
        size: u64,
        limit: u64,
        shown: &str,
    ) -> Result<Vec<u8>, ImageError> {
        if size > limit {
            return Err(ImageError::Unsupported(format!(
                "blob {d} in `{shown}` is {size} bytes: moat reads at most {}",
                human(limit)
            )));
        }
        let name = format!("blobs/sha256/{}", d.hex());
        let (r, _) = self.open(&name)?;
        let mut r = HashReader::new(r, size, |l| {
            io::Error::other(SizeMismatch(format!("a blob is longer than its {l} bytes")))
        });
        let mut v = Vec::new();
        r.read_to_end(&mut v).map_err(|e| {
            crate::digest::limit_error(&e)
                .unwrap_or_else(|| ImageError::Io(format!("cannot read {name} in `{shown}`: {e}")))
        })?;
        let got = Digest::of(&v);
        if got != *d || v.len() as u64 != size {
            return Err(ImageError::Digest(format!(
                "blob {d} in `{shown}` does not match its digest (got {got}, {} bytes; want \
                 {size} bytes): the layout is corrupt",
                v.len()
            )));
        }
        Ok(v)
    }
}

/// An archive path, normalised: no leading `/` or `./`, no `.` parts; `None` with `..`.
fn clean(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Follows links (at most 8) to a regular member: its offset and size.
fn resolve(members: &HashMap<String, Member>, name: &str) -> Option<(u64, u64)> {
    let mut name = clean(name)?;
    for _ in 0..8 {
        match members.get(&name)? {
            Member::File { offset, size } => return Some((*offset, *size)),
            Member::Link(target) => name = target.clone(),
        }
    }
    None
}

/// Indexes a tar's members: regular files by offset and size, links by target.
fn index_tar(file: &Path, shown: &Path) -> Result<HashMap<String, Member>, ImageError> {
    let bad = |e: io::Error| {
        ImageError::Unsupported(format!(
            "`{}` is not a tar archive ({e}): give a `docker save` archive or an OCI layout",
            shown.display()
        ))
    };
    let f = File::open(file).map_err(|e| ImageError::io("cannot open", file, &e))?;
    let mut archive = tar::Archive::new(f);
    let mut members = HashMap::new();
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Option<Vec<u8>> = None;
    // Raw, like the layer extraction: extension records are read here, bounded.
    for entry in archive.entries_with_seek().map_err(bad)?.raw(true) {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        let ext = match kind {
            EntryType::XHeader
            | EntryType::XGlobalHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => {
                if entry.size() > MAX_EXTENSION_BYTES {
                    return Err(ImageError::Unsupported(format!(
                        "`{}` has a tar extension record of {} bytes",
                        shown.display(),
                        entry.size()
                    )));
                }
                let mut v = Vec::new();
                entry.read_to_end(&mut v).map_err(bad)?;
                while v.last() == Some(&0) && kind != EntryType::XHeader {
                    v.pop();
                }
                Some(v)
            }
            _ => None,
        };
        match (kind, ext) {
            (EntryType::XHeader, v) => {
                pax = v;
                continue;
            }
            (EntryType::GNULongName, v) => {
                long_name = v;
                continue;
            }
            (EntryType::GNULongLink, v) => {
                long_link = v;
                continue;
            }
            (EntryType::XGlobalHeader, _) => continue,
            _ => {}
        }
        let mut path = long_name
            .take()
            .unwrap_or_else(|| entry.header().path_bytes().into_owned());
        let mut link = long_link
            .take()
            .or_else(|| entry.header().link_name_bytes().map(|l| l.into_owned()));
        if let Some(p) = pax.take() {
            for rec in tar::PaxExtensions::new(&p).flatten() {
                match rec.key_bytes() {
                    b"path" => path = rec.value_bytes().to_vec(),
                    b"linkpath" => link = Some(rec.value_bytes().to_vec()),
                    b"size" => {
                        let s = rec.value().ok().and_then(|v| v.parse::<u64>().ok());
                        if s != Some(entry.size()) {
                            return Err(ImageError::Unsupported(format!(
                                "`{}` has a member over 8 GiB (a PAX size record)",
                                shown.display()
                            )));
                        }
                    }
                    _ => {}
                }
            }
        }
        let Some(path) = String::from_utf8(path).ok().and_then(|p| clean(&p)) else {
            continue;
        };
        let link = link.and_then(|l| String::from_utf8(l).ok());
        let member = match kind {
            EntryType::Regular | EntryType::Continuous => Member::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            },
            EntryType::Link => match link.as_deref().and_then(clean) {
                Some(t) => Member::Link(t),
                None => continue,
            },
            EntryType::Symlink => {
                // Relative to the link's directory, within the archive.
                let Some(l) = link else { continue };
                let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                let joined = if l.starts_with('/') {
                    l
                } else {
                    format!("{dir}/{l}")
                };
                match lexical(&joined) {
                    Some(t) => Member::Link(t),
                    None => continue,
                }
            }
            _ => continue,
        };
        if members.len() >= MAX_MEMBERS {
            return Err(ImageError::TooLarge(format!(
                "`{}` has more than {MAX_MEMBERS} members: that is not an image archive",
                shown.display()
            )));
        }
        members.insert(path, member);
    }
    Ok(members)
}

/// Lexical normalisation with `..` applied (and refused above the top).
fn lexical(p: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Decompresses the gzip file at `src` into `dst`, at most `max_bytes` and a quarter.
fn gunzip_to(src: &Path, dst: &Path, max_bytes: u64) -> Result<(), ImageError> {
    let f = File::open(src).map_err(|e| ImageError::io("cannot open", src, &e))?;
    let limit = max_bytes.saturating_add(max_bytes / 4);
    let gz = flate2::read::MultiGzDecoder::new(io::BufReader::new(f));
    let mut r = HashReader::new(gz, limit, |l| {
        io::Error::other(Overflow(format!(
            "the archive decompresses past {} (a decompression bomb?): pass a larger \
             --max-size if it is real",
            human(l)
        )))
    });
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| ImageError::io("cannot create", dst, &e))?;
    io::copy(&mut r, &mut out).map_err(|e| {
        crate::digest::limit_error(&e).unwrap_or_else(|| {
            ImageError::Io(format!("cannot decompress `{}`: {e}", src.display()))
        })
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(stem(Path::new("/x/busybox.tar")), "busybox");
        assert_eq!(stem(Path::new("/x/busybox.tar.gz")), "busybox");
        assert_eq!(stem(Path::new("/x/my layout/")), "my-layout");
        assert_eq!(stem(Path::new("/x/.hidden")), "hidden");
        assert_eq!(stem(Path::new("/")), "image");
        assert_eq!(clean("./a//b/./c"), Some("a/b/c".into()));
        assert_eq!(clean("/blobs/sha256/x"), Some("blobs/sha256/x".into()));
        assert_eq!(clean("a/../b"), None);
        assert_eq!(lexical("a/b/../c"), Some("a/c".into()));
        assert_eq!(lexical("a/../../c"), None);
        let hex = "a".repeat(64);
        assert!(digest_in_name(&format!("{hex}.json")).is_some());
        assert!(digest_in_name(&format!("blobs/sha256/{hex}")).is_some());
        assert!(digest_in_name(&format!("{hex}/layer.tar")).is_none());
        assert!(digest_in_name("config.json").is_none());
    }
}
