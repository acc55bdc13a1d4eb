// The proxy with centrifuge-js in Node: a connection authenticated by its cookie and no
// token, subscribe refused and publish rewritten by the backend, RPC results and errors,
// refresh by the backend, and a backend that is down, slow or answers garbage while a
// bystander keeps working.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { PROXY_NAMESPACE, proxyToml, startBackend } from './backend.mjs';
import {
  DEFAULT_NAMESPACES,
  WebSocket,
  connectedClient,
  newClient,
  newSub,
  publish,
  startServer,
  subscribed,
  uid,
} from './harness.mjs';

/** A WebSocket that sends `Cookie: session=<user>` with its upgrade, as a browser would. */
function cookieSocket(user) {
  return class extends WebSocket {
    constructor(address, protocols, options) {
      super(address, protocols, { ...(options || {}), headers: { Cookie: `session=${user}; theme=dark` } });
    }
  };
}

async function cookieClient(t, server, user, options = {}) {
  const client = newClient(t, server.wsUrl, { websocket: cookieSocket(user), ...options });
  client.connect();
  return client;
}

describe('proxy: the backend in the loop (centrifuge-js, Node)', () => {
  let backend;
  let server;
  before(async () => {
    backend = await startBackend();
    server = await startServer({
      namespaces: [...DEFAULT_NAMESPACES, PROXY_NAMESPACE],
      extraToml: proxyToml(backend.url),
    });
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
    await backend?.close();
  });

  test('connects with a cookie and no token; the backend names the user and its channels', async (t) => {
    const client = await cookieClient(t, server, 'js-alice');
    const connected = await client.rec.waitFor('connected');
    assert.deepEqual(connected.data, { greeting: 'hi js-alice', via: 'websocket' });
    const call = backend.calls('/connect').at(-1);
    assert.match(call.headers.cookie, /session=js-alice/);
    assert.equal(call.body.client, connected.client);
    assert.equal(call.body.protocol, 'json');
    // The personal channel the backend listed is a server-side subscription.
    await client.rec.waitFor('subscribed', (ctx) => ctx.channel === '#js-alice');
    await publish(server, '#js-alice', { to: 'alice' });
    const pub = await client.rec.waitFor('publication', (ctx) => ctx.channel === '#js-alice');
    assert.deepEqual(pub.data, { to: 'alice' });
  });

  test('RPC: the backend answers, its errors reach the caller', async (t) => {
    const client = await cookieClient(t, server, 'js-rpc');
    await client.rec.waitFor('connected');
    const r = await client.rpc('whoami', { q: 1 });
    assert.deepEqual(r.data, { user: 'js-rpc', params: { q: 1 } });
    await assert.rejects(client.rpc('fail', {}), (e) => e.code === 1002 && e.message === 'nope');
  });

  test('subscribe refused by the backend (103); publish rewritten by it', async (t) => {
    const client = await cookieClient(t, server, 'js-pub');
    await client.rec.waitFor('connected');
    const refused = newSub(client, uid('px:secret'));
    refused.subscribe();
    const gone = await refused.rec.waitFor('unsubscribed');
    assert.equal(gone.code, 103);
    const ch = uid('px:room');
    const sub = await subscribed(client, ch);
    assert.deepEqual(sub.rec.all('subscribed')[0].data, { welcome: 'js-pub' });
    await sub.publish({ text: 'raw' });
    const pub = await sub.rec.waitFor('publication');
    assert.deepEqual(pub.data, { rewritten: { text: 'raw' }, by: 'js-pub' });
  });

  test('the backend extends a connection it gave an expiry', async (t) => {
    const before = backend.calls('/refresh').length;
    const client = await cookieClient(t, server, 'expiring-js');
    await client.rec.waitFor('connected');
    const deadline = Date.now() + 6000;
    while (backend.calls('/refresh').length === before) {
      assert.ok(Date.now() < deadline, 'the refresh proxy was not called');
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(client.state, 'connected');
    assert.equal(client.rec.count('disconnected'), 0, client.rec.summary());
  });

  test('backend slow or garbage: error 100 for the caller, bystanders unaffected', async (t) => {
    const bystander = await connectedClient(t, server.wsUrl, { user: 'by' });
    const ch = uid('calm');
    const calm = await subscribed(bystander, ch);
    const client = await cookieClient(t, server, 'js-unlucky');
    await client.rec.waitFor('connected');
    for (const method of ['slow', 'garbage']) {
      await assert.rejects(client.rpc(method, {}), (e) => e.code === 100, method);
      await publish(server, ch, { after: method });
    }
    const pubs = await calm.rec.waitCount('publication', 2);
    assert.deepEqual(
      pubs.map((p) => p.data.after),
      ['slow', 'garbage'],
    );
    assert.equal(client.state, 'connected');
  });
});

describe('proxy: backend down', () => {
  test('connect gets a temporary error and the SDK keeps retrying; token clients unaffected', async (t) => {
    // A port nothing listens on.
    const gone = await startBackend();
    const url = gone.url;
    await gone.close();
    const server = await startServer({ extraToml: proxyToml(url) });
    t.after(async () => {
      await server.stop();
      server.cleanup();
    });
    const client = await cookieClient(t, server, 'nobody-home');
    const err = await client.rec.waitFor('error');
    assert.equal(err.error.code, 100, JSON.stringify(err));
    assert.notEqual(client.state, 'connected');
    const withToken = await connectedClient(t, server.wsUrl, { user: 'tokened' });
    assert.equal(withToken.state, 'connected');
  });
});
