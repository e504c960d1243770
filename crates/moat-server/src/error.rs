//! The API's one error shape: `{"error":{"code","message"}}` with a fitting HTTP status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use moat_proto::ErrorCode;

use crate::agent_client::ClientError;

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing, unknown, revoked or expired credentials: send `Authorization: Bearer \
             <key or token>` (the first admin key is in STATE_DIR/admin.key)",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// The same answer for a missing sandbox and for another tenant's: no existence oracle.
    pub fn no_sandbox(id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no sandbox {id}: list yours with GET /v1/sandboxes"),
        )
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<moat_engine::store::StoreError> for ApiError {
    fn from(e: moat_engine::store::StoreError) -> ApiError {
        ApiError::internal(format!("state database: {e}"))
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> ApiError {
        match e {
            ClientError::Agent { code, message } => {
                let status = match code {
                    ErrorCode::NotFound => StatusCode::NOT_FOUND,
                    ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
                    ErrorCode::AlreadyExists | ErrorCode::NotEmpty | ErrorCode::Busy => {
                        StatusCode::CONFLICT
                    }
                    ErrorCode::NotADirectory
                    | ErrorCode::IsADirectory
                    | ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
                    ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::Cancelled => StatusCode::CONFLICT,
                    ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
                };
                ApiError::new(status, code.as_str(), message)
            }
            ClientError::Timeout => ApiError::unavailable(
                "the sandbox's agent did not answer in time: the sandbox may be paused or \
                 overloaded",
            ),
            other => ApiError::unavailable(format!(
                "the sandbox's agent is unreachable ({other}): the sandbox may have died; \
                 delete it and create a new one"
            )),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
