"""Consumers: classes whose methods handle message types, as in Django Channels.

Dispatch
--------
A message's ``type`` names its handler: ``"chat.message"`` calls ``chat_message(message)``
(periods become underscores). The table of handlers (``cls.handlers``) is built once per class,
when the class is defined: every public function of the subclass and of its consumer base
classes is a handler, except the names the framework reserves (the hooks and helpers below).

- A type whose handler name would start with ``_`` is refused: private methods are never
  reachable from the bus, so name your helpers ``_like_this``.
- A type with no handler raises ``UnhandledMessage``, naming the type and the consumer class.
- ``AsyncConsumer`` handlers and hooks must be ``async def``. ``Consumer`` handlers and hooks
  must be plain ``def``: they run in a thread of their own per instance, off the event loop, and
  its helpers block until the broker has answered.

Both kinds handle one message at a time per instance.

Lifecycle
---------
``await consumer.start(client)`` binds the instance to a connected ``AsyncClient``: it takes its
own ``channel_name`` from ``client.new_channel()``, joins every group in ``groups``, then runs
``on_start()``. ``await consumer.stop()`` runs ``on_stop()``, then leaves the groups.
``await consumer.dispatch(message)`` calls the handler. The runner (``consumers.runner``)
receives from ``channel_name`` and from each work channel in ``channels`` (normal channels shared
with every other instance serving them: each message goes to one of them);
``consumers.testing`` drives the same three calls with no broker.

Errors::

    ConsumerError               root of what this module raises
    └── UnhandledMessage (LookupError)   no handler for a message (``type``, ``consumer``)

A class that breaks the rules above fails when it is defined, with ``TypeError``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Coroutine, Mapping, Sequence

from broker.protocol.errors import ProtocolError
from broker.protocol.names import check_channel, check_group, is_specific


class ConsumerError(Exception):
    """Root of the errors raised by consumers."""


class UnhandledMessage(ConsumerError, LookupError):
    """No handler for a message: ``type`` (None if the message has none) and ``consumer``."""

    def __init__(self, message: str, *, type: str | None, consumer: str) -> None:
        super().__init__(message)
        self.type = type
        self.consumer = consumer


def handler_name(message_type: str) -> str:
    """``"chat.message"`` -> ``"chat_message"``: the method a message type calls."""
    return message_type.replace(".", "_")


def _check_names(owner: str, attr: str, names: object, check: Callable, normal_only: bool) -> tuple:
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple, set, frozenset)):
        raise TypeError(f"{owner}.{attr} must be a list of names, such as [\"example\"]; got {names!r}")
    for name in names:
        try:
            check(name)
        except ProtocolError as err:
            raise TypeError(f"{owner}.{attr}: {err.message}") from None
        if normal_only and is_specific(name):
            raise TypeError(
                f"{owner}.{attr}: {name!r} is process-specific (it has '!'); a work channel"
                " shared by instances must be a normal channel name"
            )
    return tuple(names)


class BaseConsumer:
    """What ``AsyncConsumer`` and ``Consumer`` share; subclass one of those, not this."""

    #: Groups every instance joins on start and leaves on stop (an instance may set its own).
    groups: ClassVar[Sequence[str]] = ()
    #: Normal channels every instance serves, shared with all other instances serving them.
    channels: ClassVar[Sequence[str]] = ()
    #: Handler name -> function; built when the class is defined.
    handlers: ClassVar[Mapping[str, Callable]] = MappingProxyType({})

    _blocking: ClassVar[bool] = False
    _framework: ClassVar[bool] = True
    channel_name: str | None = None
    _client: Any = None

    def __init_subclass__(cls, framework: bool = False, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._framework = framework
        if framework:
            return
        if issubclass(cls, AsyncConsumer) and issubclass(cls, Consumer):
            raise TypeError(f"{cls.__qualname__} cannot be both an AsyncConsumer and a Consumer")
        _check_names(cls.__qualname__, "groups", cls.groups, check_group, normal_only=False)
        _check_names(cls.__qualname__, "channels", cls.channels, check_channel, normal_only=True)
        handlers: dict[str, Callable] = {}
        for klass in reversed(cls.__mro__):
            if not issubclass(klass, BaseConsumer) or klass._framework:
                continue
            for name, value in vars(klass).items():
                if name.startswith("_") or name in RESERVED:
                    continue
                if inspect.isfunction(value):
                    handlers[name] = value
                else:
                    handlers.pop(name, None)  # e.g. ``chat_message = None`` switches it off
        for name in ("on_start", "on_stop", *handlers):
            cls._check_kind(name, getattr(cls, name))
        cls.handlers = MappingProxyType(handlers)

    @classmethod
    def _check_kind(cls, name: str, function: Callable) -> None:
        is_async = inspect.iscoroutinefunction(function)
        if cls._blocking and is_async:
            raise TypeError(
                f"{cls.__qualname__}.{name} is 'async def', but {cls.__qualname__} is a Consumer,"
                " whose methods run in a thread: make it a plain 'def', subclass AsyncConsumer"
                " instead, or rename it with a leading underscore if it is not a handler"
            )
        if not cls._blocking and not is_async:
            raise TypeError(
                f"{cls.__qualname__}.{name} must be 'async def' in an AsyncConsumer (use Consumer"
                " for blocking handlers, or rename it with a leading underscore if it is not a"
                " handler)"
            )

    @classmethod
    def handler_for(cls, message: object) -> Callable:
        """The function that handles ``message``; raises UnhandledMessage if there is none."""
        consumer = cls.__qualname__
        message_type = message.get("type") if isinstance(message, dict) else None
        if not isinstance(message_type, str):
            raise UnhandledMessage(
                f"{consumer} got a message without a 'type' string: {message!r:.200}",
                type=None, consumer=consumer,
            )
        name = handler_name(message_type)
        if name.startswith("_"):
            raise UnhandledMessage(
                f"{consumer} refuses message type {message_type!r}: it would call {name}(), and"
                " methods whose names start with '_' are never handlers",
                type=message_type, consumer=consumer,
            )
        handler = cls.handlers.get(name)
        if handler is None:
            known = ", ".join(sorted(cls.handlers)) or "none"
            raise UnhandledMessage(
                f"{consumer} has no handler for message type {message_type!r} (it would be"
                f" {name}(); handlers: {known})", type=message_type, consumer=consumer,
            )
        return handler

    @property
    def client(self):
        """The AsyncClient this instance was started with; RuntimeError before start()."""
        if self._client is None:
            raise RuntimeError(f"{self!r} is not started: its helpers work once start() has run")
        return self._client

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, client) -> None:
        """Bind to ``client`` (a connected AsyncClient), take a channel name, join ``groups``,
        run ``on_start``. Raises what the client raises, and TypeError for bad ``groups``."""
        if self._client is not None:
            raise RuntimeError(f"{self!r} is already started")
        groups = _check_names(type(self).__qualname__, "groups", self.groups, check_group, False)
        _check_names(type(self).__qualname__, "channels", self.channels, check_channel, True)
        self._client = client
        self.channel_name = client.new_channel()
        self._loop = asyncio.get_running_loop()
        self._joined: list[str] = []
        for group in groups:
            await client.group_add(group, self.channel_name)
            self._joined.append(group)
        await self._run_hook("on_start")

    async def stop(self) -> None:
        """Run ``on_stop``, then leave the groups joined on start (even if ``on_stop`` raised)."""
        try:
            await self._run_hook("on_stop")
        finally:
            joined, self._joined = getattr(self, "_joined", []), []
            for group in joined:
                await self.client.group_discard(group, self.channel_name)

    async def dispatch(self, message: dict) -> None:
        """Call the handler of ``message``; raises UnhandledMessage or what the handler raises."""
        raise NotImplementedError

    async def _run_hook(self, name: str) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {self.channel_name or '(not started)'}>"


class AsyncConsumer(BaseConsumer, framework=True):
    """A consumer whose handlers are coroutines, run on the event loop.

    ``async def chat_message(self, message)`` handles ``{"type": "chat.message", ...}``.
    """

    async def on_start(self) -> None:
        """Runs after the groups are joined; override it."""

    async def on_stop(self) -> None:
        """Runs before the groups are left; override it."""

    async def dispatch(self, message: dict) -> None:
        await self.handler_for(message)(self, message)

    async def _run_hook(self, name: str) -> None:
        await getattr(self, name)()

    # -- helpers ------------------------------------------------------------------------------

    async def send(self, channel: str, message: dict) -> None:
        """Send ``message`` to ``channel``. Raises ChannelFull, InvalidName, MessageTooLarge."""
        await self.client.send(channel, message)

    async def group_send(self, group: str, message: dict) -> None:
        """Send ``message`` to every member of ``group`` (full members are skipped)."""
        await self.client.group_send(group, message)

    async def group_add(self, group: str, channel: str | None = None) -> None:
        """Add ``channel`` (this instance's own by default) to ``group``."""
        await self.client.group_add(group, channel or self.channel_name)

    async def group_discard(self, group: str, channel: str | None = None) -> None:
        """Remove ``channel`` (this instance's own by default) from ``group``."""
        await self.client.group_discard(group, channel or self.channel_name)


class Consumer(BaseConsumer, framework=True):
    """A consumer with blocking handlers, run in a thread of the instance's own.

    ``def chat_message(self, message)`` handles ``{"type": "chat.message", ...}``; it may block
    (files, databases, CPU). The helpers block too and are called from handlers or hooks only.
    """

    _blocking = True
    _executor: concurrent.futures.ThreadPoolExecutor | None = None

    def on_start(self) -> None:
        """Runs in the instance's thread after the groups are joined; override it."""

    def on_stop(self) -> None:
        """Runs in the instance's thread before the groups are left; override it."""

    async def start(self, client) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=type(self).__qualname__,
        )
        try:
            await super().start(client)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False)

    async def dispatch(self, message: dict) -> None:
        handler = self.handler_for(message)
        await self._in_thread(functools.partial(handler, self, message))

    async def _run_hook(self, name: str) -> None:
        await self._in_thread(getattr(self, name))

    async def _in_thread(self, function: Callable) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, function)

    # -- helpers (blocking) -------------------------------------------------------------------

    def _wait(self, coroutine: Coroutine) -> Any:
        loop = self._loop
        if _on_loop(loop):
            coroutine.close()
            raise RuntimeError(
                "Consumer helpers block until the broker answers; call them from handlers or"
                " hooks (which run in the instance's thread), not from the event loop"
            )
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    def send(self, channel: str, message: dict) -> None:
        """Send ``message`` to ``channel``. Raises ChannelFull, InvalidName, MessageTooLarge."""
        self._wait(self.client.send(channel, message))

    def group_send(self, group: str, message: dict) -> None:
        """Send ``message`` to every member of ``group`` (full members are skipped)."""
        self._wait(self.client.group_send(group, message))

    def group_add(self, group: str, channel: str | None = None) -> None:
        """Add ``channel`` (this instance's own by default) to ``group``."""
        self._wait(self.client.group_add(group, channel or self.channel_name))

    def group_discard(self, group: str, channel: str | None = None) -> None:
        """Remove ``channel`` (this instance's own by default) from ``group``."""
        self._wait(self.client.group_discard(group, channel or self.channel_name))


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


RESERVED = frozenset(
    name
    for klass in (BaseConsumer, AsyncConsumer, Consumer)
    for name in vars(klass)
    if not name.startswith("_")
)
