"""The broker process: with ``security`` (the ZAP handler's thread) and ``metrics`` (the HTTP
thread), the only modules in broker/ that touch sockets.

One thread runs ``BrokerServer.serve()``: it polls the ROUTER (commands in, replies and channel
messages out) and the XPUB (group topics out), feeds each message to ``routing.Router`` with the
monotonic clock, sends what it returns with NOBLOCK, and calls ``Router.tick`` every
``TICK_SECONDS``. A MSG the socket cannot take now goes back to its inbox; one for a vanished
peer (ROUTER_MANDATORY makes that an error, not silence) makes the broker forget that peer.

Before every batch of commands it takes in the publisher's subscriptions, so that a GADD's
marker follows the subscription it proves. With ``secret_key`` both sockets are CURVE servers
and the router is told the key name (ZAP ``User-Id``) of each new connection; with
``permissions`` the XPUB is manual and a subscription applies only if its key may read the
group (``_subscription``). SIGHUP (``reload_permissions``) reloads the permissions at the next
tick; with ``metrics`` a scrape is answered from a snapshot taken at a tick.
"""

from __future__ import annotations

import errno
import logging
import secrets
import re
import threading
import time
from urllib.parse import urlsplit

import zmq

from .config import BrokerConfig
from .invariants import InvariantError
from .metrics import Metrics, MetricsUnavailable, snapshot
from .permissions import Permissions, PermissionsError
from .protocol.names import CONTROL_TOPIC, TOPIC_END
from .security import ZAP_DOMAIN, AuthorizedKeys, KeyAuthenticator, KeyFileError, RateLimitedLog, load_secret_key
from .zio import NOBLOCK, readable, recv_frames, send_frames
from .routing import Router

log = logging.getLogger("channelbus.broker")

TICK_SECONDS = 0.1
BATCH = 256  # messages read per socket per poll, so one busy client cannot starve the timer
SNDHWM = 100_000
BUSY_GAP = 50e-6  # a message this soon after the last batch may have others behind it: batch them


class BindError(Exception):
    """An endpoint could not be bound (in use, malformed, no such address), or a key or
    permissions file it needs cannot be used."""


_MAPPED_IPV4 = re.compile(r"\[::ffff:(\d{1,3}(?:\.\d{1,3}){3})\]")


def _unmapped(endpoint: str) -> str:
    """``tcp://[::ffff:127.0.0.1]:5555`` -> ``tcp://127.0.0.1:5555``."""
    # With IPV6 on, ZeroMQ reports an IPv4 bind in its IPv4-mapped form: clients without IPv6
    # cannot dial it, and 0.0.0.0 would no longer be recognised as a wildcard host.
    return _MAPPED_IPV4.sub(r"\1", endpoint)


def _wildcard_host(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host in ("", "*", "0.0.0.0", "::")


class BrokerServer:
    """A broker bound to ``config.bind`` and ``config.pub_bind``.

    ``bind()`` opens the sockets (raising BindError with a one-line reason); ``serve()`` runs
    until ``stop()``; ``close()`` releases the sockets. ``endpoint`` and ``pub_endpoint`` give the
    endpoints actually bound (useful with port ``*``).
    """

    def __init__(self, config: BrokerConfig = BrokerConfig(), context: zmq.Context | None = None):
        self.config = config
        # With CURVE, a context of its own: its ZAP handler is the context's, one per broker.
        self._own_context = context is None and bool(config.secret_key)
        self.context = zmq.Context() if self._own_context else (context or zmq.Context.instance())
        self._auth: KeyAuthenticator | None = None
        self._curve_secret: bytes | None = None
        self.public_key = ""  # the broker's own public key (Z85), with CURVE on
        self._key: str | None = None  # the key name of the connection whose message was just read
        self._recv = recv_frames
        self._reload_wanted = False
        self._refused_subscriptions = RateLimitedLog()
        self.metrics: Metrics | None = None  # the Prometheus endpoint (--metrics)
        self.endpoint = ""
        self.pub_endpoint = ""
        self.router: Router | None = None
        self._stopping = False  # set by stop(), from any thread or a signal handler
        self._sockets: list[zmq.Socket] = []
        self._dropped: dict[bytes, int] = {}  # replies dropped per peer since the last heartbeat
        self._idle_since = 0.0  # when the last batch of commands was done with
        self.violation: InvariantError | None = None  # what the check mode found, if it stopped us

    def bind(self) -> "BrokerServer":
        permissions = self._secure()
        self._commands = self._socket(zmq.ROUTER, self.config.bind)
        self._commands.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._commands.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._publisher = self._socket(zmq.XPUB, self.config.pub_bind)
        self.endpoint = _unmapped(self._commands.getsockopt_string(zmq.LAST_ENDPOINT))
        self.pub_endpoint = _unmapped(self._publisher.getsockopt_string(zmq.LAST_ENDPOINT))
        advertised = self.config.advertise or self.pub_endpoint
        self.router = Router(
            self.config.limits(), advertised, wall_offset=time.time() - time.monotonic(),
            started=time.monotonic(), instance=secrets.token_hex(8), permissions=permissions,
        )
        if not self.config.advertise and _wildcard_host(self.pub_endpoint):
            log.info("publisher bound to all interfaces: clients dial it on the host they used")
        if self.config.metrics:
            try:
                self.metrics = Metrics(self.config.metrics)
            except MetricsUnavailable as exc:
                self.close()
                raise BindError(str(exc)) from None
            host = self.config.metrics.rpartition(":")[0]
            log.info("serving Prometheus metrics on http://%s:%d/metrics", host, self.metrics.port)
        return self

    def _secure(self) -> Permissions | None:
        """With ``secret_key``: load it, start the ZAP handler over ``authorized_keys``, and
        return the permissions (if any). BindError says what cannot be used."""
        config = self.config
        if not config.secret_key:
            return None
        try:
            public, self._curve_secret = load_secret_key(config.secret_key)
            keys = AuthorizedKeys(config.authorized_keys)
            count = keys.check()
            permissions = Permissions.load(config.permissions) if config.permissions else None
        except (KeyFileError, PermissionsError) as exc:
            self.close()
            raise BindError(str(exc)) from None
        self.public_key = public.decode("ascii")
        self._auth = KeyAuthenticator(self.context, keys)
        self._auth.start()
        self._recv = self._recv_keyed
        log.info("CURVE on (broker key %s); %d authorized key(s) in %s%s", self.public_key, count,
                 config.authorized_keys, f"; permissions from {config.permissions}" if permissions else "")
        return permissions

    def reload_permissions(self) -> None:
        """Read the permissions file again at the next tick (SIGHUP; safe from a signal handler)."""
        self._reload_wanted = True

    def _reload(self) -> None:
        self._reload_wanted = False
        path = self.config.permissions
        if not path:
            log.warning("asked to reload the permissions, but the broker runs without a permissions file")
            return
        try:
            self.router.permissions = Permissions.load(path)
        except PermissionsError as exc:
            log.error("the permissions were not reloaded, the previous rules stay in force: %s", exc)
            return
        log.info("permissions reloaded from %s", path)

    def _recv_keyed(self, sock: zmq.Socket, flags: int = NOBLOCK) -> list[bytes]:
        """``recv_frames``, noting the key name of a sender the router does not know yet."""
        frame = sock.recv(flags, copy=False)
        frames = [frame.bytes]
        self._key = frame.get("User-Id") if frames[0] not in self.router.delivery.peers else None
        while frame.more:
            frame = sock.recv(flags, copy=False)
            frames.append(frame.bytes)
        return frames

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        sock.setsockopt(zmq.RCVHWM, SNDHWM)
        sock.setsockopt(zmq.IPV6, 1)  # also accept tcp://[::1]:port; IPv4 works as before
        self._sockets.append(sock)
        if self._curve_secret is not None:
            sock.curve_server = True
            sock.curve_secretkey = self._curve_secret
            sock.zap_domain = ZAP_DOMAIN.encode()
        if kind == zmq.XPUB and self.config.permissions:
            sock.setsockopt(zmq.XPUB_MANUAL, 1)  # a subscription applies once allowed (_subscription)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            if exc.errno == errno.EADDRINUSE:
                raise BindError(f"cannot bind {endpoint}: address already in use") from None
            raise BindError(f"cannot bind {endpoint}: {exc.strerror}") from None
        return sock

    def serve(self) -> None:
        """Route messages until ``stop()`` is called, then close the sockets."""
        if self.router is None:
            self.bind()
        log.info("channelbus broker listening on %s, publishing on %s", self.endpoint, self.pub_endpoint)
        if self.config.busy_poll:
            log.info("busy-polling for %d us after commands before sleeping (--busy-poll)", self.config.busy_poll)
        check = self.config.check
        if check:
            log.info("checking the routing state's rules after every batch and tick (--check)")
        commands, metrics = self._commands, self.metrics
        next_tick = time.monotonic() + TICK_SECONDS
        next_beat = time.monotonic() + self.config.heartbeat
        wait_ms = None
        spin, stats = self.config.busy_poll / 1e6, self.router.stats
        now = time.monotonic()
        try:
            while not self._stopping:
                # A blocking receive (with a timeout up to the next tick) wakes faster than a
                # poll over both sockets; the publisher's subscription notices wait for the tick.
                # (Set again only when it is 10 ms off, not at every message: the tick may come
                # up to 10 ms late, or a turn early and empty.)
                timeout = max(1, int((next_tick - now) * 1000))  # (now: at the end of the last turn)
                if wait_ms is None or abs(timeout - wait_ms) > 10:
                    commands.setsockopt(zmq.RCVTIMEO, timeout)
                    wait_ms = timeout
                first = None
                if spin and now - self._idle_since < spin:  # (commands came just now: more may)
                    first = self._poll_busily(commands, self._idle_since + spin, self._recv)
                    stats["busy_polled" if first is not None else "busy_poll_missed"] += 1
                if first is None:
                    try:
                        first = self._recv(commands, 0)
                    except zmq.Again:
                        pass
                if first is not None:
                    if metrics is None:
                        self._read_commands(first)
                    else:
                        started = time.perf_counter()
                        self._read_commands(first)
                        metrics.batch_seconds.observe(time.perf_counter() - started)
                    if check:
                        self._check("a batch of commands", scan=False)
                now = time.monotonic()
                if now >= next_tick:
                    if self._reload_wanted:
                        self._reload()
                    self._drain_subscriptions()
                    self._send(self.router.tick(now), now)
                    if metrics is not None and metrics.due:
                        metrics.publish(snapshot(self.router, now))
                    next_tick = now + TICK_SECONDS
                    if check:
                        self._check("a tick", scan=True)
                if now >= next_beat:
                    self._send(self.router.heartbeat(now), now)
                    self._log_dropped()
                    next_beat = now + self.config.heartbeat
                    if check:
                        self._check("a heartbeat", scan=False)
        finally:
            self.close()
            log.info("channelbus broker stopped")

    def _check(self, after: str, scan: bool) -> None:
        """The check mode: raise (stopping the broker) if the routing state broke a rule."""
        try:
            self.router.check(scan)
        except InvariantError as exc:
            log.critical("check mode: after %s, %s", after, exc)
            self.violation = exc
            raise

    @staticmethod
    def _poll_busily(sock: zmq.Socket, until: float, recv=recv_frames) -> list[bytes] | None:
        """Look at ``sock`` without sleeping until ``until`` (monotonic); the message that comes
        first, or None. (``--busy-poll``: the wake-up from a blocking receive costs more than
        the loop, notably on virtual machines whose idle CPUs halt; the price is a busy CPU.)"""
        clock = time.monotonic
        while clock() < until:
            if readable(sock):
                return recv(sock)
        return None

    def stop(self) -> None:
        """Ask ``serve()`` to return (safe from any thread or a signal handler)."""
        self._stopping = True

    def close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self._own_context and not self.context.closed:
            self.context.term()

    def _read_commands(self, frames: list[bytes]) -> None:
        """Handle ``frames`` and deliver: alone after a pause, else with whatever else is
        waiting (up to BATCH) as one batch."""
        router, sock = self.router, self._commands
        # Subscriptions that came meanwhile apply before these commands: ZeroMQ takes them in
        # only when the XPUB is used, so a GADD's marker would otherwise often go out before the
        # subscription it proves, and the client would retry GSYNC 50 ms later.
        self._drain_subscriptions()
        # A message after a pause (BUSY_GAP since the last batch ended) is handled alone and
        # delivered at once, without asking whether more wait: what follows it comes in the
        # next batch anyway. While busy, a burst of sends becomes one MSG per receiver.
        now = time.monotonic()
        if now - self._idle_since >= BUSY_GAP:
            self._send(router.handle(frames[0], frames[1:], now, self._key), now)
            self._idle_since = time.monotonic()
            return
        router.begin_batch()
        try:
            for count in range(1, BATCH + 1):
                now = time.monotonic()
                out = router.handle(frames[0], frames[1:], now, self._key)
                if out:  # (a POST's delivery waits for the end of the batch: usually nothing)
                    self._send(out, now)
                if count == BATCH or not readable(sock):
                    break  # (not reading a message this batch would not handle)
                frames = self._recv(sock)
        finally:
            now = time.monotonic()
            self._send(router.end_batch(now), now)
            self._idle_since = time.monotonic()

    def _log_dropped(self) -> None:
        for dest, count in self._dropped.items():
            log.warning("%d repl%s to %r dropped: its queue is full", count, "y" if count == 1 else "ies", dest)
        self._dropped.clear()

    def _drain_subscriptions(self) -> None:
        # Subscriptions need no action (clients confirm them with markers), but XPUB queues
        # them until read. With permissions (XPUB_MANUAL) each applies only if its key may.
        # (readable() first: asking costs less than a receive that raises zmq.Again.)
        publisher, manual = self._publisher, bool(self.config.permissions)
        for _ in range(BATCH):
            if not readable(publisher):
                return
            frame = publisher.recv(NOBLOCK, copy=not manual)
            if manual:
                self._subscription(frame)

    def _subscription(self, frame: zmq.Frame) -> None:
        """Apply a (un)subscription of the publisher's last reader if its key may read the
        topic: the control topic, or exactly one group's topic with ``group_add`` on the group.
        Anything else (a prefix of several topics, "" for everything) is refused and counted."""
        data = frame.bytes
        if not data or data[0] not in (0, 1):
            return
        topic = data[1:]
        if data[0] == 0:
            self._publisher.setsockopt(zmq.UNSUBSCRIBE, topic)
            return
        key = frame.get("User-Id")
        group = topic[:-1].decode("ascii", "replace") if topic.endswith(TOPIC_END) else None
        allowed = topic == CONTROL_TOPIC or (
            group and TOPIC_END not in topic[:-1] and self.router.permissions.allows(key, "group_add", group)
        )
        if allowed:
            self._publisher.setsockopt(zmq.SUBSCRIBE, topic)
            return
        self.router.count_forbidden(key)
        self._refused_subscriptions.warning(
            (key, topic), "refused a subscription of key %r to %r on the publisher: it may read only"
            " the groups it may group_add", key, topic)

    def _send(self, outs, now: float) -> None:
        for dest, frames, push in outs:
            if dest is None:
                send_frames(self._publisher, frames)
                continue
            try:
                send_frames(self._commands, [dest, *frames])
            except zmq.Again:
                if push is not None:
                    self.router.unsent(dest, push, now, gone=False)
                else:  # counted, and logged once per heartbeat: a peer cannot flood the log
                    self._dropped[dest] = self._dropped.get(dest, 0) + 1
            except zmq.ZMQError as exc:
                if exc.errno != errno.EHOSTUNREACH:
                    raise
                if push is not None:
                    self._send(self.router.unsent(dest, push, now, gone=True), now)
                else:
                    self._send(self.router.peer_gone(dest), now)


def start_in_thread(config: BrokerConfig, context: zmq.Context | None = None) -> tuple[BrokerServer, threading.Thread]:
    """Bind a broker and serve it from a daemon thread; for tests and embedding."""
    server = BrokerServer(config, context).bind()

    def serve() -> None:
        try:
            server.serve()
        except InvariantError:
            pass  # (logged, and kept in server.violation for whoever started it)

    thread = threading.Thread(target=serve, name="channelbus-broker", daemon=True)
    thread.start()
    return server, thread
