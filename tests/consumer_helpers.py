"""Fixtures and process handles for the consumer, runner, debugging-command and example tests.

``bus`` is a real broker served from a thread of the test process on loopback ports the OS
picked; ``processes`` starts commands as subprocesses whose stdout and stderr are read line by
line in threads, so a test waits for a line with a timeout instead of sleeping. Every process
is killed by PID and every broker stopped at teardown.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from broker.config import BrokerConfig
from broker.server import BrokerServer, start_in_thread
from lines import Process


@dataclass
class Bus:
    url: str
    pub_url: str
    server: BrokerServer


@pytest.fixture
def bus():
    """A broker in a thread of this process; stopped (and its thread joined) at teardown."""
    server, thread = start_in_thread(BrokerConfig(bind="tcp://127.0.0.1:*", pub_bind="tcp://127.0.0.1:*", check=True))
    yield Bus(server.endpoint, server.pub_endpoint, server)
    server.stop()
    thread.join(5)
    assert not thread.is_alive(), "broker thread did not stop"
    assert server.violation is None, f"the broker's check mode found: {server.violation}"


@pytest.fixture
def processes():
    """``processes(*args, env=None, name="")`` starts a ``lines.Process``; all are killed at
    teardown."""
    started: list[Process] = []

    def start(*args: str, env: dict | None = None, name: str = "") -> Process:
        proc = Process(list(args), env=env, name=name)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def channelbus(*args: str) -> list[str]:
    """The command line of ``channelbus ARGS`` run with this interpreter."""
    return [sys.executable, "-m", "consumers.cli", *args]
