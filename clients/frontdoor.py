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

    def _ensure_open(self) -> None:
        """Every call on a closed client raises the same BusError (none is silently lost)."""
        if self._closed:
            raise BusError("the client is closed")

    @property
    def client_id(self) -> str:
        return self._core.client_id

    @property
    def counters(self) -> dict:
        """What this process dropped on its side: group messages for its channels skipped as
        full (``group_full``) and group messages the publisher lost for it (``group_lost``)."""
        return {"group_full": self._core.skipped, "group_lost": self._core.lost_group_messages}


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
