"""The errors a channelbus client raises.

::

    BusError                      root of everything the bus raises (itself: a call on a closed client)
    ├── ChannelFull               send() to a channel that holds `capacity` messages
    ├── InvalidName (ValueError)  a channel or group name breaks the naming rules
    ├── MessageTooLarge           the serialised message exceeds the broker's limit
    ├── LimitExceeded             a client setting exceeds a ceiling of the broker's operator
    ├── ReceiveTimeout (TimeoutError)   receive(timeout=...) found nothing in time
    ├── BrokerUnavailable         the broker did not answer within the client's timeout
    ├── MessagesLost              messages whose send() had returned were lost (raised by a later call)
    ├── AuthenticationFailed      the CURVE handshake failed: key not authorised, no key, wrong server key
    ├── Forbidden                 the client's key is not granted this action on this name
    ├── KeyFileError (ValueError) a key file (or Z85 key) given to the client cannot be used
    └── BrokerError               any other ERROR reply; `code` says which (docs/protocol.md)

Each error carries its facts as fields (``channel``, ``capacity``, ``size``, ``limit``,
``name``, ``code``) so callers need not parse messages. ``from_reply`` builds the error for a
broker's ERROR reply, ``bad_name`` the one for a name refused before it was sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.protocol.errors import ProtocolError


class BusError(Exception):
    """Root of every channelbus error. ``code`` is the protocol error code, if any."""

    code: str | None = None

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        for key, value in fields.items():
            setattr(self, key, value)


class ChannelFull(BusError):
    """The destination channel already holds ``capacity`` messages; nothing was queued."""

    code = "full"
    channel: str = ""
    capacity: int = 0


class InvalidName(BusError, ValueError):
    """A channel or group name breaks the rules; the message states them."""

    code = "bad-name"
    name: str = ""


class MessageTooLarge(BusError):
    """The serialised message (``size`` bytes) exceeds the broker's ``limit``."""

    code = "too-large"
    size: int = 0
    limit: int = 0


class LimitExceeded(BusError):
    """A setting (``name``) exceeds the broker operator's ceiling (``limit``)."""

    code = "limit"
    name: str = ""
    limit: object = None


class ReceiveTimeout(BusError, TimeoutError):
    """``receive()`` waited ``timeout`` seconds and no message came."""

    channel: str = ""
    timeout: float = 0.0


class BrokerUnavailable(BusError):
    """The broker did not answer within ``timeout`` seconds (down, unreachable or overloaded)."""

    code = "unavailable"
    endpoint: str = ""
    timeout: float = 0.0


class MessagesLost(BusError):
    """``count`` messages to ``channels`` whose ``send`` (or ``group_send(wait=False)``) had
    returned were lost: the broker refused them after all, or the connection dropped before
    they left this process. Raised by the client's next send or group_send, which then sends
    nothing; the message says why. A correct client and broker never lose one this way."""

    code = "lost"
    count: int = 0
    channels: list = []


class AuthenticationFailed(BusError):
    """The broker at ``endpoint`` did not let this client in: ``reason`` says what failed (its
    key is not authorised, it has no key for a broker that wants one, or the server key it was
    given is not the broker's). Raised within the client's timeout, from the handshake events."""

    code = "auth"
    endpoint: str = ""
    reason: str = ""


class Forbidden(BusError):
    """The client's ``key`` may not do ``action`` (send, receive, group_send, group_add, flush,
    stats) on ``name``: the broker's permissions file does not grant it. Nothing else happened."""

    code = "forbidden"
    key: str = ""
    action: str = ""
    name: str = ""


class KeyFileError(BusError, ValueError):
    """A key given to the client cannot be used (no such file, not a key, a public key where a
    secret one is needed); the message says which."""


class BrokerError(BusError):
    """The broker refused a request for a reason with no class of its own; see ``code``."""


_BY_CODE = {cls.code: cls for cls in (ChannelFull, InvalidName, MessageTooLarge, LimitExceeded, Forbidden)}


def from_reply(header: dict) -> BusError:
    """Build the exception for an ERROR reply header."""
    code = header.get("code")
    message = str(header.get("message", "broker error"))
    fields = {k: v for k, v in header.items() if k not in ("id", "code", "message")}
    cls = _BY_CODE.get(code, BrokerError)
    err = cls(message, **fields)
    err.code = code
    return err


def bad_name(err: ProtocolError) -> InvalidName:
    """The InvalidName for a name the protocol's rules refused (a ``bad-name`` ProtocolError)."""
    return InvalidName(err.message, name=err.fields.get("name", ""))
