/** The transport: one configured client per base URL and credential. */

import { Readable } from 'node:stream';
import { MoatConnectionError, MoatError, errorFromAnswer } from './errors.js';

/** Where the daemon is and how to authenticate to it. */
export interface ConnectionOptions {
  /** Base URL of `moat serve`; default `MOAT_URL`, else `http://127.0.0.1:7070`. */
  url?: string;
  /** An API key or a scoped token; default `MOAT_API_KEY`. */
  apiKey?: string;
}

/** What a request body may be. */
export type BodyInit =
  | string
  | Uint8Array
  | ReadableStream<Uint8Array>
  | NodeJS.ReadableStream
  | Readable;

export interface RequestOptions {
  query?: Record<string, string | number | boolean | undefined>;
  json?: unknown;
  body?: BodyInit;
  accept?: string;
  signal?: AbortSignal;
  /** What the call is, for error messages (e.g. `exec in sbx_..`). */
  what?: string;
}

const DEFAULT_URL = 'http://127.0.0.1:7070';

/** The HTTP client shared by a sandbox and its `files` and `processes`. */
export class Client {
  readonly url: string;
  readonly #apiKey: string | undefined;

  constructor(opts: ConnectionOptions = {}) {
    const url = opts.url ?? process.env.MOAT_URL ?? DEFAULT_URL;
    this.url = url.replace(/\/+$/, '');
    this.#apiKey = opts.apiKey ?? process.env.MOAT_API_KEY ?? undefined;
  }

  /** Whether a credential is configured. */
  get hasCredentials(): boolean {
    return !!this.#apiKey;
  }

  /** A client for the same daemon with another credential (e.g. a scoped token). */
  withKey(apiKey: string): Client {
    return new Client({ url: this.url, apiKey });
  }

  /** Sends a request; answers with the response when its status is 2xx, throws otherwise. */
  async request(method: string, path: string, opts: RequestOptions = {}): Promise<Response> {
    const u = new URL(this.url + path);
    for (const [k, v] of Object.entries(opts.query ?? {})) {
      if (v !== undefined) u.searchParams.set(k, String(v));
    }
    const headers: Record<string, string> = {};
    if (this.#apiKey) headers['authorization'] = `Bearer ${this.#apiKey}`;
    if (opts.accept) headers['accept'] = opts.accept;
    let body: string | Uint8Array | ReadableStream<Uint8Array> | undefined;
    let streamed = false;
    let bodyError: unknown;
    if (opts.json !== undefined) {
      headers['content-type'] = 'application/json';
      body = JSON.stringify(opts.json);
    } else if (opts.body !== undefined) {
      headers['content-type'] = 'application/octet-stream';
      const b = opts.body;
      if (typeof b === 'string' || b instanceof Uint8Array) {
        body = b;
      } else {
        streamed = true;
        body = watchErrors(toWebStream(b), (e) => {
          bodyError = e;
        });
      }
    }
    const what = opts.what ?? `${method} ${path}`;
    let resp: Response;
    try {
      const init: RequestInit & { duplex?: 'half' } = {
        method,
        headers,
        body: body as RequestInit['body'],
        signal: opts.signal,
      };
      if (streamed) init.duplex = 'half';
      resp = await fetch(u, init);
    } catch (e) {
      if (bodyError !== undefined) throw bodyError;
      throw transportError(e, this.url, what);
    }
    if (resp.ok) return resp;
    let text = '';
    try {
      text = await resp.text();
    } catch {
      // The body was cut off: the status is still the answer.
    }
    throw errorFromAnswer(resp.status, text, what);
  }

  /** A request whose answer is JSON (or empty, for 204). */
  async json<T>(method: string, path: string, opts: RequestOptions = {}): Promise<T> {
    const resp = await this.request(method, path, opts);
    if (resp.status === 204) return undefined as T;
    const text = await readText(resp, this.url, opts.what ?? `${method} ${path}`);
    if (!text) return undefined as T;
    try {
      return JSON.parse(text) as T;
    } catch {
      throw new MoatError(
        `${opts.what ?? path}: the daemon answered something that is not JSON: ${text.slice(0, 200)}`,
        'bad_response',
        resp.status,
      );
    }
  }
}

async function readText(resp: Response, url: string, what: string): Promise<string> {
  try {
    return await resp.text();
  } catch (e) {
    throw transportError(e, url, what);
  }
}

/** Turns a fetch failure into a {@link MoatConnectionError} (aborts pass through). */
export function transportError(e: unknown, url: string, what: string): unknown {
  if (e instanceof MoatError) return e;
  if (e instanceof Error && (e.name === 'AbortError' || e.name === 'TimeoutError')) return e;
  const cause = (e as { cause?: { code?: string; message?: string } })?.cause;
  const detail = cause?.code ?? cause?.message ?? (e instanceof Error ? e.message : String(e));
  return new MoatConnectionError(
    `${what}: cannot reach moat at ${url} (${detail}): is \`moat serve\` running? ` +
      'Set MOAT_URL (or pass url) to where it listens.',
    'connection_error',
    0,
    { cause: e },
  );
}

function isWebStream(b: unknown): b is ReadableStream<Uint8Array> {
  return typeof (b as ReadableStream).getReader === 'function';
}

/** Any supported stream as a web ReadableStream of bytes. */
export function toWebStream(
  b: ReadableStream<Uint8Array> | NodeJS.ReadableStream | Readable,
): ReadableStream<Uint8Array> {
  if (isWebStream(b)) return b;
  const node = b instanceof Readable ? b : Readable.from(b as AsyncIterable<unknown>);
  return Readable.toWeb(node) as unknown as ReadableStream<Uint8Array>;
}

/** Passes a stream through, noting its error (so that a local read failure is not
 * mistaken for the daemon being unreachable). Strings become UTF-8 bytes. */
function watchErrors(
  src: ReadableStream<Uint8Array>,
  onError: (e: unknown) => void,
): ReadableStream<Uint8Array> {
  const reader = src.getReader();
  const enc = new TextEncoder();
  return new ReadableStream<Uint8Array>({
    async pull(ctrl) {
      try {
        const { done, value } = await reader.read();
        if (done) {
          ctrl.close();
          return;
        }
        const chunk: unknown = value;
        if (typeof chunk === 'string') ctrl.enqueue(enc.encode(chunk));
        else if (chunk instanceof Uint8Array) ctrl.enqueue(chunk);
        else ctrl.enqueue(new Uint8Array(chunk as ArrayBuffer));
      } catch (e) {
        onError(e);
        ctrl.error(e);
      }
    },
    cancel(reason) {
      return reader.cancel(reason);
    },
  });
}

/** The lines of a byte stream, as they arrive. */
export async function* lines(body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const reader = body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, '');
        buf = buf.slice(nl + 1);
        yield line;
      }
    }
    buf += dec.decode();
    if (buf) yield buf;
  } finally {
    // Leaving early (a break in a for-await) closes the connection.
    await reader.cancel().catch(() => {});
  }
}
