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


class BrokerError(BusError):
    """The broker refused a request for a reason with no class of its own; see ``code``."""


_BY_CODE = {cls.code: cls for cls in (ChannelFull, InvalidName, MessageTooLarge, LimitExceeded)}


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
