"""A small asyncio D-Bus client on jeepney's sans-I/O parts.

jeepney provides the SASL authenticator, the message parser and the message
builders; this module owns the socket. It talks either to the system bus
(``Hello`` first, then match rules) or straight to systemd's private socket
``/run/systemd/private`` (root only, no broker in between, and systemd sends
its signals to every direct connection). Method calls are matched to replies
by serial; signals go to one callback, synchronously, in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from jeepney import DBusAddress, new_method_call
from jeepney.auth import BEGIN, make_auth_external
from jeepney.bus_messages import message_bus
from jeepney.low_level import HeaderFields, Message, MessageType, Parser

log = logging.getLogger("keel.watch.dbus")

SYSTEM_BUS = "/run/dbus/system_bus_socket"
SYSTEMD_PRIVATE = "/run/systemd/private"

SYSTEMD = DBusAddress(
    "/org/freedesktop/systemd1",
    bus_name="org.freedesktop.systemd1",
    interface="org.freedesktop.systemd1.Manager",
)


class DBusError(Exception):
    """An error reply (``name``: e.g. ``org.freedesktop.systemd1.NoSuchUnit``)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}" if message else name)
        self.name = name
        self.message = message


class ConnectionLost(Exception):
    """The bus or systemd closed the connection (e.g. ``systemctl daemon-reexec``)."""


def system_bus_path() -> str:
    """The system bus socket (``DBUS_SYSTEM_BUS_ADDRESS`` if it names a unix path)."""
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "")
    for part in address.split(";"):
        if part.startswith("unix:"):
            for option in part[5:].split(","):
                if option.startswith("path="):
                    return option[5:]
    return SYSTEM_BUS


class Connection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_signal: Callable[[Message], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_signal = on_signal
        self._on_lost = on_lost
        self._parser = Parser()
        self._serial = 0
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        bus: bool,
        on_signal: Callable[[Message], None],
        on_lost: Callable[[], None] = lambda: None,
        timeout: float = 10.0,
    ) -> Connection:
        """Connect and authenticate (EXTERNAL, as this uid); ``bus``: say Hello."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                await _authenticate(path, reader, writer)
            except BaseException:
                writer.close()
                raise
        connection = cls(reader, writer, on_signal, on_lost)
        connection._task = asyncio.create_task(connection._read(), name=f"dbus:{path}")
        if bus:
            await connection.call(message_bus.Hello(), timeout=timeout)
        return connection

    def send(self, message: Message) -> asyncio.Future[Message]:
        """Send a method call; the future gets the reply (or a DBusError / ConnectionLost)."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_exception(ConnectionLost("D-Bus connection is closed"))
            return future
        self._serial += 1
        self._pending[self._serial] = future
        self._writer.write(message.serialise(self._serial))
        return future

    async def call(self, message: Message, *, timeout: float = 25.0) -> tuple[Any, ...]:
        """Call and return the reply's body; DBusError for an error reply."""
        async with asyncio.timeout(timeout):
            reply = await self.send(message)
        return tuple(reply.body)

    async def _read(self) -> None:
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                for message in self._parser.feed(data):
                    self._dispatch(message)
        except (OSError, ValueError) as exc:
            log.warning("D-Bus connection failed: %s", exc)
        finally:
            self._lost()

    def _dispatch(self, message: Message) -> None:
        kind = message.header.message_type
        if kind is MessageType.signal:
            try:
                self._on_signal(message)
            except Exception:
                log.exception("D-Bus signal handler failed")
            return
        if kind not in (MessageType.method_return, MessageType.error):
            return
        serial = message.header.fields.get(HeaderFields.reply_serial)
        future = self._pending.pop(serial, None) if isinstance(serial, int) else None
        if future is None or future.done():
            return
        if kind is MessageType.error:
            name = str(message.header.fields.get(HeaderFields.error_name, "error"))
            text = str(message.body[0]) if message.body else ""
            future.set_exception(DBusError(name, text))
        else:
            future.set_result(message)

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost("D-Bus connection lost"))
        self._pending.clear()
        self._writer.close()
        self._on_lost()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost("D-Bus connection closed"))
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


async def _authenticate(
    path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    # BEGIN goes out with AUTH, before the server's OK, as sd-bus clients do.
    # systemd's private socket needs it so: if BEGIN and the first message
    # reach it in one read, it leaves that message unread until more data comes.
    writer.write(b"\0" + make_auth_external() + BEGIN)
    await writer.drain()
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError:
        raise ConnectionLost(f"{path}: closed during authentication") from None
    except asyncio.LimitOverrunError:
        raise ConnectionLost(f"{path}: garbage during authentication") from None
    if not line.startswith(b"OK "):
        text = line.decode("ascii", "replace").strip()
        raise ConnectionLost(f"{path}: authentication refused ({text})")


# --- messages -------------------------------------------------------------------------


def manager_call(method: str, signature: str | None = None, *args: Any) -> Message:
    return new_method_call(SYSTEMD, method, signature, args)


def get_all(path: str, interface: str) -> Message:
    address = DBusAddress(path, bus_name="org.freedesktop.systemd1")
    return new_method_call(
        address.with_interface("org.freedesktop.DBus.Properties"), "GetAll", "s", (interface,)
    )


def get_property(path: str, interface: str, name: str) -> Message:
    address = DBusAddress(path, bus_name="org.freedesktop.systemd1")
    return new_method_call(
        address.with_interface("org.freedesktop.DBus.Properties"), "Get", "ss", (interface, name)
    )


def add_match(rule: str) -> Message:
    return message_bus.AddMatch(rule)


def unwrap(properties: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """``{name: (signature, value)}`` as jeepney parses ``a{sv}`` -> ``{name: value}``."""
    return {name: value[1] for name, value in properties.items()}
