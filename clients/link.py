"""The link between an ``AsyncClient`` and the broker: connecting, HELLO, watching the
connection, heartbeats, reconnecting and closing.

``Link`` is a base class of ``AsyncClient`` (``clients.asyncio``, whose ``__init__`` holds all
the state), split off because it changes with how connections are made and fail, not with
the API.

The link is watched through the DEALER's monitor socket (a dropped connection is seen at once)
and heartbeats (a silent broker is given up after LIVENESS of its intervals, and dialled again
on a fresh DEALER). While the link is down, requests wait for it up to ``timeout``; when it
comes back the client says HELLO again and, if the broker no longer knows it, replays its
credit and memberships. Listeners added with ``add_listener`` hear "disconnected" and, once
the replayed memberships are live again, "reconnected".
"""

from __future__ import annotations

import asyncio
import logging
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from broker.protocol.names import CONTROL_TOPIC
from broker.zio import send_frames

from .errors import BrokerUnavailable, BusError
from .keys import HANDSHAKE_FAILED, definitive, handshake_failure
from .frontdoor import CLOSE_LINGER_MS, RECONNECT_MAX_MS, RECONNECT_MS, publisher_url

HEARTBEAT = 1.0  # seconds between the asyncio client's heartbeats (when otherwise quiet)
LIVENESS = 3  # broker heartbeat intervals of silence after which the link is given up
log = logging.getLogger("channelbus.client")


class Expired(Exception):
    """A wait's own timer fired (cheaper than asyncio.wait_for, which wraps a task)."""


def expire(future: asyncio.Future) -> None:
    """The timer callback of a wait: fail ``future`` with Expired, unless it is done."""
    if not future.done():
        future.set_exception(Expired())


class Deadlines:
    """The timeouts of many waits on one loop timer, armed for the earliest of them.

    A wait that ends before its deadline only leaves the table (no timer to cancel); the timer
    is re-armed when it fires, or when a wait with an earlier deadline is added. Cheaper than a
    ``call_later`` handle per wait, whose cancelled handles pile up in the loop's heap.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: dict[asyncio.Future, float] = {}  # future -> monotonic deadline
        self._timer: asyncio.TimerHandle | None = None
        self._armed = float("inf")  # the deadline the timer is set for

    def add(self, future: asyncio.Future, deadline: float) -> None:
        """Fail ``future`` with Expired once ``deadline`` (monotonic) passes, unless it is done."""
        self._due[future] = deadline
        if deadline < self._armed:
            self._arm(deadline)

    def discard(self, future: asyncio.Future) -> None:
        self._due.pop(future, None)

    def cancel(self) -> None:
        """Stop the timer and forget every wait (they are failed by whoever calls this)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._armed = None, float("inf")
        self._due.clear()

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = deadline
        delay = max(0.0, deadline - time.monotonic())
        self._timer = self._loop.call_at(self._loop.time() + delay, self._fire)

    def _fire(self) -> None:
        self._timer, self._armed = None, float("inf")
        now = time.monotonic()
        earliest = float("inf")
        for future, deadline in list(self._due.items()):
            if future.done():
                del self._due[future]
            elif deadline <= now:
                del self._due[future]
                expire(future)
            elif deadline < earliest:
                earliest = deadline
        if earliest != float("inf"):
            self._arm(earliest)


def _call_listener(listener, event: str) -> None:
    try:
        listener(event)
    except Exception:
        log.exception("connection listener %r failed on %r", listener, event)


class Link:
    """``AsyncClient``'s link to the broker (see above)."""

    # -- opening and closing --------------------------------------------------------------

    async def connect(self) -> None:
        """Open the sockets and say HELLO (idempotent). Raises BrokerUnavailable, LimitExceeded,
        and BusError once the client is closed."""
        self._ensure_open()
        if self._loop is not None:
            self._check_loop()
            if self._connecting is not None and not self._connecting.done():
                await asyncio.shield(self._connecting)  # (a failed connect resets _loop to None)
            return
        self._loop = asyncio.get_running_loop()
        self._deadlines = Deadlines(self._loop)
        self._connecting = self._loop.create_future()
        try:
            await self._open()
            self._connecting.set_result(None)
            if not self._closed:  # (closed while connecting: it stays unusable)
                self._ready_loop = self._loop
        except BaseException as exc:
            self._connecting.set_exception(exc)
            self._connecting.exception()  # mark retrieved
            self._teardown(BusError(f"connecting to {self.url} failed: {exc}"), goodbye=False)
            self._loop = self._connecting = None  # a later call tries again
            raise

    async def _open(self) -> None:
        self._sub = self._context.socket(zmq.SUB)
        for option, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 0), (zmq.IPV6, 1), *self._curve):
            self._sub.setsockopt(option, value)
        self._loop.add_reader(self._sub.getsockopt(zmq.FD), self._on_sub_ready)
        self._handshake = self._loop.create_future()
        self._new_dealer()
        await self._timed(self._handshake, time.monotonic() + self.timeout,
                          f"cannot reach the broker at {self.url} within {self.timeout:g} s")
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
                              (zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS), *self._curve):
            dealer.setsockopt(option, value)
        dealer.setsockopt(zmq.ROUTING_ID, self._core.routing_id)
        self._monitor = dealer.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
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
        self._arm_sync_timer()  # (GSYNC for the replayed memberships)
        self._check_whole()

    def _check_whole(self) -> None:
        """Once the link is online and every membership it replayed is live again: release the
        calls that wait for it, and (after a reconnection) tell the listeners "reconnected"."""
        if not self._whole():
            return
        for waiter in self._link_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._link_waiters.clear()
        if self._rejoining:
            self._rejoining = False
            self._notify("reconnected")

    def _teardown(self, reason: BusError, goodbye: bool) -> None:
        """Stop timers and readers, (say goodbye,) close the sockets, fail every waiter."""
        for timer in (self._sync_timer, self._release_timer, self._beat_timer, self._ack_timer):
            if timer is not None:
                timer.cancel()
        self._sync_timer = self._release_timer = self._beat_timer = self._ack_timer = None
        self._deadlines.cancel()  # (the waits it times are failed below)
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

    # -- connection events, heartbeats, reconnection --------------------------------------

    def _on_link_event(self) -> None:
        monitor = self._monitor
        while not monitor.closed:
            try:
                message = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            event = message["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._go_offline("the connection to the broker was lost")
            elif event & HANDSHAKE_FAILED:
                self._handshake_failed(handshake_failure(event, message["value"], self.url, bool(self._curve)),
                                       definitive(event))
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._auth_failure, self._auth_final = None, False
                if not self._handshake.done():
                    self._handshake.set_result(None)  # the first connection: _open says HELLO
                elif not self._online:
                    self._loop.create_task(self._rejoin())

    def _handshake_failed(self, error: BusError, final: bool) -> None:
        """A handshake failed: the first connection fails at once; later, a failure that says
        the client will not get back in fails the calls waiting for the link or for messages
        (a call that comes later raises it at once), and any other is raised at their timeout
        in place of BrokerUnavailable."""
        if not self._handshake.done():
            self._handshake.set_exception(error)
            return
        self._auth_failure, self._auth_final = error, final
        if final and not self._online:
            for waiter in [*self._link_waiters, *(f for ws in self._arrivals.values() for f in ws)]:
                if not waiter.done():
                    waiter.set_exception(error)

    async def _timed(self, future: asyncio.Future, deadline: float, unavailable: str):
        """Await ``future`` until ``deadline`` (monotonic); past it, raise BrokerUnavailable
        saying ``unavailable``. The one way this client times a wait on the broker."""
        self._deadlines.add(future, deadline)
        try:
            return await future
        except Expired:
            raise BrokerUnavailable(unavailable, endpoint=self.url, timeout=self.timeout) from None
        finally:
            self._deadlines.discard(future)

    async def _wait_for_link(self, deadline: float) -> None:
        """Until the client is whole: online, with the memberships it replayed live again."""
        if self._auth_final and not self._online:
            raise self._auth_failure
        waiter = self._loop.create_future()
        self._link_waiters.append(waiter)
        why = (f"reconnected to the broker at {self.url}, but its group memberships were not live"
               f" again within {self.timeout:g} s" if self._online else
               f"the broker at {self.url} has been unreachable for {self.timeout:g} s")
        try:
            await self._timed(waiter, deadline, why)
        except BrokerUnavailable:
            if self._auth_failure is not None:
                raise self._auth_failure from None
            raise
        finally:
            if waiter in self._link_waiters:
                self._link_waiters.remove(waiter)

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
        """Say HELLO on the new connection. The client is whole again (calls go on, listeners
        hear "reconnected") once the memberships it replayed are confirmed live, so that group
        messages sent after that reach them (``_check_whole``)."""
        self._rejoining = True
        try:
            await self._hello()
        except BusError as exc:  # the connection dropped again, or the broker refused us
            log.warning("reconnecting to %s: %s", self.url, exc)

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
            self._after_send()
        except zmq.Again:  # no connection (IMMEDIATE): the link events will tell the rest
            pass
