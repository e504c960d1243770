//! moat's egress proxy: one client byte stream per call, speaking HTTP CONNECT, plain HTTP
//! (absolute-form) or SOCKS5 (first byte `0x05`), each target decided by the sandbox's
//! [`Rules`], every resolved address checked with [`forbidden`] before the proxy connects to
//! exactly that address (no second lookup, so no DNS rebinding).
//!
//! The host side of the sandbox's proxy port: the agent relays each connection the workload
//! makes to `127.0.0.1:3128` inside the sandbox, and the daemon hands the stream to
//! [`SandboxProxy::serve`].

#![forbid(unsafe_code)]

mod http;
mod io;
mod sni;
mod socks;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use moat_policy::egress::{describe_class, forbidden, Decision, Host};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub use moat_policy::egress::{Cidr, Rules};

/// The operator's settings, the same for every sandbox of a daemon.
#[derive(Debug, Clone, Default)]
pub struct Operator {
    /// Ranges let past [`forbidden`] (`--egress-allow-cidr`); the sandbox's rules still
    /// decide.
    pub allow_cidrs: Vec<Cidr>,
    /// Pinned names (`--egress-host NAME=IP`): these resolve to these addresses, no DNS.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// DNS servers (`--egress-dns ADDR`); empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Extra PEM roots for upstream TLS on intercepted connections, besides the system's.
    pub upstream_ca: Vec<String>,
}

/// A secret bound to hosts: requests to them over an intercepted connection get
/// `placeholder` replaced by `value` in their header values.
#[derive(Clone)]
pub struct Secret {
    pub name: String,
    pub placeholder: String,
    pub value: String,
    /// Host patterns, rule syntax (`api.example.com`, `*.example.com`).
    pub hosts: Vec<String>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("placeholder", &self.placeholder)
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// One sandbox's egress settings.
#[derive(Clone)]
pub struct SandboxEgress {
    /// The sandbox id; goes into every event.
    pub sandbox: String,
    pub rules: Rules,
    pub secrets: Vec<Secret>,
    /// Some iff `secrets` is non-empty: the CA that signs the leaves of intercepted hosts.
    pub ca: Option<Arc<moat_tls::SandboxCa>>,
    /// Connections through the proxy at once (`0`: no limit).
    pub max_connections: u32,
    /// Bytes both ways over the sandbox's life (`0`: no limit).
    pub max_bytes: u64,
    /// A connection with no traffic either way for this long is closed (zero: never).
    pub idle_timeout: Duration,
    /// Denials after which the sink's `denial_limit` is called (`0`: never).
    pub max_denials: u32,
}

impl fmt::Debug for SandboxEgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxEgress")
            .field("sandbox", &self.sandbox)
            .field("rules", &self.rules)
            .field("secrets", &self.secrets)
            .field("ca", &self.ca.is_some())
            .field("max_connections", &self.max_connections)
            .field("max_bytes", &self.max_bytes)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_denials", &self.max_denials)
            .finish()
    }
}

/// One connection attempt (one request, for plain HTTP): denied ones are reported at once,
/// allowed ones when they close.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConnEvent {
    pub sandbox: String,
    /// `connect`, `http` or `socks5`.
    pub protocol: &'static str,
    /// The target host as the client named it (lowercased); empty when the request was
    /// too malformed to name one.
    pub host: String,
    pub port: u16,
    /// The address the proxy connected (or tried to connect) to.
    pub addr: Option<SocketAddr>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The rule that allowed or denied it.
    pub rule: Option<String>,
    /// Why it was denied, failed or was cut; `None` for an allowed connection that ended
    /// normally.
    pub reason: Option<String>,
    /// Whether TLS was terminated to inject secrets.
    pub intercepted: bool,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
}

/// Where a sandbox's events go.
pub trait EgressSink: Send + Sync {
    fn event(&self, e: ConnEvent);
    /// Called once, when the sandbox's denials reach its `max_denials`.
    fn denial_limit(&self, sandbox: &str);
}

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("egress proxy: cannot read the system DNS configuration: {0}; fix /etc/resolv.conf or name DNS servers for the proxy (--egress-dns ADDR)")]
    SystemDns(String),
    #[error("egress proxy: pinned host `{name}`: {why}; write NAME=IP with a host name such as `api.example.com`")]
    Pin { name: String, why: String },
}

/// The daemon's egress proxy: resolver and operator settings shared by all sandboxes.
pub struct Proxy {
    op: Operator,
    hosts: BTreeMap<String, Vec<IpAddr>>,
    resolver: TokioResolver,
    upstream_tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

impl Proxy {
    pub fn new(op: Operator) -> Result<Arc<Proxy>, EgressError> {
        let mut hosts = BTreeMap::new();
        for (name, ips) in &op.hosts {
            let n = moat_policy::egress::normalize_name(name).map_err(|why| EgressError::Pin {
                name: name.clone(),
                why,
            })?;
            hosts.insert(n, ips.clone());
        }
        let resolver = if op.nameservers.is_empty() {
            let mut b = TokioResolver::builder_tokio()
                .map_err(|e| EgressError::SystemDns(e.to_string()))?;
            tune(b.options_mut());
            b.build()
        } else {
            let mut cfg = ResolverConfig::new();
            for ns in &op.nameservers {
                cfg.add_name_server(NameServerConfig::new(*ns, Protocol::Udp));
                cfg.add_name_server(NameServerConfig::new(*ns, Protocol::Tcp));
            }
            let mut b = TokioResolver::builder_with_config(cfg, TokioConnectionProvider::default());
            tune(b.options_mut());
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b.build()
        };
        Ok(Arc::new(Proxy {
            op,
            hosts,
            resolver,
            upstream_tls: OnceLock::new(),
        }))
    }

    /// The proxy for one sandbox.
    pub fn sandbox(
        self: &Arc<Self>,
        cfg: SandboxEgress,
        sink: Arc<dyn EgressSink>,
    ) -> Arc<SandboxProxy> {
        Arc::new(SandboxProxy {
            proxy: Arc::clone(self),
            cfg,
            sink,
            denials: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            open: AtomicU32::new(0),
            limit_fired: AtomicBool::new(false),
        })
    }

    fn operator_allows(&self, ip: IpAddr) -> bool {
        self.op.allow_cidrs.iter().any(|c| c.contains(ip))
    }

    fn upstream_tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.upstream_tls
            .get_or_init(|| {
                moat_tls::upstream_config(&self.op.upstream_ca).map_err(|e| e.to_string())
            })
            .clone()
    }
}

fn tune(o: &mut ResolverOpts) {
    o.timeout = Duration::from_secs(5);
    o.attempts = 2;
    o.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    o.ndots = 0;
}

/// One sandbox's view of the proxy: its rules, limits, counters and event sink.
pub struct SandboxProxy {
    proxy: Arc<Proxy>,
    cfg: SandboxEgress,
    sink: Arc<dyn EgressSink>,
    denials: AtomicU64,
    bytes: AtomicU64,
    open: AtomicU32,
    limit_fired: AtomicBool,
}

/// Decrements the open-connection count when a `serve` ends.
struct OpenGuard<'a>(&'a AtomicU32);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a target was refused before any connection.
#[derive(Debug, Clone)]
pub(crate) enum Refusal {
    /// By the rules, a forbidden address, a Host mismatch: counts toward `max_denials`.
    Denied {
        rule: Option<String>,
        reason: String,
    },
    /// Refused but not a policy denial: max_connections, max_bytes, a malformed or
    /// unsupported request.
    Refused(String),
    /// The name (which `rule` allowed) does not resolve.
    Resolve { rule: String, reason: String },
    /// No address could be connected to; `refused`: the last one refused (else unreachable).
    Connect {
        addr: Option<SocketAddr>,
        reason: String,
        refused: bool,
    },
}

/// The outcome of a check: where to connect, with the rule that allowed it.
pub(crate) struct Allowed {
    pub rule: String,
    pub addrs: Vec<SocketAddr>,
}

/// What one attempt is, for its event.
pub(crate) struct Attempt {
    pub protocol: &'static str,
    pub host: String,
    pub port: u16,
    pub start: Instant,
}

impl SandboxProxy {
    /// Serves one client connection until it ends. Never fails: what goes wrong is answered
    /// to the client and reported as an event.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self: &Arc<Self>,
        client: S,
    ) {
        let n = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        let _guard = OpenGuard(&self.open);
        let over = self.cfg.max_connections != 0 && n > self.cfg.max_connections;
        let mut conn = io::Conn::new(client, self.handshake_timeout());
        match conn.fill(1).await {
            Ok(true) => {}
            _ => return,
        }
        if conn.buf()[0] == 0x05 {
            socks::serve(self, conn, over).await
        } else {
            http::serve(self, conn, over).await
        }
    }

    /// Denials so far (rule denials, forbidden addresses, Host or SNI mismatches).
    pub fn denials(&self) -> u64 {
        self.denials.load(Ordering::SeqCst)
    }

    /// Bytes through the proxy so far, both ways, all connections.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Client connections being served now.
    pub fn open_connections(&self) -> u32 {
        self.open.load(Ordering::SeqCst)
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        if self.cfg.idle_timeout.is_zero() {
            Duration::from_secs(60)
        } else {
            self.cfg.idle_timeout
        }
    }

    pub(crate) fn limit_refusal(&self, over: bool) -> Option<Refusal> {
        if over {
            return Some(Refusal::Refused(format!(
                "too many connections through the proxy at once (max_connections {})",
                self.cfg.max_connections
            )));
        }
        if self.cfg.max_bytes != 0 && self.bytes() >= self.cfg.max_bytes {
            return Some(Refusal::Refused(format!(
                "the sandbox's egress byte budget is spent (max_bytes {})",
                self.cfg.max_bytes
            )));
        }
        None
    }

    /// Decides a target and resolves it to checked addresses. No DNS query for a name the
    /// rules do not allow.
    pub(crate) async fn check(&self, host: &Host, port: u16) -> Result<Allowed, Refusal> {
        match host {
            Host::Ip(ip) => {
                let ip = ip.to_canonical();
                if !self.proxy.operator_allows(ip) {
                    if let Some(class) = forbidden(ip) {
                        return Err(Refusal::Denied {
                            rule: None,
                            reason: format!("{ip} is {}", describe_class(class)),
                        });
                    }
                }
                match self.cfg.rules.decide_ip(ip, port) {
                    Decision::Allow { rule } => Ok(Allowed {
                        rule,
                        addrs: vec![SocketAddr::new(ip, port)],
                    }),
                    Decision::Deny { rule, reason } => Err(Refusal::Denied { rule, reason }),
                }
            }
            Host::Name(name) => {
                let rule = match self.cfg.rules.decide_name(name, port) {
                    Decision::Allow { rule } => rule,
                    Decision::Deny { rule, reason } => {
                        return Err(Refusal::Denied { rule, reason })
                    }
                };
                let ips = self
                    .resolve(name)
                    .await
                    .map_err(|reason| Refusal::Resolve {
                        rule: rule.clone(),
                        reason,
                    })?;
                let mut addrs: Vec<SocketAddr> = Vec::new();
                let mut first_refusal: Option<Refusal> = None;
                for ip in ips {
                    let ip = ip.to_canonical();
                    if let Some(r) = self.cfg.rules.denied_ip(ip, port) {
                        first_refusal.get_or_insert(Refusal::Denied {
                            reason: format!("{name} resolves to {ip}, denied by rule `{r}`"),
                            rule: Some(r),
                        });
                        continue;
                    }
                    if !self.proxy.operator_allows(ip) {
                        if let Some(class) = forbidden(ip) {
                            first_refusal.get_or_insert(Refusal::Denied {
                                rule: None,
                                reason: format!(
                                    "{name} resolves to {ip}, {}",
                                    describe_class(class)
                                ),
                            });
                            continue;
                        }
                    }
                    let a = SocketAddr::new(ip, port);
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
                if addrs.is_empty() {
                    return Err(first_refusal.unwrap_or_else(|| Refusal::Resolve {
                        rule: rule.clone(),
                        reason: format!("{name} has no address"),
                    }));
                }
                Ok(Allowed { rule, addrs })
            }
        }
    }

    async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        if let Some(ips) = self.proxy.hosts.get(name) {
            return Ok(ips.clone());
        }
        // Fully qualified: the name the rules checked is the name looked up (no search
        // domains appended).
        let fqdn = format!("{name}.");
        match self.proxy.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(l) => Ok(l.iter().collect()),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                Err(format!("cannot resolve {name}: no such host"))
            }
            Err(e) => Err(format!("cannot resolve {name}: {e}")),
        }
    }

    /// Connects to the first checked address that answers.
    pub(crate) async fn connect(
        &self,
        addrs: &[SocketAddr],
    ) -> Result<(TcpStream, SocketAddr), Refusal> {
        let t = self.handshake_timeout().min(Duration::from_secs(10));
        let mut last: Option<(SocketAddr, String, bool)> = None;
        for &a in addrs {
            match tokio::time::timeout(t, TcpStream::connect(a)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok((s, a));
                }
                Ok(Err(e)) => {
                    let refused = e.kind() == std::io::ErrorKind::ConnectionRefused;
                    last = Some((a, e.to_string(), refused));
                }
                Err(_) => last = Some((a, format!("no answer within {}s", t.as_secs()), false)),
            }
        }
        let (addr, why, refused) = last
            .map_or((None, "no address".to_string(), false), |(a, w, r)| {
                (Some(a), w, r)
            });
        Err(Refusal::Connect {
            reason: match addr {
                Some(a) => format!("cannot connect to {a}: {why}"),
                None => format!("cannot connect: {why}"),
            },
            addr,
            refused,
        })
    }

    /// Reports a refused attempt; a denial also counts toward `max_denials`.
    pub(crate) fn refused(&self, at: &Attempt, r: &Refusal) {
        let (decision, rule, reason, addr) = match r {
            Refusal::Denied { rule, reason } => ("deny", rule.clone(), reason.clone(), None),
            Refusal::Refused(reason) => ("deny", None, reason.clone(), None),
            Refusal::Resolve { rule, reason } => {
                ("allow", Some(rule.clone()), reason.clone(), None)
            }
            Refusal::Connect { addr, reason, .. } => ("allow", None, reason.clone(), *addr),
        };
        self.emit(ConnEvent {
            sandbox: self.cfg.sandbox.clone(),
            protocol: at.protocol,
            host: at.host.clone(),
            port: at.port,
            addr,
            decision,
            rule,
            reason: Some(reason),
            intercepted: false,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: ms(at.start.elapsed()),
        });
        if matches!(r, Refusal::Denied { .. }) {
            self.count_denial();
        }
    }

    /// Reports an attempt with its rule for Resolve/Connect failures (which the rules allowed).
    pub(crate) fn refused_with_rule(&self, at: &Attempt, rule: &str, r: &Refusal) {
        let (reason, addr) = match r {
            Refusal::Resolve { reason, .. } => (reason.clone(), None),
            Refusal::Connect { addr, reason, .. } => (reason.clone(), *addr),
            other => return self.refused(at, other),
        };
        self.emit(ConnEvent {
            sandbox: self.cfg.sandbox.clone(),
            protocol: at.protocol,
            host: at.host.clone(),
            port: at.port,
            addr,
            decision: "allow",
            rule: Some(rule.to_string()),
            reason: Some(reason),
            intercepted: false,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: ms(at.start.elapsed()),
        });
    }

    /// Reports a connection that was allowed and has ended.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn closed(
        &self,
        at: &Attempt,
        addr: SocketAddr,
        rule: &str,
        stats: &io::Stats,
        reason: Option<String>,
        intercepted: bool,
        denied: bool,
    ) {
        self.emit(ConnEvent {
            sandbox: self.cfg.sandbox.clone(),
            protocol: at.protocol,
            host: at.host.clone(),
            port: at.port,
            addr: Some(addr),
            decision: if denied { "deny" } else { "allow" },
            rule: Some(rule.to_string()),
            reason,
            intercepted,
            bytes_up: stats.up(),
            bytes_down: stats.down(),
            duration_ms: ms(at.start.elapsed()),
        });
        if denied {
            self.count_denial();
        }
    }

    pub(crate) fn emit(&self, e: ConnEvent) {
        self.sink.event(e);
    }

    pub(crate) fn count_denial(&self) {
        let n = self.denials.fetch_add(1, Ordering::SeqCst) + 1;
        let max = u64::from(self.cfg.max_denials);
        if max != 0 && n >= max && !self.limit_fired.swap(true, Ordering::SeqCst) {
            self.sink.denial_limit(&self.cfg.sandbox);
        }
    }

    /// The injections for `host` when its connection is to be intercepted.
    pub(crate) fn interception(
        &self,
        host: &Host,
    ) -> Option<(Arc<moat_tls::SandboxCa>, Vec<moat_tls::Injection>)> {
        let ca = self.cfg.ca.as_ref()?;
        let h = host.to_string();
        let inj: Vec<moat_tls::Injection> = self
            .cfg
            .secrets
            .iter()
            .filter(|s| Rules::matches_any(&s.hosts, &h))
            .map(|s| moat_tls::Injection {
                placeholder: s.placeholder.clone(),
                value: s.value.clone(),
            })
            .collect();
        if inj.is_empty() {
            None
        } else {
            Some((Arc::clone(ca), inj))
        }
    }

    /// Relays an established tunnel (CONNECT or SOCKS5): spliced, or intercepted when a secret
    /// is bound to the host. Reports the event when it ends.
    pub(crate) async fn tunnel<C>(
        &self,
        at: &Attempt,
        host: &Host,
        rule: &str,
        client: C,
        upstream: TcpStream,
        addr: SocketAddr,
    ) where
        C: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let stats = io::Stats::new();
        let mut up = io::Metered::new(upstream, &stats, &self.bytes, self.cfg.max_bytes);
        if let Some((ca, inj)) = self.interception(host) {
            let tls = match self.proxy.upstream_tls() {
                Ok(t) => t,
                Err(e) => {
                    let reason = format!("cannot intercept for secrets: {e}");
                    self.closed(at, addr, rule, &stats, Some(reason), true, false);
                    return;
                }
            };
            let h = host.to_string();
            let fut = moat_tls::intercept(client, &mut up, &h, &ca, &inj, tls);
            let (res, cut) = io::with_idle(fut, &stats, self.cfg.idle_timeout).await;
            let (reason, denied) = match (cut, res) {
                (Some(c), _) => (Some(c), false),
                (None, Some(Ok(_))) => (stats.cut_reason(self.cfg.max_bytes), false),
                (None, Some(Err(e))) => {
                    let denied = matches!(
                        e,
                        moat_tls::TlsError::SniMismatch { .. }
                            | moat_tls::TlsError::HostMismatch { .. }
                    );
                    let reason = stats
                        .cut_reason(self.cfg.max_bytes)
                        .unwrap_or_else(|| e.to_string());
                    (Some(reason), denied)
                }
                (None, None) => (None, false),
            };
            self.closed(at, addr, rule, &stats, reason, true, denied);
            return;
        }
        let mut client = client;
        // A tunnel to a name carries a handshake for that name only: its ClientHello's
        // server name, when it has one, must be the CONNECT target (no domain fronting).
        if let Host::Name(name) = host {
            match first_bytes_for(&mut client, name).await {
                Ok(first) => {
                    if !first.is_empty() {
                        use tokio::io::AsyncWriteExt;
                        if let Err(e) = up.write_all(&first).await {
                            let reason = format!("relay ended: {e}");
                            self.closed(at, addr, rule, &stats, Some(reason), false, false);
                            return;
                        }
                    }
                }
                Err(reason) => {
                    self.closed(at, addr, rule, &stats, Some(reason), false, true);
                    return;
                }
            }
        }
        let fut = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut up, io::BUF, io::BUF);
        let (res, cut) = io::with_idle(fut, &stats, self.cfg.idle_timeout).await;
        let reason = match (cut, res) {
            (Some(c), _) => Some(c),
            (None, Some(Ok(_))) => stats.cut_reason(self.cfg.max_bytes),
            (None, Some(Err(e))) => Some(
                stats
                    .cut_reason(self.cfg.max_bytes)
                    .unwrap_or_else(|| format!("relay ended: {e}")),
            ),
            (None, None) => None,
        };
        self.closed(at, addr, rule, &stats, reason, false, false);
    }
}

/// How long a tunnel waits for the client's first bytes before it takes the protocol for
/// one where the server speaks first (nothing to check then).
const FIRST_BYTES_WAIT: Duration = Duration::from_millis(500);
/// How long the rest of a ClientHello may take once it began.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// Reads the client's first bytes of a tunnel to `name`: Err (the reason) when they are a
/// TLS ClientHello for another server name; else the bytes, to be sent on upstream.
async fn first_bytes_for<C: AsyncRead + Unpin>(
    client: &mut C,
    name: &str,
) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = vec![0u8; 4096];
    let mut wait = FIRST_BYTES_WAIT;
    loop {
        let n = match tokio::time::timeout(wait, client.read(&mut chunk)).await {
            Err(_) if buf.is_empty() => return Ok(buf),
            Err(_) => return Err("the TLS ClientHello did not arrive in time".into()),
            Ok(Ok(0)) => return Ok(buf),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(format!("relay ended: {e}")),
        };
        buf.extend_from_slice(&chunk[..n]);
        wait = HELLO_WAIT;
        match sni::peek(&buf) {
            sni::Peek::Incomplete if buf.len() < sni::MAX_HELLO => continue,
            sni::Peek::Hello(Some(sni)) if sni != name => {
                return Err(format!(
                    "TLS server name {sni} does not match the CONNECT target {name}"
                ))
            }
            _ => return Ok(buf),
        }
    }
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_builds_outside_a_runtime() {
        let op = Operator {
            nameservers: vec!["127.0.0.1:53".parse().expect("addr")],
            ..Operator::default()
        };
        assert!(Proxy::new(op).is_ok());
        // The system configuration as well, where this host has one.
        if std::path::Path::new("/etc/resolv.conf").exists() {
            if let Err(e) = Proxy::new(Operator::default()) {
                assert!(e.to_string().contains("--egress-dns"), "{e}");
            }
        }
    }

    #[test]
    fn pins_are_normalized_and_checked() {
        let mut op = Operator {
            nameservers: vec!["127.0.0.1:53".parse().expect("addr")],
            ..Operator::default()
        };
        op.hosts
            .insert("Up.Test.".into(), vec!["127.0.0.1".parse().expect("ip")]);
        let p = Proxy::new(op.clone()).expect("proxy");
        assert!(p.hosts.contains_key("up.test"));
        op.hosts.insert("bad name".into(), vec![]);
        let e = Proxy::new(op).err().expect("an error");
        assert!(e.to_string().contains("NAME=IP"), "{e}");
    }

    #[test]
    fn secrets_do_not_print_their_value() {
        let s = Secret {
            name: "K".into(),
            placeholder: "moat-placeholder-K".into(),
            value: "hunter2".into(),
            hosts: vec!["api.test".into()],
        };
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
