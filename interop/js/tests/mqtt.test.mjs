// MQTT devices (Debian's mosquitto_pub and mosquitto_sub) and centrifuge-js on the same
// channels: what a device publishes reaches a centrifuge-js subscriber, and what a
// centrifuge-js client publishes reaches a device, payloads kept.

import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { after, before, describe, test } from 'node:test';

import { connectedClient, eventually, mintToken, startServer, subscribed, uid } from './harness.mjs';

const NAMESPACES = [
  {
    name: '',
    history_size: 100,
    history_ttl: '5m',
    force_recovery: true,
    allow_subscribe_for_client: true,
    allow_publish_for_client: true,
  },
];

function mosquitto(bin, port, args) {
  return ['-h', '127.0.0.1', '-p', String(port), '-u', 'device', '-P', mintToken({ sub: 'device' }), ...args];
}

function mosquittoPub(port, args) {
  return new Promise((resolve, reject) => {
    execFile('mosquitto_pub', mosquitto('mosquitto_pub', port, args), { timeout: 10000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`mosquitto_pub ${args.join(' ')}: ${err.message} ${stderr}`));
      else resolve(stdout);
    });
  });
}

describe('MQTT devices beside centrifuge-js', () => {
  let server;
  let port;
  before(async () => {
    server = await startServer({ namespaces: NAMESPACES, extraToml: '[mqtt]\nlisten = "127.0.0.1:0"' });
    port = await eventually(
      () => {
        const line = server.stdout.find((l) => l.startsWith('herald: mqtt listening on mqtt://127.0.0.1:'));
        return line && Number(line.split(':').pop());
      },
      { what: 'the MQTT listening line' },
    );
  });
  after(async () => {
    await server.stop();
    server.cleanup();
  });

  test('a device publishes; a centrifuge-js subscriber receives JSON as JSON, bytes as base64', async (t) => {
    const client = await connectedClient(t, server.wsUrl, { user: 'web' });
    const ch = uid('mqtt');
    const sub = await subscribed(client, ch);
    await mosquittoPub(port, ['-t', ch, '-q', '1', '-m', '{"temp":21.5}']);
    await mosquittoPub(port, ['-t', ch, '-q', '1', '-m', 'not json']);
    const pubs = await sub.rec.waitCount('publication', 2);
    assert.deepEqual(pubs[0].data, { temp: 21.5 });
    assert.equal(pubs[0].info.user, 'device');
    assert.equal(Buffer.from(pubs[1].data, 'base64').toString(), 'not json');
  });

  test('a centrifuge-js client publishes; a device receives the JSON text', async (t) => {
    const ch = uid('mqtt');
    const device = spawn('stdbuf', ['-oL', 'mosquitto_sub', ...mosquitto('mosquitto_sub', port, ['-t', ch, '-q', '1', '-d'])]);
    t.after(() => device.kill());
    let out = '';
    device.stdout.on('data', (d) => {
      out += d;
    });
    await eventually(() => out.includes('Subscribed'), { what: 'the device subscribed' });
    const client = await connectedClient(t, server.wsUrl, { user: 'web' });
    await client.publish(ch, { hello: 'device' });
    await eventually(() => out.split('\n').includes('{"hello":"device"}'), { what: 'the device got the publication' });
  });
});
