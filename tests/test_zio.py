"""broker.zio against real ZeroMQ sockets: whole messages in and out, and ``readable``."""

from __future__ import annotations

import time

import pytest
import zmq

from broker.zio import readable, recv_frames, send_frames

pytestmark = pytest.mark.timeout(30)


def wait_readable(sock: zmq.Socket, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not readable(sock):
        assert time.monotonic() < deadline, "nothing arrived"
        time.sleep(0.001)


def test_a_message_goes_and_comes_whole_with_empty_and_binary_frames(router_dealer):
    router, dealer = router_dealer
    frames = [b"\x01POST", b"", b"\x00\xff" * 100, b"last"]
    send_frames(dealer, frames)
    wait_readable(router)
    assert recv_frames(router) == [b"peer", *frames]
    send_frames(router, [b"peer", b"one"])
    wait_readable(dealer)
    assert recv_frames(dealer) == [b"one"]


def test_readable_says_whether_a_message_waits_and_never_blocks(router_dealer):
    router, dealer = router_dealer
    assert not readable(router)
    for n in range(3):
        send_frames(dealer, [b"%d" % n])
    got = []
    while len(got) < 3:
        wait_readable(router)
        got.append(recv_frames(router)[1])
    assert got == [b"0", b"1", b"2"]
    assert not readable(router)
    with pytest.raises(zmq.Again):
        recv_frames(router)  # (NOBLOCK: nothing waits, as readable said)
