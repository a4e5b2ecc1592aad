"""The race against Redis: the same scenarios through the Django Channels layer API for
``clients.channel_layer.BusChannelLayer``, ``channels_redis.core.RedisChannelLayer`` and
``channels_redis.pubsub.RedisPubSubChannelLayer``, in one invocation.

Usage::

    .venv/bin/python benchmarks/layers.py [--quick] [--repetitions N] [--layers bus,core,pubsub]
                                          [--scenarios p2p,rtt,fanout,many] [--capacity N]
                                          [--wait-quiet S] [--redo-noisy N] [--max-others F]
                                          [--scale F] [--timeout S] [--run-timeout S]
                                          [--json FILE] [--profile DIR]

    channelbus bench layers -- [the same options]

It needs ``redis-server`` on the PATH (``apt-get install redis-server``) and channels_redis
(``pip install -e '.[bench]'``). docs/performance.md has results and how to read them.

It starts its own ``redis-server`` (``--port <free port> --bind 127.0.0.1 --save '' --appendonly
no``) and its own broker (``python -m consumers.cli broker`` on loopback with ports ``*``), and
stops both by PID at the end. Every side of every scenario is a process of its own
(``multiprocessing`` with the spawn start method), talking to this one over a pipe; each is
stopped by its PID (SIGTERM, then SIGKILL) when it does not exit on its own. Loops are bounded
in count, each run by ``--run-timeout`` and the whole invocation by ``--timeout``.

Scenarios (message ``{"type": "bench.msg", "seq": i, "payload": <64 chars>}``):

- ``p2p``: one sender process awaiting each ``send`` to a normal channel, one receiver process;
  messages/s from the sender's first send to the receiver's last receive, losses, duplicates,
  ``ChannelFull`` retries (the sender sleeps 1 ms and retries the same message).
- ``rtt``: ping-pong over two normal channels between two processes; p50/p99 of a round trip.
- ``fanout``: 4 receiver processes x 25 channels (``new_channel()``, as consumers have) in one
  group, 1,000 ``group_send`` from a fifth process; deliveries/s and losses.
- ``many``: 1,000 channels (``new_channel()``) in one receiver process, one ``receive`` loop
  each; 20,000 messages sent round robin from another process; messages/s.

Every layer gets the same settings: ``capacity`` (``--capacity``, default 25,000: above any
channel's total in these scenarios, so a sender is not just throttled by ``ChannelFull`` and
``group_send`` never has a reason to skip a member) and ``expiry`` 60 s. The pubsub layer takes
neither: it has no capacity (``ChannelFull`` never happens) and delivers at most once to
whoever is subscribed at that moment; the table says so.

Before each timed phase the sender sends ``bench.probe`` messages until every receiving channel
has seen one (so a subscription that is not yet live costs pubsub nothing it would not cost in
production, and every layer starts warm); receivers ignore probes.

A 2-core host shared with other programs moves every figure, so each run also reports how busy
the CPUs were just before it and the share of CPU that no process of the run used during its
timed phase ("others during"). ``--wait-quiet S`` waits up to S seconds for idle CPUs before
each run; ``--redo-noisy N`` runs a run again (up to N times) when others used more than
``--max-others`` (0.15) of the CPUs, and lists the discarded figures. The details table gives
each side's CPU time per message (sender, receivers, broker or redis-server).

``--profile DIR`` runs every worker under cProfile (``DIR/<scenario>-<layer>-<role>-r<rep>.prof``)
and the broker too (``DIR/broker.prof``, written when it stops).

``main(argv)`` is the entry point; it returns an exit status (0 when every run completed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
HOST = "127.0.0.1"
PAYLOAD = "p" * 64
LAYERS = ("bus", "core", "pubsub")
LAYER_TITLES = {
    "bus": "BusChannelLayer",
    "core": "channels_redis core",
    "pubsub": "channels_redis pubsub",
}
SCENARIOS = ("p2p", "rtt", "fanout", "many")
FULL = {"p2p": 20_000, "rtt": 2_000, "fanout_sends": 1_000, "fanout_procs": 4, "fanout_channels": 25,
        "many_channels": 1_000, "many_messages": 20_000}
QUICK = {"p2p": 2_000, "rtt": 200, "fanout_sends": 100, "fanout_procs": 2, "fanout_channels": 5,
         "many_channels": 100, "many_messages": 2_000}
EXPIRY = 60
RETRY_SLEEP = 0.001  # seconds a sender waits after ChannelFull before retrying the same message
MAX_RETRIES = 1_000_000  # per run; a sender that hits it gives up (bounded loop)
PROBE_INTERVAL = 0.05
PROBE_ROUNDS = 600  # at most this many probe rounds (about 30 s) before a worker gives up
DRAIN = 3.0  # a receiver stops this long after the sender finished and nothing more arrived
WARMUP_ROUND_TRIPS = 50
QUIET_BUSY = 0.10  # the host counts as quiet below this busy fraction (broker and redis idle)


# ===========================================================================================
# worker side (runs in a spawned process)
# ===========================================================================================

def bench_message(seq: int) -> dict:
    return {"type": "bench.msg", "seq": seq, "payload": PAYLOAD}


def probe_message(seq: int) -> dict:
    return {"type": "bench.probe", "seq": seq, "payload": PAYLOAD}


def make_layer(kind: str, env: dict, capacity: int):
    if kind == "bus":
        from clients.channel_layer import BusChannelLayer
        return BusChannelLayer(hosts=[env["bus"]], capacity=capacity, expiry=EXPIRY)
    if kind == "core":
        from channels_redis.core import RedisChannelLayer
        return RedisChannelLayer(hosts=[env["redis"]], capacity=capacity, expiry=EXPIRY)
    if kind == "pubsub":
        from channels_redis.pubsub import RedisPubSubChannelLayer
        return RedisPubSubChannelLayer(hosts=[env["redis"]])  # takes no capacity nor expiry
    raise ValueError(f"unknown layer {kind!r}")


async def close_layer(kind: str, layer) -> None:
    if kind == "bus":
        await layer.close()
    elif kind == "core":
        await layer.close_pools()
    else:
        await layer.flush()  # pubsub: forgets local state and closes its connections only


class Control:
    """The worker's end of the pipe to the parent, readable from the event loop."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.backlog: list[tuple[str, dict]] = []
        self.arrived = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self.backlog.append(self.conn.recv())
        except (EOFError, OSError):
            self.loop.remove_reader(self.conn.fileno())
            self.backlog.append(("exit", {}))  # the parent is gone
        self.arrived.set()

    def send(self, word: str, **data) -> None:
        self.conn.send((word, data))

    def take(self, word: str) -> dict | None:
        for i, (w, data) in enumerate(self.backlog):
            if w == word:
                del self.backlog[i]
                return data
        return None

    def has(self, word: str) -> bool:
        return any(w == word for w, _ in self.backlog)

    async def wait(self, word: str, timeout: float | None = None) -> dict | None:
        """The data of the next ``word`` from the parent; None after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            data = self.take(word)
            if data is not None:
                return data
            self.arrived.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return None

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.conn.fileno())
        except (ValueError, OSError):
            pass


async def send_retrying(layer, channel: str, message: dict, counter: list) -> None:
    from channels.exceptions import ChannelFull

    while True:
        try:
            await layer.send(channel, message)
            return
        except ChannelFull:
            counter[0] += 1
            if counter[0] > MAX_RETRIES:
                raise
            await asyncio.sleep(RETRY_SLEEP)


async def probe_until_go(ctl: Control, probe_round, interval: float = PROBE_INTERVAL) -> int:
    """Run ``probe_round(k)`` every ``interval`` until the parent says go; return the rounds."""
    for k in range(PROBE_ROUNDS):
        await probe_round(k)
        if await ctl.wait("go", interval) is not None:
            return k + 1
    raise RuntimeError(f"no 'go' after {PROBE_ROUNDS} probe rounds: a receiver never saw a probe")


async def collect(layer, ctl: Control, channels: list[str], expected: int, seqs: int,
                  per_channel: bool, ready: dict) -> None:
    """One receive loop per channel; report 'probed' once every channel saw a probe and 'done'
    when ``expected`` messages came or the sender finished DRAIN seconds ago and nothing came."""
    if per_channel:
        seen = {ch: bytearray(seqs) for ch in channels}
    else:
        shared = bytearray(seqs)
        seen = dict.fromkeys(channels, shared)
    st = {"count": 0, "dups": 0, "disorder": 0, "first": None, "last": None, "probes": 0, "cpu0": None}
    probed: set[str] = set()
    complete = asyncio.Event()

    async def loop(ch: str) -> None:
        marks, prev = seen[ch], -1
        while True:
            msg = await layer.receive(ch)
            now = time.monotonic()
            if msg["type"] == "bench.probe":
                st["probes"] += 1
                if ch not in probed:
                    probed.add(ch)
                    if len(probed) == len(channels):
                        st["cpu0"] = time.process_time()
                        ctl.send("probed")
                continue
            seq = msg["seq"]
            if marks[seq]:
                st["dups"] += 1
                continue
            marks[seq] = 1
            if seq < prev:
                st["disorder"] += 1
            prev = seq
            st["count"] += 1
            st["last"] = now
            if st["first"] is None:
                st["first"] = now
            if st["count"] >= expected:
                complete.set()

    tasks = [asyncio.ensure_future(loop(ch)) for ch in channels]
    ctl.send("ready", **ready)
    sender_done_at = None
    try:
        while not complete.is_set():
            for task in tasks:
                if task.done():
                    task.result()  # a receive loop died: raise its error
                    raise RuntimeError("a receive loop ended")
            if sender_done_at is None and ctl.take("sender_done") is not None:
                sender_done_at = time.monotonic()
            if ctl.has("exit"):
                break
            if sender_done_at is not None:
                quiet_since = max(sender_done_at, st["last"] or 0.0)
                if time.monotonic() - quiet_since > DRAIN:
                    break
            try:
                await asyncio.wait_for(asyncio.shield(complete.wait()), 0.1)
            except asyncio.TimeoutError:
                pass
        st["cpu"] = time.process_time() - (st.pop("cpu0") or 0.0)
        if not per_channel and st["count"] < expected:  # which ones, to tell a pattern
            st["missing"] = [i for i, mark in enumerate(shared) if not mark][:50]
        ctl.send("done", **st, expected=expected)
        await ctl.wait("exit", 60)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- roles ----------------------------------------------------------------------------------

async def role_p2p_recv(layer, p, ctl):
    await collect(layer, ctl, [p["channel"]], p["n"], p["n"], per_channel=False, ready={})


async def role_p2p_send(layer, p, ctl):
    channel, n, retries = p["channel"], p["n"], [0]
    ctl.send("ready")
    await ctl.wait("probe", 120)
    await probe_until_go(ctl, lambda k: send_retrying(layer, channel, probe_message(k), retries))
    retries[0] = 0
    cpu0, t0 = time.process_time(), time.monotonic()
    for i in range(n):
        await send_retrying(layer, channel, bench_message(i), retries)
    t1 = time.monotonic()
    ctl.send("sent", t0=t0, t1=t1, retries=retries[0], cpu=time.process_time() - cpu0)
    await ctl.wait("exit", 120)


async def role_rtt_pong(layer, p, ctl):
    ping, pong = p["ping"], p["pong"]

    async def echo():
        while True:
            msg = await layer.receive(ping)
            await layer.send(pong, msg)

    task = asyncio.ensure_future(echo())
    ctl.send("ready")
    cpu0 = time.process_time()
    try:
        while not task.done() and not ctl.has("exit"):
            if await ctl.wait("report", 0.5) is not None:
                ctl.send("cpu", cpu=time.process_time() - cpu0)
        if task.done():
            task.result()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def role_rtt_ping(layer, p, ctl):
    ping, pong, n = p["ping"], p["pong"], p["n"]
    ctl.send("ready")
    await ctl.wait("go", 120)
    pending = None  # one receive kept across timeouts: cancelling one unsubscribes pubsub
    for k in range(PROBE_ROUNDS):
        await layer.send(ping, probe_message(k))
        if pending is None:
            pending = asyncio.ensure_future(layer.receive(pong))
        done, _ = await asyncio.wait({pending}, timeout=PROBE_INTERVAL * 2)
        if done:
            reply, pending = pending.result(), None
            if reply["type"] == "bench.probe":
                break
    else:
        raise RuntimeError("no probe came back from the ponger")

    async def round_trip(message: dict) -> None:
        await layer.send(ping, message)
        while True:  # late replies to earlier probes are skipped
            reply = await layer.receive(pong)
            if reply["type"] == message["type"] and reply["seq"] == message["seq"]:
                return

    for k in range(WARMUP_ROUND_TRIPS):
        await round_trip({"type": "bench.warm", "seq": k, "payload": PAYLOAD})
    samples = []
    clock = time.perf_counter
    cpu0 = time.process_time()
    for i in range(n):
        start = clock()
        await round_trip(bench_message(i))
        samples.append(clock() - start)
    ctl.send("done", **percentiles(samples), mean=statistics.fmean(samples), cpu=time.process_time() - cpu0)
    await ctl.wait("exit", 120)


async def role_fan_recv(layer, p, ctl):
    channels = [await layer.new_channel() for _ in range(p["channels"])]
    for ch in channels:
        await layer.group_add(p["group"], ch)
    await collect(layer, ctl, channels, p["channels"] * p["sends"], p["sends"], per_channel=True, ready={})


async def role_fan_send(layer, p, ctl):
    group, n = p["group"], p["sends"]
    ctl.send("ready")
    await ctl.wait("probe", 120)
    await probe_until_go(ctl, lambda k: layer.group_send(group, probe_message(k)))
    cpu0, t0 = time.process_time(), time.monotonic()
    for i in range(n):
        await layer.group_send(group, bench_message(i))
    t1 = time.monotonic()
    ctl.send("sent", t0=t0, t1=t1, retries=0, cpu=time.process_time() - cpu0)
    await ctl.wait("exit", 120)


async def role_many_recv(layer, p, ctl):
    channels = [await layer.new_channel() for _ in range(p["channels"])]
    await collect(layer, ctl, channels, p["n"], p["n"], per_channel=False, ready={"channels": channels})


async def role_many_send(layer, p, ctl):
    n, retries = p["n"], [0]
    ctl.send("ready")
    channels = (await ctl.wait("probe", 120))["channels"]

    async def probe_round(k: int) -> None:
        for ch in channels:
            await send_retrying(layer, ch, probe_message(k), retries)

    await probe_until_go(ctl, probe_round, interval=0.5)
    retries[0] = 0
    width = len(channels)
    cpu0, t0 = time.process_time(), time.monotonic()
    for i in range(n):
        await send_retrying(layer, channels[i % width], bench_message(i), retries)
    t1 = time.monotonic()
    ctl.send("sent", t0=t0, t1=t1, retries=retries[0], cpu=time.process_time() - cpu0)
    await ctl.wait("exit", 120)


ROLES = {
    "p2p_recv": role_p2p_recv, "p2p_send": role_p2p_send,
    "rtt_pong": role_rtt_pong, "rtt_ping": role_rtt_ping,
    "fan_recv": role_fan_recv, "fan_send": role_fan_send,
    "many_recv": role_many_recv, "many_send": role_many_send,
}


async def _worker(role: str, kind: str, env: dict, params: dict, conn) -> None:
    ctl = Control(conn)
    layer = make_layer(kind, env, params["capacity"])
    try:
        await ROLES[role](layer, params, ctl)
    finally:
        ctl.close()
        try:
            await asyncio.wait_for(close_layer(kind, layer), 10)
        except Exception:  # closing is best effort: the process ends anyway
            pass


def worker_main(role: str, kind: str, env: dict, params: dict, conn, profile_path: str | None) -> None:
    """Entry point of a worker process."""
    profiler = None
    if profile_path:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        asyncio.run(_worker(role, kind, env, params, conn))
    except BaseException:
        try:
            conn.send(("error", {"trace": traceback.format_exc()}))
        except OSError:
            pass
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)
        conn.close()


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return {"n": len(ordered), "p50": rank(0.50), "p99": rank(0.99)}


# ===========================================================================================
# parent side
# ===========================================================================================

class RunFailed(Exception):
    pass


def stop_pid(proc, grace: float) -> None:
    """Wait ``grace`` seconds for ``proc`` (Popen or Process), then SIGTERM, then SIGKILL its PID."""
    def alive() -> bool:
        return proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()

    def wait(seconds: float) -> None:
        if isinstance(proc, subprocess.Popen):
            try:
                proc.wait(seconds)
            except subprocess.TimeoutExpired:
                pass
        else:
            proc.join(seconds)

    wait(grace)
    for sig, seconds in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not alive():
            return
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        wait(seconds)


class Worker:
    """A spawned worker process and the parent's end of its pipe."""

    def __init__(self, ctx, name: str, role: str, kind: str, env: dict, params: dict, profile_dir):
        self.name = name
        self.conn, child = ctx.Pipe()
        profile = os.path.join(profile_dir, f"{name}.prof") if profile_dir else None
        self.proc = ctx.Process(target=worker_main, args=(role, kind, env, params, child, profile),
                                name=name, daemon=True)
        self.proc.start()
        child.close()
        self.backlog: list[tuple[str, dict]] = []

    def send(self, word: str, **data) -> None:
        try:
            self.conn.send((word, data))
        except OSError:
            pass

    def expect(self, word: str, deadline: float) -> dict:
        while True:
            for i, (w, data) in enumerate(self.backlog):
                if w == word:
                    del self.backlog[i]
                    return data
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunFailed(f"{self.name}: no '{word}' before the deadline")
            try:
                if self.conn.poll(min(remaining, 0.2)):
                    w, data = self.conn.recv()
                    if w == "error":
                        raise RunFailed(f"{self.name} failed:\n{data['trace']}")
                    self.backlog.append((w, data))
                elif not self.proc.is_alive():
                    raise RunFailed(f"{self.name} exited with status {self.proc.exitcode} before '{word}'")
            except (EOFError, OSError):
                raise RunFailed(f"{self.name} closed its pipe before '{word}'") from None

    def stop(self, grace: float) -> None:
        self.send("exit")
        stop_pid(self.proc, grace)
        self.conn.close()


def host_busy(interval: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat), None if unknown."""
    def sample():
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def host_cpu_seconds() -> float | None:
    """CPU seconds all CPUs spent busy since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit: float, deadline: float, log) -> float | None:
    """Wait (at most ``limit`` seconds) until other programs leave the CPUs idle; return the
    busy fraction seen last. Another benchmark on a 2-core host would halve every number."""
    busy = host_busy()
    end = min(deadline, time.monotonic() + limit)
    warned = False
    while busy is not None and busy > QUIET_BUSY and time.monotonic() < end:
        if not warned:
            log(f"  host {busy:.0%} busy before the run: waiting up to {limit:g} s for quiet")
            warned = True
        time.sleep(1.0)
        busy = host_busy()
    return busy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def read_line(pipe, deadline: float) -> str:
    """One line from a subprocess pipe, or '' at EOF or the deadline."""
    buf = b""
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ""
        ready, _, _ = select.select([pipe], [], [], remaining)
        if not ready:
            return ""
        chunk = os.read(pipe.fileno(), 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


class Services:
    """Our own redis-server and channelbus broker, both stopped by PID in ``close``."""

    def __init__(self, workdir: str, profile_dir: str | None, deadline: float) -> None:
        self.procs: list[subprocess.Popen] = []
        self.env: dict = {}
        self.workdir = workdir
        try:
            self._start_redis(deadline)
            self._start_broker(profile_dir, deadline)
        except BaseException:
            self.close()
            raise

    def _start_redis(self, deadline: float) -> None:
        for _ in range(5):  # a free port may be taken before redis binds it: try another
            port = free_port()
            log = open(os.path.join(self.workdir, f"redis-{port}.log"), "wb")
            proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            log.close()
            self.procs.append(proc)
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with socket.create_connection((HOST, port), timeout=0.5) as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(16).startswith(b"+PONG"):
                            self.redis_pid = proc.pid
                            self.env["redis"] = f"redis://{HOST}:{port}"
                            return
                except OSError:
                    time.sleep(0.05)
            stop_pid(proc, 0)
        raise RuntimeError(f"redis-server did not start; see {self.workdir}/redis-*.log")

    def _start_broker(self, profile_dir: str | None, deadline: float) -> None:
        argv = [sys.executable]
        if profile_dir:
            argv += ["-m", "cProfile", "-o", os.path.join(profile_dir, "broker.prof")]
        argv += ["-m", "consumers.cli", "broker", "--bind", f"tcp://{HOST}:*", "--pub-bind", f"tcp://{HOST}:*",
                 "--log-level", "warning"]
        log = open(os.path.join(self.workdir, "broker.log"), "wb")
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(proc)
        line = read_line(proc.stdout, min(deadline, time.monotonic() + 30))
        match = re.search(r"listening on (\S+), publishing on (\S+)", line)
        if not match:
            raise RuntimeError(f"the broker did not start (said {line!r}); see {self.workdir}/broker.log")
        self.broker_pid = proc.pid
        self.env["bus"] = match.group(1)

    def check(self) -> None:
        """Raise RunFailed (with the end of its log) if the broker or redis-server has exited."""
        for proc in self.procs:
            if proc.poll() is not None:
                name = "broker" if proc.pid == getattr(self, "broker_pid", None) else "redis-server"
                raise RunFailed(f"the {name} (pid {proc.pid}) exited with status {proc.returncode};"
                                f" its log ends:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        import glob
        pattern = "broker.log" if name == "broker" else "redis-*.log"
        text = ""
        for path in sorted(glob.glob(os.path.join(self.workdir, pattern))):
            with open(path, errors="replace") as handle:
                text += "".join(handle.readlines()[-lines:])
        return text.rstrip() or "(empty)"

    def cpu(self) -> dict:
        """CPU seconds used so far by the broker and by redis-server (from /proc)."""
        tick = os.sysconf("SC_CLK_TCK")
        result = {}
        for name, pid in (("bus", getattr(self, "broker_pid", None)), ("redis", getattr(self, "redis_pid", None))):
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                result[name] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            except (OSError, ValueError, IndexError, TypeError):
                result[name] = None
        return result

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            stop_pid(proc, 10.0)
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()


# -- one run of one scenario on one layer ---------------------------------------------------

def one_run(scenario: str, kind: str, rep: int, opts, sizes: dict, services: "Services", ctx,
            deadline: float, log) -> dict:
    """One run with its bookkeeping: quiet wait, service checks, a log line; never raises
    RunFailed for the run itself (the result has an "error" instead)."""
    if time.monotonic() >= deadline:
        raise RunFailed("the overall --timeout ran out")
    busy = wait_quiet(opts.wait_quiet, deadline, log) if opts.wait_quiet else host_busy()
    run_deadline = min(deadline, time.monotonic() + opts.run_timeout)
    started = time.monotonic()
    try:
        services.check()
        res = run_once(scenario, kind, rep, opts, sizes, services, ctx, run_deadline)
        services.check()
    except RunFailed as exc:
        res = {"error": str(exc)}
        log(f"  {scenario:6} {kind:6} rep {rep + 1}: FAILED: {exc}")
    else:
        label, unit, _ = METRICS[scenario]
        extra = "" if scenario == "rtt" else f", losses {res['losses']}, retries {res['retries']}"
        if res.get("missing"):
            extra += f" (first missing seqs: {res['missing'][:20]})"
        foreign = res.get("foreign")
        log(f"  {scenario:6} {kind:6} rep {rep + 1}: {label} {_fmt(res['value'], unit)}"
            f"{extra} ({time.monotonic() - started:.1f} s; host busy before:"
            f" {'?' if busy is None else f'{busy:.0%}'}, others during:"
            f" {'?' if foreign is None else f'{foreign:.0%}'})")
    res["busy_before"] = busy
    return res


def run_once(scenario: str, kind: str, rep: int, opts, sizes: dict, services: Services, ctx,
             deadline: float) -> dict:
    tag = f"{scenario}-{kind}-{rep}-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    base = {"capacity": opts.capacity}
    workers: list[Worker] = []
    server = "bus" if kind == "bus" else "redis"
    server_cpu, host_cpu, walls = [], [], []

    def mark() -> None:
        server_cpu.append(services.cpu()[server])
        host_cpu.append(host_cpu_seconds())
        walls.append(time.monotonic())

    def with_cpu(result: dict, units: int, send_cpu, recv_cpu) -> dict:
        """CPU microseconds per unit (message, round trip or group_send) of each side."""
        mark()
        served = None if None in server_cpu[-2:] else server_cpu[-1] - server_cpu[-2]
        per = lambda v: None if v is None else v * 1e6 / units  # noqa: E731
        result["cpu_us"] = {"sender": per(send_cpu), "receivers": per(recv_cpu), "server": per(served)}
        # CPU that none of this run's processes used, as a share of the host during the run:
        # other programs (or this parent) competing with the measurement.
        if None not in (served, send_cpu, recv_cpu, *host_cpu[-2:]):
            foreign = (host_cpu[-1] - host_cpu[-2]) - served - send_cpu - recv_cpu
            result["foreign"] = max(0.0, foreign) / max(1e-9, (walls[-1] - walls[-2]) * (os.cpu_count() or 1))
        return result

    def spawn(role: str, name: str, **params) -> Worker:
        w = Worker(ctx, f"{scenario}-{kind}-{name}" + (f"-r{rep}" if opts.profile else ""), role, kind,
                   services.env, {**base, **params}, opts.profile)
        workers.append(w)
        return w

    try:
        if scenario == "p2p":
            n, channel = sizes["p2p"], f"bench.p2p.{tag}"
            recv = spawn("p2p_recv", "recv", channel=channel, n=n)
            send = spawn("p2p_send", "send", channel=channel, n=n)
            recv.expect("ready", deadline)
            send.expect("ready", deadline)
            send.send("probe")
            recv.expect("probed", deadline)
            mark()
            send.send("go")
            sent = send.expect("sent", deadline)
            recv.send("sender_done")
            got = recv.expect("done", deadline)
            return with_cpu(_throughput(n, sent, [got], n), n, sent["cpu"], got["cpu"])
        if scenario == "rtt":
            n = sizes["rtt"]
            pong = spawn("rtt_pong", "pong", ping=f"bench.ping.{tag}", pong=f"bench.pong.{tag}")
            ping = spawn("rtt_ping", "ping", ping=f"bench.ping.{tag}", pong=f"bench.pong.{tag}", n=n)
            pong.expect("ready", deadline)
            ping.expect("ready", deadline)
            mark()
            pong.send("report")
            pong_cpu0 = pong.expect("cpu", deadline)["cpu"]
            ping.send("go")
            res = ping.expect("done", deadline)
            pong.send("report")
            pong_cpu = pong.expect("cpu", deadline)["cpu"] - pong_cpu0
            result = {"value": res["p50"], "p50": res["p50"], "p99": res["p99"], "mean": res["mean"],
                      "n": res["n"], "losses": 0}
            return with_cpu(result, n, res["cpu"], pong_cpu)  # (sender: ping side, receivers: pong side)
        if scenario == "fanout":
            procs, chans, sends = sizes["fanout_procs"], sizes["fanout_channels"], sizes["fanout_sends"]
            group = f"bench-fan-{tag}"
            recvs = [spawn("fan_recv", f"recv{i}", group=group, channels=chans, sends=sends)
                     for i in range(procs)]
            send = spawn("fan_send", "send", group=group, sends=sends)
            for w in recvs:
                w.expect("ready", deadline)
            send.expect("ready", deadline)
            send.send("probe")
            for w in recvs:
                w.expect("probed", deadline)
            mark()
            send.send("go")
            sent = send.expect("sent", deadline)
            for w in recvs:
                w.send("sender_done")
            got = [w.expect("done", deadline) for w in recvs]
            return with_cpu(_throughput(procs * chans * sends, sent, got, sends), sends, sent["cpu"],
                            sum(g["cpu"] for g in got))
        if scenario == "many":
            n, width = sizes["many_messages"], sizes["many_channels"]
            recv = spawn("many_recv", "recv", channels=width, n=n)
            send = spawn("many_send", "send", n=n)
            channels = recv.expect("ready", deadline)["channels"]
            send.expect("ready", deadline)
            send.send("probe", channels=channels)
            recv.expect("probed", deadline)
            mark()
            send.send("go")
            sent = send.expect("sent", deadline)
            recv.send("sender_done")
            got = recv.expect("done", deadline)
            return with_cpu(_throughput(n, sent, [got], n), n, sent["cpu"], got["cpu"])
        raise ValueError(scenario)
    finally:
        for w in workers:
            w.send("exit")
        for w in workers:
            w.stop(grace=max(1.0, min(15.0, deadline - time.monotonic())))


def _throughput(expected: int, sent: dict, got: list[dict], sends: int) -> dict:
    count = sum(g["count"] for g in got)
    lasts = [g["last"] for g in got if g["last"] is not None]
    elapsed = (max(lasts) - sent["t0"]) if lasts else None
    return {
        "value": count / elapsed if elapsed else None,
        "send_rate": sends / max(1e-9, sent["t1"] - sent["t0"]),  # the sender alone, per second
        "send_seconds": sent["t1"] - sent["t0"],
        "elapsed": elapsed, "expected": expected, "count": count, "losses": expected - count,
        "dups": sum(g["dups"] for g in got), "disorder": sum(g["disorder"] for g in got),
        "retries": sent.get("retries", 0),
        "missing": [m for g in got for m in g.get("missing", [])][:50],
    }


# -- report ---------------------------------------------------------------------------------

METRICS = {  # scenario -> (row label, unit, higher is better)
    "p2p": ("p2p messages/s", "msg/s", True),
    "rtt": ("rtt p50", "ms", False),
    "fanout": ("fanout deliveries/s", "deliveries/s", True),
    "many": ("many messages/s", "msg/s", True),
}
TARGETS = {  # scenario -> (layer compared with, comparison, bound, text)
    "p2p": ("core", ">=", 15.0, ">= 15x core"),
    "many": ("core", ">=", 15.0, ">= 15x core"),
    "rtt": ("pubsub", "<=", 0.5, "<= 0.5x pubsub"),
    "fanout": ("pubsub", ">=", 1.2, ">= 1.2x pubsub, no losses"),
}
NOTES = {
    ("pubsub", "p2p"): "no capacity (ChannelFull never raised); at most once, to whoever is subscribed",
    ("pubsub", "many"): "no capacity (ChannelFull never raised); at most once, to whoever is subscribed",
    ("pubsub", "rtt"): "at most once",
    ("pubsub", "fanout"): "no capacity: nothing bounds a slow member's queue",
}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(results: dict) -> dict:
    """results[scenario][layer] = list of run dicts (or {"error": ...}) -> medians."""
    summary = {}
    for scenario, by_layer in results.items():
        summary[scenario] = {}
        for kind, runs in by_layer.items():
            ok = [r for r in runs if "error" not in r]
            s = {"runs": len(runs), "ok": len(ok), "values": [r.get("value") for r in ok]}
            for side in ("sender", "receivers", "server"):
                s[f"cpu_{side}"] = median([r.get("cpu_us", {}).get(side) for r in ok])
            busy = [r.get("busy_before") for r in runs if r.get("busy_before") is not None]
            s["busy"] = max(busy) if busy else None
            foreign = [r.get("foreign") for r in ok if r.get("foreign") is not None]
            s["foreign"] = max(foreign) if foreign else None
            s["median"] = median(s["values"])
            if scenario == "rtt":
                s["p99"] = median([r["p99"] for r in ok])
            else:
                s["losses"] = [r["losses"] for r in ok]
                s["dups"] = [r["dups"] for r in ok]
                s["retries"] = [r["retries"] for r in ok]
                s["send_rate"] = median([r.get("send_rate") for r in ok])
            summary[scenario][kind] = s
    return summary


def _fmt(value, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value * 1000:.3f} ms"
    return f"{value:,.0f}"


def _ratio(a, b, higher: bool) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def render(summary: dict, layers: list[str], opts, sizes: dict) -> str:
    lines = []
    head = ["scenario", *(LAYER_TITLES[k] for k in layers)]
    ratio_cols = []
    if "core" in layers:
        ratio_cols += [(k, "core") for k in layers if k != "core"]
    if "pubsub" in layers and "bus" in layers:
        ratio_cols.append(("bus", "pubsub"))
    head += [f"{a} / {b}" for a, b in ratio_cols] + ["target", "met"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for scenario in SCENARIOS:
        if scenario not in summary:
            continue
        label, unit, higher = METRICS[scenario]
        by = summary[scenario]
        rows = [(label, "median")] + ([("rtt p99", "p99")] if scenario == "rtt" else [])
        for row_label, field in rows:
            cells = [row_label]
            for k in layers:
                s = by.get(k)
                cells.append(_fmt(s.get(field) if s else None, unit) if s and s["ok"] else "failed")
            for a, b in ratio_cols:
                ra = by.get(a, {}).get(field) if by.get(a, {}).get("ok") else None
                rb = by.get(b, {}).get(field) if by.get(b, {}).get("ok") else None
                r = _ratio(ra, rb, higher)
                cells.append("n/a" if r is None else f"{r:.2f}x")
            target_text, met = "", ""
            if field == "median" and scenario in TARGETS and "bus" in layers:
                other, cmp, bound, target_text = TARGETS[scenario]
                bus = by.get("bus", {})
                ref = by.get(other, {})
                r = _ratio(bus.get("median"), ref.get("median"), higher) if bus.get("ok") and ref.get("ok") else None
                if r is None:
                    met = "n/a"
                else:
                    ok = r >= bound if cmp == ">=" else r <= bound
                    if scenario == "fanout" and any(bus.get("losses") or []):
                        ok = False
                    met = ("yes" if ok else "**no**") + f" ({r:.2f}x)"
            cells += [target_text, met]
            lines.append("| " + " | ".join(cells) + " |")
    out = ["## Medians", "", *lines, "", "## Details per layer", ""]
    out.append("| scenario | layer | runs ok | each run | losses | duplicates | ChannelFull retries | sender alone"
               " | CPU µs per unit: sender / receiver(s) / broker or redis | host busy before / others during (max)"
               " | note |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        if scenario not in summary:
            continue
        label, unit, _ = METRICS[scenario]
        for k in layers:
            s = summary[scenario].get(k)
            if not s:
                continue
            each = ", ".join(_fmt(v, unit) for v in s["values"]) or "-"
            if scenario == "rtt":
                losses = dups = retries = sender = "-"
            else:
                losses = ", ".join(map(str, s["losses"])) or "-"
                dups = ", ".join(map(str, s["dups"])) or "-"
                retries = "n/a (no capacity)" if k == "pubsub" else (", ".join(map(str, s["retries"])) or "-")
                per = "group_sends/s" if scenario == "fanout" else "sends/s"
                sender = f"{_fmt(s['send_rate'], unit)} {per}" if s["send_rate"] else "-"
            busy = ("?" if s["busy"] is None else f"{s['busy']:.0%}") + " / " + (
                "?" if s["foreign"] is None else f"{s['foreign']:.0%}")
            cpu = " / ".join("?" if s[f"cpu_{side}"] is None else f"{s[f'cpu_{side}']:.0f}"
                             for side in ("sender", "receivers", "server"))
            out.append(f"| {scenario} | {LAYER_TITLES[k]} | {s['ok']}/{s['runs']} | {each} | {losses} | {dups} |"
                       f" {retries} | {sender} | {cpu} | {busy} | {NOTES.get((k, scenario), '')} |")
    out += ["", f"Sizes: p2p {sizes['p2p']:,} messages; rtt {sizes['rtt']:,} round trips;"
            f" fanout {sizes['fanout_procs']} processes x {sizes['fanout_channels']} channels,"
            f" {sizes['fanout_sends']:,} group_sends; many {sizes['many_channels']:,} channels,"
            f" {sizes['many_messages']:,} messages. capacity {opts.capacity:,}, expiry {EXPIRY} s"
            f" (bus and core; pubsub has neither). Medians of {opts.repetitions} repetition(s).",
            "", "CPU per unit: process CPU time of each side during the timed phase divided by the messages"
            " (p2p, many), round trips (rtt: sender = ping side, receiver = pong side) or group_sends (fanout;"
            " receivers summed over all receiver processes); broker or redis-server from /proc."
            " Host busy before: all CPUs, just before the run (the broker and redis idle). Others during:"
            " CPU used by no process of the run during its timed phase, as a share of all CPUs (other"
            " programs on the host; /proc tick granularity makes small values noise)."]
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(prog="benchmarks/layers.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (1 repetition unless -r)")
    parser.add_argument("-r", "--repetitions", type=int, default=None, help="repetitions per run (default 3)")
    parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated: bus,core,pubsub")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: p2p,rtt,fanout,many")
    parser.add_argument("--capacity", type=int, default=25_000, help="capacity given to every layer that has one")
    parser.add_argument("--timeout", type=float, default=3600.0, help="whole invocation, seconds")
    parser.add_argument("--run-timeout", type=float, default=300.0, help="one run of one scenario, seconds")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each run wait up to S seconds until the host's CPUs are idle")
    parser.add_argument("--max-others", type=float, default=0.15, metavar="FRACTION",
                        help="a run during which other programs used more than this share of the CPUs"
                             " is noisy (default 0.15)")
    parser.add_argument("--redo-noisy", type=int, default=0, metavar="N",
                        help="run a noisy run again, up to N times; the last attempt counts (default 0)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the message counts (not processes or channels), e.g. to profile")
    parser.add_argument("--json", metavar="FILE", help="also write every run's raw numbers here")
    parser.add_argument("--profile", metavar="DIR", help="cProfile every worker and the broker into DIR")
    opts = parser.parse_args(argv)
    opts.layers = [k.strip() for k in opts.layers.split(",") if k.strip()]
    opts.scenarios = [s.strip() for s in opts.scenarios.split(",") if s.strip()]
    for k in opts.layers:
        if k not in LAYERS:
            parser.error(f"unknown layer {k!r}; choose from {', '.join(LAYERS)}")
    for s in opts.scenarios:
        if s not in SCENARIOS:
            parser.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    if opts.repetitions is None:
        opts.repetitions = 1 if opts.quick else 3
    if opts.repetitions < 1:
        parser.error("--repetitions must be at least 1")
    return opts


def main(argv=None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    sizes = dict(QUICK if opts.quick else FULL)
    if opts.scale != 1:  # message counts only (processes and channels stay), e.g. to profile longer
        for key in ("p2p", "rtt", "fanout_sends", "many_messages"):
            sizes[key] = max(1, int(sizes[key] * opts.scale))
    deadline = time.monotonic() + opts.timeout
    if opts.profile:
        os.makedirs(opts.profile, exist_ok=True)
        opts.profile = os.path.abspath(opts.profile)
    ctx = multiprocessing.get_context("spawn")
    results: dict = {s: {k: [] for k in opts.layers} for s in opts.scenarios}
    discarded: list[dict] = []  # runs repeated because other programs competed for the CPUs
    failures = 0
    with tempfile.TemporaryDirectory(prefix="channelbus-layers-") as workdir:
        services = Services(workdir, opts.profile, deadline)
        log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
        log(f"redis-server pid {services.redis_pid} at {services.env['redis']};"
            f" broker pid {services.broker_pid} at {services.env['bus']}")
        try:
            for scenario in opts.scenarios:
                for rep in range(opts.repetitions):
                    for kind in opts.layers:  # interleaved, so drift on the host hits every layer alike
                        for attempt in range(1 + opts.redo_noisy):
                            res = one_run(scenario, kind, rep, opts, sizes, services, ctx, deadline, log)
                            if "error" in res:
                                failures += 1
                            noisy = (res.get("foreign") or 0.0) > opts.max_others
                            if not noisy or attempt == opts.redo_noisy or "error" in res:
                                break
                            res["discarded"] = True
                            discarded.append({"scenario": scenario, "layer": kind, "rep": rep, **res})
                            log(f"  (other programs used {res['foreign']:.0%} of the CPUs during that run:"
                                " running it again)")
                        results[scenario][kind].append(res)
        except RunFailed as exc:
            failures += 1
            log(f"stopped: {exc}")
        finally:
            broker_log = services.log_tail("broker")
            if broker_log != "(empty)":
                log(f"the broker logged (warnings and errors, last lines):\n{broker_log}")
            services.close()
    summary = summarise(results)
    print(render(summary, opts.layers, opts, sizes))
    if discarded:
        print(f"\n{len(discarded)} run(s) were repeated because other programs used more than"
              f" {opts.max_others:.0%} of the CPUs during them (--max-others); their figures, not in the medians:")
        for d in discarded:
            label, unit, _ = METRICS[d["scenario"]]
            print(f"- {d['scenario']} {LAYER_TITLES[d['layer']]} rep {d['rep'] + 1}: {_fmt(d.get('value'), unit)}"
                  f" (others {d['foreign']:.0%})")
    if opts.json:
        with open(opts.json, "w") as handle:
            json.dump({"sizes": sizes, "capacity": opts.capacity, "repetitions": opts.repetitions,
                       "python": platform.python_version(), "cpus": os.cpu_count(),
                       "results": results, "discarded": discarded, "summary": summary}, handle, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
