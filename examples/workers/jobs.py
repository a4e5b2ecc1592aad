"""The work itself, shared by the worker (which does it) and the producer (which checks it)."""

from __future__ import annotations

import hashlib


def digest(data: bytes, rounds: int) -> str:
    """SHA-256 applied ``rounds`` times to ``data``; a stand-in for real work."""
    for _ in range(rounds):
        data = hashlib.sha256(data).digest()
    return data.hex()
