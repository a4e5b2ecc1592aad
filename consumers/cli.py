"""The ``channelbus`` command: a thin click layer that builds a config and calls the library.

Every option has help text and a ``CHANNELBUS_*`` environment variable; ``channelbus broker``
also reads a TOML file (``--config``). Precedence: flag, then environment, then file, then the
built-in default.
"""

from __future__ import annotations

import logging
import math
import signal
import sys

import click

from broker.config import (
    DEFAULT_BIND, DEFAULT_PUB_BIND, LOG_LEVELS, MAX_BUSY_POLL, BrokerConfig, ConfigError, is_local,
    load_toml, parse_size,
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
    """A whole number from ``low`` (default 1) up to ``high`` (if given); refuses 1.5 and true
    (from a TOML file) instead of rounding."""

    def __init__(self, low: int = 1, high: int | None = None) -> None:
        super().__init__(min=low, max=high)

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


EXIT_BROKEN_RULE = 70  # (EX_SOFTWARE) the check mode found the routing state broke a rule
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
@click.option("--max-memory", type=SIZE, default="512MiB", show_default=True,
              envvar="CHANNELBUS_MAX_MEMORY", show_envvar=True,
              help="Ceiling on the message bytes the broker holds (queued, or pushed and not yet"
                   " acknowledged); past it sends are refused (error 'memory') until receivers"
                   " catch up.")
@click.option("--heartbeat", type=SECONDS, default=1.0, show_default=True,
              envvar="CHANNELBUS_HEARTBEAT", show_envvar=True,
              help="Seconds between heartbeats to each client; a client that promised heartbeats"
                   " and stays silent for 3 of its intervals is dropped.")
@click.option("--max-bad-frames", type=COUNT, default=100, show_default=True,
              envvar="CHANNELBUS_MAX_BAD_FRAMES", show_envvar=True,
              help="Bad messages a peer may send within 60 s before it is ignored for 10 s.")
@click.option("--busy-poll", type=Count(0, MAX_BUSY_POLL), default=0, show_default=True,
              envvar="CHANNELBUS_BUSY_POLL", show_envvar=True,
              help="Microseconds to keep polling for the next command after handling one, before"
                   " sleeping (0: off). Trades CPU for latency: a command caught this way needs"
                   " no wake-up, but while commands come this often the broker uses a whole core."
                   f" At most {MAX_BUSY_POLL}.")
@click.option("--check/--no-check", default=False, show_default=True,
              envvar="CHANNELBUS_CHECK", show_envvar=True,
              help="After every batch of commands and every tick, check the routing state's"
                   " rules (every accepted message queued, in flight, acknowledged, expired,"
                   " flushed or dropped for a named reason; counts that agree with what is"
                   " held). A broken rule is logged and stops the broker (exit status 70)."
                   " Costs a scan of everything held each time: for tests and debugging.")
@click.option("--secret-key", type=click.Path(dir_okay=False), default=None,
              envvar="CHANNELBUS_BROKER_SECRET_KEY", show_envvar=True,
              help="The broker's own .key_secret file (channelbus keygen broker): turns CURVE"
                   " encryption and authentication on for both sockets. Needs --authorized-keys.")
@click.option("--authorized-keys", type=click.Path(file_okay=False), default=None,
              envvar="CHANNELBUS_AUTHORIZED_KEYS", show_envvar=True,
              help="Directory of the public .key files of the clients allowed in; a key's name is"
                   " its file's stem. Files added or removed apply to new connections at once.")
@click.option("--permissions", type=click.Path(dir_okay=False), default=None,
              envvar="CHANNELBUS_PERMISSIONS", show_envvar=True,
              help="TOML file of what each key may do (send, receive, group_send, group_add glob"
                   " lists; flush, stats booleans; a [default] table); what it does not grant is"
                   " refused. Reloaded on SIGHUP (a broken file keeps the previous rules)."
                   " Needs --secret-key.")
@click.option("--insecure", is_flag=True, default=False, envvar="CHANNELBUS_INSECURE", show_envvar=True,
              help="Allow binding beyond loopback without --secret-key (protected mode off):"
                   " only behind a firewall or on a private network you trust.")
@click.option("--metrics", default=None, metavar="HOST:PORT", envvar="CHANNELBUS_METRICS", show_envvar=True,
              help="Serve Prometheus metrics over HTTP on HOST:PORT (needs the channelbus[metrics]"
                   " extra); e.g. 127.0.0.1:9464.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO",
              show_default=True, envvar="CHANNELBUS_LOG_LEVEL", show_envvar=True,
              help="Logging threshold.")
def broker(**options) -> None:
    """Run a broker until SIGINT or SIGTERM (then exit 0).

    Protected mode: without --secret-key the broker binds only to loopback (or ipc) unless
    --insecure is given. SIGHUP reloads the --permissions file.
    """
    run_broker(build_config(options))


def run_broker(config: BrokerConfig) -> None:
    """Bind and run a broker for ``config`` in this process until SIGINT or SIGTERM.

    Prints the bound endpoints on stdout once listening; exits with status 2 and a one-line
    error if an endpoint cannot be bound, and with status 70 if its check mode finds a broken
    rule.
    """
    from broker.invariants import InvariantError
    from broker.server import BindError, BrokerServer

    logging.basicConfig(
        level=config.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    server = BrokerServer(config)
    # Installed before binding, so a signal that comes early still ends the process cleanly.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
    signal.signal(signal.SIGHUP, lambda *_: server.reload_permissions())
    try:
        server.bind()
    except BindError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    if not config.secret_key and not (is_local(server.endpoint) and is_local(server.pub_endpoint)):
        logging.getLogger("channelbus.broker").warning(
            "bound to %s without keys (--insecure): anyone who can reach it can use this broker",
            server.endpoint,
        )
    click.echo(f"channelbus broker listening on {server.endpoint}, publishing on {server.pub_endpoint}")
    sys.stdout.flush()
    try:
        server.serve()
    except InvariantError:
        sys.exit(EXIT_BROKEN_RULE)  # (serve logged what broke)


# The client-side commands (run, send, group-send, listen, stats) live in consumers.commands,
# keygen in consumers.keygen; importing them registers them on ``main``.
from . import commands, keygen  # noqa: E402,F401


if __name__ == "__main__":
    # Under ``python -m`` this file runs as __main__, a second copy of the module: call the
    # imported one, on which the commands above registered.
    from consumers.cli import main as registered_main

    registered_main()
