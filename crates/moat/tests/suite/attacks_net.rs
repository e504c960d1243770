//! Network exfiltration (SECURITY.md), native tier, default policy (network mode `none`):
//! the sandbox's network namespace has only `lo` and no routes, so direct traffic to IP
//! literals, DNS and the host's loopback services cannot be reached; raw and ICMP sockets are
//! refused; the host's Unix sockets (by path or abstract name) are out of reach; loopback
//! inside the sandbox works.
//!
//! Nothing here sends a packet off the machine, even when the sandbox is broken: the
//! literals are documentation addresses (192.0.2.0/24, 2001:db8::/32), connects are
//! non-blocking, and a resolver that is not on loopback only gets a UDP `connect` (which picks
//! a route and sends nothing). The attempts are cases of `tests/attacks/kernel.c`.

use super::attacks_kernel::{assert_lines, kernel};
use super::harness::*;
use moat_api::Status;
use std::io::ErrorKind;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

/// Asserts a host listener got no connection (after its own control connection was taken).
fn assert_no_pending<T>(what: &str, accept: impl FnOnce() -> std::io::Result<T>) {
    match accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Err(e) => panic!("{what}: accept failed: {e}"),
        Ok(_) => panic!("{what}: the host listener got a connection from the sandbox"),
    }
}

#[test]
fn only_loopback_exists_and_nothing_is_routed() {
    let Some(r) = kernel(&["ifaces"]) else {
        return;
    };
    assert_lines(&r, "ifaces", &["ifaces: lo"]);
    // The same from /proc: one interface, no IPv4 route at all, IPv6 routes only on lo
    // (::1 and the kernel's reject entries).
    let r = sh(
        &[],
        "echo RAN; sed -n '3,$p' /proc/net/dev | cut -d: -f1 | tr -d ' '; \
         echo routes4 $(sed -n '2,$p' /proc/net/route | wc -l); \
         echo routes6 $(wc -l < /proc/net/ipv6_route) not-lo $(awk '$10 != \"lo\"' /proc/net/ipv6_route | wc -l)",
    );
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("RAN"), "{r:?}");
    assert_eq!(lines.next(), Some("lo"), "{r:?}");
    assert_eq!(lines.next(), Some("routes4 0"), "{r:?}");
    let v6 = lines.next().unwrap_or_default();
    assert!(
        v6.starts_with("routes6 ") && v6.ends_with(" not-lo 0"),
        "{r:?}"
    );
    assert_eq!(lines.next(), None, "{r:?}");
}

#[test]
fn direct_traffic_to_ip_literals_has_no_route() {
    let Some(r) = kernel(&["egress"]) else {
        return;
    };
    if gvisor() {
        // Accepted outcome in the gvisor tier: the network is gVisor's netstack with only
        // loopback (runsc --network=none), whose answer for a destination without a route
        // is EHOSTUNREACH; it lets any user open a ping socket, and an echo request on it
        // has no route either. Raw sockets: the filter's EPERM.
        assert_lines(
            &r,
            "egress",
            &[
                "tcp4 192.0.2.1:80: EHOSTUNREACH",
                "tcp6 [2001:db8::1]:80: EHOSTUNREACH",
                "udp4 sendto 192.0.2.1:53: EHOSTUNREACH",
                "udp6 sendto [2001:db8::1]:53: EHOSTUNREACH",
                "icmp4 dgram: OK",
                "icmp4 dgram sendto: EHOSTUNREACH",
                "icmp6 dgram: OK",
                "icmp6 dgram sendto: EHOSTUNREACH",
                "icmp4 raw: EPERM",
                "icmp6 raw: EPERM",
            ],
        );
        return;
    }
    // No route: every attempt fails at once, before a packet exists. Ping sockets are
    // EACCES (no group in the namespace's net.ipv4.ping_group_range), raw ones EPERM (the
    // filter, and no CAP_NET_RAW anyway).
    assert_lines(
        &r,
        "egress",
        &[
            "tcp4 192.0.2.1:80: ENETUNREACH",
            "tcp6 [2001:db8::1]:80: ENETUNREACH",
            "udp4 sendto 192.0.2.1:53: ENETUNREACH",
            "udp6 sendto [2001:db8::1]:53: ENETUNREACH",
            "icmp4 dgram: EACCES",
            "icmp6 dgram: EACCES",
            "icmp4 raw: EPERM",
            "icmp6 raw: EPERM",
        ],
    );
}

#[test]
fn dns_lookups_fail() {
    let Some(r) = kernel(&["dns"]) else {
        return;
    };
    // The sandbox's resolv.conf names no server, so glibc asks 127.0.0.1:53, the sandbox's
    // own loopback, where nothing listens: a temporary failure. /etc/hosts still works.
    assert_lines(
        &r,
        "dns",
        &[
            "getaddrinfo example.com: EAI_AGAIN",
            "getaddrinfo localhost: OK",
        ],
    );
}

#[test]
fn no_resolver_is_reachable() {
    // The host's own resolvers, and fixed ones so the test means something on any host.
    let mut servers: Vec<String> = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(|a| a.trim().to_string())
        .filter(|a| a.parse::<IpAddr>().is_ok())
        .collect();
    servers.extend(["192.0.2.53", "2001:db8::53", "127.0.0.1", "::1"].map(String::from));
    let mut args = vec!["resolver"];
    args.extend(servers.iter().map(String::as_str));
    let Some(r) = kernel(&args) else {
        return;
    };
    // Off-machine servers have no route; loopback ones are the sandbox's own loopback,
    // where a query is refused (the host's 127.0.0.53 or the like is not there).
    // Accepted outcome in the gvisor tier: gVisor's netstack says EHOSTUNREACH for no route.
    let no_route = if gvisor() {
        "EHOSTUNREACH"
    } else {
        "ENETUNREACH"
    };
    let want: Vec<String> = servers
        .iter()
        .map(|s| {
            let ip: IpAddr = s.parse().unwrap();
            let e = if ip.is_loopback() {
                "ECONNREFUSED"
            } else {
                no_route
            };
            format!("resolver {s}: {e}")
        })
        .collect();
    assert_lines(&r, "resolver", &want);
}

#[test]
fn host_loopback_services_are_unreachable() {
    let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l4.local_addr().unwrap().port();
    // The same port on the host's ::1 too, where the host has IPv6.
    let l6 = TcpListener::bind(("::1", port)).ok();
    // Control: the listeners are reachable from the host.
    drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    l4.accept().unwrap();
    if let Some(l6) = &l6 {
        drop(TcpStream::connect(("::1", port)).unwrap());
        l6.accept().unwrap();
    }
    let port_s = port.to_string();
    let Some(r) = kernel(&["host_tcp", &port_s]) else {
        return;
    };
    assert_lines(
        &r,
        "host_tcp",
        &["tcp4 127.0.0.1: ECONNREFUSED", "tcp6 ::1: ECONNREFUSED"],
    );
    l4.set_nonblocking(true).unwrap();
    assert_no_pending("127.0.0.1", || l4.accept());
    if let Some(l6) = &l6 {
        l6.set_nonblocking(true).unwrap();
        assert_no_pending("::1", || l6.accept());
    }
}

#[test]
fn host_unix_sockets_are_unreachable() {
    // A listener on a host path, one on a host abstract name, and the usual daemons' paths.
    let dir = scratch_dir("unix-host");
    let path = dir.join("host.sock");
    let by_path = UnixListener::bind(&path).unwrap();
    let name = format!("moat-test-{}-{}", std::process::id(), line!());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let abstract_l = UnixListener::bind_addr(&addr).unwrap();
    drop(UnixStream::connect(&path).unwrap());
    by_path.accept().unwrap();
    drop(UnixStream::connect_addr(&addr).unwrap());
    abstract_l.accept().unwrap();

    let path_s = path.to_str().unwrap().to_string();
    let at_name = format!("@{name}");
    let well_known = [
        "/run/dbus/system_bus_socket",
        "/var/run/dbus/system_bus_socket",
        "/run/docker.sock",
        "/var/run/docker.sock",
        "/run/containerd/containerd.sock",
        "/run/systemd/private",
        "/run/systemd/journal/socket",
        "/dev/log",
    ];
    let mut args = vec!["unix", path_s.as_str(), at_name.as_str()];
    args.extend(well_known);
    let Some(r) = kernel(&args) else {
        return;
    };
    // The path is not in the sandbox's file system (ENOENT); the abstract name lives in the
    // host's network namespace, not the sandbox's (ECONNREFUSED: no such name there).
    let mut want = vec![
        format!("unix {path_s}: ENOENT"),
        format!("unix {at_name}: ECONNREFUSED"),
    ];
    want.extend(well_known.iter().map(|p| format!("unix {p}: ENOENT")));
    assert_lines(&r, "unix", &want);
    by_path.set_nonblocking(true).unwrap();
    assert_no_pending("host unix path", || by_path.accept());
    abstract_l.set_nonblocking(true).unwrap();
    assert_no_pending("host abstract socket", || abstract_l.accept());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_socket_file_is_reachable_in_the_sandbox() {
    // A walk of the sandbox's whole file system (but /proc and /sys) finds no socket.
    // In the gvisor tier every stat of the walk (all of /usr) is a round trip to gVisor's
    // gofer on the ptrace platform: about 30 s of CPU here, so it gets a longer timeout.
    // The agent's own socket is in /.moat, root's and 0700, which the walk cannot enter.
    let r = if gvisor() {
        let Some(dir) = super::attacks_kernel::kernel_dir() else {
            return;
        };
        let mount = format!("{}:/attack", dir.display());
        moat_raw(
            &[
                "run",
                "--json",
                "--timeout",
                "240s",
                "--mount",
                &mount,
                "--",
                "/attack/kernel",
                "socket_files",
            ],
            None,
            std::time::Duration::from_secs(300),
        )
        .json()
    } else {
        let Some(r) = kernel(&["socket_files"]) else {
            return;
        };
        r
    };
    assert_lines(&r, "socket_files", &["socket files: 0"]);
}

#[test]
fn workload_inherits_only_stdio() {
    let Some(r) = kernel(&["fds"]) else {
        return;
    };
    // No descriptor of moat's (pipes, cgroup or namespace fds, sockets) to reuse.
    assert_lines(&r, "fds", &["fds: 0 1 2"]);
}

#[test]
fn loopback_inside_the_sandbox_works() {
    let Some(r) = kernel(&["loopback"]) else {
        return;
    };
    assert_lines(&r, "loopback", &["loopback4: OK", "loopback6: OK"]);
}
