"""Every broker setting in one dataclass; the CLI, a TOML file and env vars fill it.

Precedence, highest first: command-line flag, ``CHANNELBUS_*`` environment variable, the TOML
file given with ``--config``, the defaults below. ``docs/configuration.md`` lists them all.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, fields

from .routing import Limits

DEFAULT_BIND = "tcp://127.0.0.1:5555"
DEFAULT_PUB_BIND = "tcp://127.0.0.1:5556"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_BUSY_POLL = 10_000  # microseconds: the broker's timers (ticks of 0.1 s) stay on time

_SIZE_RE = re.compile(r"\s*(\d+)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?\s*\Z", re.IGNORECASE)
_UNITS = {
    None: 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
}


class ConfigError(ValueError):
    """A setting has a value the broker cannot use; the message says which and why."""


def parse_size(value: object) -> int:
    """``1048576``, ``"1MiB"``, ``"512k"`` -> bytes. Raise ConfigError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise ConfigError(f"{value!r} is not a size: use bytes or a unit such as 512KiB or 1MiB")
        number = int(match.group(1)) * _UNITS[match.group(2) and match.group(2).lower()]
    if number < 1:
        raise ConfigError(f"size must be at least 1 byte, got {value!r}")
    return number


@dataclass(frozen=True)
class BrokerConfig:
    """The broker's settings, checked when built: a bad value raises ConfigError."""

    bind: str = DEFAULT_BIND
    pub_bind: str = DEFAULT_PUB_BIND
    advertise: str | None = None
    max_capacity: int = 100_000
    max_expiry: float = 86400.0
    max_group_expiry: float = 7 * 86400.0
    max_message_size: int = 1024 * 1024
    max_bad_frames: int = 100
    max_memory: int = 512 * 1024 * 1024
    heartbeat: float = 1.0
    busy_poll: int = 0  # microseconds the broker keeps polling for the next command before it sleeps
    check: bool = False  # check the routing state's rules (conservation) after every batch and tick
    secret_key: str | None = None  # the broker's own .key_secret file: CURVE on both sockets
    authorized_keys: str | None = None  # directory of the .key files of the clients let in
    permissions: str | None = None  # TOML file of what each key may do (broker.permissions)
    insecure: bool = False  # allow binding beyond loopback without CURVE (protected mode off)
    metrics: str | None = None  # HOST:PORT to serve Prometheus metrics on
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for name in ("bind", "pub_bind"):
            value = getattr(self, name)
            if not isinstance(value, str) or "://" not in value:
                raise ConfigError(f"{name} must be a ZeroMQ endpoint such as tcp://127.0.0.1:5555, got {value!r}")
        for name in ("max_capacity", "max_message_size", "max_bad_frames", "max_memory"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")
        for name in ("max_expiry", "max_group_expiry", "heartbeat"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number of seconds above 0, got {value!r}")
        if type(self.busy_poll) is not int or not 0 <= self.busy_poll <= MAX_BUSY_POLL:
            raise ConfigError(
                f"busy_poll must be a whole number of microseconds from 0 (off) to {MAX_BUSY_POLL},"
                f" got {self.busy_poll!r}"
            )
        if type(self.check) is not bool:
            raise ConfigError(f"check must be true or false, got {self.check!r}")
        self._check_security()
        match = _METRICS_RE.match(str(self.metrics)) if self.metrics is not None else None
        if self.metrics is not None and not (match and 0 <= int(match.group(2)) < 65536):
            raise ConfigError(f"metrics must be HOST:PORT such as 127.0.0.1:9464 (port 0: any free one),"
                              f" got {self.metrics!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")

    def _check_security(self) -> None:
        """The key settings go together; protected mode (after Redis): without keys, bind only
        to loopback (or ipc), unless the operator says ``insecure``."""
        if type(self.insecure) is not bool:
            raise ConfigError(f"insecure must be true or false, got {self.insecure!r}")
        for name in ("secret_key", "authorized_keys", "permissions"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must be a path, got {value!r}")
        if self.secret_key and not self.authorized_keys:
            raise ConfigError(
                "secret_key needs authorized_keys: the directory of the public .key files of the"
                " clients allowed in (channelbus keygen NAME --dir DIR writes them)"
            )
        if not self.secret_key:
            for name in ("authorized_keys", "permissions"):
                if getattr(self, name):
                    raise ConfigError(
                        f"{name} needs secret_key: keys identify clients only with CURVE on"
                        " (channelbus keygen broker writes the broker's key pair)"
                    )
            exposed = [e for e in (self.bind, self.pub_bind) if not is_local(e)]
            if exposed and not self.insecure:
                raise ConfigError(
                    f"protected mode: {exposed[0]} is reachable beyond this host and the broker has no"
                    " keys, so anyone who can reach it could read every channel and flush the"
                    " broker. Generate keys (channelbus keygen broker --dir keys; channelbus keygen"
                    " CLIENT --dir client-keys, then copy client-keys/CLIENT.key, the public half"
                    " only, into keys/authorized) and pass --secret-key keys/broker.key_secret"
                    " --authorized-keys keys/authorized (docs/security.md), bind to 127.0.0.1, or"
                    " pass --insecure if a firewall or private network protects the ports"
                )

    def limits(self) -> Limits:
        return Limits(
            max_message_size=self.max_message_size, max_capacity=self.max_capacity,
            max_expiry=float(self.max_expiry), max_group_expiry=float(self.max_group_expiry),
            max_bad_frames=self.max_bad_frames, max_memory=self.max_memory,
            heartbeat=float(self.heartbeat),
        )


SETTINGS = tuple(f.name for f in fields(BrokerConfig))
_METRICS_RE = re.compile(r"\A(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):(\d{1,5})\Z")


def is_local(endpoint: str) -> bool:
    """Whether ``endpoint`` can only be reached from this host: loopback TCP, ipc or inproc."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    return host.startswith("127.") or host in ("localhost", "::1")


def load_toml(path: str) -> dict:
    """Read a TOML config file into a dict of BrokerConfig field names (dashes allowed in keys).

    The settings may sit at the top level, under a ``[broker]`` table, or both. Raise
    ConfigError if the file cannot be read or parsed, has an unknown key or table (so a typo
    never goes unnoticed) or sets one setting twice. Values are returned as written; the caller
    checks them.
    """
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    section = data.pop("broker", None) if isinstance(data.get("broker"), dict) else None
    settings: dict = {}
    for table, items in (("", data), ("[broker] ", section or {})):
        for key, value in items.items():
            name = key.replace("-", "_")
            if name not in SETTINGS:
                known = ", ".join(s.replace("_", "-") for s in SETTINGS)
                raise ConfigError(
                    f"config file {path}: unknown {table}setting {key!r}; known settings: {known}"
                )
            if name in settings:
                raise ConfigError(f"config file {path}: {key!r} is set twice (top level and [broker])")
            settings[name] = value
    return settings
