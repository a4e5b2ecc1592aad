"""Inboxes, peers, credit and reservations: who holds what. Pure state, no sockets, no clock.

Theory of operation
-------------------
Every channel with something in it has an ``Inbox`` (``broker.inbox``, which also keeps the
expiry bookkeeping that spares the sweeps a scan): a FIFO of ``(body, expires_at)``, a count
of messages *in flight* (pushed to a client, not yet acknowledged as consumed) and a count of
slots *reserved* by senders. Its depth, ``len(queue) + inflight + reserved``, never exceeds the
capacity a sender asked for: that is what makes ``full`` exact even for pipelined sends.

- A normal channel's messages go to the peers that granted credit for it, round robin, each
  message to exactly one; every ACK returns the credit it consumed. A pushed message is kept
  until acknowledged: when its peer leaves first, it goes back to the front of the queue.
- A process-specific channel's messages go straight to the connected peer whose client id the
  name carries; capacity alone bounds what it holds. With that peer absent they wait.
- A sender may reserve slots (SEND ``want``, RESERVE) and then POST into them without waiting
  for a reply. Slots change hands only by what the holder says (a POST uses them, RELEASE gives
  them back) or when the holder leaves; a slot the broker revokes (``revoke``: a SEND needs the
  room) stops counting towards the channel's depth but still takes the holder's POSTs until
  it RELEASEs the channel, because they may already be on their way. So every POST a client
  sends into a slot its grants gave it is queued: none is ever refused for want of a slot.
- Expired messages are dropped, never delivered; pushes carry the time left in ms (``ttl``)
  and the broker's wall clock (``at``), so a client can discount time spent in its socket.
- An inbox with nothing queued, in flight or reserved and no credit is deleted.
- While ``batching`` is on, channels that received something are pumped once at ``end_batch``,
  so a burst of sends becomes one MSG per receiver instead of one per message.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from .inbox import Inbox
from .protocol import wire
from .protocol.names import owner_of

MAX_CREDIT = 100_000
ITEM_OVERHEAD = 64  # bytes counted per queued message on top of its body (tuple, deque slot)
BLOCKED_RETRY = 0.05  # seconds before retrying a peer whose socket queue was full
PUB = None  # Out.dest for the publisher socket
_MSG = wire.MSG


class Out(NamedTuple):
    dest: bytes | None  # a routing id, or None for the publisher
    frames: list[bytes]
    push: tuple[str, list] | None = None  # (channel, items) of a MSG, so a failed send requeues


@dataclass
class Peer:
    rid: bytes
    client: str
    credits: dict[str, int] = field(default_factory=dict)
    unacked: dict[str, deque] = field(default_factory=dict)  # pushed items, oldest first
    reserved: dict[str, int] = field(default_factory=dict)
    revoked: dict[str, int] = field(default_factory=dict)  # slots revoked, still open to its POSTs
    blocked_until: float = 0.0
    heartbeat: float = 0.0  # seconds between the client's heartbeats; 0: it sends none
    last_seen: float = 0.0
    key: str | None = None  # the name of the CURVE key its connection authenticated with
    keep: bool = False  # its client id outlives the connection (HELLO keep): forgetting it keeps its channels

    @property
    def inflight(self) -> dict[str, int]:
        return {name: len(items) for name, items in self.unacked.items()}


def _size(items) -> int:
    return sum(len(item[0]) for item in items) + ITEM_OVERHEAD * len(items)


def _newest(unacked: dict[str, deque], name: str, n: int) -> None:
    """Remove the ``n`` newest unacknowledged items of ``name`` (a push that was not sent)."""
    items = unacked[name]
    for _ in range(n):
        items.pop()
    if not items:
        del unacked[name]


def _take(counts: dict[str, int], name: str, n: int) -> int:
    """Subtract up to ``n`` from ``counts[name]`` (deleting it at 0); return what was taken."""
    held = counts.get(name, 0)
    n = min(n, held)
    if n == held:
        counts.pop(name, None)
    else:
        counts[name] = held - n
    return n


class Delivery:
    def __init__(self, stats: dict[str, int], wall_offset: float = 0.0) -> None:
        self.stats = stats
        self.wall_offset = wall_offset
        self.peers: dict[bytes, Peer] = {}
        self.by_client: dict[str, bytes] = {}
        self.inboxes: dict[str, Inbox] = {}
        self.stalled: set[str] = set()
        self.bytes_held = 0  # bodies queued in inboxes (plus ITEM_OVERHEAD each): the memory ceiling's measure
        self.messages_held = 0  # messages queued or in flight (what bytes_held measures, counted)
        self._dirty: set[str] | None = None
        self._pack = wire.packer()  # (the broker's one thread)

    # -- batching -------------------------------------------------------------------------

    def begin_batch(self) -> None:
        self._dirty = set()

    def end_batch(self, now: float) -> list[Out]:
        dirty, self._dirty = self._dirty or set(), None
        out: list[Out] = []
        for name in dirty:
            inbox = self.inboxes.get(name)
            if inbox is not None:
                out += self.pump(name, inbox, now)
        return out

    def kick(self, name: str, now: float) -> list[Out]:
        """Deliver what ``name`` holds now, or at the end of the batch."""
        if self._dirty is not None:
            self._dirty.add(name)
            return []
        inbox = self.inboxes.get(name)
        return self.pump(name, inbox, now) if inbox is not None else []

    # -- queueing -------------------------------------------------------------------------

    def inbox(self, name: str) -> Inbox:
        inbox = self.inboxes.get(name)
        if inbox is None:
            inbox = self.inboxes[name] = Inbox(owner_of(name))
        return inbox

    def enqueue(self, name: str, body: bytes, capacity: int, expires_at: float, now: float) -> bool:
        """Queue ``body`` unless the channel holds ``capacity``; return whether it was queued."""
        inbox = self.inbox(name)
        if inbox.depth() >= capacity:
            self.purge(inbox, now)
            if inbox.depth() >= capacity:
                self.gc(name)
                return False
        inbox.add(body, expires_at)
        self.bytes_held += len(body) + ITEM_OVERHEAD
        self.messages_held += 1
        self.stats["accepted"] += 1
        return True

    def reserve(self, peer: Peer, name: str, capacity: int, want: int, now: float) -> int:
        """Reserve up to ``want`` slots for ``peer``, at most half of what is free; return them."""
        inbox = self.inbox(name)
        free = capacity - inbox.depth()
        if free < 2 * want and inbox.queue:
            self.purge(inbox, now)
            free = capacity - inbox.depth()
        grant = max(0, min(want, free // 2))
        if grant:
            inbox.reserved += grant
            peer.reserved[name] = peer.reserved.get(name, 0) + grant
        else:
            self.gc(name)
        return grant

    def post(self, peer: Peer, name: str, bodies, expires_at: float) -> int:
        """Queue ``bodies``, in order, into slots ``peer`` reserved, and then into slots revoked
        from it (POSTs into them were on their way before it heard of it); return how many
        were queued (fewer than all when it holds fewer slots)."""
        n = len(bodies)
        held = peer.reserved.get(name, 0)
        if held >= n:  # (the usual case: a POST within its sender's slots)
            inbox = self._use_slots(peer, name, held, n)
        else:
            taken = _take(peer.reserved, name, n)
            if taken:
                self.inboxes[name].reserved -= taken
            taken += _take(peer.revoked, name, n - taken)
            if not taken:
                return 0
            inbox = self.inbox(name)
            n = taken
        add = inbox.add
        for body in bodies[:n] if n < len(bodies) else bodies:
            add(body, expires_at)
            self.bytes_held += len(body) + ITEM_OVERHEAD
        self.messages_held += n
        self.stats["accepted"] += n
        return n

    def deliver_posted(self, peer: Peer, name: str, bodies, expires_at: float, now: float) -> Out | None:
        """The usual POST, pushed on at once: the MSG that ``post`` and then ``kick`` would give
        when ``peer`` holds slots for all of ``bodies`` on normal channel ``name``, nothing is
        queued there, the next ready receiver has credit for all of them and is not blocked, and
        no batch is open. None when any of that does not hold, and then nothing has changed."""
        n = len(bodies)
        held = peer.reserved.get(name, 0)
        if held < n or self._dirty is not None:
            return None
        inbox = self.inboxes[name]  # (there since the slots were reserved)
        ready = inbox.ready
        if inbox.queue or not ready:  # (a process-specific channel has no ready list)
            return None
        rid = ready[0]
        receiver = self.peers.get(rid)
        if receiver is None or receiver.blocked_until > now:
            return None
        credit = receiver.credits.get(name, 0) - n
        if credit < 0:
            return None
        self._use_slots(peer, name, held, n)
        self.bytes_held += sum(map(len, bodies)) + ITEM_OVERHEAD * n
        self.messages_held += n
        self.stats["accepted"] += n
        receiver.credits[name] = credit
        ready.popleft()
        if credit:  # (round robin, as pump does it)
            ready.append(rid)
        items = [(body, expires_at) for body in bodies]  # (live: a POST's expiry is above 0)
        ttl = int((expires_at - now) * 1000) or 1
        return self._in_flight(receiver, name, inbox, items, bodies, [ttl] * n, now)

    def _use_slots(self, peer: Peer, name: str, held: int, n: int) -> Inbox:
        """Fill ``n`` of the ``held`` (at least ``n``) slots ``peer`` reserved on ``name``;
        return the channel's inbox."""
        if held == n:
            del peer.reserved[name]
        else:
            peer.reserved[name] = held - n
        inbox = self.inboxes[name]
        inbox.reserved -= n
        return inbox

    def release(self, peer: Peer, name: str, n: int) -> None:
        """Give back ``n`` of ``peer``'s slots on ``name`` (0: all of them, revoked ones too)."""
        asked = n
        n = _take(peer.reserved, name, n or peer.reserved.get(name, 0))
        # What it gives back beyond what it still holds was revoked: it will not POST there.
        _take(peer.revoked, name, asked - n if asked else peer.revoked.get(name, 0))
        inbox = self.inboxes.get(name)
        if n and inbox is not None:
            inbox.reserved -= n
            self.gc(name)

    def revoke(self, name: str) -> list[tuple[Peer, int]]:
        """Take back every slot reserved on ``name``, whoever holds it: they stop counting
        towards its depth. Return each holder with how many it lost. POSTs into them are still
        taken (``post``) until the holder RELEASEs the channel: they may be on their way."""
        inbox = self.inboxes.get(name)
        if inbox is None or not inbox.reserved:
            return []
        holders = []
        for peer in self.peers.values():
            n = peer.reserved.pop(name, 0)
            if n:
                peer.revoked[name] = peer.revoked.get(name, 0) + n
                holders.append((peer, n))
        inbox.reserved = 0
        return holders

    def purge(self, inbox: Inbox, now: float) -> None:
        """Drop what has expired in ``inbox`` (nothing to do, and no scan, until its soonest
        expiry has passed: see broker.inbox)."""
        dropped = inbox.expire(now)
        if dropped:
            self.stats["expired"] += len(dropped)
            self.bytes_held -= _size(dropped)
            self.messages_held -= len(dropped)

    def drop_queued(self, name: str) -> int:
        """Empty ``name``'s queue (flush, or its owner left); return how many were dropped."""
        inbox = self.inboxes[name]
        dropped = inbox.clear()
        self.bytes_held -= _size(dropped)
        self.messages_held -= len(dropped)
        self.gc(name)
        return len(dropped)

    def gc(self, name: str) -> None:
        inbox = self.inboxes[name]
        if not inbox.queue and not inbox.inflight and not inbox.reserved and not inbox.ready:
            del self.inboxes[name]

    # -- credit and acknowledgements ------------------------------------------------------

    def credit(self, peer: Peer, name: str, n: int, now: float, inbox: Inbox | None = None) -> list[Out]:
        """``peer`` takes ``n`` more of normal channel ``name``'s messages (``inbox``, if the
        caller holds it already)."""
        peer.credits[name] = min(MAX_CREDIT, peer.credits.get(name, 0) + n)
        if inbox is None:
            inbox = self.inbox(name)
        if peer.rid not in inbox.ready:
            inbox.ready.append(peer.rid)
        return self.kick(name, now) if inbox.queue else []  # (what comes later kicks itself)

    def ack(self, peer: Peer, name: str, n: int, now: float) -> list[Out]:
        """``peer`` consumed the ``n`` oldest messages it was pushed on ``name`` (fewer if it
        holds fewer): forget them, and return the credit of a normal channel."""
        items = peer.unacked.get(name)
        if not items:
            return []
        n = min(n, len(items))
        freed = ITEM_OVERHEAD * n
        for _ in range(n):
            freed += len(items.popleft()[0])
        if not items:
            del peer.unacked[name]
        self.bytes_held -= freed
        self.messages_held -= n
        self.stats["acknowledged"] += n
        inbox = self.inboxes[name]
        inbox.inflight -= n
        if inbox.owner is None:
            return self.credit(peer, name, n, now, inbox)
        self.gc(name)
        return []

    # -- delivery -------------------------------------------------------------------------

    def pump(self, name: str, inbox: Inbox, now: float) -> list[Out]:
        """Push what ``name`` has queued to whoever may take it."""
        out: list[Out] = []
        queue, owner = inbox.queue, inbox.owner
        if owner is not None:
            rid = self.by_client.get(owner)
            if rid is not None and queue:
                pushed = self._push(self.peers[rid], name, inbox, len(queue), now)
                if pushed is not None:
                    out.append(pushed)
            return out
        ready, peers = inbox.ready, self.peers
        while queue and ready:
            rid = ready.popleft()
            peer = peers.get(rid)
            credit = peer.credits.get(name, 0) if peer else 0
            if credit <= 0:
                continue  # (off the ready list until its credit comes back)
            pushed = self._push(peer, name, inbox, credit, now)
            if pushed is None:  # (blocked, or all it found had expired)
                ready.append(rid)
                break
            out.append(pushed)
            credit -= len(pushed.push[1])
            peer.credits[name] = credit
            if credit > 0:
                ready.append(rid)
        return out

    def _push(self, peer: Peer, name: str, inbox: Inbox, n: int, now: float) -> Out | None:
        """Move up to ``n`` live messages from ``inbox`` to ``peer``: the MSG to send, or None."""
        if peer.blocked_until > now:
            self.stalled.add(name)
            return None
        items, ttls, bodies = [], [], []
        queue = inbox.queue
        while queue and len(items) < n:
            item = queue.popleft()
            body, expires_at = item
            if expires_at <= now:
                self.bytes_held -= len(body) + ITEM_OVERHEAD
                self.messages_held -= 1
                self.stats["expired"] += 1
                continue
            items.append(item)
            bodies.append(body)
            ttls.append(int((expires_at - now) * 1000) or 1)  # (at least 1 ms: it is live)
        if not items:
            return None
        return self._in_flight(peer, name, inbox, items, bodies, ttls, now)

    def _in_flight(self, peer: Peer, name: str, inbox: Inbox, items: list, bodies: list, ttls: list,
                   now: float) -> Out:
        """Count ``items`` (taken off ``name``'s queue, or never queued) as pushed to ``peer``
        and not yet acknowledged; return their MSG (``bodies``, ``ttls``: theirs, in order)."""
        inbox.inflight += len(items)
        unacked = peer.unacked.get(name)
        if unacked is None:
            unacked = peer.unacked[name] = deque()
        unacked.extend(items)  # kept (and counted in bytes_held) until acknowledged
        self.stats["delivered"] += len(items)
        header = self._pack({"ch": name, "ttl": ttls, "at": now + self.wall_offset})
        return Out(peer.rid, [_MSG, header, *bodies], (name, items))

    def unsent(self, rid: bytes, push: tuple[str, list], now: float) -> Peer | None:
        """A MSG could not be sent: requeue its items at the front; return the peer, if known."""
        channel, items = push
        peer = self.peers.get(rid)
        if peer is None:  # forgotten already: its unacked items went back (or away) then
            return None
        _newest(peer.unacked, channel, len(items))
        inbox = self.inboxes[channel]
        inbox.requeue(items)
        inbox.inflight -= len(items)
        if owner_of(channel) is None:
            peer.credits[channel] = peer.credits.get(channel, 0) + len(items)
            if rid not in inbox.ready:  # its credit is back, so it must be offered again
                inbox.ready.append(rid)
        peer.blocked_until = now + BLOCKED_RETRY
        self.stalled.add(channel)  # retry at the next tick, to this peer or another receiver
        self.stats["delivered"] -= len(items)
        return peer

    def forget(self, peer: Peer, drop_specific: bool) -> None:
        """Remove a peer: its credit, what it held in flight or reserved, and (if
        ``drop_specific``) the messages waiting for, or pushed to, its process-specific
        channels; else those it was pushed go back to their channels, for the client id's next
        connection (BYE ``keep``)."""
        del self.peers[peer.rid]
        if self.by_client.get(peer.client) == peer.rid:
            del self.by_client[peer.client]
        for name, items in peer.unacked.items():
            inbox = self.inboxes.get(name)
            if inbox is None:
                continue
            inbox.inflight -= len(items)
            if owner_of(name) is None or not drop_specific:  # unconsumed messages go back, in order
                inbox.requeue(items)
                self.stalled.add(name)
            else:
                self.bytes_held -= _size(items)
                self.messages_held -= len(items)
                self.stats["dropped_owner_gone"] += len(items)
        for name, held in peer.reserved.items():
            inbox = self.inboxes.get(name)
            if inbox is not None:
                inbox.reserved -= held
        for name in set(peer.credits) | set(peer.unacked) | set(peer.reserved):
            inbox = self.inboxes.get(name)
            if inbox is not None:
                if peer.rid in inbox.ready:
                    inbox.ready.remove(peer.rid)
                self.gc(name)
        if drop_specific:
            for name in [n for n in self.inboxes if owner_of(n) == peer.client]:
                # (an inbox stays while another sender still holds reserved slots in it)
                self.stats["dropped_owner_gone"] += self.drop_queued(name)

    def reset(self, peer: Peer) -> list[Out]:
        """A peer is back on a new connection (its HELLO says ``reset``): whatever it was pushed
        and has not acknowledged goes back to the front of its channels, to be pushed again;
        its credit and reserved slots are void (it grants and reserves anew)."""
        for name, items in peer.unacked.items():
            inbox = self.inboxes[name]
            inbox.inflight -= len(items)
            inbox.requeue(items)
            self.stalled.add(name)
        peer.unacked.clear()
        for name in list(peer.reserved):
            self.release(peer, name, 0)
        peer.revoked.clear()
        credited, peer.credits = peer.credits, {}
        for name in credited:
            inbox = self.inboxes.get(name)
            if inbox is not None:
                if peer.rid in inbox.ready:
                    inbox.ready.remove(peer.rid)
                self.gc(name)
        return []

    def tick(self, now: float) -> list[Out]:
        """Purge expired messages, delete idle inboxes, retry stalled deliveries."""
        for name in list(self.inboxes):
            inbox = self.inboxes[name]
            if inbox.queue:
                self.purge(inbox, now)
            self.gc(name)
        out: list[Out] = []
        stalled, self.stalled = self.stalled, set()
        for name in stalled:
            if name in self.inboxes:
                out += self.pump(name, self.inboxes[name], now)
        return out
