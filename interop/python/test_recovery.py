"""Recovery with centrifuge-python: a subscriber behind a proxy is cut off while cent
publishes, then comes back."""

from __future__ import annotations

import asyncio

from cent import AsyncClient, PublishRequest

from conftest import API_KEY, new_sub, uid


async def _subscriber_behind_proxy(clients, proxy, channel, user):
    client = await clients.connected(proxy.ws_url, user=user)
    sub = new_sub(client, channel)
    await sub.subscribe()
    first = await sub.rec.wait_for("subscribed")
    assert first.was_recovering is False
    assert first.recoverable is True, "force_recovery makes the subscription recoverable"
    return client, sub, first


async def _publish(api, channel, data):
    return await api.publish(PublishRequest(channel=channel, data=data))


async def test_missed_publications_are_recovered_exactly_once(server, api, clients, proxies):
    ch = uid("rec")
    proxy = await proxies(server.port)
    client, sub, first = await _subscriber_behind_proxy(clients, proxy, ch, "rec-ok")

    for i in range(3):
        await _publish(api, ch, {"seq": i})
    await sub.rec.wait_count("publication", 3)

    mark = sub.rec.mark()
    proxy.cut()
    await sub.rec.wait_for("subscribing", after=mark)
    missed = [await _publish(api, ch, {"seq": i}) for i in range(3, 10)]

    proxy.restore()
    again = await sub.rec.wait_for("subscribed", after=mark, timeout=8)
    assert again.was_recovering is True, again
    assert again.recovered is True, again
    assert again.stream_position.epoch == first.stream_position.epoch

    await sub.rec.wait_count("publication", 10)
    for i in range(10, 13):
        await _publish(api, ch, {"seq": i})
    pubs = [c.pub for c in await sub.rec.wait_count("publication", 13)]

    assert [p.data["seq"] for p in pubs] == list(range(13)), "each publication once, in order"
    offsets = [p.offset for p in pubs]
    assert offsets == list(range(offsets[0], offsets[0] + 13)), f"consecutive offsets: {offsets}"
    assert offsets[3:10] == [m.offset for m in missed]


async def test_recovery_while_publications_keep_flowing(server, api, clients, proxies):
    """A publisher never pauses while the subscriber drops and resubscribes three times: the
    node has to merge history and the live stream with no gap and no duplicate."""
    ch = uid("flow")
    proxy = await proxies(server.port)
    client, sub, first = await _subscriber_behind_proxy(clients, proxy, ch, "rec-flow")

    # Publishes one after another up to `limit`, which keeps what the subscriber misses
    # (at most 80) under history_size (100) however slow the machine.
    state = {"published": 0, "limit": 0, "pace": 0.0, "running": True}
    changed = asyncio.Event()

    async def publisher():
        while state["running"]:
            if state["published"] >= state["limit"]:
                changed.clear()
                await changed.wait()
                continue
            await _publish(api, ch, {"seq": state["published"]})
            state["published"] += 1
            if state["pace"]:
                await asyncio.sleep(state["pace"])

    def allow(n):
        state["limit"] += n
        changed.set()

    async def reached(n):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 8
        while state["published"] < n:
            assert loop.time() < deadline, f"publisher stuck at {state['published']} < {n}"
            await asyncio.sleep(0.002)

    task = asyncio.create_task(publisher())
    try:
        for cycle in range(3):
            allow(10)
            await reached(state["limit"])
            mark = sub.rec.mark()
            proxy.cut()
            await sub.rec.wait_for("subscribing", after=mark)
            allow(10)
            await reached(state["limit"])
            # Paced publications span the reconnect (the SDK retries within 0.3 s), so the
            # resubscribe races with them: the node must merge history and the live stream.
            state["pace"] = 0.004
            allow(70)
            proxy.restore()
            again = await sub.rec.wait_for("subscribed", after=mark, timeout=8)
            assert again.recovered is True, f"cycle {cycle}: {again}"
            await reached(state["limit"])
            state["pace"] = 0.0
    finally:
        state["running"] = False
        changed.set()
        await task

    total = state["published"]
    await sub.rec.wait_for("publication", lambda c: c.pub.data["seq"] == total - 1, timeout=8)
    pubs = [c.pub for c in sub.rec.all("publication")]
    seqs = [p.data["seq"] for p in pubs]
    bad = next((i for i, s in enumerate(seqs) if s != i), None)
    assert bad is None, f"gap or duplicate at index {bad}: {seqs[max(0, bad - 3):bad + 4]}"
    assert len(seqs) == total
    offsets = [p.offset for p in pubs]
    assert offsets == list(range(offsets[0], offsets[0] + total))


async def test_more_missed_than_history_size_is_not_recovered(server, api, clients, proxies):
    # Namespace "news" keeps 10 publications; 15 are made while the subscriber is away.
    ch = f"news:{uid('rec')}"
    proxy = await proxies(server.port)
    client, sub, first = await _subscriber_behind_proxy(clients, proxy, ch, "rec-overflow")

    for i in range(2):
        await _publish(api, ch, {"seq": i})
    await sub.rec.wait_count("publication", 2)

    mark = sub.rec.mark()
    proxy.cut()
    await sub.rec.wait_for("subscribing", after=mark)
    top = None
    for i in range(2, 17):
        top = await _publish(api, ch, {"seq": i})

    proxy.restore()
    again = await sub.rec.wait_for("subscribed", after=mark, timeout=8)
    assert again.was_recovering is True, again
    assert again.recovered is False, again
    assert again.stream_position.offset == top.offset
    assert again.stream_position.epoch == top.epoch

    await _publish(api, ch, {"seq": 17})
    pubs = [c.pub for c in await sub.rec.wait_count("publication", 3)]
    assert [p.data["seq"] for p in pubs] == [0, 1, 17], "no partial recovery presented as a stream"
    assert pubs[2].offset == top.offset + 1


async def test_node_restart_changes_epoch_and_is_not_recovered(start_server, clients, proxies):
    node = await start_server()
    proxy = await proxies(node.port)
    ch = uid("restart")
    client, sub, first = await _subscriber_behind_proxy(clients, proxy, ch, "restart")
    async with AsyncClient(node.api_url, api_key=API_KEY) as api:
        p1 = await _publish(api, ch, {"seq": 0})
    await sub.rec.wait_count("publication", 1)

    mark = sub.rec.mark()
    proxy.cut()
    rc = await node.stop()
    assert rc == 0, f"node exit status {rc}; stderr:\n{node.log_tail()}"
    await sub.rec.wait_for("subscribing", after=mark)

    node2 = await start_server()
    proxy.set_upstream(node2.port)
    proxy.restore()
    again = await sub.rec.wait_for("subscribed", after=mark, timeout=8)
    assert again.was_recovering is True, again
    assert again.recovered is False, again
    assert again.stream_position.epoch != first.stream_position.epoch
    assert again.stream_position.epoch != p1.epoch

    async with AsyncClient(node2.api_url, api_key=API_KEY) as api:
        p2 = await _publish(api, ch, {"seq": 1})
    pubs = [c.pub for c in await sub.rec.wait_count("publication", 2)]
    assert [p.data for p in pubs] == [{"seq": 0}, {"seq": 1}]
    assert pubs[1].offset == p2.offset
