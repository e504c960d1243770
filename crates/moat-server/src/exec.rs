//! Commands: `exec` (wait for the result, or stream it as NDJSON), the interactive WebSocket,
//! and background processes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use moat_api::outcome::{classify, Ending, Scope as OutcomeScope};
use moat_api::{ExecResult, Status, Truncated};
use moat_engine::store::{EventKind, Scope};
use moat_policy::Policy;
use moat_proto::PtySize;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::b64;
use crate::error::{ApiError, ApiResult};
use crate::http::Auth;
use crate::http::{parse_json, small_body};
use moat_engine::agent_client::{AgentClient, ExecEvent, ExecSpec};
use moat_engine::lifecycle::{Caller, Engine, Sandbox};

/// What a command to run is, as the API takes it.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub shell: Option<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub stdin: Option<Value>,
    #[serde(default)]
    pub stdin_b64: Option<String>,
    #[serde(default)]
    pub timeout_s: Option<f64>,
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// Only in the WebSocket's `start` message.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

impl CommandBody {
    fn argv(&self) -> ApiResult<Vec<String>> {
        match (&self.cmd, &self.shell) {
            (Some(cmd), None) if !cmd.is_empty() => Ok(cmd.clone()),
            (None, Some(sh)) if !sh.is_empty() => {
                Ok(vec!["/bin/sh".into(), "-c".into(), sh.clone()])
            }
            (Some(_), Some(_)) => Err(ApiError::bad_request(
                "give either `cmd` (an argv array) or `shell` (a command line), not both",
            )),
            _ => Err(ApiError::bad_request(
                "give `cmd` (a non-empty argv array) or `shell` (a command line)",
            )),
        }
    }

    fn timeout_ms(&self, policy: &Policy) -> ApiResult<u64> {
        match self.timeout_s {
            None => Ok((policy.limits.timeout.as_millis() as u64).max(1)),
            Some(t) if t.is_finite() && t > 0.0 && t <= 86_400.0 => {
                Ok(((t * 1000.0) as u64).max(1))
            }
            Some(_) => Err(ApiError::bad_request(
                "timeout_s must be a number of seconds above 0 and at most 86400",
            )),
        }
    }

    fn stdin_bytes(&self) -> ApiResult<Option<Vec<u8>>> {
        match (&self.stdin, &self.stdin_b64) {
            (Some(_), Some(_)) => Err(ApiError::bad_request(
                "give either `stdin` (text) or `stdin_b64`, not both",
            )),
            (Some(Value::String(s)), None) => Ok(Some(s.clone().into_bytes())),
            (Some(_), None) => Err(ApiError::bad_request(
                "`stdin` is the command's input as a string (use `stdin_b64` for bytes)",
            )),
            (None, Some(b)) => b64::decode(b)
                .map(Some)
                .ok_or_else(|| ApiError::bad_request("`stdin_b64` is not valid base64")),
            (None, None) => Ok(None),
        }
    }

    /// The request to the agent (the agent adds the sandbox's base environment; nothing of the
    /// host is inherited).
    pub fn spec(
        &self,
        sbx: &Sandbox,
        stdin: bool,
        pty: Option<PtySize>,
        background: bool,
    ) -> ApiResult<ExecSpec> {
        let argv = self.argv()?;
        let timeout_ms = if background {
            None
        } else {
            Some(self.timeout_ms(&sbx.policy)?)
        };
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') {
                return Err(ApiError::bad_request(format!(
                    "cwd must be an absolute path inside the sandbox, not `{cwd}`"
                )));
            }
        }
        Ok(ExecSpec {
            argv,
            // The request's variables only: the agent starts every process from the sandbox's
            // base environment (moat_proto::boot::base_env) and puts these on top.
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            stdin,
            pty,
            timeout_ms,
            background,
        })
    }
}

fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-ndjson"))
}

/// One finished command, for its result and its audit event.
struct Finished {
    exit_code: Option<i32>,
    signal: Option<i32>,
    status: Status,
    message: Option<String>,
    truncated: Truncated,
    wall_ms: u64,
    /// What was seen of the command's end, for the one classifier.
    ending: Ending,
}

impl Finished {
    fn new(message: Option<String>) -> Finished {
        Finished {
            exit_code: None,
            signal: None,
            status: Status::Error,
            message,
            truncated: Truncated::default(),
            wall_ms: 0,
            ending: Ending::default(),
        }
    }

    /// The agent's `Exit`: status, exit code, signal and message from the one classifier.
    fn exited(
        &mut self,
        exit_code: Option<i32>,
        signal: Option<i32>,
        status: Status,
        ending: Ending,
    ) {
        self.ending = Ending {
            exit_code,
            signal,
            cancelled: status == Status::Killed,
            ..ending
        };
        if status == Status::Timeout && self.ending.timed_out_ms.is_none() {
            self.ending.timed_out_ms = Some(0);
        }
        self.settle();
    }

    fn settle(&mut self) {
        let o = classify(&self.ending, OutcomeScope::Command);
        self.exit_code = o.exit_code;
        self.signal = o.signal;
        self.status = o.status;
        self.message = o.message;
    }
}

/// Drives one exec to its end: feeds stdin, collects or forwards output under the policy's
/// cap (Cancel when a stream goes over), and returns how it ended.
async fn drive(
    mut exec: moat_engine::agent_client::Exec,
    stdin: Option<Vec<u8>>,
    cap: u64,
    timeout_ms: Option<u64>,
    started: Instant,
    mut sink: impl FnMut(Sink<'_>) -> bool,
) -> Finished {
    let input = exec.stdin();
    if let Some(data) = stdin {
        let input = input.clone();
        tokio::spawn(async move {
            if !data.is_empty() {
                let _ = input.write(Bytes::from(data)).await;
            }
            let _ = input.close().await;
        });
    }
    let mut sent = [0u64; 2];
    let mut truncated = Truncated::default();
    let mut over = false;
    let mut gone = false;
    let mut fin = Finished::new(Some("the sandbox's agent closed the stream".into()));
    while let Some(ev) = exec.next().await {
        let is_stderr = matches!(ev, ExecEvent::Stderr(_));
        match ev {
            ExecEvent::Started { pid } => {
                if !sink(Sink::Started(pid)) {
                    gone = true;
                }
            }
            ExecEvent::Stdout(b) | ExecEvent::Stderr(b) if over || gone => drop(b),
            ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => {
                let (n, flag) = if is_stderr {
                    (&mut sent[1], &mut truncated.stderr)
                } else {
                    (&mut sent[0], &mut truncated.stdout)
                };
                let keep = take(n, cap, &b, flag);
                let cut = *flag;
                let part = &b[..keep];
                if !sink(if is_stderr {
                    Sink::Stderr(part)
                } else {
                    Sink::Stdout(part)
                }) {
                    gone = true;
                    let _ = input.cancel();
                }
                if cut {
                    over = true;
                    let _ = input.cancel();
                }
            }
            ExecEvent::Exit {
                exit_code,
                signal,
                status,
            } => {
                let timed_out_ms = (status == Status::Timeout).then(|| timeout_ms.unwrap_or(0));
                fin.exited(
                    exit_code,
                    signal,
                    status,
                    Ending {
                        timed_out_ms,
                        output_over: over.then_some(cap),
                        ..Ending::default()
                    },
                );
                break;
            }
            ExecEvent::Failed(e) => {
                let api = ApiError::from(e);
                fin.status = Status::Error;
                fin.exit_code = exit_code_of_failure(api.code);
                fin.message = Some(api.message);
                break;
            }
        }
    }
    fin.truncated = truncated;
    fin.wall_ms = started.elapsed().as_millis() as u64;
    fin
}

/// A command killed by SIGKILL, or whose agent went away (the gvisor tier: the host's OOM
/// killer takes the sentry), while the sandbox's OOM count rose, ran out of memory.
fn settle_oom(sbx: &Sandbox, oom_before: u64, fin: &mut Finished) {
    if fin.status == Status::Timeout || sbx.oom_kills() <= oom_before {
        return;
    }
    let mut ending = Ending {
        oom_with_limit: Some(sbx.policy.limits.memory),
        runner_lost: fin.status == Status::Error,
        ..fin.ending.clone()
    };
    if classify(&ending, OutcomeScope::Command).status == Status::Oom {
        ending.timed_out_ms = None;
        fin.ending = ending;
        fin.settle();
    }
}

/// The shell's exit code for a command that could not start.
fn exit_code_of_failure(code: &str) -> Option<i32> {
    match code {
        "not_found" => Some(127),
        "permission_denied" => Some(126),
        _ => None,
    }
}

enum Sink<'a> {
    Started(u32),
    Stdout(&'a [u8]),
    Stderr(&'a [u8]),
}

/// How much of `chunk` fits under `cap` given `sent` so far.
fn take(sent: &mut u64, cap: u64, chunk: &[u8], truncated: &mut bool) -> usize {
    let room = cap.saturating_sub(*sent) as usize;
    let keep = chunk.len().min(room);
    *sent += keep as u64;
    if keep < chunk.len() {
        *truncated = true;
    }
    keep
}

fn result_of(sbx: &Sandbox, fin: &Finished, stdout: Vec<u8>, stderr: Vec<u8>) -> ExecResult {
    ExecResult {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        exit_code: fin.exit_code,
        signal: fin.signal,
        status: fin.status,
        wall_ms: fin.wall_ms,
        cpu_ms: 0,
        max_rss_kb: 0,
        truncated: fin.truncated,
        message: fin.message.clone(),
        sandbox: sbx.layers.clone(),
    }
}

fn audit_data(spec: &ExecSpec, fin: &Finished) -> Value {
    json!({"argv": spec.argv, "cwd": spec.cwd, "exit_code": fin.exit_code, "signal": fin.signal,
           "status": fin.status.as_str(), "wall_ms": fin.wall_ms, "truncated": fin.truncated})
}

/// Checks an exec request of `caller` against sandbox `id` and counts it: the sandbox, the
/// stdin to send, and the request for the agent.
fn prepare(
    app: &Arc<Engine>,
    caller: &Caller,
    id: &str,
    body: &CommandBody,
) -> ApiResult<(Arc<Sandbox>, Option<Vec<u8>>, ExecSpec)> {
    let sbx = app.visible(caller, id, Scope::Exec)?;
    sbx.require_running()?;
    if body.pty.is_some() || body.kind.is_some() {
        return Err(ApiError::bad_request(
            "`pty` and `type` are for the WebSocket (GET .../exec/ws)",
        ));
    }
    let stdin = body.stdin_bytes()?;
    let spec = body.spec(&sbx, stdin.is_some(), None, false)?;
    app.counters.execs.fetch_add(1, Ordering::Relaxed);
    Ok((sbx, stdin, spec))
}

pub async fn exec(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let body: CommandBody = parse_json(&headers, &small_body(body).await?)?;
    if !wants_ndjson(&headers) {
        return Ok(Json(run_to_end(&app, &caller, &id, body).await?).into_response());
    }
    let (sbx, stdin, spec) = prepare(&app, &caller, &id, &body)?;
    let cap = sbx.policy.limits.output;
    let started = Instant::now();
    let oom_before = sbx.oom_kills();
    // Streamed: a connection of its own, so a slow reader stalls only this command.
    let agent = sbx.dedicated().await?;
    let exec = agent.exec(spec.clone()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(32);
    let key = caller.key_id().clone();
    tokio::spawn(async move {
        let _keep: AgentClient = agent;
        let mut fin = drive_streamed(exec, stdin, cap, spec.timeout_ms, started, &tx).await;
        settle_oom(&sbx, oom_before, &mut fin);
        let audit = app
            .audit(
                Some(&key),
                Some(&id),
                EventKind::ExecFinished,
                audit_data(&spec, &fin),
            )
            .await;
        let last = match audit {
            Ok(_) => {
                let mut v = serde_json::to_value(result_of(&sbx, &fin, Vec::new(), Vec::new()))
                    .unwrap_or_else(|_| json!({}));
                if let Some(o) = v.as_object_mut() {
                    o.remove("stdout");
                    o.remove("stderr");
                    o.insert("type".into(), json!("exit"));
                }
                v
            }
            Err(e) => json!({"type": "error", "code": e.code, "message": e.message}),
        };
        let _ = tx.send(Ok(ndjson(&last))).await;
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response())
}

/// Runs a command as `caller` and waits for its result: `POST .../exec` without streaming
/// (also the MCP tools' way to run commands).
pub async fn run_to_end(
    app: &Arc<Engine>,
    caller: &Caller,
    id: &str,
    body: CommandBody,
) -> ApiResult<ExecResult> {
    let (sbx, stdin, spec) = prepare(app, caller, id, &body)?;
    let cap = sbx.policy.limits.output;
    let started = Instant::now();
    let oom_before = sbx.oom_kills();
    let exec = sbx.agent.exec(spec.clone()).await?;
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut fin = drive(exec, stdin, cap, spec.timeout_ms, started, |s| {
        match s {
            Sink::Stdout(b) => out.extend_from_slice(b),
            Sink::Stderr(b) => err.extend_from_slice(b),
            Sink::Started(_) => {}
        }
        true
    })
    .await;
    settle_oom(&sbx, oom_before, &mut fin);
    app.audit(
        Some(caller.key_id()),
        Some(id),
        EventKind::ExecFinished,
        audit_data(&spec, &fin),
    )
    .await?;
    Ok(result_of(&sbx, &fin, out, err))
}

/// Like [`drive`], but each output chunk goes to the client at once (awaiting a slow one).
async fn drive_streamed(
    exec: moat_engine::agent_client::Exec,
    stdin: Option<Vec<u8>>,
    cap: u64,
    timeout_ms: Option<u64>,
    started: Instant,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>,
) -> Finished {
    // drive's sink is synchronous: lines go through a queue to a forwarder that awaits the
    // client. The queue holds at most the output cap per stream, since drive drops the rest.
    let (ltx, mut lrx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let fwd_tx = tx.clone();
    let forward = tokio::spawn(async move {
        while let Some(line) = lrx.recv().await {
            if fwd_tx.send(Ok(line)).await.is_err() {
                return false;
            }
        }
        true
    });
    let fin = drive(exec, stdin, cap, timeout_ms, started, |s| {
        let line = match s {
            Sink::Started(pid) => json!({"type": "start", "pid": pid}),
            Sink::Stdout(b) => chunk_json("stdout", b),
            Sink::Stderr(b) => chunk_json("stderr", b),
        };
        ltx.send(ndjson(&line)).is_ok()
    })
    .await;
    drop(ltx);
    let _ = forward.await;
    fin
}

pub fn ndjson(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

pub fn chunk_json(kind: &str, b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => json!({"type": kind, "data": s}),
        Err(_) => json!({"type": kind, "data_b64": b64::encode(b)}),
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

pub async fn exec_ws(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let sbx = app.visible(&caller, &id, Scope::Exec)?;
    sbx.require_running()?;
    let key = caller.key_id().clone();
    Ok(ws
        .max_message_size(1 << 20)
        .on_upgrade(move |socket| async move {
            if let Err(e) = ws_session(app, sbx, key, socket).await {
                let _ = e;
            }
        }))
}

async fn ws_send(socket: &mut futures_util::stream::SplitSink<WebSocket, Message>, v: Value) {
    use futures_util::SinkExt;
    let _ = socket.send(Message::Text(v.to_string().into())).await;
}

async fn ws_session(
    app: Arc<Engine>,
    sbx: Arc<Sandbox>,
    key: moat_engine::store::KeyId,
    socket: WebSocket,
) -> Result<(), ApiError> {
    use futures_util::{SinkExt, StreamExt};
    let (mut out, mut inp) = socket.split();
    // The first message says what to run.
    let start = loop {
        match inp.next().await {
            Some(Ok(Message::Text(t))) => break t,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return Ok(()),
        }
    };
    let body: CommandBody = match serde_json::from_str(start.as_str()) {
        Ok(b) => b,
        Err(e) => {
            ws_send(
                &mut out,
                json!({"type": "error", "code": "invalid_request", "message": format!("start message: {e}")}),
            )
            .await;
            return Ok(());
        }
    };
    let prepared = (|| {
        if body.kind.as_deref() != Some("start") {
            return Err(ApiError::bad_request(
                "the first message must be {\"type\":\"start\",\"cmd\":[...]}",
            ));
        }
        body.spec(&sbx, true, body.pty, false).map(|mut s| {
            if body.timeout_s.is_none() {
                // Interactive sessions run until they end (or the sandbox does).
                s.timeout_ms = None;
            }
            s
        })
    })();
    let spec = match prepared {
        Ok(s) => s,
        Err(e) => {
            ws_send(
                &mut out,
                json!({"type": "error", "code": e.code, "message": e.message}),
            )
            .await;
            return Ok(());
        }
    };
    app.counters.execs.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let agent = sbx.dedicated().await?;
    let mut exec = match agent.exec(spec.clone()).await {
        Ok(e) => e,
        Err(e) => {
            let e = ApiError::from(e);
            ws_send(
                &mut out,
                json!({"type": "error", "code": e.code, "message": e.message}),
            )
            .await;
            return Ok(());
        }
    };
    let input = exec.stdin();
    let mut reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = inp.next().await {
            match msg {
                Message::Binary(b) if input.write(b.clone()).await.is_err() => break,
                Message::Binary(_) => {}
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    match v.get("type").and_then(Value::as_str) {
                        Some("stdin") => {
                            if let Some(d) = v.get("data").and_then(Value::as_str) {
                                let _ = input.write(Bytes::from(d.to_owned())).await;
                            }
                        }
                        Some("eof") => {
                            let _ = input.close().await;
                        }
                        Some("resize") => {
                            let rows = v.get("rows").and_then(Value::as_u64).unwrap_or(0);
                            let cols = v.get("cols").and_then(Value::as_u64).unwrap_or(0);
                            if (1..=u16::MAX as u64).contains(&rows)
                                && (1..=u16::MAX as u64).contains(&cols)
                            {
                                let _ = input.resize(rows as u16, cols as u16).await;
                            }
                        }
                        Some("signal") => {
                            if let Some(sig) = v.get("signal").and_then(Value::as_i64) {
                                if (1..=64).contains(&sig) {
                                    let _ = input.signal(sig as i32).await;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        // The client went away: end the command.
        let _ = input.cancel();
    });
    let mut fin = Finished::new(None);
    while let Some(ev) = exec.next().await {
        match ev {
            ExecEvent::Started { pid } => {
                ws_send(&mut out, json!({"type": "started", "pid": pid})).await
            }
            ExecEvent::Stdout(b) => {
                if out.send(Message::Binary(b)).await.is_err() {
                    break;
                }
            }
            ExecEvent::Stderr(b) => {
                ws_send(
                    &mut out,
                    json!({"type": "stderr", "data": String::from_utf8_lossy(&b)}),
                )
                .await
            }
            ExecEvent::Exit {
                exit_code,
                signal,
                status,
            } => {
                let timed_out_ms =
                    (status == Status::Timeout).then(|| spec.timeout_ms.unwrap_or(0));
                fin.exited(
                    exit_code,
                    signal,
                    status,
                    Ending {
                        timed_out_ms,
                        ..Ending::default()
                    },
                );
                break;
            }
            ExecEvent::Failed(e) => {
                // Reported like `exec` does: an `exit` with status `error` (127 for a
                // program that is not there, 126 for one that cannot run).
                let e = ApiError::from(e);
                fin.exit_code = exit_code_of_failure(e.code);
                fin.message = Some(e.message);
                break;
            }
        }
    }
    fin.wall_ms = started.elapsed().as_millis() as u64;
    let _ = app
        .audit(
            Some(&key),
            Some(&sbx.id),
            EventKind::ExecFinished,
            audit_data(&spec, &fin),
        )
        .await;
    ws_send(
        &mut out,
        json!({"type": "exit", "exit_code": fin.exit_code, "signal": fin.signal,
               "status": fin.status.as_str(), "message": fin.message}),
    )
    .await;
    let _ = out.send(Message::Close(None)).await;
    // Keep reading until the client's Close (bounded): dropping the socket while its last
    // messages are unread would reset the connection and could lose the `exit` above.
    if tokio::time::timeout(std::time::Duration::from_secs(2), &mut reader)
        .await
        .is_err()
    {
        reader.abort();
    }
    drop(agent);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Background processes
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessBody {
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    shell: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    stdin: bool,
}

fn proc_json(p: &moat_proto::ProcInfo) -> Value {
    json!({"pid": p.pid, "argv": p.argv, "running": p.running, "exit_code": p.exit_code,
           "signal": p.signal, "status": p.status.map(|s| s.as_str()),
           "started_at": p.started_ms, "finished_at": p.finished_ms})
}

pub async fn start_process(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let body: ProcessBody = parse_json(&headers, &small_body(body).await?)?;
    let sbx = app.visible(&caller, &id, Scope::Exec)?;
    sbx.require_running()?;
    let cmd = CommandBody {
        cmd: body.cmd,
        shell: body.shell,
        cwd: body.cwd,
        env: body.env,
        ..CommandBody::default()
    };
    let spec = cmd.spec(&sbx, body.stdin, None, true)?;
    let mut exec = sbx.agent.exec(spec.clone()).await?;
    let pid = match exec.next().await {
        Some(ExecEvent::Started { pid }) => pid,
        Some(ExecEvent::Failed(e)) => return Err(e.into()),
        _ => {
            return Err(ApiError::unavailable(
                "the sandbox's agent did not start the process",
            ))
        }
    };
    app.counters.execs.fetch_add(1, Ordering::Relaxed);
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::ExecStarted,
        json!({"argv": spec.argv, "cwd": spec.cwd, "pid": pid, "background": true}),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"pid": pid, "argv": spec.argv, "running": true, "exit_code": null,
                    "signal": null, "status": null, "started_at": moat_engine::lifecycle::now_ms(),
                    "finished_at": null}),
        ),
    )
        .into_response())
}

pub async fn list_processes(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let sbx = app.visible(&caller, &id, Scope::Exec)?;
    sbx.require_running()?;
    let procs = sbx.agent.procs().await?;
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::ApiCall,
        json!({"call": "list_processes"}),
    )
    .await?;
    Ok(Json(
        json!({"processes": procs.iter().map(proc_json).collect::<Vec<_>>()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    signal: i32,
}

pub async fn signal_process(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path((id, pid)): Path<(String, u32)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let body: SignalBody = parse_json(&headers, &small_body(body).await?)?;
    if !(1..=64).contains(&body.signal) {
        return Err(ApiError::bad_request("signal must be between 1 and 64"));
    }
    let sbx = app.visible(&caller, &id, Scope::Exec)?;
    sbx.require_running()?;
    sbx.agent.signal_pid(pid, body.signal).await?;
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::ApiCall,
        json!({"call": "signal_process", "pid": pid, "signal": body.signal}),
    )
    .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    #[serde(default)]
    follow: Option<String>,
}

pub async fn process_output(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path((id, pid)): Path<(String, u32)>,
    Query(q): Query<OutputQuery>,
) -> ApiResult<Response> {
    let sbx = app.visible(&caller, &id, Scope::Exec)?;
    sbx.require_running()?;
    let follow = matches!(q.follow.as_deref(), Some("1" | "true" | "yes"));
    let agent = sbx.dedicated().await?;
    let mut out = agent.proc_output(pid, follow).await?;
    // The first event says whether the process exists.
    let first = match out.next().await {
        Some(ExecEvent::Failed(e)) => return Err(ApiError::from(e)),
        None => {
            return Err(ApiError::unavailable(
                "the sandbox's agent closed the stream",
            ))
        }
        first => first,
    };
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::ApiCall,
        json!({"call": "process_output", "pid": pid, "follow": follow}),
    )
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(32);
    tokio::spawn(async move {
        let _keep = agent;
        let mut next = first;
        let mut ended = false;
        while let Some(ev) = next {
            let line = match ev {
                ExecEvent::Started { .. } => None,
                ExecEvent::Stdout(b) => Some(chunk_json("stdout", &b)),
                ExecEvent::Stderr(b) => Some(chunk_json("stderr", &b)),
                ExecEvent::Exit {
                    exit_code,
                    signal,
                    status,
                } => {
                    ended = true;
                    Some(
                        json!({"type": "exit", "exit_code": exit_code, "signal": signal,
                                "status": status.as_str()}),
                    )
                }
                ExecEvent::Failed(e) => {
                    ended = true;
                    let e = ApiError::from(e);
                    Some(json!({"type": "error", "code": e.code, "message": e.message}))
                }
            };
            if let Some(line) = line {
                if tx.send(Ok(ndjson(&line))).await.is_err() {
                    return;
                }
            }
            if ended {
                break;
            }
            next = out.next().await;
        }
        if !ended {
            let _ = tx.send(Ok(ndjson(&json!({"type": "end"})))).await;
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdinQuery {
    #[serde(default)]
    close: Option<String>,
}

/// Most bytes one stdin call takes.
const MAX_STDIN: usize = 16 << 20;

pub async fn process_stdin(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path((id, pid)): Path<(String, u32)>,
    Query(q): Query<StdinQuery>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let sbx = app.visible(&caller, &id, Scope::Exec)?;
    sbx.require_running()?;
    let data = axum::body::to_bytes(body, MAX_STDIN).await.map_err(|_| {
        ApiError::too_large(format!(
            "at most {MAX_STDIN} bytes of stdin per call: send more calls"
        ))
    })?;
    let close = matches!(q.close.as_deref(), Some("1" | "true" | "yes"));
    let n = data.len();
    sbx.agent.proc_stdin(pid, data, close).await?;
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::ApiCall,
        json!({"call": "process_stdin", "pid": pid, "bytes": n, "close": close}),
    )
    .await?;
    Ok(Json(json!({"bytes": n})))
}
