"""Bad input against a running broker (a raw DEALER speaking wrong frames) and the errors a
client raises itself; a well-behaved client keeps working throughout."""

from __future__ import annotations

import asyncio
import socket
import time

import msgpack
import pytest
import zmq

from clients import (
    AsyncClient, BrokerUnavailable, BusError, Client, InvalidName, LimitExceeded,
    MessageTooLarge, ReceiveTimeout,
)

V = bytes([1])


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def free_port() -> int:
    """A TCP port nothing listens on (the OS picks it; closed again at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(sock: zmq.Socket, frames: list[bytes], timeout: float = 5.0) -> tuple[bytes, dict]:
    """Send frames; return the reply's verb and header (AssertionError if none comes)."""
    sock.send_multipart(frames)
    if not sock.poll(timeout * 1000):
        raise AssertionError(f"no reply to {frames!r} within {timeout} s")
    reply = sock.recv_multipart()
    return reply[0], msgpack.unpackb(reply[1], raw=False)


def expect_error(sock, frames, code: str, *words: str, request_id=None) -> dict:
    verb, header = request(sock, frames)
    assert verb == V + b"ERROR", (verb, header)
    assert header["code"] == code, header
    for word in words:
        assert word in header["message"], (word, header["message"])
    assert header["id"] == request_id
    return header


def assert_client_works(bus: Client, i: int) -> None:
    bus.send("healthy", {"type": "check", "i": i})
    assert bus.receive("healthy", timeout=5) == {"type": "check", "i": i}


def send_frames(rid: int, channel="ok-channel", body=None, **header) -> list[bytes]:
    fields = {"id": rid, "ch": channel, "cap": 100, "exp": 60.0, **header}
    return [V + b"SEND", pack(fields), pack({"type": "t"}) if body is None else body]


@pytest.mark.timeout(60)
def test_bad_frames_get_error_replies_and_do_not_disturb_a_good_client(broker_factory):
    broker = broker_factory(max_message_size=1024)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.url)
    try:
        with Client(broker.url) as bus:
            cases = [
                # (frames, code, words in the message, request id echoed)
                ([b"\xde\xad\xbe\xef"], "bad-frame", ("verb frame and a header frame",), None),
                ([V + b"PING", b"\xc1\xc1"], "bad-header", ("not valid msgpack",), None),
                ([V + b"PING", pack([1, 2])], "bad-header", ("must be a msgpack map",), None),
                ([V + b"FROB", pack({"id": 7})], "unknown-verb", ("FROB", "known verbs"), 7),
                ([bytes([2]) + b"PING", pack({"id": 8})], "bad-version", ("version 2", "version 1"), None),
                ([b"", pack({"id": 9})], "bad-version", ("not supported",), None),
                ([V + b"PING", pack({"id": 10})], "no-hello", ("HELLO",), 10),
            ]
            for i, (frames, code, words, rid) in enumerate(cases):
                expect_error(sock, frames, code, *words, request_id=rid)
                assert_client_works(bus, i)

            verb, header = request(sock, [V + b"HELLO", pack({"id": 1, "client": "rawpeer1"})])
            assert verb == V + b"OK" and header["max_message_size"] == 1024

            after_hello = [
                (send_frames(11, channel="bad name"), "bad-name", ("ASCII letters", "'bad name'"), 11),
                (send_frames(12, channel="x" * 150), "bad-name", ("shorter than 100",), 12),
                (send_frames(13, channel="a!b!c"), "bad-name", ("at most one '!'",), 13),
                ([V + b"GADD", pack({"id": 14, "g": "room 1", "ch": "c", "gexp": 5.0})],
                 "bad-name", ("Group name",), 14),
                (send_frames(15, channel=7), "bad-name", ("7",), 15),
                (send_frames(16, body=pack({"type": "big", "data": b"x" * 2000})), "too-large",
                 ("1024",), 16),
                (send_frames(17, body=pack(["not", "a", "map"])), "bad-body", ("msgpack map",), 17),
                (send_frames(18, body=b""), "bad-body", ("msgpack map",), 18),
                (send_frames(19, body=b"\x93garbage"), "bad-body", ("msgpack map",), 19),
                (send_frames(20)[:2], "bad-frame", ("exactly one body frame",), 20),
                (send_frames(21, cap=0), "bad-value", ("'cap'",), 21),
                (send_frames(22, exp=-1), "bad-value", ("'exp'",), 22),
                (send_frames(23, cap="many"), "bad-value", ("'cap'",), 23),
                ([V + b"SEND", pack({"id": 24, "cap": 1, "exp": 1.0}), pack({"type": "t"})],
                 "bad-header", ("'ch'",), 24),
                ([V + b"ACK", pack({"acks": [1, 2]})], "bad-header", ("acks",), None),
                ([V + b"CREDIT", pack({"ch": "specific.abcd!x", "n": 1})], "bad-value",
                 ("process-specific",), None),
                (send_frames(25, cap=10**9), "limit", ("max-capacity",), 25),
            ]
            for i, (frames, code, words, rid) in enumerate(after_hello, start=len(cases)):
                header = expect_error(sock, frames, code, *words, request_id=rid)
                if code == "too-large":
                    assert header["limit"] == 1024 and header["size"] > 1024
                assert_client_works(bus, i)

            # A channel_capacity regex that could backtrack without bound is refused, not run:
            # against this member's name, '(a+)+$' would keep the broker busy for ages.
            verb, _ = request(sock, [V + b"GADD", pack({"id": 30, "g": "rx", "ch": "a" * 60 + "b", "gexp": 60.0})])
            assert verb == V + b"OK"
            gsend = {"id": 31, "g": "rx", "cap": 100, "exp": 60.0, "ccap": [["(a+)+$", 5]]}
            header = expect_error(sock, [V + b"GSEND", pack(gsend), pack({"type": "t"})], "bad-value",
                                  "repetition inside a repetition", "(a+)+$", request_id=31)
            assert header["limit"] == 3
            assert_client_works(bus, 99)

            # The raw peer is still served after its mistakes (it is under its budget).
            verb, header = request(sock, [V + b"PING", pack({"id": 99})])
            assert (verb, header["id"]) == (V + b"OK", 99)
    finally:
        sock.close(linger=0)


@pytest.mark.timeout(30)
def test_peer_over_its_bad_frame_budget_is_banned_and_others_are_not(broker_factory):
    broker = broker_factory(max_bad_frames=3)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.url)
    try:
        with Client(broker.url) as bus:
            for _ in range(3):
                expect_error(sock, [b"junk"], "bad-frame")
            expect_error(sock, [b"junk"], "banned", "more than 3 bad messages")
            sock.send_multipart([V + b"HELLO", pack({"id": 1, "client": "banned1"})])
            assert not sock.poll(300), "a banned peer was answered"
            assert_client_works(bus, 0)
    finally:
        sock.close(linger=0)


# -- errors the client raises itself ---------------------------------------------------------

@pytest.mark.timeout(30)
def test_invalid_names_raise_invalid_name_with_the_rule(broker):
    with Client(broker.url) as bus:
        attempts = [
            lambda: bus.send("has space", {"type": "t"}),
            lambda: bus.send("x" * 100, {"type": "t"}),
            lambda: bus.receive("bad/name", timeout=0.1),
            lambda: bus.group_add("bad group", "ok"),
            lambda: bus.group_add("ok", "bad channel"),
            lambda: bus.group_send("é", {"type": "t"}),
            lambda: bus.group_discard("ok", "a!b!c"),
            lambda: bus.new_channel("bad prefix"),
        ]
        for attempt in attempts:
            with pytest.raises(InvalidName) as caught:
                attempt()
            assert isinstance(caught.value, ValueError)
            assert "ASCII letters, digits, hyphens, underscores or periods" in str(caught.value)
        with pytest.raises(InvalidName, match="belongs to client"):
            bus.receive("specific.someoneelse!x", timeout=0.1)
        assert_client_works(bus, 0)


@pytest.mark.timeout(30)
def test_message_that_is_not_a_dict_raises_type_error(broker):
    with Client(broker.url) as bus:
        for message in (["type", "x"], "text", None, b"bytes"):
            with pytest.raises(TypeError, match="dict"):
                bus.send("typed", message)
            with pytest.raises(TypeError, match="dict"):
                bus.group_send("typed", message)
        with pytest.raises(ValueError, match="'type'"):
            bus.send("typed", {"no": "type"})
        with pytest.raises(TypeError, match="msgpack"):
            bus.send("typed", {"type": "t", "obj": object()})
        assert broker.stats["received"] == 0
        assert_client_works(bus, 0)


@pytest.mark.timeout(30)
def test_message_over_the_limit_raises_message_too_large_before_sending(broker_factory):
    broker = broker_factory(max_message_size=1024)
    with Client(broker.url) as bus:
        big = {"type": "big", "data": b"x" * 2000}
        with pytest.raises(MessageTooLarge) as caught:
            bus.send("large", big)
        assert caught.value.limit == 1024 and caught.value.size > 1024
        with pytest.raises(MessageTooLarge):
            bus.group_send("large", big)
        bus.ping()  # anything the client had sent would have reached the broker before this
        assert broker.stats["too_large"] == 0 and broker.stats["received"] == 0
        assert_client_works(bus, 0)


@pytest.mark.timeout(30)
def test_capacity_above_the_brokers_max_capacity_raises_limit_exceeded_at_connect(broker_factory):
    broker = broker_factory(max_capacity=50, max_expiry=10)
    for settings, name in (
        ({"capacity": 51}, "capacity"),
        ({"channel_capacity": {"big*": 500}}, "capacity"),
        ({"capacity": 50, "expiry": 11}, "expiry"),
    ):
        with pytest.raises(LimitExceeded) as caught:
            Client(broker.url, **settings)
        assert caught.value.name == name
        assert "max-" in str(caught.value)

    async def connect_async():
        with pytest.raises(LimitExceeded) as caught:
            async with AsyncClient(broker.url, capacity=51):
                pass
        assert caught.value.limit == 50

    asyncio.run(connect_async())
    with Client(broker.url, capacity=50, expiry=10) as bus:
        assert_client_works(bus, 0)


@pytest.mark.timeout(30)
def test_receive_with_a_timeout_raises_receive_timeout(broker):
    with Client(broker.url) as bus:
        start = time.monotonic()
        with pytest.raises(ReceiveTimeout) as caught:
            bus.receive("silent", timeout=0.2)
        elapsed = time.monotonic() - start
        assert 0.2 <= elapsed < 2.0
        assert isinstance(caught.value, TimeoutError)
        assert (caught.value.channel, caught.value.timeout) == ("silent", 0.2)


@pytest.mark.timeout(30)
def test_client_pointed_at_no_broker_raises_broker_unavailable_after_its_timeout():
    url = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        Client(url, timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 3.0
    assert caught.value.endpoint == url and caught.value.timeout == 0.5

    async def connect_async():
        client = AsyncClient(url, timeout=0.5)
        with pytest.raises(BrokerUnavailable):
            await client.send("x", {"type": "t"})
        with pytest.raises(BusError):  # a failed client stays failed; it does not hang
            await asyncio.wait_for(client.send("x", {"type": "t"}), 2)

    start = time.monotonic()
    asyncio.run(connect_async())
    assert 0.5 <= time.monotonic() - start < 3.0
