"""MQTT devices (paho-mqtt, in 3.1.1 and 5.0) on Herald's channels, beside centrifuge-python
clients and cent: tokens, QoS 0/1, persistent sessions, retained messages, wills, keep-alive,
refused tokens and topics, payloads between the two worlds, MQTT over WebSocket."""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import socket
import threading
import time
from typing import Any, List, Optional

import paho.mqtt.client as mqtt
import pytest
from cent import AsyncClient, PublishRequest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import API_KEY, mint_token, subscribed, uid

NAMESPACES = [
    {
        "name": "",
        "history_size": 100,
        "history_ttl": "5m",
        "force_recovery": True,
        "allow_subscribe_for_client": True,
        "allow_publish_for_client": True,
        "allow_history_for_subscriber": True,
        "presence": True,
    },
    # Nothing allowed to clients: refused topics.
    {"name": "private", "history_size": 10, "history_ttl": "1m"},
    # No history: no retained message, nothing to recover.
    {"name": "live", "allow_subscribe_for_client": True, "allow_publish_for_client": True},
]

MQTT_TOML = '[mqtt]\nlisten = "127.0.0.1:0"\nsession_expiry = "1h"\n'

VERSIONS = [pytest.param(mqtt.MQTTv311, id="3.1.1"), pytest.param(mqtt.MQTTv5, id="5.0")]


@pytest.fixture
async def node(start_server: Any) -> Any:
    return await start_server(namespaces=NAMESPACES, extra_toml=MQTT_TOML)


@pytest.fixture
async def api(node: Any) -> Any:
    """cent on the MQTT-enabled node (the conftest `api` talks to the default one)."""
    client = AsyncClient(node.api_url, api_key=API_KEY, timeout=5)
    yield client
    await client.close()


async def mqtt_port(server: Any, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.stdout:
            if line.startswith("herald: mqtt listening on mqtt://127.0.0.1:"):
                return int(line.rsplit(":", 1)[1])
        await asyncio.sleep(0.02)
    raise AssertionError(f"no MQTT listening line in {server.stdout}")


class Device:
    """A paho client whose events land in thread-safe queues the test waits on."""

    def __init__(
        self,
        port: int,
        version: int,
        client_id: str = "",
        token: Optional[str] = None,
        clean: bool = True,
        session_expiry: int = 0,
        transport: str = "tcp",
        will: Optional[tuple] = None,
    ) -> None:
        self.port = port
        self.version = version
        kwargs: dict = {"client_id": client_id, "protocol": version, "transport": transport}
        if version == mqtt.MQTTv311:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        if token is not None:
            self.client.username_pw_set("device", token)
        if will:
            self.client.will_set(*will)
        self.clean = clean
        self.session_expiry = session_expiry
        self.connects: "queue.Queue[Any]" = queue.Queue()
        self.messages: "queue.Queue[mqtt.MQTTMessage]" = queue.Queue()
        self.subacks: "queue.Queue[List[Any]]" = queue.Queue()
        self.pubacks: "queue.Queue[Any]" = queue.Queue()
        self.disconnects: "queue.Queue[Any]" = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connects.put((flags, rc))
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        self.client.on_publish = lambda c, u, mid, rc, props: self.pubacks.put((mid, rc))
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put(rc)
        # Reconnecting is the test's decision, never paho's.
        self.client.reconnect_delay_set(60, 60)

    async def connect(self, keepalive: int = 30) -> Any:
        kwargs: dict = {"keepalive": keepalive}
        if self.version == mqtt.MQTTv5:
            kwargs["clean_start"] = self.clean
            if self.session_expiry:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.session_expiry
                kwargs["properties"] = props
        self.client.connect("127.0.0.1", self.port, **kwargs)
        self.client.loop_start()
        return await get(self.connects, "CONNACK")

    async def connected(self, keepalive: int = 30) -> Any:
        flags, rc = await self.connect(keepalive)
        assert not rc.is_failure, f"connect refused: {rc}"
        return flags

    async def subscribe(self, topic: str, qos: int = 0) -> Any:
        self.client.subscribe(topic, qos)
        return (await get(self.subacks, "SUBACK"))[0]

    async def messages_n(self, n: int, timeout: float = 5.0) -> List[mqtt.MQTTMessage]:
        return [await get(self.messages, f"message {i + 1} of {n}", timeout) for i in range(n)]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def get(q: "queue.Queue[Any]", what: str, timeout: float = 5.0) -> Any:
    try:
        return await asyncio.to_thread(q.get, True, timeout)
    except queue.Empty:
        raise AssertionError(f"no {what} within {timeout} s") from None


def assert_nothing(q: "queue.Queue[Any]", what: str, within: float = 0.5) -> None:
    try:
        got = q.get(True, within)
    except queue.Empty:
        return
    raise AssertionError(f"unexpected {what}: {got}")


@pytest.fixture
def devices() -> Any:
    made: List[Device] = []

    def new(*args: Any, **kwargs: Any) -> Device:
        d = Device(*args, **kwargs)
        made.append(d)
        return d

    yield new
    for d in made:
        try:
            d.stop()
        except Exception:
            pass


@pytest.mark.parametrize("version", VERSIONS)
async def test_device_receives_api_publications_at_qos_0_and_1(node, api, devices, version):
    port = await mqtt_port(node)
    dev = devices(port, version, "dev-" + uid(), mint_token("alice"))
    await dev.connected()
    ch0, ch1 = uid("q0"), uid("q1")
    assert (await dev.subscribe(ch0, 0)).value == 0
    assert (await dev.subscribe(ch1, 2)).value == 1, "QoS 2 is granted as 1"
    for i in range(5):
        await api.publish(PublishRequest(channel=ch0, data={"n": i}))
        await api.publish(PublishRequest(channel=ch1, data={"n": i}))
    got = await dev.messages_n(10)
    by_topic = {ch0: [], ch1: []}
    for m in got:
        by_topic[m.topic].append((json.loads(m.payload), m.qos, m.retain))
    for ch, qos in ((ch0, 0), (ch1, 1)):
        assert by_topic[ch] == [({"n": i}, qos, False) for i in range(5)], ch


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_refused_token_is_a_refused_connack(node, devices, version):
    port = await mqtt_port(node)
    for token in ["not-a-jwt", mint_token("bob", secret="wrong"), mint_token("bob", ttl=-60)]:
        dev = devices(port, version, "dev-" + uid(), token)
        flags, rc = await dev.connect()
        assert rc.is_failure, f"{token!r} accepted"
        # 3.1.1 return code 4 and 5.0 reason 0x86: bad user name or password.
        assert rc.value in (4, 0x86), rc
        dev.stop()


async def test_anonymous_device_needs_allow_anonymous(start_server, devices):
    closed = await start_server(namespaces=NAMESPACES, extra_toml=MQTT_TOML)
    dev = devices(await mqtt_port(closed), mqtt.MQTTv5, "anon-" + uid())
    flags, rc = await dev.connect()
    assert rc.is_failure
    open_node = await start_server(
        namespaces=NAMESPACES, extra_toml=MQTT_TOML, client={"allow_anonymous": True}
    )
    dev = devices(await mqtt_port(open_node), mqtt.MQTTv5, "anon-" + uid())
    await dev.connected()


@pytest.mark.parametrize("version", VERSIONS)
async def test_mqtt_and_centrifuge_clients_share_channels_and_payloads(
    node, api, clients, devices, version
):
    port = await mqtt_port(node)
    ch = uid("shared")
    browser = await clients.connected(node.ws_url, user="web")
    sub = await subscribed(browser, ch)
    dev = devices(port, version, "dev-" + uid(), mint_token("sensor"))
    await dev.connected()
    await dev.subscribe(ch, 1)

    # JSON from a device reaches a JSON client as JSON.
    dev.client.publish(ch, b'{"t":21.5}', qos=1).wait_for_publish(5)
    got = await sub.rec.wait_count("publication", 1)
    assert got[0].pub.data == {"t": 21.5}
    assert got[0].pub.info.user == "sensor", "published with the device's identity"
    echo = await get(dev.messages, "own publication")
    assert echo.payload == b'{"t":21.5}'

    # Bytes that are not JSON reach a JSON client as base64, and devices as the same bytes.
    raw = b"\x00\xff\x10binary"
    dev.client.publish(ch, raw, qos=1).wait_for_publish(5)
    got = await sub.rec.wait_count("publication", 2)
    assert base64.b64decode(got[1].pub.data) == raw
    assert (await get(dev.messages, "binary publication")).payload == raw

    # What a backend publishes reaches the device as its JSON text.
    await api.publish(PublishRequest(channel=ch, data={"from": "api"}))
    assert json.loads((await get(dev.messages, "api publication")).payload) == {"from": "api"}


@pytest.mark.parametrize("version", VERSIONS)
async def test_persistent_session_gets_what_it_missed_in_order_once(node, api, devices, version):
    port = await mqtt_port(node)
    ch = uid("persist")
    cid = "dev-" + uid()
    token = mint_token("carol")
    dev = devices(port, version, cid, token, clean=False, session_expiry=600)
    flags = await dev.connected()
    await dev.subscribe(ch, 1)
    for i in range(3):
        await api.publish(PublishRequest(channel=ch, data={"n": i}))
    assert [json.loads(m.payload) for m in await dev.messages_n(3)] == [{"n": i} for i in range(3)]
    dev.stop()
    await get(dev.disconnects, "disconnect")

    for i in range(3, 10):
        await api.publish(PublishRequest(channel=ch, data={"n": i}))

    back = devices(port, version, cid, token, clean=False, session_expiry=600)
    flags = await back.connected()
    assert flags.session_present, "the session was kept"
    got = await back.messages_n(7)
    assert [json.loads(m.payload) for m in got] == [{"n": i} for i in range(3, 10)]
    assert all(m.topic == ch and m.qos == 1 for m in got)
    assert_nothing(back.messages, "duplicate")

    # Still subscribed without subscribing again.
    await api.publish(PublishRequest(channel=ch, data={"n": 10}))
    assert json.loads((await get(back.messages, "live publication")).payload) == {"n": 10}


@pytest.mark.parametrize("version", VERSIONS)
async def test_clean_session_starts_afresh(node, api, devices, version):
    port = await mqtt_port(node)
    ch, cid, token = uid("fresh"), "dev-" + uid(), mint_token("dan")
    dev = devices(port, version, cid, token, clean=False, session_expiry=600)
    await dev.connected()
    await dev.subscribe(ch, 1)
    dev.stop()
    await get(dev.disconnects, "disconnect")
    await api.publish(PublishRequest(channel=ch, data={"n": 1}))
    again = devices(port, version, cid, token, clean=True)
    flags = await again.connected()
    assert not flags.session_present
    assert_nothing(again.messages, "publication without a subscription")


@pytest.mark.parametrize("version", VERSIONS)
async def test_retained_message_is_the_channels_latest_publication(node, api, devices, version):
    port = await mqtt_port(node)
    ch = uid("retained")
    for i in range(3):
        await api.publish(PublishRequest(channel=ch, data={"n": i}))
    dev = devices(port, version, "dev-" + uid(), mint_token("erin"))
    await dev.connected()
    await dev.subscribe(ch, 1)
    m = await get(dev.messages, "retained message")
    assert (json.loads(m.payload), m.retain) == ({"n": 2}, True)
    await api.publish(PublishRequest(channel=ch, data={"n": 3}))
    m = await get(dev.messages, "live message")
    assert (json.loads(m.payload), m.retain) == ({"n": 3}, False)
    # A channel without history keeps nothing to retain.
    live = "live:" + uid()
    await api.publish(PublishRequest(channel=live, data={"n": 0}))
    await dev.subscribe(live, 0)
    assert_nothing(dev.messages, "retained message on a channel without history")


@pytest.mark.parametrize("version", VERSIONS)
async def test_will_is_published_when_a_device_vanishes(node, clients, devices, version):
    port = await mqtt_port(node)
    will_ch = uid("will")
    watcher = devices(port, version, "watch-" + uid(), mint_token("watcher"))
    await watcher.connected()
    await watcher.subscribe(will_ch, 1)
    browser = await clients.connected(node.ws_url, user="web")
    sub = await subscribed(browser, will_ch)

    # A device that says goodbye does not leave its will.
    polite = devices(port, version, "polite-" + uid(), mint_token("p"), will=(will_ch, b"polite", 1))
    await polite.connected()
    polite.stop()
    await get(polite.disconnects, "disconnect")

    # One whose connection just ends does.
    gone = devices(port, version, "gone-" + uid(), mint_token("g"), will=(will_ch, b"gone", 1))
    await gone.connected()
    gone.client.socket().shutdown(socket.SHUT_RDWR)
    m = await get(watcher.messages, "will")
    assert m.payload == b"gone"
    got = await sub.rec.wait_count("publication", 1)
    assert base64.b64decode(got[0].pub.data) == b"gone"
    assert_nothing(watcher.messages, "the polite device's will")


@pytest.mark.parametrize("level", [4, 5])
async def test_keepalive_timeout_closes_a_silent_device(node, level):
    port = await mqtt_port(node)
    token = mint_token("quiet").encode()
    # A hand-written CONNECT with keep-alive 1 s; nothing after it, not even PINGREQ.
    variable = b"\x00\x04MQTT" + bytes([level, 0b11000010]) + b"\x00\x01"
    if level == 5:
        variable += b"\x00"
    payload = b"\x00\x05quiet" + b"\x00\x06device" + len(token).to_bytes(2, "big") + token
    body = variable + payload
    length = bytearray()
    n = len(body)
    while True:
        b, n = n % 128, n // 128
        length.append(b | (0x80 if n else 0))
        if not n:
            break
    started = time.monotonic()
    data = await asyncio.to_thread(_talk, port, bytes([0x10]) + bytes(length) + body)
    took = time.monotonic() - started
    assert data[0] == 0x20 and data[3] == 0, f"CONNACK accepted: {data.hex()}"
    assert took < 6, f"closed after {took:.1f} s (keep-alive 1 s: 1.5 s)"
    if level == 5:
        # DISCONNECT with reason 0x8D, keep-alive timeout.
        connack_len = data[1] + 2
        rest = data[connack_len:]
        assert rest[:1] == b"\xe0" and 0x8D in rest[2:3], f"DISCONNECT 0x8D: {rest.hex()}"


def _talk(port: int, packet: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=8) as s:
        s.sendall(packet)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return data
            data += chunk


@pytest.mark.parametrize("version", VERSIONS)
async def test_refused_topics(node, devices, version):
    port = await mqtt_port(node)
    dev = devices(port, version, "dev-" + uid(), mint_token("mallory"))
    await dev.connected()
    refused = await dev.subscribe("private:" + uid(), 1)
    wildcard = await dev.subscribe("sensors/+/temp", 0)
    if version == mqtt.MQTTv5:
        assert refused.value == 0x87, "not authorized"
        assert wildcard.value == 0xA2, "wildcard subscriptions not supported"
    else:
        assert refused.value == 0x80 and wildcard.value == 0x80
    info = dev.client.publish("private:" + uid(), b"x", qos=1)
    if version == mqtt.MQTTv5:
        mid, rc = await get(dev.pubacks, "PUBACK")
        assert rc.value == 0x87, f"PUBACK not authorized: {rc}"
        # The connection goes on.
        assert (await dev.subscribe(uid("ok"), 0)).value == 0
    else:
        # 3.1.1 has no negative PUBACK: the connection is closed (§3.3.5).
        await get(dev.disconnects, "disconnect")


async def test_mqtt_over_websocket(node, api, devices):
    port = await mqtt_port(node)
    dev = devices(node.port, mqtt.MQTTv311, "ws-" + uid(), mint_token("ws"), transport="websockets")
    await dev.connected()
    ch = uid("ws")
    await dev.subscribe(ch, 1)
    await api.publish(PublishRequest(channel=ch, data={"over": "websocket"}))
    assert json.loads((await get(dev.messages, "publication")).payload) == {"over": "websocket"}
    assert port != node.port


async def test_second_connection_with_the_same_id_takes_over(node, devices):
    port = await mqtt_port(node)
    cid, token = "dev-" + uid(), mint_token("twin")
    first = devices(port, mqtt.MQTTv5, cid, token)
    await first.connected()
    second = devices(port, mqtt.MQTTv5, cid, token)
    await second.connected()
    rc = await get(first.disconnects, "takeover")
    assert rc.value == 0x8E, f"session taken over: {rc}"


async def test_connect_proxy_authorises_a_device_without_a_token(start_server, devices):
    from aiohttp import web

    seen: List[dict] = []

    async def connect(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if body.get("transport") != "mqtt":
            return web.json_response({"error": {"code": 1000, "message": "mqtt only"}})
        return web.json_response({"result": {"user": "proxied-device"}})

    app = web.Application()
    app.router.add_post("/connect", connect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        proxied = await start_server(
            namespaces=NAMESPACES,
            extra_toml=MQTT_TOML + f'\n[client.proxy.connect]\nenabled = true\nendpoint = "{base}/connect"\n',
        )
        dev = devices(await mqtt_port(proxied), mqtt.MQTTv5, "proxied-" + uid())
        await dev.connected()
        assert seen and seen[0]["transport"] == "mqtt", seen
        ch = uid("proxied")
        await dev.subscribe(ch, 0)
        cent = AsyncClient(proxied.api_url, api_key=API_KEY, timeout=5)
        try:
            from cent import PresenceRequest

            presence = await cent.presence(PresenceRequest(channel=ch))
            assert [c.user for c in presence.presence.values()] == ["proxied-device"]
        finally:
            await cent.close()
    finally:
        await runner.cleanup()


async def test_qos2_from_a_311_device_is_published_once(node, api, clients, devices):
    port = await mqtt_port(node)
    ch = uid("qos2")
    browser = await clients.connected(node.ws_url, user="web")
    sub = await subscribed(browser, ch)
    dev = devices(port, mqtt.MQTTv311, "q2-" + uid(), mint_token("q2"))
    await dev.connected()
    # paho completes PUBREC / PUBREL / PUBCOMP before wait_for_publish returns.
    dev.client.publish(ch, b'{"exactly":"once"}', qos=2).wait_for_publish(5)
    got = await sub.rec.wait_count("publication", 1)
    assert got[0].pub.data == {"exactly": "once"}
    dev.client.publish(ch, b'{"n":2}', qos=2).wait_for_publish(5)
    got = await sub.rec.wait_count("publication", 2)
    assert [g.pub.data for g in got] == [{"exactly": "once"}, {"n": 2}]


async def test_retain_handling_2_skips_the_retained_message(node, api, devices):
    from paho.mqtt.subscribeoptions import SubscribeOptions

    port = await mqtt_port(node)
    ch = uid("rh")
    await api.publish(PublishRequest(channel=ch, data={"old": True}))
    dev = devices(port, mqtt.MQTTv5, "rh-" + uid(), mint_token("rh"))
    await dev.connected()
    dev.client.subscribe(ch, options=SubscribeOptions(qos=1, retainHandling=2))
    await get(dev.subacks, "SUBACK")
    await api.publish(PublishRequest(channel=ch, data={"new": True}))
    m = await get(dev.messages, "live message")
    assert (json.loads(m.payload), m.retain) == ({"new": True}, False), "no retained first"
