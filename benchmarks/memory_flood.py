"""Memory flood: N messages to channels nobody reads; the broker's memory must stay flat.

Usage::

    .venv/bin/python benchmarks/memory_flood.py [--messages 1000000] [--senders 4]
        [--max-memory 8MiB] [--max-capacity 1000000] [--channels 100] [--body 100]
        [--window 500] [--max-growth-mib 16] [--mark 100000] [--timeout 300] [--json]

A ``channelbus broker`` process (loopback, ports from the OS) with a small ``--max-memory`` and a
high ``--max-capacity`` receives ``--messages`` SENDs spread over ``--channels`` channels that
nobody reads, from ``--senders`` processes. Each sender is a raw DEALER speaking the wire
protocol: it says HELLO and pipelines SENDs, keeping at most ``--window`` unanswered, and counts
the replies: OK (accepted) or ERROR by code (``memory`` once the ceiling is reached). Meanwhile
the parent samples the broker's resident memory (VmRSS in /proc/<pid>/status) every 20 ms.

Printed: accepted, refused by code, the rate, the broker's RSS before the flood, when ``--mark``
messages had been answered (the ceiling is long reached by then: with the defaults about 53,000
messages fill 8 MiB), at its peak after that and at the end, and ``growth`` = that peak minus
the mark. The run passes when every message was answered,
nothing but ``memory`` was refused, the broker's own count of bytes held never passed
``--max-memory`` and growth is under ``--max-growth-mib``; the exit status says so (0 pass, 1
fail, 2 could not run).

Every child is stopped by its PID at the end (SIGTERM, then SIGKILL); every loop is bounded in
count and time; loopback only. ``main(argv)`` is the entry point (``channelbus bench
memory_flood``); ``run(...)`` returns the figures as a dict, for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
READY_RE = re.compile(r"listening on (\S+), publishing on (\S+)")
MIB = 1024 * 1024


# -- sender (a child process) -------------------------------------------------------------------

def role_sender(args) -> None:
    """Pipelined SENDs from one raw DEALER; prints ``progress <answered>`` every 10,000 replies
    and a final JSON line with the counts."""
    sys.path.insert(0, ROOT)
    import msgpack
    import zmq

    from broker.protocol import wire

    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, args.client.encode())
    sock.setsockopt(zmq.RCVTIMEO, 200)
    sock.connect(args.url)
    sock.send_multipart(wire.Hello(1, args.client).frames())
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            verb, header = sock.recv_multipart()[:2]
            break
        except zmq.Again:
            if time.monotonic() > deadline:
                raise SystemExit("no reply to HELLO")
    assert verb == wire.OK, msgpack.unpackb(header)
    pad = b"p" * max(0, args.body - 30)
    send_verb = wire.verb_frame("SEND")
    ok_verb, error_verb = wire.OK, wire.ERROR
    counts = {"accepted": 0}
    sent = answered = 0
    recv, send, unpack = sock.recv_multipart, sock.send_multipart, msgpack.unpackb
    while answered < args.count and time.monotonic() < deadline:
        while sent < args.count and sent - answered < args.window:
            n = args.offset + sent
            header = msgpack.packb({"id": sent + 2, "ch": f"flood.{n % args.channels}", "cap": args.capacity,
                                    "exp": 3600.0})
            body = msgpack.packb({"type": "flood", "n": n, "pad": pad}, use_bin_type=True)
            send([send_verb, header, body])
            sent += 1
        try:
            frames = recv()
        except zmq.Again:
            continue
        if frames[0] == ok_verb:
            counts["accepted"] += 1
        elif frames[0] == error_verb:
            code = unpack(frames[1])["code"]
            counts[code] = counts.get(code, 0) + 1
        else:
            continue  # (the broker's heartbeats)
        answered += 1
        if answered % 10_000 == 0:
            print(f"progress {answered}", flush=True)
    print(json.dumps({"answered": answered, **counts}), flush=True)
    sock.close(0)
    context.term()


# -- parent --------------------------------------------------------------------------------------

def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _first_line(process: subprocess.Popen, timeout: float) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return process.stdout.readline().decode(errors="replace")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, by PID; reap it."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)


def run(messages: int = 1_000_000, senders: int = 4, max_memory: str = "8MiB",
        max_capacity: int = 1_000_000, channels: int = 100, body: int = 100, window: int = 500,
        max_growth_mib: float = 16.0, mark: int = 100_000, timeout: float = 300.0) -> dict:
    """Run the flood; return its figures (see the module docstring) with ``passed``."""
    children: list[subprocess.Popen] = []
    broker = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "broker", "--bind", "tcp://127.0.0.1:*",
         "--pub-bind", "tcp://127.0.0.1:*", "--max-memory", str(max_memory),
         "--max-capacity", str(max_capacity), "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    children.append(broker)
    try:
        match = READY_RE.search(_first_line(broker, 15))
        if not match:
            raise RuntimeError("the broker did not report ready")
        url = match.group(1).replace("0.0.0.0", "127.0.0.1")
        samples: list[tuple[float, int, int]] = []  # (time, answered so far, rss)
        answered = [0] * senders
        results: list[dict | None] = [None] * senders
        rss_before = rss(broker.pid)

        def follow(index: int, process: subprocess.Popen) -> None:
            for raw in process.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("progress "):
                    answered[index] = int(line.split()[1])
                elif line.startswith("{"):
                    results[index] = json.loads(line)

        share, extra = divmod(messages, senders)
        readers = []
        started = time.monotonic()
        offset = 0
        for index in range(senders):
            count = share + (1 if index < extra else 0)
            process = subprocess.Popen(
                [sys.executable, HERE, "--role", "sender", "--url", url, "--client", f"flood{index:04d}",
                 "--count", str(count), "--offset", str(offset), "--channels", str(channels),
                 "--capacity", str(max_capacity), "--body", str(body), "--window", str(window),
                 "--timeout", str(timeout)],
                cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
            )
            offset += count
            children.append(process)
            reader = threading.Thread(target=follow, args=(index, process), daemon=True)
            reader.start()
            readers.append(reader)
        deadline = started + timeout
        while any(p.poll() is None for p in children[1:]) and time.monotonic() < deadline:
            samples.append((time.monotonic() - started, sum(answered), rss(broker.pid)))
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        for reader in readers:
            reader.join(5)
        rss_end = rss(broker.pid)
        stats = _broker_stats(url)
    finally:
        for process in reversed(children):
            stop(process)
    totals: dict[str, int] = {}
    for result in results:
        for key, value in (result or {}).items():
            totals[key] = totals.get(key, 0) + value
    at_mark = next((r for t, n, r in samples if n >= mark), None)
    peak = max([r for t, n, r in samples if n >= mark] + [rss_end])
    growth = None if at_mark is None else peak - at_mark
    refused = {k: v for k, v in totals.items() if k not in ("answered", "accepted")}
    figures = {
        "messages": messages, "senders": senders, "max_memory": max_memory, "body": body,
        "answered": totals.get("answered", 0), "accepted": totals.get("accepted", 0), "refused": refused,
        "seconds": round(elapsed, 2), "rate": round(totals.get("answered", 0) / elapsed) if elapsed else 0,
        "rss_before_mib": round(rss_before / MIB, 1),
        "rss_at_mark_mib": None if at_mark is None else round(at_mark / MIB, 1), "mark": mark,
        "rss_peak_mib": round(peak / MIB, 1), "rss_end_mib": round(rss_end / MIB, 1),
        "growth_mib": None if growth is None else round(growth / MIB, 2),
        "bytes_held": stats.get("bytes_held"), "broker_max_memory": stats.get("max_memory"),
    }
    figures["passed"] = bool(
        figures["answered"] == messages and set(refused) <= {"memory"} and growth is not None
        and growth < max_growth_mib * MIB
        and stats.get("bytes_held") is not None and stats["bytes_held"] <= stats["max_memory"]
    )
    return figures


def _broker_stats(url: str) -> dict:
    sys.path.insert(0, ROOT)
    from clients import Client

    with Client(url, timeout=10) as client:
        return client.stats()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--max-memory", default="8MiB")
    parser.add_argument("--max-capacity", type=int, default=1_000_000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--body", type=int, default=100, help="approximate body size in bytes")
    parser.add_argument("--window", type=int, default=500, help="unanswered SENDs per sender")
    parser.add_argument("--max-growth-mib", type=float, default=16.0)
    parser.add_argument("--mark", type=int, default=100_000,
                        help="messages answered when the reference RSS is taken (the ceiling is reached by then)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    # child roles
    parser.add_argument("--role", choices=["sender"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--capacity", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "sender":
        role_sender(args)
        return 0
    try:
        figures = run(args.messages, args.senders, args.max_memory, args.max_capacity, args.channels,
                      args.body, args.window, args.max_growth_mib, args.mark, args.timeout)
    except Exception as exc:  # (could not run at all: say why)
        print(f"memory_flood: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>18}: {value}")
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
