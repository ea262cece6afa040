"""The pure parts of alert delivery, metrics and status rendering."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from keel.watch import metrics
from keel.watch.alert_routes import (
    Alert,
    Gate,
    RouteLimits,
    TelegramRoute,
    retry_delay,
    telegram_request,
    telegram_verdict,
    webhook_body,
    webhook_verdict,
)
from keel.watch.children import describe_status
from keel.watch.cli import status_rows
from keel.watch.httpwire import Response, parse_url

ALERT = Alert("web", "web-1", "open", "web failed: exited with status 1", "box", 1700000000.0)


def response(status: int, body: object, **headers: str) -> Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Response(status, "", {k.lower().replace("_", "-"): v for k, v in headers.items()}, raw)


# --- the gate ------------------------------------------------------------------------


def test_gate_admits_each_incident_and_kind_once() -> None:
    gate = Gate(RouteLimits())
    assert gate.admit(0, ALERT) == "send"
    assert gate.admit(1, ALERT) == "duplicate"
    resolve = Alert("web", "web-1", "resolve", "ok", "box", 0)
    assert gate.admit(2, resolve) == "send"
    other = Alert("web", "web-2", "open", "again", "box", 0)
    assert gate.admit(3, other) == "send"


def test_gate_rate_limit_drops_and_counts_until_the_window_moves() -> None:
    gate = Gate(RouteLimits(rate_count=2, rate_period=60))
    alerts = [Alert("a", f"i{n}", "open", "", "box", 0) for n in range(5)]
    assert [gate.admit(0, a) for a in alerts[:3]] == ["send", "send", "rate_limited"]
    assert gate.take_dropped() == 1
    assert gate.take_dropped() == 0
    assert gate.admit(59.9, alerts[3]) == "rate_limited"
    assert gate.admit(60, alerts[4]) == "send"


def test_gate_remembers_a_bounded_number_of_incidents() -> None:
    gate = Gate(RouteLimits(rate_count=10_000), remember=3)
    for n in range(5):
        gate.admit(0, Alert("a", f"i{n}", "open", "", "box", 0))
    assert gate.admit(0, Alert("a", "i0", "open", "", "box", 0)) == "send"  # forgotten


# --- retries -------------------------------------------------------------------------


def test_retry_delay_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() -> None:
    limits = RouteLimits(retry_initial=1, retry_max=8)
    rng = random.Random(1)
    delays = [retry_delay(limits, n, None, rng) for n in range(1, 7)]
    for delay, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert base * 0.9 <= delay <= base * 1.1
    assert retry_delay(limits, 1, 17.0, rng) == 17.0
    assert retry_delay(limits, 100, None, rng) <= 8 * 1.1


# --- Telegram --------------------------------------------------------------------------


def route(api: str = "https://api.telegram.org") -> TelegramRoute:
    return TelegramRoute("tg", Path("/x"), "-100", parse_url(api), RouteLimits())


def test_telegram_request_shape() -> None:
    url, body = telegram_request(route("http://127.0.0.1:9000/prefix/"), "1:tok", ALERT)
    assert (url.host, url.port, url.target) == ("127.0.0.1", 9000, "/prefix/bot1:tok/sendMessage")
    payload = json.loads(body)
    assert payload == {
        "chat_id": "-100",
        "text": "[box] web failed: exited with status 1",
        "disable_web_page_preview": True,
    }
    long_alert = Alert("a", "i", "open", "x" * 10_000, "box", 0)
    assert len(json.loads(telegram_request(route(), "1:t", long_alert)[1])["text"]) == 4096


@pytest.mark.parametrize(
    ("answer", "outcome", "retry_after"),
    [
        (response(200, {"ok": True, "result": {"message_id": 5}}), "sent", None),
        (
            response(
                429,
                {
                    "ok": False,
                    "error_code": 429,
                    "description": "Too Many Requests: retry after 35",
                    "parameters": {"retry_after": 35},
                },
            ),
            "retry",
            35.0,
        ),
        (response(429, b"", retry_after="7"), "retry", 7.0),
        (response(502, b"<html>Bad Gateway</html>"), "retry", None),
        (response(500, {"ok": False, "error_code": 500, "description": "Internal"}), "retry", None),
        (
            response(
                400, {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}
            ),
            "failed",
            None,
        ),
        (
            response(401, {"ok": False, "error_code": 401, "description": "Unauthorized"}),
            "failed",
            None,
        ),
        (response(200, b"not json"), "failed", None),
    ],
)
def test_telegram_verdicts(answer: Response, outcome: str, retry_after: float | None) -> None:
    verdict = telegram_verdict(answer)
    assert verdict.outcome == outcome
    assert verdict.retry_after == retry_after
    if outcome == "failed" and answer.status == 400:
        assert verdict.reason == "Telegram 400: Bad Request: chat not found"


# --- webhooks --------------------------------------------------------------------------


def test_webhook_body_and_verdicts() -> None:
    assert json.loads(webhook_body(ALERT)) == {
        "source": "keel-watch",
        "host": "box",
        "agent": "web",
        "incident": "web-1",
        "kind": "open",
        "text": "web failed: exited with status 1",
        "time": 1700000000.0,
    }
    assert webhook_verdict(response(204, b"")).outcome == "sent"
    throttled = webhook_verdict(response(429, b"", retry_after="3"))
    assert (throttled.outcome, throttled.retry_after) == ("retry", 3.0)
    assert webhook_verdict(response(429, b"", retry_after="Wed, 21 Oct 2015")).retry_after is None
    assert webhook_verdict(response(503, b"")).outcome == "retry"
    assert webhook_verdict(response(404, b"")).outcome == "failed"


# --- metrics ------------------------------------------------------------------------------


def test_metrics_exposition() -> None:
    latency = {"no": metrics.Histogram(), "yes": metrics.Histogram()}
    latency["no"].observe(0.004)
    latency["no"].observe(0.02)
    latency["yes"].observe(4)
    text = metrics.render(
        [
            metrics.AgentSample("web", "healthy", 2, {"http": 3}),
            metrics.AgentSample('we"ird\\', "backoff", 0, {}),
        ],
        latency,
    )
    lines = text.splitlines()
    assert "# TYPE keel_watch_up gauge" in lines
    assert 'keel_watch_up{agent="web"} 1' in lines
    assert 'keel_watch_up{agent="we\\"ird\\\\"} 0' in lines
    assert 'keel_watch_agent_state{agent="web",state="healthy"} 1' in lines
    assert 'keel_watch_restarts_total{agent="web"} 2' in lines
    assert 'keel_watch_probe_failures_total{agent="web",probe="http"} 3' in lines
    assert 'keel_watch_restart_latency_seconds_bucket{backoff="no",le="0.0025"} 0' in lines
    assert 'keel_watch_restart_latency_seconds_bucket{backoff="no",le="0.005"} 1' in lines
    assert 'keel_watch_restart_latency_seconds_bucket{backoff="no",le="+Inf"} 2' in lines
    assert 'keel_watch_restart_latency_seconds_count{backoff="yes"} 1' in lines
    assert 'keel_watch_restart_latency_seconds_sum{backoff="yes"} 4.0' in lines
    assert text.endswith("\n")


# --- how exits are described ----------------------------------------------------------------


def test_exit_descriptions() -> None:
    assert describe_status(0) == "exited with status 0"
    assert describe_status(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_status(-200) == "killed by signal 200 (signal 200)"
    assert "status unknown" in describe_status(None)


def test_status_rows() -> None:
    rows = status_rows(
        {
            "agents": {
                "web": {
                    "state": "healthy",
                    "pid": 12,
                    "uptime": 75.0,
                    "restarts": 2,
                    "last_probe": {"probe": "http", "ok": True, "at": 995.0, "detail": "HTTP 200"},
                    "last_error": "exited with status 1",
                    "last_error_at": 700.0,
                },
                "db": {
                    "state": "backoff",
                    "pid": None,
                    "uptime": None,
                    "restarts": 9,
                    "last_probe": {
                        "probe": "tcp",
                        "ok": False,
                        "at": 999.0,
                        "detail": "connection refused",
                    },
                    "last_error": "x" * 100,
                    "last_error_at": 999.5,
                },
            }
        },
        now=1000.0,
    )
    assert rows[0] == [
        "db",
        "backoff",
        None,
        None,
        9,
        "tcp failed: connection refused (1.0s ago)",
        "x" * 47 + "… (0.5s ago)",
    ]
    assert rows[1] == [
        "web",
        "healthy",
        12,
        "1m15s",
        2,
        "http ok (5.0s ago)",
        "exited with status 1 (5m0s ago)",
    ]
