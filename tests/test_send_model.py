"""Real client cores and a real Router over simulated connections, with random interleavings.

No sockets and no clock: every client is a ``ClientCore`` (the logic both front doors share),
the broker is a pure ``Router``, and what they send each other waits in FIFO queues that a
seeded random schedule delivers a few messages at a time, in any order between connections.
Senders send from many "tasks" at once (a send that needs a reply keeps its task waiting while
the others go on, as concurrent asyncio sends do), to channels at small capacities shared with
other senders, while receivers take and acknowledge at random moments; the clock jumps now and
then, so slots fall idle and are given back.

What must hold at every step: the broker never refuses a message whose ``send`` returned (a
POST into slots the client believed it held), its conservation check passes, and at the end
every message whose send returned was received exactly once, in the order each sender's task
sent it. This is the test that the concurrent-sends-at-capacity loss of issue 12 would have
failed (a SEND that crossed its own sender's grant used one of those slots).
"""

from __future__ import annotations

import random
from collections import deque

import msgpack
import pytest

from broker.protocol import wire
from broker.routing import Limits, Router
from clients.core import ClientCore
from clients.errors import BusError, ChannelFull

CHANNELS = ("work", "jobs")
SEEDS = range(120)


class Link:
    """One client's connection: frames on their way to the broker, and back."""

    def __init__(self, core: ClientCore, rid: bytes) -> None:
        self.core, self.rid = core, rid
        self.up: deque[list[bytes]] = deque()
        self.down: deque[list[bytes]] = deque()

    def flush(self) -> None:
        for kind, item in self.core.take_outgoing():
            if kind == "dealer":
                self.up.append(item)


class World:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.router = Router(Limits(), "tcp://127.0.0.1:1", started=0.0)
        self.links: list[Link] = []
        self.sent: dict[str, list[tuple]] = {}  # channel -> keys whose send returned
        self.received: dict[str, list[tuple]] = {ch: [] for ch in CHANNELS}
        self.refused_notices: list[dict] = []
        self.waiting: dict[tuple[int, int], tuple] = {}  # (link, request id) -> (task, key, channel)
        self.tasks: dict[tuple[int, int], int] = {}  # (link, task) -> next number to send
        self.busy: set[tuple[int, int]] = set()
        rng = self.rng
        self.senders = [self._connect(ClientCore(capacity=rng.choice((1, 2, 3, 5, 8, 40)),
                                                 client_id=f"send{i:04d}")) for i in range(rng.randint(1, 3))]
        self.receivers = [self._connect(ClientCore(client_id=f"recv{i:04d}", receive_window=rng.choice((1, 2, 64))))
                          for i in range(rng.randint(1, 2))]
        for index in self.receivers:
            for channel in CHANNELS:
                self.links[index].core.start_receiving(channel)
                self.links[index].flush()

    def _connect(self, core: ClientCore) -> int:
        link = Link(core, core.client_id.encode())
        self.links.append(link)
        rid, frames = core.hello()
        [hello] = self.router.handle(link.rid, frames, self.now)
        core.on_hello(msgpack.unpackb(hello.frames[1]), 0.0, self.now)
        return len(self.links) - 1

    # -- the moves ------------------------------------------------------------------------

    def send(self, index: int) -> None:
        """A task of sender ``index`` that is not waiting for a reply sends its next message."""
        task = self.rng.randrange(8)
        if (index, task) in self.busy:
            return
        link = self.links[index]
        channel = self.rng.choice(CHANNELS)
        number = self.tasks.get((index, task), 0)
        key = (index, task, number)
        rid, frames = link.core.send(channel, {"type": "t", "key": list(key)}, self.now,
                                     alone=self.rng.random() < 0.5)
        if rid is None:  # a POST: send() has returned
            self.tasks[(index, task)] = number + 1
            self.sent.setdefault(channel, []).append(key)
            if frames is not None:
                link.up.append(frames)
        else:
            link.flush()  # (what the core queued goes first, as both shells do)
            link.up.append(frames)
            self.busy.add((index, task))
            self.waiting[(index, rid)] = (task, key, channel)
        if self.rng.random() < 0.3:
            link.flush()

    def to_broker(self, index: int) -> None:
        link = self.links[index]
        for _ in range(self.rng.randint(1, 4)):
            if not link.up:
                return
            self._route(self.router.handle(link.rid, link.up.popleft(), self.now))

    def _route(self, outs) -> None:
        by_rid = {link.rid: link for link in self.links}
        for dest, frames, _ in outs:
            if dest is not None:
                by_rid[dest].down.append(frames)

    def to_client(self, index: int) -> None:
        link = self.links[index]
        for _ in range(self.rng.randint(1, 4)):
            if not link.down:
                break
            frames = link.down.popleft()
            if frames[0] == wire.ERROR:
                header = msgpack.unpackb(frames[1])
                if header.get("id") is None:
                    self.refused_notices.append(header)
            for event in link.core.on_dealer(frames, self.now):
                if event[0] == "reply" and event[1] is not None:
                    self._replied(index, event[1], event[2])
        link.flush()

    def _replied(self, index: int, rid: int, result) -> None:
        task, key, channel = self.waiting.pop((index, rid))
        self.busy.discard((index, task))
        if isinstance(result, ChannelFull):
            return  # nothing was queued: the task sends the same number again later
        assert not isinstance(result, BusError), result
        self.tasks[(index, task)] = key[2] + 1
        self.sent.setdefault(channel, []).append(key)

    def receive(self, index: int, most: int | None = None) -> None:
        core = self.links[index].core
        for channel in CHANNELS:
            for _ in range(self.rng.randint(0, 3) if most is None else most):
                message = core.pop(channel, self.now, defer_ack=self.rng.random() < 0.5)
                if message is None:
                    break
                self.received[channel].append(tuple(message["key"]))
        if self.rng.random() < 0.7:
            core.flush_acks()
        self.links[index].flush()

    def tick(self) -> None:
        self.now += self.rng.choice((0.001, 0.01, 0.5, 2.5))
        self._route(self.router.tick(self.now))
        for index in self.senders:
            self.links[index].core.release_idle(self.now)
            self.links[index].flush()

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.35:
            self.send(self.rng.choice(self.senders))
        elif roll < 0.6:
            self.to_broker(self.rng.randrange(len(self.links)))
        elif roll < 0.85:
            self.to_client(self.rng.randrange(len(self.links)))
        elif roll < 0.97:
            self.receive(self.rng.choice(self.receivers))
        else:
            self.tick()
        assert not self.refused_notices, self.refused_notices
        self.router.check()

    def settle(self) -> None:
        """Deliver everything, take everything, until nothing moves."""
        for _ in range(10_000):
            moved = False
            for index, link in enumerate(self.links):
                if link.up or link.down:
                    moved = True
                    self.to_broker(index)
                    self.to_client(index)
            for index in self.receivers:
                before = sum(map(len, self.received.values()))
                self.receive(index, most=1_000)
                moved = moved or sum(map(len, self.received.values())) != before
                if self.links[index].core.pending_acks:
                    self.links[index].core.flush_acks()
                    self.links[index].flush()
                    moved = True
            for index in self.senders:
                self.links[index].flush()
            if not moved:
                return
        raise AssertionError("the simulation did not settle")


@pytest.mark.parametrize("seed", SEEDS)
def test_every_send_that_returned_is_received_exactly_once_in_order(seed):
    world = World(seed)
    for _ in range(600):
        world.step()
    world.settle()
    assert not world.refused_notices, world.refused_notices
    assert not world.waiting, "a request was never answered"
    for channel in CHANNELS:
        sent, got = world.sent.get(channel, []), world.received[channel]
        assert sorted(got) == sorted(sent), (channel, set(sent) ^ set(got))
        by_task: dict[tuple, list[int]] = {}
        for index, task, number in got:
            by_task.setdefault((index, task), []).append(number)
        if len(world.receivers) == 1:  # (two receivers take in their own order)
            assert all(numbers == sorted(numbers) for numbers in by_task.values()), "out of order"
    world.router.check()
