"""Runnable examples of consumers on the bus; run them from the repository's root directory.

- ``examples.chat``: a terminal chat, ``python -m examples.chat ROOM --name NAME``.
- ``examples.workers``: a pool of worker processes sharing one job channel
  (``channelbus run examples.workers.worker:Worker``) and a producer
  (``python -m examples.workers.producer``).

Each needs a broker: ``channelbus broker`` in another terminal.
"""
