"""BusChannelLayer across event loops, threads and processes: one client per loop, closed with its
loop (so ``async_to_sync`` leaks nothing), cancelled receives that neither lose nor double a
message, many concurrent receivers, and layer instances in other processes (spawned with the
``procs`` fixture, see bus_workers.py and layer_workers.py)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull

import layer_workers as lw
from layer_helpers import drain, layer_factory, nothing_on, receive, run, wait_for_peers  # noqa: F401

pytestmark = pytest.mark.timeout(90)


async def settle_tasks() -> None:
    """Let pending tasks run up to their next real wait."""
    for _ in range(10):
        await asyncio.sleep(0)


# -- one client per event loop ------------------------------------------------------------------

def test_one_layer_serves_one_event_loop_after_another(layer_factory, broker):
    layer = layer_factory()
    for n in range(3):
        run(layer.send("across-loops", {"type": "n", "n": n}))
        assert not layer._clients
    assert wait_for_peers(broker, 0) == 0

    async def main():
        return [(await receive(layer, "across-loops"))["n"] for _ in range(3)]

    assert run(main()) == [0, 1, 2]


def test_a_loop_has_one_client_which_closes_when_the_loop_closes(layer_factory, broker):
    layer = layer_factory()

    async def main():
        await layer.send("one-client", {"type": "x"})
        await layer.new_channel()
        await layer.group_send("g", {"type": "x"})
        assert len(layer._clients) == 1
        return len(broker.server.router.peers)

    assert run(main()) == 1
    assert not layer._clients
    assert wait_for_peers(broker, 0) == 0


def test_close_disconnects_the_current_loops_client_and_the_next_call_reconnects(layer_factory, broker):
    layer = layer_factory()

    async def main():
        await layer.send("reconnect", {"type": "before"})
        await layer.close()
        assert not layer._clients
        assert wait_for_peers(broker, 0) == 0
        await layer.send("reconnect", {"type": "after"})
        return [await receive(layer, "reconnect"), await receive(layer, "reconnect")]

    assert run(main()) == [{"type": "before"}, {"type": "after"}]


def test_two_event_loops_in_two_threads_use_one_layer_at_once(layer_factory):
    layer = layer_factory()
    count = 200
    results: dict[str, object] = {}

    def side(me: str, peer: str) -> None:
        async def main():
            for n in range(count):
                await layer.send(f"to-{peer}", {"type": "n", "n": n, "from": me})
                if n % 20 == 19:  # interleave receiving with sending
                    for _ in range(20):
                        results.setdefault(me, []).append((await receive(layer, f"to-{me}"))["n"])
            return len(layer._clients)

        try:
            results[f"{me}-clients"] = run(main())
        except BaseException as exc:  # noqa: BLE001 (reported by the test thread)
            results[f"{me}-error"] = exc

    threads = [threading.Thread(target=side, args=("a", "b")), threading.Thread(target=side, args=("b", "a"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not [key for key in results if key.endswith("error")], results
    assert results["a"] == results["b"] == list(range(count))
    assert results["a-clients"] in (1, 2) and results["b-clients"] in (1, 2)
    assert not layer._clients


def test_repeated_async_to_sync_group_send_from_a_thread_leaks_no_client(layer_factory, broker):
    layer = layer_factory()
    count = 30
    errors: list[BaseException] = []

    def view_like_code() -> None:
        try:
            for n in range(count):
                async_to_sync(layer.group_send)("news", {"type": "news", "n": n})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    async def consumer():
        me = await layer.new_channel()
        await layer.group_add("news", me)
        baseline = len(broker.server.router.peers)
        thread = threading.Thread(target=view_like_code)
        thread.start()
        got = [(await receive(layer, me))["n"] for _ in range(count)]
        await asyncio.to_thread(thread.join, 30)
        peers = await asyncio.to_thread(wait_for_peers, broker, baseline)
        return got, baseline, peers, list(layer._clients)

    got, baseline, peers, loops = run(consumer())
    assert not errors, errors
    assert got == list(range(count))
    assert baseline == 1 and peers == baseline, "every async_to_sync loop's client disconnected"
    assert len(loops) == 1  # only the consumer's loop still had a client
    assert not layer._clients and wait_for_peers(broker, 0) == 0


def test_async_to_sync_send_respects_capacity_across_loops(layer_factory):
    layer = layer_factory(capacity=3)
    for n in range(3):
        async_to_sync(layer.send)("sync-cap", {"type": "n", "n": n})
    with pytest.raises(ChannelFull):
        async_to_sync(layer.send)("sync-cap", {"type": "n", "n": 3})
    assert [async_to_sync(receive)(layer, "sync-cap")["n"] for _ in range(3)] == [0, 1, 2]
    assert not layer._clients


def test_async_to_sync_receive_called_repeatedly_takes_each_message_once(layer_factory):
    layer = layer_factory()
    for n in range(10):
        async_to_sync(layer.send)("sync-jobs", {"type": "job", "n": n})
    # Each call is a new loop with a new client, closed at once; what it was pushed but did not
    # take must go back to the channel, not be lost.
    got = [async_to_sync(receive)(layer, "sync-jobs", 5)["n"] for _ in range(10)]
    assert got == list(range(10))
    assert async_to_sync(drain)(layer, "sync-jobs") == []


# -- cancellation -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["normal", "specific", "group"])
def test_a_cancelled_receive_loses_no_message(layer_factory, kind):
    receiver, sender = layer_factory(), layer_factory()

    async def main():
        channel = "cancel-me" if kind == "normal" else await receiver.new_channel()
        if kind == "group":
            await receiver.group_add("cancel-group", channel)
        for _ in range(3):
            pending = asyncio.create_task(receiver.receive(channel))
            await settle_tasks()
            assert not pending.done()
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
        if kind == "group":
            await sender.group_send("cancel-group", {"type": "after.cancel"})
        else:
            await sender.send(channel, {"type": "after.cancel"})
        got = await receive(receiver, channel)
        await nothing_on(receiver, channel)
        return got

    assert run(main()) == {"type": "after.cancel"}


@pytest.mark.parametrize("kind", ["normal", "specific"])
def test_receives_cancelled_while_messages_stream_in_lose_and_double_nothing(layer_factory, kind):
    receiver, sender = layer_factory(), layer_factory()
    total = 1000

    async def send_all(channel):
        for n in range(total):
            if n % 50 == 0:
                await asyncio.sleep(0.005)  # a lull: receives waiting now time out mid-wait
            while True:
                try:
                    await sender.send(channel, {"type": "seq", "n": n})
                    break
                except ChannelFull:
                    await asyncio.sleep(0.002)

    async def main():
        channel = "stream-cancel" if kind == "normal" else await receiver.new_channel()
        sending = asyncio.create_task(send_all(channel))
        got, cancelled = [], 0
        while len(got) < total:
            try:
                got.append((await asyncio.wait_for(receiver.receive(channel), 0.0005))["n"])
            except asyncio.TimeoutError:  # the receive was cancelled mid-wait
                cancelled += 1
        await sending
        return got, cancelled, await drain(receiver, channel)

    got, cancelled, extra = run(main())
    assert got == list(range(total))
    assert extra == []
    assert cancelled > 0, "no receive was ever cancelled: the test proved nothing"


# -- process-specific channels across loops (the layer's, not a loop's) ----------------------------

def test_double_receive_across_async_to_sync_loops(layer_factory, broker):
    """channels_redis's test_double_receive: names made and sent to under async_to_sync, then
    received in two other async_to_sync calls (each its own loop, closed after)."""
    layer = layer_factory()

    async def send_and_close(channel, message):
        await layer.send(channel, message)
        await layer.close_pools()

    first = async_to_sync(layer.new_channel)()
    second = async_to_sync(layer.new_channel)()
    async_to_sync(send_and_close)(first, {"type": "test.message.1"})
    async_to_sync(send_and_close)(second, {"type": "test.message.2"})

    async def listen(channel, expected):
        message = await receive(layer, channel)
        assert message["type"] == expected
        await layer.close_pools()

    async_to_sync(listen)(second, "test.message.2")
    async_to_sync(listen)(first, "test.message.1")
    assert not layer._clients and layer._home is None
    assert wait_for_peers(broker, 0) == 0
    assert broker.server.router.stats["dropped_owner_gone"] == 0


def test_a_channel_held_by_a_running_loop_is_received_from_another_loop(layer_factory):
    """A consumer's loop holds the layer's id in one thread; a second loop in another thread
    receives (and cancels receives, losing nothing) through it."""
    layer = layer_factory()
    holder_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=holder_loop.run_forever, daemon=True)
    thread.start()
    try:
        channel = asyncio.run_coroutine_threadsafe(layer.new_channel(), holder_loop).result(10)
        assert layer._home[0] is holder_loop

        async def elsewhere():
            await layer.send(channel, {"type": "one"})
            got = [await receive(layer, channel)]
            cancelled = 0
            for n in range(40):  # (cancelled receives through the holder lose nothing)
                try:
                    got.append(await asyncio.wait_for(layer.receive(channel), 0.001))
                except asyncio.TimeoutError:
                    cancelled += 1
                await layer.send(channel, {"type": "n", "n": n})
            while len(got) < 41:
                got.append(await receive(layer, channel))
            await nothing_on(layer, channel, 0.3)
            assert cancelled > 0, "no receive was cancelled: the test proved nothing"
            return got

        got = run(elsewhere())
        assert got[0] == {"type": "one"}
        assert [m["n"] for m in got[1:]] == list(range(40))  # (all, once, in order)
    finally:
        holder_loop.call_soon_threadsafe(holder_loop.stop)
        thread.join(5)
        holder_loop.run_until_complete(layer.close_pools())
        holder_loop.close()
    assert layer._home is None


def test_close_pools_closes_the_current_loops_connections_and_the_layer_goes_on(layer_factory, broker):
    layer = layer_factory()

    async def main():
        channel = await layer.new_channel()
        await layer.send("pools", {"type": "x"})
        await layer.close_pools()
        assert not layer._clients and layer._home is None
        await layer.send(channel, {"type": "after"})  # (a later call connects again)
        return await receive(layer, channel), await receive(layer, "pools")

    assert run(main()) == ({"type": "after"}, {"type": "x"})


# -- many receivers -----------------------------------------------------------------------------

def test_many_concurrent_receives_on_different_channels_each_get_their_own(layer_factory):
    receiver, sender = layer_factory(), layer_factory()

    async def main():
        channels = [f"many-{i}" for i in range(50)] + [await receiver.new_channel() for _ in range(50)]
        tasks = [asyncio.create_task(receive(receiver, channel)) for channel in channels]
        await settle_tasks()
        assert not any(task.done() for task in tasks)
        for channel in reversed(channels):
            await sender.send(channel, {"type": "for", "channel": channel})
        return channels, [message["channel"] for message in await asyncio.gather(*tasks)]

    channels, got = run(main())
    assert got == channels


def test_concurrent_receives_on_one_channel_each_get_a_different_message(layer_factory):
    receiver, sender = layer_factory(), layer_factory()

    async def main():
        tasks = [asyncio.create_task(receive(receiver, "crowded")) for _ in range(30)]
        await settle_tasks()
        for n in range(30):
            await sender.send("crowded", {"type": "n", "n": n})
        got = sorted(message["n"] for message in await asyncio.gather(*tasks))
        return got, await drain(receiver, "crowded")

    assert run(main()) == (list(range(30)), [])


def test_receivers_in_three_processes_share_a_channel_each_message_going_to_one(broker, procs):
    total = 600
    ready, stop, out = [procs.event() for _ in range(3)], procs.event(), procs.queue()
    workers = [procs.start(lw.compete, broker.url, "shared-jobs", ready[i], stop, out) for i in range(3)]
    for event in ready:
        assert event.wait(30), "a receiver process did not start"
    assert procs.start(lw.send_numbers, broker.url, "shared-jobs", total).result(60) >= 0
    got = [out.get(timeout=30) for _ in range(total)]
    stop.set()
    counts = [worker.result(30) for worker in workers]
    assert sorted(got) == list(range(total))
    assert sum(counts) == total
    assert all(count > 0 for count in counts), f"a receiver got nothing: {counts}"
    assert out.empty()


# -- other processes ----------------------------------------------------------------------------

def test_process_specific_channels_work_between_layers_in_two_processes(layer_factory, procs):
    layer = layer_factory()
    names = procs.queue()
    count = 50

    async def main(url):
        worker = procs.start(lw.echo, url, names, count)
        theirs = await asyncio.to_thread(names.get, True, 30)
        mine = await layer.new_channel()
        for n in range(count):
            await layer.send(theirs, {"type": "echo", "n": n, "reply_to": mine})
        replies = [await receive(layer, mine) for _ in range(count)]
        return worker, theirs, mine, replies

    worker, theirs, mine, replies = run(main(layer.hosts[0]))
    assert worker.result(30) == list(range(count))
    assert [reply["n"] for reply in replies] == list(range(count))
    assert all(reply["pid"] != os.getpid() for reply in replies)
    assert theirs.partition("!")[0] != mine.partition("!")[0]  # two clients, two owners


def test_group_send_reaches_members_in_other_processes_and_no_other_group(broker, procs, layer_factory):
    layer = layer_factory()
    ready = procs.queue()
    members = [procs.start(lw.group_member, broker.url, "spread", 3, ready) for _ in range(2)]
    outsider = procs.start(lw.group_member, broker.url, "elsewhere", 1, ready)
    for _ in range(3):
        ready.get(timeout=30)

    async def main():
        for n in range(20):
            await layer.group_send("spread", {"type": "spread", "n": n})
        await layer.group_send("spread", {"type": "end"})
        await layer.group_send("elsewhere", {"type": "end"})

    run(main())
    for member in members:
        received = member.result(30)
        assert len(received) == 3
        assert all(numbers == list(range(20)) for numbers in received.values())
    assert list(outsider.result(30).values()) == [[]]


def test_async_to_sync_group_send_from_another_process_reaches_this_one(broker, procs, layer_factory):
    layer = layer_factory()
    count = 25

    async def main():
        me = await layer.new_channel()
        await layer.group_add("from-sync", me)
        sender = procs.start(lw.sync_group_sender, broker.url, "from-sync", count)
        got = []
        while (message := await receive(layer, me, 30))["type"] != "end":
            got.append(message["n"])
        return sender, got

    sender, got = run(main())
    assert sender.result(30) == count
    assert got == list(range(count))
