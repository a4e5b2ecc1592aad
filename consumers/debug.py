"""What the debugging commands (``channelbus send``, ``group-send``, ``listen``) do.

Messages travel as msgpack, so they may hold ``bytes``; JSON cannot. On the command line and in
``listen``'s output a bytes value is written as ``{"$bytes": "<base64>"}`` (standard alphabet,
with padding), and ``send`` turns such an object back into bytes. Every other value maps to JSON
as usual (msgpack gives only dicts, lists, str, numbers, booleans and None).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Callable

BYTES_KEY = "$bytes"


def to_json(message: object) -> str:
    """One line of JSON for ``message``; bytes become ``{"$bytes": base64}``."""
    return json.dumps(_jsonable(message), ensure_ascii=False, separators=(", ", ": "))


def _jsonable(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return {BYTES_KEY: base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {_key(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _key(key: object) -> object:
    if isinstance(key, (bytes, bytearray)):  # JSON keys are strings: show the base64
        return f"{BYTES_KEY}:{base64.b64encode(key).decode('ascii')}"
    return key


def from_json(text: str) -> dict:
    """Parse a message from JSON, turning ``{"$bytes": base64}`` objects into bytes.

    Raises ValueError saying what is wrong: not JSON, not an object with a "type" string, or a
    ``$bytes`` value that is not base64.
    """
    try:
        value = json.loads(text, object_hook=_decode_bytes)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError(
            "a message is a JSON object with a \"type\" string, e.g."
            " '{\"type\": \"chat.message\", \"text\": \"hi\"}'"
        )
    return value


def _decode_bytes(obj: dict) -> object:
    if len(obj) == 1 and BYTES_KEY in obj:
        data = obj[BYTES_KEY]
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise ValueError(f"{{\"{BYTES_KEY}\": ...}} must hold a base64 string, got {data!r}") from None
    return obj


def listen(client, emit: Callable[[str], None], *, channel: str | None = None,
           group: str | None = None, count: int | None = None,
           on_ready: Callable[[str], None] | None = None) -> int:
    """Print (via ``emit``) each message of ``channel``, or of ``group`` through a channel of
    its own, as one JSON line; stop after ``count`` messages (never if None) or when
    interrupted. Returns how many were shown. ``client`` is a connected ``clients.Client``;
    the group is left again on the way out, however that comes.
    """
    if (channel is None) == (group is None):
        raise ValueError("listen to a channel or a group, not both or neither")
    if group is not None:
        channel = client.new_channel()
        client.group_add(group, channel)
    shown = 0
    try:
        if on_ready is not None:
            on_ready(channel)
        while count is None or shown < count:
            emit(to_json(client.receive(channel)))
            shown += 1
    finally:
        if group is not None:
            client.group_discard(group, channel)
    return shown
