"""``python -m examples.chat ROOM --name NAME [--broker URL]``: join a chat room (see
``examples.chat``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from clients import BusError

from examples import client_keys

from .participant import check_room, run_chat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.chat", description="Chat with everyone in ROOM through the broker.",
    )
    parser.add_argument("room", metavar="ROOM", help="room to join (letters, digits, - _ .)")
    parser.add_argument("--name", required=True, help="your name, shown before your lines")
    parser.add_argument("--broker", default=os.environ.get("CHANNELBUS_BROKER", "tcp://127.0.0.1:5555"),
                        help="broker URL, or several comma-separated (default: $CHANNELBUS_BROKER or"
                             " tcp://127.0.0.1:5555); CURVE keys from $CHANNELBUS_SECRET_KEY and"
                             " $CHANNELBUS_SERVER_KEY")
    args = parser.parse_args(argv)
    try:
        check_room(args.room)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(run_chat(args.room, args.name, args.broker, **client_keys()))
    except BusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
