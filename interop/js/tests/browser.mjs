// Headless Chromium for the browser tests: where the binary is, how it is started, and a
// small page server that serves centrifuge-js's bundles and forwards /connection/* and
// /emulation to Herald, so comet transports reach Herald on the page's own origin (as behind
// a reverse proxy). Chromium comes from Debian (`apt-get install chromium`, done by .ci/run);
// set CHROMIUM_PATH to use another binary. Without it the tests fail and say so.

import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const DIST = path.resolve(here, '..', 'node_modules', 'centrifuge', 'dist');
const BUNDLES = { json: 'centrifuge.js', protobuf: 'centrifuge.protobuf.js' };
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

const page = (bundle) => `<!doctype html>
<html><head><meta charset="utf-8"><title>herald comet</title>
<script src="/${bundle}"></script></head>
<body><pre id="log"></pre></body></html>`;

/** Serves the page and the bundle; forwards everything else to Herald, streaming. */
export async function startPageServer(heraldPort) {
  const files = Object.fromEntries(
    Object.values(BUNDLES).map((name) => [`/${name}`, fs.readFileSync(path.join(DIST, name))]),
  );
  const server = http.createServer((req, res) => {
    const codec = { '/': 'json', '/index.html': 'json', '/protobuf.html': 'protobuf' }[req.url];
    if (codec) {
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
      res.end(page(BUNDLES[codec]));
      return;
    }
    if (files[req.url]) {
      res.writeHead(200, { 'Content-Type': 'text/javascript' });
      res.end(files[req.url]);
      return;
    }
    const upstream = http.request(
      { host: '127.0.0.1', port: heraldPort, method: req.method, path: req.url, headers: req.headers },
      (ures) => {
        res.writeHead(ures.statusCode, ures.headers);
        res.flushHeaders();
        ures.pipe(res);
      },
    );
    upstream.on('error', () => res.destroy());
    res.on('close', () => upstream.destroy());
    req.pipe(upstream);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

export function chromiumPath() {
  try {
    fs.accessSync(CHROMIUM, fs.constants.X_OK);
  } catch {
    throw new Error(
      `Chromium not found at ${CHROMIUM}: install it with ` +
        '`apt-get update && apt-get install -y --no-install-recommends chromium` ' +
        '(.ci/run does) or set CHROMIUM_PATH',
    );
  }
  return CHROMIUM;
}

