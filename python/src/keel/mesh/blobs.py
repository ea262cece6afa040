"""Large outbox payloads, written once: appended to segment files beside the state database.

A payload of ``BLOB_MIN`` bytes or more is not stored in its outbox row
(SQLite would write it to the log as nine 8 KiB pages, two system calls
each, then copy it into the database at the next checkpoint, and read it
back to free its pages when the row goes): it is appended to the current
segment file (``<state.db>-blobs/<n>``, 0600) with the other payloads of
its batch in one ``pwritev``, and the row names the segment, the offset and
the size. The row commits after the write, so a row never names bytes that
were not written. Each segment counts the rows that name it; once none do
and a newer segment is being written, the file is kept as a spare (up to
``SPARE_SEGMENTS`` of them) or deleted. The next new segment is a spare
renamed, written over from its start: the file's blocks and cached pages
are reused, where a fresh file costs the filesystem a block reservation per
page and a deletion per segment (measured on ext4 here: 20 to 26 us per
64 KiB written to a fresh file and deleted, 8.5 to 10.5 us written over a
kept one). Rows name only live segments, so a renamed spare's old bytes are
never read. Spares are deleted when the store closes, and files no row
names when it opens. A segment is never appended to after the daemon
restarts (a new one starts).

A segment stays while any row names it, so one message waiting for a peer
that is down keeps its whole segment on disk. The store compacts: once per
new segment it looks for older segments holding a quarter or less of
their size in live payloads, and moves those payloads (at most half a
segment each time) to the current segment, fsynced, before the rows name
their new place (``Store`` has the steps). Disk use stays near what is
queued, whatever the mix of fast and stalled peers.

Durability is the database's. With ``durability: full`` the segment is
fsynced before the commit of the rows naming it. With ``normal`` (SQLite's
``synchronous=NORMAL``: a crash of the daemon loses nothing, a crash of the
host may lose the last transactions) the checkpoint thread fsyncs the
segments before each checkpoint and then records, in ``<dir>/synced``, the
last outbox seq whose payload is on disk and the host's boot id. On
opening, if the previous daemon did not close the store and the host has
booted since, the rows after that seq name payloads that may not have
reached the disk: they become dead letters ("lost in a host crash"),
among the last transactions ``normal`` may lose. After a crash of the
daemon alone (same boot), the kernel still holds every byte written and
nothing is dropped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

BLOB_MIN: Final = 16 << 10  # payloads this big or bigger go to the blob files
SEGMENT_BYTES: Final = 64 << 20  # a new segment once the current one holds this much
SPARE_SEGMENTS: Final = 2  # emptied segments kept to be written over (at most this many)
SYNCED: Final = "synced"  # the file naming what is on disk
_IOV_MAX: Final = 512  # pieces per pwritev (Linux allows 1024)


@functools.cache
def boot_id() -> str:
    """This boot of the host (``/proc/sys/kernel/random/boot_id``; empty if unreadable)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class BlobFiles:
    """The segment files of one store. Every method but :meth:`sync` runs on the store's thread.

    ``OSError`` from any method: the caller (the store) reports it as a state error.
    """

    def __init__(self, directory: Path, *, full: bool) -> None:
        self.directory = directory
        self.full = full  # fsync each write before the rows naming it commit
        directory.mkdir(mode=0o700, exist_ok=True)
        self.previous = self._read_synced()  # what the last daemon left (None: nothing)
        found = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
        self._lock = threading.Lock()  # segments and their fds, against the sync thread
        self._fds: dict[int, int] = {}
        self._live: dict[int, int] = {}  # segment: rows naming it
        self._spares: list[int] = []  # emptied segments, still open, to be written over
        self._unsynced: set[int] = set(found)  # segments written since their last fsync
        self._unsynced_bytes = 0
        self.current = max(found, default=0) + 1
        self.rotations = 0  # new segments begun (the store compacts after each)
        self._offset = 0
        self._committed_seq = 0  # the last outbox seq whose rows committed (set by the store)

    # -- opening and closing

    def _read_synced(self) -> dict[str, object] | None:
        try:
            data = json.loads((self.directory / SYNCED).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: trust nothing past seq 0
        return data if isinstance(data, dict) else {}

    def suspect_after(self) -> int | None:
        """The seq after which rows' payloads may be lost (None: none may be).

        The last daemon did not close the store, wrote payloads it had not
        fsynced, and the host has booted since.
        """
        previous = self.previous
        if previous is None:
            return None
        if previous.get("clean") or previous.get("full"):
            return None
        if previous.get("boot") == boot_id() and boot_id():
            return None  # the daemon crashed, the host did not: the kernel has every byte
        seq = previous.get("seq")
        return seq if isinstance(seq, int) else 0

    def opened(self, live: Iterable[tuple[int, int]], last_seq: int) -> None:
        """The rows found naming each segment; removes the files nothing names, then fsyncs
        what is left and records that every payload up to ``last_seq`` is on disk."""
        self._live = {segment: count for segment, count in live if count}
        for path in self.directory.iterdir():
            if path.name.isdigit() and int(path.name) not in self._live:
                path.unlink()
        with self._lock:
            for segment in self._live:
                self._fd(segment, create=False)
            self._unsynced = set(self._live)
        self._committed_seq = last_seq
        self.sync()

    def close(self) -> None:
        """Fsync everything, record a clean close, delete the spare segments."""
        self.sync(clean=True)
        with self._lock:
            for segment in self._spares:
                self._close_and_unlink(segment)
            self._spares.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    # -- writing and reading

    def write(
        self, payloads: Sequence[bytes | memoryview], *, sync: bool = False
    ) -> list[tuple[int, int]]:
        """Append ``payloads``; their (segment, offset) in order. Fsynced first if ``full``,
        or if ``sync`` (the directory too: rows older than the last sync will name them)."""
        with self._lock:
            if self._offset >= SEGMENT_BYTES:
                self._rotate()
            segment, fd = self.current, self._fd(self.current)
            at = self._offset
            places = []
            for payload in payloads:
                places.append((segment, at))
                at += len(payload)
            for start in range(0, len(payloads), _IOV_MAX):
                chunk = payloads[start : start + _IOV_MAX]
                offset = places[start][1]
                size = sum(len(p) for p in chunk)
                written = os.pwritev(fd, chunk, offset)
                while written < size:  # short writes: the rest, from where it stopped
                    rest = b"".join(chunk)[written:]
                    written += os.pwrite(fd, rest, offset + written)
            self._offset = at
            if sync:
                os.fdatasync(fd)
                self._fsync_directory()
            elif self.full:
                os.fdatasync(fd)
            else:
                self._unsynced.add(segment)
                self._unsynced_bytes += at - places[0][1] if places else 0
            return places

    def read(self, segment: int, offset: int, size: int) -> bytes:
        with self._lock:
            fd = self._fd(segment, create=False)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"blob segment {segment} ends before {offset + size}")
        return data

    def committed(self, segments: Iterable[int], last_seq: int) -> None:
        """Rows naming ``segments`` (one entry per row) committed, up to outbox seq ``last_seq``."""
        for segment in segments:
            self._live[segment] = self._live.get(segment, 0) + 1
        self._committed_seq = last_seq

    def released(self, segments: Iterable[int]) -> None:
        """Rows naming ``segments`` (one entry per row) were deleted, and that committed."""
        for segment in segments:
            left = self._live.get(segment, 0) - 1
            if left > 0:
                self._live[segment] = left
                continue
            self._live.pop(segment, None)
            if segment != self.current:
                self._remove(segment)

    @property
    def unsynced_bytes(self) -> int:
        return self._unsynced_bytes

    @property
    def live_segments(self) -> int:
        """How many segments rows name (the current one among them once it has rows)."""
        return len(self._live)

    def segment_bytes(self, segment: int) -> int:
        """How big the file of ``segment`` is (0 if it has none)."""
        try:
            return os.fstat(self._fds[segment]).st_size if segment in self._fds else 0
        except OSError:
            return 0

    # -- the sync thread's

    def sync(self, *, clean: bool = False) -> None:
        """Fsync the segments written since the last sync, then record the seq they cover."""
        with self._lock:  # copies of the fds: the store's thread may close its own meanwhile
            seq = self._committed_seq
            fds = [os.dup(self._fds[s]) for s in self._unsynced if s in self._fds]
            self._unsynced.clear()
            self._unsynced_bytes = 0
        try:
            for fd in fds:
                os.fdatasync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        record = {"boot": boot_id(), "seq": seq, "clean": clean, "full": self.full}
        temporary = self.directory / f".{SYNCED}.tmp"
        with open(temporary, "w") as out:
            out.write(json.dumps(record))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.directory / SYNCED)
        self._fsync_directory()

    def _fsync_directory(self) -> None:
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    # -- internals (under the lock)

    def _fd(self, segment: int, *, create: bool = True) -> int:
        fd = self._fds.get(segment)
        if fd is None and create and self._spares:  # a spare, renamed: written over
            spare = self._spares.pop()
            os.rename(self.directory / str(spare), self.directory / str(segment))
            fd = self._fds[segment] = self._fds.pop(spare)
            self._new_name()
        if fd is None:
            flags = os.O_RDWR | (os.O_CREAT if create else 0) | os.O_CLOEXEC
            fd = self._fds[segment] = os.open(self.directory / str(segment), flags, 0o600)
            if create:
                self._new_name()
        return fd

    def _new_name(self) -> None:
        """With ``full``, a new segment's name is on disk before any row names it."""
        if self.full:
            self._fsync_directory()

    def _rotate(self) -> None:
        old = self.current
        self.current += 1
        self.rotations += 1
        self._offset = 0
        if old not in self._live:
            self._retire(old)

    def _remove(self, segment: int) -> None:
        with self._lock:
            self._retire(segment)

    def _retire(self, segment: int) -> None:
        """A segment no row names: kept as a spare while there is room, else deleted."""
        if segment in self._fds and len(self._spares) < SPARE_SEGMENTS:
            self._spares.append(segment)
            self._unsynced.discard(segment)  # what it holds is no longer needed on disk
        else:
            self._close_and_unlink(segment)

    def _close_and_unlink(self, segment: int) -> None:
        fd = self._fds.pop(segment, None)
        if fd is not None:
            os.close(fd)
        self._unsynced.discard(segment)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / str(segment))
