"""Every published Merkle proof vector under ``vectors/merkle``, through the core and the CLI.

Happy paths must verify; every ``wantErr: true`` case must be rejected, by the
core (as malformed or invalid) and by ``keel ledger verify-proof`` (exit 1 or 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from keel.cli import main
from keel.ledger import core
from keel.ledger.errors import MalformedError, ProofError


def assert_one_line_error(stderr: str) -> None:
    assert stderr.startswith("keel: error: "), stderr
    assert stderr.count("\n") == 1, stderr


def vector_files(vectors_dir: Path) -> list[Path]:
    files = sorted((vectors_dir / "merkle").rglob("*.json"))
    assert files, f"no vectors under {vectors_dir / 'merkle'}"
    return files


def test_every_vector_through_the_core(vectors_dir: Path) -> None:
    files = vector_files(vectors_dir)
    kinds = {"inclusion": [0, 0], "consistency": [0, 0]}
    for path in files:
        vector = json.loads(path.read_text())
        kind = path.relative_to(vectors_dir / "merkle").parts[0]
        kinds[kind][bool(vector["wantErr"])] += 1
        where = f"{path.relative_to(vectors_dir)} ({vector['desc']})"
        if vector["wantErr"]:
            with pytest.raises((ProofError, MalformedError)):
                core.parse_proof(vector).verify()
        else:
            proof = core.parse_proof(vector)
            try:
                proof.verify()
            except (ProofError, MalformedError) as exc:
                pytest.fail(f"{where}: a happy-path vector was rejected: {exc}")
            assert isinstance(proof, core.InclusionProof | core.ConsistencyProof)
            assert (kind == "inclusion") == isinstance(proof, core.InclusionProof)
    # Both kinds, with both outcomes, were walked.
    assert all(good and bad for good, bad in kinds.values()), kinds


def test_every_vector_through_verify_proof(
    vectors_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for path in vector_files(vectors_dir):
        vector = json.loads(path.read_text())
        code = main(["ledger", "verify-proof", str(path)])
        out, err = capsys.readouterr()
        where = f"{path.relative_to(vectors_dir)} ({vector['desc']})"
        if vector["wantErr"]:
            assert code in (1, 2), f"{where}: accepted, exit {code}"
            assert_one_line_error(err)
        else:
            assert code == 0, f"{where}: exit {code}: {err}"
            assert out.startswith("valid: ")


def test_verify_proof_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proof = tmp_path / "proof.json"
    cases = {
        "{not json": 2,
        "[]": 2,
        '{"leafIdx": 0}': 2,
        '{"leafIdx": -1, "treeSize": 1, "root": "", "leafHash": "", "proof": []}': 2,
        '{"leafIdx": 0, "treeSize": 1, "root": "!!", "leafHash": "", "proof": []}': 2,
        '{"size1": 1, "size2": 2, "root1": "", "root2": "", "proof": [], "x": 1}': 2,
        '{"size1": 1, "size2": 2, "root1": "", "root2": "", "proof": "AA=="}': 2,
        '{"leafIdx": 0, "treeSize": 1, "root": "", "leafHash": "", "proof": null}': 1,
    }
    for text, want in cases.items():
        proof.write_text(text)
        assert main(["ledger", "verify-proof", str(proof)]) == want, text
        err = capsys.readouterr().err
        assert_one_line_error(err)
    assert main(["ledger", "verify-proof", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
