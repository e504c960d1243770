//! Against a scripted HTTP server, for what a real registry will not do on demand: bearer
//! and basic auth, redirects to another host, wrong digests, errors and garbage.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use moat_image::{ImageError, NoProgress, PullOptions, Store};
use serde_json::json;

use super::support::*;

/// What the server saw.
#[derive(Clone, Debug)]
struct Request {
    path: String,
    headers: HashMap<String, String>,
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn new(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }
    fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// A tiny HTTP/1.1 server: one request per connection, handled by `handler`; over TLS
/// when given a rustls config.
struct Server {
    addr: String,
    seen: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ip: &str, handler: Arc<Handler>) -> Server {
        Server::start_tls(ip, handler, None)
    }

    fn start_tls(
        ip: &str,
        handler: Arc<Handler>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Server {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                match &tls {
                    None => serve(conn, &*handler, &s),
                    Some(cfg) => {
                        let tls = rustls::ServerConnection::new(cfg.clone()).unwrap();
                        serve(rustls::StreamOwned::new(tls, conn), &*handler, &s)
                    }
                }
            }
        });
        Server {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: impl Read + Write, handler: &Handler, seen: &Mutex<Vec<Request>>) {
    // The request head, byte by byte (requests are small; nothing is read past it).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string();
    let mut headers = HashMap::new();
    for h in lines {
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let req = Request { path, headers };
    seen.lock().unwrap().push(req.clone());
    let reply = handler(&req);
    let mut out = conn;
    let mut head = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
    let _ = out.write_all(&reply.body);
    let _ = out.flush();
}

/// A one-layer image: its blobs by digest, and its manifest.
struct Image {
    blobs: HashMap<String, Vec<u8>>,
    manifest: Vec<u8>,
    manifest_digest: String,
    layer_digest: String,
}

fn image() -> Image {
    let tar = LayerTar::default()
        .file("hello", 0o644, b"from the fake registry\n")
        .done();
    let layer = gzip(&tar);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&tar)]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha256(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let layer_digest = sha256(&layer);
    let mut blobs = HashMap::new();
    blobs.insert(sha256(&config), config);
    blobs.insert(layer_digest.clone(), layer);
    Image {
        manifest_digest: sha256(&manifest),
        blobs,
        manifest,
        layer_digest,
    }
}

/// Serves `img` under `/v2/test/img/` (manifest tag `v1`).
fn registry_reply(img: &Image, req: &Request) -> Reply {
    if req.path == "/v2/test/img/manifests/v1"
        || req.path == format!("/v2/test/img/manifests/{}", img.manifest_digest)
    {
        return Reply::new(200, img.manifest.clone())
            .header("Content-Type", OCI_MANIFEST)
            .header("Docker-Content-Digest", &img.manifest_digest);
    }
    if let Some(d) = req.path.strip_prefix("/v2/test/img/blobs/") {
        if let Some(b) = img.blobs.get(d) {
            return Reply::new(200, b.clone());
        }
    }
    Reply::new(
        404,
        r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
    )
}

fn assert_clean(store: &Store) {
    assert!(
        names(&store.root().join("tmp")).is_empty(),
        "tmp left behind"
    );
    assert!(
        names(&store.root().join("rootfs")).is_empty(),
        "rootfs left behind"
    );
    assert!(
        names(&store.root().join("index")).is_empty(),
        "index left behind"
    );
}

#[test]
fn bearer_auth_and_a_redirect_to_another_host_without_the_token() {
    let img = Arc::new(image());
    // The blob store: another host (127.0.0.2), as a CDN would be.
    let cdn_img = img.clone();
    let cdn = Server::start(
        "127.0.0.2",
        Arc::new(move |req: &Request| match req.path.strip_prefix("/cdn/") {
            Some(d) => Reply::new(200, cdn_img.blobs[d].clone()),
            None => Reply::new(404, ""),
        }),
    );
    let cdn_addr = cdn.addr.clone();
    let realm: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
    let realm2 = realm.clone();
    let reg_img = img.clone();
    let reg = Server::start(
        "127.0.0.1",
        Arc::new(move |req: &Request| {
            if req.path.starts_with("/token?") {
                // user:secret
                if req.headers.get("authorization").map(String::as_str)
                    != Some("Basic dXNlcjpzZWNyZXQ=")
                {
                    return Reply::new(401, "");
                }
                return Reply::new(200, r#"{"access_token":"tok123","expires_in":300}"#);
            }
            if req.headers.get("authorization").map(String::as_str) != Some("Bearer tok123") {
                let challenge = format!(
                    r#"Bearer realm="{}",service="fake",scope="repository:test/img:pull""#,
                    realm2.lock().unwrap()
                );
                return Reply::new(401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#)
                    .header("WWW-Authenticate", &challenge);
            }
            if req.path == format!("/v2/test/img/blobs/{}", reg_img.layer_digest) {
                return Reply::new(307, "").header(
                    "Location",
                    &format!("http://{cdn_addr}/cdn/{}", reg_img.layer_digest),
                );
            }
            registry_reply(&reg_img, req)
        }),
    );
    *realm.lock().unwrap() = format!("http://{}/token", reg.addr);

    let work = TempDir::new("moat-image-fake");
    let store = Store::open(work.path()).unwrap();
    let reference = format!("{}/test/img:v1", reg.addr);

    // Without credentials the token endpoint says no.
    let e = store
        .pull(&reference, &PullOptions::default(), &mut NoProgress)
        .unwrap_err();
    assert!(
        matches!(&e, ImageError::Registry(m) if m.contains("refused the credentials") && m.contains("--username")),
        "{e}"
    );
    assert_clean(&store);

    let opts = PullOptions {
        username: Some("user".into()),
        password: Some("secret".into()),
        ..Default::default()
    };
    let t = store.pull(&reference, &opts, &mut NoProgress).unwrap();
    assert_eq!(t.name, "test/img:v1");
    assert_eq!(t.digest, img.manifest_digest);
    assert_eq!(
        std::fs::read(t.rootfs.join("hello")).unwrap(),
        b"from the fake registry\n"
    );
    assert_eq!(t.config.cmd, ["/hello"]);

    let seen = reg.requests();
    // The token was fetched once for the pull (cached), and then sent to the registry.
    let second_pull: Vec<&Request> = seen
        .iter()
        .skip_while(|r| !r.path.starts_with("/token?"))
        .skip(1)
        .collect();
    let tokens = second_pull
        .iter()
        .filter(|r| r.path.starts_with("/token?"))
        .count();
    assert_eq!(tokens, 1, "{seen:#?}");
    let token_req = second_pull
        .iter()
        .find(|r| r.path.starts_with("/token?"))
        .unwrap();
    assert!(
        token_req.path.contains("service=fake"),
        "{}",
        token_req.path
    );
    assert!(
        token_req
            .path
            .contains("scope=repository%3Atest%2Fimg%3Apull"),
        "{}",
        token_req.path
    );
    let blob_req = seen
        .iter()
        .rev()
        .find(|r| r.path.contains(&img.layer_digest))
        .unwrap();
    assert_eq!(
        blob_req.headers.get("authorization").map(String::as_str),
        Some("Bearer tok123")
    );
    // The redirected blob request reached the other host without the registry's token.
    let cdn_seen = cdn.requests();
    assert_eq!(cdn_seen.len(), 1, "{cdn_seen:#?}");
    assert!(cdn_seen[0].path.starts_with("/cdn/"));
    assert!(
        !cdn_seen[0].headers.contains_key("authorization"),
        "{cdn_seen:#?}"
    );
}

#[test]
fn basic_auth() {
    let img = Arc::new(image());
    let reg_img = img.clone();
    let reg = Server::start(
        "127.0.0.1",
        Arc::new(move |req: &Request| {
            if req.headers.get("authorization").map(String::as_str)
                != Some("Basic dXNlcjpzZWNyZXQ=")
            {
                return Reply::new(401, "").header("WWW-Authenticate", r#"Basic realm="fake""#);
            }
            registry_reply(&reg_img, req)
        }),
    );
    let work = TempDir::new("moat-image-basic");
    let store = Store::open(work.path()).unwrap();
    let reference = format!("{}/test/img:v1", reg.addr);
    let e = store
        .pull(&reference, &PullOptions::default(), &mut NoProgress)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{} needs credentials: pass --username and --password, or run `docker login {}`",
            reg.addr, reg.addr
        )
    );
    let opts = PullOptions {
        username: Some("user".into()),
        password: Some("secret".into()),
        ..Default::default()
    };
    let t = store.pull(&reference, &opts, &mut NoProgress).unwrap();
    assert_eq!(
        std::fs::read(t.rootfs.join("hello")).unwrap(),
        b"from the fake registry\n"
    );
    let wrong = PullOptions {
        username: Some("user".into()),
        password: Some("wrong".into()),
        ..Default::default()
    };
    let e = store.pull(&reference, &wrong, &mut NoProgress).unwrap_err();
    assert!(
        matches!(&e, ImageError::Registry(m) if m.contains("denied access")),
        "{e}"
    );
}

#[test]
fn wrong_content_is_refused_and_nothing_is_left_behind() {
    let img = Arc::new(image());
    let mode: Arc<Mutex<&'static str>> = Arc::new(Mutex::new("layer"));
    let m2 = mode.clone();
    let reg_img = img.clone();
    let reg = Server::start(
        "127.0.0.1",
        Arc::new(move |req: &Request| {
            let mode = *m2.lock().unwrap();
            let is_layer = req.path.ends_with(&reg_img.layer_digest);
            let is_manifest = req.path.contains("/manifests/");
            match mode {
                "layer" if is_layer => {
                    // Same length, other bytes.
                    let mut b = reg_img.blobs[&reg_img.layer_digest].clone();
                    let n = b.len();
                    b[n - 9] ^= 0xff;
                    Reply::new(200, b)
                }
                "500" if is_manifest => Reply::new(503, "down for maintenance"),
                "garbage" if is_manifest => {
                    Reply::new(200, "<html>hello</html>").header("Content-Type", "text/html")
                }
                "header" if is_manifest => Reply::new(200, reg_img.manifest.clone())
                    .header("Docker-Content-Digest", &sha256(b"something else")),
                "any" if is_manifest => Reply::new(200, reg_img.manifest.clone()),
                "zstd" if is_manifest => {
                    let m = String::from_utf8(reg_img.manifest.clone())
                        .unwrap()
                        .replace("tar+gzip", "tar+zstd");
                    Reply::new(200, m)
                }
                _ => registry_reply(&reg_img, req),
            }
        }),
    );
    let work = TempDir::new("moat-image-wrong");
    let store = Store::open(work.path()).unwrap();
    let reference = format!("{}/test/img:v1", reg.addr);
    let pull = |r: &str| store.pull(r, &PullOptions::default(), &mut NoProgress);

    let e = pull(&reference).unwrap_err();
    assert!(matches!(&e, ImageError::Digest(_)), "{e}");
    assert_clean(&store);

    *mode.lock().unwrap() = "500";
    let e = pull(&reference).unwrap_err();
    let url = format!("http://{}/v2/test/img/manifests/v1", reg.addr);
    assert_eq!(
        e.to_string(),
        format!("{url} answered 503 Service Unavailable: the registry is failing; try again later")
    );

    *mode.lock().unwrap() = "garbage";
    let e = pull(&reference).unwrap_err();
    assert!(
        matches!(&e, ImageError::Registry(m) if m.contains(&url) && m.contains("not a valid manifest")),
        "{e}"
    );

    *mode.lock().unwrap() = "header";
    let e = pull(&reference).unwrap_err();
    assert!(
        matches!(&e, ImageError::Digest(m) if m.contains("Docker-Content-Digest")),
        "{e}"
    );

    *mode.lock().unwrap() = "zstd";
    let e = pull(&reference).unwrap_err();
    assert!(
        matches!(&e, ImageError::Unsupported(m) if m.starts_with("zstd layers are not supported yet: ")),
        "{e}"
    );

    // A digest reference that the registry answers with other content.
    *mode.lock().unwrap() = "any";
    let wrong = sha256(b"not the manifest");
    let e = pull(&format!("{}/test/img@{wrong}", reg.addr)).unwrap_err();
    assert!(
        matches!(&e, ImageError::Digest(m) if m.contains("does not match the digest asked for")),
        "{e}"
    );
    *mode.lock().unwrap() = "ok";
    let e = pull(&format!("{}/test/img@{wrong}", reg.addr)).unwrap_err();
    assert!(matches!(&e, ImageError::NotFound(_)), "{e}");
    let right = pull(&format!("{}/test/img@{}", reg.addr, img.manifest_digest)).unwrap();
    assert_eq!(
        right.name,
        format!("test/img@{}", &img.manifest_digest[..19])
    );
    // And the tag again, fine now.
    pull(&reference).unwrap();
    assert_eq!(names(&store.root().join("rootfs")).len(), 1);
    assert!(names(&store.root().join("tmp")).is_empty());
}

/// A rustls server config for a self-signed certificate for 127.0.0.2, kept in `dir`
/// (`ca.pem` for the client to trust; made once, then read back by the child process).
fn tls_server(dir: &std::path::Path) -> (Arc<rustls::ServerConfig>, std::path::PathBuf) {
    let ca = dir.join("ca.pem");
    if !ca.exists() {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.2".to_string()]).unwrap();
        std::fs::write(dir.join("cert.der"), ck.cert.der()).unwrap();
        std::fs::write(dir.join("key.der"), ck.signing_key.serialize_der()).unwrap();
        std::fs::write(&ca, ck.cert.pem()).unwrap();
    }
    let cert =
        rustls::pki_types::CertificateDer::from(std::fs::read(dir.join("cert.der")).unwrap());
    let key =
        rustls::pki_types::PrivateKeyDer::Pkcs8(std::fs::read(dir.join("key.der")).unwrap().into());
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    (Arc::new(cfg), ca)
}

/// https for any host but loopback names: a registry whose certificate the system store does
/// not trust is refused (verification is on), and one it trusts works (through rustls with
/// the ring provider and the system roots, i.e. `SSL_CERT_FILE` here). The trusted case runs
/// in a child process, so that setting the variable does not race this process's threads.
#[test]
fn https_registries_are_verified_against_the_system_store() {
    let child = std::env::var_os("MOAT_IMAGE_TLS_CHILD");
    let work = TempDir::new("moat-image-tls");
    let certs = match &child {
        Some(dir) => std::path::PathBuf::from(dir),
        None => work.path().to_path_buf(),
    };
    let (cfg, ca) = tls_server(&certs);
    let img = Arc::new(image());
    let reg_img = img.clone();
    let reg = Server::start_tls(
        "127.0.0.2",
        Arc::new(move |req: &Request| registry_reply(&reg_img, req)),
        Some(cfg),
    );
    let store = Store::open(&work.path().join("state")).unwrap();
    let reference = format!("{}/test/img:v1", reg.addr);
    if child.is_none() {
        let e = store
            .pull(&reference, &PullOptions::default(), &mut NoProgress)
            .unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with(&format!("TLS with {} failed: ", reg.addr))
                && m.ends_with("if the registry speaks plain http, pass --insecure"),
            "{m}"
        );
        assert_clean(&store);
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "suite::fake_registry::https_registries_are_verified_against_the_system_store",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MOAT_IMAGE_TLS_CHILD", work.path())
            .env("SSL_CERT_FILE", &ca)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && stdout.contains("trusted pull ok")
                && stdout.contains("1 passed"),
            "child: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let t = store
        .pull(&reference, &PullOptions::default(), &mut NoProgress)
        .unwrap();
    assert_eq!(
        std::fs::read(t.rootfs.join("hello")).unwrap(),
        b"from the fake registry\n"
    );
    // A plain-http registry whose blobs are redirected to an https host (the TLS settings
    // are moat's there too).
    let (tls_addr, http_img) = (reg.addr.clone(), img.clone());
    let http = Server::start(
        "127.0.0.1",
        Arc::new(move |req: &Request| {
            if req.path.ends_with(&http_img.layer_digest) {
                return Reply::new(302, "").header(
                    "Location",
                    &format!(
                        "https://{tls_addr}/v2/test/img/blobs/{}",
                        http_img.layer_digest
                    ),
                );
            }
            registry_reply(&http_img, req)
        }),
    );
    // Without the rootfs, so that the layer is downloaded again.
    store.remove("test/img:v1").unwrap();
    let before = reg.requests().len();
    let t2 = store
        .pull(
            &format!("{}/test/img:v1", http.addr),
            &PullOptions {
                name: Some("via-redirect".into()),
                ..Default::default()
            },
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(t2.name, "via-redirect");
    assert_eq!(
        std::fs::read(t2.rootfs.join("hello")).unwrap(),
        b"from the fake registry\n"
    );
    // The layer came from the https host.
    let layer_over_tls = reg.requests()[before..]
        .iter()
        .any(|r| r.path.ends_with(&img.layer_digest));
    assert!(layer_over_tls);
    println!("trusted pull ok");
}
