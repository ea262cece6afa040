"""In-memory ledgers for the fleet's pure cores: entries, roots, proofs, signed checkpoints."""

from __future__ import annotations

import functools
import hashlib

from keel.fleet.cosign import Cosigner
from keel.ledger import core


def signer(name: str, byte: int) -> core.Signer:
    return core.Signer(name, bytes([byte]) * 32)


def cosigner(name: str, byte: int) -> Cosigner:
    return Cosigner(signer(name, byte))


class MemoryLog:
    """A node's ledger as a list of entries, signed with ``key``."""

    def __init__(self, key: core.Signer, entries: list[bytes] | None = None) -> None:
        self.key = key
        self.entries = list(entries or [])

    def append(self, count: int, tag: str = "e") -> MemoryLog:
        start = len(self.entries)
        self.entries += [f"{tag}{i}".encode() for i in range(start, start + count)]
        return self

    def copy(self) -> MemoryLog:
        return MemoryLog(self.key, self.entries)

    @property
    def size(self) -> int:
        return len(self.entries)

    @property
    def ledger_key(self) -> str:
        return str(self.key.verifier)

    def _lookup(self) -> core.HashLookup:
        leaves = [core.leaf_hash(e) for e in self.entries]

        @functools.cache
        def lookup(level: int, index: int) -> bytes:
            if level == 0:
                return leaves[index]
            return core.node_hash(lookup(level - 1, 2 * index), lookup(level - 1, 2 * index + 1))

        return lookup

    def root(self, size: int | None = None) -> bytes:
        return core.tree_root(self.size if size is None else size, self._lookup())

    def proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        size2 = self.size if size2 is None else size2
        if size1 == 0 or size1 >= size2:
            return []
        return core.consistency_proof(size1, size2, self._lookup())

    def note(self, size: int | None = None) -> str:
        size = self.size if size is None else size
        return core.sign_checkpoint(core.Checkpoint(self.key.name, size, self.root(size)), self.key)


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
