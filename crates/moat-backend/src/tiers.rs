//! One entry point per lifecycle step for every tier: a persistent sandbox is started,
//! checked and destroyed the same way whatever its policy's `tier`.

use crate::gvisor;
use crate::native::{self, RunError, SpawnRequest, Spawned};
use moat_policy::Tier;
use std::io;

/// Starts a persistent sandbox of the policy's tier ([`native::spawn`] or
/// [`gvisor::spawn`]). Must be called from a single-threaded process.
pub fn spawn_any(req: &SpawnRequest) -> Result<Spawned, RunError> {
    match req.policy.tier {
        Tier::Native => native::spawn(req),
        Tier::Gvisor => gvisor::spawn(req),
    }
}

/// Whether the sandbox still runs: its init (native) or its sentry (gvisor), by pid and
/// start time.
pub fn alive_spawned(s: &Spawned) -> bool {
    match &s.gvisor {
        None => native::alive(s.pid, s.start_time),
        Some(_) => gvisor::alive(s),
    }
}

/// Kills the sandbox and waits until it is gone; for the gvisor tier also removes runsc's
/// state, the bundle and the control directory. The cgroup directories stay for the caller
/// to remove (after [`crate::cgroup::Cgroup::kill_all`]), for both tiers. Ok when it was gone
/// already.
pub fn destroy_spawned(s: &Spawned) -> io::Result<()> {
    match &s.gvisor {
        None => native::destroy(s.pid, s.start_time),
        Some(_) => gvisor::destroy(s),
    }
}
