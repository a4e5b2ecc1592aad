"""Soak: producers, workers and a chat group for M minutes, with broker restarts and dead consumers.

Usage::

    .venv/bin/python benchmarks/soak.py --minutes M [--seed S] [--producers 2] [--workers 2]
        [--rate 150] [--chat-rate 10] [--capacity 2000] [--expiry 60] [--json]

A ``channelbus broker`` process on two loopback ports chosen at start; ``--producers``
processes (blocking ``Client``) each send numbered jobs ``{"p": producer, "n": seq}`` to the
normal channel ``soak.work`` at ``--rate`` per second, and producer 0 also group-sends numbered
chat messages ``{"k": seq}`` to the group ``soak.chat`` at ``--chat-rate``; ``--workers``
processes (``AsyncClient``) compete for ``soak.work`` and are each a member of ``soak.chat`` with
a channel of their own. At moments drawn from ``--seed`` (bounded: one event every 15-35 s, none
in the first 10 s or the last 15 s) the broker is killed with SIGKILL and started again on the
same endpoints after 0.2-1.5 s, or a worker is killed with SIGKILL and a new one started 1 s
later. At the end producers stop, workers drain until nothing comes for 3 s, and every process
is stopped by its PID.

Every process logs each event as one JSON line as it happens (a killed process keeps what it
wrote): a producer every send and its outcome (accepted, ChannelFull, or failed: not accepted,
e.g. the broker was away for the client's whole timeout), a worker every message it received,
its link events and when it joined the group. The script then reconciles:

- soak.work: sent, accepted, refused (full), failed, delivered (accepted and received),
  duplicates, expired (the brokers' own counter, sampled every 0.5 s and just before each kill),
  lost in a broker kill (accepted at most ``--window`` s before a kill of the broker that held it
  and never received), lost in a consumer kill (the same around a worker's kill: what it had
  taken and not yet logged), and lost: the rest, which must be 0.
- soak.chat: per member, the group messages accepted while it was a member (joined, not yet
  killed); received; missed in a broker-kill window (from ``--window`` s before a kill until
  every member has said it reconnected, plus ``--window``: group messages sent before a
  member's memberships are replayed are missed, by design); lost: the rest, which must be 0.
- The broker's peak resident memory (VmRSS) over all its incarnations.

Exit status 0 when nothing is lost outside the kill windows, 1 otherwise, 2 if it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
READY_RE = re.compile(r"listening on (\S+), publishing on (\S+)")
WORK, CHAT = "soak.work", "soak.chat"
MIB = 1024 * 1024


class Log:
    """JSON lines, one write(2) each, so a SIGKILLed process loses nothing it logged."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, **event) -> None:
        event["t"] = time.time()
        os.write(self.fd, (json.dumps(event) + "\n").encode())


# -- producer -------------------------------------------------------------------------------------

def role_producer(args) -> None:
    sys.path.insert(0, ROOT)
    from clients import BusError, ChannelFull, Client

    log = Log(args.log)
    bus = None
    while bus is None and time.time() < args.end:
        try:
            bus = Client(args.url, timeout=5, capacity=args.capacity, expiry=args.expiry)
        except BusError:
            time.sleep(0.2)  # (the broker is being restarted)
    if bus is None:
        return
    n = k = 0
    started = time.monotonic()
    next_chat = started
    while time.time() < args.end:
        try:
            bus.send(WORK, {"type": "job", "p": args.index, "n": n})
            outcome = "ok"
        except ChannelFull:
            outcome = "full"
        except BusError as exc:
            outcome = "fail:" + (exc.code or type(exc).__name__)
        log(e="send", p=args.index, n=n, r=outcome)
        n += 1
        if args.chat_rate and time.monotonic() >= next_chat:
            try:
                bus.group_send(CHAT, {"type": "chat", "k": k})
                outcome = "ok"
            except BusError as exc:
                outcome = "fail:" + (exc.code or type(exc).__name__)
            log(e="gsend", k=k, r=outcome)
            k += 1
            next_chat += 1.0 / args.chat_rate
        delay = started + n / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    bus.close()


# -- worker ---------------------------------------------------------------------------------------

def role_worker(args) -> None:
    sys.path.insert(0, ROOT)
    from clients import AsyncClient, BusError, ReceiveTimeout

    log = Log(args.log)

    async def main() -> None:
        bus = AsyncClient(args.url, timeout=5, capacity=args.capacity, expiry=args.expiry)
        while True:
            try:
                await bus.connect()
                break
            except BusError:
                if time.time() > args.end:
                    return
                await asyncio.sleep(0.2)
        bus.add_listener(lambda event: log(e="link", w=args.name, ev=event))
        mine = bus.new_channel()
        while True:
            try:
                await bus.group_add(CHAT, mine)
                break
            except BusError:
                if time.time() > args.end:
                    return
        log(e="joined", w=args.name)

        async def consume(channel: str, kind: str, fields: tuple[str, ...]) -> None:
            last = time.time()
            while True:
                try:
                    message = await bus.receive(channel, timeout=1.0)
                except ReceiveTimeout:
                    if time.time() > args.end and time.time() - last > 3.0:
                        return
                    continue
                last = time.time()
                log(e=kind, w=args.name, **{f: message[f] for f in fields})

        await asyncio.gather(consume(WORK, "work", ("p", "n")), consume(mine, "chat", ("k",)))
        await bus.close()

    asyncio.run(main())


# -- parent ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def stop(process: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
    """Signal by PID, then SIGKILL if it has not exited within 5 s; reap it."""
    if process.poll() is None:
        os.kill(process.pid, signum)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)


class Soak:
    def __init__(self, args) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.dir = tempfile.mkdtemp(prefix="channelbus-soak-")
        self.bind = f"tcp://127.0.0.1:{free_port()}"
        self.pub_bind = f"tcp://127.0.0.1:{free_port()}"
        self.processes: list[subprocess.Popen] = []
        self.broker: subprocess.Popen | None = None
        self.broker_kills: list[float] = []
        self.consumer_kills: list[tuple[float, str]] = []
        self.expired: dict[int, int] = {}  # broker pid -> its 'expired' counter, last seen
        self.peak_rss = 0
        self.lock = threading.Lock()

    def start_broker(self) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "consumers.cli", "broker", "--bind", self.bind, "--pub-bind", self.pub_bind,
             "--log-level", "WARNING"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(os.path.join(self.dir, "broker.stderr"), "ab"),
            stdin=subprocess.DEVNULL,
        )
        self.processes.append(process)
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            ready = selector.select(15) and READY_RE.search(process.stdout.readline().decode())
        if not ready:
            raise RuntimeError("the broker did not start")
        self.broker = process

    def start_child(self, role: str, name: str, *extra: str) -> subprocess.Popen:
        args = self.args
        process = subprocess.Popen(
            [sys.executable, HERE, "--role", role, "--url", self.bind, "--log",
             os.path.join(self.dir, f"{name}.jsonl"), "--name", name, "--end", str(self.end),
             "--capacity", str(args.capacity), "--expiry", str(args.expiry), *extra],
            cwd=ROOT, stdin=subprocess.DEVNULL,
        )
        self.processes.append(process)
        return process

    def sample(self, holder: list) -> None:
        """The broker's RSS and its expired counter (holder[0]: a Client kept between calls;
        the lock keeps the two threads that sample from using it at once)."""
        sys.path.insert(0, ROOT)
        from clients import BusError, Client

        with self.lock:
            broker = self.broker
            if broker is None or broker.poll() is not None:
                return
            self.peak_rss = max(self.peak_rss, rss(broker.pid))
            try:
                if holder[0] is None:
                    holder[0] = Client(self.bind, timeout=1)
                self.expired[broker.pid] = holder[0].stats()["counters"]["expired"]
            except BusError:
                pass

    def run(self) -> dict:
        args = self.args
        total = args.minutes * 60.0
        self.end = time.time() + total
        events = []
        at = 10.0 + self.rng.uniform(5, 20)
        kinds = ["broker", "consumer"]
        while at < total - 15:
            events.append((at, kinds[len(events) % 2] if self.rng.random() < 0.7 else self.rng.choice(kinds)))
            at += self.rng.uniform(15, 35)
        self.start_broker()
        workers = {f"w{i}.0": self.start_child("worker", f"w{i}.0") for i in range(args.workers)}
        for i in range(args.producers):
            chat = str(args.chat_rate if i == 0 else 0)
            self.start_child("producer", f"p{i}", "--index", str(i), "--rate", str(args.rate), "--chat-rate", chat)
        holder: list = [None]
        stop_event = threading.Event()

        def sampler_loop() -> None:
            while not stop_event.wait(0.5):
                self.sample(holder)

        sampler = threading.Thread(target=sampler_loop, daemon=True)
        sampler.start()
        start = time.time()
        try:
            for offset, kind in events:
                time.sleep(max(0.0, start + offset - time.time()))
                if kind == "broker":
                    self.sample(holder)
                    with self.lock:
                        os.kill(self.broker.pid, signal.SIGKILL)
                        self.broker.wait(5)
                        self.broker_kills.append(time.time())
                    time.sleep(self.rng.uniform(0.2, 1.5))
                    with self.lock:
                        self.start_broker()
                    print(f"[{time.time() - start:6.1f}s] broker killed and restarted", flush=True)
                else:
                    alive = [name for name, p in workers.items() if p.poll() is None]
                    name = self.rng.choice(sorted(alive))
                    os.kill(workers[name].pid, signal.SIGKILL)
                    workers[name].wait(5)
                    self.consumer_kills.append((time.time(), name))
                    time.sleep(1.0)
                    base, generation = name.split(".")
                    new = f"{base}.{int(generation) + 1}"
                    workers[new] = self.start_child("worker", new)
                    print(f"[{time.time() - start:6.1f}s] worker {name} killed, {new} started", flush=True)
            for process in self.processes:  # producers end at self.end, workers drain after it
                if process is not self.broker and process.poll() is None:
                    try:
                        process.wait(max(1.0, self.end - time.time() + 30))
                    except subprocess.TimeoutExpired:
                        stop(process)
            self.sample(holder)
        finally:
            stop_event.set()
            sampler.join(5)
            if holder[0] is not None:
                holder[0].close()
            for process in reversed(self.processes):
                stop(process)
        return self.reconcile(total)

    # -- reconciliation -----------------------------------------------------------------------

    def read(self) -> list[dict]:
        events = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".jsonl"):
                with open(os.path.join(self.dir, name)) as handle:
                    for line in handle:
                        if line.endswith("\n"):
                            events.append(json.loads(line))
        return events

    def reconcile(self, total: float) -> dict:
        window = self.args.window
        events = self.read()
        sends = [e for e in events if e["e"] == "send"]
        received: dict[tuple[int, int], int] = {}
        for e in events:
            if e["e"] == "work":
                key = (e["p"], e["n"])
                received[key] = received.get(key, 0) + 1

        def near(kills: list[float], t: float) -> bool:
            return any(0 <= kill - t <= window for kill in kills)

        consumer_kill_times = [t for t, _ in self.consumer_kills]
        work = dict.fromkeys(("sent", "accepted", "refused_full", "failed", "failed_but_delivered", "delivered",
                              "duplicates", "lost_in_broker_kill", "lost_in_consumer_kill", "undelivered"), 0)
        unexplained = []
        for e in sends:
            key = (e["p"], e["n"])
            work["sent"] += 1
            seen = received.get(key, 0)
            if e["r"] == "full":
                work["refused_full"] += 1
                continue
            if e["r"] != "ok":
                work["failed"] += 1
                work["failed_but_delivered"] += bool(seen)
                continue
            work["accepted"] += 1
            if seen:
                work["delivered"] += 1
                work["duplicates"] += seen - 1
            elif near(self.broker_kills, e["t"]):
                work["lost_in_broker_kill"] += 1
            elif near(consumer_kill_times, e["t"]):
                work["lost_in_consumer_kill"] += 1
            else:
                work["undelivered"] += 1
                unexplained.append(e)
        work["expired"] = sum(self.expired.values())
        # Undelivered messages outside every kill window are lost unless the brokers expired
        # that many (nothing tells which ones expired, so the count is what is compared).
        work["lost"] = max(0, work["undelivered"] - work["expired"])

        chat = self.reconcile_chat(events)
        figures = {
            "minutes": self.args.minutes, "seed": self.args.seed, "broker_kills": len(self.broker_kills),
            "consumer_kills": len(self.consumer_kills), "broker_peak_rss_mib": round(self.peak_rss / MIB, 1),
            WORK: work, CHAT: chat, "logs": self.dir,
            "first_unexplained": unexplained[:5],
        }
        figures["passed"] = work["lost"] == 0 and chat["lost"] == 0 and work["accepted"] > 0
        return figures

    def reconcile_chat(self, events: list[dict]) -> dict:
        window = self.args.window
        gsends = [e for e in events if e["e"] == "gsend"]
        joined = {e["w"]: e["t"] for e in events if e["e"] == "joined"}
        killed = {name: t for t, name in self.consumer_kills}
        seen: dict[str, set[int]] = {}
        for e in events:
            if e["e"] == "chat":
                seen.setdefault(e["w"], set()).add(e["k"])
        # A broker-kill window lasts from `window` before the kill until every live member has
        # said "reconnected" (its memberships replayed and live again), plus `window`.
        reconnects = sorted(e["t"] for e in events if e["e"] == "link" and e["ev"] == "reconnected")
        windows = []
        for kill in self.broker_kills:
            after = [t for t in reconnects if t > kill]
            members = sum(1 for name, t in joined.items() if t < kill and killed.get(name, float("inf")) > kill)
            end = after[members - 1] if members and len(after) >= members else kill + 30
            windows.append((kill - window, end + window))
        chat = dict.fromkeys(("sent", "accepted", "failed", "expected", "received", "missed_in_broker_kill",
                              "missed_as_member_died", "lost"), 0)
        for e in gsends:
            chat["sent"] += 1
            if e["r"] != "ok":
                chat["failed"] += 1
                continue
            chat["accepted"] += 1
            for name, since in joined.items():
                until = killed.get(name, float("inf"))
                if not since < e["t"] <= until:
                    continue  # (not a member then)
                if e["t"] + window > until:  # sent just before the member was killed
                    chat["missed_as_member_died"] += e["k"] not in seen.get(name, set())
                    continue
                chat["expected"] += 1
                if e["k"] in seen.get(name, set()):
                    chat["received"] += 1
                elif any(start <= e["t"] <= end for start, end in windows):
                    chat["missed_in_broker_kill"] += 1
                else:
                    chat["lost"] += 1
        return chat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=150.0, help="jobs per second per producer")
    parser.add_argument("--chat-rate", type=float, default=10.0, help="group messages per second")
    parser.add_argument("--capacity", type=int, default=2000)
    parser.add_argument("--expiry", type=float, default=60.0)
    parser.add_argument("--window", type=float, default=5.0,
                        help="seconds before a kill in which an accepted, undelivered message counts as lost to it")
    parser.add_argument("--json", action="store_true")
    # child roles
    parser.add_argument("--role", choices=["producer", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--end", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "producer":
        role_producer(args)
        return 0
    if args.role == "worker":
        role_worker(args)
        return 0
    try:
        figures = Soak(args).run()
    except Exception as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(figures))
    else:
        print_table(figures)
    return 0 if figures["passed"] else 1


def print_table(figures: dict) -> None:
    print(f"soak: {figures['minutes']:g} min, seed {figures['seed']}: {figures['broker_kills']} broker kills,"
          f" {figures['consumer_kills']} worker kills; broker peak RSS {figures['broker_peak_rss_mib']} MiB")
    for name in (WORK, CHAT):
        print(f"  {name}")
        for key, value in figures[name].items():
            print(f"    {key:>24}: {value}")
    if figures["first_unexplained"]:
        print("  first unexplained:", figures["first_unexplained"])
    print(f"  logs in {figures['logs']}")
    print("  PASS" if figures["passed"] else "  FAIL: messages lost outside the kill windows")


if __name__ == "__main__":
    sys.exit(main())
