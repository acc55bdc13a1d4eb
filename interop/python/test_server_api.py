"""The server HTTP API driven by cent, observed by centrifuge-python clients."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from cent import (
    AsyncClient,
    BatchRequest,
    BroadcastRequest,
    ChannelsRequest,
    Client as SyncClient,
    DisconnectRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceStatsRequest,
    PublishRequest,
    SubscribeRequest,
    UnsubscribeRequest,
)
from cent.exceptions import CentApiResponseError, CentUnauthorizedError

from centrifuge import ClientState

from conftest import API_KEY, eventually, subscribed, uid


async def test_publish_returns_offset_and_epoch(server, api):
    ch = uid("pub")
    first = await api.publish(PublishRequest(channel=ch, data={"a": 1}))
    second = await api.publish(PublishRequest(channel=ch, data={"a": 2}))
    assert first.epoch and first.epoch == second.epoch, (first, second)
    assert first.offset >= 1
    assert second.offset == first.offset + 1


async def test_publish_to_unknown_namespace_is_an_api_error(server, api):
    with pytest.raises(CentApiResponseError) as err:
        await api.publish(PublishRequest(channel=f"nope:{uid('x')}", data={}))
    assert err.value.code == 102


async def test_broadcast_reaches_every_channel(server, api, clients):
    client = await clients.connected(server.ws_url, user="alice")
    ch1, ch2 = uid("b1"), uid("b2")
    sub1 = await subscribed(client, ch1)
    sub2 = await subscribed(client, ch2)
    res = await api.broadcast(BroadcastRequest(channels=[ch1, ch2], data={"all": True}))
    assert len(res.responses) == 2, res
    for r in res.responses:
        assert r.error is None, res
        assert r.result is not None and r.result.epoch, res
    assert (await sub1.rec.wait_for("publication")).pub.data == {"all": True}
    assert (await sub2.rec.wait_for("publication")).pub.data == {"all": True}


async def test_history_remove(server, api):
    ch = uid("hr")
    last = None
    for i in range(3):
        last = await api.publish(PublishRequest(channel=ch, data={"i": i}))
    before = await api.history(HistoryRequest(channel=ch, limit=10))
    assert len(before.publications) == 3
    await api.history_remove(HistoryRemoveRequest(channel=ch))
    after = await api.history(HistoryRequest(channel=ch, limit=10))
    assert after.publications == []
    # The stream position outlives the data.
    assert after.epoch == last.epoch
    assert after.offset == last.offset
    nxt = await api.publish(PublishRequest(channel=ch, data={"i": 3}))
    assert nxt.offset == last.offset + 1


async def test_channels_lists_active_channels(server, api, clients):
    alice = await clients.connected(server.ws_url, user="alice")
    bob = await clients.connected(server.ws_url, user="bob")
    ch1, ch2 = uid("act"), uid("act")
    await subscribed(alice, ch1)
    sub_b = await subscribed(bob, ch1)
    await subscribed(bob, ch2)
    res = await api.channels(ChannelsRequest())
    assert ch1 in res.channels and ch2 in res.channels, res
    assert res.channels[ch1].num_clients == 2
    assert res.channels[ch2].num_clients == 1
    await sub_b.unsubscribe()

    async def ch1_has_one():
        r = await api.channels(ChannelsRequest())
        return ch1 in r.channels and r.channels[ch1].num_clients == 1

    await eventually(ch1_has_one, what="num_clients of ch1 == 1")


async def test_info_lists_one_node(server, api, clients):
    await clients.connected(server.ws_url, user="alice")
    await clients.connected(server.ws_url, user="bob")
    info = await api.info(InfoRequest())
    assert len(info.nodes) == 1, info
    node = info.nodes[0]
    assert node.uid and node.name, node
    assert node.num_clients == 2, node
    assert node.num_users == 2, node


async def test_disconnect_user(server, api, clients):
    user = uid("u")
    client = await clients.connected(server.ws_url, user=user)
    other = await clients.connected(server.ws_url, user=uid("other"))
    await api.disconnect(DisconnectRequest(user=user))
    ctx = await client.rec.wait_for("disconnected")
    assert ctx.code == 3503, ctx
    assert client.state == ClientState.DISCONNECTED
    assert other.state == ClientState.CONNECTED


async def test_unsubscribe_user(server, api, clients):
    user = uid("u")
    client = await clients.connected(server.ws_url, user=user)
    ch = uid("kick")
    sub = await subscribed(client, ch)
    await api.unsubscribe(UnsubscribeRequest(user=user, channel=ch))
    ctx = await sub.rec.wait_for("unsubscribed")
    assert ctx.code == 2000, ctx
    stats = await api.presence_stats(PresenceStatsRequest(channel=ch))
    assert stats.num_clients == 0
    assert client.state == ClientState.CONNECTED


async def test_subscribe_user_server_side(server, api, clients):
    user = uid("u")
    client = await clients.connected(server.ws_url, user=user)
    ch = uid("server-side")
    await api.subscribe(SubscribeRequest(user=user, channel=ch))
    ctx = await client.rec.wait_for("subscribed", lambda c: c.channel == ch)
    assert ctx.channel == ch
    await api.publish(PublishRequest(channel=ch, data={"to": user}))
    pub = await client.rec.wait_for("publication", lambda c: c.channel == ch)
    assert pub.pub.data == {"to": user}


async def test_batch(server, api, clients):
    client = await clients.connected(server.ws_url, user="alice")
    ch = uid("batch")
    sub = await subscribed(client, ch)
    res = await api.batch(
        BatchRequest(
            requests=[
                PublishRequest(channel=ch, data={"n": 1}),
                PublishRequest(channel=ch, data={"n": 2}),
                PresenceStatsRequest(channel=ch),
            ]
        )
    )
    assert len(res.replies) == 3, res
    p1, p2, stats = res.replies
    assert p2.offset == p1.offset + 1
    assert p1.epoch == p2.epoch
    assert stats.num_clients == 1
    pubs = await sub.rec.wait_count("publication", 2)
    assert [c.pub.data for c in pubs] == [{"n": 1}, {"n": 2}]


async def test_bad_api_key_is_refused(server):
    bad_sync = SyncClient(server.api_url, api_key="wrong")
    with pytest.raises(CentUnauthorizedError):
        await asyncio.to_thread(bad_sync.info, InfoRequest())
    async with AsyncClient(server.api_url, api_key="wrong") as bad:
        with pytest.raises(CentUnauthorizedError):
            await bad.publish(PublishRequest(channel=uid("x"), data={}))
    async with AsyncClient(server.api_url, api_key="") as missing:
        with pytest.raises(CentUnauthorizedError):
            await missing.info(InfoRequest())
    good_sync = SyncClient(server.api_url, api_key=API_KEY)
    info = await asyncio.to_thread(good_sync.info, InfoRequest())
    assert len(info.nodes) == 1


async def test_health(server):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http_url}/health") as res:
            assert res.status == 200
