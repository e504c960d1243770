//! Files: every operation is done by the agent inside the sandbox, as the sandbox's user, in
//! the sandbox's own mount namespace. The daemon never resolves a path the sandbox controls:
//! it only checks that a path is absolute and well formed, and streams the bytes.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use moat_engine::store::{EventKind, Scope};
use moat_proto::{Entry, EntryKind};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::http::Auth;
use crate::http::{parse_json, small_body};
use moat_engine::lifecycle::{Caller, Engine, Sandbox};

/// Checks a path from a client: absolute, no NUL, at most 4096 bytes. `..` and symlinks are
/// resolved by the kernel inside the sandbox, where they can only reach the sandbox's files.
pub fn check_path(what: &str, path: &str) -> ApiResult<()> {
    if !path.starts_with('/') {
        return Err(ApiError::bad_request(format!(
            "{what} must be an absolute path inside the sandbox, e.g. /work/file.txt"
        )));
    }
    if path.contains('\0') {
        return Err(ApiError::bad_request(format!("{what} contains a NUL byte")));
    }
    if path.len() > 4096 {
        return Err(ApiError::bad_request(format!(
            "{what} is {} bytes; the most is 4096",
            path.len()
        )));
    }
    Ok(())
}

pub fn entry_json(e: &Entry) -> Value {
    let kind = match e.kind {
        EntryKind::File => "file",
        EntryKind::Dir => "dir",
        EntryKind::Symlink => "symlink",
        EntryKind::Other => "other",
    };
    json!({"path": e.path, "kind": kind, "size": e.size, "mode": e.mode, "mtime_ms": e.mtime_ms})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    path: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    recursive: Option<String>,
    #[serde(default)]
    depth: Option<u32>,
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("1" | "true" | "yes"))
}

async fn files_sandbox(
    app: &Arc<Engine>,
    caller: &Caller,
    id: &str,
    scope: Scope,
) -> ApiResult<Arc<Sandbox>> {
    let sbx = app.visible(caller, id, scope)?;
    sbx.require_running()?;
    Ok(sbx)
}

pub async fn read(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Response> {
    check_path("path", &q.path)?;
    let sbx = files_sandbox(&app, &caller, &id, Scope::FilesRead).await?;
    // A connection of its own: the client's pace sets the agent's.
    let agent = sbx.dedicated().await?;
    let mut file = agent.read_file(&q.path).await?;
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::FileRead,
        json!({"path": q.path}),
    )
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let _keep = agent;
        loop {
            match file.next_chunk().await {
                Ok(Some(chunk)) => {
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    // Cut the body off: the client sees an incomplete transfer, not a short
                    // file.
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response())
}

pub async fn write(
    State(app): State<Arc<Engine>>,
    caller: Result<Auth, ApiError>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let opened = async {
        let caller = caller?.0;
        check_path("path", &q.path)?;
        let mode = match &q.mode {
            None => None,
            Some(m) => Some(
                u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| {
                        ApiError::bad_request("mode is octal permission bits, e.g. 0644")
                    })?,
            ),
        };
        let sbx = files_sandbox(&app, &caller, &id, Scope::FilesWrite).await?;
        let agent = sbx.dedicated().await?;
        let file = agent.write_file(&q.path, mode, true).await?;
        Ok::<_, ApiError>((caller, agent, file))
    }
    .await;
    let (caller, _agent, mut file) = match opened {
        Ok(o) => o,
        Err(e) => return Err(crate::http::refuse_upload(e, body).await),
    };
    let mut stream = body.into_data_stream();
    let mut sent: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("the upload was cut off: {e}")))?;
        sent += chunk.len() as u64;
        if let Err(e) = file.write(chunk).await {
            // The sandbox refused the rest (full, say): read what the client is still
            // sending, within bounds, so that it gets this answer rather than a reset.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                let mut drained = 0usize;
                while let Some(Ok(c)) = stream.next().await {
                    drained += c.len();
                    if drained > 256 << 20 {
                        break;
                    }
                }
            })
            .await;
            return Err(e.into());
        }
    }
    let bytes = file.finish().await?;
    if bytes != sent {
        return Err(ApiError::internal(format!(
            "the agent wrote {bytes} bytes of {sent}"
        )));
    }
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::FileWrite,
        json!({"path": q.path, "bytes": bytes}),
    )
    .await?;
    Ok(Json(json!({"path": q.path, "bytes": bytes})))
}

pub async fn remove(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<StatusCode> {
    remove_path(&app, &caller, &id, &q.path, truthy(&q.recursive)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a file (or a tree, `recursive`) as `caller`.
pub async fn remove_path(
    app: &Arc<Engine>,
    caller: &Caller,
    id: &str,
    path: &str,
    recursive: bool,
) -> ApiResult<()> {
    check_path("path", path)?;
    let sbx = files_sandbox(app, caller, id, Scope::FilesWrite).await?;
    sbx.agent.remove(path, recursive).await?;
    app.audit(
        Some(caller.key_id()),
        Some(id),
        EventKind::FileOp,
        json!({"op": "remove", "path": path, "recursive": recursive}),
    )
    .await?;
    Ok(())
}

pub async fn list(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<Value>> {
    let depth = q.depth.unwrap_or(1);
    let (entries, truncated) = list_entries(&app, &caller, &id, &q.path, depth).await?;
    Ok(Json(json!({
        "entries": entries.iter().map(entry_json).collect::<Vec<_>>(),
        "truncated": truncated,
    })))
}

/// Lists a directory `depth` levels deep as `caller`: the entries, and whether the agent cut
/// the listing short.
pub async fn list_entries(
    app: &Arc<Engine>,
    caller: &Caller,
    id: &str,
    path: &str,
    depth: u32,
) -> ApiResult<(Vec<Entry>, bool)> {
    check_path("path", path)?;
    if !(1..=16).contains(&depth) {
        return Err(ApiError::bad_request("depth must be between 1 and 16"));
    }
    let sbx = files_sandbox(app, caller, id, Scope::FilesRead).await?;
    // The API counts levels from 1 (children only); the protocol from 0.
    let listed = sbx.agent.list_dir(path, depth - 1).await?;
    app.audit(
        Some(caller.key_id()),
        Some(id),
        EventKind::FileOp,
        json!({"op": "list", "path": path, "depth": depth}),
    )
    .await?;
    Ok(listed)
}

/// Reads the first `max` bytes of a file as `caller`, with the file's entry (its whole
/// size): for callers that want a bounded read in memory (the MCP tools).
pub async fn read_prefix(
    app: &Arc<Engine>,
    caller: &Caller,
    id: &str,
    path: &str,
    max: usize,
) -> ApiResult<(Vec<u8>, Entry)> {
    check_path("path", path)?;
    let sbx = files_sandbox(app, caller, id, Scope::FilesRead).await?;
    let entry = sbx.agent.stat(path).await?;
    if entry.kind == EntryKind::Dir {
        return Err(ApiError::bad_request(format!(
            "{path} is a directory: list it instead"
        )));
    }
    // A connection of its own: it is dropped, with the rest of the file, once `max` is read.
    let agent = sbx.dedicated().await?;
    let mut file = agent.read_file(path).await?;
    let mut data = Vec::new();
    while data.len() < max {
        match file.next_chunk().await? {
            Some(chunk) => {
                let room = max - data.len();
                data.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            None => break,
        }
    }
    app.audit(
        Some(caller.key_id()),
        Some(id),
        EventKind::FileRead,
        json!({"path": path}),
    )
    .await?;
    Ok((data, entry))
}

/// Writes `data` to a file as `caller` (parents created, the file replaced); the bytes
/// written.
pub async fn write_all(
    app: &Arc<Engine>,
    caller: &Caller,
    id: &str,
    path: &str,
    data: Vec<u8>,
) -> ApiResult<u64> {
    check_path("path", path)?;
    let sbx = files_sandbox(app, caller, id, Scope::FilesWrite).await?;
    let agent = sbx.dedicated().await?;
    let mut file = agent.write_file(path, None, true).await?;
    let sent = data.len() as u64;
    file.write(Bytes::from(data)).await?;
    let bytes = file.finish().await?;
    if bytes != sent {
        return Err(ApiError::internal(format!(
            "the agent wrote {bytes} bytes of {sent}"
        )));
    }
    app.audit(
        Some(caller.key_id()),
        Some(id),
        EventKind::FileWrite,
        json!({"path": path, "bytes": bytes}),
    )
    .await?;
    Ok(bytes)
}

pub async fn stat(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<Value>> {
    check_path("path", &q.path)?;
    let sbx = files_sandbox(&app, &caller, &id, Scope::FilesRead).await?;
    let entry = sbx.agent.stat(&q.path).await?;
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::FileOp,
        json!({"op": "stat", "path": q.path}),
    )
    .await?;
    Ok(Json(entry_json(&entry)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MkdirBody {
    path: String,
    #[serde(default)]
    parents: bool,
}

pub async fn mkdir(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let body: MkdirBody = parse_json(&headers, &small_body(body).await?)?;
    check_path("path", &body.path)?;
    let sbx = files_sandbox(&app, &caller, &id, Scope::FilesWrite).await?;
    sbx.agent.mkdir(&body.path, body.parents).await?;
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::FileOp,
        json!({"op": "mkdir", "path": body.path, "parents": body.parents}),
    )
    .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveBody {
    from: String,
    to: String,
}

pub async fn rename(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let body: MoveBody = parse_json(&headers, &small_body(body).await?)?;
    check_path("from", &body.from)?;
    check_path("to", &body.to)?;
    let sbx = files_sandbox(&app, &caller, &id, Scope::FilesWrite).await?;
    sbx.agent.rename(&body.from, &body.to).await?;
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::FileOp,
        json!({"op": "move", "from": body.from, "to": body.to}),
    )
    .await?;
    Ok(Json(json!({})))
}

/// Bytes in the sandbox's writable filesystems (`/tmp` and the working directory), as the
/// agent lists them (a lower bound when a listing was truncated).
pub async fn disk_usage(sbx: &Sandbox) -> ApiResult<u64> {
    let mut total = 0;
    for dir in ["/tmp", sbx.policy.fs.workdir.as_str()] {
        let (entries, _) = sbx.agent.list_dir(dir, 16).await?;
        total += entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| e.size)
            .sum::<u64>();
    }
    Ok(total)
}
