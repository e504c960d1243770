//! moat's isolation tiers: `native` (namespaces, a fresh root, seccomp, Landlock, cgroups)
//! and `gvisor` (the same sandbox behind gVisor's `runsc`). The host probe behind `moat
//! doctor` lives here too, since it answers "which tiers can this host run, and why not".

pub mod cgroup;
pub mod gvisor;
pub mod idmap;
mod image;
pub mod native;
pub mod probe;
mod rootfs;
pub mod seccomp_prog;
pub mod spawner;
mod tiers;

pub use moat_proto::boot::EGRESS_PORT;
pub use native::{alive, destroy, run, spawn, RunError, RunRequest, SpawnRequest, Spawned};
pub use tiers::{alive_spawned, destroy_spawned, spawn_any};
