"""Randomized system test: real processes, seeded concurrency, pauses, CPU contention, kills.

    channelbus bench chaos -- --minutes 10          # the long form: rounds until time is up
    python benchmarks/chaos.py --seeds 1,2 --seconds 20   # fixed rounds (the test suite's short form)

Each round starts a broker process in its check mode (``--check``: conservation after every
batch and tick) and, from its seed: receiver processes (blocking or asyncio; one to three per
work channel; each with a process-specific channel of its own in a group), sender processes
(blocking ones with one ``Client`` shared by 1 to 8 threads, asyncio ones with 1 to 256
concurrent sends on one ``AsyncClient``) that send to work channels with capacities from 1 to
100,000, to the receivers' own channels and to the group, with random pauses on both sides, and
a process that burns CPU beside them. In the ``kills`` variant the broker is SIGKILLed at random
moments and started again on the same endpoints.

Every process keeps its own record (every send that returned, with when; every message received)
and the round is judged from those records alone:

- every message whose ``send`` returned is received exactly once, by a receiver of its channel,
  unless the broker was killed after the send returned (a killed broker loses what it held: the
  documented exception, counted as "lost at a kill");
- nothing is received that was not sent, and nothing twice;
- a member of the group receives every group message whose send began after its ``group_add``
  returned (or, after a kill, after its client said "reconnected") and before any later kill,
  except those its client counted as skipped (full) or lost by the publisher;
- no receiver's connection drops while the broker runs (steady variant);
- no call raises anything but ``ChannelFull`` (retried) and, in the kills variant,
  ``BrokerUnavailable`` (the send is then "in doubt": it may or may not have been carried out)
  and ``MessagesLost`` (earlier pipelined sends that never left the process when the connection
  dropped: counted, and at most the sends lost at kills);
- no process dies, none hangs, the broker's check mode never fires, and at the end STATS accounts
  for every message the last broker accepted.

It prints a progress line per round and a final table, and exits with status 1 if any round broke
a rule. Loops are bounded: each round by ``--seconds`` plus a drain of at most 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CAPACITIES = (1, 2, 3, 5, 20, 100, 100_000)
GROUP = "chaos.room"
IDLE_END = 2.0  # seconds without a message after the stop, before a receiver says it is done
EXIT_BROKEN_RULE = 70


# -- the roles: each runs in a process of its own -----------------------------------------------


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def _stopping(config: dict) -> bool:
    return os.path.exists(config["stop_file"])


def _payload(rng: random.Random, ident: str, kind: str) -> dict:
    message = {"type": "chaos.message", "id": ident, "kind": kind}
    if rng.random() < 0.1:
        message["pad"] = rng.randbytes(rng.randint(1, 4000))
    return message


def _targets(config: dict, rng: random.Random) -> tuple[str, str]:
    """(kind, name) of the next send: mostly a work channel, sometimes a receiver's own channel
    or the group."""
    roll = rng.random()
    owned = config.get("owned") or []
    if roll < 0.08 and owned:
        return "direct", rng.choice(owned)
    if roll < 0.14:
        return "group", GROUP
    return "work", rng.choice(config["channels"])


def sender_main(config: dict) -> None:
    from clients import AsyncClient, BrokerUnavailable, ChannelFull, Client, MessagesLost

    rng = random.Random(config["seed"])
    capacities = {name: cap for name, cap in config["capacities"].items()}
    record = {"ok": [], "doubt": [], "full": 0, "announced_lost": 0, "errors": [], "counters": {},
              "disconnected": []}

    def on_link(event: str) -> None:
        if event == "disconnected":
            record["disconnected"].append(time.monotonic())
    lock = threading.Lock()
    numbers = iter(range(10**9))

    def next_id() -> str:
        with lock:
            return f"{config['name']}:{next(numbers)}"

    def done(kind: str, name: str, ident: str, started: float) -> None:
        with lock:
            record["ok"].append([ident, kind, name, time.monotonic(), started])

    def failed(exc: Exception, ident: str, kind: str, name: str) -> bool:
        """Record why a send failed; True if it is to be tried again (ChannelFull, and
        MessagesLost, which says earlier sends were lost and sent nothing itself)."""
        with lock:
            if isinstance(exc, ChannelFull):
                record["full"] += 1
                return True
            if isinstance(exc, MessagesLost):
                record["announced_lost"] += exc.count
                if not config["kills"]:
                    record["errors"].append(f"MessagesLost with no broker kill: {exc}"[:300])
                return True
            if isinstance(exc, BrokerUnavailable):
                record["doubt"].append([ident, kind, name, repr(exc)[:200]])
            else:  # (anything else breaks a rule)
                record["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
            return False

    def pause(local: random.Random) -> float:
        roll = local.random()
        if roll < config["pause_rate"]:
            return local.uniform(0, 0.05)
        return 0.0

    settings = dict(capacity=config["capacity"], channel_capacity=capacities, timeout=config["timeout"])
    if config["kind"] == "blocking":
        client = Client(config["url"], **settings)
        client.add_listener(on_link)

        def worker(index: int) -> None:
            local = random.Random(f"{config['seed']}:{index}")
            while not _stopping(config):
                kind, name = _targets(config, local)
                ident = next_id()
                message = _payload(local, ident, kind)
                while not _stopping(config):
                    try:
                        started = time.monotonic()
                        if kind == "group":
                            client.group_send(name, message, wait=local.random() < 0.5)
                        else:
                            client.send(name, message)
                        done(kind, name, ident, started)
                        break
                    except Exception as exc:  # noqa: BLE001
                        if not failed(exc, ident, kind, name):
                            break
                        time.sleep(local.uniform(0.0005, 0.005))
                delay = pause(local)
                if delay:
                    time.sleep(delay)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(config["concurrency"])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        record["counters"] = client.counters
        client.close()
    else:
        async def run() -> None:
            async with AsyncClient(config["url"], **settings) as client:
                client.add_listener(on_link)
                async def task(index: int) -> None:
                    local = random.Random(f"{config['seed']}:{index}")
                    while not _stopping(config):
                        kind, name = _targets(config, local)
                        ident = next_id()
                        message = _payload(local, ident, kind)
                        while not _stopping(config):
                            try:
                                started = time.monotonic()
                                if kind == "group":
                                    await client.group_send(name, message, wait=local.random() < 0.5)
                                else:
                                    await client.send(name, message)
                                done(kind, name, ident, started)
                                break
                            except Exception as exc:  # noqa: BLE001
                                if not failed(exc, ident, kind, name):
                                    break
                                await asyncio.sleep(local.uniform(0.0005, 0.005))
                        delay = pause(local)
                        await asyncio.sleep(delay)  # (also yields: the other tasks go on)

                await asyncio.gather(*(task(i) for i in range(config["concurrency"])))
                record["counters"] = client.counters

        asyncio.run(run())
    _write_json(config["out_file"], record)


def receiver_main(config: dict) -> None:
    from clients import AsyncClient, Client, ReceiveTimeout

    rng = random.Random(config["seed"])
    record = {"work": [], "own": [], "errors": [], "added": None, "reconnected": [], "disconnected": [],
              "counters": {}}

    def on_link(event: str) -> None:
        record[event].append(time.monotonic())

    def take(message: dict, where: str) -> None:
        record["work" if where == "work" else "own"].append([message["id"], message["kind"], time.monotonic()])

    def pause() -> float:
        return rng.uniform(0, config["max_pause"]) if rng.random() < config["pause_rate"] else 0.0

    window = config["receive_window"]
    if config["kind"] == "blocking":
        with Client(config["url"], receive_window=window, timeout=config["timeout"]) as client:
            client.add_listener(on_link)
            me = client.new_channel("chaos")
            client.group_add(GROUP, me)
            record["added"] = time.monotonic()
            _write_json(config["name_file"], {"channel": me})
            idle_since = None
            while True:
                got = False
                for channel, where in ((config["channel"], "work"), (me, "own")):
                    if channel is None:
                        continue
                    try:
                        take(client.receive(channel, timeout=0.02), where)
                        got = True
                    except ReceiveTimeout:
                        pass
                    except Exception as exc:  # noqa: BLE001
                        record["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
                        time.sleep(0.05)
                if _stopping(config):
                    now = time.monotonic()
                    idle_since = None if got else (idle_since or now)
                    if idle_since is not None and now - idle_since > IDLE_END:
                        break
                delay = pause()
                if delay:
                    time.sleep(delay)
            record["counters"] = client.counters
    else:
        async def run() -> None:
            async with AsyncClient(config["url"], receive_window=window, timeout=config["timeout"]) as client:
                client.add_listener(on_link)
                me = client.new_channel("chaos")
                await client.group_add(GROUP, me)
                record["added"] = time.monotonic()
                _write_json(config["name_file"], {"channel": me})
                last = [time.monotonic()]

                async def loop(channel: str, where: str) -> None:
                    while True:
                        try:
                            take(await client.receive(channel, timeout=0.2), where)
                            last[0] = time.monotonic()
                        except ReceiveTimeout:
                            if _stopping(config) and time.monotonic() - last[0] > IDLE_END:
                                return
                        except Exception as exc:  # noqa: BLE001
                            record["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
                            await asyncio.sleep(0.05)
                        delay = pause()
                        if delay:
                            await asyncio.sleep(delay)

                loops = [loop(me, "own")]
                if config["channel"] is not None:
                    loops.append(loop(config["channel"], "work"))
                await asyncio.gather(*loops)
                record["counters"] = client.counters

        asyncio.run(run())
    _write_json(config["out_file"], record)


def burner_main(config: dict) -> None:
    rng = random.Random(config["seed"])
    while not _stopping(config):
        end = time.monotonic() + rng.uniform(0.01, 0.2)
        while time.monotonic() < end:
            pass
        time.sleep(rng.uniform(0, 0.1))


ROLES = {"sender": sender_main, "receiver": receiver_main, "burner": burner_main}


# -- the orchestrator -------------------------------------------------------------------------


def _free_port() -> int:
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    try:
        return sock.bind_to_random_port("tcp://127.0.0.1")
    finally:
        sock.close(linger=0)


class Round:
    """One seeded round: its processes, its broker (killed and restarted in the kills
    variant), and the verdict from the records."""

    def __init__(self, seed: int, seconds: float, kills: bool, workdir: Path, log) -> None:
        self.seed, self.seconds, self.kills, self.workdir, self.log = seed, seconds, kills, workdir, log
        self.rng = random.Random(seed)
        self.processes: dict[str, subprocess.Popen] = {}
        self.broker: subprocess.Popen | None = None
        self.kill_times: list[float] = []
        self.stop_file = str(workdir / "stop")
        self.ports = (_free_port(), _free_port())
        self.url = f"tcp://127.0.0.1:{self.ports[0]}"
        self.violations: list[str] = []

    # -- processes --

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHANNELBUS_")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def start_broker(self) -> None:
        stderr = open(self.workdir / f"broker{len(self.kill_times)}.stderr", "wb")
        for attempt in range(50):  # (the port of a killed broker may take a moment to free)
            self.broker = subprocess.Popen(
                [sys.executable, "-m", "consumers.cli", "broker", "--bind", self.url,
                 "--pub-bind", f"tcp://127.0.0.1:{self.ports[1]}", "--check", "--log-level", "WARNING"],
                cwd=ROOT, env=self._env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            )
            line = self.broker.stdout.readline()
            if b"listening on" in line:
                stderr.close()
                return
            self.broker.wait(5)
            time.sleep(0.1)
        stderr.close()
        raise RuntimeError(f"the broker did not start on {self.url}")

    def start(self, role: str, name: str, config: dict) -> None:
        config = {**config, "role": role, "name": name, "url": self.url, "stop_file": self.stop_file,
                  "out_file": str(self.workdir / f"{name}.json"), "timeout": 10.0}
        config_path = self.workdir / f"{name}.config.json"
        config_path.write_text(json.dumps(config))
        with open(self.workdir / f"{name}.stderr", "wb") as stderr:
            self.processes[name] = subprocess.Popen(
                [sys.executable, __file__, "--role", str(config_path)], cwd=ROOT, env=self._env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            )

    def stop_all(self) -> None:
        """Stop every process of the round that is still running (by its PID)."""
        for proc in [*self.processes.values(), self.broker]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if self.broker is not None and self.broker.stdout is not None:
            self.broker.stdout.close()

    # -- the round --

    def plan(self) -> dict:
        rng = self.rng
        channels = [f"chaos.work{i}" for i in range(rng.randint(1, 3))]
        capacities = {ch: rng.choice(CAPACITIES) for ch in channels}
        receivers = []
        for ch in channels:
            for _ in range(rng.randint(1, 3)):
                receivers.append(ch)
        receivers.append(None)  # one that only has its own channel and the group
        senders = []
        for _ in range(rng.randint(2, 4)):
            kind = rng.choice(("blocking", "asyncio"))
            concurrency = rng.randint(1, 8) if kind == "blocking" else rng.choice((1, 4, 16, 64, 256))
            senders.append((kind, concurrency))
        return {"channels": channels, "capacities": capacities, "receivers": receivers, "senders": senders}

    def run(self) -> dict:
        plan = self.plan()
        rng = self.rng
        self.start_broker()
        try:
            names = []
            for index, channel in enumerate(plan["receivers"]):
                name = f"r{index}"
                names.append(name)
                self.start("receiver", name, {
                    "seed": rng.randrange(1 << 30), "kind": rng.choice(("blocking", "asyncio")),
                    "channel": channel, "receive_window": rng.choice((1, 8, 64)),
                    "pause_rate": rng.choice((0.0, 0.01, 0.05)), "max_pause": rng.choice((0.01, 0.1, 0.3)),
                    "name_file": str(self.workdir / f"{name}.name"),
                })
            owned = self._wait_for_names(names)
            for index, (kind, concurrency) in enumerate(plan["senders"]):
                self.start("sender", f"s{index}", {
                    "seed": rng.randrange(1 << 30), "kind": kind, "concurrency": concurrency,
                    "channels": plan["channels"], "capacities": plan["capacities"],
                    "capacity": rng.choice(CAPACITIES), "owned": owned,
                    "pause_rate": rng.choice((0.0, 0.02, 0.2)), "kills": self.kills,
                })
            self.start("burner", "burner", {"seed": rng.randrange(1 << 30)})
            self._run_for(self.seconds)
            Path(self.stop_file).write_text("stop")
            self._wait_for_exits()
            stats = self._final_stats()
        finally:
            self.stop_all()
        self._check_broker_exit()
        return self.judge(plan, stats)

    def _wait_for_names(self, names: list[str]) -> list[str]:
        owned = []
        deadline = time.monotonic() + 30
        for name in names:
            path = self.workdir / f"{name}.name"
            while not path.exists():
                if time.monotonic() > deadline or self.processes[name].poll() is not None:
                    raise RuntimeError(f"receiver {name} did not start: "
                                       + (self.workdir / f"{name}.stderr").read_text()[-2000:])
                time.sleep(0.02)
            owned.append(json.loads(path.read_text())["channel"])
        return owned

    def _run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if now >= end:
                return
            if not self.kills:
                time.sleep(min(0.5, end - now))
                continue
            time.sleep(min(self.rng.uniform(1.0, 5.0), max(0.0, end - now)))
            if time.monotonic() >= end - 1.0:
                continue
            self.kill_times.append(time.monotonic())  # (before the signal: no send after it is safe)
            self.broker.kill()
            self.broker.wait(10)
            self.broker.stdout.close()
            time.sleep(self.rng.uniform(0.0, 1.0))
            self.start_broker()

    def _wait_for_exits(self) -> None:
        deadline = time.monotonic() + 60
        for name, proc in self.processes.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.violations.append(f"{name} did not finish within 60 s of the stop (hung)")
        for name, proc in self.processes.items():
            if proc.poll() not in (0, None):
                stderr = (self.workdir / f"{name}.stderr").read_text()[-1500:]
                self.violations.append(f"{name} exited with status {proc.returncode}: {stderr}")

    def _final_stats(self) -> dict | None:
        from clients import BusError, Client

        try:
            with Client(self.url, timeout=10) as client:
                return client.stats()
        except BusError as exc:
            self.violations.append(f"the broker did not answer STATS at the end: {exc}")
            return None

    def _check_broker_exit(self) -> None:
        for path in sorted(self.workdir.glob("broker*.stderr")):
            text = path.read_text()
            if "check mode" in text or "Traceback" in text:
                self.violations.append(f"{path.name}: {text[-2000:]}")

    # -- the verdict --

    def _records(self, prefix: str) -> dict[str, dict]:
        records = {}
        for path in sorted(self.workdir.glob(f"{prefix}*.json")):
            if path.name.endswith(".config.json"):
                continue
            records[path.stem] = json.loads(path.read_text())
        return records

    def exposed(self, returned_at: float, noticed: list[float] | None = None) -> bool:
        """Whether a send that returned at ``returned_at`` may have been lost with a killed
        broker: a kill came after it; or (``noticed``: when the sender's client saw its
        connection drop) a kill came before it that its client had not noticed yet, so that it
        handed a pipelined send to a dead connection (counted in the client's ``in_doubt``)."""
        for kill in self.kill_times:
            if kill > returned_at:
                return True
            first_seen = min((seen for seen in noticed or () if seen >= kill), default=None)
            if first_seen is not None and first_seen > returned_at:
                return True  # (it returned between the kill and its client's noticing it)
        return False

    def judge(self, plan: dict, stats: dict | None) -> dict:
        senders, receivers = self._records("s"), self._records("r")
        found = self.violations
        for name in [n for n in self.processes if n != "burner"]:
            if name not in senders and name not in receivers:
                found.append(f"{name} left no record")
        sent: dict[str, list] = {}
        doubt: set[str] = set()
        full = announced = 0
        for name, record in senders.items():
            full += record["full"]
            announced += record["announced_lost"]
            for ident, kind, target, at, started in record["ok"]:
                sent[ident] = [kind, target, at, started, record["disconnected"]]
            doubt.update(ident for ident, *_ in record["doubt"])
            if not self.kills and record["doubt"]:
                found.append(f"{name}: {len(record['doubt'])} send(s) raised BrokerUnavailable with no"
                             f" broker kill, e.g. {record['doubt'][0][3]}")
            if not self.kills and record["counters"].get("in_doubt"):
                found.append(f"{name}: {record['counters']['in_doubt']} pipelined send(s) in doubt with"
                             " no broker kill (a connection dropped)")
            found += [f"{name}: {error}" for error in record["errors"][:5]]
        owner_of = {}
        for name, record in receivers.items():
            found += [f"{name}: {error}" for error in record["errors"][:5]]
            if not self.kills and record["disconnected"]:
                found.append(f"{name}: its connection to a broker that was never killed dropped"
                             f" {len(record['disconnected'])} time(s)")
        names = {json.loads((self.workdir / f"{n}.name").read_text())["channel"]: n
                 for n in receivers if (self.workdir / f"{n}.name").exists()}
        owner_of.update(names)
        seen: dict[str, int] = {}
        lost_at_kill = phantom = duplicate = 0
        for name, record in receivers.items():
            for ident, kind, _ in record["work"] + [m for m in record["own"] if m[1] != "group"]:
                seen[ident] = seen.get(ident, 0) + 1
                if ident not in sent and ident not in doubt:
                    phantom += 1
                elif ident in sent and kind == "direct" and owner_of.get(sent[ident][1]) != name:
                    found.append(f"{ident} for {sent[ident][1]} was received by {name}")
        duplicate = sum(1 for count in seen.values() if count > 1)
        missing = [(ident, info) for ident, info in sent.items() if info[0] != "group" and ident not in seen]
        for ident, (kind, target, at, _, noticed) in missing:
            if self.exposed(at, noticed):
                lost_at_kill += 1
            else:
                found.append(f"{ident} ({kind} to {target}) returned from send at {at:.3f} and was never"
                             " received, with no broker kill after it")
        if announced > lost_at_kill:
            found.append(f"the clients announced {announced} lost message(s) (MessagesLost), more than"
                         f" the {lost_at_kill} returned sends that were never received")
        if phantom:
            found.append(f"{phantom} message(s) received that no send carried")
        if duplicate:
            found.append(f"{duplicate} message(s) received more than once")
        group_sends = {ident: info[3] for ident, info in sent.items() if info[0] == "group"}  # (started)
        group_missing = 0
        for name, record in receivers.items():
            got = [m[0] for m in record["own"] if m[1] == "group"]
            if len(got) != len(set(got)):
                found.append(f"{name} received a group message twice")
            if any(ident not in group_sends and ident not in doubt for ident in got):
                found.append(f"{name} received a group message that no group_send carried")
            if record["added"] is None:
                continue
            required = [ident for ident, started in group_sends.items() if self._required(record, started)]
            absent = len(set(required) - set(got))
            excused = record["counters"].get("group_full", 0) + record["counters"].get("group_lost", 0)
            group_missing += absent
            if absent > excused:
                found.append(f"{name} missed {absent} group message(s) sent while it was a live member"
                             f" (its client counted {excused} skipped or lost)")
        if stats is not None:
            counters = stats["counters"]
            fates = (stats["queued"] + stats["inflight"] + counters["acknowledged"] + counters["expired"]
                     + counters["flushed"] + counters["dropped_full"] + counters["dropped_memory"]
                     + counters["dropped_owner_gone"])
            if fates != counters["accepted"]:
                found.append(f"STATS at the end: accepted {counters['accepted']} != the sum of the fates {fates}")
        received = sum(seen.values())
        return {
            "seed": self.seed, "variant": "kills" if self.kills else "steady",
            "senders": " ".join(f"{k[0]}{c}" for k, c in plan["senders"]),
            "capacities": ",".join(str(plan["capacities"][ch]) for ch in plan["channels"]),
            "receivers": len(plan["receivers"]), "sent": len(sent), "received": received,
            "full": full, "doubt": len(doubt), "kills": len(self.kill_times),
            "lost_at_kill": lost_at_kill, "announced": announced, "group_missing": group_missing, "violations": found,
        }

    def _required(self, record: dict, started: float) -> bool:
        """Whether a group message whose send began at ``started`` must reach this member: the
        member was live then (its group_add had returned, and its client had said "reconnected"
        after every kill and every drop of its own connection before it), and from then on
        neither was the broker killed nor did the member's connection drop. (The start, not the
        return: a send that began before the member was live again may return after.)"""
        if started <= record["added"] or self.exposed(started):
            return False
        if any(drop > started for drop in record["disconnected"]):
            return False
        for down in [*self.kill_times, *record["disconnected"]]:
            if down < started and not any(down < back < started for back in record["reconnected"]):
                return False
        return True


def _print_table(results: list[dict]) -> None:
    columns = ("seed", "variant", "senders", "capacities", "receivers", "sent", "received", "full",
               "doubt", "kills", "lost_at_kill", "announced", "group_missing")
    rows = [[str(r[c]) for c in columns] + ["ok" if not r["violations"] else f"{len(r['violations'])} broken"]
            for r in results]
    header = [*columns, "verdict"]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--seeds", default="", help="comma-separated seeds, one round each (default: as many"
                        " rounds as --minutes allows, seeds from 1)")
    parser.add_argument("--minutes", type=float, default=None, help="run rounds until this many minutes have passed")
    parser.add_argument("--seconds", type=float, default=20.0, help="traffic per round, in seconds (default 20)")
    parser.add_argument("--variant", choices=("steady", "kills", "both"), default="both",
                        help="steady: no broker kills; kills: the broker is SIGKILLed and restarted at"
                             " random moments; both (default): alternate, starting with steady")
    parser.add_argument("--keep", action="store_true", help="keep each round's directory of records")
    args = parser.parse_args(argv)
    if args.role:
        config = json.loads(Path(args.role).read_text())
        ROLES[config["role"]](config)
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds and args.minutes is None:
        seeds = [1, 2]
    deadline = None if args.minutes is None else time.monotonic() + args.minutes * 60
    results = []
    index = 0
    while True:
        if seeds:
            if index >= len(seeds):
                break
            seed = seeds[index]
        else:
            if time.monotonic() + args.seconds > deadline:
                break
            seed = index + 1
        kills = {"steady": False, "kills": True, "both": index % 2 == 1}[args.variant]
        workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{seed}-"))
        round_ = Round(seed, args.seconds, kills, workdir, print)
        signal.signal(signal.SIGTERM, lambda *_: (round_.stop_all(), sys.exit(143)))
        started = time.monotonic()
        try:
            result = round_.run()
        finally:
            round_.stop_all()
        results.append(result)
        verdict = "ok" if not result["violations"] else "BROKEN: " + " | ".join(result["violations"][:5])
        print(f"round {index + 1} seed {seed} {result['variant']} ({time.monotonic() - started:.0f} s):"
              f" {result['sent']} sent, {result['received']} received, {result['full']} full refusals,"
              f" {result['doubt']} in doubt, {result['kills']} kills, {result['lost_at_kill']} lost at"
              f" kills ({result['announced']} of them announced by MessagesLost),"
              f" {result['group_missing']} group messages missed; {verdict}", flush=True)
        if not args.keep and not result["violations"]:
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()
        elif result["violations"]:
            print(f"  records kept in {workdir}", flush=True)
        index += 1
    print()
    _print_table(results)
    return 1 if any(r["violations"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
