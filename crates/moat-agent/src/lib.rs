//! moat's agent: the program that runs as PID 1 inside every sandbox, of every tier, and
//! only that. It serves the agent protocol ([`moat_proto`]) to the host: every exec (pipes
//! or a pty, background processes with retained output), every file operation, the egress
//! relay, and the sandbox's own deadline.
//!
//! - [`serve`]: the single-threaded `poll` loop, one connection state machine ([`conn`])
//!   per host connection;
//! - [`exec`]: how every process in a sandbox is started and confined, and what the agent
//!   itself drops to;
//! - [`gvisor`]: the gvisor tier's entry point (`moat __moat-gvisor-agent`).
//!
//! The native tier's init (in `moat-backend`) builds the sandbox, drops to the sandbox user
//! with [`exec::ExecEnv::drop_to_sandbox_user`] and calls [`serve::serve`].
//!
//! Its dependencies are its attack surface: `moat-proto`, `moat-policy` and `moat-sys`, no
//! other moat crate (a structure test keeps it so).

pub mod conn;
pub mod exec;
pub mod gvisor;
pub mod serve;

pub use moat_proto::boot::EGRESS_PORT;

/// The signals a sandbox's PID 1 (init, then the agent, in every tier) blocks and reads from
/// its signalfd: children ending, and those it relays to a one-shot workload.
pub const INIT_SIGNALS: [libc::c_int; 8] = [
    libc::SIGCHLD,
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];
