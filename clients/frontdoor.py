"""What ``Client`` and ``AsyncClient`` share besides the core: read-only views of it, the
publisher endpoint to dial, and the settings of their sockets."""

from __future__ import annotations

from .core import ClientCore
from .errors import BusError

RECONNECT_MS = 100  # first reconnection attempt after this long, doubling up to RECONNECT_MAX_MS
RECONNECT_MAX_MS = 2000
CLOSE_LINGER_MS = 500  # how long a closed socket may still send its last ACK and BYE


class FrontDoor:
    """What ``Client`` and ``AsyncClient`` share besides the core: read-only views of it, and
    the refusal of every call once closed."""

    _core: ClientCore
    _closed: bool
    _online: bool

    def _ensure_open(self) -> None:
        """Every call on a closed client raises the same BusError (none is silently lost)."""
        if self._closed:
            raise BusError("the client is closed")

    @property
    def client_id(self) -> str:
        return self._core.client_id

    @property
    def counters(self) -> dict:
        """What this process could not deliver or confirm: group messages for its channels
        skipped as full (``group_full``), group messages the publisher lost for it
        (``group_lost``), and pipelined sends (POST, group_send without wait) that had returned
        but were not yet confirmed by the broker when a connection dropped (``in_doubt``: each
        may or may not have been carried out)."""
        core = self._core
        return {"group_full": core.skipped, "group_lost": core.lost_group_messages, "in_doubt": core.in_doubt}

    def _whole(self) -> bool:
        """Online, with every membership replayed after a reconnection live again: until then
        calls wait (group messages sent meanwhile could miss those memberships)."""
        return self._online and not self._core.groups.replaying

    def _raise_lost(self) -> None:
        """Raise MessagesLost if sends that had returned were lost since the last call."""
        lost = self._core.take_lost()
        if lost is not None:
            raise lost


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
