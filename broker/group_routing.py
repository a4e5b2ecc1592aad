"""The broker's group commands: membership, fan-out and what it publishes on group topics.

Theory of operation
-------------------
``GroupRouting`` is mixed into ``routing.Router``, which dispatches GSEND, GPOST, GADD, GSYNC,
GDISCARD and JOINED to it and supplies ``limits``, ``stats``, ``delivery``, ``wall_offset`` and
the limit checks. Membership itself is ``groups.Groups``; here:

- Groups map channel -> membership expiry. GSEND queues the body in the inbox of each normal
  member (skipping full ones) and publishes it once on the group's topic when any member is
  process-specific; each client hands it to its own members. Membership changes of
  process-specific channels are published on the same topic, so each client sees them in order
  with the messages (GADD and GSYNC publish an ``add`` marker; the client that waits for
  ``group_add`` to finish waits for that marker, which proves its subscription is live).
- Each published message carries its group's publication number (``seq``, in ``published``),
  so clients see gaps (messages the publisher dropped for them) instead of losing them silently.
- A GADD of a channel that another live client owns is answered once that client says JOINED
  (its subscription is live), so every GSEND after the GADD returns reaches the channel. Until
  then it waits in ``joining``; after JOIN_TIMEOUT, or when the owner leaves, it is answered
  ``unconfirmed`` (the membership is recorded all the same). A client that says HELLO afresh is
  sent a JOIN for each membership recorded while it was away.
- GPOST is a GSEND without the reply: only a refusal is answered.
- Expired memberships are swept every GROUP_SWEEP_SECONDS (a group a GSEND reaches drops its
  expired members at once); a group the sweep finds gone numbers its publications from 1 again.
"""

from __future__ import annotations

import re

from .delivery import PUB, Out, Peer
from .groups import Groups
from .protocol import wire
from .protocol.errors import ProtocolError
from .protocol.names import group_topic, owner_of
from .protocol.patterns import compile_pattern

GROUP_SWEEP_SECONDS = 5.0  # group_send also drops expired members of the group it reaches
JOIN_TIMEOUT = 5.0  # seconds a GADD for another client's channel waits for that client's JOINED
SENT_SLACK = 5.0  # how far before its publication a group message's stated send time may be


class GroupRouting:
    """Group state and command handlers; a mixin of ``routing.Router`` (see the module docstring)."""

    def _init_groups(self) -> None:
        self.groups = Groups()
        # (owner client, group, channel) -> GADDs waiting for the owner's JOINED: [(rid, id, deadline)]
        self.joining: dict[tuple[str, str, str], list[tuple[bytes, int, float]]] = {}
        # group -> number of its last message published: clients see gaps (messages the
        # publisher dropped for them) instead of losing them silently
        self.published: dict[str, int] = {}
        self._patterns: dict[str, re.Pattern] = {}
        self._next_group_sweep = 0.0

    # -- upkeep (Router.tick, Router._forget, Router._hello) --------------------------------

    def _sweep_groups(self, now: float) -> None:
        """Every GROUP_SWEEP_SECONDS: drop expired memberships, and the numbering of groups gone."""
        if now >= self._next_group_sweep:
            self.groups.expire(now)
            for group in [g for g in self.published if g not in self.groups]:
                del self.published[group]  # (a group that comes back starts again from 1)
            self._next_group_sweep = now + GROUP_SWEEP_SECONDS

    def _expire_joins(self, now: float) -> list[Out]:
        """Answer ``unconfirmed`` the GADDs whose JOIN_TIMEOUT has passed."""
        out: list[Out] = []
        for key in [k for k, waiters in self.joining.items() if any(w[2] <= now for w in waiters)]:
            late = [w for w in self.joining[key] if w[2] <= now]
            self.joining[key] = [w for w in self.joining[key] if w[2] > now]
            if not self.joining[key]:
                del self.joining[key]
            out += self._unconfirmed(key, late, f"did not confirm within {JOIN_TIMEOUT:g} s")
        return out

    def _forget_groups(self, client: str, drop: bool = True) -> list[Out]:
        """Drop the memberships of a client that left (unless not ``drop``: it comes back);
        answer the GADDs that waited for it."""
        if drop:
            self.groups.drop_owner(client)
        out: list[Out] = []
        for key in [k for k in self.joining if k[0] == client]:
            out += self._unconfirmed(key, self.joining.pop(key), "disconnected")
        return out

    def _rejoin(self, rid: bytes, client: str, now: float) -> list[Out]:
        """A JOIN for each membership recorded while a new session's client was away: it must
        subscribe to them."""
        out: list[Out] = []
        for group, channel in self.groups.owned_by(client):
            join = {"g": group, "ch": channel, "gexp": self.groups.expires_at(group, channel) - now}
            out.append(Out(rid, [wire.JOIN, wire.pack(join)]))
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

    def _group_send(self, peer: Peer, cmd: wire.GroupSend, now: float) -> list[Out]:
        for capacity in (cmd.capacity, *(cap for _, cap in cmd.channel_capacity)):
            self._check_settings(capacity, cmd.expiry)
        self._check_body(cmd.body)
        patterns = self._compile(cmd.channel_capacity)  # all of them before any member is served
        stats = self.stats
        stats["group_sends"] += 1
        delivery = self.delivery
        out: list[Out] = []
        queued = skipped = 0
        specific = False
        for name in self.groups.members(cmd.group, now):
            if owner_of(name) is not None:
                specific = True
                continue
            capacity = next((cap for pattern, cap in patterns if pattern.match(name)), cmd.capacity)
            # Each normal member's copy is accepted: queued, or dropped for a named reason.
            if not self._memory_left(len(cmd.body)):
                stats["memory_refused"] += 1
                stats["accepted"] += 1
                stats["dropped_memory"] += 1
                skipped += 1
            elif delivery.enqueue(name, cmd.body, capacity, now + cmd.expiry, now):
                queued += 1
                out += delivery.kick(name, now)
            else:
                stats["accepted"] += 1
                stats["dropped_full"] += 1
                skipped += 1
        stats["group_skipped"] += skipped
        if specific:
            seq = self.published[cmd.group] = self.published.get(cmd.group, 0) + 1
            # ``at``: when it was sent. The sender's reckoning if it gave one (the moment that
            # group_send returned, which a pipelined GPOST reaches later), within SENT_SLACK.
            wall = now + self.wall_offset
            at = min(wall, max(cmd.sent, wall - SENT_SLACK)) if cmd.sent else wall
            header = {"op": "msg", "ttl": int(cmd.expiry * 1000), "at": at, "cap": cmd.capacity, "seq": seq}
            if cmd.channel_capacity:
                header["ccap"] = [list(p) for p in cmd.channel_capacity]
            out.append(Out(PUB, [group_topic(cmd.group), wire.pack(header), cmd.body]))
        return [Out(peer.rid, wire.ok(cmd.id, queued=queued, full=skipped)), *out]

    def _group_post(self, peer: Peer, cmd: wire.GroupPost, now: float) -> list[Out]:
        try:
            return self._group_send(peer, cmd, now)[1:]  # (all but the reply)
        except ProtocolError as err:
            err.fields.update(group=cmd.group, lost=1)  # (the sender must learn of it)
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
