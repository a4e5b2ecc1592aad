"""BusChannelLayer as Django Channels builds it: from the ``CHANNEL_LAYERS`` setting through
``channels.layers.get_channel_layer``, and under the course chat consumer of
examples/django_chat driven by Channels' ``WebsocketCommunicator`` (no browser, no server)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import django
import pytest
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.conf import settings
from django.test.utils import override_settings

from clients.channel_layer import BusChannelLayer
from layer_helpers import receive, run

pytestmark = pytest.mark.timeout(60)

SITE = Path(__file__).resolve().parent.parent / "examples" / "django_chat"


@pytest.fixture(scope="module", autouse=True)
def django_configured():
    """Minimal Django settings for this process (the test process has no project of its own);
    each test sets CHANNEL_LAYERS with override_settings, which also resets Channels' cache."""
    if not settings.configured:
        settings.configure(USE_TZ=True, INSTALLED_APPS=[], CHANNEL_LAYERS={})
        django.setup()


def bus_layers(url: str, **config) -> dict:
    return {"default": {"BACKEND": "clients.channel_layer.BusChannelLayer",
                        "CONFIG": {"hosts": [url], **config}}}


def test_get_channel_layer_builds_the_layer_from_every_config_key(broker):
    config = {"capacity": 7, "expiry": 30, "group_expiry": 600, "prefix": "site",
              "channel_capacity": {"http.*": 2, re.compile(r"^websocket\.send!.+"): 4}}
    with override_settings(CHANNEL_LAYERS=bus_layers(broker.url, **config)):
        layer = get_channel_layer()
        assert isinstance(layer, BusChannelLayer)
        assert get_channel_layer() is layer  # one instance per alias and process
        assert (layer.hosts, layer.capacity, layer.expiry, layer.group_expiry, layer.prefix) == (
            [broker.url], 7, 30, 600, "site")
        assert [layer.get_capacity(name) for name in ("http.request", "websocket.send!x", "other")] == [2, 4, 7]

        async def main():
            await layer.send("http.request", {"type": "http.request"})
            await layer.send("http.request", {"type": "http.request"})
            with pytest.raises(ChannelFull):
                await layer.send("http.request", {"type": "http.request"})
            assert "site.http.request" in broker.server.router.inboxes  # the prefix is on the wire
            return [await receive(layer, "http.request") for _ in range(2)]

        assert run(main()) == [{"type": "http.request"}] * 2


def test_get_channel_layer_with_only_hosts_uses_the_defaults(broker):
    with override_settings(CHANNEL_LAYERS=bus_layers(broker.url)):
        layer = get_channel_layer()
        assert (layer.capacity, layer.expiry, layer.group_expiry, layer.prefix) == (100, 60, 86400, "")


# -- the course chat consumer -------------------------------------------------------------------

@pytest.fixture
def chat_routes(monkeypatch):
    """The chat site's WebSocket routes (its directory goes on sys.path for this test only)."""
    monkeypatch.syspath_prepend(str(SITE))
    for name in [n for n in sys.modules if n == "chat" or n.startswith("chat.")]:
        monkeypatch.delitem(sys.modules, name)
    from channels.routing import URLRouter
    from chat.routing import websocket_urlpatterns

    return URLRouter(websocket_urlpatterns)


def test_the_chat_consumer_broadcasts_to_its_course_room_only(broker, chat_routes):
    from channels.testing import WebsocketCommunicator

    async def join(course: int, name: str) -> WebsocketCommunicator:
        communicator = WebsocketCommunicator(chat_routes, f"/ws/chat/room/{course}/?name={name}")
        connected, _ = await communicator.connect(timeout=10)
        assert connected
        return communicator

    async def main():
        alice, bob, carol = await join(1, "alice"), await join(1, "bob"), await join(2, "carol")
        await alice.send_to(text_data=json.dumps({"message": "hi room 1"}))
        to_bob = json.loads(await bob.receive_from(timeout=5))
        to_alice = json.loads(await alice.receive_from(timeout=5))
        await carol.send_to(text_data=json.dumps({"message": "hi room 2"}))
        to_carol = json.loads(await carol.receive_from(timeout=5))
        await alice.send_to(text_data=json.dumps({"message": "   "}))  # blank: ignored
        await alice.send_to(text_data="not json")  # ignored, the socket stays open
        quiet = [await c.receive_nothing(timeout=0.3) for c in (alice, bob)]
        for communicator in (alice, bob, carol):
            await communicator.disconnect()
        return to_bob, to_alice, to_carol, quiet

    with override_settings(CHANNEL_LAYERS=bus_layers(broker.url)):
        to_bob, to_alice, to_carol, quiet = run(main())
    assert to_bob == to_alice
    assert (to_bob["user"], to_bob["message"]) == ("alice", "hi room 1")
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", to_bob["datetime"])
    assert (to_carol["user"], to_carol["message"]) == ("carol", "hi room 2")
    assert quiet == [True, True]  # nothing of room 2 reached room 1, nor the ignored frames


def test_a_chat_member_that_disconnected_leaves_the_room(broker, chat_routes):
    from channels.testing import WebsocketCommunicator

    async def main():
        stays = WebsocketCommunicator(chat_routes, "/ws/chat/room/5/?name=stays")
        leaves = WebsocketCommunicator(chat_routes, "/ws/chat/room/5/?name=leaves")
        assert (await stays.connect(timeout=10))[0] and (await leaves.connect(timeout=10))[0]
        await leaves.disconnect()
        layer = get_channel_layer()
        members = broker.server.router.groups.sizes().get("chat_5")
        await stays.send_to(text_data=json.dumps({"message": "still here?"}))
        heard = json.loads(await stays.receive_from(timeout=5))
        await stays.disconnect()
        return layer, members, heard, broker.server.router.groups.sizes().get("chat_5")

    with override_settings(CHANNEL_LAYERS=bus_layers(broker.url)):
        layer, members, heard, after = run(main())
    assert isinstance(layer, BusChannelLayer)
    assert members == 1 and heard["message"] == "still here?"
    assert after is None  # the last member's group_discard emptied the group
