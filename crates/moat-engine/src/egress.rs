//! The host side of a sandbox's egress (network mode `allowlist`): the relay pump that keeps
//! a few `Relay` requests waiting on the sandbox's agent and hands each workload connection
//! it gets to the sandbox's proxy ([`moat_egress::SandboxProxy`]), and the preparation of a
//! sandbox's egress: its rules, its secrets' placeholders, its CA.
//!
//! Used by the daemon and by `moat run`, which runs the same pump in its own process.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moat_egress::{EgressSink, Proxy, SandboxEgress, SandboxProxy, Secret};
use moat_policy::{NetworkMode, Policy};
use tokio::task::AbortHandle;

use crate::agent_client;

/// Relay requests kept waiting on the agent at once: that many workload connections are
/// taken at the same moment; more wait in the agent's backlog for the next round trip.
pub const RELAYS_WAITING: usize = 4;

/// How long a pump waits before it asks again when the agent did not answer (the sandbox is
/// paused, restarting, or gone).
const RETRY: Duration = Duration::from_millis(250);

/// What a sandbox's egress needs before it starts.
pub struct Prepared {
    /// The proxy's configuration for this sandbox.
    pub cfg: SandboxEgress,
    /// The sandbox CA's certificate, for the sandbox's trust (only with secrets).
    pub ca_pem: Option<String>,
    /// Environment for the workload: each secret's name with its placeholder.
    pub env: BTreeMap<String, String>,
}

/// A secret's placeholder: what the sandbox sees instead of the value. Random, so that a
/// workload cannot guess another sandbox's, and recognisable in a log.
fn placeholder(name: &str) -> Result<String, String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| format!("random placeholder: {e}"))?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "moat-placeholder-{}-{hex}",
        name.to_ascii_lowercase()
    ))
}

/// Prepares the egress of sandbox `sandbox` with `policy` (validated) and the values of its
/// secrets. Every secret the policy binds needs a value, and every value a binding.
pub fn prepare(
    sandbox: &str,
    policy: &Policy,
    values: &BTreeMap<String, String>,
) -> Result<Option<Prepared>, String> {
    let net = &policy.network;
    if net.mode != NetworkMode::Allowlist {
        if !values.is_empty() {
            return Err(
                "secrets need network mode `allowlist` and a binding in network.secrets".into(),
            );
        }
        return Ok(None);
    }
    for name in values.keys() {
        if !net.secrets.contains_key(name) {
            return Err(format!(
                "secret {name} is not bound to any host: add `{name} = [\"host\"]` to \
                 network.secrets in the policy"
            ));
        }
    }
    let mut secrets = Vec::new();
    let mut env = BTreeMap::new();
    for (name, hosts) in &net.secrets {
        let Some(value) = values.get(name) else {
            return Err(format!(
                "secret {name} is bound in network.secrets but has no value: pass it (moat \
                 run reads it from its own environment; the API takes it in `secrets`)"
            ));
        };
        if value.is_empty() {
            return Err(format!("secret {name} has an empty value"));
        }
        let ph = placeholder(name)?;
        env.insert(name.clone(), ph.clone());
        secrets.push(Secret {
            name: name.clone(),
            placeholder: ph,
            value: value.clone(),
            hosts: hosts.clone(),
        });
    }
    let ca = if secrets.is_empty() {
        None
    } else {
        Some(Arc::new(
            moat_tls::SandboxCa::generate(sandbox).map_err(|e| e.to_string())?,
        ))
    };
    let ca_pem = ca.as_ref().map(|c| c.cert_pem());
    let rules = net.rules().map_err(|e| e.to_string())?;
    Ok(Some(Prepared {
        cfg: SandboxEgress {
            sandbox: sandbox.to_string(),
            rules,
            secrets,
            ca,
            max_connections: net.max_connections,
            max_bytes: net.max_bytes,
            idle_timeout: net.idle_timeout,
            max_denials: net.max_denials,
        },
        ca_pem,
        env,
    }))
}

/// A running relay pump; dropping it stops the pump (connections already relayed run on
/// until either end closes them).
pub struct Pump {
    pub proxy: Arc<SandboxProxy>,
    tasks: Vec<AbortHandle>,
}

impl Drop for Pump {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the relay pump of the agent at `socket` for `cfg`. Must be called inside a tokio
/// runtime.
pub fn start(
    proxy: &Arc<Proxy>,
    socket: PathBuf,
    cfg: SandboxEgress,
    sink: Arc<dyn EgressSink>,
) -> Pump {
    let sp = proxy.sandbox(cfg, sink);
    let socket = Arc::new(socket);
    let tasks = (0..RELAYS_WAITING)
        .map(|_| {
            let sp = sp.clone();
            let socket = socket.clone();
            tokio::spawn(async move {
                loop {
                    match agent_client::relay(&socket).await {
                        Ok((stream, _port)) => {
                            let sp = sp.clone();
                            tokio::spawn(async move { sp.serve(stream).await });
                        }
                        Err(_) => tokio::time::sleep(RETRY).await,
                    }
                }
            })
            .abort_handle()
        })
        .collect();
    Pump { proxy: sp, tasks }
}

/// What a daemon keeps of a sandbox's secrets across a restart (root-only, outside every
/// sandbox): the values, their placeholders (already in the sandbox's environment) and the
/// CA (already in its trust store).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    secrets: Vec<SavedSecret>,
    ca: moat_tls::CaState,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedSecret {
    name: String,
    placeholder: String,
    value: String,
    hosts: Vec<String>,
}

/// Saves `cfg`'s secrets and CA to `path` (mode 0600, its directory 0700), if it has any.
pub fn save(path: &std::path::Path, cfg: &SandboxEgress) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let Some(ca) = &cfg.ca else {
        return Ok(());
    };
    let saved = Saved {
        secrets: cfg
            .secrets
            .iter()
            .map(|s| SavedSecret {
                name: s.name.clone(),
                placeholder: s.placeholder.clone(),
                value: s.value.clone(),
                hosts: s.hosts.clone(),
            })
            .collect(),
        ca: ca.export(),
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let body = serde_json::to_vec(&saved).map_err(|e| e.to_string())?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    f.write_all(&body)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("write {}: {e}", path.display()))
}

/// The egress of a sandbox after a daemon restart: its policy's rules, and the secrets and
/// CA [`save`] kept at `path`. Without that file, the hosts the secrets are bound to are
/// denied (their requests would otherwise leave with placeholders).
pub fn restore(
    sandbox: &str,
    policy: &Policy,
    path: &std::path::Path,
) -> Result<Option<SandboxEgress>, String> {
    if policy.network.mode != NetworkMode::Allowlist {
        return Ok(None);
    }
    let mut p = policy.clone();
    let bound = std::mem::take(&mut p.network.secrets);
    let saved: Option<Saved> = if bound.is_empty() {
        None
    } else {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    };
    if saved.is_none() {
        p.network.deny.extend(bound.into_values().flatten());
    }
    let Some(mut prepared) = prepare(sandbox, &p, &BTreeMap::new())? else {
        return Ok(None);
    };
    if let Some(saved) = saved {
        let ca = moat_tls::SandboxCa::restore(&saved.ca).map_err(|e| e.to_string())?;
        prepared.cfg.ca = Some(Arc::new(ca));
        prepared.cfg.secrets = saved
            .secrets
            .into_iter()
            .map(|s| Secret {
                name: s.name,
                placeholder: s.placeholder,
                value: s.value,
                hosts: s.hosts,
            })
            .collect();
    }
    Ok(Some(prepared.cfg))
}
