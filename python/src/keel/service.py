"""Every keel daemon's shell: one way to start, serve, record and stop.

A daemon is a :class:`Daemon` (its pure core plus the asyncio code that
feeds it) and a config that carries the keys every daemon shares
(:class:`Common`, read by :func:`read_common`). :func:`main` does the rest, the
same way for every daemon:

1. load the config (a bad one stops the start with a message naming the key:
   exit 2, nothing half-started);
2. logging (the journal under systemd, stderr with timestamps elsewhere);
3. SIGTERM and SIGINT handled by the loop, also when SIGINT was inherited as
   ignored: the first asks for an orderly stop, a second one exits at once;
4. the :class:`~keel.ledger.recorder.Recorder` (a failing ledger never stops
   or blocks a daemon: see that module for the policy);
5. ``Daemon.start``; a :class:`~keel.errors.KeelError` there is one line in
   the log and exit 1, after whatever had started is stopped again;
6. the control socket (``/run/keel/<service>.sock`` by default) with a
   ``status`` verb that every daemon answers the same way, plus its own verbs;
7. ``READY=1`` to systemd, ``WATCHDOG=1`` from the event loop itself (a loop
   stuck anywhere stops the pings and systemd restarts the daemon), ``STATUS=``
   lines when the daemon reports progress;
8. on stop: ``STOPPING=1``, the control socket closed, ``Daemon.stop``, the
   recorder flushed and a checkpoint signed.

A background task started with :meth:`Shell.spawn` that dies of an exception
is a keel bug: it is logged with its traceback and the daemon stops with exit
1 (systemd restarts it), rather than running on with a part missing.

**Out of descriptors.** A daemon that runs out of file descriptors must still
answer on its control socket, or an operator could not even ask it what is
wrong. The shell holds a :class:`Reserve` of spare descriptors from the
start; when an accept fails for lack of descriptors or memory (asyncio's
servers report it to the loop, a daemon's own listener calls
:meth:`Reserve.release`), the log gets one line instead of a traceback and
the spares are handed back, so the control socket's next accept succeeds;
they are taken again once there is room for them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from keel import __version__, paths, sd
from keel.api import ControlServer, Handler, Peer
from keel.config import Section
from keel.errors import KeelError
from keel.ledger.keys import default_key_path, signs_here
from keel.ledger.recorder import DEFAULT_CHECKPOINT_EVERY, Recorder

EXIT_OK = 0
EXIT_FAILED = 1  # could not start, or a background task died (a bug)
MAX_SOCKET_PATH = 107  # bytes of a Unix socket's path (sun_path holds 108, with its NUL)
RESERVE = 16  # spare descriptors held for the control socket
RESERVE_HEADROOM = 4  # taken back only when this many more are free
RESERVE_RETRY = 1.0  # s between attempts to take the spares back
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class Common:
    """The config keys every daemon has, with the same names and defaults."""

    socket: Path
    ledger: Path | None
    checkpoint_every: float | None = DEFAULT_CHECKPOINT_EVERY


def read_common(cfg: Section, service: str) -> Common:
    """Read ``socket``, ``ledger`` and ``checkpoint_every`` from a daemon's config.

    ``socket`` defaults to ``/run/keel/<service>.sock`` (``./.keel/run`` in dev
    mode); ``ledger`` to the host's ledger, ``null`` turns recording off;
    ``checkpoint_every`` is how often (seconds) the ledger's head is signed,
    ``null`` for never. Left out, it is 300 s for a daemon that runs as the
    owner of the ledger's key (root, on an installed host: see
    :mod:`keel.ledger.keys`) and never for the others, which could not read
    the key: they append, root's daemons sign.
    """
    socket = cfg.filepath("socket", default=str(paths.socket_file(service)))
    size = len(os.fsencode(socket))
    if size > MAX_SOCKET_PATH:
        raise cfg.error(
            "socket",
            f"{size} bytes long; a Unix socket's path holds at most {MAX_SOCKET_PATH}: "
            "choose a shorter one",
        )
    ledger: Path | None = paths.ledger_db()
    if "ledger" in cfg and cfg.raw("ledger") is None:
        ledger = None
    else:
        ledger = cfg.filepath("ledger", default=str(paths.ledger_db()))
    checkpoint_every: float | None = None
    if "checkpoint_every" not in cfg:
        if ledger is not None and signs_here(default_key_path(ledger)):
            checkpoint_every = DEFAULT_CHECKPOINT_EVERY
    elif cfg.raw("checkpoint_every") is not None:
        checkpoint_every = cfg.number("checkpoint_every", DEFAULT_CHECKPOINT_EVERY, positive=True)
    return Common(socket=socket, ledger=ledger, checkpoint_every=checkpoint_every)


class Daemon(abc.ABC):
    """What a daemon gives the shell. Everything but ``start`` and ``stop`` is optional."""

    @abc.abstractmethod
    async def start(self, shell: Shell) -> None:
        """Open everything and begin work; raise :class:`KeelError` to refuse to start."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop work and release everything; also called after a failed ``start``."""

    def verbs(self) -> Mapping[str, Handler]:
        """Control verbs besides ``status`` (``name -> async handler(args, peer)``)."""
        return {}

    def status(self) -> dict[str, Any]:
        """The daemon's part of the ``status`` verb's answer."""
        return {}

    def summary(self) -> str:
        """One line for systemd's ``STATUS=`` once started."""
        return "running"


class HasCommon(Protocol):
    @property
    def common(self) -> Common: ...


C = TypeVar("C", bound=HasCommon)


class Reserve:
    """Spare descriptors held for the control socket (see the module's docstring)."""

    def __init__(self, count: int = RESERVE, *, headroom: int = RESERVE_HEADROOM) -> None:
        self.count = count
        self.headroom = headroom
        self._spares: list[int] = []

    @property
    def held(self) -> bool:
        return len(self._spares) >= self.count

    def hold(self) -> bool:
        """Hold the spares (True), unless ``headroom`` more are not free too (False, none held)."""
        if self.held:
            return True
        try:
            while len(self._spares) < self.count + self.headroom:
                self._spares.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            self.release()
            return False
        for fd in self._spares[self.count :]:
            os.close(fd)
        del self._spares[self.count :]
        return True

    def release(self) -> None:
        """Hand the spares back (for the control socket's next accept)."""
        for fd in self._spares:
            os.close(fd)
        self._spares.clear()


def descriptor_use() -> str:
    """``N descriptors open, limit M``: for log lines about running out."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = str(len(os.listdir("/proc/self/fd")))
    except OSError:
        used = "?"
    return f"{used} descriptors open, limit {soft}"


class Shell:
    """What a running daemon can ask of its shell."""

    def __init__(self, name: str, common: Common, recorder: Recorder) -> None:
        self.name = name
        self.common = common
        self.recorder = recorder
        self.reserve = Reserve()
        self.log = logging.getLogger(f"keel.{name}")
        self.stopping = asyncio.Event()
        self.exit_code = EXIT_OK
        self.started = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reserve_retry: asyncio.TimerHandle | None = None

    def record(self, kind: str, subject: str = "", data: Mapping[str, Any] | None = None) -> None:
        """Append a ledger entry in the background (see :class:`Recorder`)."""
        self.recorder.record(kind, subject, data)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """A background task for the daemon's lifetime; dying of an exception stops it."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def request_stop(self, reason: str, exit_code: int = EXIT_OK) -> None:
        """Ask for an orderly stop (the first reason and a failing exit code win)."""
        if not self.stopping.is_set():
            self.log.info("stopping: %s", reason)
        if exit_code != EXIT_OK and self.exit_code == EXIT_OK:
            self.exit_code = exit_code
        self.stopping.set()

    def set_status(self, text: str) -> None:
        """A progress line for systemd (``systemctl status`` shows it)."""
        sd.status(text)

    def out_of_descriptors(self, what: str, exc: OSError) -> None:
        """``what`` failed for lack of descriptors or memory: one line, the spares handed back."""
        self.log.warning("%s (%s; %s)", what, exc.strerror, descriptor_use())
        if self._reserve_retry is None and self.reserve.held:
            self.reserve.release()
            self._reserve_retry = asyncio.get_running_loop().call_later(
                RESERVE_RETRY, self._take_back_reserve
            )

    def _take_back_reserve(self) -> None:
        if self.reserve.hold() or self.stopping.is_set():
            self._reserve_retry = None
            return
        self._reserve_retry = asyncio.get_running_loop().call_later(
            RESERVE_RETRY, self._take_back_reserve
        )

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES:
            self.out_of_descriptors(str(context.get("message", "accept failed")), exc)
            return
        loop.default_exception_handler(context)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.log.error(
                "background task %s failed; stopping (a keel bug: please report it)",
                task.get_name(),
                exc_info=exc,
            )
            self.request_stop(f"{task.get_name()} failed", EXIT_FAILED)

    async def cancel_tasks(self) -> None:
        if self._reserve_retry is not None:
            self._reserve_retry.cancel()
            self._reserve_retry = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main(
    name: str,
    config_path: Path,
    *,
    load: Callable[[Path], C],
    make: Callable[[C], Daemon],
    verbose: bool = False,
) -> int:
    """``keel <name> serve``: load the config, then run the daemon until it is stopped."""
    config = load(config_path)  # a ConfigError ends here: exit 2, nothing started
    log = sd.setup_logging(name, verbose=verbose)
    log.info("keel %s %s starting with %s", name, __version__, config_path)
    daemon = make(config)
    return asyncio.run(serve(name, daemon, config.common))


async def serve(
    name: str,
    daemon: Daemon,
    common: Common,
    *,
    recorder: Recorder | None = None,
    ready: Callable[[Shell], None] | None = None,
) -> int:
    """Run ``daemon`` in the current loop until SIGTERM/SIGINT or ``request_stop``.

    ``ready`` is called once the daemon serves (tests use it to learn the
    shell); returns the exit code.
    """
    loop = asyncio.get_running_loop()
    recorder = recorder or Recorder(common.ledger, name, checkpoint_every=common.checkpoint_every)
    shell = Shell(name, common, recorder)
    signals = _Signals(loop, shell)
    control: ControlServer | None = None
    attempted = False
    loop.set_exception_handler(shell._loop_exception)
    shell.reserve.hold()
    try:
        signals.install()
        await recorder.start()
        attempted = True
        try:
            await daemon.start(shell)
        except KeelError as exc:
            shell.log.error("cannot start: %s", exc)  # noqa: TRY400 - the message says it all
            shell.exit_code = EXIT_FAILED
            return EXIT_FAILED
        handlers: dict[str, Handler] = {"status": _status_verb(shell, daemon)}
        handlers.update(daemon.verbs())
        control = ControlServer(common.socket, handlers, name=name)
        try:
            await control.start()
        except (KeelError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            shell.log.error("cannot serve the control socket %s: %s", common.socket, reason)  # noqa: TRY400
            control = None
            shell.exit_code = EXIT_FAILED
            return EXIT_FAILED
        sd.ready(daemon.summary())
        shell.log.info("%s serves on %s", name, common.socket)
        if ready is not None:
            ready(shell)
        interval = sd.watchdog_interval()
        if interval:
            shell.spawn(_watchdog(interval), name="watchdog")
        await shell.stopping.wait()
        return shell.exit_code
    finally:
        sd.stopping()
        if control is not None:
            await control.close()
        await shell.cancel_tasks()
        if attempted:
            try:
                await daemon.stop()
            except Exception:
                shell.log.exception("stopping failed")
        await recorder.close()
        signals.remove()
        shell.reserve.release()
        loop.set_exception_handler(None)


def _status_verb(shell: Shell, daemon: Daemon) -> Handler:
    async def status(args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        result = daemon.status()
        result["service"] = {
            "name": shell.name,
            "version": __version__,
            "pid": os.getpid(),
            "started": shell.started,
            "uptime": time.time() - shell.started,
            "ledger": shell.recorder.status(),
        }
        return result

    return status


async def _watchdog(interval: float) -> None:
    while True:
        sd.watchdog_ping()
        await asyncio.sleep(interval)


class _Signals:
    """SIGTERM/SIGINT: an orderly stop the first time, an immediate exit the second."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, loop: asyncio.AbstractEventLoop, shell: Shell) -> None:
        self.loop = loop
        self.shell = shell
        self.installed: list[signal.Signals] = []

    def install(self) -> None:
        for signum in self.SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self.loop.add_signal_handler(signum, self._received, signum)
                self.installed.append(signum)

    def remove(self) -> None:
        for signum in self.installed:
            with contextlib.suppress(Exception):
                self.loop.remove_signal_handler(signum)
        self.installed.clear()

    def _received(self, signum: signal.Signals) -> None:
        if self.shell.stopping.is_set():
            self.shell.log.warning("%s again: exiting at once", signum.name)
            os._exit(128 + signum)
        self.shell.request_stop(signum.name)


@contextlib.asynccontextmanager
async def running(
    name: str, daemon: Daemon, common: Common, *, recorder: Recorder | None = None
) -> AsyncIterator[Shell]:
    """Run a daemon in this loop for the body of an ``async with`` (tests, embedding).

    Yields the shell once the daemon serves; stops it on leaving and raises
    :class:`KeelError` if it did not start or did not stop cleanly.
    """
    shell_ready: asyncio.Future[Shell] = asyncio.get_running_loop().create_future()

    def ready(shell: Shell) -> None:
        shell_ready.set_result(shell)

    task = asyncio.create_task(serve(name, daemon, common, recorder=recorder, ready=ready))
    waiting: set[asyncio.Future[Any]] = {task, shell_ready}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if not shell_ready.done():
        shell_ready.cancel()
        raise KeelError(f"{name} did not start (exit {task.result()}); see its log")
    shell = shell_ready.result()
    try:
        yield shell
    finally:
        shell.request_stop("leaving the running() block")
        code = await task
        if code != EXIT_OK:
            raise KeelError(f"{name} stopped with exit {code}; see its log")
