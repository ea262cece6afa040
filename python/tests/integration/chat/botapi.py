"""A Telegram Bot API server on loopback, written for keel chat's tests.

It speaks the real protocol over real HTTP: ``POST /bot<TOKEN>/<method>``
with a JSON, ``multipart/form-data`` or url-encoded body, answered with
``{"ok": true, "result": ...}`` or ``{"ok": false, "error_code": N,
"description": "...", "parameters": {"retry_after": N}}``. It implements
what keel chat calls, with Telegram's checks:

- ``getMe``; ``getUpdates`` with long polling (``timeout``), ``offset``
  confirming what came before, ``limit``, and 409 for a second poller;
- ``sendMessage`` (text of 1 to 4,096 UTF-16 code units, inline keyboards
  with 1-64 byte ``callback_data``), ``sendDocument`` (multipart with a file,
  a caption of at most 1,024), ``editMessageText`` (only the bot's own
  messages; "message is not modified"), ``answerCallbackQuery`` (only
  queries it issued, once, at most 200 characters);
- flood control: a third message to one chat within one second is answered
  429 with ``retry_after`` (a client that keeps one message a second per
  chat and sends one request at a time never trips it);
- a wrong token is 401, an unknown method 404;
- scripted answers (``fail_next``) for 429s and server errors.

Tests play the people: :meth:`BotApi.message` and :meth:`BotApi.press`
queue the updates Telegram would deliver.
"""

from __future__ import annotations

import collections
import contextlib
import email.parser
import email.policy
import http.server
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

BOT_ID = 999_000
JSON_FIELDS = {"reply_markup", "reply_parameters", "allowed_updates", "link_preview_options"}
NAMES = {111: "alice", 222: "bob", 666: "eve"}


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@dataclass
class Sent:
    """A message the bot sent (and what became of it)."""

    message_id: int
    chat: int
    text: str  # the text, or a document's caption
    at: float
    document: bytes | None = None
    filename: str | None = None
    buttons: list[dict[str, Any]] = field(default_factory=list)
    reply_to: int | None = None
    edits: list[str] = field(default_factory=list)
    offered: list[dict[str, Any]] = field(default_factory=list)  # the buttons it was sent with

    def __post_init__(self) -> None:
        self.offered = list(self.buttons)

    @property
    def current(self) -> str:
        return self.edits[-1] if self.edits else self.text

    def data(self, button: int = 0) -> str:
        """A button's data as sent (a client may still show buttons an edit removed)."""
        return str(self.offered[button]["callback_data"])


@dataclass
class Call:
    at: float
    method: str
    params: dict[str, Any]
    status: int = 0


class _Error(Exception):
    def __init__(self, code: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.retry_after = retry_after


class BotApi(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token: str, username: str = "keel_test_bot") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.username = username
        self.cond = threading.Condition()
        self.updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(5000)
        self._message_ids = itertools.count(1)
        self._query_ids = itertools.count(70000)
        self.calls: list[Call] = []
        self.sent: list[Sent] = []
        self.answers: dict[str, str | None] = {}  # issued query id -> answer text (None: not yet)
        self.chats: dict[int, str] = {}
        self.scripted: dict[str, collections.deque[tuple[int, dict[str, Any]]]] = (
            collections.defaultdict(collections.deque)
        )
        self.flood: dict[int, collections.deque[float]] = collections.defaultdict(collections.deque)
        self.flood_refusals = 0
        self.polling = 0
        self.confirmed = 0  # the highest update id the bot confirmed with its offset

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    # --- the people ------------------------------------------------------------------

    def message(
        self,
        user: int,
        text: str,
        *,
        chat: int | None = None,
        chat_type: str = "private",
        age: float = 0.0,
    ) -> int:
        """``user`` writes ``text`` in ``chat`` (their private chat by default)."""
        chat_id = user if chat is None else chat
        with self.cond:
            self.chats[chat_id] = chat_type
            update_id = next(self._update_ids)
            chat_object: dict[str, Any] = {"id": chat_id, "type": chat_type}
            if chat_type == "private":
                chat_object["first_name"] = NAMES.get(user, "someone")
            else:
                chat_object["title"] = "ops"
            self.updates.append(
                {
                    "update_id": update_id,
                    "message": {
                        "message_id": next(self._message_ids),
                        "from": self._user(user),
                        "chat": chat_object,
                        "date": int(time.time() - age),
                        "text": text,
                        "entities": [
                            {
                                "type": "bot_command",
                                "offset": 0,
                                "length": len(text.split(maxsplit=1)[0]),
                            }
                        ]
                        if text.startswith("/")
                        else [],
                    },
                }
            )
            self.cond.notify_all()
            return update_id

    def press(
        self,
        user: int,
        sent: Sent,
        button: int = 0,
        *,
        chat: int | None = None,
        chat_type: str | None = None,
        data: str | None = None,
    ) -> str:
        """``user`` presses ``button`` of ``sent`` (as shown in ``chat``); the query's id."""
        chat_id = sent.chat if chat is None else chat
        kind = chat_type or self.chats.get(chat_id, "private")
        with self.cond:
            query_id = str(next(self._query_ids))
            self.answers[query_id] = None
            self.updates.append(
                {
                    "update_id": next(self._update_ids),
                    "callback_query": {
                        "id": query_id,
                        "from": self._user(user),
                        "message": {
                            "message_id": sent.message_id,
                            "from": self._user(BOT_ID),
                            "chat": {"id": chat_id, "type": kind},
                            "date": int(sent.at),
                            "text": sent.current,
                        },
                        "chat_instance": f"ci{chat_id}",
                        "data": data if data is not None else sent.data(button),
                    },
                }
            )
            self.cond.notify_all()
            return query_id

    def fail_next(self, method: str, status: int, answer: dict[str, Any], times: int = 1) -> None:
        with self.cond:
            for _ in range(times):
                self.scripted[method].append((status, answer))

    def throttle_next(self, method: str, retry_after: int, times: int = 1) -> None:
        self.fail_next(
            method,
            429,
            {
                "ok": False,
                "error_code": 429,
                "description": f"Too Many Requests: retry after {retry_after}",
                "parameters": {"retry_after": retry_after},
            },
            times,
        )

    # --- what the tests read -----------------------------------------------------------

    def to(self, chat: int) -> list[Sent]:
        with self.cond:
            return [s for s in self.sent if s.chat == chat]

    def calls_of(self, method: str) -> list[Call]:
        with self.cond:
            return [c for c in self.calls if c.method == method]

    def pending_updates(self) -> int:
        with self.cond:
            return len(self.updates)

    def _user(self, user: int) -> dict[str, Any]:
        if user == BOT_ID:
            return {"id": BOT_ID, "is_bot": True, "first_name": "keel", "username": self.username}
        name = NAMES.get(user, f"user{user}")
        return {"id": user, "is_bot": False, "first_name": name.title(), "username": name}

    # --- the API -------------------------------------------------------------------------

    def call(
        self, method: str, params: dict[str, Any], files: dict[str, tuple[str, bytes]]
    ) -> tuple[int, dict[str, Any]]:
        record = Call(time.monotonic(), method, params)
        with self.cond:
            self.calls.append(record)
            scripted = self.scripted.get(method)
            if scripted:
                record.status, forced = scripted.popleft()
                return record.status, forced
        handler = getattr(self, f"_{method}", None)
        try:
            if handler is None:
                raise _Error(404, "Not Found")
            result = handler(params, files) if method == "sendDocument" else handler(params)
        except _Error as exc:
            record.status = exc.code
            answer: dict[str, Any] = {
                "ok": False,
                "error_code": exc.code,
                "description": exc.description,
            }
            if exc.retry_after is not None:
                answer["parameters"] = {"retry_after": exc.retry_after}
            return exc.code, answer
        record.status = 200
        return 200, {"ok": True, "result": result}

    def _getMe(self, params: dict[str, Any]) -> Any:
        return {**self._user(BOT_ID), "can_join_groups": True, "supports_inline_queries": False}

    def _getUpdates(self, params: dict[str, Any]) -> Any:
        offset = int(params.get("offset", 0))
        timeout = min(float(params.get("timeout", 0)), 50.0)
        limit = max(1, min(int(params.get("limit", 100)), 100))
        with self.cond:
            if self.polling:
                raise _Error(409, "Conflict: terminated by other getUpdates request")
            self.polling += 1
            try:
                if offset:
                    self.confirmed = max(self.confirmed, offset - 1)
                    self.updates = [u for u in self.updates if u["update_id"] >= offset]
                self.cond.wait_for(lambda: bool(self.updates), timeout=timeout)
                return self.updates[:limit]
            finally:
                self.polling -= 1

    def _check_chat(self, params: dict[str, Any]) -> int:
        try:
            chat = int(params["chat_id"])
        except (KeyError, TypeError, ValueError):
            raise _Error(400, "Bad Request: chat_id is empty") from None
        if chat not in self.chats:
            raise _Error(400, "Bad Request: chat not found")
        return chat

    def _flood(self, chat: int) -> None:
        now = time.monotonic()
        window = self.flood[chat]
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) >= 2:
            self.flood_refusals += 1
            raise _Error(429, "Too Many Requests: retry after 1", retry_after=1)
        window.append(now)

    def _buttons(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        markup = params.get("reply_markup")
        if markup is None:
            return []
        rows = markup.get("inline_keyboard") if isinstance(markup, dict) else None
        if not isinstance(rows, list):
            raise _Error(400, "Bad Request: can't parse reply keyboard markup JSON object")
        buttons = [button for row in rows for button in row]
        for button in buttons:
            data = button.get("callback_data", "")
            if not isinstance(data, str) or not 1 <= len(data.encode()) <= 64:
                raise _Error(400, "Bad Request: BUTTON_DATA_INVALID")
        return buttons

    def _store(self, chat: int, params: dict[str, Any], text: str, **extra: Any) -> dict[str, Any]:
        reply = params.get("reply_parameters")
        sent = Sent(
            next(self._message_ids),
            chat,
            text,
            time.time(),
            buttons=self._buttons(params),
            reply_to=reply.get("message_id") if isinstance(reply, dict) else None,
            **extra,
        )
        self.sent.append(sent)
        self.cond.notify_all()
        result: dict[str, Any] = {
            "message_id": sent.message_id,
            "from": self._user(BOT_ID),
            "chat": {"id": chat, "type": self.chats[chat]},
            "date": int(sent.at),
        }
        if sent.buttons:
            result["reply_markup"] = params["reply_markup"]
        return result

    def _sendMessage(self, params: dict[str, Any]) -> Any:
        with self.cond:
            chat = self._check_chat(params)
            text = params.get("text")
            if not isinstance(text, str) or not text.strip():
                raise _Error(400, "Bad Request: message text is empty")
            if utf16_len(text) > 4096:
                raise _Error(400, "Bad Request: message is too long")
            self._buttons(params)
            self._flood(chat)
            return {**self._store(chat, params, text), "text": text}

    def _sendDocument(self, params: dict[str, Any], files: dict[str, tuple[str, bytes]]) -> Any:
        with self.cond:
            chat = self._check_chat(params)
            if "document" not in files:
                raise _Error(400, "Bad Request: there is no document in the request")
            filename, content = files["document"]
            caption = params.get("caption", "")
            if utf16_len(caption) > 1024:
                raise _Error(400, "Bad Request: message caption is too long")
            self._buttons(params)
            self._flood(chat)
            stored = self._store(chat, params, caption, document=content, filename=filename)
            return {**stored, "document": {"file_name": filename, "file_size": len(content)}}

    def _editMessageText(self, params: dict[str, Any]) -> Any:
        with self.cond:
            chat = self._check_chat(params)
            message_id = params.get("message_id")
            sent = next(
                (s for s in self.sent if s.chat == chat and s.message_id == message_id), None
            )
            if sent is None:
                raise _Error(400, "Bad Request: message to edit not found")
            text = params.get("text")
            if not isinstance(text, str) or not text.strip() or utf16_len(text) > 4096:
                raise _Error(400, "Bad Request: text is empty or too long")
            if text == sent.current and not sent.buttons:
                raise _Error(400, "Bad Request: message is not modified")
            self._flood(chat)
            sent.edits.append(text)
            sent.buttons = self._buttons(params)  # no reply_markup: the keyboard goes
            self.cond.notify_all()
            return {
                "message_id": sent.message_id,
                "chat": {"id": chat, "type": self.chats[chat]},
                "text": text,
            }

    def _answerCallbackQuery(self, params: dict[str, Any]) -> Any:
        with self.cond:
            query_id = params.get("callback_query_id")
            if query_id not in self.answers:
                raise _Error(400, "Bad Request: query ID is invalid")
            if self.answers[query_id] is not None:
                raise _Error(
                    400,
                    "Bad Request: query is too old and response timeout expired or query ID is invalid",
                )
            text = params.get("text", "")
            if len(text) > 200:
                raise _Error(400, "Bad Request: MESSAGE_TOO_LONG")
            self.answers[query_id] = text
            self.cond.notify_all()
            return True


class _Handler(http.server.BaseHTTPRequestHandler):
    server: BotApi
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        split = urlsplit(self.path)
        parts = split.path.split("/")
        params: dict[str, Any] = {k: v[-1] for k, v in parse_qs(split.query).items()}
        files: dict[str, tuple[str, bytes]] = {}
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length else b""
        if len(parts) != 3 or not parts[1].startswith("bot"):
            self._reply(404, {"ok": False, "error_code": 404, "description": "Not Found"})
            return
        if parts[1] != f"bot{self.server.token}":
            self._reply(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
            return
        kind = self.headers.get_content_type()
        try:
            if kind == "application/json":
                params.update(json.loads(body))
            elif kind == "multipart/form-data":
                raw = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body
                form = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
                for part in form.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    payload = part.get_payload(decode=True)
                    assert isinstance(payload, bytes)
                    if part.get_filename():
                        files[str(name)] = (str(part.get_filename()), payload)
                    else:
                        params[str(name)] = payload.decode()
            elif kind == "application/x-www-form-urlencoded":
                params.update({k: v[-1] for k, v in parse_qs(body.decode()).items()})
            for key in JSON_FIELDS & set(params):
                if isinstance(params[key], str):
                    params[key] = json.loads(params[key])
        except (ValueError, UnicodeDecodeError):
            self._reply(
                400, {"ok": False, "error_code": 400, "description": "Bad Request: can't parse"}
            )
            return
        status, answer = self.server.call(parts[2], params, files)
        self._reply(status, answer)

    def _reply(self, status: int, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        with contextlib.suppress(OSError):  # a poller cancelled at shutdown is gone
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def bot_api(token: str) -> Iterator[BotApi]:
    server = BotApi(token)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        with server.cond:
            server.updates.clear()
            server.cond.notify_all()
        server.shutdown()
        server.server_close()
