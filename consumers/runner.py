"""The runner: host consumer instances in one process, over one ``AsyncClient``.

Theory of operation
-------------------
``Runner(client, consumers)`` starts each instance (``consumer.start(client)``: channel name,
groups, ``on_start``) and then, for each, one *pump* task per channel it serves: its own
``channel_name`` and every work channel in ``channels``. A pump loops: receive one message, then
handle it while holding the instance's lock, so an instance handles one message at a time.
Several instances (in this process or others) serving one work channel compete for its
messages; the broker gives each message to one of them.

A handler that raises is logged with its traceback and the instance goes on serving; so is a
message no handler takes (``UnhandledMessage``, logged without a traceback).

``stop()`` finishes what is in hand: it cancels the pumps that are waiting in ``receive`` (a
cancelled receive loses nothing), lets the pumps that hold a message handle it, then stops each
instance (``on_stop``, leave groups). One log line is written per instance started and per
instance stopped (logger ``channelbus.run``).

``run(factory, url, instances=N)`` is the whole process: connect, start N instances, serve until
SIGINT or SIGTERM, stop, close. A second signal exits at once without waiting for handlers.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Callable, Sequence

from clients import AsyncClient, BusError

from .base import AsyncConsumer, BaseConsumer, Consumer, UnhandledMessage

log = logging.getLogger("channelbus.run")


def load_consumer(spec: str) -> type[BaseConsumer]:
    """Import ``"package.module:ClassName"`` and return that consumer class.

    Raises ValueError for a malformed spec, ImportError for a module that cannot be imported,
    LookupError for a missing attribute and TypeError for something that is not a consumer class.
    """
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ValueError(f"{spec!r} is not MODULE:ATTR, e.g. examples.workers.worker:Worker")
    module = importlib.import_module(module_name)
    target: object = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise LookupError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not (isinstance(target, type) and issubclass(target, (AsyncConsumer, Consumer))
            and not target._framework):
        raise TypeError(f"{spec} is {target!r}, not a subclass of AsyncConsumer or Consumer")
    return target


@dataclass(eq=False)
class _Slot:
    consumer: BaseConsumer
    label: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    receiving: set = field(default_factory=set)  # pump tasks now waiting in receive()
    pumps: list = field(default_factory=list)
    handled: int = 0
    failed: int = 0


def describe(consumer: BaseConsumer) -> str:
    """``"groups: a, b; channels: jobs; handles: job_run"`` for a started consumer."""
    parts = [f"groups: {', '.join(consumer.groups)}" if consumer.groups else "",
             f"channels: {', '.join(consumer.channels)}" if consumer.channels else "",
             f"handles: {', '.join(sorted(consumer.handlers)) or 'nothing'}"]
    return "; ".join(p for p in parts if p)


class Runner:
    """Serve ``consumers`` (instances, not yet started) over ``client`` (an AsyncClient)."""

    def __init__(self, client, consumers: Sequence[BaseConsumer]) -> None:
        self.client = client
        self._slots = [
            _Slot(c, f"{type(c).__qualname__}[{i}]" if len(consumers) > 1 else type(c).__qualname__)
            for i, c in enumerate(consumers, 1)
        ]
        self._stopping = False
        self._started: list[_Slot] = []

    @property
    def pumps(self) -> list[asyncio.Task]:
        return [task for slot in self._slots for task in slot.pumps]

    async def start(self) -> None:
        """Start every instance and its pumps. If one fails to start, stop those started, raise."""
        try:
            for slot in self._slots:
                consumer = slot.consumer
                await consumer.start(self.client)
                self._started.append(slot)
                log.info("started %s on %s; %s", slot.label, consumer.channel_name, describe(consumer))
                for channel in (consumer.channel_name, *consumer.channels):
                    slot.pumps.append(asyncio.create_task(
                        self._pump(slot, channel), name=f"{slot.label} {channel}",
                    ))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Finish the messages in hand, then stop every started instance (safe to call twice)."""
        self._stopping = True
        for slot in self._slots:
            for task in slot.receiving:
                task.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        started, self._started = self._started, []
        for slot in reversed(started):
            try:
                await slot.consumer.stop()
            except Exception:
                log.exception("%s: stopping failed", slot.label)
            log.info("stopped %s after %d messages (%d failed)", slot.label, slot.handled, slot.failed)

    async def serve(self, stop: asyncio.Event) -> None:
        """Start, serve until ``stop`` is set (or a pump dies: then raise its error), stop."""
        await self.start()
        waiter = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([waiter, *self.pumps], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            failed = [t for t in self.pumps if t.done() and not t.cancelled() and t.exception()]
            await self.stop()
        if failed:
            raise failed[0].exception()

    async def _pump(self, slot: _Slot, channel: str) -> None:
        task = asyncio.current_task()
        while not self._stopping:
            slot.receiving.add(task)
            try:
                message = await self.client.receive(channel)
            finally:
                slot.receiving.discard(task)
            async with slot.lock:
                await self._handle(slot, channel, message)

    async def _handle(self, slot: _Slot, channel: str, message: dict) -> None:
        slot.handled += 1
        try:
            await slot.consumer.dispatch(message)
        except UnhandledMessage as exc:
            slot.failed += 1
            log.error("%s: %s (from %s)", slot.label, exc, channel)
        except Exception:
            slot.failed += 1
            log.exception("%s: handler for %r from %s raised", slot.label, message.get("type"), channel)


async def serve(factory: Callable[[], BaseConsumer], url: str, *, instances: int = 1,
                stop: asyncio.Event | None = None, **client_settings) -> None:
    """Connect to ``url``, serve ``instances`` consumers made by ``factory`` until ``stop``."""
    stop = stop or asyncio.Event()
    async with AsyncClient(url, **client_settings) as client:
        await Runner(client, [factory() for _ in range(instances)]).serve(stop)


def run(factory: Callable[[], BaseConsumer], url: str, *, instances: int = 1,
        **client_settings) -> int:
    """Serve until SIGINT or SIGTERM; return the exit status (0 after a clean stop).

    A second signal exits at once, abandoning the handlers still running.
    """
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            name = signal.Signals(signum).name
            if stop.is_set():
                log.warning("second %s: exiting without waiting for handlers", name)
                os._exit(128 + signum)
            log.info("%s: stopping (send it again to exit at once)", name)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        await serve(factory, url, instances=instances, stop=stop, **client_settings)

    try:
        asyncio.run(main())
    except BusError as exc:
        log.error("%s", exc)
        return 1
    return 0
