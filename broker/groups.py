"""Group membership with expiry: pure state, no sockets, no clock.

``group -> {channel: expires_at}``, plus an index from a client id to the memberships of its
process-specific channels, so a client that leaves drops out of every group at once.
"""

from __future__ import annotations

from .protocol.names import owner_of


class Groups:
    def __init__(self) -> None:
        self._groups: dict[str, dict[str, float]] = {}
        self._by_owner: dict[str, set[tuple[str, str]]] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, group: str) -> bool:
        return group in self._groups

    def add(self, group: str, channel: str, expires_at: float) -> None:
        self._groups.setdefault(group, {})[channel] = expires_at
        owner = owner_of(channel)
        if owner is not None:
            self._by_owner.setdefault(owner, set()).add((group, channel))

    def discard(self, group: str, channel: str) -> bool:
        """Remove one membership; return whether it existed."""
        members = self._groups.get(group)
        if members is None or channel not in members:
            return False
        del members[channel]
        if not members:
            del self._groups[group]
        owner = owner_of(channel)
        if owner is not None:
            owned = self._by_owner.get(owner)
            if owned is not None:
                owned.discard((group, channel))
                if not owned:
                    del self._by_owner[owner]
        return True

    def members(self, group: str, now: float) -> list[str]:
        """The live members of ``group``; expired ones are removed on the way."""
        members = self._groups.get(group)
        if not members:
            return []
        expired = [ch for ch, until in members.items() if until <= now]
        for channel in expired:
            self.discard(group, channel)
        return list(members)

    def is_member(self, group: str, channel: str, now: float) -> bool:
        until = self._groups.get(group, {}).get(channel)
        if until is not None and until <= now:
            self.discard(group, channel)
            return False
        return until is not None

    def expires_at(self, group: str, channel: str) -> float:
        return self._groups[group][channel]

    def sizes(self) -> dict[str, int]:
        return {group: len(members) for group, members in self._groups.items()}

    def expire(self, now: float) -> int:
        """Remove every membership that expired by ``now``; return how many."""
        expired = [
            (group, channel)
            for group, members in self._groups.items()
            for channel, until in members.items()
            if until <= now
        ]
        for group, channel in expired:
            self.discard(group, channel)
        return len(expired)

    def owned_by(self, client: str) -> list[tuple[str, str]]:
        """The (group, channel) memberships of ``client``'s process-specific channels."""
        return sorted(self._by_owner.get(client, ()))

    def drop_owner(self, client: str) -> list[tuple[str, str]]:
        """Remove every membership of the channels owned by ``client``; return them."""
        owned = list(self._by_owner.get(client, ()))
        for group, channel in owned:
            self.discard(group, channel)
        return owned

    def clear(self) -> None:
        self._groups.clear()
        self._by_owner.clear()
