"""Subscriptions with centrifuge-python, publications made with cent."""

from __future__ import annotations

import pytest
from cent import (
    HistoryRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
)
from cent.dto import StreamPosition as ApiStreamPosition

from centrifuge import ClientState, ReplyError, StreamPosition

from conftest import eventually, new_sub, subscribed, uid


async def test_publications_arrive_in_order_with_their_data(server, clients, api):
    client = await clients.connected(server.ws_url, user="alice")
    ch = uid("feed")
    sub = await subscribed(client, ch)
    sent = []
    for i in range(20):
        data = {"n": i, "text": f"message {i}", "nested": {"list": [i, i * 2], "ok": True}}
        res = await api.publish(PublishRequest(channel=ch, data=data))
        assert res.epoch, f"publish result has an epoch: {res}"
        sent.append((data, res.offset, res.epoch))
    got = await sub.rec.wait_count("publication", 20)
    assert [c.pub.data for c in got] == [s[0] for s in sent]
    assert [c.pub.offset for c in got] == [s[1] for s in sent]
    assert [s[1] for s in sent] == list(range(sent[0][1], sent[0][1] + 20)), "offsets +1 each"
    assert {s[2] for s in sent} == {sent[0][2]}, "one epoch"
    assert got[0].pub.info is None, "server API publications carry no client info"


async def test_subscriber_may_publish_in_default_namespace(server, clients):
    ch = uid("chat")
    alice = await clients.connected(server.ws_url, user="alice")
    bob = await clients.connected(server.ws_url, user="bob")
    sub_a = await subscribed(alice, ch)
    sub_b = await subscribed(bob, ch)
    await sub_a.publish({"from": "alice", "text": "hello"})
    ctx = await sub_b.rec.wait_for("publication")
    assert ctx.pub.data == {"from": "alice", "text": "hello"}
    assert ctx.pub.info is not None and ctx.pub.info.user == "alice", ctx
    assert ctx.pub.info.client


async def test_publish_without_subscription_is_denied(server, clients):
    client = await clients.connected(server.ws_url, user="alice")
    with pytest.raises(ReplyError) as err:
        await client.publish(uid("nosub"), {"x": 1})
    assert err.value.code == 103


async def test_publish_in_news_is_denied_but_subscribe_is_allowed(server, clients, api):
    client = await clients.connected(server.ws_url, user="alice")
    ch = f"news:{uid('headline')}"
    sub = await subscribed(client, ch)
    with pytest.raises(ReplyError) as err:
        await sub.publish({"x": 1})
    assert err.value.code == 103
    await api.publish(PublishRequest(channel=ch, data={"title": "from the backend"}))
    ctx = await sub.rec.wait_for("publication")
    assert ctx.pub.data == {"title": "from the backend"}


async def test_unknown_namespace_is_refused_with_102(server, clients):
    client = await clients.connected(server.ws_url, user="alice")
    sub = new_sub(client, f"nope:{uid('x')}")
    await sub.subscribe()
    ctx = await sub.rec.wait_for("unsubscribed")
    assert ctx.code == 102, ctx
    assert sub.rec.count("subscribed") == 0
    assert client.state == ClientState.CONNECTED


async def test_history_from_the_sdk_and_the_api(server, clients, api):
    client = await clients.connected(server.ws_url, user="alice")
    ch = uid("hist")
    sub = await subscribed(client, ch)
    offsets = []
    epoch = ""
    for i in range(1, 6):
        res = await api.publish(PublishRequest(channel=ch, data={"n": i}))
        offsets.append(res.offset)
        epoch = res.epoch
    await sub.rec.wait_count("publication", 5)

    full = await sub.history(limit=10)
    assert [p.data["n"] for p in full.publications] == [1, 2, 3, 4, 5]
    assert [p.offset for p in full.publications] == offsets
    assert full.offset == offsets[-1]
    assert full.epoch == epoch

    since = await sub.history(limit=2, since=StreamPosition(offset=offsets[1], epoch=epoch))
    assert [p.data["n"] for p in since.publications] == [3, 4]

    rev = await sub.history(limit=2, reverse=True)
    assert [p.data["n"] for p in rev.publications] == [5, 4]

    via_api = await api.history(HistoryRequest(channel=ch, limit=10))
    assert [p.data["n"] for p in via_api.publications] == [1, 2, 3, 4, 5]
    assert [p.offset for p in via_api.publications] == offsets
    assert via_api.offset == offsets[-1]
    assert via_api.epoch == epoch

    via_api_since = await api.history(
        HistoryRequest(channel=ch, limit=10, since=ApiStreamPosition(offset=offsets[3], epoch=epoch))
    )
    assert [p.offset for p in via_api_since.publications] == [offsets[4]]


async def test_history_denied_in_news(server, clients):
    client = await clients.connected(server.ws_url, user="alice")
    sub = await subscribed(client, f"news:{uid('h')}")
    with pytest.raises(ReplyError) as err:
        await sub.history(limit=10)
    assert err.value.code == 103


async def test_presence_from_the_sdk_and_the_api(server, clients, api):
    ch = uid("room")
    alice = await clients.connected(server.ws_url, user="alice")
    bob = await clients.connected(server.ws_url, user="bob")
    bob2 = await clients.connected(server.ws_url, user="bob")
    sub_a = await subscribed(alice, ch)
    sub_b = await subscribed(bob, ch)
    await subscribed(bob2, ch)

    presence = await sub_a.presence()
    assert len(presence.clients) == 3, presence
    for client_id, info in presence.clients.items():
        assert info.client == client_id
    assert sorted(i.user for i in presence.clients.values()) == ["alice", "bob", "bob"]

    stats = await sub_b.presence_stats()
    assert (stats.num_clients, stats.num_users) == (3, 2)

    api_presence = await api.presence(PresenceRequest(channel=ch))
    assert sorted(i.user for i in api_presence.presence.values()) == ["alice", "bob", "bob"]
    api_stats = await api.presence_stats(PresenceStatsRequest(channel=ch))
    assert (api_stats.num_clients, api_stats.num_users) == (3, 2)

    await sub_b.unsubscribe()

    async def two_left():
        s = await api.presence_stats(PresenceStatsRequest(channel=ch))
        return s.num_clients == 2

    await eventually(two_left, what="presence_stats num_clients == 2 after unsubscribe")
    stats = await sub_a.presence_stats()
    assert (stats.num_clients, stats.num_users) == (2, 2)


async def test_presence_not_available_in_news(server, clients):
    # Presence is off in "news": 108 not available, as in Centrifugo.
    client = await clients.connected(server.ws_url, user="alice")
    sub = await subscribed(client, f"news:{uid('p')}")
    with pytest.raises(ReplyError) as err:
        await sub.presence()
    assert err.value.code == 108
    with pytest.raises(ReplyError) as err:
        await sub.presence_stats()
    assert err.value.code == 108
