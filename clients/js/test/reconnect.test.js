// 500 clients (the client module in Node, on Node's WebSocket) lose their gateway to a
// restart and come back: their reconnects must spread over the backoff window instead of
// arriving in lockstep. Prints the measured spread.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { Tidings } from '../tidings.js';
import { gateway, api, until, artifacts } from './helpers.js';

const CLIENTS = 500;
// Every address here is 127.0.0.1, so the per-address handshake bound is raised: it is
// there for distinct clients, which these stand for.
const env = { TIDINGS_MAX_HANDSHAKES_PER_IP: '2048', TIDINGS_MAX_HANDSHAKES: '2048' };

/** Connects 500 clients, kills the gateway, restarts it once every client failed twice,
 * and measures when each one started the attempt that brought it back (ms after the
 * restart; the backoff decides that moment, the gateway's speed does not). `random` is the
 * jitter source. */
async function restartStorm(random) {
  let gw = await gateway({ env });
  const backoff = { base: 500, cap: 8000, healthy: 5000 };
  const clients = [];
  const attempts = []; // per client: when each connection attempt started
  const received = [];
  try {
    for (let i = 0; i < CLIENTS; i++) {
      const t = new Tidings(gw.url, { backoff, transports: ['websocket'], random });
      const mine = [];
      attempts.push(mine);
      received.push([]);
      t.on('status', (status) => status === 'connecting' && mine.push(Date.now()));
      t.subscribe('fleet:all', (msg) => msg.type === 'event' && received[i].push(msg.offset));
      clients.push(t);
    }
    await until('every client open', () => clients.every((t) => t.status === 'open'), { timeout: 60000 });
    await until('every subscription acknowledged', () => clients.every((t) => t.transport?.ready('fleet:all')), { timeout: 30000 });
    const pub = api(gw.url);
    assert.equal((await pub.publish('fleet:all', { before: 1 })).status, 202);
    await until('the first event everywhere', () => received.every((r) => r.length === 1));

    // Kill the gateway outright, as a crash or a deploy would, and start it again on the
    // same port once it has been down long enough for every client to have failed twice.
    const port = gw.port;
    await gw.stop('SIGKILL');
    await until('every client failed twice', () => clients.every((t) => t.attempt >= 2), { timeout: 30000 });
    gw = await gateway({ listen: `127.0.0.1:${port}`, env });
    const restarted = Date.now();
    await until('every client back', () => clients.every((t) => t.status === 'open'), { timeout: 60000 });
    const back = attempts.map((a) => a[a.length - 1] - restarted).sort((a, b) => a - b);
    const q = (p) => back[Math.min(back.length - 1, Math.floor(p * back.length))];
    // The busiest 100 ms: lockstep reconnects put (nearly) everyone in one.
    const buckets = new Map();
    for (const ms of back) buckets.set(Math.floor(ms / 100), (buckets.get(Math.floor(ms / 100)) || 0) + 1);
    const opened = clients.reduce((n, t) => n + t.stats.connects, 0);
    assert.equal(opened, 2 * CLIENTS, 'each client connected once before and once after');
    // And they resumed: the new gateway's topic is a new history, announced, then live.
    assert.equal((await api(gw.url).publish('fleet:all', { after: 1 })).status, 202);
    await until('the event after the restart everywhere', () => received.every((r) => r.length === 2), { timeout: 30000 });
    return {
      clients: CLIENTS,
      backoff,
      first_ms: back[0],
      p10_ms: q(0.1),
      p50_ms: q(0.5),
      p90_ms: q(0.9),
      last_ms: back[back.length - 1],
      busiest_100ms: Math.max(...buckets.values()),
      buckets_100ms: buckets.size,
    };
  } finally {
    for (const t of clients) t.close();
    await gw.stop();
  }
}

test('500 clients reconnecting after a gateway restart spread over the backoff window', { timeout: 180000 }, async () => {
  assert.ok(globalThis.WebSocket, 'run with node --experimental-websocket (Node 20) or Node 22+');
  const jittered = await restartStorm(Math.random);
  // The same clients without jitter (every delay at its window's end): the lockstep the
  // jitter exists to prevent, measured the same way, so the claim can fail.
  const lockstep = await restartStorm(() => 1);
  const report = { jittered, lockstep };
  console.log(`reconnect spread after restart: ${JSON.stringify(report)}`);
  mkdirSync(artifacts, { recursive: true });
  writeFileSync(join(artifacts, 'reconnect-spread.json'), JSON.stringify(report, null, 2));
  // Without jitter the attempts still differ by how long each client took to notice the
  // failure and probe the gateway (a few hundred ms in one Node process, more on a loaded
  // or instrumented machine, which smears the lockstep too): the busiest 100 ms is the
  // measure, and jitter must cut it by at least a third.
  assert.ok(jittered.busiest_100ms * 3 <= lockstep.busiest_100ms * 2, `jitter cuts the busiest 100 ms by a third (${jittered.busiest_100ms} vs ${lockstep.busiest_100ms})`);
  assert.ok(jittered.busiest_100ms <= CLIENTS * 0.3, `with it, at most 30 % in any 100 ms (${jittered.busiest_100ms})`);
  assert.ok(jittered.p90_ms - jittered.p10_ms >= 700, `the middle 80 % over at least 700 ms (${jittered.p90_ms - jittered.p10_ms} ms)`);
});
