"""The chat site's settings for a broker that uses CURVE keys (``channelbus broker --secret-key
... --authorized-keys ...``): the base settings, with this site's key pair and the broker's
public key added to the channel layer's CONFIG.

Use it with ``DJANGO_SETTINGS_MODULE=chatsite.settings_keys`` and these environment variables
(the same ones ``channelbus run`` and the other client commands read):

- ``CHANNELBUS_SECRET_KEY``: this site's ``.key_secret`` file (``channelbus keygen chatsite``
  writes ``chatsite.key_secret`` and ``chatsite.key``; the broker lets the site in once
  ``chatsite.key`` is in its ``--authorized-keys`` directory).
- ``CHANNELBUS_SERVER_KEY``: the broker's public key, its ``.key`` file or the 40-character key
  that ``channelbus keygen broker`` printed.

Both are required, and the key files are read when the settings load: a variable that is
missing or a key that cannot be used stops the site at startup (``ImproperlyConfigured``)
rather than at its first WebSocket. A relative path is taken from the directory the server
starts in. Everything else (``CHANNELBUS_BROKER``, the ``DJANGO_*`` variables) is as in
``chatsite.settings``.
"""

import os

from django.core.exceptions import ImproperlyConfigured

from clients import KeyFileError
from clients.keys import curve_options

from .settings import *  # noqa: F401,F403
from .settings import CHANNEL_LAYERS

_KEY_VARIABLES = {
    "secret_key": ("CHANNELBUS_SECRET_KEY", "this site's .key_secret file (channelbus keygen chatsite)"),
    "server_key": ("CHANNELBUS_SERVER_KEY", "the broker's public .key file or its 40-character Z85 key"),
}


def _key_setting(name: str) -> str:
    variable, meaning = _KEY_VARIABLES[name]
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ImproperlyConfigured(
            f"chatsite.settings_keys needs {variable}: {meaning}. Set CHANNELBUS_SECRET_KEY and"
            " CHANNELBUS_SERVER_KEY, or use chatsite.settings for a broker without keys"
            " (README.md, 'Django chat example')."
        )
    if name == "secret_key" or os.path.exists(value):
        value = os.path.abspath(value)  # (a Z85 key stays as it is)
    return value


_keys = {name: _key_setting(name) for name in _KEY_VARIABLES}
try:
    curve_options(_keys["secret_key"], _keys["server_key"])  # what the layer checks, done now
except KeyFileError as exc:
    raise ImproperlyConfigured(
        f"chatsite.settings_keys: {exc} (from CHANNELBUS_SECRET_KEY / CHANNELBUS_SERVER_KEY)"
    ) from None

CHANNEL_LAYERS = {
    alias: {**layer, "CONFIG": {**layer["CONFIG"], **_keys}}
    for alias, layer in CHANNEL_LAYERS.items()
}
