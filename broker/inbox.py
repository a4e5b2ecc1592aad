"""A channel's inbox in the broker: its queue of ``(body, expires_at)``, oldest first, and the
counts that make up its depth. Pure state, no sockets, no clock.

Expiry without scanning: the inbox keeps a lower bound of its queued messages' expiry times
(``soonest``) and whether those times never decrease from head to tail (``ordered``, the usual
case: one expiry setting, so they follow arrival). ``expire(now)`` does nothing until the bound
has passed; then it takes the expired messages off the head, and scans the rest only when the
queue is not ordered (senders with different expiry settings). The periodic sweep therefore
costs nothing for a deep queue whose messages are still live, instead of copying it every time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

NEVER = float("inf")


@dataclass
class Inbox:
    owner: str | None = None  # the client id of a process-specific channel (names.owner_of)
    queue: deque = field(default_factory=deque)  # (body, expires_at), oldest first
    inflight: int = 0
    reserved: int = 0
    ready: deque = field(default_factory=deque)  # routing ids with credit, round robin
    soonest: float = NEVER  # no queued message expires before this (a lower bound)
    ordered: bool = True  # the queued expiry times never decrease from head to tail

    def depth(self) -> int:
        return len(self.queue) + self.inflight + self.reserved

    def add(self, body: bytes, expires_at: float) -> None:
        """Queue a message at the tail."""
        queue = self.queue
        if not queue:
            self.ordered, self.soonest = True, expires_at
        else:
            if expires_at < queue[-1][1]:
                self.ordered = False
            if expires_at < self.soonest:
                self.soonest = expires_at
        queue.append((body, expires_at))

    def requeue(self, items: list[tuple[bytes, float]]) -> None:
        """Put ``items`` (oldest first) back at the head, in their order."""
        if not items:
            return
        queue = self.queue
        if not queue:
            self.ordered, self.soonest = True, NEVER
        elif items[-1][1] > queue[0][1]:
            self.ordered = False
        previous = -NEVER
        for _, expires_at in items:
            if expires_at < previous:
                self.ordered = False
            previous = expires_at
            if expires_at < self.soonest:
                self.soonest = expires_at
        queue.extendleft(reversed(items))

    def expire(self, now: float) -> list[tuple[bytes, float]]:
        """Remove the queued messages whose expiry has passed (``expires_at <= now``); return them."""
        if self.soonest > now:
            return []
        queue, dropped = self.queue, []
        while queue and queue[0][1] <= now:
            dropped.append(queue.popleft())
        if queue and not self.ordered:  # expired messages may hide behind live ones
            live = deque()
            for item in queue:
                (live if item[1] > now else dropped).append(item)
            self.queue = queue = live
        if not queue:
            self.soonest = NEVER
        else:
            self.soonest = queue[0][1] if self.ordered else min(item[1] for item in queue)
        return dropped

    def clear(self) -> list[tuple[bytes, float]]:
        """Empty the queue; return what it held."""
        dropped = list(self.queue)
        self.queue.clear()
        self.soonest, self.ordered = NEVER, True
        return dropped
