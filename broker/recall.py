"""SENDs that wait for recalled slots, so that ``full`` counts messages, not reservations.

Theory of operation
-------------------
``RecallWaits`` is mixed into ``routing.Router``, whose ``_send`` hands it a SEND that found
no room, and which supplies ``stats`` and ``delivery``. Reserved slots count towards a
channel's capacity (``delivery.Delivery``); here:

- A SEND that finds its channel full while other senders hold reserved slots there is not
  refused: each holder is asked to give its slots back (RECALL), and the SEND waits in
  ``recalling``, in arrival order per channel, for at most RECALL_TIMEOUT. Without such holders
  (and with nothing waiting already) it is refused ``full`` at once.
- While SENDs wait on a channel, a new SEND there waits behind them (unless its own reserved
  slots make the room) and no new slots are granted there (``Router._send``, ``_reserve``).
- Each RELEASE of slots on the channel, and each holder that leaves, retries the waiting SENDs
  in order: those that fit are queued and answered; the rest keep waiting while other holders
  still hold slots there, and are refused ``full`` once none do.
- When the oldest waiting SEND's time is up, the slots of holders that have not answered are
  revoked (STATS counter ``revoked``), so a silent holder (a blocking client between calls)
  cannot make the channel look full; then each waiting SEND is queued or refused ``full``.
"""

from __future__ import annotations

from .delivery import Out, Peer
from .protocol import wire
from .protocol.errors import ProtocolError

RECALL_TIMEOUT = 0.2  # seconds a SEND waits for recalled slots before it is refused as full


class RecallWaits:
    """Waiting SENDs and their retries; a mixin of ``routing.Router`` (see the module docstring)."""

    def _init_recalls(self) -> None:
        # channel -> SENDs that found it full only because of other peers' reserved slots, in
        # arrival order, waiting for those peers to answer a RECALL: [(rid, Send, deadline)]
        self.recalling: dict[str, list[tuple[bytes, wire.Send, float]]] = {}

    def _expire_recalls(self, now: float) -> list[Out]:
        """Settle the channels whose oldest waiting SEND's time is up."""
        out: list[Out] = []
        for name in [n for n, waiting in self.recalling.items() if waiting[0][2] <= now]:
            out += self._retry_recalled(name, now, final=True)
        return out

    def _forget_recalls(self, rid: bytes, held, now: float) -> list[Out]:
        """A peer left: drop its waiting SENDs, and retry those that waited on the slots it
        ``held`` (the channels it had reserved slots on)."""
        out: list[Out] = []
        for name, waiting in list(self.recalling.items()):
            waiting[:] = [w for w in waiting if w[0] != rid]
            if not waiting:
                del self.recalling[name]
        for name in held:
            if name in self.recalling:
                out += self._retry_recalled(name, now, final=False)
        return out

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
