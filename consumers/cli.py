"""The ``channelbus`` command: a thin click layer that builds a config and calls the library.

Every option has help text and a ``CHANNELBUS_*`` environment variable; ``channelbus broker``
also reads a TOML file (``--config``). Precedence: flag, then environment, then file, then the
built-in default.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys

import click

from broker.config import (
    DEFAULT_BIND, DEFAULT_PUB_BIND, LOG_LEVELS, BrokerConfig, ConfigError, load_toml, parse_size,
)


class Endpoint(click.ParamType):
    """A ZeroMQ endpoint another process can reach: tcp://HOST:PORT or ipc://PATH.

    With ``any_port`` (endpoints to bind) the port may be ``*``: the OS picks a free one.
    """

    name = "endpoint"

    def __init__(self, any_port: bool = True) -> None:
        self.any_port = any_port

    def convert(self, value, param, ctx):
        value = str(value)
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("tcp", "ipc") or not rest:
            self.fail(f"{value!r} is not an endpoint; use tcp://HOST:PORT such as {DEFAULT_BIND},"
                      " or ipc://PATH", param, ctx)
        if scheme == "tcp":
            host, colon, port = rest.rpartition(":")
            star = self.any_port and port == "*"
            if not colon or not host or not (star or (port.isdigit() and 0 < int(port) < 65536)):
                ports = "from 1 to 65535 (or *)" if self.any_port else "from 1 to 65535"
                self.fail(f"{value!r} needs a host and a port {ports}, as in tcp://127.0.0.1:5555",
                          param, ctx)
        return value


class Size(click.ParamType):
    """A byte count: 1048576, 512KiB, 1MiB."""

    name = "size"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


class Count(click.IntRange):
    """A whole number of at least 1; refuses 1.5 and true (from a TOML file) instead of rounding."""

    def __init__(self) -> None:
        super().__init__(min=1)

    def convert(self, value, param, ctx):
        if isinstance(value, (bool, float)):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        return super().convert(value, param, ctx)


class Seconds(click.FloatRange):
    """A finite number of seconds above 0."""

    def __init__(self) -> None:
        super().__init__(min=0, min_open=True)

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return number


ENDPOINT = Endpoint()
CONNECT_ENDPOINT = Endpoint(any_port=False)
SIZE = Size()
SECONDS = Seconds()
COUNT = Count()


def _read_config(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
    """Load the TOML file into the command's default_map, each value checked by its option's type."""
    if path is None:
        return
    try:
        settings = load_toml(path)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    options = {p.name: p for p in ctx.command.params}
    for name, value in settings.items():
        option = options[name]
        try:
            settings[name] = option.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise click.BadParameter(
                f"config file {path}: {name.replace('_', '-')}: {exc.message}", ctx=ctx, param=param,
            ) from None
    ctx.default_map = {**(ctx.default_map or {}), **settings}


def build_config(options: dict) -> BrokerConfig:
    """The BrokerConfig for the ``broker`` command's parsed options; UsageError if it is refused."""
    try:
        return BrokerConfig(**{**options, "log_level": options["log_level"].upper()})
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="channelbus")
def main() -> None:
    """channelbus: a ZeroMQ message bus with the Django Channels channel-layer model."""


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_read_config, envvar="CHANNELBUS_CONFIG", show_envvar=True,
              help="TOML file with settings (keys as the long options, e.g. max-capacity = 500),"
                   " at the top level or under [broker]. Flags and env vars override it.")
@click.option("--bind", type=ENDPOINT, default=DEFAULT_BIND, show_default=True,
              envvar="CHANNELBUS_BIND", show_envvar=True,
              help="Endpoint for client commands and channel messages (ROUTER).")
@click.option("--pub-bind", type=ENDPOINT, default=DEFAULT_PUB_BIND, show_default=True,
              envvar="CHANNELBUS_PUB_BIND", show_envvar=True,
              help="Endpoint for group messages (XPUB).")
@click.option("--advertise", type=CONNECT_ENDPOINT, default=None,
              envvar="CHANNELBUS_ADVERTISE", show_envvar=True,
              help="Publisher endpoint to tell clients (default: the bound one; a wildcard host"
                   " becomes the host each client dialled).")
@click.option("--max-capacity", type=COUNT, default=100_000, show_default=True,
              envvar="CHANNELBUS_MAX_CAPACITY", show_envvar=True,
              help="Largest channel capacity a client may ask for.")
@click.option("--max-expiry", type=SECONDS, default=86400.0, show_default=True,
              envvar="CHANNELBUS_MAX_EXPIRY", show_envvar=True,
              help="Longest message expiry a client may ask for, in seconds.")
@click.option("--max-group-expiry", type=SECONDS, default=7 * 86400.0, show_default=True,
              envvar="CHANNELBUS_MAX_GROUP_EXPIRY", show_envvar=True,
              help="Longest group membership expiry a client may ask for, in seconds.")
@click.option("--max-message-size", type=SIZE, default="1MiB", show_default=True,
              envvar="CHANNELBUS_MAX_MESSAGE_SIZE", show_envvar=True,
              help="Largest serialised message accepted, in bytes or with a unit (512KiB, 1MiB).")
@click.option("--max-bad-frames", type=COUNT, default=100, show_default=True,
              envvar="CHANNELBUS_MAX_BAD_FRAMES", show_envvar=True,
              help="Bad messages a peer may send before it is ignored for 10 s.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO",
              show_default=True, envvar="CHANNELBUS_LOG_LEVEL", show_envvar=True,
              help="Logging threshold.")
def broker(**options) -> None:
    """Run a broker until SIGINT or SIGTERM (then exit 0)."""
    run_broker(build_config(options))


def run_broker(config: BrokerConfig) -> None:
    """Bind and run a broker for ``config`` in this process until SIGINT or SIGTERM.

    Prints the bound endpoints on stdout once listening; exits with status 2 and a one-line
    error if an endpoint cannot be bound.
    """
    from broker.server import BindError, BrokerServer

    logging.basicConfig(
        level=config.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    server = BrokerServer(config)
    # Installed before binding, so a signal that comes early still ends the process cleanly.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
    try:
        server.bind()
    except BindError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    if not _is_loopback(server.endpoint):
        logging.getLogger("channelbus.broker").warning(
            "bound to %s without authentication: anyone who can reach it can use this broker",
            server.endpoint,
        )
    click.echo(f"channelbus broker listening on {server.endpoint}, publishing on {server.pub_endpoint}")
    sys.stdout.flush()
    server.serve()


def _is_loopback(endpoint: str) -> bool:
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    return host.startswith("127.") or host in ("localhost", "::1")


# == Consumers and debugging: run, send, group-send, listen ==================================
# (This section is consumers' own; the commands build settings and call consumers.runner and
# consumers.debug.)

DEFAULT_BROKER_URL = "tcp://127.0.0.1:5555"


class BrokerUrl(click.ParamType):
    """A broker URL to connect to: tcp://HOST:PORT, ipc://PATH or inproc://NAME."""

    name = "url"

    def convert(self, value, param, ctx):
        value = str(value)
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
            self.fail(f"{value!r} is not a broker URL; use tcp://HOST:PORT such as {DEFAULT_BROKER_URL}", param, ctx)
        if scheme == "tcp":
            host, colon, port = rest.rpartition(":")
            if not colon or not host or not (port.isdigit() and 0 < int(port) < 65536):
                self.fail(f"{value!r} needs a host and a port from 1 to 65535, as in {DEFAULT_BROKER_URL}", param, ctx)
        return value


class BusName(click.ParamType):
    """A channel or group name, checked by the naming rules before anything is sent."""

    def __init__(self, kind: str) -> None:
        self.name = kind

    def convert(self, value, param, ctx):
        from broker.protocol.errors import ProtocolError
        from broker.protocol.names import check_channel, check_group

        try:
            return (check_channel if self.name == "channel" else check_group)(value)
        except ProtocolError as err:
            self.fail(err.message, param, ctx)


class JsonMessage(click.ParamType):
    """A message as a JSON object with a "type"; {"$bytes": "<base64>"} stands for bytes."""

    name = "json"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        from .debug import from_json

        try:
            return from_json(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class ConsumerClass(click.ParamType):
    """MODULE:ATTR naming a consumer class; MODULE is imported from the current directory."""

    name = "module:attr"

    def convert(self, value, param, ctx):
        if isinstance(value, type):
            return value
        import os

        from .runner import load_consumer

        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            return load_consumer(value)
        except (ImportError, SyntaxError) as exc:
            self.fail(f"cannot import {value.partition(':')[0]!r}: {exc}", param, ctx)
        except (ValueError, LookupError, TypeError) as exc:
            self.fail(str(exc), param, ctx)


BROKER_URL = BrokerUrl()
CHANNEL_NAME = BusName("channel")
GROUP_NAME = BusName("group")
MESSAGE = JsonMessage()
CONSUMER_CLASS = ConsumerClass()
_POSITIVE_SECONDS = click.FloatRange(min=0, min_open=True)
_AT_LEAST_ONE = click.IntRange(min=1)

_broker_option = click.option(
    "--broker", "url", type=BROKER_URL, default=DEFAULT_BROKER_URL, show_default=True,
    envvar="CHANNELBUS_BROKER", show_envvar=True, help="URL of the broker (its command endpoint).")
_timeout_option = click.option(
    "--timeout", type=_POSITIVE_SECONDS, default=10.0, show_default=True, envvar="CHANNELBUS_TIMEOUT", show_envvar=True,
    help="Seconds to wait for each answer from the broker before giving up.")
_capacity_option = click.option(
    "--capacity", type=_AT_LEAST_ONE, default=100, show_default=True, envvar="CHANNELBUS_CAPACITY", show_envvar=True,
    help="Messages a channel may hold when this process sends to it; more is refused (full).")
_expiry_option = click.option(
    "--expiry", type=_POSITIVE_SECONDS, default=60.0, show_default=True, envvar="CHANNELBUS_EXPIRY", show_envvar=True,
    help="Seconds a message sent from this process waits for a receiver before it expires.")


@contextlib.contextmanager
def _bus(url: str, **settings):
    """A connected blocking Client; bus errors become a one-line error and exit status 1."""
    from clients import BusError, Client

    try:
        with Client(url, **settings) as client:
            yield client
    except BusError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("consumer", type=CONSUMER_CLASS, metavar="MODULE:ATTR")
@_broker_option
@click.option("--instances", type=_AT_LEAST_ONE, default=1, show_default=True, envvar="CHANNELBUS_INSTANCES", show_envvar=True,
              help="Consumer instances to host in this process; they share one connection.")
@_capacity_option
@_expiry_option
@click.option("--group-expiry", type=_POSITIVE_SECONDS, default=86400.0, show_default=True,
              envvar="CHANNELBUS_GROUP_EXPIRY", show_envvar=True,
              help="Seconds a group membership lasts before the broker drops it.")
@_timeout_option
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", show_default=True, envvar="CHANNELBUS_LOG_LEVEL", show_envvar=True, help="Logging threshold.")
def run(consumer, url, instances, log_level, **settings) -> None:
    """Host consumers of class MODULE:ATTR until SIGINT or SIGTERM.

    MODULE is imported from the current directory first, as with python -m. Each instance has
    its own channel, joins the class's groups and serves its work channels; a handler that
    raises is logged and the instance keeps serving. The first signal finishes the messages in
    hand, leaves the groups and exits 0; a second one exits at once.
    """
    from .runner import run as run_consumers

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_consumers(consumer, url, instances=instances, **settings))


@main.command()
@click.argument("channel", type=CHANNEL_NAME)
@click.argument("message", type=MESSAGE, metavar="JSON")
@_broker_option
@_capacity_option
@_expiry_option
@_timeout_option
def send(channel, message, url, **settings) -> None:
    """Send one message (JSON with a "type") to CHANNEL.

    Write bytes as {"$bytes": "<base64>"}, e.g.
    channelbus send thumbnails '{"type": "image.resize", "data": {"$bytes": "iVBORw=="}}'.
    Exits 1 if the channel is full or the broker does not answer.
    """
    with _bus(url, **settings) as bus:
        bus.send(channel, message)


@main.command("group-send")
@click.argument("group", type=GROUP_NAME)
@click.argument("message", type=MESSAGE, metavar="JSON")
@_broker_option
@_capacity_option
@_expiry_option
@_timeout_option
def group_send(group, message, url, **settings) -> None:
    """Send one message (JSON with a "type") to every member of GROUP.

    Bytes are written as with send. Members that are full are skipped, as group_send does.
    """
    with _bus(url, **settings) as bus:
        bus.group_send(group, message)


@main.command()
@click.argument("channel", type=CHANNEL_NAME, required=False)
@click.option("--group", type=GROUP_NAME, default=None,
              help="Listen to this group (through a channel of the listener's own) instead of a channel.")
@click.option("--count", type=_AT_LEAST_ONE, default=None,
              help="Stop after this many messages (default: until interrupted).")
@_broker_option
@_timeout_option
def listen(channel, group, count, url, timeout) -> None:
    """Print each message of CHANNEL, or of --group GROUP, as one JSON line.

    Bytes are shown as {"$bytes": "<base64>"}. Runs until interrupted (SIGINT or SIGTERM,
    exit 0) or until --count messages. A normal channel's messages go to one receiver each, so
    listening to a work channel takes messages away from its workers; listening to a group
    does not.
    """
    import signal

    from .debug import listen as listen_to

    if (channel is None) == (group is None):
        raise click.UsageError("give a CHANNEL or --group GROUP (one of them)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # leave the group on SIGTERM too
    # receive_window=1: the broker pushes a normal channel's messages ahead to a receiver, and
    # what it pushed is lost when the receiver leaves; one at a time loses the least.
    settings = {"timeout": timeout} if group else {"timeout": timeout, "receive_window": 1}

    def ready(listening_on: str) -> None:
        what = f"group {group} (as {listening_on})" if group else f"channel {channel}"
        click.echo(f"listening on {what}; Ctrl-C to stop", err=True)

    try:
        with _bus(url, **settings) as bus:
            listen_to(bus, click.echo, channel=channel, group=group, count=count, on_ready=ready)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
