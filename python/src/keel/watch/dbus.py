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
import struct
from collections.abc import Callable, Mapping
from typing import Any

from jeepney import DBusAddress, new_method_call
from jeepney.auth import BEGIN, make_auth_external
from jeepney.bus_messages import message_bus
from jeepney.low_level import Header, HeaderFields, Message, MessageType, calc_msg_size

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


MAX_MESSAGE = 1 << 27  # the D-Bus specification's limit (128 MiB)


class Signal:
    """A signal whose header is parsed and whose body is parsed only on demand.

    Most signals systemd sends to a direct connection concern units watch does
    not follow; they are dropped after reading the header.
    """

    __slots__ = ("body_start", "header", "raw")

    def __init__(self, header: Header, raw: bytes, body_start: int) -> None:
        self.header = header
        self.raw = raw
        self.body_start = body_start

    @property
    def member(self) -> str | None:
        value = self.header.fields.get(HeaderFields.member)
        return str(value) if value is not None else None

    @property
    def path(self) -> str | None:
        value = self.header.fields.get(HeaderFields.path)
        return str(value) if value is not None else None

    def body(self) -> tuple[Any, ...]:
        return tuple(Message.from_buffer(self.raw).body)


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
        on_signal: Callable[[Signal], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_signal = on_signal
        self._on_lost = on_lost
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
        on_signal: Callable[[Signal], None],
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
        buffer = bytearray()
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                buffer += data
                for raw in _split_messages(buffer):
                    self._dispatch(raw)
        except (OSError, ValueError, struct.error) as exc:
            log.warning("D-Bus connection failed: %s", exc)
        finally:
            self._lost()

    def _dispatch(self, raw: bytes) -> None:
        header, body_start = Header.from_buffer(raw)
        kind = header.message_type
        if kind is MessageType.signal:
            try:
                self._on_signal(Signal(header, raw, body_start))
            except Exception:
                log.exception("D-Bus signal handler failed")
            return
        if kind not in (MessageType.method_return, MessageType.error):
            return
        serial = header.fields.get(HeaderFields.reply_serial)
        future = self._pending.pop(serial, None) if isinstance(serial, int) else None
        if future is None or future.done():
            return
        message = Message.from_buffer(raw)
        if kind is MessageType.error:
            name = str(header.fields.get(HeaderFields.error_name, "error"))
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


def add_match(rule: str) -> Message:
    return message_bus.AddMatch(rule)


def unwrap(properties: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """``{name: (signature, value)}`` as jeepney parses ``a{sv}`` -> ``{name: value}``."""
    return {name: value[1] for name, value in properties.items()}


def _split_messages(buffer: bytearray) -> list[bytes]:
    """Take every complete message off the front of ``buffer``."""
    messages = []
    while len(buffer) >= 16:
        size = calc_msg_size(bytes(buffer[:16]))
        if size > MAX_MESSAGE:
            raise ValueError(f"a {size}-byte message is larger than D-Bus allows")
        if len(buffer) < size:
            break
        messages.append(bytes(buffer[:size]))
        del buffer[:size]
    return messages


# --- PropertiesChanged, read for the few properties watch needs -----------------------

_ALIGN = {"s": 4, "o": 4, "u": 4, "i": 4, "b": 4, "t": 8, "x": 8}
_FIXED = {"u": "I", "i": "i", "b": "I", "t": "Q", "x": "q"}


def properties_changed(signal: Signal, wanted: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """The interface and the ``wanted`` entries of a ``PropertiesChanged`` signal.

    ``wanted`` maps property names to their D-Bus type (basic types only:
    ``s o u i b t x``). The body (``sa{sv}as``) is not unmarshalled whole:
    each wanted entry is found by its exact encoding (key length, key, NUL,
    variant signature) at a dict-entry boundary (8-aligned) inside the array,
    and only its value is decoded. The first such entry wins, so a nested
    ``a{sv}`` holding the same key could shadow a later top-level one; the
    properties of systemd's units nest none. A full unmarshal of one unit's signal costs
    the better part of a millisecond in pure Python, and two of them sit
    between a crash and the restart.
    """
    raw, header = signal.raw, signal.header
    order = "<" if header.endianness.dbus_code() == b"l" else ">"
    pos = _align(signal.body_start, 4)
    (length,) = struct.unpack_from(order + "I", raw, pos)
    interface = raw[pos + 4 : pos + 4 + length].decode()
    pos = _align(pos + 4 + length + 1, 4)
    (array_length,) = struct.unpack_from(order + "I", raw, pos)
    start = _align(pos + 4, 8)
    end = start + array_length
    if end > len(raw):
        raise ValueError("PropertiesChanged: the property array runs past the message")
    found: dict[str, Any] = {}
    for name, kind in wanted.items():
        key = name.encode()
        needle = (
            struct.pack(order + "I", len(key)) + key + b"\0" + bytes([1]) + kind.encode() + b"\0"
        )
        at = raw.find(needle, start, end)
        while at >= 0 and (at - start) % 8:
            at = raw.find(needle, at + 1, end)
        if at < 0:
            continue
        value_at = _align(at + len(needle), _ALIGN[kind])
        if kind in ("s", "o"):
            (size,) = struct.unpack_from(order + "I", raw, value_at)
            found[name] = raw[value_at + 4 : value_at + 4 + size].decode()
        else:
            (value,) = struct.unpack_from(order + _FIXED[kind], raw, value_at)
            found[name] = bool(value) if kind == "b" else value
    return interface, found


def _align(position: int, boundary: int) -> int:
    return position + (-position % boundary)
