"""The one way a keel daemon writes to the ledger.

Every daemon records through a :class:`Recorder` (``keel.service`` makes one
for it): ``record(kind, subject, data)`` returns at once, and a writer task
appends what was recorded in batches (one transaction for everything that
queued up while the previous one was written), off the event loop.

**The ledger policy, the same for every daemon.** A daemon never stops, and
never refuses to start, because of its ledger: watch keeps supervising,
egress keeps enforcing, the mesh keeps delivering. When the ledger cannot be
opened or written, the recorder says so in the log (once per outage, not per
entry), in the daemon's ``status`` (``ledger.state`` is ``degraded`` with the
reason) and keeps the entries in memory, retrying every few seconds. Up to
``max_pending`` entries wait; past that new ones are dropped and counted, and
when the ledger is back the first thing written is a ``ledger_gap`` entry
saying how many were lost and between which times. So the log never silently
skips: it either holds an entry or says that entries are missing.

**Metadata only.** An entry (canonical JSON) larger than :data:`MAX_ENTRY`
bytes is refused and logged as a bug: entries describe events (names, sizes,
counts, digests), they never carry payloads.

**Signed checkpoints.** Every ``checkpoint_every`` seconds (and when the
recorder closes) the ledger's head is signed, if it grew, with the host's
ledger key (next to the database; created on first use by its owner, and
never silently replaced once checkpoints exist: ``keys.signer_for``). Only
daemons running as the key's owner sign (root on an installed host); the
others have ``checkpoint_every`` None and only append (``keel.service``). The signed head is also
written outside the database (``ledger.db.head``), so a log that goes back,
even with its WAL deleted, is caught by ``keel ledger verify``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.errors import KeelError
from keel.ledger import core
from keel.ledger.errors import LedgerError
from keel.ledger.keys import default_key_path, signer_for
from keel.ledger.store import Ledger

log = logging.getLogger("keel.ledger.recorder")

MAX_ENTRY = 16 * 1024  # bytes of canonical JSON per entry
MAX_BATCH = 1000  # entries per transaction
DEFAULT_MAX_PENDING = 100_000
DEFAULT_RETRY = 5.0  # seconds between attempts while the ledger is failing
DEFAULT_CHECKPOINT_EVERY = 300.0


class LedgerUnavailable(KeelError):
    """A durable record was asked for and the ledger could not take it."""


@dataclass
class _Pending:
    raw: bytes
    ts: float
    done: asyncio.Future[int] | None = None


@dataclass
class _Gap:
    dropped: int = 0
    first_ts: float | None = None
    last_ts: float | None = None

    def add(self, ts: float) -> None:
        self.dropped += 1
        self.first_ts = ts if self.first_ts is None else self.first_ts
        self.last_ts = ts


@dataclass
class RecorderStats:
    appended: int = 0
    dropped: int = 0  # lost because too many were waiting while the ledger failed
    refused: int = 0  # malformed or too large: a bug in the caller, logged
    lost_at_close: int = 0
    checkpoints: int = 0
    outages: int = 0
    last_checkpoint_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """Non-blocking, batched, bounded appends of one daemon (``source``)."""

    def __init__(
        self,
        path: Path | None,
        source: str,
        *,
        checkpoint_every: float | None = DEFAULT_CHECKPOINT_EVERY,
        key_path: Path | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        retry_every: float = DEFAULT_RETRY,
        wall: Callable[[], float] = time.time,
        open_ledger: Callable[[Path], Ledger] = Ledger.open,
    ) -> None:
        self.path = path
        self.source = source
        self.checkpoint_every = checkpoint_every
        self.key_path = key_path or (default_key_path(path) if path else None)
        self.max_pending = max_pending
        self.retry_every = retry_every
        self.wall = wall
        self._open_ledger = open_ledger
        self.stats = RecorderStats()
        self.problem: str | None = None if path else "disabled in the config"
        self.checkpoint_problem: str | None = None
        self._ledger: Ledger | None = None
        self._queue: collections.deque[_Pending] = collections.deque()
        self._gap = _Gap()
        self._wake = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- life cycle -----------------------------------------------------------------

    @property
    def state(self) -> str:
        """``off`` (no ledger configured), ``ok``, ``degraded`` or ``starting``."""
        if self.path is None:
            return "off"
        if self.problem is not None:
            return "degraded"
        return "ok" if self._ledger is not None else "starting"

    async def start(self) -> None:
        """Open the ledger (in the background if it fails now) and start writing."""
        if self.path is None or self._writer is not None:
            return
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"ledger-{self.source}"
        )
        await self._try_open()
        self._writer = asyncio.create_task(self._write_loop(), name=f"{self.source}:ledger")

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout`` s), sign a checkpoint, close."""
        if self._writer is None:
            return
        self._closing = True
        self._closed.set()
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), timeout)
        except TimeoutError:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        self._writer = None
        lost = len(self._queue)
        if lost:
            self.stats.lost_at_close += lost
            log.error(
                "ledger: %d %s entries could not be written before shutdown (%s)",
                lost,
                self.source,
                self.problem or "timed out",
            )
            for pending in self._queue:
                if pending.done is not None and not pending.done.done():
                    pending.done.set_exception(LedgerUnavailable(self._unavailable()))
            self._queue.clear()
        if self._ledger is not None:
            if self.checkpoint_every is not None:
                await self._run(self._checkpoint)
            await self._run(self._ledger.close)
            self._ledger = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # --- recording ------------------------------------------------------------------

    def record(self, kind: str, subject: str = "", data: Mapping[str, Any] | None = None) -> None:
        """Queue an entry; never blocks, never raises (a bad entry is logged as a bug)."""
        if self.path is None:
            return
        pending = self._make(kind, subject, data)
        if pending is not None:
            self._enqueue(pending)

    async def record_durable(
        self,
        kind: str,
        subject: str = "",
        data: Mapping[str, Any] | None = None,
        *,
        timeout: float = 10.0,
    ) -> int:
        """Record and wait until the entry is on disk; returns its index.

        For the few events whose record must exist before the daemon goes on
        (a switch committed, say). :class:`LedgerUnavailable` if no ledger is
        configured, the entry is malformed, or it was not written in ``timeout``.
        """
        if self.path is None:
            raise LedgerUnavailable("no ledger is configured")
        try:
            raw = core.make_entry(
                ts=self.wall(), source=self.source, kind=kind, subject=subject, data=data
            )
        except LedgerError as exc:
            raise LedgerUnavailable(f"malformed ledger entry {kind!r}: {exc}") from None
        self._check_size(kind, raw)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self._enqueue(_Pending(raw, self.wall(), done)):
            raise LedgerUnavailable(self._unavailable())
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            raise LedgerUnavailable(
                f"the entry was not written within {timeout:g} s ({self._unavailable()}); "
                "it stays queued"
            ) from None

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything recorded so far is written; False on timeout."""
        if self.path is None or self._writer is None:
            return not self._queue
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        """What ``status`` verbs show about this daemon's ledger."""
        return {
            "path": str(self.path) if self.path else None,
            "state": self.state,
            "problem": self.problem,
            "pending": len(self._queue),
            "appended": self.stats.appended,
            "dropped": self.stats.dropped,
            "refused": self.stats.refused,
            "checkpoint_every": self.checkpoint_every,
            "checkpoints": self.stats.checkpoints,
            "checkpoint_problem": self.checkpoint_problem,
            "last_checkpoint_size": self.stats.last_checkpoint_size,
        }

    # --- internals ------------------------------------------------------------------

    def _make(self, kind: str, subject: str, data: Mapping[str, Any] | None) -> _Pending | None:
        ts = self.wall()
        try:
            raw = core.make_entry(ts=ts, source=self.source, kind=kind, subject=subject, data=data)
            self._check_size(kind, raw)
        except (LedgerError, LedgerUnavailable, TypeError, ValueError) as exc:
            self.stats.refused += 1
            # The message names the entry and the rule it broke; the caller's stack adds nothing.
            log.error("ledger: a %s entry %r was refused (a keel bug): %s", self.source, kind, exc)  # noqa: TRY400
            return None
        return _Pending(raw, ts)

    def _check_size(self, kind: str, raw: bytes) -> None:
        if len(raw) > MAX_ENTRY:
            raise LedgerUnavailable(
                f"entry {kind!r} has {len(raw)} bytes, more than {MAX_ENTRY}: "
                "ledger entries carry metadata only"
            )

    def _enqueue(self, pending: _Pending) -> bool:
        if self._closing and self._writer is None:
            return False
        if len(self._queue) >= self.max_pending:
            if self._gap.dropped == 0:
                log.error(
                    "ledger: %d %s entries wait for the ledger (%s); dropping new ones "
                    "until it is back (a ledger_gap entry will count them)",
                    len(self._queue),
                    self.source,
                    self.problem or "busy",
                )
            self._gap.add(pending.ts)
            self.stats.dropped += 1
            return False
        self._queue.append(pending)
        self._idle.clear()
        self._wake.set()
        return True

    def _unavailable(self) -> str:
        return f"the ledger {self.path} is unavailable: {self.problem or 'not open'}"

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    async def _try_open(self) -> bool:
        assert self.path is not None
        try:
            self._ledger = await self._run(self._open_ledger, self.path)
        except (LedgerError, OSError) as exc:
            self._failed(f"cannot open {self.path}: {exc}")
            return False
        self._recovered()
        return True

    def _failed(self, problem: str) -> None:
        if self.problem is None:
            self.stats.outages += 1
            log.error(
                "ledger: %s; %s goes on and retries every %g s (entries wait in memory)",
                problem,
                self.source,
                self.retry_every,
            )
        self.problem = problem

    def _recovered(self) -> None:
        if self.problem is not None and self.stats.outages:
            log.warning("ledger: %s is writable again", self.path)
        self.problem = None

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_checkpoint = (
            loop.time() + self.checkpoint_every if self.checkpoint_every is not None else None
        )
        while True:
            if not self._queue and self._gap.dropped == 0:
                self._idle.set()
                if self._closing:
                    return
                timeout = (
                    None if next_checkpoint is None else max(0.0, next_checkpoint - loop.time())
                )
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            if next_checkpoint is not None and loop.time() >= next_checkpoint:
                assert self.checkpoint_every is not None
                next_checkpoint = loop.time() + self.checkpoint_every
                if self._ledger is not None:
                    await self._run(self._checkpoint)
            if not self._queue and self._gap.dropped == 0:
                continue
            if await self._write_batch():
                continue
            if self._closing:
                return  # what is left is counted as lost by close()
            with contextlib.suppress(TimeoutError):  # retry later, or at once when closing
                await asyncio.wait_for(self._closed.wait(), self.retry_every)

    async def _write_batch(self) -> bool:
        """Write the oldest entries (after a gap entry, if any were dropped); True on success."""
        if self._ledger is None and not await self._try_open():
            return False
        raws: list[bytes] = []
        gap = self._gap
        if gap.dropped:
            raws.append(
                core.make_entry(
                    ts=self.wall(),
                    source=self.source,
                    kind="ledger_gap",
                    subject=self.source,
                    data={
                        "dropped": gap.dropped,
                        "first_ts": core.format_ts(gap.first_ts or 0.0),
                        "last_ts": core.format_ts(gap.last_ts or 0.0),
                    },
                )
            )
        batch = [self._queue[i] for i in range(min(MAX_BATCH, len(self._queue)))]
        raws.extend(pending.raw for pending in batch)
        assert self._ledger is not None
        try:
            first = await self._run(self._ledger.append_raw, raws)
        except (LedgerError, OSError) as exc:
            self._failed(f"cannot write to {self.path}: {exc}")
            return False
        self._recovered()
        if gap.dropped:
            self._gap = _Gap()
            first += 1
        for offset, pending in enumerate(batch):
            self._queue.popleft()
            if pending.done is not None and not pending.done.done():
                pending.done.set_result(first + offset)
        self.stats.appended += len(batch)
        return True

    def _checkpoint(self) -> None:
        """Sign the head if it grew (in the writer thread); problems are logged once."""
        assert self._ledger is not None
        try:
            signer = signer_for(self._ledger, self.key_path)
            stored = self._ledger.checkpoint_if_grown(signer)
        except (LedgerError, OSError) as exc:
            if self.checkpoint_problem is None:
                log.error("ledger: cannot sign a checkpoint of %s: %s", self.path, exc)  # noqa: TRY400
            self.checkpoint_problem = str(exc)
            return
        self.checkpoint_problem = None
        if stored is not None:
            self.stats.checkpoints += 1
            self.stats.last_checkpoint_size = stored.size
