"""Tool calls between gateways across the mesh: the payloads and the names. Pure.

A calling gateway sends a :class:`Request` to the hosting node on
:data:`CALL_TOPIC`, as the calling agent (the mesh's ``as_agent``); the
hosting gateway answers with an :class:`Answer` on :data:`ANSWER_TOPIC`.
Both are canonical JSON (sorted keys, compact, ASCII), at most
:data:`MAX_BYTES` (what one ``send`` to the mesh daemon carries). Who is calling is never in the
payload: the hosting gateway takes the node and the agent from the mesh
message, as the mesh authenticated them (docs/mcp.md, "Across the mesh").

Request: ``{"v": 1, "id": ID, "kind": "list", "deadline": T}`` or
``{"v": 1, "id": ID, "kind": "call", "server": S, "tool": T, "arguments": {...},
"deadline": T}``; ``deadline`` is Unix seconds on the caller's clock (the mesh's
message expiry is on the sender's clock too). A caller that gives up sends
``{"v": 1, "id": ID, "kind": "cancel", "deadline": T}`` on the same topic, as
the same agent, with the id and deadline of the request it cancels; it gets
no answer.

An answer larger than one mesh message travels in parts: its canonical JSON
cut into ``count`` pieces, each ``{"v": 1, "id": ID, "part": I, "count": N,
"data": BASE64}`` (``0 <= I < N``, ``N >= 2``); the caller joins them in
:class:`Parts`, bounded (a gateway's ``max_message``), and reads the whole
as an answer. Answer: ``{"v": 1, "id": ID,
"result": {...}}`` (a ``tools/call`` result, or ``{"tools": [...]}``) or
``{"v": 1, "id": ID, "error": {"code": N, "message": M}}``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from keel.api import MAX_REQUEST
from keel.config import parse_json
from keel.errors import ConfigError
from keel.mcp.policy import SEPARATOR, split
from keel.mcp.spec import check_server_name, check_tool
from keel.mesh.packets import MAX_PAYLOAD

CALL_TOPIC: Final = "keel.mcp.call"
ANSWER_TOPIC: Final = "keel.mcp.answer"
VERSION: Final = 1
MAX_MESSAGE_CHARS: Final = 4096  # an error message is cut to this
# The most a payload of this protocol is: one mesh message (MAX_PAYLOAD, 960 KiB),
# which goes to the mesh daemon base64 in the JSON of its ``send`` verb, one
# control-socket line of at most MAX_REQUEST bytes (2 MiB: it fits).
MAX_BYTES: Final = min(MAX_PAYLOAD, (MAX_REQUEST - 4096) // 4 * 3)

_ID = re.compile(r"[0-9a-f]{32}\Z")

Kind = Literal["list", "call", "cancel"]


class BadPayload(ValueError):
    """A payload that is not a request or answer of this protocol."""


@dataclass(frozen=True)
class Request:
    id: str
    kind: Kind
    deadline: float
    server: str = ""
    tool: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": VERSION, "id": self.id, "kind": self.kind}
        out["deadline"] = self.deadline
        if self.kind == "call":
            out.update(server=self.server, tool=self.tool, arguments=self.arguments)
        return out


@dataclass(frozen=True)
class Answer:
    id: str
    result: dict[str, Any] | None = None
    code: int = 0  # the JSON-RPC error code when result is None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.result is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": VERSION, "id": self.id}
        if self.result is not None:
            out["result"] = self.result
        else:
            out["error"] = {"code": self.code, "message": self.message}
        return out


def _canonical(value: Request | Answer) -> bytes:
    return json.dumps(
        value.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def encode(value: Request | Answer) -> bytes:
    """The payload's bytes; :class:`BadPayload` if it does not fit one mesh message."""
    data = _canonical(value)
    if len(data) > MAX_BYTES:
        what = "request" if isinstance(value, Request) else "answer"
        raise BadPayload(
            f"the {what} is {len(data):,} bytes, more than one mesh message carries ({MAX_BYTES:,})"
        )
    return data


def _object(data: bytes, what: str, *, limit: int = MAX_PAYLOAD) -> dict[str, Any]:
    if len(data) > limit:
        raise BadPayload(f"{what} of {len(data):,} bytes is over the limit")
    try:
        value = parse_json(data, source=what)
    except ConfigError as exc:
        raise BadPayload(str(exc)) from None
    if not isinstance(value, dict):
        raise BadPayload(f"{what} is not a JSON object")
    if value.get("v") != VERSION:
        raise BadPayload(f"{what} is not version {VERSION} of keel's MCP-over-mesh payloads")
    return value


def _keys(value: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(value) - allowed)
    if extra:
        raise BadPayload(f"{what} has an unknown key {extra[0]!r}")


def request_id_of(data: bytes) -> str | None:
    """The id of a payload that may be malformed (to answer its sender), or None."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    found = value.get("id") if isinstance(value, dict) else None
    return found if isinstance(found, str) and _ID.match(found) else None


def _id(value: dict[str, Any], what: str) -> str:
    found = value.get("id")
    if not isinstance(found, str) or not _ID.match(found):
        raise BadPayload(f"{what}'s id must be 32 lowercase hex digits")
    return found


def decode_request(data: bytes) -> Request:
    value = _object(data, "request")
    request_id = _id(value, "request")
    kind = value.get("kind")
    deadline = value.get("deadline")
    if (
        isinstance(deadline, bool)
        or not isinstance(deadline, int | float)
        or not math.isfinite(deadline)
    ):
        raise BadPayload("request's deadline must be a number (Unix seconds)")
    if kind in ("list", "cancel"):
        _keys(value, {"v", "id", "kind", "deadline"}, f"a {kind} request")
        return Request(request_id, "list" if kind == "list" else "cancel", float(deadline))
    if kind != "call":
        raise BadPayload('request\'s kind must be "list", "call" or "cancel"')
    _keys(value, {"v", "id", "kind", "deadline", "server", "tool", "arguments"}, "a call request")
    server, tool, arguments = value.get("server"), value.get("tool"), value.get("arguments")
    if not isinstance(server, str) or check_server_name(server) is not None:
        raise BadPayload("request's server is not an MCP server's name")
    if not isinstance(tool, str) or check_tool(tool) is not None:
        raise BadPayload("request's tool is not an MCP tool name")
    if not isinstance(arguments, dict):
        raise BadPayload("request's arguments must be a JSON object")
    return Request(request_id, "call", float(deadline), server, tool, arguments)


def decode_answer(data: bytes, *, limit: int = MAX_PAYLOAD) -> Answer:
    value = _object(data, "answer", limit=limit)
    answer_id = _id(value, "answer")
    _keys(value, {"v", "id", "result", "error"}, "an answer")
    if ("result" in value) == ("error" in value):
        raise BadPayload("an answer has exactly one of result and error")
    if "result" in value:
        result = value["result"]
        if not isinstance(result, dict):
            raise BadPayload("an answer's result must be a JSON object")
        return Answer(answer_id, result)
    error = value["error"]
    if not isinstance(error, dict):
        raise BadPayload("an answer's error must be a JSON object")
    _keys(error, {"code", "message"}, "an answer's error")
    code, message = error.get("code"), error.get("message")
    if isinstance(code, bool) or not isinstance(code, int) or not isinstance(message, str):
        raise BadPayload("an answer's error needs an integer code and a message")
    return Answer(answer_id, None, code, message[:MAX_MESSAGE_CHARS])


# --- answers in parts -----------------------------------------------------------------------

# Bytes of answer per part: its base64 and the part's keys fit one message.
PART_BYTES: Final = (MAX_BYTES - 256) // 4 * 3


@dataclass(frozen=True)
class Part:
    id: str
    index: int
    count: int
    data: bytes


def encode_answer(answer: Answer, *, limit: int) -> list[bytes]:
    """The payloads that carry ``answer``: one, or parts when it is larger than one message.

    :class:`BadPayload` when the answer is larger than ``limit`` bytes.
    """
    data = _canonical(answer)
    if len(data) <= MAX_BYTES:
        return [data]
    if len(data) > limit:
        raise BadPayload(
            f"the answer is {len(data):,} bytes, more than this gateway sends ({limit:,}, "
            "mcp.json's max_message)"
        )
    pieces = [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
    return [
        json.dumps(
            {
                "v": VERSION,
                "id": answer.id,
                "part": index,
                "count": len(pieces),
                "data": base64.b64encode(piece).decode(),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        for index, piece in enumerate(pieces)
    ]


def decode_answer_or_part(data: bytes) -> Answer | Part:
    """An answer, or one part of an answer too large for one message."""
    value = _object(data, "answer")
    if "part" not in value:
        return decode_answer(data)
    answer_id = _id(value, "answer part")
    _keys(value, {"v", "id", "part", "count", "data"}, "an answer part")
    index, count, encoded = value.get("part"), value.get("count"), value.get("data")
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise BadPayload("an answer part's count must be an integer >= 2")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise BadPayload(f"an answer part's index must be an integer from 0 to {count - 1}")
    if not isinstance(encoded, str) or not encoded:
        raise BadPayload("an answer part's data must be base64 text")
    try:
        piece = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise BadPayload("an answer part's data is not base64") from None
    return Part(answer_id, index, count, piece)


class Parts:
    """The parts of one answer as they arrive, at most ``limit`` bytes in all. Pure.

    :meth:`add` returns the answer once every part is in; :class:`BadPayload`
    for a set of parts that cannot make one (counts that disagree, a part
    twice with other bytes, more than ``limit`` bytes, parts that do not read
    as an answer with the same id).
    """

    def __init__(self, answer_id: str, limit: int) -> None:
        self.id = answer_id
        self.limit = limit
        self.count = 0
        self.size = 0
        self.pieces: dict[int, bytes] = {}

    def add(self, part: Part) -> Answer | None:
        if part.id != self.id:
            raise BadPayload(f"a part of answer {part.id} given to answer {self.id}")
        if self.count and part.count != self.count:
            raise BadPayload(f"its parts disagree on their count ({self.count} and {part.count})")
        if part.count > -(-self.limit // PART_BYTES):
            raise BadPayload(
                f"{part.count} parts are more than an answer of at most {self.limit:,} bytes has"
            )
        self.count = part.count
        known = self.pieces.get(part.index)
        if known is not None:
            if known != part.data:
                raise BadPayload(f"part {part.index} came twice, with different bytes")
            return None
        self.size += len(part.data)
        if self.size > self.limit:
            raise BadPayload(f"its parts are more than {self.limit:,} bytes")
        self.pieces[part.index] = part.data
        if len(self.pieces) < self.count:
            return None
        whole = b"".join(self.pieces[i] for i in range(self.count))
        self.pieces.clear()
        answer = decode_answer(whole, limit=self.limit)  # a part inside is an unknown key
        if answer.id != self.id:
            raise BadPayload(f"its parts joined make the answer to {answer.id}")
        return answer


# --- names ----------------------------------------------------------------------------


def remote_name(label: str, server: str, tool: str) -> str:
    """What local agents see: ``LABEL.SERVER.TOOL``."""
    return f"{label}{SEPARATOR}{server}{SEPARATOR}{tool}"


def split_remote(name: str, labels: Any) -> tuple[str, str, str] | None:
    """``LABEL.SERVER.TOOL`` -> (label, server, tool) when LABEL is one of ``labels``."""
    label, sep, rest = name.partition(SEPARATOR)
    if not sep or label not in labels:
        return None
    parts = split(rest)
    if parts is None:
        return None
    return label, parts[0], parts[1]
