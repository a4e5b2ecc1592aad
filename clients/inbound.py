"""What the broker sends a ``ClientCore``, digested, and how messages are taken from it.

``Inbound`` is a base class of ``ClientCore`` (``clients.core``, whose ``__init__`` holds all
the state), split off by reason to change: this code follows what the broker sends and how
messages are delivered; ``clients.core`` the requests the client makes and how it sends.

Theory of operation
-------------------
The shells feed the core everything they read, ``on_dealer(frames, now, wall)`` and
``on_sub(frames, now, wall)``, and get events back: ``("reply", rid, header | BusError)``,
``("arrived", channel)``, ``("marker", group, channel)``, ``("heartbeat", instance)`` and
``("forgotten",)`` (the broker no longer knows this client: say HELLO again). What must be
sent in answer (ACK, CREDIT, RELEASE and JOINED notices, SUB socket (un)subscriptions) is
queued in ``outgoing``.

- ``queues``: messages delivered to this process and not yet taken by ``receive``, per channel,
  as ``(body, deadline, direct)``. Direct messages (pushed by the broker on the ROUTER) are
  acknowledged as soon as they are taken or found expired (the asyncio shell coalesces them
  and sends them with, or before, whatever it sends next: at the latest ACK_DELAY after the
  take), so the broker's count of what a channel holds stays exact; group messages for
  process-specific channels arrive on the topic and are bounded here by capacity.
- Deadlines: a message's ttl counts from when the broker sent it, by the broker's clock as
  measured at HELLO, so time spent unread in this process's socket counts too.
- A reply confirms every POST sent before it (the broker handles a connection's messages in
  order); the reply to a SEND or RESERVE may grant slots, unless a RECALL or the loss of the
  connection voided them on the way.
- HELLO on a new connection: if the broker resumed the session it pushes its direct messages
  again (the copies here are dropped) and wants credit anew; if it did not know this client,
  queued messages stay but need no ack, and credit and group memberships are replayed.
"""

from __future__ import annotations

import logging
import re
from collections import deque

from broker.protocol import wire
from broker.protocol.errors import ProtocolError
from broker.protocol.names import CONTROL_TOPIC, check_channel, owner_of

from .errors import BusError, InvalidName, bad_name, from_reply
from .messages import pack_message, unpack_message

log = logging.getLogger("channelbus.client")
TAKEN_KEEP_SECONDS = 30.0  # how long a group member channel's takes are remembered (its depth then)
TAKEN_KEPT = 4096  # takes remembered per member channel at most (capacities above it: judged leniently)
TAKEN_CHANNELS_KEPT = 10_000  # member channels whose takes are remembered, before idle ones go


class Inbound:
    """``ClientCore``'s inbound half: the HELLO reply, DEALER and SUB input, receiving."""

    # -- the HELLO reply ------------------------------------------------------------------

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
        for group, channel, ttl in self.groups.replay(now, self.group_expiry):
            self._notice(wire.GroupAdd, group=group, channel=channel, group_expiry=ttl)

    def _sent_at(self, header: dict, now: float, wall: float | None) -> float:
        """When (local monotonic time) the broker sent what ``header`` heads, by its clock as
        synchronised at HELLO: a message's ttl counts from then, so time spent unread in this
        process's socket counts too. (``now`` when the header has no time, or the clocks
        disagree in the message's favour.)"""
        if wall is None or "at" not in header:
            return now
        return now - max(0.0, wall + self.clock_offset - header["at"])

    # -- receiving ------------------------------------------------------------------------

    def start_receiving(self, channel: str) -> None:
        """Check the name; grant the broker credit for a normal channel the first time."""
        if channel in self.credited:  # (checked, and credited, the first time)
            return
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
        else:
            self.credited.add(channel)
            self.outgoing.append(("dealer", wire.Credit(channel, self.receive_window).frames()))

    def pop(self, channel: str, now: float, defer_ack: bool = False) -> dict | None:
        """Take the next live message of ``channel``, or None, and acknowledge what it takes or
        drops: at once, or (``defer_ack``) when the shell calls ``flush_acks``, which it must do
        before it sends anything else and before its event loop idles."""
        if self.forbidden and channel in self.forbidden:
            raise self.forbidden.pop(channel)
        queue = self.queues.get(channel)
        message = None
        taken = self.taken_at.get(channel) if self.taken_at else None
        while queue:
            body, deadline, direct = queue.popleft()
            if taken is not None:
                taken.append(now)
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

    def give_back(self, channel: str, message: dict, now: float) -> None:
        """Put a message taken by ``pop`` back at the front of ``channel`` (a receive on another
        loop was cancelled as it came): taken again next, already acknowledged, live for this
        client's ``expiry`` from now (its own deadline was not kept)."""
        self.queues.setdefault(channel, deque()).appendleft((pack_message(message), now + self.expiry, False))
        taken = self.taken_at.get(channel)
        if taken:
            taken.pop()

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
            queue = self.queues.get(channel)
            if queue is None:
                queue = self.queues[channel] = deque()
            sent = self._sent_at(header, now, wall)
            for body, ttl in zip(frames[2:], header["ttl"]):
                queue.append((body, sent + ttl / 1000.0, True))
            return [("arrived", channel)]
        if verb == wire.HB:
            return [("heartbeat", header.get("instance", ""))]
        if verb == wire.RECALL:
            self._recalled(header["ch"])
            return []
        if verb == wire.JOIN:
            group, channel = header["g"], header["ch"]
            if self.owns(channel):
                self.groups.on_join(group, channel, now)
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
                lost = header.get("lost")
                if type(lost) is int and lost > 0:  # a POST or GPOST: sends that had returned
                    where = header.get("channel") or header.get("group") or "?"
                    self.note_lost(str(where), lost, f"the broker refused them: {result}")
                elif result.code == "forbidden" and isinstance(header.get("channel"), str):
                    channel = header["channel"]  # a CREDIT: receive() may not read this channel
                    self.credited.discard(channel)
                    self.forbidden[channel] = result
                    return [("arrived", channel)]  # (wakes the receivers, which raise it)
                else:
                    log.error("the broker refused a notice: %s", result)
        key = self.syncing.pop(rid, None)
        if key is not None and isinstance(result, BusError) and self.groups.refused(key, result):
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
            self.groups.count_gap(group, header.get("seq"))
            return self._on_group_message(group, header, frames[2], now, wall)
        channel = header.get("ch", "")
        if op == "add" and self.owns(channel):
            return self.groups.added(group, channel, header, now)
        if op == "discard" and self.owns(channel):
            self.groups.leave(group, channel)
        return []

    def _on_group_message(self, group: str, header: dict, body: bytes, now: float, wall) -> list[tuple]:
        members = self.groups.members.get(group)
        if not members:
            return []
        sent = self._sent_at(header, now, wall)
        deadline = sent + header["ttl"] / 1000.0
        patterns = header.get("ccap") or ()
        default = header.get("cap", self.capacity)
        arrived = []
        for channel, until in list(members.items()):
            if until <= now:
                self.groups.leave(group, channel)
                continue
            capacity = default
            for source, cap in patterns:
                if re.match(source, channel):
                    capacity = cap
                    break
            queue = self.queues.get(channel)
            if queue is None:
                queue = self.queues[channel] = deque()
            if len(queue) + self._taken_since(channel, sent, now) >= capacity:
                self.skipped += 1
                continue
            queue.append((body, deadline, False))
            arrived.append(("arrived", channel))
        return arrived

    def _taken_since(self, channel: str, sent: float, now: float) -> int:
        """How many messages ``channel`` gave up (taken or expired) since ``sent``: with the
        queue's length, its depth when the group message was sent. A member at capacity then
        skips it, as the layer specification says, even if a receive() took one of the queued
        messages before this one reached the process. (Times as the clock sync allows: within
        a fraction of a round trip.)"""
        taken = self.taken_at.get(channel)
        if taken is None:
            if len(self.taken_at) >= TAKEN_CHANNELS_KEPT:
                for idle in [c for c, t in self.taken_at.items() if not t]:
                    del self.taken_at[idle]  # (in place: a sharded client's cores share the dict)
            self.taken_at[channel] = deque(maxlen=TAKEN_KEPT)
            return 0
        while taken and taken[0] < now - TAKEN_KEEP_SECONDS:
            taken.popleft()
        count = 0
        for at in reversed(taken):
            if at <= sent:
                break
            count += 1
        return count

    def _on_flush(self) -> list[tuple]:
        for channel, queue in self.queues.items():
            direct = sum(1 for item in queue if item[2])
            if direct:
                self.pending_acks[channel] = self.pending_acks.get(channel, 0) + direct
        self.queues.clear()
        if self.pending_acks:
            self._flush_acks()
        self.groups.flushed()
        return []
