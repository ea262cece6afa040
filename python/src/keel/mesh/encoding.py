"""Strict encodings shared by the mesh's wire formats.

Binary values travel in JSON as unpadded base64url (RFC 4648 section 5).
Decoding is strict: only the URL-safe alphabet, no padding, no whitespace,
and the decoded length must be the one the field demands; anything else is a
``ValueError`` naming the field, which callers turn into their own errors.
Addresses (``host:port``) in tokens, records and handshakes are checked by
:func:`is_address`.
"""

from __future__ import annotations

import base64
import re

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_PORT = re.compile(r"[0-9]{1,5}")
MAX_ADDRESS_LEN = 255


def is_address(value: object) -> bool:
    """``host:port`` (IPv6 hosts in brackets), port 1 to 65535, printable, no spaces."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ADDRESS_LEN:
        return False
    host, sep, port = value.rpartition(":")
    if not (sep and host and _PORT.fullmatch(port) and 0 < int(port) < 65536):
        return False
    return value.isprintable() and " " not in value


def split_address(value: str) -> tuple[str, int]:
    """The host (brackets of an IPv6 address taken off) and port of an address."""
    if not is_address(value):
        raise ValueError(f"{value!r} is not host:port")
    host, _, port = value.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: object, what: str, size: int | None = None) -> bytes:
    """Decode ``text`` (unpadded base64url); ``size`` is the exact length required."""
    if not isinstance(text, str) or _B64URL.fullmatch(text) is None or len(text) % 4 == 1:
        raise ValueError(f"{what} is not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64u_encode(data) != text:
        raise ValueError(f"{what} is not canonical base64url")
    if size is not None and len(data) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(data)}")
    return data
