//! `moat serve`: the daemon. HTTP API under `/v1` ([`http`]), the sandbox lifecycle ([`app`]),
//! the audit log's group-commit writer ([`events`]) and the host side of the agent protocol
//! ([`agent_client`]).
//!
//! Process model: [`serve`] first forks the spawners (single-threaded processes, one per CPU, that
//! create every sandbox: nothing is forked from the async runtime), then starts tokio. Each sandbox's
//! init is moat's agent, listening on `STATE_DIR/sandboxes/ID/agent.sock`; sandboxes outlive the
//! daemon, and a new daemon re-attaches to them from the registry.

pub mod agent_client;
pub mod app;
pub mod b64;
pub mod egress;
pub mod error;
pub mod events;
mod exec;
mod files;
pub mod http;
pub mod mcp;
mod openapi;
pub mod pool;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use moat_engine::store::Store;

/// How `moat serve` runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address to listen on. Default `127.0.0.1:7070`.
    pub listen: SocketAddr,
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

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("state directory {path}: {message}")]
    StateDir { path: PathBuf, message: String },
    #[error("cannot start the sandbox spawner: {0}")]
    Spawner(#[source] std::io::Error),
    #[error("cannot listen on {addr}: {source} (is another moat serve running? choose another --listen)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
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

/// Runs the daemon until SIGINT or SIGTERM. Must be called while the process is still
/// single-threaded: it forks the spawner before it starts any thread.
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    // Many clients and agent connections at once: take the whole fd allowance.
    let _ = moat_sys::process::raise_nofile();
    // One spawner per CPU (at most 4), all forked now, while the process is single-threaded.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut spawners = Vec::with_capacity(cpus);
    for _ in 0..cpus {
        spawners.push(moat_backend::spawner::Spawner::start().map_err(ServeError::Spawner)?);
    }
    let state_err = |message: String| ServeError::StateDir {
        path: cfg.state_dir.clone(),
        message,
    };
    let store = Store::open(&cfg.state_dir).map_err(|e| state_err(e.to_string()))?;
    let key_file = cfg.state_dir.join("admin.key");
    match store.ensure_admin_key(&key_file, app::now_ms()) {
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
    let cleaner = app::Cleaner::start()
        .map_err(|e| ServeError::Runtime(format!("cannot start the cleanup thread: {e}")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("moat-serve")
        .build()
        .map_err(|e| ServeError::Runtime(format!("cannot start the async runtime: {e}")))?;
    let proxy = runtime
        .block_on(async { moat_egress::Proxy::new(cfg.egress.clone()) })
        .map_err(|e| ServeError::Runtime(format!("cannot start the egress proxy: {e}")))?;
    let pools = pool::Pools::new(&cfg.pools).map_err(ServeError::Runtime)?;
    let app = Arc::new(app::App {
        proxy,
        cfg: cfg.clone(),
        db: Mutex::new(store),
        events,
        sandboxes: RwLock::new(Default::default()),
        spawners: app::Spawners::new(spawners),
        counters: Default::default(),
        cleaner,
        pools,
    });
    runtime.block_on(run(app))
}

async fn run(app: Arc<app::App>) -> Result<(), ServeError> {
    let addr = app.cfg.listen;
    // A deep accept queue: a burst of clients (thousands of execs at once) must not overflow
    // the default backlog of 1024 into SYN cookies and resets.
    let listener = (|| {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(4096)
    })()
    .map_err(|source| ServeError::Listen { addr, source })?;
    let attached = app.reattach().await.map_err(ServeError::Runtime)?;
    let swept = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || pool::sweep_leftovers(&app))
            .await
            .unwrap_or(0)
    };
    if swept > 0 {
        eprintln!("moat: destroyed {swept} ready pool sandboxes a previous daemon left");
    }
    let fillers = pool::start(&app);
    let local = listener.local_addr().unwrap_or(addr);
    eprintln!(
        "moat: serving http://{local} (state {}, {attached} sandboxes re-attached)",
        app.cfg.state_dir.display()
    );
    let reaper = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                app.reap_expired().await;
            }
        })
    };
    let router = http::router(app.clone());
    // SIGINT/SIGTERM: stop accepting, give requests in flight a moment (a followed event
    // stream never ends by itself), then stop.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = stop_tx.send(true);
        }
    });
    let mut graceful = stop_rx.clone();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = graceful.wait_for(|stop| *stop).await;
    });
    let mut grace = stop_rx;
    tokio::select! {
        served = server => {
            served.map_err(|e| ServeError::Runtime(format!("HTTP server: {e}")))?;
        }
        _ = async {
            let _ = grace.wait_for(|stop| *stop).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        } => {}
    }
    reaper.abort();
    // The pools' ready sandboxes are the daemon's alone: they go with it.
    pool::stop(&app, fillers).await;
    // Sandboxes keep running: a new daemon re-attaches to them.
    eprintln!("moat: stopped; sandboxes keep running until they expire or a daemon deletes them");
    Ok(())
}
