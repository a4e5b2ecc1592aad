"""Pure tests of the broker's routing state: fake peers drive a ``Router`` with frames.

No sockets and no sleeps: ``now`` is a float each test chooses, and every frame the router
returns is decoded with msgpack and checked.
"""

from __future__ import annotations

import copy
import itertools

import msgpack
import pytest

from broker.protocol import wire
from broker.protocol.names import CONTROL_TOPIC, group_topic
from broker.routing import GROUP_SWEEP_SECONDS, JOIN_TIMEOUT, PUB, Limits, Out, Router

A_ID, B_ID, C_ID = "aaaa1111", "bbbb2222", "cccc3333"
A_SPECIFIC = f"specific.{A_ID}!x"
B_SPECIFIC = f"specific.{B_ID}!x"
B_OTHER = f"specific.{B_ID}!y"


def body(n: int = 0) -> bytes:
    return msgpack.packb({"type": "test.message", "n": n}, use_bin_type=True)


def number(frame: bytes) -> int:
    message = msgpack.unpackb(frame, raw=False)
    assert message["type"] == "test.message"
    return message["n"]


class FakeClient:
    """One client connection (a routing id) talking to a router through real frames."""

    def __init__(self, router: Router, rid: bytes, client: str) -> None:
        self.router, self.rid, self.client = router, rid, client
        self._ids = itertools.count(1)
        self.last_id = 0

    def _id(self) -> int:
        self.last_id = next(self._ids)
        return self.last_id

    def raw(self, frames: list[bytes], now: float = 0.0) -> list[Out]:
        return self.router.handle(self.rid, frames, now)

    def hello(self, now: float = 0.0) -> list[Out]:
        return self.raw(wire.Hello(self._id(), self.client).frames(), now)

    def send(self, channel, n=0, *, cap=100, exp=60.0, now=0.0, payload=None) -> list[Out]:
        payload = body(n) if payload is None else payload
        return self.raw(wire.Send(self._id(), channel, cap, exp, payload).frames(), now)

    def group_send(self, group, n=0, *, cap=100, exp=60.0, ccap=(), now=0.0, payload=None):
        payload = body(n) if payload is None else payload
        return self.raw(wire.GroupSend(self._id(), group, cap, exp, ccap, payload).frames(), now)

    def group_add(self, group, channel, gexp=86400.0, now=0.0) -> list[Out]:
        return self.raw(wire.GroupAdd(self._id(), group, channel, gexp).frames(), now)

    def group_sync(self, group, channel, now=0.0) -> list[Out]:
        return self.raw(wire.GroupSync(self._id(), group, channel).frames(), now)

    def group_discard(self, group, channel, now=0.0) -> list[Out]:
        return self.raw(wire.GroupDiscard(self._id(), group, channel).frames(), now)

    def flush(self, now=0.0) -> list[Out]:
        return self.raw(wire.Flush(self._id()).frames(), now)

    def ping(self, now=0.0) -> list[Out]:
        return self.raw(wire.Ping(self._id()).frames(), now)

    def credit(self, channel, n, now=0.0) -> list[Out]:
        return self.raw(wire.Credit(channel, n).frames(), now)

    def ack(self, *acks, now=0.0) -> list[Out]:
        return self.raw(wire.Ack(tuple(acks)).frames(), now)

    def bye(self, now=0.0) -> list[Out]:
        return self.raw(wire.Bye().frames(), now)

    def joined(self, group, channel, now=0.0) -> list[Out]:
        return self.raw(wire.Joined(group, channel).frames(), now)

    def send_want(self, channel, n=0, *, want, cap=100, exp=60.0, now=0.0) -> list[Out]:
        return self.raw(wire.Send(self._id(), channel, cap, exp, body(n), want).frames(), now)

    def reserve(self, channel, want, *, cap=100, now=0.0) -> list[Out]:
        return self.raw(wire.Reserve(self._id(), channel, cap, want).frames(), now)

    def post(self, channel, n=0, *, exp=60.0, now=0.0) -> list[Out]:
        return self.raw(wire.Post(channel, exp, body(n)).frames(), now)

    def release(self, *slots, now=0.0) -> list[Out]:
        return self.raw(wire.Release(tuple(slots)).frames(), now)


# -- reading what the router sent -----------------------------------------------------------


def replies(outs: list[Out], rid: bytes) -> list[tuple[str, dict]]:
    """(verb, header) of each OK/ERROR/JOIN sent to ``rid``."""
    found = []
    for out in outs:
        if out.dest == rid and out.frames[0] != wire.MSG:
            assert len(out.frames) == 2
            found.append((out.frames[0][1:].decode(), msgpack.unpackb(out.frames[1], raw=False)))
    return found


def ok(outs: list[Out], rid: bytes) -> dict:
    """The header of the one reply to ``rid``, which must be OK."""
    [(verb, header)] = replies(outs, rid)
    assert verb == "OK", header
    return header


def error(outs: list[Out], rid: bytes, code: str) -> dict:
    """The header of the one reply to ``rid``, which must be ERROR with ``code``."""
    [(verb, header)] = replies(outs, rid)
    assert verb == "ERROR", header
    assert header["code"] == code, header
    assert header["message"]
    return header


def pushes(outs: list[Out], rid: bytes) -> list[tuple[str, list[int], list[int]]]:
    """(channel, ttls in ms, message numbers) of each MSG sent to ``rid``."""
    found = []
    for out in outs:
        if out.dest == rid and out.frames[0] == wire.MSG:
            header = msgpack.unpackb(out.frames[1], raw=False)
            assert set(header) == {"ch", "ttl", "at"}  # at: the broker clock (now + wall_offset)
            bodies = out.frames[2:]
            assert len(header["ttl"]) == len(bodies)
            assert out.push is not None and out.push[0] == header["ch"]
            found.append((header["ch"], header["ttl"], [number(b) for b in bodies]))
    return found


def received(outs: list[Out], rid: bytes, channel: str | None = None) -> list[int]:
    """The message numbers pushed to ``rid`` (on ``channel`` if given), in order."""
    return [n for ch, _, ns in pushes(outs, rid) if channel in (None, ch) for n in ns]


def published(outs: list[Out]) -> list[tuple[bytes, dict, list[bytes]]]:
    """(topic, header, rest) of each message for the publisher."""
    return [
        (out.frames[0], msgpack.unpackb(out.frames[1], raw=False), out.frames[2:])
        for out in outs
        if out.dest is PUB
    ]


def push_of(outs: list[Out], rid: bytes) -> tuple[str, list]:
    [push] = [out.push for out in outs if out.dest == rid and out.push is not None]
    return push


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def router() -> Router:
    """A router whose invariants (conservation first) must hold when the test is done."""
    router = Router(pub_endpoint="tcp://127.0.0.1:5556")
    yield router
    router.check()


@pytest.fixture
def a(router) -> FakeClient:
    client = FakeClient(router, b"A", A_ID)
    ok(client.hello(), b"A")
    return client


@pytest.fixture
def b(router) -> FakeClient:
    client = FakeClient(router, b"B", B_ID)
    ok(client.hello(), b"B")
    return client


@pytest.fixture
def c(router) -> FakeClient:
    client = FakeClient(router, b"C", C_ID)
    ok(client.hello(), b"C")
    return client


# -- HELLO ----------------------------------------------------------------------------------


def test_hello_answers_with_client_id_publisher_endpoint_and_ceilings():
    router = Router(Limits(max_capacity=7, max_message_size=99), pub_endpoint="tcp://x:1")
    header = ok(FakeClient(router, b"A", A_ID).hello(), b"A")
    assert header["id"] == 1
    assert header["client"] == A_ID
    assert header["pub"] == "tcp://x:1"
    assert header["version"] == wire.VERSION
    assert header["max_capacity"] == 7
    assert header["max_message_size"] == 99
    assert {"max_expiry", "max_group_expiry"} <= set(header)


def test_hello_with_a_malformed_client_id_is_refused_and_registers_nothing(router):
    raw = [wire.verb_frame("HELLO"), wire.pack({"id": 3, "client": "NOT VALID"})]
    header = error(router.handle(b"A", raw, 0.0), b"A", "bad-value")
    assert header["id"] == 3
    assert router.peers == {}


def test_hello_with_a_client_id_another_live_peer_uses_is_refused_with_id_taken(router, a):
    thief = FakeClient(router, b"X", A_ID)
    error(thief.hello(), b"X", "id-taken")
    assert router.by_client[A_ID] == b"A"
    assert b"X" not in router.peers
    assert router.strikes.get(b"X", 0) == 0


def test_a_client_id_is_free_again_once_its_peer_is_gone(router, a):
    a.bye()
    ok(FakeClient(router, b"X", A_ID).hello(), b"X")
    assert router.by_client[A_ID] == b"X"


def test_repeated_hello_on_one_connection_keeps_its_state(router, a, b):
    ok(b.group_add("room", B_SPECIFIC), b"B")
    ok(b.hello(), b"B")
    assert router.groups.is_member("room", B_SPECIFIC, 0.0)


def test_hello_with_a_new_client_id_forgets_the_old_identity(router, b):
    ok(b.group_add("room", B_SPECIFIC), b"B")
    b.client = C_ID
    ok(b.hello(), b"B")
    assert router.peers[b"B"].client == C_ID
    assert B_ID not in router.by_client
    assert not router.groups.is_member("room", B_SPECIFIC, 0.0)


@pytest.mark.parametrize(
    "command",
    [
        wire.Send(5, "q", 1, 1.0, body()), wire.GroupSend(5, "g", 1, 1.0, (), body()),
        wire.GroupAdd(5, "g", "q"), wire.GroupSync(5, "g", "q"), wire.GroupDiscard(5, "g", "q"),
        wire.Flush(5), wire.Ping(5),
    ],
    ids=lambda c: type(c).__name__,
)
def test_a_request_before_hello_is_refused_with_no_hello_and_its_id(router, command):
    header = error(router.handle(b"A", command.frames(), 0.0), b"A", "no-hello")
    assert header["id"] == 5
    assert router.inboxes == {} and len(router.groups) == 0


@pytest.mark.parametrize("command", [wire.Credit("q", 1), wire.Ack((("q", 1),))])
def test_a_notice_before_hello_is_refused_with_no_hello_and_no_id(router, command):
    header = error(router.handle(b"A", command.frames(), 0.0), b"A", "no-hello")
    assert header["id"] is None
    assert router.inboxes == {}


def test_bye_before_hello_is_ignored_silently(router):
    assert router.handle(b"A", wire.Bye().frames(), 0.0) == []
    assert router.stats["bad_frames"] == 0


def test_ping_answers_ok_with_its_id(a):
    a.ping()
    assert ok(a.ping(), b"A") == {"id": a.last_id}


def test_a_malformed_message_is_answered_with_its_request_id(router, a):
    raw = [wire.verb_frame("SEND"), wire.pack({"id": 42, "ch": "q", "cap": 0, "exp": 1})]
    header = error(a.raw(raw), b"A", "bad-value")
    assert header["id"] == 42
    assert header["name"] == "cap"
    assert router.stats["bad_frames"] == 1


# -- normal channels: send, credit, ack -----------------------------------------------------


def test_send_then_credit_delivers_messages_in_fifo_order(router, a, b):
    for n in range(3):
        header = ok(a.send("tasks", n, exp=10.0), b"A")
        assert header == {"id": a.last_id}
    outs = b.credit("tasks", 10, now=1.0)
    assert pushes(outs, b"B") == [("tasks", [9000, 9000, 9000], [0, 1, 2])]
    assert router.stats["delivered"] == 3
    assert router.stats["received"] == 3


def test_credit_then_send_pushes_at_once(a, b):
    b.credit("tasks", 5)
    outs = a.send("tasks", 7, exp=2.5)
    ok(outs, b"A")
    assert pushes(outs, b"B") == [("tasks", [2500], [7])]


def test_push_carries_the_body_bytes_unchanged(a, b):
    payload = msgpack.packb({"type": "x", "blob": b"\x00\xff"}, use_bin_type=True)
    a.send("tasks", payload=payload)
    [out] = b.credit("tasks", 1)
    assert out.frames[2:] == [payload]


def test_credit_bounds_how_many_messages_are_pushed_and_ack_refills_it(a, b):
    for n in range(5):
        a.send("tasks", n)
    assert received(b.credit("tasks", 2), b"B") == [0, 1]
    assert received(a.send("tasks", 5), b"B") == []
    assert received(b.ack(("tasks", 2)), b"B") == [2, 3]
    assert received(b.ack(("tasks", 1)), b"B") == [4]
    assert received(b.ack(("tasks", 1)), b"B") == [5]


def test_credit_for_a_process_specific_channel_is_refused(router, b):
    header = error(b.credit(B_SPECIFIC, 5), b"B", "bad-value")
    assert header["id"] is None
    assert router.inboxes == {}


def test_send_to_full_channel_raises_full_with_capacity(router, a):
    for n in range(3):
        ok(a.send("tasks", n, cap=3), b"A")
    header = error(a.send("tasks", 3, cap=3), b"A", "full")
    assert header["id"] == a.last_id
    assert header["capacity"] == 3
    assert header["channel"] == "tasks"
    assert router.stats["full"] == 1
    assert router.strikes.get(b"A", 0) == 0  # a full channel is not the sender's fault


def test_capacity_is_the_senders_setting_per_request(a):
    for n in range(3):
        ok(a.send("tasks", n, cap=3), b"A")
    ok(a.send("tasks", 3, cap=4), b"A")
    error(a.send("tasks", 4, cap=2), b"A", "full")


def test_depth_counts_in_flight_messages_until_they_are_acked(router, a, b):
    ok(a.send("tasks", 0, cap=2), b"A")
    ok(a.send("tasks", 1, cap=2), b"A")
    assert received(b.credit("tasks", 10), b"B") == [0, 1]
    assert router.inboxes["tasks"].inflight == 2
    error(a.send("tasks", 2, cap=2), b"A", "full")
    b.ack(("tasks", 1))
    assert router.inboxes["tasks"].inflight == 1
    outs = a.send("tasks", 3, cap=2)
    ok(outs, b"A")
    assert received(outs, b"B") == [3]
    error(a.send("tasks", 4, cap=2), b"A", "full")


def test_ack_beyond_what_is_in_flight_is_capped_and_unknown_channels_are_ignored(router, a, b):
    a.send("tasks", 0)
    b.credit("tasks", 1)
    assert b.ack(("tasks", 5), ("other", 3)) == []
    assert router.inboxes["tasks"].inflight == 0
    assert router.peers[b"B"].credits["tasks"] == 1  # the credit the one message used, no more
    assert "other" not in router.inboxes


def test_ack_from_a_peer_that_holds_nothing_changes_nothing(router, a, b, c):
    a.send("tasks", 0)
    b.credit("tasks", 1)
    c.ack(("tasks", 1))
    assert router.inboxes["tasks"].inflight == 1
    assert router.peers[b"B"].inflight == {"tasks": 1}


def test_credit_round_robin_gives_each_message_to_exactly_one_receiver(a, b, c):
    b.credit("tasks", 100)
    c.credit("tasks", 100)
    outs = []
    for n in range(10):
        outs += a.send("tasks", n)
    got_b, got_c = received(outs, b"B"), received(outs, b"C")
    assert got_b == [0, 2, 4, 6, 8]
    assert got_c == [1, 3, 5, 7, 9]


def test_a_backlog_is_shared_between_receivers_without_duplicates(a, b, c):
    for n in range(10):
        a.send("tasks", n)
    outs = b.credit("tasks", 3) + c.credit("tasks", 3)
    outs += b.ack(("tasks", 3)) + c.ack(("tasks", 3))
    outs += b.ack(("tasks", 3)) + c.ack(("tasks", 3))
    got_b, got_c = received(outs, b"B"), received(outs, b"C")
    assert got_b == [0, 1, 2, 6, 7, 8]
    assert got_c == [3, 4, 5, 9]
    assert sorted(got_b + got_c) == list(range(10))


def test_credit_is_capped(router, b):
    b.credit("tasks", wire.MAX_INT)
    b.credit("tasks", wire.MAX_INT)
    assert router.peers[b"B"].credits["tasks"] <= 100_000


# -- process-specific channels --------------------------------------------------------------


def test_a_specific_channel_is_pushed_straight_to_its_owner(router, a, b):
    outs = a.send(B_SPECIFIC, 1, exp=5.0)
    ok(outs, b"A")
    assert pushes(outs, b"B") == [(B_SPECIFIC, [5000], [1])]
    assert pushes(outs, b"A") == []


def test_messages_to_a_specific_channel_wait_for_the_owners_hello(router, a):
    for n in range(3):
        ok(a.send(B_SPECIFIC, n, exp=10.0), b"A")
    ok(a.send(B_OTHER, 9, exp=10.0), b"A")
    ok(a.send(A_SPECIFIC, 8), b"A")
    owner = FakeClient(router, b"B", B_ID)
    outs = owner.hello(now=4.0)
    assert outs[0].frames[0] == wire.OK  # the reply comes before the deliveries
    assert received(outs, b"B", B_SPECIFIC) == [0, 1, 2]
    assert received(outs, b"B", B_OTHER) == [9]
    assert {ttl for _, ttls, _ in pushes(outs, b"B") for ttl in ttls} == {6000}


def test_specific_channel_capacity_counts_unacked_messages(router, a, b):
    ok(a.send(B_SPECIFIC, 0, cap=1), b"A")
    error(a.send(B_SPECIFIC, 1, cap=1), b"A", "full")
    b.ack((B_SPECIFIC, 1))
    ok(a.send(B_SPECIFIC, 2, cap=1), b"A")


def test_a_channel_with_a_bang_but_no_valid_owner_just_waits(router, a):
    ok(a.send("specific.NOBODY!x", 0), b"A")
    assert len(router.inboxes["specific.NOBODY!x"].queue) == 1


def test_idle_specific_inboxes_are_deleted_after_send_receive_and_ack(router, a, b):
    a.send(B_SPECIFIC, 0)
    a.send(B_OTHER, 1)
    assert len(router.inboxes) == 2
    b.ack((B_SPECIFIC, 1), (B_OTHER, 1))
    assert len(router.inboxes) == 0
    assert router.peers[b"B"].inflight == {}


def test_idle_normal_inboxes_are_deleted_once_no_receiver_has_credit(router, a, b):
    a.send("tasks", 0)
    b.credit("tasks", 1)
    b.ack(("tasks", 1))
    assert "tasks" in router.inboxes  # B still offers credit
    b.bye()
    assert len(router.inboxes) == 0


# -- expiry ---------------------------------------------------------------------------------


def test_expired_messages_are_never_pushed(router, a, b):
    a.send("tasks", 0, exp=1.0, now=0.0)
    a.send("tasks", 1, exp=5.0, now=0.0)
    outs = b.credit("tasks", 10, now=1.0)  # expiry is exclusive: at exactly 1.0 it is gone
    assert pushes(outs, b"B") == [("tasks", [4000], [1])]
    assert router.stats["expired"] == 1


def test_expired_specific_messages_are_not_pushed_at_hello(router, a):
    a.send(B_SPECIFIC, 0, exp=1.0, now=0.0)
    outs = FakeClient(router, b"B", B_ID).hello(now=2.0)
    assert pushes(outs, b"B") == []
    assert router.stats["expired"] == 1


def test_ttl_is_at_least_one_millisecond(a, b):
    a.send("tasks", 0, exp=1.0, now=0.0)
    assert pushes(b.credit("tasks", 1, now=0.9999999), b"B") == [("tasks", [1], [0])]


def test_tick_purges_expired_messages_and_counts_them(router, a):
    a.send("tasks", 0, exp=1.0)
    a.send("tasks", 1, exp=1.0)
    a.send("tasks", 2, exp=9.0)
    assert router.tick(0.5) == []
    assert len(router.inboxes["tasks"].queue) == 3
    router.tick(1.5)
    assert router.stats["expired"] == 2
    assert [number(item[0]) for item in router.inboxes["tasks"].queue] == [2]
    router.tick(10.0)
    assert router.stats["expired"] == 3
    assert router.inboxes == {}


def test_a_full_channel_accepts_again_once_its_messages_expire(router, a):
    ok(a.send("tasks", 0, cap=1, exp=1.0), b"A")
    error(a.send("tasks", 1, cap=1, now=0.5), b"A", "full")
    ok(a.send("tasks", 2, cap=1, now=1.5), b"A")
    assert router.stats["expired"] == 1


# -- groups ---------------------------------------------------------------------------------


def test_group_send_queues_a_copy_in_each_normal_members_inbox(router, a, b, c):
    ok(a.group_add("room", "inbox-b"), b"A")
    ok(a.group_add("room", "inbox-c"), b"A")
    outs = a.group_send("room", 4, exp=3.0)
    assert ok(outs, b"A") == {"id": a.last_id, "queued": 2, "full": 0}
    assert published(outs) == []
    assert received(b.credit("inbox-b", 5, now=1.0), b"B") == [4]
    assert pushes(c.credit("inbox-c", 5, now=2.0), b"C") == [("inbox-c", [1000], [4])]
    assert router.stats["group_sends"] == 1


def test_group_send_pushes_at_once_to_a_member_with_credit(a, b):
    a.group_add("room", "inbox-b")
    b.credit("inbox-b", 1)
    assert received(a.group_send("room", 3), b"B") == [3]


def test_group_send_to_an_empty_group_succeeds_with_nothing_queued(a):
    outs = a.group_send("nobody", 0)
    assert ok(outs, b"A")["queued"] == 0
    assert len(outs) == 1


def test_a_specific_member_causes_exactly_one_publish_on_the_group_topic(router, a, b):
    for channel in (B_SPECIFIC, B_OTHER, A_SPECIFIC):
        a.group_add("room1", channel)
    a.group_add("room1", "inbox")
    payload = body(5)
    outs = a.group_send("room1", cap=7, exp=2.5, payload=payload)
    assert ok(outs, b"A")["queued"] == 1
    [(topic, header, rest)] = published(outs)
    assert topic == b"room1\x00" == group_topic("room1")
    assert header == {"op": "msg", "ttl": 2500, "at": 0.0, "cap": 7, "seq": 1}
    assert rest == [payload]
    assert pushes(outs, b"B") == []  # specific members are served by their client, not pushed


def test_group_publish_carries_the_channel_capacity_patterns(a):
    a.group_add("room", A_SPECIFIC)
    outs = a.group_send("room", ccap=(("^specific", 2),))
    [(_, header, _)] = published(outs)
    assert header["ccap"] == [["^specific", 2]]


def test_a_full_normal_member_is_skipped_without_error(router, a):
    a.group_add("room", "small")
    a.group_add("room", "big")
    assert ok(a.group_send("room", 0, cap=1), b"A") == {"id": a.last_id, "queued": 2, "full": 0}
    assert ok(a.group_send("room", 1, cap=1), b"A") == {"id": a.last_id, "queued": 0, "full": 2}
    assert router.stats["group_skipped"] == 2
    assert router.strikes.get(b"A", 0) == 0


def test_channel_capacity_patterns_set_the_capacity_of_matching_members(router, a):
    a.group_add("room", "small")
    a.group_add("room", "big")
    ccap = (("^sm", 1), ("^s", 50))  # first match wins
    ok(a.group_send("room", 0, cap=5, ccap=ccap), b"A")
    assert ok(a.group_send("room", 1, cap=5, ccap=ccap), b"A")["full"] == 1
    assert len(router.inboxes["small"].queue) == 1
    assert len(router.inboxes["big"].queue) == 2


def test_an_invalid_channel_capacity_regex_is_refused_and_delivers_nothing(router, a, b):
    a.group_add("room", "inbox-b")
    a.group_add("room", "inbox-c")
    a.group_add("room", A_SPECIFIC)
    b.credit("inbox-b", 5)
    outs = a.group_send("room", ccap=(("^inbox-b$", 5), ("(", 1)))
    header = error(outs, b"A", "bad-value")
    assert header["id"] == a.last_id
    assert pushes(outs, b"B") == []
    assert router.inboxes["inbox-b"].depth() == 0  # not queued, nor counted as pushed
    assert "inbox-c" not in router.inboxes
    assert published(outs) == []


@pytest.mark.parametrize("pattern, rule", [
    (r"(a+)+b", "repetition inside a repetition"),
    (r"(a|ab)*c", "alternation (|) inside a repetition"),
    (r"(a)\1", "backreference"),
    (r"a*b*c*d*", "4 repetitions (at most 3)"),
])
def test_a_channel_capacity_regex_that_could_backtrack_without_bound_is_refused(router, a, pattern, rule):
    a.group_add("room", "a" * 60 + "b")
    header = error(a.group_send("room", ccap=((pattern, 5),)), b"A", "bad-value")
    assert rule in header["message"] and repr(pattern) in header["message"]
    assert header["limit"] == 3
    assert "a" * 60 + "b" not in router.inboxes  # nothing delivered


def test_group_add_of_a_specific_channel_publishes_an_add_marker_with_ttl(router, b):
    outs = b.group_add("room", B_SPECIFIC, gexp=30.0, now=100.0)
    ok(outs, b"B")
    assert published(outs) == [(b"room\x00", {"op": "add", "ch": B_SPECIFIC, "ttl": 30_000, "seq": 0}, [])]


def test_group_add_of_a_normal_channel_publishes_nothing(a):
    outs = a.group_add("room", "inbox")
    ok(outs, b"A")
    assert published(outs) == []


def test_group_add_for_another_clients_channel_tells_that_client_to_join(router, a, b):
    outs = a.group_add("room", B_SPECIFIC, gexp=60.0)
    assert replies(outs, b"A") == []  # no answer until B's subscription is live
    assert replies(outs, b"B") == [("JOIN", {"g": "room", "ch": B_SPECIFIC, "gexp": 60.0})]
    assert router.groups.is_member("room", B_SPECIFIC, 0.0)


def test_the_owners_joined_answers_the_group_add_that_waited_for_it(router, a, b):
    a.group_add("room", B_SPECIFIC)
    request_id = a.last_id
    assert ok(b.joined("room", B_SPECIFIC), b"A")["id"] == request_id
    assert router.joining == {}


def test_a_group_add_the_owner_never_confirms_fails_after_the_join_timeout(router, a, b):
    a.group_add("room", B_SPECIFIC, now=0.0)
    assert replies(router.tick(JOIN_TIMEOUT - 0.1), b"A") == []
    header = error(router.tick(JOIN_TIMEOUT + 0.1), b"A", "unconfirmed")
    assert header["name"] == B_SPECIFIC
    assert router.groups.is_member("room", B_SPECIFIC, 1.0)  # recorded all the same


def test_a_group_add_waiting_on_an_owner_that_leaves_fails_at_once(router, a, b):
    a.group_add("room", B_SPECIFIC)
    error(b.bye(), b"A", "unconfirmed")
    assert not router.groups.is_member("room", B_SPECIFIC, 0.0)


# -- send reservations ----------------------------------------------------------------------


def test_send_with_want_grants_at_most_half_the_free_room(router, a):
    assert ok(a.send_want("q", want=64, cap=10), b"A")["grant"] == 4  # (10 - 1) // 2
    assert router.inboxes["q"].depth() == 5


def test_posts_fill_reserved_slots_without_a_reply_and_keep_order(router, a, b):
    ok(a.send_want("q", 0, want=2, cap=10), b"A")
    assert replies(a.post("q", 1), b"A") == []
    assert replies(a.post("q", 2), b"A") == []
    assert received(b.credit("q", 10), b"B") == [0, 1, 2]


def test_a_post_without_a_reserved_slot_is_refused_and_not_queued(router, a):
    error(a.post("q", 1), b"A", "no-reservation")
    assert "q" not in router.inboxes


# A POST to a channel with nothing queued and a receiver ready for all of it is pushed on at
# once (Delivery.deliver_posted), without queueing it first. Each case runs twice on routers in
# the same state: as it comes, and with that shortcut turned off, so that every POST is queued
# and then pumped. Both must send the same frames and end in the same state.

FAST_PATH_CASES = {
    # name: (credit granted by B, then C; bodies per POST; POSTs; acks on the first; POSTs that
    # the shortcut pushes on)
    "one body, credit to spare": ((10, 0), 1, 3, False, 3),
    "three bodies, credit exactly used up": ((3, 0), 3, 1, False, 1),
    "round robin over two receivers": ((5, 5), 2, 4, False, 4),
    "less credit than bodies: general path": ((2, 0), 3, 1, False, 0),
    "no receiver: queued": ((0, 0), 2, 2, False, 0),
    "acks ride along": ((2, 0), 1, 3, True, 2),
}


def _fast_path_run(case, shortcut: bool):
    (credit_b, credit_c), per_post, posts, with_acks, _ = case
    router = Router(pub_endpoint="tcp://127.0.0.1:5556")
    a, b, c = (FakeClient(router, rid, cid) for rid, cid in ((b"A", A_ID), (b"B", B_ID), (b"C", C_ID)))
    for client in (a, b, c):
        ok(client.hello(), client.rid)
    if with_acks:  # A receives on "back" and has taken one message: its first POST acks it
        a.credit("back", 5)
        ok(b.send("back", 99), b"B")
    ok(a.reserve("q", 50, cap=200), b"A")
    for client, credit in ((b, credit_b), (c, credit_c)):
        if credit:
            client.credit("q", credit)
    delivery, taken = router.delivery, []
    if shortcut:
        deliver_posted = delivery.deliver_posted
        delivery.deliver_posted = lambda *args: taken.append(deliver_posted(*args)) or taken[-1]
    else:
        delivery.deliver_posted = lambda *args: None  # (the general path, for comparison)
    outs = []
    for k in range(posts):
        bodies = tuple(body(10 * k + i) for i in range(per_post))
        acks = (("back", 1),) if with_acks and k == 0 else ()
        outs += a.raw(wire.Post("q", 60.0, bodies, acks).frames(), now=1.0 + k)
    for inbox in router.inboxes.values():  # (soonest is a lower bound: any valid one will do)
        assert all(inbox.soonest <= expires_at for _, expires_at in inbox.queue)
    boxes = {name: (list(box.queue), box.inflight, box.reserved, list(box.ready), box.ordered)
             for name, box in router.inboxes.items()}
    pushed_on = sum(out is not None for out in taken)
    return outs, (router.peers, boxes, router.delivery.bytes_held, router.stats), pushed_on


@pytest.mark.parametrize("name", FAST_PATH_CASES)
def test_a_post_pushed_on_at_once_sends_and_leaves_what_queue_then_pump_would(name):
    case = FAST_PATH_CASES[name]
    fast_outs, fast_state, pushed_on = _fast_path_run(case, shortcut=True)
    slow_outs, slow_state, _ = _fast_path_run(case, shortcut=False)
    assert fast_outs == slow_outs
    assert fast_state == slow_state
    assert pushed_on == case[-1]
    got = {rid: received(fast_outs, rid, "q") for rid in (b"B", b"C")}
    (credit_b, credit_c), per_post, posts, _, _ = case
    delivered = sorted(got[b"B"] + got[b"C"])
    assert len(delivered) == min(credit_b + credit_c, per_post * posts)
    assert fast_state[1]["q"][1] == len(delivered)  # (in flight)


def test_deliver_posted_declines_what_it_does_not_cover_and_changes_nothing(router, a, b):
    ok(a.reserve("q", 4, cap=100), b"A")
    delivery = router.delivery
    before = copy.deepcopy((delivery.peers, delivery.inboxes, delivery.bytes_held))
    peer = delivery.peers[b"A"]
    assert delivery.deliver_posted(peer, "q", [body(1)], 61.0, 1.0) is None  # no receiver ready
    assert (delivery.peers, delivery.inboxes, delivery.bytes_held) == before
    b.credit("q", 1)
    before = copy.deepcopy((delivery.peers, delivery.inboxes, delivery.bytes_held))
    assert delivery.deliver_posted(peer, "q", [body(1), body(2)], 61.0, 1.0) is None  # credit 1 < 2
    assert delivery.deliver_posted(peer, "q", [body(i) for i in range(5)], 61.0, 1.0) is None  # 4 slots
    delivery.peers[b"B"].blocked_until = 2.0
    assert delivery.deliver_posted(peer, "q", [body(1)], 61.0, 1.0) is None  # receiver blocked
    delivery.peers[b"B"].blocked_until = 0.0
    delivery.begin_batch()
    assert delivery.deliver_posted(peer, "q", [body(1)], 61.0, 1.0) is None  # a batch is open
    delivery.end_batch(1.0)
    assert (delivery.peers, delivery.inboxes, delivery.bytes_held) == before
    out = delivery.deliver_posted(peer, "q", [body(7)], 61.0, 1.0)
    assert out is not None and received([out], b"B", "q") == [7]
    assert pushes([out], b"B")[0][1] == [60_000]  # the ttl in ms


def fill_around_as_slots(a, c) -> None:
    """A reserves 2 of q's 5 slots (grant (5 - 0) // 2) and C queues 3: q is full, with room
    only in A's slots."""
    ok(a.reserve("q", 2, cap=5), b"A")
    for n in range(3):
        ok(c.send("q", n, cap=5), b"C")


def test_reserved_slots_count_towards_capacity_until_revoked(router, a, c):
    fill_around_as_slots(a, c)
    assert router.inboxes["q"].depth() == 5  # 3 queued + 2 reserved
    assert ok(c.reserve("q", 1, cap=5), b"C")["grant"] == 0  # no room left to reserve
    ok(c.send("q", 3, cap=5), b"C")  # revokes A's two: they count no more
    assert router.inboxes["q"].depth() == 4


def test_a_send_that_needs_room_held_by_reserved_slots_revokes_them_and_is_queued_at_once(router, a, c):
    fill_around_as_slots(a, c)
    outs = c.send("q", 3, cap=5)
    ok(outs, b"C")  # answered at once: no SEND waits for anyone
    assert replies(outs, b"A") == [("RECALL", {"ch": "q"})]
    inbox = router.inboxes["q"]
    assert (len(inbox.queue), inbox.reserved) == (4, 0)
    assert router.peers[b"A"].revoked == {"q": 2} and router.stats["revoked"] == 2
    ok(c.send("q", 4, cap=5), b"C")  # the other revoked slot is room again
    error(c.send("q", 5, cap=5), b"C", "full")  # five messages: full means full


def test_a_send_to_a_channel_its_messages_fill_is_refused_and_revokes_nothing(router, a, c):
    ok(a.reserve("q", 2, cap=5), b"A")
    for n in range(3):
        ok(c.send("q", n, cap=5), b"C")
    outs = c.send("q", 3, cap=3)  # C's capacity 3: the three messages fill it, slots or not
    error(outs, b"C", "full")
    assert replies(outs, b"A") == []
    assert router.peers[b"A"].reserved == {"q": 2} and router.stats["revoked"] == 0


def test_a_send_that_crosses_its_own_grant_revokes_it_and_loses_no_post(router, a):
    """The sender's own slots count like anyone's: its grant may have crossed the SEND on the
    wire, so it may POST into those slots before it reads the RECALL, and those POSTs are
    queued (the old rule, taking one of the crossed slots for the SEND, left the sender one
    slot short, and its last POST was refused: messages lost after send() returned)."""
    ok(a.reserve("q", 2, cap=4), b"A")  # 2 of 4 reserved by A, the reply still on its way
    ok(a.send("q", 0, cap=4), b"A")
    ok(a.send("q", 1, cap=4), b"A")
    outs = a.send("q", 2, cap=4)  # full but for A's own slots
    assert replies(outs, b"A") == [("RECALL", {"ch": "q"}), ("OK", {"id": a.last_id})]
    for n in (3, 4):  # A read its grant of 2 before the RECALL and posted into both
        assert replies(a.post("q", n), b"A") == []
    assert [number(body) for body, _ in router.inboxes["q"].queue] == [0, 1, 2, 3, 4]
    assert a.release(("q", 0)) == []  # its answer to the RECALL
    assert router.peers[b"A"].revoked == {} and router.inboxes["q"].reserved == 0


def test_a_post_already_on_its_way_into_revoked_slots_is_still_queued(router, a, c):
    fill_around_as_slots(a, c)
    ok(c.send("q", 9, cap=5), b"C")
    for n in (4, 5):  # A had sent both before it read the RECALL
        assert replies(a.post("q", n), b"A") == []
    assert len(router.inboxes["q"].queue) == 6  # one above the capacity, but nothing lost
    error(a.post("q", 6), b"A", "no-reservation")  # a POST past its slots is refused as ever


def test_a_send_request_never_takes_a_revoked_slot(router, a, c):
    fill_around_as_slots(a, c)
    ok(c.send("q", 9, cap=5), b"C")
    ok(c.send("q", 10, cap=5), b"C")
    error(a.send("q", 4, cap=5), b"A", "full")  # a request can be refused: no loss
    assert len(router.inboxes["q"].queue) == 5 and router.peers[b"A"].revoked == {"q": 2}


def test_the_answer_to_the_recall_ends_what_revoked_slots_still_take(router, a, c):
    fill_around_as_slots(a, c)
    ok(c.send("q", 9, cap=5), b"C")
    assert replies(a.post("q", 4), b"A") == []
    assert a.release(("q", 0)) == []  # A read the RECALL: it will not post there any more
    error(a.post("q", 5), b"A", "no-reservation")
    assert len(router.inboxes["q"].queue) == 5


def test_slots_granted_after_a_revocation_are_the_holders_own_again(router, a, c):
    fill_around_as_slots(a, c)
    ok(c.send("q", 9, cap=5, now=1.0), b"C")  # revokes A's 2
    assert ok(a.reserve("q", 4, cap=20), b"A")["grant"] == 4  # A's capacity: (20 - 4) // 2 = 8
    for n in range(6):  # 4 granted slots, then the 2 revoked ones: all queued
        assert replies(a.post("q", n), b"A") == []
    error(a.post("q", 6), b"A", "no-reservation")
    assert router.peers[b"A"].reserved == {} and router.peers[b"A"].revoked == {}


def test_a_sender_leaving_gives_its_revoked_slots_back_with_everything_else(router, a, c):
    fill_around_as_slots(a, c)
    ok(c.send("q", 9, cap=5), b"C")
    assert a.bye() == []
    assert b"A" not in router.peers and router.inboxes["q"].depth() == 4
    router.check()


def test_a_full_channel_grants_no_slots_and_it_is_not_an_error(router, a):
    for n in range(3):
        ok(a.send("q", n, cap=3), b"A")
    assert ok(a.reserve("q", 8, cap=3), b"A")["grant"] == 0


def test_release_gives_unused_slots_back(router, a):
    ok(a.reserve("q", 4, cap=100), b"A")
    a.release(("q", 4))
    assert "q" not in router.inboxes  # nothing queued, reserved or credited: gone


def test_a_leaving_peer_gives_its_reserved_slots_back(router, a, c):
    ok(a.reserve("q", 2, cap=4), b"A")
    ok(c.send("q", 0, cap=4), b"C")
    a.bye()
    assert router.inboxes["q"].depth() == 1


def test_group_add_again_refreshes_the_membership_expiry(router, b):
    b.group_add("room", B_SPECIFIC, gexp=10.0, now=0.0)
    b.group_add("room", B_SPECIFIC, gexp=10.0, now=8.0)
    assert router.groups.is_member("room", B_SPECIFIC, 15.0)
    assert not router.groups.is_member("room", B_SPECIFIC, 18.0)


def test_group_sync_of_a_member_republishes_the_marker_with_the_time_left(b):
    b.group_add("room", B_SPECIFIC, gexp=10.0, now=0.0)
    outs = b.group_sync("room", B_SPECIFIC, now=4.0)
    ok(outs, b"B")
    [(topic, header, _)] = published(outs)
    assert topic == b"room\x00"
    assert header == {"op": "add", "ch": B_SPECIFIC, "ttl": 6_000, "seq": 0}  # ms, like every ttl


def test_group_sync_of_a_non_member_answers_not_member(router, b):
    outs = b.group_sync("room", B_SPECIFIC)
    header = error(outs, b"B", "not-member")
    assert header["id"] == b.last_id
    assert header["name"] == B_SPECIFIC
    assert published(outs) == []
    assert router.strikes.get(b"B", 0) == 0


def test_group_discard_of_a_specific_member_publishes_discard(router, a, b):
    b.group_add("room", B_SPECIFIC)
    outs = b.group_discard("room", B_SPECIFIC)
    ok(outs, b"B")
    assert published(outs) == [(b"room\x00", {"op": "discard", "ch": B_SPECIFIC}, [])]
    assert published(a.group_send("room")) == []


def test_group_discard_of_a_non_member_is_ok_and_publishes_nothing(b):
    outs = b.group_discard("room", B_SPECIFIC)
    ok(outs, b"B")
    assert published(outs) == []


def test_group_discard_of_a_normal_member_stops_its_copies(router, a):
    a.group_add("room", "inbox")
    outs = a.group_discard("room", "inbox")
    assert published(outs) == []
    assert ok(a.group_send("room"), b"A")["queued"] == 0


def test_memberships_expire_after_group_expiry(router, a):
    a.group_add("room", "inbox", gexp=10.0, now=0.0)
    a.group_add("room", A_SPECIFIC, gexp=10.0, now=0.0)
    assert ok(a.group_send("room", now=9.0), b"A")["queued"] == 1
    outs = a.group_send("room", now=10.0)
    assert ok(outs, b"A")["queued"] == 0
    assert published(outs) == []
    error(a.group_sync("room", A_SPECIFIC, now=10.0), b"A", "not-member")


def test_tick_sweeps_expired_memberships(router, a):
    a.group_add("room", "inbox", gexp=10.0, now=0.0)
    a.group_add("other", "inbox", gexp=100.0, now=0.0)
    router.tick(11.0)
    assert router.groups.sizes() == {"other": 1}
    router.tick(111.0 + GROUP_SWEEP_SECONDS)
    assert router.groups.sizes() == {}


def test_flush_empties_inboxes_and_groups_and_publishes_on_the_control_topic(router, a, b):
    a.send("tasks", 0, cap=1)
    a.send(f"specific.{C_ID}!x", 1)
    a.group_add("room", "tasks")
    a.group_add("room", B_SPECIFIC)
    outs = a.flush()
    ok(outs, b"A")
    assert published(outs) == [(CONTROL_TOPIC, {"op": "flush"}, [])]
    assert router.inboxes == {}
    assert len(router.groups) == 0
    ok(a.send("tasks", 2, cap=1), b"A")


def test_flush_keeps_in_flight_counts_so_later_acks_still_balance(router, a, b):
    a.send("tasks", 0)
    b.credit("tasks", 1)
    a.flush()
    b.ack(("tasks", 1))
    assert router.inboxes["tasks"].inflight == 0


# -- peers leaving --------------------------------------------------------------------------


def test_bye_drops_the_peers_specific_channels_from_every_group(router, a, b):
    for group in ("room1", "room2"):
        b.group_add(group, B_SPECIFIC)
        a.group_add(group, A_SPECIFIC)
    a.group_add("room1", "inbox")
    assert b.bye() == []
    assert router.groups.sizes() == {"room1": 2, "room2": 1}
    assert not router.groups.is_member("room2", B_SPECIFIC, 0.0)
    assert b"B" not in router.peers and B_ID not in router.by_client


def test_bye_puts_the_peers_unacknowledged_messages_back_in_order(router, a, b, c):
    a.send("tasks", 0, cap=3)
    a.send("tasks", 1, cap=3)
    b.credit("tasks", 2)
    a.send("tasks", 2, cap=3)
    error(a.send("tasks", 9, cap=3), b"A", "full")
    assert received(c.credit("tasks", 5), b"C") == [2]
    b.bye()
    inbox = router.inboxes["tasks"]
    assert inbox.inflight == 1  # C's
    assert [number(body) for body, _ in inbox.queue] == [0, 1]
    assert received(router.tick(1.0), b"C") == [0, 1]


def test_acknowledged_messages_are_not_put_back_when_the_peer_leaves(router, a, b, c):
    a.send("tasks", 0)
    a.send("tasks", 1)
    b.credit("tasks", 2)
    b.ack(("tasks", 1))
    b.bye()
    assert received(c.credit("tasks", 5), b"C") == [1]


def test_bye_drops_what_waits_on_the_peers_specific_channels(router, a, b):
    router.peers[b"B"].blocked_until = 100.0  # its pushes stall, so messages wait queued
    a.send(B_SPECIFIC, 0)
    assert len(router.inboxes[B_SPECIFIC].queue) == 1
    b.bye()
    assert router.inboxes == {}
    assert router.stats["dropped_owner_gone"] == 1 and router.stats["expired"] == 0


def test_a_peer_that_said_bye_must_say_hello_again(router, b):
    b.bye()
    error(b.ping(), b"B", "no-hello")


def test_peer_gone_acts_like_bye(router, a, b):
    b.group_add("room", B_SPECIFIC)
    a.send(B_SPECIFIC, 0)
    a.send("tasks", 1)
    b.credit("tasks", 1)
    router.peer_gone(b"B")
    router.peer_gone(b"nobody")  # an unknown peer is not an error
    assert len(router.groups) == 0
    assert list(router.inboxes) == ["tasks"]  # B's specific channel is gone; its task went back
    assert [number(body) for body, _ in router.inboxes["tasks"].queue] == [1]
    assert b"B" not in router.peers


def test_unsent_requeues_at_the_front_and_retries_after_a_pause(router, a, b):
    b.credit("tasks", 1)
    outs = a.send("tasks", 0)
    a.send("tasks", 1)
    router.unsent(b"B", push_of(outs, b"B"), 1.0, gone=False)
    assert [number(item[0]) for item in router.inboxes["tasks"].queue] == [0, 1]
    assert router.inboxes["tasks"].inflight == 0
    assert router.stats["delivered"] == 0
    assert pushes(router.tick(1.01), b"B") == []  # the peer is still paused
    assert received(router.tick(1.1), b"B") == [0]
    assert router.tick(1.2) == []  # one credit, one message


def test_unsent_of_a_specific_push_requeues_and_retries(router, a, b):
    outs = a.send(B_SPECIFIC, 0)
    router.unsent(b"B", push_of(outs, b"B"), 0.0, gone=False)
    assert received(a.send(B_SPECIFIC, 1, now=0.01), b"B") == []
    assert received(router.tick(0.5), b"B") == [0, 1]


def test_unsent_to_a_vanished_peer_forgets_it_and_hands_the_messages_to_another(router, a, b, c):
    b.credit("tasks", 5)
    c.credit("tasks", 5)
    outs = a.send("tasks", 0)
    router.unsent(b"B", push_of(outs, b"B"), 0.0, gone=True)
    assert b"B" not in router.peers
    assert received(router.tick(0.1), b"C") == [0]


def test_unsent_after_the_peer_was_forgotten_only_requeues(router, a, b):
    b.credit("tasks", 1)
    outs = a.send("tasks", 0)
    router.peer_gone(b"B")
    router.unsent(b"B", push_of(outs, b"B"), 0.0, gone=True)
    assert router.inboxes["tasks"].inflight == 0
    assert len(router.inboxes["tasks"].queue) == 1


# -- operator ceilings and bad bodies -------------------------------------------------------

LIMITS = Limits(max_capacity=100, max_expiry=60.0, max_message_size=64, max_group_expiry=100.0)


@pytest.fixture
def limited() -> FakeClient:
    client = FakeClient(Router(LIMITS), b"A", A_ID)
    ok(client.hello(), b"A")
    return client


@pytest.mark.parametrize("verb", ["send", "group_send"])
def test_capacity_above_max_capacity_is_refused_with_limit(limited, verb):
    outs = getattr(limited, verb)("tasks", cap=101)
    header = error(outs, b"A", "limit")
    assert (header["name"], header["limit"]) == ("capacity", 100)
    assert ok(getattr(limited, verb)("tasks", cap=100), b"A")


def test_channel_capacity_above_max_capacity_is_refused_with_limit(limited):
    limited.group_add("room", "inbox")
    header = error(limited.group_send("room", cap=5, ccap=(("^in", 101),)), limited.rid, "limit")
    assert (header["name"], header["limit"]) == ("capacity", 100)
    assert limited.router.inboxes == {}


@pytest.mark.parametrize("verb", ["send", "group_send"])
def test_expiry_above_max_expiry_is_refused_with_limit(limited, verb):
    header = error(getattr(limited, verb)("tasks", exp=60.5), b"A", "limit")
    assert (header["name"], header["limit"]) == ("expiry", 60.0)


@pytest.mark.parametrize("verb", ["send", "group_send"])
def test_a_body_above_max_message_size_is_refused_as_too_large(limited, verb):
    payload = msgpack.packb({"type": "x", "pad": "y" * 100})
    header = error(getattr(limited, verb)("tasks", payload=payload), b"A", "too-large")
    assert header["size"] == len(payload)
    assert header["limit"] == 64
    assert limited.router.stats["too_large"] == 1
    assert limited.router.inboxes == {}
    assert limited.router.strikes.get(b"A", 0) == 0


def test_a_body_of_exactly_max_message_size_is_accepted(limited):
    sizes = {len(p): p for k in range(64) if (p := msgpack.packb({"type": "x", "pad": "y" * k}))}
    payload = sizes[64]
    ok(limited.send("tasks", payload=payload), b"A")


def test_group_expiry_above_max_group_expiry_is_refused_with_limit(limited):
    header = error(limited.group_add("room", A_SPECIFIC, gexp=101.0), b"A", "limit")
    assert (header["name"], header["limit"]) == ("group_expiry", 100.0)
    assert len(limited.router.groups) == 0


@pytest.mark.parametrize("payload", [b"", msgpack.packb([1, 2]), msgpack.packb("text"), b"\xc1"])
@pytest.mark.parametrize("verb", ["send", "group_send"])
def test_a_body_that_is_not_a_map_is_refused_as_bad_body(router, a, payload, verb):
    header = error(getattr(a, verb)("tasks", payload=payload), b"A", "bad-body")
    assert header["id"] == a.last_id
    assert router.inboxes == {}


# -- bad peers ------------------------------------------------------------------------------

STRICT = Limits(max_bad_frames=3, ban_seconds=10.0)
GARBAGE = [b"\x01SEND", b"\xc1"]


def test_a_peer_is_banned_after_more_than_max_bad_frames_bad_messages():
    router = Router(STRICT)
    for _ in range(3):
        error(router.handle(b"X", GARBAGE, 0.0), b"X", "bad-header")
    header = error(router.handle(b"X", GARBAGE, 0.0), b"X", "banned")
    assert header["limit"] == 3
    assert router.stats["bad_frames"] == 4


def test_a_banned_peer_is_ignored_until_ban_seconds_pass():
    router = Router(STRICT)
    peer = FakeClient(router, b"X", A_ID)
    for _ in range(4):
        peer.raw(GARBAGE, now=0.0)
    assert peer.hello(now=1.0) == []
    assert peer.raw(GARBAGE, now=9.99) == []
    assert router.stats["bad_frames"] == 4
    ok(peer.hello(now=10.0), b"X")
    assert b"X" not in router.banned


def test_a_banned_peer_is_forgotten_with_its_memberships():
    router = Router(STRICT)
    peer = FakeClient(router, b"X", A_ID)
    peer.hello()
    peer.group_add("room", A_SPECIFIC)
    for _ in range(4):
        peer.raw(GARBAGE)
    assert b"X" not in router.peers
    assert A_ID not in router.by_client
    assert len(router.groups) == 0


def test_a_bad_peer_never_disturbs_another_peers_state():
    router = Router(STRICT)
    good = FakeClient(router, b"G", B_ID)
    bad = FakeClient(router, b"X", A_ID)
    good.hello()
    good.group_add("room", B_SPECIFIC)
    good.send("tasks", 0)
    good.credit("tasks", 1)
    bad.hello()
    outs = []
    for attempt in (
        GARBAGE, wire.Credit(B_SPECIFIC, 1).frames(), wire.Ack(((B_SPECIFIC, 1), ("tasks", 1))).frames(),
        wire.Hello(1, B_ID).frames(), GARBAGE, GARBAGE, GARBAGE, GARBAGE,
    ):
        outs += bad.raw(attempt)
    assert all(out.dest == b"X" for out in outs)
    assert b"X" in router.banned
    assert router.peers[b"G"].inflight == {"tasks": 1}
    assert router.by_client[B_ID] == b"G"
    assert router.groups.is_member("room", B_SPECIFIC, 0.0)
    assert router.strikes.get(b"G", 0) == 0
    assert received(good.ack(("tasks", 1)) + good.send("tasks", 1), b"G") == [1]


def test_a_bad_body_counts_as_a_bad_frame_but_a_full_channel_does_not(router, a):
    a.send("tasks", 0, cap=1)
    a.send("tasks", 1, cap=1)
    assert router.strikes.get(b"A", 0) == 0
    a.send("tasks", payload=b"\x90")
    assert router.strikes[b"A"] == 1
    assert router.stats["bad_frames"] == 1


def test_a_hello_between_bursts_of_bad_frames_does_not_dodge_the_ban():
    router = Router(STRICT)
    peer = FakeClient(router, b"X", A_ID)
    for _ in range(3):
        peer.raw(GARBAGE)
    ok(peer.hello(), b"X")
    error(peer.raw(GARBAGE), b"X", "banned")  # the 4th bad frame, HELLO notwithstanding
    assert b"X" in router.banned


def test_bad_frames_are_counted_per_peer():
    router = Router(STRICT)
    for rid in (b"X", b"Y", b"Z"):
        for _ in range(3):
            router.handle(rid, GARBAGE, 0.0)
    assert router.banned == {}
    assert router.strikes == {b"X": 3, b"Y": 3, b"Z": 3}


# -- memory ceiling and stats ---------------------------------------------------------------


def test_sends_past_max_memory_are_refused_with_the_limit(a):
    router = Router(Limits(max_memory=1000))
    peer = FakeClient(router, b"M", A_ID)
    ok(peer.hello(), b"M")
    accepted = 0
    while True:
        outs = peer.send("q", accepted)
        if replies(outs, b"M")[0][0] == "ERROR":
            break
        accepted += 1
    header = error(outs, b"M", "memory")
    assert header["limit"] == 1000
    assert router.delivery.bytes_held <= 1000
    assert accepted == len(router.inboxes["q"].queue) > 0
    assert router.stats["memory_refused"] == 1


def test_bytes_held_returns_to_zero_when_messages_leave(router, a, b):
    for n in range(5):
        ok(a.send("q", n), b"A")
    assert router.delivery.bytes_held > 0
    b.credit("q", 10)
    assert router.delivery.bytes_held > 0  # pushed, but kept until acknowledged
    b.ack(("q", 5))
    assert router.delivery.bytes_held == 0
    for n in range(3):
        ok(a.send("e", n, exp=1.0), b"A")
    router.tick(2.0)
    assert router.delivery.bytes_held == 0


def test_stats_reports_clients_deepest_channels_groups_and_counters(router, a, b):
    for n in range(3):
        ok(a.send("deep", n), b"A")
    ok(a.send("shallow", 0), b"A")
    a.group_add("room", "deep")
    header = ok(a.raw(wire.Stats(99, 1).frames(), 5.0), b"A")
    assert header["clients"] == 2
    assert header["channels"] == 2
    assert header["queued"] == 4
    assert header["top_channels"] == [["deep", 3, 0, 0]]
    assert header["groups"] == 1 and header["top_groups"] == [["room", 1]]
    assert header["counters"]["received"] == 4
    assert header["uptime"] == 5.0
    assert header["bytes_held"] == router.delivery.bytes_held > 0


# -- heartbeats -----------------------------------------------------------------------------


def test_heartbeat_beats_every_peer_with_the_broker_instance(a, b):
    router = Router(instance="feedbead")
    x = FakeClient(router, b"X", A_ID)
    ok(x.hello(), b"X")
    assert replies(router.heartbeat(1.0), b"X") == [("HB", {"instance": "feedbead"})]


def test_a_peer_that_promised_heartbeats_and_fell_silent_is_forgotten():
    router = Router()
    x = FakeClient(router, b"X", A_ID)
    ok(x.raw(wire.Hello(1, A_ID, 1.0).frames(), 0.0), b"X")
    x.group_add("room", f"specific.{A_ID}!q", now=0.5)
    x.raw(wire.Heartbeat().frames(), 2.0)
    router.heartbeat(4.9)  # 2.9 s of silence: still alive
    assert b"X" in router.peers
    router.heartbeat(5.1)
    assert b"X" not in router.peers
    assert len(router.groups) == 0


def test_a_peer_without_heartbeats_is_never_forgotten_for_silence(router, a):
    router.heartbeat(10_000.0)
    assert b"A" in router.peers


def test_hello_says_whether_the_broker_still_knew_the_client(router):
    x = FakeClient(router, b"X", A_ID)
    assert ok(x.hello(), b"X")["resumed"] is False
    assert ok(x.hello(), b"X")["resumed"] is True


def test_bad_frames_are_counted_per_window_not_per_lifetime():
    from broker.routing import STRIKE_WINDOW

    router = Router(STRICT)
    peer = FakeClient(router, b"X", A_ID)
    for _ in range(3):
        peer.raw(GARBAGE, now=0.0)
    for _ in range(3):
        error(peer.raw(GARBAGE, now=STRIKE_WINDOW + 1.0), b"X", "bad-header")
    assert router.banned == {}


def test_an_owner_connecting_is_told_to_join_the_groups_its_channels_were_added_to(router, a):
    a.group_add("room", B_SPECIFIC, gexp=30.0, now=0.0)  # B is not connected yet
    b = FakeClient(router, b"B", B_ID)
    outs = b.hello(now=10.0)
    assert ("JOIN", {"g": "room", "ch": B_SPECIFIC, "gexp": 20.0}) in replies(outs, b"B")


def test_group_messages_are_numbered_per_group_and_markers_carry_the_last_number(router, a):
    a.group_add("room", A_SPECIFIC)
    numbers = [published(a.group_send("room", n))[0][1]["seq"] for n in range(3)]
    assert numbers == [1, 2, 3]
    [(_, marker, _)] = published(a.group_sync("room", A_SPECIFIC))
    assert marker["seq"] == 3


def test_a_hello_with_reset_puts_back_what_the_lost_connection_carried(router, a, b):
    for n in range(3):
        ok(a.send("tasks", n), b"A")
    received(b.credit("tasks", 10), b"B")  # pushed 0, 1, 2 on a connection that then drops
    b.ack(("tasks", 1))  # (0 was taken and acknowledged)
    hello = wire.Hello(99, B_ID, 0.0, True)
    outs = b.raw(hello.frames())
    assert ok(outs, b"B")["resumed"] is True
    assert router.peers[b"B"].credits == {} and router.inboxes["tasks"].inflight == 0
    assert received(b.credit("tasks", 10), b"B") == [1, 2]  # pushed again, in order


def test_a_group_post_delivers_like_a_group_send_without_a_reply(router, a, b):
    a.group_add("room", "inbox")
    a.group_add("room", B_SPECIFIC)
    outs = a.raw(wire.GroupPost(0, "room", 100, 60.0, (), body(7)).frames())
    assert replies(outs, b"A") == []
    assert len(published(outs)) == 1
    assert [number(item[0]) for item in router.inboxes["inbox"].queue] == [7]


def test_a_refused_group_post_answers_an_error_without_an_id(router, a):
    outs = a.raw(wire.GroupPost(0, "room", 10**9, 60.0, (), body(1)).frames())
    assert error(outs, b"A", "limit")["id"] is None


def test_bye_with_keep_leaves_the_client_ids_channels_and_memberships_for_its_next_connection():
    """A channel layer's holder of its id closes with its loop; the next loop's connection
    says HELLO with the same id and finds what was pushed and not acknowledged, what was
    queued since, and its memberships."""
    router = Router()
    first = FakeClient(router, b"r1", A_ID)
    first.hello()
    sender = FakeClient(router, b"s", B_ID)
    sender.hello()
    first.group_add("room", A_SPECIFIC)
    first.joined("room", A_SPECIFIC)
    sender.send(A_SPECIFIC, 1)  # pushed to the first connection, never acknowledged
    first.raw(wire.Bye(keep=True).frames())
    assert b"r1" not in router.peers and router.stats["dropped_owner_gone"] == 0
    sender.send(A_SPECIFIC, 2)  # queued while nobody holds the id
    assert router.groups.members("room", 0.0) == [A_SPECIFIC]
    second = FakeClient(router, b"r2", A_ID)
    outs = second.hello()
    pushed = [number(body) for out in outs if out.dest == b"r2" and out.frames[0] == wire.MSG
              for body in out.frames[2:]]
    assert pushed == [1, 2]
    assert any(out.frames[0] == wire.JOIN for out in outs if out.dest == b"r2")
    router.check()


def test_a_plain_bye_still_drops_the_channels_of_a_client_that_is_gone():
    router = Router()
    first = FakeClient(router, b"r1", A_ID)
    first.hello()
    sender = FakeClient(router, b"s", B_ID)
    sender.hello()
    sender.send(A_SPECIFIC, 1)
    first.bye()
    assert router.stats["dropped_owner_gone"] == 1
    router.check()


def test_a_connection_whose_client_id_outlives_it_keeps_its_channels_however_it_goes():
    """HELLO keep (a channel layer's holder of its id): a connection that vanishes before its
    BYE is read, or falls silent, leaves its channels for the id's next connection."""
    router = Router()
    holder = FakeClient(router, b"r1", A_ID)
    holder.raw(wire.Hello(1, A_ID, 1.0, keep=True).frames())
    sender = FakeClient(router, b"s", B_ID)
    sender.hello()
    sender.send(A_SPECIFIC, 1)  # pushed to the holder, never acknowledged
    router.peer_gone(b"r1")  # (its connection vanished: the broker could not send to it)
    assert router.stats["dropped_owner_gone"] == 0
    again = FakeClient(router, b"r2", A_ID)
    outs = again.raw(wire.Hello(1, A_ID, 1.0, keep=True).frames(), 1.0)
    assert [number(b) for o in outs if o.dest == b"r2" and o.frames[0] == wire.MSG for b in o.frames[2:]] == [1]
    router.heartbeat(100.0)  # (silent for longer than its heartbeats allow: forgotten, still kept)
    assert b"r2" not in router.peers and router.stats["dropped_owner_gone"] == 0
    router.check()
