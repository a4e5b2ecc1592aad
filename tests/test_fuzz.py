"""Fuzzing: random and mutated frames against the decoder, a pure Router and a running broker.

The frames are built from a valid message of every verb in ``wire.COMMANDS`` and then mutated:
fields set to random msgpack values (wrong types, huge ints, NaN, nested lists and maps, a
nesting 1,000 levels deep), fields deleted, the header replaced, bytes flipped, frames cut,
dropped or added, verbs changed; and some are plain random bytes. Three properties:

1. ``wire.decode`` returns a Command or raises ProtocolError (with a code the protocol knows and
   an ERROR the broker can pack), whatever the frames; a command it returns re-encodes to itself.
2. A pure ``Router`` driven by four peers with such frames, clock steps, ticks, heartbeats,
   sends that fail (socket full, peer vanished) and vanished peers never raises, always returns
   a list of well-formed ``Out`` and keeps its books after every step (``check_books``); once
   every peer has left and every expiry has passed it holds nothing at all.
3. A running broker answers every bad frame of a raw DEALER with one ERROR of the expected code,
   bans it on the frame past its budget and is silent to it after that; a peer that said HELLO
   and then sends anything gets only well-formed replies; a well-behaved Client beside them
   keeps sending, receiving and group-sending, and the broker thread stays alive.

Every example is derived from a fixed seed (``derandomize``) with no example database, so CI runs
the same examples every time; ``max_examples`` bounds the file to well under a minute.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections import Counter

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config import BrokerConfig
from broker.delivery import ITEM_OVERHEAD, Out
from broker.protocol import wire
from broker.protocol.errors import ERROR_CODES, ProtocolError
from broker.protocol.fields import Command
from broker.protocol.names import CONTROL_TOPIC, group_topic, owner_of
from broker.routing import PUB, Limits, Router
from broker.server import start_in_thread
from clients import Client
from clients.core import ClientCore

# Timing is bounded by max_examples and the pytest timeouts, not by a per-example deadline, which
# a busy two-core CI machine would turn into flaky failures.
FUZZ = settings(
    derandomize=True, database=None, deadline=None, max_examples=600,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CLIENT_IDS = ("aaaa0000", "bbbb1111", "cccc2222", "dddd3333")
CHANNELS = ("jobs", "mail.box", "specific.aaaa0000!x", "specific.bbbb1111!", "dddd3333!z", "specific.eeee4444!x")
GROUPS = ("room", "room1", "hall")
PATTERNS = (
    "jobs", ".*", r"mail\..*", r"(?s:specific\..*)\Z", "(", "a{4294967296}", "[z-a]", "(?P<x>a)(?P=y)",
    "(?a)(?u)a", "x" * 201,
)
KEYS = ("id", "client", "hb", "ch", "cap", "exp", "want", "g", "gexp", "ccap", "n", "acks", "slots", "top")
DEFAULT_RECURSION_LIMIT = 1000
HUGE = (2**63 - 1, 2**63, 2**64 - 1, -(2**63), -1, 0, 10**9 + 1, 1e308, -0.0, math.nan, math.inf, -math.inf, 1e-300)

# -- valid messages of every verb -----------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Draw from one of ``(weight, strategy)`` with those weights (``st.one_of`` weighs its
    distinct branches alike)."""
    options = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(options) - 1).flatmap(options.__getitem__)


ids = st.one_of(st.integers(0, 50), st.just(2**63 - 1))
caps = weighted((6, st.integers(1, 6)), (1, st.sampled_from([50, 51, 100_000, 2**63 - 1])))
seconds = weighted((6, st.sampled_from([0.05, 0.5, 1, 2.5, 30.0])), (1, st.sampled_from([100, 101, 1e9])))
channels = st.sampled_from(CHANNELS)
groups = st.sampled_from(GROUPS)
map_bodies = st.builds(lambda n, pad: msgpack.packb({"type": "fuzz", "n": n, "pad": pad}), st.integers(0, 99),
                       st.binary(max_size=40))
valid_bodies = weighted((6, map_bodies), (1, st.binary(max_size=6)))  # (mostly no map: bad-body)


def as_the_broker(function, *args):
    """Call ``function`` under Python's default recursion limit, as the broker's thread runs it
    (hypothesis raises the limit while it runs a test, which would hide a RecursionError)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(DEFAULT_RECURSION_LIMIT)
    try:
        return function(*args)
    finally:
        sys.setrecursionlimit(limit)


def _message(header, bodies=st.just([])):
    return st.tuples(header, bodies)


one_body = st.lists(valid_bodies, min_size=1, max_size=1)
VALID = {
    "HELLO": _message(st.fixed_dictionaries(
        {"id": ids, "client": st.sampled_from(CLIENT_IDS)}, optional={"hb": st.sampled_from([0, 0.5, 1, 2.0])})),
    "SEND": _message(st.fixed_dictionaries(
        {"id": ids, "ch": channels, "cap": caps, "exp": seconds}, optional={"want": st.integers(0, 8)}), one_body),
    "RESERVE": _message(st.fixed_dictionaries({"id": ids, "ch": channels, "cap": caps, "want": st.integers(1, 8)})),
    "POST": _message(st.fixed_dictionaries(
        {"ch": channels, "exp": seconds}, optional={"acks": st.dictionaries(channels, st.integers(1, 5), max_size=2)}),
        st.lists(valid_bodies, min_size=1, max_size=3)),
    "RELEASE": _message(st.fixed_dictionaries({"slots": st.dictionaries(channels, st.integers(0, 5), max_size=3)})),
    "GSEND": _message(st.fixed_dictionaries(
        {"id": ids, "g": groups, "cap": caps, "exp": seconds},
        optional={"ccap": st.lists(st.tuples(st.sampled_from(PATTERNS), caps).map(list), max_size=3)}), one_body),
    "GPOST": _message(st.fixed_dictionaries(
        {"g": groups, "cap": caps, "exp": seconds},
        optional={"ccap": st.lists(st.tuples(st.sampled_from(PATTERNS), caps).map(list), max_size=3)}), one_body),
    "GADD": _message(st.fixed_dictionaries({"id": ids, "g": groups, "ch": channels, "gexp": seconds})),
    "GSYNC": _message(st.fixed_dictionaries({"id": ids, "g": groups, "ch": channels})),
    "GDISCARD": _message(st.fixed_dictionaries({"id": ids, "g": groups, "ch": channels})),
    "JOINED": _message(st.fixed_dictionaries({"g": groups, "ch": channels})),
    "FLUSH": _message(st.fixed_dictionaries({"id": ids})),
    "PING": _message(st.fixed_dictionaries({"id": ids})),
    "STATS": _message(st.fixed_dictionaries({"id": ids}, optional={"top": st.integers(1, 1000)})),
    "CREDIT": _message(st.fixed_dictionaries({"ch": channels, "n": st.integers(1, 10)})),
    "ACK": _message(st.fixed_dictionaries({"acks": st.dictionaries(channels, st.integers(1, 5), max_size=3)})),
    "BYE": _message(st.just({})),
    "HB": _message(st.just({})),
}
VERBS = sorted(VALID)
# Verbs that move messages come up more often, so that examples reach deep states.
BUSY_VERBS = VERBS + ["SEND"] * 8 + ["CREDIT", "POST", "RESERVE", "GSEND", "GADD"] * 3
# Well-behaved traffic keeps its identity: no HELLO with another client id, BYE rarely.
TRAFFIC_VERBS = [verb for verb in BUSY_VERBS if verb not in ("HELLO", "BYE", "FLUSH")] * 4 + ["BYE", "FLUSH"]

# -- mutations ------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.binary(max_size=12),
    st.sampled_from(CHANNELS + GROUPS + CLIENT_IDS + PATTERNS),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS + CHANNELS), st.text(max_size=6)), inner, max_size=4),
    ),
    max_leaves=10,
)


def _packed(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _deep(depth: int, kind: str) -> bytes:
    """A msgpack value nested ``depth`` levels deep (built by hand: packb refuses deep nesting)."""
    return (b"\x91" if kind == "list" else b"\x81\xa1k") * depth + b"\x01"


def _pack_map(items: list[tuple[bytes, bytes]]) -> bytes:
    """A msgpack map from already packed keys and values (map16 header)."""
    return b"\xde" + len(items).to_bytes(2, "big") + b"".join(k + v for k, v in items)


header_mutations = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), values),
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.sampled_from(HUGE)),
    st.tuples(st.just("del"), st.sampled_from(KEYS)),
    st.tuples(st.just("intkey"), st.integers(-5, 5), values),
    st.tuples(st.just("own"), st.integers(0, 5), values),  # a field the verb reads
    st.tuples(st.just("own"), st.integers(0, 5), st.sampled_from(HUGE)),
    st.tuples(st.just("deep"), st.integers(0, 5), st.sampled_from([2, 50, 990, 1000, 1010, 1023, 1030]),
              st.sampled_from(["list", "map"])),
    st.tuples(st.just("replace"), values),
)
frame_mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 5), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 5), st.integers(0, 64)),
    st.tuples(st.just("drop"), st.integers(0, 5)),
    st.tuples(st.just("extra"), st.binary(max_size=40)),
    st.tuples(st.just("verb"), st.one_of(
        st.binary(max_size=10), st.sampled_from([b"", b"\x01", b"\x02SEND", b"\x01send", b"\x01PING\x00", b"\x01OK"]),
        st.sampled_from(VERBS).map(wire.verb_frame))),
)


@st.composite
def messages(draw, mutate: bool = True, verbs=BUSY_VERBS) -> list[bytes]:
    """The frames of one message: valid for a drawn verb, then (``mutate``) mutated."""
    verb = draw(st.sampled_from(verbs))
    header, bodies = draw(VALID[verb])
    items = [(_packed(key), _packed(value)) for key, value in header.items()]
    replaced = None
    for op, *args in draw(st.lists(header_mutations, max_size=3)) if mutate else ():
        if op == "set":
            items = [i for i in items if i[0] != _packed(args[0])] + [(_packed(args[0]), _packed(args[1]))]
        elif op == "del":
            items = [i for i in items if i[0] != _packed(args[0])]
        elif op == "intkey":
            items.append((_packed(args[0]), _packed(args[1])))
        elif op == "own" and items:
            index = args[0] % len(items)
            items[index] = (items[index][0], _packed(args[1]))
        elif op == "deep" and items:
            index = args[0] % len(items)
            items[index] = (items[index][0], _deep(args[1], args[2]))
        else:
            replaced = _packed(args[0])
    frames = [wire.verb_frame(verb), replaced if replaced is not None else _pack_map(items), *bodies]
    for op, *args in draw(st.lists(frame_mutations, max_size=3)) if mutate else ():
        if op == "flip" and frames:
            frame = bytearray(frames[args[0] % len(frames)])
            if frame:
                frame[args[1] % len(frame)] ^= args[2]
                frames[args[0] % len(frames)] = bytes(frame)
        elif op == "cut" and frames:
            index = args[0] % len(frames)
            frames[index] = frames[index][: args[1]]
        elif op == "drop" and len(frames) > 1:
            del frames[args[0] % len(frames)]
        elif op == "extra":
            frames.append(args[0])
        elif op == "verb" and frames:
            frames[0] = args[0]
    return frames


raw_frames = st.lists(st.binary(max_size=30), min_size=1, max_size=4)
any_frames = weighted((7, messages(mutate=False)), (2, messages()), (1, raw_frames))


def test_every_verb_of_the_wire_protocol_is_fuzzed():
    assert {verb[1:].decode() for verb in wire.COMMANDS} == set(VALID)


@FUZZ
@given(messages(mutate=False))
def test_the_unmutated_messages_are_valid_so_mutations_start_from_real_frames(frames):
    header = msgpack.unpackb(frames[1])
    if frames[2:] and not wire.body_is_map(frames[2]):
        return  # (a body that is no map is the router's refusal, not the decoder's)
    if "ccap" in header and any(len(p) > 200 for p, _ in header["ccap"]):
        return  # (a pattern over 200 characters is a decoder refusal by design)
    assert isinstance(wire.decode(frames), Command)


@FUZZ
@given(st.one_of(messages(), raw_frames))
def test_decode_returns_a_command_or_raises_protocol_error_and_nothing_else(frames):
    try:
        command = as_the_broker(wire.decode, frames)
    except ProtocolError as err:
        assert err.code in ERROR_CODES
        assert err.request_id is None or type(err.request_id) is int
        reply = wire.error(err.request_id, err)  # the broker must be able to send it
        assert msgpack.unpackb(reply[1], raw=False)["code"] == err.code
        assert len(reply[1]) < 4096, "an ERROR echoes at most a bounded part of what it refuses"
        return
    assert isinstance(command, Command)
    assert wire.decode(command.frames()) == command


# -- a pure Router driven by several peers ----------------------------------------------------

LIMITS = Limits(
    max_message_size=64, max_capacity=50, max_expiry=100.0, max_group_expiry=200.0,
    max_bad_frames=20, ban_seconds=3.0, max_memory=3000, heartbeat=1.0,
)
RIDS = (b"r0", b"r1", b"r2", b"r3")  # (random HELLOs may claim another's client id: id-taken)
REPLY_VERBS = {wire.OK, wire.ERROR, wire.MSG, wire.JOIN, wire.RECALL, wire.HB}
peer_index = st.integers(0, len(RIDS) - 1)
failure = weighted((15, st.none()), (1, st.tuples(st.sampled_from(["again", "gone"]), peer_index)))
valid_traffic = messages(mutate=False, verbs=TRAFFIC_VERBS)


def router_steps(frames, reconnect) -> st.SearchStrategy:
    """Steps for a Harness: messages (``frames``, first saying HELLO again if the peer is
    not connected when ``reconnect`` draws True), batches, clock steps, ticks, heartbeats,
    vanished peers and acknowledgements of what was delivered."""
    batch = st.lists(st.tuples(peer_index, frames), min_size=1, max_size=6)
    return st.lists(weighted(
        (20, st.tuples(st.just("message"), peer_index, frames, failure, reconnect)),
        (4, st.tuples(st.just("batch"), batch, failure)),
        (3, st.tuples(st.just("clock"), st.sampled_from([0.01, 0.06, 0.15, 0.25, 1.0, 2.0, 6.0, 30.0]))),
        (3, st.tuples(st.just("tick"), failure)),
        (1, st.tuples(st.just("heartbeat"), failure)),
        (1, st.tuples(st.just("gone"), peer_index)),
        (2, st.tuples(st.just("hello"), peer_index)),  # (back after a BYE, a ban or a vanishing)
        (5, st.tuples(st.just("ack"), peer_index)),
    ), min_size=30, max_size=100)


def check_outs(outs) -> None:
    """Whatever the router returns is a list of Out the server can send as it is."""
    assert type(outs) is list
    for out in outs:
        assert type(out) is Out
        assert out.dest is PUB or type(out.dest) is bytes
        assert type(out.frames) is list and len(out.frames) >= 2
        assert all(type(frame) is bytes for frame in out.frames)
        header = msgpack.unpackb(out.frames[1], raw=False)
        assert type(header) is dict
        if out.dest is PUB:
            assert out.frames[0] == CONTROL_TOPIC or out.frames[0].endswith(b"\x00")
            continue
        assert out.frames[0] in REPLY_VERBS, out.frames[0]
        if out.frames[0] == wire.ERROR:
            assert header["code"] in ERROR_CODES and header["message"]
        if out.frames[0] == wire.MSG:
            channel, items = out.push
            assert header["ch"] == channel and len(items) == len(out.frames) - 2 == len(header["ttl"])
            assert all(ttl >= 1 for ttl in header["ttl"])
        else:
            assert out.push is None


def check_books(router: Router, now: float) -> None:
    """The router's invariants (``broker.invariants``: conservation, counts that agree with
    what is held, nothing negative, nothing referring to what is gone)."""
    router.check()


def check_nothing_waits(router: Router, now: float) -> None:
    """Work conservation: outside a batch, no live message waits while a receiver that could
    take it is idle, unless its channel is due for a retry at the next tick."""
    delivery = router.delivery
    for name, inbox in delivery.inboxes.items():
        if name in delivery.stalled or not any(expires > now for _, expires in inbox.queue):
            continue
        owner = owner_of(name)
        if owner is not None:
            rid = delivery.by_client.get(owner)
            assert rid is None or delivery.peers[rid].blocked_until > now, f"{name} waits for its connected owner"
        else:
            idle = [rid for rid in inbox.ready
                    if delivery.peers[rid].credits.get(name, 0) > 0 and delivery.peers[rid].blocked_until <= now]
            assert not idle, f"{name} holds messages while {idle} have credit"


class Harness:
    """Drives a Router as the server does: sends what it returns, failing some sends."""

    def __init__(self) -> None:
        self.router = Router(LIMITS, "tcp://127.0.0.1:1", wall_offset=1e9, started=0.0, instance="fuzz")
        self.now = 0.0
        self.delivered = {rid: Counter() for rid in RIDS}  # what each peer would acknowledge

    def send(self, outs, failure) -> None:
        check_outs(outs)
        for dest, frames, push in outs:
            if dest is PUB:
                continue
            mode = failure[0] if failure is not None and RIDS[failure[1]] == dest else None
            if mode == "again":
                if push is not None:
                    assert self.router.unsent(dest, push, self.now, gone=False) == []
            elif mode == "gone":
                if push is not None:
                    self.send(self.router.unsent(dest, push, self.now, gone=True), failure)
                else:
                    self.send(self.router.peer_gone(dest), failure)
            elif frames[0] == wire.MSG:
                self.delivered[dest][push[0]] += len(push[1])

    def handle(self, index: int, frames: list[bytes], failure) -> None:
        self.send(as_the_broker(self.router.handle, RIDS[index], frames, self.now), failure)

    def step(self, step) -> None:
        kind, *args = step
        router = self.router
        if kind == "message":
            index, frames, failure, reconnect = args
            if reconnect and RIDS[index] not in router.peers:  # as a client does
                self.step(("hello", index))
            self.handle(index, frames, failure)
        elif kind == "batch":
            messages, failure = args
            router.begin_batch()
            for index, frames in messages:
                self.handle(index, frames, failure)
                check_books(router, self.now)
            self.send(router.end_batch(self.now), failure)
        elif kind == "clock":
            self.now += args[0]
        elif kind == "tick":
            self.send(router.tick(self.now), args[0])
            assert all(w[2] > self.now for waiters in router.joining.values() for w in waiters)
        elif kind == "heartbeat":
            self.send(router.heartbeat(self.now), args[0])
        elif kind == "gone":
            self.send(router.peer_gone(RIDS[args[0]]), None)
        elif kind == "hello":
            self.handle(args[0], wire.Hello(1, CLIENT_IDS[args[0]]).frames(), None)
        elif kind == "ack":
            acks, self.delivered[RIDS[args[0]]] = self.delivered[RIDS[args[0]]], Counter()
            if acks:
                self.handle(args[0], wire.Ack(tuple(acks.items())).frames(), None)
        check_books(router, self.now)
        check_nothing_waits(router, self.now)


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=250)
@given(router_steps(any_frames, weighted((3, st.just(True)), (1, st.just(False)))))
def test_a_router_fed_random_and_mutated_frames_by_several_peers_keeps_its_books(steps):
    run_router(steps)


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=250)
@given(router_steps(valid_traffic, st.just(True)))
def test_a_router_under_random_valid_traffic_with_failures_keeps_its_books(steps):
    run_router(steps)


def run_router(steps) -> None:
    harness = Harness()
    for index in range(len(RIDS)):
        harness.step(("hello", index))
    for step in steps:
        harness.step(step)

    # Everyone leaves; once every expiry has passed nothing at all is left behind.
    router = harness.router
    for index in range(len(RIDS)):
        harness.handle(index, wire.Bye().frames(), None)
    harness.now += 2 * (LIMITS.max_expiry + LIMITS.max_group_expiry)
    harness.step(("tick", None))
    harness.step(("heartbeat", None))
    assert router.peers == {} and router.by_client == {}
    assert router.inboxes == {} and router.delivery.bytes_held == 0
    assert len(router.groups) == 0 and router.groups._by_owner == {}
    assert router.joining == {} and router.delivery.stalled == set()


# -- what the fuzzers found, pinned down ------------------------------------------------------


def _router_with(*clients: str) -> Router:
    router = Router(LIMITS, "tcp://127.0.0.1:1")
    for client in clients:
        router.handle(client.encode(), wire.Hello(1, client).frames(), 0.0)
    return router


@pytest.mark.parametrize("kind", ["list", "map"])
def test_a_header_field_nested_a_thousand_levels_deep_is_a_bad_value_not_a_recursion_error(kind):
    header = _pack_map([(_packed("id"), _packed(1)), (_packed("cap"), _deep(1000, kind)),
                        (_packed("ch"), _packed("jobs")), (_packed("exp"), _packed(1))])
    with pytest.raises(ProtocolError) as caught:
        as_the_broker(wire.decode, [wire.verb_frame("SEND"), header, _packed({"type": "t"})])
    assert caught.value.code == "bad-value" and len(caught.value.message) < 1000


@pytest.mark.parametrize("pattern", ["a{4294967296}", "(?a)(?u)a"])
def test_a_channel_capacity_pattern_that_re_rejects_with_other_errors_is_a_bad_value(pattern):
    router = _router_with("aaaa0000")
    frames = wire.GroupSend(2, "room", 5, 1.0, ((pattern, 1),), _packed({"type": "t"})).frames()
    [out] = router.handle(b"aaaa0000", frames, 0.0)
    assert out.frames[0] == wire.ERROR and msgpack.unpackb(out.frames[1])["code"] == "bad-value"


def test_a_post_with_more_bodies_than_slots_delivers_those_that_fit_and_refuses_the_rest():
    router = _router_with("aaaa0000", "bbbb1111")
    router.handle(b"aaaa0000", wire.Reserve(2, "specific.bbbb1111!x", 4, 1).frames(), 0.0)
    posted = wire.Post("specific.bbbb1111!x", 1.0, (_packed({"type": "t", "n": 1}), _packed({"type": "t", "n": 2})))
    outs = router.handle(b"aaaa0000", posted.frames(), 0.0)
    [push] = [out for out in outs if out.dest == b"bbbb1111"]
    assert push.frames[0] == wire.MSG and push.frames[2:] == [_packed({"type": "t", "n": 1})]
    [refusal] = [out for out in outs if out.dest == b"aaaa0000"]
    assert msgpack.unpackb(refusal.frames[1])["code"] == "no-reservation"


def test_the_acks_riding_on_a_refused_post_still_return_credit_and_deliver():
    router = _router_with("aaaa0000", "bbbb1111")
    router.handle(b"bbbb1111", wire.Credit("jobs", 1).frames(), 0.0)
    for n in (1, 2):
        router.handle(b"aaaa0000", wire.Send(n + 1, "jobs", 5, 1.0, _packed({"type": "t", "n": n})).frames(), 0.0)
    refused = wire.Post("jobs", 1.0, b"not a map", acks=(("jobs", 1),))  # no slot, no map: refused
    outs = router.handle(b"bbbb1111", refused.frames(), 0.0)
    assert [out.frames[0] for out in outs] == [wire.MSG, wire.ERROR]
    assert outs[0].frames[2:] == [_packed({"type": "t", "n": 2})]  # the credit the ACK gave back


def test_a_flush_notice_while_an_own_channel_is_joined_again_leaves_the_join_to_its_marker():
    core = ClientCore(client_id="c0ffee000001")
    core.on_hello({"id": 1, "pub": "tcp://127.0.0.1:1", "time": 0.0}, 0.0)
    me = core.new_channel()
    marker = [group_topic("room"), wire.pack({"op": "add", "ch": me, "ttl": 60_000})]
    core.group_add("room", me)
    core.expect_marker("room", me, 0.0)
    core.on_sub(marker, 0.0)
    core.take_outgoing()
    core.group_add("room", me)  # (again, as a client renewing its membership does)
    core.expect_marker("room", me, 0.0)
    core.on_sub([CONTROL_TOPIC, wire.pack({"op": "flush"})], 0.0)  # someone flushed before it
    assert core.marker_pending("room", me), "the flush ended the wait for the marker"
    assert ("unsub", group_topic("room")) not in core.take_outgoing(), "the flush dropped the subscription"
    core.on_sub(marker, 0.0)
    assert me in core.members["room"] and "room" in core.subscribed


# -- a running broker -------------------------------------------------------------------------

BUDGET = 5  # max_bad_frames of the live broker, so bans happen within an example
LIVE = settings(FUZZ, max_examples=60)


class LiveBroker:
    """A broker thread, a well-behaved Client beside it and raw DEALERs for the fuzzer."""

    def __init__(self) -> None:
        self.server, self.thread = start_in_thread(BrokerConfig(
            bind="tcp://127.0.0.1:*", pub_bind="tcp://127.0.0.1:*", max_bad_frames=BUDGET,
            max_message_size=4096, max_memory=1 << 20, check=True,
        ))
        self.context = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.good: Client | None = None
        self.rounds = itertools.count()

    def start_good_client(self) -> None:
        self.good = Client(self.server.endpoint, timeout=5)
        self.mine = self.good.new_channel()

    def dealer(self, routing_id: bytes) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.connect(self.server.endpoint)
        self.sockets.append(sock)
        return sock

    def close_dealer(self, sock: zmq.Socket) -> None:
        self.sockets.remove(sock)
        sock.close(linger=0)

    def assert_serving(self) -> None:
        """The broker thread lives and the well-behaved client can send, receive and group-send."""
        assert self.thread.is_alive(), "the broker thread died"
        n = next(self.rounds)
        good = self.good
        # Joined again each time, because a fuzzed FLUSH drops every membership; and first,
        # because its marker comes after any such flush notice on the publisher, so the client
        # has seen the flush before its own messages arrive (DEALER and SUB are not ordered).
        good.group_add("good.room", self.mine)
        good.send("good.jobs", {"type": "probe", "n": n})
        assert good.receive("good.jobs", timeout=5) == {"type": "probe", "n": n}
        assert good.group_send("good.room", {"type": "probe", "n": n}) == {"queued": 0, "full": 0}
        assert good.receive(self.mine, timeout=5) == {"type": "probe", "n": n}

    def stop(self) -> None:
        if self.good is not None:
            self.good.close()
        for sock in self.sockets:
            sock.close(linger=0)
        self.context.term()
        self.server.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the broker thread did not stop"


def read(sock: zmq.Socket, timeout: float) -> tuple[bytes, dict] | None:
    """The next message's verb and header, or None if nothing comes within ``timeout``."""
    if not sock.poll(timeout * 1000):
        return None
    frames = sock.recv_multipart()
    header = msgpack.unpackb(frames[1], raw=False)
    assert type(header) is dict
    if frames[0] == wire.ERROR:
        assert header["code"] in ERROR_CODES and header["message"]
    return frames[0], header


def expected_reply(frames: list[bytes]) -> tuple[str, int | None] | None:
    """What a broker answers a peer that has not said HELLO: the decoder's refusal, no-hello
    for any other command, nothing for BYE."""
    try:
        command = wire.decode(frames)
    except ProtocolError as err:
        return err.code, err.request_id
    if type(command) is wire.Bye:
        return None
    return "no-hello", getattr(command, "id", None)


SENTINEL = [b"\x02PING", _packed({"id": 7})]  # version 2: ERROR bad-version, id nil


@pytest.mark.timeout(120)
def test_a_running_broker_answers_each_bad_frame_bans_after_the_budget_and_keeps_serving():
    live = LiveBroker()
    routing_ids = (b"fz%06d" % n for n in itertools.count())
    try:
        live.start_good_client()
        live.assert_serving()

        @LIVE
        @given(st.lists(st.one_of(messages(), raw_frames), min_size=1, max_size=BUDGET + 3))
        def fuzz(batch):
            sock = live.dealer(next(routing_ids))
            strikes, expected = 0, []
            # Frames that would open a session are left out: this peer never says HELLO, so what
            # the broker owes it follows from the frames alone. A bad-version sentinel ends the
            # batch, so a reply nobody expected would show up before the sentinel's.
            for frames in [f for f in batch if not _is_hello(f)] + [SENTINEL]:
                want = expected_reply(frames)
                sock.send_multipart(frames)
                if want is None:
                    continue
                strikes += 1
                if strikes > BUDGET:
                    expected.append(("banned", want[1]))
                    break
                expected.append(want)
            for code, request_id in expected:
                reply = read(sock, 5.0)
                assert reply is not None, f"no reply; expected {code}"
                verb, header = reply
                assert (verb, header["code"], header["id"]) == (wire.ERROR, code, request_id), header
            if expected[-1][0] == "banned":
                sock.send_multipart(wire.Ping(1).frames())
                assert read(sock, 0.2) is None, "a banned peer was answered"
            live.close_dealer(sock)
            live.assert_serving()

        fuzz()
    finally:
        live.stop()


def _is_hello(frames: list[bytes]) -> bool:
    try:
        return type(wire.decode(frames)) is wire.Hello
    except ProtocolError:
        return False


@pytest.mark.timeout(120)
def test_a_running_broker_survives_a_peer_that_says_hello_then_sends_anything():
    live = LiveBroker()
    sentinels = itertools.count(2**62)
    try:
        live.start_good_client()
        live.assert_serving()

        @LIVE
        @given(st.sampled_from(CLIENT_IDS), st.lists(any_frames, min_size=1, max_size=12))
        def fuzz(client, batch):
            sock = live.dealer(b"%s-%d" % (client.encode(), next(sentinels)))
            sock.send_multipart(wire.Hello(1, client).frames())
            assert read(sock, 5.0)[1]["id"] == 1  # OK, or ERROR id-taken from a previous one's
            for frames in batch:
                sock.send_multipart(frames)
            # A PING after the batch: once its reply (or a ban) has come, so has every reply
            # to the batch except deferred ones; each is well formed (checked by read).
            sentinel = next(sentinels)
            sock.send_multipart(wire.Ping(sentinel).frames())
            while (reply := read(sock, 5.0)) is not None:
                verb, header = reply
                if header.get("id") == sentinel or header.get("code") == "banned":
                    break
            else:
                raise AssertionError("the broker went silent to a peer it did not ban")
            sock.send_multipart(wire.Bye().frames())
            live.close_dealer(sock)
            live.assert_serving()

        fuzz()
        live.good.close()
        live.good = None
    finally:
        live.stop()
    # Idle and stopped, the broker's books still balance.
    check_books(live.server.router, time.monotonic())
