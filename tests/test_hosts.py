"""The examples across hosts: three Linux network namespaces joined by veth pairs (tests/netns.py),
the brokers on one "host", the consumers on the two others.

- ``brokers`` (10.213.0.1) holds a bridge and the brokers; ``alpha`` (10.213.0.2) and ``beta``
  (10.213.0.3) each hold one end of a veth pair whose other end is on that bridge. The subnet
  exists only inside the namespaces: no namespace has a default route or any link to the root
  namespace, so the processes below can reach one another and their own loopback, nothing else
  (the first test checks the routes).
- Every bus is two brokers on the brokers host (a sharded bus: every client gets both URLs, in
  the same order), started as ``channelbus broker`` processes in check mode and stopped by SIGTERM
  at teardown, which must exit 0 (70 would mean a broken rule).
- The terminal chat (``python -m examples.chat``): three participants of one room on two hosts
  and one in another room, whose groups are placed on different brokers, as in test_examples.py.
- A work channel with two workers: ``channelbus run examples.workers.worker:Worker`` on alpha and
  on beta, the example's producer on beta: 400 jobs, each done exactly once, by both hosts.
- The Django chat's channel layer with CURVE keys: two keyed brokers (no ``--insecure``), daphne
  serving examples/django_chat on alpha and on beta, WebSockets opened from the other host: a line
  typed on one server reaches the same course on the other and no other course.

Every process runs in its namespace with ``ip netns exec`` and is stopped by its PID; the
namespaces, the veth pairs and the bridge are deleted by name at the end of the module, also when
a test fails. Where namespaces cannot be made (not Linux, not root, no iproute2, no veth or
bridge support) every test is skipped, saying which step failed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients.placement import broker_of_group
from netns import SUBNET, Broker, Hosts, NamespaceError, bus_url, start_brokers

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "examples" / "django_chat"
PYTHON = sys.executable
STOPPED = re.compile(r"stopped (\S+) after (\d+) messages \((\d+) failed\)")
RECEIVE_SECONDS = 10.0


# -- the hosts and the buses --------------------------------------------------------------------

@pytest.fixture(scope="module")
def hosts():
    """brokers, alpha and beta; removed (processes, veths, bridge, namespaces) at the end."""
    try:
        made = Hosts.create(["brokers", "alpha", "beta"])
    except NamespaceError as exc:
        pytest.skip(f"network namespaces cannot be made here: {exc} (needs Linux, root with"
                    " CAP_SYS_ADMIN, iproute2, and veth and bridge support)")
    yield made
    made.remove()


@pytest.fixture
def started(hosts):
    """The hosts; every process a test starts in them is stopped (by PID) at its teardown."""
    first = len(hosts.processes)
    yield hosts
    for process in hosts.processes[first:]:
        process.stop()
    del hosts.processes[first:]


@dataclass
class Bus:
    url: str  # both brokers' URLs, comma-separated, in the order every client uses
    brokers: list[Broker]


def run_bus(hosts: Hosts, *args: str):
    """Two brokers on the brokers host (a generator for fixtures): each must exit 0 at the end."""
    brokers = start_brokers(hosts, "brokers", 2, *args)
    yield Bus(bus_url(brokers), brokers)
    statuses = [broker.stop() for broker in brokers]
    assert statuses == [0, 0], "a broker did not stop cleanly (70: its check mode found a broken" \
        " rule):\n" + "\n".join(broker.process.output() for broker in brokers)


@pytest.fixture
def bus(started):
    """Two brokers without keys on 10.213.0.1 (``--insecure``: the subnet is private to the
    namespaces)."""
    yield from run_bus(started, "--insecure")


@dataclass
class Keys:
    root: Path

    def broker_args(self) -> tuple[str, ...]:
        return ("--secret-key", str(self.root / "broker.key_secret"),
                "--authorized-keys", str(self.root / "authorized"))

    def client_env(self, name: str) -> dict[str, str]:
        return {"CHANNELBUS_SECRET_KEY": str(self.root / f"{name}.key_secret"),
                "CHANNELBUS_SERVER_KEY": str(self.root / "broker.key")}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    """``channelbus keygen`` for the brokers (both use one key pair) and for the chat site,
    whose public key is the only authorised one."""
    made = Keys(tmp_path_factory.mktemp("hosts") / "keys")
    for name in ("broker", "chatsite"):
        done = subprocess.run([PYTHON, "-m", "consumers.cli", "keygen", name, "--dir", str(made.root)],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    (made.root / "authorized").mkdir()
    shutil.copy(made.root / "chatsite.key", made.root / "authorized" / "chatsite.key")
    return made


@pytest.fixture
def keyed_bus(started, keys):
    """Two brokers with CURVE keys on 10.213.0.1 (protected mode is satisfied by the keys)."""
    yield from run_bus(started, *keys.broker_args())


def on_each_broker(prefix: str, candidates) -> list:
    """The first candidate whose group ``prefix + candidate`` is placed on broker 1, then the
    first on broker 2: names that put traffic on both brokers of the bus."""
    chosen = []
    for broker in range(2):
        chosen.append(next(c for c in candidates if broker_of_group(f"{prefix}{c}", 2) == broker))
    return chosen


def broker_stats(hosts: Hosts, host: str, url: str, env: dict | None = None) -> list[dict]:
    """``channelbus stats --json`` run in ``host``: each broker's figures, in the bus's order."""
    process = hosts.start(host, PYTHON, "-m", "consumers.cli", "stats", "--broker", url, "--json",
                          env=env, name=f"stats from {host}")
    assert process.wait() == 0, process.output()
    return json.loads(process.lines["stdout"][-1])["brokers"]


def test_each_host_reaches_only_the_test_subnet_and_its_loopback(hosts):
    for name, host in hosts.hosts.items():
        routes = hosts.routes(name)
        assert not [r for r in routes if r.startswith("default")], routes
        for route in routes:  # (the kernel's own local, broadcast and multicast entries included)
            words = route.split()
            destination = words[1] if words[0] in ("local", "broadcast", "multicast") else words[0]
            assert (destination.startswith(f"{SUBNET}.") or destination.startswith("127.")
                    or destination in ("::1", "ff00::/8")), f"{name}: {route}"
        assert host.address.startswith(f"{SUBNET}.")


# -- the terminal chat ----------------------------------------------------------------------------

def test_the_terminal_chat_across_hosts_on_two_brokers(started, bus):
    hosts = started
    lobby, attic = on_each_broker("chat_", ["lobby", "attic", "hall", "porch", "den", "loft", "yard"])
    before = hosts.traffic()

    def join(host: str, room: str, name: str):
        proc = hosts.start(host, PYTHON, "-m", "examples.chat", room, "--name", name, "--broker", bus.url,
                           name=f"chat {name} on {host}")
        proc.expect(rf"^\* you joined {room} as {name};")
        return proc

    def leave(proc) -> None:
        proc.close_stdin()
        assert proc.wait() == 0, proc.output()

    alice = join("alpha", lobby, "alice")
    bob = join("beta", lobby, "bob")
    alice.expect(r"^\* bob joined$")
    carol = join("beta", lobby, "carol")
    for proc in (alice, bob):
        proc.expect(r"^\* carol joined$")
    dave = join("alpha", attic, "dave")  # the other room, on the other broker

    for speaker, others in ((alice, (bob, carol)), (bob, (alice, carol)), (carol, (alice, bob))):
        name = speaker.name.split()[1]
        speaker.write(f"hello from {name}")
        for proc in others:
            proc.expect(rf"^{name}: hello from {name}$")

    dave.write("a secret in the attic")
    leave(dave)  # its group_send was answered before it exited
    alice.write("last word")  # anything from the attic would reach bob and carol before this
    for proc in (bob, carol):
        proc.expect(r"^alice: last word$")
    stats = broker_stats(hosts, "beta", bus.url)
    leave(alice)
    for proc in (bob, carol):
        proc.expect(r"^\* alice left$")
    leave(bob)
    carol.expect(r"^\* bob left$")
    leave(carol)

    def said(proc):
        return proc.lines["stdout"][1:]  # after its own "you joined" line

    assert said(alice) == ["* bob joined", "* carol joined", "bob: hello from bob", "carol: hello from carol"]
    assert said(bob) == ["* carol joined", "alice: hello from alice", "carol: hello from carol",
                         "alice: last word", "* alice left"]
    assert said(carol) == ["alice: hello from alice", "bob: hello from bob", "alice: last word",
                           "* alice left", "* bob left"]
    assert said(dave) == []
    # Both brokers carried group messages (one room each), and both hosts' links carried them.
    assert [broker["counters"]["group_sends"] > 0 for broker in stats] == [True, True], stats
    after = hosts.traffic()
    for host in ("alpha", "beta"):
        assert after[host][0] > before[host][0] and after[host][1] > before[host][1], (before, after)


# -- a work channel with two workers ----------------------------------------------------------------

def test_a_work_channel_with_two_workers_on_two_hosts(started, bus):
    hosts = started
    workers = [
        hosts.start(host, PYTHON, "-m", "consumers.cli", "run", "examples.workers.worker:Worker",
                    "--instances", "2", "--broker", bus.url, name=f"worker on {host}")
        for host in ("alpha", "beta")
    ]
    for worker in workers:
        for _ in range(2):
            worker.expect(r"started Worker\[\d\] on ", "stderr")

    producer = hosts.start("beta", PYTHON, "-m", "examples.workers.producer", "--jobs", "400",
                           "--broker", bus.url, "--json", "--timeout", "20", name="producer on beta")
    assert producer.wait(45) == 0, producer.output()
    report = json.loads(producer.lines["stdout"][-1])
    assert (report["jobs"], report["results"], report["duplicates"], report["wrong"], report["missing"]) \
        == (400, 400, 0, 0, [])
    by_pid = {int(worker.rpartition(":")[2]): count for worker, count in report["by_worker"].items()}
    assert set(by_pid) == {w.pid for w in workers} and sum(by_pid.values()) == 400  # both hosts worked

    handled = 0
    for worker in workers:
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output()
        counts = [(int(m.group(2)), int(m.group(3))) for m in map(STOPPED.search, worker.lines["stderr"]) if m]
        assert len(counts) == 2 and all(failed == 0 for _, failed in counts), worker.output()
        assert sum(n for n, _ in counts) == by_pid[worker.pid]
        handled += sum(n for n, _ in counts)
    assert handled == 400  # no job was handled twice


# -- the Django chat's layer, with keys -------------------------------------------------------------

class WebSocket:
    """A minimal RFC 6455 client over a socket already connected (from a host's namespace):
    short text frames, the Origin header AllowedHostsOriginValidator wants."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, sock, host: str, path: str) -> None:
        self.sock, self.buffer = sock, b""
        sock.settimeout(RECEIVE_SECONDS)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Origin: http://{host}\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].split()[1] == b"101", head
        fields = (line.partition(":") for line in head.decode(errors="replace").split("\r\n")[1:])
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        assert headers.get("sec-websocket-accept") == accept, head

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        if len(payload) < 126:
            size = struct.pack("!B", 0x80 | len(payload))
        else:
            size = struct.pack("!BH", 0x80 | 126, len(payload))
        self.sock.sendall(struct.pack("!B", 0x80 | opcode) + size + mask
                          + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send_json(self, value: dict) -> None:
        self._frame(0x1, json.dumps(value).encode())

    def receive_json(self) -> dict:
        while True:
            first, second = self._take(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._take(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._take(8))
            payload = self._take(length)  # (a server does not mask)
            if first & 0x0F == 0x8:
                raise ConnectionError(f"the server closed the WebSocket: {payload!r}")
            if first & 0x0F == 0x9:
                self._frame(0xA, payload)
            elif first & 0x0F == 0x1:
                return json.loads(payload)

    def close(self) -> None:
        try:
            self._frame(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


# The example's settings put CHANNELBUS_BROKER into a one-element "hosts" list, which the layer
# takes as one URL (commas and all): this overlay splits it, so the site joins the sharded bus.
OVERLAY = '''
import os
from chatsite.settings_keys import *  # noqa: F401,F403
from chatsite.settings_keys import CHANNEL_LAYERS as _LAYERS

CHANNEL_LAYERS = {alias: {**layer, "CONFIG": {**layer["CONFIG"], "hosts": os.environ["CHANNELBUS_BROKER"].split(",")}}
                  for alias, layer in _LAYERS.items()}
'''


def test_the_django_chat_layer_across_hosts_with_keys(started, keyed_bus, keys, tmp_path):
    pytest.importorskip("channels", reason="the channels extra is missing: pip install -e '.[channels]'")
    pytest.importorskip("daphne", reason="daphne is missing: pip install -e '.[test]'")
    hosts = started
    (tmp_path / "hosts_chatsite.py").write_text(OVERLAY)
    daphne = shutil.which("daphne", path=os.path.dirname(PYTHON)) or "daphne"
    env = {**keys.client_env("chatsite"), "CHANNELBUS_BROKER": keyed_bus.url,
           "DJANGO_SETTINGS_MODULE": "hosts_chatsite",
           "DJANGO_ALLOWED_HOSTS": ",".join(hosts[h].address for h in ("alpha", "beta")),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(SITE), str(ROOT)])}
    servers = {}
    for host in ("alpha", "beta"):
        address = hosts[host].address
        proc = hosts.start(host, daphne, "-e", f"tcp:port=0:interface={address}", "chatsite.asgi:application",
                           env=env, name=f"daphne on {host}")
        servers[host] = proc
    for host, proc in servers.items():
        port = int(proc.expect(rf"Listening on TCP address {re.escape(hosts[host].address)}:(\d+)", "stderr").group(1))
        servers[host] = (proc, hosts[host].address, port)

    course, other_course = on_each_broker("chat_", range(1, 100))
    sockets: list[WebSocket] = []

    def browse(from_host: str, server: str, course_id: int, name: str) -> WebSocket:
        _, address, port = servers[server]
        ws = WebSocket(hosts.connect(from_host, address, port), f"{address}:{port}",
                       f"/ws/chat/room/{course_id}/?name={name}")
        sockets.append(ws)
        return ws

    try:
        alice = browse("beta", "alpha", course, "alice")  # a browser on one host, its server on the other
        bob = browse("alpha", "beta", course, "bob")
        carol = browse("alpha", "beta", other_course, "carol")  # another course, on the other broker

        alice.send_json({"message": "hello across hosts"})
        to_bob, to_alice = bob.receive_json(), alice.receive_json()
        assert to_bob == to_alice and (to_bob["user"], to_bob["message"]) == ("alice", "hello across hosts")
        bob.send_json({"message": "and back"})
        assert (alice.receive_json()["message"], bob.receive_json()["message"]) == ("and back", "and back")
        carol.send_json({"message": "course two only"})
        assert carol.receive_json()["message"] == "course two only"
        alice.send_json({"message": "last word"})  # carol's line would have reached bob before this
        assert bob.receive_json()["message"] == "last word"
    finally:
        for ws in sockets:
            ws.close()
    stats = broker_stats(hosts, "alpha", keyed_bus.url, env=keys.client_env("chatsite"))
    assert [broker["counters"]["group_sends"] > 0 for broker in stats] == [True, True], stats
    for proc, _, _ in servers.values():
        assert proc.popen.poll() is None, proc.output()  # (stopped by PID at teardown)
    for broker in keyed_bus.brokers:
        assert "refused" not in "\n".join(broker.process.lines["stderr"]), broker.process.output()
