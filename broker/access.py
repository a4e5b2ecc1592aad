"""Access control in the routing state: whose key each peer holds, and which requests it may
make. Pure, as the rest of the routing state; mixed into ``routing.Router``.

With CURVE on, the server tells the router the name of the key a new connection authenticated
with (``handle(..., key=...)``); the HELLO records it on the peer. Then:

- A client id belongs to the key that first said HELLO with it: another key's HELLO with that
  id is refused ``forbidden`` while the broker remembers the owner (the live clients, and up to
  OWNERS_REMEMBERED that left), so no key can take over another's process-specific channels.
- With a permissions file, each request in GUARDED is checked against the key's grant. A
  refusal is an ERROR ``forbidden`` naming the key, the action and the name; it costs the peer
  nothing else (no strike) and is counted per key (``forbidden_by_key`` in STATS). A refused
  notice (CREDIT, GPOST) is answered the same way, with ``channel`` or ``group`` (and ``lost``
  for a GPOST) so the client can tell the waiting call.
- POSTs are not checked: they go into slots the key was granted by a SEND or RESERVE that was.
"""

from __future__ import annotations

from .delivery import Out, Peer
from .permissions import Permissions
from .protocol import wire
from .protocol.errors import ProtocolError

OWNERS_REMEMBERED = 65_536  # client ids of departed clients whose key the broker still remembers

GUARDED = {  # command type -> (action, the field that names the channel or group, or None)
    wire.Send: ("send", "channel"), wire.Reserve: ("send", "channel"),
    wire.Credit: ("receive", "channel"),
    wire.GroupSend: ("group_send", "group"), wire.GroupPost: ("group_send", "group"),
    wire.GroupAdd: ("group_add", "group"), wire.GroupSync: ("group_add", "group"),
    wire.GroupDiscard: ("group_add", "group"),
    wire.Flush: ("flush", None), wire.Stats: ("stats", None),
}
_WHAT = {"send": "send to", "receive": "receive from", "group_send": "send to group",
         "group_add": "add to or read group", "flush": "flush the broker", "stats": "read the broker's stats"}


class AccessControl:
    """Keys, client-id owners and permission checks (see the module docstring)."""

    permissions: Permissions | None
    stats: dict

    def _init_access(self, permissions: Permissions | None) -> None:
        self.permissions = permissions
        self.owners: dict[str, str] = {}  # client id -> the key it belongs to
        self.forbidden_by_key: dict[str, int] = {}
        self.stats["forbidden"] = 0
        self._new_key: str | None = None  # the key of the connection whose HELLO is handled

    def claim(self, client: str, key: str | None) -> None:
        """At HELLO: refuse (``forbidden``) a client id another key owns; else record the owner."""
        if key is None:
            return
        owner = self.owners.get(client)
        if owner is not None and owner != key:
            self.count_forbidden(key)
            raise ProtocolError(
                "forbidden", f"client id {client!r} belongs to another key; key {key!r} may not use it",
                key=key, action="hello", name=client,
            )
        if owner is None:
            if len(self.owners) >= OWNERS_REMEMBERED:
                self._forget_owners()
            self.owners[client] = key

    def _forget_owners(self) -> None:
        """Make room: drop the oldest owners of clients that are no longer connected."""
        live = self.delivery.by_client
        for client in [c for c in self.owners if c not in live][: OWNERS_REMEMBERED // 4]:
            del self.owners[client]

    def guard(self, peer: Peer, cmd) -> list[Out] | None:
        """None if ``peer`` may make request ``cmd``; else the refusal to send it."""
        rule = GUARDED.get(type(cmd))
        if rule is None:
            return None
        action, field = rule
        name = getattr(cmd, field) if field else None
        if self.permissions.allows(peer.key, action, name):
            return None
        key = peer.key or "(no key)"
        self.count_forbidden(key)
        what = _WHAT[action] + (f" {name!r}" if name is not None else "")
        fields: dict = {"key": key, "action": action}
        if name is not None:
            fields["name"] = name
        request_id = getattr(cmd, "id", None)
        if type(cmd) is wire.Credit:
            fields["channel"] = name
        elif type(cmd) is wire.GroupPost:
            fields.update(group=name, lost=1)
            request_id = None  # (a notice: its id is a stand-in)
        err = ProtocolError("forbidden", f"key {key!r} may not {what} (permissions {self.permissions.path})", **fields)
        return [Out(peer.rid, wire.error(request_id, err))]

    def count_forbidden(self, key: str) -> None:
        self.stats["forbidden"] += 1
        self.forbidden_by_key[key] = self.forbidden_by_key.get(key, 0) + 1
