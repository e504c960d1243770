/**
 * moat-sdk: run code in moat sandboxes from Node.
 *
 * ```ts
 * import { Sandbox } from 'moat-sdk';
 * await using sb = await Sandbox.create();
 * const r = await sb.exec('echo hello');
 * ```
 */

import { Client, ConnectionOptions } from './http.js';

export {
  MoatError,
  AuthError,
  ForbiddenError,
  NotFoundError,
  ConflictError,
  InvalidRequestError,
  TooLargeError,
  ServerError,
  MoatConnectionError,
} from './errors.js';
export type { ConnectionOptions, BodyInit } from './http.js';
export { Sandbox, Files, Processes, Process } from './sandbox.js';
export type {
  Command,
  CreateOptions,
  ConnectOptions,
  ListOptions,
  ExecOptions,
  TokenOptions,
  EventsOptions,
  StartOptions,
  ProcessExit,
  WriteOptions,
} from './sandbox.js';
export type {
  SandboxState,
  SandboxInfo,
  ExecStatus,
  ExecResult,
  Layers,
  StreamEvent,
  ProcessInfo,
  FileEntry,
  Metrics,
  MoatEvent,
  Scope,
} from './types.js';

/** The daemon's health (no credentials needed): `{status: "ok", version}`. */
export async function health(opts: ConnectionOptions = {}): Promise<{ status: string; version: string }> {
  return new Client(opts).json('GET', '/v1/health', { what: 'health' });
}
