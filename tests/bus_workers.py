"""Client code that the integration tests run in separate processes, and the runner for it.

``ProcessRunner.start(func, *args, **kwargs)`` runs a module-level function of this module in a process
made with the "spawn" start method (a fresh interpreter, no state inherited from pytest) and
returns a ``Worker`` whose ``result()`` is the function's return value, or an AssertionError
carrying the child's traceback. Coordination between processes goes through the runner's queues
and events, never through sleeps.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue as queue_module
import time
import traceback

from clients import AsyncClient, ChannelFull, Client, ReceiveTimeout

STOP_SECONDS = 5.0
FULL_BACKOFF = 0.002  # seconds a sender waits after ChannelFull before it tries again
RECEIVE_TIMEOUT = 30.0


# -- the runner ---------------------------------------------------------------------------------

def _run(func, args, kwargs, results) -> None:
    try:
        results.put(("ok", func(*args, **kwargs)))
    except BaseException:
        results.put(("error", traceback.format_exc()))


class Worker:
    """One spawned process running ``func(*args)``."""

    def __init__(self, process, results, name: str) -> None:
        self.process = process
        self._results = results
        self.name = name

    def result(self, timeout: float = 60.0):
        """The function's return value; AssertionError if it raised, died or took too long."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, value = self._results.get(timeout=0.2)
                break
            except queue_module.Empty:
                if not self.process.is_alive():
                    try:  # it may have put its result just before exiting
                        status, value = self._results.get(timeout=1.0)
                        break
                    except queue_module.Empty:
                        raise AssertionError(
                            f"{self.name} exited with code {self.process.exitcode} and no result"
                        ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} gave no result within {timeout:g} s") from None
        if status == "error":
            raise AssertionError(f"{self.name} failed in its process:\n{value}")
        return value


class ProcessRunner:
    """Starts workers in spawned processes and stops every one of them in ``stop_all()``."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("spawn")
        self._workers: list[Worker] = []
        self._queues: list = []

    def start(self, func, *args, **kwargs) -> Worker:
        results = self.queue()
        name = f"{func.__name__}#{len(self._workers)}"
        process = self.context.Process(
            target=_run, args=(func, args, kwargs, results), name=name, daemon=True,
        )
        process.start()
        worker = Worker(process, results, name)
        self._workers.append(worker)
        return worker

    def queue(self):
        q = self.context.Queue()
        self._queues.append(q)
        return q

    def event(self):
        return self.context.Event()

    def stop_all(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in self._workers:
            worker.process.join(STOP_SECONDS)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(STOP_SECONDS)
        for q in self._queues:
            q.cancel_join_thread()  # data nobody will read must not block the test process
            q.close()


# -- helpers run inside workers -----------------------------------------------------------------

def prime(bus: Client, channel: str) -> None:
    """Grant the broker credit for ``channel`` and make sure it has handled it: the PING goes
    after the CREDIT on the same connection, so its reply proves the broker has seen both."""
    try:
        bus.receive(channel, timeout=0.01)
    except ReceiveTimeout:
        pass
    bus.ping()


def send_with_retry(bus: Client, channel: str, message: dict, full=None) -> int:
    """Send, waiting and retrying while the channel is full (setting the event ``full`` if
    given); return how many retries it took."""
    retries = 0
    while True:
        try:
            bus.send(channel, message)
            return retries
        except ChannelFull:
            if full is not None:
                full.set()
            retries += 1
            time.sleep(FULL_BACKOFF)


async def async_send_with_retry(bus: AsyncClient, channel: str, message: dict) -> int:
    retries = 0
    while True:
        try:
            await bus.send(channel, message)
            return retries
        except ChannelFull:
            retries += 1
            await asyncio.sleep(FULL_BACKOFF)


def leftovers(bus: Client, channel: str, timeout: float = 0.3) -> list:
    """Whatever ``channel`` still delivers before ``timeout`` passes with nothing."""
    extra = []
    while True:
        try:
            extra.append(bus.receive(channel, timeout=timeout))
        except ReceiveTimeout:
            return extra


# -- workers ------------------------------------------------------------------------------------

def send_sequence(url: str, channel: str, count: int, full=None, **settings) -> int:
    """Send ``{"n": 0..count-1}`` to ``channel``; return the number of ChannelFull retries."""
    with Client(url, **settings) as bus:
        return sum(send_with_retry(bus, channel, {"type": "seq", "n": n}, full) for n in range(count))


def receive_sequence(url: str, channel: str, count: int, ready) -> tuple[list, list]:
    """Receive ``count`` messages from ``channel`` (after setting ``ready``); return their
    numbers and anything that came after them."""
    with Client(url) as bus:
        prime(bus, channel)
        ready.set()
        got = [bus.receive(channel, timeout=RECEIVE_TIMEOUT)["n"] for _ in range(count)]
        return got, leftovers(bus, channel)


def async_send_sequence(url: str, channel: str, count: int) -> int:
    async def main() -> int:
        async with AsyncClient(url) as bus:
            retries = 0
            for n in range(count):
                retries += await async_send_with_retry(bus, channel, {"type": "seq", "n": n})
            return retries

    return asyncio.run(main())


def async_receive_sequence(url: str, channel: str, count: int, ready) -> tuple[list, list]:
    async def main() -> tuple[list, list]:
        async with AsyncClient(url) as bus:
            try:
                await bus.receive(channel, timeout=0.01)
            except ReceiveTimeout:
                pass
            await bus.ping()
            ready.set()
            got = [(await bus.receive(channel, timeout=RECEIVE_TIMEOUT))["n"] for _ in range(count)]
            extra = []
            while True:
                try:
                    extra.append(await bus.receive(channel, timeout=0.3))
                except ReceiveTimeout:
                    return got, extra

    return asyncio.run(main())


def echo(url: str, inbox: str, outbox: str, count: int, ready) -> int:
    """Answer ``count`` messages of ``inbox`` on ``outbox`` (after setting ``ready``); return
    how many it answered."""
    with Client(url) as bus:
        prime(bus, inbox)
        ready.set()
        for _ in range(count):
            bus.send(outbox, bus.receive(inbox, timeout=RECEIVE_TIMEOUT))
        return count


def compete(url: str, channel: str, ready, stop, out) -> int:
    """One of several receivers on ``channel``: put the numbers received on ``out`` in batches
    until ``stop`` is set and nothing more comes; return how many were received."""
    total = 0
    batch: list[int] = []
    with Client(url) as bus:
        prime(bus, channel)
        ready.set()
        while True:
            try:
                batch.append(bus.receive(channel, timeout=0.05)["n"])
                if len(batch) < 100:
                    continue
            except ReceiveTimeout:
                if stop.is_set():
                    break
            if batch:  # a full batch, or a lull: report what we have
                out.put(batch)
                total += len(batch)
                batch = []
        return total


def send_once(url: str, channel: str, message: dict, **settings) -> None:
    with Client(url, **settings) as bus:
        bus.send(channel, message)


def receive_one(url: str, channel: str, timeout: float, **settings) -> dict:
    with Client(url, **settings) as bus:
        return bus.receive(channel, timeout=timeout)


def group_member(url: str, group: str, ready, timeout: float, **settings) -> dict:
    """Join ``group`` with a channel of this process's own, say ready, return one group message."""
    with Client(url, **settings) as bus:
        me = bus.new_channel()
        bus.group_add(group, me)
        ready.set()
        return bus.receive(me, timeout=timeout)


def idle_holder(url: str, channel: str, capacity: int, sent, go) -> str:
    """Send two messages to ``channel`` (the second reserves slots), report on ``sent``, then
    stay idle (no client call, so no RECALL is read) until ``go``; then try one more send and
    return "ok" or "full"."""
    with Client(url, capacity=capacity) as bus:
        for i in range(2):
            bus.send(channel, {"type": "held", "i": i})
        sent.set()
        if not go.wait(RECEIVE_TIMEOUT):
            raise AssertionError("never told to go on")
        try:
            bus.send(channel, {"type": "held", "i": 2})
            return "ok"
        except ChannelFull:
            return "full"


def own_channel(url: str, names, count: int) -> tuple[str, list]:
    """Make a process-specific channel, publish its name on ``names``, receive ``count``."""
    with Client(url) as bus:
        channel = bus.new_channel()
        names.put(channel)
        return channel, [bus.receive(channel, timeout=RECEIVE_TIMEOUT) for _ in range(count)]


def group_members(url: str, group: str, n_channels: int, ready) -> dict:
    """Add ``n_channels`` new channels to ``group``, report on ``ready``, then receive on each
    until an ``end`` message; return ``{channel: [i, ...]}``."""
    with Client(url) as bus:
        channels = [bus.new_channel() for _ in range(n_channels)]
        for channel in channels:
            bus.group_add(group, channel)
        ready.put(channels)
        received = {}
        for channel in channels:
            seen = received[channel] = []
            while True:
                message = bus.receive(channel, timeout=RECEIVE_TIMEOUT)
                if message["type"] == "end":
                    break
                seen.append(message["i"])
        return received


def race_member(url: str, rounds: int, requests, max_lost: int = 3) -> list[int]:
    """Each round: a new channel joins a new group and asks for a group_send at once; return
    the rounds whose message never came."""
    lost = []
    with Client(url) as bus:
        for r in range(rounds):
            channel = bus.new_channel()
            bus.group_add(f"race{r}", channel)
            requests.put(r)
            try:
                message = bus.receive(channel, timeout=2)
                assert message == {"type": "race", "r": r}, message
            except ReceiveTimeout:
                lost.append(r)
                if len(lost) >= max_lost:
                    break
    requests.put(None)
    return lost


def race_sender(url: str, requests) -> int:
    """group_send to ``race<r>`` for each ``r`` read from ``requests`` until None."""
    sent = 0
    with Client(url) as bus:
        while (r := requests.get(timeout=60)) is not None:
            bus.group_send(f"race{r}", {"type": "race", "r": r})
            sent += 1
    return sent


def join_target(url: str, names, count: int, timeout: float) -> list:
    """Own a channel that another process adds to groups; receive up to ``count`` messages."""
    got = []
    with Client(url) as bus:
        channel = bus.new_channel()
        names.put(channel)
        try:
            for _ in range(count):
                got.append(bus.receive(channel, timeout=timeout))
        except ReceiveTimeout:
            pass
    return got


# -- issue 12's scenarios: concurrent sends at capacity, shared receivers, threads ---------------

def concurrent_async_sends(url: str, channel: str, count: int, tasks: int, capacity: int) -> dict:
    """``tasks`` concurrent sends on one AsyncClient (each retrying after ChannelFull) of
    ``count`` numbered messages; the numbers whose send returned, and what else was raised."""
    async def main() -> dict:
        sent, errors = [], []
        numbers = iter(range(count))
        async with AsyncClient(url, capacity=capacity) as bus:
            async def task() -> None:
                for n in numbers:
                    while True:
                        try:
                            await bus.send(channel, {"type": "job", "n": n})
                            sent.append(n)
                            break
                        except ChannelFull:
                            await asyncio.sleep(0.001)
                        except Exception as exc:  # noqa: BLE001 (the test says what it was)
                            errors.append(repr(exc))
                            break

            await asyncio.gather(*(task() for _ in range(tasks)))
        return {"sent": sent, "errors": errors}

    return asyncio.run(main())


def drain(url: str, channel: str, idle: float, ready) -> list[int]:
    """Receive from ``channel`` (asyncio) until nothing comes for ``idle`` seconds; the numbers."""
    async def main() -> list[int]:
        got = []
        async with AsyncClient(url) as bus:
            first = True
            while True:
                try:
                    got.append((await bus.receive(channel, timeout=idle if not first else 0.01))["n"])
                except ReceiveTimeout:
                    if first:
                        ready.set()
                        first = False
                        continue
                    return got

    return asyncio.run(main())


def threads_sharing_a_client(url: str, channel: str, count: int, threads: int, capacity: int) -> dict:
    """One blocking Client shared by ``threads`` threads that send ``count`` numbered messages
    between them (retrying after ChannelFull) while as many threads receive them from the same
    client; what was sent and received, and anything raised."""
    import threading

    sent, received, errors = [], [], []
    numbers = iter(range(count))
    lock = threading.Lock()
    done = threading.Event()
    with Client(url, capacity=capacity) as bus:
        def sender() -> None:
            while True:
                with lock:
                    n = next(numbers, None)
                if n is None:
                    return
                while True:
                    try:
                        bus.send(channel, {"type": "job", "n": n})
                        with lock:
                            sent.append(n)
                        break
                    except ChannelFull:
                        time.sleep(0.001)
                    except Exception as exc:  # noqa: BLE001
                        errors.append(repr(exc))
                        return

        def receiver() -> None:
            while not (done.is_set() and len(received) >= len(sent)):
                try:
                    message = bus.receive(channel, timeout=0.05)
                    with lock:
                        received.append(message["n"])
                except ReceiveTimeout:
                    pass
                except Exception as exc:  # noqa: BLE001
                    errors.append(repr(exc))
                    return

        senders = [threading.Thread(target=sender) for _ in range(threads)]
        receivers = [threading.Thread(target=receiver) for _ in range(threads)]
        for thread in senders + receivers:
            thread.start()
        for thread in senders:
            thread.join(60)
        done.set()
        for thread in receivers:
            thread.join(60)
        alive = sum(thread.is_alive() for thread in senders + receivers)
    return {"sent": sent, "received": received, "errors": errors, "alive": alive}
