//! `/v1/templates`: the daemon's templates (root filesystems from OCI images). Listing and
//! reading take any key; pulling and removing take the admin key.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use moat_engine::lifecycle::Engine;
use moat_engine::templates::PullOptions;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiResult;
use crate::http::{parse_json, Auth};

pub async fn list(State(app): State<Arc<Engine>>, Auth(_caller): Auth) -> ApiResult<Json<Value>> {
    let list = app.templates().await?;
    Ok(Json(json!({ "templates": list })))
}

pub async fn get(
    State(app): State<Arc<Engine>>,
    Auth(_caller): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(app.template(&name).await?)))
}

pub async fn remove(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    app.remove_template(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PullBody {
    /// The image reference, e.g. `python:3.12-slim` or `127.0.0.1:5000/x:1`.
    reference: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    platform: Option<String>,
}

pub async fn pull(
    State(app): State<Arc<Engine>>,
    Auth(caller): Auth,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: PullBody = parse_json(&headers, &body)?;
    let opts = PullOptions {
        name: b.name,
        insecure: b.insecure,
        platform: b.platform,
        ..PullOptions::default()
    };
    let t = app.pull_template(&caller, &b.reference, opts).await?;
    Ok((StatusCode::CREATED, Json(json!(t))))
}
