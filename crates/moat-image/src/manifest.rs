//! The JSON documents of an image (image-spec and Docker's schema 2): indexes (manifest
//! lists), manifests, descriptors and configs; platform selection; layer media types.
//!
//! Every document is external input: fields are optional where the specs allow it, unknown
//! fields are ignored, and digests are parsed (validated) before they are used anywhere.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::digest::Digest;
use crate::{ImageConfig, ImageError};

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1";

/// The `Accept` header of a manifest request: every type moat can read.
pub(crate) const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// The largest manifest or index moat reads (containerd uses the same bound).
pub(crate) const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// The largest image config moat reads.
pub(crate) const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// An OCI content descriptor.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    pub(crate) fn digest(&self) -> Result<Digest, ImageError> {
        Digest::parse(&self.digest)
    }

    pub(crate) fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

/// `os/architecture[/variant]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`, e.g. `linux/arm64/v8`.
    pub(crate) fn parse(s: &str) -> Result<Platform, ImageError> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(ImageError::BadReference(format!(
                "`{s}` is not a platform: write it as os/arch[/variant], e.g. linux/amd64 or \
                 linux/arm64"
            ))),
        }
    }

    /// This machine's platform, in Go's names.
    pub(crate) fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "powerpc64" => "ppc64",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            os: "linux".to_string(),
            architecture: architecture.to_string(),
            variant: None,
        }
    }

    /// Whether an index entry for `self` can run where `wanted` is asked for. A wanted
    /// variant must match, except that arm64's default variant `v8` equals none.
    pub(crate) fn satisfies(&self, wanted: &Platform) -> bool {
        if self.os != wanted.os || self.architecture != wanted.architecture {
            return false;
        }
        let norm = |v: Option<&str>| match (self.architecture.as_str(), v) {
            ("arm64", Some("v8")) => None,
            (_, v) => v.map(str::to_string),
        };
        match &wanted.variant {
            None => true,
            Some(w) => norm(Some(w)) == norm(self.variant.as_deref()),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A manifest or an index, whichever the document is.
#[derive(Debug, Deserialize)]
struct AnyManifest {
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<u64>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// An image manifest: one config and its layers.
#[derive(Clone, Debug)]
pub(crate) struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// A parsed manifest document.
#[derive(Debug)]
pub(crate) enum Parsed {
    Index(Vec<Descriptor>),
    Manifest(Manifest),
}

/// Parses a manifest or index; `content_type` is the HTTP `Content-Type` (or the
/// descriptor's media type) when known. `what` names the document in errors.
pub(crate) fn parse_manifest(
    body: &[u8],
    content_type: Option<&str>,
    what: &str,
) -> Result<Parsed, ImageError> {
    let doc: AnyManifest = serde_json::from_slice(body).map_err(|e| {
        ImageError::Registry(format!(
            "{what} is not a valid manifest ({e}): is this an image registry?"
        ))
    })?;
    let ty = doc
        .media_type
        .clone()
        .or_else(|| content_type.map(|c| c.split(';').next().unwrap_or(c).trim().to_string()))
        .unwrap_or_default();
    if ty.starts_with(DOCKER_SCHEMA1) || doc.schema_version == Some(1) {
        return Err(ImageError::Unsupported(format!(
            "{what} is a Docker schema 1 manifest, which is deprecated: push the image again \
             with a current docker or skopeo"
        )));
    }
    let is_index = ty == OCI_INDEX || ty == DOCKER_LIST;
    let is_manifest = ty == OCI_MANIFEST || ty == DOCKER_MANIFEST;
    match (&doc.manifests, &doc.config, &doc.layers) {
        (Some(m), _, _) if is_index || !is_manifest => Ok(Parsed::Index(m.clone())),
        (_, Some(c), Some(l)) if is_manifest || !is_index => {
            if !c.media_type.is_empty()
                && c.media_type != "application/vnd.oci.image.config.v1+json"
                && c.media_type != "application/vnd.docker.container.image.v1+json"
            {
                return Err(ImageError::Unsupported(format!(
                    "{what} is not a container image: its config is `{}` (an OCI artifact?)",
                    c.media_type
                )));
            }
            Ok(Parsed::Manifest(Manifest {
                config: c.clone(),
                layers: l.clone(),
            }))
        }
        _ => Err(ImageError::Registry(format!(
            "{what} is neither an image index nor an image manifest (media type `{ty}`)"
        ))),
    }
}

/// Picks the index entry for `wanted`; none -> an error listing what the index has.
pub(crate) fn select_platform<'a>(
    entries: &'a [Descriptor],
    wanted: &Platform,
    what: &str,
) -> Result<&'a Descriptor, ImageError> {
    let found = entries
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.satisfies(wanted)));
    if let Some(d) = found {
        return Ok(d);
    }
    // Attestation manifests (buildkit's `unknown/unknown`) are not images to offer.
    let available: Vec<String> = entries
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .filter(|p| p.os != "unknown" && !p.os.is_empty())
        .map(ToString::to_string)
        .collect();
    let available = if available.is_empty() {
        "no platforms".to_string()
    } else {
        available.join(", ")
    };
    Err(ImageError::NotFound(format!(
        "{what} has no image for {wanted}; it has {available}: pass a platform it has \
         (--platform)"
    )))
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
}

/// Checks a layer's media type before anything is downloaded: zstd and non-layer blobs are
/// refused. The compression itself is detected from the blob's first bytes (a media type
/// saying `tar` over gzip bytes is common).
pub(crate) fn check_layer_media_type(media_type: &str, what: &str) -> Result<(), ImageError> {
    if media_type.contains("zstd") {
        return Err(ImageError::Unsupported(format!(
            "zstd layers are not supported yet: {what} is `{media_type}`: push a gzip build \
             of the image (docker buildx --output compression=gzip, or skopeo copy \
             --dest-compress-format gzip)"
        )));
    }
    let known = media_type.is_empty()
        || media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.");
    if !known {
        return Err(ImageError::Unsupported(format!(
            "{what} is `{media_type}`, not a filesystem layer: is this a container image?"
        )));
    }
    Ok(())
}

/// The compression of a blob from its first bytes.
pub(crate) fn sniff(magic: &[u8], what: &str) -> Result<Compression, ImageError> {
    match magic {
        [0x1f, 0x8b, ..] => Ok(Compression::Gzip),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Err(ImageError::Unsupported(format!(
            "zstd layers are not supported yet: {what} is zstd-compressed: push a gzip build \
             of the image"
        ))),
        [b'B', b'Z', b'h', ..] | [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
            Err(ImageError::Unsupported(format!(
                "{what} is bzip2 or xz compressed: moat reads gzip and plain tar layers"
            )))
        }
        _ => Ok(Compression::None),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ConfigDoc {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// An image config: what to run, and the diff_ids of its layers.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub image: ImageConfig,
    pub variant: Option<String>,
    pub diff_ids: Vec<Digest>,
}

/// Parses an image config (`application/vnd.oci.image.config.v1+json` or Docker's
/// `application/vnd.docker.container.image.v1+json`, which share these fields).
pub(crate) fn parse_config(body: &[u8], what: &str) -> Result<Config, ImageError> {
    let doc: ConfigDoc = serde_json::from_slice(body)
        .map_err(|e| ImageError::Registry(format!("{what} is not a valid image config ({e})")))?;
    let run = doc.config.unwrap_or_default();
    let diff_ids = doc
        .rootfs
        .unwrap_or_default()
        .diff_ids
        .iter()
        .map(|d| Digest::parse(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ImageError::Registry(format!("{what}: rootfs.diff_ids: {e}")))?;
    Ok(Config {
        image: ImageConfig {
            env: run.env.unwrap_or_default(),
            user: run.user.filter(|u| !u.is_empty()),
            workdir: run.working_dir.filter(|w| !w.is_empty()),
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            labels: run.labels.unwrap_or_default(),
            exposed_ports: run.exposed_ports.unwrap_or_default().into_keys().collect(),
            architecture: doc.architecture.unwrap_or_default(),
            os: doc.os.unwrap_or_default(),
        },
        variant: doc.variant,
        diff_ids,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn desc(os: &str, arch: &str, variant: Option<&str>, n: u8) -> serde_json::Value {
        let mut p = serde_json::json!({"os": os, "architecture": arch});
        if let Some(v) = variant {
            p["variant"] = v.into();
        }
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": format!("sha256:{}", format!("{n:02x}").repeat(32)),
            "size": 100,
            "platform": p,
        })
    }

    #[test]
    fn platform_selection() {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                desc("linux", "amd64", None, 1),
                desc("linux", "arm", Some("v6"), 2),
                desc("linux", "arm", Some("v7"), 3),
                desc("linux", "arm64", Some("v8"), 4),
                desc("unknown", "unknown", None, 5),
            ],
        });
        let body = serde_json::to_vec(&index).unwrap();
        let Parsed::Index(entries) = parse_manifest(&body, None, "x").unwrap() else {
            panic!("not an index");
        };
        let pick = |p: &str| {
            select_platform(&entries, &Platform::parse(p).unwrap(), "the index")
                .map(|d| d.digest.clone())
        };
        let dig = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
        assert_eq!(pick("linux/amd64").unwrap(), dig(1));
        assert_eq!(pick("linux/arm/v7").unwrap(), dig(3));
        assert_eq!(pick("linux/arm/v6").unwrap(), dig(2));
        // No variant asked: the first arm entry.
        assert_eq!(pick("linux/arm").unwrap(), dig(2));
        // arm64's v8 is its default.
        assert_eq!(pick("linux/arm64").unwrap(), dig(4));
        assert_eq!(pick("linux/arm64/v8").unwrap(), dig(4));
        let e = pick("linux/s390x").unwrap_err();
        assert!(matches!(e, ImageError::NotFound(_)));
        assert_eq!(
            e.to_string(),
            "the index has no image for linux/s390x; it has linux/amd64, linux/arm/v6, \
             linux/arm/v7, linux/arm64/v8: pass a platform it has (--platform)"
        );
        assert!(pick("windows/amd64").is_err());
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux/amd64/v1/x").is_err());
        assert!(Platform::parse("linux/../x").is_err());
    }

    #[test]
    fn host_platform() {
        let h = Platform::host();
        assert_eq!(h.os, "linux");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(h.architecture, "amd64");
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(h.architecture, "arm64");
        }
    }

    #[test]
    fn manifests_by_type_or_shape() {
        let m = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": format!("sha256:{}", "1".repeat(64)), "size": 2},
            "layers": [],
        });
        let body = serde_json::to_vec(&m).unwrap();
        assert!(matches!(
            parse_manifest(
                &body,
                Some(&format!("{DOCKER_MANIFEST}; charset=utf-8")),
                "m"
            ),
            Ok(Parsed::Manifest(_))
        ));
        assert!(matches!(
            parse_manifest(&body, None, "m"),
            Ok(Parsed::Manifest(_))
        ));
        assert!(matches!(
            parse_manifest(b"{\"schemaVersion\":1,\"fsLayers\":[]}", None, "m"),
            Err(ImageError::Unsupported(_))
        ));
        let e = parse_manifest(b"<html>", None, "the manifest at URL").unwrap_err();
        assert!(matches!(&e, ImageError::Registry(m) if m.contains("the manifest at URL")));
        assert!(matches!(
            parse_manifest(b"{}", None, "m"),
            Err(ImageError::Registry(_))
        ));
        let art = serde_json::json!({
            "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json",
                       "digest": format!("sha256:{}", "1".repeat(64)), "size": 2},
            "layers": [],
        });
        assert!(matches!(
            parse_manifest(&serde_json::to_vec(&art).unwrap(), None, "m"),
            Err(ImageError::Unsupported(_))
        ));
    }

    #[test]
    fn layer_types() {
        check_layer_media_type("application/vnd.oci.image.layer.v1.tar+gzip", "l").unwrap();
        check_layer_media_type("application/vnd.oci.image.layer.v1.tar", "l").unwrap();
        check_layer_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip", "l").unwrap();
        let e = check_layer_media_type("application/vnd.oci.image.layer.v1.tar+zstd", "layer 1")
            .unwrap_err();
        assert!(
            matches!(&e, ImageError::Unsupported(m) if m.starts_with("zstd layers are not supported yet: layer 1")),
            "{e}"
        );
        assert!(check_layer_media_type("application/vnd.in-toto+json", "l").is_err());
        assert_eq!(sniff(&[0x1f, 0x8b, 8], "l").unwrap(), Compression::Gzip);
        assert_eq!(sniff(b"etc/passwd\0", "l").unwrap(), Compression::None);
        assert_eq!(sniff(b"", "l").unwrap(), Compression::None);
        assert!(matches!(
            sniff(&[0x28, 0xb5, 0x2f, 0xfd], "l"),
            Err(ImageError::Unsupported(_))
        ));
    }

    #[test]
    fn configs() {
        let c = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {
                "Env": ["PATH=/bin", "A=b"], "User": "", "WorkingDir": "/w",
                "Entrypoint": null, "Cmd": ["sh"], "Labels": {"k": "v"},
                "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
            },
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "2".repeat(64))]},
        });
        let cfg = parse_config(&serde_json::to_vec(&c).unwrap(), "c").unwrap();
        assert_eq!(cfg.image.env, ["PATH=/bin", "A=b"]);
        assert_eq!(cfg.image.user, None);
        assert_eq!(cfg.image.workdir.as_deref(), Some("/w"));
        assert!(cfg.image.entrypoint.is_empty());
        assert_eq!(cfg.image.cmd, ["sh"]);
        assert_eq!(cfg.image.labels["k"], "v");
        assert_eq!(cfg.image.exposed_ports, ["53/udp", "80/tcp"]);
        assert_eq!(
            (cfg.image.architecture.as_str(), cfg.image.os.as_str()),
            ("amd64", "linux")
        );
        assert_eq!(cfg.diff_ids.len(), 1);
        let bad = serde_json::json!({"rootfs": {"diff_ids": ["sha256:../../x"]}});
        assert!(parse_config(&serde_json::to_vec(&bad).unwrap(), "c").is_err());
        // A minimal config (no "config" at all) is fine.
        let cfg = parse_config(b"{\"rootfs\":{\"diff_ids\":[]}}", "c").unwrap();
        assert_eq!(cfg.image, ImageConfig::default());
    }
}
