"""The broker's inbox queue and its expiry bookkeeping (``broker.inbox``), without sockets:
time is a number passed in."""

from __future__ import annotations

import random

from broker.inbox import NEVER, Inbox


def bodies(items) -> list[bytes]:
    return [body for body, _ in items]


def test_an_ordered_queue_loses_exactly_its_expired_head_and_a_live_queue_is_left_alone():
    inbox = Inbox()
    for n in range(1000):
        inbox.add(b"m%d" % n, 100.0 + n)  # one expiry setting: expiry follows arrival
    queue = inbox.queue
    assert inbox.expire(99.0) == [] and inbox.queue is queue  # nothing due: not even a scan
    assert bodies(inbox.expire(102.0)) == [b"m0", b"m1", b"m2"]
    assert inbox.queue is queue and len(queue) == 997 and inbox.soonest == 103.0
    assert bodies(inbox.expire(2000.0)) == [b"m%d" % n for n in range(3, 1000)]
    assert not inbox.queue and inbox.soonest == NEVER


def test_a_message_that_expires_sooner_than_those_ahead_of_it_goes_when_it_expires():
    inbox = Inbox()
    inbox.add(b"long", 200.0)  # a sender with a long expiry...
    inbox.add(b"short", 110.0)  # ...then one with a short one
    inbox.add(b"long2", 210.0)
    assert not inbox.ordered and inbox.soonest == 110.0
    assert inbox.expire(109.0) == []
    assert bodies(inbox.expire(110.0)) == [b"short"]
    assert bodies(inbox.queue) == [b"long", b"long2"] and inbox.soonest == 200.0


def test_requeued_messages_go_back_to_the_head_in_order_and_still_expire_on_time():
    inbox = Inbox()
    inbox.add(b"c", 300.0)
    inbox.requeue([(b"a", 150.0), (b"b", 250.0)])  # pushed earlier, never acknowledged
    assert bodies(inbox.queue) == [b"a", b"b", b"c"] and inbox.ordered
    assert bodies(inbox.expire(200.0)) == [b"a"]
    inbox.requeue([(b"z", 400.0)])  # a later expiry ahead of earlier ones
    assert not inbox.ordered
    assert bodies(inbox.expire(260.0)) == [b"b"]
    assert bodies(inbox.queue) == [b"z", b"c"]


def test_clearing_returns_what_was_queued_and_forgets_its_expiry_times():
    inbox = Inbox()
    inbox.add(b"x", 5.0)
    inbox.add(b"y", 1.0)
    assert bodies(inbox.clear()) == [b"x", b"y"]
    assert not inbox.queue and inbox.soonest == NEVER and inbox.ordered


def test_expire_matches_a_plain_filter_whatever_is_added_requeued_or_taken():
    """Against a model that simply filters the whole queue at every step."""
    rng = random.Random(20261126)
    for _ in range(200):
        inbox, model, now, serial = Inbox(), [], 0.0, 0
        for _ in range(60):
            op = rng.random()
            if op < 0.45:
                item = (b"%d" % serial, now + rng.choice([1.0, 1.0, 5.0, rng.uniform(0.1, 10.0)]))
                serial += 1
                inbox.add(*item)
                model.append(item)
            elif op < 0.6 and model:  # a push: taken from the head, some of it requeued later
                taken = [inbox.queue.popleft() for _ in range(min(len(model), rng.randint(1, 3)))]
                del model[:len(taken)]
                back = taken[:rng.randint(0, len(taken))]
                inbox.requeue(back)
                model[:0] = back
            else:
                now += rng.uniform(0.0, 2.0)
                expired = inbox.expire(now)
                assert sorted(expired) == sorted(item for item in model if item[1] <= now)
                model = [item for item in model if item[1] > now]
            assert list(inbox.queue) == model
            assert all(expires_at >= inbox.soonest for _, expires_at in inbox.queue)
