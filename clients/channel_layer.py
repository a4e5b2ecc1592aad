"""``BusChannelLayer``: a Django Channels channel layer on the channelbus broker.

::

    CHANNEL_LAYERS = {"default": {
        "BACKEND": "clients.channel_layer.BusChannelLayer",
        "CONFIG": {"hosts": ["tcp://127.0.0.1:5555"]},
    }}

With a broker that uses CURVE keys (docs/security.md), add ``"secret_key"`` (this project's
``.key_secret`` file) and ``"server_key"`` (the broker's ``.key`` file or its Z85 text) to
CONFIG; a key file that cannot be used fails when the layer is built.

One ``AsyncClient`` per running event loop, as channels_redis keeps its connections: a ZeroMQ
socket must not cross loops, and ``async_to_sync`` runs each call in a loop of its own. A
loop's client is closed when that loop closes, so repeated ``async_to_sync(layer.group_send)``
from views or tasks leaks nothing; ``close_pools()`` (channels_redis's name) closes the current
loop's now.

Process-specific channels from ``new_channel()`` belong to the layer, not to a loop, as with
channels_redis: the names carry the layer's own client id, which one client at a time holds
(the first loop's, while it lives; then the next loop's that needs it). Receiving from such a
channel, or adding it to a group, on another loop is done by that client on its own loop
(``run_coroutine_threadsafe``); with no holder, the calling loop's client takes the id over. A
holder says HELLO with ``keep``: however its connection ends (its loop closes, or it vanishes),
the broker keeps the channels' messages, including those it had pushed and were not received,
and memberships for the next holder (group messages published while no loop holds the id are
not kept: nothing subscribes).

Errors follow the layer specification: ``channels.exceptions.ChannelFull`` from ``send``,
``TypeError`` for an invalid name; every other bus error is a ``clients.BusError``.

``prefix`` (default empty) namespaces every channel and group name on the broker, so several
projects can share one broker: the wire name is ``<prefix>.<name>``. ``channel_capacity``
patterns match the name without the prefix. The broker's name rules apply to the wire name, so a
prefix shortens the longest name you can use by ``len(prefix) + 1``; ``flush()`` empties the
whole broker, whatever the prefix.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import secrets
import threading
import time
import types
import weakref

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from .asyncio import AsyncClient
from .core import compile_capacities
from broker.protocol.errors import ProtocolError
from broker.protocol.names import check_channel, owner_of

from .errors import BusError
from .errors import ChannelFull as BusChannelFull
from .errors import InvalidName
from .keys import curve_options
from .placement import split_urls


_LEADING_FLAGS = re.compile(r"\(\?[aiLmsux]+\)")  # a global flags group, which must come first
VALID_NAMES_KEPT = 10_000  # channel names found valid, remembered so each send/receive is cheap


class BusChannelLayer(BaseChannelLayer):
    extensions = ["groups", "flush"]

    def __init__(self, hosts=None, prefix: str = "", expiry: float = 60, group_expiry: float = 86400,
                 capacity: int = 100, channel_capacity=None, timeout: float = 10.0,
                 secret_key: str | None = None, server_key: str | None = None, **kwargs) -> None:
        super().__init__(expiry=expiry, capacity=capacity, channel_capacity=channel_capacity)
        hosts = split_urls(hosts or ["tcp://127.0.0.1:5555"])  # (several: the bus is sharded)
        if kwargs:
            raise TypeError(f"unknown BusChannelLayer CONFIG keys: {', '.join(sorted(kwargs))}")
        self.hosts = list(hosts)
        for each in (server_key if isinstance(server_key, (list, tuple)) else [server_key]):
            curve_options(secret_key, each)  # (a key that cannot be used fails here, not at first use)
        self._keys = {"secret_key": secret_key, "server_key": server_key}
        self.prefix = prefix
        self.group_expiry = group_expiry
        self.timeout = timeout
        self._pre = f"{prefix}." if prefix else ""
        # As in channels_redis: compiled (pattern, capacity) pairs, so get_capacity() works.
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self._wire_channel_capacity = self._wire_capacities(channel_capacity or {})
        compile_capacities(self._wire_channel_capacity)  # a bad pattern or value fails here, not at first use
        self._clients: dict[asyncio.AbstractEventLoop, AsyncClient] = {}
        self._watched: weakref.WeakSet = weakref.WeakSet()  # loops whose close() is wrapped
        self.client_id = secrets.token_hex(6)  # the owner of the names new_channel() makes
        self._home: tuple[asyncio.AbstractEventLoop, AsyncClient] | None = None  # who holds it
        self._home_lock = threading.Lock()  # (loops in several threads may race to hold it)
        self._valid_channels: set[str] = set()

    def _wire_capacities(self, channel_capacity) -> dict:
        """channel_capacity patterns rewritten to match names with the prefix in front."""
        if not self._pre:
            return dict(channel_capacity)
        result = {}
        for pattern, capacity in channel_capacity.items():
            if isinstance(pattern, str):
                pattern = re.compile(re.escape(self._pre) + fnmatch.translate(pattern))
            elif isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, str):
                # Its anchor goes (the prefix is the start now), and so do its leading inline
                # flags, which pattern.flags holds anyway: inside the group they are an error.
                source = pattern.pattern
                while match := _LEADING_FLAGS.match(source):
                    source = source[match.end():]
                source = source[2:] if source.startswith("\\A") else source.lstrip("^")
                pattern = re.compile(re.escape(self._pre) + "(?:" + source + ")", pattern.flags)
            result[pattern] = capacity  # (anything else is refused by compile_capacities)
        return result

    def require_valid_channel_name(self, name, receive=False):
        """The specification's check (TypeError), remembered for names that passed it: every
        send and receive checks its channel, and a consumer uses the same few names."""
        if not receive and type(name) is str and name in self._valid_channels:
            return True
        super().require_valid_channel_name(name, receive)
        if not receive:
            if len(self._valid_channels) >= VALID_NAMES_KEPT:
                self._valid_channels.clear()
            self._valid_channels.add(name)
        return True

    # -- one client per loop --------------------------------------------------------------

    async def _client(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is not None:
            return client  # (its own calls connect it, again if the first attempt failed)
        with self._home_lock:  # the first loop's client holds the layer's id, if it is free
            client = self._new_client(home=self._home is None)
            self._clients[loop] = client
            if client._core.resumable:
                self._home = (loop, client)
        if loop not in self._watched:
            self._close_with(loop)
        await self._connect(client)
        return client

    def _new_client(self, home: bool) -> AsyncClient:
        return AsyncClient(
            self.hosts, capacity=self.capacity, expiry=self.expiry,
            group_expiry=self.group_expiry, channel_capacity=self._wire_channel_capacity,
            timeout=self.timeout, client_id=self.client_id if home else None, resumable=home,
            **self._keys,
        )

    async def _connect(self, client: AsyncClient) -> None:
        """Connect (shielded: a caller cancelled meanwhile, a receive under wait_for, does not
        cut the connection short for the next one)."""
        if client._ready_loop is None:
            await asyncio.shield(self._connect_now(client))

    async def _connect_now(self, client: AsyncClient) -> None:
        """Connect; a client taking over the layer's id waits (up to ``timeout``) while the
        broker has not yet heard the previous holder's BYE (``id-taken``)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return await client.connect()
            except BusError as exc:
                if exc.code != "id-taken" or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.02)

    async def _holder(self) -> AsyncClient | None:
        """The client that holds the layer's id if it is on this loop (made here if nobody
        holds it); None if a client on another loop holds it."""
        loop = asyncio.get_running_loop()
        home = self._home
        if home is not None and home[0] is loop:
            await self._connect(home[1])  # (no-op once connected)
            return home[1]
        if home is None and loop not in self._clients:
            await self._client()  # (takes the id, unless another loop just did)
            return await self._holder()
        with self._home_lock:
            if self._home is not None:
                return None if self._home[0] is not loop else self._home[1]
            client = self._new_client(home=True)  # this loop's own client has another id
            self._home = (loop, client)
        if loop not in self._watched:
            self._close_with(loop)
        await self._connect(client)
        return client

    async def _as_holder(self, method: str, *args):
        """``client.method(*args)`` by the client that holds the layer's id, on its loop."""
        client = await self._holder()
        if client is not None:
            return await getattr(client, method)(*args)
        home = self._home
        if home is None:  # (its loop let go of it meanwhile: this loop takes it)
            return await self._as_holder(method, *args)
        loop, client = home
        if not loop.is_running() or loop.is_closed():
            raise BusError(
                "this layer's process-specific channels are held by the client of an event loop"
                " that is not running; run the call on that loop, or close it first"
            )
        if method != "receive":
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(getattr(client, method)(*args), loop))
        return await _Handoff(client, loop, args[0]).receive()

    def _release_home(self, loop: asyncio.AbstractEventLoop) -> AsyncClient | None:
        """The holder on ``loop`` (if any) lets go of the layer's id; returned for closing."""
        with self._home_lock:
            if self._home is not None and self._home[0] is loop:
                client, self._home = self._home[1], None
                return client
        return None

    def _owned(self, wire_name: str) -> bool:
        return owner_of(wire_name) == self.client_id

    def _close_with(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close this loop's client when the loop closes (async_to_sync makes one per call)."""
        layer = self
        original = loop.close

        def close(self_loop, *args, **kwargs):
            layer._watched.discard(self_loop)
            clients = {layer._clients.pop(self_loop, None), layer._release_home(self_loop)} - {None}
            if clients and not self_loop.is_running() and not self_loop.is_closed():
                for client in clients:
                    self_loop.run_until_complete(client.close())
            self_loop.close = original
            return original(*args, **kwargs)

        loop.close = types.MethodType(close, loop)
        self._watched.add(loop)

    # -- the layer specification ----------------------------------------------------------

    async def send(self, channel: str, message: dict) -> None:
        self.require_valid_channel_name(channel)
        client = await self._client()
        try:
            await client.send(self._wire(channel), message)
        except BusChannelFull as exc:
            raise ChannelFull(str(exc)) from exc
        except InvalidName as exc:
            raise TypeError(str(exc)) from exc

    async def receive(self, channel: str) -> dict:
        self.require_valid_channel_name(channel)
        name = self._wire(channel)
        try:
            if self._owned(name):
                return await self._as_holder("receive", name)
            client = await self._client()
            return await client.receive(name)
        except InvalidName as exc:
            raise TypeError(str(exc)) from exc

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name, the layer's. Its holder is connected on return
        (this loop's client, unless another loop's holds the id), so that a group_add of it
        from anywhere is confirmed at once."""
        name = f"{prefix}.{self.client_id}!{secrets.token_hex(6)}"
        try:
            check_channel(self._wire(name))
        except ProtocolError as err:
            raise TypeError(err.message) from None
        await self._holder()
        return name

    async def group_add(self, group: str, channel: str) -> None:
        await self._membership("group_add", group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        await self._membership("group_discard", group, channel)

    async def _membership(self, method: str, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        names = (self._wire(group), self._wire(channel))
        try:
            if self._owned(names[1]):  # (its holder subscribes: no JOIN hand-over needed)
                await self._as_holder(method, *names)
            else:
                await getattr(await self._client(), method)(*names)
        except InvalidName as exc:
            raise TypeError(str(exc)) from exc

    async def group_send(self, group: str, message: dict) -> None:
        self.require_valid_group_name(group)
        client = await self._client()
        try:
            await client.group_send(self._wire(group), message, wait=False)  # (no counts needed)
        except InvalidName as exc:
            raise TypeError(str(exc)) from exc

    async def flush(self) -> None:
        client = await self._client()
        await client.flush()

    async def close(self) -> None:
        """Close the current loop's clients (others close with their loops)."""
        loop = asyncio.get_running_loop()
        for client in {self._clients.pop(loop, None), self._release_home(loop)} - {None}:
            await client.close()

    async def close_pools(self) -> None:
        """channels_redis's name for closing the layer's connections: the current loop's (the
        clients of other loops close with those loops). The layer stays usable: a later call
        connects again."""
        await self.close()

    # -- names ----------------------------------------------------------------------------

    def _wire(self, name: str) -> str:
        return self._pre + name


class _Handoff:
    """A receive on the holder's loop for a caller on another loop, which loses nothing if the
    caller is cancelled: whichever side learns first that the other gave up (the holder that
    the caller was cancelled, or the caller that the holder had already taken a message) puts
    the message back at the front of its channel, on the holder's loop. (The message is kept
    here, not only in the future's result: a cancelled future drops its result.)"""

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop, channel: str) -> None:
        self.client, self.loop, self.channel = client, loop, channel
        self.lock = threading.Lock()
        self.cancelled = False
        self.message: dict | None = None  # taken by the holder for the caller

    async def _take(self):
        message = await self.client.receive(self.channel)  # (cancelled, it loses nothing)
        with self.lock:
            if self.cancelled:
                self.client._give_back(self.channel, message)
                return None
            self.message = message
        return message

    async def receive(self) -> dict:
        future = asyncio.run_coroutine_threadsafe(self._take(), self.loop)
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            with self.lock:
                self.cancelled = True
                message = self.message
            if message is not None:  # taken for us, and we are gone: back it goes
                self.loop.call_soon_threadsafe(self.client._give_back, self.channel, message)
            else:
                future.cancel()
            raise
        return self.message
