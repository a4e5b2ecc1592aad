"""``channelbus run`` in a real subprocess against a real broker: start, handle, survive a
raising handler, and on SIGTERM finish the message in hand and leave the groups."""

from __future__ import annotations

import re
import signal
import socket

import pytest
import zmq
from click.testing import CliRunner

from broker.protocol import wire
from broker.protocol.names import group_topic
from clients import Client
from consumer_helpers import bus, channelbus, processes  # noqa: F401 (fixtures)
from consumers import commands as cli
from runner_probe import GROUP, WORK

pytestmark = pytest.mark.timeout(60)

STARTED = r"started (\S+) on (\S+);"
STOPPED = re.compile(r"stopped (\S+) after (\d+) messages \((\d+) failed\)")
KINDS = ["runner_probe:Probe", "runner_probe:BlockingProbe"]


def start_runner(processes, bus, consumer: str, instances: int):
    """A ``channelbus run`` process and {label: channel name} once every instance started."""
    proc = processes(*channelbus("run", consumer, "--broker", bus.url, "--instances", str(instances)),
                     name=f"run {consumer}")
    channels = {}
    for _ in range(instances):
        match = proc.expect(STARTED, "stderr")
        channels[match.group(1)] = match.group(2)
    return proc, channels


def stopped_counts(proc) -> dict[str, tuple[int, int]]:
    """{label: (handled, failed)} from the ``stopped`` lines of a process that has exited."""
    return {m.group(1): (int(m.group(2)), int(m.group(3)))
            for m in map(STOPPED.search, proc.lines["stderr"]) if m}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("consumer", KINDS)
def test_runner_instances_serve_their_group_own_channel_and_share_the_work_channel(bus, processes, consumer):
    proc, channels = start_runner(processes, bus, consumer, instances=2)
    with Client(bus.url) as client:
        me = client.new_channel()
        client.group_send(GROUP, {"type": "probe.echo", "reply_to": me})
        assert {client.receive(me, timeout=10)["channel"] for _ in range(2)} == set(channels.values())

        for tag in range(10):
            client.send(WORK, {"type": "probe.echo", "reply_to": me, "tag": tag})
        assert sorted(client.receive(me, timeout=10)["tag"] for _ in range(10)) == list(range(10))

        label, own = sorted(channels.items())[0]
        client.send(own, {"type": "probe.echo", "reply_to": me, "tag": "own"})
        assert client.receive(me, timeout=10) == {"type": "probe.reply", "channel": own, "tag": "own"}

    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output()
    counts = stopped_counts(proc)
    assert set(counts) == set(channels)
    assert sum(handled for handled, _ in counts.values()) == 2 + 10 + 1  # each work message once
    assert counts[label][0] >= 2  # its group message and its own


@pytest.mark.parametrize("consumer", KINDS)
def test_a_raising_handler_is_logged_with_its_traceback_and_the_instance_keeps_serving(bus, processes, consumer):
    proc, channels = start_runner(processes, bus, consumer, instances=1)
    (own,) = channels.values()
    with Client(bus.url) as client:
        me = client.new_channel()
        client.send(own, {"type": "probe.fail", "tag": "first"})
        client.send(own, {"type": "probe.unknown"})
        client.send(own, {"type": "probe.echo", "reply_to": me, "tag": "after"})
        assert client.receive(me, timeout=10)["tag"] == "after"
    proc.expect(r"handler for 'probe.fail' from specific\.\S+ raised", "stderr")
    proc.expect(r"^Traceback", "stderr")
    proc.expect(r"RuntimeError: probe failure first", "stderr")
    proc.expect(r"no handler for message type 'probe.unknown'", "stderr")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output()
    assert list(stopped_counts(proc).values()) == [(3, 2)]


def _live_subscriber(context, bus, client) -> zmq.Socket:
    """A raw SUB socket on the group's topic, returned once it provably receives."""
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(bus.pub_url)
    sub.setsockopt(zmq.SUBSCRIBE, group_topic(GROUP))
    member = client.new_channel()
    client.group_add(GROUP, member)
    while True:  # the subscription travels apart from the commands: confirm it
        client.group_send(GROUP, {"type": "probe.ping"})
        if sub.poll(200):
            client.group_discard(GROUP, member)
            return sub


def _discarded(sub: zmq.Socket, channels: set[str]) -> set[str]:
    seen: set[str] = set()
    while seen != channels and sub.poll(10_000):
        frames = sub.recv_multipart()
        header = wire.unpack_header(frames[1])
        if header.get("op") == "discard" and header["ch"] in channels:
            seen.add(header["ch"])
    return seen


@pytest.mark.parametrize("consumer", KINDS)
def test_sigterm_finishes_the_message_in_hand_then_leaves_the_groups(bus, processes, consumer):
    context = zmq.Context()
    try:
        with Client(bus.url) as client:
            sub = _live_subscriber(context, bus, client)
            proc, channels = start_runner(processes, bus, consumer, instances=2)
            me = client.new_channel()
            client.send(WORK, {"type": "probe.slow", "seconds": 1.0, "reply_to": me})
            started = client.receive(me, timeout=10)
            assert started["type"] == "probe.started"
            proc.signal(signal.SIGTERM)
            finished = client.receive(me, timeout=10)
            assert finished == {"type": "probe.finished", "channel": started["channel"]}
            assert proc.wait() == 0, proc.output()
            assert _discarded(sub, set(channels.values())) == set(channels.values())
            assert set(stopped_counts(proc)) == set(channels)
            proc.expect("SIGTERM: stopping", "stderr")
    finally:
        context.destroy(linger=0)


def test_run_exits_1_with_one_line_when_no_broker_answers(processes):
    url = f"tcp://127.0.0.1:{free_port()}"
    proc = processes(*channelbus("run", "runner_probe:Probe", "--broker", url, "--timeout", "0.5"))
    assert proc.wait() == 1
    assert any(f"cannot reach the broker at {url}" in line for line in proc.lines["stderr"]), proc.output()
    assert not any("Traceback" in line for line in proc.lines["stderr"]), proc.output()


@pytest.mark.parametrize("spec, text", [
    ("examples.workers.jobs:digest", "not a subclass of AsyncConsumer or Consumer"),
    ("no_such_module_here:Thing", "cannot import 'no_such_module_here'"),
    ("examples.workers.worker", "is not MODULE:ATTR"),
])
def test_run_refuses_what_is_not_a_consumer_class(spec, text):
    result = CliRunner().invoke(cli.main, ["run", spec])
    assert result.exit_code == 2
    assert text in " ".join(result.output.split())


def test_run_help_gives_every_option_help_text_and_an_env_var():
    for param in cli.run.params:
        if isinstance(param, cli.click.Option) and param.name != "help":
            assert param.help and param.envvar and param.envvar.startswith("CHANNELBUS_"), param.name
