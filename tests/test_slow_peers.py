"""Slow and stuck peers hurt no one else.

A receiver that stops reading — a Client in a process frozen with SIGSTOP (its ZeroMQ I/O thread
stops too, so the TCP connection backs up), or a raw DEALER that said HELLO, granted credit and
never reads — must not block the broker, other channels or other clients: they keep sending and
receiving at their normal speed, measured before and while the peer is stuck. The stuck
receiver's own channel fills to exactly its capacity and senders then get ChannelFull.

Every child process is stopped by its PID in ``finally`` (SIGCONT first, then SIGKILL).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import msgpack
import pytest
import zmq

from broker.config import BrokerConfig
from broker.protocol import wire
from broker.routing import Router
from broker.server import BATCH, BrokerServer
from broker.zio import recv_frames
from clients import ChannelFull, Client, ReceiveTimeout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUND_TRIPS = 200
# "Normal speed": the median round trip while a peer is stuck stays within this factor of the
# median before (or under FLOOR seconds, so that a sub-millisecond baseline on an idle machine
# does not turn scheduling noise into failures). A blocked broker would take seconds.
SLOWDOWN = 10
FLOOR = 0.005

STUCK_CLIENT = """
import sys, time
sys.path.insert(0, {root!r})
from clients import Client, ReceiveTimeout
with Client({url!r}) as bus:
    me = bus.new_channel()
    bus.group_add("room", me)
    try:
        bus.receive("stuck.jobs", timeout=0.01)  # a receiver of stuck.jobs now: credit granted
    except ReceiveTimeout:
        pass
    bus.ping()  # (the broker has the credit)
    print(me, flush=True)
    time.sleep(120)  # SIGSTOPped here by the test
"""


def first_line(child: subprocess.Popen, timeout: float = 15.0) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        assert selector.select(timeout), "the child process did not report"
    return child.stdout.readline().strip()


def stop_child(child: subprocess.Popen) -> None:
    """SIGCONT (a stopped process cannot act on anything else), then SIGKILL, by PID."""
    if child.poll() is None:
        os.kill(child.pid, signal.SIGCONT)
        os.kill(child.pid, signal.SIGKILL)
    child.wait(5)
    child.stdout.close()


def round_trips(bus: Client, channel: str, count: int = ROUND_TRIPS) -> list[float]:
    """Seconds each of ``count`` send-then-receive round trips through the broker took."""
    times = []
    for i in range(count):
        started = time.perf_counter()
        bus.send(channel, {"type": "rtt", "i": i})
        assert bus.receive(channel, timeout=5) == {"type": "rtt", "i": i}
        times.append(time.perf_counter() - started)
    return times


def group_round_trips(bus: Client, group: str, mine: str, count: int = ROUND_TRIPS) -> list[float]:
    times = []
    for i in range(count):
        started = time.perf_counter()
        bus.group_send(group, {"type": "rtt", "i": i})
        assert bus.receive(mine, timeout=5) == {"type": "rtt", "i": i}
        times.append(time.perf_counter() - started)
    return times


def assert_normal_speed(before: list[float], during: list[float], what: str) -> None:
    base, now = statistics.median(before), statistics.median(during)
    assert now <= max(SLOWDOWN * base, FLOOR), (
        f"{what}: median round trip {now * 1000:.2f} ms while a peer is stuck,"
        f" {base * 1000:.2f} ms before"
    )


def fill(bus: Client, channel: str, message: dict, limit: int) -> tuple[int, ChannelFull]:
    """Send until ChannelFull (at most ``limit`` sends); return how many were accepted."""
    for accepted in range(limit):
        try:
            bus.send(channel, {**message, "i": accepted})
        except ChannelFull as full:
            return accepted, full
    raise AssertionError(f"{channel} accepted {limit} messages and never became full")


def channel_counts(bus: Client, channel: str) -> tuple[int, int, int]:
    """(queued, in flight, reserved) of ``channel`` by the broker's STATS."""
    for name, queued, inflight, reserved in bus.stats(1000)["top_channels"]:
        if name == channel:
            return queued, inflight, reserved
    return 0, 0, 0


@pytest.mark.timeout(90)
def test_a_sigstopped_receiver_fills_only_its_own_channel_while_others_keep_their_speed(broker):
    child = subprocess.Popen(
        [sys.executable, "-c", STUCK_CLIENT.format(root=ROOT, url=broker.url)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        stuck_member = first_line(child)
        assert "!" in stuck_member
        with Client(broker.url, capacity=100) as producer, Client(broker.url) as other:
            mine = other.new_channel()
            other.group_add("room", mine)
            before = round_trips(other, "other.jobs")
            group_before = group_round_trips(other, "room", mine)

            os.kill(child.pid, signal.SIGSTOP)
            accepted, full = fill(producer, "stuck.jobs", {"type": "job", "pad": b"x" * 1000}, 1000)
            assert accepted == 100 and full.capacity == 100 and full.channel == "stuck.jobs"
            # Its receive window went out to it; the rest waits in the broker. (A STATS read in
            # the same burst as the last sends may see the pushes of that burst still to come.)
            deadline = time.monotonic() + 5
            while (counts := channel_counts(other, "stuck.jobs"))[1] < 64 and time.monotonic() < deadline:
                pass
            assert counts == (36, 64, 0)
            with pytest.raises(ChannelFull):
                producer.send("stuck.jobs", {"type": "job"})  # it stays full

            during = round_trips(other, "other.jobs")
            group_during = group_round_trips(other, "room", mine)  # the stopped member is in it too
            assert_normal_speed(before, during, "a channel of another client")
            assert_normal_speed(group_before, group_during, "a group the stopped process is in")
            assert child.poll() is None  # (still there, only stopped)
    finally:
        stop_child(child)


@pytest.mark.timeout(90)
def test_a_raw_dealer_that_never_reads_fills_its_channels_and_nobody_waits_for_it(broker):
    """The stuck peer is pushed far more than its socket buffers hold (its receive queue is one
    message and its kernel buffer small), so the rest waits in the broker's queue for it."""
    context = zmq.Context()
    stuck = context.socket(zmq.DEALER)
    for option, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 1), (zmq.RCVBUF, 4096),
                          (zmq.ROUTING_ID, b"stuck0001")):
        stuck.setsockopt(option, value)
    try:
        stuck.connect(broker.url)
        stuck.send_multipart(wire.Hello(1, "stuck0001").frames())
        assert stuck.poll(5000), "no reply to HELLO"
        assert stuck.recv_multipart()[0] == wire.OK
        stuck.send_multipart(wire.Credit("firehose", 100_000).frames())
        # From here on the stuck peer never reads again.
        with Client(broker.url, capacity=300) as producer, Client(broker.url) as other:
            before = round_trips(other, "other.jobs")
            big = {"type": "job", "pad": b"x" * 32_000}
            accepted, _ = fill(producer, "firehose", big, 5000)
            assert accepted == 300  # all pushed to it (credit), none acknowledged: full
            accepted, _ = fill(producer, "specific.stuck0001!box", big, 5000)
            assert accepted == 300  # its own channel: pushed to it without credit, then full
            # ~19 MB went its way: far more than its socket buffers hold.
            assert other.stats()["bytes_held"] >= 600 * 32_000
            during = round_trips(other, "other.jobs")
            assert_normal_speed(before, during, "a channel of another client")
            assert producer.ping() < 1.0
    finally:
        stuck.close(linger=0)
        context.term()


@pytest.mark.timeout(90)
def test_a_stuck_receiver_does_not_slow_the_other_receivers_of_its_channel(broker):
    """Receivers compete on one channel; one is frozen with its window in hand. Every message
    beyond that window goes to the live receiver, in order, and none waits for the frozen one."""
    child = subprocess.Popen(
        [sys.executable, "-c", STUCK_CLIENT.format(root=ROOT, url=broker.url)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        first_line(child)
        os.kill(child.pid, signal.SIGSTOP)
        with Client(broker.url, capacity=10_000) as producer, Client(broker.url) as live:
            with pytest.raises(ReceiveTimeout):  # live is a receiver of stuck.jobs now
                live.receive("stuck.jobs", timeout=0.05)
            live.ping()
            total, window = 2000, 64
            started = time.perf_counter()
            for i in range(total):
                producer.send("stuck.jobs", {"type": "job", "i": i})
            got = [live.receive("stuck.jobs", timeout=5)["i"] for _ in range(total - window)]
            elapsed = time.perf_counter() - started
            assert got == sorted(got), "the live receiver's messages came out of order"
            assert elapsed < 15, f"{total} messages took {elapsed:.1f} s with one receiver frozen"
            with pytest.raises(ReceiveTimeout):
                live.receive("stuck.jobs", timeout=0.2)  # the rest is in the frozen one's hands
            queued, inflight, _ = channel_counts(live, "stuck.jobs")
            assert (queued, inflight) == (0, window)
    finally:
        stop_child(child)


FLOODER = """
import sys, time
sys.path.insert(0, {root!r})
import zmq
from broker.protocol import wire
context = zmq.Context()
sock = context.socket(zmq.DEALER)
for option, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 1), (zmq.RCVBUF, 4096), (zmq.SNDHWM, 0),
                      (zmq.ROUTING_ID, b"flood0001")):
    sock.setsockopt(option, value)
sock.connect({url!r})
sock.send_multipart(wire.Hello(1, "flood0001").frames())
body = b"\\x81\\xa4type\\xa1x"
for i in range({count}):
    sock.send_multipart(wire.Send(i + 2, "flood.full", 1, 60.0, body).frames())
print("sent", flush=True)
time.sleep(120)  # and never reads a reply
"""
FLOOD = 300_000


@pytest.mark.timeout(120)
def test_a_peer_that_floods_requests_and_never_reads_the_replies_blocks_no_one(broker_process):
    """300,000 SENDs to a full channel: 300,000 ERROR replies of ~100 bytes, far more than the
    flooder's socket buffers and its queue at the broker hold, so the broker must drop replies
    (it logs how many, once per heartbeat) rather than wait for it."""
    with Client(broker_process.url) as other:
        before = round_trips(other, "other.jobs")
        child = subprocess.Popen(
            [sys.executable, "-c", FLOODER.format(root=ROOT, url=broker_process.url, count=FLOOD)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        try:
            during: list[float] = []
            deadline = time.monotonic() + 60
            refused = 0
            # Measured until the broker has refused nearly all of them. (Not all: the flooder's
            # own ZeroMQ may keep the last few while its receive side is blocked.)
            while refused < FLOOD * 0.99:
                assert time.monotonic() < deadline, f"the broker refused only {refused} in 60 s"
                during += round_trips(other, "other.jobs", 10)
                refused = other.stats()["counters"]["full"]
            # The flood is over; the flooder, stuck, still holds its full queue at the broker.
            after = round_trips(other, "other.jobs")
            assert child.poll() is None
        finally:
            stop_child(child)
        # While the broker works through 300,000 requests, others get their fair share of a
        # busy broker (it is not blocked: every round trip completes, most within milliseconds);
        # once it has, a peer that still does not read costs them nothing.
        assert len(during) >= 50, "the flood was over before it could be measured"
        assert statistics.median(during) < 0.05 and max(during) < 2.0, (statistics.median(during), max(during))
        assert_normal_speed(before, after, "a client beside a stuck peer with a full queue")
        other.ping()  # (one more heartbeat interval: the broker logs what it dropped)
    log = broker_process.stop() == 0 and broker_process.stderr_path.read_text()
    dropped = sum(int(n) for n in re.findall(r"(\d+) repl(?:y|ies) to b'flood0001' dropped", log))
    assert dropped > 0, "the flooder's queue never filled: the test did not reach the broker's limit"
    assert log.count("\n") < 200, "the broker logged every dropped reply"


class QueuedRouterSocket:
    """Stands in for the broker's ROUTER socket: hands out queued messages, keeps what is sent."""

    def __init__(self, messages: list[list[bytes]]) -> None:
        self.frames: list[tuple[bytes, bool]] = []
        self.queue(messages)
        self.sent: list[bytes] = []  # every frame sent, and the same as whole messages:
        self.parts, self.messages = [], []

    def recv(self, flags: int = 0, copy: bool = True):
        if not self.frames:
            raise zmq.Again()
        frame, more = self.frames.pop(0)
        return frame if copy else SimpleNamespace(bytes=frame, more=more)  # (a zmq.Frame's two)

    def get(self, option: int) -> int:
        assert option == zmq.EVENTS
        return zmq.POLLIN if self.frames else 0

    def send(self, frame: bytes, flags: int = 0) -> None:
        self.sent.append(frame)
        self.parts.append(frame)
        if not flags & zmq.SNDMORE:
            self.messages.append(self.parts)
            self.parts = []

    parts: list[bytes]
    messages: list[list[bytes]]

    def queue(self, messages: list[list[bytes]]) -> None:
        self.frames += [(frame, index < len(m) - 1) for m in messages for index, frame in enumerate(m)]


def test_a_burst_longer_than_the_brokers_read_batch_loses_no_message():
    """Found by the stuck-receiver test above: the broker read one message past each batch of
    BATCH and never handled it (one pipelined send in 256 vanished)."""
    pings = [wire.Ping(n).frames() for n in range(2, 3 * BATCH + 7)]
    sock = QueuedRouterSocket([[b"peer", *frames] for frames in [wire.Hello(1, "peer0001").frames(), *pings]])
    server = BrokerServer(BrokerConfig())
    server.router, server._commands, server._publisher = Router(), sock, QueuedRouterSocket([])
    while sock.frames:
        server._read_commands(recv_frames(sock))
    replies = [frame for frame in sock.sent if frame not in (b"peer", wire.OK)]
    assert sorted(msgpack.unpackb(reply)["id"] for reply in replies) == list(range(1, 3 * BATCH + 7))


def test_a_command_after_a_pause_is_pushed_alone_and_a_burst_as_one_msg():
    """After a pause the broker pushes what a command brought without asking whether more wait
    (what waits comes in the next batch); while busy it reads the burst first and pushes it as
    one MSG. (The pause is set through the time the last batch ended, not waited for.)"""
    body = [msgpack.packb({"type": "job", "n": n}) for n in range(5)]
    sock = QueuedRouterSocket([
        [b"taker", *wire.Hello(1, "taker001").frames()], [b"taker", *wire.Credit("jobs", 100).frames()],
        [b"giver", *wire.Hello(1, "giver001").frames()],
        [b"giver", *wire.Send(2, "jobs", 100, 60.0, body[0], want=10).frames()],  # reserves slots
    ])
    server = BrokerServer(BrokerConfig())
    server.router, server._commands, server._publisher = Router(), sock, QueuedRouterSocket([])
    while sock.frames:
        server._read_commands(recv_frames(sock))

    def pushed() -> list[list[bytes]]:
        msgs = [m[3:] for m in sock.messages if m[0] == b"taker" and m[1] == wire.MSG]
        sock.messages.clear()
        return msgs

    assert pushed() == [[body[0]]]
    sock.queue([[b"giver", *wire.Post("jobs", 60.0, (b,)).frames()] for b in body[1:]])
    server._idle_since = float("-inf")  # a long pause: one command, pushed at once
    server._read_commands(recv_frames(sock))
    assert pushed() == [[body[1]]]
    assert len(sock.frames) == 3 * 4  # the other three POSTs (4 frames each) still wait in the socket
    server._idle_since = float("inf")  # busy: the batch reads what waits, then pushes once
    server._read_commands(recv_frames(sock))
    assert pushed() == [body[2:]]
    assert not sock.frames
