"""The broker's routing state as a pure object: no sockets, no clock.

Theory of operation
-------------------
``Router.handle(peer, frames, now)`` takes one message from a client (``peer`` is its ZeroMQ
routing id) and returns the messages to send, as ``Out(dest, frames, push)`` where ``dest`` is a
routing id or ``PUB`` for the group publisher. ``Router.tick(now)`` expires what is due and
retries stalled deliveries. The server owns the sockets and the clock; it may wrap a burst of
messages in ``begin_batch()`` / ``end_batch(now)`` so deliveries go out once per burst.

Channels, credit and reservations live in ``delivery.Delivery``; the group commands in
``group_routing.GroupRouting`` (mixed into ``Router``; see their rules). Here:

- Requests are checked against the operator's ``Limits``; a refusal is an ERROR reply with a
  code and the limit, and costs the peer nothing else.
- A SEND is refused ``full`` only when the channel's messages (queued and in flight) fill the
  sender's capacity. When reserved slots are what fills it, the broker revokes them all at once
  (``Delivery.revoke``; each holder is told with a RECALL) and queues the SEND: every request
  is answered at once, and nobody's slots make ``full`` come early.
- A peer that sends more than ``max_bad_frames`` bad messages within STRIKE_WINDOW seconds is
  ignored for ``ban_seconds``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable

from .access import AccessControl
from .delivery import ITEM_OVERHEAD, PUB, Delivery, Out, Peer
from .group_routing import GROUP_SWEEP_SECONDS, JOIN_TIMEOUT, GroupRouting
from . import invariants
from .invariants import CONSERVATION
from .permissions import Permissions
from .protocol import wire
from .protocol.errors import ProtocolError
from .protocol.fields import MAP_FIRST_BYTES
from .protocol.names import CONTROL_TOPIC, owner_of

__all__ = [
    "GROUP_SWEEP_SECONDS", "JOIN_TIMEOUT", "LIVENESS", "PUB", "REFUSALS",
    "RESERVE_HEADROOM", "STRIKE_WINDOW", "Limits", "Out", "Router",
]

REFUSALS = ("full", "memory", "limit", "too-large", "not-member", "id-taken", "forbidden", "wrong-shard")  # answered, not struck
RESERVE_HEADROOM = 4  # no new send slots unless this many largest messages would still fit in memory
STRIKE_WINDOW = 60.0  # seconds over which bad messages are counted against max_bad_frames
LIVENESS = 3  # heartbeat intervals of silence after which a peer that promised heartbeats is dead
_POST = wire.verb_frame("POST")


@dataclass(frozen=True)
class Limits:
    """The operator's ceilings, enforced on every request."""

    max_message_size: int = 1024 * 1024
    max_capacity: int = 100_000
    max_expiry: float = 86400.0
    max_group_expiry: float = 7 * 86400.0
    max_bad_frames: int = 100
    ban_seconds: float = 10.0
    max_memory: int = 512 * 1024 * 1024  # bytes of queued messages (bodies + ITEM_OVERHEAD each)
    heartbeat: float = 1.0  # seconds between the broker's heartbeats to each peer


class Router(GroupRouting, AccessControl):
    def __init__(self, limits: Limits = Limits(), pub_endpoint: str = "", wall_offset: float = 0.0,
                 started: float = 0.0, instance: str = "", permissions: Permissions | None = None) -> None:
        """``wall_offset`` turns the monotonic ``now`` into wall-clock seconds for the ``at`` and
        ``time`` fields, which let clients discount time a message spent in their socket.
        ``permissions`` (with CURVE keys) checks each request (``access``)."""
        self.limits = limits
        self.pub_endpoint = pub_endpoint
        self.wall_offset = wall_offset
        self.started = started
        self.instance = instance  # changes with every broker start, so clients can tell
        self.stats = dict.fromkeys(
            ("received", "delivered", "full", "expired", "too_large", "memory_refused",
             "bad_frames", "group_sends", "group_skipped", "revoked",
             "busy_polled", "busy_poll_missed",  # (these two: counted by the server)
             *CONSERVATION), 0,
        )
        self.delivery = Delivery(self.stats, wall_offset)
        # Until end_batch(now), deliver to receivers once per burst rather than per message:
        # the delivery's own methods (one call less per message than methods that pass through).
        self.begin_batch, self.end_batch = self.delivery.begin_batch, self.delivery.end_batch
        self._init_groups()  # groups, joining, published
        self._init_access(permissions)
        self.shard: tuple[int, int] | None = None  # (index, count), as the first sharded client said
        self.strikes: dict[bytes, int] = {}
        self.banned: dict[bytes, float] = {}
        self._strikes_since: dict[bytes, float] = {}
        self._handlers: dict[type, Callable] = {
            wire.Hello: self._hello, wire.Send: self._send, wire.Reserve: self._reserve,
            wire.Post: self._post, wire.Release: self._release, wire.GroupSend: self._group_send,
            wire.GroupAdd: self._group_add, wire.GroupSync: self._group_sync,
            wire.GroupDiscard: self._group_discard, wire.Flush: self._flush,
            wire.Ping: self._ping, wire.Credit: self._credit, wire.Ack: self._ack,
            wire.Bye: self._bye, wire.Joined: self._joined, wire.Stats: self._stats,
            wire.Heartbeat: self._heartbeat, wire.GroupPost: self._group_post,
        }

    @property
    def peers(self) -> dict[bytes, Peer]:
        return self.delivery.peers

    @property
    def by_client(self) -> dict[str, bytes]:
        return self.delivery.by_client

    @property
    def inboxes(self):
        return self.delivery.inboxes

    # -- entry points -----------------------------------------------------------------------

    def handle(self, rid: bytes, frames: list[bytes], now: float, key: str | None = None) -> list[Out]:
        """Process one message from peer ``rid``; return what to send. ``key``: the name of the
        CURVE key its connection authenticated with (needed only until its HELLO is handled)."""
        if rid in self.banned:
            if now < self.banned[rid]:
                return []
            del self.banned[rid]
        peer = self.delivery.peers.get(rid)
        if peer is not None and frames[0] == _POST:  # the hot path: no command object is built
            parts = wire.Post.parts(frames)
            if parts is not None:
                peer.last_seen = now
                return self._queue_posted(peer, *parts, now)
        try:
            cmd = wire.decode(frames)
        except ProtocolError as err:
            return self._strike(rid, err, now)
        if peer is not None:
            peer.last_seen = now
            if self.permissions is not None:
                refused = self.guard(peer, cmd)
                if refused is not None:
                    return refused
        else:
            self._new_key = key
        if peer is None and type(cmd) is not wire.Hello:
            if type(cmd) is wire.Bye:
                return []
            # A client the broker forgot (restart, silence) says HELLO again on the first of
            # these; a peer that keeps sending them is counted like any other bad sender.
            err = ProtocolError("no-hello", f"send HELLO before {cmd.VERB} (this broker does not know you)")
            return self._strike(rid, err, now, getattr(cmd, "id", None))
        try:
            return self._handlers[type(cmd)](peer or rid, cmd, now)
        except ProtocolError as err:
            return self._refuse(rid, cmd, err, now)

    def _refuse(self, rid: bytes, cmd, err: ProtocolError, now: float) -> list[Out]:
        """The ERROR for a command a handler refused: a plain reply when the refusal depends on
        the broker's state, a strike against the peer when the command was malformed."""
        if err.code in REFUSALS:
            return [Out(rid, wire.error(getattr(cmd, "id", None), err))]
        return self._strike(rid, err, now, getattr(cmd, "id", None))

    def tick(self, now: float) -> list[Out]:
        """Expire messages, memberships and waits that are due; retry stalled deliveries."""
        self._sweep_groups(now)
        out = self.delivery.tick(now)
        out += self._expire_joins(now)
        return out

    def heartbeat(self, now: float) -> list[Out]:
        """Every ``limits.heartbeat`` seconds: forget peers silent for LIVENESS of their own
        intervals; send every other peer a heartbeat (an unroutable one, a vanished peer, makes
        the server call ``peer_gone``)."""
        out: list[Out] = []
        for peer in list(self.delivery.peers.values()):
            if peer.heartbeat and now - peer.last_seen > LIVENESS * peer.heartbeat:
                out += self._forget(peer)
        beat = [wire.HB, wire.pack({"instance": self.instance})]
        out += [Out(rid, beat) for rid in self.delivery.peers]
        return out

    def check(self, scan: bool = True) -> None:
        """Raise ``invariants.InvariantError`` if the state breaks a rule (conservation first):
        the broker's check mode calls this after every batch and tick (``scan``, which looks at
        every message held: only at ticks)."""
        invariants.check(self, scan)

    def unsent(self, rid: bytes, push: tuple[str, list], now: float, gone: bool) -> list[Out]:
        """The server could not send a MSG: requeue its items at the front of the inbox.

        ``gone`` says the peer has vanished (forget it) rather than being momentarily full.
        """
        peer = self.delivery.unsent(rid, push, now)
        if gone and peer is not None:
            return self._forget(peer)
        return []

    def peer_gone(self, rid: bytes) -> list[Out]:
        """Forget a peer that vanished (heartbeat timeout or unroutable); return what to send."""
        peer = self.delivery.peers.get(rid)
        return self._forget(peer) if peer is not None else []

    # -- helpers ----------------------------------------------------------------------------

    def _forget(self, peer: Peer, keep: bool = False) -> list[Out]:
        """Drop a peer and everything of its; answer GADDs that waited for it. A peer whose
        client id outlives the connection (HELLO or BYE ``keep``), however it went, leaves its
        process-specific channels (messages, memberships) for the id's next connection."""
        keep = keep or peer.keep
        self.delivery.forget(peer, drop_specific=not keep)
        return self._forget_groups(peer.client, drop=not keep)

    def _strike(self, rid: bytes, err: ProtocolError, now: float, request_id=None) -> list[Out]:
        self.stats["bad_frames"] += 1
        if request_id is None:
            request_id = getattr(err, "request_id", None)
        if len(self.strikes) > 10_000:
            self.strikes.clear()
            self._strikes_since.clear()
        since = self._strikes_since.get(rid)
        if since is None or now - since > STRIKE_WINDOW:  # the budget is per window, not per life
            self.strikes[rid] = 0
            self._strikes_since[rid] = now
        count = self.strikes[rid] = self.strikes.get(rid, 0) + 1
        if count > self.limits.max_bad_frames:
            del self.strikes[rid]
            del self._strikes_since[rid]
            self.banned[rid] = now + self.limits.ban_seconds
            peer = self.delivery.peers.get(rid)
            forgotten = self._forget(peer) if peer is not None else []
            err = ProtocolError(
                "banned",
                f"more than {self.limits.max_bad_frames} bad messages; ignoring this peer for"
                f" {self.limits.ban_seconds:g} s. Last problem: {err.message}",
                limit=self.limits.max_bad_frames,
            )
            return [Out(rid, wire.error(request_id, err)), *forgotten]
        return [Out(rid, wire.error(request_id, err))]

    def _check_settings(self, capacity: int, expiry: float | None = None) -> None:
        lim = self.limits
        if capacity > lim.max_capacity:
            raise ProtocolError(
                "limit", f"capacity {capacity} exceeds the broker's max-capacity {lim.max_capacity}",
                name="capacity", limit=lim.max_capacity,
            )
        if expiry is not None and expiry > lim.max_expiry:
            raise ProtocolError(
                "limit", f"expiry {expiry:g} s exceeds the broker's max-expiry {lim.max_expiry:g} s",
                name="expiry", limit=lim.max_expiry,
            )

    def _bodies_fit(self, bodies) -> bool:
        """Whether every body passes ``_check_body`` (a quick yes for the usual POST)."""
        limit = self.limits.max_message_size
        for body in bodies:  # (body_is_map, without a call per body)
            if len(body) > limit or not body or body[0] not in MAP_FIRST_BYTES:
                return False
        return True

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

    def _memory_left(self, size: int) -> bool:
        return self.delivery.bytes_held + size + ITEM_OVERHEAD <= self.limits.max_memory

    def _check_memory(self, size: int) -> None:
        if not self._memory_left(size):
            self.stats["memory_refused"] += 1
            held, limit = self.delivery.bytes_held, self.limits.max_memory
            raise ProtocolError(
                "memory",
                f"the broker holds {held} bytes of queued messages and its max-memory is {limit}:"
                " new messages are refused until receivers catch up or messages expire",
                size=held, limit=limit,
            )

    # -- command handlers -------------------------------------------------------------------

    def _hello(self, peer_or_rid, cmd: wire.Hello, now: float) -> list[Out]:
        delivery = self.delivery
        rid = peer_or_rid.rid if isinstance(peer_or_rid, Peer) else peer_or_rid
        taken = delivery.by_client.get(cmd.client)
        if taken is not None and taken != rid:
            raise ProtocolError("id-taken", f"client id {cmd.client!r} is in use by a live client")
        self._check_shard(cmd)
        old = delivery.peers.get(rid)
        key = old.key if old is not None else self._new_key
        self.claim(cmd.client, key)
        out = self._forget(old) if old is not None and old.client != cmd.client else []
        resumed = rid in delivery.peers
        if not resumed:
            delivery.peers[rid] = Peer(rid, cmd.client, key=key)
        peer = delivery.peers[rid]
        peer.heartbeat, peer.last_seen, peer.keep = cmd.heartbeat, now, cmd.keep
        if resumed and cmd.reset:
            out += delivery.reset(peer)  # what its lost connection carried goes out again
        delivery.by_client[cmd.client] = rid
        lim = self.limits
        out.append(Out(rid, wire.ok(
            cmd.id, client=cmd.client, pub=self.pub_endpoint, version=wire.VERSION,
            max_message_size=lim.max_message_size, max_capacity=lim.max_capacity,
            max_expiry=lim.max_expiry, max_group_expiry=lim.max_group_expiry,
            time=now + self.wall_offset, heartbeat=lim.heartbeat, instance=self.instance,
            resumed=resumed,
        )))
        for name in [n for n, box in delivery.inboxes.items() if box.queue and owner_of(n) == cmd.client]:
            out += delivery.kick(name, now)  # messages that waited for this client
        if not resumed:  # memberships recorded while it was away: it must subscribe to them
            out += self._rejoin(rid, cmd.client, now)
        return out

    def _check_shard(self, cmd: wire.Hello) -> None:
        """A client with several brokers says where this one is in its list: the first says
        it for good; one that says otherwise would place names where no one else looks."""
        if not cmd.shard:
            return
        if self.shard is None:
            self.shard = tuple(cmd.shard)
        elif tuple(cmd.shard) != self.shard:
            index, count = self.shard
            raise ProtocolError(
                "wrong-shard",
                f"this client's list of {cmd.shard[1]} brokers puts this one at place {cmd.shard[0] + 1}, but"
                f" earlier clients' lists of {count} put it at place {index + 1}: give every client the"
                " same brokers in the same order", shard=list(self.shard),
            )

    def _send(self, peer: Peer, cmd: wire.Send, now: float) -> list[Out]:
        self._check_settings(cmd.capacity, cmd.expiry)
        self._check_body(cmd.body)
        self._check_memory(len(cmd.body))
        delivery = self.delivery
        out: list[Out] = []
        if not delivery.enqueue(cmd.channel, cmd.body, cmd.capacity, now + cmd.expiry, now):
            out = self._revoke(cmd.channel, cmd.capacity)  # (the sender's own slots too)
            if not out or not delivery.enqueue(cmd.channel, cmd.body, cmd.capacity, now + cmd.expiry, now):
                out.append(Out(peer.rid, wire.error(cmd.id, self._full(cmd))))
                return out
        self.stats["received"] += 1
        reply = wire.ok(cmd.id)
        if cmd.want and self._memory_left(RESERVE_HEADROOM * self.limits.max_message_size):
            reply = wire.ok(cmd.id, grant=delivery.reserve(peer, cmd.channel, cmd.capacity, cmd.want, now))
        out.append(Out(peer.rid, reply))
        out += delivery.kick(cmd.channel, now)
        return out

    def _revoke(self, name: str, capacity: int) -> list[Out]:
        """If reserved slots are what fills ``name`` for ``capacity`` (its messages alone do
        not), revoke them all and return a RECALL for each holder; else nothing."""
        inbox = self.delivery.inboxes.get(name)
        if inbox is None or not inbox.reserved or len(inbox.queue) + inbox.inflight >= capacity:
            return []
        recall = [wire.RECALL, wire.pack({"ch": name})]
        out = []
        for holder, n in self.delivery.revoke(name):
            self.stats["revoked"] += n
            out.append(Out(holder.rid, recall))
        return out

    def _full(self, cmd: wire.Send) -> ProtocolError:
        self.stats["full"] += 1
        return ProtocolError(
            "full", f"channel {cmd.channel!r} already holds its capacity of {cmd.capacity} messages",
            channel=cmd.channel, capacity=cmd.capacity,
        )

    def _reserve(self, peer: Peer, cmd: wire.Reserve, now: float) -> list[Out]:
        self._check_settings(cmd.capacity)
        grant = 0
        if self._memory_left(RESERVE_HEADROOM * self.limits.max_message_size):
            grant = self.delivery.reserve(peer, cmd.channel, cmd.capacity, cmd.want, now)
        return [Out(peer.rid, wire.ok(cmd.id, grant=grant))]

    def _post(self, peer: Peer, cmd: wire.Post, now: float) -> list[Out]:
        return self._queue_posted(peer, cmd.channel, cmd.expiry, cmd.bodies, cmd.acks, now)

    def _queue_posted(self, peer: Peer, channel: str, expiry: float, bodies, acks, now: float) -> list[Out]:
        """A POST's work, from its command or from its frames (``handle``'s fast path)."""
        # What the acks release and the bodies queued before a refusal are delivered all the
        # same: the refusal is returned with them rather than raised over them.
        out = self._take_acks(peer, acks, now) if acks else []
        delivery = self.delivery
        if expiry > self.limits.max_expiry or not self._bodies_fit(bodies):
            try:  # (something is wrong: find what, for the refusal)
                self._check_settings(1, expiry)
                for body in bodies:
                    self._check_body(body)
            except ProtocolError as err:
                err.fields.update(channel=channel, lost=len(bodies))  # (the sender must learn of it)
                return out + self._refuse(peer.rid, None, err, now)
        pushed = delivery.deliver_posted(peer, channel, bodies, now + expiry, now)
        if pushed is not None:  # (the usual case: what kick would give, without queueing)
            self.stats["received"] += len(bodies)
            out.append(pushed)
            return out
        queued = delivery.post(peer, channel, bodies, now + expiry)
        self.stats["received"] += queued
        if queued:
            out += delivery.kick(channel, now)
        if queued < len(bodies):
            err = ProtocolError(
                "no-reservation",
                f"POST to {channel!r} without a reserved slot for body {queued + 1} of"
                f" {len(bodies)}; it and the rest were not queued",
                channel=channel, size=queued, lost=len(bodies) - queued,
            )
            out += self._refuse(peer.rid, None, err, now)
        return out

    def _release(self, peer: Peer, cmd: wire.Release, now: float) -> list[Out]:
        for name, n in cmd.slots:
            self.delivery.release(peer, name, n)
        return []

    def _flush(self, peer: Peer, cmd: wire.Flush, now: float) -> list[Out]:
        delivery = self.delivery
        for name in list(delivery.inboxes):
            self.stats["flushed"] += delivery.drop_queued(name)
        self.groups.clear()
        return [Out(peer.rid, wire.ok(cmd.id)), Out(PUB, [CONTROL_TOPIC, wire.pack({"op": "flush"})])]

    def _ping(self, peer: Peer, cmd: wire.Ping, now: float) -> list[Out]:
        return [Out(peer.rid, wire.ok(cmd.id))]

    def _credit(self, peer: Peer, cmd: wire.Credit, now: float) -> list[Out]:
        if owner_of(cmd.channel) is not None:
            raise ProtocolError(
                "bad-value", f"{cmd.channel!r} is process-specific: its owner needs no credit"
            )
        return self.delivery.credit(peer, cmd.channel, cmd.n, now)

    def _ack(self, peer: Peer, cmd: wire.Ack, now: float) -> list[Out]:
        return self._take_acks(peer, cmd.acks, now)

    def _take_acks(self, peer: Peer, acks, now: float) -> list[Out]:
        out: list[Out] = []
        for name, n in acks:
            out += self.delivery.ack(peer, name, n, now)
        return out

    def _stats(self, peer: Peer, cmd: wire.Stats, now: float) -> list[Out]:
        delivery = self.delivery
        boxes = delivery.inboxes
        deepest = heapq.nlargest(cmd.top, boxes, key=lambda name: boxes[name].depth())
        sizes = self.groups.sizes()
        largest = heapq.nlargest(cmd.top, sizes, key=sizes.get)
        return [Out(peer.rid, wire.ok(
            cmd.id, uptime=max(0.0, now - self.started), clients=len(delivery.peers),
            channels=len(boxes), queued=sum(len(b.queue) for b in boxes.values()),
            inflight=sum(b.inflight for b in boxes.values()),
            reserved=sum(b.reserved for b in boxes.values()),
            bytes_held=delivery.bytes_held, max_memory=self.limits.max_memory,
            top_channels=[[n, len(boxes[n].queue), boxes[n].inflight, boxes[n].reserved] for n in deepest],
            groups=len(sizes), top_groups=[[g, sizes[g]] for g in largest],
            counters=dict(self.stats), forbidden_by_key=dict(self.forbidden_by_key),
        ))]

    def _heartbeat(self, peer: Peer, cmd: wire.Heartbeat, now: float) -> list[Out]:
        return []  # (handle() has noted the peer as seen)

    def _bye(self, peer: Peer, cmd: wire.Bye, now: float) -> list[Out]:
        return self._forget(peer, keep=cmd.keep)  # (keep: the id carries on; its channels stay)
