"""The fleet's messages between nodes, carried by the mesh on one topic.

Pure: bytes in, typed values out, and the reverse; every malformed message is
a :class:`FleetProtocolError` naming what is wrong, never an exception from
deep inside.

Each message is one canonical JSON object (UTF-8, at most
:data:`MAX_MESSAGE` bytes) on the mesh topic :data:`TOPIC`. The mesh
authenticates the sending node; the message never says who sent it.

Requests::

    {"v": 1, "type": "status"|"checkpoint"|"audit"|"cosigned"|"control", "id": ID, "body": {...}}

Replies (to the node that asked, on the same topic)::

    {"v": 1, "type": "reply", "re": ID, "ok": true, "body": {...}}
    {"v": 1, "type": "reply", "re": ID, "ok": false, "error": "one line"}

``ID`` is 1 to 64 characters of ``[A-Za-z0-9_-]``, chosen by the asker.
``cosigned`` is a notification (a witness hands a node its cosignature) and
gets no reply.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.config import parse_json
from keel.errors import ConfigError, KeelError
from keel.ledger.core import HASH_SIZE, canonical_json

TOPIC = "keel.fleet/1"
VERSION = 1
MAX_MESSAGE = 256 * 1024
MAX_ERROR = 500  # characters of an error a reply carries
REQUEST_TYPES = ("status", "checkpoint", "audit", "cosigned", "control")
MAX_SIZES = 64  # tree sizes one checkpoint request may ask proofs from
MAX_PROOF = 64  # hashes in one consistency proof (a tree of 2**63 leaves needs fewer)
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class FleetProtocolError(KeelError):
    """A message from another node is malformed (the text says what and where)."""


@dataclass(frozen=True)
class Request:
    type: str
    id: str
    body: Mapping[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return _encode({"v": VERSION, "type": self.type, "id": self.id, "body": dict(self.body)})


@dataclass(frozen=True)
class Reply:
    re: str
    ok: bool
    body: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""

    def encode(self) -> bytes:
        message: dict[str, Any] = {"v": VERSION, "type": "reply", "re": self.re, "ok": self.ok}
        if self.ok:
            message["body"] = dict(self.body)
        else:
            message["error"] = self.error[:MAX_ERROR]
        return _encode(message)


Message = Request | Reply


def new_request(kind: str, body: Mapping[str, Any] | None = None) -> Request:
    """A request with a fresh random id."""
    return Request(kind, secrets.token_hex(8), body or {})


def _encode(message: dict[str, Any]) -> bytes:
    data = canonical_json(message)
    if len(data) > MAX_MESSAGE:
        raise FleetProtocolError(f"a fleet message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> Message:
    """One message from another node; :class:`FleetProtocolError` if it is malformed."""
    if len(data) > MAX_MESSAGE:
        raise FleetProtocolError(f"message of {len(data)} bytes, more than {MAX_MESSAGE}")
    try:
        value = parse_json(data, source="fleet message")
    except ConfigError as exc:
        raise FleetProtocolError(str(exc)) from None
    if not isinstance(value, dict):
        raise FleetProtocolError("a fleet message is a JSON object")
    if value.get("v") != VERSION:
        raise FleetProtocolError(f"unsupported fleet protocol version {value.get('v')!r}")
    kind = value.get("type")
    if kind == "reply":
        _keys(value, {"v", "type", "re", "ok"}, {"body", "error"})
        ok = value["ok"]
        if not isinstance(ok, bool):
            raise FleetProtocolError("reply.ok must be true or false")
        if ok:
            return Reply(_id(value, "re"), True, _object(value.get("body", {}), "reply.body"))
        error = value.get("error")
        if not isinstance(error, str):
            raise FleetProtocolError("a failed reply carries an error string")
        return Reply(_id(value, "re"), False, error=error[:MAX_ERROR])
    if kind not in REQUEST_TYPES:
        raise FleetProtocolError(f"unknown fleet message type {str(kind)[:40]!r}")
    _keys(value, {"v", "type", "id"}, {"body"})
    return Request(kind, _id(value, "id"), _object(value.get("body", {}), f"{kind}.body"))


def _keys(value: Mapping[str, Any], required: set[str], optional: set[str]) -> None:
    missing = sorted(required - set(value))
    if missing:
        raise FleetProtocolError(f"{value.get('type')} message lacks {missing[0]!r}")
    unknown = sorted(set(value) - required - optional)
    if unknown:
        raise FleetProtocolError(f"{value.get('type')} message has unknown key {unknown[0][:40]!r}")


def _id(value: Mapping[str, Any], key: str) -> str:
    text = value.get(key)
    if not isinstance(text, str) or not _ID.fullmatch(text):
        raise FleetProtocolError(f"{key} must be 1-64 characters of letters, digits, '_' and '-'")
    return text


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise FleetProtocolError(f"{where} must be an object")
    return value


# --- bodies ----------------------------------------------------------------------


def string(body: Mapping[str, Any], key: str, where: str, *, limit: int = 64 * 1024) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise FleetProtocolError(f"{where}.{key} must be a string of 1 to {limit} characters")
    return value


def optional_string(body: Mapping[str, Any], key: str, where: str) -> str | None:
    return None if body.get(key) is None else string(body, key, where)


def items(body: Mapping[str, Any], key: str, where: str, *, limit: int) -> list[Mapping[str, Any]]:
    value = body.get(key, [])
    if not isinstance(value, list) or len(value) > limit:
        raise FleetProtocolError(f"{where}.{key} must be a list of at most {limit} objects")
    return [_object(item, f"{where}.{key}[{i}]") for i, item in enumerate(value)]


def sizes(body: Mapping[str, Any], key: str, where: str) -> list[int]:
    value = body.get(key, [])
    if (
        not isinstance(value, list)
        or len(value) > MAX_SIZES
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in value)
    ):
        raise FleetProtocolError(
            f"{where}.{key} must be a list of at most {MAX_SIZES} tree sizes (integers >= 0)"
        )
    return sorted(set(value))


def encode_proofs(proofs: Mapping[int, Sequence[bytes] | None]) -> dict[str, Any]:
    return {
        str(size): None if proof is None else [base64.b64encode(h).decode() for h in proof]
        for size, proof in proofs.items()
    }


def proofs(body: Mapping[str, Any], key: str, where: str) -> dict[int, list[bytes] | None]:
    """``{"SIZE": [base64 hash...] | null}``: consistency proofs from each SIZE."""
    value = _object(body.get(key, {}), f"{where}.{key}")
    if len(value) > MAX_SIZES:
        raise FleetProtocolError(f"{where}.{key} holds more than {MAX_SIZES} proofs")
    out: dict[int, list[bytes] | None] = {}
    for size_text, hashes in value.items():
        if not re.fullmatch(r"0|[1-9][0-9]{0,18}", size_text):
            raise FleetProtocolError(f"{where}.{key}: {size_text[:30]!r} is not a tree size")
        if hashes is None:
            out[int(size_text)] = None
            continue
        if not isinstance(hashes, list) or len(hashes) > MAX_PROOF:
            raise FleetProtocolError(
                f"{where}.{key}.{size_text} must be a list of at most {MAX_PROOF} hashes or null"
            )
        decoded = []
        for item in hashes:
            try:
                raw = base64.b64decode(str(item).encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError, ValueError):
                raw = b""
            if not isinstance(item, str) or len(raw) != HASH_SIZE:
                raise FleetProtocolError(
                    f"{where}.{key}.{size_text} holds something that is not a base64 SHA-256 hash"
                )
            decoded.append(raw)
        out[int(size_text)] = decoded
    return out
