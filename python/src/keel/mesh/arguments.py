"""The arguments of the mesh's control requests, checked. Pure.

A control request's ``args`` is JSON from any process that may open the
control socket (parsed by :func:`keel.config.parse_json`). Each function here
takes that object and a key and returns the value with its type and range
checked, or raises :class:`~keel.errors.UsageError` with one line naming the
key, which the caller gets back as the error: nothing a caller sends reaches
the daemon's logic unchecked, or makes it fail with anything else.
"""

from __future__ import annotations

import binascii
import math
from collections.abc import Mapping
from typing import Any, Final

from keel.config import shorten
from keel.errors import UsageError
from keel.mesh import packets
from keel.mesh.ids import check_topic, is_message_id, is_node_id, new_message_id, parse_address

MAX_TTL: Final = 10 * 365 * 86400  # s: ten years, for invites and messages
MAX_RECEIPT: Final = (1 << 64) - 1
MAX_RECEIPTS: Final = 100_000  # per request


def string(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"{key} must be a non-empty string")
    return value


def node_id(args: Mapping[str, Any], key: str) -> str:
    value = string(args, key)
    if not is_node_id(value):
        raise UsageError(f"{key} {shorten(repr(value))} is not a node id")
    return value


def address(args: Mapping[str, Any], key: str) -> tuple[str | None, str]:
    """``NODE_ID`` or ``AGENT@NODE_ID`` -> (agent or None, node id)."""
    try:
        return parse_address(string(args, key))
    except ValueError as exc:
        raise UsageError(f"{key} {exc}") from None


def number(
    args: Mapping[str, Any],
    key: str,
    default: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"{key} must be a finite number")
    if positive and value <= 0:
        raise UsageError(f"{key} must be positive, got {value:g}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{key} must be at least {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{key} must be at most {maximum:g}, got {value:g}")
    return float(value)


def ttl(args: Mapping[str, Any], default: float) -> float:
    """A time to live in seconds: positive, at most ten years."""
    return number(args, "ttl", default, positive=True, maximum=MAX_TTL)


def integer(
    args: Mapping[str, Any],
    key: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{key} must be an integer")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "" if minimum is None else f" from {minimum}"
        high = "" if maximum is None else f" to {maximum}"
        raise UsageError(f"{key} must be an integer{low}{high}")
    return value


def receipts(args: Mapping[str, Any], key: str) -> list[int]:
    value = args.get(key, [])
    if (
        not isinstance(value, list)
        or len(value) > MAX_RECEIPTS
        or not all(type(item) is int and 0 <= item <= MAX_RECEIPT for item in value)
    ):
        raise UsageError(f"{key} must be a list of at most {MAX_RECEIPTS} receipts (integers)")
    return value


def data(args: Mapping[str, Any]) -> bytes:
    """The payload: base64 of at most ``packets.MAX_PAYLOAD`` bytes."""
    value = args.get("data")
    if not isinstance(value, str):
        raise UsageError("data must be base64 text")
    try:
        payload = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise UsageError("data is not valid base64") from None
    check_size(len(payload))
    return payload


def check_size(size: int) -> None:
    if size > packets.MAX_PAYLOAD:
        raise UsageError(too_big(size))


def too_big(size: int) -> str:
    """The one way every part of keel words the message limit."""
    return (
        f"a message carries at most {packets.MAX_PAYLOAD:,} bytes (960 KiB), this one has {size:,}"
    )


def message_id(args: Mapping[str, Any]) -> str:
    """The client's id for the message (a retried send is the same message), or a new one."""
    value = args.get("id")
    if value is None:
        return new_message_id()
    if not is_message_id(value):
        raise UsageError("id must be 32 lowercase hex digits")
    return str(value)


def topic(args: Mapping[str, Any]) -> str:
    try:
        return check_topic(args.get("topic"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
