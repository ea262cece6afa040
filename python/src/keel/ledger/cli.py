"""``keel ledger ...``: append to, read, checkpoint, verify and prove the ledger."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel import paths
from keel.errors import UsageError
from keel.output import print_json, print_json_line

if TYPE_CHECKING:
    from keel.ledger.core import Entry, Signer, Verifier
    from keel.ledger.store import Ledger

DESCRIPTION = """\
The ledger is a tamper-evident log of what keel's services did: an RFC 9162
Merkle tree over canonical JSON entries in SQLite, with checkpoints signed as
C2SP signed notes (Ed25519). See docs/ledger.md.
"""

FILES_HELP = """\
files:
  --db defaults to /var/lib/keel/ledger.db (./.keel/ledger.db in dev mode);
  the signing key is the .key file next to it (ledger.db -> ledger.key, mode
  0600), created on first use by `checkpoint` or `key`; ledger.db.head holds
  the last signed checkpoint, so that `verify` notices a ledger that went back.
  verify, tail, search and prove only read: they work on a read-only copy.
"""

MAX_PROOF_BYTES = 1024 * 1024  # a proof of a tree of 2**64 leaves is under 4 KB of JSON
MAX_NOTE_BYTES = 64 * 1024  # a signed checkpoint is a few hundred bytes


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        type=Path,
        metavar="PATH",
        help="ledger database (default: /var/lib/keel/ledger.db, ./.keel/ledger.db in dev mode)",
    )
    keyed = argparse.ArgumentParser(add_help=False)
    keyed.add_argument(
        "--key",
        type=Path,
        metavar="PATH",
        help="signing key file (default: the .key file next to the database)",
    )
    formatter = argparse.RawDescriptionHelpFormatter

    ledger = subparsers.add_parser(
        "ledger",
        help="the tamper-evident log: append, tail, search, checkpoint, verify, prove",
        description=DESCRIPTION,
        epilog=FILES_HELP,
        formatter_class=formatter,
    )
    commands = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND", required=True)

    append = commands.add_parser(
        "append",
        parents=[common],
        help="append one entry and print its leaf index",
        description="Append one entry (one durable transaction) and print its leaf index.",
    )
    append.add_argument("--source", required=True, help="who records it (watch, mesh, ...)")
    append.add_argument("--kind", required=True, help="what happened (restart, blocked, ...)")
    append.add_argument("--subject", default="", help="what it happened to (an agent, a peer)")
    append.add_argument(
        "--data", default="{}", metavar="JSON", help="a JSON object of metadata (default: {})"
    )
    append.set_defaults(func=cmd_append)

    tail = commands.add_parser(
        "tail",
        parents=[common],
        help="print the last entries",
        description="Print the last N entries, oldest first; --follow keeps printing new ones.",
    )
    tail.add_argument("-n", type=int, default=10, metavar="N", help="how many (default: 10)")
    tail.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep printing new entries until interrupted (SIGINT or SIGTERM: exit 130 or 143)",
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.set_defaults(func=cmd_tail)

    search = commands.add_parser(
        "search",
        parents=[common],
        help="print the entries that contain a text (a message id, a peer, a unit)",
        description="Print the entries whose canonical JSON contains TEXT, oldest first "
        "(a scan of the whole ledger). A mesh message id finds the batch entries that name "
        "it (sent, delivered, received, dead letter: docs/mesh.md); `prove inclusion INDEX` "
        "then proves each is in the log. --json adds each entry's leafHash, the one its "
        "inclusion proof leads from.",
    )
    search.add_argument("text", metavar="TEXT", help="what to look for (case-sensitive)")
    search.add_argument("--source", help="only entries of this source (mesh, watch, ...)")
    search.add_argument("--kind", help="only entries of this kind (sent-batch, restart, ...)")
    search.add_argument(
        "-n", type=int, default=None, metavar="N", help="at most N entries (default: all)"
    )
    search.add_argument("--json", action="store_true", help="one JSON object per line")
    search.set_defaults(func=cmd_search)

    checkpoint = commands.add_parser(
        "checkpoint",
        parents=[common, keyed],
        help="sign, store and print a checkpoint of the current tree",
        description="Sign the current tree head as a C2SP tlog-checkpoint in a C2SP signed "
        "note (Ed25519), store it in the ledger and print it. Keep a copy elsewhere: "
        "`verify --checkpoint FILE` proves later that the ledger still extends it.",
    )
    checkpoint.add_argument("--json", action="store_true", help="print origin, size, root, note")
    checkpoint.set_defaults(func=cmd_checkpoint)

    verify = commands.add_parser(
        "verify",
        parents=[common, keyed],
        help="check every entry, stored hash and checkpoint",
        description="Recompute every leaf hash from its entry and every stored subtree hash, "
        "check every stored checkpoint's signature and root, and that the tree extends each "
        "--checkpoint FILE. Exit 0 when all is consistent, 1 naming the first bad index.",
    )
    verify.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="FILE",
        help="an older signed checkpoint the ledger must extend (repeatable)",
    )
    verify.add_argument(
        "--verifier-key",
        metavar="VKEY",
        help="trusted verifier key (name+id+key, or a file holding it); "
        "default: the public half of the signing key",
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(func=cmd_verify)

    prove = commands.add_parser(
        "prove",
        help="print an inclusion or consistency proof as JSON",
        description="Print a proof as JSON in the format of the RFC 9162 test vectors; "
        "`keel ledger verify-proof` checks it without the ledger.",
    )
    proofs = prove.add_subparsers(dest="proof_kind", metavar="KIND", required=True)
    inclusion = proofs.add_parser(
        "inclusion",
        parents=[common],
        help="prove that leaf INDEX is in the tree",
        description="Prove that leaf INDEX is in the tree of size N (default: the current size).",
    )
    inclusion.add_argument("index", type=int, metavar="INDEX")
    inclusion.add_argument("--size", type=int, metavar="N", help="tree size (default: current)")
    inclusion.set_defaults(func=cmd_prove_inclusion)
    consistency = proofs.add_parser(
        "consistency",
        parents=[common],
        help="prove that the tree of size NEW extends the tree of size OLD",
        description="Prove that the tree of size NEW extends the tree of size OLD (0 < OLD <= NEW).",
    )
    consistency.add_argument("old", type=int, metavar="OLD")
    consistency.add_argument("new", type=int, metavar="NEW")
    consistency.set_defaults(func=cmd_prove_consistency)

    check = commands.add_parser(
        "verify-proof",
        help="check a JSON proof offline",
        description="Check an inclusion or consistency proof (JSON, as printed by `prove`) "
        "without a ledger. Exit 0 valid, 1 invalid, 2 malformed input.",
    )
    check.add_argument("file", metavar="FILE", help="the proof file, or - for stdin")
    check.set_defaults(func=cmd_verify_proof)

    key = commands.add_parser(
        "key",
        parents=[common, keyed],
        help="print the verifier key (creating the signing key on first use)",
        description="Print the verifier key (name+keyid+base64 public key) that checks this "
        "ledger's checkpoints offline; creates the signing key if there is none yet. The key "
        "belongs to the owner of its directory (root, for /var/lib/keel): only that user "
        "creates it, and only daemons running as that user sign checkpoints.",
    )
    key.add_argument("--json", action="store_true", help="print name, key id and key as JSON")
    key.add_argument(
        "--provision",
        action="store_true",
        help="make sure the key exists and belongs to this user (the owner of its directory; "
        "a key another user made first is taken back): what keel-ledger-key.service runs "
        "as root before keel's daemons start",
    )
    key.set_defaults(func=cmd_key)


# ---- helpers ----------------------------------------------------------------


def _db_path(args: argparse.Namespace) -> Path:
    return Path(args.db) if args.db is not None else paths.ledger_db()


def _key_path(args: argparse.Namespace) -> Path:
    from keel.ledger.keys import default_key_path

    return Path(args.key) if args.key is not None else default_key_path(_db_path(args))


def _open(args: argparse.Namespace, *, create: bool = False, read_only: bool = False) -> Ledger:
    from keel.ledger.store import Ledger

    path = _db_path(args)
    if create and args.db is not None:
        _parent_must_exist(path, "--db")
    return Ledger.open(path, create=create, read_only=read_only)


def _in_state_directory(path: Path) -> bool:
    """Is ``path`` in keel's own state directory (installed or dev), made on first use?"""
    try:
        parent = path.parent.resolve()
        return parent in (paths.STATE, paths.DEV_ROOT.resolve())
    except (OSError, ValueError, RuntimeError):
        return False


def _parent_must_exist(path: Path, option: str) -> None:
    """A path the user typed must not make directories: a typo would go unnoticed.

    keel's own state directories (/var/lib/keel, ./.keel) are the exception:
    they are made on first use, named or not.
    """
    from keel.ledger.errors import shown

    try:
        exists = path.parent.is_dir()
    except (OSError, ValueError):
        exists = False
    if not exists and not _in_state_directory(path):
        # Paths are shown whole (the point of the message), unless absurdly long.
        text, parent = (
            (str(path), str(path.parent)) if len(str(path)) < 1024 else (shown(str(path)), "")
        )
        raise UsageError(
            f"{option} {text}: there is no directory {parent or 'for it'}; "
            "create it first, or fix the path"
        )


def _signer(args: argparse.Namespace, ledger: Ledger | None) -> Signer:
    """The signing key; created on first use unless checkpoints already need the old one."""
    from keel.ledger.keys import create_signer, default_key_name, load_signer, signer_for

    if ledger is not None:
        return signer_for(ledger, args.key)
    path = _key_path(args)
    if path.exists() or path.is_symlink():
        return load_signer(path)
    if _in_state_directory(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    return create_signer(path, default_key_name())


def _read_input(name: str, what: str, limit: int) -> str:
    """A file the user named (``-``: stdin) as text, refused beyond ``limit`` bytes."""
    from keel.ledger.errors import shown

    try:
        if name == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with Path(name).open("rb") as handle:
                data = handle.read(limit + 1)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot read {what} {shown(name)}: {reason}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {shown(name)} is larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{what} {shown(name)} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def _entry_json(index: int, entry: Entry) -> dict[str, Any]:
    return {"index": index, **entry.as_dict()}


def _entry_line(index: int, entry: Entry) -> str:
    data = json.dumps(entry.data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    if not data.isprintable():  # bidi overrides, line separators: escaped, not obeyed
        data = json.dumps(entry.data, sort_keys=True, separators=(",", ":"))
    subject = entry.subject or "-"
    if not subject.isprintable():  # a terminal escape in a subject must not reach the terminal
        subject = json.dumps(subject)
    return f"{index:>7}  {entry.ts}  {entry.source:<10} {entry.kind:<16} {subject:<16} {data}"


# ---- commands -----------------------------------------------------------------


def cmd_append(args: argparse.Namespace) -> int:
    from keel.config import parse_json
    from keel.ledger.core import make_entry
    from keel.ledger.errors import EntryError

    data = parse_json(args.data, source="--data")
    if not isinstance(data, dict):
        raise EntryError(f"--data must be a JSON object, got {type(data).__name__}")
    # Build (and so validate) the entry before the ledger is opened or created.
    raw = make_entry(
        ts=time.time(), source=args.source, kind=args.kind, subject=args.subject, data=data
    )
    with _open(args, create=True) as ledger:
        index = ledger.append_raw([raw])
    print(index)
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise UsageError(f"-n must be 0 or more, got {args.n}")

    def show(batch: list[tuple[int, Entry]]) -> None:
        for index, entry in batch:
            if args.json:
                print_json_line(_entry_json(index, entry))
            else:
                print(_entry_line(index, entry))
        sys.stdout.flush()

    ledger = _open(args, read_only=True)
    try:
        size = ledger.size()
        show(ledger.entries(max(0, size - args.n), size))
        # Until SIGINT or SIGTERM (keel.signals): they stop the sleep or the read.
        while args.follow:
            time.sleep(0.5)
            if ledger.changed():  # read without locks, and a writer came: read afresh
                ledger.close()
                ledger = _open(args, read_only=True)
            batch = ledger.entries(size)
            show(batch)
            size += len(batch)
    finally:
        ledger.close()
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import base64

    from keel.ledger.core import leaf_hash

    if args.n is not None and args.n < 1:
        raise UsageError(f"-n must be 1 or more, got {args.n}")
    if not args.text:
        raise UsageError("TEXT must not be empty")
    with _open(args, read_only=True) as ledger:
        found = ledger.search(args.text, source=args.source, kind=args.kind, limit=args.n)
    for index, entry in found:
        if args.json:
            leaf = base64.b64encode(leaf_hash(entry.canonical())).decode()
            print_json_line({**_entry_json(index, entry), "leafHash": leaf})
        else:
            print(_entry_line(index, entry))
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    import base64

    from keel.ledger.core import Checkpoint

    with _open(args) as ledger:
        stored = ledger.checkpoint(_signer(args, ledger))
    if args.json:
        head = Checkpoint.parse(stored.note[: stored.note.rindex("\n\n") + 1])
        print_json(
            {
                "id": stored.id,
                "origin": head.origin,
                "size": head.size,
                "root": base64.b64encode(head.root).decode(),
                "created": stored.created,
                "note": stored.note,
            }
        )
    else:
        sys.stdout.write(stored.note)
    return 0


def _verifier(args: argparse.Namespace, ledger: Ledger) -> Verifier | None:
    from keel.ledger.errors import KeyFileError
    from keel.ledger.keys import load_signer, load_verifier

    if args.verifier_key:
        return load_verifier(args.verifier_key)
    path = _key_path(args)
    if path.exists() or path.is_symlink():
        return load_signer(path).verifier
    if args.checkpoint or ledger.checkpoints() or ledger.head_path.exists():
        raise KeyFileError(
            f"no signing key at {path} to check checkpoint signatures with: "
            "pass --verifier-key (from `keel ledger key` on the ledger's host) or --key"
        )
    return None


def cmd_verify(args: argparse.Namespace) -> int:
    import base64

    from keel.ledger.errors import TamperError

    external = [
        (f"checkpoint file {name}", _read_input(name, "checkpoint file", MAX_NOTE_BYTES))
        for name in args.checkpoint
    ]
    with _open(args, read_only=True) as ledger:
        verifier = _verifier(args, ledger)
        try:
            report = ledger.verify(verifier, external)
        except TamperError as exc:
            if not args.json:
                raise
            print_json({"ok": False, "firstBadIndex": exc.index, "problem": str(exc)})
            return 1
        head = ledger.head_path
    root = base64.b64encode(report.root).decode()
    if report.head is None and report.checkpoints:
        print(
            f"keel: warning: there is no {head} beside the database, so verify cannot tell "
            "whether the ledger went back since its last checkpoint; `keel ledger checkpoint` "
            "writes it",
            file=sys.stderr,
        )
    if args.json:
        print_json(
            {
                "ok": True,
                "size": report.size,
                "root": root,
                "checkpoints": report.checkpoints,
                "externalCheckpoints": report.external,
                "head": None if report.head is None else {"file": str(head), "size": report.head},
                "verifierKey": str(verifier) if verifier else None,
            }
        )
        return 0
    print(f"ok: {_count(report.size, 'entry', 'entries')}, root {root}")
    if report.checkpoints:
        stored = _count(report.checkpoints, "stored checkpoint", "stored checkpoints")
        print(f"ok: {stored}, signed by {verifier}")
    if report.external:
        files = _count(report.external, "checkpoint file", "checkpoint files")
        print(f"ok: the ledger extends the {files} given")
    if report.head is not None:
        print(f"ok: the ledger extends its last signed checkpoint ({head}, size {report.head})")
    return 0


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _print_proof(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def cmd_prove_inclusion(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as ledger:
        proof = ledger.inclusion_proof(args.index, args.size)
    _print_proof(proof.to_json())
    return 0


def cmd_prove_consistency(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as ledger:
        proof = ledger.consistency_proof(args.old, args.new)
    _print_proof(proof.to_json())
    return 0


def cmd_verify_proof(args: argparse.Namespace) -> int:
    from keel.config import parse_json
    from keel.errors import ConfigError
    from keel.ledger.core import InclusionProof, parse_proof
    from keel.ledger.errors import MalformedError, ProofError

    text = _read_input(args.file, "proof file", MAX_PROOF_BYTES)
    try:
        document = parse_json(text, source=args.file)
    except ConfigError as exc:
        raise MalformedError(str(exc)) from None
    try:
        proof = parse_proof(document)
    except MalformedError as exc:
        raise MalformedError(f"{args.file}: {exc}") from None
    try:
        proof.verify()
    except ProofError as exc:
        raise ProofError(f"{args.file}: invalid proof: {exc}") from None
    if isinstance(proof, InclusionProof):
        print(f"valid: leaf {proof.leaf_index} is in the tree of size {proof.tree_size}")
    else:
        print(f"valid: the tree of size {proof.size2} extends the tree of size {proof.size1}")
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    from keel.ledger.keys import provision
    from keel.ledger.store import Ledger

    db = _db_path(args)
    path = _key_path(args)
    if args.provision and (path.exists() or path.is_symlink()):
        verifier = provision(path).verifier
    else:  # made here if missing (by its directory's owner only)
        ledger = Ledger.open(db, read_only=True) if db.exists() else None
        try:
            verifier = _signer(args, ledger).verifier
        finally:
            if ledger is not None:
                ledger.close()
    if args.json:
        print_json(
            {
                "name": verifier.name,
                "keyId": f"{verifier.key_id:08x}",
                "verifierKey": str(verifier),
                "keyFile": str(_key_path(args)),
            }
        )
    else:
        print(verifier)
    return 0
