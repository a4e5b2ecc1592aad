"""The client's pure half (clients.core.ClientCore): no sockets, an injected clock."""

from __future__ import annotations

import re

import msgpack
import pytest

from broker.protocol import wire
from broker.protocol.names import CONTROL_TOPIC, group_topic
from clients.core import RELEASE_IDLE, RESERVE_WANT, ClientCore
from clients.errors import MessagesLost

CLIENT = "c0ffee000001"


def core(**settings) -> ClientCore:
    c = ClientCore(client_id=CLIENT, **settings)
    c.on_hello({"id": 1, "pub": "tcp://127.0.0.1:5556", "time": 1000.0, "max_message_size": 1 << 20}, 1000.0)
    return c


def sent(c: ClientCore) -> list[tuple[bytes, dict]]:
    """(verb, header) of each frame set the core queued for the DEALER."""
    return [(item[0], msgpack.unpackb(item[1])) for kind, item in c.take_outgoing() if kind == "dealer"]


def msg(channel: str, *bodies: bytes, ttl: int = 60_000, at: float | None = None) -> list[bytes]:
    header = {"ch": channel, "ttl": [ttl] * len(bodies)}
    if at is not None:
        header["at"] = at
    return [wire.MSG, wire.pack(header), *bodies]


BODY = msgpack.packb({"type": "t"})


def test_a_lone_send_is_a_plain_request_that_reserves_nothing():
    c = core()
    rid, frames = c.send("q", {"type": "t"}, now=0.0)
    assert rid is not None and frames[0] == b"\x01SEND"
    assert "want" not in msgpack.unpackb(frames[1])


def test_a_second_send_soon_after_asks_for_slots_and_the_grant_turns_sends_into_posts():
    c = core()
    c.send("q", {"type": "t"}, now=0.0)
    rid, frames = c.send("q", {"type": "t"}, now=0.01)
    assert msgpack.unpackb(frames[1])["want"] == RESERVE_WANT
    c.on_dealer([wire.OK, wire.pack({"id": rid, "grant": 3})], now=0.02)
    for _ in range(3):
        assert c.send("q", {"type": "t"}, now=0.03) == (None, None)
    assert c.unconfirmed == 3
    [(kind, post), *_] = c.take_outgoing()  # one POST carries the three, in order
    assert post[0] == b"\x01POST" and len(post) == 2 + 3
    rid, frames = c.send("q", {"type": "t"}, now=0.04)
    assert frames[0] == b"\x01SEND"  # the slots are used up: back to a request


def test_a_message_that_cannot_be_serialised_is_refused_and_spoils_no_later_send():
    """The core packs with a packer of its own, which keeps a buffer: a refused message must
    leave nothing of itself in it."""
    c = core()
    c.send("q", {"type": "t"}, now=0.0)
    rid, _ = c.send("q", {"type": "t"}, now=0.01)
    c.on_dealer([wire.OK, wire.pack({"id": rid, "grant": 3})], now=0.02)
    c.take_outgoing()
    with pytest.raises(TypeError, match="cannot be serialised"):
        c.send("q", {"type": "t", "x": object()}, now=0.03)
    good = {"type": "t", "blob": b"\x00\x01", "n": 7}
    assert c.send("q", good, now=0.04) == (None, None)
    [post] = [item for kind, item in c.take_outgoing() if item[0] == b"\x01POST"]
    assert post[2:] == [msgpack.packb(good, use_bin_type=True)]
    assert msgpack.unpackb(post[1]) == {"ch": "q", "exp": c.expiry}


def test_a_low_reservation_is_topped_up_with_a_reserve_whose_reply_is_handled_inside():
    c = core()
    c.send("q", {"type": "t"}, now=0.0)
    rid, _ = c.send("q", {"type": "t"}, now=0.01)
    c.on_dealer([wire.OK, wire.pack({"id": rid, "grant": RESERVE_WANT // 2 + 1})], now=0.02)
    c.send("q", {"type": "t"}, now=0.03)  # leaves RESERVE_WANT // 2: time to top up
    [(post, _), (verb, header)] = sent(c)
    assert post == b"\x01POST"
    assert verb == b"\x01RESERVE" and header["want"] == RESERVE_WANT
    assert c.on_dealer([wire.OK, wire.pack({"id": header["id"], "grant": 10})], now=0.04) == []
    assert c.reserved["q"] == RESERVE_WANT // 2 + 10


def test_unused_slots_go_back_after_release_idle():
    c = core()
    c.send("q", {"type": "t"}, now=0.0)
    rid, _ = c.send("q", {"type": "t"}, now=0.01)
    c.on_dealer([wire.OK, wire.pack({"id": rid, "grant": 5})], now=0.02)
    assert c.release_idle(0.1) == pytest.approx(0.01 + RELEASE_IDLE)
    assert sent(c) == []
    assert c.release_idle(0.011 + RELEASE_IDLE) is None
    assert sent(c) == [(b"\x01RELEASE", {"slots": {"q": 5}})]


def test_a_reply_confirms_every_post_before_it():
    c = core()
    c.reserved["q"] = 2
    c.send("q", {"type": "t"}, now=0.0)
    assert c.unconfirmed == 1
    rid, frames = c.ping()
    c.on_dealer([wire.OK, wire.pack({"id": rid})], now=0.1)
    assert c.unconfirmed == 0


def test_taking_a_message_acknowledges_it_at_once_unless_deferred():
    c = core()
    c.on_dealer(msg("specific.c0ffee000001!a", BODY, BODY), now=0.0)
    assert c.pop("specific.c0ffee000001!a", now=0.0) == {"type": "t"}
    assert sent(c) == [(b"\x01ACK", {"acks": {"specific.c0ffee000001!a": 1}})]
    assert c.pop("specific.c0ffee000001!a", now=0.0, defer_ack=True) == {"type": "t"}
    assert sent(c) == []
    c.flush_acks()
    assert sent(c) == [(b"\x01ACK", {"acks": {"specific.c0ffee000001!a": 1}})]


def test_time_spent_unread_in_the_socket_counts_against_expiry():
    c = core()  # synchronised at HELLO: our wall clock equals the broker's
    me = "specific.c0ffee000001!a"
    c.on_dealer(msg(me, BODY, ttl=1000, at=1000.0), now=50.0, wall=1000.9)  # read 0.9 s late
    assert c.pop(me, now=50.05) == {"type": "t"}
    c.on_dealer(msg(me, BODY, ttl=1000, at=1000.0), now=60.0, wall=1001.5)  # read 1.5 s late
    assert c.pop(me, now=60.0) is None
    assert sent(c)[-1] == (b"\x01ACK", {"acks": {me: 1}})  # an expired message is acked too


def test_flushed_forgets_local_messages_and_memberships_at_once():
    c = core()
    me = c.new_channel()
    c.on_dealer(msg(me, BODY), now=0.0)
    rid, _ = c.group_add("room", me)
    c.on_sub([group_topic("room"), wire.pack({"op": "add", "ch": me, "ttl": 60_000})], now=0.0)
    c.flushed()
    assert c.pop(me, now=0.0) is None
    assert c.members == {}
    assert (b"\x01ACK", {"acks": {me: 1}}) in sent(c)  # the broker still counted it as held


def test_a_join_for_an_own_channel_subscribes_syncs_and_confirms_after_the_marker():
    c = core()
    me = c.new_channel()
    assert c.on_dealer([wire.JOIN, wire.pack({"g": "room", "ch": me, "gexp": 60.0})], now=0.0) == []
    assert ("sub", group_topic("room")) in c.outgoing
    c.take_outgoing()
    c.due_syncs(0.0)
    [(verb, header)] = sent(c)
    assert verb == b"\x01GSYNC" and header["g"] == "room"
    c.on_sub([group_topic("room"), wire.pack({"op": "add", "ch": me, "ttl": 60_000})], now=0.01)
    assert sent(c) == [(b"\x01JOINED", {"g": "room", "ch": me})]
    assert me in c.members["room"]


def test_group_messages_reach_only_active_local_members_within_capacity():
    c = core(capacity=1)
    me = c.new_channel()
    c.group_add("room", me)
    topic = group_topic("room")
    c.on_sub([topic, wire.pack({"op": "msg", "ttl": 60_000, "cap": 1}), BODY], now=0.0)
    assert c.pop(me, now=0.0) is None  # before the add marker: not yet a member
    c.on_sub([topic, wire.pack({"op": "add", "ch": me, "ttl": 60_000})], now=0.0)
    for _ in range(2):
        c.on_sub([topic, wire.pack({"op": "msg", "ttl": 60_000, "cap": 1}), BODY], now=0.0)
    assert c.skipped == 1
    assert c.pop(me, now=0.0) == {"type": "t"}
    assert c.pop(me, now=0.0) is None


def test_a_flush_notice_from_another_client_clears_local_state_too():
    c = core()
    me = c.new_channel()
    c.on_dealer(msg(me, BODY), now=0.0)
    c.on_sub([CONTROL_TOPIC, wire.pack({"op": "flush"})], now=0.0)
    assert c.pop(me, now=0.0) is None


def test_goodbye_acknowledges_deferred_acks_before_bye():
    c = core()
    me = c.new_channel()
    c.on_dealer(msg(me, BODY), now=0.0)
    c.pop(me, now=0.0, defer_ack=True)
    frames = c.goodbye()
    assert [f[0] for f in frames] == [b"\x01ACK", b"\x01BYE"]


def test_a_recall_gives_back_every_slot_including_grants_on_their_way():
    c = core()
    c.send("q", {"type": "t"}, now=0.0)
    rid, _ = c.send("q", {"type": "t"}, now=0.01)
    c.on_dealer([wire.OK, wire.pack({"id": rid, "grant": RESERVE_WANT // 2 + 1})], now=0.02)
    c.send("q", {"type": "t"}, now=0.03)  # leaves RESERVE_WANT // 2 and sends a RESERVE
    [_, (_, reserve)] = sent(c)
    assert c.on_dealer([b"\x01RECALL", wire.pack({"ch": "q"})], now=0.04) == []
    assert sent(c) == [(b"\x01RELEASE", {"slots": {"q": 0}})]
    c.on_dealer([wire.OK, wire.pack({"id": reserve["id"], "grant": 9})], now=0.05)
    assert c.reserved.get("q", 0) == 0  # the late grant was part of what went back
    rid, frames = c.send("q", {"type": "t"}, now=0.06)
    assert frames[0] == b"\x01SEND"


def test_broker_heartbeats_and_unknown_verbs_are_not_errors():
    c = core()
    assert c.on_dealer([wire.HB, wire.pack({"instance": "ab"})], now=0.0) == [("heartbeat", "ab")]
    assert c.on_dealer([b"\x01FUTURE", wire.pack({})], now=0.0) == []


def test_a_group_add_whose_membership_vanished_fails_instead_of_waiting():
    c = core()
    me = c.new_channel()
    rid, _ = c.group_add("room", me)
    c.expect_marker("room", me, now=0.0)
    c.due_syncs(1.0)
    [(verb, header)] = sent(c)
    assert verb == b"\x01GSYNC"
    error = {"id": header["id"], "code": "not-member", "message": "gone", "name": me}
    assert c.on_dealer([wire.ERROR, wire.pack(error)], now=1.0) == [("marker", "room", me)]
    assert not c.marker_pending("room", me)
    assert c.marker_failure("room", me).code == "not-member"


def test_posts_go_out_before_a_release_behind_them():
    c = core()
    c.reserved["q"] = RESERVE_WANT
    c.last_send["q"] = 0.0
    c.send("q", {"type": "t"}, now=0.0)
    c.release_idle(10.0)
    assert [verb for verb, _ in sent(c)] == [b"\x01POST", b"\x01RELEASE"]


def test_a_gap_in_a_groups_numbers_is_counted_as_lost_not_hidden():
    c = core()
    me = c.new_channel()
    c.group_add("room", me)
    topic = group_topic("room")
    c.on_sub([topic, wire.pack({"op": "add", "ch": me, "ttl": 60_000, "seq": 7})], now=0.0)
    for seq in (8, 11):  # 9 and 10 never came
        c.on_sub([topic, wire.pack({"op": "msg", "ttl": 60_000, "cap": 100, "seq": seq}), BODY], now=0.0)
    assert c.lost_group_messages == 2


def test_a_restarted_brokers_numbers_are_not_counted_against_the_old_ones():
    """A broker that did not know this client numbers its group messages anew, and may have
    published some before this client's subscription was live again: the replayed membership's
    marker gives the number to follow, so nothing is counted as lost that was not."""
    c = core()
    me = c.new_channel()
    c.group_add("room", me)
    topic = group_topic("room")
    c.on_sub([topic, wire.pack({"op": "add", "ch": me, "ttl": 60_000, "seq": 5})], now=0.0)
    c.disconnected()
    c.on_hello({"id": 2, "pub": "tcp://127.0.0.1:5556", "time": 1000.0, "resumed": False}, 1000.0, now=1.0)
    c.on_sub([topic, wire.pack({"op": "add", "ch": me, "ttl": 60_000, "seq": 9})], now=1.1)  # 9 before it
    c.on_sub([topic, wire.pack({"op": "msg", "ttl": 60_000, "cap": 100, "seq": 10}), BODY], now=1.2)
    assert c.lost_group_messages == 0


def test_a_receive_window_below_one_is_refused_when_the_client_is_made():
    with pytest.raises(ValueError, match="receive_window"):
        ClientCore(receive_window=0)


def test_a_channel_capacity_regex_the_broker_would_refuse_is_refused_when_the_client_is_made():
    with pytest.raises(ValueError, match="repetition inside a repetition"):
        ClientCore(channel_capacity={re.compile(r"^(\w+\.)+send$"): 5})
    with pytest.raises(ValueError, match=r"4 repetitions \(at most 3\)"):
        ClientCore(channel_capacity={"a*b*c*d*": 5})  # a glob's stars are repetitions too
    ClientCore(channel_capacity={"a*b*c*": 5, re.compile(r"^websocket\.send!.+"): 2})  # fine


def test_the_flags_of_a_compiled_channel_capacity_regex_travel_with_it():
    c = ClientCore(channel_capacity={re.compile(r"^ws\.", re.IGNORECASE): 2, re.compile(r"(?s)^x.y"): 3})
    _, frames = c.group_send("room", {"type": "m"})
    ccap = msgpack.unpackb(frames[1], raw=False)["ccap"]
    assert ccap == [["(?i:^ws\\.)", 2], ["(?s)^x.y", 3]]  # the broker sees what this client matches
    assert re.match(ccap[0][0], "WS.send") and c.capacity_for("WS.send") == 2
    with pytest.raises(ValueError, match="either inline"):
        ClientCore(channel_capacity={re.compile(r"(?s)^ws", re.IGNORECASE): 2})


def test_only_one_send_at_a_time_asks_for_slots_on_a_channel():
    """Concurrent sends while a SEND's grant is on its way ask for nothing more: they would each
    reserve a share of the room, which sends from other senders would then have to revoke."""
    c = core()
    c.send("q", {"type": "t"}, now=0.0)
    asking, frames = c.send("q", {"type": "t"}, now=0.01)
    assert msgpack.unpackb(frames[1])["want"] == RESERVE_WANT
    for _ in range(3):
        _, frames = c.send("q", {"type": "t"}, now=0.02)
        assert "want" not in msgpack.unpackb(frames[1])
    c.on_dealer([wire.OK, wire.pack({"id": asking, "grant": 0})], now=0.03)  # nothing granted
    _, frames = c.send("q", {"type": "t"}, now=0.04)
    assert msgpack.unpackb(frames[1])["want"] == RESERVE_WANT  # so the next one asks again


def test_a_refused_post_is_raised_by_the_next_send_never_lost_silently():
    c = core()
    assert c.take_lost() is None
    refusal = {"id": None, "code": "no-reservation", "message": "no slot", "channel": "q", "lost": 3}
    [(kind, rid, error)] = c.on_dealer([wire.ERROR, wire.pack(refusal)], now=0.0)
    assert (kind, rid, error.code) == ("reply", None, "no-reservation")
    lost = c.take_lost()
    assert isinstance(lost, MessagesLost) and lost.code == "lost"
    assert (lost.count, lost.channels) == (3, ["q"])
    assert "the broker refused them: no slot" in str(lost)
    assert c.take_lost() is None  # said once


def test_a_notice_refused_without_losing_messages_is_only_logged():
    c = core()
    c.on_dealer([wire.ERROR, wire.pack({"id": None, "code": "bad-value", "message": "n"})], now=0.0)
    assert c.take_lost() is None


def test_a_dropped_connection_loses_the_unsent_post_batch_loudly_and_counts_the_unconfirmed():
    c = core()
    c.send("q", {"type": "t"}, now=0.0)
    rid, _ = c.send("q", {"type": "t"}, now=0.01)
    c.on_dealer([wire.OK, wire.pack({"id": rid, "grant": 5})], now=0.02)
    assert c.send("q", {"type": "t"}, now=0.03, alone=True)[1][0] == b"\x01POST"  # sent: unconfirmed
    c.send("q", {"type": "t"}, now=0.03)
    c.send("q", {"type": "t"}, now=0.03)  # two in the batch, not sent yet
    c.disconnected()
    assert c.in_doubt == 1 and c.posts == {}
    lost = c.take_lost()
    assert (lost.count, lost.channels) == (2, ["q"])


def test_replayed_memberships_keep_the_client_from_being_whole_until_their_markers_come():
    c = core()
    me = c.new_channel()
    c.group_add("room", me)
    c.expect_marker("room", me, now=0.0)
    marker = [group_topic("room"), wire.pack({"op": "add", "ch": me, "ttl": 60_000, "seq": 0})]
    c.on_sub(marker, now=0.0)
    assert c.groups.replaying == set()
    c.disconnected()
    c.on_hello({"id": 2, "pub": "tcp://127.0.0.1:5556", "time": 1000.0, "resumed": False}, 1000.0, now=1.0)
    assert c.groups.replaying == {("room", me)}
    assert [verb for verb, _ in sent(c)] == [b"\x01GADD"]  # registered again
    c.on_sub(marker, now=1.1)
    assert c.groups.replaying == set()
