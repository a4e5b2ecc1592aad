"""`channelbus bench` finds and runs the benchmark scripts of the checkout."""

from __future__ import annotations

from click.testing import CliRunner

from consumers.cli import main


def test_bench_runs_the_named_script_with_its_arguments():
    result = CliRunner().invoke(main, ["bench", "core", "--", "--help"])  # (-- : the script's own help)
    assert result.exit_code == 0, result.output
    assert "--messages" in result.output and "--rtt" in result.output


def test_bench_refuses_an_unknown_benchmark():
    result = CliRunner().invoke(main, ["bench", "nope"])
    assert result.exit_code == 2
    assert "'nope' is not one of" in result.output
