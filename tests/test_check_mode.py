"""The broker's check mode: the routing state's rules checked after every batch and tick.

Every broker of the suite runs it (conftest); these tests show that a broken rule is found,
said and stops the broker, in a thread and as a process (exit status 70), and that a correct
broker's books balance at every step of real traffic.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from broker.invariants import InvariantError, fates, problems
from broker.routing import Router
from broker.server import start_in_thread
from clients import BrokerUnavailable, Client
from conftest import READY_RE, ROOT, _read_line, checked
from consumers.cli import EXIT_BROKEN_RULE


def test_a_fresh_router_breaks_no_rule_and_accounts_for_nothing():
    router = Router()
    assert problems(router) == []
    assert fates(router) == dict.fromkeys(
        ("accepted", "queued", "in_flight", "acknowledged", "expired", "flushed", "dropped_full",
         "dropped_memory", "dropped_owner_gone"), 0)


def test_each_broken_rule_is_named():
    router = Router()
    router.stats["accepted"] = 2
    router.delivery.bytes_held = 5
    found = problems(router)
    assert len(found) == 2
    assert found[0].startswith("conservation: accepted 2 != the sum of the fates 0")
    assert found[1] == "bytes held counted 5, held 0"
    with pytest.raises(InvariantError, match="conservation"):
        router.check()


@pytest.mark.timeout(30)
def test_a_broker_thread_whose_state_breaks_a_rule_says_so_and_stops(caplog):
    server, thread = start_in_thread(checked(bind="tcp://127.0.0.1:*", pub_bind="tcp://127.0.0.1:*"))
    try:
        with Client(server.endpoint, timeout=2) as client:
            client.send("jobs", {"type": "job"})
            server.router.stats["accepted"] += 1  # (as a miscounting bug would)
            try:
                client.ping()  # the reply leaves before the check that follows the batch
            except BrokerUnavailable:
                pass
            thread.join(5)
            assert not thread.is_alive()
    finally:
        server.stop()
        thread.join(5)
    assert isinstance(server.violation, InvariantError)
    assert "accepted 2 != the sum of the fates 1" in str(server.violation)
    assert any("check mode: after a batch of commands" in r.getMessage() for r in caplog.records)


BROKEN_BROKER = textwrap.dedent("""
    import sys
    from broker.routing import Router
    from consumers.cli import main

    handle = Router.handle

    def miscounting_handle(self, rid, frames, now, key=None):
        if frames[0] == b"\\x01PING":
            self.stats["acknowledged"] += 1  # (a message counted twice)
        return handle(self, rid, frames, now, key)

    Router.handle = miscounting_handle
    main(["broker", "--bind", "tcp://127.0.0.1:*", "--pub-bind", "tcp://127.0.0.1:*", "--check"])
""")


@pytest.mark.timeout(30)
def test_a_broker_process_whose_state_breaks_a_rule_exits_70_naming_it(tmp_path):
    stderr_path = tmp_path / "broker.stderr"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", BROKEN_BROKER], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        url = READY_RE.search(_read_line(process, 15.0)).group(1)
        with Client(url, timeout=2) as client:
            try:
                client.ping()
            except BrokerUnavailable:
                pass
        assert process.wait(10) == EXIT_BROKEN_RULE
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        process.stdout.close()
    text = stderr_path.read_text()
    assert "CRITICAL" in text and "check mode: after a batch of commands" in text
    assert "conservation: accepted 0 != the sum of the fates 1" in text
    assert "Traceback" not in text


@pytest.mark.timeout(60)
def test_real_traffic_keeps_the_books_balanced_at_every_batch_and_tick(broker):
    """Sends, pipelined sends, a receiver that leaves holding messages, group copies, expiry
    and a flush: the check mode (on in every broker of the suite) finds nothing, and at the
    end STATS accounts for every message."""
    with Client(broker.url, capacity=50, expiry=0.5) as sender:
        with Client(broker.url, receive_window=4) as leaver:
            for i in range(40):
                sender.send("jobs", {"type": "job", "i": i})
            leaver.receive("jobs", timeout=5)
        sender.group_add("room", "jobs")
        sender.group_add("room", "other")
        for _ in range(30):
            sender.group_send("room", {"type": "g"})
        time.sleep(0.8)  # everything left expires
        sender.send("late", {"type": "x"})
        sender.flush()
        counters = sender.stats()["counters"]
    assert counters["acknowledged"] == 1
    assert counters["flushed"] == 1
    assert counters["dropped_full"] > 0 and counters["expired"] > 0
    assert broker.server.violation is None
