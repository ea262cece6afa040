"""nftables through its JSON interface (``nft -j``): apply a transaction, list keel's table.

Only ``inet keel`` is ever named; nothing here reads or writes another table.
``nft -j -f -`` applies a document as one transaction: all of it or none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from keel.egress.ruleset import FAMILY, TABLE, Table, read_table
from keel.errors import KeelError


class NftError(KeelError):
    """nft refused a command or could not run; the message is nft's own first line."""


def nft_binary() -> str:
    """``$KEEL_NFT`` or ``nft`` on PATH."""
    configured = os.environ.get("KEEL_NFT")
    found = configured or shutil.which("nft")
    if not found:
        raise NftError("`nft` not found: install nftables (Debian: apt install nftables)")
    return found


def _run(argv: list[str], stdin: str | None = None, timeout: float = 30.0) -> str:
    try:
        proc = subprocess.run(
            [nft_binary(), *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NftError(f"nft {' '.join(argv)}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise NftError(f"cannot run nft: {exc.strerror}") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        detail = lines[0] if lines else f"exit status {proc.returncode}"
        if "Operation not permitted" in proc.stderr:
            detail += " (egress needs CAP_NET_ADMIN)"
        raise NftError(f"nft {' '.join(argv)}: {detail}")
    return proc.stdout


def apply(document: dict[str, Any]) -> None:
    """Commit ``document`` (``{"nftables": [...]}``) as one transaction."""
    _run(["-j", "-f", "-"], stdin=json.dumps(document))


def list_table(*, elements: bool = True) -> Table | None:
    """keel's table as it is now, or None when there is none.

    Without ``elements`` (``nft --terse``) the sets come back empty: quick,
    however many addresses they hold.
    """
    try:
        out = _run(["-j", *([] if elements else ["-t"]), "list", "table", FAMILY, TABLE])
    except NftError as exc:
        if "No such file or directory" in str(exc):
            return None
        raise
    try:
        return read_table(json.loads(out))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise NftError(f"nft -j list table {FAMILY} {TABLE}: unreadable output ({exc})") from None


MAX_SETS_ONE_BY_ONE = 16  # more sets than this are read with the whole table


def list_sets(names: list[str]) -> Table:
    """Some of keel's sets with their elements (one ``nft list set`` each, or the whole
    table when there are many); a set that is not there is left out."""
    if len(names) > MAX_SETS_ONE_BY_ONE:
        return list_table() or Table()
    found = Table()
    for name in names:
        try:
            out = _run(["-j", "list", "set", FAMILY, TABLE, name])
        except NftError as exc:
            if "No such file or directory" in str(exc):
                continue
            raise
        try:
            found.sets.update(read_table(json.loads(out)).sets)
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise NftError(
                f"nft -j list set {FAMILY} {TABLE} {name}: unreadable output ({exc})"
            ) from None
    return found
