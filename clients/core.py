"""The client's pure half, shared by ``Client`` and ``AsyncClient``: no sockets, no waiting.

Theory of operation
-------------------
The shells own two sockets, a DEALER to the broker's ROUTER (its routing id is the client id)
and a SUB to the broker's publisher, and they feed everything they read to this core:
``on_dealer(frames, now)`` and ``on_sub(frames, now)``. The core answers with events (a reply
for request ``rid``, messages arrived on a channel) and queues what must be sent in
``outgoing`` (ACK and CREDIT notices, GSYNC retries, SUB socket (un)subscriptions), which the
shell drains after every call.

``ClientCore`` is one object in three modules, split by reason to change. This one holds the
state and the settings, builds the requests and sends; ``clients.inbound`` (its base class)
digests what the broker sends and takes the messages it delivered (``queues``, credit, acks);
``clients.membership`` keeps the group memberships of its own channels (``groups``).

Local state kept here:

- requests: each has an id, which its reply carries. ``ignored`` holds the ids nobody waits on
  (GSYNC retries, GADDs replayed after a reconnection); ``granting`` and ``refilling`` the SEND
  and RESERVE requests whose replies grant slots.
- ``reserved``: slots the broker reserved for this client's sends, per channel. While it has
  one, ``send`` is a POST that needs no reply, so a sender that awaits every send still streams;
  ``ChannelFull`` stays exact because reserved slots count as held in the broker. Slots are
  topped up ahead of need (RESERVE) and given back after RELEASE_IDLE seconds without sends,
  or at once when the broker RECALLs them because another sender is waiting for room.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import secrets
import time
from collections import deque
from typing import Any

from broker.protocol import wire
from broker.protocol.notices import MAX_POST_BODIES
from broker.protocol.errors import ProtocolError
from broker.protocol.names import check_channel, owner_of
from broker.protocol.patterns import compile_pattern

from .errors import BusError, LimitExceeded, MessagesLost, MessageTooLarge, bad_name
from .inbound import Inbound
from .membership import Membership
from .messages import pack_message, unpack_message

__all__ = [
    "LAST_SEND_KEEP", "RECEIVE_WINDOW", "RELEASE_IDLE", "RESERVE_WANT", "ClientCore", "compile_capacities",
    "pack_message", "unpack_message",
]

RESERVE_WANT = 64  # slots asked for per channel; the broker grants at most half the free room
LAST_SEND_KEEP = 1024  # channels remembered past RELEASE_IDLE before the old ones are dropped
# Seconds after the last send to a channel before its unused slots go back (and within which a
# second send counts as streaming). Generous, because a sender that needs the room makes the
# broker RECALL them; short, a round robin over many channels would never keep its slots.
RELEASE_IDLE = 2.0
RECEIVE_WINDOW = 64
log = logging.getLogger("channelbus.client")


_FLAG_LETTERS = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"), (re.VERBOSE, "x"), (re.ASCII, "a"))


def wire_source(pattern: re.Pattern) -> str:
    """The regex as the broker and other clients get it: only a source travels, so the flags
    it was compiled with (and does not say inline) become a scoped group around it."""
    inline = re.compile(pattern.pattern).flags
    extra = "".join(letter for flag, letter in _FLAG_LETTERS if pattern.flags & flag and not inline & flag)
    if not extra:
        return pattern.pattern
    return f"(?{extra}:{pattern.pattern}{chr(10) if 'x' in extra else ''})"  # (a newline ends an x-mode comment)


def compile_capacities(channel_capacity) -> tuple[tuple[re.Pattern, int], ...]:
    """channels_redis style ``{pattern: capacity}``: a pattern is a glob str or a compiled regex."""
    result = []
    for pattern, capacity in dict(channel_capacity or {}).items():
        if isinstance(pattern, str):
            pattern = re.compile(fnmatch.translate(pattern))
        elif not isinstance(pattern, re.Pattern) or not isinstance(pattern.pattern, str):
            raise TypeError(f"channel_capacity keys must be glob strings or compiled str regexes, got {pattern!r}")
        try:  # the broker runs these on group sends: refuse here what it would refuse there
            compile_pattern(wire_source(pattern))
        except ProtocolError as err:
            why = err.message
            if "global flags not at the start" in why:  # (wire_source wrapped inline flags)
                why = (f"channel_capacity regex {pattern.pattern!r}: give its flags either inline,"
                       " as (?i) at the start, or as arguments to re.compile, not both")
            raise ValueError(why) from None
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"channel_capacity values must be ints >= 1, got {capacity!r}")
        result.append((pattern, capacity))
    return tuple(result)


class ClientCore(Inbound):
    """The state and rules of one client's conversation with the broker (see above)."""

    def __init__(
        self, *, capacity: int = 100, expiry: float = 60, group_expiry: float = 86400,
        channel_capacity=None, receive_window: int = RECEIVE_WINDOW, client_id: str | None = None,
        resumable: bool = False, shard: tuple = (),
    ) -> None:
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if type(receive_window) is not int or not 1 <= receive_window <= 100_000:
            raise ValueError(f"receive_window must be an int from 1 to 100000, got {receive_window!r}")
        for name, value in (("expiry", expiry), ("group_expiry", group_expiry)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds above 0, got {value!r}")
        self.capacity = capacity
        self.expiry = float(expiry)
        self._pack = wire.packer()  # (a client is used from one thread at a time)
        self.group_expiry = float(group_expiry)
        self.channel_capacity = compile_capacities(channel_capacity)
        # What GSEND/GPOST carry: computed once, not per group send.
        self._wire_patterns = tuple((wire_source(p), c) for p, c in self.channel_capacity)
        self.receive_window = receive_window
        self.client_id = client_id or secrets.token_hex(6)
        # Another connection will carry on with this client id (a channel layer's next event
        # loop): closing keeps its channels' messages and memberships at the broker (BYE keep).
        self.resumable = resumable
        self.shard = tuple(shard)  # (index, count) of this core's broker among a sharded client's
        # The connection's ZeroMQ routing id: the client id and a secret part, so nobody who
        # knows the id (it is in every process-specific channel name) can take the connection
        # over (the broker's ROUTER hands a routing id to the newest connection that claims it).
        self.routing_id = f"{self.client_id}.{secrets.token_hex(8)}".encode()
        self.limits: dict = {}
        self.pub_endpoint = ""
        self._next_id = 0
        self.queues: dict[str, deque] = {}
        self.taken_at: dict[str, deque] = {}  # group member channel -> when messages left its queue
        self.credited: set[str] = set()
        self.forbidden: dict[str, BusError] = {}  # channel -> the refusal of its CREDIT (receive())
        self.pending_acks: dict[str, int] = {}
        self.ignored: set[int] = set()  # ids of requests nobody waits on (GSYNC, replayed GADD)
        self.reserved: dict[str, int] = {}  # slots reserved for POSTs, per channel
        self.last_send: dict[str, float] = {}  # when each channel was last sent to
        self._prune_at = 0.0  # no scan of last_send before this time
        self.granting: dict[int, str] = {}  # SEND request id -> channel (its reply grants slots)
        self.refilling: dict[int, str] = {}  # RESERVE request id -> channel
        self.voided: set[int] = set()  # ids whose grants a RECALL cancelled before they came
        self.syncing: dict[int, tuple[str, str]] = {}  # GSYNC request id -> (group, channel)
        self.broker_instance = ""
        self.unconfirmed = 0  # POSTs sent since the last reply: a reply confirms all before it
        self.in_doubt = 0  # POSTs (and GPOSTs) unconfirmed when a connection dropped: may be lost
        self.lost: list[tuple[str, int, str]] = []  # (channel or group, count, why): sends that had
        # returned and were lost, for the next send or group_send to raise (MessagesLost)
        self.posts: dict[str, list[bytes]] = {}  # bodies for reserved slots, not yet sent
        self.clock_offset = 0.0  # broker wall clock minus ours, measured at HELLO
        self.outgoing: list[tuple[str, Any]] = []
        self.skipped = 0  # group messages dropped because a local channel was full
        self.groups = Membership(self._emit)  # the group memberships of own channels

    # -- settings -------------------------------------------------------------------------

    def capacity_for(self, channel: str) -> int:
        for pattern, capacity in self.channel_capacity:
            if pattern.match(channel):
                return capacity
        return self.capacity

    def check_limits(self) -> None:
        """Raise LimitExceeded if a setting is above the broker's ceiling (after HELLO)."""
        ceilings = (
            ("capacity", max([self.capacity, *(c for _, c in self.channel_capacity)]), "max_capacity"),
            ("expiry", self.expiry, "max_expiry"),
            ("group_expiry", self.group_expiry, "max_group_expiry"),
        )
        for name, value, key in ceilings:
            limit = self.limits.get(key)
            if limit is not None and value > limit:
                raise LimitExceeded(
                    f"{name} {value:g} exceeds the broker's {key.replace('_', '-')} {limit:g}",
                    name=name, limit=limit,
                )

    # -- requests -------------------------------------------------------------------------

    def _rid(self) -> int:
        self._next_id += 1
        return self._next_id

    def _build(self, cls, **fields) -> tuple[int, list[bytes]]:
        rid = self._rid()
        try:
            return rid, cls(id=rid, **fields).frames()
        except ProtocolError as err:
            raise bad_name(err) if err.code == "bad-name" else BusError(err.message) from None

    def _notice(self, cls, **fields) -> int:
        """Queue a request whose reply nobody waits for (it is ignored); return its id."""
        rid, frames = self._build(cls, **fields)
        self.ignored.add(rid)
        self.outgoing.append(("dealer", frames))
        return rid

    def _emit(self, item: tuple[str, Any]) -> None:
        self.outgoing.append(item)

    def hello(self, heartbeat: float = 0.0) -> tuple[int, list[bytes]]:
        """HELLO, promising heartbeats every ``heartbeat`` seconds (0: none). After the first,
        it asks the broker to ``reset`` what it pushed on the lost connection (sent again)."""
        return self._build(wire.Hello, client=self.client_id, heartbeat=heartbeat, reset=bool(self.limits),
                           shard=self.shard, keep=self.resumable)

    def flush(self) -> tuple[int, list[bytes]]:
        return self._build(wire.Flush)

    def flushed(self) -> None:
        """FLUSH succeeded: forget local state now, not when the broker's notice arrives on the
        publisher (which is not ordered with the reply), so the next receive sees none of it."""
        self._on_flush()

    def ping(self) -> tuple[int, list[bytes]]:
        return self._build(wire.Ping)

    def stats(self, top: int) -> tuple[int, list[bytes]]:
        return self._build(wire.Stats, top=top)

    def new_channel(self, prefix: str = "specific") -> str:
        name = f"{prefix}.{self.client_id}!{secrets.token_hex(6)}"
        try:
            return check_channel(name)
        except ProtocolError as err:
            raise bad_name(err) from None

    def owns(self, channel: str) -> bool:
        return owner_of(channel) == self.client_id

    def heartbeat(self) -> list[bytes]:
        return wire.Heartbeat().frames()

    def goodbye(self) -> list[list[bytes]]:
        """The last messages of a connection: acknowledge what was consumed (so the broker puts
        back only what was not), then BYE."""
        frames = []
        if self.pending_acks:
            acks, self.pending_acks = self.pending_acks, {}
            frames.append(wire.Ack(tuple(acks.items())).frames())
        frames.append(wire.Bye(self.resumable).frames())
        return frames

    # -- sending, with reserved slots -----------------------------------------------------

    def disconnected(self) -> None:
        """The connection to the broker is gone: slots it reserved and grants on their way are
        void; what was POSTed but not confirmed may be lost with it (counted in ``in_doubt``),
        and POST bodies not yet sent are lost (their slots are gone: ``lost``)."""
        self.reserved.clear()
        self.voided.update(self.granting)
        self.voided.update(self.refilling)
        unsent = sum(len(bodies) for bodies in self.posts.values())
        self.in_doubt += self.unconfirmed - unsent  # (they left; the batch below did not)
        self.unconfirmed = 0
        for channel, bodies in self.posts.items():
            self.note_lost(channel, len(bodies), "the connection to the broker dropped before they were sent")
        self.posts.clear()

    def note_lost(self, where: str, count: int, why: str) -> None:
        """``count`` messages to ``where`` whose send had returned are lost: say so in the log
        now, and raise it from the next send or group_send (``take_lost``)."""
        log.error("%d message(s) to %r whose send had returned were lost: %s", count, where, why)
        self.lost.append((where, count, why))

    def take_lost(self) -> MessagesLost | None:
        """The MessagesLost for what ``note_lost`` recorded since the last call, or None."""
        if not self.lost:
            return None
        lost, self.lost = self.lost, []
        count = sum(n for _, n, _ in lost)
        where = sorted({w for w, _, _ in lost})
        why = "; ".join(sorted({f"{w}: {reason}" for w, _, reason in lost}))
        return MessagesLost(
            f"{count} message(s) sent earlier to {', '.join(map(repr, where))} were lost after their"
            f" send returned ({why})", count=count, channels=where,
        )

    def send(self, channel: str, message: dict, now: float,
             alone: bool = False) -> tuple[int | None, list[bytes] | None]:
        """One send. With a reserved slot on ``channel`` the room is already ours, so nothing
        waits for a reply (``rid`` None): with ``alone``, and nothing else queued, the frames
        of a POST of this body alone (carrying the acks due) for the caller to send at once;
        otherwise ``(None, None)``: the body joins the POST batch that ``take_outgoing`` sends.
        Without a slot, the frames of a SEND request, which asks for slots only when this is
        the second send to ``channel`` within RELEASE_IDLE (a lone send reserves nothing). Tops
        the reservation up ahead of need with a RESERVE (queued in ``outgoing``)."""
        body = self._body(message)
        left = self.reserved.get(channel, 0)
        previous = self.last_send.get(channel)
        self.last_send[channel] = now
        self._forget_old_sends(now)
        if left:  # (the name was checked by the SEND that reserved the slot)
            alone = alone and not self.posts and not self.outgoing  # (nothing queued goes first)
            self.reserved[channel] = left - 1
            self.unconfirmed += 1
            if left - 1 <= RESERVE_WANT // 2 and channel not in self.refilling.values():
                rid, reserve = self._build(
                    wire.Reserve, channel=channel, capacity=self.capacity_for(channel), want=RESERVE_WANT,
                )
                self.refilling[rid] = channel
                self.outgoing.append(("dealer", reserve))  # (sent after this POST)
            if alone:
                acks = self.pending_acks
                if acks:
                    self.pending_acks = {}
                return None, wire.Post.encode(channel, self.expiry, (body,), acks, self._pack)
            self.posts.setdefault(channel, []).append(body)
            return None, None
        # Slots are asked for by the second send within RELEASE_IDLE, and by one SEND at a time
        # per channel: concurrent sends while such a grant is on its way ask for nothing more.
        # (A RESERVE on its way does not count: a sender that ran out of slots before its reply
        # came asks again, so a sequential sender gets two grants per round trip.)
        streaming = previous is not None and now - previous < RELEASE_IDLE and channel not in self.granting.values()
        rid, frames = self._build(
            wire.Send, channel=channel, capacity=self.capacity_for(channel), expiry=self.expiry,
            body=body, want=RESERVE_WANT if streaming else 0,
        )
        if streaming:
            self.granting[rid] = channel
        return rid, frames

    def _forget_old_sends(self, now: float) -> None:
        """Keep ``last_send`` small: past LAST_SEND_KEEP entries, drop the channels not sent to
        for RELEASE_IDLE (one scan per RELEASE_IDLE at most, so sends stay O(1) amortised)."""
        last = self.last_send
        if len(last) > len(self.reserved) + LAST_SEND_KEEP and now >= self._prune_at:
            for ch in [ch for ch, t in last.items() if now - t >= RELEASE_IDLE and ch not in self.reserved]:
                del last[ch]
            self._prune_at = now + RELEASE_IDLE

    def _granted(self, channel: str, header: dict, now: float) -> None:
        grant = header.get("grant", 0)
        if grant:
            self.reserved[channel] = self.reserved.get(channel, 0) + grant
            self.last_send.setdefault(channel, now)

    def _recalled(self, channel: str) -> None:
        """Another sender is waiting for room on ``channel``: give back every slot held there,
        including grants still on their way (their replies will be ignored)."""
        self.reserved.pop(channel, None)
        for pending in (self.granting, self.refilling):
            self.voided.update(rid for rid, ch in pending.items() if ch == channel)
        self.outgoing.append(("dealer", wire.Release(((channel, 0),)).frames()))

    def release_idle(self, now: float) -> float | None:
        """Give back slots on channels not sent to for RELEASE_IDLE seconds; return when the
        next reservation falls idle (None when none is held)."""
        last = self.last_send
        idle = [ch for ch, n in self.reserved.items() if n and now - last.get(ch, now) >= RELEASE_IDLE]
        if idle:
            slots = tuple((ch, self.reserved.pop(ch)) for ch in idle)
            self.outgoing.append(("dealer", wire.Release(slots).frames()))
        self._forget_old_sends(now)
        held = [last.get(ch, now) for ch, n in self.reserved.items() if n]
        return min(held) + RELEASE_IDLE if held else None

    def group_send(self, group: str, message: dict, reply: bool = True) -> tuple[int | None, list[bytes]]:
        """GSEND, or (``reply`` False) GPOST, which needs no round trip (``rid`` None)."""
        body = self._body(message)
        # ``sent``: members at capacity now skip it, not members at capacity when the broker
        # gets to it (a GPOST leaves later), as the layer specification says.
        fields = dict(group=group, capacity=self.capacity, expiry=self.expiry,
                      channel_capacity=self._wire_patterns, body=body,
                      sent=time.time() + self.clock_offset if self.limits else 0.0)
        if reply:
            return self._build(wire.GroupSend, **fields)
        try:
            frames = wire.GroupPost(id=0, **fields).frames()
        except ProtocolError as err:
            raise bad_name(err) if err.code == "bad-name" else BusError(err.message) from None
        self.unconfirmed += 1
        return None, frames

    def _body(self, message: dict) -> bytes:
        body = pack_message(message, self._pack)
        limit = self.limits.get("max_message_size")
        if limit is not None and len(body) > limit:
            raise MessageTooLarge(
                f"message is {len(body)} bytes serialised; the broker's max-message-size is {limit} bytes",
                size=len(body), limit=limit,
            )
        return body

    def take_outgoing(self) -> list[tuple[str, Any]]:
        """What to send now, POST batches first (a RELEASE behind them must not overtake)."""
        out, self.outgoing = self.outgoing, []
        if self.posts:
            out[:0] = self.take_posts()
        return out

    def take_posts(self) -> list[tuple[str, Any]]:
        """The pending POSTs: one message per channel (per MAX_POST_BODIES bodies); the first
        also carries the acks not yet sent."""
        posts, self.posts = self.posts, {}
        acks, self.pending_acks = self.pending_acks, {}
        out = []
        for channel, bodies in posts.items():  # (names checked at send; counts are our own)
            for i in range(0, len(bodies), MAX_POST_BODIES):
                out.append(("dealer", wire.Post.encode(
                    channel, self.expiry, bodies[i:i + MAX_POST_BODIES], acks, self._pack)))
                acks = {}
        return out

    # -- groups (the membership state is in self.groups) ----------------------------------

    def group_add(self, group: str, channel: str) -> tuple[int, list[bytes]]:
        """GADD; for an own channel also subscribe and start waiting for the ``add`` marker
        (the shell sends the subscription first, then the frames)."""
        rid, frames = self._build(wire.GroupAdd, group=group, channel=channel, group_expiry=self.group_expiry)
        if self.owns(channel):
            self.groups.adding(group, channel)
        return rid, frames

    def expect_marker(self, group: str, channel: str, now: float) -> None:
        """GADD succeeded: retry GSYNC from now on while the marker has not come."""
        self.groups.expect_marker(group, channel, now)

    def abandon(self, group: str, channel: str) -> None:
        """GADD failed: stop waiting and drop the subscription if nothing else needs it."""
        self.groups.leave(group, channel)

    def marker_pending(self, group: str, channel: str) -> bool:
        return self.groups.marker_pending(group, channel)

    def marker_failure(self, group: str, channel: str) -> BusError | None:
        """Why waiting for (group, channel)'s marker ended without it (e.g. the membership
        expired or was discarded meanwhile), or None when the marker came."""
        return self.groups.marker_failure(group, channel)

    def due_syncs(self, now: float) -> float | None:
        """Queue GSYNC for markers overdue at ``now``; return when the next one falls due."""
        for key in self.groups.overdue(now):
            self.syncing[self._notice(wire.GroupSync, group=key[0], channel=key[1])] = key
        return self.groups.next_sync()

    def group_discard(self, group: str, channel: str) -> tuple[int, list[bytes]]:
        # The local membership ends with the broker's "discard" on the group's topic, which is
        # ordered with the group's messages: those sent before the discard still arrive.
        return self._build(wire.GroupDiscard, group=group, channel=channel)

    @property
    def members(self) -> dict[str, dict[str, float]]:
        """Live memberships of own channels: ``{group: {channel: until}}`` (from ``groups``)."""
        return self.groups.members

    @property
    def subscribed(self) -> set[str]:
        return self.groups.subscribed

    @property
    def awaiting(self) -> dict[tuple[str, str], float]:
        return self.groups.awaiting

    @property
    def lost_group_messages(self) -> int:
        return self.groups.lost_messages
