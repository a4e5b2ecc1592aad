"""Multipart send and receive with plain-int flags.

pyzmq's ``send_multipart`` and ``recv_multipart`` combine flag enums on every frame, which costs
more than the ZeroMQ calls themselves for the small frames of this protocol. These do the same
with ints. Used by the broker and both clients (they import only zmq).
"""

from __future__ import annotations

import zmq

NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_Socket = zmq.backend.Socket
_SEND = _Socket.send


def send_frames(sock: zmq.Socket, frames: list[bytes], flags: int = NOBLOCK) -> None:
    """Send ``frames`` as one message; raises zmq.Again (nothing sent) when it cannot now."""
    last = len(frames) - 1
    # A ZeroMQ socket's own send, below pyzmq's Python-level one (which only adds the DRAFT
    # routing_id and group arguments): the same call, a microsecond less per message.
    send = _SEND if isinstance(sock, _Socket) else type(sock).send
    for index, frame in enumerate(frames):
        send(sock, frame, flags | _SNDMORE if index < last else flags)


def recv_frames(sock: zmq.Socket, flags: int = NOBLOCK) -> list[bytes]:
    """Receive one whole message; raises zmq.Again when none is waiting (with NOBLOCK)."""
    recv, more = sock.recv, sock.get
    frames = [recv(flags)]
    while more(_RCVMORE):
        frames.append(recv(flags))
    return frames
