"""Connecting with centrifuge-python: JWT auth, anonymous access, the token CLI, token refresh."""

from __future__ import annotations

import time

from cent import AsyncClient, PresenceRequest, PublishRequest

from centrifuge import ClientState

from conftest import (
    API_KEY,
    DEFAULT_NAMESPACES,
    cli_token,
    eventually,
    jwt_payload,
    mint_token,
    new_sub,
    subscribed,
    uid,
)


async def test_connects_with_a_backend_minted_jwt(server, clients, api):
    client = clients.new(server.ws_url, token=mint_token(sub="alice"))
    await client.connect()
    ctx = await client.rec.wait_for("connected")
    assert ctx.client, "connect result carries a client id"
    assert client.state == ClientState.CONNECTED

    ch = uid("who")
    await subscribed(client, ch)
    presence = await api.presence(PresenceRequest(channel=ch))
    assert [(c.client, c.user) for c in presence.presence.values()] == [(ctx.client, "alice")]


async def test_anonymous_refused_when_not_allowed(server, clients):
    client = clients.new(server.ws_url)
    await client.connect()
    ctx = await client.rec.wait_for("disconnected")
    assert client.rec.count("connected") == 0, "never connected"
    # 101 unauthorized (error reply) or a 3500/3501 close: terminal, no reconnect loop.
    assert ctx.code in (101, 3500, 3501), f"terminal refusal code, got {ctx}"
    assert client.state == ClientState.DISCONNECTED


async def test_anonymous_allowed_by_config(start_server, clients):
    # As in Centrifugo, anonymous connections subscribe only where allow_subscribe_for_anonymous is on.
    namespaces = [dict(DEFAULT_NAMESPACES[0], allow_subscribe_for_anonymous=True), DEFAULT_NAMESPACES[1]]
    server = await start_server(client={"allow_anonymous": True}, namespaces=namespaces)
    client = clients.new(server.ws_url)
    await client.connect()
    await client.rec.wait_for("connected")
    ch = uid("anon")
    sub = await subscribed(client, ch)
    async with AsyncClient(server.api_url, api_key=API_KEY) as api:
        await api.publish(PublishRequest(channel=ch, data="hi"))
        presence = await api.presence(PresenceRequest(channel=ch))
    assert (await sub.rec.wait_for("publication")).pub.data == "hi"
    assert [c.user for c in presence.presence.values()] == [""], "anonymous user id is empty"

    # "news" allows clients but not anonymous ones.
    denied = new_sub(client, f"news:{uid('anon')}")
    await denied.subscribe()
    ctx = await denied.rec.wait_for("unsubscribed")
    assert ctx.code == 103, ctx


async def test_token_from_the_cli_with_server_side_channels(server, clients, api):
    ch = uid("srv")
    token = await cli_token(server, user="carol", ttl="30s", channels=[ch])
    claims = jwt_payload(token)
    assert claims["sub"] == "carol"
    assert 29 <= claims["exp"] - claims["iat"] <= 31, claims
    assert claims["channels"] == [ch]

    client = clients.new(server.ws_url, token=token)
    await client.connect()
    await client.rec.wait_for("connected")
    await client.rec.wait_for("subscribed", lambda c: c.channel == ch)
    res = await api.publish(PublishRequest(channel=ch, data={"hello": "carol"}))
    pub = await client.rec.wait_for("publication", lambda c: c.channel == ch)
    assert pub.pub.data == {"hello": "carol"}
    assert pub.pub.offset == res.offset


async def test_short_lived_token_is_refreshed(server, clients, api):
    exps = []

    async def get_token() -> str:
        token = mint_token(sub="refresher", ttl=2)
        exps.append(jwt_payload(token)["exp"])
        return token

    client = clients.new(server.ws_url, get_token=get_token)
    await client.connect()
    await client.rec.wait_for("connected")
    assert len(exps) == 1

    async def refreshed_past_first_expiry():
        return len(exps) >= 3 and time.time() > exps[0] + 2

    # Refreshed twice, and well past the first token's expiry.
    await eventually(
        refreshed_past_first_expiry,
        timeout=15,
        what="get_token called three times and 2 s past the first expiry",
    )
    assert client.state == ClientState.CONNECTED, client.rec.summary()
    assert client.rec.count("connecting") == 1, client.rec.summary()
    assert client.rec.count("disconnected") == 0, client.rec.summary()
    assert client.rec.count("error") == 0, client.rec.summary()

    ch = uid("alive")
    sub = await subscribed(client, ch)
    await api.publish(PublishRequest(channel=ch, data={"still": "here"}))
    pub = await sub.rec.wait_for("publication")
    assert pub.pub.data == {"still": "here"}


async def test_expired_token_at_connect_gets_a_new_one(server, clients):
    now = int(time.time())
    expired = mint_token(sub="late", iat=now - 120, exp=now - 60)
    calls = []

    async def get_token() -> str:
        calls.append(1)
        return mint_token(sub="late")

    client = clients.new(server.ws_url, token=expired, get_token=get_token)
    await client.connect()
    await client.rec.wait_for("connected", timeout=8)
    assert len(calls) == 1
    errors = client.rec.all("error")
    assert any(getattr(e.error, "code", None) == 109 for e in errors), client.rec.summary()
