"""`channelbus bench` finds and runs the benchmark scripts of the checkout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from consumers.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, *args: str, timeout: float = 75) -> tuple[int, str]:
    """Run benchmarks/SCRIPT with ARGS in its own process group (on a hang, all of it is
    stopped); return its exit status and output."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output


def test_bench_runs_the_named_script_with_its_arguments():
    result = CliRunner().invoke(main, ["bench", "core", "--", "--help"])  # (-- : the script's own help)
    assert result.exit_code == 0, result.output
    assert "--messages" in result.output and "--rtt" in result.output


def test_bench_chaos_takes_minutes_and_says_what_it_checks():
    result = CliRunner().invoke(main, ["bench", "chaos", "--", "--help"])
    assert result.exit_code == 0, result.output
    assert "--minutes" in result.output and "--seeds" in result.output and "--variant" in result.output


def test_bench_refuses_an_unknown_benchmark():
    result = CliRunner().invoke(main, ["bench", "nope"])
    assert result.exit_code == 2
    assert "'nope' is not one of" in result.output


@pytest.mark.timeout(90)
def test_the_core_benchmark_runs_all_six_set_ups_to_completion():
    """A tiny run of the real thing: the forwarder, the asyncio floor, a broker with its defaults
    and one busy-polling, and the forwarder and the broker with CURVE keys, each with a sender
    and a receiver process; every message arrives in order (exit status 0)."""
    returncode, output = run_benchmark("core.py", "--messages", "300", "--rtt", "30", "--warmup", "5",
                                       "--busy-poll", "300", "--timeout", "60")
    assert returncode == 0, output
    for row in ("reference (pyzmq forwarder)", "asyncio floor (same, asyncio)", "bus (AsyncClient + broker)",
                "bus, broker --busy-poll 300", "bus / reference", "--busy-poll 300 / reference",
                "asyncio floor / reference", "reference, CURVE", "bus, CURVE", "reference CURVE / plain",
                "bus CURVE / plain", "what CURVE added"):
        assert row in output, output
    assert "OUT OF ORDER" not in output and "only " not in output, output


@pytest.mark.timeout(90)
def test_the_bytecode_count_counts_the_broker_and_a_client():
    returncode, output = run_benchmark("bytecodes.py", "--rtt", "20", "--top", "3", "--timeout", "60")
    assert returncode == 0, output
    counts = {}
    for line in output.splitlines():
        if ": " in line and "bytecodes" in line:
            label, rest = line.split(": ", 1)
            counts[label] = float(rest.split()[0].replace(",", ""))
    assert set(counts) == {"broker, per hop", "client, per round trip"}, output
    assert all(count > 100 for count in counts.values()), output  # (the hot path ran, and was counted)
    assert "broker/routing.py:handle" in output or "broker/delivery.py" in output, output


@pytest.mark.timeout(120)
def test_the_shards_benchmark_runs_one_and_two_brokers_to_completion():
    returncode, output = run_benchmark("shards.py", "--brokers", "1,2", "--messages", "2000", "--seconds", "60")
    assert returncode == 0, output
    for n in (1, 2):
        assert f"{n} broker{'s' if n > 1 else ''}: " in output and "2,000 of 2,000 received" in output, output
    assert "per broker" in output and "model" in output, output


def test_bench_hosts_and_shards_are_known_benchmarks():
    for name in ("shards", "hosts"):
        result = CliRunner().invoke(main, ["bench", name, "--", "--help"])
        assert result.exit_code == 0, result.output


@pytest.mark.timeout(120)
def test_the_layers_benchmark_measures_the_bus_layer_with_curve_keys_beside_the_plain_one():
    pytest.importorskip("channels_redis", reason="the layers benchmark needs channels_redis (the bench extra)")
    if shutil.which("redis-server") is None:
        pytest.skip("the layers benchmark needs redis-server (apt-get install redis-server)")
    returncode, output = run_benchmark("layers.py", "--quick", "--layers", "bus,bus-curve", "--scenarios",
                                       "p2p,rtt", "-r", "1", "--timeout", "90", timeout=110)
    assert returncode == 0, output
    assert "BusChannelLayer, CURVE" in output and "bus-curve / bus" in output, output
