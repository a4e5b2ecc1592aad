"""Several brokers as shards: placement, group members across brokers, a client that lists the
brokers in another order, faults that stay local, and stats over all of them. Real brokers:
threads where the test is about placement, processes where one is killed and restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest

from clients import AsyncClient, BrokerError, BrokerUnavailable, BusError, Client
from clients.placement import broker_of_channel, broker_of_group
from clients.shards import ShardedAsyncClient, ShardedClient
from test_security import channelbus, keys  # noqa: F401 (keys: the fixture)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def three(broker_factory):
    return [broker_factory() for _ in range(3)]


def urls_of(brokers) -> list[str]:
    return [b.url for b in brokers]


def test_each_name_goes_to_its_broker_and_comes_back(three):
    urls = urls_of(three)
    names = [f"job.{n}" for n in range(60)]
    with Client(urls) as sender, Client(",".join(urls)) as receiver:
        assert isinstance(sender, ShardedClient) and isinstance(receiver, ShardedClient)
        for n, name in enumerate(names):
            sender.send(name, {"type": "job", "n": n})
        expected = [0, 0, 0]
        for name in names:
            expected[broker_of_channel(name, 3)] += 1
        assert [b.stats["received"] for b in three] == expected
        assert all(count > 0 for count in expected)

    async def take_all():
        async with AsyncClient(urls) as bus:
            assert isinstance(bus, ShardedAsyncClient)
            return [(await bus.receive(name, timeout=5))["n"] for name in names]

    assert asyncio.run(take_all()) == list(range(60))


def test_a_process_specific_channel_gets_group_messages_from_groups_on_every_broker(three):
    urls = urls_of(three)
    groups = [f"room.{n}" for n in range(12)]
    assert {broker_of_group(g, 3) for g in groups} == {0, 1, 2}
    with Client(urls) as member, Client(urls) as sender:
        me = member.new_channel()
        for group in groups:
            member.group_add(group, me)
        for group in groups:
            sender.group_send(group, {"type": "hello", "group": group})
        sender.send(me, {"type": "direct"})
        got = [member.receive(me, timeout=5) for _ in range(13)]
    assert sorted(m.get("group", "") for m in got) == sorted(["", *groups])

    async def async_member():
        async with AsyncClient(urls) as bus, AsyncClient(urls) as other:
            me = bus.new_channel()
            for group in groups:
                await bus.group_add(group, me)
            for group in groups:
                await other.group_send(group, {"type": "hello", "group": group}, wait=False)
            return sorted([(await bus.receive(me, timeout=5))["group"] for _ in groups])

    assert asyncio.run(async_member()) == sorted(groups)


def test_a_normal_channel_joins_only_groups_on_its_own_broker(three):
    urls = urls_of(three)
    channel = "inbox.normal"
    home = broker_of_channel(channel, 3)
    same = next(g for g in (f"g{n}" for n in range(100)) if broker_of_group(g, 3) == home)
    other = next(g for g in (f"g{n}" for n in range(100)) if broker_of_group(g, 3) != home)
    with Client(urls) as bus:
        bus.group_add(same, channel)
        bus.group_send(same, {"type": "to.normal"})
        assert bus.receive(channel, timeout=5) == {"type": "to.normal"}
        with pytest.raises(BusError, match="only process-specific channels"):
            bus.group_add(other, channel)


def test_a_client_that_lists_the_brokers_in_another_order_is_told(three):
    urls = urls_of(three)
    with Client(urls) as first:
        first.ping()
        with pytest.raises(BrokerError) as caught:
            Client([urls[1], urls[0], urls[2]], timeout=5)
        assert caught.value.code == "wrong-shard"
        assert "same brokers in the same order" in str(caught.value)
        first.send("still.fine", {"type": "x"})


def free_ports(count: int) -> list[int]:
    ports = []
    for _ in range(count):
        with socket.create_server(("127.0.0.1", 0)) as probe:
            ports.append(probe.getsockname()[1])
    return ports


def test_faults_stay_local_and_a_broker_that_comes_back_gets_its_registrations_again(broker_process_factory):
    ports = free_ports(6)
    args = [("--bind", f"tcp://127.0.0.1:{ports[2 * i]}", "--pub-bind", f"tcp://127.0.0.1:{ports[2 * i + 1]}")
            for i in range(3)]
    brokers = [broker_process_factory(*a) for a in args]
    urls = [b.url for b in brokers]
    victim = 1
    on = {i: [n for n in (f"w{k}" for k in range(200)) if broker_of_channel(n, 3) == i][:5] for i in range(3)}
    group = next(g for g in (f"g{k}" for k in range(100)) if broker_of_group(g, 3) == victim)
    with Client(urls, timeout=2) as bus:
        me = bus.new_channel()
        bus.group_add(group, me)
        brokers[victim].process.send_signal(signal.SIGKILL)
        brokers[victim].process.wait(5)
        start = time.monotonic()
        for i in (0, 2):  # the other brokers' names keep working
            for name in on[i]:
                bus.send(name, {"type": "alive", "name": name})
                assert bus.receive(name, timeout=5)["name"] == name
        assert time.monotonic() - start < 2  # (at full speed: no wait on the dead broker)
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            bus.send(on[victim][0], {"type": "lost"})
        assert time.monotonic() - start < 4  # (within the timeout, 2 s)
        broker_process_factory(*args[victim])  # back, on the same ports, knowing nothing
        deadline = time.monotonic() + 15
        while True:  # (the client reconnects and replays its membership there)
            try:
                bus.group_send(group, {"type": "back"})
                break
            except BrokerUnavailable:
                assert time.monotonic() < deadline
        assert bus.receive(me, timeout=10) == {"type": "back"}
        bus.send(on[victim][0], {"type": "again"})
        assert bus.receive(on[victim][0], timeout=5) == {"type": "again"}


def test_stats_shows_each_broker_and_the_totals(three):
    urls = urls_of(three)
    with Client(urls) as bus:
        for n in range(30):
            bus.send(f"s.{n}", {"type": "s"})
        figures = bus.stats()
    assert [b["url"] for b in figures["brokers"]] == urls
    assert figures["counters"]["received"] == 30 == sum(b["counters"]["received"] for b in figures["brokers"])
    shown = channelbus("stats", "--broker", ",".join(urls), "--timeout", "5")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("channelbus, 3 brokers (totals):")
    assert "received 30," in shown.stdout
    for index, url in enumerate(urls):
        assert any(line.startswith(f"broker {index + 1} {url}:") for line in lines)


def test_a_sharded_bus_with_curve_keys_one_per_broker(keys, broker_factory):  # noqa: F811
    """Each broker its own key pair; the client's server_key lists them in the brokers' order."""
    import zmq.auth

    brokers, publics = [], []
    for n in range(2):
        zmq.auth.create_certificates(str(keys.root), f"broker{n}")
        brokers.append(broker_factory(secret_key=str(keys.root / f"broker{n}.key_secret"),
                                      authorized_keys=str(keys.authorized)))
        publics.append(str(keys.root / f"broker{n}.key"))
    urls = urls_of(brokers)
    secret = keys.client("web")["secret_key"]
    with Client(urls, secret_key=secret, server_key=publics) as bus:
        names = [f"key.channel.{n}" for n in range(20)]
        for name in names:
            bus.send(name, {"type": "k", "name": name})
        assert [bus.receive(name, timeout=5)["name"] for name in names] == names
        assert {broker_of_channel(name, 2) for name in names} == {0, 1}
    with pytest.raises(BusError, match="lists 1 keys for 2 brokers"):
        Client(urls, secret_key=secret, server_key=publics[:1])
