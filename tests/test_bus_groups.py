"""Groups across real processes: fan-out exactly once per member, topic isolation, discard,
joining without slow-joiner loss, full members, membership expiry."""

from __future__ import annotations

import time

import pytest

import bus_workers as w
from clients import Client, InvalidName, ReceiveTimeout

ROUNDS = 200


@pytest.mark.timeout(90)
def test_group_of_100_channels_in_two_processes_gets_each_message_once_per_member(broker, procs):
    ready = procs.queue()
    members = [procs.start(w.group_members, broker.url, "crowd", 50, ready) for _ in range(2)]
    channels = ready.get(timeout=60) + ready.get(timeout=60)
    assert len(set(channels)) == 100
    with Client(broker.url) as bus:
        for i in range(20):
            bus.group_send("crowd", {"type": "crowd.message", "i": i})
        bus.group_send("crowd", {"type": "end"})
    received = {**members[0].result(60), **members[1].result(60)}
    assert sorted(received) == sorted(channels)
    for channel, seen in received.items():
        assert seen == list(range(20)), f"{channel} received {seen}"


@pytest.mark.timeout(30)
def test_group_topics_do_not_prefix_match(broker):
    with Client(broker.url) as member, Client(broker.url) as sender:
        in_room1, in_room10 = member.new_channel(), member.new_channel()
        member.group_add("room1", in_room1)
        member.group_add("room10", in_room10)
        sender.group_send("room10", {"type": "m", "room": "room10"})
        sender.group_send("room1", {"type": "m", "room": "room1"})
        assert member.receive(in_room10, timeout=5)["room"] == "room10"
        assert member.receive(in_room1, timeout=5)["room"] == "room1"
        with pytest.raises(ReceiveTimeout):
            member.receive(in_room1, timeout=0.2)
        with pytest.raises(ReceiveTimeout):
            member.receive(in_room10, timeout=0.2)


@pytest.mark.timeout(30)
def test_group_discard_stops_delivery(broker):
    with Client(broker.url) as member, Client(broker.url) as sender:
        mine, kept = member.new_channel(), member.new_channel()
        member.group_add("club", mine)
        member.group_add("club", kept)
        member.group_add("club", "club-inbox")  # a normal channel member, held in the broker
        sender.group_send("club", {"type": "m", "i": 1})
        assert member.receive(mine, timeout=5)["i"] == 1
        assert member.receive("club-inbox", timeout=5)["i"] == 1
        member.group_discard("club", mine)
        member.group_discard("club", "club-inbox")
        member.group_discard("club", "never-a-member")  # not an error
        assert sender.group_send("club", {"type": "m", "i": 2}) == {"queued": 0, "full": 0}
        # The remaining member gets both messages; its 2nd proves the 2nd has been published.
        assert [member.receive(kept, timeout=5)["i"] for _ in range(2)] == [1, 2]
        with pytest.raises(ReceiveTimeout):
            member.receive(mine, timeout=0.2)
        with pytest.raises(ReceiveTimeout):
            member.receive("club-inbox", timeout=0.2)


@pytest.mark.timeout(90)
def test_group_send_right_after_group_add_in_another_process_is_never_lost(broker, procs):
    requests = procs.queue()
    sender = procs.start(w.race_sender, broker.url, requests)
    member = procs.start(w.race_member, broker.url, ROUNDS, requests)
    assert member.result(timeout=80) == [], "rounds whose group message was lost"
    assert sender.result(timeout=10) == ROUNDS


@pytest.mark.timeout(60)
def test_group_send_right_after_another_process_adds_my_channel_is_never_lost(broker, procs):
    # Process A adds process B's channel; once A's group_add returns, A's group_send must reach
    # B (DESIGN.md section 3: no slow-joiner loss once group_add has returned).
    names = procs.queue()
    target = procs.start(w.join_target, broker.url, names, 20, 2.0)
    channel = names.get(timeout=30)
    with Client(broker.url) as bus:
        for i in range(20):
            bus.group_add(f"joined{i}", channel)
            bus.group_send(f"joined{i}", {"type": "m", "i": i})
    got = target.result(timeout=60)
    assert [m["i"] for m in got] == list(range(20))


@pytest.mark.timeout(30)
def test_full_member_is_skipped_without_an_error(broker):
    with Client(broker.url) as member, \
            Client(broker.url, capacity=2, channel_capacity={"roomy.*": 10}) as sender:
        small, roomy = member.new_channel(), member.new_channel("roomy")
        member.group_add("busy", small)
        member.group_add("busy", roomy)
        member.group_add("busy", "busy-inbox")  # a normal channel: its inbox is in the broker
        replies = [sender.group_send("busy", {"type": "m", "i": i}) for i in range(3)]
        assert replies == [{"queued": 1, "full": 0}] * 2 + [{"queued": 0, "full": 1}]
        # Process-specific members are bounded in their own process by the sender's settings.
        assert [member.receive(roomy, timeout=5)["i"] for _ in range(3)] == [0, 1, 2]
        assert [member.receive(small, timeout=5)["i"] for _ in range(2)] == [0, 1]
        assert [member.receive("busy-inbox", timeout=5)["i"] for _ in range(2)] == [0, 1]
        for channel in (small, "busy-inbox"):
            with pytest.raises(ReceiveTimeout):
                member.receive(channel, timeout=0.2)


@pytest.mark.timeout(30)
def test_expired_membership_stops_receiving(broker):
    with Client(broker.url, group_expiry=1) as member, Client(broker.url) as sender:
        mine = member.new_channel()
        member.group_add("brief", mine)
        member.group_add("brief", "brief-inbox")
        sender.group_send("brief", {"type": "m", "i": 1})
        assert member.receive(mine, timeout=5)["i"] == 1
        assert member.receive("brief-inbox", timeout=5)["i"] == 1
        time.sleep(1.2)  # outlive the membership: the thing under test is time itself
        assert sender.group_send("brief", {"type": "m", "i": 2}) == {"queued": 0, "full": 0}
        with pytest.raises(ReceiveTimeout):
            member.receive(mine, timeout=0.3)
        with pytest.raises(ReceiveTimeout):
            member.receive("brief-inbox", timeout=0.2)


@pytest.mark.timeout(30)
def test_a_blocking_group_send_without_waiting_reaches_every_member_in_order(broker):
    with Client(broker.url) as member, Client(broker.url) as sender:
        mine = member.new_channel()
        member.group_add("room", mine)
        member.group_add("room", "inbox.room")
        for n in range(50):
            assert sender.group_send("room", {"type": "g", "n": n}, wait=False) is None
        assert [member.receive(mine, timeout=5)["n"] for _ in range(50)] == list(range(50))
        assert [member.receive("inbox.room", timeout=5)["n"] for _ in range(50)] == list(range(50))
        with pytest.raises(InvalidName):  # checked here: no reply would carry the refusal
            sender.group_send("bad group", {"type": "g"}, wait=False)
