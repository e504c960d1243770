//! The operator's egress settings, as flags of `moat run` and `moat serve` and as the
//! `[egress]` table of the server's config file. Sandboxes cannot change any of them.

use anyhow::{bail, Context, Result};
use clap::Args;
use moat_policy::egress::{normalize_name, Cidr};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

#[derive(Args, Clone, Debug, Default)]
pub struct EgressArgs {
    /// Let a private range past the egress proxy's address guard (an internal package
    /// mirror, say); the sandbox's allowlist still decides. Repeatable.
    #[arg(long = "egress-allow-cidr", value_name = "CIDR")]
    pub allow_cidr: Vec<String>,
    /// Resolve NAME to IP in the egress proxy, without DNS (internal names). Repeatable.
    #[arg(long = "egress-host", value_name = "NAME=IP")]
    pub host: Vec<String>,
    /// DNS server the egress proxy asks (default: the host's /etc/resolv.conf). Repeatable.
    #[arg(long = "egress-dns", value_name = "IP:PORT")]
    pub dns: Vec<String>,
    /// Extra PEM CA file the egress proxy trusts for upstream TLS on intercepted
    /// connections (besides the system's roots). Repeatable.
    #[arg(long = "egress-ca-file", value_name = "FILE")]
    pub ca_file: Vec<String>,
}

/// The `[egress]` table of `moat serve --config FILE`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// As `--egress-allow-cidr`.
    pub allow_cidrs: Vec<String>,
    /// As `--egress-host`: `NAME = "IP"` or `NAME = ["IP", ...]`.
    pub hosts: BTreeMap<String, HostAddrs>,
    /// As `--egress-dns`.
    pub dns: Vec<String>,
    /// As `--egress-ca-file`.
    pub ca_files: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum HostAddrs {
    One(String),
    Many(Vec<String>),
}

impl EgressArgs {
    /// Adds a config file's `[egress]` settings to the flags'.
    pub fn merge(&mut self, c: EgressConfig) {
        self.allow_cidr.extend(c.allow_cidrs);
        for (name, addrs) in c.hosts {
            let list = match addrs {
                HostAddrs::One(a) => vec![a],
                HostAddrs::Many(v) => v,
            };
            for a in list {
                self.host.push(format!("{name}={a}"));
            }
        }
        self.dns.extend(c.dns);
        self.ca_file.extend(c.ca_files);
    }

    /// The proxy's settings; every bad value is an error naming its flag.
    pub fn operator(&self) -> Result<moat_egress::Operator> {
        let mut op = moat_egress::Operator::default();
        for c in &self.allow_cidr {
            let cidr: Cidr = c
                .parse()
                .map_err(|e| anyhow::anyhow!("--egress-allow-cidr {c}: {e}"))?;
            op.allow_cidrs.push(cidr);
        }
        for h in &self.host {
            let Some((name, ip)) = h.split_once('=') else {
                bail!("--egress-host {h}: write NAME=IP, e.g. mirror.internal=10.0.0.5");
            };
            let name =
                normalize_name(name).map_err(|e| anyhow::anyhow!("--egress-host {h}: {e}"))?;
            let ip: IpAddr = ip.parse().with_context(|| {
                format!("--egress-host {h}: `{ip}` is not an IPv4 or IPv6 address")
            })?;
            op.hosts.entry(name).or_default().push(ip);
        }
        for d in &self.dns {
            let addr: SocketAddr = d
                .parse()
                .or_else(|_| d.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .with_context(|| format!("--egress-dns {d}: write IP or IP:PORT"))?;
            op.nameservers.push(addr);
        }
        for f in &self.ca_file {
            let pem = std::fs::read_to_string(f)
                .with_context(|| format!("--egress-ca-file {f}: cannot read it"))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                bail!("--egress-ca-file {f}: no PEM certificate in it");
            }
            op.upstream_ca.push(pem);
        }
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_config_become_the_operator_settings() {
        let mut a = EgressArgs {
            allow_cidr: vec!["10.0.0.0/8".into()],
            host: vec!["Mirror.Internal=10.0.0.5".into()],
            dns: vec!["127.0.0.1:5353".into(), "127.0.0.53".into()],
            ca_file: vec![],
        };
        let c: EgressConfig = toml::from_str(
            "allow_cidrs = [\"fd00::/8\"]\nhosts = { a = [\"::1\", \"127.0.0.2\"] }",
        )
        .unwrap();
        a.merge(c);
        let op = a.operator().unwrap();
        assert_eq!(op.allow_cidrs.len(), 2);
        assert_eq!(
            op.hosts["mirror.internal"],
            vec!["10.0.0.5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(op.hosts["a"].len(), 2);
        assert_eq!(op.nameservers[1], "127.0.0.53:53".parse().unwrap());
        for bad in [
            EgressArgs {
                allow_cidr: vec!["10.0.0.0/33".into()],
                ..Default::default()
            },
            EgressArgs {
                host: vec!["x".into()],
                ..Default::default()
            },
            EgressArgs {
                host: vec!["x=notanip".into()],
                ..Default::default()
            },
            EgressArgs {
                dns: vec!["nowhere".into()],
                ..Default::default()
            },
            EgressArgs {
                ca_file: vec!["/nonexistent".into()],
                ..Default::default()
            },
        ] {
            assert!(bad.operator().is_err(), "{bad:?}");
        }
        assert!(toml::from_str::<EgressConfig>("bogus = 1").is_err());
    }
}
