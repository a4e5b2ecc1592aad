"""``AsyncClient``: the asyncio front door over ``ClientCore``. Mirrors ``clients.sync``.

An AsyncClient belongs to the event loop that connected it (ZeroMQ sockets must not cross loops
or threads); using it from another loop raises RuntimeError. The sockets are plain ZeroMQ
sockets read from the loop with ``add_reader`` on their (edge-triggered) FD, drained until empty
after every wake-up and every send.
"""

from __future__ import annotations

import asyncio
import time

import zmq

from broker.protocol.names import CONTROL_TOPIC

from .core import CLOSE_LINGER_MS, ClientCore, publisher_url
from .errors import BrokerUnavailable, BusError, ReceiveTimeout
from .sync import DEFAULT_URL

DRAIN_BATCH = 512


class _Expired(Exception):
    """A wait's own timer fired (cheaper than asyncio.wait_for, which wraps a task)."""


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(_Expired())


class AsyncClient:
    """An asyncio connection to a channelbus broker; same settings and API as ``Client``.

    Use ``async with AsyncClient(url) as client:`` or ``await client.connect()``.
    """

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 10.0, context: zmq.Context | None = None,
                 **settings) -> None:
        self.url = url
        self.timeout = timeout
        self._core = ClientCore(**settings)
        self._context = context or zmq.Context.instance()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._arrivals: dict[object, list[asyncio.Future]] = {}  # channel or marker key -> waiters
        self._drain_scheduled = False
        self._ack_scheduled = False
        self._sync_timer: asyncio.TimerHandle | None = None
        self._release_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._connecting: asyncio.Future | None = None

    @property
    def client_id(self) -> str:
        return self._core.client_id

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the sockets and say HELLO (idempotent). Raises BrokerUnavailable, LimitExceeded."""
        if self._loop is not None:
            self._check_loop()
            if self._connecting is not None:
                await asyncio.shield(self._connecting)
            return
        if self._closed:
            raise BusError("the client is closed")
        self._loop = asyncio.get_running_loop()
        self._connecting = self._loop.create_future()
        try:
            await self._open()
            self._connecting.set_result(None)
        except BaseException as exc:
            self._connecting.set_exception(exc)
            self._connecting.exception()  # mark retrieved
            self._teardown(BusError(f"connecting to {self.url} failed: {exc}"), goodbye=False)
            self._loop = self._connecting = None  # a later call tries again
            raise

    async def _open(self) -> None:
        self._dealer = self._context.socket(zmq.DEALER)
        self._sub = self._context.socket(zmq.SUB)
        for sock in (self._dealer, self._sub):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.IPV6, 1)
            sock.setsockopt(zmq.SNDHWM, 0)
        self._dealer.setsockopt(zmq.ROUTING_ID, self._core.client_id.encode())
        self._dealer.connect(self.url)
        self._loop.add_reader(self._dealer.getsockopt(zmq.FD), self._drain)
        self._loop.add_reader(self._sub.getsockopt(zmq.FD), self._drain)
        self._core.on_hello(await self._call(*self._core.hello()), time.time())
        self._sub.connect(publisher_url(self._core.pub_endpoint, self.url))
        self._sub.setsockopt(zmq.SUBSCRIBE, CONTROL_TOPIC)

    # -- the channel layer API --------------------------------------------------------------

    async def send(self, channel: str, message: dict) -> None:
        """Queue ``message`` on ``channel``. Raises ChannelFull, InvalidName, MessageTooLarge.

        With slots reserved on ``channel`` this returns without a round trip (see clients.core)."""
        await self.connect()
        rid, frames = self._core.send(channel, message, time.monotonic())
        if rid is not None:
            await self._call(rid, frames)
            return
        self._check_loop()
        self._flush_outgoing()  # acks of messages taken so far go first
        self._dealer.send_multipart(frames, zmq.NOBLOCK)
        if self._core.refilling:
            self._drain()  # take in grants now: a sender that never yields still gets them
        else:
            self._flush_outgoing()
        if self._release_timer is None:
            self._arm_release_timer()

    async def group_send(self, group: str, message: dict) -> dict:
        """Send to every member of ``group``; full members are skipped, never raised."""
        await self.connect()
        reply = await self._call(*self._core.group_send(group, message))
        return {"queued": reply.get("queued", 0), "full": reply.get("full", 0)}

    async def receive(self, channel: str, timeout: float | None = None) -> dict:
        """The next message of ``channel``. Cancelling it loses and doubles nothing.

        Raises ReceiveTimeout when ``timeout`` seconds pass with no message."""
        await self.connect()
        core = self._core
        core.start_receiving(channel)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            message = core.pop(channel, time.monotonic(), defer_ack=True)
            if message is not None:
                if not self._ack_scheduled:  # one ACK for what this loop iteration takes
                    self._ack_scheduled = True
                    self._loop.call_soon(self._send_acks)
                return message
            self._flush_outgoing()
            if not await self._arrival(channel, deadline):
                raise ReceiveTimeout(f"no message on {channel!r} within {timeout:g} s",
                                     channel=channel, timeout=timeout)

    def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name owned by this client (no round trip)."""
        return self._core.new_channel(prefix)

    async def group_add(self, group: str, channel: str) -> None:
        """Add ``channel`` to ``group``; on return every later group_send reaches it."""
        await self.connect()
        core = self._core
        rid, frames = core.group_add(group, channel)
        self._flush_outgoing()
        try:
            await self._call(rid, frames)
        except BaseException:
            core.abandon(group, channel)
            self._flush_outgoing()
            raise
        core.expect_marker(group, channel, time.monotonic())
        self._arm_sync_timer()
        deadline = time.monotonic() + self.timeout
        key = ("marker", group, channel)
        while core.marker_pending(group, channel):
            if not await self._arrival(key, deadline):
                core.abandon(group, channel)
                self._flush_outgoing()
                raise BrokerUnavailable(
                    f"group_add({group!r}, {channel!r}): the broker's subscription marker did not"
                    f" arrive within {self.timeout:g} s", endpoint=self.url, timeout=self.timeout,
                )
        failure = core.marker_failure(group, channel)
        if failure is not None:
            raise failure

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group`` (not an error if it was not a member)."""
        await self.connect()
        await self._call(*self._core.group_discard(group, channel))

    async def flush(self) -> None:
        """Drop every queued message and group membership in the broker."""
        await self.connect()
        await self._call(*self._core.flush())
        self._core.flushed()
        self._flush_outgoing()

    async def ping(self) -> float:
        """One round trip to the broker; returns its duration in seconds."""
        await self.connect()
        start = time.perf_counter()
        await self._call(*self._core.ping())
        return time.perf_counter() - start

    async def stats(self, top: int = 10) -> dict:
        """The broker's figures: clients, the ``top`` deepest channels and largest groups,
        counters, memory held, uptime (fields in docs/protocol.md, STATS)."""
        await self.connect()
        reply = await self._call(*self._core.stats(top))
        reply.pop("id", None)
        return reply

    async def close(self) -> None:
        """Tell the broker goodbye and close the sockets. Safe to call twice."""
        if self._closed:
            return
        if self._loop is not None and self._core.unconfirmed:
            try:  # POSTs may still sit in the socket: a round trip sees them through
                await self.ping()
            except BusError:
                pass
        self._closed = True
        if self._loop is not None:
            self._teardown(BusError("the client was closed"), goodbye=True)

    def _teardown(self, reason: BusError, goodbye: bool) -> None:
        """Stop timers and readers, (say goodbye,) close the sockets, fail every waiter."""
        for timer in (self._sync_timer, self._release_timer):
            if timer is not None:
                timer.cancel()
        self._sync_timer = self._release_timer = None
        sockets = [sock for sock in (getattr(self, "_dealer", None), getattr(self, "_sub", None)) if sock]
        for sock in sockets:
            try:
                self._loop.remove_reader(sock.getsockopt(zmq.FD))
            except (zmq.ZMQError, ValueError, RuntimeError):
                pass
        if goodbye:
            try:
                for frames in self._core.goodbye():
                    self._dealer.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        # A short linger lets the last ACK and BYE leave (a dropped ACK would have the broker
        # hand consumed messages to someone else); close() itself does not wait for it.
        for sock in sockets:
            sock.close(linger=CLOSE_LINGER_MS if goodbye and sock is self._dealer else 0)
        for fut in [*self._pending.values(), *(f for waiters in self._arrivals.values() for f in waiters)]:
            if not fut.done():
                fut.set_exception(reason)
                fut.exception()
        self._pending.clear()
        self._arrivals.clear()

    # -- I/O ------------------------------------------------------------------------------

    def _check_loop(self) -> None:
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                "this AsyncClient belongs to another event loop; create one client per loop"
            )

    async def _call(self, rid: int, frames: list[bytes]) -> dict:
        if self._closed:
            raise BusError("the client is closed")
        self._check_loop()
        future = self._pending[rid] = self._loop.create_future()
        self._flush_outgoing()  # what the core queued (acks, subscriptions) goes first
        self._dealer.send_multipart(frames, zmq.NOBLOCK)
        self._schedule_drain()
        timer = self._loop.call_later(self.timeout, _expire, future)
        try:
            result = await future
        except _Expired:
            self._core.ignored.add(rid)
            raise BrokerUnavailable(
                f"no reply from the broker at {self.url} within {self.timeout:g} s",
                endpoint=self.url, timeout=self.timeout,
            ) from None
        finally:
            timer.cancel()
            self._pending.pop(rid, None)
        if isinstance(result, BusError):
            raise result
        return result

    def _send_acks(self) -> None:
        self._ack_scheduled = False
        if not self._closed:
            self._core.flush_acks()
            self._flush_outgoing()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self._closed and self._loop is not None:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Read everything both sockets hold (up to a batch), then send what follows."""
        self._drain_scheduled = False
        if self._closed or self._dealer.closed:  # (closed, or torn down after a failed connect)
            return
        core = self._core
        more = False
        for sock, digest in ((self._dealer, core.on_dealer), (self._sub, core.on_sub)):
            for _ in range(DRAIN_BATCH):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                for event in digest(frames, time.monotonic(), time.time()):
                    self._dispatch(event)
            else:
                more = True
        self._flush_outgoing()
        self._arm_sync_timer()
        # The FDs are edge-triggered: re-check after reading and sending.
        if more or self._dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN or self._sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._schedule_drain()

    def _dispatch(self, event: tuple) -> None:
        kind = event[0]
        if kind == "reply":
            future = self._pending.get(event[1])
            if future is not None and not future.done():
                future.set_result(event[2])
            return
        key = event[1] if kind == "arrived" else event
        for waiter in self._arrivals.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def _arrival(self, key, deadline: float | None) -> bool:
        """Wait until something arrives for ``key`` (a channel, or a marker key); False when
        ``deadline`` (monotonic) passes first. Cancelling it cancels only this waiter."""
        future = self._loop.create_future()
        waiters = self._arrivals.setdefault(key, [])
        waiters.append(future)
        timer = None
        if deadline is not None:
            timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), _expire, future)
        try:
            await future
            return True
        except _Expired:
            return False
        finally:
            if timer is not None:
                timer.cancel()
            if future in waiters:
                waiters.remove(future)

    def _arm_sync_timer(self) -> None:
        if not self._core.awaiting and self._sync_timer is None:
            return
        due = self._core.due_syncs(time.monotonic())
        self._flush_outgoing()
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if due is not None and due != float("inf"):
            self._sync_timer = self._loop.call_at(
                self._loop.time() + max(0.0, due - time.monotonic()), self._drain
            )

    def _arm_release_timer(self) -> None:
        self._release_timer = None
        if self._closed:
            return
        due = self._core.release_idle(time.monotonic())
        self._flush_outgoing()
        if due is not None:
            delay = max(0.0, due - time.monotonic())
            self._release_timer = self._loop.call_later(delay, self._arm_release_timer)

    def _flush_outgoing(self) -> None:
        sent = False
        for kind, item in self._core.take_outgoing():
            if kind == "dealer":
                self._dealer.send_multipart(item, zmq.NOBLOCK)
                sent = True
            elif kind == "sub":
                self._sub.setsockopt(zmq.SUBSCRIBE, item)
            else:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, item)
        if sent:
            self._schedule_drain()
