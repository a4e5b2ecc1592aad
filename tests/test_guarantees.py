"""Promises of docs/guarantees.md that no other test proved: what a killed receiver gives back,
what a broker kill loses, what a restart does not replay, the memory ceiling, a stuck receiver.

Real brokers (conftest: a thread, or the ``channelbus broker`` process when it must be killed)
and real processes killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from clients import BrokerError, BusError, Client, ReceiveTimeout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = b"\x01"


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def kill(broker) -> None:
    os.kill(broker.process.pid, signal.SIGKILL)
    broker.process.wait(5)


def restart(broker_process_factory, broker):
    """A new broker process on the killed one's endpoints."""
    return broker_process_factory("--bind", broker.url, "--pub-bind", broker.pub_url)


def inflight(observer: Client, channel: str) -> int | None:
    """The broker's count of ``channel``'s messages pushed and not yet acknowledged."""
    for name, _queued, pushed, _reserved in observer.stats(1000)["top_channels"]:
        if name == channel:
            return pushed
    return None


def drain(bus: Client, channel: str, quiet: float = 0.5) -> list[int]:
    """Every ``i`` that arrives on ``channel`` until nothing comes for ``quiet`` seconds."""
    got = []
    while True:
        try:
            got.append(bus.receive(channel, timeout=quiet)["i"])
        except ReceiveTimeout:
            return got


def wait_until_reconnected(client: Client, events: list, seconds: float = 10.0) -> None:
    """Do I/O on a blocking client until it has said HELLO again and replayed its memberships."""
    deadline = time.monotonic() + seconds
    while "reconnected" not in events:
        assert time.monotonic() < deadline, events
        try:
            client.ping()
        except BusError:
            pass  # (the first call after a restart may fail: see docs/protocol.md section 16)


def spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait(5)
    child.stdout.close()


BLOCKING_WORKER = """
import sys, time
sys.path.insert(0, {root!r})
from clients import Client
with Client({url!r}) as bus:
    print(bus.receive("jobs", timeout=10)["i"], flush=True)
    time.sleep(60)  # handling the job when it is killed
"""

ASYNC_WORKER = """
import asyncio, sys, time
sys.path.insert(0, {root!r})
from clients import AsyncClient

async def main():
    async with AsyncClient({url!r}) as bus:
        print((await bus.receive("jobs", timeout=10))["i"], flush=True)
        time.sleep(60)  # a handler that blocks its event loop: the ACK never leaves the process

asyncio.run(main())
"""


def send_jobs(url: str, count: int) -> None:
    with Client(url) as producer:
        for i in range(count):
            producer.send("jobs", {"type": "job", "i": i})


# -- receivers that die -------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_killed_receiver_gives_back_what_it_had_not_taken_but_not_what_it_had_acknowledged(broker):
    send_jobs(broker.url, 5)
    child = spawn(BLOCKING_WORKER.format(root=ROOT, url=broker.url))
    try:
        assert child.stdout.readline().strip() == "0"  # it took job 0; jobs 1-4 were pushed too
        with Client(broker.url) as observer:
            deadline = time.monotonic() + 5
            while inflight(observer, "jobs") != 4:  # job 0's ACK has reached the broker
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(5)
        with Client(broker.url) as next_worker:
            assert drain(next_worker, "jobs", quiet=3) == [1, 2, 3, 4]  # never job 0 again
    finally:
        stop(child)


@pytest.mark.timeout(60)
def test_a_receiver_killed_before_its_acknowledgement_left_has_that_message_handed_to_another(broker):
    send_jobs(broker.url, 5)
    child = spawn(ASYNC_WORKER.format(root=ROOT, url=broker.url))
    try:
        assert child.stdout.readline().strip() == "0"
        with Client(broker.url) as observer:
            time.sleep(0.3)
            assert inflight(observer, "jobs") == 5  # job 0 was taken, but the broker never heard
            os.kill(child.pid, signal.SIGKILL)
            child.wait(5)
        with Client(broker.url) as next_worker:
            assert drain(next_worker, "jobs", quiet=3) == [0, 1, 2, 3, 4]  # job 0 a second time
    finally:
        stop(child)


# -- a broker that is killed --------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_messages_held_or_not_yet_read_by_a_killed_broker_are_lost(broker_process_factory):
    broker = broker_process_factory()
    with Client(broker.url, timeout=2) as sender:
        sender.send("held", {"type": "job", "i": 0})  # accepted (a round trip)
        sender.send("held", {"type": "job", "i": 1})  # accepted; streaming, so it reserves slots
        os.kill(broker.process.pid, signal.SIGSTOP)  # the broker reads nothing more
        started = time.monotonic()
        sender.send("held", {"type": "job", "i": 2})  # into a reserved slot: returns unanswered
        assert time.monotonic() - started < 1.0
        kill(broker)
    restarted = restart(broker_process_factory, broker)
    with Client(restarted.url) as receiver:
        with pytest.raises(ReceiveTimeout):
            receiver.receive("held", timeout=1.0)  # all three are gone
        receiver.send("held", {"type": "job", "i": 3})  # the new broker works as before
        assert receiver.receive("held", timeout=5)["i"] == 3


@pytest.mark.timeout(60)
def test_group_messages_sent_before_a_members_replay_completes_are_missed(broker_process_factory):
    broker = broker_process_factory()
    with Client(broker.url, timeout=5) as member:
        events: list[str] = []
        member.add_listener(events.append)
        mine = member.new_channel()
        member.group_add("room", mine)
        kill(broker)
        restarted = restart(broker_process_factory, broker)
        with Client(restarted.url) as sender:
            # The member has not said HELLO to the new broker yet (a blocking client does its
            # I/O in its own calls), so the new broker knows no member of "room".
            assert sender.group_send("room", {"type": "m", "i": 1}) == {"queued": 0, "full": 0}
            wait_until_reconnected(member, events)
            sender.group_send("room", {"type": "m", "i": 2})
            assert member.receive(mine, timeout=5)["i"] == 2
            with pytest.raises(ReceiveTimeout):
                member.receive(mine, timeout=0.3)  # message 1 never comes


@pytest.mark.timeout(60)
def test_memberships_of_normal_channels_are_not_replayed_after_a_broker_restart(broker_process_factory):
    broker = broker_process_factory()
    with Client(broker.url, timeout=5) as member:
        events: list[str] = []
        member.add_listener(events.append)
        mine = member.new_channel()
        member.group_add("room", mine)
        member.group_add("room", "room-inbox")  # a normal channel: its inbox is in the broker
        kill(broker)
        restarted = restart(broker_process_factory, broker)
        wait_until_reconnected(member, events)
        with Client(restarted.url) as sender:
            assert sender.group_send("room", {"type": "m", "i": 1}) == {"queued": 0, "full": 0}
        assert member.receive(mine, timeout=5)["i"] == 1  # its own channel was replayed
        with pytest.raises(ReceiveTimeout):
            member.receive("room-inbox", timeout=0.3)


# -- the memory ceiling -------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_sends_past_max_memory_are_refused_until_receivers_catch_up(broker_factory):
    ceiling = 20_000
    broker = broker_factory(max_memory=ceiling)
    padding = b"x" * 1000
    with Client(broker.url, capacity=1000) as sender, Client(broker.url) as receiver:
        accepted = 0
        with pytest.raises(BrokerError) as caught:
            while accepted < 100:
                sender.send("big", {"type": "m", "i": accepted, "pad": padding})
                accepted += 1
        assert caught.value.code == "memory" and caught.value.limit == ceiling
        stats = sender.stats()
        assert 0 < stats["bytes_held"] <= ceiling == stats["max_memory"]
        assert stats["counters"]["memory_refused"] == 1
        assert drain(receiver, "big") == list(range(accepted))  # the refused one was not queued
        sender.send("big", {"type": "m", "i": accepted, "pad": padding})  # room again
        assert receiver.receive("big", timeout=5)["i"] == accepted


@pytest.mark.timeout(30)
def test_posts_into_slots_reserved_earlier_may_take_the_broker_past_max_memory(broker_factory):
    broker = broker_factory(max_memory=8192, max_message_size=1024)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.url)

    def request(frames):
        sock.send_multipart(frames)
        assert sock.poll(5000), "no reply"
        reply = sock.recv_multipart()
        return reply[0], msgpack.unpackb(reply[1], raw=False)

    try:
        assert request([V + b"HELLO", pack({"id": 1, "client": "memprobe1"})])[0] == V + b"OK"
        verb, header = request([V + b"RESERVE", pack({"id": 2, "ch": "slots", "cap": 100, "want": 20})])
        assert (verb, header["grant"]) == (V + b"OK", 20)  # granted while memory was free
        bodies = [pack({"type": "m", "pad": b"x" * 900}) for _ in range(20)]
        sock.send_multipart([V + b"POST", pack({"ch": "slots", "exp": 60.0}), *bodies])
        verb, stats = request([V + b"STATS", pack({"id": 3})])
        assert stats["queued"] == 20
        assert stats["bytes_held"] > stats["max_memory"] == 8192
        verb, header = request([V + b"SEND", pack({"id": 4, "ch": "other", "cap": 10, "exp": 60.0}), bodies[0]])
        assert (verb, header["code"]) == (V + b"ERROR", "memory")  # while above it, sends are refused
    finally:
        sock.close(linger=0)


# -- slow receivers -----------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_receiver_that_stops_reading_holds_back_at_most_its_receive_window(broker):
    with Client(broker.url, receive_window=5) as stuck, Client(broker.url) as worker, \
            Client(broker.url) as producer:
        for receiver in (stuck, worker):
            with pytest.raises(ReceiveTimeout):
                receiver.receive("jobs", timeout=0.05)  # becomes a receiver of "jobs"
            receiver.ping()  # (its credit has reached the broker)
        for i in range(30):
            producer.send("jobs", {"type": "job", "i": i})
        got = drain(worker, "jobs")
        assert len(got) >= 25  # the stuck one holds at most its window of 5
        stuck.close()  # it leaves without taking them: they go back to the channel
        got += drain(worker, "jobs")
        assert sorted(got) == list(range(30))


BLOCKED_LOOP = """
import asyncio, sys, time
sys.path.insert(0, {root!r})
from clients import AsyncClient

async def main():
    async with AsyncClient({url!r}) as bus:
        await bus.group_add("room", bus.new_channel())
        print("joined", flush=True)
        time.sleep(5)  # a handler that blocks the event loop: no heartbeat leaves meanwhile
        await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_an_async_client_whose_loop_is_blocked_past_three_heartbeats_is_forgotten(broker):
    child = spawn(BLOCKED_LOOP.format(root=ROOT, url=broker.url))
    try:
        assert child.stdout.readline().strip() == "joined"
        blocked = time.monotonic()
        with Client(broker.url) as observer:
            while observer.stats()["top_groups"]:  # forgotten: its channel left the group
                assert time.monotonic() - blocked < 4.9, "still a member while its loop was blocked"
                time.sleep(0.05)
            assert time.monotonic() - blocked > 2.9  # not before 3 heartbeats of silence
    finally:
        stop(child)
