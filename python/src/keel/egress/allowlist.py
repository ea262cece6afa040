"""Allowlist entries and the one question asked of them: may this name be resolved?

An entry is ``example.com`` (exactly that name) or ``*.example.com`` (any name
with one or more labels before ``example.com``, never ``example.com`` itself).
Matching is case-insensitive (ASCII, as DNS is), a trailing dot is ignored,
and internationalised names are compared in their IDNA form (UTS #46 mapping,
IDNA 2008), so ``Bücher.example`` and ``xn--bcher-kva.example`` are one name.

Names are compared as tuples of lowercase labels, never as text: a wire label
that holds a dot (``a\\.b``) can never pose as two labels. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import idna

from keel.config import shorten

Labels = tuple[bytes, ...]

MAX_NAME = 253  # characters of a name in text form, without the trailing dot
_LABEL = re.compile(rb"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_LDH_NAME = re.compile(
    r"([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z"
)


class EntryError(ValueError):
    """An allowlist entry that is not a domain name or wildcard; the message says why."""


def _shown(text: object) -> str:
    """A value in a message: quoted, escaped, a long one cut (it says how long it was)."""
    return repr(shorten(text)) if isinstance(text, str) else repr(text)


@dataclass(frozen=True)
class Entry:
    """One parsed allowlist entry."""

    labels: Labels  # lowercase ASCII labels, without the "*" of a wildcard
    wildcard: bool

    def __str__(self) -> str:
        text = b".".join(self.labels).decode("ascii")
        return f"*.{text}" if self.wildcard else text


def _ascii_label(label: str, entry: str) -> bytes:
    if label.isascii():
        raw = label.lower().encode("ascii")
    else:
        try:
            raw = idna.encode(label, uts46=True, std3_rules=True)
        except idna.IDNAError as exc:
            raise EntryError(
                f"{_shown(entry)}: label {_shown(label)} is not a valid IDNA label ({shorten(str(exc))})"
            ) from None
    if not _LABEL.match(raw):
        raise EntryError(
            f"{_shown(entry)}: label {_shown(label)} is not a valid host name label "
            "(letters, digits and inner '-', 1 to 63 characters)"
        )
    return raw


def parse_entry(text: str) -> Entry:
    """Parse one entry; :class:`EntryError` says what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise EntryError(f"{_shown(text)}: an entry must be a domain name such as 'example.com'")
    name = text.strip()
    if name != text:
        raise EntryError(f"{_shown(text)}: remove the surrounding whitespace")
    name = name.removesuffix(".")
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    if "*" in name:
        raise EntryError(
            f"{_shown(text)}: '*' is only allowed as the whole first label ('*.example.com')"
        )
    if ":" in name or name.replace(".", "").isdigit():
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            pass
        else:
            raise EntryError(f"{_shown(text)}: the allowlist takes domain names, not addresses")
    if not name:
        raise EntryError(f"{_shown(text)}: an entry must be a domain name such as 'example.com'")
    lowered = name.lower() if name.isascii() else ""
    if lowered and _LDH_NAME.match(lowered):
        # The common case in one pass (allowlists run to thousands of names).
        labels = tuple(label.encode("ascii") for label in lowered.split("."))
    else:
        labels = tuple(_ascii_label(label, text) for label in name.split("."))
    if len(b".".join(labels)) > MAX_NAME:
        raise EntryError(f"{_shown(text)}: longer than {MAX_NAME} characters")
    if labels[-1].isdigit():
        raise EntryError(f"{_shown(text)}: the last label cannot be all digits")
    if wildcard and len(labels) < 2:
        raise EntryError(
            f"{_shown(text)}: a wildcard must sit under a registered name ('*.example.com', not '*.com')"
        )
    return Entry(labels, wildcard)


def wire_labels(labels: Sequence[bytes]) -> Labels:
    """The labels of a DNS name as they come off the wire, made comparable.

    dnspython's absolute names end with the empty root label; that is dropped,
    and ASCII letters are lowered (DNS compares case-insensitively, ASCII only).
    """
    if labels and labels[-1] == b"":
        labels = labels[:-1]
    return tuple(label.lower() for label in labels)


def text_labels(name: str) -> Labels:
    """A name typed by a person (``keel egress check``), in comparable form.

    Internationalised names are converted as entries are; a name that cannot
    be a host name raises :class:`EntryError`.
    """
    entry = parse_entry(name)
    if entry.wildcard:
        raise EntryError(f"{_shown(name)}: give a name to check, not a wildcard")
    return entry.labels


class Allowlist:
    """The names one agent may resolve: exact names plus wildcard suffixes."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.entries: tuple[Entry, ...] = tuple(dict.fromkeys(entries))
        self._exact = frozenset(e.labels for e in self.entries if not e.wildcard)
        self._suffixes = frozenset(e.labels for e in self.entries if e.wildcard)
        self._suffix_lengths = sorted({len(s) for s in self._suffixes})

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Allowlist:
        return cls(parse_entry(text) for text in texts)

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def texts(self) -> list[str]:
        return [str(e) for e in self.entries]

    def allows(self, labels: Labels) -> bool:
        """Whether a name (comparable labels: :func:`wire_labels`) is allowed.

        An empty allowlist allows nothing.
        """
        if labels in self._exact:
            return True
        for length in self._suffix_lengths:
            if length >= len(labels):
                break
            if labels[-length:] in self._suffixes:
                return True
        return False

    def allows_text(self, name: str) -> bool:
        return self.allows(text_labels(name))
