"""``Client``: the blocking front door over ``ClientCore``. Mirrors ``clients.asyncio``.

A Client may be shared by threads (a thread pool, the views of a sync web server): every call
holds the client's lock, and the threads take turns at its sockets (``clients.turns``), so that
a thread waiting for the broker lets the others send meanwhile.
"""

from __future__ import annotations

import functools
import logging
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from broker.protocol.names import CONTROL_TOPIC
from broker.zio import readable, recv_frames, send_frames

from .core import ClientCore
from .frontdoor import CLOSE_LINGER_MS, RECONNECT_MAX_MS, RECONNECT_MS, FrontDoor, publisher_url
from .errors import AuthenticationFailed, BrokerUnavailable, BusError, ReceiveTimeout
from .keys import HANDSHAKE_FAILED, curve_options, definitive, handshake_failure
from .placement import split_urls
from .turns import Turns

DEFAULT_URL = "tcp://127.0.0.1:5555"
log = logging.getLogger("channelbus.client")


def _serialized(method):
    """A public call: under the client's lock, with the sockets this thread's own."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        turns = self._turns
        with turns.lock:
            turns.await_turn()
            try:
                return method(self, *args, **kwargs)
            finally:
                turns.wake_sleepers()  # (threads waiting for their turn, or for what it read)

    return call


class Client(FrontDoor):
    """A blocking connection to a channelbus broker.

    ``Client(url, capacity=100, expiry=60, group_expiry=86400, channel_capacity=None,
    timeout=10.0, secret_key=None, server_key=None)``: the settings are sent with each request,
    as in channels_redis; ``timeout`` bounds every wait for the broker (``BrokerUnavailable``
    past it). Connects at once; raises ``BrokerUnavailable`` if the broker does not answer HELLO
    in time and ``LimitExceeded`` if a setting is above the broker's ceiling.

    With CURVE (docs/security.md): ``secret_key`` is this client's ``.key_secret`` file and
    ``server_key`` the broker's public ``.key`` file or its Z85 text. ``AuthenticationFailed``
    says the broker did not let the client in (raised as soon as the handshake fails, and
    within ``timeout`` in any case); ``Forbidden`` that its key may not do what it asked.

    The link is watched through the DEALER's monitor socket whenever the client does I/O: when
    the connection drops, requests wait for it (up to ``timeout``); when it comes back the client
    says HELLO again and, if the broker no longer knows it, replays its credit and memberships,
    and calls wait until the replayed memberships are live again, so a call that returns after a
    reconnection means the client is whole again. It may be shared by threads (see above).
    A blocking client sends no heartbeats (it may be busy elsewhere); the broker notices its
    process is gone when the connection closes. Listeners added with ``add_listener`` hear
    "disconnected" and "reconnected" (once replayed memberships are live again), called from
    inside whichever client call is doing I/O at the time.
    """

    def __new__(cls, url=DEFAULT_URL, *args, **kwargs):
        """Several brokers (a list, or URLs separated by commas): a ShardedClient."""
        urls = split_urls(url)
        if cls is Client and len(urls) > 1:
            from .shards import ShardedClient

            return ShardedClient(urls, Client, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 10.0, context: zmq.Context | None = None,
                 secret_key: str | None = None, server_key: str | None = None, **settings) -> None:
        url = split_urls(url)[0]
        self.url = url
        self.timeout = timeout
        curve = curve_options(secret_key, server_key)
        self._core = ClientCore(**settings)
        self._replies: dict[int, object] = {}
        ctx = context or zmq.Context.instance()
        # IMMEDIATE: nothing is queued while no connection is up, so nothing stale reaches a
        # restarted broker before HELLO.
        self._dealer = ctx.socket(zmq.DEALER)
        self._sub = ctx.socket(zmq.SUB)
        for option, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 0), (zmq.IPV6, 1), *curve):
            self._dealer.setsockopt(option, value)
            self._sub.setsockopt(option, value)
        self._curve = bool(curve)
        self._auth_failure: AuthenticationFailed | None = None  # the last failed handshake's
        self._auth_final = False  # ... and whether it says the client will not get in
        for option, value in ((zmq.IMMEDIATE, 1), (zmq.RECONNECT_IVL, RECONNECT_MS),
                              (zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS),
                              (zmq.ROUTING_ID, self._core.routing_id)):
            self._dealer.setsockopt(option, value)
        self._monitor = self._dealer.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        self._poller = zmq.Poller()
        for sock in (self._dealer, self._sub, self._monitor):
            self._poller.register(sock, zmq.POLLIN)
        self._turns = Turns(self._poller)  # every call holds its lock; threads take turns
        self._waiting: set[int] = set()  # requests sent whose replies are awaited
        self._closed = False
        self._online = False
        self._hello_rid: int | None = None  # a HELLO on its way after the link came back
        self._hello_error: BusError | None = None
        self._listeners: list = []
        self._rejoining = False  # reconnected, replayed memberships not yet confirmed
        with self._turns.lock:  # (the waits below release it, as every wait does)
            try:
                self._dealer.connect(url)
                self._wait_until_whole(time.monotonic() + timeout, first=True)
            except BaseException:
                self._close_sockets()
                raise
            self._sub.connect(publisher_url(self._core.pub_endpoint, url))
            self._sub.setsockopt(zmq.SUBSCRIBE, CONTROL_TOPIC)

    def add_listener(self, listener) -> None:
        """Call ``listener(event)`` with "disconnected" or "reconnected" as the link changes
        (from inside whichever call of the client is doing I/O at the time; it may call the
        client)."""
        with self._turns.lock:
            self._listeners.append(listener)

    def _notify(self, event: str) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("connection listener %r failed on %r", listener, event)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the channel layer API --------------------------------------------------------------

    @_serialized
    def send(self, channel: str, message: dict) -> None:
        """Queue ``message`` on ``channel``. Raises ChannelFull, InvalidName, MessageTooLarge,
        and MessagesLost if sends that had returned were lost since the last call (this message
        is then not sent).

        With slots reserved on ``channel`` this returns without a round trip (see clients.core)."""
        self._catch_up()
        self._ensure_open()
        self._raise_lost()
        if self._core.outgoing:
            self._flush_outgoing()  # (what was queued goes first; then this send goes alone)
        rid, frames = self._core.send(channel, message, time.monotonic(), alone=True)
        if rid is not None:
            self._call(rid, frames)
            return
        try:
            send_frames(self._dealer, frames)  # (a POST of this message alone: sent now)
        except zmq.Again:  # the link is down: the slot went with it; send as a request instead
            self._core.unconfirmed -= 1  # (it never left)
            self._go_offline()
            self._call(*self._core.send(channel, message, time.monotonic()))
            return
        if readable(self._dealer):
            self._take_in()  # grants that arrived, so the reservation stays topped up
        else:
            self._flush_outgoing()

    @_serialized
    def group_send(self, group: str, message: dict, *, wait: bool = True) -> dict | None:
        """Send ``message`` to every member of ``group``; full members are skipped, never raised.

        Returns the broker's counts for members with broker inboxes: ``{"queued": n, "full": n}``;
        with ``wait=False`` it returns None at once, without the round trip (the message is
        checked here as with a send). Raises MessagesLost as ``send`` does."""
        self._catch_up()
        self._ensure_open()
        self._raise_lost()
        if not wait and self._whole():
            _, frames = self._core.group_send(group, message, reply=False)
            self._flush_outgoing()
            try:
                send_frames(self._dealer, frames)
                return None
            except zmq.Again:  # the link is down: send it as a request, which waits for it
                self._core.unconfirmed -= 1
                self._go_offline()
        reply = self._call(*self._core.group_send(group, message))
        return None if not wait else {"queued": reply.get("queued", 0), "full": reply.get("full", 0)}

    @_serialized
    def receive(self, channel: str, timeout: float | None = None) -> dict:
        """The next message of ``channel``; waits up to ``timeout`` seconds (forever if None).

        Raises ReceiveTimeout when nothing came in time. Just after a reconnection it first
        waits for the client's memberships to be live again."""
        self._ensure_open()
        core = self._core
        core.start_receiving(channel)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not (self._online and core.groups.replaying):  # (whole, or the broker is away)
                if readable(self._sub):
                    self._take_in()  # (group messages first: a member at capacity skips them)
                message = core.pop(channel, time.monotonic())
                self._flush_outgoing()
                if message is not None:
                    return message
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ReceiveTimeout(f"no message on {channel!r} within {timeout:g} s",
                                     channel=channel, timeout=timeout)
            self._io(remaining)
            if self._auth_final and not self._online:
                raise self._auth_failure  # (the broker will not let this client back in)

    def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name owned by this client."""
        return self._core.new_channel(prefix)

    @_serialized
    def group_add(self, group: str, channel: str) -> None:
        """Add ``channel`` to ``group``; on return every later group_send reaches it."""
        self._ensure_open()
        core = self._core
        rid, frames = core.group_add(group, channel)
        self._flush_outgoing()  # the subscription goes out before the request
        try:
            self._call(rid, frames)
        except BaseException:
            core.abandon(group, channel)
            self._flush_outgoing()
            raise
        core.expect_marker(group, channel, time.monotonic())
        deadline = time.monotonic() + self.timeout
        while core.marker_pending(group, channel):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                core.abandon(group, channel)
                self._flush_outgoing()
                raise BrokerUnavailable(
                    f"group_add({group!r}, {channel!r}): the broker's subscription marker did not"
                    f" arrive within {self.timeout:g} s", endpoint=self.url, timeout=self.timeout,
                )
            self._io(remaining)
        failure = core.marker_failure(group, channel)
        if failure is not None:
            raise failure

    @_serialized
    def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group`` (not an error if it was not a member)."""
        self._call(*self._core.group_discard(group, channel))

    @_serialized
    def flush(self) -> None:
        """Drop every queued message and group membership in the broker."""
        self._call(*self._core.flush())
        self._core.flushed()
        self._flush_outgoing()

    @_serialized
    def ping(self) -> float:
        """One round trip to the broker; returns its duration in seconds."""
        start = time.perf_counter()
        self._call(*self._core.ping())
        return time.perf_counter() - start

    @_serialized
    def stats(self, top: int = 10) -> dict:
        """The broker's figures: clients, the ``top`` deepest channels and largest groups,
        counters, memory held, uptime (fields in docs/protocol.md, STATS)."""
        reply = self._call(*self._core.stats(top))
        reply.pop("id", None)
        return reply

    @_serialized
    def close(self) -> None:
        """Tell the broker goodbye and close the sockets. Safe to call twice; a call another
        thread is making raises BusError."""
        if self._closed:
            return
        if self._core.unconfirmed and self._online:
            try:  # POSTs may still sit in the socket: a round trip sees them through
                self._call(*self._core.ping())
            except BusError:
                pass
        try:
            for frames in self._core.goodbye():
                send_frames(self._dealer, frames)
        except zmq.ZMQError:
            pass
        self._close_sockets()

    @_serialized
    def _pump(self) -> None:
        """Take in what the sockets hold now (a sharded client's receive, between its waits on
        another broker: group messages for its channels may come from this one)."""
        if not self._closed:
            self._take_in()

    # -- I/O (every method below runs with the lock held and the sockets this thread's) ----

    def _close_sockets(self) -> None:
        self._closed = True
        # A short linger lets the last ACK and BYE leave (a dropped ACK would have the broker
        # hand consumed messages to someone else); close() itself does not wait for it.
        self._dealer.disable_monitor()
        self._monitor.close(linger=0)
        self._dealer.close(linger=CLOSE_LINGER_MS)
        self._sub.close(linger=0)
        self._turns.close()

    def _catch_up(self) -> None:
        """Take in what came while the application was not calling us: link events (e.g. the
        broker restarted meanwhile), so nothing is sent to a broker before HELLO, and the
        broker's news (a RECALL: slots it revoked are better not posted into)."""
        if not self._closed and (readable(self._monitor) or readable(self._dealer)):
            self._take_in()

    def _call(self, rid: int, frames: list[bytes]) -> dict:
        """Send a request once the client is whole, and wait for its reply; all of it within
        ``timeout``."""
        self._ensure_open()
        self._catch_up()
        deadline = time.monotonic() + self.timeout
        while True:
            if not self._whole():
                self._wait_until_whole(deadline)
            self._flush_outgoing()  # what the core queued (acks, subscriptions) goes first
            try:
                send_frames(self._dealer, frames)
                break
            except zmq.Again:  # no connection (IMMEDIATE), though its event is not read yet
                self._go_offline()
        self._waiting.add(rid)
        try:
            while rid not in self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._core.ignored.add(rid)
                    raise BrokerUnavailable(
                        f"no reply from the broker at {self.url} within {self.timeout:g} s",
                        endpoint=self.url, timeout=self.timeout,
                    )
                self._io(remaining)
        finally:
            self._waiting.discard(rid)
        result = self._replies.pop(rid)
        if isinstance(result, BusError):
            raise result
        return result

    def _wait_until_whole(self, deadline: float, first: bool = False) -> None:
        """Do I/O until the link is online (HELLO answered) and the memberships it replayed
        are live again, or ``deadline`` passes (BrokerUnavailable)."""
        while not self._whole():
            remaining = deadline - time.monotonic()
            if self._auth_failure is not None and (self._auth_final or remaining <= 0):
                raise self._auth_failure
            if remaining <= 0:
                if self._online:
                    raise BrokerUnavailable(
                        f"reconnected to the broker at {self.url}, but its group memberships were"
                        f" not live again within {self.timeout:g} s", endpoint=self.url, timeout=self.timeout,
                    )
                what = "cannot reach" if first else "lost the connection to"
                raise BrokerUnavailable(
                    f"{what} the broker at {self.url} (waited {self.timeout:g} s)",
                    endpoint=self.url, timeout=self.timeout,
                )
            self._io(remaining)
            if isinstance(self._hello_error, BusError):
                error, self._hello_error = self._hello_error, None
                raise error

    def _take_hello(self) -> None:
        """If the HELLO of a new connection has been answered, the link is online."""
        reply = self._replies.pop(self._hello_rid, None) if self._hello_rid is not None else None
        if reply is None:
            return
        self._hello_rid = None
        if isinstance(reply, BusError):
            self._hello_error = reply  # (e.g. LimitExceeded) raised by the waiting call
            return
        first = not self._core.limits
        self._core.on_hello(reply, time.time(), time.monotonic())
        self._online = True
        self._rejoining = not first
        self._flush_outgoing()  # the replay, if the broker did not know us

    def _on_link_event(self) -> None:
        while True:
            try:
                message = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            event = message["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._go_offline()
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._auth_failure, self._auth_final = None, False
                if not self._online:
                    self._say_hello()
            elif event & HANDSHAKE_FAILED:
                self._auth_failure = handshake_failure(event, message["value"], self.url, self._curve)
                # Before the first connection any failure is final; later, one cut short may not be.
                self._auth_final = definitive(event) or not self._core.limits

    def _say_hello(self) -> None:
        """On a new connection: the ACK of what was taken (if the broker still knows us, it
        must not hand those out again), then HELLO."""
        core = self._core
        rid, frames = core.hello()
        acks = core.take_acks()
        try:
            if acks is not None:
                send_frames(self._dealer, acks)
            send_frames(self._dealer, frames)
            self._hello_rid = rid
        except zmq.Again:
            pass  # dropped again already; the next handshake says HELLO

    def _go_offline(self) -> None:
        if not self._online:
            return
        self._online = False
        self._core.disconnected()
        self._notify("disconnected")
        for rid in self._waiting:
            if rid not in self._replies:
                self._replies[rid] = BrokerUnavailable(
                    f"lost the connection to the broker at {self.url}; the request may or may not"
                    " have been carried out", endpoint=self.url, timeout=self.timeout,
                )

    def _io(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for input, digest all of it, send what follows. When
        other threads wait for their turn at the sockets, let them have it first (and return:
        the caller looks again at what it waits for)."""
        turns = self._turns
        if turns.queued:
            turns.give_way(timeout)
            self._ensure_open()
            return
        core = self._core
        core.release_idle(time.monotonic())
        due = core.due_syncs(time.monotonic())
        self._flush_outgoing()
        if due is not None:
            until_due = max(0.0, due - time.monotonic())
            timeout = until_due if timeout is None else min(timeout, until_due)
        ready = turns.poll(self._poller, timeout)
        self._ensure_open()  # (another thread may have closed the client meanwhile)
        self._digest(ready)

    def _take_in(self) -> None:
        """Digest what the sockets hold now, without waiting."""
        self._digest(dict(self._poller.poll(0)))

    def _digest(self, ready: dict) -> None:
        core = self._core
        if self._monitor in ready:
            self._on_link_event()
        for sock, digest in ((self._dealer, core.on_dealer), (self._sub, core.on_sub)):
            if sock not in ready:
                continue
            while True:
                try:
                    frames = recv_frames(sock)
                except zmq.Again:
                    break
                for event in digest(frames, time.monotonic(), time.time()):
                    if event[0] == "reply":
                        self._replies[event[1]] = event[2]
                    elif event[0] == "forgotten" and self._online:  # the broker dropped us
                        self._go_offline()
                        self._say_hello()
        self._take_hello()
        core.due_syncs(time.monotonic())
        self._flush_outgoing()
        if self._rejoining and self._whole():
            self._rejoining = False
            self._notify("reconnected")

    def _flush_outgoing(self) -> None:
        for kind, item in self._core.take_outgoing():
            if kind == "dealer":
                try:
                    send_frames(self._dealer, item)
                except zmq.Again:  # link down: notices are moot; the reconnect replays what matters
                    pass
            elif kind == "sub":
                self._sub.setsockopt(zmq.SUBSCRIBE, item)
            else:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, item)
