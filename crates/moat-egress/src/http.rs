//! HTTP/1.x proxy requests: `CONNECT host:port` (a tunnel) and absolute-form requests
//! (`GET http://host/path`), which are forwarded in origin form with `Connection: close`
//! semantics: one request per client connection, so every request is decided on its own.

use std::time::Instant;

use moat_policy::egress::{parse_host, Host};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::io::{self, Conn, Metered, Stats};
use crate::{Attempt, Refusal, SandboxProxy};

/// The most a request or response head may take.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;

struct Request {
    method: String,
    target: String,
    minor: u8,
    headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    fn header_all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

/// A complete answer from the proxy itself.
fn answer(status: u16, phrase: &str, text: &str) -> Vec<u8> {
    let body = format!("moat egress: {text}\n");
    format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn answer_for(r: &Refusal) -> Vec<u8> {
    match r {
        Refusal::Denied { reason, .. } => answer(403, "Forbidden", &format!("denied: {reason}")),
        Refusal::Refused(reason) => answer(503, "Service Unavailable", reason),
        Refusal::Resolve { reason, .. } | Refusal::Connect { reason, .. } => {
            answer(502, "Bad Gateway", reason)
        }
    }
}

enum Head {
    /// The head's length in the buffer.
    Done(usize),
    /// The client went away before finishing it.
    Gone,
    /// Answer this status and reason.
    Bad(u16, &'static str, String),
}

async fn read_head<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Conn<S>) -> Head {
    let mut scanned = 0;
    loop {
        if c.buf()[scanned..].contains(&b'\n') {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(c.buf()) {
                Ok(httparse::Status::Complete(n)) => return Head::Done(n),
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => {
                    return Head::Bad(
                        431,
                        "Request Header Fields Too Large",
                        format!("more than {MAX_HEADERS} request headers"),
                    )
                }
                Err(e) => {
                    return Head::Bad(400, "Bad Request", format!("malformed HTTP request: {e}"))
                }
            }
        }
        scanned = c.buf().len();
        if scanned >= MAX_HEAD {
            return Head::Bad(
                431,
                "Request Header Fields Too Large",
                format!("the request head is larger than {MAX_HEAD} bytes"),
            );
        }
        match c.read_more().await {
            Ok(0) => return Head::Gone,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Head::Bad(
                    408,
                    "Request Timeout",
                    "the request head did not arrive in time".to_string(),
                )
            }
            Err(_) => return Head::Gone,
        }
    }
}

fn parse_request(buf: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(buf).ok()?;
    Some(Request {
        method: req.method?.to_string(),
        target: req.path?.to_string(),
        minor: req.version?,
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect(),
    })
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_authority(s: &str) -> Result<(Host, Option<u16>), String> {
    let bad = || format!("`{s}` is not host:port");
    let (h, p) = if s.starts_with('[') {
        let end = s.find(']').ok_or_else(bad)?;
        let (h, rest) = s.split_at(end + 1);
        match rest {
            "" => (h, None),
            r => (h, Some(r.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => return Err(bad()),
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match p {
        None => None,
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("port `{p}` in `{s}` is not a number"));
            }
            match p.parse::<u16>() {
                Ok(n) if n != 0 => Some(n),
                _ => return Err(format!("port `{p}` in `{s}` is not from 1 to 65535")),
            }
        }
    };
    Ok((parse_host(h)?, port))
}

/// Checks the Host header(s) against the target: one at most (required for plain HTTP/1.1
/// requests is not enforced; a missing one is added); same host; same port, where a Host
/// without a port means `default_port` (for CONNECT: the target's port).
fn check_host_header(
    req: &Request,
    host: &Host,
    port: u16,
    default_port: u16,
) -> Result<(), String> {
    let hs = req.header_all("host");
    match hs.as_slice() {
        [] => Ok(()),
        [one] => {
            let v = std::str::from_utf8(one)
                .map_err(|_| "the Host header is not valid text".to_string())?
                .trim();
            let shown = v.chars().take(200).collect::<String>();
            let target = match host {
                Host::Ip(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
                h => format!("{h}:{port}"),
            };
            let mismatch =
                || format!("Host header `{shown}` does not match the request target {target}");
            let (hh, hp) = split_authority(v).map_err(|_| mismatch())?;
            let same_host = match (&hh, host) {
                (Host::Ip(a), Host::Ip(b)) => a.to_canonical() == b.to_canonical(),
                (a, b) => a == b,
            };
            if !same_host || hp.unwrap_or(default_port) != port {
                return Err(mismatch());
            }
            Ok(())
        }
        _ => Err("more than one Host header".to_string()),
    }
}

pub(crate) async fn serve<S>(sp: &SandboxProxy, mut c: Conn<S>, over: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let start = Instant::now();
    let malformed = |reason: String| {
        Attempt {
            protocol: "http",
            host: String::new(),
            port: 0,
            start,
        }
        .refuse(sp, reason)
    };
    let n = match read_head(&mut c).await {
        Head::Done(n) => n,
        Head::Gone => return,
        Head::Bad(status, phrase, reason) => {
            let _ = c.write_all(&answer(status, phrase, &reason)).await;
            malformed(reason);
            return;
        }
    };
    let Some(req) = parse_request(&c.buf()[..n]) else {
        let reason = "malformed HTTP request".to_string();
        let _ = c.write_all(&answer(400, "Bad Request", &reason)).await;
        malformed(reason);
        return;
    };
    c.consume(n);
    if req.method.eq_ignore_ascii_case("CONNECT") {
        connect(sp, c, req, over, start).await
    } else {
        plain(sp, c, req, over, start).await
    }
}

impl Attempt {
    /// Reports a refusal that is not a policy denial.
    fn refuse(&self, sp: &SandboxProxy, reason: String) {
        sp.refused(self, &Refusal::Refused(reason));
    }
}

async fn connect<S>(sp: &SandboxProxy, mut c: Conn<S>, req: Request, over: bool, start: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let parsed = split_authority(&req.target);
    let (host, port) = match &parsed {
        Ok((h, Some(p))) => (h.clone(), *p),
        _ => {
            let reason = format!(
                "CONNECT needs a target host:port, got `{}`",
                req.target.chars().take(200).collect::<String>()
            );
            let _ = c.write_all(&answer(400, "Bad Request", &reason)).await;
            Attempt {
                protocol: "connect",
                host: req.target.chars().take(255).collect(),
                port: 0,
                start,
            }
            .refuse(sp, reason);
            return;
        }
    };
    let at = Attempt {
        protocol: "connect",
        host: host.to_string(),
        port,
        start,
    };
    // Some clients (Node's http, among others) send the proxy's own address as the Host of
    // a CONNECT; any other Host than that or the target is refused.
    let to_proxy = req.header_all("host").iter().all(|h| names_the_proxy(h));
    let host_check = match check_host_header(&req, &host, port, port) {
        Err(_) if to_proxy => Ok(()),
        r => r,
    };
    let Some((allowed, upstream, addr)) =
        admit(sp, &mut c, &at, (&host, port), host_check, over).await
    else {
        return;
    };
    if c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        sp.closed(
            &at,
            addr,
            &allowed.rule,
            &Stats::new(),
            Some("the client went away".into()),
            false,
            false,
        );
        return;
    }
    sp.tunnel(&at, &host, &allowed.rule, c.into_prefixed(), upstream, addr)
        .await;
}

/// The checks every proxied request passes, in order: its Host header (`host_check`), the
/// sandbox's connection and byte limits, the rules and the address guard, then the connect
/// to a checked address. On a refusal the client gets its answer, the attempt its event,
/// and `None` comes back.
async fn admit<S>(
    sp: &SandboxProxy,
    c: &mut Conn<S>,
    at: &Attempt,
    (host, port): (&Host, u16),
    host_check: Result<(), String>,
    over: bool,
) -> Option<(crate::Allowed, tokio::net::TcpStream, std::net::SocketAddr)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    if let Err(reason) = host_check {
        let _ = c.write_all(&answer(400, "Bad Request", &reason)).await;
        sp.refused(at, &Refusal::Denied { rule: None, reason });
        return None;
    }
    if let Some(r) = sp.limit_refusal(over) {
        let _ = c.write_all(&answer_for(&r)).await;
        sp.refused(at, &r);
        return None;
    }
    let allowed = match sp.check(host, port).await {
        Ok(a) => a,
        Err(r) => {
            let _ = c.write_all(&answer_for(&r)).await;
            sp.refused(at, &r);
            return None;
        }
    };
    match sp.connect(&allowed.addrs).await {
        Ok((upstream, addr)) => Some((allowed, upstream, addr)),
        Err(r) => {
            let _ = c.write_all(&answer_for(&r)).await;
            sp.refused_with_rule(at, &allowed.rule, &r);
            None
        }
    }
}

/// Whether a Host header value names the proxy itself (the sandbox's loopback port).
fn names_the_proxy(h: &[u8]) -> bool {
    let h = String::from_utf8_lossy(h).trim().to_ascii_lowercase();
    ["127.0.0.1", "localhost", "[::1]"].iter().any(|p| {
        h.strip_prefix(p)
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|port| port.parse::<u16>().is_ok())
    })
}

/// Splits `http://authority/path?q#frag` into the authority and the origin-form target.
fn split_url(target: &str) -> Result<(&str, String), String> {
    let shown: String = target.chars().take(200).collect();
    let scheme_end = target.find("://");
    let rest = match scheme_end {
        Some(i) if target[..i].eq_ignore_ascii_case("http") => &target[i + 3..],
        Some(i) if target[..i].eq_ignore_ascii_case("https") => {
            return Err(format!(
                "`{shown}`: https URLs go through a CONNECT tunnel (set HTTPS_PROXY), not as plain proxy requests"
            ))
        }
        Some(_) => return Err(format!("`{shown}`: only http:// URLs can be proxied as plain requests")),
        None if target.starts_with('/') || target == "*" => {
            return Err(format!(
                "`{shown}` is not a proxy request: this is moat's egress proxy; send absolute-form requests (GET http://host/path) or CONNECT host:port"
            ))
        }
        None => return Err(format!("`{shown}` is not an http:// URL")),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() {
        return Err(format!("`{shown}` names no host"));
    }
    if authority.contains('@') {
        return Err(format!(
            "`{shown}`: user information (`user@host`) in a proxied URL is refused"
        ));
    }
    let path = path.split('#').next().unwrap_or("");
    let origin = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Ok((authority, origin))
}

/// Comma-separated tokens of the Connection header(s), lowercased.
fn connection_tokens(req: &Request) -> Vec<String> {
    req.header_all("connection")
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The request as the upstream gets it: origin form, no Proxy-* or hop-by-hop headers,
/// `Connection: close` (or `Upgrade` for an upgrade request).
fn upstream_head(req: &Request, authority: &str, origin: &str) -> (Vec<u8>, bool) {
    let tokens = connection_tokens(req);
    let upgrade = tokens.iter().any(|t| t == "upgrade") && !req.header_all("upgrade").is_empty();
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(
        format!("{} {} HTTP/1.{}\r\n", req.method, origin, req.minor.min(1)).as_bytes(),
    );
    if req.header_all("host").is_empty() {
        out.extend_from_slice(format!("Host: {authority}\r\n").as_bytes());
    }
    for (name, value) in &req.headers {
        let lower = name.to_ascii_lowercase();
        let hop = lower.starts_with("proxy-")
            || lower == "connection"
            || lower == "keep-alive"
            || (lower == "upgrade" && !upgrade)
            || (lower != "upgrade" && tokens.contains(&lower));
        if hop {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if upgrade {
        b"Connection: Upgrade\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    (out, upgrade)
}

async fn plain<S>(sp: &SandboxProxy, mut c: Conn<S>, req: Request, over: bool, start: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let target = req.target.clone();
    let (authority, origin) = match split_url(&target) {
        Ok(x) => x,
        Err(reason) => {
            let _ = c.write_all(&answer(400, "Bad Request", &reason)).await;
            Attempt {
                protocol: "http",
                host: String::new(),
                port: 0,
                start,
            }
            .refuse(sp, reason);
            return;
        }
    };
    let (host, port) = match split_authority(authority) {
        Ok((h, p)) => (h, p.unwrap_or(80)),
        Err(reason) => {
            let _ = c.write_all(&answer(400, "Bad Request", &reason)).await;
            Attempt {
                protocol: "http",
                host: authority.chars().take(255).collect(),
                port: 0,
                start,
            }
            .refuse(sp, reason);
            return;
        }
    };
    let at = Attempt {
        protocol: "http",
        host: host.to_string(),
        port,
        start,
    };
    let host_check = check_host_header(&req, &host, port, 80);
    let Some((allowed, upstream, addr)) =
        admit(sp, &mut c, &at, (&host, port), host_check, over).await
    else {
        return;
    };
    let (head, _upgrade) = upstream_head(&req, authority, &origin);
    let head_req = req.method.eq_ignore_ascii_case("HEAD");
    let stats = Stats::new();
    let max = sp.cfg.max_bytes;
    let up = Metered::new(upstream, &stats, &sp.bytes, max);
    let client = c.into_prefixed();
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(up);
    let relay = async {
        if let Err(e) = uw.write_all(&head).await {
            let reason = format!("cannot send the request upstream: {e}");
            let _ = cw.write_all(&answer(502, "Bad Gateway", &reason)).await;
            return Err(reason);
        }
        let up_fut = async {
            let _ = copy(&mut cr, &mut uw, None).await;
            let _ = uw.flush().await;
        };
        let down_fut = response(&mut ur, &mut cw, head_req);
        tokio::pin!(up_fut);
        tokio::pin!(down_fut);
        let mut up_done = false;
        loop {
            tokio::select! {
                _ = &mut up_fut, if !up_done => up_done = true,
                r = &mut down_fut => return r,
            }
        }
    };
    let (res, cut) = io::with_idle(relay, &stats, sp.cfg.idle_timeout).await;
    let reason = match (cut, res) {
        (Some(c), _) => Some(c),
        (None, Some(Ok(()))) => stats.cut_reason(max),
        (None, Some(Err(e))) => Some(stats.cut_reason(max).unwrap_or(e)),
        (None, None) => None,
    };
    sp.closed(&at, addr, &allowed.rule, &stats, reason, false, false);
}

/// Copies until EOF or `limit` bytes, with a large buffer.
async fn copy<R, W>(r: &mut R, w: &mut W, limit: Option<u64>) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; io::BUF];
    let mut done = 0u64;
    loop {
        let want = match limit {
            Some(l) if done >= l => break,
            Some(l) => usize::try_from(l - done)
                .unwrap_or(usize::MAX)
                .min(buf.len()),
            None => buf.len(),
        };
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await?;
        done += n as u64;
    }
    w.flush().await?;
    Ok(done)
}

/// Relays the upstream's response: 1xx heads as they are, then the final head with
/// `Connection: close`, then its body (Content-Length bytes, or up to EOF).
async fn response<R, W>(ur: &mut R, cw: &mut W, head_req: bool) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut sent = false;
    let result: Result<(), (bool, String)> = async {
        loop {
            let (n, code, new_head, length) = loop {
                if buf.contains(&b'\n') {
                    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let mut resp = httparse::Response::new(&mut headers);
                    match resp.parse(&buf) {
                        Ok(httparse::Status::Complete(n)) => {
                            let code = resp.code.unwrap_or(0);
                            let (head, length) =
                                downstream_head(&resp, code, head_req).map_err(|e| (sent, e))?;
                            break (n, code, head, length);
                        }
                        Ok(httparse::Status::Partial) => {}
                        Err(e) => {
                            return Err((sent, format!("malformed response from upstream: {e}")))
                        }
                    }
                }
                if buf.len() >= MAX_HEAD {
                    return Err((
                        sent,
                        "the upstream's response head is too large".to_string(),
                    ));
                }
                let mut chunk = [0u8; 8192];
                let k = ur
                    .read(&mut chunk)
                    .await
                    .map_err(|e| (sent, format!("reading the upstream's response: {e}")))?;
                if k == 0 {
                    return Err((
                        sent,
                        "the upstream closed without a complete response".to_string(),
                    ));
                }
                buf.extend_from_slice(&chunk[..k]);
            };
            if (100..200).contains(&code) && code != 101 {
                cw.write_all(&buf[..n])
                    .await
                    .map_err(|e| (true, e.to_string()))?;
                sent = true;
                buf.drain(..n);
                continue;
            }
            if code == 101 {
                cw.write_all(&buf)
                    .await
                    .map_err(|e| (true, e.to_string()))?;
                copy(ur, cw, None)
                    .await
                    .map_err(|e| (true, e.to_string()))?;
                return Ok(());
            }
            cw.write_all(&new_head)
                .await
                .map_err(|e| (true, e.to_string()))?;
            sent = true;
            let body = &buf[n..];
            let first = match length {
                Some(l) => body.len().min(usize::try_from(l).unwrap_or(usize::MAX)),
                None => body.len(),
            };
            cw.write_all(&body[..first])
                .await
                .map_err(|e| (true, e.to_string()))?;
            let rest = length.map(|l| l - first as u64);
            copy(ur, cw, rest)
                .await
                .map_err(|e| (true, e.to_string()))?;
            let _ = cw.shutdown().await;
            return Ok(());
        }
    }
    .await;
    match result {
        Ok(()) => Ok(()),
        Err((sent, reason)) => {
            if !sent {
                let _ = cw.write_all(&answer(502, "Bad Gateway", &reason)).await;
            }
            let _ = cw.shutdown().await;
            Err(reason)
        }
    }
}

/// The final response head for the client: `Connection: close`, no Keep-Alive; and how many
/// body bytes follow (`None`: up to EOF).
fn downstream_head(
    resp: &httparse::Response<'_, '_>,
    code: u16,
    head_req: bool,
) -> Result<(Vec<u8>, Option<u64>), String> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(
        format!(
            "HTTP/1.{} {} {}\r\n",
            resp.version.unwrap_or(1).min(1),
            code,
            resp.reason.unwrap_or("")
        )
        .as_bytes(),
    );
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        let lower = h.name.to_ascii_lowercase();
        match lower.as_str() {
            "connection" | "keep-alive" | "proxy-connection" => continue,
            "content-length" => {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| "the upstream sent a bad Content-Length".to_string())?;
                if length.is_some_and(|l| l != v) {
                    return Err("the upstream sent conflicting Content-Length headers".to_string());
                }
                length = Some(v);
            }
            "transfer-encoding" => chunked = true,
            _ => {}
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    let body = if head_req || code == 204 || code == 304 {
        Some(0)
    } else if chunked {
        None
    } else {
        length
    };
    Ok((out, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://a.test/x?y#z"),
            Ok(("a.test", "/x?y".to_string()))
        );
        assert_eq!(split_url("HTTP://a.test"), Ok(("a.test", "/".to_string())));
        assert_eq!(
            split_url("http://a.test?q"),
            Ok(("a.test", "/?q".to_string()))
        );
        assert_eq!(
            split_url("http://[::1]:8080/p"),
            Ok(("[::1]:8080", "/p".to_string()))
        );
        assert!(split_url("http://good.test@evil.test/").is_err());
        assert!(split_url("https://a.test/").is_err());
        assert!(split_url("/x").is_err());
        assert!(split_url("ftp://a.test/").is_err());
        assert!(split_url("http:///x").is_err());
    }

    #[test]
    fn authorities() {
        assert_eq!(
            split_authority("A.test:80"),
            Ok((Host::Name("a.test".into()), Some(80)))
        );
        assert_eq!(
            split_authority("[::1]:443"),
            Ok((Host::Ip("::1".parse().expect("ip")), Some(443)))
        );
        assert_eq!(
            split_authority("a.test"),
            Ok((Host::Name("a.test".into()), None))
        );
        for bad in [
            "::1:443",
            "a.test:",
            "a.test:0",
            "a.test:99999",
            "[::1",
            "[::1]x",
            "a b:1",
            ":80",
        ] {
            assert!(split_authority(bad).is_err(), "{bad}");
        }
    }

    fn req(headers: &[(&str, &str)]) -> Request {
        Request {
            method: "GET".into(),
            target: "http://a.test/".into(),
            minor: 1,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn host_header() {
        let h = Host::Name("a.test".into());
        assert!(check_host_header(&req(&[]), &h, 80, 80).is_ok());
        assert!(check_host_header(&req(&[("Host", "a.test")]), &h, 80, 80).is_ok());
        assert!(check_host_header(&req(&[("host", "A.TEST:80")]), &h, 80, 80).is_ok());
        assert!(check_host_header(&req(&[("Host", "a.test")]), &h, 8080, 80).is_err());
        assert!(check_host_header(&req(&[("Host", "b.test")]), &h, 80, 80).is_err());
        assert!(
            check_host_header(&req(&[("Host", "a.test"), ("Host", "a.test")]), &h, 80, 80).is_err()
        );
        assert!(check_host_header(&req(&[("Host", "a.test:81")]), &h, 80, 80).is_err());
    }

    #[test]
    fn upstream_head_strips_proxy_and_hop_headers() {
        let r = req(&[
            ("Host", "a.test"),
            ("Proxy-Authorization", "Basic x"),
            ("Proxy-Connection", "keep-alive"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Accept", "*/*"),
        ]);
        let (h, upgrade) = upstream_head(&r, "a.test", "/");
        let s = String::from_utf8(h).expect("utf8");
        assert!(!upgrade);
        assert_eq!(
            s,
            "GET / HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let (h, _) = upstream_head(&req(&[]), "a.test:8080", "/x");
        let s = String::from_utf8(h).expect("utf8");
        assert!(
            s.starts_with("GET /x HTTP/1.1\r\nHost: a.test:8080\r\n"),
            "{s}"
        );
    }
}
