//! Warm pools (`moat serve --pool TIER=N`): sandboxes of a tier's default policy, started
//! ahead of the create calls they serve. A create whose policy is that default (and that
//! binds no secrets) takes a ready one: its id, owner, lifetime and metadata are given at
//! the take, and the pool starts a replacement in the background.
//!
//! A ready sandbox lives in `STATE_DIR/pool/NAME/` (its agent's socket, and `runtime.json`
//! for the daemon that finds it there after a crash); the take moves the directory to
//! `STATE_DIR/sandboxes/ID/`. Ready sandboxes are the daemon's alone: a stopping daemon
//! destroys them, and a starting one destroys any a dead daemon left.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::{self, RuntimeInfo};
use moat_api::Layers;
use moat_policy::{Policy, Tier};
use serde_json::{json, Value};

use crate::agent_client::AgentClient;
use crate::launcher::Launcher;
use crate::lifecycle::Engine;

/// The most ready sandboxes one tier's pool may keep.
pub const MAX_POOL: usize = 64;

/// A started sandbox waiting for its create call.
pub struct Ready {
    pub dir: PathBuf,
    pub runtime: RuntimeInfo,
    pub layers: Layers,
    pub agent: AgentClient,
}

/// One tier's pool.
pub struct TierPool {
    pub tier: Tier,
    pub want: usize,
    /// The policy it serves: the tier's default.
    profile: Policy,
    profile_json: Value,
    ready: Mutex<VecDeque<Ready>>,
    wake: tokio::sync::Notify,
}

/// Every tier's pool, and what they served.
#[derive(Default)]
pub struct Pools {
    pub tiers: Vec<TierPool>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    stopping: AtomicBool,
}

impl Pools {
    /// Pools of `want` ready sandboxes per tier (tiers with 0 get none).
    pub fn new(sizes: &[(Tier, usize)]) -> Result<Pools, String> {
        let mut tiers: Vec<TierPool> = Vec::new();
        for &(tier, want) in sizes {
            if want == 0 || tiers.iter().any(|t| t.tier == tier) {
                continue;
            }
            let profile_json = json!({ "tier": tier.as_str() });
            let profile: Policy = serde_json::from_value(profile_json.clone())
                .map_err(|e| format!("the {} pool's policy: {e}", tier.as_str()))?;
            tiers.push(TierPool {
                tier,
                want: want.min(MAX_POOL),
                profile,
                profile_json,
                ready: Mutex::new(VecDeque::new()),
                wake: tokio::sync::Notify::new(),
            });
        }
        Ok(Pools {
            tiers,
            ..Pools::default()
        })
    }

    /// Ready sandboxes of `tier` now.
    pub fn ready(&self, tier: Tier) -> usize {
        self.tiers
            .iter()
            .find(|t| t.tier == tier)
            .and_then(|t| t.ready.lock().ok().map(|r| r.len()))
            .unwrap_or(0)
    }

    /// A ready sandbox for a create with `policy`, when its tier has a pool, the create is
    /// `eligible` (it binds nothing to the sandbox alone), the policy is the pool's and one
    /// is ready and alive; counts the hit or the miss.
    pub fn take(
        &self,
        launcher: &Arc<dyn Launcher>,
        policy: &Policy,
        eligible: bool,
    ) -> Option<Ready> {
        let pool = self.tiers.iter().find(|t| t.tier == policy.tier)?;
        let mut got = None;
        if eligible && *policy == pool.profile {
            while let Some(r) = pool.ready.lock().ok().and_then(|mut q| q.pop_front()) {
                if launcher.alive(&r.runtime) {
                    got = Some(r);
                    break;
                }
                eprintln!(
                    "moat: pool {}: a ready sandbox died; starting another",
                    pool.tier.as_str()
                );
                // Off the create's path (a gvisor sandbox's removal may start runsc).
                let l = launcher.clone();
                std::thread::spawn(move || discard(&*l, &r.dir, &r.runtime));
            }
            pool.wake.notify_one();
        }
        let counter = if got.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        got
    }
}

/// Kills a ready sandbox and removes its directory (blocking).
pub(crate) fn discard(launcher: &dyn Launcher, dir: &Path, rt: &RuntimeInfo) {
    launcher.destroy(rt);
    let _ = std::fs::remove_dir_all(dir);
}

fn pool_root(app: &Engine) -> PathBuf {
    app.cfg.state_dir.join("pool")
}

/// On start: destroys the ready sandboxes a previous daemon left (it died before it could).
pub fn sweep_leftovers(app: &Engine) -> usize {
    let Ok(rd) = std::fs::read_dir(pool_root(app)) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let dir = e.path();
        let rt = std::fs::read(dir.join("runtime.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<RuntimeInfo>(&b).ok());
        if let Some(rt) = rt {
            app.launcher.destroy(&rt);
            n += 1;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    n
}

/// Starts one filler task per pool: each keeps its pool full, one sandbox at a time, and
/// waits to be woken by a take. Returns the tasks, for [`stop`].
pub fn start(app: &Arc<Engine>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..app.pools.tiers.len())
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move { fill(app, i).await })
        })
        .collect()
}

async fn fill(app: Arc<Engine>, i: usize) {
    let pools = &app.pools;
    let pool = &pools.tiers[i];
    let mut failures = 0u32;
    loop {
        while !pools.stopping.load(Ordering::Relaxed)
            && pool.ready.lock().map(|q| q.len()).unwrap_or(usize::MAX) < pool.want
        {
            match start_one(&app, pool).await {
                Ok(r) => {
                    failures = 0;
                    if pools.stopping.load(Ordering::Relaxed) {
                        let _ = {
                            let l = app.launcher.clone();
                            tokio::task::spawn_blocking(move || discard(&*l, &r.dir, &r.runtime))
                                .await
                        };
                        return;
                    }
                    if let Ok(mut q) = pool.ready.lock() {
                        q.push_back(r);
                    }
                }
                Err(e) => {
                    // A tier this host cannot run, or a host out of room: say so, and try
                    // again later rather than spin.
                    failures += 1;
                    let wait = Duration::from_secs(u64::from(failures.min(6)) * 5);
                    eprintln!(
                        "moat: pool {}: cannot start a sandbox: {e}; trying again in {} s",
                        pool.tier.as_str(),
                        wait.as_secs()
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = pool.wake.notified() => {}
                    }
                }
            }
        }
        if pools.stopping.load(Ordering::Relaxed) {
            return;
        }
        pool.wake.notified().await;
    }
}

async fn start_one(app: &Arc<Engine>, pool: &TierPool) -> Result<Ready, String> {
    let name = store::new_sandbox_id().map_err(|e| e.to_string())?;
    let dir = pool_root(app).join(name.replacen("sbx_", "pool_", 1));
    let socket = dir.join("agent.sock");
    let spawned = {
        let app = app.clone();
        let dir = dir.clone();
        let socket = socket.clone();
        let policy_json = pool.profile_json.clone();
        tokio::task::spawn_blocking(move || -> Result<_, String> {
            crate::lifecycle::make_private_dir(&dir)?;
            app.launcher.spawn(&policy_json, &socket, None)
        })
        .await
        .map_err(|e| format!("spawn task: {e}"))?
    };
    let spawned = match spawned {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let runtime = spawned.runtime.clone();
    let saved = serde_json::to_vec(&runtime)
        .map_err(|e| e.to_string())
        .and_then(|b| {
            std::fs::write(dir.join("runtime.json"), b)
                .map_err(|e| format!("write {}/runtime.json: {e}", dir.display()))
        });
    let agent = match saved {
        Ok(()) => AgentClient::connect(&runtime.agent_socket)
            .await
            .map_err(|e| format!("the sandbox started but its agent did not answer: {e}")),
        Err(e) => Err(e),
    };
    match agent {
        Ok(agent) => Ok(Ready {
            dir,
            runtime,
            layers: spawned.layers,
            agent,
        }),
        Err(e) => {
            let l = app.launcher.clone();
            let _ = tokio::task::spawn_blocking(move || discard(&*l, &dir, &runtime)).await;
            Err(e)
        }
    }
}

/// On stop: no new ready sandboxes, and those ready are destroyed.
pub async fn stop(app: &Arc<Engine>, fillers: Vec<tokio::task::JoinHandle<()>>) {
    app.pools.stopping.store(true, Ordering::Relaxed);
    for p in &app.pools.tiers {
        p.wake.notify_one();
    }
    for f in fillers {
        // A filler in the middle of a start finishes it and destroys what it started.
        let _ = tokio::time::timeout(Duration::from_secs(30), f).await;
    }
    let mut ready = Vec::new();
    for p in &app.pools.tiers {
        if let Ok(mut q) = p.ready.lock() {
            ready.extend(q.drain(..));
        }
    }
    if !ready.is_empty() {
        let launcher = app.launcher.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for r in ready {
                discard(&*launcher, &r.dir, &r.runtime);
            }
        })
        .await;
    }
    let _ = std::fs::remove_dir(pool_root(app));
}
