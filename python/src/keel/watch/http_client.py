"""One HTTP/1.1 exchange over asyncio (alerts, https probes, keel chat's Bot API calls),
on :mod:`keel.watch.httpwire`."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping

from keel.watch.httpwire import Response, ResponseParser, Url, build_request


async def request(
    method: str,
    url: Url,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float,
    max_body: int = 1 << 20,
    ssl_context: ssl.SSLContext | None = None,
    user_agent: str = "keel-watch",
) -> Response:
    """One HTTP exchange within ``timeout`` seconds (raises TimeoutError, OSError, HttpError)."""
    async with asyncio.timeout(timeout):
        context: ssl.SSLContext | None = None
        if url.scheme == "https":
            context = ssl_context or ssl.create_default_context()
        reader, writer = await asyncio.open_connection(
            url.host, url.port, ssl=context, server_hostname=url.host if context else None
        )
        try:
            writer.write(
                build_request(method, url, headers=headers, body=body, user_agent=user_agent)
            )
            parser = ResponseParser(method=method, max_body=max_body)
            while True:
                data = await reader.read(65536)
                if not data:
                    return parser.close()
                response = parser.feed(data)
                if response is not None:
                    return response
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
