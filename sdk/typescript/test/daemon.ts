/** Starts a real `moat serve` (from $MOAT_BIN) on a free port with a fresh state directory. */

import { spawn, ChildProcess } from 'node:child_process';
import { mkdtempSync, openSync, readFileSync, rmSync, closeSync, existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface Daemon {
  url: string;
  key: string;
  stateDir: string;
  logPath: string;
  log(): string;
  stop(): Promise<void>;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function answersHealth(url: string): Promise<boolean> {
  try {
    const r = await fetch(`${url}/v1/health`, { signal: AbortSignal.timeout(1000) });
    await r.text();
    return r.ok;
  } catch {
    return false;
  }
}

export function moatBin(): string {
  const bin = process.env.MOAT_BIN;
  if (!bin) {
    throw new Error(
      'set MOAT_BIN to the moat binary to test against (cargo build -p moat; ' +
        'the Rust wrapper crates/moat/tests/suite/sdk_typescript.rs sets it)',
    );
  }
  if (!existsSync(bin)) throw new Error(`MOAT_BIN=${bin} does not exist`);
  return bin;
}

export async function startDaemon(): Promise<Daemon> {
  const bin = moatBin();
  const stateDir = mkdtempSync(join(tmpdir(), 'moat-sdk-ts-'));
  const logPath = join(stateDir, 'serve.log');
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const logFd = openSync(logPath, 'a');
  const child: ChildProcess = spawn(bin, ['serve', '--listen', `127.0.0.1:${port}`, '--state-dir', stateDir], {
    stdio: ['ignore', logFd, logFd],
  });
  closeSync(logFd);
  let exited: string | null = null;
  child.on('exit', (code, sig) => {
    exited = `exit code ${code} signal ${sig}`;
  });
  const log = () => {
    try {
      return readFileSync(logPath, 'utf8');
    } catch {
      return '';
    }
  };
  const start = Date.now();
  while (!(await answersHealth(url))) {
    if (exited) throw new Error(`moat serve exited at start (${exited}):\n${log()}`);
    if (Date.now() - start > 30_000) {
      child.kill('SIGKILL');
      throw new Error(`moat serve did not answer /v1/health within 30 s:\n${log()}`);
    }
    await sleep(25);
  }
  const key = readFileSync(join(stateDir, 'admin.key'), 'utf8').trim();

  const stop = async () => {
    // Sandboxes outlive the daemon by design: delete every one first.
    try {
      const r = await fetch(`${url}/v1/sandboxes`, { headers: { authorization: `Bearer ${key}` } });
      const { sandboxes } = (await r.json()) as { sandboxes: { id: string; state: string }[] };
      for (const s of sandboxes) {
        if (s.state === 'stopped' || s.state === 'failed') continue;
        const d = await fetch(`${url}/v1/sandboxes/${s.id}`, {
          method: 'DELETE',
          headers: { authorization: `Bearer ${key}` },
        });
        await d.text();
      }
    } catch (e) {
      console.error(`cleaning up sandboxes: ${e}`);
    }
    if (!exited) {
      const gone = new Promise<void>((r) => child.once('exit', () => r()));
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await gone;
      clearTimeout(t);
    }
    rmSync(stateDir, { recursive: true, force: true });
  };
  return { url, key, stateDir, logPath, log, stop };
}
