"""The sans-I/O HTTP/1.1 response parser and request builder of watch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.watch.httpwire import HttpError, ResponseParser, build_request, parse_url


def parse(data: bytes, *, method: str = "GET", chunks: list[int] | None = None):
    parser = ResponseParser(method=method)
    position = 0
    for size in chunks or [len(data)]:
        piece = data[position : position + size]
        position += size
        if parser.feed(piece) is not None:
            return parser.response
    if position < len(data):
        parser.feed(data[position:])
    return parser.response or parser.close()


def test_content_length() -> None:
    response = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")
    assert response.status == 200
    assert response.reason == "OK"
    assert response.body == b"hello"
    assert response.headers["x-a"] == "1"


def test_chunked_with_extensions_and_trailer() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: y\r\n\r\n"
    )
    assert parse(raw).body == b"hello world"


def test_read_until_close() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.0 200 OK\r\n\r\npart one, ") is None
    assert parser.feed(b"part two") is None
    assert parser.close().body == b"part one, part two"


@pytest.mark.parametrize(
    ("head", "method"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", "GET"),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", "GET"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "HEAD"),
    ],
)
def test_responses_without_a_body(head: bytes, method: str) -> None:
    parser = ResponseParser(method=method)
    response = parser.feed(head)
    assert response is not None
    assert response.body == b""


def test_repeated_headers_are_joined() -> None:
    response = parse(b"HTTP/1.1 200 OK\r\nA: 1\r\na: 2\r\nContent-Length: 0\r\n\r\n")
    assert response.headers["a"] == "1, 2"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc",
            "chunk data not followed by CRLF",
        ),
    ],
)
def test_garbage_is_an_http_error(raw: bytes, message: str) -> None:
    with pytest.raises(HttpError, match=message):
        ResponseParser().feed(raw)


def test_early_close_is_an_http_error() -> None:
    with pytest.raises(HttpError, match="before any response"):
        ResponseParser().close()
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-")
    with pytest.raises(HttpError, match="middle of the response head"):
        parser.close()
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(HttpError, match="body was complete"):
        parser.close()


def test_size_limits() -> None:
    with pytest.raises(HttpError, match="64 KiB"):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000)
    with pytest.raises(HttpError, match="larger than 10 bytes"):
        ResponseParser(max_body=10).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")
    parser = ResponseParser(max_body=10)
    with pytest.raises(HttpError, match="larger than 10 bytes"):
        parser.feed(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 11)


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
    b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
]


@settings(deadline=None)  # a loaded machine is slow, not wrong
@given(index=st.sampled_from([0, 1]), cuts=st.lists(st.integers(1, 7), max_size=40))
def test_any_chunking_of_the_input_gives_the_same_response(index: int, cuts: list[int]) -> None:
    raw = RESPONSES[index]
    response = parse(raw, chunks=cuts)
    assert response.body == b"hello world"
    assert response.status in (200, 503)


def test_build_request_and_urls() -> None:
    url = parse_url("http://127.0.0.1:8080/health?deep=1")
    assert url.target == "/health?deep=1"
    raw = build_request("POST", url, headers={"Content-Type": "application/json"}, body=b"{}")
    assert raw.startswith(b"POST /health?deep=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n")
    assert raw.endswith(b"Content-Length: 2\r\n\r\n{}")
    assert parse_url("https://api.telegram.org").authority == "api.telegram.org"
    assert parse_url("http://[::1]:81/").authority == "[::1]:81"
    assert parse_url("http://h").target == "/"
    for bad in ("ftp://x/", "http:///path", "http://h:99999/"):
        with pytest.raises(ValueError, match="URL"):
            parse_url(bad)
    with pytest.raises(ValueError, match="line break"):
        build_request("GET", url, headers={"X": "a\r\nB: c"})
