/** Sandboxes, commands, background processes and files. */

import { createReadStream, createWriteStream } from 'node:fs';
import { stat as fsStat, unlink } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

import { MoatError, NotFoundError, errorFromCode } from './errors.js';
import { BodyInit, Client, ConnectionOptions, lines, transportError } from './http.js';
import {
  ExecResult,
  ExecStatus,
  FileEntry,
  Metrics,
  MoatEvent,
  ProcessInfo,
  SandboxInfo,
  SandboxState,
  Scope,
  StreamEvent,
  execResult,
  fileEntry,
  metrics,
  moatEvent,
  processInfo,
  sandboxInfo,
} from './types.js';

// Node 18.0-18.17 lacks the symbol `await using` looks for; newer Node defines it itself.
if (typeof (Symbol as { asyncDispose?: symbol }).asyncDispose !== 'symbol') {
  Object.defineProperty(Symbol, 'asyncDispose', { value: Symbol.for('nodejs.asyncDispose') });
}

/**
 * A command: an argv array (run as is), a string (run by `/bin/sh -c`), or either spelled
 * out as `{ cmd: [...] }` / `{ shell: "..." }`.
 */
export type Command = string | string[] | { cmd: string[] } | { shell: string };

function commandBody(c: Command): { cmd?: string[]; shell?: string } {
  if (typeof c === 'string') return { shell: c };
  if (Array.isArray(c)) return { cmd: c };
  if ('cmd' in c) return { cmd: c.cmd };
  return { shell: c.shell };
}

/** Options of a sandbox's creation. */
export interface CreateOptions extends ConnectionOptions {
  /** The policy, as JSON: the same fields as the TOML policy (`limits`, `net`, `fs`, ...). */
  policy?: Record<string, unknown>;
  /** Environment variables every command in the sandbox gets. */
  env?: Record<string, string>;
  /** Free-form labels (at most 64), to find the sandbox again with {@link Sandbox.list}. */
  metadata?: Record<string, string>;
  /** Seconds until the daemon destroys the sandbox (its TTL); the server's default otherwise. */
  timeoutS?: number;
  /** Isolation tier: `native` (the default) or `gvisor` where the server can run it. */
  tier?: string;
  /**
   * Values of the secrets the policy binds to hosts (`network.secrets`): the sandbox sees only
   * placeholders; the egress proxy puts the values into requests to those hosts.
   */
  secrets?: Record<string, string>;
}

export interface ConnectOptions extends ConnectionOptions {
  /** Check that the sandbox exists (needs the `read` scope with a token). Default true. */
  verify?: boolean;
}

export interface ListOptions extends ConnectionOptions {
  metadata?: Record<string, string>;
  state?: SandboxState;
}

export interface ExecOptions {
  /** Working directory (absolute, inside the sandbox). */
  cwd?: string;
  /** Extra environment variables for this command. */
  env?: Record<string, string>;
  /** The command's standard input. */
  stdin?: string | Uint8Array;
  /** Seconds before the command (and the sandbox's processes of it) is killed. */
  timeoutS?: number;
  /** Called with each chunk of stdout as it arrives (the command is then streamed). */
  onStdout?: (data: string, bytes: Uint8Array) => void;
  /** Called with each chunk of stderr as it arrives (the command is then streamed). */
  onStderr?: (data: string, bytes: Uint8Array) => void;
  /** Stops waiting (closes the connection). */
  abortSignal?: AbortSignal;
}

export interface TokenOptions {
  /** What the token may do: `exec`, `files:read`, `files:write`, `read`. */
  scopes: Scope[];
  /** Seconds the token is valid (default 900, at most 86400). */
  ttlS?: number;
}

export interface EventsOptions {
  /** Only events after this sequence number. */
  since?: number;
  /** At most this many (default 1000). */
  limit?: number;
}

const b64 = (b: Uint8Array): string => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('base64');
const utf8 = new TextDecoder('utf-8');
const enc = new TextEncoder();

/** Parses one NDJSON line of an exec or process-output stream. */
function streamEvent(line: string): StreamEvent | undefined {
  if (!line.trim()) return undefined;
  let w: Record<string, unknown>;
  try {
    w = JSON.parse(line) as Record<string, unknown>;
  } catch {
    throw new MoatError(`the daemon sent a stream line that is not JSON: ${line.slice(0, 200)}`, 'bad_response', 200);
  }
  switch (w.type) {
    case 'start':
      return { type: 'start', pid: w.pid as number };
    case 'stdout':
    case 'stderr': {
      let bytes: Uint8Array;
      let data: string;
      if (typeof w.data_b64 === 'string') {
        bytes = new Uint8Array(Buffer.from(w.data_b64, 'base64'));
        data = utf8.decode(bytes);
      } else {
        data = String(w.data ?? '');
        bytes = enc.encode(data);
      }
      return { type: w.type, data, bytes };
    }
    case 'exit': {
      const r = execResult(w);
      const { stdout: _o, stderr: _e, ...rest } = r;
      return { type: 'exit', ...rest };
    }
    case 'end':
      return { type: 'end' };
    case 'error':
      throw errorFromCode(String(w.code ?? 'internal'), String(w.message ?? 'stream error'));
    default:
      return undefined;
  }
}

async function* eventsOf(resp: Response, url: string, what: string): AsyncGenerator<StreamEvent> {
  if (!resp.body) return;
  try {
    for await (const line of lines(resp.body)) {
      const ev = streamEvent(line);
      if (ev) yield ev;
    }
  } catch (e) {
    throw transportError(e, url, what, true);
  }
}

/** Joins chunks and decodes them once, so that a character split across chunks survives. */
function joinText(chunks: Uint8Array[]): string {
  return utf8.decode(Buffer.concat(chunks));
}

function signalNumber(sig: number | NodeJS.Signals | string): number {
  if (typeof sig === 'number') return sig;
  const name = (sig.startsWith('SIG') ? sig : `SIG${sig}`).toUpperCase() as NodeJS.Signals;
  const n = osConstants.signals[name];
  if (n === undefined) throw new TypeError(`unknown signal ${sig}: use a number or a name like SIGTERM`);
  return n;
}

/** A sandbox on a `moat serve` daemon. Destroy it with {@link kill} (or `await using`). */
export class Sandbox {
  /** The sandbox's id (`sbx_...`). */
  readonly id: string;
  /** The daemon's base URL. */
  readonly url: string;
  /** Files inside the sandbox. */
  readonly files: Files;
  /** Background processes. */
  readonly processes: Processes;
  /** @internal */
  readonly client: Client;

  private constructor(client: Client, id: string) {
    this.client = client;
    this.id = id;
    this.url = client.url;
    this.files = new Files(this);
    this.processes = new Processes(this);
  }

  /** @internal */
  path(rest = ''): string {
    return `/v1/sandboxes/${encodeURIComponent(this.id)}${rest}`;
  }

  /** Creates a sandbox. */
  static async create(opts: CreateOptions = {}): Promise<Sandbox> {
    const client = new Client(opts);
    const body: Record<string, unknown> = {};
    if (opts.policy !== undefined) body.policy = opts.policy;
    if (opts.env !== undefined) body.env = opts.env;
    if (opts.metadata !== undefined) body.metadata = opts.metadata;
    if (opts.timeoutS !== undefined) body.timeout_s = opts.timeoutS;
    if (opts.tier !== undefined) body.tier = opts.tier;
    if (opts.secrets !== undefined) body.secrets = opts.secrets;
    const w = await client.json<Record<string, unknown>>('POST', '/v1/sandboxes', {
      json: body,
      what: 'create a sandbox',
    });
    return new Sandbox(client, String(w.id));
  }

  /** A handle on an existing sandbox (e.g. created by another process), by id. */
  static async connect(id: string, opts: ConnectOptions = {}): Promise<Sandbox> {
    const sb = new Sandbox(new Client(opts), id);
    if (opts.verify !== false) await sb.info();
    return sb;
  }

  /** The sandboxes this key owns (all of them for an admin key), optionally filtered. */
  static async list(opts: ListOptions = {}): Promise<SandboxInfo[]> {
    const client = new Client(opts);
    const query: Record<string, string> = {};
    if (opts.state) query.state = opts.state;
    for (const [k, v] of Object.entries(opts.metadata ?? {})) query[`metadata.${k}`] = v;
    const w = await client.json<{ sandboxes: Record<string, unknown>[] }>('GET', '/v1/sandboxes', {
      query,
      what: 'list sandboxes',
    });
    return w.sandboxes.map(sandboxInfo);
  }

  /** Creates a sandbox, runs `fn` with it, and destroys it whatever happens. */
  static async with<T>(opts: CreateOptions, fn: (sandbox: Sandbox) => Promise<T>): Promise<T> {
    const sb = await Sandbox.create(opts);
    let result: T;
    try {
      result = await fn(sb);
    } catch (e) {
      // The callback's error is the one to see; the sandbox goes all the same.
      await sb.kill().catch(() => {});
      throw e;
    }
    await sb.kill();
    return result;
  }

  /** For `await using sb = await Sandbox.create()`: destroys the sandbox. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }

  /** The sandbox's current description. */
  async info(): Promise<SandboxInfo> {
    return sandboxInfo(await this.client.json('GET', this.path(), { what: `get sandbox ${this.id}` }));
  }

  /** Destroys the sandbox and everything in it. Answers false when it was already gone. */
  async kill(): Promise<boolean> {
    try {
      await this.client.request('DELETE', this.path(), { what: `delete sandbox ${this.id}` });
      return true;
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  /** Sets the sandbox to expire `seconds` from now (capped by the daemon's maximum). */
  async setTimeout(seconds: number): Promise<SandboxInfo> {
    return sandboxInfo(
      await this.client.json('POST', this.path('/timeout'), {
        json: { timeout_s: Math.round(seconds) },
        what: `set the timeout of ${this.id}`,
      }),
    );
  }

  /** Freezes every process in the sandbox. */
  async pause(): Promise<SandboxInfo> {
    return sandboxInfo(await this.client.json('POST', this.path('/pause'), { what: `pause ${this.id}` }));
  }

  /** Thaws a paused sandbox. */
  async resume(): Promise<SandboxInfo> {
    return sandboxInfo(await this.client.json('POST', this.path('/resume'), { what: `resume ${this.id}` }));
  }

  /** CPU, memory, process count and disk use. */
  async metrics(): Promise<Metrics> {
    return metrics(await this.client.json('GET', this.path('/metrics'), { what: `metrics of ${this.id}` }));
  }

  /** The sandbox's audit events so far. */
  async events(opts: EventsOptions = {}): Promise<MoatEvent[]> {
    const w = await this.client.json<{ events: Record<string, unknown>[] }>('GET', this.path('/events'), {
      query: { since: opts.since, limit: opts.limit },
      what: `events of ${this.id}`,
    });
    return w.events.map(moatEvent);
  }

  /** The sandbox's audit events, then new ones as they happen (until `abortSignal` or a break). */
  async *followEvents(opts: { since?: number; abortSignal?: AbortSignal } = {}): AsyncGenerator<MoatEvent> {
    const what = `events of ${this.id}`;
    const resp = await this.client.request('GET', this.path('/events'), {
      query: { since: opts.since, follow: 1 },
      accept: 'text/event-stream',
      signal: opts.abortSignal,
      what,
    });
    if (!resp.body) return;
    let data: string[] = [];
    try {
      for await (const line of lines(resp.body)) {
        if (line === '') {
          if (data.length) {
            const ev = moatEvent(JSON.parse(data.join('\n')) as Record<string, unknown>);
            data = [];
            yield ev;
          }
        } else if (line.startsWith('data:')) {
          data.push(line.slice(5).replace(/^ /, ''));
        }
        // `id:` lines repeat the seq; `:` lines are keep-alives.
      }
    } catch (e) {
      throw transportError(e, this.url, what, true);
    }
  }

  /** Issues a token limited to this sandbox and the given scopes (needs an API key). */
  async createToken(opts: TokenOptions): Promise<string> {
    const body: Record<string, unknown> = { sandbox_id: this.id, scopes: opts.scopes };
    if (opts.ttlS !== undefined) body.ttl_s = opts.ttlS;
    const w = await this.client.json<{ token: string }>('POST', '/v1/tokens', {
      json: body,
      what: `create a token for ${this.id}`,
    });
    return w.token;
  }

  /**
   * Runs a command to its end and answers its result. With `onStdout`/`onStderr` the output
   * is streamed to them as it comes; the result still holds all of it.
   */
  async exec(cmd: Command, opts: ExecOptions = {}): Promise<ExecResult> {
    if (!opts.onStdout && !opts.onStderr) {
      return execResult(
        await this.client.json('POST', this.path('/exec'), {
          json: this.execBody(cmd, opts),
          signal: opts.abortSignal,
          what: `exec in ${this.id}`,
        }),
      );
    }
    const out: Uint8Array[] = [];
    const err: Uint8Array[] = [];
    for await (const ev of this.execStream(cmd, opts)) {
      if (ev.type === 'stdout') {
        out.push(ev.bytes);
        opts.onStdout?.(ev.data, ev.bytes);
      } else if (ev.type === 'stderr') {
        err.push(ev.bytes);
        opts.onStderr?.(ev.data, ev.bytes);
      } else if (ev.type === 'exit') {
        const { type: _t, ...rest } = ev;
        return { stdout: joinText(out), stderr: joinText(err), ...rest };
      }
    }
    throw new MoatError(`exec in ${this.id}: the stream ended without an exit event`, 'stream_cut', 0);
  }

  /** Runs a command, yielding `start`, `stdout`/`stderr` chunks as they happen, then `exit`. */
  async *execStream(cmd: Command, opts: Omit<ExecOptions, 'onStdout' | 'onStderr'> = {}): AsyncGenerator<StreamEvent> {
    const what = `exec in ${this.id}`;
    const resp = await this.client.request('POST', this.path('/exec'), {
      json: this.execBody(cmd, opts),
      accept: 'application/x-ndjson',
      signal: opts.abortSignal,
      what,
    });
    yield* eventsOf(resp, this.url, what);
  }

  private execBody(cmd: Command, opts: ExecOptions): Record<string, unknown> {
    const body: Record<string, unknown> = commandBody(cmd);
    if (opts.cwd !== undefined) body.cwd = opts.cwd;
    if (opts.env !== undefined) body.env = opts.env;
    if (typeof opts.stdin === 'string') body.stdin = opts.stdin;
    else if (opts.stdin instanceof Uint8Array) body.stdin_b64 = b64(opts.stdin);
    if (opts.timeoutS !== undefined) body.timeout_s = opts.timeoutS;
    return body;
  }
}

// ---- background processes ---------------------------------------------------------------

export interface StartOptions {
  cwd?: string;
  env?: Record<string, string>;
  /** Keep the process's stdin open for {@link Process.writeStdin}. Default false. */
  stdin?: boolean;
}

/** How a background process ended. */
export interface ProcessExit {
  exitCode: number | null;
  signal: number | null;
  status: ExecStatus;
  stdout: string;
  stderr: string;
}

/** The background processes of a sandbox. */
export class Processes {
  readonly #sb: Sandbox;

  constructor(sb: Sandbox) {
    this.#sb = sb;
  }

  /** Starts a process that runs on after the call returns. */
  async start(cmd: Command, opts: StartOptions = {}): Promise<Process> {
    const body: Record<string, unknown> = commandBody(cmd);
    if (opts.cwd !== undefined) body.cwd = opts.cwd;
    if (opts.env !== undefined) body.env = opts.env;
    if (opts.stdin !== undefined) body.stdin = opts.stdin;
    const w = await this.#sb.client.json<Record<string, unknown>>('POST', this.#sb.path('/processes'), {
      json: body,
      what: `start a process in ${this.#sb.id}`,
    });
    const info = processInfo(w);
    return new Process(this.#sb, info.pid, info.argv);
  }

  /** The sandbox's background processes, running and finished. */
  async list(): Promise<ProcessInfo[]> {
    const w = await this.#sb.client.json<{ processes: Record<string, unknown>[] }>(
      'GET',
      this.#sb.path('/processes'),
      { what: `list processes in ${this.#sb.id}` },
    );
    return w.processes.map(processInfo);
  }

  /** A handle on a background process by pid (no call is made). */
  get(pid: number): Process {
    return new Process(this.#sb, pid, []);
  }
}

/** A background process in a sandbox. */
export class Process {
  readonly pid: number;
  readonly argv: string[];
  readonly #sb: Sandbox;

  constructor(sb: Sandbox, pid: number, argv: string[]) {
    this.#sb = sb;
    this.pid = pid;
    this.argv = argv;
  }

  private path(rest: string): string {
    return this.#sb.path(`/processes/${this.pid}${rest}`);
  }

  /**
   * The process's output: `stdout`/`stderr` chunks, then `exit` when it has ended. With
   * `follow` (the default) it waits for more until the process ends; without, a process still
   * running ends the stream with `end`.
   */
  async *output(opts: { follow?: boolean; abortSignal?: AbortSignal } = {}): AsyncGenerator<StreamEvent> {
    const what = `output of process ${this.pid} in ${this.#sb.id}`;
    const resp = await this.#sb.client.request('GET', this.path('/output'), {
      query: { follow: opts.follow === false ? undefined : 1 },
      accept: 'application/x-ndjson',
      signal: opts.abortSignal,
      what,
    });
    yield* eventsOf(resp, this.#sb.url, what);
  }

  /** Waits for the process to end; answers how, with its output. */
  async wait(opts: { abortSignal?: AbortSignal } = {}): Promise<ProcessExit> {
    const out: Uint8Array[] = [];
    const err: Uint8Array[] = [];
    for await (const ev of this.output({ follow: true, abortSignal: opts.abortSignal })) {
      if (ev.type === 'stdout') out.push(ev.bytes);
      else if (ev.type === 'stderr') err.push(ev.bytes);
      else if (ev.type === 'exit') {
        return {
          exitCode: ev.exitCode,
          signal: ev.signal,
          status: ev.status,
          stdout: joinText(out),
          stderr: joinText(err),
        };
      }
    }
    throw new MoatError(`process ${this.pid}: its output ended without an exit event`, 'stream_cut', 0);
  }

  /** Writes to the process's stdin (started with `stdin: true`); `close` sends EOF after. */
  async writeStdin(data: string | Uint8Array, opts: { close?: boolean } = {}): Promise<number> {
    const w = await this.#sb.client.json<{ bytes: number }>('POST', this.path('/stdin'), {
      query: { close: opts.close ? 1 : undefined },
      body: typeof data === 'string' ? enc.encode(data) : data,
      what: `stdin of process ${this.pid} in ${this.#sb.id}`,
    });
    return w.bytes;
  }

  /** Closes the process's stdin (EOF). */
  async closeStdin(): Promise<void> {
    await this.writeStdin(new Uint8Array(0), { close: true });
  }

  /** Sends a signal: a number or a name (`SIGTERM`, `TERM`). */
  async signal(sig: number | NodeJS.Signals | string = 'SIGTERM'): Promise<void> {
    await this.#sb.client.json('POST', this.path('/signal'), {
      json: { signal: signalNumber(sig) },
      what: `signal process ${this.pid} in ${this.#sb.id}`,
    });
  }

  /** SIGKILL. */
  async kill(): Promise<void> {
    await this.signal(9);
  }

  /** The process's current description. */
  async info(): Promise<ProcessInfo> {
    const p = (await this.#sb.processes.list()).find((p) => p.pid === this.pid);
    if (!p) throw new NotFoundError(`no process ${this.pid} in ${this.#sb.id}`, 'not_found', 404);
    return p;
  }
}

// ---- files --------------------------------------------------------------------------------

export interface WriteOptions {
  /** Permission bits, e.g. `0o644` or `"0644"`. */
  mode?: number | string;
}

function modeString(m: number | string | undefined): string | undefined {
  if (m === undefined) return undefined;
  return typeof m === 'number' ? m.toString(8).padStart(4, '0') : m;
}

/** The files of a sandbox. Paths are absolute paths inside it. */
export class Files {
  readonly #sb: Sandbox;

  constructor(sb: Sandbox) {
    this.#sb = sb;
  }

  private async get(path: string, abortSignal?: AbortSignal): Promise<Response> {
    return this.#sb.client.request('GET', this.#sb.path('/files'), {
      query: { path },
      signal: abortSignal,
      what: `read ${path} in ${this.#sb.id}`,
    });
  }

  /** A file's content, as a stream (nothing is held in memory). */
  async readStream(path: string, opts: { abortSignal?: AbortSignal } = {}): Promise<ReadableStream<Uint8Array>> {
    const resp = await this.get(path, opts.abortSignal);
    return resp.body ?? new ReadableStream({ start: (c) => c.close() });
  }

  /** A file's content. */
  async read(path: string, opts: { abortSignal?: AbortSignal } = {}): Promise<Uint8Array> {
    const resp = await this.get(path, opts.abortSignal);
    try {
      return new Uint8Array(await resp.arrayBuffer());
    } catch (e) {
      throw transportError(e, this.#sb.url, `read ${path} in ${this.#sb.id}`, true);
    }
  }

  /** A file's content as UTF-8 text. */
  async readText(path: string, opts: { abortSignal?: AbortSignal } = {}): Promise<string> {
    return utf8.decode(await this.read(path, opts));
  }

  /**
   * Writes a file (parents are created), streaming `data` when it is a stream. Answers the
   * bytes written.
   */
  async write(path: string, data: BodyInit, opts: WriteOptions = {}): Promise<{ path: string; bytes: number }> {
    return this.#sb.client.json('PUT', this.#sb.path('/files'), {
      query: { path, mode: modeString(opts.mode) },
      body: typeof data === 'string' ? enc.encode(data) : data,
      what: `write ${path} in ${this.#sb.id}`,
    });
  }

  /** Copies a local file into the sandbox, streamed from disk. */
  async upload(localPath: string, remotePath: string, opts: WriteOptions = {}): Promise<{ path: string; bytes: number }> {
    await fsStat(localPath); // a missing local file is the caller's error, said plainly
    return this.write(remotePath, createReadStream(localPath, { highWaterMark: 1 << 20 }), opts);
  }

  /** Copies a file out of the sandbox to a local path, streamed to disk. Answers its size. */
  async download(remotePath: string, localPath: string, opts: { abortSignal?: AbortSignal } = {}): Promise<number> {
    const resp = await this.get(remotePath, opts.abortSignal);
    let bytes = 0;
    const body = resp.body ?? new ReadableStream<Uint8Array>({ start: (c) => c.close() });
    const src = Readable.fromWeb(body as import('node:stream/web').ReadableStream<Uint8Array>);
    src.on('data', (c: Buffer) => {
      bytes += c.length;
    });
    try {
      await pipeline(src, createWriteStream(localPath));
    } catch (e) {
      await unlink(localPath).catch(() => {});
      throw transportError(e, this.#sb.url, `download ${remotePath} from ${this.#sb.id}`, true);
    }
    return bytes;
  }

  /** A directory's entries, `depth` levels down (default 1, at most 16). */
  async list(path: string, opts: { depth?: number } = {}): Promise<FileEntry[]> {
    const w = await this.#sb.client.json<{ entries: Record<string, unknown>[]; truncated: boolean }>(
      'GET',
      this.#sb.path('/files/list'),
      { query: { path, depth: opts.depth }, what: `list ${path} in ${this.#sb.id}` },
    );
    return w.entries.map(fileEntry);
  }

  /** One file's description. */
  async stat(path: string): Promise<FileEntry> {
    return fileEntry(
      await this.#sb.client.json('GET', this.#sb.path('/files/stat'), {
        query: { path },
        what: `stat ${path} in ${this.#sb.id}`,
      }),
    );
  }

  /** Whether a path exists. */
  async exists(path: string): Promise<boolean> {
    try {
      await this.stat(path);
      return true;
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  /** Creates a directory (with its parents unless `parents: false`). */
  async mkdir(path: string, opts: { parents?: boolean } = {}): Promise<void> {
    await this.#sb.client.json('POST', this.#sb.path('/files/mkdir'), {
      json: { path, parents: opts.parents ?? true },
      what: `mkdir ${path} in ${this.#sb.id}`,
    });
  }

  /** Renames or moves a file or directory. */
  async move(from: string, to: string): Promise<void> {
    await this.#sb.client.json('POST', this.#sb.path('/files/move'), {
      json: { from, to },
      what: `move ${from} to ${to} in ${this.#sb.id}`,
    });
  }

  /** Removes a file, or a directory (`recursive` for a non-empty one). */
  async remove(path: string, opts: { recursive?: boolean } = {}): Promise<void> {
    await this.#sb.client.request('DELETE', this.#sb.path('/files'), {
      query: { path, recursive: opts.recursive ? 1 : undefined },
      what: `remove ${path} in ${this.#sb.id}`,
    });
  }
}
