"""The processes and measurements around a run of the layers benchmark: our own redis-server
and channelbus broker (``Services``, both on free loopback ports and stopped by PID; for the
``bus-curve`` layer a second broker with CURVE keys, made in the run's work directory), stopping
any process by PID (``stop_pid``: grace, SIGTERM, SIGKILL), and the host's CPU figures from
/proc (how busy it is, waiting for it to be quiet, busy CPU seconds since boot). ``RunFailed``
is the error a run raises when a service or a worker lets it down.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

from .config import HOST, QUIET_BUSY, ROOT


class RunFailed(Exception):
    pass


def stop_pid(proc, grace: float) -> None:
    """Wait ``grace`` seconds for ``proc`` (Popen or Process), then SIGTERM, then SIGKILL its PID."""
    def alive() -> bool:
        return proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()

    def wait(seconds: float) -> None:
        if isinstance(proc, subprocess.Popen):
            try:
                proc.wait(seconds)
            except subprocess.TimeoutExpired:
                pass
        else:
            proc.join(seconds)

    wait(grace)
    for sig, seconds in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not alive():
            return
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        wait(seconds)


def host_busy(interval: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat), None if unknown."""
    def sample():
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def host_cpu_seconds() -> float | None:
    """CPU seconds all CPUs spent busy since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit: float, deadline: float, log) -> float | None:
    """Wait (at most ``limit`` seconds) until other programs leave the CPUs idle; return the
    busy fraction seen last. Another benchmark on a 2-core host would halve every number."""
    busy = host_busy()
    end = min(deadline, time.monotonic() + limit)
    warned = False
    while busy is not None and busy > QUIET_BUSY and time.monotonic() < end:
        if not warned:
            log(f"  host {busy:.0%} busy before the run: waiting up to {limit:g} s for quiet")
            warned = True
        time.sleep(1.0)
        busy = host_busy()
    return busy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def read_line(pipe, deadline: float) -> str:
    """One line from a subprocess pipe, or '' at EOF or the deadline."""
    buf = b""
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ""
        ready, _, _ = select.select([pipe], [], [], remaining)
        if not ready:
            return ""
        chunk = os.read(pipe.fileno(), 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


class Services:
    """Our own redis-server and channelbus broker, both stopped by PID in ``close``; with
    ``curve`` also a broker with CURVE keys (``env["bus-curve"]``; the key files a client uses
    in ``env["bus-curve-keys"]``), with ``floor`` the floor's forwarder."""

    def __init__(self, workdir: str, profile_dir: str | None, deadline: float, floor: bool = False,
                 curve: bool = False) -> None:
        self.procs: list[subprocess.Popen] = []
        self.env: dict = {}
        self.pids: dict[str, int] = {}  # "broker", "floor": the processes that print "listening on"
        self.workdir = workdir
        try:
            self._start_redis(deadline)
            self._start_broker(profile_dir, deadline)
            if curve:
                self._start_broker(profile_dir, deadline, keys=self._make_keys())
            if floor:
                self._start_floor(deadline)
        except BaseException:
            self.close()
            raise

    def _start_redis(self, deadline: float) -> None:
        for _ in range(5):  # a free port may be taken before redis binds it: try another
            port = free_port()
            log = open(os.path.join(self.workdir, f"redis-{port}.log"), "wb")
            proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            log.close()
            self.procs.append(proc)
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with socket.create_connection((HOST, port), timeout=0.5) as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(16).startswith(b"+PONG"):
                            self.redis_pid = proc.pid
                            self.env["redis"] = f"redis://{HOST}:{port}"
                            return
                except OSError:
                    time.sleep(0.05)
            stop_pid(proc, 0)
        raise RuntimeError(f"redis-server did not start; see {self.workdir}/redis-*.log")

    def _start_listening(self, name: str, argv: list[str], cwd: str, deadline: float) -> re.Match:
        """Start ``argv`` (its stderr to ``<name>.log``) and wait for its "listening on" line on
        stdout; return the match."""
        log = open(os.path.join(self.workdir, f"{name}.log"), "wb")
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(proc)
        line = read_line(proc.stdout, min(deadline, time.monotonic() + 30))
        match = re.search(r"listening on ([^\s,]+)", line)
        if not match:
            raise RuntimeError(f"the {name} did not start (said {line!r}); see {self.workdir}/{name}.log")
        self.pids[name] = proc.pid
        return match

    def _make_keys(self) -> dict:
        """CURVE key pairs in ``workdir/keys`` (removed with the work directory): the broker's,
        and one client key pair that every worker of the ``bus-curve`` layer uses (as one
        Django project would), its public key alone in ``authorized/``."""
        import shutil

        import zmq.auth

        keys = os.path.join(self.workdir, "keys")
        authorized = os.path.join(keys, "authorized")
        os.makedirs(authorized, mode=0o700)
        server_public, server_secret = zmq.auth.create_certificates(keys, "broker")
        client_public, client_secret = zmq.auth.create_certificates(keys, "bench")
        shutil.copy(client_public, authorized)
        self.env["bus-curve-keys"] = (client_secret, server_public)
        return {"secret_key": server_secret, "authorized_keys": authorized}

    def _start_broker(self, profile_dir: str | None, deadline: float, keys: dict | None = None) -> None:
        """The broker (``keys``: the CURVE one, "broker-curve", from ``_make_keys``)."""
        name = "broker-curve" if keys else "broker"
        argv = [sys.executable]
        if profile_dir:
            argv += ["-m", "cProfile", "-o", os.path.join(profile_dir, f"{name}.prof")]
        argv += ["-m", "consumers.cli", "broker", "--bind", f"tcp://{HOST}:*", "--pub-bind", f"tcp://{HOST}:*",
                 "--log-level", "warning"]
        if keys:
            argv += ["--secret-key", keys["secret_key"], "--authorized-keys", keys["authorized_keys"]]
        match = self._start_listening(name, argv, ROOT, deadline)
        self.env["bus-curve" if keys else "bus"] = match.group(1)

    def _start_floor(self, deadline: float) -> None:
        """The floor's plain forwarder (floor.py), for ``--layers ...,floor``."""
        argv = [sys.executable, "-m", "layerbench.floor", f"tcp://{HOST}:*"]
        match = self._start_listening("floor", argv, os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      deadline)
        self.env["floor"] = match.group(1)

    def check(self) -> None:
        """Raise RunFailed (with the end of its log) if the broker or redis-server has exited."""
        for proc in self.procs:
            if proc.poll() is not None:
                name = {pid: name for name, pid in self.pids.items()}.get(proc.pid, "redis-server")
                raise RunFailed(f"the {name} (pid {proc.pid}) exited with status {proc.returncode};"
                                f" its log ends:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        import glob
        pattern = f"{name}.log" if name in self.pids else "redis-*.log"
        text = ""
        for path in sorted(glob.glob(os.path.join(self.workdir, pattern))):
            with open(path, errors="replace") as handle:
                text += "".join(handle.readlines()[-lines:])
        return text.rstrip() or "(empty)"

    def cpu(self) -> dict:
        """CPU seconds used so far by the broker and by redis-server (from /proc)."""
        tick = os.sysconf("SC_CLK_TCK")
        result = {}
        for name, pid in (("bus", self.pids.get("broker")), ("bus-curve", self.pids.get("broker-curve")),
                          ("redis", getattr(self, "redis_pid", None)), ("floor", self.pids.get("floor"))):
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                result[name] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            except (OSError, ValueError, IndexError, TypeError):
                result[name] = None
        return result

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            stop_pid(proc, 10.0)
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()

