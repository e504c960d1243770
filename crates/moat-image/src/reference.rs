//! Image references (`busybox`, `ghcr.io/a/b:1`, `127.0.0.1:5000/test/bb@sha256:...`),
//! parsed the way docker does, and template names.

use std::fmt;

use crate::digest::Digest;
use crate::ImageError;

/// Docker Hub's canonical name, as references spell it.
const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API really is.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`; Docker Hub is `docker.io`.
    pub registry: String,
    /// The repository path, e.g. `library/busybox`.
    pub repository: String,
    /// The tag; `latest` when the reference names neither a tag nor a digest.
    pub tag: Option<String>,
    /// `sha256:<hex>` when the reference pins a digest (the tag, if any, is then ignored,
    /// as docker does).
    pub digest: Option<String>,
}

impl Reference {
    /// Parses a reference as docker does: a first path component is a registry host if it
    /// contains `.` or `:`, is `localhost`, or has an upper-case letter; otherwise the image
    /// is on Docker Hub, under `library/` when it has a single component.
    pub fn parse(s: &str) -> Result<Reference, ImageError> {
        let bad = |why: &str| {
            ImageError::BadReference(format!(
                "`{s}` is not an image reference ({why}): write it like `busybox`, \
                 `busybox:1.36`, `ghcr.io/owner/image:tag` or `host:port/path@sha256:<digest>`"
            ))
        };
        if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("empty, too long, or with spaces"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let d = Digest::parse(d).map_err(|_| bad("the digest is not sha256:<64 hex>"))?;
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        let last_slash = name.rfind('/');
        let (name, tag) = match name.rfind(':') {
            Some(i) if last_slash.is_none_or(|j| i > j) => (&name[..i], Some(&name[i + 1..])),
            _ => (name, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(bad(
                    "a tag is 1-128 of [A-Za-z0-9_.-], not starting with . or -",
                ));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if !valid_host(&registry) {
            return Err(bad("the registry host is not host[:port]"));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.len() > 255 || !repository.split('/').all(valid_path_component) {
            return Err(bad(
                "a repository is lower-case [a-z0-9] words joined by `.`, `_`, `__` or `-`, \
                 separated by `/`",
            ));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) that serves the registry API.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// Whether the registry is on this machine's loopback by name (always plain http).
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.strip_prefix('[') {
            Some(v6) => v6
                .split(']')
                .next()
                .map(|h| format!("[{h}]"))
                .unwrap_or_default(),
            None => self
                .registry
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string(),
        };
        matches!(host.as_str(), "localhost" | "127.0.0.1" | "[::1]")
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The template name a pull stores this image under by default: the reference without
    /// its registry host (and without Docker Hub's `library/`), with its tag, or
    /// `@sha256:<first 12 hex digits>` for a digest reference.
    pub fn default_name(&self) -> String {
        let repo = if self.registry == DOCKER_HUB {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
        } else {
            &self.repository
        };
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("{repo}@{}", &d[..d.len().min(7 + 12)]),
            (None, Some(t)) => format!("{repo}:{t}"),
            (None, None) => format!("{repo}:latest"),
        }
    }
}

impl fmt::Display for Reference {
    /// The full normalised reference, e.g. `docker.io/library/busybox:latest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// The default template name for `reference` (see [`Reference::default_name`]).
pub fn default_name(reference: &str) -> Result<String, ImageError> {
    Ok(Reference::parse(reference)?.default_name())
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` (distribution's path component).
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__`, or any number of `-`.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// `host[:port]`, `[v6]:port`.
fn valid_host(h: &str) -> bool {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.is_empty() || !v6.bytes().all(|c| c.is_ascii_hexdigit() || c == b':') {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(p) => ("v6", p),
                None => return false,
            },
        }
    } else {
        match h.split_once(':') {
            Some((host, port)) => (host, port),
            None => (h, ""),
        }
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        });
    let port_ok =
        !h.ends_with(':') && (port.is_empty() || (port.len() <= 5 && port.parse::<u16>().is_ok()));
    host_ok && port_ok
}

/// Checks a template name: 1-128 of `[A-Za-z0-9._/:@-]`, starting with a letter or digit,
/// with no `..` (names become file names, escaped, but they are also shown and typed).
pub(crate) fn validate_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && !name.contains("..")
        && name.bytes().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'/' | b':' | b'@' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadReference(format!(
            "`{name}` is not a valid template name: use 1-128 of letters, digits and `._/:@-`, \
             starting with a letter or digit, without `..`"
        )))
    }
}

/// The file name of a template's index entry: the name with every byte but
/// `[A-Za-z0-9._-]` written as `%XX` (so `/` never makes a subdirectory), plus `.json`.
pub(crate) fn escape_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push_str(".json");
    out
}

/// Whether `name` has a tag or a digest (`busybox` has neither, `busybox:1` has a tag).
pub(crate) fn has_tag_or_digest(name: &str) -> bool {
    let last = name.rsplit('/').next().unwrap_or(name);
    last.contains(':') || name.contains('@')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_like_docker() {
        type Row<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);
        let table: &[Row] = &[
            (
                "busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                None,
            ),
            (
                "busybox:1.36",
                "docker.io",
                "library/busybox",
                Some("1.36"),
                None,
            ),
            (
                "library/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                None,
            ),
            (
                "docker.io/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                None,
            ),
            (
                "index.docker.io/library/busybox:1",
                "docker.io",
                "library/busybox",
                Some("1"),
                None,
            ),
            ("user/app:v2", "docker.io", "user/app", Some("v2"), None),
            ("ghcr.io/a/b:1", "ghcr.io", "a/b", Some("1"), None),
            ("ghcr.io/a/b/c", "ghcr.io", "a/b/c", Some("latest"), None),
            (
                "127.0.0.1:5000/test/bb:v1",
                "127.0.0.1:5000",
                "test/bb",
                Some("v1"),
                None,
            ),
            ("localhost/bb", "localhost", "bb", Some("latest"), None),
            (
                "localhost:5000/bb",
                "localhost:5000",
                "bb",
                Some("latest"),
                None,
            ),
            ("[::1]:5000/x/y:t", "[::1]:5000", "x/y", Some("t"), None),
            ("Registry/x", "Registry", "x", Some("latest"), None),
            ("a.b-c/d__e", "a.b-c", "d__e", Some("latest"), None),
            (
                "my_img-x.y",
                "docker.io",
                "library/my_img-x.y",
                Some("latest"),
                None,
            ),
        ];
        for &(s, reg, repo, tag, dig) in table {
            let r = Reference::parse(s).unwrap();
            assert_eq!(
                (
                    r.registry.as_str(),
                    r.repository.as_str(),
                    r.tag.as_deref(),
                    r.digest.as_deref()
                ),
                (reg, repo, tag, dig),
                "{s}"
            );
        }
        let r = Reference::parse(&format!("busybox@{D}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.digest.as_deref()), (None, Some(D)));
        assert_eq!(r.manifest_ref(), D);
        let r = Reference::parse(&format!("127.0.0.1:5000/a/b:1@{D}")).unwrap();
        assert_eq!(
            (r.tag.as_deref(), r.digest.as_deref()),
            (Some("1"), Some(D))
        );
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/a/b:1@{D}"));
        assert_eq!(
            Reference::parse("busybox").unwrap().to_string(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            Reference::parse("busybox").unwrap().api_host(),
            "registry-1.docker.io"
        );
        assert_eq!(
            Reference::parse("ghcr.io/a/b").unwrap().api_host(),
            "ghcr.io"
        );
    }

    #[test]
    fn refuses_garbage() {
        for s in [
            "",
            " ",
            "busybox:",
            "busybox:-x",
            "Busybox",
            "bus box",
            "a//b",
            "/busybox",
            "busybox/",
            "ghcr.io/",
            "ghcr.io/a/B",
            "busybox@sha256:123",
            "busybox@md5:0123",
            "ghcr.io:abc/x",
            "ghcr.io:/x",
            "ghcr..io/x",
            "a.b_c/e",
            "-ghcr.io/x",
            "a/b:c:d",
            "x/../y",
            "a/.b",
            "a--",
            "a\nb",
            &"a".repeat(600),
            &format!("busybox:{}", "t".repeat(129)),
        ] {
            assert!(
                matches!(Reference::parse(s), Err(ImageError::BadReference(_))),
                "{s:?} parsed as {:?}",
                Reference::parse(s)
            );
        }
        let e = Reference::parse("bus box").unwrap_err().to_string();
        assert!(
            e.contains("`bus box`") && e.contains("write it like"),
            "{e}"
        );
    }

    #[test]
    fn loopback_hosts() {
        for (s, local) in [
            ("localhost/a", true),
            ("localhost:5000/a", true),
            ("127.0.0.1:5000/a", true),
            ("127.0.0.1/a", true),
            ("[::1]:5000/a", true),
            ("[::1]/a", true),
            ("127.0.0.2:5000/a", false),
            ("localhost.example.com/a", false),
            ("busybox", false),
        ] {
            assert_eq!(Reference::parse(s).unwrap().is_loopback(), local, "{s}");
        }
    }

    #[test]
    fn default_names() {
        for (s, name) in [
            ("busybox", "busybox:latest".to_string()),
            ("busybox:1.36", "busybox:1.36".to_string()),
            ("docker.io/library/busybox", "busybox:latest".to_string()),
            ("user/app:v2", "user/app:v2".to_string()),
            ("ghcr.io/a/b:1", "a/b:1".to_string()),
            ("ghcr.io/library/x", "library/x:latest".to_string()),
            ("127.0.0.1:5000/test/bb:v1", "test/bb:v1".to_string()),
            (
                &format!("busybox@{D}"),
                "busybox@sha256:0123456789ab".to_string(),
            ),
            (
                &format!("ghcr.io/a/b:1@{D}"),
                "a/b@sha256:0123456789ab".to_string(),
            ),
        ] {
            assert_eq!(default_name(s).unwrap(), name, "{s}");
            validate_name(&name).unwrap();
        }
    }

    #[test]
    fn template_names() {
        for ok in [
            "busybox:latest",
            "a/b@sha256:0123456789ab",
            "x",
            "a.b_c-d/e:f",
        ] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "/abs",
            "a/../b",
            "a..b",
            "a b",
            "a%2F",
            "é",
            &"a".repeat(129),
        ] {
            assert!(
                matches!(validate_name(bad), Err(ImageError::BadReference(_))),
                "{bad:?}"
            );
        }
        assert_eq!(escape_name("busybox:latest"), "busybox%3Alatest.json");
        assert_eq!(escape_name("a/b@sha256:12"), "a%2Fb%40sha256%3A12.json");
        assert!(!has_tag_or_digest("busybox"));
        assert!(!has_tag_or_digest("localhost:5000/busybox"));
        assert!(has_tag_or_digest("a/busybox:1"));
        assert!(has_tag_or_digest("a@sha256:1"));
    }
}
