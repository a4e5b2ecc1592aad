"""The messages the bus carries: a dict with a str ``type`` key, serialised with msgpack
(docs/protocol.md, section 10). Checked here, before anything is sent."""

from __future__ import annotations

from typing import Any

import msgpack


def pack_message(message: Any, pack=None) -> bytes:
    """Serialise a message dict (with ``pack``, a client's own packer, if given); raise
    TypeError/ValueError for what the spec forbids."""
    if not isinstance(message, dict):
        raise TypeError(f"message must be a dict, got {type(message).__name__}")
    if not isinstance(message.get("type"), str):
        raise ValueError("message must have a 'type' key with a str value, e.g. {'type': 'chat.message'}")
    try:
        return msgpack.packb(message, use_bin_type=True) if pack is None else pack(message)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"message cannot be serialised with msgpack: {exc}") from None


def unpack_message(body: bytes) -> dict:
    return msgpack.unpackb(body, raw=False, strict_map_key=False)
