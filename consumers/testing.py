"""Drive a consumer in a unit test with message dicts and collect what it sends; no broker.

A communicator starts one consumer instance over an in-memory stand-in for ``AsyncClient``
that checks names and serialisation as the real client does (a message must survive msgpack),
records every ``send`` and ``group_send`` in order and keeps group membership. Nothing is
delivered: a test feeds messages with ``handle`` and reads what came out. ::

    from consumers.testing import Communicator, Sent

    def test_echo_replies_to_the_sender():
        with Communicator(Echo) as echo:                      # groups joined, on_start ran
            sent = echo.handle({"type": "echo.request", "reply_to": "x", "text": "hi"})
            assert sent == [Sent("send", "x", {"type": "echo.reply", "text": "hi"})]
            assert echo.channel_name in echo.groups["echoes"]
        assert echo.groups == {}                              # left on stop

``AsyncCommunicator`` is the same for tests that run their own event loop
(``async with AsyncCommunicator(Echo) as echo: await echo.handle(...)``). ``handle`` raises
what the handler raised (and ``UnhandledMessage`` for a type with no handler), so a test sees
failures the runner would only log.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import NamedTuple

from broker.protocol.errors import ProtocolError
from broker.protocol.names import check_channel, check_group
from clients import InvalidName
from clients.core import pack_message, unpack_message

from .base import BaseConsumer


class Sent(NamedTuple):
    """One thing a consumer sent: ``kind`` is "send" (to a channel) or "group_send"."""

    kind: str
    target: str
    message: dict


_ids = itertools.count(1)


class FakeClient:
    """The part of ``AsyncClient`` a consumer uses, in memory; records instead of sending."""

    def __init__(self) -> None:
        self.client_id = f"test{next(_ids):04d}"
        self.sent: list[Sent] = []
        self.groups: dict[str, set[str]] = {}
        self._channels = itertools.count(1)

    def new_channel(self, prefix: str = "specific") -> str:
        return self._name(check_channel, f"{prefix}.{self.client_id}!{next(self._channels)}")

    async def send(self, channel: str, message: dict) -> None:
        self._name(check_channel, channel)
        self.sent.append(Sent("send", channel, _copy(message)))

    async def group_send(self, group: str, message: dict) -> dict:
        self._name(check_group, group)
        self.sent.append(Sent("group_send", group, _copy(message)))
        return {"queued": 0, "full": 0}

    async def group_add(self, group: str, channel: str) -> None:
        self._name(check_group, group)
        self.groups.setdefault(group, set()).add(self._name(check_channel, channel))

    async def group_discard(self, group: str, channel: str) -> None:
        members = self.groups.get(self._name(check_group, group), set())
        members.discard(channel)
        if not members:
            self.groups.pop(group, None)

    @staticmethod
    def _name(check, name: str) -> str:
        try:
            return check(name)
        except ProtocolError as err:
            raise InvalidName(err.message, name=err.fields.get("name", "")) from None


def _copy(message: dict) -> dict:
    """What the receiver would get: the message through msgpack and back."""
    return unpack_message(pack_message(message))


def _instance(consumer: type[BaseConsumer] | BaseConsumer) -> BaseConsumer:
    return consumer() if isinstance(consumer, type) else consumer


class AsyncCommunicator:
    """Drive one consumer (a class, instantiated with no arguments, or an instance)."""

    def __init__(self, consumer: type[BaseConsumer] | BaseConsumer) -> None:
        self.consumer = _instance(consumer)
        self.client = FakeClient()

    @property
    def sent(self) -> list[Sent]:
        """Everything sent so far, in order."""
        return self.client.sent

    @property
    def groups(self) -> dict[str, set[str]]:
        """Group -> member channels, as the consumer left them."""
        return self.client.groups

    @property
    def channel_name(self) -> str | None:
        return self.consumer.channel_name

    async def start(self) -> list[Sent]:
        """Start the consumer (join groups, run on_start); return what it sent meanwhile."""
        return await self._recording(self.consumer.start(self.client))

    async def handle(self, message: dict) -> list[Sent]:
        """Dispatch ``message`` as if it came from the bus; return what the handler sent."""
        return await self._recording(self.consumer.dispatch(_copy(message)))

    async def stop(self) -> list[Sent]:
        """Stop the consumer (run on_stop, leave groups); return what it sent meanwhile."""
        return await self._recording(self.consumer.stop())

    async def _recording(self, coroutine) -> list[Sent]:
        before = len(self.client.sent)
        await coroutine
        return self.client.sent[before:]

    async def __aenter__(self) -> "AsyncCommunicator":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


class Communicator:
    """``AsyncCommunicator`` for plain (non-async) tests: runs its own event loop."""

    def __init__(self, consumer: type[BaseConsumer] | BaseConsumer) -> None:
        self._async = AsyncCommunicator(consumer)
        self.consumer = self._async.consumer
        self._runner: asyncio.Runner | None = None

    @property
    def sent(self) -> list[Sent]:
        return self._async.sent

    @property
    def groups(self) -> dict[str, set[str]]:
        return self._async.groups

    @property
    def channel_name(self) -> str | None:
        return self.consumer.channel_name

    def start(self) -> list[Sent]:
        """Start the consumer (join groups, run on_start); return what it sent meanwhile."""
        if self._runner is None:
            self._runner = asyncio.Runner()
        try:
            return self._runner.run(self._async.start())
        except BaseException:
            self._runner.close()
            self._runner = None
            raise

    def handle(self, message: dict) -> list[Sent]:
        """Dispatch ``message`` as if it came from the bus; return what the handler sent."""
        if self._runner is None:
            raise RuntimeError("start the communicator first (or use it in a with block)")
        return self._runner.run(self._async.handle(message))

    def stop(self) -> list[Sent]:
        """Stop the consumer (run on_stop, leave groups) and close the event loop."""
        if self._runner is None:
            return []
        try:
            return self._runner.run(self._async.stop())
        finally:
            self._runner.close()
            self._runner = None

    def __enter__(self) -> "Communicator":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
