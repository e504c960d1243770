//! SOCKS5 (RFC 1928): no-authentication method, CONNECT only.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use moat_policy::egress::{parse_host, Host};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::io::Conn;
use crate::{Attempt, Refusal, SandboxProxy};

const REP_OK: u8 = 0x00;
const REP_FAILURE: u8 = 0x01;
const REP_NOT_ALLOWED: u8 = 0x02;
const REP_HOST_UNREACHABLE: u8 = 0x04;
const REP_REFUSED: u8 = 0x05;
const REP_COMMAND: u8 = 0x07;
const REP_ATYP: u8 = 0x08;

/// The reply; the bound address is always 0.0.0.0:0 (the host's own address is none of the
/// sandbox's business).
fn reply(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

fn code_for(r: &Refusal) -> u8 {
    match r {
        Refusal::Denied { .. } => REP_NOT_ALLOWED,
        Refusal::Refused(_) => REP_FAILURE,
        Refusal::Resolve { .. } => REP_HOST_UNREACHABLE,
        Refusal::Connect { refused: true, .. } => REP_REFUSED,
        Refusal::Connect { .. } => REP_HOST_UNREACHABLE,
    }
}

pub(crate) async fn serve<S>(sp: &SandboxProxy, mut c: Conn<S>, over: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let start = Instant::now();
    // Greeting: VER NMETHODS METHODS...
    if !matches!(c.fill(2).await, Ok(true)) {
        return;
    }
    let nmethods = usize::from(c.buf()[1]);
    if !matches!(c.fill(2 + nmethods).await, Ok(true)) {
        return;
    }
    let no_auth = c.buf()[2..2 + nmethods].contains(&0x00);
    c.consume(2 + nmethods);
    if !no_auth {
        let _ = c.write_all(&[5, 0xff]).await;
        return;
    }
    if c.write_all(&[5, 0x00]).await.is_err() {
        return;
    }
    // Request: VER CMD RSV ATYP DST.ADDR DST.PORT
    if !matches!(c.fill(5).await, Ok(true)) {
        return;
    }
    let (ver, cmd, atyp) = (c.buf()[0], c.buf()[1], c.buf()[3]);
    if ver != 5 {
        return;
    }
    let addr_len = match atyp {
        1 => 4,
        4 => 16,
        3 => 1 + usize::from(c.buf()[4]),
        _ => {
            let _ = c.write_all(&reply(REP_ATYP)).await;
            sp.refused(
                &Attempt {
                    protocol: "socks5",
                    host: String::new(),
                    port: 0,
                    start,
                },
                &Refusal::Refused(format!("SOCKS5 address type {atyp} is not supported")),
            );
            return;
        }
    };
    let total = 4 + addr_len + 2;
    if !matches!(c.fill(total).await, Ok(true)) {
        return;
    }
    let b = c.buf();
    let raw = &b[4..4 + addr_len];
    let port = u16::from_be_bytes([b[4 + addr_len], b[5 + addr_len]]);
    let target: Result<Host, String> = match atyp {
        1 => {
            let o: [u8; 4] = [raw[0], raw[1], raw[2], raw[3]];
            Ok(Host::Ip(IpAddr::V4(Ipv4Addr::from(o))))
        }
        4 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(raw);
            Ok(Host::Ip(IpAddr::V6(Ipv6Addr::from(o))))
        }
        _ => match std::str::from_utf8(&raw[1..]) {
            Ok(s) => parse_host(s),
            Err(_) => Err("the SOCKS5 host name is not valid UTF-8".to_string()),
        },
    };
    let shown = match (&target, atyp) {
        (Ok(h), _) => h.to_string(),
        (Err(_), 3) => String::from_utf8_lossy(&raw[1..])
            .chars()
            .take(255)
            .collect(),
        (Err(_), _) => String::new(),
    };
    c.consume(total);
    let at = Attempt {
        protocol: "socks5",
        host: shown,
        port,
        start,
    };
    if cmd != 1 {
        let _ = c.write_all(&reply(REP_COMMAND)).await;
        sp.refused(
            &at,
            &Refusal::Refused(format!(
                "SOCKS5 command {cmd} is not supported (only CONNECT, 1)"
            )),
        );
        return;
    }
    let host = match target {
        Ok(h) => h,
        Err(reason) => {
            let r = Refusal::Denied { rule: None, reason };
            let _ = c.write_all(&reply(code_for(&r))).await;
            sp.refused(&at, &r);
            return;
        }
    };
    if let Some(r) = sp.limit_refusal(over) {
        let _ = c.write_all(&reply(code_for(&r))).await;
        sp.refused(&at, &r);
        return;
    }
    let allowed = match sp.check(&host, port).await {
        Ok(a) => a,
        Err(r) => {
            let _ = c.write_all(&reply(code_for(&r))).await;
            sp.refused(&at, &r);
            return;
        }
    };
    let (upstream, addr) = match sp.connect(&allowed.addrs).await {
        Ok(x) => x,
        Err(r) => {
            let _ = c.write_all(&reply(code_for(&r))).await;
            sp.refused_with_rule(&at, &allowed.rule, &r);
            return;
        }
    };
    if c.write_all(&reply(REP_OK)).await.is_err() {
        sp.closed(
            &at,
            addr,
            &allowed.rule,
            &crate::io::Stats::new(),
            Some("the client went away".into()),
            false,
            false,
        );
        return;
    }
    sp.tunnel(&at, &host, &allowed.rule, c.into_prefixed(), upstream, addr)
        .await;
}
