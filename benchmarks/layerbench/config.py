"""Names, sizes and bounds shared by every part of the layers benchmark: the layers and
scenarios it knows, the full and ``--quick`` message counts, the expiry given to every layer,
the retry, probe and drain timings of the workers, and the busy fraction below which the host
counts as quiet. A change to what a scenario sends or how long a worker waits starts here.
"""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
HOST = "127.0.0.1"
PAYLOAD = "p" * 64
LAYERS = ("bus", "core", "pubsub")  # the default race
OPTIONAL_LAYERS = ("bus-curve", "floor")  # asked for by name (--layers): a broker with CURVE keys; floor.py
LAYER_TITLES = {
    "bus": "BusChannelLayer",
    "bus-curve": "BusChannelLayer, CURVE",
    "core": "channels_redis core",
    "pubsub": "channels_redis pubsub",
    "floor": "floor (plain forwarder)",
}
LAYER_SCENARIOS = {"floor": ("p2p", "rtt", "many")}  # (it has no groups)
SCENARIOS = ("p2p", "rtt", "fanout", "many")
FULL = {"p2p": 20_000, "rtt": 2_000, "fanout_sends": 1_000, "fanout_procs": 4, "fanout_channels": 25,
        "many_channels": 1_000, "many_messages": 20_000}
QUICK = {"p2p": 2_000, "rtt": 200, "fanout_sends": 100, "fanout_procs": 2, "fanout_channels": 5,
         "many_channels": 100, "many_messages": 2_000}
EXPIRY = 60
RETRY_SLEEP = 0.001  # seconds a sender waits after ChannelFull before retrying the same message
MAX_RETRIES = 1_000_000  # per run; a sender that hits it gives up (bounded loop)
PROBE_INTERVAL = 0.05
PROBE_ROUNDS = 600  # at most this many probe rounds (about 30 s) before a worker gives up
DRAIN = 3.0  # a receiver stops this long after the sender finished and nothing more arrived
WARMUP_ROUND_TRIPS = 50
QUIET_BUSY = 0.10  # the host counts as quiet below this busy fraction (broker and redis idle)
