//! The server name a TLS ClientHello asks for (RFC 8446 4.1.2, RFC 6066 3): read off the
//! first bytes a client sends into a spliced tunnel, so that a tunnel to an allowed host
//! cannot carry a handshake for another name (domain fronting).

/// What the first client bytes of a tunnel say.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Peek {
    /// Not a TLS handshake record: nothing to check.
    NotTls,
    /// A handshake record whose ClientHello has not all arrived yet.
    Incomplete,
    /// A ClientHello, with its server name if it has one.
    Hello(Option<String>),
    /// A handshake record that is not a well-formed ClientHello.
    Malformed,
}

/// Most bytes of a ClientHello this reads (a record is at most 16 KiB plus its header).
pub(crate) const MAX_HELLO: usize = 5 + (16 << 10);

struct R<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|s| s[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|s| (s[0] as usize) << 8 | s[1] as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|s| (s[0] as usize) << 16 | (s[1] as usize) << 8 | s[2] as usize)
    }
}

/// Looks at the first bytes of a tunnel.
pub(crate) fn peek(buf: &[u8]) -> Peek {
    let Some(&first) = buf.first() else {
        return Peek::Incomplete;
    };
    if first != 0x16 {
        return Peek::NotTls;
    }
    if buf.len() < 5 {
        return Peek::Incomplete;
    }
    let rec_len = (buf[3] as usize) << 8 | buf[4] as usize;
    if buf[1] != 3 || !(4..=16 << 10).contains(&rec_len) {
        return Peek::Malformed;
    }
    if buf.len() < 5 + rec_len {
        return Peek::Incomplete;
    }
    let rec = &buf[5..5 + rec_len];
    if rec[0] != 1 {
        return Peek::Malformed;
    }
    let hello_len = (rec[1] as usize) << 16 | (rec[2] as usize) << 8 | rec[3] as usize;
    // A ClientHello longer than its first record (rare: huge key shares) is judged on what
    // the first record holds; the server name extension comes early in practice, and a
    // missing one reads as no name.
    let body = &rec[4..rec.len().min(4 + hello_len)];
    match server_name(body) {
        Some(name) => Peek::Hello(name),
        None if 4 + hello_len > rec.len() => Peek::Hello(None),
        None => Peek::Malformed,
    }
}

/// The host_name of the server_name extension of a ClientHello body; `Some(None)` when
/// there is none, `None` when the body does not parse.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = R { b: body, at: 0 };
    r.take(2 + 32)?; // legacy_version, random
    let sid = r.u8()?;
    r.take(sid)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let comp = r.u8()?;
    r.take(comp)?;
    if r.at == body.len() {
        return Some(None);
    }
    let ext_len = r.u16()?;
    let exts = r.take(ext_len.min(body.len() - r.at))?;
    let mut e = R { b: exts, at: 0 };
    while e.at + 4 <= exts.len() {
        let kind = e.u16()?;
        let len = e.u16()?;
        let data = e.take(len)?;
        if kind != 0 {
            continue;
        }
        let mut s = R { b: data, at: 0 };
        let list = s.u16()?;
        let list = s.take(list)?;
        let mut l = R { b: list, at: 0 };
        while l.at < list.len() {
            let name_type = l.u8()?;
            let n = l.u16()?;
            let name = l.take(n)?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(Some(name.trim_end_matches('.').to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    let _ = e.u24();
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello record with `sni` (if any).
    fn hello(sni: Option<&str>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let n = name.as_bytes();
            let mut list = vec![0u8];
            list.extend((n.len() as u16).to_be_bytes());
            list.extend(n);
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            exts.extend([0, 0]);
            exts.extend((data.len() as u16).to_be_bytes());
            exts.extend(data);
        }
        // A second extension after it (supported_versions).
        exts.extend([0, 43, 0, 3, 2, 3, 4]);
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn server_names_are_read_and_everything_else_is_told_apart() {
        let h = hello(Some("Evil.Test."));
        assert_eq!(peek(&h), Peek::Hello(Some("evil.test".into())));
        assert_eq!(peek(&hello(None)), Peek::Hello(None));
        for cut in [1, 4, 5, 20, h.len() - 1] {
            assert_eq!(peek(&h[..cut]), Peek::Incomplete, "{cut}");
        }
        assert_eq!(peek(b"GET / HTTP/1.1\r\n"), Peek::NotTls);
        assert_eq!(peek(b"SSH-2.0-x"), Peek::NotTls);
        assert_eq!(peek(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]), Peek::Malformed);
        assert_eq!(peek(&[0x16, 9, 1, 0, 4, 1, 0, 0, 0]), Peek::Malformed);
        // Garbage after a valid header never panics.
        for n in 0..200u8 {
            let mut g = h.clone();
            let i = 9 + (n as usize * 7) % (h.len() - 9);
            g[i] ^= n | 1;
            let _ = peek(&g);
        }
    }
}
