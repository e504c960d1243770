//! Content digests, the OCI ChainID, and the readers that verify and bound a stream while it
//! flows (so that nothing is trusted, or allowed to grow, before it is checked).

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::ImageError;

/// A `sha256:<64 lowercase hex>` digest. Parsing one is also what keeps a digest from a
/// manifest safe to use as a file name (`blobs/sha256/<hex>`, `rootfs/<hex>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<hex>`. Other algorithms are [`ImageError::Unsupported`].
    pub(crate) fn parse(s: &str) -> Result<Digest, ImageError> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(ImageError::Registry(format!(
                "`{s}` is not a digest (want sha256:<64 hex digits>)"
            )));
        };
        if alg != "sha256" {
            return Err(ImageError::Unsupported(format!(
                "digest `{s}` uses {alg}: moat only verifies sha256 digests"
            )));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ImageError::Registry(format!(
                "`{s}` is not a sha256 digest (want 64 lowercase hex digits)"
            )));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }

    /// The sha256 of `data`.
    pub(crate) fn of(data: &[u8]) -> Digest {
        Digest {
            hex: hex::encode(Sha256::digest(data)),
        }
    }

    pub(crate) fn from_hasher(h: Sha256) -> Digest {
        Digest {
            hex: hex::encode(h.finalize()),
        }
    }

    /// The 64 hex digits.
    pub(crate) fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// The OCI ChainID of a stack of layers (image-spec `config.md`):
/// `chain(L1) = diff_id(L1)`, `chain(L1..n) = sha256(chain(L1..n-1) + " " + diff_id(Ln))`.
/// It names what the layers produce when applied in order, so two images with the same
/// layers share one rootfs. An image with no layers gets the digest of the empty string.
pub(crate) fn chain_id(diff_ids: &[Digest]) -> Digest {
    let mut it = diff_ids.iter();
    let Some(first) = it.next() else {
        return Digest::of(b"");
    };
    let mut chain = first.clone();
    for d in it {
        chain = Digest::of(format!("{chain} {d}").as_bytes());
    }
    chain
}

/// The marker inside an `io::Error` for a stream that went past its limit, so that the error
/// can become [`ImageError::TooLarge`] (or [`ImageError::Digest`]) after it passed through the
/// tar parser and the decompressor.
#[derive(Debug)]
pub(crate) struct Overflow(pub(crate) String);

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Overflow {}

/// Like [`Overflow`], for a blob longer than its descriptor said: a digest error.
#[derive(Debug)]
pub(crate) struct SizeMismatch(pub(crate) String);

impl fmt::Display for SizeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SizeMismatch {}

/// The [`Overflow`] or [`SizeMismatch`] inside `e`, as the error it stands for.
/// Looks through the whole chain of sources: the tar crate and the decompressor may wrap
/// the error on its way up.
pub(crate) fn limit_error(e: &io::Error) -> Option<ImageError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> =
        e.get_ref().map(|i| i as &(dyn std::error::Error + 'static));
    while let Some(err) = cur {
        if let Some(o) = err.downcast_ref::<Overflow>() {
            return Some(ImageError::TooLarge(o.0.clone()));
        }
        if let Some(m) = err.downcast_ref::<SizeMismatch>() {
            return Some(ImageError::Digest(m.0.clone()));
        }
        if let Some(inner) = err.downcast_ref::<io::Error>() {
            if let Some(i) = inner.get_ref() {
                cur = Some(i as &(dyn std::error::Error + 'static));
                continue;
            }
        }
        cur = err.source();
    }
    None
}

/// A reader that hashes what passes through it and refuses to pass more than `limit` bytes
/// (the error carries `what_on_overflow`, see [`Overflow`] / [`SizeMismatch`]).
pub(crate) struct HashReader<'a, R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    on_overflow: fn(u64) -> io::Error,
    /// Called with the running count every `1 MiB` or so (progress).
    tick: Option<Box<dyn FnMut(u64) + 'a>>,
    last_tick: u64,
}

impl<'a, R: Read> HashReader<'a, R> {
    pub(crate) fn new(inner: R, limit: u64, on_overflow: fn(u64) -> io::Error) -> Self {
        HashReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
            on_overflow,
            tick: None,
            last_tick: 0,
        }
    }

    pub(crate) fn with_tick(mut self, tick: Box<dyn FnMut(u64) + 'a>) -> Self {
        self.tick = Some(tick);
        self
    }

    /// Reads to the end (bounded by the limit) and returns the digest and the byte count.
    pub(crate) fn finish(&mut self) -> io::Result<(Digest, u64)> {
        io::copy(self, &mut io::sink())?;
        if let Some(t) = self.tick.as_mut() {
            t(self.count);
        }
        Ok((
            Digest::from_hasher(std::mem::take(&mut self.hasher)),
            self.count,
        ))
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HashReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Read at most one byte past the limit: that byte proves the stream is too long.
        let room = self.limit.saturating_sub(self.count).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if self.count + n as u64 > self.limit {
            return Err((self.on_overflow)(self.limit));
        }
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if let Some(t) = self.tick.as_mut() {
            if self.count - self.last_tick >= 1 << 20 {
                self.last_tick = self.count;
                t(self.count);
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parse_digests() {
        let hex = "a".repeat(64);
        assert_eq!(Digest::parse(&format!("sha256:{hex}")).unwrap().hex(), hex);
        assert!(matches!(
            Digest::parse(&format!("sha512:{hex}")),
            Err(ImageError::Unsupported(_))
        ));
        for bad in [
            "sha256:".to_string(),
            "sha256".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:../{}", "a".repeat(61)),
        ] {
            assert!(
                matches!(Digest::parse(&bad), Err(ImageError::Registry(_))),
                "{bad}"
            );
        }
    }

    /// The ChainID, computed here straight from the definition in image-spec config.md with
    /// sha2 on the literal strings, against the implementation.
    #[test]
    fn chain_id_matches_the_definition() {
        let d1 = Digest::of(b"layer one");
        let d2 = Digest::of(b"layer two");
        let d3 = Digest::of(b"layer three");
        assert_eq!(chain_id(std::slice::from_ref(&d1)), d1);

        let hex = |s: String| hex::encode(Sha256::digest(s.as_bytes()));
        let c2 = hex(format!("sha256:{} sha256:{}", d1.hex(), d2.hex()));
        let c3 = hex(format!("sha256:{c2} sha256:{}", d3.hex()));
        assert_eq!(chain_id(&[d1.clone(), d2.clone()]).hex(), c2);
        assert_eq!(chain_id(&[d1.clone(), d2.clone(), d3.clone()]).hex(), c3);
        // Order matters.
        assert_ne!(chain_id(&[d2, d1]).hex(), c2);
        // A known value: the two-layer chain of the sha256 of "a" and of "b".
        let a = Digest::of(b"a");
        assert_eq!(
            a.hex(),
            "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
        );
        assert_eq!(
            chain_id(&[a, Digest::of(b"b")]).hex(),
            hex(
                "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb \
                 sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d"
                    .to_string()
            )
        );
    }

    #[test]
    fn hash_reader_bounds_the_stream() {
        let data = vec![7u8; 1000];
        let mut r = HashReader::new(&data[..], 1000, |_| {
            io::Error::other(Overflow("big".into()))
        });
        let (d, n) = r.finish().unwrap();
        assert_eq!((d, n), (Digest::of(&data), 1000));
        let mut r = HashReader::new(&data[..], 999, |_| io::Error::other(Overflow("big".into())));
        let e = r.finish().unwrap_err();
        assert!(matches!(limit_error(&e), Some(ImageError::TooLarge(m)) if m == "big"));
    }
}
