"""Frames on the wire: one frozen dataclass per command, checked when built.

A message is a ZeroMQ multipart message ``[verb, header, body...]``:

- ``verb``: one byte of protocol version (``VERSION``) followed by the ASCII verb.
- ``header``: a msgpack map with str keys; the fields depend on the verb.
- ``body``: for SEND and GSEND, the message as the client serialised it (a msgpack map). The
  broker never unpacks it; it only checks its size and that its first byte opens a map.

Requests carry an ``id`` (an int the client chooses) and get exactly one reply, OK or ERROR, with
the same id. Notices (CREDIT, ACK, BYE) carry no id and get no reply unless they are malformed.
``docs/protocol.md`` is the full contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import msgpack

from .errors import ProtocolError
from .names import check_channel, check_client_id, check_group

VERSION = 1
MAX_HEADER_SIZE = 64 * 1024
MAX_INT = 2**63 - 1
MAX_PATTERNS = 32
MAX_PATTERN_LENGTH = 200


def pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack_header(frame: bytes) -> dict:
    """Decode a header frame; raise ``ProtocolError('bad-header')`` unless it is a str-keyed map."""
    if len(frame) > MAX_HEADER_SIZE:
        raise ProtocolError(
            "bad-header", f"header is {len(frame)} bytes; the limit is {MAX_HEADER_SIZE}",
            size=len(frame), limit=MAX_HEADER_SIZE,
        )
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError("bad-header", f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad-header", f"header must be a msgpack map, got {type(header).__name__}")
    if any(type(key) is not str for key in header):
        raise ProtocolError("bad-header", "header keys must all be str")
    return header


def verb_frame(verb: str) -> bytes:
    return bytes([VERSION]) + verb.encode("ascii")


def body_is_map(body: bytes) -> bool:
    """True when a msgpack document starts with a map (fixmap, map16 or map32)."""
    return bool(body) and (0x80 <= body[0] <= 0x8F or body[0] in (0xDE, 0xDF))


def _field(header: dict, key: str) -> object:
    """A required field's value; a missing (or nil) field is a ``bad-header``."""
    value = header.get(key)
    if value is None:
        raise ProtocolError("bad-header", f"the header needs field {key!r}", name=key)
    return value


def _int(header: dict, key: str, *, low: int = 0, default: int | None = None) -> int:
    value = header.get(key, default)
    if type(value) is not int or not low <= value <= MAX_INT:
        raise ProtocolError(
            "bad-header" if value is None else "bad-value",
            f"field {key!r} must be an int from {low} to {MAX_INT}; got {value!r}",
            name=key,
        )
    return value


def _number(header: dict, key: str) -> float:
    value = _field(header, key)
    if type(value) not in (int, float) or not 0 < value <= 10**9:
        raise ProtocolError(
            "bad-value", f"field {key!r} must be a number of seconds above 0; got {value!r}",
            name=key,
        )
    return float(value)


@dataclass(frozen=True)
class Command:
    """Base of every client-to-broker command."""

    VERB: ClassVar[str] = ""

    @classmethod
    def from_wire(cls, header: dict, body: tuple[bytes, ...]) -> "Command":
        raise NotImplementedError

    def header(self) -> dict:
        raise NotImplementedError

    def frames(self) -> list[bytes]:
        return [verb_frame(self.VERB), pack(self.header())]


@dataclass(frozen=True)
class Request(Command):
    id: int

    def __post_init__(self) -> None:
        _int({"id": self.id}, "id")


def _one_body(verb: str, body: tuple[bytes, ...]) -> bytes:
    if len(body) != 1:
        raise ProtocolError("bad-frame", f"{verb} takes exactly one body frame, got {len(body)}")
    return body[0]


def _no_body(verb: str, body: tuple[bytes, ...]) -> None:
    if body:
        raise ProtocolError("bad-frame", f"{verb} takes no body frame, got {len(body)}")


@dataclass(frozen=True)
class Hello(Request):
    """Opens a session: names the client id the connection uses (its ZeroMQ routing id)."""

    VERB: ClassVar[str] = "HELLO"
    client: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_client_id(self.client)

    @classmethod
    def from_wire(cls, header, body):
        _no_body(cls.VERB, body)
        return cls(_int(header, "id"), _field(header, "client"))

    def header(self):
        return {"id": self.id, "client": self.client}


@dataclass(frozen=True)
class Send(Request):
    """Queue ``body`` on ``channel`` unless it already holds ``capacity`` messages."""

    VERB: ClassVar[str] = "SEND"
    channel: str = ""
    capacity: int = 100
    expiry: float = 60.0
    body: bytes = b""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_channel(self.channel)
        _int({"cap": self.capacity}, "cap", low=1)

    @classmethod
    def from_wire(cls, header, body):
        return cls(
            _int(header, "id"), _field(header, "ch"), _int(header, "cap", low=1),
            _number(header, "exp"), _one_body(cls.VERB, body),
        )

    def header(self):
        return {"id": self.id, "ch": self.channel, "cap": self.capacity, "exp": self.expiry}

    def frames(self):
        return [verb_frame(self.VERB), pack(self.header()), self.body]


@dataclass(frozen=True)
class GroupSend(Request):
    """Deliver ``body`` to every member of ``group``; full members are skipped and counted.

    ``channel_capacity`` is a tuple of (regex, capacity) pairs, first match wins, applied to
    member channels; ``capacity`` applies to the rest.
    """

    VERB: ClassVar[str] = "GSEND"
    group: str = ""
    capacity: int = 100
    expiry: float = 60.0
    channel_capacity: tuple[tuple[str, int], ...] = field(default=())
    body: bytes = b""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_group(self.group)
        _int({"cap": self.capacity}, "cap", low=1)
        if len(self.channel_capacity) > MAX_PATTERNS:
            raise ProtocolError(
                "bad-value", f"at most {MAX_PATTERNS} channel_capacity patterns are allowed",
                limit=MAX_PATTERNS,
            )
        for pair in self.channel_capacity:
            if (
                not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not isinstance(pair[0], str) or len(pair[0]) > MAX_PATTERN_LENGTH
            ):
                raise ProtocolError(
                    "bad-value",
                    "channel_capacity must be a list of [regex, capacity] pairs with regexes of"
                    f" at most {MAX_PATTERN_LENGTH} characters; got {pair!r}",
                    limit=MAX_PATTERN_LENGTH,
                )
            _int({"cap": pair[1]}, "cap", low=1)

    @classmethod
    def from_wire(cls, header, body):
        patterns = header.get("ccap", [])
        if not isinstance(patterns, list):
            raise ProtocolError("bad-value", "field 'ccap' must be a list of [regex, capacity]")
        return cls(
            _int(header, "id"), _field(header, "g"), _int(header, "cap", low=1),
            _number(header, "exp"), tuple(tuple(p) if isinstance(p, list) else p for p in patterns),
            _one_body(cls.VERB, body),
        )

    def header(self):
        return {
            "id": self.id, "g": self.group, "cap": self.capacity, "exp": self.expiry,
            "ccap": [list(p) for p in self.channel_capacity],
        }

    def frames(self):
        return [verb_frame(self.VERB), pack(self.header()), self.body]


@dataclass(frozen=True)
class _Membership(Request):
    group: str = ""
    channel: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_group(self.group)
        check_channel(self.channel)

    @classmethod
    def from_wire(cls, header, body):
        _no_body(cls.VERB, body)
        return cls(_int(header, "id"), _field(header, "g"), _field(header, "ch"))

    def header(self):
        return {"id": self.id, "g": self.group, "ch": self.channel}


@dataclass(frozen=True)
class GroupAdd(_Membership):
    """Add ``channel`` to ``group`` for ``group_expiry`` seconds (re-adding refreshes it)."""

    VERB: ClassVar[str] = "GADD"
    group_expiry: float = 86400.0

    @classmethod
    def from_wire(cls, header, body):
        _no_body(cls.VERB, body)
        return cls(
            _int(header, "id"), _field(header, "g"), _field(header, "ch"), _number(header, "gexp")
        )

    def header(self):
        return {"id": self.id, "g": self.group, "ch": self.channel, "gexp": self.group_expiry}


@dataclass(frozen=True)
class GroupSync(_Membership):
    """Ask the broker to publish the membership marker of (group, channel) again."""

    VERB: ClassVar[str] = "GSYNC"


@dataclass(frozen=True)
class GroupDiscard(_Membership):
    """Remove ``channel`` from ``group``; removing a non-member is not an error."""

    VERB: ClassVar[str] = "GDISCARD"


@dataclass(frozen=True)
class Flush(Request):
    """Drop every queued message and every group membership."""

    VERB: ClassVar[str] = "FLUSH"

    @classmethod
    def from_wire(cls, header, body):
        _no_body(cls.VERB, body)
        return cls(_int(header, "id"))

    def header(self):
        return {"id": self.id}


@dataclass(frozen=True)
class Ping(Flush):
    """A no-op round trip."""

    VERB: ClassVar[str] = "PING"


@dataclass(frozen=True)
class Credit(Command):
    """Notice: this client will take ``n`` more messages from the normal channel ``channel``."""

    VERB: ClassVar[str] = "CREDIT"
    channel: str = ""
    n: int = 0

    def __post_init__(self) -> None:
        check_channel(self.channel)
        _int({"n": self.n}, "n", low=1)

    @classmethod
    def from_wire(cls, header, body):
        _no_body(cls.VERB, body)
        return cls(_field(header, "ch"), _int(header, "n", low=1))

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
        for channel, n in self.acks:
            check_channel(channel)
            _int({"n": n}, "n", low=1)

    @classmethod
    def from_wire(cls, header, body):
        _no_body(cls.VERB, body)
        acks = header.get("acks")
        if not isinstance(acks, dict):
            raise ProtocolError("bad-header", "ACK needs field 'acks': a map of channel to count")
        return cls(tuple(acks.items()))

    def header(self):
        return {"acks": dict(self.acks)}


@dataclass(frozen=True)
class Bye(Command):
    """Notice: the client is closing; forget it now rather than at its heartbeat timeout."""

    VERB: ClassVar[str] = "BYE"

    @classmethod
    def from_wire(cls, header, body):
        _no_body(cls.VERB, body)
        return cls()

    def header(self):
        return {}


COMMANDS: dict[bytes, type[Command]] = {
    verb_frame(cls.VERB): cls
    for cls in (Hello, Send, GroupSend, GroupAdd, GroupSync, GroupDiscard, Flush, Ping,
                Credit, Ack, Bye)
}


def decode(frames: list[bytes]) -> Command:
    """Turn the frames of one client message into a checked command.

    Raises ``ProtocolError`` with the code that names the problem; ``err.request_id`` is the
    request id when the header could be read far enough to find one (else None).
    """
    request_id = None
    try:
        if len(frames) < 2:
            raise ProtocolError(
                "bad-frame", f"a message needs a verb frame and a header frame, got {len(frames)} frame(s)"
            )
        verb = frames[0]
        if not verb or verb[0] != VERSION:
            got = verb[0] if verb else None
            raise ProtocolError(
                "bad-version",
                f"protocol version {got!r} is not supported; this broker speaks version {VERSION}",
                limit=VERSION,
            )
        header = unpack_header(frames[1])
        if type(header.get("id")) is int:
            request_id = header["id"]
        cls = COMMANDS.get(verb)
        if cls is None:
            shown = verb[1:40].decode("ascii", "backslashreplace")
            known = ", ".join(sorted(c.VERB for c in COMMANDS.values()))
            raise ProtocolError("unknown-verb", f"unknown verb {shown!r}; known verbs: {known}")
        return cls.from_wire(header, tuple(frames[2:]))
    except ProtocolError as err:
        err.request_id = request_id
        raise
    except (TypeError, ValueError) as exc:  # e.g. unhashable or wrongly typed fields
        err = ProtocolError("bad-header", f"malformed header: {exc}")
        err.request_id = request_id
        raise err from None


# Replies and deliveries, broker to client.
OK = verb_frame("OK")
ERROR = verb_frame("ERROR")
MSG = verb_frame("MSG")
JOIN = verb_frame("JOIN")


def ok(request_id: int | None, **fields: object) -> list[bytes]:
    return [OK, pack({"id": request_id, **fields})]


def error(request_id: int | None, err: ProtocolError) -> list[bytes]:
    return [ERROR, pack({"id": request_id, "code": err.code, "message": err.message, **err.fields})]
