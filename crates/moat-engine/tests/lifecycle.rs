//! The engine's lifecycle logic through its launcher seam, without root: a [`FakeLauncher`]
//! "starts" a sandbox by serving the real agent protocol (moat-agent's connection state
//! machine, over the real unix socket) from a thread, so the engine's own code runs exactly
//! as with a real sandbox: create (cold and pooled), the agent's deadline, extension,
//! pause and resume, destroy, expiry, re-attach after a crash, scopes and the audit log.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_agent::conn::{AgentConn, Event as ConnEvent};
use moat_api::{Layers, Status};
use moat_engine::launcher::{Launcher, Started, Usage};
use moat_engine::lifecycle::{now_ms, Caller, Engine};
use moat_engine::store::{EventFilter, EventKind, Principal, RuntimeInfo, SandboxState, Scope};
use moat_engine::{EngineConfig, ErrorKind};
use moat_proto::{Channel, Request, Response};
use serde_json::{json, Value};

/// One fake sandbox: its agent's thread serves the protocol until it is killed.
struct Fake {
    alive: AtomicBool,
    frozen: AtomicBool,
    /// The lifetime the engine gave the agent (`SetDeadline`).
    deadline: Mutex<Option<Option<u64>>>,
    conns: Mutex<Vec<UnixStream>>,
    socket: PathBuf,
}

#[derive(Default)]
struct FakeLauncher {
    next: AtomicU32,
    sandboxes: Mutex<HashMap<u32, Arc<Fake>>>,
    /// Make the next spawn fail with this message.
    fail_next: Mutex<Option<String>>,
}

impl FakeLauncher {
    fn get(&self, rt: &RuntimeInfo) -> Option<Arc<Fake>> {
        self.sandboxes.lock().unwrap().get(&rt.init_pid).cloned()
    }

    fn live(&self) -> usize {
        self.sandboxes
            .lock()
            .unwrap()
            .values()
            .filter(|f| f.alive.load(Ordering::SeqCst))
            .count()
    }
}

impl Launcher for FakeLauncher {
    fn spawn(&self, _policy: &Value, socket: &Path, _ca: Option<&str>) -> Result<Started, String> {
        if let Some(why) = self.fail_next.lock().unwrap().take() {
            return Err(why);
        }
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(|e| e.to_string())?;
        let n = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let fake = Arc::new(Fake {
            alive: AtomicBool::new(true),
            frozen: AtomicBool::new(false),
            deadline: Mutex::new(None),
            conns: Mutex::new(Vec::new()),
            socket: socket.to_path_buf(),
        });
        self.sandboxes.lock().unwrap().insert(n, fake.clone());
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { break };
                if !fake.alive.load(Ordering::SeqCst) {
                    break;
                }
                fake.conns.lock().unwrap().push(sock.try_clone().unwrap());
                let fake = fake.clone();
                std::thread::spawn(move || serve(&fake, sock));
            }
        });
        let layers = Layers {
            tier: "native".into(),
            ..Layers::default()
        };
        Ok(Started {
            runtime: RuntimeInfo {
                init_pid: n,
                init_start_time: u64::from(n),
                agent_socket: socket.to_path_buf(),
                cgroup_paths: vec![PathBuf::from(format!("/fake/cgroup/{n}"))],
                tier_state: None,
                layers: serde_json::to_value(&layers).ok(),
            },
            layers,
        })
    }

    fn alive(&self, rt: &RuntimeInfo) -> bool {
        self.get(rt).is_some_and(|f| f.alive.load(Ordering::SeqCst))
    }

    fn kill(&self, rt: &RuntimeInfo) {
        if let Some(f) = self.get(rt) {
            f.alive.store(false, Ordering::SeqCst);
            for c in f.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            // Wake the accept loop so that it sees the end.
            let _ = UnixStream::connect(&f.socket);
        }
    }

    fn remove_cgroup(&self, _rt: &RuntimeInfo) {}

    fn set_frozen(&self, rt: &RuntimeInfo, frozen: bool) -> Result<(), String> {
        let f = self.get(rt).ok_or("no such sandbox")?;
        f.frozen.store(frozen, Ordering::SeqCst);
        Ok(())
    }

    fn usage(&self, _rt: &RuntimeInfo) -> Option<Usage> {
        Some(Usage::default())
    }

    fn oom_kills(&self, _rt: &RuntimeInfo) -> u64 {
        0
    }
}

/// The agent's side of one connection, through moat-agent's own state machine.
fn serve(fake: &Fake, mut sock: UnixStream) {
    let mut conn = AgentConn::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if !conn.output().is_empty() {
            if sock.write_all(conn.output()).is_err() {
                return;
            }
            let n = conn.output().len();
            conn.consume(n);
        }
        let n = match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let Ok(events) = conn.feed(&buf[..n]) else {
            return;
        };
        for ev in events {
            let ConnEvent::Request { stream, request } = ev else {
                continue;
            };
            let answer = match request {
                Request::SetDeadline { expires_at_ms } => {
                    *fake.deadline.lock().unwrap() = Some(expires_at_ms);
                    Response::Ok {}
                }
                Request::Exec { .. } => {
                    let _ = conn.respond(stream, &Response::Started { pid: 7 });
                    let _ = conn.data(stream, Channel::Stdout, b"fake\n");
                    let _ = conn.eof(stream, Channel::Stdout);
                    let _ = conn.eof(stream, Channel::Stderr);
                    Response::Exit {
                        exit_code: Some(0),
                        signal: None,
                        status: Status::Ok,
                    }
                }
                Request::Metrics {} => Response::Metrics {
                    cpu_ms: 0,
                    memory_bytes: 0,
                    pids: 1,
                },
                other => Response::error(
                    moat_proto::ErrorCode::Internal,
                    format!("the fake agent does not do {}", other.type_name()),
                ),
            };
            let _ = conn.respond(stream, &answer);
        }
    }
}

struct Harness {
    dir: PathBuf,
    launcher: Arc<FakeLauncher>,
}

impl Harness {
    fn new(name: &str) -> Harness {
        let dir = std::env::temp_dir().join(format!(
            "moat-engine-{name}-{}-{}",
            std::process::id(),
            now_ms()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Harness {
            dir,
            launcher: Arc::new(FakeLauncher::default()),
        }
    }

    fn config(&self, pools: Vec<(moat_policy::Tier, usize)>) -> EngineConfig {
        EngineConfig {
            state_dir: self.dir.clone(),
            default_ttl_s: 300,
            max_ttl_s: 3600,
            egress: Default::default(),
            default_tier: moat_policy::Tier::Native,
            pools,
        }
    }

    /// A fresh engine on this harness's state directory and launcher.
    async fn engine(
        &self,
        pools: Vec<(moat_policy::Tier, usize)>,
    ) -> (Arc<Engine>, moat_engine::Running) {
        let prepared =
            moat_engine::prepare_with(self.config(pools), self.launcher.clone()).unwrap();
        prepared.start().await.unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn caller(engine: &Engine, name: &str) -> Caller {
    let (key, _) = engine
        .db
        .lock()
        .unwrap()
        .create_key(name, false, now_ms())
        .unwrap();
    Caller {
        principal: Principal::Key(key),
    }
}

async fn create(
    engine: &Arc<Engine>,
    who: &Caller,
    timeout_s: Option<u64>,
) -> Arc<moat_engine::lifecycle::Sandbox> {
    engine
        .create(
            who,
            json!({}),
            BTreeMap::new(),
            timeout_s,
            None,
            BTreeMap::new(),
        )
        .await
        .unwrap()
}

fn events(engine: &Engine, sandbox: &str) -> Vec<(EventKind, Value)> {
    engine
        .db
        .lock()
        .unwrap()
        .events(&EventFilter {
            sandbox_id: Some(sandbox.to_string()),
            ..EventFilter::default()
        })
        .unwrap()
        .into_iter()
        .map(|(_, e)| (e.kind, e.data))
        .collect()
}

/// Waits for `cond`, at most `limit`.
async fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_state_machine_and_audit_before_answer() {
    let h = Harness::new("states");
    let (engine, running) = h.engine(vec![]).await;
    let me = caller(&engine, "me");
    let sbx = create(&engine, &me, Some(60)).await;
    assert_eq!(sbx.state(), SandboxState::Running);
    // Audited before the call returned, and the agent has its deadline.
    let ev = events(&engine, &sbx.id);
    assert_eq!(ev[0].0, EventKind::SandboxCreated, "{ev:?}");
    assert_eq!(ev[0].1["pooled"], false);
    let expires_at = sbx.expires_at.load(Ordering::SeqCst);
    let fake = h.launcher.get(&sbx.runtime).unwrap();
    assert_eq!(*fake.deadline.lock().unwrap(), Some(Some(expires_at)));

    engine.set_paused(&sbx, me.key_id(), true).await.unwrap();
    assert_eq!(sbx.state(), SandboxState::Paused);
    assert!(fake.frozen.load(Ordering::SeqCst));
    let e = sbx.require_running().unwrap_err();
    assert_eq!(e.code, "sandbox_paused");
    // Pausing twice is no error; resuming a running one is no error either.
    engine.set_paused(&sbx, me.key_id(), true).await.unwrap();
    engine.set_paused(&sbx, me.key_id(), false).await.unwrap();
    assert_eq!(sbx.state(), SandboxState::Running);
    assert!(!fake.frozen.load(Ordering::SeqCst));
    engine.set_paused(&sbx, me.key_id(), false).await.unwrap();

    engine
        .destroy(&sbx, Some(me.key_id()), "deleted")
        .await
        .unwrap();
    assert_eq!(sbx.state(), SandboxState::Stopped);
    assert!(engine.sandbox(&sbx.id).is_none());
    assert!(
        !fake.alive.load(Ordering::SeqCst),
        "destroy left the sandbox running"
    );
    assert!(!h.dir.join("sandboxes").join(&sbx.id).exists());
    let kinds: Vec<EventKind> = events(&engine, &sbx.id).into_iter().map(|e| e.0).collect();
    assert_eq!(
        kinds,
        [
            EventKind::SandboxCreated,
            EventKind::SandboxState,
            EventKind::SandboxState,
            EventKind::SandboxDestroyed
        ]
    );
    // A destroyed sandbox cannot be paused.
    let e = engine
        .set_paused(&sbx, me.key_id(), true)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict);
    engine.stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_nothing() {
    let h = Harness::new("fail");
    let (engine, running) = h.engine(vec![]).await;
    let me = caller(&engine, "me");
    *h.launcher.fail_next.lock().unwrap() = Some("no user namespaces here".into());
    let e = engine
        .create(&me, json!({}), BTreeMap::new(), None, None, BTreeMap::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unprocessable);
    assert_eq!(e.code, "sandbox_failed");
    assert!(e.message.contains("no user namespaces here"), "{e}");
    let listed = engine
        .db
        .lock()
        .unwrap()
        .all_sandboxes(&Default::default())
        .unwrap();
    assert!(listed.is_empty(), "a record was left: {listed:?}");
    let dirs = std::fs::read_dir(h.dir.join("sandboxes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(dirs, 0);
    // Bad input is refused before anything starts.
    let e = engine
        .create(
            &me,
            json!({"limits": {"memory": "lots"}}),
            BTreeMap::new(),
            None,
            None,
            BTreeMap::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
    let e = engine
        .create(
            &me,
            json!({}),
            BTreeMap::new(),
            Some(0),
            None,
            BTreeMap::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
    assert_eq!(h.launcher.live(), 0);
    engine.stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_extension_and_expiry() {
    let h = Harness::new("ttl");
    let (engine, running) = h.engine(vec![]).await;
    let me = caller(&engine, "me");
    let short = create(&engine, &me, Some(1)).await;
    let long = create(&engine, &me, Some(1)).await;
    let got = engine.set_timeout(&long, me.key_id(), 30).await.unwrap();
    assert!(got >= now_ms() + 29_000);
    // The extension reached the agent, which keeps it with no daemon.
    let fake = h.launcher.get(&long.runtime).unwrap();
    assert_eq!(*fake.deadline.lock().unwrap(), Some(Some(got)));
    // Past the maximum lifetime it is cut to the maximum.
    let capped = engine
        .set_timeout(&long, me.key_id(), 1_000_000)
        .await
        .unwrap();
    assert!(capped <= now_ms() + 3_600_000 && capped > got, "{capped}");
    let e = engine.set_timeout(&long, me.key_id(), 0).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadRequest);
    // The reaper (every 500 ms) destroys the short one and records why.
    assert!(
        until(Duration::from_secs(5), || engine
            .sandbox(&short.id)
            .is_none())
        .await
    );
    assert!(!h.launcher.alive(&short.runtime));
    let ev = events(&engine, &short.id);
    let last = ev.last().unwrap();
    assert_eq!(last.0, EventKind::SandboxExpired, "{ev:?}");
    assert_eq!(last.1["reason"], "expired");
    assert!(engine.sandbox(&long.id).is_some());
    engine.stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_after_a_crash() {
    let h = Harness::new("reattach");
    let (engine, running) = h.engine(vec![]).await;
    let me = caller(&engine, "me");
    let kept = create(&engine, &me, Some(60)).await;
    let lost = create(&engine, &me, Some(60)).await;
    let expiring = create(&engine, &me, Some(1)).await;
    let paused = create(&engine, &me, Some(60)).await;
    engine.set_paused(&paused, me.key_id(), true).await.unwrap();
    // The daemon "dies": its tasks stop, nothing is torn down; one sandbox dies meanwhile and
    // another's lifetime passes.
    running_abort(running);
    drop(engine);
    h.launcher.kill(&lost.runtime);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The agent of a sandbox whose record was extended while the agent missed it learns the
    // record's deadline at the re-attach.
    *h.launcher
        .get(&kept.runtime)
        .unwrap()
        .deadline
        .lock()
        .unwrap() = None;

    let (engine, running) = h.engine(vec![]).await;
    assert_eq!(running.attached, 2, "kept and paused re-attach");
    let back = engine.sandbox(&kept.id).unwrap();
    assert_eq!(back.state(), SandboxState::Running);
    let fake = h.launcher.get(&kept.runtime).unwrap();
    assert_eq!(
        *fake.deadline.lock().unwrap(),
        Some(Some(kept.expires_at.load(Ordering::SeqCst)))
    );
    let p = engine.sandbox(&paused.id).unwrap();
    assert_eq!(p.state(), SandboxState::Paused);
    assert!(
        h.launcher
            .get(&paused.runtime)
            .unwrap()
            .frozen
            .load(Ordering::SeqCst),
        "frozen again"
    );
    for (sbx, kind, reason) in [
        (&lost, EventKind::SandboxDestroyed, "lost"),
        (&expiring, EventKind::SandboxExpired, "expired"),
    ] {
        assert!(engine.sandbox(&sbx.id).is_none());
        assert!(!h.launcher.alive(&sbx.runtime), "{reason}: left running");
        let ev = events(&engine, &sbx.id);
        let last = ev.last().unwrap();
        assert_eq!(
            (last.0, last.1["reason"].as_str()),
            (kind, Some(reason)),
            "{ev:?}"
        );
    }
    engine.stop(running).await;
}

/// What a crash leaves: the engine's tasks end with nothing torn down.
fn running_abort(running: moat_engine::Running) {
    running.abandon();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_take_and_refill() {
    let h = Harness::new("pool");
    let (engine, running) = h.engine(vec![(moat_policy::Tier::Native, 2)]).await;
    assert!(
        until(Duration::from_secs(5), || engine
            .pools
            .ready(moat_policy::Tier::Native)
            == 2)
        .await
    );
    let me = caller(&engine, "me");
    let a = create(&engine, &me, Some(60)).await;
    let ev = events(&engine, &a.id);
    assert_eq!(ev[0].1["pooled"], true, "{ev:?}");
    // Taken from the pool: its deadline is set at the take, its directory is its own.
    let fake = h.launcher.get(&a.runtime).unwrap();
    assert_eq!(
        *fake.deadline.lock().unwrap(),
        Some(Some(a.expires_at.load(Ordering::SeqCst)))
    );
    assert!(h
        .dir
        .join("sandboxes")
        .join(&a.id)
        .join("agent.sock")
        .exists());
    // A different policy misses and starts cold.
    let b = engine
        .create(
            &me,
            json!({"limits": {"pids": 17}}),
            BTreeMap::new(),
            None,
            None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    assert_eq!(events(&engine, &b.id)[0].1["pooled"], false);
    // The pool refills.
    assert!(
        until(Duration::from_secs(5), || engine
            .pools
            .ready(moat_policy::Tier::Native)
            == 2)
        .await
    );
    // A ready sandbox that died is never handed out.
    let before = h.launcher.live();
    for f in h.launcher.sandboxes.lock().unwrap().values() {
        if f.deadline.lock().unwrap().is_none() {
            // A ready one: its agent was never given a deadline.
            f.alive.store(false, Ordering::SeqCst);
        }
    }
    let c = create(&engine, &me, Some(60)).await;
    assert!(h.launcher.alive(&c.runtime));
    assert_eq!(events(&engine, &c.id)[0].1["pooled"], false);
    assert!(before >= 4);
    // Stopping destroys the ready ones only.
    engine.stop(running).await;
    assert!(
        h.launcher.alive(&a.runtime)
            && h.launcher.alive(&b.runtime)
            && h.launcher.alive(&c.runtime)
    );
    assert_eq!(h.launcher.live(), 3, "ready sandboxes left after stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_and_tenancy() {
    let h = Harness::new("scopes");
    let (engine, running) = h.engine(vec![]).await;
    let me = caller(&engine, "me");
    let other = caller(&engine, "other");
    let sbx = create(&engine, &me, Some(60)).await;
    assert!(engine.visible(&me, &sbx.id, Scope::Exec).is_ok());
    // Another tenant's sandbox reads exactly like a missing one.
    let theirs = engine.visible(&other, &sbx.id, Scope::Read).unwrap_err();
    let missing = engine
        .visible(&other, "sbx_0000000000000000", Scope::Read)
        .unwrap_err();
    assert_eq!(theirs.kind, ErrorKind::NotFound);
    assert_eq!(
        theirs.message.replace(&sbx.id, "ID"),
        missing.message.replace("sbx_0000000000000000", "ID")
    );
    // A token: only its sandbox, only its scopes.
    let (tok, secret) = engine
        .db
        .lock()
        .unwrap()
        .create_token(
            me.key_id(),
            &sbx.id,
            &[Scope::Read],
            Duration::from_secs(60),
            now_ms(),
        )
        .unwrap();
    let token = Caller {
        principal: Principal::Token(tok),
    };
    assert!(engine.visible(&token, &sbx.id, Scope::Read).is_ok());
    let e = engine.visible(&token, &sbx.id, Scope::Exec).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Forbidden);
    assert!(e.message.contains("`exec`"), "{e}");
    let second = create(&engine, &me, Some(60)).await;
    assert_eq!(
        engine
            .visible(&token, &second.id, Scope::Read)
            .unwrap_err()
            .kind,
        ErrorKind::NotFound
    );
    // Authentication: the token's secret works, a wrong one is refused and audited.
    let who = engine
        .authenticate(Some(&secret), "GET", "/v1/x")
        .await
        .unwrap();
    assert!(who.is_token());
    let e = engine
        .authenticate(Some("moat_nope"), "GET", "/v1/x")
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized);
    let e = engine.authenticate(None, "GET", "/v1/y").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized);
    let failed = engine
        .db
        .lock()
        .unwrap()
        .events(&EventFilter {
            kinds: vec![EventKind::AuthFailed],
            ..EventFilter::default()
        })
        .unwrap();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(failed[1].1.data["path"], "/v1/y");
    engine.stop(running).await;
}
