"""Consumers (dispatch by message type), their runner and the channelbus CLI.

``AsyncConsumer`` and ``Consumer`` are here; ``consumers.runner`` hosts them in a process
(``channelbus run``), ``consumers.testing`` drives them in unit tests, ``docs/consumers.md``
is the tutorial.
"""

from .base import AsyncConsumer, Consumer, ConsumerError, UnhandledMessage

__all__ = ["AsyncConsumer", "Consumer", "ConsumerError", "UnhandledMessage"]
