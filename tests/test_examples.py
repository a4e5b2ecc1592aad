"""The examples end to end, each participant or worker a real process on a real broker: three
chat participants driven through stdin (plus one in another room), and 1,000 jobs over two
worker processes."""

from __future__ import annotations

import json
import re
import signal
import sys

import pytest

from consumer_helpers import bus, channelbus, processes  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(60)

STOPPED = re.compile(r"stopped (\S+) after (\d+) messages \((\d+) failed\)")


def join_chat(processes, bus, room: str, name: str):
    """A participant process, returned once it is in the room's group."""
    proc = processes(sys.executable, "-m", "examples.chat", room, "--name", name, "--broker", bus.url,
                     name=f"chat {name}")
    proc.expect(rf"^\* you joined {room} as {name};")
    return proc


def leave(proc) -> None:
    proc.close_stdin()
    assert proc.wait() == 0, proc.output()


def test_three_participants_see_each_others_lines_and_no_other_rooms(bus, processes):
    alice = join_chat(processes, bus, "lobby", "alice")
    bob = join_chat(processes, bus, "lobby", "bob")
    alice.expect(r"^\* bob joined$")
    carol = join_chat(processes, bus, "lobby", "carol")
    for proc in (alice, bob):
        proc.expect(r"^\* carol joined$")
    dave = join_chat(processes, bus, "attic", "dave")

    for speaker, others in ((alice, (bob, carol)), (bob, (alice, carol)), (carol, (alice, bob))):
        name = speaker.name.split()[-1]
        speaker.write(f"hello from {name}")
        for proc in others:
            proc.expect(rf"^{name}: hello from {name}$")

    dave.write("a secret in the attic")
    leave(dave)  # its group_send was answered before it exited
    alice.write("last word")  # anything from the attic would reach bob and carol before this
    for proc in (bob, carol):
        proc.expect(r"^alice: last word$")
    leave(alice)
    for proc in (bob, carol):
        proc.expect(r"^\* alice left$")
    leave(bob)
    carol.expect(r"^\* bob left$")
    leave(carol)

    def said(proc):
        return proc.lines["stdout"][1:]  # after its own "you joined" line

    assert said(alice) == ["* bob joined", "* carol joined", "bob: hello from bob", "carol: hello from carol"]
    assert said(bob) == ["* carol joined", "alice: hello from alice", "carol: hello from carol",
                         "alice: last word", "* alice left"]
    assert said(carol) == ["alice: hello from alice", "bob: hello from bob", "alice: last word",
                           "* alice left", "* bob left"]
    assert said(dave) == []


def test_a_thousand_jobs_over_two_worker_processes_are_each_done_once(bus, processes):
    workers = [
        processes(*channelbus("run", "examples.workers.worker:Worker", "--instances", "2", "--broker", bus.url),
                  name=f"worker {n}")
        for n in (1, 2)
    ]
    for worker in workers:
        for _ in range(2):
            worker.expect(r"started Worker\[\d\] on ", "stderr")

    producer = processes(sys.executable, "-m", "examples.workers.producer", "--jobs", "1000",
                         "--broker", bus.url, "--json", "--timeout", "20", name="producer")
    assert producer.wait(45) == 0, producer.output()
    report = json.loads(producer.lines["stdout"][-1])
    assert (report["jobs"], report["results"], report["duplicates"], report["wrong"], report["missing"]) \
        == (1000, 1000, 0, 0, [])
    by_pid = {int(worker.rpartition(":")[2]): count for worker, count in report["by_worker"].items()}
    assert set(by_pid) == {w.pid for w in workers} and sum(by_pid.values()) == 1000

    handled = 0
    for worker in workers:
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output()
        counts = [(int(m.group(2)), int(m.group(3))) for m in map(STOPPED.search, worker.lines["stderr"]) if m]
        assert len(counts) == 2 and all(failed == 0 for _, failed in counts)
        assert sum(n for n, _ in counts) == by_pid[worker.pid]
        handled += sum(n for n, _ in counts)
    assert handled == 1000  # no job was handled twice, even where its second result went unseen
