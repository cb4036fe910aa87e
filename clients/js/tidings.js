// tidings browser client: one connection for every subscription, resume by version,
// WebSocket -> SSE -> long-poll fallbacks, state documents kept with RFC 6902 patches.
// An ES module with no build step; docs/CLIENT.md describes the rules it follows.
import { applyPatch } from './fast-json-patch.js';

/** Settings a `new Tidings(url, options)` starts from. */
export const DEFAULTS = Object.freeze({
  transports: ['websocket', 'sse', 'poll'],
  // Reconnect delay: uniformly random in [0, min(cap, base * 2^attempt)] ("full jitter"),
  // attempt counted from 0 and reset once a connection stayed up for `healthy`.
  backoff: Object.freeze({ base: 500, cap: 30000, healthy: 10000 }),
  // An application-level ping after this long without a WebSocket message, and the
  // connection declared dead if nothing answers within `pongTimeout`.
  pingInterval: 20000,
  pongTimeout: 10000,
  // A transport that has not opened within this long has failed.
  openTimeout: 10000,
  // An SSE stream silent this long (the gateway sends a heartbeat comment every
  // ping_interval, 30 s by default) is dead.
  sseSilence: 70000,
  // Long-poll wait (seconds, the gateway caps it at max_poll_wait), how often a state
  // document or more than `maxLongPolls` topics are polled, and the concurrency bound that
  // keeps polls within a browser's six connections per host.
  pollWait: 25,
  pollInterval: 2000,
  maxLongPolls: 4,
  // Ask `getToken` for a new token this many seconds before the current one expires.
  refreshBefore: 60,
  // Where a token travels: 'header' (the WebSocket subprotocol, `Authorization` over SSE
  // and polling) or 'query' (`?token=`, for proxies that drop those; URLs end up in logs).
  tokenIn: 'header',
  // Fall back to the next transport after this many attempts in a row that failed to
  // come up while the gateway answered HTTP (one refused upgrade may be a passing 503).
  fallbackAfter: 2,
});

// ---------------------------------------------------------------------------------------
// Pure helpers (exported for tests and for applications).

/** The delay before reconnect attempt `attempt` (0-based): full jitter. */
export function backoffDelay(attempt, { base, cap }, random = Math.random) {
  const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 30));
  return random() * ceiling;
}

/** `"epoch:offset"` -> `{ epoch, offset }`, or null when it is not a version. */
export function parseVersion(version) {
  if (typeof version !== 'string') return null;
  const m = /^([0-9a-f]{16}):(\d+)$/.exec(version);
  return m ? { epoch: m[1], offset: Number(m[2]) } : null;
}

/** Whether `name` is a pattern (a `*` or `**` segment) rather than a topic. */
export function isPattern(name) {
  return name.split(':').some((s) => s === '*' || s === '**');
}

/** The gateway's pattern rule: `*` one segment, a trailing `**` one or more; reserved
 * topics (`_tidings:...`) match no pattern. */
export function patternMatches(pattern, topic) {
  const t = topic.split(':');
  if (t[0] === '_tidings') return false;
  const p = pattern.split(':');
  for (let i = 0; i < p.length; i++) {
    if (p[i] === '**') return t.length > i;
    if (i >= t.length) return false;
    if (p[i] !== '*' && p[i] !== t[i]) return false;
  }
  return t.length === p.length;
}

/** The gateway's filter rule: every field of `filter` must be a top-level field of the
 * event's data (an object) whose value is one of the listed scalars. */
export function matchesFilter(filter, data) {
  if (!filter) return true;
  if (data === null || typeof data !== 'object' || Array.isArray(data)) return false;
  for (const [field, values] of Object.entries(filter)) {
    if (!Object.prototype.hasOwnProperty.call(data, field)) return false;
    const v = data[field];
    if (v !== null && typeof v === 'object') return false;
    if (!values.some((x) => x === v)) return false;
  }
  return true;
}

/** A multi-topic SSE resume cursor (docs/PROTOCOL.md): `c1;b=<ms>;#<i>=<E:N>;<topic>=<E:N>`,
 * a topic of the stream's `topics=` list (`topics`) by its index, any other by name. */
export function buildCursor(versions, baseMs, topics = []) {
  let out = 'c1';
  if (baseMs != null) out += `;b=${baseMs}`;
  for (const [topic, version] of versions) {
    const i = topics.indexOf(topic);
    out += i >= 0 ? `;#${i}=${version}` : `;${topic}=${version}`;
  }
  return out;
}

/** Reads a cursor back: `{ base, versions: Map(topic -> version) }` (indexes `#i` resolved
 * against `topics`, the stream's `topics=` list). */
export function parseCursor(id, topics) {
  const fields = id.split(';');
  if (fields[0] !== 'c1') return null;
  const out = { base: null, versions: new Map() };
  for (const field of fields.slice(1)) {
    const eq = field.lastIndexOf('=');
    if (eq < 0) continue;
    const key = field.slice(0, eq);
    const value = field.slice(eq + 1);
    if (key === 'b') out.base = Number(value);
    else if (key.startsWith('#')) {
      const topic = topics[Number(key.slice(1))];
      if (topic) out.versions.set(topic, value);
    } else out.versions.set(key, value);
  }
  return out;
}

/** An incremental Server-Sent Events parser (the WHATWG rules: `event:`, `data:` lines
 * joined by `\n`, `id:`, `retry:`, comments, a blank line dispatches). */
export class SseParser {
  constructor() {
    this.buffer = '';
    this.reset();
  }

  reset() {
    this.event = '';
    this.data = [];
    this.id = null;
  }

  /** Feeds text; returns the events it completed as `{ event, data, id, retry }`. */
  push(text) {
    this.buffer += text;
    const out = [];
    let start = 0;
    for (;;) {
      const nl = this.buffer.indexOf('\n', start);
      if (nl < 0) break;
      let line = this.buffer.slice(start, nl);
      start = nl + 1;
      if (line.endsWith('\r')) line = line.slice(0, -1);
      if (line === '') {
        if (this.data.length || this.id !== null || this.event) {
          out.push({ event: this.event || 'message', data: this.data.join('\n'), id: this.id });
        }
        this.reset();
        continue;
      }
      if (line.startsWith(':')) {
        out.push({ comment: true });
        continue;
      }
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') this.event = value;
      else if (field === 'data') this.data.push(value);
      else if (field === 'id') this.id = value;
      else if (field === 'retry' && /^\d+$/.test(value)) out.push({ retry: Number(value) });
    }
    this.buffer = this.buffer.slice(start);
    return out;
  }
}

/** When a JWT expires (its `exp`, Unix seconds), or null for anything else. */
export function tokenExpiry(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = JSON.parse(atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4)));
    return typeof json.exp === 'number' ? json.exp : null;
  } catch {
    return null;
  }
}

const now = () => Date.now();

/** Topics the client remembers versions of; past it the oldest unsubscribed ones go. */
const MAX_RECORDS = 4096;

// ---------------------------------------------------------------------------------------
// What the client keeps per topic.

class TopicRecord {
  constructor(name) {
    this.name = name;
    this.epoch = null; // of the last version processed
    this.offset = 0;
    this.doc = undefined; // state documents
    this.closed = false;
    this.subs = new Set(); // local subscriptions by this exact name
    this.resyncing = false;
  }

  get version() {
    return this.epoch === null ? null : `${this.epoch}:${this.offset}`;
  }

  /** Whether `v` (parsed) is at or before what was processed: a duplicate. */
  seen(v) {
    return this.epoch === v.epoch && v.offset <= this.offset;
  }

  at(v) {
    this.epoch = v.epoch;
    this.offset = v.offset;
  }
}

// ---------------------------------------------------------------------------------------
// The client.

/**
 * A connection to one tidings gateway, shared by every subscription made through it.
 *
 * `new Tidings("https://gw.example", { token | getToken, transports, backoff, ... })`.
 */
export class Tidings {
  constructor(url, options = {}) {
    const base = String(url).replace(/\/+$/, '');
    this.url = base;
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...options.backoff } };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.fetch = options.fetch || globalThis.fetch.bind(globalThis);
    this.random = options.random || Math.random;
    this.token = options.token || null;
    this.topics = new Map(); // name -> TopicRecord
    this.patterns = new Map(); // pattern -> Set of subscriptions
    this.listeners = new Map(); // event name -> Set of functions
    this.status = 'idle'; // idle | connecting | open | waiting | closed
    this.transport = null;
    this.transportIndex = 0;
    this.transportFailures = 0;
    this.attempt = 0;
    this.timers = new Set();
    this.syncQueued = false;
    this.stats = { connects: 0, failures: 0, fallbacks: 0, resyncs: 0, duplicates: 0 };
    this.sseBase = null; // a pattern stream's base time, from its cursor
    this.onBrowserEvent = this.onBrowserEvent.bind(this);
    if (typeof addEventListener === 'function') {
      addEventListener('online', this.onBrowserEvent);
      addEventListener('offline', this.onBrowserEvent);
    }
    if (typeof document !== 'undefined' && document.addEventListener) {
      document.addEventListener('visibilitychange', this.onBrowserEvent);
    }
  }

  // ----- public API --------------------------------------------------------------------

  /**
   * Follows a topic or a pattern: `cb(msg)` for each message as the protocol sends it
   * (`event`, `snapshot`, `change`, `history_truncated`, `closed`), each at most once and
   * in order. `options.filter` is the protocol's filter (`{ status: ["failed"] }`), applied
   * by the gateway where it can and always by the client; `options.since` resumes from a
   * version the application kept.
   */
  subscribe(name, cb, options = {}) {
    return this.addSubscription(name, { kind: 'events', cb, filter: options.filter || null, since: options.since });
  }

  /**
   * Follows a state document: `cb(doc, version)` with the whole document after its
   * snapshot and after every change applied. The handle's `doc` and `version` read the
   * current ones.
   */
  state(topic, cb, options = {}) {
    if (isPattern(topic)) throw new TypeError('state() takes a topic, not a pattern');
    return this.addSubscription(topic, { kind: 'state', cb, filter: null, since: options.since, onClosed: options.onClosed });
  }

  /** Adds a listener: `status` (status, transport), `error` ({ code, message, topic? }),
   * `open` (transport name), `reconnect` ({ attempt, delay }). Returns a remover. */
  on(event, fn) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(fn);
    return () => this.listeners.get(event)?.delete(fn);
  }

  /** Ends every subscription and the connection. */
  close() {
    this.setStatus('closed');
    this.clearTimers();
    this.stopTransport();
    this.topics.clear();
    this.patterns.clear();
    if (typeof removeEventListener === 'function') {
      removeEventListener('online', this.onBrowserEvent);
      removeEventListener('offline', this.onBrowserEvent);
    }
    if (typeof document !== 'undefined' && document.removeEventListener) {
      document.removeEventListener('visibilitychange', this.onBrowserEvent);
    }
  }

  /** The transport in use (`websocket`, `sse`, `poll`) or null. */
  get transportName() {
    return this.transport ? this.transport.name : null;
  }

  // ----- subscriptions -----------------------------------------------------------------

  addSubscription(name, spec) {
    if (this.status === 'closed') throw new Error('this Tidings client is closed');
    if (typeof spec.cb !== 'function') throw new TypeError('a callback is required');
    let resolveReady;
    const sub = {
      name,
      ...spec,
      active: true,
      ready: new Promise((r) => (resolveReady = r)),
      resolveReady: () => resolveReady(),
    };
    if (isPattern(name)) {
      if (!this.patterns.has(name)) this.patterns.set(name, new Set());
      this.patterns.get(name).add(sub);
    } else {
      const rec = this.record(name);
      if (spec.since && rec.epoch === null) {
        const v = parseVersion(spec.since);
        if (v) rec.at(v);
      }
      rec.subs.add(sub);
      if (rec.closed) {
        sub.resolveReady();
        queueMicrotask(() => sub.active && this.deliverClosedTo(sub, rec));
      } else if (spec.kind === 'state' && rec.doc !== undefined) {
        const doc = rec.doc;
        const version = rec.version;
        sub.resolveReady();
        queueMicrotask(() => sub.active && spec.cb(doc, version));
      } else if (this.transport && this.transport.ready(name)) {
        sub.resolveReady();
      }
    }
    this.queueSync();
    const client = this;
    return {
      get ready() {
        return sub.ready;
      },
      get doc() {
        return client.topics.get(name)?.doc;
      },
      get version() {
        return client.topics.get(name)?.version ?? null;
      },
      unsubscribe() {
        if (!sub.active) return;
        sub.active = false;
        if (isPattern(name)) {
          const set = client.patterns.get(name);
          set?.delete(sub);
          if (set && set.size === 0) client.patterns.delete(name);
        } else {
          client.topics.get(name)?.subs.delete(sub);
        }
        client.queueSync();
      },
    };
  }

  record(name) {
    let rec = this.topics.get(name);
    if (!rec) {
      rec = new TopicRecord(name);
      this.topics.set(name, rec);
      if (this.topics.size > MAX_RECORDS) this.prune();
    }
    return rec;
  }

  /** Forgets the oldest topics nothing subscribes to by name (seen through patterns, or
   * unsubscribed), so a pattern over many topics cannot grow the client without bound. */
  prune() {
    for (const [name, rec] of this.topics) {
      if (this.topics.size <= MAX_RECORDS / 2) break;
      if (rec.subs.size === 0) this.topics.delete(name);
    }
  }

  /** What the server side should hold now: exact topics (not closed, with a local
   * subscriber) with their `since` and filter, and patterns with theirs. */
  desired() {
    const topics = new Map();
    for (const rec of this.topics.values()) {
      if (rec.closed || rec.subs.size === 0) continue;
      topics.set(rec.name, { since: rec.version, filter: uniformFilter(rec.subs), state: [...rec.subs].some((s) => s.kind === 'state') });
    }
    const patterns = new Map();
    for (const [p, subs] of this.patterns) {
      if (subs.size) patterns.set(p, { filter: uniformFilter(subs) });
    }
    return { topics, patterns };
  }

  queueSync() {
    if (this.syncQueued) return;
    this.syncQueued = true;
    queueMicrotask(() => {
      this.syncQueued = false;
      this.sync();
    });
  }

  /** Brings the connection in line with the subscriptions: connect, update, or let go. */
  sync() {
    if (this.status === 'closed') return;
    const want = this.desired();
    const empty = want.topics.size === 0 && want.patterns.size === 0;
    if (empty) {
      // Nothing left to follow (every topic closed or unsubscribed): no connection, no
      // polling, until something is subscribed again.
      this.clearTimers();
      this.stopTransport();
      this.attempt = 0;
      this.setStatus('idle');
      return;
    }
    if (this.transport) this.transport.update(want);
    else if (this.status === 'idle') this.connect();
  }

  // ----- connecting --------------------------------------------------------------------

  async currentToken() {
    const getToken = this.options.getToken;
    if (!getToken) return this.token;
    const exp = tokenExpiry(this.token);
    const fresh = this.token && (exp === null || exp - now() / 1000 > this.options.refreshBefore);
    if (!fresh) this.token = await getToken();
    return this.token;
  }

  async connect() {
    if (this.status === 'closed' || this.transport) return;
    if (typeof navigator !== 'undefined' && navigator.onLine === false) {
      // Offline: wait for the `online` event rather than spend attempts.
      this.setStatus('waiting');
      return;
    }
    const kinds = this.options.transports;
    const kind = kinds[Math.min(this.transportIndex, kinds.length - 1)];
    this.setStatus('connecting');
    let token;
    try {
      token = await this.currentToken();
    } catch (e) {
      this.emit('error', { code: 'token_unavailable', message: String(e) });
      this.scheduleReconnect();
      return;
    }
    if (this.status !== 'connecting' || this.transport) return;
    const Kind = { websocket: WsTransport, sse: SseTransport, poll: PollTransport }[kind];
    if (!Kind) throw new Error(`unknown transport ${kind}`);
    this.transport = new Kind(this, token);
    this.transport.start(this.desired());
  }

  /** A transport reports that it is up. */
  opened(transport) {
    if (transport !== this.transport) return;
    this.stats.connects++;
    this.transportFailures = 0;
    this.setStatus('open');
    this.emit('open', transport.name);
    this.later(this.options.backoff.healthy, () => {
      // Up long enough: the next failure starts the backoff from the beginning again.
      if (transport === this.transport) this.attempt = 0;
    });
  }

  /**
   * A transport reports its end. `info.opened` says whether it had come up; `info.code` a
   * close code (WebSocket or the SSE `close` event); `info.status` an HTTP status.
   */
  async failed(transport, info = {}) {
    if (transport !== this.transport) return;
    this.transport = null;
    transport.stop();
    this.clearTimers();
    if (this.status === 'closed') return;
    this.stats.failures++;
    if (info.code === 4001) this.token = null; // expired: ask getToken again
    const want = this.desired();
    if (want.topics.size === 0 && want.patterns.size === 0) {
      this.setStatus('idle');
      return;
    }
    const kinds = this.options.transports;
    if (!info.opened && !AUTH_REFUSALS.has(info.code)) {
      // The transport never came up. If the gateway answers plain HTTP, the transport
      // itself is what fails here (an upgrade refused, a proxy that buffers streams):
      // fall back to the next one at once. Otherwise the gateway is away: back off.
      this.setStatus('waiting');
      const reachable = await this.probe();
      if (this.status === 'closed' || this.transport) return;
      if (reachable && this.transportIndex < kinds.length - 1 && ++this.transportFailures >= this.options.fallbackAfter) {
        this.transportIndex++;
        this.transportFailures = 0;
        this.stats.fallbacks++;
        this.setStatus('idle');
        this.connect();
        return;
      }
      if (!reachable) {
        // The gateway is away: start from the best transport once it is back.
        this.transportIndex = 0;
        this.transportFailures = 0;
      }
    }
    this.scheduleReconnect();
  }

  scheduleReconnect() {
    if (this.status === 'closed') return;
    const delay = backoffDelay(this.attempt, this.options.backoff, this.random);
    this.emit('reconnect', { attempt: this.attempt, delay });
    this.attempt++;
    this.setStatus('waiting');
    this.reconnectTimer = this.later(delay, () => {
      this.reconnectTimer = null;
      this.setStatus('idle');
      this.connect();
    });
  }

  /** Whether the gateway answers `GET /healthz` (within the open timeout). */
  async probe() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), this.options.openTimeout);
    try {
      const res = await this.fetch(`${this.url}/healthz`, { cache: 'no-store', signal: abort.signal });
      return res.ok;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  onBrowserEvent(ev) {
    if (this.status === 'closed') return;
    const visible = typeof document === 'undefined' || document.visibilityState !== 'hidden';
    if (ev.type === 'offline') return;
    if ((ev.type === 'online' || (ev.type === 'visibilitychange' && visible)) && this.status === 'waiting') {
      // Back online, or the page is looked at again: try now rather than at the end of
      // a backoff that may have grown long while nobody watched.
      if (this.reconnectTimer) {
        clearTimeout(this.reconnectTimer);
        this.timers.delete(this.reconnectTimer);
        this.reconnectTimer = null;
      }
      this.setStatus('idle');
      this.connect();
    } else if (ev.type === 'visibilitychange' && visible && this.transport) {
      this.transport.check();
    }
  }

  stopTransport() {
    const t = this.transport;
    this.transport = null;
    if (t) t.stop();
  }

  later(ms, fn) {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      fn();
    }, ms);
    this.timers.add(timer);
    return timer;
  }

  clearTimers() {
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    this.reconnectTimer = null;
  }

  setStatus(status) {
    if (this.status === status) return;
    if (this.status === 'closed') return;
    this.status = status;
    this.emit('status', status, this.transportName);
  }

  emit(event, ...args) {
    for (const fn of this.listeners.get(event) || []) {
      try {
        fn(...args);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  // ----- messages ----------------------------------------------------------------------

  /** Marks topics as held by the server (their subscriptions' `ready` resolve). */
  acknowledged(names, versions = {}) {
    for (const name of names) {
      const rec = this.topics.get(name);
      if (!rec) continue;
      const v = parseVersion(versions[name]);
      if (v && rec.epoch === null) rec.at(v);
      for (const sub of rec.subs) sub.resolveReady();
    }
  }

  patternsAcknowledged(patterns) {
    for (const p of patterns) for (const sub of this.patterns.get(p) || []) sub.resolveReady();
  }

  /** One message from any transport, in the protocol's shape. */
  message(msg, transport) {
    if (transport !== this.transport || !msg || typeof msg !== 'object') return;
    switch (msg.type) {
      case 'event':
        return this.onEvent(msg);
      case 'snapshot':
        return this.onSnapshot(msg);
      case 'change':
        return this.onChange(msg);
      case 'history_truncated':
        return this.deliver(msg.topic, msg);
      case 'closed':
        return this.onClosed(msg);
      case 'error':
        return this.emit('error', msg);
      default:
    }
  }

  onEvent(msg) {
    const v = parseVersion(msg.version);
    if (!v) return;
    const rec = this.record(msg.topic);
    if (rec.seen(v)) {
      this.stats.duplicates++;
      return;
    }
    rec.at(v);
    this.deliver(msg.topic, msg);
  }

  onSnapshot(msg) {
    const v = parseVersion(msg.version);
    if (!v) return;
    const rec = this.record(msg.topic);
    rec.resyncing = false;
    if (rec.doc !== undefined && rec.epoch === v.epoch && v.offset === rec.offset) {
      this.stats.duplicates++;
      return;
    }
    rec.doc = msg.state;
    rec.at(v);
    this.deliver(msg.topic, msg);
    this.deliverState(rec);
  }

  onChange(msg) {
    const rec = this.record(msg.topic);
    const to = parseVersion(msg.new_version);
    if (!to) return;
    if (rec.doc !== undefined && rec.seen(to)) {
      this.stats.duplicates++;
      return;
    }
    if (rec.doc === undefined || msg.old_version !== rec.version) {
      // Not a change of the document held: ask for what came after it (or a snapshot).
      this.resync(rec);
      return;
    }
    let doc;
    try {
      // Validated: an operation that does not fit the local document throws (then resync)
      // instead of being applied to a document that is not the gateway's.
      doc = applyPatch(rec.doc, msg.diff, true, false).newDocument;
    } catch {
      this.resync(rec);
      return;
    }
    rec.doc = doc;
    rec.at(to);
    rec.resyncing = false;
    this.deliver(msg.topic, msg);
    this.deliverState(rec);
  }

  resync(rec) {
    if (rec.resyncing) return;
    rec.resyncing = true;
    this.stats.resyncs++;
    if (!this.transport || !this.transport.resync(rec)) rec.resyncing = false;
  }

  onClosed(msg) {
    const rec = this.record(msg.topic);
    if (rec.closed) return;
    rec.closed = true;
    this.deliver(msg.topic, msg);
    for (const sub of rec.subs) if (sub.kind === 'state' && sub.onClosed) sub.onClosed(msg);
    this.queueSync();
  }

  deliverClosedTo(sub, rec) {
    const msg = { type: 'closed', topic: rec.name, version: rec.version };
    if (sub.kind === 'events') sub.cb(msg);
    else if (sub.onClosed) sub.onClosed(msg);
  }

  deliver(topic, msg) {
    const rec = this.topics.get(topic);
    const data = msg.type === 'event' ? msg.data : undefined;
    if (rec) {
      for (const sub of [...rec.subs]) {
        if (!sub.active || sub.kind !== 'events') continue;
        if (msg.type === 'event' && !matchesFilter(sub.filter, data)) continue;
        call(sub.cb, msg);
      }
    }
    for (const [pattern, subs] of this.patterns) {
      if (!patternMatches(pattern, topic)) continue;
      for (const sub of [...subs]) {
        if (!sub.active) continue;
        if (msg.type === 'event' && !matchesFilter(sub.filter, data)) continue;
        call(sub.cb, msg);
      }
    }
  }

  deliverState(rec) {
    for (const sub of [...rec.subs]) {
      if (sub.active && sub.kind === 'state') {
        sub.resolveReady();
        call(sub.cb, rec.doc, rec.version);
      }
    }
  }
}

/** Refusals that another transport would get too: back off instead of falling back. */
const AUTH_REFUSALS = new Set(['unauthorized', 'invalid_request', 'invalid_token', 'token_expired', 'token_not_yet_valid', 'unknown_key', 'forbidden', 'origin_forbidden']);

function call(fn, ...args) {
  try {
    fn(...args);
  } catch (e) {
    setTimeout(() => {
      throw e;
    });
  }
}

/** The filter every subscription in `subs` shares, or null when they differ (then the
 * gateway sends everything and each subscription filters for itself). */
function uniformFilter(subs) {
  let key;
  let filter = null;
  for (const sub of subs) {
    const k = sub.filter ? JSON.stringify(sub.filter) : '';
    if (key === undefined) {
      key = k;
      filter = sub.filter;
    } else if (key !== k) return null;
  }
  return filter || null;
}

function httpHeaders(token, extra = {}) {
  const headers = { ...extra };
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

async function errorOf(res) {
  try {
    const body = await res.json();
    return { code: body.code || `http_${res.status}`, message: body.message || res.statusText };
  } catch {
    return { code: `http_${res.status}`, message: res.statusText };
  }
}

// ---------------------------------------------------------------------------------------
// Transports. Each one turns the client's desired subscriptions into the gateway's
// protocol and hands back messages in the WebSocket's shape; the client does the rest.

class WsTransport {
  constructor(client, token) {
    this.client = client;
    this.token = token;
    this.name = 'websocket';
    this.held = new Map(); // topic -> filter key the server holds
    this.heldPatterns = new Map();
    this.acked = new Set();
    this.nextId = 1;
    this.pending = new Map(); // request id -> { topics, patterns }
    this.isOpen = false;
    this.lastRx = now();
    this.pingSent = 0;
  }

  start() {
    const { client } = this;
    const inQuery = this.token && client.options.tokenIn === 'query';
    const wsUrl = client.url.replace(/^http/, 'ws') + '/ws' + (inQuery ? `?token=${encodeURIComponent(this.token)}` : '');
    const protocols = ['tidings.v1'];
    if (this.token && !inQuery) protocols.push(`tidings.token.${this.token}`);
    let ws;
    try {
      ws = new client.WebSocket(wsUrl, protocols);
    } catch (e) {
      queueMicrotask(() => client.failed(this, { opened: false, message: String(e) }));
      return;
    }
    this.ws = ws;
    this.openTimer = setTimeout(() => this.fail({ opened: false, code: 'open_timeout' }), client.options.openTimeout);
    ws.onopen = () => {
      clearTimeout(this.openTimer);
      this.isOpen = true;
      this.lastRx = now();
      // What is wanted now, with the versions held now (both may have moved since start).
      this.update(client.desired());
      this.heartbeat = setInterval(() => this.check(), Math.max(50, client.options.pingInterval / 4));
      client.opened(this);
    };
    ws.onmessage = (ev) => {
      this.lastRx = now();
      this.pingSent = 0;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      this.onMessage(msg);
    };
    ws.onclose = (ev) => this.fail({ opened: this.isOpen, code: ev.code, reason: ev.reason });
    // A browser follows a failed connection's `error` with `close`; some runtimes (Node
    // 20's WebSocket) send only the `error`. Before the open it is the failure either way.
    ws.onerror = () => {
      if (!this.isOpen) this.fail({ opened: false, code: 'connect_failed' });
    };
  }

  onMessage(msg) {
    const { client } = this;
    switch (msg.type) {
      case 'subscribed': {
        this.pending.delete(msg.id);
        for (const t of msg.topics || []) this.acked.add(t);
        client.acknowledged(msg.topics || [], msg.versions || {});
        client.patternsAcknowledged(msg.patterns || []);
        return;
      }
      case 'ping':
        this.send({ type: 'pong' });
        return;
      case 'pong':
      case 'unsubscribed':
      case 'refreshed':
        return;
      case 'token_expiring':
        this.refresh();
        return;
      case 'error': {
        const req = this.pending.get(msg.id);
        if (req) {
          // A refused subscribe changes nothing on the server: forget we asked, so the
          // next change of subscriptions asks again.
          this.pending.delete(msg.id);
          for (const t of req.topics) this.held.delete(t);
          for (const p of req.patterns) this.heldPatterns.delete(p);
          client.emit('error', { ...msg, topics: req.topics, patterns: req.patterns });
          return;
        }
        client.message(msg, this);
        return;
      }
      default:
        if (msg.type === 'snapshot' || msg.type === 'history_truncated') {
          const rec = client.topics.get(msg.topic);
          if (rec) rec.resyncing = false;
        }
        client.message(msg, this);
    }
  }

  async refresh() {
    const { client } = this;
    if (!client.options.getToken) return;
    try {
      client.token = await client.options.getToken();
      this.send({ type: 'refresh', token: client.token, id: `r${this.nextId++}` });
    } catch (e) {
      client.emit('error', { code: 'token_unavailable', message: String(e) });
    }
  }

  ready(topic) {
    return this.acked.has(topic);
  }

  /** Sends what changed between what the server holds and `want`. */
  update(want) {
    if (!this.isOpen) return;
    const drop = [];
    const dropPatterns = [];
    for (const [t, key] of this.held) if (!want.topics.has(t) || filterKey(want.topics.get(t).filter) !== key) drop.push(t);
    for (const [p, key] of this.heldPatterns) if (!want.patterns.has(p) || filterKey(want.patterns.get(p).filter) !== key) dropPatterns.push(p);
    if (drop.length || dropPatterns.length) {
      for (const t of drop) {
        this.held.delete(t);
        this.acked.delete(t);
      }
      for (const p of dropPatterns) this.heldPatterns.delete(p);
      this.send({ type: 'unsubscribe', topics: drop, patterns: dropPatterns });
    }
    // One subscribe per distinct filter (the protocol's filter applies to a whole request).
    const groups = new Map();
    const group = (key, filter) => {
      if (!groups.has(key)) groups.set(key, { filter, topics: [], patterns: [], since: {} });
      return groups.get(key);
    };
    for (const [t, spec] of want.topics) {
      if (this.held.has(t)) continue;
      const key = filterKey(spec.filter);
      const g = group(key, spec.filter);
      g.topics.push(t);
      if (spec.since) g.since[t] = spec.since;
      this.held.set(t, key);
    }
    for (const [p, spec] of want.patterns) {
      if (this.heldPatterns.has(p)) continue;
      const key = filterKey(spec.filter);
      group(key, spec.filter).patterns.push(p);
      this.heldPatterns.set(p, key);
    }
    for (const g of groups.values()) {
      const id = this.nextId++;
      this.pending.set(id, { topics: g.topics, patterns: g.patterns });
      const msg = { type: 'subscribe', id, topics: g.topics, patterns: g.patterns };
      if (Object.keys(g.since).length) msg.since = g.since;
      if (g.filter) msg.filter = g.filter;
      this.send(msg);
    }
  }

  resync(rec) {
    if (!this.isOpen || !this.held.has(rec.name) || !rec.version) return false;
    this.send({ type: 'resync', topic: rec.name, last_version: rec.version });
    return true;
  }

  /** The liveness rule: ping after `pingInterval` of silence, dead after `pongTimeout`. */
  check() {
    if (!this.isOpen) return;
    const { pingInterval, pongTimeout } = this.client.options;
    const t = now();
    if (this.pingSent && t - this.pingSent > pongTimeout) {
      this.fail({ opened: true, code: 'ping_timeout' });
    } else if (!this.pingSent && t - this.lastRx >= pingInterval) {
      this.pingSent = t;
      this.send({ type: 'ping', id: `p${this.nextId++}` });
    }
  }

  send(msg) {
    try {
      if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(msg));
    } catch {
      // A socket that fails to send is closing; its close event reports it.
    }
  }

  fail(info) {
    if (this.done) return;
    this.client.failed(this, info);
  }

  stop() {
    this.done = true;
    clearTimeout(this.openTimer);
    clearInterval(this.heartbeat);
    if (this.ws) {
      this.ws.onopen = this.ws.onmessage = this.ws.onclose = this.ws.onerror = null;
      try {
        this.ws.close(1000);
      } catch {
        // already closed
      }
    }
  }
}

function filterKey(filter) {
  return filter ? JSON.stringify(filter) : '';
}

/** Server-Sent Events read with `fetch`, so the token travels in `Authorization` (an
 * `EventSource` cannot set headers) and the client decides when to reconnect. */
class SseTransport {
  constructor(client, token) {
    this.client = client;
    this.token = token;
    this.name = 'sse';
    this.isOpen = false;
    this.quickRetries = 0;
    this.url = null;
    this.lastId = null;
  }

  start(want) {
    this.want = want;
    this.open();
  }

  streamUrl(want) {
    const topics = [...want.topics.keys()];
    const patterns = [...want.patterns.keys()];
    const filters = [...want.topics.values(), ...want.patterns.values()].map((s) => filterKey(s.filter));
    const oneFilter = filters.every((k) => k === filters[0]) && filters[0] ? filters[0] : null;
    const q = [];
    if (topics.length) q.push(`topics=${topics.map(encodeURIComponent).join(',')}`);
    if (patterns.length) q.push(`patterns=${patterns.map(encodeURIComponent).join(',')}`);
    if (oneFilter) q.push(`filter=${encodeURIComponent(oneFilter)}`);
    return { url: `${this.client.url}/v1/sse?${q.join('&')}`, topics };
  }

  async open() {
    const { client } = this;
    const { url, topics } = this.streamUrl(this.want);
    // Resume: the stream's own cursor when the stream is the same; otherwise one built
    // from the versions the client holds (the same contract as the WebSocket's `since`).
    let cursor = url === this.url ? this.lastId : null;
    if (!cursor) {
      const versions = [];
      for (const [t, spec] of this.want.topics) if (spec.since) versions.push([t, spec.since]);
      cursor = versions.length || client.sseBase != null ? buildCursor(versions, this.want.patterns.size ? client.sseBase : null, topics) : null;
    }
    this.url = url;
    this.topics = topics;
    this.abort = new AbortController();
    let full = cursor ? `${url}&last_event_id=${encodeURIComponent(cursor)}` : url;
    const inQuery = this.token && client.options.tokenIn === 'query';
    if (inQuery) full += `&token=${encodeURIComponent(this.token)}`;
    const openTimer = setTimeout(() => this.fail({ opened: this.isOpen, code: 'open_timeout' }), client.options.openTimeout);
    let res;
    try {
      res = await client.fetch(full, {
        headers: httpHeaders(inQuery ? null : this.token, { Accept: 'text/event-stream' }),
        cache: 'no-store',
        signal: this.abort.signal,
      });
    } catch (e) {
      clearTimeout(openTimer);
      if (!this.done && !this.restarting) this.fail({ opened: this.isOpen, message: String(e) });
      return;
    }
    if (this.done) return;
    if (res.status !== 200) {
      clearTimeout(openTimer);
      const err = await errorOf(res);
      client.emit('error', err);
      this.fail({ opened: false, status: res.status, code: err.code });
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser();
    let sawEvent = false;
    let retry = 3000;
    this.lastRx = now();
    this.silence = setInterval(() => {
      if (now() - this.lastRx > client.options.sseSilence) this.fail({ opened: this.isOpen, code: 'silent' });
    }, 1000);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || this.done) break;
        this.lastRx = now();
        for (const ev of parser.push(decoder.decode(value, { stream: true }))) {
          if (ev.retry != null) {
            retry = ev.retry;
            continue;
          }
          if (ev.comment) continue;
          if (!sawEvent) {
            sawEvent = true;
            clearTimeout(openTimer);
            this.quickRetries = 0;
            this.isOpen = true;
            client.acknowledged(topics);
            client.patternsAcknowledged([...this.want.patterns.keys()]);
            client.opened(this);
          }
          this.onEvent(ev);
          if (this.ended) break;
        }
        if (this.ended) break;
      }
    } catch (e) {
      if (this.done || this.restarting) return;
    } finally {
      clearTimeout(openTimer);
      clearInterval(this.silence);
    }
    if (this.done || this.restarting) return;
    if (!sawEvent && !this.ended && this.quickRetries < 8) {
      // `retry: 10` and an end: the request reached a kept-alive connection, and an SSE
      // stream must be its connection's first request. Again, on a fresh connection.
      this.quickRetries++;
      setTimeout(() => !this.done && this.open(), retry);
      return;
    }
    this.fail({ opened: this.isOpen, code: this.closeCode, reason: this.closeReason });
  }

  onEvent(ev) {
    const { client } = this;
    if (ev.id) {
      this.lastId = ev.id;
      const cursor = parseCursor(ev.id, this.topics);
      if (cursor) {
        if (cursor.base != null) client.sseBase = cursor.base;
        // Where each topic stood when the stream opened (an id-only event), so a
        // topic that has seen nothing still resumes exactly.
        for (const [t, v] of cursor.versions) {
          const rec = client.topics.get(t);
          const parsed = parseVersion(v);
          if (rec && parsed && rec.epoch === null) rec.at(parsed);
        }
      }
    }
    if (!ev.data) return;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (ev.event === 'close' || msg.type === 'close') {
      this.ended = true;
      this.closeCode = msg.code;
      this.closeReason = msg.reason;
      return;
    }
    client.message(msg, this);
  }

  ready(topic) {
    return this.isOpen && this.topics?.includes(topic);
  }

  update(want) {
    const before = this.streamUrl(this.want).url;
    this.want = want;
    if (this.streamUrl(want).url === before) return;
    // Another set of topics is another stream: end this one and open the new one with
    // a cursor built from the versions held.
    this.restart();
  }

  restart() {
    this.restarting = true;
    this.abort?.abort();
    clearInterval(this.silence);
    setTimeout(() => {
      if (this.done) return;
      this.restarting = false;
      this.ended = false;
      this.open();
    });
  }

  resync(rec) {
    if (rec.doc !== undefined || rec.epoch !== null) {
      // The stream's cursor resumes each topic from the version it delivered last.
      this.lastId = null;
      this.restart();
      return true;
    }
    return false;
  }

  check() {
    if (now() - this.lastRx > this.client.options.sseSilence) this.fail({ opened: this.isOpen, code: 'silent' });
  }

  fail(info) {
    if (this.done) return;
    this.client.failed(this, info);
  }

  stop() {
    this.done = true;
    clearInterval(this.silence);
    this.abort?.abort();
  }
}

/** HTTP polling: a long-poll per event topic (up to `maxLongPolls`, short polls past
 * that), `GET .../state` with `If-None-Match` for state documents. Patterns cannot be
 * polled; they need the WebSocket or SSE. */
class PollTransport {
  constructor(client, token) {
    this.client = client;
    this.token = token;
    this.name = 'poll';
    this.loops = new Map(); // topic -> AbortController
    this.isOpen = false;
    this.acked = new Set();
  }

  start(want) {
    this.update(want);
  }

  update(want) {
    this.want = want;
    if (want.patterns.size && !this.warned) {
      this.warned = true;
      this.client.emit('error', { code: 'patterns_need_streaming', message: 'patterns are not delivered by polling' });
    }
    for (const [t, abort] of this.loops) {
      if (!want.topics.has(t)) {
        abort.abort();
        this.loops.delete(t);
        this.acked.delete(t);
      }
    }
    for (const t of want.topics.keys()) {
      if (!this.loops.has(t)) {
        const abort = new AbortController();
        this.loops.set(t, abort);
        this.loop(t, abort.signal);
      }
    }
  }

  async get(path, signal, extra) {
    const inQuery = this.token && this.client.options.tokenIn === 'query';
    const sep = path.includes('?') ? '&' : '?';
    return this.client.fetch(`${this.client.url}${path}${inQuery ? `${sep}token=${encodeURIComponent(this.token)}` : ''}`, {
      headers: httpHeaders(inQuery ? null : this.token, extra),
      cache: 'no-store',
      signal,
    });
  }

  async loop(topic, signal) {
    const { client } = this;
    const path = `/v1/topics/${encodeURIComponent(topic)}`;
    let etag = null;
    let kind = 'events';
    // A subscription with no version yet starts where the topic stands, as a WebSocket
    // subscription does: the first pages only find the end of history.
    let fresh = client.topics.get(topic)?.epoch === null;
    while (!signal.aborted && !this.done) {
      const rec = client.topics.get(topic);
      if (!rec || rec.closed) break;
      const long = !fresh && this.loops.size <= client.options.maxLongPolls;
      let res;
      try {
        if (kind === 'events') {
          const since = rec.version ? `&since=${encodeURIComponent(rec.version)}` : '';
          res = await this.get(`${path}/events?limit=1000${since}${long ? `&wait=${client.options.pollWait}` : ''}`, signal);
        } else {
          res = await this.get(`${path}/state`, signal, etag ? { 'If-None-Match': etag } : {});
        }
      } catch {
        if (!signal.aborted) this.fail({ opened: this.isOpen });
        return;
      }
      if (signal.aborted || this.done) return;
      if (res.status === 409 && kind === 'events') {
        const err = await errorOf(res);
        if (err.code === 'wrong_topic_kind') {
          kind = 'state';
          continue;
        }
        if (err.code === 'version_ahead') {
          // A version past the topic's end did not come from its history: poll from
          // its start (duplicates are dropped by version).
          rec.offset = 0;
          continue;
        }
        client.emit('error', { ...err, topic });
        this.fail({ opened: this.isOpen, status: 409 });
        return;
      }
      if (res.status === 404 && kind === 'state') {
        this.up(topic);
        await this.pause(signal);
        continue;
      }
      if (res.status === 304) {
        if (!fresh) this.up(topic);
        await this.pause(signal);
        continue;
      }
      if (res.status !== 200) {
        const err = await errorOf(res);
        client.emit('error', { ...err, topic });
        this.fail({ opened: this.isOpen, status: res.status });
        return;
      }
      let body;
      try {
        body = await res.json();
      } catch {
        if (!signal.aborted) this.fail({ opened: this.isOpen });
        return;
      }
      if (signal.aborted || this.done) return;
      if (!fresh || kind === 'state') this.up(topic);
      if (kind === 'state') {
        etag = res.headers.get('ETag');
        client.message({ type: 'snapshot', topic, version: body.version, state: body.state }, this);
        await this.pause(signal);
        continue;
      }
      if (fresh) {
        rec.at({ epoch: body.epoch, offset: body.next_offset });
        if (body.more) continue;
        fresh = false;
        this.up(topic);
        if (body.status === 'closed') this.page(topic, { ...body, events: [], truncated: null });
        continue;
      }
      this.page(topic, body);
      if (client.topics.get(topic)?.closed) break;
      if (!long && !body.more) await this.pause(signal);
    }
  }

  /** A poll page, as the messages a WebSocket would have carried. */
  page(topic, body) {
    const { client } = this;
    const rec = client.record(topic);
    if ((rec.epoch !== null && rec.epoch !== body.epoch) || body.truncated) {
      const first = body.truncated ? body.truncated.first_available : body.events[0]?.offset ?? body.next_offset;
      client.message(
        {
          type: 'history_truncated',
          topic,
          last_version: rec.version,
          first_available: `${body.epoch}:${first}`,
          version: `${body.epoch}:${body.next_offset}`,
        },
        this,
      );
      if (rec.epoch !== body.epoch) {
        rec.epoch = body.epoch;
        rec.offset = 0;
      }
    }
    for (const e of body.events) {
      client.message({ type: 'event', topic, offset: e.offset, version: `${body.epoch}:${e.offset}`, data: e.data }, this);
    }
    if (body.status === 'closed') {
      client.message({ type: 'closed', topic, version: `${body.epoch}:${body.next_offset}` }, this);
    }
  }

  up(topic) {
    if (!this.acked.has(topic)) {
      this.acked.add(topic);
      this.client.acknowledged([topic]);
    }
    if (!this.isOpen) {
      this.isOpen = true;
      this.client.opened(this);
    }
  }

  pause(signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, this.client.options.pollInterval);
      signal.addEventListener('abort', () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  ready(topic) {
    return this.acked.has(topic);
  }

  resync(rec) {
    // Every poll asks from the version held; a state document is read whole anyway.
    rec.resyncing = false;
    return false;
  }

  check() {}

  fail(info) {
    if (this.done) return;
    this.client.failed(this, info);
  }

  stop() {
    this.done = true;
    for (const abort of this.loops.values()) abort.abort();
    this.loops.clear();
  }
}

export default Tidings;
