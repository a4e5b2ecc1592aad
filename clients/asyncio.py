"""``AsyncClient``: the asyncio front door over ``ClientCore``. Mirrors ``clients.sync``.

An AsyncClient belongs to the event loop that connected it (ZeroMQ sockets must not cross loops
or threads); using it from another loop raises RuntimeError. The sockets are plain ZeroMQ
sockets read from the loop with ``add_reader`` on their (edge-triggered) FD: drained until empty
after every wake-up (a drain that wakes a waiting ``receive()`` hands over to that task and
goes on right after it, in the same loop iteration), and looked at after every send when no
drain is due (a send can take in the FD's news without its firing), drained if anything waits.

Sending costs no loop iteration of its own when it need not: a send that follows the client's
last send by BURST_GAP or more is written to the socket at once; only a burst is collected and
sent as one POST per channel at the next iteration. An acknowledgement rides on the next thing
the client sends, or goes when it next waits, and at the latest ACK_DELAY after the take.

This module holds the API and the I/O (draining, requests, waits); the link to the broker
(connecting, watching the connection, heartbeats, reconnecting) is its base class in
``clients.link``. While the link is down, requests wait for it up to ``timeout``; listeners
added with ``add_listener`` hear "disconnected" and "reconnected".
"""

from __future__ import annotations

import asyncio
import logging
import time

import zmq

from broker.protocol import wire
from broker.zio import readable, recv_frames, send_frames

from .core import ClientCore
from .errors import AuthenticationFailed, BrokerUnavailable, BusError, ReceiveTimeout
from .keys import curve_options
from .placement import split_urls
from .frontdoor import FrontDoor
from .link import Deadlines, Expired, Link
from .sync import DEFAULT_URL

DRAIN_BATCH = 512
BURST_GAP = 50e-6  # a send this soon after the last one is part of a burst: collected, not sent alone
ACK_DELAY = 0.002  # the longest a taken message waits for its ACK to ride on something else
log = logging.getLogger("channelbus.client")


class AsyncClient(Link, FrontDoor):
    """An asyncio connection to a channelbus broker; same settings and API as ``Client``.

    Use ``async with AsyncClient(url) as client:`` or ``await client.connect()``. With CURVE,
    ``secret_key`` and ``server_key`` as for ``Client`` (``AuthenticationFailed`` from
    ``connect()`` if the broker does not let it in).
    """

    def __new__(cls, url=DEFAULT_URL, *args, **kwargs):
        """Several brokers (a list, or URLs separated by commas): a ShardedAsyncClient."""
        urls = split_urls(url)
        if cls is AsyncClient and len(urls) > 1:
            from .shards import ShardedAsyncClient

            return ShardedAsyncClient(urls, AsyncClient, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 10.0, context: zmq.Context | None = None,
                 secret_key: str | None = None, server_key: str | None = None, **settings) -> None:
        url = split_urls(url)[0]
        self.url = url
        self.timeout = timeout
        self._curve = curve_options(secret_key, server_key)
        self._auth_failure: AuthenticationFailed | None = None  # the last failed handshake's
        self._auth_final = False  # ... and whether it says the client will not get in
        self._core = ClientCore(**settings)
        self._context = context or zmq.Context.instance()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: Deadlines | None = None  # the timeouts of this client's waits
        self._pending: dict[int, asyncio.Future] = {}
        self._arrivals: dict[object, list[asyncio.Future]] = {}  # channel or marker key -> waiters
        self._drain_scheduled = False
        self._handed_over = False  # the scheduled drain goes on after a woken task (see _read)
        self._sub_unread = True  # the SUB may hold something: its FD fired, or it was touched
        self._sync_timer: asyncio.TimerHandle | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self._release_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._connecting: asyncio.Future | None = None
        self._ready_loop: asyncio.AbstractEventLoop | None = None  # connected and open: its loop
        self._online = False  # said HELLO on the current connection and heard back
        self._rejoining = False  # reconnected: "reconnected" is due once the client is whole
        self._link_waiters: list[asyncio.Future] = []  # requests waiting for the link (whole)
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

    # -- the channel layer API ------------------------------------------------------------

    async def send(self, channel: str, message: dict) -> None:
        """Queue ``message`` on ``channel``. Raises ChannelFull, InvalidName, MessageTooLarge,
        and MessagesLost if sends that had returned were lost since the last call (this message
        is then not sent).

        With slots reserved on ``channel`` this returns without a round trip (see clients.core)."""
        if not self._connected_here():
            await self.connect()
        if self._core.lost:
            self._raise_lost()
        now = time.monotonic()
        alone = now - self._last_sent >= BURST_GAP  # (and the core has no POST batch pending)
        rid, frames = self._core.send(channel, message, now, alone)
        if rid is not None:
            await self._call(rid, frames)
            return
        if frames is not None:  # a lone send goes at once (and carries the acks due)
            self._send_posts([frames])
            if self._core.outgoing:
                self._flush_outgoing()
        else:  # a burst: the POSTs of this loop iteration go as one message
            self._schedule_drain()
        if self._core.refilling and readable(self._dealer):
            self._drain()  # take in grants now: a sender that never yields still gets them
        if self._release_timer is None:
            self._arm_release_timer()

    async def group_send(self, group: str, message: dict, *, wait: bool = True) -> dict | None:
        """Send to every member of ``group``; full members are skipped, never raised.

        Returns the broker's counts ``{"queued", "full"}``; with ``wait=False`` it returns None
        at once, without the round trip (the message is checked here as with a send). Raises
        MessagesLost as ``send`` does."""
        if not self._connected_here():
            await self.connect()
        self._raise_lost()
        if not wait and self._whole():
            _, frames = self._core.group_send(group, message, reply=False)
            self._flush_outgoing()
            try:
                send_frames(self._dealer, frames)
                self._after_send()
                return None
            except zmq.Again:  # the link is down: send it as a request, which waits for the link
                self._core.unconfirmed -= 1  # (it never left)
                self._go_offline("the connection to the broker was lost")
        reply = await self._call(*self._core.group_send(group, message))
        return None if not wait else {"queued": reply.get("queued", 0), "full": reply.get("full", 0)}

    async def receive(self, channel: str, timeout: float | None = None) -> dict:
        """The next message of ``channel``. Cancelling it loses and doubles nothing.

        Raises ReceiveTimeout when ``timeout`` seconds pass with no message. Just after a
        reconnection it first waits for the client's memberships to be live again."""
        if not self._connected_here():
            await self.connect()
        core = self._core
        core.start_receiving(channel)
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        if self._online and core.groups.replaying:
            try:
                await self._wait_for_link(deadline if deadline is not None else now + self.timeout)
            except BrokerUnavailable:
                if deadline is None or time.monotonic() < deadline:
                    raise
                raise ReceiveTimeout(f"no message on {channel!r} within {timeout:g} s",
                                     channel=channel, timeout=timeout) from None
            now = time.monotonic()
        while True:
            if self._sub_unread or readable(self._sub):
                # Group messages that reached this process go into their channels' queues
                # before one is taken: a member at capacity skips what came meanwhile, as the
                # layer specification (and channels_redis) do, not what comes after a receive.
                self._sub_unread = self._read(self._sub, core.on_sub)
            message = core.pop(channel, now, defer_ack=True) if channel in core.queues or core.forbidden else None
            if message is not None:
                if self._ack_timer is None:
                    self._ack_timer = self._loop.call_later(ACK_DELAY, self._ack_due)
                return message
            if core.posts or core.pending_acks or core.outgoing:
                self._flush_outgoing()
            future = self._watch(channel, deadline)  # (awaited here, not in _arrival: one coroutine less)
            try:
                await future
            except Expired:
                raise ReceiveTimeout(f"no message on {channel!r} within {timeout:g} s",
                                     channel=channel, timeout=timeout) from None
            finally:
                self._unwatch(channel, future, deadline)
            now = time.monotonic()

    def _give_back(self, channel: str, message: dict) -> None:
        """Put a message a receive() returned back at the front of ``channel``, and wake its
        waiting receivers (the channel layer's receive for another loop, cancelled as it came)."""
        self._core.give_back(channel, message, time.monotonic())
        for waiter in self._arrivals.pop(channel, ()):
            if not waiter.done():
                waiter.set_result(None)

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
        self._ready_loop = None
        if self._loop is not None:
            self._teardown(BusError("the client was closed"), goodbye=True)

    # -- I/O ------------------------------------------------------------------------------

    def _connected_here(self) -> bool:
        """Connected, not closed, and called from this client's loop: then ``connect()`` has
        nothing to do, and the per-message calls skip awaiting it (which raises the RuntimeError
        of another loop, or the BusError of a closed client)."""
        return asyncio.get_running_loop() is self._ready_loop

    def _check_loop(self) -> None:
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                "this AsyncClient belongs to another event loop; create one client per loop"
            )

    async def _call(self, rid: int, frames: list[bytes], online: bool = False) -> dict:
        """Send a request and wait for its reply. Unless ``online`` (HELLO itself), wait for
        the link first; all of it within ``timeout``."""
        self._ensure_open()
        self._check_loop()
        deadline = time.monotonic() + self.timeout
        while True:
            if not online and not self._whole():
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
        self._after_send()
        future = self._pending[rid] = self._loop.create_future()
        try:
            result = await self._timed(
                future, deadline, f"no reply from the broker at {self.url} within {self.timeout:g} s"
            )
        except BrokerUnavailable:
            self._core.ignored.add(rid)  # (its reply, should it come, is nobody's)
            raise
        finally:
            self._pending.pop(rid, None)
        if isinstance(result, BusError):
            raise result
        return result

    def _send_posts(self, posts: list[list[bytes]] | None = None) -> None:
        """Send ``posts`` (POST frames), or the POST batch the core holds."""
        if posts is None:
            if self._closed or not self._core.posts:
                return
            posts = [frames for _, frames in self._core.take_posts()]
        for index, frames in enumerate(posts):
            try:
                send_frames(self._dealer, frames)
            except zmq.Again:  # the connection dropped under them: they never left, their slots are gone
                for unsent in posts[index:]:
                    self._core.unconfirmed -= len(unsent) - 2
                    self._core.note_lost(wire.unpack_header(unsent[1])["ch"], len(unsent) - 2,
                                         f"the connection to {self.url} dropped before they were sent")
                self._go_offline("the connection to the broker was lost")
                return
        self._after_send()

    def _after_send(self) -> None:
        """Something went out: a send may take in the news of the (edge-triggered) FDs without
        their firing, so look at the DEALER now, and drain only if something waits (or the SUB
        was touched). Cheaper than a drain after every send."""
        self._last_sent = time.monotonic()
        if not self._drain_scheduled and (self._sub_unread or readable(self._dealer)):
            self._schedule_drain()  # (a drain already scheduled looks at both itself)

    def _ack_due(self) -> None:
        """ACK_DELAY after a take: send the acks that nothing else has carried yet."""
        self._ack_timer = None
        if self._core.pending_acks and not self._closed:
            self._flush_outgoing()

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
        hand_over, self._handed_over = not self._handed_over, False  # (once per wake-up)
        if self._closed or self._dealer.closed:  # (closed, or torn down after a failed connect)
            return
        core = self._core
        more = self._read(self._dealer, core.on_dealer, hand_over)
        if self._sub_unread:
            self._sub_unread = self._read(self._sub, core.on_sub, hand_over)
            more = more or self._sub_unread
        if core.outgoing or core.posts or core.pending_acks:
            self._flush_outgoing()  # (whose sends look again at the FDs: see _after_send)
        if core.groups.awaiting or self._sync_timer is not None:
            self._arm_sync_timer()
        if more:
            self._schedule_drain()

    def _read(self, sock: zmq.Socket, digest, hand_over: bool = False) -> bool:
        """Digest what ``sock`` holds, up to DRAIN_BATCH messages; True if it may hold more.

        With ``hand_over`` it stops after a message that woke a waiting ``receive()``: the
        drain scheduled next runs right after that task and reads all the rest, so the woken
        task does not wait for a look at the socket (and its send, if it sends, needs no look
        of its own: see _after_send), and a burst for many waiting tasks costs one iteration
        more, not one per message."""
        count, more = 0, False
        while readable(sock):  # (cheaper than catching zmq.Again)
            if count == DRAIN_BATCH:
                more = True
                break
            count += 1
            woke = False
            for event in digest(recv_frames(sock), time.monotonic(), time.time()):
                if event[0] == "arrived":  # (the common case, without a call)
                    for waiter in self._arrivals.pop(event[1], ()):
                        if not waiter.done():
                            waiter.set_result(None)
                            woke = True
                else:
                    self._dispatch(event)
            if woke and hand_over:
                more = self._handed_over = True
                break
        if count and sock is self._dealer:
            self._last_heard = time.monotonic()
        return more

    def _on_sub_ready(self) -> None:
        """The SUB's FD fired (ZeroMQ FDs are per socket: work on the DEALER leaves it alone)."""
        self._sub_unread = True
        self._drain()

    def _dispatch(self, event: tuple) -> None:
        """Act on an event of the core other than "arrived" (which ``_read`` settles itself)."""
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
        for waiter in self._arrivals.pop(event, ()):  # a marker arrived (or failed)
            if not waiter.done():
                waiter.set_result(None)
        if self._link_waiters or self._rejoining:  # (the last replayed membership, perhaps)
            self._check_whole()

    async def _arrival(self, key, deadline: float | None) -> bool:
        """Wait until something arrives for ``key`` (a channel, or a marker key); False when
        ``deadline`` (monotonic) passes first. Cancelling it cancels only this waiter."""
        future = self._watch(key, deadline)
        try:
            await future
            return True
        except Expired:
            return False
        finally:
            self._unwatch(key, future, deadline)

    def _watch(self, key, deadline: float | None) -> asyncio.Future:
        """A future that is done when something arrives for ``key``, or fails with Expired
        once ``deadline`` passes. Whoever awaits it must call ``_unwatch`` afterwards."""
        future = self._loop.create_future()
        self._arrivals.setdefault(key, []).append(future)
        if deadline is not None:
            self._deadlines.add(future, deadline)
        return future

    def _unwatch(self, key, future: asyncio.Future, deadline: float | None) -> None:
        if deadline is not None:
            self._deadlines.discard(future)
        waiters = self._arrivals.get(key)  # (an arrival took the list it was in, and settled it)
        if waiters and future in waiters:
            waiters.remove(future)
            if not waiters:  # (a timed-out or cancelled wait leaves no empty list behind)
                del self._arrivals[key]

    def _arm_sync_timer(self) -> None:
        if not self._core.groups.awaiting and self._sync_timer is None:
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
        if self._core.outgoing:  # a RELEASE (after the POSTs of this iteration, which go first);
            self._flush_outgoing()  # else the POSTs stay collected for the iteration's drain
        if due is not None:
            delay = max(0.0, due - time.monotonic())
            self._release_timer = self._loop.call_later(delay, self._arm_release_timer)

    def _flush_outgoing(self) -> None:
        core = self._core
        if core.posts:
            self._send_posts()  # first: a RELEASE behind them must not overtake them (their
            # POST carries the acks due)
        if not (core.pending_acks or core.outgoing):
            return  # (nothing else waits: the usual case)
        core.flush_acks()  # acks of what was taken go before anything sent after it
        sent = False
        for kind, item in core.take_outgoing():
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
            self._after_send()
