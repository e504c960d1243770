//! The egress proxy over real sockets on 127.0.0.1: upstream servers, a tiny DNS server and
//! the proxy itself all run in the test; nothing leaves loopback.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use moat_egress::{
    Cidr, ConnEvent, EgressSink, Operator, Proxy, Rules, SandboxEgress, SandboxProxy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const T: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Sink {
    events: Mutex<Vec<ConnEvent>>,
    limits: Mutex<Vec<String>>,
}

impl EgressSink for Sink {
    fn event(&self, e: ConnEvent) {
        self.events.lock().expect("lock").push(e);
    }
    fn denial_limit(&self, sandbox: &str) {
        self.limits.lock().expect("lock").push(sandbox.to_string());
    }
}

impl Sink {
    /// Waits until at least `n` events have arrived; returns them all.
    async fn wait(&self, n: usize) -> Vec<ConnEvent> {
        let deadline = Instant::now() + T;
        loop {
            let ev = self.events.lock().expect("lock").clone();
            if ev.len() >= n || Instant::now() > deadline {
                return ev;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    fn count(&self) -> usize {
        self.events.lock().expect("lock").len()
    }
}

struct Setup {
    allow: Vec<&'static str>,
    deny: Vec<&'static str>,
    op: Operator,
    max_connections: u32,
    max_bytes: u64,
    idle: Duration,
    max_denials: u32,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            allow: vec![],
            deny: vec![],
            op: loopback_op(),
            max_connections: 64,
            max_bytes: 0,
            idle: Duration::from_secs(30),
            max_denials: 0,
        }
    }
}

/// The operator settings tests use to reach upstreams on loopback: 127.0.0.0/8 let past the
/// forbidden check, `up.test` and `*.wild.test`-style names pinned to 127.0.0.1.
fn loopback_op() -> Operator {
    let mut hosts = BTreeMap::new();
    for n in [
        "up.test",
        "a.wild.test",
        "a.b.wild.test",
        "bad.wild.test",
        "wild.test",
        "evil-wild.test",
        "wild.test.evil.net",
        "other.test",
    ] {
        hosts.insert(n.to_string(), vec!["127.0.0.1".parse().expect("ip")]);
    }
    Operator {
        allow_cidrs: vec!["127.0.0.0/8".parse().expect("cidr")],
        hosts,
        nameservers: vec![],
        upstream_ca: vec![],
    }
}

struct Running {
    addr: SocketAddr,
    sp: Arc<SandboxProxy>,
    sink: Arc<Sink>,
}

async fn start(s: Setup) -> Result<Running> {
    let allow: Vec<String> = s.allow.iter().map(|x| x.to_string()).collect();
    let deny: Vec<String> = s.deny.iter().map(|x| x.to_string()).collect();
    let proxy = Proxy::new(s.op)?;
    let sink = Arc::new(Sink::default());
    let sp = proxy.sandbox(
        SandboxEgress {
            sandbox: "sb-test".into(),
            rules: Rules::parse(&allow, &deny)?,
            secrets: vec![],
            ca: None,
            max_connections: s.max_connections,
            max_bytes: s.max_bytes,
            idle_timeout: s.idle,
            max_denials: s.max_denials,
        },
        sink.clone(),
    );
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let sp2 = sp.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let sp = sp2.clone();
            tokio::spawn(async move { sp.serve(s).await });
        }
    });
    Ok(Running { addr, sp, sink })
}

/// An upstream that echoes what it reads.
async fn echo_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// An upstream that sends `n` bytes and then waits for the client to close.
async fn source_server(n: usize) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![7u8; 65536];
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len());
                    if s.write_all(&chunk[..k]).await.is_err() {
                        return;
                    }
                    left -= k;
                }
                let mut b = [0u8; 1];
                let _ = s.read(&mut b).await;
            });
        }
    });
    Ok(addr)
}

/// A listener that records whether anything ever connected.
async fn tripwire() -> Result<(SocketAddr, Arc<Mutex<u32>>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let hits = Arc::new(Mutex::new(0u32));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = l.accept().await {
            *h.lock().expect("lock") += 1;
        }
    });
    Ok((addr, hits))
}

/// An HTTP upstream: answers every request with its request head as the body (keep-alive,
/// to check that the proxy closes for it), and sends each head it got on the channel.
async fn http_server() -> Result<(SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i + 4]).to_string();
                        let _ = tx.send(head.clone());
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\nKeep-Alive: timeout=30\r\n\r\n{head}",
                            head.len()
                        );
                        let _ = s.write_all(resp.as_bytes()).await;
                        buf.drain(..i + 4);
                    }
                }
            });
        }
    });
    Ok((addr, rx))
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// A DNS server on 127.0.0.1 answering A/AAAA for the names given, NXDOMAIN for others.
async fn dns_server(names: &[(&str, &str)]) -> Result<SocketAddr> {
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = sock.local_addr()?;
    let map: BTreeMap<String, Vec<IpAddr>> =
        names.iter().fold(BTreeMap::new(), |mut m, (n, ip)| {
            m.entry(format!("{n}."))
                .or_insert_with(Vec::new)
                .push(ip.parse().expect("ip"));
            m
        });
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new();
            r.set_id(q.id())
                .set_message_type(MessageType::Response)
                .set_op_code(OpCode::Query)
                .set_recursion_desired(q.recursion_desired())
                .set_recursion_available(true)
                .set_authoritative(true);
            let mut known = false;
            for query in q.queries() {
                r.add_query(query.clone());
                let name = query.name().to_ascii().to_ascii_lowercase();
                if let Some(ips) = map.get(&name) {
                    known = true;
                    for ip in ips {
                        let rdata = match (ip, query.query_type()) {
                            (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                            _ => continue,
                        };
                        r.add_answer(Record::from_rdata(query.name().clone(), 60, rdata));
                    }
                }
            }
            if !known {
                r.set_response_code(ResponseCode::NXDomain);
            }
            if let Ok(out) = r.to_vec() {
                let _ = sock.send_to(&out, peer).await;
            }
        }
    });
    Ok(addr)
}

/// Reads an HTTP response head (and what follows in the same reads) from the proxy.
async fn read_head(s: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i + 4]).to_string();
            return Ok((head, buf[i + 4..].to_vec()));
        }
        let n = tokio::time::timeout(T, s.read(&mut chunk)).await??;
        if n == 0 {
            bail!(
                "EOF before a response head; got {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads to EOF.
async fn read_all(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut v)).await??;
    Ok(v)
}

/// Sends `req` to the proxy and returns the whole answer (the proxy closes after it).
async fn ask(proxy: SocketAddr, req: &str) -> Result<String> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(req.as_bytes()).await?;
    let v = read_all(&mut s).await?;
    Ok(String::from_utf8_lossy(&v).to_string())
}

async fn connect_req(proxy: SocketAddr, target: &str) -> Result<String> {
    ask(
        proxy,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
    )
    .await
}

fn last(ev: &[ConnEvent]) -> &ConnEvent {
    ev.last().expect("an event")
}

#[tokio::test]
async fn connect_allowed_splices_and_reports() -> Result<()> {
    let up = echo_server().await?;
    let r = start(Setup {
        allow: vec!["up.test"],
        ..Setup::default()
    })
    .await?;
    let mut s = TcpStream::connect(r.addr).await?;
    // The first payload bytes ride in the same write as the CONNECT head.
    let target = format!("up.test:{}", up.port());
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nearly").as_bytes())
        .await?;
    let (head, rest) = read_head(&mut s).await?;
    assert!(
        head.starts_with("HTTP/1.1 200 Connection established\r\n"),
        "{head}"
    );
    let mut got = rest;
    while got.len() < 5 {
        let mut b = [0u8; 64];
        let n = tokio::time::timeout(T, s.read(&mut b)).await??;
        assert!(n > 0);
        got.extend_from_slice(&b[..n]);
    }
    assert_eq!(got, b"early");
    let payload = vec![42u8; 300_000];
    s.write_all(&payload).await?;
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(T, s.read_exact(&mut back)).await??;
    assert_eq!(back, payload);
    assert_eq!(r.sp.open_connections(), 1);
    drop(s);
    let ev = r.sink.wait(1).await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    let e = &ev[0];
    assert_eq!(e.sandbox, "sb-test");
    assert_eq!(e.protocol, "connect");
    assert_eq!(e.host, "up.test");
    assert_eq!(e.port, up.port());
    assert_eq!(e.addr, Some(up));
    assert_eq!(e.decision, "allow");
    assert_eq!(e.rule.as_deref(), Some("up.test"));
    assert_eq!(e.reason, None);
    assert!(!e.intercepted);
    assert_eq!(e.bytes_up, 300_005);
    assert_eq!(e.bytes_down, 300_005);
    assert_eq!(r.sp.bytes(), 600_010);
    assert_eq!(r.sp.denials(), 0);
    // The event serializes with the agreed field names.
    let j = serde_json::to_value(e)?;
    for k in [
        "sandbox",
        "protocol",
        "host",
        "port",
        "addr",
        "decision",
        "rule",
        "reason",
        "intercepted",
        "bytes_up",
        "bytes_down",
        "duration_ms",
    ] {
        assert!(j.get(k).is_some(), "{k} in {j}");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(r.sp.open_connections(), 0);
    Ok(())
}

#[tokio::test]
async fn plain_http_is_rewritten_to_origin_form() -> Result<()> {
    let (up, mut heads) = http_server().await?;
    let r = start(Setup {
        allow: vec!["up.test"],
        ..Setup::default()
    })
    .await?;
    let port = up.port();
    let answer = ask(
        r.addr,
        &format!(
            "GET http://up.test:{port}/path/x?q=1 HTTP/1.1\r\nHost: up.test:{port}\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\nUser-Agent: t\r\n\r\n"
        ),
    )
    .await?;
    let head = tokio::time::timeout(T, heads.recv())
        .await?
        .context("upstream head")?;
    assert!(head.starts_with("GET /path/x?q=1 HTTP/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("Host: up.test:{port}\r\n")),
        "{head}"
    );
    assert!(head.contains("User-Agent: t\r\n"), "{head}");
    assert!(head.contains("Connection: close\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("proxy-"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("Connection: close\r\n"), "{answer}");
    assert!(!answer.contains("Keep-Alive"), "{answer}");
    assert!(answer.ends_with(&head), "{answer}");
    let ev = r.sink.wait(1).await;
    let e = last(&ev);
    assert_eq!((e.protocol, e.decision), ("http", "allow"));
    assert_eq!(e.host, "up.test");
    assert_eq!(e.port, port);
    assert_eq!(e.addr, Some(up));
    assert_eq!(e.reason, None, "{e:?}");
    assert!(e.bytes_up > 0 && e.bytes_down > e.bytes_up / 2, "{e:?}");

    // HTTP/1.0 without a Host header: the proxy adds one; a POST body goes through.
    let answer = ask(
        r.addr,
        &format!("POST http://up.test:{port} HTTP/1.0\r\nContent-Length: 4\r\n\r\nbody"),
    )
    .await?;
    let head = tokio::time::timeout(T, heads.recv())
        .await?
        .context("upstream head")?;
    assert!(head.starts_with("POST / HTTP/1.0\r\n"), "{head}");
    assert!(
        head.contains(&format!("Host: up.test:{port}\r\n")),
        "{head}"
    );
    assert!(
        answer.starts_with("HTTP/1.0 200 OK\r\n") || answer.starts_with("HTTP/1.1 200 OK\r\n"),
        "{answer}"
    );
    Ok(())
}

#[tokio::test]
async fn socks5_domain_ipv4_and_ipv6() -> Result<()> {
    let up = echo_server().await?;
    let mut op = loopback_op();
    op.allow_cidrs.push("::1/128".parse()?);
    let r = start(Setup {
        allow: vec!["up.test", "127.0.0.0/8", "[::1]"],
        op,
        ..Setup::default()
    })
    .await?;
    let port = up.port().to_be_bytes();
    // Domain.
    let mut req = vec![5, 1, 0, 3, 7];
    req.extend_from_slice(b"up.test");
    req.extend_from_slice(&port);
    socks_echo(r.addr, &req).await?;
    // IPv4.
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&port);
    socks_echo(r.addr, &req).await?;
    let ev = r.sink.wait(2).await;
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert!(
        ev.iter()
            .all(|e| e.protocol == "socks5" && e.decision == "allow"),
        "{ev:?}"
    );
    assert_eq!(ev[0].host, "up.test");
    assert_eq!(ev[0].rule.as_deref(), Some("up.test"));
    assert_eq!(ev[1].host, "127.0.0.1");
    assert_eq!(ev[1].rule.as_deref(), Some("127.0.0.0/8"));
    assert_eq!(ev[1].bytes_up, 5);
    // IPv6, where the host has ::1.
    if let Ok(l6) = TcpListener::bind("[::1]:0").await {
        let a6 = l6.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l6.accept().await {
                tokio::spawn(async move {
                    let (mut a, mut b) = s.split();
                    let _ = tokio::io::copy(&mut a, &mut b).await;
                });
            }
        });
        let mut req = vec![5, 1, 0, 4];
        req.extend_from_slice(&"::1".parse::<std::net::Ipv6Addr>()?.octets());
        req.extend_from_slice(&a6.port().to_be_bytes());
        socks_echo(r.addr, &req).await?;
        let ev = r.sink.wait(3).await;
        assert_eq!(last(&ev).host, "::1");
        assert_eq!(last(&ev).addr, Some(a6));
    } else {
        println!("skip: no IPv6 loopback here");
    }
    Ok(())
}

/// A SOCKS5 CONNECT that must succeed, then "hello" echoed.
async fn socks_echo(proxy: SocketAddr, req: &[u8]) -> Result<()> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut m = [0u8; 2];
    tokio::time::timeout(T, s.read_exact(&mut m)).await??;
    assert_eq!(m, [5, 0]);
    s.write_all(req).await?;
    let mut rep = [0u8; 10];
    tokio::time::timeout(T, s.read_exact(&mut rep)).await??;
    assert_eq!(rep, [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    s.write_all(b"hello").await?;
    let mut b = [0u8; 5];
    tokio::time::timeout(T, s.read_exact(&mut b)).await??;
    assert_eq!(&b, b"hello");
    Ok(())
}

/// The SOCKS5 reply code for a request.
async fn socks_code(proxy: SocketAddr, req: &[u8]) -> Result<u8> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut m = [0u8; 2];
    tokio::time::timeout(T, s.read_exact(&mut m)).await??;
    assert_eq!(m, [5, 0]);
    s.write_all(req).await?;
    let mut rep = [0u8; 10];
    tokio::time::timeout(T, s.read_exact(&mut rep)).await??;
    assert_eq!(rep[0], 5);
    Ok(rep[1])
}

fn socks_domain(cmd: u8, host: &str, port: u16) -> Vec<u8> {
    let mut v = vec![5, cmd, 0, 3, host.len() as u8];
    v.extend_from_slice(host.as_bytes());
    v.extend_from_slice(&port.to_be_bytes());
    v
}

#[tokio::test]
async fn socks5_refusals_have_their_codes() -> Result<()> {
    let (closed, _) = {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let a = l.local_addr()?;
        drop(l);
        (a, ())
    };
    let r = start(Setup {
        allow: vec!["up.test"],
        ..Setup::default()
    })
    .await?;
    assert_eq!(
        socks_code(r.addr, &socks_domain(1, "evil.test", 443)).await?,
        0x02
    );
    assert_eq!(
        socks_code(r.addr, &[5, 1, 0, 1, 10, 0, 0, 1, 0, 80]).await?,
        0x02
    );
    assert_eq!(
        socks_code(r.addr, &socks_domain(2, "up.test", 443)).await?,
        0x07
    );
    assert_eq!(
        socks_code(r.addr, &socks_domain(3, "up.test", 443)).await?,
        0x07
    );
    assert_eq!(
        socks_code(r.addr, &socks_domain(1, "up.test", closed.port())).await?,
        0x05
    );
    // Username/password only: no acceptable method.
    let mut s = TcpStream::connect(r.addr).await?;
    s.write_all(&[5, 1, 2]).await?;
    let mut m = [0u8; 2];
    tokio::time::timeout(T, s.read_exact(&mut m)).await??;
    assert_eq!(m, [5, 0xff]);
    let ev = r.sink.wait(5).await;
    assert_eq!(ev.len(), 5, "{ev:?}");
    assert_eq!(ev[0].decision, "deny");
    assert!(
        ev[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("not in the allowlist"),
        "{:?}",
        ev[0]
    );
    assert!(
        ev[1].reason.as_deref().unwrap_or("").contains("private"),
        "{:?}",
        ev[1]
    );
    assert!(
        ev[2].reason.as_deref().unwrap_or("").contains("command 2"),
        "{:?}",
        ev[2]
    );
    assert_eq!(ev[4].decision, "allow");
    assert_eq!(ev[4].rule.as_deref(), Some("up.test"));
    assert!(
        ev[4]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("cannot connect"),
        "{:?}",
        ev[4]
    );
    // Policy denials count; unsupported commands and failed connects do not.
    assert_eq!(r.sp.denials(), 2);
    Ok(())
}

#[tokio::test]
async fn denied_host_gets_403_naming_the_reason() -> Result<()> {
    let r = start(Setup {
        allow: vec!["up.test"],
        ..Setup::default()
    })
    .await?;
    let a = connect_req(r.addr, "evil.test:443").await?;
    assert!(a.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{a}");
    assert!(
        a.ends_with("moat egress: denied: host evil.test is not in the allowlist\n"),
        "{a}"
    );
    let a = ask(
        r.addr,
        "GET http://Evil.Test/x HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    )
    .await?;
    assert!(a.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{a}");
    assert!(
        a.contains("denied: host evil.test is not in the allowlist"),
        "{a}"
    );
    // A port the rule does not allow.
    let r2 = start(Setup {
        allow: vec!["up.test:443"],
        ..Setup::default()
    })
    .await?;
    let a = connect_req(r2.addr, "up.test:22").await?;
    assert!(a.contains("403") && a.contains("port 22"), "{a}");
    let ev = r.sink.wait(2).await;
    assert_eq!(ev.len(), 2);
    for (e, proto) in ev.iter().zip(["connect", "http"]) {
        assert_eq!(e.protocol, proto);
        assert_eq!(e.decision, "deny");
        assert_eq!(e.host, "evil.test");
        assert_eq!(e.addr, None);
        assert_eq!(e.rule, None);
        assert_eq!(e.bytes_up + e.bytes_down, 0);
    }
    assert_eq!(ev[0].port, 443);
    assert_eq!(ev[1].port, 80);
    assert_eq!(r.sp.denials(), 2);
    Ok(())
}

#[tokio::test]
async fn deny_beats_allow_and_wildcard_edges() -> Result<()> {
    let up = echo_server().await?;
    let r = start(Setup {
        allow: vec!["*.wild.test"],
        deny: vec!["bad.wild.test"],
        ..Setup::default()
    })
    .await?;
    let p = up.port();
    for ok in ["a.wild.test", "a.b.wild.test", "A.Wild.Test."] {
        let mut s = TcpStream::connect(r.addr).await?;
        s.write_all(format!("CONNECT {ok}:{p} HTTP/1.1\r\n\r\n").as_bytes())
            .await?;
        let (head, _) = read_head(&mut s).await?;
        assert!(head.starts_with("HTTP/1.1 200"), "{ok}: {head}");
    }
    let a = connect_req(r.addr, &format!("bad.wild.test:{p}")).await?;
    assert!(
        a.contains("403") && a.contains("denied by rule `bad.wild.test`"),
        "{a}"
    );
    for no in ["wild.test", "evil-wild.test", "wild.test.evil.net"] {
        let a = connect_req(r.addr, &format!("{no}:{p}")).await?;
        assert!(a.starts_with("HTTP/1.1 403"), "{no}: {a}");
        assert!(
            a.contains(&format!("host {no} is not in the allowlist")),
            "{no}: {a}"
        );
    }
    let ev = r.sink.wait(7).await;
    let denied: Vec<_> = ev.iter().filter(|e| e.decision == "deny").collect();
    assert_eq!(denied.len(), 4, "{ev:?}");
    assert_eq!(denied[0].rule.as_deref(), Some("bad.wild.test"));
    Ok(())
}

#[tokio::test]
async fn ip_literals_of_forbidden_classes_are_never_connected() -> Result<()> {
    let (trip, hits) = tripwire().await?;
    // Rules that allow every address: what refuses these is the forbidden check.
    let r = start(Setup {
        allow: vec!["0.0.0.0/0", "::/0"],
        op: Operator::default(),
        ..Setup::default()
    })
    .await?;
    let p = trip.port();
    for (target, class) in [
        (format!("127.0.0.1:{p}"), "a loopback address"),
        (format!("[::1]:{p}"), "a loopback address"),
        (format!("[::ffff:127.0.0.1]:{p}"), "a loopback address"),
        ("10.0.0.1:443".to_string(), "a private address"),
        ("169.254.169.254:80".to_string(), "a cloud metadata address"),
        ("100.64.0.1:443".to_string(), "a carrier-grade NAT"),
        ("[fd00:ec2::254]:80".to_string(), "a cloud metadata address"),
        ("0.0.0.0:80".to_string(), "an unspecified address"),
    ] {
        let t0 = Instant::now();
        let a = connect_req(r.addr, &target).await?;
        assert!(a.starts_with("HTTP/1.1 403"), "{target}: {a}");
        assert!(a.contains(class), "{target}: {a}");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{target} took {:?}",
            t0.elapsed()
        );
    }
    // Plain HTTP and SOCKS5 alike.
    let a = ask(
        r.addr,
        &format!("GET http://127.0.0.1:{p}/ HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n"),
    )
    .await?;
    assert!(a.contains("403") && a.contains("loopback"), "{a}");
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&p.to_be_bytes());
    assert_eq!(socks_code(r.addr, &req).await?, 0x02);
    let ev = r.sink.wait(10).await;
    assert_eq!(ev.len(), 10);
    assert!(
        ev.iter().all(|e| e.decision == "deny" && e.addr.is_none()),
        "{ev:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        *hits.lock().expect("lock"),
        0,
        "the proxy connected to a forbidden address"
    );
    // An IP literal that no CIDR rule allows is denied by the rules.
    let r = start(Setup {
        allow: vec!["up.test"],
        ..Setup::default()
    })
    .await?;
    let a = connect_req(r.addr, &format!("127.0.0.1:{p}")).await?;
    assert!(a.contains("only CIDR rules allow IP addresses"), "{a}");
    assert_eq!(*hits.lock().expect("lock"), 0);
    Ok(())
}

#[tokio::test]
async fn names_resolving_to_forbidden_addresses_are_denied() -> Result<()> {
    let up = echo_server().await?;
    let dns = dns_server(&[
        ("loop.test", "127.0.0.1"),
        ("priv.test", "10.1.2.3"),
        ("meta.test", "169.254.169.254"),
        ("six.test", "::1"),
        ("mixed.test", "192.168.0.1"),
        ("mixed.test", "127.0.0.1"),
    ])
    .await?;
    let p = up.port();
    let op = Operator {
        nameservers: vec![dns],
        ..Operator::default()
    };
    let r = start(Setup {
        allow: vec!["*.test"],
        op,
        ..Setup::default()
    })
    .await?;
    for (name, phrase) in [
        (
            "loop.test",
            "loop.test resolves to 127.0.0.1, a loopback address",
        ),
        (
            "priv.test",
            "priv.test resolves to 10.1.2.3, a private address",
        ),
        (
            "meta.test",
            "meta.test resolves to 169.254.169.254, a cloud metadata address",
        ),
        ("six.test", "six.test resolves to ::1, a loopback address"),
    ] {
        let a = connect_req(r.addr, &format!("{name}:{p}")).await?;
        assert!(a.starts_with("HTTP/1.1 403"), "{name}: {a}");
        assert!(a.contains(phrase), "{name}: {a}");
    }
    let a = connect_req(r.addr, &format!("nx.test:{p}")).await?;
    assert!(
        a.starts_with("HTTP/1.1 502") && a.contains("cannot resolve nx.test"),
        "{a}"
    );
    assert_eq!(
        socks_code(r.addr, &socks_domain(1, "nx.test", p)).await?,
        0x04
    );
    let ev = r.sink.wait(6).await;
    assert_eq!(ev.len(), 6);
    assert_eq!(r.sp.denials(), 4);
    for e in &ev[..4] {
        assert_eq!((e.decision, e.addr), ("deny", None), "{e:?}");
    }
    for e in &ev[4..] {
        assert_eq!(e.decision, "allow", "{e:?}");
        assert_eq!(e.rule.as_deref(), Some("*.test"), "{e:?}");
        assert!(
            e.reason.as_deref().unwrap_or("").contains("no such host"),
            "{e:?}"
        );
    }

    // With the operator's 127.0.0.0/8, the name the DNS gives 127.0.0.1 works; in a mixed
    // answer only the allowed address is used.
    let op = Operator {
        nameservers: vec![dns],
        allow_cidrs: vec!["127.0.0.0/8".parse::<Cidr>()?],
        ..Operator::default()
    };
    let r = start(Setup {
        allow: vec!["*.test"],
        op,
        ..Setup::default()
    })
    .await?;
    for name in ["loop.test", "mixed.test"] {
        let mut s = TcpStream::connect(r.addr).await?;
        s.write_all(format!("CONNECT {name}:{p} HTTP/1.1\r\n\r\nping").as_bytes())
            .await?;
        let (head, mut rest) = read_head(&mut s).await?;
        assert!(head.starts_with("HTTP/1.1 200"), "{name}: {head}");
        while rest.len() < 4 {
            let mut b = [0u8; 16];
            let n = tokio::time::timeout(T, s.read(&mut b)).await??;
            assert!(n > 0);
            rest.extend_from_slice(&b[..n]);
        }
        assert_eq!(rest, b"ping");
    }
    let ev = r.sink.wait(2).await;
    assert!(
        ev.iter()
            .all(|e| e.addr == Some(up) && e.decision == "allow"),
        "{ev:?}"
    );
    Ok(())
}

#[tokio::test]
async fn host_header_must_match_the_target() -> Result<()> {
    let (up, _heads) = http_server().await?;
    let p = up.port();
    let r = start(Setup {
        allow: vec!["up.test", "other.test"],
        ..Setup::default()
    })
    .await?;
    let a = ask(
        r.addr,
        &format!("GET http://up.test:{p}/ HTTP/1.1\r\nHost: other.test:{p}\r\n\r\n"),
    )
    .await?;
    assert!(a.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{a}");
    assert!(
        a.contains(&format!(
            "Host header `other.test:{p}` does not match the request target up.test:{p}"
        )),
        "{a}"
    );
    let a = ask(
        r.addr,
        &format!("GET http://up.test:{p}/ HTTP/1.1\r\nHost: up.test\r\n\r\n"),
    )
    .await?;
    assert!(
        a.starts_with("HTTP/1.1 400"),
        "a Host without the port means port 80: {a}"
    );
    let a = ask(
        r.addr,
        &format!("CONNECT up.test:{p} HTTP/1.1\r\nHost: other.test:{p}\r\n\r\n"),
    )
    .await?;
    assert!(
        a.starts_with("HTTP/1.1 400") && a.contains("does not match"),
        "{a}"
    );
    let a = ask(
        r.addr,
        &format!(
            "GET http://up.test:{p}/ HTTP/1.1\r\nHost: up.test:{p}\r\nHost: other.test\r\n\r\n"
        ),
    )
    .await?;
    assert!(
        a.starts_with("HTTP/1.1 400") && a.contains("more than one Host"),
        "{a}"
    );
    let a = ask(
        r.addr,
        &format!("GET http://other.test@up.test:{p}/ HTTP/1.1\r\n\r\n"),
    )
    .await?;
    assert!(
        a.starts_with("HTTP/1.1 400") && a.contains("user information"),
        "{a}"
    );
    let a = ask(r.addr, "GET /local HTTP/1.1\r\nHost: up.test\r\n\r\n").await?;
    assert!(
        a.starts_with("HTTP/1.1 400") && a.contains("absolute-form"),
        "{a}"
    );
    let a = ask(r.addr, "GARBAGE\r\n\r\n").await?;
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    let ev = r.sink.wait(7).await;
    assert_eq!(ev.len(), 7, "{ev:?}");
    assert!(ev.iter().all(|e| e.decision == "deny"), "{ev:?}");
    // The mismatches are denials; malformed requests are not.
    assert_eq!(r.sp.denials(), 4);
    Ok(())
}

#[tokio::test]
async fn max_connections_is_enforced() -> Result<()> {
    let up = echo_server().await?;
    let r = start(Setup {
        allow: vec!["up.test"],
        max_connections: 1,
        ..Setup::default()
    })
    .await?;
    let p = up.port();
    let mut first = TcpStream::connect(r.addr).await?;
    first
        .write_all(format!("CONNECT up.test:{p} HTTP/1.1\r\n\r\n").as_bytes())
        .await?;
    let (head, _) = read_head(&mut first).await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let a = connect_req(r.addr, &format!("up.test:{p}")).await?;
    assert!(a.starts_with("HTTP/1.1 503"), "{a}");
    assert!(a.contains("max_connections 1"), "{a}");
    assert_eq!(
        socks_code(r.addr, &socks_domain(1, "up.test", p)).await?,
        0x01
    );
    let ev = r.sink.wait(2).await;
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert!(
        ev.iter().all(|e| e.decision == "deny"
            && e.reason
                .as_deref()
                .unwrap_or("")
                .contains("max_connections")),
        "{ev:?}"
    );
    assert_eq!(r.sp.denials(), 0, "limit refusals are not policy denials");
    drop(first);
    let deadline = Instant::now() + T;
    while r.sp.open_connections() != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut again = TcpStream::connect(r.addr).await?;
    again
        .write_all(format!("CONNECT up.test:{p} HTTP/1.1\r\n\r\n").as_bytes())
        .await?;
    let (head, _) = read_head(&mut again).await?;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "a freed slot is usable again: {head}"
    );
    Ok(())
}

#[tokio::test]
async fn max_bytes_cuts_the_connection() -> Result<()> {
    let src = source_server(4 << 20).await?;
    let r = start(Setup {
        allow: vec!["up.test"],
        max_bytes: 200_000,
        ..Setup::default()
    })
    .await?;
    let mut s = TcpStream::connect(r.addr).await?;
    s.write_all(format!("CONNECT up.test:{} HTTP/1.1\r\n\r\n", src.port()).as_bytes())
        .await?;
    let (head, rest) = read_head(&mut s).await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let got = rest.len() + read_all(&mut s).await?.len();
    assert!(got >= 100_000, "got {got}");
    assert!(got < 200_000 + 2 * 65536, "got {got} past the budget");
    let ev = r.sink.wait(1).await;
    let e = last(&ev);
    assert_eq!(e.decision, "allow");
    assert!(
        e.reason
            .as_deref()
            .unwrap_or("")
            .contains("max_bytes 200000"),
        "{e:?}"
    );
    assert!(r.sp.bytes() >= 200_000);
    // The budget is spent: the next connection is refused.
    let a = connect_req(r.addr, &format!("up.test:{}", src.port())).await?;
    assert!(
        a.starts_with("HTTP/1.1 503") && a.contains("max_bytes"),
        "{a}"
    );
    Ok(())
}

#[tokio::test]
async fn idle_connections_are_closed() -> Result<()> {
    let up = echo_server().await?;
    let r = start(Setup {
        allow: vec!["up.test"],
        idle: Duration::from_millis(300),
        ..Setup::default()
    })
    .await?;
    let mut s = TcpStream::connect(r.addr).await?;
    s.write_all(format!("CONNECT up.test:{} HTTP/1.1\r\n\r\n", up.port()).as_bytes())
        .await?;
    let (head, _) = read_head(&mut s).await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Traffic keeps it open past the timeout.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        tokio::time::timeout(T, s.read_exact(&mut b)).await??;
    }
    let t0 = Instant::now();
    let rest = read_all(&mut s).await?;
    assert!(rest.is_empty());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let ev = r.sink.wait(1).await;
    let e = last(&ev);
    assert!(e.reason.as_deref().unwrap_or("").contains("idle"), "{e:?}");
    assert_eq!(e.bytes_up, 4);
    // A client that never sends a request head is dropped too.
    let mut s = TcpStream::connect(r.addr).await?;
    s.write_all(b"GET http://up.test/").await?;
    let a = read_all(&mut s).await?;
    assert!(String::from_utf8_lossy(&a).starts_with("HTTP/1.1 408"));
    Ok(())
}

#[tokio::test]
async fn denial_limit_fires_exactly_once() -> Result<()> {
    let r = start(Setup {
        allow: vec!["up.test"],
        max_denials: 3,
        ..Setup::default()
    })
    .await?;
    for i in 0..6 {
        let a = connect_req(r.addr, &format!("evil{i}.test:443")).await?;
        assert!(a.starts_with("HTTP/1.1 403"), "{a}");
        let limits = r.sink.limits.lock().expect("lock").clone();
        if i < 2 {
            assert!(limits.is_empty(), "after {} denials: {limits:?}", i + 1);
        } else {
            assert_eq!(
                limits,
                vec!["sb-test".to_string()],
                "after {} denials",
                i + 1
            );
        }
    }
    assert_eq!(r.sp.denials(), 6);
    assert_eq!(r.sink.count(), 6);
    // max_denials 0: never.
    let r = start(Setup {
        allow: vec!["up.test"],
        ..Setup::default()
    })
    .await?;
    for i in 0..5 {
        connect_req(r.addr, &format!("evil{i}.test:443")).await?;
    }
    assert!(r.sink.limits.lock().expect("lock").is_empty());
    Ok(())
}

#[tokio::test]
async fn connect_refused_upstream_is_502() -> Result<()> {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()?
    };
    let r = start(Setup {
        allow: vec!["up.test"],
        ..Setup::default()
    })
    .await?;
    let a = connect_req(r.addr, &format!("up.test:{}", closed.port())).await?;
    assert!(a.starts_with("HTTP/1.1 502"), "{a}");
    let ev = r.sink.wait(1).await;
    let e = last(&ev);
    assert_eq!(e.decision, "allow");
    assert_eq!(e.addr, Some(closed));
    assert!(
        e.reason.as_deref().unwrap_or("").contains("cannot connect"),
        "{e:?}"
    );
    assert_eq!(r.sp.denials(), 0);
    Ok(())
}

/// Throughput through a CONNECT tunnel; prints the rate. Asserted only loosely here (debug
/// builds and a shared machine); run with --release to see the real figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_throughput() -> Result<()> {
    let total: usize = 256 << 20;
    let src = source_server(total).await?;
    let r = start(Setup {
        allow: vec!["up.test"],
        ..Setup::default()
    })
    .await?;
    let mut s = TcpStream::connect(r.addr).await?;
    s.write_all(format!("CONNECT up.test:{} HTTP/1.1\r\n\r\n", src.port()).as_bytes())
        .await?;
    let (head, rest) = read_head(&mut s).await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let t0 = Instant::now();
    let mut got = rest.len();
    let mut buf = vec![0u8; 1 << 20];
    while got < total {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        got += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(got, total);
    let gbit = (total as f64 * 8.0) / secs / 1e9;
    println!("connect throughput: {gbit:.2} Gbit/s ({total} bytes in {secs:.2}s)");
    assert!(gbit > 0.2, "{gbit:.2} Gbit/s");
    Ok(())
}
