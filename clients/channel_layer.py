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
from views or tasks leaks nothing. Process-specific channels from ``new_channel()`` belong to
the client of the loop that made them, so receive them on that loop (as consumers do).

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
import types
import weakref

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from .asyncio import AsyncClient
from .core import compile_capacities
from .errors import ChannelFull as BusChannelFull
from .errors import InvalidName
from .keys import curve_options


_LEADING_FLAGS = re.compile(r"\(\?[aiLmsux]+\)")  # a global flags group, which must come first
VALID_NAMES_KEPT = 10_000  # channel names found valid, remembered so each send/receive is cheap


class BusChannelLayer(BaseChannelLayer):
    extensions = ["groups", "flush"]

    def __init__(self, hosts=None, prefix: str = "", expiry: float = 60, group_expiry: float = 86400,
                 capacity: int = 100, channel_capacity=None, timeout: float = 10.0,
                 secret_key: str | None = None, server_key: str | None = None, **kwargs) -> None:
        super().__init__(expiry=expiry, capacity=capacity, channel_capacity=channel_capacity)
        hosts = hosts or ["tcp://127.0.0.1:5555"]
        if isinstance(hosts, str):
            hosts = [hosts]
        if len(hosts) != 1:
            raise ValueError("BusChannelLayer takes exactly one broker URL in 'hosts' (sharding is not built yet)")
        if kwargs:
            raise TypeError(f"unknown BusChannelLayer CONFIG keys: {', '.join(sorted(kwargs))}")
        self.hosts = list(hosts)
        curve_options(secret_key, server_key)  # (a key that cannot be used fails here, not at first use)
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
        client = AsyncClient(
            self.hosts[0], capacity=self.capacity, expiry=self.expiry,
            group_expiry=self.group_expiry, channel_capacity=self._wire_channel_capacity,
            timeout=self.timeout, **self._keys,
        )
        self._clients[loop] = client
        if loop not in self._watched:
            self._close_with(loop)
        await client.connect()
        return client

    def _close_with(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close this loop's client when the loop closes (async_to_sync makes one per call)."""
        layer = self
        original = loop.close

        def close(self_loop, *args, **kwargs):
            layer._watched.discard(self_loop)
            client = layer._clients.pop(self_loop, None)
            if client is not None and not self_loop.is_running() and not self_loop.is_closed():
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
        client = await self._client()
        try:
            return await client.receive(self._wire(channel))
        except InvalidName as exc:
            raise TypeError(str(exc)) from exc

    async def new_channel(self, prefix: str = "specific") -> str:
        client = await self._client()
        return client.new_channel(prefix)  # the owner id is in the name; no prefix needed

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        client = await self._client()
        try:
            await client.group_add(self._wire(group), self._wire(channel))
        except InvalidName as exc:
            raise TypeError(str(exc)) from exc

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        client = await self._client()
        try:
            await client.group_discard(self._wire(group), self._wire(channel))
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
        """Close the current loop's client (others close with their loops)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    # -- names ----------------------------------------------------------------------------

    def _wire(self, name: str) -> str:
        return self._pre + name
