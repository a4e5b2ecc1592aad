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


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def rates(sample: dict, previous: dict | None) -> dict:
    """Messages in and out per second between two STATS samples (empty without a previous one)."""
    if previous is None:
        return {}
    elapsed = sample["uptime"] - previous["uptime"]
    if elapsed <= 0:
        return {}
    now, before = sample["counters"], previous["counters"]
    return {
        "in_per_s": (now["received"] - before["received"]) / elapsed,
        "out_per_s": (now["delivered"] - before["delivered"]) / elapsed,
    }


def _fates(sample: dict, counters: dict) -> str:
    """Where every message the broker accepted is now; the two sides must be equal."""
    dropped = counters["dropped_full"] + counters["dropped_memory"] + counters["dropped_owner_gone"]
    total = (sample["queued"] + sample["inflight"] + counters["acknowledged"] + counters["expired"]
             + counters["flushed"] + dropped)
    line = (f"accounted: accepted {counters['accepted']} = queued {sample['queued']} + in flight"
            f" {sample['inflight']} + acknowledged {counters['acknowledged']} + expired"
            f" {counters['expired']} + flushed {counters['flushed']} + dropped {dropped} (group"
            f" member full {counters['dropped_full']}, memory {counters['dropped_memory']}, owner"
            f" gone {counters['dropped_owner_gone']})")
    if total != counters["accepted"]:
        line += f"  MISMATCH: the fates add up to {total}"
    return line


def format_stats(sample: dict, previous: dict | None = None, *, as_json: bool = False) -> str:
    """The operator's view of a STATS reply: a few lines of text, or one JSON object."""
    per_second = rates(sample, previous)
    if as_json:
        return json.dumps({**sample, "rates": per_second}, sort_keys=True)
    counters = sample["counters"]
    lines = [
        (f"channelbus, {len(sample['brokers'])} brokers (totals):" if sample.get("brokers") else "channelbus broker:")
        + f" up {_duration(sample['uptime'])}, {sample['clients']} client(s),"
        f" memory {_size(sample['bytes_held'])} of {_size(sample['max_memory'])}",
        f"messages: received {counters['received']}, delivered {counters['delivered']}"
        + (f" ({per_second['in_per_s']:.1f}/s in, {per_second['out_per_s']:.1f}/s out)" if per_second else ""),
        f"refused: full {counters['full']}, too large {counters['too_large']},"
        f" memory {counters['memory_refused']}, bad frames {counters['bad_frames']}"
        + (f", forbidden {counters['forbidden']}" if counters.get("forbidden") else "")
        + f"; expired {counters['expired']}",
        f"channels: {sample['channels']} (queued {sample['queued']}, in flight {sample['inflight']},"
        f" reserved {sample['reserved']}; slots revoked for senders that needed the room"
        f" {counters.get('revoked', 0)})",
    ]
    if "accepted" in counters:  # (a broker that counts every message's fate)
        lines.insert(2, _fates(sample, counters))
    if sample["top_channels"]:
        lines.append(f"  {'QUEUED':>8} {'IN FLIGHT':>9} {'RESERVED':>8}  CHANNEL")
        for name, queued, inflight, reserved in sample["top_channels"]:
            lines.append(f"  {queued:>8} {inflight:>9} {reserved:>8}  {name}")
    lines.append(f"groups: {sample['groups']} (group sends {counters['group_sends']},"
                 f" members skipped as full {counters['group_skipped']})")
    if sample["top_groups"]:
        lines.append(f"  {'MEMBERS':>8}  GROUP")
        for name, members in sample["top_groups"]:
            lines.append(f"  {members:>8}  {name}")
    by_key = sample.get("forbidden_by_key") or {}
    if by_key:  # (a broker with a permissions file refused something)
        lines.append("forbidden by key: " + ", ".join(f"{key} {n}" for key, n in sorted(by_key.items())))
    for index, broker in enumerate(sample.get("brokers") or ()):  # (a sharded bus: each broker)
        c = broker["counters"]
        lines.append(
            f"broker {index + 1} {broker['url']}: {broker['clients']} client(s), received {c['received']},"
            f" delivered {c['delivered']}, queued {broker['queued']}, in flight {broker['inflight']},"
            f" groups {broker['groups']}, memory {_size(broker['bytes_held'])}, up {_duration(broker['uptime'])}"
        )
    caught, missed = counters.get("busy_polled", 0), counters.get("busy_poll_missed", 0)
    if caught or missed:  # (only a broker run with --busy-poll counts these)
        lines.append(f"busy poll: {caught} command(s) caught without a wake-up, {missed} poll(s)"
                     f" ran out ({caught / (caught + missed):.0%} caught)")
    return "\n".join(lines)
