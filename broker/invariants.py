"""What must hold of the broker's routing state at every moment, checked from the state itself.

Theory of operation
-------------------
The routing state keeps running counts (per inbox: queued, in flight, reserved; messages and
bytes held; the counters of STATS) so that no command has to scan anything. ``check(router)``
recomputes them from what is actually held (the queues, each peer's unacknowledged messages and
slots) and raises ``InvariantError`` naming each rule that does not hold. The broker calls it
when its check mode is on (``--check``, ``CHANNELBUS_CHECK``; the test suite runs every broker
that way): after every batch of commands, the rules that cost nothing to check (conservation
over the running counts); at every tick (0.1 s), everything (``scan``: a look at every inbox,
peer and message held, so that a message that left the queues without a counted fate is found
within a tick). Off by default.

Conservation is the first rule: every message the broker accepted (a SEND, each body of a
POST, each normal member's copy of a group message) is, at every moment, in exactly one fate:

    accepted == queued + in_flight + acknowledged + expired + flushed
                + dropped_full + dropped_memory + dropped_owner_gone

``queued + in_flight`` is ``Delivery.messages_held`` (kept beside ``bytes_held``), and at a scan
also counted from the queues; the rest are STATS counters (``dropped_full`` and ``dropped_memory``: a
group member skipped because it was full or the broker's memory was; ``dropped_owner_gone``:
waiting for, or pushed to, a process-specific channel whose owner the broker forgot). The other
rules say that the running counts agree with what they count, that nothing is negative, and that
nothing refers to a peer or inbox that is gone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .delivery import ITEM_OVERHEAD
from .protocol.names import owner_of

if TYPE_CHECKING:
    from .routing import Router

FATES = ("acknowledged", "expired", "flushed", "dropped_full", "dropped_memory", "dropped_owner_gone")
CONSERVATION = ("accepted", *FATES)  # the STATS counters conservation needs


class InvariantError(AssertionError):
    """The routing state broke one of its rules; the message lists every rule broken."""


def fates(router: "Router") -> dict[str, int]:
    """Where every accepted message is now: ``queued`` and ``in_flight`` counted from the
    queues, and the counters of the other fates; plus ``accepted`` itself."""
    inboxes = router.delivery.inboxes
    stats = router.stats
    result = {"accepted": stats["accepted"],
              "queued": sum(len(inbox.queue) for inbox in inboxes.values()),
              "in_flight": sum(len(items) for peer in router.delivery.peers.values()
                               for items in peer.unacked.values())}
    result.update((fate, stats[fate]) for fate in FATES)
    return result


def problems(router: "Router", scan: bool = True) -> list[str]:
    """Every rule the routing state breaks now, each as a sentence; empty when all hold.
    Without ``scan``, only conservation over the running counts (no look at what is held)."""
    found: list[str] = []
    delivery = router.delivery
    peers = delivery.peers
    stats, held = router.stats, delivery.messages_held
    total = held + sum(stats[fate] for fate in FATES)
    if stats["accepted"] != total:
        detail = ", ".join(f"{fate} {stats[fate]}" for fate in FATES)
        found.append(f"conservation: accepted {stats['accepted']} != the sum of the fates {total}"
                     f" (queued or in flight {held}, {detail})")
    if not scan:
        return found

    counted = fates(router)
    if counted["queued"] + counted["in_flight"] != held:
        found.append(f"messages held counted {held}, held {counted['queued']} queued and"
                     f" {counted['in_flight']} in flight")

    unacked_by_name: dict[str, int] = {}
    reserved_by_name: dict[str, int] = {}
    for peer in peers.values():
        for name, items in peer.unacked.items():
            unacked_by_name[name] = unacked_by_name.get(name, 0) + len(items)
        for name, count in peer.reserved.items():
            reserved_by_name[name] = reserved_by_name.get(name, 0) + count
    bytes_held = 0
    for name, inbox in delivery.inboxes.items():
        unacked, reserved = unacked_by_name.get(name, 0), reserved_by_name.get(name, 0)
        if inbox.inflight != unacked:
            found.append(f"{name!r}: in flight counted {inbox.inflight}, held by peers {unacked}")
        if inbox.reserved != reserved:
            found.append(f"{name!r}: reserved counted {inbox.reserved}, held by peers {reserved}")
        if inbox.owner != owner_of(name):
            found.append(f"{name!r}: owner {inbox.owner!r}, but the name says {owner_of(name)!r}")
        absent = [rid for rid in inbox.ready if rid not in peers]
        if absent:
            found.append(f"{name!r}: ready receivers {absent} are not connected")
        if inbox.queue and inbox.soonest > min(expires for _, expires in inbox.queue):
            found.append(f"{name!r}: its soonest expiry {inbox.soonest} is after a queued message's")
        bytes_held += sum(len(body) + ITEM_OVERHEAD for body, _ in inbox.queue)
    for rid, peer in peers.items():
        if peer.rid != rid or delivery.by_client.get(peer.client) != rid:
            found.append(f"peer {rid!r} (client {peer.client!r}) is not indexed under its ids")
        for name, items in peer.unacked.items():
            if not items or name not in delivery.inboxes:
                found.append(f"peer {rid!r}: unacknowledged {name!r} is empty or has no inbox")
            bytes_held += sum(len(body) + ITEM_OVERHEAD for body, _ in items)
        for table, counts in (("reserved", peer.reserved), ("revoked", peer.revoked)):
            for name, count in counts.items():
                if count <= 0:
                    found.append(f"peer {rid!r}: {table} {count} on {name!r}")
        for name in peer.reserved:
            if name not in delivery.inboxes:
                found.append(f"peer {rid!r}: slots on {name!r}, which has no inbox")
        for name, count in peer.credits.items():
            if count < 0:
                found.append(f"peer {rid!r}: credit {count} on {name!r}")
            elif count > 0 and owner_of(name) is None and rid not in delivery.inboxes[name].ready:
                found.append(f"peer {rid!r}: credit on {name!r} but not among its ready receivers")
    for client, rid in delivery.by_client.items():
        if rid not in peers or peers[rid].client != client:
            found.append(f"client {client!r} is indexed under {rid!r}, which is not its peer")
    if delivery.bytes_held != bytes_held:
        found.append(f"bytes held counted {delivery.bytes_held}, held {bytes_held}")
    negative = [key for key, value in router.stats.items() if value < 0 and key != "delivered"]
    if negative:
        found.append(f"negative counters: {negative}")
    if set(router.banned) & set(peers):
        found.append(f"banned peers are still connected: {set(router.banned) & set(peers)}")
    groups = router.groups
    if not all(groups._groups.values()):
        found.append("a group without members is kept")
    members = {(g, ch) for g, chs in groups._groups.items() for ch in chs}
    owned = {pair for pairs in groups._by_owner.values() for pair in pairs}
    if owned != {(g, ch) for g, ch in members if owner_of(ch) is not None}:
        found.append("the index of memberships by owner does not match the groups")
    return found


def check(router: "Router", scan: bool = True) -> None:
    """Raise InvariantError listing every rule the routing state breaks now (``scan``: see
    ``problems``)."""
    found = problems(router, scan)
    if found:
        raise InvariantError("the broker's routing state broke its rules: " + "; ".join(found))
