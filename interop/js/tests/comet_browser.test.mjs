// centrifuge-js's browser bundles in headless Chromium: the JSON bundle over WebSocket and
// over the comet transports alone (fetch streaming `http_stream`, the browser's own
// EventSource `sse`), and the Protobuf bundle over WebSocket and http_stream, with fossil
// delta on.
//
// The page server (browser.mjs) forwards the comet transports to Herald on the page's own
// origin; the WebSocket goes to Herald directly.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS, chromiumPath, startPageServer } from './browser.mjs';
import { DEFAULT_NAMESPACES, mintToken, publish, startServer, uid } from './harness.mjs';


describe('browser: centrifuge-js bundle in Chromium over WebSocket and comet transports', () => {
  let herald;
  let pages;
  let browser;
  before(async () => {
    const executablePath = chromiumPath();
    herald = await startServer({
      namespaces: [
        ...DEFAULT_NAMESPACES,
        {
          name: 'delta',
          history_size: 10,
          history_ttl: '1m',
          force_recovery: true,
          allow_subscribe_for_client: true,
          allow_publish_for_subscriber: true,
          allowed_delta_types: ['fossil'],
        },
      ],
    });
    pages = await startPageServer(herald.port);
    browser = await chromium.launch({ executablePath, args: CHROMIUM_ARGS, timeout: 30000 });
  });
  after(async () => {
    await browser?.close();
    await pages?.close();
    await herald?.stop();
    herald?.cleanup();
  });

  for (const transport of ['websocket', 'http_stream', 'sse']) {
    test(`${transport}: connects, subscribes, receives and publishes`, async (t) => {
      const page = await browser.newPage();
      t.after(() => page.close());
      const errors = [];
      page.on('pageerror', (e) => errors.push(e.message));
      await page.goto(`${pages.url}/`, { timeout: 10000 });

      const ch = uid(`browser-${transport}`);
      const token = mintToken({ sub: `browser-${transport}` });
      // Relative endpoints: the page's origin forwards them to Herald. WebSocket goes to
      // Herald directly (cross-origin, as a page served elsewhere would).
      const endpoint =
        transport === 'websocket'
          ? `ws://127.0.0.1:${herald.port}/connection/websocket`
          : `/connection/${transport}`;
      const connected = await page.evaluate(
        ({ transport, token, ch, endpoint }) =>
          new Promise((resolve, reject) => {
            const timer = setTimeout(() => reject(new Error('no connect within 10 s')), 10000);
            const c = new window.Centrifuge([{ transport, endpoint }], {
              token,
              emulationEndpoint: '/emulation',
              minReconnectDelay: 50,
              maxReconnectDelay: 300,
            });
            window.received = [];
            window.client = c;
            let via = null;
            c.on('connected', (ctx) => {
              via = ctx.transport;
            });
            const sub = c.newSubscription(ch);
            window.sub = sub;
            sub.on('publication', (ctx) => window.received.push(ctx.data));
            sub.on('subscribed', () => {
              clearTimeout(timer);
              resolve({ transport: via, state: c.state });
            });
            sub.subscribe();
            c.connect();
          }),
        { transport, token, ch, endpoint },
      );
      assert.deepEqual(connected, { transport, state: 'connected' });

      for (let i = 0; i < 3; i++) await publish(herald, ch, { i });
      await page.waitForFunction(() => window.received.length >= 3, null, { timeout: 5000 });
      // A publish from the page (through /emulation for the comet transports) comes back.
      await page.evaluate(() => window.sub.publish({ from: 'page' }));
      await page.waitForFunction(() => window.received.length >= 4, null, { timeout: 5000 });
      const received = await page.evaluate(() => window.received);
      assert.deepEqual(received, [{ i: 0 }, { i: 1 }, { i: 2 }, { from: 'page' }]);
      await page.evaluate(() => window.client.disconnect());
      assert.deepEqual(errors, []);
    });
  }

  for (const transport of ['websocket', 'http_stream']) {
    test(`Protobuf bundle, ${transport}: bytes both ways, fossil deltas applied`, async (t) => {
      const page = await browser.newPage();
      t.after(() => page.close());
      const errors = [];
      page.on('pageerror', (e) => errors.push(e.message));
      await page.goto(`${pages.url}/protobuf.html`, { timeout: 10000 });

      const ch = uid(`delta:pb-${transport}`);
      const token = mintToken({ sub: `browser-pb-${transport}` });
      const endpoint =
        transport === 'websocket'
          ? `ws://127.0.0.1:${herald.port}/connection/websocket`
          : `/connection/${transport}`;
      const connected = await page.evaluate(
        ({ transport, token, ch, endpoint }) =>
          new Promise((resolve, reject) => {
            const timer = setTimeout(() => reject(new Error('no connect within 10 s')), 10000);
            const c = new window.Centrifuge([{ transport, endpoint }], {
              token,
              emulationEndpoint: '/emulation',
              minReconnectDelay: 50,
              maxReconnectDelay: 300,
            });
            window.received = [];
            window.client = c;
            let via = null;
            c.on('connected', (ctx) => {
              via = ctx.transport;
            });
            const sub = c.newSubscription(ch, { delta: 'fossil' });
            window.sub = sub;
            const dec = new TextDecoder();
            sub.on('publication', (ctx) => window.received.push(JSON.parse(dec.decode(ctx.data))));
            sub.on('subscribed', () => {
              clearTimeout(timer);
              resolve({ transport: via, state: c.state, binary: c._codec.name() });
            });
            sub.subscribe();
            c.connect();
          }),
        { transport, token, ch, endpoint },
      );
      assert.deepEqual(connected, { transport, state: 'connected', binary: 'protobuf' });

      const doc = (i) => ({ i, rows: Array.from({ length: 30 }, (_, k) => `row ${k} of a stable document`) });
      for (let i = 0; i < 4; i++) await publish(herald, ch, doc(i));
      await page.waitForFunction(() => window.received.length >= 4, null, { timeout: 5000 });
      await page.evaluate(() =>
        window.sub.publish(new TextEncoder().encode(JSON.stringify({ from: 'page' }))),
      );
      await page.waitForFunction(() => window.received.length >= 5, null, { timeout: 5000 });
      const received = await page.evaluate(() => window.received);
      assert.deepEqual(received, [doc(0), doc(1), doc(2), doc(3), { from: 'page' }]);
      const stats = await page.evaluate(() => window.sub.deltaStats());
      assert.ok(stats.numDeltaPayloads >= 3, JSON.stringify(stats));
      await page.evaluate(() => window.client.disconnect());
      assert.deepEqual(errors, []);
    });
  }
});
