"""Core benchmark: the bus against a raw pyzmq reference, sender and receiver in separate processes.

Usage::

    .venv/bin/python benchmarks/core.py [--messages N] [--rtt N] [--window W] [--timeout S]
                                        [--json] [--profile DIR]

One invocation runs two set-ups with the same 64-byte payload (a msgpack map
``{"type": "bench", "seq": <8 bytes>, "pad": <bytes>}`` that serialises to exactly 64 bytes):

(a) reference: a plain-Python forwarder process (ROUTER, ``ROUTER_MANDATORY``) that passes each
    message from the sender's DEALER to the receiver's DEALER by routing id, the receiver a
    DEALER in a third process. Throughput: N messages, timed from the sender's first send to the
    receiver's last receive. Round trip: ping-pong through the forwarder.
(b) bus: a real broker (``python -m consumers.cli broker`` on 127.0.0.1 with ports ``*``) and an
    ``AsyncClient`` in each of two processes. Throughput: N ``send`` calls to a normal channel of
    capacity ``--capacity`` from ``--window`` concurrent send loops (default 1: an awaiting
    sender, which the client pipelines with reserved slots; ``ChannelFull`` is retried with
    backoff while later sends wait), received and checked for order by the other process.
    Round trip: ping-pong over two normal channels.

The table also shows the CPU time (user + system, all threads, from /proc) each process spent per
message during the throughput phase: on a busy host it is steadier than the rates.

Every child is a subprocess of this one (``sys.executable`` running this file with ``--role``
or the broker CLI); each is stopped by its PID (SIGTERM, then SIGKILL) when it does not exit on
its own. Every loop is bounded in count and in time (``--timeout``). ``--profile DIR`` runs every
child under cProfile and writes ``DIR/<role>.prof``.

``main(argv)`` is the entry point for ``channelbus bench``; it returns an exit status.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
PAYLOAD_SIZE = 64
HOST = "127.0.0.1"
REF_SENDER, REF_RECEIVER = b"send", b"recv"
TP_CHANNEL, PING_CHANNEL, PONG_CHANNEL = "bench.tp", "bench.ping", "bench.pong"
RECV_POLL_MS = 200  # receive timeout of one blocking step; every loop also checks its deadline


# -- payload ----------------------------------------------------------------------------------

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


# -- child side -------------------------------------------------------------------------------

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


def role_forwarder(args) -> None:
    """Reference forwarder: [dest, payload] from src becomes [src, payload] to dest."""
    import zmq

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.RCVTIMEO, RECV_POLL_MS)
    router.setsockopt(zmq.SNDTIMEO, 5000)
    router.bind(f"tcp://{HOST}:*")
    emit(endpoint=router.getsockopt_string(zmq.LAST_ENDPOINT))
    deadline = time.monotonic() + args.timeout
    recv, send, again = router.recv_multipart, router.send_multipart, zmq.Again
    while not stop and time.monotonic() < deadline:
        try:
            src, dest, *rest = recv()
        except again:
            continue
        except ValueError:
            continue
        try:
            if dest == b"":  # registration: answer the sender itself
                send([src, b"", b"ok"])
            else:
                send([dest, src, *rest])
        except zmq.ZMQError:  # unknown or vanished destination, or its queue stuck for 5 s
            pass
    router.close(0)
    ctx.term()


def _ref_dealer(endpoint: str, identity: bytes):
    import zmq

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, identity)
    dealer.setsockopt(zmq.RCVTIMEO, RECV_POLL_MS)
    dealer.setsockopt(zmq.SNDTIMEO, 5000)
    dealer.connect(endpoint)
    deadline = time.monotonic() + 10
    dealer.send_multipart([b"", b"hi"])  # registers our routing id with the forwarder
    while True:
        try:
            dealer.recv_multipart()
            return ctx, dealer
        except zmq.Again:
            if time.monotonic() > deadline:
                raise SystemExit("forwarder did not answer")


def role_ref_receiver(args) -> None:
    import zmq

    ctx, dealer = _ref_dealer(args.endpoint, REF_RECEIVER)
    _, offset = payload_template()
    emit(ready=True)
    deadline = time.monotonic() + args.timeout
    count = disorder = expected = 0
    recv = dealer.recv_multipart
    while count < args.messages and time.monotonic() < deadline:
        try:
            frames = recv()
        except zmq.Again:
            continue
        seq = int.from_bytes(frames[1][offset:offset + 8], "big")
        if seq != expected:
            disorder += 1
        expected = seq + 1
        count += 1
    emit(received=count, t_end=time.monotonic(), disorder=disorder)
    total = args.rtt + args.warmup
    answered = 0
    while answered < total and time.monotonic() < deadline:
        try:
            src, body = recv()
        except zmq.Again:
            continue
        dealer.send_multipart([src, body])
        answered += 1
    emit(answered=answered)
    dealer.close(0)
    ctx.term()


def role_ref_sender(args) -> None:
    import zmq

    ctx, dealer = _ref_dealer(args.endpoint, REF_SENDER)
    buf, offset = payload_template()
    emit(ready=True)
    wait_word("go")
    deadline = time.monotonic() + args.timeout
    send = dealer.send_multipart
    t0 = time.monotonic()
    sent = 0
    try:
        for seq in range(args.messages):
            buf[offset:offset + 8] = seq.to_bytes(8, "big")
            send([REF_RECEIVER, bytes(buf)])
            sent += 1
            if not seq % 1024 and time.monotonic() > deadline:
                break
    except zmq.Again:
        pass
    emit(t0=t0, sent=sent, t_sent=time.monotonic())
    wait_word("go")
    samples = []
    clock = time.perf_counter
    for seq in range(args.rtt + args.warmup):
        if time.monotonic() > deadline:
            break
        buf[offset:offset + 8] = seq.to_bytes(8, "big")
        start = clock()
        send([REF_RECEIVER, bytes(buf)])
        try:
            dealer.recv_multipart()
        except zmq.Again:
            break
        if seq >= args.warmup:
            samples.append(clock() - start)
    emit(rtt=percentiles(samples))
    dealer.close(0)
    ctx.term()


async def _bus_client(args):
    from clients import AsyncClient, ReceiveTimeout

    client = AsyncClient(args.endpoint, capacity=args.capacity, expiry=60, timeout=10)
    await client.connect()
    return client, ReceiveTimeout


async def _grant(client, ReceiveTimeout, channel: str) -> None:
    """Start receiving ``channel`` (the client grants credit) and make sure the broker has it."""
    try:
        await client.receive(channel, timeout=0.001)
    except ReceiveTimeout:
        pass
    await client.ping()


async def _bus_receiver(args) -> None:
    client, ReceiveTimeout = await _bus_client(args)
    try:
        await _grant(client, ReceiveTimeout, TP_CHANNEL)
        await _grant(client, ReceiveTimeout, PING_CHANNEL)
        emit(ready=True)
        deadline = time.monotonic() + args.timeout
        count = disorder = expected = 0
        while count < args.messages and time.monotonic() < deadline:
            try:
                message = await client.receive(TP_CHANNEL, timeout=RECV_POLL_MS / 1000)
            except ReceiveTimeout:
                continue
            seq = int.from_bytes(message["seq"], "big")
            if seq != expected:
                disorder += 1
            expected = seq + 1
            count += 1
        emit(received=count, t_end=time.monotonic(), disorder=disorder)
        total = args.rtt + args.warmup
        answered = 0
        while answered < total and time.monotonic() < deadline:
            try:
                message = await client.receive(PING_CHANNEL, timeout=RECV_POLL_MS / 1000)
            except ReceiveTimeout:
                continue
            await client.send(PONG_CHANNEL, message)
            answered += 1
        emit(answered=answered)
    finally:
        await client.close()


async def _bus_sender(args) -> None:
    import asyncio

    from clients import ChannelFull

    client, ReceiveTimeout = await _bus_client(args)
    try:
        await _grant(client, ReceiveTimeout, PONG_CHANNEL)
        emit(ready=True)
        wait_word("go")  # blocks the loop on purpose: nothing is in flight yet
        deadline = time.monotonic() + args.timeout
        state = {"next": 0, "sent": 0, "retries": 0, "retrying": 0}
        gate = asyncio.Event()  # cleared while a ChannelFull is being retried: no new sends start
        gate.set()

        async def worker() -> None:
            while time.monotonic() < deadline:
                if not gate.is_set():
                    try:
                        await asyncio.wait_for(gate.wait(), max(0.001, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        return
                    continue
                seq = state["next"]
                if seq >= args.messages:
                    return
                state["next"] = seq + 1
                message = make_message(seq)
                pause, retrying = 0.001, False
                while True:
                    try:
                        await client.send(TP_CHANNEL, message)  # written to the socket in seq order
                        break
                    except ChannelFull:
                        # Retry the same message with backoff and hold back later ones, so order
                        # survives (sends already in flight can still overtake it: the receiver
                        # counts that as disorder) and retries do not flood the broker.
                        state["retries"] += 1
                        if not retrying:
                            retrying = True
                            state["retrying"] += 1
                            gate.clear()
                        if time.monotonic() > deadline:
                            return
                        await asyncio.sleep(pause)
                        pause = min(0.05, pause * 2)
                if retrying:
                    state["retrying"] -= 1
                    if not state["retrying"]:
                        gate.set()
                state["sent"] += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(max(1, args.window))))
        emit(t0=t0, sent=state["sent"], retries=state["retries"], t_sent=time.monotonic())
        wait_word("go")
        samples = []
        clock = time.perf_counter
        for seq in range(args.rtt + args.warmup):
            if time.monotonic() > deadline:
                break
            start = clock()
            await client.send(PING_CHANNEL, make_message(seq))
            try:
                await client.receive(PONG_CHANNEL, timeout=5)
            except ReceiveTimeout:
                break
            if seq >= args.warmup:
                samples.append(clock() - start)
        emit(rtt=percentiles(samples))
    finally:
        await client.close()


def role_bus_receiver(args) -> None:
    import asyncio

    asyncio.run(_bus_receiver(args))


def role_bus_sender(args) -> None:
    import asyncio

    asyncio.run(_bus_sender(args))


ROLES = {
    "forwarder": role_forwarder, "ref-receiver": role_ref_receiver, "ref-sender": role_ref_sender,
    "bus-receiver": role_bus_receiver, "bus-sender": role_bus_sender,
}


# -- parent side ------------------------------------------------------------------------------

class Child:
    """A subprocess speaking JSON lines on stdout; stopped by PID."""

    def __init__(self, name: str, argv: list[str], profile_dir: str | None, env: dict):
        self.name = name
        prefix = [sys.executable]
        if profile_dir:
            prefix += ["-m", "cProfile", "-o", os.path.join(profile_dir, f"{name}.prof")]
        self.proc = subprocess.Popen(
            prefix + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            cwd=ROOT, env=env,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, deadline: float, key: str | None = None, pattern: re.Pattern | None = None):
        """The next JSON line with ``key`` (or the match of ``pattern``); raise TimeoutError."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: nothing with {key or pattern.pattern!r} in time")
            try:
                line = self.lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                raise TimeoutError(f"{self.name} exited (status {self.proc.wait()}) before {key or pattern.pattern!r}")
            if pattern is not None:
                match = pattern.search(line)
                if match:
                    return match
                continue
            try:
                fields = json.loads(line)
            except ValueError:
                continue
            if isinstance(fields, dict) and key in fields:
                return fields

    def tell(self, word: str) -> None:
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def stop(self, grace: float = 5.0) -> None:
        """Wait ``grace`` seconds for a normal exit, then SIGTERM, then SIGKILL, by PID."""
        proc = self.proc
        for sig, wait in ((None, grace), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if proc.poll() is not None:
                break
            if sig is not None:
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


def _role_argv(role: str, endpoint: str, opts) -> list[str]:
    return [
        HERE, "--role", role, "--endpoint", endpoint, "--messages", str(opts.messages),
        "--rtt", str(opts.rtt), "--warmup", str(opts.warmup), "--window", str(opts.window),
        "--capacity", str(opts.capacity), "--timeout", str(opts.timeout),
    ]


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) a process has used so far; None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _run_pair(prefix: str, endpoint: str, opts, deadline: float, children: list, env: dict) -> dict:
    receiver = Child(f"{prefix}-receiver", _role_argv(f"{prefix}-receiver", endpoint, opts), opts.profile, env)
    children.append(receiver)
    sender = Child(f"{prefix}-sender", _role_argv(f"{prefix}-sender", endpoint, opts), opts.profile, env)
    children.append(sender)
    receiver.expect(deadline, "ready")
    sender.expect(deadline, "ready")
    middle = children[0]  # the forwarder or the broker
    roles = {"sender": sender, "middle": middle, "receiver": receiver}
    before = {role: cpu_seconds(child.proc.pid) for role, child in roles.items()}
    sender.tell("go")
    sent = sender.expect(deadline, "t0")
    got = receiver.expect(deadline, "received")
    after = {role: cpu_seconds(child.proc.pid) for role, child in roles.items()}
    cpu_us = {  # CPU time per message during the throughput phase: robust on a busy host
        role: (after[role] - before[role]) * 1e6 / max(1, got["received"])
        if before[role] is not None and after[role] is not None else None
        for role in roles
    }
    sender.tell("go")
    rtt = sender.expect(deadline, "rtt")["rtt"]
    receiver.expect(deadline, "answered")
    elapsed = got["t_end"] - sent["t0"]
    complete = got["received"] == opts.messages
    return {
        "messages": got["received"], "sent": sent["sent"], "seconds": elapsed,
        "msgs_per_s": got["received"] / elapsed if elapsed > 0 and complete else None,
        "in_order": got["disorder"] == 0, "disorder": got["disorder"], "retries": sent.get("retries", 0),
        "rtt_n": rtt["n"], "p50_us": _us(rtt["p50"]), "p99_us": _us(rtt["p99"]),
        "cpu_us_per_msg": cpu_us,
    }


def _us(seconds):
    return None if seconds is None else seconds * 1e6


BROKER_LINE = re.compile(r"channelbus broker listening on (\S+), publishing on (\S+)")


def run_reference(opts, deadline: float, env: dict) -> dict:
    children: list[Child] = []
    try:
        forwarder = Child("forwarder", [HERE, "--role", "forwarder", "--timeout", str(opts.timeout)],
                          opts.profile, env)
        children.append(forwarder)
        endpoint = forwarder.expect(deadline, "endpoint")["endpoint"]
        return _run_pair("ref", endpoint, opts, deadline, children, env)
    finally:
        for child in reversed(children):
            child.stop(grace=0.0 if child.name == "forwarder" else 5.0)


def run_bus(opts, deadline: float, env: dict) -> dict:
    children: list[Child] = []
    try:
        broker = Child("broker", [
            "-m", "consumers.cli", "broker", "--bind", f"tcp://{HOST}:*",
            "--pub-bind", f"tcp://{HOST}:*", "--log-level", "WARNING",
        ], opts.profile, env)
        children.append(broker)
        endpoint = broker.expect(deadline, pattern=BROKER_LINE).group(1)
        return _run_pair("bus", endpoint, opts, deadline, children, env)
    finally:
        for child in reversed(children):
            child.stop(grace=0.0 if child.name == "broker" else 5.0)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a, b):
    return a / b if a is not None and b else None


def report(ref: dict, bus: dict, opts) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = [
        f"channelbus core benchmark: {opts.messages} messages, {opts.rtt} round trips,"
        f" {PAYLOAD_SIZE}-byte payload, bus window {opts.window}, capacity {opts.capacity}"
        + (f", median of {opts.repeat} runs" if opts.repeat > 1 else "")
        + (f"; {os.cpu_count()} CPUs, load {load:.1f}" if load is not None else ""),
        f"{'':28}{'msgs/s':>10}{'p50 us':>9}{'p99 us':>9}   CPU us/msg: {'send':>6}{'middle':>8}{'recv':>6}  notes",
    ]
    for name, r in (("reference (pyzmq forwarder)", ref), ("bus (AsyncClient + broker)", bus)):
        notes = [] if r["in_order"] else [f"OUT OF ORDER ({r['disorder']} jumps)"]
        if r["messages"] != opts.messages:
            notes.append(f"only {r['messages']} received")
        if r.get("retries"):
            notes.append(f"{r['retries']} ChannelFull retries")
        cpu = r.get("cpu_us_per_msg") or {}
        rows.append(
            f"{name:28}{_fmt(r['msgs_per_s'], ',.0f'):>10}{_fmt(r['p50_us'], '.0f'):>9}"
            f"{_fmt(r['p99_us'], '.0f'):>9}   {'':12}{_fmt(cpu.get('sender'), '.1f'):>6}"
            f"{_fmt(cpu.get('middle'), '.1f'):>8}{_fmt(cpu.get('receiver'), '.1f'):>6}  {', '.join(notes)}"
        )
    tp = _ratio(bus["msgs_per_s"], ref["msgs_per_s"])
    lat = _ratio(bus["p50_us"], ref["p50_us"])
    rows.append(
        f"{'bus / reference':28}{_fmt(tp, '.1%'):>10}{_fmt(lat, '.2f') + 'x':>9}"
        "            (throughput share; p50 multiple)"
    )
    return "\n".join(rows)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="messages for throughput (default 20000)")
    parser.add_argument("--rtt", type=int, default=2000, help="round trips for latency (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured round trips first (default 200)")
    parser.add_argument("--window", type=int, default=1, help="bus send() calls awaited concurrently (default 1: one awaiting sender, which the client pipelines with reserved slots)")
    parser.add_argument("--capacity", type=int, default=10000, help="bus channel capacity (default 10000)")
    parser.add_argument("--timeout", type=float, default=120.0, help="overall limit in seconds (default 120)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each set-up; medians are shown (default 1)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--profile", metavar="DIR", help="run each process under cProfile into DIR")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    for name in ("messages", "rtt", "window", "capacity", "repeat"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if opts.warmup < 0 or opts.timeout <= 0:
        parser.error("--warmup must be >= 0 and --timeout above 0")
    return opts


def main(argv=None) -> int:
    opts = parse(sys.argv[1:] if argv is None else list(argv))
    if opts.role:
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        ROLES[opts.role](opts)
        return 0
    if opts.profile:
        opts.profile = os.path.abspath(opts.profile)
        os.makedirs(opts.profile, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    deadline = time.monotonic() + opts.timeout
    refs, buses = [], []
    try:
        for _ in range(opts.repeat):  # alternate, so a noisy neighbour hits both alike
            refs.append(run_reference(opts, deadline, env))
            buses.append(run_bus(opts, deadline, env))
    except TimeoutError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    ref, bus = combine(refs), combine(buses)
    print(report(ref, bus, opts))
    if opts.json:
        print(json.dumps({"reference": ref, "bus": bus, "runs": {"reference": refs, "bus": buses}}, indent=2))
    complete = all(r["messages"] == opts.messages and r["in_order"] for r in (*refs, *buses))
    return 0 if complete else 1


def combine(runs: list[dict]) -> dict:
    """One row from repeated runs: medians of the figures, the worst of the checks."""
    def median(key):
        values = sorted(r[key] for r in runs if r[key] is not None)
        return values[len(values) // 2] if len(values) == len(runs) else None

    return {
        "messages": min(r["messages"] for r in runs), "sent": min(r["sent"] for r in runs),
        "seconds": median("seconds"), "msgs_per_s": median("msgs_per_s"),
        "in_order": all(r["in_order"] for r in runs), "disorder": sum(r["disorder"] for r in runs),
        "retries": sum(r["retries"] for r in runs),
        "rtt_n": min(r["rtt_n"] for r in runs), "p50_us": median("p50_us"), "p99_us": median("p99_us"),
        "cpu_us_per_msg": {
            role: _median([r["cpu_us_per_msg"][role] for r in runs]) for role in ("sender", "middle", "receiver")
        },
    }


def _median(values):
    if any(v is None for v in values):
        return None
    values = sorted(values)
    return values[len(values) // 2]


if __name__ == "__main__":
    sys.exit(main())
