// centrifuge-js over Herald's comet transports, with WebSocket left out: HTTP streaming and
// SSE (EventSource from the `eventsource` package: Node 20 has none) carry the stream, and
// commands go through the emulation endpoint. Same session semantics as WebSocket:
// subscribe, publish, presence, recovery after a dropped stream.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { EventSource } from 'eventsource';

import { apiResult, connectedClient, newSub, publish, startProxy, startServer, subscribed, uid } from './harness.mjs';

/** Client options for the comet transports of the node (or proxy) at `port`. */
function cometOptions(port, transports = ['http_stream', 'sse'], { endpoints = {} } = {}) {
  const base = `http://127.0.0.1:${port}`;
  return {
    url: transports.map((transport) => ({
      transport,
      endpoint: endpoints[transport] ?? `${base}/connection/${transport}`,
    })),
    options: { emulationEndpoint: `${base}/emulation`, eventsource: EventSource },
  };
}

async function cometClient(t, port, transports, { user = 'user', endpoints, ...rest } = {}) {
  const { url, options } = cometOptions(port, transports, { endpoints });
  return connectedClient(t, url, { user, ...options, ...rest });
}

describe('comet transports (no WebSocket)', () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
  });

  for (const transport of ['http_stream', 'sse']) {
    test(`${transport}: connect, subscribe, receive API publications, publish, presence`, async (t) => {
      const client = await cometClient(t, server.port, [transport], { user: `u-${transport}` });
      const connected = client.rec.all('connected')[0];
      assert.equal(connected.transport, transport);

      const ch = uid(transport);
      const sub = await subscribed(client, ch);
      for (let i = 0; i < 5; i++) await publish(server, ch, { i });
      const got = await sub.rec.waitCount('publication', 5);
      assert.deepEqual(
        got.map((p) => p.data.i),
        [0, 1, 2, 3, 4],
      );

      // Commands through /emulation: publish (allowed for subscribers here) and presence.
      await sub.publish({ from: 'client' });
      const own = await sub.rec.waitFor('publication', (p) => p.data.from === 'client');
      assert.equal(own.info.user, `u-${transport}`);
      const presence = await sub.presence();
      assert.deepEqual(
        Object.values(presence.clients).map((c) => c.user),
        [`u-${transport}`],
      );
      const history = await sub.history({ limit: -1 });
      assert.equal(history.publications.length, 6);
    });
  }

  test('the transport list is tried in order: http_stream first, SSE when it is refused', async (t) => {
    const first = await cometClient(t, server.port, ['http_stream', 'sse'], { user: 'both' });
    assert.equal(first.rec.all('connected')[0].transport, 'http_stream');

    const fallback = await cometClient(t, server.port, ['http_stream', 'sse'], {
      user: 'fallback',
      endpoints: { http_stream: `${server.httpUrl}/no/such/endpoint` },
    });
    assert.equal(fallback.rec.all('connected')[0].transport, 'sse');
    const ch = uid('fb');
    const sub = await subscribed(fallback, ch);
    await publish(server, ch, { ok: true });
    const pub = await sub.rec.waitFor('publication');
    assert.deepEqual(pub.data, { ok: true });
  });

  for (const transport of ['http_stream', 'sse']) {
    test(`${transport}: a dropped stream reconnects and recovers what it missed, in order`, async (t) => {
      // Stream and emulation requests both go through the proxy, which cuts them all.
      const proxy = await startProxy(t, server.port);
      const client = await cometClient(t, proxy.port, [transport], { user: `rec-${transport}` });
      const ch = uid(`rec-${transport}`);
      const sub = newSub(client, ch);
      sub.subscribe();
      const first = await sub.rec.waitFor('subscribed');
      assert.equal(first.recoverable, true);
      for (let i = 0; i < 3; i++) await publish(server, ch, { seq: i });
      await sub.rec.waitCount('publication', 3);

      const mark = sub.rec.mark();
      proxy.cut();
      await sub.rec.waitFor('subscribing', () => true, { after: mark });
      for (let i = 3; i < 8; i++) await publish(server, ch, { seq: i });
      proxy.restore();

      const again = await sub.rec.waitFor('subscribed', () => true, { after: mark, timeout: 10000 });
      assert.equal(again.wasRecovering, true, JSON.stringify(again));
      assert.equal(again.recovered, true, JSON.stringify(again));
      for (let i = 8; i < 10; i++) await publish(server, ch, { seq: i });
      const pubs = await sub.rec.waitCount('publication', 10);
      assert.deepEqual(
        pubs.map((p) => p.data.seq),
        Array.from({ length: 10 }, (_, i) => i),
        'every publication exactly once, in order',
      );
      assert.equal(client.rec.all('connected').at(-1).transport, transport);
    });
  }

  test('a server API disconnect reaches an SSE client as a disconnect push', async (t) => {
    const client = await cometClient(t, server.port, ['sse'], { user: 'kicked' });
    const mark = client.rec.mark();
    await apiResult(server, 'disconnect', { user: 'kicked', disconnect: { code: 4501, reason: 'go away' } });
    const d = await client.rec.waitFor('disconnected', () => true, { after: mark });
    assert.equal(d.code, 4501);
    assert.equal(d.reason, 'go away');
  });
});
