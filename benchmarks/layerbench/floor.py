"""The floor: the least any channel layer over one central Python ZeroMQ hop can do, to show
where the bus's figures stand against what its architecture allows.

``python floor.py`` (run by ``Services`` with ``-m layerbench.floor``) is a plain forwarder: a
ROUTER in a loop that keeps one table, channel name -> the routing id that last said it receives
it, and passes every message straight on (a message for a channel nobody receives is dropped).
``FloorLayer`` is its asyncio client with the layer methods the p2p, rtt and many scenarios use
(``send``, ``receive``, ``new_channel``, ``flush``, ``close``): a DEALER, msgpack bodies, one
queue per channel. No capacity, no expiry, no acknowledgements, no redelivery, no groups: at
most once, like the pubsub layer. Whatever the bus adds to these figures is the price of its
guarantees and of Python; whatever this measures is out of reach of any design with the same
hop.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections import deque

import msgpack
import zmq

REGISTER = b"\x00"  # first frame of "I receive this channel" (channel names never start with NUL)


def serve(bind: str) -> None:
    """The forwarder: print its endpoint, then route until SIGTERM."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVTIMEO, 200)
    router.bind(bind)
    print(f"floor forwarder listening on {router.getsockopt_string(zmq.LAST_ENDPOINT)}", flush=True)
    receivers: dict[bytes, bytes] = {}
    recv, send, again, flags = router.recv_multipart, router.send_multipart, zmq.Again, zmq.NOBLOCK
    while not stop:
        try:
            src, first, *rest = recv()
        except again:
            continue
        except ValueError:  # (a lone frame: nothing to do with it)
            continue
        if first == REGISTER:
            for channel in rest:
                receivers[channel] = src
            continue
        dest = receivers.get(first)
        if dest is not None:
            try:
                send([dest, first, *rest], flags)
            except zmq.ZMQError:
                pass
    router.close(0)
    ctx.term()


class FloorLayer:
    """A minimal asyncio channel layer over the floor forwarder (see the module docstring)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._sock = None
        self._queues: dict[bytes, deque] = {}
        self._waiters: dict[bytes, asyncio.Future] = {}

    def _open(self):
        if self._sock is None:
            self._sock = zmq.Context.instance().socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.endpoint)
            asyncio.get_running_loop().add_reader(self._sock.getsockopt(zmq.FD), self._drain)
        return self._sock

    def _drain(self) -> None:
        sock = self._sock
        while sock.get(zmq.EVENTS) & zmq.POLLIN:
            channel, body = sock.recv_multipart()
            self._queues.setdefault(channel, deque()).append(body)
            waiter = self._waiters.pop(channel, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def send(self, channel: str, message: dict) -> None:
        sock = self._open()
        sock.send_multipart([channel.encode(), msgpack.packb(message, use_bin_type=True)])
        asyncio.get_running_loop().call_soon(self._drain)  # (the send may take in the FD's news)

    async def receive(self, channel: str) -> dict:
        sock, key = self._open(), channel.encode()
        if key not in self._queues:
            self._queues[key] = deque()
            sock.send_multipart([REGISTER, key])
            self._drain()
        queue = self._queues[key]
        while not queue:
            waiter = self._waiters[key] = asyncio.get_running_loop().create_future()
            await waiter
        return msgpack.unpackb(queue.popleft(), raw=False)

    async def new_channel(self, prefix: str = "specific") -> str:
        return f"{prefix}.{uuid.uuid4().hex}"

    async def flush(self) -> None:
        self._queues.clear()

    async def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.getsockopt(zmq.FD))
            self._sock.close(0)
            self._sock = None


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:*")
