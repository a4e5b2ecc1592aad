"""Python work per message, counted: the bytecodes the broker runs per hop (a POST in, its MSG
out) and an AsyncClient per round trip (a send, then the answer received), in a ping-pong of
two AsyncClients through a real broker on loopback.

The count swings much less than a time with the host's load, so it ranks changes to the hot
path that the wall clock cannot rank on a busy machine (docs/performance.md). It is not a speed:
what a bytecode costs varies several times over with the caches. Counting uses
``sys.settrace`` with opcode events, which slows the traced process about fiftyfold, so each
side is counted in its own run while the other runs at full speed. A traced process is slow
enough to take some time-dependent paths more or less often than a real one (the client's 2 ms
acknowledgement timer fires more often; which of two events comes first can change), so read a
change to such a path with care.

    python benchmarks/bytecodes.py               # both counts and the top functions
    python benchmarks/bytecodes.py --rtt 500 --top 0
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import threading

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCHMARKS)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PING, PONG = "bytecodes.ping", "bytecodes.pong"
MESSAGE = {"type": "bench", "seq": b"12345678", "pad": b"p" * 32}  # 64 bytes, as the core bench
WARMUP = 200


class Counter:
    """A tracer that counts executed bytecodes (and calls) per function while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.ops: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def trace(self, frame, event, arg):
        if event == "call":
            frame.f_trace_opcodes = True
            if self.on:
                self.calls[self._where(frame)] += 1
        elif event == "opcode" and self.on:
            self.ops[self._where(frame)] += 1
        return self.trace

    @staticmethod
    def _where(frame) -> str:
        code = frame.f_code
        return f"{os.path.relpath(code.co_filename, ROOT) if code.co_filename.startswith(ROOT) else os.path.basename(code.co_filename)}:{code.co_name}"

    def report(self, label: str, per: int, top: int) -> dict:
        total = sum(self.ops.values())
        print(f"{label}: {total / per:,.0f} bytecodes, {sum(self.calls.values()) / per:.1f} Python calls")
        for where, n in self.ops.most_common(top):
            print(f"  {n / per:7.1f}  {self.calls[where] / per:5.2f} calls  {where}")
        return {"bytecodes": total / per, "calls": sum(self.calls.values()) / per}


async def _client(url: str, role: str, rtt: int, counter: Counter | None) -> None:
    from clients import AsyncClient

    async with AsyncClient(url, capacity=10_000, timeout=30) as client:
        if role == "pong":
            print("ready", flush=True)
            for _ in range(rtt + WARMUP):
                await client.send(PONG, await client.receive(PING, timeout=60))
            return
        for n in range(rtt + WARMUP):
            if n == WARMUP:
                print("warm", flush=True)
                if counter is not None:
                    counter.on = True
                    sys.settrace(counter.trace)
            await client.send(PING, MESSAGE)
            await client.receive(PONG, timeout=60)
        sys.settrace(None)
        if counter is not None:
            counter.on = False


def _child(args) -> None:
    """A client process: ``pong``, or ``ping`` (counted if ``--count``)."""
    counter = Counter() if args.count else None
    asyncio.run(_client(args.url, args.role, args.rtt, counter))
    if counter is not None:
        counter.report("client, per round trip", args.rtt, args.top)


def _spawn(url: str, role: str, rtt: int, top: int, count: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", role, "--url", url, "--rtt", str(rtt),
           "--top", str(top)] + (["--count"] if count else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _run(args, count_broker: bool) -> None:
    """One ping-pong through a broker in a thread of this process; count the broker (its
    thread) or the ping client (its process)."""
    from broker.config import BrokerConfig
    from broker.server import start_in_thread

    counter = Counter()
    if count_broker:
        threading.settrace(counter.trace)  # (the broker thread, started next, is traced)
    server, thread = start_in_thread(BrokerConfig(bind="tcp://127.0.0.1:*", pub_bind="tcp://127.0.0.1:*"))
    threading.settrace(None)
    procs = []
    try:
        pong = _spawn(server.endpoint, "pong", args.rtt, args.top)
        procs.append(pong)
        if pong.stdout.readline().strip() != "ready":
            raise SystemExit("the pong client did not start")
        ping = _spawn(server.endpoint, "ping", args.rtt, args.top, count=not count_broker)
        procs.append(ping)
        if ping.stdout.readline().strip() != "warm":
            raise SystemExit("the ping client did not start")
        counter.on = count_broker  # (from here the broker's hops are counted: 2 per round trip)
        out, _ = ping.communicate(timeout=args.timeout)
        counter.on = False
        if ping.returncode:
            raise SystemExit(f"the ping client failed ({ping.returncode})")
        if count_broker:
            counter.report("broker, per hop", 2 * args.rtt, args.top)
        else:
            sys.stdout.write(out)
        pong.wait(args.timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        server.stop()
        thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt", type=int, default=1000, help="counted round trips (default 1000)")
    parser.add_argument("--top", type=int, default=15, help="functions listed per count (default 15)")
    parser.add_argument("--timeout", type=float, default=300, help="limit per run in seconds (default 300)")
    parser.add_argument("--child", choices=["ping", "pong"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.role = args.child
        _child(args)
        return
    _run(args, count_broker=True)
    _run(args, count_broker=False)


if __name__ == "__main__":
    main()
