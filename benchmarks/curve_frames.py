"""What CurveZMQ costs libzmq per frame: the same messages over a TCP loopback socket pair in
one process, plain and with CURVE, with 1 and with 3 frames a message, in bulk and one at a time.

Usage::

    .venv/bin/python benchmarks/curve_frames.py [--messages N] [--rtt N] [--frames 1,3]
                                                [--size BYTES] [--batch N] [--repeat N]

Bulk: a PUSH sends ``--batch`` messages, then a PULL receives them, until ``--messages`` have
gone through. One at a time: ``--rtt`` round trips between two DEALERs, each message sent only
once the previous one has arrived (as in a ping-pong between processes, but with one Python
thread doing both ends, so no process has to be woken). The figures are the process's CPU time
(``time.process_time``: every thread, so libzmq's I/O thread, which encrypts and decrypts, too)
per message or per round trip, and the round trip's p50. Python does the same work with CURVE
on or off, so the difference between the two is libzmq's: encrypting each frame on one side and
decrypting it on the other (CurveZMQ boxes each frame of a multipart message on its own), and,
one at a time, whatever that does to the I/O threads' timing. The frames are ``--size`` bytes
each. The key pairs are made in memory (``zmq.curve_keypair``); no ZAP handler runs, so the keys
are not checked. Both ends are bound to 127.0.0.1 only.

This is the part of ``channelbus bench core``'s CURVE cost that no change to the bus's Python can
remove; docs/performance.md ("CURVE: the cost of encryption") compares the two.
"""

from __future__ import annotations

import argparse
import sys
import time

import zmq

HOST = "127.0.0.1"


def pair(ctx: zmq.Context, curve: bool, kinds=(zmq.PUSH, zmq.PULL)) -> tuple[zmq.Socket, zmq.Socket]:
    """A connected (client, server) of ``kinds``; with ``curve`` the server (bound) is the CURVE
    server."""
    push, pull = ctx.socket(kinds[0]), ctx.socket(kinds[1])
    for sock in (push, pull):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        pull.curve_server = True
        pull.curve_secretkey = server_secret
        push.curve_serverkey = server_public
        push.curve_publickey = client_public
        push.curve_secretkey = client_secret
    pull.bind(f"tcp://{HOST}:*")
    push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
    push.send(b"hello")  # (waits for the connection and the handshake)
    if not pull.poll(10_000):
        raise SystemExit("the socket pair did not connect within 10 s")
    pull.recv()
    return push, pull


def run(curve: bool, frames: int, size: int, messages: int, batch: int) -> dict:
    ctx = zmq.Context()
    try:
        push, pull = pair(ctx, curve)
        *head, last = [bytes([65 + i]) * size for i in range(frames)]
        send, recv, more = push.send, pull.recv, zmq.SNDMORE  # (send_multipart costs more Python)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        done = 0
        while done < messages:
            count = min(batch, messages - done)
            for _ in range(count):
                for frame in head:
                    send(frame, more)
                send(last)
            for _ in range(count * frames):
                recv()
            done += count
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        push.close(0)
        pull.close(0)
    finally:
        ctx.term()
    return {"cpu_us": cpu * 1e6 / messages, "msgs_per_s": messages / wall}


def ping_pong(curve: bool, frames: int, size: int, trips: int) -> dict:
    """``trips`` round trips between two DEALERs, one message at a time (after 200 unmeasured)."""
    ctx = zmq.Context()
    try:
        a, b = pair(ctx, curve, (zmq.DEALER, zmq.DEALER))
        *head, last = [bytes([65 + i]) * size for i in range(frames)]
        more, clock, samples = zmq.SNDMORE, time.perf_counter, []

        def trip(sender, receiver) -> None:
            for frame in head:
                sender.send(frame, more)
            sender.send(last)
            for _ in range(frames):
                receiver.recv()

        for _ in range(200):
            trip(a, b)
            trip(b, a)
        cpu0 = time.process_time()
        for _ in range(trips):
            start = clock()
            trip(a, b)
            trip(b, a)
            samples.append(clock() - start)
        cpu = time.process_time() - cpu0
        a.close(0)
        b.close(0)
    finally:
        ctx.term()
    samples.sort()
    return {"cpu_us": cpu * 1e6 / trips, "p50_us": samples[len(samples) // 2] * 1e6}


def _frames_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of frame counts such as 1,3") from None
    if not all(1 <= value <= 16 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: frame counts from 1 to 16")
    return values


def _alternate(repeat: int, run_one):
    """Run ``run_one(curve)`` ``repeat`` times each, plain and CURVE alternating (drift on the
    host hits both alike); return ``median(curve, key)``."""
    found: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(repeat):
        for curve in (False, True):
            found[curve].append(run_one(curve))

    def median(curve: bool, key: str) -> float:
        values = sorted(r[key] for r in found[curve])
        return values[len(values) // 2]

    return median


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000, help="messages per bulk run (default 200000)")
    parser.add_argument("--rtt", type=int, default=20_000, help="round trips per one-at-a-time run (default 20000)")
    parser.add_argument("--frames", type=_frames_list, default=[1, 3], metavar="N[,N...]",
                        help="frames per message, a row each (default 1,3)")
    parser.add_argument("--size", type=int, default=64, help="bytes per frame (default 64)")
    parser.add_argument("--batch", type=int, default=1000, help="messages sent before they are received (default 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each row, plain and CURVE alternating;"
                        " medians are shown (default 3)")
    opts = parser.parse_args(argv)
    if min(opts.messages, opts.rtt, opts.batch, opts.repeat) < 1 or opts.size < 0:
        parser.error("--messages, --rtt, --batch and --repeat must be at least 1, --size at least 0")
    print(f"CurveZMQ per frame: {opts.size}-byte frames, one process, CPU of all its threads;"
          f" libzmq {zmq.zmq_version()}, medians of {opts.repeat} (plain and CURVE alternating)")
    print(f"\nbulk, {opts.messages} messages (PUSH -> PULL over tcp://{HOST}, {opts.batch} at a time):")
    print(f"{'frames':>6}  {'plain CPU us/msg':>16}  {'CURVE CPU us/msg':>16}  {'CURVE - plain':>13}"
          f"  {'per frame':>9}  {'plain msgs/s':>12}  {'CURVE msgs/s':>12}")
    for frames in opts.frames:
        bulk = _alternate(opts.repeat, lambda curve: run(curve, frames, opts.size, opts.messages, opts.batch))
        plain, curve = bulk(False, "cpu_us"), bulk(True, "cpu_us")
        print(f"{frames:>6}  {plain:>16.2f}  {curve:>16.2f}  {curve - plain:>+13.2f}  {(curve - plain) / frames:>+9.2f}"
              f"  {bulk(False, 'msgs_per_s'):>12,.0f}  {bulk(True, 'msgs_per_s'):>12,.0f}")
    print(f"\none at a time, {opts.rtt} round trips (DEALER <-> DEALER over tcp://{HOST}; 2 messages a round trip):")
    print(f"{'frames':>6}  {'plain CPU us/rt':>15}  {'CURVE CPU us/rt':>15}  {'CURVE - plain':>13}"
          f"  {'per frame':>9}  {'plain p50 us':>12}  {'CURVE p50 us':>12}  {'p50 +us':>7}")
    for frames in opts.frames:
        trips = _alternate(opts.repeat, lambda curve: ping_pong(curve, frames, opts.size, opts.rtt))
        plain, curve = trips(False, "cpu_us"), trips(True, "cpu_us")
        print(f"{frames:>6}  {plain:>15.2f}  {curve:>15.2f}  {curve - plain:>+13.2f}"
              f"  {(curve - plain) / (2 * frames):>+9.2f}  {trips(False, 'p50_us'):>12.1f}"
              f"  {trips(True, 'p50_us'):>12.1f}  {trips(True, 'p50_us') - trips(False, 'p50_us'):>+7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
