//! `moat serve`: the daemon's front ends, adapters only: the HTTP API under `/v1` ([`http`],
//! with exec and file streaming in `exec.rs` and `files.rs`) and MCP ([`mcp`]). Each validates,
//! calls the engine ([`moat_engine`]: a sandbox's whole life) and maps its errors
//! ([`error`]).
//!
//! Process model: [`serve`] first has the engine fork its spawners (single-threaded processes, one per CPU, that
//! create every sandbox: nothing is forked from the async runtime), then starts tokio. Each sandbox's
//! init is moat's agent, listening on `STATE_DIR/sandboxes/ID/agent.sock`; sandboxes outlive the
//! daemon, and a new daemon re-attaches to them from the registry.

pub mod b64;
pub mod error;
mod exec;
mod files;
pub mod http;
pub mod mcp;
mod openapi;
mod templates;

use std::net::SocketAddr;
use std::time::Duration;

use moat_engine::StartError;
pub use moat_engine::{default_state_dir, EngineConfig};

/// How `moat serve` runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address to listen on. Default `127.0.0.1:7070`.
    pub listen: SocketAddr,
    /// The engine's settings: state directory, lifetimes, egress, tier, pools.
    pub engine: EngineConfig,
}

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot listen on {addr}: {source} (is another moat serve running? choose another --listen)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Runtime(String),
}

/// Runs the daemon until SIGINT or SIGTERM. Must be called while the process is still
/// single-threaded: the engine forks its spawners before any thread starts.
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    let prepared = moat_engine::prepare(cfg.engine)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("moat-serve")
        .build()
        .map_err(|e| ServeError::Runtime(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(run(cfg.listen, prepared))
}

async fn run(addr: SocketAddr, prepared: moat_engine::Prepared) -> Result<(), ServeError> {
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
    let (app, running) = prepared.start().await?;
    let attached = running.attached;
    let local = listener.local_addr().unwrap_or(addr);
    eprintln!(
        "moat: serving http://{local} (state {}, {attached} sandboxes re-attached)",
        app.cfg.state_dir.display()
    );
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
    // The pools' ready sandboxes are the daemon's alone: they go with it.
    app.stop(running).await;
    // Sandboxes keep running: a new daemon re-attaches to them.
    eprintln!("moat: stopped; sandboxes keep running until they expire or a daemon deletes them");
    Ok(())
}
