"""Faults with real processes: broker kills and restarts, clients killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from clients import AsyncClient, BrokerUnavailable, Client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill(broker) -> None:
    os.kill(broker.process.pid, signal.SIGKILL)
    broker.process.wait(5)


def restart(broker_process_factory, broker):
    """A new broker on the killed one's endpoints."""
    return broker_process_factory("--bind", broker.url, "--pub-bind", broker.pub_url)


@pytest.mark.timeout(60)
def test_async_clients_reconnect_and_replay_after_the_broker_is_killed_and_restarted(broker_process_factory):
    broker = broker_process_factory()

    async def main():
        events = []
        async with AsyncClient(broker.url, timeout=5) as sender, AsyncClient(broker.url, timeout=5) as receiver:
            receiver.add_listener(events.append)
            mine = receiver.new_channel()
            await receiver.group_add("room", mine)
            await sender.send("jobs", {"type": "job", "n": 1})
            assert (await receiver.receive("jobs", timeout=5))["n"] == 1

            kill(broker)
            while "disconnected" not in events:  # the client sees the connection drop at once
                await asyncio.sleep(0.01)
            sender_events = []
            sender.add_listener(sender_events.append)
            with pytest.raises(asyncio.TimeoutError):  # while it is away, a send waits
                await asyncio.wait_for(sender.send("jobs", {"type": "job", "n": 2}), 0.5)
            restart(broker_process_factory, broker)

            while "reconnected" not in events:  # (announced once its memberships are live again)
                await asyncio.sleep(0.01)
            await sender.send("jobs", {"type": "job", "n": 3})  # nothing done by the application
            assert (await receiver.receive("jobs", timeout=5))["n"] == 3  # credit was replayed
            await sender.group_send("room", {"type": "chat"})
            assert (await receiver.receive(mine, timeout=5))["type"] == "chat"  # membership too
        return events

    events = asyncio.run(main())
    assert events[:2] == ["disconnected", "reconnected"]


@pytest.mark.timeout(60)
def test_blocking_clients_reconnect_and_replay_after_the_broker_is_killed_and_restarted(broker_process_factory):
    broker = broker_process_factory()
    with Client(broker.url, timeout=5) as sender, Client(broker.url, timeout=5) as receiver:
        events = []
        receiver.add_listener(events.append)
        mine = receiver.new_channel()
        receiver.group_add("room", mine)
        sender.send("jobs", {"type": "job", "n": 1})
        assert receiver.receive("jobs", timeout=5)["n"] == 1
        kill(broker)
        restart(broker_process_factory, broker)
        sender.send("jobs", {"type": "job", "n": 2})
        assert receiver.receive("jobs", timeout=5)["n"] == 2
        deadline = time.monotonic() + 5
        while "reconnected" not in events:  # (announced once its memberships are live again)
            assert time.monotonic() < deadline, events
            receiver.ping()
        assert events == ["disconnected", "reconnected"]
        sender.group_send("room", {"type": "chat"})
        assert receiver.receive(mine, timeout=5)["type"] == "chat"


@pytest.mark.timeout(30)
def test_a_send_while_the_broker_is_away_raises_after_the_timeout_and_reports_no_success(broker_process_factory):
    broker = broker_process_factory()
    with Client(broker.url, timeout=1.0) as sender:
        sender.send("jobs", {"type": "job"})
        kill(broker)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as caught:
            for _ in range(3):  # the first may be the one in flight as the connection dropped
                sender.send("jobs", {"type": "job"})
        assert time.monotonic() - started < 5
        assert broker.url in str(caught.value)


CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from clients import Client
with Client({url!r}) as bus:
    me = bus.new_channel()
    bus.group_add("room", me)
    print(me, flush=True)
    time.sleep(60)
"""


@pytest.mark.timeout(30)
def test_a_client_killed_with_sigkill_leaves_its_groups_within_three_seconds(broker):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=ROOT, url=broker.url)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert "!" in child.stdout.readline()
        with Client(broker.url) as observer:
            assert observer.stats()["top_groups"] == [["room", 1]]
            os.kill(child.pid, signal.SIGKILL)
            child.wait(5)
            killed = time.monotonic()
            while observer.stats()["top_groups"]:
                assert time.monotonic() - killed < 3.0, "the broker still counts the dead client's member"
                time.sleep(0.05)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


@pytest.mark.timeout(30)
def test_an_async_receive_then_send_sees_the_room_the_receive_made(broker):
    async def main():
        async with AsyncClient(broker.url, capacity=1) as bus:
            await bus.send("one", {"type": "a"})
            await bus.receive("one", timeout=5)
            await bus.send("one", {"type": "b"})  # its ACK went first: no false ChannelFull
            return (await bus.receive("one", timeout=5))["type"]

    assert asyncio.run(main()) == "b"


@pytest.mark.timeout(30)
def test_an_async_client_the_broker_forgot_says_hello_again_and_rejoins(broker):
    async def main():
        async with AsyncClient(broker.url, timeout=5) as member, AsyncClient(broker.url) as sender:
            events = []
            member.add_listener(events.append)
            mine = member.new_channel()
            await member.group_add("room", mine)
            time.sleep(3.5)  # the member's loop is blocked: no heartbeats, the broker forgets it
            await asyncio.sleep(1.5)  # its next heartbeat meets "no-hello": it rejoins
            deadline = time.monotonic() + 5
            while "reconnected" not in events:
                assert time.monotonic() < deadline, events
                await asyncio.sleep(0.05)
            await sender.group_send("room", {"type": "back"})
            return (await member.receive(mine, timeout=5))["type"]

    assert asyncio.run(main()) == "back"


@pytest.mark.timeout(60)
def test_a_blocking_clients_first_call_after_an_unnoticed_restart_works(broker_process_factory):
    broker = broker_process_factory()
    with Client(broker.url, timeout=5) as bus:
        bus.send("q", {"type": "before"})
        kill(broker)
        restart(broker_process_factory, broker)
        time.sleep(1.0)  # ZeroMQ reconnects meanwhile; the client makes no call
        bus.send("q", {"type": "after"})  # takes in the link events and says HELLO first
        assert bus.receive("q", timeout=5)["type"] == "after"
