//! A CONNECT to a host a secret is bound to goes through `moat_tls::intercept`: the sandbox's
//! TLS ends at the proxy (a leaf from the sandbox CA), the placeholder in a header becomes the
//! secret, and the upstream (a test HTTPS server on 127.0.0.1 with its own CA, given as the
//! operator's upstream CA) sees the real value. Other hosts are spliced untouched.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use moat_egress::{ConnEvent, EgressSink, Operator, Proxy, Rules, SandboxEgress, Secret};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(20);
const PH: &str = "MOAT_PLACEHOLDER_test_0001";
const REAL: &str = "real-secret-Zq9";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Default)]
struct Sink {
    events: Mutex<Vec<ConnEvent>>,
}

impl EgressSink for Sink {
    fn event(&self, e: ConnEvent) {
        self.events.lock().expect("lock").push(e);
    }
    fn denial_limit(&self, _sandbox: &str) {}
}

impl Sink {
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
}

/// The upstream's CA (PEM) and a server config with a leaf for `names`.
fn upstream_tls(names: &[&str]) -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "egress test upstream CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = p.self_signed(&ca_key).expect("self-signed");
    let issuer = Issuer::new(p, ca_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let lp = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    let cert = lp.signed_by(&key, &issuer).expect("sign");
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der)
        .expect("server config");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca_cert.pem(), Arc::new(cfg))
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// An HTTPS upstream that answers each request with its head as the body.
async fn https_server(cfg: Arc<rustls::ServerConfig>) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acc = tokio_rustls::TlsAcceptor::from(cfg.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acc.accept(tcp).await else {
                    return;
                };
                let _ = answer_heads(&mut tls).await;
            });
        }
    });
    Ok(addr)
}

async fn answer_heads<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(i) = find(&buf, b"\r\n\r\n") {
            let head = buf[..i + 4].to_vec();
            buf.drain(..i + 4);
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", head.len());
            s.write_all(resp.as_bytes()).await?;
            s.write_all(&head).await?;
        }
    }
}

/// A TLS client config that trusts `ca_pem` only.
fn client_tls(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

async fn read_head(s: &mut TcpStream) -> Result<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while find(&buf, b"\r\n\r\n").is_none() {
        if tokio::time::timeout(T, s.read(&mut b)).await?? == 0 {
            bail!(
                "EOF in the CONNECT answer: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&buf).to_string())
}

/// One response read to its Content-Length end.
async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap_or(0))
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                return Ok(String::from_utf8_lossy(&buf[..i + 4 + len]).to_string());
            }
        }
        let n = tokio::time::timeout(T, s.read(&mut chunk)).await??;
        if n == 0 {
            bail!("EOF in a response: {:?}", String::from_utf8_lossy(&buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn secret_hosts_are_intercepted_and_get_the_secret() -> Result<()> {
    let (up_ca, server_cfg) = upstream_tls(&["up.test", "plain.test"]);
    let up = https_server(server_cfg).await?;
    let mut hosts = BTreeMap::new();
    hosts.insert("up.test".to_string(), vec!["127.0.0.1".parse()?]);
    hosts.insert("plain.test".to_string(), vec!["127.0.0.1".parse()?]);
    let proxy = Proxy::new(Operator {
        allow_cidrs: vec!["127.0.0.0/8".parse()?],
        hosts,
        nameservers: vec![],
        upstream_ca: vec![up_ca.clone()],
    })?;
    let ca = Arc::new(moat_tls::SandboxCa::generate("egress-test")?);
    let sink = Arc::new(Sink::default());
    let sp = proxy.sandbox(
        SandboxEgress {
            sandbox: "sb-i".into(),
            rules: Rules::parse(&["up.test".into(), "plain.test".into()], &[])?,
            secrets: vec![Secret {
                name: "API_KEY".into(),
                placeholder: PH.into(),
                value: REAL.into(),
                hosts: vec!["up.test".into()],
            }],
            ca: Some(ca.clone()),
            max_connections: 8,
            max_bytes: 0,
            idle_timeout: Duration::from_secs(30),
            max_denials: 0,
        },
        sink.clone(),
    );
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let paddr = l.local_addr()?;
    let sp2 = sp.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let sp = sp2.clone();
            tokio::spawn(async move { sp.serve(s).await });
        }
    });

    // The secret's host: TLS to the sandbox CA's leaf, placeholder replaced upstream.
    let mut s = TcpStream::connect(paddr).await?;
    s.write_all(
        format!(
            "CONNECT up.test:{} HTTP/1.1\r\nHost: up.test:{}\r\n\r\n",
            up.port(),
            up.port()
        )
        .as_bytes(),
    )
    .await?;
    let head = read_head(&mut s).await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let conn = tokio_rustls::TlsConnector::from(client_tls(&ca.cert_pem()));
    let mut tls = conn
        .connect(ServerName::try_from("up.test")?.to_owned(), s)
        .await?;
    tls.write_all(
        format!("GET /v1 HTTP/1.1\r\nHost: up.test\r\nAuthorization: Bearer {PH}\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let resp = read_response(&mut tls).await?;
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    assert!(
        resp.contains(&format!("Authorization: Bearer {REAL}")),
        "{resp}"
    );
    assert!(!resp.contains(PH), "{resp}");
    drop(tls);

    // Another host: spliced, so the sandbox sees the upstream's own certificate (and the
    // placeholder is not replaced).
    let mut s = TcpStream::connect(paddr).await?;
    s.write_all(format!("CONNECT plain.test:{} HTTP/1.1\r\n\r\n", up.port()).as_bytes())
        .await?;
    let head = read_head(&mut s).await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let conn = tokio_rustls::TlsConnector::from(client_tls(&up_ca));
    let mut tls = conn
        .connect(ServerName::try_from("plain.test")?.to_owned(), s)
        .await?;
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: plain.test\r\nAuthorization: Bearer {PH}\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let resp = read_response(&mut tls).await?;
    assert!(resp.contains(PH) && !resp.contains(REAL), "{resp}");
    drop(tls);

    // SNI other than the CONNECT host: refused, and a denial.
    let mut s = TcpStream::connect(paddr).await?;
    s.write_all(format!("CONNECT up.test:{} HTTP/1.1\r\n\r\n", up.port()).as_bytes())
        .await?;
    let head = read_head(&mut s).await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let conn = tokio_rustls::TlsConnector::from(client_tls(&ca.cert_pem()));
    let r = conn
        .connect(ServerName::try_from("plain.test")?.to_owned(), s)
        .await;
    assert!(
        r.is_err(),
        "a TLS session for another name through an intercepted tunnel"
    );

    let ev = sink.wait(3).await;
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert!(
        ev[0].intercepted && ev[0].decision == "allow",
        "{:?}",
        ev[0]
    );
    assert_eq!(ev[0].host, "up.test");
    assert!(ev[0].bytes_up > 0 && ev[0].bytes_down > 0, "{:?}", ev[0]);
    assert!(
        !ev[1].intercepted && ev[1].decision == "allow",
        "{:?}",
        ev[1]
    );
    assert!(ev[2].intercepted && ev[2].decision == "deny", "{:?}", ev[2]);
    assert!(
        ev[2]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("server name"),
        "{:?}",
        ev[2]
    );
    assert_eq!(sp.denials(), 1);
    Ok(())
}
