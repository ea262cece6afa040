"""A switch asked for by someone who is not root: ``keel-switch@INSTANCE.service``.

keel chat runs as its own user with no capabilities; ``keel switch`` must run
as root. The bridge is one template unit, ``keel-switch@.service``, that the
chat may start over D-Bus (one polkit rule lets user ``keel-chat`` *start*
instances of exactly this template, nothing else) and that runs, as root,
``keel switch request INSTANCE``. The instance name is the whole request::

    NAME:OLD:NEW:REQUEST        e.g. next:4f1c…(32):9a7e…(32):0b5d2c71a3e48f60

- ``NAME``: a target declared in ``safeswitch.json`` (:mod:`keel.safeswitch.targets`);
  never a path: what may be switched to is root's configuration, not the asker's;
- ``OLD``, ``NEW``: :func:`digest` of the running system's store path and of
  the target's, as the person was shown them when they confirmed;
- ``REQUEST``: 16 hex digits chosen by the asker, naming the result file
  ``RUN_DIR/requests/REQUEST.json``.

Written with ``systemd-escape`` (:func:`unit_name`): ``-`` of a name becomes
``\\x2d``, nothing else in this grammar needs escaping. Root checks it strictly
(:func:`parse_instance`: only the canonical escaping, each field's exact
form), resolves the target again and switches only if the running system and
the target are still the ones confirmed; anything else is refused (exit 2)
before anything is touched, and every request, refused or not, is in the
ledger (``request``). Whoever can start the unit can do no more than a
confirmed person: switch to a declared target, from the system that runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from keel.config import parse_json
from keel.errors import ConfigError, KeelError, UsageError
from keel.safeswitch import targets
from keel.safeswitch.config import SafeswitchConfig
from keel.safeswitch.generations import resolve_system
from keel.safeswitch.report import Output

TEMPLATE = "keel-switch@.service"
PREFIX = "keel-switch@"
SUFFIX = ".service"
DIGEST = 32  # hex digits of SHA-256 kept: 128 bits
REQUEST_ID = re.compile(r"[0-9a-f]{16}\Z")
_INSTANCE = re.compile(
    r"(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}):(?P<old>[0-9a-f]{32}):(?P<new>[0-9a-f]{32})"
    r":(?P<request>[0-9a-f]{16})\Z"
)
_KEPT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")
KEEP_RESULTS = 100  # result files kept in RUN_DIR/requests (the newest)


def digest(path: str) -> str:
    """What a request carries of a store path: 128 bits of its SHA-256, in hex."""
    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:DIGEST]


def systemd_escape(text: str) -> str:
    """``systemd-escape TEXT`` (not ``--path``): as systemd names a unit's instance."""
    out = []
    for index, char in enumerate(text):
        if char == "/":
            out.append("-")
        elif char in _KEPT and not (index == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def systemd_unescape(text: str) -> str:
    """The inverse of :func:`systemd_escape` for what it writes; ValueError otherwise."""
    out = bytearray()
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            if text[index + 1 : index + 2] != "x" or len(text) < index + 4:
                raise ValueError("a backslash that is not \\xNN")
            pair = text[index + 2 : index + 4]
            if not re.fullmatch(r"[0-9a-f]{2}", pair):
                raise ValueError(f"\\x{pair}: not two lower-case hex digits")
            out.append(int(pair, 16))
            index += 4
            continue
        out.extend(b"/" if char == "-" else char.encode())
        index += 1
    return out.decode()


@dataclass(frozen=True)
class Instance:
    name: str
    old: str  # digest of the running system's store path
    new: str  # digest of the target's store path
    request: str

    def text(self) -> str:
        return f"{self.name}:{self.old}:{self.new}:{self.request}"

    def unit(self) -> str:
        return unit_name(self)


def unit_name(instance: Instance) -> str:
    return f"{PREFIX}{systemd_escape(instance.text())}{SUFFIX}"


def parse_instance(escaped: str) -> Instance:
    """The request in a unit's instance name (``%i``); :class:`UsageError` if it is not one.

    Only what :func:`unit_name` writes is taken: the canonical escaping and the
    exact form of every field (a target name, two digests, a request id).
    """
    shown = escaped if len(escaped) <= 120 else escaped[:117] + "..."
    try:
        text = systemd_unescape(escaped)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"instance {shown!r} is not a keel switch request: {exc}") from None
    match = _INSTANCE.match(text)
    if match is None or systemd_escape(text) != escaped:
        raise UsageError(
            f"instance {shown!r} is not a keel switch request "
            "(NAME:OLD:NEW:REQUEST, two 32-digit and one 16-digit lower-case hex digests, "
            "escaped as systemd-escape writes it)"
        )
    return Instance(match["name"], match["old"], match["new"], match["request"])


# --- result files ------------------------------------------------------------------------


class Results:
    """``RUN_DIR/requests/REQUEST.json``: what happened to a request, for whoever asked.

    Written by root (atomically; 0640 in the setgid run directory, so the
    ``keel`` group reads it), read by the asker. ``state`` is ``running`` once
    the request was taken, ``done`` with the outcome at the end.
    """

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "requests"

    def path(self, request: str) -> Path:
        if not REQUEST_ID.match(request):
            raise ValueError(f"not a request id: {request!r}")
        return self.dir / f"{request}.json"

    def write(self, request: str, value: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        path = self.path(request)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, json.dumps(dict(value), sort_keys=True).encode() + b"\n")
        finally:
            os.close(fd)
        os.replace(temporary, path)

    def read(self, request: str) -> dict[str, Any] | None:
        """The result, None while there is none; :class:`KeelError` for a file keel did not write."""
        path = self.path(request)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeelError(f"cannot read {path}: {exc.strerror}") from None
        try:
            value = parse_json(raw, source=str(path))
        except ConfigError as exc:
            raise KeelError(f"{exc} (not a result keel wrote)") from None
        if not isinstance(value, dict) or value.get("state") not in ("running", "done"):
            raise KeelError(f"{path}: not a result keel wrote")
        return value

    def prune(self, keep: int = KEEP_RESULTS) -> None:
        """Drop all but the newest ``keep`` results (a flood of refused requests stays bounded)."""
        try:
            files = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for old in files[: max(0, len(files) - keep)]:
            old.unlink(missing_ok=True)


def new_request_id(random_bits: int) -> str:
    return f"{random_bits & (2**64 - 1):016x}"


# --- root's side: what keel-switch@.service runs ------------------------------------------


def check(
    instance: Instance, config: SafeswitchConfig
) -> tuple[str | None, str | None, str | None]:
    """(why the request is refused or None, the running system, the target's system)."""
    target = config.targets.get(instance.name)
    if target is None:
        declared = ", ".join(sorted(config.targets)) or "none"
        return (
            f"no target {instance.name!r} is declared in {config.source} (targets: {declared})",
            None,
            None,
        )
    try:
        running = resolve_system(config.current)
    except KeelError as exc:
        return f"the running system is unknown: {exc}", None, None
    try:
        wanted = targets.resolve(target, config.current)
    except targets.Unavailable as exc:
        return f"{instance.name} ({target.describe()}) is not available: {exc}", running, None
    if digest(running) != instance.old:
        return (
            f"the running system changed since the switch was confirmed: it is now {running}",
            running,
            wanted,
        )
    if digest(wanted) != instance.new:
        return (
            f"{instance.name} ({target.describe()}) is now {wanted}, not the system that was "
            "confirmed",
            running,
            wanted,
        )
    if wanted == running:
        return f"{wanted} runs already", running, wanted
    return None, running, wanted


async def serve(instance: Instance, config: SafeswitchConfig, out: Output) -> dict[str, Any]:
    """Carry out a request as root: check it, record it, switch; the result, also in its file."""
    from keel.ledger.recorder import LedgerUnavailable, Recorder
    from keel.safeswitch.evidence import RECORD_TIMEOUT, SOURCE
    from keel.safeswitch.switcher import Request, switch

    results = Results(config.run_dir)
    results.prune()
    base: dict[str, Any] = {
        "request": instance.request,
        "target": instance.name,
        "unit": unit_name(instance),
        "started_at": time.time(),
    }
    results.write(instance.request, {**base, "state": "running"})
    problem, running, wanted = check(instance, config)
    recorder = Recorder(config.ledger, SOURCE)
    await recorder.start()
    try:
        data = {"target": instance.name, "unit": base["unit"], "old": running, "new": wanted}
        if problem is not None:
            data["refused"] = problem
        await recorder.record_durable("request", instance.request, data, timeout=RECORD_TIMEOUT)
    except LedgerUnavailable as exc:
        out.line(f"  note: the ledger did not take the 'request' entry: {exc}")
    finally:
        await recorder.close()
    if problem is not None:
        out.line(f"request {instance.request}: refused, nothing changed: {problem}")
        result = {"outcome": "refused", "exit_code": 2, "message": f"refused, nothing changed: {problem}",
                  "reason": problem, "old": running, "new": wanted}  # fmt: skip
    else:
        assert wanted is not None
        out.line(f"request {instance.request}: switching to {instance.name} ({wanted})")
        result = (await switch(Request(Path(wanted), config), out)).to_json()
    done = {**base, **result, "state": "done", "ended_at": time.time()}
    results.write(instance.request, done)
    return done


# --- the asker's side: start the unit, wait for its result ---------------------------------


class Starter(Protocol):
    """How a request reaches root: the template unit over D-Bus, or (tests) a process."""

    async def start(self, instance: Instance) -> None:
        """Start the request; :class:`KeelError` saying why it could not be."""
        ...

    async def running(self, instance: Instance) -> bool:
        """Is the request still running (or waiting to start)?"""
        ...


RUNNING_STATES = ("activating", "active", "deactivating", "reloading")


class SystemdStarter:
    """``StartUnit keel-switch@INSTANCE.service`` on the system bus, as this process's user.

    systemd asks polkit (``org.freedesktop.systemd1.manage-units``, verb
    ``start``, the unit's name); keel's rule allows exactly this template to
    the users it names.
    """

    def __init__(self, bus: str | None = None, *, timeout: float = 25.0) -> None:
        self.bus = bus
        self.timeout = timeout

    async def _call(self, message: Any) -> tuple[Any, ...]:
        """One method call on a connection of its own (a request makes three at most)."""
        from keel.watch import dbus

        path = self.bus or dbus.system_bus_path()
        try:
            connection = await dbus.Connection.open(
                path, bus=True, on_signal=lambda _: None, timeout=self.timeout
            )
        except (OSError, TimeoutError, dbus.ConnectionLost) as exc:
            raise KeelError(f"cannot reach the system bus ({path}): {exc}") from None
        try:
            return await connection.call(message, timeout=self.timeout)
        finally:
            await connection.close()

    async def start(self, instance: Instance) -> None:
        from keel.watch.dbus import DBusError, manager_call

        unit = unit_name(instance)
        try:
            await self._call(manager_call("StartUnit", "ss", unit, "replace"))
        except DBusError as exc:
            if exc.name in (
                "org.freedesktop.DBus.Error.AccessDenied",
                "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
            ):
                raise KeelError(
                    f"the system refused to start {unit} ({exc.message or exc.name}): is the "
                    "polkit rule of docs/safeswitch.md installed for this user?"
                ) from None
            raise KeelError(f"systemd could not start {unit}: {exc}") from None
        except TimeoutError:
            raise KeelError(f"systemd did not answer StartUnit {unit} in time") from None

    async def running(self, instance: Instance) -> bool:
        from keel.watch.dbus import DBusError, get_all, manager_call, unwrap

        try:
            (path,) = await self._call(manager_call("GetUnit", "s", unit_name(instance)))
            (properties,) = await self._call(get_all(path, "org.freedesktop.systemd1.Unit"))
        except DBusError:
            return False  # unloaded: it ended (NoSuchUnit)
        except (KeelError, TimeoutError):
            return True  # the bus hiccupped: not a verdict; the result file will tell
        values = unwrap(properties)
        job = values.get("Job")
        pending = isinstance(job, tuple | list) and bool(job) and job[0] != 0
        return pending or values.get("ActiveState") in RUNNING_STATES


class ProcessStarter:
    """``keel switch request`` as a child process: for hosts without systemd, and tests.

    It runs as the asker's own user, so it can switch only where that user may
    (root's tests); it is not a way around the polkit rule.
    """

    def __init__(self, keel: Sequence[str], config: Path | None, log_dir: Path) -> None:
        self.keel = list(keel)
        self.config = config
        self.log_dir = log_dir
        self._children: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, instance: Instance) -> None:
        argv = [*self.keel, "switch", "request"]
        argv += ["--config", str(self.config)] if self.config is not None else []
        argv.append(systemd_escape(instance.text()))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{instance.request}.log"
        with open(log, "ab") as out:
            try:
                child = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            except OSError as exc:
                raise KeelError(f"cannot run {argv[0]}: {exc.strerror}") from None
        self._children[instance.request] = child

    async def running(self, instance: Instance) -> bool:
        child = self._children.get(instance.request)
        if child is None:
            return False
        if child.returncode is None:
            return True
        del self._children[instance.request]
        return False

    async def close(self) -> None:
        """Wait for what still runs (a switch is never cut short by its asker)."""
        for child in list(self._children.values()):
            await child.wait()
        self._children.clear()


async def wait_for_result(
    instance: Instance,
    results: Results,
    starter: Starter,
    *,
    limit: float,
    poll: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """The request's result once it is ``done``; :class:`KeelError` if it ends without one."""
    deadline = clock() + limit
    unit = unit_name(instance)
    while True:
        result = results.read(instance.request)
        if result is not None and result.get("state") == "done":
            return result
        if not await starter.running(instance):
            result = results.read(instance.request)  # written before the request exits
            if result is not None and result.get("state") == "done":
                return result
            raise KeelError(
                f"{unit} ended without an outcome; see `journalctl -u {unit}` and "
                "`keel switch status`"
            )
        if clock() >= deadline:
            raise KeelError(
                f"{unit} has not ended after {limit:g} s; `keel switch status` shows where it is"
            )
        await asyncio.sleep(poll)
