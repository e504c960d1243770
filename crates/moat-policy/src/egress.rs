//! Egress rules: which hosts a sandbox may reach through moat's proxy, and which addresses
//! the proxy refuses to connect to whatever the rules say.
//!
//! Pure logic, no I/O. The proxy (moat-egress) parses the client's target with
//! [`parse_host`], asks [`Rules::decide_name`] or [`Rules::decide_ip`], resolves names
//! itself and checks every address with [`forbidden`] and [`Rules::denied_ip`].
//!
//! Rule syntax (allow and deny alike):
//! - `example.com`: that host only; `*.example.com`: any subdomain of it (never the apex,
//!   never `evil-example.com`);
//! - a CIDR (`203.0.113.0/24`, `2001:db8::/32`) or a single IP (`203.0.113.7`): IP literals
//!   in that range (a host name never matches a CIDR rule, its resolved addresses are checked
//!   against deny CIDRs);
//! - any rule may end in `:PORT` (an IPv6 CIDR then needs brackets: `[2001:db8::/32]:443`).
//!
//! Deny rules win over allow rules; an empty allow list allows nothing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A rule or a pattern that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("egress rule `{rule}`: {why}; write `example.com`, `*.example.com`, a CIDR such as `203.0.113.0/24` or `[2001:db8::/32]`, each optionally followed by `:PORT`")]
    Syntax { rule: String, why: String },
    #[error(
        "egress rule `{rule}`: port `{port}` is not a number from 1 to 65535; write `host:443`"
    )]
    Port { rule: String, port: String },
    #[error("CIDR `{cidr}`: {why}; write an address and a prefix length such as `10.0.0.0/8` or `fd00::/8`, or a single address")]
    Cidr { cidr: String, why: String },
}

fn syntax(rule: &str, why: impl Into<String>) -> RuleError {
    RuleError::Syntax {
        rule: rule.to_string(),
        why: why.into(),
    }
}

/// What the rules say about one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this allow rule (its text as written, trimmed).
    Allow { rule: String },
    /// Denied: by this deny rule, or (`rule: None`) because no allow rule matches. `reason`
    /// is a sentence for the client and the event log.
    Deny {
        rule: Option<String>,
        reason: String,
    },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// An IPv4 or IPv6 network: `10.0.0.0/8`, `fd00::/8`; a single address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this network. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
    /// counts as its IPv4 address; an IPv4 address is in an IPv6 network that holds its
    /// mapped form (so `::/0` holds everything).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(u32::from(net)),
                u128::from(u32::from(ip)),
                self.prefix,
                32,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            (IpAddr::V6(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(net),
                u128::from(ip.to_ipv6_mapped()),
                self.prefix,
                128,
            ),
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }
}

/// Whether the top `prefix` of `bits` bits of `a` and `b` agree.
fn prefix_eq(a: u128, b: u128, prefix: u8, bits: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = u32::from(bits - prefix);
    (a >> shift) == (b >> shift)
}

impl FromStr for Cidr {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Cidr, RuleError> {
        let err = |why: &str| RuleError::Cidr {
            cidr: s.to_string(),
            why: why.to_string(),
        };
        let t = s.trim();
        let (ip, prefix) = match t.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (t, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| err("not an IP address"))?;
        let bits: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 3 {
                    return Err(err("the prefix length is not a number"));
                }
                let n: u8 = p
                    .parse()
                    .map_err(|_| err("the prefix length is too long"))?;
                if n > bits {
                    return Err(err(if bits == 32 {
                        "an IPv4 prefix length is at most 32"
                    } else {
                        "an IPv6 prefix length is at most 128"
                    }));
                }
                n
            }
        };
        let masked = mask(ip, prefix);
        if masked != ip {
            return Err(RuleError::Cidr {
                cidr: s.to_string(),
                why: format!("host bits are set (the network is `{masked}/{prefix}`)"),
            });
        }
        Ok(Cidr { addr: ip, prefix })
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A connection target's host, as a client wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: lowercase, no trailing dot, validated.
    Name(String),
    /// An IP literal (`10.0.0.1`, `::1`; brackets are stripped).
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Parses a target host: an IP literal (IPv6 with or without brackets) or a DNS name, which
/// is lowercased and loses one trailing dot. Refuses what is neither, including the numeric
/// forms some resolvers read as addresses (`2130706433`, `127.1`, `0x7f.1`): a name's last
/// label may not be all digits or a hex number.
pub fn parse_host(s: &str) -> Result<Host, String> {
    let inner = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(ip) = inner.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    if inner.len() != s.len() {
        return Err(format!("`{s}` is not an IPv6 address"));
    }
    normalize_name(s).map(Host::Name)
}

/// Lowercases a DNS name, strips one trailing dot, and checks its syntax (labels of 1 to 63
/// letters, digits, `-` or `_`, not starting or ending with `-`; at most 253 characters; a last
/// label that is not numeric).
pub fn normalize_name(s: &str) -> Result<String, String> {
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let shown: String = s.chars().take(80).collect();
    if name.is_empty() {
        return Err("the host name is empty".to_string());
    }
    if name.len() > 253 {
        return Err(format!(
            "host name `{shown}...` is longer than 253 characters"
        ));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("`{shown}` is not a valid host name"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(format!("`{shown}` is not a valid host name"));
        }
    }
    let last = name.rsplit('.').next().unwrap_or("");
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if last.bytes().all(|b| b.is_ascii_digit()) || hex {
        return Err(format!(
            "`{shown}` is neither a host name nor an IP address in dotted form"
        ));
    }
    Ok(name)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// `example.com`
    Exact(String),
    /// `*.example.com`, stored as `.example.com`
    Suffix(String),
    Net(Cidr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    text: String,
    target: Target,
    port: Option<u16>,
}

impl Rule {
    fn parse(raw: &str) -> Result<Rule, RuleError> {
        let text = raw.trim();
        if text.is_empty() {
            return Err(syntax(raw, "the rule is empty"));
        }
        let (host, port) = split_port(text)?;
        let port = match port {
            None => None,
            Some(p) => Some(parse_port(p).ok_or_else(|| RuleError::Port {
                rule: text.to_string(),
                port: p.to_string(),
            })?),
        };
        let target = if let Some(inner) = host.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| syntax(text, "a `[` without its `]`"))?;
            let net: Cidr = inner.parse().map_err(|e| match e {
                RuleError::Cidr { why, .. } => syntax(text, why),
                other => other,
            })?;
            if net.addr.is_ipv4() {
                return Err(syntax(text, "brackets are for IPv6 only"));
            }
            Target::Net(net)
        } else if host.contains('/') || host.parse::<IpAddr>().is_ok() {
            let net: Cidr = host.parse().map_err(|e| match e {
                RuleError::Cidr { why, .. } => syntax(text, why),
                other => other,
            })?;
            Target::Net(net)
        } else if let Some(rest) = host.strip_prefix("*.") {
            let name = normalize_name(rest).map_err(|why| syntax(text, why))?;
            Target::Suffix(format!(".{name}"))
        } else {
            if host.contains('*') {
                return Err(syntax(
                    text,
                    "`*` may only stand alone as the first label, as in `*.example.com`",
                ));
            }
            Target::Exact(normalize_name(host).map_err(|why| syntax(text, why))?)
        };
        Ok(Rule {
            text: text.to_string(),
            target,
            port,
        })
    }

    fn matches_name(&self, host: &str) -> bool {
        match &self.target {
            Target::Exact(n) => n == host,
            Target::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            Target::Net(_) => false,
        }
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        match &self.target {
            Target::Net(n) => n.contains(ip),
            _ => false,
        }
    }

    fn port_ok(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}

/// Splits `host:port`, `[v6]:port`, `[v6]`, a bare IPv6 CIDR (no port possible) or `host`.
fn split_port(text: &str) -> Result<(&str, Option<&str>), RuleError> {
    if text.starts_with('[') {
        let end = text
            .find(']')
            .ok_or_else(|| syntax(text, "a `[` without its `]`"))?;
        let (h, rest) = text.split_at(end + 1);
        return match rest {
            "" => Ok((h, None)),
            r => match r.strip_prefix(':') {
                Some(p) => Ok((h, Some(p))),
                None => Err(syntax(text, "after `]` only `:PORT` may follow")),
            },
        };
    }
    match text.matches(':').count() {
        0 => Ok((text, None)),
        1 => {
            let (h, p) = text.split_once(':').unwrap_or((text, ""));
            Ok((h, Some(p)))
        }
        // A bare IPv6 address or CIDR: no port (that needs brackets).
        _ => Ok((text, None)),
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&n| n != 0)
}

/// A sandbox's parsed allow and deny rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl Rules {
    /// Parses both lists; the first bad rule is the error.
    pub fn parse(allow: &[String], deny: &[String]) -> Result<Rules, RuleError> {
        Ok(Rules {
            allow: allow
                .iter()
                .map(|r| Rule::parse(r))
                .collect::<Result<_, _>>()?,
            deny: deny
                .iter()
                .map(|r| Rule::parse(r))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether there is no allow rule (then nothing is reachable).
    pub fn allows_nothing(&self) -> bool {
        self.allow.is_empty()
    }

    /// Decides a connection to a host name. The name should be lowercase without a trailing
    /// dot (as [`parse_host`] gives it); it is normalized again here all the same. Only name
    /// rules apply: CIDR rules never match a name.
    pub fn decide_name(&self, host: &str, port: u16) -> Decision {
        let host = match normalize_name(host) {
            Ok(h) => h,
            Err(why) => {
                return Decision::Deny {
                    rule: None,
                    reason: why,
                }
            }
        };
        if let Some(r) = self
            .deny
            .iter()
            .find(|r| r.matches_name(&host) && r.port_ok(port))
        {
            return Decision::Deny {
                rule: Some(r.text.clone()),
                reason: format!("host {host} port {port} is denied by rule `{}`", r.text),
            };
        }
        if let Some(r) = self
            .allow
            .iter()
            .find(|r| r.matches_name(&host) && r.port_ok(port))
        {
            return Decision::Allow {
                rule: r.text.clone(),
            };
        }
        if let Some(r) = self.allow.iter().find(|r| r.matches_name(&host)) {
            return Decision::Deny {
                rule: None,
                reason: format!(
                    "port {port} of host {host} is not in the allowlist (rule `{}` allows only port {})",
                    r.text,
                    r.port.unwrap_or(0)
                ),
            };
        }
        Decision::Deny {
            rule: None,
            reason: format!("host {host} is not in the allowlist"),
        }
    }

    /// Decides a connection to an IP literal: only CIDR rules apply (an IPv4-mapped IPv6
    /// address is its IPv4 address). This does not check [`forbidden`]; the proxy does.
    pub fn decide_ip(&self, ip: IpAddr, port: u16) -> Decision {
        let ip = ip.to_canonical();
        if let Some(rule) = self.denied_ip(ip, port) {
            return Decision::Deny {
                reason: format!("{ip} port {port} is denied by rule `{rule}`"),
                rule: Some(rule),
            };
        }
        if let Some(r) = self
            .allow
            .iter()
            .find(|r| r.matches_ip(ip) && r.port_ok(port))
        {
            return Decision::Allow {
                rule: r.text.clone(),
            };
        }
        Decision::Deny {
            rule: None,
            reason: format!(
                "IP address {ip} port {port} is not in the allowlist (only CIDR rules allow IP addresses)"
            ),
        }
    }

    /// The deny CIDR rule, if any, that matches `ip:port`. The proxy asks this for every
    /// address an allowed name resolves to, so that a deny CIDR also covers names.
    pub fn denied_ip(&self, ip: IpAddr, port: u16) -> Option<String> {
        self.deny
            .iter()
            .find(|r| r.matches_ip(ip) && r.port_ok(port))
            .map(|r| r.text.clone())
    }

    /// Whether `host` (a name or an IP literal) matches any of `patterns` (rule syntax; ports
    /// are ignored; a pattern that does not parse matches nothing). For secrets' host bindings.
    pub fn matches_any(patterns: &[String], host: &str) -> bool {
        let host = match parse_host(host) {
            Ok(h) => h,
            Err(_) => return false,
        };
        patterns
            .iter()
            .filter_map(|p| Rule::parse(p).ok())
            .any(|r| match &host {
                Host::Name(n) => r.matches_name(n),
                Host::Ip(ip) => r.matches_ip(*ip),
            })
    }
}

/// Why the proxy never connects to `ip` (unless the operator allowed its range): its class,
/// one of `unspecified`, `loopback`, `private`, `link_local`, `metadata`, `cgnat`,
/// `benchmark`, `documentation`, `multicast`, `broadcast`, `reserved`. `None`: a public
/// address. IPv4-mapped (`::ffff:a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`)
/// addresses are judged by the IPv4 address they carry.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

/// `a loopback address` and so on, for a class [`forbidden`] returns.
pub fn describe_class(class: &str) -> &'static str {
    match class {
        "unspecified" => "an unspecified address",
        "loopback" => "a loopback address",
        "private" => "a private address",
        "link_local" => "a link-local address",
        "metadata" => "a cloud metadata address",
        "cgnat" => "a carrier-grade NAT (shared) address",
        "benchmark" => "a benchmarking address",
        "documentation" => "a documentation address",
        "multicast" => "a multicast address",
        "broadcast" => "the broadcast address",
        "reserved" => "a reserved address",
        _ => "a forbidden address",
    }
}

fn in4(ip: u32, net: [u8; 4], prefix: u8) -> bool {
    prefix_eq(
        u128::from(ip),
        u128::from(u32::from(Ipv4Addr::from(net))),
        prefix,
        32,
    )
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let n = u32::from(ip);
    let table: &[([u8; 4], u8, &'static str)] = &[
        ([0, 0, 0, 0], 32, "unspecified"),
        ([255, 255, 255, 255], 32, "broadcast"),
        ([169, 254, 169, 254], 32, "metadata"), // AWS, GCP, Azure, OCI, ...
        ([100, 100, 100, 200], 32, "metadata"), // Alibaba Cloud
        ([0, 0, 0, 0], 8, "reserved"),          // "this network"; Linux reaches the host
        ([127, 0, 0, 0], 8, "loopback"),
        ([10, 0, 0, 0], 8, "private"),
        ([172, 16, 0, 0], 12, "private"),
        ([192, 168, 0, 0], 16, "private"),
        ([169, 254, 0, 0], 16, "link_local"),
        ([100, 64, 0, 0], 10, "cgnat"),
        ([198, 18, 0, 0], 15, "benchmark"),
        ([192, 0, 0, 0], 24, "reserved"), // IETF protocol assignments
        ([192, 0, 2, 0], 24, "documentation"),
        ([198, 51, 100, 0], 24, "documentation"),
        ([203, 0, 113, 0], 24, "documentation"),
        ([192, 88, 99, 0], 24, "reserved"), // former 6to4 relay anycast
        ([224, 0, 0, 0], 4, "multicast"),
        ([240, 0, 0, 0], 4, "reserved"),
    ];
    table
        .iter()
        .find(|(net, p, _)| in4(n, *net, *p))
        .map(|(_, _, c)| *c)
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let n = u128::from(ip);
    let in6 = |net: u128, prefix: u8| prefix_eq(n, net, prefix, 128);
    let seg = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if n == u128::from(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)) {
        return Some("metadata"); // AWS IMDS over IPv6
    }
    // NAT64 well-known prefix: the last 32 bits are an IPv4 address.
    if in6(0x0064_ff9b_u128 << 96, 96) {
        let v4 = Ipv4Addr::from((n & 0xffff_ffff) as u32);
        return forbidden_v4(v4);
    }
    if in6(0x0064_ff9b_0001_u128 << 80, 48) {
        return Some("reserved"); // local-use NAT64
    }
    // 6to4: 2002:AABB:CCDD::/48 carries AA.BB.CC.DD.
    if seg[0] == 0x2002 {
        let v4 = Ipv4Addr::from((u32::from(seg[1]) << 16) | u32::from(seg[2]));
        return forbidden_v4(v4);
    }
    if in6(0xfe80_u128 << 112, 10) {
        return Some("link_local");
    }
    if in6(0xfec0_u128 << 112, 10) {
        return Some("private"); // deprecated site-local
    }
    if in6(0xfc00_u128 << 112, 7) {
        return Some("private"); // unique local
    }
    if in6(0xff00_u128 << 112, 8) {
        return Some("multicast");
    }
    if in6(0x2001_0db8_u128 << 96, 32) || in6(0x3fff_u128 << 112, 20) {
        return Some("documentation");
    }
    if in6(0x2001_0002_u128 << 96, 48) {
        return Some("benchmark");
    }
    if in6(0x2001_0010_u128 << 96, 28) || in6(0x2001_0020_u128 << 96, 28) {
        return Some("reserved"); // ORCHID
    }
    if in6(0x0100_u128 << 112, 64) {
        return Some("reserved"); // discard-only
    }
    // Everything outside global unicast 2000::/3 (IPv4-compatible ::a.b.c.d, unassigned
    // space) is nowhere the proxy should go.
    if !in6(0x2000_u128 << 112, 3) {
        return Some("reserved");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> Rules {
        let a: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        let d: Vec<String> = deny.iter().map(|s| s.to_string()).collect();
        Rules::parse(&a, &d).expect("rules parse")
    }

    fn allowed(r: &Rules, host: &str, port: u16) -> bool {
        r.decide_name(host, port).is_allow()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let r = rules(&["*.example.com"], &[]);
        assert!(allowed(&r, "a.example.com", 443));
        assert!(allowed(&r, "a.b.example.com", 443));
        assert!(!allowed(&r, "example.com", 443));
        assert!(!allowed(&r, "evil-example.com", 443));
        assert!(!allowed(&r, "aexample.com", 443));
        assert!(!allowed(&r, "example.com.evil.net", 443));
        assert!(!allowed(&r, "a.example.com.evil.net", 443));
        assert!(!allowed(&r, ".example.com", 443));
    }

    #[test]
    fn exact_name_matches_itself_only() {
        let r = rules(&["example.com"], &[]);
        assert!(allowed(&r, "example.com", 80));
        assert!(allowed(&r, "EXAMPLE.com.", 80));
        assert!(!allowed(&r, "a.example.com", 80));
        assert!(!allowed(&r, "example.co", 80));
        assert!(!allowed(&r, "example.com.evil.net", 80));
        assert!(!allowed(&r, "xexample.com", 80));
    }

    #[test]
    fn rule_names_are_case_insensitive_and_lose_a_trailing_dot() {
        let r = rules(&["Example.COM.", "*.Api.Test"], &[]);
        assert!(allowed(&r, "example.com", 1));
        assert!(allowed(&r, "x.api.test", 1));
    }

    #[test]
    fn ports() {
        let r = rules(&["example.com:443", "*.svc.test:8080", "any.test"], &[]);
        assert!(allowed(&r, "example.com", 443));
        assert!(!allowed(&r, "example.com", 80));
        assert!(allowed(&r, "a.svc.test", 8080));
        assert!(!allowed(&r, "a.svc.test", 8081));
        assert!(allowed(&r, "any.test", 1));
        assert!(allowed(&r, "any.test", 65535));
        match r.decide_name("example.com", 80) {
            Decision::Deny { rule: None, reason } => {
                assert!(reason.contains("port 80"), "{reason}");
                assert!(reason.contains("only port 443"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn deny_beats_allow() {
        let r = rules(
            &["*.example.com", "example.com"],
            &["secret.example.com", "example.com:22"],
        );
        assert!(allowed(&r, "a.example.com", 443));
        assert!(!allowed(&r, "secret.example.com", 443));
        assert!(allowed(&r, "example.com", 443));
        assert!(!allowed(&r, "example.com", 22));
        match r.decide_name("secret.example.com", 443) {
            Decision::Deny { rule, reason } => {
                assert_eq!(rule.as_deref(), Some("secret.example.com"));
                assert!(reason.contains("denied by rule"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        // A wildcard deny covers what an exact allow names.
        let r = rules(&["a.example.com"], &["*.example.com"]);
        assert!(!allowed(&r, "a.example.com", 443));
    }

    #[test]
    fn empty_allow_allows_nothing() {
        let r = rules(&[], &[]);
        assert!(r.allows_nothing());
        assert!(!allowed(&r, "example.com", 443));
        assert!(!r.decide_ip(ip("8.8.8.8"), 53).is_allow());
        match r.decide_name("example.com", 443) {
            Decision::Deny { rule: None, reason } => {
                assert_eq!(reason, "host example.com is not in the allowlist")
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn decision_names_the_rule() {
        let r = rules(&["  *.example.com:443 "], &[]);
        assert_eq!(
            r.decide_name("a.example.com", 443),
            Decision::Allow {
                rule: "*.example.com:443".into()
            }
        );
    }

    #[test]
    fn ip_literals_only_via_cidr() {
        let r = rules(
            &[
                "example.com",
                "203.0.113.0/24:443",
                "[2001:db8::/32]:443",
                "2001:db9::/32",
                "198.51.100.7",
            ],
            &["203.0.113.9"],
        );
        assert!(r.decide_ip(ip("203.0.113.5"), 443).is_allow());
        assert!(!r.decide_ip(ip("203.0.113.5"), 80).is_allow());
        assert!(!r.decide_ip(ip("203.0.113.9"), 443).is_allow());
        assert!(!r.decide_ip(ip("203.0.114.1"), 443).is_allow());
        assert!(r.decide_ip(ip("2001:db8::1"), 443).is_allow());
        assert!(!r.decide_ip(ip("2001:db8::1"), 80).is_allow());
        assert!(r.decide_ip(ip("2001:db9:1::1"), 80).is_allow());
        assert!(r.decide_ip(ip("198.51.100.7"), 1).is_allow());
        assert!(!r.decide_ip(ip("198.51.100.8"), 1).is_allow());
        // Mapped IPv6 is its IPv4 address.
        assert!(r.decide_ip(ip("::ffff:203.0.113.5"), 443).is_allow());
        assert!(!r.decide_ip(ip("::ffff:203.0.113.9"), 443).is_allow());
        // A name rule never allows an IP; a CIDR rule never allows a name.
        let r = rules(&["93.184.216.34", "example.com"], &[]);
        assert!(!r.decide_name("93.184.216.34", 80).is_allow());
        assert!(!r.decide_ip(ip("1.1.1.1"), 80).is_allow());
        match r.decide_ip(ip("1.1.1.1"), 80) {
            Decision::Deny { reason, .. } => assert!(reason.contains("only CIDR"), "{reason}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn denied_ip_for_resolved_addresses() {
        let r = rules(
            &["*.example.com"],
            &["203.0.113.0/24", "[2001:db8::/32]:25"],
        );
        assert_eq!(
            r.denied_ip(ip("203.0.113.1"), 443).as_deref(),
            Some("203.0.113.0/24")
        );
        assert_eq!(r.denied_ip(ip("2001:db8::1"), 443), None);
        assert!(r.denied_ip(ip("2001:db8::1"), 25).is_some());
        assert_eq!(r.denied_ip(ip("8.8.8.8"), 443), None);
    }

    #[test]
    fn bad_rules_say_the_syntax() {
        for bad in [
            "",
            " ",
            "*",
            "*.",
            "a.*.example.com",
            "ex*ample.com",
            "**.example.com",
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:http",
            "exa mple.com",
            "-example.com",
            "example-.com",
            "example..com",
            "10.0.0.0/33",
            "10.0.0.1/8",
            "10.0.0.0/x",
            "[10.0.0.0/8]",
            "[2001:db8::/32",
            "[2001:db8::/32]443",
            "2001:db8::/129",
            "http://example.com",
            "example.com/path",
            "127.1",
            "2130706433",
            "0x7f.1",
        ] {
            let e = Rules::parse(&[bad.to_string()], &[]).expect_err(bad);
            let msg = e.to_string();
            assert!(msg.contains("write"), "{bad}: {msg}");
        }
        // Deny rules are checked too.
        assert!(Rules::parse(&[], &["*".to_string()]).is_err());
    }

    #[test]
    fn good_rules_parse() {
        for good in [
            "example.com",
            "*.example.com",
            "example.com:443",
            "*.example.com:8443",
            "203.0.113.0/24",
            "203.0.113.0/24:443",
            "[2001:db8::/32]:443",
            "[2001:db8::1]",
            "2001:db8::/32",
            "::1",
            "0.0.0.0/0",
            "::/0",
            "_srv.example.com",
            "xn--bcher-kva.example",
            "a1.b2",
        ] {
            Rules::parse(&[good.to_string()], &[]).expect(good);
        }
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(c.contains(ip("10.255.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("::1")));
        assert_eq!(c.to_string(), "10.0.0.0/8");
        let one: Cidr = "127.0.0.1".parse().expect("cidr");
        assert_eq!(one.prefix(), 32);
        assert!(one.contains(ip("127.0.0.1")));
        assert!(!one.contains(ip("127.0.0.2")));
        let v6: Cidr = "fd00::/8".parse().expect("cidr");
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let host: Cidr = "::1".parse().expect("cidr");
        assert_eq!(host.prefix(), 128);
        let all4: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all4.contains(ip("1.2.3.4")));
        assert!(!all4.contains(ip("2001:db8::1")));
        let all6: Cidr = "::/0".parse().expect("cidr");
        assert!(all6.contains(ip("2001:db8::1")));
        assert!(all6.contains(ip("1.2.3.4")));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "fd00::/129",
            "x/8",
            "10.0.0.0/",
            "[::1]",
            "10.0.0.0/-1",
        ] {
            let e = bad.parse::<Cidr>().expect_err(bad);
            assert!(e.to_string().contains("write"), "{e}");
        }
    }

    #[test]
    fn matches_any_for_secret_hosts() {
        let pats = vec![
            "api.openai.com".to_string(),
            "*.anthropic.com:443".to_string(),
        ];
        assert!(Rules::matches_any(&pats, "api.openai.com"));
        assert!(Rules::matches_any(&pats, "API.OpenAI.com."));
        assert!(Rules::matches_any(&pats, "x.anthropic.com"));
        assert!(!Rules::matches_any(&pats, "anthropic.com"));
        assert!(!Rules::matches_any(&pats, "openai.com"));
        assert!(!Rules::matches_any(&pats, "api.openai.com.evil.net"));
        assert!(!Rules::matches_any(&[], "api.openai.com"));
        assert!(!Rules::matches_any(&["*".to_string()], "x.com"));
        assert!(Rules::matches_any(&["10.0.0.0/8".to_string()], "10.1.1.1"));
        assert!(!Rules::matches_any(
            &["10.0.0.0/8".to_string()],
            "not a host"
        ));
    }

    #[test]
    fn parse_host_forms() {
        assert_eq!(
            parse_host("Example.COM."),
            Ok(Host::Name("example.com".into()))
        );
        assert_eq!(parse_host("10.0.0.1"), Ok(Host::Ip(ip("10.0.0.1"))));
        assert_eq!(parse_host("[::1]"), Ok(Host::Ip(ip("::1"))));
        assert_eq!(parse_host("::1"), Ok(Host::Ip(ip("::1"))));
        for bad in [
            "",
            ".",
            "[example.com]",
            "127.1",
            "2130706433",
            "0x7f000001",
            "a..b",
            "a b",
            "a/b",
            "é.com",
        ] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(parse_host(&long).is_err());
        let too_long = vec!["a"; 130].join(".");
        assert!(parse_host(&too_long).is_err());
    }

    fn class(s: &str) -> Option<&'static str> {
        forbidden(ip(s))
    }

    #[test]
    fn forbidden_v4_classes() {
        for (a, c) in [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "reserved"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "metadata"),
            ("100.100.100.200", "metadata"),
            ("169.254.1.1", "link_local"),
            ("100.64.0.1", "cgnat"),
            ("100.127.255.255", "cgnat"),
            ("198.18.0.1", "benchmark"),
            ("198.19.255.255", "benchmark"),
            ("192.0.0.1", "reserved"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.1", "documentation"),
            ("203.0.113.1", "documentation"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.255", "multicast"),
            ("240.0.0.1", "reserved"),
            ("254.1.1.1", "reserved"),
            ("255.255.255.255", "broadcast"),
        ] {
            assert_eq!(class(a), Some(c), "{a}");
            // The same through IPv4-mapped IPv6, NAT64 and 6to4.
            let v4: Ipv4Addr = a.parse().expect("v4");
            assert_eq!(
                forbidden(IpAddr::V6(v4.to_ipv6_mapped())),
                Some(c),
                "mapped {a}"
            );
            let o = v4.octets();
            let nat64 = Ipv6Addr::new(
                0x64,
                0xff9b,
                0,
                0,
                0,
                0,
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([o[2], o[3]]),
            );
            assert_eq!(forbidden(IpAddr::V6(nat64)), Some(c), "nat64 {a}");
            let sixto4 = Ipv6Addr::new(
                0x2002,
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([o[2], o[3]]),
                0,
                0,
                0,
                0,
                1,
            );
            assert_eq!(forbidden(IpAddr::V6(sixto4)), Some(c), "6to4 {a}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "172.32.0.1",
            "172.15.255.255",
            "100.128.0.1",
            "100.63.255.255",
            "198.20.0.1",
            "223.255.255.255",
            "169.253.1.1",
            "192.0.1.1",
            "11.0.0.1",
        ] {
            assert_eq!(class(public), None, "{public}");
            assert_eq!(class(&format!("::ffff:{public}")), None, "mapped {public}");
        }
    }

    #[test]
    fn forbidden_v6_classes() {
        for (a, c) in [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fd00:ec2::254", "metadata"),
            ("fe80::1", "link_local"),
            ("febf::1", "link_local"),
            ("fec0::1", "private"),
            ("fc00::1", "private"),
            ("fd12:3456::1", "private"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("2001:2::1", "benchmark"),
            ("2001:10::1", "reserved"),
            ("100::1", "reserved"),
            ("::10.0.0.1", "reserved"),
            ("::2", "reserved"),
            ("64:ff9b:1::1", "reserved"),
            ("4000::1", "reserved"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "metadata"),
            ("::ffff:0.0.0.0", "unspecified"),
        ] {
            assert_eq!(class(a), Some(c), "{a}");
        }
        for public in [
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "2a00:1450::1",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(class(public), None, "{public}");
        }
    }

    #[test]
    fn every_class_has_a_phrase() {
        for c in [
            "unspecified",
            "loopback",
            "private",
            "link_local",
            "metadata",
            "cgnat",
            "benchmark",
            "documentation",
            "multicast",
            "broadcast",
            "reserved",
        ] {
            assert_ne!(describe_class(c), "a forbidden address", "{c}");
        }
        assert_eq!(describe_class("loopback"), "a loopback address");
    }
}
