"""What every role of the core benchmark shares: names, the payload, talking to the parent."""

from __future__ import annotations

import json
import math
import sys
import time

PAYLOAD_SIZE = 64
HOST = "127.0.0.1"
REF_SENDER, REF_RECEIVER = b"send", b"recv"
TP_CHANNEL, PING_CHANNEL, PONG_CHANNEL = "bench.tp", "bench.ping", "bench.pong"
RECV_POLL_MS = 200  # receive timeout of one blocking step; every loop also checks its deadline


def make_message(seq: int) -> dict:
    """The benchmark message; serialised with msgpack it is exactly PAYLOAD_SIZE bytes."""
    return {"type": "bench", "seq": seq.to_bytes(8, "big"), "pad": b"p" * 32}


def payload_template() -> tuple[bytearray, int]:
    """The serialised message as a bytearray and the offset of its 8 sequence bytes."""
    import msgpack

    body = msgpack.packb(make_message(0), use_bin_type=True)
    assert len(body) == PAYLOAD_SIZE, len(body)
    offset = msgpack.packb({"type": "bench", "seq": b""}, use_bin_type=True).__len__()
    assert body[offset:offset + 8] == bytes(8)
    return bytearray(body), offset


def curve_client(args) -> list[tuple[int, bytes]]:
    """The CURVE socket options of a raw pyzmq client (none without ``--secret-key``): its own
    key pair from ``args.secret_key`` and the server's public key from ``args.server_key``."""
    if not getattr(args, "secret_key", None):
        return []
    import zmq
    import zmq.auth

    public, secret = zmq.auth.load_certificate(args.secret_key)
    server, _ = zmq.auth.load_certificate(args.server_key)
    return [(zmq.CURVE_SERVERKEY, server), (zmq.CURVE_PUBLICKEY, public), (zmq.CURVE_SECRETKEY, secret)]


def curve_server(args) -> list[tuple[int, object]]:
    """The CURVE socket options of the raw forwarder (none without ``--secret-key``). No ZAP
    handler runs, so libzmq lets any client key in: the handshake, once per connection, is the
    only place the broker's key check would differ, and it is not timed."""
    if not getattr(args, "secret_key", None):
        return []
    import zmq
    import zmq.auth

    _, secret = zmq.auth.load_certificate(args.secret_key)
    return [(zmq.CURVE_SERVER, 1), (zmq.CURVE_SECRETKEY, secret)]


def emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def wait_word(word: str) -> None:
    """Block until the parent writes ``word`` on our stdin (EOF means the parent is gone)."""
    while True:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit(3)
        if line.strip() == word:
            return


def percentiles(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0, "p50": None, "p99": None}
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return {"n": len(ordered), "p50": rank(0.50), "p99": rank(0.99)}


class RoundTrips:
    """What a round-trip sender measures: ``args.warmup`` unmeasured round trips, then
    ``args.rtt`` timed ones; it stops early once the monotonic clock passes ``deadline``.
    A round trip starts at ``clock()``; ``took`` ends it."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, args, deadline: float | None = None) -> None:
        self.count, self.warmup, self.deadline = args.rtt + args.warmup, args.warmup, deadline
        self.samples: list[float] = []

    def __iter__(self):
        for seq in range(self.count):
            if self.deadline is not None and time.monotonic() > self.deadline:
                return
            yield seq

    def took(self, seq: int, start: float) -> None:
        if seq >= self.warmup:
            self.samples.append(time.perf_counter() - start)

    def report(self) -> None:
        emit(rtt=percentiles(self.samples))


class Arrivals:
    """What a throughput receiver counts: messages, and jumps in their sequence numbers."""

    def __init__(self) -> None:
        self.count = self.disorder = self.expected = 0

    def see(self, seq: int) -> None:
        if seq != self.expected:
            self.disorder += 1
        self.expected = seq + 1
        self.count += 1

    def report(self) -> None:
        emit(received=self.count, t_end=time.monotonic(), disorder=self.disorder)
