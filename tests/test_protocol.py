"""Pure tests of the wire protocol: name rules, command frames and their decoding.

No sockets and no clock: every test builds frames by hand or with the command dataclasses and
checks what ``decode`` makes of them.
"""

from __future__ import annotations

import msgpack
import pytest

from broker.protocol import wire
from broker.protocol.errors import ERROR_CODES, ProtocolError
from broker.protocol.notices import MAX_POST_BODIES
from broker.protocol.names import (
    CONTROL_TOPIC, MAX_NAME_LENGTH, check_channel, check_client_id, check_group, group_topic,
    is_specific, owner_of,
)

BODY = msgpack.packb({"type": "chat.message", "text": "hi", "raw": b"\x00\xff"}, use_bin_type=True)


def frames(verb: str, header, *body: bytes, version: int = wire.VERSION) -> list[bytes]:
    """Hand-built frames, so tests can say exactly what is malformed."""
    packed = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    return [bytes([version]) + verb.encode("ascii"), packed, *body]


def decode_error(raw: list[bytes]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        wire.decode(raw)
    assert info.value.code in ERROR_CODES
    return info.value


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "tasks", "chat.room-1_B", "A" * (MAX_NAME_LENGTH - 1), "0.1"])
def test_valid_group_names_are_returned_unchanged(name):
    assert check_group(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "a" * MAX_NAME_LENGTH, "a" * 500, "room 1", "room/1", "röom", "a!b", "a\x00", "tab\t",
     "new\nline", "room1\n"],
)
def test_invalid_group_names_raise_bad_name(name):
    with pytest.raises(ProtocolError) as info:
        check_group(name)
    assert info.value.code == "bad-name"
    assert info.value.fields["limit"] == MAX_NAME_LENGTH


@pytest.mark.parametrize("name", [None, 1, b"room", ["room"], 1.5])
def test_non_str_group_and_channel_names_raise_bad_name(name):
    for check in (check_group, check_channel):
        with pytest.raises(ProtocolError) as info:
            check(name)
        assert info.value.code == "bad-name"


@pytest.mark.parametrize(
    "name",
    ["tasks", "specific.abcd1234!", "specific.abcd1234!local-1.x_y", "a!b", "x" * (MAX_NAME_LENGTH - 1)],
)
def test_valid_channel_names_are_returned_unchanged(name):
    assert check_channel(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "!local", "a!!b", "a!b!c", "a" * MAX_NAME_LENGTH, "specific.abcd!" + "x" * 90, "sp ace",
     "a!b c", "caf\u00e9", "a\x00", "tasks\n"],
)
def test_invalid_channel_names_raise_bad_name(name):
    with pytest.raises(ProtocolError) as info:
        check_channel(name)
    assert info.value.code == "bad-name"


def test_bad_name_error_message_states_the_rule_and_truncates_long_names():
    with pytest.raises(ProtocolError) as info:
        check_channel("x" * 1000)
    assert "shorter than 100" in info.value.message
    assert "at most one '!'" in info.value.message
    assert len(info.value.fields["name"]) < 200


def test_is_specific_is_true_only_for_names_with_a_bang():
    assert is_specific("specific.abcd!x")
    assert not is_specific("specific.abcd")


@pytest.mark.parametrize(
    "channel, owner",
    [
        ("specific.ab12cd34!x", "ab12cd34"),
        ("specific.ab12cd34!", "ab12cd34"),
        ("a.b.c.client1!local.with.dots", "client1"),
        ("client1!x", "client1"),
        ("tasks", None),
        ("specific.ab12cd34", None),
    ],
)
def test_owner_of_is_the_last_segment_before_the_bang(channel, owner):
    assert owner_of(channel) == owner


@pytest.mark.parametrize("client_id", ["abcd", "ab12cd34ef56", "0" * 32])
def test_valid_client_ids_are_returned_unchanged(client_id):
    assert check_client_id(client_id) == client_id


@pytest.mark.parametrize("client_id", ["abc", "a" * 33, "ABCD", "ab-cd", "ab.cd", "", None, 1234, b"abcd"])
def test_invalid_client_ids_raise_bad_value(client_id):
    with pytest.raises(ProtocolError) as info:
        check_client_id(client_id)
    assert info.value.code == "bad-value"


def test_group_topic_is_the_ascii_name_then_nul():
    assert group_topic("room1") == b"room1\x00"


def test_group_topics_never_prefix_each_other():
    names = ["room1", "room10", "room", "room1.a", "room1-", "r"]
    topics = [group_topic(name) for name in names]
    for a in topics:
        for b in topics:
            if a != b:
                assert not b.startswith(a), (a, b)


def test_control_topic_prefixes_no_group_topic():
    assert not group_topic("a").startswith(CONTROL_TOPIC)
    assert CONTROL_TOPIC == b"\x00"


def test_protocol_error_refuses_unknown_codes():
    with pytest.raises(AssertionError):
        ProtocolError("no-such-code", "message")


def test_protocol_error_carries_code_message_and_fields():
    err = ProtocolError("full", "it is full", capacity=3, channel="q")
    assert (err.code, err.message, str(err)) == ("full", "it is full", "it is full")
    assert err.fields == {"capacity": 3, "channel": "q"}


# -- round trips ----------------------------------------------------------------------------

ROUND_TRIPS = [
    wire.Hello(1, "abcd1234"),
    wire.Send(2, "tasks", 5, 1.5, BODY),
    wire.Send(3, "specific.abcd1234!x", 1, 60.0, BODY),
    wire.GroupSend(4, "room1", 10, 30.0, (), BODY),
    wire.GroupSend(5, "room1", 10, 30.0, (("^tasks$", 3), ("specific\\..*", 7)), BODY),
    wire.GroupAdd(6, "room1", "tasks", 86400.0),
    wire.GroupAdd(7, "room1", "specific.abcd1234!x", 0.5),
    wire.GroupSync(8, "room1", "specific.abcd1234!x"),
    wire.GroupDiscard(9, "room1", "tasks"),
    wire.Flush(10),
    wire.Ping(wire.MAX_INT),
    wire.Credit("tasks", 50),
    wire.Send(11, "tasks", 100, 60.0, BODY, 32),
    wire.Reserve(12, "tasks", 100, 16),
    wire.Post("tasks", 60.0, BODY),
    wire.Release((("tasks", 3), ("other", 1))),
    wire.Joined("room1", "specific.abcd1234!x"),
    wire.Stats(13, 25),
    wire.GroupPost(0, "room1", 10, 30.0, (("^tasks$", 3),), BODY),
    wire.Heartbeat(),
    wire.Hello(14, "abcd1234", 1.5),
    wire.Ack((("tasks", 2), ("specific.abcd1234!x", 1))),
    wire.Ack(()),
    wire.Bye(),
]


@pytest.mark.parametrize("command", ROUND_TRIPS, ids=lambda c: type(c).__name__)
def test_every_command_survives_a_round_trip_through_its_frames(command):
    decoded = wire.decode(command.frames())
    assert type(decoded) is type(command)
    assert decoded == command


def test_a_post_encoded_on_the_clients_fast_path_is_the_post_the_broker_decodes():
    bodies = [BODY, b"\x81\xa4type\xa1b"]
    for acks in ({}, {"pong": 2, "specific.abcd1234!x": 1}):
        frames = wire.Post.encode("tasks", 30.0, bodies, acks)
        command = wire.Post("tasks", 30.0, tuple(bodies), tuple(acks.items()))
        assert frames == command.frames()
        assert wire.decode(frames) == command


def _post_frames(header, bodies=(BODY,), verb=b"\x01POST"):
    return [verb, msgpack.packb(header), *bodies]


POSTS_FOR_THE_FAST_PATH = [
    _post_frames({"ch": "tasks", "exp": 60}),
    _post_frames({"ch": "tasks", "exp": 0.5, "acks": {"pong": 2, "specific.abcd1234!x": 1}}, (BODY, BODY)),
    _post_frames({"ch": "tasks", "exp": 60, "acks": None, "later": "ignored"}),
    _post_frames({"ch": "tasks", "exp": 60}, ()),  # no body
    _post_frames({"ch": "tasks", "exp": 60}, (BODY,) * (MAX_POST_BODIES + 1)),
    _post_frames({"ch": "bad name!", "exp": 60}),
    _post_frames({"ch": 7, "exp": 60}),
    _post_frames({"exp": 60}),
    _post_frames({"ch": "tasks"}),
    _post_frames({"ch": "tasks", "exp": 0}),
    _post_frames({"ch": "tasks", "exp": "60"}),
    _post_frames({"ch": "tasks", "exp": True}),
    _post_frames({"ch": "tasks", "exp": 60, "acks": {"pong": 0}}),
    _post_frames({"ch": "tasks", "exp": 60, "acks": {"pong": -1}}),
    _post_frames({"ch": "tasks", "exp": 60, "acks": {"no good": 1}}),
    _post_frames({"ch": "tasks", "exp": 60, "acks": [["pong", 1]]}),
    _post_frames({"ch": "tasks", "exp": 60}, verb=b"\x02POST"),
    [b"\x01POST", b"\xc1", BODY],  # not msgpack
    [b"\x01POST", msgpack.packb(["ch", "tasks"]), BODY],  # not a map
    [b"\x01POST", msgpack.packb({1: "x", "ch": "tasks", "exp": 60}), BODY],  # a key that is not str
]


@pytest.mark.parametrize("frames", POSTS_FOR_THE_FAST_PATH)
def test_the_brokers_fast_path_takes_exactly_the_posts_decode_accepts_with_the_same_values(frames):
    parts = wire.Post.parts(frames)
    try:
        command = wire.decode(frames)
    except ProtocolError:
        assert parts is None  # (the broker then decodes it, and replies with decode's error)
        return
    assert parts == (command.channel, command.expiry, list(command.bodies), command.acks)
    assert wire.Post.parts(frames) == parts  # the second time (a remembered header): the same


def test_the_fast_path_remembers_a_bounded_number_of_short_headers_and_never_a_bad_one():
    from broker.protocol import notices

    notices._post_headers.clear()
    assert wire.Post.parts(_post_frames({"ch": "tasks", "exp": 0})) is None
    assert not notices._post_headers
    for n in range(notices._POST_HEADERS_MAX + 10):
        assert wire.Post.parts(_post_frames({"ch": f"tasks.{n}", "exp": 60}))[0] == f"tasks.{n}"
    assert 0 < len(notices._post_headers) <= notices._POST_HEADERS_MAX
    notices._post_headers.clear()
    long_acks = {f"channel.{n}": 1 for n in range(40)}  # a header over the remembered size
    frames = _post_frames({"ch": "tasks", "exp": 60, "acks": long_acks})
    assert len(frames[1]) > notices._POST_HEADER_REMEMBERED_BYTES
    assert wire.Post.parts(frames)[3] == tuple(long_acks.items())
    assert not notices._post_headers  # checked, not kept


def test_every_verb_has_a_round_trip_test():
    assert {type(c) for c in ROUND_TRIPS} == set(wire.COMMANDS.values())


def test_frames_start_with_the_version_byte_and_the_ascii_verb():
    raw = wire.Send(2, "tasks", 5, 1.5, BODY).frames()
    assert raw[0] == b"\x01SEND"
    assert msgpack.unpackb(raw[1]) == {"id": 2, "ch": "tasks", "cap": 5, "exp": 1.5}
    assert raw[2] == BODY


def test_body_bytes_pass_through_decode_untouched():
    odd = b"\x81\xa4type\xc4\x03\x00\x01\x02"  # a map with a bin value
    assert wire.decode(wire.Send(1, "q", 1, 1.0, odd).frames()).body == odd


def test_group_send_header_carries_channel_capacity_as_lists():
    cmd = wire.GroupSend(1, "g", 2, 3.0, (("a.*", 4),), BODY)
    assert msgpack.unpackb(cmd.frames()[1])["ccap"] == [["a.*", 4]]


def test_group_send_without_ccap_field_decodes_to_no_patterns():
    cmd = wire.decode(frames("GSEND", {"id": 1, "g": "g", "cap": 2, "exp": 3}, BODY))
    assert cmd.channel_capacity == ()
    assert cmd.expiry == 3.0 and type(cmd.expiry) is float


def test_decode_ignores_unknown_header_fields():
    cmd = wire.decode(frames("PING", {"id": 4, "future": [1, 2]}))
    assert cmd == wire.Ping(4)


# -- malformed frames -----------------------------------------------------------------------


@pytest.mark.parametrize("raw", [[], [b"\x01PING"]])
def test_fewer_than_two_frames_is_bad_frame(raw):
    err = decode_error(raw)
    assert err.code == "bad-frame"
    assert err.request_id is None


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version_byte_is_bad_version(version):
    err = decode_error(frames("PING", {"id": 7}, version=version))
    assert err.code == "bad-version"
    assert err.fields["limit"] == wire.VERSION


def test_empty_verb_frame_is_bad_version():
    err = decode_error([b"", msgpack.packb({"id": 1})])
    assert err.code == "bad-version"


@pytest.mark.parametrize("verb", ["", "NOPE", "ping", "OK", "MSG", "HELLOX"])
def test_unknown_verb_is_unknown_verb_and_keeps_the_request_id(verb):
    err = decode_error(frames(verb, {"id": 11}))
    assert err.code == "unknown-verb"
    assert err.request_id == 11
    assert "PING" in err.message  # the message lists the known verbs


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x82\xa2id",  # truncated map
        msgpack.packb({"id": 1}) + b"\x00",  # trailing data
    ],
)
def test_header_that_is_not_msgpack_is_bad_header(header):
    assert decode_error(frames("PING", header)).code == "bad-header"


@pytest.mark.parametrize("header", [[1, 2], "id", 5, None, True])
def test_header_that_is_not_a_map_is_bad_header(header):
    err = decode_error(frames("PING", header))
    assert err.code == "bad-header"
    assert err.request_id is None


@pytest.mark.parametrize(
    "header",
    [{1: "x", "id": 1}, {b"id": 1}, {"id": 1, b"extra": 2}, {(1, 2): 3, "id": 1}, {None: 1, "id": 1}],
    ids=["int-key", "bytes-key", "extra-bytes-key", "array-key", "nil-key"],
)
def test_header_with_non_str_keys_is_bad_header(header):
    raw = msgpack.packb(header, use_bin_type=True)
    assert decode_error(frames("PING", raw)).code == "bad-header"


def test_oversized_header_is_bad_header_with_size_and_limit():
    err = decode_error(frames("PING", {"id": 1, "pad": "x" * wire.MAX_HEADER_SIZE}))
    assert err.code == "bad-header"
    assert err.fields["limit"] == wire.MAX_HEADER_SIZE
    assert err.fields["size"] > wire.MAX_HEADER_SIZE


GOOD_HEADERS = {
    "HELLO": ({"id": 1, "client": "abcd1234"}, ()),
    "SEND": ({"id": 1, "ch": "q", "cap": 1, "exp": 1.0}, (BODY,)),
    "GSEND": ({"id": 1, "g": "g", "cap": 1, "exp": 1.0, "ccap": []}, (BODY,)),
    "GADD": ({"id": 1, "g": "g", "ch": "q", "gexp": 5}, ()),
    "GSYNC": ({"id": 1, "g": "g", "ch": "q"}, ()),
    "GDISCARD": ({"id": 1, "g": "g", "ch": "q"}, ()),
    "FLUSH": ({"id": 1}, ()),
    "PING": ({"id": 1}, ()),
    "CREDIT": ({"ch": "q", "n": 1}, ()),
    "ACK": ({"acks": {"q": 1}}, ()),
    "BYE": ({}, ()),
    "RESERVE": ({"id": 1, "ch": "q", "cap": 4, "want": 2}, ()),
    "POST": ({"ch": "q", "exp": 1.0}, (BODY,)),
    "RELEASE": ({"slots": {"q": 1}}, ()),
    "JOINED": ({"g": "g", "ch": "q!x"}, ()),
    "STATS": ({"id": 1}, ()),
    "HB": ({}, ()),
    "GPOST": ({"g": "g", "cap": 1, "exp": 1.0, "ccap": []}, (BODY,)),
}


def test_good_headers_table_covers_every_verb_and_decodes():
    assert {"\x01" + verb for verb in GOOD_HEADERS} == {v.decode() for v in wire.COMMANDS}
    for verb, (header, body) in GOOD_HEADERS.items():
        assert wire.decode(frames(verb, header, *body)).VERB == verb


MISSING = [(verb, key) for verb, (header, _) in GOOD_HEADERS.items() for key in header if key != "ccap"]


@pytest.mark.parametrize("verb, key", MISSING, ids=[f"{v}-{k}" for v, k in MISSING])
def test_a_missing_required_field_is_bad_header(verb, key):
    header, body = GOOD_HEADERS[verb]
    header = {k: v for k, v in header.items() if k != key}
    err = decode_error(frames(verb, header, *body))
    assert err.code == "bad-header", err.message
    if key != "id" and "id" in header:
        assert err.request_id == 1


WRONG_TYPES = [
    ("HELLO", "id", True, "bad-value"),
    ("HELLO", "id", "1", "bad-value"),
    ("HELLO", "id", -1, "bad-value"),
    ("HELLO", "id", 1.0, "bad-value"),
    ("HELLO", "client", "ABCD", "bad-value"),
    ("HELLO", "client", 1234, "bad-value"),
    ("SEND", "ch", "bad name", "bad-name"),
    ("SEND", "ch", 5, "bad-name"),
    ("SEND", "cap", True, "bad-value"),
    ("SEND", "cap", "3", "bad-value"),
    ("SEND", "cap", 0, "bad-value"),
    ("SEND", "cap", 2.0, "bad-value"),
    ("SEND", "cap", 2**63, "bad-value"),
    ("SEND", "exp", 0, "bad-value"),
    ("SEND", "exp", -1.0, "bad-value"),
    ("SEND", "exp", True, "bad-value"),
    ("SEND", "exp", "5", "bad-value"),
    ("SEND", "exp", float("nan"), "bad-value"),
    ("SEND", "exp", float("inf"), "bad-value"),
    ("SEND", "exp", 10**9 + 1, "bad-value"),
    ("GSEND", "g", "a!b", "bad-name"),
    ("GSEND", "ccap", {"a": 1}, "bad-value"),
    ("GSEND", "ccap", [["a", 0]], "bad-value"),
    ("GSEND", "ccap", [["a", True]], "bad-value"),
    ("GSEND", "ccap", [["a", 1, 2]], "bad-value"),
    ("GSEND", "ccap", [[1, 1]], "bad-value"),
    ("GSEND", "ccap", ["a"], "bad-value"),
    ("GSEND", "ccap", [["a" * (wire.MAX_PATTERN_LENGTH + 1), 1]], "bad-value"),
    ("GSEND", "ccap", [["a", 1]] * (wire.MAX_PATTERNS + 1), "bad-value"),
    ("GADD", "gexp", 0, "bad-value"),
    ("GADD", "gexp", False, "bad-value"),
    ("GADD", "ch", "a!b!c", "bad-name"),
    ("GSYNC", "g", "", "bad-name"),
    ("GDISCARD", "ch", ["q"], "bad-name"),
    ("CREDIT", "n", 0, "bad-value"),
    ("CREDIT", "n", True, "bad-value"),
    ("CREDIT", "ch", "", "bad-name"),
    ("ACK", "acks", [["q", 1]], "bad-header"),
    ("ACK", "acks", {"q": 0}, "bad-value"),
    ("ACK", "acks", {"q": True}, "bad-value"),
    ("ACK", "acks", {"bad name": 1}, "bad-name"),
    ("ACK", "acks", {"q": {"n": 1}}, "bad-value"),
]


@pytest.mark.parametrize(
    "verb, key, value, code", WRONG_TYPES, ids=[f"{v}-{k}-{val!r}"[:40] for v, k, val, _ in WRONG_TYPES]
)
def test_a_field_of_the_wrong_type_or_range_is_refused_with_its_code(verb, key, value, code):
    header, body = GOOD_HEADERS[verb]
    err = decode_error(frames(verb, {**header, key: value}, *body))
    assert err.code == code, err.message


def test_ack_map_with_bytes_channel_is_refused():
    raw = msgpack.packb({"acks": {b"q": 1}}, use_bin_type=True)
    assert decode_error(frames("ACK", raw)).code == "bad-name"


@pytest.mark.parametrize("verb", [v for v, (_, body) in GOOD_HEADERS.items() if not body])
def test_a_body_frame_where_none_is_allowed_is_bad_frame(verb):
    header, _ = GOOD_HEADERS[verb]
    err = decode_error(frames(verb, header, BODY))
    assert err.code == "bad-frame"
    assert err.request_id == header.get("id")


@pytest.mark.parametrize("verb", ["SEND", "GSEND"])
@pytest.mark.parametrize("count", [0, 2])
def test_send_verbs_need_exactly_one_body_frame(verb, count):
    header, _ = GOOD_HEADERS[verb]
    err = decode_error(frames(verb, header, *[BODY] * count))
    assert err.code == "bad-frame"
    assert err.request_id == 1


def test_request_id_is_reported_even_when_the_id_is_out_of_range():
    err = decode_error(frames("PING", {"id": -5}))
    assert err.code == "bad-value"
    assert err.request_id == -5


def test_request_id_is_none_when_the_id_is_not_an_int():
    err = decode_error(frames("PING", {"id": "5"}))
    assert err.request_id is None


def test_request_id_is_none_for_notices():
    err = decode_error(frames("CREDIT", {"ch": "q", "n": 0}))
    assert err.request_id is None


# -- constructors check their fields --------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: wire.Hello(1, "NO"),
        lambda: wire.Hello(-1, "abcd"),
        lambda: wire.Send(1, "bad name", 1, 1.0, BODY),
        lambda: wire.Send(1, "q", 0, 1.0, BODY),
        lambda: wire.GroupSend(1, "a!b", 1, 1.0, (), BODY),
        lambda: wire.GroupSend(1, "g", 1, 1.0, (("a", 0),), BODY),
        lambda: wire.GroupAdd(1, "g", "a!!b"),
        lambda: wire.Credit("q", 0),
        lambda: wire.Credit("q", True),
        lambda: wire.Ack((("q", -1),)),
        lambda: wire.Flush(True),
    ],
)
def test_commands_cannot_be_built_with_invalid_fields(build):
    with pytest.raises(ProtocolError):
        build()


# -- replies and bodies ---------------------------------------------------------------------


def test_ok_reply_carries_the_id_and_fields():
    verb, header = wire.ok(3, queued=2)
    assert verb == b"\x01OK"
    assert msgpack.unpackb(header) == {"id": 3, "queued": 2}


def test_error_reply_carries_code_message_and_fields():
    verb, header = wire.error(None, ProtocolError("full", "full up", capacity=3))
    assert verb == b"\x01ERROR"
    assert msgpack.unpackb(header) == {"id": None, "code": "full", "message": "full up", "capacity": 3}


@pytest.mark.parametrize(
    "body, is_map",
    [
        (msgpack.packb({}), True),
        (msgpack.packb({"type": "x"}), True),
        (msgpack.packb({str(i): i for i in range(20)}), True),  # map16
        (b"\xdf\x00\x00\x00\x00", True),  # map32
        (b"", False),
        (msgpack.packb([1, 2]), False),
        (msgpack.packb("type"), False),
        (msgpack.packb(None), False),
        (b"\x90", False),  # empty fixarray
    ],
)
def test_body_is_map_checks_only_the_first_byte_for_a_map(body, is_map):
    assert wire.body_is_map(body) is is_map
