//! The API's one error shape: `{"error":{"code","message"}}` with a fitting HTTP status. Every
//! error is the engine's ([`EngineError`]); this maps its kind to a status, once.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use moat_engine::agent_client::ClientError;
use moat_engine::error::{EngineError, ErrorKind};

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The HTTP status of each kind of engine error.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
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
        EngineError::bad_request(message).into()
    }

    pub fn unauthorized() -> ApiError {
        EngineError::unauthorized().into()
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        EngineError::forbidden(message).into()
    }

    /// The same answer for a missing sandbox and for another tenant's: no existence oracle.
    pub fn no_sandbox(id: &str) -> ApiError {
        EngineError::no_sandbox(id).into()
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        EngineError::not_found(message).into()
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        EngineError::conflict(code, message).into()
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        EngineError::too_large(message).into()
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        EngineError::internal(message).into()
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        EngineError::unavailable(message).into()
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

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        ApiError::new(status_of(e.kind), e.code, e.message)
    }
}

impl From<moat_engine::store::StoreError> for ApiError {
    fn from(e: moat_engine::store::StoreError) -> ApiError {
        EngineError::from(e).into()
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> ApiError {
        EngineError::from(e).into()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
