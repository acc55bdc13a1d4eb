"""Harness for the centrifuge-python and cent interop tests.

Every test gets its own Herald node(s), each with its own config in a temporary directory,
stopped (SIGTERM, then SIGKILL) when the test ends. Events of the SDK are recorded so that a
test waits for them with a timeout, never with a sleep. A small asyncio TCP proxy can cut a
client off, refuse it while publications are made, and point it at another node.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import pathlib
import re
import secrets
import signal
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import pytest
from cent import AsyncClient

from centrifuge import (
    Client,
    ClientEventHandler,
    SubscriptionEventHandler,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Every node under test listens on loopback: never send that traffic to a configured proxy
# (requests, used by cent's sync client, honours the proxy variables).
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(x for x in (os.environ.get(_var, ""), "127.0.0.1,localhost") if x)

SECRET = "secret"
API_KEY = "apikey"
LISTEN_RE = re.compile(r"^herald: listening on http://127\.0\.0\.1:(\d+)$")


def herald_bin() -> str:
    path = os.environ.get("HERALD_BIN") or str(REPO_ROOT / "target" / "debug" / "herald")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(
            f"herald binary not found or not executable at {path}: "
            "build it with `cargo build --workspace` or set HERALD_BIN",
            pytrace=False,
        )
    return path


def uid(prefix: str = "ch") -> str:
    """A random suffix so that channels and users never collide between tests."""
    return f"{prefix}-{secrets.token_hex(5)}"


# ---------------------------------------------------------------------------------------------
# Config

DEFAULT_NAMESPACES: List[Dict[str, Any]] = [
    {
        "name": "",
        "history_size": 100,
        "history_ttl": "5m",
        "force_recovery": True,
        "allow_subscribe_for_client": True,
        "allow_publish_for_subscriber": True,
        "allow_publish_for_client": False,
        "allow_history_for_subscriber": True,
        "allow_presence_for_subscriber": True,
        "presence": True,
        "join_leave": True,
    },
    {
        "name": "news",
        "allow_subscribe_for_client": True,
        "history_size": 10,
        "history_ttl": "1m",
        "force_recovery": True,
    },
]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot render {type(v)} as TOML")


def _toml_table(header: str, values: Dict[str, Any]) -> str:
    lines = [header] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines)


def render_config(
    listen: str = "127.0.0.1:0",
    client: Optional[Dict[str, Any]] = None,
    namespaces: Optional[List[Dict[str, Any]]] = None,
    extra_toml: str = "",
) -> str:
    client_section = {
        "token_hmac_secret": SECRET,
        "allow_anonymous": False,
        "ping_interval": "25s",
        "pong_timeout": "8s",
        "max_queue_bytes": 1048576,
        "max_message_size": 65536,
        "max_channels": 128,
    }
    client_section.update(client or {})
    # Dict values are sub-tables (`[client.<key>]`), written after the plain keys.
    subtables = {k: v for k, v in client_section.items() if isinstance(v, dict)}
    plain = {k: v for k, v in client_section.items() if not isinstance(v, dict)}
    sections = [
        _toml_table("[server]", {"listen": listen}),
        _toml_table("[client]", plain),
        *[_toml_table(f"[client.{k}]", v) for k, v in subtables.items()],
        _toml_table("[api]", {"key": API_KEY}),
        _toml_table("[engine]", {"type": "memory"}),
        # No drain window: a stopped test node lets its clients go at once.
        _toml_table("[shutdown]", {"drain_duration": "0s"}),
    ]
    sections += [_toml_table("[[namespaces]]", ns) for ns in (namespaces or DEFAULT_NAMESPACES)]
    # Tables without a shorthand here (`[rpc.proxy]`, …), as TOML text.
    if extra_toml:
        sections.append(extra_toml)
    return "\n\n".join(sections) + "\n"


# ---------------------------------------------------------------------------------------------
# Server process


class HeraldServer:
    def __init__(self, directory: pathlib.Path, **options: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.config_path = directory / "herald.toml"
        self.config_path.write_text(render_config(**options))
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.port = 0
        self.stdout: List[str] = []
        self.stderr = bytearray()
        self._tasks: List[asyncio.Task] = []

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.http_url}/api"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.stderr.decode("utf-8", "replace").splitlines()[-n:])

    async def _drain_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        while True:
            chunk = await self.proc.stderr.read(65536)
            if not chunk:
                return
            self.stderr += chunk
            if len(self.stderr) > 200_000:
                del self.stderr[:100_000]

    async def _drain_stdout(self) -> None:
        assert self.proc and self.proc.stdout
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                return
            self.stdout.append(line.decode("utf-8", "replace").rstrip("\n"))

    async def start(self, timeout: float = 10.0) -> "HeraldServer":
        binary = herald_bin()
        self.proc = await asyncio.create_subprocess_exec(
            binary,
            "serve",
            "--config",
            str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._tasks.append(asyncio.create_task(self._drain_stderr()))

        async def wait_listening() -> int:
            assert self.proc and self.proc.stdout
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    rc = await self.proc.wait()
                    raise AssertionError(
                        f"herald exited with {rc} before listening\n"
                        f"config:\n{self.config_path.read_text()}\nstderr:\n{self.log_tail()}"
                    )
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.stdout.append(line)
                m = LISTEN_RE.match(line.strip())
                if m:
                    return int(m.group(1))

        try:
            self.port = await asyncio.wait_for(wait_listening(), timeout)
        except asyncio.TimeoutError:
            await self.kill()
            raise AssertionError(
                f'herald did not print "herald: listening on http://127.0.0.1:PORT" '
                f"within {timeout} s\nstdout: {self.stdout}\nstderr:\n{self.log_tail()}"
            ) from None
        self._tasks.append(asyncio.create_task(self._drain_stdout()))
        return self

    async def stop(self, timeout: float = 5.0) -> Optional[int]:
        """SIGTERM, wait for exit (SIGKILL after `timeout`); returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                await self.kill()
        await self._finish_tasks()
        return self.proc.returncode

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            await self.proc.wait()
        await self._finish_tasks()

    async def _finish_tasks(self) -> None:
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, 2)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                task.cancel()
        self._tasks = []


@pytest.fixture
async def start_server(tmp_path: pathlib.Path) -> Any:
    """Factory: `await start_server(client={...}, namespaces=[...])` starts a node."""
    servers: List[HeraldServer] = []

    async def start(**options: Any) -> HeraldServer:
        server = HeraldServer(tmp_path / f"node{len(servers)}", **options)
        servers.append(server)
        return await server.start()

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(start_server: Any) -> HeraldServer:
    return await start_server()


@pytest.fixture
async def api(server: HeraldServer) -> Any:
    client = AsyncClient(server.api_url, api_key=API_KEY, timeout=5)
    yield client
    await client.close()


# ---------------------------------------------------------------------------------------------
# Tokens


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_token(
    sub: str = "user",
    ttl: int = 3600,
    exp: Optional[int] = None,
    iat: Optional[int] = None,
    secret: str = SECRET,
    **claims: Any,
) -> str:
    """An HS256 connection JWT, as a backend would mint it."""
    now = int(time.time())
    payload = {"sub": sub, "iat": now if iat is None else iat, "exp": now + ttl if exp is None else exp}
    payload.update(claims)
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(payload, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(sig)}"


def jwt_payload(token: str) -> Dict[str, Any]:
    parts = token.split(".")
    assert len(parts) == 3, f"not a JWT: {token!r}"
    pad = "=" * (-len(parts[1]) % 4)
    return json.loads(base64.urlsafe_b64decode(parts[1] + pad))


async def cli_token(
    server: HeraldServer, user: str, ttl: Optional[str] = None, channels: Optional[List[str]] = None
) -> str:
    """A token printed by `herald token --config FILE --user U [--ttl T] [--channels a,b]`."""
    args = ["token", "--config", str(server.config_path), "--user", user]
    if ttl:
        args += ["--ttl", ttl]
    if channels:
        args += ["--channels", ",".join(channels)]
    proc = await asyncio.create_subprocess_exec(
        herald_bin(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, f"herald {' '.join(args)} exited {proc.returncode}: {err.decode()}"
    token = out.decode().strip()
    assert "\n" not in token and token.count(".") == 2, f"not one JWT on stdout: {out!r}"
    return token


# ---------------------------------------------------------------------------------------------
# Waiting for events


class Recorder:
    """Keeps every event it is given; tests wait for the ones they expect, with a timeout."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.entries: List[Tuple[str, Any]] = []
        self._changed = asyncio.Event()

    def push(self, kind: str, ctx: Any) -> None:
        self.entries.append((kind, ctx))
        self._changed.set()

    def mark(self) -> int:
        return len(self.entries)

    def all(self, kind: str, after: int = 0) -> List[Any]:
        return [ctx for i, (k, ctx) in enumerate(self.entries) if k == kind and i >= after]

    def count(self, kind: str, after: int = 0) -> int:
        return len(self.all(kind, after))

    def summary(self) -> str:
        lines = [f"  #{i} {k} {ctx!r}"[:400] for i, (k, ctx) in enumerate(self.entries)]
        return "\n".join(lines[-40:])

    async def wait_until(self, probe: Callable[[], Any], what: str, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = probe()
            if value is not None:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what} on {self.label}; "
                    f"recorded:\n{self.summary()}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def wait_for(
        self,
        kind: str,
        pred: Callable[[Any], bool] = lambda _: True,
        timeout: float = 5.0,
        after: int = 0,
    ) -> Any:
        def probe() -> Any:
            for i, (k, ctx) in enumerate(self.entries):
                if i >= after and k == kind and pred(ctx):
                    return ctx
            return None

        return await self.wait_until(probe, kind, timeout)

    async def wait_count(self, kind: str, n: int, timeout: float = 5.0, after: int = 0) -> List[Any]:
        def probe() -> Any:
            found = self.all(kind, after)
            return found if len(found) >= n else None

        return await self.wait_until(probe, f"{n} x {kind}", timeout)


class ClientEvents(ClientEventHandler):
    def __init__(self, label: str) -> None:
        self.rec = Recorder(label)

    async def on_connecting(self, ctx: Any) -> None:
        self.rec.push("connecting", ctx)

    async def on_connected(self, ctx: Any) -> None:
        self.rec.push("connected", ctx)

    async def on_disconnected(self, ctx: Any) -> None:
        self.rec.push("disconnected", ctx)

    async def on_error(self, ctx: Any) -> None:
        self.rec.push("error", ctx)

    async def on_subscribed(self, ctx: Any) -> None:
        self.rec.push("subscribed", ctx)

    async def on_subscribing(self, ctx: Any) -> None:
        self.rec.push("subscribing", ctx)

    async def on_unsubscribed(self, ctx: Any) -> None:
        self.rec.push("unsubscribed", ctx)

    async def on_publication(self, ctx: Any) -> None:
        self.rec.push("publication", ctx)

    async def on_join(self, ctx: Any) -> None:
        self.rec.push("join", ctx)

    async def on_leave(self, ctx: Any) -> None:
        self.rec.push("leave", ctx)


class SubEvents(SubscriptionEventHandler):
    def __init__(self, label: str) -> None:
        self.rec = Recorder(label)

    async def on_subscribing(self, ctx: Any) -> None:
        self.rec.push("subscribing", ctx)

    async def on_subscribed(self, ctx: Any) -> None:
        self.rec.push("subscribed", ctx)

    async def on_unsubscribed(self, ctx: Any) -> None:
        self.rec.push("unsubscribed", ctx)

    async def on_publication(self, ctx: Any) -> None:
        self.rec.push("publication", ctx)

    async def on_join(self, ctx: Any) -> None:
        self.rec.push("join", ctx)

    async def on_leave(self, ctx: Any) -> None:
        self.rec.push("leave", ctx)

    async def on_error(self, ctx: Any) -> None:
        self.rec.push("error", ctx)


async def eventually(
    probe: Callable[[], Awaitable[Any]], timeout: float = 5.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Polls an async probe until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        try:
            last = await probe()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - kept for the failure message
            last = e
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Clients


class Clients:
    """Creates centrifuge-python clients with recorders and disconnects them at teardown."""

    def __init__(self) -> None:
        self.created: List[Client] = []

    def new(self, url: str, *, token: str = "", get_token: Any = None, **kwargs: Any) -> Client:
        events = ClientEvents(f"client {url}")
        options: Dict[str, Any] = {
            "min_reconnect_delay": 0.05,
            "max_reconnect_delay": 0.3,
            "timeout": 4.0,
            "proxy": None,
        }
        options.update(kwargs)
        client = Client(url, events=events, token=token, get_token=get_token, **options)
        client.rec = events.rec  # type: ignore[attr-defined]
        self.created.append(client)
        return client

    async def connected(self, url: str, user: str = "user", **kwargs: Any) -> Client:
        if "token" not in kwargs and "get_token" not in kwargs:
            kwargs["token"] = mint_token(sub=user)
        client = self.new(url, **kwargs)
        await client.connect()
        await client.rec.wait_for("connected")
        return client

    async def close(self) -> None:
        for client in self.created:
            try:
                await asyncio.wait_for(client.disconnect(), 5)
            except Exception:  # noqa: BLE001 - teardown goes on
                pass


@pytest.fixture
async def clients() -> Any:
    registry = Clients()
    yield registry
    await registry.close()


def new_sub(client: Client, channel: str, **kwargs: Any) -> Any:
    events = SubEvents(f"subscription {channel}")
    sub = client.new_subscription(channel, events=events, **kwargs)
    sub.rec = events.rec
    return sub


async def subscribed(client: Client, channel: str, **kwargs: Any) -> Any:
    sub = new_sub(client, channel, **kwargs)
    await sub.subscribe()
    await sub.rec.wait_for("subscribed")
    return sub


# ---------------------------------------------------------------------------------------------
# TCP proxy


class TcpProxy:
    """A proxy on 127.0.0.1: `cut()` drops every connection and refuses new ones until
    `restore()`; `set_upstream(port)` points it at another node."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refusing = False
        self.accepted = 0
        self.refused = 0
        self._pairs: set = set()
        self._server: Optional[asyncio.base_events.Server] = None
        self.port = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    async def start(self) -> "TcpProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        if self.refusing:
            up_writer.transport.abort()
            writer.transport.abort()
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                writer.transport.abort()
                up_writer.transport.abort()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._pairs.discard(pair)

    def cut(self) -> None:
        self.refusing = True
        for writer, up_writer in list(self._pairs):
            writer.transport.abort()
            up_writer.transport.abort()

    def restore(self) -> None:
        self.refusing = False

    def set_upstream(self, port: int) -> None:
        self.upstream_port = port

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxies() -> Any:
    """Factory: `await proxies(upstream_port)` starts a proxy, closed at teardown."""
    started: List[TcpProxy] = []

    async def start(upstream_port: int) -> TcpProxy:
        proxy = await TcpProxy(upstream_port).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.close()
