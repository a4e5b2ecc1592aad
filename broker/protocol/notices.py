"""Notices: client-to-broker commands with no request id and no reply (unless malformed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .errors import ProtocolError
from .fields import (
    MAX_INT, Command, check_int, field_value, int_field, no_body, pack, seconds_field, unpack_header,
    verb_frame,
)
from .names import check_channel, check_group

MAX_POST_BODIES = 1024
_POST = verb_frame("POST")
# POST header frames found well formed, and what they said: a sender repeats the same header
# (its channel, expiry, and often the same acks), so most POSTs are checked by one lookup.
_post_headers: dict[bytes, tuple[str, float, tuple]] = {}
_POST_HEADERS_MAX = 1024  # (bounded: cleared when full)
_POST_HEADER_REMEMBERED_BYTES = 256  # longer headers (many acks) are checked every time: the
# memory held stays under 1024 x 256 bytes whatever clients send


def _check_counts(pairs, low: int) -> None:
    """(channel, count) pairs: valid channel names, counts from ``low``."""
    for channel, n in pairs:
        check_channel(channel)
        check_int("n", n, low)


def _counts(verb: str, header: dict, key: str, required: bool = True) -> tuple:
    """The (channel, count) pairs of the map field ``key`` (absent: () unless ``required``)."""
    value = header.get(key)
    if value is None and not required:
        return ()
    if not isinstance(value, dict):
        raise ProtocolError("bad-header", f"{verb} needs field {key!r}: a map of channel to count", name=key)
    return tuple(value.items())


@dataclass(frozen=True)
class Credit(Command):
    """Notice: this client will take ``n`` more messages from the normal channel ``channel``."""

    VERB: ClassVar[str] = "CREDIT"
    channel: str = ""
    n: int = 0

    def __post_init__(self) -> None:
        check_channel(self.channel)
        check_int("n", self.n, 1)

    @classmethod
    def from_wire(cls, header, body):
        no_body(cls.VERB, body)
        return cls(field_value(header, "ch"), int_field(header, "n", low=1))

    def header(self):
        return {"ch": self.channel, "n": self.n}


@dataclass(frozen=True)
class Ack(Command):
    """Notice: the application consumed (or found expired) this many delivered messages.

    ``acks`` is a tuple of (channel, count). For a normal channel an ack also returns that
    much credit.
    """

    VERB: ClassVar[str] = "ACK"
    acks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        _check_counts(self.acks, low=1)

    @classmethod
    def from_wire(cls, header, body):
        no_body(cls.VERB, body)
        return cls(_counts(cls.VERB, header, "acks"))

    def header(self):
        return {"acks": dict(self.acks)}


@dataclass(frozen=True)
class Bye(Command):
    """Notice: the client is closing; forget it now rather than at its heartbeat timeout.

    ``keep``: another connection will carry on with this client id (a channel layer's next
    event loop): keep its process-specific channels' messages, putting back what it was pushed
    and did not acknowledge, and its group memberships, for whoever says HELLO with the id next."""

    VERB: ClassVar[str] = "BYE"
    keep: bool = False

    @classmethod
    def from_wire(cls, header, body):
        no_body(cls.VERB, body)
        keep = header.get("keep", False)
        if type(keep) is not bool:
            raise ProtocolError("bad-value", f"field 'keep' must be true or false; got {keep!r}", name="keep")
        return cls(keep)

    def header(self):
        return {"keep": True} if self.keep else {}


@dataclass(frozen=True)
class Post(Command):
    """Notice: queue each body frame on ``channel``, in order, in slots this client reserved
    (SEND ``want`` or RESERVE): one to MAX_POST_BODIES bodies. No reply: the reservation
    already guaranteed the room. ``acks`` (optional, as in ACK) rides along, handled first, so a
    client that takes a message and answers it sends one message, not two."""

    VERB: ClassVar[str] = "POST"
    channel: str = ""
    expiry: float = 60.0
    bodies: tuple[bytes, ...] = ()
    acks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        check_channel(self.channel)
        if isinstance(self.bodies, bytes):  # Post(channel, expiry, body): one body
            object.__setattr__(self, "bodies", (self.bodies,))
        if not 1 <= len(self.bodies) <= MAX_POST_BODIES:
            raise ProtocolError(
                "bad-frame", f"POST takes 1 to {MAX_POST_BODIES} body frames, got {len(self.bodies)}",
                limit=MAX_POST_BODIES,
            )
        _check_counts(self.acks, low=1)

    @classmethod
    def from_wire(cls, header, body):
        acks = _counts(cls.VERB, header, "acks", required=False)
        return cls(field_value(header, "ch"), seconds_field(header, "exp"), tuple(body), acks)

    def header(self):
        return self.header_of(self.channel, self.expiry, dict(self.acks))

    def frames(self):
        return self.encode(self.channel, self.expiry, self.bodies, dict(self.acks))

    @staticmethod
    def header_of(channel: str, expiry: float, acks: dict) -> dict:
        header = {"ch": channel, "exp": expiry}
        if acks:
            header["acks"] = acks
        return header

    @staticmethod
    def encode(channel: str, expiry: float, bodies, acks: dict, pack=pack) -> list[bytes]:
        """The frames of a POST whose parts its sender has checked already (a client's hot
        path: the same frames as ``Post(...).frames()``, without building and re-checking one)."""
        return [_POST, pack(Post.header_of(channel, expiry, acks)), *bodies]

    @staticmethod
    def parts(frames: list[bytes]) -> tuple[str, float, list[bytes], tuple] | None:
        """``(channel, expiry, bodies, acks)`` of a well-formed POST, checked as ``decode``
        checks one, without building the command (the broker's hot path); None for anything
        else, including a malformed POST, whose ``decode`` then says what is wrong."""
        if frames[0] != _POST or not 3 <= len(frames) <= 2 + MAX_POST_BODIES:
            return None
        known = _post_headers.get(frames[1])
        if known is None:
            known = Post._header_parts(frames[1])
            if known is None:
                return None
            if len(frames[1]) <= _POST_HEADER_REMEMBERED_BYTES:
                if len(_post_headers) >= _POST_HEADERS_MAX:
                    _post_headers.clear()
                _post_headers[frames[1]] = known
        channel, expiry, acks = known
        return channel, expiry, frames[2:], acks

    @staticmethod
    def _header_parts(frame: bytes) -> tuple[str, float, tuple] | None:
        """``(channel, expiry, acks)`` of a POST header frame that ``decode`` accepts, or None."""
        try:
            header = unpack_header(frame)
            channel, expiry, acks = check_channel(header.get("ch")), header.get("exp"), header.get("acks")
            if type(expiry) not in (int, float) or not 0 < expiry <= 10**9:
                return None
            if acks is None:
                acks = ()
            elif type(acks) is dict:
                acks = tuple(acks.items())
                for name, n in acks:  # (as _check_counts(acks, low=1), without raising for n)
                    check_channel(name)
                    if type(n) is not int or not 1 <= n <= MAX_INT:
                        return None
            else:
                return None
        except ProtocolError:
            return None
        return channel, float(expiry), acks


@dataclass(frozen=True)
class Release(Command):
    """Notice: give back reserved slots this client will not use, as (channel, count) pairs.

    A count of 0 means every slot the broker counts for this client on that channel, including
    grants still on their way: the answer to a RECALL."""

    VERB: ClassVar[str] = "RELEASE"
    slots: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        _check_counts(self.slots, low=0)

    @classmethod
    def from_wire(cls, header, body):
        no_body(cls.VERB, body)
        return cls(_counts(cls.VERB, header, "slots"))

    def header(self):
        return {"slots": dict(self.slots)}


@dataclass(frozen=True)
class Joined(Command):
    """Notice from a channel's owner: after a JOIN, its subscription to ``group`` is live (it saw
    the ``add`` marker), so the broker can answer the GADD that caused the JOIN."""

    VERB: ClassVar[str] = "JOINED"
    group: str = ""
    channel: str = ""

    def __post_init__(self) -> None:
        check_group(self.group)
        check_channel(self.channel)

    @classmethod
    def from_wire(cls, header, body):
        no_body(cls.VERB, body)
        return cls(field_value(header, "g"), field_value(header, "ch"))

    def header(self):
        return {"g": self.group, "ch": self.channel}


@dataclass(frozen=True)
class Heartbeat(Command):
    """Notice: the client is alive (sent when it has sent nothing else for its interval)."""

    VERB: ClassVar[str] = "HB"

    @classmethod
    def from_wire(cls, header, body):
        no_body(cls.VERB, body)
        return cls()

    def header(self):
        return {}
