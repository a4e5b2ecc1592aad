"""The worker side of the layers benchmark: what runs in each spawned process. ``worker_main``
is the process entry point (the parent pickles it by its name, ``layerbench.roles.worker_main``,
so the spawned child imports this module from the ``sys.path`` it inherits); it builds one
channel layer, runs one role (``ROLES``: the sending and receiving sides of p2p, rtt, fanout and
many) and talks to the parent over a pipe through ``Control`` ("ready", "probe", "go", "sent",
"done", "exit"). A change to what a scenario does on the wire belongs here.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
import traceback

from .config import (DRAIN, EXPIRY, MAX_RETRIES, PAYLOAD, PROBE_INTERVAL, PROBE_ROUNDS, RETRY_SLEEP,
                     WARMUP_ROUND_TRIPS)


def bench_message(seq: int) -> dict:
    return {"type": "bench.msg", "seq": seq, "payload": PAYLOAD}


def probe_message(seq: int) -> dict:
    return {"type": "bench.probe", "seq": seq, "payload": PAYLOAD}


def make_layer(kind: str, env: dict, capacity: int):
    if kind == "bus":
        from clients.channel_layer import BusChannelLayer
        return BusChannelLayer(hosts=[env["bus"]], capacity=capacity, expiry=EXPIRY)
    if kind == "bus-curve":  # the same against the broker with keys, with this client's keys
        from clients.channel_layer import BusChannelLayer
        secret_key, server_key = env["bus-curve-keys"]
        return BusChannelLayer(hosts=[env["bus-curve"]], capacity=capacity, expiry=EXPIRY,
                               secret_key=secret_key, server_key=server_key)
    if kind == "core":
        from channels_redis.core import RedisChannelLayer
        return RedisChannelLayer(hosts=[env["redis"]], capacity=capacity, expiry=EXPIRY)
    if kind == "pubsub":
        from channels_redis.pubsub import RedisPubSubChannelLayer
        return RedisPubSubChannelLayer(hosts=[env["redis"]])  # takes no capacity nor expiry
    if kind == "floor":
        from .floor import FloorLayer
        return FloorLayer(env["floor"])
    raise ValueError(f"unknown layer {kind!r}")


async def close_layer(kind: str, layer) -> None:
    if kind in ("bus", "bus-curve", "floor"):
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
