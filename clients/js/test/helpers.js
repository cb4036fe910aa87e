// Test helpers: a real gateway (the tidings binary) on port 0, a TCP proxy that can cut
// connections or refuse WebSocket upgrades, headless Debian Chromium, and waiting for a
// condition with a deadline (never a fixed sleep as synchronisation).
import { spawn } from 'node:child_process';
import { request } from 'node:http';
import { createServer, connect } from 'node:net';
import { mkdtempSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
export const repo = join(here, '..', '..', '..');

export function binary() {
  const bin = process.env.GATEWAY_BIN || join(process.env.CARGO_TARGET_DIR || join(repo, 'target'), 'debug', 'tidings');
  if (!existsSync(bin)) throw new Error(`no gateway binary at ${bin}: run cargo build, or set GATEWAY_BIN`);
  return bin;
}

/** Waits until `check()` returns a truthy value (awaited), polling every `every` ms. */
export async function until(what, check, { timeout = 20000, every = 20 } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** Starts `tidings serve` on `listen` (port 0 by default) with `env` settings. */
export async function gateway({ listen = '127.0.0.1:0', env = {}, config } = {}) {
  const args = ['serve', '--listen', listen];
  if (config) {
    const dir = mkdtempSync(join(tmpdir(), 'tidings-'));
    const file = join(dir, 'tidings.toml');
    writeFileSync(file, config);
    args.push('--config', file);
  }
  // Every TIDINGS_* variable is a gateway setting: pass only the ones asked for.
  const inherited = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('TIDINGS_')));
  const child = spawn(binary(), args, {
    env: { ...inherited, TIDINGS_LOG: 'warn', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const url = await new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      const m = /tidings listening on (http:\/\/\S+)/.exec(out);
      if (m) resolve(m[1]);
    });
    child.on('exit', (code) => reject(new Error(`gateway exited with ${code}: ${stderr}`)));
  });
  const exited = new Promise((r) => child.on('exit', r));
  const port = Number(new URL(url).port);
  return {
    url,
    port,
    child,
    exited,
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    },
  };
}

export function api(url, key) {
  const auth = key ? { Authorization: `Bearer ${key}` } : {};
  const call = async (method, path, body, headers = {}) => {
    const res = await fetch(url + path, {
      method,
      headers: { ...auth, ...headers },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    const text = await res.text();
    let json = null;
    try {
      json = JSON.parse(text);
    } catch {
      json = text;
    }
    return { status: res.status, json, headers: res.headers };
  };
  return {
    call,
    publish: (topic, data) => call('POST', `/v1/topics/${topic}/events`, data),
    put: (topic, doc) => call('PUT', `/v1/topics/${topic}/state`, doc),
    patch: (topic, ops) => call('PATCH', `/v1/topics/${topic}/state`, ops, { 'Content-Type': 'application/json-patch+json' }),
    close: (topic) => call('POST', `/v1/topics/${topic}/close`),
    state: (topic) => call('GET', `/v1/topics/${topic}/state`),
    stats: async () => (await call('GET', '/stats')).json,
  };
}

/**
 * A TCP proxy in front of the gateway. `refuse(requestLine)` answers a connection's first
 * request with 403 itself (a proxy that blocks WebSockets or streams); `cut()` resets every
 * connection open through it; `requests` lists the request lines it saw.
 */
export async function proxy(target, { refuse = () => false } = {}) {
  const sockets = new Set();
  const requests = [];
  const server = createServer((client) => {
    sockets.add(client);
    client.on('close', () => sockets.delete(client));
    client.on('error', () => {});
    let upstream = null;
    client.once('data', (first) => {
      const line = first.toString('latin1').split('\r\n')[0];
      requests.push(line);
      if (refuse(line)) {
        client.end('HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: 17\r\nconnection: close\r\n\r\n{"code":"proxy"}\n');
        return;
      }
      upstream = connect(target.port, '127.0.0.1');
      sockets.add(upstream);
      upstream.on('close', () => {
        sockets.delete(upstream);
        client.destroy();
      });
      upstream.on('error', () => client.destroy());
      client.on('close', () => upstream.destroy());
      upstream.write(first);
      client.on('data', (d) => {
        const text = d.toString('latin1');
        const m = /^(GET|POST|PUT|PATCH|HEAD|OPTIONS) \S+ HTTP\/1\.1/.exec(text);
        if (m) requests.push(text.split('\r\n')[0]);
        upstream.write(d);
      });
      upstream.on('data', (d) => client.write(d));
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const port = server.address().port;
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    /** Resets every connection through the proxy (both sides see it end at once). */
    cut() {
      const n = sockets.size;
      for (const s of sockets) s.resetAndDestroy ? s.resetAndDestroy() : s.destroy();
      return n;
    },
    open: () => sockets.size,
    close: () => new Promise((r) => {
      for (const s of sockets) s.destroy();
      server.close(r);
    }),
  };
}

/**
 * Opens an SSE stream on a fresh connection (an SSE stream must be its connection's first
 * request), reads until `until(text)` or the end, and closes: `{ status, text, json }`.
 */
export function sse(url, path, key, until = () => true) {
  return new Promise((resolve, reject) => {
    const headers = key ? { Authorization: `Bearer ${key}` } : {};
    const req = request(`${url}${path}`, { agent: false, headers }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      const done = () => {
        req.destroy();
        let json = null;
        try {
          json = JSON.parse(text);
        } catch {
          // a stream, not an error body
        }
        resolve({ status: res.statusCode, text, json });
      };
      res.on('data', (d) => {
        text += d;
        if (res.statusCode === 200 && until(text)) done();
      });
      res.on('end', done);
    });
    req.on('error', reject);
    req.end();
  });
}

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

/** Headless Debian Chromium through playwright-core (which downloads nothing). */
export async function browser() {
  const { chromium } = await import('playwright-core');
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

/** A page on `origin` with the client module loaded as `window.T` (the `Tidings` class). */
export async function clientPage(b, origin) {
  const page = await b.newPage();
  page.on('pageerror', (e) => console.error('page error:', e));
  await page.goto(`${origin}/healthz`);
  await page.evaluate(async () => {
    const m = await import('/v1/client.js');
    window.T = m.Tidings;
  });
  return page;
}

export const artifacts = join(repo, 'target-browser');
