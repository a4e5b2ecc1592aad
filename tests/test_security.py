"""CURVE keys, authorised keys, permissions and protected mode, against real brokers.

Keys are made per test with pyzmq's certificate writer (what ``channelbus keygen`` calls).
The eavesdropping test puts a recording TCP relay of its own between the clients and both
broker sockets, and looks for a known plaintext in what crossed it.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.auth

import bus_workers as w
from broker.config import BrokerConfig, ConfigError
from broker.protocol.names import group_topic
from clients import (
    AsyncClient, AuthenticationFailed, BrokerUnavailable, Client, Forbidden, KeyFileError, MessagesLost,
)
from conftest import ROOT
from consumers.debug import format_stats

pytestmark = pytest.mark.timeout(60)

PLAINTEXT = "the-eavesdropper-must-not-read-this-7f3a"


@dataclass
class Keys:
    """A broker key pair and client key pairs: ``web`` and ``worker`` authorised, ``stranger`` not."""

    root: Path
    authorized: Path

    @property
    def broker_secret(self) -> str:
        return str(self.root / "broker.key_secret")

    @property
    def broker_public(self) -> str:
        return str(self.root / "broker.key")

    def client(self, name: str) -> dict:
        """The client settings for key ``name``."""
        return {"secret_key": str(self.root / "clients" / f"{name}.key_secret"), "server_key": self.broker_public}

    def authorize(self, name: str) -> None:
        shutil.copy(self.root / "clients" / f"{name}.key", self.authorized / f"{name}.key")

    def broker_settings(self, **more) -> dict:
        return {"secret_key": self.broker_secret, "authorized_keys": str(self.authorized), **more}

    def broker_args(self, *more: str) -> tuple:
        return ("--secret-key", self.broker_secret, "--authorized-keys", str(self.authorized), *more)


@pytest.fixture
def keys(tmp_path) -> Keys:
    root = tmp_path / "keys"
    (root / "clients").mkdir(parents=True)
    (root / "authorized").mkdir()
    zmq.auth.create_certificates(str(root), "broker")
    for name in ("web", "worker", "stranger"):
        zmq.auth.create_certificates(str(root / "clients"), name)
    made = Keys(root, root / "authorized")
    made.authorize("web")
    made.authorize("worker")
    return made


# -- keygen ---------------------------------------------------------------------------------


def channelbus(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "consumers.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, **kwargs)


def test_keygen_writes_a_key_pair_prints_the_public_key_and_never_overwrites(tmp_path):
    out = tmp_path / "k"
    done = channelbus("keygen", "web", "--dir", str(out))
    assert done.returncode == 0, done.stderr
    public, secret = zmq.auth.load_certificate(str(out / "web.key_secret"))
    assert done.stdout.strip() == public.decode() and secret
    assert zmq.auth.load_certificate(str(out / "web.key")) == (public, None)
    assert (out / "web.key_secret").stat().st_mode & 0o777 == 0o600
    again = channelbus("keygen", "web", "--dir", str(out))
    assert again.returncode == 1 and "already exists" in again.stderr
    assert zmq.auth.load_certificate(str(out / "web.key_secret")) == (public, secret)  # untouched
    for bad in ("default", "../x", ""):
        refused = channelbus("keygen", bad, "--dir", str(out))
        assert refused.returncode == 2 and "NAME" in refused.stderr


# -- authentication -------------------------------------------------------------------------


def test_an_authorised_key_round_trips_messages_and_group_messages(keys, broker_process_factory, procs):
    broker = broker_process_factory(*keys.broker_args())
    ready = procs.event()
    member = procs.start(w.group_member, broker.url, "room", ready, 20, **keys.client("worker"))
    assert ready.wait(20)
    with Client(broker.url, **keys.client("web")) as bus:
        receiver = procs.start(w.receive_one, broker.url, "tasks", 20, **keys.client("worker"))
        bus.send("tasks", {"type": "task", "n": 1})
        bus.group_send("room", {"type": "hello.room"})
        assert receiver.result(30) == {"type": "task", "n": 1}
        assert member.result(30) == {"type": "hello.room"}

    async def async_round_trip() -> dict:
        async with AsyncClient(broker.url, **keys.client("web")) as bus:
            me = bus.new_channel()
            await bus.group_add("room2", me)
            await bus.group_send("room2", {"type": "async.room"})
            return await bus.receive(me, timeout=10)

    assert asyncio.run(async_round_trip()) == {"type": "async.room"}


def expect_refusal(url: str, reason: str, timeout: float = 5.0, **settings) -> None:
    """Both clients fail with AuthenticationFailed naming the broker and ``reason``, at once
    (well within ``timeout``)."""
    start = time.monotonic()
    with pytest.raises(AuthenticationFailed) as caught:
        Client(url, timeout=timeout, **settings)
    assert url in str(caught.value) and reason in caught.value.reason
    assert caught.value.endpoint == url

    async def connect() -> None:
        async with AsyncClient(url, timeout=timeout, **settings):
            pass

    with pytest.raises(AuthenticationFailed) as caught:
        asyncio.run(connect())
    assert reason in caught.value.reason
    assert time.monotonic() - start < timeout  # (both of them)


def test_an_unknown_key_no_key_and_a_wrong_server_key_fail_within_the_timeout(keys, broker_process_factory):
    broker = broker_process_factory(*keys.broker_args())
    expect_refusal(broker.url, "not among the broker's authorized keys", **keys.client("stranger"))
    expect_refusal(broker.url, "CURVE keys")  # no key at all
    wrong = {**keys.client("web"), "server_key": str(keys.root / "clients" / "web.key")}
    expect_refusal(broker.url, "is server_key the broker's public key", **wrong)
    with Client(broker.url, **keys.client("web")) as bus:  # and the broker serves on
        assert bus.ping() < 5


def test_a_client_with_keys_is_told_when_the_broker_has_none(keys, broker):
    expect_refusal(broker.url, "the broker does not use CURVE", **keys.client("web"))


def test_the_broker_logs_a_refused_key_once_per_burst(keys, broker_process_factory):
    broker = broker_process_factory(*keys.broker_args())
    for _ in range(5):
        with pytest.raises(AuthenticationFailed):
            Client(broker.url, timeout=5, **keys.client("stranger"))
    public, _ = zmq.auth.load_certificate(str(keys.root / "clients" / "stranger.key"))
    deadline = time.monotonic() + 5
    while public.decode() not in broker.stderr_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = broker.stderr_path.read_text()
    assert log.count("refused a connection: its key") == 1 and public.decode() in log


def test_a_key_added_to_the_directory_is_let_in_without_a_restart_and_one_removed_is_not(
    keys, broker_process_factory,
):
    broker = broker_process_factory(*keys.broker_args())
    with pytest.raises(AuthenticationFailed):
        Client(broker.url, timeout=5, **keys.client("stranger"))
    keys.authorize("stranger")
    with Client(broker.url, timeout=5, **keys.client("stranger")) as bus:
        bus.send("welcome", {"type": "in"})
        assert bus.receive("welcome", timeout=5) == {"type": "in"}
    os.remove(keys.authorized / "stranger.key")
    with pytest.raises(AuthenticationFailed):
        Client(broker.url, timeout=5, **keys.client("stranger"))


def test_key_files_that_cannot_be_used_are_clear_errors_before_any_connection(keys, tmp_path):
    url = "tcp://127.0.0.1:9"  # (never dialled: the keys are refused first)
    cases = [
        ({"secret_key": keys.client("web")["secret_key"]}, "needs server_key"),
        ({"server_key": keys.broker_public}, "needs secret_key"),
        ({**keys.client("web"), "secret_key": str(keys.root / "clients" / "web.key")}, "holds no secret key"),
        ({**keys.client("web"), "secret_key": str(tmp_path / "nope")}, "cannot read the secret key"),
        ({**keys.client("web"), "server_key": "~" * 40}, "neither a key file nor a Z85 key"),
    ]
    for settings, complaint in cases:
        with pytest.raises(KeyFileError, match=complaint):
            Client(url, **settings)
        with pytest.raises(KeyFileError, match=complaint):
            AsyncClient(url, **settings)


def test_the_server_key_may_be_given_as_its_z85_text(keys, broker_factory):
    broker = broker_factory(**keys.broker_settings())
    public, _ = zmq.auth.load_certificate(keys.broker_public)
    with Client(broker.url, **{**keys.client("web"), "server_key": public.decode()}) as bus:
        assert bus.ping() < 5


def test_a_broker_key_setting_that_cannot_be_used_stops_the_broker_with_a_clear_error(keys, tmp_path):
    with pytest.raises(ConfigError, match="needs authorized_keys"):
        BrokerConfig(secret_key=keys.broker_secret)
    with pytest.raises(ConfigError, match="needs secret_key"):
        BrokerConfig(authorized_keys=str(keys.authorized))
    bad = channelbus("broker", "--bind", "tcp://127.0.0.1:*", "--pub-bind", "tcp://127.0.0.1:*",
                     "--secret-key", keys.broker_public, "--authorized-keys", str(keys.authorized))
    assert bad.returncode == 2 and "holds no secret key" in bad.stderr
    missing = channelbus("broker", "--bind", "tcp://127.0.0.1:*", "--pub-bind", "tcp://127.0.0.1:*",
                         "--secret-key", keys.broker_secret, "--authorized-keys", str(tmp_path / "none"))
    assert missing.returncode == 2 and "cannot read the authorized keys directory" in missing.stderr


# -- eavesdropping --------------------------------------------------------------------------


class RecordingRelay:
    """A TCP relay on a loopback port of its own to ``target``: it forwards both ways and keeps
    every byte that crossed it."""

    def __init__(self, target_port: int, listen_port: int = 0) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", listen_port))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ)
        peers: dict[socket.socket, socket.socket] = {}
        while not self._stop.is_set():
            for key, _ in selector.select(0.05):
                sock = key.fileobj
                if sock is self.listener:
                    inbound, _ = self.listener.accept()
                    outbound = socket.create_connection(("127.0.0.1", self.target_port))
                    peers[inbound], peers[outbound] = outbound, inbound
                    selector.register(inbound, selectors.EVENT_READ)
                    selector.register(outbound, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                other = peers.get(sock)
                if not data or other is None:
                    for end in (sock, other):
                        if end is not None and end in peers:
                            selector.unregister(end)
                            peers.pop(end)
                            end.close()
                    continue
                self.seen += data
                other.sendall(data)
        for sock in peers:
            sock.close()
        self.listener.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def port_of(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


def eavesdrop(broker_factory, **settings) -> bytes:
    """Send PLAINTEXT through a channel and a group with both broker sockets behind relays;
    return what the relays saw."""
    keys = settings.pop("client_keys", {})
    with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port for the publisher's relay,
        relay_port = probe.getsockname()[1]  # which the broker advertises to clients
    broker = broker_factory(advertise=f"tcp://127.0.0.1:{relay_port}", **settings)
    commands = RecordingRelay(port_of(broker.url))
    publisher = RecordingRelay(port_of(broker.pub_url), relay_port)
    try:
        with Client(f"tcp://127.0.0.1:{commands.port}", **keys) as bus:
            me = bus.new_channel()
            bus.group_add("secrets", me)
            bus.send("secrets.box", {"type": "secret", "text": PLAINTEXT})
            assert bus.receive("secrets.box", timeout=5)["text"] == PLAINTEXT
            bus.group_send("secrets", {"type": "secret", "text": PLAINTEXT})
            assert bus.receive(me, timeout=5)["text"] == PLAINTEXT
    finally:
        commands.close()
        publisher.close()
    return bytes(commands.seen), bytes(publisher.seen)


def test_a_relay_between_client_and_broker_reads_nothing_with_curve_and_everything_without(
    keys, broker_factory,
):
    commands, published = eavesdrop(broker_factory)
    assert PLAINTEXT.encode() in commands and PLAINTEXT.encode() in published  # (so it can fail)
    commands, published = eavesdrop(broker_factory, **keys.broker_settings(), client_keys=keys.client("web"))
    assert len(commands) > 1000 and len(published) > 100  # (the relays did carry the traffic)
    assert PLAINTEXT.encode() not in commands and PLAINTEXT.encode() not in published
    assert b"secrets" not in commands and b"secrets" not in published  # (names too)


# -- permissions ----------------------------------------------------------------------------

PERMISSIONS = """
[web]
send = ["chat.*", "specific.*"]
receive = ["replies.*"]
group_send = ["room.*"]
group_add = ["room.*"]
stats = true

[reader]
group_add = ["secret"]
group_send = ["secret"]

[default]
send = ["public"]
receive = ["public"]
"""


@pytest.fixture
def guarded(keys, broker_factory, tmp_path):
    """A CURVE broker with PERMISSIONS; ``reader`` is authorised too (``worker`` gets [default])."""
    zmq.auth.create_certificates(str(keys.root / "clients"), "reader")
    keys.authorize("reader")
    path = tmp_path / "permissions.toml"
    path.write_text(PERMISSIONS)
    return keys, broker_factory(**keys.broker_settings(permissions=str(path)))


def forbidden(call, key: str, action: str, name: str | None) -> Forbidden:
    with pytest.raises(Forbidden) as caught:
        call()
    err = caught.value
    assert (err.key, err.action) == (key, action) and (name is None or err.name == name)
    assert key in str(err) and (name is None or name in str(err))
    return err


def test_each_permission_is_refused_and_granted_as_written(guarded):
    keys, broker = guarded
    with Client(broker.url, timeout=5, **keys.client("web")) as web:
        web.send("chat.lobby", {"type": "ok"})
        web.send(f"specific.{web.client_id}!x", {"type": "ok"})
        forbidden(lambda: web.send("tasks", {"type": "no"}), "web", "send", "tasks")
        forbidden(lambda: web.receive("tasks", timeout=3), "web", "receive", "tasks")
        web.send("chat.lobby", {"type": "still fine"})  # (a refusal costs nothing else)
        me = web.new_channel()
        web.group_add("room.1", me)
        assert web.group_send("room.1", {"type": "hi"}) == {"queued": 0, "full": 0}
        assert web.receive(me, timeout=5) == {"type": "hi"}
        forbidden(lambda: web.group_add("lobby", me), "web", "group_add", "lobby")
        forbidden(lambda: web.group_discard("lobby", me), "web", "group_add", "lobby")
        forbidden(lambda: web.group_send("lobby", {"type": "no"}), "web", "group_send", "lobby")
        web.group_send("lobby", {"type": "no"}, wait=False)  # (refused after it returned ...)
        with pytest.raises(MessagesLost, match="forbidden|may not send to group"):
            for _ in range(50):  # (... and raised by a later call once the refusal is in)
                web.ping()
                web.send("chat.lobby", {"type": "after"})
        forbidden(lambda: web.flush(), "web", "flush", None)
        figures = web.stats()
        assert figures["forbidden_by_key"]["web"] >= 7 and figures["counters"]["forbidden"] >= 7
        shown = format_stats(figures)
        assert f"forbidden {figures['counters']['forbidden']};" in shown
        assert f"forbidden by key: web {figures['forbidden_by_key']['web']}" in shown
    with Client(broker.url, timeout=5, **keys.client("worker")) as worker:  # [default]
        worker.send("public", {"type": "ok"})
        assert worker.receive("public", timeout=5) == {"type": "ok"}
        forbidden(lambda: worker.send("chat.lobby", {"type": "no"}), "worker", "send", "chat.lobby")
        forbidden(lambda: worker.stats(), "worker", "stats", None)
    assert broker.server.router.forbidden_by_key["worker"] == 2


def test_many_refusals_do_not_ban_a_client(guarded):
    keys, broker = guarded
    with Client(broker.url, timeout=5, **keys.client("web")) as web:
        for _ in range(broker.server.config.max_bad_frames + 20):
            with pytest.raises(Forbidden):
                web.send("tasks", {"type": "no"})
        web.send("chat.x", {"type": "yes"})
        assert web.ping() < 5


def test_receive_from_a_channel_it_may_read_and_process_specific_channels_are_always_its_own(guarded):
    keys, broker = guarded
    with Client(broker.url, timeout=5, **keys.client("web")) as web, \
            Client(broker.url, timeout=5, **keys.client("worker")) as worker:
        mine = worker.new_channel()
        web.send(mine, {"type": "to worker"})  # specific.* is web's to send to
        assert worker.receive(mine, timeout=5) == {"type": "to worker"}  # no receive pattern needed


def test_a_key_cannot_take_over_another_keys_client_id(guarded):
    keys, broker = guarded
    web = Client(broker.url, timeout=5, **keys.client("web"))
    inbox = web.new_channel()
    web_id = web.client_id
    web.close()  # (gone: its id is free to the same key, not to another)
    with pytest.raises(Forbidden, match="belongs to another key"):
        Client(broker.url, timeout=5, client_id=web_id, **keys.client("worker"))
    with Client(broker.url, timeout=5, client_id=web_id, **keys.client("web")) as again:
        again.send(inbox, {"type": "mine"})
        assert again.receive(inbox, timeout=5) == {"type": "mine"}


def raw_subscriber(broker, keys: Keys, name: str, topics: list[bytes]) -> zmq.Socket:
    """A SUB socket of the test's own, holding ``name``'s valid key, subscribed to ``topics``."""
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    public, secret = zmq.auth.load_certificate(keys.client(name)["secret_key"])
    server, _ = zmq.auth.load_certificate(keys.broker_public)
    sub.curve_publickey, sub.curve_secretkey, sub.curve_serverkey = public, secret, server
    sub.linger = 0
    sub.connect(broker.pub_url)
    for topic in topics:
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    return sub


def received(sub: zmq.Socket, seconds: float) -> list[bytes]:
    frames = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sub.poll(int(left * 1000)):
            frames.append(sub.recv())
    return frames


def test_a_raw_subscriber_reads_only_the_groups_its_key_may_add_to(guarded):
    keys, broker = guarded
    topic = group_topic("secret")
    intruder = raw_subscriber(broker, keys, "worker", [topic, b"", b"sec", b"secret"])
    allowed = raw_subscriber(broker, keys, "reader", [topic])
    try:
        with Client(broker.url, timeout=5, **keys.client("reader")) as reader:
            inbox = reader.new_channel()
            reader.group_add("secret", inbox)  # (a member, so the group has a message to publish)
            time.sleep(0.3)  # (the raw subscriptions have reached the broker)
            reader.group_send("secret", {"type": "classified", "text": PLAINTEXT})
            assert reader.receive(inbox, timeout=5)["text"] == PLAINTEXT
            assert any(PLAINTEXT.encode() in frame for frame in received(allowed, 2))  # (it can fail)
            assert not [f for f in received(intruder, 0.5) if PLAINTEXT.encode() in f]
        assert broker.server.router.forbidden_by_key.get("worker", 0) >= 4
    finally:
        intruder.close()
        allowed.close()


def test_sighup_reloads_the_permissions_and_a_broken_file_keeps_the_previous_rules(
    keys, broker_process_factory, tmp_path,
):
    path = tmp_path / "permissions.toml"
    path.write_text('[web]\nsend = ["early"]\n')
    broker = broker_process_factory(*keys.broker_args("--permissions", str(path)))
    with Client(broker.url, timeout=5, **keys.client("web")) as web:
        web.send("early", {"type": "ok"})
        forbidden(lambda: web.send("late", {"type": "no"}), "web", "send", "late")
        path.write_text('[web]\nsend = ["late"]\n')
        os.kill(broker.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:  # (applied at the broker's next tick)
            try:
                web.send("late", {"type": "ok"})
                break
            except Forbidden:
                assert time.monotonic() < deadline, "SIGHUP did not reload the permissions"
                time.sleep(0.05)
        forbidden(lambda: web.send("early", {"type": "no"}), "web", "send", "early")
        path.write_text('[web]\nsend = "not a list"\n')
        os.kill(broker.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "not reloaded" not in broker.stderr_path.read_text():
            assert time.monotonic() < deadline, "the broken file was not reported"
            time.sleep(0.05)
        web.send("late", {"type": "still ok"})
        assert broker.process.poll() is None
    log = broker.stderr_path.read_text()
    assert "previous rules stay in force" in log and "web].send must be a list" in log


def test_protected_mode_refuses_to_bind_beyond_loopback_without_keys(keys):
    refused = channelbus("broker", "--bind", "tcp://0.0.0.0:*", "--pub-bind", "tcp://127.0.0.1:*")
    assert refused.returncode == 2
    assert "protected mode" in refused.stderr and "channelbus keygen" in refused.stderr
    assert "--insecure" in refused.stderr
    for endpoint in ("tcp://0.0.0.0:6000", "tcp://*:6000", "tcp://[::]:6000", "tcp://192.0.2.1:6000"):
        with pytest.raises(ConfigError, match="protected mode"):
            BrokerConfig(bind=endpoint)
        with pytest.raises(ConfigError, match="protected mode"):
            BrokerConfig(pub_bind=endpoint)
        assert BrokerConfig(bind=endpoint, insecure=True).bind == endpoint
        assert BrokerConfig(bind=endpoint, **keys.broker_settings()).bind == endpoint
    for local in ("tcp://127.0.0.1:6000", "tcp://localhost:6000", "tcp://[::1]:6000", "ipc:///tmp/x"):
        assert BrokerConfig(bind=local).bind == local


def test_an_async_receive_from_a_channel_it_may_not_read_raises_forbidden(guarded):
    keys, broker = guarded

    async def main() -> None:
        async with AsyncClient(broker.url, timeout=5, **keys.client("web")) as web:
            with pytest.raises(Forbidden) as caught:
                await web.receive("tasks", timeout=None)  # (raised, not waited on forever)
            assert (caught.value.key, caught.value.action, caught.value.name) == ("web", "receive", "tasks")
            with pytest.raises(Forbidden):
                await web.send("tasks", {"type": "no"})
            await web.send("chat.ok", {"type": "yes"})  # (and it goes on working)

    asyncio.run(main())


def test_a_client_whose_key_is_removed_fails_after_the_broker_restarts(keys, broker_process_factory):
    ports = []
    for _ in range(2):
        with socket.create_server(("127.0.0.1", 0)) as probe:
            ports.append(probe.getsockname()[1])
    args = keys.broker_args("--bind", f"tcp://127.0.0.1:{ports[0]}", "--pub-bind", f"tcp://127.0.0.1:{ports[1]}")
    broker = broker_process_factory(*args)
    client = Client(broker.url, timeout=10, **keys.client("worker"))
    failures: list = []

    async def async_side() -> None:
        async with AsyncClient(broker.url, timeout=10, **keys.client("worker")) as bus:
            await bus.ping()
            ready.set()
            try:
                await bus.receive("never", timeout=None)
            except AuthenticationFailed as exc:
                failures.append(exc)

    ready = threading.Event()
    waiter = threading.Thread(target=asyncio.run, args=(async_side(),))
    waiter.start()
    try:
        assert ready.wait(10)
        client.ping()
        broker.process.kill()
        broker.process.wait(5)
        os.remove(keys.authorized / "worker.key")
        broker_process_factory(*args)
        start = time.monotonic()
        with pytest.raises(AuthenticationFailed, match="not among the broker's authorized keys"):
            client.send("tasks", {"type": "after"})
        assert time.monotonic() - start < 10  # (at the refused handshake, not at the timeout)
        waiter.join(15)
        assert not waiter.is_alive() and len(failures) == 1  # the waiting receive was failed too
    finally:
        client.close()
        waiter.join(15)


def test_the_cli_commands_take_keys_from_flags_and_environment(keys, broker_process_factory):
    broker = broker_process_factory(*keys.broker_args())
    env = {**os.environ, "CHANNELBUS_BROKER": broker.url, "CHANNELBUS_SECRET_KEY": keys.client("web")["secret_key"],
           "CHANNELBUS_SERVER_KEY": keys.broker_public}
    sent = channelbus("send", "cli.box", '{"type": "from.cli"}', env=env)
    assert sent.returncode == 0, sent.stderr
    listened = channelbus("listen", "cli.box", "--count", "1", env=env)
    assert listened.returncode == 0 and '"from.cli"' in listened.stdout
    shown = channelbus("stats", "--broker", broker.url, "--timeout", "5",
                       "--secret-key", keys.client("web")["secret_key"], "--server-key", keys.broker_public)
    assert shown.returncode == 0 and "channelbus broker: up" in shown.stdout
    refused = channelbus("send", "cli.box", '{"type": "x"}', "--broker", broker.url, "--timeout", "5")
    assert refused.returncode == 1 and "requires CURVE keys" in refused.stderr
