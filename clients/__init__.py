"""channelbus clients: ``Client`` (blocking) and ``AsyncClient`` (asyncio), one core."""

from .asyncio import AsyncClient
from .errors import (
    AuthenticationFailed, BrokerError, BrokerUnavailable, BusError, ChannelFull, Forbidden,
    InvalidName, KeyFileError, LimitExceeded, MessagesLost, MessageTooLarge, ReceiveTimeout,
)
from .sync import Client

__all__ = [
    "AsyncClient", "AuthenticationFailed", "BrokerError", "BrokerUnavailable", "BusError", "ChannelFull", "Client",
    "Forbidden", "InvalidName", "KeyFileError", "LimitExceeded", "MessagesLost", "MessageTooLarge", "ReceiveTimeout",
]
