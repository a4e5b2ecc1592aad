"""A terminal chat: every participant is a consumer in the group ``chat_<room>``.

Run a broker, then one participant per terminal (any number, on any host that reaches the
broker)::

    channelbus broker
    python -m examples.chat lobby --name alice
    python -m examples.chat lobby --name bob --broker tcp://127.0.0.1:5555

Type a line and press Enter to say it; Ctrl-D (or Ctrl-C) leaves. Everyone in the room sees
``alice: hello`` for each line and ``* bob joined`` / ``* bob left`` notices; other rooms see
nothing. ``--broker`` defaults to ``$CHANNELBUS_BROKER`` or tcp://127.0.0.1:5555.
"""

from .participant import Participant, run_chat

__all__ = ["Participant", "run_chat"]
