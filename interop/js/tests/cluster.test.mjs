// A cluster of three Herald processes, once on the machine's Redis and once on its NATS
// (JetStream): a centrifuge-js subscriber on node 1 receives what the server API publishes
// on node 3, in order, exactly once, and recovers on another node after losing its own.

import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';

import { connectedClient, eventually, publish, startProxy, startServer, subscribed, uid } from './harness.mjs';

async function requireService(port, what) {
  await new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => {
      s.end();
      resolve();
    });
    s.on('error', () => reject(new Error(`cluster tests need ${what} at 127.0.0.1:${port}`)));
  });
}

const ENGINES = {
  redis: {
    port: 6379,
    what: 'Redis',
    options: () => ({
      engine: { type: 'redis' },
      redis: { prefix: uid('herald-js-cluster'), node_heartbeat: '200ms', node_eviction: '1s' },
    }),
  },
  nats: {
    port: 4222,
    what: 'nats-server with JetStream',
    options: () => ({
      engine: { type: 'nats' },
      // A prefix of letters, digits, `_` and `-` isolates this run's streams and subjects.
      nats: { prefix: uid('hjs'), node_heartbeat: '200ms', node_eviction: '1s' },
    }),
  },
};

for (const [engine, { port, what, options }] of Object.entries(ENGINES)) describe(`cluster on ${engine}`, () => {
  const nodes = [];
  before(async () => {
    await requireService(port, what);
    const opts = options();
    for (let i = 0; i < 3; i++) {
      nodes.push(await startServer(opts));
    }
  });
  after(async () => {
    for (const n of nodes) {
      await n.stop();
      n.cleanup();
    }
  });

  test('publish on node 3 reaches a subscriber on node 1 in order, exactly once', async (t) => {
    const client = await connectedClient(t, nodes[0].wsUrl, { user: 'alice' });
    const ch = uid('cluster');
    const sub = await subscribed(client, ch);
    for (let i = 0; i < 30; i++) {
      await publish(nodes[2], ch, { n: i });
    }
    await eventually(() => sub.rec.count('publication') >= 30, { what: '30 publications' });
    await publish(nodes[2], ch, { n: 'end' });
    await eventually(() => sub.rec.count('publication') >= 31, { what: 'the end marker' });
    const got = sub.rec.all('publication').map((ctx) => ctx.data.n);
    assert.deepEqual(got, [...Array(30).keys(), 'end']);
    const offsets = sub.rec.all('publication').map((ctx) => ctx.offset);
    assert.deepEqual(offsets, [...Array(31).keys()].map((i) => i + 1));
  });

  test('a subscriber that loses its node recovers on another one', async (t) => {
    const proxy = await startProxy(t, nodes[0].port);
    const client = await connectedClient(t, proxy.wsUrl, { user: 'roamer' });
    const ch = uid('roam');
    const sub = await subscribed(client, ch);
    for (let i = 0; i < 3; i++) await publish(nodes[2], ch, { n: i });
    await sub.rec.waitCount('publication', 3);
    const mark = sub.rec.mark();
    // Its node is gone: the next connection lands on node 2; meanwhile node 3 publishes.
    proxy.cut();
    await sub.rec.waitFor('subscribing', () => true, { after: mark });
    for (let i = 3; i < 8; i++) await publish(nodes[2], ch, { n: i });
    proxy.setUpstream(nodes[1].port);
    proxy.restore();
    const again = await sub.rec.waitFor('subscribed', () => true, { after: mark, timeout: 8000 });
    assert.equal(again.recovered, true, JSON.stringify(again));
    const pubs = await sub.rec.waitCount('publication', 8);
    assert.deepEqual(
      pubs.map((p) => p.data.n),
      [...Array(8).keys()],
    );
  });

  test('info lists three nodes', async () => {
    await eventually(async () => {
      const res = await fetch(`${nodes[0].httpUrl}/api/info`, {
        method: 'POST',
        headers: { 'X-API-Key': 'apikey' },
        body: '{}',
      });
      const body = await res.json();
      return body.result.nodes.length === 3;
    }, { what: 'three nodes in info', timeout: 5000 });
  });
});
