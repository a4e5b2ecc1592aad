"""Consumers without a broker: dispatch rules, class checks, lifecycle, the test communicators,
loading MODULE:ATTR, and the JSON form of messages used by the debugging commands."""

from __future__ import annotations

import asyncio
import threading

import pytest

from clients import InvalidName
from consumers import AsyncConsumer, Consumer, ConsumerError, UnhandledMessage
from consumers.debug import from_json, to_json
from consumers.runner import load_consumer
from consumers.testing import AsyncCommunicator, Communicator, Sent


class Chat(AsyncConsumer):
    groups = ["chat_lobby"]

    async def chat_message(self, message):
        await self.group_send("chat_lobby", {"type": "chat.echo", "text": message["text"]})

    async def _secret(self, message):
        raise AssertionError("private methods are never handlers")

    async def reply(self, message):
        await self.send(message["reply_to"], {"type": "reply", "me": self.channel_name})


class Blocking(Consumer):
    channels = ["thumbnails"]

    def image_resize(self, message):
        self.send("results", {"type": "image.done", "thread": threading.current_thread().name,
                              "data": message["data"]})


# -- dispatch --------------------------------------------------------------------------------

def test_message_type_calls_the_method_with_periods_as_underscores():
    with Communicator(Chat) as chat:
        sent = chat.handle({"type": "chat.message", "text": "hi"})
    assert sent == [Sent("group_send", "chat_lobby", {"type": "chat.echo", "text": "hi"})]


def test_handler_table_is_built_once_per_class_when_it_is_defined():
    assert set(Chat.handlers) == {"chat_message", "reply"}
    assert set(Blocking.handlers) == {"image_resize"}
    assert Chat.handler_for({"type": "chat.message"}) is Chat.__dict__["chat_message"]


@pytest.mark.parametrize("message_type", ["_secret", "._secret", "__init__", "__class__"])
def test_types_that_would_call_an_underscore_method_are_refused(message_type):
    with pytest.raises(UnhandledMessage, match="start with '_'") as caught:
        Chat.handler_for({"type": message_type})
    assert caught.value.type == message_type


def test_unhandled_type_raises_an_error_naming_the_type_and_the_consumer():
    with pytest.raises(UnhandledMessage) as caught:
        Chat.handler_for({"type": "chat.typing"})
    err = caught.value
    assert (err.type, err.consumer) == ("chat.typing", "Chat")
    assert "'chat.typing'" in str(err) and "Chat" in str(err) and "chat_message" in str(err)
    assert isinstance(err, ConsumerError) and isinstance(err, LookupError)


def test_message_without_a_type_string_is_unhandled():
    with pytest.raises(UnhandledMessage, match="without a 'type'"):
        Chat.handler_for({"text": "hi"})


@pytest.mark.parametrize("message_type", ["send", "group.send", "group.add", "on.start", "on.stop",
                                          "dispatch", "start", "stop", "handler.for"])
def test_helpers_and_hooks_are_never_handlers(message_type):
    with pytest.raises(UnhandledMessage, match="no handler"):
        Chat.handler_for({"type": message_type})


def test_subclasses_inherit_extend_and_switch_off_handlers():
    class Moderated(Chat):
        reply = None

        async def chat_ban(self, message):
            pass

    assert set(Moderated.handlers) == {"chat_message", "chat_ban"}
    assert set(Chat.handlers) == {"chat_message", "reply"}


def test_async_consumer_refuses_a_blocking_handler_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"Bad.chat_message must be 'async def'"):
        class Bad(AsyncConsumer):
            def chat_message(self, message):
                pass


def test_blocking_consumer_refuses_an_async_handler_or_hook():
    with pytest.raises(TypeError, match=r"Bad.on_start is 'async def'"):
        class Bad(Consumer):
            async def on_start(self):
                pass


@pytest.mark.parametrize("groups, problem", [
    ("chat", "must be a list of names"),
    (["ok", "not ok"], "Group name must be"),
])
def test_groups_must_be_a_list_of_valid_group_names(groups, problem):
    with pytest.raises(TypeError, match=problem):
        type("Bad", (AsyncConsumer,), {"groups": groups})


def test_work_channels_must_be_normal_channel_names():
    with pytest.raises(TypeError, match="process-specific"):
        type("Bad", (AsyncConsumer,), {"channels": ["specific.abcd!x"]})


def test_a_consumer_cannot_be_both_kinds():
    with pytest.raises(TypeError, match="both"):
        type("Both", (AsyncConsumer, Consumer), {})


# -- lifecycle ------------------------------------------------------------------------------

class Hooks(AsyncConsumer):
    groups = ["a", "b"]

    async def on_start(self):
        await self.group_send("a", {"type": "hello", "in_groups": True})

    async def on_stop(self):
        await self.send("audit", {"type": "bye"})


def test_start_joins_the_groups_then_runs_on_start_and_stop_runs_on_stop_then_leaves():
    hooks = Communicator(Hooks)
    assert hooks.start() == [Sent("group_send", "a", {"type": "hello", "in_groups": True})]
    assert hooks.groups == {"a": {hooks.channel_name}, "b": {hooks.channel_name}}
    assert hooks.stop() == [Sent("send", "audit", {"type": "bye"})]
    assert hooks.groups == {}


def test_each_instance_has_its_own_channel_name():
    with Communicator(Chat) as one, Communicator(Chat) as two:
        names = {one.channel_name, two.channel_name}
    assert len(names) == 2 and all(name.startswith("specific.") and "!" in name for name in names)


def test_an_instance_may_choose_its_groups_before_it_starts():
    class Room(AsyncConsumer):
        def __init__(self, room):
            self.groups = [f"chat_{room}"]

    with Communicator(Room("kitchen")) as room:
        assert set(room.groups) == {"chat_kitchen"}


def test_blocking_handlers_run_in_the_instances_own_thread_and_bytes_survive():
    with Communicator(Blocking) as blocking:
        first = blocking.handle({"type": "image.resize", "data": b"\x89PNG"})
        second = blocking.handle({"type": "image.resize", "data": b"\x00"})
    threads = {first[0].message["thread"], second[0].message["thread"]}
    assert threads == {first[0].message["thread"]} and threads != {threading.current_thread().name}
    assert first[0].message["data"] == b"\x89PNG"


def test_blocking_helpers_refuse_to_run_on_the_event_loop():
    async def scenario():
        async with AsyncCommunicator(Blocking) as blocking:
            with pytest.raises(RuntimeError, match="not from the event loop"):
                blocking.consumer.send("x", {"type": "t"})

    asyncio.run(scenario())


def test_helpers_before_start_say_the_consumer_is_not_started():
    with pytest.raises(RuntimeError, match="not started"):
        Blocking().send("x", {"type": "t"})


# -- the communicators ------------------------------------------------------------------------

def test_async_communicator_drives_a_consumer_on_the_tests_own_loop():
    async def scenario():
        async with AsyncCommunicator(Chat) as chat:
            return chat.channel_name, await chat.handle({"type": "reply", "reply_to": "back"})

    me, sent = asyncio.run(scenario())
    assert sent == [Sent("send", "back", {"type": "reply", "me": me})]


def test_communicator_raises_what_the_handler_raised():
    class Failing(AsyncConsumer):
        async def explode(self, message):
            raise ValueError("boom")

    with Communicator(Failing) as failing, pytest.raises(ValueError, match="boom"):
        failing.handle({"type": "explode"})


def test_communicator_checks_names_and_serialisation_as_the_real_client_does():
    class Sloppy(AsyncConsumer):
        async def bad_name(self, message):
            await self.send("not a channel", {"type": "x"})

        async def bad_value(self, message):
            await self.send("ok", {"type": "x", "when": object()})

    with Communicator(Sloppy) as sloppy:
        with pytest.raises(InvalidName):
            sloppy.handle({"type": "bad.name"})
        with pytest.raises(TypeError, match="msgpack"):
            sloppy.handle({"type": "bad.value"})
    assert sloppy.sent == []


def test_communicator_records_everything_sent_in_order():
    with Communicator(Chat) as chat:
        chat.handle({"type": "chat.message", "text": "1"})
        chat.handle({"type": "reply", "reply_to": "r"})
    assert [s.kind for s in chat.sent] == ["group_send", "send"]


# -- loading MODULE:ATTR ------------------------------------------------------------------------

def test_load_consumer_imports_module_and_attribute():
    assert load_consumer("examples.workers.worker:Worker").__name__ == "Worker"


@pytest.mark.parametrize("spec, error, text", [
    ("examples.workers.worker", ValueError, "MODULE:ATTR"),
    ("examples.workers.worker:Nope", LookupError, "no attribute 'Nope'"),
    ("examples.workers.worker:digest", TypeError, "not a subclass"),
    ("consumers:AsyncConsumer", TypeError, "not a subclass"),
    ("no_such_module_here:X", ImportError, "no_such_module_here"),
])
def test_load_consumer_says_what_is_wrong(spec, error, text):
    with pytest.raises(error, match=text):
        load_consumer(spec)


# -- JSON for the debugging commands -------------------------------------------------------------

def test_bytes_are_shown_as_base64_objects_and_read_back():
    message = {"type": "image", "data": b"\x00\xff", "nested": [{"more": b"ab"}], "n": 1}
    line = to_json(message)
    assert '{"$bytes": "AP8="}' in line and "\n" not in line
    assert from_json(line) == message


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    ('["type"]', "JSON object with a \"type\" string"),
    ('{"text": "no type"}', "JSON object with a \"type\" string"),
    ('{"type": "x", "data": {"$bytes": "***"}}', "base64"),
])
def test_from_json_says_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=problem):
        from_json(text)
