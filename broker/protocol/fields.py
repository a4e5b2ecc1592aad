"""Building blocks of the wire format: header packing, field checks, command base classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import msgpack

from .errors import ProtocolError, echo

VERSION = 1
MAX_HEADER_SIZE = 64 * 1024
MAX_INT = 2**63 - 1
_unpackb = msgpack.unpackb


def pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def packer():
    """A ``pack`` of one's own, for one thread only: it reuses its buffer, so it is a third of
    the cost of ``pack`` (which builds a Packer every call). The broker's deliveries and each
    client's sends use one."""
    return msgpack.Packer(use_bin_type=True).pack


def unpack_header(frame: bytes) -> dict:
    """Decode a header frame; raise ``ProtocolError('bad-header')`` unless it is a str-keyed map."""
    if len(frame) > MAX_HEADER_SIZE:
        raise ProtocolError(
            "bad-header", f"header is {len(frame)} bytes; the limit is {MAX_HEADER_SIZE}",
            size=len(frame), limit=MAX_HEADER_SIZE,
        )
    try:
        header = _unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError("bad-header", f"header is not valid msgpack: {exc}") from None
    if type(header) is not dict:  # (msgpack builds plain dicts)
        raise ProtocolError("bad-header", f"header must be a msgpack map, got {type(header).__name__}")
    for key in header:  # (a loop: no generator to set up for the few keys of a header)
        if type(key) is not str:
            raise ProtocolError("bad-header", "header keys must all be str")
    return header


def verb_frame(verb: str) -> bytes:
    return bytes([VERSION]) + verb.encode("ascii")


MAP_FIRST_BYTES = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # msgpack fixmap, map16, map32


def body_is_map(body: bytes) -> bool:
    """True when a msgpack document starts with a map (its first byte is in MAP_FIRST_BYTES)."""
    return bool(body) and body[0] in MAP_FIRST_BYTES


def field_value(header: dict, key: str) -> object:
    """A required field's value; a missing (or nil) field is a ``bad-header``."""
    value = header.get(key)
    if value is None:
        raise ProtocolError("bad-header", f"the header needs field {key!r}", name=key)
    return value


def int_field(header: dict, key: str, *, low: int = 0, default: int | None = None) -> int:
    return check_int(key, header.get(key, default), low)


def check_int(key: str, value: object, low: int = 0) -> int:
    """``value`` of field ``key`` if it is an int from ``low`` to MAX_INT (None: missing)."""
    if type(value) is not int or not low <= value <= MAX_INT:
        raise ProtocolError(
            "bad-header" if value is None else "bad-value",
            f"field {key!r} must be an int from {low} to {MAX_INT}; got {echo(value)}",
            name=key,
        )
    return value


def seconds_field(header: dict, key: str) -> float:
    value = field_value(header, key)
    if type(value) not in (int, float) or not 0 < value <= 10**9:
        raise ProtocolError(
            "bad-value", f"field {key!r} must be a number of seconds above 0; got {echo(value)}",
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
        check_int("id", self.id)


def one_body(verb: str, body: tuple[bytes, ...]) -> bytes:
    if len(body) != 1:
        raise ProtocolError("bad-frame", f"{verb} takes exactly one body frame, got {len(body)}")
    return body[0]


def no_body(verb: str, body: tuple[bytes, ...]) -> None:
    if body:
        raise ProtocolError("bad-frame", f"{verb} takes no body frame, got {len(body)}")


