"""The broker's routing state as a pure object: no sockets, no clock.

Theory of operation
-------------------
``Router.handle(peer, frames, now)`` takes one message from a client (``peer`` is its ZeroMQ
routing id) and returns the messages to send, as ``Out(dest, frames, push)`` where ``dest`` is a
routing id or ``PUB`` for the group publisher. ``Router.tick(now)`` expires what is due and
retries stalled deliveries. The server owns the sockets and the clock.

Rules:

- Every channel has an inbox: a FIFO of ``(body, expires_at)`` plus a count of messages
  *in flight* (pushed to a client, not yet acknowledged as consumed). Its depth is
  ``len(queue) + inflight``; SEND is refused with ``full`` when depth >= the sender's capacity.
- A normal channel's messages go to the clients that granted credit for it (CREDIT), round robin,
  each message to exactly one of them. Every ACK returns the credit it consumed.
- A process-specific channel's messages go straight to the connected client whose id the name
  carries; capacity alone bounds what it holds. With that client absent they wait in the inbox.
- Expired messages are dropped, never delivered; pushes carry the time left (``ttl`` in ms).
- Groups map channel -> membership expiry. GSEND queues the body in the inbox of each normal
  member (skipping full ones) and publishes it once on the group's topic when any member is
  process-specific; each client hands it to its own members. Membership changes of
  process-specific channels are published on the same topic, so each client sees them in order
  with the messages (GADD and GSYNC publish an ``add`` marker; the client that waits for
  ``group_add`` to finish waits for that marker, which proves its subscription is live).
- An inbox with nothing queued, nothing in flight and no credit is deleted: idle channels cost
  nothing.
- A peer that sends more than ``max_bad_frames`` bad messages is ignored for ``ban_seconds``.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from .protocol import wire
from .protocol.errors import ProtocolError
from .protocol.names import CONTROL_TOPIC, group_topic, owner_of
from .groups import Groups

PUB = None  # Out.dest for the publisher socket
MAX_CREDIT = 100_000
GROUP_SWEEP_SECONDS = 5.0  # group_send also drops expired members of the group it reaches


@dataclass(frozen=True)
class Limits:
    """The operator's ceilings, enforced on every request."""

    max_message_size: int = 1024 * 1024
    max_capacity: int = 100_000
    max_expiry: float = 86400.0
    max_group_expiry: float = 7 * 86400.0
    max_bad_frames: int = 100
    ban_seconds: float = 10.0


class Out(NamedTuple):
    dest: bytes | None
    frames: list[bytes]
    push: tuple[str, list] | None = None  # (channel, items) for MSG, so a failed send requeues


@dataclass
class Peer:
    rid: bytes
    client: str
    credits: dict[str, int] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    blocked_until: float = 0.0


@dataclass
class Inbox:
    queue: deque = field(default_factory=deque)
    inflight: int = 0
    ready: deque = field(default_factory=deque)  # routing ids with credit, round robin

    def depth(self) -> int:
        return len(self.queue) + self.inflight


class Router:
    def __init__(self, limits: Limits = Limits(), pub_endpoint: str = "") -> None:
        self.limits = limits
        self.pub_endpoint = pub_endpoint
        self.peers: dict[bytes, Peer] = {}
        self.by_client: dict[str, bytes] = {}
        self.inboxes: dict[str, Inbox] = {}
        self.groups = Groups()
        self.stalled: set[str] = set()
        self.strikes: dict[bytes, int] = {}
        self.banned: dict[bytes, float] = {}
        self.stats = dict.fromkeys(
            ("received", "delivered", "full", "expired", "too_large", "bad_frames",
             "group_sends", "group_skipped"), 0,
        )
        self._patterns: dict[str, re.Pattern] = {}
        self._next_group_sweep = 0.0
        self._handlers: dict[type, Callable] = {
            wire.Hello: self._hello, wire.Send: self._send, wire.GroupSend: self._group_send,
            wire.GroupAdd: self._group_add, wire.GroupSync: self._group_sync,
            wire.GroupDiscard: self._group_discard, wire.Flush: self._flush,
            wire.Ping: self._ping, wire.Credit: self._credit, wire.Ack: self._ack,
            wire.Bye: self._bye,
        }

    # -- entry points -----------------------------------------------------------------------

    def handle(self, rid: bytes, frames: list[bytes], now: float) -> list[Out]:
        """Process one message from peer ``rid``; return what to send."""
        if rid in self.banned:
            if now < self.banned[rid]:
                return []
            del self.banned[rid]
        try:
            cmd = wire.decode(frames)
        except ProtocolError as err:
            return self._strike(rid, err, now)
        peer = self.peers.get(rid)
        if peer is None and type(cmd) is not wire.Hello:
            if type(cmd) is wire.Bye:
                return []
            err = ProtocolError("no-hello", f"send HELLO before {cmd.VERB}")
            return self._strike(rid, err, now, getattr(cmd, "id", None))
        try:
            return self._handlers[type(cmd)](peer or rid, cmd, now)
        except ProtocolError as err:
            if err.code in ("full", "limit", "too-large", "not-member", "id-taken"):
                return [Out(rid, wire.error(getattr(cmd, "id", None), err))]
            return self._strike(rid, err, now, getattr(cmd, "id", None))

    def tick(self, now: float) -> list[Out]:
        """Expire messages and memberships that are due; retry stalled deliveries."""
        out: list[Out] = []
        for name in list(self.inboxes):
            inbox = self.inboxes[name]
            if inbox.queue:
                self._purge(inbox, now)
            self._gc(name)
        if now >= self._next_group_sweep:
            self.groups.expire(now)
            self._next_group_sweep = now + GROUP_SWEEP_SECONDS
        stalled, self.stalled = self.stalled, set()
        for name in stalled:
            if name in self.inboxes:
                out += self._pump(name, self.inboxes[name], now)
        return out

    def unsent(self, rid: bytes, push: tuple[str, list], now: float, gone: bool) -> None:
        """The server could not send a MSG: requeue its items at the front of the inbox.

        ``gone`` says the peer has vanished (forget it) rather than being momentarily full.
        """
        channel, items = push
        inbox = self.inboxes.setdefault(channel, Inbox())
        inbox.queue.extendleft(reversed(items))
        peer = self.peers.get(rid)
        if peer is not None:  # (a forgotten peer's in-flight count was already released)
            inbox.inflight -= len(items)
            peer.inflight[channel] -= len(items)
            if owner_of(channel) is None:
                peer.credits[channel] = peer.credits.get(channel, 0) + len(items)
                if rid not in inbox.ready:  # its credit is back, so it must be offered again
                    inbox.ready.append(rid)
            if gone:
                self._forget(peer, drop_specific=False)
            else:
                peer.blocked_until = now + 0.05
        self.stalled.add(channel)  # retry at the next tick, to this peer or another receiver
        self.stats["delivered"] -= len(items)

    def peer_gone(self, rid: bytes) -> None:
        """Forget a peer that vanished (heartbeat timeout or unroutable)."""
        peer = self.peers.get(rid)
        if peer is not None:
            self._forget(peer, drop_specific=True)

    # -- helpers ----------------------------------------------------------------------------

    def _strike(self, rid: bytes, err: ProtocolError, now: float, request_id=None) -> list[Out]:
        self.stats["bad_frames"] += 1
        if request_id is None:
            request_id = getattr(err, "request_id", None)
        count = self.strikes.get(rid, 0) + 1
        if len(self.strikes) > 10_000:
            self.strikes.clear()
        self.strikes[rid] = count
        if count > self.limits.max_bad_frames:
            del self.strikes[rid]
            self.banned[rid] = now + self.limits.ban_seconds
            peer = self.peers.get(rid)
            if peer is not None:
                self._forget(peer, drop_specific=True)
            err = ProtocolError(
                "banned",
                f"more than {self.limits.max_bad_frames} bad messages; ignoring this peer for"
                f" {self.limits.ban_seconds:g} s. Last problem: {err.message}",
                limit=self.limits.max_bad_frames,
            )
        return [Out(rid, wire.error(request_id, err))]

    def _check_settings(self, capacity: int, expiry: float) -> None:
        lim = self.limits
        if capacity > lim.max_capacity:
            raise ProtocolError(
                "limit", f"capacity {capacity} exceeds the broker's max-capacity {lim.max_capacity}",
                name="capacity", limit=lim.max_capacity,
            )
        if expiry > lim.max_expiry:
            raise ProtocolError(
                "limit", f"expiry {expiry:g} s exceeds the broker's max-expiry {lim.max_expiry:g} s",
                name="expiry", limit=lim.max_expiry,
            )

    def _check_body(self, body: bytes) -> None:
        if len(body) > self.limits.max_message_size:
            self.stats["too_large"] += 1
            raise ProtocolError(
                "too-large",
                f"message is {len(body)} bytes; the broker's max-message-size is"
                f" {self.limits.max_message_size} bytes",
                size=len(body), limit=self.limits.max_message_size,
            )
        if not wire.body_is_map(body):
            raise ProtocolError("bad-body", "message body must be a msgpack map (a dict with 'type')")

    def _purge(self, inbox: Inbox, now: float) -> None:
        live = deque(item for item in inbox.queue if item[1] > now)
        self.stats["expired"] += len(inbox.queue) - len(live)
        inbox.queue = live

    def _gc(self, name: str) -> None:
        inbox = self.inboxes[name]
        if not inbox.queue and not inbox.inflight and not inbox.ready:
            del self.inboxes[name]

    def _enqueue(self, name: str, body: bytes, capacity: int, expires_at: float, now: float) -> bool:
        inbox = self.inboxes.get(name)
        if inbox is None:
            inbox = self.inboxes[name] = Inbox()
        if inbox.depth() >= capacity:
            self._purge(inbox, now)
            if inbox.depth() >= capacity:
                self.stats["full"] += 1
                self._gc(name)
                return False
        inbox.queue.append((body, expires_at))
        return True

    def _pump(self, name: str, inbox: Inbox, now: float) -> list[Out]:
        """Push what ``name`` has queued to whoever may take it."""
        out: list[Out] = []
        owner = owner_of(name)
        if owner is not None:
            rid = self.by_client.get(owner)
            if rid is not None and inbox.queue:
                out += self._push(self.peers[rid], name, inbox, len(inbox.queue), now)
        else:
            while inbox.queue and inbox.ready:
                rid = inbox.ready.popleft()
                peer = self.peers.get(rid)
                credit = peer.credits.get(name, 0) if peer else 0
                if credit <= 0:
                    continue
                pushed = self._push(peer, name, inbox, credit, now)
                out += pushed
                if pushed:
                    peer.credits[name] = credit - len(pushed[0].push[1])
                if peer.credits.get(name, 0) > 0:
                    inbox.ready.append(rid)
                if not pushed:
                    break
        return out

    def _push(self, peer: Peer, name: str, inbox: Inbox, n: int, now: float) -> list[Out]:
        if peer.blocked_until > now:
            self.stalled.add(name)
            return []
        items, ttls = [], []
        queue = inbox.queue
        while queue and len(items) < n:
            item = queue.popleft()
            if item[1] <= now:
                self.stats["expired"] += 1
                continue
            items.append(item)
            ttls.append(max(1, int((item[1] - now) * 1000)))
        if not items:
            return []
        inbox.inflight += len(items)
        peer.inflight[name] = peer.inflight.get(name, 0) + len(items)
        self.stats["delivered"] += len(items)
        header = wire.pack({"ch": name, "ttl": ttls})
        return [Out(peer.rid, [wire.MSG, header, *(item[0] for item in items)], (name, items))]

    def _forget(self, peer: Peer, drop_specific: bool) -> None:
        """Remove a peer: its credit, what it held in flight, its channels' group memberships."""
        del self.peers[peer.rid]
        if self.by_client.get(peer.client) == peer.rid:
            del self.by_client[peer.client]
        for name, held in peer.inflight.items():
            inbox = self.inboxes.get(name)
            if inbox is not None:
                inbox.inflight -= held
        for name in set(peer.credits) | set(peer.inflight):
            inbox = self.inboxes.get(name)
            if inbox is not None:
                if peer.rid in inbox.ready:
                    inbox.ready.remove(peer.rid)
                self._gc(name)
        if drop_specific:
            self.groups.drop_owner(peer.client)
            for name in [n for n in self.inboxes if owner_of(n) == peer.client]:
                self.stats["expired"] += len(self.inboxes[name].queue)
                del self.inboxes[name]

    def _compile(self, patterns) -> list[tuple[re.Pattern, int]]:
        """The channel_capacity pairs with compiled regexes; ``bad-value`` if one is invalid."""
        compiled = []
        for source, capacity in patterns:
            pattern = self._patterns.get(source)
            if pattern is None:
                try:
                    pattern = re.compile(source)
                except (re.error, RecursionError) as exc:
                    raise ProtocolError(
                        "bad-value", f"channel_capacity pattern {source!r} is not a valid regex: {exc}"
                    ) from None
                if len(self._patterns) > 1024:
                    self._patterns.clear()
                self._patterns[source] = pattern
            compiled.append((pattern, capacity))
        return compiled

    # -- command handlers -------------------------------------------------------------------

    def _hello(self, peer_or_rid, cmd: wire.Hello, now: float) -> list[Out]:
        rid = peer_or_rid.rid if isinstance(peer_or_rid, Peer) else peer_or_rid
        taken = self.by_client.get(cmd.client)
        if taken is not None and taken != rid:
            raise ProtocolError("id-taken", f"client id {cmd.client!r} is in use by a live client")
        old = self.peers.get(rid)
        if old is not None and old.client != cmd.client:
            self._forget(old, drop_specific=True)
        if rid not in self.peers:
            self.peers[rid] = Peer(rid, cmd.client)
        self.by_client[cmd.client] = rid
        self.strikes.pop(rid, None)
        lim = self.limits
        out = [Out(rid, wire.ok(
            cmd.id, client=cmd.client, pub=self.pub_endpoint, version=wire.VERSION,
            max_message_size=lim.max_message_size, max_capacity=lim.max_capacity,
            max_expiry=lim.max_expiry, max_group_expiry=lim.max_group_expiry,
        ))]
        for name, inbox in list(self.inboxes.items()):  # messages that waited for this client
            if inbox.queue and owner_of(name) == cmd.client:
                out += self._pump(name, inbox, now)
        return out

    def _send(self, peer: Peer, cmd: wire.Send, now: float) -> list[Out]:
        self._check_settings(cmd.capacity, cmd.expiry)
        self._check_body(cmd.body)
        self.stats["received"] += 1
        if not self._enqueue(cmd.channel, cmd.body, cmd.capacity, now + cmd.expiry, now):
            raise ProtocolError(
                "full", f"channel {cmd.channel!r} already holds its capacity of {cmd.capacity} messages",
                channel=cmd.channel, capacity=cmd.capacity,
            )
        return [Out(peer.rid, wire.ok(cmd.id)), *self._pump(cmd.channel, self.inboxes[cmd.channel], now)]

    def _group_send(self, peer: Peer, cmd: wire.GroupSend, now: float) -> list[Out]:
        for capacity in (cmd.capacity, *(cap for _, cap in cmd.channel_capacity)):
            self._check_settings(capacity, cmd.expiry)
        self._check_body(cmd.body)
        patterns = self._compile(cmd.channel_capacity)  # all of them before any member is served
        self.stats["group_sends"] += 1
        out: list[Out] = []
        queued = skipped = 0
        specific = False
        for name in self.groups.members(cmd.group, now):
            if owner_of(name) is not None:
                specific = True
                continue
            capacity = next((cap for pattern, cap in patterns if pattern.match(name)), cmd.capacity)
            if self._enqueue(name, cmd.body, capacity, now + cmd.expiry, now):
                queued += 1
                out += self._pump(name, self.inboxes[name], now)
            else:
                skipped += 1
        self.stats["group_skipped"] += skipped
        if specific:
            header = {"op": "msg", "ttl": int(cmd.expiry * 1000), "cap": cmd.capacity}
            if cmd.channel_capacity:
                header["ccap"] = [list(p) for p in cmd.channel_capacity]
            out.append(Out(PUB, [group_topic(cmd.group), wire.pack(header), cmd.body]))
        return [Out(peer.rid, wire.ok(cmd.id, queued=queued, full=skipped)), *out]

    def _marker(self, group: str, channel: str, now: float) -> Out:
        """The ``add`` marker: proves a subscription is live and says how long membership lasts."""
        ttl = max(0.001, self.groups.expires_at(group, channel) - now)
        return Out(PUB, [group_topic(group), wire.pack({"op": "add", "ch": channel, "ttl": ttl})])

    def _group_add(self, peer: Peer, cmd: wire.GroupAdd, now: float) -> list[Out]:
        if cmd.group_expiry > self.limits.max_group_expiry:
            raise ProtocolError(
                "limit",
                f"group_expiry {cmd.group_expiry:g} s exceeds the broker's max-group-expiry"
                f" {self.limits.max_group_expiry:g} s",
                name="group_expiry", limit=self.limits.max_group_expiry,
            )
        self.groups.add(cmd.group, cmd.channel, now + cmd.group_expiry)
        out = [Out(peer.rid, wire.ok(cmd.id))]
        owner = owner_of(cmd.channel)
        if owner is not None:
            rid = self.by_client.get(owner)
            if rid is not None and rid != peer.rid:
                join = {"g": cmd.group, "ch": cmd.channel, "gexp": cmd.group_expiry}
                out.append(Out(rid, [wire.JOIN, wire.pack(join)]))
            out.append(self._marker(cmd.group, cmd.channel, now))
        return out

    def _group_sync(self, peer: Peer, cmd: wire.GroupSync, now: float) -> list[Out]:
        if not self.groups.is_member(cmd.group, cmd.channel, now):
            raise ProtocolError(
                "not-member", f"channel {cmd.channel!r} is not a member of group {cmd.group!r}",
                name=cmd.channel,
            )
        return [Out(peer.rid, wire.ok(cmd.id)), self._marker(cmd.group, cmd.channel, now)]

    def _group_discard(self, peer: Peer, cmd: wire.GroupDiscard, now: float) -> list[Out]:
        out = [Out(peer.rid, wire.ok(cmd.id))]
        if self.groups.discard(cmd.group, cmd.channel) and owner_of(cmd.channel) is not None:
            header = wire.pack({"op": "discard", "ch": cmd.channel})
            out.append(Out(PUB, [group_topic(cmd.group), header]))
        return out

    def _flush(self, peer: Peer, cmd: wire.Flush, now: float) -> list[Out]:
        for name in list(self.inboxes):
            self.inboxes[name].queue.clear()
            self._gc(name)
        self.groups.clear()
        return [Out(peer.rid, wire.ok(cmd.id)), Out(PUB, [CONTROL_TOPIC, wire.pack({"op": "flush"})])]

    def _ping(self, peer: Peer, cmd: wire.Ping, now: float) -> list[Out]:
        return [Out(peer.rid, wire.ok(cmd.id))]

    def _credit(self, peer: Peer, cmd: wire.Credit, now: float) -> list[Out]:
        if owner_of(cmd.channel) is not None:
            raise ProtocolError(
                "bad-value", f"{cmd.channel!r} is process-specific: its owner needs no credit"
            )
        credit = min(MAX_CREDIT, peer.credits.get(cmd.channel, 0) + cmd.n)
        peer.credits[cmd.channel] = credit
        inbox = self.inboxes.setdefault(cmd.channel, Inbox())
        if peer.rid not in inbox.ready:
            inbox.ready.append(peer.rid)
        return self._pump(cmd.channel, inbox, now)

    def _ack(self, peer: Peer, cmd: wire.Ack, now: float) -> list[Out]:
        out: list[Out] = []
        for name, n in cmd.acks:
            held = peer.inflight.get(name, 0)
            n = min(n, held)
            if not n:
                continue
            if held == n:
                del peer.inflight[name]
            else:
                peer.inflight[name] = held - n
            inbox = self.inboxes[name]
            inbox.inflight -= n
            if owner_of(name) is None:
                peer.credits[name] = peer.credits.get(name, 0) + n
                if peer.rid not in inbox.ready:
                    inbox.ready.append(peer.rid)
                out += self._pump(name, inbox, now)
            self._gc(name)
        return out

    def _bye(self, peer: Peer, cmd: wire.Bye, now: float) -> list[Out]:
        self._forget(peer, drop_specific=True)
        return []
