"""Access control in the routing state (``broker.access``): pure, with real frames, no sockets.

The server tells the router the key name of a connection with its first message; these tests
pass it the same way (``handle(..., key=...)``).
"""

from __future__ import annotations

import pytest

from broker.access import OWNERS_REMEMBERED
from broker.permissions import Permissions
from broker.protocol import wire
from broker.routing import Router
from test_routing import FakeClient as Conn, replies

RULES = Permissions.parse({
    "web": {"send": ["chat.*"], "receive": ["chat.*"], "group_send": ["room"], "group_add": ["room"],
            "stats": True},
}, "perm.toml")


class KeyedConn(Conn):
    """A connection whose messages come with the key name its handshake authenticated."""

    def __init__(self, router: Router, rid: bytes, client: str, key: str) -> None:
        super().__init__(router, rid, client)
        self.key = key

    def raw(self, frames, now: float = 0.0):
        return self.router.handle(self.rid, frames, now, self.key)


def answer(outs, conn) -> tuple[str, dict]:
    (verb, header), = replies(outs, conn.rid)
    return verb, header


def test_each_guarded_request_is_checked_against_the_keys_grant_and_refused_without_a_strike():
    router = Router(permissions=RULES)
    web = KeyedConn(router, b"w.1", "webb0001", "web")
    web.hello()
    assert answer(web.send("chat.a"), web)[0] == "OK"
    verb, header = answer(web.send("tasks"), web)
    assert (verb, header["code"], header["key"], header["action"], header["name"]) == (
        "ERROR", "forbidden", "web", "send", "tasks")
    assert header["id"] == web.last_id
    assert answer(web.reserve("tasks", 4), web)[1]["code"] == "forbidden"
    assert answer(web.group_send("lobby"), web)[1]["action"] == "group_send"
    assert answer(web.group_add("lobby", "chat.a"), web)[1]["action"] == "group_add"
    assert answer(web.group_discard("lobby", "chat.a"), web)[1]["action"] == "group_add"
    assert answer(web.flush(), web)[1]["action"] == "flush"
    assert answer(web.ping(), web)[0] == "OK"  # (PING needs nothing, though it is a FLUSH's kin)
    verb, header = answer(web.credit("tasks", 10), web)  # a notice: no id, and the channel named
    assert (header["id"], header["code"], header["channel"]) == (None, "forbidden", "tasks")
    verb, header = answer(web.raw(wire.GroupPost(0, "lobby", body=b"\x81\xa4type\xa1x").frames()), web)
    assert (header["id"], header["group"], header["lost"]) == (None, "lobby", 1)
    assert router.stats["forbidden"] == 8 and router.forbidden_by_key == {"web": 8}
    assert router.stats["bad_frames"] == 0 and not router.strikes


def test_a_key_not_listed_and_without_a_default_table_may_do_nothing():
    router = Router(permissions=RULES)
    other = KeyedConn(router, b"o.1", "othr0001", "other")
    assert answer(other.hello(), other)[0] == "OK"  # (connecting needs no grant)
    assert answer(other.send("chat.a"), other)[1]["code"] == "forbidden"
    assert answer(other.raw(wire.Stats(1, 10).frames()), other)[1]["action"] == "stats"


def test_a_client_id_belongs_to_the_first_key_that_used_it():
    router = Router()  # (no permissions file: the ownership of client ids holds with keys alone)
    web = KeyedConn(router, b"w.1", "webb0001", "web")
    web.hello()
    web.bye()
    thief = KeyedConn(router, b"t.1", "webb0001", "other")
    verb, header = answer(thief.hello(), thief)
    assert (verb, header["code"], header["action"]) == ("ERROR", "forbidden", "hello")
    assert b"t.1" not in router.peers
    again = KeyedConn(router, b"w.2", "webb0001", "web")
    assert answer(again.hello(), again)[0] == "OK"
    plain = Conn(Router(), b"p.1", "webb0001")  # (without keys nothing is owned)
    assert answer(plain.hello(), plain)[0] == "OK"


def test_owners_of_departed_clients_are_forgotten_oldest_first_when_too_many_are_held():
    router = Router()
    live = KeyedConn(router, b"live", "live0001", "web")
    live.hello()
    for n in range(OWNERS_REMEMBERED):
        router.owners[f"gone{n:06d}"] = "web"  # (clients that came and left)
    newcomer = KeyedConn(router, b"new", "newc0001", "other")
    assert answer(newcomer.hello(), newcomer)[0] == "OK"
    assert len(router.owners) <= OWNERS_REMEMBERED
    assert router.owners["live0001"] == "web" and router.owners["newc0001"] == "other"
    assert "gone000000" not in router.owners  # (the oldest went first)
    assert f"gone{OWNERS_REMEMBERED - 1:06d}" in router.owners


@pytest.mark.parametrize("key", ["web", None])
def test_a_resumed_session_keeps_its_key(key):
    router = Router(permissions=RULES)
    web = KeyedConn(router, b"w.1", "webb0001", key)
    web.hello()
    web.key = None  # (later messages of a known connection come without the key)
    web.hello()
    assert router.peers[b"w.1"].key == key
    expected = "OK" if key == "web" else "ERROR"
    assert answer(web.send("chat.a"), web)[0] == expected
