//! The engine's seam to the tiers: everything it does to a sandbox's processes and cgroup goes
//! through a [`Launcher`]. The daemon's is [`Spawners`] (moat-backend's spawner processes, the
//! tiers' teardown, cgroups); the engine's unit tests use one that runs a protocol-true agent
//! in-process, so that the lifecycle's logic is tested without root.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use moat_api::Layers;
use moat_backend::cgroup::Cgroup;
use moat_backend::spawner::Spawner;
use serde_json::Value;

use crate::store::RuntimeInfo;

/// A sandbox a [`Launcher`] started: what the registry keeps of it, and its layers.
#[derive(Clone, Debug)]
pub struct Started {
    pub runtime: RuntimeInfo,
    pub layers: Layers,
}

/// Resource use of a whole sandbox, from its cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_usec: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

/// What the engine does to sandboxes' processes. Every method may block (the engine calls
/// them off its async threads) and is safe to call for a sandbox already gone.
pub trait Launcher: Send + Sync + 'static {
    /// Starts a sandbox of `policy_json` (moat's policy schema, as JSON) whose agent listens
    /// on `socket`; returns once it listens.
    fn spawn(
        &self,
        policy_json: &Value,
        socket: &Path,
        ca_pem: Option<&str>,
    ) -> Result<Started, String>;
    /// Whether the sandbox's init still runs.
    fn alive(&self, rt: &RuntimeInfo) -> bool;
    /// Kills the sandbox's init and waits until it is gone (a paused one is thawed first).
    fn kill(&self, rt: &RuntimeInfo);
    /// Kills whatever is left in the sandbox's cgroup and removes the cgroup.
    fn remove_cgroup(&self, rt: &RuntimeInfo);
    /// Freezes or thaws the whole sandbox.
    fn set_frozen(&self, rt: &RuntimeInfo, frozen: bool) -> Result<(), String>;
    /// Resource use now; `None` without a cgroup.
    fn usage(&self, rt: &RuntimeInfo) -> Option<Usage>;
    /// OOM kills in the sandbox so far.
    fn oom_kills(&self, rt: &RuntimeInfo) -> u64;

    /// The one teardown: init killed, then the cgroup removed.
    fn destroy(&self, rt: &RuntimeInfo) {
        self.kill(rt);
        self.remove_cgroup(rt);
    }
}

/// The spawner processes (single-threaded, forked before the runtime started): one per CPU,
/// so that sandboxes start in parallel; a start takes the first free one.
pub struct Spawners {
    pool: Vec<Mutex<Spawner>>,
    next: AtomicU64,
}

impl Spawners {
    pub fn new(pool: Vec<Spawner>) -> Spawners {
        Spawners {
            pool: pool.into_iter().map(Mutex::new).collect(),
            next: AtomicU64::new(0),
        }
    }

    fn spawn_on_free(
        &self,
        policy_json: &Value,
        socket: &Path,
        ca_pem: Option<&str>,
    ) -> Result<moat_backend::Spawned, String> {
        let n = self.pool.len();
        if n == 0 {
            return Err("no spawner is running".into());
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        for i in 0..n {
            if let Ok(mut s) = self.pool[(start + i) % n].try_lock() {
                return s.spawn_with_ca(policy_json, socket, ca_pem);
            }
        }
        let mut s = self.pool[start % n]
            .lock()
            .map_err(|_| "the spawner lock is poisoned".to_string())?;
        s.spawn_with_ca(policy_json, socket, ca_pem)
    }
}

impl Launcher for Spawners {
    fn spawn(
        &self,
        policy_json: &Value,
        socket: &Path,
        ca_pem: Option<&str>,
    ) -> Result<Started, String> {
        let spawned = self.spawn_on_free(policy_json, socket, ca_pem)?;
        Ok(Started {
            runtime: runtime_of(&spawned, socket),
            layers: spawned.layers,
        })
    }

    fn alive(&self, rt: &RuntimeInfo) -> bool {
        moat_backend::alive_spawned(&spawned_of(rt))
    }

    fn kill(&self, rt: &RuntimeInfo) {
        // Frozen tasks cannot die.
        with_cgroup(&rt.cgroup_paths, |cg| cg.thaw());
        let _ = moat_backend::destroy_spawned(&spawned_of(rt));
    }

    fn remove_cgroup(&self, rt: &RuntimeInfo) {
        if !rt.cgroup_paths.is_empty() {
            if let Ok(mut cg) = Cgroup::open(rt.cgroup_paths.clone()) {
                let _ = cg.kill_all();
                let _ = cg.remove();
            }
        }
    }

    fn set_frozen(&self, rt: &RuntimeInfo, frozen: bool) -> Result<(), String> {
        with_cgroup(&rt.cgroup_paths, |cg| {
            if frozen {
                cg.freeze()
            } else {
                cg.thaw()
            }
        })
        .ok_or_else(|| "the sandbox's cgroup is gone".to_string())?
        .map_err(|e| format!("cgroup freezer: {e}"))
    }

    fn usage(&self, rt: &RuntimeInfo) -> Option<Usage> {
        with_cgroup(&rt.cgroup_paths, |cg| cg.stats()).map(|s| Usage {
            cpu_usec: s.cpu_usec,
            memory_bytes: s.memory_bytes,
            pids: s.pids,
        })
    }

    fn oom_kills(&self, rt: &RuntimeInfo) -> u64 {
        with_cgroup(&rt.cgroup_paths, |c| c.oom_kills()).unwrap_or(0)
    }
}

/// What the registry keeps of a started sandbox whose agent listens at `socket`.
fn runtime_of(spawned: &moat_backend::Spawned, socket: &Path) -> RuntimeInfo {
    RuntimeInfo {
        init_pid: spawned.pid,
        init_start_time: spawned.start_time,
        agent_socket: socket.to_path_buf(),
        cgroup_paths: spawned.cgroup_paths.clone(),
        tier_state: spawned
            .gvisor
            .as_ref()
            .and_then(|g| serde_json::to_value(g).ok()),
        layers: serde_json::to_value(&spawned.layers).ok(),
    }
}

/// The backend's view of a stored sandbox, for the tier-dispatching calls.
fn spawned_of(rt: &RuntimeInfo) -> moat_backend::Spawned {
    moat_backend::Spawned {
        pid: rt.init_pid,
        start_time: rt.init_start_time,
        cgroup_paths: rt.cgroup_paths.clone(),
        layers: Layers::default(),
        gvisor: rt
            .tier_state
            .as_ref()
            .and_then(|v| serde_json::from_value(v.clone()).ok()),
    }
}

/// Runs `f` on a handle to the cgroup at `paths`, then lets the handle go without removing
/// the cgroup.
fn with_cgroup<T>(paths: &[PathBuf], f: impl FnOnce(&Cgroup) -> T) -> Option<T> {
    if paths.is_empty() {
        return None;
    }
    let cg = Cgroup::open(paths.to_vec()).ok()?;
    let out = f(&cg);
    let _ = cg.into_paths();
    Some(out)
}
