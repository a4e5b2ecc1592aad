"""Fixtures and process handles for the consumer, runner, debugging-command and example tests.

``bus`` is a real broker served from a thread of the test process on loopback ports the OS
picked; ``processes`` starts commands as subprocesses whose stdout and stderr are read line by
line in threads, so a test waits for a line with a timeout instead of sleeping. Every process
is killed by PID and every broker stopped at teardown.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.config import BrokerConfig
from broker.server import BrokerServer, start_in_thread

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
LINE_TIMEOUT = 15.0


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


class Proc:
    """A subprocess whose output lines are collected as they come."""

    def __init__(self, args: list[str], *, env: dict | None = None, name: str = "") -> None:
        self.name = name or " ".join(args[:4])
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=full_env, text=True, bufsize=1,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.pid = self.popen.pid
        self.lines = {"stdout": [], "stderr": []}
        self._queues = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self._readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in ("stdout", "stderr")
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: str) -> None:
        pipe = getattr(self.popen, stream)
        for line in pipe:
            self.lines[stream].append(line.rstrip("\n"))
            self._queues[stream].put(line.rstrip("\n"))
        self._queues[stream].put(None)

    def expect(self, pattern: str, stream: str = "stdout", timeout: float = LINE_TIMEOUT) -> re.Match:
        """Read lines of ``stream`` until one matches ``pattern``; fail after ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queues[stream].get(timeout=max(0.0, remaining))
            except queue.Empty:
                line = False
            if line is None:
                self._queues[stream].put(None)  # keep the end visible to later calls
            if line is None or line is False:
                raise AssertionError(
                    f"{self.name}: no {stream} line matching {pattern!r}"
                    f" ({'it ended' if line is None else f'within {timeout:g} s'});\n{self.output()}"
                )
            match = regex.search(line)
            if match:
                return match

    def next_line(self, stream: str = "stdout", timeout: float = LINE_TIMEOUT) -> str | None:
        """The next line of ``stream`` (None at its end); fail after ``timeout``."""
        try:
            line = self._queues[stream].get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no {stream} line within {timeout:g} s;\n{self.output()}") from None
        if line is None:
            self._queues[stream].put(None)
        return line

    def write(self, line: str) -> None:
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def close_stdin(self) -> None:
        self.popen.stdin.close()

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = LINE_TIMEOUT) -> int:
        """Wait for the exit and for both streams to be read to their end; return the status."""
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout:g} s;\n{self.output()}") from None
        for reader in self._readers:
            reader.join(timeout)
        return status

    def output(self) -> str:
        return "\n".join([f"--- {self.name} stdout", *self.lines["stdout"],
                          f"--- {self.name} stderr", *self.lines["stderr"]])

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(5)
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            try:
                pipe.close()
            except OSError:
                pass


@pytest.fixture
def processes():
    """``processes(*args, env=None, name="")`` starts a Proc; all are killed at teardown."""
    started: list[Proc] = []

    def start(*args: str, env: dict | None = None, name: str = "") -> Proc:
        proc = Proc(list(args), env=env, name=name)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def channelbus(*args: str) -> list[str]:
    """The command line of ``channelbus ARGS`` run with this interpreter."""
    return [sys.executable, "-m", "consumers.cli", *args]
