"""channelbus clients: ``Client`` (blocking) and ``AsyncClient`` (asyncio), one core."""

from .asyncio import AsyncClient
from .errors import (
    BrokerError, BrokerUnavailable, BusError, ChannelFull, InvalidName, LimitExceeded,
    MessagesLost, MessageTooLarge, ReceiveTimeout,
)
from .sync import Client

__all__ = [
    "AsyncClient", "BrokerError", "BrokerUnavailable", "BusError", "ChannelFull", "Client",
    "InvalidName", "LimitExceeded", "MessagesLost", "MessageTooLarge", "ReceiveTimeout",
]
