"""Error codes of the wire protocol.

Every ERROR reply carries one of these codes, a human-readable message and, where it applies,
fields that say what the limit was (``limit``, ``size``, ``name``, ``capacity``, ``channel``).
"""

from __future__ import annotations

import reprlib

ERROR_CODES = {
    "bad-frame": "the frames do not form a message of this protocol",
    "bad-version": "the protocol version byte is not one this broker speaks",
    "unknown-verb": "the verb is not one this broker knows",
    "bad-header": "the header is not a msgpack map with the fields the verb needs",
    "bad-name": "a channel or group name breaks the naming rules",
    "bad-value": "a field has a value outside its allowed range",
    "limit": "a setting exceeds a ceiling the broker's operator set",
    "too-large": "the message body exceeds the broker's maximum message size",
    "bad-body": "the message body is not a msgpack map with a str 'type'",
    "full": "the channel already holds its capacity of messages",
    "memory": "the broker holds its max-memory of queued messages; try again when receivers catch up",
    "no-reservation": "a POST named a channel where this client holds no reserved slot",
    "unconfirmed": "the owner of a process-specific channel did not confirm its group subscription",
    "not-member": "the channel is not (or no longer) a member of the group",
    "no-hello": "the first request of a connection must be HELLO",
    "id-taken": "another live client already uses this client id",
    "banned": "the peer sent too many bad frames and is ignored for a while",
    "forbidden": "the client's key is not granted this action on this name (the permissions file)",
    "wrong-shard": "the client's list of brokers puts this broker at another place than earlier clients' did",
}


class ProtocolError(Exception):
    """A request the broker refuses: ``code`` (see ERROR_CODES), a message and fields."""

    def __init__(self, code: str, message: str, **fields: object) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields


_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxstring, _ECHO.maxother, _ECHO.maxlong = 3, 120, 120, 40
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxdict = _ECHO.maxset = 8


def echo(value: object) -> str:
    """``repr(value)`` cut to a bounded length and nesting depth, for error messages: echoing
    what a peer sent can neither recurse without end (a value nested 1,000 levels deep) nor make
    the reply large."""
    return _ECHO.repr(value)
