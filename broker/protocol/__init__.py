"""The channelbus wire protocol: pure code (no zmq, no asyncio).

See ``wire`` for the frames, ``names`` for the naming rules, ``errors`` for the error codes and
``docs/protocol.md`` for the contract.
"""

from .errors import ERROR_CODES, ProtocolError
from .names import (
    CONTROL_TOPIC, MAX_NAME_LENGTH, check_channel, check_client_id, check_group, group_topic,
    is_specific, owner_of,
)
from .wire import VERSION, decode

__all__ = [
    "CONTROL_TOPIC", "ERROR_CODES", "MAX_NAME_LENGTH", "ProtocolError", "VERSION",
    "check_channel", "check_client_id", "check_group", "decode", "group_topic", "is_specific",
    "owner_of",
]
