//! The client commands of `moat`: `serve` starts the daemon, the others talk to it over its
//! HTTP API (`create`, `ls`, `rm`, `exec`, `shell`, `cp`, `logs`, `pause`, `resume`, `ps`,
//! `token`), and `key` works on the daemon's state directory directly.
//!
//! Every API command reads `MOAT_URL` (default `http://127.0.0.1:7070`) and `MOAT_API_KEY`;
//! `--url` and `--api-key` override them. Output is for people by default; `--json` prints the
//! API's JSON instead. A failed call prints the API's message and code and exits 1 (125 for
//! `exec` and `shell`, whose other exit codes belong to the command).

mod exec;
mod files;
mod keys;
mod templates;
pub mod text;

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use ureq::http::Response;
use ureq::Body;

pub use exec::{ExecArgs, ShellArgs};
pub use files::CpArgs;
pub use keys::KeyCmd;

/// The default URL of `moat serve`.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

/// Where to find `moat serve` and what to authenticate with.
#[derive(Args, Clone, Debug, Default)]
pub struct Conn {
    /// URL of `moat serve` (default: $MOAT_URL, else http://127.0.0.1:7070).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// API key or scoped token (default: $MOAT_API_KEY).
    #[arg(long, value_name = "SECRET")]
    pub api_key: Option<String>,
}

/// The client subcommands (flattened into `moat`'s own).
#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: the HTTP API for persistent sandboxes.
    ///
    /// A fresh state directory gets an admin key in STATE_DIR/admin.key (mode 0600); its path
    /// is printed at start. Give it to clients as MOAT_API_KEY.
    Serve(ServeArgs),
    /// Create a sandbox and print its id.
    Create(Box<CreateArgs>),
    /// List sandboxes.
    Ls(LsArgs),
    /// Delete sandboxes (kills everything in them).
    Rm(RmArgs),
    /// Run a command in a sandbox, streaming its output, and exit with its exit code.
    ///
    /// Exit codes as `moat run`: the command's own; 128+N when killed by signal N; 124 on
    /// timeout; 137 out of memory; 141 output over the cap; 125 when the call itself failed.
    Exec(Box<ExecArgs>),
    /// An interactive shell (or any command) in a sandbox, on a terminal of this one's size.
    Shell(ShellArgs),
    /// Copy a file into or out of a sandbox: `moat cp ID:/path LOCAL` or `moat cp LOCAL
    /// ID:/path`; LOCAL may be `-` for stdin/stdout.
    Cp(CpArgs),
    /// A sandbox's audit events, one line each.
    Logs(LogsArgs),
    /// Pause a sandbox (freezes its processes; exec is refused until resumed).
    Pause(IdArgs),
    /// Resume a paused sandbox.
    Resume(IdArgs),
    /// List a sandbox's background processes.
    Ps(IdArgs),
    /// Give a sandbox a new lifetime from now (capped by the server's --max-ttl).
    Timeout(TimeoutArgs),
    /// Scoped tokens: credentials good for one sandbox and some scopes.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// API keys, straight from the state directory (run where `moat serve` runs).
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Templates: root filesystems from OCI images, in the state directory (run where
    /// sandboxes run, as their user: `moat run --template`, `moat create --template`).
    Template {
        #[command(subcommand)]
        cmd: templates::TemplateCmd,
    },
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// State directory (default: /var/lib/moat as root, else $XDG_STATE_HOME/moat or
    /// ~/.local/state/moat).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Sandbox lifetime when a create request does not say, in seconds.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub default_ttl: u64,
    /// The longest lifetime a sandbox may be given, in seconds.
    #[arg(long, default_value_t = 86_400, value_name = "SECONDS")]
    pub max_ttl: u64,
    /// The tier of sandboxes whose create call names none: `native` or `gvisor`.
    #[arg(long, env = "MOAT_TIER", default_value = "native", value_name = "TIER")]
    pub default_tier: String,
    /// Keep N ready sandboxes of TIER's default policy (`native=4`, `gvisor=2`), so that a
    /// create with that policy starts none. Repeatable; the most per tier is 64.
    #[arg(long, value_name = "TIER=N")]
    pub pool: Vec<String>,
    /// Config file (TOML) with an `[egress]` table: `allow_cidrs`, `hosts`, `dns`,
    /// `ca_files` (as the --egress-* flags, which add to it), and a `[pool]` table of
    /// `TIER = N` (the --pool flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub egress: crate::egress_args::EgressArgs,
}

/// `moat serve --config FILE`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct ServeFile {
    egress: crate::egress_args::EgressConfig,
    pool: std::collections::BTreeMap<String, usize>,
}

/// `--pool TIER=N` flags over the config file's `[pool]` table.
fn pool_sizes(
    file: &std::collections::BTreeMap<String, usize>,
    flags: &[String],
) -> std::result::Result<Vec<(moat_policy::Tier, usize)>, String> {
    let mut sizes: Vec<(moat_policy::Tier, usize)> = Vec::new();
    let mut set = |tier: &str, n: usize, what: &str| -> std::result::Result<(), String> {
        let tier = moat_policy::Tier::parse(tier).map_err(|e| format!("{what}: {e}"))?;
        if n > moat_engine::pool::MAX_POOL {
            return Err(format!(
                "{what}: {n} is more than the {} ready sandboxes a pool may keep",
                moat_engine::pool::MAX_POOL
            ));
        }
        sizes.retain(|(t, _)| *t != tier);
        sizes.push((tier, n));
        Ok(())
    };
    for (tier, &n) in file {
        set(tier, n, "[pool]")?;
    }
    for f in flags {
        let (tier, n) = f
            .split_once('=')
            .ok_or_else(|| format!("--pool {f}: write TIER=N, e.g. --pool gvisor=2"))?;
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("--pool {f}: N must be a whole number, e.g. --pool gvisor=2"))?;
        set(tier.trim(), n, &format!("--pool {f}"))?;
    }
    Ok(sizes)
}

#[derive(Args)]
pub struct CreateArgs {
    /// Policy file (TOML, as for `moat run`). Flags below override it.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Lifetime of the sandbox, e.g. 5m, 2h (default: the server's).
    #[arg(long, value_name = "DURATION", conflicts_with = "timeout_s")]
    pub timeout: Option<String>,
    /// Lifetime of the sandbox in seconds.
    #[arg(long, value_name = "N")]
    pub timeout_s: Option<u64>,
    /// Metadata to attach, for `moat ls --meta`. Repeatable.
    #[arg(long, value_name = "K=V")]
    pub meta: Vec<String>,
    /// Environment variable for every command in the sandbox. Repeatable.
    #[arg(long, short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    /// Memory limit for the whole sandbox, e.g. 256M, 1G.
    #[arg(long)]
    pub memory: Option<String>,
    /// Process and thread limit for the whole sandbox.
    #[arg(long)]
    pub pids: Option<u64>,
    /// CPU quota in cores, e.g. 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Isolation tier: `native` (default) or `gvisor` (see `moat doctor`).
    #[arg(long)]
    pub tier: Option<String>,
    /// Network: `none` (default) or `allow:HOST,...` through moat's egress proxy (as for
    /// `moat run`).
    #[arg(long, value_name = "none|allow:HOST,...")]
    pub net: Option<String>,
    /// Deny rules that win over the allowlist. Repeatable.
    #[arg(long, value_name = "HOST")]
    pub net_deny: Vec<String>,
    /// Bind a secret to hosts, `NAME=HOST,...`: its value is read from this command's own
    /// environment ($NAME) and sent to the daemon; the sandbox sees a placeholder. Repeatable.
    #[arg(long, value_name = "NAME=HOST,...")]
    pub secret: Vec<String>,
    /// Use a template's files as the root (`moat template ls` where the daemon runs).
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct LsArgs {
    /// Only sandboxes in this state: running, paused, stopped, failed, creating, stopping.
    #[arg(long)]
    pub state: Option<String>,
    /// Only sandboxes with this metadata. Repeatable (all must match).
    #[arg(long, value_name = "K=V")]
    pub meta: Vec<String>,
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct RmArgs {
    /// Sandbox ids.
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<String>,
    /// Print one JSON line per sandbox: `{"id","deleted","error"?}`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct IdArgs {
    /// Sandbox id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct TimeoutArgs {
    /// Sandbox id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// The new lifetime from now, e.g. 10m, 2h, or seconds.
    #[arg(value_name = "DURATION")]
    pub duration: String,
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct LogsArgs {
    /// Sandbox id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Keep following new events until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print the events as JSON, one object per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Mint a token for one sandbox and print it (shown once).
    Create(TokenCreateArgs),
}

#[derive(Args)]
pub struct TokenCreateArgs {
    /// The sandbox the token is good for.
    #[arg(value_name = "ID")]
    pub id: String,
    /// What the token may do: exec, files:read, files:write, read. Repeatable.
    #[arg(long = "scope", required = true, value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// How long the token lives, e.g. 10m, 1h.
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub ttl: String,
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// Runs one client command; returns the process exit code.
pub fn main(cmd: Command) -> i32 {
    let r = match cmd {
        Command::Serve(a) => return serve(a),
        Command::Exec(a) => return exec::exec(*a),
        Command::Shell(a) => return exec::shell(a),
        Command::Key { cmd } => keys::main(cmd),
        Command::Template { cmd } => templates::main(cmd),
        Command::Create(a) => create(*a),
        Command::Ls(a) => ls(a),
        Command::Rm(a) => rm(a),
        Command::Cp(a) => files::cp(a),
        Command::Logs(a) => logs(a),
        Command::Pause(a) => pause_resume(a, "pause"),
        Command::Resume(a) => pause_resume(a, "resume"),
        Command::Ps(a) => ps(a),
        Command::Timeout(a) => set_timeout(a),
        Command::Token {
            cmd: TokenCmd::Create(a),
        } => token_create(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moat: {e}");
            1
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and the HTTP client
// ---------------------------------------------------------------------------------------------

/// What went wrong in a client command.
#[derive(Debug)]
pub enum Error {
    /// Nothing answers at the URL.
    Unreachable { url: String },
    /// The API answered with an error.
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// An error event in the middle of a stream (exec, shell).
    Stream { code: String, message: String },
    /// Anything else, already worded for the user.
    Msg(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unreachable { url } => {
                write!(
                    f,
                    "cannot reach moat serve at {url}: is it running? (`moat serve`)"
                )
            }
            Error::Api {
                status,
                code,
                message,
            } => write!(f, "{message} ({code}, HTTP {status})"),
            Error::Stream { code, message } => write!(f, "{message} ({code})"),
            Error::Msg(m) => f.write_str(m),
        }
    }
}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error::Msg(s)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where an admin key is found, for the error when none is given.
fn admin_key_hint() -> String {
    let own = default_state_dir().join("admin.key");
    let root = "/var/lib/moat/admin.key";
    if own == std::path::Path::new(root) {
        format!("{root} (its path is printed when `moat serve` starts)")
    } else {
        format!(
            "{} for a daemon you started, {root} for one running as root (`moat serve` prints \
             the path when it starts)",
            own.display()
        )
    }
}

/// The default state directory of `moat serve`: `/var/lib/moat` as root, else
/// `$XDG_STATE_HOME/moat` or `~/.local/state/moat`.
pub fn default_state_dir() -> PathBuf {
    moat_server::default_state_dir()
}

/// An authenticated connection to `moat serve`.
pub struct Client {
    base: String,
    secret: String,
    agent: ureq::Agent,
}

impl Client {
    /// From the flags and the environment; fails when no key is given.
    pub fn new(conn: &Conn) -> Result<Client> {
        let base = conn
            .url
            .clone()
            .or_else(|| std::env::var("MOAT_URL").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_URL.to_string());
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(Error::Msg(format!(
                "MOAT_URL {base}: only plain http:// URLs are supported (moat serve listens on \
                 plain HTTP; put a TLS proxy in front of it for remote use)"
            )));
        }
        let secret = conn
            .api_key
            .clone()
            .or_else(|| std::env::var("MOAT_API_KEY").ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::Msg(format!(
                    "no API key: set MOAT_API_KEY or pass --api-key. The admin key is in {}; \
                     e.g. export MOAT_API_KEY=$(cat /var/lib/moat/admin.key)",
                    admin_key_hint()
                ))
            })?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // The daemon never redirects; following one could leave plain http for a TLS
            // host this client is not set up for.
            .max_redirects(0)
            .user_agent(concat!("moat-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Client {
            base,
            secret,
            agent,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The URL of an API path (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.secret)
    }

    pub fn get(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.agent
            .get(self.url(path))
            .header("Authorization", self.auth())
    }

    pub fn delete(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.agent
            .delete(self.url(path))
            .header("Authorization", self.auth())
    }

    pub fn post(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        self.agent
            .post(self.url(path))
            .header("Authorization", self.auth())
    }

    pub fn put(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        self.agent
            .put(self.url(path))
            .header("Authorization", self.auth())
    }

    /// Turns a transport result into a success response or an [`Error`].
    pub fn check(
        &self,
        r: std::result::Result<Response<Body>, ureq::Error>,
    ) -> Result<Response<Body>> {
        let mut resp = r.map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        if status < 400 {
            return Ok(resp);
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_string()
            .unwrap_or_default();
        Err(api_error(status, &text))
    }

    /// A transport error, worded.
    pub fn transport(&self, e: ureq::Error) -> Error {
        match &e {
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => Error::Unreachable {
                url: self.base.clone(),
            },
            ureq::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::NotFound
                ) =>
            {
                Error::Unreachable {
                    url: self.base.clone(),
                }
            }
            _ => Error::Msg(format!("talking to moat serve at {}: {e}", self.base)),
        }
    }

    /// A JSON request (body `None` for GET/DELETE-like calls), parsed JSON answer; `null`
    /// for an empty body (204).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let r = match (method, body) {
            ("GET", _) => self.get(path).call(),
            ("DELETE", _) => self.delete(path).call(),
            ("POST", None) => self.post(path).send_empty(),
            ("POST", Some(b)) => self
                .post(path)
                .content_type("application/json")
                .send(b.to_string()),
            ("PUT", Some(b)) => self
                .put(path)
                .content_type("application/json")
                .send(b.to_string()),
            _ => return Err(Error::Msg(format!("internal: unsupported call {method}"))),
        };
        let resp = self.check(r)?;
        read_json(resp)
    }

    /// GET with query parameters.
    pub fn get_query(&self, path: &str, query: &[(String, String)]) -> Result<Value> {
        let mut req = self.get(path);
        for (k, v) in query {
            req = req.query(k, v);
        }
        let resp = self.check(req.call())?;
        read_json(resp)
    }
}

/// The JSON of a response; `null` when it has no body.
pub fn read_json(resp: Response<Body>) -> Result<Value> {
    let text = resp
        .into_body()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .map_err(|e| Error::Msg(format!("reading the answer of moat serve: {e}")))?;
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).map_err(|e| {
        Error::Msg(format!(
            "moat serve answered something that is not JSON ({e}): {}",
            text::cut(&text, 200)
        ))
    })
}

/// An [`Error::Api`] from an error response's status and body.
pub fn api_error(status: u16, body: &str) -> Error {
    match serde_json::from_str::<moat_api::ErrorBody>(body) {
        Ok(b) => Error::Api {
            status,
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) => Error::Api {
            status,
            code: match status {
                401 => "unauthorized",
                403 => "forbidden",
                404 => "not_found",
                _ => "http_error",
            }
            .to_string(),
            message: if body.trim().is_empty() {
                format!("moat serve answered HTTP {status}")
            } else {
                text::cut(body.trim(), 300)
            },
        },
    }
}

/// `/v1/sandboxes/{id}` plus `rest`.
pub fn sandbox_path(id: &str, rest: &str) -> String {
    format!("/v1/sandboxes/{}{rest}", text::path_segment(id))
}

/// Prints one JSON value on a line.
pub fn print_json(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, v);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

// ---------------------------------------------------------------------------------------------
// serve
// ---------------------------------------------------------------------------------------------

fn serve(mut a: ServeArgs) -> i32 {
    let mut pool_file = Default::default();
    if let Some(path) = &a.config {
        let file = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|t| {
                toml::from_str::<ServeFile>(&t).map_err(|e| format!("{}: {e}", path.display()))
            });
        match file {
            Ok(f) => {
                a.egress.merge(f.egress);
                pool_file = f.pool;
            }
            Err(e) => {
                eprintln!("moat serve: --config {e}");
                return 2;
            }
        }
    }
    let egress = match a.egress.operator() {
        Ok(op) => op,
        Err(e) => {
            eprintln!("moat serve: {e:#}");
            return 2;
        }
    };
    // An empty $MOAT_TIER means unset, as for `moat run`.
    let tier = Some(a.default_tier.trim())
        .filter(|t| !t.is_empty())
        .unwrap_or("native");
    let default_tier = match moat_policy::Tier::parse(tier) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("moat serve: --default-tier: {e}");
            return 2;
        }
    };
    let pools = match pool_sizes(&pool_file, &a.pool) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("moat serve: {e}");
            return 2;
        }
    };
    let cfg = moat_server::ServeConfig {
        listen: a.listen,
        engine: moat_engine::EngineConfig {
            default_tier,
            pools,
            state_dir: a.state_dir.unwrap_or_else(default_state_dir),
            default_ttl_s: a.default_ttl,
            max_ttl_s: a.max_ttl,
            egress,
        },
    };
    match moat_server::serve(cfg) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("moat serve: {e}");
            1
        }
    }
}

// ---------------------------------------------------------------------------------------------
// create, ls, rm, pause, resume, ps, token, logs
// ---------------------------------------------------------------------------------------------

/// The policy's `limits` table, created when missing.
fn limits(p: &mut Value) -> Result<&mut Map<String, Value>> {
    let obj = p
        .as_object_mut()
        .ok_or_else(|| Error::Msg("internal: the policy is not an object".into()))?;
    obj.entry("limits")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| Error::Msg("the policy's `limits` is not a table".into()))
}

/// The body of `POST /v1/sandboxes` from the flags (and the policy file's text, if any).
pub fn create_body(a: &CreateArgs, policy_toml: Option<&str>) -> Result<Value> {
    let mut policy = match policy_toml {
        Some(text) => {
            let t: toml::Table = toml::from_str(text)
                .map_err(|e| Error::Msg(format!("the policy file is not valid TOML: {e}")))?;
            serde_json::to_value(t)
                .map_err(|e| Error::Msg(format!("the policy file cannot be sent as JSON: {e}")))?
        }
        None => Value::Object(Map::new()),
    };
    if let Some(m) = &a.memory {
        let bytes = moat_policy::parse_bytes(m).map_err(|e| format!("--memory {m}: {e}"))?;
        limits(&mut policy)?.insert("memory".into(), json!(bytes));
    }
    if let Some(n) = a.pids {
        limits(&mut policy)?.insert("pids".into(), json!(n));
    }
    if let Some(c) = a.cpus {
        limits(&mut policy)?.insert("cpus".into(), json!(c));
    }
    let mut secret_values = Map::new();
    if a.net.is_some() || !a.net_deny.is_empty() || !a.secret.is_empty() {
        let net = policy
            .as_object_mut()
            .map(|p| p.entry("network").or_insert_with(|| json!({})))
            .and_then(Value::as_object_mut)
            .ok_or_else(|| Error::Msg("policy: network must be a table".into()))?;
        match a.net.as_deref() {
            None => {}
            Some("none") => {
                net.insert("mode".into(), json!("none"));
            }
            Some(n) => {
                let list = n.strip_prefix("allow:").ok_or_else(|| {
                    Error::Msg(format!("--net {n}: write `none` or `allow:HOST,HOST,...`"))
                })?;
                net.insert("mode".into(), json!("allowlist"));
                let allow = net.entry("allow").or_insert_with(|| json!([]));
                if let Some(v) = allow.as_array_mut() {
                    v.extend(list.split(',').filter(|h| !h.is_empty()).map(|h| json!(h)));
                }
            }
        }
        if !a.net_deny.is_empty() {
            let deny = net.entry("deny").or_insert_with(|| json!([]));
            if let Some(v) = deny.as_array_mut() {
                v.extend(a.net_deny.iter().map(|h| json!(h)));
            }
        }
        for sp in &a.secret {
            let (name, hosts) = sp.split_once('=').ok_or_else(|| {
                Error::Msg(format!(
                    "--secret {sp}: write NAME=HOST,... e.g. OPENAI_API_KEY=api.openai.com"
                ))
            })?;
            let value = std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    Error::Msg(format!(
                        "--secret {name}: set it in this command's environment (export {name}=...)"
                    ))
                })?;
            let secrets = net.entry("secrets").or_insert_with(|| json!({}));
            if let Some(m) = secrets.as_object_mut() {
                let hosts: Vec<Value> = hosts
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(|h| json!(h))
                    .collect();
                m.insert(name.to_string(), Value::Array(hosts));
            }
            secret_values.insert(name.to_string(), Value::String(value));
        }
    }
    if let Some(t) = &a.template {
        policy
            .as_object_mut()
            .map(|p| p.entry("fs").or_insert_with(|| json!({})))
            .and_then(Value::as_object_mut)
            .ok_or_else(|| Error::Msg("policy: fs must be a table".into()))?
            .insert("template".into(), json!(t));
    }
    let has_policy = policy.as_object().is_some_and(|o| !o.is_empty());
    if has_policy {
        // Catch mistakes here, with the policy's own words, before the round trip.
        let p: moat_policy::Policy = serde_json::from_value(policy.clone())
            .map_err(|e| format!("policy: an unknown or mistyped field: {e}"))?;
        p.validate().map_err(|e| e.to_string())?;
    }
    let mut body = Map::new();
    if has_policy {
        body.insert("policy".into(), policy);
    }
    if !secret_values.is_empty() {
        body.insert("secrets".into(), Value::Object(secret_values));
    }
    let mut env = Map::new();
    for kv in &a.env {
        let (k, v) = text::parse_kv(kv, "--env")?;
        env.insert(k, Value::String(v));
    }
    if !env.is_empty() {
        body.insert("env".into(), Value::Object(env));
    }
    let mut meta = Map::new();
    for kv in &a.meta {
        let (k, v) = text::parse_kv(kv, "--meta")?;
        meta.insert(k, Value::String(v));
    }
    if !meta.is_empty() {
        body.insert("metadata".into(), Value::Object(meta));
    }
    let timeout_s = match (&a.timeout, a.timeout_s) {
        (Some(t), _) => Some(text::parse_whole_secs(t, "--timeout")?),
        (None, n) => n,
    };
    if let Some(t) = timeout_s {
        body.insert("timeout_s".into(), json!(t));
    }
    if let Some(t) = &a.tier {
        body.insert("tier".into(), json!(t));
    }
    Ok(Value::Object(body))
}

fn create(a: CreateArgs) -> Result<i32> {
    let policy_text = match &a.policy {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read the policy file {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let body = create_body(&a, policy_text.as_deref()).map_err(|e| match (e, &a.policy) {
        (Error::Msg(m), Some(p)) if m.starts_with("policy") || m.starts_with("the policy") => {
            Error::Msg(format!("{m} (in {})", p.display()))
        }
        (e, _) => e,
    })?;
    let c = Client::new(&a.conn)?;
    let sbx = c.call("POST", "/v1/sandboxes", Some(&body))?;
    if a.json {
        print_json(&sbx);
    } else {
        println!("{}", sbx["id"].as_str().unwrap_or_default());
    }
    Ok(0)
}

/// The query of `GET /v1/sandboxes` from `ls` flags.
pub fn ls_query(a: &LsArgs) -> Result<Vec<(String, String)>> {
    let mut q = Vec::new();
    if let Some(s) = &a.state {
        q.push(("state".to_string(), s.clone()));
    }
    for kv in &a.meta {
        let (k, v) = text::parse_kv(kv, "--meta")?;
        q.push((format!("metadata.{k}"), v));
    }
    Ok(q)
}

/// The `ls` table.
pub fn sandboxes_table(list: &[Value], now: u64) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            let t = |k: &str| s[k].as_u64().map_or_else(|| "-".to_string(), text::utc);
            let mut state = s["state"].as_str().unwrap_or("?").to_string();
            if let Some(e) = s["error"].as_str() {
                state = format!("{state} ({})", text::cut(e, 40));
            }
            vec![
                s["id"].as_str().unwrap_or("?").to_string(),
                state,
                s["tier"].as_str().unwrap_or("-").to_string(),
                t("created_at"),
                s["expires_at"]
                    .as_u64()
                    .map_or_else(|| "-".to_string(), |e| text::relative(e, now)),
                text::metadata_cell(&s["metadata"]),
            ]
        })
        .collect();
    text::table(
        &["ID", "STATE", "TIER", "CREATED", "EXPIRES", "METADATA"],
        &rows,
    )
}

fn ls(a: LsArgs) -> Result<i32> {
    let q = ls_query(&a)?;
    let c = Client::new(&a.conn)?;
    let v = c.get_query("/v1/sandboxes", &q)?;
    if a.json {
        print_json(&v);
    } else {
        let list = v["sandboxes"].as_array().cloned().unwrap_or_default();
        print!("{}", sandboxes_table(&list, text::now_ms()));
    }
    Ok(0)
}

fn rm(a: RmArgs) -> Result<i32> {
    let c = Client::new(&a.conn)?;
    let mut code = 0;
    for id in &a.ids {
        match c.call("DELETE", &sandbox_path(id, ""), None) {
            Ok(_) => {
                if a.json {
                    print_json(&json!({"id": id, "deleted": true}));
                } else {
                    println!("{id}");
                }
            }
            Err(e @ Error::Unreachable { .. }) => return Err(e),
            Err(e) => {
                if a.json {
                    print_json(&json!({"id": id, "deleted": false, "error": e.to_string()}));
                }
                eprintln!("moat: rm {id}: {e}");
                code = 1;
            }
        }
    }
    Ok(code)
}

fn pause_resume(a: IdArgs, what: &str) -> Result<i32> {
    let c = Client::new(&a.conn)?;
    let v = c.call("POST", &sandbox_path(&a.id, &format!("/{what}")), None)?;
    if a.json {
        print_json(&v);
    } else {
        println!(
            "{} {}",
            v["id"].as_str().unwrap_or(&a.id),
            v["state"].as_str().unwrap_or("?")
        );
    }
    Ok(0)
}

fn set_timeout(a: TimeoutArgs) -> Result<i32> {
    let secs = text::parse_whole_secs(&a.duration, "DURATION")?;
    let c = Client::new(&a.conn)?;
    let v = c.call(
        "POST",
        &sandbox_path(&a.id, "/timeout"),
        Some(&json!({ "timeout_s": secs })),
    )?;
    if a.json {
        print_json(&v);
    } else {
        let exp = v["expires_at"].as_u64().unwrap_or(0);
        println!(
            "{} expires {} ({})",
            v["id"].as_str().unwrap_or(&a.id),
            text::utc(exp),
            text::relative(exp, text::now_ms())
        );
    }
    Ok(0)
}

/// The `ps` table.
pub fn processes_table(list: &[Value], now: u64) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            let state = if p["running"].as_bool().unwrap_or(false) {
                "running".to_string()
            } else {
                match (p["exit_code"].as_i64(), p["signal"].as_i64()) {
                    (Some(c), _) => format!("exited {c}"),
                    (None, Some(s)) => format!("killed by signal {s}"),
                    _ => p["status"].as_str().unwrap_or("ended").to_string(),
                }
            };
            let argv: Vec<String> = p["argv"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| s.as_str().map_or_else(|| s.to_string(), str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            vec![
                p["pid"].to_string(),
                state,
                p["started_at"]
                    .as_u64()
                    .map_or_else(|| "-".to_string(), |t| text::relative(t, now)),
                text::cut(&argv.join(" "), 80),
            ]
        })
        .collect();
    text::table(&["PID", "STATE", "STARTED", "COMMAND"], &rows)
}

fn ps(a: IdArgs) -> Result<i32> {
    let c = Client::new(&a.conn)?;
    let v = c.call("GET", &sandbox_path(&a.id, "/processes"), None)?;
    if a.json {
        print_json(&v);
    } else {
        let list = v["processes"].as_array().cloned().unwrap_or_default();
        print!("{}", processes_table(&list, text::now_ms()));
    }
    Ok(0)
}

/// The scopes a token may have, as the API spells them.
pub const SCOPES: &[&str] = &["exec", "files:read", "files:write", "read"];

/// The body of `POST /v1/tokens`.
pub fn token_body(a: &TokenCreateArgs) -> Result<Value> {
    for s in &a.scopes {
        if !SCOPES.contains(&s.as_str()) {
            return Err(Error::Msg(format!(
                "--scope {s}: the scopes are {}",
                SCOPES.join(", ")
            )));
        }
    }
    let ttl_s = text::parse_whole_secs(&a.ttl, "--ttl")?;
    Ok(json!({"sandbox_id": a.id, "scopes": a.scopes, "ttl_s": ttl_s}))
}

fn token_create(a: TokenCreateArgs) -> Result<i32> {
    let body = token_body(&a)?;
    let c = Client::new(&a.conn)?;
    let v = c.call("POST", "/v1/tokens", Some(&body))?;
    if a.json {
        print_json(&v);
    } else {
        println!("{}", v["token"].as_str().unwrap_or_default());
        if let Some(exp) = v["expires_at"].as_u64() {
            eprintln!(
                "token {} for {} ({}), expires {}; it is shown once",
                v["id"].as_str().unwrap_or("?"),
                a.id,
                a.scopes.join(", "),
                text::utc(exp)
            );
        }
    }
    Ok(0)
}

/// One human line for an audit event: time, kind, summary of its data.
pub fn event_line(e: &Value) -> String {
    let ts = e["ts"]
        .as_u64()
        .map_or_else(|| "-".to_string(), text::utc_ms);
    let kind = e["kind"].as_str().unwrap_or("?");
    let data = text::summary(&e["data"], 160);
    if data.is_empty() {
        format!("{ts}  {kind}")
    } else {
        format!("{ts}  {kind:<16}  {data}")
    }
}

fn logs(a: LogsArgs) -> Result<i32> {
    let c = Client::new(&a.conn)?;
    let path = sandbox_path(&a.id, "/events");
    let print_event = |e: &Value| {
        if a.json {
            print_json(e);
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", event_line(e));
            let _ = out.flush();
        }
    };
    if !a.follow {
        // Page through everything there is.
        let mut since: Option<u64> = None;
        loop {
            let mut q = vec![("limit".to_string(), "1000".to_string())];
            if let Some(s) = since {
                q.push(("since".to_string(), s.to_string()));
            }
            let v = c.get_query(&path, &q)?;
            let events = v["events"].as_array().cloned().unwrap_or_default();
            for e in &events {
                print_event(e);
            }
            let last = events.last().and_then(|e| e["seq"].as_u64());
            match last {
                Some(l) if events.len() >= 1000 && Some(l) != since => since = Some(l),
                _ => break,
            }
        }
        return Ok(0);
    }
    let resp = c.check(
        c.get(&path)
            .query("follow", "1")
            .header("Accept", "text/event-stream")
            .call(),
    )?;
    let reader = std::io::BufReader::new(resp.into_body().into_reader());
    sse_events(reader, |data| match serde_json::from_str::<Value>(data) {
        Ok(e) => print_event(&e),
        Err(_) => eprintln!("moat: an event that is not JSON: {}", text::cut(data, 200)),
    })
    .map_err(|e| Error::Msg(format!("reading the event stream: {e}")))?;
    Ok(0)
}

/// Reads a `text/event-stream` and calls `on_data` with the data of each event (several
/// `data:` lines joined with newlines). Comments and other fields are skipped.
pub fn sse_events(
    mut r: impl std::io::BufRead,
    mut on_data: impl FnMut(&str),
) -> std::io::Result<()> {
    let mut data = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            if !data.is_empty() {
                on_data(&data);
            }
            return Ok(());
        }
        let l = line.trim_end_matches(['\n', '\r']);
        if l.is_empty() {
            if !data.is_empty() {
                on_data(&data);
                data.clear();
            }
        } else if let Some(d) = l.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(subcommand)]
        cmd: Command,
    }

    fn parse(args: &[&str]) -> Command {
        let mut v = vec!["moat"];
        v.extend_from_slice(args);
        T::try_parse_from(v).unwrap().cmd
    }

    fn create_args(args: &[&str]) -> CreateArgs {
        let mut v = vec!["create"];
        v.extend_from_slice(args);
        match parse(&v) {
            Command::Create(a) => *a,
            _ => panic!("not create"),
        }
    }

    #[test]
    fn create_merges_flags_into_the_policy() {
        let a = create_args(&[
            "--memory",
            "256M",
            "--pids",
            "64",
            "--meta",
            "owner=ci",
            "--meta",
            "run=7",
            "-e",
            "A=1",
            "--timeout",
            "5m",
            "--tier",
            "native",
        ]);
        let toml = "[limits]\ncpus = 0.5\npids = 10\n[network]\nmode = \"none\"\n";
        let b = create_body(&a, Some(toml)).unwrap();
        assert_eq!(
            b,
            json!({
                "policy": {"limits": {"cpus": 0.5, "pids": 64, "memory": 268435456},
                           "network": {"mode": "none"}},
                "env": {"A": "1"},
                "metadata": {"owner": "ci", "run": "7"},
                "timeout_s": 300,
                "tier": "native",
            })
        );
        assert_eq!(create_body(&create_args(&[]), None).unwrap(), json!({}));
        let b = create_body(&create_args(&["--timeout-s", "42"]), None).unwrap();
        assert_eq!(b, json!({"timeout_s": 42}));
    }

    #[test]
    fn create_takes_network_rules_and_secrets_from_the_environment() {
        // A variable name only this test uses: tests run in threads of one process.
        std::env::set_var("MOAT_TEST_CREATE_SECRET", "v-123");
        let a = create_args(&[
            "--net",
            "allow:pypi.org,*.pythonhosted.org",
            "--net-deny",
            "bad.pypi.org",
            "--secret",
            "MOAT_TEST_CREATE_SECRET=api.example.com",
        ]);
        let b = create_body(&a, None).unwrap();
        assert_eq!(
            b,
            json!({
                "policy": {"network": {"mode": "allowlist",
                                       "allow": ["pypi.org", "*.pythonhosted.org"],
                                       "deny": ["bad.pypi.org"],
                                       "secrets": {"MOAT_TEST_CREATE_SECRET": ["api.example.com"]}}},
                "secrets": {"MOAT_TEST_CREATE_SECRET": "v-123"},
            })
        );
        let e = create_body(
            &create_args(&[
                "--net",
                "allow:x.com",
                "--secret",
                "MOAT_TEST_UNSET_SECRET=x.com",
            ]),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("export MOAT_TEST_UNSET_SECRET="), "{e}");
        let e = create_body(&create_args(&["--net", "open"]), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("write `none` or `allow:"), "{e}");
        let e = create_body(&create_args(&["--net", "allow:bad host"]), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("egress rule `bad host`"), "{e}");
    }

    #[test]
    fn create_refuses_bad_input_before_calling() {
        let e = create_body(&create_args(&["--memory", "lots"]), None).unwrap_err();
        assert!(e.to_string().starts_with("--memory lots"), "{e}");
        let e = create_body(&create_args(&[]), Some("[limits]\nmemroy = 1\n")).unwrap_err();
        assert!(e.to_string().contains("memroy"), "{e}");
        let e = create_body(&create_args(&[]), Some("limits = [")).unwrap_err();
        assert!(e.to_string().contains("not valid TOML"), "{e}");
        let e = create_body(&create_args(&["--meta", "novalue"]), None).unwrap_err();
        assert!(e.to_string().contains("write K=V"), "{e}");
        assert!(
            T::try_parse_from(["moat", "create", "--timeout", "1m", "--timeout-s", "3"]).is_err()
        );
    }

    #[test]
    fn ls_builds_its_query() {
        let Command::Ls(a) = parse(&["ls", "--state", "running", "--meta", "a=b", "--meta", "c=d"])
        else {
            panic!()
        };
        assert_eq!(
            ls_query(&a).unwrap(),
            vec![
                ("state".to_string(), "running".to_string()),
                ("metadata.a".to_string(), "b".to_string()),
                ("metadata.c".to_string(), "d".to_string()),
            ]
        );
    }

    #[test]
    fn ls_table_shows_every_column() {
        let now = 1_796_159_828_000;
        let list = vec![
            json!({"id":"sbx_1","state":"running","tier":"native","created_at":now - 5000,
                   "expires_at":now + 299_000,"metadata":{"owner":"ci"},"error":null}),
            json!({"id":"sbx_2","state":"failed","tier":"native","created_at":now,
                   "expires_at":now,"metadata":{},"error":"agent died"}),
        ];
        let t = sandboxes_table(&list, now);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["ID", "STATE", "TIER", "CREATED", "EXPIRES", "METADATA"]
        );
        assert!(lines[1].starts_with("sbx_1  running"), "{t}");
        assert!(lines[1].contains("2026-12-01T21:17:03Z"), "{t}");
        assert!(lines[1].contains("in 4m59s"), "{t}");
        assert!(lines[1].ends_with("owner=ci"), "{t}");
        assert!(lines[2].contains("failed (agent died)"), "{t}");
        assert!(lines[2].ends_with('-'), "{t}");
    }

    #[test]
    fn ps_table_says_how_processes_ended() {
        let list = vec![
            json!({"pid":7,"argv":["sleep","100"],"running":true,"exit_code":null,
                   "signal":null,"status":null,"started_at":1000,"finished_at":null}),
            json!({"pid":9,"argv":["false"],"running":false,"exit_code":1,
                   "signal":null,"status":"ok","started_at":1000,"finished_at":2000}),
            json!({"pid":11,"argv":["yes"],"running":false,"exit_code":null,
                   "signal":15,"status":"ok","started_at":1000,"finished_at":2000}),
        ];
        let t = processes_table(&list, 61_000);
        assert!(t.contains("7    running"), "{t}");
        assert!(t.contains("1m00s ago  sleep 100"), "{t}");
        assert!(t.contains("exited 1"), "{t}");
        assert!(t.contains("killed by signal 15"), "{t}");
    }

    #[test]
    fn token_scopes_are_checked() {
        let Command::Token {
            cmd: TokenCmd::Create(a),
        } = parse(&[
            "token",
            "create",
            "sbx_1",
            "--scope",
            "exec",
            "--scope",
            "files:read",
            "--ttl",
            "10m",
        ])
        else {
            panic!()
        };
        assert_eq!(
            token_body(&a).unwrap(),
            json!({"sandbox_id":"sbx_1","scopes":["exec","files:read"],"ttl_s":600})
        );
        let Command::Token {
            cmd: TokenCmd::Create(a),
        } = parse(&["token", "create", "sbx_1", "--scope", "root"])
        else {
            panic!()
        };
        assert!(token_body(&a)
            .unwrap_err()
            .to_string()
            .contains("files:read"));
        assert!(T::try_parse_from(["moat", "token", "create", "sbx_1"]).is_err());
    }

    #[test]
    fn api_errors_carry_code_and_message() {
        let e = api_error(
            409,
            r#"{"error":{"code":"sandbox_paused","message":"sandbox sbx_1 is paused: resume it"}}"#,
        );
        assert_eq!(
            e.to_string(),
            "sandbox sbx_1 is paused: resume it (sandbox_paused, HTTP 409)"
        );
        let e = api_error(502, "Bad Gateway");
        assert_eq!(e.to_string(), "Bad Gateway (http_error, HTTP 502)");
        let e = api_error(401, "");
        assert_eq!(
            e.to_string(),
            "moat serve answered HTTP 401 (unauthorized, HTTP 401)"
        );
    }

    #[test]
    fn missing_key_says_where_the_admin_key_is() {
        let conn = Conn {
            url: Some("http://127.0.0.1:1".into()),
            api_key: Some("  ".into()),
        };
        // A blank key counts as none.
        let e = Client::new(&conn).err().unwrap().to_string();
        assert!(e.contains("MOAT_API_KEY"), "{e}");
        assert!(e.contains("admin.key"), "{e}");
        let conn = Conn {
            url: Some("https://example.com".into()),
            api_key: Some("k".into()),
        };
        assert!(Client::new(&conn)
            .err()
            .unwrap()
            .to_string()
            .contains("http://"));
    }

    #[test]
    fn unreachable_server_is_worded() {
        // A port nothing listens on: bind, learn the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let c = Client::new(&Conn {
            url: Some(url.clone()),
            api_key: Some("moat_key_x".into()),
        })
        .unwrap();
        let e = c.call("GET", "/v1/sandboxes", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot reach moat serve at {url}: is it running? (`moat serve`)")
        );
    }

    #[test]
    fn sse_streams_are_split_into_events() {
        let s = ": keepalive\n\nid: 1\ndata: {\"seq\":1}\n\nid: 2\ndata: a\ndata: b\n\ndata: tail";
        let mut got = Vec::new();
        sse_events(s.as_bytes(), |d| got.push(d.to_string())).unwrap();
        assert_eq!(got, ["{\"seq\":1}", "a\nb", "tail"]);
    }

    #[test]
    fn event_lines_are_one_line() {
        let e = json!({"seq":3,"ts":1_796_159_828_123u64,"key_id":"key_1","sandbox_id":"sbx_1",
                       "kind":"exec","data":{"cmd":["echo","hi"],"exit_code":0}});
        assert_eq!(
            event_line(&e),
            "2026-12-01T21:17:08.123Z  exec              cmd=[\"echo\",\"hi\"] exit_code=0"
        );
        let e = json!({"seq":4,"ts":0,"kind":"sandbox_deleted","data":{}});
        assert_eq!(event_line(&e), "1970-01-01T00:00:00.000Z  sandbox_deleted");
    }
}
