"""``AsyncClient``: the asyncio front door over ``ClientCore``. Mirrors ``clients.sync``.

An AsyncClient belongs to the event loop that connected it (ZeroMQ sockets must not cross loops
or threads); using it from another loop raises RuntimeError. The sockets are plain ZeroMQ
sockets read from the loop with ``add_reader`` on their (edge-triggered) FD, drained until empty
after every wake-up and every send.

The link to the broker is watched through the DEALER's monitor socket (a dropped connection is
seen at once) and heartbeats (a silent broker is given up after LIVENESS of its intervals).
While the link is down, requests wait for it up to ``timeout``; when it comes back the client
says HELLO again and, if the broker no longer knows it, replays its credit and memberships.
Listeners added with ``add_listener`` hear "disconnected" and "reconnected".
"""

from __future__ import annotations

import asyncio
import logging
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from broker.protocol.names import CONTROL_TOPIC
from broker.zio import recv_frames, send_frames

from .core import (
    CLOSE_LINGER_MS, HEARTBEAT, LIVENESS, RECONNECT_MAX_MS, RECONNECT_MS, ClientCore, FrontDoor, publisher_url,
)
from .errors import BrokerUnavailable, BusError, ReceiveTimeout
from .sync import DEFAULT_URL

DRAIN_BATCH = 512
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
log = logging.getLogger("channelbus.client")


def _call_listener(listener, event: str) -> None:
    try:
        listener(event)
    except Exception:
        log.exception("connection listener %r failed on %r", listener, event)


class _Expired(Exception):
    """A wait's own timer fired (cheaper than asyncio.wait_for, which wraps a task)."""


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(_Expired())


class AsyncClient(FrontDoor):
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
        self._sub_unread = True  # the SUB may hold something: its FD fired, or it was touched
        self._sync_timer: asyncio.TimerHandle | None = None
        self._release_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._connecting: asyncio.Future | None = None
        self._online = False  # said HELLO on the current connection and heard back
        self._link_waiters: list[asyncio.Future] = []  # requests waiting for the link
        self._listeners: list = []
        self._beat_timer: asyncio.TimerHandle | None = None
        self._last_heard = self._last_sent = 0.0

    def add_listener(self, listener) -> None:
        """Call ``listener(event)`` with "disconnected" or "reconnected" as the link changes
        (from the event loop; an exception in it is logged, not raised)."""
        self._listeners.append(listener)


    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the sockets and say HELLO (idempotent). Raises BrokerUnavailable, LimitExceeded."""
        if self._loop is not None:
            self._check_loop()
            if self._connecting is not None and not self._connecting.done():
                await asyncio.shield(self._connecting)  # (a failed connect resets _loop to None)
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
        self._sub = self._context.socket(zmq.SUB)
        for option, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 0), (zmq.IPV6, 1)):
            self._sub.setsockopt(option, value)
        self._loop.add_reader(self._sub.getsockopt(zmq.FD), self._on_sub_ready)
        self._handshake = self._loop.create_future()
        self._new_dealer()
        timer = self._loop.call_later(self.timeout, _expire, self._handshake)
        try:
            await self._handshake
        except _Expired:
            raise BrokerUnavailable(
                f"cannot reach the broker at {self.url} within {self.timeout:g} s",
                endpoint=self.url, timeout=self.timeout,
            ) from None
        finally:
            timer.cancel()
        await self._hello()
        self._sub.connect(publisher_url(self._core.pub_endpoint, self.url))
        self._sub.setsockopt(zmq.SUBSCRIBE, CONTROL_TOPIC)
        self._sub_unread = True
        self._schedule_drain()
        self._beat_timer = self._loop.call_later(HEARTBEAT, self._beat)

    def _new_dealer(self) -> None:
        """A DEALER (and its monitor) to the broker. IMMEDIATE: nothing is queued while no
        connection is up, so nothing stale reaches a restarted broker before HELLO."""
        dealer = self._dealer = self._context.socket(zmq.DEALER)
        for option, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 0), (zmq.SNDHWM, 0), (zmq.IPV6, 1),
                              (zmq.IMMEDIATE, 1), (zmq.RECONNECT_IVL, RECONNECT_MS),
                              (zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)):
            dealer.setsockopt(option, value)
        dealer.setsockopt(zmq.ROUTING_ID, self._core.client_id.encode())
        self._monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._loop.add_reader(self._monitor.getsockopt(zmq.FD), self._on_link_event)
        self._loop.add_reader(dealer.getsockopt(zmq.FD), self._drain)
        dealer.connect(self.url)
        # ZeroMQ FDs are edge-triggered: read until empty once, or no later event wakes us.
        self._on_link_event()

    async def _hello(self) -> None:
        """Say HELLO on a fresh connection; then the link is online."""
        rid, frames = self._core.hello(HEARTBEAT)
        header = await self._call(rid, frames, online=True)
        now = time.monotonic()
        self._core.on_hello(header, time.time(), now)
        self._last_heard = now
        self._online = True
        self._flush_outgoing()  # the replay, if the broker did not know us
        for waiter in self._link_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._link_waiters.clear()

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
        self._schedule_drain()  # the POSTs of one loop iteration go as one message
        if self._core.refilling and self._dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._drain()  # take in grants now: a sender that never yields still gets them
        if self._release_timer is None:
            self._arm_release_timer()

    async def group_send(self, group: str, message: dict, *, wait: bool = True) -> dict | None:
        """Send to every member of ``group``; full members are skipped, never raised.

        Returns the broker's counts ``{"queued", "full"}``; with ``wait=False`` it returns None
        at once, without the round trip (the message is checked here as with a send)."""
        await self.connect()
        if not wait and self._online:
            _, frames = self._core.group_send(group, message, reply=False)
            self._flush_outgoing()
            try:
                send_frames(self._dealer, frames)
                self._last_sent = time.monotonic()
                return None
            except zmq.Again:  # the link is down: send it as a request, which waits for the link
                self._go_offline("the connection to the broker was lost")
        reply = await self._call(*self._core.group_send(group, message))
        return None if not wait else {"queued": reply.get("queued", 0), "full": reply.get("full", 0)}

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
                self._schedule_drain()  # one ACK for what this loop iteration takes
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
        if self._loop is not None and self._online and self._core.unconfirmed:
            try:  # POSTs may still sit in the socket: a round trip sees them through
                await self.ping()
            except BusError:
                pass
        self._closed = True
        if self._loop is not None:
            self._teardown(BusError("the client was closed"), goodbye=True)

    def _teardown(self, reason: BusError, goodbye: bool) -> None:
        """Stop timers and readers, (say goodbye,) close the sockets, fail every waiter."""
        for timer in (self._sync_timer, self._release_timer, self._beat_timer):
            if timer is not None:
                timer.cancel()
        self._sync_timer = self._release_timer = self._beat_timer = None
        self._online = False
        sockets = [sock for sock in (getattr(self, "_dealer", None), getattr(self, "_sub", None),
                                     getattr(self, "_monitor", None)) if sock]
        for sock in sockets:
            try:
                self._loop.remove_reader(sock.getsockopt(zmq.FD))
            except (zmq.ZMQError, ValueError, RuntimeError):
                pass
        if goodbye:
            try:
                for frames in self._core.goodbye():
                    send_frames(self._dealer, frames)
            except zmq.ZMQError:
                pass
        if getattr(self, "_dealer", None) is not None and not self._dealer.closed:
            self._dealer.disable_monitor()
        # A short linger lets the last ACK and BYE leave (a dropped ACK would have the broker
        # hand consumed messages to someone else); close() itself does not wait for it.
        for sock in sockets:
            sock.close(linger=CLOSE_LINGER_MS if goodbye and sock is self._dealer else 0)
        for fut in [*self._pending.values(), *self._link_waiters,
                    *(f for waiters in self._arrivals.values() for f in waiters)]:
            if not fut.done():
                fut.set_exception(reason)
                fut.exception()
        self._pending.clear()
        self._arrivals.clear()
        self._link_waiters.clear()

    # -- I/O ------------------------------------------------------------------------------

    def _check_loop(self) -> None:
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                "this AsyncClient belongs to another event loop; create one client per loop"
            )

    async def _call(self, rid: int, frames: list[bytes], online: bool = False) -> dict:
        """Send a request and wait for its reply. Unless ``online`` (HELLO itself), wait for
        the link first; all of it within ``timeout``."""
        if self._closed:
            raise BusError("the client is closed")
        self._check_loop()
        deadline = time.monotonic() + self.timeout
        while True:
            if not online and not self._online:
                await self._wait_for_link(deadline)
            self._flush_outgoing()  # what the core queued (acks, subscriptions) goes first
            try:
                send_frames(self._dealer, frames)
                break
            except zmq.Again:  # no connection (IMMEDIATE), though its event is not read yet
                if online:
                    raise BrokerUnavailable(f"lost the connection to {self.url}", endpoint=self.url,
                                            timeout=self.timeout) from None
                self._go_offline("the connection to the broker was lost")
        self._last_sent = time.monotonic()
        future = self._pending[rid] = self._loop.create_future()
        self._schedule_drain()
        timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), _expire, future)
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

    async def _wait_for_link(self, deadline: float) -> None:
        waiter = self._loop.create_future()
        self._link_waiters.append(waiter)
        timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), _expire, waiter)
        try:
            await waiter
        except _Expired:
            raise BrokerUnavailable(
                f"the broker at {self.url} has been unreachable for {self.timeout:g} s",
                endpoint=self.url, timeout=self.timeout,
            ) from None
        finally:
            timer.cancel()
            if waiter in self._link_waiters:
                self._link_waiters.remove(waiter)

    # -- the link: connection events, heartbeats, reconnection ----------------------------

    def _on_link_event(self) -> None:
        monitor = self._monitor
        while not monitor.closed:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_DISCONNECTED:
                self._go_offline("the connection to the broker was lost")
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if not self._handshake.done():
                    self._handshake.set_result(None)  # the first connection: _open says HELLO
                elif not self._online:
                    self._loop.create_task(self._rejoin())

    def _go_offline(self, why: str) -> None:
        if not self._online:
            return
        self._online = False
        self._core.disconnected()
        lost = BrokerUnavailable(
            f"{why} ({self.url}); the request may or may not have been carried out",
            endpoint=self.url, timeout=self.timeout,
        )
        for future in self._pending.values():
            if not future.done():
                future.set_result(lost)
        self._notify("disconnected")

    async def _rejoin(self) -> None:
        """Say HELLO on the new connection; announce "reconnected" once the replayed group
        memberships are confirmed live (so group messages sent after it reach them)."""
        try:
            await self._hello()
            deadline = time.monotonic() + self.timeout
            self._arm_sync_timer()
            for key in list(self._core.awaiting):
                while self._core.marker_pending(*key):
                    if not await self._arrival(("marker", *key), deadline):
                        raise BrokerUnavailable(f"group {key[0]!r} was not confirmed after reconnecting")
        except BusError as exc:  # the connection dropped again, or the broker refused us
            log.warning("reconnecting to %s: %s", self.url, exc)
            return
        self._notify("reconnected")

    def _beat(self) -> None:
        """Every HEARTBEAT: tell the broker we live if we have been quiet; give up on a broker
        that has been silent for LIVENESS of its intervals (reconnect on a fresh socket)."""
        self._beat_timer = None
        if self._closed:
            return
        now = time.monotonic()
        if self._online:
            if now - self._last_heard > LIVENESS * self._core.limits.get("heartbeat", HEARTBEAT):
                self._go_offline("the broker stopped answering")
                self._loop.remove_reader(self._dealer.getsockopt(zmq.FD))
                self._loop.remove_reader(self._monitor.getsockopt(zmq.FD))
                self._dealer.disable_monitor()
                self._monitor.close(linger=0)
                self._dealer.close(linger=0)
                self._new_dealer()
            elif now - self._last_sent >= HEARTBEAT:
                self._send_frames(self._core.heartbeat())
        self._beat_timer = self._loop.call_later(HEARTBEAT, self._beat)

    def _notify(self, event: str) -> None:
        for listener in self._listeners:
            self._loop.call_soon(_call_listener, listener, event)

    def _send_frames(self, frames: list[bytes]) -> None:
        try:
            send_frames(self._dealer, frames)
            self._last_sent = time.monotonic()
            self._schedule_drain()  # (the send may take in the DEALER's news: edge-triggered FD)
        except zmq.Again:  # no connection (IMMEDIATE): the link events will tell the rest
            pass

    def _send_posts(self) -> None:
        if self._closed or not self._core.posts:
            return
        posts = self._core.take_posts()
        for index, (_, frames) in enumerate(posts):
            try:
                send_frames(self._dealer, frames)
            except zmq.Again:  # the connection dropped under them: lost in flight, and said so
                lost = sum(len(f) - 2 for _, f in posts[index:])
                log.warning("%d posted message(s) were lost: the connection to %s dropped", lost, self.url)
                self._go_offline("the connection to the broker was lost")
                return
        self._last_sent = time.monotonic()
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        """Run ``_drain`` once, at the next loop iteration: it sends what this iteration queued
        (its POSTs and acks coalesce) and reads what the sockets hold."""
        if not self._drain_scheduled and not self._closed and self._loop is not None:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Read everything the DEALER holds (and the SUB, when its FD fired or it was touched;
        up to a batch each), then send what follows."""
        self._drain_scheduled = False
        if self._closed or self._dealer.closed:  # (closed, or torn down after a failed connect)
            return
        core, dealer, sub = self._core, self._dealer, self._sub
        more = False
        for sock, digest in ((dealer, core.on_dealer), (sub, core.on_sub)):
            if sock is sub:
                if not self._sub_unread:
                    continue
                self._sub_unread = False
            count = 0
            while sock.get(_EVENTS) & _POLLIN:  # (cheaper than catching zmq.Again)
                if count == DRAIN_BATCH:
                    more = True
                    if sock is sub:
                        self._sub_unread = True
                    break
                count += 1
                for event in digest(recv_frames(sock), time.monotonic(), time.time()):
                    self._dispatch(event)
            if count and sock is dealer:
                self._last_heard = time.monotonic()
        if core.outgoing or core.posts or core.pending_acks:
            self._flush_outgoing()
            # The FDs are edge-triggered and a send may take in their news: look again.
            more = more or self._sub_unread or dealer.get(_EVENTS) & _POLLIN
        self._arm_sync_timer()
        if more:
            self._schedule_drain()

    def _on_sub_ready(self) -> None:
        """The SUB's FD fired (ZeroMQ FDs are per socket: work on the DEALER leaves it alone)."""
        self._sub_unread = True
        self._drain()

    def _dispatch(self, event: tuple) -> None:
        kind = event[0]
        if kind == "forgotten":  # the broker dropped us (it restarted, or we fell silent)
            if self._online:
                self._go_offline("the broker had forgotten this client")
                self._loop.create_task(self._rejoin())
            return
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
                self._loop.time() + max(0.0, due - time.monotonic()), self._on_sub_ready
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
        if self._core.posts:
            self._send_posts()  # first: a RELEASE behind them must not overtake them
        self._core.flush_acks()  # acks of what was taken go before anything sent after it
        sent = False
        for kind, item in self._core.take_outgoing():
            if kind == "dealer":
                try:
                    send_frames(self._dealer, item)
                except zmq.Again:  # link down: notices are moot; the reconnect replays what matters
                    continue
                sent = True
            else:
                self._sub.setsockopt(zmq.SUBSCRIBE if kind == "sub" else zmq.UNSUBSCRIBE, item)
                self._sub_unread = sent = True  # (the option may take in the SUB's news too)
        if sent:
            self._last_sent = time.monotonic()
            self._schedule_drain()
