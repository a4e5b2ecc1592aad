"""The child side of ``benchmarks/core.py``: what each spawned process runs (``--role``).

``common`` holds the payload, the names and the JSON-lines talk with the parent; ``reference``
the raw pyzmq set-ups (the forwarder, its blocking clients and the asyncio floor clients);
``bus`` the broker's ``AsyncClient`` sender and receiver. ``benchmarks/core.py`` (the parent:
options, spawning, figures, report) imports these, and nothing here imports back.
"""
