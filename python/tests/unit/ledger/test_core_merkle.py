"""The Merkle maths of ``keel.ledger.core`` against a naive RFC 9162 implementation."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from keel.ledger import core
from keel.ledger.errors import ProofError

# The reference tree of RFC 6962's test suite (also behind the published vectors).
REFERENCE_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
REFERENCE_ROOT_8 = "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"


def naive_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 9162 §2.1.1, over leaf hashes."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + naive_root(leaves[:k]) + naive_root(leaves[k:])).digest()


def naive_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) from RFC 9162 §2.1.3.1."""
    if len(leaves) <= 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m < k:
        return [*naive_path(m, leaves[:k]), naive_root(leaves[k:])]
    return [*naive_path(m - k, leaves[k:]), naive_root(leaves[:k])]


def naive_subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) from RFC 9162 §2.1.4.1."""
    n = len(leaves)
    if m == n:
        return [] if whole else [naive_root(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*naive_subproof(m, leaves[:k], whole), naive_root(leaves[k:])]
    return [*naive_subproof(m - k, leaves[k:], False), naive_root(leaves[:k])]


class StoredTree:
    """A tree built the way the store builds it: rows of stored hashes per leaf."""

    def __init__(self, leaves: list[bytes]) -> None:
        builder = core.TreeBuilder()
        self.rows = [builder.append(leaf) for leaf in leaves]
        self.builder = builder
        self.lookups = 0

    def lookup(self, level: int, index: int) -> bytes:
        self.lookups += 1
        row, slot = core.stored_location(level, index)
        return self.rows[row][slot]


def leaf_hashes(n: int, salt: int = 0) -> list[bytes]:
    return [core.leaf_hash(f"{salt}:{i}".encode()) for i in range(n)]


def test_reference_tree_root() -> None:
    leaves = [core.leaf_hash(data) for data in REFERENCE_LEAVES]
    assert naive_root(leaves).hex() == REFERENCE_ROOT_8
    tree = StoredTree(leaves)
    assert tree.builder.root().hex() == REFERENCE_ROOT_8
    assert core.tree_root(8, tree.lookup).hex() == REFERENCE_ROOT_8
    assert core.tree_root(0, tree.lookup) == core.EMPTY_ROOT == hashlib.sha256(b"").digest()


def test_hash_prefixes() -> None:
    assert core.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert core.node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()


@given(st.integers(min_value=0, max_value=300))
def test_rows_hold_the_subtrees_each_leaf_completes(n: int) -> None:
    leaves = leaf_hashes(n)
    tree = StoredTree(leaves)
    for index, row in enumerate(tree.rows):
        assert len(row) == core.hashes_per_row(index)
        for level, stored in enumerate(row):
            first = index - (1 << level) + 1
            assert core.stored_location(level, first >> level) == (index, level)
            assert stored == naive_root(leaves[first : index + 1])
    assert core.frontier_positions(n) == [
        (level, (n >> (level + 1)) << 1)
        for level in reversed(range(n.bit_length()))
        if n >> level & 1
    ]


@given(st.integers(min_value=0, max_value=300), st.data())
def test_roots_match_naive_and_resume(n: int, data: st.DataObject) -> None:
    leaves = leaf_hashes(n)
    tree = StoredTree(leaves)
    assert tree.builder.root() == naive_root(leaves)
    for size in {0, n, data.draw(st.integers(min_value=0, max_value=n))}:
        assert core.tree_root(size, tree.lookup) == naive_root(leaves[:size])
        # Resuming from the stored frontier gives the same tree as building in one go.
        resumed = core.TreeBuilder.resume(size, tree.lookup)
        assert resumed.root() == naive_root(leaves[:size])
        assert [resumed.append(leaf) for leaf in leaves[size:]] == tree.rows[size:]


@settings(max_examples=300)
@given(st.integers(min_value=1, max_value=600), st.data())
def test_inclusion_proofs_verify_and_match_naive(n: int, data: st.DataObject) -> None:
    leaves = leaf_hashes(n, salt=n)
    tree = StoredTree(leaves)
    size = data.draw(st.integers(min_value=1, max_value=n), label="size")
    index = data.draw(st.integers(min_value=0, max_value=size - 1), label="index")
    root = naive_root(leaves[:size])
    proof = core.inclusion_proof(index, size, tree.lookup)
    assert proof == naive_path(index, leaves[:size])
    core.verify_inclusion(index, size, leaves[index], proof, root)
    assert core.root_from_inclusion_proof(index, size, leaves[index], proof) == root


@settings(max_examples=300)
@given(st.integers(min_value=1, max_value=600), st.data())
def test_consistency_proofs_verify_and_match_naive(n: int, data: st.DataObject) -> None:
    leaves = leaf_hashes(n, salt=n)
    tree = StoredTree(leaves)
    size2 = data.draw(st.integers(min_value=1, max_value=n), label="size2")
    size1 = data.draw(st.integers(min_value=1, max_value=size2), label="size1")
    proof = core.consistency_proof(size1, size2, tree.lookup)
    assert proof == naive_subproof(size1, leaves[:size2], True)
    core.verify_consistency(
        size1, size2, proof, naive_root(leaves[:size1]), naive_root(leaves[:size2])
    )


def flip_bit(value: bytes, bit: int) -> bytes:
    mutated = bytearray(value)
    mutated[bit // 8 % len(value)] ^= 1 << (bit % 8)
    return bytes(mutated)


# The tree size is not a mutation here: a proof is bound to its root, and the
# root to its size by the signed checkpoint, not by the proof.
MUTATIONS = ["flip", "drop", "extra", "swap", "index", "root", "leaf", "empty"]


@settings(max_examples=400)
@given(st.integers(min_value=2, max_value=300), st.data(), st.sampled_from(MUTATIONS))
def test_mutated_inclusion_proofs_fail(n: int, data: st.DataObject, mutation: str) -> None:
    leaves = leaf_hashes(n)
    tree = StoredTree(leaves)
    index = data.draw(st.integers(min_value=0, max_value=n - 1), label="index")
    proof = core.inclusion_proof(index, n, tree.lookup)
    root, leaf, size = tree.builder.root(), leaves[index], n
    bit = data.draw(st.integers(min_value=0, max_value=255), label="bit")
    if mutation == "flip":
        position = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
        proof[position] = flip_bit(proof[position], bit)
    elif mutation == "drop":
        proof.pop(data.draw(st.integers(min_value=0, max_value=len(proof) - 1)))
    elif mutation == "extra":
        proof.insert(data.draw(st.integers(min_value=0, max_value=len(proof))), leaves[0])
    elif mutation == "swap":
        if len(proof) < 2 or proof[0] == proof[-1]:
            proof.append(root)
        else:
            proof[0], proof[-1] = proof[-1], proof[0]
    elif mutation == "index":
        other = data.draw(st.integers(min_value=0, max_value=n))
        if other == index:
            other = n
        index = other
    elif mutation == "empty":
        proof = []
    elif mutation == "root":
        root = flip_bit(root, bit)
    else:
        leaf = flip_bit(leaf, bit)
    with pytest.raises(ProofError):
        core.verify_inclusion(index, size, leaf, proof, root)


@settings(max_examples=400)
@given(st.integers(min_value=3, max_value=300), st.data(), st.sampled_from(MUTATIONS))
def test_mutated_consistency_proofs_fail(n: int, data: st.DataObject, mutation: str) -> None:
    leaves = leaf_hashes(n)
    tree = StoredTree(leaves)
    size1 = data.draw(st.integers(min_value=1, max_value=n - 1), label="size1")
    proof = core.consistency_proof(size1, n, tree.lookup)
    root1, root2, size2 = naive_root(leaves[:size1]), tree.builder.root(), n
    bit = data.draw(st.integers(min_value=0, max_value=255), label="bit")
    if mutation == "flip":
        position = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
        proof[position] = flip_bit(proof[position], bit)
    elif mutation == "drop":
        proof.pop(data.draw(st.integers(min_value=0, max_value=len(proof) - 1)))
    elif mutation == "extra":
        proof.insert(data.draw(st.integers(min_value=0, max_value=len(proof))), leaves[0])
    elif mutation == "swap":
        root1, root2 = root2, root1
    elif mutation == "index":
        size1 = data.draw(st.integers(min_value=1, max_value=n).filter(lambda s: s != size1))
        root1 = naive_root(leaves[:size1])
        # Only the genuine proof for the new size could verify (short of a hash collision).
        assume(proof != core.consistency_proof(size1, n, tree.lookup))
    elif mutation == "empty":
        proof = []
    elif mutation == "root":
        root1 = flip_bit(root1, bit)
    else:
        root2 = flip_bit(root2, bit)
    with pytest.raises(ProofError):
        core.verify_consistency(size1, size2, proof, root1, root2)


def test_proof_generation_is_logarithmic_in_lookups() -> None:
    n = 5000
    tree = StoredTree(leaf_hashes(n))
    worst = 0
    for index in range(0, n, 37):
        tree.lookups = 0
        core.inclusion_proof(index, n, tree.lookup)
        worst = max(worst, tree.lookups)
    # log2(5000) < 13: a proof needs at most about 2 log2(n) stored hashes.
    assert worst <= 2 * n.bit_length()
    tree.lookups = 0
    core.consistency_proof(1234, n, tree.lookup)
    assert tree.lookups <= 3 * n.bit_length()


def test_refuses_out_of_range_requests() -> None:
    tree = StoredTree(leaf_hashes(4))
    with pytest.raises(ValueError, match="not in a tree"):
        core.inclusion_proof(4, 4, tree.lookup)
    with pytest.raises(ValueError, match="no consistency proof"):
        core.consistency_proof(0, 4, tree.lookup)
    with pytest.raises(ValueError, match="no consistency proof"):
        core.consistency_proof(3, 2, tree.lookup)
    with pytest.raises(ValueError, match="frontier"):
        core.TreeBuilder(3, [])


def test_proof_json_round_trip() -> None:
    tree = StoredTree(leaf_hashes(11))
    inclusion = core.InclusionProof(
        3,
        11,
        tree.builder.root(),
        tree.rows[3][0],
        tuple(core.inclusion_proof(3, 11, tree.lookup)),
    )
    assert core.parse_proof(inclusion.to_json()) == inclusion
    inclusion.verify()
    consistency = core.ConsistencyProof(
        4,
        11,
        core.tree_root(4, tree.lookup),
        tree.builder.root(),
        tuple(core.consistency_proof(4, 11, tree.lookup)),
    )
    assert core.parse_proof(consistency.to_json()) == consistency
    consistency.verify()
    assert set(inclusion.to_json()) == core.INCLUSION_KEYS
    assert set(consistency.to_json()) == core.CONSISTENCY_KEYS
