//! The daemon's state and the sandbox lifecycle: create, destroy, pause, resume, expiry, and
//! re-attaching to the sandboxes that outlived a restart.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::{
    self, Event, EventKind, KeyId, Principal, RuntimeInfo, SandboxFilter, SandboxRecord,
    SandboxState, Scope, Store,
};
use moat_api::Layers;
use moat_policy::Policy;
use serde_json::{json, Value};

use crate::agent_client::AgentClient;
use crate::error::{EngineError, EngineResult, ErrorKind};
use crate::events::EventLog;
use crate::launcher::Launcher;
use crate::EngineConfig;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A live sandbox: what the registry holds plus the handles to reach it.
pub struct Sandbox {
    pub id: String,
    pub owner: KeyId,
    pub tier: String,
    pub created_at: u64,
    pub expires_at: AtomicU64,
    pub metadata: BTreeMap<String, String>,
    pub state: Mutex<SandboxState>,
    pub policy: Policy,
    pub runtime: RuntimeInfo,
    pub layers: Layers,
    /// The shared connection for short requests.
    pub agent: AgentClient,
    /// Serialises lifecycle changes (pause, resume, destroy) of this sandbox.
    pub lifecycle: tokio::sync::Mutex<()>,
    /// The egress relay pump (network mode `allowlist`); dropped with the sandbox.
    pub egress: Mutex<Option<crate::egress::Pump>>,
    /// What acts on its processes and cgroup.
    pub launcher: Arc<dyn Launcher>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("tier", &self.tier)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    pub fn state(&self) -> SandboxState {
        self.state
            .lock()
            .map(|s| *s)
            .unwrap_or(SandboxState::Failed)
    }

    fn set_state(&self, to: SandboxState) {
        if let Ok(mut s) = self.state.lock() {
            *s = to;
        }
    }

    /// The sandbox as the API shows it.
    pub fn json(&self) -> Value {
        json!({
            "id": self.id,
            "state": self.state().as_str(),
            "tier": self.tier,
            "created_at": self.created_at,
            "expires_at": self.expires_at.load(Ordering::Relaxed),
            "metadata": self.metadata,
            "error": null,
            "sandbox": self.layers,
        })
    }

    /// A fresh connection to the agent, for a long streamed transfer (so a slow client
    /// stalls only its own transfer).
    pub async fn dedicated(&self) -> EngineResult<AgentClient> {
        Ok(AgentClient::connect(&self.runtime.agent_socket).await?)
    }

    /// OOM kills in the sandbox's cgroup so far (0 without cgroups).
    pub fn oom_kills(&self) -> u64 {
        self.launcher.oom_kills(&self.runtime)
    }

    /// The sandbox must be running for exec and file calls.
    pub fn require_running(&self) -> EngineResult<()> {
        match self.state() {
            SandboxState::Running => Ok(()),
            SandboxState::Paused => Err(EngineError::conflict(
                "sandbox_paused",
                format!(
                    "sandbox {} is paused: resume it first (POST /v1/sandboxes/{}/resume)",
                    self.id, self.id
                ),
            )),
            other => Err(EngineError::conflict(
                "sandbox_not_running",
                format!("sandbox {} is {}", self.id, other.as_str()),
            )),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub created: AtomicU64,
    pub destroyed: AtomicU64,
    pub expired: AtomicU64,
    pub execs: AtomicU64,
    pub requests: AtomicU64,
    pub errors_4xx: AtomicU64,
    pub errors_5xx: AtomicU64,
    pub create_failures: AtomicU64,
    pub egress_allowed: AtomicU64,
    pub egress_denied: AtomicU64,
    pub egress_kills: AtomicU64,
}

pub struct Engine {
    pub proxy: Arc<moat_egress::Proxy>,
    pub cfg: EngineConfig,
    pub db: Mutex<Store>,
    pub events: EventLog,
    pub sandboxes: RwLock<HashMap<String, Arc<Sandbox>>>,
    pub launcher: Arc<dyn Launcher>,
    pub counters: Counters,
    pub cleaner: Cleaner,
    pub pools: crate::pool::Pools,
}

/// Removes destroyed sandboxes' cgroups on a thread of its own, off the request path, one
/// at a time.
#[derive(Clone)]
pub struct Cleaner {
    tx: std::sync::mpsc::Sender<RuntimeInfo>,
    launcher: Arc<dyn Launcher>,
}

impl Cleaner {
    pub fn start(launcher: Arc<dyn Launcher>) -> std::io::Result<Cleaner> {
        let (tx, rx) = std::sync::mpsc::channel::<RuntimeInfo>();
        let l = launcher.clone();
        std::thread::Builder::new()
            .name("moat-cleaner".into())
            .spawn(move || {
                while let Ok(rt) = rx.recv() {
                    l.remove_cgroup(&rt);
                }
            })?;
        Ok(Cleaner { tx, launcher })
    }

    /// Queues the removal of a dead sandbox's cgroup; done at once if the thread is gone.
    pub fn remove(&self, rt: RuntimeInfo) {
        if let Err(std::sync::mpsc::SendError(rt)) = self.tx.send(rt) {
            self.launcher.remove_cgroup(&rt);
        }
    }
}

/// Who is calling, as checked against the registry.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
}

impl Caller {
    /// The key behind the call (a token's parent key).
    pub fn key_id(&self) -> &KeyId {
        match &self.principal {
            Principal::Key(k) => &k.id,
            Principal::Token(t) => &t.parent_key,
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(&self.principal, Principal::Key(k) if k.admin)
    }

    pub fn is_token(&self) -> bool {
        matches!(self.principal, Principal::Token(_))
    }

    /// Whether this caller may act on `sandbox` with `scope`; a sandbox it may not see at all
    /// is reported exactly like a missing one.
    pub fn check(&self, sandbox: &Sandbox, scope: Scope) -> EngineResult<()> {
        match &self.principal {
            Principal::Key(k) => {
                if k.admin || k.id == sandbox.owner {
                    Ok(())
                } else {
                    Err(EngineError::no_sandbox(&sandbox.id))
                }
            }
            Principal::Token(t) => {
                if t.sandbox_id != sandbox.id {
                    return Err(EngineError::no_sandbox(&sandbox.id));
                }
                if t.allows(scope) {
                    Ok(())
                } else {
                    Err(EngineError::forbidden(format!(
                        "this token does not have the `{}` scope",
                        scope_name(scope)
                    )))
                }
            }
        }
    }
}

/// The API's name for a scope (`files:read`).
pub fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Exec => "exec",
        Scope::FilesRead => "files:read",
        Scope::FilesWrite => "files:write",
        Scope::Read => "read",
    }
}

pub fn parse_scope(s: &str) -> Option<Scope> {
    match s {
        "exec" => Some(Scope::Exec),
        "files:read" | "files_read" => Some(Scope::FilesRead),
        "files:write" | "files_write" => Some(Scope::FilesWrite),
        "read" => Some(Scope::Read),
        _ => None,
    }
}

/// Runs a closure on the registry's connection off the async threads.
pub async fn db<T: Send + 'static>(
    app: &Arc<Engine>,
    f: impl FnOnce(&Store) -> Result<T, store::StoreError> + Send + 'static,
) -> EngineResult<T> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || {
        let store = app
            .db
            .lock()
            .map_err(|_| EngineError::internal("state database lock poisoned"))?;
        f(&store).map_err(EngineError::from)
    })
    .await
    .map_err(|e| EngineError::internal(format!("database task: {e}")))?
}

impl Engine {
    /// Who is calling, from the bearer secret of a request (a key or a scoped token); a
    /// missing, unknown, revoked or expired one is audited (`auth_failed`, with `method` and
    /// `path`) and refused. The one authentication of every front end.
    pub async fn authenticate(
        self: &Arc<Self>,
        secret: Option<&str>,
        method: &str,
        path: &str,
    ) -> EngineResult<Caller> {
        let secret = secret
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty() && s.len() < 512);
        let why = match secret {
            None => "no bearer credentials",
            Some(secret) => match db(self, move |s| s.authenticate(&secret, now_ms())).await? {
                Some(principal) => return Ok(Caller { principal }),
                None => "unknown, revoked or expired credentials",
            },
        };
        let _ = self
            .audit(
                None,
                None,
                EventKind::AuthFailed,
                json!({"method": method, "path": path, "reason": why}),
            )
            .await;
        Err(EngineError::unauthorized())
    }
}

impl Engine {
    pub fn sandbox(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.sandboxes.read().ok()?.get(id).cloned()
    }

    /// Finds a sandbox the caller may act on with `scope`.
    pub fn visible(&self, caller: &Caller, id: &str, scope: Scope) -> EngineResult<Arc<Sandbox>> {
        let sbx = self
            .sandbox(id)
            .ok_or_else(|| EngineError::no_sandbox(id))?;
        caller.check(&sbx, scope)?;
        Ok(sbx)
    }

    /// Stores an audit event; the call it records is answered only after this returns.
    pub async fn audit(
        &self,
        key: Option<&KeyId>,
        sandbox: Option<&str>,
        kind: EventKind,
        data: Value,
    ) -> EngineResult<u64> {
        self.events
            .append(Event {
                ts: now_ms(),
                key_id: key.cloned(),
                sandbox_id: sandbox.map(str::to_owned),
                kind,
                data,
            })
            .await
            .map_err(EngineError::internal)
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("sandboxes").join(id)
    }

    /// Starts the relay pump of `sbx`'s egress, with a sink that records every connection
    /// in the audit log and counts it.
    fn start_egress(self: &Arc<Self>, sbx: &Arc<Sandbox>, cfg: moat_egress::SandboxEgress) {
        // One writer per sandbox: its connection events reach the log in the order they
        // happened.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Value)>();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some((sandbox, data)) = rx.recv().await {
                let Some(app) = weak.upgrade() else {
                    return;
                };
                let _ = app
                    .audit(None, Some(&sandbox), EventKind::Egress, data)
                    .await;
            }
        });
        let sink = Arc::new(AuditSink {
            app: Arc::downgrade(self),
            tx,
        });
        let pump = crate::egress::start(&self.proxy, sbx.runtime.agent_socket.clone(), cfg, sink);
        if let Ok(mut e) = sbx.egress.lock() {
            *e = Some(pump);
        }
    }

    /// Where a sandbox's secrets and CA are kept across restarts (root-only, outside the
    /// sandbox directory, which a tier may bind into the sandbox).
    fn egress_file(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("egress").join(format!("{id}.json"))
    }

    /// After a restart: the sandbox's egress from its policy, with the secrets and CA that
    /// were saved at its creation.
    fn reattach_egress(self: &Arc<Self>, sbx: &Arc<Sandbox>) {
        match crate::egress::restore(&sbx.id, &sbx.policy, &self.egress_file(&sbx.id)) {
            Ok(Some(cfg)) => self.start_egress(sbx, cfg),
            Ok(None) => {}
            Err(e) => eprintln!("moat: sandbox {}: cannot restore its egress: {e}", sbx.id),
        }
    }

    /// Creates and starts a sandbox for `caller`.
    pub async fn create(
        self: &Arc<Self>,
        caller: &Caller,
        policy_json: Value,
        metadata: BTreeMap<String, String>,
        timeout_s: Option<u64>,
        tier: Option<String>,
        secrets: BTreeMap<String, String>,
    ) -> EngineResult<Arc<Sandbox>> {
        // The call's tier, else the policy's, else the server's default.
        let mut policy_json = policy_json;
        let in_policy = policy_json
            .get("tier")
            .and_then(Value::as_str)
            .map(str::to_string);
        let tier_v = match (&tier, &in_policy) {
            (Some(t), Some(p)) if t != p => {
                return Err(EngineError::bad_request(format!(
                    "tier `{t}` and the policy's tier `{p}` differ: give one"
                )))
            }
            (Some(t), _) | (None, Some(t)) => {
                moat_policy::Tier::parse(t).map_err(|e| EngineError::bad_request(e.to_string()))?
            }
            (None, None) => self.cfg.default_tier,
        };
        if let Some(o) = policy_json.as_object_mut() {
            o.insert("tier".into(), Value::String(tier_v.as_str().into()));
        }
        let policy: Policy = serde_json::from_value(policy_json.clone())
            .map_err(|e| EngineError::bad_request(format!("policy: {e}")))?;
        policy
            .validate()
            .map_err(|e| EngineError::bad_request(format!("policy: {e}")))?;
        // A template: its root, environment and user, in the policy the launcher gets.
        let policy = if policy.fs.template.is_some() || policy.fs.image.is_some() {
            let state = self.cfg.state_dir.clone();
            let mut p = policy;
            let p = tokio::task::spawn_blocking(move || {
                crate::templates::resolve(&state, &mut p).map(|_| p)
            })
            .await
            .map_err(|e| EngineError::internal(format!("template task: {e}")))?
            .map_err(EngineError::bad_request)?;
            policy_json = serde_json::to_value(&p)
                .map_err(|e| EngineError::internal(format!("encode the policy: {e}")))?;
            p
        } else {
            policy
        };
        let ttl_s = timeout_s.unwrap_or(self.cfg.default_ttl_s);
        if ttl_s == 0 {
            return Err(EngineError::bad_request("timeout_s must be at least 1"));
        }
        let ttl_s = ttl_s.min(self.cfg.max_ttl_s);
        let tier = policy.tier.as_str().to_string();
        let id = store::new_sandbox_id()?;
        let egress = crate::egress::prepare(&id, &policy, &secrets)
            .map_err(|e| EngineError::bad_request(format!("policy: {e}")))?;
        let mut policy = policy;
        if let Some(e) = &egress {
            // The workload sees each secret's placeholder, never its value.
            let env = policy_json
                .as_object_mut()
                .map(|p| p.entry("env").or_insert_with(|| json!({})))
                .and_then(Value::as_object_mut)
                .ok_or_else(|| EngineError::bad_request("policy.env must be an object"))?;
            for (k, v) in &e.env {
                env.insert(k.clone(), Value::String(v.clone()));
                policy.env.insert(k.clone(), v.clone());
            }
        }
        let ca_pem = egress.as_ref().and_then(|e| e.ca_pem.clone());
        // A warm pool's sandbox when the policy is its tier's default and nothing is bound
        // to this sandbox alone (secrets, a CA); its socket moves with its directory.
        let pooled = self.pools.take(
            &self.launcher,
            &policy,
            egress.is_none() && secrets.is_empty(),
        );
        let dir = self.sandbox_dir(&id);
        let socket = dir.join("agent.sock");
        let pooled_runtime = pooled.as_ref().map(|r| RuntimeInfo {
            agent_socket: socket.clone(),
            ..r.runtime.clone()
        });
        let now = now_ms();
        let record = SandboxRecord {
            id: id.clone(),
            owner_key: caller.key_id().clone(),
            tier: tier.clone(),
            state: SandboxState::Creating,
            created_at: now,
            expires_at: now + ttl_s * 1000,
            metadata: metadata.clone(),
            policy_json: policy_json.to_string(),
            runtime: pooled_runtime.clone(),
            error: None,
        };
        {
            let record = record.clone();
            let inserted = db(self, move |s| s.insert_sandbox(&record)).await;
            if let (Err(e), Some(r)) = (&inserted, &pooled) {
                let (d, rt) = (r.dir.clone(), r.runtime.clone());
                let l = self.launcher.clone();
                let _ =
                    tokio::task::spawn_blocking(move || crate::pool::discard(&*l, &d, &rt)).await;
                return Err(e.clone());
            }
            inserted?;
        }
        let (runtime, layers, agent) = match (pooled, pooled_runtime) {
            (Some(r), Some(runtime)) => self.adopt(&id, r, runtime, &dir).await?,
            _ => {
                self.start_cold(&id, &policy_json, &socket, &dir, ca_pem)
                    .await?
            }
        };
        let pooled = record.runtime.is_some();
        // The sandbox keeps its own deadline from here on, with or without a daemon.
        if let Err(e) = agent.set_deadline(Some(record.expires_at)).await {
            self.launcher.destroy(&runtime);
            let (id2, dir2) = (id.clone(), dir.clone());
            let _ = db(self, move |s| s.delete_sandbox(&id2)).await;
            let _ = std::fs::remove_dir_all(dir2);
            return Err(EngineError::internal(format!(
                "the sandbox started but its agent did not take its deadline: {e}"
            )));
        }
        {
            let id2 = id.clone();
            let rt = runtime.clone();
            db(self, move |s| {
                s.set_runtime(&id2, Some(&rt))?;
                s.set_state(&id2, &[SandboxState::Creating], SandboxState::Running)
            })
            .await?;
        }
        let sbx = Arc::new(Sandbox {
            id: id.clone(),
            owner: caller.key_id().clone(),
            tier,
            created_at: now,
            expires_at: AtomicU64::new(record.expires_at),
            metadata,
            state: Mutex::new(SandboxState::Running),
            policy,
            runtime,
            layers,
            agent,
            lifecycle: tokio::sync::Mutex::new(()),
            egress: Mutex::new(None),
            launcher: self.launcher.clone(),
        });
        if let Some(e) = egress {
            if let Err(err) = crate::egress::save(&self.egress_file(&id), &e.cfg) {
                eprintln!("moat: sandbox {id}: its secrets will not survive a restart: {err}");
            }
            self.start_egress(&sbx, e.cfg);
        }
        if let Ok(mut map) = self.sandboxes.write() {
            map.insert(id.clone(), sbx.clone());
        }
        self.counters.created.fetch_add(1, Ordering::Relaxed);
        self.audit(
            Some(caller.key_id()),
            Some(&id),
            EventKind::SandboxCreated,
            json!({"tier": sbx.tier, "expires_at": record.expires_at, "metadata": sbx.metadata,
                   "pid": sbx.runtime.init_pid, "pooled": pooled}),
        )
        .await?;
        Ok(sbx)
    }

    /// A pool's ready sandbox becomes sandbox `id`: its directory moves to the sandbox's.
    async fn adopt(
        self: &Arc<Self>,
        id: &str,
        r: crate::pool::Ready,
        runtime: RuntimeInfo,
        dir: &Path,
    ) -> EngineResult<(RuntimeInfo, Layers, AgentClient)> {
        let (from, to) = (r.dir.clone(), dir.to_path_buf());
        let rt = r.runtime.clone();
        let launcher = self.launcher.clone();
        let moved = tokio::task::spawn_blocking(move || {
            let moved = to.parent().map_or(Ok(()), make_private_dir).and_then(|()| {
                std::fs::rename(&from, &to)
                    .map_err(|e| format!("move {} to {}: {e}", from.display(), to.display()))
            });
            match &moved {
                // What the pool kept for a crashed daemon's successor; the registry has it now.
                Ok(()) => {
                    let _ = std::fs::remove_file(to.join("runtime.json"));
                }
                Err(_) => crate::pool::discard(&*launcher, &from, &rt),
            }
            moved
        })
        .await
        .map_err(|e| EngineError::internal(format!("pool task: {e}")))?;
        if let Err(e) = moved {
            self.counters
                .create_failures
                .fetch_add(1, Ordering::Relaxed);
            let id2 = id.to_string();
            let _ = db(self, move |s| s.delete_sandbox(&id2)).await;
            return Err(EngineError::internal(format!(
                "cannot take a sandbox from the pool: {e}"
            )));
        }
        Ok((runtime, r.layers, r.agent))
    }

    /// Starts sandbox `id` (no pool): spawns it and connects to its agent.
    async fn start_cold(
        self: &Arc<Self>,
        id: &str,
        policy_json: &Value,
        socket: &Path,
        dir: &Path,
        ca_pem: Option<String>,
    ) -> EngineResult<(RuntimeInfo, Layers, AgentClient)> {
        let id = id.to_string();
        let spawned = {
            let app = self.clone();
            let dir = dir.to_path_buf();
            let socket = socket.to_path_buf();
            let policy_json = policy_json.clone();
            tokio::task::spawn_blocking(move || -> Result<_, String> {
                make_private_dir(&dir)?;
                app.launcher.spawn(&policy_json, &socket, ca_pem.as_deref())
            })
            .await
            .map_err(|e| EngineError::internal(format!("spawn task: {e}")))?
        };
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                self.counters
                    .create_failures
                    .fetch_add(1, Ordering::Relaxed);
                let id2 = id.clone();
                let _ = db(self, move |s| s.delete_sandbox(&id2)).await;
                let _ = std::fs::remove_dir_all(dir);
                return Err(EngineError::new(
                    ErrorKind::Unprocessable,
                    "sandbox_failed",
                    format!("cannot start the sandbox: {e}"),
                ));
            }
        };
        let runtime = spawned.runtime;
        match AgentClient::connect(socket).await {
            Ok(a) => Ok((runtime, spawned.layers, a)),
            Err(e) => {
                self.launcher.destroy(&runtime);
                let id2 = id.clone();
                let _ = db(self, move |s| s.delete_sandbox(&id2)).await;
                let _ = std::fs::remove_dir_all(dir);
                Err(EngineError::internal(format!(
                    "the sandbox started but its agent did not answer: {e}"
                )))
            }
        }
    }

    /// Destroys a sandbox: kills its init (the kernel kills everything else in it), removes
    /// its cgroup and socket directory, and drops it from the registry.
    pub async fn destroy(
        self: &Arc<Self>,
        sbx: &Arc<Sandbox>,
        key: Option<&KeyId>,
        reason: &str,
    ) -> EngineResult<()> {
        let _guard = sbx.lifecycle.lock().await;
        if self.sandbox(&sbx.id).is_none() {
            return Ok(());
        }
        // A daemon that dies from here on finds the record with a dead init at its next
        // start and cleans up then.
        sbx.set_state(SandboxState::Stopping);
        if let Ok(mut e) = sbx.egress.lock() {
            e.take();
        }
        let runtime = sbx.runtime.clone();
        let dir = self.sandbox_dir(&sbx.id);
        let egress_file = self.egress_file(&sbx.id);
        let cleaner = self.cleaner.clone();
        let launcher = self.launcher.clone();
        tokio::task::spawn_blocking(move || {
            // Synchronously: init is dead (and with it, by the kernel, everything in its pid
            // namespace) and its socket gone before the call is answered.
            launcher.kill(&runtime);
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(&egress_file);
            // Off the request path: the cgroup, which the kernel releases only once every
            // task has exited (a stale one is also swept by the next sandbox's start).
            cleaner.remove(runtime);
        })
        .await
        .map_err(|e| EngineError::internal(format!("destroy task: {e}")))?;
        {
            let id = sbx.id.clone();
            db(self, move |s| s.delete_sandbox(&id)).await?;
        }
        if let Ok(mut map) = self.sandboxes.write() {
            map.remove(&sbx.id);
        }
        sbx.set_state(SandboxState::Stopped);
        let kind = if reason == "expired" {
            self.counters.expired.fetch_add(1, Ordering::Relaxed);
            EventKind::SandboxExpired
        } else {
            EventKind::SandboxDestroyed
        };
        self.counters.destroyed.fetch_add(1, Ordering::Relaxed);
        self.audit(
            key,
            Some(&sbx.id),
            kind,
            json!({"reason": reason, "state": "stopped"}),
        )
        .await?;
        Ok(())
    }

    /// Freezes (`pause`) or thaws a sandbox's whole cgroup.
    pub async fn set_paused(
        self: &Arc<Self>,
        sbx: &Arc<Sandbox>,
        key: &KeyId,
        pause: bool,
    ) -> EngineResult<()> {
        let _guard = sbx.lifecycle.lock().await;
        let (from, to) = if pause {
            (SandboxState::Running, SandboxState::Paused)
        } else {
            (SandboxState::Paused, SandboxState::Running)
        };
        let now = sbx.state();
        if now == to {
            return Ok(());
        }
        if now != from {
            return Err(EngineError::conflict(
                "sandbox_not_running",
                format!("sandbox {} is {}", sbx.id, now.as_str()),
            ));
        }
        if sbx.runtime.cgroup_paths.is_empty() {
            return Err(EngineError::conflict(
                "no_cgroup",
                "this sandbox runs without a cgroup, so it cannot be paused",
            ));
        }
        let sbx2 = sbx.clone();
        tokio::task::spawn_blocking(move || sbx2.launcher.set_frozen(&sbx2.runtime, pause))
            .await
            .map_err(|e| EngineError::internal(format!("freezer task: {e}")))?
            .map_err(EngineError::internal)?;
        sbx.set_state(to);
        if !pause {
            // An extension made while it was frozen reaches the agent now.
            let at = sbx.expires_at.load(Ordering::Relaxed);
            if let Err(e) = sbx.agent.set_deadline(Some(at)).await {
                eprintln!(
                    "moat: sandbox {}: its agent did not take its deadline: {e}",
                    sbx.id
                );
            }
        }
        let id = sbx.id.clone();
        db(self, move |s| s.set_state(&id, &[from], to)).await?;
        self.audit(
            Some(key),
            Some(&sbx.id),
            EventKind::SandboxState,
            json!({"state": to.as_str()}),
        )
        .await?;
        Ok(())
    }

    /// Moves a sandbox's expiry to `now + timeout_s`, within the server's maximum lifetime.
    pub async fn set_timeout(
        self: &Arc<Self>,
        sbx: &Arc<Sandbox>,
        key: &KeyId,
        timeout_s: u64,
    ) -> EngineResult<u64> {
        if timeout_s == 0 {
            return Err(EngineError::bad_request("timeout_s must be at least 1"));
        }
        let id = sbx.id.clone();
        let want = now_ms().saturating_add(timeout_s.saturating_mul(1000));
        let max = Duration::from_secs(self.cfg.max_ttl_s);
        let got = db(self, move |s| s.extend_expiry(&id, want, max))
            .await?
            .ok_or_else(|| EngineError::no_sandbox(&sbx.id))?;
        sbx.expires_at.store(got, Ordering::Relaxed);
        // A paused sandbox's agent is frozen: it takes the new deadline when it is resumed.
        if sbx.state() == SandboxState::Running {
            if let Err(e) = sbx.agent.set_deadline(Some(got)).await {
                eprintln!(
                    "moat: sandbox {}: its agent did not take the new deadline: {e}",
                    sbx.id
                );
            }
        }
        self.audit(
            Some(key),
            Some(&sbx.id),
            EventKind::SandboxState,
            json!({"expires_at": got}),
        )
        .await?;
        Ok(got)
    }

    /// cpu, memory and pids of the whole sandbox, from its cgroup.
    pub fn metrics(&self, sbx: &Sandbox) -> Value {
        match self.launcher.usage(&sbx.runtime) {
            Some(s) => json!({"cpu_ms": s.cpu_usec / 1000, "memory_bytes": s.memory_bytes,
                              "pids": s.pids}),
            None => json!({"cpu_ms": null, "memory_bytes": null, "pids": null}),
        }
    }

    /// Destroys every sandbox whose expiry has passed.
    pub async fn reap_expired(self: &Arc<Self>) {
        let now = now_ms();
        let Ok(ids) = db(self, move |s| s.expired(now)).await else {
            return;
        };
        for id in ids {
            if let Some(sbx) = self.sandbox(&id) {
                let _ = self.destroy(&sbx, None, "expired").await;
            }
        }
    }

    /// On start: re-attach to the sandboxes that outlived the previous daemon; destroy those
    /// that expired meanwhile and forget those that died.
    pub async fn reattach(self: &Arc<Self>) -> Result<usize, String> {
        let records = db(self, |s| s.all_sandboxes(&SandboxFilter::default()))
            .await
            .map_err(|e| e.to_string())?;
        let now = now_ms();
        let mut attached = 0;
        for rec in records {
            let alive = rec.runtime.as_ref().is_some_and(|r| self.launcher.alive(r));
            let live_state = matches!(rec.state, SandboxState::Running | SandboxState::Paused);
            let agent = match (&rec.runtime, alive && live_state) {
                (Some(rt), true) => {
                    // A paused sandbox's agent is frozen: thaw it to reconnect, then freeze
                    // it again.
                    let paused = rec.state == SandboxState::Paused;
                    if paused {
                        let (l, rt) = (self.launcher.clone(), rt.clone());
                        let _ = tokio::task::spawn_blocking(move || l.set_frozen(&rt, false)).await;
                    }
                    let agent = AgentClient::connect(&rt.agent_socket).await.ok();
                    if paused {
                        let (l, rt) = (self.launcher.clone(), rt.clone());
                        let _ = tokio::task::spawn_blocking(move || l.set_frozen(&rt, true)).await;
                    }
                    agent
                }
                _ => None,
            };
            let policy: Option<Policy> = serde_json::from_str(&rec.policy_json).ok();
            match (agent, policy) {
                (Some(agent), Some(policy)) if rec.expires_at > now => {
                    // The record is the truth: a daemon that died between extending it and
                    // telling the agent is made good here (a paused agent learns it when it
                    // is resumed).
                    if rec.state == SandboxState::Running {
                        if let Err(e) = agent.set_deadline(Some(rec.expires_at)).await {
                            eprintln!(
                                "moat: sandbox {}: its agent did not take its deadline: {e}",
                                rec.id
                            );
                        }
                    }
                    let Some(runtime) = rec.runtime.clone() else {
                        continue;
                    };
                    let sbx = Arc::new(Sandbox {
                        id: rec.id.clone(),
                        owner: rec.owner_key.clone(),
                        tier: rec.tier.clone(),
                        created_at: rec.created_at,
                        expires_at: AtomicU64::new(rec.expires_at),
                        metadata: rec.metadata.clone(),
                        state: Mutex::new(rec.state),
                        policy,
                        runtime,
                        // As reported at the start (a record from before they were kept
                        // has only the tier).
                        layers: rt_layers(&rec.runtime).unwrap_or_else(|| Layers {
                            tier: rec.tier.clone(),
                            ..Layers::default()
                        }),
                        agent,
                        lifecycle: tokio::sync::Mutex::new(()),
                        egress: Mutex::new(None),
                        launcher: self.launcher.clone(),
                    });
                    self.reattach_egress(&sbx);
                    if let Ok(mut map) = self.sandboxes.write() {
                        map.insert(rec.id.clone(), sbx);
                    }
                    attached += 1;
                }
                _ => {
                    let reason = if rec.expires_at <= now {
                        "expired"
                    } else {
                        "lost"
                    };
                    if let Some(rt) = &rec.runtime {
                        let rt = rt.clone();
                        let l = self.launcher.clone();
                        let _ = tokio::task::spawn_blocking(move || l.destroy(&rt)).await;
                    }
                    let _ = std::fs::remove_dir_all(self.sandbox_dir(&rec.id));
                    let _ = std::fs::remove_file(self.egress_file(&rec.id));
                    let id = rec.id.clone();
                    let _ = db(self, move |s| s.delete_sandbox(&id)).await;
                    let kind = if reason == "expired" {
                        EventKind::SandboxExpired
                    } else {
                        EventKind::SandboxDestroyed
                    };
                    let _ = self
                        .audit(
                            None,
                            Some(&rec.id),
                            kind,
                            json!({"reason": reason, "state": "stopped"}),
                        )
                        .await;
                }
            }
        }
        Ok(attached)
    }
}

/// The layers a stored runtime kept from its sandbox's start.
fn rt_layers(rt: &Option<RuntimeInfo>) -> Option<Layers> {
    serde_json::from_value(rt.as_ref()?.layers.clone()?).ok()
}

pub(crate) fn make_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))
}

/// Where the egress proxy's connection events go: the audit log, the metrics, and (past
/// the policy's `max_denials`) the sandbox's end.
struct AuditSink {
    app: std::sync::Weak<Engine>,
    tx: tokio::sync::mpsc::UnboundedSender<(String, Value)>,
}

impl moat_egress::EgressSink for AuditSink {
    fn event(&self, e: moat_egress::ConnEvent) {
        let Some(app) = self.app.upgrade() else {
            return;
        };
        let denied = e.decision == "deny";
        let counter = if denied {
            &app.counters.egress_denied
        } else {
            &app.counters.egress_allowed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let data = serde_json::to_value(&e).unwrap_or(Value::Null);
        let _ = self.tx.send((e.sandbox, data));
    }

    fn denial_limit(&self, sandbox: &str) {
        let Some(app) = self.app.upgrade() else {
            return;
        };
        let Some(sbx) = app.sandbox(sandbox) else {
            return;
        };
        app.counters.egress_kills.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _ = app.destroy(&sbx, None, "egress_denials").await;
        });
    }
}
