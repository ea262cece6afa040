"""keel's ledger: a tamper-evident Merkle log that every daemon appends to.

Layers:

- :mod:`keel.ledger.core`: pure RFC 9162 Merkle maths, canonical entries,
  C2SP checkpoints and signed notes (no I/O);
- :mod:`keel.ledger.store`: the SQLite (WAL) store, :class:`Ledger` and its
  asyncio wrapper :class:`AsyncLedger`;
- :mod:`keel.ledger.keys`: the checkpoint signing key on disk;
- :mod:`keel.ledger.cli`: ``keel ledger ...``.

Appending, from any daemon::

    from keel.ledger import Ledger
    ledger = Ledger.open(path)
    index = ledger.append(source="watch", kind="restart", subject="web", data={"n": 3})
    ledger.close()
"""

from keel.ledger.errors import (
    EntryError,
    KeyFileError,
    LedgerError,
    MalformedError,
    ProofError,
    StoreError,
    TamperError,
)
from keel.ledger.store import AsyncLedger, Ledger

__all__ = [
    "AsyncLedger",
    "EntryError",
    "KeyFileError",
    "Ledger",
    "LedgerError",
    "MalformedError",
    "ProofError",
    "StoreError",
    "TamperError",
]
