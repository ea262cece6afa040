"""The pure core of alert delivery: routes, gates, retry schedules, wire shapes.

A route is where alerts go: a Telegram chat (Bot API ``sendMessage``) or a
webhook (a JSON ``POST``). Before an alert is queued for a route, the route's
:class:`Gate` decides: a second alert of the same kind for the same incident
is a duplicate and is ignored; past the route's rate limit it is dropped (and
counted, so the next message that goes out says how many were lost). Sending
is retried on network errors, 5xx and 429 with an exponential schedule; a 429
waits exactly what the server asked (Telegram's ``parameters.retry_after``,
or a ``Retry-After`` header). Other 4xx answers are permanent: retrying a
wrong token or chat id only hides the problem.

No I/O here; :mod:`keel.watch.alert_router` sends.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from keel import telegram
from keel.watch.httpwire import Response, Url


@dataclass(frozen=True)
class RouteLimits:
    rate_count: int = 20  # at most this many alerts...
    rate_period: float = 60.0  # ...per this many seconds
    attempts: int = 6  # tries per alert before it is dropped
    retry_initial: float = 1.0
    retry_max: float = 60.0
    retry_after_max: float = 600.0  # the longest 429 wait honoured before giving up
    timeout: float = 10.0  # per HTTP request


@dataclass(frozen=True)
class TelegramRoute:
    name: str
    token_file: Path
    chat_id: str
    api: Url
    limits: RouteLimits

    def describe(self) -> str:
        return f"telegram chat {self.chat_id}"


@dataclass(frozen=True)
class WebhookRoute:
    name: str
    url: Url
    limits: RouteLimits

    def describe(self) -> str:
        return f"webhook {self.url.scheme}://{self.url.authority}{self.url.target}"


Route = TelegramRoute | WebhookRoute


@dataclass(frozen=True)
class Alert:
    """What a route delivers: an incident's open/resolve/... message about an agent."""

    agent: str
    incident: str
    kind: str
    text: str
    host: str
    time: float  # wall clock (seconds since the epoch), for the webhook payload
    source: str = "keel-watch"  # who raised it (safeswitch alerts through watch's routes)


# --- the gate: duplicates and the rate limit ----------------------------------------


Admission = Literal["send", "duplicate", "rate_limited"]


class Gate:
    """Per-route admission: one alert per (incident, kind), at most N per period."""

    def __init__(self, limits: RouteLimits, *, remember: int = 4096) -> None:
        self.limits = limits
        self._sent: deque[float] = deque()
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remember = remember
        self.dropped_since_last_send = 0

    def admit(self, now: float, alert: Alert) -> Admission:
        key = (alert.incident, alert.kind)
        if key in self._seen:
            return "duplicate"
        self._seen[key] = None
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        window = self._sent
        while window and now - window[0] >= self.limits.rate_period:
            window.popleft()
        if len(window) >= self.limits.rate_count:
            self.dropped_since_last_send += 1
            return "rate_limited"
        window.append(now)
        return "send"

    def take_dropped(self) -> int:
        """How many alerts the rate limit dropped since the last one that went out."""
        dropped, self.dropped_since_last_send = self.dropped_since_last_send, 0
        return dropped


# --- retries -----------------------------------------------------------------------


def retry_delay(
    limits: RouteLimits, attempt: int, retry_after: float | None, rng: random.Random
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    if retry_after is not None:
        return max(0.0, retry_after)
    base = min(limits.retry_max, limits.retry_initial * 2 ** min(attempt - 1, 32))
    return float(base * rng.uniform(0.9, 1.1))  # jitter, so many watches do not retry in step


@dataclass(frozen=True)
class SendVerdict:
    """How one HTTP attempt went: delivered, worth retrying (maybe after N s), or hopeless."""

    outcome: Literal["sent", "retry", "failed"]
    reason: str = ""
    retry_after: float | None = None


# --- Telegram ------------------------------------------------------------------------


def telegram_request(route: TelegramRoute, token: str, alert: Alert) -> tuple[Url, bytes]:
    """The ``sendMessage`` call for an alert: the URL (holding the token) and JSON body."""
    url = telegram.method_url(route.api, token, "sendMessage")
    payload = {
        "chat_id": route.chat_id,
        "text": render_text(alert)[: telegram.TEXT_LIMIT],
        "disable_web_page_preview": True,
    }
    return url, json.dumps(payload, ensure_ascii=False).encode()


def telegram_verdict(response: Response) -> SendVerdict:
    """Read a Bot API answer: ``{"ok": true, ...}`` or ``{"ok": false, "error_code": ...}``."""
    answer = telegram.read_answer(response)
    if answer.ok:
        return SendVerdict("sent")
    if answer.retryable:
        return SendVerdict("retry", answer.reason, answer.retry_after)
    return SendVerdict("failed", answer.reason)


# --- webhooks --------------------------------------------------------------------------


def webhook_body(alert: Alert) -> bytes:
    payload = {
        "source": alert.source,
        "host": alert.host,
        "agent": alert.agent,
        "incident": alert.incident,
        "kind": alert.kind,
        "text": alert.text,
        "time": alert.time,
    }
    return json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()


def webhook_verdict(response: Response) -> SendVerdict:
    status = response.status
    if 200 <= status < 300:
        return SendVerdict("sent")
    if status == 429:
        return SendVerdict(
            "retry", "HTTP 429", telegram.seconds_value(response.headers.get("retry-after"))
        )
    if status >= 500 or status == 408:
        return SendVerdict("retry", f"HTTP {status}")
    return SendVerdict("failed", f"HTTP {status}")


def render_text(alert: Alert) -> str:
    return f"[{alert.host}] {alert.text}"
