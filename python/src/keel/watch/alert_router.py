"""Alert delivery: one queue and one worker task per route.

:meth:`AlertRouter.send` never blocks and never raises: supervision hands an
alert over and goes on. Each route's worker sends in order, retrying as
:mod:`keel.watch.alert_routes` decides; a dead route only fills its own queue
(bounded: when full, new alerts for that route are dropped and recorded).
Every alert that is sent or dropped becomes a ledger record. The Telegram
token lives in memory only: it appears in no log line, record or error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from keel.watch import http_client, httpwire
from keel.watch.alert_routes import (
    Alert,
    Gate,
    Route,
    SendVerdict,
    TelegramRoute,
    retry_delay,
    telegram_request,
    telegram_verdict,
    webhook_body,
    webhook_verdict,
)

log = logging.getLogger("keel.watch.alerts")

QUEUE_SIZE = 64

RecordEntry = Callable[[str, str, Mapping[str, Any]], None]
"""``record(kind, subject, data)``: queue a ledger entry (never blocks)."""


class AlertRouter:
    def __init__(
        self,
        routes: Mapping[str, Route],
        tokens: Mapping[str, str],
        *,
        record: RecordEntry,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.routes = dict(routes)
        self._tokens = dict(tokens)
        self._record = record
        self._rng = rng or random.Random()
        self._clock = clock
        self._ssl = ssl_context
        self._gates = {name: Gate(route.limits) for name, route in self.routes.items()}
        self._queues: dict[str, asyncio.Queue[Alert]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self.sent: dict[str, int] = dict.fromkeys(self.routes, 0)
        self.dropped: dict[str, int] = dict.fromkeys(self.routes, 0)

    def start(self) -> None:
        for name in self.routes:
            queue: asyncio.Queue[Alert] = asyncio.Queue(QUEUE_SIZE)
            self._queues[name] = queue
            self._workers.append(
                asyncio.create_task(self._worker(name, queue), name=f"alerts:{name}")
            )

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until every queued alert was handled."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for queue in self._queues.values():
                    await queue.join()

    # --- handing alerts over ----------------------------------------------------------

    def send(self, alert: Alert, routes: tuple[str, ...]) -> None:
        """Queue ``alert`` for each of ``routes``; returns at once."""
        now = self._clock()
        for name in routes:
            gate = self._gates.get(name)
            queue = self._queues.get(name)
            if gate is None or queue is None:
                continue
            admission = gate.admit(now, alert)
            if admission == "duplicate":
                continue
            if admission == "rate_limited":
                self._dropped(name, alert, "rate limit of the route", attempts=0)
                continue
            try:
                queue.put_nowait(alert)
            except asyncio.QueueFull:
                self._dropped(name, alert, "queue full (the route is not keeping up)", attempts=0)

    def _dropped(self, route: str, alert: Alert, reason: str, *, attempts: int) -> None:
        self.dropped[route] += 1
        log.warning(
            "alert %s/%s for %s not sent to route %s: %s",
            alert.incident,
            alert.kind,
            alert.agent,
            route,
            reason,
        )
        self._record(
            "alert",
            alert.agent,
            {
                "route": route,
                "incident": alert.incident,
                "alert": alert.kind,
                "outcome": "dropped",
                "reason": reason,
                "attempts": attempts,
            },
        )

    # --- the worker ------------------------------------------------------------------

    async def _worker(self, name: str, queue: asyncio.Queue[Alert]) -> None:
        route = self.routes[name]
        gate = self._gates[name]
        while True:
            alert = await queue.get()
            try:
                lost = gate.take_dropped()
                if lost:
                    note = f" ({lost} earlier alert{'s' if lost != 1 else ''} not sent: rate limit)"
                    alert = replace(alert, text=alert.text + note)
                await self._deliver(name, route, alert)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not kill the route's worker
                log.exception("alert route %s: unexpected error", name)
            finally:
                queue.task_done()

    async def _deliver(self, name: str, route: Route, alert: Alert) -> None:
        limits = route.limits
        reason = ""
        for attempt in range(1, limits.attempts + 1):
            verdict = await self._attempt(name, route, alert)
            if verdict.outcome == "sent":
                self.sent[name] += 1
                self._record(
                    "alert",
                    alert.agent,
                    {
                        "route": name,
                        "incident": alert.incident,
                        "alert": alert.kind,
                        "outcome": "sent",
                        "attempts": attempt,
                    },
                )
                return
            reason = verdict.reason
            if verdict.outcome == "failed":
                self._dropped(name, alert, f"refused: {reason}", attempts=attempt)
                return
            if attempt == limits.attempts:
                break
            delay = retry_delay(limits, attempt, verdict.retry_after, self._rng)
            if delay > limits.retry_after_max:
                self._dropped(
                    name, alert, f"{reason}; asked to wait {delay:g}s, too long", attempts=attempt
                )
                return
            log.info(
                "alert route %s (%s): attempt %d failed (%s); retrying in %.1fs",
                name,
                route.describe(),
                attempt,
                reason,
                delay,
            )
            await asyncio.sleep(delay)
        self._dropped(
            name,
            alert,
            f"gave up after {limits.attempts} attempts: {reason}",
            attempts=limits.attempts,
        )

    async def _attempt(self, name: str, route: Route, alert: Alert) -> SendVerdict:
        try:
            if isinstance(route, TelegramRoute):
                url, body = telegram_request(route, self._tokens[name], alert)
                response = await http_client.request(
                    "POST",
                    url,
                    headers={"Content-Type": "application/json"},
                    body=body,
                    timeout=route.limits.timeout,
                    max_body=256 * 1024,
                    ssl_context=self._ssl,
                )
                return telegram_verdict(response)
            response = await http_client.request(
                "POST",
                route.url,
                headers={"Content-Type": "application/json"},
                body=webhook_body(alert),
                timeout=route.limits.timeout,
                max_body=256 * 1024,
                ssl_context=self._ssl,
            )
            return webhook_verdict(response)
        except TimeoutError:
            return SendVerdict("retry", f"no answer within {route.limits.timeout:g}s")
        except httpwire.HttpError as exc:
            return SendVerdict("retry", f"bad HTTP response: {exc}")
        except ssl.SSLError as exc:
            return SendVerdict("retry", f"TLS error: {exc.reason or type(exc).__name__}")
        except OSError as exc:
            return SendVerdict("retry", exc.strerror or type(exc).__name__)
