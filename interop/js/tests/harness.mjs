// Shared harness for the centrifuge-js interop tests.
//
// It starts Herald nodes (one per test file or per test, each with its own config in a
// temporary directory), talks to the server HTTP API, mints connection tokens the way a
// backend would, records SDK events so tests wait for them with a timeout (never a sleep),
// and runs a small TCP proxy that can cut a client off, refuse it for a while, point it at
// another node, and decode the WebSocket frames that cross it (for wire-level assertions and
// for diagnostics when a test fails).

import { spawn, execFile } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

export { Centrifuge, WebSocket };

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = path.resolve(here, '..', '..', '..');

export const SECRET = 'secret';
export const API_KEY = 'apikey';

/** Path of the herald binary: $HERALD_BIN or <repo>/target/debug/herald. */
export function heraldBin() {
  const bin = process.env.HERALD_BIN || path.join(REPO_ROOT, 'target', 'debug', 'herald');
  try {
    fs.accessSync(bin, fs.constants.X_OK);
  } catch {
    throw new Error(
      `herald binary not found or not executable at ${bin}: ` +
        'build it with `cargo build --workspace` or set HERALD_BIN',
    );
  }
  return bin;
}

/** A short random suffix so that tests sharing a node never share a channel. */
export function uid(prefix = 'ch') {
  return `${prefix}-${randomBytes(5).toString('hex')}`;
}

// ---------------------------------------------------------------------------------------------
// Config

export const DEFAULT_NAMESPACES = [
  {
    name: '',
    history_size: 100,
    history_ttl: '5m',
    force_recovery: true,
    allow_subscribe_for_client: true,
    allow_publish_for_subscriber: true,
    allow_publish_for_client: false,
    allow_history_for_subscriber: true,
    allow_presence_for_subscriber: true,
    presence: true,
    join_leave: true,
  },
  {
    name: 'news',
    allow_subscribe_for_client: true,
    history_size: 10,
    history_ttl: '1m',
    force_recovery: true,
  },
];

function tomlValue(v) {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'boolean' || typeof v === 'number') return String(v);
  if (Array.isArray(v)) return `[${v.map(tomlValue).join(', ')}]`;
  throw new Error(`cannot render ${typeof v} as TOML`);
}

function tomlTable(header, obj) {
  const lines = [header];
  for (const [k, v] of Object.entries(obj)) {
    if (v === undefined) continue;
    lines.push(`${k} = ${tomlValue(v)}`);
  }
  return lines.join('\n');
}

/**
 * Renders a Herald config (`extraToml`: more tables as TOML text). `client` and `server`
 * entries override the defaults key by key;
 * `namespaces` replaces the default list. `shutdown` overrides the test default (no drain
 * window: a stopped node lets its clients go at once); `admin` adds an `[admin]` section.
 */
export function renderConfig({
  listen = '127.0.0.1:0',
  client = {},
  api = {},
  namespaces,
  shutdown = {},
  admin,
  engine = { type: 'memory' },
  redis,
  nats,
  extraToml = '',
} = {}) {
  const sections = [
    tomlTable('[server]', { listen }),
    tomlTable('[client]', {
      token_hmac_secret: SECRET,
      allow_anonymous: false,
      ping_interval: '25s',
      pong_timeout: '8s',
      max_queue_bytes: 1048576,
      max_message_size: 65536,
      max_channels: 128,
      ...client,
    }),
    tomlTable('[api]', { key: API_KEY, ...api }),
    tomlTable('[engine]', engine),
    ...(redis ? [tomlTable('[engine.redis]', redis)] : []),
    ...(nats ? [tomlTable('[engine.nats]', nats)] : []),
    tomlTable('[shutdown]', { drain_duration: '0s', ...shutdown }),
    ...(admin ? [tomlTable('[admin]', admin)] : []),
    ...(namespaces || DEFAULT_NAMESPACES).map((ns) => tomlTable('[[namespaces]]', ns)),
    // Tables the renderer has no shorthand for (`[client.proxy.connect]`, …), as TOML text.
    ...(extraToml ? [extraToml] : []),
  ];
  return sections.join('\n\n') + '\n';
}

// ---------------------------------------------------------------------------------------------
// Server process

const running = new Set();
process.on('exit', () => {
  for (const child of running) {
    try {
      child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
});

const LISTEN_RE = /^herald: listening on http:\/\/127\.0\.0\.1:(\d+)$/;

export class HeraldServer {
  constructor(options = {}) {
    this.options = options;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-js-'));
    this.configPath = path.join(this.dir, 'herald.toml');
    fs.writeFileSync(this.configPath, renderConfig(options));
    this.stdout = [];
    this.stderr = '';
    this.child = null;
    this.port = 0;
    this.exit = null;
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/connection/websocket`;
  }

  /** The last lines the node wrote to stderr, for failure messages. */
  logTail(n = 30) {
    return this.stderr.split('\n').slice(-n).join('\n');
  }

  async start(timeoutMs = 10000) {
    const bin = heraldBin();
    const child = spawn(bin, ['serve', '--config', this.configPath], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    running.add(child);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (d) => {
      this.stderr += d;
      if (this.stderr.length > 200000) this.stderr = this.stderr.slice(-100000);
    });
    this.exited = new Promise((resolve) => {
      child.on('exit', (code, signal) => {
        running.delete(child);
        this.exit = { code, signal };
        resolve(this.exit);
      });
    });
    const rl = readline.createInterface({ input: child.stdout });
    const port = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(
          new Error(
            `herald did not print "herald: listening on http://127.0.0.1:PORT" within ${timeoutMs} ms\n` +
              `stdout: ${JSON.stringify(this.stdout)}\nstderr:\n${this.logTail()}`,
          ),
        );
      }, timeoutMs);
      child.on('error', (e) => {
        clearTimeout(timer);
        reject(new Error(`cannot start ${bin}: ${e.message}`));
      });
      this.exited.then((ex) => {
        clearTimeout(timer);
        reject(
          new Error(
            `herald exited (code ${ex.code}, signal ${ex.signal}) before listening\n` +
              `config:\n${fs.readFileSync(this.configPath, 'utf8')}\nstderr:\n${this.logTail()}`,
          ),
        );
      });
      rl.on('line', (line) => {
        this.stdout.push(line);
        const m = LISTEN_RE.exec(line.trim());
        if (m) {
          clearTimeout(timer);
          resolve(Number(m[1]));
        }
      });
    });
    this.port = port;
    return this;
  }

  /** SIGTERM, then wait for exit (SIGKILL after the timeout). Resolves with {code, signal}. */
  async stop(timeoutMs = 5000) {
    if (!this.child) return null;
    if (this.exit) return this.exit;
    this.child.kill('SIGTERM');
    let timer;
    const killed = new Promise((resolve) => {
      timer = setTimeout(() => {
        if (!this.exit) this.child.kill('SIGKILL');
        resolve();
      }, timeoutMs);
    });
    await Promise.race([this.exited, killed]);
    clearTimeout(timer);
    return this.exited;
  }

  cleanup() {
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Starts a node with the given config options; call `await server.stop()` when done. */
export async function startServer(options = {}) {
  const server = new HeraldServer(options);
  await server.start();
  return server;
}

// ---------------------------------------------------------------------------------------------
// Tokens

function b64url(obj) {
  return Buffer.from(JSON.stringify(obj)).toString('base64url');
}

/** An HS256 connection JWT, as a backend would mint it. `ttl` in seconds. */
export function mintToken({ sub = 'user', ttl = 3600, exp, iat, secret = SECRET, claims = {} } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const payload = { sub, iat: iat ?? now, exp: exp ?? now + ttl, ...claims };
  const head = b64url({ alg: 'HS256', typ: 'JWT' });
  const body = b64url(payload);
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** Decodes a JWT payload without checking it. */
export function jwtPayload(token) {
  const parts = token.split('.');
  if (parts.length !== 3) throw new Error(`not a JWT: ${JSON.stringify(token)}`);
  return JSON.parse(Buffer.from(parts[1], 'base64url').toString('utf8'));
}

/** A token from `herald token --config FILE --user U [--ttl T] [--channels a,b]`. */
export function cliToken(server, { user, ttl, channels } = {}) {
  const args = ['token', '--config', server.configPath, '--user', user];
  if (ttl) args.push('--ttl', ttl);
  if (channels && channels.length) args.push('--channels', channels.join(','));
  return new Promise((resolve, reject) => {
    execFile(heraldBin(), args, { timeout: 10000 }, (err, stdout, stderr) => {
      if (err) {
        reject(new Error(`herald ${args.join(' ')} failed: ${err.message}\nstderr: ${stderr}`));
        return;
      }
      const token = stdout.trim();
      if (token.split('\n').length !== 1 || token.split('.').length !== 3) {
        reject(new Error(`herald token printed something other than one JWT: ${JSON.stringify(stdout)}`));
        return;
      }
      resolve(token);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Server HTTP API

/** POST /api/<method>. Returns {status, body} (body parsed as JSON when it is JSON). */
export async function api(server, method, body = {}, { key = API_KEY } = {}) {
  const headers = { 'Content-Type': 'application/json' };
  if (key !== null) headers['X-API-Key'] = key;
  const res = await fetch(`${server.httpUrl}/api/${method}`, {
    method: 'POST',
    headers,
    body: JSON.stringify(body),
  });
  const text = await res.text();
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // not JSON: keep the text
  }
  return { status: res.status, body: parsed };
}

/** POST /api/<method> that must succeed; returns its `result`. */
export async function apiResult(server, method, body = {}) {
  const { status, body: reply } = await api(server, method, body);
  if (status !== 200 || typeof reply !== 'object' || reply === null || reply.error) {
    throw new Error(
      `/api/${method} ${JSON.stringify(body)} -> HTTP ${status} ${JSON.stringify(reply)}`,
    );
  }
  return reply.result ?? {};
}

/** Publishes via the server API; returns {offset, epoch}. */
export function publish(server, channel, data, extra = {}) {
  return apiResult(server, 'publish', { channel, data, ...extra });
}

// ---------------------------------------------------------------------------------------------
// Waiting

/** Records the events an emitter sends, so that a test can wait for them in any order. */
export class Recorder {
  constructor(emitter, events, label = 'emitter') {
    this.label = label;
    this.entries = [];
    this.waiters = new Set();
    for (const event of events) {
      emitter.on(event, (ctx) => this.push(event, ctx));
    }
  }

  push(event, ctx) {
    this.entries.push({ event, ctx, index: this.entries.length, at: Date.now() });
    for (const w of [...this.waiters]) w.check();
  }

  /** Index to pass as `after` so that only later events count. */
  mark() {
    return this.entries.length;
  }

  all(event, after = 0) {
    return this.entries.filter((e) => e.event === event && e.index >= after).map((e) => e.ctx);
  }

  count(event, after = 0) {
    return this.all(event, after).length;
  }

  summary() {
    return this.entries
      .map((e) => `  #${e.index} ${e.event} ${safeJson(e.ctx)}`)
      .slice(-40)
      .join('\n');
  }

  /** Resolves with the first `event` at index >= after whose ctx satisfies `pred`. */
  waitFor(event, pred = () => true, { timeout = 5000, after = 0 } = {}) {
    return this.waitUntil(
      () => this.entries.find((e) => e.index >= after && e.event === event && pred(e.ctx))?.ctx,
      `${event}${pred.name ? ` (${pred.name})` : ''}`,
      timeout,
    );
  }

  /** Resolves with all ctxs of `event` once there are at least `n` of them (index >= after). */
  waitCount(event, n, { timeout = 5000, after = 0 } = {}) {
    return this.waitUntil(
      () => {
        const all = this.all(event, after);
        return all.length >= n ? all : undefined;
      },
      `${n} x ${event}`,
      timeout,
    );
  }

  waitUntil(probe, what, timeout) {
    return new Promise((resolve, reject) => {
      const waiter = {
        check: () => {
          let value;
          try {
            value = probe();
          } catch (e) {
            this.waiters.delete(waiter);
            clearTimeout(waiter.timer);
            reject(e);
            return;
          }
          if (value !== undefined) {
            this.waiters.delete(waiter);
            clearTimeout(waiter.timer);
            resolve(value);
          }
        },
      };
      waiter.timer = setTimeout(() => {
        this.waiters.delete(waiter);
        reject(
          new Error(
            `timed out after ${timeout} ms waiting for ${what} on ${this.label}; recorded:\n${this.summary()}`,
          ),
        );
      }, timeout);
      this.waiters.add(waiter);
      waiter.check();
    });
  }
}

function safeJson(v) {
  try {
    const s = JSON.stringify(v);
    return s && s.length > 300 ? `${s.slice(0, 300)}…` : s;
  } catch {
    return String(v);
  }
}

/** Polls `probe` (sync or async) until it returns a value other than undefined/false. */
export async function eventually(probe, { timeout = 5000, interval = 50, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last !== undefined && last !== false) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${what}; last: ${safeJson(last?.message ?? last)}`);
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

/** Rejects if `promise` does not settle within `timeout` ms. */
export function within(promise, timeout, what = 'operation') {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} did not finish within ${timeout} ms`)), timeout);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** Expects `promise` to reject with a server error carrying `code`. */
export async function rejectsWithCode(promise, code, what = 'call') {
  let value;
  try {
    value = await within(promise, 5000, what);
  } catch (e) {
    if (e && e.code === code) return e;
    throw new Error(`${what}: expected error code ${code}, got ${safeJson(e)} (${e?.message})`);
  }
  throw new Error(`${what}: expected error code ${code}, but it succeeded with ${safeJson(value)}`);
}

// ---------------------------------------------------------------------------------------------
// Clients

/** A `ws` WebSocket that does not offer permessage-deflate, so that a tapping proxy can read frames. */
export class PlainWebSocket extends WebSocket {
  constructor(address, protocols, options) {
    super(address, protocols, { ...(options || {}), perMessageDeflate: false });
  }
}

export const CLIENT_EVENTS = [
  'state',
  'connecting',
  'connected',
  'disconnected',
  'error',
  'message',
  'subscribed',
  'subscribing',
  'unsubscribed',
  'publication',
  'join',
  'leave',
];
export const SUB_EVENTS = [
  'state',
  'subscribing',
  'subscribed',
  'unsubscribed',
  'publication',
  'join',
  'leave',
  'error',
];

/** Creates a Centrifuge client (fast reconnects) and disconnects it when `t` ends. */
export function newClient(t, url, options = {}) {
  const client = new Centrifuge(url, {
    websocket: WebSocket,
    minReconnectDelay: 50,
    maxReconnectDelay: 300,
    timeout: 4000,
    ...options,
  });
  client.rec = new Recorder(client, CLIENT_EVENTS, `client ${url}`);
  // An unhandled 'error' event would throw; the recorder listens to it.
  t.after(() => client.disconnect());
  return client;
}

/** Creates a subscription with a recorder attached (`sub.rec`). */
export function newSub(client, channel, options = {}) {
  const sub = client.newSubscription(channel, options);
  sub.rec = new Recorder(sub, SUB_EVENTS, `subscription ${channel}`);
  return sub;
}

/** Connects (token for `user` unless options say otherwise) and waits for 'connected'. */
export async function connectedClient(t, url, { user = 'user', ...options } = {}) {
  const opts = { ...options };
  if (opts.token === undefined && opts.getToken === undefined) opts.token = mintToken({ sub: user });
  const client = newClient(t, url, opts);
  client.connect();
  await client.rec.waitFor('connected');
  return client;
}

/** Subscribes and waits for 'subscribed'; returns the subscription. */
export async function subscribed(client, channel, options = {}) {
  const sub = newSub(client, channel, options);
  sub.subscribe();
  await sub.rec.waitFor('subscribed');
  return sub;
}

// ---------------------------------------------------------------------------------------------
// TCP proxy with an optional WebSocket frame tap

/** Incrementally decodes WebSocket frames from one direction of a connection. */
class FrameDecoder {
  constructor(dir, sink) {
    this.dir = dir;
    this.sink = sink;
    this.buf = Buffer.alloc(0);
    this.handshakeDone = false;
    this.fragments = [];
    this.fragOpcode = 0;
  }

  feed(chunk) {
    this.buf = Buffer.concat([this.buf, chunk]);
    if (!this.handshakeDone) {
      const end = this.buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      this.sink({ dir: this.dir, kind: 'http', text: this.buf.subarray(0, end).toString('latin1') });
      this.buf = this.buf.subarray(end + 4);
      this.handshakeDone = true;
    }
    for (;;) {
      if (this.buf.length < 2) return;
      const b0 = this.buf[0];
      const b1 = this.buf[1];
      const fin = (b0 & 0x80) !== 0;
      const rsv1 = (b0 & 0x40) !== 0;
      const opcode = b0 & 0x0f;
      const masked = (b1 & 0x80) !== 0;
      let len = b1 & 0x7f;
      let off = 2;
      if (len === 126) {
        if (this.buf.length < 4) return;
        len = this.buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (this.buf.length < 10) return;
        len = Number(this.buf.readBigUInt64BE(2));
        off = 10;
      }
      let mask = null;
      if (masked) {
        if (this.buf.length < off + 4) return;
        mask = this.buf.subarray(off, off + 4);
        off += 4;
      }
      if (this.buf.length < off + len) return;
      const payload = Buffer.from(this.buf.subarray(off, off + len));
      if (mask) for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i & 3];
      this.buf = this.buf.subarray(off + len);
      if (opcode >= 0x8) {
        const frame = { dir: this.dir, kind: 'control', opcode };
        if (opcode === 0x8 && payload.length >= 2) {
          frame.code = payload.readUInt16BE(0);
          frame.reason = payload.subarray(2).toString('utf8');
        }
        this.sink(frame);
        continue;
      }
      if (opcode !== 0) this.fragOpcode = opcode;
      this.fragments.push(payload);
      if (!fin) continue;
      const whole = Buffer.concat(this.fragments);
      this.fragments = [];
      this.sink({
        dir: this.dir,
        kind: this.fragOpcode === 1 ? 'text' : 'binary',
        compressed: rsv1,
        text: this.fragOpcode === 1 && !rsv1 ? whole.toString('utf8') : undefined,
        length: whole.length,
      });
    }
  }
}

/**
 * A TCP proxy on 127.0.0.1 in front of a node. `cut()` drops every proxied connection and
 * refuses new ones until `restore()`; `setUpstream(port)` points it at another node.
 * With `tap: true` it decodes the WebSocket frames in both directions into `frames`.
 */
export class TcpProxy extends EventEmitter {
  constructor(upstreamPort, { tap = false } = {}) {
    super();
    this.upstreamPort = upstreamPort;
    this.tap = tap;
    this.refusing = false;
    this.pairs = new Set();
    this.accepted = 0;
    this.refused = 0;
    this.frames = [];
    this.server = net.createServer((socket) => this.onConnection(socket));
  }

  async start() {
    await new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(0, '127.0.0.1', resolve);
    });
    this.port = this.server.address().port;
    return this;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/connection/websocket`;
  }

  onConnection(client) {
    client.on('error', () => {});
    if (this.refusing) {
      this.refused += 1;
      client.destroy();
      this.emit('refused');
      return;
    }
    const upstream = net.connect(this.upstreamPort, '127.0.0.1');
    upstream.on('error', () => {});
    const pair = { client, upstream };
    this.pairs.add(pair);
    this.accepted += 1;
    const conn = this.accepted;
    const record = (frame) => {
      frame.conn = conn;
      this.frames.push(frame);
      this.emit('frame', frame);
    };
    const c2s = this.tap ? new FrameDecoder('c2s', record) : null;
    const s2c = this.tap ? new FrameDecoder('s2c', record) : null;
    client.on('data', (d) => {
      if (c2s) c2s.feed(d);
      upstream.write(d);
    });
    upstream.on('data', (d) => {
      if (s2c) s2c.feed(d);
      client.write(d);
    });
    const close = () => {
      if (!this.pairs.has(pair)) return;
      this.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
      this.emit('closed', conn);
    };
    client.on('close', close);
    upstream.on('close', close);
    this.emit('accepted', conn);
  }

  /** Drops every connection and refuses new ones. */
  cut() {
    this.refusing = true;
    for (const { client, upstream } of [...this.pairs]) {
      client.destroy();
      upstream.destroy();
    }
  }

  restore() {
    this.refusing = false;
  }

  setUpstream(port) {
    this.upstreamPort = port;
  }

  /** Text frames as lists of parsed JSON messages (one frame may carry several, `\n`-separated). */
  messages(dir) {
    const out = [];
    for (const f of this.frames) {
      if (f.kind !== 'text' || (dir && f.dir !== dir)) continue;
      out.push({ dir: f.dir, conn: f.conn, raw: f.text, msgs: parseLines(f.text) });
    }
    return out;
  }

  /** A readable transcript of the frames seen, for failure messages. */
  transcript(limit = 60) {
    return this.frames
      .filter((f) => f.kind !== 'http')
      .slice(-limit)
      .map((f) => {
        const arrow = f.dir === 'c2s' ? 'C->S' : 'S->C';
        if (f.kind === 'text') return `  [${f.conn}] ${arrow} ${f.text}`;
        if (f.kind === 'control') return `  [${f.conn}] ${arrow} control ${f.opcode}${f.code ? ` code=${f.code} reason=${f.reason}` : ''}`;
        return `  [${f.conn}] ${arrow} ${f.kind} ${f.length} bytes${f.compressed ? ' (compressed)' : ''}`;
      })
      .join('\n');
  }

  async close() {
    this.cut();
    await new Promise((resolve) => this.server.close(() => resolve()));
  }
}

export function parseLines(text) {
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => {
      try {
        return JSON.parse(l);
      } catch {
        return { unparsable: l };
      }
    });
}

export async function startProxy(t, upstreamPort, options) {
  const proxy = await new TcpProxy(upstreamPort, options).start();
  t.after(() => proxy.close());
  return proxy;
}
