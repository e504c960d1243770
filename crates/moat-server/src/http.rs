//! The HTTP API: routing, authentication, request parsing, and the sandbox, token, event and
//! health routes. Exec and processes are in [`crate::exec`], files in [`crate::files`].

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, request::Parts, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use moat_engine::store::{EventFilter, EventKind, Principal, SandboxFilter, SandboxState, Scope};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use moat_engine::lifecycle::{db, now_ms, parse_scope, scope_name, Caller, Engine};

/// Largest JSON request body.
pub const MAX_JSON: usize = 2 << 20;

pub fn router(app: Arc<Engine>) -> Router {
    let v1 = Router::new()
        .route("/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/sandboxes/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/{id}/events", get(sandbox_events))
        .route("/sandboxes/{id}/exec", post(crate::exec::exec))
        .route("/sandboxes/{id}/exec/ws", get(crate::exec::exec_ws))
        .route(
            "/sandboxes/{id}/processes",
            post(crate::exec::start_process).get(crate::exec::list_processes),
        )
        .route(
            "/sandboxes/{id}/processes/{pid}/signal",
            post(crate::exec::signal_process),
        )
        .route(
            "/sandboxes/{id}/processes/{pid}/output",
            get(crate::exec::process_output),
        )
        .route(
            "/sandboxes/{id}/processes/{pid}/stdin",
            post(crate::exec::process_stdin),
        )
        .route(
            "/sandboxes/{id}/files",
            get(crate::files::read)
                .put(crate::files::write)
                .delete(crate::files::remove),
        )
        .route("/sandboxes/{id}/files/list", get(crate::files::list))
        .route("/sandboxes/{id}/files/stat", get(crate::files::stat))
        .route("/sandboxes/{id}/files/mkdir", post(crate::files::mkdir))
        .route("/sandboxes/{id}/files/move", post(crate::files::rename))
        .route(
            "/templates",
            get(crate::templates::list).post(crate::templates::pull),
        )
        .route(
            "/templates/{*name}",
            get(crate::templates::get).delete(crate::templates::remove),
        )
        .route("/events", get(all_events))
        .route("/tokens", post(create_token))
        .route("/health", get(health))
        .route("/openapi.json", get(openapi));
    Router::new()
        .nest("/v1", v1)
        .nest_service("/mcp", crate::mcp::router(app.clone()))
        .route("/metrics", get(prometheus))
        .route("/v1/sandboxes/{id}/files/{*rest}", delete(no_route))
        .fallback(no_route)
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(close_if_unread))
        .layer(middleware::from_fn_with_state(app.clone(), count))
        .with_state(app)
}

async fn count(State(app): State<Arc<Engine>>, req: Request, next: Next) -> Response {
    app.counters.requests.fetch_add(1, Ordering::Relaxed);
    let resp = next.run(req).await;
    let s = resp.status();
    if s.is_client_error() {
        app.counters.errors_4xx.fetch_add(1, Ordering::Relaxed);
    } else if s.is_server_error() {
        app.counters.errors_5xx.fetch_add(1, Ordering::Relaxed);
    }
    resp
}

/// Answers with `Connection: close` when the handler did not read the request's body to its end
/// (a rejection before the body was needed: authentication, a 404, a body over its bound).
///
/// hyper does not keep such a connection alive once the body is not drained, but its answer
/// does not say so; a client that pools connections then sends its next request into a socket
/// that is closing and sees "peer disconnected". Saying it lets every client open a new one.
async fn close_if_unread(req: Request, next: Next) -> Response {
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > 0);
    if !has_body {
        return next.run(req).await;
    }
    let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = Body::new(ReadToEnd {
        inner: body,
        read: read.clone(),
    });
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    if !read.load(Ordering::Acquire) {
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// A request body that records whether it was read to its end.
struct ReadToEnd {
    inner: Body,
    read: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for ReadToEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = p {
            self.read.store(true, Ordering::Release);
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn no_route() -> ApiError {
    ApiError::not_found("no such route: see GET /v1/openapi.json")
}

// ---------------------------------------------------------------------------------------------
// Authentication and parsing
// ---------------------------------------------------------------------------------------------

/// The authenticated caller of a request (the engine checks the bearer secret and audits a
/// failure).
pub struct Auth(pub Caller);

impl FromRequestParts<Arc<Engine>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<Engine>) -> Result<Auth, ApiError> {
        let secret = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        Ok(Auth(
            app.authenticate(secret, parts.method.as_str(), parts.uri.path())
                .await?,
        ))
    }
}

/// Parses a JSON body strictly: a JSON content type (or none), the size bound, and the
/// type's own rules (unknown fields are errors).
pub fn parse_json<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> ApiResult<T> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        if !ct.starts_with("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("send the body as application/json, not `{ct}`"),
            ));
        }
    }
    if body.len() > MAX_JSON {
        return Err(ApiError::too_large(format!(
            "the JSON body is {} bytes; the most is {MAX_JSON}",
            body.len()
        )));
    }
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

/// A body that must be at most [`MAX_JSON`] bytes, read without buffering more than that.
pub async fn small_body(body: Body) -> ApiResult<Bytes> {
    use axum::body::HttpBody;
    // A declared length over the bound is refused before anything is read.
    let declared = body.size_hint().lower();
    if declared > MAX_JSON as u64 {
        return Err(ApiError::too_large(format!(
            "the request body is {declared} bytes; the most is {MAX_JSON}"
        )));
    }
    axum::body::to_bytes(body, MAX_JSON).await.map_err(|_| {
        ApiError::too_large(format!(
            "the request body is over {MAX_JSON} bytes, or was cut off"
        ))
    })
}

/// Answers an upload refused before its body was read. A small body is read (and dropped)
/// first, bounded in size and time: a client still sending it would otherwise see the
/// connection reset instead of the answer.
pub async fn refuse_upload(e: ApiError, body: Body) -> ApiError {
    use axum::body::HttpBody;
    const DRAIN: u64 = 1 << 20;
    if body.size_hint().upper().is_none_or(|n| n <= DRAIN) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            axum::body::to_bytes(body, DRAIN as usize),
        )
        .await;
    }
    e
}

/// Query parameters as given, for the routes with a free-form filter.
pub type RawQuery = Query<Vec<(String, String)>>;

fn no_extra<T>(params: &[(String, String)], allowed: &[&str], ok: T) -> ApiResult<T> {
    for (k, _) in params {
        if !allowed.contains(&k.as_str()) && !k.starts_with("metadata.") {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{k}`: allowed are {}",
                allowed.join(", ")
            )));
        }
    }
    Ok(ok)
}

// ---------------------------------------------------------------------------------------------
// Sandboxes
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    policy: Option<Value>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    timeout_s: Option<u64>,
    #[serde(default)]
    tier: Option<String>,
    /// Values of the secrets the policy binds to hosts (`network.secrets`): the sandbox
    /// sees placeholders; the egress proxy puts these values into requests to those hosts.
    #[serde(default)]
    secrets: BTreeMap<String, String>,
}

const MAX_METADATA: usize = 64;

/// A new sandbox's metadata must be small: at most [`MAX_METADATA`] entries, keys of 1 to 128
/// bytes, values of at most 1024.
pub fn check_metadata(metadata: &BTreeMap<String, String>) -> ApiResult<()> {
    if metadata.len() > MAX_METADATA
        || metadata
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 1024)
    {
        return Err(ApiError::bad_request(format!(
            "metadata: at most {MAX_METADATA} entries, keys 1-128 bytes, values up to 1024"
        )));
    }
    Ok(())
}

async fn create_sandbox(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    if caller.is_token() {
        return Err(ApiError::forbidden(
            "a scoped token cannot create sandboxes: use an API key",
        ));
    }
    let body: CreateBody = parse_json(&headers, &small_body(body).await?)?;
    check_metadata(&body.metadata)?;
    let mut policy = body.policy.unwrap_or_else(|| json!({}));
    if !policy.is_object() {
        return Err(ApiError::bad_request(
            "policy must be an object (the TOML policy's fields, as JSON)",
        ));
    }
    if !body.env.is_empty() {
        let env = policy
            .as_object_mut()
            .map(|p| p.entry("env").or_insert_with(|| json!({})))
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiError::bad_request("policy.env must be an object"))?;
        for (k, v) in body.env {
            env.insert(k, Value::String(v));
        }
    }
    let sbx = app
        .create(
            &caller,
            policy,
            body.metadata,
            body.timeout_s,
            body.tier,
            body.secrets,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(sbx.json())).into_response())
}

async fn list_sandboxes(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Query(params): RawQuery,
) -> ApiResult<Json<Value>> {
    no_extra(&params, &["state"], ())?;
    let mut filter = SandboxFilter::default();
    for (k, v) in &params {
        if k == "state" {
            filter.state = Some(v.parse::<SandboxState>().map_err(|_| {
                ApiError::bad_request(format!(
                    "state must be one of creating, running, paused, stopping, stopped, failed; \
                     not `{v}`"
                ))
            })?);
        } else if let Some(key) = k.strip_prefix("metadata.") {
            filter.metadata.insert(key.to_owned(), v.clone());
        }
    }
    let list: Vec<Value> = match &caller.principal {
        Principal::Token(t) => app
            .sandbox(&t.sandbox_id)
            .filter(|s| caller.check(s, Scope::Read).is_ok())
            .filter(|s| filter.state.is_none_or(|st| s.state() == st))
            .filter(|s| {
                filter
                    .metadata
                    .iter()
                    .all(|(k, v)| s.metadata.get(k) == Some(v))
            })
            .map(|s| s.json())
            .into_iter()
            .collect(),
        Principal::Key(k) => {
            let key = k.id.clone();
            let admin = k.admin;
            let records = db(&app, move |s| {
                if admin {
                    s.all_sandboxes(&filter)
                } else {
                    s.list_sandboxes(&key, &filter)
                }
            })
            .await?;
            records
                .iter()
                .map(|r| match app.sandbox(&r.id) {
                    Some(s) => s.json(),
                    None => json!({
                        "id": r.id, "state": r.state.as_str(), "tier": r.tier,
                        "created_at": r.created_at, "expires_at": r.expires_at,
                        "metadata": r.metadata, "error": r.error,
                    }),
                })
                .collect()
        }
    };
    app.audit(
        Some(caller.key_id()),
        None,
        EventKind::ApiCall,
        json!({"call": "list_sandboxes", "count": list.len()}),
    )
    .await?;
    Ok(Json(json!({ "sandboxes": list })))
}

async fn get_sandbox(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let sbx = app.visible(&caller, &id, Scope::Read)?;
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::ApiCall,
        json!({"call": "get_sandbox"}),
    )
    .await?;
    Ok(Json(sbx.json()))
}

async fn delete_sandbox(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if caller.is_token() {
        return Err(ApiError::forbidden(
            "a scoped token cannot delete its sandbox: use an API key",
        ));
    }
    let sbx = app.visible(&caller, &id, Scope::Read)?;
    app.destroy(&sbx, Some(caller.key_id()), "deleted").await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutBody {
    timeout_s: u64,
}

async fn set_timeout(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let body: TimeoutBody = parse_json(&headers, &small_body(body).await?)?;
    if caller.is_token() {
        return Err(ApiError::forbidden(
            "a scoped token cannot change its sandbox's timeout",
        ));
    }
    let sbx = app.visible(&caller, &id, Scope::Read)?;
    app.set_timeout(&sbx, caller.key_id(), body.timeout_s)
        .await?;
    Ok(Json(sbx.json()))
}

async fn pause(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let sbx = app.visible(&caller, &id, Scope::Exec)?;
    app.set_paused(&sbx, caller.key_id(), true).await?;
    Ok(Json(sbx.json()))
}

async fn resume(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let sbx = app.visible(&caller, &id, Scope::Exec)?;
    app.set_paused(&sbx, caller.key_id(), false).await?;
    Ok(Json(sbx.json()))
}

async fn metrics(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let sbx = app.visible(&caller, &id, Scope::Read)?;
    let mut m = app.metrics(&sbx);
    // Disk: what the sandbox's writable filesystems hold, measured by the agent inside.
    let disk = if sbx.state() == SandboxState::Running {
        crate::files::disk_usage(&sbx).await.ok()
    } else {
        None
    };
    if let Some(obj) = m.as_object_mut() {
        obj.insert("disk_bytes".into(), json!(disk));
    }
    app.audit(
        Some(caller.key_id()),
        Some(&id),
        EventKind::ApiCall,
        json!({"call": "metrics"}),
    )
    .await?;
    Ok(Json(m))
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    sandbox_id: String,
    scopes: Vec<String>,
    #[serde(default)]
    ttl_s: Option<u64>,
}

const MAX_TOKEN_TTL_S: u64 = 24 * 3600;

async fn create_token(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let body: TokenBody = parse_json(&headers, &small_body(body).await?)?;
    let Principal::Key(key) = &caller.principal else {
        return Err(ApiError::forbidden(
            "a scoped token cannot issue tokens: use an API key",
        ));
    };
    if body.scopes.is_empty() {
        return Err(ApiError::bad_request(
            "scopes: give at least one of exec, files:read, files:write, read",
        ));
    }
    let mut scopes = Vec::new();
    for s in &body.scopes {
        scopes.push(parse_scope(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown scope `{s}`: use exec, files:read, files:write or read"
            ))
        })?);
    }
    let ttl_s = body.ttl_s.unwrap_or(900);
    if ttl_s == 0 || ttl_s > MAX_TOKEN_TTL_S {
        return Err(ApiError::bad_request(format!(
            "ttl_s must be between 1 and {MAX_TOKEN_TTL_S}"
        )));
    }
    // Only a sandbox this key can see (the same 404 as a missing one otherwise).
    app.visible(&caller, &body.sandbox_id, Scope::Read)?;
    let key_id = key.id.clone();
    let sandbox_id = body.sandbox_id.clone();
    let scopes2 = scopes.clone();
    let now = now_ms();
    let created = db(&app, move |s| {
        match s.create_token(
            &key_id,
            &sandbox_id,
            &scopes2,
            Duration::from_secs(ttl_s),
            now,
        ) {
            Err(moat_engine::store::StoreError::SandboxNotFound { .. }) => Ok(None),
            other => other.map(Some),
        }
    })
    .await?;
    let (record, secret) = created.ok_or_else(|| ApiError::no_sandbox(&body.sandbox_id))?;
    let names: Vec<&str> = scopes.iter().map(|s| scope_name(*s)).collect();
    app.audit(
        Some(&key.id),
        Some(&body.sandbox_id),
        EventKind::TokenCreated,
        json!({"token_id": record.id, "scopes": names, "expires_at": record.expires_at}),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": record.id, "token": secret, "sandbox_id": record.sandbox_id,
            "scopes": names, "expires_at": record.expires_at,
        })),
    )
        .into_response())
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    follow: Option<String>,
    /// Only these kinds, comma-separated (`egress,exec_finished`).
    #[serde(default)]
    kind: Option<String>,
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("1" | "true" | "yes"))
}

fn event_json(seq: u64, e: &moat_engine::store::Event) -> Value {
    json!({"seq": seq, "ts": e.ts, "key_id": e.key_id, "sandbox_id": e.sandbox_id,
           "kind": e.kind.as_str(), "data": e.data})
}

async fn all_events(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    if caller.is_token() {
        return Err(ApiError::forbidden(
            "a scoped token reads its sandbox's events at /v1/sandboxes/{id}/events",
        ));
    }
    events(app, caller, None, q).await
}

async fn sandbox_events(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    // The events of a deleted sandbox stay readable by its owner: check ownership in the
    // store, not only the live registry.
    match app.sandbox(&id) {
        Some(sbx) => caller.check(&sbx, Scope::Read)?,
        None => {
            if caller.is_token() {
                return Err(ApiError::no_sandbox(&id));
            }
            // A gone sandbox's events are its owner's; for anyone else the id is as unknown
            // as one that never existed (the same 404 a live foreign sandbox gets).
            let probe = EventFilter {
                sandbox_id: Some(id.clone()),
                since_seq: None,
                kinds: Vec::new(),
                owner_key: (!caller.is_admin()).then(|| caller.key_id().clone()),
                limit: Some(1),
            };
            if db(&app, move |s| s.events(&probe)).await?.is_empty() {
                return Err(ApiError::no_sandbox(&id));
            }
        }
    }
    events(app, caller, Some(id), q).await
}

async fn events(
    app: Arc<Engine>,
    caller: Caller,
    sandbox: Option<String>,
    q: EventsQuery,
) -> ApiResult<Response> {
    let owner = if caller.is_admin() {
        None
    } else {
        Some(caller.key_id().clone())
    };
    let mut kinds = Vec::new();
    for k in q
        .kind
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|k| !k.is_empty())
    {
        kinds.push(k.parse::<EventKind>().map_err(|_| {
            ApiError::bad_request(format!(
                "kind `{k}` is not an event kind (e.g. egress, exec_finished, sandbox_created)"
            ))
        })?);
    }
    let filter = EventFilter {
        sandbox_id: sandbox.clone(),
        since_seq: q.since,
        kinds,
        owner_key: owner.clone(),
        limit: Some(q.limit.unwrap_or(1000).min(10_000)),
    };
    if !truthy(&q.follow) {
        let list = {
            let filter = filter.clone();
            db(&app, move |s| s.events(&filter)).await?
        };
        let out: Vec<Value> = list.iter().map(|(seq, e)| event_json(*seq, e)).collect();
        return Ok(Json(json!({ "events": out })).into_response());
    }
    // Follow: subscribe first, then send history, then live events past the last one sent.
    let mut live = app.events.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let app2 = app.clone();
    tokio::spawn(async move {
        let mut last = q.since.unwrap_or(0);
        let mut filter = filter;
        filter.limit = Some(10_000);
        loop {
            filter.since_seq = Some(last);
            let f = filter.clone();
            let Ok(history) = db(&app2, move |s| s.events(&f)).await else {
                return;
            };
            let more = history.len() >= 10_000;
            for (seq, e) in history {
                last = seq;
                let line = format!("id: {seq}\ndata: {}\n\n", event_json(seq, &e));
                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                    return;
                }
            }
            if !more {
                break;
            }
        }
        loop {
            let next = tokio::time::timeout(Duration::from_secs(15), live.recv()).await;
            match next {
                Err(_) => {
                    // Keep-alive comment, and notice a client that went away.
                    if tx
                        .send(Ok(Bytes::from_static(b": ping\n\n")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(Ok((seq, e))) => {
                    if seq <= last {
                        continue;
                    }
                    if let Some(id) = &sandbox {
                        if e.sandbox_id.as_deref() != Some(id.as_str()) {
                            continue;
                        }
                    }
                    if let Some(owner) = &owner {
                        let mine = e.key_id.as_ref() == Some(owner)
                            || e.sandbox_id
                                .as_deref()
                                .and_then(|id| app2.sandbox(id))
                                .is_some_and(|s| &s.owner == owner);
                        if !mine {
                            continue;
                        }
                    }
                    last = seq;
                    let line = format!("id: {seq}\ndata: {}\n\n", event_json(seq, &e));
                    if tx.send(Ok(Bytes::from(line))).await.is_err() {
                        return;
                    }
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                    // Fell behind: read what was missed from the store.
                    let mut f = filter.clone();
                    f.since_seq = Some(last);
                    let Ok(missed) = db(&app2, move |s| s.events(&f)).await else {
                        return;
                    };
                    for (seq, e) in missed {
                        last = seq;
                        let line = format!("id: {seq}\ndata: {}\n\n", event_json(seq, &e));
                        if tx.send(Ok(Bytes::from(line))).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(Err(_)) => return,
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

// ---------------------------------------------------------------------------------------------
// Health, metrics, OpenAPI
// ---------------------------------------------------------------------------------------------

async fn health() -> Json<Value> {
    Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document().to_string(),
    )
        .into_response()
}

async fn prometheus(State(app): State<Arc<Engine>>) -> Response {
    let c = &app.counters;
    let mut by_state: HashMap<&'static str, u64> = HashMap::new();
    if let Ok(map) = app.sandboxes.read() {
        for s in map.values() {
            *by_state.entry(s.state().as_str()).or_default() += 1;
        }
    }
    let mut out = String::new();
    out.push_str("# HELP moat_sandboxes Live sandboxes by state.\n# TYPE moat_sandboxes gauge\n");
    for st in ["running", "paused", "creating", "stopping"] {
        out.push_str(&format!(
            "moat_sandboxes{{state=\"{st}\"}} {}\n",
            by_state.get(st).copied().unwrap_or(0)
        ));
    }
    out.push_str(
        "# HELP moat_pool_ready Ready sandboxes in each tier's warm pool.\n# TYPE moat_pool_ready gauge\n",
    );
    for p in &app.pools.tiers {
        out.push_str(&format!(
            "moat_pool_ready{{tier=\"{}\"}} {}\n",
            p.tier.as_str(),
            app.pools.ready(p.tier)
        ));
    }
    let counters = [
        (
            "moat_pool_hits_total",
            "Creates served by a warm pool's ready sandbox.",
            &app.pools.hits,
        ),
        (
            "moat_pool_misses_total",
            "Creates of a pooled tier that started a sandbox cold (another policy, or none ready).",
            &app.pools.misses,
        ),
        (
            "moat_sandboxes_created_total",
            "Sandboxes created.",
            &c.created,
        ),
        (
            "moat_sandboxes_destroyed_total",
            "Sandboxes destroyed (deleted or expired).",
            &c.destroyed,
        ),
        (
            "moat_sandboxes_expired_total",
            "Sandboxes destroyed because their TTL passed.",
            &c.expired,
        ),
        (
            "moat_sandbox_create_failures_total",
            "Sandbox creations that failed.",
            &c.create_failures,
        ),
        (
            "moat_execs_total",
            "Commands run through the API.",
            &c.execs,
        ),
        (
            "moat_egress_allowed_total",
            "Connections the egress proxy let through.",
            &c.egress_allowed,
        ),
        (
            "moat_egress_denied_total",
            "Connections the egress proxy refused.",
            &c.egress_denied,
        ),
        (
            "moat_egress_denial_kills_total",
            "Sandboxes destroyed for too many denied connections.",
            &c.egress_kills,
        ),
        (
            "moat_http_requests_total",
            "HTTP requests answered.",
            &c.requests,
        ),
        (
            "moat_http_client_errors_total",
            "HTTP requests answered with a 4xx status.",
            &c.errors_4xx,
        ),
        (
            "moat_http_server_errors_total",
            "HTTP requests answered with a 5xx status.",
            &c.errors_5xx,
        ),
    ];
    for (name, help, v) in counters {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
            v.load(Ordering::Relaxed)
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
