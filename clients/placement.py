"""Where a name lives when the bus runs on several brokers: the placement every client agrees
on. Pure: no sockets.

A client given brokers ``B0 .. Bn-1`` (the same list, in the same order, for every client)
places each name on broker ``place(key, n)``, where::

    place(key, n) = int.from_bytes(sha256(key.encode("utf-8")).digest()[:8], "big") % n

and ``key`` is:

- a normal channel (no ``!``): its whole name, so its messages and receivers meet there;
- a process-specific channel (``prefix.<client id>!local``): its owner's client id (the part
  between the last ``.`` before ``!`` and the ``!``), so all of a client's inboxes live where
  that client is known, whatever their prefix;
- a group: its name; the group's broker keeps its members and publishes its messages.

SHA-256 is in every language's standard library; the first 8 bytes as a big-endian unsigned
integer, modulo the number of brokers. docs/protocol.md (section 18) has test vectors, which
``tests/test_placement.py`` checks.
"""

from __future__ import annotations

import hashlib

from broker.protocol.names import owner_of


def place(key: str, count: int) -> int:
    """The index, from 0 to ``count - 1``, of the broker that holds ``key``."""
    if count == 1:
        return 0
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % count


def channel_key(channel: str) -> str:
    """What places a channel: its owner's client id if it is process-specific, else its name."""
    owner = owner_of(channel)
    return channel if owner is None else owner


def broker_of_channel(channel: str, count: int) -> int:
    return place(channel_key(channel), count)


def broker_of_group(group: str, count: int) -> int:
    return place(group, count)


def split_urls(urls) -> list[str]:
    """A broker URL, a comma-separated string of them, or a list: the list (in order)."""
    if isinstance(urls, str):
        items = [u.strip() for u in urls.split(",")]
    else:
        items = [str(u).strip() for u in urls]
    if not items or any(not u for u in items):
        raise ValueError(f"broker URLs must be non-empty, got {urls!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"a broker URL is given twice in {urls!r}: every broker once, in the same order everywhere")
    return items
