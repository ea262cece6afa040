"""The pure core of what keel chat sends: Telegram's limits, and text that fits.

Telegram's limits for a bot: about one message a second in a chat, twenty a
minute in a group, about thirty a second in all; a message holds 4,096
characters (counted in UTF-16 code units), a caption 1,024, a button's
answer 200. A 429 answer says how long to wait (``retry_after``), for one
chat or for the whole bot.

:class:`Outbox` keeps one queue per chat and hands out the next item only
when every limit allows it; :meth:`Outbox.next_time` says when that will be,
so the sender sleeps exactly until then. A chat's queue is bounded: past
``queue_limit`` further replies are dropped and counted, and the next message
to that chat says how many. Button answers have a queue of their own and go
first (the person is looking at a spinner), within the bot's overall limit.

:func:`compose` turns a reply into what is sent: a message when it fits, a
file (``sendDocument``) with its first line as the caption when it does not.
:func:`plain` makes text from agents and the ledger safe to show: control
characters, bidirectional overrides and line separators are shown escaped,
so an agent's error message cannot reorder or hide what the operator reads.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from keel.telegram import CAPTION_LIMIT, TEXT_LIMIT

ANSWER_LIMIT = 200  # characters of an answerCallbackQuery text

Method = Literal["sendMessage", "sendDocument", "editMessageText", "answerCallbackQuery"]


@dataclass(frozen=True)
class Limits:
    chat_interval: float = 1.0  # seconds between two messages to one chat
    group_count: int = 20  # messages to one group...
    group_period: float = 60.0  # ...per this many seconds
    global_count: int = 30  # requests in all...
    global_period: float = 1.0  # ...per this many seconds
    queue_limit: int = 10  # replies waiting per chat


@dataclass
class Outgoing:
    """One Bot API call to make (the document's bytes ride along for ``sendDocument``)."""

    method: Method
    chat: int | None
    group: bool = False
    text: str = ""  # the message text, the caption, the new text, the answer
    document: bytes | None = None
    filename: str | None = None
    reply_to: int | None = None
    buttons: tuple[tuple[str, str], ...] = ()
    message_id: int | None = None  # editMessageText
    callback_id: str | None = None  # answerCallbackQuery
    confirmation: str | None = None  # the confirmation whose buttons this message carries
    attempts: int = 0

    def params(self) -> dict[str, Any]:
        """The call's parameters (for sendDocument, the form fields besides the file)."""
        if self.method == "answerCallbackQuery":
            params: dict[str, Any] = {"callback_query_id": self.callback_id}
            if self.text:
                params["text"] = self.text
            return params
        params = {"chat_id": self.chat}
        if self.method == "editMessageText":
            params.update(message_id=self.message_id, text=self.text)
            params["link_preview_options"] = {"is_disabled": True}
            return params  # no reply_markup: the buttons go
        if self.method == "sendMessage":
            params["text"] = self.text
            params["link_preview_options"] = {"is_disabled": True}
        else:
            params["caption"] = self.text
        if self.reply_to is not None:
            params["reply_parameters"] = {
                "message_id": self.reply_to,
                "allow_sending_without_reply": True,
            }
        if self.buttons:
            params["reply_markup"] = {
                "inline_keyboard": [
                    [{"text": label, "callback_data": data} for label, data in self.buttons]
                ]
            }
        return params

    def form(self) -> dict[str, str]:
        """:meth:`params` as multipart form fields (objects as JSON, as the Bot API takes them)."""
        return {
            key: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            for key, value in self.params().items()
        }


@dataclass
class OutboxStats:
    queued: int = 0
    taken: int = 0
    dropped: int = 0
    throttled: int = 0  # 429 answers


class Outbox:
    """Per-chat queues released at the pace Telegram allows."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.stats = OutboxStats()
        self._queues: dict[int, deque[Outgoing]] = {}
        self._answers: deque[Outgoing] = deque()
        self._last: dict[int, float] = {}  # chat -> when its last message went
        self._group_sent: dict[int, deque[float]] = {}
        self._all_sent: deque[float] = deque()
        self._chat_hold: dict[int, float] = {}  # chat -> not before (a 429 for that chat)
        self._hold = float("-inf")  # not before, for every request (a 429 for the bot)
        self._dropped: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._answers) + sum(len(q) for q in self._queues.values())

    def push(self, item: Outgoing) -> bool:
        """Queue ``item``; False if its chat's queue was full and it was dropped."""
        if item.method == "answerCallbackQuery":
            self._answers.append(item)
            self.stats.queued += 1
            return True
        assert item.chat is not None
        queue = self._queues.setdefault(item.chat, deque())
        if len(queue) >= self.limits.queue_limit:
            self._dropped[item.chat] = self._dropped.get(item.chat, 0) + 1
            self.stats.dropped += 1
            return False
        queue.append(item)
        self.stats.queued += 1
        return True

    def retry(self, item: Outgoing) -> None:
        """Put ``item`` back at the head of its queue (its send failed and may be tried again)."""
        item.attempts += 1
        if item.method == "answerCallbackQuery":
            self._answers.appendleft(item)
        else:
            assert item.chat is not None
            self._queues.setdefault(item.chat, deque()).appendleft(item)

    def throttle(self, chat: int | None, seconds: float, now: float) -> None:
        """Telegram answered 429 with ``retry_after``: hold that chat (None: every chat)."""
        self.stats.throttled += 1
        until = now + max(0.0, seconds)
        if chat is None:
            self._hold = max(self._hold, until)
        else:
            self._chat_hold[chat] = max(self._chat_hold.get(chat, until), until)

    def next_time(self, now: float) -> float | None:
        """When :meth:`take` will next have something (None: nothing is queued)."""
        candidates = [
            self._chat_ready(chat, queue[0].group, now)
            for chat, queue in self._queues.items()
            if queue
        ]
        if self._answers:
            candidates.append(now)
        if not candidates:
            return None
        return max(min(candidates), self._global_ready(now))

    def take(self, now: float) -> Outgoing | None:
        """The next item that may go at ``now`` (its sending counts from now), or None."""
        if self._global_ready(now) > now:
            return None
        if self._answers:
            item = self._answers.popleft()
        else:
            ready = [
                (self._chat_ready(chat, queue[0].group, now), chat)
                for chat, queue in self._queues.items()
                if queue
            ]
            due = [(at, chat) for at, chat in ready if at <= now]
            if not due:
                return None
            _, chat = min(due, key=lambda pair: pair[0])
            queue = self._queues.pop(chat)  # re-inserted last: chats take turns
            item = queue.popleft()
            if queue:
                self._queues[chat] = queue
            self._last[chat] = now
            if item.group:
                self._group_sent.setdefault(chat, deque()).append(now)
            lost = self._dropped.pop(chat, 0)
            if lost and item.method == "sendMessage":
                note = f"\n\n({lost} more repl{'y was' if lost == 1 else 'ies were'} dropped: too many at once.)"
                if utf16_len(item.text) + utf16_len(note) <= TEXT_LIMIT:
                    item.text += note
            elif lost:
                self._dropped[chat] = lost  # said with the next plain message
        self._all_sent.append(now)
        self.stats.taken += 1
        return item

    def _chat_ready(self, chat: int, group: bool, now: float) -> float:
        limits = self.limits
        at = max(
            self._last.get(chat, float("-inf")) + limits.chat_interval,
            self._chat_hold.get(chat, float("-inf")),
        )
        if group:
            window = self._group_sent.get(chat)
            if window is not None:
                while window and now - window[0] >= limits.group_period:
                    window.popleft()
                if len(window) >= limits.group_count:
                    at = max(at, window[0] + limits.group_period)
        return at

    def _global_ready(self, now: float) -> float:
        window = self._all_sent
        while window and now - window[0] >= self.limits.global_period:
            window.popleft()
        at = self._hold
        if len(window) >= self.limits.global_count:
            at = max(at, window[0] + self.limits.global_period)
        return at


# --- text ----------------------------------------------------------------------------

_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
    "\u2028\u2029\ud800-\udfff]"
)


def plain(text: str) -> str:
    """``text`` with what could hide or reorder it shown as ``\\uXXXX`` (newlines and tabs stay)."""
    return _UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def utf16_len(text: str) -> int:
    """Length as Telegram counts it: characters beyond U+FFFF count twice."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def clip(text: str, limit: int, mark: str = "…") -> str:
    """``text`` cut to at most ``limit`` UTF-16 code units, ``mark`` showing the cut."""
    if utf16_len(text) <= limit:
        return text
    budget = limit - utf16_len(mark)
    out: list[str] = []
    for ch in text:
        budget -= 2 if ord(ch) > 0xFFFF else 1
        if budget < 0:
            break
        out.append(ch)
    return "".join(out) + mark


def compose(
    chat: int,
    group: bool,
    text: str,
    *,
    filename: str = "keel.txt",
    reply_to: int | None = None,
    buttons: tuple[tuple[str, str], ...] = (),
    confirmation: str | None = None,
) -> Outgoing:
    """A reply as it will go: a message if it fits in one, else a file with a caption."""
    text = plain(text) if text.strip() else "(nothing to show)"
    common: dict[str, Any] = {
        "chat": chat,
        "group": group,
        "reply_to": reply_to,
        "buttons": buttons,
        "confirmation": confirmation,
    }
    if utf16_len(text) <= TEXT_LIMIT:
        return Outgoing("sendMessage", text=text, **common)
    lines = text.count("\n") + 1
    note = f"\n(too long for a message: all {lines} lines are in {filename})"
    caption = clip(text.split("\n", 1)[0], CAPTION_LIMIT - utf16_len(note)) + note
    return Outgoing(
        "sendDocument",
        text=caption,
        document=text.encode("utf-8"),
        filename=filename,
        **common,
    )


def edit(chat: int, message_id: int, text: str) -> Outgoing:
    return Outgoing(
        "editMessageText", chat, text=clip(plain(text), TEXT_LIMIT), message_id=message_id
    )


def answer(callback_id: str, text: str) -> Outgoing:
    return Outgoing(
        "answerCallbackQuery", None, text=clip(plain(text), ANSWER_LIMIT), callback_id=callback_id
    )
