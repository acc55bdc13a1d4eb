"""centrifuge-python in Protobuf mode (`use_protobuf=True`): the subprotocol
`centrifuge-protobuf`, binary frames, data as bytes. The scenarios of the JSON tests:
connect, subscribe, publish from the client and with cent, history, presence, recovery
after a cut connection, token refresh; plus the personal channel, a forged subscription
token (103, the connection stays) and fossil delta."""

from __future__ import annotations

import json
import time

import pytest
from cent import AsyncClient, PublishRequest

from centrifuge import ClientState, DeltaType, ReplyError

from conftest import (
    API_KEY,
    DEFAULT_NAMESPACES,
    eventually,
    jwt_payload,
    mint_token,
    new_sub,
    subscribed,
    uid,
)


async def _proto(clients, url, user):
    return await clients.connected(url, user=user, use_protobuf=True)


async def test_api_publications_arrive_as_json_bytes(server, clients, api):
    client = await _proto(clients, server.ws_url, "pb-alice")
    ch = uid("pb")
    sub = await subscribed(client, ch)
    for i in range(10):
        await api.publish(PublishRequest(channel=ch, data={"n": i}))
    got = await sub.rec.wait_count("publication", 10)
    assert all(isinstance(c.pub.data, bytes) for c in got)
    assert [json.loads(c.pub.data)["n"] for c in got] == list(range(10))
    offsets = [c.pub.offset for c in got]
    assert offsets == list(range(offsets[0], offsets[0] + 10))


async def test_client_publish_of_bytes_history_and_presence(server, clients):
    ch = uid("pbbin")
    a = await _proto(clients, server.ws_url, "pb-a")
    b = await _proto(clients, server.ws_url, "pb-b")
    sub_a = await subscribed(a, ch)
    sub_b = await subscribed(b, ch)
    payload = bytes([0, 159, 146, 150, 255, 10, 123])
    await sub_a.publish(payload)
    ctx = await sub_b.rec.wait_for("publication")
    assert ctx.pub.data == payload
    assert ctx.pub.info is not None and ctx.pub.info.user == "pb-a"

    history = await sub_b.history(limit=-1)
    assert [p.data for p in history.publications] == [payload]

    presence = await sub_a.presence()
    assert sorted(c.user for c in presence.clients.values()) == ["pb-a", "pb-b"]
    stats = await sub_a.presence_stats()
    assert stats.num_clients == 2


async def test_json_and_protobuf_clients_share_a_channel(server, clients, api):
    ch = uid("mixed")
    pb = await _proto(clients, server.ws_url, "pb-mix")
    js = await clients.connected(server.ws_url, user="js-mix")
    sub_pb = await subscribed(pb, ch)
    sub_js = await subscribed(js, ch)
    for i in range(10):
        await api.publish(PublishRequest(channel=ch, data={"i": i}))
    await sub_pb.publish(json.dumps({"i": 10}).encode())
    pb_pubs = await sub_pb.rec.wait_count("publication", 11)
    js_pubs = await sub_js.rec.wait_count("publication", 11)
    assert [json.loads(c.pub.data)["i"] for c in pb_pubs] == list(range(11))
    assert [c.pub.data["i"] for c in js_pubs] == list(range(11))


async def test_missed_publications_are_recovered(server, api, clients, proxies):
    ch = uid("pbrec")
    proxy = await proxies(server.port)
    client = await _proto(clients, proxy.ws_url, "pb-rec")
    sub = new_sub(client, ch)
    await sub.subscribe()
    first = await sub.rec.wait_for("subscribed")
    for i in range(3):
        await api.publish(PublishRequest(channel=ch, data={"seq": i}))
    await sub.rec.wait_count("publication", 3)
    mark = sub.rec.mark()
    proxy.cut()
    await sub.rec.wait_for("subscribing", after=mark)
    for i in range(3, 8):
        await api.publish(PublishRequest(channel=ch, data={"seq": i}))
    proxy.restore()
    again = await sub.rec.wait_for("subscribed", after=mark, timeout=8)
    assert again.was_recovering is True and again.recovered is True, again
    assert again.stream_position.epoch == first.stream_position.epoch
    pubs = [c.pub for c in await sub.rec.wait_count("publication", 8)]
    assert [json.loads(p.data)["seq"] for p in pubs] == list(range(8))


async def test_token_refresh_keeps_the_connection(server, clients):
    exps = []

    async def get_token():
        token = mint_token(sub="pb-refresh", ttl=2)
        exps.append(jwt_payload(token)["exp"])
        return token

    client = clients.new(server.ws_url, get_token=get_token, use_protobuf=True)
    await client.connect()
    await client.rec.wait_for("connected")
    async def refreshed():
        return len(exps) >= 3 and time.time() > exps[0] + 2

    await eventually(
        refreshed,
        what="three tokens and 2 s past the first expiry",
        timeout=15,
    )
    assert client.state == ClientState.CONNECTED
    assert client.rec.count("disconnected") == 0, client.rec.summary()


async def test_permission_errors_keep_their_codes(server, clients):
    client = await _proto(clients, server.ws_url, "pb-denied")
    with pytest.raises(ReplyError) as err:
        await client.publish(uid("nosub"), b"x")
    assert err.value.code == 103



async def test_personal_channel_is_subscribed_at_connect(start_server, clients):
    server = await start_server(client={"subscribe_to_user_personal_channel": {"enabled": True}})
    client = await _proto(clients, server.ws_url, "pb-me")
    sub = await client.rec.wait_for("subscribed", lambda c: c.channel == "#pb-me")
    assert sub.channel == "#pb-me"
    async with AsyncClient(server.api_url, api_key=API_KEY) as api:
        await api.publish(PublishRequest(channel="#pb-me", data={"to": "me"}))
    ctx = await client.rec.wait_for("publication", lambda c: c.channel == "#pb-me")
    assert json.loads(ctx.pub.data) == {"to": "me"}


async def test_forged_subscription_token_gets_103_and_the_connection_stays(server, clients, api):
    client = await _proto(clients, server.ws_url, "pb-forger")
    sub = new_sub(client, "$" + uid("secret"), token="forged.token.value")
    await sub.subscribe()
    gone = await sub.rec.wait_for("unsubscribed")
    assert gone.code == 103, gone
    assert client.state == ClientState.CONNECTED
    ch = uid("after")
    ok = await subscribed(client, ch)
    await api.publish(PublishRequest(channel=ch, data={"still": True}))
    ctx = await ok.rec.wait_for("publication")
    assert json.loads(ctx.pub.data) == {"still": True}


def _doc(i: int) -> dict:
    items = [{"id": k, "name": f"instrument-{k:03}", "venue": "XPAR"} for k in range(24)]
    return {"seq": i, "price": 100 + 7 * i, "items": items}


@pytest.mark.parametrize("use_protobuf", [False, True], ids=["json", "protobuf"])
async def test_fossil_delta_rebuilds_every_publication(start_server, clients, use_protobuf):
    delta_ns = {
        "name": "delta",
        "history_size": 100,
        "history_ttl": "5m",
        "force_recovery": True,
        "allow_subscribe_for_client": True,
        "allowed_delta_types": ["fossil"],
    }
    server = await start_server(namespaces=DEFAULT_NAMESPACES + [delta_ns])
    client = await clients.connected(server.ws_url, user="delta", use_protobuf=use_protobuf)
    sub = await subscribed(client, uid("delta:doc"), delta=DeltaType.FOSSIL)
    assert sub._delta_negotiated
    async with AsyncClient(server.api_url, api_key=API_KEY) as api:
        for i in range(8):
            await api.publish(PublishRequest(channel=sub.channel, data=_doc(i)))
    got = await sub.rec.wait_count("publication", 8)
    decoded = [c.pub.data if not use_protobuf else json.loads(c.pub.data) for c in got]
    assert decoded == [_doc(i) for i in range(8)]
    # The first whole, the others patches.
    assert [c.pub.delta for c in got] == [False] + [True] * 7
