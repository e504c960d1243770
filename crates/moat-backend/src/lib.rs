//! moat's isolation tiers. Today: `native` (namespaces, a fresh root, seccomp, Landlock,
//! cgroups). The host probe behind `moat doctor` lives here too, since it answers "which
//! tiers can this host run, and why not".

mod agent;
pub mod agent_server;
pub mod cgroup;
pub mod idmap;
pub mod native;
pub mod probe;
mod rootfs;
pub mod seccomp_prog;
pub mod spawner;

pub use agent::EGRESS_PORT;
pub use native::{alive, destroy, run, spawn, RunError, RunRequest, SpawnRequest, Spawned};
