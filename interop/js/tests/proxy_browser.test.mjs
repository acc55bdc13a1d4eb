// Cookie authentication in a real browser (headless Chromium): the page sets its session
// cookie and connects with no token; the backend (backend.mjs) reads the cookie through the
// connect proxy. A page on a foreign origin, whose WebSocket to Herald would carry the same
// cookie, is refused: with cookie authentication and no `allowed_origins`, Herald accepts
// only its own origin (cross-site WebSocket hijacking).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { chromium } from 'playwright-core';

import { PROXY_NAMESPACE, proxyToml, startBackend } from './backend.mjs';
import { CHROMIUM_ARGS, chromiumPath, startPageServer } from './browser.mjs';
import { DEFAULT_NAMESPACES, publish, startServer } from './harness.mjs';

/** In the page: sets the cookie, connects with `transports`, resolves how it ended. */
function connectInPage(page, { user, transports }) {
  return page.evaluate(
    ({ user, transports }) =>
      new Promise((resolve) => {
        document.cookie = `session=${user}; path=/`;
        const c = new window.Centrifuge(transports, {
          emulationEndpoint: '/emulation',
          minReconnectDelay: 50,
          maxReconnectDelay: 300,
        });
        window.client = c;
        window.received = [];
        const done = setTimeout(() => resolve({ state: c.state }), 4000);
        c.on('publication', (ctx) => window.received.push(ctx.data));
        c.on('connected', (ctx) => {
          clearTimeout(done);
          resolve({ state: 'connected', data: ctx.data, transport: ctx.transport });
        });
        c.connect();
      }),
    { user, transports },
  );
}

describe('browser: cookie authentication through the connect proxy', () => {
  let backend;
  let herald;
  let own;
  let foreign;
  let browser;
  before(async () => {
    const executablePath = chromiumPath();
    backend = await startBackend();
    herald = await startServer({
      namespaces: [...DEFAULT_NAMESPACES, PROXY_NAMESPACE],
      extraToml: proxyToml(backend.url),
    });
    own = await startPageServer(herald.port);
    foreign = await startPageServer(herald.port);
    browser = await chromium.launch({ executablePath, args: CHROMIUM_ARGS, timeout: 30000 });
  });
  after(async () => {
    await browser?.close();
    await own?.close();
    await foreign?.close();
    await herald?.stop();
    herald?.cleanup();
    await backend?.close();
  });

  test('a page on the server origin connects with its cookie and no token', async (t) => {
    const page = await browser.newPage();
    t.after(() => page.close());
    await page.goto(`${own.url}/`, { timeout: 10000 });
    const r = await connectInPage(page, {
      user: 'browser-bob',
      transports: [{ transport: 'http_stream', endpoint: '/connection/http_stream' }],
    });
    assert.deepEqual(r, {
      state: 'connected',
      data: { greeting: 'hi browser-bob', via: 'http_stream' },
      transport: 'http_stream',
    });
    assert.match(backend.calls('/connect').at(-1).headers.cookie, /session=browser-bob/);
    await publish(herald, '#browser-bob', { personal: true });
    await page.waitForFunction(() => window.received.length >= 1, null, { timeout: 5000 });
    assert.deepEqual(await page.evaluate(() => window.received), [{ personal: true }]);
    await page.evaluate(() => window.client.disconnect());
  });

  test('a page on a foreign origin cannot open a cookie-authenticated WebSocket', async (t) => {
    const page = await browser.newPage();
    t.after(() => page.close());
    await page.goto(`${foreign.url}/`, { timeout: 10000 });
    const before = backend.calls('/connect').length;
    const r = await connectInPage(page, {
      user: 'victim',
      transports: [{ transport: 'websocket', endpoint: `ws://127.0.0.1:${herald.port}/connection/websocket` }],
    });
    assert.notEqual(r.state, 'connected');
    // Refused at the upgrade (403): the backend never saw the victim's cookie.
    assert.equal(backend.calls('/connect').length, before);
    await page.evaluate(() => window.client.disconnect());
  });
});
