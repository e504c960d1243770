/**
 * Errors thrown by the SDK. Every error the daemon answers carries its API error `code`
 * (snake_case, e.g. `not_found`, `sandbox_paused`) and its HTTP `status`.
 */

/** Base class of every error the SDK throws for an API or transport failure. */
export class MoatError extends Error {
  /** The API's error code, e.g. `not_found`, `sandbox_paused`, `connection_error`. */
  readonly code: string;
  /** The HTTP status of the answer; 0 when no answer came (see {@link MoatConnectionError}). */
  readonly status: number;

  constructor(message: string, code: string, status: number, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
    this.status = status;
  }
}

/** 400: the request was malformed (bad path, unknown field, bad value). */
export class InvalidRequestError extends MoatError {}
/** 401: no, unknown, revoked or expired credentials. */
export class AuthError extends MoatError {}
/** 403: the credentials are valid but lack the right (a token without the scope). */
export class ForbiddenError extends MoatError {}
/** 404: no such sandbox (or another key's), file or process. */
export class NotFoundError extends MoatError {}
/** 409: the sandbox is not in a state for this (`sandbox_paused`, `sandbox_not_running`), or the file exists. */
export class ConflictError extends MoatError {}
/** 413: a body or upload is over a limit. */
export class TooLargeError extends MoatError {}
/** 5xx: the daemon or the sandbox's agent failed (500 internal, 503 unavailable). */
export class ServerError extends MoatError {}
/** The daemon could not be reached at all (refused, reset, DNS failure). */
export class MoatConnectionError extends MoatError {}

/** The error class for an HTTP status. */
export function errorClassFor(status: number): typeof MoatError {
  switch (status) {
    case 400:
    case 415:
      return InvalidRequestError;
    case 401:
      return AuthError;
    case 403:
      return ForbiddenError;
    case 404:
      return NotFoundError;
    case 409:
      return ConflictError;
    case 413:
      return TooLargeError;
    default:
      return status >= 500 ? ServerError : MoatError;
  }
}

const CODE_STATUS: Record<string, number> = {
  invalid_request: 400,
  not_a_directory: 400,
  is_a_directory: 400,
  unauthorized: 401,
  forbidden: 403,
  permission_denied: 403,
  not_found: 404,
  conflict: 409,
  sandbox_paused: 409,
  sandbox_not_running: 409,
  already_exists: 409,
  not_empty: 409,
  busy: 409,
  cancelled: 409,
  too_large: 413,
  unsupported_media_type: 415,
  internal: 500,
  unavailable: 503,
};

/** An error from an `{"type":"error"}` line inside a stream, where no HTTP status applies. */
export function errorFromCode(code: string, message: string): MoatError {
  const status = CODE_STATUS[code] ?? 500;
  const Cls = errorClassFor(status);
  return new Cls(message, code, status);
}

/** An error from an HTTP answer's status and `{"error":{"code","message"}}` body. */
export function errorFromAnswer(status: number, bodyText: string, what: string): MoatError {
  let code = `http_${status}`;
  let message = bodyText.trim().slice(0, 2000) || `HTTP ${status}`;
  try {
    const parsed = JSON.parse(bodyText) as { error?: { code?: unknown; message?: unknown } };
    if (parsed && parsed.error && typeof parsed.error.code === 'string') {
      code = parsed.error.code;
      if (typeof parsed.error.message === 'string') message = parsed.error.message;
    }
  } catch {
    // Not JSON (a proxy's page, say): keep the text.
  }
  const Cls = errorClassFor(status);
  return new Cls(`${what}: ${message}`, code, status);
}
