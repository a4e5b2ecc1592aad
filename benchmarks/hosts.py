"""The bus across hosts, for longer: brokers on one network namespace, consumers on two others.

    sudo .venv/bin/python benchmarks/hosts.py --seconds 30
    python benchmarks/hosts.py --help

The set-up of tests/test_hosts.py (tests/netns.py): three Linux network namespaces, ``brokers``
(10.213.0.1, with a bridge), ``alpha`` (10.213.0.2) and ``beta`` (10.213.0.3), joined by veth
pairs on a subnet that exists only inside them, and ``--brokers`` ``channelbus broker`` processes
(default 2: a sharded bus) on the brokers host. Then, for ``--seconds`` each:

- **work**: the work channel of examples/workers: ``--workers`` processes of ``channelbus run
  examples.workers.worker:Worker --instances N``, alternately on alpha and beta, and a producer
  on beta that keeps ``--window`` jobs outstanding and checks every result (digest, duplicates,
  missing). Reported: jobs per second, how many each host did, and the brokers' CPU per job.
- **rtt**: round trips through a work channel: a ping process on beta sends to ``hosts.ping``
  with a channel of its own to answer to; a pong process on alpha answers. Reported: round
  trips, p50, p90, p99 and the largest, in milliseconds.

Unless ``--no-reference``, both are run again with every process in the brokers namespace
(the same processes and addresses, no veth or bridge on the way), so the cost of crossing
"hosts" shows. The namespaces share this machine's CPUs and the veths add no delay of their
own: the figures are the network stack's and the bus's cost between hosts, not a real
network's. ``--keys`` runs keyed brokers (CURVE; the clients get key pairs made by
``channelbus keygen`` into a temporary directory) instead of ``--insecure`` ones; ``--check``
runs the brokers in their check mode (slower; the figures are then for correctness, not speed).

Everything is removed at the end, also on failure, Ctrl-C or SIGTERM: the processes by PID,
the veth pairs, the bridge and the namespaces by name, the key directory. Needs Linux, root
(CAP_SYS_ADMIN) and iproute2; exits with status 2 saying why where namespaces cannot be made,
and 1 if a job went missing, came back twice or wrong, or a broker did not stop cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(ROOT / "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from netns import Hosts, NamespaceError, bus_url, start_brokers  # noqa: E402

PYTHON = sys.executable
PING = "hosts.ping"
ACROSS = {"work": ("beta", ["alpha", "beta"]), "rtt": ("beta", "alpha")}  # (producer, workers), (ping, pong)
DRAIN_SECONDS = 30.0


# -- roles: run inside a namespace by the driver below ------------------------------------------

def _client_keys() -> dict:
    secret, server = os.environ.get("CHANNELBUS_SECRET_KEY"), os.environ.get("CHANNELBUS_SERVER_KEY")
    return {"secret_key": secret, "server_key": server} if secret and server else {}


def role_produce(args) -> None:
    """Jobs as examples.workers.producer makes them, for ``--seconds``; one JSON line at the end."""
    from clients import ChannelFull, Client, ReceiveTimeout
    from clients.placement import broker_of_channel, split_urls
    from examples.workers import JOBS
    from examples.workers.jobs import digest

    sent = results = duplicates = wrong = full = 0
    expected: dict[int, str] = {}
    by_worker: dict[str, int] = {}
    with Client(args.broker, capacity=args.capacity, **_client_keys()) as bus:
        reply_to = bus.new_channel()
        count = len(split_urls(args.broker))
        placed = {"jobs": broker_of_channel(JOBS, count) + 1, "results": broker_of_channel(reply_to, count) + 1}

        def gather(wait: float) -> None:
            nonlocal results, duplicates, wrong
            result = bus.receive(reply_to, timeout=wait)
            want = expected.pop(result["id"], None)
            if want is None:
                duplicates += 1
                return
            results += 1
            wrong += result["digest"] != want
            by_worker[result["worker"]] = by_worker.get(result["worker"], 0) + 1

        print("ready", flush=True)
        start = time.monotonic()
        deadline = start + args.seconds
        missing: list[int] = []
        try:
            while time.monotonic() < deadline:
                while len(expected) < args.window:
                    data = os.urandom(16)
                    try:
                        bus.send(JOBS, {"type": "job.run", "id": sent, "data": data, "rounds": args.rounds,
                                        "reply_to": reply_to})
                    except ChannelFull:
                        full += 1
                        break
                    expected[sent] = digest(data, args.rounds)
                    sent += 1
                if expected:
                    gather(DRAIN_SECONDS)
                else:
                    time.sleep(0.001)
            timed = time.monotonic() - start
            done_in_time = results
            while expected:
                gather(DRAIN_SECONDS)
        except ReceiveTimeout:
            missing = sorted(expected)
            timed = time.monotonic() - start
            done_in_time = results
    print(json.dumps({"sent": sent, "results": results, "in_time": done_in_time, "seconds": timed,
                      "duplicates": duplicates, "wrong": wrong, "missing": len(missing), "full": full,
                      "by_worker": by_worker, "placed": placed}), flush=True)


def role_pong(args) -> None:
    """Answer every ping on ``hosts.ping`` until a stop message or SIGTERM."""
    from clients import Client

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Client(args.broker, **_client_keys()) as bus:
        print("ready", flush=True)
        while True:
            ping = bus.receive(PING)
            if ping["type"] == "stop":
                return
            bus.send(ping["reply_to"], {"type": "pong", "n": ping["n"]})


def role_ping(args) -> None:
    """Round trips through the pong process for ``--seconds`` (after 100 unmeasured ones); one
    JSON line of figures, and a stop message for the pong."""
    from clients import Client
    from clients.placement import broker_of_channel, split_urls

    with Client(args.broker, **_client_keys()) as bus:
        me = bus.new_channel()
        count = len(split_urls(args.broker))
        placed = {"pings": broker_of_channel(PING, count) + 1, "pongs": broker_of_channel(me, count) + 1}
        times = []
        n = 0
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            began = time.perf_counter()
            bus.send(PING, {"type": "ping", "n": n, "reply_to": me})
            pong = bus.receive(me, timeout=DRAIN_SECONDS)
            assert pong["n"] == n, (pong, n)
            n += 1
            if n == 100:
                deadline = time.monotonic() + args.seconds
            elif n > 100:
                times.append(time.perf_counter() - began)
        bus.send(PING, {"type": "stop"})
    times.sort()

    def at(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))] * 1000

    print(json.dumps({"round_trips": len(times), "per_second": len(times) / args.seconds,
                      "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": times[-1] * 1000,
                      "mean": statistics.fmean(times) * 1000,
                      "placed": placed}), flush=True)


ROLES = {"produce": role_produce, "pong": role_pong, "ping": role_ping}


# -- the driver -----------------------------------------------------------------------------------

def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _role(hosts: Hosts, host: str, role: str, args, env: dict, *extra: str):
    return hosts.start(host, PYTHON, str(Path(__file__).resolve()), "--role", role, "--broker", args.url,
                       "--seconds", str(args.seconds), *extra, env=env, name=f"{role} on {host}")


def run_work(hosts: Hosts, brokers, args, env: dict, placement: str) -> dict:
    producer_host, worker_hosts = ACROSS["work"] if placement == "across hosts" else ("brokers", ["brokers"])
    workers = []
    for n in range(args.workers):
        host = worker_hosts[n % len(worker_hosts)]
        workers.append((host, hosts.start(
            host, PYTHON, "-m", "consumers.cli", "run", "examples.workers.worker:Worker", "--instances",
            str(args.instances), "--capacity", str(max(100, 2 * args.window)), "--broker", args.url,
            env=env, name=f"worker {n + 1} on {host}")))
    try:
        for _, worker in workers:
            worker.expect(r"started Worker\[\d+\] on ", "stderr", 30)
        cpu = [_cpu_seconds(b.process.pid) for b in brokers]
        producer = _role(hosts, producer_host, "produce", args, env, "--window", str(args.window),
                         "--rounds", str(args.rounds), "--capacity", str(max(100, 2 * args.window)))
        producer.expect("^ready$", timeout=30)
        status = producer.wait(args.seconds + DRAIN_SECONDS + 30)
        cpu = [_cpu_seconds(b.process.pid) - before for b, before in zip(brokers, cpu)]
        if status != 0 or not producer.lines["stdout"] or not producer.lines["stdout"][-1].startswith("{"):
            raise RuntimeError(f"the producer failed:\n{producer.output()}")
        report = json.loads(producer.lines["stdout"][-1])
    finally:
        for _, worker in workers:
            worker.stop()
    host_of = {str(w.pid): host for host, w in workers}
    per_host: dict[str, int] = {}
    for name, count in report["by_worker"].items():
        host = host_of.get(name.rpartition(":")[2], "?")
        per_host[host] = per_host.get(host, 0) + count
    rate = report["in_time"] / report["seconds"]
    return {"phase": "work", "placement": placement, "jobs_per_second": rate, "jobs": report["results"],
            "duplicates": report["duplicates"], "wrong": report["wrong"], "missing": report["missing"],
            "full": report["full"], "per_host": per_host, "placed": report["placed"],
            "broker_cpu_us_per_job": [round(c / max(1, report["results"]) * 1e6, 1) for c in cpu]}


def run_rtt(hosts: Hosts, brokers, args, env: dict, placement: str) -> dict:
    ping_host, pong_host = ACROSS["rtt"] if placement == "across hosts" else ("brokers", "brokers")
    pong = _role(hosts, pong_host, "pong", args, env)
    try:
        pong.expect("^ready$", timeout=30)
        ping = _role(hosts, ping_host, "ping", args, env)
        status = ping.wait(args.seconds + DRAIN_SECONDS + 30)
        if status != 0 or not ping.lines["stdout"]:
            raise RuntimeError(f"the ping failed:\n{ping.output()}")
        figures = json.loads(ping.lines["stdout"][-1])
        pong.wait(10)
    finally:
        pong.stop()
    return {"phase": "rtt", "placement": placement, **figures}


def make_keys(directory: Path) -> tuple[tuple[str, ...], dict]:
    """Keys for the brokers and for every client; (broker args, client environment)."""
    for name in ("broker", "bench"):
        subprocess.run([PYTHON, "-m", "consumers.cli", "keygen", name, "--dir", str(directory)],
                       cwd=ROOT, check=True, capture_output=True, timeout=30)
    (directory / "authorized").mkdir()
    shutil.copy(directory / "bench.key", directory / "authorized" / "bench.key")
    return (("--secret-key", str(directory / "broker.key_secret"), "--authorized-keys", str(directory / "authorized")),
            {"CHANNELBUS_SECRET_KEY": str(directory / "bench.key_secret"),
             "CHANNELBUS_SERVER_KEY": str(directory / "broker.key")})


def print_results(results: list[dict], traffic: dict, args) -> None:
    bus = f"{args.brokers} broker{'s' if args.brokers > 1 else ''}{', CURVE' if args.keys else ''}" \
          f"{', check mode' if args.check else ''}"
    print(f"\nbus: {bus}; {args.seconds:g} s per phase; work: {args.workers} worker processes x"
          f" {args.instances} instances, window {args.window}, {args.rounds} SHA-256 round(s) per job")
    print(f"{'phase':<6} {'placement':<13} {'figure':>16}  details")
    for r in results:
        if r["phase"] == "work":
            hosts = ", ".join(f"{h} {n:,}" for h, n in sorted(r["per_host"].items()))
            print(f"{'work':<6} {r['placement']:<13} {r['jobs_per_second']:>11,.0f} jobs/s"
                  f"  {r['jobs']:,} jobs ({hosts});"
                  f" {r['duplicates']} duplicates, {r['wrong']} wrong, {r['missing']} missing;"
                  f" broker CPU {' / '.join(f'{c:g}' for c in r['broker_cpu_us_per_job'])} µs per job;"
                  f" on brokers {r['placed']['jobs']} (jobs) and {r['placed']['results']} (results)")
        else:
            print(f"{'rtt':<6} {r['placement']:<13} {r['p50']:>10.3f} ms p50  p90 {r['p90']:.3f}, p99 {r['p99']:.3f},"
                  f" max {r['max']:.3f} ms; {r['round_trips']:,} round trips ({r['per_second']:,.0f}/s);"
                  f" on brokers {r['placed']['pings']} (pings) and {r['placed']['pongs']} (pongs)")
    if traffic:
        print("bytes over the veths (sent / received by the host): "
              + "; ".join(f"{h} {tx:,} / {rx:,}" for h, (tx, rx) in traffic.items()))


def drive(args) -> int:
    try:
        hosts = Hosts.create(["brokers", "alpha", "beta"])
    except NamespaceError as exc:
        print(f"benchmarks/hosts.py: network namespaces cannot be made here: {exc}"
              " (needs Linux, root with CAP_SYS_ADMIN and iproute2)", file=sys.stderr)
        return 2
    key_dir = Path(tempfile.mkdtemp(prefix="channelbus-hosts-")) if args.keys else None
    results: list[dict] = []
    traffic: dict = {}
    broken = []
    try:
        broker_args, env = make_keys(key_dir) if key_dir else (("--insecure",), {})
        brokers = start_brokers(hosts, "brokers", args.brokers, *broker_args, "--log-level", "warning",
                                check=args.check)
        args.url = bus_url(brokers)
        print(f"brokers on {hosts['brokers'].namespace}: {args.url}", flush=True)
        traffic_before = hosts.traffic()
        for placement in ["across hosts"] + ([] if args.no_reference else ["one host"]):
            for run in (run_work, run_rtt):
                result = run(hosts, brokers, args, env, placement)
                results.append(result)
                print(json.dumps(result), flush=True)
            if placement == "across hosts":
                after = hosts.traffic()
                traffic = {h: (after[h][0] - traffic_before[h][0], after[h][1] - traffic_before[h][1]) for h in after}
        for broker in brokers:
            status = broker.stop()
            if status != 0:
                broken.append(f"{broker.url} exited with status {status}:\n{broker.process.output()}")
    finally:
        hosts.remove()
        if key_dir:
            shutil.rmtree(key_dir, ignore_errors=True)
    print_results(results, traffic, args)
    work = [r for r in results if r["phase"] == "work"]
    lost = [r for r in work if r["duplicates"] or r["wrong"] or r["missing"]]
    for problem in broken + [f"work {r['placement']}: {r['duplicates']} duplicates, {r['wrong']} wrong,"
                             f" {r['missing']} missing" for r in lost]:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "role"},
                                               "results": results, "traffic": traffic}, indent=1))
    return 1 if broken or lost else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/hosts.py", description=__doc__.split("\n\n")[0],
        epilog="Runs as root: it makes network namespaces (removed at the end). See the module docstring.")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    parser.add_argument("--brokers", type=int, default=2, choices=range(1, 9), metavar="N",
                        help="brokers on the brokers host, a sharded bus (1 to 8, default 2)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes, alternately on alpha and beta (default 2)")
    parser.add_argument("--instances", type=int, default=2, help="consumer instances per worker process (default 2)")
    parser.add_argument("--window", type=int, default=100, help="jobs the producer keeps outstanding (default 100)")
    parser.add_argument("--rounds", type=int, default=1, help="SHA-256 rounds per job, the work itself (default 1)")
    parser.add_argument("--keys", action="store_true", help="CURVE keys on the brokers and every client")
    parser.add_argument("--check", action="store_true", help="run the brokers in check mode (slower)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the same phases with every process on the brokers host")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--capacity", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        ROLES[args.role](args)
        return 0
    if args.seconds <= 0 or args.workers < 1 or args.instances < 1 or args.window < 1 or args.rounds < 0:
        parser.error("--seconds, --workers, --instances and --window must be positive, --rounds at least 0")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (so that everything is removed)
    try:
        return drive(args)
    except KeyboardInterrupt:
        print("benchmarks/hosts.py: interrupted (everything it made is removed)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
