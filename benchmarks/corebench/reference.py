"""The raw pyzmq set-ups: the reference forwarder and its blocking DEALER clients, and the
asyncio floor: the same forwarder with bare asyncio DEALER clients. Given ``--secret-key`` (and,
for the clients, ``--server-key``), the forwarder and its blocking clients use CURVE: the
reference's cost of encryption, libzmq's alone."""

from __future__ import annotations

import signal
import time

from broker.zio import readable, recv_frames, send_frames

from .common import (
    Arrivals, HOST, RECV_POLL_MS, REF_RECEIVER, REF_SENDER, RoundTrips, curve_client, curve_server, emit,
    payload_template, wait_word,
)

REPLY_WAIT = 5.0  # seconds a round trip's sender waits for the reply before it stops


def role_forwarder(args) -> None:
    """Reference forwarder: [dest, payload] from src becomes [src, payload] to dest."""
    import zmq

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.RCVTIMEO, RECV_POLL_MS)
    router.setsockopt(zmq.SNDTIMEO, 5000)
    for option, value in curve_server(args):
        router.setsockopt(option, value)
    router.bind(f"tcp://{HOST}:*")
    emit(endpoint=router.getsockopt_string(zmq.LAST_ENDPOINT))
    deadline = time.monotonic() + args.timeout
    recv, send, again = router.recv_multipart, router.send_multipart, zmq.Again
    while not stop and time.monotonic() < deadline:
        try:
            src, dest, *rest = recv()
        except again:
            continue
        except ValueError:
            continue
        try:
            if dest == b"":  # registration: answer the sender itself
                send([src, b"", b"ok"])
            else:
                send([dest, src, *rest])
        except zmq.ZMQError:  # unknown or vanished destination, or its queue stuck for 5 s
            pass
    router.close(0)
    ctx.term()


def _ref_dealer(endpoint: str, identity: bytes, curve=()):
    import zmq

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    for option, value in curve:  # (CURVE options: before connect)
        dealer.setsockopt(option, value)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, identity)
    dealer.setsockopt(zmq.RCVTIMEO, RECV_POLL_MS)
    dealer.setsockopt(zmq.SNDTIMEO, 5000)
    dealer.connect(endpoint)
    deadline = time.monotonic() + 10
    dealer.send_multipart([b"", b"hi"])  # registers our routing id with the forwarder
    while True:
        try:
            dealer.recv_multipart()
            return ctx, dealer
        except zmq.Again:
            if time.monotonic() > deadline:
                raise SystemExit("forwarder did not answer")


def role_ref_receiver(args) -> None:
    import zmq

    ctx, dealer = _ref_dealer(args.endpoint, REF_RECEIVER, curve_client(args))
    _, offset = payload_template()
    emit(ready=True)
    deadline = time.monotonic() + args.timeout
    arrivals = Arrivals()
    recv = dealer.recv_multipart
    while arrivals.count < args.messages and time.monotonic() < deadline:
        try:
            frames = recv()
        except zmq.Again:
            continue
        arrivals.see(int.from_bytes(frames[1][offset:offset + 8], "big"))
    arrivals.report()
    total = args.rtt + args.warmup
    answered = 0
    while answered < total and time.monotonic() < deadline:
        try:
            src, body = recv()
        except zmq.Again:
            continue
        dealer.send_multipart([src, body])
        answered += 1
    emit(answered=answered)
    dealer.close(0)
    ctx.term()


def _await_reply(dealer, again) -> bool:
    """Receive a round trip's reply, waiting up to REPLY_WAIT seconds (as the bus sender does):
    a loaded host can stall one for longer than a receive step, and a sender that gave up would
    leave the receiver waiting for the rest until --timeout. False if none came."""
    end = time.monotonic() + REPLY_WAIT
    while True:
        try:
            dealer.recv_multipart()
            return True
        except again:  # (RCVTIMEO: one receive step)
            if time.monotonic() > end:
                return False


def role_ref_sender(args) -> None:
    import zmq

    ctx, dealer = _ref_dealer(args.endpoint, REF_SENDER, curve_client(args))
    buf, offset = payload_template()
    emit(ready=True)
    wait_word("go")
    deadline = time.monotonic() + args.timeout
    send = dealer.send_multipart
    t0 = time.monotonic()
    sent = 0
    try:
        for seq in range(args.messages):
            buf[offset:offset + 8] = seq.to_bytes(8, "big")
            send([REF_RECEIVER, bytes(buf)])
            sent += 1
            if not seq % 1024 and time.monotonic() > deadline:
                break
    except zmq.Again:
        pass
    emit(t0=t0, sent=sent, t_sent=time.monotonic())
    wait_word("go")
    trips = RoundTrips(args, deadline)
    for seq in trips:
        buf[offset:offset + 8] = seq.to_bytes(8, "big")
        start = trips.clock()
        send([REF_RECEIVER, bytes(buf)])
        if not _await_reply(dealer, zmq.Again):
            break
        trips.took(seq, start)
    trips.report()
    dealer.close(0)
    ctx.term()


# -- the asyncio floor: the same forwarder, bare asyncio clients ------------------------------

class AsyncDealer:
    """A registered reference DEALER read from an asyncio loop through its (edge-triggered) FD,
    with nothing else: no timers, no protocol. The least an asyncio client costs on this hop."""

    def __init__(self, endpoint: str, identity: bytes) -> None:
        import asyncio
        from collections import deque

        import zmq

        self.ctx, self.sock = _ref_dealer(endpoint, identity)  # registered before the loop runs
        self._events, self._pollout = int(zmq.EVENTS), int(zmq.POLLOUT)
        self._again = zmq.Again
        self._loop = asyncio.get_running_loop()
        self._fd = self.sock.getsockopt(zmq.FD)
        self._inbox: deque = deque()
        self._waiter = None  # the one coroutine waiting to read or to write
        self._loop.add_reader(self._fd, self._wake)
        self._loop.call_soon(self._wake)  # the FD fires on changes only: look at what is there

    def _wake(self) -> None:
        sock, inbox = self.sock, self._inbox
        if sock.closed:  # (a wake scheduled by the last send)
            return
        while readable(sock):  # (the check the bus uses)
            inbox.append(recv_frames(sock))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv(self) -> list[bytes]:
        while not self._inbox:
            self._waiter = self._loop.create_future()
            await self._waiter
        return self._inbox.popleft()

    async def send(self, frames: list[bytes]) -> None:
        while True:
            try:
                send_frames(self.sock, frames)
                break
            except self._again:  # high-water mark: wait until the FD says it can write
                while not self.sock.get(self._events) & self._pollout:
                    self._waiter = self._loop.create_future()
                    await self._waiter
        if readable(self.sock):  # (a send may take in the FD's news
            self._loop.call_soon(self._wake)  # without its firing: look, as the bus client does)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        self.sock.close(0)
        self.ctx.term()


def _watchdog(seconds: float) -> None:
    """Bound a floor process that lost a message (it has no per-receive timeout)."""
    import asyncio
    import os

    asyncio.get_running_loop().call_later(seconds, os._exit, 4)


async def _floor_receiver(args) -> None:
    dealer = AsyncDealer(args.endpoint, REF_RECEIVER)
    _watchdog(args.timeout)
    _, offset = payload_template()
    emit(ready=True)
    arrivals = Arrivals()
    while arrivals.count < args.messages:
        frames = await dealer.recv()
        arrivals.see(int.from_bytes(frames[1][offset:offset + 8], "big"))
    arrivals.report()
    for _ in range(args.rtt + args.warmup):
        await dealer.send(await dealer.recv())  # [src, body] back to src
    emit(answered=args.rtt + args.warmup)
    dealer.close()


async def _floor_sender(args) -> None:
    dealer = AsyncDealer(args.endpoint, REF_SENDER)
    _watchdog(args.timeout)
    buf, offset = payload_template()
    emit(ready=True)
    wait_word("go")  # blocks the loop on purpose, as the bus sender does: nothing is in flight
    t0 = time.monotonic()
    for seq in range(args.messages):
        buf[offset:offset + 8] = seq.to_bytes(8, "big")
        await dealer.send([REF_RECEIVER, bytes(buf)])
    emit(t0=t0, sent=args.messages, t_sent=time.monotonic())
    wait_word("go")
    trips = RoundTrips(args)  # (bounded by the watchdog)
    for seq in trips:
        buf[offset:offset + 8] = seq.to_bytes(8, "big")
        start = trips.clock()
        await dealer.send([REF_RECEIVER, bytes(buf)])
        await dealer.recv()
        trips.took(seq, start)
    trips.report()
    dealer.close()


def role_floor_receiver(args) -> None:
    import asyncio

    asyncio.run(_floor_receiver(args))


def role_floor_sender(args) -> None:
    import asyncio

    asyncio.run(_floor_sender(args))
