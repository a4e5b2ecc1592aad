"""One blocking ``Client`` shared by threads, against a real broker.

A ZeroMQ socket used by two threads at once aborts the process (libzmq's assertions), so each
test that could do that runs its threads in a spawned process (``procs``) when it pushes hard,
and every test bounds its threads' joins: a hang fails here, not in CI's timeout.
"""

from __future__ import annotations

import threading
import time

import pytest

from clients import BusError, Client, ReceiveTimeout


def run_threads(*targets, timeout: float = 20.0) -> None:
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck"


@pytest.mark.timeout(60)
def test_a_thread_waiting_in_receive_does_not_hold_up_another_threads_sends(broker):
    """The waiting thread polls with the lock released; a sender interrupts that poll, sends,
    and the receiver gets what was sent, each message once."""
    got, errors = [], []
    with Client(broker.url) as bus:
        def receiver() -> None:
            try:
                for _ in range(200):
                    got.append(bus.receive("jobs", timeout=10)["n"])
            except BusError as exc:
                errors.append(exc)

        def sender() -> None:
            time.sleep(0.2)  # (the receiver is waiting by now)
            started = time.monotonic()
            for n in range(200):
                bus.send("jobs", {"type": "job", "n": n})
            errors.extend([] if time.monotonic() - started < 10 else ["the sends waited for the receive"])

        run_threads(receiver, sender)
    assert errors == []
    assert got == list(range(200))


@pytest.mark.timeout(60)
def test_threads_waiting_for_replies_get_each_their_own(broker):
    results: dict[int, list] = {}
    with Client(broker.url) as bus:
        def worker(index: int) -> None:
            mine = results.setdefault(index, [])
            for n in range(50):
                bus.send(f"q{index}", {"type": "t", "n": n})
                mine.append(bus.receive(f"q{index}", timeout=10)["n"])
                bus.ping()

        run_threads(*[lambda i=i: worker(i) for i in range(6)])
    assert results == {i: list(range(50)) for i in range(6)}


@pytest.mark.timeout(30)
def test_closing_from_another_thread_ends_a_receive_that_waits_forever(broker):
    outcome = []
    bus = Client(broker.url)

    def waiter() -> None:
        try:
            bus.receive("nothing-comes", timeout=None)
        except BusError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    time.sleep(0.2)
    bus.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(outcome) == 1 and "closed" in str(outcome[0])
    with pytest.raises(BusError, match="closed"):
        bus.send("q", {"type": "t"})


@pytest.mark.timeout(30)
def test_a_listener_may_call_the_client_it_listens_to(broker_process_factory):
    """Listeners run inside whichever call does I/O, with the client's lock held: the lock is
    re-entrant, so a listener that calls the client does not deadlock."""
    import os
    import signal

    broker = broker_process_factory()
    seen = []
    with Client(broker.url, timeout=10) as bus:
        def listener(event: str) -> None:
            if event == "reconnected":
                seen.append(bus.stats()["clients"])

        bus.add_listener(listener)
        me = bus.new_channel()
        bus.group_add("room", me)  # (so that the reconnection replays, and says "reconnected")
        os.kill(broker.process.pid, signal.SIGKILL)
        broker.process.wait(5)
        broker_process_factory("--bind", broker.url, "--pub-bind", broker.pub_url)
        bus.send("q", {"type": "t"})
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            try:
                bus.receive(me, timeout=0.1)
            except ReceiveTimeout:
                pass
    assert seen == [1]
