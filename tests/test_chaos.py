"""The randomized system test's short form: ``benchmarks/chaos.py`` with fixed seeds.

Each test runs one round of about 20 s of traffic: real sender, receiver and CPU-burning
processes against a broker process in its check mode, with seeded concurrency (blocking clients
shared by threads, asyncio clients with up to 256 concurrent sends), capacities from 1 to
100,000, one to three receivers per work channel, process-specific channels, a group and random
pauses. It fails if any rule of the round breaks (see the module docstring of
``benchmarks/chaos.py``; its output names each). The long form is
``channelbus bench chaos -- --minutes N``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_round(seed: int, variant: str) -> str:
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "benchmarks", "chaos.py"), "--seeds", str(seed),
         "--seconds", "20", "--variant", variant],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:  # (a hang: stop the round and every process it started)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output
    return output


@pytest.mark.timeout(180)
def test_random_senders_receivers_pauses_and_contention_lose_nothing():
    output = run_round(101, "steady")
    assert "0 in doubt, 0 kills, 0 lost at kills (0 of them announced" in output and "; ok" in output


@pytest.mark.timeout(180)
def test_random_senders_receivers_pauses_contention_and_broker_kills_lose_only_what_a_kill_held():
    output = run_round(102, "kills")
    assert " 0 kills" not in output and "; ok" in output
