// Connection token lifecycle with centrifuge-js: refresh before expiry, an expired token at
// connect (error 109, then getToken), and expiry enforced by the node (3005).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  eventually,
  jwtPayload,
  mintToken,
  newClient,
  publish,
  startServer,
  subscribed,
  uid,
} from './harness.mjs';

// The tests of this suite mostly wait for clocks; they run side by side.
describe('connection tokens', { concurrency: true }, () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
  });

  test('a short-lived token is refreshed through getToken and the connection survives', async (t) => {
    const exps = [];
    const getToken = async () => {
      const token = mintToken({ sub: 'refresher', ttl: 2 });
      exps.push(jwtPayload(token).exp);
      return token;
    };
    const client = newClient(t, server.wsUrl, { getToken });
    client.connect();
    await client.rec.waitFor('connected');
    assert.equal(exps.length, 1, 'getToken gave the first token');

    // Refreshed twice, and well past the first token's expiry.
    await eventually(() => exps.length >= 3 && Date.now() > (exps[0] + 2) * 1000, {
      timeout: 15000,
      what: 'getToken called three times and 2 s past the first expiry',
    });
    assert.equal(client.state, 'connected');
    assert.equal(client.rec.count('connecting'), 1, `no reconnect:\n${client.rec.summary()}`);
    assert.equal(client.rec.count('disconnected'), 0, `no disconnect:\n${client.rec.summary()}`);
    assert.equal(client.rec.count('error'), 0, `no refresh error:\n${client.rec.summary()}`);

    // And it still works.
    const ch = uid('alive');
    const sub = await subscribed(client, ch);
    await publish(server, ch, { still: 'here' });
    const pub = await sub.rec.waitFor('publication');
    assert.deepEqual(pub.data, { still: 'here' });
  });

  test('an already expired token at connect gets 109, the SDK calls getToken and connects', async (t) => {
    const now = Math.floor(Date.now() / 1000);
    const expired = mintToken({ sub: 'late', iat: now - 120, exp: now - 60 });
    let calls = 0;
    const getToken = async () => {
      calls += 1;
      return mintToken({ sub: 'late' });
    };
    const client = newClient(t, server.wsUrl, { token: expired, getToken });
    client.connect();
    await client.rec.waitFor('connected', () => true, { timeout: 8000 });
    assert.equal(calls, 1, 'getToken called once');
    const errors = client.rec.all('error');
    assert.ok(
      errors.some((e) => e.type === 'connect' && e.error?.code === 109),
      `a connect error 109 was reported: ${client.rec.summary()}`,
    );
  });

  test('a connection whose token is not refreshed is closed with 3005', async (t) => {
    let calls = 0;
    // The refresh never completes: the node must end the connection at expiry.
    const getToken = () => {
      calls += 1;
      return new Promise(() => {});
    };
    const client = newClient(t, server.wsUrl, { token: mintToken({ sub: 'expiring', ttl: 2 }), getToken });
    client.connect();
    await client.rec.waitFor('connected');
    const started = Date.now();
    const ctx = await client.rec.waitFor('connecting', (c) => c.code !== 0, { timeout: 40000 });
    assert.equal(ctx.code, 3005, `close code: ${JSON.stringify(ctx)}`);
    t.diagnostic(`closed ${Date.now() - started} ms after connect; getToken calls: ${calls}`);
  });
});
