"""AsyncClient against a real broker: cancelled receives lose nothing, concurrent receives."""

from __future__ import annotations

import asyncio
import threading

import pytest

import bus_workers as w
from broker.protocol import wire
from clients import AsyncClient, BusError, ChannelFull, Client, ReceiveTimeout


async def settle() -> None:
    """Let pending tasks run up to their next real wait (no timers involved)."""
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["normal", "specific"])
def test_cancelled_receive_loses_nothing(broker, kind):
    async def main():
        async with AsyncClient(broker.url) as receiver, AsyncClient(broker.url) as sender:
            channel = "cancelled" if kind == "normal" else receiver.new_channel()
            pending = asyncio.create_task(receiver.receive(channel))
            await settle()
            assert not pending.done()
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            await sender.send(channel, {"type": "after", "i": 1})
            assert await receiver.receive(channel, timeout=5) == {"type": "after", "i": 1}
            with pytest.raises(ReceiveTimeout):
                await receiver.receive(channel, timeout=0.2)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_receives_cancelled_while_messages_stream_in_lose_and_double_nothing(broker, procs):
    total = 2_000
    sender = procs.start(w.send_sequence, broker.url, "stream", total)

    async def main() -> tuple[list, int, dict | None]:
        got, cancelled = [], 0
        async with AsyncClient(broker.url) as receiver:
            while len(got) < total:
                try:
                    got.append((await asyncio.wait_for(receiver.receive("stream"), 0.0005))["n"])
                except asyncio.TimeoutError:  # the receive was cancelled mid-wait
                    cancelled += 1
            try:
                extra = await receiver.receive("stream", timeout=0.3)
            except ReceiveTimeout:
                extra = None
        return got, cancelled, extra

    got, cancelled, extra = asyncio.run(main())
    sender.result(timeout=30)
    assert got == list(range(total))
    assert extra is None
    assert cancelled > 0, "no receive was ever cancelled: the test proved nothing"


@pytest.mark.timeout(30)
def test_many_concurrent_receives_on_different_channels(broker):
    async def main():
        async with AsyncClient(broker.url) as receiver, AsyncClient(broker.url) as sender:
            channels = [f"fan{i}" for i in range(25)] + [receiver.new_channel() for _ in range(25)]
            tasks = [asyncio.create_task(receiver.receive(ch, timeout=10)) for ch in channels]
            await settle()
            assert not any(task.done() for task in tasks)
            for ch in reversed(channels):
                await sender.send(ch, {"type": "fan", "ch": ch})
            results = await asyncio.gather(*tasks)
            assert [message["ch"] for message in results] == channels

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_concurrent_receives_on_one_channel_each_get_a_different_message(broker):
    async def main():
        async with AsyncClient(broker.url) as receiver, AsyncClient(broker.url) as sender:
            tasks = [asyncio.create_task(receiver.receive("shared", timeout=10)) for _ in range(20)]
            await settle()
            for i in range(20):
                await sender.send("shared", {"type": "m", "i": i})
            results = await asyncio.gather(*tasks)
            assert sorted(message["i"] for message in results) == list(range(20))

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_an_async_client_that_failed_to_connect_can_try_again(broker_factory):
    from clients import BrokerUnavailable

    broker = broker_factory()
    port = broker.url.rpartition(":")[2]

    async def main():
        client = AsyncClient("tcp://127.0.0.1:9", timeout=0.3)
        with pytest.raises(BrokerUnavailable):
            await client.connect()
        client.url = broker.url  # the operator fixes the address; the same object connects now
        await client.connect()
        await client.send("q", {"type": "x"})
        assert (await client.receive("q", timeout=5))["type"] == "x"
        await client.close()
        return port

    assert asyncio.run(main()) == port



@pytest.mark.timeout(30)
def test_a_group_send_without_waiting_reaches_every_member_in_order(broker):
    async def main():
        async with AsyncClient(broker.url) as member, AsyncClient(broker.url) as sender:
            mine = member.new_channel()
            await member.group_add("room", mine)
            for n in range(50):
                assert await sender.group_send("room", {"type": "g", "n": n}, wait=False) is None
            return [(await member.receive(mine, timeout=5))["n"] for _ in range(50)]

    assert asyncio.run(main()) == list(range(50))


@pytest.mark.timeout(30)
def test_an_async_client_used_from_another_event_loop_says_so(broker):
    client = AsyncClient(broker.url)

    async def first():
        await client.connect()
        await client.send("q", {"type": "m"})

    async def other():
        for call in (client.send("q", {"type": "m"}), client.receive("q", timeout=1),
                     client.group_send("g", {"type": "m"}, wait=False)):
            with pytest.raises(RuntimeError, match="another event loop"):
                await call

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(first())
        asyncio.run(other())
        loop.run_until_complete(client.close())
    finally:
        loop.close()


@pytest.mark.timeout(30)
def test_receive_timeouts_share_one_timer_and_each_fires_on_time(broker):
    """Waits with different timeouts, not added in deadline order, each end at their own
    deadline, never before it; one that got its message is not failed later. The client times
    them all with one loop timer."""
    async def main():
        async with AsyncClient(broker.url) as receiver, AsyncClient(broker.url) as sender:
            loop = asyncio.get_running_loop()

            async def timed(channel: str, timeout: float):
                start = loop.time()
                try:
                    return await receiver.receive(channel, timeout=timeout), loop.time() - start
                except ReceiveTimeout:
                    return "timeout", loop.time() - start

            waits = {t: asyncio.create_task(timed(f"deadline.{i}", t))
                     for i, t in enumerate((0.6, 0.2, 0.4))}
            served = asyncio.create_task(timed("deadline.served", 0.3))
            await settle()
            live = [h for h in loop._scheduled if not h.cancelled()
                    and getattr(h._callback, "__self__", None) is receiver._deadlines]
            assert len(live) == 1  # four waits, one timer (set for the earliest, 0.2 s)
            await sender.send("deadline.served", {"type": "now"})
            assert (await served)[0] == {"type": "now"}
            done = []
            for timeout, task in sorted(waits.items()):
                outcome, elapsed = await task
                assert outcome == "timeout"
                assert elapsed >= timeout, (timeout, elapsed)
                done.append(timeout)
            assert done == [0.2, 0.4, 0.6]
            with pytest.raises(ReceiveTimeout):
                await receiver.receive("deadline.again", timeout=0.05)

    asyncio.run(main())


def inflight(observer: Client, channel: str) -> int:
    """The broker's count of ``channel``'s messages pushed and not yet acknowledged."""
    return {name: pushed for name, _q, pushed, _r in observer.stats(1000)["top_channels"]}.get(channel, 0)


@pytest.mark.timeout(30)
def test_a_lone_send_leaves_at_once_carrying_the_acknowledgement_of_what_was_taken(broker):
    """A send that is not part of a burst is written to the socket before send() returns, with
    the ACK of the message taken before it: neither waits for the event loop to turn again (the
    worker blocks its loop right after the send, until the test has seen both arrive)."""
    release, failures = threading.Event(), []

    async def worker():
        async with AsyncClient(broker.url) as client:
            for _ in range(3):  # the second send to a channel reserves slots: the third is a POST
                await client.send("answers", {"type": "ready"})
            job = await client.receive("jobs", timeout=10)
            await client.send("answers", {"type": "answer", "n": job["n"]})
            release.wait(15)  # (blocks the event loop on purpose)

    def run_worker():
        try:
            asyncio.run(worker())
        except BaseException as exc:  # noqa: BLE001 (reported by the test thread)
            failures.append(exc)

    thread = threading.Thread(target=run_worker, daemon=True)
    thread.start()
    try:
        with Client(broker.url) as boss:
            assert [boss.receive("answers", timeout=10)["type"] for _ in range(3)] == ["ready"] * 3
            boss.send("jobs", {"type": "job", "n": 7})
            assert boss.receive("answers", timeout=5) == {"type": "answer", "n": 7}
            assert inflight(boss, "jobs") == 0  # the ACK came with the answer
    finally:
        release.set()
        thread.join(10)
    assert not thread.is_alive() and not failures, failures


@pytest.mark.timeout(30)
def test_a_taken_message_is_acknowledged_even_when_the_receiver_then_does_nothing(broker_factory):
    """A receiver that takes a message and then neither sends nor waits on its client still
    acknowledges it, within ACK_DELAY: the full channel has room again for another client. (The
    broker's heartbeat, which would wake the receiver, is set far beyond the test.)"""
    broker = broker_factory(heartbeat=60)

    async def main():
        async with AsyncClient(broker.url, capacity=1) as sender, AsyncClient(broker.url) as receiver:
            loop = asyncio.get_running_loop()
            await sender.send("single", {"type": "first"})
            with pytest.raises(ChannelFull):
                await sender.send("single", {"type": "second"})
            assert await receiver.receive("single", timeout=5) == {"type": "first"}
            deadline = loop.time() + 10
            while True:
                try:
                    await sender.send("single", {"type": "second"})
                    break
                except ChannelFull:
                    assert loop.time() < deadline, "the taken message was never acknowledged"
                    await asyncio.sleep(0.01)
            assert await receiver.receive("single", timeout=5) == {"type": "second"}

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_every_call_on_a_closed_client_says_it_is_closed_and_sends_nothing(broker):
    """Not a silent loss (a send into a reserved slot used to return as if sent) nor a ZeroMQ
    error about a closed socket: a BusError that says what is wrong, for both clients."""
    async def main():
        async with AsyncClient(broker.url) as observer:
            client = AsyncClient(broker.url)
            for n in range(3):  # (the later sends go into reserved slots, as POSTs)
                await client.send("closed.channel", {"type": "before", "n": n})
            await client.close()
            calls = [client.send("closed.channel", {"type": "after"}), client.receive("closed.channel", timeout=1),
                     client.group_send("room", {"type": "after"}), client.group_add("room", "closed.channel"),
                     client.ping(), client.connect()]
            for call in calls:
                with pytest.raises(BusError, match="the client is closed"):
                    await call
            await client.close()  # (closing twice is fine)
            got = [(await observer.receive("closed.channel", timeout=5))["n"] for _ in range(3)]
            with pytest.raises(ReceiveTimeout):
                await observer.receive("closed.channel", timeout=0.3)
            return got

    assert asyncio.run(main()) == [0, 1, 2]
    with Client(broker.url) as client:
        client.send("closed.sync", {"type": "before"})
    for call in (lambda: client.send("closed.sync", {"type": "after"}), lambda: client.receive("closed.sync", timeout=1),
                 lambda: client.group_send("room", {"type": "after"}), lambda: client.group_add("room", "closed.sync"),
                 client.ping):
        with pytest.raises(BusError, match="the client is closed"):
            call()


@pytest.mark.timeout(30)
def test_sends_within_the_burst_gap_go_as_one_post_and_arrive_in_order(broker, monkeypatch):
    """Sends that come within BURST_GAP of the client's previous send (here: a gap of 10 s, so
    the test does not depend on the host's speed) are collected in the loop iteration and go
    as one POST. Counted where the client writes to its socket; broker and receiver are real.
    (A send that comes alone goes at once: test_a_lone_send_leaves_at_once_...)"""
    import clients.asyncio as client_module

    written: list[list[bytes]] = []
    real_send_frames = client_module.send_frames

    def counting_send_frames(sock, frames, *args):
        written.append(frames)
        return real_send_frames(sock, frames, *args)

    async def main():
        async with AsyncClient(broker.url) as sender, AsyncClient(broker.url) as receiver:
            for n in range(2):  # the second send reserves slots: later ones are POSTs
                await sender.send("burst", {"type": "warm", "n": n})
            monkeypatch.setattr(client_module, "BURST_GAP", 10.0)
            monkeypatch.setattr(client_module, "send_frames", counting_send_frames)
            for n in range(20):  # (no await here yields to the loop)
                await sender.send("burst", {"type": "burst", "n": n})
            await asyncio.sleep(0)  # the collected POST goes at the next loop iteration
            monkeypatch.setattr(client_module, "send_frames", real_send_frames)
            got = [(await receiver.receive("burst", timeout=5))["n"] for _ in range(22)]
            return got

    assert asyncio.run(main()) == [0, 1, *range(20)]
    posts = [frames for frames in written if frames[0] == wire.verb_frame("POST")]
    assert [len(frames) - 2 for frames in posts] == [20]  # one POST, twenty bodies
