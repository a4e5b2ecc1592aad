"""The client's pure half, shared by ``Client`` and ``AsyncClient``: no sockets, no waiting.

Theory of operation
-------------------
The shells own two sockets, a DEALER to the broker's ROUTER (its routing id is the client id)
and a SUB to the broker's publisher, and they feed everything they read to this core:
``on_dealer(frames, now)`` and ``on_sub(frames, now)``. The core answers with events (a reply
for request ``rid``, messages arrived on a channel) and queues what must be sent in
``outgoing`` (ACK and CREDIT notices, GSYNC retries, SUB socket (un)subscriptions), which the
shell drains after every call.

Local state:

- ``queues``: messages delivered to this process and not yet taken by ``receive``, per channel,
  as ``(body, deadline, direct)``. Direct messages (pushed by the broker on the ROUTER) are
  acknowledged as soon as they are taken or found expired (the asyncio shell coalesces the acks
  of one loop iteration and sends them before anything else), so the broker's count of what a
  channel holds stays exact; group messages for process-specific channels arrive on the topic and are bounded
  here by capacity.
- ``reserved``: slots the broker reserved for this client's sends, per channel. While it has
  one, ``send`` is a POST that needs no reply, so a sender that awaits every send still streams;
  ``ChannelFull`` stays exact because reserved slots count as held in the broker. Slots are
  topped up ahead of need (RESERVE) and given back after RELEASE_IDLE seconds without sends,
  or at once when the broker RECALLs them because another sender is waiting for room.
- ``members``: which of this process's own channels belong to which group, and until when. A
  membership becomes active when the broker's ``add`` marker for it arrives on the topic: then
  the subscription is live, and every later group message is seen after it.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import secrets
from collections import deque
from typing import Any

import msgpack

from broker.protocol import wire
from broker.protocol.notices import MAX_POST_BODIES
from broker.protocol.errors import ProtocolError
from broker.protocol.names import (
    CONTROL_TOPIC, check_channel, group_topic, owner_of,
)

from .errors import (
    BusError, InvalidName, LimitExceeded, MessageTooLarge, from_reply,
)

log = logging.getLogger("channelbus.client")

RESERVE_WANT = 64  # slots asked for per channel; the broker grants at most half the free room
LAST_SEND_KEEP = 1024  # channels remembered past RELEASE_IDLE before the old ones are dropped
# Seconds after the last send to a channel before its unused slots go back (and within which a
# second send counts as streaming). Generous, because a sender that needs the room makes the
# broker RECALL them; short, a round robin over many channels would never keep its slots.
RELEASE_IDLE = 2.0
RECEIVE_WINDOW = 64
HEARTBEAT = 1.0  # seconds between the asyncio client's heartbeats (when otherwise quiet)
LIVENESS = 3  # broker heartbeat intervals of silence after which the link is given up
RECONNECT_MS = 100  # first reconnection attempt after this long, doubling up to RECONNECT_MAX_MS
RECONNECT_MAX_MS = 2000
CLOSE_LINGER_MS = 500  # how long a closed socket may still send its last ACK and BYE
SYNC_RETRY = 0.05  # first GSYNC retry after this many seconds, doubling up to SYNC_RETRY_MAX
SYNC_RETRY_MAX = 1.0


def pack_message(message: Any) -> bytes:
    """Serialise a message dict; raise TypeError/ValueError for what the spec forbids."""
    if not isinstance(message, dict):
        raise TypeError(f"message must be a dict, got {type(message).__name__}")
    if not isinstance(message.get("type"), str):
        raise ValueError("message must have a 'type' key with a str value, e.g. {'type': 'chat.message'}")
    try:
        return msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"message cannot be serialised with msgpack: {exc}") from None


def unpack_message(body: bytes) -> dict:
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def compile_capacities(channel_capacity) -> tuple[tuple[re.Pattern, int], ...]:
    """channels_redis style ``{pattern: capacity}``: a pattern is a glob str or a compiled regex."""
    result = []
    for pattern, capacity in dict(channel_capacity or {}).items():
        if isinstance(pattern, str):
            pattern = re.compile(fnmatch.translate(pattern))
        elif not isinstance(pattern, re.Pattern):
            raise TypeError(f"channel_capacity keys must be glob strings or compiled regexes, got {pattern!r}")
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"channel_capacity values must be ints >= 1, got {capacity!r}")
        result.append((pattern, capacity))
    return tuple(result)


def bad_name(err: ProtocolError) -> InvalidName:
    return InvalidName(err.message, name=err.fields.get("name", ""))


class ClientCore:
    def __init__(
        self, *, capacity: int = 100, expiry: float = 60, group_expiry: float = 86400,
        channel_capacity=None, receive_window: int = RECEIVE_WINDOW, client_id: str | None = None,
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
        self.group_expiry = float(group_expiry)
        self.channel_capacity = compile_capacities(channel_capacity)
        self.receive_window = receive_window
        self.client_id = client_id or secrets.token_hex(6)
        self.limits: dict = {}
        self.pub_endpoint = ""
        self._next_id = 0
        self.queues: dict[str, deque] = {}
        self.credited: set[str] = set()
        self.pending_acks: dict[str, int] = {}
        self.members: dict[str, dict[str, float]] = {}
        self.awaiting: dict[tuple[str, str], float] = {}  # (group, channel) -> next GSYNC time
        self.retry: dict[tuple[str, str], float] = {}
        self.subscribed: set[str] = set()
        self.ignored: set[int] = set()  # ids of requests nobody waits on (GSYNC retries)
        self.reserved: dict[str, int] = {}  # slots reserved for POSTs, per channel
        self.last_send: dict[str, float] = {}  # when each channel was last sent to
        self._prune_at = 0.0  # no scan of last_send before this time
        self.granting: dict[int, str] = {}  # SEND request id -> channel (its reply grants slots)
        self.refilling: dict[int, str] = {}  # RESERVE request id -> channel
        self.voided: set[int] = set()  # ids whose grants a RECALL cancelled before they came
        self.syncing: dict[int, tuple[str, str]] = {}  # GSYNC request id -> (group, channel)
        self.marker_failures: dict[tuple[str, str], BusError] = {}
        self.broker_instance = ""
        self.unconfirmed = 0  # POSTs sent since the last reply: a reply confirms all before it
        self.posts: dict[str, list[bytes]] = {}  # bodies for reserved slots, not yet sent
        self.clock_offset = 0.0  # broker wall clock minus ours, measured at HELLO
        self.joins: set[tuple[str, str]] = set()  # JOINs to confirm with JOINED once subscribed
        self.outgoing: list[tuple[str, Any]] = []
        self.skipped = 0  # group messages dropped because a local channel was full
        self.group_seq: dict[str, int] = {}  # number of the last message seen per group topic
        self.lost_group_messages = 0

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

    def hello(self, heartbeat: float = 0.0) -> tuple[int, list[bytes]]:
        """HELLO, promising heartbeats every ``heartbeat`` seconds (0: none). After the first,
        it asks the broker to ``reset`` what it pushed on the lost connection (sent again)."""
        return self._build(wire.Hello, client=self.client_id, heartbeat=heartbeat, reset=bool(self.limits))

    def on_hello(self, header: dict, wall: float, now: float = 0.0) -> bool:
        """Take the HELLO reply (read at wall-clock time ``wall``): limits, publisher endpoint
        and the broker's clock, to measure how long later messages waited in the socket.

        When the broker did not know this client (a first connection, or a broker that
        restarted or dropped it), replay what this client had registered: credit for the
        channels it receives from and its channels' group memberships. Returns whether the
        broker resumed an existing session."""
        first = not self.limits
        self.limits = header
        self.pub_endpoint = header.get("pub", "")
        self.clock_offset = header.get("time", wall) - wall
        self.broker_instance = header.get("instance", "")
        self.check_limits()
        resumed = bool(header.get("resumed"))
        if first:
            return resumed
        for channel, queue in list(self.queues.items()):
            if resumed:  # the broker pushes these again: keep only group messages
                kept = deque(item for item in queue if not item[2])
            else:  # a new broker never pushed these: deliver them, but nothing to acknowledge
                kept = deque((body, deadline, False) for body, deadline, _ in queue)
            if kept:
                self.queues[channel] = kept
            else:
                del self.queues[channel]
        if resumed:
            for channel in sorted(self.credited):  # the reset voided its credit
                self.outgoing.append(("dealer", wire.Credit(channel, self.receive_window).frames()))
        else:
            self.pending_acks.clear()
            self._replay(now)
        return resumed

    def _replay(self, now: float) -> None:
        for channel in sorted(self.credited):
            self.outgoing.append(("dealer", wire.Credit(channel, self.receive_window).frames()))
        memberships = {(g, ch): until for g, chs in self.members.items() for ch, until in chs.items()}
        memberships.update({key: now + self.group_expiry for key in self.awaiting if key not in memberships})
        for (group, channel), until in sorted(memberships.items()):
            if until <= now:
                continue
            rid, frames = self._build(wire.GroupAdd, group=group, channel=channel, group_expiry=until - now)
            self.ignored.add(rid)
            self.outgoing.append(("dealer", frames))
            self.awaiting[(group, channel)] = now + SYNC_RETRY  # confirmed by the marker again
            self.retry[(group, channel)] = SYNC_RETRY

    def disconnected(self) -> None:
        """The connection to the broker is gone: slots it reserved and grants on their way are
        void, and what was POSTed but not confirmed may be lost with it."""
        self.reserved.clear()
        self.voided.update(self.granting)
        self.voided.update(self.refilling)
        self.unconfirmed = 0

    def _deadline(self, header: dict, ttl_ms: int, now: float, wall: float | None) -> float:
        """Local monotonic deadline of a message: its ttl, less the time since the broker sent
        it (by the broker's clock, as synchronised at HELLO), so time spent unread in this
        process's socket counts too."""
        waited = 0.0
        if wall is not None and "at" in header:
            waited = max(0.0, wall + self.clock_offset - header["at"])
        return now + ttl_ms / 1000.0 - waited

    def send(self, channel: str, message: dict, now: float) -> tuple[int | None, list[bytes] | None]:
        """One send. With a reserved slot on ``channel`` the body joins the POST batch that
        ``take_outgoing`` sends (``(None, None)``: nothing to wait for, the room is already
        ours); else the frames of a SEND request, which asks for slots only when this is the
        second send to ``channel`` within RELEASE_IDLE (a lone send reserves nothing). Tops the
        reservation up ahead of need with a RESERVE."""
        body = self._body(message)
        left = self.reserved.get(channel, 0)
        previous = self.last_send.get(channel)
        self.last_send[channel] = now
        self._forget_old_sends(now)
        if left:  # (the name was checked by the SEND that reserved the slot)
            self.posts.setdefault(channel, []).append(body)
            self.reserved[channel] = left - 1
            self.unconfirmed += 1
            if left - 1 <= RESERVE_WANT // 2 and channel not in self.refilling.values():
                rid, reserve = self._build(
                    wire.Reserve, channel=channel, capacity=self.capacity_for(channel), want=RESERVE_WANT,
                )
                self.refilling[rid] = channel
                self.outgoing.append(("dealer", reserve))
            return None, None
        streaming = previous is not None and now - previous < RELEASE_IDLE
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
        patterns = tuple((p.pattern, c) for p, c in self.channel_capacity)
        fields = dict(group=group, capacity=self.capacity, expiry=self.expiry, channel_capacity=patterns, body=body)
        if reply:
            return self._build(wire.GroupSend, **fields)
        try:
            frames = wire.GroupPost(id=0, **fields).frames()
        except ProtocolError as err:
            raise bad_name(err) if err.code == "bad-name" else BusError(err.message) from None
        self.unconfirmed += 1
        return None, frames

    def _body(self, message: dict) -> bytes:
        body = pack_message(message)
        limit = self.limits.get("max_message_size")
        if limit is not None and len(body) > limit:
            raise MessageTooLarge(
                f"message is {len(body)} bytes serialised; the broker's max-message-size is {limit} bytes",
                size=len(body), limit=limit,
            )
        return body

    def group_add(self, group: str, channel: str) -> tuple[int, list[bytes]]:
        """GADD; for an own channel also subscribe and start waiting for the ``add`` marker
        (the shell sends the subscription first, then the frames)."""
        rid, frames = self._build(wire.GroupAdd, group=group, channel=channel, group_expiry=self.group_expiry)
        if self.owns(channel):
            self._subscribe(group)
            self.awaiting[(group, channel)] = float("inf")  # no GSYNC before GADD is answered
            self.retry[(group, channel)] = SYNC_RETRY
        return rid, frames

    def expect_marker(self, group: str, channel: str, now: float) -> None:
        """GADD succeeded: retry GSYNC from now on while the marker has not come."""
        if (group, channel) in self.awaiting:
            self.awaiting[(group, channel)] = now + SYNC_RETRY

    def abandon(self, group: str, channel: str) -> None:
        """GADD failed: stop waiting and drop the subscription if nothing else needs it."""
        self._leave(group, channel)

    def marker_pending(self, group: str, channel: str) -> bool:
        return (group, channel) in self.awaiting

    def marker_failure(self, group: str, channel: str) -> BusError | None:
        """Why waiting for (group, channel)'s marker ended without it (e.g. the membership
        expired or was discarded meanwhile), or None when the marker came."""
        return self.marker_failures.pop((group, channel), None)

    def group_discard(self, group: str, channel: str) -> tuple[int, list[bytes]]:
        # The local membership ends with the broker's "discard" on the group's topic, which is
        # ordered with the group's messages: those sent before the discard still arrive.
        return self._build(wire.GroupDiscard, group=group, channel=channel)

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

    # -- receiving ------------------------------------------------------------------------

    def start_receiving(self, channel: str) -> None:
        """Check the name; grant the broker credit for a normal channel the first time."""
        try:
            check_channel(channel)
        except ProtocolError as err:
            raise bad_name(err) from None
        owner = owner_of(channel)
        if owner is not None:
            if owner != self.client_id:
                raise InvalidName(
                    f"{channel!r} is process-specific and belongs to client {owner!r}; only that"
                    f" client can receive from it (this is {self.client_id!r})", name=channel,
                )
        elif channel not in self.credited:
            self.credited.add(channel)
            self.outgoing.append(("dealer", wire.Credit(channel, self.receive_window).frames()))

    def pop(self, channel: str, now: float, defer_ack: bool = False) -> dict | None:
        """Take the next live message of ``channel``, or None, and acknowledge what it takes or
        drops: at once, or (``defer_ack``) when the shell calls ``flush_acks``, which it must do
        before it sends anything else and before its event loop idles."""
        queue = self.queues.get(channel)
        message = None
        while queue:
            body, deadline, direct = queue.popleft()
            if direct:
                self.pending_acks[channel] = self.pending_acks.get(channel, 0) + 1
            if deadline > now:
                message = unpack_message(body)
                break
        if queue is not None and not queue:
            del self.queues[channel]
        if self.pending_acks and not defer_ack:
            # Until the broker hears of it, a taken message still counts towards its channel's
            # capacity, and ChannelFull must mean what it says.
            self._flush_acks()
        return message

    def take_acks(self) -> list[bytes] | None:
        """The ACK for what was taken and not yet acknowledged (None if nothing), on its own:
        a client back on a new connection sends it before its HELLO."""
        if not self.pending_acks:
            return None
        acks, self.pending_acks = self.pending_acks, {}
        return wire.Ack(tuple(acks.items())).frames()

    def flush_acks(self) -> None:
        """Queue an ACK for every message taken since the last one (no-op when there is none)."""
        if self.pending_acks:
            self._flush_acks()

    def _flush_acks(self) -> None:
        acks, self.pending_acks = self.pending_acks, {}
        self.outgoing.append(("dealer", wire.Ack(tuple(acks.items())).frames()))

    # -- input ----------------------------------------------------------------------------

    def on_dealer(self, frames: list[bytes], now: float, wall: float | None = None) -> list[tuple]:
        """Digest one message from the broker: returns [("reply", rid, header|BusError)] or
        [("arrived", channel)], or [] for a notice handled here."""
        verb = frames[0]
        header = wire.unpack_header(frames[1])
        if verb == wire.MSG:
            channel = header["ch"]
            queue = self.queues.setdefault(channel, deque())
            for body, ttl in zip(frames[2:], header["ttl"]):
                queue.append((body, self._deadline(header, ttl, now, wall), True))
            return [("arrived", channel)]
        if verb == wire.HB:
            return [("heartbeat", header.get("instance", ""))]
        if verb == wire.RECALL:
            self._recalled(header["ch"])
            return []
        if verb == wire.JOIN:
            group, channel = header["g"], header["ch"]
            if self.owns(channel):
                self._subscribe(group)
                self.awaiting[(group, channel)] = now  # GSYNC at once: the subscription is new
                self.retry[(group, channel)] = SYNC_RETRY
                self.joins.add((group, channel))
            return []
        if verb not in (wire.OK, wire.ERROR):
            log.debug("ignoring a broker message with the unknown verb %r", verb)
            return []  # a newer broker may send notices this client does not know
        rid = header.get("id")
        if rid is not None:
            self.unconfirmed = 0  # the broker handles a connection's messages in order
        if verb == wire.OK:
            result = header
            channel = self.granting.pop(rid, None) or self.refilling.get(rid)
            if channel is not None and rid not in self.voided:
                self._granted(channel, header, now)
            self.voided.discard(rid)
        else:
            result = from_reply(header)
            self.granting.pop(rid, None)
            if result.code == "no-hello":  # the broker forgot this client: say HELLO again
                return [("forgotten",)] + ([] if rid is None or rid in self.ignored else [("reply", rid, result)])
            if rid is None:
                log.error("the broker refused a notice: %s", result)
        key = self.syncing.pop(rid, None)
        if key is not None and isinstance(result, BusError) and key in self.awaiting:
            self._leave(*key)  # the membership GSYNC asked about is gone: group_add has failed
            self.marker_failures[key] = result
            self.ignored.discard(rid)
            return [("marker", *key)]
        if self.refilling.pop(rid, None) is not None:
            return []
        if rid in self.ignored:
            self.ignored.discard(rid)
            return []
        return [("reply", rid, result)]

    def on_sub(self, frames: list[bytes], now: float, wall: float | None = None) -> list[tuple]:
        """Digest one published message: group data, membership markers or flush."""
        if len(frames) < 2:
            return []
        topic, header = frames[0], wire.unpack_header(frames[1])
        op = header.get("op")
        if topic == CONTROL_TOPIC:
            return self._on_flush() if op == "flush" else []
        group = topic[:-1].decode("ascii")
        if op == "msg":
            self._count_gap(group, header.get("seq"))
            return self._on_group_message(group, header, frames[2], now, wall)
        channel = header.get("ch", "")
        if op == "add" and self.owns(channel):
            self.group_seq.setdefault(group, header.get("seq", 0))  # messages before it are not ours
            self.awaiting.pop((group, channel), None)
            self.retry.pop((group, channel), None)
            self.members.setdefault(group, {})[channel] = now + header["ttl"] / 1000.0
            if (group, channel) in self.joins:
                self.joins.discard((group, channel))
                self.outgoing.append(("dealer", wire.Joined(group, channel).frames()))
            return [("marker", group, channel)]
        if op == "discard" and self.owns(channel):
            self._leave(group, channel)
        return []

    def _count_gap(self, group: str, seq: int | None) -> None:
        """Count group messages the publisher dropped for this process (its socket queue was
        full): each group message is numbered, so a jump shows how many went missing."""
        last = self.group_seq.get(group)
        if seq is None or last is None:
            return
        if seq > last + 1:
            self.lost_group_messages += seq - last - 1
            log.warning("%d message(s) of group %r were lost on their way to this process"
                        " (it did not read them fast enough)", seq - last - 1, group)
        self.group_seq[group] = seq  # (a smaller number: the broker restarted and counts anew)

    def _on_group_message(self, group: str, header: dict, body: bytes, now: float, wall) -> list[tuple]:
        members = self.members.get(group)
        if not members:
            return []
        deadline = self._deadline(header, header["ttl"], now, wall)
        patterns = header.get("ccap") or ()
        arrived = []
        for channel, until in list(members.items()):
            if until <= now:
                self._leave(group, channel)
                continue
            capacity = header.get("cap", self.capacity)
            for source, cap in patterns:
                if re.match(source, channel):
                    capacity = cap
                    break
            queue = self.queues.setdefault(channel, deque())
            if len(queue) >= capacity:
                self.skipped += 1
                continue
            queue.append((body, deadline, False))
            arrived.append(("arrived", channel))
        return arrived

    def _on_flush(self) -> list[tuple]:
        for channel, queue in self.queues.items():
            direct = sum(1 for item in queue if item[2])
            if direct:
                self.pending_acks[channel] = self.pending_acks.get(channel, 0) + direct
        self.queues.clear()
        if self.pending_acks:
            self._flush_acks()
        for group in list(self.members):
            for channel in list(self.members.get(group, ())):
                if (group, channel) in self.awaiting:
                    # Being joined again: the broker may have recorded it after the flush (DEALER
                    # and SUB are not ordered), so its marker or a GSYNC refusal decides, not this.
                    members = self.members[group]
                    del members[channel]
                    if not members:
                        del self.members[group]
                else:
                    self._leave(group, channel)
        return []

    # -- membership and subscriptions -----------------------------------------------------

    def _subscribe(self, group: str) -> None:
        if group not in self.subscribed:
            self.subscribed.add(group)
            self.outgoing.append(("sub", group_topic(group)))

    def _leave(self, group: str, channel: str) -> None:
        members = self.members.get(group)
        if members is not None:
            members.pop(channel, None)
            if not members:
                del self.members[group]
        self.awaiting.pop((group, channel), None)
        self.retry.pop((group, channel), None)
        self.joins.discard((group, channel))
        still_wanted = group in self.members or any(g == group for g, _ in self.awaiting)
        if group in self.subscribed and not still_wanted:
            self.subscribed.discard(group)
            self.group_seq.pop(group, None)
            self.outgoing.append(("unsub", group_topic(group)))

    def due_syncs(self, now: float) -> float | None:
        """Queue GSYNC for markers overdue at ``now``; return when the next one falls due."""
        for key, due in list(self.awaiting.items()):
            if due <= now:
                rid, frames = self._build(wire.GroupSync, group=key[0], channel=key[1])
                self.ignored.add(rid)
                self.syncing[rid] = key
                self.outgoing.append(("dealer", frames))
                delay = self.retry[key] = min(SYNC_RETRY_MAX, self.retry[key] * 2)
                self.awaiting[key] = now + delay
        return min(self.awaiting.values(), default=None)

    def heartbeat(self) -> list[bytes]:
        return wire.Heartbeat().frames()

    def goodbye(self) -> list[list[bytes]]:
        """The last messages of a connection: acknowledge what was consumed (so the broker puts
        back only what was not), then BYE."""
        frames = []
        if self.pending_acks:
            acks, self.pending_acks = self.pending_acks, {}
            frames.append(wire.Ack(tuple(acks.items())).frames())
        frames.append(wire.Bye().frames())
        return frames

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
        acks, self.pending_acks = tuple(self.pending_acks.items()), {}
        out = []
        for channel, bodies in posts.items():
            for i in range(0, len(bodies), MAX_POST_BODIES):
                post = wire.Post(channel, self.expiry, tuple(bodies[i:i + MAX_POST_BODIES]), acks)
                out.append(("dealer", post.frames()))
                acks = ()
        return out


class FrontDoor:
    """What ``Client`` and ``AsyncClient`` share besides the core: read-only views of it."""

    _core: ClientCore

    @property
    def client_id(self) -> str:
        return self._core.client_id

    @property
    def counters(self) -> dict:
        """What this process dropped on its side: group messages for its channels skipped as
        full (``group_full``) and group messages the publisher lost for it (``group_lost``)."""
        return {"group_full": self._core.skipped, "group_lost": self._core.lost_group_messages}


def publisher_url(advertised: str, dialled: str) -> str:
    """The publisher endpoint to dial: the broker's advertised one, with a wildcard host
    (``*``, ``0.0.0.0``, ``::``) replaced by the host this client dialled for commands."""
    scheme, _, rest = advertised.partition("://")
    if scheme != "tcp":
        return advertised  # ipc:// paths name no host
    host, _, port = rest.rpartition(":")
    if host.strip("[]") in ("*", "0.0.0.0", "::", ""):
        dialled_host = dialled.partition("://")[2].rpartition(":")[0]
        return f"{scheme}://{dialled_host}:{port}"
    return advertised
