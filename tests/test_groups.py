"""Pure tests of group membership with expiry (``broker.groups.Groups``)."""

from __future__ import annotations

from broker.groups import Groups

B1 = "specific.bbbb2222!x"
B2 = "specific.bbbb2222!y"
C1 = "specific.cccc3333!x"


def test_members_lists_the_channels_added_to_a_group():
    groups = Groups()
    groups.add("room", "inbox", 10.0)
    groups.add("room", B1, 10.0)
    groups.add("other", C1, 10.0)
    assert sorted(groups.members("room", 0.0)) == sorted(["inbox", B1])
    assert groups.members("nobody", 0.0) == []
    assert groups.sizes() == {"room": 2, "other": 1}
    assert len(groups) == 2


def test_members_drops_expired_memberships_on_the_way():
    groups = Groups()
    groups.add("room", "old", 5.0)
    groups.add("room", "new", 50.0)
    assert groups.members("room", 5.0) == ["new"]  # expiry is exclusive: at 5.0 it is gone
    assert groups.sizes() == {"room": 1}


def test_a_group_whose_members_all_expired_disappears():
    groups = Groups()
    groups.add("room", B1, 5.0)
    assert groups.members("room", 6.0) == []
    assert len(groups) == 0
    assert groups._by_owner == {}  # no empty index entry is left behind to leak memory


def test_adding_again_moves_the_expiry():
    groups = Groups()
    groups.add("room", "inbox", 5.0)
    groups.add("room", "inbox", 20.0)
    assert groups.expires_at("room", "inbox") == 20.0
    assert groups.is_member("room", "inbox", 10.0)


def test_is_member_is_false_after_expiry_and_removes_the_membership():
    groups = Groups()
    groups.add("room", "inbox", 5.0)
    assert groups.is_member("room", "inbox", 4.9)
    assert not groups.is_member("room", "inbox", 5.0)
    assert not groups.is_member("room", "other", 0.0)
    assert groups.sizes() == {}


def test_discard_reports_whether_the_membership_existed():
    groups = Groups()
    groups.add("room", B1, 5.0)
    assert groups.discard("room", B1) is True
    assert groups.discard("room", B1) is False
    assert groups.discard("nobody", B1) is False
    assert len(groups) == 0


def test_expire_removes_every_due_membership_and_counts_them():
    groups = Groups()
    groups.add("a", "x", 1.0)
    groups.add("a", B1, 2.0)
    groups.add("b", "x", 3.0)
    assert groups.expire(2.0) == 2
    assert groups.sizes() == {"b": 1}
    assert groups.expire(2.5) == 0


def test_drop_owner_removes_its_channels_from_every_group_and_nothing_else():
    groups = Groups()
    for group in ("a", "b"):
        groups.add(group, B1, 10.0)
        groups.add(group, C1, 10.0)
    groups.add("a", B2, 10.0)
    groups.add("a", "inbox", 10.0)
    dropped = groups.drop_owner("bbbb2222")
    assert sorted(dropped) == [("a", B1), ("a", B2), ("b", B1)]
    assert sorted(groups.members("a", 0.0)) == sorted([C1, "inbox"])
    assert groups.members("b", 0.0) == [C1]
    assert groups.drop_owner("bbbb2222") == []


def test_discarded_channels_are_not_dropped_again_with_their_owner():
    groups = Groups()
    groups.add("a", B1, 10.0)
    groups.add("b", B1, 10.0)
    groups.discard("a", B1)
    assert groups.drop_owner("bbbb2222") == [("b", B1)]


def test_clear_forgets_every_group_and_owner():
    groups = Groups()
    groups.add("a", B1, 10.0)
    groups.add("b", "inbox", 10.0)
    groups.clear()
    assert len(groups) == 0
    assert groups.drop_owner("bbbb2222") == []
    assert groups.members("b", 0.0) == []
