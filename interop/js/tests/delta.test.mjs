// Fossil delta compression with centrifuge-js, JSON and Protobuf builds: the SDK applies
// the patches and its application sees every publication whole; recovery after a cut
// connection with delta on; a subscription without delta on the same channel.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Centrifuge as ProtobufCentrifuge } from 'centrifuge/build/protobuf';

import {
  CLIENT_EVENTS,
  DEFAULT_NAMESPACES,
  Recorder,
  SUB_EVENTS,
  WebSocket,
  connectedClient,
  mintToken,
  publish,
  startProxy,
  startServer,
  subscribed,
  uid,
} from './harness.mjs';

const dec = new TextDecoder();

/** A ~2 KiB document where publication `i` changes one field. */
function doc(i) {
  const items = Array.from({ length: 24 }, (_, k) => ({
    id: k,
    name: `instrument-${String(k).padStart(3, '0')}`,
    venue: 'XPAR',
    currency: 'EUR',
  }));
  return { seq: i, price: 100 + i * 7, items };
}

async function connectedProto(t, url, user) {
  const client = new ProtobufCentrifuge(url, {
    websocket: WebSocket,
    token: mintToken({ sub: user }),
    minReconnectDelay: 50,
    maxReconnectDelay: 300,
    timeout: 4000,
  });
  client.rec = new Recorder(client, CLIENT_EVENTS, `protobuf client ${url}`);
  t.after(() => client.disconnect());
  client.connect();
  await client.rec.waitFor('connected');
  return client;
}

async function subscribedWith(client, channel, options) {
  const sub = client.newSubscription(channel, options);
  sub.rec = new Recorder(sub, SUB_EVENTS, `subscription ${channel}`);
  sub.subscribe();
  await sub.rec.waitFor('subscribed');
  return sub;
}

describe('centrifuge-js with fossil delta', () => {
  let server;
  before(async () => {
    server = await startServer({
      namespaces: [
        ...DEFAULT_NAMESPACES,
        {
          name: 'delta',
          history_size: 100,
          history_ttl: '5m',
          force_recovery: true,
          allow_subscribe_for_client: true,
          allowed_delta_types: ['fossil'],
        },
      ],
    });
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
  });

  test('JSON build: whole documents reach the application, patches on the wire', async (t) => {
    const ch = uid('delta:json');
    const client = await connectedClient(t, server.wsUrl, { user: 'dj' });
    const sub = await subscribedWith(client, ch, { delta: 'fossil' });
    assert.equal(sub._delta_negotiated, true, 'server agreed to delta');
    const plain = await subscribed(client, uid('delta:other'));
    assert.ok(plain);
    for (let i = 0; i < 10; i++) await publish(server, ch, doc(i));
    const pubs = await sub.rec.waitCount('publication', 10);
    assert.deepEqual(
      pubs.map((p) => p.data),
      Array.from({ length: 10 }, (_, i) => doc(i)),
    );
    const stats = sub.deltaStats();
    assert.equal(stats.numFullPayloads, 1, JSON.stringify(stats));
    assert.equal(stats.numDeltaPayloads, 9, JSON.stringify(stats));
    assert.ok(stats.bytesReceived * 5 < stats.bytesDecoded, JSON.stringify(stats));
  });

  test('Protobuf build: byte patches applied by the SDK', async (t) => {
    const ch = uid('delta:pb');
    const client = await connectedProto(t, server.wsUrl, 'dp');
    const sub = await subscribedWith(client, ch, { delta: 'fossil' });
    assert.equal(sub._delta_negotiated, true);
    for (let i = 0; i < 10; i++) await publish(server, ch, doc(i));
    const pubs = await sub.rec.waitCount('publication', 10);
    assert.deepEqual(
      pubs.map((p) => JSON.parse(dec.decode(p.data))),
      Array.from({ length: 10 }, (_, i) => doc(i)),
    );
    const stats = sub.deltaStats();
    assert.equal(stats.numDeltaPayloads, 9, JSON.stringify(stats));
  });

  test('delta and plain subscribers on one channel, JSON and Protobuf', async (t) => {
    const ch = uid('delta:mixed');
    const jsonClient = await connectedClient(t, server.wsUrl, { user: 'm1' });
    const pbClient = await connectedProto(t, server.wsUrl, 'm2');
    const withDelta = await subscribedWith(jsonClient, ch, { delta: 'fossil' });
    const pbDelta = await subscribedWith(pbClient, ch, { delta: 'fossil' });
    const without = await subscribedWith(pbClient, uid('delta:unused'), {});
    assert.ok(without);
    const otherJson = await connectedClient(t, server.wsUrl, { user: 'm3' });
    const plain = await subscribed(otherJson, ch);
    for (let i = 0; i < 5; i++) await publish(server, ch, doc(i));
    const expected = Array.from({ length: 5 }, (_, i) => doc(i));
    assert.deepEqual((await withDelta.rec.waitCount('publication', 5)).map((p) => p.data), expected);
    assert.deepEqual(
      (await pbDelta.rec.waitCount('publication', 5)).map((p) => JSON.parse(dec.decode(p.data))),
      expected,
    );
    assert.deepEqual((await plain.rec.waitCount('publication', 5)).map((p) => p.data), expected);
    assert.equal(plain.deltaStats().numDeltaPayloads, 0);
  });

  test('recovers after a cut connection with delta on', async (t) => {
    const ch = uid('delta:rec');
    const proxy = await startProxy(t, server.port);
    const client = await connectedClient(t, proxy.wsUrl, { user: 'dr' });
    const sub = await subscribedWith(client, ch, { delta: 'fossil' });
    for (let i = 0; i < 3; i++) await publish(server, ch, doc(i));
    await sub.rec.waitCount('publication', 3);
    const mark = sub.rec.mark();
    proxy.cut();
    await sub.rec.waitFor('subscribing', () => true, { after: mark });
    for (let i = 3; i < 7; i++) await publish(server, ch, doc(i));
    proxy.restore();
    const again = await sub.rec.waitFor('subscribed', () => true, { after: mark, timeout: 8000 });
    assert.equal(again.recovered, true, JSON.stringify(again));
    await sub.rec.waitCount('publication', 7);
    for (let i = 7; i < 10; i++) await publish(server, ch, doc(i));
    const pubs = await sub.rec.waitCount('publication', 10);
    assert.deepEqual(
      pubs.map((p) => p.data),
      Array.from({ length: 10 }, (_, i) => doc(i)),
    );
    assert.ok(sub.deltaStats().numDeltaPayloads >= 4, JSON.stringify(sub.deltaStats()));
  });
});
