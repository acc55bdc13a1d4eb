// Recovery with centrifuge-js: a subscriber behind a proxy is cut off, publications are made
// while it is away, and it comes back. No gap, no duplicate, order kept — or, when that is
// impossible, the SDK is told (recovered: false).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { connectedClient, newSub, publish, startProxy, startServer, uid } from './harness.mjs';

const offsetsOf = (pubs) => pubs.map((p) => p.offset);
const dataOf = (pubs) => pubs.map((p) => p.data);

/** Asserts consecutive offsets (each one more than the one before). */
function assertConsecutive(pubs, what) {
  for (let i = 1; i < pubs.length; i++) {
    assert.equal(pubs[i].offset, pubs[i - 1].offset + 1, `${what}: offsets ${JSON.stringify(offsetsOf(pubs))}`);
  }
}

describe('recovery', () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
  });

  async function cutOffSubscriber(t, channel, user) {
    const proxy = await startProxy(t, server.port);
    const client = await connectedClient(t, proxy.wsUrl, { user });
    const sub = newSub(client, channel);
    sub.subscribe();
    const first = await sub.rec.waitFor('subscribed');
    assert.equal(first.wasRecovering, false);
    assert.equal(first.recoverable, true, 'force_recovery makes the subscription recoverable');
    return { proxy, client, sub, first };
  }

  test('missed publications are recovered exactly once and in order, then live ones follow', async (t) => {
    const ch = uid('rec');
    const { proxy, client, sub, first } = await cutOffSubscriber(t, ch, 'rec-ok');

    for (let i = 0; i < 3; i++) await publish(server, ch, { seq: i });
    await sub.rec.waitCount('publication', 3);

    const mark = sub.rec.mark();
    proxy.cut();
    await sub.rec.waitFor('subscribing', () => true, { after: mark });

    const missed = [];
    for (let i = 3; i < 10; i++) missed.push(await publish(server, ch, { seq: i }));

    proxy.restore();
    const again = await sub.rec.waitFor('subscribed', () => true, { after: mark, timeout: 8000 });
    assert.equal(again.wasRecovering, true, `subscribed: ${JSON.stringify(again)}`);
    assert.equal(again.recovered, true, `subscribed: ${JSON.stringify(again)}`);
    assert.equal(again.streamPosition?.epoch, first.streamPosition?.epoch, 'same epoch');

    await sub.rec.waitCount('publication', 10);
    for (let i = 10; i < 13; i++) await publish(server, ch, { seq: i });
    const pubs = await sub.rec.waitCount('publication', 13);

    assert.deepEqual(
      dataOf(pubs).map((d) => d.seq),
      Array.from({ length: 13 }, (_, i) => i),
      'every publication exactly once, in order',
    );
    assertConsecutive(pubs, 'recovered stream');
    assert.deepEqual(offsetsOf(pubs.slice(3, 10)), offsetsOf(missed));
    assert.equal(client.state, 'connected');
  });

  test('publications keep flowing during reconnects: every cycle recovers with no gap and no duplicate', async (t) => {
    const ch = uid('flow');
    const { proxy, sub } = await cutOffSubscriber(t, ch, 'rec-flow');

    // A backend that publishes one publication after another up to `limit`: the limit keeps
    // what a subscriber misses (at most 80) under history_size (100) on any machine.
    let published = 0;
    let limit = 0;
    let pace = 0; // ms between publications
    let running = true;
    let wake = null;
    const allow = (n) => {
      limit += n;
      if (wake) wake();
    };
    const publisher = (async () => {
      while (running) {
        if (published >= limit) {
          await new Promise((resolve) => {
            wake = resolve;
          });
          wake = null;
          continue;
        }
        await publish(server, ch, { seq: published });
        published += 1;
        if (pace) await new Promise((resolve) => setTimeout(resolve, pace));
      }
    })();
    const reached = (n) =>
      new Promise((resolve, reject) => {
        const deadline = Date.now() + 8000;
        const poll = () => {
          if (published >= n) resolve();
          else if (Date.now() > deadline) reject(new Error(`publisher stuck at ${published} < ${n}`));
          else setTimeout(poll, 2);
        };
        poll();
      });

    try {
      for (let cycle = 0; cycle < 3; cycle++) {
        allow(10);
        await reached(limit);
        const mark = sub.rec.mark();
        proxy.cut();
        await sub.rec.waitFor('subscribing', () => true, { after: mark });
        allow(10);
        await reached(limit);
        // Paced publications span the reconnect (the SDK retries within 300 ms), so the
        // resubscribe races with them: the node must merge history and the live stream.
        pace = 4;
        allow(70);
        proxy.restore();
        const again = await sub.rec.waitFor('subscribed', () => true, { after: mark, timeout: 8000 });
        assert.equal(again.recovered, true, `cycle ${cycle}: ${JSON.stringify(again)}`);
        await reached(limit);
        pace = 0;
      }
    } finally {
      running = false;
      allow(0);
      await publisher;
    }

    await sub.rec.waitFor('publication', (c) => c.data.seq === published - 1, { timeout: 8000 });
    const pubs = sub.rec.all('publication');
    const seqs = dataOf(pubs).map((d) => d.seq);
    const firstBad = seqs.findIndex((s, i) => s !== i);
    assert.equal(
      firstBad,
      -1,
      `gap or duplicate at index ${firstBad}: ${JSON.stringify(seqs.slice(Math.max(0, firstBad - 3), firstBad + 4))}`,
    );
    assert.equal(seqs.length, published);
    assertConsecutive(pubs, 'flowing stream');
  });

  test('more missed publications than history_size: recovered is false, no silent hole', async (t) => {
    // Namespace "news" keeps 10 publications; 15 are made while the subscriber is away.
    const ch = `news:${uid('rec')}`;
    const { proxy, sub } = await cutOffSubscriber(t, ch, 'rec-overflow');

    for (let i = 0; i < 2; i++) await publish(server, ch, { seq: i });
    await sub.rec.waitCount('publication', 2);

    const mark = sub.rec.mark();
    proxy.cut();
    await sub.rec.waitFor('subscribing', () => true, { after: mark });
    let top;
    for (let i = 2; i < 17; i++) top = await publish(server, ch, { seq: i });

    proxy.restore();
    const again = await sub.rec.waitFor('subscribed', () => true, { after: mark, timeout: 8000 });
    assert.equal(again.wasRecovering, true, `subscribed: ${JSON.stringify(again)}`);
    assert.equal(again.recovered, false, `subscribed: ${JSON.stringify(again)}`);
    assert.equal(again.streamPosition?.offset, top.offset, 'the subscription restarts from the stream top');
    assert.equal(again.streamPosition?.epoch, top.epoch);

    await publish(server, ch, { seq: 17 });
    const pubs = await sub.rec.waitCount('publication', 3);
    // Not recovered: the subscribe reply carries no publications, only live ones follow.
    assert.deepEqual(
      dataOf(pubs).map((d) => d.seq),
      [0, 1, 17],
      'no partial recovery presented as a stream',
    );
    assert.equal(pubs[2].offset, top.offset + 1);
  });

  test('after a node restart the epoch changes and recovered is false', async (t) => {
    const ch = uid('restart');
    // This test restarts its own node, not the shared one.
    const own = await startServer();
    t.after(async () => {
      await own.stop();
      own.cleanup();
    });
    const proxy = await startProxy(t, own.port);
    const client = await connectedClient(t, proxy.wsUrl, { user: 'restart' });
    const sub = newSub(client, ch);
    sub.subscribe();
    const first = await sub.rec.waitFor('subscribed');
    const p1 = await publish(own, ch, { seq: 0 });
    await sub.rec.waitCount('publication', 1);

    const mark = sub.rec.mark();
    proxy.cut();
    const exit = await own.stop();
    assert.equal(exit.code, 0, `node exit status; stderr:\n${own.logTail()}`);
    await sub.rec.waitFor('subscribing', () => true, { after: mark });

    const next = await startServer();
    t.after(async () => {
      await next.stop();
      next.cleanup();
    });
    proxy.setUpstream(next.port);
    proxy.restore();

    const again = await sub.rec.waitFor('subscribed', () => true, { after: mark, timeout: 8000 });
    assert.equal(again.wasRecovering, true, `subscribed: ${JSON.stringify(again)}`);
    assert.equal(again.recovered, false, `subscribed: ${JSON.stringify(again)}`);
    assert.notEqual(again.streamPosition?.epoch, first.streamPosition?.epoch, 'a new node has a new epoch');
    assert.notEqual(again.streamPosition?.epoch, p1.epoch);

    const p2 = await publish(next, ch, { seq: 1 });
    const pubs = await sub.rec.waitCount('publication', 2);
    assert.deepEqual(dataOf(pubs), [{ seq: 0 }, { seq: 1 }]);
    assert.equal(pubs[1].offset, p2.offset);
  });
});
