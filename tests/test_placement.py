"""Placement of names on several brokers (``clients.placement``): the documented hash, its test
vectors (docs/protocol.md, section 18), and its balance. Pure: no sockets."""

from __future__ import annotations

import random

import pytest

from clients.placement import broker_of_channel, broker_of_group, channel_key, place, split_urls

# (name, what places it, sha256(key)[:8] as hex, broker for 2, 3, 4 and 8 brokers): the table
# of docs/protocol.md section 18, which another language's client can check itself against.
VECTORS = [
    ("tasks", "tasks", "085154084c742759", [1, 0, 1, 1]),
    ("chat.lobby", "chat.lobby", "eb9c0862949e6283", [1, 0, 3, 3]),
    ("specific.a1b2c3d4e5f6!x9", "a1b2c3d4e5f6", "bde81e9384b7848e", [0, 2, 2, 6]),
    ("ümlaut", "ümlaut", "e30af24e0a2fbccc", [0, 1, 0, 4]),
]


@pytest.mark.parametrize("name, key, digest, brokers", VECTORS, ids=[v[0] for v in VECTORS])
def test_the_documented_vectors(name, key, digest, brokers):
    assert channel_key(name) == key
    assert [broker_of_channel(name, n) for n in (2, 3, 4, 8)] == brokers
    assert [place(key, n) for n in (2, 3, 4, 8)] == brokers
    assert int(digest, 16) % 8 == brokers[3]


def test_a_group_is_placed_by_its_name_and_one_broker_holds_everything():
    assert broker_of_group("room-42", 4) == place("room-42", 4) == 1
    assert {broker_of_channel(f"c{n}", 1) for n in range(100)} == {0}


def test_every_channel_of_a_client_lives_on_one_broker_whatever_its_prefix():
    places = {broker_of_channel(f"{prefix}.a1b2c3d4e5f6!{n}", 5) for prefix in ("specific", "daphne.response", "x")
              for n in range(50)}
    assert places == {place("a1b2c3d4e5f6", 5)}


@pytest.mark.parametrize("count", range(2, 9))
def test_100000_random_names_spread_evenly(count):
    rng = random.Random(count)
    prefixes = ["chat.", "tasks.", "daphne.response.", "room-", ""]
    loads = [0] * count
    for n in range(100_000):  # (names as projects make them: a prefix and a random part)
        loads[place(f"{prefixes[n % 5]}{rng.getrandbits(rng.randint(8, 64)):x}", count)] += 1
    mean = 100_000 / count
    worst = max(abs(load - mean) / mean for load in loads)
    print(f"{count} brokers: loads {loads}, worst {worst:.2%} off the mean")
    assert worst < 0.03  # (binomial spread: about 1% at 8 brokers; 3% would be a skewed hash)


def test_broker_lists_are_given_once_each_in_order():
    assert split_urls("tcp://a:1, tcp://b:2") == ["tcp://a:1", "tcp://b:2"]
    assert split_urls(["tcp://a:1"]) == ["tcp://a:1"]
    for bad in ("", "tcp://a:1,,tcp://b:2", ["tcp://a:1", "tcp://a:1"], []):
        with pytest.raises(ValueError):
            split_urls(bad)
