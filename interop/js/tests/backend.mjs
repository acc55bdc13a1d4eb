// A small application backend for the proxy tests: the endpoints a Centrifugo backend
// implements (connect, refresh, subscribe, publish, sub_refresh, rpc), over plain Node http.
// Users are told apart by a `session=<user>` cookie; each request is recorded.

import http from 'node:http';

function cookieUser(req) {
  const cookie = req.headers.cookie || '';
  for (const part of cookie.split(';')) {
    const [k, v] = part.trim().split('=');
    if (k === 'session' && v) return v;
  }
  return null;
}

const now = () => Math.floor(Date.now() / 1000);

const handlers = {
  connect(req, body) {
    const user = cookieUser(req);
    if (!user) return { error: { code: 1000, message: 'no session' } };
    if (user === 'kick') return { disconnect: { code: 4501, reason: 'kicked' } };
    if (user.startsWith('expiring')) return { result: { user, expire_at: now() + 1 } };
    return {
      result: {
        user,
        info: { name: user },
        data: { greeting: `hi ${user}`, via: body.transport },
        channels: [`#${user}`],
      },
    };
  },
  refresh() {
    return { result: { expire_at: now() + 600 } };
  },
  subscribe(req, body) {
    if (body.channel.startsWith('px:secret')) return { error: { code: 103, message: 'permission denied' } };
    return { result: { info: { role: 'member' }, data: { welcome: body.user } } };
  },
  publish(req, body) {
    return { result: { data: { rewritten: body.data, by: body.user } } };
  },
  sub_refresh() {
    return { result: { expire_at: now() + 600 } };
  },
  async rpc(req, body) {
    switch (body.method) {
      case 'whoami':
        return { result: { data: { user: body.user, params: body.data } } };
      case 'fail':
        return { error: { code: 1002, message: 'nope' } };
      case 'slow':
        await new Promise((r) => setTimeout(r, 2000));
        return { result: {} };
      case 'garbage':
        return '<html>oops</html>';
      default:
        return { error: { code: 104, message: 'unknown method' } };
    }
  },
};

/** Starts the backend on a free port: `{url, calls(path), close()}`. */
export async function startBackend() {
  const calls = [];
  const server = http.createServer((req, res) => {
    let raw = '';
    req.setEncoding('utf8');
    req.on('data', (d) => {
      raw += d;
    });
    req.on('end', async () => {
      const name = req.url.replace(/^\//, '');
      let body = {};
      try {
        body = JSON.parse(raw || '{}');
      } catch {
        res.writeHead(400).end();
        return;
      }
      calls.push({ path: req.url, headers: req.headers, body });
      const h = handlers[name];
      if (!h) {
        res.writeHead(404).end();
        return;
      }
      const answer = await h(req, body);
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end(typeof answer === 'string' ? answer : JSON.stringify(answer));
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    calls: (path) => calls.filter((c) => c.path === path),
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** The proxy sections of a Herald config pointing at `base`. */
export function proxyToml(base) {
  return `[client.proxy.connect]
enabled = true
endpoint = "${base}/connect"
timeout = "1s"
http_headers = ["Cookie"]

[client.proxy.refresh]
enabled = true
endpoint = "${base}/refresh"

[channel.proxy.subscribe]
enabled = true
endpoint = "${base}/subscribe"

[channel.proxy.publish]
enabled = true
endpoint = "${base}/publish"

[channel.proxy.sub_refresh]
enabled = true
endpoint = "${base}/sub_refresh"

[rpc.proxy]
enabled = true
endpoint = "${base}/rpc"
timeout = "500ms"
`;
}

/** Namespace `px`: subscribe and publish decided by the backend. */
export const PROXY_NAMESPACE = {
  name: 'px',
  history_size: 10,
  history_ttl: '1m',
  force_recovery: true,
  subscribe_proxy_enabled: true,
  publish_proxy_enabled: true,
  sub_refresh_proxy_enabled: true,
};
