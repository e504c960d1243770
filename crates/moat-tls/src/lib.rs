//! moat-tls: TLS interception for egress secret injection.
#![forbid(unsafe_code)]

use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

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
    ClientHandshake { host: String, source: std::io::Error },
    /// The sandbox asked for a TLS server name other than the host it CONNECTed to.
    #[error("the sandbox asked for TLS server name {sni:?} on a connection to {host}; refusing to intercept (the server name must equal the CONNECT host)")]
    SniMismatch { host: String, sni: Option<String> },
    /// TLS with the real upstream failed (includes certificate verification failures).
    #[error("TLS handshake with upstream {host} failed: {source} (if it uses a private CA, give its PEM to the operator's upstream CA list)")]
    UpstreamHandshake { host: String, source: std::io::Error },
    /// A request named another host in its Host header (or absolute URL); it got a 421.
    #[error("a request on the intercepted connection to {host} named host {got:?}; answered 421 Misdirected Request (send requests for other hosts on their own connection)")]
    HostMismatch { host: String, got: String },
    /// The sandbox sent something that is not a well-formed HTTP/1.1 request; it got a 4xx.
    #[error("malformed HTTP/1.1 request to {host}: {reason}")]
    BadRequest { host: String, reason: String },
    /// Reading or writing one of the two connections failed mid-stream.
    #[error("relaying the intercepted connection to {host} failed: {source}")]
    Io { host: String, source: std::io::Error },
}

pub struct SandboxCa {}

impl SandboxCa {
    pub fn generate(_label: &str) -> Result<SandboxCa, TlsError> {
        Err(TlsError::Ca("not implemented yet".into()))
    }
    pub fn cert_pem(&self) -> String {
        String::new()
    }
}

#[derive(Debug, Clone)]
pub struct Injection {
    pub placeholder: String,
    pub value: String,
}

#[derive(Debug, Clone, Default)]
pub struct Intercepted {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub requests: u32,
}

pub fn upstream_config(_extra_roots_pem: &[String]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    Err(TlsError::Ca("not implemented yet".into()))
}

pub async fn intercept<C, U>(
    _client: C,
    _upstream: U,
    _host: &str,
    _ca: &SandboxCa,
    _injections: &[Injection],
    _upstream_tls: Arc<rustls::ClientConfig>,
) -> Result<Intercepted, TlsError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    Err(TlsError::Ca("not implemented yet".into()))
}
