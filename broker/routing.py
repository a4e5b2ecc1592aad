"""The broker's routing state as a pure object: no sockets, no clock.

Theory of operation
-------------------
``Router.handle(peer, frames, now)`` takes one message from a client (``peer`` is its ZeroMQ
routing id) and returns the messages to send, as ``Out(dest, frames, push)`` where ``dest`` is a
routing id or ``PUB`` for the group publisher. ``Router.tick(now)`` expires what is due and
retries stalled deliveries. The server owns the sockets and the clock; it may wrap a burst of
messages in ``begin_batch()`` / ``end_batch(now)`` so deliveries go out once per burst.

Channels, credit and reservations live in ``delivery.Delivery`` (see its rules). Here:

- Requests are checked against the operator's ``Limits``; a refusal is an ERROR reply with a
  code and the limit, and costs the peer nothing else.
- Groups map channel -> membership expiry. GSEND queues the body in the inbox of each normal
  member (skipping full ones) and publishes it once on the group's topic when any member is
  process-specific; each client hands it to its own members. Membership changes of
  process-specific channels are published on the same topic, so each client sees them in order
  with the messages (GADD and GSYNC publish an ``add`` marker; the client that waits for
  ``group_add`` to finish waits for that marker, which proves its subscription is live).
- A peer that sends more than ``max_bad_frames`` bad messages within STRIKE_WINDOW seconds is
  ignored for ``ban_seconds``.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Callable

from .delivery import ITEM_OVERHEAD, Delivery, Out, Peer
from .groups import Groups
from .protocol import wire
from .protocol.errors import ProtocolError
from .protocol.names import CONTROL_TOPIC, group_topic, owner_of
from .protocol.patterns import compile_pattern

PUB = None  # Out.dest for the publisher socket
GROUP_SWEEP_SECONDS = 5.0  # group_send also drops expired members of the group it reaches
REFUSALS = ("full", "memory", "limit", "too-large", "not-member", "id-taken")
RESERVE_HEADROOM = 4  # no new send slots unless this many largest messages would still fit in memory
RECALL_TIMEOUT = 0.2  # seconds a SEND waits for recalled slots before it is refused as full
JOIN_TIMEOUT = 5.0
STRIKE_WINDOW = 60.0  # seconds over which bad messages are counted against max_bad_frames
LIVENESS = 3  # heartbeat intervals of silence after which a peer that promised heartbeats is dead  # seconds a GADD for another client's channel waits for that client's JOINED  # answered, not held against the peer


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


class Router:
    def __init__(self, limits: Limits = Limits(), pub_endpoint: str = "", wall_offset: float = 0.0,
                 started: float = 0.0, instance: str = "") -> None:
        """``wall_offset`` turns the monotonic ``now`` into wall-clock seconds for the ``at`` and
        ``time`` fields, which let clients discount time a message spent in their socket."""
        self.limits = limits
        self.pub_endpoint = pub_endpoint
        self.wall_offset = wall_offset
        self.started = started
        self.instance = instance  # changes with every broker start, so clients can tell
        self.stats = dict.fromkeys(
            ("received", "delivered", "full", "expired", "too_large", "memory_refused",
             "bad_frames", "group_sends", "group_skipped", "revoked"), 0,
        )
        self.delivery = Delivery(self.stats, wall_offset)
        # (owner client, group, channel) -> GADDs waiting for the owner's JOINED: [(rid, id, deadline)]
        self.joining: dict[tuple[str, str, str], list[tuple[bytes, int, float]]] = {}
        # channel -> SENDs that found it full only because of other peers' reserved slots, in
        # arrival order, waiting for those peers to answer a RECALL: [(rid, Send, deadline)]
        self.recalling: dict[str, list[tuple[bytes, wire.Send, float]]] = {}
        # group -> number of its last message published: clients see gaps (messages the
        # publisher dropped for them) instead of losing them silently
        self.published: dict[str, int] = {}
        self.groups = Groups()
        self.strikes: dict[bytes, int] = {}
        self.banned: dict[bytes, float] = {}
        self._strikes_since: dict[bytes, float] = {}
        self._patterns: dict[str, re.Pattern] = {}
        self._next_group_sweep = 0.0
        self._last_now = started
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

    def handle(self, rid: bytes, frames: list[bytes], now: float) -> list[Out]:
        """Process one message from peer ``rid``; return what to send."""
        self._last_now = now
        if rid in self.banned:
            if now < self.banned[rid]:
                return []
            del self.banned[rid]
        try:
            cmd = wire.decode(frames)
        except ProtocolError as err:
            return self._strike(rid, err, now)
        peer = self.delivery.peers.get(rid)
        if peer is not None:
            peer.last_seen = now
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

    def begin_batch(self) -> None:
        """Until ``end_batch``, deliver to receivers once per burst rather than per message."""
        self.delivery.begin_batch()

    def end_batch(self, now: float) -> list[Out]:
        return self.delivery.end_batch(now)

    def tick(self, now: float) -> list[Out]:
        """Expire messages and memberships that are due; retry stalled deliveries."""
        if now >= self._next_group_sweep:
            self.groups.expire(now)
            for group in [g for g in self.published if g not in self.groups]:
                del self.published[group]  # (a group that comes back starts again from 1)
            self._next_group_sweep = now + GROUP_SWEEP_SECONDS
        out = self.delivery.tick(now)
        for name in [n for n, waiting in self.recalling.items() if waiting[0][2] <= now]:
            out += self._retry_recalled(name, now, final=True)
        for key in [k for k, waiters in self.joining.items() if any(w[2] <= now for w in waiters)]:
            late = [w for w in self.joining[key] if w[2] <= now]
            self.joining[key] = [w for w in self.joining[key] if w[2] > now]
            if not self.joining[key]:
                del self.joining[key]
            out += self._unconfirmed(key, late, f"did not confirm within {JOIN_TIMEOUT:g} s")
        return out

    def _unconfirmed(self, key, waiters, why: str) -> list[Out]:
        client, group, channel = key
        err = ProtocolError(
            "unconfirmed",
            f"the membership of {channel!r} in {group!r} is recorded, but its owner {client!r} {why};"
            " until it subscribes, group messages may miss it",
            name=channel,
        )
        return [Out(rid, wire.error(request_id, err)) for rid, request_id, _ in waiters]

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

    def _forget(self, peer: Peer) -> list[Out]:
        """Drop a peer and everything of its; answer GADDs that waited for it."""
        held = list(peer.reserved)
        self.delivery.forget(peer, drop_specific=True)
        self.groups.drop_owner(peer.client)
        out: list[Out] = []
        for key in [k for k in self.joining if k[0] == peer.client]:
            out += self._unconfirmed(key, self.joining.pop(key), "disconnected")
        for name, waiting in list(self.recalling.items()):
            waiting[:] = [w for w in waiting if w[0] != peer.rid]
            if not waiting:
                del self.recalling[name]
        for name in held:
            if name in self.recalling:
                out += self._retry_recalled(name, self._last_now, final=False)
        return out

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

    def _compile(self, patterns) -> list[tuple[re.Pattern, int]]:
        """The channel_capacity pairs with compiled regexes; ``bad-value`` if one is invalid
        or could backtrack without bound (broker.protocol.patterns)."""
        compiled = []
        for source, capacity in patterns:
            pattern = self._patterns.get(source)
            if pattern is None:
                pattern = compile_pattern(source)
                if len(self._patterns) > 1024:
                    self._patterns.clear()
                self._patterns[source] = pattern
            compiled.append((pattern, capacity))
        return compiled

    # -- command handlers -------------------------------------------------------------------

    def _hello(self, peer_or_rid, cmd: wire.Hello, now: float) -> list[Out]:
        delivery = self.delivery
        rid = peer_or_rid.rid if isinstance(peer_or_rid, Peer) else peer_or_rid
        taken = delivery.by_client.get(cmd.client)
        if taken is not None and taken != rid:
            raise ProtocolError("id-taken", f"client id {cmd.client!r} is in use by a live client")
        old = delivery.peers.get(rid)
        out = self._forget(old) if old is not None and old.client != cmd.client else []
        resumed = rid in delivery.peers
        if not resumed:
            delivery.peers[rid] = Peer(rid, cmd.client)
        peer = delivery.peers[rid]
        peer.heartbeat, peer.last_seen = cmd.heartbeat, now
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
            for group, channel in self.groups.owned_by(cmd.client):
                join = {"g": group, "ch": channel, "gexp": self.groups.expires_at(group, channel) - now}
                out.append(Out(rid, [wire.JOIN, wire.pack(join)]))
        return out

    def _send(self, peer: Peer, cmd: wire.Send, now: float) -> list[Out]:
        self._check_settings(cmd.capacity, cmd.expiry)
        self._check_body(cmd.body)
        self._check_memory(len(cmd.body))
        delivery = self.delivery
        if cmd.channel in self.recalling or not delivery.enqueue(
            cmd.channel, cmd.body, cmd.capacity, now + cmd.expiry, now
        ):
            # A sender whose own slots are what fills the channel (its grant crossed this SEND)
            # uses one of them; otherwise others' slots may be recalled.
            if not delivery.post(peer, cmd.channel, cmd.body, now + cmd.expiry, revoked=False):
                return self._recall_or_refuse(peer, cmd, now)
        self.stats["received"] += 1
        reply = wire.ok(cmd.id)
        if cmd.want and cmd.channel not in self.recalling and self._memory_left(
            RESERVE_HEADROOM * self.limits.max_message_size
        ):
            reply = wire.ok(cmd.id, grant=delivery.reserve(peer, cmd.channel, cmd.capacity, cmd.want, now))
        return [Out(peer.rid, reply), *delivery.kick(cmd.channel, now)]

    def _full(self, cmd: wire.Send) -> ProtocolError:
        self.stats["full"] += 1
        return ProtocolError(
            "full", f"channel {cmd.channel!r} already holds its capacity of {cmd.capacity} messages",
            channel=cmd.channel, capacity=cmd.capacity,
        )

    def _recall_or_refuse(self, peer: Peer, cmd: wire.Send, now: float) -> list[Out]:
        """A SEND found no room. If other senders hold reserved slots there, ask them to give
        them back (RECALL) and answer once they have, so ChannelFull counts only messages;
        otherwise refuse it as full."""
        inbox = self.delivery.inboxes.get(cmd.channel)
        holders = [p for p in self.delivery.peers.values()
                   if p is not peer and p.reserved.get(cmd.channel)] if inbox is not None else []
        waiting = self.recalling.get(cmd.channel)
        if not holders and not waiting:
            raise self._full(cmd)
        self.recalling.setdefault(cmd.channel, []).append((peer.rid, cmd, now + RECALL_TIMEOUT))
        recall = wire.pack({"ch": cmd.channel})
        return [Out(holder.rid, [wire.RECALL, recall]) for holder in holders]

    def _retry_recalled(self, name: str, now: float, final: bool) -> list[Out]:
        """Try the SENDs waiting on ``name`` again, in order; answer those that fit, and the
        rest with ``full`` once no recalled slots are left. ``final`` (their time is up): first
        revoke the slots of the holders that did not answer, so a silent holder (a blocking
        client between calls) does not make the channel look full."""
        waiting = self.recalling.pop(name, [])
        out: list[Out] = []
        delivery = self.delivery
        if final and name in delivery.inboxes:
            senders = {rid for rid, _, _ in waiting}
            for holder in delivery.peers.values():
                if holder.rid not in senders and holder.reserved.get(name):
                    self.stats["revoked"] += delivery.revoke(holder, name)
        for index, (rid, cmd, deadline) in enumerate(waiting):
            peer = delivery.peers.get(rid)
            if peer is None:
                continue
            if delivery.enqueue(name, cmd.body, cmd.capacity, now + cmd.expiry, now):
                self.stats["received"] += 1
                out.append(Out(rid, wire.ok(cmd.id)))
                out += delivery.kick(name, now)
                continue
            others = any(p is not peer and p.reserved.get(name) for p in delivery.peers.values())
            if others and not final and deadline > now:
                self.recalling[name] = waiting[index:]  # still waiting for a RECALL answer
                break
            out.append(Out(rid, wire.error(cmd.id, self._full(cmd))))
        return out

    def _reserve(self, peer: Peer, cmd: wire.Reserve, now: float) -> list[Out]:
        self._check_settings(cmd.capacity)
        grant = 0
        if cmd.channel not in self.recalling and self._memory_left(RESERVE_HEADROOM * self.limits.max_message_size):
            grant = self.delivery.reserve(peer, cmd.channel, cmd.capacity, cmd.want, now)
        return [Out(peer.rid, wire.ok(cmd.id, grant=grant))]

    def _post(self, peer: Peer, cmd: wire.Post, now: float) -> list[Out]:
        # What the acks release and the bodies queued before a refusal are delivered all the
        # same: the refusal is returned with them rather than raised over them.
        out = self._ack(peer, cmd, now) if cmd.acks else []
        try:
            self._check_settings(1, cmd.expiry)
            for body in cmd.bodies:
                self._check_body(body)
        except ProtocolError as err:
            return out + self._refuse(peer.rid, cmd, err, now)
        expires_at = now + cmd.expiry
        queued = 0
        for body in cmd.bodies:
            if not self.delivery.post(peer, cmd.channel, body, expires_at):
                break
            queued += 1
        self.stats["received"] += queued
        if queued:
            out += self.delivery.kick(cmd.channel, now)
        if queued < len(cmd.bodies):
            err = ProtocolError(
                "no-reservation",
                f"POST to {cmd.channel!r} without a reserved slot for body {queued + 1} of"
                f" {len(cmd.bodies)}; it and the rest were not queued",
                channel=cmd.channel, size=queued,
            )
            out += self._refuse(peer.rid, cmd, err, now)
        return out

    def _release(self, peer: Peer, cmd: wire.Release, now: float) -> list[Out]:
        out: list[Out] = []
        for name, n in cmd.slots:
            self.delivery.release(peer, name, n)
            if name in self.recalling:
                out += self._retry_recalled(name, now, final=False)
        return out

    def _group_send(self, peer: Peer, cmd: wire.GroupSend, now: float) -> list[Out]:
        for capacity in (cmd.capacity, *(cap for _, cap in cmd.channel_capacity)):
            self._check_settings(capacity, cmd.expiry)
        self._check_body(cmd.body)
        patterns = self._compile(cmd.channel_capacity)  # all of them before any member is served
        self.stats["group_sends"] += 1
        delivery = self.delivery
        out: list[Out] = []
        queued = skipped = 0
        specific = False
        for name in self.groups.members(cmd.group, now):
            if owner_of(name) is not None:
                specific = True
                continue
            capacity = next((cap for pattern, cap in patterns if pattern.match(name)), cmd.capacity)
            if not self._memory_left(len(cmd.body)):
                self.stats["memory_refused"] += 1
                skipped += 1
            elif delivery.enqueue(name, cmd.body, capacity, now + cmd.expiry, now):
                queued += 1
                out += delivery.kick(name, now)
            else:
                skipped += 1
        self.stats["group_skipped"] += skipped
        if specific:
            seq = self.published[cmd.group] = self.published.get(cmd.group, 0) + 1
            header = {"op": "msg", "ttl": int(cmd.expiry * 1000), "at": now + self.wall_offset,
                      "cap": cmd.capacity, "seq": seq}
            if cmd.channel_capacity:
                header["ccap"] = [list(p) for p in cmd.channel_capacity]
            out.append(Out(PUB, [group_topic(cmd.group), wire.pack(header), cmd.body]))
        return [Out(peer.rid, wire.ok(cmd.id, queued=queued, full=skipped)), *out]

    def _group_post(self, peer: Peer, cmd: wire.GroupPost, now: float) -> list[Out]:
        try:
            return self._group_send(peer, cmd, now)[1:]  # (all but the reply)
        except ProtocolError as err:
            return [Out(peer.rid, wire.error(None, err))]

    def _marker(self, group: str, channel: str, now: float) -> Out:
        """The ``add`` marker: proves a subscription is live and says how long membership
        lasts (``ttl`` in ms, like every ttl on the wire)."""
        ttl = max(1, int((self.groups.expires_at(group, channel) - now) * 1000))
        header = {"op": "add", "ch": channel, "ttl": ttl, "seq": self.published.get(group, 0)}
        return Out(PUB, [group_topic(group), wire.pack(header)])

    def _group_add(self, peer: Peer, cmd: wire.GroupAdd, now: float) -> list[Out]:
        if cmd.group_expiry > self.limits.max_group_expiry:
            raise ProtocolError(
                "limit",
                f"group_expiry {cmd.group_expiry:g} s exceeds the broker's max-group-expiry"
                f" {self.limits.max_group_expiry:g} s",
                name="group_expiry", limit=self.limits.max_group_expiry,
            )
        self.groups.add(cmd.group, cmd.channel, now + cmd.group_expiry)
        owner = owner_of(cmd.channel)
        if owner is None:
            return [Out(peer.rid, wire.ok(cmd.id))]
        rid = self.delivery.by_client.get(owner)
        if rid is None or rid == peer.rid:
            # The caller owns the channel (it waits for the marker itself), or no owner is
            # connected (it will subscribe when it comes).
            return [Out(peer.rid, wire.ok(cmd.id)), self._marker(cmd.group, cmd.channel, now)]
        # Another live client owns it: answer once that client's subscription is live, so that
        # every group_send after this GADD returns reaches the channel.
        key = (owner, cmd.group, cmd.channel)
        self.joining.setdefault(key, []).append((peer.rid, cmd.id, now + JOIN_TIMEOUT))
        join = {"g": cmd.group, "ch": cmd.channel, "gexp": cmd.group_expiry}
        return [Out(rid, [wire.JOIN, wire.pack(join)])]

    def _joined(self, peer: Peer, cmd: wire.Joined, now: float) -> list[Out]:
        waiters = self.joining.pop((peer.client, cmd.group, cmd.channel), [])
        return [Out(rid, wire.ok(request_id)) for rid, request_id, _ in waiters]

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
        delivery = self.delivery
        for name in list(delivery.inboxes):
            delivery.drop_queued(name)
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
        out: list[Out] = []
        for name, n in cmd.acks:
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
            counters=dict(self.stats),
        ))]

    def _heartbeat(self, peer: Peer, cmd: wire.Heartbeat, now: float) -> list[Out]:
        return []  # (handle() has noted the peer as seen)

    def _bye(self, peer: Peer, cmd: wire.Bye, now: float) -> list[Out]:
        return self._forget(peer)
