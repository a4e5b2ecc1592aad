"""Prometheus metrics over HTTP (``--metrics HOST:PORT``), with ``prometheus_client`` (the
optional extra ``channelbus[metrics]``).

The routing state belongs to the broker's thread, so the HTTP thread never reads it: a scrape
asks for a snapshot, the broker's loop takes one at its next tick (``Metrics.due`` and
``publish``, every 0.1 s at most) and the scrape waits for it (SNAPSHOT_WAIT at most; after
that it is answered from the last snapshot). Nothing is computed while nobody scrapes, except
the histogram of the time per command batch, observed by the loop.

Exposed (all prefixed ``channelbus_``): every STATS counter as ``<name>_total``; gauges of
clients, channels, groups, queued, in-flight and reserved messages, memory held and its
ceiling, uptime; ``refusals_total{reason}`` and ``forbidden_total{key}``; the histogram
``batch_seconds``.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("channelbus.broker")

SNAPSHOT_WAIT = 2.0  # seconds a scrape waits for the broker's loop to take a snapshot
REFUSAL_REASONS = {"full": "full", "too_large": "too_large", "memory_refused": "memory",
                   "bad_frames": "bad_frame", "forbidden": "forbidden"}
GAUGES = {
    "clients": "Clients connected (said HELLO and not yet gone).",
    "channels": "Channels the broker holds an inbox for.",
    "groups": "Groups with at least one member.",
    "queued": "Messages queued in channels, waiting for a receiver.",
    "inflight": "Messages pushed to receivers and not yet acknowledged.",
    "reserved": "Channel slots reserved for senders' pipelined sends.",
    "bytes_held": "Bytes of messages held (queued or in flight), counted against max_memory.",
    "max_memory": "The ceiling on bytes_held (--max-memory).",
    "uptime_seconds": "Seconds since the broker started.",
}
BATCH_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25)


class MetricsUnavailable(Exception):
    """``--metrics`` was given but prometheus_client is not installed, or the port is taken."""


def snapshot(router, now: float) -> dict:
    """What a scrape shows, read from the routing state (in the broker's thread)."""
    boxes = router.delivery.inboxes
    return {
        "counters": dict(router.stats),
        "forbidden_by_key": dict(router.forbidden_by_key),
        "clients": len(router.delivery.peers), "channels": len(boxes), "groups": len(router.groups.sizes()),
        "queued": sum(len(b.queue) for b in boxes.values()),
        "inflight": sum(b.inflight for b in boxes.values()),
        "reserved": sum(b.reserved for b in boxes.values()),
        "bytes_held": router.delivery.bytes_held, "max_memory": router.limits.max_memory,
        "uptime_seconds": max(0.0, now - router.started),
    }


class Metrics:
    """The HTTP endpoint and the hand-over of snapshots between it and the broker's loop."""

    def __init__(self, address: str) -> None:
        try:
            from prometheus_client import CollectorRegistry, Histogram, start_http_server
        except ImportError:
            raise MetricsUnavailable(
                "--metrics needs prometheus_client: pip install 'channelbus[metrics]'"
            ) from None
        host, _, port = address.rpartition(":")
        self.address = address
        self._registry = CollectorRegistry(auto_describe=True)
        self.batch_seconds = Histogram(
            "channelbus_batch_seconds", "Time the broker spent on one batch of commands (handling and sending).",
            buckets=BATCH_BUCKETS, registry=self._registry,
        )
        self._registry.register(self)
        self._wanted = False
        self._fresh = threading.Event()
        self._lock = threading.Lock()
        self._last: dict = {}
        try:
            self._server, self._thread = start_http_server(int(port), host.strip("[]"), registry=self._registry)
        except OSError as exc:
            raise MetricsUnavailable(f"cannot serve metrics on {address}: {exc.strerror}") from None

    @property
    def port(self) -> int:
        return self._server.server_port

    # -- the broker's loop ----------------------------------------------------------------

    @property
    def due(self) -> bool:
        return self._wanted

    def publish(self, taken: dict) -> None:
        with self._lock:
            self._last, self._wanted = taken, False
        self._fresh.set()

    # -- the HTTP thread (prometheus_client's collector protocol) -------------------------

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self._fresh.clear()
        self._wanted = True
        self._fresh.wait(SNAPSHOT_WAIT)
        with self._lock:
            taken = self._last
        if not taken:
            return
        for name, value in sorted(taken["counters"].items()):
            yield CounterMetricFamily(f"channelbus_{name}", f"The broker's {name} counter (STATS).", value=value)
        for name, doc in GAUGES.items():
            yield GaugeMetricFamily(f"channelbus_{name}", doc, value=taken[name])
        refusals = CounterMetricFamily("channelbus_refusals", "Requests refused, by reason.", labels=["reason"])
        for counter, reason in REFUSAL_REASONS.items():
            refusals.add_metric([reason], taken["counters"].get(counter, 0))
        yield refusals
        by_key = CounterMetricFamily("channelbus_forbidden_by_key",
                                     "Requests refused by the permissions, by key.", labels=["key"])
        for key, count in sorted(taken["forbidden_by_key"].items()):
            by_key.add_metric([key], count)
        yield by_key

    def describe(self):
        return []  # (the families depend on the snapshot: nothing to describe up front)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
