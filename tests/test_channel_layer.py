"""BusChannelLayer against the Django Channels layer specification: channels, messages, capacity,
names, extensions and CONFIG. Each test runs a real broker in a thread on loopback ports the OS
picked (conftest.py ``broker``).

Groups, expiry and flush are in test_channel_layer_groups.py; event loops, ``async_to_sync``,
cancellation, concurrency and other processes in test_channel_layer_loops.py.
"""

from __future__ import annotations

import asyncio
import collections
import re

import pytest
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from clients import BusError, Client, LimitExceeded
from clients.placement import broker_of_channel, broker_of_group
from clients.channel_layer import BusChannelLayer
from layer_helpers import RECEIVE_SECONDS, nothing_on, receive, run
from layer_helpers import sharded_layer_factory as layer_factory  # noqa: F401 (fixture: 1 broker, then 3)

pytestmark = pytest.mark.timeout(60)


# -- send and receive ---------------------------------------------------------------------------

def test_a_sent_message_is_received_unchanged_with_every_type_the_spec_allows(layer_factory):
    layer = layer_factory()
    message = {
        "type": "test.message",
        "text": "héllo wörld ✓",
        "bytes": b"\x00\xff\x89PNG",
        "int": -(2**63),
        "big": 2**63 - 1,
        "float": 3.25,
        "bool": True,
        "none": None,
        "list": [1, "two", b"3", [4.0]],
        "dict": {"nested": {"deeper": [None, False]}},
    }

    async def main():
        await layer.send("test-channel", message)
        return await receive(layer, "test-channel")

    assert run(main()) == message


def test_messages_on_one_channel_come_out_in_the_order_they_were_sent(layer_factory):
    layer = layer_factory()

    async def main():
        for n in range(50):
            await layer.send("ordered", {"type": "seq", "n": n})
        return [(await receive(layer, "ordered"))["n"] for _ in range(50)]

    assert run(main()) == list(range(50))


def test_a_message_waits_in_its_channel_for_a_receiver_that_comes_later(layer_factory):
    sender, receiver = layer_factory(), layer_factory()
    run(sender.send("waiting-room", {"type": "early"}))  # its client is gone before anyone receives
    assert run(receive(receiver, "waiting-room")) == {"type": "early"}


def test_receive_waits_until_a_message_is_sent(layer_factory):
    sender, receiver = layer_factory(), layer_factory()

    async def main():
        pending = asyncio.create_task(receive(receiver, "later"))
        await asyncio.sleep(0.2)
        assert not pending.done()
        await sender.send("later", {"type": "now"})
        return await pending

    assert run(main()) == {"type": "now"}


def test_each_message_is_received_once_and_then_gone(layer_factory):
    layer = layer_factory()

    async def main():
        await layer.send("once", {"type": "only"})
        assert await receive(layer, "once") == {"type": "only"}
        await nothing_on(layer, "once")

    run(main())


def test_a_tuple_in_a_message_comes_back_as_a_list(layer_factory):
    layer = layer_factory()

    async def main():
        await layer.send("tuples", {"type": "t", "pair": (1, 2)})
        return await receive(layer, "tuples")

    assert run(main()) == {"type": "t", "pair": [1, 2]}


@pytest.mark.parametrize("message", [["type", "x"], "text", None, 42])
def test_a_message_that_is_not_a_dict_is_refused(layer_factory, message):
    layer = layer_factory()
    with pytest.raises(TypeError):
        run(layer.send("typed", message))


# -- process-specific channels ------------------------------------------------------------------

def test_new_channel_gives_unique_valid_process_specific_names(layer_factory):
    layer = layer_factory()

    async def main():
        return [await layer.new_channel() for _ in range(100)]

    names = run(main())
    assert len(set(names)) == 100
    for name in names:
        assert "!" in name and not name.endswith("!")
        assert layer.require_valid_channel_name(name)
    assert all(name.startswith("specific.") for name in names)
    assert run(layer.new_channel("custom")).startswith("custom.")


def test_a_process_specific_channel_receives_what_another_layer_sends_to_it(layer_factory):
    owner, other = layer_factory(), layer_factory()

    async def main():
        me = await owner.new_channel()
        await other.send(me, {"type": "direct", "to": me})
        return me, await receive(owner, me)

    me, message = run(main())
    assert message == {"type": "direct", "to": me}


def test_process_specific_channels_of_one_layer_are_kept_apart(layer_factory):
    layer = layer_factory()

    async def main():
        first, second = await layer.new_channel(), await layer.new_channel()
        await layer.send(second, {"type": "for", "who": "second"})
        await layer.send(first, {"type": "for", "who": "first"})
        got = await receive(layer, first), await receive(layer, second)
        await nothing_on(layer, first)
        return got

    assert run(main()) == ({"type": "for", "who": "first"}, {"type": "for", "who": "second"})


# -- capacity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["normal", "specific"])
def test_send_to_a_full_channel_raises_channel_full(layer_factory, kind):
    layer = layer_factory(capacity=3)

    async def main():
        channel = "full-up" if kind == "normal" else await layer.new_channel()
        for n in range(3):
            await layer.send(channel, {"type": "fill", "n": n})
        with pytest.raises(ChannelFull):
            await layer.send(channel, {"type": "fill", "n": 3})
        return [(await receive(layer, channel))["n"] for _ in range(3)]

    assert run(main()) == [0, 1, 2]  # the refused message was not queued


@pytest.mark.parametrize("kind", ["normal", "specific"])
def test_receiving_a_message_from_a_full_channel_makes_room_for_another(layer_factory, kind):
    layer = layer_factory(capacity=3)  # (one layer, as in a Channels process: one client)

    async def main():
        channel = "full-up" if kind == "normal" else await layer.new_channel()
        for n in range(3):
            await layer.send(channel, {"type": "fill", "n": n})
        assert (await receive(layer, channel))["n"] == 0
        # The acknowledgement goes before anything the client sends next: room for exactly 1.
        await layer.send(channel, {"type": "fill", "n": 3})
        with pytest.raises(ChannelFull):
            await layer.send(channel, {"type": "fill", "n": 4})
        return [(await receive(layer, channel))["n"] for _ in range(3)]

    assert run(main()) == [1, 2, 3]


@pytest.mark.parametrize("kind", ["normal", "specific"])
def test_a_message_taken_by_a_receiver_that_then_does_nothing_still_makes_room(layer_factory, kind):
    sender, receiver = layer_factory(capacity=3), layer_factory(capacity=3)

    async def main():
        channel = "full-up" if kind == "normal" else await receiver.new_channel()
        for n in range(3):
            await sender.send(channel, {"type": "fill", "n": n})
        assert (await receive(receiver, channel))["n"] == 0
        # The receiver sends and waits for nothing more: its acknowledgement leaves on its own
        # (within ACK_DELAY), and then the other client finds room for exactly one message.
        deadline = asyncio.get_running_loop().time() + RECEIVE_SECONDS
        while True:
            try:
                await sender.send(channel, {"type": "fill", "n": 3})
                break
            except ChannelFull:
                assert asyncio.get_running_loop().time() < deadline, "the taken message never made room"
                await asyncio.sleep(0.01)
        with pytest.raises(ChannelFull):
            await sender.send(channel, {"type": "fill", "n": 4})
        return [(await receive(receiver, channel))["n"] for _ in range(3)]

    assert run(main()) == [1, 2, 3]


def test_channel_full_is_the_exception_of_channels(layer_factory):
    layer = layer_factory(capacity=1)

    async def main():
        await layer.send("tiny", {"type": "a"})
        try:
            await layer.send("tiny", {"type": "b"})
        except Exception as exc:  # noqa: BLE001 (the class is what is tested)
            return exc

    exc = run(main())
    assert type(exc) is ChannelFull


def test_capacity_counts_messages_from_every_sender(layer_factory):
    first, second = layer_factory(capacity=3), layer_factory(capacity=3)

    async def main():
        await first.send("shared-cap", {"type": "a"})
        await second.send("shared-cap", {"type": "b"})
        await first.send("shared-cap", {"type": "a"})
        with pytest.raises(ChannelFull):
            await second.send("shared-cap", {"type": "b"})
        with pytest.raises(ChannelFull):
            await first.send("shared-cap", {"type": "a"})
        return [(await receive(second, "shared-cap"))["type"] for _ in range(3)]

    assert run(main()) == ["a", "b", "a"]


def test_two_streaming_senders_fill_a_channel_exactly_to_its_capacity(layer_factory):
    first, second = layer_factory(capacity=20), layer_factory(capacity=20)

    async def main():
        for n in range(10):
            await first.send("two-senders", {"type": "a", "n": n})
            await second.send("two-senders", {"type": "b", "n": n})  # (recalls first's spare slots)
        with pytest.raises(ChannelFull):
            await first.send("two-senders", {"type": "a", "n": 10})

    run(main())


def test_channel_capacity_glob_pattern_sets_the_capacity_of_matching_channels(layer_factory):
    layer = layer_factory(capacity=5, channel_capacity={"http.*": 2})

    async def main():
        for _ in range(2):
            await layer.send("http.request", {"type": "h"})
        with pytest.raises(ChannelFull):
            await layer.send("http.request", {"type": "h"})
        for _ in range(5):
            await layer.send("other", {"type": "o"})
        with pytest.raises(ChannelFull):
            await layer.send("other", {"type": "o"})

    run(main())


def test_channel_capacity_regex_pattern_applies_to_process_specific_channels(layer_factory):
    layer = layer_factory(capacity=10, channel_capacity={re.compile(r"^specific\..+!.+"): 2})

    async def main():
        me = await layer.new_channel()
        await layer.send(me, {"type": "m"})
        await layer.send(me, {"type": "m"})
        with pytest.raises(ChannelFull):
            await layer.send(me, {"type": "m"})
        for _ in range(10):
            await layer.send("plain", {"type": "p"})  # does not match: default capacity

    run(main())


def test_the_first_matching_channel_capacity_pattern_wins(layer_factory):
    patterns = collections.OrderedDict([("narrow.one", 1), ("narrow.*", 3), (re.compile(r".*"), 50)])
    layer = layer_factory(capacity=100, channel_capacity=patterns)
    assert (layer.get_capacity("narrow.one"), layer.get_capacity("narrow.two"),
            layer.get_capacity("wide")) == (1, 3, 50)

    async def main():
        await layer.send("narrow.one", {"type": "x"})
        with pytest.raises(ChannelFull):
            await layer.send("narrow.one", {"type": "x"})
        for _ in range(3):
            await layer.send("narrow.two", {"type": "x"})
        with pytest.raises(ChannelFull):
            await layer.send("narrow.two", {"type": "x"})

    run(main())


def test_a_capacity_above_the_brokers_ceiling_is_refused(broker_factory):
    small = broker_factory(max_capacity=10)
    layer = BusChannelLayer(hosts=[small.url], capacity=11)
    with pytest.raises(LimitExceeded) as caught:
        run(layer.send("anything", {"type": "x"}))
    assert isinstance(caught.value, BusError) and caught.value.limit == 10


# -- names --------------------------------------------------------------------------------------

BAD_CHANNELS = ["", "has space", "ünïcode", "colon:name", "slash/name", "two!bang!s", "a" * 100,
                None, 42, b"bytes"]
BAD_GROUPS = ["", "has space", "bang!group", "ünïcode", "a" * 100, None, 42, b"bytes"]


@pytest.mark.parametrize("name", BAD_CHANNELS, ids=repr)
@pytest.mark.parametrize("operation", ["send", "receive", "group_add", "group_discard"])
def test_an_invalid_channel_name_raises_type_error(layer_factory, operation, name):
    layer = layer_factory()
    calls = {
        "send": lambda: layer.send(name, {"type": "x"}),
        "receive": lambda: layer.receive(name),
        "group_add": lambda: layer.group_add("valid-group", name),
        "group_discard": lambda: layer.group_discard("valid-group", name),
    }
    with pytest.raises(TypeError):
        run(calls[operation]())


@pytest.mark.parametrize("name", BAD_GROUPS, ids=repr)
@pytest.mark.parametrize("operation", ["group_add", "group_discard", "group_send"])
def test_an_invalid_group_name_raises_type_error(layer_factory, operation, name):
    layer = layer_factory()
    calls = {
        "group_add": lambda: layer.group_add(name, "valid-channel"),
        "group_discard": lambda: layer.group_discard(name, "valid-channel"),
        "group_send": lambda: layer.group_send(name, {"type": "x"}),
    }
    with pytest.raises(TypeError):
        run(calls[operation]())


def test_names_of_up_to_99_allowed_characters_are_accepted(layer_factory):
    layer = layer_factory()
    group = "Az09-_." + "g" * 92
    count = len(layer.hosts)  # (on several brokers a normal member must live with its group)
    channel = next(name for name in ("Az09-_." + "c" * 91 + last for last in "cdefghijklmnop")
                   if broker_of_channel(name, count) == broker_of_group(group, count))
    assert len(channel) == len(group) == 99

    async def main():
        await layer.send(channel, {"type": "long"})
        assert await receive(layer, channel) == {"type": "long"}
        await layer.group_add(group, channel)
        await layer.group_send(group, {"type": "long.group"})
        assert await receive(layer, channel) == {"type": "long.group"}
        await layer.group_discard(group, channel)

    run(main())


def test_the_layer_uses_the_name_rules_of_channels(layer_factory):
    layer = layer_factory()
    assert isinstance(layer, BaseChannelLayer)
    assert layer.MAX_NAME_LENGTH == 100
    assert layer.require_valid_channel_name("specific.abc!def")
    assert layer.require_valid_group_name("chat_42")


def test_names_the_layer_remembers_as_valid_let_no_invalid_name_through():
    layer = BusChannelLayer()  # (no connection is made until a call needs one)
    for _ in range(2):  # the second time from what the layer remembers
        assert layer.require_valid_channel_name("chat.1")
        assert layer.require_valid_channel_name("specific.abc!def")
    for bad in ("chat 1", "x" * 100, 7, ["chat.1"], "a!b!c"):
        with pytest.raises(TypeError):
            layer.require_valid_channel_name(bad)
    with pytest.raises(TypeError, match="must end at the !"):  # receive's own rule still applies
        layer.require_valid_channel_name("specific.abc!def", receive=True)


# -- extensions and configuration ---------------------------------------------------------------

def test_the_layer_declares_the_groups_and_flush_extensions(layer_factory):
    layer = layer_factory()
    assert "groups" in layer.extensions and "flush" in layer.extensions
    for method in ("group_add", "group_discard", "group_send", "flush"):
        assert asyncio.iscoroutinefunction(getattr(layer, method))


def test_the_defaults_are_those_of_channels_redis():
    layer = BusChannelLayer()
    assert (layer.hosts, layer.capacity, layer.expiry, layer.group_expiry, layer.prefix) == (
        ["tcp://127.0.0.1:5555"], 100, 60, 86400, "")
    assert layer.get_capacity("anything") == 100


def test_hosts_may_be_a_single_url_string(broker):
    layer = BusChannelLayer(hosts=broker.url)
    assert layer.hosts == [broker.url]

    async def main():
        await layer.send("by-string", {"type": "x"})
        return await receive(layer, "by-string")

    assert run(main()) == {"type": "x"}


@pytest.mark.parametrize("config, error", [
    ({"hosts": ["tcp://127.0.0.1:1", "tcp://127.0.0.1:1"]}, ValueError),  # (a broker twice)
    ({"no_such_key": 1}, TypeError),
    ({"channel_capacity": {"http.*": 0}}, ValueError),
    ({"channel_capacity": {42: 5}}, TypeError),
    ({"capacity": 0}, ValueError),
])
def test_a_bad_config_fails_when_the_layer_is_built_or_first_used(config, error):
    with pytest.raises(error):
        layer = BusChannelLayer(**config)
        run(layer.send("x", {"type": "x"}))


def test_a_prefix_keeps_two_projects_apart_on_one_broker(layer_factory, broker):
    one, two = layer_factory(prefix="one"), layer_factory(prefix="two")

    async def main():
        await one.send("jobs", {"type": "job", "project": "one"})
        await two.send("jobs", {"type": "job", "project": "two"})
        with Client(one.hosts) as bus:  # (on every broker of the layer)
            assert {"one.jobs", "two.jobs"} <= {row[0] for row in bus.stats(100)["top_channels"]}
        first, second = await one.new_channel(), await two.new_channel()
        await one.group_add("room", first)
        await two.group_add("room", second)
        await one.group_send("room", {"type": "hi", "project": "one"})
        got = (await receive(one, "jobs"), await receive(two, "jobs"), await receive(one, first))
        await nothing_on(two, second)
        await nothing_on(one, "jobs")
        return got

    assert run(main()) == ({"type": "job", "project": "one"}, {"type": "job", "project": "two"},
                           {"type": "hi", "project": "one"})


def test_a_prefixed_layer_keeps_a_regexs_inline_flags_and_anchor():
    layer = BusChannelLayer(prefix="proj", capacity=5, channel_capacity={
        re.compile(r"(?i)^ws\."): 2, re.compile(r"\Ahttp", re.IGNORECASE): 3})
    wire = {p.pattern: (p, c) for p, c in layer._wire_channel_capacity.items()}
    (ws, ws_cap), (http, http_cap) = wire.values()
    assert ws.match("proj.WS.x") and (ws_cap, http_cap) == (2, 3)
    assert http.match("proj.HTTP.request") and not http.match("proj.x.http")
    assert (layer.get_capacity("WS.x"), layer.get_capacity("Http.x"), layer.get_capacity("z")) == (2, 3, 5)


def test_channel_capacity_patterns_match_the_name_without_the_prefix(layer_factory):
    layer = layer_factory(prefix="proj", capacity=5,
                          channel_capacity={"http.*": 1, re.compile(r"^ws\..+"): 2})
    assert (layer.get_capacity("http.x"), layer.get_capacity("ws.y"), layer.get_capacity("z")) == (1, 2, 5)

    async def main():
        await layer.send("http.x", {"type": "x"})
        with pytest.raises(ChannelFull):
            await layer.send("http.x", {"type": "x"})
        await layer.send("ws.y", {"type": "y"})
        await layer.send("ws.y", {"type": "y"})
        with pytest.raises(ChannelFull):
            await layer.send("ws.y", {"type": "y"})

    run(main())
