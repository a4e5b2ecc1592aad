"""Channels across real processes: ordering, work-queue delivery, waiting, expiry, capacity.

Each test runs a real broker (a thread of pytest or the ``channelbus broker`` process) and puts
the clients whose behaviour is about processes in spawned processes (``bus_workers``).
"""

from __future__ import annotations

import asyncio
import queue
import re
import time

import pytest

import bus_workers as w
from clients import AsyncClient, ChannelFull, Client, ReceiveTimeout

COUNT = 10_000


def assert_exact_sequence(got: list, extra: list, count: int) -> None:
    assert len(got) == count
    assert got == list(range(count)), f"first out of order at index {next(i for i, n in enumerate(got) if n != i)}"
    assert extra == [], f"{len(extra)} messages after the last one (duplicates?)"


@pytest.mark.timeout(90)
def test_ten_thousand_messages_arrive_in_order_between_processes(broker_process, procs):
    ready = procs.event()
    receiver = procs.start(w.receive_sequence, broker_process.url, "seq", COUNT, ready)
    assert ready.wait(30)
    sender = procs.start(w.send_sequence, broker_process.url, "seq", COUNT)
    got, extra = receiver.result(timeout=80)
    sender.result(timeout=10)
    assert_exact_sequence(got, extra, COUNT)


@pytest.mark.timeout(90)
def test_ten_thousand_messages_arrive_in_order_between_async_clients(broker, procs):
    ready = procs.event()
    receiver = procs.start(w.async_receive_sequence, broker.url, "aseq", COUNT, ready)
    assert ready.wait(30)
    sender = procs.start(w.async_send_sequence, broker.url, "aseq", COUNT)
    got, extra = receiver.result(timeout=80)
    sender.result(timeout=10)
    assert_exact_sequence(got, extra, COUNT)


@pytest.mark.timeout(60)
def test_sender_meets_channel_full_until_the_receiver_catches_up(broker, procs):
    # Capacity 100 and 300 messages: the sending process must hit ChannelFull and retry, and
    # every message still arrives exactly once, in order.
    full = procs.event()
    sender = procs.start(w.send_sequence, broker.url, "backlog", 300, full)
    assert full.wait(30), "the sender never met ChannelFull"
    with Client(broker.url) as bus:
        got = [bus.receive("backlog", timeout=20)["n"] for _ in range(300)]
        assert got == list(range(300))
        assert w.leftovers(bus, "backlog") == []
    assert sender.result(timeout=20) > 0, "the sender never met ChannelFull"


@pytest.mark.timeout(60)
def test_two_receiving_processes_share_a_channel_each_message_once(broker, procs):
    total = 2_000
    out, stop = procs.queue(), procs.event()
    readies = [procs.event(), procs.event()]
    receivers = [procs.start(w.compete, broker.url, "work", ready, stop, out) for ready in readies]
    for ready in readies:
        assert ready.wait(30)
    sender = procs.start(w.send_sequence, broker.url, "work", total)

    batches: list[list[int]] = []
    seen: set[int] = set()
    deadline = time.monotonic() + 40
    while len(seen) < total and time.monotonic() < deadline:
        try:
            batch = out.get(timeout=0.5)
        except queue.Empty:
            continue
        batches.append(batch)
        seen.update(batch)
    stop.set()
    counts = [r.result(timeout=20) for r in receivers]
    sender.result(timeout=10)
    while sum(len(b) for b in batches) < sum(counts):
        batches.append(out.get(timeout=10))

    received = [n for batch in batches for n in batch]
    assert sorted(received) == list(range(total)), "lost or duplicated messages"
    assert all(count > 0 for count in counts), f"one receiver got nothing: {counts}"


@pytest.mark.timeout(60)
def test_message_sent_before_any_receiver_exists_is_delivered_later(broker, procs):
    procs.start(w.send_once, broker.url, "early", {"type": "early", "payload": b"\x00\xff"}).result(30)
    message = procs.start(w.receive_one, broker.url, "early", 10).result(30)
    assert message == {"type": "early", "payload": b"\x00\xff"}


@pytest.mark.timeout(60)
def test_message_older_than_its_expiry_is_never_delivered(broker, procs):
    procs.start(w.send_once, broker.url, "stale", {"type": "old"}, expiry=0.3).result(30)
    time.sleep(0.6)  # let the message outlive its expiry: the thing under test is time itself
    with Client(broker.url) as bus:
        bus.send("stale", {"type": "fresh"})
        assert bus.receive("stale", timeout=5) == {"type": "fresh"}
        with pytest.raises(ReceiveTimeout):
            bus.receive("stale", timeout=0.2)


@pytest.mark.timeout(30)
def test_message_that_expires_unread_in_the_receivers_socket_is_never_returned(broker):
    with Client(broker.url) as receiver, Client(broker.url, expiry=0.3) as sender:
        w.prime(receiver, "pushed")  # the broker pushes at once into the receiver's process
        sender.send("pushed", {"type": "old"})
        time.sleep(0.6)  # the receiver does not read meanwhile, as while a worker is busy
        sender.send("pushed", {"type": "new"})
        assert receiver.receive("pushed", timeout=5) == {"type": "new"}


@pytest.mark.timeout(30)
def test_message_that_expires_in_an_async_receivers_queue_is_never_returned(broker):
    async def main():
        async with AsyncClient(broker.url) as receiver, AsyncClient(broker.url, expiry=0.3) as sender:
            with pytest.raises(ReceiveTimeout):
                await receiver.receive("apushed", timeout=0.01)  # grants credit: pushes come now
            await receiver.ping()
            await sender.send("apushed", {"type": "old"})
            await asyncio.sleep(0.6)
            await sender.send("apushed", {"type": "new"})
            assert await receiver.receive("apushed", timeout=5) == {"type": "new"}

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_fourth_send_to_a_channel_of_capacity_three_raises_channel_full(broker):
    with Client(broker.url, capacity=3) as bus:
        for i in range(3):
            bus.send("small", {"type": "m", "i": i})
        with pytest.raises(ChannelFull) as caught:
            bus.send("small", {"type": "m", "i": 3})
        assert caught.value.capacity == 3
        assert caught.value.channel == "small"
        assert "small" in str(caught.value) and "3" in str(caught.value)
        assert [bus.receive("small", timeout=5)["i"] for _ in range(3)] == [0, 1, 2]
        bus.send("small", {"type": "m", "i": 4})  # room again once consumed


@pytest.mark.timeout(30)
def test_channel_capacity_glob_and_regex_override_the_default(broker):
    settings = {"big*": 10, re.compile(r"^huge\.\d+$"): 5}
    with Client(broker.url, capacity=3, channel_capacity=settings) as bus:
        for name, capacity in (("bigone", 10), ("huge.7", 5), ("other", 3), ("huge.x", 3)):
            for i in range(capacity):
                bus.send(name, {"type": "m", "i": i})
            with pytest.raises(ChannelFull) as caught:
                bus.send(name, {"type": "m"})
            assert (caught.value.channel, caught.value.capacity) == (name, capacity)


@pytest.mark.timeout(60)
def test_a_blocking_client_idle_on_reserved_slots_does_not_make_the_channel_look_full(broker, procs):
    # The holder reserved slots with its second send and then makes no call, so it cannot
    # answer the broker's RECALL; after the recall timeout its slots are revoked, and the
    # channel takes messages up to its real capacity.
    sent, go = procs.event(), procs.event()
    holder = procs.start(w.idle_holder, broker.url, "q", 10, sent, go)
    assert sent.wait(30)
    accepted = 0
    with Client(broker.url, capacity=10) as bus:
        assert bus.stats()["reserved"] == 4  # half the room left by its two messages
        while accepted < 20:
            try:
                bus.send("q", {"type": "m", "i": accepted})
            except ChannelFull:
                break
            accepted += 1
        assert accepted == 8  # 10 minus the holder's two queued messages
        go.set()
        assert holder.result(timeout=30) == "full"  # it read the RECALL and sent without slots
        got = [bus.receive("q", timeout=5)["type"] for _ in range(10)]
        assert got.count("held") == 2 and got.count("m") == 8
        with pytest.raises(ReceiveTimeout):
            bus.receive("q", timeout=0.3)
    assert broker.stats["revoked"] == 4


@pytest.mark.timeout(60)
def test_new_channel_of_one_process_receives_what_another_sends(broker, procs):
    names = procs.queue()
    owner = procs.start(w.own_channel, broker.url, names, 3)
    channel = names.get(timeout=30)
    assert "!" in channel
    with Client(broker.url) as bus:
        for i in range(3):
            bus.send(channel, {"type": "direct", "i": i})
        with pytest.raises(Exception, match="belongs to client"):
            bus.receive(channel, timeout=0.1)
    got_channel, messages = owner.result(timeout=30)
    assert got_channel == channel
    assert [m["i"] for m in messages] == [0, 1, 2]


@pytest.mark.timeout(30)
def test_flush_empties_every_inbox_and_group(broker):
    with Client(broker.url) as bus, Client(broker.url) as other:
        for name in ("a", "b", "c"):
            bus.send(name, {"type": "m", "name": name})
        mine = other.new_channel()
        other.group_add("flushed", mine)
        bus.group_add("flushed", "normal-member")
        bus.flush()
        for name in ("a", "b", "c"):
            with pytest.raises(ReceiveTimeout):
                bus.receive(name, timeout=0.2)
        assert bus.group_send("flushed", {"type": "after"}) == {"queued": 0, "full": 0}
        with pytest.raises(ReceiveTimeout):
            other.receive(mine, timeout=0.3)
        with pytest.raises(ReceiveTimeout):
            bus.receive("normal-member", timeout=0.2)
        bus.send("a", {"type": "again"})  # the broker is usable after a flush
        assert bus.receive("a", timeout=5) == {"type": "again"}
