"""Channel and group name rules (the Django Channels layer specification).

- A group name is 1 to 99 ASCII letters, digits, hyphens, underscores or periods.
- A channel name is the same, optionally followed by one ``!`` and a local part of the same
  characters. A name with ``!`` is *process-specific*: ``<prefix>.<client-id>!<local>``. The
  client id is the last period-separated segment before the ``!``; the broker routes such a
  channel to the connected client with that id.

Names cannot contain NUL, so a group's PUB/SUB topic ends with NUL and ``room1`` never
prefix-matches ``room10``.
"""

from __future__ import annotations

import re

from .errors import ProtocolError, echo

MAX_NAME_LENGTH = 100  # names must be shorter than this, as in channels.layers

_GROUP_RE = re.compile(r"[A-Za-z0-9\-_.]+\Z")
_CHANNEL_RE = re.compile(r"[A-Za-z0-9\-_.]+(![A-Za-z0-9\-_.]*)?\Z")
_CLIENT_ID_RE = re.compile(r"[a-z0-9]{4,32}\Z")

TOPIC_END = b"\x00"
CONTROL_TOPIC = b"\x00"  # flush notices; no group topic can start with NUL

_RULE = (
    "{kind} name must be a str shorter than {limit} characters, of ASCII letters, digits,"
    " hyphens, underscores or periods{extra}; got {name}"
)


def _invalid(kind: str, name: object, extra: str = "") -> ProtocolError:
    if isinstance(name, str):
        shown = name if len(name) <= 120 else name[:120] + "..."
        text = repr(shown)
    else:
        shown = text = echo(name)
    return ProtocolError(
        "bad-name",
        _RULE.format(kind=kind, limit=MAX_NAME_LENGTH, extra=extra, name=text),
        name=shown,
        limit=MAX_NAME_LENGTH,
    )


def check_group(name: object) -> str:
    """Return ``name`` if it is a valid group name; raise ``ProtocolError('bad-name')``."""
    if not isinstance(name, str) or len(name) >= MAX_NAME_LENGTH or not _GROUP_RE.match(name):
        raise _invalid("Group", name)
    return name


_checked: set[str] = set()  # names already found valid (bounded: cleared when full)
_CHECKED_MAX = 10_000


def check_channel(name: object) -> str:
    """Return ``name`` if it is a valid channel name; raise ``ProtocolError('bad-name')``."""
    if type(name) is str and name in _checked:  # (every send and receive checks its name)
        return name
    if not isinstance(name, str) or len(name) >= MAX_NAME_LENGTH or not _CHANNEL_RE.match(name):
        raise _invalid("Channel", name, extra=" (and at most one '!')")
    if len(_checked) >= _CHECKED_MAX:
        _checked.clear()
    _checked.add(name)
    return name


def is_specific(channel: str) -> bool:
    """True for a process-specific channel name (one that contains ``!``)."""
    return "!" in channel


def owner_of(channel: str) -> str | None:
    """The client id a process-specific channel belongs to, or None for a normal channel.

    ``specific.ab12cd34ef56!x`` belongs to ``ab12cd34ef56``. A name with ``!`` whose segment
    before it is not a well-formed client id has no owner that could ever connect; it is
    returned as it is, so messages to it wait (and expire) like any other.
    """
    head, bang, _ = channel.partition("!")
    if not bang:
        return None
    return head.rpartition(".")[2]


def check_client_id(client_id: object) -> str:
    """Return ``client_id`` if it is 4-32 lowercase letters or digits; else raise."""
    if not isinstance(client_id, str) or not _CLIENT_ID_RE.match(client_id):
        raise ProtocolError(
            "bad-value",
            f"client id must be 4 to 32 lowercase ASCII letters or digits; got {echo(client_id)}",
        )
    return client_id


def group_topic(group: str) -> bytes:
    """The PUB/SUB topic of a group: its name then NUL, so no topic prefixes another."""
    return group.encode("ascii") + TOPIC_END
