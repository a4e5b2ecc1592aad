"""Pretend hosts for tests and benchmarks: Linux network namespaces joined by veth pairs.

``Hosts.create(["brokers", "alpha", "beta"])`` makes one network namespace per name, each a
"host" with an address on a private test subnet (``10.213.0.0/24`` by default) that exists
only inside those namespaces::

      brokers (10.213.0.1 on bridge cbbr)
        |-- to-alpha ==veth== eth0  alpha (10.213.0.2)
        `-- to-beta  ==veth== eth0  beta  (10.213.0.3)

The first host holds a bridge with its own address and one end of a veth pair per other host;
the other end is ``eth0`` in that host's namespace. Every host therefore reaches every other
one over the bridge, and nothing else: each namespace has its loopback and the subnet's route,
no default route, and no link to the root namespace (the veths are created directly inside the
namespaces, never in the root one). Programs run in a host with ``ip netns exec``
(``Hosts.start``); a socket of the calling process can be opened inside a host with
``Hosts.connect`` (a short-lived thread enters the namespace, connects, and ends).

``Hosts.remove()`` undoes everything, by name and by PID: it stops the processes started through
``Hosts.start`` (SIGTERM, then SIGKILL), then kills whatever still runs inside the namespaces
(``ip netns pids``: those processes' own children), deletes each veth pair and the bridge by
name, and deletes the namespaces. It runs at interpreter exit too if nobody called it.

Making namespaces needs Linux, the ``ip`` command (iproute2) and CAP_SYS_ADMIN (root);
``Hosts.create`` raises ``NamespaceError`` saying what failed otherwise, after removing what it
had made. No module outside the standard library is imported, so benchmarks can use it too.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lines import STOP_SECONDS, Process

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.213.0"  # a /24 that exists only inside the namespaces made here
NETNS_DIR = Path("/var/run/netns")
BRIDGE = "cbbr"
CLONE_NEWNET = 0x40000000
IP_SECONDS = 15.0  # no `ip` command should take longer

_serial = itertools.count(1)


class NamespaceError(Exception):
    """Network namespaces cannot be made here (the message says why)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_SECONDS,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise NamespaceError("the ip command (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise NamespaceError(f"`ip {' '.join(args)}` did not finish within {IP_SECONDS:g} s") from None
    if check and done.returncode != 0:
        raise NamespaceError(f"`ip {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()}")
    return done


@dataclass
class Host:
    name: str  # its role, e.g. "brokers"
    namespace: str  # the network namespace's name, unique to this process
    address: str  # its address on the test subnet
    link: str  # its interface on the subnet, inside its namespace (the bridge, or eth0)
    hub_link: str | None = None  # the far end of its veth pair, in the first host (None there)


@dataclass
class Hosts:
    hosts: dict[str, Host]
    hub: Host
    processes: list[Process] = field(default_factory=list)
    _made: list[tuple[str, ...]] = field(default_factory=list)  # what to undo, in order made

    # -- making and removing ---------------------------------------------------------------

    @classmethod
    def create(cls, names: list[str], subnet: str = SUBNET, tag: str | None = None) -> Hosts:
        """One namespace per name; the first is the hub. Raises NamespaceError (having removed
        whatever it made) when namespaces, veths or the bridge cannot be made."""
        if not sys.platform.startswith("linux"):
            raise NamespaceError(f"network namespaces are a Linux feature; this is {sys.platform}")
        if shutil.which("ip") is None:
            raise NamespaceError("the ip command (iproute2) is not installed")
        if not 2 <= len(names) <= 200 or len(set(names)) != len(names):
            raise ValueError("give 2 to 200 distinct host names")
        tag = tag or f"cbh{os.getpid()}x{next(_serial)}"
        hosts = {}
        for index, name in enumerate(names):
            hub_link = None if index == 0 else f"to-{name}"[:15]
            hosts[name] = Host(name, f"{tag}-{name}", f"{subnet}.{index + 1}",
                               BRIDGE if index == 0 else "eth0", hub_link)
        made = cls(hosts, hosts[names[0]])
        atexit.register(made.remove)
        try:
            made._build()
        except BaseException:
            made.remove()
            raise
        return made

    def _build(self) -> None:
        hub = self.hub
        for host in self.hosts.values():
            _ip("netns", "add", host.namespace)
            self._made.append(("netns", host.namespace))
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        _ip("-n", hub.namespace, "link", "add", BRIDGE, "type", "bridge")
        self._made.append(("link", hub.namespace, BRIDGE))
        _no_link_local(hub.namespace, BRIDGE)
        _ip("-n", hub.namespace, "addr", "add", f"{hub.address}/24", "dev", BRIDGE)
        _ip("-n", hub.namespace, "link", "set", BRIDGE, "up")
        for host in self.hosts.values():
            if host is hub:
                continue
            # Both ends are made inside the namespaces: nothing ever appears in the root one.
            _ip("-n", hub.namespace, "link", "add", host.hub_link, "type", "veth",
                "peer", "name", host.link, "netns", host.namespace)
            self._made.append(("link", hub.namespace, host.hub_link))
            _no_link_local(hub.namespace, host.hub_link)
            _no_link_local(host.namespace, host.link)
            _ip("-n", hub.namespace, "link", "set", host.hub_link, "master", BRIDGE)
            _ip("-n", hub.namespace, "link", "set", host.hub_link, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.link)
            _ip("-n", host.namespace, "link", "set", host.link, "up")
        for host in self.hosts.values():
            self._wait_for_address(host)

    def _wait_for_address(self, host: Host) -> None:
        """The address is usable (not tentative) and the link up, or NamespaceError."""
        deadline = time.monotonic() + IP_SECONDS
        while True:
            shown = _ip("-n", host.namespace, "-j", "addr", "show", "dev", host.link).stdout
            info = json.loads(shown or "[]")
            ok = any(a.get("local") == host.address and not a.get("tentative")
                     for i in info for a in i.get("addr_info", []))
            if ok and info and info[0].get("operstate") in ("UP", "UNKNOWN"):
                return
            if time.monotonic() > deadline:
                raise NamespaceError(f"{host.link} in {host.namespace} did not come up: {shown.strip()}")
            time.sleep(0.02)

    def remove(self) -> None:
        """Stop every process, delete every veth pair, the bridge and the namespaces, by name
        and PID. Safe to call twice; raises NamespaceError at the end if something stayed."""
        atexit.unregister(self.remove)
        problems = []
        for process in self.processes:
            try:
                process.stop()
            except Exception as exc:  # (keep going: the rest must go too)
                problems.append(f"stopping {process.name}: {exc}")
        for kind, *what in self._made:
            if kind == "netns":
                problems += self._kill_inside(what[0])
        for kind, *what in reversed(self._made):
            if kind == "link":
                namespace, link = what
                done = _ip("-n", namespace, "link", "del", link, check=False)
                if done.returncode != 0 and "Cannot find device" not in done.stderr:
                    problems.append(f"deleting {link} in {namespace}: {done.stderr.strip()}")
        for kind, *what in reversed(self._made):
            if kind == "netns":
                done = _ip("netns", "del", what[0], check=False)
                if done.returncode != 0 and (NETNS_DIR / what[0]).exists():
                    problems.append(f"deleting namespace {what[0]}: {done.stderr.strip()}")
        self._made.clear()
        if problems:
            raise NamespaceError("; ".join(problems))

    @staticmethod
    def _kill_inside(namespace: str) -> list[str]:
        """SIGKILL whatever still runs in ``namespace`` (only processes started in it, by us
        or by what we started); wait for them to go."""
        done = _ip("netns", "pids", namespace, check=False)
        pids = [int(p) for p in done.stdout.split()] if done.returncode == 0 else []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_SECONDS
        left = pids
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [pid for pid in left if _alive(pid)]
        return [f"process {pid} in {namespace} did not die" for pid in left]

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- using the hosts ---------------------------------------------------------------

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def command(self, host: str, *argv: str) -> list[str]:
        """The command line that runs ``argv`` in ``host``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host].namespace, *argv]

    def start(self, host: str, *argv: str, env: dict | None = None, name: str = "") -> Process:
        """Run ``argv`` in ``host`` (cwd: the repository, which is on PYTHONPATH; unbuffered
        Python output); stopped by ``remove()`` if not before."""
        process = Process(self.command(host, *argv), env=env, name=name or f"{host}: {' '.join(argv[:4])}")
        self.processes.append(process)
        return process

    def connect(self, host: str, address: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP socket of this process, opened inside ``host``'s namespace and connected to
        ``address:port`` (which must be on the test subnet or the host's loopback)."""
        outcome: dict = {}

        def enter_and_connect() -> None:  # (only this thread enters; it ends right after)
            try:
                _enter(self.hosts[host].namespace)
                outcome["socket"] = socket.create_connection((address, port), timeout=timeout)
            except BaseException as exc:  # handed to the caller
                outcome["error"] = exc

        thread = threading.Thread(target=enter_and_connect, name=f"connect from {host}", daemon=True)
        thread.start()
        thread.join(timeout + 5)
        if "error" in outcome:
            raise outcome["error"]
        if "socket" not in outcome:
            raise TimeoutError(f"connecting from {host} to {address}:{port} did not finish")
        return outcome["socket"]

    def routes(self, host: str) -> list[str]:
        """The IPv4 and IPv6 routes of ``host``, one line each."""
        lines = []
        for family in ("-4", "-6"):
            shown = _ip("-n", self.hosts[host].namespace, family, "route", "show", "table", "all").stdout
            lines += [line.strip() for line in shown.splitlines() if line.strip()]
        return lines

    def traffic(self) -> dict[str, tuple[int, int]]:
        """Bytes through each host's veth pair, as (sent by the host, received by it), read on
        the hub's end."""
        figures = {}
        for host in self.hosts.values():
            if host.hub_link is None:
                continue
            shown = _ip("-n", self.hub.namespace, "-j", "-s", "link", "show", "dev", host.hub_link).stdout
            stats = json.loads(shown)[0]["stats64"]
            figures[host.name] = (stats["rx"]["bytes"], stats["tx"]["bytes"])
        return figures


def _no_link_local(namespace: str, link: str) -> None:
    """No IPv6 link-local address on ``link`` (made down): the subnet's IPv4 addresses are the
    only ones on the wire. Where the kernel has no IPv6 there is nothing to turn off."""
    _ip("-n", namespace, "link", "set", "dev", link, "addrgenmode", "none", check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # (a zombie child of ours counts as gone)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


_libc = None


def _enter(namespace: str) -> None:
    """Move the calling thread into ``namespace`` (network only)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fd = os.open(NETNS_DIR / namespace, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {namespace}: {os.strerror(errno)}")
    finally:
        os.close(fd)


# -- channelbus brokers in a host ------------------------------------------------------------------

READY = re.compile(r"listening on (\S+), publishing on (\S+)")
BROKER_START_SECONDS = 20.0


@dataclass
class Broker:
    url: str  # its --bind endpoint, with the port it got
    pub_url: str
    process: Process

    def stop(self) -> int:
        """SIGTERM; the exit status (0: stopped cleanly; 70: its check mode found a broken rule)."""
        return self.process.stop()


def start_brokers(hosts: Hosts, host: str, count: int, *args: str, check: bool = True,
                  env: dict | None = None) -> list[Broker]:
    """``count`` ``channelbus broker`` processes in ``host``, bound to its subnet address on
    ports the OS picks, started together; returned once each has said it listens. Check mode
    is on unless ``check`` is false. If one does not start, all are stopped and AssertionError
    says why."""
    address = hosts[host].address
    env = {**(env or {}), "CHANNELBUS_CHECK": "1" if check else "0"}
    processes = [
        hosts.start(host, sys.executable, "-m", "consumers.cli", "broker", "--bind", f"tcp://{address}:*",
                    "--pub-bind", f"tcp://{address}:*", *args, env=env, name=f"broker {n + 1} on {host}")
        for n in range(count)
    ]
    try:
        brokers = []
        for process in processes:
            match = process.expect(READY.pattern, "stdout", BROKER_START_SECONDS)
            brokers.append(Broker(match.group(1), match.group(2), process))
        return brokers
    except BaseException:
        for process in processes:
            process.stop()
        raise


def bus_url(brokers: list[Broker]) -> str:
    """The URL list every client of this sharded bus is given (the same order everywhere)."""
    return ",".join(broker.url for broker in brokers)
