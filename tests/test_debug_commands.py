"""``channelbus send``, ``group-send`` and ``listen`` against a real broker; their argument
checks without one."""

from __future__ import annotations

import json
import signal

import pytest
from click.testing import CliRunner

from clients import Client
from consumer_helpers import bus, channelbus, processes  # noqa: F401 (fixtures)
from consumers import commands as cli
from test_runner import free_port

pytestmark = pytest.mark.timeout(60)


def invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def flat(text: str) -> str:
    return " ".join(text.split())


# -- argument checks (no broker) -----------------------------------------------------------------

@pytest.mark.parametrize("args, text", [
    (["send", "tasks", "{oops"], "not valid JSON"),
    (["send", "tasks", '{"text": "no type"}'], 'a JSON object with a "type" string'),
    (["send", "no spaces", '{"type": "t"}'], "Channel name must be"),
    (["group-send", "bad!group", '{"type": "t"}'], "Group name must be"),
    (["send", "tasks", '{"type": "t"}', "--broker", "localhost:5555"], "is not a broker URL"),
    (["send", "tasks", '{"type": "t"}', "--broker", "tcp://127.0.0.1:*"], "port from 1 to 65535"),
    (["listen"], "give a CHANNEL or --group GROUP"),
    (["listen", "tasks", "--group", "g"], "give a CHANNEL or --group GROUP"),
    (["listen", "tasks", "--count", "0"], "x>=1"),
])
def test_bad_arguments_are_usage_errors_that_say_the_rule(args, text):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert text in flat(result.output)


def test_every_option_of_the_debugging_commands_has_help_text():
    for command in (cli.send, cli.group_send, cli.listen):
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{command.name} {param.name}"


def test_send_without_a_broker_exits_1_with_one_line():
    url = f"tcp://127.0.0.1:{free_port()}"
    result = invoke("send", "tasks", '{"type": "t"}', "--broker", url, "--timeout", "0.3")
    assert result.exit_code == 1
    assert f"cannot reach the broker at {url}" in result.output


# -- against a broker -------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_send_queues_a_message_with_bytes_that_a_client_receives(bus):
    result = invoke("send", "tasks", '{"type": "image", "data": {"$bytes": "AP8="}}', "--broker", bus.url)
    assert result.exit_code == 0, result.output
    with Client(bus.url) as client:
        assert client.receive("tasks", timeout=10) == {"type": "image", "data": b"\x00\xff"}


def test_send_to_a_full_channel_exits_1_and_says_so(bus):
    args = ("send", "tasks", '{"type": "t"}', "--broker", bus.url, "--capacity", "1")
    assert invoke(*args).exit_code == 0
    result = invoke(*args)
    assert result.exit_code == 1
    assert "already holds its capacity of 1" in result.output


def test_broker_url_comes_from_the_environment(bus):
    result = CliRunner().invoke(cli.main, ["send", "tasks", '{"type": "env"}'], env={"CHANNELBUS_BROKER": bus.url})
    assert result.exit_code == 0, result.output
    with Client(bus.url) as client:
        assert client.receive("tasks", timeout=10) == {"type": "env"}


def test_listen_to_a_channel_prints_each_message_as_one_json_line_and_stops_after_count(bus, processes):
    with Client(bus.url) as client:
        client.send("tasks", {"type": "one", "data": b"\x01"})
        client.send("tasks", {"type": "two", "text": "été"})
    listener = processes(*channelbus("listen", "tasks", "--count", "2", "--broker", bus.url))
    assert listener.wait() == 0, listener.output()
    assert [json.loads(line) for line in listener.lines["stdout"]] == [
        {"type": "one", "data": {"$bytes": "AQ=="}}, {"type": "two", "text": "été"},
    ]


def test_listen_to_a_group_sees_group_send_until_interrupted(bus, processes):
    listener = processes(*channelbus("listen", "--group", "room", "--broker", bus.url))
    listener.expect(r"listening on group room \(as specific\.\S+\)", "stderr")
    for n in range(3):
        result = invoke("group-send", "room", json.dumps({"type": "chat.message", "n": n}), "--broker", bus.url)
        assert result.exit_code == 0, result.output
    assert [json.loads(listener.next_line()) for _ in range(3)] == [
        {"type": "chat.message", "n": n} for n in range(3)
    ]
    listener.signal(signal.SIGINT)
    assert listener.wait() == 0, listener.output()
    assert not any("Traceback" in line for line in listener.lines["stderr"])


def test_listen_leaves_its_group_on_sigterm(bus, processes):
    listener = processes(*channelbus("listen", "--group", "room", "--broker", bus.url))
    listener.expect("listening on group room", "stderr")
    assert bus.server.router.groups.sizes() == {"room": 1}
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0, listener.output()
    with Client(bus.url) as client:
        client.ping()  # the broker has handled everything the listener sent before this
    assert bus.server.router.groups.sizes() == {}
