// The admin page in a real browser: headless Chromium (Debian's, driven by playwright-core)
// logs in, watches the connection count follow centrifuge-js clients, publishes from the form
// to a subscribed client, reads the channel's history, and drains the node.
//
// Chromium comes from Debian (`apt-get install chromium`, done by .ci/run); set CHROMIUM_PATH
// to use another binary. Without it the test fails and says so. The screenshot goes to
// <repo>/test-output/admin.png.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS, chromiumPath } from './browser.mjs';
import { REPO_ROOT, connectedClient, startServer, subscribed, uid, within } from './harness.mjs';

const PASSWORD = 'admin-page-password';

/** Waits until the element's text is exactly `text`; the message shows what it was. */
async function textBecomes(page, selector, text, timeout = 8000) {
  try {
    await page.waitForFunction(
      ([sel, want]) => document.querySelector(sel)?.textContent.trim() === want,
      [selector, String(text)],
      { timeout },
    );
  } catch (e) {
    const got = await page.textContent(selector).catch(() => '(none)');
    throw new Error(`${selector} never showed ${JSON.stringify(String(text))} (last: ${JSON.stringify(got)}): ${e.message}`);
  }
}

describe('admin page in Chromium', () => {
  let herald;
  let browser;
  before(async () => {
    const executablePath = chromiumPath();
    herald = await startServer({
      admin: { password: PASSWORD },
      // Two clients left at drain time: one goes at once, the other 1.5 s later.
      shutdown: { drain_duration: '3s' },
    });
    browser = await chromium.launch({ executablePath, args: CHROMIUM_ARGS, timeout: 30000 });
  });
  after(async () => {
    await browser?.close();
    await herald?.stop();
    herald?.cleanup();
  });

  test('log in, live connection count, publish and history from the forms, drain', async (t) => {
    const page = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
    t.after(() => page.close());
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    page.on('console', (m) => {
      if (m.type() === 'error') errors.push(m.text());
    });
    await page.goto(`${herald.httpUrl}/admin/`, { timeout: 10000 });

    // A wrong password is refused; the right one opens the dashboard.
    await page.fill('#password', 'not-the-password');
    await page.click('#login-button');
    await page.waitForFunction(() => document.querySelector('#login-error').textContent.includes('Wrong'));
    assert.equal(await page.isVisible('#dashboard'), false);
    await page.fill('#password', PASSWORD);
    await page.click('#login-button');
    await page.waitForSelector('#dashboard', { state: 'visible', timeout: 5000 });
    await textBecomes(page, '#stat-clients', 0);
    await textBecomes(page, '#stat-nodes', 1);

    // Clients connect: the count follows without a reload.
    const ch = uid('admin');
    const clients = [];
    for (let i = 0; i < 3; i++) {
      clients.push(await connectedClient(t, herald.wsUrl, { user: `watcher-${i}` }));
    }
    const sub = await subscribed(clients[0], ch);
    await textBecomes(page, '#stat-clients', 3);
    await textBecomes(page, '#stat-subscriptions', 1);
    await page.waitForFunction(
      (name) => [...document.querySelectorAll('#top-channels td')].some((td) => td.textContent === name),
      ch,
      { timeout: 5000 },
    );

    // Publish from the form: the subscribed client receives it.
    await page.fill('#publish-channel', ch);
    await page.fill('#publish-data', JSON.stringify({ text: 'from the admin page' }));
    await page.click('#publish-button');
    const pub = await sub.rec.waitFor('publication', () => true, { timeout: 5000 });
    assert.deepEqual(pub.data, { text: 'from the admin page' });
    await page.waitForFunction(() => document.querySelector('#publish-result').textContent.startsWith('Published'));
    // Messages/s in shows the publication on a following refresh.
    await page.waitForFunction(() => Number(document.querySelector('#stat-rate-in').textContent) > 0, null, {
      timeout: 5000,
    });

    // The channel's history, from the other form.
    await page.fill('#history-channel', ch);
    await page.fill('#history-limit', '5');
    await page.click('#history-button');
    await page.waitForFunction(
      () => document.querySelector('#history-result').textContent.includes('from the admin page'),
      null,
      { timeout: 5000 },
    );

    // One client leaves: the count goes down.
    clients[2].disconnect();
    await textBecomes(page, '#stat-clients', 2);

    fs.mkdirSync(path.join(REPO_ROOT, 'test-output'), { recursive: true });
    await page.screenshot({ path: path.join(REPO_ROOT, 'test-output', 'admin.png'), fullPage: true });

    // Drain from the page: readiness fails, clients are told 3001 over the window, the node
    // exits by itself.
    page.once('dialog', (d) => d.accept());
    const marks = clients.slice(0, 2).map((c) => c.rec.mark());
    await page.click('#drain-button');
    await textBecomes(page, '#status', 'draining', 5000);
    const ready = await fetch(`${herald.httpUrl}/ready`);
    assert.equal(ready.status, 503);
    for (const [i, c] of clients.slice(0, 2).entries()) {
      const ctx = await c.rec.waitFor('connecting', () => true, { after: marks[i], timeout: 8000 });
      assert.equal(ctx.code, 3001, `close code: ${JSON.stringify(ctx)}`);
    }
    const exit = await within(herald.exited, 15000, 'the drained node exiting');
    assert.deepEqual(exit, { code: 0, signal: null }, `exit status; stderr:\n${herald.logTail()}`);
    assert.deepEqual(errors.filter((e) => !/Failed to load resource|ERR_CONNECTION_REFUSED/.test(e)), []);
  });
});
