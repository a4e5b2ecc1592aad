"""BusChannelLayer against the layer specification: the ``groups`` extension (add, discard, send,
overflow), expiry of messages and of group memberships, and the ``flush`` extension. A real
broker in a thread (conftest.py ``broker``)."""

from __future__ import annotations

import asyncio
import re

import pytest
from channels.exceptions import ChannelFull

from layer_helpers import drain, layer_factory, nothing_on, receive, run, settle  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(60)


# -- groups -------------------------------------------------------------------------------------

def test_group_send_reaches_every_member_once_normal_and_process_specific(layer_factory):
    layer, other = layer_factory(), layer_factory()

    async def main():
        members = ["member-a", "member-b", await layer.new_channel(), await other.new_channel()]
        for channel in members:
            await layer.group_add("everyone", channel)
        await layer.group_send("everyone", {"type": "news", "n": 1})
        got = {}
        for channel in members:
            owner = other if channel == members[3] else layer
            got[channel] = await drain(owner, channel)
        return members, got

    members, got = run(main())
    assert got == {channel: [{"type": "news", "n": 1}] for channel in members}


def test_group_messages_arrive_in_the_order_they_were_sent(layer_factory):
    layer = layer_factory()

    async def main():
        me = await layer.new_channel()
        await layer.group_add("ordered-group", me)
        await layer.group_add("ordered-group", "ordered-normal")
        for n in range(30):
            await layer.group_send("ordered-group", {"type": "seq", "n": n})
        return ([(await receive(layer, me))["n"] for _ in range(30)],
                [(await receive(layer, "ordered-normal"))["n"] for _ in range(30)])

    specific, normal = run(main())
    assert specific == normal == list(range(30))


def test_group_add_is_effective_as_soon_as_it_returns(layer_factory):
    member, sender = layer_factory(), layer_factory()

    async def main():
        lost = 0
        for n in range(20):  # a fresh group and channel each time: no subscription to reuse
            me = await member.new_channel()
            await member.group_add(f"fresh-{n}", me)
            await sender.group_send(f"fresh-{n}", {"type": "first", "n": n})
            try:
                assert (await asyncio.wait_for(member.receive(me), 5))["n"] == n
            except asyncio.TimeoutError:
                lost += 1
        return lost

    assert run(main()) == 0


def test_adding_a_channel_twice_delivers_each_group_message_once(layer_factory):
    layer = layer_factory()

    async def main():
        me = await layer.new_channel()
        for channel in (me, "twice-normal"):
            await layer.group_add("twice", channel)
            await layer.group_add("twice", channel)
        await layer.group_send("twice", {"type": "once"})
        return await drain(layer, me), await drain(layer, "twice-normal")

    assert run(main()) == ([{"type": "once"}], [{"type": "once"}])


def test_a_discarded_channel_gets_no_more_group_messages(layer_factory):
    layer = layer_factory()

    async def main():
        stay, leave = await layer.new_channel(), await layer.new_channel()
        for channel in (stay, leave, "leave-normal"):
            await layer.group_add("club", channel)
        await layer.group_discard("club", leave)
        await layer.group_discard("club", "leave-normal")
        await layer.group_send("club", {"type": "members.only"})
        assert await receive(layer, stay) == {"type": "members.only"}
        await nothing_on(layer, leave)
        await nothing_on(layer, "leave-normal")

    run(main())


def test_discarding_a_channel_that_is_not_a_member_is_not_an_error(layer_factory):
    layer = layer_factory()

    async def main():
        await layer.group_discard("never-joined", "nobody")
        await layer.group_discard("never-joined", await layer.new_channel())

    run(main())


def test_group_send_to_a_group_without_members_does_nothing(layer_factory):
    run(layer_factory().group_send("empty-group", {"type": "into.the.void"}))


def test_groups_whose_names_share_a_prefix_stay_apart(layer_factory):
    layer = layer_factory()

    async def main():
        one, ten = await layer.new_channel(), await layer.new_channel()
        await layer.group_add("room1", one)
        await layer.group_add("room10", ten)
        await layer.group_send("room10", {"type": "for.ten"})
        await layer.group_send("room1", {"type": "for.one"})
        return await drain(layer, one), await drain(layer, ten)

    assert run(main()) == ([{"type": "for.one"}], [{"type": "for.ten"}])


def test_a_channel_in_two_groups_gets_the_messages_of_both(layer_factory):
    layer = layer_factory()

    async def main():
        me = await layer.new_channel()
        await layer.group_add("first-group", me)
        await layer.group_add("second-group", me)
        await layer.group_send("first-group", {"type": "g", "from": 1})
        await layer.group_send("second-group", {"type": "g", "from": 2})
        await layer.group_discard("first-group", me)
        await layer.group_send("first-group", {"type": "g", "from": 3})
        await layer.group_send("second-group", {"type": "g", "from": 4})
        return [m["from"] for m in await drain(layer, me)]

    assert run(main()) == [1, 2, 4]


@pytest.mark.parametrize("kind", ["normal", "specific"])
def test_group_send_skips_a_full_member_and_still_reaches_the_others(layer_factory, kind):
    layer = layer_factory(capacity=2)

    async def main():
        if kind == "normal":
            full, roomy = "full-member", "roomy-member"
        else:
            full, roomy = await layer.new_channel(), await layer.new_channel()
        for channel in (full, roomy):
            await layer.group_add("overflow", channel)
        await layer.send(full, {"type": "direct", "n": 0})
        await layer.send(full, {"type": "direct", "n": 1})
        with pytest.raises(ChannelFull):
            await layer.send(full, {"type": "direct", "n": 2})
        await layer.group_send("overflow", {"type": "group"})  # never raises
        await settle(layer)
        return await drain(layer, full), await drain(layer, roomy)

    full, roomy = run(main())
    assert full == [{"type": "direct", "n": 0}, {"type": "direct", "n": 1}]
    assert roomy == [{"type": "group"}]


def test_group_send_to_a_group_whose_members_are_all_full_does_not_raise(layer_factory):
    layer = layer_factory(capacity=1)

    async def main():
        me = await layer.new_channel()
        for channel in (me, "all-full"):
            await layer.group_add("stuffed", channel)
            await layer.send(channel, {"type": "filler"})
        for _ in range(5):
            await layer.group_send("stuffed", {"type": "overflow"})
        await settle(layer)
        return await drain(layer, me), await drain(layer, "all-full")

    assert run(main()) == ([{"type": "filler"}], [{"type": "filler"}])


def test_group_send_fills_each_member_up_to_its_capacity(layer_factory):
    layer = layer_factory(capacity=3, channel_capacity={"tight*": 1, re.compile(r"^specific\."): 2})

    async def main():
        me = await layer.new_channel()
        for channel in ("tight-member", "loose-member", me):
            await layer.group_add("capacities", channel)
        for n in range(5):
            await layer.group_send("capacities", {"type": "g", "n": n})
        await settle(layer)
        return [[m["n"] for m in await drain(layer, channel)] for channel in ("tight-member", "loose-member", me)]

    assert run(main()) == [[0], [0, 1, 2], [0, 1]]


# -- expiry -------------------------------------------------------------------------------------

EXPIRY = 0.5  # seconds; tests wait EXPIRY + MARGIN for something to expire
MARGIN = 0.4


@pytest.mark.parametrize("kind", ["normal", "specific"])
def test_a_message_not_received_within_expiry_is_never_delivered(layer_factory, kind):
    layer = layer_factory(expiry=EXPIRY)

    async def main():
        channel = "perishable" if kind == "normal" else await layer.new_channel()
        await layer.send(channel, {"type": "old"})
        await asyncio.sleep(EXPIRY + MARGIN)
        await layer.send(channel, {"type": "fresh"})
        return await drain(layer, channel)

    assert run(main()) == [{"type": "fresh"}]


def test_a_message_received_before_its_expiry_is_delivered(layer_factory):
    layer = layer_factory(expiry=2.0)

    async def main():
        await layer.send("keeps", {"type": "in.time"})
        await asyncio.sleep(0.5)
        return await receive(layer, "keeps")

    assert run(main()) == {"type": "in.time"}


def test_expired_messages_make_room_in_a_full_channel(layer_factory):
    layer = layer_factory(expiry=EXPIRY, capacity=2)

    async def main():
        await layer.send("fills-up", {"type": "old"})
        await layer.send("fills-up", {"type": "old"})
        with pytest.raises(ChannelFull):
            await layer.send("fills-up", {"type": "old"})
        await asyncio.sleep(EXPIRY + MARGIN)
        await layer.send("fills-up", {"type": "new"})
        await layer.send("fills-up", {"type": "new"})
        return await drain(layer, "fills-up")

    assert run(main()) == [{"type": "new"}, {"type": "new"}]


@pytest.mark.parametrize("kind", ["normal", "specific"])
def test_a_group_message_expires_like_any_other(layer_factory, kind):
    layer = layer_factory(expiry=EXPIRY)

    async def main():
        channel = "group-perishable" if kind == "normal" else await layer.new_channel()
        await layer.group_add("perishing", channel)
        await layer.group_send("perishing", {"type": "old"})
        await asyncio.sleep(EXPIRY + MARGIN)
        await layer.group_send("perishing", {"type": "fresh"})
        return await drain(layer, channel)

    assert run(main()) == [{"type": "fresh"}]


GROUP_EXPIRY = 1.0


@pytest.mark.parametrize("kind", ["normal", "specific"])
def test_a_group_membership_ends_after_group_expiry(layer_factory, kind):
    layer = layer_factory(group_expiry=GROUP_EXPIRY)

    async def main():
        channel = "fleeting-member" if kind == "normal" else await layer.new_channel()
        await layer.group_add("fleeting", channel)
        await layer.group_send("fleeting", {"type": "while.member"})
        assert await receive(layer, channel) == {"type": "while.member"}
        await asyncio.sleep(GROUP_EXPIRY + MARGIN)
        await layer.group_send("fleeting", {"type": "after.expiry"})
        await nothing_on(layer, channel)

    run(main())


def test_adding_a_member_again_renews_its_membership(layer_factory):
    group_expiry = 1.5
    layer = layer_factory(group_expiry=group_expiry)

    async def main():
        me = await layer.new_channel()
        await layer.group_add("renewed", me)
        await layer.group_add("renewed", "renewed-normal")
        await asyncio.sleep(group_expiry * 0.5)
        await layer.group_add("renewed", me)
        await layer.group_add("renewed", "renewed-normal")
        await asyncio.sleep(group_expiry * 0.7)  # past the first expiry, well before the second
        await layer.group_send("renewed", {"type": "still.here"})
        return await drain(layer, me), await drain(layer, "renewed-normal")

    assert run(main()) == ([{"type": "still.here"}], [{"type": "still.here"}])


# -- flush --------------------------------------------------------------------------------------

def test_flush_drops_every_queued_message_and_group_membership(layer_factory):
    layer, other = layer_factory(), layer_factory()

    async def main():
        mine = await layer.new_channel()
        for channel in ("flushed-normal", mine):
            await layer.send(channel, {"type": "before.flush"})
            await layer.group_add("flushed-group", channel)
        await other.flush()
        await layer.group_send("flushed-group", {"type": "after.flush"})
        for channel in ("flushed-normal", mine):
            await nothing_on(layer, channel)
        # Everything works as before afterwards.
        await layer.send("flushed-normal", {"type": "new"})
        await layer.group_add("flushed-group", mine)
        await layer.group_send("flushed-group", {"type": "new.group"})
        return await drain(layer, "flushed-normal"), await drain(layer, mine)

    assert run(main()) == ([{"type": "new"}], [{"type": "new.group"}])


def test_flush_empties_a_full_channel(layer_factory):
    layer = layer_factory(capacity=1)

    async def main():
        await layer.send("flush-full", {"type": "x"})
        with pytest.raises(ChannelFull):
            await layer.send("flush-full", {"type": "x"})
        await layer.flush()
        await layer.send("flush-full", {"type": "y"})
        return await drain(layer, "flush-full")

    assert run(main()) == [{"type": "y"}]


def test_group_send_skips_a_member_at_capacity_when_it_is_sent(layer_factory):
    """channels_redis's test_group_send_capacity: three group messages fill the member, the
    fourth is skipped, even though the receives come after all four sends."""
    layer = layer_factory(capacity=3)

    async def main():
        channel = await layer.new_channel()
        await layer.group_add("test-group", channel)
        for n in range(4):
            await layer.group_send("test-group", {"type": "message.1", "n": n})
        got = [await receive(layer, channel) for _ in range(3)]
        await nothing_on(layer, channel, 1.0)
        return got

    assert run(main()) == [{"type": "message.1", "n": n} for n in range(3)]


def test_a_member_that_gave_up_a_message_before_the_next_group_send_has_room_again(layer_factory):
    """Depth is counted at the moment of sending: a message taken before it leaves room."""
    layer = layer_factory(capacity=3)

    async def main():
        channel = await layer.new_channel()
        await layer.group_add("room", channel)
        for n in range(3):
            await layer.group_send("room", {"type": "m", "n": n})
        first = await receive(layer, channel)  # (depth 2 from here on)
        await layer.group_send("room", {"type": "m", "n": 3})
        await layer.group_send("room", {"type": "m", "n": 4})  # (depth 3 when sent: skipped)
        rest = [await receive(layer, channel) for _ in range(3)]
        await nothing_on(layer, channel, 1.0)
        return [first, *rest]

    assert run(main()) == [{"type": "m", "n": n} for n in range(4)]
