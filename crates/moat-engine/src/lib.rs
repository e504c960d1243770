//! The moat engine: a sandbox's whole life, in one place. Front ends (the HTTP API and MCP in
//! `moat-server`, the CLI) only adapt: they validate, call the engine and map its
//! [`error::EngineError`].
//!
//! - [`lifecycle`]: the [`Engine`] and its [`lifecycle::Sandbox`]es: create (cold, or taken
//!   from a warm [`pool`]), destroy, pause, resume, lifetimes (each sandbox's agent keeps its
//!   own deadline), re-attaching after a restart, auth and scopes ([`lifecycle::Caller`]);
//! - [`agent_client`]: the host side of the agent protocol;
//! - [`egress`]: each sandbox's egress pump to the proxy, and its saved secrets;
//! - [`events`]: the audit log's group-commit writer;
//! - [`store`]: the registry and audit store on SQLite (below).
//!
//! The store is plain synchronous code: the engine runs it off the async threads.
//!
//! # The state database
//!
//! One file, `STATE_DIR/moat.db` (mode 0600, its directory created 0700 when missing), in WAL
//! mode with `synchronous=FULL` and foreign keys on. Schema version 1:
//!
//! | table | one row per | notes |
//! |---|---|---|
//! | `schema_version` | the database (one row) | the version the migrations reached; a database newer than this build is refused |
//! | `keys` | API key | `id` (`key_<16 hex>`), `name`, `admin`, `hash` (SHA-256 of the secret), `created_at`, `revoked_at`; keys are revoked, never deleted |
//! | `tokens` | scoped token | `id` (`tok_<16 hex>`), `parent_key`, `sandbox_id` (foreign key, `ON DELETE CASCADE`), `scopes` (JSON array), `hash`, `created_at`, `expires_at`, `revoked_at` |
//! | `sandboxes` | live sandbox record | `id`, `owner_key`, `tier`, `state`, `created_at`, `expires_at`, `metadata` (JSON object), `policy_json`, `runtime` (JSON), `error` |
//! | `sandbox_owners` | sandbox ever created | `sandbox_id` → `owner_key`; never deleted, so a deleted sandbox's events keep their owner and its id is never handed out again |
//! | `events` | audit event | `seq` (`INTEGER PRIMARY KEY AUTOINCREMENT`), `ts`, `key_id`, `sandbox_id`, `sandbox_owner` (copied from `sandbox_owners` when appended), `kind`, `data` (JSON); triggers abort every `UPDATE` and `DELETE` |
//!
//! Every timestamp is milliseconds since the Unix epoch, passed in by the caller (so tests and
//! the daemon control time); values above `i64::MAX` are stored as `i64::MAX`.
//!
//! # Guarantees
//!
//! - **Durable audit.** [`store::Store::append_event`] returns only after the event's
//!   transaction is committed and, with `synchronous=FULL` in WAL mode, the WAL is fsynced: an
//!   acknowledged event survives `kill -9` of the daemon and a power cut.
//! - **Append-only audit.** The API has no way to change or remove an event, and SQL triggers
//!   abort any `UPDATE` or `DELETE` on `events` (a guard against bugs; whoever can write the
//!   file can drop the triggers). `seq` strictly increases and is never reused.
//! - **Secrets are never stored.** A key or token secret is `moat_<id>_<64 hex>` (32 random bytes
//!   from the OS); the database holds its id and the SHA-256 of the whole secret. Verification
//!   looks the row up by the id (which is not secret) and compares hashes in constant time.
//! - **Tenancy.** A key sees only the sandboxes it created; an admin key sees all. Another key's
//!   sandbox reads exactly like a missing one (`None`), so there is no existence oracle.
//! - **Tokens** are valid while `now < expires_at`, their parent key is not revoked, they are not
//!   revoked, and their sandbox still exists (deleting the sandbox deletes its tokens).
//! - **Expiry survives downtime.** [`store::Store::expired`] is a query on stored `expires_at`,
//!   so sandboxes that expired while the daemon was down are found on the next start.
//! - **Several handles, several processes.** Each [`store::Store`] is one SQLite connection with
//!   a busy timeout; read-modify-write steps run in `BEGIN IMMEDIATE` transactions, so two
//!   processes on one state directory serialise their writes instead of corrupting or losing
//!   them.

pub mod agent_client;
pub mod egress;
pub mod error;
pub mod events;
pub mod launcher;
pub mod lifecycle;
pub mod oneshot;
pub mod pool;
pub mod store;
pub mod templates;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub use error::{EngineError, EngineResult, ErrorKind};
pub use lifecycle::Engine;

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Where the registry, the audit log, the admin key and the agents' sockets live.
    pub state_dir: PathBuf,
    /// A sandbox's lifetime when the create call gives none. Default 300 s.
    pub default_ttl_s: u64,
    /// The longest lifetime a sandbox may have or be extended to. Default 86400 s.
    pub max_ttl_s: u64,
    /// The operator's egress settings (private ranges let through, pinned names, the
    /// resolver, extra upstream roots); sandboxes cannot change them.
    pub egress: moat_egress::Operator,
    /// The tier of a sandbox whose create call and policy name none. Default `native`.
    pub default_tier: moat_policy::Tier,
    /// Warm pools: how many ready sandboxes of its default policy to keep per tier.
    pub pools: Vec<(moat_policy::Tier, usize)>,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("state directory {path}: {message}")]
    StateDir { path: PathBuf, message: String },
    #[error("cannot start the sandbox spawner: {0}")]
    Spawner(#[source] std::io::Error),
    #[error("{0}")]
    Runtime(String),
}

/// The default state directory: `/var/lib/moat` as root, else `$XDG_STATE_HOME/moat` or
/// `~/.local/state/moat`.
pub fn default_state_dir() -> PathBuf {
    if moat_sys::process::effective_uid() == 0 {
        return PathBuf::from("/var/lib/moat");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("moat");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".local/state/moat")
}

/// What the engine sets up before any thread exists: the spawners (forked), the registry, the
/// first admin key, the audit writer and the cleanup thread. Then [`Prepared::start`], inside
/// the async runtime.
pub struct Prepared {
    cfg: EngineConfig,
    launcher: Arc<dyn launcher::Launcher>,
    store: store::Store,
    events: events::EventLog,
    cleaner: lifecycle::Cleaner,
}

/// Prepares the engine. Must be called while the process is still single-threaded: it forks
/// the spawners (one per CPU, at most 4) before any thread starts.
pub fn prepare(cfg: EngineConfig) -> Result<Prepared, StartError> {
    // Many clients and agent connections at once: take the whole fd allowance.
    let _ = moat_sys::process::raise_nofile();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut spawners = Vec::with_capacity(cpus);
    for _ in 0..cpus {
        spawners.push(moat_backend::spawner::Spawner::start().map_err(StartError::Spawner)?);
    }
    prepare_with(cfg, Arc::new(launcher::Spawners::new(spawners)))
}

/// [`prepare`] with a launcher of the caller's (the engine's tests run one that needs no
/// root).
pub fn prepare_with(
    cfg: EngineConfig,
    launcher: Arc<dyn launcher::Launcher>,
) -> Result<Prepared, StartError> {
    let state_err = |message: String| StartError::StateDir {
        path: cfg.state_dir.clone(),
        message,
    };
    let store = store::Store::open(&cfg.state_dir).map_err(|e| state_err(e.to_string()))?;
    let key_file = cfg.state_dir.join("admin.key");
    match store.ensure_admin_key(&key_file, lifecycle::now_ms()) {
        Ok(Some(_)) => eprintln!(
            "moat: created the first admin key in {} (mode 0600): export MOAT_API_KEY=$(cat {})",
            key_file.display(),
            key_file.display()
        ),
        Ok(None) => {
            if key_file.exists() {
                eprintln!("moat: admin key: {}", key_file.display());
            }
        }
        Err(e) => return Err(state_err(e.to_string())),
    }
    // Registry writes need not be fsynced (see Store::relax_durability); audit events are,
    // on the writer's own connection.
    store
        .relax_durability()
        .map_err(|e| state_err(e.to_string()))?;
    let events = events::EventLog::start(&cfg.state_dir).map_err(state_err)?;
    let cleaner = lifecycle::Cleaner::start(launcher.clone())
        .map_err(|e| StartError::Runtime(format!("cannot start the cleanup thread: {e}")))?;
    Ok(Prepared {
        cfg,
        launcher,
        store,
        events,
        cleaner,
    })
}

/// The engine's own tasks while it runs: the pools' fillers and the lifetime reaper.
pub struct Running {
    fillers: Vec<tokio::task::JoinHandle<()>>,
    reaper: tokio::task::JoinHandle<()>,
    /// Sandboxes re-attached at the start.
    pub attached: usize,
}

impl Running {
    /// Ends the engine's tasks and nothing else: no sandbox is touched, as when the daemon
    /// dies (tests use it to act out a crash).
    pub fn abandon(self) {
        self.reaper.abort();
        for f in self.fillers {
            f.abort();
        }
    }
}

impl Prepared {
    /// Starts the engine, inside a tokio runtime: the egress proxy, then re-attaching to the
    /// sandboxes that outlived the previous daemon (destroying the expired and the lost), the
    /// pools and the reaper of lifetimes.
    pub async fn start(self) -> Result<(Arc<Engine>, Running), StartError> {
        let proxy = moat_egress::Proxy::new(self.cfg.egress.clone())
            .map_err(|e| StartError::Runtime(format!("cannot start the egress proxy: {e}")))?;
        let pools = pool::Pools::new(&self.cfg.pools).map_err(StartError::Runtime)?;
        let engine = Arc::new(Engine {
            proxy,
            cfg: self.cfg,
            db: Mutex::new(self.store),
            events: self.events,
            sandboxes: RwLock::new(Default::default()),
            launcher: self.launcher,
            counters: Default::default(),
            cleaner: self.cleaner,
            pools,
        });
        let attached = engine.reattach().await.map_err(StartError::Runtime)?;
        let swept = {
            let engine = engine.clone();
            tokio::task::spawn_blocking(move || pool::sweep_leftovers(&engine))
                .await
                .unwrap_or(0)
        };
        if swept > 0 {
            eprintln!("moat: destroyed {swept} ready pool sandboxes a previous daemon left");
        }
        let fillers = pool::start(&engine);
        let reaper = {
            let engine = engine.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    engine.reap_expired().await;
                }
            })
        };
        Ok((
            engine,
            Running {
                fillers,
                reaper,
                attached,
            },
        ))
    }
}

impl Engine {
    /// Stops the engine's own tasks and destroys the pools' ready sandboxes (the daemon's
    /// alone); every other sandbox keeps running, for the next daemon to re-attach.
    pub async fn stop(self: &Arc<Self>, running: Running) {
        running.reaper.abort();
        pool::stop(self, running.fillers).await;
    }
}
