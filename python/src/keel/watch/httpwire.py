"""A small sans-I/O HTTP/1.1 request writer and response reader.

Watch is an HTTP client two ways: probes (``GET`` a health URL once a second
for every agent) and alerts (``POST`` JSON to Telegram or a webhook). Each
exchange is one request on a fresh connection with
``Connection: close``, so the parser only needs the response framings of
RFC 9112 section 6: no body (HEAD, 1xx, 204, 304), ``Transfer-Encoding:
chunked``, ``Content-Length``, or read until the server closes.

:class:`ResponseParser` holds no socket: :meth:`ResponseParser.feed` takes
bytes, :meth:`ResponseParser.close` reports end of stream, and
:attr:`ResponseParser.response` is set once the response is complete. It is a
tenth of the cost of a general library per exchange, which matters at a
hundred probes a second. Nothing here does I/O: the probe engine drives it on
its own sockets, and :mod:`keel.watch.http_client` on asyncio streams.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from keel.config import describe

MAX_HEAD = 64 * 1024


class HttpError(Exception):
    """The peer sent something that is not an HTTP/1.x response (or too much of it)."""


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes


@dataclass(frozen=True)
class Url:
    scheme: str
    host: str
    port: int
    target: str  # path and query, at least "/"

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]{1,253}\Z")


def host_problem(host: str) -> str | None:
    """Why ``host`` is not a host name or IP address to connect to, or None."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return None
    if _HOST_NAME.match(host):
        return None
    return (
        f"{describe(host)}: expected a host name (letters, digits, '.', '-' and '_') "
        "or an IP address"
    )


def parse_url(text: str) -> Url:
    """Split an ``http://`` or ``https://`` URL; ValueError says what is wrong.

    The URL must be printable ASCII without spaces (it is sent as it is in the
    request line): percent-encode anything else.
    """
    if not (text.isascii() and text.isprintable()) or " " in text:
        raise ValueError(
            f"expected a URL in printable ASCII without spaces (percent-encode the rest, "
            f"%20 for a space), got {describe(text)}"
        )
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"not a URL ({exc}): {describe(text)}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL, got {describe(text)}")
    if not parts.hostname:
        raise ValueError(f"URL has no host: {describe(text)}")
    if (problem := host_problem(parts.hostname)) is not None:
        raise ValueError(f"URL {describe(text)}: host {problem}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"URL has a bad port: {describe(text)}") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    default = 443 if parts.scheme == "https" else 80
    return Url(parts.scheme, parts.hostname, port or default, target)


def url_problem(text: str) -> str | None:
    """:func:`parse_url`'s complaint about ``text``, or None (a config ``check``)."""
    try:
        parse_url(text)
    except ValueError as exc:
        return str(exc)
    return None


def build_request(
    method: str,
    url: Url,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    user_agent: str = "keel-watch",
) -> bytes:
    """One request with ``Connection: close``; ``Content-Length`` when there is a body."""
    lines = [
        f"{method} {url.target} HTTP/1.1",
        f"Host: {url.authority}",
        "Connection: close",
        f"User-Agent: {user_agent}",
    ]
    for name, value in (headers or {}).items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class ResponseParser:
    """Parse one HTTP/1.x response from bytes fed in any chunking."""

    def __init__(self, *, method: str = "GET", max_body: int = 1 << 20) -> None:
        self._method = method.upper()
        self._max_body = max_body
        self._buffer = bytearray()
        self._head: tuple[int, str, dict[str, str]] | None = None
        self._framing = ""  # "none", "length", "chunked", "close"
        self._remaining = 0
        self._body = bytearray()
        self._chunk_state = "size"  # "size", "data", "data-crlf", "trailer"
        self.response: Response | None = None

    def feed(self, data: bytes) -> Response | None:
        if self.response is not None:
            return self.response
        self._buffer += data
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    raise HttpError("response head larger than 64 KiB")
                return None
            head = bytes(self._buffer[:end])
            del self._buffer[: end + 4]
            self._head = _parse_head(head)
            self._choose_framing()
        self._read_body()
        return self.response

    def close(self) -> Response:
        """The server closed the connection: finish a read-until-close body."""
        if self.response is not None:
            return self.response
        if self._head is None:
            if not self._buffer:
                raise HttpError("connection closed before any response")
            raise HttpError("connection closed in the middle of the response head")
        if self._framing == "close":
            return self._finish()
        raise HttpError("connection closed before the response body was complete")

    def _choose_framing(self) -> None:
        assert self._head is not None
        status, _, headers = self._head
        if self._method == "HEAD" or status < 200 or status in (204, 304):
            self._framing = "none"
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._framing = "chunked"
        elif "content-length" in headers:
            value = headers["content-length"].split(",")[0].strip()
            if not value.isdigit():
                raise HttpError(f"bad Content-Length {headers['content-length']!r}")
            self._remaining = int(value)
            if self._remaining > self._max_body:
                raise HttpError(f"response body larger than {self._max_body} bytes")
            self._framing = "length"
        else:
            self._framing = "close"

    def _read_body(self) -> None:
        framing = self._framing
        if framing == "none":
            self._finish()
        elif framing == "length":
            take = min(self._remaining, len(self._buffer))
            self._body += self._buffer[:take]
            del self._buffer[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._finish()
        elif framing == "close":
            self._body += self._buffer
            self._buffer.clear()
            self._check_size()
        else:
            self._read_chunks()

    def _read_chunks(self) -> None:
        buf = self._buffer
        while True:
            if self._chunk_state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise HttpError("chunk size line too long")
                    return
                size_text = bytes(buf[:end]).split(b";")[0].strip()
                del buf[: end + 2]
                try:
                    self._remaining = int(size_text, 16)
                except ValueError:
                    raise HttpError(f"bad chunk size {size_text!r}") from None
                self._chunk_state = "data" if self._remaining else "trailer"
            elif self._chunk_state == "data":
                take = min(self._remaining, len(buf))
                self._body += buf[:take]
                del buf[:take]
                self._remaining -= take
                self._check_size()
                if self._remaining:
                    return
                self._chunk_state = "data-crlf"
            elif self._chunk_state == "data-crlf":
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise HttpError("chunk data not followed by CRLF")
                del buf[:2]
                self._chunk_state = "size"
            else:  # trailer: header lines until an empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end])
                del buf[: end + 2]
                if not line:
                    self._finish()
                    return

    def _check_size(self) -> None:
        if len(self._body) > self._max_body:
            raise HttpError(f"response body larger than {self._max_body} bytes")

    def _finish(self) -> Response:
        assert self._head is not None
        status, reason, headers = self._head
        self.response = Response(status, reason, headers, bytes(self._body))
        return self.response


def parse_status_line(line: str) -> tuple[int, str]:
    """``HTTP/1.1 200 OK`` -> ``(200, "OK")``; HttpError for anything else."""
    version, _, rest = line.partition(" ")
    if not version.startswith("HTTP/1."):
        raise HttpError(f"not an HTTP/1.x response: {line[:60]!r}")
    code, _, reason = rest.partition(" ")
    if len(code) != 3 or not code.isdigit():
        raise HttpError(f"bad status line {line[:60]!r}")
    return int(code), reason


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    text = head.decode("latin-1")  # every byte decodes
    lines = text.split("\r\n")
    status, reason = parse_status_line(lines[0])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(f"bad header line {line[:60]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return status, reason, headers
