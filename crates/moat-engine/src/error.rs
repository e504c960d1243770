//! The engine's one error type: what went wrong, as a kind the front ends map to their own
//! shape (an HTTP status, an MCP tool error, a CLI exit), a stable snake_case code and a
//! message that says what to do.

use moat_proto::ErrorCode;

use crate::agent_client::ClientError;

/// What kind of failure an [`EngineError`] is; each front end maps it once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (HTTP 400).
    BadRequest,
    /// No valid credentials (401).
    Unauthorized,
    /// Valid credentials without the right (403).
    Forbidden,
    /// No such thing, or another tenant's (404).
    NotFound,
    /// The thing is in the wrong state for it (409).
    Conflict,
    /// Over a size limit (413).
    TooLarge,
    /// Well-formed but cannot be done, e.g. the sandbox could not start (422).
    Unprocessable,
    /// The engine failed (500).
    Internal,
    /// Something it needs does not answer now (503).
    Unavailable,
}

/// An error of the engine, as a client should see it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct EngineError {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: String,
}

pub type EngineResult<T> = Result<T, EngineError>;

impl EngineError {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> EngineError {
        EngineError {
            kind,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> EngineError {
        EngineError::new(ErrorKind::BadRequest, "invalid_request", message)
    }

    pub fn unauthorized() -> EngineError {
        EngineError::new(
            ErrorKind::Unauthorized,
            "unauthorized",
            "missing, unknown, revoked or expired credentials: send `Authorization: Bearer \
             <key or token>` (the first admin key is in STATE_DIR/admin.key)",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> EngineError {
        EngineError::new(ErrorKind::Forbidden, "forbidden", message)
    }

    /// The same answer for a missing sandbox and for another tenant's: no existence oracle.
    pub fn no_sandbox(id: &str) -> EngineError {
        EngineError::new(
            ErrorKind::NotFound,
            "not_found",
            format!("no sandbox {id}: list yours with GET /v1/sandboxes"),
        )
    }

    pub fn not_found(message: impl Into<String>) -> EngineError {
        EngineError::new(ErrorKind::NotFound, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> EngineError {
        EngineError::new(ErrorKind::Conflict, code, message)
    }

    pub fn too_large(message: impl Into<String>) -> EngineError {
        EngineError::new(ErrorKind::TooLarge, "too_large", message)
    }

    pub fn internal(message: impl Into<String>) -> EngineError {
        EngineError::new(ErrorKind::Internal, "internal", message)
    }

    pub fn unavailable(message: impl Into<String>) -> EngineError {
        EngineError::new(ErrorKind::Unavailable, "unavailable", message)
    }
}

impl From<crate::store::StoreError> for EngineError {
    fn from(e: crate::store::StoreError) -> EngineError {
        EngineError::internal(format!("state database: {e}"))
    }
}

impl From<ClientError> for EngineError {
    fn from(e: ClientError) -> EngineError {
        match e {
            ClientError::Agent { code, message } => {
                let kind = match code {
                    ErrorCode::NotFound => ErrorKind::NotFound,
                    ErrorCode::PermissionDenied => ErrorKind::Forbidden,
                    ErrorCode::AlreadyExists | ErrorCode::NotEmpty | ErrorCode::Busy => {
                        ErrorKind::Conflict
                    }
                    ErrorCode::NotADirectory
                    | ErrorCode::IsADirectory
                    | ErrorCode::InvalidRequest => ErrorKind::BadRequest,
                    ErrorCode::TooLarge => ErrorKind::TooLarge,
                    ErrorCode::Cancelled => ErrorKind::Conflict,
                    ErrorCode::Internal => ErrorKind::Internal,
                };
                EngineError::new(kind, code.as_str(), message)
            }
            ClientError::Timeout => EngineError::unavailable(
                "the sandbox's agent did not answer in time: the sandbox may be paused or \
                 overloaded",
            ),
            other => EngineError::unavailable(format!(
                "the sandbox's agent is unreachable ({other}): the sandbox may have died; \
                 delete it and create a new one"
            )),
        }
    }
}
