"""The Django course chat (examples/django_chat) with CURVE keys: ``chatsite.settings_keys``
against a ``channelbus broker --secret-key ... --authorized-keys ...`` process, the keys made
by ``channelbus keygen`` as README.md's "Django chat example" says.

- The settings variant refuses to load without both key variables or with a key it cannot use.
- The chat consumer under Channels' ``WebsocketCommunicator`` (no server) with the variant's
  channel layer: two members of a course room hear each other through the keyed broker; the
  same site without keys, or with a key the broker does not know, fails at once with
  ``AuthenticationFailed`` instead of hanging.
- Two daphne processes serving the site with the variant, and WebSocket clients over real TCP
  (a minimal RFC 6455 client below; no browser): a message typed on one server reaches the same
  course on the other. A daphne with the keyless settings gets its WebSockets refused, and its
  log says why.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("channels", reason="the channels extra is missing: pip install -e '.[channels]'")
pytest.importorskip("daphne", reason="daphne is missing: pip install -e '.[test]'")

import django  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

from clients import AuthenticationFailed  # noqa: E402
from consumer_helpers import processes  # noqa: E402,F401 (fixture)
from layer_helpers import run  # noqa: E402

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "examples" / "django_chat"
LISTENING = r"Listening on TCP address 127\.0\.0\.1:(\d+)"
RECEIVE_SECONDS = 10.0
REFUSAL_SECONDS = 5.0  # an AuthenticationFailed comes from the handshake, well within this
KEY_VARIABLES = ("CHANNELBUS_SECRET_KEY", "CHANNELBUS_SERVER_KEY", "CHANNELBUS_BROKER")


# -- keys, made as the README says ---------------------------------------------------------------

@dataclass
class ChatKeys:
    root: Path

    @property
    def authorized(self) -> Path:
        return self.root / "authorized"

    def broker_args(self) -> tuple[str, ...]:
        return ("--secret-key", str(self.root / "broker.key_secret"), "--authorized-keys", str(self.authorized))

    def site_env(self, broker_url: str, name: str = "chatsite") -> dict[str, str]:
        """The environment of a site that uses key ``name``."""
        return {"CHANNELBUS_BROKER": broker_url, "CHANNELBUS_SECRET_KEY": str(self.root / f"{name}.key_secret"),
                "CHANNELBUS_SERVER_KEY": str(self.root / "broker.key")}


def keygen(name: str, directory: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "consumers.cli", "keygen", name, "--dir", str(directory)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def chat_keys(tmp_path_factory) -> ChatKeys:
    """``channelbus keygen`` for the broker, the site and a stranger; only the site's public key
    is copied into the broker's authorized keys directory."""
    keys = ChatKeys(tmp_path_factory.mktemp("chat") / "keys")
    for name in ("broker", "chatsite", "stranger"):
        keygen(name, keys.root)
    keys.authorized.mkdir()
    shutil.copy(keys.root / "chatsite.key", keys.authorized / "chatsite.key")
    return keys


@pytest.fixture
def curve_broker(chat_keys, broker_process_factory):
    """A ``channelbus broker`` process with CURVE on, on loopback ports the OS picked."""
    return broker_process_factory(*chat_keys.broker_args())


# -- the settings variant, in this process --------------------------------------------------------

@pytest.fixture
def site_modules(monkeypatch):
    """The chat site's directory on sys.path and none of its modules cached, for this test only;
    the key variables are unset unless the test sets them. Returns an importer."""
    monkeypatch.syspath_prepend(str(SITE))
    for name in [n for n in sys.modules if n.split(".")[0] in ("chat", "chatsite")]:
        monkeypatch.delitem(sys.modules, name)
    for variable in KEY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)

    def load(module: str, env: dict[str, str] | None = None):
        for variable, value in (env or {}).items():
            monkeypatch.setenv(variable, value)
        for name in [n for n in sys.modules if n.split(".")[0] == "chatsite"]:
            monkeypatch.delitem(sys.modules, name)
        return importlib.import_module(module)

    return load


def test_the_keys_settings_need_both_variables_and_usable_keys(chat_keys, site_modules, monkeypatch):
    env = chat_keys.site_env("tcp://127.0.0.1:9")
    cases = [
        ({}, "needs CHANNELBUS_SECRET_KEY"),
        ({"CHANNELBUS_SECRET_KEY": env["CHANNELBUS_SECRET_KEY"]}, "needs CHANNELBUS_SERVER_KEY"),
        ({"CHANNELBUS_SERVER_KEY": env["CHANNELBUS_SERVER_KEY"]}, "needs CHANNELBUS_SECRET_KEY"),
        ({**env, "CHANNELBUS_SECRET_KEY": str(chat_keys.root / "chatsite.key")}, "holds no secret key"),
        ({**env, "CHANNELBUS_SECRET_KEY": str(chat_keys.root / "missing.key_secret")}, "cannot read the secret key"),
        ({**env, "CHANNELBUS_SERVER_KEY": "not-a-key"}, "cannot read the server key"),
    ]
    for case_env, message in cases:
        for variable in KEY_VARIABLES:
            monkeypatch.delenv(variable, raising=False)
        with pytest.raises(ImproperlyConfigured, match=message):
            site_modules("chatsite.settings_keys", case_env)


def test_the_keys_settings_add_the_keys_to_the_base_channel_layer(chat_keys, site_modules):
    url = "tcp://127.0.0.1:9"  # (never dialled)
    public = (chat_keys.root / "broker.key").read_text()
    z85 = next(line.split('"')[1] for line in public.splitlines() if "public-key" in line)
    keyed = site_modules("chatsite.settings_keys", {**chat_keys.site_env(url), "CHANNELBUS_SERVER_KEY": z85})
    base = importlib.import_module("chatsite.settings")
    assert keyed.CHANNEL_LAYERS["default"] == {
        "BACKEND": "clients.channel_layer.BusChannelLayer",
        "CONFIG": {"hosts": url, "secret_key": str(chat_keys.root / "chatsite.key_secret"),
                   "server_key": z85},  # (a Z85 key is taken as it is)
    }
    assert base.CHANNEL_LAYERS["default"]["CONFIG"] == {"hosts": url}  # untouched
    assert keyed.ASGI_APPLICATION == base.ASGI_APPLICATION and keyed.INSTALLED_APPS == base.INSTALLED_APPS


# -- the chat consumer under WebsocketCommunicator ------------------------------------------------

@pytest.fixture
def django_configured():
    """Minimal Django settings for this process, as in test_channel_layer_django.py; each test
    sets CHANNEL_LAYERS with override_settings."""
    if not settings.configured:
        settings.configure(USE_TZ=True, INSTALLED_APPS=[], CHANNEL_LAYERS={})
        django.setup()


@pytest.fixture
def chat_routes(site_modules, django_configured):
    from channels.routing import URLRouter
    from chat.routing import websocket_urlpatterns

    return URLRouter(websocket_urlpatterns)


async def join(routes, course: int, name: str):
    from channels.testing import WebsocketCommunicator

    communicator = WebsocketCommunicator(routes, f"/ws/chat/room/{course}/?name={name}")
    connected, _ = await communicator.connect(timeout=RECEIVE_SECONDS)
    assert connected
    return communicator


def test_the_chat_consumer_with_the_keys_settings_talks_through_the_curve_broker(
        chat_keys, curve_broker, site_modules, chat_routes):
    keyed = site_modules("chatsite.settings_keys", chat_keys.site_env(curve_broker.url))

    async def main():
        alice, bob = await join(chat_routes, 3, "alice"), await join(chat_routes, 3, "bob")
        await alice.send_to(text_data=json.dumps({"message": "sealed hello"}))
        heard = [json.loads(await c.receive_from(timeout=RECEIVE_SECONDS)) for c in (bob, alice)]
        for communicator in (alice, bob):
            await communicator.disconnect()
        return heard

    with override_settings(CHANNEL_LAYERS=keyed.CHANNEL_LAYERS):
        to_bob, to_alice = run(main())
    assert to_bob == to_alice and (to_bob["user"], to_bob["message"]) == ("alice", "sealed hello")


@pytest.mark.parametrize("who, reason", [
    ("no keys", "CURVE keys"),
    ("stranger", "not among the broker's authorized keys"),
])
def test_the_chat_consumer_without_an_authorised_key_fails_at_once(
        who, reason, chat_keys, curve_broker, site_modules, chat_routes):
    if who == "no keys":
        layers = site_modules("chatsite.settings", {"CHANNELBUS_BROKER": curve_broker.url}).CHANNEL_LAYERS
    else:
        layers = site_modules("chatsite.settings_keys", chat_keys.site_env(curve_broker.url, who)).CHANNEL_LAYERS

    async def main():
        from channels.testing import WebsocketCommunicator

        # (Not communicator.connect(): it would notice the application's end only at its timeout.)
        communicator = WebsocketCommunicator(chat_routes, "/ws/chat/room/3/?name=mallory")
        await communicator.send_input({"type": "websocket.connect"})
        await communicator.wait(timeout=RECEIVE_SECONDS)  # raises what ended the application

    start = time.monotonic()
    with override_settings(CHANNEL_LAYERS=layers), pytest.raises(AuthenticationFailed) as caught:
        run(main())
    assert time.monotonic() - start < REFUSAL_SECONDS
    assert reason in caught.value.reason and caught.value.endpoint == curve_broker.url


# -- two daphne processes, WebSockets over TCP ----------------------------------------------------

class WebSocketRefused(Exception):
    """The server answered the opening handshake with something other than 101."""


class WebSocket:
    """A minimal blocking WebSocket client (RFC 6455) for short text frames: enough to talk to
    the chat consumer as a browser would, with the Origin header AllowedHostsOriginValidator
    wants."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, base: str, path: str, timeout: float = RECEIVE_SECONDS) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: {base}\r\n\r\n"
        ).encode())
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buffer:
            chunk = self._recv(deadline)
            if not chunk:
                break
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status = head.split(b"\r\n")[0].decode(errors="replace")
        if " 101 " not in status + " ":
            self.sock.close()
            raise WebSocketRefused(status or "the connection closed during the handshake")
        headers = dict(line.split(":", 1) for line in head.decode(errors="replace").split("\r\n")[1:] if ":" in line)
        headers = {name.strip().lower(): value.strip() for name, value in headers.items()}
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        assert headers.get("sec-websocket-accept") == accept, head

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
            raise TimeoutError("nothing from the server in time")
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return chunk

    def _take(self, n: int, deadline: float) -> bytes:
        while len(self.buffer) < n:
            if not self._recv(deadline):
                raise ConnectionError("the server closed the connection")
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def receive(self, timeout: float = RECEIVE_SECONDS) -> str:
        """The next text message (pings are answered, fragments joined)."""
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        while True:
            first, second = self._take(2, deadline)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._take(2, deadline))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._take(8, deadline))
            mask = self._take(4, deadline) if second & 0x80 else b""
            payload = self._take(length, deadline)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError(f"the server closed the WebSocket: {payload[:2].hex()} {payload[2:]!r}")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x1, 0x0):
                parts.append(payload)
                if first & 0x80:
                    return b"".join(parts).decode()

    def receive_json(self) -> dict:
        return json.loads(self.receive())

    def close(self) -> None:
        try:
            self._send_frame(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def sockets():
    """``sockets(base, course, name)`` opens a chat WebSocket; all are closed at teardown."""
    opened: list[WebSocket] = []

    def open_room(base: str, course: int, name: str) -> WebSocket:
        ws = WebSocket(base, f"/ws/chat/room/{course}/?name={name}")
        opened.append(ws)
        return ws

    yield open_room
    for ws in opened:
        ws.close()


def start_daphne(processes, env: dict[str, str], settings_module: str, label: str):  # noqa: F811
    """A daphne process serving the chat site on a loopback port the OS picks; returns
    ``(process, base URL)`` once it listens."""
    env = {**env, "DJANGO_SETTINGS_MODULE": settings_module,
           "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT)])}
    daphne = shutil.which("daphne", path=os.path.dirname(sys.executable)) or "daphne"
    proc = processes(daphne, "-e", "tcp:port=0:interface=127.0.0.1", "chatsite.asgi:application",
                     env=env, name=f"daphne {label}")
    port = proc.expect(LISTENING, "stderr").group(1)
    return proc, f"http://127.0.0.1:{port}"


def test_two_daphne_servers_with_keys_carry_the_chat_through_the_curve_broker(
        chat_keys, curve_broker, processes, sockets):  # noqa: F811
    env = chat_keys.site_env(curve_broker.url)
    _, server1 = start_daphne(processes, env, "chatsite.settings_keys", "keys 1")
    _, server2 = start_daphne(processes, env, "chatsite.settings_keys", "keys 2")

    alice = sockets(server1, 1, "alice")
    bob = sockets(server2, 1, "bob")
    carol = sockets(server2, 2, "carol")  # another course, on the receiving server

    alice.send(json.dumps({"message": "hello over CURVE"}))
    to_bob, to_alice = bob.receive_json(), alice.receive_json()
    assert to_bob == to_alice and (to_bob["user"], to_bob["message"]) == ("alice", "hello over CURVE")

    bob.send(json.dumps({"message": "and back"}))
    assert (alice.receive_json()["message"], bob.receive_json()["message"]) == ("and back", "and back")

    carol.send(json.dumps({"message": "course two only"}))
    assert carol.receive_json()["message"] == "course two only"
    alice.send(json.dumps({"message": "last word"}))  # course 2 would have reached bob before this
    assert bob.receive_json()["message"] == "last word"
    assert "refused" not in curve_broker.stderr_path.read_text()


def test_a_daphne_server_without_keys_is_refused_by_the_curve_broker_and_says_why(
        curve_broker, processes, sockets):  # noqa: F811
    proc, server = start_daphne(processes, {"CHANNELBUS_BROKER": curve_broker.url}, "chatsite.settings", "no keys")
    for name in ("alice", "bob"):  # (the second: the layer tries again, and is refused again)
        start = time.monotonic()
        with pytest.raises(WebSocketRefused, match=" 500 "):  # (daphne's answer to an application that failed)
            sockets(server, 1, name)
        assert time.monotonic() - start < REFUSAL_SECONDS
    proc.expect(r"AuthenticationFailed|cannot connect to the broker", "stderr", timeout=REFUSAL_SECONDS)
    log = "\n".join(proc.lines["stderr"])
    assert f"cannot connect to the broker at {curve_broker.url}" in log and "CURVE keys" in log
