//! The HTTP/1.1 request pump (sandbox -> upstream) and the raw response pump (upstream -> sandbox).
//!
//! Requests are parsed just enough to check the Host, inject secrets into header values and find
//! where the body ends (RFC 9112 section 6); bodies are streamed through, never buffered whole.
//! Responses are not parsed at all: they are copied byte for byte.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Injection;

/// The request line plus all header lines may take this many bytes.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// At most this many header fields (and, separately, trailer fields).
pub(crate) const MAX_HEADERS: usize = 100;
/// A chunk-size line (with any extensions) may take this many bytes.
const MAX_CHUNK_LINE: usize = 4096;
const BUF: usize = 16 * 1024;

/// Why the request pump stopped early. Each one that carries a status is answered to the sandbox.
#[derive(Debug)]
pub(crate) enum PumpError {
    /// A malformed request: (status, what is wrong).
    Bad(u16, String),
    /// The Host header or absolute URL named another host.
    HostMismatch(String),
    /// A secret's value cannot go into a header (control characters).
    Injection(String),
    /// Reading the sandbox or writing the upstream failed.
    Io(io::Error),
}

impl From<io::Error> for PumpError {
    fn from(e: io::Error) -> Self {
        PumpError::Io(e)
    }
}

/// Counters shared by both directions.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) up: AtomicU64,
    pub(crate) down: AtomicU64,
    pub(crate) requests: AtomicU32,
}

/// A plain-text HTTP answer from moat itself (the connection closes after it).
pub(crate) fn answer(status: u16, message: &str) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        _ => "Error",
    };
    let body = format!("moat egress: {message}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn bad(status: u16, why: impl Into<String>) -> PumpError {
    PumpError::Bad(status, why.into())
}

/// The sandbox side reader plus the upstream side writer, and the policy for this connection.
pub(crate) struct Pump<'a, R, W> {
    r: tokio::io::BufReader<R>,
    w: tokio::io::BufWriter<W>,
    /// Lowercase, no trailing dot, no brackets around an IPv6 literal.
    host: &'a str,
    injections: &'a [Injection],
    counters: &'a Counters,
}

/// What a read of one line found.
enum Line {
    Got,
    /// End of stream before any byte of the line.
    Eof,
}

fn eofish(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

impl<'a, R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Pump<'a, R, W> {
    pub(crate) fn new(
        r: R,
        w: W,
        host: &'a str,
        injections: &'a [Injection],
        counters: &'a Counters,
    ) -> Self {
        Pump {
            r: tokio::io::BufReader::with_capacity(BUF, r),
            w: tokio::io::BufWriter::with_capacity(BUF, w),
            host,
            injections,
            counters,
        }
    }

    /// Runs requests until the sandbox closes its side (then closes the upstream's side too).
    pub(crate) async fn run(mut self) -> Result<(), PumpError> {
        let result = self.requests().await;
        if result.is_ok() {
            // Best effort: the upstream may already be gone.
            let _ = self.w.flush().await;
            let _ = self.w.shutdown().await;
        }
        result
    }

    async fn requests(&mut self) -> Result<(), PumpError> {
        loop {
            let Some(raw) = self.read_head().await? else {
                return Ok(());
            };
            let head = parse_head(&raw)?;
            self.check_host(&head)?;
            let framing = framing(&head)?;
            let out = self.serialize(&head)?;
            self.send(&out).await?;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let raw_after = head.method == "CONNECT" || head.header("upgrade").is_some();
            let complete = match framing {
                Framing::None => true,
                Framing::Length(n) => self.copy_exact(n).await?,
                Framing::Chunked => self.copy_chunked().await?,
            };
            if !complete {
                // The sandbox went away mid-body; the upstream sees the short body by its framing.
                return Ok(());
            }
            if raw_after {
                return self.raw().await;
            }
        }
    }

    /// Buffered upstream bytes must go out before we wait on the sandbox (or `Expect:
    /// 100-continue` and interactive protocols would stall).
    async fn fill(&mut self) -> Result<&[u8], PumpError> {
        if self.r.buffer().is_empty() {
            self.w.flush().await?;
        }
        match self.r.fill_buf().await {
            Ok(b) => Ok(b),
            Err(e) if eofish(&e) => Ok(&[]),
            Err(e) => Err(PumpError::Io(e)),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), PumpError> {
        self.w.write_all(bytes).await?;
        self.counters
            .up
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Appends one line (through its `\n`) to `out`, which may not grow past `max`.
    async fn read_line(
        &mut self,
        out: &mut Vec<u8>,
        max: usize,
        what: &str,
    ) -> Result<Line, PumpError> {
        let start = out.len();
        loop {
            let avail = self.fill().await?;
            if avail.is_empty() {
                if out.len() == start {
                    return Ok(Line::Eof);
                }
                return Err(PumpError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the sandbox closed the connection in the middle of the {what}"),
                )));
            }
            let (take, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            if out.len() + take > max {
                return Err(if what == "request head" {
                    bad(431, format!("the request head is larger than {max} bytes"))
                } else {
                    bad(400, format!("the {what} is longer than {max} bytes"))
                });
            }
            out.extend_from_slice(&avail[..take]);
            self.r.consume(take);
            if done {
                return Ok(Line::Got);
            }
        }
    }

    /// The next request head, raw, through its empty line; `None` at a clean end of stream.
    async fn read_head(&mut self) -> Result<Option<Vec<u8>>, PumpError> {
        let mut raw = Vec::new();
        let mut lines = 0usize;
        let mut skipped = 0usize;
        loop {
            let before = raw.len();
            match self.read_line(&mut raw, MAX_HEAD, "request head").await? {
                Line::Eof if before == 0 => return Ok(None),
                Line::Eof => {
                    return Err(PumpError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the sandbox closed the connection in the middle of a request head",
                    )))
                }
                Line::Got => {}
            }
            let line = &raw[before..];
            let empty = line == b"\r\n" || line == b"\n";
            if empty && lines == 0 {
                // RFC 9112 2.2: ignore empty lines before the request line.
                raw.truncate(before);
                skipped += 1;
                if skipped > 8 {
                    return Err(bad(400, "too many empty lines before the request line"));
                }
                continue;
            }
            if empty {
                return Ok(Some(raw));
            }
            lines += 1;
            if lines > MAX_HEADERS + 1 {
                return Err(bad(
                    431,
                    format!("the request has more than {MAX_HEADERS} header fields"),
                ));
            }
        }
    }

    fn check_host(&self, head: &Head) -> Result<(), PumpError> {
        let hosts: Vec<&[u8]> = head.values("host").collect();
        match hosts.as_slice() {
            [] if head.version == "HTTP/1.1" => {
                return Err(bad(400, "the request has no Host header"))
            }
            [] => {}
            [one] => {
                if !authority_is(one, self.host) {
                    return Err(PumpError::HostMismatch(
                        String::from_utf8_lossy(one).into_owned(),
                    ));
                }
            }
            _ => return Err(bad(400, "the request has more than one Host header")),
        }
        let target = head.target.as_bytes();
        let authority = if head.method == "CONNECT" {
            Some(target)
        } else {
            absolute_authority(target)
        };
        if let Some(a) = authority {
            if a.contains(&b'@') {
                return Err(bad(
                    400,
                    "user information in the request target is not accepted",
                ));
            }
            if !authority_is(a, self.host) {
                return Err(PumpError::HostMismatch(
                    String::from_utf8_lossy(a).into_owned(),
                ));
            }
        }
        Ok(())
    }

    /// The head as it goes upstream: the request line unchanged, each header `name: value` with
    /// every placeholder in the value replaced (except in Host, which was checked as sent).
    fn serialize(&self, head: &Head) -> Result<Vec<u8>, PumpError> {
        let mut out = Vec::with_capacity(MAX_HEAD.min(4096));
        out.extend_from_slice(head.request_line.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &head.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            if name.eq_ignore_ascii_case("host") {
                out.extend_from_slice(value);
            } else {
                let mut v = value.clone();
                for inj in self.injections {
                    if inj.placeholder.is_empty() || !contains(&v, inj.placeholder.as_bytes()) {
                        continue;
                    }
                    if inj
                        .value
                        .bytes()
                        .any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
                    {
                        return Err(PumpError::Injection(format!(
                            "the value for placeholder {} contains a control character and cannot go into a header",
                            inj.placeholder
                        )));
                    }
                    v = replace_all(&v, inj.placeholder.as_bytes(), inj.value.as_bytes());
                }
                out.extend_from_slice(&v);
            }
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        Ok(out)
    }

    /// Copies `n` body bytes; `false` if the sandbox closed first.
    async fn copy_exact(&mut self, mut n: u64) -> Result<bool, PumpError> {
        while n > 0 {
            let avail = self.fill().await?;
            if avail.is_empty() {
                return Ok(false);
            }
            let take = avail.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            let chunk = avail[..take].to_vec();
            self.r.consume(take);
            self.send(&chunk).await?;
            n -= take as u64;
        }
        Ok(true)
    }

    /// Copies a chunked body, re-framed: each chunk-size line is re-written as plain hex (chunk
    /// extensions dropped), data and trailers pass unchanged. `false` if the sandbox closed first.
    async fn copy_chunked(&mut self) -> Result<bool, PumpError> {
        loop {
            let mut line = Vec::new();
            if let Line::Eof = self
                .read_line(&mut line, MAX_CHUNK_LINE, "chunk size line")
                .await?
            {
                return Ok(false);
            }
            let size = parse_chunk_size(&line)?;
            self.send(format!("{size:x}\r\n").as_bytes()).await?;
            if size == 0 {
                return self.copy_trailers().await;
            }
            if !self.copy_exact(size).await? {
                return Ok(false);
            }
            let mut crlf = Vec::new();
            if let Line::Eof = self.read_line(&mut crlf, 2, "chunk").await? {
                return Ok(false);
            }
            if crlf != b"\r\n" {
                return Err(bad(400, "a chunk's data is not followed by CRLF"));
            }
            self.send(b"\r\n").await?;
        }
    }

    async fn copy_trailers(&mut self) -> Result<bool, PumpError> {
        let mut total = 0usize;
        let mut fields = 0usize;
        loop {
            let mut line = Vec::new();
            if let Line::Eof = self
                .read_line(&mut line, MAX_HEAD - total, "chunked trailer section")
                .await?
            {
                return Ok(false);
            }
            total += line.len();
            let text = strip_eol(&line);
            if text.is_empty() {
                self.send(b"\r\n").await?;
                return Ok(true);
            }
            fields += 1;
            if fields > MAX_HEADERS {
                return Err(bad(
                    431,
                    format!("the request has more than {MAX_HEADERS} trailer fields"),
                ));
            }
            let (name, value) = parse_field(text)?;
            let mut out = Vec::with_capacity(text.len() + 4);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(&value);
            out.extend_from_slice(b"\r\n");
            self.send(&out).await?;
        }
    }

    /// After CONNECT or Upgrade: everything else from the sandbox goes up as it is.
    async fn raw(&mut self) -> Result<(), PumpError> {
        loop {
            let avail = self.fill().await?;
            if avail.is_empty() {
                return Ok(());
            }
            let chunk = avail.to_vec();
            self.r.consume(chunk.len());
            self.send(&chunk).await?;
        }
    }
}

/// Upstream -> sandbox, unchanged. Ends at the upstream's end of stream (closing the sandbox's
/// side cleanly only if the upstream closed cleanly), or when the sandbox stops reading.
pub(crate) async fn pump_down<R, W>(
    mut r: R,
    w: &tokio::sync::Mutex<W>,
    counters: &Counters,
) -> Result<(), io::Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => {
                let _ = w.lock().await.shutdown().await;
                return Ok(());
            }
            Ok(n) => n,
            // Upstream closed without close_notify: end without one too, so the sandbox sees the
            // same (possibly truncated) stream the upstream sent.
            Err(e) if eofish(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut w = w.lock().await;
        if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
            return Ok(()); // the sandbox went away; nothing to report
        }
        counters.down.fetch_add(n as u64, Ordering::Relaxed);
    }
}

pub(crate) struct Head {
    request_line: String,
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    fn values<'h>(&'h self, name: &'h str) -> impl Iterator<Item = &'h [u8]> + 'h {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

enum Framing {
    None,
    Length(u64),
    Chunked,
}

fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn parse_field(line: &[u8]) -> Result<(String, Vec<u8>), PumpError> {
    if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Err(bad(
            400,
            "obsolete line folding in a header field is not accepted",
        ));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| bad(400, "a header line has no colon"))?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(bad(400, "a header field name is empty or has characters other than token characters (no space before the colon)"));
    }
    let value = trim_ows(&line[colon + 1..]);
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(bad(
            400,
            "a header field value contains a control character",
        ));
    }
    // name is ASCII token characters only, so this cannot fail
    let name = String::from_utf8_lossy(name).into_owned();
    Ok((name, value.to_vec()))
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

pub(crate) fn parse_head(raw: &[u8]) -> Result<Head, PumpError> {
    let mut lines = raw.split_inclusive(|&b| b == b'\n').map(strip_eol);
    let first = lines.next().unwrap_or_default();
    if first.iter().any(|&b| (b < 0x21 && b != b' ') || b >= 0x7f) {
        return Err(bad(
            400,
            "the request line has control or non-ASCII characters",
        ));
    }
    let first = String::from_utf8_lossy(first).into_owned();
    let parts: Vec<&str> = first.split(' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return Err(bad(400, "the request line is not `METHOD TARGET HTTP/1.1`"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) || target.is_empty() {
        return Err(bad(400, "the request line is not `METHOD TARGET HTTP/1.1`"));
    }
    if *version != "HTTP/1.1" && *version != "HTTP/1.0" {
        return Err(bad(400, format!("{version} is not spoken here: only HTTP/1.1 (and 1.0) over an intercepted connection")));
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        headers.push(parse_field(line)?);
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        request_line: first.clone(),
        headers,
    })
}

fn framing(head: &Head) -> Result<Framing, PumpError> {
    if head.method == "CONNECT" {
        return Ok(Framing::None);
    }
    let te: Vec<&[u8]> = head.values("transfer-encoding").collect();
    let cl: Vec<&[u8]> = head.values("content-length").collect();
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err(bad(
                400,
                "a request with both Content-Length and Transfer-Encoding is refused",
            ));
        }
        if head.version != "HTTP/1.1" {
            return Err(bad(400, "Transfer-Encoding needs HTTP/1.1"));
        }
        let codings: Vec<String> = te
            .iter()
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|c| String::from_utf8_lossy(trim_ows(c)).to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect();
        let chunked_at: Vec<usize> = codings
            .iter()
            .enumerate()
            .filter(|(_, c)| *c == "chunked")
            .map(|(i, _)| i)
            .collect();
        if chunked_at.len() != 1 || chunked_at[0] + 1 != codings.len() {
            return Err(bad(
                501,
                "a request's Transfer-Encoding must end in chunked (once)",
            ));
        }
        return Ok(Framing::Chunked);
    }
    let mut length: Option<u64> = None;
    for part in cl.iter().flat_map(|v| v.split(|&b| b == b',')) {
        let part = trim_ows(part);
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(bad(400, "Content-Length is not a number"));
        }
        let n: u64 = String::from_utf8_lossy(part)
            .parse()
            .map_err(|_| bad(400, "Content-Length is not a number"))?;
        if length.is_some_and(|l| l != n) {
            return Err(bad(400, "Content-Length values differ"));
        }
        length = Some(n);
    }
    Ok(match length {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, PumpError> {
    let text = strip_eol(line);
    let size = text.split(|&b| b == b';').next().unwrap_or_default();
    let size = trim_ows(size);
    if size.is_empty() || size.len() > 15 || !size.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad(400, "a chunk size is not 1 to 15 hex digits"));
    }
    u64::from_str_radix(&String::from_utf8_lossy(size), 16)
        .map_err(|_| bad(400, "a chunk size is not hex"))
}

/// `https://HOST[:port]/...` or `http://...` -> the authority bytes.
fn absolute_authority(target: &[u8]) -> Option<&[u8]> {
    let lower = target.to_ascii_lowercase();
    let rest = if lower.starts_with(b"https://") {
        &target[8..]
    } else if lower.starts_with(b"http://") {
        &target[7..]
    } else {
        return None;
    };
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?' || b == b'#')
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Whether `authority` (`host`, `host:port`, `[v6]`, `[v6]:port`) names `host`. Any port is
/// accepted: the connection's identity is the TLS-verified host, whatever port it is on.
pub(crate) fn authority_is(authority: &[u8], host: &str) -> bool {
    let a = String::from_utf8_lossy(authority).to_ascii_lowercase();
    let (name, port) = if let Some(rest) = a.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, after)) => match after {
                "" => (inside, None),
                p => match p.strip_prefix(':') {
                    Some(port) => (inside, Some(port)),
                    None => return false,
                },
            },
            None => return false,
        }
    } else {
        match a.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (a.as_str(), None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        if p.parse::<u32>().map_or(true, |n| n == 0 || n > 65535) {
            return false;
        }
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty() && name == host
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority() {
        assert!(authority_is(b"up.test", "up.test"));
        assert!(authority_is(b"UP.test:443", "up.test"));
        assert!(authority_is(b"up.test.", "up.test"));
        assert!(authority_is(b"up.test:8443", "up.test"));
        assert!(!authority_is(b"up.test:", "up.test"));
        assert!(!authority_is(b"up.test:99999", "up.test"));
        assert!(!authority_is(b"evil.test", "up.test"));
        assert!(!authority_is(b"up.test.evil", "up.test"));
        assert!(!authority_is(b"up.test:443:443", "up.test"));
        assert!(authority_is(b"[::1]:443", "::1"));
        assert!(authority_is(b"[::1]", "::1"));
        assert!(!authority_is(b"[::1]x", "::1"));
        assert!(authority_is(b"127.0.0.1:443", "127.0.0.1"));
        assert!(!authority_is(b"", "up.test"));
    }

    #[test]
    fn replacing() {
        assert_eq!(replace_all(b"aXXbXX", b"XX", b"secret"), b"asecretbsecret");
        assert_eq!(replace_all(b"XXX", b"XX", b"y"), b"yX");
        assert!(!contains(b"abc", b""));
    }

    #[test]
    fn heads() {
        let h = parse_head(b"GET /a?b HTTP/1.1\r\nHost:  up.test \r\nX: 1\r\n\r\n").expect("head");
        assert_eq!(h.method, "GET");
        assert_eq!(h.header("host"), Some(&b"up.test"[..]));
        assert!(matches!(framing(&h), Ok(Framing::None)));
        for bad_head in [
            &b"GET /  HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/2\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\nnocolon\r\n\r\n",
        ] {
            assert!(
                parse_head(bad_head).is_err(),
                "{}",
                String::from_utf8_lossy(bad_head)
            );
        }
        let te_cl = parse_head(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .expect("head");
        assert!(framing(&te_cl).is_err());
        let te = parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .expect("head");
        assert!(matches!(framing(&te), Ok(Framing::Chunked)));
        let te_bad = parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n")
            .expect("head");
        assert!(framing(&te_bad).is_err());
        let cl2 = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n")
            .expect("head");
        assert!(framing(&cl2).is_err());
        let cl = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 7, 7\r\n\r\n").expect("head");
        assert!(matches!(framing(&cl), Ok(Framing::Length(7))));
        let neg = parse_head(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").expect("head");
        assert!(framing(&neg).is_err());
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a\r\n").ok(), Some(26));
        assert_eq!(parse_chunk_size(b"1A;ext=\"x\"\r\n").ok(), Some(26));
        assert_eq!(parse_chunk_size(b"0\r\n").ok(), Some(0));
        assert!(parse_chunk_size(b"\r\n").is_err());
        assert!(parse_chunk_size(b"-1\r\n").is_err());
        assert!(parse_chunk_size(b"0x10\r\n").is_err());
        assert!(parse_chunk_size(b"ffffffffffffffffff\r\n").is_err());
    }
}
