// A tiny pub/sub server on the npm `ws` package, written the way its users usually do:
// one Set of sockets per topic, `ws.send` per subscriber. A peer for tidings-loadtest
// (loadtest/peers/ws.toml).
//
//   GET /ws (WebSocket), then {"type":"subscribe","topics":["a","b"]}
//       -> {"type":"subscribed","topics":[...]}
//   POST /pub/{topic} with any body
//       -> the body, as a text message, to every subscriber of {topic};
//          202 {"topic":..,"subscribers":N}
//
// Usage: node server.js PORT   (listens on 127.0.0.1:PORT)
'use strict';

const http = require('http');
const { WebSocketServer } = require('ws');

// Largest publish body accepted; a larger one is refused with 413.
const MAX_BODY = 1 << 20;

const port = Number(process.argv[2] || 8080);
const topics = new Map(); // topic -> Set of sockets

function subscribe(ws, topic) {
  let set = topics.get(topic);
  if (!set) {
    set = new Set();
    topics.set(topic, set);
  }
  set.add(ws);
  ws.topics.add(topic);
}

function reply(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

const server = http.createServer((req, res) => {
  const m = /^\/pub\/([^/]+)$/.exec(req.url);
  if (req.method !== 'POST' || !m) {
    reply(res, 404, { code: 'not_found' });
    return;
  }
  const topic = decodeURIComponent(m[1]);
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size <= MAX_BODY) chunks.push(c);
  });
  req.on('end', () => {
    if (size > MAX_BODY) {
      reply(res, 413, { code: 'too_large' });
      return;
    }
    const text = Buffer.concat(chunks).toString('utf8');
    const set = topics.get(topic);
    if (set) {
      for (const ws of set) ws.send(text);
    }
    reply(res, 202, { topic, subscribers: set ? set.size : 0 });
  });
});

const wss = new WebSocketServer({ server, path: '/ws' });
wss.on('connection', (ws) => {
  ws.topics = new Set();
  ws.on('message', (data, isBinary) => {
    let msg;
    try {
      msg = JSON.parse(isBinary ? '' : data.toString());
    } catch (e) {
      ws.send(JSON.stringify({ type: 'error', code: 'bad_json' }));
      return;
    }
    if (msg && msg.type === 'subscribe' && Array.isArray(msg.topics)) {
      for (const t of msg.topics) if (typeof t === 'string') subscribe(ws, t);
      ws.send(JSON.stringify({ type: 'subscribed', topics: msg.topics }));
    }
  });
  ws.on('close', () => {
    for (const t of ws.topics) {
      const set = topics.get(t);
      if (set) {
        set.delete(ws);
        if (set.size === 0) topics.delete(t);
      }
    }
  });
  ws.on('error', () => {});
});

server.listen(port, '127.0.0.1', 4096, () => {
  console.log(`ws peer listening on http://127.0.0.1:${port}`);
});
