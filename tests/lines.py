"""A subprocess whose output lines the tests wait for: the one wrapper of the integration tests
(``consumer_helpers.processes``) and of the cross-host test and benchmark (``netns``). Standard
library only, so benchmarks/hosts.py can use it too."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
LINE_SECONDS = 15.0  # how long a test waits for a line it expects
STOP_SECONDS = 5.0  # how long a stopped process may take to exit


class Process:
    """A subprocess whose stdout and stderr lines are collected as they come (reader threads),
    so callers wait for a line with a timeout instead of sleeping."""

    def __init__(self, args: list[str], *, env: dict | None = None, name: str = "") -> None:
        self.name = name or " ".join(args[:6])
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(args, cwd=ROOT, env=full_env, text=True, bufsize=1,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.popen.pid  # (ip netns exec execs the program: this is its PID too)
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._queues = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True) for s in ("stdout", "stderr")]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: str) -> None:
        try:
            for line in getattr(self.popen, stream):
                line = line.rstrip("\n")
                self.lines[stream].append(line)
                self._queues[stream].put(line)
        except (OSError, ValueError):  # (closed by stop() while a child still held it open)
            pass
        self._queues[stream].put(None)

    def expect(self, pattern: str, stream: str = "stdout", timeout: float = LINE_SECONDS) -> re.Match:
        """The first next line of ``stream`` matching ``pattern``; AssertionError after ``timeout``
        or at the stream's end."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queues[stream].get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = False
            if line is None:
                self._queues[stream].put(None)  # (the end stays visible to later calls)
            if line is None or line is False:
                why = "it ended" if line is None else f"within {timeout:g} s"
                raise AssertionError(f"{self.name}: no {stream} line matching {pattern!r} ({why});\n{self.output()}")
            if match := regex.search(line):
                return match

    def next_line(self, stream: str = "stdout", timeout: float = LINE_SECONDS) -> str | None:
        """The next line of ``stream`` (None at its end); AssertionError after ``timeout``."""
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
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float = LINE_SECONDS) -> int:
        """The exit status, once both streams are read to their end; AssertionError after ``timeout``."""
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout:g} s;\n{self.output()}") from None
        for reader in self._readers:
            reader.join(timeout)
        return status

    def stop(self, grace: float = STOP_SECONDS) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status. Closes the pipes."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(STOP_SECONDS)
        for reader in self._readers:
            reader.join(1.0)
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            try:
                pipe.close()
            except (OSError, ValueError):
                pass
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL at once (a test's teardown); closes the pipes."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(STOP_SECONDS)
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            try:
                pipe.close()
            except (OSError, ValueError):
                pass

    def output(self) -> str:
        return "\n".join([f"--- {self.name} stdout", *self.lines["stdout"][-200:],
                          f"--- {self.name} stderr", *self.lines["stderr"][-200:]])
