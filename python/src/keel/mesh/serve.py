"""``keel mesh serve --config FILE``: the mesh node on keel's service shell.

:func:`keel.service.main` loads the config (:mod:`keel.mesh.config`), sets
up logging, signals, the ledger recorder and the control socket, and runs
:class:`~keel.mesh.node.MeshNode` until SIGTERM or SIGINT.
"""

from __future__ import annotations

from pathlib import Path

from keel import service
from keel.mesh import config
from keel.mesh.node import MeshNode


def main(config_path: Path, *, verbose: bool = False) -> int:
    return service.main("mesh", config_path, load=config.load, make=MeshNode, verbose=verbose)
