// Server API calls that act on connected centrifuge-js clients, and API authentication.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { api, apiResult, connectedClient, publish, startServer, subscribed, uid } from './harness.mjs';

describe('server API and clients', () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
  });

  test('a wrong or missing API key gets HTTP 401', async () => {
    const wrong = await api(server, 'info', {}, { key: 'wrong' });
    assert.equal(wrong.status, 401);
    const missing = await api(server, 'info', {}, { key: null });
    assert.equal(missing.status, 401);
    // The other documented header form works.
    const res = await fetch(`${server.httpUrl}/api/info`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: 'apikey apikey' },
      body: '{}',
    });
    assert.equal(res.status, 200);
    const body = await res.json();
    assert.equal(body.result?.nodes?.length, 1, JSON.stringify(body));
  });

  test('subscribe by user adds a server-side subscription the SDK reports', async (t) => {
    const user = uid('u');
    const client = await connectedClient(t, server.wsUrl, { user });
    const ch = uid('server-side');
    await apiResult(server, 'subscribe', { user, channel: ch });
    const ctx = await client.rec.waitFor('subscribed', (c) => c.channel === ch);
    assert.equal(ctx.channel, ch);
    await publish(server, ch, { to: user });
    const pub = await client.rec.waitFor('publication', (c) => c.channel === ch);
    assert.deepEqual(pub.data, { to: user });
  });

  test('unsubscribe by user ends the client subscription (code 2000)', async (t) => {
    const user = uid('u');
    const client = await connectedClient(t, server.wsUrl, { user });
    const ch = uid('kick');
    const sub = await subscribed(client, ch);
    await apiResult(server, 'unsubscribe', { user, channel: ch });
    const ctx = await sub.rec.waitFor('unsubscribed');
    assert.equal(ctx.code, 2000, `unsubscribed: ${JSON.stringify(ctx)}`);
    assert.equal(sub.state, 'unsubscribed');
    const stats = await apiResult(server, 'presence_stats', { channel: ch });
    assert.equal(stats.num_clients ?? 0, 0);
    assert.equal(client.state, 'connected', 'the connection stays');
  });

  test('disconnect by user closes the connection with the given code', async (t) => {
    const user = uid('u');
    const client = await connectedClient(t, server.wsUrl, { user });
    const other = await connectedClient(t, server.wsUrl, { user: uid('other') });
    await apiResult(server, 'disconnect', { user, disconnect: { code: 4503, reason: 'go away' } });
    const ctx = await client.rec.waitFor('disconnected');
    assert.equal(ctx.code, 4503, `disconnected: ${JSON.stringify(ctx)}`);
    assert.equal(ctx.reason, 'go away');
    assert.equal(other.state, 'connected', 'other users stay connected');
  });

  test('disconnect by user without a code uses 3503 force disconnect (no reconnect)', async (t) => {
    const user = uid('u');
    const client = await connectedClient(t, server.wsUrl, { user });
    await apiResult(server, 'disconnect', { user });
    const ctx = await client.rec.waitFor('disconnected');
    assert.equal(ctx.code, 3503, `disconnected: ${JSON.stringify(ctx)}`);
  });

  test('an API error is a 200 reply with an error object', async () => {
    const res = await api(server, 'publish', { channel: `nope:${uid('x')}`, data: {} });
    assert.equal(res.status, 200);
    assert.equal(res.body?.error?.code, 102, JSON.stringify(res.body));
  });
});
