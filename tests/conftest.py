"""Fixtures for the integration tests: real brokers (in a thread or as the ``channelbus broker``
process) on ports the OS picks, and client code run in separate processes.

Every broker and every process a test starts is stopped in its teardown. Every broker runs its
check mode (``--check``: the routing state's rules, conservation first, after every batch and
tick): broker processes through ``CHANNELBUS_CHECK``, set here for everything the suite starts;
brokers in threads through ``checked``, which ``BrokerServer.serve`` is held to below. A broken
rule fails the test that broke it.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from bus_workers import ProcessRunner
from broker.config import BrokerConfig
from broker.server import BrokerServer, start_in_thread
from consumers.cli import EXIT_BROKEN_RULE

os.environ["CHANNELBUS_CHECK"] = "1"  # (inherited by every broker process the suite starts)

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "tcp://127.0.0.1:*"
READY_RE = re.compile(r"listening on (\S+), publishing on (\S+)")
STARTUP_SECONDS = 15.0
STOP_SECONDS = 5.0


def checked(**settings) -> BrokerConfig:
    """The BrokerConfig of a broker the suite starts: check mode on, whatever else is given."""
    return BrokerConfig(**{"check": True, **settings})


@pytest.fixture(autouse=True)
def every_broker_checks(monkeypatch):
    """No broker runs in a thread of the suite without its check mode; and one whose check
    found a broken rule fails the test."""
    serve = BrokerServer.serve

    def checked_serve(server: BrokerServer) -> None:
        assert server.config.check, "a broker started by a test must run its check mode (conftest.checked)"
        serve(server)

    monkeypatch.setattr(BrokerServer, "serve", checked_serve)


@dataclass
class ThreadBroker:
    """A broker served from a thread of the test process."""

    url: str
    pub_url: str
    server: BrokerServer

    @property
    def stats(self) -> dict:
        return dict(self.server.router.stats)


@dataclass
class ProcessBroker:
    """A ``channelbus broker`` subprocess."""

    url: str
    pub_url: str
    process: subprocess.Popen
    stderr_path: Path

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; return the exit status."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(STOP_SECONDS)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def _client_url(endpoint: str) -> str:
    """The URL a client dials for a bound endpoint (a wildcard host becomes loopback)."""
    return re.sub(r"^tcp://(0\.0\.0\.0|\*|\[::\])", "tcp://127.0.0.1", endpoint)


@pytest.fixture
def broker_factory():
    """``broker_factory(**BrokerConfig fields)`` starts a broker in a thread (loopback, ports
    from the OS unless given) and returns a ThreadBroker; all are stopped at teardown."""
    started: list[tuple[BrokerServer, object]] = []

    def start(**settings) -> ThreadBroker:
        settings.setdefault("bind", LOOPBACK)
        settings.setdefault("pub_bind", LOOPBACK)
        server, thread = start_in_thread(checked(**settings))
        started.append((server, thread))
        return ThreadBroker(_client_url(server.endpoint), server.pub_endpoint, server)

    yield start
    for server, thread in started:
        server.stop()
    for server, thread in started:
        thread.join(STOP_SECONDS)
        assert not thread.is_alive(), "broker thread did not stop"
        assert server.violation is None, f"the broker's check mode found: {server.violation}"


@pytest.fixture
def broker(broker_factory) -> ThreadBroker:
    """A real broker in a thread of this process, on loopback ports the OS picked."""
    return broker_factory()


@pytest.fixture
def broker_process_factory(tmp_path):
    """``broker_process_factory(*extra_args)`` runs ``channelbus broker`` (via ``python -m
    consumers.cli``) on OS-picked loopback ports unless the args say otherwise, waits for its
    ready line and returns a ProcessBroker; every one is stopped at teardown."""
    started: list[ProcessBroker] = []

    def start(*args: str) -> ProcessBroker:
        if "--bind" not in args:
            args = ("--bind", LOOPBACK, *args)
        if "--pub-bind" not in args:
            args = ("--pub-bind", LOOPBACK, *args)
        stderr_path = tmp_path / f"broker-{len(started)}.stderr"
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "consumers.cli", "broker", *args],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, cwd=ROOT,
            )
        handle = ProcessBroker("", "", process, stderr_path)
        started.append(handle)
        line = _read_line(process, STARTUP_SECONDS)
        match = READY_RE.search(line)
        if not match:
            handle.stop()
            raise RuntimeError(
                f"broker did not report ready (stdout {line!r}); stderr:\n{stderr_path.read_text()}"
            )
        handle.url, handle.pub_url = _client_url(match.group(1)), match.group(2)
        return handle

    yield start
    for handle in started:
        status = handle.stop()
        assert status != EXIT_BROKEN_RULE, (
            f"the broker's check mode found a broken rule:\n{handle.stderr_path.read_text()[-3000:]}"
        )


@pytest.fixture
def broker_process(broker_process_factory) -> ProcessBroker:
    """A real ``channelbus broker`` process on loopback ports the OS picked."""
    return broker_process_factory()


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The first stdout line of ``process``, or what came before it exited or timed out."""
    fd = process.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").partition("\n")[0]


@pytest.fixture
def router_dealer():
    """A ROUTER and a DEALER (routing id ``b"peer"``) connected over a loopback port the OS
    picked: real sockets for tests of the broker's socket helpers."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"peer")
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield router, dealer
    router.close(linger=0)
    dealer.close(linger=0)
    ctx.term()


@pytest.fixture
def procs():
    """A ProcessRunner: ``procs.start(func, *args)`` runs a function of ``bus_workers`` in a
    spawned process; all of them are terminated (then killed) at teardown."""
    runner = ProcessRunner()
    yield runner
    runner.stop_all()
