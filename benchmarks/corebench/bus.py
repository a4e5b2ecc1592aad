"""The bus set-up's processes: an ``AsyncClient`` sender and receiver (the broker is the CLI);
with ``--secret-key`` and ``--server-key`` the clients use CURVE (their broker has keys)."""

from __future__ import annotations

import time

from .common import (
    Arrivals, PING_CHANNEL, PONG_CHANNEL, RECV_POLL_MS, TP_CHANNEL, RoundTrips, emit, make_message, wait_word,
)


async def _bus_client(args):
    from clients import AsyncClient, ReceiveTimeout

    client = AsyncClient(args.endpoint, capacity=args.capacity, expiry=60, timeout=10,
                         secret_key=args.secret_key, server_key=args.server_key)
    await client.connect()
    return client, ReceiveTimeout


async def _grant(client, ReceiveTimeout, channel: str) -> None:
    """Start receiving ``channel`` (the client grants credit) and make sure the broker has it."""
    try:
        await client.receive(channel, timeout=0.001)
    except ReceiveTimeout:
        pass
    await client.ping()


async def _bus_receiver(args) -> None:
    client, ReceiveTimeout = await _bus_client(args)
    try:
        await _grant(client, ReceiveTimeout, TP_CHANNEL)
        await _grant(client, ReceiveTimeout, PING_CHANNEL)
        emit(ready=True)
        deadline = time.monotonic() + args.timeout
        arrivals = Arrivals()
        while arrivals.count < args.messages and time.monotonic() < deadline:
            try:
                message = await client.receive(TP_CHANNEL, timeout=RECV_POLL_MS / 1000)
            except ReceiveTimeout:
                continue
            arrivals.see(int.from_bytes(message["seq"], "big"))
        arrivals.report()
        total = args.rtt + args.warmup
        answered = 0
        while answered < total and time.monotonic() < deadline:
            try:
                message = await client.receive(PING_CHANNEL, timeout=RECV_POLL_MS / 1000)
            except ReceiveTimeout:
                continue
            await client.send(PONG_CHANNEL, message)
            answered += 1
        emit(answered=answered)
    finally:
        await client.close()


async def _bus_sender(args) -> None:
    import asyncio

    from clients import ChannelFull

    client, ReceiveTimeout = await _bus_client(args)
    try:
        await _grant(client, ReceiveTimeout, PONG_CHANNEL)
        emit(ready=True)
        wait_word("go")  # blocks the loop on purpose: nothing is in flight yet
        deadline = time.monotonic() + args.timeout
        state = {"next": 0, "sent": 0, "retries": 0, "retrying": 0}
        gate = asyncio.Event()  # cleared while a ChannelFull is being retried: no new sends start
        gate.set()

        async def worker() -> None:
            while time.monotonic() < deadline:
                if not gate.is_set():
                    try:
                        await asyncio.wait_for(gate.wait(), max(0.001, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        return
                    continue
                seq = state["next"]
                if seq >= args.messages:
                    return
                state["next"] = seq + 1
                message = make_message(seq)
                pause, retrying = 0.001, False
                while True:
                    try:
                        await client.send(TP_CHANNEL, message)  # written to the socket in seq order
                        break
                    except ChannelFull:
                        # Retry the same message with backoff and hold back later ones, so order
                        # survives (sends already in flight can still overtake it: the receiver
                        # counts that as disorder) and retries do not flood the broker.
                        state["retries"] += 1
                        if not retrying:
                            retrying = True
                            state["retrying"] += 1
                            gate.clear()
                        if time.monotonic() > deadline:
                            return
                        await asyncio.sleep(pause)
                        pause = min(0.05, pause * 2)
                if retrying:
                    state["retrying"] -= 1
                    if not state["retrying"]:
                        gate.set()
                state["sent"] += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(max(1, args.window))))
        emit(t0=t0, sent=state["sent"], retries=state["retries"], t_sent=time.monotonic())
        wait_word("go")
        trips = RoundTrips(args, deadline)
        for seq in trips:
            start = trips.clock()
            await client.send(PING_CHANNEL, make_message(seq))
            try:
                await client.receive(PONG_CHANNEL, timeout=5)
            except ReceiveTimeout:
                break
            trips.took(seq, start)
        trips.report()
    finally:
        await client.close()


def role_bus_receiver(args) -> None:
    import asyncio

    asyncio.run(_bus_receiver(args))


def role_bus_sender(args) -> None:
    import asyncio

    asyncio.run(_bus_sender(args))
