/** The transport: one configured client per base URL and credential. */

import http from 'node:http';
import https from 'node:https';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
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
    let body: string | Uint8Array | undefined;
    let streamed = false;
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
      }
    }
    const what = opts.what ?? `${method} ${path}`;
    let resp: Response;
    if (streamed) {
      resp = await this.#streamUpload(method, u, headers, opts.body as StreamBody, what);
    } else try {
      resp = await fetch(u, { method, headers, body, signal: opts.signal });
    } catch (e) {
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

  /**
   * Sends a streamed body with node:http, which reads the source only as fast as the socket
   * takes it (fetch on Node 20 holds every chunk of a streamed body until the request ends).
   * The answer (small JSON) is read whole.
   */
  #streamUpload(
    method: string,
    u: URL,
    headers: Record<string, string>,
    src: StreamBody,
    what: string,
  ): Promise<Response> {
    const node = toNodeStream(src);
    const mod = u.protocol === 'https:' ? https : http;
    return new Promise<Response>((resolve, reject) => {
      let settled = false;
      const fail = (e: unknown) => {
        if (settled) return;
        settled = true;
        reject(e);
      };
      const req = mod.request(u, { method, headers }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', (e) => fail(transportError(e, this.url, what, true)));
        res.on('end', () => {
          if (settled) return;
          settled = true;
          const status = res.statusCode ?? 500;
          const text = Buffer.concat(chunks).toString('utf8');
          const h = new Headers();
          for (const [k, v] of Object.entries(res.headers)) {
            if (typeof v === 'string') h.set(k, v);
          }
          resolve(new Response(status === 204 ? null : text, { status, headers: h }));
        });
      });
      req.on('error', (e) => fail(transportError(e, this.url, what)));
      node.on('error', (e) => {
        // The local source failed: that error, not a transport one.
        fail(e);
        req.destroy();
      });
      // An answer before the whole body went (a refusal) ends the upload: the pipe's error
      // then is only the connection closing, and the answer is what counts.
      pipeline(node, req).catch(() => {});
    }).then((resp) => {
      if (resp.ok) return resp;
      return resp.text().then((t) => {
        throw errorFromAnswer(resp.status, t, what);
      });
    });
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
    throw transportError(e, url, what, true);
  }
}

/** Turns a fetch failure into a {@link MoatConnectionError} (aborts pass through). */
export function transportError(e: unknown, url: string, what: string, midStream = false): unknown {
  if (e instanceof MoatError) return e;
  if (e instanceof Error && (e.name === 'AbortError' || e.name === 'TimeoutError')) return e;
  const cause = (e as { cause?: { code?: string; message?: string } })?.cause;
  const own = (e as { code?: string })?.code;
  const detail = cause?.code ?? cause?.message ?? own ?? (e instanceof Error ? e.message : String(e));
  if (midStream) {
    return new MoatConnectionError(
      `${what}: the connection to moat at ${url} broke mid-transfer (${detail}); ` +
        'nothing after that point arrived: retry the call',
      'connection_broken',
      0,
      { cause: e },
    );
  }
  return new MoatConnectionError(
    `${what}: cannot reach moat at ${url} (${detail}): is \`moat serve\` running? ` +
      'Set MOAT_URL (or pass url) to where it listens.',
    'connection_error',
    0,
    { cause: e },
  );
}

type StreamBody = ReadableStream<Uint8Array> | NodeJS.ReadableStream | Readable;

function isWebStream(b: unknown): b is ReadableStream<Uint8Array> {
  return typeof (b as ReadableStream).getReader === 'function';
}

/** Any supported stream as a Node Readable. */
function toNodeStream(b: StreamBody): Readable {
  if (isWebStream(b)) return Readable.fromWeb(b as import('node:stream/web').ReadableStream<Uint8Array>);
  if (b instanceof Readable) return b;
  return Readable.from(b as AsyncIterable<unknown>);
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
