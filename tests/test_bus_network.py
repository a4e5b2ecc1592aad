"""Endpoints: wildcard binds, the advertised publisher, and the ``channelbus broker`` process."""

from __future__ import annotations

import os
import signal
import socket

import msgpack
import pytest
import zmq

from clients import BrokerUnavailable, Client

ANY = "tcp://0.0.0.0:*"


def free_port() -> int:
    """A TCP port nothing listens on (the OS picks it; closed again at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hello(url: str) -> dict:
    """The header of the broker's reply to a HELLO on a raw DEALER socket."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    try:
        sock.connect(url)
        sock.send_multipart([bytes([1]) + b"HELLO", msgpack.packb({"id": 1, "client": "probe1234"})])
        assert sock.poll(5000), "no reply to HELLO"
        verb, header = sock.recv_multipart()[:2]
        assert verb == bytes([1]) + b"OK"
        return msgpack.unpackb(header)
    finally:
        sock.close(linger=0)


def assert_group_round_trip(url: str, **settings) -> None:
    """group_add (which waits for a marker on the publisher) and group_send both work."""
    with Client(url, **settings) as bus:
        me = bus.new_channel()
        bus.group_add("reach", me)
        bus.group_send("reach", {"type": "reach"})
        assert bus.receive(me, timeout=5) == {"type": "reach"}


@pytest.mark.timeout(30)
def test_wildcard_publisher_is_dialled_on_the_host_the_client_used(broker_factory):
    broker = broker_factory(bind=ANY, pub_bind=ANY, insecure=True)
    assert broker.url.startswith("tcp://127.0.0.1:")
    assert hello(broker.url)["pub"].startswith("tcp://0.0.0.0:")
    assert_group_round_trip(broker.url)


@pytest.mark.timeout(30)
def test_star_wildcard_publisher_is_dialled_on_the_host_the_client_used(broker_factory):
    broker = broker_factory(bind="tcp://*:*", pub_bind="tcp://*:*", insecure=True)
    assert hello(broker.url)["pub"].startswith("tcp://[::]:")
    assert_group_round_trip(broker.url)


@pytest.mark.timeout(30)
def test_ipv6_loopback_endpoints_work(broker_factory):
    broker = broker_factory(bind="tcp://[::1]:*", pub_bind="tcp://[::1]:*")
    assert broker.url.startswith("tcp://[::1]:")
    assert hello(broker.url)["pub"].startswith("tcp://[::1]:")
    assert_group_round_trip(broker.url)


@pytest.mark.timeout(30)
def test_ipv4_binds_are_reported_in_ipv4_form(broker, broker_process):
    # ZeroMQ with IPV6 on reports tcp://[::ffff:127.0.0.1]:port; clients must not see that.
    assert broker.server.endpoint.startswith("tcp://127.0.0.1:")
    assert hello(broker.url)["pub"] == broker.server.pub_endpoint
    assert broker.server.pub_endpoint.startswith("tcp://127.0.0.1:")
    assert broker_process.url.startswith("tcp://127.0.0.1:")
    assert hello(broker_process.url)["pub"].startswith("tcp://127.0.0.1:")
    assert "without keys" not in broker_process.stderr_path.read_text()


@pytest.mark.timeout(30)
def test_advertise_overrides_the_publisher_endpoint(broker_factory):
    port = free_port()
    advertised = f"tcp://127.0.0.2:{port}"  # loopback too, but not the host the client dials
    broker = broker_factory(bind=ANY, pub_bind=f"tcp://0.0.0.0:{port}", advertise=advertised, insecure=True)
    assert hello(broker.url)["pub"] == advertised
    assert_group_round_trip(broker.url)


@pytest.mark.timeout(30)
def test_client_dials_the_advertised_publisher_even_when_it_is_wrong(broker_factory):
    broker = broker_factory(advertise=f"tcp://127.0.0.1:{free_port()}")
    with Client(broker.url, timeout=1) as bus:
        bus.send("direct", {"type": "t"})  # commands still work
        assert bus.receive("direct", timeout=5) == {"type": "t"}
        with pytest.raises(BrokerUnavailable, match="marker"):
            bus.group_add("unreachable", bus.new_channel())


@pytest.mark.timeout(30)
def test_cli_broker_advertise_flag_overrides_the_publisher_endpoint(broker_process_factory):
    port = free_port()
    advertised = f"tcp://127.0.0.2:{port}"
    broker = broker_process_factory("--bind", ANY, "--pub-bind", f"tcp://0.0.0.0:{port}",
                                    "--advertise", advertised, "--insecure")
    assert broker.url.startswith("tcp://127.0.0.1:")
    assert hello(broker.url)["pub"] == advertised
    assert_group_round_trip(broker.url)


@pytest.mark.timeout(30)
def test_cli_broker_serves_clients_and_exits_0_on_sigterm(broker_process):
    assert hello(broker_process.url)["pub"] == broker_process.pub_url
    assert_group_round_trip(broker_process.url)
    os.kill(broker_process.process.pid, signal.SIGTERM)
    assert broker_process.process.wait(10) == 0
    stderr = broker_process.stderr_path.read_text()
    assert "stopped" in stderr
