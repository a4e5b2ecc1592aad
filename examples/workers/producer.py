"""The producer: send N jobs to ``workers.jobs`` and gather every result on a channel of its own.

    python -m examples.workers.producer [--jobs 1000] [--rounds 100] [--broker URL] [--json]

Start the workers first (see ``examples.workers``): jobs wait in the broker until a worker takes
them, but only up to the channel's capacity, so the producer keeps at most ``--window`` jobs
outstanding and retries a send the broker refused as full. It exits 0 when every job came back
exactly once with the right digest, else 1 (after ``--timeout`` seconds without a result).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from clients import ChannelFull, Client, ReceiveTimeout

from examples import client_keys

from . import JOBS
from .jobs import digest


@dataclass
class Report:
    jobs: int
    results: int = 0
    duplicates: int = 0
    wrong: int = 0
    missing: list[int] = field(default_factory=list)
    by_worker: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.results == self.jobs and not (self.duplicates or self.wrong or self.missing)


def produce(url: str, jobs: int, *, rounds: int = 100, window: int = 50, timeout: float = 30.0,
            **client_settings) -> Report:
    """Run ``jobs`` jobs through the workers; return what came back. ``client_settings`` go to
    the Client (e.g. CURVE keys)."""
    report = Report(jobs)
    started = time.monotonic()
    with Client(url, **client_settings) as bus:
        reply_to = bus.new_channel()
        expected: dict[int, str] = {}
        done: set[int] = set()

        def gather(wait: float) -> None:
            result = bus.receive(reply_to, timeout=wait)
            job = result["id"]
            if job in done:
                report.duplicates += 1
                return
            done.add(job)
            report.results += 1
            report.by_worker[result["worker"]] += 1
            if result["digest"] != expected.get(job):
                report.wrong += 1

        try:
            for job in range(jobs):
                data = secrets.token_bytes(16)
                expected[job] = digest(data, rounds)
                message = {"type": "job.run", "id": job, "data": data, "rounds": rounds, "reply_to": reply_to}
                while len(expected) - len(done) > window:
                    gather(timeout)
                while True:
                    try:
                        bus.send(JOBS, message)
                        break
                    except ChannelFull:
                        # Still full from jobs taken but not yet acknowledged: make room.
                        if len(expected) - len(done) > 1:
                            gather(timeout)
                        else:
                            time.sleep(0.01)
            while len(done) < jobs:
                gather(timeout)
        except ReceiveTimeout:
            report.missing = sorted(set(expected) - done)
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.workers.producer", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="how many jobs to send (default 1000)")
    parser.add_argument("--rounds", type=int, default=100, help="SHA-256 rounds per job (default 100)")
    parser.add_argument("--window", type=int, default=50, help="most jobs outstanding at once (default 50)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="give up after this many seconds without a result (default 30)")
    parser.add_argument("--broker", default=os.environ.get("CHANNELBUS_BROKER", "tcp://127.0.0.1:5555"),
                        help="broker URL, or several comma-separated (default: $CHANNELBUS_BROKER or"
                             " tcp://127.0.0.1:5555); CURVE keys from $CHANNELBUS_SECRET_KEY and"
                             " $CHANNELBUS_SERVER_KEY")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    report = produce(args.broker, args.jobs, rounds=args.rounds, window=args.window, timeout=args.timeout,
                     **client_keys())
    if args.json:
        print(json.dumps({
            "jobs": report.jobs, "results": report.results, "duplicates": report.duplicates,
            "wrong": report.wrong, "missing": report.missing, "by_worker": dict(report.by_worker),
            "seconds": round(report.seconds, 3),
        }))
    else:
        print(f"{report.results} of {report.jobs} results in {report.seconds:.2f} s"
              f" ({report.duplicates} duplicates, {report.wrong} wrong, {len(report.missing)} missing)")
        for worker, count in sorted(report.by_worker.items()):
            print(f"  {worker}: {count} jobs")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
