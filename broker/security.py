"""CURVE on the broker's sockets: its own key pair, the directory of the clients' public keys,
and the ZAP handler that admits a connection when its key is in that directory.

ZeroMQ does the cryptography (CurveZMQ) and pyzmq the ZAP protocol (``zmq.auth``); this module
only decides who is let in. ``KeyAuthenticator`` answers each handshake from the directory as it
is at that moment (rescanned per handshake, each file parsed again only when it changed), so keys
added or removed take effect for new connections without a restart. The name it gives a
connection (its ``User-Id``, which the server reads off the first message) is the stem of the
key's file. Refused keys are logged once per key per LOG_INTERVAL (with the count of the
refusals not logged), so a client retrying in a loop cannot flood the log.

Like server.py this module touches sockets (the ZAP handler's, in its own thread).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("channelbus.broker")

ZAP_DOMAIN = "channelbus"
LOG_INTERVAL = 60.0  # seconds between log lines about the same refused key
LOG_REMEMBERED = 4096  # refused keys remembered for rate limiting (then forgotten at once)


class KeyFileError(ValueError):
    """A key file cannot be used; the message says which and why."""


def load_secret_key(path: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file written by ``channelbus keygen``."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read the secret key {path}: {exc.strerror}") from None
    except (ValueError, IndexError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a key file written by channelbus keygen: {exc}") from None
    if not secret:
        raise KeyFileError(f"{path} holds no secret key: give the .key_secret file, not the public .key")
    return public, secret


class RateLimitedLog:
    """Log a line per subject at most once per LOG_INTERVAL, saying how many were not logged."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._last: dict[object, tuple[float, int]] = {}  # subject -> (logged at, not logged since)

    def warning(self, subject: object, message: str, *args) -> bool:
        now = self._clock()
        logged, skipped = self._last.get(subject, (None, 0))
        if logged is not None and now - logged < LOG_INTERVAL:
            self._last[subject] = (logged, skipped + 1)
            return False
        if len(self._last) >= LOG_REMEMBERED:
            self._last.clear()
        self._last[subject] = (now, 0)
        if skipped:
            message += f" ({skipped} more since the last such line)"
        log.warning(message, *args)
        return True


class AuthorizedKeys:
    """The public ``.key`` files in ``directory``: ``name_of(z85)`` is the stem of the file that
    holds that key, or None. Looked at afresh on every call (a handshake is rare)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._parsed: dict[str, tuple[tuple, bytes | None]] = {}  # path -> ((mtime, size), key)
        self._complaints = RateLimitedLog()

    def check(self) -> int:
        """Raise KeyFileError if the directory cannot be listed; the number of keys in it."""
        return len(self._scan(strict=True))

    def name_of(self, z85_key: bytes) -> str | None:
        return self._scan().get(z85_key)

    def _scan(self, strict: bool = False) -> dict[bytes, str]:
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except OSError as exc:
            if strict:
                raise KeyFileError(f"cannot read the authorized keys directory {self.directory}: {exc.strerror}") from None
            self._complaints.warning("dir", "cannot read the authorized keys directory %s: %s; no key is let in",
                                     self.directory, exc.strerror)
            return {}
        keys: dict[bytes, str] = {}
        seen = set()
        for entry in entries:
            if not entry.name.endswith(".key") or not entry.is_file():
                continue
            seen.add(entry.path)
            key = self._key_in(entry)
            name = entry.name[: -len(".key")]
            if key is None:
                continue
            if key in keys:
                self._complaints.warning(("twice", key), "authorized keys: %s holds the same key as %s.key;"
                                         " it is known as %s", entry.name, keys[key], keys[key])
                continue
            keys[key] = name
        for path in [p for p in self._parsed if p not in seen]:
            del self._parsed[path]
        return keys

    def _key_in(self, entry: os.DirEntry) -> bytes | None:
        try:
            info = entry.stat()
        except OSError:
            return None
        stamp = (info.st_mtime_ns, info.st_size)
        cached = self._parsed.get(entry.path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            key, _ = zmq.auth.load_certificate(entry.path)
        except (OSError, ValueError, IndexError, TypeError) as exc:
            self._complaints.warning(("bad", entry.path), "authorized keys: %s is not a public key file"
                                     " (%s); it lets nobody in", entry.path, exc)
            key = None
        self._parsed[entry.path] = (stamp, key)
        return key


class KeyAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler (its own thread), admitting the keys of an ``AuthorizedKeys`` and
    naming each connection after its key's file."""

    def __init__(self, context: zmq.Context, keys: AuthorizedKeys) -> None:
        super().__init__(context, log=logging.getLogger("channelbus.broker.zap"))
        self.keys = keys
        self._refusals = RateLimitedLog()
        self._names: dict[bytes, str] = {}  # the key just admitted -> its name (same thread)
        self._lock = threading.Lock()

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(ZAP_DOMAIN, self)

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """pyzmq's credentials-provider hook: is this key let in?"""
        name = self.keys.name_of(z85_key)
        if name is None:
            self._refusals.warning(
                z85_key, "refused a connection: its key %s is not in the authorized keys (%s)",
                z85_key.decode("ascii", "replace"), self.keys.directory,
            )
            return False
        with self._lock:
            self._names[z85_key] = name
        return True

    def curve_user_id(self, client_public_key: bytes) -> str:
        z85_key = zmq.utils.z85.encode(client_public_key)
        with self._lock:
            name = self._names.pop(z85_key, None)
        return name if name is not None else (self.keys.name_of(z85_key) or "")
