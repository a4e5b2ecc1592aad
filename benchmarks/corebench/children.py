"""The parent side shared by the benchmarks that run processes (core.py, shards.py): a child
process that speaks JSON lines, stopped by PID, and its CPU time read from /proc (the host's
is layerbench.services.host_cpu_seconds)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Child:
    """A subprocess that prints lines on stdout (JSON, or a broker's banner); stopped by PID.
    With ``profile_dir`` it runs under cProfile into ``DIR/NAME.prof``."""

    def __init__(self, name: str, argv: list[str], env: dict, profile_dir: str | None = None):
        self.name = name
        prefix = [sys.executable]
        if profile_dir:
            prefix += ["-m", "cProfile", "-o", os.path.join(profile_dir, f"{name}.prof")]
        self.proc = subprocess.Popen(
            prefix + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            cwd=ROOT, env=env,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, deadline: float, key: str | None = None, pattern: re.Pattern | None = None):
        """The next JSON line holding ``key`` (or the match of ``pattern``); TimeoutError if
        none comes before ``deadline`` or the child exits first."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: nothing with {key or pattern.pattern!r} in time")
            try:
                line = self.lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                self.lines.put(None)  # (a later expect() learns it too)
                raise TimeoutError(f"{self.name} exited (status {self.proc.wait()}) before {key or pattern.pattern!r}")
            if pattern is not None:
                match = pattern.search(line)
                if match:
                    return match
                continue
            try:
                fields = json.loads(line)
            except ValueError:
                continue
            if isinstance(fields, dict) and key in fields:
                return fields

    def tell(self, word: str) -> None:
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def cpu(self, main_thread: bool = False) -> float | None:
        return cpu_seconds(self.proc.pid, main_thread)

    def stop(self, grace: float = 5.0) -> None:
        """Wait ``grace`` seconds for an exit of its own, then SIGTERM, then SIGKILL, by PID."""
        proc = self.proc
        for sig, wait in ((None, grace), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if proc.poll() is not None:
                break
            if sig is not None:
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


def cpu_seconds(pid: int, main_thread: bool = False) -> float | None:
    """CPU time a process has used so far; None off Linux. All its threads (user + system,
    from /proc/PID/stat: it counts threads that have ended, and a process that has just exited),
    or with ``main_thread`` only the one Python runs in, not libzmq's I/O threads (from its
    schedstat, in nanoseconds: /proc's CPU ticks are too coarse to tell a few microseconds per
    message apart)."""
    try:
        if main_thread:
            with open(f"/proc/{pid}/task/{pid}/schedstat") as handle:
                return int(handle.read().split()[0]) / 1e9
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
