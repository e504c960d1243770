//! moat-tls: TLS interception for egress secret injection.
//!
//! A sandbox that is given a secret only ever sees a placeholder. When it opens a TLS connection
//! to a host the secret is bound to, the egress proxy hands the connection to [`intercept`]: the
//! sandbox's TLS is terminated with a leaf certificate from the sandbox's own [`SandboxCa`], a
//! verified TLS connection is made to the real host, and HTTP/1.1 requests are pumped through with
//! each placeholder replaced by the real value in request header values (never in the request
//! line or bodies). Responses pass through unchanged.
#![forbid(unsafe_code)]

mod ca;
mod http;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub use ca::{CaState, SandboxCa};

use http::{answer, Counters, Pump, PumpError};

/// ALPN: only HTTP/1.1 is spoken on an intercepted connection, on both sides.
const ALPN_HTTP11: &[u8] = b"http/1.1";
/// After a failed upstream handshake, wait this long for the sandbox's request to answer it 502.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Everything that can go wrong while setting up or running an interception.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Generating the sandbox CA or a leaf certificate failed.
    #[error("moat sandbox CA: {0}")]
    Ca(String),
    /// The upstream trust roots could not be built (bad PEM, no roots at all).
    #[error("upstream TLS trust: {0}")]
    Config(String),
    /// The sandbox's TLS handshake with us failed.
    #[error("TLS handshake with the sandbox for {host} failed: {source} (does the sandbox trust the moat CA certificate, and does it speak HTTP/1.1 over TLS?)")]
    ClientHandshake {
        host: String,
        source: std::io::Error,
    },
    /// The sandbox asked for a TLS server name other than the host it CONNECTed to.
    #[error("the sandbox asked for TLS server name {sni:?} on a connection to {host}; refusing to intercept (the server name must equal the CONNECT host)")]
    SniMismatch { host: String, sni: Option<String> },
    /// TLS with the real upstream failed (includes certificate verification failures).
    #[error("TLS handshake with upstream {host} failed: {source} (if it uses a private CA, give its PEM to the operator's upstream CA list)")]
    UpstreamHandshake {
        host: String,
        source: std::io::Error,
    },
    /// A request named another host in its Host header (or absolute URL); it got a 421.
    #[error("a request on the intercepted connection to {host} named host {got:?}; answered 421 Misdirected Request (send requests for other hosts on their own connection)")]
    HostMismatch { host: String, got: String },
    /// The sandbox sent something that is not a well-formed HTTP/1.1 request; it got a 4xx.
    #[error("malformed HTTP/1.1 request to {host}: {reason}")]
    BadRequest { host: String, reason: String },
    /// A secret's value cannot be put into a header (it has control characters); the request got
    /// a 500 and did not go upstream.
    #[error("cannot inject a secret into a request to {host}: {reason} (fix the secret's value)")]
    Injection { host: String, reason: String },
    /// Reading or writing one of the two connections failed mid-stream.
    #[error("relaying the intercepted connection to {host} failed: {source}")]
    Io {
        host: String,
        source: std::io::Error,
    },
}

/// A secret to inject: every occurrence of `placeholder` in a request header value becomes `value`.
#[derive(Clone)]
pub struct Injection {
    pub placeholder: String,
    pub value: String,
}

impl std::fmt::Debug for Injection {
    // The value is a secret: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injection")
            .field("placeholder", &self.placeholder)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// What an interception carried: plaintext bytes sent upstream (after injection) and sent to the
/// sandbox, and how many requests went upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Intercepted {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub requests: u32,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration for upstream connections: the system's roots (via
/// rustls-native-certs: `SSL_CERT_FILE`/`SSL_CERT_DIR`, else /etc/ssl/certs and friends) plus each
/// PEM in `extra_roots_pem` (each must hold at least one certificate). Unreadable system roots are
/// skipped; having no root at all is an error.
pub fn upstream_config(extra_roots_pem: &[String]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    for (i, pem) in extra_roots_pem.iter().enumerate() {
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| {
                TlsError::Config(format!("upstream CA PEM #{} does not parse: {e}", i + 1))
            })?;
            roots.add(cert).map_err(|e| {
                TlsError::Config(format!(
                    "upstream CA PEM #{} holds a certificate rustls cannot use as a root: {e}",
                    i + 1
                ))
            })?;
            found += 1;
        }
        if found == 0 {
            return Err(TlsError::Config(format!(
                "upstream CA PEM #{} holds no `-----BEGIN CERTIFICATE-----` block",
                i + 1
            )));
        }
    }
    if roots.is_empty() {
        return Err(TlsError::Config(
            "no trust roots: the system has none (install ca-certificates, or set SSL_CERT_FILE) and no upstream CA PEM was given".into(),
        ));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// `host` as compared everywhere: lowercase, no trailing dot, no brackets around IPv6.
fn normalize_host(host: &str) -> String {
    let h = host.trim();
    let h = h
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(h);
    let h = h.strip_suffix('.').unwrap_or(h);
    h.to_ascii_lowercase()
}

fn sni_ok(sni: Option<&str>, host: &str, host_is_ip: bool) -> bool {
    match sni {
        Some(s) => normalize_host(s) == host,
        // Clients send no SNI for IP literals (RFC 6066 3).
        None => host_is_ip,
    }
}

/// Hands out the leaf only when the ClientHello names the intercepted host.
#[derive(Debug)]
struct OneHost {
    host: String,
    host_is_ip: bool,
    key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for OneHost {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        sni_ok(hello.server_name(), &self.host, self.host_is_ip).then(|| self.key.clone())
    }
}

fn server_config(resolver: OneHost) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Ca(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// Intercepts one TLS connection from the sandbox (`client`, whose CONNECT named `host`) to the
/// already connected `upstream` socket for `host`.
///
/// 1. The sandbox's ClientHello must name `host` (no SNI is accepted only for an IP literal),
///    else [`TlsError::SniMismatch`] before anything is sent upstream. Only ALPN http/1.1.
/// 2. TLS to `upstream`, verifying `host` with `upstream_tls` (ALPN forced to http/1.1). On
///    failure the sandbox gets a 502 and [`TlsError::UpstreamHandshake`]; nothing was sent.
/// 3. Requests are pumped (keep-alive, Content-Length and chunked bodies streamed, `Expect:
///    100-continue` and Upgrade/CONNECT work, the latter going raw after the request). A Host
///    header (or absolute URL) naming another host gets a 421 and [`TlsError::HostMismatch`]; a
///    malformed request a 400/431/501 and [`TlsError::BadRequest`]. Placeholders are replaced in
///    header values (not in Host, not in the request line, not in bodies).
/// 4. Responses are copied upstream -> sandbox unchanged.
///
/// Returns when the upstream closes, or the sandbox has closed and the upstream has finished.
/// There is no timeout inside: the caller bounds idle time and total bytes.
pub async fn intercept<C, U>(
    client: C,
    upstream: U,
    host: &str,
    ca: &SandboxCa,
    injections: &[Injection],
    upstream_tls: Arc<rustls::ClientConfig>,
) -> Result<Intercepted, TlsError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let host = normalize_host(host);
    let host_is_ip = host.parse::<IpAddr>().is_ok();
    let client_err = |source: std::io::Error| TlsError::ClientHandshake {
        host: host.clone(),
        source,
    };

    // 1. The sandbox's side.
    let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client)
        .await
        .map_err(client_err)?;
    let sni = start.client_hello().server_name().map(|s| s.to_string());
    let key = ca.leaf(&host)?;
    let config = server_config(OneHost {
        host: host.clone(),
        host_is_ip,
        key,
    })?;
    if !sni_ok(sni.as_deref(), &host, host_is_ip) {
        // Let rustls refuse it (the resolver gives no certificate, the sandbox gets an alert).
        let _ = start.into_stream(config).await;
        return Err(TlsError::SniMismatch { host, sni });
    }
    let mut client_tls = start.into_stream(config).await.map_err(client_err)?;

    // 2. The upstream's side.
    let mut up_config = (*upstream_tls).clone();
    up_config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    let name = ServerName::try_from(host.clone()).map_err(|e| TlsError::UpstreamHandshake {
        host: host.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    let upstream_tls = match tokio_rustls::TlsConnector::from(Arc::new(up_config))
        .connect(name, upstream)
        .await
    {
        Ok(s) => s,
        Err(source) => {
            let msg = format!("TLS with upstream {host} failed: {source}");
            answer_after_head(&mut client_tls, &answer(502, &msg)).await;
            return Err(TlsError::UpstreamHandshake { host, source });
        }
    };

    // 3. and 4.
    let counters = Counters::default();
    let (cr, cw) = tokio::io::split(client_tls);
    let (ur, uw) = tokio::io::split(upstream_tls);
    let cw = tokio::sync::Mutex::new(cw);
    let mut down = Box::pin(http::pump_down(ur, &cw, &counters));
    let mut up = Box::pin(Pump::new(cr, uw, &host, injections, &counters).run());
    enum First<D, P> {
        Down(D),
        Up(P),
    }
    let first = tokio::select! {
        d = &mut down => First::Down(d),
        u = &mut up => First::Up(u),
    };
    let result = match first {
        First::Down(d) => {
            drop(up);
            d.map_err(|source| TlsError::Io {
                host: host.clone(),
                source,
            })
        }
        First::Up(Ok(())) => down.await.map_err(|source| TlsError::Io {
            host: host.clone(),
            source,
        }),
        First::Up(Err(e)) => {
            drop(down);
            drop(up);
            let (status, err) = match e {
                PumpError::Bad(status, reason) => (
                    Some((status, reason.clone())),
                    TlsError::BadRequest {
                        host: host.clone(),
                        reason,
                    },
                ),
                PumpError::HostMismatch(got) => (
                    Some((
                        421,
                        format!(
                            "this connection is intercepted for {host}; a request for {got} needs its own connection"
                        ),
                    )),
                    TlsError::HostMismatch {
                        host: host.clone(),
                        got,
                    },
                ),
                PumpError::Injection(reason) => (
                    Some((500, "a secret could not be injected into the request".to_string())),
                    TlsError::Injection {
                        host: host.clone(),
                        reason,
                    },
                ),
                PumpError::Io(source) => (
                    None,
                    TlsError::Io {
                        host: host.clone(),
                        source,
                    },
                ),
            };
            if let Some((status, message)) = status {
                let mut w = cw.lock().await;
                let _ = w.write_all(&answer(status, &message)).await;
                let _ = w.shutdown().await;
            }
            Err(err)
        }
    };
    result.map(|()| Intercepted {
        bytes_up: counters.up.load(Ordering::Relaxed),
        bytes_down: counters.down.load(Ordering::Relaxed),
        requests: counters.requests.load(Ordering::Relaxed),
    })
}

/// Reads (and discards) what the sandbox sends for a moment, so that a response to its first
/// request reaches it as a response, then answers and closes. Best effort.
async fn answer_after_head<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, response: &[u8]) {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(ANSWER_WAIT, async {
        while seen.len() < http::MAX_HEAD {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let _ = s.write_all(response).await;
    let _ = s.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_normalize() {
        assert_eq!(normalize_host("Up.Test."), "up.test");
        assert_eq!(normalize_host("[::1]"), "::1");
        assert!(sni_ok(Some("UP.test"), "up.test", false));
        assert!(!sni_ok(None, "up.test", false));
        assert!(sni_ok(None, "127.0.0.1", true));
        assert!(!sni_ok(Some("evil.test"), "127.0.0.1", true));
    }

    #[test]
    fn injection_debug_redacts() {
        let i = Injection {
            placeholder: "PH".into(),
            value: "hunter2".into(),
        };
        assert!(!format!("{i:?}").contains("hunter2"));
    }

    #[test]
    fn intercept_is_send() {
        fn is_send<T: Send>(_: T) {}
        let ca = SandboxCa::generate("send").expect("ca");
        let cfg = upstream_config(&[ca.cert_pem()]).expect("config");
        let (a, _) = tokio::io::duplex(16);
        let (b, _) = tokio::io::duplex(16);
        is_send(intercept(a, b, "x.test", &ca, &[], cfg));
    }

    #[test]
    fn bad_extra_roots() {
        assert!(upstream_config(&["not a pem".into()]).is_err());
        let ca = SandboxCa::generate("roots").expect("ca");
        assert!(upstream_config(&[ca.cert_pem()]).is_ok());
    }
}
