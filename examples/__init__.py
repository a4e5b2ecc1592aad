"""Runnable examples of consumers on the bus; run them from the repository's root directory.

- ``examples.chat``: a terminal chat, ``python -m examples.chat ROOM --name NAME``.
- ``examples.workers``: a pool of worker processes sharing one job channel
  (``channelbus run examples.workers.worker:Worker``) and a producer
  (``python -m examples.workers.producer``).

Each needs a broker: ``channelbus broker`` in another terminal. Like the ``channelbus``
commands, they take the broker from ``$CHANNELBUS_BROKER`` (several, comma-separated, for a
sharded bus) and CURVE keys from ``$CHANNELBUS_SECRET_KEY`` and ``$CHANNELBUS_SERVER_KEY``.
"""

import os


def client_keys() -> dict:
    """The CURVE keys of ``$CHANNELBUS_SECRET_KEY`` and ``$CHANNELBUS_SERVER_KEY``, as client
    settings (none when they are not set)."""
    names = (("secret_key", "CHANNELBUS_SECRET_KEY"), ("server_key", "CHANNELBUS_SERVER_KEY"))
    return {setting: os.environ[var] for setting, var in names if os.environ.get(var)}
