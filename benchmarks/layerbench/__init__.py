"""The parts of ``benchmarks/layers.py``, the race of ``BusChannelLayer`` against channels_redis,
split by reason to change: ``config`` holds the names, sizes and bounds every part shares;
``roles`` is the scenario code each spawned worker process runs; ``services`` starts and stops
the redis-server and the broker by PID and samples the host's CPUs; ``run`` spawns the workers
of one run and turns their reports into figures; ``report`` takes the medians and renders the
tables. Imports go one way: every module may import ``config``; ``run`` imports ``roles``,
``services`` and ``report``; ``benchmarks/layers.py`` (the options, ``main`` and the usage
documentation) imports the package, and nothing in it imports back.
"""
