// The dashboard and its endpoints with authentication on: the admin key is needed for the
// stats topic and the topic listing; the page renders live numbers that match /stats; a
// screenshot is taken (target-browser/dashboard.png; docs/dashboard.png with
// UPDATE_SCREENSHOT=1).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdirSync, copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { Tidings } from '../tidings.js';
import { gateway, api, browser, until, artifacts, repo, sse } from './helpers.js';

const ADMIN = 'admin-0123456789abcdef0123456789abcdef';
const APP = 'app-0123456789abcdef0123456789abcdef';
const sha = (s) => createHash('sha256').update(s).digest('hex');
const config = `
[auth]
[[auth.api_keys]]
name = "ops"
sha256 = "${sha(ADMIN)}"
publish = ["**"]
admin = true
[[auth.api_keys]]
name = "app"
sha256 = "${sha(APP)}"
publish = ["runs:**", "cfg:**"]
`;

let gw;
let b;
before(async () => {
  gw = await gateway({ config });
  b = await browser();
});
after(async () => {
  await b?.close();
  await gw?.stop();
});

test('the stats topic and the topic listing need the admin credential', async () => {
  const anon = api(gw.url);
  const app = api(gw.url, APP);
  const admin = api(gw.url, ADMIN);
  const listed = await anon.call('GET', '/v1/topics');
  assert.equal(listed.status, 401);
  assert.equal(listed.json.code, 'unauthorized');
  assert.equal((await app.call('GET', '/v1/topics')).status, 403);
  assert.equal((await admin.call('GET', '/v1/topics')).status, 200);
  for (const [key, status] of [[null, 401], [APP, 403]]) {
    const r = await sse(gw.url, '/v1/sse?topics=_tidings:stats', key);
    assert.equal(r.status, status, r.text);
    assert.ok(r.json.code, 'a JSON error body');
  }
  // Not through a pattern either, even one a key may read.
  assert.equal((await sse(gw.url, '/v1/sse?patterns=**', APP)).status, 403);
  // Nobody but the gateway publishes there, the admin included.
  const w = await admin.publish('_tidings:stats', { fake: true });
  assert.equal(w.status, 403);
  assert.equal(w.json.code, 'reserved_topic');
  // An admin reads it over SSE, as the dashboard does.
  const { status, text } = await sse(gw.url, '/v1/sse?topics=_tidings:stats', ADMIN, (t) => t.includes('"connections"'));
  assert.equal(status, 200);
  assert.match(text, /"topic":"_tidings:stats"/);
});

test('GET /v1/topics pages with a cursor and refuses bad input with JSON errors', async () => {
  const admin = api(gw.url, ADMIN);
  for (let i = 0; i < 25; i++) assert.equal((await admin.publish(`page:t${String(i).padStart(2, '0')}`, { i })).status, 202);
  const names = [];
  let after = null;
  let pages = 0;
  do {
    const r = await admin.call('GET', `/v1/topics?prefix=page:&limit=10${after ? `&after=${after}` : ''}`);
    assert.equal(r.status, 200);
    assert.ok(r.json.topics.length <= 10);
    for (const t of r.json.topics) {
      assert.equal(t.kind, 'events');
      assert.equal(t.history, 1);
      assert.match(t.version, /^[0-9a-f]{16}:1$/);
      names.push(t.topic);
    }
    after = r.json.next;
    pages++;
  } while (after);
  assert.equal(pages, 3);
  assert.deepEqual(names, Array.from({ length: 25 }, (_, i) => `page:t${String(i).padStart(2, '0')}`));
  for (const [query, code] of [['limit=0', 'invalid_limit'], ['limit=1001', 'invalid_limit'], ['limit=x', 'invalid_limit'], ['after=a%20b', 'invalid_cursor'], ['prefix=%2A', 'invalid_prefix']]) {
    const r = await admin.call('GET', `/v1/topics?${query}`);
    assert.equal(r.status, 400, query);
    assert.equal(r.json.code, code, query);
    assert.ok(r.json.message);
  }
  assert.equal((await admin.call('POST', '/v1/topics')).status, 405);
});

test('the dashboard renders live numbers that match /stats, and browses a topic', async () => {
  const admin = api(gw.url, ADMIN);
  const page = await b.newPage({ viewport: { width: 1360, height: 1000 } });
  page.on('pageerror', (e) => console.error('page error:', e));
  const followers = [];
  try {
    await page.goto(`${gw.url}/dashboard`);
    // Authentication is on: the page asks for the admin key.
    await page.waitForSelector('#login:not([hidden])', { timeout: 10000 });
    await page.fill('#key', ADMIN);
    await page.click('#login button');
    await page.waitForSelector('body[data-stats-ts]', { timeout: 15000 });

    // Traffic: service clients with the app key over SSE and a state document.
    for (let i = 0; i < 3; i++) {
      const t = new Tidings(gw.url, { token: APP, transports: ['sse'] });
      t.subscribe('runs:42', () => {});
      followers.push(t);
    }
    await until('followers up', () => followers.every((t) => t.status === 'open'));
    assert.equal((await admin.put('cfg:prod', { limit: 10, features: ['a', 'b'] })).status, 200);
    const start = Date.now();
    let n = 0;
    let writes = 1;
    while (Date.now() - start < 6000) {
      const burst = 5 + Math.round(10 * Math.abs(Math.sin((Date.now() - start) / 900)));
      for (let i = 0; i < burst; i++) await admin.publish('runs:42', { step: ++n, status: 'running' });
      await admin.patch('cfg:prod', [{ op: 'replace', path: '/limit', value: n }]);
      writes++;
      await new Promise((r) => setTimeout(r, 100));
    }
    const publishedByTest = n + writes + 25; // and the listing test's 25

    // The numbers: the page shows the last stats message; /stats is read after it. Stable
    // gauges must match; counters may only have moved on since (the stats topic publishes
    // too, and reaches the page).
    const read = () =>
      page.evaluate(() => {
        const v = (k) => document.querySelector(`[data-stat="${k}"]`).textContent;
        return { ts: Number(document.body.dataset.statsTs), connections: v('connections'), websockets: v('websockets'), sse: v('sse_streams'), topics: v('topics'), publications: Number(v('publications')), deliveries: Number(v('deliveries')) };
      });
    const first = await read();
    await until('a newer stats message', async () => (await read()).ts > first.ts);
    await until('the dashboard matches /stats', async () => {
      const shown = await read();
      const stats = await admin.stats();
      return (
        shown.connections === String(stats.connections) &&
        shown.websockets === String(stats.connections - stats.sse_streams) &&
        shown.sse === String(stats.sse_streams) &&
        shown.topics === String(stats.topics) &&
        shown.publications <= stats.publications &&
        shown.publications >= publishedByTest &&
        shown.deliveries <= stats.deliveries &&
        shown.deliveries > 0
      );
    });
    const stats = await admin.stats();
    assert.equal(stats.sse_streams, 4, 'three followers and the dashboard itself');
    assert.ok(stats.bytes_out > 0);
    // The charts are drawn (uPlot canvases sized to their boxes).
    const canvases = await page.$$eval('.charts canvas', (cs) => cs.map((c) => c.width * c.height));
    assert.equal(canvases.length, 4);
    assert.ok(canvases.every((area) => area > 10000));

    // The topic browser: the state document, live.
    await page.fill('#prefix', 'cfg:');
    await page.click('#topic-search button');
    await page.click('#topic-table tr[data-topic="cfg:prod"]');
    await until('the document shows', async () => (await page.textContent('#detail-body')).includes(`"limit": ${n}`));
    await admin.patch('cfg:prod', [{ op: 'replace', path: '/limit', value: 4242 }]);
    await until('the change shows', async () => (await page.textContent('#detail-body')).includes('"limit": 4242'));
    await page.fill('#prefix', '');
    await page.click('#topic-search button');
    await page.click('#topic-table tr[data-topic="cfg:prod"]');

    mkdirSync(artifacts, { recursive: true });
    const shot = join(artifacts, 'dashboard.png');
    await page.screenshot({ path: shot });
    if (process.env.UPDATE_SCREENSHOT === '1') copyFileSync(shot, join(repo, 'docs', 'dashboard.png'));
  } finally {
    for (const t of followers) t.close();
    await page.close();
  }
});
