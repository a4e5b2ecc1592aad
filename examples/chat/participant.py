"""The chat participant: a consumer in the room's group, plus the lines typed on stdin."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from typing import Callable, TextIO

from clients import AsyncClient
from consumers import AsyncConsumer
from consumers.runner import Runner

MAX_ROOM = 90  # "chat_" + room must stay under the 100-character group name limit


def check_room(room: str) -> str:
    """Return ``room`` if ``chat_<room>`` is a valid group name; raise ValueError."""
    ok = 0 < len(room) <= MAX_ROOM and all(c.isascii() and (c.isalnum() or c in "-_.") for c in room)
    if not ok:
        raise ValueError(f"room must be 1 to {MAX_ROOM} ASCII letters, digits, '-', '_' or '.'; got {room!r}")
    return room


class Participant(AsyncConsumer):
    """One person in one room. Prints what the others say; its own lines are not echoed."""

    def __init__(self, room: str, name: str, out: Callable[[str], None] = print) -> None:
        self.room = check_room(room)
        self.name = name
        self.group = f"chat_{room}"
        self.groups = [self.group]
        self._out = out

    async def on_start(self) -> None:
        self._out(f"* you joined {self.room} as {self.name}; type to chat, Ctrl-D to leave")
        await self.group_send(self.group, {"type": "chat.join", "name": self.name, "from": self.channel_name})

    async def on_stop(self) -> None:
        await self.group_send(self.group, {"type": "chat.leave", "name": self.name, "from": self.channel_name})

    async def _say(self, text: str) -> None:
        await self.group_send(self.group, {
            "type": "chat.message", "name": self.name, "text": text, "from": self.channel_name,
        })

    async def chat_message(self, message: dict) -> None:
        if message["from"] != self.channel_name:
            self._out(f"{message['name']}: {message['text']}")

    async def chat_join(self, message: dict) -> None:
        if message["from"] != self.channel_name:
            self._out(f"* {message['name']} joined")

    async def chat_leave(self, message: dict) -> None:
        if message["from"] != self.channel_name:
            self._out(f"* {message['name']} left")


def _print(line: str) -> None:
    print(line, flush=True)


def _read_lines(stdin: TextIO, loop: asyncio.AbstractEventLoop, lines: asyncio.Queue) -> None:
    # A daemon thread: a blocking read of stdin must never hold the event loop or the exit.
    try:
        for line in stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\r\n"))
        loop.call_soon_threadsafe(lines.put_nowait, None)
    except RuntimeError:  # the loop closed (the chat ended) while a line was being read
        pass


async def run_chat(room: str, name: str, url: str, stdin: TextIO = sys.stdin,
                   out: Callable[[str], None] = _print, **client_settings) -> None:
    """Chat in ``room`` until stdin ends or SIGINT/SIGTERM; announce the join and the leave.
    ``client_settings`` go to the AsyncClient (e.g. CURVE keys)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lines.put_nowait, None)
    participant = Participant(room, name, out)
    async with AsyncClient(url, **client_settings) as client:
        runner = Runner(client, [participant])
        await runner.start()
        threading.Thread(target=_read_lines, args=(stdin, loop, lines), daemon=True).start()
        try:
            while (line := await lines.get()) is not None:
                if line.strip():
                    await participant._say(line)
        finally:
            await runner.stop()
