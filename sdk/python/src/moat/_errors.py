"""Typed exceptions: every API error carries the API's error code and the HTTP status."""

from __future__ import annotations

from typing import Dict, Optional, Type

__all__ = [
    "MoatError",
    "AuthError",
    "ForbiddenError",
    "NotFoundError",
    "ConflictError",
    "InvalidRequestError",
    "TooLargeError",
    "ServerError",
    "ConnectionError",
    "TimeoutError",
    "error_for",
]


class MoatError(Exception):
    """Base of every error this SDK raises.

    ``code`` is the API's snake_case error code (``"not_found"``, ``"sandbox_paused"``, ...),
    ``status`` the HTTP status (``None`` when no HTTP answer came back).
    """

    code: Optional[str]
    status: Optional[int]
    message: str

    def __init__(self, message: str, *, code: Optional[str] = None, status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __str__(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(str(self.status))
        if self.code:
            parts.append(self.code)
        prefix = " ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, message={self.message!r})"


class AuthError(MoatError):
    """401: missing, unknown, revoked or expired API key or token."""


class ForbiddenError(MoatError):
    """403: the credentials are valid but lack the permission (e.g. a token's scope)."""


class NotFoundError(MoatError):
    """404: no such sandbox (or another key's), process, file or route."""


class ConflictError(MoatError):
    """409: the sandbox is not in a state for this call (``sandbox_paused``, ``sandbox_not_running``),
    or a file conflict (``already_exists``, ``not_empty``)."""


class InvalidRequestError(MoatError):
    """400 (also 415, 422): the request was malformed or refused as given."""


class TooLargeError(MoatError):
    """413: a body or file over a limit."""


class ServerError(MoatError):
    """5xx: the daemon or the sandbox's agent failed; the message says what to do."""


class ConnectionError(MoatError):  # noqa: A001 - deliberately the SDK's own name
    """The daemon could not be reached (not running, wrong MOAT_URL, connection dropped)."""


class TimeoutError(MoatError):  # noqa: A001
    """The daemon did not answer within the client-side timeout."""


_BY_STATUS: Dict[int, Type[MoatError]] = {
    400: InvalidRequestError,
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: TooLargeError,
    415: InvalidRequestError,
    422: InvalidRequestError,
}

_BY_CODE: Dict[str, Type[MoatError]] = {
    "invalid_request": InvalidRequestError,
    "unauthorized": AuthError,
    "forbidden": ForbiddenError,
    "permission_denied": ForbiddenError,
    "not_found": NotFoundError,
    "sandbox_paused": ConflictError,
    "sandbox_not_running": ConflictError,
    "too_large": TooLargeError,
    "internal": ServerError,
    "unavailable": ServerError,
}


def error_for(status: Optional[int], code: Optional[str], message: str) -> MoatError:
    """The exception for an API error answer (or for an ``error`` event mid-stream, status None)."""
    cls: Type[MoatError] = MoatError
    if status is not None:
        if status in _BY_STATUS:
            cls = _BY_STATUS[status]
        elif status >= 500:
            cls = ServerError
    elif code is not None:
        cls = _BY_CODE.get(code, MoatError)
    return cls(message, code=code, status=status)
