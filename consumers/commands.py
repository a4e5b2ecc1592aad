"""The client-side ``channelbus`` commands: run, send, group-send, listen and stats.

Each builds settings and calls the library (consumers.runner, consumers.debug, clients);
``consumers.cli`` holds the command group, the broker command and the shared option types.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

import click

from .cli import main


DEFAULT_BROKER_URL = "tcp://127.0.0.1:5555"


class BrokerUrl(click.ParamType):
    """A broker URL to connect to (tcp://HOST:PORT, ipc://PATH or inproc://NAME), or several
    separated by commas: the brokers of a sharded bus, in the order every client uses."""

    name = "url[,url...]"

    def convert(self, value, param, ctx):
        value = str(value)
        urls = [url.strip() for url in value.split(",")]
        for url in urls:
            scheme, sep, rest = url.partition("://")
            if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
                self.fail(f"{url!r} is not a broker URL; use tcp://HOST:PORT such as {DEFAULT_BROKER_URL}", param, ctx)
            if scheme == "tcp":
                host, colon, port = rest.rpartition(":")
                if not colon or not host or not (port.isdigit() and 0 < int(port) < 65536):
                    self.fail(f"{url!r} needs a host and a port from 1 to 65535, as in {DEFAULT_BROKER_URL}", param, ctx)
        if len(set(urls)) != len(urls):
            self.fail(f"{value!r} names a broker twice", param, ctx)
        return ",".join(urls)


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
    envvar="CHANNELBUS_BROKER", show_envvar=True,
    help="URL of the broker (its command endpoint); several, separated by commas, for a sharded"
         " bus: every client must list the same brokers in the same order.")


def _key_options(command):
    """--secret-key and --server-key: CURVE keys for a broker that uses them."""
    command = click.option(
        "--server-key", default=None, metavar="FILE|Z85", envvar="CHANNELBUS_SERVER_KEY", show_envvar=True,
        help="The broker's public key: its .key file, or the 40-character key itself.")(command)
    return click.option(
        "--secret-key", type=click.Path(dir_okay=False), default=None, envvar="CHANNELBUS_SECRET_KEY",
        show_envvar=True, help="This client's .key_secret file, for a broker with CURVE keys"
                               " (channelbus keygen NAME writes one).")(command)


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
@_key_options
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
@_key_options
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
@_key_options
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
@_key_options
def listen(channel, group, count, url, timeout, **keys) -> None:
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
    # receive_window=1: listening to a work channel should take messages one at a time, not
    # hold a window of them away from the workers (they go back when the listener leaves).
    settings = {"timeout": timeout, **keys} if group else {"timeout": timeout, "receive_window": 1, **keys}

    def ready(listening_on: str) -> None:
        what = f"group {group} (as {listening_on})" if group else f"channel {channel}"
        click.echo(f"listening on {what}; Ctrl-C to stop", err=True)

    try:
        with _bus(url, **settings) as bus:
            listen_to(bus, click.echo, channel=channel, group=group, count=count, on_ready=ready)
    except KeyboardInterrupt:
        pass




@main.command()
@_broker_option
@_timeout_option
@_key_options
@click.option("--top", type=_AT_LEAST_ONE, default=10, show_default=True, envvar="CHANNELBUS_STATS_TOP",
              show_envvar=True, help="How many of the deepest channels and largest groups to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the broker's figures as one JSON object per sample.")
@click.option("--watch", type=_POSITIVE_SECONDS, default=None, metavar="SECONDS",
              help="Print again every SECONDS (with rates per second) until interrupted.")
def stats(url, timeout, top, as_json, watch, **keys) -> None:
    """Show the broker's figures: clients, channels by depth, groups, message rates,
    refusals, where every accepted message is now (queued, in flight, acknowledged, expired,
    flushed or dropped: the "accounted" line, which must add up), memory held and uptime.
    With several brokers (--broker a,b,c): the totals, then a line per broker."""
    from .debug import format_stats

    previous = None
    try:
        with _bus(url, timeout=timeout, **keys) as bus:
            while True:
                sample = bus.stats(top)
                click.echo(format_stats(sample, previous, as_json=as_json))
                if watch is None:
                    return
                previous = sample
                time.sleep(watch)
    except KeyboardInterrupt:
        pass


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name", type=click.Choice(["core", "layers", "soak", "bytecodes", "chaos", "shards", "hosts"]), default="core")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(name, args) -> None:
    """Run benchmarks/NAME.py from this checkout with ARGS (channelbus bench core --repeat 3;
    channelbus bench core -- --help for its options).

    core: the bus against a raw pyzmq forwarder (messages/s, round trip p50/p99); layers: the
    Channels layer against channels_redis (needs redis-server); soak: a long run with broker
    restarts; bytecodes: the Python work per message in the broker and a client, counted (not
    timed); chaos: the randomized system test (channelbus bench chaos -- --minutes 10), rounds of
    random senders, receivers, pauses, CPU contention and broker kills, judged for lost,
    doubled or unaccounted messages; shards: 1, 2 and 4 brokers (a sharded bus) loaded by several
    client processes (aggregate messages/s, round trip, CPU per message of each broker and of the
    clients); hosts: a sharded bus across three Linux network namespaces (as root; the chat, a
    work channel with two workers, round trips, against one host). Each prints its figures and
    ratios (chaos: a line per round and a table); see
    docs/performance.md and docs/guarantees.md.
    """
    import os
    import runpy

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.getcwd(), here):
        script = os.path.join(root, "benchmarks", f"{name}.py")
        if os.path.exists(script):
            break
    else:
        raise click.ClickException(
            f"benchmarks/{name}.py not found: run this from a channelbus source checkout"
        )
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
