/**
 * moat-sdk against a real `moat serve` (from $MOAT_BIN): every method, streaming, each error
 * class for real, a 100 MiB round trip, token scopes.
 */

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { once } from 'node:events';

import {
  AuthError,
  ConflictError,
  ForbiddenError,
  InvalidRequestError,
  MoatConnectionError,
  MoatError,
  NotFoundError,
  Sandbox,
  ServerError,
  StreamEvent,
  TooLargeError,
  health,
} from 'moat-sdk';

import { Daemon, startDaemon } from './daemon.js';

/** The tier this run tests: `$MOAT_TIER` (the daemon's default tier), as the Rust suite. */
const TIER = process.env.MOAT_TIER === 'gvisor' ? 'gvisor' : 'native';

let daemon: Daemon;
let local: string;
/** Every sandbox a test made, to prove at the end that none is left. */
const made: string[] = [];

async function create(opts: Parameters<typeof Sandbox.create>[0] = {}): Promise<Sandbox> {
  const sb = await Sandbox.create(opts);
  made.push(sb.id);
  return sb;
}

async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** Asserts that `p` rejects with an instance of `cls` carrying `status` (and `code`). */
async function rejectsWith(
  p: Promise<unknown>,
  cls: new (...a: never[]) => MoatError,
  status: number,
  code?: string,
): Promise<MoatError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof cls, `expected ${cls.name}, got ${(e as Error)?.constructor?.name}: ${e}`);
    assert.ok(e instanceof MoatError);
    assert.equal(e.status, status, String(e));
    if (code) assert.equal(e.code, code, String(e));
    assert.ok(e.message.length > 0);
    return e;
  }
  assert.fail(`expected ${cls.name}, but the call succeeded`);
}

before(async () => {
  daemon = await startDaemon();
  process.env.MOAT_URL = daemon.url;
  process.env.MOAT_API_KEY = daemon.key;
  local = mkdtempSync(join(tmpdir(), 'moat-sdk-ts-local-'));
});

after(async () => {
  if (daemon) await daemon.stop();
  if (local) rmSync(local, { recursive: true, force: true });
});

test('the package has no runtime dependencies and ships its types', () => {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8'));
  assert.equal(pkg.name, 'moat-sdk');
  assert.equal(pkg.type, 'module');
  assert.equal(pkg.dependencies, undefined);
  assert.deepEqual(Object.keys(pkg.devDependencies).sort(), ['@types/node', 'typescript']);
  assert.equal(pkg.types, './dist/index.d.ts');
  assert.ok(statSync(new URL('../../dist/index.d.ts', import.meta.url)).size > 0);
});

describe('sandboxes', () => {
  test('health needs no key', async () => {
    const h = await health({ apiKey: 'nonsense' });
    assert.equal(h.status, 'ok');
    assert.match(h.version, /^\d+\.\d+/);
  });

  test('create, info, connect, list, setTimeout, metrics, kill', async () => {
    const tag = `t${Date.now()}`;
    const sb = await create({ metadata: { suite: 'ts', tag }, env: { GREETING: 'hi' }, timeoutS: 120 });
    assert.match(sb.id, /^sbx_/);
    assert.equal(sb.url, daemon.url);
    const info = await sb.info();
    assert.equal(info.id, sb.id);
    assert.equal(info.state, 'running');
    assert.equal(info.tier, TIER);
    assert.deepEqual(info.metadata, { suite: 'ts', tag });
    assert.equal(info.error, null);
    assert.ok(info.expiresAt - info.createdAt >= 119_000 && info.expiresAt - info.createdAt <= 121_000);

    // Environment given at creation reaches every command.
    assert.equal((await sb.exec('echo $GREETING')).stdout, 'hi\n');

    const again = await Sandbox.connect(sb.id);
    assert.equal((await again.info()).id, sb.id);

    const byTag = await Sandbox.list({ metadata: { tag } });
    assert.deepEqual(
      byTag.map((s) => s.id),
      [sb.id],
    );
    assert.equal((await Sandbox.list({ metadata: { tag: 'no-such-tag' } })).length, 0);
    assert.ok((await Sandbox.list({ state: 'running' })).some((s) => s.id === sb.id));
    assert.ok(!(await Sandbox.list({ state: 'paused' })).some((s) => s.id === sb.id));

    const before = Date.now();
    const t = await sb.setTimeout(600);
    assert.ok(Math.abs(t.expiresAt - (before + 600_000)) < 5_000, `expires_at ${t.expiresAt}`);

    const m = await sb.metrics();
    assert.equal(typeof m.diskBytes, 'number');
    for (const v of [m.cpuMs, m.memoryBytes, m.pids]) assert.ok(v === null || typeof v === 'number');

    assert.equal(await sb.kill(), true);
    assert.equal(await sb.kill(), false, 'a second kill finds it gone');
    await rejectsWith(sb.info(), NotFoundError, 404, 'not_found');
  });

  test('secrets go to the daemon; the sandbox sees a placeholder', async () => {
    const policy = {
      network: { mode: 'allowlist', allow: ['api.example.com'], secrets: { API_KEY: ['api.example.com'] } },
    };
    await Sandbox.with({ policy, secrets: { API_KEY: 'sk-ts-value' } }, async (sb) => {
      made.push(sb.id);
      const r = await sb.exec(['sh', '-c', 'echo $API_KEY']);
      assert.equal(r.exitCode, 0);
      assert.match(r.stdout, /^moat-placeholder-api_key-[0-9a-f]{32}\n$/);
      assert.ok(!JSON.stringify(await sb.info()).includes('sk-ts-value'));
    });
  });

  test('pause and resume', async () => {
    await Sandbox.with({}, async (sb) => {
      made.push(sb.id);
      assert.equal((await sb.pause()).state, 'paused');
      assert.equal((await sb.info()).state, 'paused');
      await rejectsWith(sb.exec(['true']), ConflictError, 409, 'sandbox_paused');
      assert.equal((await sb.resume()).state, 'running');
      assert.equal((await sb.exec(['true'])).exitCode, 0);
    });
  });

  test('Sandbox.with destroys the sandbox, also when the callback throws', async () => {
    let id = '';
    const v = await Sandbox.with({}, async (sb) => {
      id = sb.id;
      made.push(id);
      return (await sb.exec(['echo', 'x'])).stdout;
    });
    assert.equal(v, 'x\n');
    await rejectsWith(Sandbox.connect(id), NotFoundError, 404);

    await assert.rejects(
      Sandbox.with({}, async (sb) => {
        id = sb.id;
        made.push(id);
        throw new Error('boom');
      }),
      /boom/,
    );
    await rejectsWith(Sandbox.connect(id), NotFoundError, 404);
  });

  test('await using destroys the sandbox at the end of the block', async () => {
    let id = '';
    {
      await using sb = await create();
      id = sb.id;
      assert.equal((await sb.info()).state, 'running');
    }
    await rejectsWith(Sandbox.connect(id), NotFoundError, 404);
  });

  test('events: listed and followed', async () => {
    await using sb = await create();
    await sb.exec(['true']);
    const evs = await sb.events();
    const kinds = evs.map((e) => e.kind);
    assert.ok(kinds.includes('sandbox_created'), kinds.join(','));
    assert.ok(kinds.includes('exec_finished'), kinds.join(','));
    for (const e of evs) {
      assert.equal(e.sandboxId, sb.id);
      assert.equal(typeof e.seq, 'number');
      assert.equal(typeof e.ts, 'number');
    }
    assert.equal((await sb.events({ limit: 1 })).length, 1);
    const last = evs[evs.length - 1]!.seq;
    assert.equal((await sb.events({ since: last })).length, 0);

    // Follow: history first, then a live event caused after the stream opened.
    const ac = new AbortController();
    const seen: string[] = [];
    const follower = (async () => {
      for await (const e of sb.followEvents({ since: last, abortSignal: ac.signal })) {
        seen.push(e.kind);
        if (e.kind === 'exec_finished') break;
      }
    })();
    await new Promise((r) => setTimeout(r, 300));
    await sb.exec(['true']);
    await Promise.race([
      follower,
      new Promise((_, rej) => setTimeout(() => rej(new Error(`no live event; saw ${seen}`)), 10_000)),
    ]);
    ac.abort();
    assert.ok(seen.includes('exec_finished'));
  });
});

describe('exec', () => {
  let sb: Sandbox;
  before(async () => {
    sb = await create();
  });
  after(async () => {
    await sb.kill();
  });

  test('argv, shell line, {shell}, {cmd}', async () => {
    const a = await sb.exec(['echo', 'a b', '$HOME']);
    assert.equal(a.stdout, 'a b $HOME\n');
    assert.equal(a.exitCode, 0);
    assert.equal(a.status, 'ok');
    assert.equal(a.signal, null);
    assert.deepEqual(a.truncated, { stdout: false, stderr: false });
    assert.equal(a.sandbox.tier, TIER);
    assert.equal(typeof a.wallMs, 'number');
    assert.equal((await sb.exec('echo one | tr o O')).stdout, 'One\n');
    assert.equal((await sb.exec({ shell: 'echo two >&2; exit 3' })).stderr, 'two\n');
    assert.equal((await sb.exec({ shell: 'exit 3' })).exitCode, 3);
    assert.equal((await sb.exec({ cmd: ['printf', '%s', 'x'] })).stdout, 'x');
  });

  test('cwd, env, stdin (text and bytes), timeout, signal, output cap', async () => {
    await sb.files.mkdir('/work/sub');
    assert.equal((await sb.exec(['pwd'], { cwd: '/work/sub' })).stdout, '/work/sub\n');
    assert.equal((await sb.exec('echo $A-$B', { env: { A: '1', B: '2' } })).stdout, '1-2\n');
    assert.equal((await sb.exec(['cat'], { stdin: 'from stdin' })).stdout, 'from stdin');
    const bytes = new Uint8Array([0, 1, 2, 250, 255]);
    const od = await sb.exec(['od', '-An', '-tu1'], { stdin: bytes });
    assert.deepEqual(od.stdout.trim().split(/\s+/).map(Number), [0, 1, 2, 250, 255]);

    const slow = await sb.exec(['sleep', '30'], { timeoutS: 0.5 });
    assert.equal(slow.status, 'timeout');
    assert.ok(slow.message && slow.message.length > 0);
    assert.ok(slow.wallMs < 20_000);

    const killed = await sb.exec({ shell: 'kill -9 $$' });
    assert.equal(killed.signal, 9);
    assert.equal(killed.exitCode, null);
  });

  test('output over the policy cap is truncated', async () => {
    await using small = await create({ policy: { limits: { output: '1K' } } });
    const r = await small.exec('head -c 100000 /dev/zero | tr "\\0" x');
    assert.equal(r.status, 'output_limit');
    assert.equal(r.truncated.stdout, true);
    assert.ok(r.stdout.length <= 1024, `${r.stdout.length}`);
  });

  test('execStream: events arrive while the command runs', async () => {
    const t0 = Date.now();
    const events: { at: number; ev: StreamEvent }[] = [];
    for await (const ev of sb.execStream('echo first; sleep 1.5; echo second >&2; exit 4')) {
      events.push({ at: Date.now() - t0, ev });
    }
    const types = events.map((e) => e.ev.type);
    assert.equal(types[0], 'start');
    assert.equal(types[types.length - 1], 'exit');
    const first = events.find((e) => e.ev.type === 'stdout')!;
    const exit = events[events.length - 1]!;
    assert.ok(first.ev.type === 'stdout' && first.ev.data === 'first\n');
    assert.ok(exit.at - first.at >= 1000, `stdout at ${first.at} ms, exit at ${exit.at} ms: not streamed`);
    const err = events.find((e) => e.ev.type === 'stderr')!;
    assert.ok(err.ev.type === 'stderr' && err.ev.data === 'second\n');
    assert.ok(exit.ev.type === 'exit' && exit.ev.exitCode === 4 && exit.ev.status === 'ok');
    const start = events[0]!.ev;
    assert.ok(start.type === 'start' && start.pid > 0);
  });

  test('execStream: bytes that are not UTF-8 come through exactly', async () => {
    const chunks: Uint8Array[] = [];
    for await (const ev of sb.execStream(['printf', '\\377\\376ok'])) {
      if (ev.type === 'stdout') chunks.push(ev.bytes);
    }
    assert.deepEqual([...Buffer.concat(chunks)], [0xff, 0xfe, 0x6f, 0x6b]);
  });

  test('execStream: leaving the loop early closes the stream', async () => {
    let n = 0;
    for await (const ev of sb.execStream('for i in 1 2 3 4 5; do echo $i; sleep 0.3; done')) {
      if (ev.type === 'stdout') {
        n++;
        break;
      }
    }
    assert.equal(n, 1);
    // The sandbox still serves.
    assert.equal((await sb.exec(['echo', 'ok'])).stdout, 'ok\n');
  });

  test('abortSignal stops waiting for a command', async () => {
    const t0 = Date.now();
    await assert.rejects(sb.exec(['sleep', '30'], { abortSignal: AbortSignal.timeout(300) }), (e: Error) =>
      ['AbortError', 'TimeoutError'].includes(e.name),
    );
    const ac = new AbortController();
    const it = sb.execStream(['sleep', '30'], { abortSignal: ac.signal });
    const first = await it.next();
    assert.equal(first.value?.type, 'start');
    ac.abort();
    await assert.rejects(it.next(), (e: Error) => e.name === 'AbortError');
    assert.ok(Date.now() - t0 < 10_000);
  });

  test('exec with callbacks streams and still returns the whole result', async () => {
    const t0 = Date.now();
    const outAt: number[] = [];
    let out = '';
    let err = '';
    const r = await sb.exec('echo a; sleep 1.2; echo b; echo c >&2', {
      onStdout: (d) => {
        out += d;
        outAt.push(Date.now() - t0);
      },
      onStderr: (d) => {
        err += d;
      },
    });
    const end = Date.now() - t0;
    assert.equal(out, 'a\nb\n');
    assert.equal(err, 'c\n');
    assert.equal(r.stdout, 'a\nb\n');
    assert.equal(r.stderr, 'c\n');
    assert.equal(r.exitCode, 0);
    assert.ok(end - outAt[0]! >= 1000, `first chunk at ${outAt[0]} ms of ${end}`);
  });
});

describe('background processes', () => {
  let sb: Sandbox;
  before(async () => {
    sb = await create();
  });
  after(async () => {
    await sb.kill();
  });

  test('start, stdin, output follow, wait, list', async () => {
    const p = await sb.processes.start('echo started; cat; echo done', { stdin: true });
    assert.ok(p.pid > 0);
    assert.deepEqual(p.argv, ['/bin/sh', '-c', 'echo started; cat; echo done']);

    // Without follow, a running process's output ends with `end`.
    await new Promise((r) => setTimeout(r, 200));
    const snap: StreamEvent[] = [];
    for await (const ev of p.output({ follow: false })) snap.push(ev);
    assert.equal(snap[snap.length - 1]!.type, 'end');
    assert.ok(snap.some((e) => e.type === 'stdout' && e.data.includes('started')));

    const listed = await sb.processes.list();
    const mine = listed.find((x) => x.pid === p.pid)!;
    assert.ok(mine.running);
    assert.equal(mine.exitCode, null);
    assert.equal((await p.info()).running, true);

    // Follow while writing: the echo comes back before the process ends.
    const seen: string[] = [];
    let exit: StreamEvent | undefined;
    const reader = (async () => {
      for await (const ev of p.output()) {
        if (ev.type === 'stdout') seen.push(ev.data);
        if (ev.type === 'exit') exit = ev;
      }
    })();
    assert.equal(await p.writeStdin('hello\n'), 6);
    const t0 = Date.now();
    while (!seen.join('').includes('hello') && Date.now() - t0 < 10_000) {
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(seen.join('').includes('hello'), `followed output: ${seen}`);
    assert.equal(exit, undefined, 'still running while cat waits');
    await p.writeStdin(new Uint8Array([98, 121, 101, 10]), { close: true });
    await reader;
    const ended = exit as StreamEvent | undefined;
    assert.ok(ended && ended.type === 'exit' && ended.exitCode === 0 && ended.status === 'ok');
    assert.equal(seen.join(''), 'started\nhello\nbye\ndone\n');

    const w = await p.wait();
    assert.equal(w.exitCode, 0);
    assert.equal(w.stdout, 'started\nhello\nbye\ndone\n');
    const done = await p.info();
    assert.equal(done.running, false);
    assert.equal(done.exitCode, 0);
    assert.equal(done.status, 'ok');
    assert.ok(done.finishedAt !== null && done.finishedAt >= done.startedAt);
  });

  test('signal by name and number; closeStdin; get by pid', async () => {
    const p = await sb.processes.start(['sleep', '300']);
    await p.signal('SIGTERM');
    const w = await p.wait();
    assert.equal(w.signal, 15);
    assert.equal(w.exitCode, null);

    const q = await sb.processes.start(['sleep', '300']);
    await sb.processes.get(q.pid).kill();
    assert.equal((await q.wait()).signal, 9);

    const c = await sb.processes.start(['cat'], { stdin: true });
    await c.closeStdin();
    assert.equal((await c.wait()).exitCode, 0);

    await rejectsWith(sb.processes.get(999_999).signal(15), NotFoundError, 404);
    await assert.rejects(p.signal('SIGNOPE'), TypeError);
  });
});

describe('files', () => {
  let sb: Sandbox;
  before(async () => {
    sb = await create();
  });
  after(async () => {
    await sb.kill();
  });

  test('write (string, bytes, web stream, Node stream), read, readText, readStream', async () => {
    assert.deepEqual(await sb.files.write('/work/a.txt', 'héllo\n'), { path: '/work/a.txt', bytes: 7 });
    assert.equal(await sb.files.readText('/work/a.txt'), 'héllo\n');
    assert.equal((await sb.exec(['cat', '/work/a.txt'])).stdout, 'héllo\n');

    const bytes = new Uint8Array(256).map((_, i) => i);
    await sb.files.write('/work/deep/er/b.bin', bytes);
    assert.deepEqual(await sb.files.read('/work/deep/er/b.bin'), bytes);

    const web = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(new TextEncoder().encode('web '));
        c.enqueue(new TextEncoder().encode('stream'));
        c.close();
      },
    });
    assert.equal((await sb.files.write('/work/c.txt', web)).bytes, 10);
    assert.equal(await sb.files.readText('/work/c.txt'), 'web stream');

    const node = Readable.from([Buffer.from('node '), Buffer.from('readable')]);
    assert.equal((await sb.files.write('/work/d.txt', node)).bytes, 13);
    assert.equal(await sb.files.readText('/work/d.txt'), 'node readable');

    const rs = await sb.files.readStream('/work/d.txt');
    const parts: Uint8Array[] = [];
    for await (const c of rs as unknown as AsyncIterable<Uint8Array>) parts.push(c);
    assert.equal(Buffer.concat(parts).toString(), 'node readable');

    await sb.files.write('/work/x.sh', '#!/bin/sh\necho run\n', { mode: 0o755 });
    assert.equal((await sb.files.stat('/work/x.sh')).mode & 0o777, 0o755);
    assert.equal((await sb.exec(['/work/x.sh'])).stdout, 'run\n');
    await sb.files.write('/work/y.txt', 'y', { mode: '0600' });
    assert.equal((await sb.files.stat('/work/y.txt')).mode & 0o777, 0o600);
  });

  test('list, stat, exists, mkdir, move, remove', async () => {
    await sb.files.mkdir('/work/tree/a/b');
    await rejectsWith(sb.files.mkdir('/work/tree/a/b', { parents: false }), ConflictError, 409);
    await sb.files.write('/work/tree/a/f.txt', '12345');
    const st = await sb.files.stat('/work/tree/a/f.txt');
    assert.equal(st.kind, 'file');
    assert.equal(st.size, 5);
    assert.equal(st.path, '/work/tree/a/f.txt');
    assert.ok(st.mtimeMs > 0);
    assert.equal((await sb.files.stat('/work/tree/a')).kind, 'dir');

    // (The daemon's depth counts levels below the first: depth 1 also lists /work/tree/a's
    // entries. Only what holds either way is asserted here.)
    const one = await sb.files.list('/work/tree');
    assert.deepEqual(one[0], { ...(await sb.files.stat('/work/tree/a')), path: '/work/tree/a' });
    assert.ok(one.every((e) => e.path.startsWith('/work/tree/a')));
    const deep = (await sb.files.list('/work/tree', { depth: 3 })).map((e) => e.path).sort();
    assert.deepEqual(deep, ['/work/tree/a', '/work/tree/a/b', '/work/tree/a/f.txt']);

    await sb.files.move('/work/tree/a/f.txt', '/work/tree/g.txt');
    assert.equal(await sb.files.exists('/work/tree/a/f.txt'), false);
    assert.equal(await sb.files.readText('/work/tree/g.txt'), '12345');

    await sb.files.remove('/work/tree/g.txt');
    assert.equal(await sb.files.exists('/work/tree/g.txt'), false);
    await rejectsWith(sb.files.remove('/work/tree'), ConflictError, 409);
    await sb.files.remove('/work/tree', { recursive: true });
    assert.equal(await sb.files.exists('/work/tree'), false);
    await rejectsWith(sb.files.stat('/work/tree'), NotFoundError, 404);
  });

  test('100 MiB round trip: upload and download streamed, sha256 equal, memory flat', async () => {
    const SIZE = 100 << 20;
    const src = join(local, 'big.bin');
    const h = createHash('sha256');
    const ws = createWriteStream(src);
    const block = randomBytes(1 << 20);
    for (let i = 0; i < 100; i++) {
      // Each MiB differs, so that a dropped or repeated chunk changes the hash.
      const chunk = Buffer.from(block);
      chunk.writeUInt32LE(i, 0);
      h.update(chunk);
      if (!ws.write(chunk)) await once(ws, 'drain');
    }
    ws.end();
    await once(ws, 'finish');
    const want = h.digest('hex');
    assert.equal(statSync(src).size, SIZE);

    // Sample the resident set while transferring: streaming keeps it far below the file size.
    global.gc?.();
    const base = process.memoryUsage().rss;
    let peak = base;
    const sampler = setInterval(() => {
      peak = Math.max(peak, process.memoryUsage().rss);
    }, 20);
    try {
      const up = await sb.files.upload(src, '/work/big.bin');
      assert.deepEqual(up, { path: '/work/big.bin', bytes: SIZE });
      assert.equal((await sb.files.stat('/work/big.bin')).size, SIZE);
      const inside = await sb.exec(['sha256sum', '/work/big.bin'], { timeoutS: 120 });
      assert.equal(inside.stdout.split(' ')[0], want, 'the sandbox sees the same bytes');

      const dst = join(local, 'back.bin');
      assert.equal(await sb.files.download('/work/big.bin', dst), SIZE);
      assert.equal(statSync(dst).size, SIZE);
      assert.equal(await sha256File(dst), want);
    } finally {
      clearInterval(sampler);
    }
    const grew = (peak - base) / (1 << 20);
    assert.ok(grew < 80, `the resident set grew by ${grew.toFixed(0)} MiB moving 100 MiB: not streamed`);
    await sb.files.remove('/work/big.bin');
  });

  test('upload of a missing local file is a local error; download failure leaves no file', async () => {
    await assert.rejects(sb.files.upload(join(local, 'nope'), '/work/nope'), /ENOENT/);
    const dst = join(local, 'never.bin');
    await rejectsWith(sb.files.download('/work/never.bin', dst), NotFoundError, 404);
    assert.throws(() => statSync(dst));
  });
});

describe('errors, each for real', () => {
  let sb: Sandbox;
  before(async () => {
    sb = await create({ policy: { limits: { workdir_size: '4M' } } });
  });
  after(async () => {
    await sb.kill();
  });

  test('AuthError 401: a wrong key', async () => {
    await rejectsWith(Sandbox.list({ apiKey: 'sk_wrong' }), AuthError, 401, 'unauthorized');
    await rejectsWith(Sandbox.create({ apiKey: 'sk_wrong' }), AuthError, 401, 'unauthorized');
  });

  test('NotFoundError 404: an unknown sandbox, a missing file', async () => {
    await rejectsWith(Sandbox.connect('sbx_0000000000000000'), NotFoundError, 404, 'not_found');
    await rejectsWith(sb.files.read('/work/missing'), NotFoundError, 404, 'not_found');
  });

  test('InvalidRequestError 400: a relative path, an unknown scope, a bad policy', async () => {
    await rejectsWith(sb.files.read('relative/path'), InvalidRequestError, 400, 'invalid_request');
    await rejectsWith(sb.exec(['pwd'], { cwd: 'work' }), InvalidRequestError, 400, 'invalid_request');
    await rejectsWith(
      sb.createToken({ scopes: ['root' as never] }),
      InvalidRequestError,
      400,
      'invalid_request',
    );
    await rejectsWith(
      Sandbox.create({ policy: { no_such_field: 1 } }),
      InvalidRequestError,
      400,
    );
  });

  test('ConflictError 409: exec in a paused sandbox', async () => {
    await sb.pause();
    try {
      await rejectsWith(sb.exec(['true']), ConflictError, 409, 'sandbox_paused');
      await rejectsWith(sb.files.list('/work'), ConflictError, 409, 'sandbox_paused');
    } finally {
      await sb.resume();
    }
  });

  test('TooLargeError 413: a request body over the JSON bound, a file over the disk', async () => {
    await rejectsWith(sb.exec(['cat'], { stdin: 'x'.repeat(3 << 20) }), TooLargeError, 413, 'too_large');
    await rejectsWith(sb.files.write('/work/fill.bin', new Uint8Array(8 << 20)), TooLargeError, 413);
  });

  test('ServerError 5xx: a move across filesystems fails inside the sandbox', async () => {
    await sb.files.write('/tmp/x.txt', 'x');
    await rejectsWith(sb.files.move('/tmp/x.txt', '/work/x.txt'), ServerError, 500, 'internal');
  });

  test('MoatConnectionError: nothing listens at the URL', async () => {
    const e = await rejectsWith(
      Sandbox.list({ url: 'http://127.0.0.1:9', apiKey: 'k' }),
      MoatConnectionError,
      0,
      'connection_error',
    );
    assert.match(e.message, /moat serve/);
    await rejectsWith(health({ url: 'http://127.0.0.1:9' }), MoatConnectionError, 0);
  });
});

describe('scoped tokens', () => {
  test('each scope allows its calls and nothing else', async () => {
    await using sb = await create();
    await sb.files.write('/work/secret.txt', 's3cret');

    const execTok = await sb.createToken({ scopes: ['exec'], ttlS: 60 });
    assert.equal(typeof execTok, 'string');
    assert.ok(execTok.length > 10);
    // connect verifies with a read: a token without `read` connects without checking.
    await rejectsWith(Sandbox.connect(sb.id, { apiKey: execTok }), ForbiddenError, 403, 'forbidden');
    const asExec = await Sandbox.connect(sb.id, { apiKey: execTok, verify: false });
    assert.equal((await asExec.exec(['echo', 'tok'])).stdout, 'tok\n');
    await rejectsWith(asExec.files.read('/work/secret.txt'), ForbiddenError, 403, 'forbidden');
    await rejectsWith(asExec.files.write('/work/w.txt', 'w'), ForbiddenError, 403, 'forbidden');
    await rejectsWith(asExec.kill(), ForbiddenError, 403, 'forbidden');
    await rejectsWith(asExec.createToken({ scopes: ['exec'] }), ForbiddenError, 403, 'forbidden');
    await rejectsWith(Sandbox.create({ apiKey: execTok }), ForbiddenError, 403, 'forbidden');

    const readTok = await sb.createToken({ scopes: ['files:read', 'read'] });
    const asReader = await Sandbox.connect(sb.id, { apiKey: readTok });
    assert.equal(await asReader.files.readText('/work/secret.txt'), 's3cret');
    assert.equal((await asReader.info()).id, sb.id);
    assert.deepEqual(
      (await Sandbox.list({ apiKey: readTok })).map((s) => s.id),
      [sb.id],
    );
    await rejectsWith(asReader.files.write('/work/w.txt', 'w'), ForbiddenError, 403, 'forbidden');
    await rejectsWith(asReader.exec(['true']), ForbiddenError, 403, 'forbidden');

    const writeTok = await sb.createToken({ scopes: ['files:write'] });
    const asWriter = await Sandbox.connect(sb.id, { apiKey: writeTok, verify: false });
    await asWriter.files.write('/work/w.txt', 'written by token');
    assert.equal(await sb.files.readText('/work/w.txt'), 'written by token');
    await rejectsWith(asWriter.files.read('/work/w.txt'), ForbiddenError, 403, 'forbidden');

    // A token works only for its own sandbox.
    await using other = await create();
    const stranger = await Sandbox.connect(other.id, { apiKey: execTok, verify: false });
    try {
      await stranger.exec(['true']);
      assert.fail('a token ran a command in another sandbox');
    } catch (x) {
      assert.ok(x instanceof ForbiddenError || x instanceof NotFoundError, String(x));
    }
  });
});

describe('cleanup', () => {
  test('no sandbox the tests made is left running', async () => {
    const live = (await Sandbox.list()).filter((s) => s.state !== 'stopped' && s.state !== 'failed');
    const left = live.filter((s) => made.includes(s.id));
    assert.deepEqual(
      left.map((s) => `${s.id} ${s.state}`),
      [],
    );
  });
});
