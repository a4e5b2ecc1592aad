"""BusChannelLayer code that the layer tests run in spawned processes (with the ProcessRunner of
bus_workers.py, the ``procs`` fixture). Each function builds its own layer, as a separate server
process would, and returns what it saw."""

from __future__ import annotations

import asyncio
import os

from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull

from clients.channel_layer import BusChannelLayer

RECEIVE_SECONDS = 30.0
FULL_BACKOFF = 0.002


def echo(url: str, names, count: int) -> list[int]:
    """Own a process-specific channel (its name goes on ``names``); answer each of ``count``
    messages on the channel named in its ``reply_to``; return the numbers received."""
    async def main() -> list[int]:
        layer = BusChannelLayer(hosts=[url])
        me = await layer.new_channel()
        names.put(me)
        seen = []
        for _ in range(count):
            message = await asyncio.wait_for(layer.receive(me), RECEIVE_SECONDS)
            seen.append(message["n"])
            await layer.send(message["reply_to"], {"type": "echo.reply", "n": message["n"], "pid": os.getpid()})
        return seen

    return asyncio.run(main())


def group_member(url: str, group: str, n_channels: int, ready) -> dict[str, list[int]]:
    """Add ``n_channels`` new channels to ``group``, put their names on ``ready``, then receive on
    each until an ``end`` message; return ``{channel: [n, ...]}``."""
    async def main() -> dict[str, list[int]]:
        layer = BusChannelLayer(hosts=[url])
        channels = [await layer.new_channel() for _ in range(n_channels)]
        for channel in channels:
            await layer.group_add(group, channel)
        ready.put(channels)
        received: dict[str, list[int]] = {}
        for channel in channels:
            seen = received[channel] = []
            while True:
                message = await asyncio.wait_for(layer.receive(channel), RECEIVE_SECONDS)
                if message["type"] == "end":
                    break
                seen.append(message["n"])
        return received

    return asyncio.run(main())


def compete(url: str, channel: str, ready, stop, out) -> int:
    """One of several receivers on the normal channel ``channel``: put each number received on
    ``out`` until ``stop`` is set and nothing more comes; return how many it received."""
    async def main() -> int:
        layer = BusChannelLayer(hosts=[url])
        client = await layer._client()
        total = 0
        pending = asyncio.ensure_future(layer.receive(channel))
        for _ in range(5):
            await asyncio.sleep(0)  # the receive grants the broker credit for the channel...
        await client.ping()  # ...and this round trip proves the broker has it
        ready.set()
        while True:
            done, _ = await asyncio.wait({pending}, timeout=0.1)
            if done:
                out.put(pending.result()["n"])
                total += 1
                pending = asyncio.ensure_future(layer.receive(channel))
            elif stop.is_set():
                pending.cancel()
                return total

    return asyncio.run(main())


def send_numbers(url: str, channel: str, count: int) -> int:
    """Send ``{"n": 0..count-1}`` to ``channel``, retrying on ChannelFull; return the retries."""
    async def main() -> int:
        layer = BusChannelLayer(hosts=[url])
        retries = 0
        for n in range(count):
            while True:
                try:
                    await layer.send(channel, {"type": "job", "n": n})
                    break
                except ChannelFull:
                    retries += 1
                    await asyncio.sleep(FULL_BACKOFF)
        return retries

    return asyncio.run(main())


def sync_group_sender(url: str, group: str, count: int) -> int:
    """From plain synchronous code, as a Django view or a Celery task would:
    ``async_to_sync(layer.group_send)`` ``count`` times, then an ``end``; return the count."""
    layer = BusChannelLayer(hosts=[url])
    for n in range(count):
        async_to_sync(layer.group_send)(group, {"type": "sync.message", "n": n})
    async_to_sync(layer.group_send)(group, {"type": "end"})
    assert not layer._clients, "a client outlived its event loop"
    return count
