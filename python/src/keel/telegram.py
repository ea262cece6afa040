"""The Telegram Bot API on the wire: what watch's alerts and keel chat share.

Pure, no I/O: the bot token read from its file (never echoed in an error),
method URLs (the token is part of the path), request bodies (JSON, and
``multipart/form-data`` for ``sendDocument``), reading an answer
(``{"ok": true, "result": ...}`` or ``{"ok": false, "error_code": 429,
"parameters": {"retry_after": N}}``) and the typed view of the updates
``getUpdates`` returns. Both users send with :func:`keel.watch.http_client.request`.

Updates come from the network: :func:`parse_update` checks every field it
reads and returns None for anything it cannot vouch for, so the layers above
never see a half-typed value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.config import Section
from keel.errors import ConfigError
from keel.watch.httpwire import Response, Url

TELEGRAM_API = "https://api.telegram.org"
TEXT_LIMIT = 4096  # characters of a message text (UTF-16 code units, as Telegram counts)
CAPTION_LIMIT = 1024  # characters of a document's caption
CALLBACK_DATA_LIMIT = 64  # bytes of an inline button's callback_data

_TOKEN = re.compile(r"^[0-9]+:[A-Za-z0-9_-]+$")
_FILENAME = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


def read_token(path: Path, section: Section | None = None, key: str = "token_file") -> str:
    """The bot token in ``path``; errors name ``section.key`` and never include the token."""

    def fail(message: str) -> ConfigError:
        if section is not None:
            return section.error(key, message)
        return ConfigError(f"{path}: {message}")

    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise fail(f"{path} does not exist") from None
    except PermissionError:
        raise fail(f"{path} is not readable by this user") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {path}: {type(exc).__name__}") from None
    if not _TOKEN.match(token):
        raise fail(
            f"{path} does not hold a Telegram bot token (expected one line like 123456:ABC-def...)"
        )
    return token


def method_url(api: Url, token: str, method: str) -> Url:
    """``<api>/bot<token>/<method>``: the URL holds the token, so it is never logged."""
    base = api.target.rstrip("/")
    return Url(api.scheme, api.host, api.port, f"{base}/bot{token}/{method}")


def json_body(params: Mapping[str, Any]) -> tuple[dict[str, str], bytes]:
    """Headers and body of a JSON call."""
    body = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
    return {"Content-Type": "application/json"}, body


def multipart_body(
    fields: Mapping[str, str],
    *,
    file_field: str,
    filename: str,
    content: bytes,
    boundary: str,
    content_type: str = "text/plain; charset=utf-8",
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a call that uploads one file (RFC 7578 ``multipart/form-data``).

    ``boundary`` comes from the caller (random in the daemon, fixed in tests);
    a boundary that occurs in the content is refused rather than sent broken.
    """
    if not re.fullmatch(r"[A-Za-z0-9]{16,70}", boundary):
        raise ValueError("a boundary is 16 to 70 letters and digits")
    if not _FILENAME.match(filename):
        raise ValueError(f"file name {filename!r}: letters, digits, '.', '_' and '-' only")
    delimiter = f"--{boundary}".encode()
    parts: list[bytes] = []
    for name, value in fields.items():
        part = value.encode()
        if delimiter in part or '"' in name or "\r" in name or "\n" in name:
            raise ValueError(f"form field {name!r} cannot be carried")
        parts.append(
            delimiter + f'\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + part
        )
    if delimiter in content:
        raise ValueError("the boundary occurs in the file; choose another")
    parts.append(
        delimiter
        + (
            f'\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + content
    )
    body = b"\r\n".join(parts) + b"\r\n" + delimiter + b"--\r\n"
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body


# --- answers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One Bot API answer, read from an HTTP response whatever it held."""

    status: int
    ok: bool
    result: Any = None
    error_code: int | None = None  # from the answer, else the HTTP status
    description: str = ""
    retry_after: float | None = None
    bot_api: bool = True  # False: the body was not a Bot API answer (a proxy's HTML page)

    @property
    def reason(self) -> str:
        """One line for logs and records (never the token: it is only in the URL)."""
        if not self.bot_api:
            if self.status == 429 or self.status >= 500:
                return f"HTTP {self.status}"
            return f"HTTP {self.status}: not a Bot API answer"
        code = self.error_code if self.error_code is not None else self.status
        return f"Telegram {code}: {self.description}" if self.description else f"Telegram {code}"

    @property
    def throttled(self) -> bool:
        return self.status == 429 or self.error_code == 429

    @property
    def retryable(self) -> bool:
        """Worth trying again: flood control (after ``retry_after``) or a server error."""
        if self.ok:
            return False
        code = self.error_code or 0
        return self.throttled or self.status >= 500 or code >= 500


def read_answer(response: Response) -> Answer:
    """Read ``response`` as the Bot API answers (``ok``, ``result``, ``error_code``...)."""
    try:
        answer: Any = json.loads(response.body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        answer = None
    header_wait = seconds_value(response.headers.get("retry-after"))
    if not isinstance(answer, dict):
        retry_after = header_wait if response.status == 429 else None
        return Answer(response.status, False, retry_after=retry_after, bot_api=False)
    if answer.get("ok") is True and response.status == 200:
        return Answer(response.status, True, result=answer.get("result"))
    code = answer.get("error_code")
    error_code = code if isinstance(code, int) and not isinstance(code, bool) else response.status
    description = answer.get("description")
    retry_after = None
    if error_code == 429 or response.status == 429:
        parameters = answer.get("parameters")
        if isinstance(parameters, dict):
            retry_after = seconds_value(parameters.get("retry_after"))
        if retry_after is None:
            retry_after = header_wait
    return Answer(
        response.status,
        False,
        error_code=error_code,
        description=str(description)[:200] if isinstance(description, str) else "",
        retry_after=retry_after,
    )


def seconds_value(value: object) -> float | None:
    """A non-negative number of seconds from JSON or a header; None if absent or odd."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if 0 <= value < float("inf") else None
    if isinstance(value, str) and value.strip().isdigit():
        return float(value.strip())
    return None


# --- updates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    id: int
    is_bot: bool
    name: str  # "@username", else the first name: for logs, never for decisions


@dataclass(frozen=True)
class Chat:
    id: int
    type: str  # "private", "group", "supergroup" or "channel"

    @property
    def private(self) -> bool:
        return self.type == "private"


@dataclass(frozen=True)
class Message:
    message_id: int
    chat: Chat
    sender: User | None  # None in channels and for messages sent on behalf of a chat
    date: int  # seconds since the epoch; 0 for a message the bot can no longer see
    text: str | None


@dataclass(frozen=True)
class CallbackQuery:
    """A press on an inline button: ``sender`` pressed it, on ``message``."""

    id: str
    sender: User
    message: Message | None
    data: str | None


@dataclass(frozen=True)
class Update:
    update_id: int
    message: Message | None = None  # a new message (edits are not carried: see parse_update)
    callback_query: CallbackQuery | None = None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _user(value: object) -> User | None:
    if not isinstance(value, dict):
        return None
    user_id = _integer(value.get("id"))
    if user_id is None:
        return None
    username, first = value.get("username"), value.get("first_name")
    if isinstance(username, str) and username:
        name = "@" + username
    else:
        name = first if isinstance(first, str) else ""
    return User(user_id, value.get("is_bot") is True, name[:64])


def _chat(value: object) -> Chat | None:
    if not isinstance(value, dict):
        return None
    chat_id, kind = _integer(value.get("id")), value.get("type")
    if chat_id is None or not isinstance(kind, str):
        return None
    return Chat(chat_id, kind)


def _message(value: object) -> Message | None:
    if not isinstance(value, dict):
        return None
    message_id, chat = _integer(value.get("message_id")), _chat(value.get("chat"))
    if message_id is None or chat is None:
        return None
    sender = _user(value["from"]) if "from" in value else None
    if "from" in value and sender is None:
        return None  # a sender we cannot read is not "no sender"
    date = _integer(value.get("date"))
    text = value.get("text")
    return Message(message_id, chat, sender, date or 0, text if isinstance(text, str) else None)


def parse_update(value: object) -> Update | None:
    """One element of ``getUpdates``' result, or None if it is not a well-formed update.

    Only new messages and button presses are carried; an edited message is
    not (editing ``/status`` into ``/restart web`` must not act), nor is
    anything else, though its ``update_id`` still moves the offset on.
    """
    if not isinstance(value, dict):
        return None
    update_id = _integer(value.get("update_id"))
    if update_id is None:
        return None
    if "message" in value:
        return Update(update_id, message=_message(value["message"]))
    query = value.get("callback_query")
    if isinstance(query, dict):
        query_id, sender = query.get("id"), _user(query.get("from"))
        data = query.get("data")
        if isinstance(query_id, str) and query_id and sender is not None:
            return Update(
                update_id,
                callback_query=CallbackQuery(
                    query_id,
                    sender,
                    _message(query.get("message")),
                    data if isinstance(data, str) else None,
                ),
            )
    return Update(update_id)
