// Unit tests of the client: its pure rules, and its state machine driven through an
// in-memory WebSocket (no network; the browser tests use a real gateway).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Tidings,
  backoffDelay,
  parseVersion,
  isPattern,
  patternMatches,
  matchesFilter,
  buildCursor,
  parseCursor,
  SseParser,
  tokenExpiry,
} from '../tidings.js';

test('backoff: full jitter within min(cap, base * 2^attempt)', () => {
  const b = { base: 500, cap: 30000 };
  assert.equal(backoffDelay(0, b, () => 0), 0);
  assert.equal(backoffDelay(0, b, () => 0.999999) < 500, true);
  assert.equal(backoffDelay(3, b, () => 0.5), 2000);
  assert.equal(backoffDelay(20, b, () => 0.5), 15000, 'capped');
  assert.equal(backoffDelay(1000, b, () => 1), 30000, 'no overflow for huge attempts');
  const samples = Array.from({ length: 2000 }, () => backoffDelay(4, b));
  const mean = samples.reduce((a, x) => a + x, 0) / samples.length;
  assert.ok(Math.abs(mean - 4000) < 400, `uniform over [0, 8000): mean ${mean}`);
  assert.ok(Math.min(...samples) < 800 && Math.max(...samples) > 7200);
});

test('versions, patterns and filters follow the gateway rules', () => {
  assert.deepEqual(parseVersion('6a2f04586e6e7d74:12'), { epoch: '6a2f04586e6e7d74', offset: 12 });
  for (const bad of ['', '6a2f:1', '6a2f04586e6e7d74', '6a2f04586e6e7d74:x', null, 7]) assert.equal(parseVersion(bad), null);
  assert.ok(isPattern('runs:*') && isPattern('a:**') && !isPattern('runs:42') && !isPattern('a*b'));
  assert.ok(patternMatches('myapp:*', 'myapp:prod'));
  assert.ok(!patternMatches('myapp:*', 'myapp:prod:eu'));
  assert.ok(!patternMatches('myapp:*', 'myapp'));
  assert.ok(patternMatches('shared:**', 'shared:a:b:c') && !patternMatches('shared:**', 'shared'));
  assert.ok(patternMatches('*:prod', 'x:prod') && !patternMatches('*:prod', 'prod'));
  assert.ok(patternMatches('**', 'anything:at:all') && !patternMatches('**', '_tidings:stats'), 'reserved topics match no pattern');
  assert.ok(matchesFilter(null, 5));
  assert.ok(matchesFilter({ status: ['running', 'failed'] }, { status: 'failed', x: 1 }));
  assert.ok(!matchesFilter({ status: ['running'] }, { status: 'done' }));
  assert.ok(!matchesFilter({ status: ['running'] }, { other: 1 }));
  assert.ok(!matchesFilter({ status: ['running'] }, ['running']));
  assert.ok(matchesFilter({ a: [1], b: [true, null] }, { a: 1, b: null }));
  assert.ok(!matchesFilter({ a: [1] }, { a: '1' }), 'values compare as JSON scalars');
});

test('SSE cursors round-trip, by name and by index', () => {
  // A topic named `b` goes by its index, so it is never read as the base time.
  const c = buildCursor([['runs:1', '6a2f04586e6e7d74:3'], ['b', 'fa72f66150a741c5:9']], 1700000000000, ['b']);
  assert.equal(c, 'c1;b=1700000000000;runs:1=6a2f04586e6e7d74:3;#0=fa72f66150a741c5:9');
  const parsed = parseCursor(c, ['b']);
  assert.equal(parsed.base, 1700000000000);
  assert.equal(parsed.versions.get('runs:1'), '6a2f04586e6e7d74:3');
  assert.equal(parsed.versions.get('b'), 'fa72f66150a741c5:9');
  const byIndex = parseCursor('c1;#1=6a2f04586e6e7d74:4', ['x', 'y']);
  assert.equal(byIndex.versions.get('y'), '6a2f04586e6e7d74:4');
  assert.equal(parseCursor('6a2f04586e6e7d74:4', ['x']), null);
});

test('the SSE parser handles split chunks, multi-line data, ids, retry and comments', () => {
  const p = new SseParser();
  const all = [];
  const text = 'retry: 3000\n\nid: c1;#0=6a2f04586e6e7d74:1\nevent: event\ndata: {"a":\ndata: 1}\n\n: heartbeat\n\nid: c1;#0=6a2f04586e6e7d74:2\n\nevent: close\r\ndata: {"type":"close","code":1001}\r\n\r\n';
  for (let i = 0; i < text.length; i += 7) all.push(...p.push(text.slice(i, i + 7)));
  const events = all.filter((e) => e.event);
  assert.deepEqual(all.find((e) => e.retry), { retry: 3000 });
  assert.ok(all.some((e) => e.comment));
  assert.equal(events.length, 3);
  assert.deepEqual(JSON.parse(events[0].data), { a: 1 });
  assert.equal(events[0].id, 'c1;#0=6a2f04586e6e7d74:1');
  assert.equal(events[1].data, '', 'an id-only event');
  assert.equal(events[2].event, 'close');
});

test('tokenExpiry reads a JWT exp and nothing else', () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  assert.equal(tokenExpiry(`${b64({ alg: 'HS256' })}.${b64({ exp: 1234, sub: 'u' })}.sig`), 1234);
  assert.equal(tokenExpiry('an-api-key'), null);
  assert.equal(tokenExpiry(`${b64({})}.${b64({ sub: 'u' })}.sig`), null);
  assert.equal(tokenExpiry('a.!!!.c'), null);
});

// ---------------------------------------------------------------------------------------
// The state machine over an in-memory WebSocket.

const E = '6a2f04586e6e7d74';

class FakeSocket {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {
    this.readyState = 3;
  }
  // Test side:
  open() {
    this.readyState = 1;
    this.onopen?.();
  }
  receive(msg) {
    this.onmessage?.({ data: JSON.stringify(msg) });
  }
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: '' });
  }
  last(type) {
    return this.sent.filter((m) => m.type === type).at(-1);
  }
}

async function until(check, timeout = 5000) {
  const deadline = Date.now() + timeout;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 5));
  }
}

const tick = () => new Promise((r) => setTimeout(r, 0));
async function settle() {
  for (let i = 0; i < 5; i++) await tick();
}

function client(options = {}) {
  FakeSocket.all = [];
  return new Tidings('http://gw.test', {
    WebSocket: FakeSocket,
    fetch: async () => ({ ok: false }),
    random: () => 0,
    backoff: { base: 1, cap: 4, healthy: 100000 },
    ...options,
  });
}

test('one socket carries every subscription; the ack version makes a quiet topic resumable', async () => {
  const t = client({ token: 'tok.en.x' });
  const got = [];
  t.subscribe('runs:1', (m) => got.push(['a', m.offset]));
  t.subscribe('runs:2', (m) => got.push(['b', m.offset]), { filter: { status: ['failed'] } });
  t.subscribe('runs:*', (m) => got.push(['p', m.topic, m.offset]));
  await settle();
  assert.equal(FakeSocket.all.length, 1);
  const ws = FakeSocket.all[0];
  assert.equal(ws.url, 'ws://gw.test/ws');
  assert.deepEqual(ws.protocols, ['tidings.v1', 'tidings.token.tok.en.x']);
  ws.open();
  const subs = ws.sent.filter((m) => m.type === 'subscribe');
  assert.equal(subs.length, 2, 'one request per distinct filter');
  assert.deepEqual(subs.find((s) => s.filter).topics, ['runs:2']);
  const plain = subs.find((s) => !s.filter);
  assert.deepEqual(plain.topics, ['runs:1']);
  assert.deepEqual(plain.patterns, ['runs:*']);
  ws.receive({ type: 'subscribed', id: plain.id, topics: ['runs:1'], patterns: ['runs:*'], versions: { 'runs:1': `${E}:7` } });
  ws.receive({ type: 'event', topic: 'runs:1', offset: 8, version: `${E}:8`, data: {} });
  ws.receive({ type: 'event', topic: 'runs:1', offset: 8, version: `${E}:8`, data: {} }); // a duplicate
  ws.receive({ type: 'event', topic: 'runs:2', offset: 3, version: `${E}:3`, data: { status: 'failed' } });
  ws.receive({ type: 'event', topic: 'runs:3', offset: 1, version: `${E}:1`, data: {} });
  assert.deepEqual(got, [['a', 8], ['p', 'runs:1', 8], ['b', 3], ['p', 'runs:2', 3], ['p', 'runs:3', 1]]);
  assert.equal(t.stats.duplicates, 1);
  // The connection drops: the next one resumes every topic from its version.
  ws.drop();
  await settle();
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(FakeSocket.all.length, 2);
  const again = FakeSocket.all[1];
  again.open();
  const resumed = again.sent.filter((m) => m.type === 'subscribe');
  assert.deepEqual(Object.assign({}, ...resumed.map((s) => s.since || {})), { 'runs:1': `${E}:8`, 'runs:2': `${E}:3` });
  t.close();
});

test('state: a change applies only on its old version; otherwise resync, then the replay', async () => {
  const t = client();
  const docs = [];
  const h = t.state('cfg:prod', (doc, version) => docs.push([structuredClone(doc), version]));
  await settle();
  const ws = FakeSocket.all[0];
  ws.open();
  ws.receive({ type: 'subscribed', id: 1, topics: ['cfg:prod'], patterns: [], versions: { 'cfg:prod': `${E}:1` } });
  ws.receive({ type: 'snapshot', topic: 'cfg:prod', version: `${E}:1`, state: { limit: 1 } });
  ws.receive({ type: 'change', topic: 'cfg:prod', diff: [{ op: 'replace', path: '/limit', value: 2 }], old_version: `${E}:1`, new_version: `${E}:2` });
  assert.deepEqual(docs, [[{ limit: 1 }, `${E}:1`], [{ limit: 2 }, `${E}:2`]]);
  assert.deepEqual(h.doc, { limit: 2 });
  // A change from a version this client does not hold: not applied, resync asked.
  ws.receive({ type: 'change', topic: 'cfg:prod', diff: [{ op: 'add', path: '/x', value: 1 }], old_version: `${E}:3`, new_version: `${E}:4` });
  assert.deepEqual(ws.last('resync'), { type: 'resync', topic: 'cfg:prod', last_version: `${E}:2` });
  assert.equal(docs.length, 2);
  // The replay: 2 -> 3 -> 4, and a repeated change is ignored.
  ws.receive({ type: 'change', topic: 'cfg:prod', diff: [{ op: 'add', path: '/y', value: 0 }], old_version: `${E}:2`, new_version: `${E}:3` });
  ws.receive({ type: 'change', topic: 'cfg:prod', diff: [{ op: 'add', path: '/x', value: 1 }], old_version: `${E}:3`, new_version: `${E}:4` });
  ws.receive({ type: 'change', topic: 'cfg:prod', diff: [{ op: 'add', path: '/x', value: 1 }], old_version: `${E}:3`, new_version: `${E}:4` });
  assert.deepEqual(h.doc, { limit: 2, y: 0, x: 1 });
  assert.equal(h.version, `${E}:4`);
  // A patch that does not apply to the local document: resync, document unchanged.
  ws.receive({ type: 'change', topic: 'cfg:prod', diff: [{ op: 'remove', path: '/nope' }], old_version: `${E}:4`, new_version: `${E}:5` });
  assert.equal(ws.sent.filter((m) => m.type === 'resync').length, 2);
  assert.deepEqual(h.doc, { limit: 2, y: 0, x: 1 });
  // A fresh snapshot replaces it.
  ws.receive({ type: 'snapshot', topic: 'cfg:prod', version: `${E}:5`, state: { limit: 5 } });
  assert.deepEqual(h.doc, { limit: 5 });
  t.close();
});

test('closed stops the topic: no resubscribe, and the connection goes when nothing is left', async () => {
  const t = client();
  const got = [];
  t.subscribe('jobs:1', (m) => got.push(m.type));
  await settle();
  const ws = FakeSocket.all[0];
  ws.open();
  ws.receive({ type: 'closed', topic: 'jobs:1', version: `${E}:3` });
  await settle();
  assert.deepEqual(got, ['closed']);
  assert.equal(t.status, 'idle');
  assert.equal(ws.readyState, 3, 'the socket is closed');
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(FakeSocket.all.length, 1, 'no reconnect');
  // A later subscriber to the closed topic is told at once, without a connection.
  const late = [];
  t.subscribe('jobs:1', (m) => late.push(m.type));
  await settle();
  assert.deepEqual(late, ['closed']);
  assert.equal(FakeSocket.all.length, 1);
  t.close();
});

test('a silent WebSocket is pinged, then given up on and replaced', async () => {
  const t = client({ pingInterval: 20, pongTimeout: 20 });
  t.subscribe('a', () => {});
  await settle();
  FakeSocket.all[0].open();
  const ws = FakeSocket.all[0];
  await until(() => ws.last('ping'));
  await until(() => FakeSocket.all.length >= 2);
  assert.equal(ws.readyState, 3, 'the silent socket was closed');
  t.close();
});

test('token_expiring asks getToken and sends refresh', async () => {
  let n = 0;
  const t = client({ getToken: async () => `t${++n}` });
  t.subscribe('a', () => {});
  await settle();
  const ws = FakeSocket.all[0];
  assert.deepEqual(ws.protocols, ['tidings.v1', 'tidings.token.t1']);
  ws.open();
  ws.receive({ type: 'token_expiring', expires: 1 });
  await settle();
  assert.deepEqual(ws.last('refresh'), { type: 'refresh', token: 't2', id: ws.last('refresh').id });
  t.close();
});

test("tokenIn: 'query' puts the token in the WebSocket URL instead of the subprotocol", async () => {
  const t = client({ token: 'a.b.c', tokenIn: 'query' });
  t.subscribe('a', () => {});
  await settle();
  assert.equal(FakeSocket.all[0].url, 'ws://gw.test/ws?token=a.b.c');
  assert.deepEqual(FakeSocket.all[0].protocols, ['tidings.v1']);
  t.close();
});
