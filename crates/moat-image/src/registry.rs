//! A client for the Docker Registry HTTP API v2 / OCI distribution spec: manifests, blobs,
//! bearer-token and basic auth. Blocking (ureq), one client per pull.
//!
//! Security notes:
//! - Everything fetched is verified against a digest before it is trusted: the manifest when
//!   the reference pins one (and against `Docker-Content-Digest`), the config and every layer
//!   always (see `extract::apply_blob`), and every read is bounded.
//! - Redirects are followed here, not by ureq, so that the `Authorization` header goes only
//!   to the registry's own scheme, host and port: a blob redirect to a CDN or object store
//!   never carries the registry token or the user's password (ureq's `SameHost` policy
//!   ignores the port). An https registry cannot redirect to plain http unless `insecure`.
//! - Credentials go to a token realm only over https (or when the registry itself is plain
//!   http, i.e. local or `insecure`).

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use ureq::http::{Response, StatusCode};
use ureq::Body;

use crate::digest::{Digest, HashReader, SizeMismatch};
use crate::manifest::{
    parse_config, parse_manifest, select_platform, Config, Descriptor, Manifest, Parsed, Platform,
    MANIFEST_ACCEPT, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES,
};
use crate::reference::Reference;
use crate::{ImageError, PullOptions};

const MAX_REDIRECTS: usize = 5;

/// What a reference resolved to.
pub(crate) struct Resolved {
    /// The digest of the document the reference named (an index or a manifest).
    pub digest: Digest,
    pub manifest: Manifest,
    pub config: Config,
}

pub(crate) struct Client {
    agent: ureq::Agent,
    reference: Reference,
    scheme: &'static str,
    insecure: bool,
    credentials: Option<(String, String)>,
    /// The `Authorization` value that worked (bearer token or basic), cached for the pull.
    auth: Option<String>,
}

impl Client {
    pub(crate) fn new(reference: &Reference, opts: &PullOptions) -> Result<Client, ImageError> {
        let plain = opts.insecure || reference.is_loopback();
        let credentials = match (&opts.username, &opts.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (Some(u), None) => Some((u.clone(), String::new())),
            _ => docker_config_credentials(&reference.registry),
        };
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("moat/", env!("CARGO_PKG_VERSION")));
        // Always ours (system roots, ring): even a plain-http registry may redirect a blob to
        // an https host. Only a registry spoken to over https needs the store to be non-empty.
        let (tls, roots) = tls_config();
        if roots == 0 && !plain {
            return Err(ImageError::Registry(format!(
                "no CA certificates found in the system store (/etc/ssl/certs) to check {}: \
                 install the ca-certificates package",
                reference.registry
            )));
        }
        config = config.tls_config(tls);
        Ok(Client {
            agent: config.build().new_agent(),
            reference: reference.clone(),
            scheme: if plain { "http" } else { "https" },
            insecure: opts.insecure,
            credentials,
            auth: None,
        })
    }

    fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.reference.api_host())
    }

    /// Resolves the reference to an image manifest for `platform`, and fetches its config.
    pub(crate) fn resolve(&mut self, platform: &Platform) -> Result<Resolved, ImageError> {
        let r = self.reference.manifest_ref().to_string();
        let want = self
            .reference
            .digest
            .as_deref()
            .map(Digest::parse)
            .transpose()?;
        let (digest, mut parsed) = self.manifest(&r, want.as_ref())?;
        let mut depth = 0;
        let manifest = loop {
            match parsed {
                Parsed::Manifest(m) => break m,
                Parsed::Index(entries) => {
                    depth += 1;
                    if depth > 2 {
                        return Err(ImageError::Unsupported(format!(
                            "{} nests image indexes too deep",
                            self.reference
                        )));
                    }
                    let what = format!("`{}`", self.reference);
                    let d = select_platform(&entries, platform, &what)?.digest()?;
                    parsed = self.manifest(&d.to_string(), Some(&d))?.1;
                }
            }
        };
        let cd = manifest.config.digest()?;
        let size = manifest.config.size;
        if size > MAX_CONFIG_BYTES {
            return Err(ImageError::Unsupported(format!(
                "the config of {} is {size} bytes: moat reads at most {}",
                self.reference, MAX_CONFIG_BYTES
            )));
        }
        let body = self.read_blob_fully(&cd, size)?;
        let config = parse_config(&body, &format!("the config of {}", self.reference))?;
        Ok(Resolved {
            digest,
            manifest,
            config,
        })
    }

    /// GETs a manifest by tag or digest; verifies it against `want` and against the
    /// registry's `Docker-Content-Digest`.
    fn manifest(&mut self, r: &str, want: Option<&Digest>) -> Result<(Digest, Parsed), ImageError> {
        let url = format!(
            "{}/v2/{}/manifests/{r}",
            self.base(),
            self.reference.repository
        );
        let mut resp = self.get(&url, Some(MANIFEST_ACCEPT))?;
        let status = resp.status();
        if status != StatusCode::OK {
            return Err(self.status_error(&url, resp, "manifest"));
        }
        let header_digest = header(&resp, "docker-content-digest");
        let content_type = header(&resp, "content-type");
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST_BYTES)
            .read_to_vec()
            .map_err(|e| self.read_error(&url, e))?;
        let got = Digest::of(&body);
        if let Some(w) = want {
            if got != *w {
                return Err(ImageError::Digest(format!(
                    "the manifest at {url} does not match the digest asked for: got {got}, \
                     want {w}: the registry (or a proxy) sent other content"
                )));
            }
        }
        if let Some(h) = header_digest
            .as_deref()
            .filter(|h| h.starts_with("sha256:"))
        {
            if h != got.to_string() {
                return Err(ImageError::Digest(format!(
                    "the manifest at {url} does not match its Docker-Content-Digest: got \
                     {got}, the registry says {h}"
                )));
            }
        }
        let parsed = parse_manifest(
            &body,
            content_type.as_deref(),
            &format!("the manifest at {url}"),
        )?;
        Ok((got, parsed))
    }

    /// A blob's body as a stream (the caller verifies it), after checking the status.
    pub(crate) fn open_blob(
        &mut self,
        digest: &Digest,
    ) -> Result<ureq::BodyReader<'static>, ImageError> {
        let url = format!(
            "{}/v2/{}/blobs/{digest}",
            self.base(),
            self.reference.repository
        );
        let resp = self.get(&url, None)?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(&url, resp, "blob"));
        }
        Ok(resp.into_body().into_reader())
    }

    /// A small blob (the config), read whole, bounded by `size`, verified.
    fn read_blob_fully(&mut self, digest: &Digest, size: u64) -> Result<Vec<u8>, ImageError> {
        let body = self.open_blob(digest)?;
        let mut r = HashReader::new(body, size, |lim| {
            std::io::Error::other(SizeMismatch(format!(
                "a blob is longer than the {lim} bytes its descriptor says"
            )))
        });
        let mut v = Vec::new();
        let url = format!(
            "{}/v2/{}/blobs/{digest}",
            self.base(),
            self.reference.repository
        );
        r.read_to_end(&mut v).map_err(|e| {
            crate::digest::limit_error(&e).unwrap_or_else(|| {
                ImageError::Registry(format!("lost the connection reading {url}: {e}: try again"))
            })
        })?;
        if Digest::of(&v) != *digest || v.len() as u64 != size {
            return Err(ImageError::Digest(format!(
                "the blob at {url} does not match its digest (got {}, {} bytes; want {digest}, \
                 {size} bytes): the registry (or a proxy) sent other content",
                Digest::of(&v),
                v.len()
            )));
        }
        Ok(v)
    }

    /// GET with auth (one challenge answered per request) and same-origin-only redirects.
    fn get(&mut self, url: &str, accept: Option<&str>) -> Result<Response<Body>, ImageError> {
        let mut resp = self.get_following(url, accept)?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = header(&resp, "www-authenticate").unwrap_or_default();
            // Drain what is left of the 401's body (bounded) so the connection can be reused.
            let _ = resp.body_mut().with_config().limit(64 << 10).read_to_vec();
            self.authenticate(url, &challenge)?;
            resp = self.get_following(url, accept)?;
        }
        Ok(resp)
    }

    fn get_following(
        &mut self,
        url: &str,
        accept: Option<&str>,
    ) -> Result<Response<Body>, ImageError> {
        let home = origin(url);
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.agent.get(&url);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            // The registry's credentials go only to the registry itself.
            if let (Some(auth), true) = (&self.auth, origin(&url) == home) {
                req = req.header("Authorization", auth);
            }
            let resp = req.call().map_err(|e| self.call_error(&url, e))?;
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let Some(loc) = header(&resp, "location") else {
                return Err(ImageError::Registry(format!(
                    "{url} answered {} without a Location",
                    resp.status()
                )));
            };
            let next = join_url(&url, &loc).ok_or_else(|| {
                ImageError::Registry(format!("{url} redirected to `{loc}`, which is not a URL"))
            })?;
            if url.starts_with("https:") && next.starts_with("http:") && !self.insecure {
                return Err(ImageError::Registry(format!(
                    "{url} redirected to plain http ({next}): refused; pass --insecure to allow"
                )));
            }
            url = next;
        }
        Err(ImageError::Registry(format!(
            "{url}: more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// Answers a `WWW-Authenticate` challenge: fetches a bearer token from the realm, or
    /// uses the credentials as basic auth.
    fn authenticate(&mut self, url: &str, challenge: &str) -> Result<(), ImageError> {
        let host = self.reference.registry.clone();
        let (scheme, params) = parse_challenge(challenge);
        let basic = self.credentials.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        match scheme.to_ascii_lowercase().as_str() {
            "bearer" => {
                let realm = param(&params, "realm").ok_or_else(|| {
                    ImageError::Registry(format!(
                        "{url} asked for a bearer token without saying where to get it \
                         (no realm in `{challenge}`)"
                    ))
                })?;
                if !(realm.starts_with("https://") || realm.starts_with("http://")) {
                    return Err(ImageError::Registry(format!(
                        "{host}'s token realm `{realm}` is not an http(s) URL"
                    )));
                }
                let mut token_url = realm.to_string();
                let mut sep = if realm.contains('?') { '&' } else { '?' };
                if let Some(service) = param(&params, "service") {
                    token_url.push_str(&format!("{sep}service={}", query_escape(service)));
                    sep = '&';
                }
                let scope = param(&params, "scope")
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository));
                token_url.push_str(&format!("{sep}scope={}", query_escape(&scope)));
                let mut req = self.agent.get(&token_url);
                // Credentials over plain http only when the registry itself is plain http.
                let may_send = realm.starts_with("https://") || self.scheme == "http";
                if let (Some(b), true) = (&basic, may_send) {
                    req = req.header("Authorization", b);
                }
                let mut resp = req.call().map_err(|e| self.call_error(&token_url, e))?;
                let status = resp.status();
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                    return Err(ImageError::Registry(format!(
                        "{host} refused the credentials ({status} from {realm}): check \
                         --username/--password or `docker login {host}`"
                    )));
                }
                if status != StatusCode::OK {
                    return Err(ImageError::Registry(format!(
                        "cannot get a token for {host}: {realm} answered {status}: try again \
                         later"
                    )));
                }
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(1 << 20)
                    .read_to_vec()
                    .map_err(|e| self.read_error(&token_url, e))?;
                #[derive(serde::Deserialize)]
                struct TokenResponse {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                    ImageError::Registry(format!(
                        "{realm} sent a token response that is not JSON: {e}"
                    ))
                })?;
                let token = t
                    .token
                    .or(t.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| ImageError::Registry(format!("{realm} sent no token")))?;
                self.auth = Some(format!("Bearer {token}"));
                Ok(())
            }
            "basic" => match basic {
                Some(b) => {
                    self.auth = Some(b);
                    Ok(())
                }
                None => Err(ImageError::Registry(format!(
                    "{host} needs credentials: pass --username and --password, or run \
                     `docker login {host}`"
                ))),
            },
            _ => Err(ImageError::Registry(format!(
                "{url} answered 401 with an authentication scheme moat does not know \
                 (`{challenge}`)"
            ))),
        }
    }

    /// The error for a response that is not 200.
    fn status_error(&self, url: &str, mut resp: Response<Body>, what: &str) -> ImageError {
        let status = resp.status();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_vec()
            .unwrap_or_default();
        let detail = registry_error_detail(&body);
        let r = &self.reference;
        match status.as_u16() {
            404 => ImageError::NotFound(format!(
                "{r} was not found: {url} answered 404{detail}: check the name and the tag"
            )),
            401 | 403 => ImageError::Registry(format!(
                "{} denied access to {r} ({status}{detail}): the repository may not exist, or \
                 it needs credentials: pass --username/--password or `docker login {}`",
                r.registry, r.registry
            )),
            429 => ImageError::Registry(format!(
                "{} is rate-limiting pulls ({url} answered 429{detail}): wait, or log in for a \
                 higher limit",
                r.registry
            )),
            s if s >= 500 => ImageError::Registry(format!(
                "{url} answered {status}{detail}: the registry is failing; try again later"
            )),
            _ => ImageError::Registry(format!("{url} answered {status}{detail} for the {what}")),
        }
    }

    fn call_error(&self, url: &str, e: ureq::Error) -> ImageError {
        let host = origin(url).1;
        let local_hint = if self.scheme == "http" {
            " (moat uses plain http for localhost)"
        } else {
            ""
        };
        match e {
            ureq::Error::Io(io) => {
                // rustls reports a failed handshake (an untrusted certificate, a plain-http
                // server) as an I/O error carrying the rustls error.
                if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                    return ImageError::Registry(format!(
                        "TLS with {host} failed: {tls}: if the registry speaks plain http, \
                         pass --insecure"
                    ));
                }
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => ImageError::Registry(format!(
                        "cannot reach registry {host}: connection refused: is it \
                         running?{local_hint}"
                    )),
                    std::io::ErrorKind::TimedOut => ImageError::Registry(format!(
                        "cannot reach registry {host}: timed out: is it up, and reachable \
                         from here?"
                    )),
                    _ => ImageError::Registry(format!(
                        "cannot reach registry {host}: {io}: is it running, and reachable from \
                         here?{local_hint}"
                    )),
                }
            }
            ureq::Error::ConnectionFailed => ImageError::Registry(format!(
                "cannot reach registry {host}: connection failed: is it running?{local_hint}"
            )),
            ureq::Error::HostNotFound => ImageError::Registry(format!(
                "cannot reach registry {host}: the name does not resolve: check the spelling \
                 and the DNS"
            )),
            ureq::Error::Timeout(t) => ImageError::Registry(format!(
                "cannot reach registry {host}: timed out ({t}): is it up, and reachable from \
                 here?"
            )),
            e @ (ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_)) => {
                ImageError::Registry(format!(
                    "TLS with {host} failed: {e}: if the registry speaks plain http, pass \
                     --insecure"
                ))
            }
            e => ImageError::Registry(format!("cannot fetch {url}: {e}")),
        }
    }

    fn read_error(&self, url: &str, e: ureq::Error) -> ImageError {
        match e {
            ureq::Error::BodyExceedsLimit(n) => ImageError::Registry(format!(
                "{url} sent more than {n} bytes: that is not a manifest"
            )),
            e => ImageError::Registry(format!("lost the connection reading {url}: {e}: try again")),
        }
    }
}

fn header(resp: &Response<Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `: CODE message` from a registry's `{"errors":[{"code","message"}]}` body, if any.
fn registry_error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => {
            let items: Vec<String> = e
                .errors
                .iter()
                .take(3)
                .map(|i| format!("{} {}", i.code, i.message).trim().to_string())
                .collect();
            format!(" ({})", items.join("; "))
        }
        _ => String::new(),
    }
}

/// `(scheme, host[:port])` of a URL, lower-cased, with the default port made explicit.
fn origin(url: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // Drop any userinfo.
    let authority = authority
        .rsplit('@')
        .next()
        .unwrap_or(authority)
        .to_ascii_lowercase();
    let scheme = scheme.to_ascii_lowercase();
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let authority = if has_port {
        authority
    } else {
        let port = if scheme == "https" { 443 } else { 80 };
        format!("{authority}:{port}")
    };
    (scheme, authority)
}

/// Resolves a `Location` against the URL it came from.
fn join_url(base: &str, loc: &str) -> Option<String> {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return Some(loc.to_string());
    }
    let (scheme, rest) = base.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if let Some(r) = loc.strip_prefix("//") {
        return Some(format!("{scheme}://{r}"));
    }
    if loc.starts_with('/') {
        return Some(format!("{scheme}://{authority}{loc}"));
    }
    let path = &rest[authority.len()..];
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let dir = match path.rfind('/') {
        Some(i) => &path[..=i],
        None => "/",
    };
    Some(format!("{scheme}://{authority}{dir}{loc}"))
}

/// Splits `Bearer realm="x",service="y"` into the scheme and its parameters.
fn parse_challenge(h: &str) -> (String, Vec<(String, String)>) {
    let h = h.trim();
    let (scheme, mut rest) = match h.split_once(' ') {
        Some((s, r)) => (s.to_string(), r),
        None => (h.to_string(), ""),
    };
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let value;
        if let Some(q) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            rest = &q[end.min(q.len())..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        params.push((key, value));
    }
    (scheme, params)
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// TLS with the system's CA store (`/etc/ssl/certs`, via rustls-native-certs, which also
/// honours `SSL_CERT_FILE`/`SSL_CERT_DIR`) and rustls' `ring` provider; and how many roots
/// it found.
fn tls_config() -> (ureq::tls::TlsConfig, usize) {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let found = rustls_native_certs::load_native_certs();
    let roots: Vec<Certificate<'static>> = found
        .certs
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let n = roots.len();
    let config = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    (config, n)
}

/// Credentials for `registry` from `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`
/// (`auths.<registry>.auth`: base64 `user:password`). Credential helpers are not run.
fn docker_config_credentials(registry: &str) -> Option<(String, String)> {
    let dir = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".docker"),
    };
    let body = std::fs::read(dir.join("config.json")).ok()?;
    credentials_from_config(&body, registry)
}

fn credentials_from_config(body: &[u8], registry: &str) -> Option<(String, String)> {
    #[derive(serde::Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, AuthEntry>,
    }
    #[derive(serde::Deserialize)]
    struct AuthEntry {
        #[serde(default)]
        auth: Option<String>,
    }
    let cfg: DockerConfig = serde_json::from_slice(body).ok()?;
    let hub = registry == "docker.io";
    let normalise = |k: &str| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = k.split('/').next().unwrap_or(k).to_string();
        match host.as_str() {
            "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
            _ => host,
        }
    };
    let want = if hub {
        "docker.io".to_string()
    } else {
        registry.to_string()
    };
    let entry = cfg.auths.iter().find(|(k, _)| normalise(k) == want)?.1;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry.auth.as_deref()?.trim())
        .ok()?;
    let s = String::from_utf8(decoded).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// Layers must have a diff_id each.
pub(crate) fn check_layers(
    manifest: &Manifest,
    config: &Config,
    what: &str,
) -> Result<(), ImageError> {
    if manifest.layers.len() != config.diff_ids.len() {
        return Err(ImageError::Registry(format!(
            "{what} has {} layers but its config lists {} diff_ids: the image is malformed",
            manifest.layers.len(),
            config.diff_ids.len()
        )));
    }
    Ok(())
}

/// Layer descriptors with their digests parsed.
pub(crate) fn layer_digests(layers: &[Descriptor]) -> Result<Vec<Digest>, ImageError> {
    layers.iter().map(Descriptor::digest).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(param(&p, "realm"), Some("https://auth.docker.io/token"));
        assert_eq!(param(&p, "service"), Some("registry.docker.io"));
        assert_eq!(
            param(&p, "scope"),
            Some("repository:library/busybox:pull,push")
        );
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(
            (s.as_str(), param(&p, "realm")),
            ("Basic", Some("Registry Realm"))
        );
        let (_, p) = parse_challenge(r#"Bearer realm=http://x/t, service=svc, error="a\"b""#);
        assert_eq!(param(&p, "realm"), Some("http://x/t"));
        assert_eq!(param(&p, "service"), Some("svc"));
        assert_eq!(param(&p, "error"), Some("a\"b"));
        let (s, p) = parse_challenge("");
        assert!(s.is_empty() && p.is_empty());
    }

    #[test]
    fn origins_and_redirects() {
        assert_eq!(
            origin("https://Ghcr.io/v2/x"),
            ("https".into(), "ghcr.io:443".into())
        );
        assert_eq!(
            origin("http://127.0.0.1:5000/v2/"),
            ("http".into(), "127.0.0.1:5000".into())
        );
        assert_eq!(
            origin("http://[::1]/v2/"),
            ("http".into(), "[::1]:80".into())
        );
        assert_eq!(
            origin("http://[::1]:5000/v2/"),
            ("http".into(), "[::1]:5000".into())
        );
        assert_ne!(
            origin("http://127.0.0.1:5000/a"),
            origin("http://127.0.0.1:5001/a")
        );
        assert_ne!(
            origin("http://u@evil.com/"),
            origin("http://evil.com:5000/")
        );
        assert_eq!(
            join_url("https://r.io/v2/a/blobs/x", "https://cdn.io/b?sig=1").unwrap(),
            "https://cdn.io/b?sig=1"
        );
        assert_eq!(
            join_url("https://r.io/v2/a/blobs/x", "/other").unwrap(),
            "https://r.io/other"
        );
        assert_eq!(
            join_url("https://r.io/v2/a/blobs/x", "//cdn.io/y").unwrap(),
            "https://cdn.io/y"
        );
        assert_eq!(
            join_url("http://r.io:5/v2/a/blobs/x?q", "y").unwrap(),
            "http://r.io:5/v2/a/blobs/y"
        );
        assert_eq!(
            query_escape("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }

    #[test]
    fn docker_config_auths() {
        let cfg = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
            "ghcr.io": {"auth": "Z2g6dG9rOmVu"},
            "localhost:5000": {}
        }}"#;
        assert_eq!(
            credentials_from_config(cfg, "docker.io"),
            Some(("hub".into(), "secret".into()))
        );
        // The password may hold a colon.
        assert_eq!(
            credentials_from_config(cfg, "ghcr.io"),
            Some(("gh".into(), "tok:en".into()))
        );
        assert_eq!(credentials_from_config(cfg, "localhost:5000"), None);
        assert_eq!(credentials_from_config(cfg, "quay.io"), None);
        assert_eq!(credentials_from_config(b"garbage", "quay.io"), None);
    }

    #[test]
    fn error_details() {
        assert_eq!(
            registry_error_detail(
                br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
            ),
            " (MANIFEST_UNKNOWN manifest unknown)"
        );
        assert_eq!(registry_error_detail(b"<html>"), "");
    }
}
