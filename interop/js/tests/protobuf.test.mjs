// The Protobuf build of centrifuge-js (`centrifuge/build/protobuf`, the codec the Android,
// iOS and Dart SDKs speak): it asks for the `centrifuge-protobuf` subprotocol and sends
// binary frames. Connect, subscribe, publish from the client and the API, history, presence,
// recovery after a cut connection, token refresh, and JSON and Protobuf subscribers on one
// channel.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Centrifuge as ProtobufCentrifuge } from 'centrifuge/build/protobuf';

import {
  CLIENT_EVENTS,
  Recorder,
  SUB_EVENTS,
  WebSocket,
  api,
  apiResult,
  connectedClient,
  eventually,
  jwtPayload,
  mintToken,
  publish,
  startProxy,
  startServer,
  subscribed,
  uid,
} from './harness.mjs';

const enc = new TextEncoder();
const dec = new TextDecoder();
const json = (bytes) => JSON.parse(dec.decode(bytes));

/** A Protobuf client, disconnected when `t` ends. */
function protoClient(t, url, { user = 'proto', ...options } = {}) {
  const opts = { ...options };
  if (opts.token === undefined && opts.getToken === undefined) opts.token = mintToken({ sub: user });
  const client = new ProtobufCentrifuge(url, {
    websocket: WebSocket,
    minReconnectDelay: 50,
    maxReconnectDelay: 300,
    timeout: 4000,
    ...opts,
  });
  client.rec = new Recorder(client, CLIENT_EVENTS, `protobuf client ${url}`);
  t.after(() => client.disconnect());
  return client;
}

async function connectedProto(t, url, options) {
  const client = protoClient(t, url, options);
  client.connect();
  await client.rec.waitFor('connected');
  return client;
}

async function subscribedProto(client, channel, options = {}) {
  const sub = client.newSubscription(channel, options);
  sub.rec = new Recorder(sub, SUB_EVENTS, `subscription ${channel}`);
  sub.subscribe();
  await sub.rec.waitFor('subscribed');
  return sub;
}

describe('centrifuge-js, Protobuf build', () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
  });

  test('connects over the centrifuge-protobuf subprotocol and receives API publications as bytes', async (t) => {
    const client = await connectedProto(t, server.wsUrl, { user: 'pb-alice' });
    assert.equal(client._transport.subName(), 'websocket');
    assert.equal(client._transport._transport.protocol, 'centrifuge-protobuf', 'server echoed the subprotocol');
    const ch = uid('pb');
    const sub = await subscribedProto(client, ch);
    for (let i = 0; i < 10; i++) await publish(server, ch, { n: i });
    const pubs = await sub.rec.waitCount('publication', 10);
    assert.ok(pubs[0].data instanceof Uint8Array, 'Protobuf data is bytes');
    assert.deepEqual(
      pubs.map((p) => json(p.data).n),
      Array.from({ length: 10 }, (_, i) => i),
    );
    assert.deepEqual(
      pubs.map((p) => p.offset),
      Array.from({ length: 10 }, (_, i) => i + 1),
    );
  });

  test('client publish of arbitrary bytes, history and presence', async (t) => {
    const ch = uid('pbbin');
    const a = await connectedProto(t, server.wsUrl, { user: 'pb-a' });
    const b = await connectedProto(t, server.wsUrl, { user: 'pb-b' });
    const subA = await subscribedProto(a, ch);
    const subB = await subscribedProto(b, ch);
    const bytes = new Uint8Array([0, 159, 146, 150, 255, 10, 123]);
    await subA.publish(bytes);
    const got = await subB.rec.waitFor('publication');
    assert.deepEqual(Array.from(got.data), Array.from(bytes), 'bytes unchanged');
    assert.equal(got.info?.user, 'pb-a');
    await subA.publish(enc.encode(JSON.stringify({ hello: 'json' })));
    const got2 = await subB.rec.waitFor('publication', (p) => p.offset === 2);
    assert.deepEqual(json(got2.data), { hello: 'json' });

    const hist = await subB.history({ limit: -1 });
    assert.deepEqual(Array.from(hist.publications[0].data), Array.from(bytes));
    assert.equal(hist.publications.length, 2);

    const presence = await subA.presence();
    const users = Object.values(presence.clients).map((c) => c.user).sort();
    assert.deepEqual(users, ['pb-a', 'pb-b']);
    const stats = await subA.presenceStats();
    assert.equal(stats.numClients, 2);
  });

  test('JSON and Protobuf subscribers on one channel both get every publication once', async (t) => {
    const ch = uid('mixed');
    const pb = await connectedProto(t, server.wsUrl, { user: 'pb-mix' });
    const js = await connectedClient(t, server.wsUrl, { user: 'js-mix' });
    const subPb = await subscribedProto(pb, ch);
    const subJs = await subscribed(js, ch);
    for (let i = 0; i < 20; i++) await publish(server, ch, { i });
    await subPb.publish(enc.encode(JSON.stringify({ i: 20 })));
    const pbPubs = await subPb.rec.waitCount('publication', 21);
    const jsPubs = await subJs.rec.waitCount('publication', 21);
    assert.deepEqual(
      pbPubs.map((p) => json(p.data).i),
      jsPubs.map((p) => p.data.i),
    );
    assert.deepEqual(
      jsPubs.map((p) => p.offset),
      Array.from({ length: 21 }, (_, i) => i + 1),
    );
    // Binary data from a Protobuf client reaches the JSON client as a base64 string.
    await subPb.publish(new Uint8Array([1, 2, 255]));
    const binPub = await subJs.rec.waitFor('publication', (p) => p.offset === 22);
    assert.equal(binPub.data, Buffer.from([1, 2, 255]).toString('base64'));
    await eventually(() => subPb.rec.count('publication') === 22 && subJs.rec.count('publication') === 22, {
      what: 'no duplicates',
    });
  });

  test('recovers missed publications after a cut connection', async (t) => {
    const ch = uid('pbrec');
    const proxy = await startProxy(t, server.port);
    const client = await connectedProto(t, proxy.wsUrl, { user: 'pb-rec' });
    const sub = await subscribedProto(client, ch);
    for (let i = 0; i < 3; i++) await publish(server, ch, { seq: i });
    await sub.rec.waitCount('publication', 3);
    const mark = sub.rec.mark();
    proxy.cut();
    await sub.rec.waitFor('subscribing', () => true, { after: mark });
    for (let i = 3; i < 8; i++) await publish(server, ch, { seq: i });
    proxy.restore();
    const again = await sub.rec.waitFor('subscribed', () => true, { after: mark, timeout: 8000 });
    assert.equal(again.wasRecovering, true);
    assert.equal(again.recovered, true, JSON.stringify(again));
    const pubs = await sub.rec.waitCount('publication', 8);
    assert.deepEqual(
      pubs.map((p) => json(p.data).seq),
      Array.from({ length: 8 }, (_, i) => i),
    );
  });

  test('refreshes a short-lived token and stays connected', async (t) => {
    const exps = [];
    const getToken = async () => {
      const token = mintToken({ sub: 'pb-refresh', ttl: 2 });
      exps.push(jwtPayload(token).exp);
      return token;
    };
    const client = protoClient(t, server.wsUrl, { getToken });
    client.connect();
    await client.rec.waitFor('connected');
    await eventually(() => exps.length >= 3 && Date.now() > (exps[0] + 2) * 1000, {
      timeout: 15000,
      what: 'getToken called three times and 2 s past the first expiry',
    });
    assert.equal(client.state, 'connected');
    assert.equal(client.rec.count('disconnected'), 0, client.rec.summary());
  });

  test('server-side subscribe and disconnect reach a Protobuf client', async (t) => {
    const client = await connectedProto(t, server.wsUrl, { user: 'pb-server' });
    const ch = uid('srv');
    await apiResult(server, 'subscribe', { user: 'pb-server', channel: ch });
    await client.rec.waitFor('subscribed', (ctx) => ctx.channel === ch);
    await publish(server, ch, { server: true });
    const pub = await client.rec.waitFor('publication', (ctx) => ctx.channel === ch);
    assert.deepEqual(json(pub.data), { server: true });
    const r = await api(server, 'disconnect', { user: 'pb-server', disconnect: { code: 4500, reason: 'bye' } });
    assert.equal(r.status, 200);
    const d = await client.rec.waitFor('disconnected');
    assert.equal(d.code, 4500);
  });

  test('HTTP streaming in Protobuf: octet-stream connect, Protobuf emulation requests', async (t) => {
    const base = server.httpUrl;
    const client = await connectedProto(
      t,
      [{ transport: 'http_stream', endpoint: `${base}/connection/http_stream` }],
      { user: 'pb-stream', emulationEndpoint: `${base}/emulation` },
    );
    assert.equal(client.rec.all('connected')[0].transport, 'http_stream');
    const ch = uid('pbstream');
    const sub = await subscribedProto(client, ch);
    await publish(server, ch, { via: 'api' });
    await sub.publish(enc.encode('from the stream client'));
    const pubs = await sub.rec.waitCount('publication', 2);
    assert.deepEqual(json(pubs[0].data), { via: 'api' });
    assert.equal(dec.decode(pubs[1].data), 'from the stream client');
    const history = await sub.history({ limit: -1 });
    assert.equal(history.publications.length, 2);
  });
});
