"""`channelbus stats` and Client.stats against a real broker."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from clients import Client
from consumers.cli import main
from consumers.debug import format_stats, rates


@pytest.mark.timeout(30)
def test_stats_shows_clients_deep_channels_groups_and_counters(broker):
    with Client(broker.url) as bus:
        for i in range(3):
            bus.send("backlog", {"type": "job", "i": i})
        member = bus.new_channel()
        bus.group_add("room", member)
        result = CliRunner().invoke(main, ["stats", "--broker", broker.url])
        assert result.exit_code == 0, result.output
        assert "2 client(s)" in result.output  # this one and the command's own
        lines = result.output.splitlines()
        assert "backlog" in lines[6]  # the deepest channel is listed first
        assert "groups: 1" in result.output and "room" in result.output
        assert "received 3" in result.output
        assert lines[2].startswith("accounted: accepted 3 = queued 3 + in flight 0 + acknowledged 0")
        assert "MISMATCH" not in result.output


@pytest.mark.timeout(30)
def test_stats_account_for_every_message_the_broker_accepted(broker):
    """STATS carries each fate's counter, and accepted is their sum with what is queued and in
    flight: three sends (one taken and acknowledged, one pushed and not yet taken, one queued)
    and a group message whose copy for a full member is dropped."""
    with Client(broker.url, capacity=3) as bus, Client(broker.url, receive_window=1) as taker, \
            Client(broker.url, capacity=2) as announcer:
        for i in range(3):
            bus.send("jobs", {"type": "job", "i": i})
        assert taker.receive("jobs", timeout=5)["i"] == 0  # taken and acknowledged
        bus.group_add("room", "jobs")
        bus.group_add("room", "spare")
        assert announcer.group_send("room", {"type": "g"}) == {"queued": 1, "full": 1}  # jobs: 2 of 2
        sample = bus.stats()
    counters = sample["counters"]
    assert counters["accepted"] == 3 + 2  # three sends, two group copies
    assert (counters["acknowledged"], counters["dropped_full"]) == (1, 1)
    assert sample["queued"] + sample["inflight"] == 3
    fates = (sample["queued"] + sample["inflight"] + counters["acknowledged"] + counters["expired"]
             + counters["flushed"] + counters["dropped_full"] + counters["dropped_memory"]
             + counters["dropped_owner_gone"])
    assert fates == counters["accepted"]


@pytest.mark.timeout(30)
def test_stats_json_is_one_object_with_the_counters(broker):
    with Client(broker.url) as bus:
        bus.send("q", {"type": "x"})
        result = CliRunner().invoke(main, ["stats", "--broker", broker.url, "--json", "--top", "1"])
    assert result.exit_code == 0, result.output
    sample = json.loads(result.output)
    assert sample["counters"]["received"] == 1
    assert sample["top_channels"] == [["q", 1, 0, 0]]
    assert sample["clients"] == 2 and sample["bytes_held"] > 0


def test_rates_are_the_counter_deltas_per_second_of_uptime():
    before = {"uptime": 10.0, "counters": {"received": 100, "delivered": 50}}
    after = {"uptime": 12.0, "counters": {"received": 300, "delivered": 250}}
    assert rates(after, before) == {"in_per_s": 100.0, "out_per_s": 100.0}
    assert rates(after, None) == {}


def test_a_missing_broker_is_a_one_line_error():
    result = CliRunner().invoke(main, ["stats", "--broker", "tcp://127.0.0.1:9", "--timeout", "0.3"])
    assert result.exit_code == 1
    assert "cannot reach the broker" in result.output


def test_format_stats_text_names_every_refusal_kind():
    sample = {
        "uptime": 3700.0, "clients": 2, "bytes_held": 2048, "max_memory": 1 << 20,
        "channels": 1, "queued": 1, "inflight": 0, "reserved": 0, "groups": 0,
        "top_channels": [["q", 1, 0, 0]], "top_groups": [],
        "counters": {"received": 1, "delivered": 0, "full": 4, "too_large": 5, "memory_refused": 6,
                     "bad_frames": 7, "expired": 8, "group_sends": 0, "group_skipped": 0},
    }
    text = format_stats(sample)
    assert "up 1h01m40s" in text and "memory 2.0 KiB of 1.0 MiB" in text
    assert "full 4, too large 5, memory 6, bad frames 7; expired 8" in text


def test_format_stats_shows_busy_polls_last_and_only_when_the_broker_polled():
    sample = {
        "uptime": 10.0, "clients": 1, "bytes_held": 0, "max_memory": 1 << 20,
        "channels": 0, "queued": 0, "inflight": 0, "reserved": 0, "groups": 1,
        "top_channels": [], "top_groups": [["room", 3]],
        "counters": {"received": 0, "delivered": 0, "full": 0, "too_large": 0, "memory_refused": 0,
                     "bad_frames": 0, "expired": 0, "group_sends": 0, "group_skipped": 0,
                     "busy_polled": 0, "busy_poll_missed": 0},
    }
    assert "busy poll" not in format_stats(sample)
    sample["counters"].update(busy_polled=30, busy_poll_missed=10)
    lines = format_stats(sample).splitlines()
    assert lines[-2].split() == ["3", "room"]  # (the group list stays under its heading)
    assert lines[-1] == "busy poll: 30 command(s) caught without a wake-up, 10 poll(s) ran out (75% caught)"
