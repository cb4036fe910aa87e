// The tidings dashboard: the gateway's counters from its `_tidings:stats` topic (one
// publication a second), as moving charts, and a topic browser. It subscribes through the
// same client any page uses (served at /v1/client.js).
import { Tidings } from '/v1/client.js';

const STATS_TOPIC = '_tidings:stats';
const WINDOW = 300; // points kept per chart: five minutes at one a second
const KEY = 'tidings.admin';
const $ = (sel) => document.querySelector(sel);

const reasons = ['normal', 'protocol_error', 'slow_consumer', 'timeout', 'rate_limited', 'shutdown', 'io_error', 'overloaded', 'token_expired'];
const colors = ['#4fb3ff', '#ffb347', '#7bd389', '#ff6b6b', '#c792ea', '#f7dc6f', '#5dade2', '#ec7063', '#aab7b8'];

let client = null;
let key = sessionStorage.getItem(KEY) || '';
const series = { t: [], ws: [], sse: [], lp: [], pubs: [], dels: [], bytes: [], closes: reasons.map(() => []) };
let last = null;
const charts = {};

function fmt(n) {
  if (n == null || Number.isNaN(n)) return '–';
  const abs = Math.abs(n);
  if (abs >= 1e9) return (n / 1e9).toFixed(1) + 'G';
  if (abs >= 1e6) return (n / 1e6).toFixed(1) + 'M';
  if (abs >= 1e4) return (n / 1e3).toFixed(1) + 'k';
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

function bytes(n) {
  if (n == null) return '–';
  if (n >= 1 << 30) return (n / (1 << 30)).toFixed(1) + ' GiB';
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + ' MiB';
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + ' KiB';
  return n + ' B';
}

function headers() {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function chart(id, labels, paint) {
  const el = $(id);
  const opts = {
    width: Math.max(300, el.clientWidth || 440),
    height: 190,
    legend: { live: false },
    cursor: { show: false },
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.15)] } },
    axes: [
      { stroke: '#8a96a3', grid: { stroke: '#26313c' } },
      { stroke: '#8a96a3', grid: { stroke: '#26313c' }, size: 76, values: (u, v) => v.map(paint || fmt) },
    ],
    series: [{}, ...labels.map((label, i) => ({ label, stroke: colors[i % colors.length], width: 1.5, points: { show: false } }))],
  };
  return new globalThis.uPlot(opts, [[], ...labels.map(() => [])], el);
}

function setupCharts() {
  charts.connections = chart('#chart-connections', ['WebSocket', 'SSE', 'long-poll']);
  charts.rates = chart('#chart-rates', ['publications/s', 'deliveries/s']);
  charts.bytes = chart('#chart-bytes', ['bytes out/s'], bytes);
  charts.closes = chart('#chart-closes', reasons);
}

function push(arr, v) {
  arr.push(v);
  if (arr.length > WINDOW) arr.shift();
}

function show(name, text) {
  for (const el of document.querySelectorAll(`[data-stat="${name}"]`)) el.textContent = text;
}

function onStats(s) {
  const t = s.ts / 1000;
  const dt = last ? Math.max(0.001, (s.ts - last.ts) / 1000) : null;
  const rate = (k) => (last && dt ? Math.max(0, (s[k] - last[k]) / dt) : 0);
  push(series.t, t);
  push(series.ws, s.websockets);
  push(series.sse, s.sse_streams);
  push(series.lp, s.long_polls_waiting);
  push(series.pubs, rate('publications'));
  push(series.dels, rate('deliveries'));
  push(series.bytes, rate('bytes_out'));
  reasons.forEach((r, i) => {
    const d = last && dt ? Math.max(0, (s.connections_closed[r] - last.connections_closed[r]) / dt) : 0;
    push(series.closes[i], d);
  });
  charts.connections.setData([series.t, series.ws, series.sse, series.lp]);
  charts.rates.setData([series.t, series.pubs, series.dels]);
  charts.bytes.setData([series.t, series.bytes]);
  charts.closes.setData([series.t, ...series.closes]);

  for (const k of ['connections', 'websockets', 'sse_streams', 'long_polls_waiting', 'publications', 'publications_refused', 'deliveries', 'topics']) {
    show(k, String(s[k]));
  }
  show('bytes_out', bytes(s.bytes_out));
  show('history_bytes', bytes(s.history_bytes));
  show('state_bytes', bytes(s.state_bytes));
  show('publications_rate', fmt(series.pubs.at(-1)));
  show('deliveries_rate', fmt(series.dels.at(-1)));
  show('bytes_out_rate', bytes(Math.round(series.bytes.at(-1))));
  const closed = reasons.reduce((sum, r) => sum + s.connections_closed[r], 0);
  show('closed_total', String(closed));
  $('#closes').textContent = reasons.filter((r) => s.connections_closed[r]).map((r) => `${r} ${s.connections_closed[r]}`).join(' · ') || 'none';
  $('#updated').textContent = `updated ${new Date(s.ts).toLocaleTimeString()}`;
  document.body.dataset.statsTs = String(s.ts);
  last = s;
}

// ----- topic browser ---------------------------------------------------------------------

let cursor = null;
let detail = null;

async function listTopics(append) {
  const prefix = $('#prefix').value.trim();
  const q = new URLSearchParams({ limit: '50' });
  if (prefix) q.set('prefix', prefix);
  if (append && cursor) q.set('after', cursor);
  const res = await fetch(`/v1/topics?${q}`, { headers: headers(), cache: 'no-store' });
  if (!res.ok) return;
  const page = await res.json();
  const body = $('#topic-table tbody');
  if (!append) body.textContent = '';
  for (const t of page.topics) {
    const tr = document.createElement('tr');
    for (const v of [t.topic, t.kind + (t.closed ? ' (closed)' : ''), t.version, t.subscribers, t.history]) {
      const td = document.createElement('td');
      td.textContent = String(v);
      tr.append(td);
    }
    tr.dataset.topic = t.topic;
    tr.dataset.kind = t.kind;
    tr.addEventListener('click', () => openTopic(t.topic, t.kind, tr));
    body.append(tr);
  }
  cursor = page.next;
  $('#more').hidden = !page.next;
}

function openTopic(topic, kind, row) {
  for (const r of document.querySelectorAll('#topic-table tr.selected')) r.classList.remove('selected');
  row?.classList.add('selected');
  detail?.unsubscribe();
  $('#detail-title').textContent = topic;
  const out = $('#detail-body');
  out.classList.remove('muted');
  out.textContent = 'waiting for the first message…';
  if (kind === 'state') {
    detail = client.state(topic, (doc, version) => {
      out.textContent = `version ${version}\n\n${JSON.stringify(doc, null, 2)}`;
    });
  } else {
    const latest = [];
    detail = client.subscribe(topic, (msg) => {
      latest.unshift(msg.type === 'event' ? `${msg.version}  ${JSON.stringify(msg.data)}` : `${msg.type} ${msg.version || ''}`);
      if (latest.length > 50) latest.pop();
      out.textContent = latest.join('\n');
    });
  }
}

// ----- start -------------------------------------------------------------------------------

async function start() {
  const probe = await fetch('/v1/topics?limit=1', { headers: headers(), cache: 'no-store' });
  if (probe.status === 401 || probe.status === 403) {
    $('#login').hidden = false;
    $('#main').hidden = true;
    $('#status').textContent = 'needs the admin key';
    if (key) $('#login-error').textContent = 'that key is not an admin key';
    return;
  }
  $('#login').hidden = true;
  $('#main').hidden = false;
  setupCharts();
  // An API key travels in a header, which a WebSocket cannot carry: with one, the
  // dashboard streams over SSE.
  client = new Tidings(location.origin, { token: key || undefined, transports: key ? ['sse', 'poll'] : ['websocket', 'sse', 'poll'] });
  client.on('status', (status) => {
    const el = $('#status');
    el.textContent = status === 'open' ? `live (${client.transportName})` : status;
    el.className = `status ${status}`;
  });
  client.subscribe(STATS_TOPIC, (msg) => msg.type === 'event' && onStats(msg.data));
  listTopics(false);
  setInterval(() => listTopics(false), 5000);
}

$('#login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  key = $('#key').value.trim();
  sessionStorage.setItem(KEY, key);
  start();
});
$('#topic-search').addEventListener('submit', (ev) => {
  ev.preventDefault();
  listTopics(false);
});
$('#more').addEventListener('click', () => listTopics(true));
start();
