"""Fixtures and helpers for the channel layer conformance tests (tests/test_channel_layer*.py).

``layer_factory(**config)`` builds a ``BusChannelLayer`` on the test's thread broker (the
``broker`` fixture of conftest.py) with CONFIG keys as channels_redis takes them. A layer keeps
one client per event loop and closes it when that loop closes, so every ``asyncio.run`` of a
test cleans up after itself; at teardown the factory checks that no client of its layers is
still connected to the broker.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from clients.channel_layer import BusChannelLayer

RECEIVE_SECONDS = 10.0  # a message that should come has this long to come
QUIET_SECONDS = 0.3  # a message that should not come has had this long to come
DISCONNECT_SECONDS = 5.0


def _factory(hosts: list[str]):
    layers: list[BusChannelLayer] = []

    def make(**config) -> BusChannelLayer:
        config.setdefault("hosts", hosts)
        layer = BusChannelLayer(**config)
        layers.append(layer)
        return layer

    return make, layers


@pytest.fixture
def layer_factory(broker):
    """``layer_factory(**config)``: a BusChannelLayer on ``broker`` (hosts filled in)."""
    make, layers = _factory([broker.url])
    yield make
    for layer in layers:
        assert not layer._clients, f"a layer still holds clients for open loops: {layer._clients}"


@pytest.fixture(params=[1, 3], ids=["1-broker", "3-brokers"])
def sharded_layer_factory(request, broker, broker_factory):
    """``layer_factory`` on one broker (``broker``), then on three: ``broker`` and two more,
    as a sharded bus (the layer's conformance runs on both)."""
    hosts = [broker.url] + [broker_factory().url for _ in range(request.param - 1)]
    make, layers = _factory(hosts)
    yield make
    for layer in layers:
        assert not layer._clients, f"a layer still holds clients for open loops: {layer._clients}"


def run(coro):
    """Run a coroutine in a new event loop (closed afterwards, which closes the layer's client)."""
    return asyncio.run(coro)


async def receive(layer, channel: str, timeout: float = RECEIVE_SECONDS) -> dict:
    """``layer.receive(channel)`` that fails the test instead of hanging."""
    try:
        return await asyncio.wait_for(layer.receive(channel), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"nothing arrived on {channel!r} within {timeout:g} s") from None


async def nothing_on(layer, channel: str, timeout: float = QUIET_SECONDS) -> None:
    """Assert that ``channel`` delivers nothing within ``timeout`` (the receive is cancelled,
    which the layer must survive without losing a later message)."""
    try:
        message = await asyncio.wait_for(layer.receive(channel), timeout)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"{channel!r} unexpectedly delivered {message!r}")


async def drain(layer, channel: str, timeout: float = QUIET_SECONDS) -> list[dict]:
    """Everything ``channel`` delivers until ``timeout`` passes with nothing."""
    got = []
    while True:
        try:
            got.append(await asyncio.wait_for(layer.receive(channel), timeout))
        except asyncio.TimeoutError:
            return got


async def settle(layer) -> None:
    """Return once this loop's client has taken in every group message published before the
    call: a marker message sent to a fresh group of its own comes after them on the same
    PUB/SUB connection. (Group messages for process-specific channels are checked against
    capacity when they reach the owning client, so tests of overflow settle before receiving.)"""
    marker = await layer.new_channel()
    group = "settle-" + marker.rpartition("!")[2]
    await layer.group_add(group, marker)
    await layer.group_send(group, {"type": "settle.marker"})
    assert await receive(layer, marker) == {"type": "settle.marker"}
    await layer.group_discard(group, marker)


def wait_for_peers(broker, count: int, timeout: float = DISCONNECT_SECONDS) -> int:
    """Wait until the broker has at most ``count`` connected clients; return how many it has."""
    deadline = time.monotonic() + timeout
    while True:
        peers = len(broker.server.router.peers)
        if peers <= count or time.monotonic() > deadline:
            return peers
        time.sleep(0.01)
