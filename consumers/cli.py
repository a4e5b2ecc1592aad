"""The ``channelbus`` command: a thin click layer that builds a config and calls the library.

Every option has help text and a ``CHANNELBUS_*`` environment variable; ``channelbus broker``
also reads a TOML file (``--config``). Precedence: flag, then environment, then file, then the
built-in default.
"""

from __future__ import annotations

import logging
import signal
import sys

import click

from broker.config import DEFAULT_BIND, DEFAULT_PUB_BIND, ConfigError, load_toml, parse_size


class Endpoint(click.ParamType):
    """A ZeroMQ endpoint to bind: tcp://HOST:PORT (PORT may be * for any), ipc://PATH."""

    name = "endpoint"

    def convert(self, value, param, ctx):
        value = str(value)
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
            self.fail(f"{value!r} is not an endpoint; use tcp://HOST:PORT such as {DEFAULT_BIND}", param, ctx)
        if scheme == "tcp":
            host, colon, port = rest.rpartition(":")
            if not colon or not host or not (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
                self.fail(f"{value!r} needs a host and a port from 1 to 65535 (or *), as in tcp://127.0.0.1:5555", param, ctx)
        return value


class Size(click.ParamType):
    """A byte count: 1048576, 512KiB, 1MiB."""

    name = "size"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


ENDPOINT = Endpoint()
SIZE = Size()
SECONDS = click.FloatRange(min=0, min_open=True)
COUNT = click.IntRange(min=1)


def _read_config(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
    if path is None:
        return
    try:
        settings = load_toml(path)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    ctx.default_map = {**(ctx.default_map or {}), **settings}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="channelbus")
def main() -> None:
    """channelbus: a ZeroMQ message bus with the Django Channels channel-layer model."""


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_read_config, envvar="CHANNELBUS_CONFIG",
              help="TOML file with settings (keys as the long options, e.g. max-capacity = 500),"
                   " at the top level or under [broker]. Flags and env vars override it.")
@click.option("--bind", type=ENDPOINT, default=DEFAULT_BIND, show_default=True, envvar="CHANNELBUS_BIND",
              help="Endpoint for client commands and channel messages (ROUTER).")
@click.option("--pub-bind", type=ENDPOINT, default=DEFAULT_PUB_BIND, show_default=True,
              envvar="CHANNELBUS_PUB_BIND", help="Endpoint for group messages (XPUB).")
@click.option("--advertise", metavar="ENDPOINT", default=None, envvar="CHANNELBUS_ADVERTISE",
              help="Publisher endpoint to tell clients (default: the bound one; a wildcard host"
                   " becomes the host each client dialled).")
@click.option("--max-capacity", type=COUNT, default=100_000, show_default=True,
              envvar="CHANNELBUS_MAX_CAPACITY", help="Largest channel capacity a client may ask for.")
@click.option("--max-expiry", type=SECONDS, default=86400.0, show_default=True,
              envvar="CHANNELBUS_MAX_EXPIRY", help="Longest message expiry a client may ask for, in seconds.")
@click.option("--max-group-expiry", type=SECONDS, default=7 * 86400.0, show_default=True,
              envvar="CHANNELBUS_MAX_GROUP_EXPIRY",
              help="Longest group membership expiry a client may ask for, in seconds.")
@click.option("--max-message-size", type=SIZE, default="1MiB", show_default=True,
              envvar="CHANNELBUS_MAX_MESSAGE_SIZE",
              help="Largest serialised message accepted, in bytes or with a unit (512KiB, 1MiB).")
@click.option("--max-bad-frames", type=COUNT, default=100, show_default=True,
              envvar="CHANNELBUS_MAX_BAD_FRAMES",
              help="Bad messages a peer may send before it is ignored for 10 s.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", show_default=True, envvar="CHANNELBUS_LOG_LEVEL", help="Logging threshold.")
def broker(**options) -> None:
    """Run a broker until SIGINT or SIGTERM (then exit 0)."""
    from broker.config import BrokerConfig
    from broker.server import BindError, BrokerServer

    options["log_level"] = options["log_level"].upper()
    logging.basicConfig(
        level=options["log_level"], stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = BrokerConfig(**options)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    server = BrokerServer(config)
    try:
        server.bind()
    except BindError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
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


if __name__ == "__main__":
    main()
