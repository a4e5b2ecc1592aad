"""The group memberships of this client's own channels: ``ClientCore.groups``.

Theory of operation
-------------------
The broker keeps every group's members; the messages of a group reach process-specific channels
on the group's topic of the publisher, and this object knows which of this process's channels a
topic message is for. Like the core it is pure: ``now`` is an argument, and what must be sent
goes through ``emit`` onto the core's ``outgoing`` list (``("sub" | "unsub", topic)`` for the
SUB socket, ``("dealer", frames)`` for the broker), in order with everything else. Requests
(GADD replays, GSYNC) are built by the core, which owns request ids.

- ``members``: which of this process's own channels belong to which group, and until when. A
  membership becomes active when the broker's ``add`` marker for it arrives on the topic: then
  the subscription is live, and every later group message is seen after it.
- ``awaiting``: memberships whose marker has not come yet, and when to send the next GSYNC for
  each (never, while their GADD is unanswered). The first marker may have passed before the
  subscription was live, so GSYNC asks the broker to publish it again: SYNC_RETRY after the
  GADD's OK or a replay (at once after a JOIN), doubling up to SYNC_RETRY_MAX. A refused GSYNC
  means the membership is gone.
- ``replaying``: memberships registered again with a broker that did not know this client
  (``replay``), whose markers have not come yet: until they have, the client is not whole
  again, and its calls wait (group messages sent meanwhile could miss them).
- ``joins``: memberships the broker announced with a JOIN (another client's GADD, or those it
  holds when this client says HELLO): they are confirmed with JOINED once their marker shows
  the subscription live.
- ``subscribed``: the group topics the SUB socket follows, dropped with their last membership.
  Each group message carries a number (``group_seq`` holds the last one seen per topic), so a
  jump counts the messages the publisher dropped for this process (``lost_messages``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from broker.protocol import wire
from broker.protocol.names import group_topic

from .errors import BusError

log = logging.getLogger("channelbus.client")

SYNC_RETRY = 0.05  # first GSYNC retry after this many seconds, doubling up to SYNC_RETRY_MAX
SYNC_RETRY_MAX = 1.0


class Membership:
    """Group memberships of own channels, their markers, GSYNC retries and topic subscriptions.

    ``emit(item)`` queues ``item`` on the owner's outgoing list."""

    def __init__(self, emit: Callable[[tuple[str, Any]], None]) -> None:
        self._emit = emit
        self.members: dict[str, dict[str, float]] = {}
        self.awaiting: dict[tuple[str, str], float] = {}  # (group, channel) -> next GSYNC time
        self.retry: dict[tuple[str, str], float] = {}
        self.subscribed: set[str] = set()
        self.joins: set[tuple[str, str]] = set()  # JOINs to confirm with JOINED once subscribed
        self.replaying: set[tuple[str, str]] = set()  # replayed, marker not yet seen
        self.marker_failures: dict[tuple[str, str], BusError] = {}
        self.group_seq: dict[str, int] = {}  # number of the last message seen per group topic
        self.lost_messages = 0

    # -- joining --------------------------------------------------------------------------

    def adding(self, group: str, channel: str) -> None:
        """A GADD for an own channel is on its way: subscribe, and wait for the ``add`` marker
        (no GSYNC before the GADD is answered)."""
        self._subscribe(group)
        self.awaiting[(group, channel)] = float("inf")
        self.retry[(group, channel)] = SYNC_RETRY

    def expect_marker(self, group: str, channel: str, now: float) -> None:
        """GADD succeeded: retry GSYNC from now on while the marker has not come."""
        if (group, channel) in self.awaiting:
            self.awaiting[(group, channel)] = now + SYNC_RETRY

    def on_join(self, group: str, channel: str, now: float) -> None:
        """The broker's JOIN: another client added this own channel to ``group``."""
        self._subscribe(group)
        self.awaiting[(group, channel)] = now  # GSYNC at once: the subscription is new
        self.retry[(group, channel)] = SYNC_RETRY
        self.joins.add((group, channel))

    def added(self, group: str, channel: str, header: dict, now: float) -> list[tuple]:
        """The ``add`` marker for an own channel: the membership is live until its ttl."""
        self.group_seq.setdefault(group, header.get("seq", 0))  # messages before it are not ours
        self.awaiting.pop((group, channel), None)
        self.retry.pop((group, channel), None)
        self.replaying.discard((group, channel))
        self.members.setdefault(group, {})[channel] = now + header["ttl"] / 1000.0
        if (group, channel) in self.joins:
            self.joins.discard((group, channel))
            self._emit(("dealer", wire.Joined(group, channel).frames()))
        return [("marker", group, channel)]

    def marker_pending(self, group: str, channel: str) -> bool:
        return (group, channel) in self.awaiting

    def marker_failure(self, group: str, channel: str) -> BusError | None:
        """Why waiting for (group, channel)'s marker ended without it (e.g. the membership
        expired or was discarded meanwhile), or None when the marker came."""
        return self.marker_failures.pop((group, channel), None)

    def refused(self, key: tuple[str, str], error: BusError) -> bool:
        """The broker refused a GSYNC for ``key``. If its marker was awaited, the membership is
        gone (its group_add has failed): end it, keep ``error`` as the reason and return True."""
        if key not in self.awaiting:
            return False
        self.leave(*key)
        self.marker_failures[key] = error
        return True

    def overdue(self, now: float) -> list[tuple[str, str]]:
        """The memberships whose GSYNC is due at ``now`` (each then waits twice as long as
        before for the next, up to SYNC_RETRY_MAX)."""
        due = []
        for key, at in list(self.awaiting.items()):
            if at <= now:
                due.append(key)
                delay = self.retry[key] = min(SYNC_RETRY_MAX, self.retry[key] * 2)
                self.awaiting[key] = now + delay
        return due

    def next_sync(self) -> float | None:
        """When the next GSYNC falls due (``inf`` while only unanswered GADDs wait), or None."""
        return min(self.awaiting.values(), default=None)

    def replay(self, now: float, group_expiry: float) -> list[tuple[str, str, float]]:
        """A broker that did not know this client: the memberships to register again, as
        ``(group, channel, seconds left)``, each waiting for its marker again. One still
        awaiting its first marker gets the full ``group_expiry``."""
        memberships = {(g, ch): until for g, chs in self.members.items() for ch, until in chs.items()}
        memberships.update({key: now + group_expiry for key in self.awaiting if key not in memberships})
        self.group_seq.clear()  # (another broker numbers anew: its markers give the new numbers)
        again = []
        for (group, channel), until in sorted(memberships.items()):
            if until <= now:
                continue
            again.append((group, channel, until - now))
            self.awaiting[(group, channel)] = now + SYNC_RETRY  # confirmed by the marker again
            self.retry[(group, channel)] = SYNC_RETRY
            self.replaying.add((group, channel))
        return again

    # -- leaving --------------------------------------------------------------------------

    def leave(self, group: str, channel: str) -> None:
        """End the membership (live or awaited); unsubscribe from a topic nothing needs now."""
        members = self.members.get(group)
        if members is not None:
            members.pop(channel, None)
            if not members:
                del self.members[group]
        self.awaiting.pop((group, channel), None)
        self.retry.pop((group, channel), None)
        self.joins.discard((group, channel))
        self.replaying.discard((group, channel))
        still_wanted = group in self.members or any(g == group for g, _ in self.awaiting)
        if group in self.subscribed and not still_wanted:
            self.subscribed.discard(group)
            self.group_seq.pop(group, None)
            self._emit(("unsub", group_topic(group)))

    def flushed(self) -> None:
        """The broker dropped every membership (FLUSH): end them all here too."""
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
                    self.leave(group, channel)

    # -- the topics -----------------------------------------------------------------------

    def count_gap(self, group: str, seq: int | None) -> None:
        """Count group messages the publisher dropped for this process (its socket queue was
        full): each group message is numbered, so a jump shows how many went missing."""
        last = self.group_seq.get(group)
        if seq is None or last is None:
            return
        if seq > last + 1:
            self.lost_messages += seq - last - 1
            log.warning("%d message(s) of group %r were lost on their way to this process"
                        " (it did not read them fast enough)", seq - last - 1, group)
        self.group_seq[group] = seq  # (a smaller number: the broker restarted and counts anew)

    def _subscribe(self, group: str) -> None:
        if group not in self.subscribed:
            self.subscribed.add(group)
            self._emit(("sub", group_topic(group)))
