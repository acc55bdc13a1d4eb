"""The proxy with centrifuge-python: a backend (aiohttp, in this file) authenticates the
connection by its cookie (no token) and answers `rpc`, in JSON and in Protobuf mode."""

from __future__ import annotations

import json
import time

import pytest
from aiohttp import web

from centrifuge import ClientState, ReplyError


def _cookie_user(request: web.Request) -> str | None:
    return request.cookies.get("session")


async def _connect(request: web.Request) -> web.Response:
    user = _cookie_user(request)
    if not user:
        return web.json_response({"error": {"code": 1000, "message": "no session"}})
    body = await request.json()
    return web.json_response(
        {"result": {"user": user, "data": {"hello": user, "protocol": body["protocol"]}}}
    )


async def _rpc(request: web.Request) -> web.Response:
    body = await request.json()
    if body["method"] == "whoami":
        return web.json_response({"result": {"data": {"user": body["user"], "params": body.get("data")}}})
    if body["method"] == "time":
        return web.json_response({"result": {"data": {"unix": int(time.time())}}})
    return web.json_response({"error": {"code": 1404, "message": "no such method"}})


@pytest.fixture
async def backend():
    app = web.Application()
    app.router.add_post("/connect", _connect)
    app.router.add_post("/rpc", _rpc)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _proxy_toml(base: str) -> str:
    return f"""[client.proxy.connect]
enabled = true
endpoint = "{base}/connect"
http_headers = ["Cookie"]

[rpc.proxy]
enabled = true
endpoint = "{base}/rpc"
"""


@pytest.mark.parametrize("use_protobuf", [False, True], ids=["json", "protobuf"])
async def test_cookie_connect_and_rpc_through_the_backend(start_server, clients, backend, use_protobuf):
    server = await start_server(extra_toml=_proxy_toml(backend))
    client = clients.new(
        server.ws_url, headers={"Cookie": "session=py-alice"}, use_protobuf=use_protobuf
    )
    await client.connect()
    ctx = await client.rec.wait_for("connected")
    data = json.loads(ctx.data) if use_protobuf else ctx.data
    assert data == {"hello": "py-alice", "protocol": "protobuf" if use_protobuf else "json"}

    params = {"q": [1, 2]}
    payload = json.dumps(params).encode() if use_protobuf else params
    result = await client.rpc("whoami", payload)
    got = json.loads(result.data) if use_protobuf else result.data
    assert got == {"user": "py-alice", "params": params}

    with pytest.raises(ReplyError) as err:
        await client.rpc("missing", payload)
    assert err.value.code == 1404
    assert client.state == ClientState.CONNECTED


async def test_without_a_cookie_the_backend_refuses(start_server, clients, backend):
    server = await start_server(extra_toml=_proxy_toml(backend))
    client = clients.new(server.ws_url)
    await client.connect()
    ctx = await client.rec.wait_for("disconnected", timeout=5.0)
    assert ctx.code != 0
    assert client.state != ClientState.CONNECTED
