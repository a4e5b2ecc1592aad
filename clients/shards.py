"""A client of several brokers: ``Client([url, ...])`` and ``AsyncClient([url, ...])``.

Each broker of the list is an independent shard; the client holds one ordinary client per
broker, all with the same client id, and sends each call to the broker that
``clients.placement`` names: a channel's (by its name, or by its owner's client id if it is
process-specific), a group's (by its name). Every client must be given the same list in the
same order; each per-broker client tells its broker where it stands in the list (HELLO
``shard``), and a broker that earlier clients placed elsewhere refuses it (``wrong-shard``).

What arrives for this process (channel messages pushed by a channel's broker, group messages
published by a group's broker) goes into **one** set of local queues, shared by the per-broker
clients: a process-specific channel that is a member of groups on other brokers gets their
messages in the same queue as its own. A message pushed by a broker is acknowledged to that
broker (its queue entry remembers which core took it).

With CURVE keys, ``server_key`` is one key all brokers use, or a list of each broker's own
public key in the order of the brokers; ``secret_key`` is this client's, for all of them.

Faults stay local: a broker that is down costs the names placed on it (``BrokerUnavailable``
within the timeout); the others go on, and a per-broker client whose broker comes back replays
its registrations there as a single client does.

Not supported across shards: a normal (not process-specific) channel as a member of a group
placed on another broker (its copies would wait on the group's broker, where its receivers do
not look); ``group_add`` refuses it with a BusError naming both brokers.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from .errors import BusError, ReceiveTimeout
from .placement import broker_of_channel, broker_of_group

SYNC_SLICE = 0.005  # seconds a blocking receive waits on its channel's broker before looking at the others


def _per_broker(urls: list[str], settings: dict) -> list[dict]:
    """Each broker's settings: the same for all, except ``server_key``, which may be a list
    (each broker's own public key, in the order of the brokers) or one key they all use."""
    server_key = settings.pop("server_key", None)
    if isinstance(server_key, (list, tuple)):
        if len(server_key) != len(urls):
            raise BusError(f"server_key lists {len(server_key)} keys for {len(urls)} brokers: give one key"
                           " for all, or one per broker in the order of the brokers")
        keys = list(server_key)
    else:
        keys = [server_key] * len(urls)
    return [{**settings, "shard": (index, len(urls)), **({"server_key": key} if key is not None else {})}
            for index, key in enumerate(keys)]


def _share_inbox(clients) -> None:
    """Make the per-broker cores use one set of local queues (and of their take times)."""
    first = clients[0]._core
    for client in clients[1:]:
        client._core.queues = first.queues
        client._core.taken_at = first.taken_at


def _check_member(count: int, group: str, channel: str) -> None:
    from broker.protocol.names import owner_of

    if owner_of(channel) is None:
        home, host = broker_of_channel(channel, count), broker_of_group(group, count)
        if home != host:
            raise BusError(
                f"{channel!r} is a normal channel placed on broker {home + 1} of {count}, and group"
                f" {group!r} on broker {host + 1}: across brokers only process-specific channels"
                " (new_channel()) can be group members", channel=channel, group=group,
            )


def _merge_stats(samples: list[dict], urls: list[str]) -> dict:
    """The brokers' STATS, each under ``brokers``, and their totals at the top level."""
    total: dict = {"brokers": [{"url": url, **sample} for url, sample in zip(urls, samples)]}
    for key in ("clients", "channels", "queued", "inflight", "reserved", "bytes_held", "max_memory", "groups"):
        total[key] = sum(sample.get(key, 0) for sample in samples)
    total["uptime"] = min(sample.get("uptime", 0.0) for sample in samples)
    counters: dict = {}
    forbidden: dict = {}
    for sample in samples:
        for name, value in sample.get("counters", {}).items():
            counters[name] = counters.get(name, 0) + value
        for key, value in sample.get("forbidden_by_key", {}).items():
            forbidden[key] = forbidden.get(key, 0) + value
    total["counters"], total["forbidden_by_key"] = counters, forbidden
    top = max((len(sample.get("top_channels", [])) for sample in samples), default=0)
    total["top_channels"] = sorted((row for s in samples for row in s.get("top_channels", [])),
                                   key=lambda row: -row[1])[:top]
    total["top_groups"] = sorted((row for s in samples for row in s.get("top_groups", [])),
                                 key=lambda row: -row[1])[:top]
    return total


class _Shards:
    """What both sharded clients share: the per-broker clients, placement, and the calls that
    need no I/O."""

    def _make(self, urls, client_class, settings: dict) -> None:
        self.urls = list(urls)
        self.timeout = settings.get("timeout", 10.0)
        client_id = settings.pop("client_id", None) or secrets.token_hex(6)
        self.clients = []
        try:
            for url, each in zip(self.urls, _per_broker(self.urls, settings)):
                self.clients.append(client_class(url, client_id=client_id, **each))
        except BaseException:
            for client in self.clients:
                result = client.close()
                if asyncio.iscoroutine(result):
                    result.close()  # (an AsyncClient never connected holds no sockets)
            raise
        _share_inbox(self.clients)
        self._core = self.clients[0]._core  # (the client id, the shared queues)

    def _for_channel(self, channel: str):
        return self.clients[broker_of_channel(channel, len(self.clients))]

    def _for_group(self, group: str):
        return self.clients[broker_of_group(group, len(self.clients))]

    def add_listener(self, listener) -> None:
        for client in self.clients:
            client.add_listener(listener)

    @property
    def client_id(self) -> str:
        return self._core.client_id

    @property
    def counters(self) -> dict:
        totals: dict = {}
        for client in self.clients:
            for key, value in client.counters.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def new_channel(self, prefix: str = "specific") -> str:
        return self.clients[0].new_channel(prefix)


class ShardedAsyncClient(_Shards):
    """``AsyncClient`` over several brokers (see the module docstring); the same API."""

    def __init__(self, urls: list[str], client_class, **settings) -> None:
        self._make(urls, client_class, settings)
        first = self.clients[0]
        for client in self.clients[1:]:
            client._arrivals = first._arrivals  # (a group message from any broker wakes receivers)

    async def connect(self) -> None:
        """Connect to every broker. Raises only if none can be reached: a broker that is down
        costs the names placed on it, whose calls connect again (or raise BrokerUnavailable)."""
        results = await asyncio.gather(*(c.connect() for c in self.clients), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == len(results):
            raise errors[0]
        for error in errors:
            if not isinstance(error, BusError):
                raise error

    @property
    def _ready_loop(self):
        return next((c._ready_loop for c in self.clients if c._ready_loop is not None), None)

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)

    async def send(self, channel: str, message: dict) -> None:
        await self._for_channel(channel).send(channel, message)

    async def receive(self, channel: str, timeout: float | None = None) -> dict:
        return await self._for_channel(channel).receive(channel, timeout)

    async def group_add(self, group: str, channel: str) -> None:
        _check_member(len(self.clients), group, channel)
        await self._for_group(group).group_add(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        await self._for_group(group).group_discard(group, channel)

    async def group_send(self, group: str, message: dict, *, wait: bool = True) -> dict | None:
        return await self._for_group(group).group_send(group, message, wait=wait)

    async def flush(self) -> None:
        for client in self.clients:
            await client.flush()

    async def ping(self) -> float:
        return max(await asyncio.gather(*(c.ping() for c in self.clients)))

    async def stats(self, top: int = 10) -> dict:
        return _merge_stats(list(await asyncio.gather(*(c.stats(top) for c in self.clients))), self.urls)

    def _give_back(self, channel: str, message: dict) -> None:
        self._for_channel(channel)._give_back(channel, message)


class ShardedClient(_Shards):
    """``Client`` over several brokers (see the module docstring); the same API. A receive
    waits on its channel's broker in slices of SYNC_SLICE seconds, and between them takes in
    what the other brokers sent (group messages for its channel may come from any of them)."""

    def __init__(self, urls: list[str], client_class, **settings) -> None:
        self._make(urls, client_class, settings)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def send(self, channel: str, message: dict) -> None:
        self._for_channel(channel).send(channel, message)

    def receive(self, channel: str, timeout: float | None = None) -> dict:
        home = self._for_channel(channel)
        others = [c for c in self.clients if c is not home]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for client in others:
                client._pump()
            left = None if deadline is None else deadline - time.monotonic()
            try:
                return home.receive(channel, timeout=SYNC_SLICE if left is None else max(0.0, min(SYNC_SLICE, left)))
            except ReceiveTimeout:
                if left is not None and left <= SYNC_SLICE:
                    raise ReceiveTimeout(f"no message on {channel!r} within {timeout:g} s",
                                         channel=channel, timeout=timeout) from None

    def group_add(self, group: str, channel: str) -> None:
        _check_member(len(self.clients), group, channel)
        self._for_group(group).group_add(group, channel)

    def group_discard(self, group: str, channel: str) -> None:
        self._for_group(group).group_discard(group, channel)

    def group_send(self, group: str, message: dict, *, wait: bool = True) -> dict | None:
        return self._for_group(group).group_send(group, message, wait=wait)

    def flush(self) -> None:
        for client in self.clients:
            client.flush()

    def ping(self) -> float:
        return max(client.ping() for client in self.clients)

    def stats(self, top: int = 10) -> dict:
        return _merge_stats([client.stats(top) for client in self.clients], self.urls)
