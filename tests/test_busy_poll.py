"""The broker's ``--busy-poll``: it catches what comes within its time without a wake-up, loses
and reorders nothing, and leaves an idle broker asleep. Real sockets and processes throughout."""

from __future__ import annotations

import os
import threading
import time

import pytest

import bus_workers as w
from broker.server import BrokerServer
from broker.zio import send_frames
from clients import Client
from consumers.debug import format_stats

pytestmark = pytest.mark.timeout(60)

ROUNDS = 300


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_busy_poll_returns_the_message_that_comes_within_its_time(router_dealer):
    router, dealer = router_dealer
    later = threading.Timer(0.05, send_frames, (dealer, [b"\x01PING", b"\x80"]))
    start = time.monotonic()
    later.start()
    try:
        frames = BrokerServer._poll_busily(router, start + 10.0)
    finally:
        later.join()
    assert frames == [b"peer", b"\x01PING", b"\x80"]
    assert 0.04 < time.monotonic() - start < 9.0  # (it waited for it, and not to the end)


def test_a_busy_poll_gives_up_at_its_end_with_nothing(router_dealer):
    router, _ = router_dealer
    start = time.monotonic()
    assert BrokerServer._poll_busily(router, start + 0.05) is None
    assert time.monotonic() - start >= 0.05
    assert BrokerServer._poll_busily(router, start) is None  # (an end already past: no poll)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc for CPU times")
def test_round_trips_through_a_busy_polling_broker_are_caught_whole_and_it_then_sleeps(
    broker_process_factory, procs,
):
    broker = broker_process_factory("--busy-poll", "10000")
    ready = procs.event()
    echo = procs.start(w.echo, broker.url, "bp.ping", "bp.pong", ROUNDS, ready)
    assert ready.wait(30)
    with Client(broker.url) as bus:
        for n in range(ROUNDS):
            bus.send("bp.ping", {"type": "ping", "n": n})
            assert bus.receive("bp.pong", timeout=10) == {"type": "ping", "n": n}
        assert echo.result() == ROUNDS
        sample = bus.stats()
    counters = sample["counters"]
    # Each command of a round trip comes within 10 ms of the one before it: the poll catches it.
    assert counters["busy_polled"] >= ROUNDS
    assert counters["received"] == counters["delivered"] == 2 * ROUNDS
    assert "command(s) caught without a wake-up" in format_stats(sample)
    assert "busy-polling for 10000 us after commands" in broker.stderr_path.read_text()  # (logged by now)
    # With nothing coming, the broker sleeps: no poll after its ticks or heartbeats.
    time.sleep(0.1)
    before = cpu_seconds(broker.process.pid)
    time.sleep(2.0)
    assert cpu_seconds(broker.process.pid) - before < 0.1


def test_a_broker_without_busy_poll_counts_no_polls(broker):
    with Client(broker.url) as bus:
        bus.send("bp.off", {"type": "x"})
        assert bus.receive("bp.off", timeout=10) == {"type": "x"}
        counters = bus.stats()["counters"]
    assert counters["busy_polled"] == counters["busy_poll_missed"] == 0
