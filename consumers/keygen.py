"""``channelbus keygen``: a CURVE key pair in pyzmq's certificate format."""

from __future__ import annotations

import os
import re

import click

from .cli import main

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")


@main.command()
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory to write the two files in (made if missing, mode 0700).")
def keygen(name, directory) -> None:
    """Write a CURVE key pair: DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode 0600).

    Prints the public key. Never overwrites a file. The broker knows a client's key by NAME
    once NAME.key is in its --authorized-keys directory; give the broker's own NAME.key (or the
    printed key) to clients as --server-key. See docs/security.md.
    """
    import zmq.auth

    if not _NAME.match(name) or name.endswith((".key", ".key_secret")):
        raise click.BadParameter(
            f"{name!r}: use 1 to 100 letters, digits, '_', '.' or '-', starting with a letter or digit",
            param_hint="NAME")
    if name == "default":
        raise click.BadParameter("'default' names the permissions file's table for keys not listed;"
                                 " choose another name", param_hint="NAME")
    public, secret = (os.path.join(directory, name + ext) for ext in (".key", ".key_secret"))
    for path in (public, secret):
        if os.path.lexists(path):
            raise click.ClickException(f"{path} already exists; remove it first or choose another name")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    key, _ = zmq.auth.load_certificate(public)
    click.echo(f"wrote {public} (public) and {secret} (secret, mode 0600)", err=True)
    click.echo(key.decode("ascii"))
