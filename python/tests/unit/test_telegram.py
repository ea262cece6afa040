"""keel.telegram: the Bot API's wire, shared by watch's alerts and keel chat."""

from __future__ import annotations

import email.parser
import email.policy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel import telegram
from keel.errors import ConfigError
from keel.watch.httpwire import Response, parse_url

TOKEN = "123456:ABC-def_ghi"


def response(status: int, body: object, **headers: str) -> Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Response(status, "", {k.lower().replace("_", "-"): v for k, v in headers.items()}, raw)


def test_method_urls_carry_the_token_in_the_path() -> None:
    url = telegram.method_url(parse_url("http://127.0.0.1:9000/prefix/"), TOKEN, "getUpdates")
    assert (url.host, url.port, url.target) == ("127.0.0.1", 9000, f"/prefix/bot{TOKEN}/getUpdates")
    assert telegram.method_url(parse_url(telegram.TELEGRAM_API), TOKEN, "getMe").target == (
        f"/bot{TOKEN}/getMe"
    )


def test_read_token_never_shows_the_file_content(tmp_path: Path) -> None:
    good = tmp_path / "token"
    good.write_text(f"  {TOKEN}\n")
    assert telegram.read_token(good) == TOKEN
    bad = tmp_path / "bad"
    bad.write_text("hunter2 hunter2\n")
    with pytest.raises(ConfigError) as info:
        telegram.read_token(bad)
    assert "hunter2" not in str(info.value)
    assert "does not hold a Telegram bot token" in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        telegram.read_token(tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot read"):
        telegram.read_token(tmp_path)


# --- answers ----------------------------------------------------------------------------


def test_a_good_answer() -> None:
    answer = telegram.read_answer(response(200, {"ok": True, "result": [{"update_id": 1}]}))
    assert answer.ok
    assert answer.result == [{"update_id": 1}]
    assert not answer.retryable


@pytest.mark.parametrize(
    ("reply", "retryable", "retry_after", "reason"),
    [
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
            True,
            35.0,
            "Telegram 429: Too Many Requests: retry after 35",
        ),
        (
            response(429, {"ok": False, "error_code": 429}, retry_after="4"),
            True,
            4.0,
            "Telegram 429",
        ),
        (response(429, b"", retry_after="7"), True, 7.0, "HTTP 429"),
        (response(502, b"<html>Bad Gateway</html>"), True, None, "HTTP 502"),
        (
            response(500, {"ok": False, "error_code": 500, "description": "x"}),
            True,
            None,
            "Telegram 500: x",
        ),
        (
            response(409, {"ok": False, "error_code": 409, "description": "Conflict"}),
            False,
            None,
            "Telegram 409: Conflict",
        ),
        (response(404, b"nope"), False, None, "HTTP 404: not a Bot API answer"),
        (response(200, b"not json"), False, None, "HTTP 200: not a Bot API answer"),
        (response(200, {"ok": "yes"}), False, None, "Telegram 200"),
        (
            response(400, {"ok": False, "error_code": True, "description": ["odd"]}),
            False,
            None,
            "Telegram 400",
        ),
        (
            response(429, {"ok": False, "error_code": 429, "parameters": {"retry_after": -1}}),
            True,
            None,
            "Telegram 429",
        ),
    ],
)
def test_answers_that_are_not_ok(
    reply: Response, retryable: bool, retry_after: float | None, reason: str
) -> None:
    answer = telegram.read_answer(reply)
    assert not answer.ok
    assert answer.retryable is retryable
    assert answer.retry_after == retry_after
    assert answer.reason == reason


def test_seconds_values() -> None:
    assert telegram.seconds_value(3) == 3.0
    assert telegram.seconds_value(" 12 ") == 12.0
    for odd in (True, -1, "soon", None, float("inf"), "1.5"):
        assert telegram.seconds_value(odd) is None


# --- request bodies --------------------------------------------------------------------------


def test_json_body() -> None:
    headers, body = telegram.json_body({"chat_id": 5, "text": "ünï"})
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(body) == {"chat_id": 5, "text": "ünï"}


def test_multipart_body_is_read_back_as_a_form() -> None:
    content = "line one\r\nline two ✓\n".encode()
    headers, body = telegram.multipart_body(
        {"chat_id": "-100", "caption": "log: ✓", "reply_markup": '{"a":1}'},
        file_field="document",
        filename="log.txt",
        content=content,
        boundary="0123456789abcdef0123",
    )
    raw = f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    assert message.is_multipart()
    parts = {
        part.get_param("name", header="content-disposition"): part for part in message.iter_parts()
    }
    assert set(parts) == {"chat_id", "caption", "reply_markup", "document"}
    assert parts["caption"].get_payload(decode=True) == "log: ✓".encode()
    document = parts["document"]
    assert document.get_filename() == "log.txt"
    assert document.get_content_type() == "text/plain"
    assert document.get_payload(decode=True) == content


def test_multipart_refuses_what_it_cannot_carry() -> None:
    def body(**changes: Any) -> None:
        arguments: dict[str, Any] = {
            "file_field": "document",
            "filename": "a.txt",
            "content": b"x",
            "boundary": "0123456789abcdef",
        }
        arguments.update(changes)
        telegram.multipart_body({"chat_id": "1"}, **arguments)

    body()
    with pytest.raises(ValueError, match="boundary"):
        body(boundary="short")
    with pytest.raises(ValueError, match="occurs in the file"):
        body(content=b"--0123456789abcdef")
    with pytest.raises(ValueError, match="file name"):
        body(filename='a".txt')


# --- updates -------------------------------------------------------------------------------


def test_a_message_update() -> None:
    update = telegram.parse_update(
        {
            "update_id": 10,
            "message": {
                "message_id": 3,
                "from": {"id": 111, "is_bot": False, "first_name": "Ada", "username": "ada"},
                "chat": {"id": 111, "type": "private"},
                "date": 1700000000,
                "text": "/status",
            },
        }
    )
    assert update == telegram.Update(
        10,
        message=telegram.Message(
            3,
            telegram.Chat(111, "private"),
            telegram.User(111, False, "@ada"),
            1700000000,
            "/status",
        ),
    )
    assert update.message is not None
    assert update.message.chat.private


def test_a_button_press_update() -> None:
    update = telegram.parse_update(
        {
            "update_id": 11,
            "callback_query": {
                "id": "4382",
                "from": {"id": 222, "is_bot": False, "first_name": "Bob"},
                "message": {"message_id": 9, "chat": {"id": -100, "type": "group"}, "date": 0},
                "chat_instance": "x",
                "data": "ok:abc",
            },
        }
    )
    assert update is not None
    assert update.callback_query is not None
    query = update.callback_query
    assert (query.id, query.sender.id, query.sender.name, query.data) == (
        "4382",
        222,
        "Bob",
        "ok:abc",
    )
    assert query.message is not None
    assert query.message.chat == telegram.Chat(-100, "group")


def test_edits_and_other_updates_carry_only_their_id() -> None:
    edited = {"update_id": 12, "edited_message": {"message_id": 3, "text": "/restart web"}}
    assert telegram.parse_update(edited) == telegram.Update(12)
    assert telegram.parse_update({"update_id": 13, "poll": {}}) == telegram.Update(13)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        {"update_id": "1"},
        {"update_id": True},
        {"message": {}},
    ],
)
def test_malformed_updates(raw: object) -> None:
    assert telegram.parse_update(raw) is None


def test_a_message_with_an_unreadable_sender_is_not_one_without_sender() -> None:
    update = telegram.parse_update(
        {
            "update_id": 1,
            "message": {
                "message_id": 1,
                "from": {"id": "111"},
                "chat": {"id": 111, "type": "private"},
                "text": "/status",
            },
        }
    )
    assert update == telegram.Update(1, message=None)


def test_a_press_without_a_sender_is_dropped() -> None:
    raw = {"update_id": 5, "callback_query": {"id": "q", "data": "ok:x"}}
    assert telegram.parse_update(raw) == telegram.Update(5)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "update_id",
                    "message",
                    "callback_query",
                    "from",
                    "chat",
                    "id",
                    "type",
                    "text",
                    "message_id",
                    "date",
                    "data",
                    "is_bot",
                    "username",
                    "first_name",
                ]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(raw=_JSON)
def test_any_json_is_an_update_or_none_never_an_error(raw: object) -> None:
    update = telegram.parse_update(raw)
    if update is not None:
        assert isinstance(update.update_id, int)
        if update.message is not None:
            assert isinstance(update.message.chat.id, int)
            assert update.message.text is None or isinstance(update.message.text, str)
        if update.callback_query is not None:
            assert isinstance(update.callback_query.sender.id, int)
