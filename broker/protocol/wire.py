"""Frames on the wire: one frozen dataclass per command, checked when built.

A message is a ZeroMQ multipart message ``[verb, header, body...]``:

- ``verb``: one byte of protocol version (``VERSION``) followed by the ASCII verb.
- ``header``: a msgpack map with str keys; the fields depend on the verb.
- ``body``: for SEND and GSEND, the message as the client serialised it (a msgpack map). The
  broker never unpacks it; it only checks its size and that its first byte opens a map.

Requests carry an ``id`` (an int the client chooses) and get exactly one reply, OK or ERROR, with
the same id. Notices (CREDIT, ACK, POST, RELEASE, JOINED, BYE) carry no id and get no reply unless they are malformed.
``docs/protocol.md`` is the full contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .errors import ProtocolError, echo
from .fields import (  # noqa: F401  (re-exported: the wire format in one import)
    MAX_HEADER_SIZE, MAX_INT, VERSION, Command, Request, body_is_map, check_int, field_value, int_field,
    no_body, one_body, pack, packer, seconds_field, unpack_header, verb_frame,
)
from .names import check_channel, check_client_id, check_group
from .notices import Ack, Bye, Credit, Heartbeat, Joined, Post, Release  # noqa: F401

MAX_PATTERNS = 32
MAX_PATTERN_LENGTH = 200
MAX_STATS_TOP = 1000


MAX_SHARDS = 1024  # brokers a client may be given


@dataclass(frozen=True)
class Hello(Request):
    """Opens (or resumes) a session: names the client id the connection uses (its ZeroMQ
    routing id) and the interval, in seconds, of the heartbeats the client promises to send
    (``hb``; 0: none, the broker then relies on the connection alone)."""

    VERB: ClassVar[str] = "HELLO"
    client: str = ""
    heartbeat: float = 0.0
    reset: bool = False  # a client back after a dropped connection: resend what it was pushed
    shard: tuple = ()  # (index, count): this broker's place in the client's list of brokers
    keep: bool = False  # the client id outlives this connection: when it goes, keep its channels

    def __post_init__(self) -> None:
        super().__post_init__()
        check_client_id(self.client)
        if type(self.heartbeat) not in (int, float) or not 0 <= self.heartbeat <= 3600:
            raise ProtocolError("bad-value", f"field 'hb' must be seconds from 0 to 3600; got {echo(self.heartbeat)}",
                                name="hb")
        if self.shard and not (
            len(self.shard) == 2 and all(type(v) is int for v in self.shard)
            and 0 <= self.shard[0] < self.shard[1] <= MAX_SHARDS
        ):
            raise ProtocolError("bad-value", f"field 'shard' must be [index, count] with 0 <= index < count <= {MAX_SHARDS};"
                                f" got {echo(self.shard)}", name="shard")

    @classmethod
    def from_wire(cls, header, body):
        no_body(cls.VERB, body)
        shard = header.get("shard") or ()
        return cls(int_field(header, "id"), field_value(header, "client"), header.get("hb", 0.0),
                   header.get("reset") is True, tuple(shard) if isinstance(shard, list) else shard,
                   header.get("keep") is True)

    def header(self):
        header = {"id": self.id, "client": self.client}
        if self.heartbeat:
            header["hb"] = self.heartbeat
        if self.reset:
            header["reset"] = True
        if self.shard:
            header["shard"] = list(self.shard)
        if self.keep:
            header["keep"] = True
        return header


@dataclass(frozen=True)
class Send(Request):
    """Queue ``body`` on ``channel`` unless it already holds ``capacity`` messages."""

    VERB: ClassVar[str] = "SEND"
    channel: str = ""
    capacity: int = 100
    expiry: float = 60.0
    body: bytes = b""
    want: int = 0  # also reserve up to this many slots for POSTs; the reply's ``grant`` says how many

    def __post_init__(self) -> None:
        super().__post_init__()
        check_channel(self.channel)
        check_int("cap", self.capacity, 1)
        check_int("want", self.want)

    @classmethod
    def from_wire(cls, header, body):
        return cls(
            int_field(header, "id"), field_value(header, "ch"), int_field(header, "cap", low=1),
            seconds_field(header, "exp"), one_body(cls.VERB, body), int_field(header, "want", default=0),
        )

    def header(self):
        header = {"id": self.id, "ch": self.channel, "cap": self.capacity, "exp": self.expiry}
        if self.want:
            header["want"] = self.want
        return header

    def frames(self):
        return [verb_frame(self.VERB), pack(self.header()), self.body]


@dataclass(frozen=True)
class Reserve(Request):
    """Reserve up to ``want`` slots on ``channel`` (capacity ``capacity``) for later POSTs.

    The reply's ``grant`` is how many were reserved: at most half of the free room, 0 when the
    channel is (nearly) full, which is not an error."""

    VERB: ClassVar[str] = "RESERVE"
    channel: str = ""
    capacity: int = 100
    want: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_channel(self.channel)
        check_int("cap", self.capacity, 1)
        check_int("want", self.want, 1)

    @classmethod
    def from_wire(cls, header, body):
        no_body(cls.VERB, body)
        return cls(
            int_field(header, "id"), field_value(header, "ch"), int_field(header, "cap", low=1),
            int_field(header, "want", low=1),
        )

    def header(self):
        return {"id": self.id, "ch": self.channel, "cap": self.capacity, "want": self.want}


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
    sent: float = 0.0  # when the sender sent it, by the broker's wall clock as it reckons; 0: not said

    def __post_init__(self) -> None:
        super().__post_init__()
        check_group(self.group)
        check_int("cap", self.capacity, 1)
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
                    f" at most {MAX_PATTERN_LENGTH} characters; got {echo(pair)}",
                    limit=MAX_PATTERN_LENGTH,
                )
            check_int("cap", pair[1], 1)

    @classmethod
    def from_wire(cls, header, body):
        patterns = header.get("ccap", [])
        if not isinstance(patterns, list):
            raise ProtocolError("bad-value", "field 'ccap' must be a list of [regex, capacity]")
        sent = header.get("at", 0.0)
        if type(sent) not in (int, float) or not 0 <= sent <= 10**11:
            raise ProtocolError("bad-value", f"field 'at' must be a wall-clock time in seconds; got {echo(sent)}",
                                name="at")
        return cls(
            int_field(header, "id"), field_value(header, "g"), int_field(header, "cap", low=1),
            seconds_field(header, "exp"), tuple(tuple(p) if isinstance(p, list) else p for p in patterns),
            one_body(cls.VERB, body), float(sent),
        )

    def header(self):
        header = {
            "id": self.id, "g": self.group, "cap": self.capacity, "exp": self.expiry,
            "ccap": [list(p) for p in self.channel_capacity],
        }
        if self.sent:
            header["at"] = self.sent
        return header

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
        no_body(cls.VERB, body)
        return cls(int_field(header, "id"), field_value(header, "g"), field_value(header, "ch"))

    def header(self):
        return {"id": self.id, "g": self.group, "ch": self.channel}


@dataclass(frozen=True)
class GroupAdd(_Membership):
    """Add ``channel`` to ``group`` for ``group_expiry`` seconds (re-adding refreshes it)."""

    VERB: ClassVar[str] = "GADD"
    group_expiry: float = 86400.0

    @classmethod
    def from_wire(cls, header, body):
        no_body(cls.VERB, body)
        return cls(
            int_field(header, "id"), field_value(header, "g"), field_value(header, "ch"), seconds_field(header, "gexp")
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
        no_body(cls.VERB, body)
        return cls(int_field(header, "id"))

    def header(self):
        return {"id": self.id}


@dataclass(frozen=True)
class Ping(Flush):
    """A no-op round trip."""

    VERB: ClassVar[str] = "PING"

@dataclass(frozen=True)
class GroupPost(GroupSend):
    """Notice: GSEND without a reply (``id`` absent, 0 here), for senders that need no counts;
    a refusal still comes back as an ERROR with no id."""

    VERB: ClassVar[str] = "GPOST"

    @classmethod
    def from_wire(cls, header, body):
        return super().from_wire({**header, "id": 0}, body)

    def header(self):
        header = super().header()
        del header["id"]
        return header


@dataclass(frozen=True)
class Stats(Request):
    """What an operator needs at a glance: clients, the ``top`` deepest channels and largest
    groups, counters, memory held, uptime (see docs/protocol.md for the reply)."""

    VERB: ClassVar[str] = "STATS"
    top: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.top <= MAX_STATS_TOP:
            raise ProtocolError("bad-value", f"'top' must be from 1 to {MAX_STATS_TOP}; got {echo(self.top)}",
                                limit=MAX_STATS_TOP)

    @classmethod
    def from_wire(cls, header, body):
        no_body(cls.VERB, body)
        return cls(int_field(header, "id"), int_field(header, "top", low=1, default=10))

    def header(self):
        return {"id": self.id, "top": self.top}


COMMANDS: dict[bytes, type[Command]] = {
    verb_frame(cls.VERB): cls
    for cls in (Hello, Send, Reserve, GroupSend, GroupAdd, GroupSync, GroupDiscard, Flush, Ping,
                Credit, Ack, Bye, Post, Release, Joined, Stats, Heartbeat, GroupPost)
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
RECALL = verb_frame("RECALL")
HB = verb_frame("HB")


def ok(request_id: int | None, **fields: object) -> list[bytes]:
    return [OK, pack({"id": request_id, **fields})]


def error(request_id: int | None, err: ProtocolError) -> list[bytes]:
    return [ERROR, pack({"id": request_id, "code": err.code, "message": err.message, **err.fields})]
