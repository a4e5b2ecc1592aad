"""Sharding benchmark: the bus on 1, 2 and 4 brokers of this host, loaded by several client processes.

Usage::

    .venv/bin/python benchmarks/shards.py [--brokers 1,2,4] [--messages N] [--channels C]
                                          [--senders S] [--receivers R] [--window W]
                                          [--rtt N] [--rtt-interval MS] [--seconds S]
                                          [--timeout S] [--repeat N] [--wait-quiet S]
                                          [--max-others F] [--redo-noisy N] [--json]
    channelbus bench shards -- --repeat 3

For each broker count N of ``--brokers`` (and each repetition, the counts interleaved so a noisy
minute hits all of them alike) one run starts, all on 127.0.0.1 with ports ``*``:

- N brokers (``python -m consumers.cli broker`` with its defaults; no ``CHANNELBUS_*`` variable
  of the calling shell is passed on), each its own process, hence its own core when there is one;
- ``--senders`` sender and ``--receivers`` receiver processes, each one ``AsyncClient`` given all
  N URLs (a sharded bus: clients.placement puts each channel on one broker by a hash of its
  name). ``--channels`` normal channels ``shards.c000`` ... carry ``--messages`` 64-byte messages
  in all, the same number (within one) per channel. Channel i is sent to by sender ``i % S`` and
  received by receiver ``(i // S) % R``, so every sender feeds every receiver and every broker.
  A sender runs ``--window`` tasks, each owning a share of its channels and sending to them in
  turn (pipelined: with reserved slots a send needs no round trip); a receiver drains each of
  its channels in a task of its own and checks every channel's sequence numbers (losses,
  duplicates, disorder);
- a pinger and a ponger (one ``AsyncClient`` each, on the same brokers): ping-pong over
  ``shards.ping`` / ``shards.pong`` (placed like any name) once every ``--rtt-interval`` ms while
  the load runs ("round trip under load"), then ``--rtt`` back-to-back round trips once the load
  is over ("idle").

Figures of a run: aggregate messages/s (all messages received, from the first sender's first
send to the last receiver's last receive); the round trip p50/p99 under load and idle; for each
broker its CPU seconds (user + system, all threads, from /proc/PID/stat) over the load phase,
divided by the messages it handled (its STATS counter ``received``, the messages queued by SEND
and POST, pings included; ``delivered`` is shown beside it) and its share of all messages; the
senders' and the receivers' CPU per message (all of them together, per message received); the
CPU per idle round trip of the pinger and ponger together and of all brokers together; and
"others", the share of the host's CPUs that no process of the run used meanwhile.

The report shows a table of the runs' medians, one row per N, its ratios to N=1, a row per
broker, and a model: what N brokers on N cores of their own would carry from these CPU figures
(docs/performance.md, "Several brokers: scaling").

A shared 2-core host moves every figure (another program's busy core halves the rates and
inflates the CPU per message): ``--wait-quiet S`` waits up to S seconds before each run for the
CPUs to be idle, and ``--redo-noisy N`` runs a run again (up to N times) when other programs used
more than ``--max-others`` of the CPUs during its load (the repeated runs are listed, not used).

Every child is a subprocess of this one, stopped by its PID (the clients are asked to exit,
then SIGTERM, then SIGKILL; the brokers SIGTERM, then SIGKILL) at the end of its run, also on an
error, Ctrl-C or SIGTERM. Every loop is bounded in count and in time (``--seconds`` for a run's
load, ``--timeout`` for all of it).

``main(argv)`` is the entry point for ``channelbus bench shards``; it returns an exit status.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import sys
import threading
import time

HERE = os.path.abspath(__file__)
BENCHMARKS = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCHMARKS)
for _path in (ROOT, BENCHMARKS):  # (as a script and through ``channelbus bench``'s runpy)
    if _path not in sys.path:
        sys.path.insert(0, _path)

from corebench.children import Child  # noqa: E402
from corebench.common import HOST, PAYLOAD_SIZE, emit, make_message, percentiles  # noqa: E402
from layerbench.services import host_cpu_seconds, wait_quiet  # noqa: E402

PREFIX = "shards"
PING, PONG = f"{PREFIX}.ping", f"{PREFIX}.pong"
RECV_SLICE = 0.25  # seconds one receive waits before its loop looks at its deadline again
YIELD_EVERY = 64  # a sender task lets the event loop run (and send its batched POSTs) this often


def channel_names(count: int) -> list[str]:
    return [f"{PREFIX}.c{i:03d}" for i in range(count)]


def sender_of(index: int, opts) -> int:
    return index % opts.senders


def receiver_of(index: int, opts) -> int:
    return (index // opts.senders) % opts.receivers


def quota(index: int, opts) -> int:
    """Messages channel ``index`` carries: ``--messages`` spread over the channels."""
    return opts.messages // opts.channels + (1 if index < opts.messages % opts.channels else 0)


def busiest_share(names, count: int) -> float:
    """The share of ``names`` (equally loaded) that the busiest of ``count`` brokers holds."""
    from clients.placement import broker_of_channel

    names = list(names)
    load = [0] * count
    for name in names:
        load[broker_of_channel(name, count)] += 1
    return max(load) / max(1, len(names))


@functools.lru_cache(maxsize=None)
def random_skew(names: int, count: int, trials: int = 200, seed: int = 7) -> tuple[float, float]:
    """The busiest of ``count`` brokers' share of ``names`` equally loaded random names: the
    median and the 95th percentile over ``trials`` sets (seeded, so the same every time)."""
    import random

    rng = random.Random(seed)
    shares = sorted(busiest_share([f"{rng.getrandbits(48):012x}" for _ in range(names)], count)
                    for _ in range(trials))
    return shares[len(shares) // 2], shares[min(len(shares) - 1, int(0.95 * len(shares)))]


# -- the client processes --------------------------------------------------------------------

class Words:
    """The words the parent writes on stdin, read by a thread and handed to the event loop."""

    def __init__(self) -> None:
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, line.strip())
        self.loop.call_soon_threadsafe(self.queue.put_nowait, "eof")

    async def wait(self, word: str, limit: float) -> None:
        """Until ``word`` comes (SystemExit on EOF, on "exit" when it is not awaited, or after
        ``limit`` seconds)."""
        import asyncio

        deadline = time.monotonic() + limit
        while word not in self.seen:
            try:
                got = await asyncio.wait_for(self.queue.get(), max(0.001, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise SystemExit(4) from None
            if got in ("eof", "exit") and word != got:
                raise SystemExit(3)
            self.seen.append(got)
        self.seen.remove(word)

    def said(self, word: str) -> bool:
        """Whether ``word`` has come (without waiting)."""
        while not self.queue.empty():
            self.seen.append(self.queue.get_nowait())
        return word in self.seen


async def _client(opts):
    from clients import AsyncClient

    client = AsyncClient(opts.endpoint, capacity=opts.capacity, expiry=120, timeout=10)
    await client.connect()
    return client


async def _sender(opts) -> None:
    import asyncio

    from clients import ChannelFull

    words = Words()
    client = await _client(opts)
    try:
        mine = [i for i in range(opts.channels) if sender_of(i, opts) == opts.index]
        names = channel_names(opts.channels)
        emit(ready=True, channels=len(mine))
        await words.wait("go", opts.seconds + 60)
        deadline = time.monotonic() + opts.seconds
        state = {"sent": 0, "retries": 0}

        async def task(share: list[int]) -> None:
            left = {i: quota(i, opts) for i in share}
            seq = {i: 0 for i in share}
            since_yield = 0
            while left and time.monotonic() < deadline:
                for i in list(left):
                    message = make_message(seq[i])
                    pause = 0.001
                    while True:
                        try:
                            await client.send(names[i], message)
                            break
                        except ChannelFull:  # (retried in place: this task is the channel's only sender)
                            state["retries"] += 1
                            if time.monotonic() > deadline:
                                return
                            await asyncio.sleep(pause)
                            pause = min(0.05, pause * 2)
                    seq[i] += 1
                    state["sent"] += 1
                    left[i] -= 1
                    if not left[i]:
                        del left[i]
                    since_yield += 1
                    if since_yield >= YIELD_EVERY:
                        since_yield = 0
                        await asyncio.sleep(0)

        t0 = time.monotonic()
        window = max(1, min(opts.window, len(mine)))
        await asyncio.gather(*(task(mine[k::window]) for k in range(window)))
        t_sent = time.monotonic()
        await client.ping()  # (the POSTs still in the socket are through)
        emit(sent=state["sent"], t0=t0, t_sent=t_sent, retries=state["retries"])
        await words.wait("exit", opts.seconds + 120)
    finally:
        await client.close()


async def _receiver(opts) -> None:
    import asyncio

    from clients import ReceiveTimeout

    words = Words()
    client = await _client(opts)
    try:
        mine = [i for i in range(opts.channels) if receiver_of(i, opts) == opts.index]
        names = channel_names(opts.channels)

        async def grant(name: str) -> None:  # (the first receive gives the broker credit)
            try:
                await client.receive(name, timeout=0.001)
            except ReceiveTimeout:
                pass

        await asyncio.gather(*(grant(names[i]) for i in mine))
        await client.ping()
        emit(ready=True, channels=len(mine))
        await words.wait("go", opts.seconds + 60)
        deadline = time.monotonic() + opts.seconds
        totals = {"received": 0, "disorder": 0, "duplicates": 0, "short": 0, "missing": 0,
                  "t_first": None, "t_end": None}

        async def drain(i: int) -> None:
            name, want = names[i], quota(i, opts)
            got = expected = 0
            while got < want and time.monotonic() < deadline:
                try:
                    message = await client.receive(name, timeout=RECV_SLICE)
                except ReceiveTimeout:
                    continue
                seq = int.from_bytes(message["seq"], "big")
                if seq < expected:
                    totals["duplicates"] += 1
                elif seq > expected:
                    totals["disorder"] += 1
                expected = max(expected, seq + 1)
                got += 1
                if totals["t_first"] is None:
                    totals["t_first"] = time.monotonic()
            totals["received"] += got
            totals["t_end"] = max(totals["t_end"] or 0.0, time.monotonic()) if got else totals["t_end"]
            if got < want:
                totals["short"] += 1
                totals["missing"] += want - got

        await asyncio.gather(*(drain(i) for i in mine))
        emit(**totals, expected=sum(quota(i, opts) for i in mine))
        await words.wait("exit", opts.seconds + 120)
    finally:
        await client.close()


async def _pinger(opts) -> None:
    import asyncio

    from clients import ReceiveTimeout

    words = Words()
    client = await _client(opts)
    try:
        try:
            await client.receive(PONG, timeout=0.001)
        except ReceiveTimeout:
            pass
        await client.ping()
        emit(ready=True)
        await words.wait("load", opts.seconds + 60)
        clock, samples, lost = time.perf_counter, [], 0
        deadline = time.monotonic() + opts.seconds + 30
        seq = 0
        # Under load: one round trip every --rtt-interval ms, until the parent says "stop".
        while not words.said("stop") and time.monotonic() < deadline:
            start = clock()
            await client.send(PING, make_message(seq))
            seq += 1
            try:
                await client.receive(PONG, timeout=5)
                samples.append(clock() - start)
            except ReceiveTimeout:
                lost += 1
            await asyncio.sleep(max(0.0, opts.rtt_interval / 1000 - (clock() - start)))
        emit(rtt_load=percentiles(samples), rtt_load_lost=lost)
        await words.wait("idle", 60)
        # Idle: --warmup unmeasured, then --rtt timed round trips, back to back.
        samples, lost = [], 0
        deadline = time.monotonic() + opts.seconds
        for k in range(opts.warmup + opts.rtt):
            if time.monotonic() > deadline:
                break
            start = clock()
            await client.send(PING, make_message(seq))
            seq += 1
            try:
                await client.receive(PONG, timeout=5)
            except ReceiveTimeout:
                lost += 1
                continue
            if k >= opts.warmup:
                samples.append(clock() - start)
        await client.send(PING, {"type": "end"})
        emit(rtt_idle=percentiles(samples), rtt_idle_lost=lost)
        await words.wait("exit", 60)
    finally:
        await client.close()


async def _ponger(opts) -> None:
    from clients import ReceiveTimeout

    words = Words()
    client = await _client(opts)
    try:
        try:
            await client.receive(PING, timeout=0.001)
        except ReceiveTimeout:
            pass
        await client.ping()
        emit(ready=True)
        deadline = time.monotonic() + 2 * opts.seconds + 120
        answered = 0
        while time.monotonic() < deadline and not words.said("exit"):
            try:
                message = await client.receive(PING, timeout=RECV_SLICE)
            except ReceiveTimeout:
                continue
            if message.get("type") == "end":
                break
            await client.send(PONG, message)
            answered += 1
        emit(answered=answered)
        await words.wait("exit", 60)
    finally:
        await client.close()


ROLES = {"sender": _sender, "receiver": _receiver, "pinger": _pinger, "ponger": _ponger}


def run_role(opts) -> None:
    import asyncio

    asyncio.run(ROLES[opts.role](opts))


# -- the parent ------------------------------------------------------------------------------

BROKER_LINE = re.compile(r"channelbus broker listening on (\S+), publishing on (\S+)")


def broker_stats(url: str) -> dict:
    """One broker's STATS, asked by a short-lived blocking client of that broker alone."""
    from clients import Client

    client = Client(url, timeout=10)
    try:
        return client.stats(top=1)
    finally:
        client.close()


class Fleet:
    """The children of one run, stopped in reverse order of their start (clients, then brokers)."""

    def __init__(self, env: dict) -> None:
        self.env = env
        self.children: list[Child] = []
        self.brokers: list[Child] = []

    def start(self, name: str, argv: list[str], broker: bool = False) -> Child:
        child = Child(name, argv, self.env)
        self.children.append(child)
        if broker:
            self.brokers.append(child)
        return child

    def stop(self) -> None:
        for child in self.children:
            if child not in self.brokers:
                child.tell("exit")
        for child in reversed(self.children):
            child.stop(grace=0.0 if child in self.brokers else 5.0)
        self.children.clear()
        self.brokers.clear()


def _role_argv(role: str, index: int, urls: list[str], opts) -> list[str]:
    return [
        HERE, "--role", role, "--index", str(index), "--endpoint", ",".join(urls),
        "--messages", str(opts.messages), "--channels", str(opts.channels),
        "--senders", str(opts.senders), "--receivers", str(opts.receivers),
        "--window", str(opts.window), "--capacity", str(opts.capacity), "--seconds", str(opts.seconds),
        "--rtt", str(opts.rtt), "--warmup", str(opts.warmup), "--rtt-interval", str(opts.rtt_interval),
    ]


def run_once(count: int, opts, env: dict, deadline: float) -> dict:
    """One run with ``count`` brokers: the figures of its load phase and its round trips."""
    fleet = Fleet(env)
    try:
        for k in range(count):
            fleet.start(f"broker{k}", [
                "-m", "consumers.cli", "broker", "--bind", f"tcp://{HOST}:*",
                "--pub-bind", f"tcp://{HOST}:*", "--log-level", "WARNING",
            ], broker=True)
        urls = [b.expect(deadline, pattern=BROKER_LINE).group(1) for b in fleet.brokers]
        receivers = [fleet.start(f"receiver{k}", _role_argv("receiver", k, urls, opts)) for k in range(opts.receivers)]
        ponger = fleet.start("ponger", _role_argv("ponger", 0, urls, opts))
        senders = [fleet.start(f"sender{k}", _role_argv("sender", k, urls, opts)) for k in range(opts.senders)]
        pinger = fleet.start("pinger", _role_argv("pinger", 0, urls, opts))
        for child in [*receivers, ponger, *senders, pinger]:
            child.expect(deadline, "ready")
        load_deadline = min(deadline, time.monotonic() + opts.seconds + 30)

        stats0 = [broker_stats(url) for url in urls]
        everyone = fleet.brokers + senders + receivers + [pinger, ponger]
        cpu0 = {c.name: c.cpu() for c in everyone}
        host0, wall0 = host_cpu_seconds(), time.monotonic()
        pinger.tell("load")
        for child in senders + receivers:
            child.tell("go")
        sent = [s.expect(load_deadline, "sent") for s in senders]
        got = [r.expect(load_deadline, "received") for r in receivers]
        cpu1 = {c.name: c.cpu() for c in everyone}
        host1, wall1 = host_cpu_seconds(), time.monotonic()
        stats1 = [broker_stats(url) for url in urls]

        pinger.tell("stop")
        rtt_load = pinger.expect(deadline, "rtt_load")
        pair = [pinger, ponger] + fleet.brokers
        idle0 = {c.name: c.cpu() for c in pair}
        pinger.tell("idle")
        rtt_idle = pinger.expect(deadline, "rtt_idle")
        ponger.expect(deadline, "answered")
        idle1 = {c.name: c.cpu() for c in pair}
    finally:
        fleet.stop()

    cpu = {name: None if cpu0[name] is None or cpu1[name] is None else cpu1[name] - cpu0[name] for name in cpu0}
    received = sum(r["received"] for r in got)
    expected = sum(r["expected"] for r in got)
    t0 = min(s["t0"] for s in sent)
    ends = [r["t_end"] for r in got if r["t_end"] is not None]
    elapsed = (max(ends) - t0) if ends else None
    complete = received == opts.messages == expected
    handled = [s1["counters"]["received"] - s0["counters"]["received"] for s0, s1 in zip(stats0, stats1)]
    delivered = [s1["counters"]["delivered"] - s0["counters"]["delivered"] for s0, s1 in zip(stats0, stats1)]
    brokers = []
    for k in range(count):
        seconds = cpu[f"broker{k}"]
        brokers.append({
            "url": urls[k], "received": handled[k], "delivered": delivered[k],
            "share": handled[k] / max(1, sum(handled)), "cpu_s": seconds,
            "cpu_us_per_msg": None if seconds is None else seconds * 1e6 / max(1, handled[k]),
            "busy": None if seconds is None else seconds / max(1e-9, wall1 - wall0),
            "left": stats1[k].get("queued", 0) + stats1[k].get("inflight", 0),
        })

    def per_msg(names):
        values = [cpu[n] for n in names]
        return None if None in values else sum(values) * 1e6 / max(1, received)

    trips = max(1, rtt_idle["rtt_idle"]["n"] + min(opts.warmup, rtt_idle["rtt_idle"]["n"]))

    def per_trip(names):
        values = [None if idle0[n] is None or idle1[n] is None else idle1[n] - idle0[n] for n in names]
        return None if None in values else sum(values) * 1e6 / trips

    ours = [v for v in cpu.values() if v is not None]
    others = None
    if host0 is not None and host1 is not None and len(ours) == len(cpu):
        others = max(0.0, (host1 - host0) - sum(ours)) / max(1e-9, (wall1 - wall0) * (os.cpu_count() or 1))
    all_broker_cpu = [b["cpu_s"] for b in brokers]
    return {
        "brokers_n": count, "messages": received, "expected": expected, "complete": complete,
        "seconds": elapsed,
        "msgs_per_s": received / elapsed if elapsed and received else None,
        "disorder": sum(r["disorder"] for r in got), "duplicates": sum(r["duplicates"] for r in got),
        "missing": opts.messages - received, "short_channels": sum(r["short"] for r in got),
        "retries": sum(s["retries"] for s in sent),
        "send_seconds": max(s["t_sent"] for s in sent) - t0,
        "rtt_load": {"n": rtt_load["rtt_load"]["n"], "p50_us": _us(rtt_load["rtt_load"]["p50"]),
                     "p99_us": _us(rtt_load["rtt_load"]["p99"]), "lost": rtt_load["rtt_load_lost"]},
        "rtt_idle": {"n": rtt_idle["rtt_idle"]["n"], "p50_us": _us(rtt_idle["rtt_idle"]["p50"]),
                     "p99_us": _us(rtt_idle["rtt_idle"]["p99"]), "lost": rtt_idle["rtt_idle_lost"],
                     "clients_cpu_us_per_rt": per_trip(["pinger", "ponger"]),
                     "brokers_cpu_us_per_rt": per_trip([f"broker{k}" for k in range(count)])},
        "brokers": brokers,
        "broker_us_per_msg": None if None in all_broker_cpu else sum(all_broker_cpu) * 1e6 / max(1, sum(handled)),
        "busiest_share": max(b["share"] for b in brokers),
        "sender_us_per_msg": per_msg([s.name for s in senders]),
        "receiver_us_per_msg": per_msg([r.name for r in receivers]),
        "pingpong_cpu_s": None if cpu["pinger"] is None or cpu["ponger"] is None else cpu["pinger"] + cpu["ponger"],
        "total_us_per_msg": per_msg(list(cpu)),
        "others": others, "load_wall_s": wall1 - wall0,
        "placement": {"ping": _broker_of(PING, count), "pong": _broker_of(PONG, count),
                      "channels_busiest_share": busiest_share(channel_names(opts.channels), count)},
    }


def _broker_of(name: str, count: int) -> int:
    from clients.placement import broker_of_channel

    return broker_of_channel(name, count)


def _us(seconds):
    return None if seconds is None else seconds * 1e6


def _median(values):
    if not values or any(v is None for v in values):
        return None
    values = sorted(values)
    return values[len(values) // 2]


def combine(runs: list[dict]) -> dict:
    """The medians of one broker count's runs (the worst of the checks)."""
    def med(*path):
        values = []
        for run in runs:
            value = run
            for key in path:
                value = None if value is None else value[key]
            values.append(value)
        return _median(values)

    count = runs[0]["brokers_n"]
    return {
        "brokers_n": count, "runs": len(runs),
        "complete": all(r["complete"] for r in runs),
        "missing": sum(r["missing"] for r in runs), "disorder": sum(r["disorder"] for r in runs),
        "duplicates": sum(r["duplicates"] for r in runs), "retries": sum(r["retries"] for r in runs),
        "msgs_per_s": med("msgs_per_s"), "seconds": med("seconds"),
        "rtt_load": {k: med("rtt_load", k) for k in ("p50_us", "p99_us")},
        "rtt_idle": {k: med("rtt_idle", k) for k in ("p50_us", "p99_us", "clients_cpu_us_per_rt", "brokers_cpu_us_per_rt")},
        "broker_us_per_msg": med("broker_us_per_msg"), "busiest_share": med("busiest_share"),
        "sender_us_per_msg": med("sender_us_per_msg"), "receiver_us_per_msg": med("receiver_us_per_msg"),
        "total_us_per_msg": med("total_us_per_msg"),
        "others": None if any(r["others"] is None for r in runs) else max(r["others"] for r in runs),
        "brokers": [{key: med("brokers", k, key) for key in ("received", "delivered", "share", "cpu_us_per_msg", "busy")}
                    for k in range(count)],
        "placement": runs[0]["placement"],
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a, b):
    return None if a is None or not b else a / b


def report(results: dict, opts) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = [
        f"channelbus shards benchmark: {opts.messages:,} messages of {PAYLOAD_SIZE} bytes over"
        f" {opts.channels} channels, {opts.senders} senders (window {opts.window}) and"
        f" {opts.receivers} receivers (AsyncClient each)"
        + (f", median of {opts.repeat} runs" if opts.repeat > 1 else "")
        + (f"; {os.cpu_count()} CPUs, load {load:.1f}" if load is not None else ""),
        "",
        f"{'brokers':>7}{'msgs/s':>10}{'x N=1':>7}{'rtt load p50/p99 us':>21}{'rtt idle p50/p99 us':>21}"
        f"{'idle CPU us/rt':>16}"
        f"{'broker us/msg':>15}{'busiest':>9}{'send us/msg':>13}{'recv us/msg':>13}{'all us/msg':>12}"
        f"{'others':>8}  notes",
    ]
    base = results.get(1) or results[min(results)]
    for count in sorted(results):
        r = results[count]
        notes = []
        if r["missing"]:
            notes.append(f"{r['missing']} NOT RECEIVED")
        if r["duplicates"]:
            notes.append(f"{r['duplicates']} DUPLICATES")
        if r["disorder"]:
            notes.append(f"{r['disorder']} OUT OF ORDER")
        if r["retries"]:
            notes.append(f"{r['retries']} ChannelFull retries")
        rows.append(
            f"{count:>7}{_fmt(r['msgs_per_s'], ',.0f'):>10}{_fmt(_ratio(r['msgs_per_s'], base['msgs_per_s']), '.2f'):>7}"
            f"{_fmt(r['rtt_load']['p50_us'], '.0f') + '/' + _fmt(r['rtt_load']['p99_us'], '.0f'):>21}"
            f"{_fmt(r['rtt_idle']['p50_us'], '.0f') + '/' + _fmt(r['rtt_idle']['p99_us'], '.0f'):>21}"
            f"{_fmt(r['rtt_idle']['clients_cpu_us_per_rt'], '.0f') + '/' + _fmt(r['rtt_idle']['brokers_cpu_us_per_rt'], '.0f'):>16}"
            f"{_fmt(r['broker_us_per_msg'], '.2f'):>15}{_fmt(r['busiest_share'], '.0%'):>9}"
            f"{_fmt(r['sender_us_per_msg'], '.2f'):>13}{_fmt(r['receiver_us_per_msg'], '.2f'):>13}"
            f"{_fmt(r['total_us_per_msg'], '.2f'):>12}{_fmt(r['others'], '.0%'):>8}  {', '.join(notes)}"
        )
    rows += [
        "(msgs/s: all messages, first send to last receive; broker us/msg: the brokers' CPU over the"
        " messages they queued, pings included; busiest: the largest broker's share of them; send/recv"
        " us/msg: all senders' (receivers') CPU per message received; all: every process of the run,"
        " ping-pong included; others: CPU share no process of the run used; idle CPU us/rt: pinger and"
        " ponger together / all brokers together, per idle round trip)",
        "",
        "ratios to N=1: " + "; ".join(
            f"N={count}: msgs/s {_fmt(_ratio(results[count]['msgs_per_s'], base['msgs_per_s']), '.2f')}x,"
            f" broker us/msg {_fmt(_ratio(results[count]['broker_us_per_msg'], base['broker_us_per_msg']), '.2f')}x,"
            f" client us/msg {_fmt(_ratio(_client_us(results[count]), _client_us(base)), '.2f')}x,"
            f" idle p50 {_fmt(_ratio(results[count]['rtt_idle']['p50_us'], base['rtt_idle']['p50_us']), '.2f')}x"
            for count in sorted(results) if count != base["brokers_n"]),
        "",
        f"{'per broker':>10}{'messages':>11}{'delivered':>11}{'share':>7}{'CPU us/msg':>12}{'busy':>7}",
    ]
    for count in sorted(results):
        for k, b in enumerate(results[count]["brokers"]):
            rows.append(f"{f'N={count} #{k}':>10}{_fmt(b['received'], ',.0f'):>11}{_fmt(b['delivered'], ',.0f'):>11}"
                        f"{_fmt(b['share'], '.0%'):>7}{_fmt(b['cpu_us_per_msg'], '.2f'):>12}{_fmt(b['busy'], '.0%'):>7}")
    rows += ["(busy: the broker's CPU seconds over the load phase's wall seconds)", ""] + model(results, opts)
    return "\n".join(rows)


def _client_us(r: dict):
    if r["sender_us_per_msg"] is None or r["receiver_us_per_msg"] is None:
        return None
    return r["sender_us_per_msg"] + r["receiver_us_per_msg"]


def model(results: dict, opts) -> list[str]:
    """What N brokers on N cores of their own would carry, from the CPU per message measured:
    broker-bound rate = 1 / (busiest share x broker us/msg); the client cores that rate needs;
    and, as a check of the CPU figures, what this host's CPUs predict for the run measured."""
    rows = ["model (from each N's medians; extrapolation for the dedicated-core columns):",
            f"{'brokers':>7}{'busiest':>9}{'broker-bound msgs/s':>21}{'client cores for it':>21}"
            f"{'this host: predicted':>22}{'measured':>10}"]
    cores = os.cpu_count() or 1
    for count in sorted(results):
        r = results[count]
        cb, cc, share = r["broker_us_per_msg"], _client_us(r), r["busiest_share"]
        bound = None if not cb or not share else 1e6 / (share * cb)
        need = None if bound is None or cc is None else bound * cc / 1e6
        total = r["total_us_per_msg"]
        predicted = None if not total else cores * 1e6 / total
        rows.append(f"{count:>7}{_fmt(share, '.0%'):>9}{_fmt(bound, ',.0f'):>21}{_fmt(need, '.1f'):>21}"
                    f"{_fmt(predicted, ',.0f'):>22}{_fmt(r['msgs_per_s'], ',.0f'):>10}")
    names = channel_names(opts.channels)
    rows.append("busiest broker's share of equally loaded names (ideal 1/N): " + "; ".join(
        f"N={n}: these {opts.channels} channels {busiest_share(names, n):.1%}, 100 random names"
        f" {random_skew(100, n)[0]:.1%} (p95 {random_skew(100, n)[1]:.1%}), 1000 random names"
        f" {random_skew(1000, n)[0]:.1%}" for n in (2, 4, 8)))
    one = results.get(1)
    if one and one["broker_us_per_msg"]:
        rows.append(f"a single channel is on one broker: at most {1e6 / one['broker_us_per_msg']:,.0f} msgs/s"
                    " (N=1's broker CPU per message), however many brokers")
    return rows


# -- options and main ------------------------------------------------------------------------

def _counts(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers such as 1,2,4") from None
    if not values or not all(1 <= v <= 16 for v in values) or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: each count once, from 1 to 16")
    return values


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", type=_counts, default=[1, 2, 4], metavar="N[,N...]",
                        help="broker counts to run (default 1,2,4)")
    parser.add_argument("--messages", type=int, default=200_000, help="messages of a run, all channels together (default 200000)")
    parser.add_argument("--channels", type=int, default=128, help="normal channels the messages are spread over (default 128)")
    parser.add_argument("--senders", type=int, default=2, help="sender processes (default 2)")
    parser.add_argument("--receivers", type=int, default=2, help="receiver processes (default 2)")
    parser.add_argument("--window", type=int, default=8,
                        help="tasks in each sender, each owning a share of its channels (default 8)")
    parser.add_argument("--capacity", type=int, default=50_000, help="channel capacity (default 50000)")
    parser.add_argument("--rtt", type=int, default=1000, help="idle round trips after the load (default 1000)")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured idle round trips first (default 100)")
    parser.add_argument("--rtt-interval", type=float, default=5.0,
                        help="milliseconds between round trips under load (default 5)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="time limit of a run's load phase; what is not received by then counts as missing (default 60)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="limit for the whole benchmark in seconds (default 180 per run)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each broker count; medians are shown (default 1)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each run wait up to S seconds for the host's CPUs to be idle (default 0)")
    parser.add_argument("--max-others", type=float, default=0.15, metavar="FRACTION",
                        help="a run during which other programs used more than this share of the CPUs"
                             " is noisy (default 0.15)")
    parser.add_argument("--redo-noisy", type=int, default=0, metavar="N",
                        help="run a noisy run again, up to N times; the last attempt counts (default 0)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    for name in ("messages", "channels", "senders", "receivers", "window", "capacity", "rtt", "repeat"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if opts.warmup < 0 or opts.seconds <= 0 or opts.rtt_interval < 0 or opts.wait_quiet < 0 or opts.redo_noisy < 0:
        parser.error("--warmup and --rtt-interval must be >= 0, --seconds above 0")
    if opts.channels < opts.senders * opts.receivers:
        parser.error("--channels must be at least --senders x --receivers (every pair gets a channel)")
    if opts.messages < opts.channels:
        parser.error("--messages must be at least --channels")
    if opts.timeout is None:
        opts.timeout = (180.0 + opts.wait_quiet) * opts.repeat * len(opts.brokers) * (1 + opts.redo_noisy)
    if opts.timeout <= 0:
        parser.error("--timeout must be above 0")
    return opts


def main(argv=None) -> int:
    opts = parse(sys.argv[1:] if argv is None else list(argv))
    if opts.role:
        run_role(opts)
        return 0
    env = {name: value for name, value in os.environ.items() if not name.startswith("CHANNELBUS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    deadline = time.monotonic() + opts.timeout

    def on_term(signum, frame):  # (SIGTERM as Ctrl-C: the run's ``finally`` stops its children)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    runs: dict[int, list[dict]] = {count: [] for count in opts.brokers}
    discarded: list[dict] = []
    try:
        for rep in range(opts.repeat):
            for count in opts.brokers:  # (interleaved: a noisy minute hits every count alike)
                for attempt in range(1 + opts.redo_noisy):
                    if opts.wait_quiet > 0:
                        wait_quiet(opts.wait_quiet, deadline, lambda line: print(line, file=sys.stderr, flush=True))
                    run = run_once(count, opts, env, deadline)
                    print(f"run {rep + 1}/{opts.repeat}, {count} broker{'s' if count > 1 else ''}:"
                          f" {_fmt(run['msgs_per_s'], ',.0f')} msgs/s, {run['messages']:,} of {opts.messages:,} received,"
                          f" broker us/msg {_fmt(run['broker_us_per_msg'], '.2f')}, busiest {run['busiest_share']:.0%},"
                          f" others {_fmt(run['others'], '.0%')}", file=sys.stderr, flush=True)
                    if (run["others"] or 0.0) <= opts.max_others or attempt == opts.redo_noisy:
                        break
                    discarded.append(run)
                    print("  (other programs used more than --max-others of the CPUs: running it again)",
                          file=sys.stderr, flush=True)
                runs[count].append(run)
    except TimeoutError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmark interrupted; its processes are stopped", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    results = {count: combine(found) for count, found in runs.items()}
    print(report(results, opts))
    if discarded:
        print(f"\n{len(discarded)} run(s) repeated because other programs used more than {opts.max_others:.0%}"
              " of the CPUs during them; their figures, not in the medians: " + "; ".join(
                  f"N={d['brokers_n']} {_fmt(d['msgs_per_s'], ',.0f')} msgs/s (others {d['others']:.0%})"
                  for d in discarded))
    if opts.json:
        print(json.dumps({"options": {k: v for k, v in vars(opts).items() if k not in ("role", "index", "endpoint")},
                          "results": results, "runs": runs, "discarded": discarded}, indent=2))
    return 0 if all(r["complete"] and not r["disorder"] and not r["duplicates"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
