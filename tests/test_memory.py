"""Bounded memory: the global ceiling, a flood to channels nobody reads, idle channels.

- The ceiling (``max_memory``) counts every message the broker holds (queued or in flight,
  body plus 64 bytes); a SEND past it is refused with error code ``memory`` (BrokerError), and
  sends are accepted again as soon as messages are consumed or expire.
- A flood of 300,000 messages to channels nobody reads, against a broker process with an 8 MiB
  ceiling and a capacity far above it: every one is answered, about 53,000 accepted and the rest
  refused with ``memory``, and the broker's resident memory stays flat once the ceiling is
  reached. (``benchmarks/memory_flood.py`` runs the same flood with 1,000,000 messages, about 40 s
  here: too long for the suite.)
- Channels that were used and drained leave nothing behind: 100,000 process-specific channels,
  each sent one message that was received, leave no inbox and no per-channel entry anywhere in
  the router; normal channels leave nothing once their receiver has gone.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
import time

import msgpack
import pytest

from clients import AsyncClient, BrokerError, Client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERHEAD = 64  # bytes the broker counts per message on top of its body (delivery.ITEM_OVERHEAD)
MESSAGE = {"type": "job", "pad": b"x" * 1000}
SIZE = len(msgpack.packb(MESSAGE, use_bin_type=True)) + OVERHEAD
CEILING = 64 * 1024


def fill(bus: Client, channel: str) -> tuple[int, BrokerError]:
    """Send MESSAGE until the broker refuses one with ``memory``; return how many it took."""
    for accepted in range(10_000):
        try:
            bus.send(channel, MESSAGE)
        except BrokerError as refused:
            assert refused.code == "memory", refused
            return accepted, refused
    raise AssertionError("the broker never refused a send for memory")


def held(bus: Client) -> int:
    return bus.stats()["bytes_held"]


def stop_broker_thread(server) -> None:
    """Stop the broker and wait for its thread, so its router can be read from this one."""
    server.stop()
    for thread in threading.enumerate():
        if thread.name == "channelbus-broker":
            thread.join(5)
            assert not thread.is_alive()


# -- the ceiling --------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_sends_past_max_memory_are_refused_with_code_memory_and_accepted_again_once_consumed(broker_factory):
    broker = broker_factory(max_memory=CEILING)
    with Client(broker.url) as sender, Client(broker.url) as receiver:
        accepted, refused = fill(sender, "jobs")
        assert accepted == CEILING // SIZE  # exactly as many as fit
        assert (refused.limit, refused.size) == (CEILING, accepted * SIZE)
        assert "max-memory" in str(refused)
        assert held(sender) == accepted * SIZE
        with pytest.raises(BrokerError) as again:  # other channels are refused too
            sender.send("other", MESSAGE)
        assert again.value.code == "memory"

        for _ in range(5):
            assert receiver.receive("jobs", timeout=5) == MESSAGE
        receiver.ping()  # (its ACKs have reached the broker)
        for _ in range(5):
            sender.send("other", MESSAGE)  # room for exactly the five consumed
        with pytest.raises(BrokerError):
            sender.send("other", MESSAGE)
        assert held(sender) == accepted * SIZE


@pytest.mark.timeout(30)
def test_memory_held_by_expired_messages_is_given_back(broker_factory):
    broker = broker_factory(max_memory=CEILING)
    with Client(broker.url, expiry=0.5) as sender, Client(broker.url, expiry=0.5) as probe:
        started = time.monotonic()  # (the broker thread shares this clock)
        accepted, _ = fill(sender, "jobs")
        while True:  # refused until the broker drops them, about 0.5 s after they were sent
            try:  # (a client with no reserved slots: its sends meet the ceiling)
                probe.send("jobs", MESSAGE)
                break
            except BrokerError as refused:
                assert refused.code == "memory"
                assert time.monotonic() - started < 5, "expired messages still count after 5 s"
                time.sleep(0.01)
        # Not before the first of them could expire: it was sent after ``started``. (Measured
        # from the end of fill(), which a loaded host can stretch, this bound was flaky.)
        assert time.monotonic() - started >= 0.49
        stats = sender.stats()  # (one reply: the counter and the bytes held are of one instant)
        expired = stats["counters"]["expired"]
        assert expired >= 1
        # Every expired message's memory was given back; what is held is the rest plus the
        # probe's message (a sweep that freed exactly one left room for exactly that one).
        assert stats["bytes_held"] == (accepted - expired + 1) * SIZE


@pytest.mark.timeout(30)
def test_group_send_past_the_ceiling_skips_broker_inboxes_and_still_reaches_process_channels(broker_factory):
    broker = broker_factory(max_memory=CEILING)
    with Client(broker.url) as sender, Client(broker.url) as member:
        mine = member.new_channel()
        for group_member in ("inbox.a", "inbox.b", mine):
            member.group_add("room", group_member)
        fill(sender, "jobs")
        assert sender.group_send("room", MESSAGE) == {"queued": 0, "full": 2}  # never raises
        assert member.receive(mine, timeout=5) == MESSAGE  # (published: held by no inbox)
        assert sender.stats()["counters"]["memory_refused"] >= 3


# -- a flood ------------------------------------------------------------------------------------

def _memory_flood():
    spec = importlib.util.spec_from_file_location("memory_flood", os.path.join(ROOT, "benchmarks", "memory_flood.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_the_brokers_memory_stays_flat_under_a_flood_to_channels_nobody_reads():
    figures = _memory_flood().run(messages=300_000, senders=4, max_memory="8MiB", max_capacity=1_000_000,
                                  mark=100_000, max_growth_mib=16, timeout=100)
    assert figures["answered"] == 300_000, figures
    assert set(figures["refused"]) == {"memory"}, figures  # nothing else refused it: no "full"
    assert figures["accepted"] + figures["refused"]["memory"] == 300_000
    per_message = 8 * 1024 * 1024 / figures["accepted"]
    assert 150 < per_message < 180, figures  # (bodies of ~100 bytes + 64: the ceiling decides)
    assert figures["bytes_held"] <= figures["broker_max_memory"], figures
    assert figures["growth_mib"] < 16, f"the broker's RSS grew by {figures['growth_mib']} MiB: {figures}"
    assert figures["passed"], figures


# -- idle channels ------------------------------------------------------------------------------

def assert_no_channel_state(router) -> None:
    """Nothing in the router is kept per channel."""
    delivery = router.delivery
    assert delivery.inboxes == {} and delivery.bytes_held == 0 and delivery.stalled == set()
    for peer in delivery.peers.values():
        assert (peer.credits, peer.unacked, peer.reserved) == ({}, {}, {}), peer
    assert len(router.groups) == 0 and router.groups.owned_by("") == []
    assert router.joining == {}


@pytest.mark.timeout(120)
def test_a_hundred_thousand_drained_process_channels_leave_nothing_in_the_router(broker):
    count, chunk = 100_000, 1000

    async def main() -> dict:
        async with AsyncClient(broker.url) as bus:
            for start in range(0, count, chunk):
                channels = [bus.new_channel() for _ in range(chunk)]
                await asyncio.gather(*(bus.send(c, {"type": "t", "n": start + i}) for i, c in enumerate(channels)))
                for i, channel in enumerate(channels):
                    assert await bus.receive(channel, timeout=10) == {"type": "t", "n": start + i}
            await bus.ping()  # (the last acknowledgements have reached the broker)
            stats = await bus.stats()
            stop_broker_thread(broker.server)  # with the client still connected: its state is what is left
            return stats

    stats = asyncio.run(main())
    assert stats["counters"]["received"] == stats["counters"]["delivered"] == count
    assert (stats["channels"], stats["queued"], stats["inflight"], stats["bytes_held"]) == (0, 0, 0, 0)
    assert_no_channel_state(broker.server.router)


@pytest.mark.timeout(60)
def test_drained_normal_channels_leave_nothing_once_their_receiver_has_gone(broker):
    """While a receiver is connected the broker keeps its credit for each normal channel it
    receives from (that is what makes it a receiver); when it leaves, nothing is left."""
    count = 10_000
    with Client(broker.url) as sender, Client(broker.url) as receiver:
        for n in range(count):
            sender.send(f"jobs.{n}", {"type": "t", "n": n})
        for n in range(count):
            assert receiver.receive(f"jobs.{n}", timeout=5) == {"type": "t", "n": n}
        receiver.ping()
        assert sender.stats()["queued"] == sender.stats()["inflight"] == 0
    with Client(broker.url) as observer:
        deadline = time.monotonic() + 5
        while (stats := observer.stats())["clients"] > 1:  # (until their BYEs have come)
            assert time.monotonic() < deadline, stats
        stop_broker_thread(broker.server)
    assert (stats["channels"], stats["bytes_held"]) == (0, 0)
    assert_no_channel_state(broker.server.router)


@pytest.mark.timeout(60)
def test_an_async_client_keeps_nothing_for_channels_it_sent_to_long_ago(broker, monkeypatch):
    import clients.core

    monkeypatch.setattr(clients.core, "RELEASE_IDLE", 0.25)  # (what "long ago" means, shortened)

    async def main() -> int:
        async with AsyncClient(broker.url) as bus:
            for _ in range(5):
                channels = [bus.new_channel() for _ in range(1000)]
                await asyncio.gather(*(bus.send(c, {"type": "t"}) for c in channels))
                for channel in channels:
                    await bus.receive(channel, timeout=5)
            await asyncio.sleep(0.3)  # longer ago than anything the client must remember
            channel = bus.new_channel()
            await bus.send(channel, {"type": "t"})
            await bus.receive(channel, timeout=5)
            return len(bus._core.last_send)

    assert asyncio.run(main()) <= 1024 + 1
