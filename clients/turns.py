"""Threads taking turns at one blocking client's sockets.

``Client`` (``clients.sync``) may be shared by threads, but its ZeroMQ sockets may not be (two
threads in one socket at once abort the process), so every call of the client holds ``lock``
(re-entrant: a connection listener may call the client), and ``Turns`` makes sure that only
one thread at a time is in the sockets:

- A call that must wait for the broker polls the sockets with the lock released (``poll``), and
  says so (``polling``); what it reads, for any thread, it digests once it has the lock back,
  and wakes the threads that sleep on the condition.
- A thread that needs the sockets while another polls them (``await_turn``) interrupts that poll
  with a byte on a pipe the poll also watches, and sleeps until it ends. The poller, before it
  polls again, lets such threads (``queued``) have their turn (``give_way``).

Used from one thread, the lock is never contended and no thread ever sleeps.
"""

from __future__ import annotations

import os
import threading

import zmq


class Turns:
    """The lock, the condition and the wake-up pipe of one client (see the module docstring)."""

    def __init__(self, poller: zmq.Poller) -> None:
        self.lock = threading.RLock()
        self._turn = threading.Condition(self.lock)
        self.polling = False  # a thread is in poll() with the lock released
        self.queued = 0  # threads waiting for the poller to let them at the sockets
        self._sleepers = 0  # threads waiting on _turn (for their turn, or for what others read)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        poller.register(self._wake_r, zmq.POLLIN)

    def await_turn(self) -> None:
        """(Lock held.) Until no other thread polls the sockets: interrupt its poll and sleep
        until it ends. Then the sockets are this thread's until it releases the lock."""
        if not self.polling:
            return
        self.queued += 1
        try:
            while self.polling:
                try:
                    os.write(self._wake_w, b"\0")
                except BlockingIOError:
                    pass  # (the pipe is full of wake-ups already)
                self._sleep(None)
        finally:
            self.queued -= 1

    def give_way(self, timeout: float | None) -> None:
        """(Lock held.) Other threads wait for their turn: sleep until one has had it (or
        ``timeout`` passes), then take the sockets back."""
        self._sleep(timeout)
        self.await_turn()

    def poll(self, poller: zmq.Poller, timeout: float | None) -> dict:
        """(Lock held.) Poll with the lock released, for up to ``timeout`` seconds (forever if
        None, until input or a wake-up); return what is ready, the wake-up pipe drained."""
        self.polling = True
        self.lock.release()
        try:
            ready = dict(poller.poll(None if timeout is None else timeout * 1000))
        finally:
            self.lock.acquire()
            self.polling = False
            self.wake_sleepers()
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except (BlockingIOError, OSError):
                pass
        return ready

    def wake_sleepers(self) -> None:
        """(Lock held.) Wake the threads waiting for their turn or for what was read."""
        if self._sleepers:
            self._turn.notify_all()

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _sleep(self, timeout: float | None) -> None:
        self._sleepers += 1
        try:
            self._turn.wait(timeout)
        finally:
            self._sleepers -= 1
