// Connecting with centrifuge-js: JWT auth, anonymous access, the token CLI, batched frames,
// ping/pong and graceful shutdown.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  DEFAULT_NAMESPACES,
  PlainWebSocket,
  apiResult,
  cliToken,
  jwtPayload,
  mintToken,
  newClient,
  newSub,
  publish,
  startProxy,
  startServer,
  subscribed,
  uid,
} from './harness.mjs';

describe('connect', () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
  });

  test('connects with an HS256 JWT minted by the backend', async (t) => {
    const client = newClient(t, server.wsUrl, { token: mintToken({ sub: 'alice' }) });
    client.connect();
    const ctx = await client.rec.waitFor('connected');
    assert.equal(typeof ctx.client, 'string');
    assert.ok(ctx.client.length > 0, 'connect result carries a client id');
    assert.equal(ctx.transport, 'websocket');
    assert.equal(client.state, 'connected');

    // The node counts the connection as alice's.
    const ch = uid('who');
    const sub = await subscribed(client, ch);
    const presence = await sub.presence();
    assert.deepEqual(
      Object.values(presence.clients).map((c) => [c.client, c.user]),
      [[ctx.client, 'alice']],
    );
  });

  test('refuses a connection without a token when allow_anonymous = false', async (t) => {
    const client = newClient(t, server.wsUrl, {});
    client.connect();
    const ctx = await client.rec.waitFor('disconnected');
    assert.equal(client.rec.count('connected'), 0, 'never connected');
    // Centrifugo answers 101 unauthorized (error reply) or closes with 3500/3501; all of them
    // are terminal for the SDK, which must not keep reconnecting.
    assert.ok([101, 3500, 3501].includes(ctx.code), `terminal refusal code, got ${JSON.stringify(ctx)}`);
    assert.equal(client.state, 'disconnected');
  });

  test('refuses a token signed with another secret (3500 invalid token)', async (t) => {
    const client = newClient(t, server.wsUrl, { token: mintToken({ sub: 'mallory', secret: 'not-the-secret' }) });
    client.connect();
    const ctx = await client.rec.waitFor('disconnected');
    assert.equal(client.rec.count('connected'), 0, 'never connected');
    assert.equal(ctx.code, 3500, `disconnect code, got ${JSON.stringify(ctx)}`);
  });

  test('connects with a token printed by `herald token`, with server-side channels', async (t) => {
    const ch = uid('srv');
    const token = await cliToken(server, { user: 'carol', ttl: '30s', channels: [ch] });
    const claims = jwtPayload(token);
    assert.equal(claims.sub, 'carol');
    assert.ok(claims.exp - claims.iat >= 29 && claims.exp - claims.iat <= 31, `ttl 30s: ${JSON.stringify(claims)}`);
    assert.deepEqual(claims.channels, [ch]);

    const client = newClient(t, server.wsUrl, { token });
    client.connect();
    await client.rec.waitFor('connected');
    // The token's `channels` claim subscribes the connection server-side.
    await client.rec.waitFor('subscribed', (c) => c.channel === ch);
    const res = await publish(server, ch, { hello: 'carol' });
    const pub = await client.rec.waitFor('publication', (c) => c.channel === ch);
    assert.deepEqual(pub.data, { hello: 'carol' });
    assert.equal(pub.offset, res.offset);
  });

  test('connect and subscribe batched in one frame are both answered', async (t) => {
    const proxy = await startProxy(t, server.port, { tap: true });
    const client = newClient(t, proxy.wsUrl, {
      websocket: PlainWebSocket,
      token: mintToken({ sub: 'dave' }),
    });
    const ch = uid('batch');
    const sub = newSub(client, ch);
    sub.subscribe(); // registered before connect: the SDK sends it with the connect command
    client.connect();
    await sub.rec.waitFor('subscribed');

    const first = proxy.messages('c2s')[0];
    assert.ok(first, `a client frame was seen:\n${proxy.transcript()}`);
    assert.equal(first.msgs.length, 2, `first client frame carries two commands: ${first.raw}`);
    assert.ok(first.msgs[0].connect, `first command is connect: ${first.raw}`);
    assert.equal(first.msgs[1].subscribe?.channel, ch, `second command subscribes: ${first.raw}`);

    // Both replies carry the ids of their commands.
    const replies = proxy.messages('s2c').flatMap((f) => f.msgs);
    const byId = new Map(replies.filter((r) => r.id).map((r) => [r.id, r]));
    assert.ok(byId.get(first.msgs[0].id)?.connect, `connect reply:\n${proxy.transcript()}`);
    assert.ok(byId.get(first.msgs[1].id)?.subscribe, `subscribe reply:\n${proxy.transcript()}`);

    await publish(server, ch, { n: 1 });
    const pub = await sub.rec.waitFor('publication');
    assert.deepEqual(pub.data, { n: 1 });
  });

  test('/health answers 200', async () => {
    const res = await fetch(`${server.httpUrl}/health`);
    assert.equal(res.status, 200);
  });
});

describe('anonymous connections allowed by config', () => {
  let server;
  before(async () => {
    // As in Centrifugo, anonymous connections subscribe only where allow_subscribe_for_anonymous is on.
    server = await startServer({
      client: { allow_anonymous: true },
      namespaces: [{ ...DEFAULT_NAMESPACES[0], allow_subscribe_for_anonymous: true }, DEFAULT_NAMESPACES[1]],
    });
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
  });

  test('connects without a token and subscribes', async (t) => {
    const client = newClient(t, server.wsUrl, {});
    client.connect();
    await client.rec.waitFor('connected');
    const ch = uid('anon');
    const sub = await subscribed(client, ch);
    await publish(server, ch, 'hi');
    const pub = await sub.rec.waitFor('publication');
    assert.equal(pub.data, 'hi');
    const presence = await apiResult(server, 'presence', { channel: ch });
    assert.deepEqual(Object.values(presence.presence).map((c) => c.user ?? ''), [''], 'anonymous user id is ""');

    // "news" allows clients but not anonymous ones.
    const denied = newSub(client, `news:${uid('anon')}`);
    denied.subscribe();
    const ctx = await denied.rec.waitFor('unsubscribed');
    assert.equal(ctx.code, 103, JSON.stringify(ctx));
  });
});

describe('ping and pong', () => {
  let server;
  before(async () => {
    server = await startServer({ client: { ping_interval: '1s', pong_timeout: '500ms' } });
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
  });

  test('the node pings, the SDK pongs, the connection stays up', async (t) => {
    const proxy = await startProxy(t, server.port, { tap: true });
    const client = newClient(t, proxy.wsUrl, {
      websocket: PlainWebSocket,
      token: mintToken({ sub: 'pinger' }),
    });
    client.connect();
    await client.rec.waitFor('connected');
    const isEmpty = (dir) => (f) => f.dir === dir && f.kind === 'text' && f.text.trim() === '{}';
    const waitFrames = (pred, n, timeout) =>
      new Promise((resolve, reject) => {
        const check = () => {
          if (proxy.frames.filter(pred).length >= n) {
            proxy.off('frame', check);
            clearTimeout(timer);
            resolve();
          }
        };
        const timer = setTimeout(() => {
          proxy.off('frame', check);
          reject(new Error(`expected ${n} frames within ${timeout} ms:\n${proxy.transcript()}`));
        }, timeout);
        proxy.on('frame', check);
        check();
      });
    await waitFrames(isEmpty('s2c'), 3, 6000);
    await waitFrames(isEmpty('c2s'), 3, 2000);

    const connectReply = proxy
      .messages('s2c')
      .flatMap((f) => f.msgs)
      .find((m) => m.connect);
    assert.equal(connectReply?.connect?.ping, 1, `connect result advertises ping: ${JSON.stringify(connectReply)}`);
    assert.equal(connectReply?.connect?.pong, true, `connect result asks for pongs: ${JSON.stringify(connectReply)}`);
    assert.equal(client.rec.count('connecting'), 1, `no reconnect:\n${client.rec.summary()}`);
    assert.equal(proxy.accepted, 1, 'one connection for the whole test');
  });
});

describe('shutdown', () => {
  test('SIGTERM disconnects clients with 3001 and the node exits 0', async (t) => {
    const server = await startServer();
    t.after(() => server.cleanup());
    const client = newClient(t, server.wsUrl, { token: mintToken({ sub: 'bye' }) });
    client.connect();
    await client.rec.waitFor('connected');
    const mark = client.rec.mark();
    const exit = await server.stop();
    assert.deepEqual(exit, { code: 0, signal: null }, `exit status; stderr:\n${server.logTail()}`);
    // 3001 is a reconnect code: the SDK reports it as 'connecting', not 'disconnected'.
    const ctx = await client.rec.waitFor('connecting', () => true, { after: mark });
    assert.equal(ctx.code, 3001, `close code: ${JSON.stringify(ctx)}`);
  });

  test('info reports one node', async (t) => {
    const server = await startServer();
    t.after(async () => {
      await server.stop();
      server.cleanup();
    });
    const info = await apiResult(server, 'info');
    assert.equal(info.nodes?.length, 1, JSON.stringify(info));
  });
});
