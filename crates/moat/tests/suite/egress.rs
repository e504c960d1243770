//! Egress control (network mode `allowlist`), end to end through the real binary: the
//! workload reaches moat's proxy on its own loopback (127.0.0.1:3128), the agent relays each
//! connection to the proxy in `moat run` or `moat serve`, and the proxy applies the policy.
//!
//! Upstreams are test servers on 127.0.0.2 and 127.0.0.3 (HTTP, and HTTPS with a test CA),
//! reached only through operator settings (`--egress-host NAME=IP` pins, `--egress-allow-cidr`
//! for those two addresses); names the proxy resolves come from a test DNS server on
//! 127.0.0.1. Nothing here sends traffic anywhere else: the IP literals of the attacks are
//! refused before any connection is made, and the proxy is what would make it.

use super::daemon::Daemon;
use super::harness::*;
use moat_api::Status;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/egress/{name}"))
}

/// A test CA and a server certificate it signed for the test names.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new() -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = scratch_dir("egress-certs");
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "moat egress test CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(p, ca_key);
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = ["up.test", "other.test", "a.wild.test", "sec.test"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let leaf = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        Certs { dir }
    }

    fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }
}

/// A test upstream (tests/egress/upstream.py) on a loopback address.
struct Upstream {
    child: Child,
    _stdin: ChildStdin,
    http: u16,
    https: u16,
    log: PathBuf,
}

impl Upstream {
    fn start(bind: &str, name: &str, certs: &Certs) -> Upstream {
        let log = scratch_dir("egress-upstream").join("requests.jsonl");
        let mut child = Command::new("python3")
            .arg(script("upstream.py"))
            .args(["--bind", bind, "--name", name, "--log"])
            .arg(&log)
            .arg("--cert")
            .arg(certs.dir.join("server.pem"))
            .arg("--key")
            .arg(certs.dir.join("server.key"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the test upstream (python3)");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ports: Vec<u16> = line
            .strip_prefix("ports ")
            .unwrap_or_else(|| panic!("upstream said {line:?}"))
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        Upstream {
            child,
            _stdin: stdin,
            http: ports[0],
            https: ports[1],
            log,
        }
    }

    /// Every request it received, in order.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test DNS server (tests/egress/dns.py) on 127.0.0.1.
struct Dns {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
}

impl Dns {
    fn start(table: &[&str]) -> Dns {
        let mut child = Command::new("python3")
            .arg(script("dns.py"))
            .arg("127.0.0.1")
            .args(table)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the test DNS server (python3)");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().strip_prefix("port ").unwrap().parse().unwrap();
        Dns {
            child,
            _stdin: stdin,
            port,
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ready() -> bool {
    require(have("python3"), "python3 (test upstreams)") && require(have("curl"), "curl")
}

/// The operator settings that make the two test upstreams reachable.
fn operator(certs: &Certs) -> Vec<String> {
    [
        "--egress-host",
        "up.test=127.0.0.2",
        "--egress-host",
        "a.wild.test=127.0.0.2",
        "--egress-host",
        "wild.test=127.0.0.2",
        "--egress-host",
        "evil-wild.test=127.0.0.2",
        "--egress-host",
        "other.test=127.0.0.3",
        "--egress-host",
        "sec.test=127.0.0.3",
        "--egress-allow-cidr",
        "127.0.0.2/32",
        "--egress-allow-cidr",
        "127.0.0.3/32",
        "--egress-ca-file",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([certs.ca()])
    .collect()
}

/// `moat run --json` with these options and this shell script; the JSON document (with
/// its `egress` events).
fn run_net(opts: &[String], script: &str, env: &[(&str, &str)]) -> Value {
    let mut args: Vec<&str> = vec!["run", "--json"];
    args.extend(opts.iter().map(String::as_str));
    args.extend(["--", "/bin/sh", "-c", script]);
    let r = moat_raw_env(&args, None, Duration::from_secs(90), env);
    serde_json::from_slice(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON result ({e}); exit {} stdout {} stderr {}",
            r.code,
            r.stdout_str(),
            r.stderr
        )
    })
}

fn stdout(v: &Value) -> &str {
    v["stdout"].as_str().unwrap_or_default()
}

fn with(mut base: Vec<String>, more: &[&str]) -> Vec<String> {
    base.extend(more.iter().map(|s| s.to_string()));
    base
}

/// A Python client that speaks to the proxy by hand: `CONNECT` (or a request line) to each
/// target, printing `TARGET STATUS-LINE | BODY` per attempt.
const RAW_PROXY: &str = r#"
import socket, sys
for t in sys.argv[1:]:
    line = t if " " in t else f"CONNECT {t} HTTP/1.1"
    host = line.split()[1].split("//")[-1].split("/")[0]
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(f"{line}\r\nHost: {host}\r\n\r\n".encode())
    r = b""
    try:
        while True:
            b = s.recv(4096)
            if not b:
                break
            r += b
            if b"\r\n\r\n" in r and not r.startswith(b"HTTP/1.1 200 Connection"):
                head, _, body = r.partition(b"\r\n\r\n")
                n = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                if n and len(body) >= int(n[0].split(b":")[1]):
                    break
            if r.startswith(b"HTTP/1.1 200 Connection"):
                break
    except socket.timeout:
        pass
    head, _, body = r.partition(b"\r\n\r\n")
    print(t, "=>", head.split(b"\r\n")[0].decode(), "|", body.decode().strip())
"#;

#[test]
fn allowed_hosts_answer_curl_python_node_and_socks5_through_the_proxy() {
    if !ready() || !require(have("node"), "node") {
        return;
    }
    let certs = Certs::new();
    let up = Upstream::start("127.0.0.2", "up", &certs);
    let opts = with(
        operator(&certs),
        &[
            "--net",
            "allow:up.test",
            "--mount",
            &format!("{}:/certs", certs.dir.display()),
        ],
    );
    let (h, s) = (up.http, up.https);
    let node = format!(
        r#"const http = require('http'), tls = require('tls');
http.get({{host: '127.0.0.1', port: 3128, path: 'http://up.test:{h}/node-http',
          headers: {{Host: 'up.test:{h}'}}}}, r => {{ r.pipe(process.stdout);
  r.on('end', () => {{
    const c = http.request({{host: '127.0.0.1', port: 3128, method: 'CONNECT', path: 'up.test:{s}'}});
    c.on('connect', (res, sock) => {{
      const t = tls.connect({{socket: sock, servername: 'up.test',
                             ca: require('fs').readFileSync('/certs/ca.pem')}}, () => {{
        t.write('GET /node-https HTTP/1.1\r\nHost: up.test\r\nConnection: close\r\n\r\n');
      }});
      let got = '';
      t.on('data', d => {{ got += d.toString(); }});
      t.on('end', () => process.stdout.write(got.split('\r\n\r\n')[1] || got));
    }});
    c.end();
  }});
}});"#
    );
    std::fs::write(certs.dir.join("client.js"), node).unwrap();
    let script = format!(
        "set -e; echo proxy=$HTTP_PROXY all=$ALL_PROXY no=$NO_PROXY; \
         curl -sS http://up.test:{h}/curl-http; \
         curl -sS --cacert /certs/ca.pem https://up.test:{s}/curl-https; \
         curl -sS --noproxy '' -x socks5h://127.0.0.1:3128 http://up.test:{h}/curl-socks; \
         python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://up.test:{h}/urllib\").read().decode().strip())'; \
         python3 -c 'import requests; print(requests.get(\"https://up.test:{s}/requests\", verify=\"/certs/ca.pem\").text.strip())'; \
         node /certs/client.js"
    );
    let r = run_net(&opts, &script, &[]);
    assert_eq!(r["status"], "ok", "{r:#}");
    let out = stdout(&r);
    assert!(
        out.starts_with(
            "proxy=http://127.0.0.1:3128 all=socks5h://127.0.0.1:3128 no=localhost,127.0.0.1\n"
        ),
        "{out}"
    );
    for (server, path) in [
        ("up-http", "/curl-http"),
        ("up-https", "/curl-https"),
        ("up-http", "/curl-socks"),
        ("up-http", "/urllib"),
        ("up-https", "/requests"),
        ("up-http", "/node-http"),
        ("up-https", "/node-https"),
    ] {
        assert!(
            out.contains(&format!("hello from {server} {path}\n")),
            "{path}: {r:#}"
        );
    }
    let paths: Vec<String> = up
        .requests()
        .iter()
        .map(|q| q["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(paths.len(), 7, "{paths:?}");
    // Every connection is on the record, each with its rule, address and bytes.
    let events = r["egress"].as_array().unwrap();
    assert_eq!(events.len(), 7, "{events:#?}");
    for e in events {
        assert_eq!(e["decision"], "allow", "{e}");
        assert_eq!(e["rule"], "up.test", "{e}");
        assert_eq!(e["host"], "up.test", "{e}");
        assert!(e["addr"].as_str().unwrap().starts_with("127.0.0.2:"), "{e}");
        assert!(e["bytes_up"].as_u64().unwrap() > 0, "{e}");
        assert!(e["bytes_down"].as_u64().unwrap() > 0, "{e}");
        assert_eq!(e["intercepted"], false, "{e}");
    }
    let protocols: Vec<&str> = events
        .iter()
        .map(|e| e["protocol"].as_str().unwrap())
        .collect();
    assert!(
        protocols.contains(&"socks5")
            && protocols.contains(&"connect")
            && protocols.contains(&"http"),
        "{protocols:?}"
    );
}

#[test]
fn denied_hosts_get_a_403_naming_the_reason_deny_beats_allow_and_wildcards_are_exact() {
    if !ready() {
        return;
    }
    let certs = Certs::new();
    let up = Upstream::start("127.0.0.2", "up", &certs);
    let opts = with(
        operator(&certs),
        &[
            "--net",
            "allow:up.test,*.wild.test,other.test",
            "--net-deny",
            "other.test",
        ],
    );
    let h = up.http;
    let script = format!(
        "for u in http://a.wild.test:{h}/sub http://evil-wild.test:{h}/x http://wild.test:{h}/apex \
                  http://other.test:{h}/denied http://nowhere.test/ ; do \
           echo \"$u $(curl -s -o /tmp/b -w '%{{http_code}}' $u) $(cat /tmp/b)\"; done"
    );
    let r = run_net(&opts, &script, &[]);
    assert_eq!(r["status"], "ok", "{r:#}");
    let out = stdout(&r);
    let line = |prefix: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line for {prefix}: {out}"))
            .to_string()
    };
    assert_eq!(
        line(&format!("http://a.wild.test:{h}/sub")),
        format!("http://a.wild.test:{h}/sub 200 hello from up-http /sub")
    );
    assert_eq!(
        line(&format!("http://evil-wild.test:{h}/x")),
        format!("http://evil-wild.test:{h}/x 403 moat egress: denied: host evil-wild.test is not in the allowlist")
    );
    assert_eq!(
        line(&format!("http://wild.test:{h}/apex")),
        format!("http://wild.test:{h}/apex 403 moat egress: denied: host wild.test is not in the allowlist")
    );
    assert_eq!(
        line(&format!("http://other.test:{h}/denied")),
        format!("http://other.test:{h}/denied 403 moat egress: denied: host other.test port {h} is denied by rule `other.test`")
    );
    assert!(
        line("http://nowhere.test/")
            .ends_with(" 403 moat egress: denied: host nowhere.test is not in the allowlist"),
        "{out}"
    );
    // Only the one allowed request reached an upstream.
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0]["path"], "/sub");
    let events = r["egress"].as_array().unwrap();
    let decisions: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["host"].as_str().unwrap(), e["decision"].as_str().unwrap()))
        .collect();
    assert_eq!(
        decisions,
        vec![
            ("a.wild.test", "allow"),
            ("evil-wild.test", "deny"),
            ("wild.test", "deny"),
            ("other.test", "deny"),
            ("nowhere.test", "deny"),
        ]
    );
    assert_eq!(events[3]["rule"], "other.test");
    assert_eq!(events[0]["rule"], "*.wild.test");
}

#[test]
fn the_proxy_refuses_ip_literals_private_ranges_metadata_and_names_that_resolve_to_them() {
    if !ready() {
        return;
    }
    // Names that resolve (through the test DNS server) to loopback and private addresses;
    // and one that resolves to the test upstream, to prove resolution works at all.
    let certs = Certs::new();
    let up = Upstream::start("127.0.0.2", "up", &certs);
    let dns = Dns::start(&[
        "rebind.test=127.0.0.1",
        "private.test=10.1.2.3",
        "meta.test=169.254.169.254",
        "cgnat.test=100.64.0.1",
        "good.test=127.0.0.2",
    ]);
    std::fs::write(certs.dir.join("raw.py"), RAW_PROXY).unwrap();
    let mount = format!("{}:/t", certs.dir.display());
    // No operator range at all, and every IP allowed by the sandbox's own rules: the
    // address guard alone must refuse each one.
    let opts: Vec<String> = [
        "--net",
        "allow:*.test,0.0.0.0/0,::/0",
        "--egress-dns",
        &format!("127.0.0.1:{}", dns.port),
        "--mount",
        &mount,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let targets = [
        "127.0.0.1:7070",
        "127.0.0.2:80",
        "10.0.0.1:443",
        "192.168.1.1:443",
        "172.16.0.1:443",
        "169.254.169.254:80",
        "100.64.0.1:443",
        "198.18.0.1:443",
        "0.0.0.0:80",
        "224.0.0.1:80",
        "[::1]:443",
        "[fd00:ec2::254]:80",
        "[fe80::1]:443",
        "[::ffff:127.0.0.1]:443",
        "rebind.test:80",
        "private.test:443",
        "meta.test:80",
        "cgnat.test:443",
        "missing.test:443",
    ];
    let r = run_net(
        &opts,
        &format!("python3 /t/raw.py {}", targets.join(" ")),
        &[],
    );
    assert_eq!(r["status"], "ok", "{r:#}");
    let out = stdout(&r);
    let expect = [
        ("127.0.0.1:7070", "127.0.0.1 is a loopback address"),
        ("127.0.0.2:80", "127.0.0.2 is a loopback address"),
        ("10.0.0.1:443", "10.0.0.1 is a private address"),
        ("192.168.1.1:443", "192.168.1.1 is a private address"),
        ("172.16.0.1:443", "172.16.0.1 is a private address"),
        (
            "169.254.169.254:80",
            "169.254.169.254 is a cloud metadata address",
        ),
        (
            "100.64.0.1:443",
            "100.64.0.1 is a carrier-grade NAT (shared) address",
        ),
        ("198.18.0.1:443", "198.18.0.1 is a benchmarking address"),
        ("0.0.0.0:80", "0.0.0.0 is an unspecified address"),
        ("224.0.0.1:80", "224.0.0.1 is a multicast address"),
        ("[::1]:443", "::1 is a loopback address"),
        (
            "[fd00:ec2::254]:80",
            "fd00:ec2::254 is a cloud metadata address",
        ),
        ("[fe80::1]:443", "fe80::1 is a link-local address"),
        ("[::ffff:127.0.0.1]:443", "is a loopback address"),
        (
            "rebind.test:80",
            "rebind.test resolves to 127.0.0.1, a loopback address",
        ),
        (
            "private.test:443",
            "private.test resolves to 10.1.2.3, a private address",
        ),
        (
            "meta.test:80",
            "meta.test resolves to 169.254.169.254, a cloud metadata address",
        ),
        ("cgnat.test:443", "cgnat.test resolves to 100.64.0.1"),
        ("missing.test:443", "cannot resolve missing.test"),
    ];
    for (t, why) in expect {
        let l = out
            .lines()
            .find(|l| l.starts_with(&format!("{t} =>")))
            .unwrap_or_else(|| panic!("no answer for {t}: {out}"));
        assert!(
            l.contains("HTTP/1.1 403") || (t == "missing.test:443" && l.contains("HTTP/1.1 50")),
            "{t}: {l}"
        );
        assert!(l.contains(why), "{t}: expected {why:?} in {l}");
    }
    // Nothing reached the upstream on 127.0.0.2 (its address is loopback, refused).
    assert!(up.requests().is_empty());
    let events = r["egress"].as_array().unwrap();
    assert_eq!(events.len(), targets.len(), "{events:#?}");
    assert!(
        events
            .iter()
            .all(|e| e["decision"] == "deny" || e["host"] == "missing.test"),
        "{events:#?}"
    );
    // An IP literal without a CIDR rule is refused too (here by its address class first:
    // the proxy never connects to find out).
    let opts2: Vec<String> = ["--net", "allow:*.test", "--mount", &mount]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let r = run_net(&opts2, "python3 /t/raw.py 203.0.113.9:443", &[]);
    assert!(
        stdout(&r).contains(
            "403 Forbidden | moat egress: denied: 203.0.113.9 is a documentation address"
        ),
        "{r:#}"
    );
    drop(dns);
}

#[test]
fn a_host_header_or_tls_server_name_that_differs_from_the_target_is_refused() {
    if !ready() {
        return;
    }
    let certs = Certs::new();
    let up = Upstream::start("127.0.0.2", "up", &certs);
    let opts = with(operator(&certs), &["--net", "allow:up.test"]);
    let h = up.http;
    // Plain HTTP: absolute URL for up.test, Host header naming another host.
    let script = format!(
        "curl -s -o /tmp/b -w '%{{http_code}}' -H 'Host: evil.test' http://up.test:{h}/fronted; echo \" $(cat /tmp/b)\""
    );
    let r = run_net(&opts, &script, &[]);
    let out = stdout(&r);
    assert!(out.starts_with("400 moat egress:"), "{out}");
    assert!(out.contains("evil.test"), "{out}");
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    // CONNECT to up.test with a Host header for another host; then a tunnel to up.test
    // whose TLS handshake asks for another name (domain fronting); then the honest one.
    let s = up.https;
    let fronting = format!(
        r#"
import socket, ssl
def tunnel(host_header):
    c = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    c.sendall(f"CONNECT up.test:{s} HTTP/1.1\r\nHost: {{host_header}}\r\n\r\n".encode())
    head = c.recv(4096).split(b"\r\n")[0].decode()
    return c, head
c, head = tunnel("evil.test:{s}")
print("host-mismatch", head)
for sni in ["evil.test", "up.test"]:
    c, head = tunnel("up.test:{s}")
    ctx = ssl.create_default_context(cafile="/certs/ca.pem")
    ctx.check_hostname = False
    try:
        t = ctx.wrap_socket(c, server_hostname=sni)
        t.sendall(b"GET /sni-" + sni.encode() + b" HTTP/1.1\r\nHost: up.test\r\nConnection: close\r\n\r\n")
        print("sni", sni, head, t.recv(4096).split(b"\r\n")[0].decode())
    except (ssl.SSLError, OSError) as e:
        print("sni", sni, head, "refused", type(e).__name__)
"#
    );
    std::fs::write(certs.dir.join("front.py"), fronting).unwrap();
    let opts = with(
        opts,
        &["--mount", &format!("{}:/certs", certs.dir.display())],
    );
    let r = run_net(&opts, "python3 /certs/front.py", &[]);
    let out = stdout(&r);
    assert!(
        out.contains("host-mismatch HTTP/1.1 400 Bad Request"),
        "{r:#}"
    );
    assert!(
        out.contains("sni evil.test HTTP/1.1 200 Connection established refused"),
        "{r:#}"
    );
    assert!(
        out.contains("sni up.test HTTP/1.1 200 Connection established HTTP/1.1 200 OK"),
        "{r:#}"
    );
    let paths: Vec<Value> = up.requests().iter().map(|q| q["path"].clone()).collect();
    assert_eq!(paths, vec![json!("/sni-up.test")]);
    let events = r["egress"].as_array().unwrap();
    let fronted = events
        .iter()
        .find(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("TLS server name"))
        })
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(fronted["decision"], "deny");
    assert_eq!(
        fronted["reason"],
        "TLS server name evil.test does not match the CONNECT target up.test"
    );
}

#[test]
fn direct_sockets_dns_and_raw_sockets_stay_dead_in_allowlist_mode() {
    if !ready() {
        return;
    }
    let script = r#"
import errno, socket
def attempt(name, f):
    try:
        f()
        print(name, "OPEN")
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno) if e.errno else type(e).__name__)
def tcp(fam, addr):
    s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(2); s.connect(addr)
def udp(addr):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b"x", addr)
attempt("tcp4", lambda: tcp(socket.AF_INET, ("192.0.2.1", 443)))
attempt("tcp6", lambda: tcp(socket.AF_INET6, ("2001:db8::1", 443)))
attempt("udp53", lambda: udp(("192.0.2.53", 53)))
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
try:
    socket.getaddrinfo("example.com", 443)
    print("dns OPEN")
except socket.gaierror as e:
    print("dns", "gaierror")
print("ifaces", " ".join(n for _, n in socket.if_nameindex()))
"#;
    let opts: Vec<String> = ["--net", "allow:example.com"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let r = run_net(
        &opts,
        &format!("python3 -c '{}'", script.replace('\'', "\"")),
        &[],
    );
    assert_eq!(r["status"], "ok", "{r:#}");
    let out = stdout(&r);
    // Accepted outcome in the gvisor tier: the sandbox's network is gVisor's netstack with
    // only loopback (the proxy is reached through the agent's relay), whose answer for a
    // destination without a route is EHOSTUNREACH.
    let no_route = if gvisor() {
        "EHOSTUNREACH"
    } else {
        "ENETUNREACH"
    };
    for want in [
        &format!("tcp4 {no_route}"),
        &format!("tcp6 {no_route}"),
        &format!("udp53 {no_route}"),
        "raw EPERM",
        // The seccomp filter refuses the family itself.
        "packet EAFNOSUPPORT",
        "dns gaierror",
        "ifaces lo",
    ] {
        assert!(out.lines().any(|l| l == want), "{want}: {out}");
    }
}

#[test]
fn a_secret_reaches_only_its_host_and_never_the_sandbox() {
    if !ready() {
        return;
    }
    let certs = Certs::new();
    let sec = Upstream::start("127.0.0.3", "sec", &certs);
    let up = Upstream::start("127.0.0.2", "up", &certs);
    let value = format!("sk-live-{}", std::process::id() * 7919);
    let opts = with(
        operator(&certs),
        &[
            "--net",
            "allow:sec.test,up.test",
            "--secret",
            "API_TOKEN=sec.test",
            "--mount",
            &format!("{}:/certs", certs.dir.display()),
        ],
    );
    let (s, h, us) = (sec.https, sec.http, up.https);
    let script = format!(
        "echo token=$API_TOKEN; \
         curl -sS -H \"Authorization: Bearer $API_TOKEN\" -d \"body=$API_TOKEN\" https://sec.test:{s}/bound; \
         python3 -c 'import os, requests; print(requests.get(\"https://sec.test:{s}/py\", headers={{\"X-Key\": os.environ[\"API_TOKEN\"]}}).text.strip())'; \
         curl -sS -H \"Authorization: Bearer $API_TOKEN\" http://sec.test:{h}/cleartext; \
         curl -sS --cacert /certs/ca.pem -H \"Authorization: Bearer $API_TOKEN\" https://up.test:{us}/unbound 2>&1; \
         echo; grep -rl \"$SECRET_PROBE\" /etc /tmp /work /proc/*/environ /proc/*/cmdline 2>/dev/null | head -3; \
         python3 -c 'import os; print(\"env-has-value\", any(os.environ[\"SECRET_PROBE\"] in v for v in os.environ.values() if v != os.environ[\"SECRET_PROBE\"]))'; \
         python3 /certs/mem.py"
    );
    // A process that made an intercepted request, its memory read afterwards by another
    // (through /proc/PID/mem): the placeholder is there (the scan works), the value not.
    let mem = format!(
        r#"
import os, subprocess
probe = os.environ["SECRET_PROBE"].encode()
placeholder = os.environ["API_TOKEN"].encode()
child = ('import os, requests, time; r = requests.get("https://sec.test:{s}/mem", '
         'headers={{"Authorization": "Bearer " + os.environ["API_TOKEN"]}}); '
         'print(r.text.strip(), flush=True); time.sleep(60)')
env = {{k: v for k, v in os.environ.items() if k != "SECRET_PROBE"}}
p = subprocess.Popen(["python3", "-c", child], env=env, stdout=subprocess.PIPE)
said = p.stdout.readline().decode().strip()
scanned, has_placeholder, has_value = 0, False, False
with open(f"/proc/{{p.pid}}/maps") as maps, open(f"/proc/{{p.pid}}/mem", "rb", 0) as mem:
    for line in maps:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if "r" not in line.split()[1]:
            continue
        try:
            mem.seek(lo)
            chunk = mem.read(hi - lo)
        except (OSError, OverflowError, ValueError):
            continue
        scanned += len(chunk)
        has_placeholder |= placeholder in chunk
        has_value |= probe in chunk
print("mem", said, "|", scanned > 1 << 20, "placeholder", has_placeholder, "value", has_value)
p.kill()
"#
    );
    std::fs::write(certs.dir.join("mem.py"), mem).unwrap();
    // SECRET_PROBE lets the sandbox search for the value without holding it: it is the
    // value reversed, and the search reverses it back only inside grep's pattern... which
    // would put it in the sandbox. So the probe is a fragment of the value instead: the
    // random tail, which the placeholder does not contain.
    let probe = value.trim_start_matches("sk-live-").to_string();
    let opts = with(opts, &["-e", &format!("SECRET_PROBE={probe}")]);
    let r = run_net(&opts, &script, &[("API_TOKEN", value.as_str())]);
    assert_eq!(r["status"], "ok", "{r:#}");
    let out = stdout(&r);
    assert!(!out.contains(&value), "the sandbox saw the value: {out}");
    let placeholder = out
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("token="))
        .unwrap()
        .to_string();
    assert!(
        placeholder.starts_with("moat-placeholder-api_token-"),
        "{r:#}"
    );
    assert!(out.contains("hello from sec-https /bound"), "{r:#}");
    assert!(out.contains("hello from sec-https /py"), "{r:#}");
    assert!(out.contains("hello from sec-http /cleartext"), "{r:#}");
    assert!(out.contains("hello from up-https /unbound"), "{r:#}");
    assert!(out.contains("env-has-value False"), "{r:#}");
    assert!(
        out.contains("mem hello from sec-https /mem | True placeholder True value False"),
        "{r:#}"
    );
    // No file, environment or command line in the sandbox held the value's tail other
    // than SECRET_PROBE's own (/proc/*/environ of the shell and its children hold it).
    for l in out.lines().filter(|l| l.starts_with('/')) {
        assert!(
            l.starts_with("/proc/") && l.ends_with("/environ"),
            "{l}: {r:#}"
        );
    }
    // The bound host got the value in headers, and only in headers.
    let reqs = sec.requests();
    let bound = reqs.iter().find(|q| q["path"] == "/bound").unwrap();
    assert_eq!(bound["headers"]["Authorization"], format!("Bearer {value}"));
    assert_eq!(bound["body"], format!("body={placeholder}"));
    let py = reqs.iter().find(|q| q["path"] == "/py").unwrap();
    assert_eq!(py["headers"]["X-Key"], value);
    // Over cleartext HTTP the proxy does not inject: the placeholder arrives.
    let clear = reqs.iter().find(|q| q["path"] == "/cleartext").unwrap();
    assert_eq!(
        clear["headers"]["Authorization"],
        format!("Bearer {placeholder}")
    );
    // A host the secret is not bound to gets the useless placeholder, over plain TLS.
    let unbound = &up.requests()[0];
    assert_eq!(
        unbound["headers"]["Authorization"],
        format!("Bearer {placeholder}")
    );
    let events = r["egress"].as_array().unwrap();
    let intercepted: Vec<bool> = events
        .iter()
        .map(|e| e["intercepted"].as_bool().unwrap())
        .collect();
    assert_eq!(
        intercepted,
        vec![true, true, false, false, true],
        "{events:#?}"
    );
    let mem_req = reqs.iter().find(|q| q["path"] == "/mem").unwrap();
    assert_eq!(
        mem_req["headers"]["Authorization"],
        format!("Bearer {value}")
    );
    // Nothing of the value in the result either (stderr included).
    assert!(!r.to_string().contains(&value));
}

#[test]
fn the_daemon_audits_every_connection_counts_denials_and_kills_past_the_limit() {
    if !ready() {
        return;
    }
    let certs = Certs::new();
    let up = Upstream::start("127.0.0.2", "up", &certs);
    let sec = Upstream::start("127.0.0.3", "sec", &certs);
    let op = operator(&certs);
    let op: Vec<&str> = op.iter().map(String::as_str).collect();
    let d = Daemon::start_with(&op);
    let id = d.create(json!({
        "policy": {"network": {"mode": "allowlist", "allow": ["up.test", "sec.test"],
                               "max_denials": 3, "secrets": {"TOKEN": ["sec.test"]}}},
        "secrets": {"TOKEN": "tok-value-4242"},
    }));
    let shown = d.api("GET", &format!("/v1/sandboxes/{id}"), None);
    assert!(!shown.text().contains("tok-value-4242"), "{}", shown.text());
    let (h, s) = (up.http, sec.https);
    let r = d.sh(
        &id,
        &format!(
            "curl -sS http://up.test:{h}/a; curl -sS -H \"X-T: $TOKEN\" https://sec.test:{s}/b; \
             curl -s -o /dev/null -w '%{{http_code}}\\n' http://evil.test/; echo $TOKEN"
        ),
    );
    let out = r["stdout"].as_str().unwrap();
    assert!(out.contains("hello from up-http /a"), "{r}");
    assert!(out.contains("hello from sec-https /b"), "{r}");
    assert!(out.contains("403\n"), "{r}");
    assert!(!out.contains("tok-value-4242"), "{r}");
    assert_eq!(sec.requests()[0]["headers"]["X-T"], "tok-value-4242");
    // Every attempt is an audit event of kind `egress`, with its decision and numbers.
    // An allowed connection's event comes when it closes, written right after: wait for all
    // three, and find each by its host (a close may be seen after the next one's start).
    let mut list = json!({});
    for _ in 0..50 {
        list = d
            .api(
                "GET",
                &format!("/v1/sandboxes/{id}/events?kind=egress"),
                None,
            )
            .json();
        if list["events"].as_array().is_some_and(|v| v.len() >= 3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let events: Vec<&Value> = list["events"].as_array().unwrap().iter().collect();
    assert_eq!(events.len(), 3, "{list:#}");
    let by_host = |h: &str| {
        events
            .iter()
            .map(|e| &e["data"])
            .find(|d| d["host"] == h)
            .unwrap_or_else(|| panic!("no event for {h}: {list:#}"))
    };
    let up_ev = by_host("up.test");
    assert_eq!(up_ev["decision"], "allow");
    assert!(up_ev["bytes_down"].as_u64().unwrap() > 0);
    assert_eq!(by_host("sec.test")["intercepted"], true);
    let evil = by_host("evil.test");
    assert_eq!(evil["decision"], "deny");
    assert_eq!(evil["reason"], "host evil.test is not in the allowlist");
    let metrics = d.api("GET", "/metrics", None).text();
    assert!(metrics.contains("moat_egress_denied_total 1"), "{metrics}");
    assert!(metrics.contains("moat_egress_allowed_total 2"), "{metrics}");
    // Two more denials reach max_denials = 3: the sandbox is destroyed.
    let _ = d.api(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"shell": "curl -s http://evil.test/; curl -s http://evil2.test/; sleep 30"})),
    );
    let mut gone = false;
    for _ in 0..100 {
        if d.api("GET", &format!("/v1/sandboxes/{id}"), None).status == 404 {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gone, "the sandbox outlived its denial limit");
    // The destroy's audit event is written right after the sandbox leaves the registry.
    let mut text = String::new();
    for _ in 0..50 {
        text = d
            .api("GET", "/v1/events?kind=sandbox_destroyed", None)
            .text();
        if text.contains("egress_denials") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        text.contains(&id) && text.contains("egress_denials"),
        "{text}"
    );
    assert!(d.cgroups_left(Duration::from_secs(10)).is_empty());
}

#[test]
fn a_bad_network_request_is_a_clear_error() {
    for (opts, want) in [
        (
            vec!["--net", "open"],
            "write `none` or `allow:HOST,HOST,...`",
        ),
        (
            vec!["--net", "allow:exa mple.com"],
            "egress rule `exa mple.com`",
        ),
        (
            vec!["--net", "allow:x.com", "--secret", "NOPE=x.com"],
            "secret NOPE is bound in network.secrets but not set",
        ),
        (
            vec!["--net", "allow:x.com", "--egress-host", "bad"],
            "--egress-host bad: write NAME=IP",
        ),
        (vec!["--secret", "K=x.com"], "need mode = \"allowlist\""),
    ] {
        let mut args = vec!["run"];
        args.extend(opts.iter().copied());
        args.extend(["--", "true"]);
        let r = moat_raw(&args, None, Duration::from_secs(30));
        assert_eq!(r.code, 125, "{opts:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{opts:?}: {}", r.stderr);
    }
    let _ = Status::Ok;
}

#[test]
fn egress_and_its_secrets_survive_a_daemon_restart() {
    if !ready() {
        return;
    }
    let certs = Certs::new();
    let sec = Upstream::start("127.0.0.3", "sec", &certs);
    let op = operator(&certs);
    let op: Vec<&str> = op.iter().map(String::as_str).collect();
    let mut d = Daemon::start_with(&op);
    let id = d.create(json!({
        "policy": {"network": {"mode": "allowlist", "allow": ["sec.test"],
                               "secrets": {"TOKEN": ["sec.test"]}}},
        "secrets": {"TOKEN": "restart-value-77"},
    }));
    let s = sec.https;
    let call = format!("curl -sS -H \"X-T: $TOKEN\" https://sec.test:{s}/n");
    let before = d.sh(&id, &call.replace("/n", "/before"));
    assert!(
        before["stdout"]
            .as_str()
            .unwrap()
            .contains("hello from sec-https /before"),
        "{before}"
    );
    // The saved secrets are root-only and outside the sandbox's directory.
    let saved = d.state.join("egress").join(format!("{id}.json"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
    d.kill9();
    d.restart();
    let after = d.sh(&id, &call.replace("/n", "/after"));
    assert!(
        after["stdout"]
            .as_str()
            .unwrap()
            .contains("hello from sec-https /after"),
        "{after}"
    );
    let reqs = sec.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    for q in &reqs {
        assert_eq!(q["headers"]["X-T"], "restart-value-77", "{q}");
    }
    let gone = d.api("DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert!(gone.status < 300, "{}", gone.text());
    assert!(!saved.exists(), "the saved secrets outlived their sandbox");
}
