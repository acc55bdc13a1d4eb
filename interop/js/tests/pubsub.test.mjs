// Subscriptions with centrifuge-js: delivery of server API publications, client publish
// permissions, namespaces, history, presence, join/leave.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  apiResult,
  connectedClient,
  eventually,
  newSub,
  publish,
  rejectsWithCode,
  startServer,
  subscribed,
  uid,
} from './harness.mjs';

describe('publish and subscribe', () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
  });

  test('receives server API publications in order with their data and offsets', async (t) => {
    const client = await connectedClient(t, server.wsUrl, { user: 'alice' });
    const ch = uid('feed');
    const sub = await subscribed(client, ch);
    const sent = [];
    for (let i = 0; i < 20; i++) {
      const data = { n: i, text: `message ${i}`, nested: { list: [i, i * 2], ok: true } };
      const res = await publish(server, ch, data);
      assert.equal(typeof res.epoch, 'string');
      assert.ok(res.epoch.length > 0, `publish result has an epoch: ${JSON.stringify(res)}`);
      sent.push({ data, offset: res.offset, epoch: res.epoch });
    }
    const got = await sub.rec.waitCount('publication', 20);
    assert.deepEqual(
      got.map((p) => p.data),
      sent.map((s) => s.data),
    );
    assert.deepEqual(
      got.map((p) => p.offset),
      sent.map((s) => s.offset),
    );
    for (let i = 1; i < sent.length; i++) {
      assert.equal(sent[i].offset, sent[i - 1].offset + 1, 'offsets increase by one');
      assert.equal(sent[i].epoch, sent[0].epoch, 'epoch is stable');
    }
    assert.equal(got[0].channel, ch);
    assert.equal(got[0].info, undefined, 'server API publications carry no client info');
  });

  test('a subscriber may publish in the default namespace; others receive it with client info', async (t) => {
    const ch = uid('chat');
    const alice = await connectedClient(t, server.wsUrl, { user: 'alice' });
    const bob = await connectedClient(t, server.wsUrl, { user: 'bob' });
    const subA = await subscribed(alice, ch);
    const subB = await subscribed(bob, ch);
    await subA.publish({ from: 'alice', text: 'hello' });
    const pub = await subB.rec.waitFor('publication');
    assert.deepEqual(pub.data, { from: 'alice', text: 'hello' });
    assert.equal(pub.info?.user, 'alice', `publication info: ${JSON.stringify(pub)}`);
    assert.ok(pub.info?.client, 'publication info carries the publisher client id');
    // The publisher gets its own publication too.
    const own = await subA.rec.waitFor('publication');
    assert.deepEqual(own.data, { from: 'alice', text: 'hello' });
  });

  test('publishing without a subscription is denied with 103 (allow_publish_for_client = false)', async (t) => {
    const client = await connectedClient(t, server.wsUrl, { user: 'alice' });
    await rejectsWithCode(client.publish(uid('nosub'), { x: 1 }), 103, 'client.publish');
  });

  test('publishing in namespace "news" is denied with 103, subscribing is allowed', async (t) => {
    const client = await connectedClient(t, server.wsUrl, { user: 'alice' });
    const ch = `news:${uid('headline')}`;
    const sub = await subscribed(client, ch);
    await rejectsWithCode(sub.publish({ x: 1 }), 103, 'sub.publish in news');
    // The denial did not break the subscription.
    await publish(server, ch, { title: 'from the backend' });
    const pub = await sub.rec.waitFor('publication');
    assert.deepEqual(pub.data, { title: 'from the backend' });
  });

  test('an unknown namespace is refused with 102', async (t) => {
    const client = await connectedClient(t, server.wsUrl, { user: 'alice' });
    const sub = newSub(client, `nope:${uid('x')}`);
    sub.subscribe();
    const ctx = await sub.rec.waitFor('unsubscribed');
    assert.equal(ctx.code, 102, `unsubscribed: ${JSON.stringify(ctx)}`);
    assert.equal(sub.rec.count('subscribed'), 0);
    assert.equal(client.state, 'connected', 'the connection survives a refused subscription');
  });

  test('history from the SDK: limit, since and reverse', async (t) => {
    const client = await connectedClient(t, server.wsUrl, { user: 'alice' });
    const ch = uid('hist');
    const sub = await subscribed(client, ch);
    const offsets = [];
    let epoch;
    for (let i = 1; i <= 5; i++) {
      const res = await publish(server, ch, { n: i });
      offsets.push(res.offset);
      epoch = res.epoch;
    }
    await sub.rec.waitCount('publication', 5);

    const all = await sub.history({ limit: 10 });
    assert.deepEqual(
      all.publications.map((p) => p.data.n),
      [1, 2, 3, 4, 5],
    );
    assert.deepEqual(
      all.publications.map((p) => p.offset),
      offsets,
    );
    assert.equal(all.offset, offsets[4], 'history reports the stream top offset');
    assert.equal(all.epoch, epoch, 'history reports the stream epoch');

    const since = await sub.history({ limit: 2, since: { offset: offsets[1], epoch } });
    assert.deepEqual(
      since.publications.map((p) => p.data.n),
      [3, 4],
      'since is exclusive, limit caps the count',
    );

    const rev = await sub.history({ limit: 2, reverse: true });
    assert.deepEqual(
      rev.publications.map((p) => p.data.n),
      [5, 4],
      'reverse returns the newest first',
    );

    // The same through the server API.
    const viaApi = await apiResult(server, 'history', { channel: ch, limit: 10 });
    assert.deepEqual(
      viaApi.publications.map((p) => p.data.n),
      [1, 2, 3, 4, 5],
    );
    assert.equal(viaApi.offset, offsets[4]);
    assert.equal(viaApi.epoch, epoch);
    const viaApiSince = await apiResult(server, 'history', {
      channel: ch,
      limit: 10,
      since: { offset: offsets[3], epoch },
    });
    assert.deepEqual(
      viaApiSince.publications.map((p) => p.offset),
      [offsets[4]],
    );
  });

  test('history is denied with 103 where allow_history_for_subscriber is off ("news")', async (t) => {
    const client = await connectedClient(t, server.wsUrl, { user: 'alice' });
    const sub = await subscribed(client, `news:${uid('h')}`);
    await rejectsWithCode(sub.history({ limit: 10 }), 103, 'history in news');
  });

  test('presence and presence stats from the SDK and the server API', async (t) => {
    const ch = uid('room');
    const alice = await connectedClient(t, server.wsUrl, { user: 'alice' });
    const bob = await connectedClient(t, server.wsUrl, { user: 'bob' });
    const bob2 = await connectedClient(t, server.wsUrl, { user: 'bob' });
    const subA = await subscribed(alice, ch);
    const subB = await subscribed(bob, ch);
    await subscribed(bob2, ch);

    const presence = await subA.presence();
    const entries = Object.entries(presence.clients);
    assert.equal(entries.length, 3, JSON.stringify(presence));
    for (const [id, info] of entries) assert.equal(info.client, id, 'presence is keyed by client id');
    assert.deepEqual(entries.map(([, info]) => info.user).sort(), ['alice', 'bob', 'bob']);

    const stats = await subB.presenceStats();
    assert.deepEqual(stats, { numClients: 3, numUsers: 2 });

    const apiPresence = await apiResult(server, 'presence', { channel: ch });
    assert.deepEqual(Object.values(apiPresence.presence).map((i) => i.user).sort(), ['alice', 'bob', 'bob']);
    const apiStats = await apiResult(server, 'presence_stats', { channel: ch });
    assert.equal(apiStats.num_clients, 3);
    assert.equal(apiStats.num_users, 2);

    // Leaving the channel removes the entry.
    subB.unsubscribe();
    await eventually(
      async () => (await apiResult(server, 'presence_stats', { channel: ch })).num_clients === 2,
      { what: 'presence_stats num_clients == 2 after unsubscribe' },
    );
    const after = await subA.presenceStats();
    assert.deepEqual(after, { numClients: 2, numUsers: 2 });
  });

  test('presence where the namespace has it off ("news") is 108 not available', async (t) => {
    const client = await connectedClient(t, server.wsUrl, { user: 'alice' });
    const sub = await subscribed(client, `news:${uid('p')}`);
    await rejectsWithCode(sub.presence(), 108, 'presence in news');
    await rejectsWithCode(sub.presenceStats(), 108, 'presence stats in news');
  });

  test('join and leave events reach a subscriber that asked for them', async (t) => {
    const ch = uid('jl');
    const alice = await connectedClient(t, server.wsUrl, { user: 'alice' });
    const subA = await subscribed(alice, ch, { joinLeave: true });
    const bob = await connectedClient(t, server.wsUrl, { user: 'bob' });
    const subB = await subscribed(bob, ch);
    const join = await subA.rec.waitFor('join', (c) => c.info.user === 'bob');
    assert.equal(join.channel, ch);
    subB.unsubscribe();
    const leave = await subA.rec.waitFor('leave', (c) => c.info.user === 'bob');
    assert.equal(leave.info.client, join.info.client);
  });
});
