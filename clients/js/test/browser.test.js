// The client in headless Chromium against a real gateway: delivery, connections cut while
// publishing continues, WebSocket refused (SSE, then polling), `closed`, and 1,000 random
// state changes.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { gateway, api, proxy, browser, clientPage, until } from './helpers.js';

let b;
before(async () => {
  b = await browser();
});
after(async () => {
  await b?.close();
});

/** Subscribes the page to `topic`, keeping every message in `window.got`. */
async function subscribe(page, topic, options = {}) {
  await page.evaluate(
    async ({ topic, options }) => {
      window.t = new window.T(location.origin, options);
      window.got = [];
      window.t.on('error', (e) => console.log('client error', JSON.stringify(e)));
      const sub = window.t.subscribe(topic, (msg) => window.got.push(msg));
      await Promise.race([sub.ready, new Promise((_, no) => setTimeout(() => no(new Error(`not ready: ${window.t.status}`)), 15000))]);
    },
    { topic, options },
  );
}

const offsets = (page) => page.evaluate(() => window.got.filter((m) => m.type === 'event').map((m) => m.offset));

function assertExactlyOnce(got, n) {
  assert.equal(got.length, n, `received ${got.length} events, expected ${n}`);
  got.forEach((offset, i) => assert.equal(offset, i + 1, `event ${i} has offset ${offset}`));
}

test('a page subscribes through the client and receives every publication', async () => {
  const gw = await gateway();
  const pub = api(gw.url);
  const page = await clientPage(b, gw.url);
  try {
    await subscribe(page, 'runs:1');
    assert.equal(await page.evaluate(() => window.t.transportName), 'websocket');
    for (let i = 1; i <= 20; i++) assert.equal((await pub.publish('runs:1', { step: i })).status, 202);
    await until('20 events', async () => (await offsets(page)).length >= 20);
    assertExactlyOnce(await offsets(page), 20);
    const data = await page.evaluate(() => window.got.map((m) => m.data.step));
    assert.deepEqual(data, Array.from({ length: 20 }, (_, i) => i + 1));
  } finally {
    await page.close();
    await gw.stop();
  }
});

test('connections cut while publications continue: every offset exactly once, in order', async () => {
  const gw = await gateway();
  const px = await proxy(gw);
  const pub = api(gw.url);
  const page = await clientPage(b, px.url);
  const total = 400;
  try {
    // A short backoff keeps the test quick; the rule (full jitter) is the same.
    await subscribe(page, 'runs:cut', { backoff: { base: 50, cap: 400, healthy: 2000 } });
    let published = 0;
    const publishing = (async () => {
      while (published < total) {
        const r = await pub.publish('runs:cut', { n: published + 1 });
        assert.equal(r.status, 202);
        published++;
        if (published % 10 === 0) await new Promise((r) => setImmediate(r));
      }
    })();
    let cuts = 0;
    for (const at of [50, 150, 250]) {
      await until(`${at} received`, async () => (await offsets(page)).length >= at || published >= total);
      if ((await offsets(page)).length < total) cuts += px.cut() > 0 ? 1 : 0;
    }
    await publishing;
    await until(`${total} received`, async () => (await offsets(page)).length >= total, { timeout: 30000 });
    assertExactlyOnce(await offsets(page), total);
    const stats = await page.evaluate(() => window.t.stats);
    assert.ok(cuts >= 1, 'the proxy cut a live connection');
    assert.ok(stats.connects >= cuts + 1, `reconnected after each cut: ${JSON.stringify(stats)}`);
    assert.equal(await page.evaluate(() => window.t.transportName), 'websocket');
  } finally {
    await page.close();
    await px.close();
    await gw.stop();
  }
});

test('WebSocket upgrade refused: the client falls back to SSE and still receives everything', async () => {
  const gw = await gateway();
  const px = await proxy(gw, { refuse: (line) => line.startsWith('GET /ws') });
  const pub = api(gw.url);
  const page = await clientPage(b, px.url);
  try {
    await subscribe(page, 'jobs:sse');
    assert.equal(await page.evaluate(() => window.t.transportName), 'sse');
    for (let i = 1; i <= 50; i++) await pub.publish('jobs:sse', { i });
    await until('50 events over SSE', async () => (await offsets(page)).length >= 50);
    // A cut SSE stream resumes from the versions held, like the WebSocket.
    px.cut();
    for (let i = 51; i <= 100; i++) await pub.publish('jobs:sse', { i });
    await until('100 events over SSE', async () => (await offsets(page)).length >= 100);
    assertExactlyOnce(await offsets(page), 100);
    assert.ok(px.requests.some((l) => l.startsWith('GET /ws')), 'the WebSocket was tried first');
  } finally {
    await page.close();
    await px.close();
    await gw.stop();
  }
});

test('WebSocket and SSE refused: long-polling receives everything, and closed stops it', async () => {
  const gw = await gateway();
  const px = await proxy(gw, { refuse: (line) => line.startsWith('GET /ws') || line.includes('/sse') });
  const pub = api(gw.url);
  const page = await clientPage(b, px.url);
  try {
    await pub.publish('jobs:poll', { before: true }); // history before the subscription
    await subscribe(page, 'jobs:poll', { pollInterval: 200 });
    assert.equal(await page.evaluate(() => window.t.transportName), 'poll');
    for (let i = 2; i <= 41; i++) await pub.publish('jobs:poll', { i });
    await until('40 polled events', async () => (await offsets(page)).length >= 40);
    const got = await offsets(page);
    assert.deepEqual(got, Array.from({ length: 40 }, (_, i) => i + 2), 'from the subscription on, once each');
    assert.equal((await pub.close('jobs:poll')).status, 200);
    await until('closed delivered', () => page.evaluate(() => window.got.some((m) => m.type === 'closed')));
    await until('client idle', async () => (await page.evaluate(() => window.t.status)) === 'idle');
    const polls = () => px.requests.filter((l) => l.includes('/v1/topics/jobs%3Apoll/events') || l.includes('/v1/topics/jobs:poll/events')).length;
    const seen = polls();
    assert.ok(seen >= 2, `it polled (${seen})`);
    // An observation window, not synchronisation: ten poll intervals with nothing asked.
    await new Promise((r) => setTimeout(r, 2000));
    assert.equal(polls(), seen, 'no poll after closed');
    assert.equal((await pub.stats()).long_polls_waiting, 0);
  } finally {
    await page.close();
    await px.close();
    await gw.stop();
  }
});

/** A random RFC 6902 patch (or a whole new document) for `doc`. */
function randomChange(doc, rand) {
  const keys = Object.keys(doc.items);
  const r = rand();
  if (r < 0.05) {
    const items = {};
    for (let i = 0; i < 5; i++) items[`k${Math.floor(rand() * 40)}`] = Math.floor(rand() * 1000);
    return { put: { items, list: [1, 2, 3], n: Math.floor(rand() * 100) } };
  }
  if (r < 0.35 || keys.length === 0) {
    return { patch: [{ op: 'add', path: `/items/k${Math.floor(rand() * 40)}`, value: { v: Math.floor(rand() * 1000), s: 'x'.repeat(Math.floor(rand() * 5)) } }] };
  }
  const key = keys[Math.floor(rand() * keys.length)];
  if (r < 0.6) return { patch: [{ op: 'replace', path: `/items/${key}`, value: Math.floor(rand() * 1000) }] };
  if (r < 0.75) return { patch: [{ op: 'remove', path: `/items/${key}` }] };
  if (r < 0.9) return { patch: [{ op: 'add', path: '/list/-', value: Math.floor(rand() * 10) }, { op: 'replace', path: '/n', value: Math.floor(rand() * 100) }] };
  return { patch: [{ op: 'add', path: '/list/0', value: 'first' }] };
}

function apply(doc, change) {
  if (change.put) return structuredClone(change.put);
  const d = structuredClone(doc);
  for (const op of change.patch) {
    const parts = op.path.split('/').slice(1);
    const last = parts.pop();
    const parent = parts.reduce((o, k) => o[k], d);
    if (op.op === 'remove') delete parent[last];
    else if (Array.isArray(parent)) {
      if (last === '-') parent.push(op.value);
      else parent.splice(Number(last), 0, op.value);
    } else parent[last] = op.value;
  }
  return d;
}

test('1,000 random PUT and PATCH changes: the page holds the document and version GET returns', async () => {
  const gw = await gateway();
  const px = await proxy(gw);
  const pub = api(gw.url);
  const page = await clientPage(b, px.url);
  let seed = 12;
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  try {
    let doc = { items: {}, list: [], n: 0 };
    assert.equal((await pub.put('cfg:prod', doc)).status, 200);
    await page.evaluate(async () => {
      window.t = new window.T(location.origin, { backoff: { base: 50, cap: 400, healthy: 2000 } });
      window.docs = 0;
      const s = window.t.state('cfg:prod', (doc, version) => {
        window.doc = doc;
        window.version = version;
        window.docs++;
      });
      await s.ready;
    });
    for (let i = 0; i < 1000; i++) {
      const change = randomChange(doc, rand);
      const r = change.put ? await pub.put('cfg:prod', change.put) : await pub.patch('cfg:prod', change.patch);
      assert.equal(r.status, 200, JSON.stringify(r.json));
      doc = apply(doc, change);
      if (i === 500) px.cut(); // and a reconnect in the middle: resume with since
    }
    const got = await pub.state('cfg:prod');
    assert.deepEqual(got.json.state, doc, 'the gateway applied the changes as the test did');
    await until('the page at the final version', async () => (await page.evaluate(() => window.version)) === got.json.version);
    const shown = await page.evaluate(() => ({ doc: window.doc, version: window.version, stats: window.t.stats }));
    assert.deepEqual(shown.doc, got.json.state);
    assert.equal(shown.version, got.json.version);
    assert.ok(shown.stats.connects >= 2, 'reconnected after the cut');
  } finally {
    await page.close();
    await px.close();
    await gw.stop();
  }
});

test('a JWT through the subprotocol, refreshed with getToken before it expires: one connection throughout', async () => {
  const { createHmac, createHash } = await import('node:crypto');
  const secret = 'a-test-secret-that-is-long-enough-0123456789';
  const admin = 'admin-key-0123456789abcdef0123456789abcdef';
  const b64 = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');
  let minted = 0;
  const mint = () => {
    minted++;
    const head = b64({ alg: 'HS256', typ: 'JWT' });
    const body = b64({ sub: 'u1', exp: Math.floor(Date.now() / 1000) + 6, topics: ['runs:*'] });
    const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
    return `${head}.${body}.${sig}`;
  };
  const gw = await gateway({
    config: `[auth]\nhmac_secret = "${secret}"\nleeway = 0\ntoken_expiring = "4s"\n[[auth.api_keys]]\nname = "ops"\nsha256 = "${createHash('sha256').update(admin).digest('hex')}"\npublish = ["**"]\nadmin = true\n`,
  });
  const pub = api(gw.url, admin);
  const page = await clientPage(b, gw.url);
  await page.exposeFunction('mint', mint);
  try {
    await page.evaluate(async () => {
      window.t = new window.T(location.origin, { getToken: () => window.mint(), refreshBefore: 1 });
      window.got = [];
      await window.t.subscribe('runs:7', (m) => window.got.push(m)).ready;
    });
    assert.equal(await page.evaluate(() => window.t.transportName), 'websocket');
    // Past the first token's expiry, twice over: each warning brought a refresh.
    await until('two refreshes', () => minted >= 3, { timeout: 20000 });
    assert.equal((await pub.publish('runs:7', { after: 'refresh' })).status, 202);
    await until('the event', async () => (await offsets(page)).length === 1);
    assert.equal(await page.evaluate(() => window.t.stats.connects), 1, 'never reconnected');
    assert.equal((await pub.stats()).connections_closed.token_expired, 0);
    // And the topic is not readable without one.
    const refused = await api(gw.url).call('GET', '/v1/topics/runs:7/events');
    assert.equal(refused.status, 401);
  } finally {
    await page.close();
    await gw.stop();
  }
});
