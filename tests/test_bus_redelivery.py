"""What a receiver that leaves holds goes back to its channel, in order; what it consumed does not."""

from __future__ import annotations

import pytest

from clients import Client, ReceiveTimeout


@pytest.mark.timeout(30)
def test_messages_pushed_to_a_receiver_that_leaves_go_to_the_next_receiver(broker):
    with Client(broker.url) as producer:
        for i in range(10):
            producer.send("jobs", {"type": "job", "i": i})
    with Client(broker.url) as first:
        assert first.receive("jobs", timeout=5)["i"] == 0  # the rest were prefetched, unconsumed
    with Client(broker.url) as second:
        assert [second.receive("jobs", timeout=5)["i"] for _ in range(9)] == list(range(1, 10))
        with pytest.raises(ReceiveTimeout):
            second.receive("jobs", timeout=0.3)  # job 0 was consumed: never handed out twice
