"""Who may do what: the permissions file, read and asked. Pure: no sockets, no clock.

The file is TOML with one table per key name (a key's name is the stem of its ``.key`` file in
the authorised-keys directory) and an optional ``[default]`` table for keys not listed::

    [web]
    send = ["chat.*", "specific.*"]     # channels it may send to (glob patterns)
    receive = ["replies.*"]             # normal channels it may receive from
    group_send = ["room.*"]             # groups it may send to
    group_add = ["room.*"]              # groups it may add its channels to, discard them from,
                                        # and read (its subscriptions to them)
    stats = true                        # may ask for the broker's figures
    flush = false                       # may empty the broker

What a table does not grant is refused; a listed key gets its own table only (not ``[default]``
as well). A key's own process-specific channels are always its own to receive from: they need
no ``receive`` pattern. Patterns are shell globs matched case-sensitively (``*`` also matches
dots); ``["*"]`` grants every name.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from fnmatch import translate

NAMED = ("send", "receive", "group_send", "group_add")  # actions on a channel or group name
FLAGS = ("flush", "stats")  # actions on the whole broker
ACTIONS = NAMED + FLAGS
DEFAULT = "default"


class PermissionsError(ValueError):
    """The permissions file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Grant:
    """What one key may do: a compiled pattern per named action, a flag per broker action."""

    patterns: dict  # action -> re.Pattern (None: nothing)
    flags: frozenset
    source: dict  # action -> the patterns or flag as written (for messages and STATS)

    def allows(self, action: str, name: str | None = None) -> bool:
        if action in FLAGS:
            return action in self.flags
        pattern = self.patterns.get(action)
        return pattern is not None and pattern.match(name or "") is not None


NOTHING = Grant({}, frozenset(), {})


def _grant(table: object, where: str) -> Grant:
    if not isinstance(table, dict):
        raise PermissionsError(f"{where} must be a table of actions ({', '.join(ACTIONS)}), got {table!r}")
    patterns, flags = {}, set()
    for action, value in table.items():
        if action in NAMED:
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise PermissionsError(
                    f"{where}.{action} must be a list of glob patterns such as [\"chat.*\"], got {value!r}"
                )
            if value:
                patterns[action] = re.compile("|".join(f"(?:{translate(v)})" for v in value))
        elif action in FLAGS:
            if type(value) is not bool:
                raise PermissionsError(f"{where}.{action} must be true or false, got {value!r}")
            if value:
                flags.add(action)
        else:
            raise PermissionsError(f"{where}: unknown action {action!r}; known: {', '.join(ACTIONS)}")
    return Grant(patterns, frozenset(flags), dict(table))


class Permissions:
    """The grants of a permissions file: ``allows(key, action, name)``."""

    def __init__(self, grants: dict[str, Grant], default: Grant = NOTHING, path: str = "") -> None:
        self.grants = grants
        self.default = default
        self.path = path

    @classmethod
    def parse(cls, data: dict, path: str = "permissions") -> "Permissions":
        grants = {name: _grant(table, f"{path}: [{name}]") for name, table in data.items()}
        default = grants.pop(DEFAULT, NOTHING)
        return cls(grants, default, path)

    @classmethod
    def load(cls, path: str) -> "Permissions":
        """Read and check the file; PermissionsError says what is wrong (and nothing is kept)."""
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise PermissionsError(f"cannot read the permissions file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PermissionsError(f"the permissions file {path} is not valid TOML: {exc}") from None
        return cls.parse(data, path)

    def grant_of(self, key: str | None) -> Grant:
        return self.grants.get(key, self.default) if key is not None else self.default

    def allows(self, key: str | None, action: str, name: str | None = None) -> bool:
        return self.grant_of(key).allows(action, name)

    def listed(self, key: str) -> bool:
        return key in self.grants
