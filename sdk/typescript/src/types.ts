/** The API's objects, with camelCase fields. Times are milliseconds since the Unix epoch. */

export type SandboxState = 'creating' | 'running' | 'paused' | 'stopping' | 'stopped' | 'failed';

/** How a command ended. Never a bare exit code to decode. */
export type ExecStatus =
  | 'ok'
  | 'timeout'
  | 'oom'
  | 'output_limit'
  | 'killed'
  | 'policy_denied'
  | 'error';

/** A sandbox as the daemon describes it. */
export interface SandboxInfo {
  id: string;
  state: SandboxState;
  tier: string;
  createdAt: number;
  expiresAt: number;
  metadata: Record<string, string>;
  /** Why it failed, when `state` is `failed`. */
  error: string | null;
}

/** The isolation layers that were in force while a command ran. */
export interface Layers {
  tier: string;
  landlockAbi: number;
  seccomp: boolean;
  cgroup: string;
  missing: string[];
}

/** The result of one command (the same object as `moat run --json`). */
export interface ExecResult {
  stdout: string;
  stderr: string;
  /** The exit code, or null when a signal killed the command. */
  exitCode: number | null;
  signal: number | null;
  status: ExecStatus;
  wallMs: number;
  cpuMs: number;
  maxRssKb: number;
  truncated: { stdout: boolean; stderr: boolean };
  /** Why, when `status` is not `ok`. */
  message?: string;
  sandbox: Layers;
}

/** One event of a streamed command or a background process's output. */
export type StreamEvent =
  | { type: 'start'; pid: number }
  | {
      type: 'stdout' | 'stderr';
      /** The chunk as text (invalid UTF-8 replaced). */
      data: string;
      /** The chunk's exact bytes. */
      bytes: Uint8Array;
    }
  | ({ type: 'exit' } & Omit<ExecResult, 'stdout' | 'stderr'>)
  /** A background process still running when the output was read without following. */
  | { type: 'end' };

/** A background process. */
export interface ProcessInfo {
  pid: number;
  argv: string[];
  running: boolean;
  exitCode: number | null;
  signal: number | null;
  status: ExecStatus | null;
  startedAt: number;
  finishedAt: number | null;
}

/** A file, directory or link in a sandbox. */
export interface FileEntry {
  path: string;
  kind: 'file' | 'dir' | 'symlink' | 'other';
  size: number;
  mode: number;
  mtimeMs: number;
}

/** A sandbox's resource use. */
export interface Metrics {
  /** CPU time used; null when the sandbox has no cgroup to measure. */
  cpuMs: number | null;
  memoryBytes: number | null;
  pids: number | null;
  /** Bytes in its writable filesystems; null when not running. */
  diskBytes: number | null;
}

/** An audit event. */
export interface MoatEvent {
  seq: number;
  ts: number;
  keyId: string | null;
  sandboxId: string | null;
  kind: string;
  data: unknown;
}

export type Scope = 'exec' | 'files:read' | 'files:write' | 'read';

// ---- wire conversion ----------------------------------------------------------------------

/* eslint-disable @typescript-eslint/no-explicit-any */
type Wire = Record<string, any>;

export function sandboxInfo(w: Wire): SandboxInfo {
  return {
    id: w.id,
    state: w.state,
    tier: w.tier,
    createdAt: w.created_at,
    expiresAt: w.expires_at,
    metadata: w.metadata ?? {},
    error: w.error ?? null,
  };
}

function layers(w: Wire | undefined): Layers {
  return {
    tier: w?.tier ?? '',
    landlockAbi: w?.landlock_abi ?? 0,
    seccomp: w?.seccomp ?? false,
    cgroup: w?.cgroup ?? '',
    missing: w?.missing ?? [],
  };
}

export function execResult(w: Wire): ExecResult {
  const r: ExecResult = {
    stdout: w.stdout ?? '',
    stderr: w.stderr ?? '',
    exitCode: w.exit_code ?? null,
    signal: w.signal ?? null,
    status: w.status,
    wallMs: w.wall_ms ?? 0,
    cpuMs: w.cpu_ms ?? 0,
    maxRssKb: w.max_rss_kb ?? 0,
    truncated: { stdout: !!w.truncated?.stdout, stderr: !!w.truncated?.stderr },
    sandbox: layers(w.sandbox),
  };
  if (w.message != null) r.message = w.message;
  return r;
}

export function processInfo(w: Wire): ProcessInfo {
  return {
    pid: w.pid,
    argv: w.argv ?? [],
    running: !!w.running,
    exitCode: w.exit_code ?? null,
    signal: w.signal ?? null,
    status: w.status ?? null,
    startedAt: w.started_at,
    finishedAt: w.finished_at ?? null,
  };
}

export function fileEntry(w: Wire): FileEntry {
  return { path: w.path, kind: w.kind, size: w.size, mode: w.mode, mtimeMs: w.mtime_ms };
}

export function metrics(w: Wire): Metrics {
  return {
    cpuMs: w.cpu_ms ?? null,
    memoryBytes: w.memory_bytes ?? null,
    pids: w.pids ?? null,
    diskBytes: w.disk_bytes ?? null,
  };
}

export function moatEvent(w: Wire): MoatEvent {
  return {
    seq: w.seq,
    ts: w.ts,
    keyId: w.key_id ?? null,
    sandboxId: w.sandbox_id ?? null,
    kind: w.kind,
    data: w.data ?? null,
  };
}
