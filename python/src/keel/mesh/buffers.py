"""Large buffers used again once nothing refers to them any more. Pure.

The sending daemon handles a 64 KiB message's bytes in large buffers: the
body of an agent's SEND frame (read in place; the payloads handed on are
views of it, held by the outbox's payload cache until the recipient
acknowledges them) and a sealed ``MSGS`` packet (up to 1 MiB, held by the
transport until it is sent). Allocating each afresh costs a ``malloc`` and
the zeroing of every byte (``bytearray(n)``); a :class:`BufferPool` keeps a
few and hands one out again once its reference count says that only the
pool holds it: no view of it is alive anywhere. CPython only (reference
counts), as keel is.
"""

from __future__ import annotations

import sys
from typing import Final

_FREE: Final = 3  # references to a free buffer while take() looks at it: the list, a name, the call


class BufferPool:
    """At most ``keep`` buffers and ``keep_bytes`` bytes in all, kept for later use.

    :meth:`take` gives a kept buffer nothing else holds, if one is large
    enough, else a new one (kept if the limits allow, in place of a free one
    too small for it if need be). Its bytes are what was last written
    there: the caller fills what it uses. One thread only.
    """

    def __init__(self, *, keep: int, keep_bytes: int, step: int = 64 << 10) -> None:
        self.keep = keep
        self.keep_bytes = keep_bytes
        self.step = step  # sizes are rounded up to this, so later requests fit
        self._kept: list[bytearray] = []
        self.made = 0  # buffers allocated so far (for tests and figures)

    def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes that nothing else refers to."""
        kept = self._kept
        spot = None  # a free buffer too small for this size: replaced by the new one
        for number in range(len(kept)):
            buffer = kept[number]
            if sys.getrefcount(buffer) == _FREE:
                if len(buffer) >= size:
                    return buffer
                spot = number
        buffer = bytearray(-(-size // self.step) * self.step)
        self.made += 1
        held = sum(map(len, kept))
        if spot is not None and held - len(kept[spot]) + len(buffer) <= self.keep_bytes:
            kept[spot] = buffer
        elif len(kept) < self.keep and held + len(buffer) <= self.keep_bytes:
            kept.append(buffer)
        return buffer

    def free(self) -> int:
        """How many kept buffers nothing else refers to (for tests)."""
        return sum(1 for buffer in self._kept if sys.getrefcount(buffer) == _FREE)
