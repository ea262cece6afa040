"""``keel appliance ...``: the image's own commands (first boot from a seed)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_SEED = Path("/boot/keel-seed")
DEFAULT_KEYS = Path("/root/.ssh/authorized_keys")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    appliance = commands.add_parser(
        "appliance",
        help="the keel image's own commands (first boot)",
        description="Commands a keel appliance runs on itself.",
    )
    sub = appliance.add_subparsers(dest="appliance_command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "seed",
        help="apply a seed directory: the operator's SSH keys, a mesh invite",
        description="Apply what the operator put in the seed directory (docs/install.md): "
        "add its authorized_keys to root's, and join the mesh of its mesh-invite. Each "
        "file is applied once (the keys file is renamed .applied, the invite deleted); "
        "a missing file is nothing to do. The image runs this at every boot.",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_SEED,
        help="the seed directory (default: %(default)s, on the EFI system partition)",
    )
    p.add_argument(
        "--authorized-keys",
        type=Path,
        default=DEFAULT_KEYS,
        metavar="FILE",
        help="the authorized_keys file the seed's keys are added to (default: %(default)s)",
    )
    p.add_argument(
        "--mesh-socket",
        type=Path,
        default=None,
        metavar="PATH",
        help="the control socket of the mesh node that joins (default: /run/keel/mesh.sock)",
    )
    p.add_argument(
        "--only",
        choices=("keys", "mesh"),
        help="apply only the keys, or only the invite (the image does each at its moment)",
    )
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.set_defaults(func=_seed)


def _seed(args: argparse.Namespace) -> int:
    from keel.appliance.seed import apply_keys, join_mesh
    from keel.output import print_json

    done: dict[str, Any] = {"seed": str(args.dir), "keys": None, "mesh": None}
    if args.only in (None, "keys"):
        done["keys"] = apply_keys(args.dir, args.authorized_keys)
    if args.only in (None, "mesh"):
        done["mesh"] = join_mesh(args.dir, _joiner(args.mesh_socket))
    if args.json:
        print_json(done)
        return 0
    keys, mesh = done["keys"], done["mesh"]
    if keys is None and mesh is None:
        print(f"keel: nothing to apply in {args.dir}")
    if keys is not None:
        print(f"keel: {len(keys['added'])} of {keys['keys']} seed key(s) added to {keys['target']}")
    if mesh is not None:
        print(f"keel: joined mesh {mesh.get('mesh')} through {mesh.get('via')}")
    return 0


def _joiner(mesh_socket: Path | None) -> Any:
    def join(token: str) -> dict[str, Any]:
        from keel.mesh.client import MeshClient

        result: dict[str, Any] = MeshClient(mesh_socket).join(token)
        return result

    return join
