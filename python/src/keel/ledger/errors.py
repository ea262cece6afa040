"""What can go wrong in the ledger, split by who has to act.

- :class:`EntryError`, :class:`MalformedError`: the caller's input (an entry, a
  proof file, a checkpoint file, a key string) is malformed. Exit code 2.
- :class:`ProofError`: a well-formed proof or signed note does not verify.
- :class:`TamperError`: ``verify`` found stored data that does not match the
  tree; ``index`` is the first leaf index known to be bad.
- :class:`StoreError`: the database is missing, corrupt, foreign, of another
  schema version, or SQLite failed.
- :class:`KeyFileError`: the signing key is missing, unreadable or malformed.

All of them are :class:`keel.errors.KeelError`, so the CLI prints them as one
line and exits with their ``exit_code``. Values quoted in messages go through
:func:`shown`, so a 100 KB subject or a hostile proof field is never echoed
back whole.
"""

from __future__ import annotations

from keel.errors import KeelError, UsageError


class LedgerError(KeelError):
    """Base class of every ledger error."""

    exit_code = 1


class EntryError(LedgerError, UsageError):
    """An entry to append is malformed (bad field, data not a JSON object...)."""

    exit_code = 2


class MalformedError(LedgerError, UsageError):
    """A proof, checkpoint, note or key given as input cannot be parsed."""

    exit_code = 2


class ProofError(LedgerError):
    """A well-formed proof or signed note does not verify."""


class TamperError(LedgerError):
    """The stored ledger is inconsistent; ``index`` is the first bad leaf index.

    Its message reads ``<db>: the ledger was tampered with: <what was found>``
    (or ``<db>: the ledger went back: ...`` when entries it had signed are gone).
    """

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class StoreError(LedgerError):
    """The ledger database cannot be used (missing, corrupt, foreign, locked)."""


class KeyFileError(LedgerError):
    """The signing key file is missing, unreadable or malformed."""


def shown(value: object) -> str:
    """``value`` for an error message: one line, long values cut (keel.config's helper)."""
    from keel.config import describe

    return describe(value)
