"""``Client``: the blocking front door over ``ClientCore``. Mirrors ``clients.asyncio``.

A Client is not thread-safe: use one per thread (ZeroMQ sockets must not be shared).
"""

from __future__ import annotations

import time

import zmq

from broker.protocol.names import CONTROL_TOPIC

from .core import CLOSE_LINGER_MS, ClientCore, publisher_url
from .errors import BrokerUnavailable, BusError, ReceiveTimeout

DEFAULT_URL = "tcp://127.0.0.1:5555"


class Client:
    """A blocking connection to a channelbus broker.

    ``Client(url, capacity=100, expiry=60, group_expiry=86400, channel_capacity=None,
    timeout=10.0)``: the settings are sent with each request, as in channels_redis; ``timeout``
    bounds every wait for the broker (``BrokerUnavailable`` past it). Connects at once; raises
    ``BrokerUnavailable`` if the broker does not answer HELLO in time and ``LimitExceeded`` if a
    setting is above the broker's ceiling.
    """

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 10.0, context: zmq.Context | None = None,
                 **settings) -> None:
        self.url = url
        self.timeout = timeout
        self._core = ClientCore(**settings)
        self._replies: dict[int, object] = {}
        ctx = context or zmq.Context.instance()
        self._dealer = ctx.socket(zmq.DEALER)
        self._sub = ctx.socket(zmq.SUB)
        for sock in (self._dealer, self._sub):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.IPV6, 1)
        self._dealer.setsockopt(zmq.ROUTING_ID, self._core.client_id.encode())
        self._poller = zmq.Poller()
        self._poller.register(self._dealer, zmq.POLLIN)
        self._poller.register(self._sub, zmq.POLLIN)
        self._closed = False
        try:
            self._dealer.connect(url)
            self._core.on_hello(self._call(*self._core.hello()), time.time())
            self._sub.connect(publisher_url(self._core.pub_endpoint, url))
            self._sub.setsockopt(zmq.SUBSCRIBE, CONTROL_TOPIC)
        except BaseException:
            self._close_sockets()
            raise

    @property
    def client_id(self) -> str:
        return self._core.client_id

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the channel layer API --------------------------------------------------------------

    def send(self, channel: str, message: dict) -> None:
        """Queue ``message`` on ``channel``. Raises ChannelFull, InvalidName, MessageTooLarge.

        With slots reserved on ``channel`` this returns without a round trip (see clients.core)."""
        rid, frames = self._core.send(channel, message, time.monotonic())
        if rid is not None:
            self._call(rid, frames)
            return
        if self._closed:
            raise BusError("the client is closed")
        self._flush_outgoing()
        self._dealer.send_multipart(frames)
        if self._dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._io(0)  # take in grants that arrived, so the reservation stays topped up
        else:
            self._flush_outgoing()

    def group_send(self, group: str, message: dict) -> dict:
        """Send ``message`` to every member of ``group``; full members are skipped, never raised.

        Returns the broker's counts for members with broker inboxes: ``{"queued": n, "full": n}``.
        """
        reply = self._call(*self._core.group_send(group, message))
        return {"queued": reply.get("queued", 0), "full": reply.get("full", 0)}

    def receive(self, channel: str, timeout: float | None = None) -> dict:
        """The next message of ``channel``; waits up to ``timeout`` seconds (forever if None).

        Raises ReceiveTimeout when nothing came in time."""
        core = self._core
        core.start_receiving(channel)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            message = core.pop(channel, time.monotonic())
            self._flush_outgoing()
            if message is not None:
                return message
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ReceiveTimeout(f"no message on {channel!r} within {timeout:g} s",
                                     channel=channel, timeout=timeout)
            self._io(remaining)

    def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name owned by this client."""
        return self._core.new_channel(prefix)

    def group_add(self, group: str, channel: str) -> None:
        """Add ``channel`` to ``group``; on return every later group_send reaches it."""
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

    def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group`` (not an error if it was not a member)."""
        self._call(*self._core.group_discard(group, channel))

    def flush(self) -> None:
        """Drop every queued message and group membership in the broker."""
        self._call(*self._core.flush())
        self._core.flushed()
        self._flush_outgoing()

    def ping(self) -> float:
        """One round trip to the broker; returns its duration in seconds."""
        start = time.perf_counter()
        self._call(*self._core.ping())
        return time.perf_counter() - start

    def stats(self, top: int = 10) -> dict:
        """The broker's figures: clients, the ``top`` deepest channels and largest groups,
        counters, memory held, uptime (fields in docs/protocol.md, STATS)."""
        reply = self._call(*self._core.stats(top))
        reply.pop("id", None)
        return reply

    def close(self) -> None:
        """Tell the broker goodbye and close the sockets. Safe to call twice."""
        if self._closed:
            return
        if self._core.unconfirmed:
            try:  # POSTs may still sit in the socket: a round trip sees them through
                self.ping()
            except BusError:
                pass
        try:
            for frames in self._core.goodbye():
                self._dealer.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._close_sockets()

    # -- I/O ------------------------------------------------------------------------------

    def _close_sockets(self) -> None:
        self._closed = True
        # A short linger lets the last ACK and BYE leave (a dropped ACK would have the broker
        # hand consumed messages to someone else); close() itself does not wait for it.
        self._dealer.close(linger=CLOSE_LINGER_MS)
        self._sub.close(linger=0)

    def _call(self, rid: int, frames: list[bytes]) -> dict:
        if self._closed:
            raise BusError("the client is closed")
        self._flush_outgoing()  # what the core queued (acks, subscriptions) goes first
        self._dealer.send_multipart(frames)
        deadline = time.monotonic() + self.timeout
        while rid not in self._replies:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._core.ignored.add(rid)
                raise BrokerUnavailable(
                    f"no reply from the broker at {self.url} within {self.timeout:g} s",
                    endpoint=self.url, timeout=self.timeout,
                )
            self._io(remaining)
        result = self._replies.pop(rid)
        if isinstance(result, BusError):
            raise result
        return result

    def _io(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for input, digest all of it, send what follows."""
        core = self._core
        core.release_idle(time.monotonic())
        due = core.due_syncs(time.monotonic())
        if due is not None:
            until_due = max(0.0, due - time.monotonic())
            timeout = until_due if timeout is None else min(timeout, until_due)
        ready = dict(self._poller.poll(None if timeout is None else timeout * 1000))
        for sock, digest in ((self._dealer, core.on_dealer), (self._sub, core.on_sub)):
            if sock not in ready:
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                for event in digest(frames, time.monotonic(), time.time()):
                    if event[0] == "reply":
                        self._replies[event[1]] = event[2]
        core.due_syncs(time.monotonic())
        self._flush_outgoing()

    def _flush_outgoing(self) -> None:
        for kind, item in self._core.take_outgoing():
            if kind == "dealer":
                self._dealer.send_multipart(item)
            elif kind == "sub":
                self._sub.setsockopt(zmq.SUBSCRIBE, item)
            else:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, item)
