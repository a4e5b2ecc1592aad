"""The permissions file as pure logic: parsing, globs, the default table, and clear errors."""

from __future__ import annotations

import pytest

from broker.permissions import Permissions, PermissionsError

RULES = {
    "web": {"send": ["chat.*", "specific.*"], "receive": ["replies"], "group_send": ["room.?"],
            "group_add": ["room.*", "lobby"], "stats": True, "flush": False},
    "default": {"receive": ["public.*"], "stats": True},
}


@pytest.fixture
def rules() -> Permissions:
    return Permissions.parse(RULES, "perm.toml")


@pytest.mark.parametrize("action, name, allowed", [
    ("send", "chat.a", True), ("send", "chat.", True), ("send", "chat", False), ("send", "xchat.a", False),
    ("send", "specific.abc!def", True), ("send", "replies", False),
    ("receive", "replies", True), ("receive", "replies2", False), ("receive", "chat.a", False),
    ("group_send", "room.1", True), ("group_send", "room.12", False),
    ("group_add", "room.12", True), ("group_add", "lobby", True), ("group_add", "lobby2", False),
    ("stats", None, True), ("flush", None, False),
])
def test_a_listed_key_gets_what_its_table_grants(rules, action, name, allowed):
    assert rules.allows("web", action, name) is allowed


def test_a_listed_key_does_not_also_get_the_default_table(rules):
    assert rules.allows("other", "receive", "public.news")
    assert not rules.allows("web", "receive", "public.news")


def test_keys_not_listed_get_the_default_table_and_without_one_nothing(rules):
    assert rules.allows("stranger", "stats") and not rules.allows("stranger", "send", "chat.a")
    bare = Permissions.parse({"web": {"send": ["*"]}})
    assert bare.allows("web", "send", "anything")
    for action, name in (("send", "x"), ("receive", "x"), ("group_send", "g"), ("group_add", "g"),
                         ("stats", None), ("flush", None)):
        assert not bare.allows("someone", action, name)
        assert not bare.allows(None, action, name)


def test_globs_are_case_sensitive_and_a_star_spans_dots():
    rules = Permissions.parse({"k": {"send": ["Chat*"]}})
    assert rules.allows("k", "send", "Chat.a.b.c") and not rules.allows("k", "send", "chat.a")


@pytest.mark.parametrize("data, complaint", [
    ({"web": {"sned": ["x"]}}, "unknown action 'sned'"),
    ({"web": {"send": "chat.*"}}, "web].send must be a list of glob patterns"),
    ({"web": {"send": [""]}}, "must be a list of glob patterns"),
    ({"web": {"send": [1]}}, "must be a list of glob patterns"),
    ({"web": {"flush": "yes"}}, "web].flush must be true or false"),
    ({"web": ["send"]}, "[web] must be a table of actions"),
])
def test_a_broken_table_is_refused_naming_the_file_the_key_and_the_action(data, complaint):
    with pytest.raises(PermissionsError) as caught:
        Permissions.parse(data, "perm.toml")
    assert "perm.toml" in str(caught.value) and complaint in str(caught.value)


def test_load_reads_toml_and_says_what_is_wrong_with_a_file(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[web]\nsend = ["chat.*"]\nflush = true\n')
    rules = Permissions.load(str(good))
    assert rules.allows("web", "flush") and rules.allows("web", "send", "chat.x")
    bad = tmp_path / "bad.toml"
    bad.write_text("[web\nsend = 1")
    with pytest.raises(PermissionsError, match="not valid TOML"):
        Permissions.load(str(bad))
    with pytest.raises(PermissionsError, match="cannot read the permissions file"):
        Permissions.load(str(tmp_path / "missing.toml"))
