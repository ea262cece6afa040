"""Health probes: http, tcp and exec, each bounded by its timeout.

:func:`run_check` performs one check and returns an :class:`Outcome`; it never
raises for anything the agent does (refused connections, garbage responses,
timeouts, a command that cannot run are all failed outcomes with a reason a
person can read). Scheduling (``interval``) belongs to the daemon, counting
(``failures``, ``grace``) to the policy.

The daemon hands plain-HTTP and TCP checks of IP addresses to
:mod:`keel.watch.probe_engine` (one thread, one epoll set: at a hundred agents
probed every second, the cost per probe is the budget); :func:`run_check` runs
the others (https, host names, exec) on the event loop, with the same verdicts
(:func:`judge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
from dataclasses import dataclass

from keel.watch import http_client, httpwire
from keel.watch.children import Child, describe_status


@dataclass(frozen=True)
class HttpCheck:
    url: httpwire.Url
    expect_status: tuple[int, ...] = ()  # empty: any 2xx or 3xx
    expect_body: str | None = None


@dataclass(frozen=True)
class TcpCheck:
    host: str
    port: int


@dataclass(frozen=True)
class ExecCheck:
    command: tuple[str, ...]


Check = HttpCheck | TcpCheck | ExecCheck


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    check: Check
    interval: float = 5.0
    timeout: float = 2.0
    failures: int = 3
    grace: float = 0.0


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str


OUTPUT_TAIL = 2048  # bytes of an exec probe's output kept for the failure reason


async def run_check(check: Check, timeout: float) -> Outcome:
    """Run one check; every failure, the timeout included, is an Outcome."""
    try:
        if isinstance(check, HttpCheck):
            return await _http(check, timeout)
        if isinstance(check, TcpCheck):
            return await _tcp(check, timeout)
        return await _exec(check, timeout)
    except TimeoutError:
        return Outcome(False, f"timeout after {timeout:g}s")
    except httpwire.HttpError as exc:
        return Outcome(False, f"bad HTTP response: {exc}")
    except OSError as exc:
        return Outcome(False, _os_reason(exc))


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror}"
    return exc.strerror or type(exc).__name__


async def _address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve host {host!r}") from None
        family, _, _, _, sockaddr = infos[0]
        return family, (str(sockaddr[0]), int(sockaddr[1]))
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, (host, port)


async def _connect(host: str, port: int) -> socket.socket:
    family, address = await _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def _tcp(check: TcpCheck, timeout: float) -> Outcome:
    async with asyncio.timeout(timeout):
        sock = await _connect(check.host, check.port)
    sock.close()
    return Outcome(True, "connected")


_REQUESTS: dict[httpwire.Url, bytes] = {}


async def _http(check: HttpCheck, timeout: float) -> Outcome:
    url = check.url
    if url.scheme == "https":
        response = await http_client.request("GET", url, timeout=timeout, max_body=64 * 1024)
        return judge(check, response)
    payload = _REQUESTS.get(url)
    if payload is None:
        payload = _REQUESTS[url] = httpwire.build_request("GET", url)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        sock = await _connect(url.host, url.port)
        try:
            await loop.sock_sendall(sock, payload)
            parser = httpwire.ResponseParser(max_body=64 * 1024)
            while True:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    response = parser.close()
                    break
                if (done := parser.feed(data)) is not None:
                    response = done
                    break
        finally:
            sock.close()
    return judge(check, response)


def judge(check: HttpCheck, response: httpwire.Response) -> Outcome:
    verdict = judge_status(check, response.status)
    wanted = check.expect_body
    if verdict.ok and wanted is not None and wanted.encode() not in response.body:
        return Outcome(False, f"HTTP {response.status}, body lacks {wanted!r}")
    return verdict


def judge_status(check: HttpCheck, status: int) -> Outcome:
    """The verdict on the status code alone (enough when no body is expected)."""
    if check.expect_status:
        if status not in check.expect_status:
            wanted = ", ".join(str(s) for s in check.expect_status)
            return Outcome(False, f"HTTP {status} (expected {wanted})")
    elif not 200 <= status < 400:
        return Outcome(False, f"HTTP {status}")
    return Outcome(True, f"HTTP {status}")


async def _exec(check: ExecCheck, timeout: float) -> Outcome:
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    output = bytearray()

    def drain() -> None:
        try:
            chunk = os.read(read_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            loop.remove_reader(read_fd)
            return
        output.extend(chunk)
        del output[:-OUTPUT_TAIL]

    try:
        child = Child.spawn(check.command, stdout=write_fd, stderr=write_fd)
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        return Outcome(False, f"cannot run {check.command[0]!r}: {exc.strerror}")
    os.close(write_fd)
    loop.add_reader(read_fd, drain)
    try:
        async with asyncio.timeout(timeout):
            code = await child.wait()
    except TimeoutError:
        child.kill()
        await child.wait()
        return Outcome(False, f"timeout after {timeout:g}s")
    finally:
        with contextlib.suppress(OSError):
            drain()
        loop.remove_reader(read_fd)
        os.close(read_fd)
    tail = _last_line(bytes(output))
    if code == 0:
        return Outcome(True, tail or "exit status 0")
    reason = describe_status(code)
    return Outcome(False, f"{reason}: {tail}" if tail else reason)


def _last_line(output: bytes) -> str:
    lines = [line.strip() for line in output.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:200] if lines else ""
