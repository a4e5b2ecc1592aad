"""CURVE for a client: its key pair and the broker's public key as socket options, and the
meaning of a failed handshake (from the DEALER's monitor events) as an AuthenticationFailed.

The cryptography is ZeroMQ's (CurveZMQ); key files are pyzmq certificates, as written by
``channelbus keygen`` (``zmq.auth.create_certificates``).
"""

from __future__ import annotations

import os

import zmq
import zmq.auth

from .errors import AuthenticationFailed, KeyFileError

Z85_KEY_LENGTH = 40
# The monitor events that end a handshake without a connection.
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_MISMATCH = getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", 0x11000002)


def _read(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read the {'secret' if secret else 'server'} key {path}: {exc.strerror}") from None
    except (ValueError, IndexError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a key file written by channelbus keygen ({exc})") from None


def server_key(value: str | bytes) -> bytes:
    """The broker's public key: a ``.key`` file's path, or the key itself (40 characters of Z85)."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    if len(text) == Z85_KEY_LENGTH and not os.path.exists(text):
        try:
            zmq.utils.z85.decode(text.encode("ascii"))
            return text.encode("ascii")
        except (ValueError, UnicodeEncodeError, KeyError):
            raise KeyFileError(f"server_key {text!r} is neither a key file nor a Z85 key") from None
    public, _ = _read(text, secret=False)
    return public


def curve_options(secret_key: str | None, server_key_: str | bytes | None) -> list[tuple[int, bytes]]:
    """The socket options for CURVE (none without keys); KeyFileError if a key cannot be used."""
    if secret_key is None and server_key_ is None:
        return []
    if secret_key is None or server_key_ is None:
        given, missing = ("secret_key", "server_key") if server_key_ is None else ("server_key", "secret_key")
        raise KeyFileError(f"{given} needs {missing} as well: CURVE takes this client's secret key"
                           " file and the broker's public key")
    public, secret = _read(str(secret_key), secret=True)
    if not secret:
        raise KeyFileError(f"{secret_key} holds no secret key: give the .key_secret file, not the public .key")
    return [(zmq.CURVE_SERVERKEY, server_key(server_key_)), (zmq.CURVE_PUBLICKEY, public),
            (zmq.CURVE_SECRETKEY, secret)]


def handshake_failure(event: int, value: int, url: str, curve: bool) -> AuthenticationFailed:
    """The error for a monitor event in HANDSHAKE_FAILED (``curve``: this client has keys)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        reason = ("the broker refused this client's key: it is not among the broker's authorized keys"
                  if curve else f"the broker refused the connection (ZAP status {value})")
    elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MISMATCH:
        reason = ("this client has keys but the broker does not use CURVE: drop secret_key and server_key"
                  if curve else "the broker requires CURVE keys: give secret_key and server_key"
                  " (docs/security.md)")
    elif curve:
        reason = ("the CURVE handshake failed: is server_key the broker's public key"
                  " (its .key file, not the client's)?")
    else:  # (a broker with CURVE cuts a client without keys short: often no detail)
        reason = ("the handshake with the broker failed: it probably requires CURVE keys (give"
                  " secret_key and server_key; docs/security.md)")
    return AuthenticationFailed(f"cannot connect to the broker at {url}: {reason}", endpoint=url, reason=reason)


def definitive(event: int) -> bool:
    """Whether a failed handshake says the client will not get in (not a connection cut short)."""
    return event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
